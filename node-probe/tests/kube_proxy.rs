//! Services translated by the real kube-proxy (v1.36, one per node in its namespace, on
//! the lab's API server), in both of the modes clusters run, under two CNI wirings:
//! ClusterIPs (both families), a pod through its own service (hairpin), a service with
//! no endpoints (refused), the cluster DNS, and NodePort traffic from the world on the
//! node that has the pod and on the one that does not (which forwards it, translated).
//! The probes see every attempt where it leaves the client (to the service address) and
//! where it reaches the backend (at the pod's address, from the client, or from a node
//! once kube-proxy translated the source). Then, with the seed policies enforced, every
//! pod to every service port: each attempt succeeds exactly when the evaluator allows
//! the client to reach the backend kube-proxy chose (policy is decided after the real
//! kube-proxy's translation), and each denial names the evaluator's policies. Needs root
//! and the control plane's binaries.

mod common;

use std::{net::IpAddr, path::PathBuf};

use common::{Probe, all_flows, settle};
use flows_lab::{
    UpOptions,
    cni::CniMode,
    control_plane,
    drive::{self, AttemptReport, DriveOptions, Outcome, Scenario},
    manifests,
    kube_proxy::ProxyMode,
    state::State,
    testing::{LabGuard, skip_unless_root, temp_dir},
};
use flows_policy::{Endpoint, Manifests, Protocol};
use flows_proto::{Flow, ObservationPoint, Verdict};

const NODE_PORT: u16 = 30080;

const EXTRA: &str = r#"
apiVersion: v1
kind: Service
metadata: { name: db-nodeport, namespace: db }
spec:
  type: NodePort
  selector: { run: db }
  ports: [ { port: 80, targetPort: http, nodePort: 30080 } ]
---
apiVersion: v1
kind: Service
metadata: { name: nobody, namespace: db }
spec:
  selector: { run: nobody }
  ports: [ { port: 80 } ]
"#;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn addrs(f: &Flow) -> Option<(IpAddr, IpAddr)> {
    let ip = f.ip.as_ref()?;
    Some((ip.source.parse().ok()?, ip.destination.parse().ok()?))
}

fn sport(f: &Flow) -> Option<u16> {
    match f.l4.as_ref()?.protocol.as_ref()? {
        flows_proto::layer4::Protocol::Tcp(t) => Some(t.source_port as u16),
        _ => None,
    }
}

/// The attempt records (not replies) at `point` with this destination.
fn at<'a>(flows: &'a [Flow], point: ObservationPoint, dst: IpAddr) -> Vec<&'a Flow> {
    flows
        .iter()
        .filter(|f| f.observation_point == point as i32 && !f.is_reply && addrs(f).is_some_and(|(_, d)| d == dst))
        .collect()
}

fn is_pod(state: &State, ip: IpAddr) -> bool {
    state.pods.iter().any(|p| IpAddr::V4(p.ipv4) == ip || IpAddr::V6(p.ipv6) == ip)
}

fn check_flows(state: &State, flows: &[Flow], a: &AttemptReport, db_ips: &[IpAddr]) {
    let src = a.src_ip.expect("source");
    match a.connection.as_str() {
        "client-service" => {
            // Leaving the client: to the service's address, as the client asked.
            let out = at(flows, ObservationPoint::FromEndpoint, a.dst_ip);
            assert!(out.iter().any(|f| sport(f) == a.src_port && addrs(f).map(|x| x.0) == Some(src)), "{a:?}: {out:#?}");
            // Reaching the backend: at its own address, still from the client.
            let reached = db_ips.iter().flat_map(|ip| at(flows, ObservationPoint::ToEndpoint, *ip)).any(|f| sport(f) == a.src_port && addrs(f).map(|x| x.0) == Some(src));
            assert!(reached, "{a:?} reached db from the client");
        }
        "nodeport-here" | "nodeport-elsewhere" => {
            // kube-proxy translates NodePort traffic's source (externalTrafficPolicy:
            // Cluster): the backend sees a node, never the world or a pod.
            let seen: Vec<&Flow> = db_ips.iter().flat_map(|ip| at(flows, ObservationPoint::ToEndpoint, *ip)).filter(|f| {
                addrs(f).is_some_and(|(s, _)| s != src && !is_pod(state, s))
            }).collect();
            assert!(!seen.is_empty(), "{a:?}: no translated record at db");
        }
        _ => {}
    }
}

fn services_through_the_real_kube_proxy(mode: ProxyMode, cni: CniMode) {
    if skip_unless_root("services_through_the_real_kube_proxy") {
        return;
    }
    let bin = control_plane::bin_dir();
    let gone = control_plane::missing(&bin);
    assert!(gone.is_empty() && bin.join("kube-proxy").exists(), "the control plane's binaries (scripts/setup.sh): missing {gone:?}");
    let dir = temp_dir("flows-kube-proxy").expect("dir");
    let extra = dir.join("extra");
    std::fs::create_dir_all(&extra).expect("extra dir");
    std::fs::write(extra.join("services.yaml"), EXTRA).expect("write");
    let mut opts = UpOptions::new(vec![root().join("lab/examples/seed"), extra], dir.join("state"));
    opts.apiserver = Some(bin);
    opts.kube_proxy = Some(mode);
    opts.cni = cni;
    let lab = LabGuard::with_options(opts).expect("lab up");
    let state = lab.state.clone();
    let probes: Vec<Probe> = state.nodes.iter().map(|n| Probe::start(&state, &n.name, &lab.dir)).collect();

    let db = state.pod("db", "db").expect("db pod").clone();
    let here = state.node(&db.node).expect("db's node").uplink_ipv4;
    let elsewhere = state.nodes.iter().find(|n| n.name != db.node).expect("another node").uplink_ipv4;
    let scenario = format!(
        r#"
connections:
  - {{ name: client-service, from: frontend/frontend, to: {{ service: db/db }}, protocol: TCP, port: 80, family: both, count: 4, expect: success }}
  - {{ name: hairpin, from: db/db, to: {{ service: db/db }}, protocol: TCP, port: 80, family: both, count: 2, expect: success }}
  - {{ name: no-endpoints, from: frontend/frontend, to: {{ service: db/nobody }}, protocol: TCP, port: 80, family: both, timeout_ms: 1000, expect: failure }}
  - {{ name: dns, from: backend/backend, to: {{ service: kube-system/kube-dns }}, protocol: UDP, port: 53, family: both, dns_name: db.db.svc.cluster.local, expect: success }}
  - {{ name: nodeport-here, from: world, to: {{ ip: "{here}" }}, protocol: TCP, port: {NODE_PORT}, count: 2, expect: success }}
  - {{ name: nodeport-elsewhere, from: world, to: {{ ip: "{elsewhere}" }}, protocol: TCP, port: {NODE_PORT}, count: 2, expect: success }}
"#
    );
    let scenario = Scenario::parse("kube-proxy", &scenario).expect("scenario");
    let report = drive::run(&state, &scenario, &DriveOptions::default()).expect("drive");
    let lines: Vec<String> = report.attempts.iter().map(|a| format!("{} {:?} {:?} {:?}", a.connection, a.outcome, a.error, a.reply)).collect();
    assert!(report.expectations_met, "{mode:?} under {cni}:\n{}", lines.join("\n"));
    for a in &report.attempts {
        match a.connection.as_str() {
            "client-service" | "hairpin" | "nodeport-here" | "nodeport-elsewhere" => {
                assert_eq!(a.reply.as_deref(), Some("db/db 80"), "answered by db: {a:?}")
            }
            // Rejected by kube-proxy's rule (an ICMP port unreachable), not left to time
            // out. Over IPv6 the error comes back while connect() still holds the socket,
            // and the kernel drops it (TcpExtLockDroppedIcmps): the client then times out.
            "no-endpoints" if a.family == drive::Family::Ipv4 => {
                assert_eq!(a.error.as_deref(), Some("connection refused"), "{a:?}")
            }
            "no-endpoints" => assert_eq!(a.outcome, Outcome::Failure),
            _ => assert_eq!(a.outcome, Outcome::Success),
        }
    }

    settle(&state, &probes);
    let flows: Vec<Flow> = probes.iter().flat_map(|p| all_flows(&p.addr)).collect();
    let db_ips = [IpAddr::V4(db.ipv4), IpAddr::V6(db.ipv6)];
    for a in &report.attempts {
        check_flows(&state, &flows, a, &db_ips);
    }
    drop(probes);
    policies_after_the_translation(&lab);
    lab.down().expect("lab down");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every pod to every TCP port of every service with one backend, under the seed
/// policies: the kernel's outcome is the evaluator's for (client, backend, pod port).
fn policies_after_the_translation(lab: &LabGuard) {
    let state = &lab.state;
    let mdir = manifests::dir(&lab.dir);
    let modes = state.namespaces.iter().map(|n| (n.name.clone(), "enforce".to_string())).collect();
    manifests::write_cluster(&lab.dir, state, &modes).expect("cluster manifests");
    let pd = mdir.join("policies");
    std::fs::create_dir_all(&pd).expect("policies dir");
    for f in std::fs::read_dir(root().join("lab/examples/seed-policies")).expect("seed policies").flatten() {
        std::fs::copy(f.path(), pd.join(f.file_name())).expect("copy");
    }
    let args = ["--manifests", mdir.to_str().expect("utf8")];
    // Ready means attached with the policy in the maps.
    let probes: Vec<Probe> = state.nodes.iter().map(|n| Probe::start_with(state, &n.name, &lab.dir, &args)).collect();
    let mut texts = vec![("cluster".to_string(), manifests::cluster_yaml(state, &modes).expect("yaml"))];
    for f in std::fs::read_dir(&pd).expect("policies").flatten() {
        texts.push((f.path().display().to_string(), std::fs::read_to_string(f.path()).expect("read")));
    }
    let m = Manifests::parse(texts.iter().map(|(n, t)| (n.as_str(), t.as_str()))).expect("manifests");
    let engine = m.engine();

    // (connection name) -> (client, backend, pod port), for the evaluator.
    let mut text = String::from("connections:\n");
    let mut cases = std::collections::BTreeMap::new();
    for svc in &state.services {
        for pe in flows_lab::endpoints(state, svc) {
            if pe.port.protocol != "TCP" || pe.endpoints.len() != 1 {
                continue;
            }
            let backend = &pe.endpoints[0];
            for client in state.pods.iter().filter(|p| !(p.namespace == backend.namespace && p.name == backend.pod)) {
                let name = format!("{}/{}>{}/{}:{}", client.namespace, client.name, svc.namespace, svc.name, pe.port.port);
                text.push_str(&format!(
                    "  - {{ name: \"{name}\", from: {}/{}, to: {{ service: {}/{} }}, protocol: TCP, port: {}, family: both, timeout_ms: 500 }}\n",
                    client.namespace, client.name, svc.namespace, svc.name, pe.port.port
                ));
                cases.insert(name, ((client.namespace.clone(), client.name.clone()), (backend.namespace.clone(), backend.pod.clone()), backend.port, backend.ip(false), backend.ip(true)));
            }
        }
    }
    let scenario = Scenario::parse("policy-through-services", &text).expect("scenario");
    let report = drive::run(state, &scenario, &DriveOptions { concurrency: 8 }).expect("drive");
    settle(state, &probes);
    let flows: Vec<Flow> = probes.iter().flat_map(|p| all_flows(&p.addr)).collect();
    let (mut allowed, mut denied) = (0, 0);
    for a in &report.attempts {
        let ((cns, cname), (bns, bname), port, b4, b6) = cases.get(&a.connection).expect("a case").clone();
        let client = m.cluster.pod(&cns, &cname).expect("client in manifests");
        let backend = m.cluster.pod(&bns, &bname).expect("backend in manifests");
        let bip = if a.family == drive::Family::Ipv6 { b6 } else { b4 };
        let d = engine.evaluate(&m.cluster, &Endpoint::Pod(client, a.src_ip), &Endpoint::Pod(backend, Some(bip)), Protocol::Tcp, port);
        let want = if d.allowed { Outcome::Success } else { Outcome::Failure };
        assert_eq!(a.outcome, want, "kernel vs evaluator through kube-proxy for {a:?}: {d:?}");
        if d.allowed {
            allowed += 1;
            continue;
        }
        denied += 1;
        // The denial is recorded towards the backend kube-proxy chose, not the service
        // address, with the evaluator's policies of the denying side.
        let drops: Vec<&Flow> = flows
            .iter()
            .filter(|f| f.verdict == Verdict::Dropped as i32 && f.drop_reason == "POLICY_DENIED" && sport(f) == a.src_port)
            .filter(|f| addrs(f) == a.src_ip.map(|s| (s, bip)))
            .collect();
        assert_eq!(drops.len(), 1, "one denial for {a:?}: {drops:#?}");
        let named = |ps: &[flows_proto::Policy]| ps.iter().map(|p| format!("{}/{}", p.namespace, p.name)).collect::<std::collections::BTreeSet<_>>();
        let want_side = |s: &flows_policy::SideDecision| s.isolated_by.iter().map(|p| p.to_string()).collect::<std::collections::BTreeSet<_>>();
        let f = drops[0];
        if !f.egress_denied_by.is_empty() {
            assert_eq!(named(&f.egress_denied_by), want_side(&d.egress), "{a:?}");
        }
        if !f.ingress_denied_by.is_empty() {
            assert_eq!(named(&f.ingress_denied_by), want_side(&d.ingress), "{a:?}");
        }
    }
    assert!(allowed > 0 && denied > 0, "both outcomes through services ({allowed} allowed, {denied} denied)");
}

#[test]
fn kube_proxy_nftables_under_calico_vxlan() {
    services_through_the_real_kube_proxy(ProxyMode::Nftables, CniMode::CalicoVxlan);
}

#[test]
fn kube_proxy_iptables_under_flannel_vxlan() {
    services_through_the_real_kube_proxy(ProxyMode::Iptables, CniMode::FlannelVxlan);
}

#[test]
fn kube_proxy_nftables_under_the_lab_bridge() {
    services_through_the_real_kube_proxy(ProxyMode::Nftables, CniMode::Bridge);
}
