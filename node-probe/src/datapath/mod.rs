//! The eBPF datapath: the only module that speaks to aya.
//!
//! `load` turns the object built from `flows-ebpf` into programs and maps; `attach`
//! runs the thread that attaches them to interfaces (and pins links so enforcement
//! outlives the probe); `policy_maps` programs compiled policy into the kernel's maps;
//! `harness` (feature `test-harness`, for tests and benchmarks) runs the programs on
//! crafted packets without attaching anything.

mod attach;
mod error;
#[cfg(feature = "test-harness")]
mod harness;
mod load;
mod policy_maps;

pub use attach::{Datapath, DatapathConfig, remove_pinned, remove_stale_filters, tcx_programs};
pub use error::DatapathError;
#[cfg(feature = "test-harness")]
pub use harness::{PacketCost, TestHarness, measure_packet_cost};
pub use load::{
    CountersMap, DatapathMaps, EventsMap, PROG_BENCH_NOP, PROG_FROM_ENDPOINT, PROG_FROM_NETWORK,
    PROG_KFREE_SKB, PROG_TO_ENDPOINT, PROG_TO_NETWORK, read_counters,
};
pub use policy_maps::{PolicyMaps, PolicyUpdate};
