//! The relay against two real node-probe Observer servers on loopback: history merged in
//! time order with one count, a live merge that puts a late-arriving earlier flow first,
//! and a node that goes away and comes back, reported in-band.

use std::{
    collections::BTreeSet,
    sync::{Arc, RwLock},
    time::Duration,
    time::Instant,
};

use flows_node_probe::{
    metrics::Metrics,
    ring::{Entry, FlowRing},
    server::ObserverService,
    stats::ProbeStats,
};
use flows_proto::{
    Flow, FlowFilter, GetFlowsRequest, Ip, IpVersion, NodeState, Verdict, ServerStatusRequest, Timestamp,
    get_flows_response::ResponseTypes, observer_client::ObserverClient,
    observer_server::ObserverServer,
};
use flows_k8s::{ClusterIndex, manifests, watch::SharedIndex};
use flows_relay::{
    peers::{self, PeerSet},
    server::RelayService,
    stream::Merger,
};
use tokio::sync::oneshot;
use tonic::transport::Channel;

struct Node {
    addr: std::net::SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    streams: tokio::sync::watch::Sender<bool>,
    done: Option<tokio::task::JoinHandle<()>>,
}

/// A node whose clock is `behind` nanoseconds behind the relay's: its status says so
/// (the test's flows for it are stamped the same way). Everything else is the probe's
/// own service.
struct Clocked {
    inner: ObserverService,
    behind: i64,
}

#[tonic::async_trait]
impl flows_proto::observer_server::Observer for Clocked {
    type GetFlowsStream = <ObserverService as flows_proto::observer_server::Observer>::GetFlowsStream;

    async fn get_flows(&self, r: tonic::Request<GetFlowsRequest>) -> Result<tonic::Response<Self::GetFlowsStream>, tonic::Status> {
        self.inner.get_flows(r).await
    }

    async fn server_status(
        &self,
        r: tonic::Request<ServerStatusRequest>,
    ) -> Result<tonic::Response<flows_proto::ServerStatusResponse>, tonic::Status> {
        let mut st = self.inner.server_status(r).await?.into_inner();
        st.time = st.time.map(|t| flows_proto::timestamp_from_nanos(flows_proto::timestamp_nanos(&t) - self.behind));
        Ok(tonic::Response::new(st))
    }
}

impl Node {
    async fn start(name: &str, ring: Arc<FlowRing>, addr: &str) -> Node {
        Node::start_behind(name, ring, addr, 0).await
    }

    async fn start_behind(name: &str, ring: Arc<FlowRing>, addr: &str, behind: i64) -> Node {
        let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (streams, shutdown) = tokio::sync::watch::channel(false);
        let svc = ObserverService {
            ring,
            stats: Arc::new(ProbeStats::default()),
            node_name: name.into(),
            streams: flows_tls::serving::StreamSlots::new(64),
            started: Instant::now(),
            metrics: Arc::new(Metrics::new()),
            shutdown,
        };
        let (tx, rx) = oneshot::channel::<()>();
        let done = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(ObserverServer::new(Clocked { inner: svc, behind }))
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    async {
                        let _ = rx.await;
                    },
                )
                .await;
        });
        Node {
            addr,
            stop: Some(tx),
            streams,
            done: Some(done),
        }
    }

    async fn stop(&mut self) {
        let _ = self.streams.send(true);
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(d) = self.done.take() {
            let _ = d.await;
        }
    }
}

fn flow(node: &str, at_ns: i128, n: u32) -> Entry {
    Entry::Flow(Flow {
        node_name: node.into(),
        packet_length: n,
        time: Some(Timestamp {
            seconds: at_ns.div_euclid(1_000_000_000) as i64,
            nanos: at_ns.rem_euclid(1_000_000_000) as i32,
        }),
        ..Default::default()
    })
}

fn now_ns() -> i128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0)
}

async fn relay(nodes: &[&Node]) -> ObserverClient<Channel> {
    relay_with_metrics(nodes).await.0
}

async fn relay_with_metrics(nodes: &[&Node]) -> (ObserverClient<Channel>, Arc<Metrics>) {
    let specs: Vec<String> = nodes.iter().map(|n| n.addr.to_string()).collect();
    let (c, m, _) = relay_with(&specs, None).await;
    (c, m)
}

/// A relay over `specs` (`[name=]host:port`), annotating from `index` when given; it
/// returns once every peer is connected.
async fn relay_with(
    specs: &[String],
    index: Option<SharedIndex>,
) -> (ObserverClient<Channel>, Arc<Metrics>, Arc<PeerSet>) {
    let metrics = Arc::new(Metrics::new());
    let set = PeerSet::fixed(
        specs,
        peers::Backoff {
            initial: Duration::from_millis(50),
            max: Duration::from_millis(200),
        },
    );
    let svc = RelayService {
        merger: Arc::new(Merger {
            peers: set.clone(),
            index,
            metrics: metrics.clone(),
            sort_window: Duration::from_millis(300),
            sort_buffer: 1000,
            store: None,
        }),
        started: Instant::now(),
        streams: flows_tls::serving::StreamSlots::new(64),
        sink: None,
        shutdown: None,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ObserverServer::new(svc))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let mut c = ObserverClient::connect(format!("http://{addr}")).await.expect("connect");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = c.server_status(ServerStatusRequest {}).await.expect("status").into_inner();
        if s.num_connected_nodes == Some(specs.len() as u32) {
            break;
        }
        assert!(Instant::now() < deadline, "relay did not connect: {s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (c, metrics, set)
}

async fn next(s: &mut tonic::Streaming<flows_proto::GetFlowsResponse>) -> flows_proto::GetFlowsResponse {
    tokio::time::timeout(Duration::from_secs(10), s.message())
        .await
        .expect("in time")
        .expect("stream")
        .expect("open")
}

async fn lengths(c: &mut ObserverClient<Channel>, req: GetFlowsRequest) -> Vec<u32> {
    let mut s = c.get_flows(req).await.expect("GetFlows").into_inner();
    let mut out = Vec::new();
    while let Some(m) = s.message().await.expect("stream") {
        if let Some(ResponseTypes::Flow(f)) = m.response_types {
            out.push(f.packet_length);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_is_one_timeline() {
    let (r1, r2) = (Arc::new(FlowRing::new(16).expect("ring")), Arc::new(FlowRing::new(16).expect("ring")));
    for t in [1, 3, 5] {
        r1.push(flow("node-1", t * 1_000_000_000, t as u32));
    }
    for t in [2, 4, 6] {
        r2.push(flow("node-2", t * 1_000_000_000, t as u32));
    }
    let mut n1 = Node::start("node-1", r1, "127.0.0.1:0").await;
    let mut n2 = Node::start("node-2", r2, "127.0.0.1:0").await;
    let (mut c, metrics) = relay_with_metrics(&[&n1, &n2]).await;
    let req = |number, first| GetFlowsRequest {
        number,
        first,
        ..Default::default()
    };
    assert_eq!(lengths(&mut c, req(0, false)).await, vec![1, 2, 3, 4, 5, 6]);
    assert_eq!(lengths(&mut c, req(4, false)).await, vec![3, 4, 5, 6]);
    assert_eq!(lengths(&mut c, req(2, true)).await, vec![1, 2]);
    let st = c.server_status(ServerStatusRequest {}).await.expect("status").into_inner();
    assert_eq!((st.num_flows, st.num_connected_nodes, st.num_unavailable_nodes), (6, Some(2), Some(0)));
    // Forwarded flows (6 + 4 + 2) and node states, as Prometheus sees them.
    let text = metrics.render();
    assert!(text.contains(r#"flows_flows_processed_total{verdict="unknown",event_type="unknown"} 12"#), "{text}");
    assert!(text.contains(r#"flows_nodes{state="connected"} 2"#), "{text}");
    n1.stop().await;
    n2.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_merges_in_order_and_reports_nodes() {
    let (r1, r2) = (Arc::new(FlowRing::new(64).expect("ring")), Arc::new(FlowRing::new(64).expect("ring")));
    let mut n1 = Node::start("node-1", r1.clone(), "127.0.0.1:0").await;
    let mut n2 = Node::start("node-2", r2.clone(), "127.0.0.1:0").await;
    let n2_addr = n2.addr.to_string();
    let mut c = relay(&[&n1, &n2]).await;
    let mut s = c
        .get_flows(GetFlowsRequest {
            follow: true,
            ..Default::default()
        })
        .await
        .expect("follow")
        .into_inner();
    // The relay reads both nodes once a marker from each has come through (pushed
    // again until then: the request's own start is not visible from here).
    let mut t_marker = now_ns();
    let mut marked = BTreeSet::new();
    while marked.len() < 2 {
        t_marker = now_ns();
        r1.push(flow("node-1", t_marker, 100));
        r2.push(flow("node-2", t_marker, 200));
        if let Ok(m) = tokio::time::timeout(Duration::from_millis(300), s.message()).await {
            if let Some(ResponseTypes::Flow(f)) = m.expect("stream").expect("open").response_types {
                marked.insert(f.packet_length);
            }
        }
    }
    // node-2's flow arrives first but happened 100 ms after node-1's (both after the
    // markers).
    let t = now_ns().max(t_marker + 200_000_000);
    r2.push(flow("node-2", t, 2));
    tokio::time::sleep(Duration::from_millis(50)).await;
    r1.push(flow("node-1", t - 100_000_000, 1));
    let mut got = Vec::new();
    while got.len() < 2 {
        if let Some(ResponseTypes::Flow(f)) = next(&mut s).await.response_types {
            // Markers still on their way are not the flows under test.
            if f.packet_length < 100 {
                got.push(f.packet_length);
            }
        }
    }
    assert_eq!(got, vec![1, 2], "put in time order within the window");

    // node-2 goes away: the stream says so, and goes on with node-1.
    n2.stop().await;
    let status = loop {
        if let Some(ResponseTypes::NodeStatus(st)) = next(&mut s).await.response_types {
            break st;
        }
    };
    assert_eq!(status.state_change, NodeState::Unavailable as i32);
    r1.push(flow("node-1", now_ns(), 3));
    loop {
        if let Some(ResponseTypes::Flow(f)) = next(&mut s).await.response_types {
            assert_eq!(f.packet_length, 3);
            break;
        }
    }
    // It comes back on the same address: reported, and its new flows (and those it
    // recorded meanwhile) reach the client.
    r2.push(flow("node-2", now_ns(), 4));
    let mut n2b = Node::start("node-2", r2.clone(), &n2_addr).await;

    let back = loop {
        if let Some(ResponseTypes::NodeStatus(st)) = next(&mut s).await.response_types {
            break st;
        }
    };
    assert_eq!(back.state_change, NodeState::Connected as i32);
    loop {
        if let Some(ResponseTypes::Flow(f)) = next(&mut s).await.response_types {
            assert_eq!(f.packet_length, 4, "the flow node-2 recorded while the relay lost it");
            break;
        }
    }
    n1.stop().await;
    n2b.stop().await;
}

fn flow_between(node: &str, at_ns: i128, n: u32, src: &str, dst: &str, verdict: Verdict) -> Entry {
    let Entry::Flow(mut f) = flow(node, at_ns, n) else { unreachable!() };
    f.uuid = format!("{node}-{n}");
    f.verdict = verdict as i32;
    f.ip = Some(Ip {
        source: src.into(),
        destination: dst.into(),
        ip_version: IpVersion::Ipv4 as i32,
    });
    Entry::Flow(f)
}

const CLUSTER: &str = r#"
apiVersion: v1
kind: Node
metadata: { name: node-1 }
spec: { podCIDR: 10.244.1.0/24 }
---
apiVersion: v1
kind: Node
metadata: { name: node-2 }
spec: { podCIDR: 10.244.2.0/24 }
---
apiVersion: apps/v1
kind: ReplicaSet
metadata: { name: api-6b7c, namespace: shop, ownerReferences: [ { apiVersion: apps/v1, kind: Deployment, name: api, uid: d, controller: true } ] }
---
apiVersion: v1
kind: Pod
metadata: { name: api-6b7c-aaaaa, namespace: shop, labels: { app: api }, ownerReferences: [ { apiVersion: apps/v1, kind: ReplicaSet, name: api-6b7c, uid: r, controller: true } ] }
spec: { nodeName: node-1, containers: [ { name: c } ] }
status: { phase: Running, podIP: 10.244.1.10 }
---
apiVersion: v1
kind: Pod
metadata: { name: db-0, namespace: data, labels: { app: db }, ownerReferences: [ { apiVersion: apps/v1, kind: StatefulSet, name: db, uid: s, controller: true } ] }
spec: { nodeName: node-2, containers: [ { name: c } ] }
status: { phase: Running, podIP: 10.244.2.20 }
---
apiVersion: v1
kind: Pod
metadata: { name: web, namespace: shop, labels: { app: web } }
spec: { nodeName: node-2, containers: [ { name: c } ] }
status: { phase: Running, podIP: 10.244.2.30 }
"#;

fn cluster_index() -> SharedIndex {
    let mut idx = ClusterIndex::new(Vec::new());
    for o in manifests::objects("cluster.yaml", CLUSTER).expect("cluster") {
        idx.apply(o);
    }
    Arc::new(RwLock::new(idx))
}

async fn flows(c: &mut ObserverClient<Channel>, req: GetFlowsRequest) -> Vec<Flow> {
    let mut s = c.get_flows(req).await.expect("GetFlows").into_inner();
    let mut out = Vec::new();
    while let Some(m) = s.message().await.expect("stream") {
        if let Some(ResponseTypes::Flow(f)) = m.response_types {
            out.push(f);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn annotation_then_filters_then_counts() {
    let (r1, r2) = (Arc::new(FlowRing::new(64).expect("ring")), Arc::new(FlowRing::new(64).expect("ring")));
    let (api, db, web, world) = ("10.244.1.10", "10.244.2.20", "10.244.2.30", "203.0.113.7");
    let s = 1_000_000_000;
    r1.push(flow_between("node-1", s, 1, api, db, Verdict::Dropped));
    r2.push(flow_between("node-2", 2 * s, 2, web, db, Verdict::Forwarded));
    r1.push(flow_between("node-1", 3 * s, 3, api, world, Verdict::Forwarded));
    r2.push(flow_between("node-2", 4 * s, 4, world, web, Verdict::Dropped));
    r1.push(flow_between("node-1", 5 * s, 5, api, db, Verdict::Dropped));
    r2.push(flow_between("node-2", 6 * s, 6, web, api, Verdict::Forwarded));
    let mut n1 = Node::start("node-1", r1, "127.0.0.1:0").await;
    let mut n2 = Node::start("node-2", r2, "127.0.0.1:0").await;
    let specs = vec![format!("node-1={}", n1.addr), format!("node-2={}", n2.addr)];
    let (mut c, _, _) = relay_with(&specs, Some(cluster_index())).await;

    // Every flow carries both endpoints as the cluster knows them.
    let all = flows(&mut c, GetFlowsRequest::default()).await;
    assert_eq!(all.len(), 6);
    let f = &all[0];
    let (src, dst) = (f.source.clone().expect("source"), f.destination.clone().expect("destination"));
    assert_eq!((src.namespace.as_str(), src.pod_name.as_str(), src.node_name.as_str()), ("shop", "api-6b7c-aaaaa", "node-1"));
    let w: Vec<String> = src.workloads.iter().map(|w| format!("{}/{}", w.kind, w.name)).collect();
    assert_eq!(w, ["ReplicaSet/api-6b7c", "Deployment/api"]);
    assert_eq!((dst.pod_name.as_str(), dst.workloads[0].kind.as_str()), ("db-0", "StatefulSet"));
    assert!(all[2].destination.as_ref().expect("world").is_world);

    // A workload filter the nodes cannot apply, with a count: the count is of matching
    // flows, across both nodes.
    let by_workload = |w: &str, number| GetFlowsRequest {
        number,
        allow_list: vec![FlowFilter { source_workload: vec![w.into()], ..Default::default() }],
        ..Default::default()
    };
    let got: Vec<u32> = flows(&mut c, by_workload("api", 2)).await.iter().map(|f| f.packet_length).collect();
    assert_eq!(got, vec![3, 5], "the last two flows from Deployment api");
    let got: Vec<u32> = flows(&mut c, by_workload("statefulset/db", 0)).await.iter().map(|f| f.packet_length).collect();
    assert!(got.is_empty());
    // Denied flows towards namespace data, minus those from the shop namespace's web pod;
    // a deny on an annotation field is applied after annotation.
    let req = GetFlowsRequest {
        allow_list: vec![FlowFilter { verdict: vec![Verdict::Dropped as i32], ..Default::default() }],
        deny_list: vec![FlowFilter { source_namespace: vec!["shop".into()], ..Default::default() }],
        ..Default::default()
    };
    let got: Vec<u32> = flows(&mut c, req).await.iter().map(|f| f.packet_length).collect();
    assert_eq!(got, vec![4], "only the world's dropped attempt");
    n1.stop().await;
    n2.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_last_n_then_live_with_nodes_joining_and_leaving() {
    let rings: Vec<Arc<FlowRing>> = (0..3).map(|_| Arc::new(FlowRing::new(64).expect("ring"))).collect();
    let t = now_ns() - 5_000_000_000;
    for i in 0..3u32 {
        rings[0].push(flow_between("node-1", t + i as i128 * 1_000_000, 10 + i, "10.0.0.1", "10.0.0.2", Verdict::Forwarded));
        rings[1].push(flow_between("node-2", t + i as i128 * 1_000_000 + 500_000, 20 + i, "10.0.0.1", "10.0.0.2", Verdict::Forwarded));
    }
    let mut n1 = Node::start("node-1", rings[0].clone(), "127.0.0.1:0").await;
    let mut n2 = Node::start("node-2", rings[1].clone(), "127.0.0.1:0").await;
    let mut n3 = Node::start("node-3", rings[2].clone(), "127.0.0.1:0").await;
    let specs = vec![format!("node-1={}", n1.addr), format!("node-2={}", n2.addr)];
    let (mut c, _, set) = relay_with(&specs, None).await;
    let mut s = c
        .get_flows(GetFlowsRequest { follow: true, number: 2, ..Default::default() })
        .await
        .expect("follow")
        .into_inner();
    let mut got = Vec::new();
    while got.len() < 2 {
        if let Some(ResponseTypes::Flow(f)) = next(&mut s).await.response_types {
            got.push(f.packet_length);
        }
    }
    assert_eq!(got, vec![12, 22], "the last two of the cluster, not two per node");
    // Live flows follow, once each.
    rings[0].push(flow_between("node-1", now_ns(), 13, "10.0.0.1", "10.0.0.2", Verdict::Forwarded));
    loop {
        if let Some(ResponseTypes::Flow(f)) = next(&mut s).await.response_types {
            assert_eq!(f.packet_length, 13, "no history flow comes twice");
            break;
        }
    }
    // node-3 joins (as discovery would say), node-1 leaves.
    let mut wanted: std::collections::BTreeMap<String, String> = [
        ("node-2".to_string(), n2.addr.to_string()),
        ("node-3".to_string(), n3.addr.to_string()),
    ]
    .into();
    set.set(&wanted);
    let gone = loop {
        if let Some(ResponseTypes::NodeStatus(st)) = next(&mut s).await.response_types {
            break st;
        }
    };
    assert_eq!((gone.state_change, gone.node_names.clone()), (NodeState::Gone as i32, vec!["node-1".to_string()]));
    // Give node-3's reader time to connect, then its flows come through.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        rings[2].push(flow_between("node-3", now_ns(), 30, "10.0.0.1", "10.0.0.2", Verdict::Forwarded));
        let m = tokio::time::timeout(Duration::from_millis(500), s.message()).await;
        if let Ok(Ok(Some(m))) = m {
            if let Some(ResponseTypes::Flow(f)) = m.response_types {
                assert_eq!(f.node_name, "node-3");
                break;
            }
        }
        assert!(Instant::now() < deadline, "node-3's flows never came");
    }
    wanted.clear();
    set.set(&wanted);
    n1.stop().await;
    n2.stop().await;
    n3.stop().await;
}

#[test]
fn plaintext_on_a_network_address_is_refused_unless_said() {
    let run = |extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_flows-relay"))
            .args(["--peer", "node-1=127.0.0.1:9", "--listen", "[::]:0"])
            .args(extra)
            .output()
            .expect("run flows-relay")
    };
    let out = run(&[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refusing to serve plaintext on [::]:0") && err.contains("--insecure-listen"), "{err}");
    // Said: it gets past the check (and then stops on the next thing this test gives it,
    // a ready file it cannot write).
    let out = run(&["--insecure-listen", "--ready-file", "/nonexistent/dir/ready"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("refusing to serve plaintext"), "{err}");
}

/// A TCP proxy that can freeze: frozen, it keeps every connection open and moves no
/// byte either way, which is what a peer sees of a process stopped with SIGSTOP (its
/// kernel still holds the sockets) or a node whose network went silent.
struct Freezer {
    addr: std::net::SocketAddr,
    frozen: tokio::sync::watch::Sender<bool>,
}

impl Freezer {
    async fn start(upstream: std::net::SocketAddr) -> Freezer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (frozen, watch) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(upstream).await else { continue };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(Freezer::pipe(cr, sw, watch.clone()));
                tokio::spawn(Freezer::pipe(sr, cw, watch.clone()));
            }
        });
        Freezer { addr, frozen }
    }

    async fn pipe(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        mut frozen: tokio::sync::watch::Receiver<bool>,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            // Frozen: neither read nor write, ever again (as a stopped process).
            if *frozen.borrow_and_update() {
                std::future::pending::<()>().await;
            }
            let n = tokio::select! {
                r = from.read(&mut buf) => match r { Ok(0) | Err(_) => return, Ok(n) => n },
                _ = frozen.changed() => continue,
            };
            if *frozen.borrow() || to.write_all(&buf[..n]).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    fn freeze(&self) {
        let _ = self.frozen.send(true);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_node_is_reported_within_seconds_and_blocks_nothing() {
    let (r1, r2) = (Arc::new(FlowRing::new(64).expect("ring")), Arc::new(FlowRing::new(64).expect("ring")));
    let n1 = Node::start("node-1", r1.clone(), "127.0.0.1:0").await;
    let n2 = Node::start("node-2", r2.clone(), "127.0.0.1:0").await;
    let proxy = Freezer::start(n1.addr).await;
    let specs = vec![format!("node-1={}", proxy.addr), format!("node-2={}", n2.addr)];
    let (mut c, _, _) = relay_with(&specs, None).await;
    r1.push(flow("node-1", now_ns(), 1));
    r2.push(flow("node-2", now_ns(), 2));
    let mut follower = c.get_flows(GetFlowsRequest { follow: true, ..Default::default() }).await.expect("follow").into_inner();

    // node-1's probe hangs: its connections stay open, nothing answers.
    proxy.freeze();
    let frozen_at = Instant::now();

    // ServerStatus answers promptly whatever node-1 does, and soon says it is down.
    let unavailable_after = loop {
        let asked = Instant::now();
        let st = tokio::time::timeout(Duration::from_secs(5), c.server_status(ServerStatusRequest {}))
            .await
            .expect("ServerStatus answered within 5 s")
            .expect("status")
            .into_inner();
        if st.unavailable_nodes == ["node-1"] {
            break frozen_at.elapsed();
        }
        assert!(asked.elapsed() < Duration::from_secs(4), "ServerStatus waited on the hung node");
        assert!(frozen_at.elapsed() < Duration::from_secs(10), "node-1 still not unavailable: {st:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    // A history read answers with node-2's flows and says node-1 is unavailable.
    let asked = Instant::now();
    let mut h = c.get_flows(GetFlowsRequest { number: 10, ..Default::default() }).await.expect("history").into_inner();
    let (mut flows, mut said) = (Vec::new(), String::new());
    while let Some(m) = tokio::time::timeout(Duration::from_secs(15), h.message()).await.expect("history ends").expect("history") {
        match m.response_types {
            Some(ResponseTypes::Flow(f)) => flows.push(f.node_name),
            Some(ResponseTypes::NodeStatus(s)) => said.push_str(&s.message),
            _ => {}
        }
    }
    assert_eq!(flows, ["node-2"], "{said}");
    assert!(said.contains("node-1"), "{said}");
    assert!(asked.elapsed() < Duration::from_secs(12), "history waited {:?} on the hung node", asked.elapsed());

    // The follower is told, in-band, within 10 s of the hang.
    let told_after = loop {
        let m = tokio::time::timeout(Duration::from_secs(12), follower.message())
            .await
            .expect("the follower heard of node-1 within 12 s")
            .expect("stream")
            .expect("open");
        if let Some(ResponseTypes::NodeStatus(s)) = m.response_types {
            if s.state_change == NodeState::Unavailable as i32 && s.node_names == ["node-1"] {
                break frozen_at.elapsed();
            }
        }
    };
    assert!(told_after < Duration::from_secs(10), "the follower heard after {told_after:?}");
    // And still gets node-2's new flows.
    r2.push(flow("node-2", now_ns(), 3));
    loop {
        if let Some(ResponseTypes::Flow(f)) = next(&mut follower).await.response_types {
            if f.packet_length == 3 {
                break;
            }
        }
    }
    eprintln!("hung node: ServerStatus said unavailable after {unavailable_after:?}, the follower after {told_after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_past_the_bound_are_refused_and_a_freed_slot_serves_again() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("port");
    let dir = std::env::temp_dir().join(format!("flows-relay-slots-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let ready = dir.join("ready");
    let mut relay = std::process::Command::new(env!("CARGO_BIN_EXE_flows-relay"))
        .args(["--peer", "node-1=127.0.0.1:9", "--listen", &format!("127.0.0.1:{port}"), "--max-streams", "2"])
        .arg("--ready-file")
        .arg(&ready)
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("relay");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ready.exists() {
        assert!(Instant::now() < deadline, "relay not ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut c = ObserverClient::connect(format!("http://127.0.0.1:{port}")).await.expect("connect");
    let follow = || GetFlowsRequest { follow: true, ..Default::default() };
    let a = c.get_flows(follow()).await.expect("first stream").into_inner();
    let _b = c.get_flows(follow()).await.expect("second stream").into_inner();
    let refused = c.get_flows(follow()).await.expect_err("a third stream is past the bound");
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("2 flow streams"), "{refused:?}");
    // A client that goes gives its slot back.
    drop(a);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match c.get_flows(follow()).await {
            Ok(_) => break,
            Err(e) => {
                assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
                assert!(Instant::now() < deadline, "the slot never came back");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    let _ = relay.kill();
    let _ = relay.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Clients are admitted by the name in their certificate, not by any certificate the CA
/// signed: with `--tls-allow-client`, a certificate of the same CA naming someone else
/// is refused with PERMISSION_DENIED, on both the Observer and ServerStatus.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_are_allowed_by_certificate_name() {
    let dir = std::env::temp_dir().join(format!("flows-relay-allow-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let spec = flows_tls::certs::CertSpec { client_name: "alice".into(), ..Default::default() };
    flows_tls::certs::create(&dir, &spec, true).expect("certificates");
    let f = |n: &str| dir.join(n);
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("port");
    let start = |allowed: &str| {
        let ready = dir.join(format!("ready-{allowed}"));
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_flows-relay"))
            .args(["--peer", "node-1=127.0.0.1:9", "--listen", &format!("127.0.0.1:{port}")])
            .arg("--tls-cert").arg(f("relay.crt")).arg("--tls-key").arg(f("relay.key")).arg("--tls-client-ca").arg(f("ca.crt"))
            .args(["--tls-allow-client", allowed])
            .arg("--ready-file").arg(&ready)
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("relay");
        (child, ready)
    };
    let call = || async {
        let tls = flows_tls::ClientTls {
            ca: f("ca.crt"),
            cert: Some(f("client.crt")),
            key: Some(f("client.key")),
            server_name: Some("flows-relay".into()),
        }
        .load()
        .expect("client tls");
        let ep = flows_tls::endpoint(&format!("127.0.0.1:{port}"), Some(&tls)).expect("endpoint");
        let mut c = ObserverClient::new(ep.connect().await.expect("connect"));
        let status = c.server_status(ServerStatusRequest {}).await.map(|_| ());
        let flows = c.get_flows(GetFlowsRequest { number: 1, ..Default::default() }).await.map(|_| ());
        (status, flows)
    };
    for (allowed, admitted) in [("bob", false), ("alice", true)] {
        let (mut relay, ready) = start(allowed);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ready.exists() {
            assert!(Instant::now() < deadline, "relay not ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (status, flows) = call().await;
        if admitted {
            assert!(status.is_ok() && flows.is_ok(), "alice allowed: {status:?} {flows:?}");
        } else {
            for r in [status, flows] {
                let e = r.expect_err("alice is not bob");
                assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
                assert!(e.message().contains("alice"), "{e:?}");
            }
        }
        let _ = relay.kill();
        let _ = relay.wait();
    }
    let _ = std::fs::remove_dir_all(&dir);
}


/// node-2's clock is 5 s behind the relay's and node-1's. A follower without history
/// gets node-2's flows made after it asked; one with history gets what node-2 made
/// after the history was read, once, and nothing from the history twice. (Starting
/// each node at one relay time, node-2's next 5 s of flows were below it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_clock_is_5_s_behind_loses_nothing_to_followers() {
    const BEHIND: i128 = 5_000_000_000;
    let (r1, r2) = (Arc::new(FlowRing::new(1024).expect("ring")), Arc::new(FlowRing::new(1024).expect("ring")));
    let n1 = Node::start("node-1", r1.clone(), "127.0.0.1:0").await;
    let n2 = Node::start_behind("node-2", r2.clone(), "127.0.0.1:0", BEHIND as i64).await;
    let mut c = relay(&[&n1, &n2]).await;
    let flows = |m: flows_proto::GetFlowsResponse| match m.response_types {
        Some(ResponseTypes::Flow(f)) => Some((f.node_name, f.packet_length)),
        _ => None,
    };
    // History: one flow on each node, from a second before the request (an offset
    // measured over a round trip is good to a fraction of it, not to the nanosecond).
    r1.push(flow("node-1", now_ns() - 1_000_000_000, 1));
    r2.push(flow("node-2", now_ns() - BEHIND - 1_000_000_000, 2));
    let mut plain = c.get_flows(GetFlowsRequest { follow: true, ..Default::default() }).await.expect("follow").into_inner();
    let since = Some(flows_proto::timestamp_from_nanos((now_ns() - 60_000_000_000) as i64));
    let mut hist = c.get_flows(GetFlowsRequest { follow: true, since, ..Default::default() }).await.expect("follow").into_inner();
    let mut got = BTreeSet::new();
    while got.len() < 2 {
        if let Some(f) = flows(next(&mut hist).await) {
            assert!(got.insert(f.clone()), "{f:?} twice");
        }
    }
    // Made after both requests (the history part is sent once read): node-2's stamp
    // is 5 s behind the time the relay asked at.
    r2.push(flow("node-2", now_ns() - BEHIND, 3));
    // Then a marker on the right clock: once it is there, everything before it is.
    r1.push(flow("node-1", now_ns(), 4));
    for (what, s, before) in [("with history", &mut hist, got.len()), ("without", &mut plain, 0)] {
        let mut seen = Vec::new();
        while !seen.contains(&("node-1".to_string(), 4)) {
            if let Some(f) = flows(next(s).await) {
                seen.push(f);
            }
        }
        let late = seen.iter().filter(|f| f.1 == 3).count();
        assert_eq!(late, 1, "{what}: node-2's flow made after the request, once: {seen:?}");
        assert!(seen.iter().all(|f| f.1 >= 3), "{what}: nothing from the history again: {seen:?} (history had {before})");
    }
    drop((n1, n2));
}
