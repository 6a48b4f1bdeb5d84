//! The cluster index: who each address belongs to. Pure: fed objects, asked about
//! addresses; the watchers ([`crate::watch`]) and the manifest reader ([`crate::manifests`])
//! feed it.
//!
//! Addresses are claimed, not owned: a pod that is deleted, or that finishes, gives its
//! address up, and a new pod may take it before the old object is gone. Among the live
//! claimants the most recently created pod wins, so a reused address names the new pod
//! whatever order the events come in.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
    sync::Arc,
};

use flows_flow::enrich::{EndpointGetter, ServiceGetter};
use flows_proto::{Endpoint, Service, Workload};
use k8s_openapi::{
    api::{
        apps::v1::ReplicaSet,
        batch::v1::Job,
        core::v1::{Namespace, Node, Pod, Service as K8sService},
    },
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
};

/// Labels Hubble users know for addresses that are not pods.
pub use flows_flow::enrich::{LABEL_HOST, LABEL_WORLD};

/// A prefix of addresses (pod CIDRs, configured cluster ranges).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Option<Cidr> {
        let (a, l) = s.trim().split_once('/')?;
        let addr: IpAddr = a.parse().ok()?;
        let len: u8 = l.parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (len <= max).then_some(Cidr { addr, len })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(i)) => {
                let m = if self.len == 0 { 0 } else { u32::MAX << (32 - self.len) };
                u32::from(n) & m == u32::from(i) & m
            }
            (IpAddr::V6(n), IpAddr::V6(i)) => {
                let m = if self.len == 0 { 0 } else { u128::MAX << (128 - self.len) };
                u128::from(n) & m == u128::from(i) & m
            }
            _ => false,
        }
    }
}

/// namespace/name.
type Key = (String, String);

fn key(meta: &ObjectMeta) -> Key {
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

/// Who claims each address, and who holds it.
#[derive(Debug, Default)]
struct Claims {
    /// Claimants of an address, each with its rank (higher wins).
    by_ip: HashMap<IpAddr, Vec<(Key, (i64, String))>>,
}

impl Claims {
    fn claim(&mut self, ip: IpAddr, who: &Key, rank: (i64, String)) {
        let v = self.by_ip.entry(ip).or_default();
        match v.iter_mut().find(|(k, _)| k == who) {
            Some(c) => c.1 = rank,
            None => v.push((who.clone(), rank)),
        }
    }

    fn release(&mut self, ip: IpAddr, who: &Key) {
        if let Some(v) = self.by_ip.get_mut(&ip) {
            v.retain(|(k, _)| k != who);
            if v.is_empty() {
                self.by_ip.remove(&ip);
            }
        }
    }

    fn holder(&self, ip: IpAddr) -> Option<&Key> {
        self.by_ip
            .get(&ip)?
            .iter()
            .max_by(|a, b| a.1.cmp(&b.1))
            .map(|(k, _)| k)
    }
}

#[derive(Debug, Clone)]
struct PodRec {
    ips: Vec<IpAddr>,
    /// The controller: (kind, name).
    owner: Option<(String, String)>,
    labels: BTreeMap<String, String>,
    node: String,
    template_hash: Option<String>,
    endpoint: Arc<Endpoint>,
}

#[derive(Debug, Clone, Default)]
struct NodeRec {
    ips: Vec<IpAddr>,
    pod_cidrs: Vec<Cidr>,
}

/// Kinds the index is fed, for resynchronisation after a watcher's relist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Pod,
    Service,
    Node,
    Namespace,
    ReplicaSet,
    Job,
}

/// One object, as the index takes it.
#[derive(Debug, Clone)]
pub enum Object {
    Pod(Box<Pod>),
    Service(Box<K8sService>),
    Node(Box<Node>),
    Namespace(Box<Namespace>),
    ReplicaSet(Box<ReplicaSet>),
    Job(Box<Job>),
}

impl Object {
    pub fn kind(&self) -> Kind {
        match self {
            Object::Pod(_) => Kind::Pod,
            Object::Service(_) => Kind::Service,
            Object::Node(_) => Kind::Node,
            Object::Namespace(_) => Kind::Namespace,
            Object::ReplicaSet(_) => Kind::ReplicaSet,
            Object::Job(_) => Kind::Job,
        }
    }

    fn meta(&self) -> &ObjectMeta {
        match self {
            Object::Pod(o) => &o.metadata,
            Object::Service(o) => &o.metadata,
            Object::Node(o) => &o.metadata,
            Object::Namespace(o) => &o.metadata,
            Object::ReplicaSet(o) => &o.metadata,
            Object::Job(o) => &o.metadata,
        }
    }
}

/// Counts of what the index holds (status and tests).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sizes {
    pub pods: usize,
    pub pod_ips: usize,
    pub services: usize,
    pub nodes: usize,
    pub namespaces: usize,
    pub owners: usize,
}

#[derive(Debug, Default)]
pub struct ClusterIndex {
    pods: HashMap<Key, PodRec>,
    pod_ips: Claims,
    /// Pods by controller (namespace, kind, name): their endpoints change with it.
    by_owner: HashMap<(String, String, String), HashSet<String>>,
    services: HashMap<Key, Vec<IpAddr>>,
    service_ips: Claims,
    nodes: HashMap<String, NodeRec>,
    node_ips: Claims,
    namespaces: HashMap<String, BTreeMap<String, String>>,
    /// Controllers' own controllers: (namespace, kind, name) → (kind, name).
    owners: HashMap<(String, String, String), (String, String)>,
    /// Ranges inside the cluster beyond the nodes' pod CIDRs (flags).
    cluster_cidrs: Vec<Cidr>,
    /// Objects seen since a watcher restarted its list, per kind.
    relisting: HashMap<Kind, HashSet<Key>>,
    /// Kinds whose first list has not come yet: until every one has, an address that
    /// names nothing may be a pod or node not listed yet, so it is not called world.
    unlisted: HashSet<Kind>,
}

fn controller(refs: Option<&Vec<OwnerReference>>) -> Option<(String, String)> {
    let refs = refs?;
    let r = refs
        .iter()
        .find(|r| r.controller == Some(true))
        .or_else(|| refs.first())?;
    Some((r.kind.clone(), r.name.clone()))
}

fn rank(meta: &ObjectMeta) -> (i64, String) {
    let created = meta
        .creation_timestamp
        .as_ref()
        .map(|t| t.0.as_second())
        .unwrap_or(0);
    (created, meta.uid.clone().unwrap_or_default())
}

/// Addresses a pod holds: none once it has finished; none in the host's network (the
/// policy engine's reading, `flows_policy::pod_info`).
fn pod_ips(pod: &Pod) -> Vec<IpAddr> {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded") | Some("Failed")) {
        return Vec::new();
    }
    flows_policy::pod_info(pod).ips
}

impl ClusterIndex {
    pub fn new(cluster_cidrs: Vec<Cidr>) -> ClusterIndex {
        ClusterIndex {
            cluster_cidrs,
            ..Default::default()
        }
    }

    /// An index fed by watchers of `kinds`: incomplete until each has been listed once.
    pub fn listed_by(cluster_cidrs: Vec<Cidr>, kinds: &[Kind]) -> ClusterIndex {
        ClusterIndex {
            cluster_cidrs,
            unlisted: kinds.iter().copied().collect(),
            ..Default::default()
        }
    }

    /// True once every kind the index is fed has been listed (always, for manifests).
    pub fn complete(&self) -> bool {
        self.unlisted.is_empty()
    }

    pub fn sizes(&self) -> Sizes {
        Sizes {
            pods: self.pods.len(),
            pod_ips: self.pod_ips.by_ip.len(),
            services: self.services.len(),
            nodes: self.nodes.len(),
            namespaces: self.namespaces.len(),
            owners: self.owners.len(),
        }
    }

    /// An object was added or changed.
    pub fn apply(&mut self, obj: Object) {
        let k = key(obj.meta());
        if let Some(seen) = self.relisting.get_mut(&obj.kind()) {
            seen.insert(k.clone());
        }
        match obj {
            Object::Pod(p) => self.apply_pod(k, &p),
            Object::Service(s) => {
                self.delete(Kind::Service, &k);
                let spec = s.spec.as_ref();
                let mut ips: Vec<IpAddr> = spec
                    .and_then(|s| s.cluster_ips.as_ref())
                    .into_iter()
                    .flatten()
                    .filter_map(|i| i.parse().ok())
                    .collect();
                if let Some(ip) = spec.and_then(|s| s.cluster_ip.as_ref()).and_then(|i| i.parse().ok()) {
                    if !ips.contains(&ip) {
                        ips.push(ip);
                    }
                }
                let r = rank(&s.metadata);
                for ip in &ips {
                    self.service_ips.claim(*ip, &k, r.clone());
                }
                self.services.insert(k, ips);
            }
            Object::Node(n) => {
                let name = k.1.clone();
                self.delete(Kind::Node, &k);
                let ips: Vec<IpAddr> = n
                    .status
                    .as_ref()
                    .and_then(|s| s.addresses.as_ref())
                    .into_iter()
                    .flatten()
                    .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
                    .filter_map(|a| a.address.parse().ok())
                    .collect();
                let spec = n.spec.as_ref();
                let mut cidrs: Vec<Cidr> = spec
                    .and_then(|s| s.pod_cidrs.as_ref())
                    .into_iter()
                    .flatten()
                    .filter_map(|c| Cidr::parse(c))
                    .collect();
                if let Some(c) = spec.and_then(|s| s.pod_cidr.as_deref()).and_then(Cidr::parse) {
                    if !cidrs.contains(&c) {
                        cidrs.push(c);
                    }
                }
                let r = rank(&n.metadata);
                for ip in &ips {
                    self.node_ips.claim(*ip, &k, r.clone());
                }
                self.nodes.insert(name, NodeRec { ips, pod_cidrs: cidrs });
            }
            Object::Namespace(n) => {
                self.namespaces
                    .insert(k.1, n.metadata.labels.clone().unwrap_or_default());
            }
            Object::ReplicaSet(rs) => {
                self.set_owner("ReplicaSet", &k, controller(rs.metadata.owner_references.as_ref()))
            }
            Object::Job(j) => self.set_owner("Job", &k, controller(j.metadata.owner_references.as_ref())),
        }
    }

    /// An object is gone.
    pub fn delete(&mut self, kind: Kind, k: &(String, String)) {
        match kind {
            Kind::Pod => {
                if let Some(old) = self.pods.remove(k) {
                    for ip in &old.ips {
                        self.pod_ips.release(*ip, k);
                    }
                    if let Some((okind, oname)) = old.owner {
                        let ok = (k.0.clone(), okind, oname);
                        if let Some(set) = self.by_owner.get_mut(&ok) {
                            set.remove(&k.1);
                            if set.is_empty() {
                                self.by_owner.remove(&ok);
                            }
                        }
                    }
                }
            }
            Kind::Service => {
                for ip in self.services.remove(k).unwrap_or_default() {
                    self.service_ips.release(ip, k);
                }
            }
            Kind::Node => {
                if let Some(old) = self.nodes.remove(&k.1) {
                    for ip in old.ips {
                        self.node_ips.release(ip, k);
                    }
                }
            }
            Kind::Namespace => {
                self.namespaces.remove(&k.1);
            }
            Kind::ReplicaSet => self.set_owner("ReplicaSet", k, None),
            Kind::Job => self.set_owner("Job", k, None),
        }
    }

    /// Deletes the object an event carries.
    pub fn delete_object(&mut self, obj: &Object) {
        self.delete(obj.kind(), &key(obj.meta()));
    }

    /// A watcher starts listing `kind` again: what the list does not bring back is gone.
    pub fn relist_start(&mut self, kind: Kind) {
        self.relisting.insert(kind, HashSet::new());
    }

    /// The list is complete: objects of `kind` that it did not name are removed.
    pub fn relist_done(&mut self, kind: Kind) {
        self.unlisted.remove(&kind);
        let Some(seen) = self.relisting.remove(&kind) else { return };
        let stale: Vec<Key> = match kind {
            Kind::Pod => self.pods.keys().filter(|k| !seen.contains(*k)).cloned().collect(),
            Kind::Service => self.services.keys().filter(|k| !seen.contains(*k)).cloned().collect(),
            Kind::Node => self
                .nodes
                .keys()
                .map(|n| (String::new(), n.clone()))
                .filter(|k| !seen.contains(k))
                .collect(),
            Kind::Namespace => self
                .namespaces
                .keys()
                .map(|n| (String::new(), n.clone()))
                .filter(|k| !seen.contains(k))
                .collect(),
            Kind::ReplicaSet | Kind::Job => {
                let kname = if kind == Kind::Job { "Job" } else { "ReplicaSet" };
                self.owners
                    .keys()
                    .filter(|(_, k, _)| k == kname)
                    .map(|(ns, _, n)| (ns.clone(), n.clone()))
                    .filter(|k| !seen.contains(k))
                    .collect()
            }
        };
        for k in stale {
            self.delete(kind, &k);
        }
    }

    fn apply_pod(&mut self, k: Key, pod: &Pod) {
        self.delete(Kind::Pod, &k);
        let ips = pod_ips(pod);
        let owner = controller(pod.metadata.owner_references.as_ref());
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        let mut rec = PodRec {
            ips: ips.clone(),
            owner: owner.clone(),
            template_hash: labels.get("pod-template-hash").cloned(),
            labels,
            node: pod
                .spec
                .as_ref()
                .and_then(|s| s.node_name.clone())
                .unwrap_or_default(),
            endpoint: Arc::default(),
        };
        rec.endpoint = Arc::new(self.endpoint_of(&k, &rec));
        let r = rank(&pod.metadata);
        for ip in &ips {
            self.pod_ips.claim(*ip, &k, r.clone());
        }
        if let Some((okind, oname)) = owner {
            self.by_owner
                .entry((k.0.clone(), okind, oname))
                .or_default()
                .insert(k.1.clone());
        }
        self.pods.insert(k, rec);
    }

    fn set_owner(&mut self, kind: &str, k: &Key, owner: Option<(String, String)>) {
        let ok = (k.0.clone(), kind.to_string(), k.1.clone());
        let changed = match owner {
            Some(o) => self.owners.insert(ok.clone(), o.clone()) != Some(o),
            None => self.owners.remove(&ok).is_some(),
        };
        if !changed {
            return;
        }
        // The workloads of this controller's pods changed with it.
        let names: Vec<String> = self
            .by_owner
            .get(&ok)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default();
        for name in names {
            let pk = (k.0.clone(), name);
            if let Some(rec) = self.pods.get(&pk) {
                let ep = Arc::new(self.endpoint_of(&pk, rec));
                if let Some(rec) = self.pods.get_mut(&pk) {
                    rec.endpoint = ep;
                }
            }
        }
    }

    /// Owners of a pod, closest first: its controller, then that one's controller.
    fn workloads(&self, ns: &str, rec: &PodRec) -> Vec<Workload> {
        let Some((kind, name)) = &rec.owner else { return Vec::new() };
        let mut out = vec![Workload {
            name: name.clone(),
            kind: kind.clone(),
        }];
        let up = self.owners.get(&(ns.to_string(), kind.clone(), name.clone())).cloned().or_else(|| {
            // ReplicaSet not seen (yet): a Deployment's ReplicaSet is named after it plus
            // the pod-template-hash.
            let hash = rec.template_hash.as_ref()?;
            let base = name.strip_suffix(hash.as_str())?.strip_suffix('-')?;
            (kind == "ReplicaSet" && !base.is_empty()).then(|| ("Deployment".to_string(), base.to_string()))
        });
        if let Some((kind, name)) = up {
            out.push(Workload { name, kind });
        }
        out
    }

    fn endpoint_of(&self, k: &Key, rec: &PodRec) -> Endpoint {
        Endpoint {
            identity: 0,
            namespace: k.0.clone(),
            pod_name: k.1.clone(),
            labels: rec.labels.iter().map(|(k, v)| format!("{k}={v}")).collect(),
            workloads: self.workloads(&k.0, rec),
            node_name: rec.node.clone(),
            is_world: false,
        }
    }

    /// Every pod known (finished ones too), as endpoints with labels and owners, in
    /// namespace and name order.
    pub fn pod_endpoints(&self) -> Vec<Endpoint> {
        let mut keys: Vec<&Key> = self.pods.keys().collect();
        keys.sort();
        keys.into_iter()
            .filter_map(|k| self.pods.get(k).map(|rec| self.endpoint_of(k, rec)))
            .collect()
    }

    /// Labels of a namespace, when it is known.
    pub fn namespace_labels(&self, ns: &str) -> Option<&BTreeMap<String, String>> {
        self.namespaces.get(ns)
    }

    /// True when `ip` is in a range the cluster uses (pod CIDRs, configured ranges).
    /// With no range known at all, every address that names nothing counts as outside.
    fn inside(&self, ip: IpAddr) -> bool {
        self.cluster_cidrs.iter().any(|c| c.contains(ip))
            || self.nodes.values().any(|n| n.pod_cidrs.iter().any(|c| c.contains(ip)))
    }

    /// The pod holding `ip`, as an endpoint.
    pub fn pod(&self, ip: IpAddr) -> Option<Arc<Endpoint>> {
        let k = self.pod_ips.holder(ip)?;
        self.pods.get(k).map(|p| p.endpoint.clone())
    }
}

impl EndpointGetter for ClusterIndex {
    fn endpoint(&self, ip: IpAddr) -> Option<Endpoint> {
        if let Some(ep) = self.pod(ip) {
            return Some((*ep).clone());
        }
        if let Some((_, node)) = self.node_ips.holder(ip) {
            return Some(Endpoint {
                labels: vec![LABEL_HOST.to_string()],
                node_name: node.clone(),
                ..Default::default()
            });
        }
        if self.service_ips.holder(ip).is_some() || self.inside(ip) || !self.complete() {
            // A service address, a cluster address whose pod is not (yet) known, or any
            // address before the cluster has been listed whole.
            return None;
        }
        Some(Endpoint {
            labels: vec![LABEL_WORLD.to_string()],
            is_world: true,
            ..Default::default()
        })
    }
}

impl ServiceGetter for ClusterIndex {
    fn service(&self, ip: IpAddr) -> Option<Service> {
        let (namespace, name) = self.service_ips.holder(ip)?;
        Some(Service {
            name: name.clone(),
            namespace: namespace.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifests::objects;

    const CLUSTER: &str = r#"
apiVersion: v1
kind: Node
metadata: { name: node-1 }
spec: { podCIDR: 10.244.1.0/24, podCIDRs: [10.244.1.0/24, "fd00:10:244:1::/64"] }
status: { addresses: [ { type: InternalIP, address: 192.168.0.1 } ] }
---
apiVersion: v1
kind: Namespace
metadata: { name: prod, labels: { team: a } }
---
apiVersion: apps/v1
kind: ReplicaSet
metadata:
  name: api-5d8f
  namespace: prod
  ownerReferences: [ { apiVersion: apps/v1, kind: Deployment, name: api, uid: d1, controller: true } ]
spec: { selector: { matchLabels: { app: api } } }
---
apiVersion: v1
kind: Pod
metadata:
  name: api-5d8f-x
  namespace: prod
  uid: p1
  creationTimestamp: "2026-01-01T00:00:00Z"
  labels: { app: api, pod-template-hash: 5d8f }
  ownerReferences: [ { apiVersion: apps/v1, kind: ReplicaSet, name: api-5d8f, uid: r1, controller: true } ]
spec: { nodeName: node-1, containers: [ { name: c } ] }
status: { phase: Running, podIP: 10.244.1.5, podIPs: [ { ip: 10.244.1.5 }, { ip: "fd00:10:244:1::5" } ] }
---
apiVersion: v1
kind: Service
metadata: { name: api, namespace: prod }
spec: { clusterIP: 10.96.0.10, clusterIPs: [10.96.0.10] }
"#;

    fn index() -> ClusterIndex {
        let mut idx = ClusterIndex::new(vec![Cidr::parse("10.96.0.0/16").unwrap()]);
        for o in objects("cluster.yaml", CLUSTER).expect("objects") {
            idx.apply(o);
        }
        idx
    }

    fn pod(name: &str, uid: &str, created: &str, ip: &str, phase: &str) -> Object {
        let text = format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{ name: {name}, namespace: prod, uid: {uid}, creationTimestamp: \"{created}\", labels: {{ app: {name} }} }}\nspec: {{ nodeName: node-1, containers: [ {{ name: c }} ] }}\nstatus: {{ phase: {phase}, podIP: {ip} }}\n"
        );
        objects("pod.yaml", &text).expect("pod").remove(0)
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn nothing_is_world_before_every_kind_is_listed() {
        let mut idx = ClusterIndex::listed_by(Vec::new(), &[Kind::Pod, Kind::Node]);
        let outside: IpAddr = "203.0.113.7".parse().unwrap();
        assert!(idx.endpoint(outside).is_none(), "a pod not listed yet could hold it");
        idx.relist_start(Kind::Pod);
        idx.relist_done(Kind::Pod);
        assert!(idx.endpoint(outside).is_none(), "nodes (and their pod CIDRs) are not listed yet");
        idx.relist_start(Kind::Node);
        idx.relist_done(Kind::Node);
        assert!(idx.complete());
        assert!(idx.endpoint(outside).is_some_and(|e| e.is_world));
    }

    #[test]
    fn names_pods_services_nodes_and_world() {
        let idx = index();
        let ep = idx.endpoint(ip("fd00:10:244:1::5")).expect("pod by v6");
        assert_eq!((ep.namespace.as_str(), ep.pod_name.as_str(), ep.node_name.as_str()), ("prod", "api-5d8f-x", "node-1"));
        let w: Vec<_> = ep.workloads.iter().map(|w| format!("{}/{}", w.kind, w.name)).collect();
        assert_eq!(w, ["ReplicaSet/api-5d8f", "Deployment/api"]);
        assert!(ep.labels.contains(&"app=api".to_string()));
        assert_eq!(idx.service(ip("10.96.0.10")).expect("svc").name, "api");
        assert!(idx.endpoint(ip("10.96.0.10")).is_none(), "a service address is no endpoint");
        assert_eq!(idx.endpoint(ip("192.168.0.1")).expect("node").labels, [LABEL_HOST]);
        let world = idx.endpoint(ip("8.8.8.8")).expect("world");
        assert!(world.is_world && world.labels == [LABEL_WORLD]);
        // Inside a pod CIDR but not (yet) known: not world.
        assert!(idx.endpoint(ip("10.244.1.99")).is_none());
        assert_eq!(idx.namespace_labels("prod").and_then(|l| l.get("team")).map(String::as_str), Some("a"));
    }

    #[test]
    fn a_host_network_pod_is_named_as_its_node() {
        let mut idx = index();
        // kube-proxy, the probe, a CNI agent: their podIP is the node's address.
        let text = "apiVersion: v1\nkind: Pod\nmetadata: { name: kube-proxy-x, namespace: kube-system, uid: h1, creationTimestamp: \"2026-01-02T00:00:00Z\" }\nspec: { nodeName: node-1, hostNetwork: true, containers: [ { name: c } ] }\nstatus: { phase: Running, podIP: 192.168.0.1, podIPs: [ { ip: 192.168.0.1 } ] }\n";
        idx.apply(objects("pod.yaml", text).expect("pod").remove(0));
        let ep = idx.endpoint(ip("192.168.0.1")).expect("node");
        assert_eq!((ep.labels.as_slice(), ep.node_name.as_str(), ep.pod_name.as_str()), ([LABEL_HOST.to_string()].as_slice(), "node-1", ""));
        assert!(idx.pod(ip("192.168.0.1")).is_none());
    }

    #[test]
    fn workload_follows_the_replicaset_and_falls_back_on_the_hash() {
        let mut idx = index();
        idx.delete(Kind::ReplicaSet, &("prod".into(), "api-5d8f".into()));
        // The ReplicaSet is gone: the Deployment is still named from the template hash.
        let w = idx.endpoint(ip("10.244.1.5")).unwrap().workloads;
        assert_eq!(w[1].name, "api");
        let rs = "apiVersion: apps/v1\nkind: ReplicaSet\nmetadata: { name: api-5d8f, namespace: prod, ownerReferences: [ { apiVersion: apps/v1, kind: Deployment, name: api-v2, uid: d2, controller: true } ] }\n";
        idx.apply(objects("rs.yaml", rs).unwrap().remove(0));
        let w = idx.endpoint(ip("10.244.1.5")).unwrap().workloads;
        assert_eq!(w[1].name, "api-v2", "the pod's endpoint was rebuilt when its owner changed");
    }

    #[test]
    fn deleted_pod_and_reused_address() {
        let mut idx = index();
        idx.apply(pod("old", "u-old", "2026-01-01T00:00:00Z", "10.244.1.7", "Running"));
        assert_eq!(idx.endpoint(ip("10.244.1.7")).unwrap().pod_name, "old");
        // The new pod takes the address before the old object is deleted...
        idx.apply(pod("new", "u-new", "2026-01-02T00:00:00Z", "10.244.1.7", "Running"));
        assert_eq!(idx.endpoint(ip("10.244.1.7")).unwrap().pod_name, "new");
        // ...an update of the old one does not take it back...
        idx.apply(pod("old", "u-old", "2026-01-01T00:00:00Z", "10.244.1.7", "Running"));
        assert_eq!(idx.endpoint(ip("10.244.1.7")).unwrap().pod_name, "new");
        // ...and its deletion leaves the new owner in place.
        idx.delete(Kind::Pod, &("prod".into(), "old".into()));
        assert_eq!(idx.endpoint(ip("10.244.1.7")).unwrap().pod_name, "new");
        idx.delete(Kind::Pod, &("prod".into(), "new".into()));
        assert!(idx.endpoint(ip("10.244.1.7")).is_none());
        // A finished pod gives its address up at once.
        idx.apply(pod("job", "u-job", "2026-01-03T00:00:00Z", "10.244.1.8", "Running"));
        idx.apply(pod("job", "u-job", "2026-01-03T00:00:00Z", "10.244.1.8", "Succeeded"));
        assert!(idx.endpoint(ip("10.244.1.8")).is_none());
        assert_eq!(idx.sizes().pod_ips, 2, "only api's two addresses are held");
    }

    #[test]
    fn relist_removes_what_it_does_not_name() {
        let mut idx = index();
        idx.apply(pod("gone", "u-g", "2026-01-01T00:00:00Z", "10.244.1.9", "Running"));
        idx.relist_start(Kind::Pod);
        idx.apply(pod("api-5d8f-x", "p1", "2026-01-01T00:00:00Z", "10.244.1.5", "Running"));
        idx.relist_done(Kind::Pod);
        assert!(idx.endpoint(ip("10.244.1.9")).is_none());
        assert_eq!(idx.endpoint(ip("10.244.1.5")).unwrap().pod_name, "api-5d8f-x");
        assert_eq!(idx.sizes().pods, 1);
    }
}
