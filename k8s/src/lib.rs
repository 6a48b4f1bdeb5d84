//! The cluster as flows sees it, and the one crate that talks to the Kubernetes API.
//!
//! - [`index::ClusterIndex`] (pure): address → pod (namespace, labels, workloads, node),
//!   service, node or world; deletions and address reuse handled.
//! - [`watch`]: kube-rs watchers that keep an index current.
//! - [`manifests`]: the same index from manifest files, offline (the lab, saved objects).
//! - [`discover`]: the node-probe pods of a cluster, for the relay.
//! - [`snapshot`]: the cluster read once from the API as manifests (policy advice).
//! - [`export`]: Namespaces, Pods and NetworkPolicies written as the manifest file the
//!   node-probe enforces (`flows kube-sync`, the probe's sidecar on a cluster).

pub mod cluster;
pub mod discover;
pub mod export;
pub mod index;
pub mod manifests;
pub mod snapshot;
pub mod watch;

pub use index::{Cidr, ClusterIndex};
pub use kube::Client;
