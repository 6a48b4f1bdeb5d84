//! `flows`: the command line of flows. Thin: each subcommand calls into a library crate.

mod advice;
mod audit;
mod certs;
mod connect;
mod kubesync;
mod filters;
mod lab;
mod manifests;
mod observe;
mod policy;
mod printer;
mod time;
mod tui;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "flows", version, about = "Traffic observability for Kubernetes")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Mutual TLS towards the relay or node-probe (global: every subcommand).
    #[command(flatten)]
    tls: flows_tls::ClientTlsArgs,
}

#[derive(Subcommand)]
enum Command {
    /// A cluster on one machine, built from Kubernetes YAML (network namespaces).
    #[command(subcommand)]
    Lab(lab::LabCommand),
    /// Print flows from a node-probe or the relay.
    Observe(observe::ObserveArgs),
    /// Denied connection attempts over a time range, grouped by workload pair and port
    /// (from the relay's store).
    Audit(audit::AuditArgs),
    /// A live dashboard: flows, verdicts, top denied pairs, namespaces, talkers.
    Tui(tui::TuiArgs),
    /// NetworkPolicy tools: offline evaluation, suggestions from history, what-if checks.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
    /// Certificates for mutual TLS between node-probes, the relay and clients.
    #[command(subcommand)]
    Certs(certs::CertsCommand),
    /// Keep a directory of manifests (Namespaces, Pods, NetworkPolicies) in step with
    /// the cluster: the node-probe's policy source (its --manifests), run beside it.
    KubeSync(kubesync::KubeSyncArgs),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            // The Kubernetes client logs every refused request, handled or not; what is not
            // handled comes back as an error and is said once, where it is handled.
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,kube_client::client::builder=off,kube_runtime::watcher=error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    // `--not` is positional (it negates the flag after it), which clap cannot express:
    // split those pairs out first.
    let (argv, not) = filters::split_not(std::env::args_os().collect())?;
    let cli = Cli::parse_from(argv);
    connect::set_flags(cli.tls);
    match cli.command {
        Command::Certs(cmd) => certs::run(cmd),
        Command::KubeSync(args) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?
            .block_on(kubesync::run(args)),
        Command::Lab(cmd) => lab::run(cmd),
        Command::Policy(cmd) => policy::run(cmd),
        Command::Tui(args) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?
            .block_on(tui::run(args)),
        Command::Audit(mut args) => {
            args.not = not;
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?
                .block_on(audit::run(args))
        }
        Command::Observe(mut args) => {
            args.not = not;
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?
                .block_on(observe::run(args))
        }
    }
}
