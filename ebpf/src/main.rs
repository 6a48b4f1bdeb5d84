//! flows kernel programs.
//!
//! * `flows_from_ep` / `flows_to_ep`: TC (TCX) classifiers on the host side of every pod
//!   veth. They parse L2-L4, track connections per observation point in an LRU map and
//!   report each new connection attempt once through a ring buffer. They never change a
//!   packet's fate: everything returns TC_ACT_OK (enforcement comes with the policy maps).
//! * `flows_kfree_skb`: a tp_btf program on `kfree_skb` that reports kernel drops of
//!   traffic the TC programs have seen, with the kernel's drop reason.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, TC_ACT_OK, TC_ACT_SHOT},
    helpers::{bpf_ktime_get_ns, bpf_probe_read_kernel},
    macros::{btf_tracepoint, classifier, map},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf, lpm_trie::Key},
    programs::{BtfTracePointContext, TcContext},
};
use flows_common::{
    AF_INET, AF_INET6, CT_F_AS_REPLY, CT_F_CLOSING, CT_F_DENIED, CT_F_EVALUATED, CT_F_NO_EVENT, CT_F_ORIG_SWAPPED,
    CT_F_REPLY_SEEN,
    CtEntry, CtKey, DIR_EGRESS, DIR_INGRESS, DropWatch, EP_EGRESS_ISOLATED, EP_INGRESS_ISOLATED,
    EVENT_DROP, EVENT_F_REPLY, EVENT_FLOW, EndpointValue, FlowTuple, IDENTITY_ANY, IDENTITY_WORLD,
    KernelOffsets, MODE_ENFORCE, MODE_OFF, POINT_FROM_ENDPOINT, POINT_FROM_NETWORK,
    POINT_KERNEL_DROP, POINT_TO_ENDPOINT, POINT_TO_NETWORK, POLICY_EGRESS_ALLOWED,
    POLICY_EGRESS_EVALUATED, POLICY_INGRESS_ALLOWED, POLICY_INGRESS_EVALUATED, PROTO_ICMP,
    PROTO_ICMPV6, PROTO_SCTP, PROTO_TCP, PROTO_UDP, PolicyKey, RAW_EVENT_SIZE, RawEvent, TCP_ACK, TCP_FIN,
    TCP_RST, TCP_SYN, VERDICT_ALLOWED, VERDICT_AUDIT, VERDICT_DENIED, VERDICT_NONE,
    WATCH_F_POLICY_DROP, counter,
};

/// 4 MiB: ~58k events of 72 bytes before user space must catch up.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(4 << 20, 0);

/// Bytes waiting in EVENTS before a record wakes the reader. Below it records are
/// committed without a wakeup (each wakeup is a self-IPI: a VM exit on a virtual
/// machine, measured as the largest single cost per event under load), and the probe
/// drains the ring on a short timer instead (node-probe's `DRAIN_EVERY`).
const WAKEUP_BYTES: u64 = 64 * RECORD_BYTES;
/// A record in the ring: its 8-byte header and the event.
const RECORD_BYTES: u64 = RAW_EVENT_SIZE as u64 + 8;

#[map]
static CONNTRACK: LruHashMap<CtKey, CtEntry> = LruHashMap::with_max_entries(262_144, 0);

/// Tuples seen at pod interfaces (direction-normalised), so the drop program reports
/// only pod traffic, once per attempt and reason.
#[map]
static DROP_WATCH: LruHashMap<FlowTuple, DropWatch> = LruHashMap::with_max_entries(262_144, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// Network namespaces (inode numbers) whose drops this probe reports, used when several
/// probes share one kernel (the lab). Consulted only when `DROP_NETNS_FILTER` is set.
#[map]
static DROP_NETNS: HashMap<u32, u8> = HashMap::with_max_entries(4096, 0);

/// Address (v4-mapped for IPv4) → identity, longest prefix first.
#[map]
static IPCACHE: LpmTrie<[u8; 16], u32> = LpmTrie::with_max_entries(262_144, 0);

/// Local pod address (v4-mapped) → endpoint.
#[map]
static ENDPOINTS: HashMap<[u8; 16], EndpointValue> = HashMap::with_max_entries(65_536, 0);

/// (endpoint, identity, direction, protocol, port prefix) → policy set that allows it.
#[map]
static POLICY: LpmTrie<PolicyKey, u32> = LpmTrie::with_max_entries(1 << 20, 0);

/// Current policy revision; connections evaluated at an older one are evaluated again.
#[map]
static POLICY_REV: Array<u32> = Array::with_max_entries(1, 0);

#[unsafe(no_mangle)]
static OFFSETS: KernelOffsets = KernelOffsets {
    skb_head: 0,
    skb_network_header: 0,
    skb_transport_header: 0,
    skb_protocol: 0,
    skb_len: 0,
    skb_dev: 0,
    dev_nd_net: 0,
    net_ns_inum: 0,
    valid: 0,
    _pad: 0,
};

#[unsafe(no_mangle)]
static DROP_NETNS_FILTER: u32 = 0;

/// The kernel's numbers for SKB_DROP_REASON_TC_INGRESS / _TC_EGRESS (from BTF).
#[unsafe(no_mangle)]
static DROP_REASON_TC_INGRESS: u32 = 0;
#[unsafe(no_mangle)]
static DROP_REASON_TC_EGRESS: u32 = 0;

#[inline(always)]
fn tc_ingress_reason() -> u32 {
    // SAFETY: read-only global set at load time.
    unsafe { core::ptr::read_volatile(&DROP_REASON_TC_INGRESS) }
}

#[inline(always)]
fn tc_egress_reason() -> u32 {
    // SAFETY: read-only global set at load time.
    unsafe { core::ptr::read_volatile(&DROP_REASON_TC_EGRESS) }
}

/// A UDP or ICMP "connection" idle this long is new again (the kernel's conntrack uses 30 s).
const DATAGRAM_IDLE_NS: u64 = 30_000_000_000;

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
/// IPv6 extension headers walked before giving up (counted, packet passed).
const MAX_IPV6_EXT: usize = 6;

#[inline(always)]
fn count(idx: u32) {
    if let Some(p) = COUNTERS.get_ptr_mut(idx) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *p += 1 };
    }
}

/// What the parser extracted from one packet.
struct Packet {
    tuple: FlowTuple,
    tcp_flags: u8,
    icmp_type: u8,
    icmp_code: u8,
    /// ICMP messages that are not echo (errors, neighbour discovery): never an attempt.
    icmp_control: bool,
}

#[classifier]
pub fn flows_from_ep(ctx: TcContext) -> i32 {
    observe(&ctx, POINT_FROM_ENDPOINT)
}

#[classifier]
pub fn flows_to_ep(ctx: TcContext) -> i32 {
    observe(&ctx, POINT_TO_ENDPOINT)
}

/// Node uplink, leaving the node (after kube-proxy's DNAT): egress policy of local pods
/// towards other nodes and the world.
#[classifier]
pub fn flows_to_net(ctx: TcContext) -> i32 {
    observe(&ctx, POINT_TO_NETWORK)
}

/// Node uplink, entering the node: tracked only, so replies leaving later are replies.
#[classifier]
pub fn flows_from_net(ctx: TcContext) -> i32 {
    observe(&ctx, POINT_FROM_NETWORK)
}

/// Does nothing: the baseline against which benchmarks measure the datapath's cost.
#[classifier]
pub fn flows_bench_nop(_ctx: TcContext) -> i32 {
    TC_ACT_OK
}

#[inline(always)]
fn observe(ctx: &TcContext, point: u8) -> i32 {
    count(counter::PACKETS);
    match parse(ctx) {
        Ok(pkt) => track(ctx, point, &pkt),
        Err(counter_idx) => {
            // Unparseable packets are never dropped here: they pass and are counted.
            count(counter_idx);
            TC_ACT_OK
        }
    }
}

#[inline(always)]
fn load<T>(ctx: &TcContext, off: usize) -> Result<T, u32> {
    ctx.load::<T>(off).map_err(|_| counter::MALFORMED)
}

#[inline(always)]
fn parse(ctx: &TcContext) -> Result<Packet, u32> {
    let eth_proto = u16::from_be(load::<u16>(ctx, 12)?);
    let mut tuple = FlowTuple::zeroed();
    let l4: usize;
    let proto: u8;
    match eth_proto {
        ETH_P_IP => {
            let vihl: u8 = load(ctx, ETH_HLEN)?;
            let ihl = ((vihl & 0x0f) as usize) * 4;
            if vihl >> 4 != 4 || ihl < 20 {
                return Err(counter::MALFORMED);
            }
            let frag = u16::from_be(load::<u16>(ctx, ETH_HLEN + 6)?);
            if frag & 0x1fff != 0 {
                return Err(counter::FRAGMENTS);
            }
            proto = load(ctx, ETH_HLEN + 9)?;
            let s: [u8; 4] = load(ctx, ETH_HLEN + 12)?;
            let d: [u8; 4] = load(ctx, ETH_HLEN + 16)?;
            tuple.saddr[..4].copy_from_slice(&s);
            tuple.daddr[..4].copy_from_slice(&d);
            tuple.family = AF_INET;
            l4 = ETH_HLEN + ihl;
        }
        ETH_P_IPV6 => {
            let v: u8 = load(ctx, ETH_HLEN)?;
            if v >> 4 != 6 {
                return Err(counter::MALFORMED);
            }
            tuple.saddr = load(ctx, ETH_HLEN + 8)?;
            tuple.daddr = load(ctx, ETH_HLEN + 24)?;
            tuple.family = AF_INET6;
            let (p, off) = skip_ipv6_ext(ctx, load(ctx, ETH_HLEN + 6)?, ETH_HLEN + 40)?;
            proto = p;
            l4 = off;
        }
        _ => return Err(counter::NON_IP),
    }
    tuple.proto = proto;
    let mut pkt = Packet {
        tuple,
        tcp_flags: 0,
        icmp_type: 0,
        icmp_code: 0,
        icmp_control: false,
    };
    match proto {
        PROTO_TCP | PROTO_UDP | PROTO_SCTP => {
            pkt.tuple.sport = u16::from_be(load::<u16>(ctx, l4)?);
            pkt.tuple.dport = u16::from_be(load::<u16>(ctx, l4 + 2)?);
            if proto == PROTO_TCP {
                pkt.tcp_flags = load(ctx, l4 + 13)?;
            }
        }
        PROTO_ICMP | PROTO_ICMPV6 => {
            pkt.icmp_type = load(ctx, l4)?;
            pkt.icmp_code = load(ctx, l4 + 1)?;
            let echo = if proto == PROTO_ICMP {
                pkt.icmp_type == 8 || pkt.icmp_type == 0
            } else {
                pkt.icmp_type == 128 || pkt.icmp_type == 129
            };
            if echo {
                // The echo identifier plays the role of both ports, so a request and its
                // reply map onto one conntrack entry.
                let id = u16::from_be(load::<u16>(ctx, l4 + 4)?);
                pkt.tuple.sport = id;
                pkt.tuple.dport = id;
            } else {
                pkt.icmp_control = true;
            }
        }
        _ => return Err(counter::OTHER_PROTO),
    }
    Ok(pkt)
}

/// Walks IPv6 extension headers; returns the upper-layer protocol and its offset.
#[inline(always)]
fn skip_ipv6_ext(ctx: &TcContext, mut next: u8, mut off: usize) -> Result<(u8, usize), u32> {
    for _ in 0..MAX_IPV6_EXT {
        match next {
            // Hop-by-hop, routing, destination options: length in 8-octet units, minus one.
            0 | 43 | 60 => {
                let nh: u8 = load(ctx, off)?;
                let len: u8 = load(ctx, off + 1)?;
                next = nh;
                off += (len as usize + 1) * 8;
            }
            // Fragment header: fixed 8 bytes; a non-first fragment has no L4 header.
            44 => {
                let nh: u8 = load(ctx, off)?;
                let frag = u16::from_be(load::<u16>(ctx, off + 2)?);
                if frag & 0xfff8 != 0 {
                    return Err(counter::FRAGMENTS);
                }
                next = nh;
                off += 8;
            }
            // Authentication header: length in 4-octet units, minus two.
            51 => {
                let nh: u8 = load(ctx, off)?;
                let len: u8 = load(ctx, off + 1)?;
                next = nh;
                off += (len as usize + 2) * 4;
            }
            _ => return Ok((next, off)),
        }
    }
    match next {
        0 | 43 | 60 | 44 | 51 => Err(counter::IPV6_EXT_TOO_DEEP),
        _ => Ok((next, off)),
    }
}

#[inline(always)]
fn is_new_tcp_attempt(flags: u8) -> bool {
    flags & TCP_SYN != 0 && flags & TCP_ACK == 0
}

/// The key of an address in IPCACHE and ENDPOINTS: IPv4 as ::ffff:a.b.c.d.
#[inline(always)]
fn addr_key(addr: &[u8; 16], family: u8) -> [u8; 16] {
    if family == AF_INET {
        let mut k = [0u8; 16];
        k[10] = 0xff;
        k[11] = 0xff;
        k[12] = addr[0];
        k[13] = addr[1];
        k[14] = addr[2];
        k[15] = addr[3];
        k
    } else {
        *addr
    }
}

#[inline(always)]
fn identity_of(addr: &[u8; 16], family: u8) -> u32 {
    IPCACHE
        .get(Key::new(128, addr_key(addr, family)))
        .copied()
        .unwrap_or(IDENTITY_WORLD)
}

#[inline(always)]
fn policy_rev() -> u32 {
    POLICY_REV.get(0).copied().unwrap_or(0)
}

/// What policy decided for a new connection at an enforcement point.
struct Verdict {
    verdict: u8,
    policy: u8,
    ingress_set: u32,
    egress_set: u32,
    drop: bool,
}

/// One side: (evaluated, allowed, policy set).
#[inline(always)]
fn side(ep: &EndpointValue, dir: u8, peer: u32, proto: u8, port: u16) -> (bool, bool, u32) {
    let (isolated, isolation) = if dir == DIR_INGRESS {
        (ep.flags & EP_INGRESS_ISOLATED != 0, ep.ingress_isolation)
    } else {
        (ep.flags & EP_EGRESS_ISOLATED != 0, ep.egress_isolation)
    };
    if !isolated {
        return (false, true, 0);
    }
    let mut key = PolicyKey {
        endpoint_be: ep.endpoint.to_be(),
        identity_be: peer.to_be(),
        direction: dir,
        proto,
        port_be: port.to_be(),
    };
    if let Some(set) = POLICY.get(Key::new(96, key)) {
        return (true, true, *set);
    }
    key.identity_be = IDENTITY_ANY.to_be();
    if let Some(set) = POLICY.get(Key::new(96, key)) {
        return (true, true, *set);
    }
    (true, false, isolation)
}

/// Decides a new connection: the destination's ingress when it is a local pod (and
/// `ingress` is asked), the source's egress when it is a local pod.
/// Kept out of line: its lookups need stack that the tracking path also needs.
/// `reverse` decides the connection the other end would open (the tuple read backwards).
#[inline(never)]
fn decide(t: &FlowTuple, ingress: bool, reverse: bool, v: &mut Verdict) {
    let (src, dst, dport) = if reverse {
        (&t.daddr, &t.saddr, t.sport)
    } else {
        (&t.saddr, &t.daddr, t.dport)
    };
    let port = match t.proto {
        PROTO_TCP | PROTO_UDP | PROTO_SCTP => dport,
        _ => 0,
    };
    let mut denied = false;
    let mut enforce = false;
    if ingress {
        if let Some(ep) = unsafe { ENDPOINTS.get(&addr_key(dst, t.family)) } {
            if ep.mode != MODE_OFF {
                let (evaluated, allowed, set) =
                    side(ep, DIR_INGRESS, identity_of(src, t.family), t.proto, port);
                if evaluated {
                    v.policy |= POLICY_INGRESS_EVALUATED;
                    v.ingress_set = set;
                    if allowed {
                        v.policy |= POLICY_INGRESS_ALLOWED;
                    } else {
                        denied = true;
                        enforce |= ep.mode == MODE_ENFORCE;
                    }
                }
            }
        }
    }
    if let Some(ep) = unsafe { ENDPOINTS.get(&addr_key(src, t.family)) } {
        if ep.mode != MODE_OFF {
            let (evaluated, allowed, set) =
                side(ep, DIR_EGRESS, identity_of(dst, t.family), t.proto, port);
            if evaluated {
                v.policy |= POLICY_EGRESS_EVALUATED;
                v.egress_set = set;
                if allowed {
                    v.policy |= POLICY_EGRESS_ALLOWED;
                } else {
                    denied = true;
                    enforce |= ep.mode == MODE_ENFORCE;
                }
            }
        }
    }
    if v.policy != 0 {
        v.verdict = if !denied {
            VERDICT_ALLOWED
        } else if enforce {
            v.drop = true;
            VERDICT_DENIED
        } else {
            VERDICT_AUDIT
        };
    }
}

const NO_VERDICT: Verdict = Verdict {
    verdict: VERDICT_NONE,
    policy: 0,
    ingress_set: 0,
    egress_set: 0,
    drop: false,
};

#[inline(always)]
fn enforcing(point: u8) -> bool {
    point == POINT_TO_ENDPOINT || point == POINT_TO_NETWORK
}

#[inline(always)]
fn track(ctx: &TcContext, point: u8, pkt: &Packet) -> i32 {
    if pkt.icmp_control {
        // Errors and neighbour discovery belong to other flows or to the link: never a
        // new attempt. Counted with the replies they mostly are.
        count(counter::REPLIES);
        return TC_ACT_OK;
    }
    // SAFETY: the context's skb pointer is valid for the program's lifetime.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let now = unsafe { bpf_ktime_get_ns() };
    let tcp = pkt.tuple.proto == PROTO_TCP;
    let fin_rst = pkt.tcp_flags & (TCP_FIN | TCP_RST) != 0;
    let rev = policy_rev();

    // One lookup for both directions: the key is the normalised tuple, and the entry says
    // which way the connection goes.
    // In place: the stack has no room for another copy of the tuple.
    let mut key = CtKey {
        tuple: pkt.tuple,
        ifindex,
    };
    let swapped = must_swap(&key.tuple);
    if swapped {
        core::mem::swap(&mut key.tuple.saddr, &mut key.tuple.daddr);
        core::mem::swap(&mut key.tuple.sport, &mut key.tuple.dport);
    }
    let orig_swapped = if swapped { CT_F_ORIG_SWAPPED } else { 0 };
    if let Some(e) = CONNTRACK.get_ptr_mut(&key) {
        // SAFETY: map value pointer valid until the program exits.
        let e = unsafe { &mut *e };
        if e.flags & CT_F_ORIG_SWAPPED == orig_swapped {
            // The connection's own direction.
            let again = if tcp {
                // A SYN after FIN/RST reuses the tuple for a new connection; so does a SYN on
                // an entry first seen mid-stream where policy is enforced (it must be decided
                // as an attempt). Any other SYN is a retransmission of the same attempt.
                is_new_tcp_attempt(pkt.tcp_flags)
                    && (e.flags & CT_F_CLOSING != 0
                        || (e.flags & CT_F_NO_EVENT != 0 && enforcing(point)))
            } else {
                now.saturating_sub(e.last_seen_ns) > DATAGRAM_IDLE_NS
            };
            if !again {
                e.last_seen_ns = now;
                e.packets_orig = e.packets_orig.wrapping_add(1);
                if fin_rst {
                    e.flags |= CT_F_CLOSING;
                }
                if e.flags & CT_F_EVALUATED != 0 && e.rev != rev && enforcing(point) {
                    // Policy changed since this connection was decided: decide it again.
                    count(counter::POLICY_REEVALUATED);
                    let mut v = NO_VERDICT;
                    decide(&pkt.tuple, point == POINT_TO_ENDPOINT, e.flags & CT_F_AS_REPLY != 0, &mut v);
                    e.rev = rev;
                    let was_denied = e.flags & CT_F_DENIED != 0;
                    if v.drop {
                        e.flags |= CT_F_DENIED;
                    } else {
                        e.flags &= !CT_F_DENIED;
                    }
                    if v.drop != was_denied {
                        emit_flow(ctx, point, pkt, ifindex, now, 0, &v);
                    }
                    if v.drop {
                        note_policy_drop(&pkt.tuple);
                        return TC_ACT_SHOT;
                    }
                    return TC_ACT_OK;
                }
                if e.flags & CT_F_DENIED != 0 {
                    count(counter::POLICY_DENIED_PACKETS);
                    return TC_ACT_SHOT;
                }
                return TC_ACT_OK;
            }
        } else {
            // A reply. A SYN from the peer after FIN/RST, or a datagram after the flow went idle,
            // starts something new in the other direction.
            let reopened = if tcp {
                is_new_tcp_attempt(pkt.tcp_flags) && e.flags & CT_F_CLOSING != 0
            } else {
                now.saturating_sub(e.last_seen_ns) > DATAGRAM_IDLE_NS
            };
            if !reopened {
                if e.flags & CT_F_DENIED != 0 {
                    count(counter::POLICY_DENIED_PACKETS);
                    return TC_ACT_SHOT;
                }
                // The first reply at this point is reported too (flagged as a reply): it
                // tells that the attempt was answered. Later replies are silent.
                let first_reply = e.flags & (CT_F_REPLY_SEEN | CT_F_NO_EVENT) == 0;
                e.flags |= CT_F_REPLY_SEEN;
                e.last_seen_ns = now;
                e.packets_reply = e.packets_reply.wrapping_add(1);
                if fin_rst {
                    e.flags |= CT_F_CLOSING;
                }
                count(counter::REPLIES);
                if first_reply && (point == POINT_FROM_ENDPOINT || point == POINT_TO_ENDPOINT) {
                    emit_flow(ctx, point, pkt, ifindex, now, EVENT_F_REPLY, &NO_VERDICT);
                }
                return TC_ACT_OK;
            }
            // The peer opens a new connection on the same ports in the other direction:
            // the new entry below replaces this one.
        }
    }

    let mut entry = CtEntry {
        created_ns: now,
        last_seen_ns: now,
        packets_orig: 1,
        packets_reply: 0,
        flags: orig_swapped,
        rev,
    };
    if tcp && !is_new_tcp_attempt(pkt.tcp_flags) {
        // Mid-stream packet of a connection older than our tracking: not an attempt we
        // saw start, but where policy is enforced it is decided all the same.
        return midstream(ctx, point, pkt, &key, orig_swapped, now);
    }
    let mut v = NO_VERDICT;
    if enforcing(point) {
        entry.flags |= CT_F_EVALUATED;
        decide(&pkt.tuple, point == POINT_TO_ENDPOINT, false, &mut v);
    }
    if v.drop {
        entry.flags |= CT_F_DENIED;
    }
    let _ = CONNTRACK.insert(&key, &entry, 0);
    if point == POINT_FROM_NETWORK {
        return TC_ACT_OK;
    }
    watch_for_drops(&pkt.tuple, now);
    // The uplink reports only policy decisions; pod interfaces report every attempt.
    if point != POINT_TO_NETWORK || v.verdict != VERDICT_NONE {
        count(counter::NEW_FLOWS);
        emit_flow(ctx, point, pkt, ifindex, now, 0, &v);
    }
    match v.verdict {
        VERDICT_DENIED => {
            count(counter::POLICY_DENIED);
            note_policy_drop(&pkt.tuple);
            TC_ACT_SHOT
        }
        VERDICT_AUDIT => {
            count(counter::POLICY_AUDIT);
            TC_ACT_OK
        }
        _ => TC_ACT_OK,
    }
}

/// A TCP packet of a connection we did not see start. Tracked so its replies are
/// recognised; at an enforcing point decided in its own direction, and, failing that, as
/// the reply side of a connection the peer opened (allowed then: it is a reply).
#[inline(always)]
fn midstream(ctx: &TcContext, point: u8, pkt: &Packet, key: &CtKey, orig_swapped: u32, now: u64) -> i32 {
    let mut entry = CtEntry {
        created_ns: now,
        last_seen_ns: now,
        packets_orig: 1,
        packets_reply: 0,
        flags: CT_F_NO_EVENT | orig_swapped,
        rev: policy_rev(),
    };
    if !enforcing(point) {
        let _ = CONNTRACK.insert(key, &entry, 0);
        return TC_ACT_OK;
    }
    entry.flags |= CT_F_EVALUATED;
    let mut v = NO_VERDICT;
    decide(&pkt.tuple, point == POINT_TO_ENDPOINT, false, &mut v);
    if v.verdict == VERDICT_DENIED || v.verdict == VERDICT_AUDIT {
        let mut r = NO_VERDICT;
        decide(&pkt.tuple, point == POINT_TO_ENDPOINT, true, &mut r);
        if r.verdict != VERDICT_DENIED && r.verdict != VERDICT_AUDIT {
            entry.flags |= CT_F_AS_REPLY;
            v = NO_VERDICT;
        }
    }
    if v.drop {
        entry.flags |= CT_F_DENIED;
    }
    let _ = CONNTRACK.insert(key, &entry, 0);
    match v.verdict {
        VERDICT_DENIED => {
            count(counter::POLICY_DENIED);
            emit_flow(ctx, point, pkt, key.ifindex, now, 0, &v);
            TC_ACT_SHOT
        }
        VERDICT_AUDIT => {
            count(counter::POLICY_AUDIT);
            emit_flow(ctx, point, pkt, key.ifindex, now, 0, &v);
            TC_ACT_OK
        }
        _ => TC_ACT_OK,
    }
}

/// Marks a tuple as dropped by our policy, so the kernel's report of the same drop is
/// not repeated by the kfree_skb program.
#[inline(always)]
fn note_policy_drop(t: &FlowTuple) {
    if let Some(w) = DROP_WATCH.get_ptr_mut(&normalised(t)) {
        // SAFETY: map value pointer valid until the program exits.
        unsafe { (*w).flags |= WATCH_F_POLICY_DROP };
    }
}

/// Writes a flow event straight into the ring buffer (not via the stack, which the
/// enforcement path needs).
#[inline(always)]
fn emit_flow(
    ctx: &TcContext,
    point: u8,
    pkt: &Packet,
    ifindex: u32,
    now: u64,
    flags: u8,
    v: &Verdict,
) {
    let Some(mut entry) = EVENTS.reserve::<RawEvent>(0) else {
        count(counter::RINGBUF_FULL);
        return;
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` points at a reserved, exclusively owned RawEvent-sized slot; every
    // field is written before submit.
    unsafe {
        (*ev).ts_ns = now;
        (*ev).kind = EVENT_FLOW;
        (*ev).point = point;
        (*ev).flags = flags;
        (*ev).tcp_flags = pkt.tcp_flags;
        (*ev).ifindex = ifindex;
        (*ev).tuple = pkt.tuple;
        (*ev).icmp_type = pkt.icmp_type;
        (*ev).icmp_code = pkt.icmp_code;
        (*ev).verdict = v.verdict;
        (*ev).policy = v.policy;
        (*ev).drop_reason = 0;
        (*ev).pkt_len = ctx.len();
        (*ev).netns_ino = 0;
        (*ev).ingress_set = v.ingress_set;
        (*ev).egress_set = v.egress_set;
    }
    // The reserved record already counts as waiting.
    entry.submit(wakeup(EVENTS.query(BPF_RB_AVAIL_DATA as u64)));
}

/// Submit flags for a record, given the bytes waiting in EVENTS with it: wake the reader
/// when this record makes the backlog cross WAKEUP_BYTES, once (forcing on every record
/// above it would raise an IPI per record until the reader has drained).
#[inline(always)]
fn wakeup(waiting: u64) -> u64 {
    if waiting >= WAKEUP_BYTES && waiting < WAKEUP_BYTES + RECORD_BYTES {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    }
}

/// Orders a tuple so both directions of a connection give the same key.
#[inline(always)]
fn normalised(t: &FlowTuple) -> FlowTuple {
    if must_swap(t) { t.reversed() } else { *t }
}

/// Whether normalising `t` reverses it: the smaller address first, or with equal
/// addresses the smaller port.
#[inline(always)]
fn must_swap(t: &FlowTuple) -> bool {
    let mut swap = false;
    let mut i = 0;
    while i < 16 {
        if t.saddr[i] != t.daddr[i] {
            swap = t.saddr[i] > t.daddr[i];
            break;
        }
        i += 1;
    }
    if i == 16 {
        swap = t.sport > t.dport;
    }
    swap
}

#[inline(always)]
fn watch_for_drops(t: &FlowTuple, now: u64) {
    let w = DropWatch {
        reported_reason: 0,
        flags: 0,
        last_seen_ns: now,
    };
    let _ = DROP_WATCH.insert(&normalised(t), &w, 0);
}

#[btf_tracepoint(function = "kfree_skb")]
pub fn flows_kfree_skb(ctx: BtfTracePointContext) -> i32 {
    let _ = try_kfree_skb(&ctx);
    0
}

#[inline(always)]
fn read<T>(base: *const u8, off: u32) -> Result<T, i32> {
    // SAFETY: bpf_probe_read_kernel faults safely on a bad address.
    unsafe { bpf_probe_read_kernel(base.wrapping_add(off as usize) as *const T) }
}

fn try_kfree_skb(ctx: &BtfTracePointContext) -> Result<(), i32> {
    // SAFETY: globals are set at load time and read-only afterwards.
    let off: KernelOffsets = unsafe { core::ptr::read_volatile(&OFFSETS) };
    if off.valid == 0 {
        return Ok(());
    }
    // tp_btf args: (struct sk_buff *skb, void *location, enum skb_drop_reason reason, ...)
    let skb: *const u8 = ctx.arg(0);
    let reason = ctx.arg::<u64>(2) as u32;

    // Another probe's namespaces (several share a kernel in the lab): checked first, as
    // it costs a few reads and a small map, where the tuple needs many and a large one.
    let mut netns_ino = 0;
    if unsafe { core::ptr::read_volatile(&DROP_NETNS_FILTER) } != 0 {
        let dev: *const u8 = read(skb, off.skb_dev)?;
        if dev.is_null() {
            return Ok(());
        }
        let net: *const u8 = read(dev, off.dev_nd_net)?;
        let ino: u32 = read(net, off.net_ns_inum)?;
        if unsafe { DROP_NETNS.get(&ino) }.is_none() {
            return Ok(());
        }
        netns_ino = ino;
    }

    let nh: u16 = read(skb, off.skb_network_header)?;
    if nh == 0xffff {
        return Ok(());
    }
    let head: *const u8 = read(skb, off.skb_head)?;
    let eth_proto = u16::from_be(read::<u16>(skb, off.skb_protocol)?);
    let ip = head.wrapping_add(nh as usize);

    let mut ev = RawEvent::zeroed();
    ev.netns_ino = netns_ino;
    let l4: *const u8;
    match eth_proto {
        ETH_P_IP => {
            let vihl: u8 = read(ip, 0)?;
            let ihl = ((vihl & 0x0f) as usize) * 4;
            if vihl >> 4 != 4 || ihl < 20 {
                return Ok(());
            }
            ev.tuple.proto = read(ip, 9)?;
            let s: [u8; 4] = read(ip, 12)?;
            let d: [u8; 4] = read(ip, 16)?;
            ev.tuple.saddr[..4].copy_from_slice(&s);
            ev.tuple.daddr[..4].copy_from_slice(&d);
            ev.tuple.family = AF_INET;
            l4 = ip.wrapping_add(ihl);
        }
        ETH_P_IPV6 => {
            // Extension headers are not walked here: drops of such packets are rare and
            // the transport header offset below covers the common case.
            ev.tuple.proto = read(ip, 6)?;
            ev.tuple.saddr = read(ip, 8)?;
            ev.tuple.daddr = read(ip, 24)?;
            ev.tuple.family = AF_INET6;
            let th: u16 = read(skb, off.skb_transport_header)?;
            l4 = if th != 0xffff && th > nh {
                head.wrapping_add(th as usize)
            } else {
                ip.wrapping_add(40)
            };
        }
        _ => return Ok(()),
    }
    match ev.tuple.proto {
        PROTO_TCP | PROTO_UDP | PROTO_SCTP => {
            ev.tuple.sport = u16::from_be(read::<u16>(l4, 0)?);
            ev.tuple.dport = u16::from_be(read::<u16>(l4, 2)?);
            if ev.tuple.proto == PROTO_TCP {
                ev.tcp_flags = read(l4, 13)?;
            }
        }
        PROTO_ICMP | PROTO_ICMPV6 => {
            ev.icmp_type = read(l4, 0)?;
            ev.icmp_code = read(l4, 1)?;
            let id = u16::from_be(read::<u16>(l4, 4)?);
            ev.tuple.sport = id;
            ev.tuple.dport = id;
        }
        _ => return Ok(()),
    }

    // Pod traffic only: a tuple the TC programs have seen.
    let w = match DROP_WATCH.get_ptr_mut(&normalised(&ev.tuple)) {
        Some(w) => w,
        None => return Ok(()),
    };

    // SAFETY: map value pointer valid until the program exits.
    let w = unsafe { &mut *w };
    if w.flags & WATCH_F_POLICY_DROP != 0 && (reason == tc_ingress_reason() || reason == tc_egress_reason()) {
        // Our own policy drop, already reported with its policies.
        return Ok(());
    }
    if w.reported_reason == reason {
        // Retransmissions of the same attempt dropped for the same reason.
        return Ok(());
    }
    w.reported_reason = reason;

    ev.ts_ns = unsafe { bpf_ktime_get_ns() };
    ev.kind = EVENT_DROP;
    ev.point = POINT_KERNEL_DROP;
    ev.drop_reason = reason;
    ev.pkt_len = read(skb, off.skb_len)?;
    count(counter::KERNEL_DROPS);
    let waiting = EVENTS.query(BPF_RB_AVAIL_DATA as u64) + RECORD_BYTES;
    if EVENTS.output::<RawEvent>(&ev, wakeup(waiting)).is_err() {
        count(counter::DROP_RINGBUF_FULL);
    }
    Ok(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
