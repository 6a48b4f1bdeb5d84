//! The relay's store writer against real engines: a ClickHouse server that goes away for
//! 60 seconds while flows keep arriving, and a relay restart on the embedded store;
//! every flow ends up stored exactly once, and nothing is counted lost.

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use flows_node_probe::{
    metrics::Metrics,
    ring::{Entry, FlowRing},
    server::ObserverService,
    stats::ProbeStats,
};
use flows_proto::{Flow, Ip, IpVersion, ServerStatusRequest, observer_server::ObserverServer};
use flows_relay::{
    peers::{Backoff, PeerSet},
    server::RelayService,
    store_slot::StoreSlot,
    stream::Merger,
    sink::{self, SinkConfig, SinkStats, WhenFull},
};
use flows_store::{Retention, Store, StoreConfig};
use tokio::sync::watch;

async fn node(ring: Arc<FlowRing>) -> std::net::SocketAddr {
    node_named(ring, "node-1").await
}

async fn node_named(ring: Arc<FlowRing>, name: &str) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (keep, shutdown) = watch::channel(false);
    let svc = ObserverService {
        ring,
        stats: Arc::new(ProbeStats::default()),
        node_name: name.into(),
        streams: flows_tls::serving::StreamSlots::new(64),
        started: Instant::now(),
        metrics: Arc::new(Metrics::new()),
        shutdown,
    };
    tokio::spawn(async move {
        let _keep = keep;
        let _ = tonic::transport::Server::builder()
            .add_service(ObserverServer::new(svc))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await;
    });
    addr
}

fn flow(n: u64) -> Entry {
    flow_on("node-1", 0, n)
}

/// A flow recorded now on `node`, whose clock is `behind_ns` behind.
fn flow_on(node: &str, behind_ns: i64, n: u64) -> Entry {
    let now = flows_proto::timestamp_nanos(&flows_proto::timestamp_now());
    Entry::Flow(Flow {
        time: Some(flows_proto::timestamp_from_nanos(now - behind_ns)),
        packet_length: n as u32,
        node_name: node.into(),
        ip: Some(Ip {
            source: "10.244.1.2".into(),
            destination: "10.244.1.3".into(),
            ip_version: IpVersion::Ipv4 as i32,
        }),
        ..Default::default()
    })
}

struct Relay {
    svc: Arc<RelayService>,
    stats: Arc<SinkStats>,
    stop: watch::Sender<bool>,
    sink: tokio::task::JoinHandle<()>,
}

async fn relay(addr: std::net::SocketAddr, store: Arc<Store>) -> Relay {
    relay_with(addr, store, 100_000, WhenFull::Block).await
}

async fn relay_with(addr: std::net::SocketAddr, store: Arc<Store>, buffer_rows: usize, when_full: WhenFull) -> Relay {
    let config = SinkConfig {
        batch_rows: 500,
        flush: Duration::from_millis(200),
        buffer_rows,
        when_full,
        max_backoff: Duration::from_secs(2),
        ..Default::default()
    };
    relay_configured(addr, store, config).await
}

async fn relay_configured(addr: std::net::SocketAddr, store: Arc<Store>, config: SinkConfig) -> Relay {
    let peers = PeerSet::fixed(
        &[format!("node-1={addr}")],
        Backoff { initial: Duration::from_millis(50), max: Duration::from_millis(200) },
    );
    let stats = Arc::new(SinkStats::default());
    let metrics = Arc::new(Metrics::new());
    let merger = Arc::new(Merger {
        peers,
        index: None,
        metrics: metrics.clone(),
        sort_window: Duration::from_millis(100),
        sort_buffer: 10_000,
        store: Some(StoreSlot::ready(store.clone())),
    });
    let svc = Arc::new(RelayService {
        merger: merger.clone(),
        started: Instant::now(),
        streams: flows_tls::serving::StreamSlots::new(64),
        sink: Some(stats.clone()),
        shutdown: None,
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let st = flows_proto::observer_server::Observer::server_status(&*svc, tonic::Request::new(ServerStatusRequest {}))
            .await
            .expect("status")
            .into_inner();
        if st.num_connected_nodes == Some(1) {
            break;
        }
        assert!(Instant::now() < deadline, "the relay did not connect");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (stop, stopped) = watch::channel(false);
    let sink = tokio::spawn(sink::run(merger, store, config, stats.clone(), metrics, stopped));
    Relay { svc, stats, stop, sink }
}

impl Relay {
    async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.sink.await;
        drop(self.svc);
    }
}

async fn stored(store: &Store) -> (u64, u64) {
    let r = store
        .select_json(&format!("SELECT count() AS n, uniqExact(uuid) AS u FROM {}.flows", store.database()))
        .await
        .expect("count");
    let n = |v: &serde_json::Value| v.as_u64().or_else(|| v.as_str().and_then(|s| s.parse().ok())).unwrap_or(0);
    (n(&r[0]["n"]), n(&r[0]["u"]))
}

/// Pushes `n` flows into the ring over `over`, numbered from `from`.
async fn produce(ring: &FlowRing, from: u64, n: u64, over: Duration) {
    let gap = over / n.max(1) as u32;
    for i in from..from + n {
        ring.push(flow(i));
        tokio::time::sleep(gap).await;
    }
}

async fn until_written(store: &Store, total: u64, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let (n, _) = stored(store).await;
        if n >= total {
            break;
        }
        assert!(Instant::now() < deadline, "{what}: {n} of {total} stored");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn sibling_binary(name: &str) -> PathBuf {
    // Test executables live in target/<profile>/deps; binaries one level up.
    let exe = std::env::current_exe().expect("exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let p = dir.join(name);
    assert!(p.exists(), "{} is missing: run `cargo build --bins` first", p.display());
    p
}

struct Server(Child);

impl Server {
    fn start(path: &Path, port: u16) -> Server {
        let child = Command::new(sibling_binary("flows-clickhouse-server"))
            .args(["--path", &path.display().to_string(), "--http-port", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start ClickHouse");
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "ClickHouse did not listen");
            std::thread::sleep(Duration::from_millis(100));
        }
        Server(child)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One process holds one embedded engine at a time: the tests that open one here take
/// turns (the test harness runs tests in parallel).
static EMBEDDED: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn embedded_turn() -> std::sync::MutexGuard<'static, ()> {
    EMBEDDED.lock().unwrap_or_else(|p| p.into_inner())
}

fn temp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("flows-relay-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// One 60 s outage, two relays reading the same node into two databases: one buffers
/// (a bound large enough for the outage: everything is written once it returns), the
/// other has a small bound and drops the newest (whatever does not fit is counted lost,
/// and what is stored plus what is counted is exactly what arrived).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_gone_for_60_seconds_buffers_within_a_bound_or_counts_the_loss() {
    let dir = temp("outage");
    let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("port");
    let server = Server::start(&dir, port);
    let config = StoreConfig::Server { url: format!("http://127.0.0.1:{port}"), user: None, password: None };
    let store = Arc::new(Store::open(&config, "flows", Retention::default()).await.expect("open"));
    let small = Arc::new(Store::open(&config, "flows_small", Retention::default()).await.expect("open"));
    let ring = Arc::new(FlowRing::new(65_536).expect("ring"));
    let addr = node(ring.clone()).await;
    let r = relay(addr, store.clone()).await;
    const BOUND: u64 = 1_000;
    let q = relay_with(addr, small.clone(), BOUND as usize, WhenFull::DropNewest).await;
    // Both writers are reading once the first flow is stored by each.
    produce(&ring, 0, 1, Duration::ZERO).await;
    until_written(&store, 1, "the first flow").await;
    until_written(&small, 1, "the first flow (small buffer)").await;

    produce(&ring, 1, 499, Duration::from_secs(3)).await;
    until_written(&store, 500, "before the outage").await;
    until_written(&small, 500, "before the outage (small buffer)").await;
    // The server goes away for 60 s; flows keep coming.
    drop(server);
    let mut peak = 0;
    let outage = produce(&ring, 500, 6_000, Duration::from_secs(60));
    tokio::pin!(outage);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = &mut outage => break,
            _ = tick.tick() => peak = peak.max(q.stats.buffered.load(Ordering::Relaxed)),
        }
    }
    for x in [&r, &q] {
        assert!(x.stats.failed_batches.load(Ordering::Relaxed) > 0, "writes failed while it was gone");
        assert!(!x.stats.last_error().is_empty(), "and the error is reported");
    }
    // The bound: the buffer, plus the one batch (500 rows) being retried.
    assert!(peak <= BOUND + 500, "the small buffer held {peak} rows, past its bound of {BOUND} + a batch");
    assert!(q.stats.lost.load(Ordering::Relaxed) > 0, "the small buffer overflowed and counted it");
    let _server = Server::start(&dir, port);
    produce(&ring, 6_500, 500, Duration::from_secs(3)).await;
    until_written(&store, 7_000, "after the outage").await;
    // A batch the server committed just before it went away may still be waiting for
    // its retry (rows visible, answer lost): the retry writes nothing and counts it.
    let deadline = Instant::now() + Duration::from_secs(30);
    while r.stats.written.load(Ordering::Relaxed) < 7_000 {
        assert!(Instant::now() < deadline, "written: {}", r.stats.written.load(Ordering::Relaxed));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (n, unique) = stored(&store).await;
    assert_eq!((n, unique), (7_000, 7_000), "every flow once");
    assert_eq!(r.stats.lost.load(Ordering::Relaxed), 0);
    assert_eq!(r.stats.written.load(Ordering::Relaxed), 7_000);
    assert!(r.stats.last_error().is_empty(), "healthy again");

    // The small buffer: every flow stored once or counted lost, none unaccounted.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (n, unique) = stored(&small).await;
        let lost = q.stats.lost.load(Ordering::Relaxed);
        assert_eq!(n, unique, "no flow twice");
        if n + lost == 7_000 && q.stats.written.load(Ordering::Relaxed) == n {
            break;
        }
        assert!(Instant::now() < deadline, "stored {n} + lost {lost} != 7000 arrived");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    r.stop().await;
    q.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_restart_on_the_embedded_store_loses_nothing() {
    let _turn = embedded_turn();
    let dir = temp("restart");
    let config = StoreConfig::Embedded { path: dir.clone(), library: flows_store::chdb::default_library() };
    let ring = Arc::new(FlowRing::new(65_536).expect("ring"));
    let addr = node(ring.clone()).await;
    let store = Arc::new(Store::open(&config, "flows", Retention::default()).await.expect("open"));
    let r = relay(addr, store.clone()).await;
    // The writer is reading once the first flow is stored.
    produce(&ring, 0, 1, Duration::ZERO).await;
    until_written(&store, 1, "the first flow").await;
    produce(&ring, 1, 999, Duration::from_secs(2)).await;
    until_written(&store, 1_000, "first run").await;
    // The relay stops (its store closes); the node keeps recording.
    r.stop().await;
    drop(store);
    produce(&ring, 1_000, 1_000, Duration::from_secs(2)).await;
    // Back: it resumes after the newest stored flow, from what the node still holds.
    let store = Arc::new(Store::open(&config, "flows", Retention::default()).await.expect("reopen"));
    let r = relay(addr, store.clone()).await;
    produce(&ring, 2_000, 500, Duration::from_secs(1)).await;
    until_written(&store, 2_500, "second run").await;
    // One more flow, written after anything still on its way: then nothing is pending.
    produce(&ring, 2_500, 1, Duration::ZERO).await;
    until_written(&store, 2_501, "the last flow").await;
    assert_eq!(stored(&store).await, (2_501, 2_501), "every flow once, none twice");
    assert_eq!(r.stats.lost.load(Ordering::Relaxed), 0);
    r.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}


/// ClickHouse refuses one batch (a constraint an operator added rejects one row in it):
/// that batch goes to disk after a few tries, counted and visible in ServerStatus, and
/// every batch behind it is written. The file loads into ClickHouse as it is once the
/// constraint is gone, and then every flow is stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_batch_is_set_aside_and_the_rest_written() {
    let _turn = embedded_turn();
    let dir = temp("refused");
    let config = StoreConfig::Embedded { path: dir.clone(), library: flows_store::chdb::default_library() };
    let store = Arc::new(Store::open(&config, "flows", Retention::default()).await.expect("open"));
    store.execute("ALTER TABLE flows.flows ADD CONSTRAINT no_poison CHECK packet_length != 666").await.expect("constraint");
    let ring = Arc::new(FlowRing::new(65_536).expect("ring"));
    let addr = node(ring.clone()).await;
    let aside = dir.join("set-aside");
    let sink = SinkConfig {
        batch_rows: 100,
        flush: Duration::from_millis(200),
        max_backoff: Duration::from_millis(400),
        set_aside: Some((aside.clone(), 64 << 20)),
        ..Default::default()
    };
    let r = relay_configured(addr, store.clone(), sink).await;
    produce(&ring, 0, 1, Duration::ZERO).await;
    until_written(&store, 1, "the first flow").await;
    // 600 flows; the 300th is one ClickHouse will not take.
    produce(&ring, 1, 299, Duration::from_millis(600)).await;
    produce(&ring, 666, 1, Duration::ZERO).await;
    produce(&ring, 301, 300, Duration::from_millis(600)).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let (written, kept) = loop {
        let (w, a) = (r.stats.written.load(Ordering::Relaxed), r.stats.set_aside_rows.load(Ordering::Relaxed));
        if w + a == 601 {
            break (w, a);
        }
        assert!(Instant::now() < deadline, "written {w} + set aside {a} != 601");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!((1..=100).contains(&kept), "one batch set aside: {kept} rows");
    assert_eq!(stored(&store).await.0, written, "what is counted written is stored");
    assert_eq!(r.stats.set_aside_batches.load(Ordering::Relaxed), 1);
    assert_eq!(r.stats.lost.load(Ordering::Relaxed), 0);
    let st = flows_proto::observer_server::Observer::server_status(&*r.svc, tonic::Request::new(ServerStatusRequest {}))
        .await
        .expect("status")
        .into_inner()
        .store
        .expect("store status");
    assert_eq!((st.rows_set_aside, st.batches_set_aside), (kept, 1));
    // The file holds exactly those rows, the refused one among them.
    let files: Vec<PathBuf> = std::fs::read_dir(&aside).expect("set-aside dir").flatten().map(|e| e.path()).collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let bytes = std::fs::read(&files[0]).expect("read");
    let mut rest = bytes.as_slice();
    let mut rows = Vec::new();
    while !rest.is_empty() {
        rows.push(flows_store::FlowRow::decode(&mut rest).expect("a row"));
    }
    assert_eq!(rows.len() as u64, kept);
    assert!(rows.iter().any(|x| x.to_flow().packet_length == 666));
    // The operator's way back: drop the constraint, load the file.
    store.execute("ALTER TABLE flows.flows DROP CONSTRAINT no_poison").await.expect("drop constraint");
    store
        .execute(&format!("INSERT INTO flows.flows FROM INFILE '{}' FORMAT RowBinary", files[0].display()))
        .await
        .expect("load the set-aside file");
    assert_eq!(stored(&store).await, (601, 601), "every flow once");
    r.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// The relay binary, as a process (to be killed with SIGKILL).
struct RelayProcess {
    child: Child,
    addr: String,
}

impl RelayProcess {
    fn start(dir: &Path, run: &str, peers: &[String], store: &str) -> RelayProcess {
        let ready = dir.join(format!("ready-{run}"));
        let _ = std::fs::remove_file(&ready);
        let log = std::fs::File::create(dir.join(format!("relay-{run}.log"))).expect("log");
        let mut cmd = Command::new(sibling_binary("flows-relay"));
        cmd.args(["--listen", "127.0.0.1:0", "--store", store, "--store-batch-rows", "200", "--store-flush-ms", "5000"])
            .arg("--ready-file")
            .arg(&ready)
            .arg("--store-set-aside-dir")
            .arg(dir.join("set-aside"));
        for p in peers {
            cmd.args(["--peer", p]);
        }
        let mut child = cmd.stdout(Stdio::null()).stderr(log).spawn().expect("start the relay");
        let deadline = Instant::now() + Duration::from_secs(60);
        let addr = loop {
            if let Ok(a) = std::fs::read_to_string(&ready)
                && !a.is_empty()
            {
                break a;
            }
            assert!(child.try_wait().ok().flatten().is_none(), "the relay exited; see {}", dir.display());
            assert!(Instant::now() < deadline, "the relay did not start");
            std::thread::sleep(Duration::from_millis(50));
        };
        RelayProcess { child, addr }
    }

    async fn status(&self) -> flows_proto::ServerStatusResponse {
        let mut c = flows_proto::observer_client::ObserverClient::connect(format!("http://{}", self.addr)).await.expect("connect");
        c.server_status(ServerStatusRequest {}).await.expect("status").into_inner()
    }

    /// Waits until the relay's status satisfies `ok`.
    async fn until(&self, what: &str, ok: impl Fn(&flows_proto::ServerStatusResponse) -> bool) -> flows_proto::ServerStatusResponse {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let st = self.status().await;
            if ok(&st) {
                return st;
            }
            assert!(Instant::now() < deadline, "{what}: {:?}", st.store);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        // SIGKILL: nothing is flushed.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn store_of(st: &flows_proto::ServerStatusResponse) -> flows_proto::StoreStatus {
    st.store.clone().unwrap_or_default()
}

/// `n` flows on each ring, alternating, over `over`; each ring's node has its own clock.
async fn produce_on(rings: &[(&FlowRing, &str, i64)], n: u64, over: Duration) {
    let gap = over / n.max(1) as u32;
    for i in 0..n {
        for (ring, node, behind) in rings {
            ring.push(flow_on(node, *behind, i));
        }
        tokio::time::sleep(gap).await;
    }
}

/// SIGKILL while rows wait in the relay's buffer, with node-2's clock 5 s behind node-1's
/// and node-2's ring small enough to be overwritten while the relay is gone. After the
/// restart every flow is stored exactly once or counted unrecoverable, per node: node-1
/// (whose ring holds everything) loses nothing, and node-2's stored plus counted flows
/// are exactly what it made. Resuming from one newest time for all nodes (node-1's)
/// skipped node-2's flows stamped before it, uncounted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_killed_resumes_each_node_from_its_own_newest_flow_and_counts_what_is_gone() {
    const SKEW: i64 = 5_000_000_000;
    let dir = temp("sigkill");
    std::fs::create_dir_all(&dir).expect("dir");
    // A server, not the embedded engine: this process opens it afterwards to count, and
    // one process holds one embedded engine (other tests here have theirs).
    let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("port");
    let _server = Server::start(&dir.join("ch"), port);
    let spec = format!("http://127.0.0.1:{port}");
    let (fast, small) = (Arc::new(FlowRing::new(65_536).expect("ring")), Arc::new(FlowRing::new(1_024).expect("ring")));
    let peers = [
        format!("node-1={}", node_named(fast.clone(), "node-1").await),
        format!("node-2={}", node_named(small.clone(), "node-2").await),
    ];
    let both = [(&*fast, "node-1", 0), (&*small, "node-2", SKEW)];
    let relay = RelayProcess::start(&dir, "1", &peers, &spec);
    relay.until("both nodes connected", |s| s.num_connected_nodes == Some(2)).await;
    produce_on(&both, 1_050, Duration::from_secs(2)).await;
    // Batches of 200 rows: 2,000 written, 100 waiting for the 5 s flush.
    let st = relay.until("2,000 written", |s| store_of(s).rows_written == 2_000 && store_of(s).rows_buffered == 100).await;
    assert_eq!(store_of(&st).rows_lost, 0);
    drop(relay);
    // While it is gone: node-1 500 more; node-2 1,500 more, past its ring's 1,024.
    produce_on(&both[..1], 500, Duration::from_millis(500)).await;
    produce_on(&both[1..], 1_500, Duration::from_millis(1500)).await;
    let relay = RelayProcess::start(&dir, "2", &peers, &spec);
    let made = 1_050 * 2 + 500 + 1_500;
    let st = relay
        .until("every flow written or counted", |s| {
            let s = store_of(s);
            s.rows_buffered == 0 && 2_000 + s.rows_written + s.rows_unrecoverable == made
        })
        .await;
    let gone = store_of(&st).rows_unrecoverable;
    assert!(gone > 0, "node-2's ring was overwritten: {st:?}");
    drop(relay);
    let store = Store::open_existing(&StoreConfig::Server { url: spec.clone(), user: None, password: None }, "flows")
        .await
        .expect("open");
    let per_node = store
        .select_json("SELECT toString(node) AS node, count() AS n, uniqExact(uuid) AS u FROM flows.flows GROUP BY node ORDER BY node")
        .await
        .expect("per node");
    let n = |v: &serde_json::Value| v.as_u64().or_else(|| v.as_str().and_then(|s| s.parse().ok())).unwrap_or(0);
    let got: Vec<(String, u64, u64)> = per_node.iter().map(|r| (r["node"].as_str().unwrap_or_default().to_string(), n(&r["n"]), n(&r["u"]))).collect();
    assert_eq!(
        got,
        [("node-1".to_string(), 1_550, 1_550), ("node-2".to_string(), 2_550 - gone, 2_550 - gone)],
        "node-1 loses nothing; node-2 loses exactly what is counted; nothing twice"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The ClickHouse server is down when the relay starts: the relay serves live flows and
/// says the store is waiting; once the server is up, everything the node still holds
/// is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_down_at_start_live_flows_served_and_written_once_it_is_up() {
    let dir = temp("down-at-start");
    std::fs::create_dir_all(&dir).expect("dir");
    let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("port");
    let ring = Arc::new(FlowRing::new(65_536).expect("ring"));
    let peers = [format!("node-1={}", node(ring.clone()).await)];
    let relay = RelayProcess::start(&dir, "1", &peers, &format!("http://127.0.0.1:{port}"));
    let st = relay
        .until("connected, store waiting", |s| s.num_connected_nodes == Some(1) && store_of(s).waiting && !store_of(s).last_error.is_empty())
        .await;
    assert!(store_of(&st).last_error.contains("unreachable"), "{st:?}");
    // Live flows meanwhile.
    let mut c = flows_proto::observer_client::ObserverClient::connect(format!("http://{}", relay.addr)).await.expect("connect");
    let mut live = c.get_flows(flows_proto::GetFlowsRequest { follow: true, ..Default::default() }).await.expect("follow").into_inner();
    let got = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            // Until the follower is reading, a flow made may come before it: make one
            // per try until one arrives.
            ring.push(flow(0));
            if let Ok(Ok(Some(m))) = tokio::time::timeout(Duration::from_millis(500), live.message()).await
                && matches!(m.response_types, Some(flows_proto::get_flows_response::ResponseTypes::Flow(_)))
            {
                return;
            }
        }
    })
    .await;
    assert!(got.is_ok(), "no live flow while the store was down");
    produce(&ring, 1, 499, Duration::from_millis(500)).await;
    let (_, pushed) = ring.bounds();
    let _server = Server::start(&dir.join("ch"), port);
    let st = relay.until("store open, all written", |s| !store_of(s).waiting && store_of(s).rows_written == pushed).await;
    assert_eq!((store_of(&st).rows_lost, store_of(&st).last_error.as_str()), (0, ""), "{st:?}");
    drop(relay);
    let store = Store::open_existing(&StoreConfig::Server { url: format!("http://127.0.0.1:{port}"), user: None, password: None }, "flows")
        .await
        .expect("open");
    assert_eq!(stored(&store).await, (pushed, pushed), "every flow the node held, once");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A read of a whole time window streams from the store page by page: 25,000 stored
/// flows come out through a relay whose bound on one read is 5,000 rows (a single read
/// of them all is refused), merged in time order with the node's ring, each flow once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_read_streams_past_the_read_bound_in_time_order() {
    let _turn = embedded_turn();
    let dir = temp("stream");
    let config = StoreConfig::Embedded { path: dir.clone(), library: flows_store::chdb::default_library() };
    let limits = flows_store::ReadLimits { max_rows: 5_000, ..Default::default() };
    let store = Arc::new(Store::open(&config, "flows", Retention::default()).await.expect("open").with_read_limits(limits));
    let t = flows_proto::timestamp_nanos(&flows_proto::timestamp_now()) - 3_600_000_000_000;
    let rows: Vec<flows_store::FlowRow> = (0..25_000i64)
        .map(|i| {
            let Entry::Flow(mut f) = flow(i as u64) else { unreachable!() };
            f.time = Some(flows_proto::timestamp_from_nanos(t + i * 100_000_000));
            f.uuid = format!("stored-{i}");
            flows_store::FlowRow::from_flow(&f)
        })
        .collect();
    for chunk in rows.chunks(5_000) {
        store.insert(chunk).await.expect("insert");
    }
    let all = flows_store::FlowQuery { since: Some(t - 1), ..Default::default() };
    assert!(matches!(store.flows(&all).await, Err(flows_store::StoreError::TooMany { limit: 5_000 })), "one read of them all is refused");
    let ring = Arc::new(FlowRing::new(65_536).expect("ring"));
    let addr = node(ring.clone()).await;
    let r = relay(addr, store.clone()).await;
    produce(&ring, 0, 100, Duration::ZERO).await;
    until_written(&store, 25_100, "the ring's flows stored too").await;
    let req = flows_proto::GetFlowsRequest { since: Some(flows_proto::timestamp_from_nanos(t - 1)), ..Default::default() };
    let mut s = flows_proto::observer_server::Observer::get_flows(&*r.svc, tonic::Request::new(req)).await.expect("GetFlows").into_inner();
    let mut got = Vec::new();
    use tokio_stream::StreamExt;
    while let Some(m) = s.next().await {
        let m = m.expect("message");
        match m.response_types {
            Some(flows_proto::get_flows_response::ResponseTypes::Flow(f)) => got.push((flows_proto::timestamp_nanos(&f.time.unwrap_or_default()), f.uuid)),
            Some(flows_proto::get_flows_response::ResponseTypes::NodeStatus(st)) => {
                assert_ne!(st.state_change, flows_proto::NodeState::Error as i32, "{st:?}")
            }
            _ => {}
        }
    }
    assert_eq!(got.len(), 25_100, "every stored flow and the ring's, once");
    assert!(got.windows(2).all(|w| w[0].0 <= w[1].0), "in time order");
    assert_eq!(got.iter().map(|g| &g.1).collect::<std::collections::HashSet<_>>().len(), 25_100, "no flow twice");
    r.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}
