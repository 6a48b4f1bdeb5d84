//! The lab with its relay writing to a ClickHouse server (`flows lab up --store
//! http://…`), real eBPF and real traffic. The server is killed and stays away for 60 s
//! while the pods keep making connection attempts: the relay buffers (within its bound;
//! it reports the failing writes), and when the server is back every attempt made before,
//! during and after the outage is in the server's table exactly once; every record the
//! probes made in that time is written or counted lost, and none is counted lost.

mod common;

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::{drive, flows, ok, root, scenario};
use flows_lab::{
    drive::Outcome,
    testing::{lab_lock, skip_unless_root},
};
use flows_proto::{ServerStatusRequest, ServerStatusResponse, StoreStatus, observer_client::ObserverClient};

const OUTAGE: Duration = Duration::from_secs(60);

/// A ClickHouse server (flows-clickhouse-server, beside `flows`), killed on drop.
struct ClickHouse(Child);

impl ClickHouse {
    fn start(data: &Path, port: u16) -> ClickHouse {
        let bin = Path::new(env!("CARGO_BIN_EXE_flows")).with_file_name("flows-clickhouse-server");
        assert!(bin.exists(), "{} is missing: run `cargo build --bins` first", bin.display());
        let child = Command::new(bin)
            .args(["--path", &data.display().to_string(), "--http-port", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start ClickHouse");
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "ClickHouse did not listen on {port}");
            std::thread::sleep(Duration::from_millis(100));
        }
        ClickHouse(child)
    }
}

impl Drop for ClickHouse {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A query over ClickHouse's HTTP interface; the body of a 200 answer.
fn query(port: u16, sql: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to ClickHouse");
    s.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    write!(s, "POST / HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\n\r\n{sql}", sql.len()).expect("send");
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("answer");
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    assert!(head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"), "{sql}: {answer}");
    body.to_string()
}

/// Stored records of frontend's attempts (the SYN leaving frontend), per source port.
fn stored_attempts(port: u16) -> BTreeMap<u64, u64> {
    query(
        port,
        "SELECT src_port, count() FROM flows.flows WHERE src_pod = 'frontend' AND point = 'FROM_ENDPOINT' \
         AND NOT is_reply AND protocol = 'TCP' GROUP BY src_port FORMAT TabSeparated",
    )
    .lines()
    .filter_map(|l| {
        let (p, n) = l.split_once('\t')?;
        Some((p.parse().ok()?, n.parse().ok()?))
    })
    .collect()
}

fn status(rt: &tokio::runtime::Runtime, relay: &str) -> ServerStatusResponse {
    rt.block_on(async {
        let mut c = ObserverClient::connect(format!("http://{relay}")).await.expect("connect to the relay");
        c.server_status(ServerStatusRequest {}).await.expect("status").into_inner()
    })
}

fn store_of(s: &ServerStatusResponse) -> StoreStatus {
    s.store.clone().expect("the relay reports its store")
}

/// The relay's status once its writer holds nothing and its counts stopped moving.
fn settled(rt: &tokio::runtime::Runtime, relay: &str, what: &str) -> ServerStatusResponse {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = None;
    loop {
        let st = status(rt, relay);
        let s = store_of(&st);
        let now = (st.seen_flows, s.rows_written, s.rows_lost, s.rows_lost_upstream);
        if s.rows_buffered == 0 && last == Some(now) {
            return st;
        }
        last = Some(now);
        assert!(Instant::now() < deadline, "{what}: the relay did not settle: {st:?}");
        std::thread::sleep(Duration::from_millis(1000));
    }
}

/// `n` allowed TCP attempts, frontend to backend:80; their source ports.
fn attempts(dir: &Path, name: &str, n: usize) -> Vec<u64> {
    let r = drive(dir, &scenario(dir, name, n));
    assert!(r.attempts.iter().all(|a| a.outcome == Outcome::Success), "{:?}", r.attempts);
    r.attempts.iter().filter_map(|a| a.src_port.map(u64::from)).collect()
}

/// Waits until every attempt of `ports` (the source ports of all attempts made so far)
/// has its record stored, and checks none is stored twice. Two attempts may have had the
/// same source port (the kernel picks them at random): each has a record of its own.
fn until_stored(port: u16, ports: &[u64], what: &str) {
    let mut want: BTreeMap<u64, u64> = BTreeMap::new();
    for p in ports {
        *want.entry(*p).or_default() += 1;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = stored_attempts(port);
        for (p, n) in &want {
            let stored = got.get(p).copied().unwrap_or(0);
            assert!(stored <= *n, "{what}: {n} attempt(s) from port {p}, stored {stored} times");
        }
        let missing: Vec<_> = want.iter().filter(|(p, n)| got.get(p).copied().unwrap_or(0) < **n).collect();
        if missing.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: attempts (port, count) {missing:?} not all stored");
        std::thread::sleep(Duration::from_millis(500));
    }
}

struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = flows(&self.0, &["lab", "down", "--state-dir", &self.0.display().to_string()]);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn clickhouse_gone_for_60_seconds_under_lab_traffic_loses_nothing() {
    if skip_unless_root("clickhouse_gone_for_60_seconds_under_lab_traffic_loses_nothing") {
        return;
    }
    let _lock = lab_lock().expect("lab lock");
    let dir = flows_lab::testing::temp_dir("flows-store-outage-lab").expect("dir");
    let _cleanup = Cleanup(dir.clone());
    let data = dir.join("clickhouse");
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("port");
    let server = ClickHouse::start(&data, port);
    let d = dir.display().to_string();
    let seed = root().join("lab/examples/seed").display().to_string();
    let url = format!("http://127.0.0.1:{port}");
    ok(&dir, &["lab", "up", &seed, "--nodes", "2", "--probes", "--store", &url, "--state-dir", &d]);
    let relay = std::fs::read_to_string(dir.join("relay.addr")).expect("relay address");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    assert_eq!(store_of(&status(&rt, &relay)).backend, "clickhouse");

    let before = attempts(&dir, "before", 3);
    until_stored(port, &before, "before the outage");
    let start = settled(&rt, &relay, "before the outage");

    // Gone (killed, not stopped: nothing is flushed on its way out), attempts going on.
    drop(server);
    let gone = Instant::now();
    let mut during = Vec::new();
    let mut buffered_max = 0;
    while gone.elapsed() < OUTAGE {
        during.extend(attempts(&dir, "during", 2));
        buffered_max = buffered_max.max(store_of(&status(&rt, &relay)).rows_buffered);
        std::thread::sleep(Duration::from_secs(3));
    }
    let st = store_of(&status(&rt, &relay));
    assert!(!st.last_error.is_empty(), "the failing writes are reported: {st:?}");
    assert!(buffered_max > 0, "records waited in the relay's buffer during the outage");
    assert!(during.len() >= 20, "attempts kept coming during the outage: {}", during.len());

    let _server = ClickHouse::start(&data, port);
    let after = attempts(&dir, "after", 3);
    let all: Vec<u64> = before.iter().chain(&during).chain(&after).copied().collect();
    until_stored(port, &all, "before, during and after the outage");
    let end = settled(&rt, &relay, "after the outage");
    let (s0, s1) = (store_of(&start), store_of(&end));
    let seen = end.seen_flows - start.seen_flows;
    let written = s1.rows_written - s0.rows_written;
    let lost = (s1.rows_lost - s0.rows_lost) + (s1.rows_lost_upstream - s0.rows_lost_upstream);
    eprintln!(
        "outage of {} s: {} attempts during it; {seen} records made, {written} written, {lost} lost; \
         at most {buffered_max} rows held",
        OUTAGE.as_secs(),
        during.len()
    );
    assert_eq!(lost, 0, "nothing counted lost: {s1:?}");
    assert_eq!(seen, written, "every record the probes made was written: {end:?}");
    assert!(s1.last_error.is_empty(), "healthy again: {s1:?}");
    // What the relay says it wrote is what the server holds.
    let rows: u64 = query(port, "SELECT count() FROM flows.flows FORMAT TabSeparated").trim().parse().expect("count");
    assert_eq!(rows, s1.rows_written, "rows in the server vs rows the relay wrote");
}
