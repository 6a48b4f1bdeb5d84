//! Policies compiled into the state a datapath enforces, Cilium-style but exact.
//!
//! * **Identities.** Addresses are grouped into identities: two addresses share one when
//!   no policy can tell them apart — same pod labels, same namespace labels, same
//!   membership in every ipBlock, and the same numbers for every named port an egress
//!   rule uses. Identities are allocated by an [`IdentityAllocator`] that keeps numbers
//!   stable across recompiles, so an update only touches what changed.
//! * **ipcache.** Prefix → identity: every pod address as a host prefix, every ipBlock
//!   cidr and except as its prefix, and 0.0.0.0/0 and ::/0 for the rest of the world.
//!   Prefixes nest or are disjoint, so the longest match is the right identity.
//! * **Policy entries.** Per local endpoint and direction: (peer identity or ANY,
//!   protocol, port prefix) → the set of policies that allow it. Port ranges are
//!   partitioned so that one longest-prefix lookup returns *every* allowing policy, and
//!   ANY-peer rules are folded into the specific identities' entries for the same reason.
//! * **Endpoints.** Per local pod address: its number, whether each direction is
//!   isolated and by which policies, and the enforcement mode of its namespace.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
};

use crate::{
    cidr::Cidr,
    eval::{Cluster, CompiledPolicy, Engine, PodInfo, PolicyRef, Protocol},
    selector::Labels,
};

pub use crate::eval::Member;

/// Identity of any peer (rules without `from`/`to`): the datapath's number.
pub const IDENTITY_ANY: u32 = flows_common::IDENTITY_ANY;
/// Addresses outside the cluster that no ipBlock mentions: the datapath's number.
pub const IDENTITY_WORLD: u32 = flows_common::IDENTITY_WORLD;
/// First number handed out to computed identities.
pub const IDENTITY_FIRST: u32 = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Mode {
    /// Observe only.
    Off,
    /// Evaluate and report AUDIT for what would be denied; drop nothing.
    Audit,
    /// Drop what policy denies.
    Enforce,
}

impl Mode {
    pub fn parse(s: &str) -> Option<Mode> {
        match s {
            "off" => Some(Mode::Off),
            "audit" => Some(Mode::Audit),
            "enforce" => Some(Mode::Enforce),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    Ingress,
    Egress,
}

/// What makes two addresses distinguishable by the policies in force.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IdentityKey {
    Pod {
        namespace: String,
        labels: Vec<(String, String)>,
        namespace_labels: Vec<(String, String)>,
        blocks: Vec<usize>,
        named_ports: Vec<(String, Protocol, u16)>,
    },
    World {
        blocks: Vec<usize>,
    },
}


/// Hands out identity and endpoint numbers, stable for as long as their key stays in
/// use, so that a change renumbers nothing else (and rewrites no unrelated entry).
#[derive(Debug, Clone, Default)]
pub struct IdentityAllocator {
    ids: HashMap<IdentityKey, u32>,
    next: u32,
    endpoints: HashMap<(String, String), u32>,
    next_endpoint: u32,
}

impl IdentityAllocator {
    pub fn new() -> IdentityAllocator {
        IdentityAllocator {
            ids: HashMap::new(),
            next: IDENTITY_FIRST,
            endpoints: HashMap::new(),
            next_endpoint: 1,
        }
    }

    fn endpoint(&mut self, pod: &PodInfo) -> u32 {
        let key = (pod.namespace.clone(), pod.name.clone());
        if let Some(&id) = self.endpoints.get(&key) {
            return id;
        }
        let id = self.next_endpoint;
        self.next_endpoint += 1;
        self.endpoints.insert(key, id);
        id
    }

    fn get(&mut self, key: &IdentityKey) -> u32 {
        if let IdentityKey::World { blocks } = key {
            if blocks.is_empty() {
                return IDENTITY_WORLD;
            }
        }
        if let Some(&id) = self.ids.get(key) {
            return id;
        }
        let id = self.next;
        self.next += 1;
        self.ids.insert(key.clone(), id);
        id
    }

    /// Forgets keys not used by the latest compile (their numbers are not reused).
    fn retain(&mut self, used: &BTreeSet<u32>, used_endpoints: &BTreeSet<u32>) {
        self.ids.retain(|_, id| used.contains(id));
        self.endpoints.retain(|_, id| used_endpoints.contains(id));
    }
}

/// A policy entry's key: which endpoint, direction, peer identity, protocol, and a port
/// prefix (`port_bits` leading bits of `port` significant).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    pub endpoint: u32,
    pub identity: u32,
    pub direction: Direction,
    /// IP protocol number.
    pub protocol: u8,
    pub port: u16,
    pub port_bits: u8,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointEntry {
    pub endpoint: u32,
    pub pod: (String, String),
    pub mode: Mode,
    /// Set id of the policies isolating each direction (None: not isolated).
    pub ingress_isolation: Option<u32>,
    pub egress_isolation: Option<u32>,
}

/// Everything a datapath needs, with policy sets referenced by number.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DatapathState {
    pub ipcache: BTreeMap<Cidr, u32>,
    pub endpoints: BTreeMap<IpAddr, EndpointEntry>,
    pub policy: BTreeMap<PolicyKey, u32>,
    /// Policy sets: id → sorted policies. Id 0 is the empty set.
    pub sets: SetTable,
}

impl PartialEq for SetTable {
    fn eq(&self, other: &Self) -> bool {
        self.list == other.list
    }
}

impl Eq for SetTable {}

impl DatapathState {
    pub fn set(&self, id: u32) -> &[PolicyRef] {
        self.sets.get(id)
    }
}

/// Numbers for sets of policies, stable across compiles (events in flight name sets by
/// number). Grows with the distinct sets ever seen.
#[derive(Debug, Clone)]
pub struct SetTable {
    ids: HashMap<Vec<PolicyRef>, u32>,
    list: Vec<Vec<PolicyRef>>,
}

impl Default for SetTable {
    fn default() -> Self {
        SetTable::new()
    }
}

impl SetTable {
    pub fn new() -> SetTable {
        SetTable {
            ids: HashMap::from([(Vec::new(), 0)]),
            list: vec![Vec::new()],
        }
    }

    fn id(&mut self, set: &BTreeSet<PolicyRef>) -> u32 {
        let v: Vec<PolicyRef> = set.iter().cloned().collect();
        if let Some(&id) = self.ids.get(&v) {
            return id;
        }
        let id = self.list.len() as u32;
        self.ids.insert(v.clone(), id);
        self.list.push(v);
        id
    }

    pub fn get(&self, id: u32) -> &[PolicyRef] {
        self.list.get(id as usize).map(|v| v.as_slice()).unwrap_or(&[])
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.len() <= 1
    }
}

/// The ipBlocks of all policies, deduplicated, each as (cidr, excepts).
fn blocks(engine: &Engine) -> Vec<(Cidr, Vec<Cidr>)> {
    let mut out: Vec<(Cidr, Vec<Cidr>)> = Vec::new();
    for p in engine.policies() {
        for b in p.ip_blocks() {
            if !out.contains(&b) {
                out.push(b);
            }
        }
    }
    out
}

/// The blocks that contain every address of `p` not covered by a longer listed prefix:
/// a block counts when its cidr covers all of `p` and none of its excepts does. (For a
/// host prefix that is plain membership of the address.)
fn block_bits(blocks: &[(Cidr, Vec<Cidr>)], p: Cidr) -> Vec<usize> {
    let covers = |c: &Cidr| c.len <= p.len && c.contains(p.addr);
    blocks
        .iter()
        .enumerate()
        .filter(|(_, (c, ex))| covers(c) && !ex.iter().any(covers))
        .map(|(i, _)| i)
        .collect()
}

fn host(ip: IpAddr) -> Cidr {
    Cidr {
        addr: ip,
        len: if ip.is_ipv4() { 32 } else { 128 },
    }
}

fn sorted(l: &Labels) -> Vec<(String, String)> {
    l.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// Decomposes [a, b] into port prefixes (value, significant bits).
pub fn port_prefixes(a: u16, b: u16) -> Vec<(u16, u8)> {
    let mut out = Vec::new();
    let (mut lo, hi) = (a as u32, b as u32);
    while lo <= hi {
        // The largest aligned block starting at lo that stays within hi.
        let mut size: u32 = if lo == 0 { 1 << 16 } else { 1 << lo.trailing_zeros().min(16) };
        while lo + size - 1 > hi {
            size >>= 1;
        }
        out.push((lo as u16, (16 - size.trailing_zeros()) as u8));
        lo += size;
    }
    out
}

/// Port intervals → disjoint pieces, each with the union of the sets covering it.
fn partition(intervals: &[(u16, u16, PolicyRef)]) -> Vec<(u16, u16, BTreeSet<PolicyRef>)> {
    let mut cuts: BTreeSet<u32> = BTreeSet::new();
    for (a, b, _) in intervals {
        cuts.insert(*a as u32);
        cuts.insert(*b as u32 + 1);
    }
    let cuts: Vec<u32> = cuts.into_iter().collect();
    let mut out: Vec<(u16, u16, BTreeSet<PolicyRef>)> = Vec::new();
    for w in cuts.windows(2) {
        let (lo, hi) = (w[0], w[1] - 1);
        let set: BTreeSet<PolicyRef> = intervals
            .iter()
            .filter(|(a, b, _)| (*a as u32) <= lo && hi <= *b as u32)
            .map(|(_, _, p)| p.clone())
            .collect();
        if set.is_empty() {
            continue;
        }
        // Merge with the previous piece when contiguous and identical.
        if let Some(last) = out.last_mut() {
            if last.1 as u32 + 1 == lo && last.2 == set {
                last.1 = hi as u16;
                continue;
            }
        }
        out.push((lo as u16, hi as u16, set));
    }
    out
}

/// Input about this node: which pods are local, and each namespace's mode.
pub struct NodeView<'a> {
    pub is_local: &'a dyn Fn(&PodInfo) -> bool,
    pub mode_of: &'a dyn Fn(&str) -> Mode,
}

/// Compiles the cluster and policies into datapath state for one node.
pub fn compile_datapath(
    cluster: &Cluster,
    engine: &Engine,
    node: &NodeView,
    alloc: &mut IdentityAllocator,
    sets: SetTable,
) -> DatapathState {
    let mut sets = sets;
    let (ipcache, members) = identities(cluster, engine, alloc);

    let mut endpoints = BTreeMap::new();
    let mut policy = BTreeMap::new();
    let mut local: Vec<&PodInfo> = cluster.pods().iter().filter(|p| (node.is_local)(p)).collect();
    local.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    // Every local pod's number is in use, addresses or not: a pod without one yet (or
    // whose address another pod took) must keep its number, or each recompile renumbers
    // it and rewrites all of its policy entries.
    let mut used_endpoints: BTreeSet<u32> = BTreeSet::new();
    for pod in local {
        let endpoint = alloc.endpoint(pod);
        used_endpoints.insert(endpoint);
        let isolation = [Direction::Ingress, Direction::Egress]
            .map(|dir| pod_direction(cluster, engine, pod, endpoint, dir, &members, &mut sets, &mut policy));
        for ip in &pod.ips {
            endpoints.insert(
                *ip,
                EndpointEntry {
                    endpoint,
                    pod: (pod.namespace.clone(), pod.name.clone()),
                    mode: (node.mode_of)(&pod.namespace),
                    ingress_isolation: isolation[0],
                    egress_isolation: isolation[1],
                },
            );
        }
    }
    // Every identity this compile handed out is in use, also one whose pod lost its
    // address to another pod in the ipcache: forgotten, it would be renumbered on each
    // recompile (and every entry naming it rewritten).
    let used: BTreeSet<u32> = members.keys().copied().collect();
    alloc.retain(&used, &used_endpoints);
    DatapathState {
        ipcache,
        endpoints,
        policy,
        sets,
    }
}

/// Every address's identity (pods' own, and the world's prefixes: ipBlocks, their
/// excepts, the default routes), and per identity a representative pod (None for the
/// world) with the ipBlocks it is in.
fn identities<'a>(
    cluster: &'a Cluster,
    engine: &Engine,
    alloc: &mut IdentityAllocator,
) -> (BTreeMap<Cidr, u32>, BTreeMap<u32, Member<'a>>) {
    let blocks = blocks(engine);
    let named: Vec<String> = engine
        .policies()
        .flat_map(|p| p.egress_named_ports())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let empty = Labels::new();

    // Identities of every pod address, and a representative pod per identity.
    let mut ipcache: BTreeMap<Cidr, u32> = BTreeMap::new();
    // Per identity: a representative pod (None for the world) and the ipBlocks it is in.
    let mut members: BTreeMap<u32, Member> = BTreeMap::new();
    for pod in cluster.pods() {
        for ip in &pod.ips {
            let named_ports = named
                .iter()
                .flat_map(|n| {
                    pod.ports
                        .iter()
                        .filter(move |cp| cp.name.as_deref() == Some(n.as_str()))
                        .map(move |cp| (n.clone(), cp.protocol, cp.port))
                })
                .collect();
            let bits = block_bits(&blocks, host(*ip));
            let in_blocks = bits.iter().map(|&i| blocks[i].clone()).collect();
            let key = IdentityKey::Pod {
                namespace: pod.namespace.clone(),
                labels: sorted(&pod.labels),
                namespace_labels: sorted(cluster.namespace_labels(&pod.namespace).unwrap_or(&empty)),
                blocks: bits,
                named_ports,
            };
            let id = alloc.get(&key);
            ipcache.insert(host(*ip), id);
            members.entry(id).or_insert(Member {
                pod: Some(pod),
                blocks: in_blocks,
            });
        }
    }
    // The world: every ipBlock prefix (and except), plus the default routes.
    let mut prefixes: BTreeSet<Cidr> = BTreeSet::new();
    for (c, ex) in &blocks {
        prefixes.insert(*c);
        prefixes.extend(ex.iter().copied());
    }
    for d in ["0.0.0.0/0", "::/0"] {
        if let Some(c) = Cidr::parse(d) {
            prefixes.insert(c);
        }
    }
    for p in prefixes {
        if ipcache.contains_key(&p) {
            continue; // a pod's own address, already an identity
        }
        // Prefixes nest or are disjoint, so every address this prefix is the longest
        // match for is in exactly the blocks that cover the whole prefix.
        let bits = block_bits(&blocks, p);
        let in_blocks = bits.iter().map(|&i| blocks[i].clone()).collect();
        let id = alloc.get(&IdentityKey::World { blocks: bits });
        ipcache.insert(p, id);
        members.entry(id).or_insert(Member {
            pod: None,
            blocks: in_blocks,
        });
    }
    (ipcache, members)
}

/// The policy entries of one local pod in one direction, into `policy`; the set of
/// policies isolating it that way (None: not isolated).
#[allow(clippy::too_many_arguments)]
fn pod_direction(
    cluster: &Cluster,
    engine: &Engine,
    pod: &PodInfo,
    endpoint: u32,
    dir: Direction,
    members: &BTreeMap<u32, Member>,
    sets: &mut SetTable,
    policy: &mut BTreeMap<PolicyKey, u32>,
) -> Option<u32> {
    let selecting: Vec<&CompiledPolicy> = engine
        .policies()
        .filter(|p| p.selects(pod) && p.affects(dir == Direction::Ingress))
        .collect();
    if selecting.is_empty() {
        return None;
    }
    let isolation = sets.id(&selecting.iter().map(|p| p.id.clone()).collect());
    // (identity, protocol) → port intervals with the allowing policy.
    let mut grants: BTreeMap<(u32, u8), Vec<(u16, u16, PolicyRef)>> = BTreeMap::new();
    for p in &selecting {
        for g in p.grants(cluster, pod, dir == Direction::Ingress, members) {
            grants
                .entry((g.identity, g.protocol))
                .or_default()
                .push((g.from, g.to, p.id.clone()));
        }
    }
    // Fold ANY-peer grants into each specific identity's, so that the first
    // (specific) lookup alone names every allowing policy.
    let any: Vec<((u32, u8), Vec<(u16, u16, PolicyRef)>)> = grants
        .iter()
        .filter(|((id, _), _)| *id == IDENTITY_ANY)
        .map(|(k, v)| (*k, v.clone()))
        .collect();
    for ((id, proto), v) in grants.iter_mut() {
        if *id == IDENTITY_ANY {
            continue;
        }
        for ((_, aproto), av) in &any {
            if aproto == proto {
                v.extend(av.iter().cloned());
            }
        }
    }
    for ((identity, protocol), intervals) in grants {
        for (lo, hi, set) in partition(&intervals) {
            let set_id = sets.id(&set);
            for (port, port_bits) in port_prefixes(lo, hi) {
                policy.insert(
                    PolicyKey {
                        endpoint,
                        identity,
                        direction: dir,
                        protocol,
                        port,
                        port_bits,
                    },
                    set_id,
                );
            }
        }
    }
    Some(isolation)
}

/// What a datapath holding `state` decides (used to check the compile against the
/// evaluator): ipcache longest match, then the specific identity, then ANY.
pub fn lookup(
    state: &DatapathState,
    endpoint: u32,
    direction: Direction,
    peer: IpAddr,
    protocol: Protocol,
    port: u16,
) -> Option<u32> {
    let protocol = protocol.number();
    let identity = state
        .ipcache
        .iter()
        .filter(|(c, _)| c.contains(peer))
        .max_by_key(|(c, _)| c.len)
        .map(|(_, id)| *id)
        .unwrap_or(IDENTITY_WORLD);
    for id in [identity, IDENTITY_ANY] {
        let best = state
            .policy
            .iter()
            .filter(|(k, _)| {
                k.endpoint == endpoint
                    && k.identity == id
                    && k.direction == direction
                    && k.protocol == protocol
                    && (k.port_bits == 0
                        || (port >> (16 - k.port_bits as u32)) == (k.port >> (16 - k.port_bits as u32)))
            })
            .max_by_key(|(k, _)| k.port_bits);
        if let Some((_, set)) = best {
            return Some(*set);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_become_prefixes() {
        assert_eq!(port_prefixes(80, 80), vec![(80, 16)]);
        assert_eq!(port_prefixes(0, 65535), vec![(0, 0)]);
        assert_eq!(port_prefixes(1, 65535).len(), 16);
        let p = port_prefixes(1000, 2000);
        let mut covered = 0u32;
        for (v, bits) in &p {
            let size = 1u32 << (16 - bits);
            assert_eq!(*v as u32 % size, 0, "aligned");
            covered += size;
        }
        assert_eq!(covered, 1001);
        assert_eq!(p.first().map(|x| x.0), Some(1000));
    }

    #[test]
    fn adding_a_pod_rewrites_only_what_it_touches() {
        let (mut cluster, policies) = crate::synthetic::cluster(20, 20, 10, 4);
        let engine = Engine::new(policies);
        let is_local = |p: &PodInfo| p.node.as_deref() == Some("node-0");
        let mode_of = |_: &str| Mode::Enforce;
        let view = NodeView {
            is_local: &is_local,
            mode_of: &mode_of,
        };
        let mut alloc = IdentityAllocator::new();
        let before = compile_datapath(&cluster, &engine, &view, &mut alloc, SetTable::new());
        // A pod that sorts before every other local pod: nothing may be renumbered.
        cluster.add_pod(PodInfo {
            namespace: "ns-0".into(),
            name: "aaa".into(),
            node: Some("node-0".into()),
            labels: [("app".to_string(), "app-1".to_string())].into(),
            ips: vec![crate::synthetic::pod_ip(100_000)],
            ports: vec![],
        });
        let after = compile_datapath(&cluster, &engine, &view, &mut alloc, before.sets.clone());
        let changed = after.policy.iter().filter(|(k, v)| before.policy.get(k) != Some(v)).count();
        let removed = before.policy.keys().filter(|k| !after.policy.contains_key(k)).count();
        let new_ep = after.endpoints.values().find(|e| e.pod.1 == "aaa").map(|e| e.endpoint);
        let new_id = after.ipcache.get(&host(crate::synthetic::pod_ip(100_000))).copied();
        assert!(changed > 0, "the new endpoint has entries");
        // Written: the new endpoint's entries, and other endpoints' entries admitting the
        // new pod's identity. Nothing else.
        for (k, _) in after.policy.iter().filter(|(k, v)| before.policy.get(k) != Some(v)) {
            assert!(
                Some(k.endpoint) == new_ep || Some(k.identity) == new_id,
                "unrelated entry rewritten: {k:?}"
            );
        }
        assert_eq!(removed, 0);
        for (ip, e) in &before.endpoints {
            assert_eq!(after.endpoints.get(ip), Some(e), "endpoint {ip} unchanged");
        }
    }

    #[test]
    fn a_pod_whose_address_another_pod_took_keeps_its_identity() {
        let (mut cluster, policies) = crate::synthetic::cluster(20, 20, 10, 4);
        let engine = Engine::new(policies);
        let mode_of = |_: &str| Mode::Enforce;
        let all = |_: &PodInfo| true;
        let view = NodeView {
            is_local: &all,
            mode_of: &mode_of,
        };
        // Labels of its own (an identity of its own), an address another pod has: the
        // other pod's identity wins the address, this one's is still handed out.
        let taken = cluster.pods()[0].ips[0];
        cluster.add_pod(PodInfo {
            namespace: "ns-0".into(),
            name: "zzz".into(),
            node: Some("node-0".into()),
            labels: [("app".to_string(), "app-1".to_string()), ("only".to_string(), "zzz".to_string())].into(),
            ips: vec![taken],
            ports: vec![],
        });
        let mut alloc = IdentityAllocator::new();
        let first = compile_datapath(&cluster, &engine, &view, &mut alloc, SetTable::new());
        let again = compile_datapath(&cluster, &engine, &view, &mut alloc, first.sets.clone());
        assert!(again == first, "a recompile of the same cluster changed the datapath state");
    }

    #[test]
    fn partitions_are_disjoint_unions() {
        let a = PolicyRef {
            namespace: "n".into(),
            name: "a".into(),
        };
        let b = PolicyRef {
            namespace: "n".into(),
            name: "b".into(),
        };
        let parts = partition(&[(0, 65535, a.clone()), (80, 90, b.clone())]);
        assert_eq!(parts.len(), 3);
        assert_eq!(parts[1], (80, 90, [a.clone(), b.clone()].into_iter().collect()));
        assert_eq!(parts[0].1, 79);
        assert_eq!(parts[2].0, 91);
    }
}
