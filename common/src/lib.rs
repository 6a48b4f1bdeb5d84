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

/// Where an event was observed.
///
/// The TC programs sit on the *host* side of a pod's veth: traffic the pod sends arrives
/// at that interface's ingress hook, traffic for the pod leaves through its egress hook.
pub const POINT_FROM_ENDPOINT: u8 = 1;
pub const POINT_TO_ENDPOINT: u8 = 2;
/// The kernel freed the packet with a drop reason (`skb:kfree_skb`).
pub const POINT_KERNEL_DROP: u8 = 3;

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
    pub _pad: [u8; 2],
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
            _pad: [0; 2],
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
            _pad: [0; 2],
        }
    }
}

/// Conntrack key: the tuple in the direction of the first packet, plus the interface,
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

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtEntry {
    pub created_ns: u64,
    pub last_seen_ns: u64,
    pub packets_orig: u32,
    pub packets_reply: u32,
    pub flags: u32,
    pub _pad: u32,
}

/// Key of the per-probe map of tuples seen at pod interfaces, used to decide whether a
/// kernel drop concerns pod traffic (direction-normalised: the smaller address first).
pub type DropWatchKey = FlowTuple;

/// Value of the drop watch map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DropWatch {
    /// Drop reason already reported for this tuple (0 = none yet): one report per attempt,
    /// not one per retransmission.
    pub reported_reason: u32,
    pub _pad: u32,
    pub last_seen_ns: u64,
}

/// One record in the ring buffer: 72 bytes, 8-aligned.
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
    pub _pad0: [u8; 2],
    /// Kernel `enum skb_drop_reason` value for drops; 0 otherwise.
    pub drop_reason: u32,
    /// Length of the packet on the wire (skb->len).
    pub pkt_len: u32,
    /// Network namespace inode of the device that dropped the packet (drops only).
    pub netns_ino: u32,
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
            _pad0: [0; 2],
            drop_reason: 0,
            pkt_len: 0,
            netns_ino: 0,
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
    /// Packets too short or inconsistent to parse (passed untouched).
    pub const MALFORMED: u32 = 4;
    /// Non-IP frames (ARP, LLDP...): passed untouched.
    pub const NON_IP: u32 = 5;
    /// IP packets with a protocol we do not track (passed untouched).
    pub const OTHER_PROTO: u32 = 6;
    /// IPv6 packets whose extension-header chain was longer than we walk.
    pub const IPV6_EXT_TOO_DEEP: u32 = 7;
    /// Kernel drops of pod traffic reported.
    pub const KERNEL_DROPS: u32 = 8;
    /// Kernel drop events that did not fit in the ring buffer.
    pub const DROP_RINGBUF_FULL: u32 = 9;
    /// Non-first IP fragments (no L4 header): passed untouched.
    pub const FRAGMENTS: u32 = 10;
    pub const COUNT: u32 = 11;

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
    ];
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
    unsafe impl aya::Pod for super::CtKey {}
    unsafe impl aya::Pod for super::CtEntry {}
    unsafe impl aya::Pod for super::DropWatch {}
    unsafe impl aya::Pod for super::RawEvent {}
    unsafe impl aya::Pod for super::KernelOffsets {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_are_stable() {
        assert_eq!(core::mem::size_of::<FlowTuple>(), 40);
        assert_eq!(core::mem::size_of::<CtKey>(), 44);
        assert_eq!(core::mem::size_of::<CtEntry>(), 32);
        assert_eq!(core::mem::size_of::<RawEvent>(), 72);
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
