//! The node-probe's policy source on a cluster: Namespaces, Pods and NetworkPolicies
//! watched from the API server and written as one manifest file that the probe's
//! `--manifests` directory watcher reads (as in the lab), so the probe itself holds no
//! API credentials and imports no Kubernetes client.
//!
//! Nothing is written until every kind has been listed once: a probe never takes over
//! from its predecessor with half a cluster. Each change rewrites the file whole,
//! atomically (a temporary file renamed over it), at most every `debounce`. Pods are
//! written with what policy needs only: labels, node, addresses, container ports.

use std::{
    collections::BTreeMap,
    fmt::Debug,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::StreamExt;
use k8s_openapi::{
    api::{
        core::v1::{Container, Namespace, Pod, PodSpec},
        networking::v1::NetworkPolicy,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
    serde::{Serialize, de::DeserializeOwned},
};
use kube::{
    Api, Client, Resource,
    runtime::{WatchStreamExt, watcher},
};
use tokio::sync::{Notify, watch};

/// The file written in the output directory.
pub const FILE: &str = "cluster.yaml";

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("writing {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("serialising the cluster: {0}")]
    Yaml(#[from] serde_yaml::Error),
    #[error("serialising the cluster: {0}")]
    Json(#[from] serde_json::Error),
}

/// One kind's objects by namespace/name; a relist is collected aside and replaces the
/// whole set when it completes, so deletions missed during a broken watch go too.
struct Objects<K> {
    current: BTreeMap<String, K>,
    relist: Option<BTreeMap<String, K>>,
    synced: bool,
}

impl<K> Default for Objects<K> {
    fn default() -> Self {
        Objects { current: BTreeMap::new(), relist: None, synced: false }
    }
}

#[derive(Default)]
struct Cluster {
    namespaces: Objects<Namespace>,
    pods: Objects<Pod>,
    policies: Objects<NetworkPolicy>,
}

/// Progress for readiness and tests: writes done, and the kinds listed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExportProgress {
    pub synced_kinds: usize,
    pub writes: u64,
    pub errors: u64,
}

fn key<K: Resource>(o: &K) -> String {
    format!("{}/{}", o.meta().namespace.as_deref().unwrap_or_default(), o.meta().name.as_deref().unwrap_or_default())
}

async fn follow<K>(
    api: Api<K>,
    cluster: Arc<Mutex<Cluster>>,
    pick: fn(&mut Cluster) -> &mut Objects<K>,
    changed: Arc<Notify>,
    progress: watch::Sender<ExportProgress>,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let stream = watcher(api, watcher::Config::default()).default_backoff();
    let mut stream = std::pin::pin!(stream);
    while let Some(ev) = stream.next().await {
        let mut c = cluster.lock().unwrap_or_else(|p| p.into_inner());
        let set = pick(&mut c);
        match ev {
            Ok(watcher::Event::Init) => set.relist = Some(BTreeMap::new()),
            Ok(watcher::Event::InitApply(o)) => {
                let k = key(&o);
                match &mut set.relist {
                    Some(r) => r.insert(k, o),
                    None => set.current.insert(k, o),
                };
            }
            Ok(watcher::Event::InitDone) => {
                if let Some(r) = set.relist.take() {
                    set.current = r;
                }
                if !set.synced {
                    set.synced = true;
                    progress.send_modify(|p| p.synced_kinds += 1);
                }
                changed.notify_one();
            }
            Ok(watcher::Event::Apply(o)) => {
                set.current.insert(key(&o), o);
                changed.notify_one();
            }
            Ok(watcher::Event::Delete(o)) => {
                set.current.remove(&key(&o));
                changed.notify_one();
            }
            Err(e) => {
                drop(c);
                tracing::warn!(error = %e, "Kubernetes watch failed; retrying");
                progress.send_modify(|p| p.errors += 1);
            }
        }
    }
}

fn meta(m: &ObjectMeta, annotations: bool) -> ObjectMeta {
    ObjectMeta {
        name: m.name.clone(),
        namespace: m.namespace.clone(),
        labels: m.labels.clone(),
        annotations: if annotations { m.annotations.clone() } else { None },
        ..Default::default()
    }
}

/// A pod with what policy decisions read: labels, node, addresses, phase, and the
/// containers' ports (named ports resolve against them).
fn slim_pod(p: &Pod) -> Pod {
    let spec = p.spec.as_ref().map(|s| PodSpec {
        node_name: s.node_name.clone(),
        host_network: s.host_network,
        containers: s
            .containers
            .iter()
            .map(|c| Container { name: c.name.clone(), ports: c.ports.clone(), ..Default::default() })
            .collect(),
        ..Default::default()
    });
    let status = p.status.as_ref().map(|s| k8s_openapi::api::core::v1::PodStatus {
        phase: s.phase.clone(),
        pod_ip: s.pod_ip.clone(),
        pod_ips: s.pod_ips.clone(),
        ..Default::default()
    });
    Pod { metadata: meta(&p.metadata, false), spec, status }
}

fn document<T: Serialize>(kind: &str, api_version: &str, o: &T, out: &mut String) -> Result<(), ExportError> {
    let mut v = serde_json::to_value(o)?;
    if let Some(m) = v.as_object_mut() {
        m.insert("apiVersion".into(), api_version.into());
        m.insert("kind".into(), kind.into());
    }
    out.push_str("---\n");
    out.push_str(&serde_yaml::to_string(&v)?);
    Ok(())
}

/// The whole cluster as manifests, in a stable order (the same cluster, the same text).
fn render(c: &Cluster) -> Result<String, ExportError> {
    let mut out = String::from("# Written by `flows kube-sync`: the cluster as the node-probe's policy reads it.\n");
    for n in c.namespaces.current.values() {
        let n = Namespace { metadata: meta(&n.metadata, true), ..Default::default() };
        document("Namespace", "v1", &n, &mut out)?;
    }
    for p in c.pods.current.values() {
        document("Pod", "v1", &slim_pod(p), &mut out)?;
    }
    for np in c.policies.current.values() {
        let np = NetworkPolicy { metadata: meta(&np.metadata, false), spec: np.spec.clone() };
        document("NetworkPolicy", "networking.k8s.io/v1", &np, &mut out)?;
    }
    Ok(out)
}

fn write_atomically(dir: &Path, text: &str) -> Result<(), ExportError> {
    let err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ExportError::Write { path, source }
    };
    std::fs::create_dir_all(dir).map_err(err(dir))?;
    // A dot file: the probe reads *.yaml only, so it never sees the half-written one.
    let tmp = dir.join(".cluster.yaml.tmp");
    std::fs::write(&tmp, text).map_err(err(&tmp))?;
    let dst = dir.join(FILE);
    std::fs::rename(&tmp, &dst).map_err(err(&dst))?;
    Ok(())
}

/// Watches the cluster and keeps `dir/cluster.yaml` current until the runtime stops.
pub fn start(client: Client, dir: PathBuf, debounce: Duration) -> watch::Receiver<ExportProgress> {
    let (tx, rx) = watch::channel(ExportProgress::default());
    let cluster = Arc::new(Mutex::new(Cluster::default()));
    let changed = Arc::new(Notify::new());
    tokio::spawn(follow(Api::<Namespace>::all(client.clone()), cluster.clone(), |c| &mut c.namespaces, changed.clone(), tx.clone()));
    tokio::spawn(follow(Api::<Pod>::all(client.clone()), cluster.clone(), |c| &mut c.pods, changed.clone(), tx.clone()));
    tokio::spawn(follow(Api::<NetworkPolicy>::all(client), cluster.clone(), |c| &mut c.policies, changed.clone(), tx.clone()));
    tokio::spawn(async move {
        let mut last = String::new();
        loop {
            changed.notified().await;
            // Let a burst of changes (a rollout) settle into one write.
            tokio::time::sleep(debounce).await;
            let text = {
                let c = cluster.lock().unwrap_or_else(|p| p.into_inner());
                if !(c.namespaces.synced && c.pods.synced && c.policies.synced) {
                    continue;
                }
                render(&c)
            };
            match text {
                Ok(t) if t == last => {}
                Ok(t) => match write_atomically(&dir, &t) {
                    Ok(()) => {
                        last = t;
                        tx.send_modify(|p| p.writes += 1);
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "writing the cluster for the probe");
                        tx.send_modify(|p| p.errors += 1);
                        // Try again soon rather than wait for the next change.
                        changed.notify_one();
                    }
                },
                Err(e) => tracing::error!(error = %e, "serialising the cluster"),
            }
        }
    });
    rx
}
