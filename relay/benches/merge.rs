//! Relay throughput: recorded flows from 2 and 8 node-probe servers (real gRPC on
//! loopback), merged in time order and annotated from a 4,000-pod cluster index.
//! - History: the recorded flows read through the relay, against the same flows read
//!   directly from the same servers, concurrently, with no merge and no annotation.
//! - Live: every node records new flows as fast as it can while a follower reads them
//!   through the relay, against the same recording followed directly from every server.
//!   Flows delivered and flows counted lost are told apart: only delivered ones count.
//! Run: `cargo bench -p flows-relay --bench merge`.

use std::{
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use flows_k8s::{ClusterIndex, manifests, watch::SharedIndex};
use flows_node_probe::{
    metrics::Metrics,
    ring::{Entry, FlowRing},
    server::ObserverService,
    stats::ProbeStats,
};
use flows_proto::{
    Flow, GetFlowsRequest, Ip, IpVersion, Layer4, ServerStatusRequest, Tcp, Timestamp, Verdict,
    get_flows_response::ResponseTypes, layer4, observer_client::ObserverClient,
    observer_server::ObserverServer,
};
use flows_relay::{
    peers::{Backoff, PeerSet},
    server::RelayService,
    stream::Merger,
};

const PODS: usize = 4_000;
const PER_NODE: usize = 50_000;

fn pod_ip(i: usize) -> String {
    format!("10.244.{}.{}", i / 250, i % 250 + 2)
}

fn cluster() -> SharedIndex {
    let mut text = String::new();
    for i in 0..PODS {
        text.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{ name: app{}-{i}, namespace: ns{}, labels: {{ app: app{}, tier: t{} }}, \
             ownerReferences: [ {{ apiVersion: apps/v1, kind: ReplicaSet, name: app{}-5f6d, uid: u, controller: true }} ] }}\n\
             spec: {{ nodeName: node-{}, containers: [ {{ name: c }} ] }}\nstatus: {{ phase: Running, podIP: {} }}\n",
            i % 200,
            i % 20,
            i % 200,
            i % 3,
            i % 200,
            i % 8,
            pod_ip(i)
        ));
    }
    let mut idx = ClusterIndex::new(Vec::new());
    for o in manifests::objects("bench.yaml", &text).expect("cluster") {
        idx.apply(o);
    }
    Arc::new(RwLock::new(idx))
}

fn recorded(node: usize, n: usize, t0: i128) -> Vec<Entry> {
    (0..n)
        .map(|i| {
            // Nodes interleave in time, 1 µs apart.
            let at = t0 + (i as i128 * 8 + node as i128) * 1_000;
            Entry::Flow(Flow {
                time: Some(Timestamp {
                    seconds: at.div_euclid(1_000_000_000) as i64,
                    nanos: at.rem_euclid(1_000_000_000) as i32,
                }),
                uuid: format!("{node}-{i}"),
                node_name: format!("node-{node}"),
                verdict: if i % 10 == 0 { Verdict::Dropped } else { Verdict::Forwarded } as i32,
                ip: Some(Ip {
                    source: pod_ip((i * 7 + node) % PODS),
                    destination: pod_ip((i * 13 + 1) % PODS),
                    ip_version: IpVersion::Ipv4 as i32,
                }),
                l4: Some(Layer4 {
                    protocol: Some(layer4::Protocol::Tcp(Tcp {
                        source_port: 30_000 + (i % 30_000) as u32,
                        destination_port: 8080,
                        flags: None,
                    })),
                }),
                ..Default::default()
            })
        })
        .collect()
}

async fn node(name: String, ring: Arc<FlowRing>) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (_keep, shutdown) = tokio::sync::watch::channel(false);
    let svc = ObserverService {
        ring,
        stats: Arc::new(ProbeStats::default()),
        node_name: name,
        streams: flows_tls::serving::StreamSlots::new(64),
        started: Instant::now(),
        metrics: Arc::new(Metrics::new()),
        shutdown,
    };
    tokio::spawn(async move {
        let _keep = _keep;
        let _ = tonic::transport::Server::builder()
            .add_service(ObserverServer::new(svc))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await;
    });
    addr
}

async fn count(client: &mut ObserverClient<tonic::transport::Channel>, req: GetFlowsRequest, want: usize) -> usize {
    let mut s = client.get_flows(req).await.expect("GetFlows").into_inner();
    let mut n = 0;
    while let Some(m) = s.message().await.expect("stream") {
        if let Some(ResponseTypes::Flow(_)) = m.response_types {
            n += 1;
            if n == want {
                break;
            }
        }
    }
    n
}

async fn run(peers: usize, index: Option<SharedIndex>) {
    let t0 = 1_700_000_000_000_000_000i128;
    let (mut addrs, mut rings) = (Vec::new(), Vec::new());
    for p in 0..peers {
        let ring = Arc::new(FlowRing::new(65_536).expect("ring"));
        for e in recorded(p, PER_NODE, t0) {
            ring.push(e);
        }
        addrs.push(node(format!("node-{p}"), ring.clone()).await);
        rings.push(ring);
    }
    let total = peers * PER_NODE;

    // Baseline: the same flows straight from every server at once.
    let t = Instant::now();
    let reads = addrs.iter().map(|a| async move {
        let mut c = ObserverClient::connect(format!("http://{a}")).await.expect("connect");
        c = c.max_decoding_message_size(64 << 20);
        count(&mut c, GetFlowsRequest::default(), PER_NODE).await
    });
    let direct: usize = futures::future::join_all(reads).await.into_iter().sum();
    let base = t.elapsed();
    assert_eq!(direct, total);

    let specs: Vec<String> = addrs.iter().enumerate().map(|(i, a)| format!("node-{i}={a}")).collect();
    let set = PeerSet::fixed(&specs, Backoff::default());
    let svc = RelayService {
        merger: Arc::new(Merger {
            peers: set,
            index: index.clone(),
            metrics: Arc::new(Metrics::new()),
            sort_window: Duration::from_millis(300),
            sort_buffer: 10_000,
            store: None,
        }),
        started: Instant::now(),
        streams: flows_tls::serving::StreamSlots::new(64),
        sink: None,
        shutdown: None,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let raddr = listener.local_addr().expect("addr");
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ObserverServer::new(svc))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let mut c = ObserverClient::connect(format!("http://{raddr}")).await.expect("connect relay");
    loop {
        let s = c.server_status(ServerStatusRequest {}).await.expect("status").into_inner();
        if s.num_connected_nodes == Some(peers as u32) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let t = Instant::now();
    let got = count(&mut c, GetFlowsRequest::default(), total).await;
    let history = t.elapsed();
    assert_eq!(got, total);

    let (direct_live, _) = live(&rings, direct_followers(&addrs).await).await;
    let (relay_live, lost) = live(&rings, vec![(c.get_flows(follow()).await.expect("follow").into_inner(), peers)]).await;

    let rate = |n: usize, d: Duration| n as f64 / d.as_secs_f64();
    let what = if index.is_some() { "merge + annotate" } else { "merge only" };
    println!(
        "{what}: {peers} peers, {total} flows: history direct (baseline) {:>9.0} flows/s, relay {:>9.0} flows/s = {:.2}x the baseline's time",
        rate(total, base),
        rate(total, history),
        history.as_secs_f64() / base.as_secs_f64(),
    );
    println!(
        "{what}: {peers} peers, live: followed directly (baseline) {:>9.0} flows/s delivered, through the relay {:>9.0} flows/s delivered = {:.2}x the baseline's rate ({lost} counted lost)",
        direct_live,
        relay_live,
        relay_live / direct_live,
    );
}

fn follow() -> GetFlowsRequest {
    GetFlowsRequest { follow: true, ..Default::default() }
}

type Stream = tonic::Streaming<flows_proto::GetFlowsResponse>;

/// One follower per server, each expecting that server's flows.
async fn direct_followers(addrs: &[std::net::SocketAddr]) -> Vec<(Stream, usize)> {
    let mut out = Vec::new();
    for a in addrs {
        let mut c = ObserverClient::connect(format!("http://{a}")).await.expect("connect");
        out.push((c.get_flows(follow()).await.expect("follow").into_inner(), 1));
    }
    out
}

/// The ring names every flow it records, so the marker is told by its traffic: a port
/// no recorded flow uses.
const MARKER_PORT: u32 = 1;

fn marker() -> Flow {
    Flow {
        time: Some(flows_proto::timestamp_now()),
        l4: Some(Layer4 {
            protocol: Some(layer4::Protocol::Tcp(Tcp { source_port: MARKER_PORT, destination_port: MARKER_PORT, flags: None })),
        }),
        ..Default::default()
    }
}

fn is_marker(f: &Flow) -> bool {
    matches!(&f.l4, Some(Layer4 { protocol: Some(layer4::Protocol::Tcp(t)) }) if t.source_port == MARKER_PORT)
}

/// Every node records [`PER_NODE`] new flows as fast as it can, stamped as they are
/// recorded, while `followers` read them (each expecting flows from `nodes` nodes).
/// Timing starts once each follower has received a marker from each of its nodes, so
/// no follower is still attaching. Returns flows/s delivered to all followers (lost
/// ones not counted), and the number counted lost.
async fn live(rings: &[Arc<FlowRing>], followers: Vec<(Stream, usize)>) -> (f64, u64) {
    for ring in rings {
        ring.push(Entry::Flow(marker()));
    }
    let mut ready = Vec::new();
    for (mut s, nodes) in followers {
        let mut markers = 0;
        while markers < nodes {
            let m = tokio::time::timeout(Duration::from_secs(10), s.message()).await;
            match m {
                Ok(Ok(Some(m))) => match m.response_types {
                    Some(ResponseTypes::Flow(f)) if is_marker(&f) => markers += 1,
                    _ => {}
                },
                other => panic!("no marker on a follower: {other:?}"),
            }
        }
        ready.push((s, nodes * PER_NODE));
    }
    let t = Instant::now();
    let producers: Vec<_> = rings
        .iter()
        .enumerate()
        .map(|(p, ring)| {
            let ring = ring.clone();
            std::thread::spawn(move || {
                for e in recorded(p, PER_NODE, 0) {
                    let Entry::Flow(mut f) = e else { continue };
                    f.time = Some(flows_proto::timestamp_now());
                    ring.push(Entry::Flow(f));
                }
            })
        })
        .collect();
    let readers = ready.into_iter().map(|(mut s, want)| async move {
        let (mut delivered, mut lost) = (0usize, 0u64);
        while delivered + (lost as usize) < want {
            match tokio::time::timeout(Duration::from_secs(10), s.message()).await {
                Ok(Ok(Some(m))) => match m.response_types {
                    Some(ResponseTypes::Flow(_)) => delivered += 1,
                    Some(ResponseTypes::LostEvents(l)) => lost += l.num_events_lost,
                    _ => {}
                },
                _ => break,
            }
        }
        assert_eq!(delivered + lost as usize, want, "every flow delivered or counted lost");
        (delivered, lost)
    });
    let counts = futures::future::join_all(readers).await;
    let took = t.elapsed();
    for p in producers {
        let _ = p.join();
    }
    let delivered: usize = counts.iter().map(|c| c.0).sum();
    let lost: u64 = counts.iter().map(|c| c.1).sum();
    (delivered as f64 / took.as_secs_f64(), lost)
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let index = cluster();
    println!("cluster index: {:?}", index.read().expect("index").sizes());
    rt.block_on(async {
        run(2, None).await;
        run(2, Some(index.clone())).await;
        run(8, None).await;
        run(8, Some(index)).await;
    });
}
