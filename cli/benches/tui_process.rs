//! The real `flows tui` process while 10,000 flows/s arrive (a file replayed at that
//! rate, through the same parser, state and drawing as a server's stream, to a real
//! terminal: tmux, 200x50): drawing time per frame (p50, p99), CPU share and resident
//! memory, against the same process idle (nothing arriving) in the same run.
//! Needs tmux and the release binaries: `cargo build --release --bins`, then
//! `cargo bench -p flows-cli --bench tui_process`.

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use flows_proto::{Endpoint, Flow, Ip, Layer4, Tcp, Timestamp, Verdict, Workload, layer4};

const RATE: u64 = 10_000;
const SECONDS: u64 = 30;

fn flow(i: u64) -> Flow {
    let pod = |ns: String, name: String| Endpoint {
        namespace: ns,
        pod_name: name.clone(),
        labels: vec![format!("app={name}")],
        workloads: vec![Workload { name: name.clone(), kind: "Deployment".into() }],
        node_name: format!("node-{}", i % 4),
        ..Default::default()
    };
    let denied = i % 20 == 0;
    Flow {
        time: Some(Timestamp { seconds: 1_700_000_000 + (i / RATE) as i64, nanos: ((i % RATE) * 100_000) as i32 }),
        uuid: format!("u{i}"),
        node_name: format!("node-{}", i % 4),
        verdict: if denied { Verdict::Dropped } else { Verdict::Forwarded } as i32,
        drop_reason: if denied { "POLICY_DENIED".into() } else { String::new() },
        ip: Some(Ip { source: format!("10.244.{}.{}", i % 200, i % 250), destination: format!("10.244.{}.3", (i / 7) % 200), ..Default::default() }),
        l4: Some(Layer4 {
            protocol: Some(layer4::Protocol::Tcp(Tcp { source_port: (30_000 + i % 30_000) as u32, destination_port: [80, 443, 5432, 8080][(i % 4) as usize], flags: None })),
        }),
        source: Some(pod(format!("ns-{}", i % 12), format!("svc-{}", i % 300))),
        destination: Some(pod(format!("ns-{}", (i / 3) % 12), format!("svc-{}", (i / 7) % 300))),
        ..Default::default()
    }
}

fn flows_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("exe");
    let p = exe.parent().and_then(Path::parent).expect("target dir").join("flows");
    assert!(p.exists(), "{} is missing: run `cargo build --release --bins` first", p.display());
    p
}

fn tmux(args: &[&str]) -> String {
    let out = Command::new("tmux").args(args).output().expect("tmux");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// utime + stime of a process, in seconds.
fn cpu_s(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // After the ")" that closes the command name: fields from the third on.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 (11 and 12 after the name); 100 ticks a second.
    (ticks(11) + ticks(12)) / 100.0
}

fn rss_mib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok()))
        .unwrap_or(0)
        / 1024
}

struct Run {
    p50: Duration,
    p99: Duration,
    cpu: f64,
    rss: u64,
}

fn run(name: &str, input: &Path, rate: u64, seconds: u64, dir: &Path) -> Run {
    let log = dir.join(format!("{name}.frames"));
    let session = format!("flows-bench-tui-{}-{name}", std::process::id());
    let cmd = format!(
        "{} tui --input-file {} --rate {rate} --frame-log {}",
        flows_bin().display(),
        input.display(),
        log.display()
    );
    tmux(&["new-session", "-d", "-s", &session, "-x", "200", "-y", "50", &cmd]);
    std::thread::sleep(Duration::from_millis(500));
    let pid: u32 = tmux(&["display-message", "-p", "-t", &session, "#{pane_pid}"]).parse().expect("pane pid");
    let c0 = cpu_s(pid);
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(seconds));
    let cpu = (cpu_s(pid) - c0) / t0.elapsed().as_secs_f64();
    let rss = rss_mib(pid);
    tmux(&["send-keys", "-t", &session, "q"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !log.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = Command::new("tmux").args(["kill-session", "-t", &session]).output();
    let mut frames: Vec<u64> = std::fs::read_to_string(&log)
        .expect("frame log")
        .lines()
        .filter_map(|l| l.parse().ok())
        .collect();
    frames.sort_unstable();
    // The first second (start-up, the history) is left out.
    let at = |p: f64| Duration::from_micros(frames.get(((frames.len() as f64 - 1.0) * p) as usize).copied().unwrap_or(0));
    Run { p50: at(0.5), p99: at(0.99), cpu, rss }
}

fn main() {
    let dir = std::env::temp_dir().join(format!("flows-bench-tui-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let busy_file = dir.join("flows.json");
    let mut w = std::io::BufWriter::new(std::fs::File::create(&busy_file).expect("file"));
    for i in 0..RATE * (SECONDS + 5) {
        writeln!(w, "{{\"flow\":{}}}", serde_json::to_string(&flow(i)).expect("json")).expect("write");
    }
    drop(w);
    let idle_file = dir.join("empty.json");
    std::fs::write(&idle_file, "").expect("empty");

    let idle = run("idle", &idle_file, 0, 10, &dir);
    let busy = run("busy", &busy_file, RATE, SECONDS, &dir);
    println!("the flows tui process, 200x50 in tmux, 10 frames a second:");
    println!("  idle:            frame p50 {:>8.2?}  p99 {:>8.2?}  CPU {:>5.1}% of a core  RSS {} MiB", idle.p50, idle.p99, idle.cpu * 100.0, idle.rss);
    println!("  10,000 flows/s:  frame p50 {:>8.2?}  p99 {:>8.2?}  CPU {:>5.1}% of a core  RSS {} MiB", busy.p50, busy.p99, busy.cpu * 100.0, busy.rss);
    println!(
        "  ratio: frame p50 {:.2}x, CPU {:.2}x",
        busy.p50.as_secs_f64() / idle.p50.as_secs_f64().max(1e-9),
        busy.cpu / idle.cpu.max(1e-9)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
