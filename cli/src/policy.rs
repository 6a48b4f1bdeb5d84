//! `flows policy ...`: NetworkPolicy tools over manifests and flows.

use std::{
    io::{BufRead, Write},
    path::{Path, PathBuf},
};

use anyhow::Context;
use flows_policy::{Cluster, Endpoint, Engine, Protocol};
use serde::Deserialize;
use serde_json::json;

#[derive(clap::Subcommand, Debug)]
pub enum PolicyCommand {
    /// Evaluate connection attempts offline: "why was this dropped?"
    ///
    /// Reads JSON lines `{"src": "<ns>/<pod>" or an IP, "dst": ..., "protocol": "TCP",
    /// "port": 80}` and writes one JSON line per input with the verdict and the deciding
    /// policies. A bad line gets an error naming it; the others are still answered, and
    /// the exit status is then 1.
    Eval {
        /// NetworkPolicy, Pod and Namespace manifests: files or directories.
        #[arg(long, required = true, num_args = 1..)]
        manifests: Vec<PathBuf>,
        /// The attempts, one JSON object a line ("-" for standard input).
        #[arg(long)]
        flows: PathBuf,
    },
    /// Suggest least-privilege NetworkPolicies from the allowed traffic in the history,
    /// proven by replaying the window through them.
    ///
    /// A default deny per namespace, then per workload exactly the peers and ports that
    /// were observed. Exit status 1 (and nothing written) if the suggestion would deny
    /// an attempt that was allowed.
    Suggest(crate::advice::SuggestArgs),
    /// What-if: which attempts in the history would change verdict under proposed
    /// policies. Exit status 1 if anything allowed would be denied, 2 on error.
    Check(crate::advice::CheckArgs),
}

/// Manifest files: the files given, and *.yaml, *.yml, *.json in directories (sorted).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AttemptLine {
    src: String,
    dst: String,
    #[serde(default = "tcp")]
    protocol: String,
    port: u16,
}

fn tcp() -> String {
    "TCP".into()
}

fn endpoint<'a>(cluster: &'a Cluster, s: &str) -> Result<Endpoint<'a>, String> {
    if let Ok(ip) = s.parse() {
        return Ok(match cluster.pod_by_ip(ip) {
            Some(p) => Endpoint::Pod(p, Some(ip)),
            None => Endpoint::External(ip),
        });
    }
    let (ns, name) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?} is neither <namespace>/<pod> nor an IP address"))?;
    cluster
        .pod(ns, name)
        .map(|p| Endpoint::Pod(p, None))
        .ok_or_else(|| format!("no pod {s} in the manifests"))
}

/// Answers one input line (already known not to be blank).
pub fn eval_line(cluster: &Cluster, engine: &Engine, line: &str) -> Result<serde_json::Value, String> {
    let a: AttemptLine = serde_json::from_str(line).map_err(|e| format!("not an attempt: {e}"))?;
    let protocol = Protocol::from_flow(&a.protocol).ok_or_else(|| {
        format!(
            "protocol {:?}: expected TCP, UDP, SCTP, ICMPv4, ICMPv6 or L4-UNKNOWN (ports unreadable, or a protocol without ports)",
            a.protocol
        )
    })?;
    if protocol.has_ports() && a.port == 0 {
        return Err("port must be 1-65535".into());
    }
    // Only rules without ports decide the others: their port is no part of it.
    let port = if protocol.has_ports() { a.port } else { 0 };
    let src = endpoint(cluster, &a.src)?;
    let dst = endpoint(cluster, &a.dst)?;
    let d = engine.evaluate(cluster, &src, &dst, protocol, port);
    let names = |v: &[flows_policy::PolicyRef]| v.iter().map(|p| p.to_string()).collect::<Vec<_>>();
    Ok(json!({
        "src": a.src,
        "dst": a.dst,
        "protocol": protocol.as_str(),
        "port": port,
        "verdict": if d.allowed { "allow" } else { "deny" },
        "policies": names(&d.deciding()),
        "egress": {
            "allowed": d.egress.allowed,
            "isolated_by": names(&d.egress.isolated_by),
            "allowed_by": names(&d.egress.allowed_by),
        },
        "ingress": {
            "allowed": d.ingress.allowed,
            "isolated_by": names(&d.ingress.isolated_by),
            "allowed_by": names(&d.ingress.allowed_by),
        },
    }))
}

fn eval(manifests: &[PathBuf], flows: &Path) -> anyhow::Result<bool> {
    let m = crate::manifests::read_manifests(manifests)?;
    let engine = m.engine();
    let input: Box<dyn BufRead> = if flows == Path::new("-") {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(std::io::BufReader::new(
            std::fs::File::open(flows).with_context(|| format!("opening {}", flows.display()))?,
        ))
    };
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut all_ok = true;
    for (i, line) in input.lines().enumerate() {
        let n = i + 1;
        let line = line.with_context(|| format!("reading line {n}"))?;
        if line.trim().is_empty() {
            continue;
        }
        let v = match eval_line(&m.cluster, &engine, &line) {
            Ok(mut v) => {
                v["line"] = json!(n);
                v
            }
            Err(e) => {
                all_ok = false;
                json!({ "line": n, "error": format!("line {n}: {e}") })
            }
        };
        writeln!(out, "{v}")?;
    }
    out.flush()?;
    Ok(all_ok)
}

pub fn run(cmd: PolicyCommand) -> anyhow::Result<()> {
    let runtime = || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
    };
    // 1: the answer is "no" (would break traffic); 2: the question could not be answered.
    let answer = |r: anyhow::Result<bool>| -> ! {
        match r {
            Ok(true) => std::process::exit(0),
            Ok(false) => std::process::exit(1),
            Err(e) => {
                eprintln!("Error: {e:#}");
                std::process::exit(2)
            }
        }
    };
    match cmd {
        PolicyCommand::Eval { manifests, flows } => {
            if !eval(&manifests, &flows)? {
                std::process::exit(1);
            }
            Ok(())
        }
        PolicyCommand::Suggest(args) => answer(runtime()?.block_on(crate::advice::suggest(args))),
        PolicyCommand::Check(args) => answer(runtime()?.block_on(crate::advice::check(args))),
    }
}
