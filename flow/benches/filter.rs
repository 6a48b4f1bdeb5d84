//! Filter cost per flow: a 10-field filter (namespace, workload, label selector, port
//! range, verdict, protocol, TCP flags, direction, node glob, CIDR) with a deny entry,
//! against a one-field verdict filter in the same run, over annotated flows of which
//! about a tenth match. Run: `cargo bench -p flows-flow --bench filter`.

use std::{hint::black_box, time::Instant};

use flows_flow::FilterSet;
use flows_proto::{
    Endpoint, Flow, FlowFilter, Ip, IpVersion, Layer4, Tcp, TcpFlags, TrafficDirection, Verdict,
    Workload, layer4,
};

fn endpoint(ns: &str, app: &str, i: usize) -> Endpoint {
    Endpoint {
        identity: 0,
        namespace: ns.into(),
        pod_name: format!("{app}-7d9f-{i:05}"),
        labels: vec![format!("app={app}"), format!("tier=t{}", i % 3), "pod-template-hash=7d9f".into()],
        workloads: vec![
            Workload { name: format!("{app}-7d9f"), kind: "ReplicaSet".into() },
            Workload { name: app.into(), kind: "Deployment".into() },
        ],
        node_name: format!("node-{}", i % 8),
        is_world: false,
    }
}

fn flows(n: usize) -> Vec<Flow> {
    (0..n)
        .map(|i| {
            let (src_ns, src_app) = if i % 5 == 0 { ("shop", "web") } else { ("data", "etl") };
            Flow {
                node_name: format!("node-{}", i % 8),
                verdict: if i % 2 == 0 { Verdict::Dropped } else { Verdict::Forwarded } as i32,
                traffic_direction: TrafficDirection::Egress as i32,
                ip: Some(Ip {
                    source: format!("10.244.{}.{}", i % 8, i % 250 + 2),
                    destination: format!("10.244.{}.{}", (i + 3) % 8, (i * 7) % 250 + 2),
                    ip_version: IpVersion::Ipv4 as i32,
                }),
                l4: Some(Layer4 {
                    protocol: Some(layer4::Protocol::Tcp(Tcp {
                        source_port: 40_000 + (i % 20_000) as u32,
                        destination_port: if i % 3 == 0 { 5432 } else { 8080 },
                        flags: Some(TcpFlags { syn: true, ..Default::default() }),
                    })),
                }),
                source: Some(endpoint(src_ns, src_app, i)),
                destination: Some(endpoint("data", "db", i + 1)),
                ..Default::default()
            }
        })
        .collect()
}

fn time(set: &FilterSet, flows: &[Flow], rounds: usize) -> (f64, usize) {
    let t = Instant::now();
    let mut hits = 0;
    for _ in 0..rounds {
        for f in flows {
            hits += usize::from(set.matches(black_box(f)));
        }
    }
    (t.elapsed().as_nanos() as f64 / (rounds * flows.len()) as f64, hits / rounds)
}

fn main() {
    let flows = flows(100_000);
    let ten = FilterSet::new(
        &[FlowFilter {
            source_namespace: vec!["shop".into(), "frontend".into()],
            destination_workload: vec!["deployment/db".into()],
            source_label: vec!["app in (web, api),tier!=t9".into()],
            destination_port: vec!["5400-5500".into()],
            verdict: vec![Verdict::Dropped as i32],
            protocol: vec!["tcp".into()],
            tcp_flags: vec![TcpFlags { syn: true, ..Default::default() }],
            traffic_direction: vec![TrafficDirection::Egress as i32],
            node_name: vec!["node-*".into()],
            source_ip: vec!["10.244.0.0/16".into()],
            ..Default::default()
        }],
        &[FlowFilter { destination_pod: vec!["data/db-7d9f-0000".into()], ..Default::default() }],
    )
    .expect("10-field filter");
    let one = FilterSet::new(
        &[FlowFilter { verdict: vec![Verdict::Dropped as i32], ..Default::default() }],
        &[],
    )
    .expect("1-field filter");
    // Warm-up, then measure each twice, alternating.
    let _ = time(&ten, &flows, 1);
    let _ = time(&one, &flows, 1);
    let (b1, one_hits) = time(&one, &flows, 10);
    let (t1, ten_hits) = time(&ten, &flows, 10);
    let (b2, _) = time(&one, &flows, 10);
    let (t2, _) = time(&ten, &flows, 10);
    let (base, cost) = ((b1 + b2) / 2.0, (t1 + t2) / 2.0);
    println!(
        "filter over {} flows: 1-field verdict filter (baseline) {base:.1} ns/flow ({one_hits} match); \
         10-field filter + deny entry {cost:.1} ns/flow ({ten_hits} match) = {:.1}x the baseline",
        flows.len(),
        cost / base
    );
}
