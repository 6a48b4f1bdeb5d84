//! Kernel events to Flow records.
//!
//! The decoder knows nothing of ring buffers or gRPC: it takes the bytes of one
//! [`RawEvent`] and the context needed to name things (node, interfaces, the running
//! kernel's drop reasons, the clock offset) and returns a Flow or a typed error.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::{Arc, RwLock},
};

use flows_common::{
    AF_INET, AF_INET6, EVENT_DROP, EVENT_F_REPLY, EVENT_FLOW, L4_KNOWN, L4_UNKNOWN_EXT_HEADERS,
    L4_UNKNOWN_FRAGMENT, L4_UNKNOWN_ICMP, L4_UNKNOWN_PROTOCOL, L4_UNKNOWN_TRUNCATED, POINT_FROM_ENDPOINT,
    POINT_KERNEL_DROP, POINT_TO_ENDPOINT, POINT_TO_NETWORK, POLICY_EGRESS_ALLOWED,
    POLICY_EGRESS_EVALUATED, POLICY_ENDPOINT_UNKNOWN, POLICY_INGRESS_ALLOWED, POLICY_INGRESS_EVALUATED,
    PROTO_ICMP, PROTO_ICMPV6, PROTO_SCTP, PROTO_TCP, PROTO_UDP, RAW_EVENT_SIZE, RawEvent, TCP_ACK, TCP_CWR,
    TCP_ECE, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN, TCP_URG, VERDICT_ALLOWED, VERDICT_AUDIT,
    VERDICT_DENIED,
};
use flows_flow::enrich::{EndpointGetter, PolicySetGetter};
use flows_proto::{
    EventType, Flow, Icmpv4, Icmpv6, Interface, Ip, IpVersion, L4Unknown, L4UnknownReason, Layer4,
    ObservationPoint, Policy,
    Sctp, Tcp, TcpFlags, TrafficDirection, Udp, Verdict, layer4,
};

/// The transport part of a record (none for a protocol without ports, or ports the
/// datapath could not read).
fn layer4(raw: &RawEvent, ports_unknown: bool) -> Option<layer4::Protocol> {
    let t = &raw.tuple;
    match t.proto {
        // Ports the datapath could not read are not reported as ports 0.
        PROTO_TCP | PROTO_UDP | PROTO_SCTP if ports_unknown => None,
        PROTO_TCP => Some(layer4::Protocol::Tcp(Tcp {
            source_port: t.sport as u32,
            destination_port: t.dport as u32,
            flags: Some(tcp_flags(raw.tcp_flags)),
        })),
        PROTO_UDP => Some(layer4::Protocol::Udp(Udp {
            source_port: t.sport as u32,
            destination_port: t.dport as u32,
        })),
        PROTO_SCTP => Some(layer4::Protocol::Sctp(Sctp {
            source_port: t.sport as u32,
            destination_port: t.dport as u32,
        })),
        PROTO_ICMP => Some(layer4::Protocol::Icmpv4(Icmpv4 {
            r#type: raw.icmp_type as u32,
            code: raw.icmp_code as u32,
            echo_id: t.sport as u32,
        })),
        PROTO_ICMPV6 => Some(layer4::Protocol::Icmpv6(Icmpv6 {
            r#type: raw.icmp_type as u32,
            code: raw.icmp_code as u32,
            echo_id: t.sport as u32,
        })),
        _ => None,
    }
}

/// Why the datapath could not read a packet's ports (None: it could).
fn l4_unknown(reason: u8, proto: u8) -> Option<L4Unknown> {
    let reason = match reason {
        L4_KNOWN => return None,
        L4_UNKNOWN_EXT_HEADERS => L4UnknownReason::ExtensionHeaders,
        L4_UNKNOWN_FRAGMENT => L4UnknownReason::Fragment,
        L4_UNKNOWN_TRUNCATED => L4UnknownReason::Truncated,
        L4_UNKNOWN_PROTOCOL => L4UnknownReason::Protocol,
        L4_UNKNOWN_ICMP => L4UnknownReason::Icmp,
        _ => L4UnknownReason::Unspecified,
    };
    Some(L4Unknown {
        reason: reason as i32,
        protocol: u32::from(proto),
    })
}

/// Drop reason of connections denied by NetworkPolicy in enforce mode.
pub const POLICY_DENIED: &str = "POLICY_DENIED";
/// Denied because the destination pod is not in the probe's policy yet (it is newer).
pub const POLICY_ENDPOINT_UNKNOWN_REASON: &str = "POLICY_ENDPOINT_UNKNOWN";

/// How the decoder names policy sets (`flows_flow::enrich::PolicySetGetter`), shared with
/// whoever programs the policy.
pub type PolicySets = Arc<dyn PolicySetGetter + Send + Sync>;

/// How the decoder names a flow's ends (`flows_flow::enrich::EndpointGetter`), shared with
/// whoever reads the manifests.
pub type Endpoints = Arc<dyn EndpointGetter + Send + Sync>;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("event is {len} bytes, expected {expected}")]
    BadLength { len: usize, expected: usize },
    #[error("unknown event kind {kind}")]
    UnknownKind { kind: u8 },
    #[error("unknown observation point {point}")]
    UnknownPoint { point: u8 },
    #[error("unknown address family {family}")]
    UnknownFamily { family: u8 },
}

/// Maps CLOCK_MONOTONIC (what bpf_ktime_get_ns returns) to wall-clock time.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    /// realtime - monotonic, in nanoseconds.
    offset_ns: i128,
}

impl Clock {
    pub fn now() -> Clock {
        let mono = clock_ns(libc::CLOCK_MONOTONIC);
        let real = clock_ns(libc::CLOCK_REALTIME);
        Clock {
            offset_ns: real - mono,
        }
    }

    pub fn fixed(offset_ns: i128) -> Clock {
        Clock { offset_ns }
    }

    pub fn to_timestamp(self, mono_ns: u64) -> flows_proto::Timestamp {
        let t = mono_ns as i128 + self.offset_ns;
        flows_proto::timestamp_from_nanos(t.clamp(i64::MIN as i128, i64::MAX as i128) as i64)
    }
}

fn clock_ns(id: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec; the clocks used always exist on Linux.
    unsafe { libc::clock_gettime(id, &mut ts) };
    ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
}

/// Names no policy set: a decoder before any policy is known.
struct NoPolicySets;

impl PolicySetGetter for NoPolicySets {
    fn policy_set(&self, _: u32) -> Vec<Policy> {
        Vec::new()
    }
}

/// Interface names by index, shared with the interface watcher.
pub type IfNames = Arc<RwLock<HashMap<u32, String>>>;

pub struct Decoder {
    node_name: String,
    ifnames: IfNames,
    sets: PolicySets,
    endpoints: Endpoints,
    drop_reasons: HashMap<u32, String>,
    clock: Clock,
}

impl Decoder {
    pub fn new(
        node_name: String,
        ifnames: IfNames,
        drop_reasons: HashMap<u32, String>,
        clock: Clock,
    ) -> Decoder {
        Decoder {
            node_name,
            ifnames,
            sets: Arc::new(NoPolicySets),
            endpoints: Arc::new(HashMap::<IpAddr, flows_proto::Endpoint>::new()),
            drop_reasons,
            clock,
        }
    }

    /// Names policy sets through this getter (shared with the policy programmer).
    pub fn with_policy_sets(mut self, sets: PolicySets) -> Decoder {
        self.sets = sets;
        self
    }

    /// Names endpoints through this getter (shared with the manifest reader).
    pub fn with_endpoints(mut self, endpoints: Endpoints) -> Decoder {
        self.endpoints = endpoints;
        self
    }

    fn policies(&self, set: u32) -> Vec<Policy> {
        self.sets.policy_set(set)
    }

    /// (allowed by, denied by) for one side of a policy decision.
    fn side(&self, raw: &RawEvent, evaluated: u8, allowed: u8, set: u32) -> (Vec<Policy>, Vec<Policy>) {
        match (raw.policy & evaluated != 0, raw.policy & allowed != 0) {
            (false, _) => (Vec::new(), Vec::new()),
            (true, true) => (self.policies(set), Vec::new()),
            (true, false) => (Vec::new(), self.policies(set)),
        }
    }

    pub fn set_clock(&mut self, clock: Clock) {
        self.clock = clock;
    }

    /// Decodes one ring buffer record.
    pub fn decode_bytes(&self, bytes: &[u8]) -> Result<Flow, DecodeError> {
        if bytes.len() != RAW_EVENT_SIZE {
            return Err(DecodeError::BadLength {
                len: bytes.len(),
                expected: RAW_EVENT_SIZE,
            });
        }
        // SAFETY: length checked; RawEvent is plain old data valid for any bit pattern,
        // and read_unaligned copes with the buffer's alignment.
        let raw = unsafe { std::ptr::read_unaligned(bytes.as_ptr() as *const RawEvent) };
        self.decode(&raw)
    }

    pub fn decode(&self, raw: &RawEvent) -> Result<Flow, DecodeError> {
        let (src, dst, version) = match raw.tuple.family {
            AF_INET => {
                let s = &raw.tuple.saddr;
                let d = &raw.tuple.daddr;
                (
                    IpAddr::V4(Ipv4Addr::new(s[0], s[1], s[2], s[3])),
                    IpAddr::V4(Ipv4Addr::new(d[0], d[1], d[2], d[3])),
                    IpVersion::Ipv4,
                )
            }
            AF_INET6 => (
                IpAddr::V6(Ipv6Addr::from(raw.tuple.saddr)),
                IpAddr::V6(Ipv6Addr::from(raw.tuple.daddr)),
                IpVersion::Ipv6,
            ),
            family => return Err(DecodeError::UnknownFamily { family }),
        };
        let is_reply = raw.flags & EVENT_F_REPLY != 0;
        let (event_type, verdict) = match (raw.kind, raw.verdict) {
            (EVENT_FLOW, VERDICT_ALLOWED) => (EventType::PolicyVerdict, Verdict::Forwarded),
            (EVENT_FLOW, VERDICT_DENIED) => (EventType::PolicyVerdict, Verdict::Dropped),
            (EVENT_FLOW, VERDICT_AUDIT) => (EventType::PolicyVerdict, Verdict::Audit),
            (EVENT_FLOW, _) => (EventType::Trace, Verdict::Forwarded),
            (EVENT_DROP, _) => (EventType::Drop, Verdict::Dropped),
            (kind, _) => return Err(DecodeError::UnknownKind { kind }),
        };
        let (point, direction) = match (raw.point, is_reply) {
            // Leaving the pod: the pod's egress, unless it is the pod answering.
            (POINT_FROM_ENDPOINT, false) => {
                (ObservationPoint::FromEndpoint, TrafficDirection::Egress)
            }
            (POINT_FROM_ENDPOINT, true) => {
                (ObservationPoint::FromEndpoint, TrafficDirection::Ingress)
            }
            (POINT_TO_ENDPOINT, false) => (ObservationPoint::ToEndpoint, TrafficDirection::Ingress),
            (POINT_TO_ENDPOINT, true) => (ObservationPoint::ToEndpoint, TrafficDirection::Egress),
            (POINT_KERNEL_DROP, _) => {
                (ObservationPoint::KernelDrop, TrafficDirection::Unspecified)
            }
            (POINT_TO_NETWORK, _) => (ObservationPoint::ToNetwork, TrafficDirection::Egress),
            (point, _) => return Err(DecodeError::UnknownPoint { point }),
        };
        let t = &raw.tuple;
        let l4_unknown = l4_unknown(t.l4_unknown, t.proto);
        let l4 = layer4(raw, l4_unknown.is_some());
        let interface = if raw.ifindex != 0 {
            let name = self
                .ifnames
                .read()
                .map(|m| m.get(&raw.ifindex).cloned().unwrap_or_default())
                .unwrap_or_default();
            Some(Interface {
                index: raw.ifindex,
                name,
            })
        } else {
            None
        };
        let drop_reason = if raw.kind == EVENT_DROP {
            self.drop_reasons
                .get(&raw.drop_reason)
                .cloned()
                .unwrap_or_else(|| format!("REASON_{}", raw.drop_reason))
        } else if raw.verdict == VERDICT_DENIED && raw.policy & POLICY_ENDPOINT_UNKNOWN != 0 {
            POLICY_ENDPOINT_UNKNOWN_REASON.to_string()
        } else if raw.verdict == VERDICT_DENIED {
            POLICY_DENIED.to_string()
        } else {
            String::new()
        };
        let (ingress_allowed_by, ingress_denied_by) = self.side(raw, POLICY_INGRESS_EVALUATED, POLICY_INGRESS_ALLOWED, raw.ingress_set);
        let (egress_allowed_by, egress_denied_by) = self.side(raw, POLICY_EGRESS_EVALUATED, POLICY_EGRESS_ALLOWED, raw.egress_set);
        let (source, destination) = (self.endpoints.endpoint(src), self.endpoints.endpoint(dst));
        Ok(Flow {
            source,
            destination,
            time: Some(self.clock.to_timestamp(raw.ts_ns)),
            // Named by the ring that keeps it (instance and sequence).
            uuid: String::new(),
            node_name: self.node_name.clone(),
            verdict: verdict as i32,
            drop_reason,
            drop_reason_code: raw.drop_reason,
            event_type: event_type as i32,
            ip: Some(Ip {
                source: src.to_string(),
                destination: dst.to_string(),
                ip_version: version as i32,
            }),
            l4: l4.map(|p| Layer4 { protocol: Some(p) }),
            l4_unknown,
            traffic_direction: direction as i32,
            is_reply,
            observation_point: point as i32,
            interface,
            packet_length: raw.pkt_len,
            ingress_allowed_by,
            egress_allowed_by,
            ingress_denied_by,
            egress_denied_by,
            ..Default::default()
        })
    }
}

fn tcp_flags(f: u8) -> TcpFlags {
    TcpFlags {
        fin: f & TCP_FIN != 0,
        syn: f & TCP_SYN != 0,
        rst: f & TCP_RST != 0,
        psh: f & TCP_PSH != 0,
        ack: f & TCP_ACK != 0,
        urg: f & TCP_URG != 0,
        ece: f & TCP_ECE != 0,
        cwr: f & TCP_CWR != 0,
    }
}

/// Test and benchmark helper: a raw TCP SYN event as the datapath would emit it.
pub fn sample_event(point: u8, sport: u16) -> RawEvent {
    let mut ev = RawEvent::zeroed();
    ev.ts_ns = 1_000_000_000;
    ev.kind = EVENT_FLOW;
    ev.point = point;
    ev.tcp_flags = TCP_SYN;
    ev.ifindex = 7;
    ev.tuple.family = AF_INET;
    ev.tuple.proto = PROTO_TCP;
    ev.tuple.saddr[..4].copy_from_slice(&[10, 244, 1, 2]);
    ev.tuple.daddr[..4].copy_from_slice(&[10, 244, 2, 3]);
    ev.tuple.sport = sport;
    ev.tuple.dport = 80;
    ev.pkt_len = 60;
    ev
}

pub fn event_bytes(ev: &RawEvent) -> &[u8] {
    // SAFETY: RawEvent is repr(C) plain data with explicit padding.
    unsafe { std::slice::from_raw_parts(ev as *const RawEvent as *const u8, RAW_EVENT_SIZE) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decoder() -> Decoder {
        let names: IfNames = Arc::new(RwLock::new(HashMap::from([(7, "fl1234abcd".into())])));
        Decoder::new(
            "node-1".into(),
            names,
            HashMap::from([(77, "NETFILTER_DROP".into())]),
            Clock::fixed(1_700_000_000_000_000_000),
        )
    }

    #[test]
    fn decodes_a_syn_leaving_a_pod() {
        let ev = sample_event(POINT_FROM_ENDPOINT, 40000);
        let f = decoder().decode_bytes(event_bytes(&ev)).expect("decode");
        assert_eq!(f.node_name, "node-1");
        assert_eq!(f.verdict, Verdict::Forwarded as i32);
        assert_eq!(f.traffic_direction, TrafficDirection::Egress as i32);
        assert_eq!(f.observation_point, ObservationPoint::FromEndpoint as i32);
        let ip = f.ip.expect("ip");
        assert_eq!(ip.source, "10.244.1.2");
        assert_eq!(ip.destination, "10.244.2.3");
        match f.l4.and_then(|l| l.protocol) {
            Some(layer4::Protocol::Tcp(t)) => {
                assert_eq!((t.source_port, t.destination_port), (40000, 80));
                assert!(t.flags.expect("flags").syn);
            }
            other => panic!("not tcp: {other:?}"),
        }
        assert_eq!(f.interface.expect("iface").name, "fl1234abcd");
        let ts = f.time.expect("time");
        assert_eq!(ts.seconds, 1_700_000_001);
        assert!(!f.is_reply);
    }

    #[test]
    fn replies_and_drops() {
        let mut ev = sample_event(POINT_TO_ENDPOINT, 80);
        ev.flags = EVENT_F_REPLY;
        let f = decoder().decode(&ev).expect("decode");
        assert!(f.is_reply);
        assert_eq!(f.traffic_direction, TrafficDirection::Egress as i32);

        let mut d = sample_event(POINT_KERNEL_DROP, 1);
        d.kind = EVENT_DROP;
        d.drop_reason = 77;
        let f = decoder().decode(&d).expect("decode");
        assert_eq!(f.verdict, Verdict::Dropped as i32);
        assert_eq!(f.drop_reason, "NETFILTER_DROP");
        d.drop_reason = 9999;
        assert_eq!(decoder().decode(&d).expect("decode").drop_reason, "REASON_9999");
    }

    #[test]
    fn rejects_bad_input() {
        assert!(matches!(
            decoder().decode_bytes(&[0u8; 5]),
            Err(DecodeError::BadLength { len: 5, .. })
        ));
        let mut ev = sample_event(POINT_FROM_ENDPOINT, 1);
        ev.tuple.family = 99;
        assert_eq!(
            decoder().decode(&ev),
            Err(DecodeError::UnknownFamily { family: 99 })
        );
        let mut ev = sample_event(9, 1);
        ev.kind = EVENT_FLOW;
        assert_eq!(
            decoder().decode(&ev),
            Err(DecodeError::UnknownPoint { point: 9 })
        );
    }
}
