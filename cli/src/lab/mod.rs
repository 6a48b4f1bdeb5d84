//! `flows lab ...`: the lab's command line (thin: the work is in flows-lab).

pub mod policy;
pub mod probes;

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use flows_lab::drive::{self, DriveOptions, Outcome, Report, Scenario};
use flows_lab::{AgentLaunch, State, UpOptions};

#[derive(clap::Args, Clone, Debug)]
pub struct StateDir {
    /// Where the lab keeps its state record (state.json) and the agent's log.
    #[arg(
        long = "state-dir",
        env = "FLOWS_LAB_DIR",
        global = true,
        default_value = "/run/flows-lab"
    )]
    pub state_dir: PathBuf,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    Table,
    Json,
}

#[derive(clap::Subcommand, Debug)]
pub enum LabCommand {
    /// Build a lab from Kubernetes YAML files or directories (Namespace, Pod, Deployment, Service).
    Up {
        /// YAML files, or directories of *.yaml / *.yml.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Number of nodes.
        #[arg(long, default_value_t = 2)]
        nodes: usize,
        /// Also start a node-probe per node (flows-node-probe, next to this binary or on PATH).
        #[arg(long)]
        probes: bool,
        /// Mutual TLS between the probes, the relay and `flows` (a CA and certificates
        /// made in the state directory's tls/, which `flows` commands then use).
        #[arg(long, requires = "probes")]
        tls: bool,
        /// Where the relay keeps flows: `embedded` (ClickHouse's engine inside the relay,
        /// in the state directory) or a ClickHouse server's HTTP address
        /// (http://host:8123), also after `flows lab relay start`.
        #[arg(long, requires = "probes", default_value = "embedded")]
        store: String,
        /// Run the cluster on a real Kubernetes control plane (etcd, kube-apiserver,
        /// kube-controller-manager, kube-scheduler): the cluster is written through the
        /// API, the controllers and the scheduler make and place the pods, the lab is
        /// their kubelet, and flows' components use the API with their own accounts.
        /// The default when the binaries are there; with this flag, their absence is an
        /// error.
        #[arg(long, conflicts_with = "no_apiserver")]
        apiserver: bool,
        /// No control plane: the cluster comes from the manifests alone (the lab's own
        /// rendering of them is what the probes and the relay read).
        #[arg(long)]
        no_apiserver: bool,
        /// Where the control plane's binaries are (scripts/setup.sh unpacks them).
        #[arg(long, env = "FLOWS_K8S_BIN", default_value = "/opt/flows-tools/k8s")]
        k8s_bin: PathBuf,
        /// How pods are wired to their nodes, as that CNI does: `bridge` (a bridge per
        /// node, routes between nodes), `flannel-vxlan` (the `bridge` CNI plugin on
        /// cni0, VXLAN between nodes), `kindnet` (the `ptp` plugin, routed), `calico`
        /// (cali* veths, routed /32s, proxy ARP) or `calico-vxlan` (the same over VXLAN).
        #[arg(long, default_value = "bridge", value_parser = parse_cni)]
        cni: flows_lab::cni::CniMode,
        /// Masquerade pods' traffic to the world behind the node's address (`on`, `off`);
        /// default: as that CNI does (on for all but `bridge`).
        #[arg(long, value_parser = ["on", "off"])]
        masquerade: Option<String>,
        /// Translate services with the real kube-proxy on every node, writing `nftables`
        /// or `iptables` (iptables-nft) rules, instead of the lab's own nftables rules.
        /// Needs the control plane.
        #[arg(long, value_parser = parse_kube_proxy, conflicts_with = "no_apiserver")]
        kube_proxy: Option<flows_lab::kube_proxy::ProxyMode>,
        #[command(flatten)]
        dir: StateDir,
    },
    /// Remove the lab: daemons, namespaces, links, state. Safe to run any time.
    Down {
        #[command(flatten)]
        dir: StateDir,
    },
    /// Show the lab: nodes, pods, services, daemons.
    Status {
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        output: Output,
        #[command(flatten)]
        dir: StateDir,
    },
    /// Run a command inside a pod (ns/pod), a node (node-1) or the world host.
    Exec {
        /// ns/pod, node-N or world.
        target: String,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true)]
        command: Vec<OsString>,
        #[command(flatten)]
        dir: StateDir,
    },
    /// Generate traffic from a scenario file and report every attempt.
    Drive {
        scenario: PathBuf,
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        output: Output,
        /// Attempts of one connection in flight at once.
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
        #[command(flatten)]
        dir: StateDir,
    },
    /// NetworkPolicies and enforcement modes (watched by the lab's node-probes).
    Policy {
        #[command(subcommand)]
        command: crate::lab::policy::LabPolicyCommand,
        #[command(flatten)]
        dir: StateDir,
    },
    /// Stop or start one node's node-probe (as a DaemonSet pod would be lost and
    /// rescheduled); it comes back on the same address, so the relay finds it again.
    Probe {
        #[command(subcommand)]
        action: ProbeAction,
        #[command(flatten)]
        dir: StateDir,
    },
    /// Stop or start the lab's relay (as its Deployment's pod would be replaced); it
    /// comes back on the same address, so followers reconnect.
    Relay {
        #[command(subcommand)]
        action: RelayAction,
        #[command(flatten)]
        dir: StateDir,
    },
    /// Stop or start the lab's API server (an outage of the control plane: the lab,
    /// the probes and the relay keep running on what they last read).
    Apiserver {
        #[command(subcommand)]
        action: RelayAction,
        #[arg(long, env = "FLOWS_K8S_BIN", default_value = "/opt/flows-tools/k8s")]
        k8s_bin: PathBuf,
        #[command(flatten)]
        dir: StateDir,
    },
    /// The lab's listener process (started by `up`).
    #[command(hide = true)]
    Agent {
        #[arg(long)]
        state: PathBuf,
    },
}

#[derive(clap::Subcommand, Debug)]
pub enum ProbeAction {
    /// Start the node's probe and wait until it serves.
    Start { node: String },
    /// Stop the node's probe (SIGTERM: it detaches and exits).
    Stop { node: String },
}

#[derive(clap::Subcommand, Debug)]
pub enum RelayAction {
    /// Start it and wait until it serves.
    Start,
    /// Stop it (SIGTERM).
    Stop,
}

pub fn run(cmd: LabCommand) -> anyhow::Result<()> {
    match cmd {
        LabCommand::Up {
            paths,
            nodes,
            probes,
            tls,
            store,
            apiserver,
            no_apiserver,
            k8s_bin,
            cni,
            masquerade,
            kube_proxy,
            dir,
        } => {
            let mut opts = UpOptions::new(paths, &dir.state_dir);
            opts.nodes = nodes;
            opts.apiserver = control_plane(apiserver, no_apiserver, k8s_bin);
            opts.cni = cni;
            opts.masquerade = masquerade.map(|m| m == "on");
            opts.kube_proxy = kube_proxy;
            up(opts, probes, tls, &store)
        }
        LabCommand::Down { dir } => down(&dir.state_dir),
        LabCommand::Policy { command, dir } => crate::lab::policy::run(&dir.state_dir, command),
        LabCommand::Status { output, dir } => status(&dir.state_dir, output),
        LabCommand::Exec {
            target,
            command,
            dir,
        } => exec(&dir.state_dir, &target, command),
        LabCommand::Drive {
            scenario,
            output,
            concurrency,
            dir,
        } => drive(&dir.state_dir, &scenario, output, concurrency),
        LabCommand::Probe { action, dir } => match action {
            ProbeAction::Start { node } => {
                let addr = crate::lab::probes::start_one(&dir.state_dir, &node)?;
                println!("node-probe of {node} serving on {addr}");
                Ok(())
            }
            ProbeAction::Stop { node } => {
                crate::lab::probes::stop_one(&dir.state_dir, &node)?;
                println!("node-probe of {node} stopped");
                Ok(())
            }
        },
        LabCommand::Relay { action, dir } => match action {
            RelayAction::Start => {
                let addr = crate::lab::probes::restart_relay(&dir.state_dir)?;
                println!("relay serving on {addr}");
                Ok(())
            }
            RelayAction::Stop => {
                crate::lab::probes::stop_relay(&dir.state_dir)?;
                println!("relay stopped");
                Ok(())
            }
        },
        LabCommand::Apiserver { action, k8s_bin, dir } => match action {
            RelayAction::Start => {
                let start = std::time::Instant::now();
                flows_lab::control_plane::start_apiserver(&dir.state_dir, &k8s_bin)?;
                println!("API server ready ({:.1} s)", start.elapsed().as_secs_f64());
                Ok(())
            }
            RelayAction::Stop => {
                flows_lab::control_plane::stop_apiserver(&dir.state_dir)?;
                println!("API server stopped");
                Ok(())
            }
        },
        LabCommand::Agent { state } => {
            let code = flows_lab::agent::main(&state);
            std::process::exit(code)
        }
    }
}

/// Whether `up` runs a control plane, and from where: asked for (its binaries must be
/// there), refused, or by default when its binaries are there (said when they are not).
fn control_plane(asked: bool, refused: bool, bin: PathBuf) -> Option<PathBuf> {
    if asked {
        return Some(bin);
    }
    if refused {
        return None;
    }
    let missing = flows_lab::control_plane::missing(&bin);
    if missing.is_empty() {
        return Some(bin);
    }
    eprintln!(
        "note: no Kubernetes control plane (missing {}; scripts/setup.sh unpacks them): the cluster comes from the manifests alone",
        missing.join(", ")
    );
    None
}

fn parse_cni(s: &str) -> Result<flows_lab::cni::CniMode, String> {
    flows_lab::cni::CniMode::parse(s)
}

fn parse_kube_proxy(s: &str) -> Result<flows_lab::kube_proxy::ProxyMode, String> {
    flows_lab::kube_proxy::ProxyMode::parse(s)
}

fn up(mut opts: UpOptions, probes: bool, tls: bool, store: &str) -> anyhow::Result<()> {
    if store != "embedded" && !(store.starts_with("http://") || store.starts_with("https://")) {
        bail!("--store {store}: expected `embedded` or a ClickHouse server's http(s):// address");
    }
    let exe = std::env::current_exe().context("finding the flows executable")?;
    let dir = &opts.state_dir.clone();
    opts.agent = AgentLaunch::Command {
        program: exe,
        args: vec![
            "lab".into(),
            "agent".into(),
            "--state".into(),
            dir.as_os_str().to_owned(),
        ],
    };
    let mut state = flows_lab::up(&opts)?;
    crate::lab::policy::reset(dir)?;
    if tls {
        let spec = flows_tls::certs::CertSpec {
            probe_names: vec![flows_lab::state::LAB_PROBE_NAME.into()],
            relay_names: vec![flows_lab::state::LAB_RELAY_NAME.into()],
            client_name: "flows-lab-client".into(),
            days: 30,
        };
        let tls_dir = flows_lab::state::tls_dir(dir);
        if let Err(e) = flows_tls::certs::create(&tls_dir, &spec, true) {
            let _ = down(dir);
            return Err(anyhow::Error::new(e).context("creating the lab's certificates (the lab was taken down)"));
        }
        println!("mutual TLS: certificates in {}", tls_dir.display());
    }
    if probes {
        crate::lab::probes::set_relay_store(dir, (store != "embedded").then_some(store))?;
        // All or nothing: a lab whose probes did not start is taken down again.
        match crate::lab::probes::start(dir, &state) {
            Ok(addrs) => {
                println!("node-probes serving on {}", addrs.join(", "));
                match crate::lab::probes::start_relay(dir, &state, &addrs) {
                    Ok(relay) => println!("relay serving on {relay}"),
                    Err(e) => {
                        if let Err(e2) = flows_lab::down(dir) {
                            eprintln!("taking the lab down after the failure failed too: {e2}");
                        }
                        return Err(e.context("starting the relay (the lab was taken down)"));
                    }
                }
            }
            Err(e) => {
                if let Err(e2) = flows_lab::down(dir) {
                    eprintln!("taking the lab down after the failure failed too: {e2}");
                }
                return Err(e.context("starting the node-probes (the lab was taken down)"));
            }
        }
        state = load(dir)?;
    }
    print_state(&state);
    println!(
        "\nlab is up (state: {}); `flows lab down` removes it",
        dir.join("state.json").display()
    );
    Ok(())
}

fn down(dir: &Path) -> anyhow::Result<()> {
    let report = flows_lab::down(dir)?;
    crate::lab::policy::reset(dir)?;
    let t = &report.teardown;
    if report.stopped.is_empty()
        && t.netns_removed.is_empty()
        && t.links_removed.is_empty()
        && !report.state_removed
    {
        println!("no lab was up; nothing to do");
        return Ok(());
    }
    println!(
        "lab is down: stopped {} daemon(s), removed {} netns, {} link(s), {} nft table(s){}",
        report.stopped.len(),
        t.netns_removed.len(),
        t.links_removed.len(),
        t.nft_tables_removed.len(),
        if report.state_removed {
            ", state file"
        } else {
            ""
        }
    );
    Ok(())
}

fn load(dir: &Path) -> anyhow::Result<State> {
    match State::load(dir) {
        Err(flows_lab::LabError::NoState { path }) => {
            bail!(
                "no lab is up (no {}); start one with `flows lab up <yaml>...`",
                path.display()
            )
        }
        other => Ok(other?),
    }
}

fn status(dir: &Path, output: Output) -> anyhow::Result<()> {
    let state = load(dir)?;
    match output {
        Output::Json => {
            let mut value = serde_json::to_value(&state)?;
            let probes: Vec<serde_json::Value> = crate::lab::probes::addresses(dir)
                .into_iter()
                .map(|addr| serde_json::json!({ "addr": addr.trim() }))
                .collect();
            if let Some(obj) = value.as_object_mut() {
                obj.insert("probes".into(), probes.into());
            }
            if let Some(daemons) = value.get_mut("daemons").and_then(|d| d.as_array_mut()) {
                for d in daemons {
                    let pid = d.get("pid").and_then(|p| p.as_u64()).unwrap_or(0) as u32;
                    if let Some(obj) = d.as_object_mut() {
                        obj.insert("alive".into(), flows_lab::process_alive(pid).into());
                    }
                }
            }
            println!("{}", serde_json::to_string_pretty(&value)?);
        }
        Output::Table => print_state(&state),
    }
    Ok(())
}

/// Prints rows as left-aligned columns.
fn table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(header.to_vec());
    for r in &rows {
        line(r.iter().map(String::as_str).collect());
    }
}

fn print_state(state: &State) {
    match &state.api {
        Some(api) => println!(
            "KUBERNETES\nAPI server {}\nkubectl --kubeconfig {} get pods -A -o wide\n",
            api.url,
            api.kubeconfig.display()
        ),
        None => println!("KUBERNETES\nnone: the cluster comes from the manifests alone (`flows lab up --apiserver` runs a control plane)\n"),
    }
    let services = match state.kube_proxy {
        Some(mode) => format!("kube-proxy ({}) on every node", mode.name()),
        None => "the lab's nftables rules".to_string(),
    };
    println!(
        "WIRING\n--cni {}, masquerade to the world {}, services translated by {services}\n",
        state.cni,
        if state.masquerade { "on" } else { "off" }
    );
    println!("NODES");
    table(
        &["NAME", "NETNS", "UPLINK", "POD CIDRS"],
        state
            .nodes
            .iter()
            .map(|n| {
                vec![
                    n.name.clone(),
                    n.netns.clone(),
                    format!("{} {}", n.uplink_ipv4, n.uplink_ipv6),
                    format!("{} {}", n.pod_cidr_v4, n.pod_cidr_v6),
                ]
            })
            .collect(),
    );
    println!("\nPODS");
    table(
        &["POD", "NODE", "IPV4", "IPV6", "PORTS", "WORKLOAD"],
        state
            .pods
            .iter()
            .map(|p| {
                let ports: Vec<String> = p
                    .ports
                    .iter()
                    .map(|pt| match &pt.name {
                        Some(n) => format!("{n}:{}/{}", pt.port, pt.protocol),
                        None => format!("{}/{}", pt.port, pt.protocol),
                    })
                    .collect();
                vec![
                    format!("{}/{}", p.namespace, p.name),
                    p.node.clone(),
                    p.ipv4.to_string(),
                    p.ipv6.to_string(),
                    if ports.is_empty() {
                        "-".into()
                    } else {
                        ports.join(",")
                    },
                    p.workload
                        .as_ref()
                        .map(|w| format!("{}/{}", w.kind, w.name))
                        .unwrap_or_else(|| "-".into()),
                ]
            })
            .collect(),
    );
    println!("\nSERVICES");
    table(
        &["SERVICE", "CLUSTER-IPS", "PORTS", "ENDPOINTS"],
        state
            .services
            .iter()
            .map(|s| {
                let ports: Vec<String> = s
                    .ports
                    .iter()
                    .map(|p| format!("{}->{}/{}", p.port, p.target_port, p.protocol))
                    .collect();
                let eps: usize = flows_lab::endpoints(state, s)
                    .iter()
                    .map(|e| e.endpoints.len())
                    .sum();
                vec![
                    format!("{}/{}", s.namespace, s.name),
                    format!("{} {}", s.cluster_ipv4, s.cluster_ipv6),
                    ports.join(","),
                    eps.to_string(),
                ]
            })
            .collect(),
    );
    println!(
        "\nWORLD  {} {} (netns {})",
        state.world.ipv4, state.world.ipv6, state.world.netns
    );
    println!("\nDAEMONS");
    table(
        &["ROLE", "NODE", "PID", "STATUS"],
        state
            .daemons
            .iter()
            .map(|d| {
                vec![
                    d.role.clone(),
                    d.node.clone().unwrap_or_else(|| "-".into()),
                    d.pid.to_string(),
                    if flows_lab::process_alive(d.pid) {
                        "running"
                    } else {
                        "dead"
                    }
                    .into(),
                ]
            })
            .collect(),
    );
}

fn exec(dir: &Path, target: &str, command: Vec<OsString>) -> anyhow::Result<()> {
    let state = load(dir)?;
    let netns = flows_lab::resolve_netns(&state, target)?;
    if !flows_lab::netns::netns_exists(&netns) {
        bail!("netns {netns} of {target} does not exist: is the lab up?");
    }
    // Replaces this process: the command's exit code (and signals, tty) pass straight through.
    let err = std::process::Command::new("ip")
        .args(["netns", "exec"])
        .arg(&netns)
        .args(&command)
        .exec();
    Err(err).context("running `ip netns exec`")
}

fn drive(dir: &Path, scenario: &Path, output: Output, concurrency: usize) -> anyhow::Result<()> {
    let state = load(dir)?;
    let scenario = Scenario::load(scenario)?;
    let report = drive::run(&state, &scenario, &DriveOptions { concurrency })?;
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Output::Table => print_report(&report),
    }
    if !report.expectations_met {
        let missed: Vec<&str> = report
            .connections
            .iter()
            .filter(|c| c.met_expectation == Some(false))
            .map(|c| c.name.as_str())
            .collect();
        bail!(
            "{} connection(s) did not meet their expectation: {}",
            missed.len(),
            missed.join(", ")
        );
    }
    Ok(())
}

fn print_report(report: &Report) {
    table(
        &[
            "CONNECTION",
            "#",
            "FROM",
            "TO",
            "PROTO",
            "SOURCE",
            "DESTINATION",
            "RESULT",
            "TIME",
        ],
        report
            .attempts
            .iter()
            .map(|a| {
                let src = match (a.src_ip, a.src_port) {
                    (Some(ip), Some(port)) => sockaddr(ip, port),
                    _ => "-".into(),
                };
                let result = match (a.outcome, &a.error, &a.reply) {
                    (Outcome::Success, _, Some(r)) => format!("ok ({r})"),
                    (Outcome::Success, _, None) => "ok".into(),
                    (Outcome::Failure, Some(e), _) => format!("FAILED: {e}"),
                    (Outcome::Failure, None, _) => "FAILED".into(),
                };
                vec![
                    a.connection.clone(),
                    a.index.to_string(),
                    a.from.clone(),
                    a.to_resolved.clone(),
                    format!("{}/{}", a.protocol, a.family),
                    src,
                    sockaddr(a.dst_ip, a.dst_port),
                    result,
                    format!("{:.1}ms", a.duration_us as f64 / 1000.0),
                ]
            })
            .collect(),
    );
    println!();
    table(
        &["CONNECTION", "ATTEMPTED", "OK", "FAILED", "EXPECT", "MET"],
        report
            .connections
            .iter()
            .map(|c| {
                vec![
                    c.name.clone(),
                    c.attempted.to_string(),
                    c.succeeded.to_string(),
                    c.failed.to_string(),
                    c.expect
                        .map(|e| format!("{e:?}").to_lowercase())
                        .unwrap_or_else(|| "-".into()),
                    match c.met_expectation {
                        Some(true) => "yes".into(),
                        Some(false) => "NO".into(),
                        None => "-".into(),
                    },
                ]
            })
            .collect(),
    );
    println!(
        "\n{} attempted, {} succeeded, {} failed",
        report.attempted, report.succeeded, report.failed
    );
}

fn sockaddr(ip: std::net::IpAddr, port: u16) -> String {
    match ip {
        std::net::IpAddr::V4(_) => format!("{ip}:{port}"),
        std::net::IpAddr::V6(_) => format!("[{ip}]:{port}"),
    }
}
