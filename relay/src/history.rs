//! The relay's History API: the audit and the attempts of a time window, from its store.

use std::sync::Arc;

use flows_proto::{Timestamp, timestamp_from_nanos, timestamp_nanos};
use flows_store::Store;

use crate::store_slot::StoreSlot;
use tonic::{Request, Response, Status};

/// A store error as the client's fault (a bad filter), a bound its question hit, or the
/// store's failure. The client gets `public_message` (no SQL, no ClickHouse internals);
/// the whole error goes to the log.
pub fn status(e: flows_store::StoreError) -> Status {
    tracing::warn!(error = %e, "reading the store");
    let msg = e.public_message();
    match e {
        flows_store::StoreError::Filter { .. } => Status::invalid_argument(msg),
        flows_store::StoreError::TooMany { .. } => Status::resource_exhausted(msg),
        _ => Status::unavailable(msg),
    }
}


fn ns_of(t: &Option<Timestamp>) -> Option<i64> {
    t.as_ref().map(timestamp_nanos)
}

/// The History API: the audit, from the relay's store.
pub struct HistoryService {
    pub store: StoreSlot,
}

impl HistoryService {
    fn store(&self) -> Result<Arc<Store>, Status> {
        self.store
            .get()
            .ok_or_else(|| Status::unavailable("the store is not open yet (the relay is waiting for ClickHouse)"))
    }
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
        let rows = self.store()?.audit(&q).await.map_err(status)?;
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
                first_seen: Some(timestamp_from_nanos(a.first_seen)),
                last_seen: Some(timestamp_from_nanos(a.last_seen)),
                drop_reasons: a.drop_reasons,
                policies: a.policies,
            })
            .collect();
        Ok(Response::new(flows_proto::AuditResponse {
            groups,
            backend: self.store.backend().into(),
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
        let rows = self.store()?.attempts(&q).await.map_err(status)?;
        let backend: String = self.store.backend().into();
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
