//! The relay as a whole, from its configuration: peers (listed or discovered), the
//! cluster index, the store and its writer, metrics, and the two gRPC services, until
//! `shutdown` resolves. The binary only turns flags into a [`RelayConfig`].

use std::{
    future::Future,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use flows_k8s::{Cidr, ClusterIndex, manifests::ManifestSource, watch::SharedIndex};
use flows_proto::{history_server::HistoryServer, observer_server::ObserverServer};
use flows_store::{Retention, Store, StoreConfig};

use crate::{
    MAX_REQUEST_BYTES,
    history::HistoryService,
    peers::{self, PeerSet},
    server::RelayService,
    sink::{self, SinkConfig, SinkStats},
    store_slot::StoreSlot,
    stream::Merger,
};

/// Where the cluster index comes from.
#[derive(Debug, Clone)]
pub enum IndexSource {
    /// Flows go out as the nodes sent them.
    None,
    /// Kubernetes objects in manifests (a file or directory, read again when it changes).
    Manifests(PathBuf),
    /// The Kubernetes API (watchers).
    Kubernetes,
}

/// How the relay reaches the Kubernetes API, when it does.
#[derive(Debug, Clone)]
pub enum KubeAccess {
    /// In-cluster service account, else $KUBECONFIG or ~/.kube/config.
    Default,
    /// An API server at this URL without credentials (`kubectl proxy`).
    Url(String),
}

/// Node-probes found as the running pods of a namespace.
#[derive(Debug, Clone)]
pub struct Discovery {
    pub namespace: String,
    pub selector: String,
    pub port: u16,
}

#[derive(Debug, Clone)]
pub struct StoreSettings {
    /// `embedded:DIR` or a ClickHouse server URL.
    pub spec: String,
    /// Bounds of every read a client makes of the store.
    pub read_limits: flows_store::ReadLimits,
    pub database: String,
    pub user: Option<String>,
    pub password: Option<String>,
    pub chdb_library: PathBuf,
    pub retention: Retention,
    pub sink: SinkConfig,
}

pub struct RelayConfig {
    /// `name=host:port` or `host:port`.
    pub peers: Vec<String>,
    pub discovery: Option<Discovery>,
    pub kube: Option<KubeAccess>,
    pub index: IndexSource,
    pub cluster_cidrs: Vec<String>,
    pub listen: SocketAddr,
    pub sort_window: Duration,
    pub sort_buffer: usize,
    pub metrics_listen: Option<SocketAddr>,
    pub store: Option<StoreSettings>,
    /// Written with the listen address once serving; removed at the end.
    pub ready_file: Option<PathBuf>,
    pub tls: flows_tls::ServerTlsArgs,
    pub peer_tls: flows_tls::ClientTlsArgs,
    /// GetFlows streams served at once.
    pub max_streams: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("--cluster-cidr {0:?}: expected an address/length")]
    Cidr(String),
    #[error("the Kubernetes API: {0}")]
    Kube(#[from] flows_k8s::watch::ClientError),
    #[error("{what}: {source}")]
    Tls { what: &'static str, source: flows_tls::TlsError },
    #[error("reading the manifests in {path}: {source}")]
    Manifests { path: PathBuf, source: flows_k8s::manifests::ManifestError },
    #[error("opening the store: {0}")]
    Store(#[from] flows_store::StoreError),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("serving: {0}")]
    Serve(#[from] tonic::transport::Error),
}

fn tls(what: &'static str) -> impl FnOnce(flows_tls::TlsError) -> RunError {
    move |source| RunError::Tls { what, source }
}

/// Runs the relay until `shutdown` resolves; then ends clients' follow streams, stops
/// serving, and writes (or counts as lost) what the store writer holds.
pub async fn run(cfg: RelayConfig, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), RunError> {
    let cidrs = cfg
        .cluster_cidrs
        .iter()
        .map(|c| Cidr::parse(c).ok_or_else(|| RunError::Cidr(c.clone())))
        .collect::<Result<Vec<_>, _>>()?;
    let kube = match &cfg.kube {
        Some(KubeAccess::Url(url)) => Some(flows_k8s::watch::client_for(url)?),
        Some(KubeAccess::Default) => Some(flows_k8s::watch::client().await?),
        None => None,
    };
    // Certificates are read before anything connects or listens: a bad file is an
    // error at start, not a handshake failure later.
    let server_files = cfg.tls.to_config(cfg.listen).map_err(tls("--tls-*"))?;
    let allowed = flows_tls::serving::ClientAllowList::new(server_files.as_ref().map(|t| t.allowed_clients.as_slice()).unwrap_or_default());
    let server_tls = server_files.map(|t| t.load()).transpose().map_err(tls("--tls-*"))?;
    let peer_tls = cfg.peer_tls.to_config().map_err(tls("--peer-tls-*"))?;
    let dialer = flows_tls::Dialer::new(peer_tls.as_ref()).map_err(tls("--peer-tls-*"))?;
    let peers = PeerSet::with_dialer(&cfg.peers, peers::Backoff::default(), dialer);
    if let (Some(d), Some(client)) = (&cfg.discovery, &kube) {
        follow_discovery(flows_k8s::discover::probes(client.clone(), &d.namespace, &d.selector, d.port), peers.clone());
    }
    let index = match (&cfg.index, &kube) {
        (IndexSource::Manifests(path), _) => Some(watch_manifests(path.clone(), cidrs)?),
        (IndexSource::Kubernetes, Some(client)) => {
            let index: SharedIndex = Arc::new(RwLock::new(ClusterIndex::listed_by(cidrs, &flows_k8s::watch::KINDS)));
            let mut progress = flows_k8s::watch::start(client.clone(), index.clone());
            tokio::spawn(async move {
                if progress.wait_for(|p| p.synced()).await.is_ok() {
                    tracing::info!("Kubernetes index synced");
                }
            });
            Some(index)
        }
        _ => None,
    };
    let metrics = Arc::new(flows_metrics::Metrics::new());
    if let Some(addr) = cfg.metrics_listen {
        tokio::spawn(flows_metrics::serve(addr, metrics.clone()));
        report_nodes(peers.clone(), metrics.clone());
    }
    let sink_stats = cfg.store.as_ref().map(|_| Arc::new(SinkStats::default()));
    let store = match (&cfg.store, &sink_stats) {
        (Some(s), Some(stats)) => Some(store_slot(s, stats.clone()).await?),
        _ => None,
    };
    let merger = Arc::new(Merger {
        peers,
        index,
        metrics: metrics.clone(),
        sort_window: cfg.sort_window,
        sort_buffer: cfg.sort_buffer,
        store: store.clone(),
    });
    let (stop_clients, client_stop) = tokio::sync::watch::channel(false);
    let svc = Arc::new(RelayService {
        merger: merger.clone(),
        started: Instant::now(),
        streams: flows_tls::serving::StreamSlots::new(cfg.max_streams),
        sink: sink_stats.clone(),
        shutdown: Some(client_stop),
    });
    let (stop_sink, sink_stop) = tokio::sync::watch::channel(false);
    let sink = match (&store, &sink_stats, &cfg.store) {
        (Some(slot), Some(stats), Some(s)) => {
            let (merger, slot, config, stats, metrics) = (merger.clone(), slot.clone(), s.sink.clone(), stats.clone(), metrics.clone());
            let mut stop = sink_stop.clone();
            Some(tokio::spawn(async move {
                // Written from when the store opens: the nodes' rings hold what came before.
                let store = tokio::select! {
                    s = slot.wait() => s,
                    _ = stop.changed() => return,
                };
                sink::run(merger, store, config, stats, metrics, sink_stop).await
            }))
        }
        _ => None,
    };
    let io = |what: String| move |source| RunError::Io { what, source };
    let listener = tokio::net::TcpListener::bind(cfg.listen).await.map_err(io(format!("listening on {}", cfg.listen)))?;
    let local = listener.local_addr().map_err(io("listen address".into()))?;
    if let Some(path) = &cfg.ready_file {
        std::fs::write(path, local.to_string()).map_err(io(format!("writing {}", path.display())))?;
    }
    tracing::info!(listen = %local, "relay serving");
    let history = store.clone().map(|store| HistoryServer::new(HistoryService { store }));
    let router = flows_tls::serving::server()
        .add_service(tonic::service::interceptor::InterceptedService::new(
            ObserverServer::from_arc(svc).max_decoding_message_size(MAX_REQUEST_BYTES),
            {
                let a = allowed.clone();
                move |r| a.check(r)
            },
        ))
        .add_optional_service(history.map(|h| {
            tonic::service::interceptor::InterceptedService::new(h.max_decoding_message_size(MAX_REQUEST_BYTES), move |r| {
                allowed.check(r)
            })
        }));
    let served = flows_tls::serving::serve(router, listener, server_tls, async move {
        shutdown.await;
        tracing::info!("shutting down: ending client streams");
        let _ = stop_clients.send(true);
    })
    .await;
    if let Some(path) = &cfg.ready_file {
        let _ = std::fs::remove_file(path);
    }
    // What the store writer holds is written (or counted lost) before exit.
    let _ = stop_sink.send(true);
    if let Some(s) = sink {
        let _ = s.await;
    }
    Ok(served?)
}

/// Keeps the peer set equal to the node-probes discovery finds.
fn follow_discovery(mut found: tokio::sync::watch::Receiver<flows_k8s::discover::PeerMap>, set: Arc<PeerSet>) {
    tokio::spawn(async move {
        loop {
            let now = found.borrow_and_update().clone();
            tracing::info!(probes = now.len(), "node-probes discovered");
            set.set(&now);
            if found.changed().await.is_err() {
                return;
            }
        }
    });
}

/// The index from manifests, read now and again whenever they change.
fn watch_manifests(path: PathBuf, cidrs: Vec<Cidr>) -> Result<SharedIndex, RunError> {
    let mut source = ManifestSource::new(path.clone(), cidrs);
    let first = source
        .reload()
        .map_err(|source| RunError::Manifests { path, source })?
        .unwrap_or_default();
    let index: SharedIndex = Arc::new(RwLock::new(first));
    let shared = index.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        loop {
            tick.tick().await;
            match source.reload() {
                Ok(Some(fresh)) => {
                    tracing::info!(sizes = ?fresh.sizes(), "manifests read again");
                    *shared.write().unwrap_or_else(|e| e.into_inner()) = fresh;
                }
                Ok(None) => {}
                // Keep the index there is; say what is wrong with the new files.
                Err(e) => tracing::warn!(error = %e, "manifests not read again"),
            }
        }
    });
    Ok(index)
}

/// Node states for scrapes, refreshed every second.
fn report_nodes(set: Arc<PeerSet>, m: Arc<flows_metrics::Metrics>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let ps = set.snapshot();
            let up = ps.iter().filter(|p| p.client().is_some()).count() as i64;
            m.set_nodes(up, ps.len() as i64 - up);
        }
    });
}

/// The store, opened now when it can be. A ClickHouse server that cannot be reached
/// (or fails) is tried again in the background while the relay serves live flows;
/// anything else (a bad setting, a schema newer than this relay) ends the relay now.
async fn store_slot(s: &StoreSettings, stats: Arc<SinkStats>) -> Result<StoreSlot, RunError> {
    let config = StoreConfig::parse(&s.spec, s.chdb_library.clone(), s.user.clone(), s.password.clone())?;
    let slot = StoreSlot::empty(matches!(config, StoreConfig::Embedded { .. }));
    match open_store(&config, s).await {
        Ok(store) => slot.set(store),
        Err(e) if e.is_of_the_server() => {
            tracing::warn!(error = %e, "the store cannot be opened yet; serving live flows, and trying again");
            stats.set_error(e.to_string());
            let (slot, s) = (slot.clone(), s.clone());
            tokio::spawn(async move {
                let mut delay = Duration::from_millis(500);
                loop {
                    tokio::time::sleep(delay).await;
                    match open_store(&config, &s).await {
                        Ok(store) => {
                            stats.set_error(String::new());
                            return slot.set(store);
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, retry_in = ?delay, "the store cannot be opened yet");
                            stats.set_error(e.to_string());
                        }
                    }
                    delay = (delay * 2).min(Duration::from_secs(10));
                }
            });
        }
        Err(e) => return Err(e.into()),
    }
    Ok(slot)
}

async fn open_store(config: &StoreConfig, s: &StoreSettings) -> Result<Arc<Store>, flows_store::StoreError> {
    let store = Store::open(config, &s.database, s.retention).await?.with_read_limits(s.read_limits);
    tracing::info!(embedded = store.is_embedded(), database = %s.database, "store open");
    Ok(Arc::new(store))
}
