//! flows-relay: thin binary over the `flows_relay` library.

use std::{net::SocketAddr, time::Duration, time::Instant};

use anyhow::Context;
use clap::Parser;
use flows_proto::observer_server::ObserverServer;
use flows_relay::{peers, server::RelayService};

#[derive(Parser)]
#[command(name = "flows-relay", version, about = "flows relay: every node-probe's flows, merged")]
struct Args {
    /// A node-probe: `name=host:port` or `host:port` (repeatable, or comma-separated).
    #[arg(long = "peer", required = true, value_delimiter = ',')]
    peers: Vec<String>,
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
    /// Written with the listen address once the relay is serving.
    #[arg(long)]
    ready_file: Option<std::path::PathBuf>,
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
    let peers: Vec<_> = args
        .peers
        .iter()
        .map(|p| peers::spawn(p, peers::Backoff::default()))
        .collect();
    let metrics = std::sync::Arc::new(flows_metrics::Metrics::new());
    if let Some(addr) = args.metrics_listen {
        tokio::spawn(flows_metrics::serve(addr, metrics.clone()));
        // Node states, refreshed for scrapes.
        let (ps, m) = (peers.clone(), metrics.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let up = ps.iter().filter(|p| p.client().is_some()).count() as i64;
                m.set_nodes(up, ps.len() as i64 - up);
            }
        });
    }
    let svc = RelayService {
        peers,
        metrics,
        sort_window: Duration::from_millis(args.sort_window_ms),
        sort_buffer: args.sort_buffer,
        started: Instant::now(),
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
    let served = tonic::transport::Server::builder()
        .add_service(ObserverServer::new(svc))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            async move {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            },
        )
        .await;
    if let Some(path) = &args.ready_file {
        let _ = std::fs::remove_file(path);
    }
    served.context("serving")?;
    Ok(())
}
