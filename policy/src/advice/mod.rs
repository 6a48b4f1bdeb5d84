//! Policy advice from observed traffic: least-privilege NetworkPolicies suggested from
//! what was allowed ([`suggest`]), and history replayed through the engine to prove a
//! suggestion or to answer "what would these policies change?" ([`replay`]).
//!
//! Input is a set of [`Observation`]s: connection attempts grouped by everything the
//! engine reads (both parties' namespace, pod, labels and address, protocol and
//! destination port) and by their recorded outcome, with counts and first/last seen.
//! Evaluating a group once is evaluating each of its attempts.

pub mod replay;
pub mod select;
pub mod suggest;

use std::{collections::BTreeMap, net::IpAddr};

use serde::Serialize;

use crate::{Protocol, selector::Labels};

pub use replay::{ChangeGroup, Replay, replay};
pub use suggest::{Explanation, ObservedFlow, SuggestOptions, Suggestion, suggest};

/// The owner a pod is grouped by: its top-level controller (Deployment, StatefulSet,
/// DaemonSet, CronJob, Job...).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Owner {
    pub kind: String,
    pub name: String,
}

/// A pod as an attempt saw it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodParty {
    pub namespace: String,
    pub name: String,
    /// Its labels when the attempt was made.
    pub labels: Labels,
    pub owner: Option<Owner>,
    pub ip: Option<IpAddr>,
}

/// What an address that is no pod was known as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AddressKind {
    /// Outside every pod and node range.
    World,
    /// A node (or a host-network pod).
    Host,
    /// Nothing named it.
    Unknown,
}

/// One side of an attempt.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Party {
    Pod(PodParty),
    Address { ip: IpAddr, kind: AddressKind },
}

/// The recorded outcome of an attempt, as policy decided it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Forwarded: no policy denied it.
    Allowed,
    /// Policy denied it in a namespace that only audits: it was forwarded.
    Audit,
    /// Dropped by policy.
    Denied,
    /// Forwarded, but nothing listened: the destination's kernel refused it (no socket,
    /// or a TCP reset answering the SYN). Not a reason to open a port.
    Refused,
}

/// Attempts that share every input of a policy decision and their recorded outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    pub src: Party,
    pub dst: Party,
    pub protocol: Protocol,
    /// Destination port (0 for ICMP).
    pub port: u16,
    pub outcome: Outcome,
    pub flows: u64,
    /// Nanoseconds since the epoch.
    pub first: i64,
    pub last: i64,
}

/// Labels that change with every rollout or pod and so never identify a workload.
pub const UNSTABLE_LABELS: &[&str] = &[
    "pod-template-hash",
    "controller-revision-hash",
    "pod-template-generation",
    "statefulset.kubernetes.io/pod-name",
    "apps.kubernetes.io/pod-index",
    "controller-uid",
    "batch.kubernetes.io/controller-uid",
    "batch.kubernetes.io/job-completion-index",
];

/// A pod's labels without the unstable ones.
pub fn stable_labels(labels: &Labels) -> Labels {
    labels
        .iter()
        .filter(|(k, _)| !UNSTABLE_LABELS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// How pods are grouped into workloads.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WorkloadKey {
    /// Pods of one controller.
    Owner(Owner),
    /// Pods without a controller, grouped by their stable labels.
    Labels(Vec<(String, String)>),
    /// A pod without a controller or stable labels: itself.
    Pod(String),
}

/// A workload: pods of one namespace grouped by owner, else by stable labels.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkloadId {
    pub namespace: String,
    pub key: WorkloadKey,
}

impl WorkloadId {
    pub fn of(namespace: &str, pod: &str, labels: &Labels, owner: Option<&Owner>) -> WorkloadId {
        let key = match owner {
            Some(o) if o.kind != "Pod" && !o.name.is_empty() => WorkloadKey::Owner(o.clone()),
            _ => {
                let stable = stable_labels(labels);
                if stable.is_empty() {
                    WorkloadKey::Pod(pod.to_string())
                } else {
                    WorkloadKey::Labels(stable.into_iter().collect())
                }
            }
        };
        WorkloadId {
            namespace: namespace.to_string(),
            key,
        }
    }

    pub fn of_party(p: &PodParty) -> WorkloadId {
        WorkloadId::of(&p.namespace, &p.name, &p.labels, p.owner.as_ref())
    }

    /// The name people know it by: the owner's name, the values of its labels
    /// (`run=frontend` is "frontend"), or the pod's name.
    pub fn name(&self) -> String {
        match &self.key {
            WorkloadKey::Owner(o) => o.name.clone(),
            WorkloadKey::Pod(p) => p.clone(),
            WorkloadKey::Labels(l) => l.iter().map(|(_, v)| v.as_str()).collect::<Vec<_>>().join("-"),
        }
    }

    /// The owner's kind, "Pod" otherwise.
    pub fn kind(&self) -> &str {
        match &self.key {
            WorkloadKey::Owner(o) => &o.kind,
            _ => "Pod",
        }
    }

    /// Whether `--workload` style text (`name` or `kind/name`, kind in any case) names it.
    pub fn matches(&self, text: &str) -> bool {
        match text.split_once('/') {
            Some((kind, name)) => self.kind().eq_ignore_ascii_case(kind) && self.name() == name,
            None => self.name() == text,
        }
    }
}

/// A pod known to exist (or to have existed): what selectors are chosen against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InventoryPod {
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    pub owner: Option<Owner>,
}

/// Every pod the advice must tell apart, by namespace and name: the cluster's pods and
/// those seen in the history.
#[derive(Debug, Clone, Default)]
pub struct Inventory {
    pods: BTreeMap<(String, String), InventoryPod>,
}

impl Inventory {
    pub fn new() -> Inventory {
        Inventory::default()
    }

    /// Adds a pod; the first description of a pod wins (the cluster's, when added first).
    pub fn add(&mut self, pod: InventoryPod) {
        self.pods
            .entry((pod.namespace.clone(), pod.name.clone()))
            .or_insert(pod);
    }

    /// Adds the pods seen in observations; a known pod whose owner was not known takes
    /// the owner the flows name (manifests without ownerReferences).
    pub fn observe(&mut self, observations: &[Observation]) {
        for o in observations {
            for p in [&o.src, &o.dst] {
                if let Party::Pod(p) = p {
                    match self.pods.get_mut(&(p.namespace.clone(), p.name.clone())) {
                        Some(known) => {
                            if known.owner.is_none() {
                                known.owner = p.owner.clone();
                            }
                        }
                        None => self.add(InventoryPod {
                            namespace: p.namespace.clone(),
                            name: p.name.clone(),
                            labels: p.labels.clone(),
                            owner: p.owner.clone(),
                        }),
                    }
                }
            }
        }
    }

    pub fn pods(&self) -> impl Iterator<Item = &InventoryPod> {
        self.pods.values()
    }

    pub fn len(&self) -> usize {
        self.pods.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pods.is_empty()
    }
}

/// `ip` as a CIDR of `prefix` bits (host bits cleared).
pub fn cidr_of(ip: IpAddr, prefix: u8) -> String {
    match ip {
        IpAddr::V4(a) => {
            let p = prefix.min(32);
            let mask = if p == 0 { 0 } else { u32::MAX << (32 - u32::from(p)) };
            format!("{}/{p}", std::net::Ipv4Addr::from(u32::from(a) & mask))
        }
        IpAddr::V6(a) => {
            let p = prefix.min(128);
            let mask = if p == 0 { 0 } else { u128::MAX << (128 - u32::from(p)) };
            format!("{}/{p}", std::net::Ipv6Addr::from(u128::from(a) & mask))
        }
    }
}

/// How a party is named in reports: (namespace, workload).
pub fn party_names(p: &Party) -> (String, String) {
    match p {
        Party::Pod(p) => (p.namespace.clone(), WorkloadId::of_party(p).name()),
        Party::Address { ip, kind } => (
            String::new(),
            match kind {
                AddressKind::World => format!("world:{ip}"),
                AddressKind::Host => format!("host:{ip}"),
                AddressKind::Unknown => ip.to_string(),
            },
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(kv: &[(&str, &str)]) -> Labels {
        kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn workloads_group_by_owner_then_stable_labels() {
        let deploy = Owner { kind: "Deployment".into(), name: "api".into() };
        let a = WorkloadId::of("b", "api-1", &labels(&[("app", "api"), ("pod-template-hash", "x1")]), Some(&deploy));
        let b = WorkloadId::of("b", "api-2", &labels(&[("app", "api"), ("pod-template-hash", "x2")]), Some(&deploy));
        assert_eq!(a, b);
        assert_eq!((a.name(), a.kind()), ("api".to_string(), "Deployment"));
        assert!(a.matches("api") && a.matches("deployment/api") && !a.matches("statefulset/api"));
        // Bare pods: by stable labels, the unstable ones ignored.
        let p = WorkloadId::of("f", "frontend", &labels(&[("run", "frontend"), ("controller-revision-hash", "1")]), None);
        let q = WorkloadId::of("f", "frontend-2", &labels(&[("run", "frontend")]), None);
        assert_eq!(p, q);
        assert_eq!(p.name(), "frontend");
        assert_eq!(WorkloadId::of("f", "lonely", &Labels::new(), None).name(), "lonely");
    }

    #[test]
    fn flows_name_owners_the_manifests_left_out() {
        let mut inv = Inventory::new();
        inv.add(InventoryPod { namespace: "b".into(), name: "api-1".into(), labels: labels(&[("app", "api")]), owner: None });
        let api = Party::Pod(PodParty {
            namespace: "b".into(),
            name: "api-1".into(),
            labels: labels(&[("app", "api"), ("old", "x")]),
            owner: Some(Owner { kind: "Deployment".into(), name: "api".into() }),
            ip: None,
        });
        let o = Observation {
            src: api.clone(),
            dst: api,
            protocol: Protocol::Tcp,
            port: 80,
            outcome: Outcome::Allowed,
            flows: 1,
            first: 0,
            last: 0,
        };
        inv.observe(&[o]);
        let p = inv.pods().next().unwrap();
        assert_eq!(p.owner.as_ref().map(|o| o.name.as_str()), Some("api"));
        // The cluster's (current) labels are kept.
        assert_eq!(p.labels, labels(&[("app", "api")]));
    }

    #[test]
    fn cidrs_clear_host_bits() {
        assert_eq!(cidr_of("203.0.113.77".parse().unwrap(), 32), "203.0.113.77/32");
        assert_eq!(cidr_of("203.0.113.77".parse().unwrap(), 24), "203.0.113.0/24");
        assert_eq!(cidr_of("2001:db8::1".parse().unwrap(), 128), "2001:db8::1/128");
        assert_eq!(cidr_of("2001:db8:1:2::1".parse().unwrap(), 48), "2001:db8:1::/48");
    }
}
