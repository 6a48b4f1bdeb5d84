//! `flows tui` driven in tmux against a two-node lab with the seed policies enforced:
//! keys sent, the pane captured. The denied pairs show, the filter prompt applies
//! `observe`'s flags, a denied flow's detail names both ends and the deciding policies,
//! and `q` leaves a restored terminal.

mod common;

use std::{
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use common::{drive, flows, ok, root};
use flows_lab::{
    drive::Outcome,
    testing::{lab_lock, skip_unless_root},
};

fn tmux(args: &[&str]) -> String {
    let out = Command::new("tmux").args(args).output().expect("tmux (scripts/setup.sh installs it)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

struct Cleanup {
    dir: PathBuf,
    session: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = Command::new("tmux").args(["kill-session", "-t", &self.session]).output();
        let _ = flows(&self.dir, &["lab", "down", "--state-dir", &self.dir.display().to_string()]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The pane's text once `want` holds, within `limit`.
fn wait_pane(session: &str, limit: Duration, what: &str, want: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let pane = tmux(&["capture-pane", "-p", "-t", session]);
        if want(&pane) {
            return pane;
        }
        assert!(Instant::now() < deadline, "{what}; the pane:\n{pane}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn dashboard_in_tmux_shows_denials_filters_and_details() {
    if skip_unless_root("dashboard_in_tmux_shows_denials_filters_and_details") {
        return;
    }
    let _lock = lab_lock().expect("lab lock");
    let dir = flows_lab::testing::temp_dir("flows-tui-lab").expect("dir");
    let d = dir.display().to_string();
    let session = format!("flows-tui-{}", std::process::id());
    let _cleanup = Cleanup { dir: dir.clone(), session: session.clone() };
    let seed = root().join("lab/examples/seed").display().to_string();
    ok(&dir, &["lab", "up", &seed, "--nodes", "2", "--probes", "--state-dir", &d]);
    ok(&dir, &["lab", "policy", "apply", &root().join("lab/examples/seed-policies").display().to_string(), "--state-dir", &d]);
    let probe = dir.join("probe.yaml");
    std::fs::write(&probe, "connections:\n  - { name: p, from: frontend/frontend, to: { service: db/db }, protocol: TCP, port: 80, timeout_ms: 300 }\n").expect("probe");
    let deadline = Instant::now() + Duration::from_secs(20);
    while drive(&dir, &probe).attempts[0].outcome != Outcome::Failure {
        assert!(Instant::now() < deadline, "the seed policies were never enforced");
        std::thread::sleep(Duration::from_millis(200));
    }
    let report = drive(&dir, &root().join("lab/scenarios/seed-traffic-policies.yaml"));
    assert!(report.expectations_met);

    // The dashboard in a 200x60 terminal (in the test's directory); what it leaves behind is printed after it.
    let cmd = format!(
        "FLOWS_LAB_DIR={d} RUST_BACKTRACE=0 {} tui --last 2000; echo TUI-EXITED-$?; sleep 60",
        env!("CARGO_BIN_EXE_flows")
    );
    tmux(&["new-session", "-d", "-s", &session, "-x", "200", "-y", "60", "-c", &d, &cmd]);

    // Denied pairs: the frontend's attempts at the db (4: two each over IPv4 and IPv6).
    let pane = wait_pane(&session, Duration::from_secs(20), "denied pairs shown", |p| {
        p.contains("top denied pairs") && p.contains("frontend/frontend → db/db:80/TCP") && p.contains("nodes 2 up")
    });
    assert!(pane.contains("connected"), "{pane}");
    // The 4 of the scenario and the one that showed enforcement in place.
    let line = pane.lines().find(|l| l.contains("frontend/frontend → db/db:80/TCP")).expect("pair line");
    let count: u64 = line
        .split("→ db/db:80/TCP")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count: {line}"));
    assert_eq!(count, 5, "{line}");

    // The filter prompt: only drops towards the db namespace.
    tmux(&["send-keys", "-t", &session, "/"]);
    tmux(&["send-keys", "-t", &session, "-l", "--", "--verdict drop --to-namespace db"]);
    wait_pane(&session, Duration::from_secs(5), "prompt echoed", |p| p.contains("filter> --verdict drop --to-namespace db"));
    tmux(&["send-keys", "-t", &session, "Enter"]);
    let pane = wait_pane(&session, Duration::from_secs(5), "filter applied", |p| p.contains("filter: --verdict drop --to-namespace db"));
    let table: Vec<&str> = pane.lines().filter(|l| l.contains("DROPPED") && l.contains("POLICY_DENIED")).collect();
    assert!(!table.is_empty(), "{pane}");
    for l in &table {
        assert!(l.contains("db/db"), "only flows to the db namespace: {l}");
    }
    // A bad filter: the error in place, the previous filter kept.
    tmux(&["send-keys", "-t", &session, "/"]);
    tmux(&["send-keys", "-t", &session, "-l", "--", " --port"]);
    tmux(&["send-keys", "-t", &session, "Enter"]);
    let pane = wait_pane(&session, Duration::from_secs(5), "filter error shown", |p| {
        p.lines().any(|l| l.starts_with("filter> ") && l.contains("--port") && l.contains("value is required"))
    });
    assert!(pane.contains("filter: --verdict drop --to-namespace db"), "{pane}");
    tmux(&["send-keys", "-t", &session, "Escape"]);
    // A key right after Escape reads as Alt+key: wait until the prompt has closed.
    wait_pane(&session, Duration::from_secs(5), "filter prompt closed", |p| !p.lines().any(|l| l.starts_with("filter> ")));

    // Details of the newest denied flow: both ends and the policies that decided.
    tmux(&["send-keys", "-t", &session, "Space"]);
    tmux(&["send-keys", "-t", &session, "Enter"]);
    let pane = wait_pane(&session, Duration::from_secs(5), "detail shown", |p| p.contains("flow (esc: back)"));
    assert!(pane.contains("namespace  db"), "{pane}");
    assert!(pane.contains("pod        db"), "{pane}");
    assert!(pane.contains("labels     run=db"), "{pane}");
    // The scheduler places the pods: across nodes, the source's node stops the attempt
    // and names frontend's egress policies; on one node, db's are named too.
    let at_destination = pane.contains("ingress denied by") && (pane.contains("db/db") || pane.contains("db/deny"));
    let at_source = pane.contains("egress denied by") && pane.contains("frontend/deny");
    assert!(at_destination || at_source, "the deciding policies are named: {pane}");
    // The policy that would allow it, written out.
    assert!(pane.contains("to allow it, flows policy suggest would add"), "{pane}");
    tmux(&["send-keys", "-t", &session, "w"]);
    let pane = wait_pane(&session, Duration::from_secs(5), "suggestion written", |p| p.contains("written to flows-allow-"));
    let written = std::fs::read_dir(&dir)
        .expect("dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("flows-allow-")))
        .unwrap_or_else(|| panic!("no file written: {pane}"));
    let yaml = std::fs::read_to_string(&written).expect("read");
    // For the side whose policies denied it.
    let ns = if at_destination { "namespace: db" } else { "namespace: frontend" };
    assert!(yaml.contains("kind: NetworkPolicy") && yaml.contains(ns), "{ns}: {yaml}");
    let check = flows(&dir, &["policy", "eval", "--manifests", &written.display().to_string(), "--flows", "/dev/null"]);
    assert!(check.status.success(), "the written policy is valid: {}", String::from_utf8_lossy(&check.stderr));
    tmux(&["send-keys", "-t", &session, "Escape"]);

    // q quits; the shell line after it shows a clean exit on a restored screen.
    tmux(&["send-keys", "-t", &session, "q"]);
    let pane = wait_pane(&session, Duration::from_secs(10), "the TUI exits", |p| p.contains("TUI-EXITED-0"));
    assert!(!pane.contains("top denied pairs"), "the alternate screen is gone: {pane}");
}
