//! Flow ids: which probe instance recorded a flow, and its place in that instance's
//! ring. A gap in one instance's sequence is flows lost, which is how the relay counts
//! what its node can no longer give it after a restart.
//!
//! The id is a UUID version 8 (RFC 9562's layout for custom contents): 48 bits of the
//! instance (random at the probe's start), version 8, 12 zero bits, the RFC variant,
//! then 62 bits of the sequence number. It prints as any UUID does.

const SEQ_BITS: u32 = 62;
const INSTANCE_MASK: u64 = (1 << 48) - 1;
const SEQ_MASK: u64 = (1 << SEQ_BITS) - 1;

/// A flow's recorder and its place in the recorder's sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowId {
    /// The probe instance (48 bits).
    pub instance: u64,
    /// Its ring's sequence number (62 bits).
    pub seq: u64,
}

impl FlowId {
    pub fn new(instance: u64, seq: u64) -> FlowId {
        FlowId { instance: instance & INSTANCE_MASK, seq: seq & SEQ_MASK }
    }

    /// The UUID text, lower-case hex with dashes.
    pub fn to_uuid(self) -> String {
        let hi: u64 = (self.instance << 16) | 0x8000;
        let lo: u64 = (0b10 << SEQ_BITS) | self.seq;
        let mut out = String::with_capacity(36);
        let hex = |out: &mut String, v: u64, digits: u32| {
            for i in (0..digits).rev() {
                out.push(char::from_digit(((v >> (4 * i)) & 0xf) as u32, 16).unwrap_or('0'));
            }
        };
        hex(&mut out, hi >> 32, 8);
        out.push('-');
        hex(&mut out, (hi >> 16) & 0xffff, 4);
        out.push('-');
        hex(&mut out, hi & 0xffff, 4);
        out.push('-');
        hex(&mut out, lo >> 48, 4);
        out.push('-');
        hex(&mut out, lo & 0xffff_ffff_ffff, 12);
        out
    }

    /// The id in a UUID made by [`FlowId::to_uuid`]; None for any other text (ids from
    /// elsewhere: tests, imports, older probes).
    pub fn parse(uuid: &str) -> Option<FlowId> {
        let b = uuid.as_bytes();
        if b.len() != 36 || [8, 13, 18, 23].iter().any(|&i| b[i] != b'-') {
            return None;
        }
        let digits: String = uuid.chars().filter(|c| *c != '-').collect();
        if digits.len() != 32 || !digits.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')) {
            return None;
        }
        let hi = u64::from_str_radix(&digits[..16], 16).ok()?;
        let lo = u64::from_str_radix(&digits[16..], 16).ok()?;
        if hi & 0xffff != 0x8000 || lo >> SEQ_BITS != 0b10 {
            return None;
        }
        Some(FlowId { instance: hi >> 16, seq: lo & SEQ_MASK })
    }
}

#[cfg(test)]
mod tests {
    use super::FlowId;

    #[test]
    fn round_trips_and_reads_as_a_version_8_uuid() {
        for (i, s) in [(0, 0), (1, 1), ((1 << 48) - 1, (1 << 62) - 1), (0xabc_def0_1234, 65_537)] {
            let id = FlowId::new(i, s);
            let u = id.to_uuid();
            assert_eq!(u.len(), 36);
            assert_eq!(&u[14..15], "8", "version 8: {u}");
            assert!(matches!(&u[19..20], "8" | "9" | "a" | "b"), "RFC variant: {u}");
            assert_eq!(FlowId::parse(&u), Some(id), "{u}");
        }
        assert_eq!(FlowId::new(0x1_0000_0000_0001, 5).instance, 1, "48 bits of instance");
    }

    #[test]
    fn other_ids_are_not_read_as_ours() {
        for u in ["", "flow-1", "6f1c2a34-9b1e-4c6d-8a2b-0e1f2a3b4c5d", "6f1c2a34-9b1e-8000-4a2b-0e1f2a3b4c5d", "6F1C2A34-9B1E-8000-8A2B-0E1F2A3B4C5D", "6f1c2a34x9b1e-8000-8a2b-0e1f2a3b4c5d", "6f1c2a34-9b1e-8001-8a2b-0e1f2a3b4c5d"] {
            assert_eq!(FlowId::parse(u), None, "{u}");
        }
    }
}
