//! The traffic driver: runs a scenario of connections between pods, services and the world,
//! each attempt from inside the source's netns, and reports every attempt with its exact
//! 5-tuple (the local port comes from getsockname, so it can be matched against what the
//! datapath saw).
//!
//! For ICMP the echo identifier (the ping socket's local port) is reported as both src_port
//! and dst_port, which is how the flow tuples of this project key ICMP echo.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use socket2::{Domain, Socket, Type};

use crate::dns;
use crate::error::LabError;
use crate::netns::{self, Switcher};
use crate::plan::{KUBE_DNS_SERVICE, KUBE_SYSTEM};
use crate::state::State;
use crate::time::rfc3339_nanos;

/// A list of connections to make, read from YAML.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub connections: Vec<Connection>,
    /// Where the scenario came from, for messages.
    #[serde(skip)]
    pub source: String,
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Connection {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// "ns/pod", "ns/deployment" (its pods round-robin), "world" or a node name.
    pub from: String,
    pub to: Target,
    pub protocol: Protocol,
    /// Required for TCP and UDP; for a service, the service port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default)]
    pub family: FamilyChoice,
    #[serde(default = "default_count")]
    pub count: u32,
    /// Attempts per second; absent: as fast as possible.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<f64>,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect: Option<Expect>,
    /// For DNS (port 53, or whenever set): the name to query. Default: kube-dns's own name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_name: Option<String>,
}

fn default_count() -> u32 {
    1
}

fn default_timeout_ms() -> u64 {
    1000
}

/// Exactly one of the fields.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    /// "ns/pod" or "ns/deployment".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// "ns/service": its ClusterIP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// An address, or "world" for the world host's address of the attempt's family.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
}

impl Target {
    /// As written in the scenario: "pod:ns/name", "service:ns/name", "ip:1.2.3.4".
    pub fn label(&self) -> String {
        match (&self.pod, &self.service, &self.ip) {
            (Some(p), _, _) => format!("pod:{p}"),
            (_, Some(s), _) => format!("service:{s}"),
            (_, _, Some(i)) => format!("ip:{i}"),
            _ => "(none)".to_string(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize, Serialize)]
pub enum Protocol {
    #[serde(rename = "TCP", alias = "tcp")]
    Tcp,
    #[serde(rename = "UDP", alias = "udp")]
    Udp,
    #[serde(rename = "ICMP", alias = "icmp")]
    Icmp,
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Icmp => "ICMP",
        })
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FamilyChoice {
    #[default]
    Ipv4,
    Ipv6,
    Both,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Family::Ipv4 => "ipv4",
            Family::Ipv6 => "ipv6",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Expect {
    Success,
    Failure,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Success,
    Failure,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DriveOptions {
    /// Attempts of one connection in flight at once (threads). 1: strictly sequential.
    pub concurrency: usize,
}

impl Default for DriveOptions {
    fn default() -> Self {
        DriveOptions { concurrency: 1 }
    }
}

/// One attempt, with the 5-tuple as the source saw it.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub struct AttemptReport {
    pub connection: String,
    pub index: u32,
    /// The source: "ns/pod", "world" or a node name.
    pub from: String,
    /// The target as written ("service:backend/backend").
    pub to: String,
    /// What it resolved to for this attempt ("backend/backend-xyz", "world", an address).
    pub to_resolved: String,
    pub target_ip: IpAddr,
    pub family: Family,
    pub protocol: Protocol,
    pub src_ip: Option<IpAddr>,
    /// The real local port (getsockname); for ICMP the echo identifier.
    pub src_port: Option<u16>,
    pub dst_ip: IpAddr,
    /// For ICMP the echo identifier, as the flow tuples key it.
    pub dst_port: u16,
    pub outcome: Outcome,
    pub error: Option<String>,
    /// What came back: the server's line, DNS answers.
    pub reply: Option<String>,
    /// RFC 3339 with nanoseconds.
    pub started_at: String,
    pub duration_us: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub struct ConnectionReport {
    pub name: String,
    pub from: String,
    pub to: String,
    pub protocol: Protocol,
    pub port: Option<u16>,
    pub family: FamilyChoice,
    pub attempted: u32,
    pub succeeded: u32,
    pub failed: u32,
    pub expect: Option<Expect>,
    /// `None` when nothing was expected.
    pub met_expectation: Option<bool>,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub struct Report {
    pub connections: Vec<ConnectionReport>,
    pub attempts: Vec<AttemptReport>,
    pub attempted: u32,
    pub succeeded: u32,
    pub failed: u32,
    /// True when every connection with an `expect` met it.
    pub expectations_met: bool,
}

impl Scenario {
    /// Reads and validates a scenario file.
    pub fn load(path: &Path) -> Result<Scenario, LabError> {
        let text = std::fs::read_to_string(path).map_err(|e| LabError::io(path, e))?;
        Scenario::parse(&path.display().to_string(), &text)
    }

    /// Parses and validates scenario YAML; `source` names it in errors.
    pub fn parse(source: &str, text: &str) -> Result<Scenario, LabError> {
        let de = serde_yaml::Deserializer::from_str(text);
        let mut scenario: Scenario = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let message = e.into_inner().to_string();
            let message = message
                .strip_prefix(&format!("{path}: "))
                .map(str::to_owned)
                .unwrap_or(message);
            // "connections[2].protocol" -> at "connections[2]", field "protocol".
            let (at, field) = match path
                .strip_prefix("connections[")
                .and_then(|r| r.split_once(']'))
            {
                Some((i, rest)) => (
                    format!("connections[{i}]"),
                    rest.trim_start_matches('.').to_string(),
                ),
                None => ("scenario".to_string(), path),
            };
            LabError::Scenario {
                file: source.to_string(),
                at,
                field: if field.is_empty() || field == "." {
                    "(item)".to_string()
                } else {
                    field
                },
                message,
            }
        })?;
        scenario.source = source.to_string();
        for i in 0..scenario.connections.len() {
            validate(&scenario, i)?;
        }
        Ok(scenario)
    }

    fn err(&self, i: usize, field: &str, message: impl Into<String>) -> LabError {
        let name = self
            .connections
            .get(i)
            .map(connection_name)
            .unwrap_or_default();
        LabError::Scenario {
            file: if self.source.is_empty() {
                "(scenario)".to_string()
            } else {
                self.source.clone()
            },
            at: format!("connections[{i}] ({name})"),
            field: field.to_string(),
            message: message.into(),
        }
    }
}

/// The connection's name, or one made from what it does.
pub fn connection_name(c: &Connection) -> String {
    match &c.name {
        Some(n) => n.clone(),
        None => match c.port {
            Some(p) => format!("{}->{} {}/{p}", c.from, c.to.label(), c.protocol),
            None => format!("{}->{} {}", c.from, c.to.label(), c.protocol),
        },
    }
}

fn split_ns_name(s: &str) -> Option<(&str, &str)> {
    let (ns, name) = s.split_once('/')?;
    (!ns.is_empty() && !name.is_empty() && !name.contains('/')).then_some((ns, name))
}

fn validate(s: &Scenario, i: usize) -> Result<(), LabError> {
    let c = &s.connections[i];
    let is_node = c
        .from
        .strip_prefix("node-")
        .is_some_and(|n| n.parse::<usize>().is_ok());
    if c.from != "world" && !is_node && split_ns_name(&c.from).is_none() {
        return Err(s.err(
            i,
            "from",
            format!(
                "{:?}: expected ns/pod, ns/deployment, world or node-N",
                c.from
            ),
        ));
    }
    let set = [
        c.to.pod.is_some(),
        c.to.service.is_some(),
        c.to.ip.is_some(),
    ];
    if set.iter().filter(|x| **x).count() != 1 {
        return Err(s.err(i, "to", "give exactly one of pod, service or ip"));
    }
    if let Some(p) = c.to.pod.as_deref().filter(|p| split_ns_name(p).is_none()) {
        return Err(s.err(i, "to.pod", format!("{p:?}: expected ns/name")));
    }
    if let Some(p) =
        c.to.service
            .as_deref()
            .filter(|p| split_ns_name(p).is_none())
    {
        return Err(s.err(i, "to.service", format!("{p:?}: expected ns/name")));
    }
    if let Some(ip) = &c.to.ip
        && ip != "world"
    {
        let addr: IpAddr = ip.parse().map_err(|_| {
            s.err(
                i,
                "to.ip",
                format!("{ip:?} is not an IP address (or \"world\")"),
            )
        })?;
        let ok = matches!(
            (addr, c.family),
            (IpAddr::V4(_), FamilyChoice::Ipv4) | (IpAddr::V6(_), FamilyChoice::Ipv6)
        );
        if !ok {
            return Err(s.err(
                i,
                "family",
                format!(
                    "{:?} does not fit an {} address; use family ipv4 or ipv6 to match",
                    c.family,
                    if addr.is_ipv4() { "IPv4" } else { "IPv6" }
                ),
            ));
        }
    }
    match (c.protocol, c.port) {
        (Protocol::Icmp, Some(_)) => return Err(s.err(i, "port", "not used with ICMP")),
        (Protocol::Tcp | Protocol::Udp, None) => {
            return Err(s.err(i, "port", "required for TCP and UDP"));
        }
        (Protocol::Tcp | Protocol::Udp, Some(0)) => {
            return Err(s.err(i, "port", "must be 1-65535"));
        }
        _ => {}
    }
    if c.dns_name.is_some() && c.protocol == Protocol::Icmp {
        return Err(s.err(i, "dns_name", "only for TCP or UDP"));
    }
    if !(1..=1_000_000).contains(&c.count) {
        return Err(s.err(i, "count", "must be 1-1000000"));
    }
    if let Some(r) = c.rate
        && !(r.is_finite() && r > 0.0)
    {
        return Err(s.err(
            i,
            "rate",
            "must be a positive number of attempts per second",
        ));
    }
    if !(1..=600_000).contains(&c.timeout_ms) {
        return Err(s.err(i, "timeout_ms", "must be 1-600000"));
    }
    Ok(())
}

/// A place traffic leaves from.
#[derive(Clone, Debug)]
struct Endpoint {
    label: String,
    netns: String,
}

fn resolve_from(state: &State, s: &Scenario, i: usize) -> Result<Vec<Endpoint>, LabError> {
    let from = &s.connections[i].from;
    if from == "world" {
        return Ok(vec![Endpoint {
            label: "world".to_string(),
            netns: state.world.netns.clone(),
        }]);
    }
    if let Some(n) = state.node(from) {
        return Ok(vec![Endpoint {
            label: n.name.clone(),
            netns: n.netns.clone(),
        }]);
    }
    let (ns, name) = split_ns_name(from).ok_or_else(|| s.err(i, "from", "expected ns/name"))?;
    let pods = match state.pod(ns, name) {
        Some(p) => vec![p],
        None => state.deployment_pods(ns, name),
    };
    if pods.is_empty() {
        return Err(s.err(i, "from", format!("no pod or deployment {from} in the lab")));
    }
    Ok(pods
        .into_iter()
        .map(|p| Endpoint {
            label: format!("{}/{}", p.namespace, p.name),
            netns: p.netns.clone(),
        })
        .collect())
}

/// A target: its label and its addresses (an IP target has only one family).
type Resolved = (String, Option<Ipv4Addr>, Option<Ipv6Addr>);

fn resolve_to(state: &State, s: &Scenario, i: usize) -> Result<Vec<Resolved>, LabError> {
    let to = &s.connections[i].to;
    if let Some(p) = &to.pod {
        let (ns, name) = split_ns_name(p).ok_or_else(|| s.err(i, "to.pod", "expected ns/name"))?;
        let pods = match state.pod(ns, name) {
            Some(p) => vec![p],
            None => state.deployment_pods(ns, name),
        };
        if pods.is_empty() {
            return Err(s.err(i, "to.pod", format!("no pod or deployment {p} in the lab")));
        }
        return Ok(pods
            .into_iter()
            .map(|p| {
                (
                    format!("{}/{}", p.namespace, p.name),
                    Some(p.ipv4),
                    Some(p.ipv6),
                )
            })
            .collect());
    }
    if let Some(svc) = &to.service {
        let (ns, name) =
            split_ns_name(svc).ok_or_else(|| s.err(i, "to.service", "expected ns/name"))?;
        let rec = state
            .service(ns, name)
            .ok_or_else(|| s.err(i, "to.service", format!("no service {svc} in the lab")))?;
        return Ok(vec![(
            svc.clone(),
            Some(rec.cluster_ipv4),
            Some(rec.cluster_ipv6),
        )]);
    }
    match to.ip.as_deref() {
        Some("world") => Ok(vec![(
            "world".to_string(),
            Some(state.world.ipv4),
            Some(state.world.ipv6),
        )]),
        Some(ip) => {
            let addr: IpAddr = ip
                .parse()
                .map_err(|_| s.err(i, "to.ip", "not an IP address"))?;
            let label = state.owner_of_ip(addr).unwrap_or_else(|| addr.to_string());
            Ok(vec![match addr {
                IpAddr::V4(a) => (label, Some(a), None),
                IpAddr::V6(a) => (label, None, Some(a)),
            }])
        }
        None => Err(s.err(i, "to", "give exactly one of pod, service or ip")),
    }
}

/// One planned attempt.
#[derive(Clone, Debug)]
struct Planned {
    index: u32,
    from: Endpoint,
    to_resolved: String,
    dst: IpAddr,
    family: Family,
}

/// Runs every connection of the scenario in order and reports every attempt.
pub fn run(state: &State, scenario: &Scenario, opts: &DriveOptions) -> Result<Report, LabError> {
    // Resolve everything first: a typo fails before any traffic is sent.
    let mut plans = Vec::new();
    for i in 0..scenario.connections.len() {
        validate(scenario, i)?;
        let c = &scenario.connections[i];
        let sources = resolve_from(state, scenario, i)?;
        let targets = resolve_to(state, scenario, i)?;
        for src in &sources {
            if !netns::netns_exists(&src.netns) {
                return Err(scenario.err(
                    i,
                    "from",
                    format!("netns {} does not exist: is the lab up?", src.netns),
                ));
            }
        }
        let families: &[Family] = match c.family {
            FamilyChoice::Ipv4 => &[Family::Ipv4],
            FamilyChoice::Ipv6 => &[Family::Ipv6],
            FamilyChoice::Both => &[Family::Ipv4, Family::Ipv6],
        };
        let mut attempts = Vec::new();
        for n in 0..c.count as usize {
            for &family in families {
                let src = sources[n % sources.len()].clone();
                let (label, v4, v6) = &targets[n % targets.len()];
                let dst = match family {
                    Family::Ipv4 => v4.map(IpAddr::V4),
                    Family::Ipv6 => v6.map(IpAddr::V6),
                };
                let Some(dst) = dst else {
                    return Err(scenario.err(
                        i,
                        "family",
                        format!("{label} has no {family} address"),
                    ));
                };
                attempts.push(Planned {
                    index: attempts.len() as u32,
                    from: src,
                    to_resolved: label.clone(),
                    dst,
                    family,
                });
            }
        }
        plans.push(attempts);
    }

    let mut report = Report {
        connections: Vec::new(),
        attempts: Vec::new(),
        attempted: 0,
        succeeded: 0,
        failed: 0,
        expectations_met: true,
    };
    for (c, attempts) in scenario.connections.iter().zip(plans) {
        let results = run_connection(c, &attempts, opts.concurrency.max(1));
        let succeeded = results
            .iter()
            .filter(|a| a.outcome == Outcome::Success)
            .count() as u32;
        let attempted = results.len() as u32;
        let failed = attempted - succeeded;
        let met = c.expect.map(|e| match e {
            Expect::Success => failed == 0,
            Expect::Failure => succeeded == 0,
        });
        if met == Some(false) {
            report.expectations_met = false;
        }
        report.attempted += attempted;
        report.succeeded += succeeded;
        report.failed += failed;
        report.connections.push(ConnectionReport {
            name: connection_name(c),
            from: c.from.clone(),
            to: c.to.label(),
            protocol: c.protocol,
            port: c.port,
            family: c.family,
            attempted,
            succeeded,
            failed,
            expect: c.expect,
            met_expectation: met,
        });
        report.attempts.extend(results);
    }
    Ok(report)
}

/// Runs one connection's attempts on up to `concurrency` threads, paced by `rate`.
fn run_connection(c: &Connection, attempts: &[Planned], concurrency: usize) -> Vec<AttemptReport> {
    let name = connection_name(c);
    let to = c.to.label();
    let slots: Mutex<Vec<Option<AttemptReport>>> = Mutex::new(vec![None; attempts.len()]);
    let next = AtomicUsize::new(0);
    let t0 = Instant::now();
    let workers = concurrency.min(attempts.len()).max(1);
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                // This thread moves between netns; it is dedicated to the driver.
                let mut switcher = Switcher::default();
                loop {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    let Some(plan) = attempts.get(k) else { break };
                    if let Some(rate) = c.rate {
                        let due = t0 + Duration::from_secs_f64(k as f64 / rate);
                        let now = Instant::now();
                        if due > now {
                            std::thread::sleep(due - now);
                        }
                    }
                    let report = attempt(c, &name, &to, plan, &mut switcher);
                    if let Ok(mut slots) = slots.lock() {
                        slots[k] = Some(report);
                    }
                }
            });
        }
    });
    slots
        .into_inner()
        .unwrap_or_default()
        .into_iter()
        .flatten()
        .collect()
}

/// What a probe found out.
struct Probe {
    src: Option<SocketAddr>,
    result: Result<Option<String>, String>,
}

impl Probe {
    fn failed(src: Option<SocketAddr>, msg: String) -> Probe {
        Probe {
            src,
            result: Err(msg),
        }
    }
}

fn attempt(
    c: &Connection,
    name: &str,
    to: &str,
    plan: &Planned,
    switcher: &mut Switcher,
) -> AttemptReport {
    let started_at = SystemTime::now();
    let t = Instant::now();
    let timeout = Duration::from_millis(c.timeout_ms);
    let port = c.port.unwrap_or(0);
    let dst = SocketAddr::new(plan.dst, port);
    let dns_query = (c.dns_name.is_some() || port == 53).then(|| {
        let name = c
            .dns_name
            .clone()
            .unwrap_or_else(|| format!("{KUBE_DNS_SERVICE}.{KUBE_SYSTEM}.svc.cluster.local"));
        let qtype = match plan.family {
            Family::Ipv4 => dns::TYPE_A,
            Family::Ipv6 => dns::TYPE_AAAA,
        };
        // Any id works; vary it so replies to earlier attempts are not taken for this one.
        let id = (started_at
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0) as u16)
            ^ (plan.index as u16);
        (id, dns::build_query(id, &name, qtype))
    });
    let probe = match switcher.enter(&plan.from.netns) {
        Err(e) => Probe::failed(None, e.to_string()),
        Ok(()) => match c.protocol {
            Protocol::Tcp => tcp_probe(dst, timeout, dns_query.as_ref()),
            Protocol::Udp => udp_probe(dst, timeout, dns_query.as_ref(), plan.index),
            Protocol::Icmp => icmp_probe(plan.dst, timeout, plan.index as u16),
        },
    };
    let duration_us = t.elapsed().as_micros() as u64;
    let src = probe.src.filter(|a| a.port() != 0);
    let (dst_port, src_port) = match c.protocol {
        Protocol::Icmp => {
            let id = src.map(|a| a.port());
            (id.unwrap_or(0), id)
        }
        _ => (port, src.map(|a| a.port())),
    };
    let (outcome, error, reply) = match probe.result {
        Ok(reply) => (Outcome::Success, None, reply),
        Err(e) => (Outcome::Failure, Some(e), None),
    };
    AttemptReport {
        connection: name.to_string(),
        index: plan.index,
        from: plan.from.label.clone(),
        to: to.to_string(),
        to_resolved: plan.to_resolved.clone(),
        target_ip: plan.dst,
        family: plan.family,
        protocol: c.protocol,
        src_ip: src.map(|a| a.ip()),
        src_port,
        dst_ip: plan.dst,
        dst_port,
        outcome,
        error,
        reply,
        started_at: rfc3339_nanos(started_at),
        duration_us,
    }
}

fn describe(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => "connection refused".to_string(),
        Some(libc::ECONNRESET) => "connection reset".to_string(),
        Some(libc::EHOSTUNREACH) => "host unreachable".to_string(),
        Some(libc::ENETUNREACH) => "network unreachable".to_string(),
        Some(libc::ETIMEDOUT) => "timed out".to_string(),
        _ => e.to_string(),
    }
}

/// Waits for `events` on `fd` until `deadline`; false on timeout.
fn wait_fd(fd: i32, events: i16, deadline: Instant) -> std::io::Result<bool> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(false);
        }
        let mut pfd = libc::pollfd {
            fd,
            events,
            revents: 0,
        };
        let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd for the duration of the call.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc > 0 {
            return Ok(true);
        }
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

fn local(socket: &Socket) -> Option<SocketAddr> {
    socket.local_addr().ok().and_then(|a| a.as_socket())
}

/// TCP: connect, then (line servers) read until the server closes, or (DNS) query and read
/// one answer.
fn tcp_probe(dst: SocketAddr, timeout: Duration, dns_query: Option<&(u16, Vec<u8>)>) -> Probe {
    let deadline = Instant::now() + timeout;
    let socket = match Socket::new(
        Domain::for_address(dst),
        Type::STREAM,
        Some(socket2::Protocol::TCP),
    ) {
        Ok(s) => s,
        Err(e) => {
            return Probe::failed(None, format!("socket: {e}"));
        }
    };
    if let Err(e) = socket.set_nonblocking(true) {
        return Probe::failed(None, format!("socket: {e}"));
    }
    let connected = socket.connect(&dst.into());
    // The local port is chosen by connect(): read it now, whatever happens next.
    let src = local(&socket);
    let fail = |msg: String| Probe::failed(src, msg);
    match connected {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return fail(describe(&e)),
    }
    match wait_fd(socket.as_raw_fd(), libc::POLLOUT, deadline) {
        Ok(true) => {}
        Ok(false) => {
            return fail(format!(
                "timeout: no connection within {}ms",
                timeout.as_millis()
            ));
        }
        Err(e) => return fail(format!("poll: {e}")),
    }
    match socket.take_error() {
        Ok(None) => {}
        Ok(Some(e)) | Err(e) => return fail(describe(&e)),
    }
    let mut stream: TcpStream = socket.into();
    if let Err(e) = stream.set_nonblocking(false) {
        return fail(format!("socket: {e}"));
    }
    if let Some((_, query)) = dns_query {
        let mut framed = (query.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(query);
        if let Err(e) = stream.write_all(&framed) {
            return fail(format!("send: {}", describe(&e)));
        }
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some((id, _)) = dns_query
            && got.len() >= 2
        {
            let len = usize::from(u16::from_be_bytes([got[0], got[1]]));
            if got.len() >= 2 + len {
                return Probe {
                    src,
                    result: dns_result(*id, &got[2..2 + len]),
                };
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return fail(format!(
                "timeout: the server did not finish within {}ms",
                timeout.as_millis()
            ));
        }
        match stream.read(&mut buf) {
            Ok(0) if dns_query.is_some() => {
                return fail("connection closed before a DNS answer".to_string());
            }
            Ok(0) => {
                let line = String::from_utf8_lossy(&got)
                    .trim()
                    .chars()
                    .take(200)
                    .collect::<String>();
                return Probe {
                    src,
                    result: Ok(Some(line).filter(|l| !l.is_empty())),
                };
            }
            Ok(n) => {
                if got.len() < 65536 {
                    got.extend_from_slice(&buf[..n]);
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return fail(format!(
                    "timeout: the server did not finish within {}ms",
                    timeout.as_millis()
                ));
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return fail(describe(&e)),
        }
    }
}

fn dns_result(id: u16, msg: &[u8]) -> Result<Option<String>, String> {
    let r = dns::parse_response(msg).map_err(|e| format!("bad DNS answer: {e}"))?;
    if r.id != id {
        return Err(format!(
            "DNS answer for another query (id {} != {id})",
            r.id
        ));
    }
    if r.rcode != dns::RCODE_NOERROR {
        return Err(format!("DNS {}", dns::rcode_name(r.rcode)));
    }
    if r.answers.is_empty() {
        return Err("DNS NOERROR without an address".to_string());
    }
    let ips: Vec<String> = r.answers.iter().map(IpAddr::to_string).collect();
    Ok(Some(ips.join(" ")))
}

/// UDP: send one datagram from a fresh socket and wait for the echo (or the DNS answer).
fn udp_probe(
    dst: SocketAddr,
    timeout: Duration,
    dns_query: Option<&(u16, Vec<u8>)>,
    index: u32,
) -> Probe {
    let deadline = Instant::now() + timeout;
    let socket = match Socket::new(
        Domain::for_address(dst),
        Type::DGRAM,
        Some(socket2::Protocol::UDP),
    ) {
        Ok(s) => UdpSocket::from(s),
        Err(e) => {
            return Probe::failed(None, format!("socket: {e}"));
        }
    };
    // Connected: getsockname gives the real source, and ICMP errors come back as errors.
    if let Err(e) = socket.connect(dst) {
        return Probe::failed(None, describe(&e));
    }
    let src = socket.local_addr().ok();
    let fail = |msg: String| Probe::failed(src, msg);
    let payload = match dns_query {
        Some((_, q)) => q.clone(),
        None => format!("flows-lab {index} {}", rfc3339_nanos(SystemTime::now())).into_bytes(),
    };
    if let Err(e) = socket.send(&payload) {
        return fail(format!("send: {}", describe(&e)));
    }
    let mut buf = vec![0u8; 65536];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || socket.set_read_timeout(Some(left)).is_err() {
            return fail(format!(
                "timeout: no reply within {}ms",
                timeout.as_millis()
            ));
        }
        match socket.recv(&mut buf) {
            Ok(n) => match dns_query {
                Some((id, _)) => match dns::parse_response(&buf[..n]) {
                    Ok(r) if r.id == *id => {
                        return Probe {
                            src,
                            result: dns_result(*id, &buf[..n]),
                        };
                    }
                    _ => continue, // not ours
                },
                None if buf[..n] == payload[..] => {
                    return Probe {
                        src,
                        result: Ok(None),
                    };
                }
                None => continue,
            },
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return fail(format!(
                    "timeout: no reply within {}ms",
                    timeout.as_millis()
                ));
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                return fail("port unreachable (ICMP)".to_string());
            }
            Err(e) => return fail(describe(&e)),
        }
    }
}

/// ICMP echo through a datagram ping socket; the kernel sets the identifier to the socket's
/// local port.
fn icmp_probe(dst: IpAddr, timeout: Duration, seq: u16) -> Probe {
    let deadline = Instant::now() + timeout;
    let (domain, proto, request, reply) = match dst {
        IpAddr::V4(_) => (Domain::IPV4, socket2::Protocol::ICMPV4, 8u8, 0u8),
        IpAddr::V6(_) => (Domain::IPV6, socket2::Protocol::ICMPV6, 128u8, 129u8),
    };
    let socket = match Socket::new(domain, Type::DGRAM, Some(proto)) {
        Ok(s) => UdpSocket::from(s),
        Err(e) => {
            return Probe {
                src: None,
                result: Err(format!(
                    "ping socket: {e} (is net.ipv4.ping_group_range set?)"
                )),
            };
        }
    };
    if let Err(e) = socket.connect(SocketAddr::new(dst, 0)) {
        return Probe::failed(None, describe(&e));
    }
    let src = socket.local_addr().ok();
    let fail = |msg: String| Probe::failed(src, msg);
    let mut packet = vec![request, 0, 0, 0, 0, 0];
    packet.extend_from_slice(&seq.to_be_bytes());
    packet.extend_from_slice(b"flows-lab ping..");
    if let Err(e) = socket.send(&packet) {
        return fail(format!("send: {}", describe(&e)));
    }
    let mut buf = [0u8; 2048];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || socket.set_read_timeout(Some(left)).is_err() {
            return fail(format!(
                "timeout: no echo reply within {}ms",
                timeout.as_millis()
            ));
        }
        match socket.recv(&mut buf) {
            Ok(n) if n >= 8 && buf[0] == reply && buf[6..8] == seq.to_be_bytes() => {
                return Probe {
                    src,
                    result: Ok(None),
                };
            }
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return fail(format!(
                    "timeout: no echo reply within {}ms",
                    timeout.as_millis()
                ));
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return fail(describe(&e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err_of(text: &str) -> (String, String, String) {
        match Scenario::parse("s.yaml", text) {
            Err(LabError::Scenario {
                file,
                at,
                field,
                message,
            }) => {
                assert_eq!(file, "s.yaml");
                (at, field, message)
            }
            other => panic!("expected a Scenario error, got {other:?}"),
        }
    }

    #[test]
    fn parses_defaults() {
        let s = Scenario::parse(
            "s.yaml",
            "connections:\n- from: a/b\n  to: {service: c/d}\n  protocol: TCP\n  port: 80\n- from: world\n  to: {ip: 10.244.1.2}\n  protocol: ICMP\n",
        )
        .expect("valid");
        let c = &s.connections[0];
        assert_eq!(
            (c.count, c.timeout_ms, c.family, c.rate),
            (1, 1000, FamilyChoice::Ipv4, None)
        );
        assert_eq!(connection_name(c), "a/b->service:c/d TCP/80");
        assert_eq!(s.connections[1].protocol, Protocol::Icmp);
    }

    #[test]
    fn field_errors_name_connection_and_field() {
        let (at, field, msg) =
            err_of("connections:\n- from: a/b\n  to: {pod: c/d}\n  protocol: SCTP\n  port: 1\n");
        assert_eq!(
            (at.as_str(), field.as_str()),
            ("connections[0]", "protocol")
        );
        assert!(msg.contains("unknown variant"), "{msg}");

        let (at, field, _) = err_of(
            "connections:\n- {from: a/b, to: {pod: c/d}, protocol: TCP, port: 1}\n- {from: a/b, to: {pod: c/d}, protocol: TCP, port: 70000}\n",
        );
        assert_eq!((at.as_str(), field.as_str()), ("connections[1]", "port"));

        let (at, field, _) = err_of(
            "connections:\n- {from: a/b, to: {pod: c/d}, protocol: TCP, port: 1, colour: red}\n",
        );
        assert_eq!(at, "connections[0]");
        assert!(
            field == "(item)" || field.is_empty() || field == "colour",
            "{field}"
        );

        let (at, field, _) =
            err_of("connections:\n- {name: x, from: a/b, to: {pod: c/d}, protocol: TCP}\n");
        assert_eq!(
            (at.as_str(), field.as_str()),
            ("connections[0] (x)", "port")
        );

        let (_, field, _) =
            err_of("connections:\n- {from: a/b, to: {pod: c/d, ip: 1.2.3.4}, protocol: ICMP}\n");
        assert_eq!(field, "to");
        let (_, field, _) = err_of("connections:\n- {from: ab, to: {pod: c/d}, protocol: ICMP}\n");
        assert_eq!(field, "from");
        let (_, field, _) =
            err_of("connections:\n- {from: a/b, to: {ip: '2001:db8::1'}, protocol: ICMP}\n");
        assert_eq!(field, "family");
        let (_, field, _) =
            err_of("connections:\n- {from: a/b, to: {pod: c/d}, protocol: ICMP, port: 3}\n");
        assert_eq!(field, "port");
        let (_, field, _) = err_of(
            "connections:\n- {from: a/b, to: {pod: c/d}, protocol: UDP, port: 3, rate: 0}\n",
        );
        assert_eq!(field, "rate");
        let (_, field, _) = err_of(
            "connections:\n- {from: a/b, to: {pod: c/d}, protocol: UDP, port: 3, family: ipv5}\n",
        );
        assert_eq!(field, "family");
        let (at, _, _) = err_of("connection: []\n");
        assert_eq!(at, "scenario");
    }

    #[test]
    fn resolution_errors_name_the_field() {
        let mut input = crate::spec::Input::default();
        crate::spec::parse_str(
            Path::new("x.yaml"),
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: n}\nspec: {containers: [{name: c}]}\n",
            &mut input,
        )
        .expect("valid");
        let state = crate::plan::plan(&input, 1).expect("plan");
        let s = Scenario::parse(
            "s.yaml",
            "connections:\n- {from: n/p, to: {service: n/nope}, protocol: TCP, port: 80}\n",
        )
        .expect("valid");
        match run(&state, &s, &DriveOptions::default()) {
            Err(LabError::Scenario { field, .. }) => assert_eq!(field, "to.service"),
            other => panic!("expected a Scenario error, got {other:?}"),
        }
        let s = Scenario::parse(
            "s.yaml",
            "connections:\n- {from: n/nope, to: {ip: world}, protocol: ICMP}\n",
        )
        .expect("valid");
        match run(&state, &s, &DriveOptions::default()) {
            Err(LabError::Scenario { field, .. }) => assert_eq!(field, "from"),
            other => panic!("expected a Scenario error, got {other:?}"),
        }
    }
}
