//! Enforcement against crafted packets, in a two-node lab with real eBPF, sent as an
//! attacker sends them: scapy in a pod (`tests/crafted/craft.py`), a capture inside each
//! target's network namespace. The intruder (attack/intruder, node-1) sends every case
//! (IPv6 SYNs behind 1 to 16 extension headers, tiny and overlapping fragments,
//! truncated TCP and UDP headers, VLAN tags, SCTP INIT, GRE, IPIP, ESP, ICMP errors
//! quoting a tuple nobody opened, a SYN with data, SYN+RST) to four pods:
//!
//! * `denied` (node-1) and `denied-remote` (node-2): policy admits the intruder nowhere;
//! * `ported` (node-2): policy admits it on TCP 80 and UDP 5353 only (every case aims
//!   at those ports: only what the datapath can read as such may pass);
//! * `allowed` (node-1): a rule without ports admits it.
//!
//! First without flows (what the kernel delivers on its own), then with the probes
//! enforcing. With flows: nothing reaches the denied pods, the ported pod gets exactly
//! the cases whose ports can be read and are admitted, the allowed pod gets exactly what
//! it got without flows (the kernel's own behaviour), every case that reached a denied
//! pod before is reported once as the intruder's attempt with its verdict and why its
//! ports were unknown, and no record blames a target for answering. Needs root.

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead, BufReader},
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Child, ChildStdout, Command, Stdio},
    time::{Duration, Instant},
};

use common::{Probe, all_flows};
use flows_lab::{
    manifests,
    state::State,
    testing::{LabGuard, skip_unless_root},
};
use flows_proto::{Flow, L4UnknownReason, Verdict, layer4};

const LAB: &str = r#"
apiVersion: v1
kind: Namespace
metadata: { name: attack }
---
apiVersion: v1
kind: Namespace
metadata: { name: target }
---
apiVersion: v1
kind: Pod
metadata: { name: intruder, namespace: attack, labels: { run: intruder } }
spec: { nodeName: node-1, containers: [ { name: c, image: busybox } ] }
---
apiVersion: v1
kind: Pod
metadata: { name: denied, namespace: target, labels: { role: denied } }
spec: { nodeName: node-1, containers: [ { name: c, image: nginx, ports: [ { containerPort: 80 }, { containerPort: 5353, protocol: UDP } ] } ] }
---
apiVersion: v1
kind: Pod
metadata: { name: denied-remote, namespace: target, labels: { role: denied } }
spec: { nodeName: node-2, containers: [ { name: c, image: nginx, ports: [ { containerPort: 80 }, { containerPort: 5353, protocol: UDP } ] } ] }
---
apiVersion: v1
kind: Pod
metadata: { name: ported, namespace: target, labels: { role: ported } }
spec: { nodeName: node-2, containers: [ { name: c, image: nginx, ports: [ { containerPort: 80 }, { containerPort: 5353, protocol: UDP } ] } ] }
---
apiVersion: v1
kind: Pod
metadata: { name: allowed, namespace: target, labels: { role: allowed } }
spec: { nodeName: node-1, containers: [ { name: c, image: nginx, ports: [ { containerPort: 80 }, { containerPort: 5353, protocol: UDP } ] } ] }
"#;

const POLICIES: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: { name: deny-all, namespace: target }
spec:
  podSelector: { matchLabels: { role: denied } }
  policyTypes: [ Ingress ]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: { name: web-ports, namespace: target }
spec:
  podSelector: { matchLabels: { role: ported } }
  ingress:
    - from: [ { namespaceSelector: { matchLabels: { kubernetes.io/metadata.name: attack } } } ]
      ports: [ { port: 80 }, { port: 5353, protocol: UDP } ]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: { name: any-port, namespace: target }
spec:
  podSelector: { matchLabels: { role: allowed } }
  ingress:
    - from: [ { namespaceSelector: { matchLabels: { kubernetes.io/metadata.name: attack } } } ]
"#;

/// (pod, what policy admits of the intruder), in the sender's target order.
const TARGETS: [(&str, Admits); 4] = [
    ("denied", Admits::Nothing),
    ("denied-remote", Admits::Nothing),
    ("ported", Admits::Ports),
    ("allowed", Admits::Everything),
];

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Admits {
    Nothing,
    Ports,
    Everything,
}

/// Must match craft.py: the marker case and the tag of a (run, target, case).
const MARKER: u32 = 99;
fn tag(run: u32, target: usize, case: usize) -> u32 {
    run * 1000 + target as u32 * 100 + case as u32
}
fn sport(tag: u32) -> u32 {
    20000 + tag
}

/// What the datapath can make of a case: its ports (then policy decides by port), or
/// why not and the protocol it stops at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reading {
    /// Ports read; `admitted`: TCP 80 / UDP 5353, which `ported` admits.
    Ports { admitted: bool },
    Unknown { reason: L4UnknownReason, protocol: u32 },
    /// Fragments: read as the node's path hands them to the hook. A node that reassembles
    /// before it (IPv4 through br_netfilter or routing with conntrack, in this lab)
    /// shows the whole header; fragments that arrive as sent have none to read.
    Fragments { protocol: u32 },
}

struct Case {
    name: String,
    v6: bool,
    reading: Reading,
}

fn reading(name: &str, v6: bool) -> Reading {
    use L4UnknownReason as R;
    let unknown = |reason, protocol| Reading::Unknown { reason, protocol };
    match name {
        "syn" | "udp" | "vlan" | "syn-data" | "syn-rst" => Reading::Ports { admitted: true },
        "sctp-init" => Reading::Ports { admitted: false },
        // Eight headers are walked; the ninth of these chains is destination options.
        n if n.starts_with("ext-") => match n[4..].parse::<u32>() {
            Ok(k) if k <= 8 => Reading::Ports { admitted: true },
            _ => unknown(R::ExtensionHeaders, 60),
        },
        "frag-tiny" | "frag-overlap" => Reading::Fragments { protocol: 6 },
        "trunc-tcp" => unknown(R::Truncated, 6),
        "trunc-udp" => unknown(R::Truncated, 17),
        "gre" => unknown(R::Protocol, 47),
        "ipip" => unknown(R::Protocol, 4),
        "esp" => unknown(R::Protocol, 50),
        "icmp-error" => unknown(R::Icmp, if v6 { 58 } else { 1 }),
        other => panic!("case {other} has no expectation here"),
    }
}

fn craft_py() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/crafted/craft.py")
}

fn cases() -> Vec<Case> {
    let out = Command::new("/usr/bin/python3").arg(craft_py()).arg("cases").output().expect("craft.py cases");
    assert!(out.status.success(), "craft.py cases: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let (name, fam) = l.split_once('/').expect("name/family");
            let v6 = fam == "v6";
            Case { name: name.into(), v6, reading: reading(name, v6) }
        })
        .collect()
}

/// A capture of the intruder's crafted packets reaching one pod's eth0.
struct Capture {
    child: Child,
    out: BufReader<ChildStdout>,
    stop: PathBuf,
    seen: BTreeSet<u32>,
}

impl Capture {
    fn start(netns: &str, intruder: (&str, &str), stop: PathBuf) -> Capture {
        let _ = std::fs::remove_file(&stop);
        let mut child = Command::new("ip")
            .args(["netns", "exec", netns, "/usr/bin/python3"])
            .arg(craft_py())
            .args(["capture", "--from4", intruder.0, "--from6", intruder.1, "--stop"])
            .arg(&stop)
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn capture");
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        out.read_line(&mut line).expect("capture output");
        assert_eq!(line.trim(), "ready", "capture in {netns} did not start");
        Capture { child, out, stop, seen: BTreeSet::new() }
    }

    /// Reads tags until `tag` has been seen (the capture keeps running).
    fn wait_for(&mut self, tag: u32, deadline: Instant) {
        while !self.seen.contains(&tag) {
            assert!(Instant::now() < deadline, "marker {tag} never reached the capture");
            let mut line = String::new();
            if self.out.read_line(&mut line).expect("capture output") == 0 {
                panic!("capture ended before marker {tag}");
            }
            self.seen.extend(line.trim().parse::<u32>());
        }
    }

    /// Stops the capture (it drains what the kernel queued first) and returns every tag.
    fn finish(mut self) -> BTreeSet<u32> {
        std::fs::write(&self.stop, b"").expect("stop file");
        for line in (&mut self.out).lines() {
            self.seen.extend(line.expect("capture output").trim().parse::<u32>());
        }
        let st = self.child.wait().expect("capture exit");
        assert!(st.success(), "capture failed: {st}");
        std::mem::take(&mut self.seen)
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.stop, b"");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pod<'a>(state: &'a State, name: &str) -> &'a flows_lab::state::PodRec {
    state.pods.iter().find(|p| p.name == name).expect("pod in lab")
}

/// Sends every case to every target from the intruder, pinned to one CPU.
fn send(state: &State, run: u32) {
    let me = pod(state, "intruder");
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &me.netns, "taskset", "-c", "0", "/usr/bin/python3"])
        .arg(craft_py())
        .args(["send", "--src4", &me.ipv4.to_string(), "--src6", &me.ipv6.to_string(), "--run", &run.to_string()]);
    for (i, (name, _)) in TARGETS.iter().enumerate() {
        let p = pod(state, name);
        cmd.args(["--target", &format!("{i},{},{}", p.ipv4, p.ipv6)]);
    }
    let out = cmd.output().expect("craft.py send");
    assert!(out.status.success(), "craft.py send: {}", String::from_utf8_lossy(&out.stderr));
}

/// One run: captures in every target, the cases sent, and each target's marker awaited
/// (seen by its capture where it passes, reported dropped by a probe where it does not).
fn run(state: &State, dir: &Path, run: u32, probes: &[Probe]) -> Vec<BTreeSet<u32>> {
    let me = pod(state, "intruder");
    let (ip4, ip6) = (me.ipv4.to_string(), me.ipv6.to_string());
    let mut caps: Vec<Capture> = TARGETS
        .iter()
        .map(|(name, _)| Capture::start(&pod(state, name).netns, (&ip4, &ip6), dir.join(format!("stop-{run}-{name}"))))
        .collect();
    send(state, run);
    let deadline = Instant::now() + Duration::from_secs(30);
    for (i, (_, admits)) in TARGETS.iter().enumerate() {
        let marker = tag(run, i, MARKER as usize);
        if probes.is_empty() || *admits == Admits::Everything {
            caps[i].wait_for(marker, deadline);
            continue;
        }
        // Dropped where it is decided: its record means every packet sent before it
        // has been through the same path.
        loop {
            let flows: Vec<Flow> = probes.iter().flat_map(|p| all_flows(&p.addr)).collect();
            if flows.iter().any(|f| f.verdict == Verdict::Dropped as i32 && ports(f) == Some((sport(marker), 9))) {
                break;
            }
            assert!(Instant::now() < deadline, "no drop reported for marker {marker}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    caps.into_iter().map(Capture::finish).collect()
}

fn ports(f: &Flow) -> Option<(u32, u32)> {
    match f.l4.as_ref()?.protocol.as_ref()? {
        layer4::Protocol::Tcp(t) => Some((t.source_port, t.destination_port)),
        layer4::Protocol::Udp(u) => Some((u.source_port, u.destination_port)),
        layer4::Protocol::Sctp(s) => Some((s.source_port, s.destination_port)),
        _ => None,
    }
}

fn addrs(f: &Flow) -> (Option<IpAddr>, Option<IpAddr>) {
    let ip = f.ip.as_ref();
    (
        ip.and_then(|i| i.source.parse().ok()),
        ip.and_then(|i| i.destination.parse().ok()),
    )
}

/// Every record between the two addresses with the case's ports or unknown ones, one a
/// line (for failure messages).
fn records_of(flows: &[Flow], src: IpAddr, dst: IpAddr, t: u32) -> String {
    flows
        .iter()
        .filter(|f| addrs(f) == (Some(src), Some(dst)) || addrs(f) == (Some(dst), Some(src)))
        .filter(|f| f.l4_unknown.is_some() || ports(f).is_some_and(|p| p.0 == sport(t) || p.1 == sport(t)))
        .map(|f| {
            format!(
                "    {} {:?} {:?} reply={} {} ports={:?} l4={:?} unknown={:?} in={:?} eg={:?}",
                f.node_name,
                addrs(f),
                Verdict::try_from(f.verdict).unwrap_or(Verdict::Unspecified),
                f.is_reply,
                f.observation_point,
                ports(f),
                f.l4.as_ref().and_then(|l| l.protocol.as_ref()).map(|p| format!("{p:?}").chars().take(40).collect::<String>()),
                f.l4_unknown,
                f.ingress_denied_by.iter().map(|p| p.name.clone()).collect::<Vec<_>>(),
                f.egress_denied_by.iter().map(|p| p.name.clone()).collect::<Vec<_>>(),
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The policy drops of one case at one target, as the log tells them.
fn drops_of<'a>(flows: &'a [Flow], case: &Case, src: IpAddr, dst: IpAddr, t: u32) -> Vec<&'a Flow> {
    flows
        .iter()
        .filter(|f| f.verdict == Verdict::Dropped as i32 && f.drop_reason == "POLICY_DENIED")
        .filter(|f| addrs(f) == (Some(src), Some(dst)))
        .filter(|f| match case.reading {
            Reading::Ports { .. } => ports(f).map(|p| p.0) == Some(sport(t)),
            Reading::Unknown { reason, protocol } => f
                .l4_unknown
                .as_ref()
                .is_some_and(|u| u.reason == reason as i32 && u.protocol == protocol),
            Reading::Fragments { .. } => false,
        })
        .collect()
}

/// How the hook at the target read a case. A node may rewrite a packet before it gets
/// there: IPv4 fragments are reassembled on this lab's paths (br_netfilter, routing with
/// conntrack), and IPv6 defragmentation drops an atomic fragment header from a chain.
/// Where the hook's record carries the case's own ports it read them; else the case
/// reads as sent.
fn as_read(flows: &[Flow], case: &Case, src: IpAddr, dst: IpAddr, t: u32) -> Reading {
    if matches!(case.reading, Reading::Ports { .. }) {
        return case.reading;
    }
    let read = flows.iter().find(|f| {
        f.observation_point == flows_proto::ObservationPoint::ToEndpoint as i32
            && addrs(f) == (Some(src), Some(dst))
            && ports(f).map(|p| p.0) == Some(sport(t))
    });
    match (read, case.reading) {
        (Some(f), _) => Reading::Ports {
            admitted: matches!(
                f.l4.as_ref().and_then(|l| l.protocol.as_ref()),
                Some(layer4::Protocol::Tcp(p)) if p.destination_port == 80
            ) || matches!(
                f.l4.as_ref().and_then(|l| l.protocol.as_ref()),
                Some(layer4::Protocol::Udp(p)) if p.destination_port == 5353
            ),
        },
        (None, Reading::Fragments { protocol }) => Reading::Unknown { reason: L4UnknownReason::Fragment, protocol },
        (None, r) => r,
    }
}

flows_lab::per_cni!(crafted_packets_do_not_get_past_policy);

/// Runs in every wiring mode of the lab (`per_cni!`): an overlay or a routed /32 must not
/// open a way around the policy.
fn crafted_packets_do_not_get_past_policy(cni: flows_lab::cni::CniMode) {
    if skip_unless_root("crafted_packets_do_not_get_past_policy") {
        return;
    }
    let cases = cases();
    let lab = LabGuard::from_yaml_wired(LAB, 2, cni).expect("lab up");
    let state = lab.state.clone();

    // 1. Without flows: what the kernel delivers on its own.
    let before = run(&state, &lab.dir, 1, &[]);

    // 2. With the probes enforcing the policies.
    let mdir = manifests::dir(&lab.dir);
    let modes: BTreeMap<String, String> = state.namespaces.iter().map(|n| (n.name.clone(), "enforce".into())).collect();
    manifests::write_cluster(&lab.dir, &state, &modes).expect("cluster manifests");
    std::fs::create_dir_all(mdir.join("policies")).expect("policies dir");
    std::fs::write(mdir.join("policies/crafted.yaml"), POLICIES).expect("policies");
    let extra = ["--manifests", mdir.to_str().expect("utf8")];
    let probes: Vec<Probe> = ["node-1", "node-2"].iter().map(|n| Probe::start_with(&state, n, &lab.dir, &extra)).collect();
    let after = run(&state, &lab.dir, 2, &probes);
    let flows: Vec<Flow> = probes.iter().flat_map(|p| all_flows(&p.addr)).collect();

    let me = pod(&state, "intruder");
    let mut table = String::from("case          | target        | without flows | with flows | the log\n");
    let mut failures = Vec::new();
    for (i, (target, admits)) in TARGETS.iter().enumerate() {
        let p = pod(&state, target);
        for (k, case) in cases.iter().enumerate() {
            let (t1, t2) = (tag(1, i, k), tag(2, i, k));
            let (src, dst): (IpAddr, IpAddr) = if case.v6 {
                (me.ipv6.into(), p.ipv6.into())
            } else {
                (me.ipv4.into(), p.ipv4.into())
            };
            let (was, is) = (before[i].contains(&t1), after[i].contains(&t2));
            let read = Case { name: case.name.clone(), v6: case.v6, reading: as_read(&flows, case, src, dst, t2) };
            let should_pass = match admits {
                Admits::Nothing => false,
                Admits::Ports => was && read.reading == Reading::Ports { admitted: true },
                Admits::Everything => was,
            };
            let drops = drops_of(&flows, &read, src, dst, t2);
            let said = match (drops.first(), read.reading, case.reading) {
                (Some(f), _, _) => match &f.l4_unknown {
                    Some(u) => format!("DROPPED ({}, protocol {})", u.describe(), u.protocol),
                    None => "DROPPED (by port)".into(),
                },
                (None, Reading::Ports { .. }, Reading::Ports { .. }) => "-".into(),
                (None, Reading::Ports { .. }, _) => "ports read at the hook (the node rewrote the packet)".into(),
                (None, _, _) => "-".into(),
            };
            table.push_str(&format!(
                "{:<13} | {:<13} | {:<13} | {:<10} | {}\n",
                format!("{}/v{}", case.name, if case.v6 { 6 } else { 4 }),
                target,
                if was { "arrived" } else { "not arrived" },
                if is { "arrived" } else { "-" },
                said
            ));
            if is != should_pass {
                failures.push(format!(
                    "{}/v{} to {target}: arrived {is}, expected {should_pass} (without flows: {was}); its records:\n{}",
                    case.name,
                    if case.v6 { 6 } else { 4 },
                    records_of(&flows, src, dst, t2)
                ));
            }
            // Each case that reaches a pod without flows and is dropped by policy is
            // reported, as the intruder's attempt (unreadable ones share one record per
            // protocol and reason: one attempt).
            if was && !should_pass && drops.is_empty() {
                failures.push(format!("{}/v{} to {target}: not reported as a policy drop", case.name, if case.v6 { 6 } else { 4 }));
            }
        }
    }
    eprintln!("{table}");
    // No record blames a target for answering: its records towards the intruder are
    // replies or allowed.
    let intruder: BTreeSet<IpAddr> = [me.ipv4.into(), me.ipv6.into()].into();
    for f in &flows {
        let (_, d) = addrs(f);
        if d.is_some_and(|d| intruder.contains(&d)) && !f.is_reply && f.verdict == Verdict::Dropped as i32 {
            failures.push(format!("a target blamed for an answer: {f:?}"));
        }
    }
    // Once: no two policy drops of one attempt at one observation point.
    let mut seen = BTreeMap::new();
    for f in flows.iter().filter(|f| f.drop_reason == "POLICY_DENIED") {
        let key = (f.node_name.clone(), addrs(f), ports(f), f.l4_unknown.as_ref().map(|u| (u.reason, u.protocol)), f.observation_point);
        *seen.entry(key).or_insert(0) += 1;
    }
    for (k, n) in seen {
        if n > 1 {
            failures.push(format!("{n} records of one attempt: {k:?}"));
        }
    }
    assert!(failures.is_empty(), "{}\n{table}", failures.join("\n"));
}
