//! The dashboard under load, in process (the terminal replaced by ratatui's TestBackend
//! at 200x50, so drawing is measured without a terminal emulator's own cost):
//! - frame time (p50, p99) and CPU share while 10,000 flows/s arrive, 10 frames a
//!   second for 30 s, against the same dashboard idle (no flows) in the same run;
//! - resident memory after one hour of flows at 10,000/s (36 million, replayed as fast
//!   as they fold in), against the resident memory after the first minute. One flow in
//!   ten comes from a world address never seen before (a scan from the internet), so the
//!   number of keys offered to the aggregates grows without end, far past what they keep
//!   ([`MAX_KEYS`] per map): the figure is the footprint with their pruning at work.
//!
//! `cargo bench -p flows-tui --bench dashboard` (FLOWS_BENCH_TUI_HOURS scales the soak).

use std::time::{Duration, Instant};

use flows_proto::{Endpoint, Flow, Ip, Layer4, Tcp, Timestamp, Verdict, Workload, layer4};
use flows_tui::{
    state::{App, aggregate::MAX_KEYS},
    view,
};
use ratatui::{Terminal, backend::TestBackend};

fn flow(i: u64) -> Flow {
    let pod = |ns: String, name: String| Endpoint {
        namespace: ns,
        pod_name: name.clone(),
        labels: vec![format!("app={name}")],
        workloads: vec![Workload { name: name.clone(), kind: "Deployment".into() }],
        node_name: format!("node-{}", i % 4),
        ..Default::default()
    };
    if i % 10 == 5 {
        return scan(i);
    }
    let denied = i % 20 == 0;
    Flow {
        time: Some(Timestamp { seconds: 1_700_000_000 + (i / 10_000) as i64, nanos: ((i % 10_000) * 100_000) as i32 }),
        uuid: format!("u{i}"),
        node_name: format!("node-{}", i % 4),
        verdict: if denied { Verdict::Dropped } else { Verdict::Forwarded } as i32,
        drop_reason: if denied { "POLICY_DENIED".into() } else { String::new() },
        ip: Some(Ip { source: format!("10.244.{}.{}", i % 200, i % 250), destination: format!("10.244.{}.{}", (i / 7) % 200, 3), ..Default::default() }),
        l4: Some(Layer4 {
            protocol: Some(layer4::Protocol::Tcp(Tcp { source_port: (30_000 + i % 30_000) as u32, destination_port: [80, 443, 5432, 8080][(i % 4) as usize], flags: None })),
        }),
        source: Some(pod(format!("ns-{}", i % 12), format!("svc-{}", i % 300))),
        destination: Some(pod(format!("ns-{}", (i / 3) % 12), format!("svc-{}", (i / 7) % 300))),
        ..Default::default()
    }
}

/// A denied attempt from a world address no earlier flow came from.
fn scan(i: u64) -> Flow {
    let from = std::net::Ipv4Addr::from(0x2d00_0000u32.wrapping_add(i as u32));
    Flow {
        time: Some(Timestamp { seconds: 1_700_000_000 + (i / 10_000) as i64, nanos: ((i % 10_000) * 100_000) as i32 }),
        uuid: format!("u{i}"),
        node_name: format!("node-{}", i % 4),
        verdict: Verdict::Dropped as i32,
        drop_reason: "POLICY_DENIED".into(),
        ip: Some(Ip { source: from.to_string(), destination: format!("10.244.{}.{}", (i / 7) % 200, 3), ..Default::default() }),
        l4: Some(Layer4 { protocol: Some(layer4::Protocol::Tcp(Tcp { source_port: 40_000, destination_port: 22, flags: None })) }),
        source: Some(Endpoint { is_world: true, labels: vec!["reserved:world".into()], ..Default::default() }),
        destination: Some(Endpoint { namespace: format!("ns-{}", i % 12), pod_name: format!("svc-{}", i % 300), ..Default::default() }),
        ..Default::default()
    }
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()))
        .unwrap_or(0)
}

fn cpu() -> Duration {
    // SAFETY: getrusage fills the struct for this process.
    let mut ru: libc_rusage::Rusage = unsafe { std::mem::zeroed() };
    unsafe { libc_rusage::getrusage(0, &mut ru) };
    Duration::from_micros((ru.utime_s * 1_000_000 + ru.utime_us + ru.stime_s * 1_000_000 + ru.stime_us) as u64)
}

/// The two fields of `struct rusage` we need, without a libc dependency.
mod libc_rusage {
    #[repr(C)]
    pub struct Rusage {
        pub utime_s: i64,
        pub utime_us: i64,
        pub stime_s: i64,
        pub stime_us: i64,
        _rest: [i64; 14],
    }
    unsafe extern "C" {
        pub fn getrusage(who: i32, usage: *mut Rusage) -> i32;
    }
}

/// Runs `seconds` of 10 frames a second with `rate` flows a second arriving; returns
/// (frame times, CPU share of one core).
fn run(rate: u64, seconds: u64) -> (Vec<Duration>, f64) {
    let mut app = App::new("bench");
    let mut term = Terminal::new(TestBackend::new(200, 50)).expect("terminal");
    let per_frame = rate / 10;
    let mut frames = Vec::new();
    let start = Instant::now();
    let cpu0 = cpu();
    let mut n = 0u64;
    for frame in 0..seconds * 10 {
        let due = start + Duration::from_millis(frame * 100);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let now_ms = 1_700_000_000_000 + frame * 100;
        for _ in 0..per_frame {
            app.ingest_flow(flow(n), now_ms);
            n += 1;
        }
        let t = Instant::now();
        term.draw(|f| view::draw(f, &app, now_ms)).expect("draw");
        frames.push(t.elapsed());
    }
    let wall = start.elapsed();
    let share = (cpu() - cpu0).as_secs_f64() / wall.as_secs_f64();
    frames.sort();
    (frames, share)
}

fn pct(v: &[Duration], p: f64) -> Duration {
    v[((v.len() as f64 - 1.0) * p) as usize]
}

fn main() {
    let (idle, idle_cpu) = run(0, 10);
    let (busy, busy_cpu) = run(10_000, 30);
    println!("frames at 200x50, 10 a second:");
    println!("  idle:            p50 {:>8.2?}  p99 {:>8.2?}  CPU {:.1}% of a core", pct(&idle, 0.5), pct(&idle, 0.99), idle_cpu * 100.0);
    println!("  10,000 flows/s:  p50 {:>8.2?}  p99 {:>8.2?}  CPU {:.1}% of a core", pct(&busy, 0.5), pct(&busy, 0.99), busy_cpu * 100.0);
    println!(
        "  ratio: frame p50 {:.2}x, CPU {:.2}x",
        pct(&busy, 0.5).as_secs_f64() / pct(&idle, 0.5).as_secs_f64().max(1e-9),
        busy_cpu / idle_cpu.max(1e-9)
    );

    let hours: f64 = std::env::var("FLOWS_BENCH_TUI_HOURS").ok().and_then(|h| h.parse().ok()).unwrap_or(1.0);
    let total = (hours * 3600.0 * 10_000.0) as u64;
    let mut app = App::new("soak");
    let before = rss_kib();
    let t = Instant::now();
    let mut after_first_minute = 0;
    for i in 0..total {
        // Arrival times advance at 10,000 a second.
        app.ingest_flow(flow(i), 1_700_000_000_000 + i / 10);
        if i == 600_000 {
            after_first_minute = rss_kib();
        }
    }
    let after = rss_kib();
    // Each scan brings a key to two maps (talkers, denied pairs): the keys offered.
    let offered = 2 * total / 10;
    assert!(offered > 3 * MAX_KEYS as u64, "the soak must offer more keys than the aggregates keep");
    assert!(app.aggregates.len() <= 3 * (MAX_KEYS + 1), "the aggregates keep at most {MAX_KEYS} keys per map");
    println!(
        "\n{total} flows ({hours} h at 10,000/s) folded in {:.1} s: RSS {} MiB before, {} MiB after the first minute, {} MiB after all ({:.2}x the first minute); \
         aggregate entries kept {} of more than {offered} keys offered",
        t.elapsed().as_secs_f64(),
        before / 1024,
        after_first_minute / 1024,
        after / 1024,
        after as f64 / after_first_minute.max(1) as f64,
        app.aggregates.len()
    );
}
