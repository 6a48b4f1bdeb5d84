//! The flows API, generated from `flow.proto` and `observer.proto`.
//!
//! The same `Observer` service is served by every node-probe and by the relay, so a
//! client works against either. Every message also has serde impls (JSON with the proto
//! field names), used by `flows observe -o json` and `--input-file`.

pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("flows.v1");
    include!(concat!(env!("OUT_DIR"), "/flows.v1.serde.rs"));
}

pub use pbjson_types::Timestamp;
pub use v1::*;

/// A Timestamp for a point in wall-clock time.
pub fn timestamp(t: std::time::SystemTime) -> Timestamp {
    let (seconds, nanos) = match t.duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => (d.as_secs() as i64, d.subsec_nanos() as i32),
        Err(e) => {
            // Before 1970: a negative count of seconds with non-negative nanos.
            let d = e.duration();
            let mut s = -(d.as_secs() as i64);
            let mut n = d.subsec_nanos() as i32;
            if n > 0 {
                s -= 1;
                n = 1_000_000_000 - n;
            }
            (s, n)
        }
    };
    Timestamp { seconds, nanos }
}

pub fn timestamp_now() -> Timestamp {
    timestamp(std::time::SystemTime::now())
}

/// Nanoseconds since the epoch of a Timestamp, saturating at the ends of i64 (about the
/// years 1677 and 2262). The one conversion every crate uses.
pub fn timestamp_nanos(t: &Timestamp) -> i64 {
    let ns = i128::from(t.seconds) * 1_000_000_000 + i128::from(t.nanos);
    ns.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64
}

/// The Timestamp of nanoseconds since the epoch (nanos always in 0..1e9).
pub fn timestamp_from_nanos(ns: i64) -> Timestamp {
    Timestamp {
        seconds: ns.div_euclid(1_000_000_000),
        nanos: ns.rem_euclid(1_000_000_000) as i32,
    }
}

/// The SystemTime of a Timestamp (None when out of range).
pub fn system_time(t: &Timestamp) -> Option<std::time::SystemTime> {
    if !(0..1_000_000_000).contains(&t.nanos) {
        return None;
    }
    let base = std::time::UNIX_EPOCH;
    if t.seconds >= 0 {
        base.checked_add(std::time::Duration::new(t.seconds as u64, t.nanos as u32))
    } else {
        base.checked_sub(std::time::Duration::from_secs(t.seconds.unsigned_abs()))?
            .checked_add(std::time::Duration::from_nanos(t.nanos as u64))
    }
}

/// IP protocol numbers and the names flows prints and stores for them (IANA's keywords;
/// ICMP as "ICMPv4", as the rest of flows names it).
const IP_PROTOCOLS: [(u8, &str); 22] = [
    (0, "HOPOPT"),
    (1, "ICMPv4"),
    (2, "IGMP"),
    (4, "IPIP"),
    (6, "TCP"),
    (17, "UDP"),
    (41, "IPv6"),
    (43, "IPv6-Route"),
    (44, "IPv6-Frag"),
    (46, "RSVP"),
    (47, "GRE"),
    (50, "ESP"),
    (51, "AH"),
    (58, "ICMPv6"),
    (59, "IPv6-NoNxt"),
    (60, "IPv6-Opts"),
    (89, "OSPF"),
    (103, "PIM"),
    (112, "VRRP"),
    (115, "L2TP"),
    (132, "SCTP"),
    (137, "MPLS-in-IP"),
];

/// The name of an IP protocol number ("GRE"; "IP-253" for one without a name here).
pub fn ip_protocol_name(number: u32) -> String {
    IP_PROTOCOLS
        .iter()
        .find(|(n, _)| u32::from(*n) == number)
        .map(|(_, name)| name.to_string())
        .unwrap_or_else(|| format!("IP-{number}"))
}

/// The number of a name [`ip_protocol_name`] gives (case-insensitive).
pub fn ip_protocol_number(name: &str) -> Option<u32> {
    if let Some(n) = IP_PROTOCOLS.iter().find(|(_, p)| p.eq_ignore_ascii_case(name)) {
        return Some(u32::from(n.0));
    }
    let n: u32 = name.strip_prefix("IP-")?.parse().ok()?;
    (n <= 255).then_some(n)
}

impl L4Unknown {
    /// Why the ports are unknown, in a few words.
    pub fn describe(&self) -> &'static str {
        match L4UnknownReason::try_from(self.reason) {
            Ok(L4UnknownReason::ExtensionHeaders) => "too many IPv6 extension headers",
            Ok(L4UnknownReason::Fragment) => "fragment without transport header",
            Ok(L4UnknownReason::Truncated) => "transport header cut short",
            Ok(L4UnknownReason::Protocol) => "protocol without ports",
            Ok(L4UnknownReason::Icmp) => "ICMP of no tracked connection",
            _ => "transport header unknown",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nanoseconds_round_trip_and_saturate() {
        for ns in [0, 1, -1, 999_999_999, -1_000_000_001, i64::MAX, i64::MIN] {
            let t = timestamp_from_nanos(ns);
            assert!((0..1_000_000_000).contains(&t.nanos));
            assert_eq!(timestamp_nanos(&t), ns);
        }
        assert_eq!(timestamp_nanos(&Timestamp { seconds: i64::MAX, nanos: 5 }), i64::MAX);
        assert_eq!(timestamp_nanos(&Timestamp { seconds: i64::MIN, nanos: 0 }), i64::MIN);
    }

    #[test]
    fn protocol_names_round_trip() {
        for n in 0..=255u32 {
            assert_eq!(ip_protocol_number(&ip_protocol_name(n)), Some(n), "{n}");
        }
        assert_eq!(ip_protocol_name(47), "GRE");
        assert_eq!(ip_protocol_number("gre"), Some(47));
        assert_eq!(ip_protocol_number("IP-256"), None);
        assert_eq!(ip_protocol_number("IP-x"), None);
    }
}
