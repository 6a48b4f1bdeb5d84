//! `flows observe` filter flags → FlowFilter allow/deny lists, as `hubble observe` builds
//! them: values of one flag are alternatives, different flags must all hold, and a flag
//! without a direction (`--pod`, `--ip`, `-l`, `--port`, `-n`, `--workload`) matches
//! either end: it yields two filters, one on the source side and one on the destination
//! side (each with every other flag).

use anyhow::{Context, bail};
use flows_proto::{EventType, FlowFilter, TcpFlags, TrafficDirection, Verdict};

#[derive(clap::Args, Debug, Default, Clone)]
pub struct FilterArgs {
    /// Verdict: FORWARDED, DROPPED, AUDIT, ERROR.
    #[arg(long, value_delimiter = ',')]
    pub verdict: Vec<String>,
    /// Drop reason (kernel name such as NETFILTER_DROP, or POLICY_DENIED).
    #[arg(long, value_delimiter = ',')]
    pub drop_reason: Vec<String>,
    /// Event type: trace, drop, policy-verdict.
    #[arg(long = "type", value_delimiter = ',')]
    pub event_type: Vec<String>,
    /// Flows from or to pods of this namespace.
    #[arg(short = 'n', long)]
    pub namespace: Vec<String>,
    /// Flows from pods of this namespace.
    #[arg(long)]
    pub from_namespace: Vec<String>,
    /// Flows to pods of this namespace.
    #[arg(long)]
    pub to_namespace: Vec<String>,
    /// All namespaces (the default; accepted for compatibility).
    #[arg(short = 'A', long)]
    pub all_namespaces: bool,
    /// Flows from or to a pod: [namespace/]name-prefix.
    #[arg(long)]
    pub pod: Vec<String>,
    /// Flows from a pod: [namespace/]name-prefix.
    #[arg(long)]
    pub from_pod: Vec<String>,
    /// Flows to a pod: [namespace/]name-prefix.
    #[arg(long)]
    pub to_pod: Vec<String>,
    /// Label selector (app=web,tier in (a,b),!legacy) on either end.
    #[arg(short = 'l', long)]
    pub label: Vec<String>,
    /// Label selector on the source.
    #[arg(long)]
    pub from_label: Vec<String>,
    /// Label selector on the destination.
    #[arg(long)]
    pub to_label: Vec<String>,
    /// Address or CIDR of either end.
    #[arg(long)]
    pub ip: Vec<String>,
    /// Address or CIDR of the source.
    #[arg(long)]
    pub from_ip: Vec<String>,
    /// Address or CIDR of the destination.
    #[arg(long)]
    pub to_ip: Vec<String>,
    /// Port (or range a-b) of either end.
    #[arg(long)]
    pub port: Vec<String>,
    /// Source port (or range a-b).
    #[arg(long)]
    pub from_port: Vec<String>,
    /// Destination port (or range a-b).
    #[arg(long)]
    pub to_port: Vec<String>,
    /// Workload (Deployment, StatefulSet... name) of either end.
    #[arg(long)]
    pub workload: Vec<String>,
    /// Workload of the source.
    #[arg(long)]
    pub from_workload: Vec<String>,
    /// Workload of the destination.
    #[arg(long)]
    pub to_workload: Vec<String>,
    /// L4 protocol: tcp, udp, sctp, icmpv4, icmpv6.
    #[arg(long, value_delimiter = ',')]
    pub protocol: Vec<String>,
    /// TCP flags that must all be set, e.g. SYN or SYN,ACK (repeat for alternatives).
    #[arg(long)]
    pub tcp_flags: Vec<String>,
    /// ingress or egress.
    #[arg(long)]
    pub traffic_direction: Vec<String>,
    /// Node name (`*` matches any run of characters).
    #[arg(long)]
    pub node_name: Vec<String>,
    /// Put the next filter flag in the deny list: `--not --to-port 53` (repeat for
    /// more). Taken from the command line before the other flags are read.
    #[arg(long = "not")]
    pub not: bool,
}

fn verdict(s: &str) -> anyhow::Result<i32> {
    Ok(match s.to_ascii_uppercase().as_str() {
        // The short forms are what people type (`--verdict drop`).
        "FORWARDED" | "FORWARD" => Verdict::Forwarded,
        "DROPPED" | "DROP" => Verdict::Dropped,
        "AUDIT" => Verdict::Audit,
        "ERROR" => Verdict::Error,
        _ => bail!("--verdict {s:?}: expected FORWARDED (forward), DROPPED (drop), AUDIT or ERROR"),
    } as i32)
}

fn event_type(s: &str) -> anyhow::Result<i32> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "trace" => EventType::Trace,
        "drop" => EventType::Drop,
        "policy-verdict" => EventType::PolicyVerdict,
        _ => bail!("--type {s:?}: expected trace, drop or policy-verdict"),
    } as i32)
}

fn direction(s: &str) -> anyhow::Result<i32> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "ingress" => TrafficDirection::Ingress,
        "egress" => TrafficDirection::Egress,
        _ => bail!("--traffic-direction {s:?}: expected ingress or egress"),
    } as i32)
}

fn tcp_flags(s: &str) -> anyhow::Result<TcpFlags> {
    let mut f = TcpFlags::default();
    for part in s.split(',') {
        match part.trim().to_ascii_uppercase().as_str() {
            "SYN" => f.syn = true,
            "ACK" => f.ack = true,
            "FIN" => f.fin = true,
            "RST" => f.rst = true,
            "PSH" => f.psh = true,
            "URG" => f.urg = true,
            "ECE" => f.ece = true,
            "CWR" => f.cwr = true,
            other => bail!("--tcp-flags {s:?}: unknown flag {other:?}"),
        }
    }
    Ok(f)
}

impl FilterArgs {
    /// The allow list these flags describe (empty: everything).
    pub fn allow_list(&self) -> anyhow::Result<Vec<FlowFilter>> {
        let mut base = FlowFilter {
            verdict: self.verdict.iter().map(|v| verdict(v)).collect::<Result<_, _>>()?,
            drop_reason: self.drop_reason.clone(),
            event_type: self.event_type.iter().map(|t| event_type(t)).collect::<Result<_, _>>()?,
            protocol: self.protocol.clone(),
            tcp_flags: self.tcp_flags.iter().map(|t| tcp_flags(t)).collect::<Result<_, _>>()?,
            traffic_direction: self
                .traffic_direction
                .iter()
                .map(|d| direction(d))
                .collect::<Result<_, _>>()?,
            node_name: self.node_name.clone(),
            source_namespace: self.from_namespace.clone(),
            destination_namespace: self.to_namespace.clone(),
            source_pod: self.from_pod.clone(),
            destination_pod: self.to_pod.clone(),
            source_label: self.from_label.clone(),
            destination_label: self.to_label.clone(),
            source_ip: self.from_ip.clone(),
            destination_ip: self.to_ip.clone(),
            source_port: self.from_port.clone(),
            destination_port: self.to_port.clone(),
            source_workload: self.from_workload.clone(),
            destination_workload: self.to_workload.clone(),
            ..Default::default()
        };
        // Pod names without a namespace take -n's when exactly one is given.
        let qualify = |pods: &[String]| -> Vec<String> {
            pods.iter()
                .map(|p| match (p.contains('/'), self.namespace.as_slice()) {
                    (false, [ns]) => format!("{ns}/{p}"),
                    _ => p.clone(),
                })
                .collect()
        };
        base.source_pod = qualify(&base.source_pod);
        base.destination_pod = qualify(&base.destination_pod);
        let directionless = !(self.namespace.is_empty()
            && self.pod.is_empty()
            && self.label.is_empty()
            && self.ip.is_empty()
            && self.port.is_empty()
            && self.workload.is_empty());
        if !directionless {
            return Ok(if base == FlowFilter::default() { vec![] } else { vec![base] });
        }
        let pods = qualify(&self.pod);
        let mut from = base.clone();
        from.source_namespace.extend(self.namespace.iter().cloned());
        from.source_pod.extend(pods.iter().cloned());
        from.source_label.extend(self.label.iter().cloned());
        from.source_ip.extend(self.ip.iter().cloned());
        from.source_port.extend(self.port.iter().cloned());
        from.source_workload.extend(self.workload.iter().cloned());
        let mut to = base;
        to.destination_namespace.extend(self.namespace.iter().cloned());
        to.destination_pod.extend(pods);
        to.destination_label.extend(self.label.iter().cloned());
        to.destination_ip.extend(self.ip.iter().cloned());
        to.destination_port.extend(self.port.iter().cloned());
        to.destination_workload.extend(self.workload.iter().cloned());
        Ok(vec![from, to])
    }
}

/// Splits `--not <flag> [value]` pairs out of an `observe` command line: they describe the
/// deny list, the rest the allow list (as `hubble observe --not` does).
pub fn split_not(args: Vec<std::ffi::OsString>) -> anyhow::Result<(Vec<std::ffi::OsString>, Vec<std::ffi::OsString>)> {
    let is_observe = args.get(1).is_some_and(|a| a == "observe");
    if !is_observe {
        return Ok((args, Vec::new()));
    }
    let mut keep = Vec::new();
    let mut deny = Vec::new();
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        if a != "--not" {
            keep.push(a);
            continue;
        }
        let flag = it
            .next()
            .context("--not must be followed by a filter flag, e.g. --not --to-port 53")?;
        let f = flag.to_string_lossy().to_string();
        if !f.starts_with('-') || f == "--not" {
            bail!("--not must be followed by a filter flag, not {f:?}");
        }
        let takes_value = !(f.contains('=') || f == "-A" || f == "--all-namespaces");
        deny.push(flag);
        if takes_value {
            deny.push(it.next().with_context(|| format!("--not {f}: missing value"))?);
        }
    }
    Ok((keep, deny))
}

#[derive(clap::Parser, Debug)]
#[command(name = "--not")]
struct DenyOnly {
    #[command(flatten)]
    filters: FilterArgs,
}

/// The deny list from the flags that followed `--not`.
pub fn deny_list(not: &[std::ffi::OsString]) -> anyhow::Result<Vec<FlowFilter>> {
    if not.is_empty() {
        return Ok(Vec::new());
    }
    use clap::Parser;
    let d = DenyOnly::try_parse_from(std::iter::once(std::ffi::OsString::from("--not")).chain(not.iter().cloned()))
        .map_err(|e| anyhow::anyhow!("after --not: {e}"))?;
    d.filters.allow_list()
}

/// Words of a filter prompt, with '...' and "..." grouping (label selectors have spaces).
fn words(text: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    let mut any = false;
    for c in text.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => cur.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                any = true;
            }
            (None, c) if c.is_whitespace() => {
                if any || !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
                any = false;
            }
            (None, c) => cur.push(c),
        }
    }
    if let Some(q) = quote {
        return Err(format!("unclosed {q}"));
    }
    if any || !cur.is_empty() {
        out.push(cur);
    }
    Ok(out)
}

#[derive(clap::Parser, Debug)]
#[command(name = "filter", no_binary_name = true, disable_help_flag = true)]
struct PromptFilters {
    #[command(flatten)]
    filters: FilterArgs,
}

/// A filter prompt's text (the filter flags of `flows observe`, `--not` included) as
/// allow and deny lists, validated.
pub fn parse_text(text: &str) -> Result<(Vec<FlowFilter>, Vec<FlowFilter>), String> {
    use clap::Parser;
    let mut argv: Vec<std::ffi::OsString> = vec!["flows".into(), "observe".into()];
    argv.extend(words(text)?.into_iter().map(Into::into));
    let (keep, not) = split_not(argv).map_err(|e| e.to_string())?;
    let p = PromptFilters::try_parse_from(keep.into_iter().skip(2))
        .map_err(|e| e.to_string().lines().next().unwrap_or_default().trim_start_matches("error: ").to_string())?;
    let allow = p.filters.allow_list().map_err(|e| format!("{e:#}"))?;
    let deny = deny_list(&not).map_err(|e| format!("{e:#}"))?;
    validate(&allow, &deny).map_err(|e| format!("{e:#}"))?;
    Ok((allow, deny))
}

/// Checks the filters the way a server would, so mistakes are reported before connecting.
pub fn validate(allow: &[FlowFilter], deny: &[FlowFilter]) -> anyhow::Result<flows_flow::FilterSet> {
    flows_flow::FilterSet::new(allow, deny).context("invalid filter")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_text_parses_like_the_command_line() {
        let (allow, deny) = parse_text("--verdict drop -l 'tier in (a, b)' --not --to-port 53").expect("valid");
        assert_eq!(allow.len(), 2, "a direction-less label: from or to");
        assert_eq!(deny.len(), 1);
        assert_eq!(deny[0].destination_port, ["53"]);
        assert_eq!(parse_text("").expect("empty"), (Vec::new(), Vec::new()));
        assert!(parse_text("--verdict").is_err());
        assert!(parse_text("--bogus x").is_err());
        assert!(parse_text("-l 'unclosed").unwrap_err().contains("unclosed"));
    }

    #[test]
    fn directionless_flags_make_a_from_and_a_to_filter() {
        let a = FilterArgs {
            pod: vec!["web".into()],
            namespace: vec!["shop".into()],
            verdict: vec!["dropped".into()],
            ..Default::default()
        };
        let l = a.allow_list().expect("valid");
        assert_eq!(l.len(), 2);
        assert_eq!(l[0].source_pod, vec!["shop/web"]);
        assert_eq!(l[0].source_namespace, vec!["shop"]);
        assert!(l[0].destination_pod.is_empty());
        assert_eq!(l[1].destination_pod, vec!["shop/web"]);
        assert_eq!(l[1].verdict, vec![Verdict::Dropped as i32]);
        assert!(FilterArgs::default().allow_list().expect("empty").is_empty());
        let one = FilterArgs {
            to_port: vec!["53".into()],
            protocol: vec!["udp".into()],
            ..Default::default()
        };
        assert_eq!(one.allow_list().expect("valid").len(), 1);
        assert!(FilterArgs { verdict: vec!["maybe".into()], ..Default::default() }.allow_list().is_err());
        assert!(FilterArgs { tcp_flags: vec!["SYN,XYZ".into()], ..Default::default() }.allow_list().is_err());
    }

    #[test]
    fn not_moves_the_next_flag_to_the_deny_list() {
        let argv: Vec<std::ffi::OsString> = ["flows", "observe", "--verdict", "DROPPED", "--not", "--to-port", "53", "--not", "-A", "--not", "--pod=x"]
            .iter()
            .map(Into::into)
            .collect();
        let (keep, not) = split_not(argv).expect("split");
        assert_eq!(keep.len(), 4);
        assert_eq!(not.len(), 4);
        let deny = deny_list(&not).expect("deny");
        assert_eq!(deny.len(), 2, "direction-less --pod gives a from and a to filter");
        assert!(deny.iter().all(|f| f.destination_port == vec!["53".to_string()]));
        let bad: Vec<std::ffi::OsString> = ["flows", "observe", "--not"].iter().map(Into::into).collect();
        assert!(split_not(bad).is_err());
        let twice: Vec<std::ffi::OsString> = ["flows", "observe", "--not", "--not", "--pod", "x"].iter().map(Into::into).collect();
        assert!(split_not(twice).is_err(), "--not --not is refused, not read as a value");
    }

    #[test]
    fn every_filter_flag_says_what_it_does_in_help() {
        use clap::CommandFactory;
        #[derive(clap::Parser)]
        struct Observe {
            #[command(flatten)]
            filters: FilterArgs,
        }
        let cmd = Observe::command();
        let blank: Vec<String> = cmd.get_arguments().filter(|a| a.get_help().is_none()).map(|a| a.get_id().to_string()).collect();
        assert!(blank.is_empty(), "flags without a description: {blank:?}");
        let help = Observe::command().render_long_help().to_string();
        assert!(help.contains("--not") && help.contains("deny list"), "{help}");
    }
}
