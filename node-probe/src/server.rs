//! The Observer gRPC service over the flow ring.

use std::{pin::Pin, sync::Arc, time::Instant};

use flows_proto::{
    GetFlowsRequest, GetFlowsResponse, LostCount, LostEvent, LostEventSource,
    ServerStatusRequest, ServerStatusResponse, get_flows_response::ResponseTypes,
    observer_server::Observer,
};
use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use flows_flow::{
    FilterSet,
    request::{self, Window},
};
use flows_proto::{Timestamp, timestamp_nanos};

use crate::{
    ring::{Entry, FlowRing, Read},
    stats::ProbeStats,
};

/// Largest gRPC request the Observer API decodes: a GetFlowsRequest is a few filters,
/// so anything near this is hostile or a mistake and is refused (OUT_OF_RANGE).
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// Responses buffered per client before the sending task waits for the client. While it
/// waits it falls behind in the ring and is told so with a LostEvent.
const CLIENT_BUFFER: usize = 1024;

pub struct ObserverService {
    pub ring: Arc<FlowRing>,
    pub stats: Arc<ProbeStats>,
    pub node_name: String,
    pub started: Instant,
    pub metrics: Arc<flows_metrics::Metrics>,
    /// Becomes true when the server shuts down: following streams end then, or the
    /// server's graceful shutdown would wait for them forever.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    /// GetFlows streams served at once.
    pub streams: flows_tls::serving::StreamSlots,
}

/// Whether an entry is inside the request's window (one without a time: always).
fn in_window(w: &Window, e: &Entry) -> bool {
    e.time().is_none_or(|t| w.contains(timestamp_nanos(t)))
}

fn past_window(w: &Window, e: &Entry) -> bool {
    e.time().is_some_and(|t| w.is_past(timestamp_nanos(t)))
}

fn validate(req: &GetFlowsRequest) -> Result<(Window, FilterSet), Status> {
    // Built once per request; a bad request is the client's error, named.
    let v = request::validate(req).map_err(|e| Status::invalid_argument(e.to_string()))?;
    Ok((v.window, v.filters))
}

/// Whether an entry goes to the client: flows by the filters, losses always (they are
/// what makes a gap visible).
fn wanted(e: &Entry, w: &Window, filters: &FilterSet) -> bool {
    in_window(w, e)
        && match e {
            Entry::Flow(f) => filters.matches(f),
            Entry::Lost(..) => true,
        }
}

/// The history part of a request: (entries to send, sequence to follow from).
fn history(
    ring: &FlowRing,
    req: &GetFlowsRequest,
    w: Window,
    filters: &FilterSet,
) -> (Vec<Arc<Entry>>, u64) {
    let (oldest, next) = ring.bounds();
    let n = req.number as usize;
    let mut out = Vec::new();
    if req.first {
        let mut seq = oldest;
        while seq < next && (n == 0 || count_flows(&out) < n) {
            if let Read::Entry(e) = ring.read(seq) {
                if wanted(&e, &w, filters) {
                    out.push(e);
                }
            }
            seq += 1;
        }
    } else if n == 0 && req.follow && req.since.is_none() {
        // Only new flows. (With `since`, what the ring holds from then on comes first.)
    } else {
        // The last n (all when n == 0), collected backwards then put in order.
        let mut seq = next;
        while seq > oldest && (n == 0 || count_flows(&out) < n) {
            seq -= 1;
            match ring.read(seq) {
                Read::Entry(e) if wanted(&e, &w, filters) => out.push(e),
                Read::Lost { .. } => break,
                _ => {}
            }
        }
        out.reverse();
    }
    (out, next)
}

fn count_flows(v: &[Arc<Entry>]) -> usize {
    v.iter().filter(|e| matches!(***e, Entry::Flow(_))).count()
}

fn response(node: &str, e: &Entry) -> GetFlowsResponse {
    match e {
        Entry::Flow(f) => GetFlowsResponse {
            time: f.time,
            node_name: f.node_name.clone(),
            response_types: Some(ResponseTypes::Flow(f.clone())),
        },
        Entry::Lost(l, t) => GetFlowsResponse {
            time: Some(*t),
            node_name: node.to_string(),
            response_types: Some(ResponseTypes::LostEvents(*l)),
        },
    }
}

fn now_ts() -> Timestamp {
    flows_proto::timestamp_now()
}

impl ObserverService {
    /// The gRPC service with the probe's request limits: what the probe serves, and
    /// what tests serve.
    pub fn into_server(self) -> flows_proto::observer_server::ObserverServer<Self> {
        flows_proto::observer_server::ObserverServer::new(self)
            .max_decoding_message_size(MAX_REQUEST_BYTES)
    }
}

#[tonic::async_trait]
impl Observer for ObserverService {
    type GetFlowsStream =
        Pin<Box<dyn Stream<Item = Result<GetFlowsResponse, Status>> + Send + 'static>>;

    async fn get_flows(
        &self,
        request: Request<GetFlowsRequest>,
    ) -> Result<Response<Self::GetFlowsStream>, Status> {
        let req = request.into_inner();
        let (window, filters) = validate(&req)?;
        let slot = self.streams.take()?;
        let ring = self.ring.clone();
        let node = self.node_name.clone();
        let metrics = self.metrics.clone();
        let mut shutdown = self.shutdown.clone();
        let (tx, rx) = mpsc::channel(CLIENT_BUFFER);
        let mut written = ring.subscribe();
        let (past, mut cursor) = history(&ring, &req, window, &filters);
        tokio::spawn(async move {
            for e in past {
                if tx.send(Ok(response(&node, &e))).await.is_err() {
                    return;
                }
            }
            if !req.follow {
                return;
            }
            loop {
                match ring.read(cursor) {
                    Read::Entry(e) => {
                        cursor += 1;
                        if past_window(&window, &e) {
                            return;
                        }
                        if wanted(&e, &window, &filters)
                            && tx.send(Ok(response(&node, &e))).await.is_err()
                        {
                            return;
                        }
                    }
                    Read::Lost { lost, resume } => {
                        cursor = resume;
                        metrics.lost(LostEventSource::FlowRingBuffer, lost);
                        let ev = LostEvent {
                            source: LostEventSource::FlowRingBuffer as i32,
                            num_events_lost: lost,
                            cpu: None,
                        };
                        if tx
                            .send(Ok(response(&node, &Entry::Lost(ev, now_ts()))))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    Read::NotYet => {
                        if *shutdown.borrow() {
                            return;
                        }
                        tokio::select! {
                            changed = written.changed() => if changed.is_err() { return },
                            _ = tx.closed() => return,
                            _ = shutdown.changed() => return,
                        }
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(flows_tls::serving::Slotted::new(ReceiverStream::new(rx), slot))))
    }

    async fn server_status(
        &self,
        _request: Request<ServerStatusRequest>,
    ) -> Result<Response<ServerStatusResponse>, Status> {
        let (oldest, next) = self.ring.bounds();
        let snap = self.stats.snapshot();
        Ok(Response::new(ServerStatusResponse {
            num_flows: next - oldest,
            max_flows: self.ring.capacity(),
            seen_flows: snap.seen_flows,
            uptime_ns: self.started.elapsed().as_nanos() as u64,
            lost: vec![
                LostCount {
                    source: LostEventSource::KernelRingBuffer as i32,
                    count: snap.lost_kernel,
                },
                LostCount {
                    source: LostEventSource::DecoderQueue as i32,
                    count: snap.decode_errors,
                },
            ],
            num_connected_nodes: None,
            num_unavailable_nodes: None,
            unavailable_nodes: vec![],
            version: env!("CARGO_PKG_VERSION").to_string(),
            datapath_counters: snap.datapath.into_iter().collect(),
            node_name: self.node_name.clone(),
            policy_reads: snap.policy_reads,
            policy_revision: snap.policy_revision,
            store: None,
            time: Some(flows_proto::timestamp_now()),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flows_proto::Timestamp;
    use flows_proto::Flow;

    fn ring_with(n: u32) -> FlowRing {
        let r = FlowRing::new(8).expect("ring");
        for i in 0..n {
            r.push(Entry::Flow(Flow {
                packet_length: i,
                time: Some(Timestamp {
                    seconds: 100 + i as i64,
                    nanos: 0,
                }),
                ..Default::default()
            }));
        }
        r
    }

    fn lens(v: &[Arc<Entry>]) -> Vec<u32> {
        v.iter()
            .map(|e| match &**e {
                Entry::Flow(f) => f.packet_length,
                Entry::Lost(..) => u32::MAX,
            })
            .collect()
    }

    #[test]
    fn last_first_and_windows() {
        let r = ring_with(12); // holds 4..12
        let req = |number, first, follow| GetFlowsRequest {
            number,
            first,
            follow,
            ..Default::default()
        };
        let w = Window::default();
        let f = FilterSet::default();
        assert_eq!(lens(&history(&r, &req(3, false, false), w, &f).0), vec![9, 10, 11]);
        assert_eq!(lens(&history(&r, &req(2, true, false), w, &f).0), vec![4, 5]);
        assert_eq!(history(&r, &req(0, false, false), w, &f).0.len(), 8);
        let (h, cursor) = history(&r, &req(0, false, true), w, &f);
        assert!(h.is_empty());
        assert_eq!(cursor, 12);
        // Follow with `since`: the ring's flows from then, then new ones.
        let since_follow = GetFlowsRequest {
            follow: true,
            since: Some(Timestamp { seconds: 110, nanos: 0 }),
            ..Default::default()
        };
        assert_eq!(lens(&history(&r, &since_follow, Window { since: Some(110_000_000_000), until: None }, &f).0), vec![10, 11]);
        let win = Window {
            since: Some(106_000_000_000),
            until: Some(109_000_000_000),
        };
        assert_eq!(lens(&history(&r, &req(0, false, false), win, &f).0), vec![6, 7, 8]);
    }

    #[test]
    fn rejects_what_it_cannot_do() {
        let bad_filter = GetFlowsRequest {
            allow_list: vec![flows_proto::FlowFilter {
                source_ip: vec!["not-an-ip".into()],
                ..Default::default()
            }],
            ..Default::default()
        };
        let err = validate(&bad_filter).err().expect("refused");
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("source_ip"), "{}", err.message());
        let both = GetFlowsRequest {
            first: true,
            follow: true,
            ..Default::default()
        };
        assert_eq!(
            validate(&both).err().map(|s| s.code()),
            Some(tonic::Code::InvalidArgument)
        );
        let inverted = GetFlowsRequest {
            since: Some(Timestamp { seconds: 10, nanos: 0 }),
            until: Some(Timestamp { seconds: 5, nanos: 0 }),
            ..Default::default()
        };
        assert!(validate(&inverted).is_err());
    }
}
