//! The store's SQL condition and FlowFilter agree: generated flows are stored in the
//! embedded engine, and for every generated filter (as an allow list and as a deny list)
//! the store returns exactly the flows `FilterSet` matches among what it holds.

use std::{collections::BTreeSet, path::PathBuf};

use flows_flow::FilterSet;
use flows_proto::{
    Endpoint, EventType, Flow, FlowFilter, Icmpv4, Ip, IpVersion, L4Unknown, L4UnknownReason, Layer4, Sctp, Tcp,
    TcpFlags, Timestamp, TrafficDirection, Udp, Verdict, Workload, layer4,
};
use flows_store::{FlowQuery, FlowRow, Retention, Store, StoreConfig};

/// A small deterministic generator (no dependency, same cases every run).
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.next() as usize % v.len()]
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

const V4: [&str; 4] = ["10.0.0.1", "10.1.2.3", "192.168.1.5", "172.16.0.9"];
const V6: [&str; 4] = ["fd00::1", "fd00:1::5", "2001:db8::7", "::ffff:10.0.0.1"];
const NAMESPACES: [&str; 3] = ["shop", "data", "kube-system"];
const PODS: [&str; 4] = ["web-1", "web-2", "db-0", "api-6b7c-x"];
const APPS: [&str; 3] = ["web", "db", "api"];
const NODES: [&str; 3] = ["node-1", "node-2", "edge_1"];

fn endpoint(g: &mut Gen) -> Option<Endpoint> {
    if g.chance(15) {
        return None;
    }
    if g.chance(15) {
        return Some(Endpoint { is_world: true, labels: vec!["reserved:world".into()], ..Default::default() });
    }
    let app = *g.pick(&APPS);
    let workloads = if g.chance(50) {
        vec![Workload { name: app.into(), kind: (*g.pick(&["Deployment", "StatefulSet"])).into() }]
    } else {
        vec![]
    };
    Some(Endpoint {
        namespace: (*g.pick(&NAMESPACES)).into(),
        pod_name: (*g.pick(&PODS)).into(),
        labels: if g.chance(80) { vec![format!("app={app}")] } else { vec!["tier=x".into()] },
        workloads,
        node_name: (*g.pick(&NODES)).into(),
        ..Default::default()
    })
}

fn flow(g: &mut Gen, i: u32, t: i64) -> Flow {
    let v6 = g.chance(40);
    let addr = |g: &mut Gen| (*g.pick(if v6 { &V6 } else { &V4 })).to_string();
    let (sport, dport) = (*g.pick(&[53u32, 80, 443, 8080, 40000]), *g.pick(&[53u32, 80, 443, 8080, 40000]));
    let flags = TcpFlags { syn: g.chance(50), ack: g.chance(50), ..Default::default() };
    let (l4, l4_unknown) = match g.next() % 6 {
        0 => (Some(layer4::Protocol::Tcp(Tcp { source_port: sport, destination_port: dport, flags: Some(flags) })), None),
        1 => (Some(layer4::Protocol::Udp(Udp { source_port: sport, destination_port: dport })), None),
        2 => (Some(layer4::Protocol::Sctp(Sctp { source_port: sport, destination_port: dport })), None),
        3 if !v6 => (Some(layer4::Protocol::Icmpv4(Icmpv4 { r#type: 8, code: 0, echo_id: 0 })), None),
        4 => (None, Some(L4Unknown { reason: L4UnknownReason::Protocol as i32, protocol: 47 })),
        _ => (Some(layer4::Protocol::Tcp(Tcp { source_port: sport, destination_port: dport, flags: Some(flags) })), None),
    };
    let verdict = *g.pick(&[Verdict::Forwarded, Verdict::Dropped, Verdict::Audit]);
    Flow {
        time: Some(Timestamp { seconds: t.div_euclid(1_000_000_000) + i as i64, nanos: 0 }),
        uuid: format!("u-{i}"),
        node_name: (*g.pick(&NODES)).into(),
        verdict: verdict as i32,
        drop_reason: if verdict == Verdict::Dropped { "POLICY_DENIED".into() } else { String::new() },
        event_type: *g.pick(&[EventType::Trace as i32, EventType::PolicyVerdict as i32]),
        ip: Some(Ip { source: addr(g), destination: addr(g), ip_version: if v6 { IpVersion::Ipv6 } else { IpVersion::Ipv4 } as i32 }),
        l4: l4.map(|p| Layer4 { protocol: Some(p) }),
        l4_unknown,
        source: endpoint(g),
        destination: endpoint(g),
        traffic_direction: *g.pick(&[TrafficDirection::Ingress as i32, TrafficDirection::Egress as i32]),
        is_reply: g.chance(30),
        ..Default::default()
    }
}

fn filter(g: &mut Gen) -> FlowFilter {
    let mut f = FlowFilter::default();
    let s = |v: &[&str], g: &mut Gen| vec![(*g.pick(v)).to_string()];
    let ips = ["10.0.0.0/8", "0.0.0.0/0", "::/0", "fd00::/16", "10.0.0.1", "fd00::1", "::ffff:10.0.0.1", "::ffff:0:0/96", "192.168.0.0/16", "2001:db8::/32"];
    for _ in 0..(1 + g.next() % 2) {
        match g.next() % 16 {
            0 => f.source_ip = s(&ips, g),
            1 => f.destination_ip = s(&ips, g),
            2 => f.source_pod = s(&["shop/", "shop/web", "web", "db-", "data/db-0"], g),
            3 => f.destination_pod = s(&["shop/", "kube-system/", "api"], g),
            4 => f.source_label = s(&["app=web", "app!=web", "app in (web,db)", "!app", "app", "tier"], g),
            5 => f.destination_label = s(&["app=db", "tier=x", "app notin (api)"], g),
            6 => f.source_workload = s(&["deployment/web", "web", "StatefulSet/db", "statefulset/api"], g),
            7 => f.destination_port = s(&["80", "1-100", "40000", "0-65535"], g),
            8 => f.source_port = s(&["53", "443-8080"], g),
            9 => f.verdict = vec![*g.pick(&[Verdict::Forwarded as i32, Verdict::Dropped as i32, Verdict::Audit as i32])],
            10 => f.protocol = s(&["tcp", "udp", "icmp", "sctp", "icmpv6"], g),
            11 => f.node_name = s(&["node-1", "node-*", "*", "edge_1", "edge%1"], g),
            12 => f.ip_version = vec![*g.pick(&[IpVersion::Ipv4 as i32, IpVersion::Ipv6 as i32])],
            13 => f.reply = vec![g.chance(50)],
            14 => f.source_namespace = s(&["shop", "data"], g),
            _ => f.tcp_flags = vec![TcpFlags { syn: true, ..Default::default() }],
        }
    }
    f
}

fn uuids(v: &[Flow]) -> BTreeSet<String> {
    v.iter().map(|f| f.uuid.clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_conditions_agree_with_flow_filters() {
    let lib = flows_store::chdb::default_library();
    assert!(lib.exists(), "{} is missing: run scripts/setup.sh", lib.display());
    let dir: PathBuf = std::env::temp_dir().join(format!("flows-store-differential-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let store = Store::open(&StoreConfig::Embedded { path: dir.clone(), library: lib }, "flows", Retention::default())
        .await
        .expect("open");
    let mut g = Gen(7);
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_nanos() as i64 - 3_600_000_000_000;
    let rows: Vec<FlowRow> = (0..400).map(|i| FlowRow::from_flow(&flow(&mut g, i, t))).collect();
    store.insert(&rows).await.expect("insert");
    // What the store holds, as it gives it back.
    let held: Vec<Flow> = rows.iter().map(FlowRow::to_flow).collect();
    let mut checked = 0;
    for _ in 0..150 {
        let f = filter(&mut g);
        for (allow, deny) in [(vec![f.clone()], vec![]), (vec![], vec![f.clone()])] {
            let set = FilterSet::new(&allow, &deny).expect("valid filter");
            let want: Vec<Flow> = held.iter().filter(|x| set.matches(x)).cloned().collect();
            let got = store.flows(&FlowQuery { allow, deny, ..Default::default() }).await.expect("query");
            assert_eq!(uuids(&got), uuids(&want), "store and FlowFilter disagree on {f:?}");
            checked += 1;
        }
    }
    assert_eq!(checked, 300);
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}
