//! Time from a connection attempt in the lab to its first line in `flows observe --follow`
//! through the relay, median and p99 over 1,000 attempts; in the same run, the same
//! attempts followed directly from the source node's probe (no relay) as the baseline.
//! Needs root and the release binaries beside `flows`:
//! `cargo build --release --bins && cargo bench -p flows-cli --bench observe_latency`.

use std::{
    collections::HashMap,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use flows_lab::{drive::Report, state::State, testing::lab_lock};
use serde_json::Value;

const ATTEMPTS: u32 = 1_000;

fn flows_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_flows"))
}

fn flows(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(flows_bin())
        .args(args)
        .env("FLOWS_LAB_DIR", dir)
        .output()
        .expect("run flows")
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let out = flows(dir, args);
    assert!(out.status.success(), "flows {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

struct Cleanup(PathBuf, Vec<Child>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for c in &mut self.1 {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = flows(&self.0, &["lab", "down"]);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Source port → when its first line arrived.
type Seen = Arc<Mutex<HashMap<u64, SystemTime>>>;

fn follow(dir: &Path, server: Option<&str>, src_ip: String) -> (Child, Seen) {
    let mut cmd = Command::new(flows_bin());
    cmd.args(["observe", "--follow", "-o", "json", "--from-ip", &src_ip]);
    if let Some(s) = server {
        cmd.args(["--server", s]);
    }
    let mut child = cmd
        .env("FLOWS_LAB_DIR", dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("follow");
    let out = child.stdout.take().expect("stdout");
    let seen: Seen = Arc::default();
    let s = seen.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { return };
            let at = SystemTime::now();
            let Ok(v) = serde_json::from_str::<Value>(&line) else { continue };
            if let Some(p) = v["flow"]["l4"]["tcp"]["source_port"].as_u64() {
                s.lock().expect("seen").entry(p).or_insert(at);
            }
        }
    });
    (child, seen)
}

fn percentiles(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    (at(0.5), at(0.99))
}

fn main() {
    if !flows_lab::testing::is_root() {
        eprintln!("observe_latency needs root (the lab)");
        std::process::exit(1);
    }
    for b in ["flows-node-probe", "flows-relay"] {
        if !flows_bin().with_file_name(b).exists() {
            eprintln!("{b} is not beside {}: run `cargo build --release --bins` first", flows_bin().display());
            std::process::exit(1);
        }
    }
    let _lock = lab_lock().expect("lab lock");
    let dir = flows_lab::testing::temp_dir("flows-bench-latency").expect("dir");
    let mut cleanup = Cleanup(dir.clone(), Vec::new());
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    ok(&dir, &["lab", "up", &root.join("lab/examples/seed").display().to_string(), "--nodes", "2", "--probes", "--no-apiserver"]);
    let state = State::load(&dir).expect("state");
    let frontend = state.pod("frontend", "frontend").expect("frontend pod").clone();
    let node_index = state.nodes.iter().position(|n| n.name == frontend.node).expect("node");
    let probe = std::fs::read_to_string(dir.join(format!("probe-{}.addr", frontend.node))).expect("probe address");

    let (c1, via_relay) = follow(&dir, None, frontend.ipv4.to_string());
    let (c2, direct) = follow(&dir, Some(probe.trim()), frontend.ipv4.to_string());
    cleanup.1.extend([c1, c2]);
    let scenario = |n: u32| {
        let p = dir.join(format!("s{n}.yaml"));
        std::fs::write(
            &p,
            format!("connections:\n  - {{ name: c, from: frontend/frontend, to: {{ service: backend/backend }}, protocol: TCP, port: 80, family: ipv4, count: {n} }}\n"),
        )
        .expect("scenario");
        p
    };
    let drive = |p: &Path| -> Report {
        let out = flows(&dir, &["lab", "drive", &p.display().to_string(), "-o", "json"]);
        serde_json::from_slice(&out.stdout).expect("drive report")
    };
    // Both followers are live once they have seen one attempt.
    let warm = scenario(1);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = drive(&warm);
        let port = u64::from(r.attempts[0].src_port.expect("port"));
        std::thread::sleep(Duration::from_millis(800));
        if via_relay.lock().expect("seen").contains_key(&port) && direct.lock().expect("seen").contains_key(&port) {
            break;
        }
        assert!(Instant::now() < deadline, "the followers never saw an attempt");
    }
    let report = drive(&scenario(ATTEMPTS));
    std::thread::sleep(Duration::from_secs(3));
    let lat = |seen: &Seen| -> Vec<f64> {
        let seen = seen.lock().expect("seen");
        report
            .attempts
            .iter()
            .filter_map(|a| {
                let start = humantime::parse_rfc3339(&a.started_at).ok()?;
                let at = seen.get(&u64::from(a.src_port?))?;
                Some(at.duration_since(start).ok()?.as_secs_f64() * 1e3)
            })
            .collect()
    };
    let (r, d) = (lat(&via_relay), lat(&direct));
    let ((rm, r99), (dm, d99)) = (percentiles(r.clone()), percentiles(d.clone()));
    println!(
        "{ATTEMPTS} attempts (frontend on node-{}): seen via the relay {} | directly from the probe {}",
        node_index + 1,
        r.len(),
        d.len()
    );
    println!("attempt → line, directly from the probe (baseline): median {dm:.1} ms, p99 {d99:.1} ms");
    println!(
        "attempt → line, through the relay (300 ms sort window): median {rm:.1} ms, p99 {r99:.1} ms = {:.1}x / {:.1}x the baseline",
        rm / dm,
        r99 / d99
    );
}
