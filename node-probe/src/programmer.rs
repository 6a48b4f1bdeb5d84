//! The probe's policy source: the manifests in a directory, read again when they
//! change, compiled into this node's datapath state and programmed into the maps. Bad
//! manifests are reported and the policy in force stays.

use std::{
    os::unix::fs::MetadataExt,
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use flows_parser::{EndpointIndex, PolicySets};
use flows_policy::{
    Manifests,
    compile::{IdentityAllocator, Mode, NodeView, compile_datapath},
};
use tokio::sync::watch;

use crate::{datapath::PolicyMaps, stats::ProbeStats};

/// Reads the manifests, compiles this node's policy state and programs the maps.
pub struct PolicyProgrammer {
    stats: Arc<ProbeStats>,
    endpoints: EndpointIndex,
    maps: PolicyMaps,
    sets: PolicySets,
    alloc: IdentityAllocator,
    /// (path, length, modification time) of every manifest last read.
    signature: Vec<(PathBuf, u64, i64, i64)>,
    node: String,
    default_mode: Mode,
}

fn manifest_files(dir: &std::path::Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    let mut entries: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            manifest_files(&p, out);
        } else if p
            .extension()
            .is_some_and(|x| x == "yaml" || x == "yml" || x == "json")
        {
            out.push(p);
        }
    }
}

impl PolicyProgrammer {
    pub fn new(
        stats: Arc<ProbeStats>,
        endpoints: EndpointIndex,
        maps: PolicyMaps,
        sets: PolicySets,
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

    fn signature(dir: &std::path::Path) -> Vec<(PathBuf, u64, i64, i64)> {
        let mut files = Vec::new();
        manifest_files(dir, &mut files);
        files
            .into_iter()
            .filter_map(|p| {
                let m = std::fs::metadata(&p).ok()?;
                Some((p, m.len(), m.mtime(), m.mtime_nsec()))
            })
            .collect()
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

    fn read(&mut self, sig: &[(PathBuf, u64, i64, i64)]) {
        let mut texts = Vec::new();
        for (p, ..) in sig {
            match std::fs::read_to_string(p) {
                Ok(t) => texts.push((p.display().to_string(), t)),
                Err(e) => {
                    tracing::warn!(path = %p.display(), error = %e, "reading manifest; policy unchanged");
                    return;
                }
            }
        }
        let m = match Manifests::parse(texts.iter().map(|(n, t)| (n.as_str(), t.as_str()))) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "invalid manifests; policy unchanged");
                return;
            }
        };
        let index = flows_parser::endpoints_of(&m.cluster);
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
        match self.maps.apply(state) {
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
