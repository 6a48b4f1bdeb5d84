//! The offline source of the index: Kubernetes objects read from manifest files (for
//! example the lab's `00-cluster.yaml`, or `kubectl get pods,services,nodes,replicasets
//! -A -o yaml` saved from a cluster).

use std::{
    path::{Path, PathBuf},
    time::SystemTime,
};

use flows_policy::load::{self, LoadError};

use crate::index::{Cidr, ClusterIndex, Object};

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
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

/// `*.yaml`, `*.yml` and `*.json` files in a directory (or the one file given), in name
/// order, with the newest modification time among them.
fn files(path: &Path) -> Result<(Vec<PathBuf>, Option<SystemTime>), ManifestError> {
    let io = |source| ManifestError::Io {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    let mut list = Vec::new();
    if meta.is_dir() {
        for e in std::fs::read_dir(path).map_err(io)? {
            let p = e.map_err(io)?.path();
            let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("");
            let hidden = p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.'));
            if !hidden && matches!(ext, "yaml" | "yml" | "json") {
                list.push(p);
            }
        }
        list.sort();
    } else {
        list.push(path.to_path_buf());
    }
    let mut newest = meta.modified().ok();
    for p in &list {
        if let Ok(t) = std::fs::metadata(p).and_then(|m| m.modified()) {
            newest = newest.max(Some(t));
        }
    }
    Ok((list, newest))
}

/// Builds an index from every manifest under `path`.
pub fn read(path: &Path, cluster_cidrs: Vec<Cidr>) -> Result<ClusterIndex, ManifestError> {
    let (list, _) = files(path)?;
    let mut index = ClusterIndex::new(cluster_cidrs);
    for p in list {
        let text = std::fs::read_to_string(&p).map_err(|source| ManifestError::Io {
            path: p.clone(),
            source,
        })?;
        for o in objects(&p.display().to_string(), &text)? {
            index.apply(o);
        }
    }
    Ok(index)
}

/// A manifest directory read again when it changes.
pub struct ManifestSource {
    path: PathBuf,
    cidrs: Vec<Cidr>,
    seen: Option<SystemTime>,
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
        let (_, newest) = files(&self.path)?;
        if self.seen.is_some() && newest == self.seen {
            return Ok(None);
        }
        let index = read(&self.path, self.cidrs.clone())?;
        self.seen = newest;
        Ok(Some(index))
    }
}
