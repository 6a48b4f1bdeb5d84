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
    let peers = args
        .peers
        .iter()
        .map(|p| peers::spawn(p, peers::Backoff::default()))
        .collect();
    let svc = RelayService {
        peers,
        sort_window: Duration::from_millis(args.sort_window_ms),
        sort_buffer: args.sort_buffer,
        started: Instant::now(),
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tracing::info!(listen = %args.listen, "relay serving");
    tonic::transport::Server::builder()
        .add_service(ObserverServer::new(svc))
        .serve_with_shutdown(args.listen, async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        })
        .await
        .context("serving")?;
    Ok(())
}
