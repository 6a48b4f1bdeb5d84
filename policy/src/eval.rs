//! Evaluation of a connection attempt against a set of NetworkPolicies.
//!
//! A new connection from A to B is allowed when A's egress allows it (or no policy
//! isolates A for egress) AND B's ingress allows it (or nothing isolates B for ingress).
//! Policies are additive; replies of an allowed connection are implicitly allowed and are
//! not evaluated here.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
};

use k8s_openapi::{
    api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort},
    apimachinery::pkg::util::intstr::IntOrString,
};

use crate::{
    cidr::Cidr,
    selector::{Labels, Selector},
};

pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
    /// ICMP and ICMPv6 attempts (echo): NetworkPolicy cannot name them, so only rules
    /// without ports admit them, as the datapath does.
    Icmp,
    Icmpv6,
    /// A packet whose transport protocol or ports could not be read (IPv6 extension
    /// headers beyond the datapath's walk, fragments without the header, headers cut
    /// short) or of a protocol NetworkPolicy cannot name (GRE, ESP, ...): as for a port
    /// no rule can name, only rules without ports admit it.
    L4Unknown,
}

impl Protocol {
    /// The IP protocol number.
    pub fn number(&self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
            Protocol::Icmp => 1,
            Protocol::Icmpv6 => 58,
            Protocol::L4Unknown => flows_common::PROTO_L4_UNKNOWN,
        }
    }

    /// A protocol as flows name it ("TCP", "UDP", "SCTP", "ICMPv4", "ICMPv6").
    pub fn from_flow(s: &str) -> Option<Protocol> {
        match s {
            "ICMPv4" | "ICMP" => Some(Protocol::Icmp),
            "ICMPv6" => Some(Protocol::Icmpv6),
            "L4-UNKNOWN" => Some(Protocol::L4Unknown),
            _ => Protocol::parse(s),
        }
    }

    /// Whether a NetworkPolicy port can name this protocol.
    pub fn has_ports(&self) -> bool {
        matches!(self, Protocol::Tcp | Protocol::Udp | Protocol::Sctp)
    }

    pub fn parse(s: &str) -> Option<Protocol> {
        match s {
            "TCP" | "tcp" => Some(Protocol::Tcp),
            "UDP" | "udp" => Some(Protocol::Udp),
            "SCTP" | "sctp" => Some(Protocol::Sctp),
            _ => None,
        }
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
            Protocol::Icmp => "ICMPv4",
            Protocol::Icmpv6 => "ICMPv6",
            Protocol::L4Unknown => "L4-UNKNOWN",
        }
    }
}

/// A policy's identity: namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyRef {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for PolicyRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerPort {
    pub name: Option<String>,
    pub port: u16,
    pub protocol: Protocol,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    /// spec.nodeName, when known.
    pub node: Option<String>,
    pub labels: Labels,
    pub ips: Vec<IpAddr>,
    pub ports: Vec<ContainerPort>,
}

/// Namespaces and pods: what selectors are evaluated against.
#[derive(Debug, Clone, Default)]
pub struct Cluster {
    namespaces: HashMap<String, Labels>,
    pods: Vec<PodInfo>,
    by_name: HashMap<(String, String), usize>,
    by_ip: HashMap<IpAddr, usize>,
}

impl Cluster {
    pub fn new() -> Cluster {
        Cluster::default()
    }

    /// Adds (or relabels) a namespace; `kubernetes.io/metadata.name` is set as the API
    /// server sets it.
    pub fn add_namespace(&mut self, name: &str, labels: Labels) {
        let mut labels = labels;
        labels.insert(NAMESPACE_NAME_LABEL.to_string(), name.to_string());
        self.namespaces.insert(name.to_string(), labels);
    }

    /// Adds (or replaces) a pod; its namespace exists from then on.
    pub fn add_pod(&mut self, pod: PodInfo) {
        if !self.namespaces.contains_key(&pod.namespace) {
            self.add_namespace(&pod.namespace, Labels::new());
        }
        let key = (pod.namespace.clone(), pod.name.clone());
        let idx = match self.by_name.get(&key) {
            Some(&i) => {
                for ip in &self.pods[i].ips {
                    self.by_ip.remove(ip);
                }
                self.pods[i] = pod;
                i
            }
            None => {
                self.pods.push(pod);
                self.pods.len() - 1
            }
        };
        for ip in &self.pods[idx].ips {
            self.by_ip.insert(*ip, idx);
        }
        self.by_name.insert(key, idx);
    }

    pub fn namespace_labels(&self, ns: &str) -> Option<&Labels> {
        self.namespaces.get(ns)
    }

    pub fn pod(&self, namespace: &str, name: &str) -> Option<&PodInfo> {
        self.by_name
            .get(&(namespace.to_string(), name.to_string()))
            .map(|&i| &self.pods[i])
    }

    pub fn pod_by_ip(&self, ip: IpAddr) -> Option<&PodInfo> {
        self.by_ip.get(&ip).map(|&i| &self.pods[i])
    }

    pub fn pods(&self) -> &[PodInfo] {
        &self.pods
    }
}

#[derive(Debug, Clone)]
enum PortMatch {
    Any,
    Range(u16, u16),
    Named(String),
}

#[derive(Debug, Clone)]
struct PortSpec {
    protocol: Protocol,
    port: PortMatch,
}

#[derive(Debug, Clone)]
enum Peer {
    /// `namespace: None` means the policy's own namespace.
    Selectors {
        namespace: Option<Selector>,
        pod: Option<Selector>,
    },
    Block { cidr: Cidr, except: Vec<Cidr> },
}

#[derive(Debug, Clone)]
struct Rule {
    /// Empty: every port and protocol.
    ports: Vec<PortSpec>,
    /// None: every peer (the field was absent or empty).
    peers: Option<Vec<Peer>>,
}

/// A NetworkPolicy in the form evaluation needs. Build it from a *validated* policy.
#[derive(Debug, Clone)]
pub struct CompiledPolicy {
    pub id: PolicyRef,
    selector: Selector,
    /// None: the policy does not affect this direction.
    ingress: Option<Vec<Rule>>,
    egress: Option<Vec<Rule>>,
}

fn compile_ports(ports: &Option<Vec<NetworkPolicyPort>>) -> Vec<PortSpec> {
    ports
        .iter()
        .flatten()
        .map(|p| PortSpec {
            protocol: p
                .protocol
                .as_deref()
                .and_then(Protocol::parse)
                .unwrap_or(Protocol::Tcp),
            port: match (&p.port, p.end_port) {
                (None, _) => PortMatch::Any,
                (Some(IntOrString::Int(n)), end) => {
                    let start = (*n).clamp(0, 65535) as u16;
                    let end = end.map(|e| e.clamp(0, 65535) as u16).unwrap_or(start);
                    PortMatch::Range(start, end)
                }
                (Some(IntOrString::String(name)), _) => PortMatch::Named(name.clone()),
            },
        })
        .collect()
}

fn compile_peers(peers: &Option<Vec<NetworkPolicyPeer>>) -> Option<Vec<Peer>> {
    let peers = peers.as_ref().filter(|p| !p.is_empty())?;
    Some(
        peers
            .iter()
            .filter_map(|p| match &p.ip_block {
                Some(b) => Some(Peer::Block {
                    cidr: Cidr::parse(&b.cidr)?,
                    except: b.except.iter().flatten().filter_map(|e| Cidr::parse(e)).collect(),
                }),
                None => Some(Peer::Selectors {
                    namespace: p.namespace_selector.as_ref().map(Selector::compile),
                    pod: p.pod_selector.as_ref().map(Selector::compile),
                }),
            })
            .collect(),
    )
}

/// Rules from (ports, peers) pairs: `from` for ingress rules, `to` for egress ones.
fn compile_rules<'a>(
    rules: impl Iterator<Item = (&'a Option<Vec<NetworkPolicyPort>>, &'a Option<Vec<NetworkPolicyPeer>>)>,
) -> Vec<Rule> {
    rules
        .map(|(ports, peers)| Rule {
            ports: compile_ports(ports),
            peers: compile_peers(peers),
        })
        .collect()
}

impl CompiledPolicy {
    pub fn compile(np: &NetworkPolicy) -> CompiledPolicy {
        let spec = np.spec.clone().unwrap_or_default();
        let types: Vec<String> = match &spec.policy_types {
            Some(t) if !t.is_empty() => t.clone(),
            // API server defaulting: Ingress always; Egress when there are egress rules.
            _ => {
                let mut t = vec!["Ingress".to_string()];
                if spec.egress.as_ref().is_some_and(|e| !e.is_empty()) {
                    t.push("Egress".to_string());
                }
                t
            }
        };
        let ingress = types.iter().any(|t| t == "Ingress").then(|| {
            compile_rules(spec.ingress.iter().flatten().map(|r| (&r.ports, &r.from)))
        });
        let egress = types.iter().any(|t| t == "Egress").then(|| {
            compile_rules(spec.egress.iter().flatten().map(|r| (&r.ports, &r.to)))
        });
        CompiledPolicy {
            id: PolicyRef {
                namespace: np.metadata.namespace.clone().unwrap_or_else(|| "default".into()),
                name: np.metadata.name.clone().unwrap_or_default(),
            },
            selector: Selector::compile(&spec.pod_selector.unwrap_or_default()),
            ingress,
            egress,
        }
    }

    pub fn affects_ingress(&self) -> bool {
        self.ingress.is_some()
    }

    pub fn affects_egress(&self) -> bool {
        self.egress.is_some()
    }

    pub fn selects(&self, pod: &PodInfo) -> bool {
        pod.namespace == self.id.namespace && self.selector.matches(&pod.labels)
    }

    pub fn affects(&self, ingress: bool) -> bool {
        if ingress {
            self.affects_ingress()
        } else {
            self.affects_egress()
        }
    }

    fn rules(&self, ingress: bool) -> &[Rule] {
        let r = if ingress { &self.ingress } else { &self.egress };
        r.as_deref().unwrap_or(&[])
    }

    /// Every ipBlock of the policy, as (cidr, excepts).
    pub fn ip_blocks(&self) -> Vec<(Cidr, Vec<Cidr>)> {
        self.rules(true)
            .iter()
            .chain(self.rules(false))
            .flat_map(|r| r.peers.iter().flatten())
            .filter_map(|p| match p {
                Peer::Block { cidr, except } => Some((*cidr, except.clone())),
                Peer::Selectors { .. } => None,
            })
            .collect()
    }

    /// Named ports used by egress rules (they resolve against the destination pod).
    pub fn egress_named_ports(&self) -> Vec<String> {
        self.rules(false)
            .iter()
            .flat_map(|r| r.ports.iter())
            .filter_map(|p| match &p.port {
                PortMatch::Named(n) => Some(n.clone()),
                _ => None,
            })
            .collect()
    }

    /// What this policy allows `subject` (which it selects) in one direction, per peer
    /// identity: `members` gives, per identity, a representative (pod, address).
    pub fn grants(
        &self,
        cluster: &Cluster,
        subject: &PodInfo,
        ingress: bool,
        members: &BTreeMap<u32, Member>,
    ) -> Vec<Grant> {
        // A rule without ports admits every protocol, ICMP included (NetworkPolicy itself
        // names only TCP, UDP and SCTP; this is what CNIs do for port-less rules).
        const ALL: [u8; 6] = [6, 17, 132, 1, 58, flows_common::PROTO_L4_UNKNOWN];
        let mut out = Vec::new();
        for r in self.rules(ingress) {
            // A rule without peers matches every peer; but an egress named port must be
            // resolved per destination, so such a rule is expanded to every identity.
            let egress_named = !ingress
                && r.ports.iter().any(|p| matches!(p.port, PortMatch::Named(_)));
            let peers: Vec<(u32, Option<&PodInfo>)> = match (&r.peers, egress_named) {
                (None, false) => vec![(flows_common::IDENTITY_ANY, None)],
                _ => members
                    .iter()
                    .filter(|(_, m)| {
                        r.peers.as_ref().is_none_or(|peers| {
                            peers.iter().any(|pe| match pe {
                                // By membership: a sample address of a world prefix may
                                // lie in a longer prefix with other memberships.
                                Peer::Block { cidr, except } => {
                                    m.blocks.iter().any(|(c, e)| c == cidr && e == except)
                                }
                                Peer::Selectors { .. } => m.pod.is_some_and(|p| {
                                    Engine::peer_matches_static(
                                        cluster,
                                        &self.id.namespace,
                                        pe,
                                        &Endpoint::Pod(p, None),
                                        None,
                                    )
                                }),
                            })
                        })
                    })
                    .map(|(id, m)| (*id, m.pod))
                    .collect(),
            };
            for (identity, peer_pod) in peers {
                if r.ports.is_empty() {
                    for protocol in ALL {
                        out.push(Grant { identity, protocol, from: 0, to: 65535 });
                    }
                    continue;
                }
                for spec in &r.ports {
                    match &spec.port {
                        PortMatch::Any => out.push(Grant {
                            identity,
                            protocol: spec.protocol.number(),
                            from: 0,
                            to: 65535,
                        }),
                        PortMatch::Range(a, b) => out.push(Grant {
                            identity,
                            protocol: spec.protocol.number(),
                            from: *a,
                            to: *b,
                        }),
                        PortMatch::Named(name) => {
                            let dst = if ingress { Some(subject) } else { peer_pod };
                            for cp in dst.into_iter().flat_map(|p| p.ports.iter()) {
                                if cp.name.as_deref() == Some(name.as_str()) && cp.protocol == spec.protocol {
                                    out.push(Grant {
                                        identity,
                                        protocol: spec.protocol.number(),
                                        from: cp.port,
                                        to: cp.port,
                                    });
                                }
                            }
                        }
                    }
                }
            }
        }
        out
    }
}

/// What policies can see of an identity: a representative pod (all its pods are alike
/// for every selector) or none for the world, and the ipBlocks its addresses are in.
#[derive(Debug, Clone)]
pub struct Member<'a> {
    pub pod: Option<&'a PodInfo>,
    pub blocks: Vec<(Cidr, Vec<Cidr>)>,
}

/// One thing a policy allows: a peer identity, protocol and port range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    pub identity: u32,
    /// IP protocol number.
    pub protocol: u8,
    pub from: u16,
    pub to: u16,
}

/// One side of a connection attempt.
#[derive(Debug, Clone, Copy)]
pub enum Endpoint<'a> {
    /// A pod, and the address it uses (None: its first address of the other side's family).
    Pod(&'a PodInfo, Option<IpAddr>),
    /// An address outside the cluster (or not known as a pod).
    External(IpAddr),
}

impl Endpoint<'_> {
    fn pod(&self) -> Option<&PodInfo> {
        match self {
            Endpoint::Pod(p, _) => Some(p),
            Endpoint::External(_) => None,
        }
    }
}

/// The decision for one direction (the source's egress or the destination's ingress).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SideDecision {
    pub allowed: bool,
    /// Policies that select the pod for this direction (empty: not isolated).
    pub isolated_by: Vec<PolicyRef>,
    /// Policies with a rule that matched.
    pub allowed_by: Vec<PolicyRef>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub egress: SideDecision,
    pub ingress: SideDecision,
}

impl Decision {
    /// The policies that decided: those whose rules allowed it, or, when denied, those
    /// isolating the side that denied it.
    pub fn deciding(&self) -> Vec<PolicyRef> {
        let mut out: Vec<PolicyRef> = if self.allowed {
            self.egress
                .allowed_by
                .iter()
                .chain(&self.ingress.allowed_by)
                .cloned()
                .collect()
        } else {
            let mut v = Vec::new();
            if !self.egress.allowed {
                v.extend(self.egress.isolated_by.iter().cloned());
            }
            if !self.ingress.allowed {
                v.extend(self.ingress.isolated_by.iter().cloned());
            }
            v
        };
        out.sort();
        out.dedup();
        out
    }
}

/// Compiled policies, indexed by namespace.
#[derive(Debug, Clone, Default)]
pub struct Engine {
    by_ns: BTreeMap<String, Vec<CompiledPolicy>>,
}

fn address(ep: &Endpoint, other: &Endpoint) -> Option<IpAddr> {
    match ep {
        Endpoint::External(ip) => Some(*ip),
        Endpoint::Pod(_, Some(ip)) => Some(*ip),
        Endpoint::Pod(p, None) => {
            let want_v6 = match other {
                Endpoint::External(ip) | Endpoint::Pod(_, Some(ip)) => Some(ip.is_ipv6()),
                Endpoint::Pod(..) => None,
            };
            p.ips
                .iter()
                .find(|ip| want_v6.is_none_or(|v6| ip.is_ipv6() == v6))
                .copied()
        }
    }
}

impl Engine {
    pub fn new(policies: impl IntoIterator<Item = CompiledPolicy>) -> Engine {
        let mut by_ns: BTreeMap<String, Vec<CompiledPolicy>> = BTreeMap::new();
        for p in policies {
            by_ns.entry(p.id.namespace.clone()).or_default().push(p);
        }
        for v in by_ns.values_mut() {
            v.sort_by(|a, b| a.id.cmp(&b.id));
        }
        Engine { by_ns }
    }

    pub fn policies(&self) -> impl Iterator<Item = &CompiledPolicy> {
        self.by_ns.values().flatten()
    }

    fn peer_matches(
        &self,
        cluster: &Cluster,
        policy_ns: &str,
        peer: &Peer,
        ep: &Endpoint,
        ip: Option<IpAddr>,
    ) -> bool {
        Self::peer_matches_static(cluster, policy_ns, peer, ep, ip)
    }

    fn peer_matches_static(
        cluster: &Cluster,
        policy_ns: &str,
        peer: &Peer,
        ep: &Endpoint,
        ip: Option<IpAddr>,
    ) -> bool {
        match peer {
            Peer::Block { cidr, except } => ip.is_some_and(|ip| {
                cidr.contains(ip) && !except.iter().any(|e| e.contains(ip))
            }),
            Peer::Selectors { namespace, pod } => {
                let Some(p) = ep.pod() else { return false };
                let ns_ok = match namespace {
                    None => p.namespace == policy_ns,
                    Some(sel) => cluster
                        .namespace_labels(&p.namespace)
                        .is_some_and(|l| sel.matches(l)),
                };
                ns_ok && pod.as_ref().is_none_or(|s| s.matches(&p.labels))
            }
        }
    }

    /// `dst_pod` is the pod whose containerPorts named ports resolve against.
    fn port_matches(spec: &PortSpec, protocol: Protocol, port: u16, dst_pod: Option<&PodInfo>) -> bool {
        if spec.protocol != protocol {
            return false;
        }
        match &spec.port {
            PortMatch::Any => true,
            PortMatch::Range(a, b) => (*a..=*b).contains(&port),
            PortMatch::Named(name) => dst_pod.is_some_and(|p| {
                p.ports.iter().any(|cp| {
                    cp.name.as_deref() == Some(name.as_str())
                        && cp.protocol == protocol
                        && cp.port == port
                })
            }),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn side(
        &self,
        cluster: &Cluster,
        subject: &PodInfo,
        ingress: bool,
        peer: &Endpoint,
        peer_ip: Option<IpAddr>,
        protocol: Protocol,
        port: u16,
        dst_pod: Option<&PodInfo>,
    ) -> SideDecision {
        let mut d = SideDecision::default();
        for p in self.by_ns.get(&subject.namespace).into_iter().flatten() {
            let rules = if ingress { &p.ingress } else { &p.egress };
            let Some(rules) = rules else { continue };
            if !p.selects(subject) {
                continue;
            }
            d.isolated_by.push(p.id.clone());
            let hit = rules.iter().any(|r| {
                let peer_ok = r.peers.as_ref().is_none_or(|peers| {
                    peers
                        .iter()
                        .any(|pe| self.peer_matches(cluster, &p.id.namespace, pe, peer, peer_ip))
                });
                let port_ok = r.ports.is_empty()
                    || r.ports.iter().any(|s| Self::port_matches(s, protocol, port, dst_pod));
                peer_ok && port_ok
            });
            if hit {
                d.allowed_by.push(p.id.clone());
            }
        }
        d.allowed = d.isolated_by.is_empty() || !d.allowed_by.is_empty();
        d
    }

    /// Decides a new connection from `src` to `dst` on `protocol`/`port`.
    pub fn evaluate(
        &self,
        cluster: &Cluster,
        src: &Endpoint,
        dst: &Endpoint,
        protocol: Protocol,
        port: u16,
    ) -> Decision {
        let src_ip = address(src, dst);
        let dst_ip = address(dst, src);
        let egress = match src.pod() {
            Some(p) => self.side(cluster, p, false, dst, dst_ip, protocol, port, dst.pod()),
            None => SideDecision {
                allowed: true,
                ..Default::default()
            },
        };
        let ingress = match dst.pod() {
            Some(p) => self.side(cluster, p, true, src, src_ip, protocol, port, Some(p)),
            None => SideDecision {
                allowed: true,
                ..Default::default()
            },
        };
        Decision {
            allowed: egress.allowed && ingress.allowed,
            egress,
            ingress,
        }
    }
}
