//! The relay's Kubernetes index fed by a real API server (`cargo bench -p flows-lab
//! --bench api_index`): for clusters of 2,000 and 10,000 pods, the time from starting the
//! watchers (with the relay's own token) to every kind listed, and the memory the index
//! then holds, counted by this binary's allocator (live bytes after the lists, minus
//! before). Baseline, same run, same pods: the index built from the same objects read
//! as one manifest text (what the relay holds without the API: no watcher, no client).
//!
//! Needs the control plane's binaries (`scripts/setup.sh`); no root.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::{
        Arc, RwLock,
        atomic::{AtomicI64, Ordering},
    },
    time::{Duration, Instant},
};

use flows_k8s::{ClusterIndex, cluster, watch};
use flows_lab::{components::Component, testing::ControlPlane};

/// Live heap bytes of the process.
struct Counting;

static LIVE: AtomicI64 = AtomicI64::new(0);

// SAFETY: every call is passed to the system allocator unchanged; only a counter is kept.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as i64, Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as i64, Ordering::Relaxed);
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new as i64 - l.size() as i64, Ordering::Relaxed);
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn mib(b: i64) -> f64 {
    b as f64 / (1 << 20) as f64
}

async fn measure(cp: &ControlPlane, admin: &flows_k8s::Client, have: usize, want: usize) -> usize {
    let start = Instant::now();
    let made = cluster::create_pods(admin, "many", &format!("p{have}"), "node-1", want - have, 8).await.expect("pods");
    let total = have + made;
    eprintln!("{total} pods in the API ({made} created in {:.1} s)", start.elapsed().as_secs_f64());
    let config = tokio::task::block_in_place(|| cp.kubeconfig_of(Component::Relay)).expect("token");
    let client = cluster::connect(&config).await.expect("client");
    let before = LIVE.load(Ordering::Relaxed);
    let start = Instant::now();
    let index = Arc::new(RwLock::new(ClusterIndex::listed_by(Vec::new(), &watch::KINDS)));
    let mut progress = watch::start(client, index.clone());
    tokio::time::timeout(Duration::from_secs(300), progress.wait_for(|p| p.synced())).await.expect("listed in time").expect("watchers");
    let listed = start.elapsed();
    // Let the list pages go before counting what stays.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let held = LIVE.load(Ordering::Relaxed) - before;
    let pods = index.read().expect("index").sizes().pods;
    assert_eq!(pods, total);

    // Baseline: the same objects as one manifest text, indexed without the API.
    let text = flows_k8s::snapshot::read(&cp.api.kubeconfig).await.expect("snapshot").yaml;
    let before = LIVE.load(Ordering::Relaxed);
    let offline = flows_k8s::manifests::index_of_text("snapshot", &text, Vec::new()).expect("index");
    let offline_held = LIVE.load(Ordering::Relaxed) - before;
    drop(text);
    println!(
        "pods={pods} listed_in={:.2}s index_held={:.1}MiB ({:.0} B/pod) baseline_manifest_index={:.1}MiB ratio={:.2}x",
        listed.as_secs_f64(),
        mib(held),
        held as f64 / pods as f64,
        mib(offline_held),
        held as f64 / offline_held.max(1) as f64
    );
    drop(offline);
    total
}

fn main() {
    let missing = flows_lab::control_plane::missing(&flows_lab::control_plane::bin_dir());
    assert!(missing.is_empty(), "missing {missing:?} (scripts/setup.sh unpacks them)");
    let cp = ControlPlane::start("flows-bench-api-index").expect("control plane");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(async {
        let admin = cluster::connect(&cp.api.kubeconfig).await.expect("admin");
        let applier = cluster::Applier::new(admin.clone());
        let node = cluster::NodeRecord { name: "node-1".into(), pod_cidrs: vec!["10.244.0.0/16".into()], addresses: vec!["192.168.5.1".into()] };
        cluster::register_node(&applier, &node).await.expect("node");
        for doc in [
            serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "many"}}),
            serde_json::json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default", "namespace": "many"}}),
        ] {
            applier.apply(&doc).await.expect("namespace");
        }
        let mut have = 0;
        for want in [2_000, 10_000] {
            have = measure(&cp, &admin, have, want).await;
        }
    });
}
