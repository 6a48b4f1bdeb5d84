//! The relay against two real node-probe Observer servers on loopback: history merged in
//! time order with one count, a live merge that puts a late-arriving earlier flow first,
//! and a node that goes away and comes back, reported in-band.

use std::{sync::Arc, time::Duration, time::Instant};

use flows_node_probe::{
    metrics::Metrics,
    ring::{Entry, FlowRing},
    server::ObserverService,
    stats::ProbeStats,
};
use flows_proto::{
    Flow, GetFlowsRequest, NodeState, ServerStatusRequest, Timestamp,
    get_flows_response::ResponseTypes, observer_client::ObserverClient,
    observer_server::ObserverServer,
};
use flows_relay::{peers, server::RelayService};
use tokio::sync::oneshot;
use tonic::transport::Channel;

struct Node {
    addr: std::net::SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    streams: tokio::sync::watch::Sender<bool>,
    done: Option<tokio::task::JoinHandle<()>>,
}

impl Node {
    async fn start(name: &str, ring: Arc<FlowRing>, addr: &str) -> Node {
        let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (streams, shutdown) = tokio::sync::watch::channel(false);
        let svc = ObserverService {
            ring,
            stats: Arc::new(ProbeStats::default()),
            node_name: name.into(),
            started: Instant::now(),
            metrics: Arc::new(Metrics::new()),
            shutdown,
        };
        let (tx, rx) = oneshot::channel::<()>();
        let done = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(ObserverServer::new(svc))
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
    let metrics = Arc::new(Metrics::new());
    let ps: Vec<_> = nodes
        .iter()
        .map(|n| {
            peers::spawn(
                &n.addr.to_string(),
                peers::Backoff {
                    initial: Duration::from_millis(50),
                    max: Duration::from_millis(200),
                },
            )
        })
        .collect();
    let svc = RelayService {
        peers: ps,
        metrics: metrics.clone(),
        sort_window: Duration::from_millis(300),
        sort_buffer: 1000,
        started: Instant::now(),
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
        if s.num_connected_nodes == Some(nodes.len() as u32) {
            break;
        }
        assert!(Instant::now() < deadline, "relay did not connect: {s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (c, metrics)
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
    tokio::time::sleep(Duration::from_millis(200)).await;
    // node-2's flow arrives first but happened 100 ms after node-1's.
    let t = now_ns();
    r2.push(flow("node-2", t, 2));
    tokio::time::sleep(Duration::from_millis(50)).await;
    r1.push(flow("node-1", t - 100_000_000, 1));
    let mut got = Vec::new();
    while got.len() < 2 {
        if let Some(ResponseTypes::Flow(f)) = next(&mut s).await.response_types {
            got.push(f.packet_length);
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
