//! NetworkPolicy in the kernel, end to end: the seed cluster (lab/examples/seed) under
//! the seed guide's policies (lab/examples/seed-policies), enforced by the node-probes.
//! Every attempt between pods, on every declared port, IPv4 and IPv6, must succeed
//! exactly when the policy evaluator allows it, and the flows must name the same
//! policies. Then audit mode lets everything through as AUDIT, and policy changes made
//! while traffic runs take effect without failing allowed connections. Needs root.

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use common::{Probe, after_policy_change, all_flows, settle};
use flows_lab::{
    cni::CniMode,
    drive::{self, AttemptReport, DriveOptions, Outcome, Scenario},
    manifests,
    state::State,
    testing::{LabGuard, skip_unless_root},
};
use flows_policy::{Endpoint, Manifests, Protocol};
use flows_proto::{Flow, Verdict, layer4};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every pod to every other pod on each declared TCP/UDP port, and to the world (where
/// a masquerading CNI hides the pod's address before the uplink), both families.
fn matrix(state: &State, timeout_ms: u64) -> Scenario {
    let mut text = String::from("connections:\n");
    for a in &state.pods {
        text.push_str(&format!(
            "  - {{ name: \"{}/{}>world:80/TCP\", from: {}/{}, to: {{ ip: world }}, protocol: TCP, port: 80, family: both, timeout_ms: {timeout_ms} }}\n",
            a.namespace, a.name, a.namespace, a.name
        ));
    }
    for a in &state.pods {
        for b in &state.pods {
            if a.namespace == b.namespace && a.name == b.name {
                continue;
            }
            for p in &b.ports {
                if p.protocol == "SCTP" {
                    continue;
                }
                text.push_str(&format!(
                    "  - {{ name: \"{}/{}>{}/{}:{}/{}\", from: {}/{}, to: {{ pod: {}/{} }}, protocol: {}, port: {}, family: both, timeout_ms: {timeout_ms} }}\n",
                    a.namespace, a.name, b.namespace, b.name, p.port, p.protocol,
                    a.namespace, a.name, b.namespace, b.name, p.protocol, p.port
                ));
            }
        }
    }
    Scenario::parse("policy-matrix", &text).expect("matrix scenario")
}

fn manifests_for(state: &State, dir: &Path) -> Manifests {
    let mut texts = Vec::new();
    texts.push((
        "cluster".to_string(),
        manifests::cluster_yaml(state, &BTreeMap::new()).expect("cluster yaml"),
    ));
    for f in std::fs::read_dir(dir.join("policies")).expect("policies").flatten() {
        texts.push((
            f.path().display().to_string(),
            std::fs::read_to_string(f.path()).expect("read"),
        ));
    }
    Manifests::parse(texts.iter().map(|(n, t)| (n.as_str(), t.as_str()))).expect("manifests")
}

/// The evaluator's view of an address: a pod of the manifests, or outside the cluster.
fn endpoint_of<'a>(m: &'a Manifests, state: &State, ip: IpAddr) -> Endpoint<'a> {
    match pod_of(state, ip) {
        Some((ns, name)) => Endpoint::Pod(m.cluster.pod(&ns, &name).expect("pod in manifests"), Some(ip)),
        None => Endpoint::External(ip),
    }
}

fn pod_of(state: &State, ip: IpAddr) -> Option<(String, String)> {
    state
        .pods
        .iter()
        .find(|p| IpAddr::V4(p.ipv4) == ip || IpAddr::V6(p.ipv6) == ip)
        .map(|p| (p.namespace.clone(), p.name.clone()))
}

fn names(ps: &[flows_proto::Policy]) -> BTreeSet<String> {
    ps.iter().map(|p| format!("{}/{}", p.namespace, p.name)).collect()
}

fn sport(f: &Flow) -> Option<u16> {
    match f.l4.as_ref()?.protocol.as_ref()? {
        layer4::Protocol::Tcp(t) => Some(t.source_port as u16),
        layer4::Protocol::Udp(u) => Some(u.source_port as u16),
        _ => None,
    }
}

/// The policy-verdict flows of an attempt (the enforcement points it crossed).
fn verdicts<'a>(flows: &'a [Flow], a: &AttemptReport) -> Vec<&'a Flow> {
    flows
        .iter()
        .filter(|f| {
            f.event_type == flows_proto::EventType::PolicyVerdict as i32
                && !f.is_reply
                && sport(f) == a.src_port
                && f.ip.as_ref().is_some_and(|ip| {
                    ip.source.parse::<IpAddr>().ok() == a.src_ip
                        && ip.destination.parse::<IpAddr>().ok() == Some(a.dst_ip)
                })
        })
        .collect()
}

fn set_modes(dir: &Path, state: &State, mode: &str) {
    let modes: BTreeMap<String, String> = state
        .namespaces
        .iter()
        .map(|n| (n.name.clone(), mode.to_string()))
        .collect();
    manifests::write_cluster(dir, state, &modes).expect("write cluster");
}

fn copy_policies(dir: &Path) {
    let pd = dir.join("policies");
    std::fs::create_dir_all(&pd).expect("policies dir");
    for f in std::fs::read_dir(root().join("lab/examples/seed-policies")).expect("seed policies").flatten() {
        std::fs::copy(f.path(), pd.join(f.file_name())).expect("copy");
    }
}

flows_lab::per_cni!(the_kernel_enforces_exactly_what_the_evaluator_decides);

/// Runs in every wiring mode of the lab (`per_cni!`).
fn the_kernel_enforces_exactly_what_the_evaluator_decides(cni: CniMode) {
    if skip_unless_root("the_kernel_enforces_exactly_what_the_evaluator_decides") {
        return;
    }
    let lab = LabGuard::up_wired(&[root().join("lab/examples/seed")], 2, cni).expect("lab up");
    let state = lab.state.clone();
    let mdir = manifests::dir(&lab.dir);
    set_modes(&lab.dir, &state, "enforce");
    copy_policies(&mdir);
    // The uplink and any tunnel between the nodes are found by the probe itself.
    let extra = ["--manifests", mdir.to_str().expect("utf8")];
    let metrics_addr = "127.0.0.1:19965";
    let probes: Vec<Probe> = ["node-1", "node-2"]
        .iter()
        .map(|n| {
            let mut args = extra.to_vec();
            if *n == "node-1" {
                args.extend(["--metrics-listen", metrics_addr]);
            }
            Probe::start_with(&state, n, &lab.dir, &args)
        })
        .collect();

    // 1. Enforce: outcomes and flows match the evaluator, attempt by attempt.
    let m = manifests_for(&state, &mdir);
    let engine = m.engine();
    let scenario = matrix(&state, 400);
    let report = drive::run(&state, &scenario, &DriveOptions { concurrency: 8 }).expect("drive");
    settle(&state, &probes);
    let flows: Vec<Flow> = probes.iter().flat_map(|p| all_flows(&p.addr)).collect();
    let (mut allowed, mut denied) = (0, 0);
    for a in &report.attempts {
        let (sns, spod) = pod_of(&state, a.src_ip.expect("src")).expect("src pod");
        let src = m.cluster.pod(&sns, &spod).expect("src in manifests");
        let proto = match a.protocol {
            drive::Protocol::Tcp => Protocol::Tcp,
            drive::Protocol::Udp => Protocol::Udp,
            drive::Protocol::Icmp => unreachable!("no ICMP in the matrix"),
        };
        let d = engine.evaluate(
            &m.cluster,
            &Endpoint::Pod(src, a.src_ip),
            &endpoint_of(&m, &state, a.dst_ip),
            proto,
            a.dst_port,
        );
        let expect = if d.allowed { Outcome::Success } else { Outcome::Failure };
        assert_eq!(a.outcome, expect, "kernel vs evaluator for {a:?}: {d:?}");
        let v = verdicts(&flows, a);
        if d.allowed {
            allowed += 1;
            assert!(v.iter().all(|f| f.verdict == Verdict::Forwarded as i32), "{v:#?}");
        } else {
            denied += 1;
            // Cross-node, the source's egress is decided at its node's uplink and the
            // destination's ingress at its veth: one record each, one of them the denial.
            let drops: Vec<&&Flow> = v.iter().filter(|f| f.verdict == Verdict::Dropped as i32).collect();
            assert_eq!(drops.len(), 1, "one denial record for {a:?}: {v:#?}");
            let f = drops[0];
            assert_eq!(f.verdict, Verdict::Dropped as i32);
            assert_eq!(f.drop_reason, "POLICY_DENIED");
            // The record names the denying side(s) judged where it was dropped (the first
            // enforcement point on the path drops it; a later one never sees it).
            let set = |v: &[flows_policy::PolicyRef]| -> BTreeSet<String> {
                v.iter().map(|p| p.to_string()).collect()
            };
            let (eg, ing) = (names(&f.egress_denied_by), names(&f.ingress_denied_by));
            assert!(!eg.is_empty() || !ing.is_empty(), "no policy named for {a:?}: {f:#?}");
            if !eg.is_empty() {
                assert!(!d.egress.allowed, "egress named as denying for {a:?}");
                assert_eq!(eg, set(&d.egress.isolated_by), "egress policies for {a:?}");
            }
            if !ing.is_empty() {
                assert!(!d.ingress.allowed, "ingress named as denying for {a:?}");
                assert_eq!(ing, set(&d.ingress.isolated_by), "ingress policies for {a:?}");
            }
        }
        // Where a side was isolated and allowed, the flow names the allowing policies.
        if d.allowed && !d.ingress.isolated_by.is_empty() {
            let want: BTreeSet<String> = d.ingress.allowed_by.iter().map(|p| p.to_string()).collect();
            assert!(
                v.iter().any(|f| names(&f.ingress_allowed_by) == want),
                "ingress allowed_by {want:?} for {a:?}: {v:#?}"
            );
        }
    }
    assert!(allowed > 10 && denied > 10, "a matrix with both outcomes ({allowed} allowed, {denied} denied)");

    // The same decisions, counted for Prometheus (node-1's probe).
    let text = scrape(metrics_addr);
    let denied_on_node1 = flows
        .iter()
        .filter(|f| f.node_name == "node-1" && f.drop_reason == "POLICY_DENIED")
        .count();
    let counted: u64 = text
        .lines()
        .filter(|l| l.starts_with("flows_drops_total{reason=\"POLICY_DENIED\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(counted as usize, denied_on_node1, "drops counted in /metrics:\n{text}");
    assert!(text.contains("flows_policy_verdicts_total{direction=\"ingress\",action=\"denied\"}"), "{text}");

    // 2. Audit: everything passes; what enforce denied is reported as AUDIT.
    after_policy_change(&probes, || set_modes(&lab.dir, &state, "audit"));
    let report = drive::run(&state, &matrix(&state, 1000), &DriveOptions { concurrency: 8 }).expect("drive");
    settle(&state, &probes);
    let flows: Vec<Flow> = probes.iter().flat_map(|p| all_flows(&p.addr)).collect();
    let mut audited = 0;
    for a in &report.attempts {
        assert_eq!(a.outcome, Outcome::Success, "audit mode drops nothing: {a:?}");
        let (sns, spod) = pod_of(&state, a.src_ip.expect("src")).expect("src pod");
        let dst_pod = pod_of(&state, a.dst_ip);
        let proto = if a.protocol == drive::Protocol::Tcp { Protocol::Tcp } else { Protocol::Udp };
        let d = engine.evaluate(
            &m.cluster,
            &Endpoint::Pod(m.cluster.pod(&sns, &spod).expect("src"), a.src_ip),
            &endpoint_of(&m, &state, a.dst_ip),
            proto,
            a.dst_port,
        );
        // Both denying sides report when the packet goes on: one AUDIT per denying side.
        let audits = verdicts(&flows, a)
            .iter()
            .filter(|f| f.verdict == Verdict::Audit as i32)
            .count();
        let denying = usize::from(!d.egress.allowed) + usize::from(!d.ingress.allowed);
        let node_of = |ns: &str, name: &str| state.pods.iter().find(|p| p.namespace == ns && p.name == name).map(|p| &p.node);
        let same_node = dst_pod.as_ref().is_some_and(|(dns, dpod)| node_of(&sns, &spod) == node_of(dns, dpod));
        let expected = if same_node { usize::from(denying > 0) } else { denying };
        assert_eq!(audits, expected, "AUDIT records for {a:?}: {d:?}");
        audited += usize::from(audits > 0);
    }
    assert_eq!(audited, denied, "every attempt enforce denied is audited now");

    // 3. Live changes: while allowed traffic runs, an unrelated policy comes and goes
    //    (no allowed attempt fails); then the allowing policy goes and the same traffic
    //    is denied.
    after_policy_change(&probes, || set_modes(&lab.dir, &state, "enforce"));
    let steady = Scenario::parse(
        "steady",
        "connections:\n  - { from: frontend/frontend, to: { pod: backend/backend }, protocol: TCP, port: 80, family: both, count: 300, rate: 100, timeout_ms: 1000 }\n",
    )
    .expect("scenario");
    let st = state.clone();
    let runner = std::thread::spawn(move || drive::run(&st, &steady, &DriveOptions::default()));
    let unrelated = mdir.join("policies/50-unrelated.yaml");
    // Each change waits for the probes to take it in (about half a second), so the
    // four changes spread over the traffic.
    for i in 0..4 {
        after_policy_change(&probes, || {
            if i % 2 == 0 {
                std::fs::write(
                    &unrelated,
                    "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: { name: db-extra, namespace: db }\nspec:\n  podSelector: {}\n  ingress: [ { from: [ { podSelector: {} } ], ports: [ { port: 5432 } ] } ]\n",
                )
                .expect("write");
            } else {
                std::fs::remove_file(&unrelated).expect("remove");
            }
        });
    }
    let report = runner.join().expect("thread").expect("drive");
    assert_eq!(report.failed, 0, "allowed connections failed during policy changes");

    after_policy_change(&probes, || {
        std::fs::remove_file(mdir.join("policies/10-allow-chain.yaml")).expect("remove allow")
    });
    let after = Scenario::parse(
        "after",
        "connections:\n  - { from: frontend/frontend, to: { pod: backend/backend }, protocol: TCP, port: 80, family: both, count: 2, timeout_ms: 400 }\n",
    )
    .expect("scenario");
    let report = drive::run(&state, &after, &DriveOptions::default()).expect("drive");
    assert_eq!(report.succeeded, 0, "denied once the allowing policy is gone");

    // 4. An established flow (one UDP socket, one 5-tuple) keeps working across a change
    //    that still allows it, and is cut by one that denies it.
    after_policy_change(&probes, || copy_policies(&mdir));
    let backend = state.pod("backend", "backend").expect("backend").clone();
    let api = state
        .pods
        .iter()
        .find(|p| p.namespace == "backend" && p.name.starts_with("api-"))
        .expect("api pod")
        .clone();
    let flow = UdpFlow::open(&backend.netns, std::net::SocketAddr::new(IpAddr::V4(api.ipv4), 5353));
    assert!(flow.echo(), "allowed: backend -> api, same namespace");
    after_policy_change(&probes, || {
        std::fs::write(
            mdir.join("policies/50-unrelated.yaml"),
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: { name: db-extra, namespace: db }\nspec:\n  podSelector: {}\n  ingress: [ { from: [ { podSelector: {} } ] } ]\n",
        )
        .expect("write")
    });
    assert!(flow.echo(), "an unrelated change leaves the established flow alone");
    // Without the namespace policies, backend's egress is limited to db: the flow is cut.
    after_policy_change(&probes, || {
        std::fs::remove_file(mdir.join("policies/00-namespace-deny.yaml")).expect("remove")
    });
    assert!(!flow.echo(), "a change that denies the flow cuts it");

    drop(probes);
    lab.down().expect("lab down");
}

/// GET /metrics over plain HTTP/1.0.
fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("metrics endpoint");
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: probe\r\n\r\n").expect("request");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("response");
    assert!(out.starts_with("HTTP/1.0 200") || out.starts_with("HTTP/1.1 200"), "{out}");
    out
}

/// A UDP socket inside a pod's network namespace, connected to a peer: one 5-tuple for
/// as long as it lives.
struct UdpFlow {
    sock: std::net::UdpSocket,
}

impl UdpFlow {
    fn open(netns: &str, peer: std::net::SocketAddr) -> UdpFlow {
        let path = PathBuf::from("/run/netns").join(netns);
        let sock = std::thread::spawn(move || {
            use std::os::fd::AsFd;
            let f = std::fs::File::open(&path).expect("netns");
            nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            // The socket stays in this namespace after the thread is gone.
            let s = std::net::UdpSocket::bind("0.0.0.0:0").expect("bind");
            s.connect(peer).expect("connect");
            s.set_read_timeout(Some(Duration::from_millis(500))).expect("timeout");
            s
        })
        .join()
        .expect("thread");
        UdpFlow { sock }
    }

    /// Sends a datagram and says whether the echo came back.
    fn echo(&self) -> bool {
        let mut buf = [0u8; 64];
        for _ in 0..2 {
            if self.sock.send(b"ping").is_ok() && self.sock.recv(&mut buf).is_ok() {
                return true;
            }
        }
        false
    }
}
