//! Enforcement across node-probe restarts (the lab's seed cluster under the seed
//! policies, links pinned with --pin-dir): traffic runs without a pause while both
//! probes are stopped (SIGTERM), left down, started again, killed (SIGKILL) and started
//! again. Not one denied attempt gets through and not one allowed attempt fails; after
//! each start exactly one program of ours is attached per interface and direction (the
//! earlier probe's links are released in the hand-over); the new probe's flows are
//! served; `--uninstall` leaves nothing attached and nothing pinned. Needs root.

mod common;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use common::{Probe, all_flows, settle};
use flows_lab::{
    drive::{self, DriveOptions, Outcome, Scenario},
    manifests,
    state::State,
    testing::{LabGuard, skip_unless_root},
};
use flows_proto::Verdict;
use nix::sys::signal::Signal;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Removes the test's pins (detaching whatever they hold) even when it fails.
struct Pins(PathBuf);
impl Drop for Pins {
    fn drop(&mut self) {
        for e in std::fs::read_dir(&self.0).into_iter().flatten().flatten() {
            let _ = flows_node_probe::datapath::remove_pinned(&e.path());
        }
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Pod interfaces (host side) of a node.
fn pod_ifaces(netns: &str) -> Vec<String> {
    let out = std::process::Command::new("ip")
        .args(["-n", netns, "-o", "link", "show", "type", "veth"])
        .output()
        .expect("ip link");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .filter(|n| n.starts_with("fl") && n != "fl-uplink")
        .collect()
}

/// Names of the TCX programs attached to `ifname` in `netns`, both directions.
fn attached(netns: &str, ifname: &str) -> Vec<String> {
    let path = PathBuf::from("/run/netns").join(netns);
    let ifname = ifname.to_string();
    std::thread::spawn(move || {
        let f = std::fs::File::open(&path).expect("netns");
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        flows_node_probe::datapath::tcx_programs(&ifname).expect("query tcx")
    })
    .join()
    .expect("query thread")
}

/// Exactly one of our programs per direction on every pod interface and the uplink.
fn one_each(state: &State, when: &str) {
    for n in &state.nodes {
        let ifaces = pod_ifaces(&n.netns);
        assert!(!ifaces.is_empty(), "{when}: no pod interfaces on {}", n.name);
        for i in &ifaces {
            let mut progs = attached(&n.netns, i);
            progs.sort();
            assert_eq!(progs, vec!["flows_from_ep", "flows_to_ep"], "{when}: {} {i}", n.name);
        }
        let mut up = attached(&n.netns, "fl-uplink");
        up.sort();
        assert_eq!(up, vec!["flows_from_net", "flows_to_net"], "{when}: {} uplink", n.name);
    }
}

fn nothing_attached(state: &State) {
    for n in &state.nodes {
        for i in pod_ifaces(&n.netns).iter().chain(["fl-uplink".to_string()].iter()) {
            let progs = attached(&n.netns, i);
            assert!(progs.is_empty(), "left attached on {} {i}: {progs:?}", n.name);
        }
    }
}

const TRAFFIC: &str = "connections:
  - { name: denied-db, from: frontend/frontend, to: { service: db/db }, protocol: TCP, port: 80, timeout_ms: 300 }
  - { name: denied-pod, from: frontend/frontend, to: { pod: db/db }, protocol: TCP, port: 80, timeout_ms: 300 }
  - { name: allowed-backend, from: frontend/frontend, to: { service: backend/backend }, protocol: TCP, port: 80, timeout_ms: 2000 }
  - { name: allowed-db, from: backend/backend, to: { service: db/db }, protocol: TCP, port: 80, timeout_ms: 2000 }
";

/// Traffic without a pause, counting what should not happen.
struct Traffic {
    stop: Arc<AtomicBool>,
    rounds: Arc<AtomicU64>,
    wrong: Arc<std::sync::Mutex<Vec<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Traffic {
    fn start(state: &State) -> Traffic {
        let scenario = Scenario::parse("handover", TRAFFIC).expect("scenario");
        let (stop, rounds, wrong) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)), Arc::new(std::sync::Mutex::new(Vec::new())));
        let (s, r, w, st) = (stop.clone(), rounds.clone(), wrong.clone(), state.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let rep = drive::run(&st, &scenario, &DriveOptions { concurrency: 4 }).expect("drive");
                for a in &rep.attempts {
                    let want = if a.connection.starts_with("denied") { Outcome::Failure } else { Outcome::Success };
                    if a.outcome != want {
                        w.lock().unwrap_or_else(|p| p.into_inner()).push(format!("{} {:?}", a.connection, a.outcome));
                    }
                }
                r.fetch_add(1, Ordering::Relaxed);
            }
        });
        Traffic { stop, rounds, wrong, thread: Some(thread) }
    }

    fn rounds(&self) -> u64 {
        self.rounds.load(Ordering::Relaxed)
    }

    /// Waits for `n` more complete rounds of the traffic.
    fn wait_rounds(&self, n: u64) {
        let start = self.rounds();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while self.rounds() < start + n {
            assert!(std::time::Instant::now() < deadline, "traffic stalled");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn finish(mut self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().expect("traffic thread");
        }
        self.wrong.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn enforcement_has_no_gap_across_probe_restarts_and_nothing_is_left_attached() {
    if skip_unless_root("enforcement_has_no_gap_across_probe_restarts_and_nothing_is_left_attached") {
        return;
    }
    let lab = LabGuard::up(&[root().join("lab/examples/seed")], 2).expect("lab up");
    let state = lab.state.clone();
    let mdir = manifests::dir(&lab.dir);
    let modes: BTreeMap<String, String> = state.namespaces.iter().map(|n| (n.name.clone(), "enforce".to_string())).collect();
    manifests::write_cluster(&lab.dir, &state, &modes).expect("cluster");
    let pd = mdir.join("policies");
    std::fs::create_dir_all(&pd).expect("policies dir");
    for f in std::fs::read_dir(root().join("lab/examples/seed-policies")).expect("seed policies").flatten() {
        std::fs::copy(f.path(), pd.join(f.file_name())).expect("copy");
    }
    let pins = Pins(PathBuf::from(format!("/sys/fs/bpf/flows-test-handover-{}", std::process::id())));
    let pin_dir = |node: &str| pins.0.join(node).display().to_string();
    let start = |node: &str| {
        let pd = pin_dir(node);
        let args = ["--manifests", mdir.to_str().expect("utf8"), "--uplink-iface", "fl-uplink", "--pin-dir", pd.as_str()];
        Probe::start_with(&state, node, &lab.dir, &args)
    };
    let mut probes: Vec<Probe> = ["node-1", "node-2"].iter().map(|n| start(n)).collect();
    one_each(&state, "first start");

    let traffic = Traffic::start(&state);
    traffic.wait_rounds(2);

    // 1. Stopped: the pinned programs go on deciding.
    for p in probes.iter_mut() {
        assert!(p.signal(Signal::SIGTERM).success(), "probe {} exits cleanly", p.node);
    }
    one_each(&state, "probes stopped");
    traffic.wait_rounds(3);
    // 2. Started again: the hand-over leaves one program each.
    probes = ["node-1", "node-2"].iter().map(|n| start(n)).collect();
    traffic.wait_rounds(2);
    one_each(&state, "after the restart");
    // 3. Killed: nothing runs to tidy up, and the pins hold.
    for p in probes.iter_mut() {
        p.signal(Signal::SIGKILL);
    }
    traffic.wait_rounds(3);
    one_each(&state, "probes killed");
    probes = ["node-1", "node-2"].iter().map(|n| start(n)).collect();
    traffic.wait_rounds(2);
    one_each(&state, "after the start following the kill");
    let rounds = traffic.rounds();
    let wrong = traffic.finish();
    assert!(wrong.is_empty(), "over {rounds} rounds, attempts went the wrong way: {wrong:?}");

    // 4. The new probes report what their programs decide.
    let probe_scenario = Scenario::parse("after", TRAFFIC).expect("scenario");
    let rep = drive::run(&state, &probe_scenario, &DriveOptions::default()).expect("drive");
    settle(&state, &probes);
    let flows: Vec<_> = probes.iter().flat_map(|p| all_flows(&p.addr)).collect();
    for a in rep.attempts.iter().filter(|a| a.connection.starts_with("denied")) {
        let port = a.src_port.expect("source port");
        let seen = flows.iter().any(|f| {
            f.verdict == Verdict::Dropped as i32
                && f.drop_reason == "POLICY_DENIED"
                && f.l4.as_ref().and_then(|l| l.protocol.as_ref()).is_some_and(|p| {
                    matches!(p, flows_proto::layer4::Protocol::Tcp(t) if t.source_port == u32::from(port))
                })
        });
        assert!(seen, "the denied attempt {} (port {port}) was not reported after the restart", a.connection);
    }

    // 5. Uninstalled: nothing attached, nothing pinned.
    for p in probes.iter_mut() {
        assert!(p.signal(Signal::SIGTERM).success());
    }
    for n in ["node-1", "node-2"] {
        let st = std::process::Command::new(env!("CARGO_BIN_EXE_flows-node-probe"))
            .args(["--uninstall", "--pin-dir", &pin_dir(n)])
            .status()
            .expect("uninstall");
        assert!(st.success(), "uninstall {n}");
        assert!(!Path::new(&pin_dir(n)).exists(), "pins of {n} remain");
    }
    nothing_attached(&state);
}
