//! flows-relay: thin binary over the `flows_relay` library.

use std::{
    net::SocketAddr,
    sync::{Arc, RwLock},
    time::Duration,
    time::Instant,
};

use anyhow::Context;
use clap::Parser;
use flows_proto::observer_server::ObserverServer;
use flows_k8s::{Cidr, ClusterIndex, manifests::ManifestSource, watch::SharedIndex};
use flows_proto::history_server::HistoryServer;
use flows_relay::{
    peers::{self, PeerSet},
    server::{HistoryService, RelayService},
    sink::{SinkConfig, SinkStats, WhenFull},
};
use flows_store::{Retention, Store, StoreConfig};

#[derive(Parser)]
#[command(name = "flows-relay", version, about = "flows relay: every node-probe's flows, merged")]
struct Args {
    /// A node-probe: `name=host:port` or `host:port` (repeatable, or comma-separated).
    #[arg(long = "peer", value_delimiter = ',', required_unless_present = "discover_namespace")]
    peers: Vec<String>,
    /// Find the node-probes as the running pods of this namespace that match
    /// --discover-selector (through the Kubernetes API), instead of --peer.
    #[arg(long, conflicts_with = "peers")]
    discover_namespace: Option<String>,
    /// Label selector of the node-probe pods.
    #[arg(long, default_value = "app.kubernetes.io/name=flows-node-probe")]
    discover_selector: String,
    /// Port of the node-probes' Observer API.
    #[arg(long, default_value_t = 4245)]
    discover_port: u16,
    /// Annotate flows from the Kubernetes API (in-cluster service account, else
    /// $KUBECONFIG or ~/.kube/config): pods, namespaces, services, nodes and owners.
    #[arg(long)]
    kubernetes: bool,
    /// The Kubernetes API server at this URL, with no credentials (for `kubectl proxy`).
    #[arg(long, value_name = "URL")]
    kubernetes_api: Option<String>,
    /// Annotate flows from the Kubernetes objects in these manifests (a file or a
    /// directory; read again when they change), instead of the API.
    #[arg(long, conflicts_with_all = ["kubernetes", "kubernetes_api"])]
    manifests: Option<std::path::PathBuf>,
    /// Addresses inside the cluster beyond the nodes' pod CIDRs (service and pod ranges);
    /// other addresses that name no pod, service or node are marked as world.
    #[arg(long, value_delimiter = ',')]
    cluster_cidr: Vec<String>,
    /// Address of the relay's Observer API.
    #[arg(long, default_value = "127.0.0.1:4244")]
    listen: SocketAddr,
    /// How long a flow waits for earlier flows from other nodes (milliseconds).
    #[arg(long, default_value_t = 300)]
    sort_window_ms: u64,
    /// Flows held for sorting at most.
    #[arg(long, default_value_t = 10_000)]
    sort_buffer: usize,
    /// Address of the Prometheus /metrics endpoint (off by default).
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Keep every flow in a store: `embedded:DIR` (ClickHouse's engine in this process,
    /// data in DIR) or the URL of a ClickHouse server (`http://host:8123`).
    #[arg(long, value_name = "embedded:DIR|URL")]
    store: Option<String>,
    /// The store's database.
    #[arg(long, default_value = "flows")]
    store_database: String,
    /// ClickHouse user (server only).
    #[arg(long, env = "FLOWS_STORE_USER")]
    store_user: Option<String>,
    /// ClickHouse password (server only; from the environment, so it stays out of `ps`).
    #[arg(long, env = "FLOWS_STORE_PASSWORD", hide_env_values = true)]
    store_password: Option<String>,
    /// libchdb.so for the embedded store.
    #[arg(long, env = "FLOWS_CHDB_LIB")]
    chdb_lib: Option<std::path::PathBuf>,
    /// Days of raw flows kept.
    #[arg(long, default_value_t = 7)]
    retention_raw_days: u32,
    /// Days of per-minute rollups kept.
    #[arg(long, default_value_t = 30)]
    retention_minute_days: u32,
    /// Days of per-hour rollups kept.
    #[arg(long, default_value_t = 365)]
    retention_hour_days: u32,
    /// Rows per insert at most.
    #[arg(long, default_value_t = 100_000)]
    store_batch_rows: usize,
    /// An insert is made at least this often while flows arrive (milliseconds).
    #[arg(long, default_value_t = 1000)]
    store_flush_ms: u64,
    /// Rows waiting for the store at most, besides the batch being written (so memory
    /// is bounded by this plus --store-batch-rows rows).
    #[arg(long, default_value_t = 200_000)]
    store_buffer_rows: usize,
    /// When that buffer is full: wait (the nodes' rings absorb it, and report what they
    /// overrun), or drop the newest flow and count it.
    #[arg(long, value_enum, default_value = "block")]
    store_when_full: WhenFull,
    /// Written with the listen address once the relay is serving.
    #[arg(long)]
    ready_file: Option<std::path::PathBuf>,
    /// Mutual TLS of the relay's own API (towards `flows` clients).
    #[command(flatten)]
    tls: flows_tls::ServerTlsArgs,
    /// PEM CA certificate(s) that node-probes' certificates must chain to; turns on TLS
    /// towards the node-probes.
    #[arg(long, value_name = "FILE")]
    peer_tls_ca: Option<std::path::PathBuf>,
    /// PEM client certificate the relay presents to node-probes.
    #[arg(long, value_name = "FILE", requires = "peer_tls_ca")]
    peer_tls_cert: Option<std::path::PathBuf>,
    /// PEM private key of --peer-tls-cert.
    #[arg(long, value_name = "FILE", requires = "peer_tls_cert")]
    peer_tls_key: Option<std::path::PathBuf>,
    /// Name node-probe certificates must carry (probes are dialled by address, so they
    /// share one name, e.g. node-probe.flows.local).
    #[arg(long, value_name = "NAME", requires = "peer_tls_ca")]
    peer_tls_server_name: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let cidrs = args
        .cluster_cidr
        .iter()
        .map(|c| Cidr::parse(c).with_context(|| format!("--cluster-cidr {c:?}: expected an address/length")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let kube = if let Some(url) = &args.kubernetes_api {
        Some(flows_k8s::watch::client_for(url)?)
    } else if args.kubernetes || args.discover_namespace.is_some() {
        Some(flows_k8s::watch::client().await?)
    } else {
        None
    };
    // Certificates are read before anything connects or listens: a bad file is an
    // error at start, not a handshake failure later.
    let server_tls = args.tls.to_config()?.map(|t| t.load()).transpose()?;
    let peer_tls = flows_tls::ClientTlsArgs {
        tls_ca: args.peer_tls_ca.clone(),
        tls_client_cert: args.peer_tls_cert.clone(),
        tls_client_key: args.peer_tls_key.clone(),
        tls_server_name: args.peer_tls_server_name.clone(),
    }
    .to_config()
    .context("--peer-tls-*")?;
    let dialer = flows_tls::Dialer::new(peer_tls.as_ref())?;
    let peers = PeerSet::with_dialer(&args.peers, peers::Backoff::default(), dialer);
    if let (Some(ns), Some(client)) = (&args.discover_namespace, &kube) {
        let mut found = flows_k8s::discover::probes(client.clone(), ns, &args.discover_selector, args.discover_port);
        let set = peers.clone();
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
    let index = if let Some(path) = &args.manifests {
        let mut source = ManifestSource::new(path.clone(), cidrs);
        let first = source
            .reload()
            .with_context(|| format!("reading the manifests in {}", path.display()))?
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
        Some(index)
    } else if let (true, Some(client)) = (args.kubernetes || args.kubernetes_api.is_some(), &kube) {
        let index: SharedIndex = Arc::new(RwLock::new(ClusterIndex::new(cidrs)));
        let mut progress = flows_k8s::watch::start(client.clone(), index.clone());
        tokio::spawn(async move {
            if progress.wait_for(|p| p.synced()).await.is_ok() {
                tracing::info!("Kubernetes index synced");
            }
        });
        Some(index)
    } else {
        None
    };
    let metrics = Arc::new(flows_metrics::Metrics::new());
    if let Some(addr) = args.metrics_listen {
        tokio::spawn(flows_metrics::serve(addr, metrics.clone()));
        // Node states, refreshed for scrapes.
        let (set, m) = (peers.clone(), metrics.clone());
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
    let store = match &args.store {
        None => None,
        Some(spec) => {
            let config = StoreConfig::parse(
                spec,
                args.chdb_lib.clone().unwrap_or_else(flows_store::chdb::default_library),
                args.store_user.clone(),
                args.store_password.clone(),
            )?;
            let retention = Retention {
                raw_days: args.retention_raw_days,
                minute_days: args.retention_minute_days,
                hour_days: args.retention_hour_days,
            };
            let s = Store::open(&config, &args.store_database, retention)
                .await
                .context("opening the store")?;
            tracing::info!(embedded = s.is_embedded(), database = %args.store_database, "store open");
            Some(Arc::new(s))
        }
    };
    let sink_stats = store.as_ref().map(|_| Arc::new(SinkStats::default()));
    let (stop_clients, client_stop) = tokio::sync::watch::channel(false);
    let svc = Arc::new(RelayService {
        peers,
        index,
        metrics: metrics.clone(),
        sort_window: Duration::from_millis(args.sort_window_ms),
        sort_buffer: args.sort_buffer,
        started: Instant::now(),
        store: store.clone(),
        sink: sink_stats.clone(),
        shutdown: Some(client_stop.clone()),
    });
    let (stop_sink, sink_stop) = tokio::sync::watch::channel(false);
    let sink = match (&store, &sink_stats) {
        (Some(store), Some(stats)) => {
            let config = SinkConfig {
                batch_rows: args.store_batch_rows.max(1),
                flush: Duration::from_millis(args.store_flush_ms),
                buffer_rows: args.store_buffer_rows.max(1),
                when_full: args.store_when_full,
                ..Default::default()
            };
            Some(tokio::spawn(flows_relay::sink::run(
                svc.clone(),
                store.clone(),
                config,
                stats.clone(),
                metrics.clone(),
                sink_stop,
            )))
        }
        _ => None,
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let local = listener.local_addr().context("listen address")?;
    if let Some(path) = &args.ready_file {
        std::fs::write(path, local.to_string())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    tracing::info!(listen = %local, "relay serving");
    let history = store.clone().map(|store| HistoryServer::new(HistoryService { store }));
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = server_tls {
        builder = builder.tls_config(tls).context("TLS")?;
    }
    let served = builder
        .add_service(ObserverServer::from_arc(svc).max_decoding_message_size(flows_relay::MAX_REQUEST_BYTES))
        .add_optional_service(history.map(|h| h.max_decoding_message_size(flows_relay::MAX_REQUEST_BYTES)))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            async move {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
                tracing::info!("shutting down: ending client streams");
                let _ = stop_clients.send(true);
            },
        )
        .await;
    if let Some(path) = &args.ready_file {
        let _ = std::fs::remove_file(path);
    }
    // What the store writer holds is written (or counted lost) before exit.
    let _ = stop_sink.send(true);
    if let Some(s) = sink {
        let _ = s.await;
    }
    served.context("serving")?;
    Ok(())
}
