//! flows kernel programs.
//!
//! * `flows_from_ep` / `flows_to_ep`: TC (TCX) classifiers on the host side of every pod
//!   veth; `flows_to_net` / `flows_from_net` on the node's uplink. They parse L2-L4, track
//!   connections per observation point in an LRU map and report each new connection
//!   attempt once through a ring buffer. Where policy is enforced (`flows_to_ep`,
//!   `flows_to_net`) they decide it, failing closed: a packet whose ports cannot be read
//!   is decided as a port no rule names (only rules without ports admit it).
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
    CtEntry, CtKey, CtOffsets, DIR_EGRESS, DIR_INGRESS, DropWatch, EP_EGRESS_ISOLATED, EP_INGRESS_ISOLATED,
    EVENT_DROP, EVENT_F_REPLY, EVENT_FLOW, EndpointValue, FlowTuple, IDENTITY_ANY, IDENTITY_WORLD,
    FragKey, FragValue, KernelOffsets, L4_KNOWN, L4_UNKNOWN_EXT_HEADERS, L4_UNKNOWN_FRAGMENT,
    L4_UNKNOWN_ICMP, L4_UNKNOWN_PROTOCOL, L4_UNKNOWN_TRUNCATED, MODE_ENFORCE, MODE_OFF, POINT_FROM_ENDPOINT, POINT_FROM_NETWORK,
    POINT_KERNEL_DROP, POINT_TO_ENDPOINT, POINT_TO_NETWORK, POLICY_EGRESS_ALLOWED,
    POLICY_EGRESS_EVALUATED, POLICY_ENDPOINT_UNKNOWN, POLICY_INGRESS_ALLOWED, POLICY_INGRESS_EVALUATED, PROTO_ICMP,
    PROTO_ICMPV6, PROTO_L4_UNKNOWN, PROTO_SCTP, PROTO_TCP, PROTO_UDP, PolicyKey, RAW_EVENT_SIZE, RawEvent, TCP_ACK, TCP_FIN,
    TCP_RST, TCP_SYN, VERDICT_ALLOWED, VERDICT_AUDIT, VERDICT_DENIED, VERDICT_NONE,
    WATCH_F_ORIG_SWAPPED, WATCH_F_POLICY_DROP, counter,
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

/// First fragments' ports by datagram, for the later fragments (which carry none).
#[map]
static FRAGMENTS: LruHashMap<FragKey, FragValue> = LruHashMap::with_max_entries(16_384, 0);

/// Key of UNKNOWN_PASSED.
#[repr(C)]
#[derive(Clone, Copy)]
struct UnknownPair {
    saddr: [u8; 16],
    daddr: [u8; 16],
    ifindex: u32,
}

/// Address pairs (source, destination, interface) between which a packet of unknown L4
/// passed recently: a new datagram coming back between them is probably its answer,
/// and is reported as a reply, not as an attempt of the answering pod.
#[map]
static UNKNOWN_PASSED: LruHashMap<UnknownPair, u64> = LruHashMap::with_max_entries(16_384, 0);

/// When a packet of unknown L4 last passed anywhere: the new-flow path looks in
/// UNKNOWN_PASSED only within DATAGRAM_IDLE_NS of it (one array read otherwise).
#[map]
static UNKNOWN_PASSED_AT: Array<u64> = Array::with_max_entries(1, 0);

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

/// The mode for a pod behind one of this node's interfaces that the policy does not
/// know yet: MODE_OFF (open: no policy source) until user space has a policy, then the
/// node's default mode, so a new pod is closed until its policy arrives.
#[map]
static UNKNOWN_ENDPOINT_MODE: Array<u8> = Array::with_max_entries(1, 0);

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

/// Set at load time from BTF (`valid` 0: no conntrack types, nothing is read).
#[unsafe(no_mangle)]
static CT_OFFSETS: CtOffsets = CtOffsets {
    skb_nfct: 0,
    orig_src: 0,
    orig_sport: 0,
    orig_l3num: 0,
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
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;
/// VLAN tags skipped in the frame's data.
const MAX_VLAN_TAGS: usize = 2;
/// IPv6 extension headers walked; a longer chain leaves the packet's L4 unknown.
const MAX_IPV6_EXT: usize = 8;
/// How long a first fragment's ports are kept for its datagram's later fragments (the
/// kernel's reassembly timeout, net.ipv4.ipfrag_time, is 30 s).
const FRAGMENT_TTL_NS: u64 = 30_000_000_000;

#[inline(always)]
fn count(idx: u32) {
    if let Some(p) = COUNTERS.get_ptr_mut(idx) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *p += 1 };
    }
}

/// What the parser extracted from one packet.
struct Packet {
    /// With `l4_unknown` set, ports are 0 and `proto` is the last protocol read.
    tuple: FlowTuple,
    tcp_flags: u8,
    icmp_type: u8,
    icmp_code: u8,
    /// `ICMP_*`: what kind of ICMP message this is, when it is one.
    icmp: u8,
    /// `FRAG_*`, and the datagram's identification when fragmented.
    frag: u8,
    frag_id: u32,
    /// Offset of the transport header in the frame.
    l4: usize,
}

/// Kinds of ICMP message ([`Packet::icmp`]).
const ICMP_NONE: u8 = 0;
/// Echo request or reply: tracked as an attempt (the identifier as both ports).
const ICMP_ECHO: u8 = 1;
/// An error quoting a packet: it follows the quoted connection's verdict.
const ICMP_ERROR: u8 = 2;
/// Neighbour discovery and multicast listener messages: the link's, never judged.
const ICMP_LINK: u8 = 3;

/// Fragmentation of a packet ([`Packet::frag`]).
const FRAG_NONE: u8 = 0;
/// Offset 0 with more to come: carries the transport header.
const FRAG_FIRST: u8 = 1;
/// A later fragment: no transport header of its own.
const FRAG_LATER: u8 = 2;

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
    let mut pkt = Packet {
        tuple: FlowTuple::zeroed(),
        tcp_flags: 0,
        icmp_type: 0,
        icmp_code: 0,
        icmp: ICMP_NONE,
        frag: FRAG_NONE,
        frag_id: 0,
        l4: 0,
    };
    let parsed = parse(ctx, &mut pkt);
    if parsed != PARSED {
        // No IP header to go by (not IP, or one the kernel's IP layer drops itself):
        // passed and counted.
        count(parsed);
        return TC_ACT_OK;
    }
    // SAFETY: the context's skb pointer is valid for the program's lifetime.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    if pkt.frag == FRAG_LATER {
        follow_first_fragment(&mut pkt);
    }
    match pkt.icmp {
        // The link's own traffic: never judged (IPv6 stops working without it).
        ICMP_LINK => {
            count(counter::REPLIES);
            return TC_ACT_OK;
        }
        ICMP_ERROR => match icmp_error_verdict(ctx, &pkt, ifindex) {
            RELATED_ALLOWED => {
                count(counter::ICMP_RELATED);
                return TC_ACT_OK;
            }
            RELATED_DENIED => {
                count(counter::ICMP_RELATED);
                count(counter::POLICY_DENIED_PACKETS);
                return TC_ACT_SHOT;
            }
            _ => pkt.tuple.l4_unknown = L4_UNKNOWN_ICMP,
        },
        _ => {}
    }
    if pkt.tuple.l4_unknown != L4_KNOWN {
        count(match pkt.tuple.l4_unknown {
            L4_UNKNOWN_EXT_HEADERS => counter::IPV6_EXT_TOO_DEEP,
            L4_UNKNOWN_FRAGMENT => counter::FRAGMENTS,
            L4_UNKNOWN_TRUNCATED => counter::L4_TRUNCATED,
            L4_UNKNOWN_ICMP => counter::ICMP_UNRELATED,
            _ => counter::OTHER_PROTO,
        });
        // One attempt for every such packet between the two addresses (per protocol and
        // reason), decided with the protocol of unknown L4.
        pkt.tuple.sport = 0;
        pkt.tuple.dport = 0;
        pkt.tcp_flags = 0;
    }
    if point == POINT_TO_NETWORK && unmasquerade(ctx, &mut pkt.tuple) {
        count(counter::UNMASQUERADED);
    }
    let action = track(ctx, point, &pkt, ifindex);
    if pkt.frag == FRAG_FIRST && pkt.tuple.l4_unknown == L4_KNOWN {
        remember_first_fragment(&pkt);
    }
    if action == TC_ACT_OK && pkt.tuple.l4_unknown != L4_KNOWN && pkt.tuple.l4_unknown != L4_UNKNOWN_ICMP {
        note_unknown_passed(&pkt.tuple, ifindex);
    }
    action
}

/// conntrack's flag in `_nfct`'s low bits for packets of the reply direction
/// (IP_CT_IS_REPLY: ctinfo 3 and above).
const IP_CT_IS_REPLY: u64 = 3;
/// `_nfct` holds the entry's address with the ctinfo in its 3 low bits.
const NFCT_INFOMASK: u64 = 7;
const NFPROTO_IPV4: u16 = 2;
const NFPROTO_IPV6: u16 = 10;

/// A packet leaving the node whose source was translated on the way (the CNI's
/// masquerade towards the world) carries the node's address by now; its conntrack entry
/// still has the pod's. Puts the pod's address and port back into the tuple, so egress
/// is decided for the pod that sent it and the record names that pod. False (the
/// tuple untouched) when the packet was not translated, belongs to the reply
/// direction, or did not come from a pod the policy knows.
#[inline(never)]
fn unmasquerade(ctx: &TcContext, t: &mut FlowTuple) -> bool {
    // SAFETY: globals are set at load time and read-only afterwards.
    let off: CtOffsets = unsafe { core::ptr::read_volatile(&CT_OFFSETS) };
    if off.valid == 0 {
        return false;
    }
    let skb = ctx.skb.skb as *const u8;
    let Ok(nfct) = read::<u64>(skb, off.skb_nfct) else { return false };
    if nfct == 0 || nfct & NFCT_INFOMASK >= IP_CT_IS_REPLY {
        return false;
    }
    let ct = (nfct & !NFCT_INFOMASK) as *const u8;
    let Ok(l3num) = read::<u16>(ct, off.orig_l3num) else { return false };
    let family_matches = match t.family {
        AF_INET => l3num == NFPROTO_IPV4,
        AF_INET6 => l3num == NFPROTO_IPV6,
        _ => false,
    };
    if !family_matches {
        return false;
    }
    let Ok(src) = read::<[u8; 16]>(ct, off.orig_src) else { return false };
    if src == t.saddr || unsafe { ENDPOINTS.get(&addr_key(&src, t.family)) }.is_none() {
        return false;
    }
    let Ok(sport) = read::<u16>(ct, off.orig_sport) else { return false };
    t.saddr = src;
    match t.proto {
        // An echo's identifier is both of its ports, and masquerade may change it too.
        PROTO_ICMP | PROTO_ICMPV6 if t.l4_unknown == L4_KNOWN => {
            t.sport = u16::from_be(sport);
            t.dport = u16::from_be(sport);
        }
        PROTO_TCP | PROTO_UDP | PROTO_SCTP if t.l4_unknown == L4_KNOWN => t.sport = u16::from_be(sport),
        _ => {}
    }
    true
}

#[inline(always)]
fn load<T>(ctx: &TcContext, off: usize) -> Result<T, u32> {
    ctx.load::<T>(off).map_err(|_| counter::MALFORMED)
}

/// Whether `len` bytes at `off` lie inside both the IP datagram and the frame.
#[inline(always)]
fn fits(ctx: &TcContext, off: usize, len: usize, ip_end: usize) -> bool {
    off + len <= ip_end && off + len <= ctx.len() as usize
}

/// `parse` succeeded (any other value is the counter saying why not).
const PARSED: u32 = u32::MAX;

/// Fills `pkt` from the frame.
#[inline(always)]
fn parse(ctx: &TcContext, pkt: &mut Packet) -> u32 {
    match try_parse(ctx, pkt) {
        Ok(()) => PARSED,
        Err(c) => c,
    }
}

#[inline(always)]
fn try_parse(ctx: &TcContext, pkt: &mut Packet) -> Result<(), u32> {
    let mut l3 = ETH_HLEN;
    let mut eth_proto = u16::from_be(load::<u16>(ctx, 12)?);
    // VLAN tags still in the frame (the kernel takes the outer one into metadata before
    // TC; a second one stays): the IP packet behind them is judged like any other.
    for _ in 0..MAX_VLAN_TAGS {
        if eth_proto != ETH_P_8021Q && eth_proto != ETH_P_8021AD {
            break;
        }
        eth_proto = u16::from_be(load::<u16>(ctx, l3 + 2)?);
        l3 += 4;
    }
    let ip_end = match eth_proto {
        ETH_P_IP => parse_ipv4(ctx, l3, pkt)?,
        ETH_P_IPV6 => parse_ipv6(ctx, l3, pkt)?,
        _ => return Err(counter::NON_IP),
    };
    if pkt.tuple.l4_unknown != L4_KNOWN {
        return Ok(());
    }
    if pkt.frag == FRAG_LATER {
        pkt.tuple.l4_unknown = L4_UNKNOWN_FRAGMENT;
        return Ok(());
    }
    parse_l4(ctx, ip_end, pkt);
    Ok(())
}

/// The IPv4 header; returns where the datagram ends.
#[inline(always)]
fn parse_ipv4(ctx: &TcContext, l3: usize, pkt: &mut Packet) -> Result<usize, u32> {
    let vihl: u8 = load(ctx, l3)?;
    let ihl = ((vihl & 0x0f) as usize) * 4;
    let total = u16::from_be(load::<u16>(ctx, l3 + 2)?) as usize;
    if vihl >> 4 != 4 || ihl < 20 || total < ihl {
        return Err(counter::MALFORMED);
    }
    let frag = u16::from_be(load::<u16>(ctx, l3 + 6)?);
    if frag & 0x3fff != 0 {
        pkt.frag = if frag & 0x1fff != 0 { FRAG_LATER } else { FRAG_FIRST };
        pkt.frag_id = u16::from_be(load::<u16>(ctx, l3 + 4)?) as u32;
    }
    pkt.tuple.proto = load(ctx, l3 + 9)?;
    let s: [u8; 4] = load(ctx, l3 + 12)?;
    let d: [u8; 4] = load(ctx, l3 + 16)?;
    pkt.tuple.saddr[..4].copy_from_slice(&s);
    pkt.tuple.daddr[..4].copy_from_slice(&d);
    pkt.tuple.family = AF_INET;
    pkt.l4 = l3 + ihl;
    Ok(l3 + total)
}

/// The IPv6 header and its extension headers; returns where the datagram ends.
#[inline(always)]
fn parse_ipv6(ctx: &TcContext, l3: usize, pkt: &mut Packet) -> Result<usize, u32> {
    let v: u8 = load(ctx, l3)?;
    if v >> 4 != 6 {
        return Err(counter::MALFORMED);
    }
    let payload = u16::from_be(load::<u16>(ctx, l3 + 4)?) as usize;
    pkt.tuple.saddr = load(ctx, l3 + 8)?;
    pkt.tuple.daddr = load(ctx, l3 + 24)?;
    pkt.tuple.family = AF_INET6;
    pkt.l4 = l3 + 40;
    // A zero payload length is a jumbogram's: the frame's end is the datagram's.
    let ip_end = if payload == 0 { ctx.len() as usize } else { l3 + 40 + payload };
    if skip_ipv6_ext(ctx, load(ctx, l3 + 6)?, pkt, ip_end).is_err() {
        // A header of the chain cut short: as good as a truncated transport header.
        pkt.tuple.l4_unknown = L4_UNKNOWN_TRUNCATED;
    }
    Ok(ip_end)
}

/// Walks IPv6 extension headers: sets the upper-layer protocol and its offset, the
/// fragment header's facts, or `L4_UNKNOWN_EXT_HEADERS` (the protocol is then the
/// header the walk stopped at).
#[inline(always)]
fn skip_ipv6_ext(ctx: &TcContext, mut next: u8, pkt: &mut Packet, ip_end: usize) -> Result<(), u32> {
    let mut off = pkt.l4;
    for _ in 0..MAX_IPV6_EXT {
        let len = match next {
            // Hop-by-hop, routing, destination options: length in 8-octet units, minus one.
            0 | 43 | 60 => (load::<u8>(ctx, off + 1)? as usize + 1) * 8,
            // Fragment header: fixed 8 bytes.
            44 => {
                let frag = u16::from_be(load::<u16>(ctx, off + 2)?);
                pkt.frag_id = u32::from_be(load::<u32>(ctx, off + 4)?);
                if frag & 0xfff8 != 0 {
                    // A later fragment: what follows is the middle of a datagram.
                    pkt.frag = FRAG_LATER;
                    pkt.tuple.proto = load(ctx, off)?;
                    pkt.l4 = off + 8;
                    return Ok(());
                }
                if frag & 1 != 0 {
                    pkt.frag = FRAG_FIRST;
                }
                8
            }
            // Authentication header: length in 4-octet units, minus two.
            51 => (load::<u8>(ctx, off + 1)? as usize + 2) * 4,
            _ => {
                pkt.tuple.proto = next;
                pkt.l4 = off;
                return Ok(());
            }
        };
        if !fits(ctx, off, len, ip_end) {
            return Err(counter::MALFORMED);
        }
        next = load(ctx, off)?;
        off += len;
    }
    pkt.tuple.proto = next;
    pkt.l4 = off;
    if matches!(next, 0 | 43 | 60 | 44 | 51) {
        pkt.tuple.l4_unknown = L4_UNKNOWN_EXT_HEADERS;
    }
    Ok(())
}

/// The transport header: ports, TCP flags, ICMP type; or why it cannot be read.
#[inline(always)]
fn parse_l4(ctx: &TcContext, ip_end: usize, pkt: &mut Packet) {
    let l4 = pkt.l4;
    let need = match pkt.tuple.proto {
        PROTO_TCP => 20,
        PROTO_UDP => 8,
        PROTO_SCTP => 12,
        PROTO_ICMP | PROTO_ICMPV6 => 8,
        _ => {
            pkt.tuple.l4_unknown = L4_UNKNOWN_PROTOCOL;
            return;
        }
    };
    if !fits(ctx, l4, need, ip_end) {
        // A first fragment must carry the whole header (RFC 1858's tiny fragments).
        pkt.tuple.l4_unknown = if pkt.frag == FRAG_FIRST {
            L4_UNKNOWN_FRAGMENT
        } else {
            L4_UNKNOWN_TRUNCATED
        };
        return;
    }
    if parse_l4_fields(ctx, pkt).is_err() {
        pkt.tuple.l4_unknown = L4_UNKNOWN_TRUNCATED;
    }
}

#[inline(always)]
fn parse_l4_fields(ctx: &TcContext, pkt: &mut Packet) -> Result<(), u32> {
    let l4 = pkt.l4;
    match pkt.tuple.proto {
        PROTO_TCP | PROTO_UDP | PROTO_SCTP => {
            pkt.tuple.sport = u16::from_be(load::<u16>(ctx, l4)?);
            pkt.tuple.dport = u16::from_be(load::<u16>(ctx, l4 + 2)?);
            if pkt.tuple.proto == PROTO_TCP {
                pkt.tcp_flags = load(ctx, l4 + 13)?;
            }
        }
        proto => {
            pkt.icmp_type = load(ctx, l4)?;
            pkt.icmp_code = load(ctx, l4 + 1)?;
            pkt.icmp = icmp_kind(proto, pkt.icmp_type);
            if pkt.icmp == ICMP_ECHO {
                // The echo identifier plays the role of both ports, so a request and its
                // reply map onto one conntrack entry.
                let id = u16::from_be(load::<u16>(ctx, l4 + 4)?);
                pkt.tuple.sport = id;
                pkt.tuple.dport = id;
            } else if pkt.icmp == ICMP_NONE {
                pkt.tuple.l4_unknown = L4_UNKNOWN_ICMP;
            }
        }
    }
    Ok(())
}

#[inline(always)]
fn icmp_kind(proto: u8, ty: u8) -> u8 {
    if proto == PROTO_ICMP {
        match ty {
            0 | 8 => ICMP_ECHO,
            // Destination unreachable, source quench, redirect, time exceeded, parameter
            // problem: each quotes the packet it is about.
            3 | 4 | 5 | 11 | 12 => ICMP_ERROR,
            _ => ICMP_NONE,
        }
    } else {
        match ty {
            128 | 129 => ICMP_ECHO,
            1..=4 => ICMP_ERROR,
            // Multicast listener, router and neighbour discovery, inverse discovery,
            // SEND, multicast router discovery.
            130..=137 | 141..=143 | 148..=153 => ICMP_LINK,
            _ => ICMP_NONE,
        }
    }
}

/// How an ICMP error relates to the connections tracked at this point.
const UNRELATED: u8 = 0;
const RELATED_ALLOWED: u8 = 1;
const RELATED_DENIED: u8 = 2;

/// The verdict of the connection an ICMP error quotes, when that connection is tracked
/// at this interface. Out of line: the quoted tuple needs stack of its own.
#[inline(never)]
fn icmp_error_verdict(ctx: &TcContext, pkt: &Packet, ifindex: u32) -> u8 {
    let mut key = CtKey {
        tuple: FlowTuple::zeroed(),
        ifindex,
    };
    if quoted_tuple(ctx, pkt, &mut key.tuple).is_err() {
        return UNRELATED;
    }
    if must_swap(&key.tuple) {
        key.tuple = key.tuple.reversed();
    }
    match unsafe { CONNTRACK.get(&key) } {
        Some(e) if e.flags & CT_F_DENIED != 0 => RELATED_DENIED,
        Some(_) => RELATED_ALLOWED,
        None => UNRELATED,
    }
}

/// The tuple of the packet an ICMP error quotes (its IP header and the first 8 bytes
/// of its transport header, after the error's own 8 bytes).
#[inline(always)]
fn quoted_tuple(ctx: &TcContext, pkt: &Packet, t: &mut FlowTuple) -> Result<(), u32> {
    let ip = pkt.l4 + 8;
    let l4 = if pkt.tuple.family == AF_INET {
        let vihl: u8 = load(ctx, ip)?;
        if vihl >> 4 != 4 {
            return Err(counter::MALFORMED);
        }
        t.proto = load(ctx, ip + 9)?;
        let s: [u8; 4] = load(ctx, ip + 12)?;
        let d: [u8; 4] = load(ctx, ip + 16)?;
        t.saddr[..4].copy_from_slice(&s);
        t.daddr[..4].copy_from_slice(&d);
        ip + ((vihl & 0x0f) as usize) * 4
    } else {
        // The quoted packet's extension headers are not walked: such an error counts
        // as unrelated.
        t.proto = load(ctx, ip + 6)?;
        t.saddr = load(ctx, ip + 8)?;
        t.daddr = load(ctx, ip + 24)?;
        ip + 40
    };
    t.family = pkt.tuple.family;
    match t.proto {
        PROTO_TCP | PROTO_UDP | PROTO_SCTP => {
            t.sport = u16::from_be(load::<u16>(ctx, l4)?);
            t.dport = u16::from_be(load::<u16>(ctx, l4 + 2)?);
        }
        PROTO_ICMP | PROTO_ICMPV6 => {
            let id = u16::from_be(load::<u16>(ctx, l4 + 4)?);
            t.sport = id;
            t.dport = id;
        }
        _ => return Err(counter::OTHER_PROTO),
    }
    Ok(())
}

/// A later fragment takes the ports of its datagram's first fragment (seen at most
/// `FRAGMENT_TTL_NS` ago), and with them that connection's verdict; without one it
/// stays L4 unknown.
#[inline(never)]
fn follow_first_fragment(pkt: &mut Packet) {
    let key = frag_key(pkt);
    if let Some(v) = unsafe { FRAGMENTS.get(&key) } {
        let now = unsafe { bpf_ktime_get_ns() };
        if now.saturating_sub(v.seen_ns) <= FRAGMENT_TTL_NS {
            pkt.tuple.sport = v.sport;
            pkt.tuple.dport = v.dport;
            pkt.tuple.l4_unknown = L4_KNOWN;
            count(counter::FRAGMENTS_FOLLOWED);
        }
    }
}

#[inline(never)]
fn remember_first_fragment(pkt: &Packet) {
    let v = FragValue {
        seen_ns: unsafe { bpf_ktime_get_ns() },
        sport: pkt.tuple.sport,
        dport: pkt.tuple.dport,
        _pad: 0,
    };
    let _ = FRAGMENTS.insert(&frag_key(pkt), &v, 0);
}

#[inline(always)]
fn frag_key(pkt: &Packet) -> FragKey {
    FragKey {
        saddr: pkt.tuple.saddr,
        daddr: pkt.tuple.daddr,
        id: pkt.frag_id,
        proto: pkt.tuple.proto,
        family: pkt.tuple.family,
        _pad: [0; 2],
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
    // A packet of unknown L4 is decided as NetworkPolicy decides one of unknown port:
    // only rules without ports have entries for PROTO_L4_UNKNOWN.
    let (proto, port) = match t.proto {
        _ if t.l4_unknown != L4_KNOWN => (PROTO_L4_UNKNOWN, 0),
        PROTO_TCP | PROTO_UDP | PROTO_SCTP => (t.proto, dport),
        p => (p, 0),
    };
    let mut denied = false;
    let mut enforce = false;
    if ingress {
        if let Some(ep) = unsafe { ENDPOINTS.get(&addr_key(dst, t.family)) } {
            if ep.mode != MODE_OFF {
                let (evaluated, allowed, set) =
                    side(ep, DIR_INGRESS, identity_of(src, t.family), proto, port);
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
        } else {
            let mode = UNKNOWN_ENDPOINT_MODE.get(0).copied().unwrap_or(MODE_OFF);
            if mode != MODE_OFF {
                v.policy |= POLICY_INGRESS_EVALUATED | POLICY_ENDPOINT_UNKNOWN;
                denied = true;
                enforce |= mode == MODE_ENFORCE;
            }
        }
    }
    if let Some(ep) = unsafe { ENDPOINTS.get(&addr_key(src, t.family)) } {
        if ep.mode != MODE_OFF {
            let (evaluated, allowed, set) =
                side(ep, DIR_EGRESS, identity_of(dst, t.family), proto, port);
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
fn track(ctx: &TcContext, point: u8, pkt: &Packet, ifindex: u32) -> i32 {
    let now = unsafe { bpf_ktime_get_ns() };
    // Without its header a TCP packet has no flags to go by: tracked like a datagram.
    let tcp = pkt.tuple.proto == PROTO_TCP && pkt.tuple.l4_unknown == L4_KNOWN;
    let fin_rst = pkt.tcp_flags & (TCP_FIN | TCP_RST) != 0;
    let rev = policy_rev();

    // One lookup for both directions: the key is the normalised tuple, and the entry says
    // which way the connection goes.
    // In place: the stack has no room for another copy of the tuple.
    let mut key = CtKey {
        tuple: pkt.tuple,
        ifindex,
    };
    // An ICMP message of no tracked connection answers nothing and is answered by
    // nothing: each direction is its own attempt, decided on its own.
    let swapped = pkt.tuple.l4_unknown != L4_UNKNOWN_ICMP && must_swap(&key.tuple);
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
        let flags = if !tcp && answers_unknown(&pkt.tuple, ifindex, now) { EVENT_F_REPLY } else { 0 };
        emit_flow(ctx, point, pkt, ifindex, now, flags, &v);
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
    let flags = if v.verdict != VERDICT_NONE && answers_unknown(&pkt.tuple, key.ifindex, now) {
        EVENT_F_REPLY
    } else {
        0
    };
    match v.verdict {
        VERDICT_DENIED => {
            count(counter::POLICY_DENIED);
            emit_flow(ctx, point, pkt, key.ifindex, now, flags, &v);
            TC_ACT_SHOT
        }
        VERDICT_AUDIT => {
            count(counter::POLICY_AUDIT);
            emit_flow(ctx, point, pkt, key.ifindex, now, flags, &v);
            TC_ACT_OK
        }
        _ => TC_ACT_OK,
    }
}

/// Remembers that a packet of unknown L4 passed from `t.saddr` to `t.daddr` here.
#[inline(never)]
fn note_unknown_passed(t: &FlowTuple, ifindex: u32) {
    let now = unsafe { bpf_ktime_get_ns() };
    let pair = UnknownPair {
        saddr: t.saddr,
        daddr: t.daddr,
        ifindex,
    };
    // Refreshed at most once a second: a tunnel's every packet need not write the map.
    if let Some(seen) = UNKNOWN_PASSED.get_ptr_mut(&pair) {
        // SAFETY: map value pointer valid until the program exits.
        let seen = unsafe { &mut *seen };
        if now.saturating_sub(*seen) < 1_000_000_000 {
            return;
        }
        *seen = now;
    } else {
        let _ = UNKNOWN_PASSED.insert(&pair, &now, 0);
    }
    if let Some(p) = UNKNOWN_PASSED_AT.get_ptr_mut(0) {
        // SAFETY: array slot pointer valid until the program exits; a racing writer
        // stores a time just as recent.
        unsafe { *p = now };
    }
}

/// Whether a packet that looks like a new attempt from `t.saddr` goes back to where a
/// packet of unknown L4 came from recently: then it is most likely that packet's answer
/// (an attempt the datapath could not read), and the record must not blame its sender.
#[inline(never)]
fn answers_unknown(t: &FlowTuple, ifindex: u32, now: u64) -> bool {
    let last = UNKNOWN_PASSED_AT.get(0).copied().unwrap_or(0);
    if last == 0 || now.saturating_sub(last) > DATAGRAM_IDLE_NS {
        return false;
    }
    let pair = UnknownPair {
        saddr: t.daddr,
        daddr: t.saddr,
        ifindex,
    };
    match unsafe { UNKNOWN_PASSED.get(&pair) } {
        Some(seen) => now.saturating_sub(*seen) <= DATAGRAM_IDLE_NS,
        None => false,
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
    let swapped = must_swap(t);
    let w = DropWatch {
        reported_reason: 0,
        // Which way the attempt goes, so a drop of its answer is reported as a reply.
        flags: if swapped { WATCH_F_ORIG_SWAPPED } else { 0 },
        last_seen_ns: now,
    };
    let key = if swapped { t.reversed() } else { *t };
    let _ = DROP_WATCH.insert(&key, &w, 0);
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
    if must_swap(&ev.tuple) != (w.flags & WATCH_F_ORIG_SWAPPED != 0) {
        // Against the attempt's direction: its answer (the kernel dropped a reply).
        ev.flags = EVENT_F_REPLY;
    }

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
