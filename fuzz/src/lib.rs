//! Checks shared by the fuzz targets (the targets are in fuzz_targets/).

use std::{collections::BTreeSet, net::IpAddr};

use flows_policy::{
    Decision, Endpoint, Manifests, PodInfo, Protocol, SideDecision,
    compile::{
        DatapathState, Direction, IdentityAllocator, Mode, NodeView, SetTable, compile_datapath,
        lookup,
    },
};

/// The address an endpoint uses towards `other`, picked as the evaluator picks it.
fn addr(ep: &Endpoint, other: &Endpoint) -> Option<IpAddr> {
    match ep {
        Endpoint::External(ip) | Endpoint::Pod(_, Some(ip)) => Some(*ip),
        Endpoint::Pod(p, None) => {
            let v6 = match other {
                Endpoint::External(ip) | Endpoint::Pod(_, Some(ip)) => Some(ip.is_ipv6()),
                Endpoint::Pod(..) => None,
            };
            p.ips.iter().find(|i| v6.is_none_or(|v| i.is_ipv6() == v)).copied()
        }
    }
}

fn refs(v: &[flows_policy::PolicyRef]) -> BTreeSet<String> {
    v.iter().map(|p| p.to_string()).collect()
}

/// What the evaluator promises about any decision.
fn side_is_consistent(s: &SideDecision, what: &str) {
    assert_eq!(
        s.allowed,
        s.isolated_by.is_empty() || !s.allowed_by.is_empty(),
        "{what}: allowed exactly when not isolated or some policy allows: {s:?}"
    );
    let isolated = refs(&s.isolated_by);
    assert!(
        refs(&s.allowed_by).is_subset(&isolated),
        "{what}: an allowing policy that does not isolate the pod: {s:?}"
    );
}

fn decision_is_consistent(d: &Decision, src: &Endpoint, dst: &Endpoint) {
    side_is_consistent(&d.egress, "egress");
    side_is_consistent(&d.ingress, "ingress");
    assert_eq!(d.allowed, d.egress.allowed && d.ingress.allowed, "{d:?}");
    if matches!(src, Endpoint::External(_)) {
        assert!(d.egress.allowed && d.egress.isolated_by.is_empty(), "no egress policy for the world: {d:?}");
    }
    if matches!(dst, Endpoint::External(_)) {
        assert!(d.ingress.allowed && d.ingress.isolated_by.is_empty(), "no ingress policy for the world: {d:?}");
    }
    if !d.allowed {
        assert!(!d.deciding().is_empty(), "a denial names the policies that decided it: {d:?}");
    }
}

/// The compiled datapath decides each side as the evaluator did: same verdict and, when
/// allowed, the same allowing policies (as sets: duplicated names are one policy to it).
fn datapath_agrees(state: &DatapathState, src: &Endpoint, dst: &Endpoint, proto: Protocol, port: u16, d: &Decision) {
    let (Some(sip), Some(dip)) = (addr(src, dst), addr(dst, src)) else {
        return; // a pod without an address of that family: nothing to enforce on
    };
    for (is_pod, me, peer, dir, want) in [
        (matches!(src, Endpoint::Pod(..)), sip, dip, Direction::Egress, &d.egress),
        (matches!(dst, Endpoint::Pod(..)), dip, sip, Direction::Ingress, &d.ingress),
    ] {
        if !is_pod {
            continue;
        }
        let Some(ep) = state.endpoints.get(&me) else {
            panic!("pod address {me} has no endpoint in the compiled state");
        };
        let isolation = match dir {
            Direction::Egress => ep.egress_isolation,
            Direction::Ingress => ep.ingress_isolation,
        };
        let isolated = isolation.map(|s| refs(state.set(s))).unwrap_or_default();
        assert_eq!(isolated, refs(&want.isolated_by), "{dir:?} isolation of {me}: datapath vs evaluator");
        let (allowed, by) = match isolation {
            None => (true, BTreeSet::new()),
            Some(_) => match lookup(state, ep.endpoint, dir, peer, proto, port) {
                Some(set) => (true, refs(state.set(set))),
                None => (false, BTreeSet::new()),
            },
        };
        let want_by = refs(&want.allowed_by);
        assert!(
            allowed == want.allowed && (!allowed || by == want_by),
            "{dir:?} {sip} -> {dip} {}/{port}: datapath allowed={allowed} by {by:?}, evaluator allowed={} by {want_by:?}",
            proto.as_str(),
            want.allowed
        );
    }
}

/// Evaluates every pair of parties on every probe with the engine, checks each decision,
/// and checks the datapath compiled for a node holding every pod against it. Also: a
/// recompile with the same allocator and set table changes nothing (the probe's diff
/// would write nothing), and a compile for one node holds only that node's pods.
pub fn check_manifests(m: &Manifests, externals: &[IpAddr], probes: &[(Protocol, u16)]) {
    let engine = m.engine();
    let cluster = &m.cluster;
    let mode_of = |ns: &str| m.modes.get(ns).copied().unwrap_or(Mode::Enforce);
    let all = NodeView { is_local: &|_| true, mode_of: &mode_of };
    let mut alloc = IdentityAllocator::new();
    let state = compile_datapath(cluster, &engine, &all, &mut alloc, SetTable::new());
    let again = compile_datapath(cluster, &engine, &all, &mut alloc, state.sets.clone());
    assert!(again == state, "recompiling the same manifests changed the datapath state");

    let on_node = |p: &PodInfo| p.node.as_deref() == Some("node-1");
    let one = compile_datapath(
        cluster,
        &engine,
        &NodeView { is_local: &on_node, mode_of: &mode_of },
        &mut IdentityAllocator::new(),
        SetTable::new(),
    );
    for e in one.endpoints.values() {
        let local = cluster.pod(&e.pod.0, &e.pod.1).is_some_and(on_node);
        assert!(local, "endpoint {:?} compiled for a node it is not on", e.pod);
    }

    // Addresses claimed by two pods are a broken cluster: no datapath can tell them apart.
    let mut seen = BTreeSet::new();
    let mut shared = BTreeSet::new();
    for ip in cluster.pods().iter().flat_map(|p| p.ips.iter()) {
        if !seen.insert(*ip) {
            shared.insert(*ip);
        }
    }
    let mut parties: Vec<Endpoint> = Vec::new();
    for p in cluster.pods() {
        if p.ips.iter().any(|ip| shared.contains(ip)) {
            continue;
        }
        parties.push(Endpoint::Pod(p, None));
    }
    for ip in externals {
        if shared.contains(ip) {
            continue;
        }
        parties.push(match cluster.pod_by_ip(*ip) {
            Some(p) => Endpoint::Pod(p, Some(*ip)),
            None => Endpoint::External(*ip),
        });
    }
    for src in &parties {
        for dst in &parties {
            if matches!((src, dst), (Endpoint::External(_), Endpoint::External(_))) {
                continue;
            }
            for &(proto, port) in probes {
                let d = engine.evaluate(cluster, src, dst, proto, port);
                decision_is_consistent(&d, src, dst);
                datapath_agrees(&state, src, dst, proto, port, &d);
            }
        }
    }
}
