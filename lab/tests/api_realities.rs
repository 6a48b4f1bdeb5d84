//! The relay's Kubernetes index against a real API server (v1.36, from
//! `scripts/setup.sh`), with the relay's own service account: objects made by the real
//! controllers (a Deployment's ReplicaSet and pods, a CronJob's Job), labels changed, a
//! pod replaced by one at the same address, an API server restarted (its watches
//! expire with 410 and are listed again), and a cluster of 2,000 pods listed in pages,
//! watched with bookmarks — each shown by the API server's own audit log.
//!
//! These need no root (everything listens on loopback). What the real server cannot be
//! made to do on demand (a watch answered 500 in the middle, a list truncated) stays
//! with the hand-written server of `k8s/tests/watch.rs`.

use std::{
    net::IpAddr,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use flows_flow::enrich::{EndpointGetter, ServiceGetter};
use flows_k8s::{
    Cidr, ClusterIndex,
    cluster::{self, Applier, NodeRecord},
    watch,
};
use flows_lab::{components::Component, testing::ControlPlane};
use serde_json::{Value, json};

fn ip(s: &str) -> IpAddr {
    s.parse().expect("address")
}

fn pod_at(index: &Arc<RwLock<ClusterIndex>>, addr: &str) -> Option<String> {
    let e = index.read().expect("index").endpoint(ip(addr))?;
    (!e.pod_name.is_empty()).then(|| format!("{}/{}", e.namespace, e.pod_name))
}

async fn until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    start.elapsed()
}

/// The pods of `namespace` whose name starts with `prefix`, once there are `n` (made by
/// a controller, placed by the scheduler).
async fn made(client: &flows_k8s::Client, namespace: &str, prefix: &str, n: usize) -> Vec<cluster::PodRecord> {
    let start = Instant::now();
    loop {
        let pods: Vec<_> = cluster::pods(client)
            .await
            .expect("pods")
            .into_iter()
            .filter(|p| p.namespace == namespace && p.name.starts_with(prefix) && !p.deleting && !p.node.is_empty())
            .collect();
        if pods.len() == n {
            return pods;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "{namespace}/{prefix}*: {} of {n} pods made and placed", pods.len());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn namespace(applier: &Applier, name: &str, labels: Value) {
    applier.apply(&json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})).await.expect("namespace");
    // Made here rather than waited for from the controller manager.
    applier
        .apply(&json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default", "namespace": name}}))
        .await
        .expect("service account");
}

/// The lab's control-plane calls run their own small runtime: off the test's.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

fn binaries() {
    let missing = flows_lab::control_plane::missing(&flows_lab::control_plane::bin_dir());
    assert!(missing.is_empty(), "the control plane's binaries are missing: {missing:?} (scripts/setup.sh unpacks them)");
}

/// The index of a relay with its own service account, and its progress.
async fn relay_index(cp: &ControlPlane) -> (Arc<RwLock<ClusterIndex>>, tokio::sync::watch::Receiver<watch::Progress>) {
    let client = cluster::connect(&blocking(|| cp.kubeconfig_of(Component::Relay)).expect("relay token")).await.expect("relay client");
    let index = Arc::new(RwLock::new(ClusterIndex::listed_by(vec![Cidr::parse("10.96.0.0/16").unwrap()], &watch::KINDS)));
    let mut progress = watch::start(client, index.clone());
    tokio::time::timeout(Duration::from_secs(30), progress.wait_for(|p| p.synced()))
        .await
        .expect("every kind listed in time")
        .expect("watchers running");
    (index, progress)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_index_follows_a_real_api_server() {
    binaries();
    let mut cp = blocking(|| ControlPlane::start("flows-api-index")).expect("control plane");
    let admin = cluster::connect(&cp.api.kubeconfig).await.expect("admin");
    let applier = Applier::new(admin.clone());
    let node = NodeRecord { name: "node-1".into(), pod_cidrs: vec!["10.244.1.0/24".into()], addresses: vec!["192.168.5.1".into()] };
    cluster::register_node(&applier, &node).await.expect("node");
    namespace(&applier, "prod", json!({"team": "a"})).await;
    namespace(&applier, "staging", json!({})).await;
    let container = json!([{"name": "c", "image": "flows-lab/none"}]);
    applier
        .apply(&json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "api", "namespace": "prod"},
            "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "api"}},
                     "template": {"metadata": {"labels": {"app": "api"}}, "spec": {"containers": container}}}}))
        .await
        .expect("deployment");
    applier
        .apply(&json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "api", "namespace": "prod"},
            "spec": {"selector": {"app": "api"}, "clusterIP": "10.96.0.10", "ports": [{"port": 80}]}}))
        .await
        .expect("service");
    let first = made(&admin, "prod", "api-", 1).await.remove(0);
    cluster::pod_running(&admin, "prod", &first.name, &["10.244.1.5".into()], "192.168.5.1").await.expect("status");

    let (index, progress) = relay_index(&cp).await;
    {
        let idx = index.read().expect("index");
        let ep = idx.endpoint(ip("10.244.1.5")).expect("the pod is known");
        let w: Vec<String> = ep.workloads.iter().map(|w| w.kind.clone()).collect();
        assert_eq!(w, ["ReplicaSet", "Deployment"], "made by the real controllers: {ep:?}");
        assert_eq!(ep.workloads[1].name, "api");
        assert_eq!(ep.node_name, "node-1");
        assert_eq!(idx.service(ip("10.96.0.10")).expect("service").name, "api");
        assert!(idx.endpoint(ip("1.1.1.1")).expect("world").is_world);
        assert_eq!(idx.endpoint(ip("192.168.5.1")).expect("node").node_name, "node-1");
        assert_eq!(idx.namespace_labels("prod").and_then(|l| l.get("team")).map(String::as_str), Some("a"));
    }

    // A CronJob's Job's pod: workloads Job, then CronJob.
    applier
        .apply(&json!({"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "backup", "namespace": "prod"},
            "spec": {"schedule": "0 0 1 1 *", "suspend": true,
                     "jobTemplate": {"spec": {"template": {"spec": {"restartPolicy": "Never", "containers": container}}}}}}))
        .await
        .expect("cronjob");
    let cron_uid = cluster::uid(&admin, "batch/v1", "CronJob", "prod", "backup").await.expect("cronjob uid");
    applier
        .apply(&json!({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "backup-29000", "namespace": "prod",
                "ownerReferences": [{"apiVersion": "batch/v1", "kind": "CronJob", "name": "backup", "uid": cron_uid, "controller": true}]},
            "spec": {"template": {"spec": {"restartPolicy": "Never", "containers": container}}}}))
        .await
        .expect("job");
    let job_pod = made(&admin, "prod", "backup-29000-", 1).await.remove(0);
    cluster::pod_running(&admin, "prod", &job_pod.name, &["10.244.1.20".into()], "192.168.5.1").await.expect("status");
    until("the job's pod", Duration::from_secs(10), || pod_at(&index, "10.244.1.20").is_some()).await;
    let w = index.read().unwrap().endpoint(ip("10.244.1.20")).unwrap().workloads;
    assert_eq!((w[0].kind.as_str(), w[1].kind.as_str(), w[1].name.as_str()), ("Job", "CronJob", "backup"));

    // Labels change: the index follows.
    let relabel = Applier::with_manager(admin.clone(), "test-relabel");
    relabel
        .apply(&json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": first.name, "namespace": "prod", "labels": {"tier": "gold"}}}))
        .await
        .expect("relabel");
    let took = until("new labels", Duration::from_secs(10), || {
        index.read().unwrap().endpoint(ip("10.244.1.5")).is_some_and(|e| e.labels.contains(&"tier=gold".to_string()))
    })
    .await;
    eprintln!("FIGURE pod relabelled in the API to the relay's index: {took:?}");

    // The pod is deleted; its ReplicaSet makes another, which gets the same address.
    cluster::finish_deletion(&admin, "prod", &first.name).await.expect("delete");
    let second = made(&admin, "prod", "api-", 1).await.remove(0);
    assert_ne!(second.name, first.name);
    cluster::pod_running(&admin, "prod", &second.name, &["10.244.1.5".into()], "192.168.5.1").await.expect("status");
    let want = format!("prod/{}", second.name);
    until("the address names the new pod", Duration::from_secs(10), || pod_at(&index, "10.244.1.5").as_deref() == Some(want.as_str())).await;

    // The service goes: its address is no longer named.
    applier.delete(&json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "api", "namespace": "prod"}})).await.expect("delete service");
    until("the service's removal", Duration::from_secs(10), || index.read().unwrap().service(ip("10.96.0.10")).is_none()).await;

    // The API server restarts, after a write the watches have not seen: resuming from
    // their last version, they are told it expired (410) and list again.
    let before = *progress.borrow();
    applier
        .apply(&json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "bump", "namespace": "prod"}, "data": {"a": "b"}}))
        .await
        .expect("configmap");
    blocking(|| cp.stop_apiserver());
    blocking(|| cp.start_apiserver()).expect("API server back");
    let ready = Instant::now();
    let admin = cluster::connect(&cp.api.kubeconfig).await.expect("admin");
    // A change right after the restart: the index must come to it.
    cluster::finish_deletion(&admin, "prod", &second.name).await.expect("delete");
    let third = made(&admin, "prod", "api-", 1).await.remove(0);
    cluster::pod_running(&admin, "prod", &third.name, &["10.244.1.5".into()], "192.168.5.1").await.expect("status");
    let want = format!("prod/{}", third.name);
    until("the index heals after the restart", Duration::from_secs(60), || {
        pod_at(&index, "10.244.1.5").as_deref() == Some(want.as_str()) && progress.borrow().expired > before.expired
    })
    .await;
    let after = *progress.borrow();
    eprintln!(
        "FIGURE API server restarted: the index listed again and named the pod made after the restart {:?} after the server was ready ({} watches expired)",
        ready.elapsed(),
        after.expired - before.expired
    );
    assert!(after.errors > before.errors, "the watches broke while it was down: {before:?} -> {after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_pods_are_listed_in_pages_and_watched_with_bookmarks() {
    binaries();
    let cp = blocking(|| ControlPlane::start("flows-api-pages")).expect("control plane");
    let admin = cluster::connect(&cp.api.kubeconfig).await.expect("admin");
    let applier = Applier::new(admin.clone());
    let node = NodeRecord { name: "node-1".into(), pod_cidrs: vec!["10.244.0.0/16".into()], addresses: vec!["192.168.5.1".into()] };
    cluster::register_node(&applier, &node).await.expect("node");
    namespace(&applier, "many", json!({})).await;
    const N: usize = 2_000;
    let start = Instant::now();
    let made = cluster::create_pods(&admin, "many", "p", "node-1", N, 8).await.expect("pods");
    assert_eq!(made, N);
    eprintln!("FIGURE {N} pods created through the API (8 at a time): {:?}", start.elapsed());

    let start = Instant::now();
    let (index, _progress) = relay_index(&cp).await;
    eprintln!("FIGURE relay index of {N} pods listed: {:?}", start.elapsed());
    assert_eq!(index.read().unwrap().sizes().pods, N);

    // The audit log: the relay's lists of pods came in pages, and its watches asked for
    // bookmarks.
    let relay = Component::Relay.user();
    let pods_requests = |audit: &[Value]| -> Vec<String> {
        audit
            .iter()
            .filter(|e| e["user"]["username"] == relay.as_str() && e["objectRef"]["resource"] == "pods")
            .filter_map(|e| e["requestURI"].as_str().map(String::from))
            .collect()
    };
    let listed = pods_requests(&cp.audit());
    let pages = listed.iter().filter(|u| u.contains("limit=") && !u.contains("watch=")).count();
    let continued = listed.iter().filter(|u| u.contains("continue=")).count();
    assert!(pages >= N / 500 && continued >= N / 500 - 1, "pods listed in pages: {listed:?}");
    // The watch follows the list (the index is complete before it starts).
    let watched = |u: &String| u.contains("watch=true") && u.contains("allowWatchBookmarks=true");
    until("the pods are watched with bookmarks", Duration::from_secs(15), || pods_requests(&cp.audit()).iter().any(watched)).await;
}

/// Whether web/front may reach data/db on TCP 8080, as the probe would decide it from
/// kube-sync's file.
fn web_to_db(dir: &std::path::Path) -> Option<bool> {
    use flows_policy::{Endpoint, Manifests, Protocol};
    let text = std::fs::read_to_string(dir.join(flows_k8s::export::FILE)).ok()?;
    assert!(!text.contains("not exported"), "pod annotations are not copied");
    let m = Manifests::parse([("cluster.yaml", text.as_str())]).expect("the probe reads what was written");
    let src = m.cluster.pod("web", "front")?;
    let dst = m.cluster.pod("data", "db")?;
    let d = m.engine().evaluate(&m.cluster, &Endpoint::Pod(src, Some(ip("10.244.1.10"))), &Endpoint::Pod(dst, Some(ip("10.244.1.20"))), Protocol::Tcp, 8080);
    Some(d.allowed)
}

fn policies_in(dir: &std::path::Path) -> usize {
    std::fs::read_to_string(dir.join(flows_k8s::export::FILE)).unwrap_or_default().matches("kind: NetworkPolicy").count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_sync_writes_what_the_probe_enforces_from_a_real_api_server() {
    binaries();
    let cp = blocking(|| ControlPlane::start("flows-api-export")).expect("control plane");
    let admin = cluster::connect(&cp.api.kubeconfig).await.expect("admin");
    let applier = Applier::new(admin.clone());
    let node = NodeRecord { name: "node-1".into(), pod_cidrs: vec!["10.244.1.0/24".into()], addresses: vec!["192.168.5.1".into()] };
    cluster::register_node(&applier, &node).await.expect("node");
    namespace(&applier, "web", json!({"team": "web"})).await;
    namespace(&applier, "data", json!({})).await;
    for (ns, name, app, addr) in [("web", "front", "front", "10.244.1.10"), ("data", "db", "db", "10.244.1.20")] {
        applier
            .apply(&json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": ns, "labels": {"app": app}, "annotations": {"secret-ish": "not exported"}},
                "spec": {"nodeName": "node-1", "containers": [{"name": "c", "image": "x", "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]}]}}))
            .await
            .expect("pod");
        cluster::pod_running(&admin, ns, name, &[addr.into()], "192.168.5.1").await.expect("status");
    }
    let dir = flows_lab::testing::temp_dir("flows-api-export-out").expect("dir");
    let client = cluster::connect(&blocking(|| cp.kubeconfig_of(Component::KubeSync)).expect("kube-sync token")).await.expect("client");
    let progress = flows_k8s::export::start(client, dir.clone(), Duration::from_millis(50));
    until("the first write", Duration::from_secs(30), || progress.borrow().writes >= 1).await;
    assert_eq!(progress.borrow().synced_kinds, 3, "written only after all three kinds were listed");
    assert_eq!(web_to_db(&dir), Some(true), "no policy: allowed");

    // A policy: db admits the team=web namespaces on the named port only.
    let start = Instant::now();
    applier
        .apply(&json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "db-from-web", "namespace": "data"},
            "spec": {"podSelector": {"matchLabels": {"app": "db"}},
                     "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "web"}}}], "ports": [{"port": "http"}]}]}}))
        .await
        .expect("policy");
    until("the policy", Duration::from_secs(10), || policies_in(&dir) == 1).await;
    eprintln!("FIGURE NetworkPolicy created in the API to kube-sync's file (50 ms debounce): {:?}", start.elapsed());
    assert_eq!(web_to_db(&dir), Some(true), "web is admitted on http (8080)");
    // The namespace loses its label (applied again without it): now denied.
    let start = Instant::now();
    applier.apply(&json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "web", "labels": {}}})).await.expect("relabel");
    until("the relabelled namespace", Duration::from_secs(10), || web_to_db(&dir) == Some(false)).await;
    eprintln!("FIGURE Namespace relabelled in the API to kube-sync's file: {:?}", start.elapsed());
    // A pod deleted: gone from the file.
    cluster::finish_deletion(&admin, "web", "front").await.expect("delete");
    until("the deleted pod", Duration::from_secs(10), || web_to_db(&dir).is_none()).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_follows_the_probe_pods_of_a_real_api_server() {
    binaries();
    let cp = blocking(|| ControlPlane::start("flows-api-discovery")).expect("control plane");
    let admin = cluster::connect(&cp.api.kubeconfig).await.expect("admin");
    let applier = Applier::new(admin.clone());
    for (n, a) in [("node-a", "10.0.0.1"), ("node-b", "10.0.0.2")] {
        let node = NodeRecord { name: n.into(), pod_cidrs: vec![], addresses: vec![a.into()] };
        cluster::register_node(&applier, &node).await.expect("node");
    }
    let ns = flows_lab::components::NAMESPACE;
    let pod = |name: &str, node: &str, app: &str| {
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns, "labels": {"app.kubernetes.io/name": app}},
            "spec": {"nodeName": node, "hostNetwork": true, "serviceAccountName": "flows-node-probe", "containers": [{"name": "c", "image": "x"}]}})
    };
    for (name, node, app) in [("p-a", "node-a", "flows-node-probe"), ("p-b", "node-b", "flows-node-probe"), ("relay", "node-a", "flows-relay")] {
        applier.apply(&pod(name, node, app)).await.expect("pod");
    }
    cluster::pod_running(&admin, ns, "p-a", &["10.0.0.1".into()], "10.0.0.1").await.expect("status");
    cluster::pod_running(&admin, ns, "relay", &["10.0.0.1".into()], "10.0.0.1").await.expect("status");
    // The relay's own account finds them (the chart's role covers it).
    let client = cluster::connect(&blocking(|| cp.kubeconfig_of(Component::Relay)).expect("token")).await.expect("client");
    let mut peers = flows_k8s::discover::probes(client, ns, "app.kubernetes.io/name=flows-node-probe", 4245);
    let want_a = flows_k8s::discover::PeerMap::from([("node-a".to_string(), "10.0.0.1:4245".to_string())]);
    tokio::time::timeout(Duration::from_secs(20), peers.wait_for(|p| *p == want_a)).await.expect("the running probe").expect("discovery");
    cluster::pod_running(&admin, ns, "p-b", &["10.0.0.2".into()], "10.0.0.2").await.expect("status");
    tokio::time::timeout(Duration::from_secs(20), peers.wait_for(|p| p.len() == 2 && p.get("node-b").map(String::as_str) == Some("10.0.0.2:4245")))
        .await
        .expect("the second probe, once running")
        .expect("discovery");
    cluster::finish_deletion(&admin, ns, "p-a").await.expect("delete");
    tokio::time::timeout(Duration::from_secs(20), peers.wait_for(|p| !p.contains_key("node-a") && p.len() == 1))
        .await
        .expect("the deleted probe gone")
        .expect("discovery");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttled_lists_are_retried_until_the_index_is_whole() {
    binaries();
    let mut cp = blocking(|| ControlPlane::start("flows-api-429")).expect("control plane");
    let admin = cluster::connect(&cp.api.kubeconfig).await.expect("admin");
    let applier = Applier::new(admin.clone());
    let node = NodeRecord { name: "node-1".into(), pod_cidrs: vec!["10.244.0.0/16".into()], addresses: vec!["192.168.5.1".into()] };
    cluster::register_node(&applier, &node).await.expect("node");
    namespace(&applier, "many", json!({})).await;
    assert_eq!(cluster::create_pods(&admin, "many", "p", "node-1", 300, 4).await.expect("pods"), 300);
    // One read at a time, without priority and fairness: the relay's six watchers list
    // at once, so the server answers some of them 429 Too Many Requests.
    blocking(|| cp.restart_apiserver_with(&["--enable-priority-and-fairness=false", "--max-requests-inflight=1"])).expect("restart");
    let (index, progress) = relay_index(&cp).await;
    assert_eq!(index.read().unwrap().sizes().pods, 300, "the index is whole despite the refusals");
    let relay = Component::Relay.user();
    let refused = cp.audit().iter().filter(|e| e["user"]["username"] == relay.as_str() && e["responseStatus"]["code"] == 429).count();
    assert!(refused > 0, "the server throttled the relay's lists (else this test shows nothing)");
    // The client retries 429 (and 503, 504) itself, with exponential backoff and the
    // server's Retry-After: the watchers see no error at all.
    assert_eq!(progress.borrow().errors, 0, "{:?}", *progress.borrow());
    eprintln!("FIGURE 429 answers to the relay's lists: {refused}, retried by the client with backoff until every kind was listed");
}
