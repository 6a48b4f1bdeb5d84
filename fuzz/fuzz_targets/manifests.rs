//! Manifest text → objects, as the node-probe (`--manifests`) and the relay's offline
//! index read it: `flows_policy::load::parse` (multi-document YAML, JSON, `kind: List`),
//! `Manifests::parse` (validation and compilation of every NetworkPolicy, namespace
//! modes), and `flows_k8s::manifests::objects` into a `ClusterIndex`.
//!
//! Errors are fine, panics are not. What reads must also hold together: everything
//! `Manifests::parse` accepts is evaluated on every pair of its pods and compiled into
//! datapath state that decides as the evaluator does (see flows_fuzz::check_manifests),
//! and the index answers for every address its pods claim.

#![no_main]

use std::net::IpAddr;

use flows_flow::enrich::{EndpointGetter, ServiceGetter, annotate};
use flows_k8s::{Cidr, ClusterIndex, index::Object, manifests::objects};
use flows_policy::{Manifests, Protocol, load};
use libfuzzer_sys::fuzz_target;

const PROBES: [(Protocol, u16); 5] = [
    (Protocol::Tcp, 80),
    (Protocol::Tcp, 5432),
    (Protocol::Udp, 53),
    (Protocol::Sctp, 80),
    (Protocol::Icmp, 0),
];

fn externals() -> Vec<IpAddr> {
    ["10.0.0.1", "192.168.1.1", "8.8.8.8", "fd00::1"]
        .iter()
        .filter_map(|s| s.parse().ok())
        .collect()
}

fuzz_target!(|data: &[u8]| {
    // The readers take text (files are read with read_to_string, which refuses non-UTF-8).
    let Ok(text) = std::str::from_utf8(data) else { return };

    let loaded = load::parse("fuzz.yaml", text);
    let parsed = Manifests::parse([("fuzz.yaml", text)]);
    // Manifests::parse reads through load::parse: a text it cannot read cannot be manifests.
    if let (Err(e), Ok(_)) = (&loaded, &parsed) {
        panic!("load::parse refused ({e}) what Manifests::parse accepted");
    }
    if let Ok(m) = &parsed {
        flows_fuzz::check_manifests(m, &externals(), &PROBES);
    }

    // The relay's offline index over the same text.
    if let Ok(objs) = objects("fuzz.yaml", text) {
        let cidrs = ["10.96.0.0/12", "fd00::/8"].iter().filter_map(|c| Cidr::parse(c)).collect();
        let mut index = ClusterIndex::new(cidrs);
        let mut addrs = externals();
        for o in objs {
            if let Object::Pod(p) = &o {
                addrs.extend(flows_policy::pod_info(p).ips);
            }
            index.apply(o);
        }
        let pods = index.pod_endpoints();
        for ip in &addrs {
            let held = index.pod(*ip);
            if let Some(ep) = &held {
                // The endpoint kept for the address is the pod as it is now (owners that
                // arrived after the pod included), and the address names that pod.
                let fresh = pods.iter().find(|p| p.namespace == ep.namespace && p.pod_name == ep.pod_name);
                assert_eq!(fresh, Some(&**ep), "stale endpoint kept for {ip}");
                assert_eq!(index.endpoint(*ip).as_ref(), Some(&**ep), "{ip}: the pod comes first");
            }
            let service = index.service(*ip);
            if index.endpoint(*ip).is_some_and(|e| e.is_world) {
                assert!(held.is_none() && service.is_none(), "{ip}: world, yet a pod or service holds it");
            }
        }
        // Annotation through the index, as the relay does for every flow.
        if let [.., a, b] = addrs.as_slice() {
            let mut f = flows_proto::Flow {
                ip: Some(flows_proto::Ip {
                    source: a.to_string(),
                    destination: b.to_string(),
                    ip_version: 1,
                }),
                ..Default::default()
            };
            annotate(&mut f, &index, &index);
            assert_eq!(f.source, index.endpoint(*a), "annotation takes what the index knows");
            assert_eq!(f.destination, index.endpoint(*b), "annotation takes what the index knows");
        }
    }
});
