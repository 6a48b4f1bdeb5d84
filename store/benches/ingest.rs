//! The store, measured on both backends with the same rows:
//! - ingest rows/s through `Store::insert` (the flows table, its ordering and its two
//!   rollup views) against a raw insert of the same rows, same client, into a bare
//!   MergeTree table with the same columns (the baseline);
//! - audit latency over N stored flows spread evenly over the last day (10 million
//!   embedded; the server's N from FLOWS_BENCH_SERVER_ROWS, default 100 million): every
//!   row distinct, the rows past the ingest sample made by the engine
//!   (`flows_store::synthetic`, the same flows a client would insert);
//! - insert latency while audits of the whole day run back to back, against the same
//!   inserts with nothing else running (the baseline);
//! - bytes on disk per flow after compression.
//! Run: `cargo build --release --bins && cargo bench -p flows-store --bench ingest`.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use flows_store::{AuditQuery, FlowRow, Retention, Store, StoreConfig, synthetic};

const BATCH: usize = 50_000;
/// The time the stored flows span, ending now.
const SPAN: i64 = 86_400_000_000_000;
/// The relay's batches while it keeps up with a busy cluster are about this size.
const LIVE_BATCH: usize = 5_000;

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// Where flow `i` of `rows` falls: evenly over the last day.
struct Spread {
    start: i64,
    step: i64,
}

impl Spread {
    fn new(rows: u64) -> Spread {
        Spread { start: now_ns() - SPAN, step: SPAN / rows.max(1) as i64 }
    }

    fn batch(&self, from: u64, n: usize) -> Vec<FlowRow> {
        (from..from + n as u64).map(|i| synthetic::row(i, self.start + i as i64 * self.step)).collect()
    }
}

fn rows_per_s(n: u64, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

/// Ingest: the first `sample` rows each way, alternating batches so both see the same
/// conditions; the bare table is dropped after.
async fn ingest(store: &Store, what: &str, spread: &Spread, sample: u64) {
    store
        .execute(&format!(
            "CREATE TABLE IF NOT EXISTS {db}.bare AS {db}.flows ENGINE = MergeTree ORDER BY tuple()",
            db = store.database()
        ))
        .await
        .expect("bare table");
    let (mut t_bare, mut t_store) = (Duration::ZERO, Duration::ZERO);
    let mut i = 0;
    while i < sample {
        let b = spread.batch(i, BATCH);
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
}

/// Median, min and max of five audits, in milliseconds.
async fn audit_times(store: &Store, q: &AuditQuery) -> (usize, [f64; 3]) {
    let mut times = Vec::new();
    let mut groups = 0;
    for _ in 0..5 {
        let t = Instant::now();
        groups = store.audit(q).await.expect("audit").len();
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    (groups, [times[2], times[0], times[4]])
}

fn whole_day() -> AuditQuery {
    AuditQuery { since: Some(now_ns() - SPAN - 3_600_000_000_000), top: 20, ..Default::default() }
}

async fn audits(store: &Store, what: &str, rows: u64) {
    let hour = AuditQuery { since: Some(now_ns() - 3_600_000_000_000), top: 20, ..Default::default() };
    for (name, q) in [("last hour", hour), ("whole day", whole_day())] {
        let (groups, [median, min, max]) = audit_times(store, &q).await;
        println!(
            "{what}: audit ({name}, top {groups} workload-pair groups) over {rows} flows: median {median:.0} ms (min {min:.0}, max {max:.0})"
        );
    }
}

/// Latencies of `n` inserts of [`LIVE_BATCH`] new rows from `from`, sorted, in ms.
async fn live_inserts(store: &Store, spread: &Spread, from: u64, n: usize) -> Vec<f64> {
    let mut times = Vec::with_capacity(n);
    for k in 0..n {
        let rows = spread.batch(from + (k * LIVE_BATCH) as u64, LIVE_BATCH);
        let t = Instant::now();
        store.insert(&rows).await.expect("live insert");
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    times
}

fn quantiles(t: &[f64]) -> String {
    let at = |q: f64| t[((t.len() - 1) as f64 * q).round() as usize];
    format!("p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms", at(0.5), at(0.99), at(1.0))
}

/// Ingest while audits of the whole day run back to back, against the same inserts alone.
async fn ingest_during_audits(store: Arc<Store>, what: &str, spread: &Spread, rows: u64) {
    let n = 40;
    let alone = live_inserts(&store, spread, rows, n).await;
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let auditor = {
        let (store, stop, done) = (store.clone(), stop.clone(), done.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                store.audit(&whole_day()).await.expect("audit");
                done.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let during = live_inserts(&store, spread, rows + (n * LIVE_BATCH) as u64, n).await;
    stop.store(true, Ordering::Relaxed);
    let audits_during = done.load(Ordering::Relaxed);
    auditor.await.expect("auditor");
    let p99 = |t: &[f64]| t[((t.len() - 1) as f64 * 0.99).round() as usize];
    println!(
        "{what}: {n} inserts of {LIVE_BATCH} rows with nothing else running (baseline): {}; \
         while whole-day audits ran back to back ({audits_during} finished meanwhile): {} = {:.2}x the baseline's p99",
        quantiles(&alone),
        quantiles(&during),
        p99(&during) / p99(&alone)
    );
}

async fn measure(store: Store, what: &str, rows: u64) {
    let spread = Spread::new(rows);
    let sample = 1_000_000u64.min(rows);
    ingest(&store, what, &spread, sample).await;
    let t = Instant::now();
    synthetic::fill(&store, sample, rows, spread.start, spread.step, |_| ()).await.expect("fill");
    if rows > sample {
        println!("{what}: {} more distinct rows made by the engine in {:.0} s", rows - sample, t.elapsed().as_secs_f64());
    }
    audits(&store, what, rows).await;
    let store = Arc::new(store);
    ingest_during_audits(store.clone(), what, &spread, rows).await;
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
        measure(store, "embedded (chDB)", 10_000_000).await;
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
        measure(store, "server (ClickHouse 26.7 over HTTP)", server_rows).await;
    });
    let _ = server.kill();
    let _ = server.wait();
    let _ = std::fs::remove_dir_all(&base);
}
