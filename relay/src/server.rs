//! The relay's Observer service: the merged stream ([`crate::stream`]) to clients, and
//! the status of every node and of the store writer.

use std::{collections::BTreeMap, pin::Pin, sync::Arc, time::Instant};

use flows_proto::{
    GetFlowsRequest, GetFlowsResponse, LostCount, ServerStatusRequest, ServerStatusResponse,
    observer_server::Observer,
};
use futures::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::{
    peers::{Peer, PeerState},
    sink::SinkStats,
    stream::Merger,
};

pub struct RelayService {
    pub merger: Arc<Merger>,
    pub started: Instant,
    /// The store writer's counts, for ServerStatus.
    pub sink: Option<Arc<SinkStats>>,
    /// Becomes true when the relay shuts down: clients' follow streams end then (they
    /// reconnect to the next relay), or the graceful shutdown would wait for them
    /// forever. None: streams end only with their clients.
    pub shutdown: Option<tokio::sync::watch::Receiver<bool>>,
    /// GetFlows streams served at once (each follower holds one, and a stream from
    /// every node).
    pub streams: flows_tls::serving::StreamSlots,
}

#[tonic::async_trait]
impl Observer for RelayService {
    type GetFlowsStream =
        Pin<Box<dyn Stream<Item = Result<GetFlowsResponse, Status>> + Send + 'static>>;

    async fn get_flows(
        &self,
        request: Request<GetFlowsRequest>,
    ) -> Result<Response<Self::GetFlowsStream>, Status> {
        let slot = self.streams.take()?;
        let rx = self.merger.stream(request.into_inner())?;
        let stream = flows_tls::serving::Slotted::new(ReceiverStream::new(rx), slot);
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
            time: Some(flows_proto::timestamp_now()),
            ..Default::default()
        };
        let mut lost: BTreeMap<i32, u64> = BTreeMap::new();
        let (mut connected, mut down) = (0u32, Vec::new());
        // Every node at once, each bounded: a hung node costs one timeout, not one each.
        let peers = self.merger.peers.snapshot();
        let calls = peers.iter().map(|p| async move {
            match p.client() {
                Some(mut c) => crate::peers::bounded(c.server_status(ServerStatusRequest {})).await.ok(),
                None => None,
            }
        });
        let answers = futures::future::join_all(calls).await;
        for (p, status) in peers.iter().zip(answers) {
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
        self.merger.metrics.set_nodes(i64::from(connected), down.len() as i64);
        if let (Some(store), Some(sink)) = (&self.merger.store, &self.sink) {
            use std::sync::atomic::Ordering::Relaxed;
            out.store = Some(flows_proto::StoreStatus {
                backend: store.backend().into(),
                waiting: store.get().is_none(),
                rows_set_aside: sink.set_aside_rows.load(Relaxed),
                batches_set_aside: sink.set_aside_batches.load(Relaxed),
                rows_unrecoverable: sink.unrecoverable.load(Relaxed),
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
