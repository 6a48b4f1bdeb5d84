//! Flows as the policy advice reads them: the ends of a flow (or of a History API
//! attempt group) as advice parties, and a flow as an observation. One conversion for
//! `flows policy suggest|check` and the dashboard.

use std::net::IpAddr;

use flows_policy::{
    Protocol,
    advice::{AddressKind, Observation, Outcome, Owner, Party, PodParty},
    selector::Labels,
};
use flows_proto::{Endpoint, Flow, layer4};

use crate::enrich::LABEL_HOST;

/// "key=value" labels as a label map (others are not labels a selector can name).
pub fn labels(v: &[String]) -> Labels {
    v.iter()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// What an address that is no pod is: the world, a node, or unknown.
pub fn address_kind(is_world: bool, labels: &[String]) -> AddressKind {
    if is_world {
        AddressKind::World
    } else if labels.iter().any(|l| l == LABEL_HOST) {
        AddressKind::Host
    } else {
        AddressKind::Unknown
    }
}

/// One end of a flow as the advice sees it (None: no address to go by).
pub fn party(e: Option<&Endpoint>, ip: &str) -> Option<Party> {
    let ip: Option<IpAddr> = ip.parse().ok();
    match e {
        Some(e) if !e.pod_name.is_empty() => Some(Party::Pod(PodParty {
            namespace: e.namespace.clone(),
            name: e.pod_name.clone(),
            labels: labels(&e.labels),
            owner: e.workloads.last().map(|w| Owner { kind: w.kind.clone(), name: w.name.clone() }),
            ip,
        })),
        Some(e) => Some(Party::Address { ip: ip?, kind: address_kind(e.is_world, &e.labels) }),
        None => Some(Party::Address { ip: ip?, kind: AddressKind::Unknown }),
    }
}

/// A flow as one observation with `outcome`; None for a flow policy cannot judge (no
/// address; ports unknown are judged as the protocol NetworkPolicy cannot name).
pub fn observation(f: &Flow, outcome: Outcome) -> Option<Observation> {
    let ip = f.ip.clone().unwrap_or_default();
    let (protocol, port) = match f.l4.as_ref().and_then(|l| l.protocol.as_ref()) {
        _ if f.l4_unknown.is_some() => (Protocol::L4Unknown, 0),
        Some(layer4::Protocol::Tcp(t)) => (Protocol::Tcp, t.destination_port),
        Some(layer4::Protocol::Udp(u)) => (Protocol::Udp, u.destination_port),
        Some(layer4::Protocol::Sctp(s)) => (Protocol::Sctp, s.destination_port),
        Some(layer4::Protocol::Icmpv4(_)) => (Protocol::Icmp, 0),
        Some(layer4::Protocol::Icmpv6(_)) => (Protocol::Icmpv6, 0),
        None => return None,
    };
    Some(Observation {
        src: party(f.source.as_ref(), &ip.source)?,
        dst: party(f.destination.as_ref(), &ip.destination)?,
        protocol,
        port: u16::try_from(port).ok()?,
        outcome,
        flows: 1,
        first: 0,
        last: 0,
    })
}
