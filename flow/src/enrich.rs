//! Annotation of flows with who their addresses belong to, through narrow getters (the
//! relay's Kubernetes index implements them; so can a test or an offline reader), and the
//! split of a filter between what a node can apply and what needs the annotation.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, RwLock},
};

use flows_policy::{Cluster, compile::SetTable};
use flows_proto::{Endpoint, Flow, FlowFilter, Policy, Service};

/// Who holds an address: a pod, a node, or the world. `None` when it is not known.
/// The label of addresses outside the cluster that name nothing else.
pub const LABEL_WORLD: &str = "reserved:world";
/// The label of a node's own addresses.
pub const LABEL_HOST: &str = "reserved:host";

pub trait EndpointGetter {
    fn endpoint(&self, ip: IpAddr) -> Option<Endpoint>;
}

/// The Service whose address this is.
pub trait ServiceGetter {
    fn service(&self, ip: IpAddr) -> Option<Service>;
}

/// The policies of a set the datapath numbered (the decoder names a verdict's policies
/// through it).
pub trait PolicySetGetter {
    fn policy_set(&self, id: u32) -> Vec<Policy>;
}

/// Pods by address, as a node reads them from its manifests.
impl EndpointGetter for HashMap<IpAddr, Endpoint> {
    fn endpoint(&self, ip: IpAddr) -> Option<Endpoint> {
        self.get(&ip).cloned()
    }
}

/// The sets a policy compile numbered.
impl PolicySetGetter for SetTable {
    fn policy_set(&self, id: u32) -> Vec<Policy> {
        self.get(id)
            .iter()
            .map(|p| Policy {
                name: p.name.clone(),
                namespace: p.namespace.clone(),
                kind: "NetworkPolicy".into(),
                labels: Vec::new(),
            })
            .collect()
    }
}

// Shared, replaceable lookups: a node swaps what is behind the lock when its manifests
// change, while the decoder reads through it. A poisoned lock names nothing.
impl<T: EndpointGetter + ?Sized> EndpointGetter for Arc<T> {
    fn endpoint(&self, ip: IpAddr) -> Option<Endpoint> {
        (**self).endpoint(ip)
    }
}

impl<T: EndpointGetter + ?Sized> EndpointGetter for RwLock<T> {
    fn endpoint(&self, ip: IpAddr) -> Option<Endpoint> {
        self.read().ok()?.endpoint(ip)
    }
}

impl<T: PolicySetGetter + ?Sized> PolicySetGetter for Arc<T> {
    fn policy_set(&self, id: u32) -> Vec<Policy> {
        (**self).policy_set(id)
    }
}

impl<T: PolicySetGetter + ?Sized> PolicySetGetter for RwLock<T> {
    fn policy_set(&self, id: u32) -> Vec<Policy> {
        self.read().map(|t| t.policy_set(id)).unwrap_or_default()
    }
}

/// A cluster's pods by address, as a node names a flow's ends from its manifests.
pub fn endpoints_of(cluster: &Cluster) -> HashMap<IpAddr, Endpoint> {
    cluster
        .pods()
        .iter()
        .flat_map(|p| {
            let ep = Endpoint {
                namespace: p.namespace.clone(),
                pod_name: p.name.clone(),
                labels: p.labels.iter().map(|(k, v)| format!("{k}={v}")).collect(),
                node_name: p.node.clone().unwrap_or_default(),
                ..Default::default()
            };
            p.ips.iter().map(move |ip| (*ip, ep.clone()))
        })
        .collect()
}

/// Fills both endpoints and services from the getters. What the getters know replaces
/// what the node reported (the node's numeric identity is kept); what they do not know
/// leaves the node's answer in place.
pub fn annotate(f: &mut Flow, endpoints: &impl EndpointGetter, services: &impl ServiceGetter) {
    let Some(ip) = f.ip.as_ref() else { return };
    let (Ok(src), Ok(dst)) = (ip.source.parse::<IpAddr>(), ip.destination.parse::<IpAddr>()) else {
        return;
    };
    for (slot, addr) in [(&mut f.source, src), (&mut f.destination, dst)] {
        if let Some(mut ep) = endpoints.endpoint(addr) {
            if let Some(old) = slot.as_ref() {
                ep.identity = old.identity;
            }
            *slot = Some(ep);
        }
    }
    if let Some(s) = services.service(src) {
        f.source_service = Some(s);
    }
    if let Some(s) = services.service(dst) {
        f.destination_service = Some(s);
    }
}

/// True when a filter names endpoints by what only the annotation tells (namespace, pod,
/// labels, workload).
fn needs_annotation(f: &FlowFilter) -> bool {
    !(f.source_pod.is_empty()
        && f.destination_pod.is_empty()
        && f.source_label.is_empty()
        && f.destination_label.is_empty()
        && f.source_workload.is_empty()
        && f.destination_workload.is_empty()
        && f.source_namespace.is_empty()
        && f.destination_namespace.is_empty())
}

fn without_annotation(f: &FlowFilter) -> FlowFilter {
    FlowFilter {
        source_pod: Vec::new(),
        destination_pod: Vec::new(),
        source_label: Vec::new(),
        destination_label: Vec::new(),
        source_workload: Vec::new(),
        destination_workload: Vec::new(),
        source_namespace: Vec::new(),
        destination_namespace: Vec::new(),
        ..f.clone()
    }
}

/// The part of an allow/deny pair a node can apply before annotation.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeSide {
    pub allow: Vec<FlowFilter>,
    pub deny: Vec<FlowFilter>,
    /// True when the node's answer is exactly what the full filter selects; otherwise it is
    /// a superset, to be filtered again after annotation (and counts applied after that).
    pub exact: bool,
}

/// Splits a filter: allow-list entries lose their annotation fields (a wider filter, so
/// nothing wanted is lost); deny-list entries that need annotation stay behind (dropping
/// one early could drop a wanted flow).
pub fn node_side(allow: &[FlowFilter], deny: &[FlowFilter]) -> NodeSide {
    let exact = !allow.iter().chain(deny).any(needs_annotation);
    let relaxed: Vec<FlowFilter> = allow.iter().map(without_annotation).collect();
    // An allow entry with nothing left admits every flow: the whole list does.
    let allow = if relaxed.iter().any(|f| *f == FlowFilter::default()) {
        Vec::new()
    } else {
        relaxed
    };
    let deny = deny.iter().filter(|f| !needs_annotation(f)).cloned().collect();
    NodeSide { allow, deny, exact }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FilterSet;
    use flows_proto::{Ip, IpVersion, Verdict, Workload};

    struct Map(HashMap<IpAddr, Endpoint>, HashMap<IpAddr, Service>);
    impl EndpointGetter for Map {
        fn endpoint(&self, ip: IpAddr) -> Option<Endpoint> {
            self.0.get(&ip).cloned()
        }
    }
    impl ServiceGetter for Map {
        fn service(&self, ip: IpAddr) -> Option<Service> {
            self.1.get(&ip).cloned()
        }
    }

    fn flow(src: &str, dst: &str, verdict: Verdict) -> Flow {
        Flow {
            verdict: verdict as i32,
            ip: Some(Ip {
                source: src.into(),
                destination: dst.into(),
                ip_version: IpVersion::Ipv4 as i32,
            }),
            source: Some(Endpoint { identity: 7, pod_name: "stale".into(), ..Default::default() }),
            ..Default::default()
        }
    }

    fn index() -> Map {
        let ep = Endpoint {
            namespace: "prod".into(),
            pod_name: "api-1".into(),
            workloads: vec![Workload { name: "api".into(), kind: "Deployment".into() }],
            ..Default::default()
        };
        let svc = Service { name: "db".into(), namespace: "prod".into() };
        Map(
            HashMap::from([("10.0.0.1".parse().unwrap(), ep)]),
            HashMap::from([("10.96.0.9".parse().unwrap(), svc)]),
        )
    }

    #[test]
    fn annotation_replaces_what_it_knows_and_keeps_identity() {
        let m = index();
        let mut f = flow("10.0.0.1", "10.96.0.9", Verdict::Forwarded);
        annotate(&mut f, &m, &m);
        let src = f.source.expect("source");
        assert_eq!((src.pod_name.as_str(), src.identity), ("api-1", 7));
        assert!(f.destination.is_none());
        assert_eq!(f.destination_service.expect("service").name, "db");
        // Unknown addresses keep what the node said.
        let mut g = flow("10.0.0.2", "10.0.0.3", Verdict::Forwarded);
        annotate(&mut g, &m, &m);
        assert_eq!(g.source.expect("kept").pod_name, "stale");
    }

    #[test]
    fn node_side_is_a_superset_and_says_so() {
        let allow = vec![FlowFilter {
            source_workload: vec!["api".into()],
            verdict: vec![Verdict::Dropped as i32],
            ..Default::default()
        }];
        let deny = vec![
            FlowFilter { destination_namespace: vec!["kube-system".into()], ..Default::default() },
            FlowFilter { destination_port: vec!["53".into()], ..Default::default() },
        ];
        let s = node_side(&allow, &deny);
        assert!(!s.exact);
        assert_eq!(s.allow, vec![FlowFilter { verdict: vec![Verdict::Dropped as i32], ..Default::default() }]);
        assert_eq!(s.deny, vec![deny[1].clone()]);
        // Every flow the full filter keeps, the node side keeps too.
        let m = index();
        let full = FilterSet::new(&allow, &deny).unwrap();
        let node = FilterSet::new(&s.allow, &s.deny).unwrap();
        for (src, v) in [("10.0.0.1", Verdict::Dropped), ("10.0.0.2", Verdict::Dropped), ("10.0.0.1", Verdict::Forwarded)] {
            let mut f = flow(src, "10.0.0.5", v);
            let before = node.matches(&f);
            annotate(&mut f, &m, &m);
            if full.matches(&f) {
                assert!(before, "node side dropped a wanted flow from {src}");
            }
        }
        // Only annotation fields in an allow entry: the node sends everything.
        let s = node_side(&[FlowFilter { source_pod: vec!["x".into()], ..Default::default() }], &[]);
        assert!(s.allow.is_empty() && !s.exact);
        assert!(node_side(&[FlowFilter { destination_port: vec!["80".into()], ..Default::default() }], &[]).exact);
    }
}
