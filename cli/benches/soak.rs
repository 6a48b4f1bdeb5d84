//! Soak: new UDP flows (each a new connection attempt: a 5-tuple not seen for far longer
//! than the 30 s idle rule) from a lab pod to the world host at a target rate (default
//! 100,000 a second) for 60 s, through node-probe → relay → embedded store. Every flow
//! record a probe produced must end up written to the store or counted lost (the relay's
//! buffer, or the probe's ring overrunning the store's reader), and kernel ring buffer
//! losses are counted; memory of the probes and the relay is sampled every second, CPU
//! per flow of each part over the run. Two runs: paced by the pipeline (all share the
//! cores: what the pipeline sustains), then generator first (its thread at nice -20: it
//! offers about what it does alone, and whatever the starved pipeline cannot keep must be
//! counted lost). Baseline, same run: the same generator into the same lab without probes.
//!
//! Needs root and the release binaries beside `flows`:
//! `cargo build --release --bins && cargo bench -p flows-cli --bench soak`
//! (FLOWS_SOAK_RATE, FLOWS_SOAK_SECS change the rate and duration).

use std::{
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use flows_lab::{state::State, testing::lab_lock};
use flows_proto::{ServerStatusRequest, ServerStatusResponse, observer_client::ObserverClient};

fn flows_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_flows"))
}

fn flows(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(flows_bin()).args(args).env("FLOWS_LAB_DIR", dir).output().expect("run flows")
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let out = flows(dir, args);
    assert!(out.status.success(), "flows {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

struct Cleanup(PathBuf);
impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = flows(&self.0, &["lab", "down"]);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const SOCKETS: usize = 128;
const PORTS: u64 = 60_000;
const BATCH: usize = 64;

/// Sends UDP datagrams from inside `netns` to `dst`, each on a 5-tuple of its own
/// (128 source sockets × 60,000 destination ports), paced to `rate` a second, until
/// `stop`; `first`: ahead of everything else on the machine. Counts datagrams in `sent`.
fn generate(netns: String, dst: Ipv4Addr, rate: u64, first: bool, stop: Arc<AtomicBool>, sent: Arc<AtomicU64>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        if first {
            // Nice -20 for this thread only (Linux nice is per thread): the sends and the
            // datapath work done in their context come before the probes and the relay.
            // SAFETY: setpriority has no memory preconditions.
            let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, -20) };
            assert_eq!(r, 0, "setpriority: {}", std::io::Error::last_os_error());
        }
        let f = std::fs::File::open(Path::new("/run/netns").join(&netns)).expect("pod netns");
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let socks: Vec<UdpSocket> = (0..SOCKETS).map(|_| UdpSocket::bind("0.0.0.0:0").expect("bind")).collect();
        let payload = [0u8; 16];
        let start = Instant::now();
        let mut batch_no: u64 = 0;
        let mut addrs: Vec<libc::sockaddr_in> = vec![unsafe { std::mem::zeroed() }; BATCH];
        let mut iov = libc::iovec { iov_base: payload.as_ptr() as *mut _, iov_len: payload.len() };
        let mut msgs: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; BATCH];
        while !stop.load(Ordering::Relaxed) {
            let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
            if sent.load(Ordering::Relaxed) + BATCH as u64 > due {
                std::thread::sleep(Duration::from_micros(200));
                continue;
            }
            let sock = &socks[(batch_no % SOCKETS as u64) as usize];
            let round = batch_no / SOCKETS as u64;
            for k in 0..BATCH {
                let port = 1024 + ((round * BATCH as u64 + k as u64) % PORTS) as u16;
                let a = SocketAddrV4::new(dst, port);
                addrs[k] = libc::sockaddr_in {
                    sin_family: libc::AF_INET as u16,
                    sin_port: a.port().to_be(),
                    sin_addr: libc::in_addr { s_addr: u32::from(*a.ip()).to_be() },
                    sin_zero: [0; 8],
                };
                msgs[k].msg_hdr.msg_name = &mut addrs[k] as *mut _ as *mut libc::c_void;
                msgs[k].msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
                msgs[k].msg_hdr.msg_iov = &mut iov;
                msgs[k].msg_hdr.msg_iovlen = 1;
            }
            // SAFETY: msgs, addrs and iov outlive the call; lengths match the arrays.
            let n = unsafe { libc::sendmmsg(sock.as_raw_fd(), msgs.as_mut_ptr(), BATCH as u32, 0) };
            if n > 0 {
                sent.fetch_add(n as u64, Ordering::Relaxed);
            }
            batch_no += 1;
        }
    })
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()))
        .unwrap_or(0)
}

/// CPU seconds a process has used (all its threads, user + system).
fn cpu_secs(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    // Fields after the command (which may hold spaces) start at state, field 3.
    let Some((_, rest)) = stat.rsplit_once(')') else { return 0.0 };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    (ticks(11) + ticks(12)) as f64 / clock_ticks()
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).max(1) as f64
}

/// The machine's CPU seconds by kind since boot, from /proc/stat: (user + nice, system,
/// softirq + irq, idle + iowait).
fn machine_cpu() -> [f64; 4] {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = s.lines().find(|l| l.starts_with("cpu ")) else { return [0.0; 4] };
    let v: Vec<f64> = line.split_whitespace().skip(1).map(|x| x.parse().unwrap_or(0.0)).collect();
    let g = |i: usize| v.get(i).copied().unwrap_or(0.0) / clock_ticks();
    [g(0) + g(1), g(2), g(5) + g(6), g(3) + g(4)]
}

fn status(rt: &tokio::runtime::Runtime, addr: &str) -> ServerStatusResponse {
    rt.block_on(async {
        let mut c = ObserverClient::connect(format!("http://{addr}")).await.expect("connect to the relay");
        c.server_status(ServerStatusRequest {}).await.expect("status").into_inner()
    })
}

fn up(dir: &Path, probes: bool) -> State {
    let seed = Path::new(env!("CARGO_MANIFEST_DIR")).join("../lab/examples/seed").display().to_string();
    let d = dir.display().to_string();
    let mut args = vec!["lab", "up", seed.as_str(), "--nodes", "2", "--no-apiserver", "--state-dir", d.as_str()];
    if probes {
        args.push("--probes");
    }
    ok(dir, &args);
    State::load(dir).expect("state")
}

/// Runs the generator from frontend to the world for `secs`; returns datagrams sent and
/// the seconds it ran, calling `tick` every second.
fn run(state: &State, rate: u64, secs: u64, first: bool, mut tick: impl FnMut(u64)) -> (u64, f64) {
    let pod = state.pods.iter().find(|p| p.namespace == "frontend").expect("frontend pod");
    let (stop, sent) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
    let t0 = Instant::now();
    let g = generate(pod.netns.clone(), state.world.ipv4, rate, first, stop.clone(), sent.clone());
    for s in 1..=secs {
        while t0.elapsed() < Duration::from_secs(s) {
            std::thread::sleep(Duration::from_millis(20));
        }
        tick(s);
    }
    stop.store(true, Ordering::Relaxed);
    let _ = g.join();
    (sent.load(Ordering::Relaxed), t0.elapsed().as_secs_f64())
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("soak: needs root (skipped)");
        return;
    }
    let rate: u64 = std::env::var("FLOWS_SOAK_RATE").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    let secs: u64 = std::env::var("FLOWS_SOAK_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(60);
    let _lock = lab_lock().expect("lab lock");
    let dir = flows_lab::testing::temp_dir("flows-soak").expect("dir");
    let _clean = Cleanup(dir.clone());

    // Baseline: the lab without probes, 10 s.
    let state = up(&dir, false);
    let (base_sent, base_secs) = run(&state, rate, 10, false, |_| {});
    let base_rate = base_sent as f64 / base_secs;
    ok(&dir, &["lab", "down"]);

    // The soak.
    let state = up(&dir, true);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let relay = std::fs::read_to_string(dir.join("relay.addr")).expect("relay address");
    let pids: Vec<(String, u32)> = state
        .daemons
        .iter()
        .filter(|d| d.role == "node-probe" || d.role == "relay")
        .map(|d| (format!("{}{}", d.role, d.node.as_deref().map(|n| format!(" {n}")).unwrap_or_default()), d.pid))
        .collect();
    // Paced by the pipeline: generator, probes, relay and store share the cores as
    // equals, so the send rate is what the whole pipeline sustains.
    phase(&rt, &relay, &state, &pids, rate, secs, base_rate, false);
    // Generator first: it offers what it can alone and the pipeline, starved of CPU,
    // falls behind; what it cannot keep must be counted lost, none silently dropped.
    phase(&rt, &relay, &state, &pids, rate, secs, base_rate, true);
}

/// One measured run and its drain; prints its report and checks that every record was
/// written or counted lost.
#[allow(clippy::too_many_arguments)]
fn phase(
    rt: &tokio::runtime::Runtime,
    relay: &str,
    state: &State,
    pids: &[(String, u32)],
    rate: u64,
    secs: u64,
    base_rate: f64,
    generator_first: bool,
) {
    let before = status(rt, relay);
    let cpu_before: Vec<f64> = pids.iter().map(|(_, pid)| cpu_secs(*pid)).collect();
    let machine_before = machine_cpu();
    let mut rss: Vec<Vec<u64>> = vec![Vec::new(); pids.len()];
    let mut buffered_max = 0;
    let (sent, ran) = run(state, rate, secs, generator_first, |_| {
        for (i, (_, pid)) in pids.iter().enumerate() {
            rss[i].push(rss_kib(*pid));
        }
        let st = status(rt, relay);
        buffered_max = buffered_max.max(st.store.map(|s| s.rows_buffered).unwrap_or(0));
    });
    let offered = sent as f64 / ran;
    let machine_run = machine_cpu();
    // Drain: until the writer holds nothing and the counts stop moving.
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut last = (0, 0);
    let after = loop {
        std::thread::sleep(Duration::from_secs(2));
        let st = status(rt, relay);
        let s = st.store.clone().unwrap_or_default();
        let now = (st.seen_flows, s.rows_written + s.rows_lost + s.rows_lost_upstream);
        if s.rows_buffered == 0 && now == last {
            break st;
        }
        last = now;
        assert!(Instant::now() < deadline, "the relay did not drain: {st:?}");
    };
    for (i, (_, pid)) in pids.iter().enumerate() {
        rss[i].push(rss_kib(*pid));
    }
    // CPU over the run and the drain: what each part spent on the flows.
    let cpu: Vec<f64> = pids.iter().zip(&cpu_before).map(|((_, pid), b)| cpu_secs(*pid) - b).collect();
    let lost_kernel = |s: &ServerStatusResponse| s.lost.iter().map(|l| l.count).sum::<u64>();
    let (sb, sa) = (before.store.clone().unwrap_or_default(), after.store.clone().unwrap_or_default());
    let seen = after.seen_flows - before.seen_flows;
    let written = sa.rows_written - sb.rows_written;
    let lost_buffer = sa.rows_lost - sb.rows_lost;
    let lost_upstream = sa.rows_lost_upstream - sb.rows_lost_upstream;
    let kernel = lost_kernel(&after) - lost_kernel(&before);
    let unaccounted = seen as i64 - (written + lost_buffer + lost_upstream) as i64;

    let mode = if generator_first { "generator first (nice -20)" } else { "paced by the pipeline" };
    println!();
    println!("soak, {mode}: {secs} s at a target of {rate} new flows/s (UDP, frontend → world), 2 nodes, embedded store");
    println!("{:<46} {:>14}", "baseline send rate, no probes (flows/s)", format!("{base_rate:.0}"));
    println!("{:<46} {:>14}", "send rate with probe, relay, store (flows/s)", format!("{offered:.0}"));
    println!("{:<46} {:>14}", "  ratio to baseline", format!("{:.2}", offered / base_rate));
    println!("{:<46} {:>14}", "attempts sent", sent);
    println!("{:<46} {:>14}", "events lost in the kernel ring buffer", kernel);
    println!("{:<46} {:>14}", "flow records made by the probes", seen);
    println!("{:<46} {:>14}", "  written to the store", written);
    println!("{:<46} {:>14}", "  lost: relay buffer full (counted)", lost_buffer);
    println!("{:<46} {:>14}", "  lost: ring overran the store reader (counted)", lost_upstream);
    println!("{:<46} {:>14}", "  unaccounted", unaccounted);
    println!("{:<46} {:>14}", "records per attempt (made + kernel lost) / sent", format!("{:.3}", (seen + kernel) as f64 / sent.max(1) as f64));
    println!("{:<46} {:>14}", "store writer's buffer, most rows held", buffered_max);
    println!("{:<46} {:>10} {:>10} {:>10}", "RSS (MiB)", "at 10 s", "max", "end");
    for (i, (name, _)) in pids.iter().enumerate() {
        let r = &rss[i];
        let at10 = r.get(9).or(r.last()).copied().unwrap_or(0);
        let max = r.iter().copied().max().unwrap_or(0);
        let end = r.last().copied().unwrap_or(0);
        println!("{:<46} {:>10.1} {:>10.1} {:>10.1}", format!("  {name}"), at10 as f64 / 1024.0, max as f64 / 1024.0, end as f64 / 1024.0);
    }
    // CPU per flow: the probes and the relay over the run and the drain; the machine's
    // kinds over the run only (the generator's sends and the datapath are its system and
    // softirq time).
    println!("{:<46} {:>10} {:>14}", "CPU", "seconds", "µs per flow");
    let per_flow = |secs: f64| secs * 1e6 / seen.max(1) as f64;
    for (i, (name, _)) in pids.iter().enumerate() {
        println!("{:<46} {:>10.1} {:>14.2}", format!("  {name}"), cpu[i], per_flow(cpu[i]));
    }
    for (k, name) in ["machine: user", "machine: system", "machine: irq + softirq", "machine: idle"].iter().enumerate() {
        let d = machine_run[k] - machine_before[k];
        println!("{:<46} {:>10.1} {:>14.2}", format!("  {name} (run)"), d, per_flow(d));
    }
    assert_eq!(unaccounted, 0, "every record is written or counted lost");
}
