//! One stored flow: the columns of `flows.flows`, from a Flow and back, and their
//! RowBinary encoding (the wire format of both backends' inserts).
//!
//! Workload names are resolved at ingest (the top-level owner, else the pod's own name;
//! the address for the world), so audits group on plain columns and need no regex.

use std::net::{IpAddr, Ipv6Addr};

use flows_proto::{
    Endpoint, EventType, Flow, Icmpv4, Icmpv6, Ip, IpVersion, L4Unknown, L4UnknownReason, Layer4,
    ObservationPoint, Policy,
    Sctp, Service, Tcp, TcpFlags, TrafficDirection, Udp, Verdict, Workload, layer4,
};
use serde::{Deserialize, Serialize};

/// Column order is the table's (RowBinary has no names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clickhouse::Row)]
pub struct FlowRow {
    /// Nanoseconds since the epoch (DateTime64(9, 'UTC')).
    pub time: i64,
    pub node: String,
    pub uuid: String,
    pub verdict: i8,
    pub drop_reason: String,
    pub event_type: i8,
    pub point: i8,
    pub direction: i8,
    pub is_reply: bool,
    pub ip_version: u8,
    pub protocol: String,
    pub src_ip: Ipv6Addr,
    pub dst_ip: Ipv6Addr,
    pub src_port: u16,
    pub dst_port: u16,
    pub tcp_flags: u8,
    pub src_namespace: String,
    pub src_pod: String,
    pub src_workload: String,
    pub src_workload_kind: String,
    pub src_workloads: Vec<String>,
    pub src_labels: Vec<String>,
    pub src_node: String,
    pub src_world: bool,
    pub src_identity: u32,
    pub dst_namespace: String,
    pub dst_pod: String,
    pub dst_workload: String,
    pub dst_workload_kind: String,
    pub dst_workloads: Vec<String>,
    pub dst_labels: Vec<String>,
    pub dst_node: String,
    pub dst_world: bool,
    pub dst_identity: u32,
    pub src_service: String,
    pub dst_service: String,
    pub ingress_allowed_by: Vec<String>,
    pub egress_allowed_by: Vec<String>,
    pub ingress_denied_by: Vec<String>,
    pub egress_denied_by: Vec<String>,
    pub packet_length: u32,
    /// The flow's `l4_unknown` reason (as its enum names it), or empty.
    pub l4_unknown: String,
}

impl Default for FlowRow {
    fn default() -> Self {
        FlowRow {
            time: 0,
            node: String::new(),
            uuid: String::new(),
            verdict: 0,
            drop_reason: String::new(),
            event_type: 0,
            point: 0,
            direction: 0,
            is_reply: false,
            ip_version: 0,
            protocol: String::new(),
            src_ip: Ipv6Addr::UNSPECIFIED,
            dst_ip: Ipv6Addr::UNSPECIFIED,
            src_port: 0,
            dst_port: 0,
            tcp_flags: 0,
            src_namespace: String::new(),
            src_pod: String::new(),
            src_workload: String::new(),
            src_workload_kind: String::new(),
            src_workloads: Vec::new(),
            src_labels: Vec::new(),
            src_node: String::new(),
            src_world: false,
            src_identity: 0,
            dst_namespace: String::new(),
            dst_pod: String::new(),
            dst_workload: String::new(),
            dst_workload_kind: String::new(),
            dst_workloads: Vec::new(),
            dst_labels: Vec::new(),
            dst_node: String::new(),
            dst_world: false,
            dst_identity: 0,
            src_service: String::new(),
            dst_service: String::new(),
            ingress_allowed_by: Vec::new(),
            egress_allowed_by: Vec::new(),
            ingress_denied_by: Vec::new(),
            egress_denied_by: Vec::new(),
            packet_length: 0,
            l4_unknown: String::new(),
        }
    }
}

/// Protocol names as stored.
const PROTOCOLS: [&str; 5] = ["TCP", "UDP", "ICMPv4", "ICMPv6", "SCTP"];

fn v6(ip: &str) -> Ipv6Addr {
    match ip.parse::<IpAddr>() {
        Ok(IpAddr::V4(a)) => a.to_ipv6_mapped(),
        Ok(IpAddr::V6(a)) => a,
        Err(_) => Ipv6Addr::UNSPECIFIED,
    }
}

fn ip_text(a: Ipv6Addr, version: u8) -> String {
    match (version, a.to_ipv4_mapped()) {
        (4, Some(v4)) => v4.to_string(),
        _ => a.to_string(),
    }
}

struct Side {
    namespace: String,
    pod: String,
    workload: String,
    kind: String,
    workloads: Vec<String>,
    labels: Vec<String>,
    node: String,
    world: bool,
    identity: u32,
}

fn side(e: Option<Endpoint>, ip: &str) -> Side {
    let e = e.unwrap_or_default();
    let (workload, kind) = if e.is_world {
        (ip.to_string(), "world".to_string())
    } else if let Some(w) = e.workloads.last() {
        (w.name.clone(), w.kind.clone())
    } else if !e.pod_name.is_empty() {
        (e.pod_name.clone(), "Pod".to_string())
    } else {
        // Not annotated: the address is all there is to group on.
        (ip.to_string(), String::new())
    };
    Side {
        namespace: e.namespace,
        pod: e.pod_name,
        workload,
        kind,
        workloads: e.workloads.iter().map(|w| format!("{}/{}", w.kind, w.name)).collect(),
        labels: e.labels,
        node: e.node_name,
        world: e.is_world,
        identity: e.identity,
    }
}

fn policies(ps: &[Policy]) -> Vec<String> {
    ps.iter()
        .map(|p| format!("{}:{}/{}", p.kind, p.namespace, p.name))
        .collect()
}

fn unpolicies(v: &[String]) -> Vec<Policy> {
    v.iter()
        .map(|s| {
            let (kind, rest) = s.split_once(':').unwrap_or(("", s));
            let (namespace, name) = rest.split_once('/').unwrap_or(("", rest));
            Policy {
                name: name.into(),
                namespace: namespace.into(),
                kind: kind.into(),
                labels: Vec::new(),
            }
        })
        .collect()
}

fn flags(f: &TcpFlags) -> u8 {
    [f.fin, f.syn, f.rst, f.psh, f.ack, f.urg, f.ece, f.cwr]
        .iter()
        .enumerate()
        .fold(0, |acc, (i, b)| acc | (u8::from(*b) << i))
}

fn unflags(b: u8) -> TcpFlags {
    let bit = |i: u8| b & (1 << i) != 0;
    TcpFlags {
        fin: bit(0),
        syn: bit(1),
        rst: bit(2),
        psh: bit(3),
        ack: bit(4),
        urg: bit(5),
        ece: bit(6),
        cwr: bit(7),
    }
}

fn service(s: &Option<Service>) -> String {
    s.as_ref()
        .map(|s| format!("{}/{}", s.namespace, s.name))
        .unwrap_or_default()
}

fn unservice(s: &str) -> Option<Service> {
    let (namespace, name) = s.split_once('/')?;
    Some(Service {
        name: name.into(),
        namespace: namespace.into(),
    })
}

impl FlowRow {
    pub fn from_flow(f: &Flow) -> FlowRow {
        FlowRow::from_owned(f.clone())
    }

    /// As [`FlowRow::from_flow`], taking the flow's strings instead of copying them.
    pub fn from_owned(mut f: Flow) -> FlowRow {
        let ip = f.ip.take().unwrap_or_default();
        let time = f.time.as_ref().map(flows_proto::timestamp_nanos).unwrap_or(0);
        let (protocol, sport, dport, tflags) = match f.l4.as_ref().and_then(|l| l.protocol.as_ref()) {
            Some(layer4::Protocol::Tcp(t)) => (0, t.source_port, t.destination_port, t.flags.as_ref().map(flags).unwrap_or(0)),
            Some(layer4::Protocol::Udp(u)) => (1, u.source_port, u.destination_port, 0),
            // ICMP: type and code in the port columns, as the flow's "ports".
            Some(layer4::Protocol::Icmpv4(i)) => (2, i.r#type, i.code, 0),
            Some(layer4::Protocol::Icmpv6(i)) => (3, i.r#type, i.code, 0),
            Some(layer4::Protocol::Sctp(s)) => (4, s.source_port, s.destination_port, 0),
            None => (usize::MAX, 0, 0, 0),
        };
        let s = side(f.source.take(), &ip.source);
        let d = side(f.destination.take(), &ip.destination);
        FlowRow {
            time,
            node: std::mem::take(&mut f.node_name),
            uuid: std::mem::take(&mut f.uuid),
            verdict: i8::try_from(f.verdict).unwrap_or(0),
            drop_reason: std::mem::take(&mut f.drop_reason),
            event_type: i8::try_from(f.event_type).unwrap_or(0),
            point: i8::try_from(f.observation_point).unwrap_or(0),
            direction: i8::try_from(f.traffic_direction).unwrap_or(0),
            is_reply: f.is_reply,
            ip_version: match IpVersion::try_from(ip.ip_version) {
                Ok(IpVersion::Ipv4) => 4,
                Ok(IpVersion::Ipv6) => 6,
                _ => 0,
            },
            protocol: match &f.l4_unknown {
                // The ports are unknown: the IP protocol by name.
                Some(u) if protocol == usize::MAX => flows_proto::ip_protocol_name(u.protocol),
                _ => PROTOCOLS.get(protocol).copied().unwrap_or("").to_string(),
            },
            src_ip: v6(&ip.source),
            dst_ip: v6(&ip.destination),
            src_port: u16::try_from(sport).unwrap_or(0),
            dst_port: u16::try_from(dport).unwrap_or(0),
            tcp_flags: tflags,
            src_namespace: s.namespace,
            src_pod: s.pod,
            src_workload: s.workload,
            src_workload_kind: s.kind,
            src_workloads: s.workloads,
            src_labels: s.labels,
            src_node: s.node,
            src_world: s.world,
            src_identity: s.identity,
            dst_namespace: d.namespace,
            dst_pod: d.pod,
            dst_workload: d.workload,
            dst_workload_kind: d.kind,
            dst_workloads: d.workloads,
            dst_labels: d.labels,
            dst_node: d.node,
            dst_world: d.world,
            dst_identity: d.identity,
            src_service: service(&f.source_service),
            dst_service: service(&f.destination_service),
            ingress_allowed_by: policies(&f.ingress_allowed_by),
            egress_allowed_by: policies(&f.egress_allowed_by),
            ingress_denied_by: policies(&f.ingress_denied_by),
            egress_denied_by: policies(&f.egress_denied_by),
            packet_length: f.packet_length,
            l4_unknown: l4_unknown_name(&f.l4_unknown),
        }
    }

    /// The Flow this row was made from (interface and drop reason code are not stored).
    pub fn to_flow(&self) -> Flow {
        let ep = |namespace: &str, pod: &str, workloads: &[String], labels: &[String], node: &str, world: bool, identity: u32| {
            if namespace.is_empty() && pod.is_empty() && !world && node.is_empty() && labels.is_empty() {
                return None;
            }
            Some(Endpoint {
                identity,
                namespace: namespace.into(),
                pod_name: pod.into(),
                labels: labels.to_vec(),
                workloads: workloads
                    .iter()
                    .map(|w| {
                        let (kind, name) = w.split_once('/').unwrap_or(("", w));
                        Workload {
                            name: name.into(),
                            kind: kind.into(),
                        }
                    })
                    .collect(),
                node_name: node.into(),
                is_world: world,
            })
        };
        let (sp, dp) = (u32::from(self.src_port), u32::from(self.dst_port));
        let protocol = match self.protocol.as_str() {
            "TCP" => Some(layer4::Protocol::Tcp(Tcp {
                source_port: sp,
                destination_port: dp,
                flags: Some(unflags(self.tcp_flags)),
            })),
            "UDP" => Some(layer4::Protocol::Udp(Udp {
                source_port: sp,
                destination_port: dp,
            })),
            "ICMPv4" => Some(layer4::Protocol::Icmpv4(Icmpv4 {
                r#type: sp,
                code: dp,
                echo_id: 0,
            })),
            "ICMPv6" => Some(layer4::Protocol::Icmpv6(Icmpv6 {
                r#type: sp,
                code: dp,
                echo_id: 0,
            })),
            "SCTP" => Some(layer4::Protocol::Sctp(Sctp {
                source_port: sp,
                destination_port: dp,
            })),
            _ => None,
        };
        Flow {
            time: Some(flows_proto::timestamp_from_nanos(self.time)),
            uuid: self.uuid.clone(),
            node_name: self.node.clone(),
            verdict: i32::from(self.verdict),
            drop_reason: self.drop_reason.clone(),
            event_type: i32::from(self.event_type),
            ip: Some(Ip {
                source: ip_text(self.src_ip, self.ip_version),
                destination: ip_text(self.dst_ip, self.ip_version),
                ip_version: match self.ip_version {
                    4 => IpVersion::Ipv4,
                    6 => IpVersion::Ipv6,
                    _ => IpVersion::Unspecified,
                } as i32,
            }),
            l4: protocol.map(|p| Layer4 { protocol: Some(p) }),
            source: ep(&self.src_namespace, &self.src_pod, &self.src_workloads, &self.src_labels, &self.src_node, self.src_world, self.src_identity),
            destination: ep(&self.dst_namespace, &self.dst_pod, &self.dst_workloads, &self.dst_labels, &self.dst_node, self.dst_world, self.dst_identity),
            traffic_direction: i32::from(self.direction),
            is_reply: self.is_reply,
            observation_point: i32::from(self.point),
            ingress_allowed_by: unpolicies(&self.ingress_allowed_by),
            egress_allowed_by: unpolicies(&self.egress_allowed_by),
            ingress_denied_by: unpolicies(&self.ingress_denied_by),
            egress_denied_by: unpolicies(&self.egress_denied_by),
            source_service: unservice(&self.src_service),
            destination_service: unservice(&self.dst_service),
            packet_length: self.packet_length,
            l4_unknown: self.l4_unknown(),
            ..Default::default()
        }
    }

    /// The flow's `l4_unknown` from the reason and protocol columns.
    fn l4_unknown(&self) -> Option<L4Unknown> {
        if self.l4_unknown.is_empty() {
            return None;
        }
        let protocol = match self.protocol.as_str() {
            "ICMPv4" => 1,
            "ICMPv6" => 58,
            p => flows_proto::ip_protocol_number(p).unwrap_or(0),
        };
        Some(L4Unknown {
            reason: L4UnknownReason::from_str_name(&self.l4_unknown).unwrap_or(L4UnknownReason::Unspecified) as i32,
            protocol,
        })
    }

    /// Appends the row in RowBinary, in column order.
    pub fn encode(&self, out: &mut Vec<u8>) {
        fn varint(out: &mut Vec<u8>, mut n: u64) {
            loop {
                let b = (n & 0x7f) as u8;
                n >>= 7;
                if n == 0 {
                    out.push(b);
                    return;
                }
                out.push(b | 0x80);
            }
        }
        fn s(out: &mut Vec<u8>, v: &str) {
            varint(out, v.len() as u64);
            out.extend_from_slice(v.as_bytes());
        }
        fn arr(out: &mut Vec<u8>, v: &[String]) {
            varint(out, v.len() as u64);
            for x in v {
                s(out, x);
            }
        }
        out.extend_from_slice(&self.time.to_le_bytes());
        s(out, &self.node);
        s(out, &self.uuid);
        out.push(self.verdict as u8);
        s(out, &self.drop_reason);
        out.push(self.event_type as u8);
        out.push(self.point as u8);
        out.push(self.direction as u8);
        out.push(u8::from(self.is_reply));
        out.push(self.ip_version);
        s(out, &self.protocol);
        out.extend_from_slice(&self.src_ip.octets());
        out.extend_from_slice(&self.dst_ip.octets());
        out.extend_from_slice(&self.src_port.to_le_bytes());
        out.extend_from_slice(&self.dst_port.to_le_bytes());
        out.push(self.tcp_flags);
        for (ns, pod, w, k, ws, l, node, world, id) in [
            (&self.src_namespace, &self.src_pod, &self.src_workload, &self.src_workload_kind, &self.src_workloads, &self.src_labels, &self.src_node, self.src_world, self.src_identity),
            (&self.dst_namespace, &self.dst_pod, &self.dst_workload, &self.dst_workload_kind, &self.dst_workloads, &self.dst_labels, &self.dst_node, self.dst_world, self.dst_identity),
        ] {
            s(out, ns);
            s(out, pod);
            s(out, w);
            s(out, k);
            arr(out, ws);
            arr(out, l);
            s(out, node);
            out.push(u8::from(world));
            out.extend_from_slice(&id.to_le_bytes());
        }
        s(out, &self.src_service);
        s(out, &self.dst_service);
        arr(out, &self.ingress_allowed_by);
        arr(out, &self.egress_allowed_by);
        arr(out, &self.ingress_denied_by);
        arr(out, &self.egress_denied_by);
        out.extend_from_slice(&self.packet_length.to_le_bytes());
        s(out, &self.l4_unknown);
    }
}

fn l4_unknown_name(u: &Option<L4Unknown>) -> String {
    match u {
        Some(u) => L4UnknownReason::try_from(u.reason)
            .unwrap_or(L4UnknownReason::Unspecified)
            .as_str_name()
            .to_string(),
        None => String::new(),
    }
}

/// Names the Enum8 columns use, in value order.
pub const VERDICTS: [&str; 5] = ["UNKNOWN", "FORWARDED", "DROPPED", "AUDIT", "ERROR"];
pub const EVENT_TYPES: [&str; 4] = ["UNKNOWN", "TRACE", "DROP", "POLICY_VERDICT"];
pub const POINTS: [&str; 5] = ["UNKNOWN", "FROM_ENDPOINT", "TO_ENDPOINT", "KERNEL_DROP", "TO_NETWORK"];
pub const DIRECTIONS: [&str; 3] = ["UNKNOWN", "INGRESS", "EGRESS"];

// The enum values above must follow the proto's.
const _: () = {
    assert!(Verdict::Error as i32 == 4 && EventType::PolicyVerdict as i32 == 3);
    assert!(ObservationPoint::ToNetwork as i32 == 4 && TrafficDirection::Egress as i32 == 2);
};

/// Reads RowBinary written in the column order of [`FlowRow`].
struct Reader<'a, 'b> {
    buf: &'a mut &'b [u8],
}

impl Reader<'_, '_> {
    fn take(&mut self, n: usize) -> Result<&[u8], crate::StoreError> {
        if self.buf.len() < n {
            return Err(crate::StoreError::Decode {
                message: format!("RowBinary ends early: {n} bytes wanted, {} left", self.buf.len()),
            });
        }
        let (head, tail) = self.buf.split_at(n);
        *self.buf = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, crate::StoreError> {
        Ok(self.take(1)?[0])
    }
    fn fixed<const N: usize>(&mut self) -> Result<[u8; N], crate::StoreError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn varint(&mut self) -> Result<u64, crate::StoreError> {
        let mut n = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.u8()?;
            n |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(n);
            }
        }
        Err(crate::StoreError::Decode { message: "varint too long".into() })
    }
    fn string(&mut self) -> Result<String, crate::StoreError> {
        let n = self.varint()? as usize;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|e| crate::StoreError::Decode { message: e.to_string() })
    }
    fn strings(&mut self) -> Result<Vec<String>, crate::StoreError> {
        let n = self.varint()? as usize;
        (0..n).map(|_| self.string()).collect()
    }
}

impl FlowRow {
    /// Reads one row (as `SELECT *` returns it in RowBinary) and advances `buf`.
    pub fn decode(buf: &mut &[u8]) -> Result<FlowRow, crate::StoreError> {
        let mut r = Reader { buf };
        let mut row = FlowRow {
            time: i64::from_le_bytes(r.fixed()?),
            node: r.string()?,
            uuid: r.string()?,
            verdict: r.u8()? as i8,
            drop_reason: r.string()?,
            event_type: r.u8()? as i8,
            point: r.u8()? as i8,
            direction: r.u8()? as i8,
            is_reply: r.u8()? != 0,
            ip_version: r.u8()?,
            protocol: r.string()?,
            src_ip: Ipv6Addr::from(r.fixed::<16>()?),
            dst_ip: Ipv6Addr::from(r.fixed::<16>()?),
            src_port: u16::from_le_bytes(r.fixed()?),
            dst_port: u16::from_le_bytes(r.fixed()?),
            tcp_flags: r.u8()?,
            ..Default::default()
        };
        for src in [true, false] {
            let ns = r.string()?;
            let pod = r.string()?;
            let w = r.string()?;
            let k = r.string()?;
            let ws = r.strings()?;
            let l = r.strings()?;
            let node = r.string()?;
            let world = r.u8()? != 0;
            let id = u32::from_le_bytes(r.fixed()?);
            if src {
                (row.src_namespace, row.src_pod, row.src_workload, row.src_workload_kind) = (ns, pod, w, k);
                (row.src_workloads, row.src_labels, row.src_node, row.src_world, row.src_identity) = (ws, l, node, world, id);
            } else {
                (row.dst_namespace, row.dst_pod, row.dst_workload, row.dst_workload_kind) = (ns, pod, w, k);
                (row.dst_workloads, row.dst_labels, row.dst_node, row.dst_world, row.dst_identity) = (ws, l, node, world, id);
            }
        }
        row.src_service = r.string()?;
        row.dst_service = r.string()?;
        row.ingress_allowed_by = r.strings()?;
        row.egress_allowed_by = r.strings()?;
        row.ingress_denied_by = r.strings()?;
        row.egress_denied_by = r.strings()?;
        row.packet_length = u32::from_le_bytes(r.fixed()?);
        row.l4_unknown = r.string()?;
        Ok(row)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> Flow {
        Flow {
            time: Some(flows_proto::Timestamp { seconds: 1_763_000_000, nanos: 123_456_789 }),
            uuid: "u-1".into(),
            node_name: "node-1".into(),
            verdict: Verdict::Dropped as i32,
            drop_reason: "POLICY_DENIED".into(),
            event_type: EventType::PolicyVerdict as i32,
            ip: Some(Ip { source: "10.244.1.5".into(), destination: "10.244.2.9".into(), ip_version: IpVersion::Ipv4 as i32 }),
            l4: Some(Layer4 {
                protocol: Some(layer4::Protocol::Tcp(Tcp {
                    source_port: 40_000,
                    destination_port: 5432,
                    flags: Some(TcpFlags { syn: true, ..Default::default() }),
                })),
            }),
            source: Some(Endpoint {
                identity: 3,
                namespace: "shop".into(),
                pod_name: "api-6b7c-aaaaa".into(),
                labels: vec!["app=api".into()],
                workloads: vec![
                    Workload { name: "api-6b7c".into(), kind: "ReplicaSet".into() },
                    Workload { name: "api".into(), kind: "Deployment".into() },
                ],
                node_name: "node-1".into(),
                is_world: false,
            }),
            destination: Some(Endpoint { namespace: "data".into(), pod_name: "db-0".into(), labels: vec!["app=db".into()], node_name: "node-2".into(), ..Default::default() }),
            traffic_direction: TrafficDirection::Ingress as i32,
            observation_point: ObservationPoint::ToEndpoint as i32,
            ingress_denied_by: vec![Policy { name: "deny".into(), namespace: "data".into(), kind: "NetworkPolicy".into(), labels: Vec::new() }],
            destination_service: Some(Service { name: "db".into(), namespace: "data".into() }),
            packet_length: 60,
            ..Default::default()
        }
    }

    #[test]
    fn flow_row_flow_round_trip_and_rowbinary() {
        let f = sample();
        let row = FlowRow::from_flow(&f);
        assert_eq!((row.src_workload.as_str(), row.src_workload_kind.as_str()), ("api", "Deployment"));
        assert_eq!((row.dst_workload.as_str(), row.dst_workload_kind.as_str()), ("db-0", "Pod"));
        assert_eq!(row.to_flow(), f);
        let mut buf = Vec::new();
        row.encode(&mut buf);
        row.encode(&mut buf);
        let mut rest = buf.as_slice();
        assert_eq!(FlowRow::decode(&mut rest).expect("first"), row);
        assert_eq!(FlowRow::decode(&mut rest).expect("second"), row);
        assert!(rest.is_empty());
        let mut short = &buf[..buf.len() - 3];
        let _ = FlowRow::decode(&mut short).expect("one row");
        assert!(FlowRow::decode(&mut short).is_err(), "a cut row is an error, not a panic");
    }

    #[test]
    fn unreadable_ports_keep_their_protocol_and_reason() {
        for (l4, unknown, protocol) in [
            (None, L4Unknown { reason: L4UnknownReason::Protocol as i32, protocol: 47 }, "GRE"),
            (None, L4Unknown { reason: L4UnknownReason::ExtensionHeaders as i32, protocol: 60 }, "IPv6-Opts"),
            (
                Some(Layer4 { protocol: Some(layer4::Protocol::Icmpv4(Icmpv4 { r#type: 3, code: 1, echo_id: 0 })) }),
                L4Unknown { reason: L4UnknownReason::Icmp as i32, protocol: 1 },
                "ICMPv4",
            ),
        ] {
            let mut f = sample();
            f.l4 = l4;
            f.l4_unknown = Some(unknown);
            let row = FlowRow::from_flow(&f);
            assert_eq!(row.protocol, protocol);
            assert!(row.l4_unknown.starts_with("L4_UNKNOWN_REASON_"), "{}", row.l4_unknown);
            assert_eq!(row.to_flow(), f);
            let mut buf = Vec::new();
            row.encode(&mut buf);
            assert_eq!(FlowRow::decode(&mut buf.as_slice()).expect("decode"), row);
        }
    }

    #[test]
    fn world_and_unknown_ends_group_by_address() {
        let mut f = sample();
        f.destination = Some(Endpoint { is_world: true, labels: vec!["reserved:world".into()], ..Default::default() });
        f.source = None;
        let row = FlowRow::from_flow(&f);
        assert_eq!((row.dst_workload.as_str(), row.dst_workload_kind.as_str()), ("10.244.2.9", "world"));
        assert_eq!((row.src_workload.as_str(), row.src_workload_kind.as_str()), ("10.244.1.5", ""));
    }
}
