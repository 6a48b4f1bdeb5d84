//! `flows kube-sync`'s export against a hand-written loopback API server, for the fault a
//! real API server cannot be made to show on demand: a pod removed without its watch
//! saying so, which the relist after the watches expire must take out of the file. The
//! rest (nothing written before every kind is listed, policies, relabelled namespaces,
//! deletions) is tested against a real kube-apiserver in `lab/tests/api_realities.rs`.

mod fixture;

use std::{path::PathBuf, time::Duration};

use fixture::ApiServer;
use flows_policy::{Endpoint, Manifests, Protocol};
use serde_json::{Value, json};

fn pod(ns: &str, name: &str, ip: &str, labels: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}"), "labels": labels,
                     "annotations": {"secret-ish": "not exported"}},
        "spec": {"nodeName": "node-1", "containers": [{"name": "c", "image": "x",
                 "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
    })
}

fn ns(name: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

fn deny_all_but_web(namespace: &str) -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "db-from-web", "namespace": namespace},
        "spec": {"podSelector": {"matchLabels": {"app": "db"}},
                 "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "web"}}}],
                              "ports": [{"port": "http"}]}]}})
}

fn temp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("flows-export-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn read(dir: &std::path::Path) -> Manifests {
    let text = std::fs::read_to_string(dir.join(flows_k8s::export::FILE)).expect("cluster.yaml");
    assert!(!text.contains("not exported"), "pod annotations are not copied");
    Manifests::parse([("cluster.yaml", text.as_str())]).expect("the probe reads what was written")
}

/// Whether web/front may reach db/db on TCP 8080, as the probe would decide it.
fn web_to_db(m: &Manifests) -> Option<bool> {
    let src = m.cluster.pod("web", "front")?;
    let dst = m.cluster.pod("data", "db")?;
    let d = m.engine().evaluate(
        &m.cluster,
        &Endpoint::Pod(src, Some("10.244.1.10".parse().ok()?)),
        &Endpoint::Pod(dst, Some("10.244.1.20".parse().ok()?)),
        Protocol::Tcp,
        8080,
    );
    Some(d.allowed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_removed_unseen_leaves_the_file_at_the_relist() {
    let api = ApiServer::start().await;
    api.put("namespaces", ns("web", json!({"kubernetes.io/metadata.name": "web", "team": "web"})));
    api.put("namespaces", ns("data", json!({"kubernetes.io/metadata.name": "data"})));
    api.put("pods", pod("web", "front", "10.244.1.10", json!({"app": "front"})));
    api.put("pods", pod("data", "db", "10.244.1.20", json!({"app": "db"})));
    api.put("networkpolicies", deny_all_but_web("data"));
    let dir = temp("sync");
    let client = flows_k8s::watch::client_for(&api.url()).expect("client");
    let progress = flows_k8s::export::start(client, dir.clone(), Duration::from_millis(50));
    until("the first write", || progress.borrow().writes >= 1).await;
    assert_eq!(web_to_db(&read(&dir)), Some(true), "web is admitted on http (8080)");
    api.remove_silently("pods", "data", "db");
    api.expire_watches();
    until("the relist", || read(&dir).cluster.pod("data", "db").is_none()).await;
    assert_eq!(read(&dir).cluster.pods().len(), 1);
    let _ = std::fs::remove_dir_all(&dir);
}
