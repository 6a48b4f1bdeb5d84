//! A node-probe per lab node: the lab's stand-in for the DaemonSet.
//!
//! Each probe runs detached (its own session), attaches in its node's namespace, reports
//! kernel drops of its node's namespaces only, listens on a free loopback port, and
//! writes that address to `<state dir>/probe-<node>.addr` once it is serving (the file
//! goes when the probe exits). `flows lab down` stops them with the other daemons.

use std::{
    fs::File,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use flows_lab::{
    components::{self, Component},
    state::{ApiRec, Daemon, State, add_daemon},
};

fn addr_file(dir: &Path, node: &str) -> PathBuf {
    dir.join(format!("probe-{node}.addr"))
}

/// A companion binary: $`env`, else next to this executable, else PATH.
fn sibling(name: &str, env: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        return PathBuf::from(p);
    }
    if let Ok(exe) = std::env::current_exe() {
        let s = exe.with_file_name(name);
        if s.exists() {
            return s;
        }
    }
    PathBuf::from(name)
}

/// The address a node's probe listens on: chosen once (a free loopback port), then kept,
/// so that a restarted probe is found where the relay expects it.
fn listen_address(dir: &Path, node: &str) -> anyhow::Result<String> {
    kept_address(dir.join(format!("probe-{node}.listen")))
}

/// A free loopback address, chosen once and kept in `path`.
fn kept_address(path: PathBuf) -> anyhow::Result<String> {
    if let Ok(a) = std::fs::read_to_string(&path) {
        if !a.trim().is_empty() {
            return Ok(a.trim().to_string());
        }
    }
    let addr = flows_lab::free_fixed_port().context("finding a free port")?;
    std::fs::write(&path, &addr).with_context(|| format!("writing {}", path.display()))?;
    Ok(addr)
}

/// The lab's TLS files, when it was started with `--tls`.
fn tls_file(dir: &Path, name: &str) -> Option<PathBuf> {
    let d = flows_lab::state::tls_dir(dir);
    d.join("ca.crt").exists().then(|| d.join(name))
}

/// Where a node's kube-sync writes the cluster its probe enforces.
fn kube_sync_dir(dir: &Path, node: &str) -> PathBuf {
    dir.join("kube-sync").join(node)
}

/// What a node's probe enforces: on a control plane, what its kube-sync reads from the
/// API with the node-probe's own service account (as the chart's sidecar does); else the
/// lab's own rendering of its manifests.
fn policy_source(dir: &Path, state: &State, node: &str) -> PathBuf {
    match &state.api {
        Some(_) => kube_sync_dir(dir, node),
        None => flows_lab::manifests::dir(dir),
    }
}

/// Starts a node's kube-sync with the node-probe's token, without waiting for it;
/// returns the file it writes and its log.
fn spawn_kube_sync(dir: &Path, api: &ApiRec, node: &str) -> anyhow::Result<(PathBuf, PathBuf)> {
    let out = kube_sync_dir(dir, node);
    let _ = std::fs::remove_dir_all(&out);
    let log_path = dir.join(format!("kube-sync-{node}.log"));
    let log = File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let exe = std::env::current_exe().context("finding the flows executable")?;
    let mut cmd = Command::new(&exe);
    cmd.arg("kube-sync")
        .arg("--out")
        .arg(&out)
        .env("KUBECONFIG", components::kubeconfig(api, Component::KubeSync))
        // Not the caller's cluster, whatever its environment says.
        .env_remove("KUBERNETES_SERVICE_HOST")
        .stdin(Stdio::null())
        .stdout(log.try_clone().context("log file")?)
        .stderr(log)
        .process_group(0);
    let child = cmd.spawn().with_context(|| format!("starting {} kube-sync", exe.display()))?;
    add_daemon(dir, Daemon { role: "kube-sync".into(), node: Some(node.into()), pid: child.id() })?;
    Ok((out.join(flows_k8s::export::FILE), log_path))
}

/// Waits for `file` to exist; the error carries `log`'s tail.
fn wait_for_file(what: &str, file: &Path, log: &Path, deadline: Instant) -> anyhow::Result<()> {
    while !file.exists() {
        if Instant::now() > deadline {
            let tail = std::fs::read_to_string(log).unwrap_or_default();
            bail!("{what} wrote nothing within its deadline; its log ({}):\n{tail}", log.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Starts one node's probe, without waiting for it; returns its ready file and log.
fn spawn_probe(dir: &Path, state: &State, node: &flows_lab::state::Node) -> anyhow::Result<(PathBuf, PathBuf)> {
    let bin = sibling("flows-node-probe", "FLOWS_NODE_PROBE");
    let manifests = policy_source(dir, state, &node.name);
    let ready = addr_file(dir, &node.name);
    let _ = std::fs::remove_file(&ready);
    let listen = listen_address(dir, &node.name)?;
    let log_path = dir.join(format!("probe-{}.log", node.name));
    let log = File::options()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let mut cmd = Command::new(&bin);
    cmd.args(["--node-name", &node.name, "--netns", &node.netns])
        // Every veth is a pod's but the uplink; the uplink and any tunnel between nodes
        // are found as on a node (`--uplink-iface auto`, the default).
        .args(["--listen", &listen])
        // As on a node: a probe stopped or killed leaves enforcement in force, and the
        // next one takes over.
        .arg("--pin-dir")
        .arg(flows_lab::state::pin_dir(&node.name))
        .arg("--manifests")
        .arg(&manifests)
        .arg("--ready-file")
        .arg(&ready)
        // Its node's namespaces, kept current by the lab's kubelet as pods come and go.
        .arg("--drop-netns-file")
        .arg(flows_lab::state::drop_netns_file(dir, &node.name));
    if let (Some(cert), Some(key), Some(ca)) =
        (tls_file(dir, "probe.crt"), tls_file(dir, "probe.key"), tls_file(dir, "ca.crt"))
    {
        cmd.arg("--tls-cert").arg(cert).arg("--tls-key").arg(key).arg("--tls-client-ca").arg(ca);
    }
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone().context("log file")?)
        .stderr(log)
        // Its own session: the probe outlives this command, like a DaemonSet pod.
        .process_group(0);
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    add_daemon(
        dir,
        Daemon {
            role: "node-probe".into(),
            node: Some(node.name.clone()),
            pid: child.id(),
        },
    )?;
    Ok((ready, log_path))
}

fn wait_ready(node: &str, ready: &Path, log: &Path, deadline: Instant) -> anyhow::Result<String> {
    loop {
        if let Ok(a) = std::fs::read_to_string(ready) {
            if !a.is_empty() {
                return Ok(a);
            }
        }
        if Instant::now() > deadline {
            let tail = std::fs::read_to_string(log).unwrap_or_default();
            bail!("node-probe for {node} did not start; its log ({}):\n{tail}", log.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts a node-probe on every node and waits until all serve; returns their addresses.
pub fn start(dir: &Path, state: &State) -> anyhow::Result<Vec<String>> {
    // What the probes enforce: the lab's namespaces and pods, and applied policies.
    crate::lab::policy::write_cluster(dir, state)?;
    if let Some(api) = &state.api {
        // Each probe starts once its kube-sync has the whole cluster, as the chart's
        // probe attaches nothing before its sidecar's first write.
        let deadline = Instant::now() + Duration::from_secs(30);
        let syncs = state.nodes.iter().map(|n| spawn_kube_sync(dir, api, &n.name)).collect::<anyhow::Result<Vec<_>>>()?;
        for (node, (file, log)) in state.nodes.iter().zip(syncs) {
            wait_for_file(&format!("kube-sync of {}", node.name), &file, &log, deadline)?;
        }
    }
    let mut waiting = Vec::new();
    for node in &state.nodes {
        let (ready, log) = spawn_probe(dir, state, node)?;
        waiting.push((node.name.clone(), ready, log));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    waiting
        .iter()
        .map(|(node, ready, log)| wait_ready(node, ready, log, deadline))
        .collect()
}

/// Starts the probe of one node (after a stop or a crash) at its usual address.
pub fn start_one(dir: &Path, node: &str) -> anyhow::Result<String> {
    let state = State::load(dir).context("no lab is up")?;
    let n = state
        .node(node)
        .with_context(|| format!("no node {node:?} in the lab"))?
        .clone();
    if state
        .daemons
        .iter()
        .any(|d| d.role == "node-probe" && d.node.as_deref() == Some(node) && alive(d.pid))
    {
        bail!("the node-probe of {node} is already running");
    }
    for d in state.daemons.iter().filter(|d| d.role == "node-probe" && d.node.as_deref() == Some(node)) {
        flows_lab::state::remove_daemon(dir, d.pid)?;
    }
    let (ready, log) = spawn_probe(dir, &state, &n)?;
    wait_ready(node, &ready, &log, Instant::now() + Duration::from_secs(30))
}

/// Stops the probe of one node (SIGTERM: it detaches its programs and exits).
pub fn stop_one(dir: &Path, node: &str) -> anyhow::Result<()> {
    let state = State::load(dir).context("no lab is up")?;
    let probes: Vec<_> = state
        .daemons
        .iter()
        .filter(|d| d.role == "node-probe" && d.node.as_deref() == Some(node))
        .collect();
    if probes.is_empty() {
        bail!("no node-probe runs on {node:?}");
    }
    stop_daemons(dir, &probes, &format!("the node-probe of {node}"))
}

/// Stops the lab's relay (SIGTERM: it writes what it holds to the store and exits).
pub fn stop_relay(dir: &Path) -> anyhow::Result<()> {
    let state = State::load(dir).context("no lab is up")?;
    let relays: Vec<_> = state.daemons.iter().filter(|d| d.role == "relay").collect();
    if relays.is_empty() {
        bail!("no relay runs in the lab");
    }
    stop_daemons(dir, &relays, "the relay")
}

/// Starts the lab's relay again (after a stop or a crash) at its usual address.
pub fn restart_relay(dir: &Path) -> anyhow::Result<String> {
    let state = State::load(dir).context("no lab is up")?;
    if state.daemons.iter().any(|d| d.role == "relay" && alive(d.pid)) {
        bail!("the relay is already running");
    }
    for d in state.daemons.iter().filter(|d| d.role == "relay") {
        flows_lab::state::remove_daemon(dir, d.pid)?;
    }
    let addrs = state
        .nodes
        .iter()
        .map(|n| listen_address(dir, &n.name))
        .collect::<anyhow::Result<Vec<_>>>()?;
    start_relay(dir, &state, &addrs)
}

fn stop_daemons(dir: &Path, daemons: &[&Daemon], what: &str) -> anyhow::Result<()> {
    for d in daemons {
        let pid = nix::unistd::Pid::from_raw(d.pid as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while alive(d.pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if alive(d.pid) {
            bail!("{what} (pid {}) did not stop within 10 s", d.pid);
        }
        flows_lab::state::remove_daemon(dir, d.pid)?;
    }
    Ok(())
}

/// True while the process exists and is not a zombie.
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(s) => s.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

const RELAY_STORE: &str = "relay.store";

/// Keeps a ClickHouse server address for the lab's relay (every start uses it), or
/// with `None` the embedded store.
pub fn set_relay_store(dir: &Path, url: Option<&str>) -> anyhow::Result<()> {
    let p = dir.join(RELAY_STORE);
    match url {
        Some(url) => std::fs::write(&p, url).with_context(|| format!("writing {}", p.display())),
        None => match std::fs::remove_file(&p) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(anyhow::Error::new(e).context(format!("removing {}", p.display())))
            }
            _ => Ok(()),
        },
    }
}

fn relay_store(dir: &Path) -> anyhow::Result<Option<String>> {
    let p = dir.join(RELAY_STORE);
    match std::fs::read_to_string(&p) {
        Ok(s) => Ok(Some(s.trim().to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(anyhow::Error::new(e).context(format!("reading {}", p.display()))),
    }
}

/// Starts a relay over the lab's node-probes (`addrs`, in node order); returns its address.
pub fn start_relay(dir: &Path, state: &State, addrs: &[String]) -> anyhow::Result<String> {
    let bin = sibling("flows-relay", "FLOWS_RELAY");
    let ready = dir.join("relay.addr");
    let _ = std::fs::remove_file(&ready);
    let log_path = dir.join("relay.log");
    let log = File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let mut cmd = Command::new(&bin);
    for (node, addr) in state.nodes.iter().zip(addrs) {
        cmd.arg("--peer").arg(format!("{}={addr}", node.name));
    }
    // Addresses are named from the API with the relay's own token, as on a cluster, or
    // from the lab's cluster manifests (read again as they change); every flow is kept
    // in the embedded store, in the state directory, unless the lab was given a
    // ClickHouse server.
    match &state.api {
        Some(api) => {
            cmd.arg("--kubernetes")
                .env("KUBECONFIG", components::kubeconfig(api, Component::Relay))
                .env_remove("KUBERNETES_SERVICE_HOST");
        }
        None => {
            cmd.arg("--manifests").arg(flows_lab::manifests::dir(dir));
        }
    }
    match relay_store(dir)? {
        Some(url) => cmd.arg("--store").arg(url),
        None => cmd.arg("--store").arg(format!("embedded:{}", dir.join("store").display())),
    };
    if let (Some(cert), Some(key), Some(ca)) =
        (tls_file(dir, "relay.crt"), tls_file(dir, "relay.key"), tls_file(dir, "ca.crt"))
    {
        // The relay's certificate serves both ways: to clients and towards the probes.
        cmd.arg("--tls-cert").arg(&cert).arg("--tls-key").arg(&key).arg("--tls-client-ca").arg(&ca);
        cmd.arg("--peer-tls-ca").arg(&ca).arg("--peer-tls-cert").arg(&cert).arg("--peer-tls-key").arg(&key);
        cmd.args(["--peer-tls-server-name", flows_lab::state::LAB_PROBE_NAME]);
    }
    // A kept address, like the probes': a restarted relay is where its clients were.
    let listen = kept_address(dir.join("relay.listen"))?;
    cmd.args(["--listen", &listen])
        .arg("--ready-file")
        .arg(&ready)
        .stdin(Stdio::null())
        .stdout(log.try_clone().context("log file")?)
        .stderr(log)
        .process_group(0);
    let child = cmd.spawn().with_context(|| format!("starting {}", bin.display()))?;
    add_daemon(
        dir,
        Daemon {
            role: "relay".into(),
            node: None,
            pid: child.id(),
        },
    )?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(a) = std::fs::read_to_string(&ready) {
            if !a.is_empty() {
                return Ok(a);
            }
        }
        if Instant::now() > deadline {
            let tail = std::fs::read_to_string(&log_path).unwrap_or_default();
            bail!("the relay did not start; its log ({}):\n{tail}", log_path.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The lab relay's address, if one runs.
pub fn relay_address(dir: &Path) -> Option<String> {
    std::fs::read_to_string(dir.join("relay.addr"))
        .ok()
        .filter(|a| !a.is_empty())
}

/// Addresses of the lab's running node-probes.
pub fn addresses(dir: &Path) -> Vec<String> {
    let Ok(state) = State::load(dir) else {
        return Vec::new();
    };
    state
        .nodes
        .iter()
        .filter_map(|n| std::fs::read_to_string(addr_file(dir, &n.name)).ok())
        .filter(|a| !a.is_empty())
        .collect()
}
