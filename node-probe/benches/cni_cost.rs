//! What flows costs under each CNI wiring of the lab: new TCP connections a second from
//! a pod on node-1 to a pod on node-2 (through that mode's routes or tunnel), first with
//! no probe, then in the same run with a node-probe per node enforcing a policy that
//! isolates the server and admits the client (every connection decided at the client's
//! uplink or tunnel and at the server's interface), and the probes' CPU time per
//! connection. The bench owns both ends: a listener in the server pod, client threads in
//! the client pod closing with a reset (no TIME_WAIT to run the ports out).
//!
//! Needs root. Run: `cargo bench -p flows-node-probe --bench cni_cost`
//! (FLOWS_BENCH_SECS: seconds per measurement, default 10; FLOWS_BENCH_CNI: one mode).

#[path = "../tests/common/mod.rs"]
mod common;

use std::{
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use common::Probe;
use flows_lab::{
    cni::CniMode,
    manifests, netns,
    state::State,
    testing::{LabGuard, skip_unless_root},
};

const PORT: u16 = 9000;
const CLIENTS: usize = 4;

const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: { name: load }
---
apiVersion: v1
kind: Pod
metadata: { name: client, namespace: load, labels: { role: client } }
spec: { nodeName: node-1, containers: [ { name: c, image: x } ] }
---
apiVersion: v1
kind: Pod
metadata: { name: server, namespace: load, labels: { role: server } }
spec:
  nodeName: node-2
  containers: [ { name: s, image: x, ports: [ { containerPort: 80 } ] } ]
"#;

const POLICY: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: { name: server, namespace: load }
spec:
  podSelector: { matchLabels: { role: server } }
  ingress: [ { from: [ { podSelector: { matchLabels: { role: client } } } ], ports: [ { port: 9000 } ] } ]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: { name: client, namespace: load }
spec:
  podSelector: { matchLabels: { role: client } }
  policyTypes: [ Egress ]
  egress: [ { to: [ { podSelector: { matchLabels: { role: server } } } ], ports: [ { port: 9000 } ] } ]
"#;

/// Accepts and drops connections in the server pod, blocking in accept (no polling on
/// the measured path), until [`Server::stop`] shuts the listener down.
struct Server {
    fd: std::os::fd::RawFd,
    thread: std::thread::JoinHandle<()>,
}

impl Server {
    fn start(netns_name: String, addr: IpAddr) -> Server {
        let (listening, ready) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            netns::enter(&netns_name).expect("server netns");
            let l = TcpListener::bind(SocketAddr::new(addr, PORT)).expect("bind");
            let _ = listening.send(std::os::fd::AsRawFd::as_raw_fd(&l));
            // Ends when the listener is shut down (accept then fails).
            while let Ok((s, _)) = l.accept() {
                drop(s);
            }
        });
        let fd = ready.recv().expect("the listener started");
        Server { fd, thread }
    }

    fn stop(self) {
        // SAFETY: the listener is alive until its thread, joined below, returns; shutting
        // down a listening socket wakes a blocked accept with an error.
        unsafe { libc::shutdown(self.fd, libc::SHUT_RDWR) };
        let _ = self.thread.join();
    }
}

/// Connections completed in `secs` by CLIENTS threads in the client pod.
fn rate(client_netns: &str, server: IpAddr, secs: u64) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (ns, stop, done) = (client_netns.to_string(), stop.clone(), done.clone());
            std::thread::spawn(move || {
                netns::enter(&ns).expect("client netns");
                let to = SocketAddr::new(server, PORT);
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(s) = TcpStream::connect_timeout(&to, Duration::from_secs(1)) {
                        // A reset, not a FIN: no TIME_WAIT, so the ports last.
                        let _ = nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::Linger, &libc::linger { l_onoff: 1, l_linger: 0 });
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(secs));
    stop.store(true, Ordering::Relaxed);
    let n = done.load(Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    for t in threads {
        let _ = t.join();
    }
    n as f64 / elapsed
}

/// user + system CPU seconds of a process so far.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit_once(')').map(|(_, r)| r.split_whitespace().collect()).unwrap_or_default();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of stat; here counted from after "(comm)".
    (ticks(11) + ticks(12)) / 100.0
}

fn measure(mode: CniMode, secs: u64) {
    let lab = LabGuard::from_yaml_wired(CLUSTER, 2, mode).expect("lab up");
    let state: State = lab.state.clone();
    let client = state.pod("load", "client").expect("client").clone();
    let server = state.pod("load", "server").expect("server").clone();
    let listener = Server::start(server.netns.clone(), IpAddr::V4(server.ipv4));
    let without = rate(&client.netns, IpAddr::V4(server.ipv4), secs);

    let mdir = manifests::dir(&lab.dir);
    let modes = state.namespaces.iter().map(|n| (n.name.clone(), "enforce".to_string())).collect();
    manifests::write_cluster(&lab.dir, &state, &modes).expect("cluster manifests");
    std::fs::create_dir_all(mdir.join("policies")).expect("policies dir");
    std::fs::write(mdir.join("policies/load.yaml"), POLICY).expect("policy");
    let args = ["--manifests", mdir.to_str().expect("utf8"), "--ring-capacity", "65536"];
    let probes: Vec<Probe> = ["node-1", "node-2"].iter().map(|n| Probe::start_with(&state, n, &lab.dir, &args)).collect();
    let pids: Vec<u32> = probes.iter().map(Probe::pid).collect();
    let cpu_before: f64 = pids.iter().map(|p| cpu_secs(*p)).sum();
    let started = Instant::now();
    let with = rate(&client.netns, IpAddr::V4(server.ipv4), secs);
    let cpu = pids.iter().map(|p| cpu_secs(*p)).sum::<f64>() - cpu_before;
    let connections = with * started.elapsed().as_secs_f64();
    listener.stop();
    drop(probes);
    println!(
        "{:<14} {:>12.0} {:>12.0} {:>8.2} {:>16.2}",
        mode.name(),
        without,
        with,
        with / without,
        cpu * 1e6 / connections.max(1.0)
    );
    lab.down().expect("lab down");
}

fn main() {
    if skip_unless_root("cni_cost") {
        return;
    }
    let secs = std::env::var("FLOWS_BENCH_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(10);
    let modes: Vec<CniMode> = match std::env::var("FLOWS_BENCH_CNI") {
        Ok(m) => vec![CniMode::parse(&m).expect("FLOWS_BENCH_CNI")],
        Err(_) => CniMode::ALL.to_vec(),
    };
    println!("new TCP connections a second, node-1 -> node-2, {CLIENTS} clients, {secs} s each; probes enforce a policy on both ends");
    println!("{:<14} {:>12} {:>12} {:>8} {:>16}", "MODE", "NO PROBE/s", "PROBES/s", "RATIO", "PROBE µs/CONN");
    for m in modes {
        measure(m, secs);
    }
}
