//! One suite, two real engines: chDB in this process, and a ClickHouse server process on
//! loopback (from the same library). Schema and migrations, insert and read back, the
//! audit with filters, retention with rollups, and a restart that loses nothing.

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant, SystemTime},
};

use flows_proto::{
    Endpoint, EventType, Flow, FlowFilter, Ip, IpVersion, Layer4, Policy, Service, Tcp, TcpFlags, Timestamp,
    TrafficDirection, Verdict, Workload, layer4,
};
use flows_store::{AttemptQuery, AuditQuery, FlowQuery, FlowRow, ReadLimits, Retention, Store, StoreConfig, StoreError};

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

fn ep(ns: &str, pod: &str, deploy: Option<&str>, app: &str) -> Endpoint {
    Endpoint {
        namespace: ns.into(),
        pod_name: pod.into(),
        labels: vec![format!("app={app}")],
        workloads: deploy
            .map(|d| vec![Workload { name: d.into(), kind: "Deployment".into() }])
            .unwrap_or_default(),
        node_name: "node-1".into(),
        ..Default::default()
    }
}

fn flow(at: i64, n: u32, src: Endpoint, dst: Option<Endpoint>, dst_ip: &str, port: u32, verdict: Verdict, reply: bool) -> Flow {
    let denied = verdict == Verdict::Dropped;
    Flow {
        time: Some(Timestamp { seconds: at.div_euclid(1_000_000_000), nanos: at.rem_euclid(1_000_000_000) as i32 }),
        uuid: format!("f-{n}"),
        node_name: "node-1".into(),
        verdict: verdict as i32,
        drop_reason: if denied { "POLICY_DENIED".into() } else { String::new() },
        event_type: if denied { EventType::PolicyVerdict } else { EventType::Trace } as i32,
        ip: Some(Ip { source: format!("10.244.1.{}", n % 200 + 2), destination: dst_ip.into(), ip_version: IpVersion::Ipv4 as i32 }),
        l4: Some(Layer4 {
            protocol: Some(layer4::Protocol::Tcp(Tcp {
                source_port: 40_000 + n,
                destination_port: port,
                flags: Some(TcpFlags { syn: true, ..Default::default() }),
            })),
        }),
        source: Some(src),
        destination: dst,
        is_reply: reply,
        ingress_denied_by: if denied {
            vec![Policy { name: "default-deny".into(), namespace: "data".into(), kind: "NetworkPolicy".into(), labels: Vec::new() }]
        } else {
            Vec::new()
        },
        packet_length: 60,
        ..Default::default()
    }
}

/// The flows of the suite: 5 denied api → db, 2 denied world → web, 10 allowed web → api,
/// 3 replies, one denied flow from 3 days ago, and one from 10 days ago (past the raw
/// retention of 7 days: the raw table never keeps it, the rollups do).
fn recorded(t: i64) -> Vec<Flow> {
    let api = || ep("shop", "api-6b7c-aaaaa", Some("api"), "api");
    let web = || ep("shop", "web-1", None, "web");
    let db = || ep("data", "db-0", None, "db");
    let world = || Endpoint { is_world: true, labels: vec!["reserved:world".into()], ..Default::default() };
    let mut v = Vec::new();
    for i in 0..5 {
        v.push(flow(t + i * 1_000_000, i as u32, api(), Some(db()), "10.244.2.9", 5432, Verdict::Dropped, false));
    }
    for i in 0..2 {
        let mut f = flow(t + (10 + i) * 1_000_000, 10 + i as u32, world(), Some(web()), "10.244.1.77", 80, Verdict::Dropped, false);
        f.ip = Some(Ip { source: "203.0.113.7".into(), destination: "10.244.1.77".into(), ip_version: IpVersion::Ipv4 as i32 });
        v.push(f);
    }
    for i in 0..10 {
        v.push(flow(t + (20 + i) * 1_000_000, 20 + i as u32, web(), Some(api()), "10.244.1.10", 8080, Verdict::Forwarded, false));
    }
    for i in 0..3 {
        v.push(flow(t + (40 + i) * 1_000_000, 40 + i as u32, api(), Some(web()), "10.244.1.77", 41_000, Verdict::Forwarded, true));
    }
    // A packet whose ports the datapath could not read (GRE): its protocol by name.
    let mut gre = flow(t + 35 * 1_000_000, 35, web(), Some(api()), "10.244.1.10", 0, Verdict::Forwarded, false);
    gre.l4 = None;
    gre.l4_unknown = Some(flows_proto::L4Unknown { reason: flows_proto::L4UnknownReason::Protocol as i32, protocol: 47 });
    v.push(gre);
    v.push(flow(t - 3 * 86_400_000_000_000, 98, api(), Some(db()), "10.244.2.9", 5432, Verdict::Dropped, false));
    v.push(flow(t - 10 * 86_400_000_000_000, 99, api(), Some(db()), "10.244.2.9", 5432, Verdict::Dropped, false));
    v
}

async fn count(store: &Store, table: &str, cond: &str) -> u64 {
    let r = store
        .select_json(&format!(
            "SELECT {} AS s FROM {}.{table} WHERE {cond}",
            if table.starts_with("flows_") { "sum(flows)" } else { "count()" },
            store.database()
        ))
        .await
        .expect("count");
    let v = &r[0]["s"];
    v.as_u64().or_else(|| v.as_str().and_then(|s| s.parse().ok())).unwrap_or(0)
}

async fn suite(store: &Store, what: &str) {
    assert_eq!(store.schema_version().await.expect("version"), 3, "{what}");
    let tables = store
        .select_json(&format!("SELECT name FROM system.tables WHERE database = '{}' ORDER BY name", store.database()))
        .await
        .expect("tables");
    let names: Vec<&str> = tables.iter().filter_map(|t| t["name"].as_str()).collect();
    assert_eq!(names, ["flows", "flows_1h", "flows_1h_mv", "flows_1m", "flows_1m_mv", "schema_migrations"], "{what}");

    let t = now_ns() - 60_000_000_000;
    let flows = recorded(t);
    let rows: Vec<FlowRow> = flows.iter().map(FlowRow::from_flow).collect();
    store.insert(&rows[..10]).await.expect("first batch");
    store.insert(&rows[10..]).await.expect("second batch");
    // A retry of a batch that was written (its answer lost) writes nothing, here or in
    // the rollups (counted below).
    store.insert(&rows[10..]).await.expect("second batch again");
    // Already past its retention: not kept (the rollups still count it).
    assert_eq!(count(store, "flows", "1").await, flows.len() as u64 - 1, "{what}");
    assert_eq!(store.last_time().await.expect("last"), Some(t + 42 * 1_000_000), "{what}");
    // Where a restarted writer resumes: per node, its newest flow and what lies within
    // the margin before it (here 2.5 ms: f-40, f-41, f-42).
    let marks = store.resume_marks(2_500_000).await.expect("resume marks");
    assert_eq!(marks.len(), 1, "{what}: {marks:?}");
    let mut ids = marks[0].uuids.clone();
    ids.sort();
    assert_eq!((marks[0].node.as_str(), marks[0].newest, ids), ("node-1", t + 42 * 1_000_000, vec!["f-40".to_string(), "f-41".into(), "f-42".into()]), "{what}");

    // Read back: what was stored is what comes out, in time order.
    let back = store.flows(&FlowQuery::default()).await.expect("flows");
    let mut want: Vec<Flow> = rows.iter().filter(|r| r.uuid != "f-99").map(FlowRow::to_flow).collect();
    want.sort_by_key(|f| f.time.map(|t| (t.seconds, t.nanos)));
    assert_eq!(back, want, "{what}");
    // The same read in pages of at most 3 (slices narrowed around the 43 ms that hold
    // most of them, widened across the 3 days between): the same flows, in order.
    let mut pages = store.flow_pages(&FlowQuery::default(), 3).await.expect("pages");
    let mut paged = Vec::new();
    while let Some(p) = pages.next_page(store).await.expect("a page") {
        assert!((1..=3).contains(&p.len()), "{what}: a page of {}", p.len());
        paged.extend(p);
    }
    assert_eq!(paged, want, "{what}: paged");
    let one = FlowQuery { allow: vec![FlowFilter { destination_port: vec!["5432".into()], ..Default::default() }], ..Default::default() };
    let mut pages = store.flow_pages(&one, 3).await.expect("pages");
    let mut n = 0;
    while let Some(p) = pages.next_page(store).await.expect("a page") {
        n += p.len();
    }
    assert_eq!(n, store.flows(&one).await.expect("flows").len(), "{what}: filtered pages");
    let last2 = store.flows(&FlowQuery { number: 2, last: true, ..Default::default() }).await.expect("last two");
    assert_eq!(last2.iter().map(|f| f.uuid.as_str()).collect::<Vec<_>>(), ["f-41", "f-42"], "{what}");
    // History filters as `flows observe` takes them.
    let query = FlowQuery {
        allow: vec![FlowFilter { source_workload: vec!["deployment/api".into()], destination_port: vec!["5000-6000".into()], ..Default::default() }],
        deny: vec![FlowFilter { source_ip: vec!["10.244.1.0/30".into()], ..Default::default() }],
        since: Some(t - 1),
        ..Default::default()
    };
    let got = store.flows(&query).await.expect("filtered");
    // f-0..f-4 come from 10.244.1.2-6; the deny list removes .2 and .3.
    assert_eq!(got.iter().map(|f| f.uuid.as_str()).collect::<Vec<_>>(), ["f-2", "f-3", "f-4"], "{what}");

    // The audit: denied attempts in the last hour, grouped.
    let q = AuditQuery { since: Some(now_ns() - 3_600_000_000_000), ..Default::default() };
    let audit = store.audit(&q).await.expect("audit");
    assert_eq!(audit.len(), 2, "{what}: {audit:?}");
    let a = &audit[0];
    assert_eq!(
        (a.src_workload.as_str(), a.dst_namespace.as_str(), a.dst_workload.as_str(), a.dst_port, a.protocol.as_str(), a.flows),
        ("api", "data", "db-0", 5432, "TCP", 5),
        "{what}"
    );
    assert_eq!((a.first_seen, a.last_seen), (t, t + 4_000_000), "{what}");
    assert_eq!(a.policies, ["NetworkPolicy:data/default-deny"], "{what}");
    assert_eq!(a.drop_reasons, ["POLICY_DENIED"], "{what}");
    assert_eq!((audit[1].src_workload_kind.as_str(), audit[1].src_workload.as_str(), audit[1].flows), ("world", "203.0.113.7", 2), "{what}");
    let only_world = AuditQuery {
        allow: vec![FlowFilter { destination_label: vec!["app in (web)".into()], ..Default::default() }],
        top: 1,
        ..q.clone()
    };
    let w = store.audit(&only_world).await.expect("audit filtered");
    assert_eq!(w.len(), 1, "{what}");
    assert_eq!(w[0].dst_workload, "web-1", "{what}");
    // Over the whole raw history, the 3-day-old denial counts too.
    let all = store.audit(&AuditQuery::default()).await.expect("audit all");
    assert_eq!(all.iter().map(|r| r.flows).sum::<u64>(), 8, "{what}");

    // Rollups: attempts without replies, per minute and hour, the expired one included.
    assert_eq!(count(store, "flows_1m", "1").await, 20, "{what}");
    assert_eq!(count(store, "flows_1h", "verdict = 'DROPPED'").await, 9, "{what}");

    let usage = store.disk_usage().await.expect("usage");
    assert_eq!(usage.rows, flows.len() as u64 - 1, "{what}");
    assert!(usage.bytes_on_disk > 0, "{what}");

    // A batch as large as the relay sends (megabytes of rows in one insert), with bytes
    // a statement parser would trip on (;, newlines, quotes) inside the rows.
    let big: Vec<FlowRow> = (0..20_000u32)
        .map(|i| {
            let mut f = flow(t - 3_600_000_000_000 + i64::from(i), 1_000 + i, ep("bulk", "p", Some("bulk"), "bulk"), None, "10.244.3.3", 80, Verdict::Forwarded, false);
            f.uuid = format!("bulk;\n'{i}");
            FlowRow::from_flow(&f)
        })
        .collect();
    store.insert(&big).await.expect("a 20,000-row batch");
    assert_eq!(count(store, "flows", "src_namespace = 'bulk'").await, 20_000, "{what}");
    store.execute(&format!("ALTER TABLE {}.flows DELETE WHERE src_namespace = 'bulk' SETTINGS mutations_sync = 1", store.database())).await.expect("delete bulk");

    attempts(store, t - 2 * 3_600_000_000_000, what).await;
}

/// Attempts for policy advice: one record per attempt, the one that saw its outcome.
async fn attempts(store: &Store, t: i64, what: &str) {
    let api = || ep("adv", "api-6b7c-aaaaa", Some("api"), "api");
    let web = || ep("adv", "web-1", None, "web");
    let db = || ep("adv-data", "db-0", None, "db");
    let world = || Endpoint { is_world: true, labels: vec!["reserved:world".into()], ..Default::default() };
    let dir = |mut f: Flow, d: TrafficDirection| {
        f.traffic_direction = d as i32;
        f
    };
    let mut v = Vec::new();
    for i in 0..3 {
        // Seen at both ends: the destination's record counts.
        v.push(dir(flow(t + i, 500 + i as u32, web(), Some(api()), "10.244.1.10", 8080, Verdict::Forwarded, false), TrafficDirection::Ingress));
        v.push(dir(flow(t + i, 510 + i as u32, web(), Some(api()), "10.244.1.10", 8080, Verdict::Forwarded, false), TrafficDirection::Egress));
        // The source's record of the same attempts, to the service address: left out.
        let mut f = dir(flow(t + i, 520 + i as u32, web(), None, "10.96.0.20", 80, Verdict::Forwarded, false), TrafficDirection::Egress);
        f.destination_service = Some(Service { name: "api".into(), namespace: "adv".into() });
        v.push(f);
    }
    for i in 0..2 {
        v.push(dir(flow(t + 10 + i, 530 + i as u32, api(), Some(db()), "10.244.2.9", 5432, Verdict::Dropped, false), TrafficDirection::Egress));
    }
    v.push(dir(flow(t + 20, 540, api(), Some(world()), "203.0.113.9", 443, Verdict::Forwarded, false), TrafficDirection::Egress));
    let mut kernel = dir(flow(t + 21, 541, api(), Some(db()), "10.244.2.9", 5432, Verdict::Dropped, false), TrafficDirection::Egress);
    kernel.drop_reason = "NO_ROUTE".into();
    v.push(kernel);
    v.push(dir(flow(t + 22, 542, api(), Some(web()), "10.244.1.77", 41_000, Verdict::Forwarded, true), TrafficDirection::Ingress));
    // Refused: nothing listens on 9000 (the kernel's NO_SOCKET drop of the same tuple)
    // nor on 9100 (reset without SYN-ACK). The first 8080 attempt was answered, then
    // reset: not refused.
    v.push(dir(flow(t + 30, 560, web(), Some(api()), "10.244.1.10", 9000, Verdict::Forwarded, false), TrafficDirection::Ingress));
    let mut no_socket = dir(flow(t + 30, 560, web(), Some(api()), "10.244.1.10", 9000, Verdict::Dropped, false), TrafficDirection::Ingress);
    no_socket.drop_reason = "NO_SOCKET".into();
    no_socket.ingress_denied_by.clear();
    v.push(no_socket);
    v.push(dir(flow(t + 31, 561, web(), Some(api()), "10.244.1.10", 9100, Verdict::Forwarded, false), TrafficDirection::Ingress));
    let reply = |at: i64, n: u32, from_port: u32, to_port: u32, flags: TcpFlags| {
        let mut f = dir(flow(at, n, api(), Some(web()), "10.244.1.77", to_port, Verdict::Forwarded, true), TrafficDirection::Egress);
        f.l4 = Some(Layer4 { protocol: Some(layer4::Protocol::Tcp(Tcp { source_port: from_port, destination_port: to_port, flags: Some(flags) })) });
        f
    };
    v.push(reply(t + 32, 562, 9100, 40_561, TcpFlags { rst: true, ack: true, ..Default::default() }));
    v.push(reply(t + 33, 563, 8080, 40_500, TcpFlags { syn: true, ack: true, ..Default::default() }));
    v.push(reply(t + 34, 564, 8080, 40_500, TcpFlags { rst: true, ack: true, ..Default::default() }));
    for f in &mut v {
        // Each pod has one address.
        let pod = f.source.as_ref().map(|s| s.pod_name.clone()).unwrap_or_default();
        if let Some(ip) = f.ip.as_mut() {
            ip.source = if pod == "web-1" { "10.244.1.77" } else { "10.244.1.10" }.into();
        }
    }
    let rows: Vec<FlowRow> = v.iter().map(FlowRow::from_flow).collect();
    store.insert(&rows).await.expect("insert attempts");

    let got = store
        .attempts(&AttemptQuery { since: Some(t), until: Some(t + 1_000_000_000), ..Default::default() })
        .await
        .expect("attempts");
    let summary: Vec<(String, String, String, String, u16, u64, bool)> = got
        .iter()
        .map(|a| (a.verdict.clone(), a.src.pod.clone(), a.dst.workload.clone(), a.protocol.clone(), a.port, a.flows, a.refused))
        .collect();
    assert_eq!(
        summary,
        [
            ("FORWARDED".to_string(), "api-6b7c-aaaaa".to_string(), "203.0.113.9".to_string(), "TCP".to_string(), 443, 1, false),
            ("FORWARDED".into(), "web-1".into(), "api".into(), "TCP".into(), 8080, 3, false),
            ("FORWARDED".into(), "web-1".into(), "api".into(), "TCP".into(), 9000, 1, true),
            ("FORWARDED".into(), "web-1".into(), "api".into(), "TCP".into(), 9100, 1, true),
            ("DROPPED".into(), "api-6b7c-aaaaa".into(), "db-0".into(), "TCP".into(), 5432, 2, false),
        ],
        "{what}"
    );
    let web_api = &got[1];
    assert_eq!(web_api.src.labels, ["app=web"], "{what}");
    assert_eq!(web_api.dst.workload_kind, "Deployment", "{what}");
    assert_eq!(web_api.dst.ip, Some("10.244.1.10".parse().unwrap()), "{what}");
    assert_eq!((web_api.first_seen, web_api.last_seen), (t, t + 2), "{what}");
    assert!(got[0].dst.world && got[0].dst.namespace.is_empty(), "{what}");
    // Filters apply as in the audit.
    let only_db = AttemptQuery {
        since: Some(t),
        until: Some(t + 1_000_000_000),
        allow: vec![FlowFilter { destination_pod: vec!["adv-data/".into()], ..Default::default() }],
        ..Default::default()
    };
    assert_eq!(store.attempts(&only_db).await.expect("filtered").len(), 1, "{what}");
    for table in ["flows", "flows_1m", "flows_1h"] {
        store
            .execute(&format!("ALTER TABLE {}.{table} DELETE WHERE src_namespace LIKE 'adv%' SETTINGS mutations_sync = 1", store.database()))
            .await
            .expect("delete attempts");
    }
}

/// Reopened with 2 days of raw retention: the 3-day-old flow goes, the rollups keep it.
async fn shorter_retention(config: &StoreConfig, what: &str) {
    let r = Retention { raw_days: 2, ..Retention::default() };
    let store = Store::open(config, "flows", r).await.expect("reopen with 2 days");
    store.optimize().await.expect("optimize");
    assert_eq!(count(&store, "flows", "1").await, recorded(0).len() as u64 - 2, "{what}");
    assert_eq!(count(&store, "flows", "uuid = 'f-98'").await, 0, "{what}");
    assert_eq!(count(&store, "flows_1m", "verdict = 'DROPPED'").await, 9, "{what}: kept 30 days");
    assert_eq!(count(&store, "flows_1h", "verdict = 'DROPPED'").await, 9, "{what}: kept a year");
}

fn library() -> PathBuf {
    let lib = flows_store::chdb::default_library();
    assert!(lib.exists(), "{} is missing: run scripts/setup.sh", lib.display());
    lib
}

/// One process holds one embedded engine at a time: the tests that open one here take
/// turns (the test harness runs tests in parallel).
static EMBEDDED: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn embedded_turn() -> std::sync::MutexGuard<'static, ()> {
    EMBEDDED.lock().unwrap_or_else(|p| p.into_inner())
}

fn temp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("flows-store-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// A read for a client never returns more than the store's bound: asking for all of
/// more, or for a number past it, is an error that names the bound and says what to do.
async fn bounded_reads(store: Store) {
    let all = FlowQuery { allow: Vec::new(), deny: Vec::new(), since: None, until: None, number: 0, last: true };
    let too_many = |r: Result<Vec<Flow>, StoreError>| match r {
        Err(e @ StoreError::TooMany { limit: 5 }) => assert!(e.public_message().contains("narrow"), "{e}"),
        other => panic!("not refused: {:?}", other.map(|v| v.len())),
    };
    too_many(store.flows(&all).await);
    too_many(store.flows(&FlowQuery { number: 6, ..all.clone() }).await);
    assert_eq!(store.flows(&FlowQuery { number: 5, ..all.clone() }).await.expect("five").len(), 5);
    assert_eq!(store.flows(&FlowQuery { number: 2, last: false, ..all.clone() }).await.expect("two").len(), 2);
    let groups = store.audit(&AuditQuery { top: 2, ..Default::default() }).await.expect("audit top 2");
    assert!(groups.len() <= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_engine() {
    let _turn = embedded_turn();
    let dir = temp("embedded");
    let config = StoreConfig::Embedded { path: dir.clone(), library: library() };
    let store = Store::open(&config, "flows", Retention::default()).await.expect("open");
    assert!(store.is_embedded());
    suite(&store, "embedded").await;
    // Restart: everything written is there, and migrations do not run again.
    drop(store);
    let store = Store::open(&config, "flows", Retention::default()).await.expect("reopen");
    assert_eq!(count(&store, "flows", "1").await, recorded(0).len() as u64 - 1);
    assert_eq!(count(&store, "schema_migrations", "1").await, 3, "each migration applied once");
    bounded_reads(store.with_read_limits(ReadLimits { max_rows: 5, ..Default::default() })).await;
    shorter_retention(&config, "embedded").await;
    let _ = std::fs::remove_dir_all(&dir);
}

struct Server {
    child: Child,
    port: u16,
}

impl Server {
    fn start(path: &Path, port: u16) -> Server {
        let child = Command::new(env!("CARGO_BIN_EXE_flows-clickhouse-server"))
            .args(["--path", &path.display().to_string(), "--http-port", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the server");
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "the ClickHouse server did not listen");
            std::thread::sleep(Duration::from_millis(100));
        }
        Server { child, port }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("port")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_server() {
    let _ = library();
    let dir = temp("server");
    let port = free_port();
    let server = Server::start(&dir, port);
    let config = StoreConfig::Server { url: server.url(), user: None, password: None };
    let store = Store::open(&config, "flows", Retention::default()).await.expect("open");
    let version = store.select_json("SELECT version() AS v").await.expect("version");
    let v = version[0]["v"].as_str().unwrap_or_default().to_string();
    assert!(v.starts_with("26."), "a current ClickHouse: {v}");
    suite(&store, "server").await;
    // The server restarts on the same data: nothing is lost.
    drop(server);
    let server = Server::start(&dir, port);
    let store = Store::open(&config, "flows", Retention::default()).await.expect("reopen");
    assert_eq!(count(&store, "flows", "1").await, recorded(0).len() as u64 - 1);
    shorter_retention(&config, "server").await;
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A store made by the first release (schema version 1, rows in it) is brought to the
/// current version on open with its rows intact and readable, and written to again; a
/// store marked by a newer build is refused, by the writer and by readers, with a
/// message that says what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_upgrade_from_version_one_and_refusal_of_newer() {
    let _turn = embedded_turn();
    let dir = temp("upgrade");
    let config = StoreConfig::Embedded { path: dir.clone(), library: library() };
    let t = now_ns() - 60_000_000_000;
    {
        // Exactly what version 1 created, and a row as version 1 wrote it (no l4_unknown).
        let v1 = Store::open_unmigrated(&config, "flows").expect("connect");
        for s in flows_store::schema::bootstrap("flows") {
            v1.execute(&s).await.expect("bootstrap");
        }
        let (version, statements) = flows_store::schema::migrations("flows").remove(0);
        assert_eq!(version, 1);
        for s in statements {
            v1.execute(&s).await.expect("version 1");
        }
        v1.execute("INSERT INTO flows.schema_migrations (version) VALUES (1)").await.expect("mark 1");
        v1.execute(&format!(
            "INSERT INTO flows.flows (time, node, uuid, verdict, event_type, point, protocol, src_ip, dst_ip, src_port, dst_port, \
             src_namespace, src_workload, src_workload_kind, dst_namespace, dst_workload, dst_workload_kind) VALUES \
             (fromUnixTimestamp64Nano({t}), 'node-1', 'old-1', 'DROPPED', 'POLICY_VERDICT', 'FROM_ENDPOINT', 'TCP', \
             '::ffff:10.244.1.2', '::ffff:10.244.2.3', 40000, 5432, 'shop', 'api', 'Deployment', 'data', 'db', 'StatefulSet')"
        ))
        .await
        .expect("a version-1 row");
        assert_eq!(v1.schema_version().await.expect("version"), 1);
    }
    let store = Store::open(&config, "flows", Retention::default()).await.expect("upgrade on open");
    assert_eq!(store.schema_version().await.expect("version"), flows_store::schema::LATEST);
    let old = store.flows(&FlowQuery::default()).await.expect("the old row reads back");
    assert_eq!(old.len(), 1);
    assert_eq!((old[0].uuid.as_str(), old[0].l4_unknown), ("old-1", None), "a column added later reads as its default");
    assert_eq!(old[0].source.as_ref().map(|s| s.namespace.as_str()), Some("shop"));
    // The rollups made by version 1 still count, and new rows join them.
    assert_eq!(count(&store, "flows_1m", "verdict = 'DROPPED'").await, 1);
    let new = recorded(t);
    store.insert(&new.iter().map(FlowRow::from_flow).collect::<Vec<_>>()).await.expect("write after the upgrade");
    assert_eq!(count(&store, "flows", "1").await, 1 + new.len() as u64 - 1);
    drop(store);

    // A newer build was here.
    let marker = Store::open_unmigrated(&config, "flows").expect("connect");
    let newer = flows_store::schema::LATEST + 1;
    marker.execute(&format!("INSERT INTO flows.schema_migrations (version) VALUES ({newer})")).await.expect("mark newer");
    drop(marker);
    for (what, r) in [
        ("writer", Store::open(&config, "flows", Retention::default()).await.map(|_| ())),
        ("reader", Store::open_existing(&config, "flows").await.map(|_| ())),
    ] {
        match r {
            Err(e @ StoreError::SchemaTooNew { .. }) => {
                let m = e.to_string();
                assert!(m.contains(&newer.to_string()) && m.contains("newer flows"), "{what}: {m}");
                assert_eq!(e.public_message(), m, "{what}: a client is told too");
            }
            other => panic!("{what}: a newer schema was not refused: {:?}", other.err()),
        }
    }
    let untouched = Store::open_unmigrated(&config, "flows").expect("connect");
    assert_eq!(untouched.schema_version().await.expect("version"), newer, "nothing was changed by the refusal");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The embedded engine runs one connection's statements one after another: a long read
/// there would hold every insert behind it while the probes' rings overrun. Reads have
/// connections of their own, so inserts go on while one runs, and so does a second read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_read_does_not_hold_inserts() {
    let _turn = embedded_turn();
    let dir = temp("long-read");
    let config = StoreConfig::Embedded { path: dir.clone(), library: library() };
    let store = std::sync::Arc::new(Store::open(&config, "flows", Retention::default()).await.expect("open"));
    // A read that runs until ClickHouse stops it: as long as any audit may run.
    let long = "SELECT count() AS n FROM numbers(10000000000000) WHERE cityHash64(number) = 7 \
                SETTINGS max_execution_time = 20, timeout_overflow_mode = 'break'";
    let reader = {
        let store = store.clone();
        tokio::spawn(async move { store.select_json(long).await })
    };
    // The read is running once the engine lists it (asked on the other reading connection).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let running = store
            .select_json("SELECT count() AS n FROM system.processes WHERE query LIKE '%cityHash64(number) = 7%' AND query NOT LIKE '%system.processes%'")
            .await
            .expect("list the running queries");
        if running[0]["n"].as_u64().or_else(|| running[0]["n"].as_str().and_then(|s| s.parse().ok())) == Some(1) {
            break;
        }
        assert!(Instant::now() < deadline, "the long read never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let t = now_ns() - 10_000_000_000;
    let mut slowest = Duration::ZERO;
    for i in 0..20u32 {
        let rows: Vec<FlowRow> = recorded(t + i as i64 * 1_000_000)
            .iter()
            .take(20)
            .enumerate()
            .map(|(k, f)| FlowRow::from_flow(&Flow { uuid: format!("long-read-{i}-{k}"), ..f.clone() }))
            .collect();
        let started = Instant::now();
        store.insert(&rows).await.expect("insert while the read runs");
        slowest = slowest.max(started.elapsed());
    }
    assert!(!reader.is_finished(), "the read ended before the inserts did: nothing was proven");
    assert_eq!(count(&store, "flows", "uuid LIKE 'long-read-%'").await, 400);
    eprintln!("20 inserts while a long read ran: slowest {slowest:?}");
    reader.await.expect("join").expect("the long read");
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The benchmarks' made-up flows are the same whether the engine makes them or a client
/// inserts them: what a benchmark fills in-engine is what its name says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_flows_are_the_same_made_by_the_engine() {
    let _turn = embedded_turn();
    let dir = temp("synthetic");
    let config = StoreConfig::Embedded { path: dir.clone(), library: library() };
    let store = Store::open(&config, "flows", Retention::default()).await.expect("open");
    let (start, step) = (now_ns() - 3_600_000_000_000, 1_000_003);
    let mut made = Vec::new();
    flows_store::synthetic::fill(&store, 1_000, 3_000, start, step, |n| made.push(n)).await.expect("fill");
    assert_eq!(made, vec![3_000]);
    let all = FlowQuery { allow: Vec::new(), deny: Vec::new(), since: None, until: None, number: 5_000, last: false };
    let stored = store.flows(&all).await.expect("read back");
    assert_eq!(stored.len(), 2_000);
    for (k, got) in stored.iter().enumerate() {
        let i = 1_000 + k as u64;
        let want = flows_store::synthetic::row(i, start + i as i64 * step).to_flow();
        assert_eq!(got, &want, "flow {i}");
    }
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}
