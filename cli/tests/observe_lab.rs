//! `flows observe` through the relay in a two-node lab with the seed policies enforced,
//! as a user runs it: exactly the denied attempts, both endpoints named; `flows audit`
//! from the relay's store groups the same attempts; a new attempt
//! shown promptly by `--follow`; a node-probe killed and restarted while the client
//! follows, with neither the relay nor the client restarted.

mod common;

use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant, SystemTime},
};

use common::{drive, flows, ok, root, settle};
use flows_lab::{
    drive::{Outcome, Report},
    state::State,
    testing::{lab_lock, skip_unless_root},
};
use serde_json::Value;

/// Takes the lab down (and stops a follower) even when the test fails.
struct Cleanup {
    dir: PathBuf,
    follower: Option<Child>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(mut c) = self.follower.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = flows(&self.dir, &["lab", "down", "--state-dir", &self.dir.display().to_string()]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn write_scenario(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("scenario");
    p
}

/// (source address, source port, protocol) of a flow, as the driver reports attempts.
fn key_of(f: &Value) -> Option<(String, u64, &'static str)> {
    let src = f["ip"]["source"].as_str()?.to_string();
    let l4 = &f["l4"];
    if let Some(t) = l4.get("tcp") {
        return Some((src, t["source_port"].as_u64().unwrap_or(0), "TCP"));
    }
    if let Some(u) = l4.get("udp") {
        return Some((src, u["source_port"].as_u64().unwrap_or(0), "UDP"));
    }
    None
}

fn lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

fn probe_pid(dir: &Path, node: &str) -> u32 {
    let state = State::load(dir).expect("state");
    state
        .daemons
        .iter()
        .find(|d| d.role == "node-probe" && d.node.as_deref() == Some(node))
        .map(|d| d.pid)
        .expect("probe daemon")
}

struct Follower {
    rx: mpsc::Receiver<(Instant, Value)>,
}

impl Follower {
    /// The next line matching `want`, within `limit`.
    fn wait(&self, limit: Duration, what: &str, mut want: impl FnMut(&Value) -> bool) -> (Instant, Value) {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok((at, v)) if want(&v) => return (at, v),
                Ok(_) => {}
                Err(_) => panic!("no line for {what} within {limit:?}"),
            }
        }
    }
}

fn attempt_from<'a>(r: &'a Report, name: &str) -> &'a flows_lab::drive::AttemptReport {
    r.attempts.iter().find(|a| a.connection == name).expect("attempt")
}

#[test]
fn denied_attempts_through_the_relay_and_a_probe_lost_and_back() {
    if skip_unless_root("denied_attempts_through_the_relay_and_a_probe_lost_and_back") {
        return;
    }
    let _lock = lab_lock().expect("lab lock");
    let dir = flows_lab::testing::temp_dir("flows-observe-lab").expect("dir");
    let d = dir.display().to_string();
    let mut cleanup = Cleanup { dir: dir.clone(), follower: None };
    let seed = root().join("lab/examples/seed").display().to_string();
    ok(&dir, &["lab", "up", &seed, "--nodes", "2", "--probes", "--state-dir", &d]);
    let policies = root().join("lab/examples/seed-policies").display().to_string();
    ok(&dir, &["lab", "policy", "apply", &policies, "--state-dir", &d]);

    // Enforcement is in place once a denied attempt fails.
    let probe = write_scenario(
        &dir,
        "probe.yaml",
        "connections:\n  - { name: p, from: frontend/frontend, to: { service: db/db }, protocol: TCP, port: 80, timeout_ms: 300 }\n",
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while drive(&dir, &probe).attempts[0].outcome != Outcome::Failure {
        assert!(Instant::now() < deadline, "the seed policies were never enforced");
        std::thread::sleep(Duration::from_millis(200));
    }
    let since = humantime::format_rfc3339_nanos(SystemTime::now()).to_string();

    // 1. Exactly the denied attempts, each with both endpoints named.
    let report = drive(&dir, &root().join("lab/scenarios/seed-traffic-policies.yaml"));
    assert!(report.expectations_met, "the seed traffic met its expectations");
    let failed: BTreeSet<(String, u64, &str)> = report
        .attempts
        .iter()
        .filter(|a| a.outcome == Outcome::Failure)
        .filter_map(|a| {
            let proto = match a.protocol {
                flows_lab::drive::Protocol::Tcp => "TCP",
                flows_lab::drive::Protocol::Udp => "UDP",
                _ => return None,
            };
            Some((a.src_ip?.to_string(), u64::from(a.src_port?), proto))
        })
        .collect();
    assert!(failed.len() >= 10, "the scenario has denied attempts: {failed:?}");
    let until = settle(&dir);
    let out = ok(&dir, &["observe", "--since", &since, "--until", &until, "--verdict", "drop", "-o", "json"]);
    let dropped = lines(&out);
    let mut seen = BTreeSet::new();
    for line in &dropped {
        let f = &line["flow"];
        assert_eq!(f["verdict"], "VERDICT_DROPPED", "{line}");
        let k = key_of(f).unwrap_or_else(|| panic!("no TCP/UDP tuple: {line}"));
        assert!(failed.contains(&k), "a dropped flow no failed attempt explains: {line}");
        seen.insert(k);
        // The world target has no pod; every pod side is fully named.
        for side in ["source", "destination"] {
            let e = &f[side];
            if e["is_world"] == true {
                assert_eq!(f["ip"]["destination"], "203.0.113.10", "{line}");
                continue;
            }
            for field in ["namespace", "pod_name", "node_name"] {
                assert!(e[field].as_str().is_some_and(|s| !s.is_empty()), "{side}.{field} missing: {line}");
            }
            assert!(e["labels"].as_array().is_some_and(|l| !l.is_empty()), "{side}.labels missing: {line}");
            if e["namespace"] == "backend" && e["pod_name"].as_str().is_some_and(|p| p.starts_with("api-")) {
                let w: Vec<&str> = e["workloads"].as_array().expect("workloads").iter().filter_map(|w| w["name"].as_str()).collect();
                assert!(w.contains(&"api"), "the api pods belong to Deployment api: {line}");
            }
        }
    }
    assert_eq!(seen, failed, "every denied attempt shows, and nothing else");
    // The workload filter is applied by the relay, after annotation.
    let out = ok(&dir, &["observe", "--since", &since, "--until", &until, "--verdict", "drop", "--to-workload", "api", "-o", "json"]);
    let to_api = lines(&out);
    assert!(!to_api.is_empty(), "frontend's denied attempts at the api Deployment");
    assert!(to_api.iter().all(|l| l["flow"]["destination"]["workloads"].as_array().is_some_and(|w| w.iter().any(|w| w["name"] == "api"))));

    // The audit from the relay's store: the same denied attempts, grouped by workload
    // pair and port, counted.
    let mut want: std::collections::BTreeMap<(String, u64, String), u64> = Default::default();
    for a in report.attempts.iter().filter(|a| a.outcome == Outcome::Failure) {
        let ns = a.from.split('/').next().unwrap_or_default().to_string();
        *want.entry((ns, u64::from(a.dst_port), a.protocol.to_string())).or_default() += 1;
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = ok(&dir, &["audit", "--since", &since, "--until", &until, "-o", "json"]);
        let groups = lines(&out);
        let num = |v: &Value| v.as_u64().or_else(|| v.as_str().and_then(|s| s.parse().ok())).unwrap_or(0);
        let mut got: std::collections::BTreeMap<(String, u64, String), u64> = Default::default();
        for g in &groups {
            let key = (
                g["source_namespace"].as_str().unwrap_or_default().to_string(),
                num(&g["destination_port"]),
                g["protocol"].as_str().unwrap_or_default().to_string(),
            );
            *got.entry(key).or_default() += num(&g["flows"]);
            assert!(g["policies"].as_array().is_some_and(|p| !p.is_empty()), "denied by named policies: {g}");
        }
        if got == want {
            break;
        }
        assert!(Instant::now() < deadline, "audit {got:?}, driver {want:?}");
        std::thread::sleep(Duration::from_millis(500));
    }

    // 2. --follow shows a new attempt promptly.
    let mut child = Command::new(env!("CARGO_BIN_EXE_flows"))
        .args(["observe", "--follow", "-o", "json"])
        .env("FLOWS_LAB_DIR", &dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("follow");
    let stdout = child.stdout.take().expect("stdout");
    cleanup.follower = Some(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                if tx.send((Instant::now(), v)).is_err() {
                    return;
                }
            }
        }
    });
    let follower = Follower { rx };
    let state = State::load(&dir).expect("state");
    let node_of = |ns: &str, pod: &str| state.pod(ns, pod).expect("pod").node.clone();
    let one = |name: &str, from: &str| {
        write_scenario(
            &dir,
            &format!("{name}.yaml"),
            &format!("connections:\n  - {{ name: {name}, from: {from}, to: {{ service: backend/backend }}, protocol: TCP, port: 80 }}\n"),
        )
    };
    let from_frontend = one("frontend-once", "frontend/frontend");
    // The stream is open once one attempt comes through.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = drive(&dir, &from_frontend);
        let a = attempt_from(&r, "frontend-once");
        let port = u64::from(a.src_port.expect("port"));
        let got = follower.rx.recv_timeout(Duration::from_secs(2));
        if let Ok((_, v)) = got {
            if v["flow"]["l4"]["tcp"]["source_port"].as_u64() == Some(port) {
                break;
            }
            // Drain whatever else came, then check the port among it.
            let mut found = false;
            while let Ok((_, v)) = follower.rx.recv_timeout(Duration::from_millis(500)) {
                found |= v["flow"]["l4"]["tcp"]["source_port"].as_u64() == Some(port);
            }
            if found {
                break;
            }
        }
        assert!(Instant::now() < deadline, "the follow stream never showed an attempt");
    }
    let started = Instant::now();
    let r = drive(&dir, &from_frontend);
    let port = u64::from(attempt_from(&r, "frontend-once").src_port.expect("port"));
    let (at, _) = follower.wait(Duration::from_secs(10), "a new attempt", |v| {
        v["flow"]["l4"]["tcp"]["source_port"].as_u64() == Some(port)
    });
    eprintln!("attempt to line: {:?} (including the driver's own run)", at - started);

    // 3. One probe killed: the client hears it, and the other node's flows keep coming.
    let frontend_node = node_of("frontend", "frontend");
    let lost = if frontend_node == "node-1" { "node-2" } else { "node-1" };
    let pid = probe_pid(&dir, lost);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL).expect("kill probe");
    follower.wait(Duration::from_secs(10), "node unavailable", |v| {
        v["node_status"]["state_change"] == "NODE_STATE_UNAVAILABLE"
            && v["node_status"]["node_names"].as_array().is_some_and(|n| n.iter().any(|x| x == lost))
    });
    let r = drive(&dir, &from_frontend);
    let port = u64::from(attempt_from(&r, "frontend-once").src_port.expect("port"));
    follower.wait(Duration::from_secs(10), "the other node's flow", |v| {
        v["flow"]["node_name"] == frontend_node.as_str() && v["flow"]["l4"]["tcp"]["source_port"].as_u64() == Some(port)
    });

    // 4. Restarted: the relay reconnects by itself, and the client hears it.
    ok(&dir, &["lab", "probe", "start", lost, "--state-dir", &d]);
    follower.wait(Duration::from_secs(20), "node back", |v| {
        v["node_status"]["state_change"] == "NODE_STATE_CONNECTED"
            && v["node_status"]["node_names"].as_array().is_some_and(|n| n.iter().any(|x| x == lost))
    });
    // A pod on the restarted node: its flows arrive through the same client stream.
    let on_lost = state
        .pods
        .iter()
        .find(|p| p.node == lost && (p.namespace == "backend" || p.namespace == "frontend"))
        .map(|p| format!("{}/{}", p.namespace, p.name))
        .expect("a pod on the restarted node");
    let from_lost = one("lost-once", &on_lost);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = drive(&dir, &from_lost);
        let port = u64::from(attempt_from(&r, "lost-once").src_port.expect("port"));
        let mut found = false;
        while let Ok((_, v)) = follower.rx.recv_timeout(Duration::from_millis(1500)) {
            if v["flow"]["node_name"] == lost && v["flow"]["l4"]["tcp"]["source_port"].as_u64() == Some(port) {
                found = true;
                break;
            }
        }
        if found {
            break;
        }
        assert!(Instant::now() < deadline, "no flow from the restarted node's probe");
    }
}
