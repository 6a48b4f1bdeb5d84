//! History replayed through the engine: for every observed group of attempts, the
//! decision of a set of policies against the outcome that was recorded.
//!
//! Each side is rebuilt as the attempt saw it: a pod with the labels and address it had
//! then (its containerPorts from the cluster, for named ports), or an address. Namespace
//! labels come from the cluster; a namespace it does not know has the label the API
//! server always sets, `kubernetes.io/metadata.name`.

use std::collections::BTreeMap;

use serde::Serialize;

use super::{Observation, Outcome, Party, party_names};
use crate::{Cluster, Endpoint, Engine, PodInfo, selector::Labels};

/// Attempts of one workload pair and port that share a before and after.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChangeGroup {
    pub src_namespace: String,
    pub src_workload: String,
    pub dst_namespace: String,
    pub dst_workload: String,
    pub protocol: String,
    pub port: u16,
    pub flows: u64,
    pub first_seen: i64,
    pub last_seen: i64,
    /// The policies that decide under the replayed set (`namespace/name`).
    pub policies: Vec<String>,
}

/// What a set of policies would have decided for the history.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Replay {
    /// Attempts (flows) and distinct groups evaluated.
    pub flows: u64,
    pub groups: u64,
    /// Attempts allowed before and after.
    pub still_allowed: u64,
    /// Allowed before, denied now: what the policies would break.
    pub newly_denied: Vec<ChangeGroup>,
    /// Denied before, allowed now.
    pub newly_allowed: Vec<ChangeGroup>,
    /// Denied before and now.
    pub still_denied: Vec<ChangeGroup>,
    /// Attempts refused by their destination (nothing listened) that do not count as
    /// allowed: left out of the comparison, whatever the policies decide.
    pub refused: u64,
}

impl Replay {
    pub fn breaks_anything(&self) -> bool {
        !self.newly_denied.is_empty()
    }

    pub fn count(groups: &[ChangeGroup]) -> u64 {
        groups.iter().map(|g| g.flows).sum()
    }
}

fn pod_info(cluster: &Cluster, p: &super::PodParty) -> PodInfo {
    PodInfo {
        namespace: p.namespace.clone(),
        name: p.name.clone(),
        node: None,
        labels: p.labels.clone(),
        ips: p.ip.into_iter().collect(),
        ports: cluster
            .pod(&p.namespace, &p.name)
            .map(|c| c.ports.clone())
            .unwrap_or_default(),
    }
}

fn endpoint<'a>(party: &Party, info: &'a Option<PodInfo>) -> Option<Endpoint<'a>> {
    match (party, info) {
        (Party::Pod(p), Some(i)) => Some(Endpoint::Pod(i, p.ip)),
        (Party::Address { ip, .. }, _) => Some(Endpoint::External(*ip)),
        (Party::Pod(_), None) => None,
    }
}

type GroupKey = (String, String, String, String, String, u16);

fn add(into: &mut BTreeMap<GroupKey, ChangeGroup>, o: &Observation, policies: Vec<String>) {
    let (sn, sw) = party_names(&o.src);
    let (dn, dw) = party_names(&o.dst);
    let protocol = o.protocol.as_str().to_string();
    let g = into
        .entry((sn.clone(), sw.clone(), dn.clone(), dw.clone(), protocol.clone(), o.port))
        .or_insert_with(|| ChangeGroup {
            src_namespace: sn,
            src_workload: sw,
            dst_namespace: dn,
            dst_workload: dw,
            protocol,
            port: o.port,
            flows: 0,
            first_seen: o.first,
            last_seen: o.last,
            policies: Vec::new(),
        });
    g.flows += o.flows;
    g.first_seen = g.first_seen.min(o.first);
    g.last_seen = g.last_seen.max(o.last);
    for p in policies {
        if !g.policies.contains(&p) {
            g.policies.push(p);
        }
    }
    g.policies.sort();
}

/// Replays `observations` through `engine`; `allowed_before` says which recorded outcomes
/// count as allowed.
pub fn replay(
    engine: &Engine,
    cluster: &Cluster,
    observations: &[Observation],
    allowed_before: impl Fn(Outcome) -> bool,
) -> Replay {
    let mut cluster = cluster.clone();
    for o in observations {
        for p in [&o.src, &o.dst] {
            if let Party::Pod(p) = p
                && cluster.namespace_labels(&p.namespace).is_none()
            {
                cluster.add_namespace(&p.namespace, Labels::new());
            }
        }
    }
    let mut out = Replay::default();
    let mut newly_denied = BTreeMap::new();
    let mut newly_allowed = BTreeMap::new();
    let mut still_denied = BTreeMap::new();
    for o in observations {
        out.flows += o.flows;
        out.groups += 1;
        if o.outcome == Outcome::Refused && !allowed_before(o.outcome) {
            out.refused += o.flows;
            continue;
        }
        let src_pod = match &o.src {
            Party::Pod(p) => Some(pod_info(&cluster, p)),
            Party::Address { .. } => None,
        };
        let dst_pod = match &o.dst {
            Party::Pod(p) => Some(pod_info(&cluster, p)),
            Party::Address { .. } => None,
        };
        let (Some(src), Some(dst)) = (endpoint(&o.src, &src_pod), endpoint(&o.dst, &dst_pod)) else {
            continue;
        };
        let d = engine.evaluate(&cluster, &src, &dst, o.protocol, o.port);
        let policies: Vec<String> = d.deciding().iter().map(|p| p.to_string()).collect();
        match (allowed_before(o.outcome), d.allowed) {
            (true, true) => out.still_allowed += o.flows,
            (true, false) => add(&mut newly_denied, o, policies),
            (false, true) => add(&mut newly_allowed, o, policies),
            (false, false) => add(&mut still_denied, o, policies),
        }
    }
    let sorted = |m: BTreeMap<GroupKey, ChangeGroup>| {
        let mut v: Vec<ChangeGroup> = m.into_values().collect();
        // Largest first; ties in key order (the map's), so output is stable.
        v.sort_by_key(|g| std::cmp::Reverse(g.flows));
        v
    };
    out.newly_denied = sorted(newly_denied);
    out.newly_allowed = sorted(newly_allowed);
    out.still_denied = sorted(still_denied);
    out
}
