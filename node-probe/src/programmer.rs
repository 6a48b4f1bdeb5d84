//! The probe's policy source: the manifests in a directory, read again when they
//! change, compiled into this node's datapath state and programmed into the maps. Bad
//! manifests are reported and the policy in force stays.

use std::{
    collections::HashMap,
    net::IpAddr,
    path::PathBuf,
    sync::{Arc, RwLock},
    time::Duration,
};

use flows_manifest_files::ManifestFile;
use flows_policy::{
    Manifests,
    compile::{IdentityAllocator, Mode, NodeView, SetTable, compile_datapath},
};
use tokio::sync::watch;

use crate::{datapath::PolicyMaps, stats::ProbeStats};

/// The policy sets the programmer writes and the decoder reads (names first, so events
/// that reference a new set find it).
pub type SharedSets = Arc<RwLock<SetTable>>;

/// Pods by address from the manifests, replaced whole on a change; the decoder reads them.
pub type SharedEndpoints = Arc<RwLock<Arc<HashMap<IpAddr, flows_proto::Endpoint>>>>;

/// Reads the manifests, compiles this node's policy state and programs the maps.
pub struct PolicyProgrammer {
    stats: Arc<ProbeStats>,
    endpoints: SharedEndpoints,
    maps: PolicyMaps,
    sets: SharedSets,
    alloc: IdentityAllocator,
    /// Every manifest last read, with its length and modification time.
    signature: Vec<ManifestFile>,
    node: String,
    default_mode: Mode,
}

impl PolicyProgrammer {
    pub fn new(
        stats: Arc<ProbeStats>,
        endpoints: SharedEndpoints,
        maps: PolicyMaps,
        sets: SharedSets,
        node: String,
        default_mode: Mode,
    ) -> PolicyProgrammer {
        PolicyProgrammer {
            stats,
            endpoints,
            maps,
            sets,
            alloc: IdentityAllocator::new(),
            signature: Vec::new(),
            node,
            default_mode,
        }
    }

    /// Waits until `dir` holds manifests (polled: the directory may not exist yet),
    /// then programs them.
    pub async fn first(&mut self, dir: &std::path::Path) {
        let mut said = false;
        while Self::signature(dir).is_empty() {
            if !said {
                tracing::info!(dir = %dir.display(), "waiting for the first manifests");
                said = true;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        self.sync(dir);
    }

    /// The manifests now in `dir`; none while it cannot be listed (it may not exist yet).
    fn signature(dir: &std::path::Path) -> Vec<ManifestFile> {
        match flows_manifest_files::list(&[dir.to_path_buf()]) {
            Ok(files) => files,
            Err(e) => {
                tracing::debug!(error = %e, "listing manifests");
                Vec::new()
            }
        }
    }

    /// Re-reads the manifests if any changed. Bad manifests are reported and the policy
    /// already in force stays.
    fn sync(&mut self, dir: &std::path::Path) {
        let sig = Self::signature(dir);
        if sig == self.signature {
            return;
        }
        self.signature = sig.clone();
        self.read(&sig);
        self.stats.policy_read(u64::from(self.maps.revision()));
    }

    fn read(&mut self, sig: &[ManifestFile]) {
        let texts = match flows_manifest_files::read(sig) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "reading manifest; policy unchanged");
                return;
            }
        };
        let m = match Manifests::parse(texts.iter().map(|(n, t)| (n.as_str(), t.as_str()))) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "invalid manifests; policy unchanged");
                return;
            }
        };
        let index = flows_flow::enrich::endpoints_of(&m.cluster);
        if let Ok(mut e) = self.endpoints.write() {
            *e = Arc::new(index);
        }
        let engine = m.engine();
        let node = self.node.clone();
        let default_mode = self.default_mode;
        let is_local = |p: &flows_policy::PodInfo| p.node.as_deref() == Some(node.as_str());
        let mode_of = |ns: &str| m.modes.get(ns).copied().unwrap_or(default_mode);
        let table = self.sets.read().map(|t| t.clone()).unwrap_or_default();
        let state = compile_datapath(
            &m.cluster,
            &engine,
            &NodeView {
                is_local: &is_local,
                mode_of: &mode_of,
            },
            &mut self.alloc,
            table,
        );
        // Names first: events that reference the new sets may arrive right after.
        if let Ok(mut t) = self.sets.write() {
            *t = state.sets.clone();
        }
        let (policies, endpoints) = (m.policies.len(), state.endpoints.len());
        // Once a policy is in force, a pod it does not know yet is closed, not open.
        let applied = self.maps.apply(state).and_then(|u| self.maps.set_unknown_endpoint_mode(default_mode).map(|()| u));
        match applied {
            Ok(u) => tracing::info!(
                policies,
                endpoints,
                written = u.written,
                removed = u.removed,
                revision = u.revision,
                "policy updated"
            ),
            Err(e) => tracing::error!(error = %e, "programming the policy maps"),
        }
    }
}

/// Programs every change of the manifests until `stop`.
pub async fn watch_policy(
    mut programmer: PolicyProgrammer,
    dir: Option<PathBuf>,
    mut stop: watch::Receiver<bool>,
) {
    let Some(dir) = dir else { return };
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = tick.tick() => programmer.sync(&dir),
            _ = stop.changed() => return,
        }
    }
}
