//! Types shared by the flows eBPF programs and user space.
//!
//! Every type here crosses the kernel/user boundary (map keys and values, ring buffer
//! records), so each is `#[repr(C)]` with explicit padding: the layout must be the same
//! on both sides and padding bytes must be initialised (the verifier and hash maps see them).
#![no_std]

/// Address family values carried in events (the kernel's AF_* numbers).
pub const AF_INET: u8 = 2;
pub const AF_INET6: u8 = 10;

/// IP protocol numbers the datapath understands.
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;
pub const PROTO_SCTP: u8 = 132;

/// The protocol of policy keys that decide packets whose transport protocol or ports
/// could not be established ([`FlowTuple::l4_unknown`]): only NetworkPolicy rules
/// without `ports` admit them, so only those rules have entries with it. (255 is
/// reserved by IANA: no packet carries it.)
pub const PROTO_L4_UNKNOWN: u8 = 255;

/// Why a packet's transport header could not be established ([`FlowTuple::l4_unknown`]).
/// Such a packet is decided as NetworkPolicy decides a packet of unknown port: only a
/// rule without `ports` that admits the peer lets it through.
pub const L4_KNOWN: u8 = 0;
/// An IPv6 extension-header chain longer than the datapath walks.
pub const L4_UNKNOWN_EXT_HEADERS: u8 = 1;
/// A fragment without the transport header: a later fragment whose first fragment was
/// not seen, or a first fragment too short to hold the header.
pub const L4_UNKNOWN_FRAGMENT: u8 = 2;
/// The transport header is cut short (by the IP length or the packet's end).
pub const L4_UNKNOWN_TRUNCATED: u8 = 3;
/// An IP protocol without ports that flows reads (GRE, IPIP, ESP, AH, ...).
pub const L4_UNKNOWN_PROTOCOL: u8 = 4;
/// An ICMP message that is no echo, no neighbour discovery and no error about a
/// connection tracked at this point.
pub const L4_UNKNOWN_ICMP: u8 = 5;

/// Where an event was observed.
///
/// The TC programs sit on the *host* side of a pod's veth: traffic the pod sends arrives
/// at that interface's ingress hook, traffic for the pod leaves through its egress hook.
pub const POINT_FROM_ENDPOINT: u8 = 1;
pub const POINT_TO_ENDPOINT: u8 = 2;
/// The kernel freed the packet with a drop reason (`skb:kfree_skb`).
pub const POINT_KERNEL_DROP: u8 = 3;
/// Leaving the node: the egress hook of the node's uplink, after kube-proxy's DNAT, where
/// the egress policy of a local pod towards other nodes and the world is enforced.
pub const POINT_TO_NETWORK: u8 = 4;
/// Entering the node through its uplink (tracked only, so replies are recognised).
pub const POINT_FROM_NETWORK: u8 = 5;

/// Values of [`RawEvent::verdict`].
pub const VERDICT_NONE: u8 = 0;
pub const VERDICT_ALLOWED: u8 = 1;
pub const VERDICT_DENIED: u8 = 2;
pub const VERDICT_AUDIT: u8 = 3;

/// Bits of [`RawEvent::policy`].
pub const POLICY_INGRESS_EVALUATED: u8 = 1 << 0;
pub const POLICY_INGRESS_ALLOWED: u8 = 1 << 1;
pub const POLICY_EGRESS_EVALUATED: u8 = 1 << 2;
pub const POLICY_EGRESS_ALLOWED: u8 = 1 << 3;
/// With POLICY_INGRESS_EVALUATED: the destination, a pod behind this interface, is not
/// in the policy yet (a pod newer than the policy the probe holds). It is decided as
/// closed, with the node's default mode, until the policy names it.
pub const POLICY_ENDPOINT_UNKNOWN: u8 = 1 << 4;

/// Enforcement modes of an endpoint (its namespace's).
pub const MODE_OFF: u8 = 0;
pub const MODE_AUDIT: u8 = 1;
pub const MODE_ENFORCE: u8 = 2;

/// Bits of [`EndpointValue::flags`].
pub const EP_INGRESS_ISOLATED: u8 = 1 << 0;
pub const EP_EGRESS_ISOLATED: u8 = 1 << 1;

/// A local pod address: which endpoint it is and how policy applies to it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointValue {
    pub endpoint: u32,
    pub mode: u8,
    pub flags: u8,
    pub _pad: [u8; 2],
    /// Policy sets isolating each direction (reported when a side denies).
    pub ingress_isolation: u32,
    pub egress_isolation: u32,
}

/// Policy directions in [`PolicyKey`].
pub const DIR_INGRESS: u8 = 1;
pub const DIR_EGRESS: u8 = 2;

/// The data of a policy LPM key: fixed fields first, the port last so that a port
/// range is a set of prefixes. All multi-byte fields big-endian (LPM compares bits in
/// memory order). Full length: 96 bits.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyKey {
    pub endpoint_be: u32,
    pub identity_be: u32,
    pub direction: u8,
    pub proto: u8,
    pub port_be: u16,
}

/// Bits of the policy key before the port.
pub const POLICY_KEY_FIXED_BITS: u32 = 80;

/// Identity of peers no ipcache entry names (the default routes make this rare).
pub const IDENTITY_WORLD: u32 = 2;
/// Identity of "any peer" entries (rules without from/to).
pub const IDENTITY_ANY: u32 = 0;

/// Event kinds in the ring buffer.
pub const EVENT_FLOW: u8 = 1;
pub const EVENT_DROP: u8 = 2;

/// Bits of [`RawEvent::flags`].
pub const EVENT_F_REPLY: u8 = 1 << 0;

/// TCP flag bits as on the wire (byte 13 of the TCP header).
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;
pub const TCP_URG: u8 = 0x20;
pub const TCP_ECE: u8 = 0x40;
pub const TCP_CWR: u8 = 0x80;

/// A connection as seen at one observation point (interface + hook): conntrack key.
///
/// Addresses are 16 bytes; IPv4 addresses use the first 4 and zero the rest. For ICMP
/// echo the identifier is used as both ports so request and reply map onto one entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowTuple {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub family: u8,
    /// `L4_*`: 0 when the ports are the packet's; otherwise why they could not be read
    /// (the ports are then 0, and the tuple stands for every such packet between the two
    /// addresses: one attempt, tracked like a datagram flow).
    pub l4_unknown: u8,
    pub _pad: u8,
}

impl FlowTuple {
    pub const fn zeroed() -> Self {
        FlowTuple {
            saddr: [0; 16],
            daddr: [0; 16],
            sport: 0,
            dport: 0,
            proto: 0,
            family: 0,
            l4_unknown: 0,
            _pad: 0,
        }
    }

    /// The same connection seen from the other side.
    pub const fn reversed(&self) -> Self {
        FlowTuple {
            saddr: self.daddr,
            daddr: self.saddr,
            sport: self.dport,
            dport: self.sport,
            proto: self.proto,
            family: self.family,
            l4_unknown: self.l4_unknown,
            _pad: 0,
        }
    }
}

/// Conntrack key: the connection's tuple, direction-normalised (the smaller address
/// first), so one lookup finds it from a packet going either way; plus the interface,
/// because one connection is reported once at *each* observation point it crosses.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtKey {
    pub tuple: FlowTuple,
    pub ifindex: u32,
}

/// Bits of [`CtEntry::flags`].
pub const CT_F_REPLY_SEEN: u32 = 1 << 0;
/// A FIN or RST was seen: a later SYN on the same tuple is a new attempt.
pub const CT_F_CLOSING: u32 = 1 << 1;
/// Created from a mid-stream packet (the probe started after the connection did):
/// tracked so replies are recognised, but never reported as an attempt.
pub const CT_F_NO_EVENT: u32 = 1 << 2;
/// Policy denied the connection (enforce mode): its packets are dropped.
pub const CT_F_DENIED: u32 = 1 << 3;
/// Policy was evaluated for the connection at this point (at `CtEntry::rev`).
pub const CT_F_EVALUATED: u32 = 1 << 4;
/// First seen mid-stream and allowed as the reply side of a connection the peer opened:
/// it is decided again in that direction.
pub const CT_F_AS_REPLY: u32 = 1 << 5;
/// The connection's first packet had its tuple swapped to make the key: a packet is going
/// the connection's way when normalising its tuple swaps it the same.
pub const CT_F_ORIG_SWAPPED: u32 = 1 << 6;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtEntry {
    pub created_ns: u64,
    pub last_seen_ns: u64,
    pub packets_orig: u32,
    pub packets_reply: u32,
    pub flags: u32,
    /// Policy revision the connection was evaluated at: a newer revision re-evaluates it.
    pub rev: u32,
}

/// Key of the per-probe map of tuples seen at pod interfaces, used to decide whether a
/// kernel drop concerns pod traffic (direction-normalised: the smaller address first).
pub type DropWatchKey = FlowTuple;

/// Key of the map of first fragments: the fields that identify one IP datagram's
/// fragments (RFC 791, RFC 8200), so later fragments follow the first one's tuple.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// Identification: 16 bits for IPv4, 32 for IPv6.
    pub id: u32,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

/// What the first fragment of a datagram carried.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FragValue {
    pub seen_ns: u64,
    pub sport: u16,
    pub dport: u16,
    pub _pad: u32,
}

/// Value of the drop watch map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DropWatch {
    /// Drop reason already reported for this tuple (0 = none yet): one report per attempt,
    /// not one per retransmission.
    pub reported_reason: u32,
    /// `WATCH_F_*`.
    pub flags: u32,
    pub last_seen_ns: u64,
}

/// The TC program dropped this tuple for policy and reported it: the kernel's own
/// report of that drop (reason TC_INGRESS/TC_EGRESS) would repeat it.
pub const WATCH_F_POLICY_DROP: u32 = 1;
/// The attempt's first packet had its tuple swapped to make the key: a dropped packet
/// that normalises the other way is its answer.
pub const WATCH_F_ORIG_SWAPPED: u32 = 2;

/// One record in the ring buffer: 80 bytes, 8-aligned.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawEvent {
    /// CLOCK_MONOTONIC nanoseconds (bpf_ktime_get_ns).
    pub ts_ns: u64,
    pub kind: u8,
    pub point: u8,
    pub flags: u8,
    pub tcp_flags: u8,
    pub ifindex: u32,
    pub tuple: FlowTuple,
    pub icmp_type: u8,
    pub icmp_code: u8,
    /// `VERDICT_*`: what policy decided (0: no policy decision at this point).
    pub verdict: u8,
    /// `POLICY_*` bits: which sides were evaluated and allowed.
    pub policy: u8,
    /// Kernel `enum skb_drop_reason` value for drops; 0 otherwise.
    pub drop_reason: u32,
    /// Length of the packet on the wire (skb->len).
    pub pkt_len: u32,
    /// Network namespace inode of the device that dropped the packet (drops only).
    pub netns_ino: u32,
    /// Policy set ids (see the probe's compiled state): the policies that allowed the
    /// side, or, when it denied, the policies isolating it.
    pub ingress_set: u32,
    pub egress_set: u32,
}

impl RawEvent {
    pub const fn zeroed() -> Self {
        RawEvent {
            ts_ns: 0,
            kind: 0,
            point: 0,
            flags: 0,
            tcp_flags: 0,
            ifindex: 0,
            tuple: FlowTuple::zeroed(),
            icmp_type: 0,
            icmp_code: 0,
            verdict: 0,
            policy: 0,
            drop_reason: 0,
            pkt_len: 0,
            netns_ino: 0,
            ingress_set: 0,
            egress_set: 0,
        }
    }
}

pub const RAW_EVENT_SIZE: usize = core::mem::size_of::<RawEvent>();

/// Indices into the per-CPU `COUNTERS` array.
pub mod counter {
    /// Packets the TC programs looked at.
    pub const PACKETS: u32 = 0;
    /// New connection attempts reported.
    pub const NEW_FLOWS: u32 = 1;
    /// Packets recognised as replies.
    pub const REPLIES: u32 = 2;
    /// Events that did not fit in the ring buffer (lost, counted here).
    pub const RINGBUF_FULL: u32 = 3;
    /// Packets whose IP header cannot be read (passed: the kernel's IP layer drops them).
    pub const MALFORMED: u32 = 4;
    /// Non-IP frames (ARP, LLDP...): passed untouched.
    pub const NON_IP: u32 = 5;
    /// IP packets of a protocol without ports that flows reads (decided as L4 unknown).
    pub const OTHER_PROTO: u32 = 6;
    /// IPv6 packets whose extension-header chain was longer than we walk (L4 unknown).
    pub const IPV6_EXT_TOO_DEEP: u32 = 7;
    /// Kernel drops of pod traffic reported.
    pub const KERNEL_DROPS: u32 = 8;
    /// Kernel drop events that did not fit in the ring buffer.
    pub const DROP_RINGBUF_FULL: u32 = 9;
    /// Fragments without a transport header to go by (L4 unknown): later fragments whose
    /// first was not seen, first fragments too short for the header.
    pub const FRAGMENTS: u32 = 10;
    /// Connection attempts dropped by policy (enforce mode).
    pub const POLICY_DENIED: u32 = 11;
    /// Connection attempts policy would deny, let through (audit mode).
    pub const POLICY_AUDIT: u32 = 12;
    /// Packets of denied connections dropped after the first (retransmissions).
    pub const POLICY_DENIED_PACKETS: u32 = 13;
    /// Established connections re-evaluated after a policy change.
    pub const POLICY_REEVALUATED: u32 = 14;
    /// Packets whose transport header is cut short (L4 unknown).
    pub const L4_TRUNCATED: u32 = 15;
    /// Later fragments that followed their first fragment's tuple and verdict.
    pub const FRAGMENTS_FOLLOWED: u32 = 16;
    /// ICMP errors about a connection tracked at the point (its verdict applies).
    pub const ICMP_RELATED: u32 = 17;
    /// ICMP messages that are no echo, no neighbour discovery and no error of a tracked
    /// connection (L4 unknown).
    pub const ICMP_UNRELATED: u32 = 18;
    /// Packets leaving the node with a translated source (the CNI's masquerade towards
    /// the world) whose conntrack entry named a local pod: decided and reported as the
    /// pod's.
    pub const UNMASQUERADED: u32 = 19;
    pub const COUNT: u32 = 20;

    pub const NAMES: [&str; COUNT as usize] = [
        "packets",
        "new_flows",
        "replies",
        "ringbuf_full",
        "malformed",
        "non_ip",
        "other_proto",
        "ipv6_ext_too_deep",
        "kernel_drops",
        "drop_ringbuf_full",
        "fragments",
        "policy_denied",
        "policy_audit",
        "policy_denied_packets",
        "policy_reevaluated",
        "l4_truncated",
        "fragments_followed",
        "icmp_related",
        "icmp_unrelated",
        "unmasqueraded",
    ];
}

/// Where a packet's conntrack entry is and where in it the connection's original source
/// lies (from BTF: `sk_buff._nfct`, `nf_conn.tuplehash[IP_CT_DIR_ORIGINAL].tuple.src`),
/// so the uplink can tell which pod a masqueraded packet came from. `valid` is 0 where
/// the kernel has no conntrack types to read.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtOffsets {
    pub skb_nfct: u32,
    pub orig_src: u32,
    pub orig_sport: u32,
    pub orig_l3num: u32,
    pub valid: u32,
    pub _pad: u32,
}

/// Kernel struct offsets the drop program needs, read from BTF in user space because
/// Rust eBPF has no CO-RE relocations. Passed as one global.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    pub skb_head: u32,
    pub skb_network_header: u32,
    pub skb_transport_header: u32,
    pub skb_protocol: u32,
    pub skb_len: u32,
    pub skb_dev: u32,
    pub dev_nd_net: u32,
    pub net_ns_inum: u32,
    /// Non-zero once user space filled the struct: the drop program does nothing before.
    pub valid: u32,
    pub _pad: u32,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all types are repr(C), Copy, have explicit padding and no pointers.
    unsafe impl aya::Pod for super::FlowTuple {}
    unsafe impl aya::Pod for super::CtOffsets {}
    unsafe impl aya::Pod for super::CtKey {}
    unsafe impl aya::Pod for super::CtEntry {}
    unsafe impl aya::Pod for super::DropWatch {}
    unsafe impl aya::Pod for super::RawEvent {}
    unsafe impl aya::Pod for super::KernelOffsets {}
    unsafe impl aya::Pod for super::EndpointValue {}
    unsafe impl aya::Pod for super::PolicyKey {}
    unsafe impl aya::Pod for super::FragKey {}
    unsafe impl aya::Pod for super::FragValue {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_are_stable() {
        assert_eq!(core::mem::size_of::<FlowTuple>(), 40);
        assert_eq!(core::mem::size_of::<CtKey>(), 44);
        assert_eq!(core::mem::size_of::<CtEntry>(), 32);
        assert_eq!(core::mem::size_of::<RawEvent>(), 80);
        assert_eq!(core::mem::size_of::<PolicyKey>(), 12);
        assert_eq!(core::mem::size_of::<EndpointValue>(), 16);
        assert_eq!(core::mem::size_of::<FragKey>(), 40);
        assert_eq!(core::mem::size_of::<FragValue>(), 16);
        assert_eq!(core::mem::align_of::<RawEvent>(), 8);
    }

    #[test]
    fn reversed_swaps_ends() {
        let mut t = FlowTuple::zeroed();
        t.saddr[0] = 1;
        t.daddr[0] = 2;
        t.sport = 10;
        t.dport = 20;
        let r = t.reversed();
        assert_eq!(r.saddr[0], 2);
        assert_eq!(r.sport, 20);
        assert_eq!(r.reversed(), t);
    }
}
