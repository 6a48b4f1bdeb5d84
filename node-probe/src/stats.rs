//! Counters of the probe, shared by the event reader and the gRPC service.

use std::{
    collections::BTreeMap,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

#[derive(Default)]
pub struct ProbeStats {
    seen_flows: AtomicU64,
    lost_kernel: AtomicU64,
    decode_errors: AtomicU64,
    policy_reads: AtomicU64,
    policy_revision: AtomicU64,
    datapath: Mutex<BTreeMap<String, u64>>,
}

#[derive(Debug, Clone, Default)]
pub struct StatsSnapshot {
    pub seen_flows: u64,
    pub lost_kernel: u64,
    pub decode_errors: u64,
    pub policy_reads: u64,
    pub policy_revision: u64,
    pub datapath: BTreeMap<String, u64>,
}

impl ProbeStats {
    pub fn add_seen(&self, n: u64) {
        self.seen_flows.fetch_add(n, Ordering::Relaxed);
    }
    pub fn add_lost_kernel(&self, n: u64) {
        self.lost_kernel.fetch_add(n, Ordering::Relaxed);
    }
    pub fn add_decode_error(&self) {
        self.decode_errors.fetch_add(1, Ordering::Relaxed);
    }
    /// A changed set of manifests was read (and, if valid, applied at `revision`).
    pub fn policy_read(&self, revision: u64) {
        self.policy_revision.store(revision, Ordering::Relaxed);
        self.policy_reads.fetch_add(1, Ordering::Release);
    }
    pub fn set_datapath(&self, counters: BTreeMap<String, u64>) {
        *self.datapath.lock().unwrap_or_else(|e| e.into_inner()) = counters;
    }
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            seen_flows: self.seen_flows.load(Ordering::Relaxed),
            lost_kernel: self.lost_kernel.load(Ordering::Relaxed),
            decode_errors: self.decode_errors.load(Ordering::Relaxed),
            policy_reads: self.policy_reads.load(Ordering::Acquire),
            policy_revision: self.policy_revision.load(Ordering::Relaxed),
            datapath: self
                .datapath
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        }
    }
}
