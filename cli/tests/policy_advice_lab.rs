//! Policy advice end to end in a two-node lab, as a user runs it: the seed traffic with
//! no policies (everything allowed and stored); `flows policy suggest`; the suggestion
//! enforced; the same traffic again, none of it dropped by policy; an intruder in the
//! frontend namespace whose every lateral move is dropped and shows in
//! `flows observe --verdict drop` with the policies that decided; and `flows policy
//! check` of the seed guide's policies against the first window.

mod common;

use std::{
    collections::BTreeSet,
    path::PathBuf,
    time::{Duration, Instant, SystemTime},
};

use common::{drive, flows, ok, root, settle};
use flows_lab::{
    drive::{Outcome, Protocol, Report},
    testing::{lab_lock, skip_unless_root},
};
use serde_json::Value;

struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = flows(&self.0, &["lab", "down", "--state-dir", &self.0.display().to_string()]);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

fn now() -> String {
    humantime::format_rfc3339_nanos(SystemTime::now()).to_string()
}

/// (source address, source port, protocol) as the driver reports an attempt.
fn attempt_key(a: &flows_lab::drive::AttemptReport) -> Option<(String, u64, &'static str)> {
    let proto = match a.protocol {
        Protocol::Tcp => "TCP",
        Protocol::Udp => "UDP",
        _ => return None,
    };
    Some((a.src_ip?.to_string(), u64::from(a.src_port?), proto))
}

fn flow_key(f: &Value) -> Option<(String, u64, &'static str)> {
    let src = f["ip"]["source"].as_str()?.to_string();
    if let Some(t) = f["l4"].get("tcp") {
        return Some((src, t["source_port"].as_u64().unwrap_or(0), "TCP"));
    }
    if let Some(u) = f["l4"].get("udp") {
        return Some((src, u["source_port"].as_u64().unwrap_or(0), "UDP"));
    }
    None
}

fn policies(f: &Value, field: &str) -> Vec<String> {
    f[field]
        .as_array()
        .map(|a| a.iter().map(|p| format!("{}/{}", p["namespace"].as_str().unwrap_or(""), p["name"].as_str().unwrap_or(""))).collect())
        .unwrap_or_default()
}

fn outcomes(r: &Report) -> Vec<(String, u32, u32)> {
    r.connections.iter().map(|c| (c.name.clone(), c.succeeded, c.failed)).collect()
}

#[test]
fn suggested_policies_keep_the_traffic_and_stop_the_intruder() {
    if skip_unless_root("suggested_policies_keep_the_traffic_and_stop_the_intruder") {
        return;
    }
    let _lock = lab_lock().expect("lab lock");
    let dir = flows_lab::testing::temp_dir("flows-advice-lab").expect("dir");
    let d = dir.display().to_string();
    let _cleanup = Cleanup(dir.clone());
    let seed = root().join("lab/examples/seed").display().to_string();
    let intruder = root().join("lab/examples/intruder").display().to_string();
    ok(&dir, &["lab", "up", &seed, &intruder, "--nodes", "2", "--probes", "--apiserver", "--state-dir", &d]);
    let admin = flows_lab::State::load(&dir).expect("state").api.expect("a control plane").kubeconfig;

    // 1. The seed traffic with no policies: everything the scenario expects succeeds.
    let start = now();
    let first = drive(&dir, &root().join("lab/scenarios/seed-traffic.yaml"));
    assert!(first.expectations_met, "seed traffic without policies");
    let end = now();

    // 2. Suggest from that window once the relay has stored all of it.
    let deadline = Instant::now() + Duration::from_secs(30);
    let proof = loop {
        let out = flows(&dir, &["policy", "suggest", "--since", &start, "--until", &end, "-o", "json", "--explain"]);
        if out.status.success() {
            let v: Value = serde_json::from_slice(&out.stdout).expect("suggestion JSON");
            if v["proof"]["flows"].as_u64() == Some(u64::from(first.attempted)) {
                break v;
            }
        }
        assert!(Instant::now() < deadline, "the window's attempts never all reached the store: {}", String::from_utf8_lossy(&out.stderr));
        std::thread::sleep(Duration::from_millis(500));
    };
    // Every attempt was allowed, and the proof keeps each one allowed, except those
    // the destination refused (nothing listens on db's 5432): no reason to open a port.
    let refused: u64 = first.connections.iter().filter(|c| c.name == "frontend-to-db-undeclared-port").map(|c| u64::from(c.attempted)).sum();
    assert!(refused > 0);
    assert_eq!(proof["proof"]["still_allowed"].as_u64(), Some(u64::from(first.attempted) - refused), "{proof}");
    assert_eq!(proof["proof"]["refused"].as_u64(), Some(refused), "{proof}");
    assert_eq!(proof["refused"][0]["port"], 5432, "{proof}");
    assert_eq!(proof["proof"]["newly_denied"], serde_json::json!([]));
    let items = proof["policies"]["items"].as_array().expect("items");
    let names: Vec<String> = items
        .iter()
        .map(|p| format!("{}/{}", p["metadata"]["namespace"].as_str().unwrap(), p["metadata"]["name"].as_str().unwrap()))
        .collect();
    assert_eq!(
        names,
        ["backend/default-deny", "backend/allow-api", "backend/allow-backend", "db/default-deny", "db/allow-db", "frontend/default-deny", "frontend/allow-frontend"]
    );
    // The intruder took no part: nothing selects it but the default deny.
    let text = serde_json::to_string(items).unwrap();
    assert!(!text.contains("intruder"), "{text}");
    assert!(!text.contains("5432"), "a refused port is not opened: {text}");
    // DNS egress names the DNS pods by their own labels.
    assert!(text.contains(r#""k8s-app":"kube-dns""#), "{text}");

    let file = dir.join("suggested.yaml");
    let yaml = ok(&dir, &["policy", "suggest", "--since", &start, "--until", &end, "--explain"]);
    assert!(yaml.contains("# egress rule 1:"), "{yaml}");
    assert!(yaml.contains("--include-refused") && yaml.contains("db/db 5432/TCP"), "the refusals left out are said: {yaml}");
    std::fs::write(&file, &yaml).expect("write suggestion");
    // Same input, same output.
    assert_eq!(ok(&dir, &["policy", "suggest", "--since", &start, "--until", &end, "--explain"]), yaml);

    // 3. Enforce the suggestion (the lab's default mode) and wait until it holds: applied
    // with kubectl to the real API server, which validates and admits it.
    let applied = std::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&admin)
        .args(["apply", "-f"])
        .arg(&file)
        .output()
        .expect("kubectl (scripts/setup.sh installs it)");
    assert!(applied.status.success(), "the API server refused the suggestion: {}", String::from_utf8_lossy(&applied.stderr));
    let probe = dir.join("probe.yaml");
    std::fs::write(
        &probe,
        "connections:\n  - { name: p, from: frontend/intruder, to: { pod: frontend/frontend }, protocol: TCP, port: 80, timeout_ms: 300 }\n",
    )
    .expect("probe scenario");
    let deadline = Instant::now() + Duration::from_secs(20);
    while drive(&dir, &probe).attempts[0].outcome != Outcome::Failure {
        assert!(Instant::now() < deadline, "the suggestion was never enforced");
        std::thread::sleep(Duration::from_millis(200));
    }

    // 4. The same traffic again: the same outcomes, and nothing dropped by policy.
    let since = now();
    let second = drive(&dir, &root().join("lab/scenarios/seed-traffic.yaml"));
    assert!(second.expectations_met);
    assert_eq!(outcomes(&second), outcomes(&first), "the suggestion changes no outcome");
    let until = settle(&dir);
    let drops = lines(&ok(&dir, &["observe", "--since", &since, "--until", &until, "--verdict", "drop", "-o", "json"]));
    for l in &drops {
        let f = &l["flow"];
        // Only the port nothing listens on, which the suggestion now closes.
        assert_eq!(f["l4"]["tcp"]["destination_port"], 5432, "an attempt the suggestion denies: {l}");
    }

    // 5. The intruder's lateral moves: every one fails, and each shows as dropped by
    // policy with the policies that decided.
    let since = now();
    let moves = drive(&dir, &root().join("lab/scenarios/intruder.yaml"));
    assert!(moves.expectations_met);
    assert_eq!(moves.succeeded, 0);
    let failed: BTreeSet<(String, u64, &str)> = moves.attempts.iter().filter_map(attempt_key).collect();
    assert_eq!(failed.len(), moves.attempts.len());
    let until = settle(&dir);
    let drops = lines(&ok(&dir, &["observe", "--since", &since, "--until", &until, "--verdict", "drop", "-o", "json"]));
    let mut seen = BTreeSet::new();
    for l in &drops {
        let f = &l["flow"];
        assert_eq!(f["drop_reason"], "POLICY_DENIED", "{l}");
        assert_eq!(f["source"]["pod_name"], "intruder", "{l}");
        let k = flow_key(f).unwrap_or_else(|| panic!("no tuple: {l}"));
        assert!(failed.contains(&k), "a drop no attempt explains: {l}");
        seen.insert(k);
        // The intruder is isolated by its namespace's default deny; where the attempt
        // reached the target's node, the target's isolating policies are named too.
        assert!(policies(f, "egress_denied_by").contains(&"frontend/default-deny".to_string()), "{l}");
        let ingress = policies(f, "ingress_denied_by");
        if let Some(ns) = f["destination"]["namespace"].as_str().filter(|_| !ingress.is_empty()) {
            assert!(ingress.contains(&format!("{ns}/default-deny")), "{l}");
        }
    }
    assert_eq!(seen, failed, "every lateral move shows as dropped");

    // 6. What-if: the suggestion over itself changes nothing; the seed guide's own
    // policies, replacing it, would break part of the first window's traffic.
    let out = ok(&dir, &["policy", "check", &file.display().to_string(), "--since", &start, "--until", &end]);
    assert!(out.starts_with("no attempt in the window changes verdict"), "{out}");
    let guide = root().join("lab/examples/seed-policies").display().to_string();
    let out = flows(&dir, &["policy", "check", &guide, "--replace", "--since", &start, "--until", &end, "-o", "json"]);
    assert_eq!(out.status.code(), Some(1), "allowed traffic would be denied: {}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).expect("check JSON");
    let denied = v["newly_denied"].as_array().expect("newly_denied");
    let find = |src: &str, dst: &str, port: u64| {
        denied.iter().find(|g| {
            format!("{}/{}", g["src_namespace"].as_str().unwrap(), g["src_workload"].as_str().unwrap()) == src
                && g["dst_workload"].as_str().is_some_and(|w| dst.ends_with(w))
                && g["port"].as_u64() == Some(port)
        })
    };
    let fe_db = find("frontend/frontend", "db/db", 80).unwrap_or_else(|| panic!("frontend -> db:80 newly denied: {v}"));
    assert_eq!(fe_db["flows"].as_u64(), Some(6));
    assert!(fe_db["policies"].as_array().unwrap().iter().any(|p| p == "frontend/frontend"), "{fe_db}");
    assert!(find("backend/backend", "world:203.0.113.10", 80).is_some(), "{v}");
    assert_eq!(v["newly_allowed"], serde_json::json!([]));
}
