//! `flows audit`: denied connection attempts over a time range, grouped by source and
//! destination workload, port and protocol, from the relay's store.

use std::io::Write;

use flows_proto::{AuditGroup, AuditRequest, Timestamp, Verdict, history_client::HistoryClient};

use crate::{filters::FilterArgs, time::parse_time};

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuditFormat {
    Table,
    Json,
    Csv,
}

#[derive(clap::Args, Debug)]
pub struct AuditArgs {
    /// Address of the relay (host:port). Default: the running lab's relay.
    #[arg(long, env = "FLOWS_SERVER")]
    pub server: Option<String>,
    /// Start of the range: a duration before now (10m, 6h) or RFC 3339.
    #[arg(long, default_value = "1h")]
    pub since: String,
    /// End of the range (default: now).
    #[arg(long)]
    pub until: Option<String>,
    /// Only the N largest groups.
    #[arg(long)]
    pub top: Option<u64>,
    #[arg(short = 'o', long, value_enum, default_value_t = AuditFormat::Table)]
    pub output: AuditFormat,
    /// The lab's state directory (to find its relay).
    #[arg(long, env = "FLOWS_LAB_DIR")]
    pub lab_state: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub filters: FilterArgs,
    #[arg(skip)]
    pub not: Vec<std::ffi::OsString>,
}

fn ts(t: &Option<Timestamp>) -> String {
    t.and_then(|t| flows_proto::system_time(&t))
        .map(|st| humantime::format_rfc3339_millis(st).to_string())
        .unwrap_or_default()
}

fn side(ns: &str, workload: &str, kind: &str) -> String {
    match kind {
        "world" => format!("world:{workload}"),
        "" => workload.to_string(),
        _ if ns.is_empty() => workload.to_string(),
        _ => format!("{ns}/{workload}"),
    }
}

fn verdict(v: i32) -> &'static str {
    match Verdict::try_from(v) {
        Ok(Verdict::Dropped) => "DROPPED",
        Ok(Verdict::Audit) => "AUDIT",
        Ok(Verdict::Forwarded) => "FORWARDED",
        Ok(Verdict::Error) => "ERROR",
        _ => "UNKNOWN",
    }
}

/// One CSV field (RFC 4180 quoting) that is also safe where CSV ends up: in a terminal
/// (escaped as every printer does) and in a spreadsheet (a leading `=`, `+`, `-` or `@`
/// would make it a formula, so it is prefixed with `'`).
fn csv_field(s: &str) -> String {
    let mut s = crate::printer::escape(s);
    if s.starts_with(['=', '+', '-', '@']) {
        s.insert(0, '\'');
    }
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

fn print(groups: &[AuditGroup], format: AuditFormat, out: &mut impl Write) -> std::io::Result<()> {
    match format {
        AuditFormat::Json => {
            for g in groups {
                writeln!(out, "{}", serde_json::to_string(g).unwrap_or_default())?;
            }
        }
        AuditFormat::Csv => {
            writeln!(out, "verdict,source,destination,port,protocol,flows,first_seen,last_seen,drop_reasons,policies")?;
            for g in groups {
                let row = [
                    verdict(g.verdict).to_string(),
                    side(&g.source_namespace, &g.source_workload, &g.source_workload_kind),
                    side(&g.destination_namespace, &g.destination_workload, &g.destination_workload_kind),
                    g.destination_port.to_string(),
                    g.protocol.clone(),
                    g.flows.to_string(),
                    ts(&g.first_seen),
                    ts(&g.last_seen),
                    g.drop_reasons.join(" "),
                    g.policies.join(" "),
                ];
                writeln!(out, "{}", row.iter().map(|f| csv_field(f)).collect::<Vec<_>>().join(","))?;
            }
        }
        AuditFormat::Table => {
            let rows: Vec<[String; 8]> = groups
                .iter()
                .map(|g| {
                    [
                        verdict(g.verdict).to_string(),
                        side(&g.source_namespace, &g.source_workload, &g.source_workload_kind),
                        side(&g.destination_namespace, &g.destination_workload, &g.destination_workload_kind),
                        format!("{}/{}", g.destination_port, g.protocol),
                        g.flows.to_string(),
                        ts(&g.first_seen),
                        ts(&g.last_seen),
                        g.policies.iter().map(|p| p.split_once(':').map(|(_, n)| n).unwrap_or(p)).collect::<Vec<_>>().join(","),
                    ]
                })
                .collect();
            let head = ["VERDICT", "SOURCE", "DESTINATION", "PORT", "FLOWS", "FIRST SEEN", "LAST SEEN", "POLICIES"];
            crate::printer::columns(head, &rows, "", out)?;
        }
    }
    Ok(())
}

pub async fn run(args: AuditArgs) -> anyhow::Result<()> {
    let now = std::time::SystemTime::now();
    let since = Some(parse_time(&args.since, now)?);
    let until = args.until.as_deref().map(|u| parse_time(u, now)).transpose()?;
    let allow_list = args.filters.allow_list()?;
    let deny_list = crate::filters::deny_list(&args.not)?;
    crate::filters::validate(&allow_list, &deny_list)?;
    let lab_dir = args.lab_state.clone().unwrap_or_else(flows_lab::state::default_dir);
    let (server, dialer) = crate::connect::relay_or_flag(
        args.server.as_ref(),
        &lab_dir,
        "no relay: give --server host:port (a relay started with --store), or start the lab with --probes",
    )?;
    let mut client = HistoryClient::new(crate::connect::channel(&dialer, &server).await?);
    let resp = client
        .audit(AuditRequest {
            since,
            until,
            verdict: Vec::new(),
            allow_list,
            deny_list,
            top: args.top.unwrap_or(0),
        })
        .await
        .map_err(|s| match s.code() {
            tonic::Code::Unimplemented => anyhow::anyhow!("{server} keeps no history: start the relay with --store"),
            _ => anyhow::anyhow!("audit: {}", s.message()),
        })?
        .into_inner();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    print(&resp.groups, args.output, &mut out)?;
    if args.output == AuditFormat::Table && resp.groups.is_empty() {
        writeln!(out, "no denied attempts in the range")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_and_csv() {
        let g = AuditGroup {
            verdict: Verdict::Dropped as i32,
            source_namespace: "shop".into(),
            source_workload: "api".into(),
            source_workload_kind: "Deployment".into(),
            destination_namespace: String::new(),
            destination_workload: "203.0.113.7".into(),
            destination_workload_kind: "world".into(),
            destination_port: 443,
            protocol: "TCP".into(),
            flows: 3,
            policies: vec!["NetworkPolicy:shop/egress, \"strict\"".into()],
            ..Default::default()
        };
        let mut t = Vec::new();
        print(std::slice::from_ref(&g), AuditFormat::Table, &mut t).unwrap();
        let t = String::from_utf8(t).unwrap();
        assert!(t.lines().nth(1).unwrap().starts_with("DROPPED  shop/api  world:203.0.113.7  443/TCP"), "{t}");
        let mut c = Vec::new();
        print(&[g], AuditFormat::Csv, &mut c).unwrap();
        let c = String::from_utf8(c).unwrap();
        assert!(c.lines().nth(1).unwrap().ends_with(",\"NetworkPolicy:shop/egress, \"\"strict\"\"\""), "{c}");
    }

    #[test]
    fn hostile_strings_come_out_inert_in_table_and_csv() {
        use flows_flow::text::{HOSTILE, is_unsafe};
        let groups: Vec<AuditGroup> = HOSTILE
            .iter()
            .map(|h| AuditGroup {
                verdict: Verdict::Dropped as i32,
                source_namespace: h.to_string(),
                source_workload: h.to_string(),
                source_workload_kind: h.to_string(),
                destination_namespace: h.to_string(),
                destination_workload: h.to_string(),
                protocol: h.to_string(),
                drop_reasons: vec![h.to_string()],
                policies: vec![format!("NetworkPolicy:{h}")],
                ..Default::default()
            })
            .collect();
        for format in [AuditFormat::Table, AuditFormat::Csv] {
            let mut out = Vec::new();
            print(&groups, format, &mut out).unwrap();
            let out = String::from_utf8(out).unwrap();
            // One line per group plus the header: no field broke a line or hid text.
            assert_eq!(out.lines().count(), groups.len() + 1, "{out}");
            assert!(!out.chars().filter(|c| *c != '\n').any(is_unsafe), "{out:?}");
        }
        // A field a spreadsheet would run as a formula is not one.
        assert_eq!(csv_field("=HYPERLINK(\"x\")"), "\"'=HYPERLINK(\"\"x\"\")\"");
        assert_eq!(csv_field("@sum"), "'@sum");
    }
}
