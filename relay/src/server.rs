//! The relay's Observer service: the node-probes' flows, merged in time order.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    pin::Pin,
    sync::Arc,
    time::Duration,
    time::Instant,
};

use flows_flow::{
    FilterSet,
    enrich::{annotate, node_side},
};
use flows_k8s::watch::SharedIndex;
use flows_store::Store;
use flows_proto::{
    GetFlowsRequest, GetFlowsResponse, LostCount, NodeState, NodeStatusEvent,
    ServerStatusRequest, ServerStatusResponse, Timestamp, get_flows_response::ResponseTypes,
    observer_server::Observer,
};
use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::{
    merge::{Nanos, SortWindow},
    peers::{Peer, PeerSet, PeerState},
};

pub struct RelayService {
    pub peers: Arc<PeerSet>,
    /// Who each address belongs to (Kubernetes watchers or manifests); none: flows go
    /// out as the nodes sent them.
    pub index: Option<SharedIndex>,
    /// Flows and losses forwarded to clients, node states.
    pub metrics: Arc<flows_metrics::Metrics>,
    /// How long a flow waits for earlier flows from other nodes.
    pub sort_window: Duration,
    /// Flows held for sorting at most; beyond, the oldest go out at once.
    pub sort_buffer: usize,
    pub started: Instant,
    /// Flow history: read for requests reaching further back than the nodes' rings, and
    /// the audit; written by [`crate::sink`].
    pub store: Option<Arc<Store>>,
    /// The store writer's counts, for ServerStatus.
    pub sink: Option<Arc<crate::sink::SinkStats>>,
    /// Becomes true when the relay shuts down: clients' follow streams end then (they
    /// reconnect to the next relay), or the graceful shutdown would wait for them
    /// forever. None: streams end only with their clients.
    pub shutdown: Option<tokio::sync::watch::Receiver<bool>>,
}

/// What every reader of one request shares: the full filter, applied after annotation.
struct Pipeline {
    index: Option<SharedIndex>,
    filters: FilterSet,
}

impl Pipeline {
    /// Annotates a flow and says whether the client wants it; other messages pass.
    fn admit(&self, m: &mut GetFlowsResponse) -> bool {
        let Some(ResponseTypes::Flow(f)) = &mut m.response_types else { return true };
        if let Some(idx) = &self.index {
            // A poisoned lock means a panic mid-update; the index is still usable.
            let idx = idx.read().unwrap_or_else(|e| e.into_inner());
            annotate(f, &*idx, &*idx);
        }
        self.filters.matches(f)
    }
}

/// Flows the history part of a follow request already sent, which the live part must not
/// send again: those named, and (after a `last N` cut) everything before the cut.
#[derive(Default)]
struct Sent {
    uuids: HashSet<String>,
    before: Nanos,
}

impl Sent {
    fn skip(&self, m: &GetFlowsResponse) -> bool {
        match &m.response_types {
            Some(ResponseTypes::Flow(f)) => nanos(&f.time) < self.before || self.uuids.contains(&f.uuid),
            _ => false,
        }
    }
}

fn nanos(t: &Option<Timestamp>) -> Nanos {
    t.map(|t| t.seconds as Nanos * 1_000_000_000 + t.nanos as Nanos)
        .unwrap_or(0)
}

fn now_nanos() -> Nanos {
    nanos(&Some(flows_proto::timestamp_now()))
}

fn node_status(state: NodeState, nodes: Vec<String>, message: String) -> GetFlowsResponse {
    GetFlowsResponse {
        time: Some(flows_proto::timestamp_now()),
        node_name: String::new(),
        response_types: Some(ResponseTypes::NodeStatus(NodeStatusEvent {
            state_change: state as i32,
            node_names: nodes,
            message,
        })),
    }
}

enum Merged {
    Item(GetFlowsResponse),
    Status(GetFlowsResponse),
}

/// Reads one peer's stream for a follow request. When the stream breaks it says so
/// in-band, retries with backoff (the channel reconnects underneath), resumes from the
/// last flow it passed on, and says when the node is back.
async fn follow_peer(
    peer: Arc<Peer>,
    req: GetFlowsRequest,
    pipeline: Arc<Pipeline>,
    sent: Arc<Sent>,
    tx: mpsc::Sender<Merged>,
) {
    let mut state = peer.state.clone();
    let mut req = req;
    // Down when the request starts: it was announced then, so announce its return too.
    let mut was_down = peer.client().is_none();
    let mut delay = Duration::from_millis(100);
    let mut last: Option<Timestamp> = None;
    loop {
        let mut client = loop {
            if let Some(c) = peer.client() {
                break c;
            }
            if state.changed().await.is_err() {
                return;
            }
        };
        let opened = client.get_flows(req.clone()).await;
        let why = match opened {
            Ok(resp) => {
                if was_down {
                    was_down = false;
                    let msg = format!("{} is back", peer.name());
                    let ev = node_status(NodeState::Connected, vec![peer.name()], msg);
                    if tx.send(Merged::Status(ev)).await.is_err() {
                        return;
                    }
                }
                delay = Duration::from_millis(100);
                let mut s = resp.into_inner();
                loop {
                    match s.message().await {
                        Ok(Some(mut m)) => {
                            if let Some(ResponseTypes::Flow(f)) = &m.response_types {
                                last = f.time;
                            }
                            if sent.skip(&m) || !pipeline.admit(&mut m) {
                                continue;
                            }
                            if tx.send(Merged::Item(m)).await.is_err() {
                                return;
                            }
                        }
                        Ok(None) => break "stream ended".to_string(),
                        Err(e) => break e.message().to_string(),
                    }
                }
            }
            Err(e) => e.message().to_string(),
        };
        if tx.is_closed() {
            return;
        }
        if !was_down {
            was_down = true;
            let ev = node_status(
                NodeState::Unavailable,
                vec![peer.name()],
                format!("{}: {why}", peer.name()),
            );
            if tx.send(Merged::Status(ev)).await.is_err() {
                return;
            }
        }
        // When it is back: everything it still holds after the last flow passed on.
        req.number = 0;
        req.first = false;
        if let Some(t) = last {
            // One nanosecond after it, carried into the seconds when needed.
            req.since = Some(if t.nanos >= 999_999_999 {
                Timestamp {
                    seconds: t.seconds + 1,
                    nanos: 0,
                }
            } else {
                Timestamp {
                    seconds: t.seconds,
                    nanos: t.nanos + 1,
                }
            });
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = tx.closed() => return,
        }
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

fn unavailable(peers: &[Arc<Peer>]) -> Vec<String> {
    peers
        .iter()
        .filter(|p| p.client().is_none())
        .map(|p| p.name())
        .collect()
}

/// Every connected node's answer to `req`, annotated and filtered, in time order, cut
/// to `number` flows (the first or the last ones). Nodes that fail are reported in-band.
async fn history(
    peers: &[Arc<Peer>],
    req: &GetFlowsRequest,
    pipeline: &Pipeline,
    number: u64,
    first: bool,
) -> Vec<GetFlowsResponse> {
    let mut all = Vec::new();
    let calls = peers.iter().filter_map(|p| p.client()).map(|mut c| {
        let r = req.clone();
        async move {
            let mut out = Vec::new();
            let mut s = c.get_flows(r).await?.into_inner();
            while let Some(m) = s.message().await? {
                out.push(m);
            }
            Ok::<_, Status>(out)
        }
    });
    for r in futures::future::join_all(calls).await {
        match r {
            Ok(v) => all.extend(v.into_iter().filter_map(|mut m| pipeline.admit(&mut m).then_some(m))),
            Err(e) => all.push(node_status(
                NodeState::Error,
                vec![],
                format!("reading a node-probe: {}", e.message()),
            )),
        }
    }
    all.sort_by_key(|m| nanos(&m.time));
    limit(all, number, first)
}

/// Keeps the first or last `number` flows (0: all) of a time-ordered list, and every
/// message that is not a flow.
fn limit(mut all: Vec<GetFlowsResponse>, number: u64, first: bool) -> Vec<GetFlowsResponse> {
    let n = number as usize;
    let is_flow = |m: &GetFlowsResponse| matches!(m.response_types, Some(ResponseTypes::Flow(_)));
    if n > 0 && all.iter().filter(|m| is_flow(m)).count() > n {
        let mut kept = 0;
        let mut keep = |m: &GetFlowsResponse| {
            !is_flow(m) || {
                kept += 1;
                kept <= n
            }
        };
        let marks: Vec<bool> = if first {
            all.iter().map(&mut keep).collect()
        } else {
            let mut v: Vec<bool> = all.iter().rev().map(&mut keep).collect();
            v.reverse();
            v
        };
        all = all.into_iter().zip(marks).filter(|(_, k)| *k).map(|(m, _)| m).collect();
    }
    all
}

/// Adds the store's flows for the same request to what the nodes answered: the store
/// reaches further back than the nodes' rings. Flows both hold are sent once.
async fn with_stored(
    store: &Store,
    mut out: Vec<GetFlowsResponse>,
    req: &GetFlowsRequest,
    until: Option<Timestamp>,
) -> Vec<GetFlowsResponse> {
    let ns = |t: &Option<Timestamp>| t.map(|t| t.seconds.saturating_mul(1_000_000_000).saturating_add(i64::from(t.nanos)));
    let cond = match flows_store::sql::condition(&req.allow_list, &req.deny_list) {
        Ok(c) => format!("{c} AND {}", flows_store::sql::time_range(ns(&req.since), ns(&until))),
        Err(e) => {
            out.push(node_status(NodeState::Error, vec!["store".into()], e.to_string()));
            return out;
        }
    };
    match store.flows(&cond, req.number, !req.first).await {
        Ok(stored) => {
            let seen: HashSet<String> = out
                .iter()
                .filter_map(|m| match &m.response_types {
                    Some(ResponseTypes::Flow(f)) => Some(f.uuid.clone()),
                    _ => None,
                })
                .collect();
            let fresh: Vec<_> = stored.into_iter().filter(|f| !seen.contains(&f.uuid)).collect();
            if !fresh.is_empty() {
                let first = fresh.first().and_then(|f| f.time);
                let msg = format!(
                    "{} flows from the store ({}), which reaches further back than the nodes' rings",
                    fresh.len(),
                    if store.is_embedded() { "embedded" } else { "clickhouse" },
                );
                out.push(GetFlowsResponse {
                    time: first,
                    node_name: String::new(),
                    response_types: Some(ResponseTypes::NodeStatus(NodeStatusEvent {
                        state_change: NodeState::Connected as i32,
                        node_names: vec!["store".into()],
                        message: msg,
                    })),
                });
                out.extend(fresh.into_iter().map(|f| GetFlowsResponse {
                    time: f.time,
                    node_name: f.node_name.clone(),
                    response_types: Some(ResponseTypes::Flow(f)),
                }));
                out.sort_by_key(|m| nanos(&m.time));
            }
            limit(out, req.number, req.first)
        }
        Err(e) => {
            out.push(node_status(NodeState::Error, vec!["store".into()], format!("reading the store: {e}")));
            out
        }
    }
}

/// How far back the live part of a follow request reads again, for flows that were
/// stamped before the history part was read but reached their node's ring after it.
const LATE_ARRIVAL: Nanos = 2_000_000_000;

fn timestamp(ns: Nanos) -> Timestamp {
    Timestamp {
        seconds: ns.div_euclid(1_000_000_000) as i64,
        nanos: ns.rem_euclid(1_000_000_000) as i32,
    }
}

impl RelayService {
    /// The merged, annotated and filtered answer to `req`, as the Observer API streams it
    /// (clients, and the relay's own store writer).
    pub fn stream(&self, req: GetFlowsRequest) -> Result<mpsc::Receiver<Result<GetFlowsResponse, Status>>, Status> {
        let filters = FilterSet::new(&req.allow_list, &req.deny_list)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if req.first && req.follow {
            return Err(Status::invalid_argument("`first` and `follow` cannot be combined"));
        }
        // What the nodes can filter themselves; the rest is filtered here, after
        // annotation, and then counts can only be applied here.
        let side = node_side(&req.allow_list, &req.deny_list);
        let node_req = GetFlowsRequest {
            allow_list: side.allow,
            deny_list: side.deny,
            number: if side.exact { req.number } else { 0 },
            ..req.clone()
        };
        let pipeline = Arc::new(Pipeline {
            index: self.index.clone(),
            filters,
        });
        let (tx, rx) = mpsc::channel::<Result<GetFlowsResponse, Status>>(1024);
        let peer_set = self.peers.clone();
        let store = self.store.clone();
        let metrics = self.metrics.clone();
        let (window, buffer) = (self.sort_window, self.sort_buffer);
        let count = move |m: &GetFlowsResponse| match &m.response_types {
            Some(ResponseTypes::Flow(f)) => metrics.observe(f),
            Some(ResponseTypes::LostEvents(l)) => metrics.lost(
                flows_proto::LostEventSource::try_from(l.source).unwrap_or_default(),
                l.num_events_lost,
            ),
            _ => {}
        };
        tokio::spawn(async move {
            let peers = peer_set.snapshot();
            let down = unavailable(&peers);
            if !down.is_empty() {
                let msg = format!("unavailable: {}", down.join(", "));
                if tx.send(Ok(node_status(NodeState::Unavailable, down, msg))).await.is_err() {
                    return;
                }
            }
            let t0 = now_nanos();
            let mut sent = Sent::default();
            let with_history = !req.follow || req.number > 0 || req.since.is_some();
            if with_history {
                let mut hreq = GetFlowsRequest {
                    follow: false,
                    ..node_req.clone()
                };
                if req.follow {
                    hreq.until = Some(timestamp(t0));
                }
                let mut out = history(&peers, &hreq, &pipeline, req.number, req.first).await;
                if let Some(store) = &store {
                    out = with_stored(store, out, &req, hreq.until).await;
                }
                if req.follow {
                    let flows = out.iter().filter_map(|m| match &m.response_types {
                        Some(ResponseTypes::Flow(f)) => Some(f),
                        _ => None,
                    });
                    for f in flows.clone() {
                        // Only recent ones can come again.
                        if nanos(&f.time) >= t0 - LATE_ARRIVAL {
                            sent.uuids.insert(f.uuid.clone());
                        }
                    }
                    if req.number > 0 && flows.clone().count() as u64 >= req.number {
                        sent.before = flows.map(|f| nanos(&f.time)).min().unwrap_or(0);
                    }
                }
                for m in out {
                    count(&m);
                    if tx.send(Ok(m)).await.is_err() {
                        return;
                    }
                }
                if !req.follow {
                    return;
                }
            }
            // Follow: every node's stream into one sort window, nodes joining and leaving.
            let mut live = GetFlowsRequest {
                follow: true,
                number: 0,
                first: false,
                until: None,
                ..node_req
            };
            if with_history {
                let floor = nanos(&req.since).max(t0 - LATE_ARRIVAL);
                live.since = Some(timestamp(floor));
            }
            let sent = Arc::new(sent);
            let (mtx, mut mrx) = mpsc::channel::<Merged>(4096);
            let mut readers: HashMap<usize, (String, tokio::task::AbortHandle)> = HashMap::new();
            let mut set = peer_set.subscribe();
            let mut first_set = true;
            let mut refresh = true;
            let mut w: SortWindow<GetFlowsResponse> = SortWindow::new(window, buffer);
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            loop {
                if refresh {
                    refresh = false;
                    let current = set.borrow_and_update().clone();
                    let ids: HashSet<usize> = current.iter().map(|p| Arc::as_ptr(p) as usize).collect();
                    let gone: Vec<usize> = readers.keys().filter(|k| !ids.contains(k)).copied().collect();
                    for k in gone {
                        if let Some((name, h)) = readers.remove(&k) {
                            h.abort();
                            let ev = node_status(NodeState::Gone, vec![name.clone()], format!("{name} left"));
                            if tx.send(Ok(ev)).await.is_err() {
                                return;
                            }
                        }
                    }
                    for p in current {
                        let k = Arc::as_ptr(&p) as usize;
                        if readers.contains_key(&k) {
                            continue;
                        }
                        // A node that joins later is read from when it joins.
                        let r = if first_set {
                            live.clone()
                        } else {
                            GetFlowsRequest { since: None, ..live.clone() }
                        };
                        let name = p.name();
                        let h = tokio::spawn(follow_peer(p, r, pipeline.clone(), sent.clone(), mtx.clone()));
                        readers.insert(k, (name, h.abort_handle()));
                    }
                    first_set = false;
                }
                let out: Vec<GetFlowsResponse> = tokio::select! {
                    m = mrx.recv() => match m {
                        Some(Merged::Item(m)) if matches!(m.response_types, Some(ResponseTypes::Flow(_))) => {
                            let at = nanos(&m.time);
                            w.push(at, m)
                        }
                        // Losses and node changes are news: no reason to hold them.
                        Some(Merged::Item(m)) | Some(Merged::Status(m)) => vec![m],
                        // The relay holds a sender itself: the channel cannot end.
                        None => return,
                    },
                    r = set.changed() => {
                        // The set's owner holds its sender as long as requests run.
                        refresh = r.is_ok();
                        Vec::new()
                    }
                    _ = tick.tick() => w.ready(now_nanos()),
                    _ = tx.closed() => {
                        for (_, h) in readers.values() {
                            h.abort();
                        }
                        return;
                    }
                };
                for m in out {
                    count(&m);
                    if tx.send(Ok(m)).await.is_err() {
                        for (_, h) in readers.values() {
                            h.abort();
                        }
                        return;
                    }
                }
            }
        });
        Ok(rx)
    }
}

#[tonic::async_trait]
impl Observer for RelayService {
    type GetFlowsStream =
        Pin<Box<dyn Stream<Item = Result<GetFlowsResponse, Status>> + Send + 'static>>;

    async fn get_flows(
        &self,
        request: Request<GetFlowsRequest>,
    ) -> Result<Response<Self::GetFlowsStream>, Status> {
        let rx = self.stream(request.into_inner())?;
        let stream = ReceiverStream::new(rx);
        match self.shutdown.clone() {
            None => Ok(Response::new(Box::pin(stream))),
            Some(mut stop) => {
                let stopped = async move {
                    // A dropped sender is no shutdown: wait for a real one.
                    if stop.wait_for(|s| *s).await.is_err() {
                        std::future::pending::<()>().await;
                    }
                };
                Ok(Response::new(Box::pin(futures::StreamExt::take_until(stream, Box::pin(stopped)))))
            }
        }
    }

    async fn server_status(
        &self,
        _request: Request<ServerStatusRequest>,
    ) -> Result<Response<ServerStatusResponse>, Status> {
        let mut out = ServerStatusResponse {
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_ns: self.started.elapsed().as_nanos() as u64,
            node_name: "relay".into(),
            ..Default::default()
        };
        let mut lost: BTreeMap<i32, u64> = BTreeMap::new();
        let (mut connected, mut down) = (0u32, Vec::new());
        for p in &self.peers.snapshot() {
            let status = match p.client() {
                Some(mut c) => c.server_status(ServerStatusRequest {}).await.ok(),
                None => None,
            };
            match status {
                Some(s) => {
                    let s = s.into_inner();
                    connected += 1;
                    out.num_flows += s.num_flows;
                    out.max_flows += s.max_flows;
                    out.seen_flows += s.seen_flows;
                    for l in s.lost {
                        *lost.entry(l.source).or_default() += l.count;
                    }
                }
                None => down.push(p.name()),
            }
        }
        out.lost = lost
            .into_iter()
            .map(|(source, count)| LostCount { source, count })
            .collect();
        self.metrics.set_nodes(i64::from(connected), down.len() as i64);
        if let (Some(store), Some(sink)) = (&self.store, &self.sink) {
            use std::sync::atomic::Ordering::Relaxed;
            out.store = Some(flows_proto::StoreStatus {
                backend: if store.is_embedded() { "embedded" } else { "clickhouse" }.into(),
                rows_written: sink.written.load(Relaxed),
                rows_lost: sink.lost.load(Relaxed),
                rows_buffered: sink.buffered.load(Relaxed),
                last_error: sink.last_error(),
                rows_lost_upstream: sink.lost_upstream.load(Relaxed),
            });
        }
        out.num_connected_nodes = Some(connected);
        out.num_unavailable_nodes = Some(down.len() as u32);
        out.unavailable_nodes = down;
        Ok(Response::new(out))
    }
}

/// True when every peer is connected (for readiness).
pub fn all_connected(peers: &[Arc<Peer>]) -> bool {
    peers
        .iter()
        .all(|p| matches!(&*p.state.borrow(), PeerState::Connected { .. }))
}

fn timestamp_of(ns: i64) -> Timestamp {
    Timestamp {
        seconds: ns.div_euclid(1_000_000_000),
        nanos: ns.rem_euclid(1_000_000_000) as i32,
    }
}

fn ns_of(t: &Option<Timestamp>) -> Option<i64> {
    t.map(|t| t.seconds.saturating_mul(1_000_000_000).saturating_add(i64::from(t.nanos)))
}

/// The History API: the audit, from the relay's store.
pub struct HistoryService {
    pub store: Arc<Store>,
}

#[tonic::async_trait]
impl flows_proto::history_server::History for HistoryService {
    async fn audit(
        &self,
        request: Request<flows_proto::AuditRequest>,
    ) -> Result<Response<flows_proto::AuditResponse>, Status> {
        let r = request.into_inner();
        let q = flows_store::AuditQuery {
            since: ns_of(&r.since),
            until: ns_of(&r.until),
            verdicts: r.verdict,
            allow: r.allow_list,
            deny: r.deny_list,
            top: r.top,
        };
        let rows = self.store.audit(&q).await.map_err(|e| match e {
            flows_store::StoreError::Filter { .. } => Status::invalid_argument(e.to_string()),
            e => Status::unavailable(e.to_string()),
        })?;
        let verdict = |v: &str| match v {
            "FORWARDED" => flows_proto::Verdict::Forwarded,
            "DROPPED" => flows_proto::Verdict::Dropped,
            "AUDIT" => flows_proto::Verdict::Audit,
            "ERROR" => flows_proto::Verdict::Error,
            _ => flows_proto::Verdict::Unspecified,
        } as i32;
        let groups = rows
            .into_iter()
            .map(|a| flows_proto::AuditGroup {
                verdict: verdict(&a.verdict),
                source_namespace: a.src_namespace,
                source_workload: a.src_workload,
                source_workload_kind: a.src_workload_kind,
                destination_namespace: a.dst_namespace,
                destination_workload: a.dst_workload,
                destination_workload_kind: a.dst_workload_kind,
                destination_port: u32::from(a.dst_port),
                protocol: a.protocol,
                flows: a.flows,
                first_seen: Some(timestamp_of(a.first_seen)),
                last_seen: Some(timestamp_of(a.last_seen)),
                drop_reasons: a.drop_reasons,
                policies: a.policies,
            })
            .collect();
        Ok(Response::new(flows_proto::AuditResponse {
            groups,
            backend: if self.store.is_embedded() { "embedded" } else { "clickhouse" }.into(),
        }))
    }

    type AttemptsStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<flows_proto::AttemptBatch, Status>> + Send + 'static>,
    >;

    async fn attempts(
        &self,
        request: Request<flows_proto::AttemptsRequest>,
    ) -> Result<Response<Self::AttemptsStream>, Status> {
        let r = request.into_inner();
        let q = flows_store::AttemptQuery {
            since: ns_of(&r.since),
            until: ns_of(&r.until),
            allow: r.allow_list,
            deny: r.deny_list,
        };
        let rows = self.store.attempts(&q).await.map_err(|e| match e {
            flows_store::StoreError::Filter { .. } => Status::invalid_argument(e.to_string()),
            e => Status::unavailable(e.to_string()),
        })?;
        let backend: String = if self.store.is_embedded() { "embedded" } else { "clickhouse" }.into();
        let groups: Vec<flows_proto::AttemptGroup> = rows.into_iter().map(flows_store::AttemptRow::into_proto).collect();
        // Batches keep each message far below gRPC's size limit.
        const BATCH: usize = 2_000;
        let mut batches: Vec<Result<flows_proto::AttemptBatch, Status>> = groups
            .chunks(BATCH)
            .map(|c| {
                Ok(flows_proto::AttemptBatch {
                    groups: c.to_vec(),
                    backend: backend.clone(),
                })
            })
            .collect();
        if batches.is_empty() {
            batches.push(Ok(flows_proto::AttemptBatch { groups: Vec::new(), backend }));
        }
        Ok(Response::new(Box::pin(tokio_stream::iter(batches))))
    }
}
