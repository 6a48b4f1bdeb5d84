//! The Observer service over real gRPC on loopback: history requests, follow, and the
//! guarantee that a reader who falls behind is told how many flows it lost.

use std::{sync::Arc, time::Duration, time::Instant};

use flows_node_probe::{
    ring::{Entry, FlowRing},
    server::ObserverService,
    stats::ProbeStats,
};
use flows_proto::{
    Flow, GetFlowsRequest, LostEventSource, ServerStatusRequest, Timestamp,
    get_flows_response::ResponseTypes, observer_client::ObserverClient,

};
use tonic::transport::Channel;

/// A served ring; the server's streams end when the returned sender says so (or drops).
async fn serve(ring: Arc<FlowRing>) -> (ObserverClient<Channel>, tokio::sync::watch::Sender<bool>) {
    let (channel, stop) = serve_channel(ring).await;
    (ObserverClient::new(channel), stop)
}

async fn serve_channel(ring: Arc<FlowRing>) -> (Channel, tokio::sync::watch::Sender<bool>) {
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let svc = ObserverService {
        ring,
        stats: Arc::new(ProbeStats::default()),
        node_name: "node-t".into(),
        streams: flows_tls::serving::StreamSlots::new(64),
        started: Instant::now(),
        metrics: Arc::new(flows_node_probe::metrics::Metrics::new()),
        shutdown,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc.into_server())
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    (channel, stop)
}

fn flow(n: u32) -> Entry {
    Entry::Flow(Flow {
        packet_length: n,
        time: Some(Timestamp {
            seconds: 1_000 + n as i64,
            nanos: 0,
        }),
        ..Default::default()
    })
}

async fn lengths(client: &mut ObserverClient<Channel>, req: GetFlowsRequest) -> Vec<u32> {
    let mut s = client.get_flows(req).await.expect("GetFlows").into_inner();
    let mut out = Vec::new();
    while let Some(m) = s.message().await.expect("stream") {
        if let Some(ResponseTypes::Flow(f)) = m.response_types {
            out.push(f.packet_length);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_requests() {
    let ring = Arc::new(FlowRing::new(8).expect("ring"));
    for i in 0..12 {
        ring.push(flow(i));
    }
    let (mut c, _stop) = serve(ring).await;
    let req = |number, first| GetFlowsRequest {
        number,
        first,
        ..Default::default()
    };
    assert_eq!(lengths(&mut c, req(3, false)).await, vec![9, 10, 11]);
    assert_eq!(lengths(&mut c, req(2, true)).await, vec![4, 5]);
    assert_eq!(lengths(&mut c, req(0, false)).await, (4..12).collect::<Vec<_>>());
    let window = GetFlowsRequest {
        since: Some(Timestamp { seconds: 1_005, nanos: 0 }),
        until: Some(Timestamp { seconds: 1_007, nanos: 0 }),
        ..Default::default()
    };
    assert_eq!(lengths(&mut c, window).await, vec![5, 6]);

    let bad = GetFlowsRequest {
        first: true,
        follow: true,
        ..Default::default()
    };
    let err = c.get_flows(bad).await.err().expect("refused");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    let st = c.server_status(ServerStatusRequest {}).await.expect("status").into_inner();
    assert_eq!((st.num_flows, st.max_flows), (8, 8));
    assert_eq!(st.node_name, "node-t");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_follower_is_told_what_it_lost() {
    let ring = Arc::new(FlowRing::new(16).expect("ring"));
    let (mut c, _stop) = serve(ring.clone()).await;
    let mut stream = c
        .get_flows(GetFlowsRequest {
            follow: true,
            ..Default::default()
        })
        .await
        .expect("GetFlows")
        .into_inner();
    // Far more than the ring, the server's per-client buffer and the HTTP/2 window hold,
    // written while the client reads nothing.
    let n: u64 = 200_000;
    for i in 0..n {
        ring.push(flow(i as u32));
    }
    let (mut delivered, mut lost) = (0u64, 0u64);
    let mut last: Option<u32> = None;
    while delivered + lost < n {
        let m = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("no silence: every flow is delivered or counted")
            .expect("stream")
            .expect("open");
        match m.response_types {
            Some(ResponseTypes::Flow(f)) => {
                assert!(last.is_none_or(|l| f.packet_length > l), "in order, no repeats");
                last = Some(f.packet_length);
                delivered += 1;
            }
            Some(ResponseTypes::LostEvents(l)) => {
                assert_eq!(l.source, LostEventSource::FlowRingBuffer as i32);
                lost += l.num_events_lost;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(delivered + lost, n);
    assert!(lost > 0, "the reader was overrun");
    assert_eq!(last, Some(n as u32 - 1), "the newest flow arrives");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_apply_on_the_server_to_history_and_follow() {
    use flows_proto::{Endpoint, FlowFilter, Verdict};
    let ring = Arc::new(FlowRing::new(64).expect("ring"));
    let mk = |n: u32, ns: &str, verdict: Verdict| {
        Entry::Flow(Flow {
            packet_length: n,
            verdict: verdict as i32,
            source: Some(Endpoint {
                namespace: ns.into(),
                pod_name: format!("p{n}"),
                ..Default::default()
            }),
            ..Default::default()
        })
    };
    for n in 0..10 {
        let ns = if n % 2 == 0 { "frontend" } else { "backend" };
        let v = if n % 3 == 0 { Verdict::Dropped } else { Verdict::Forwarded };
        ring.push(mk(n, ns, v));
    }
    let (mut c, _stop) = serve(ring.clone()).await;
    let allow = vec![FlowFilter {
        verdict: vec![Verdict::Dropped as i32],
        ..Default::default()
    }];
    let deny = vec![FlowFilter {
        source_namespace: vec!["backend".into()],
        ..Default::default()
    }];
    let req = GetFlowsRequest {
        allow_list: allow.clone(),
        deny_list: deny.clone(),
        ..Default::default()
    };
    // Dropped (0, 3, 6, 9) minus backend (odd): 0 and 6.
    assert_eq!(lengths(&mut c, req).await, vec![0, 6]);

    let mut s = c
        .get_flows(GetFlowsRequest {
            follow: true,
            allow_list: allow,
            deny_list: deny,
            ..Default::default()
        })
        .await
        .expect("follow")
        .into_inner();
    for n in 10..20 {
        let ns = if n % 2 == 0 { "frontend" } else { "backend" };
        let v = if n % 3 == 0 { Verdict::Dropped } else { Verdict::Forwarded };
        ring.push(mk(n, ns, v));
    }
    let mut got = Vec::new();
    while got.len() < 2 {
        let m = tokio::time::timeout(Duration::from_secs(5), s.message())
            .await
            .expect("in time")
            .expect("stream")
            .expect("open");
        if let Some(ResponseTypes::Flow(f)) = m.response_types {
            got.push(f.packet_length);
        }
    }
    // Dropped among 10..20: 12, 15, 18; backend (odd) denied: 12 and 18.
    assert_eq!(got, vec![12, 18]);
}

/// Bytes sent as they are, to put what no client library would send on the wire.
#[derive(Clone, Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }
    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
        bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let n = bytes::Buf::remaining(src);
        Ok(Some(bytes::Buf::copy_to_bytes(src, n).to_vec()))
    }
}

/// Status of a GetFlows call whose request body is `body`, byte for byte.
async fn raw_get_flows(channel: &Channel, body: Vec<u8>) -> tonic::Status {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.expect("ready");
    let path = http::uri::PathAndQuery::from_static("/flows.v1.Observer/GetFlows");
    match grpc.server_streaming(tonic::Request::new(body), path, RawCodec).await {
        Err(s) => s,
        Ok(resp) => {
            let mut s = resp.into_inner();
            match s.message().await {
                Err(st) => st,
                Ok(m) => panic!("garbage was answered with {m:?}"),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversize_requests_get_clear_statuses() {
    use flows_proto::FlowFilter;
    let ring = Arc::new(FlowRing::new(8).expect("ring"));
    ring.push(flow(1));
    let (channel, _stop) = serve_channel(ring).await;
    let mut client = ObserverClient::new(channel.clone());

    // Bad values in a filter: INVALID_ARGUMENT naming the value.
    for (filter, needle) in [
        (FlowFilter { source_ip: vec!["10.0.0.300".into()], ..Default::default() }, "10.0.0.300"),
        (FlowFilter { source_label: vec!["app in (".into()], ..Default::default() }, "app in ("),
        (FlowFilter { destination_port: vec!["70000".into()], ..Default::default() }, "70000"),
    ] {
        let err = client
            .get_flows(GetFlowsRequest { allow_list: vec![filter], ..Default::default() })
            .await
            .expect_err("a bad filter is refused");
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains(needle), "{err:?}");
    }

    // A request past the size limit: OUT_OF_RANGE, before any of it is evaluated.
    let huge = FlowFilter {
        source_ip: vec!["10.0.0.1".into(); 20_000],
        ..Default::default()
    };
    let err = client
        .get_flows(GetFlowsRequest { allow_list: vec![huge], ..Default::default() })
        .await
        .expect_err("oversize is refused");
    assert_eq!(err.code(), tonic::Code::OutOfRange, "{err:?}");
    assert!(err.message().contains("too large"), "{err:?}");

    // Bytes that are no GetFlowsRequest: refused as undecodable.
    let err = raw_get_flows(&channel, vec![0xff, 0xff, 0xff, 0xff, 0x0f, 0x00]).await;
    assert_eq!(err.code(), tonic::Code::Internal, "{err:?}");
    assert!(err.message().contains("decode"), "{err:?}");

    // The server goes on answering well-formed requests.
    assert_eq!(lengths(&mut client, GetFlowsRequest::default()).await, vec![1]);
}
