//! Kernel events → Flow records: the probe's decoder (the flows-parser crate), fed what
//! the ring buffer could hand it. The input is one record as a whole (any length), then cut into
//! RAW_EVENT_SIZE records, each decoded as the reader does.
//!
//! Beyond "no panic": a record of the wrong length is `BadLength`; a full record is
//! decoded exactly when family, kind and observation point are known values, and the
//! error names the first unknown one (the reader counts these as decode errors); every
//! Flow produced says what the record says (addresses, ports, reply bit, verdict, drop
//! reason, the policy sets it names) and survives both ways the probe's flows leave it:
//! protobuf (gRPC) and JSON (`flows observe -o json`), each read back equal.

#![no_main]

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::{Arc, OnceLock, RwLock},
};

use flows_common::{
    AF_INET, AF_INET6, EVENT_DROP, EVENT_F_REPLY, EVENT_FLOW, POINT_FROM_ENDPOINT, POINT_KERNEL_DROP,
    POINT_TO_ENDPOINT, POINT_TO_NETWORK, POLICY_EGRESS_ALLOWED, POLICY_EGRESS_EVALUATED,
    POLICY_ENDPOINT_UNKNOWN, POLICY_INGRESS_ALLOWED, POLICY_INGRESS_EVALUATED, PROTO_ICMP, PROTO_ICMPV6,
    PROTO_SCTP, PROTO_TCP, PROTO_UDP, RAW_EVENT_SIZE, RawEvent, VERDICT_DENIED,
};
use flows_parser::{Clock, DecodeError, Decoder, POLICY_DENIED, POLICY_ENDPOINT_UNKNOWN_REASON};
use flows_policy::{
    Manifests,
    compile::{IdentityAllocator, Mode, NodeView, SetTable, compile_datapath},
};
use flows_proto::{Flow, Verdict, layer4};
use libfuzzer_sys::fuzz_target;
use prost::Message;

/// Policies and pods the probe would have read: the decoder names policy sets and
/// endpoints from what compiling them produced, as in the probe.
const MANIFESTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: { name: shop }
---
apiVersion: v1
kind: Pod
metadata: { name: web, namespace: shop, labels: { app: web } }
spec: { nodeName: node-1, containers: [ { name: c, ports: [ { name: http, containerPort: 80 } ] } ] }
status: { podIP: 10.244.1.2, podIPs: [ { ip: 10.244.1.2 }, { ip: "fd00::2" } ] }
---
apiVersion: v1
kind: Pod
metadata: { name: db, namespace: shop, labels: { app: db } }
spec: { nodeName: node-1, containers: [ { name: c } ] }
status: { podIP: 10.244.2.3 }
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: { name: deny-all, namespace: shop }
spec: { podSelector: {}, policyTypes: [Ingress, Egress] }
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: { name: web-to-db, namespace: shop }
spec:
  podSelector: { matchLabels: { app: db } }
  ingress: [ { from: [ { podSelector: { matchLabels: { app: web } } } ], ports: [ { port: 5432 } ] } ]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: { name: web-egress, namespace: shop }
spec:
  podSelector: { matchLabels: { app: web } }
  policyTypes: [Egress]
  egress: [ { to: [ { ipBlock: { cidr: 0.0.0.0/0, except: [10.0.0.0/8] } } ] } ]
"#;

struct Fixture {
    decoder: Decoder,
    sets: SetTable,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        // A fixed input of ours: failing here is a harness bug, not a finding.
        let m = Manifests::parse([("fixture.yaml", MANIFESTS)]).expect("fixture manifests");
        let engine = m.engine();
        let state = compile_datapath(
            &m.cluster,
            &engine,
            &NodeView { is_local: &|_| true, mode_of: &|_| Mode::Enforce },
            &mut IdentityAllocator::new(),
            SetTable::new(),
        );
        assert!(state.sets.len() > 1, "the fixture names some policy sets");
        // The probe's own naming of pods by address.
        let endpoints = flows_flow::enrich::endpoints_of(&m.cluster);
        let ifnames = Arc::new(RwLock::new(HashMap::from([(7, "fl00000001".to_string()), (9, String::new())])));
        let decoder = Decoder::new(
            "node-1".into(),
            ifnames,
            HashMap::from([(77, "NETFILTER_DROP".to_string()), (2, "NOT_SPECIFIED".to_string())]),
            // A fixed realtime-monotonic offset (late 2023): results do not depend on the host.
            Clock::fixed(1_700_000_000_000_000_000),
        )
        .with_policy_sets(Arc::new(state.sets.clone()))
        .with_endpoints(Arc::new(endpoints));
        Fixture { decoder, sets: state.sets }
    })
}

fn read_event(b: &[u8]) -> RawEvent {
    let mut ev = RawEvent::zeroed();
    // SAFETY: b is exactly RAW_EVENT_SIZE bytes; RawEvent is plain data, any bits valid.
    unsafe {
        std::ptr::copy_nonoverlapping(b.as_ptr(), &mut ev as *mut RawEvent as *mut u8, RAW_EVENT_SIZE)
    };
    ev
}

fn addrs(ev: &RawEvent) -> (IpAddr, IpAddr) {
    let (s, d) = (&ev.tuple.saddr, &ev.tuple.daddr);
    if ev.tuple.family == AF_INET {
        (
            IpAddr::V4(Ipv4Addr::new(s[0], s[1], s[2], s[3])),
            IpAddr::V4(Ipv4Addr::new(d[0], d[1], d[2], d[3])),
        )
    } else {
        (IpAddr::V6(Ipv6Addr::from(*s)), IpAddr::V6(Ipv6Addr::from(*d)))
    }
}

fn names(p: &[flows_proto::Policy]) -> Vec<(String, String)> {
    p.iter().map(|p| (p.namespace.clone(), p.name.clone())).collect()
}

fn set_names(sets: &SetTable, id: u32) -> Vec<(String, String)> {
    sets.get(id).iter().map(|p| (p.namespace.clone(), p.name.clone())).collect()
}

/// What a full record must decode to, or the error it must give.
fn check(fx: &Fixture, ev: &RawEvent, got: Result<Flow, DecodeError>) {
    let want_err = if !matches!(ev.tuple.family, AF_INET | AF_INET6) {
        Some(DecodeError::UnknownFamily { family: ev.tuple.family })
    } else if !matches!(ev.kind, EVENT_FLOW | EVENT_DROP) {
        Some(DecodeError::UnknownKind { kind: ev.kind })
    } else if !matches!(ev.point, POINT_FROM_ENDPOINT | POINT_TO_ENDPOINT | POINT_KERNEL_DROP | POINT_TO_NETWORK) {
        Some(DecodeError::UnknownPoint { point: ev.point })
    } else {
        None
    };
    let f = match (got, want_err) {
        (Err(e), Some(w)) => {
            assert_eq!(e, w, "the error names the first unknown field");
            return;
        }
        (Err(e), None) => panic!("a well-formed record was rejected: {e} ({ev:?})"),
        (Ok(f), Some(w)) => panic!("a malformed record ({w}) became a flow: {f:?}"),
        (Ok(f), None) => f,
    };

    // Addresses and ports as the record has them.
    let (src, dst) = addrs(ev);
    let ip = f.ip.as_ref().expect("every flow has an ip");
    assert_eq!(ip.source.parse::<IpAddr>().ok(), Some(src));
    assert_eq!(ip.destination.parse::<IpAddr>().ok(), Some(dst));
    let proto = f.l4.as_ref().and_then(|l| l.protocol.as_ref());
    let ports = match proto {
        Some(layer4::Protocol::Tcp(t)) => Some((t.source_port, t.destination_port)),
        Some(layer4::Protocol::Udp(u)) => Some((u.source_port, u.destination_port)),
        Some(layer4::Protocol::Sctp(s)) => Some((s.source_port, s.destination_port)),
        _ => None,
    };
    // Ports the datapath could not read are never reported as ports, and the flow says
    // why and which protocol it stopped at.
    let unknown = ev.tuple.l4_unknown != 0;
    assert_eq!(f.l4_unknown.is_some(), unknown);
    if let Some(u) = &f.l4_unknown {
        assert_eq!(u.protocol, u32::from(ev.tuple.proto));
    }
    match ev.tuple.proto {
        PROTO_TCP | PROTO_UDP | PROTO_SCTP if unknown => assert!(ports.is_none(), "unknown ports reported: {f:?}"),
        PROTO_TCP | PROTO_UDP | PROTO_SCTP => {
            assert_eq!(ports, Some((ev.tuple.sport as u32, ev.tuple.dport as u32)))
        }
        PROTO_ICMP | PROTO_ICMPV6 => assert!(proto.is_some() && ports.is_none()),
        _ => assert!(proto.is_none(), "an unknown protocol has no layer 4"),
    }
    assert_eq!(f.is_reply, ev.flags & EVENT_F_REPLY != 0);
    assert_eq!(f.packet_length, ev.pkt_len);
    assert_eq!(f.drop_reason_code, ev.drop_reason);
    let t = f.time.expect("every flow has a time");
    assert!((0..1_000_000_000).contains(&t.nanos), "normalised timestamp {t:?}");
    assert_eq!(f.interface.is_some(), ev.ifindex != 0);

    // Verdict and drop reason: a drop event or a policy denial is DROPPED, with a reason.
    let verdict = Verdict::try_from(f.verdict).expect("a known verdict");
    if ev.kind == EVENT_DROP {
        assert_eq!(verdict, Verdict::Dropped);
        assert!(!f.drop_reason.is_empty());
    } else if ev.verdict == VERDICT_DENIED {
        assert_eq!(verdict, Verdict::Dropped);
        // A pod the probe's policy does not know yet is closed, and says so.
        let reason = if ev.policy & POLICY_ENDPOINT_UNKNOWN != 0 { POLICY_ENDPOINT_UNKNOWN_REASON } else { POLICY_DENIED };
        assert_eq!(f.drop_reason, reason);
    } else {
        assert!(f.drop_reason.is_empty(), "no reason without a drop");
    }

    // Policies: only for an evaluated side, from the set the record names.
    for (evaluated, allowed, set, by_allow, by_deny) in [
        (POLICY_INGRESS_EVALUATED, POLICY_INGRESS_ALLOWED, ev.ingress_set, &f.ingress_allowed_by, &f.ingress_denied_by),
        (POLICY_EGRESS_EVALUATED, POLICY_EGRESS_ALLOWED, ev.egress_set, &f.egress_allowed_by, &f.egress_denied_by),
    ] {
        let want = set_names(&fx.sets, set);
        let (named, other) = if ev.policy & allowed != 0 { (by_allow, by_deny) } else { (by_deny, by_allow) };
        if ev.policy & evaluated != 0 {
            assert_eq!(names(named), want);
            assert!(other.is_empty());
        } else {
            assert!(by_allow.is_empty() && by_deny.is_empty(), "policies named for a side not evaluated");
        }
    }

    // Out through gRPC: protobuf both ways.
    let wire = f.encode_to_vec();
    match Flow::decode(wire.as_slice()) {
        Ok(back) => assert_eq!(back, f, "protobuf round trip"),
        Err(e) => panic!("a decoded flow does not read back from protobuf: {e}"),
    }
    // Out through `flows observe -o json` (which would panic on a flow it cannot print).
    let json = match serde_json::to_string(&f) {
        Ok(j) => j,
        Err(e) => panic!("a decoded flow does not serialise to JSON: {e}: {f:?}"),
    };
    match serde_json::from_str::<Flow>(&json) {
        Ok(back) => assert_eq!(back, f, "JSON round trip of {json}"),
        Err(e) => panic!("a decoded flow's JSON does not read back: {e}: {json}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let fx = fixture();
    // The record as a whole: anything but RAW_EVENT_SIZE bytes is refused by length.
    let whole = fx.decoder.decode_bytes(data);
    if data.len() != RAW_EVENT_SIZE {
        assert_eq!(
            whole.err(),
            Some(DecodeError::BadLength { len: data.len(), expected: RAW_EVENT_SIZE })
        );
    }
    // Records one after another, as the ring buffer hands them over.
    for rec in data.chunks_exact(RAW_EVENT_SIZE) {
        let ev = read_event(rec);
        let got = fx.decoder.decode_bytes(rec);
        // decode_bytes and decode agree (up to the flow's fresh uuid).
        let by_value = fx.decoder.decode(&ev);
        match (&got, &by_value) {
            (Ok(a), Ok(b)) => assert_eq!(Flow { uuid: String::new(), ..a.clone() }, Flow { uuid: String::new(), ..b.clone() }),
            (Err(a), Err(b)) => assert_eq!(a, b),
            _ => panic!("decode_bytes and decode disagree: {got:?} / {by_value:?}"),
        }
        check(fx, &ev, got);
    }
});
