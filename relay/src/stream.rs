//! The relay's merged stream: every node-probe's flows for one request, annotated,
//! filtered and in time order. A request is answered in steps: the history part (the
//! nodes' rings, then the store, which reaches further back), then, when it follows,
//! the live part (every node's stream through one sort window, nodes joining and
//! leaving). Clients of the Observer API and the relay's own store writer read it.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use flows_flow::{
    FilterSet,
    enrich::{annotate, node_side},
    request,
};
use flows_k8s::watch::SharedIndex;
use flows_proto::{
    GetFlowsRequest, GetFlowsResponse, NodeState, NodeStatusEvent, Timestamp,
    get_flows_response::ResponseTypes, timestamp_from_nanos, timestamp_nanos,
};
use tokio::sync::mpsc;
use tonic::Status;

use crate::{
    merge::{Nanos, SortWindow},
    peers::{Peer, PeerSet},
    store_slot::StoreSlot,
};

/// What a merged stream is made from: the nodes, who addresses belong to, the store.
pub struct Merger {
    pub peers: Arc<PeerSet>,
    /// Who each address belongs to (Kubernetes watchers or manifests); none: flows go
    /// out as the nodes sent them.
    pub index: Option<SharedIndex>,
    /// Flows and losses forwarded, counted for Prometheus.
    pub metrics: Arc<flows_metrics::Metrics>,
    /// How long a flow waits for earlier flows from other nodes.
    pub sort_window: Duration,
    /// Flows held for sorting at most; beyond, the oldest go out at once.
    pub sort_buffer: usize,
    /// Flow history, read for requests reaching further back than the nodes' rings.
    pub store: Option<StoreSlot>,
}

type Out = mpsc::Sender<Result<GetFlowsResponse, Status>>;

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

/// Collects, while a follow request's history part goes out, what its live part must
/// not send again: the recent flows (by their node's clock), which can come again.
struct Recent {
    on: bool,
    t0: Nanos,
    offsets: Offsets,
    sent: Sent,
}

impl Recent {
    fn note(&mut self, m: &GetFlowsResponse) {
        if let (true, Some(ResponseTypes::Flow(f))) = (self.on, &m.response_types)
            && nanos(&f.time) >= self.t0 + self.offsets.get(&f.node_name) - LATE_ARRIVAL
        {
            self.sent.uuids.insert(f.uuid.clone());
        }
    }
}

/// The store's pages of one read, with its errors as a client may read them.
struct StoredPages {
    store: Option<Arc<flows_store::Store>>,
    pages: Result<flows_store::FlowPages, String>,
}

/// Rows per page of a streamed read: a page is what the relay holds of the store's
/// answer at once (tens of megabytes at most).
const PAGE_ROWS: u64 = 10_000;

impl StoredPages {
    async fn open(slot: &StoreSlot, query: &flows_store::FlowQuery) -> StoredPages {
        let Some(store) = slot.get() else {
            let msg = "reading the store: it is not open yet (the relay is waiting for ClickHouse)".to_string();
            return StoredPages { store: None, pages: Err(msg) };
        };
        let pages = store.flow_pages(query, PAGE_ROWS).await.map_err(store_message);
        StoredPages { store: Some(store), pages }
    }

    async fn next(&mut self) -> Result<Option<Vec<flows_proto::Flow>>, String> {
        let (Some(store), Ok(pages)) = (&self.store, &mut self.pages) else {
            // Said once, then done.
            let e = std::mem::replace(&mut self.pages, Err(String::new()));
            return match e {
                Err(msg) if !msg.is_empty() => Err(msg),
                _ => Ok(None),
            };
        };
        pages.next_page(store).await.map_err(store_message)
    }
}

fn store_message(e: flows_store::StoreError) -> String {
    format!("reading the store: {}", crate::history::status(e).message())
}

/// Each node's clock less the relay's, by node name (0 for a node not measured): a
/// relay time plus a node's offset is that moment in the node's flow times.
#[derive(Default)]
struct Offsets(HashMap<String, Nanos>);

impl Offsets {
    fn of(peers: &[Arc<Peer>]) -> Offsets {
        Offsets(peers.iter().map(|p| (p.name(), Nanos::from(p.clock_offset()))).collect())
    }

    fn get(&self, node: &str) -> Nanos {
        self.0.get(node).copied().unwrap_or(0)
    }
}

fn nanos(t: &Option<Timestamp>) -> Nanos {
    t.as_ref().map(|t| Nanos::from(timestamp_nanos(t))).unwrap_or(0)
}

/// The Timestamp of a sort-window time (wide, so sums of hostile times cannot overflow).
fn timestamp(ns: Nanos) -> Timestamp {
    timestamp_from_nanos(ns.clamp(Nanos::from(i64::MIN), Nanos::from(i64::MAX)) as i64)
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
            // One nanosecond after it.
            req.since = Some(timestamp_from_nanos(timestamp_nanos(&t).saturating_add(1)));
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

/// How long one node's history answer may take (a ring of at most 65,536 flows).
const HISTORY_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Every connected node's answer to `req`, annotated and filtered, in time order, cut
/// to `number` flows (the first or the last ones). Nodes that fail are reported in-band.
async fn history(
    peers: &[Arc<Peer>],
    req: &GetFlowsRequest,
    until: Option<Nanos>,
    pipeline: &Pipeline,
    number: u64,
    first: bool,
) -> Vec<GetFlowsResponse> {
    let mut all = Vec::new();
    // Later by the offset's uncertainty: what both parts hold is sent once (`Sent`).
    let calls = peers.iter().filter_map(|p| Some((p.name(), p.clock_offset() + p.clock_uncertainty(), p.client()?))).map(|(name, offset, mut c)| {
        let mut r = req.clone();
        // The same moment by the node's clock.
        if let Some(t) = until {
            r.until = Some(timestamp(t + Nanos::from(offset)));
        }
        async move {
            let read = async {
                let mut out = Vec::new();
                let mut s = c.get_flows(r).await?.into_inner();
                while let Some(m) = s.message().await? {
                    out.push(m);
                }
                Ok::<_, Status>(out)
            };
            // A node that stops answering mid-read is reported, and the others' answer
            // goes out without it.
            let read = match tokio::time::timeout(HISTORY_READ_TIMEOUT, read).await {
                Ok(r) => r,
                Err(_) => Err(Status::deadline_exceeded(format!(
                    "no complete answer within {} s",
                    HISTORY_READ_TIMEOUT.as_secs()
                ))),
            };
            (name, read)
        }
    });
    // Nodes failing the same way are one event naming them all.
    let mut errors: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, r) in futures::future::join_all(calls).await {
        match r {
            Ok(v) => all.extend(v.into_iter().filter_map(|mut m| pipeline.admit(&mut m).then_some(m))),
            Err(e) => errors.entry(e.message().to_string()).or_default().push(name),
        }
    }
    for (why, nodes) in errors {
        let msg = format!("reading {}: {why}", nodes.join(", "));
        all.push(node_status(NodeState::Error, nodes, msg));
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
    slot: &StoreSlot,
    mut out: Vec<GetFlowsResponse>,
    req: &GetFlowsRequest,
    until: Option<Timestamp>,
) -> Vec<GetFlowsResponse> {
    let query = flows_store::FlowQuery {
        allow: req.allow_list.clone(),
        deny: req.deny_list.clone(),
        since: req.since.as_ref().map(timestamp_nanos),
        until: until.as_ref().map(timestamp_nanos),
        number: req.number,
        last: !req.first,
    };
    let Some(store) = slot.get() else {
        let msg = "reading the store: it is not open yet (the relay is waiting for ClickHouse)".to_string();
        out.push(node_status(NodeState::Error, vec!["store".into()], msg));
        return out;
    };
    match store.flows(&query).await {
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
                    slot.backend(),
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
            // In-band, as a node's failure is: what the client may read of it (the log
            // has the rest).
            let msg = format!("reading the store: {}", crate::history::status(e).message());
            out.push(node_status(NodeState::Error, vec!["store".into()], msg));
            out
        }
    }
}

/// How far back the live part of a follow request reads again, for flows that were
/// stamped before the history part was read but reached their node's ring after it.
const LATE_ARRIVAL: Nanos = 2_000_000_000;


/// Where each node's flows start for the relay's own store writer: at the newest flow
/// the store holds of that node, by the node's own clock (a node whose clock is behind
/// the others' is resumed from its own time, not from theirs).
#[derive(Debug, Clone, Default)]
pub struct Resume {
    /// Nanoseconds, by node name; a node not named gives everything it still holds.
    pub since: HashMap<String, i64>,
}

impl Resume {
    fn since_for(&self, node: &str) -> Timestamp {
        timestamp_from_nanos(self.since.get(node).copied().unwrap_or(0))
    }
}

impl Merger {
    /// The merged, annotated and filtered answer to `req`, as the Observer API streams it.
    pub fn stream(&self, req: GetFlowsRequest) -> Result<mpsc::Receiver<Result<GetFlowsResponse, Status>>, Status> {
        self.start(req, None)
    }

    /// Every node's flows from where `resume` says, then on as they come: what the
    /// store writer reads. Each node is one uninterrupted follow from its own starting
    /// time (no history part, no floor in the relay's clock), and the store is not read.
    pub fn resume(&self, resume: Resume) -> Result<mpsc::Receiver<Result<GetFlowsResponse, Status>>, Status> {
        let req = GetFlowsRequest { follow: true, ..Default::default() };
        self.start(req, Some(Arc::new(resume)))
    }

    fn start(
        &self,
        req: GetFlowsRequest,
        resume: Option<Arc<Resume>>,
    ) -> Result<mpsc::Receiver<Result<GetFlowsResponse, Status>>, Status> {
        let valid = request::validate(&req).map_err(|e| Status::invalid_argument(e.to_string()))?;
        // What the nodes can filter themselves; the rest is filtered here, after
        // annotation, and then counts can only be applied here.
        let side = node_side(&req.allow_list, &req.deny_list);
        let node_req = GetFlowsRequest {
            allow_list: side.allow,
            deny_list: side.deny,
            number: if side.exact { req.number } else { 0 },
            ..req.clone()
        };
        let run = Run {
            req,
            node_req,
            pipeline: Arc::new(Pipeline {
                index: self.index.clone(),
                filters: valid.filters,
            }),
            peers: self.peers.clone(),
            store: if resume.is_some() { None } else { self.store.clone() },
            resume,
            metrics: self.metrics.clone(),
            sort_window: self.sort_window,
            sort_buffer: self.sort_buffer,
        };
        let (tx, rx) = mpsc::channel(1024);
        tokio::spawn(run.answer(tx));
        Ok(rx)
    }
}

/// One request being answered.
struct Run {
    req: GetFlowsRequest,
    /// The request as the nodes get it (the filters they can apply).
    node_req: GetFlowsRequest,
    pipeline: Arc<Pipeline>,
    peers: Arc<PeerSet>,
    store: Option<StoreSlot>,
    /// Per-node starting points (the store writer's request).
    resume: Option<Arc<Resume>>,
    metrics: Arc<flows_metrics::Metrics>,
    sort_window: Duration,
    sort_buffer: usize,
}

impl Run {
    /// Counts and sends one message; false when the client has gone.
    async fn send(&self, tx: &Out, m: GetFlowsResponse) -> bool {
        match &m.response_types {
            Some(ResponseTypes::Flow(f)) => self.metrics.observe(f),
            Some(ResponseTypes::LostEvents(l)) => self.metrics.lost(
                flows_proto::LostEventSource::try_from(l.source).unwrap_or_default(),
                l.num_events_lost,
            ),
            _ => {}
        }
        tx.send(Ok(m)).await.is_ok()
    }

    async fn answer(self, tx: Out) {
        let peers = self.peers.snapshot();
        let down = unavailable(&peers);
        if !down.is_empty() {
            let msg = format!("unavailable: {}", down.join(", "));
            if !self.send(&tx, node_status(NodeState::Unavailable, down, msg)).await {
                return;
            }
        }
        let t0 = now_nanos();
        let with_history = self.resume.is_none() && (!self.req.follow || self.req.number > 0 || self.req.since.is_some());
        let mut sent = Sent::default();
        if with_history {
            match self.history(&peers, &tx, t0).await {
                Some(s) => sent = s,
                None => return,
            }
        }
        if self.req.follow {
            self.follow(tx, t0, with_history, sent).await;
        }
    }

    /// The history part: the nodes' rings and the store, up to `t0` when following.
    /// Returns what a follow request's live part must not send again (None: the client
    /// has gone).
    async fn history(&self, peers: &[Arc<Peer>], tx: &Out, t0: Nanos) -> Option<Sent> {
        let req = &self.req;
        let hreq = GetFlowsRequest {
            follow: false,
            ..self.node_req.clone()
        };
        let until = req.follow.then_some(t0);
        let nodes = history(peers, &hreq, until, &self.pipeline, req.number, req.first).await;
        // The store's part ends where the request does, or (following) at t0.
        let store_until = until.map(timestamp).or(req.until);
        let mut recent = Recent { on: req.follow, t0, offsets: Offsets::of(peers), sent: Sent::default() };
        let out = match &self.store {
            Some(slot) if req.number == 0 => {
                return self.stream_stored(slot, nodes, store_until, tx, recent).await;
            }
            Some(slot) => with_stored(slot, nodes, req, store_until).await,
            None => nodes,
        };
        let flows = out.iter().filter_map(|m| match &m.response_types {
            Some(ResponseTypes::Flow(f)) => Some(f),
            _ => None,
        });
        if req.follow && req.number > 0 && flows.clone().count() as u64 >= req.number {
            recent.sent.before = flows.map(|f| nanos(&f.time)).min().unwrap_or(0);
        }
        for m in out {
            recent.note(&m);
            if !self.send(tx, m).await {
                return None;
            }
        }
        Some(recent.sent)
    }

    /// The history part of a read without a count (`--all`, a time window): the
    /// store's flows page by page ([`flows_store::FlowPages`]), merged in time order with
    /// what the nodes answered (flows both hold go out once), so the relay holds a page
    /// and the nodes' rings, never the whole answer. None: the client has gone.
    async fn stream_stored(
        &self,
        slot: &StoreSlot,
        nodes: Vec<GetFlowsResponse>,
        until: Option<Timestamp>,
        tx: &Out,
        mut recent: Recent,
    ) -> Option<Sent> {
        let held: HashSet<String> = nodes
            .iter()
            .filter_map(|m| match &m.response_types {
                Some(ResponseTypes::Flow(f)) => Some(f.uuid.clone()),
                _ => None,
            })
            .collect();
        let mut nodes = nodes.into_iter().peekable();
        let query = flows_store::FlowQuery {
            allow: self.req.allow_list.clone(),
            deny: self.req.deny_list.clone(),
            since: self.req.since.as_ref().map(timestamp_nanos),
            until: until.as_ref().map(timestamp_nanos),
            number: 0,
            last: false,
        };
        let mut pages = StoredPages::open(slot, &query).await;
        let mut announced = false;
        loop {
            let page = match pages.next().await {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(msg) => {
                    if !self.send(tx, node_status(NodeState::Error, vec!["store".into()], msg)).await {
                        return None;
                    }
                    break;
                }
            };
            for f in page.into_iter().filter(|f| !held.contains(&f.uuid)) {
                let at = nanos(&f.time);
                while let Some(m) = nodes.next_if(|m| nanos(&m.time) <= at) {
                    recent.note(&m);
                    if !self.send(tx, m).await {
                        return None;
                    }
                }
                // Said once, before the first flow only the store had.
                if !announced {
                    announced = true;
                    let msg = format!("flows from the store ({}), which reaches further back than the nodes' rings", slot.backend());
                    let mut m = node_status(NodeState::Connected, vec!["store".into()], msg);
                    m.time = f.time;
                    if !self.send(tx, m).await {
                        return None;
                    }
                }
                let m = GetFlowsResponse { time: f.time, node_name: f.node_name.clone(), response_types: Some(ResponseTypes::Flow(f)) };
                recent.note(&m);
                if !self.send(tx, m).await {
                    return None;
                }
            }
        }
        for m in nodes {
            recent.note(&m);
            if !self.send(tx, m).await {
                return None;
            }
        }
        Some(recent.sent)
    }

    /// The live part: every node's stream into one sort window, nodes joining and
    /// leaving, until the client goes.
    async fn follow(self, tx: Out, t0: Nanos, with_history: bool, sent: Sent) {
        let mut live = GetFlowsRequest {
            follow: true,
            number: 0,
            first: false,
            until: None,
            ..self.node_req.clone()
        };
        // Without history, the request's arrival is the floor: a flow stamped after it
        // but before every node's stream is open still comes.
        // Relay times; each node's reader moves them to its clock.
        let floor = if with_history {
            Floor { relay_time: t0 - LATE_ARRIVAL, since: nanos(&self.req.since) }
        } else {
            Floor { relay_time: t0, since: 0 }
        };
        live.since = None;
        let (mtx, mut mrx) = mpsc::channel::<Merged>(4096);
        let mut readers = Readers {
            live,
            sent: Arc::new(sent),
            pipeline: self.pipeline.clone(),
            tx: mtx,
            by_peer: HashMap::new(),
            joined_later: false,
            resume: self.resume.clone(),
            floor,
        };
        let mut set = self.peers.subscribe();
        let mut refresh = true;
        let mut w: SortWindow<GetFlowsResponse> = SortWindow::new(self.sort_window, self.sort_buffer);
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        loop {
            if refresh {
                refresh = false;
                let current = set.borrow_and_update().clone();
                for ev in readers.update(current) {
                    if !self.send(&tx, ev).await {
                        return;
                    }
                }
            }
            let out: Vec<GetFlowsResponse> = tokio::select! {
                m = mrx.recv() => match m {
                    Some(Merged::Item(m)) if matches!(m.response_types, Some(ResponseTypes::Flow(_))) => {
                        let at = nanos(&m.time);
                        w.push(at, m)
                    }
                    // Losses and node changes are news: no reason to hold them.
                    Some(Merged::Item(m)) | Some(Merged::Status(m)) => vec![m],
                    // `readers` holds a sender itself: the channel cannot end.
                    None => return,
                },
                r = set.changed() => {
                    // The set's owner holds its sender as long as requests run.
                    refresh = r.is_ok();
                    Vec::new()
                }
                _ = tick.tick() => w.ready(now_nanos()),
                _ = tx.closed() => return,
            };
            for m in out {
                if !self.send(&tx, m).await {
                    return;
                }
            }
        }
    }
}

/// The live readers of one request, one per node; they stop when this is dropped.
struct Readers {
    live: GetFlowsRequest,
    sent: Arc<Sent>,
    pipeline: Arc<Pipeline>,
    tx: mpsc::Sender<Merged>,
    by_peer: HashMap<usize, (String, tokio::task::AbortHandle)>,
    /// After the first set, a node that joins is read from when it joins.
    joined_later: bool,
    /// Per-node starting points instead (the store writer's request).
    resume: Option<Arc<Resume>>,
    /// Where the nodes that are there at the start are read from.
    floor: Floor,
}

/// Where a follow request's live part starts on each node: at a relay time (moved to
/// each node's clock), but not before the client's own `since` (a time the client
/// chose, taken as it is).
#[derive(Debug, Clone, Copy)]
struct Floor {
    relay_time: Nanos,
    since: Nanos,
}

impl Floor {
    fn on(self, peer: &Peer) -> Timestamp {
        let at = self.relay_time + Nanos::from(peer.clock_offset()) - Nanos::from(peer.clock_uncertainty());
        timestamp(at.max(self.since))
    }
}

impl Readers {
    /// Starts reading the nodes that joined, stops those that left; returns the events
    /// that say who left.
    fn update(&mut self, current: Vec<Arc<Peer>>) -> Vec<GetFlowsResponse> {
        let ids: HashSet<usize> = current.iter().map(|p| Arc::as_ptr(p) as usize).collect();
        let gone: Vec<usize> = self.by_peer.keys().filter(|k| !ids.contains(k)).copied().collect();
        let mut events = Vec::new();
        for k in gone {
            if let Some((name, h)) = self.by_peer.remove(&k) {
                h.abort();
                events.push(node_status(NodeState::Gone, vec![name.clone()], format!("{name} left")));
            }
        }
        for p in current {
            let k = Arc::as_ptr(&p) as usize;
            if self.by_peer.contains_key(&k) {
                continue;
            }
            let name = p.name();
            let r = match &self.resume {
                Some(resume) => GetFlowsRequest { since: Some(resume.since_for(&name)), ..self.live.clone() },
                None if self.joined_later => GetFlowsRequest { since: None, ..self.live.clone() },
                None => GetFlowsRequest { since: Some(self.floor.on(&p)), ..self.live.clone() },
            };
            let h = tokio::spawn(follow_peer(p, r, self.pipeline.clone(), self.sent.clone(), self.tx.clone()));
            self.by_peer.insert(k, (name, h.abort_handle()));
        }
        self.joined_later = true;
        events
    }
}

impl Drop for Readers {
    fn drop(&mut self) {
        for (_, h) in self.by_peer.values() {
            h.abort();
        }
    }
}
