//! Events lost in a 10-second burst of new connections in the lab, at the highest rate
//! the traffic driver makes here. Every event must be either delivered or counted as
//! lost; the figure to watch is how many were lost (ideally none).
//! Needs root. Run: `cargo bench -p flows-node-probe --bench burst`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Instant;

use common::{Probe, server_status, settle};
use flows_lab::{
    drive::{self, DriveOptions, Scenario},
    testing::{LabGuard, skip_unless_root},
};
use flows_proto::LostEventSource;

const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: { name: load }
---
apiVersion: v1
kind: Pod
metadata: { name: client, namespace: load }
spec: { nodeName: node-1, containers: [ { name: c, image: x } ] }
---
apiVersion: v1
kind: Pod
metadata: { name: server, namespace: load }
spec:
  nodeName: node-2
  containers: [ { name: s, image: x, ports: [ { containerPort: 80 } ] } ]
"#;

fn scenario(count: u64) -> Scenario {
    let text = format!(
        "connections:\n  - {{ name: burst, from: load/client, to: {{ pod: load/server }}, protocol: TCP, port: 80, count: {count}, timeout_ms: 2000 }}\n"
    );
    Scenario::parse("burst", &text).expect("scenario")
}

fn main() {
    if skip_unless_root("burst bench") {
        return;
    }
    let lab = LabGuard::from_yaml(CLUSTER, 2).expect("lab up");
    let probes: Vec<Probe> = ["node-1", "node-2"]
        .iter()
        .map(|n| Probe::start(&lab.state, n, &lab.dir))
        .collect();
    let opts = DriveOptions { concurrency: 32 };

    // Calibrate: how many attempts fit in a second here.
    let t = Instant::now();
    let trial = drive::run(&lab.state, &scenario(2000), &opts).expect("drive");
    let rate = trial.attempts.len() as f64 / t.elapsed().as_secs_f64();
    // The trial's last events may still be on their way: count from the point where a
    // marker sent after them has arrived everywhere.
    let seen_now = || -> u64 { probes.iter().map(|p| server_status(&p.addr).seen_flows).sum() };
    // Losses are counted since each probe started: the trial's are not the burst's.
    let lost_now = || -> (u64, u64) {
        probes.iter().fold((0, 0), |(lost, full), p| {
            let s = server_status(&p.addr);
            let ring = s
                .lost
                .iter()
                .filter(|l| l.source == LostEventSource::KernelRingBuffer as i32)
                .map(|l| l.count)
                .sum::<u64>();
            (lost + ring, full + s.datapath_counters.get("ringbuf_full").copied().unwrap_or(0))
        })
    };
    settle(&lab.state, &probes);
    let before = seen_now();
    let (lost_before, full_before) = lost_now();

    let count = (rate * 10.0).max(1000.0) as u64;
    let t = Instant::now();
    let report = drive::run(&lab.state, &scenario(count), &opts).expect("drive");
    let secs = t.elapsed().as_secs_f64();
    settle(&lab.state, &probes);
    let after = seen_now();
    let (lost_after, full_after) = lost_now();
    // What one settle's markers add, measured by a second one, is not the burst's.
    settle(&lab.state, &probes);
    let markers = seen_now() - after;
    let (lost, ringbuf_full) = (lost_after - lost_before, full_after - full_before);
    let seen = after - before - markers;
    // Cross-node TCP: attempt + first reply on each of the two nodes.
    let answered = report.succeeded as u64;
    let unanswered = report.failed as u64;
    let expected = 4 * answered + 2 * unanswered;
    println!("burst of new TCP connections across nodes, driver concurrency {}", opts.concurrency);
    println!(
        "  attempts: {} in {:.1} s = {:.0}/s ({} answered, {} failed)",
        report.attempts.len(),
        secs,
        report.attempts.len() as f64 / secs,
        answered,
        unanswered
    );
    println!("  events expected: {expected}, delivered: {seen} ({:.0}/s)", seen as f64 / secs);
    println!("  events lost (kernel ring buffer full, counted): {lost} (datapath counter {ringbuf_full})");
    println!(
        "  unaccounted: {}",
        expected as i64 - seen as i64 - lost as i64
    );
    drop(probes);
    lab.down().expect("lab down");
}
