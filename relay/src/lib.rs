//! The flows relay: one Observer API for the whole cluster.
//!
//! [`peers`] keeps a connection to every node-probe (backoff, health checks); [`merge`]
//! orders flows from several nodes with a bounded sort window; [`stream`] answers one
//! request from every node and the store, annotated from the cluster index
//! (`flows-k8s`); [`server`] serves it as the same Observer API a node-probe has, so
//! every client works against either; [`sink`] writes every flow to the store
//! (`flows-store`, through [`store_slot`]: the store may open after the relay starts);
//! [`history`] serves the audit and attempts from it; [`run`] is the
//! whole relay from its configuration.

pub mod history;
pub mod merge;
pub mod peers;
pub mod run;
pub mod server;
pub mod sink;
pub mod store_slot;
pub mod stream;

/// Largest gRPC request the relay decodes (filters, history queries): anything near it
/// is hostile or a mistake and is refused with OUT_OF_RANGE.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
