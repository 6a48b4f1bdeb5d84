//! flows-relay: flags into a [`RelayConfig`], then [`flows_relay::run::run`] until SIGTERM.

use std::{net::SocketAddr, time::Duration};

use anyhow::Context;
use clap::Parser;
use flows_relay::{
    run::{Discovery, IndexSource, KubeAccess, RelayConfig, StoreSettings},
    sink::{SinkConfig, WhenFull},
};
use flows_store::Retention;

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
    /// Flows (or audit groups) one read from the store returns at most; a question with
    /// more answers is refused with RESOURCE_EXHAUSTED, naming the bound (the relay holds
    /// a read's answer in memory while it merges it with the nodes').
    #[arg(long, default_value_t = 100_000)]
    store_read_max_rows: u64,
    /// Seconds ClickHouse may spend on one read before it stops it.
    #[arg(long, default_value_t = 60)]
    store_read_max_seconds: u64,
    /// MiB of memory ClickHouse may use for one read.
    #[arg(long, default_value_t = 2048)]
    store_read_max_memory_mib: u64,
    /// GetFlows streams served at once; more are refused with RESOURCE_EXHAUSTED. Each
    /// follower holds one here and one on every node-probe.
    #[arg(long, default_value_t = 256)]
    max_streams: usize,
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
    /// Where batches the store refuses (a constraint, bad values) are kept, as RowBinary
    /// files an operator can load once the cause is fixed. Default: DIR/set-aside for
    /// `embedded:DIR`, else $TMPDIR/flows-set-aside-<database>.
    #[arg(long, value_name = "DIR")]
    store_set_aside_dir: Option<std::path::PathBuf>,
    /// Bytes kept there at most (MiB); a refused batch past it is counted lost.
    #[arg(long, default_value_t = 1024)]
    store_set_aside_max_mib: u64,
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

impl Args {
    fn config(self) -> RelayConfig {
        let kube = match (&self.kubernetes_api, self.kubernetes || self.discover_namespace.is_some()) {
            (Some(url), _) => Some(KubeAccess::Url(url.clone())),
            (None, true) => Some(KubeAccess::Default),
            (None, false) => None,
        };
        let index = match (&self.manifests, self.kubernetes || self.kubernetes_api.is_some()) {
            (Some(path), _) => IndexSource::Manifests(path.clone()),
            (None, true) => IndexSource::Kubernetes,
            (None, false) => IndexSource::None,
        };
        let store = self.store.clone().map(|spec| StoreSettings {
            spec: spec.clone(),
            read_limits: flows_store::ReadLimits {
                max_rows: self.store_read_max_rows.max(1),
                max_seconds: self.store_read_max_seconds.max(1),
                max_memory: self.store_read_max_memory_mib.max(1).saturating_mul(1 << 20),
            },
            database: self.store_database.clone(),
            user: self.store_user.clone(),
            password: self.store_password.clone(),
            chdb_library: self.chdb_lib.clone().unwrap_or_else(flows_store::chdb::default_library),
            retention: Retention {
                raw_days: self.retention_raw_days,
                minute_days: self.retention_minute_days,
                hour_days: self.retention_hour_days,
            },
            sink: SinkConfig {
                batch_rows: self.store_batch_rows.max(1),
                flush: Duration::from_millis(self.store_flush_ms),
                buffer_rows: self.store_buffer_rows.max(1),
                when_full: self.store_when_full,
                set_aside: Some((
                    self.store_set_aside_dir.clone().unwrap_or_else(|| match spec.strip_prefix("embedded:") {
                        Some(dir) => std::path::Path::new(dir).join("set-aside"),
                        None => std::env::temp_dir().join(format!("flows-set-aside-{}", self.store_database)),
                    }),
                    self.store_set_aside_max_mib.saturating_mul(1 << 20),
                )),
                ..Default::default()
            },
        });
        RelayConfig {
            peers: self.peers,
            discovery: self.discover_namespace.map(|namespace| Discovery {
                namespace,
                selector: self.discover_selector,
                port: self.discover_port,
            }),
            kube,
            index,
            cluster_cidrs: self.cluster_cidr,
            listen: self.listen,
            sort_window: Duration::from_millis(self.sort_window_ms),
            sort_buffer: self.sort_buffer,
            metrics_listen: self.metrics_listen,
            store,
            ready_file: self.ready_file,
            tls: self.tls,
            peer_tls: flows_tls::ClientTlsArgs {
                tls_ca: self.peer_tls_ca,
                tls_client_cert: self.peer_tls_cert,
                tls_client_key: self.peer_tls_key,
                tls_server_name: self.peer_tls_server_name,
            },
            max_streams: self.max_streams.max(1),
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,kube_client::client::builder=off,kube_runtime::watcher=error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let config = Args::parse().config();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    Ok(flows_relay::run::run(config, shutdown).await?)
}
