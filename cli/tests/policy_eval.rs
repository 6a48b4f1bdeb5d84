//! `flows policy eval` as a user runs it: the seed cluster and the seed guide's policies,
//! attempts on standard input, one JSON answer per line, bad lines named.

use std::{
    io::Write,
    path::Path,
    process::{Command, Stdio},
};

const DNS_POD: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: coredns
  namespace: kube-system
  labels: { k8s-app: kube-dns }
spec:
  containers:
    - name: coredns
      image: coredns
      ports: [ { name: dns, containerPort: 53, protocol: UDP } ]
"#;

#[test]
fn answers_every_line_and_names_bad_ones() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = std::env::temp_dir().join(format!("flows-eval-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp");
    std::fs::write(dir.join("dns.yaml"), DNS_POD).expect("write");
    let input = [
        r#"{"src": "frontend/frontend", "dst": "backend/backend", "protocol": "TCP", "port": 80}"#,
        r#"{"src": "frontend/frontend", "dst": "db/db", "protocol": "TCP", "port": 80}"#,
        r#"{"src": "frontend/frontend", "dst": "#,
        r#"{"src": "nope/nothing", "dst": "db/db", "port": 80}"#,
        "",
        r#"{"src": "frontend/frontend", "dst": "kube-system/coredns", "protocol": "UDP", "port": 53}"#,
        r#"{"src": "backend/backend", "dst": "203.0.113.10", "port": 443}"#,
        r#"{"src": "203.0.113.10", "dst": "db/db", "protocol": "SCTP", "port": 80}"#,
        r#"{"src": "frontend/frontend", "dst": "backend/backend", "protocol": "L4-UNKNOWN", "port": 0}"#,
        r#"{"src": "frontend/frontend", "dst": "db/db", "protocol": "GRE", "port": 0}"#,
    ]
    .join("\n");
    let mut child = Command::new(env!("CARGO_BIN_EXE_flows"))
        .args(["policy", "eval", "--flows", "-", "--manifests"])
        .arg(root.join("lab/examples/seed"))
        .arg(root.join("lab/examples/seed-policies"))
        .arg(dir.join("dns.yaml"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run flows");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("wait");
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(out.status.code(), Some(1), "bad lines make the exit status 1");
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .expect("utf8")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(lines.len(), 9, "{lines:#?}");

    assert_eq!(lines[0]["verdict"], "allow");
    assert_eq!(
        lines[0]["policies"],
        serde_json::json!(["backend/backend", "frontend/frontend"])
    );
    assert_eq!(lines[1]["verdict"], "deny");
    let deciding = lines[1]["policies"].as_array().expect("array");
    assert!(deciding.contains(&"db/db".into()) && deciding.contains(&"frontend/deny".into()));
    assert_eq!(lines[2]["line"], 3);
    assert!(lines[2]["error"].as_str().expect("error").starts_with("line 3:"));
    assert!(lines[3]["error"].as_str().expect("error").contains("nope/nothing"));
    assert_eq!(lines[4]["line"], 6);
    assert_eq!(lines[4]["verdict"], "allow");
    assert_eq!(lines[4]["policies"], serde_json::json!(["frontend/all-pods-egress-allow-dns"]));
    assert_eq!(lines[5]["verdict"], "deny", "backend egress is isolated");
    assert_eq!(lines[6]["verdict"], "deny", "db only admits backend");
    assert_eq!(lines[6]["protocol"], "SCTP");
    // Ports unreadable (or a protocol without them): the seed guide's rules have no
    // ports, so they decide it as they decide TCP.
    assert_eq!(lines[7]["verdict"], "allow", "{:?}", lines[7]);
    assert_eq!(lines[7]["protocol"], "L4-UNKNOWN");
    assert!(lines[8]["error"].as_str().expect("error").contains("L4-UNKNOWN"), "{:?}", lines[8]);
}
