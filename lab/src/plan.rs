//! Laying out the lab: from the parsed input to a complete `State` (names, nodes, addresses),
//! without touching the system. Everything here is deterministic: the same input and node
//! count give the same names and addresses, so tests and recorded flows stay comparable.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::wiring::CniMode;
use crate::error::LabError;
use crate::spec::{Input, Origin, WorkloadIn, WorkloadKind};
use crate::state::{
    NamespaceRec, Node, OwnerRec, PodRec, PortRec, STATE_VERSION, ServicePortRec, ServiceRec,
    State, WorldRec,
};

/// Node uplinks are 10.99.0.<i+1>; .254 is the world.
pub const MAX_NODES: usize = 252;
/// Pod addresses .2 ... .254 of a node's /24.
pub const MAX_PODS_PER_NODE: usize = 253;

pub use crate::wiring::NODE_BRIDGE;
pub const NODE_UPLINK: &str = "fl-uplink";
pub const UNDERLAY_NETNS: &str = "flows-underlay";
pub const UNDERLAY_BRIDGE: &str = "flbr-u";
pub const WORLD_NETNS: &str = "flows-world";
pub const WORLD_UPLINK_V4: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 254);
pub const WORLD_UPLINK_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 0xfe);
pub const WORLD_IPV4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
pub const WORLD_IPV6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0x10);
/// The world's TCP listeners and its UDP echo.
pub const WORLD_TCP_PORTS: [u16; 2] = [80, 443];
pub const WORLD_UDP_PORTS: [u16; 1] = [123];

/// Every node's pod CIDR lies in these (the cluster CIDRs).
pub const CLUSTER_CIDR_V4: &str = "10.244.0.0/16";
pub const CLUSTER_CIDR_V6: &str = "fd00:10:244::/48";
pub const SERVICE_CIDR_V4: &str = "10.96.0.0/16";
pub const SERVICE_CIDR_V6: &str = "fd00:10:96::/112";
const SERVICE_BASE_V4: u32 = u32::from_be_bytes([10, 96, 0, 0]);
const SERVICE_BASE_V6: u128 = 0xfd00_0010_0096_0000_0000_0000_0000_0000;
/// kube-dns is the 10th address of the service range, as in kubeadm clusters.
const KUBE_DNS_OFFSET: u32 = 10;

pub const KUBE_SYSTEM: &str = "kube-system";
pub const KUBE_DNS_SERVICE: &str = "kube-dns";
pub const COREDNS_DEPLOYMENT: &str = "coredns";
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// The lab's default node count.
pub const DEFAULT_NODES: usize = 2;

pub fn node_name(i: usize) -> String {
    format!("node-{i}")
}

pub fn node_netns(i: usize) -> String {
    format!("flows-node-{i}")
}

/// The underlay-side veth of node i (or "world").
pub fn underlay_port(node: &str) -> String {
    format!("flu-{node}")
}

pub fn node_uplink_v4(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 99, 0, (i + 1) as u8)
}

pub fn node_uplink_v6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, (i + 1) as u16)
}

pub fn node_gateway_v4(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, i as u8, 1)
}

pub fn node_gateway_v6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x10, 0x244, i as u16, 0, 0, 0, 1)
}

pub fn pod_cidr_v4(i: usize) -> String {
    format!("10.244.{i}.0/24")
}

pub fn pod_cidr_v6(i: usize) -> String {
    format!("fd00:10:244:{i:x}::/64")
}

/// The `slot`-th pod of node i (slot 0 is .2 / ::2).
pub fn pod_ipv4(node: usize, slot: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, node as u8, (slot + 2) as u8)
}

pub fn pod_ipv6(node: usize, slot: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x10, 0x244, node as u16, 0, 0, 0, (slot + 2) as u16)
}

pub fn kube_dns_ipv4() -> Ipv4Addr {
    Ipv4Addr::from(SERVICE_BASE_V4 + KUBE_DNS_OFFSET)
}

pub fn kube_dns_ipv6() -> Ipv6Addr {
    Ipv6Addr::from(SERVICE_BASE_V6 + u128::from(KUBE_DNS_OFFSET))
}

/// FNV-1a, 64 bit: small, stable across Rust versions and platforms (unlike `DefaultHasher`).
pub fn fnv64(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // Final mix so low bits depend on every byte (FNV's low bits alone are weak).
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h
}

/// 8 hex digits naming a pod's netns and host veth.
pub fn pod_hash8(namespace: &str, name: &str) -> String {
    format!(
        "{:08x}",
        fnv64(format!("{namespace}/{name}").as_bytes()) as u32
    )
}

pub fn pod_netns(hash8: &str) -> String {
    format!("flows-pod-{hash8}")
}

/// The node's end of a pod's veth where the lab names it; a CNI plugin names its own
/// (known once it has run).
pub fn pod_host_ifname(hash8: &str, cni: CniMode) -> String {
    match cni {
        CniMode::Bridge => format!("fl{hash8}"),
        CniMode::Calico | CniMode::CalicoVxlan => format!("cali{hash8}"),
        CniMode::FlannelVxlan | CniMode::Kindnet => String::new(),
    }
}

/// The pod-template-hash of a Deployment: 10 hex digits of its namespace, name and template.
pub fn pod_template_hash(namespace: &str, name: &str, template: &str) -> String {
    let h = fnv64(format!("{namespace}/{name}\n{template}").as_bytes());
    format!("{:010x}", h & 0xff_ffff_ffff)
}

/// The random-looking suffix of a ReplicaSet's pod, from the alphabet Kubernetes uses.
pub fn pod_suffix(namespace: &str, name: &str, index: u32) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut h = fnv64(format!("{namespace}/{name}/{index}").as_bytes());
    let mut s = String::with_capacity(5);
    for _ in 0..5 {
        s.push(ALPHABET[(h % ALPHABET.len() as u64) as usize] as char);
        h /= ALPHABET.len() as u64;
    }
    s
}

/// A UUID-shaped, deterministic pod uid.
pub fn pod_uid(namespace: &str, name: &str) -> String {
    let a = fnv64(format!("uid/{namespace}/{name}").as_bytes());
    let b = fnv64(format!("uid2/{namespace}/{name}").as_bytes());
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        (b >> 48) & 0x3fff | 0x8000,
        b & 0xffff_ffff_ffff
    )
}

/// The built-in CoreDNS Deployment (appended after the user's workloads).
fn coredns_workload() -> WorkloadIn {
    let port = |name: &str, port: u16, protocol: &str| PortRec {
        name: Some(name.to_string()),
        port,
        protocol: protocol.to_string(),
    };
    WorkloadIn {
        kind: WorkloadKind::Deployment {
            replicas: 1,
            template: "flows-lab built-in coredns v1".to_string(),
        },
        namespace: KUBE_SYSTEM.to_string(),
        name: COREDNS_DEPLOYMENT.to_string(),
        labels: BTreeMap::from([("k8s-app".to_string(), "kube-dns".to_string())]),
        node_name: None,
        ports: vec![
            port("dns", 53, "UDP"),
            port("dns-tcp", 53, "TCP"),
            port("metrics", 9153, "TCP"),
        ],
        origin: Origin {
            file: "(built-in)".into(),
            doc: 0,
            object: "Deployment kube-system/coredns".to_string(),
        },
    }
}

fn kube_dns_service() -> ServiceRec {
    let port = |name: &str, protocol: &str| ServicePortRec {
        name: Some(name.to_string()),
        port: 53,
        target_port: "53".to_string(),
        protocol: protocol.to_string(),
    };
    ServiceRec {
        namespace: KUBE_SYSTEM.to_string(),
        name: KUBE_DNS_SERVICE.to_string(),
        cluster_ipv4: kube_dns_ipv4(),
        cluster_ipv6: kube_dns_ipv6(),
        selector: BTreeMap::from([("k8s-app".to_string(), "kube-dns".to_string())]),
        ports: vec![port("dns", "UDP"), port("dns-tcp", "TCP")],
    }
}

/// True for the built-in DNS pod (its listeners answer DNS instead of echoing).
pub fn is_dns_pod(pod: &PodRec) -> bool {
    pod.namespace == KUBE_SYSTEM
        && pod.labels.get("k8s-app").map(String::as_str) == Some("kube-dns")
        && pod
            .workload
            .as_ref()
            .is_some_and(|w| w.name == COREDNS_DEPLOYMENT)
}

/// Lays out the lab for `nodes` nodes, wired as the `bridge` mode does.
pub fn plan(input: &Input, nodes: usize) -> Result<State, LabError> {
    plan_wired(input, nodes, CniMode::Bridge)
}

/// Lays out the lab for `nodes` nodes wired as `cni` does.
pub fn plan_wired(input: &Input, nodes: usize, cni: CniMode) -> Result<State, LabError> {
    if nodes == 0 || nodes > MAX_NODES {
        return Err(LabError::plan(format!(
            "--nodes {nodes}: must be between 1 and {MAX_NODES}"
        )));
    }
    let node_recs: Vec<Node> = (1..=nodes)
        .map(|i| Node {
            name: node_name(i),
            netns: node_netns(i),
            uplink_ipv4: node_uplink_v4(i),
            uplink_ipv6: node_uplink_v6(i),
            pod_cidr_v4: pod_cidr_v4(i),
            pod_cidr_v6: pod_cidr_v6(i),
            bridge: cni.bridge().unwrap_or_default().to_string(),
        })
        .collect();

    for s in &input.services {
        if s.namespace == KUBE_SYSTEM && s.name == KUBE_DNS_SERVICE {
            return Err(s.origin.err(
                "metadata.name",
                "kube-system/kube-dns is built into the lab",
            ));
        }
    }
    for w in &input.workloads {
        if w.namespace == KUBE_SYSTEM && w.name == COREDNS_DEPLOYMENT {
            return Err(w
                .origin
                .err("metadata.name", "kube-system/coredns is built into the lab"));
        }
    }

    let namespaces = plan_namespaces(input);
    let pods = plan_pods(input, nodes, cni)?;
    let services = plan_services(input)?;

    Ok(State {
        version: STATE_VERSION,
        nodes: node_recs,
        namespaces,
        pods,
        services,
        world: WorldRec {
            netns: WORLD_NETNS.to_string(),
            ipv4: WORLD_IPV4,
            ipv6: WORLD_IPV6,
        },
        daemons: Vec::new(),
        api: None,
        cni,
        masquerade: cni.masquerades_by_default(),
        kube_proxy: None,
    })
}

fn plan_namespaces(input: &Input) -> Vec<NamespaceRec> {
    let mut map: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    map.entry(KUBE_SYSTEM.to_string()).or_default();
    for ns in &input.namespaces {
        // Declared labels merge onto built-in ones (kube-system).
        map.entry(ns.name.clone())
            .or_default()
            .extend(ns.labels.clone());
    }
    let referenced = input
        .workloads
        .iter()
        .map(|w| &w.namespace)
        .chain(input.services.iter().map(|s| &s.namespace));
    for ns in referenced {
        map.entry(ns.clone()).or_default();
    }
    map.into_iter()
        .map(|(name, mut labels)| {
            // As the API server does; it cannot be overridden.
            labels.insert(NAMESPACE_NAME_LABEL.to_string(), name.clone());
            NamespaceRec { name, labels }
        })
        .collect()
}

/// One pod of a workload: name, labels, owner, workload.
type Instance = (
    String,
    BTreeMap<String, String>,
    Option<OwnerRec>,
    Option<OwnerRec>,
);

fn plan_pods(input: &Input, nodes: usize, cni: CniMode) -> Result<Vec<PodRec>, LabError> {
    let coredns = coredns_workload();
    let workloads = input.workloads.iter().chain(std::iter::once(&coredns));

    let mut pods = Vec::new();
    let mut names = HashSet::new();
    let mut hashes = HashSet::new();
    let mut per_node = vec![0usize; nodes + 1];
    let mut next_node = 0usize;

    for w in workloads {
        let pinned = match &w.node_name {
            Some(n) => match n
                .strip_prefix("node-")
                .and_then(|i| i.parse::<usize>().ok())
            {
                Some(i) if (1..=nodes).contains(&i) && *n == node_name(i) => Some(i),
                _ => {
                    tracing::warn!(object = %w.origin.object, node = %n, "spec.nodeName is not a lab node; placing round-robin");
                    None
                }
            },
            None => None,
        };
        let instances: Vec<Instance> = match &w.kind {
            WorkloadKind::Pod => vec![(w.name.clone(), w.labels.clone(), None, None)],
            WorkloadKind::Deployment { replicas, template } => {
                let hash = pod_template_hash(&w.namespace, &w.name, template);
                let rs = format!("{}-{hash}", w.name);
                let mut labels = w.labels.clone();
                labels.insert("pod-template-hash".to_string(), hash.clone());
                let mut out = Vec::new();
                let mut suffixes = HashSet::new();
                let mut salt = 0u32;
                for index in 0..*replicas {
                    // A repeated suffix would repeat a pod name: derive another one.
                    let mut suffix = pod_suffix(&w.namespace, &w.name, index + salt);
                    while !suffixes.insert(suffix.clone()) {
                        salt += 1_000_003;
                        suffix = pod_suffix(&w.namespace, &w.name, index + salt);
                    }
                    out.push((
                        format!("{rs}-{suffix}"),
                        labels.clone(),
                        Some(OwnerRec {
                            kind: "ReplicaSet".to_string(),
                            name: rs.clone(),
                        }),
                        Some(OwnerRec {
                            kind: "Deployment".to_string(),
                            name: w.name.clone(),
                        }),
                    ));
                }
                out
            }
        };
        for (name, labels, owner, workload) in instances {
            if !names.insert((w.namespace.clone(), name.clone())) {
                return Err(w.origin.err(
                    "metadata.name",
                    format!("pod {}/{name} already exists", w.namespace),
                ));
            }
            let node = match pinned {
                Some(i) => i,
                None => {
                    let i = next_node % nodes + 1;
                    next_node += 1;
                    i
                }
            };
            let slot = per_node[node];
            if slot >= MAX_PODS_PER_NODE {
                return Err(LabError::plan(format!(
                    "{} would get more than {MAX_PODS_PER_NODE} pods; use more --nodes",
                    node_name(node)
                )));
            }
            per_node[node] += 1;
            // A hash collision between two pods would clash netns names: salt and retry.
            let mut hash8 = pod_hash8(&w.namespace, &name);
            let mut salt = 0;
            while !hashes.insert(hash8.clone()) {
                salt += 1;
                hash8 = pod_hash8(&w.namespace, &format!("{name}#{salt}"));
            }
            pods.push(PodRec {
                uid: pod_uid(&w.namespace, &name),
                namespace: w.namespace.clone(),
                labels,
                node: node_name(node),
                netns: pod_netns(&hash8),
                host_ifname: pod_host_ifname(&hash8, cni),
                ipv4: pod_ipv4(node, slot),
                ipv6: pod_ipv6(node, slot),
                ports: w.ports.clone(),
                owner,
                workload,
                name,
            });
        }
    }
    Ok(pods)
}

fn plan_services(input: &Input) -> Result<Vec<ServiceRec>, LabError> {
    // Offsets into the service range; allocated in sorted order so input order does not matter.
    let mut used: BTreeSet<u32> = BTreeSet::from([KUBE_DNS_OFFSET]);
    let mut order: Vec<usize> = (0..input.services.len()).collect();
    order.sort_by(|&a, &b| {
        let (a, b) = (&input.services[a], &input.services[b]);
        (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name))
    });
    // Offsets 2..=65534: not the network, not .1 (the "router"), not the last.
    const FIRST: u32 = 2;
    const COUNT: u32 = 65534 - FIRST + 1;
    let mut offsets = vec![0u32; input.services.len()];
    for i in order {
        let s = &input.services[i];
        if used.len() as u32 >= COUNT {
            return Err(LabError::plan("the service range 10.96.0.0/16 is full"));
        }
        let mut off = FIRST
            + (fnv64(format!("svc/{}/{}", s.namespace, s.name).as_bytes()) % u64::from(COUNT))
                as u32;
        while used.contains(&off) {
            off = if off >= FIRST + COUNT - 1 {
                FIRST
            } else {
                off + 1
            };
        }
        used.insert(off);
        offsets[i] = off;
    }
    let mut services = vec![kube_dns_service()];
    for (s, off) in input.services.iter().zip(offsets) {
        services.push(ServiceRec {
            namespace: s.namespace.clone(),
            name: s.name.clone(),
            cluster_ipv4: Ipv4Addr::from(SERVICE_BASE_V4 + off),
            cluster_ipv6: Ipv6Addr::from(SERVICE_BASE_V6 + u128::from(off)),
            selector: s.selector.clone(),
            ports: s.ports.clone(),
        });
    }
    Ok(services)
}

/// One backend of one service port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub namespace: String,
    pub pod: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    /// The port on the pod (a named targetPort may resolve differently per pod).
    pub port: u16,
}

impl Endpoint {
    pub fn ip(&self, v6: bool) -> IpAddr {
        if v6 {
            IpAddr::V6(self.ipv6)
        } else {
            IpAddr::V4(self.ipv4)
        }
    }
}

/// The endpoints of one port of a service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortEndpoints {
    pub port: ServicePortRec,
    pub endpoints: Vec<Endpoint>,
}

/// True if a (non-empty) selector selects these labels.
pub fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// What kube-proxy would program for a service: per service port, the selected pods of the
/// service's namespace and the port on each (a named targetPort resolves against each pod's
/// container port names of the same protocol; pods without that name are not endpoints).
pub fn endpoints(state: &State, svc: &ServiceRec) -> Vec<PortEndpoints> {
    let selected: Vec<&PodRec> = state
        .pods
        .iter()
        .filter(|p| p.namespace == svc.namespace && selects(&svc.selector, &p.labels))
        .collect();
    svc.ports
        .iter()
        .map(|sp| {
            let endpoints = selected
                .iter()
                .filter_map(|p| {
                    let port = match sp.target_port.parse::<u16>() {
                        Ok(n) => n,
                        Err(_) => {
                            p.ports
                                .iter()
                                .find(|cp| {
                                    cp.name.as_deref() == Some(sp.target_port.as_str())
                                        && cp.protocol == sp.protocol
                                })?
                                .port
                        }
                    };
                    Some(Endpoint {
                        namespace: p.namespace.clone(),
                        pod: p.name.clone(),
                        ipv4: p.ipv4,
                        ipv6: p.ipv6,
                        port,
                    })
                })
                .collect();
            PortEndpoints {
                port: sp.clone(),
                endpoints,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::parse_str;
    use std::path::Path;

    const INPUT: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: kube-system, labels: {contains: coredns}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: api, namespace: backend}
spec:
  replicas: 3
  selector: {matchLabels: {app: api}}
  template:
    metadata: {labels: {app: api}}
    spec:
      containers: [{name: c, ports: [{name: http, containerPort: 8080}, {name: metrics, containerPort: 5353, protocol: UDP}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: legacy, namespace: backend, labels: {app: api}}
spec:
  containers: [{name: c, ports: [{name: http, containerPort: 9090}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: pinned, namespace: frontend}
spec:
  nodeName: node-2
  containers: [{name: c}]
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: backend}
spec:
  selector: {app: api}
  ports:
  - {name: http, port: 80, targetPort: http}
  - {name: raw, port: 81, targetPort: 8080}
  - {name: udp, port: 5353, targetPort: metrics, protocol: UDP}
---
apiVersion: v1
kind: Service
metadata: {name: other, namespace: frontend}
spec:
  ports: [{port: 80}]
"#;

    fn input() -> Input {
        let mut input = Input::default();
        parse_str(Path::new("in.yaml"), INPUT, &mut input).expect("valid input");
        input
    }

    #[test]
    fn plan_is_deterministic() {
        let a = plan(&input(), 2).expect("plan");
        let b = plan(&input(), 2).expect("plan");
        assert_eq!(a, b);
    }

    #[test]
    fn deployment_pods_are_named_like_kubernetes() {
        let state = plan(&input(), 2).expect("plan");
        let api = state.deployment_pods("backend", "api");
        assert_eq!(api.len(), 3);
        for p in &api {
            let rest = p.name.strip_prefix("api-").expect("prefix");
            let (hash, suffix) = rest.split_once('-').expect("hash-suffix");
            assert_eq!(hash.len(), 10);
            assert!(
                hash.bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
            );
            assert_eq!(suffix.len(), 5);
            assert!(
                suffix
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
            );
            assert_eq!(
                p.labels.get("pod-template-hash").map(String::as_str),
                Some(hash)
            );
            let owner = p.owner.as_ref().expect("owner");
            assert_eq!(
                (owner.kind.as_str(), owner.name.as_str()),
                ("ReplicaSet", &*format!("api-{hash}"))
            );
            let wl = p.workload.as_ref().expect("workload");
            assert_eq!((wl.kind.as_str(), wl.name.as_str()), ("Deployment", "api"));
            assert_eq!(
                p.netns,
                format!("flows-pod-{}", pod_hash8("backend", &p.name))
            );
            assert_eq!(
                p.host_ifname,
                format!("fl{}", pod_hash8("backend", &p.name))
            );
            assert!(p.host_ifname.len() <= 15);
        }
        let uids: HashSet<_> = state.pods.iter().map(|p| &p.uid).collect();
        assert_eq!(uids.len(), state.pods.len());
    }

    #[test]
    fn pods_round_robin_with_pinning_and_sequential_addresses() {
        let state = plan(&input(), 2).expect("plan");
        let placed: Vec<(&str, &str, Ipv4Addr, Ipv6Addr)> = state
            .pods
            .iter()
            .map(|p| (p.name.as_str(), p.node.as_str(), p.ipv4, p.ipv6))
            .collect();
        // api x3 round-robin, legacy continues it, pinned stays on node-2, coredns last.
        assert_eq!(placed[0].1, "node-1");
        assert_eq!(placed[1].1, "node-2");
        assert_eq!(placed[2].1, "node-1");
        assert_eq!(
            placed[3],
            (
                "legacy",
                "node-2",
                "10.244.2.3".parse().unwrap(),
                "fd00:10:244:2::3".parse().unwrap()
            )
        );
        assert_eq!(
            placed[4],
            (
                "pinned",
                "node-2",
                "10.244.2.4".parse().unwrap(),
                "fd00:10:244:2::4".parse().unwrap()
            )
        );
        assert_eq!(placed[0].2, Ipv4Addr::new(10, 244, 1, 2));
        assert_eq!(placed[2].2, Ipv4Addr::new(10, 244, 1, 3));
        let dns = state.pods.last().expect("coredns");
        assert!(dns.name.starts_with("coredns-"));
        assert!(is_dns_pod(dns));
        assert_eq!(dns.node, "node-1");
    }

    #[test]
    fn namespaces_get_the_name_label_and_merge_kube_system() {
        let state = plan(&input(), 2).expect("plan");
        let names: Vec<_> = state.namespaces.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["backend", "frontend", "kube-system"]);
        let ks = &state.namespaces[2];
        assert_eq!(
            ks.labels.get("contains").map(String::as_str),
            Some("coredns")
        );
        assert_eq!(
            ks.labels.get(NAMESPACE_NAME_LABEL).map(String::as_str),
            Some("kube-system")
        );
    }

    #[test]
    fn service_ips_are_deterministic_and_avoid_reserved() {
        let state = plan(&input(), 2).expect("plan");
        let dns = state
            .service(KUBE_SYSTEM, KUBE_DNS_SERVICE)
            .expect("kube-dns");
        assert_eq!(dns.cluster_ipv4, Ipv4Addr::new(10, 96, 0, 10));
        assert_eq!(
            dns.cluster_ipv6,
            "fd00:10:96::a".parse::<Ipv6Addr>().unwrap()
        );
        let api = state.service("backend", "api").expect("api");
        let other = state.service("frontend", "other").expect("other");
        assert_ne!(api.cluster_ipv4, other.cluster_ipv4);
        for s in [api, other] {
            let off = u32::from(s.cluster_ipv4) - SERVICE_BASE_V4;
            assert!((2..=65534).contains(&off) && off != 10);
            assert_eq!(
                u128::from(s.cluster_ipv6) - SERVICE_BASE_V6,
                u128::from(off)
            );
        }
        // Input order does not change allocation.
        let mut rev = input();
        rev.services.reverse();
        let state2 = plan(&rev, 2).expect("plan");
        assert_eq!(
            state2.service("backend", "api").map(|s| s.cluster_ipv4),
            Some(api.cluster_ipv4)
        );
    }

    #[test]
    fn named_target_ports_resolve_per_pod() {
        let state = plan(&input(), 2).expect("plan");
        let api = state.service("backend", "api").expect("api");
        let eps = endpoints(&state, api);
        let http = &eps[0];
        // 3 deployment pods on 8080 and the legacy pod on 9090 (its "http").
        let mut ports: Vec<u16> = http.endpoints.iter().map(|e| e.port).collect();
        ports.sort();
        assert_eq!(ports, [8080, 8080, 8080, 9090]);
        // A numeric targetPort is used as is for every selected pod.
        assert!(eps[1].endpoints.iter().all(|e| e.port == 8080));
        assert_eq!(eps[1].endpoints.len(), 4);
        // UDP "metrics" only exists on the deployment pods, with protocol UDP.
        assert_eq!(eps[2].endpoints.len(), 3);
        assert!(eps[2].endpoints.iter().all(|e| e.port == 5353));
        // No selector: no endpoints.
        let other = state.service("frontend", "other").expect("other");
        assert!(endpoints(&state, other)[0].endpoints.is_empty());
        // kube-dns selects coredns.
        let dns = state
            .service(KUBE_SYSTEM, KUBE_DNS_SERVICE)
            .expect("kube-dns");
        let dns_eps = endpoints(&state, dns);
        assert_eq!(dns_eps.len(), 2);
        assert_eq!(dns_eps[0].endpoints.len(), 1);
    }

    #[test]
    fn node_limits() {
        assert!(matches!(plan(&input(), 0), Err(LabError::Plan { .. })));
        assert!(matches!(
            plan(&input(), MAX_NODES + 1),
            Err(LabError::Plan { .. })
        ));
        let state = plan(&input(), 3).expect("plan");
        assert_eq!(state.nodes[2].name, "node-3");
        assert_eq!(state.nodes[2].netns, "flows-node-3");
        assert_eq!(state.nodes[2].uplink_ipv4, Ipv4Addr::new(10, 99, 0, 4));
        assert_eq!(
            state.nodes[2].uplink_ipv6,
            "fd00:99::4".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(state.nodes[2].pod_cidr_v4, "10.244.3.0/24");
        assert_eq!(state.nodes[2].pod_cidr_v6, "fd00:10:244:3::/64");
    }

    #[test]
    fn too_many_pods_for_one_node() {
        let text = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: big}\nspec:\n  replicas: 300\n  template:\n    metadata: {labels: {a: b}}\n    spec: {containers: [{name: c}]}\n  selector: {matchLabels: {a: b}}\n";
        let mut input = Input::default();
        parse_str(Path::new("big.yaml"), text, &mut input).expect("valid");
        assert!(matches!(plan(&input, 1), Err(LabError::Plan { .. })));
        let state = plan(&input, 2).expect("fits on 2 nodes");
        assert_eq!(state.pods.len(), 301);
        let names: HashSet<_> = state.pods.iter().map(|p| &p.name).collect();
        assert_eq!(names.len(), 301);
        let netns: HashSet<_> = state.pods.iter().map(|p| &p.netns).collect();
        assert_eq!(netns.len(), 301);
    }

    #[test]
    fn builtins_cannot_be_redeclared() {
        let text = "apiVersion: v1\nkind: Service\nmetadata: {name: kube-dns, namespace: kube-system}\nspec: {ports: [{port: 53}]}\n";
        let mut input = Input::default();
        parse_str(Path::new("x.yaml"), text, &mut input).expect("valid");
        assert!(matches!(plan(&input, 2), Err(LabError::Spec { .. })));
    }

    #[test]
    fn hashes_are_stable() {
        // Pinned values: changing the hash changes every name and recorded flow.
        assert_eq!(fnv64(b""), fnv64(b""));
        assert_eq!(pod_hash8("a", "b"), pod_hash8("a", "b"));
        assert_ne!(pod_hash8("a", "b"), pod_hash8("a", "c"));
        assert_eq!(pod_suffix("ns", "d", 0).len(), 5);
        assert_ne!(pod_suffix("ns", "d", 0), pod_suffix("ns", "d", 1));
        let uid = pod_uid("a", "b");
        assert_eq!(uid.len(), 36);
        assert_eq!(uid.matches('-').count(), 4);
    }
}
