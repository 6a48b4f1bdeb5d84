//! `flows kube-sync`'s export against a loopback API server: nothing is written before
//! Namespaces, Pods and NetworkPolicies are all listed; then the file is what the
//! node-probe's policy reader takes, and decides as the API defines; a new policy, a
//! deleted pod and a relabelled namespace each rewrite it; an expired watch relists.

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
async fn the_cluster_is_written_as_the_probe_reads_it_and_kept_current() {
    let api = ApiServer::start().await;
    api.put("namespaces", ns("web", json!({"kubernetes.io/metadata.name": "web", "team": "web"})));
    api.put("namespaces", ns("data", json!({"kubernetes.io/metadata.name": "data"})));
    api.put("pods", pod("web", "front", "10.244.1.10", json!({"app": "front"})));
    api.put("pods", pod("data", "db", "10.244.1.20", json!({"app": "db"})));
    let dir = temp("sync");
    let client = flows_k8s::watch::client_for(&api.url()).expect("client");
    let progress = flows_k8s::export::start(client, dir.clone(), Duration::from_millis(50));
    until("the first write", || progress.borrow().writes >= 1).await;
    assert_eq!(progress.borrow().synced_kinds, 3, "written only after all three kinds were listed");
    let m = read(&dir);
    assert_eq!(m.cluster.pods().len(), 2);
    assert_eq!(web_to_db(&m), Some(true), "no policy: allowed");

    // A policy: db admits web's namespace on the named port only.
    api.put("networkpolicies", deny_all_but_web("data"));
    until("the policy", || read(&dir).policies.len() == 1).await;
    assert_eq!(web_to_db(&read(&dir)), Some(true), "web is admitted on http (8080)");
    // The namespace loses its label: now denied.
    api.put("namespaces", ns("web", json!({"kubernetes.io/metadata.name": "web"})));
    until("the relabelled namespace", || web_to_db(&read(&dir)) == Some(false)).await;
    // A pod deleted: gone from the file.
    api.delete("pods", "web", "front");
    until("the deleted pod", || read(&dir).cluster.pod("web", "front").is_none()).await;
    // A watch that expires relists, and what was removed meanwhile goes too.
    api.remove_silently("pods", "data", "db");
    api.expire_watches();
    until("the relist", || read(&dir).cluster.pods().is_empty()).await;
    // The file is replaced before the count goes up: wait for the count of the last
    // write (four changes after the first write, each its own write).
    until("each change written", || progress.borrow().writes >= 5).await;
    let _ = std::fs::remove_dir_all(&dir);
}
