//! The kube-rs watchers against a hand-written loopback API server, for the one fault a
//! real API server cannot be made to show on demand: a deletion its watch never
//! delivered (a watch that broke before sending it), which the relist after the watches
//! expire must remove. Everything else — real controllers' owners, label changes, an
//! address reused, a restart with 410 and relist, pagination, bookmarks, probe
//! discovery — is tested against a real kube-apiserver in `lab/tests/api_realities.rs`.

mod fixture;

use std::{
    net::IpAddr,
    sync::{Arc, RwLock},
    time::Duration,
};

use fixture::ApiServer;
use flows_flow::enrich::{EndpointGetter, ServiceGetter};
use flows_k8s::{Cidr, ClusterIndex, watch};
use serde_json::{Value, json};

fn pod(ns: &str, name: &str, ip: &str, owner: Option<(&str, &str)>, labels: Value) -> Value {
    let mut p = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}"),
                     "creationTimestamp": "2026-11-01T00:00:00Z", "labels": labels},
        "spec": {"nodeName": "node-1", "containers": [{"name": "c"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
    });
    if let Some((kind, oname)) = owner {
        p["metadata"]["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": kind, "name": oname, "uid": "o", "controller": true}]);
    }
    p
}

fn seed(api: &ApiServer) {
    api.put("nodes", json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1"},
        "spec": {"podCIDR": "10.244.1.0/24"},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.168.5.1"}]}}));
    api.put("namespaces", json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "prod", "labels": {"kubernetes.io/metadata.name": "prod"}}}));
    api.put("replicasets", json!({"apiVersion": "apps/v1", "kind": "ReplicaSet",
        "metadata": {"name": "api-7c9d", "namespace": "prod",
                     "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": "api", "uid": "d", "controller": true}]},
        "spec": {"selector": {"matchLabels": {"app": "api"}}}}));
    api.put("jobs", json!({"apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": "backup-29000", "namespace": "prod",
                     "ownerReferences": [{"apiVersion": "batch/v1", "kind": "CronJob", "name": "backup", "uid": "c", "controller": true}]},
        "spec": {"template": {"spec": {"containers": [{"name": "c"}]}}}}));
    api.put("pods", pod("prod", "api-7c9d-abcde", "10.244.1.5", Some(("ReplicaSet", "api-7c9d")), json!({"app": "api", "pod-template-hash": "7c9d"})));
    api.put("services", json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "api", "namespace": "prod"},
        "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"]}}));
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

fn pod_at(index: &Arc<RwLock<ClusterIndex>>, addr: &str) -> Option<String> {
    let e = index.read().expect("index").endpoint(ip(addr))?;
    (!e.pod_name.is_empty()).then(|| format!("{}/{}", e.namespace, e.pod_name))
}

#[tokio::test]
async fn a_deletion_the_watch_never_delivered_goes_at_the_relist() {
    let api = ApiServer::start().await;
    seed(&api);
    let client = watch::client_for(&api.url()).expect("client");
    let index = Arc::new(RwLock::new(ClusterIndex::new(vec![Cidr::parse("10.96.0.0/16").unwrap()])));
    let mut progress = watch::start(client, index.clone());
    tokio::time::timeout(Duration::from_secs(20), progress.wait_for(|p| p.synced()))
        .await
        .expect("initial lists in time")
        .expect("watchers running");
    assert_eq!(pod_at(&index, "10.244.1.5").as_deref(), Some("prod/api-7c9d-abcde"));
    assert_eq!(index.read().unwrap().service(ip("10.96.0.10")).expect("service").name, "api");

    // The pod disappears unseen, then the watches expire: the relist removes it.
    let before = *api.watches.lock().unwrap();
    api.remove_silently("pods", "prod", "api-7c9d-abcde");
    api.expire_watches();
    until("the relist", || pod_at(&index, "10.244.1.5").is_none()).await;
    assert!(*api.watches.lock().unwrap() > before, "the watchers watched again");
    assert!(index.read().unwrap().endpoint(ip("10.244.1.5")).is_none(), "a cluster address without a pod names nothing");
    // And they keep following after it.
    api.put("pods", pod("prod", "late", "10.244.1.30", None, json!({"app": "late"})));
    until("a pod after the relist", || pod_at(&index, "10.244.1.30").is_some()).await;
    until("every kind's relist", || progress.borrow().expired == 6).await;
    assert_eq!(progress.borrow().errors, 0, "an expired watch is no error");
}
