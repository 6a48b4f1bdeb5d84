//! FlowFilter allow and deny lists as a SQL condition on `flows.flows`, with the same
//! meaning as `flows_flow::FilterSet`: values of one field OR'd, fields AND'd, any allow
//! entry (or none) and no deny entry. Filters are validated by `FilterSet` first, so
//! errors read the same as `flows observe`'s.

use flows_flow::{FilterSet, selector::{LabelSelector, Req}};
use flows_proto::{EventType, FlowFilter, IpVersion, TcpFlags, TrafficDirection, Verdict};

use crate::{
    StoreError,
    row::{DIRECTIONS, EVENT_TYPES, VERDICTS},
};

/// A string literal, quoted for ClickHouse.
pub fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        match c {
            '\'' => out.push_str("\\'"),
            '\\' => out.push_str("\\\\"),
            '\0' => out.push_str("\\0"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

fn list(v: &[String]) -> String {
    v.iter().map(|s| quote(s)).collect::<Vec<_>>().join(", ")
}

fn any(conds: Vec<String>) -> String {
    match conds.len() {
        0 => "1".into(),
        1 => conds.into_iter().next().unwrap_or_default(),
        _ => format!("({})", conds.join(" OR ")),
    }
}

/// An address or CIDR as a condition on an IPv6 column holding v4-mapped addresses.
fn ip_cond(col: &str, s: &str) -> Result<String, StoreError> {
    let bad = || StoreError::Filter {
        message: format!("{s:?}: expected an address or a CIDR"),
    };
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => (a, Some(l.parse::<u8>().map_err(|_| bad())?)),
        None => (s, None),
    };
    let ip: std::net::IpAddr = addr.trim().parse().map_err(|_| bad())?;
    // An address matches its own family only (as FlowFilter has it): IPv4 is stored
    // v4-mapped, so `::/0` would otherwise take every IPv4 flow too.
    let (v6, max, offset, version) = match ip {
        std::net::IpAddr::V4(a) => (a.to_ipv6_mapped(), 32, 96, 4),
        std::net::IpAddr::V6(a) => (a, 128, 0, 6),
    };
    Ok(match len {
        None => format!("(ip_version = {version} AND {col} = toIPv6({}))", quote(&v6.to_string())),
        Some(l) if l <= max => format!(
            "(ip_version = {version} AND isIPAddressInRange(toString({col}), {}))",
            quote(&format!("{v6}/{}", l + offset))
        ),
        Some(_) => return Err(bad()),
    })
}

fn label_cond(col: &str, sel: &LabelSelector) -> String {
    let has_key = |k: &str| format!("arrayExists(x -> x = {} OR startsWith(x, {}), {col})", quote(k), quote(&format!("{k}=")));
    let conds: Vec<String> = sel
        .requirements()
        .iter()
        .map(|r| match r {
            Req::Eq(k, v) => format!("has({col}, {})", quote(&format!("{k}={v}"))),
            Req::NotEq(k, v) => format!("NOT has({col}, {})", quote(&format!("{k}={v}"))),
            Req::In(k, vs) => format!("hasAny({col}, [{}])", list(&vs.iter().map(|v| format!("{k}={v}")).collect::<Vec<_>>())),
            Req::NotIn(k, vs) => format!("NOT hasAny({col}, [{}])", list(&vs.iter().map(|v| format!("{k}={v}")).collect::<Vec<_>>())),
            Req::Exists(k) => has_key(k),
            Req::NotExists(k) => format!("NOT {}", has_key(k)),
        })
        .collect();
    if conds.is_empty() { "1".into() } else { conds.join(" AND ") }
}

fn ports(v: &[String]) -> Vec<(u16, u16)> {
    v.iter()
        .filter_map(|s| match s.split_once('-') {
            Some((a, b)) => Some((a.trim().parse().ok()?, b.trim().parse().ok()?)),
            None => s.trim().parse().ok().map(|p| (p, p)),
        })
        .collect()
}

fn enum_names(v: &[i32], names: &[&str]) -> String {
    list(&v.iter().filter_map(|x| names.get(*x as usize).map(|s| s.to_string())).collect::<Vec<_>>())
}

fn flag_mask(f: &TcpFlags) -> u8 {
    [f.fin, f.syn, f.rst, f.psh, f.ack, f.urg, f.ece, f.cwr]
        .iter()
        .enumerate()
        .fold(0, |acc, (i, b)| acc | (u8::from(*b) << i))
}

/// The conditions a filter sets on one end of a flow (`source`, or the destination).
fn side(f: &FlowFilter, source: bool) -> Result<Vec<String>, StoreError> {
    let (p, ips, pods, labels, workloads, nss, port_list) = if source {
        ("src", &f.source_ip, &f.source_pod, &f.source_label, &f.source_workload, &f.source_namespace, &f.source_port)
    } else {
        ("dst", &f.destination_ip, &f.destination_pod, &f.destination_label, &f.destination_workload, &f.destination_namespace, &f.destination_port)
    };
    let mut all = Vec::new();
    if !ips.is_empty() {
        all.push(any(ips.iter().map(|s| ip_cond(&format!("{p}_ip"), s)).collect::<Result<_, _>>()?));
    }
    if !pods.is_empty() {
        all.push(any(
            pods.iter()
                .map(|s| match s.split_once('/') {
                    Some((ns, pre)) => format!("({p}_pod != '' AND {p}_namespace = {} AND startsWith({p}_pod, {}))", quote(ns), quote(pre)),
                    None => format!("({p}_pod != '' AND startsWith({p}_pod, {}))", quote(s)),
                })
                .collect(),
        ));
    }
    if !nss.is_empty() {
        all.push(format!("{p}_namespace IN ({})", list(nss)));
    }
    if !labels.is_empty() {
        let sels = labels
            .iter()
            .map(|s| LabelSelector::parse(s).map_err(|e| StoreError::Filter { message: e.to_string() }))
            .collect::<Result<Vec<_>, _>>()?;
        // Labels only count for an end that is known at all.
        let present = format!("({p}_namespace != '' OR {p}_pod != '' OR {p}_world OR {p}_node != '' OR notEmpty({p}_labels))");
        all.push(format!("({present} AND {})", any(sels.iter().map(|s| format!("({})", label_cond(&format!("{p}_labels"), s))).collect())));
    }
    if !workloads.is_empty() {
        all.push(any(
            workloads
                .iter()
                .map(|w| match w.split_once('/') {
                    Some((kind, name)) => format!(
                        "arrayExists(x -> lower(splitByChar('/', x)[1]) = lower({}) AND splitByChar('/', x)[2] = {}, {p}_workloads)",
                        quote(kind),
                        quote(name)
                    ),
                    None => format!("arrayExists(x -> splitByChar('/', x)[2] = {}, {p}_workloads)", quote(w)),
                })
                .collect(),
        ));
    }
    if !port_list.is_empty() {
        let ranges: Vec<String> = ports(port_list)
            .into_iter()
            .map(|(a, b)| format!("{p}_port BETWEEN {a} AND {b}"))
            .collect();
        all.push(format!("(protocol IN ('TCP', 'UDP', 'SCTP') AND {})", any(ranges)));
    }
    Ok(all)
}

/// One filter: every field it sets must hold.
fn filter(f: &FlowFilter) -> Result<String, StoreError> {
    let mut all: Vec<String> = Vec::new();
    if !f.uuid.is_empty() {
        all.push(format!("uuid IN ({})", list(&f.uuid)));
    }
    for source in [true, false] {
        all.extend(side(f, source)?);
    }
    if !f.verdict.is_empty() {
        all.push(format!("verdict IN ({})", enum_names(&f.verdict, &VERDICTS)));
    }
    if !f.drop_reason.is_empty() {
        all.push(format!(
            "upper(drop_reason) IN ({})",
            list(&f.drop_reason.iter().map(|s| s.to_uppercase()).collect::<Vec<_>>())
        ));
    }
    if !f.event_type.is_empty() {
        all.push(format!("event_type IN ({})", enum_names(&f.event_type, &EVENT_TYPES)));
    }
    if !f.protocol.is_empty() {
        let names: Vec<String> = f
            .protocol
            .iter()
            .map(|p| match p.to_ascii_lowercase().as_str() {
                "tcp" => "TCP",
                "udp" => "UDP",
                "sctp" => "SCTP",
                "icmp" | "icmpv4" => "ICMPv4",
                _ => "ICMPv6",
            })
            .map(String::from)
            .collect();
        all.push(format!("protocol IN ({})", list(&names)));
    }
    if !f.tcp_flags.is_empty() {
        all.push(format!(
            "(protocol = 'TCP' AND {})",
            any(f.tcp_flags.iter().map(|t| {
                let m = flag_mask(t);
                format!("bitAnd(tcp_flags, {m}) = {m}")
            }).collect())
        ));
    }
    if !f.traffic_direction.is_empty() {
        all.push(format!("direction IN ({})", enum_names(&f.traffic_direction, &DIRECTIONS)));
    }
    if !f.node_name.is_empty() {
        all.push(any(
            f.node_name
                .iter()
                .map(|n| {
                    let like: String = n
                        .chars()
                        .map(|c| match c {
                            '*' => "%".to_string(),
                            '%' => "\\%".to_string(),
                            '_' => "\\_".to_string(),
                            c => c.to_string(),
                        })
                        .collect();
                    format!("node LIKE {}", quote(&like))
                })
                .collect(),
        ));
    }
    if !f.ip_version.is_empty() {
        let v: Vec<String> = f
            .ip_version
            .iter()
            .map(|v| match IpVersion::try_from(*v) {
                Ok(IpVersion::Ipv4) => "4".into(),
                Ok(IpVersion::Ipv6) => "6".into(),
                _ => "0".into(),
            })
            .collect();
        all.push(format!("ip_version IN ({})", v.join(", ")));
    }
    if !f.reply.is_empty() {
        all.push(any(f.reply.iter().map(|r| format!("is_reply = {r}")).collect()));
    }
    Ok(if all.is_empty() { "1".into() } else { format!("({})", all.join(" AND ")) })
}

/// The allow list minus the deny list, as one condition.
pub fn condition(allow: &[FlowFilter], deny: &[FlowFilter]) -> Result<String, StoreError> {
    FilterSet::new(allow, deny).map_err(|e| StoreError::Filter { message: e.to_string() })?;
    let a = if allow.is_empty() {
        "1".to_string()
    } else {
        any(allow.iter().map(filter).collect::<Result<_, _>>()?)
    };
    let d: Vec<String> = deny.iter().map(filter).collect::<Result<_, _>>()?;
    Ok(if d.is_empty() { a } else { format!("{a} AND NOT {}", any(d)) })
}

/// The SETTINGS clause of a client's read: ClickHouse stops it past its time or memory
/// bound instead of starving ingest and the host.
pub fn read_settings(l: &crate::ReadLimits) -> String {
    format!(
        " SETTINGS max_execution_time = {}, max_memory_usage = {}",
        l.max_seconds.max(1),
        l.max_memory.max(1 << 20)
    )
}

/// `time` within [since, until), each optional, in nanoseconds since the epoch.
pub fn time_range(since: Option<i64>, until: Option<i64>) -> String {
    let mut c = Vec::new();
    if let Some(s) = since {
        c.push(format!("time >= fromUnixTimestamp64Nano({s}, 'UTC')"));
    }
    if let Some(u) = until {
        c.push(format!("time < fromUnixTimestamp64Nano({u}, 'UTC')"));
    }
    if c.is_empty() { "1".into() } else { c.join(" AND ") }
}

// The enum names above index by the proto's values.
const _: () = assert!(Verdict::Dropped as i32 == 2 && EventType::Trace as i32 == 1 && TrafficDirection::Ingress as i32 == 1);
