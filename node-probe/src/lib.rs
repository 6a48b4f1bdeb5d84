//! flows node-probe: the per-node agent.
//!
//! `datapath` loads and attaches the eBPF programs (the only module using aya), `ifaces`
//! finds pod interfaces, the `flows-parser` crate turns kernel events into Flow
//! records, `ring` keeps the recent ones, `server` serves them over gRPC, `programmer`
//! turns manifests into the policy maps, and `probe` wires it all together.

pub mod btf;
pub mod datapath;
pub mod ifaces;

/// Prometheus metrics (the `flows-metrics` crate, shared with the relay).
pub use flows_metrics as metrics;
pub mod probe;
pub mod programmer;
pub mod ring;
pub mod server;
pub mod stats;
