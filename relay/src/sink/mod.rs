//! The store writer: every flow the relay merges and annotates, written to the store in
//! batches.
//!
//! A reader follows all nodes, each from where the store's newest flows of that node
//! say ([`resume`]: a restart loses nothing its node still holds, and what the node no
//! longer holds is counted), into a bounded buffer; a writer takes batches of up to
//! `batch_rows`, or what has come within `flush`, and inserts each until it succeeds,
//! backing off between tries. A batch the store refuses (a constraint, bad values) is
//! set aside on disk ([`aside`]) after a few tries instead of holding up everything
//! behind it. When the buffer is full the reader either waits (`Block`: the pressure
//! goes back to the nodes, whose rings report what they overrun as lost events) or
//! drops the newest flow (`DropNewest`). Every flow is written, set aside or counted
//! lost, and each count is in the metrics and in ServerStatus.

pub mod aside;
pub mod resume;

use std::{
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use flows_proto::get_flows_response::ResponseTypes;
use flows_store::{FlowRow, Store};

use self::{aside::SetAside, resume::Resumed};
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
    /// Tries of a batch the store refuses before it is set aside.
    pub refusals: u32,
    /// Where refused batches are kept, and how many bytes at most (none: they are
    /// counted lost).
    pub set_aside: Option<(PathBuf, u64)>,
}

impl Default for SinkConfig {
    fn default() -> Self {
        SinkConfig {
            batch_rows: 100_000,
            flush: Duration::from_secs(1),
            buffer_rows: 200_000,
            when_full: WhenFull::Block,
            max_backoff: Duration::from_secs(10),
            refusals: 3,
            set_aside: None,
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
    /// Refused by the store and kept on disk.
    pub set_aside_rows: AtomicU64,
    pub set_aside_batches: AtomicU64,
    /// After a restart: flows the nodes' rings overwrote before they could be read
    /// again (from the gap in each node's flow ids).
    pub unrecoverable: AtomicU64,
    pub last_error: Mutex<String>,
}

impl SinkStats {
    pub fn set_error(&self, e: String) {
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
    let Some(marks) = resume_marks(&store, &stats, &mut stop).await else { return };
    let mut resumed = Resumed::new(marks.clone());
    let mut flows = match relay.resume(Resumed::request(&marks)) {
        Ok(rx) => rx,
        Err(e) => {
            tracing::error!(error = %e, "the store writer could not follow the nodes");
            return;
        }
    };
    let aside = config.set_aside.as_ref().and_then(|(dir, max)| match SetAside::open(dir, *max) {
        Ok(a) => Some(a),
        Err(e) => {
            tracing::error!(error = %e, "no place for refused batches: they will be counted lost");
            None
        }
    });
    let (tx, rx) = mpsc::channel::<FlowRow>(config.buffer_rows.max(1));
    let writer = tokio::spawn(write(store.clone(), rx, config.clone(), stats.clone(), metrics.clone(), aside));
    loop {
        let m = tokio::select! {
            m = flows.recv() => m,
            _ = stop.changed() => break,
        };
        let Some(Ok(m)) = m else { break };
        match m.response_types {
            Some(ResponseTypes::Flow(f)) => {
                match resumed.check(&f) {
                    resume::Verdict::Stored => continue,
                    resume::Verdict::Write { unrecoverable } => count_unrecoverable(&stats, &metrics, unrecoverable),
                }
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

/// The store's newest flows of each node, asked until the store answers (or the relay
/// stops: None).
async fn resume_marks(store: &Store, stats: &SinkStats, stop: &mut watch::Receiver<bool>) -> Option<Vec<flows_store::NodeMark>> {
    let mut delay = Duration::from_millis(200);
    loop {
        match store.resume_marks(resume::MARGIN_NS).await {
            Ok(m) => return Some(m),
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?delay, "reading where each node's flows stop in the store");
                stats.set_error(e.to_string());
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.changed() => return None,
        }
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

fn count_unrecoverable(stats: &SinkStats, metrics: &flows_metrics::Metrics, n: i64) {
    if n > 0 {
        stats.unrecoverable.fetch_add(n as u64, Ordering::Relaxed);
        metrics.store_rows("lost_unrecoverable", n as u64);
        tracing::warn!(flows = n, "flows made while the store writer was away are no longer held by their node");
    } else if n < 0 {
        // A flow counted in a gap came after all (stamped later than its successors).
        stats.unrecoverable.fetch_sub(n.unsigned_abs(), Ordering::Relaxed);
        metrics.store_rows("recovered", n.unsigned_abs());
    }
}

/// Batches from `rx`: up to `batch_rows`, or what arrives within `flush` of the first
/// row. None when the channel is closed and empty.
async fn next_batch(rx: &mut mpsc::Receiver<FlowRow>, config: &SinkConfig, batch: &mut Vec<FlowRow>) -> bool {
    match rx.recv().await {
        Some(r) => batch.push(r),
        None => return false,
    }
    let deadline = tokio::time::Instant::now() + config.flush;
    while batch.len() < config.batch_rows {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(r)) => batch.push(r),
            Ok(None) => return false,
            Err(_) => break,
        }
    }
    true
}

async fn write(
    store: Arc<Store>,
    mut rx: mpsc::Receiver<FlowRow>,
    config: SinkConfig,
    stats: Arc<SinkStats>,
    metrics: Arc<flows_metrics::Metrics>,
    aside: Option<SetAside>,
) {
    let mut batch: Vec<FlowRow> = Vec::with_capacity(config.batch_rows);
    let mut open = true;
    while open {
        open = next_batch(&mut rx, &config, &mut batch).await;
        if batch.is_empty() {
            continue;
        }
        let mut delay = Duration::from_millis(200);
        let mut refused = 0;
        loop {
            let e = match store.insert(&batch).await {
                Ok(()) => {
                    let n = batch.len() as u64;
                    stats.written.fetch_add(n, Ordering::Relaxed);
                    stats.buffered.fetch_sub(n, Ordering::Relaxed);
                    metrics.store_rows("written", n);
                    metrics.store_batch(true);
                    stats.set_error(String::new());
                    break;
                }
                Err(e) => e,
            };
            stats.failed_batches.fetch_add(1, Ordering::Relaxed);
            metrics.store_batch(false);
            stats.set_error(e.to_string());
            if e.is_refusal() {
                refused += 1;
                if refused >= config.refusals.max(1) {
                    set_aside(&batch, &e, aside.as_ref(), &stats, &metrics);
                    break;
                }
            }
            if !open {
                // Shutting down: one try only.
                tracing::warn!(error = %e, rows = batch.len(), "store write failed at shutdown; counted lost");
                settle(&stats, &metrics, batch.len() as u64, "lost_shutdown", &stats.lost);
                break;
            }
            tracing::warn!(error = %e, rows = batch.len(), retry_in = ?delay, "store write failed; retrying");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(config.max_backoff);
        }
        batch.clear();
    }
}

/// Rows leave the buffer with a result other than written.
fn settle(stats: &SinkStats, metrics: &flows_metrics::Metrics, n: u64, result: &'static str, count: &AtomicU64) {
    count.fetch_add(n, Ordering::Relaxed);
    stats.buffered.fetch_sub(n, Ordering::Relaxed);
    metrics.store_rows(result, n);
}

/// A batch the store keeps refusing goes to disk (or, without room there, is counted
/// lost), so the batches behind it are written.
fn set_aside(batch: &[FlowRow], why: &flows_store::StoreError, aside: Option<&SetAside>, stats: &SinkStats, metrics: &flows_metrics::Metrics) {
    let n = batch.len() as u64;
    let kept = match aside {
        Some(a) => a.keep(batch).map_err(|e| e.to_string()),
        None => Err("no directory for refused batches (--store-set-aside-dir)".to_string()),
    };
    match kept {
        Ok(path) => {
            tracing::error!(error = %why, rows = n, file = %path.display(), "the store refused a batch; set aside");
            stats.set_aside_batches.fetch_add(1, Ordering::Relaxed);
            settle(stats, metrics, n, "set_aside", &stats.set_aside_rows);
        }
        Err(e) => {
            tracing::error!(error = %why, rows = n, not_kept = %e, "the store refused a batch; counted lost");
            settle(stats, metrics, n, "lost_refused", &stats.lost);
        }
    }
}
