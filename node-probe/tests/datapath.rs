//! The TC programs in the real kernel verifier and runtime, driven packet by packet with
//! BPF_PROG_TEST_RUN: parsing (IPv4, IPv6 with extension headers, TCP, UDP, ICMP,
//! ICMPv6), connection tracking, and what happens to malformed input. Needs root.

use flows_common::{
    AF_INET, AF_INET6, EVENT_F_REPLY, POINT_FROM_ENDPOINT, POINT_TO_ENDPOINT, PROTO_ICMP,
    PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, RawEvent, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, counter,
};
use flows_node_probe::datapath::TestHarness;

const TC_ACT_OK: u32 = 0;

fn root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    eprintln!("skipping: BPF_PROG_TEST_RUN needs root");
    false
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

    // ICMP errors are never attempts.
    h.run(false, &v4(B4, A4, PROTO_ICMP, &l4_icmp(3, 0))).expect("run");
    assert!(h.events().is_empty());

    // ICMPv6 echo, and neighbour discovery ignored.
    h.run(true, &v6(A6, B6, &[], PROTO_ICMPV6, &l4_icmp(128, 9))).expect("run");
    let e = one(&mut h);
    assert_eq!((e.tuple.family, e.icmp_type, e.tuple.sport), (AF_INET6, 128, 9));
    assert_eq!(e.tuple.saddr, A6);
    h.run(true, &v6(A6, B6, &[], PROTO_ICMPV6, &l4_icmp(135, 0))).expect("run");
    assert!(h.events().is_empty());
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

    // A later fragment has no L4 header: passed and counted, no event.
    let mut frag = vec![0u8; 8];
    frag[2] = 0x01; // offset 32 octets
    let p = v6(A6, B6, &[(44, frag)], PROTO_UDP, &[0u8; 16]);
    assert_eq!(h.run(true, &p).expect("run"), TC_ACT_OK);
    assert!(h.events().is_empty());

    // Longer chains than the walk allows: passed and counted.
    let chain: Vec<(u8, Vec<u8>)> = (0..8).map(|_| (60, opts_header(1))).collect();
    let p = v6(A6, B6, &chain, PROTO_TCP, &l4_tcp(1, 2, TCP_SYN));
    assert_eq!(h.run(true, &p).expect("run"), TC_ACT_OK);
    assert!(h.events().is_empty());

    let c = h.counters().expect("counters");
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
    // Cut inside the TCP header (flags byte missing).
    assert_eq!(h.run(true, &good[..14 + 20 + 10]).expect("run"), TC_ACT_OK);
    // Bad IP version and header length.
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
    // ARP: not IP, passed.
    let mut arp = eth(0x0806);
    arp.extend([0u8; 28]);
    assert_eq!(h.run(true, &arp).expect("run"), TC_ACT_OK);
    // GRE: IP but untracked.
    assert_eq!(h.run(true, &v4(A4, B4, 47, &[0u8; 8])).expect("run"), TC_ACT_OK);
    assert!(h.events().is_empty());

    let c = h.counters().expect("counters");
    assert_eq!(c[counter::MALFORMED as usize], 4);
    assert_eq!(c[counter::NON_IP as usize], 1);
    assert_eq!(c[counter::OTHER_PROTO as usize], 1);
    assert_eq!(c[counter::NEW_FLOWS as usize], 0);
}

/// A TCP packet of a connection we did not see start must not get around policy: it is
/// decided (as its own attempt, or as the reply side of one the peer could open), and a
/// SYN on its tuple afterwards is decided as a new attempt.
#[test]
fn mid_stream_packets_do_not_bypass_policy() {
    use flows_policy::{
        Cluster, Engine, Manifests, PodInfo,
        compile::{IdentityAllocator, Mode, NodeView, SetTable, compile_datapath},
    };
    if !root() {
        return;
    }
    let build = |policies: &str| {
        let m = Manifests::parse([("p.yaml", policies)]).expect("policies");
        let mut c = Cluster::new();
        for (ns, name, ip) in [("a", "client", A4), ("b", "server", B4)] {
            c.add_pod(PodInfo {
                namespace: ns.into(),
                name: name.into(),
                node: Some("n".into()),
                labels: Default::default(),
                ips: vec![std::net::IpAddr::from(ip)],
                ports: vec![],
            });
        }
        let engine = Engine::new(m.policies);
        compile_datapath(
            &c,
            &engine,
            &NodeView {
                is_local: &|_| true,
                mode_of: &|_| Mode::Enforce,
            },
            &mut IdentityAllocator::new(),
            SetTable::new(),
        )
    };
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
