//! End to end, for real: a 2-node lab (network namespaces, veths, bridges, nftables),
//! one node-probe process per node with the eBPF datapath attached, TCP/UDP/ICMP over
//! IPv4 and IPv6 within a node and across nodes, and the flows read back over gRPC.
//!
//! Needs root (skips with a message otherwise). The lab lock serialises it with every
//! other lab test; the lab guard and the probe guards clean up even when an assertion
//! fails.

use std::{
    collections::HashMap,
    net::IpAddr,
    os::fd::AsFd,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

mod common;

use common::{Probe, all_flows};
use flows_lab::{
    cni::CniMode,
    drive::{self, AttemptReport, DriveOptions, Outcome, Protocol, Scenario},
    state::State,
    testing::{LabGuard, skip_unless_root},
};
use flows_proto::{
    Flow, ObservationPoint, TrafficDirection, Verdict, layer4,
};

const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: { name: frontend, labels: { ns: frontend } }
---
apiVersion: v1
kind: Namespace
metadata: { name: backend, labels: { ns: backend } }
---
apiVersion: v1
kind: Namespace
metadata: { name: db, labels: { ns: db } }
---
apiVersion: v1
kind: Pod
metadata: { name: frontend, namespace: frontend, labels: { run: frontend } }
spec:
  nodeName: node-1
  containers:
    - name: web
      image: nginx
      ports:
        - { name: http, containerPort: 80 }
        - { name: echo, containerPort: 5353, protocol: UDP }
---
apiVersion: v1
kind: Pod
metadata: { name: backend, namespace: backend, labels: { run: backend } }
spec:
  nodeName: node-2
  containers:
    - name: api
      image: nginx
      ports:
        - { name: http, containerPort: 80 }
        - { name: echo, containerPort: 5353, protocol: UDP }
---
apiVersion: v1
kind: Pod
metadata: { name: db, namespace: db, labels: { run: db } }
spec:
  nodeName: node-1
  containers:
    - name: pg
      image: postgres
      ports:
        - { name: pg, containerPort: 5432 }
        - { name: echo, containerPort: 5353, protocol: UDP }
"#;

const TRAFFIC: &str = r#"
connections:
  - { name: cross-tcp, from: frontend/frontend, to: { pod: backend/backend }, protocol: TCP, port: 80, family: both, count: 2 }
  - { name: local-tcp, from: frontend/frontend, to: { pod: db/db }, protocol: TCP, port: 5432, family: both, count: 2 }
  - { name: cross-udp, from: frontend/frontend, to: { pod: backend/backend }, protocol: UDP, port: 5353, family: both, count: 2 }
  - { name: local-udp, from: db/db, to: { pod: frontend/frontend }, protocol: UDP, port: 5353, family: both, count: 2 }
  - { name: cross-icmp, from: backend/backend, to: { pod: frontend/frontend }, protocol: ICMP, family: both, count: 2 }
  - { name: local-icmp, from: db/db, to: { pod: frontend/frontend }, protocol: ICMP, family: both, count: 1 }
  - { name: world-v4, from: db/db, to: { ip: 203.0.113.10 }, protocol: TCP, port: 80, count: 1 }
  - { name: world-v6, from: backend/backend, to: { ip: "2001:db8:100::10" }, protocol: TCP, port: 443, family: ipv6, count: 1 }
"#;

const BLOCKED: &str = r#"
connections:
  - { name: blocked, from: frontend/frontend, to: { pod: backend/backend }, protocol: TCP, port: 80, family: both, count: 2, timeout_ms: 1500, expect: failure }
"#;

/// (src ip, src port, dst ip, dst port) of a flow; ICMP uses the echo id for both ports.
fn tuple_of(f: &Flow) -> (IpAddr, u16, IpAddr, u16, &'static str) {
    let ip = f.ip.as_ref().expect("ip");
    let s: IpAddr = ip.source.parse().expect("src ip");
    let d: IpAddr = ip.destination.parse().expect("dst ip");
    match f.l4.as_ref().and_then(|l| l.protocol.as_ref()).expect("l4") {
        layer4::Protocol::Tcp(t) => (s, t.source_port as u16, d, t.destination_port as u16, "TCP"),
        layer4::Protocol::Udp(u) => (s, u.source_port as u16, d, u.destination_port as u16, "UDP"),
        layer4::Protocol::Icmpv4(i) => (s, i.echo_id as u16, d, i.echo_id as u16, "ICMP"),
        layer4::Protocol::Icmpv6(i) => (s, i.echo_id as u16, d, i.echo_id as u16, "ICMP"),
        layer4::Protocol::Sctp(x) => (s, x.source_port as u16, d, x.destination_port as u16, "SCTP"),
    }
}

fn attempt_tuple(a: &AttemptReport) -> (IpAddr, u16, IpAddr, u16, &'static str) {
    let sport = a.src_port.expect("src port");
    let proto = match a.protocol {
        Protocol::Tcp => "TCP",
        Protocol::Udp => "UDP",
        Protocol::Icmp => "ICMP",
    };
    let dport = if proto == "ICMP" { sport } else { a.dst_port };
    (a.src_ip.expect("src ip"), sport, a.dst_ip, dport, proto)
}

/// Node of the pod that owns `ip`, or None outside the cluster.
fn node_of(state: &State, ip: IpAddr) -> Option<String> {
    state
        .pods
        .iter()
        .find(|p| IpAddr::V4(p.ipv4) == ip || IpAddr::V6(p.ipv6) == ip)
        .map(|p| p.node.clone())
}

type Key = (String, i32, bool, (IpAddr, u16, IpAddr, u16, &'static str));

fn index(flows: &[Flow]) -> HashMap<Key, Vec<&Flow>> {
    let mut m: HashMap<Key, Vec<&Flow>> = HashMap::new();
    for f in flows {
        m.entry((f.node_name.clone(), f.observation_point, f.is_reply, tuple_of(f)))
            .or_default()
            .push(f);
    }
    m
}

fn reversed(t: (IpAddr, u16, IpAddr, u16, &'static str)) -> (IpAddr, u16, IpAddr, u16, &'static str) {
    (t.2, t.3, t.0, t.1, t.4)
}

/// Waits until the probes hold at least `min` flows in total.
fn flows_from(probes: &[Probe], min: usize) -> Vec<Flow> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let all: Vec<Flow> = probes.iter().flat_map(|p| all_flows(&p.addr)).collect();
        if all.len() >= min || Instant::now() > deadline {
            return all;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Names of programs attached (TCX) to an interface inside a network namespace.
fn tcx_in(netns: &str, ifname: &str) -> Vec<String> {
    let path = PathBuf::from("/run/netns").join(netns);
    let ifname = ifname.to_string();
    std::thread::spawn(move || {
        let f = std::fs::File::open(&path).expect("netns file");
        nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        flows_node_probe::datapath::tcx_programs(&ifname).expect("query tcx")
    })
    .join()
    .expect("thread")
}

fn nft_in(netns: &str, script: &str) {
    let st = Command::new("ip")
        .args(["netns", "exec", netns, "nft", script])
        .status()
        .expect("nft");
    assert!(st.success(), "nft {script:?} in {netns}");
}

flows_lab::per_cni!(every_attempt_is_reported_once_per_observation_point);

/// Runs in every wiring mode of the lab (`per_cni!`).
fn every_attempt_is_reported_once_per_observation_point(cni: CniMode) {
    if skip_unless_root("every_attempt_is_reported_once_per_observation_point") {
        return;
    }
    let lab = LabGuard::from_yaml_wired(CLUSTER, 2, cni).expect("lab up");
    let state = lab.state.clone();
    let mut probes: Vec<Probe> = ["node-1", "node-2"]
        .iter()
        .map(|n| Probe::start(&state, n, &lab.dir))
        .collect();

    // 1. Traffic that succeeds.
    let scenario = Scenario::parse("e2e-traffic", TRAFFIC).expect("scenario");
    let report = drive::run(&state, &scenario, &DriveOptions::default()).expect("drive");
    for a in &report.attempts {
        assert_eq!(a.outcome, Outcome::Success, "attempt failed: {a:?}");
    }

    // Each attempt: one record (and one first-reply record) per observation point.
    let mut expected = 0;
    for a in &report.attempts {
        expected += 2 * (node_of(&state, a.src_ip.expect("ip")).is_some() as usize
            + node_of(&state, a.dst_ip).is_some() as usize);
    }
    let flows = flows_from(&probes, expected);
    let ix = index(&flows);
    let from = ObservationPoint::FromEndpoint as i32;
    let to = ObservationPoint::ToEndpoint as i32;
    for a in &report.attempts {
        let t = attempt_tuple(a);
        let mut points = Vec::new();
        if let Some(n) = node_of(&state, t.0) {
            points.push((n, from, TrafficDirection::Egress));
        }
        if let Some(n) = node_of(&state, t.2) {
            points.push((n, to, TrafficDirection::Ingress));
        }
        for (node, point, dir) in points {
            let req = ix.get(&(node.clone(), point, false, t)).map(Vec::as_slice).unwrap_or(&[]);
            assert_eq!(req.len(), 1, "attempt {a:?} at {node}/{point}: {req:?}");
            assert_eq!(req[0].traffic_direction, dir as i32, "{:?}", req[0]);
            assert_eq!(req[0].verdict, Verdict::Forwarded as i32);
            if t.4 == "TCP" {
                let syn = match req[0].l4.as_ref().and_then(|l| l.protocol.as_ref()) {
                    Some(layer4::Protocol::Tcp(tcp)) => tcp.flags.as_ref().is_some_and(|f| f.syn && !f.ack),
                    _ => false,
                };
                assert!(syn, "the attempt record is the SYN: {:?}", req[0]);
            }
            // The reply crosses the same interface the other way: the other hook.
            let reply_point = if point == from { to } else { from };
            let rep = ix
                .get(&(node.clone(), reply_point, true, reversed(t)))
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            assert_eq!(rep.len(), 1, "first reply of {a:?} at {node}/{reply_point}: {rep:?}");
            assert!(rep[0].is_reply);
            // Direction is the connection's, from the observed pod's side.
            assert_eq!(rep[0].traffic_direction, dir as i32, "{:?}", rep[0]);
        }
    }
    // Nothing beyond what the scenario made: no duplicate attempts, no stray records.
    assert_eq!(flows.len(), expected, "unexpected extra flows: {flows:#?}");

    // 2. An nftables drop inside the backend pod: the attempts show as DROPPED with
    //    the kernel's reason, once per attempt, on the backend's node only.
    let backend = state.pod("backend", "backend").expect("backend pod").clone();
    nft_in(
        &backend.netns,
        "add table inet flowstest; add chain inet flowstest input { type filter hook input priority 0; }; add rule inet flowstest input tcp dport 80 drop",
    );
    let blocked = Scenario::parse("e2e-blocked", BLOCKED).expect("scenario");
    let report = drive::run(&state, &blocked, &DriveOptions::default()).expect("drive");
    let before = flows.len();
    // Per attempt: from-endpoint + to-endpoint (no replies) + one drop.
    let flows = flows_from(&probes, before + 3 * report.attempts.len());
    let drops: Vec<&Flow> = flows
        .iter()
        .filter(|f| f.verdict == Verdict::Dropped as i32)
        .collect();
    for a in &report.attempts {
        assert_eq!(a.outcome, Outcome::Failure, "should be blocked: {a:?}");
        let t = attempt_tuple(a);
        let d: Vec<_> = drops.iter().filter(|f| tuple_of(f) == t).collect();
        assert_eq!(d.len(), 1, "one drop record for {a:?}: {d:?}");
        assert_eq!(d[0].drop_reason, "NETFILTER_DROP");
        assert_eq!(d[0].node_name, backend.node);
        assert_eq!(d[0].observation_point, ObservationPoint::KernelDrop as i32);
        let ix = index(&flows);
        assert!(ix.get(&(backend.node.clone(), from, true, reversed(t))).is_none(), "no reply");
    }
    assert_eq!(drops.len(), report.attempts.len(), "{drops:#?}");

    // 3. SIGTERM with a follower attached (as a relay would be): clean exit, nothing left
    //    attached, and the follower's stream ends instead of holding the probe up.
    let (open_tx, open_rx) = std::sync::mpsc::channel::<()>();
    let followers: Vec<_> = probes
        .iter()
        .map(|p| {
            let addr = p.addr.clone();
            let open = open_tx.clone();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
                rt.block_on(async {
                    let mut c = flows_proto::observer_client::ObserverClient::connect(format!("http://{addr}"))
                        .await
                        .expect("connect");
                    let mut s = c
                        .get_flows(flows_proto::GetFlowsRequest { follow: true, ..Default::default() })
                        .await
                        .expect("follow")
                        .into_inner();
                    // The server has accepted the follow request: its stream task runs.
                    let _ = open.send(());
                    while let Ok(Some(_)) = s.message().await {}
                })
            })
        })
        .collect();
    for _ in &probes {
        open_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("every follower's stream is open before SIGTERM");
    }
    for p in probes.iter_mut() {
        let st = p.signal(nix::sys::signal::Signal::SIGTERM);
        assert!(st.success(), "node-probe {} exit: {st}", p.node);
    }
    for f in followers {
        f.join().expect("follower ended");
    }
    for pod in &state.pods {
        let node = state.node(&pod.node).expect("node");
        assert!(tcx_in(&node.netns, &pod.host_ifname).is_empty(), "{} still attached", pod.host_ifname);
    }

    // 4. SIGKILL: the kernel releases the links; the next start attaches again.
    let mut p = Probe::start(&state, "node-1", &lab.dir);
    let node1 = state.node("node-1").expect("node-1").clone();
    let iface = state.pods.iter().find(|p| p.node == "node-1").expect("pod").host_ifname.clone();
    assert_eq!(tcx_in(&node1.netns, &iface).len(), 2, "ingress and egress attached");
    p.signal(nix::sys::signal::Signal::SIGKILL);
    // The links go when the dead process's files are closed; allow the kernel a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !tcx_in(&node1.netns, &iface).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(tcx_in(&node1.netns, &iface).is_empty(), "links released after SIGKILL");
    let mut p = Probe::start(&state, "node-1", &lab.dir);
    assert_eq!(tcx_in(&node1.netns, &iface).len(), 2);
    assert!(p.signal(nix::sys::signal::Signal::SIGTERM).success());

    lab.down().expect("lab down");
}
