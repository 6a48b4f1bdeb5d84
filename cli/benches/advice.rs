//! Policy advice over a large history, in an embedded store:
//! - `flows policy suggest` over FLOWS_BENCH_ADVICE_ROWS stored flows (default 10 million):
//!   wall time and peak resident memory of the process, against the attempts query it
//!   is built on run alone in a process of its own (the raw ClickHouse GROUP BY);
//! - `flows policy check` of 50 policies against the same flows: wall time, same baseline;
//! - the size of suggestions against the distinct (source workload, destination
//!   workload, port) triples observed, for clusters of 10 to 1,000 workloads.
//!
//! The cluster: 100 Deployments of 3 pods in 10 namespaces, each talking to 3 others
//! (one on a run of 3 ports), all to the cluster DNS, one in ten to the world; 1% of
//! attempts denied. Flows past the first million are copies made inside the engine.
//! Needs the release binaries: `cargo build --release --bins`, then
//! `cargo bench -p flows-cli --bench advice`.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant, SystemTime},
};

use flows_policy::{
    Protocol,
    advice::{AddressKind, Inventory, Observation, Outcome, Owner, Party, PodParty, SuggestOptions, suggest},
    selector::Labels,
};
use flows_store::{AttemptQuery, FlowRow, Retention, Store, StoreConfig};

const WORKLOADS: usize = 100;
const PODS: usize = 3;
const GENERATED: u64 = 1_000_000;

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

fn ns(i: usize) -> String {
    format!("ns-{}", i % 10)
}

fn pod_ip(i: usize, k: usize) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::new(10, 1 + (i / 250) as u8, (i % 250) as u8, 10 + k as u8)
}

/// (source workload, destination: Some(workload) or None for the world, protocol, port).
fn edges(w: usize) -> Vec<(usize, Option<usize>, &'static str, u16)> {
    let mut out = Vec::new();
    for i in 0..w {
        out.push((i, Some((i + 1) % w), "TCP", 8080));
        out.push((i, Some((i + 7) % w), "TCP", 5432));
        for p in 9000..=9002 {
            out.push((i, Some((i + 13) % w), "TCP", p));
        }
        // The cluster DNS is the last "workload".
        out.push((i, Some(w), "UDP", 53));
        if i % 10 == 0 {
            out.push((i, None, "TCP", 443));
        }
    }
    out
}

struct Side {
    namespace: String,
    pod: String,
    workload: String,
    labels: Vec<String>,
    ip: std::net::Ipv4Addr,
}

fn side(i: usize, k: usize) -> Side {
    if i == WORKLOADS {
        return Side {
            namespace: "kube-system".into(),
            pod: format!("coredns-5c6-{k}"),
            workload: "coredns".into(),
            labels: vec!["k8s-app=kube-dns".into(), "pod-template-hash=5c6".into()],
            ip: std::net::Ipv4Addr::new(10, 0, 0, 10 + (k % 2) as u8),
        };
    }
    Side {
        namespace: ns(i),
        pod: format!("svc-{i}-6b7c9-{k}"),
        workload: format!("svc-{i}"),
        labels: vec![format!("app=svc-{i}"), format!("team=team-{}", i % 5), "pod-template-hash=6b7c9".into()],
        ip: pod_ip(i, k),
    }
}

fn row(n: u64, total: u64, t0: i64, edges: &[(usize, Option<usize>, &'static str, u16)]) -> FlowRow {
    let e = edges.len() as u64;
    let (s, d, proto, port) = edges[(n % e) as usize];
    let k = ((n / e) % PODS as u64) as usize;
    let k2 = ((n / (e * PODS as u64)) % PODS as u64) as usize;
    let denied = n % 100 == 0;
    let src = side(s, k);
    let mut r = FlowRow {
        time: t0 + (n as i64) * (86_400_000_000_000 / total.max(1) as i64),
        node: format!("node-{}", k % 2),
        uuid: format!("b-{n}"),
        verdict: if denied { 2 } else { 1 },
        drop_reason: if denied { "POLICY_DENIED".into() } else { String::new() },
        event_type: if denied { 3 } else { 1 },
        ip_version: 4,
        protocol: proto.into(),
        src_ip: src.ip.to_ipv6_mapped(),
        src_port: 30_000 + (n % 30_000) as u16,
        dst_port: if denied { 6379 } else { port },
        tcp_flags: if proto == "TCP" { 2 } else { 0 },
        src_namespace: src.namespace,
        src_pod: src.pod,
        src_workload: src.workload.clone(),
        src_workload_kind: "Deployment".into(),
        src_workloads: vec![format!("Deployment/{}", src.workload)],
        src_labels: src.labels,
        ..Default::default()
    };
    match d {
        Some(d) => {
            let dst = side(d, k2);
            r.point = 2;
            r.direction = 1;
            r.dst_ip = dst.ip.to_ipv6_mapped();
            r.dst_namespace = dst.namespace;
            r.dst_pod = dst.pod;
            r.dst_workload = dst.workload.clone();
            r.dst_workload_kind = "Deployment".into();
            r.dst_workloads = vec![format!("Deployment/{}", dst.workload)];
            r.dst_labels = dst.labels;
        }
        None => {
            let ip = std::net::Ipv4Addr::new(203, 0, 113, (s / 10) as u8);
            r.point = 1;
            r.direction = 2;
            r.dst_ip = ip.to_ipv6_mapped();
            r.dst_workload = ip.to_string();
            r.dst_workload_kind = "world".into();
            r.dst_world = true;
            r.dst_labels = vec!["reserved:world".into()];
        }
    }
    r
}

fn manifests(dir: &Path) {
    let mut y = String::new();
    for n in 0..10 {
        y.push_str(&format!("apiVersion: v1\nkind: Namespace\nmetadata: {{ name: ns-{n} }}\n---\n"));
    }
    for i in 0..=WORKLOADS {
        for k in 0..if i == WORKLOADS { 2 } else { PODS } {
            let s = side(i, k);
            let labels: Vec<String> = s
                .labels
                .iter()
                .filter_map(|l| l.split_once('='))
                .map(|(a, b)| format!("{a}: {b}"))
                .collect();
            y.push_str(&format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{ name: {}, namespace: {}, labels: {{ {} }} }}\nspec: {{ containers: [ {{ name: c, image: x }} ] }}\nstatus: {{ podIP: {} }}\n---\n",
                s.pod,
                s.namespace,
                labels.join(", "),
                s.ip
            ));
        }
    }
    std::fs::create_dir_all(dir).expect("manifests dir");
    std::fs::write(dir.join("cluster.yaml"), y).expect("manifests");
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn config(dir: &Path) -> StoreConfig {
    StoreConfig::Embedded {
        path: dir.to_path_buf(),
        library: flows_store::chdb::default_library(),
    }
}

/// Child: fills the store with `rows` flows.
fn fill(dir: &Path, rows: u64) {
    runtime().block_on(async {
        let store = Store::open(&config(dir), "flows", Retention::default()).await.expect("open");
        let t0 = now_ns() - 86_400_000_000_000;
        let e = edges(WORKLOADS);
        let generated = rows.min(GENERATED);
        let mut n = 0;
        while n < generated {
            let m = (generated - n).min(100_000);
            let batch: Vec<FlowRow> = (n..n + m).map(|i| row(i, generated, t0, &e)).collect();
            store.insert(&batch).await.expect("insert");
            n += m;
        }
        let mut have = generated;
        while have < rows {
            let m = (rows - have).min(have);
            store
                .execute(&format!(
                    "INSERT INTO flows.flows SELECT * REPLACE (concat(uuid, '-c{have}') AS uuid) FROM flows.flows LIMIT {m}"
                ))
                .await
                .expect("copy");
            have += m;
        }
    });
}

/// Child: the attempts query alone.
fn query(dir: &Path) {
    runtime().block_on(async {
        let store = Store::open_existing(&config(dir), "flows").await.expect("open");
        let q = AttemptQuery {
            since: Some(now_ns() - 2 * 86_400_000_000_000),
            ..Default::default()
        };
        let rows = store.attempts(&q).await.expect("attempts");
        eprintln!("{} groups", rows.len());
    });
}

/// Runs a command; (wall time, peak RSS in KiB, exit code, stdout, stderr).
fn measure(cmd: &mut Command) -> (Duration, u64, i32, Vec<u8>, Vec<u8>) {
    let out_file = tempfile("out");
    let err_file = tempfile("err");
    let t = Instant::now();
    let child = cmd
        .stdout(std::fs::File::create(&out_file).expect("out"))
        .stderr(std::fs::File::create(&err_file).expect("err"))
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn");
    let mut status = 0;
    // SAFETY: zeroed rusage is a valid value; wait4 fills it for our own child.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for the child just spawned, whose pid we own.
    let r = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut ru) };
    assert!(r > 0, "wait4 failed");
    let wall = t.elapsed();
    let code = if libc::WIFEXITED(status) { libc::WEXITSTATUS(status) } else { -1 };
    let out = std::fs::read(&out_file).unwrap_or_default();
    let err = std::fs::read(&err_file).unwrap_or_default();
    let _ = std::fs::remove_file(out_file);
    let _ = std::fs::remove_file(err_file);
    (wall, ru.ru_maxrss as u64, code, out, err)
}

fn tempfile(what: &str) -> PathBuf {
    std::env::temp_dir().join(format!("flows-bench-advice-{what}-{}", std::process::id()))
}

fn flows_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("exe");
    let p = exe.parent().and_then(Path::parent).expect("target dir").join("flows");
    assert!(p.exists(), "{} is missing: run `cargo build --release --bins` first", p.display());
    p
}

/// Suggestion size for a synthetic cluster of `w` workloads (pure, in process).
fn size(w: usize) -> (usize, usize, usize, usize, usize) {
    let e = edges(w);
    let party = |i: usize, k: usize| -> Party {
        let s = if i == w {
            side(WORKLOADS, k)
        } else {
            let mut s = side(i, k);
            s.ip = std::net::Ipv4Addr::new(10, 1 + (i / 250) as u8, (i % 250) as u8, 10 + k as u8);
            s
        };
        let labels: Labels = s.labels.iter().filter_map(|l| l.split_once('=')).map(|(a, b)| (a.into(), b.into())).collect();
        Party::Pod(PodParty {
            namespace: s.namespace,
            name: s.pod,
            labels,
            owner: Some(Owner { kind: "Deployment".into(), name: s.workload }),
            ip: Some(std::net::IpAddr::V4(s.ip)),
        })
    };
    let mut obs = Vec::new();
    for (s, d, proto, port) in &e {
        for k in 0..PODS {
            obs.push(Observation {
                src: party(*s, k),
                dst: match d {
                    Some(d) => party(*d, k % 2),
                    None => Party::Address {
                        ip: std::net::IpAddr::V4(std::net::Ipv4Addr::new(203, 0, 113, (*s / 10 % 250) as u8)),
                        kind: AddressKind::World,
                    },
                },
                protocol: Protocol::from_flow(proto).expect("protocol"),
                port: *port,
                outcome: Outcome::Allowed,
                flows: 1,
                first: 0,
                last: 0,
            });
        }
    }
    let s = suggest(&obs, &Inventory::new(), &SuggestOptions::default());
    let v = serde_json::to_value(&s.policies).expect("json");
    let mut rules = 0;
    let mut peers = 0;
    for p in v.as_array().into_iter().flatten() {
        for section in ["ingress", "egress"] {
            for r in p["spec"][section].as_array().into_iter().flatten() {
                rules += 1;
                peers += r["from"].as_array().or(r["to"].as_array()).map(Vec::len).unwrap_or(0);
            }
        }
    }
    let bytes = s.yaml(false).map(|y| y.len()).unwrap_or(0);
    (s.triples, s.policies.len(), rules, peers, bytes)
}

fn main() {
    if let Ok(mode) = std::env::var("FLOWS_BENCH_ADVICE_CHILD") {
        let dir = PathBuf::from(std::env::var("FLOWS_BENCH_ADVICE_DIR").expect("dir"));
        match mode.as_str() {
            "fill" => fill(&dir, std::env::var("FLOWS_BENCH_ADVICE_ROWS").ok().and_then(|r| r.parse().ok()).unwrap_or(10_000_000)),
            "query" => query(&dir),
            m => panic!("unknown child mode {m}"),
        }
        return;
    }
    // `cargo bench` passes --bench; nothing else is taken.
    let rows: u64 = std::env::var("FLOWS_BENCH_ADVICE_ROWS").ok().and_then(|r| r.parse().ok()).unwrap_or(10_000_000);
    let flows = flows_bin();
    let root = std::env::temp_dir().join(format!("flows-bench-advice-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let store_dir = root.join("store");
    let manifest_dir = root.join("manifests");
    manifests(&manifest_dir);
    let me = std::env::current_exe().expect("exe");

    println!("suggestion size against observed triples (pure, in process):");
    println!("  workloads  triples  policies  rules  peers  yaml bytes");
    for w in [10, 100, 1000] {
        let (t, p, r, pe, b) = size(w);
        println!("  {w:>9}  {t:>7}  {p:>8}  {r:>5}  {pe:>5}  {b:>10}");
    }

    let t = Instant::now();
    let (_, _, code, _, err) = measure(
        Command::new(&me)
            .env("FLOWS_BENCH_ADVICE_CHILD", "fill")
            .env("FLOWS_BENCH_ADVICE_DIR", &store_dir)
            .env("FLOWS_BENCH_ADVICE_ROWS", rows.to_string()),
    );
    assert_eq!(code, 0, "fill failed: {}", String::from_utf8_lossy(&err));
    println!("\nfilled {rows} flows in {:.1} s", t.elapsed().as_secs_f64());

    let store_arg = format!("embedded:{}", store_dir.display());
    let manifests_arg = manifest_dir.display().to_string();
    let run_query = || {
        measure(
            Command::new(&me)
                .env("FLOWS_BENCH_ADVICE_CHILD", "query")
                .env("FLOWS_BENCH_ADVICE_DIR", &store_dir),
        )
    };
    let run_suggest = || {
        measure(Command::new(&flows).args([
            "policy", "suggest", "--store", &store_arg, "--manifests", &manifests_arg, "--since", "2d",
        ]))
    };
    // One warm-up of each (page cache), then the median of three.
    let mut q = Vec::new();
    let mut s = Vec::new();
    let mut yaml = Vec::new();
    let mut summary = String::new();
    for i in 0..4 {
        let (w, rss, code, _, err) = run_query();
        assert_eq!(code, 0, "query failed: {}", String::from_utf8_lossy(&err));
        if i > 0 {
            q.push((w, rss));
        }
        let (w, rss, code, out, err) = run_suggest();
        assert_eq!(code, 0, "suggest failed: {}", String::from_utf8_lossy(&err));
        if i > 0 {
            s.push((w, rss));
        }
        yaml = out;
        summary = String::from_utf8_lossy(&err).lines().find(|l| l.contains(" policies for ")).unwrap_or_default().to_string();
    }
    let median = |v: &mut Vec<(Duration, u64)>| {
        v.sort();
        v[v.len() / 2]
    };
    let (qw, qr) = median(&mut q);
    let (sw, sr) = median(&mut s);
    println!("\nsuggest over {rows} stored flows (median of 3):");
    println!("  attempts query alone:  {:>8.2} s  peak RSS {:>7} MiB", qw.as_secs_f64(), qr / 1024);
    println!("  flows policy suggest:  {:>8.2} s  peak RSS {:>7} MiB", sw.as_secs_f64(), sr / 1024);
    println!("  ratio: wall {:.2}x, memory {:.2}x", sw.as_secs_f64() / qw.as_secs_f64(), sr as f64 / qr.max(1) as f64);
    println!("  {summary}");

    // 50 of the suggested policies (allow policies first), as files.
    let text = String::from_utf8_lossy(&yaml).to_string();
    let docs: Vec<&str> = text.split("\n---\n").collect();
    let mut chosen: Vec<&str> = docs.iter().copied().filter(|d| !d.contains("name: default-deny")).take(50).collect();
    let deny: BTreeSet<&str> = docs.iter().copied().filter(|d| d.contains("name: default-deny")).collect();
    chosen.extend(deny.into_iter().take(50usize.saturating_sub(chosen.len())));
    assert_eq!(chosen.len(), 50, "the suggestion has 50 policies to check");
    let check_dir = root.join("check");
    std::fs::create_dir_all(&check_dir).expect("check dir");
    for (i, d) in chosen.iter().enumerate() {
        std::fs::write(check_dir.join(format!("{i:02}.yaml")), d).expect("policy file");
    }
    let check_arg = check_dir.display().to_string();
    let mut c = Vec::new();
    let mut check_summary = String::new();
    for i in 0..4 {
        let (w, rss, code, out, err) = measure(Command::new(&flows).args([
            "policy", "check", &check_arg, "--replace", "--store", &store_arg, "--manifests", &manifests_arg, "--since", "2d",
        ]));
        assert!(code == 0 || code == 1, "check failed: {}", String::from_utf8_lossy(&err));
        if i > 0 {
            c.push((w, rss));
        }
        check_summary = String::from_utf8_lossy(&out).lines().find(|l| l.contains(" attempts in ")).unwrap_or_default().to_string();
    }
    let (cw, cr) = median(&mut c);
    println!("\ncheck of 50 policies against {rows} flows (median of 3):");
    println!("  flows policy check:    {:>8.2} s  peak RSS {:>7} MiB  ({:.2}x the query alone)", cw.as_secs_f64(), cr / 1024, cw.as_secs_f64() / qw.as_secs_f64());
    println!("  {check_summary}");
    let _ = std::fs::remove_dir_all(&root);
}
