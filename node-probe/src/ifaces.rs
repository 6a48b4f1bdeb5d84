//! Finding pod interfaces and the node's ways out.
//!
//! A pod's network namespace is joined to its node by a veth pair; the host side lives
//! in the node's namespace (the host's, on a real node; `flows-node-N` in the lab). The
//! probe attaches its endpoint programs to every veth there, except names excluded on
//! the command line and the node's network interfaces. This covers bridge-based CNIs
//! (bridge, flannel's cni0, kindnet's ptp) and routed ones (Calico's `cali*`, Cilium's
//! `lxc*`) alike; `--iface-prefix` narrows it.
//!
//! The network interfaces are where packets leave the node after service translation,
//! and where local pods' egress towards other nodes and the world is decided: named
//! with `--uplink-iface`, or found (`auto`) as the devices of the default routes plus
//! every tunnel device between nodes (Flannel's `flannel.1`, Calico's `vxlan.calico`,
//! Geneve). On a tunnel device the packet still has the pods' addresses; on the uplink
//! behind it, only the nodes' (the outer header), so the tunnel is where egress to
//! other nodes is decided.
//! The list is read with `ip -json link`, again whenever `ip monitor link` reports a
//! change (a new pod's interface is attached within milliseconds, not at the next
//! poll), and polled as well, so pods that come and go are attached and forgotten
//! without a restart even if the monitor fails.

use std::process::Command;

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum IfaceError {
    #[error("running `ip {args}`: {source}")]
    Spawn {
        args: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`ip {args}` failed: {stderr}")]
    Failed { args: String, stderr: String },
    #[error("parsing the output of `ip {args}`: {source}")]
    Parse {
        args: String,
        #[source]
        source: serde_json::Error,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Link {
    pub ifindex: u32,
    pub ifname: String,
}

/// A link with its kind (`veth`, `vxlan`, `bridge`...; `ip -d`'s `info_kind`) and link
/// type (`ether` for devices whose frames carry an Ethernet header).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    pub ifindex: u32,
    pub ifname: String,
    pub kind: String,
    pub link_type: String,
}

/// What the probe does on an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// A pod's veth: every attempt, ingress policy.
    Endpoint,
    /// The node's uplink or a tunnel: egress policy of local pods after service
    /// translation.
    Network,
}

/// The value of `--uplink-iface` that finds the network interfaces by itself.
pub const AUTO: &str = "auto";
/// The value of `--uplink-iface` that names no network interface.
pub const NONE: &str = "none";

/// Tunnel kinds between nodes whose frames have an Ethernet header (which the
/// programs parse); L3 tunnels (IPIP, WireGuard) are not handled yet.
const ETHERNET_TUNNELS: [&str; 2] = ["vxlan", "geneve"];

/// Which interface gets which programs: pods' veths and the node's network
/// interfaces (named, or with [`AUTO`] the default routes' devices and Ethernet
/// tunnels).
pub fn classify(links: &[LinkInfo], default_devs: &[String], selector: &IfaceSelector, uplinks: &[String]) -> Vec<(u32, String, Role)> {
    let auto = uplinks.iter().any(|u| u == AUTO);
    let network = |l: &LinkInfo| {
        uplinks.contains(&l.ifname)
            || (auto
                && (default_devs.contains(&l.ifname)
                    || (ETHERNET_TUNNELS.contains(&l.kind.as_str()) && l.link_type == "ether")))
    };
    links
        .iter()
        .filter_map(|l| {
            if selector.exclude.contains(&l.ifname) && !uplinks.contains(&l.ifname) {
                return None;
            }
            if network(l) {
                Some((l.ifindex, l.ifname.clone(), Role::Network))
            } else if l.kind == "veth" && selector.selects(&l.ifname) {
                Some((l.ifindex, l.ifname.clone(), Role::Endpoint))
            } else {
                None
            }
        })
        .collect()
}

#[derive(Debug, Clone, Default)]
pub struct IfaceSelector {
    /// Only names starting with one of these (empty: any).
    pub prefixes: Vec<String>,
    /// Never these names.
    pub exclude: Vec<String>,
}

impl IfaceSelector {
    pub fn selects(&self, name: &str) -> bool {
        !self.exclude.iter().any(|e| e == name)
            && (self.prefixes.is_empty() || self.prefixes.iter().any(|p| name.starts_with(p)))
    }
}

/// `ip monitor link` in a namespace: every line it prints is a link that came, went or
/// changed. The child ends with the returned handle (killed on drop).
pub fn monitor_links(netns: Option<&str>) -> Result<tokio::process::Child, IfaceError> {
    let mut args: Vec<&str> = Vec::new();
    if let Some(ns) = netns {
        args.extend(["-n", ns]);
    }
    args.extend(["monitor", "link"]);
    tokio::process::Command::new("ip")
        .args(&args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| IfaceError::Spawn { args: args.join(" "), source })
}

/// veth links in a network namespace (by `ip netns` name; None: the current one).
pub fn list_veths(netns: Option<&str>) -> Result<Vec<Link>, IfaceError> {
    let mut args: Vec<&str> = Vec::new();
    if let Some(ns) = netns {
        args.extend(["-n", ns]);
    }
    args.extend(["-json", "link", "show", "type", "veth"]);
    let joined = args.join(" ");
    let out = Command::new("ip")
        .args(&args)
        .output()
        .map_err(|source| IfaceError::Spawn {
            args: joined.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(IfaceError::Failed {
            args: joined,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    parse_links(&out.stdout).map_err(|source| IfaceError::Parse {
        args: joined,
        source,
    })
}

/// Runs `ip ARGS` (in `netns`) and returns stdout.
fn ip(netns: Option<&str>, args: &[&str]) -> Result<Vec<u8>, IfaceError> {
    let mut all: Vec<&str> = Vec::new();
    if let Some(ns) = netns {
        all.extend(["-n", ns]);
    }
    all.extend(args);
    let joined = all.join(" ");
    let out = Command::new("ip")
        .args(&all)
        .output()
        .map_err(|source| IfaceError::Spawn { args: joined.clone(), source })?;
    if !out.status.success() {
        return Err(IfaceError::Failed { args: joined, stderr: String::from_utf8_lossy(&out.stderr).trim().to_string() });
    }
    Ok(out.stdout)
}

/// Every link of a namespace, with its kind.
pub fn list_links(netns: Option<&str>) -> Result<Vec<LinkInfo>, IfaceError> {
    let out = ip(netns, &["-d", "-json", "link", "show"])?;
    parse_link_infos(&out).map_err(|source| IfaceError::Parse { args: "-d -json link show".into(), source })
}

/// The devices of the default routes (IPv4 and IPv6) of a namespace.
pub fn default_route_devs(netns: Option<&str>) -> Result<Vec<String>, IfaceError> {
    let mut devs = Vec::new();
    for family in ["-4", "-6"] {
        let out = ip(netns, &[family, "-json", "route", "show", "default"])?;
        devs.extend(parse_route_devs(&out).map_err(|source| IfaceError::Parse { args: format!("{family} -json route show default"), source })?);
    }
    devs.sort();
    devs.dedup();
    Ok(devs)
}

fn parse_link_infos(json: &[u8]) -> Result<Vec<LinkInfo>, serde_json::Error> {
    #[derive(Deserialize)]
    struct Raw {
        ifindex: u32,
        ifname: String,
        #[serde(default)]
        link_type: String,
        #[serde(default)]
        linkinfo: Option<RawInfo>,
    }
    #[derive(Deserialize)]
    struct RawInfo {
        #[serde(default)]
        info_kind: String,
    }
    if json.iter().all(|b| b.is_ascii_whitespace()) {
        return Ok(Vec::new());
    }
    let raw: Vec<Raw> = serde_json::from_slice(json)?;
    Ok(raw
        .into_iter()
        .map(|r| LinkInfo {
            ifindex: r.ifindex,
            ifname: r.ifname,
            kind: r.linkinfo.map(|i| i.info_kind).unwrap_or_default(),
            link_type: r.link_type,
        })
        .collect())
}

fn parse_route_devs(json: &[u8]) -> Result<Vec<String>, serde_json::Error> {
    #[derive(Deserialize)]
    struct Route {
        #[serde(default)]
        dev: Option<String>,
    }
    if json.iter().all(|b| b.is_ascii_whitespace()) {
        return Ok(Vec::new());
    }
    let routes: Vec<Route> = serde_json::from_slice(json)?;
    Ok(routes.into_iter().filter_map(|r| r.dev).collect())
}

pub fn parse_links(json: &[u8]) -> Result<Vec<Link>, serde_json::Error> {
    if json.iter().all(|b| b.is_ascii_whitespace()) {
        return Ok(Vec::new());
    }
    serde_json::from_slice(json)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ip_json() {
        let j = br#"[{"ifindex":5,"link_netnsid":1,"ifname":"fl1a2b3c4d","flags":["UP"],"mtu":1500},
                    {"ifindex":9,"ifname":"fl-uplink","mtu":1500}]"#;
        let links = parse_links(j).expect("parse");
        assert_eq!(links.len(), 2);
        assert_eq!(links[0], Link { ifindex: 5, ifname: "fl1a2b3c4d".into() });
        assert!(parse_links(b"\n").expect("empty").is_empty());
        assert!(parse_links(b"{not json").is_err());
    }

    fn link(ifindex: u32, name: &str, kind: &str, link_type: &str) -> LinkInfo {
        LinkInfo { ifindex, ifname: name.into(), kind: kind.into(), link_type: link_type.into() }
    }

    #[test]
    fn reads_kinds_and_default_routes() {
        let j = br#"[{"ifindex":1,"ifname":"lo","link_type":"loopback"},
            {"ifindex":3,"ifname":"flannel.1","link_type":"ether","linkinfo":{"info_kind":"vxlan","info_data":{"id":1}}},
            {"ifindex":6,"ifname":"veth2e04ed17","link_type":"ether","linkinfo":{"info_kind":"veth"}}]"#;
        let l = parse_link_infos(j).expect("parse");
        assert_eq!(l[0], link(1, "lo", "", "loopback"));
        assert_eq!(l[1], link(3, "flannel.1", "vxlan", "ether"));
        assert!(parse_link_infos(b"[{\"ifname\":1}]").is_err());
        let r = br#"[{"dst":"default","gateway":"10.99.0.254","dev":"eth0","flags":[]},{"dst":"default","nhid":5}]"#;
        assert_eq!(parse_route_devs(r).expect("routes"), ["eth0"]);
        assert!(parse_route_devs(b" ").expect("none").is_empty());
    }

    #[test]
    fn pods_veths_and_the_nodes_ways_out_are_told_apart() {
        let links = [
            link(1, "lo", "", "loopback"),
            link(2, "eth0", "veth", "ether"),
            link(3, "flannel.1", "vxlan", "ether"),
            link(4, "cni0", "bridge", "ether"),
            link(5, "veth2e04ed17", "veth", "ether"),
            link(6, "cali12345678", "veth", "ether"),
            link(7, "wg0", "wireguard", "none"),
            link(8, "genev_sys_6081", "geneve", "ether"),
        ];
        let defaults = vec!["eth0".to_string()];
        let roles = |sel: &IfaceSelector, up: &[&str]| -> Vec<(String, Role)> {
            let up: Vec<String> = up.iter().map(|s| s.to_string()).collect();
            classify(&links, &defaults, sel, &up).into_iter().map(|(_, n, r)| (n, r)).collect()
        };
        let e = |n: &str| (n.to_string(), Role::Endpoint);
        let n = |n: &str| (n.to_string(), Role::Network);
        // Found by itself: the default route's device and the Ethernet tunnels; every
        // other veth is a pod's; a bridge, an L3 tunnel and lo are neither.
        assert_eq!(
            roles(&IfaceSelector::default(), &[AUTO]),
            [n("eth0"), n("flannel.1"), e("veth2e04ed17"), e("cali12345678"), n("genev_sys_6081")]
        );
        // Named: only those; the default route's veth is then a pod's unless excluded.
        let excl = IfaceSelector { prefixes: vec![], exclude: vec!["eth0".into()] };
        assert_eq!(roles(&excl, &["flannel.1"]), [n("flannel.1"), e("veth2e04ed17"), e("cali12345678")]);
        // A named uplink is one even when excluded from the pods' interfaces.
        assert_eq!(roles(&excl, &["eth0"]), [n("eth0"), e("veth2e04ed17"), e("cali12345678")]);
        // A prefix narrows the pods' veths, never the network interfaces.
        let cali = IfaceSelector { prefixes: vec!["cali".into()], exclude: vec![] };
        assert_eq!(roles(&cali, &[AUTO]), [n("eth0"), n("flannel.1"), e("cali12345678"), n("genev_sys_6081")]);
        // No uplink at all: pods only.
        assert_eq!(roles(&cali, &[]), [e("cali12345678")]);
    }

    #[test]
    fn selector() {
        let s = IfaceSelector {
            prefixes: vec!["fl".into()],
            exclude: vec!["fl-uplink".into()],
        };
        assert!(s.selects("fl1a2b3c4d"));
        assert!(!s.selects("fl-uplink"));
        assert!(!s.selects("eth0"));
        assert!(IfaceSelector::default().selects("anything"));
    }
}
