//! `flows observe --all` over a large store: the relay binary streams every stored flow
//! to one client while its peak RSS is watched. Figures: rows, time to the first flow,
//! flows/s, and the relay's peak RSS against its RSS with the store open and idle
//! (the baseline, same run). The store is made first by a child process of this bench
//! (the embedded engine allows one process per directory).
//! Run: `FLOWS_BENCH_ROWS=100000000 cargo bench -p flows-relay --bench history_read`
//! (default 10,000,000 rows; the directory is kept in FLOWS_BENCH_DIR when given).

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use flows_proto::{GetFlowsRequest, get_flows_response::ResponseTypes, observer_client::ObserverClient};
use flows_store::{Retention, Store, StoreConfig};

/// Makes `rows` flows over the last six days in the store at `dir`, each distinct
/// (`flows_store::synthetic`: 8 nodes, 20 namespaces, 400 workloads, one in ten denied).
async fn generate(dir: &Path, rows: u64) {
    let config = StoreConfig::Embedded { path: dir.to_path_buf(), library: flows_store::chdb::default_library() };
    let store = Store::open(&config, "flows", Retention::default()).await.expect("open");
    let now = flows_proto::timestamp_nanos(&flows_proto::timestamp_now());
    let span: i64 = 6 * 86_400_000_000_000;
    let step = span / rows.max(1) as i64;
    flows_store::synthetic::fill(&store, 0, rows, now - span, step, |made| eprintln!("generated {made} of {rows}"))
        .await
        .expect("generate");
}

/// Resident and peak resident memory of a process, in MiB (VmRSS, VmHWM).
fn memory(pid: u32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|k| k.parse::<u64>().ok())
            .map(|kb| kb / 1024)
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn relay_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("exe");
    let p = exe.parent().and_then(Path::parent).expect("target dir").join("flows-relay");
    assert!(p.exists(), "{} is missing: cargo build --release --bins", p.display());
    p
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("generate") {
        generate(Path::new(&args[2]), args[3].parse().expect("rows")).await;
        return;
    }
    let rows: u64 = std::env::var("FLOWS_BENCH_ROWS").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000_000);
    let dir = std::env::var("FLOWS_BENCH_DIR").map(PathBuf::from).unwrap_or_else(|_| std::env::temp_dir().join("flows-bench-history"));
    let marker = dir.join(format!("generated-{rows}"));
    if !marker.exists() {
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let t = Instant::now();
        let ok = Command::new(std::env::current_exe().expect("exe"))
            .args(["generate", &dir.display().to_string(), &rows.to_string()])
            .status()
            .expect("generate")
            .success();
        assert!(ok, "generating the store failed");
        std::fs::write(&marker, "").expect("marker");
        eprintln!("{rows} rows made in {:.0} s", t.elapsed().as_secs_f64());
    }
    let ready = dir.join("ready");
    let _ = std::fs::remove_file(&ready);
    let mut relay = Command::new(relay_binary())
        .args(["--peer", "node-0=127.0.0.1:9", "--listen", "127.0.0.1:0", "--store"])
        .arg(format!("embedded:{}", dir.display()))
        .arg("--ready-file")
        .arg(&ready)
        .arg("--store-set-aside-dir")
        .arg(dir.join("set-aside"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("relay");
    let deadline = Instant::now() + Duration::from_secs(120);
    let addr = loop {
        if let Ok(a) = std::fs::read_to_string(&ready)
            && !a.is_empty()
        {
            break a;
        }
        assert!(Instant::now() < deadline, "the relay did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut c = ObserverClient::connect(format!("http://{addr}")).await.expect("connect");
    // Idle with the store open: the baseline.
    let _ = c.server_status(flows_proto::ServerStatusRequest {}).await.expect("status");
    let (idle, _) = memory(relay.id());
    let t = Instant::now();
    let mut s = c
        .get_flows(GetFlowsRequest { number: 0, ..Default::default() })
        .await
        .expect("GetFlows --all")
        .into_inner();
    let (mut flows, mut first, mut errors) = (0u64, None, Vec::new());
    let mut peak_seen = 0;
    while let Some(m) = s.message().await.expect("stream") {
        match m.response_types {
            Some(ResponseTypes::Flow(_)) => {
                flows += 1;
                if first.is_none() {
                    first = Some(t.elapsed());
                    eprintln!("first flow after {:.2} s; relay RSS idle {idle} MiB", t.elapsed().as_secs_f64());
                }
                if flows % 1_000_000 == 0 {
                    let (rss, _) = memory(relay.id());
                    peak_seen = peak_seen.max(rss);
                    eprintln!("{flows} flows, {:.0} s, relay RSS {rss} MiB", t.elapsed().as_secs_f64());
                }
            }
            Some(ResponseTypes::NodeStatus(st)) if st.state_change == flows_proto::NodeState::Error as i32 => errors.push(st.message),
            _ => {}
        }
    }
    let total = t.elapsed();
    let (_, peak) = memory(relay.id());
    let _ = relay.kill();
    let _ = relay.wait();
    println!("history_read: {flows} of {rows} stored flows streamed (errors: {errors:?})");
    println!("  time to the first flow: {:.2} s", first.unwrap_or_default().as_secs_f64());
    println!("  all: {:.0} s, {:.0} flows/s", total.as_secs_f64(), flows as f64 / total.as_secs_f64());
    println!("  relay RSS: idle with the store open {idle} MiB (baseline); peak {peak} MiB over the read (highest sampled {peak_seen} MiB); {:.2}x", peak as f64 / idle.max(1) as f64);
}
