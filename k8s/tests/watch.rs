//! The kube-rs watchers against a loopback API server: the index follows additions,
//! changes, deletions, an address reused by a new pod, and a relist after the watches
//! expire; probe discovery follows the DaemonSet's pods.

mod fixture;

use std::{
    net::IpAddr,
    sync::{Arc, RwLock},
    time::Duration,
};

use fixture::ApiServer;
use flows_flow::enrich::{EndpointGetter, ServiceGetter};
use flows_k8s::{Cidr, ClusterIndex, discover, watch};
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
async fn index_follows_the_api_server() {
    let api = ApiServer::start().await;
    seed(&api);
    let client = watch::client_for(&api.url()).expect("client");
    let index = Arc::new(RwLock::new(ClusterIndex::new(vec![Cidr::parse("10.96.0.0/16").unwrap()])));
    let mut progress = watch::start(client, index.clone());
    tokio::time::timeout(Duration::from_secs(20), progress.wait_for(|p| p.synced()))
        .await
        .expect("initial lists in time")
        .expect("watchers running");

    {
        let idx = index.read().expect("index");
        let ep = idx.endpoint(ip("10.244.1.5")).expect("pod known");
        let w: Vec<String> = ep.workloads.iter().map(|w| format!("{}/{}", w.kind, w.name)).collect();
        assert_eq!(w, ["ReplicaSet/api-7c9d", "Deployment/api"]);
        assert_eq!(ep.node_name, "node-1");
        assert_eq!(idx.service(ip("10.96.0.10")).expect("service").name, "api");
        assert!(idx.endpoint(ip("1.1.1.1")).expect("world").is_world);
        assert_eq!(idx.endpoint(ip("192.168.5.1")).expect("node").node_name, "node-1");
        assert!(idx.namespace_labels("prod").is_some());
    }

    // A Job's pod: workload Job, then CronJob.
    api.put("pods", pod("prod", "backup-29000-xyz", "10.244.1.20", Some(("Job", "backup-29000")), json!({"job-name": "backup-29000"})));
    until("the job pod", || pod_at(&index, "10.244.1.20").is_some()).await;
    let w = index.read().unwrap().endpoint(ip("10.244.1.20")).unwrap().workloads;
    assert_eq!((w[0].kind.as_str(), w[1].kind.as_str(), w[1].name.as_str()), ("Job", "CronJob", "backup"));

    // Labels change: the index follows.
    api.put("pods", pod("prod", "api-7c9d-abcde", "10.244.1.5", Some(("ReplicaSet", "api-7c9d")), json!({"app": "api", "pod-template-hash": "7c9d", "tier": "gold"})));
    until("new labels", || {
        index.read().unwrap().endpoint(ip("10.244.1.5")).is_some_and(|e| e.labels.contains(&"tier=gold".to_string()))
    })
    .await;

    // The pod is deleted and its address reused by a pod of another namespace.
    api.delete("pods", "prod", "api-7c9d-abcde");
    until("the pod's removal", || pod_at(&index, "10.244.1.5").is_none()).await;
    api.put("pods", pod("staging", "web-1", "10.244.1.5", None, json!({"app": "web"})));
    until("the reused address", || pod_at(&index, "10.244.1.5").as_deref() == Some("staging/web-1")).await;

    // The service goes; its address is no longer named.
    api.delete("services", "prod", "api");
    until("the service's removal", || index.read().unwrap().service(ip("10.96.0.10")).is_none()).await;

    // Watches expire while a pod disappears unseen: the relist removes it.
    let before = *api.watches.lock().unwrap();
    api.remove_silently("pods", "staging", "web-1");
    api.expire_watches();
    until("the relist", || pod_at(&index, "10.244.1.5").is_none()).await;
    assert!(*api.watches.lock().unwrap() > before, "the watchers watched again");
    // And they keep following after it.
    api.put("pods", pod("prod", "late", "10.244.1.30", None, json!({"app": "late"})));
    until("a pod after the relist", || pod_at(&index, "10.244.1.30").is_some()).await;
    until("every kind's relist", || progress.borrow().expired == 6).await;
    assert_eq!(progress.borrow().errors, 0, "an expired watch is no error");
}

#[tokio::test]
async fn discovery_follows_the_probe_pods() {
    let api = ApiServer::start().await;
    let probe = |name: &str, node: &str, ip: &str, phase: &str| {
        json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "flows", "labels": {"app.kubernetes.io/name": "flows-node-probe"}},
            "spec": {"nodeName": node, "containers": [{"name": "probe"}]},
            "status": {"phase": phase, "podIP": ip}})
    };
    api.put("pods", probe("p-a", "node-a", "10.0.0.1", "Running"));
    api.put("pods", probe("p-b", "node-b", "fd00::2", "Pending"));
    // Another pod in the namespace, not a probe.
    api.put("pods", json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "relay", "namespace": "flows", "labels": {"app.kubernetes.io/name": "flows-relay"}},
        "spec": {"nodeName": "node-a", "containers": [{"name": "r"}]}, "status": {"phase": "Running", "podIP": "10.0.0.9"}}));
    let client = watch::client_for(&api.url()).expect("client");
    let mut peers = discover::probes(client, "flows", "app.kubernetes.io/name=flows-node-probe", 4245);
    let want_a = || discover::PeerMap::from([("node-a".to_string(), "10.0.0.1:4245".to_string())]);
    tokio::time::timeout(Duration::from_secs(20), peers.wait_for(|p| *p == want_a()))
        .await
        .expect("first probe")
        .expect("discovery running");
    api.put("pods", probe("p-b", "node-b", "fd00::2", "Running"));
    let mut want_ab = want_a();
    want_ab.insert("node-b".into(), "[fd00::2]:4245".into());
    tokio::time::timeout(Duration::from_secs(20), peers.wait_for(|p| *p == want_ab))
        .await
        .expect("second probe running")
        .expect("discovery running");
    api.delete("pods", "flows", "p-a");
    tokio::time::timeout(Duration::from_secs(20), peers.wait_for(|p| !p.contains_key("node-a") && p.len() == 1))
        .await
        .expect("first probe gone")
        .expect("discovery running");
}
