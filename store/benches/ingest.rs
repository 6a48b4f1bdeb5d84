//! The store, measured on both backends with the same rows:
//! - ingest rows/s through `Store::insert` (the flows table, its ordering and its two
//!   rollup views) against a raw insert of the same rows, same client, into a bare
//!   MergeTree table with the same columns (the baseline);
//! - audit query latency over N stored flows (10 million embedded; the server's N from
//!   FLOWS_BENCH_SERVER_ROWS, default 100 million; rows past 10 million are copies the
//!   engine makes of the stored ones, with new uuids);
//! - bytes on disk per flow after compression.
//! Run: `cargo build --release --bins && cargo bench -p flows-store --bench ingest`.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant, SystemTime},
};

use flows_store::{AuditQuery, FlowRow, Retention, Store, StoreConfig};

const BATCH: usize = 50_000;

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// A batch of realistic rows: 20 namespaces, 400 workloads, 10% denied, within the last
/// 50 minutes.
fn batch(start: u64, n: usize, t0: i64) -> Vec<FlowRow> {
    (start..start + n as u64)
        .map(|i| {
            let src = (i * 7919) % 400;
            let dst = (i * 104_729 + 13) % 400;
            let denied = i % 10 == 0;
            FlowRow {
                time: t0 + (i % 3_000_000_000) as i64 * 1_000,
                node: format!("node-{}", i % 8),
                uuid: format!("{i:016x}-4a1b-9c2d-{:012x}", i * 31),
                verdict: if denied { 2 } else { 1 },
                drop_reason: if denied { "POLICY_DENIED".into() } else { String::new() },
                event_type: if denied { 3 } else { 1 },
                point: 1 + (i % 2) as i8,
                direction: 1 + (i % 2) as i8,
                is_reply: i % 4 == 3,
                ip_version: 4,
                protocol: if i % 5 == 0 { "UDP" } else { "TCP" }.into(),
                src_ip: std::net::Ipv4Addr::new(10, 244, (src / 250) as u8, (src % 250) as u8 + 2).to_ipv6_mapped(),
                dst_ip: std::net::Ipv4Addr::new(10, 244, (dst / 250) as u8, (dst % 250) as u8 + 2).to_ipv6_mapped(),
                src_port: 32_768 + (i % 28_000) as u16,
                dst_port: [80, 443, 5432, 6379, 8080, 53, 9090, 3306][(dst % 8) as usize],
                tcp_flags: 2,
                src_namespace: format!("ns-{}", src % 20),
                src_pod: format!("app-{src}-7d9f8-{:05}", i % 3),
                src_workload: format!("app-{src}"),
                src_workload_kind: "Deployment".into(),
                src_workloads: vec![format!("ReplicaSet/app-{src}-7d9f8"), format!("Deployment/app-{src}")],
                src_labels: vec![format!("app=app-{src}"), format!("tier=t{}", src % 3)],
                src_node: format!("node-{}", src % 8),
                src_world: false,
                src_identity: src as u32,
                dst_namespace: format!("ns-{}", dst % 20),
                dst_pod: format!("app-{dst}-7d9f8-{:05}", i % 2),
                dst_workload: format!("app-{dst}"),
                dst_workload_kind: "Deployment".into(),
                dst_workloads: vec![format!("ReplicaSet/app-{dst}-7d9f8"), format!("Deployment/app-{dst}")],
                dst_labels: vec![format!("app=app-{dst}"), format!("tier=t{}", dst % 3)],
                dst_node: format!("node-{}", dst % 8),
                dst_world: false,
                dst_identity: dst as u32,
                src_service: String::new(),
                dst_service: String::new(),
                ingress_allowed_by: Vec::new(),
                egress_allowed_by: Vec::new(),
                ingress_denied_by: if denied { vec![format!("NetworkPolicy:ns-{}/default-deny", dst % 20)] } else { Vec::new() },
                egress_denied_by: Vec::new(),
                packet_length: 60,
                l4_unknown: String::new(),
            }
        })
        .collect()
}

fn rows_per_s(n: u64, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

async fn measure(store: &Store, what: &str, rows: u64) {
    let t0 = now_ns() - 3_000_000_000_000;
    store
        .execute(&format!(
            "CREATE TABLE IF NOT EXISTS {db}.bare AS {db}.flows ENGINE = MergeTree ORDER BY tuple()",
            db = store.database()
        ))
        .await
        .expect("bare table");
    // Ingest: 1 M rows each way, alternating batches so both see the same conditions.
    let sample = 1_000_000u64;
    let (mut t_bare, mut t_store) = (Duration::ZERO, Duration::ZERO);
    let mut i = 0;
    while i < sample {
        let b = batch(i, BATCH, t0);
        let t = Instant::now();
        store.insert_into("bare", &b).await.expect("bare insert");
        t_bare += t.elapsed();
        let t = Instant::now();
        store.insert(&b).await.expect("store insert");
        t_store += t.elapsed();
        i += BATCH as u64;
    }
    println!(
        "{what}: ingest of {sample} rows in batches of {BATCH}: raw insert into a bare table (baseline) {:.0} rows/s; \
         Store::insert (ordered table + 2 rollup views) {:.0} rows/s = {:.2}x the baseline's time",
        rows_per_s(sample, t_bare),
        rows_per_s(sample, t_store),
        t_store.as_secs_f64() / t_bare.as_secs_f64()
    );
    store.execute(&format!("DROP TABLE {}.bare", store.database())).await.expect("drop bare");
    // Fill up to `rows` for the audit: generated rows up to 10 M, then copies of the
    // stored rows made by the engine itself (new uuids), which is what makes 100 M
    // reachable on two cores.
    let t = Instant::now();
    let generated = rows.min(10_000_000);
    while i < generated {
        let n = BATCH.min((generated - i) as usize);
        store.insert(&batch(i, n, t0)).await.expect("fill");
        i += n as u64;
    }
    let db = store.database().to_string();
    loop {
        let r = store.select_json(&format!("SELECT count() AS n FROM {db}.flows")).await.expect("count");
        let v = &r[0]["n"];
        let have = v.as_u64().or_else(|| v.as_str().and_then(|x| x.parse().ok())).expect("a count");
        if have >= rows {
            break;
        }
        store
            .execute(&format!(
                "INSERT INTO {db}.flows SELECT * REPLACE (concat(uuid, '-c{have}') AS uuid) FROM {db}.flows LIMIT {}",
                (rows - have).min(have)
            ))
            .await
            .expect("copy");
    }
    if rows > sample {
        println!("{what}: filled to {rows} rows in {:.0} s", t.elapsed().as_secs_f64());
    }
    let q = AuditQuery {
        since: Some(now_ns() - 3_600_000_000_000),
        top: 20,
        ..Default::default()
    };
    let mut times = Vec::new();
    let mut groups = 0;
    for _ in 0..5 {
        let t = Instant::now();
        groups = store.audit(&q).await.expect("audit").len();
        times.push(t.elapsed());
    }
    times.sort();
    let scan = Instant::now();
    let _ = store
        .select_json(&format!("SELECT count() FROM {}.flows WHERE verdict = 'DROPPED'", store.database()))
        .await
        .expect("count");
    let scan = scan.elapsed();
    println!(
        "{what}: audit (last hour, top {groups} of the workload-pair groups) over {rows} flows: median {:.0} ms \
         (min {:.0}, max {:.0}); a count of the denied flows alone {:.0} ms",
        times[2].as_secs_f64() * 1e3,
        times[0].as_secs_f64() * 1e3,
        times[4].as_secs_f64() * 1e3,
        scan.as_secs_f64() * 1e3
    );
    store.optimize().await.expect("optimize");
    let u = store.disk_usage().await.expect("usage");
    println!(
        "{what}: on disk {:.1} bytes per flow ({} rows, {:.0} MiB; {:.1}x compression)",
        u.bytes_on_disk as f64 / u.rows.max(1) as f64,
        u.rows,
        u.bytes_on_disk as f64 / 1048576.0,
        u.bytes_uncompressed as f64 / u.bytes_on_disk.max(1) as f64
    );
}

fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("exe");
    exe.parent().and_then(Path::parent).expect("target dir").join(name)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn relay_rss(extra: &[String]) -> u64 {
    let mut c: Child = Command::new(bin("flows-relay"))
        .args(["--peer", "node-1=127.0.0.1:9", "--listen", "127.0.0.1:0"])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("relay");
    std::thread::sleep(Duration::from_secs(5));
    let r = rss_kib(c.id());
    let _ = c.kill();
    let _ = c.wait();
    r
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let base = std::env::temp_dir().join(format!("flows-bench-store-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);

    if bin("flows-relay").exists() {
        let without = relay_rss(&[]);
        let with = relay_rss(&["--store".into(), format!("embedded:{}", base.join("relay").display())]);
        println!(
            "relay resident memory: {} MiB without a store (baseline), {} MiB with the embedded store open = {:.1}x",
            without / 1024,
            with / 1024,
            with as f64 / without.max(1) as f64
        );
    }

    rt.block_on(async {
        let config = StoreConfig::Embedded { path: base.join("embedded"), library: flows_store::chdb::default_library() };
        let store = Store::open(&config, "flows", Retention::default()).await.expect("embedded");
        measure(&store, "embedded (chDB)", 10_000_000).await;
    });

    let server_rows: u64 = std::env::var("FLOWS_BENCH_SERVER_ROWS").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000_000);
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("port");
    let mut server = Command::new(bin("flows-clickhouse-server"))
        .args(["--path", &base.join("server").display().to_string(), "--http-port", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("server (cargo build --release --bins first)");
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        std::thread::sleep(Duration::from_millis(100));
    }
    rt.block_on(async {
        let config = StoreConfig::Server { url: format!("http://127.0.0.1:{port}"), user: None, password: None };
        let store = Store::open(&config, "flows", Retention::default()).await.expect("server");
        measure(&store, "server (ClickHouse 26.7 over HTTP)", server_rows).await;
    });
    let _ = server.kill();
    let _ = server.wait();
    let _ = std::fs::remove_dir_all(&base);
}
