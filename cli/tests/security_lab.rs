//! A two-node lab with mutual TLS everywhere (`flows lab up --tls`): `flows` reads the
//! cluster's flows through the relay, which reads the probes, all over mutual TLS;
//! plaintext, clients without a certificate and certificates from another CA are
//! refused by both the relay and the probes; no key appears in any log. Then the relay
//! is stopped and started again while `flows observe -f` follows: the follower
//! reconnects by itself and prints the attempts made while the relay was down and
//! after, each once.

mod common;

use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use common::{drive, flows, ok, root, scenario};
use flows_lab::{
    drive::{Outcome, Report},
    testing::{lab_lock, skip_unless_root},
};
use serde_json::Value;

fn refused(dir: &Path, args: &[&str]) -> String {
    let out = flows(dir, args);
    assert!(
        !out.status.success(),
        "flows {args:?} was served:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

struct Cleanup {
    dir: PathBuf,
    other: PathBuf,
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
        let _ = std::fs::remove_dir_all(&self.other);
    }
}

/// Source ports of a drive's attempts (each attempt has its own).
fn ports(r: &Report) -> BTreeSet<u64> {
    assert!(r.attempts.iter().all(|a| a.outcome == Outcome::Success), "{:?}", r.attempts);
    r.attempts.iter().filter_map(|a| a.src_port.map(u64::from)).collect()
}

fn src_port(v: &Value) -> Option<u64> {
    v["flow"]["l4"]["tcp"]["source_port"].as_u64()
}

/// One record per attempt: the SYN leaving frontend for backend's service.
fn is_syn_from_frontend(v: &Value) -> bool {
    let f = &v["flow"];
    f["source"]["pod_name"] == "frontend"
        && f["is_reply"] != true
        && f["observation_point"] == "OBSERVATION_POINT_FROM_ENDPOINT"
        && f["destination_service"]["namespace"] == "backend"
}

#[test]
fn mutual_tls_everywhere_and_a_relay_restart_followed_through() {
    if skip_unless_root("mutual_tls_everywhere_and_a_relay_restart_followed_through") {
        return;
    }
    let _lock = lab_lock().expect("lab lock");
    let dir = flows_lab::testing::temp_dir("flows-security-lab").expect("dir");
    let other = flows_lab::testing::temp_dir("flows-other-ca").expect("dir");
    let d = dir.display().to_string();
    let mut cleanup = Cleanup { dir: dir.clone(), other: other.clone(), follower: None };
    let seed = root().join("lab/examples/seed").display().to_string();
    ok(&dir, &["lab", "up", &seed, "--nodes", "2", "--probes", "--tls", "--state-dir", &d]);
    let tls = dir.join("tls");
    let relay = std::fs::read_to_string(dir.join("relay.addr")).expect("relay address");
    let probe = std::fs::read_to_string(dir.join("probe-node-1.addr")).expect("probe address");

    // 1. Through the relay over mutual TLS (the lab's certificates, found by `flows`):
    //    the relay read both probes over mutual TLS and named both ends.
    let first = ports(&drive(&dir, &scenario(&dir, "warmup", 2)));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = ok(&dir, &["observe", "--all", "-o", "json", "--print-node-name"]);
        let got: BTreeSet<u64> = out
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| is_syn_from_frontend(v))
            .filter_map(|v| src_port(&v))
            .collect();
        if first.is_subset(&got) {
            break;
        }
        assert!(Instant::now() < deadline, "attempts {first:?} not read through TLS: {got:?}\n{out}");
        std::thread::sleep(Duration::from_millis(300));
    }

    // 2. Refused: plaintext, TLS without a client certificate, a client certificate
    //    from another CA; at the relay and at a probe.
    let ca = tls.join("ca.crt").display().to_string();
    let (cert, key) = (tls.join("client.crt").display().to_string(), tls.join("client.key").display().to_string());
    ok(&other, &["certs", "create", "--out", &other.display().to_string()]);
    let (their_cert, their_key) =
        (other.join("client.crt").display().to_string(), other.join("client.key").display().to_string());
    for (addr, name) in [(&relay, "relay.flows.local"), (&probe, "node-probe.flows.local")] {
        refused(&dir, &["observe", "--server", addr, "--all"]);
        refused(&dir, &["observe", "--server", addr, "--all", "--tls-ca", &ca, "--tls-server-name", name]);
        refused(
            &dir,
            &["observe", "--server", addr, "--all", "--tls-ca", &ca, "--tls-server-name", name,
              "--tls-client-cert", &their_cert, "--tls-client-key", &their_key],
        );
        // The name the certificate does not carry: the client refuses, and says why.
        let e = refused(
            &dir,
            &["observe", "--server", addr, "--all", "--tls-ca", &ca, "--tls-client-cert", &cert, "--tls-client-key", &key],
        );
        assert!(e.contains("not valid for name"), "{e}");
        // With all of it: served.
        ok(
            &dir,
            &["observe", "--server", addr, "--all", "--tls-ca", &ca, "--tls-server-name", name,
              "--tls-client-cert", &cert, "--tls-client-key", &key],
        );
    }

    // 3. The relay stopped and started again under a follower.
    let mut child = Command::new(env!("CARGO_BIN_EXE_flows"))
        .args(["observe", "--follow", "-o", "json"])
        .env("FLOWS_LAB_DIR", &dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("follower");
    let stdout = child.stdout.take().expect("stdout");
    let stderr = child.stderr.take().expect("stderr");
    cleanup.follower = Some(child);
    let (tx, rx) = mpsc::channel::<Value>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                if tx.send(v).is_err() {
                    return;
                }
            }
        }
    });
    let (etx, erx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = etx.send(line);
        }
    });
    // Counts each attempt's SYN record among `want` until all are seen (false when they
    // are not within `wait`); every SYN seen is kept, to find duplicates (a resume that
    // replays what was printed).
    let receive = |want: &BTreeSet<u64>, wait: Duration, seen: &mut Vec<u64>| -> bool {
        let deadline = Instant::now() + wait;
        let mut got = BTreeSet::new();
        while !want.is_subset(&got) {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(v) = rx.recv_timeout(left) else { return false };
            if is_syn_from_frontend(&v) {
                if let Some(p) = src_port(&v) {
                    if want.contains(&p) {
                        got.insert(p);
                    }
                    seen.push(p);
                }
            }
        }
        true
    };
    let collect = |want: &BTreeSet<u64>, what: &str, seen: &mut Vec<u64>| {
        assert!(receive(want, Duration::from_secs(30), seen), "{what}: not all of {want:?} seen within 30 s");
    };
    let mut seen = Vec::new();
    // The follower is reading once it prints an attempt made after it started.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !receive(&ports(&drive(&dir, &scenario(&dir, "ready", 1))), Duration::from_secs(2), &mut seen) {
        assert!(Instant::now() < deadline, "the follower printed nothing within 30 s");
    }
    let before = ports(&drive(&dir, &scenario(&dir, "before", 3)));
    collect(&before, "before the restart", &mut seen);

    ok(&dir, &["lab", "relay", "stop", "--state-dir", &d]);
    let during = ports(&drive(&dir, &scenario(&dir, "during", 3)));
    ok(&dir, &["lab", "relay", "start", "--state-dir", &d]);
    collect(&during, "made while the relay was down", &mut seen);
    let after = ports(&drive(&dir, &scenario(&dir, "after", 3)));
    collect(&after, "after the restart", &mut seen);
    // Each attempt once: the resume does not print again what was printed.
    let mut uniq = seen.clone();
    uniq.sort();
    uniq.dedup();
    assert_eq!(uniq.len(), seen.len(), "records printed twice: {seen:?}");
    let notes: Vec<String> = erx.try_iter().collect();
    assert!(notes.iter().any(|l| l.contains("reconnecting")), "the follower said nothing of the outage: {notes:?}");
    if let Some(c) = cleanup.follower.as_mut() {
        assert!(c.try_wait().expect("follower").is_none(), "the follower exited");
    }

    // 4. No key material in any log of the lab.
    let mut logs = 0;
    for e in std::fs::read_dir(&dir).expect("state dir").flatten() {
        if e.path().extension().is_some_and(|x| x == "log") {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            assert!(!text.contains("PRIVATE KEY"), "{} holds a key", e.path().display());
            logs += 1;
        }
    }
    assert!(logs >= 3, "the probes' and relay's logs were read");
}

/// Local addresses of the TCP sockets process `pid` listens on (its network namespace's
/// tables, matched by socket inode).
fn listening(pid: u32) -> BTreeSet<String> {
    let mut inodes = BTreeSet::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd")).expect("fds").flatten() {
        if let Ok(t) = std::fs::read_link(e.path()) {
            let t = t.display().to_string();
            if let Some(i) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
                inodes.insert(i.to_string());
            }
        }
    }
    let mut out = BTreeSet::new();
    for (file, v6) in [("tcp", false), ("tcp6", true)] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{file}")).unwrap_or_default();
        for l in text.lines().skip(1) {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 10 || f[3] != "0A" || !inodes.contains(f[9]) {
                continue;
            }
            let (addr, port) = f[1].split_once(':').expect("address");
            let port = u16::from_str_radix(port, 16).expect("port");
            let ip = if v6 {
                let b: Vec<u8> = (0..16).map(|i| u8::from_str_radix(&addr[2 * i..2 * i + 2], 16).expect("hex")).collect();
                // /proc prints each 32-bit word in host order.
                let mut o = [0u8; 16];
                for w in 0..4 {
                    for k in 0..4 {
                        o[w * 4 + k] = b[w * 4 + 3 - k];
                    }
                }
                std::net::IpAddr::from(o)
            } else {
                let n = u32::from_str_radix(addr, 16).expect("hex");
                std::net::IpAddr::from(n.to_le_bytes())
            };
            out.insert(std::net::SocketAddr::new(ip, port).to_string());
        }
    }
    out
}

#[test]
fn servers_listen_only_where_told_and_keep_secrets_out_of_logs() {
    if skip_unless_root("servers_listen_only_where_told_and_keep_secrets_out_of_logs") {
        return;
    }
    let _lock = lab_lock().expect("lab lock");
    let dir = flows_lab::testing::temp_dir("flows-listen-lab").expect("dir");
    let d = dir.display().to_string();
    let mut cleanup = Cleanup { dir: dir.clone(), other: dir.join("none"), follower: None };
    let seed = root().join("lab/examples/seed").display().to_string();
    ok(&dir, &["lab", "up", &seed, "--nodes", "2", "--probes", "--state-dir", &d]);
    let state = flows_lab::state::State::load(&dir).expect("state");
    for dmn in &state.daemons {
        let want: BTreeSet<String> = match dmn.role.as_str() {
            "node-probe" => {
                let node = dmn.node.clone().expect("node");
                [std::fs::read_to_string(dir.join(format!("probe-{node}.addr"))).expect("addr")].into()
            }
            "relay" => [std::fs::read_to_string(dir.join("relay.addr")).expect("addr")].into(),
            _ => continue,
        };
        assert_eq!(listening(dmn.pid), want, "{} {:?} listens on more than it was told", dmn.role, dmn.node);
    }
    // The relay with metrics: exactly the two addresses given.
    let grpc = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("port");
    let metrics = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("port");
    let ready = dir.join("extra-relay.addr");
    let secret = "s3cret-Pa55word-never-logged";
    let mut relay = Command::new(Path::new(env!("CARGO_BIN_EXE_flows")).with_file_name("flows-relay"))
        .args(["--peer", "node-1=127.0.0.1:1", "--listen", &grpc.to_string(), "--metrics-listen", &metrics.to_string()])
        .arg("--ready-file")
        .arg(&ready)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("relay");
    let deadline = Instant::now() + Duration::from_secs(20);
    let want: BTreeSet<String> = [grpc.to_string(), metrics.to_string()].into();
    // Ready is written once the gRPC server listens; the metrics server binds on its own.
    let mut got = BTreeSet::new();
    while !ready.exists() || !want.is_subset(&got) {
        assert!(Instant::now() < deadline, "relay not listening on {want:?}: {got:?}");
        std::thread::sleep(Duration::from_millis(50));
        got = listening(relay.id());
    }
    let _ = relay.kill();
    let _ = relay.wait();
    assert_eq!(got, want, "relay sockets");

    // A store password goes to the server only: not to the log, whatever fails.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("port");
    // (The relay keeps serving live flows and tries the store again: its log is read
    // until it has named the store twice, then it is stopped.)
    let log_path = dir.join("dead-store-relay.log");
    let mut relay = Command::new(Path::new(env!("CARGO_BIN_EXE_flows")).with_file_name("flows-relay"))
        .args(["--peer", "node-1=127.0.0.1:1", "--listen", "127.0.0.1:0"])
        .args(["--store", &format!("http://{dead}")])
        .arg("--store-set-aside-dir")
        .arg(dir.join("set-aside"))
        .env("FLOWS_STORE_USER", "flows")
        .env("FLOWS_STORE_PASSWORD", secret)
        .env("RUST_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).expect("log"))
        .spawn()
        .expect("relay");
    let deadline = Instant::now() + Duration::from_secs(30);
    let log = loop {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        if log.matches(&dead.to_string()).count() >= 2 {
            break log;
        }
        assert!(relay.try_wait().ok().flatten().is_none(), "the relay ended: {log}");
        assert!(Instant::now() < deadline, "the relay did not name the store it cannot reach: {log}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = relay.kill();
    let _ = relay.wait();
    assert!(log.contains("unreachable"), "the error says what is wrong: {log}");
    assert!(!log.contains(secret), "the password is in the relay's output:\n{log}");
    let help = Command::new(Path::new(env!("CARGO_BIN_EXE_flows")).with_file_name("flows-relay"))
        .arg("--help")
        .env("FLOWS_STORE_PASSWORD", secret)
        .output()
        .expect("help");
    assert!(!String::from_utf8_lossy(&help.stdout).contains(secret), "--help shows the password");
    cleanup.follower = None;
}
