//! What the lab tests share: running `flows` against a lab's state directory, and
//! driving a scenario. (Each test file is its own crate; not all use every helper.)
#![allow(dead_code)]

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use flows_lab::drive::Report;

/// The repository root (the lab's seed scenario is under lab/examples/).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs `flows` with the lab's state in `dir`.
pub fn flows(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flows"))
        .args(args)
        .env("FLOWS_LAB_DIR", dir)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run flows")
}

/// Runs `flows`, which must succeed; its standard output.
pub fn ok(dir: &Path, args: &[&str]) -> String {
    let out = flows(dir, args);
    assert!(
        out.status.success(),
        "flows {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `flows lab drive SCENARIO -o json`: the report. Failed expectations make drive exit
/// non-zero; the report says what happened, so the exit status is not checked here.
pub fn drive(dir: &Path, scenario: &Path) -> Report {
    let d = dir.display().to_string();
    let out = flows(dir, &["lab", "drive", &scenario.display().to_string(), "-o", "json", "--state-dir", &d]);
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("drive report: {e}\n{}", String::from_utf8_lossy(&out.stderr)))
}

/// A scenario of `n` allowed TCP attempts, frontend to backend:80.
pub fn scenario(dir: &Path, name: &str, n: usize) -> PathBuf {
    let p = dir.join(format!("{name}.yaml"));
    std::fs::write(
        &p,
        format!(
            "connections:\n  - {{ name: {name}, from: frontend/frontend, to: {{ service: backend/backend }}, protocol: TCP, port: 80, count: {n}, expect: success }}\n"
        ),
    )
    .expect("scenario");
    p
}

/// Now, as `--since`/`--until` take it.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_nanos(std::time::SystemTime::now()).to_string()
}

/// Waits until every node's probe has reported a marker sent after this call, and
/// returns a time before the markers (an `--until` that leaves them out).
///
/// A node's records reach its ring in the order its kernel emitted them, so once a
/// marker sent from a pod on each node is readable, so is everything those nodes emitted
/// before it: a test can then assert what is absent. The marker is one UDP datagram to
/// the world on a port nothing else uses; it is reported where it leaves its pod, even
/// when policy drops it.
pub fn settle(dir: &Path) -> String {
    use std::collections::BTreeMap;
    use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
    let state = flows_lab::state::State::load(dir).expect("lab state");
    let mut senders: BTreeMap<&str, &flows_lab::state::PodRec> = BTreeMap::new();
    for p in &state.pods {
        senders.entry(p.node.as_str()).or_insert(p);
    }
    let until = now_rfc3339();
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    let port = 20_000 + nanos % 10_000;
    let mut yaml = String::from("connections:\n");
    for (node, p) in &senders {
        yaml.push_str(&format!(
            "  - {{ name: marker-{node}, from: {}/{}, to: {{ ip: world }}, protocol: UDP, port: {port}, timeout_ms: 50 }}\n",
            p.namespace, p.name
        ));
    }
    let file = dir.join(format!("marker-{port}.yaml"));
    std::fs::write(&file, yaml).expect("marker scenario");
    drive(dir, &file);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = ok(dir, &["observe", "--since", &until, "--to-port", &port.to_string(), "-o", "json"]);
        let nodes: std::collections::BTreeSet<String> = out
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| v["flow"]["node_name"].as_str().map(str::to_string))
            .collect();
        if senders.keys().all(|n| nodes.contains(*n)) {
            return until;
        }
        assert!(Instant::now() < deadline, "markers on port {port} reached only {nodes:?} of {:?}", senders.keys());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A lab test's state directory and the processes it started itself: on drop (also when
/// the test fails) the processes are killed, the lab taken down and the directory removed.
pub struct Cleanup(pub PathBuf, pub Vec<std::process::Child>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for c in &mut self.1 {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = flows(&self.0, &["lab", "down", "--state-dir", &self.0.display().to_string()]);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
