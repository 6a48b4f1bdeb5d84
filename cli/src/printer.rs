//! Flow printers: compact (default), json (one object a line), dict and table.
//!
//! Everything taken from flow data is escaped before it reaches a terminal: pod names
//! and labels come from the cluster and must not be able to send control sequences.

use std::io::{IsTerminal, Write};

use flows_flow::jsonl;

use flows_proto::{
    Endpoint, Flow, LostEvent, LostEventSource, NodeStatusEvent, ObservationPoint, Verdict,
    layer4::Protocol,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Compact,
    Json,
    Dict,
    Table,
}

pub struct Printer {
    format: Format,
    node_name: bool,
    color: bool,
    table_header_done: bool,
}

/// Flow data as it may reach a terminal (`flows_flow::text::printable`).
pub fn escape(s: &str) -> String {
    flows_flow::text::printable(s).into_owned()
}

fn fmt_time(f: &Flow) -> String {
    match f.time.as_ref().and_then(flows_proto::system_time) {
        Some(t) => humantime::format_rfc3339_millis(t).to_string(),
        None => "-".into(),
    }
}

fn port_of(f: &Flow, source: bool) -> Option<u32> {
    match f.l4.as_ref()?.protocol.as_ref()? {
        Protocol::Tcp(t) => Some(if source { t.source_port } else { t.destination_port }),
        Protocol::Udp(u) => Some(if source { u.source_port } else { u.destination_port }),
        Protocol::Sctp(s) => Some(if source { s.source_port } else { s.destination_port }),
        _ => None,
    }
}

fn endpoint(f: &Flow, source: bool) -> String {
    let ip = f
        .ip
        .as_ref()
        .map(|i| if source { i.source.clone() } else { i.destination.clone() })
        .unwrap_or_default();
    let ep: Option<&Endpoint> = if source {
        f.source.as_ref()
    } else {
        f.destination.as_ref()
    };
    let port = port_of(f, source);
    let svc = if source {
        f.source_service.as_ref()
    } else {
        f.destination_service.as_ref()
    };
    let name = match (ep, svc) {
        (Some(e), _) if !e.pod_name.is_empty() => format!("{}/{}", e.namespace, e.pod_name),
        (_, Some(s)) if !s.name.is_empty() => format!("{}/{} (service)", s.namespace, s.name),
        _ => String::new(),
    };
    let world = ep.is_some_and(|e| e.is_world);
    let host = if ip.contains(':') && port.is_some() {
        format!("[{ip}]")
    } else {
        ip
    };
    let addr = match port {
        Some(p) => format!("{host}:{p}"),
        None => host,
    };
    let s = if !name.is_empty() {
        format!("{name} {addr}")
    } else if world {
        format!("{addr} (world)")
    } else {
        addr
    };
    escape(&s)
}

fn point_name(f: &Flow) -> &'static str {
    match ObservationPoint::try_from(f.observation_point) {
        Ok(ObservationPoint::FromEndpoint) => "from-endpoint",
        Ok(ObservationPoint::ToEndpoint) => "to-endpoint",
        Ok(ObservationPoint::KernelDrop) => "kernel-drop",
        Ok(ObservationPoint::ToNetwork) => "to-network",
        _ => "unknown",
    }
}

fn verdict_name(f: &Flow) -> &'static str {
    match Verdict::try_from(f.verdict) {
        Ok(Verdict::Forwarded) => "FORWARDED",
        Ok(Verdict::Dropped) => "DROPPED",
        Ok(Verdict::Audit) => "AUDIT",
        Ok(Verdict::Error) => "ERROR",
        _ => "UNKNOWN",
    }
}

fn icmp_name(v6: bool, ty: u32) -> String {
    let known = if v6 {
        match ty {
            1 => "DestinationUnreachable",
            3 => "TimeExceeded",
            128 => "EchoRequest",
            129 => "EchoReply",
            _ => "",
        }
    } else {
        match ty {
            0 => "EchoReply",
            3 => "DestinationUnreachable",
            8 => "EchoRequest",
            11 => "TimeExceeded",
            _ => "",
        }
    };
    if known.is_empty() {
        format!("type {ty}")
    } else {
        known.into()
    }
}

pub fn summary(f: &Flow) -> String {
    if let Some(u) = &f.l4_unknown {
        // The datapath could not read the ports: say which protocol and why.
        let what = match f.l4.as_ref().and_then(|l| l.protocol.as_ref()) {
            Some(Protocol::Icmpv4(i)) => format!("ICMPv4 {}", icmp_name(false, i.r#type)),
            Some(Protocol::Icmpv6(i)) => format!("ICMPv6 {}", icmp_name(true, i.r#type)),
            _ => flows_proto::ip_protocol_name(u.protocol),
        };
        return format!("{what} (ports unknown: {})", u.describe());
    }
    match f.l4.as_ref().and_then(|l| l.protocol.as_ref()) {
        Some(Protocol::Tcp(t)) => {
            let mut flags = Vec::new();
            if let Some(fl) = &t.flags {
                for (set, name) in [
                    (fl.syn, "SYN"),
                    (fl.ack, "ACK"),
                    (fl.fin, "FIN"),
                    (fl.rst, "RST"),
                    (fl.psh, "PSH"),
                    (fl.urg, "URG"),
                    (fl.ece, "ECE"),
                    (fl.cwr, "CWR"),
                ] {
                    if set {
                        flags.push(name);
                    }
                }
            }
            format!("TCP Flags: {}", flags.join(", "))
        }
        Some(Protocol::Udp(_)) => "UDP".into(),
        Some(Protocol::Sctp(_)) => "SCTP".into(),
        Some(Protocol::Icmpv4(i)) => format!("ICMPv4 {}", icmp_name(false, i.r#type)),
        Some(Protocol::Icmpv6(i)) => format!("ICMPv6 {}", icmp_name(true, i.r#type)),
        None => "-".into(),
    }
}

fn lost_source(l: &LostEvent) -> &'static str {
    match LostEventSource::try_from(l.source) {
        Ok(LostEventSource::KernelRingBuffer) => "kernel ring buffer",
        Ok(LostEventSource::DecoderQueue) => "decoder queue",
        Ok(LostEventSource::FlowRingBuffer) => "flow ring buffer (reader too slow)",
        Ok(LostEventSource::RelayQueue) => "relay queue",
        _ => "unknown",
    }
}

impl Printer {
    pub fn new(format: Format, node_name: bool) -> Printer {
        Printer {
            format,
            node_name,
            color: std::io::stdout().is_terminal(),
            table_header_done: false,
        }
    }

    fn paint(&self, s: &str, code: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{s}\x1b[0m")
        } else {
            s.to_string()
        }
    }

    fn verdict(&self, f: &Flow) -> String {
        let v = verdict_name(f);
        let mut s = match v {
            "FORWARDED" => self.paint(v, "32"),
            "DROPPED" => self.paint(v, "31"),
            "AUDIT" => self.paint(v, "33"),
            _ => v.to_string(),
        };
        if !f.drop_reason.is_empty() {
            s.push_str(&format!(" ({})", escape(&f.drop_reason)));
        }
        s
    }

    pub fn flow(&mut self, out: &mut impl Write, f: &Flow) -> std::io::Result<()> {
        match self.format {
            Format::Json => writeln!(out, "{}", jsonl::flow_line(f).map_err(std::io::Error::other)?),
            Format::Compact => {
                let node = if self.node_name {
                    format!(" [{}]", escape(&f.node_name))
                } else {
                    String::new()
                };
                let (a, arrow, b) = if f.is_reply {
                    (endpoint(f, false), "<-", endpoint(f, true))
                } else {
                    (endpoint(f, true), "->", endpoint(f, false))
                };
                writeln!(
                    out,
                    "{}{}: {} {} {} {} {} ({})",
                    fmt_time(f),
                    node,
                    a,
                    arrow,
                    b,
                    point_name(f),
                    self.verdict(f),
                    summary(f)
                )
            }
            Format::Dict => {
                writeln!(out, "  TIMESTAMP: {}", fmt_time(f))?;
                if self.node_name {
                    writeln!(out, "       NODE: {}", escape(&f.node_name))?;
                }
                writeln!(out, "     SOURCE: {}", endpoint(f, true))?;
                writeln!(out, "DESTINATION: {}", endpoint(f, false))?;
                writeln!(out, "       TYPE: {}", point_name(f))?;
                writeln!(out, "    VERDICT: {}", self.verdict(f))?;
                writeln!(out, "   IS REPLY: {}", f.is_reply)?;
                writeln!(out, "    SUMMARY: {}", summary(f))?;
                writeln!(out, "------------")
            }
            Format::Table => {
                if !self.table_header_done {
                    self.table_header_done = true;
                    write!(out, "{:<25}", "TIMESTAMP")?;
                    if self.node_name {
                        write!(out, "{:<10}", "NODE")?;
                    }
                    writeln!(
                        out,
                        "{:<45} {:<45} {:<14} {:<10} SUMMARY",
                        "SOURCE", "DESTINATION", "TYPE", "VERDICT"
                    )?;
                }
                write!(out, "{:<25}", fmt_time(f))?;
                if self.node_name {
                    write!(out, "{:<10}", escape(&f.node_name))?;
                }
                writeln!(
                    out,
                    "{:<45} {:<45} {:<14} {:<10} {}",
                    endpoint(f, true),
                    endpoint(f, false),
                    point_name(f),
                    verdict_name(f),
                    summary(f)
                )
            }
        }
    }

    pub fn lost(&mut self, out: &mut impl Write, l: &LostEvent) -> std::io::Result<()> {
        match self.format {
            Format::Json => writeln!(out, "{}", jsonl::lost_events_line(l).map_err(std::io::Error::other)?),
            _ => writeln!(
                out,
                "{}",
                self.paint(
                    &format!("EVENTS LOST: {} from the {}", l.num_events_lost, lost_source(l)),
                    "31"
                )
            ),
        }
    }

    pub fn node_status(&mut self, out: &mut impl Write, s: &NodeStatusEvent) -> std::io::Result<()> {
        match self.format {
            Format::Json => writeln!(out, "{}", jsonl::node_status_line(s).map_err(std::io::Error::other)?),
            _ => writeln!(
                out,
                "NODE STATUS: {} {}",
                escape(&s.node_names.join(", ")),
                escape(&s.message)
            ),
        }
    }
}

/// Rows aligned in columns under `head`, two spaces apart, each line prefixed by `indent`.
pub fn columns<const N: usize>(
    head: [&str; N],
    rows: &[[String; N]],
    indent: &str,
    out: &mut impl std::io::Write,
) -> std::io::Result<()> {
    // Every cell is data from the cluster: escaped here, once, for every table.
    let rows: Vec<Vec<String>> = rows.iter().map(|r| r.iter().map(|c| escape(c)).collect()).collect();
    let mut width: Vec<usize> = head.iter().map(|h| h.chars().count()).collect();
    for r in &rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        cells
            .iter()
            .zip(&width)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    writeln!(out, "{indent}{}", line(head.to_vec()))?;
    for r in &rows {
        writeln!(out, "{indent}{}", line(r.iter().map(String::as_str).collect()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use flows_proto::{Ip, Layer4, Tcp, TcpFlags};

    fn flow() -> Flow {
        Flow {
            node_name: "node-1".into(),
            verdict: Verdict::Forwarded as i32,
            observation_point: ObservationPoint::ToEndpoint as i32,
            ip: Some(Ip {
                source: "10.244.1.2".into(),
                destination: "fd00::3".into(),
                ip_version: 2,
            }),
            l4: Some(Layer4 {
                protocol: Some(Protocol::Tcp(Tcp {
                    source_port: 40000,
                    destination_port: 80,
                    flags: Some(TcpFlags {
                        syn: true,
                        ..Default::default()
                    }),
                })),
            }),
            source: Some(Endpoint {
                namespace: "front\x1b[2Jend".into(),
                pod_name: "web".into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn compact_escapes_and_formats() {
        let mut p = Printer::new(Format::Compact, true);
        p.color = false;
        let mut out = Vec::new();
        p.flow(&mut out, &flow()).expect("print");
        let s = String::from_utf8(out).expect("utf8");
        assert!(!s.contains('\x1b'), "{s}");
        assert!(s.contains("front\\u{1b}[2Jend/web 10.244.1.2:40000 -> [fd00::3]:80"), "{s}");
        assert!(s.contains("to-endpoint FORWARDED (TCP Flags: SYN)"), "{s}");
        assert!(s.contains("[node-1]"), "{s}");
    }

    #[test]
    fn json_round_trips() {
        let mut p = Printer::new(Format::Json, false);
        let mut out = Vec::new();
        p.flow(&mut out, &flow()).expect("print");
        let v: serde_json::Value = serde_json::from_slice(&out).expect("json");
        let back: Flow = serde_json::from_value(v["flow"].clone()).expect("flow");
        assert_eq!(back, flow());
        assert_eq!(v["flow"]["verdict"], "VERDICT_FORWARDED");
    }

    #[test]
    fn hostile_strings_come_out_inert_in_every_format() {
        use flows_flow::text::{HOSTILE, is_unsafe};
        for h in HOSTILE {
            let mut f = flow();
            let ep = Endpoint {
                namespace: h.to_string(),
                pod_name: h.to_string(),
                labels: vec![h.to_string()],
                node_name: h.to_string(),
                ..Default::default()
            };
            f.source = Some(ep.clone());
            f.destination = Some(ep);
            f.node_name = h.to_string();
            f.drop_reason = h.to_string();
            f.verdict = Verdict::Dropped as i32;
            f.destination_service = Some(flows_proto::Service { name: h.to_string(), namespace: h.to_string() });
            let status = NodeStatusEvent { node_names: vec![h.to_string()], message: h.to_string(), ..Default::default() };
            for format in [Format::Compact, Format::Json, Format::Dict, Format::Table] {
                let mut p = Printer::new(format, true);
                p.color = false;
                let mut out = Vec::new();
                p.flow(&mut out, &f).expect("print");
                p.node_status(&mut out, &status).expect("print");
                let s = String::from_utf8(out).expect("utf8");
                assert!(!s.chars().filter(|c| *c != '\n').any(is_unsafe), "{format:?} of {h:?}: {s:?}");
                if format == Format::Json {
                    let line = s.lines().next().expect("a line");
                    let v: serde_json::Value = serde_json::from_str(line).expect("still JSON");
                    assert_eq!(v["flow"]["node_name"], *h, "the same value, escaped");
                }
            }
        }
    }
}
