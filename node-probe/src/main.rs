//! flows-node-probe: thin binary over the `flows_node_probe` library.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context;
use clap::Parser;
use flows_node_probe::{
    ifaces::IfaceSelector,
    probe::{ProbeConfig, run},
};

#[derive(Parser)]
#[command(name = "flows-node-probe", version, about = "flows per-node agent")]
struct Args {
    /// Name of this node in flow records.
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// `ip netns` name of the namespace holding the pod interfaces (the lab's nodes);
    /// default: the probe's own namespace (a real node, with hostNetwork).
    #[arg(long)]
    netns: Option<String>,
    /// Attach only to veths whose name starts with one of these (repeatable).
    #[arg(long = "iface-prefix")]
    iface_prefixes: Vec<String>,
    /// Never attach to these interfaces (repeatable).
    #[arg(long = "exclude-iface")]
    exclude_ifaces: Vec<String>,
    /// Address of the gRPC Observer server.
    #[arg(long, default_value = "127.0.0.1:4245")]
    listen: SocketAddr,
    /// Flows kept in memory (a power of two).
    #[arg(long, default_value_t = 4096)]
    ring_capacity: usize,
    /// Do not report kernel drops (skb:kfree_skb).
    #[arg(long)]
    no_kernel_drops: bool,
    /// Report kernel drops only in these network namespaces (repeatable; files such as
    /// /run/netns/NAME). Needed when several probes share one kernel, as in the lab.
    #[arg(long = "drop-netns")]
    drop_netns: Vec<PathBuf>,
    /// As --drop-netns, from a file of such paths (one per line), read again at every
    /// interface scan: for a host whose namespaces come and go (the lab's pods).
    #[arg(long)]
    drop_netns_file: Option<PathBuf>,
    /// Seconds between scans for new or removed pod interfaces.
    #[arg(long, default_value_t = 1.0)]
    iface_poll_secs: f64,
    /// Written with the listen address once the probe is attached and serving.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// The node's interfaces towards other nodes and the world (repeatable), where local
    /// pods' egress policy is decided, after service translation: `auto` (the devices
    /// of the default routes and every VXLAN or Geneve tunnel, found again as they
    /// come), interface names, or `none`. A named interface that is missing at start
    /// is an error.
    #[arg(long = "uplink-iface", default_value = "auto")]
    uplink_ifaces: Vec<String>,
    /// Directory of manifests (Namespaces, Pods with nodeName and podIPs,
    /// NetworkPolicies), watched for changes. Without it no policy is enforced.
    #[arg(long)]
    manifests: Option<PathBuf>,
    /// Address of the Prometheus /metrics endpoint (e.g. 0.0.0.0:9965); off by default.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Policy mode of namespaces without a flows.dev/policy-mode annotation.
    #[arg(long, default_value = "enforce", value_parser = ["enforce", "audit", "off"])]
    default_policy_mode: String,
    #[command(flatten)]
    tls: flows_tls::ServerTlsArgs,
    /// GetFlows streams served at once; more are refused with RESOURCE_EXHAUSTED. The
    /// relay holds one per follower (and one for its store writer).
    #[arg(long, default_value_t = 512)]
    max_streams: usize,
    /// bpffs directory (e.g. /sys/fs/bpf/flows) where the TC links are pinned: when the
    /// probe stops or dies its programs keep enforcing the policy they had, and the
    /// next probe takes every interface over atomically. Without it, links end with
    /// the process.
    #[arg(long, value_name = "DIR")]
    pin_dir: Option<PathBuf>,
    /// Remove everything pinned under --pin-dir (detaching those programs) and exit:
    /// for uninstalling the probe from a node.
    #[arg(long, requires = "pin_dir")]
    uninstall: bool,
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "unknown".into())
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
    if args.uninstall {
        let dir = args.pin_dir.clone().unwrap_or_default();
        let n = flows_node_probe::datapath::remove_pinned(&dir).context("uninstalling")?;
        tracing::info!(links = n, dir = %dir.display(), "pinned datapath removed");
        return Ok(());
    }
    if !(args.iface_poll_secs > 0.0 && args.iface_poll_secs <= 3600.0) {
        anyhow::bail!("--iface-poll-secs must be in (0, 3600]");
    }
    let cfg = ProbeConfig {
        node_name: args.node_name.unwrap_or_else(hostname),
        netns: args.netns,
        selector: IfaceSelector {
            prefixes: args.iface_prefixes,
            exclude: args.exclude_ifaces,
        },
        ring_capacity: args.ring_capacity,
        kernel_drops: !args.no_kernel_drops,
        drop_netns: args.drop_netns,
        drop_netns_file: args.drop_netns_file,
        iface_poll: Duration::from_secs_f64(args.iface_poll_secs),
        listen: args.listen,
        ready_file: args.ready_file,
        uplinks: args.uplink_ifaces.into_iter().filter(|u| u != flows_node_probe::ifaces::NONE).collect(),
        manifests: args.manifests,
        metrics_listen: args.metrics_listen,
        tls: args.tls.to_config(args.listen)?,
        max_streams: args.max_streams,
        pin_dir: args.pin_dir,
        default_mode: flows_policy::compile::Mode::parse(&args.default_policy_mode)
            .unwrap_or(flows_policy::compile::Mode::Enforce),
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("shutting down: detaching the datapath");
    };
    run(cfg, shutdown).await.context("node-probe failed")?;
    Ok(())
}
