//! A small reader of the kernel's BTF (`/sys/kernel/btf/vmlinux`).
//!
//! Rust eBPF has no CO-RE relocations, so the drop program is given the offsets of the
//! few `sk_buff`/`net_device`/`net` fields it reads, computed here from the running
//! kernel's own type information. The same data names the kernel's drop reasons, whose
//! numeric values change between kernel versions.

use std::collections::HashMap;

use flows_common::{CtOffsets, KernelOffsets};

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("BTF data is malformed: {what}")]
    Malformed { what: &'static str },
    #[error("BTF has no {kind} named {name}")]
    MissingType { kind: &'static str, name: String },
    #[error("BTF struct {strukt} has no member {member}")]
    MissingMember { strukt: String, member: String },
}

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FWD: u32 = 7;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_FLOAT: u32 = 16;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

#[derive(Debug, Clone)]
struct Member {
    name: u32,
    ty: u32,
    bit_offset: u32,
}

#[derive(Debug, Clone)]
struct Type {
    name: u32,
    kind: u32,
    /// Referenced type for typedef/const/volatile/ptr...
    ty: u32,
    members: Vec<Member>,
    enum_values: Vec<(u32, i64)>,
}

/// Parsed BTF: enough to look up struct member offsets and enum values.
pub struct Btf {
    types: Vec<Type>,
    strings: Vec<u8>,
    by_name: HashMap<(u32, String), u32>,
}

fn u32_at(b: &[u8], off: usize) -> Result<u32, BtfError> {
    b.get(off..off + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or(BtfError::Malformed { what: "truncated" })
}

impl Btf {
    pub fn from_sys_fs() -> Result<Btf, BtfError> {
        let path = "/sys/kernel/btf/vmlinux";
        let data = std::fs::read(path).map_err(|source| BtfError::Read {
            path: path.into(),
            source,
        })?;
        Btf::parse(&data)
    }

    pub fn parse(data: &[u8]) -> Result<Btf, BtfError> {
        Btf::parse_on(data, None)
    }

    /// This kernel's BTF with a module's (`/sys/kernel/btf/NAME`), for types defined in
    /// a module (conntrack's, where nf_conntrack is one).
    pub fn with_module(self, name: &str) -> Result<Btf, BtfError> {
        let path = format!("/sys/kernel/btf/{name}");
        let data = std::fs::read(&path).map_err(|source| BtfError::Read { path, source })?;
        Btf::parse_on(&data, Some(self))
    }

    /// Parses BTF; with `base`, split BTF on top of it (a module's): its type ids and
    /// string offsets continue the base's, so its types and strings are appended.
    fn parse_on(data: &[u8], base: Option<Btf>) -> Result<Btf, BtfError> {
        if data.len() < 24 || u16::from_le_bytes([data[0], data[1]]) != 0xeb9f {
            return Err(BtfError::Malformed {
                what: "bad magic (not little-endian BTF)",
            });
        }
        let hdr_len = u32_at(data, 4)? as usize;
        let type_off = u32_at(data, 8)? as usize;
        let type_len = u32_at(data, 12)? as usize;
        let str_off = u32_at(data, 16)? as usize;
        let str_len = u32_at(data, 20)? as usize;
        let types_data = data
            .get(hdr_len + type_off..hdr_len + type_off + type_len)
            .ok_or(BtfError::Malformed {
                what: "type section out of range",
            })?;
        let own_strings = data
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .ok_or(BtfError::Malformed {
                what: "string section out of range",
            })?;
        let (mut types, mut strings) = match base {
            Some(b) => (b.types, b.strings),
            // Type id 0 is void.
            None => (vec![Type { name: 0, kind: 0, ty: 0, members: vec![], enum_values: vec![] }], Vec::new()),
        };
        strings.extend_from_slice(own_strings);
        let mut off = 0;
        while off < types_data.len() {
            let name = u32_at(types_data, off)?;
            let info = u32_at(types_data, off + 4)?;
            let size_or_type = u32_at(types_data, off + 8)?;
            off += 12;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 == 1;
            let mut t = Type {
                name,
                kind,
                ty: size_or_type,
                members: vec![],
                enum_values: vec![],
            };
            match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => off += 4,
                KIND_ARRAY => off += 12,
                KIND_STRUCT | KIND_UNION => {
                    for _ in 0..vlen {
                        let m_name = u32_at(types_data, off)?;
                        let m_ty = u32_at(types_data, off + 4)?;
                        let m_off = u32_at(types_data, off + 8)?;
                        // With kind_flag the high 8 bits hold a bitfield size.
                        let bit_offset = if kind_flag { m_off & 0x00ff_ffff } else { m_off };
                        t.members.push(Member {
                            name: m_name,
                            ty: m_ty,
                            bit_offset,
                        });
                        off += 12;
                    }
                }
                KIND_ENUM => {
                    for _ in 0..vlen {
                        let e_name = u32_at(types_data, off)?;
                        let val = u32_at(types_data, off + 4)? as i32 as i64;
                        t.enum_values.push((e_name, val));
                        off += 8;
                    }
                }
                KIND_ENUM64 => {
                    for _ in 0..vlen {
                        let e_name = u32_at(types_data, off)?;
                        let lo = u32_at(types_data, off + 4)? as u64;
                        let hi = u32_at(types_data, off + 8)? as u64;
                        t.enum_values.push((e_name, ((hi << 32) | lo) as i64));
                        off += 12;
                    }
                }
                KIND_FUNC_PROTO => off += 8 * vlen,
                KIND_DATASEC => off += 12 * vlen,
                KIND_PTR | KIND_FWD | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST
                | KIND_RESTRICT | KIND_FUNC | KIND_FLOAT | KIND_TYPE_TAG => {}
                _ => {
                    return Err(BtfError::Malformed {
                        what: "unknown BTF kind",
                    });
                }
            }
            types.push(t);
        }
        let mut btf = Btf {
            types,
            strings,
            by_name: HashMap::new(),
        };
        for (id, t) in btf.types.iter().enumerate() {
            if t.name != 0 && matches!(t.kind, KIND_STRUCT | KIND_UNION | KIND_ENUM | KIND_ENUM64) {
                let name = btf.str_at(t.name).to_string();
                // Keep the first definition: duplicates in vmlinux BTF are identical.
                btf.by_name.entry((t.kind, name)).or_insert(id as u32);
            }
        }
        Ok(btf)
    }

    fn str_at(&self, off: u32) -> &str {
        let s = self.strings.get(off as usize..).unwrap_or(&[]);
        let end = s.iter().position(|&b| b == 0).unwrap_or(s.len());
        std::str::from_utf8(&s[..end]).unwrap_or("")
    }

    /// Follows typedef/const/volatile/restrict/type_tag to the underlying type.
    fn resolve(&self, mut id: u32) -> Option<&Type> {
        for _ in 0..32 {
            let t = self.types.get(id as usize)?;
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.ty
                }
                _ => return Some(t),
            }
        }
        None
    }

    /// Byte offset of `member` in struct `strukt`, looking through anonymous
    /// structs and unions as C does.
    pub fn member_offset(&self, strukt: &str, member: &str) -> Result<u32, BtfError> {
        let id = self
            .by_name
            .get(&(KIND_STRUCT, strukt.to_string()))
            .ok_or_else(|| BtfError::MissingType {
                kind: "struct",
                name: strukt.into(),
            })?;
        let t = &self.types[*id as usize];
        self.find_member(t, member, 0)
            .map(|bits| bits / 8)
            .ok_or_else(|| BtfError::MissingMember {
                strukt: strukt.into(),
                member: member.into(),
            })
    }

    fn find_member(&self, t: &Type, member: &str, depth: u32) -> Option<u32> {
        if depth > 8 {
            return None;
        }
        for m in &t.members {
            if m.name != 0 && self.str_at(m.name) == member {
                return Some(m.bit_offset);
            }
        }
        for m in &t.members {
            if m.name == 0 {
                if let Some(inner) = self.resolve(m.ty) {
                    if matches!(inner.kind, KIND_STRUCT | KIND_UNION) {
                        if let Some(off) = self.find_member(inner, member, depth + 1) {
                            return Some(m.bit_offset + off);
                        }
                    }
                }
            }
        }
        None
    }

    /// The values of an enum, by name.
    pub fn enum_values(&self, name: &str) -> Result<Vec<(String, i64)>, BtfError> {
        let id = self
            .by_name
            .get(&(KIND_ENUM, name.to_string()))
            .or_else(|| self.by_name.get(&(KIND_ENUM64, name.to_string())))
            .ok_or_else(|| BtfError::MissingType {
                kind: "enum",
                name: name.into(),
            })?;
        Ok(self.types[*id as usize]
            .enum_values
            .iter()
            .map(|(n, v)| (self.str_at(*n).to_string(), *v))
            .collect())
    }

    /// The offsets the kfree_skb program reads.
    pub fn kernel_offsets(&self) -> Result<KernelOffsets, BtfError> {
        Ok(KernelOffsets {
            skb_head: self.member_offset("sk_buff", "head")?,
            skb_network_header: self.member_offset("sk_buff", "network_header")?,
            skb_transport_header: self.member_offset("sk_buff", "transport_header")?,
            skb_protocol: self.member_offset("sk_buff", "protocol")?,
            skb_len: self.member_offset("sk_buff", "len")?,
            skb_dev: self.member_offset("sk_buff", "dev")?,
            // nd_net is a possible_net_t, an anonymous struct typedef whose only member
            // is `struct net *net`, at offset 0.
            dev_nd_net: self.member_offset("net_device", "nd_net")?,
            net_ns_inum: self.member_offset("net", "ns")?
                + self.member_offset("ns_common", "inum")?,
            valid: 1,
            _pad: 0,
        })
    }

    /// Where the conntrack entry and its original source are (see [`CtOffsets`]).
    pub fn ct_offsets(&self) -> Result<CtOffsets, BtfError> {
        let src = self.member_offset("nf_conn", "tuplehash")?
            + self.member_offset("nf_conntrack_tuple_hash", "tuple")?
            + self.member_offset("nf_conntrack_tuple", "src")?;
        Ok(CtOffsets {
            skb_nfct: self.member_offset("sk_buff", "_nfct")?,
            orig_src: src + self.member_offset("nf_conntrack_man", "u3")?,
            orig_sport: src + self.member_offset("nf_conntrack_man", "u")?,
            orig_l3num: src + self.member_offset("nf_conntrack_man", "l3num")?,
            valid: 1,
            _pad: 0,
        })
    }

    /// Kernel drop reason names by value, without the `SKB_DROP_REASON_` prefix.
    pub fn drop_reasons(&self) -> Result<HashMap<u32, String>, BtfError> {
        Ok(self
            .enum_values("skb_drop_reason")?
            .into_iter()
            .map(|(n, v)| {
                let short = n.strip_prefix("SKB_DROP_REASON_").unwrap_or(&n).to_string();
                (v as u32, short)
            })
            .collect())
    }
}

/// conntrack's offsets from the kernel's BTF, or from nf_conntrack's where conntrack is
/// a module.
pub fn conntrack_offsets(btf: Btf) -> Result<CtOffsets, BtfError> {
    match btf.ct_offsets() {
        Err(BtfError::MissingType { .. }) => btf.with_module("nf_conntrack")?.ct_offsets(),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_garbage() {
        assert!(Btf::parse(b"not btf at all, definitely not").is_err());
        assert!(Btf::parse(&[]).is_err());
    }

    #[test]
    fn reads_the_running_kernel() {
        // Every supported kernel ships BTF; this is the source of the offsets in production.
        let btf = Btf::from_sys_fs().expect("kernel BTF");
        let off = btf.kernel_offsets().expect("offsets");
        assert!(off.skb_network_header > 0 && off.skb_network_header < 512);
        assert_ne!(off.skb_head, off.skb_dev);
        let reasons = btf.drop_reasons().expect("reasons");
        assert!(reasons.values().any(|n| n == "NETFILTER_DROP"));
        assert!(reasons.values().any(|n| n == "NOT_SPECIFIED"));
    }

    #[test]
    fn finds_conntrack_in_the_kernel_or_its_module() {
        let ct = conntrack_offsets(Btf::from_sys_fs().expect("kernel BTF")).expect("conntrack offsets");
        // The original tuple follows a list node; the port follows the 16-byte address
        // and the family follows the port.
        assert_eq!(ct.valid, 1);
        assert!(ct.orig_src >= 16 && ct.orig_src < 256, "{ct:?}");
        assert_eq!((ct.orig_sport - ct.orig_src, ct.orig_l3num - ct.orig_src), (16, 18));
    }
}
