//! For a denied flow: the policy `flows policy suggest` would add to allow it, chosen with
//! the same rules (smallest exact stable selectors, ports as seen), against the pods the
//! dashboard has seen recently.

use std::net::IpAddr;

use flows_policy::{
    Protocol,
    advice::{self, AddressKind, Inventory, Observation, Outcome, Owner, Party, PodParty, SuggestOptions},
    selector::Labels,
};
use flows_proto::{Endpoint, Flow, Verdict, layer4};

fn labels(v: &[String]) -> Labels {
    v.iter()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn party(e: Option<&Endpoint>, ip: &str) -> Option<Party> {
    let ip: Option<IpAddr> = ip.parse().ok();
    match e {
        Some(e) if !e.pod_name.is_empty() => Some(Party::Pod(PodParty {
            namespace: e.namespace.clone(),
            name: e.pod_name.clone(),
            labels: labels(&e.labels),
            owner: e.workloads.last().map(|w| Owner { kind: w.kind.clone(), name: w.name.clone() }),
            ip,
        })),
        Some(e) if e.is_world => Some(Party::Address { ip: ip?, kind: AddressKind::World }),
        Some(e) if e.labels.iter().any(|l| l == "reserved:host") => Some(Party::Address { ip: ip?, kind: AddressKind::Host }),
        _ => Some(Party::Address { ip: ip?, kind: AddressKind::Unknown }),
    }
}

fn observation(f: &Flow, outcome: Outcome) -> Option<Observation> {
    let ip = f.ip.clone().unwrap_or_default();
    let (protocol, port) = match f.l4.as_ref()?.protocol.as_ref()? {
        layer4::Protocol::Tcp(t) => (Protocol::Tcp, t.destination_port),
        layer4::Protocol::Udp(u) => (Protocol::Udp, u.destination_port),
        layer4::Protocol::Sctp(s) => (Protocol::Sctp, s.destination_port),
        layer4::Protocol::Icmpv4(_) => (Protocol::Icmp, 0),
        layer4::Protocol::Icmpv6(_) => (Protocol::Icmpv6, 0),
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

/// The allow policies (YAML) that would let `f` through, or None when it was not denied
/// by policy or names no pod to write a policy for.
pub fn for_denied<'a>(f: &Flow, seen: impl Iterator<Item = &'a Flow>) -> Option<String> {
    if f.verdict != Verdict::Dropped as i32 && f.verdict != Verdict::Audit as i32 {
        return None;
    }
    let egress = !f.egress_denied_by.is_empty();
    let ingress = !f.ingress_denied_by.is_empty();
    if !egress && !ingress {
        return None;
    }
    let mut inventory = Inventory::new();
    inventory.observe(&seen.filter_map(|s| observation(s, Outcome::Allowed)).collect::<Vec<_>>());
    let obs = observation(f, Outcome::Allowed)?;
    let mut namespaces = Vec::new();
    for (denied, p) in [(egress, &obs.src), (ingress, &obs.dst)] {
        if let (true, Party::Pod(p)) = (denied, p) {
            namespaces.push(p.namespace.clone());
        }
    }
    if namespaces.is_empty() {
        return None;
    }
    let mut s = advice::suggest(&[obs], &inventory, &SuggestOptions { namespaces, ..Default::default() });
    s.policies.retain(|p| {
        let spec = p.spec.as_ref();
        p.metadata.name.as_deref() != Some("default-deny")
            && ((egress && spec.is_some_and(|s| s.egress.is_some())) || (ingress && spec.is_some_and(|s| s.ingress.is_some())))
    });
    if s.policies.is_empty() {
        return None;
    }
    s.yaml(false).ok()
}
