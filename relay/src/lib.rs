//! The flows relay: one Observer API for the whole cluster.
//!
//! [`peers`] keeps a connection to every node-probe (backoff, health checks); [`merge`]
//! orders flows from several nodes with a bounded sort window; [`server`] serves the same
//! Observer API as a node-probe, so every client works against either, annotated from
//! the cluster index (`flows-k8s`); [`sink`] writes every flow to the store
//! (`flows-store`), which also answers history and audit requests.

pub mod merge;
pub mod peers;
pub mod server;
pub mod sink;

/// Largest gRPC request the relay decodes (filters, history queries): anything near it
/// is hostile or a mistake and is refused with OUT_OF_RANGE.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
