//! The store writer: every flow the relay merges and annotates, written to the store in
//! batches.
//!
//! A reader follows all nodes (from the newest stored flow on, so a restart of the relay
//! loses nothing the nodes still hold) into a bounded buffer; a writer takes batches of
//! up to `batch_rows`, or what has come within `flush`, and inserts each until it
//! succeeds, backing off between tries. When the buffer is full the reader either waits
//! (`Block`: the pressure goes back to the nodes, whose rings report what they overrun
//! as lost events) or drops the newest flow (`DropNewest`). Every flow is either written
//! or counted lost, and both counts are in the metrics and in ServerStatus.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use flows_proto::{GetFlowsRequest, get_flows_response::ResponseTypes};
use flows_store::{FlowRow, Store};
use tokio::sync::{mpsc, watch};

use crate::stream::Merger;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WhenFull {
    /// Wait for room: nothing is dropped here; the nodes' rings absorb the delay.
    Block,
    /// Drop the flow that does not fit, and count it.
    DropNewest,
}

#[derive(Debug, Clone)]
pub struct SinkConfig {
    pub batch_rows: usize,
    pub flush: Duration,
    /// Rows held between reader and writer at most.
    pub buffer_rows: usize,
    pub when_full: WhenFull,
    pub max_backoff: Duration,
}

impl Default for SinkConfig {
    fn default() -> Self {
        SinkConfig {
            batch_rows: 100_000,
            flush: Duration::from_secs(1),
            buffer_rows: 200_000,
            when_full: WhenFull::Block,
            max_backoff: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Default)]
pub struct SinkStats {
    pub written: AtomicU64,
    /// Dropped because the buffer was full (DropNewest) or left unwritten at shutdown.
    pub lost: AtomicU64,
    /// Lost before reaching the relay (nodes' rings overrun), as the nodes reported.
    pub lost_upstream: AtomicU64,
    pub buffered: AtomicU64,
    pub failed_batches: AtomicU64,
    pub last_error: Mutex<String>,
}

impl SinkStats {
    fn set_error(&self, e: String) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = e;
    }

    pub fn last_error(&self) -> String {
        self.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Runs the writer until `stop` turns true, then flushes what it holds (within `flush`
/// plus one try) and counts the rest as lost.
pub async fn run(
    relay: Arc<Merger>,
    store: Arc<Store>,
    config: SinkConfig,
    stats: Arc<SinkStats>,
    metrics: Arc<flows_metrics::Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    let (tx, rx) = mpsc::channel::<FlowRow>(config.buffer_rows.max(1));
    let writer = tokio::spawn(write(store.clone(), rx, config.clone(), stats.clone(), metrics.clone()));
    // Resume after the newest stored flow: the nodes replay what they still hold. An
    // empty store takes everything they hold: flows made before the relay's first start
    // are flows too.
    let since = match store.last_time().await {
        Ok(Some(t)) => Some(flows_proto::timestamp_from_nanos(t.saturating_add(1))),
        Ok(None) => Some(flows_proto::timestamp_from_nanos(0)),
        Err(e) => {
            tracing::warn!(error = %e, "reading the newest stored flow; following from now");
            None
        }
    };
    let req = GetFlowsRequest {
        follow: true,
        since,
        ..Default::default()
    };
    let mut flows = match relay.stream(req) {
        Ok(rx) => rx,
        Err(e) => {
            tracing::error!(error = %e, "the store writer could not follow the nodes");
            return;
        }
    };
    loop {
        let m = tokio::select! {
            m = flows.recv() => m,
            _ = stop.changed() => break,
        };
        let Some(Ok(m)) = m else { break };
        match m.response_types {
            Some(ResponseTypes::Flow(f)) => {
                let row = FlowRow::from_owned(f);
                let sent = match config.when_full {
                    WhenFull::Block => tokio::select! {
                        r = tx.send(row) => r.is_ok(),
                        _ = stop.changed() => { stats.lost.fetch_add(1, Ordering::Relaxed); metrics.store_rows("lost_shutdown", 1); break }
                    },
                    WhenFull::DropNewest => match tx.try_send(row) {
                        Ok(()) => true,
                        Err(mpsc::error::TrySendError::Full(_)) => {
                            stats.lost.fetch_add(1, Ordering::Relaxed);
                            metrics.store_rows("lost_buffer_full", 1);
                            continue;
                        }
                        Err(mpsc::error::TrySendError::Closed(_)) => false,
                    },
                };
                if !sent {
                    break;
                }
                stats.buffered.fetch_add(1, Ordering::Relaxed);
            }
            Some(ResponseTypes::LostEvents(l)) => {
                stats.lost_upstream.fetch_add(l.num_events_lost, Ordering::Relaxed);
            }
            _ => {}
        }
    }
    drop(tx);
    let _ = writer.await;
}

async fn write(
    store: Arc<Store>,
    mut rx: mpsc::Receiver<FlowRow>,
    config: SinkConfig,
    stats: Arc<SinkStats>,
    metrics: Arc<flows_metrics::Metrics>,
) {
    let mut batch: Vec<FlowRow> = Vec::with_capacity(config.batch_rows);
    let mut open = true;
    while open {
        // Fill a batch: up to batch_rows, or what arrives within `flush` of the first row.
        match rx.recv().await {
            Some(r) => batch.push(r),
            None => open = false,
        }
        if open {
            let deadline = tokio::time::Instant::now() + config.flush;
            while batch.len() < config.batch_rows {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(r)) => batch.push(r),
                    Ok(None) => {
                        open = false;
                        break;
                    }
                    Err(_) => break,
                }
            }
        }
        if batch.is_empty() {
            continue;
        }
        let mut delay = Duration::from_millis(200);
        loop {
            match store.insert(&batch).await {
                Ok(()) => {
                    let n = batch.len() as u64;
                    stats.written.fetch_add(n, Ordering::Relaxed);
                    stats.buffered.fetch_sub(n, Ordering::Relaxed);
                    metrics.store_rows("written", n);
                    metrics.store_batch(true);
                    stats.set_error(String::new());
                    break;
                }
                Err(e) => {
                    stats.failed_batches.fetch_add(1, Ordering::Relaxed);
                    metrics.store_batch(false);
                    tracing::warn!(error = %e, rows = batch.len(), retry_in = ?delay, "store write failed; retrying");
                    stats.set_error(e.to_string());
                    if !open {
                        // Shutting down: one try only.
                        let n = batch.len() as u64;
                        stats.lost.fetch_add(n, Ordering::Relaxed);
                        stats.buffered.fetch_sub(n, Ordering::Relaxed);
                        metrics.store_rows("lost_shutdown", n);
                        break;
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(config.max_backoff);
                }
            }
        }
        batch.clear();
    }
}
