//! The flow source against a real gRPC server on loopback: flows and the server's node
//! counts reach the state; the server going away shows as disconnected with a retry;
//! the server back on the same address is reconnected without a restart.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use flows_proto::{
    Flow, GetFlowsRequest, GetFlowsResponse, ServerStatusRequest, ServerStatusResponse, Timestamp, Verdict,
    get_flows_response::ResponseTypes,
    observer_server::{Observer, ObserverServer},
};
use flows_tui::{
    Source,
    source::feed,
    state::{App, Connection},
};
use tonic::{Request, Response, Status};

/// Sends `n` flows numbered from `from`, then keeps the stream open.
struct Fixed {
    from: u64,
    n: u64,
}

type FlowStream = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<GetFlowsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Observer for Fixed {
    type GetFlowsStream = FlowStream;

    async fn get_flows(&self, _r: Request<GetFlowsRequest>) -> Result<Response<FlowStream>, Status> {
        let flows: Vec<Result<GetFlowsResponse, Status>> = (self.from..self.from + self.n)
            .map(|i| {
                let f = Flow {
                    time: Some(Timestamp { seconds: i as i64, nanos: 0 }),
                    uuid: format!("f{i}"),
                    verdict: Verdict::Forwarded as i32,
                    ..Default::default()
                };
                Ok(GetFlowsResponse { time: f.time, node_name: String::new(), response_types: Some(ResponseTypes::Flow(f)) })
            })
            .collect();
        let s = tokio_stream::StreamExt::chain(tokio_stream::iter(flows), tokio_stream::pending());
        Ok(Response::new(Box::pin(s)))
    }

    async fn server_status(&self, _r: Request<ServerStatusRequest>) -> Result<Response<ServerStatusResponse>, Status> {
        Ok(Response::new(ServerStatusResponse {
            num_connected_nodes: Some(3),
            num_unavailable_nodes: Some(1),
            unavailable_nodes: vec!["node-4".into()],
            ..Default::default()
        }))
    }
}

/// Serves on its own runtime; sending on the returned channel drops that runtime with
/// every connection, as a crashed server would.
async fn serve(addr: SocketAddr, svc: Fixed) -> std::sync::mpsc::Sender<()> {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
        rt.spawn(async move {
            let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
            let _ = ready_tx.send(());
            let _ = tonic::transport::Server::builder()
                .add_service(ObserverServer::new(svc))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await;
        });
        let _ = rx.recv();
        rt.shutdown_background();
    });
    let _ = ready_rx.await;
    tx
}

async fn until(app: &Arc<Mutex<App>>, what: &str, want: impl Fn(&App) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        {
            let a = app.lock().expect("state");
            if want(&a) {
                return;
            }
            assert!(Instant::now() < deadline, "{what}: connection {:?}, {} flows", a.connection, a.recent.len());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_loses_and_finds_the_server_again() {
    let addr: SocketAddr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("port");
        l.local_addr().expect("addr")
    };
    let stop = serve(addr, Fixed { from: 0, n: 10 }).await;
    let app = Arc::new(Mutex::new(App::new(addr.to_string())));
    let task = tokio::spawn(feed(
        Source::Server { addr: addr.to_string(), dialer: flows_tls::Dialer::plaintext(), request: GetFlowsRequest { number: 10, follow: true, ..Default::default() } },
        app.clone(),
    ));
    until(&app, "connected with 10 flows", |a| a.connection == Connection::Connected && a.recent.len() == 10).await;
    until(&app, "node counts from the status", |a| a.connected_nodes() == 3 && a.nodes_unavailable == ["node-4"]).await;

    // The server goes away: shown as disconnected, with the retry's delay.
    let _ = stop.send(());
    until(&app, "disconnected", |a| matches!(a.connection, Connection::Disconnected { retry_in_ms, .. } if retry_in_ms > 0)).await;
    // Kept while disconnected.
    assert_eq!(app.lock().expect("state").recent.len(), 10);

    // A retry fails while it is away (the delay doubles), then it comes back on the same
    // address: reconnected, new flows arrive.
    let first = match &app.lock().expect("state").connection {
        Connection::Disconnected { retry_in_ms, .. } => *retry_in_ms,
        other => panic!("not disconnected: {other:?}"),
    };
    until(&app, "a retry failed", |a| matches!(a.connection, Connection::Disconnected { retry_in_ms, .. } if retry_in_ms > first)).await;
    let _stop = serve(addr, Fixed { from: 10, n: 5 }).await;
    until(&app, "reconnected with the new flows", |a| a.connection == Connection::Connected && a.recent.len() == 15).await;
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_a_file_at_its_rate() {
    let path = std::env::temp_dir().join(format!("flows-tui-replay-{}.json", std::process::id()));
    let mut text = String::new();
    for i in 0..500 {
        text.push_str(&format!("{{\"flow\":{{\"time\":\"2026-11-22T10:00:{:02}Z\",\"uuid\":\"r{i}\",\"verdict\":\"VERDICT_DROPPED\"}}}}\n", i % 60));
    }
    text.push_str("not json\n");
    std::fs::write(&path, text).expect("write");
    let app = Arc::new(Mutex::new(App::new("file")));
    let t = Instant::now();
    feed(Source::File { path: path.clone(), rate: 1_000 }, app.clone()).await;
    let took = t.elapsed();
    let a = app.lock().expect("state");
    assert_eq!(a.recent.len(), 500, "every flow; the bad line skipped");
    assert_eq!(a.connection, Connection::Ended);
    // 500 flows at 1,000 a second: about half a second, paced (not read at once).
    assert!(took >= Duration::from_millis(400), "{took:?}");
    let _ = std::fs::remove_file(path);
}
