//! Flow filters, built once from `FlowFilter` messages and matched against every flow.
//!
//! Semantics as Hubble's: within one field the values are alternatives (OR); the fields
//! of one filter must all match (AND); a flow passes when it matches any allow-list
//! filter (or the allow list is empty) and no deny-list filter.

use std::{collections::BTreeMap, net::IpAddr};

use flows_proto::{
    EventType, Flow, FlowFilter, IpVersion, TcpFlags, TrafficDirection, Verdict, layer4,
};

use crate::selector::{LabelSelector, SelectorError};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FilterError {
    #[error("filter {index}: {field}: invalid value {value:?}: {reason}")]
    Value {
        index: usize,
        field: &'static str,
        value: String,
        reason: String,
    },
    #[error("filter {index}: {field}: {source}")]
    Selector {
        index: usize,
        field: &'static str,
        #[source]
        source: SelectorError,
    },
}

#[derive(Debug, Clone)]
enum IpMatch {
    Addr(IpAddr),
    Net(IpAddr, u8),
}

impl IpMatch {
    fn parse(s: &str) -> Option<IpMatch> {
        if let Some((a, l)) = s.split_once('/') {
            let a: IpAddr = a.parse().ok()?;
            let l: u8 = l.parse().ok()?;
            let max = if a.is_ipv4() { 32 } else { 128 };
            (l <= max).then_some(IpMatch::Net(a, l))
        } else {
            s.parse().ok().map(IpMatch::Addr)
        }
    }

    fn matches(&self, ip: IpAddr) -> bool {
        match self {
            IpMatch::Addr(a) => *a == ip,
            IpMatch::Net(net, len) => match (net, ip) {
                (IpAddr::V4(n), IpAddr::V4(i)) => {
                    let m = if *len == 0 { 0 } else { u32::MAX << (32 - len) };
                    u32::from(*n) & m == u32::from(i) & m
                }
                (IpAddr::V6(n), IpAddr::V6(i)) => {
                    let m = if *len == 0 { 0 } else { u128::MAX << (128 - len) };
                    u128::from(*n) & m == u128::from(i) & m
                }
                _ => false,
            },
        }
    }
}

/// `[namespace/]pod-name-prefix`; "ns/" matches every pod of the namespace.
#[derive(Debug, Clone)]
struct PodMatch {
    namespace: Option<String>,
    prefix: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proto {
    Tcp,
    Udp,
    Sctp,
    Icmpv4,
    Icmpv6,
}

/// `*` matches any run of characters; everything else literally.
#[derive(Debug, Clone)]
struct Glob(String);

impl Glob {
    /// Iterative, with one backtracking point (the last `*`): O(pattern × text) time and
    /// no recursion, since patterns come from clients (a recursive matcher let one
    /// request of stars take exponential time or overflow the stack).
    fn matches(&self, s: &str) -> bool {
        let (p, s) = (self.0.as_bytes(), s.as_bytes());
        let (mut pi, mut si) = (0, 0);
        // After the last `*` seen: where the pattern resumes, and where that `*`'s match ends.
        let mut star: Option<(usize, usize)> = None;
        while si < s.len() {
            if p.get(pi) == Some(&b'*') {
                pi += 1;
                star = Some((pi, si));
            } else if p.get(pi) == Some(&s[si]) {
                pi += 1;
                si += 1;
            } else if let Some((resume, end)) = star {
                // Let the last `*` take one more character and retry from there.
                pi = resume;
                si = end + 1;
                star = Some((resume, end + 1));
            } else {
                return false;
            }
        }
        p[pi..].iter().all(|&c| c == b'*')
    }
}

#[derive(Debug, Clone)]
enum Check {
    Uuid(Vec<String>),
    Ip { source: bool, any: Vec<IpMatch> },
    Pod { source: bool, any: Vec<PodMatch> },
    Namespace { source: bool, any: Vec<String> },
    Label { source: bool, any: Vec<LabelSelector> },
    Workload { source: bool, any: Vec<String> },
    Port { source: bool, any: Vec<(u16, u16)> },
    Verdict(Vec<i32>),
    DropReason(Vec<String>),
    EventType(Vec<i32>),
    Protocol(Vec<Proto>),
    TcpFlags(Vec<TcpFlags>),
    Direction(Vec<i32>),
    Node(Vec<Glob>),
    IpVersion(Vec<i32>),
    Reply(Vec<bool>),
}

fn endpoint(f: &Flow, source: bool) -> Option<&flows_proto::Endpoint> {
    if source { f.source.as_ref() } else { f.destination.as_ref() }
}

fn ip_of(f: &Flow, source: bool) -> Option<IpAddr> {
    let ip = f.ip.as_ref()?;
    let s = if source { &ip.source } else { &ip.destination };
    s.parse().ok()
}

fn port_of(f: &Flow, source: bool) -> Option<u16> {
    let p = match f.l4.as_ref()?.protocol.as_ref()? {
        layer4::Protocol::Tcp(t) => if source { t.source_port } else { t.destination_port },
        layer4::Protocol::Udp(u) => if source { u.source_port } else { u.destination_port },
        layer4::Protocol::Sctp(s) => if source { s.source_port } else { s.destination_port },
        _ => return None,
    };
    u16::try_from(p).ok()
}

fn labels_of(e: &flows_proto::Endpoint) -> BTreeMap<String, String> {
    e.labels
        .iter()
        .map(|l| match l.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (l.clone(), String::new()),
        })
        .collect()
}

fn flags_cover(have: &TcpFlags, want: &TcpFlags) -> bool {
    (!want.syn || have.syn)
        && (!want.ack || have.ack)
        && (!want.fin || have.fin)
        && (!want.rst || have.rst)
        && (!want.psh || have.psh)
        && (!want.urg || have.urg)
        && (!want.ece || have.ece)
        && (!want.cwr || have.cwr)
}

impl Check {
    fn matches(&self, f: &Flow) -> bool {
        match self {
            Check::Uuid(v) => v.iter().any(|u| *u == f.uuid),
            Check::Ip { source, any } => {
                ip_of(f, *source).is_some_and(|ip| any.iter().any(|m| m.matches(ip)))
            }
            Check::Pod { source, any } => endpoint(f, *source).is_some_and(|e| {
                !e.pod_name.is_empty()
                    && any.iter().any(|m| {
                        m.namespace.as_deref().is_none_or(|ns| ns == e.namespace)
                            && e.pod_name.starts_with(&m.prefix)
                    })
            }),
            Check::Namespace { source, any } => endpoint(f, *source)
                .is_some_and(|e| !e.namespace.is_empty() && any.iter().any(|n| *n == e.namespace)),
            Check::Label { source, any } => endpoint(f, *source).is_some_and(|e| {
                let l = labels_of(e);
                any.iter().any(|s| s.matches(&l))
            }),
            Check::Workload { source, any } => endpoint(f, *source).is_some_and(|e| {
                e.workloads.iter().any(|w| {
                    any.iter().any(|n| match n.split_once('/') {
                        // `kind/name`, as `hubble observe --workload` takes it.
                        Some((kind, name)) => name == w.name && kind.eq_ignore_ascii_case(&w.kind),
                        None => *n == w.name,
                    })
                })
            }),
            Check::Port { source, any } => port_of(f, *source)
                .is_some_and(|p| any.iter().any(|(a, b)| (*a..=*b).contains(&p))),
            Check::Verdict(v) => v.contains(&f.verdict),
            Check::DropReason(v) => v.iter().any(|r| r.eq_ignore_ascii_case(&f.drop_reason)),
            Check::EventType(v) => v.contains(&f.event_type),
            Check::Protocol(v) => {
                let p = match f.l4.as_ref().and_then(|l| l.protocol.as_ref()) {
                    Some(layer4::Protocol::Tcp(_)) => Proto::Tcp,
                    Some(layer4::Protocol::Udp(_)) => Proto::Udp,
                    Some(layer4::Protocol::Sctp(_)) => Proto::Sctp,
                    Some(layer4::Protocol::Icmpv4(_)) => Proto::Icmpv4,
                    Some(layer4::Protocol::Icmpv6(_)) => Proto::Icmpv6,
                    None => return false,
                };
                v.contains(&p)
            }
            Check::TcpFlags(v) => match f.l4.as_ref().and_then(|l| l.protocol.as_ref()) {
                Some(layer4::Protocol::Tcp(t)) => {
                    let have = t.flags.unwrap_or_default();
                    v.iter().any(|w| flags_cover(&have, w))
                }
                _ => false,
            },
            Check::Direction(v) => v.contains(&f.traffic_direction),
            Check::Node(v) => v.iter().any(|g| g.matches(&f.node_name)),
            Check::IpVersion(v) => f.ip.as_ref().is_some_and(|ip| v.contains(&ip.ip_version)),
            Check::Reply(v) => v.contains(&f.is_reply),
        }
    }
}

#[derive(Debug, Clone, Default)]
struct Compiled {
    checks: Vec<Check>,
}

impl Compiled {
    fn matches(&self, f: &Flow) -> bool {
        self.checks.iter().all(|c| c.matches(f))
    }
}

fn value_err(index: usize, field: &'static str, value: &str, reason: &str) -> FilterError {
    FilterError::Value {
        index,
        field,
        value: value.to_string(),
        reason: reason.to_string(),
    }
}

fn ports(index: usize, field: &'static str, v: &[String]) -> Result<Vec<(u16, u16)>, FilterError> {
    v.iter()
        .map(|s| {
            let parse = |x: &str| x.trim().parse::<u16>().ok();
            match s.split_once('-') {
                Some((a, b)) => match (parse(a), parse(b)) {
                    (Some(a), Some(b)) if a <= b => Ok((a, b)),
                    _ => Err(value_err(index, field, s, "expected a port or a range a-b")),
                },
                None => parse(s)
                    .map(|p| (p, p))
                    .ok_or_else(|| value_err(index, field, s, "expected a port number")),
            }
        })
        .collect()
}

fn enums(index: usize, field: &'static str, v: &[i32], valid: impl Fn(i32) -> bool) -> Result<Vec<i32>, FilterError> {
    for x in v {
        if !valid(*x) {
            return Err(value_err(index, field, &x.to_string(), "unknown value"));
        }
    }
    Ok(v.to_vec())
}

fn compile(index: usize, f: &FlowFilter) -> Result<Compiled, FilterError> {
    let mut c = Compiled::default();
    let mut push = |check: Check, non_empty: bool| {
        if non_empty {
            c.checks.push(check);
        }
    };
    push(Check::Uuid(f.uuid.clone()), !f.uuid.is_empty());
    for (source, field, values) in [
        (true, "source_ip", &f.source_ip),
        (false, "destination_ip", &f.destination_ip),
    ] {
        let any = values
            .iter()
            .map(|s| IpMatch::parse(s).ok_or_else(|| value_err(index, field, s, "expected an address or CIDR")))
            .collect::<Result<Vec<_>, _>>()?;
        push(Check::Ip { source, any }, !values.is_empty());
    }
    for (source, values) in [(true, &f.source_pod), (false, &f.destination_pod)] {
        let any = values
            .iter()
            .map(|s| match s.split_once('/') {
                Some((ns, p)) => PodMatch {
                    namespace: Some(ns.to_string()),
                    prefix: p.to_string(),
                },
                None => PodMatch {
                    namespace: None,
                    prefix: s.clone(),
                },
            })
            .collect();
        push(Check::Pod { source, any }, !values.is_empty());
    }
    push(
        Check::Namespace { source: true, any: f.source_namespace.clone() },
        !f.source_namespace.is_empty(),
    );
    push(
        Check::Namespace { source: false, any: f.destination_namespace.clone() },
        !f.destination_namespace.is_empty(),
    );
    for (source, field, values) in [
        (true, "source_label", &f.source_label),
        (false, "destination_label", &f.destination_label),
    ] {
        let any = values
            .iter()
            .map(|s| LabelSelector::parse(s).map_err(|source| FilterError::Selector { index, field, source }))
            .collect::<Result<Vec<_>, _>>()?;
        push(Check::Label { source, any }, !values.is_empty());
    }
    push(
        Check::Workload { source: true, any: f.source_workload.clone() },
        !f.source_workload.is_empty(),
    );
    push(
        Check::Workload { source: false, any: f.destination_workload.clone() },
        !f.destination_workload.is_empty(),
    );
    push(
        Check::Port { source: true, any: ports(index, "source_port", &f.source_port)? },
        !f.source_port.is_empty(),
    );
    push(
        Check::Port { source: false, any: ports(index, "destination_port", &f.destination_port)? },
        !f.destination_port.is_empty(),
    );
    push(
        Check::Verdict(enums(index, "verdict", &f.verdict, |v| Verdict::try_from(v).is_ok())?),
        !f.verdict.is_empty(),
    );
    push(Check::DropReason(f.drop_reason.clone()), !f.drop_reason.is_empty());
    push(
        Check::EventType(enums(index, "event_type", &f.event_type, |v| EventType::try_from(v).is_ok())?),
        !f.event_type.is_empty(),
    );
    let protos = f
        .protocol
        .iter()
        .map(|p| match p.to_ascii_lowercase().as_str() {
            "tcp" => Ok(Proto::Tcp),
            "udp" => Ok(Proto::Udp),
            "sctp" => Ok(Proto::Sctp),
            "icmp" | "icmpv4" => Ok(Proto::Icmpv4),
            "icmpv6" => Ok(Proto::Icmpv6),
            _ => Err(value_err(index, "protocol", p, "expected tcp, udp, sctp, icmpv4 or icmpv6")),
        })
        .collect::<Result<Vec<_>, _>>()?;
    push(Check::Protocol(protos), !f.protocol.is_empty());
    push(Check::TcpFlags(f.tcp_flags.clone()), !f.tcp_flags.is_empty());
    push(
        Check::Direction(enums(index, "traffic_direction", &f.traffic_direction, |v| {
            TrafficDirection::try_from(v).is_ok()
        })?),
        !f.traffic_direction.is_empty(),
    );
    push(
        Check::Node(f.node_name.iter().map(|n| Glob(n.clone())).collect()),
        !f.node_name.is_empty(),
    );
    push(
        Check::IpVersion(enums(index, "ip_version", &f.ip_version, |v| IpVersion::try_from(v).is_ok())?),
        !f.ip_version.is_empty(),
    );
    push(Check::Reply(f.reply.clone()), !f.reply.is_empty());
    Ok(c)
}

/// Allow list minus deny list, compiled once.
#[derive(Debug, Clone, Default)]
pub struct FilterSet {
    allow: Vec<Compiled>,
    deny: Vec<Compiled>,
}

impl FilterSet {
    pub fn new(allow: &[FlowFilter], deny: &[FlowFilter]) -> Result<FilterSet, FilterError> {
        Ok(FilterSet {
            allow: allow.iter().enumerate().map(|(i, f)| compile(i, f)).collect::<Result<_, _>>()?,
            deny: deny
                .iter()
                .enumerate()
                .map(|(i, f)| compile(allow.len() + i, f))
                .collect::<Result<_, _>>()?,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.allow.is_empty() && self.deny.is_empty()
    }

    pub fn matches(&self, f: &Flow) -> bool {
        (self.allow.is_empty() || self.allow.iter().any(|c| c.matches(f)))
            && !self.deny.iter().any(|c| c.matches(f))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flows_proto::{Endpoint, Ip, Layer4, Tcp};

    fn flow(src_ns: &str, src_pod: &str, dport: u32, verdict: Verdict) -> Flow {
        Flow {
            node_name: "node-1".into(),
            verdict: verdict as i32,
            ip: Some(Ip {
                source: "10.244.1.2".into(),
                destination: "10.244.2.3".into(),
                ip_version: IpVersion::Ipv4 as i32,
            }),
            l4: Some(Layer4 {
                protocol: Some(layer4::Protocol::Tcp(Tcp {
                    source_port: 40000,
                    destination_port: dport,
                    flags: Some(TcpFlags { syn: true, ..Default::default() }),
                })),
            }),
            source: Some(Endpoint {
                namespace: src_ns.into(),
                pod_name: src_pod.into(),
                labels: vec!["app=web".into(), "tier=front".into()],
                ..Default::default()
            }),
            destination: Some(Endpoint {
                namespace: "db".into(),
                pod_name: "postgres-0".into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn or_within_and_across_minus_deny() {
        let allow = vec![FlowFilter {
            verdict: vec![Verdict::Dropped as i32, Verdict::Audit as i32],
            source_namespace: vec!["frontend".into()],
            ..Default::default()
        }];
        let deny = vec![FlowFilter {
            destination_port: vec!["5432".into()],
            ..Default::default()
        }];
        let fs = FilterSet::new(&allow, &deny).expect("valid");
        assert!(fs.matches(&flow("frontend", "web-1", 80, Verdict::Dropped)));
        assert!(fs.matches(&flow("frontend", "web-1", 80, Verdict::Audit)));
        assert!(!fs.matches(&flow("frontend", "web-1", 80, Verdict::Forwarded)));
        assert!(!fs.matches(&flow("backend", "web-1", 80, Verdict::Dropped)));
        assert!(!fs.matches(&flow("frontend", "web-1", 5432, Verdict::Dropped)));
        assert!(FilterSet::new(&[], &[]).expect("empty").matches(&flow("a", "b", 1, Verdict::Forwarded)));
    }

    #[test]
    fn fields() {
        let one = |f: FlowFilter| FilterSet::new(&[f], &[]).expect("valid");
        let fl = flow("frontend", "web-1", 80, Verdict::Forwarded);
        assert!(one(FlowFilter { source_pod: vec!["frontend/web".into()], ..Default::default() }).matches(&fl));
        assert!(!one(FlowFilter { source_pod: vec!["other/web".into()], ..Default::default() }).matches(&fl));
        assert!(one(FlowFilter { source_ip: vec!["10.244.0.0/16".into()], ..Default::default() }).matches(&fl));
        assert!(!one(FlowFilter { destination_ip: vec!["10.244.1.0/24".into()], ..Default::default() }).matches(&fl));
        assert!(one(FlowFilter { source_label: vec!["app=web,tier in (front, edge)".into()], ..Default::default() }).matches(&fl));
        assert!(!one(FlowFilter { source_label: vec!["app!=web".into()], ..Default::default() }).matches(&fl));
        assert!(one(FlowFilter { destination_port: vec!["70-90".into()], ..Default::default() }).matches(&fl));
        assert!(one(FlowFilter { protocol: vec!["TCP".into()], ..Default::default() }).matches(&fl));
        assert!(!one(FlowFilter { protocol: vec!["udp".into()], ..Default::default() }).matches(&fl));
        assert!(one(FlowFilter { tcp_flags: vec![TcpFlags { syn: true, ..Default::default() }], ..Default::default() }).matches(&fl));
        assert!(!one(FlowFilter { tcp_flags: vec![TcpFlags { syn: true, ack: true, ..Default::default() }], ..Default::default() }).matches(&fl));
        assert!(one(FlowFilter { node_name: vec!["node-*".into()], ..Default::default() }).matches(&fl));
        assert!(!one(FlowFilter { node_name: vec!["node-2".into()], ..Default::default() }).matches(&fl));
    }

    #[test]
    fn bad_values_are_named() {
        let e = FilterSet::new(&[FlowFilter { source_ip: vec!["10.0.0.300".into()], ..Default::default() }], &[])
            .expect_err("bad ip");
        assert!(e.to_string().contains("source_ip"), "{e}");
        assert!(FilterSet::new(&[FlowFilter { destination_port: vec!["9-1".into()], ..Default::default() }], &[]).is_err());
        assert!(FilterSet::new(&[FlowFilter { verdict: vec![99], ..Default::default() }], &[]).is_err());
        assert!(FilterSet::new(&[FlowFilter { source_label: vec!["a in (".into()], ..Default::default() }], &[]).is_err());
    }
}
