//! Policy compile and evaluation costs on a synthetic cluster of 10,000 pods and 1,000
//! policies (100 namespaces), for one node of 100. Ratios are against baselines measured
//! in the same run. Run: `cargo bench -p flows-policy --bench compile`.

use std::{
    hint::black_box,
    time::{Duration, Instant},
};

use flows_policy::{
    Endpoint, Engine, PodInfo, Protocol,
    compile::{IdentityAllocator, Mode, NodeView, SetTable, compile_datapath},
    synthetic,
};

fn time<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let t = Instant::now();
    let r = f();
    (r, t.elapsed())
}

fn main() {
    let (namespaces, pods_per_ns, policies_per_ns, nodes) = (100, 100, 10, 100);
    let ((mut cluster, policies), generated) =
        time(|| synthetic::cluster(namespaces, pods_per_ns, policies_per_ns, nodes));
    let is_local = |p: &PodInfo| p.node.as_deref() == Some("node-0");
    let mode_of = |_: &str| Mode::Enforce;
    let view = NodeView {
        is_local: &is_local,
        mode_of: &mode_of,
    };

    // Baseline: indexing the compiled policies by namespace.
    let (engine, index) = time(|| Engine::new(policies.clone()));
    let mut alloc = IdentityAllocator::new();
    let (state, full) = time(|| compile_datapath(&cluster, &engine, &view, &mut alloc, SetTable::new()));
    println!(
        "cluster: {} pods, {} policies, {} nodes (generated in {:.0} ms)",
        cluster.pods().len(),
        policies.len(),
        nodes,
        generated.as_secs_f64() * 1e3
    );
    println!(
        "compiled state for one node: {} ipcache entries, {} endpoints, {} policy entries, {} policy sets",
        state.ipcache.len(),
        state.endpoints.len(),
        state.policy.len(),
        state.sets.len()
    );
    println!(
        "full compile: {:.1} ms ({:.0}x the policy indexing baseline of {:.3} ms)",
        full.as_secs_f64() * 1e3,
        full.as_secs_f64() / index.as_secs_f64(),
        index.as_secs_f64() * 1e3
    );

    // One pod added on this node: recompile, then diff against the state in force.
    cluster.add_pod(PodInfo {
        namespace: "ns-7".into(),
        name: "new-pod".into(),
        node: Some("node-0".into()),
        labels: [("app".to_string(), "app-3".to_string())].into(),
        ips: vec![synthetic::pod_ip(50_000)],
        ports: vec![],
    });
    let sets = state.sets.clone();
    let ((next, changed), incr) = time(|| {
        let next = compile_datapath(&cluster, &engine, &view, &mut alloc, sets);
        let changed = next.policy.iter().filter(|(k, v)| state.policy.get(k) != Some(v)).count()
            + next.ipcache.iter().filter(|(k, v)| state.ipcache.get(k) != Some(v)).count()
            + next.endpoints.iter().filter(|(k, v)| state.endpoints.get(k) != Some(v)).count();
        (next, changed)
    });
    println!(
        "one pod added: recompile + diff {:.1} ms ({:.2}x the full compile), {} entries to write of {}",
        incr.as_secs_f64() * 1e3,
        incr.as_secs_f64() / full.as_secs_f64(),
        changed,
        next.policy.len() + next.ipcache.len() + next.endpoints.len()
    );

    // Evaluator throughput, against a baseline of looking both pods up by address.
    let pods = cluster.pods();
    let n = 1_000_000usize;
    // Half the pairs within one namespace (where most rules apply), half across.
    let pick = |i: usize| &pods[(i * 7919) % pods.len()];
    let peer = |i: usize| {
        let a = (i * 7919) % pods.len();
        if i % 2 == 0 {
            &pods[((a / 100) * 100 + (i * 31) % 100) % pods.len()]
        } else {
            pick(i + 1)
        }
    };
    let (_, base) = time(|| {
        for i in 0..n {
            let a = pick(i);
            let b = peer(i);
            black_box((cluster.pod_by_ip(a.ips[0]), cluster.pod_by_ip(b.ips[0])));
        }
    });
    let (allowed, eval) = time(|| {
        let mut allowed = 0usize;
        for i in 0..n {
            let a = pick(i);
            let b = peer(i);
            let port = b.ports.first().map(|p| p.port).unwrap_or(8080);
            let d = engine.evaluate(
                &cluster,
                &Endpoint::Pod(a, None),
                &Endpoint::Pod(b, None),
                Protocol::Tcp,
                port,
            );
            allowed += usize::from(black_box(d).allowed);
        }
        allowed
    });
    println!(
        "evaluator: {:.0} attempts/s on one core ({:.1}x the time of the address-lookup baseline; {} of {} allowed)",
        n as f64 / eval.as_secs_f64(),
        eval.as_secs_f64() / base.as_secs_f64(),
        allowed,
        n
    );
}
