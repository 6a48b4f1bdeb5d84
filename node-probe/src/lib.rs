//! flows node-probe: the per-node agent.
//!
//! `datapath` loads and attaches the eBPF programs (the only module using aya), `ifaces`
//! finds pod interfaces, `decode` turns kernel events into Flow records, `ring` keeps
//! the recent ones, `server` serves them over gRPC and `probe` wires it all together.

pub mod btf;
pub mod datapath;
pub mod decode;
pub mod ifaces;
pub mod metrics;
pub mod probe;
pub mod ring;
pub mod server;
pub mod stats;
