//! The TC programs in the real kernel verifier and runtime, driven packet by packet with
//! BPF_PROG_TEST_RUN: parsing (IPv4, IPv6 with extension headers, TCP, UDP, ICMP,
//! ICMPv6), connection tracking, and what happens to malformed input. Needs root.

use flows_common::{
    AF_INET, AF_INET6, EVENT_F_REPLY, L4_UNKNOWN_EXT_HEADERS, L4_UNKNOWN_FRAGMENT, L4_UNKNOWN_ICMP,
    L4_UNKNOWN_PROTOCOL, L4_UNKNOWN_TRUNCATED, POINT_FROM_ENDPOINT, POINT_TO_ENDPOINT, PROTO_ICMP,
    PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, RawEvent, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, counter,
};
use flows_node_probe::datapath::TestHarness;

const TC_ACT_OK: u32 = 0;

/// BPF_PROG_TEST_RUN needs root; without it the test skips, or fails under
/// FLOWS_REQUIRE_ROOT=1.
fn root() -> bool {
    !flows_lab::testing::skip_unless_root("datapath (BPF_PROG_TEST_RUN)")
}

const A4: [u8; 4] = [10, 244, 1, 2];
const B4: [u8; 4] = [10, 244, 2, 3];
const A6: [u8; 16] = [0xfd, 0, 0, 0x10, 0x2, 0x44, 0, 1, 0, 0, 0, 0, 0, 0, 0, 2];
const B6: [u8; 16] = [0xfd, 0, 0, 0x10, 0x2, 0x44, 0, 2, 0, 0, 0, 0, 0, 0, 0, 3];

fn eth(proto: u16) -> Vec<u8> {
    let mut p = vec![0u8; 14];
    p[12..14].copy_from_slice(&proto.to_be_bytes());
    p
}

fn l4_tcp(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = flags;
    t
}

fn l4_udp(sport: u16, dport: u16) -> Vec<u8> {
    let mut u = vec![0u8; 8];
    u[0..2].copy_from_slice(&sport.to_be_bytes());
    u[2..4].copy_from_slice(&dport.to_be_bytes());
    u[4..6].copy_from_slice(&8u16.to_be_bytes());
    u
}

fn l4_icmp(ty: u8, id: u16) -> Vec<u8> {
    let mut i = vec![0u8; 8];
    i[0] = ty;
    i[4..6].copy_from_slice(&id.to_be_bytes());
    i
}

fn v4(src: [u8; 4], dst: [u8; 4], proto: u8, l4: &[u8]) -> Vec<u8> {
    let mut p = eth(0x0800);
    let mut ip = vec![0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
    ip[8] = 64;
    ip[9] = proto;
    ip[12..16].copy_from_slice(&src);
    ip[16..20].copy_from_slice(&dst);
    p.extend(ip);
    p.extend_from_slice(l4);
    p
}

/// IPv6 with optional extension headers: each (type, bytes) is chained in order.
fn v6(src: [u8; 16], dst: [u8; 16], exts: &[(u8, Vec<u8>)], proto: u8, l4: &[u8]) -> Vec<u8> {
    let mut p = eth(0x86DD);
    let mut ip = vec![0u8; 40];
    ip[0] = 0x60;
    let ext_len: usize = exts.iter().map(|(_, b)| b.len()).sum();
    ip[4..6].copy_from_slice(&((ext_len + l4.len()) as u16).to_be_bytes());
    ip[6] = exts.first().map(|(t, _)| *t).unwrap_or(proto);
    ip[7] = 64;
    ip[8..24].copy_from_slice(&src);
    ip[24..40].copy_from_slice(&dst);
    p.extend(ip);
    for (i, (_, bytes)) in exts.iter().enumerate() {
        let mut b = bytes.clone();
        b[0] = exts.get(i + 1).map(|(t, _)| *t).unwrap_or(proto);
        p.extend(b);
    }
    p.extend_from_slice(l4);
    p
}

/// A hop-by-hop or destination options header of `units` x 8 bytes.
fn opts_header(units: usize) -> Vec<u8> {
    let mut b = vec![0u8; units * 8];
    b[1] = (units - 1) as u8;
    b
}

/// An ICMPv4 error of type `ty` quoting `quoted` (an IP header and 8 bytes after it).
fn icmp_error(ty: u8, quoted: &[u8]) -> Vec<u8> {
    let mut i = vec![0u8; 8];
    i[0] = ty;
    i.extend_from_slice(quoted);
    i
}

fn one(h: &mut TestHarness) -> RawEvent {
    let ev = h.events();
    assert_eq!(ev.len(), 1, "expected one event, got {ev:?}");
    ev[0]
}

#[test]
fn tcp_attempt_reply_retransmit_and_reuse() {
    if !root() {
        return;
    }
    let mut h = TestHarness::new().expect("load");
    let syn = v4(A4, B4, PROTO_TCP, &l4_tcp(40000, 80, TCP_SYN));
    assert_eq!(h.run(true, &syn).expect("run"), TC_ACT_OK);
    let e = one(&mut h);
    assert_eq!((e.tuple.family, e.tuple.proto), (AF_INET, PROTO_TCP));
    assert_eq!(&e.tuple.saddr[..4], &A4);
    assert_eq!(&e.tuple.daddr[..4], &B4);
    assert_eq!((e.tuple.sport, e.tuple.dport), (40000, 80));
    assert_eq!(e.point, POINT_FROM_ENDPOINT);
    assert_eq!(e.tcp_flags, TCP_SYN);
    assert_eq!(e.flags & EVENT_F_REPLY, 0);

    // A retransmitted SYN is the same attempt.
    h.run(true, &syn).expect("run");
    assert!(h.events().is_empty());

    // The SYN-ACK coming back (other hook, same interface) is the first reply.
    let synack = v4(B4, A4, PROTO_TCP, &l4_tcp(80, 40000, TCP_SYN | TCP_ACK));
    h.run(false, &synack).expect("run");
    let r = one(&mut h);
    assert_eq!(r.flags & EVENT_F_REPLY, EVENT_F_REPLY);
    assert_eq!(r.point, POINT_TO_ENDPOINT);
    assert_eq!((r.tuple.sport, r.tuple.dport), (80, 40000));

    // The rest of the connection is silent, in both directions.
    for _ in 0..3 {
        h.run(true, &v4(A4, B4, PROTO_TCP, &l4_tcp(40000, 80, TCP_ACK))).expect("run");
        h.run(false, &v4(B4, A4, PROTO_TCP, &l4_tcp(80, 40000, TCP_ACK))).expect("run");
    }
    assert!(h.events().is_empty());

    // After FIN, a SYN on the same tuple is a new attempt.
    h.run(true, &v4(A4, B4, PROTO_TCP, &l4_tcp(40000, 80, TCP_FIN | TCP_ACK))).expect("run");
    assert!(h.events().is_empty());
    h.run(true, &syn).expect("run");
    assert_eq!(one(&mut h).tcp_flags, TCP_SYN);

    // A RST answering a SYN (closed port) is a reply, not an attempt.
    h.run(true, &v4(A4, B4, PROTO_TCP, &l4_tcp(40001, 81, TCP_SYN))).expect("run");
    one(&mut h);
    h.run(false, &v4(B4, A4, PROTO_TCP, &l4_tcp(81, 40001, TCP_RST | TCP_ACK))).expect("run");
    assert_ne!(one(&mut h).flags & EVENT_F_REPLY, 0);

    // Mid-stream packets of a connection older than the probe are not attempts.
    h.run(true, &v4(A4, B4, PROTO_TCP, &l4_tcp(45000, 443, TCP_ACK))).expect("run");
    h.run(false, &v4(B4, A4, PROTO_TCP, &l4_tcp(443, 45000, TCP_ACK))).expect("run");
    assert!(h.events().is_empty());

    let c = h.counters().expect("counters");
    assert_eq!(c[counter::NEW_FLOWS as usize], 3);
    assert_eq!(c[counter::RINGBUF_FULL as usize], 0);
}

#[test]
fn udp_and_icmp_flows() {
    if !root() {
        return;
    }
    let mut h = TestHarness::new().expect("load");
    // UDP: the first datagram is the attempt, the echo the reply, more datagrams nothing.
    let q = v4(A4, B4, PROTO_UDP, &l4_udp(5000, 53));
    h.run(true, &q).expect("run");
    assert_eq!(one(&mut h).tuple.proto, PROTO_UDP);
    h.run(false, &v4(B4, A4, PROTO_UDP, &l4_udp(53, 5000))).expect("run");
    assert_ne!(one(&mut h).flags & EVENT_F_REPLY, 0);
    h.run(true, &q).expect("run");
    assert!(h.events().is_empty());

    // ICMP echo: request and reply share the identifier.
    h.run(true, &v4(A4, B4, PROTO_ICMP, &l4_icmp(8, 77))).expect("run");
    let e = one(&mut h);
    assert_eq!((e.icmp_type, e.tuple.sport, e.tuple.dport), (8, 77, 77));
    h.run(false, &v4(B4, A4, PROTO_ICMP, &l4_icmp(0, 77))).expect("run");
    let r = one(&mut h);
    assert_eq!(r.icmp_type, 0);
    assert_ne!(r.flags & EVENT_F_REPLY, 0);

    // An ICMP error quoting a tracked connection (port unreachable for the UDP flow
    // above) belongs to it: never an attempt.
    let quoted = &v4(A4, B4, PROTO_UDP, &l4_udp(5000, 53))[14..14 + 28];
    h.run(false, &v4(B4, A4, PROTO_ICMP, &icmp_error(3, quoted))).expect("run");
    assert!(h.events().is_empty());
    // One that quotes nothing tracked here is no answer to anything: reported once, as
    // a packet of unknown L4 from its sender.
    h.run(false, &v4(B4, A4, PROTO_ICMP, &l4_icmp(3, 0))).expect("run");
    let e = one(&mut h);
    assert_eq!((e.tuple.l4_unknown, e.tuple.proto, e.icmp_type), (L4_UNKNOWN_ICMP, PROTO_ICMP, 3));
    assert_eq!(&e.tuple.saddr[..4], &B4);
    h.run(false, &v4(B4, A4, PROTO_ICMP, &l4_icmp(3, 0))).expect("run");
    assert!(h.events().is_empty());

    // ICMPv6 echo, and neighbour discovery ignored.
    h.run(true, &v6(A6, B6, &[], PROTO_ICMPV6, &l4_icmp(128, 9))).expect("run");
    let e = one(&mut h);
    assert_eq!((e.tuple.family, e.icmp_type, e.tuple.sport), (AF_INET6, 128, 9));
    assert_eq!(e.tuple.saddr, A6);
    h.run(true, &v6(A6, B6, &[], PROTO_ICMPV6, &l4_icmp(135, 0))).expect("run");
    assert!(h.events().is_empty());
    let c = h.counters().expect("counters");
    assert_eq!((c[counter::ICMP_RELATED as usize], c[counter::ICMP_UNRELATED as usize]), (1, 2));
}

#[test]
fn ipv6_extension_headers_are_walked() {
    if !root() {
        return;
    }
    let mut h = TestHarness::new().expect("load");
    // Hop-by-hop (0) then destination options (60), then TCP.
    let p = v6(
        A6,
        B6,
        &[(0, opts_header(1)), (60, opts_header(2))],
        PROTO_TCP,
        &l4_tcp(33000, 8080, TCP_SYN),
    );
    assert_eq!(h.run(true, &p).expect("run"), TC_ACT_OK);
    let e = one(&mut h);
    assert_eq!((e.tuple.proto, e.tuple.sport, e.tuple.dport), (PROTO_TCP, 33000, 8080));
    assert_eq!(e.tuple.daddr, B6);

    // First fragment (offset 0) carries the TCP header: tracked.
    let mut frag = vec![0u8; 8];
    frag[3] = 1; // offset 0, more fragments
    let p = v6(A6, B6, &[(44, frag)], PROTO_UDP, &l4_udp(7000, 53));
    h.run(true, &p).expect("run");
    assert_eq!(one(&mut h).tuple.sport, 7000);

    // A later fragment of that datagram has no L4 header of its own: it follows its
    // first fragment (same connection, no new event).
    let mut frag = vec![0u8; 8];
    frag[2] = 0x01; // offset 32 octets
    let p = v6(A6, B6, &[(44, frag.clone())], PROTO_UDP, &[0u8; 16]);
    assert_eq!(h.run(true, &p).expect("run"), TC_ACT_OK);
    assert!(h.events().is_empty());
    // One of a datagram whose first fragment was not seen: L4 unknown, one attempt.
    frag[7] = 9; // identification 9
    let p = v6(A6, B6, &[(44, frag)], PROTO_UDP, &[0u8; 16]);
    assert_eq!(h.run(true, &p).expect("run"), TC_ACT_OK);
    let e = one(&mut h);
    assert_eq!((e.tuple.l4_unknown, e.tuple.proto, e.tuple.sport), (L4_UNKNOWN_FRAGMENT, PROTO_UDP, 0));

    // Eight extension headers are walked; a ninth leaves the ports unknown (reported as
    // such, with the header the walk stopped at).
    let chain: Vec<(u8, Vec<u8>)> = (0..8).map(|_| (60, opts_header(1))).collect();
    let p = v6(A6, B6, &chain, PROTO_TCP, &l4_tcp(1, 2, TCP_SYN));
    assert_eq!(h.run(true, &p).expect("run"), TC_ACT_OK);
    assert_eq!(one(&mut h).tuple.dport, 2);
    let chain: Vec<(u8, Vec<u8>)> = (0..9).map(|_| (60, opts_header(1))).collect();
    let p = v6(A6, B6, &chain, PROTO_TCP, &l4_tcp(1, 2, TCP_SYN));
    assert_eq!(h.run(true, &p).expect("run"), TC_ACT_OK);
    let e = one(&mut h);
    assert_eq!((e.tuple.l4_unknown, e.tuple.proto), (L4_UNKNOWN_EXT_HEADERS, 60));

    let c = h.counters().expect("counters");
    assert_eq!(c[counter::FRAGMENTS_FOLLOWED as usize], 1);
    assert_eq!(c[counter::FRAGMENTS as usize], 1);
    assert_eq!(c[counter::IPV6_EXT_TOO_DEEP as usize], 1);
}

#[test]
fn malformed_and_truncated_packets_pass_and_are_counted() {
    if !root() {
        return;
    }
    let mut h = TestHarness::new().expect("load");
    let good = v4(A4, B4, PROTO_TCP, &l4_tcp(40000, 80, TCP_SYN));
    // Cut inside the TCP header (flags byte missing): the ports are not to be trusted.
    assert_eq!(h.run(true, &good[..14 + 20 + 10]).expect("run"), TC_ACT_OK);
    let e = one(&mut h);
    assert_eq!((e.tuple.l4_unknown, e.tuple.proto, e.tuple.dport), (L4_UNKNOWN_TRUNCATED, PROTO_TCP, 0));
    // The IP length says the TCP header is cut, whatever bytes follow (padding).
    let mut short = v4(A4, B4, PROTO_TCP, &l4_tcp(40001, 80, TCP_SYN));
    short[16..18].copy_from_slice(&30u16.to_be_bytes());
    assert_eq!(h.run(true, &short).expect("run"), TC_ACT_OK);
    assert!(h.events().is_empty(), "the same unknown-L4 attempt as the first");
    // Bad IP version and header length: no IP header to go by (the kernel's IP layer
    // drops these itself).
    let mut bad = good.clone();
    bad[14] = 0x75;
    assert_eq!(h.run(true, &bad).expect("run"), TC_ACT_OK);
    let mut bad = good.clone();
    bad[14] = 0x42;
    assert_eq!(h.run(true, &bad).expect("run"), TC_ACT_OK);
    // IPv6 with its UDP header cut short (the test-run syscall itself refuses a cut IP
    // header, as the stack would never hand one to TC).
    let six = v6(A6, B6, &[], PROTO_UDP, &l4_udp(1, 2));
    assert_eq!(h.run(true, &six[..14 + 40 + 2]).expect("run"), TC_ACT_OK);
    assert_eq!(one(&mut h).tuple.l4_unknown, L4_UNKNOWN_TRUNCATED);
    // ARP: not IP, passed.
    let mut arp = eth(0x0806);
    arp.extend([0u8; 28]);
    assert_eq!(h.run(true, &arp).expect("run"), TC_ACT_OK);
    assert!(h.events().is_empty());
    // GRE: IP without ports; nothing isolates B here, so it passes, reported once.
    assert_eq!(h.run(true, &v4(A4, B4, 47, &[0u8; 8])).expect("run"), TC_ACT_OK);
    let e = one(&mut h);
    assert_eq!((e.tuple.l4_unknown, e.tuple.proto), (L4_UNKNOWN_PROTOCOL, 47));

    let c = h.counters().expect("counters");
    assert_eq!(c[counter::MALFORMED as usize], 2);
    assert_eq!(c[counter::L4_TRUNCATED as usize], 3);
    assert_eq!(c[counter::NON_IP as usize], 1);
    assert_eq!(c[counter::OTHER_PROTO as usize], 1);
    assert_eq!(c[counter::NEW_FLOWS as usize], 3);
}

/// A TCP packet of a connection we did not see start must not get around policy: it is
/// decided (as its own attempt, or as the reply side of one the peer could open), and a
/// SYN on its tuple afterwards is decided as a new attempt.
#[test]
fn mid_stream_packets_do_not_bypass_policy() {
    if !root() {
        return;
    }
    let (a, b) = (ips(A4, None), ips(B4, None));
    let build = |policies: &str| compiled(policies, &[("a", "client", &a), ("b", "server", &b)]);
    const DENY_B_INGRESS: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: b}\nspec: {podSelector: {}, policyTypes: [Ingress]}\n";
    const DENY_A_INGRESS: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: a}\nspec: {podSelector: {}, policyTypes: [Ingress]}\n";

    // b admits nothing; a admits everything. A bare ACK a -> b may be the reply side of
    // a connection b opened (allowed), but a's SYN on that tuple is a new attempt: denied.
    let mut h = TestHarness::new().expect("load");
    h.apply_policy(build(DENY_B_INGRESS)).expect("policy");
    let ack = v4(A4, B4, PROTO_TCP, &l4_tcp(40000, 80, TCP_ACK));
    assert_eq!(h.run(false, &ack).expect("run"), TC_ACT_OK, "reply side of b -> a");
    let syn = v4(A4, B4, PROTO_TCP, &l4_tcp(40000, 80, TCP_SYN));
    assert_eq!(h.run(false, &syn).expect("run"), TC_ACT_SHOT, "the SYN is decided: denied");
    assert_eq!(h.run(false, &syn).expect("run"), TC_ACT_SHOT, "and stays denied");

    // Neither direction allowed: the mid-stream packet itself is dropped and reported.
    let mut h = TestHarness::new().expect("load");
    h.apply_policy(build(&format!("{DENY_B_INGRESS}---\n{DENY_A_INGRESS}"))).expect("policy");
    let _ = h.events();
    let ack = v4(A4, B4, PROTO_TCP, &l4_tcp(40001, 80, TCP_ACK));
    assert_eq!(h.run(false, &ack).expect("run"), TC_ACT_SHOT);
    let ev = h.events();
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!(ev[0].verdict, flows_common::VERDICT_DENIED);
    assert_eq!(h.run(false, &v4(A4, B4, PROTO_TCP, &l4_tcp(40001, 80, TCP_SYN))).expect("run"), TC_ACT_SHOT);
}

const TC_ACT_SHOT: u32 = 2;

/// The datapath state of `policies` over these pods (namespace, name, addresses), all on
/// this node, enforced.
fn compiled(policies: &str, pods: &[(&str, &str, &[std::net::IpAddr])]) -> flows_policy::compile::DatapathState {
    use flows_policy::{
        Cluster, Engine, Manifests, PodInfo,
        compile::{IdentityAllocator, Mode, NodeView, SetTable, compile_datapath},
    };
    let m = Manifests::parse([("p.yaml", policies)]).expect("policies");
    let mut c = Cluster::new();
    for (ns, name, ips) in pods {
        c.add_pod(PodInfo {
            namespace: ns.to_string(),
            name: name.to_string(),
            node: Some("n".into()),
            labels: Default::default(),
            ips: ips.to_vec(),
            ports: vec![],
        });
    }
    compile_datapath(
        &c,
        &Engine::new(m.policies),
        &NodeView {
            is_local: &|_| true,
            mode_of: &|_| Mode::Enforce,
        },
        &mut IdentityAllocator::new(),
        SetTable::new(),
    )
}

fn ips(v4: [u8; 4], v6: Option<[u8; 16]>) -> Vec<std::net::IpAddr> {
    let mut out = vec![std::net::IpAddr::from(v4)];
    out.extend(v6.map(std::net::IpAddr::from));
    out
}

const C4: [u8; 4] = [10, 244, 2, 4];
const C6: [u8; 16] = [0xfd, 0, 0, 0x10, 0x2, 0x44, 0, 2, 0, 0, 0, 0, 0, 0, 0, 4];

/// a/client; b/server admits a's pods on TCP 80 and UDP 53 only; c/open admits them
/// with a rule without ports. Everything on this node, enforced.
fn crafted_policy() -> flows_policy::compile::DatapathState {
    const POLICIES: &str = "\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: ports, namespace: b}
spec:
  podSelector: {}
  ingress: [{from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: a}}}], ports: [{port: 80}, {port: 53, protocol: UDP}]}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: any-port, namespace: c}
spec:
  podSelector: {}
  ingress: [{from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: a}}}]}]
";
    let (a, b, c) = (ips(A4, Some(A6)), ips(B4, Some(B6)), ips(C4, Some(C6)));
    compiled(POLICIES, &[("a", "client", &a), ("b", "server", &b), ("c", "open", &c)])
}

/// An IPv4 packet with the fragment field and identification given (`payload` is what
/// follows the IP header).
fn v4_frag(src: [u8; 4], dst: [u8; 4], proto: u8, id: u16, frag: u16, payload: &[u8]) -> Vec<u8> {
    let mut p = v4(src, dst, proto, payload);
    p[18..20].copy_from_slice(&id.to_be_bytes());
    p[20..22].copy_from_slice(&frag.to_be_bytes());
    p
}

/// A frame whose IP packet sits behind 802.1Q tags left in the data.
fn vlan_tagged(frame: &[u8], tags: usize) -> Vec<u8> {
    let mut p = frame[..12].to_vec();
    for _ in 0..tags {
        p.extend([0x81, 0x00, 0x00, 0x05]);
    }
    p.extend_from_slice(&frame[12..]);
    p
}

/// Packets whose ports cannot be read, into a pod whose policy names ports: every one
/// dropped and reported once, as the attempt of its sender, saying why. Into a pod a
/// rule without ports admits: passed. Fragments follow their first fragment.
#[test]
fn crafted_packets_are_decided_by_rules_without_ports() {
    use flows_common::{VERDICT_ALLOWED, VERDICT_DENIED};
    if !root() {
        return;
    }
    let mut h = TestHarness::new().expect("load");
    h.apply_policy(crafted_policy()).expect("policy");
    let _ = h.events();
    let to_ep = |h: &mut TestHarness, p: &[u8]| h.run(false, p).expect("run");
    let denied_once = |h: &mut TestHarness, what: &str, reason: u8, proto: u8| {
        let ev = h.events();
        assert_eq!(ev.len(), 1, "{what}: one record, got {ev:?}");
        let e = ev[0];
        assert_eq!(e.verdict, VERDICT_DENIED, "{what}");
        assert_eq!((e.tuple.l4_unknown, e.tuple.proto), (reason, proto), "{what}");
        assert_eq!(e.flags & EVENT_F_REPLY, 0, "{what}: the sender's attempt");
        assert!(e.tuple.saddr[..4] == A4 || e.tuple.saddr == A6, "{what}: names the sender");
    };

    // What the policy admits passes; what it names no port for is dropped.
    assert_eq!(to_ep(&mut h, &v4(A4, B4, PROTO_TCP, &l4_tcp(41000, 80, TCP_SYN))), TC_ACT_OK);
    assert_eq!(one(&mut h).verdict, VERDICT_ALLOWED);
    assert_eq!(to_ep(&mut h, &v4(A4, B4, PROTO_TCP, &l4_tcp(41000, 22, TCP_SYN))), TC_ACT_SHOT);
    denied_once(&mut h, "SYN to 22", 0, PROTO_TCP);

    // IPv6 SYN to an admitted port behind nine destination-options headers.
    let chain: Vec<(u8, Vec<u8>)> = (0..9).map(|_| (60, opts_header(1))).collect();
    let deep = v6(A6, B6, &chain, PROTO_TCP, &l4_tcp(41001, 80, TCP_SYN));
    assert_eq!(to_ep(&mut h, &deep), TC_ACT_SHOT);
    denied_once(&mut h, "9 extension headers", L4_UNKNOWN_EXT_HEADERS, 60);
    assert_eq!(to_ep(&mut h, &deep), TC_ACT_SHOT, "again: the same attempt, silently");
    assert!(h.events().is_empty());

    // GRE, IPIP, ESP over IPv4 and IPv6.
    for (proto, v6too) in [(47u8, true), (4, false), (50, true)] {
        assert_eq!(to_ep(&mut h, &v4(A4, B4, proto, &[0u8; 16])), TC_ACT_SHOT);
        denied_once(&mut h, "protocol over IPv4", L4_UNKNOWN_PROTOCOL, proto);
        if v6too {
            assert_eq!(to_ep(&mut h, &v6(A6, B6, &[], proto, &[0u8; 16])), TC_ACT_SHOT);
            denied_once(&mut h, "protocol over IPv6", L4_UNKNOWN_PROTOCOL, proto);
        }
    }

    // A tiny first fragment (8 bytes of TCP: ports but no flags) to port 80, and its
    // later fragments: decided without ports, all dropped.
    let syn = l4_tcp(41002, 80, TCP_SYN);
    assert_eq!(to_ep(&mut h, &v4_frag(A4, B4, PROTO_TCP, 7, 0x2000, &syn[..8])), TC_ACT_SHOT);
    denied_once(&mut h, "tiny first fragment", L4_UNKNOWN_FRAGMENT, PROTO_TCP);
    assert_eq!(to_ep(&mut h, &v4_frag(A4, B4, PROTO_TCP, 7, 1, &syn[8..])), TC_ACT_SHOT);
    assert!(h.events().is_empty(), "its later fragment is the same attempt");
    // A later fragment whose first was never seen.
    assert_eq!(to_ep(&mut h, &v4_frag(A4, B4, PROTO_UDP, 99, 0x0003, &[0u8; 16])), TC_ACT_SHOT);
    denied_once(&mut h, "orphan fragment", L4_UNKNOWN_FRAGMENT, PROTO_UDP);

    // A whole first fragment carries its ports: its datagram is decided by them, and
    // its later fragments follow (to 80 passed, to 22 dropped).
    let mut first = l4_tcp(41003, 80, TCP_SYN);
    first.extend([0u8; 8]);
    assert_eq!(to_ep(&mut h, &v4_frag(A4, B4, PROTO_TCP, 8, 0x2000, &first)), TC_ACT_OK);
    assert_eq!(one(&mut h).verdict, VERDICT_ALLOWED);
    assert_eq!(to_ep(&mut h, &v4_frag(A4, B4, PROTO_TCP, 8, 3, &[0u8; 8])), TC_ACT_OK);
    let mut first = l4_tcp(41004, 22, TCP_SYN);
    first.extend([0u8; 8]);
    assert_eq!(to_ep(&mut h, &v4_frag(A4, B4, PROTO_TCP, 9, 0x2000, &first)), TC_ACT_SHOT);
    denied_once(&mut h, "first fragment to 22", 0, PROTO_TCP);
    assert_eq!(to_ep(&mut h, &v4_frag(A4, B4, PROTO_TCP, 9, 3, &[0u8; 8])), TC_ACT_SHOT);
    assert!(h.events().is_empty());

    // Truncated UDP header towards the admitted UDP port.
    let mut cut = v4(A4, B4, PROTO_UDP, &l4_udp(41005, 53));
    cut[16..18].copy_from_slice(&24u16.to_be_bytes());
    assert_eq!(to_ep(&mut h, &cut), TC_ACT_SHOT);
    denied_once(&mut h, "truncated UDP", L4_UNKNOWN_TRUNCATED, PROTO_UDP);

    // A second VLAN tag left in the frame hides nothing.
    let tagged = vlan_tagged(&v4(A4, B4, PROTO_TCP, &l4_tcp(41006, 22, TCP_SYN)), 2);
    assert_eq!(to_ep(&mut h, &tagged), TC_ACT_SHOT);
    denied_once(&mut h, "VLAN-tagged SYN to 22", 0, PROTO_TCP);

    // ICMP errors: one quoting the admitted connection passes; one quoting nothing
    // tracked is no answer and is dropped; one quoting the denied SYN is dropped.
    let admitted = &v4(B4, A4, PROTO_TCP, &l4_tcp(80, 41000, TCP_SYN | TCP_ACK))[14..14 + 28];
    assert_eq!(to_ep(&mut h, &v4(A4, B4, PROTO_ICMP, &icmp_error(3, admitted))), TC_ACT_OK);
    assert!(h.events().is_empty());
    let stranger = &v4(B4, A4, PROTO_TCP, &l4_tcp(80, 9, TCP_SYN | TCP_ACK))[14..14 + 28];
    assert_eq!(to_ep(&mut h, &v4(A4, B4, PROTO_ICMP, &icmp_error(3, stranger))), TC_ACT_SHOT);
    denied_once(&mut h, "unrelated ICMP error", L4_UNKNOWN_ICMP, PROTO_ICMP);
    let stranger6 = &v6(B6, A6, &[], PROTO_TCP, &l4_tcp(80, 9, TCP_SYN | TCP_ACK))[14..14 + 48];
    assert_eq!(to_ep(&mut h, &v6(A6, B6, &[], PROTO_ICMPV6, &icmp_error(1, stranger6))), TC_ACT_SHOT);
    denied_once(&mut h, "unrelated ICMPv6 error", L4_UNKNOWN_ICMP, PROTO_ICMPV6);
    let denied_syn = &v4(A4, B4, PROTO_TCP, &l4_tcp(41000, 22, TCP_SYN))[14..14 + 28];
    assert_eq!(to_ep(&mut h, &v4(A4, B4, PROTO_ICMP, &icmp_error(11, denied_syn))), TC_ACT_SHOT);
    assert!(h.events().is_empty(), "part of the denied attempt, already reported");

    // The pod a rule without ports admits gets all of it.
    let deep = v6(A6, C6, &chain, PROTO_TCP, &l4_tcp(41007, 80, TCP_SYN));
    assert_eq!(to_ep(&mut h, &deep), TC_ACT_OK);
    assert_eq!(one(&mut h).verdict, VERDICT_ALLOWED);
    assert_eq!(to_ep(&mut h, &v4(A4, C4, 47, &[0u8; 16])), TC_ACT_OK);
    let e = one(&mut h);
    assert_eq!((e.verdict, e.tuple.l4_unknown), (VERDICT_ALLOWED, L4_UNKNOWN_PROTOCOL));
    // Its answer that looks like a new datagram is reported as a reply, not as an
    // attempt of the answering pod.
    assert_eq!(h.run(true, &v4(C4, A4, PROTO_UDP, &l4_udp(53, 41008))).expect("run"), TC_ACT_OK);
    let e = one(&mut h);
    assert_ne!(e.flags & EVENT_F_REPLY, 0, "{e:?}");
    assert_eq!(&e.tuple.saddr[..4], &C4);

    let c = h.counters().expect("counters");
    assert_eq!(c[counter::FRAGMENTS_FOLLOWED as usize], 2);
    assert_eq!(c[counter::ICMP_RELATED as usize], 2);
}

/// At the node's uplink (the egress policy of local pods towards other nodes and the
/// world) a packet of unknown L4 is decided the same way: a pod whose egress names
/// ports sends nothing unreadable.
#[test]
fn the_uplink_decides_unreadable_packets_by_egress_policy() {
    use flows_common::VERDICT_DENIED;
    use flows_node_probe::datapath::PROG_TO_NETWORK;
    if !root() {
        return;
    }
    const EGRESS: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: out, namespace: a}\nspec: {podSelector: {}, policyTypes: [Egress], egress: [{ports: [{port: 80}]}]}\n";
    let a = ips(A4, Some(A6));
    let state = compiled(EGRESS, &[("a", "client", &a)]);
    let mut h = TestHarness::new().expect("load");
    h.apply_policy(state).expect("policy");
    let up = |h: &mut TestHarness, p: &[u8]| h.run_timed(PROG_TO_NETWORK, p).expect("run").0;
    // Out to the world on the port the policy names: allowed.
    assert_eq!(up(&mut h, &v4(A4, B4, PROTO_TCP, &l4_tcp(42000, 80, TCP_SYN))), TC_ACT_OK);
    let _ = h.events();
    // GRE, and a SYN to port 80 behind nine extension headers: dropped, reported as the
    // pod's attempt with its egress policy.
    assert_eq!(up(&mut h, &v4(A4, B4, 47, &[0u8; 16])), TC_ACT_SHOT);
    let chain: Vec<(u8, Vec<u8>)> = (0..9).map(|_| (60, opts_header(1))).collect();
    assert_eq!(up(&mut h, &v6(A6, B6, &chain, PROTO_TCP, &l4_tcp(42001, 80, TCP_SYN))), TC_ACT_SHOT);
    let ev = h.events();
    assert_eq!(ev.len(), 2, "{ev:?}");
    for e in &ev {
        assert_eq!(e.verdict, VERDICT_DENIED);
        assert_ne!(e.tuple.l4_unknown, 0);
        assert_ne!(e.egress_set, 0, "names the isolating egress policy");
        assert!(e.tuple.saddr[..4] == A4 || e.tuple.saddr == A6);
    }
}
