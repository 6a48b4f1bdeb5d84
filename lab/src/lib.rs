//! flows-lab: a whole Kubernetes cluster on one machine, built from ordinary Kubernetes YAML.
//! Nodes, pods, the world outside and the underlay between nodes are network namespaces;
//! services are nftables DNAT rules (kube-proxy style) in every node; one agent process holds
//! every pod's listeners and the cluster DNS. It is the project's demo, test bed and
//! benchmark bed, so `down` removes everything it made, with or without a state file.
//!
//! - [`up`] / [`down`]: build and remove a lab; the result is recorded in [`state::State`].
//! - [`drive::run`]: generate traffic from a scenario and report every 5-tuple.
//! - [`testing::LabGuard`]: a lab for a test, serialized across test binaries.

pub mod agent;
pub mod cni;
pub mod kube_proxy;
pub mod cluster_api;
pub mod components;
pub mod control_plane;
mod daemon;
pub mod dns;
pub mod drive;
pub mod manifests;
pub mod error;
mod kubelet;
pub mod net;
pub mod netns;
pub mod plan;
pub mod proxy;
pub mod spec;
pub mod state;
pub mod testing;
pub mod wiring;
mod runtime;
mod time;

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use agent::AgentLaunch;
pub use error::LabError;
pub use net::Teardown;
pub use plan::{Endpoint, PortEndpoints, endpoints};
pub use state::{Daemon, State};

/// Held by `up` and `down` for their duration so two of them never interleave (whatever
/// their state dirs: the netns names are global).
const BUILD_LOCK: &str = "/run/flows-lab.build.lock";

#[derive(Clone, Debug)]
pub struct UpOptions {
    /// YAML files and directories.
    pub paths: Vec<PathBuf>,
    pub nodes: usize,
    pub state_dir: PathBuf,
    pub agent: AgentLaunch,
    /// How long to wait for the agent's listeners; `None`: 30 s plus 100 ms per pod.
    pub ready_timeout: Option<Duration>,
    /// Run on a real Kubernetes control plane, from the binaries in this directory
    /// ([`control_plane::bin_dir`]); `None`: the cluster comes from the manifests alone.
    pub apiserver: Option<PathBuf>,
    /// How pods are wired to their nodes.
    pub cni: cni::CniMode,
    /// Masquerade pods' traffic to the world (None: as the CNI does by default).
    pub masquerade: Option<bool>,
    /// Translate services with the real kube-proxy, in this mode, on every node (needs
    /// the control plane); None: the lab's own rules.
    pub kube_proxy: Option<kube_proxy::ProxyMode>,
}

impl UpOptions {
    pub fn new(paths: Vec<PathBuf>, state_dir: impl Into<PathBuf>) -> UpOptions {
        UpOptions {
            paths,
            nodes: plan::DEFAULT_NODES,
            state_dir: state_dir.into(),
            agent: AgentLaunch::default(),
            ready_timeout: None,
            apiserver: None,
            cni: cni::CniMode::Bridge,
            masquerade: None,
            kube_proxy: None,
        }
    }
}

/// What `down` did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct DownReport {
    /// Daemons that were running and were stopped.
    pub stopped: Vec<u32>,
    pub teardown: Teardown,
    pub state_removed: bool,
}

pub fn is_root() -> bool {
    // SAFETY: geteuid cannot fail and has no side effects.
    unsafe { libc::geteuid() == 0 }
}

/// True if `pid` is a live process (a zombie is not).
pub fn process_alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // "pid (comm) S ...": comm may contain anything, so split at the last ')'.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_some_and(|s| s != 'Z' && s != 'X'),
        Err(_) => false,
    }
}

/// A loopback address whose port is free now and below the kernel's ephemeral range, so
/// that no outgoing connection takes it as its local port before the daemon binds it (a
/// port from `bind(0)` comes from that range, and one lab run lost its probe to it).
pub fn free_fixed_port() -> std::io::Result<String> {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next().and_then(|p| p.parse::<u16>().ok()))
        .unwrap_or(32768);
    let (from, to) = (10_000u16, low.max(10_001));
    // Spread over the range by process id and time, then the first that binds.
    let seed = std::process::id() as u64 ^ std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos() as u64).unwrap_or(0);
    let n = u64::from(to - from);
    for i in 0..n {
        let port = from + ((seed.wrapping_mul(2_654_435_761).wrapping_add(i)) % n) as u16;
        if let Ok(sock) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            return Ok(sock.local_addr()?.to_string());
        }
    }
    Err(std::io::Error::new(std::io::ErrorKind::AddrInUse, "no free port below the ephemeral range"))
}

pub(crate) fn take_build_lock() -> Result<File, LabError> {
    let path = Path::new(BUILD_LOCK);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| LabError::io(path, e))?;
    state::flock(&file, path)?;
    Ok(file)
}

/// Builds the lab described by `opts.paths`. Nothing is built if the input is invalid; if
/// building fails half-way, everything built is removed before the error is returned.
pub fn up(opts: &UpOptions) -> Result<State, LabError> {
    let input = spec::load_paths(&opts.paths)?;
    let mut state = plan::plan_wired(&input, opts.nodes, opts.cni)?;
    if let Some(m) = opts.masquerade {
        state.masquerade = m;
    }
    if opts.kube_proxy.is_some() && opts.apiserver.is_none() {
        return Err(LabError::plan("kube-proxy needs the control plane (--apiserver)"));
    }
    state.kube_proxy = opts.kube_proxy;
    if !is_root() {
        return Err(LabError::NotRoot);
    }
    net::preflight()?;
    let _lock = take_build_lock()?;
    check_not_up(&opts.state_dir)?;
    let dir = &opts.state_dir;
    state.save(dir)?;
    let started = Instant::now();
    match build_and_start(&mut state, &input, opts) {
        Ok(()) => {
            tracing::info!(
                pods = state.pods.len(),
                nodes = state.nodes.len(),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "lab is up"
            );
            Ok(state)
        }
        Err(e) => {
            tracing::warn!(error = %e, "building the lab failed; removing what was built");
            if let Err(e2) = down_unlocked(dir) {
                tracing::warn!(error = %e2, "cleaning up after the failure failed too");
            }
            Err(e)
        }
    }
}

fn build_and_start(state: &mut State, input: &spec::Input, opts: &UpOptions) -> Result<(), LabError> {
    let dir = &opts.state_dir;
    if let Some(bin) = &opts.apiserver {
        let api = control_plane::start(dir, bin, |program, pid| {
            // Recorded as each starts, so a failure later still stops it.
            state.daemons.push(Daemon { role: control_plane::role(program), node: None, pid });
            state.save(dir)
        })?;
        state.api = Some(api.clone());
        state.save(dir)?;
        cluster_api::write_and_place(&api, &opts.paths, input, state)?;
        state.save(dir)?;
    }
    net::build(state)?;
    // The pods' host interfaces, where a CNI plugin named them.
    state.save(dir)?;
    state.write_drop_netns(dir)?;
    let pid = agent::spawn(dir, &opts.agent)?;
    // Recorded before waiting, so a failed start is still stopped by the cleanup; under
    // the lock and from the file, as the agent's kubelet may have built a pod already.
    state::add_daemon(dir, Daemon { role: agent::ROLE.to_string(), node: None, pid })?;
    *state = State::load(dir)?;
    let timeout = opts.ready_timeout.unwrap_or_else(|| {
        Duration::from_secs(30) + Duration::from_millis(100) * state.pods.len() as u32
    });
    agent::wait_ready(dir, pid, timeout)?;
    *state = State::load(dir)?;
    if let Some(api) = &state.api {
        cluster_api::post_running(api, state)?;
    }
    if let (Some(mode), Some(api), Some(bin)) = (state.kube_proxy, state.api.clone(), &opts.apiserver) {
        for node in state.nodes.clone() {
            let pid = kube_proxy::start_one(bin, &api, mode, &node)?;
            state::add_daemon(dir, Daemon { role: kube_proxy::ROLE.to_string(), node: Some(node.name.clone()), pid })?;
        }
        *state = State::load(dir)?;
        kube_proxy::wait_programmed(state, &api, Duration::from_secs(60))?;
    }
    Ok(())
}

/// Refuses if a lab is up; forgets a stale state file whose namespaces are gone.
fn check_not_up(dir: &Path) -> Result<(), LabError> {
    match State::load(dir) {
        Ok(old) => {
            let alive = old
                .nodes
                .iter()
                .map(|n| &n.netns)
                .chain(old.pods.iter().map(|p| &p.netns))
                .find(|n| netns::netns_exists(n));
            if let Some(ns) = alive {
                return Err(LabError::AlreadyUp {
                    detail: format!("state in {}, netns {ns} exists", dir.display()),
                });
            }
            tracing::info!(dir = %dir.display(), "removing a stale state file (its namespaces are gone)");
            let _ = fs::remove_file(dir.join(state::STATE_FILE));
        }
        Err(LabError::NoState { .. }) => {}
        Err(e) => tracing::warn!(error = %e, "ignoring an unreadable state file"),
    }
    if let Some(ns) = netns::list_netns(net::NETNS_PREFIX).first() {
        return Err(LabError::AlreadyUp {
            detail: format!("netns {ns} exists"),
        });
    }
    Ok(())
}

/// Removes the lab: stops every daemon of the state (SIGTERM, then SIGKILL after 5 s),
/// deletes every `flows-*` netns and `fl*` link in the root netns and the lab's nft tables,
/// and removes the state file. Works without a state file and after a crash; idempotent.
pub fn down(dir: &Path) -> Result<DownReport, LabError> {
    if !is_root() {
        return Err(LabError::NotRoot);
    }
    let _lock = take_build_lock()?;
    down_unlocked(dir)
}

pub(crate) fn down_unlocked(dir: &Path) -> Result<DownReport, LabError> {
    let mut pids = Vec::new();
    // etcd stops last: an API server whose etcd is gone ignores SIGTERM.
    let mut last = Vec::new();
    match State::load(dir) {
        Ok(s) => {
            for d in &s.daemons {
                if d.role == control_plane::role("lab-etcd") { last.push(d.pid) } else { pids.push(d.pid) }
            }
        }
        Err(LabError::NoState { .. }) => {}
        Err(e) => tracing::warn!(error = %e, "state unreadable; removing the lab by name"),
    }
    // The agent writes its own pid: found even if the state never recorded it.
    if let Ok(text) = fs::read_to_string(dir.join(agent::PID_FILE))
        && let Ok(pid) = text.trim().parse::<u32>()
    {
        pids.push(pid);
    }
    pids.sort_unstable();
    pids.dedup();
    let mut stopped = stop_processes(&pids);
    stopped.extend(stop_processes(&last));
    // The control plane's data and PKI go with the lab.
    let _ = fs::remove_dir_all(dir.join("k8s"));

    // The probes leave their TC links pinned (enforcement outlives a probe restart):
    // unpinned here, the kernel detaches them.
    match fs::remove_dir_all(state::LAB_PIN_ROOT) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(error = %e, dir = state::LAB_PIN_ROOT, "removing the lab's pinned links"),
    }
    let teardown = net::teardown();
    let mut state_removed = false;
    for f in [state::STATE_FILE, agent::READY_FILE, agent::PID_FILE] {
        match fs::remove_file(dir.join(f)) {
            Ok(()) => state_removed |= f == state::STATE_FILE,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(LabError::io(dir.join(f), e)),
        }
    }
    // Addresses the daemons announced or kept for a restart: stale once they are gone.
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let announced = name.starts_with("probe-") && (name.ends_with(".addr") || name.ends_with(".listen"));
            if announced || name == "relay.addr" || name == "relay.listen" {
                let _ = fs::remove_file(e.path());
            }
            // The relay's embedded store: the lab's history goes with the lab; so do the
            // probes' lists of namespaces.
            if (name == "store" || name == "drop-netns") && e.path().is_dir() {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
    Ok(DownReport {
        stopped,
        teardown: teardown?,
        state_removed,
    })
}

/// SIGTERM, up to 5 s of grace, then SIGKILL. Returns the pids that were alive.
pub(crate) fn stop_processes(pids: &[u32]) -> Vec<u32> {
    let me = std::process::id();
    let targets: Vec<u32> = pids
        .iter()
        .copied()
        .filter(|&p| p > 1 && p != me && process_alive(p))
        .collect();
    let signal = |sig: i32, pids: &[u32]| {
        for &p in pids {
            // SAFETY: kill has no memory effects; p > 1 so it names one process.
            unsafe {
                libc::kill(p as libc::pid_t, sig);
            }
        }
    };
    let wait = |limit: Duration| {
        let start = Instant::now();
        while start.elapsed() < limit {
            if targets.iter().all(|&p| !process_alive(p)) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        false
    };
    signal(libc::SIGTERM, &targets);
    if !wait(Duration::from_secs(5)) {
        let left: Vec<u32> = targets
            .iter()
            .copied()
            .filter(|&p| process_alive(p))
            .collect();
        tracing::warn!(?left, "daemons ignored SIGTERM for 5 s; sending SIGKILL");
        signal(libc::SIGKILL, &left);
        wait(Duration::from_secs(2));
    }
    targets
}

/// The netns of a pod ("ns/name"), a node ("node-1") or "world".
pub fn resolve_netns(state: &State, target: &str) -> Result<String, LabError> {
    if target == "world" {
        return Ok(state.world.netns.clone());
    }
    if let Some(n) = state.node(target) {
        return Ok(n.netns.clone());
    }
    if let Some((ns, name)) = target.split_once('/')
        && let Some(p) = state.pod(ns, name)
    {
        return Ok(p.netns.clone());
    }
    let mut hint = String::new();
    if !target.contains('/')
        && let Some(p) = state.pods.iter().find(|p| p.name == target)
    {
        hint = format!(" (did you mean {}/{}?)", p.namespace, p.name);
    }
    Err(LabError::NotFound {
        what: "pod, node or world",
        name: target.to_string(),
        hint,
    })
}
