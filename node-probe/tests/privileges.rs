//! The probe runs with exactly the capabilities the chart gives it, and needs each of
//! them: with the chart's list (and nothing else in its bounding set) it loads its
//! programs, attaches them to a pod's veth, pins the links and reports kernel drops;
//! without any one of them it fails at start, saying what it could not do. Measured on
//! the kernel it runs on (the README names the kernel versions).
//!
//! Root only (it builds a network namespace and bpffs pins); skips otherwise, or fails
//! under FLOWS_REQUIRE_ROOT=1.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use flows_lab::testing::skip_unless_root;

/// The capabilities the chart adds to the probe (deploy/helm/flows/values.yaml,
/// nodeProbe.capabilities).
fn chart_capabilities() -> Vec<String> {
    let values = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/helm/flows/values.yaml");
    let text = std::fs::read_to_string(&values).expect("values.yaml");
    let mut caps = Vec::new();
    let mut inside = false;
    for line in text.lines() {
        if line == "  capabilities:" {
            inside = true;
        } else if inside {
            match line.strip_prefix("    - ") {
                Some(c) => caps.push(c.trim().to_string()),
                None => break,
            }
        }
    }
    assert!(!caps.is_empty(), "nodeProbe.capabilities in {}", values.display());
    caps
}

/// A network namespace with one veth pair (a pod's interface, both ends here).
struct Netns(String);

impl Netns {
    fn new(name: &str) -> Netns {
        let _ = Command::new("ip").args(["netns", "del", name]).status();
        let ip = |args: &[&str]| {
            let st = Command::new("ip").args(args).status().expect("ip");
            assert!(st.success(), "ip {args:?}");
        };
        ip(&["netns", "add", name]);
        ip(&["-n", name, "link", "add", "flpriv0", "type", "veth", "peer", "name", "flpriv1"]);
        for l in ["lo", "flpriv0", "flpriv1"] {
            ip(&["-n", name, "link", "set", l, "up"]);
        }
        Netns(name.to_string())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// A probe process, stopped and its pins removed at the end however the test ends.
struct Run {
    child: Child,
    pins: PathBuf,
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
        let _ = Command::new(env!("CARGO_BIN_EXE_flows-node-probe"))
            .arg("--uninstall")
            .arg("--pin-dir")
            .arg(&self.pins)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Starts the probe in `ns` with only `caps` in its bounding set (uid 0 gets nothing
/// else); Ok when it became ready, Err with its output when it exited first.
fn start(ns: &Netns, caps: &[String], dir: &Path) -> (Run, Result<(), String>) {
    let ready = dir.join("ready");
    let log = dir.join("log");
    let _ = std::fs::remove_file(&ready);
    let pins = PathBuf::from(format!("/sys/fs/bpf/flows-privileges-{}", std::process::id()));
    let bounding = format!("--bounding-set=-all{}", caps.iter().map(|c| format!(",+{}", c.to_lowercase())).collect::<String>());
    // nsenter, not `ip netns exec`: the latter mounts a fresh /sys without bpffs.
    let child = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", ns.0))
        .args(["setpriv", &bounding, "--inh-caps=-all", "--"])
        .arg(env!("CARGO_BIN_EXE_flows-node-probe"))
        .args(["--node-name", "n1", "--listen", "127.0.0.1:0", "--iface-prefix", "flpriv", "--iface-poll-secs", "0.2"])
        .arg("--pin-dir")
        .arg(&pins)
        .arg("--ready-file")
        .arg(&ready)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("nsenter setpriv flows-node-probe");
    let mut run = Run { child, pins };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if std::fs::read_to_string(&ready).is_ok_and(|a| !a.is_empty()) {
            return (run, Ok(()));
        }
        if let Ok(Some(_)) = run.child.try_wait() {
            return (run, Err(std::fs::read_to_string(&log).unwrap_or_default()));
        }
        assert!(Instant::now() < deadline, "the probe neither started nor failed within 30 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_probe_needs_exactly_the_capabilities_the_chart_gives_it() {
    if skip_unless_root("the_probe_needs_exactly_the_capabilities_the_chart_gives_it") {
        return;
    }
    let caps = chart_capabilities();
    let dir = std::env::temp_dir().join(format!("flows-privileges-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let ns = Netns::new(&format!("flpriv{}", std::process::id()));

    let (run, started) = start(&ns, &caps, &dir);
    started.unwrap_or_else(|log| panic!("with {caps:?} the probe failed:\n{log}"));
    for side in ["ingress", "egress"] {
        for ifname in ["flpriv0", "flpriv1"] {
            assert!(run.pins.join(side).join(ifname).exists(), "{side}/{ifname} pinned");
        }
    }
    drop(run);

    for without in &caps {
        let fewer: Vec<String> = caps.iter().filter(|c| *c != without).cloned().collect();
        let (_run, started) = start(&ns, &fewer, &dir);
        assert!(started.is_err(), "the probe started without {without}: the chart need not give it");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
