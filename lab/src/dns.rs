//! A tiny authoritative DNS responder for `cluster.local` (the lab's kube-dns), and the
//! client half the traffic driver uses. Only what the lab needs: one question per message,
//! A and AAAA answers, NXDOMAIN for unknown names.
//!
//! Names answered: `<svc>.<ns>.svc.cluster.local` (the ClusterIPs) and
//! `<a-b-c-d>.<ns>.pod.cluster.local` (the dashed IPv4 address, for pods that exist).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::state::State;

pub const TYPE_A: u16 = 1;
pub const TYPE_AAAA: u16 = 28;
pub const CLASS_IN: u16 = 1;
pub const RCODE_NOERROR: u8 = 0;
pub const RCODE_FORMERR: u8 = 1;
pub const RCODE_NXDOMAIN: u8 = 3;
pub const RCODE_NOTIMP: u8 = 4;
/// Short, as cluster DNS answers change with the lab.
const TTL: u32 = 5;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DnsError {
    #[error("message too short ({len} bytes)")]
    Short { len: usize },
    #[error("malformed name at offset {offset}")]
    BadName { offset: usize },
    #[error("expected exactly one question, got {count}")]
    QuestionCount { count: u16 },
    #[error("not a response")]
    NotResponse,
}

/// A parsed query: the header fields the answer needs and its single question.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Query {
    pub id: u16,
    pub flags: u16,
    /// Lowercased, without the trailing dot.
    pub name: String,
    pub qtype: u16,
    pub qclass: u16,
    /// End of the question section (it is copied into the answer as sent).
    pub question_end: usize,
}

impl Query {
    pub fn opcode(&self) -> u8 {
        ((self.flags >> 11) & 0xf) as u8
    }
    pub fn is_response(&self) -> bool {
        self.flags & 0x8000 != 0
    }
}

fn u16_at(msg: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*msg.get(at)?, *msg.get(at + 1)?]))
}

/// Reads an uncompressed name (queries do not compress their question).
fn read_name(msg: &[u8], mut at: usize) -> Result<(String, usize), DnsError> {
    let mut name = String::new();
    loop {
        let len = *msg.get(at).ok_or(DnsError::BadName { offset: at })? as usize;
        if len == 0 {
            return Ok((name, at + 1));
        }
        if len & 0xc0 != 0 || name.len() + len > 253 {
            return Err(DnsError::BadName { offset: at });
        }
        let label = msg
            .get(at + 1..at + 1 + len)
            .ok_or(DnsError::BadName { offset: at })?;
        if !name.is_empty() {
            name.push('.');
        }
        name.extend(label.iter().map(|b| b.to_ascii_lowercase() as char));
        at += 1 + len;
    }
}

/// Skips a possibly compressed name in a response.
fn skip_name(msg: &[u8], mut at: usize) -> Result<usize, DnsError> {
    loop {
        let len = *msg.get(at).ok_or(DnsError::BadName { offset: at })?;
        match len {
            0 => return Ok(at + 1),
            l if l & 0xc0 == 0xc0 => return Ok(at + 2),
            l if l & 0xc0 == 0 => at += 1 + l as usize,
            _ => return Err(DnsError::BadName { offset: at }),
        }
    }
}

pub fn parse_query(msg: &[u8]) -> Result<Query, DnsError> {
    if msg.len() < 12 {
        return Err(DnsError::Short { len: msg.len() });
    }
    let id = u16::from_be_bytes([msg[0], msg[1]]);
    let flags = u16::from_be_bytes([msg[2], msg[3]]);
    let qdcount = u16::from_be_bytes([msg[4], msg[5]]);
    if qdcount != 1 {
        return Err(DnsError::QuestionCount { count: qdcount });
    }
    let (name, at) = read_name(msg, 12)?;
    let qtype = u16_at(msg, at).ok_or(DnsError::Short { len: msg.len() })?;
    let qclass = u16_at(msg, at + 2).ok_or(DnsError::Short { len: msg.len() })?;
    Ok(Query {
        id,
        flags,
        name,
        qtype,
        qclass,
        question_end: at + 4,
    })
}

/// Encodes a query for `name` (recursion desired, as stub resolvers send).
pub fn build_query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut m = Vec::with_capacity(32 + name.len());
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&0x0100u16.to_be_bytes()); // RD
    m.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name
        .trim_end_matches('.')
        .split('.')
        .filter(|l| !l.is_empty())
    {
        let bytes = &label.as_bytes()[..label.len().min(63)];
        m.push(bytes.len() as u8);
        m.extend_from_slice(bytes);
    }
    m.push(0);
    m.extend_from_slice(&qtype.to_be_bytes());
    m.extend_from_slice(&CLASS_IN.to_be_bytes());
    m
}

/// The answer to `query` (whose raw bytes are `msg`): header, the question as sent, answers.
pub fn build_response(msg: &[u8], query: &Query, rcode: u8, answers: &[IpAddr]) -> Vec<u8> {
    let question = msg.get(12..query.question_end).unwrap_or(&[]);
    let mut m = Vec::with_capacity(12 + question.len() + answers.len() * 28);
    m.extend_from_slice(&query.id.to_be_bytes());
    // QR, the query's opcode and RD, AA (we are the authority for cluster.local).
    let flags = 0x8000 | (query.flags & 0x7900) | 0x0400 | u16::from(rcode & 0xf);
    m.extend_from_slice(&flags.to_be_bytes());
    let qd: u16 = if question.is_empty() { 0 } else { 1 };
    m.extend_from_slice(&qd.to_be_bytes());
    m.extend_from_slice(&(answers.len() as u16).to_be_bytes());
    m.extend_from_slice(&[0, 0, 0, 0]);
    m.extend_from_slice(question);
    for ip in answers {
        m.extend_from_slice(&[0xc0, 12]); // pointer to the question's name
        let (rtype, rdata): (u16, Vec<u8>) = match ip {
            IpAddr::V4(a) => (TYPE_A, a.octets().to_vec()),
            IpAddr::V6(a) => (TYPE_AAAA, a.octets().to_vec()),
        };
        m.extend_from_slice(&rtype.to_be_bytes());
        m.extend_from_slice(&CLASS_IN.to_be_bytes());
        m.extend_from_slice(&TTL.to_be_bytes());
        m.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        m.extend_from_slice(&rdata);
    }
    m
}

/// What a client needs from a response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub id: u16,
    pub rcode: u8,
    pub answers: Vec<IpAddr>,
}

pub fn parse_response(msg: &[u8]) -> Result<Response, DnsError> {
    if msg.len() < 12 {
        return Err(DnsError::Short { len: msg.len() });
    }
    let id = u16::from_be_bytes([msg[0], msg[1]]);
    let flags = u16::from_be_bytes([msg[2], msg[3]]);
    if flags & 0x8000 == 0 {
        return Err(DnsError::NotResponse);
    }
    let qd = u16::from_be_bytes([msg[4], msg[5]]);
    let an = u16::from_be_bytes([msg[6], msg[7]]);
    let mut at = 12;
    for _ in 0..qd {
        at = skip_name(msg, at)? + 4;
    }
    let mut answers = Vec::new();
    for _ in 0..an {
        at = skip_name(msg, at)?;
        let short = DnsError::Short { len: msg.len() };
        let rtype = u16_at(msg, at).ok_or(short.clone())?;
        let rdlen = u16_at(msg, at + 8).ok_or(short.clone())? as usize;
        let rdata = msg.get(at + 10..at + 10 + rdlen).ok_or(short)?;
        match (rtype, rdlen) {
            (TYPE_A, 4) => answers.push(IpAddr::V4(Ipv4Addr::new(
                rdata[0], rdata[1], rdata[2], rdata[3],
            ))),
            (TYPE_AAAA, 16) => {
                let mut o = [0u8; 16];
                o.copy_from_slice(rdata);
                answers.push(IpAddr::V6(Ipv6Addr::from(o)));
            }
            _ => {}
        }
        at += 10 + rdlen;
    }
    Ok(Response {
        id,
        rcode: (flags & 0xf) as u8,
        answers,
    })
}

pub fn rcode_name(rcode: u8) -> &'static str {
    match rcode {
        0 => "NOERROR",
        1 => "FORMERR",
        2 => "SERVFAIL",
        3 => "NXDOMAIN",
        4 => "NOTIMP",
        5 => "REFUSED",
        _ => "RCODE?",
    }
}

/// The records of the lab's cluster.local zone.
#[derive(Clone, Debug, Default)]
pub struct Zone {
    names: HashMap<String, (Option<Ipv4Addr>, Option<Ipv6Addr>)>,
}

impl Zone {
    pub fn from_state(state: &State) -> Zone {
        let mut names = HashMap::new();
        for s in &state.services {
            names.insert(
                format!("{}.{}.svc.cluster.local", s.name, s.namespace),
                (Some(s.cluster_ipv4), Some(s.cluster_ipv6)),
            );
        }
        for p in &state.pods {
            let dashed = p.ipv4.to_string().replace('.', "-");
            names.insert(
                format!("{dashed}.{}.pod.cluster.local", p.namespace),
                (Some(p.ipv4), None),
            );
        }
        Zone { names }
    }

    /// Addresses for `name` (lowercase, no trailing dot) of type `qtype`; `None` for NXDOMAIN.
    pub fn lookup(&self, name: &str, qtype: u16) -> Option<Vec<IpAddr>> {
        let (v4, v6) = self.names.get(name)?;
        Some(match qtype {
            TYPE_A => v4.iter().map(|a| IpAddr::V4(*a)).collect(),
            TYPE_AAAA => v6.iter().map(|a| IpAddr::V6(*a)).collect(),
            _ => Vec::new(), // the name exists, other types have no data
        })
    }

    /// The response to a raw query, or `None` when it should be dropped (not a query at all).
    pub fn answer(&self, msg: &[u8]) -> Option<Vec<u8>> {
        match parse_query(msg) {
            Ok(q) if q.is_response() => None,
            Ok(q) if q.opcode() != 0 => Some(build_response(msg, &q, RCODE_NOTIMP, &[])),
            Ok(q) if q.qclass != CLASS_IN => Some(build_response(msg, &q, RCODE_NOTIMP, &[])),
            Ok(q) => Some(match self.lookup(&q.name, q.qtype) {
                Some(ips) => build_response(msg, &q, RCODE_NOERROR, &ips),
                None => build_response(msg, &q, RCODE_NXDOMAIN, &[]),
            }),
            // A header we can answer to with FORMERR; anything shorter is dropped.
            Err(_) if msg.len() >= 12 => {
                let q = Query {
                    id: u16::from_be_bytes([msg[0], msg[1]]),
                    flags: u16::from_be_bytes([msg[2], msg[3]]),
                    name: String::new(),
                    qtype: 0,
                    qclass: 0,
                    question_end: 12,
                };
                if q.is_response() {
                    None
                } else {
                    Some(build_response(msg, &q, RCODE_FORMERR, &[]))
                }
            }
            Err(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zone() -> Zone {
        let mut names = HashMap::new();
        names.insert(
            "backend.backend.svc.cluster.local".to_string(),
            (
                Some(Ipv4Addr::new(10, 96, 1, 2)),
                Some("fd00:10:96::102".parse().unwrap()),
            ),
        );
        Zone { names }
    }

    #[test]
    fn query_round_trip() {
        let q = build_query(0x1234, "Backend.backend.svc.cluster.local.", TYPE_A);
        let parsed = parse_query(&q).expect("parse");
        assert_eq!(parsed.id, 0x1234);
        assert_eq!(parsed.name, "backend.backend.svc.cluster.local");
        assert_eq!(parsed.qtype, TYPE_A);
        assert_eq!(parsed.qclass, CLASS_IN);
        assert_eq!(parsed.question_end, q.len());
        assert!(!parsed.is_response());
    }

    #[test]
    fn answers_a_and_aaaa() {
        let z = zone();
        let q = build_query(7, "backend.backend.svc.cluster.local", TYPE_A);
        let r = parse_response(&z.answer(&q).expect("answer")).expect("response");
        assert_eq!(r.id, 7);
        assert_eq!(r.rcode, RCODE_NOERROR);
        assert_eq!(r.answers, vec![IpAddr::V4(Ipv4Addr::new(10, 96, 1, 2))]);

        let q = build_query(8, "backend.backend.svc.cluster.local", TYPE_AAAA);
        let raw = z.answer(&q).expect("answer");
        let r = parse_response(&raw).expect("response");
        assert_eq!(
            r.answers,
            vec!["fd00:10:96::102".parse::<IpAddr>().unwrap()]
        );
        // Flags: QR, AA, RD copied; the question is echoed verbatim.
        assert_eq!(
            u16::from_be_bytes([raw[2], raw[3]]),
            0x8000 | 0x0400 | 0x0100
        );
        assert_eq!(&raw[12..q.len()], &q[12..]);
    }

    #[test]
    fn unknown_names_are_nxdomain_and_other_types_nodata() {
        let z = zone();
        let r = parse_response(
            &z.answer(&build_query(1, "nope.backend.svc.cluster.local", TYPE_A))
                .expect("answer"),
        )
        .expect("response");
        assert_eq!(r.rcode, RCODE_NXDOMAIN);
        assert!(r.answers.is_empty());
        let r = parse_response(
            &z.answer(&build_query(2, "backend.backend.svc.cluster.local", 15))
                .expect("answer"),
        )
        .expect("response");
        assert_eq!((r.rcode, r.answers.len()), (RCODE_NOERROR, 0));
    }

    #[test]
    fn malformed_queries() {
        let z = zone();
        assert_eq!(z.answer(&[1, 2, 3]), None, "too short to answer");
        let mut q = build_query(9, "a.b", TYPE_A);
        q[5] = 2; // two questions
        let r = parse_response(&z.answer(&q).expect("formerr")).expect("response");
        assert_eq!((r.id, r.rcode), (9, RCODE_FORMERR));
        let mut q = build_query(10, "a.b", TYPE_A);
        q.truncate(14); // name runs off the end
        assert!(parse_query(&q).is_err());
        let mut resp = build_query(11, "a.b", TYPE_A);
        resp[2] |= 0x80;
        assert_eq!(z.answer(&resp), None, "responses are not answered");
        let mut notify = build_query(12, "a.b", TYPE_A);
        notify[2] |= 4 << 3; // opcode NOTIFY
        let r = parse_response(&z.answer(&notify).expect("notimp")).expect("response");
        assert_eq!(r.rcode, RCODE_NOTIMP);
    }

    #[test]
    fn response_parsing_follows_compression() {
        // A response whose answer name is a pointer, plus a CNAME-like record we skip.
        let q = build_query(3, "x.y", TYPE_A);
        let mut m = build_response(
            &q,
            &parse_query(&q).expect("q"),
            0,
            &[IpAddr::V4(Ipv4Addr::new(1, 2, 3, 4))],
        );
        m[7] = 2; // two answers: append an unknown type record
        m.extend_from_slice(&[0xc0, 12, 0, 5, 0, 1, 0, 0, 0, 5, 0, 2, 0xc0, 12]);
        let r = parse_response(&m).expect("response");
        assert_eq!(r.answers, vec![IpAddr::V4(Ipv4Addr::new(1, 2, 3, 4))]);
        assert!(parse_response(&m[..m.len() - 3]).is_err());
    }
}
