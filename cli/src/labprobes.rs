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
use flows_lab::state::{Daemon, State, add_daemon};

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

pub fn start(dir: &Path, state: &State) -> anyhow::Result<Vec<String>> {
    let bin = sibling("flows-node-probe", "FLOWS_NODE_PROBE");
    // What the probes enforce: the lab's namespaces and pods, and applied policies.
    crate::labpolicy::write_cluster(dir, state)?;
    let manifests = flows_lab::manifests::dir(dir);
    let mut waiting = Vec::new();
    for node in &state.nodes {
        let ready = addr_file(dir, &node.name);
        let _ = std::fs::remove_file(&ready);
        let log_path = dir.join(format!("probe-{}.log", node.name));
        let log = File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let mut cmd = Command::new(&bin);
        cmd.args(["--node-name", &node.name, "--netns", &node.netns])
            .args(["--iface-prefix", "fl", "--exclude-iface", "fl-uplink"])
            .args(["--listen", "127.0.0.1:0", "--uplink-iface", "fl-uplink"])
            .arg("--manifests")
            .arg(&manifests)
            .arg("--ready-file")
            .arg(&ready)
            .arg("--drop-netns")
            .arg(Path::new("/run/netns").join(&node.netns));
        for p in state.pods.iter().filter(|p| p.node == node.name) {
            cmd.arg("--drop-netns").arg(Path::new("/run/netns").join(&p.netns));
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
        waiting.push((node.name.clone(), ready, log_path));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut addrs = Vec::new();
    for (node, ready, log) in waiting {
        loop {
            if let Ok(a) = std::fs::read_to_string(&ready) {
                if !a.is_empty() {
                    addrs.push(a);
                    break;
                }
            }
            if Instant::now() > deadline {
                let tail = std::fs::read_to_string(&log).unwrap_or_default();
                bail!("node-probe for {node} did not start; its log ({}):\n{tail}", log.display());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(addrs)
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
    cmd.args(["--listen", "127.0.0.1:0"])
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
