//! The offline source of the index: Kubernetes objects read from manifest files (for
//! example the lab's `00-cluster.yaml`, or `kubectl get pods,services,nodes,replicasets
//! -A -o yaml` saved from a cluster).

use std::path::{Path, PathBuf};

use flows_manifest_files::{ListError, ManifestFile};
use flows_policy::load::{self, LoadError};

use crate::index::{Cidr, ClusterIndex, Object};

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("reading manifests: {0}")]
    Files(#[from] ListError),
}

/// The objects of one text that the index takes, in order; other kinds are skipped.
pub fn objects(source: &str, text: &str) -> Result<Vec<Object>, LoadError> {
    let mut out = Vec::new();
    for l in load::parse(source, text)? {
        let obj = match l.object {
            load::Object::Pod(p) => Object::Pod(p),
            load::Object::Namespace(n) => Object::Namespace(n),
            load::Object::Other {
                kind,
                api_version,
                value,
            } => match (kind.as_str(), api_version.as_str()) {
                ("Service", "v1") => Object::Service(Box::new(load::typed(*value, &l.origin, &kind)?)),
                ("Node", "v1") => Object::Node(Box::new(load::typed(*value, &l.origin, &kind)?)),
                ("ReplicaSet", "apps/v1") => {
                    Object::ReplicaSet(Box::new(load::typed(*value, &l.origin, &kind)?))
                }
                ("Job", "batch/v1") => Object::Job(Box::new(load::typed(*value, &l.origin, &kind)?)),
                _ => continue,
            },
            load::Object::NetworkPolicy(_) => continue,
        };
        out.push(obj);
    }
    Ok(out)
}

/// Builds an index from every manifest under `path` (the files
/// `flows_manifest_files::list` names).
pub fn read(path: &Path, cluster_cidrs: Vec<Cidr>) -> Result<ClusterIndex, ManifestError> {
    index_of(&flows_manifest_files::list(&[path.to_path_buf()])?, cluster_cidrs)
}

/// Builds an index from one manifest text (`source` names it in errors).
pub fn index_of_text(source: &str, text: &str, cluster_cidrs: Vec<Cidr>) -> Result<ClusterIndex, LoadError> {
    let mut index = ClusterIndex::new(cluster_cidrs);
    for o in objects(source, text)? {
        index.apply(o);
    }
    Ok(index)
}

fn index_of(files: &[ManifestFile], cluster_cidrs: Vec<Cidr>) -> Result<ClusterIndex, ManifestError> {
    let mut index = ClusterIndex::new(cluster_cidrs);
    for (name, text) in flows_manifest_files::read(files)? {
        for o in objects(&name, &text)? {
            index.apply(o);
        }
    }
    Ok(index)
}

/// A manifest directory read again when it changes.
pub struct ManifestSource {
    path: PathBuf,
    cidrs: Vec<Cidr>,
    /// The files last read, so any change (added, removed, rewritten) reloads.
    seen: Option<Vec<ManifestFile>>,
}

impl ManifestSource {
    pub fn new(path: PathBuf, cluster_cidrs: Vec<Cidr>) -> ManifestSource {
        ManifestSource {
            path,
            cidrs: cluster_cidrs,
            seen: None,
        }
    }

    /// A fresh index when the files changed since the last call; `Ok(None)` when not.
    /// On error the caller keeps the index it has.
    pub fn reload(&mut self) -> Result<Option<ClusterIndex>, ManifestError> {
        let files = flows_manifest_files::list(std::slice::from_ref(&self.path))?;
        if self.seen.as_ref() == Some(&files) {
            return Ok(None);
        }
        let index = index_of(&files, self.cidrs.clone())?;
        self.seen = Some(files);
        Ok(Some(index))
    }
}
