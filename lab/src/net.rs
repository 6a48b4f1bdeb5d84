//! Network plumbing with iproute2 and nftables as subprocesses: building the lab's
//! namespaces, bridges, veths, addresses, routes and rules, and tearing all of it down.
//! Commands go through `ip -n <netns> -batch -` so a pod costs one process, not ten.

use std::io::Write;
use std::process::{Command, Stdio};

use crate::cni::{self, CniMode, Vxlan};
use crate::error::LabError;
use crate::netns::{self, list_netns};
use crate::plan::{
    self, NODE_BRIDGE, NODE_UPLINK, UNDERLAY_BRIDGE, UNDERLAY_NETNS, WORLD_NETNS, WORLD_UPLINK_V4,
    WORLD_UPLINK_V6,
};
use crate::proxy;
use crate::state::{Node, PodRec, State};

/// Every netns the lab makes starts with this.
pub const NETNS_PREFIX: &str = "flows-";
/// Every link the lab makes starts with this.
pub const LINK_PREFIX: &str = "fl";

/// Runs `program args...`, feeding `stdin`, and returns stdout; a non-zero exit is an error
/// carrying stderr.
pub(crate) fn run_tool(
    program: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String, LabError> {
    let command = std::iter::once(program)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ");
    let hint = match program {
        "ip" => " (install iproute2: apt-get install -y iproute2)",
        "nft" => " (install nftables: apt-get install -y nftables)",
        _ => "",
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|error| LabError::Spawn {
            command: command.clone(),
            hint: hint.to_string(),
            error,
        })?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A write error shows up as the tool's own failure below.
        let _ = pipe.write_all(text.as_bytes());
    }
    let out = child.wait_with_output().map_err(|error| LabError::Spawn {
        command: command.clone(),
        hint: String::new(),
        error,
    })?;
    if !out.status.success() {
        let mut stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        // `ip -batch` says "Command failed -:N": show which line that was.
        if let Some(text) = stdin
            && let Some(n) = stderr
                .rsplit_once("Command failed -:")
                .and_then(|(_, n)| n.trim().parse::<usize>().ok())
            && let Some(line) = text.lines().nth(n.saturating_sub(1))
        {
            stderr.push_str(&format!(" [line {n}: {line}]"));
        }
        return Err(LabError::Command {
            command,
            status: out.status.to_string(),
            stderr,
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a batch of `ip` commands inside netns `netns` (or the root netns for `None`).
fn ip_batch(netns: Option<&str>, lines: &[String]) -> Result<(), LabError> {
    if lines.is_empty() {
        return Ok(());
    }
    let mut script = lines.join("\n");
    script.push('\n');
    match netns {
        Some(ns) => run_tool("ip", &["-n", ns, "-batch", "-"], Some(&script)),
        None => run_tool("ip", &["-batch", "-"], Some(&script)),
    }
    .map(|_| ())
}

/// Checks the tools and kernel features the lab needs, before anything is built.
pub(crate) fn preflight() -> Result<(), LabError> {
    run_tool("ip", &["-V"], None)?;
    run_tool("nft", &["--version"], None)?;
    if !std::path::Path::new("/proc/sys/net/bridge").exists() {
        // br_netfilter may be a module here; without it bridged service replies are not un-NATed.
        let _ = run_tool("modprobe", &["br_netfilter"], None);
        if !std::path::Path::new("/proc/sys/net/bridge").exists() {
            return Err(LabError::Command {
                command: "modprobe br_netfilter".to_string(),
                status: "no /proc/sys/net/bridge".to_string(),
                stderr: "the kernel has no br_netfilter; bridged service traffic cannot be NATed"
                    .to_string(),
            });
        }
    }
    Ok(())
}

/// Raises the neighbour-table limits if they are below what the lab needs. They are global
/// (one ARP/ND table for all netns, tuned only from the root netns), and with hundreds of pods
/// the default 1024 entries overflow: new neighbours are refused and first packets vanish.
/// Only ever raised, never lowered; left as they are by `down`.
fn raise_neighbour_limits(state: &State) {
    let hosts = state.pods.len() + state.nodes.len() + 1;
    // Each pod learns its gateway and its peers; each node its pods and the other nodes.
    let want3 = (hosts * 16).max(4096);
    let wants = [(1, want3 / 8), (2, want3 / 2), (3, want3)];
    for family in ["ipv4", "ipv6"] {
        for (n, want) in wants {
            let path = format!("/proc/sys/net/{family}/neigh/default/gc_thresh{n}");
            let Ok(cur) = std::fs::read_to_string(&path) else {
                continue; // not the root netns: nothing we can tune here
            };
            if cur.trim().parse::<usize>().is_ok_and(|c| c >= want) {
                continue;
            }
            match std::fs::write(&path, want.to_string()) {
                Ok(()) => {
                    tracing::info!(sysctl = %path, from = cur.trim(), to = want, "raised the neighbour table limit for the lab")
                }
                Err(e) => {
                    tracing::warn!(sysctl = %path, error = %e, "could not raise the neighbour table limit")
                }
            }
        }
    }
}

/// Builds everything in `state`, in order, wired as `state.cni` says (the pods' host
/// interfaces are recorded where a CNI plugin names them). On error, what was built
/// stays: the caller tears down.
pub(crate) fn build(state: &mut State) -> Result<(), LabError> {
    cni::preflight(state.cni)?;
    raise_neighbour_limits(state);
    create_namespaces(state)?;
    set_sysctls(state)?;
    build_underlay(state)?;
    build_nodes(state)?;
    build_world(state)?;
    build_pods(state)?;
    load_service_rules(state)?;
    Ok(())
}

/// Namespaces.
fn create_namespaces(state: &State) -> Result<(), LabError> {
    let mut all_netns = vec![UNDERLAY_NETNS.to_string(), WORLD_NETNS.to_string()];
    all_netns.extend(state.nodes.iter().map(|n| n.netns.clone()));
    all_netns.extend(state.pods.iter().map(|p| p.netns.clone()));
    let adds: Vec<String> = all_netns.iter().map(|n| format!("netns add {n}")).collect();
    ip_batch(None, &adds)?;
    Ok(())
}

/// Sysctls, before any interface exists so new interfaces inherit the defaults.
fn set_sysctls(state: &State) -> Result<(), LabError> {
    // Addresses must be usable at once (no DAD), and nothing should send or honour redirects:
    // a node routing a pod's service packet back onto the bridge would otherwise teach the
    // pod to bypass the node.
    const NO_DAD: [(&str, &str); 2] = [
        ("net.ipv6.conf.all.accept_dad", "0"),
        ("net.ipv6.conf.default.accept_dad", "0"),
    ];
    netns::sysctls(
        UNDERLAY_NETNS,
        &[
            // A plain L2 switch: no addresses, no IPv6 chatter, no netfilter on bridged frames.
            ("net.ipv6.conf.all.disable_ipv6", "1"),
            ("net.ipv6.conf.default.disable_ipv6", "1"),
            ("net.bridge.bridge-nf-call-iptables", "0"),
            ("net.bridge.bridge-nf-call-ip6tables", "0"),
        ],
    )?;
    netns::sysctls(WORLD_NETNS, &NO_DAD)?;
    for node in &state.nodes {
        let mut s = NO_DAD.to_vec();
        s.extend([
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv6.conf.all.forwarding", "1"),
            ("net.ipv6.conf.default.forwarding", "1"),
            ("net.ipv4.conf.all.send_redirects", "0"),
            ("net.ipv4.conf.default.send_redirects", "0"),
            // Bridged pod-to-pod replies of service connections must see conntrack to be un-DNATed.
            ("net.bridge.bridge-nf-call-iptables", "1"),
            ("net.bridge.bridge-nf-call-ip6tables", "1"),
        ]);
        netns::sysctls(&node.netns, &s)?;
    }
    for pod in &state.pods {
        pod_sysctls(&pod.netns)?;
    }
    Ok(())
}

/// A pod's namespace: no DAD, no redirects, ping for every group.
fn pod_sysctls(netns: &str) -> Result<(), LabError> {
    netns::sysctls(
        netns,
        &[
            ("net.ipv6.conf.all.accept_dad", "0"),
            ("net.ipv6.conf.default.accept_dad", "0"),
            // Unprivileged ICMP datagram sockets (ping) for every group.
            ("net.ipv4.ping_group_range", "0 2147483647"),
            ("net.ipv4.conf.all.accept_redirects", "0"),
            ("net.ipv4.conf.default.accept_redirects", "0"),
            ("net.ipv6.conf.all.accept_redirects", "0"),
            ("net.ipv6.conf.default.accept_redirects", "0"),
        ],
    )
}

/// The underlay switch, with one veth per node and one for the world.
fn build_underlay(state: &State) -> Result<(), LabError> {
    let mut underlay = vec![
        "link set lo up".to_string(),
        format!("link add {UNDERLAY_BRIDGE} type bridge mcast_snooping 0"),
    ];
    let mut hosts: Vec<(String, String)> = state
        .nodes
        .iter()
        .map(|n| (n.name.clone(), n.netns.clone()))
        .collect();
    hosts.push(("world".to_string(), WORLD_NETNS.to_string()));
    for (name, ns) in &hosts {
        let port = plan::underlay_port(name);
        underlay.push(format!(
            "link add {port} type veth peer name {NODE_UPLINK} netns {ns}"
        ));
        underlay.push(format!("link set {port} master {UNDERLAY_BRIDGE}"));
        underlay.push(format!("link set {port} up"));
    }
    underlay.push(format!("link set {UNDERLAY_BRIDGE} up"));
    ip_batch(Some(UNDERLAY_NETNS), &underlay)?;
    Ok(())
}

/// Nodes: uplink and default routes, the mode's pod network, and the way to the other
/// nodes' pods (routes on the underlay, or a VXLAN tunnel).
fn build_nodes(state: &State) -> Result<(), LabError> {
    for (idx, node) in state.nodes.iter().enumerate() {
        let i = idx + 1;
        let mut b = vec![
            "link set lo up".to_string(),
            format!("addr add {}/24 dev {NODE_UPLINK}", node.uplink_ipv4),
            format!("addr add {}/64 dev {NODE_UPLINK} nodad", node.uplink_ipv6),
            format!("link set {NODE_UPLINK} up"),
            format!("route add default via {WORLD_UPLINK_V4} dev {NODE_UPLINK}"),
            format!("route add ::/0 via {WORLD_UPLINK_V6} dev {NODE_UPLINK}"),
        ];
        b.extend(node_pod_network(state.cni, i));
        let mut fdb = Vec::new();
        match state.cni.vxlan() {
            Some(vx) => {
                b.extend(vxlan_device(vx, i, node));
                for (jdx, other) in state.nodes.iter().enumerate().filter(|(_, o)| o.name != node.name) {
                    let (routes, entries) = vxlan_peer(vx, jdx + 1, other);
                    b.extend(routes);
                    fdb.extend(entries);
                }
            }
            None => {
                for other in state.nodes.iter().filter(|o| o.name != node.name) {
                    b.push(format!("route add {} via {} dev {NODE_UPLINK}", other.pod_cidr_v4, other.uplink_ipv4));
                    b.push(format!("route add {} via {} dev {NODE_UPLINK}", other.pod_cidr_v6, other.uplink_ipv6));
                }
            }
        }
        ip_batch(Some(&node.netns), &b)?;
        bridge_batch(&node.netns, &fdb)?;
        if state.masquerade {
            let rules = cni::masquerade_ruleset(plan::CLUSTER_CIDR_V4, plan::CLUSTER_CIDR_V6, NODE_UPLINK);
            run_tool("ip", &["netns", "exec", &node.netns, "nft", "-f", "-"], Some(&rules))?;
        }
    }
    Ok(())
}

/// What a node has for its own pods before any pod exists: the lab's bridge, or (Calico)
/// a blackhole route for its block, so a packet to an address no pod has is dropped
/// here rather than sent to the default route. A plugin makes its own (cni0).
fn node_pod_network(mode: CniMode, i: usize) -> Vec<String> {
    match mode {
        CniMode::Bridge => vec![
            format!("link add {NODE_BRIDGE} type bridge mcast_snooping 0"),
            format!("addr add {}/24 dev {NODE_BRIDGE}", plan::node_gateway_v4(i)),
            format!("addr add {}/64 dev {NODE_BRIDGE} nodad", plan::node_gateway_v6(i)),
            format!("link set {NODE_BRIDGE} up"),
        ],
        CniMode::Calico | CniMode::CalicoVxlan => vec![
            format!("route add blackhole {}", plan::pod_cidr_v4(i)),
            format!("route add blackhole {}", plan::pod_cidr_v6(i)),
        ],
        CniMode::FlannelVxlan | CniMode::Kindnet => Vec::new(),
    }
}

/// The MAC of node i's VXLAN device of one family: fixed, so peers can be told it.
fn vtep_mac(i: usize, v6: bool) -> String {
    format!("0e:f1:00:{:02x}:{:02x}:{:02x}", i >> 8, i & 0xff, if v6 { 6 } else { 4 })
}

/// The VXLAN devices of node i (as flanneld or calico-node make them): the tunnel
/// endpoint on the uplink's addresses, the node's pod network address on the device.
fn vxlan_device(vx: Vxlan, i: usize, node: &Node) -> Vec<String> {
    let mut b = Vec::new();
    for (v6, dev, local, addr, mtu) in [
        (false, vx.dev_v4, node.uplink_ipv4.to_string(), format!("{}/32", vtep_v4(i)), 1450),
        (true, vx.dev_v6, node.uplink_ipv6.to_string(), format!("{}/128", vtep_v6(i)), 1430),
    ] {
        b.push(format!(
            "link add {dev} type vxlan id {} local {local} dev {NODE_UPLINK} dstport {} nolearning",
            vx.vni, vx.port
        ));
        b.push(format!("link set {dev} address {} mtu {mtu}", vtep_mac(i, v6)));
        b.push(format!("addr add {addr} dev {dev}{}", if v6 { " nodad" } else { "" }));
        b.push(format!("link set {dev} up"));
    }
    b
}

/// Node j seen from another node through the tunnel: its pod CIDRs routed to its
/// device's address, that address's MAC, and (the returned fdb lines) where that MAC is.
fn vxlan_peer(vx: Vxlan, j: usize, other: &Node) -> (Vec<String>, Vec<String>) {
    let mut routes = Vec::new();
    let mut fdb = Vec::new();
    for (v6, dev, cidr, vtep, underlay) in [
        (false, vx.dev_v4, &other.pod_cidr_v4, vtep_v4(j).to_string(), other.uplink_ipv4.to_string()),
        (true, vx.dev_v6, &other.pod_cidr_v6, vtep_v6(j).to_string(), other.uplink_ipv6.to_string()),
    ] {
        let mac = vtep_mac(j, v6);
        routes.push(format!("route add {cidr} via {vtep} dev {dev} onlink"));
        routes.push(format!("neigh add {vtep} lladdr {mac} dev {dev} nud permanent"));
        fdb.push(format!("fdb append {mac} dev {dev} dst {underlay}"));
    }
    (routes, fdb)
}

/// Node i's tunnel address: the network address of its pod CIDR, as flannel does.
fn vtep_v4(i: usize) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::new(10, 244, i as u8, 0)
}

fn vtep_v6(i: usize) -> std::net::Ipv6Addr {
    let gw = plan::node_gateway_v6(i).segments();
    std::net::Ipv6Addr::new(gw[0], gw[1], gw[2], gw[3], 0, 0, 0, 0)
}

/// Runs a batch of `bridge` commands (forwarding entries) in a namespace.
fn bridge_batch(netns: &str, lines: &[String]) -> Result<(), LabError> {
    if lines.is_empty() {
        return Ok(());
    }
    let script = format!("{}\n", lines.join("\n"));
    run_tool("bridge", &["-n", netns, "-batch", "-"], Some(&script)).map(|_| ())
}

/// The node's side of a pod: a veth on the node's bridge, its peer the pod's eth0.
fn pod_veth(pod: &PodRec) -> [String; 4] {
    [
        format!("link add {} type veth peer name eth0 netns {}", pod.host_ifname, pod.netns),
        format!("link set {} master {NODE_BRIDGE}", pod.host_ifname),
        // A pod reaching itself through its own service: br_netfilter bridges the DNATed
        // frame back out of the port it came in on, which only hairpin mode allows.
        format!("link set {} type bridge_slave hairpin on", pod.host_ifname),
        format!("link set {} up", pod.host_ifname),
    ]
}

/// The world host: the internet's stand-in, default route of every node.
fn build_world(state: &State) -> Result<(), LabError> {
    let mut w = vec![
        // The world's own addresses sit on lo (kernels without the dummy driver exist).
        "link set lo up".to_string(),
        format!("addr add {}/32 dev lo", state.world.ipv4),
        format!("addr add {}/128 dev lo nodad", state.world.ipv6),
        format!("addr add {WORLD_UPLINK_V4}/24 dev {NODE_UPLINK}"),
        format!("addr add {WORLD_UPLINK_V6}/64 dev {NODE_UPLINK} nodad"),
        format!("link set {NODE_UPLINK} up"),
    ];
    // `src`: connections the world opens come from its public address, not the underlay's.
    for node in &state.nodes {
        w.push(format!(
            "route add {} via {} dev {NODE_UPLINK} src {}",
            node.pod_cidr_v4, node.uplink_ipv4, state.world.ipv4
        ));
        w.push(format!(
            "route add {} via {} dev {NODE_UPLINK} src {}",
            node.pod_cidr_v6, node.uplink_ipv6, state.world.ipv6
        ));
    }
    ip_batch(Some(WORLD_NETNS), &w)?;
    Ok(())
}

/// Pods, wired as the lab's mode says; a plugin's name for the host end is recorded.
fn build_pods(state: &mut State) -> Result<(), LabError> {
    for k in 0..state.pods.len() {
        let mut pod = state.pods[k].clone();
        wire_pod(state, &mut pod)?;
        state.pods[k] = pod;
    }
    Ok(())
}

/// The index (from 1) of the pod's node.
fn node_index(state: &State, pod: &PodRec) -> Result<usize, LabError> {
    state.nodes.iter().position(|n| n.name == pod.node).map(|i| i + 1).ok_or_else(|| {
        LabError::plan(format!("pod {}/{} is on unknown node {}", pod.namespace, pod.name, pod.node))
    })
}

/// Joins a pod's namespace to its node: veth, addresses and routes on both ends.
fn wire_pod(state: &State, pod: &mut PodRec) -> Result<(), LabError> {
    let i = node_index(state, pod)?;
    let node_netns = plan::node_netns(i);
    match state.cni {
        CniMode::Bridge => {
            ip_batch(Some(&node_netns), &pod_veth(pod))?;
            ip_batch(Some(&pod.netns), &bridged_pod_inside(pod, i))
        }
        CniMode::FlannelVxlan | CniMode::Kindnet => {
            let conf = plugin_config(state.cni, pod, i)?;
            pod.host_ifname = cni::add(state.cni, &node_netns, pod, &conf)?;
            ip_batch(Some(&pod.netns), &["link set lo up".to_string()])
        }
        CniMode::Calico | CniMode::CalicoVxlan => {
            ip_batch(Some(&node_netns), &calico_host_end(pod, state.cni.pod_mtu()))?;
            // Proxy ARP answers the pod's ARP for 169.254.1.1 (no delay: the first
            // packet of every new pod waits for it).
            let proxy = format!("net.ipv4.conf.{}.proxy_arp", pod.host_ifname);
            let delay = format!("net.ipv4.neigh.{}.proxy_delay", pod.host_ifname);
            netns::sysctls(&node_netns, &[(proxy.as_str(), "1"), (delay.as_str(), "0")])?;
            ip_batch(Some(&pod.netns), &calico_pod_inside(pod))
        }
    }
}

fn plugin_config(mode: CniMode, pod: &PodRec, i: usize) -> Result<serde_json::Value, LabError> {
    let (gw4, gw6) = (plan::node_gateway_v4(i).to_string(), plan::node_gateway_v6(i).to_string());
    cni::config(mode, pod, &gw4, &gw6).ok_or_else(|| LabError::plan(format!("{mode} uses no CNI plugin")))
}

fn bridged_pod_inside(pod: &PodRec, i: usize) -> Vec<String> {
    vec![
        "link set lo up".to_string(),
        format!("addr add {}/24 dev eth0", pod.ipv4),
        format!("addr add {}/64 dev eth0 nodad", pod.ipv6),
        "link set eth0 up".to_string(),
        format!("route add default via {} dev eth0", plan::node_gateway_v4(i)),
        format!("route add ::/0 via {} dev eth0", plan::node_gateway_v6(i)),
    ]
}

/// Calico's node end: a `cali` veth with the fixed MAC, and a host route per address.
fn calico_host_end(pod: &PodRec, mtu: u32) -> Vec<String> {
    let host = &pod.host_ifname;
    vec![
        format!("link add {host} mtu {mtu} type veth peer name eth0 mtu {mtu} netns {}", pod.netns),
        format!("link set {host} address {}", cni::CALICO_HOST_MAC),
        format!("link set {host} up"),
        format!("route add {}/32 dev {host} scope link", pod.ipv4),
        format!("route add {}/128 dev {host}", pod.ipv6),
    ]
}

/// Calico's pod end: /32 and /128 addresses, default routes to addresses on no subnet.
fn calico_pod_inside(pod: &PodRec) -> Vec<String> {
    vec![
        "link set lo up".to_string(),
        format!("addr add {}/32 dev eth0", pod.ipv4),
        format!("addr add {}/128 dev eth0 nodad", pod.ipv6),
        "link set eth0 up".to_string(),
        format!("route add {} dev eth0 scope link", cni::CALICO_GATEWAY_V4),
        format!("route add default via {} dev eth0", cni::CALICO_GATEWAY_V4),
        format!("route add ::/0 via {} dev eth0", cni::CALICO_GATEWAY_V6),
    ]
}

/// One pod of a lab that is up (the kubelet's work for a pod placed after `up`): its
/// namespace and its wiring. What was made stays on error: [`remove_pod`] takes it away.
pub(crate) fn build_pod(state: &State, pod: &mut PodRec) -> Result<(), LabError> {
    node_index(state, pod)?;
    ip_batch(None, &[format!("netns add {}", pod.netns)])?;
    pod_sysctls(&pod.netns)?;
    wire_pod(state, pod)
}

/// Removes a pod's network. The veth goes first (the plugin's DEL, where a plugin made
/// it): a namespace outlives `netns del` while a socket holds it, and its address may be
/// handed to the next pod at once.
pub(crate) fn remove_pod(state: &State, pod: &PodRec) -> Result<(), LabError> {
    if let Some(node) = state.node(&pod.node) {
        if let Ok(i) = node_index(state, pod)
            && state.cni.plugin().is_some()
            && netns::netns_exists(&pod.netns)
        {
            let conf = plugin_config(state.cni, pod, i)?;
            cni::del(state.cni, &node.netns, pod, &conf)?;
        }
        let links = run_tool("ip", &["-n", &node.netns, "-o", "link", "show"], None)?;
        let host = pod.host_ifname.as_str();
        if !host.is_empty() && links.lines().any(|l| l.split(':').nth(1).is_some_and(|n| n.trim().split('@').next() == Some(host))) {
            run_tool("ip", &["-n", &node.netns, "link", "del", host], None)?;
        }
    }
    if netns::netns_exists(&pod.netns) {
        run_tool("ip", &["netns", "del", &pod.netns], None)?;
    }
    Ok(())
}

/// kube-proxy: the same service rules on every node (again whenever pods come or go).
pub(crate) fn load_service_rules(state: &State) -> Result<(), LabError> {
    if state.kube_proxy.is_some() {
        return Ok(()); // the real one writes its own
    }
    let rules = proxy::nft_ruleset(state);
    for node in &state.nodes {
        run_tool(
            "ip",
            &["netns", "exec", &node.netns, "nft", "-f", "-"],
            Some(&rules),
        )?;
    }
    Ok(())
}

/// What a teardown removed.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Teardown {
    pub netns_removed: Vec<String>,
    pub links_removed: Vec<String>,
    pub nft_tables_removed: Vec<String>,
}

/// Links in the root netns that look like the lab's. `flannel*` is someone else's.
fn root_lab_links() -> Result<Vec<String>, LabError> {
    let out = run_tool("ip", &["-o", "link", "show"], None)?;
    let mut names: Vec<String> = out
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|n| n.trim().split('@').next().unwrap_or("").to_string())
        .filter(|n| n.starts_with(LINK_PREFIX) && !n.starts_with("flannel"))
        .collect();
    names.sort();
    names.dedup();
    Ok(names)
}

/// Removes every lab netns (`flows-*`), every lab link left in the root netns (`fl*`) and the
/// lab's nft tables in the root netns. Idempotent; it does not need a state file.
pub(crate) fn teardown() -> Result<Teardown, LabError> {
    let mut report = Teardown::default();
    let mut errors = Vec::new();

    let names = list_netns(NETNS_PREFIX);
    if !names.is_empty() {
        let dels: Vec<String> = names.iter().map(|n| format!("netns del {n}")).collect();
        // -force: go on past one failure; stragglers are retried one by one for their error.
        let mut script = dels.join("\n");
        script.push('\n');
        let _ = run_tool("ip", &["-force", "-batch", "-"], Some(&script));
        for n in &names {
            if netns::netns_exists(n)
                && let Err(e) = run_tool("ip", &["netns", "del", n], None)
            {
                errors.push(e);
                continue;
            }
            report.netns_removed.push(n.clone());
        }
    }

    match root_lab_links() {
        Ok(links) => {
            for l in links {
                match run_tool("ip", &["link", "del", &l], None) {
                    Ok(_) => report.links_removed.push(l),
                    // Deleting one end of a veth removes the other: already gone is fine.
                    Err(e) if root_lab_links().is_ok_and(|now| !now.contains(&l)) => {
                        tracing::debug!(link = %l, error = %e, "already gone");
                        report.links_removed.push(l);
                    }
                    Err(e) => errors.push(e),
                }
            }
        }
        Err(e) => errors.push(e),
    }

    // The lab's nft tables live in node netns (gone with them); clean the root netns too in
    // case a ruleset was ever loaded there by hand.
    if let Ok(tables) = run_tool("nft", &["list", "tables"], None) {
        for line in tables.lines() {
            let mut words = line.split_whitespace();
            if let (Some("table"), Some(family), Some(name)) =
                (words.next(), words.next(), words.next())
                && name == proxy::TABLE
            {
                match run_tool("nft", &["delete", "table", family, name], None) {
                    Ok(_) => report.nft_tables_removed.push(format!("{family} {name}")),
                    Err(e) => errors.push(e),
                }
            }
        }
    }

    match errors.into_iter().next() {
        Some(e) => Err(e),
        None => Ok(report),
    }
}
