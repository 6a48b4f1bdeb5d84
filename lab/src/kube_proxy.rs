//! Service translation by the real kube-proxy (`flows lab up --kube-proxy MODE`): one
//! process per node, in the node's network namespace, with its own client certificate
//! (`system:kube-proxy`, bound to `system:node-proxier` by the API server's defaults),
//! watching the lab's API server for Services and EndpointSlices and writing the node's
//! nftables or iptables (iptables-nft) rules, as on a node of a real cluster. The lab's
//! own rules (`proxy.rs`) are then not loaded.
//!
//! A node's namespace cannot reach the host's loopback, where the API server listens:
//! the agent serves the same port on each node's loopback and forwards every connection
//! to the host's ([`bridge`]), so one kubeconfig serves every node.

use std::fs;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::daemon::spawn_detached;
use crate::error::LabError;
use crate::netns;
use crate::plan::{CLUSTER_CIDR_V4, CLUSTER_CIDR_V6};
use crate::state::{ApiRec, Node, State};
pub use crate::wiring::ProxyMode;

/// The role of kube-proxy daemons in the state.
pub const ROLE: &str = "kube-proxy";
/// The kubeconfig of every node's kube-proxy, in the control plane's directory.
pub const KUBECONFIG: &str = "kube-proxy.kubeconfig";

fn err(message: impl Into<String>) -> LabError {
    LabError::ControlPlane { message: message.into(), log: None }
}

/// The API server's port, from its URL (`https://127.0.0.1:PORT`).
fn api_port(api: &ApiRec) -> Result<u16, LabError> {
    api.url
        .rsplit_once(':')
        .and_then(|(_, p)| p.trim_end_matches('/').parse().ok())
        .ok_or_else(|| err(format!("no port in the API server's address {}", api.url)))
}

/// The arguments of node `node`'s kube-proxy.
pub fn args(mode: ProxyMode, node: &str, kubeconfig: &Path) -> Vec<String> {
    vec![
        format!("--kubeconfig={}", kubeconfig.display()),
        format!("--hostname-override={node}"),
        format!("--proxy-mode={}", mode.name()),
        format!("--cluster-cidr={CLUSTER_CIDR_V4},{CLUSTER_CIDR_V6}"),
        // nf_conntrack_max is the host's, not the node namespace's to set.
        "--conntrack-max-per-core=0".into(),
        "--metrics-bind-address=127.0.0.1:10249".into(),
        "--healthz-bind-address=127.0.0.1:10256".into(),
    ]
}

/// Serves the API server's port on every node's loopback, forwarding to the host's.
/// Runs for the life of the calling process (the agent).
pub(crate) fn bridge(state: &State, api: &ApiRec) -> Result<(), LabError> {
    let port = api_port(api)?;
    for node in &state.nodes {
        let listener = netns::in_netns(&node.netns, || {
            TcpListener::bind(("127.0.0.1", port)).map_err(|e| LabError::sys(format!("bind 127.0.0.1:{port}"), e))
        })?;
        let name = node.name.clone();
        std::thread::Builder::new()
            .name(format!("api-bridge-{name}"))
            .spawn(move || {
                for conn in listener.incoming() {
                    match conn {
                        Ok(inside) => forward(inside, port),
                        Err(e) => eprintln!("api bridge {name}: accept: {e}"),
                    }
                }
            })
            .map_err(|e| LabError::sys("spawn the API bridge", e))?;
    }
    Ok(())
}

/// One connection from a node to the API server: bytes both ways until either side
/// closes (this thread is in the host's namespace, so the dial reaches its loopback).
fn forward(inside: TcpStream, port: u16) {
    let Ok(outside) = TcpStream::connect(("127.0.0.1", port)) else {
        // The API server is down (an outage test): the client retries.
        return;
    };
    let (Ok(inside2), Ok(outside2)) = (inside.try_clone(), outside.try_clone()) else { return };
    let _ = std::thread::Builder::new().name("api-bridge-up".into()).spawn(move || pump(inside, outside));
    let _ = std::thread::Builder::new().name("api-bridge-down".into()).spawn(move || pump(outside2, inside2));
}

fn pump(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = [0u8; 16384];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}

/// Starts node `node`'s kube-proxy in its namespace; returns its pid.
pub(crate) fn start_one(bin: &Path, api: &ApiRec, mode: ProxyMode, node: &Node) -> Result<u32, LabError> {
    let log_path = log_path(api, &node.name);
    let log = fs::File::options().create(true).append(true).open(&log_path).map_err(|e| LabError::io(&log_path, e))?;
    let log2 = log.try_clone().map_err(|e| LabError::io(&log_path, e))?;
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &node.netns])
        .arg(bin.join("kube-proxy"))
        .args(args(mode, &node.name, &api.dir.join(KUBECONFIG)))
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2);
    spawn_detached(cmd, format!("kube-proxy for {}", node.name))
}

/// The addresses a node's rules must name before its services work: every cluster IP
/// of a service with endpoints.
fn expected_ips(state: &State) -> Vec<String> {
    state
        .services
        .iter()
        .filter(|s| crate::plan::endpoints(state, s).iter().any(|pe| !pe.endpoints.is_empty()))
        .flat_map(|s| [s.cluster_ipv4.to_string(), s.cluster_ipv6.to_string()])
        .collect()
}

/// Waits until every node's ruleset names every service that has endpoints (kube-proxy
/// has read the API and written its rules).
pub(crate) fn wait_programmed(state: &State, api: &ApiRec, timeout: Duration) -> Result<(), LabError> {
    let want = expected_ips(state);
    let started = Instant::now();
    let deadline = started + timeout;
    for node in &state.nodes {
        loop {
            let rules = crate::net::run_tool("ip", &["netns", "exec", &node.netns, "nft", "list", "ruleset"], None)?;
            let missing: Vec<&String> = want.iter().filter(|ip| !rules.contains(ip.as_str())).collect();
            if missing.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                return Err(LabError::ControlPlane {
                    message: format!("kube-proxy on {} wrote no rules for {missing:?} within {timeout:?}", node.name),
                    log: Some(log_path(api, &node.name)),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    tracing::info!(services = want.len() / 2, elapsed_ms = started.elapsed().as_millis() as u64, "kube-proxy's rules name every service on every node");
    Ok(())
}

/// Where node `node`'s kube-proxy writes its log.
pub fn log_path(api: &ApiRec, node: &str) -> PathBuf {
    api.dir.join(format!("kube-proxy-{node}.log"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_arguments_name_the_node_and_the_cluster() {
        assert_eq!(ProxyMode::parse("nftables"), Ok(ProxyMode::Nftables));
        assert_eq!(ProxyMode::parse("iptables"), Ok(ProxyMode::Iptables));
        assert!(ProxyMode::parse("ipvs").is_err());
        let a = args(ProxyMode::Iptables, "node-2", Path::new("/k/kube-proxy.kubeconfig"));
        assert!(a.contains(&"--hostname-override=node-2".to_string()));
        assert!(a.contains(&"--proxy-mode=iptables".to_string()));
        assert!(a.contains(&"--cluster-cidr=10.244.0.0/16,fd00:10:244::/48".to_string()), "{a:?}");
        let api = ApiRec { url: "https://127.0.0.1:16443".into(), kubeconfig: "/k/admin".into(), dir: "/k".into() };
        assert_eq!(api_port(&api).expect("port"), 16443);
    }
}
