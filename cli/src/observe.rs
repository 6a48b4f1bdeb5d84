//! `flows observe`: read flows from a node-probe (or the relay) and print them.

use std::{io::Write, path::PathBuf, time::Duration};

use anyhow::Context;
use flows_proto::{
    Flow, GetFlowsRequest, GetFlowsResponse, get_flows_response::ResponseTypes,
    observer_client::ObserverClient,
};

use crate::{
    time::parse_time,
    filters::FilterArgs,
    printer::{Format, Printer},
};

#[derive(clap::Args, Debug)]
pub struct ObserveArgs {
    /// Address of a node-probe or relay (host:port); repeat to read several node-probes.
    /// Default: the running lab's node-probes, else 127.0.0.1:4245.
    #[arg(long, env = "FLOWS_SERVER", value_delimiter = ',')]
    pub server: Vec<String>,
    /// The last N flows (default 20 when neither --first, --all nor --follow is given).
    #[arg(long, conflicts_with_all = ["first", "all"])]
    pub last: Option<u64>,
    /// The first N flows still in the ring.
    #[arg(long, conflicts_with_all = ["all", "follow"])]
    pub first: Option<u64>,
    /// Every flow in the ring.
    #[arg(long)]
    pub all: bool,
    /// Keep printing flows as they arrive.
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// Only flows since this time: a duration ago (5m, 1h30m) or RFC 3339.
    #[arg(long)]
    pub since: Option<String>,
    /// Only flows before this time: a duration ago or RFC 3339.
    #[arg(long)]
    pub until: Option<String>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Format::Compact)]
    pub output: Format,
    /// Print the node that observed each flow.
    #[arg(long)]
    pub print_node_name: bool,
    /// Name endpoints from the lab's record of its pods (default: the running lab, if any).
    #[arg(long, env = "FLOWS_LAB_DIR")]
    pub lab_state: Option<PathBuf>,
    /// Stop after this many seconds (for scripts; default: run until the stream ends).
    #[arg(long)]
    pub timeout: Option<f64>,
    /// Read flows from a file of JSON lines (`-o json` output; "-" for standard input)
    /// instead of a server, through the same filters and printer.
    #[arg(long)]
    pub input_file: Option<PathBuf>,
    #[command(flatten)]
    pub filters: FilterArgs,
    /// `--not <flag> [value]`: the flags that follow `--not` make the deny list (taken
    /// out of the command line before parsing; see `filters::split_not`).
    #[arg(skip)]
    pub not: Vec<std::ffi::OsString>,
}

pub fn request(args: &ObserveArgs) -> anyhow::Result<GetFlowsRequest> {
    let now = std::time::SystemTime::now();
    let since = args.since.as_deref().map(|s| parse_time(s, now)).transpose()?;
    let until = args.until.as_deref().map(|s| parse_time(s, now)).transpose()?;
    let (number, first) = match (args.last, args.first, args.all) {
        (Some(n), _, _) => (n, false),
        (_, Some(n), _) => (n, true),
        (_, _, true) => (0, false),
        // Like hubble: the last 20, or with --follow only new flows; a time window
        // without a count means everything in it.
        _ if args.follow => (0, false),
        _ if since.is_some() || until.is_some() => (0, false),
        _ => (20, false),
    };
    let allow_list = args.filters.allow_list()?;
    let deny_list = crate::filters::deny_list(&args.not)?;
    crate::filters::validate(&allow_list, &deny_list)?;
    Ok(GetFlowsRequest {
        number,
        first,
        follow: args.follow,
        since,
        until,
        allow_list,
        deny_list,
    })
}

/// `--input-file`: the request applied to flows read from JSON lines.
fn from_file(args: &ObserveArgs, req: &GetFlowsRequest, path: &std::path::Path) -> anyhow::Result<()> {
    use std::io::BufRead;
    let filters = flows_flow::FilterSet::new(&req.allow_list, &req.deny_list)?;
    let input: Box<dyn BufRead> = if path == std::path::Path::new("-") {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(std::io::BufReader::new(
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?,
        ))
    };
    let key = |t: &Option<flows_proto::Timestamp>| t.map(|t| (t.seconds, t.nanos));
    let mut flows = Vec::new();
    let mut bad = 0usize;
    for (i, line) in input.lines().enumerate() {
        let line = line.with_context(|| format!("reading line {}", i + 1))?;
        match flows_flow::jsonl::read_line(&line) {
            Ok(Some(GetFlowsResponse { response_types: Some(ResponseTypes::Flow(f)), .. })) => {
                let t = key(&f.time);
                let in_window = req.since.as_ref().is_none_or(|s| t >= Some((s.seconds, s.nanos)))
                    && req.until.as_ref().is_none_or(|u| t < Some((u.seconds, u.nanos)));
                if in_window && filters.matches(&f) {
                    flows.push(f);
                }
            }
            // Blank lines, and the lost-events and node-status records a saved stream has.
            Ok(_) => {}
            Err(e) => {
                bad += 1;
                eprintln!("{}:{}: {e}", path.display(), i + 1);
            }
        }
    }
    let n = req.number as usize;
    if n > 0 {
        if req.first {
            flows.truncate(n);
        } else if flows.len() > n {
            flows.drain(..flows.len() - n);
        }
    }
    let mut printer = Printer::new(args.output, args.print_node_name);
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for f in &flows {
        printer.flow(&mut out, f)?;
    }
    if bad > 0 {
        anyhow::bail!("{bad} line(s) of {} were not flows", path.display());
    }
    Ok(())
}

pub async fn run(args: ObserveArgs) -> anyhow::Result<()> {
    let req = request(&args)?;
    if let Some(path) = &args.input_file {
        let mut req = req;
        // A file is history: without a count, all of it.
        if args.last.is_none() && args.first.is_none() {
            req.number = 0;
        }
        return from_file(&args, &req, path);
    }
    let lab_dir = args
        .lab_state
        .clone()
        .unwrap_or_else(flows_lab::state::default_dir);
    let relay = crate::lab::probes::relay_address(&lab_dir);
    let servers = if !args.server.is_empty() {
        args.server.clone()
    } else if let Some(relay) = &relay {
        // The lab's relay: every node, merged in time order, with addresses named.
        vec![relay.clone()]
    } else {
        let lab = crate::lab::probes::addresses(&lab_dir);
        if lab.is_empty() {
            vec!["127.0.0.1:4245".to_string()]
        } else {
            lab
        }
    };
    // Flows read from the lab's node-probes directly are named here, as the relay would.
    let index = if servers.len() == 1 && relay.as_ref() == servers.first() {
        None
    } else {
        let manifests = flows_lab::manifests::dir(&lab_dir);
        match flows_k8s::manifests::read(&manifests, Vec::new()) {
            Ok(ix) => Some(ix),
            Err(e) if args.lab_state.is_some() => {
                return Err(anyhow::Error::new(e).context("reading the lab's cluster manifests"));
            }
            Err(_) => None,
        }
    };
    let lab_server = match (args.server.is_empty(), &relay) {
        (false, _) => None,
        (true, Some(_)) => Some(crate::connect::LabServer::Relay),
        (true, None) => Some(crate::connect::LabServer::Probe),
    };
    let dialer = crate::connect::dialer(&lab_dir, lab_server)?;
    // Several servers without --follow: gather, then print in time order (the relay
    // will do this merge for a cluster).
    let sort = servers.len() > 1 && !args.follow;
    let mut printer = Printer::new(args.output, args.print_node_name);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<anyhow::Result<ResponseTypes>>(1024);
    for server in &servers {
        let tx = tx.clone();
        let req = req.clone();
        let server = server.clone();
        let dialer = dialer.clone();
        tokio::spawn(async move {
            if let Err(e) = stream_from(&dialer, &server, req, tx.clone()).await {
                let _ = tx.send(Err(e)).await;
            }
        });
    }
    drop(tx);
    let deadline = args.timeout.map(Duration::from_secs_f64);
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut held: Vec<Flow> = Vec::new();
    let run = async {
        while let Some(item) = rx.recv().await {
            match item? {
                ResponseTypes::Flow(mut f) => {
                    if let Some(ix) = &index {
                        flows_flow::enrich::annotate(&mut f, ix, ix);
                    }
                    if sort {
                        held.push(f);
                        continue;
                    }
                    printer.flow(&mut out, &f)?;
                }
                ResponseTypes::LostEvents(l) => printer.lost(&mut out, &l)?,
                ResponseTypes::NodeStatus(s) => printer.node_status(&mut out, &s)?,
            }
            out.flush()?;
        }
        anyhow::Ok(())
    };
    let result = match deadline {
        Some(d) => match tokio::time::timeout(d, run).await {
            Ok(r) => r,
            Err(_) => Ok(()),
        },
        None => run.await,
    };
    held.sort_by_key(|f| f.time.map(|t| (t.seconds, t.nanos)));
    for f in &held {
        printer.flow(&mut out, f)?;
    }
    result
}

/// Reads one server's flows into `tx`. With `follow`, a stream that breaks after it was
/// open (a relay restart) is reopened with backoff, from the time of the last flow
/// received, skipping the flows of that instant already printed: a restart is a gap in
/// time on stderr, not the end of `flows observe -f`.
async fn stream_from(
    dialer: &flows_tls::Dialer,
    server: &str,
    req: GetFlowsRequest,
    tx: tokio::sync::mpsc::Sender<anyhow::Result<ResponseTypes>>,
) -> anyhow::Result<()> {
    let mut req = req;
    let mut opened = false;
    let mut last: Option<(flows_proto::Timestamp, Vec<String>)> = None;
    let mut delay = Duration::from_millis(200);
    loop {
        let result = async {
            let mut client = ObserverClient::new(crate::connect::channel(dialer, server).await?);
            let mut stream = client
                .get_flows(req.clone())
                .await
                .with_context(|| format!("GetFlows on {server}"))?
                .into_inner();
            opened = true;
            delay = Duration::from_millis(200);
            while let Some(resp) = stream
                .message()
                .await
                .with_context(|| format!("reading flows from {server}"))?
            {
                let Some(r) = resp.response_types else { continue };
                if let ResponseTypes::Flow(f) = &r {
                    if let Some(t) = f.time {
                        match &mut last {
                            Some((lt, ids)) if *lt == t => {
                                if ids.contains(&f.uuid) {
                                    continue;
                                }
                                ids.push(f.uuid.clone());
                            }
                            _ => last = Some((t, vec![f.uuid.clone()])),
                        }
                    }
                }
                if tx.send(Ok(r)).await.is_err() {
                    return Ok(true);
                }
            }
            Ok::<bool, anyhow::Error>(false)
        }
        .await;
        match result {
            Ok(true) => return Ok(()),
            Ok(false) if !req.follow => return Ok(()),
            Err(e) if !(req.follow && opened) => return Err(e),
            Ok(false) => eprintln!("flows: {server} ended the stream; reconnecting"),
            Err(e) => eprintln!("flows: {e:#}; reconnecting in {delay:?}"),
        }
        if tx.is_closed() {
            return Ok(());
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
        // Resume where the printed flows end: no history again, nothing missed that
        // the server still holds.
        if let Some((t, _)) = &last {
            req.since = Some(*t);
            req.number = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times() {
        let now = std::time::UNIX_EPOCH + Duration::from_secs(10_000);
        assert_eq!(parse_time("5m", now).expect("dur").seconds, 10_000 - 300);
        assert_eq!(
            parse_time("1970-01-01T01:00:00Z", now).expect("rfc").seconds,
            3600
        );
        assert!(parse_time("yesterday-ish", now).is_err());
    }
}
