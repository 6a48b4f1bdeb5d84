//! CIDR blocks, parsed the way the API server does (host bits may be set: `10.0.0.1/24`
//! is the block 10.0.0.0/24).

use std::net::IpAddr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    /// The network address, masked.
    pub addr: IpAddr,
    pub len: u8,
}

fn bits(ip: IpAddr) -> (u128, u8) {
    match ip {
        IpAddr::V4(a) => (u32::from(a) as u128, 32),
        IpAddr::V6(a) => (u128::from(a), 128),
    }
}

fn mask(width: u8, len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        let full = if width == 128 { u128::MAX } else { (1u128 << width) - 1 };
        full & !((1u128 << (width - len)) - 1)
    }
}

impl Cidr {
    pub fn parse(s: &str) -> Option<Cidr> {
        let (ip, len) = s.split_once('/')?;
        let ip: IpAddr = ip.parse().ok()?;
        if len.is_empty() || !len.bytes().all(|b| b.is_ascii_digit()) || len.len() > 3 {
            return None;
        }
        let len: u8 = len.parse().ok()?;
        let (v, width) = bits(ip);
        if len > width {
            return None;
        }
        let net = v & mask(width, len);
        let addr = match ip {
            IpAddr::V4(_) => IpAddr::V4((net as u32).into()),
            IpAddr::V6(_) => IpAddr::V6(net.into()),
        };
        Some(Cidr { addr, len })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let (net, width) = bits(self.addr);
        let (v, w) = bits(ip);
        w == width && v & mask(width, self.len) == net
    }

    /// True when `other` is a strictly smaller block inside this one.
    pub fn strictly_contains(&self, other: &Cidr) -> bool {
        self.contains(other.addr) && other.len > self.len
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn parse_and_contain() {
        let c = Cidr::parse("10.1.2.3/16").expect("cidr");
        assert_eq!(c.to_string(), "10.1.0.0/16");
        assert!(c.contains(ip("10.1.255.1")));
        assert!(!c.contains(ip("10.2.0.1")));
        assert!(!c.contains(ip("::1")));
        let all = Cidr::parse("0.0.0.0/0").expect("all");
        assert!(all.contains(ip("203.0.113.9")));
        let h = Cidr::parse("192.0.2.7/32").expect("host");
        assert!(h.contains(ip("192.0.2.7")) && !h.contains(ip("192.0.2.8")));
        let v6 = Cidr::parse("2001:db8::/32").expect("v6");
        assert!(v6.contains(ip("2001:db8:ffff::1")));
        assert!(Cidr::parse("::/0").expect("v6 all").contains(ip("fd00::1")));
        assert!(Cidr::parse("fd00::1/128").expect("v6 host").contains(ip("fd00::1")));
        for bad in ["10.0.0.0", "10.0.0.0/33", "10.0.0.0/", "x/8", "10.0.0.0/-1", "::/129", "10.0.0.0/8/8"] {
            assert!(Cidr::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn strict_subsets() {
        let c = Cidr::parse("10.0.0.0/8").expect("c");
        assert!(c.strictly_contains(&Cidr::parse("10.1.0.0/16").expect("e")));
        assert!(!c.strictly_contains(&Cidr::parse("10.0.0.0/8").expect("e")));
        assert!(!c.strictly_contains(&Cidr::parse("11.0.0.0/16").expect("e")));
        assert!(!c.strictly_contains(&Cidr::parse("::/64").expect("e")));
    }
}
