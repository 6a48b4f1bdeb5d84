//! kube-rs watchers feeding the index: Pods, Services, Nodes, Namespaces, ReplicaSets and
//! Jobs, cluster-wide. Each watcher relists after its watch expires or breaks (with
//! kube's default backoff); a relist removes what it no longer names.

use std::{
    fmt::Debug,
    sync::{Arc, RwLock},
};

use futures::StreamExt;
use k8s_openapi::{
    api::{
        apps::v1::ReplicaSet,
        batch::v1::Job,
        core::v1::{Namespace, Node, Pod, Service},
    },
    serde::de::DeserializeOwned,
};
use kube::{
    Api, Client, Resource,
    runtime::{WatchStreamExt, watcher},
};
use tokio::sync::watch;

use crate::index::{ClusterIndex, Kind, Object};

pub type SharedIndex = Arc<RwLock<ClusterIndex>>;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no Kubernetes configuration (in-cluster or kubeconfig): {0}")]
    Config(String),
    #[error("building the Kubernetes client: {0}")]
    Client(String),
}

/// A client from the in-cluster service account, else `$KUBECONFIG` / `~/.kube/config`.
pub async fn client() -> Result<Client, ClientError> {
    let config = kube::Config::infer()
        .await
        .map_err(|e| ClientError::Config(e.to_string()))?;
    Client::try_from(config).map_err(|e| ClientError::Client(e.to_string()))
}

/// A client for an API server at `url` with no credentials (tests, `kubectl proxy`).
pub fn client_for(url: &str) -> Result<Client, ClientError> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e: http::uri::InvalidUri| ClientError::Config(e.to_string()))?;
    Client::try_from(kube::Config::new(uri)).map_err(|e| ClientError::Client(e.to_string()))
}

/// How far the watchers have come: every kind listed once means the index is complete.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    pub synced_kinds: usize,
    pub kinds: usize,
    /// Watch errors so far (each is retried with backoff).
    pub errors: u64,
    /// Watches the API server expired (each followed by a relist).
    pub expired: u64,
}

impl Progress {
    pub fn synced(&self) -> bool {
        self.kinds > 0 && self.synced_kinds == self.kinds
    }
}

async fn feed<K>(
    api: Api<K>,
    kind: Kind,
    wrap: fn(K) -> Object,
    index: SharedIndex,
    progress: watch::Sender<Progress>,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let mut synced = false;
    let stream = watcher(api, watcher::Config::default()).default_backoff();
    let mut stream = std::pin::pin!(stream);
    while let Some(ev) = stream.next().await {
        // A poisoned lock means a panic mid-update elsewhere; the index is still usable.
        let mut idx = index.write().unwrap_or_else(|e| e.into_inner());
        match ev {
            Ok(watcher::Event::Init) => idx.relist_start(kind),
            Ok(watcher::Event::InitApply(o)) | Ok(watcher::Event::Apply(o)) => idx.apply(wrap(o)),
            Ok(watcher::Event::Delete(o)) => idx.delete_object(&wrap(o)),
            Ok(watcher::Event::InitDone) => {
                idx.relist_done(kind);
                if !synced {
                    synced = true;
                    progress.send_modify(|p| p.synced_kinds += 1);
                }
            }
            // An expired watch (410 Gone) is routine: the watcher lists again.
            Err(watcher::Error::WatchError(s)) if s.code == 410 => {
                drop(idx);
                tracing::debug!(?kind, "watch expired; relisting");
                progress.send_modify(|p| p.expired += 1);
            }
            Err(e) => {
                drop(idx);
                tracing::warn!(?kind, error = %e, "Kubernetes watch failed; retrying");
                progress.send_modify(|p| p.errors += 1);
            }
        }
    }
}

/// The kinds the watchers feed: an index for them starts as
/// `ClusterIndex::listed_by(cidrs, &KINDS)`.
pub const KINDS: [Kind; 6] = [Kind::Pod, Kind::Service, Kind::Node, Kind::Namespace, Kind::ReplicaSet, Kind::Job];

/// Starts one watcher per kind, feeding `index`, and returns their progress. The
/// watchers run until the runtime stops.
pub fn start(client: Client, index: SharedIndex) -> watch::Receiver<Progress> {
    let (tx, rx) = watch::channel(Progress {
        kinds: KINDS.len(),
        ..Default::default()
    });
    tokio::spawn(feed(
        Api::<Pod>::all(client.clone()),
        Kind::Pod,
        |o| Object::Pod(Box::new(o)),
        index.clone(),
        tx.clone(),
    ));
    tokio::spawn(feed(
        Api::<Service>::all(client.clone()),
        Kind::Service,
        |o| Object::Service(Box::new(o)),
        index.clone(),
        tx.clone(),
    ));
    tokio::spawn(feed(
        Api::<Node>::all(client.clone()),
        Kind::Node,
        |o| Object::Node(Box::new(o)),
        index.clone(),
        tx.clone(),
    ));
    tokio::spawn(feed(
        Api::<Namespace>::all(client.clone()),
        Kind::Namespace,
        |o| Object::Namespace(Box::new(o)),
        index.clone(),
        tx.clone(),
    ));
    tokio::spawn(feed(
        Api::<ReplicaSet>::all(client.clone()),
        Kind::ReplicaSet,
        |o| Object::ReplicaSet(Box::new(o)),
        index.clone(),
        tx.clone(),
    ));
    tokio::spawn(feed(
        Api::<Job>::all(client),
        Kind::Job,
        |o| Object::Job(Box::new(o)),
        index,
        tx,
    ));
    rx
}
