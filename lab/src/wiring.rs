//! The lab's wiring choices as plain types (no I/O): how pods are joined to their nodes
//! and who translates services. `cni` and `kube_proxy` do the work; the plan and the state
//! record the choice.

use serde::{Deserialize, Serialize};

/// The lab's pod bridge in the `bridge` mode.
pub const NODE_BRIDGE: &str = "flbr0";
/// The MTU of pods behind a VXLAN tunnel: 1500 less the IPv6 outer headers (70 bytes),
/// so both families fit.
pub const VXLAN_POD_MTU: u32 = 1430;

/// A wiring mode of the lab.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CniMode {
    #[default]
    Bridge,
    FlannelVxlan,
    Kindnet,
    Calico,
    CalicoVxlan,
}

/// The VXLAN devices of a mode that tunnels between nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Vxlan {
    pub dev_v4: &'static str,
    pub dev_v6: &'static str,
    pub vni: u32,
    pub port: u16,
}

impl CniMode {
    pub const ALL: [CniMode; 5] = [
        CniMode::Bridge,
        CniMode::FlannelVxlan,
        CniMode::Kindnet,
        CniMode::Calico,
        CniMode::CalicoVxlan,
    ];

    pub fn name(self) -> &'static str {
        match self {
            CniMode::Bridge => "bridge",
            CniMode::FlannelVxlan => "flannel-vxlan",
            CniMode::Kindnet => "kindnet",
            CniMode::Calico => "calico",
            CniMode::CalicoVxlan => "calico-vxlan",
        }
    }

    pub fn parse(s: &str) -> Result<CniMode, String> {
        CniMode::ALL.into_iter().find(|m| m.name() == s).ok_or_else(|| {
            let names: Vec<&str> = CniMode::ALL.iter().map(|m| m.name()).collect();
            format!("unknown CNI mode {s:?} (one of: {})", names.join(", "))
        })
    }

    /// The node's pod bridge, in modes that have one.
    pub fn bridge(self) -> Option<&'static str> {
        match self {
            CniMode::Bridge => Some(NODE_BRIDGE),
            CniMode::FlannelVxlan => Some("cni0"),
            _ => None,
        }
    }

    /// The tunnel between nodes, in modes that have one.
    pub fn vxlan(self) -> Option<Vxlan> {
        match self {
            CniMode::FlannelVxlan => Some(Vxlan { dev_v4: "flannel.1", dev_v6: "flannel-v6.1", vni: 1, port: 8472 }),
            CniMode::CalicoVxlan => Some(Vxlan { dev_v4: "vxlan.calico", dev_v6: "vxlan-v6.calico", vni: 4096, port: 4789 }),
            _ => None,
        }
    }

    /// The CNI plugin that wires a pod, in modes that use one.
    pub fn plugin(self) -> Option<&'static str> {
        match self {
            CniMode::FlannelVxlan => Some("bridge"),
            CniMode::Kindnet => Some("ptp"),
            _ => None,
        }
    }

    /// Calico's routed /32s: no bridge, no subnet route in the pod.
    pub fn is_calico(self) -> bool {
        matches!(self, CniMode::Calico | CniMode::CalicoVxlan)
    }

    /// Whether the CNI masquerades pods' traffic to the world by default (Flannel's
    /// ipMasq, Calico's natOutgoing, kindnet's masquerade); the lab's `bridge` routes
    /// the pods' own addresses, as a cluster on a routed network does.
    pub fn masquerades_by_default(self) -> bool {
        self != CniMode::Bridge
    }

    /// The pod's MTU.
    pub fn pod_mtu(self) -> u32 {
        if self.vxlan().is_some() { VXLAN_POD_MTU } else { 1500 }
    }
}

impl std::fmt::Display for CniMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Which rules kube-proxy writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyMode {
    Nftables,
    Iptables,
}

impl ProxyMode {
    pub fn name(self) -> &'static str {
        match self {
            ProxyMode::Nftables => "nftables",
            ProxyMode::Iptables => "iptables",
        }
    }

    pub fn parse(s: &str) -> Result<ProxyMode, String> {
        match s {
            "nftables" => Ok(ProxyMode::Nftables),
            "iptables" => Ok(ProxyMode::Iptables),
            other => Err(format!("unknown kube-proxy mode {other:?} (nftables or iptables)")),
        }
    }
}

