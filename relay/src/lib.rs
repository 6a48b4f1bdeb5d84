//! The flows relay: one Observer API for the whole cluster.
//!
//! [`peers`] keeps a connection to every node-probe (backoff, health checks); [`merge`]
//! orders flows from several nodes with a bounded sort window; [`server`] serves the same
//! Observer API as a node-probe, so every client works against either. Annotation from
//! the Kubernetes API and the store come next (issues 4 and 5).

pub mod merge;
pub mod peers;
pub mod server;
