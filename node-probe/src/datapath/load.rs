//! The eBPF object: loaded with the globals the kernel programs read, its programs by
//! name, and the maps user space reads or programs.

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf, lpm_trie::LpmTrie},
    programs::SchedClassifier,
};
use flows_common::{CtOffsets, KernelOffsets, counter};

use crate::datapath::{
    error::{DatapathError, map_err, prog_err},
    policy_maps::PolicyMaps,
};

/// The eBPF object built by aya-build from the `flows-ebpf` crate.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/flows-ebpf"));

pub const PROG_FROM_ENDPOINT: &str = "flows_from_ep";
pub const PROG_TO_ENDPOINT: &str = "flows_to_ep";
pub const PROG_KFREE_SKB: &str = "flows_kfree_skb";
pub const PROG_TO_NETWORK: &str = "flows_to_net";
pub const PROG_FROM_NETWORK: &str = "flows_from_net";
/// An empty classifier: the baseline of the cost benchmarks.
pub const PROG_BENCH_NOP: &str = "flows_bench_nop";

pub type EventsMap = RingBuf<MapData>;
pub type CountersMap = PerCpuArray<MapData, u64>;

/// Maps that user space reads or programs, handed out once the datapath is loaded.
pub struct DatapathMaps {
    pub events: EventsMap,
    pub counters: CountersMap,
    pub policy: PolicyMaps,
}

/// Takes the maps user space reads out of the loaded object.
pub(crate) fn take_maps(ebpf: &mut Ebpf) -> Result<DatapathMaps, DatapathError> {
    let events = RingBuf::try_from(
        ebpf.take_map("EVENTS")
            .ok_or(DatapathError::MissingMap { name: "EVENTS" })?,
    )
    .map_err(map_err("EVENTS"))?;
    let counters = PerCpuArray::try_from(
        ebpf.take_map("COUNTERS")
            .ok_or(DatapathError::MissingMap { name: "COUNTERS" })?,
    )
    .map_err(map_err("COUNTERS"))?;
    let take = |ebpf: &mut Ebpf, name: &'static str| {
        ebpf.take_map(name).ok_or(DatapathError::MissingMap { name })
    };
    let policy = PolicyMaps::new(
        LpmTrie::try_from(take(ebpf, "IPCACHE")?).map_err(map_err("IPCACHE"))?,
        BpfHashMap::try_from(take(ebpf, "ENDPOINTS")?).map_err(map_err("ENDPOINTS"))?,
        LpmTrie::try_from(take(ebpf, "POLICY")?).map_err(map_err("POLICY"))?,
        Array::try_from(take(ebpf, "POLICY_REV")?).map_err(map_err("POLICY_REV"))?,
        Array::try_from(take(ebpf, "UNKNOWN_ENDPOINT_MODE")?).map_err(map_err("UNKNOWN_ENDPOINT_MODE"))?,
    );
    Ok(DatapathMaps {
        events,
        counters,
        policy,
    })
}

/// Loads the object with the globals the kernel programs read.
pub(crate) fn load_object(
    offsets: KernelOffsets,
    ct: CtOffsets,
    drop_netns_filter: bool,
    tc_drop_reasons: (u32, u32),
) -> Result<Ebpf, DatapathError> {
    let filter = u32::from(drop_netns_filter);
    EbpfLoader::new()
        .override_global("OFFSETS", &offsets, true)
        .override_global("CT_OFFSETS", &ct, true)
        .override_global("DROP_NETNS_FILTER", &filter, true)
        .override_global("DROP_REASON_TC_INGRESS", &tc_drop_reasons.0, true)
        .override_global("DROP_REASON_TC_EGRESS", &tc_drop_reasons.1, true)
        .load(EBPF_OBJECT)
        .map_err(|e| DatapathError::Load(Box::new(e)))
}

pub(crate) fn classifier<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, DatapathError> {
    ebpf.program_mut(name)
        .ok_or(DatapathError::Program {
            name,
            source: Box::new(aya::programs::ProgramError::UnexpectedProgramType),
        })?
        .try_into()
        .map_err(prog_err(name))
}

/// Sums the per-CPU datapath counters.
pub fn read_counters(
    counters: &CountersMap,
) -> Result<[u64; counter::COUNT as usize], DatapathError> {
    let mut out = [0u64; counter::COUNT as usize];
    for (i, slot) in out.iter_mut().enumerate() {
        let values = counters.get(&(i as u32), 0).map_err(map_err("COUNTERS"))?;
        *slot = values.iter().sum();
    }
    Ok(out)
}
