//! `flows kube-sync`: the node-probe's policy source on a cluster (flows-k8s's export),
//! until SIGTERM.

use std::{path::PathBuf, time::Duration};

use anyhow::Context;

#[derive(clap::Args)]
pub struct KubeSyncArgs {
    /// Directory to keep cluster.yaml in (the node-probe's --manifests).
    #[arg(long)]
    out: PathBuf,
    /// The Kubernetes API server at this URL, with no credentials (`kubectl proxy`);
    /// default: the in-cluster service account, else the kubeconfig.
    #[arg(long, value_name = "URL")]
    kubernetes_api: Option<String>,
    /// Changes within this many milliseconds are written together.
    #[arg(long, default_value_t = 500)]
    debounce_ms: u64,
}

pub async fn run(args: KubeSyncArgs) -> anyhow::Result<()> {
    let client = match &args.kubernetes_api {
        Some(url) => flows_k8s::watch::client_for(url)?,
        None => flows_k8s::watch::client().await?,
    };
    let mut progress = flows_k8s::export::start(client, args.out.clone(), Duration::from_millis(args.debounce_ms));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).context("SIGTERM handler")?;
    let mut written = 0;
    loop {
        tokio::select! {
            _ = term.recv() => return Ok(()),
            _ = tokio::signal::ctrl_c() => return Ok(()),
            r = progress.changed() => {
                if r.is_err() {
                    anyhow::bail!("the cluster watchers stopped");
                }
                let p = *progress.borrow();
                if p.writes > written {
                    written = p.writes;
                    tracing::info!(writes = p.writes, dir = %args.out.display(), "cluster written for the node-probe");
                }
            }
        }
    }
}
