//! The TC programs loaded on their own and driven with BPF_PROG_TEST_RUN, for the
//! tests and benchmarks (feature `test-harness`; the probe itself never builds it).

use aya::Ebpf;
use flows_common::counter;
use flows_policy::compile::DatapathState;

use crate::{
    btf::Btf,
    datapath::{
        error::{DatapathError, prog_err},
        load::{
            CountersMap, DatapathMaps, EventsMap, PROG_BENCH_NOP, PROG_FROM_ENDPOINT, PROG_TO_ENDPOINT,
            PROG_TO_NETWORK, classifier, load_object, read_counters, take_maps,
        },
        policy_maps::{PolicyMaps, PolicyUpdate},
    },
};

/// Per-packet cost of the TC programs, measured with BPF_PROG_TEST_RUN.
#[derive(Debug, Clone, Copy)]
pub struct PacketCost {
    /// Mean nanoseconds per run of the empty baseline program.
    pub nop_ns: f64,
    /// Mean nanoseconds per run of `flows_from_ep` on a new connection (a SYN with a
    /// fresh tuple: conntrack insert, drop-watch insert, ring buffer event).
    pub syn_ns: f64,
    /// Same for a packet of a tracked connection (conntrack hit, no event).
    pub established_ns: f64,
    /// Same for the empty program run the way `syn_ns` is (one packet per syscall).
    pub nop_single_ns: f64,
}

/// Measures [`PacketCost`]: `syn` runs one syscall per packet (each with a new source
/// port, so each is a new attempt); the others repeat one packet `repeat` times.
pub fn measure_packet_cost(
    syn: impl Fn(u16) -> Vec<u8>,
    established: &[u8],
    syns: u16,
    repeat: u32,
) -> Result<PacketCost, DatapathError> {
    let mut h = TestHarness::new()?;
    let mut syn_total = 0.0;
    let mut nop_single_total = 0.0;
    for i in 0..syns {
        let pkt = syn(10_000 + i);
        syn_total += h.run_program(PROG_FROM_ENDPOINT, &pkt, 1)?.1;
        nop_single_total += h.run_program(PROG_BENCH_NOP, &pkt, 1)?.1;
    }
    // Prime the conntrack entry, then measure hits.
    h.run_program(PROG_FROM_ENDPOINT, established, 1)?;
    let established_ns = h.run_program(PROG_FROM_ENDPOINT, established, repeat)?.1;
    let nop_ns = h.run_program(PROG_BENCH_NOP, established, repeat)?.1;
    Ok(PacketCost {
        nop_ns,
        syn_ns: syn_total / syns as f64,
        established_ns,
        nop_single_ns: nop_single_total / syns as f64,
    })
}

/// The TC programs loaded on their own, driven with BPF_PROG_TEST_RUN: crafted packets
/// in, the events and counters they produce out. For tests and benchmarks; attaches
/// nothing. Each harness has its own maps, so tests do not see each other's state.
pub struct TestHarness {
    ebpf: Ebpf,
    events: EventsMap,
    counters: CountersMap,
    policy: PolicyMaps,
}

impl TestHarness {
    pub fn new() -> Result<TestHarness, DatapathError> {
        let btf = Btf::from_sys_fs()?;
        let offsets = btf.kernel_offsets()?;
        let ct = crate::btf::conntrack_offsets(btf).unwrap_or_default();
        let mut ebpf = load_object(offsets, ct, false, (u32::MAX, u32::MAX))?;
        for name in [PROG_FROM_ENDPOINT, PROG_TO_ENDPOINT, PROG_TO_NETWORK, PROG_BENCH_NOP] {
            classifier(&mut ebpf, name)?.load().map_err(prog_err(name))?;
        }
        let DatapathMaps {
            events,
            counters,
            policy,
        } = take_maps(&mut ebpf)?;
        Ok(TestHarness {
            ebpf,
            events,
            counters,
            policy,
        })
    }

    /// Runs one packet through `flows_from_ep` (leaving the pod) or `flows_to_ep`
    /// (entering it); returns the program's verdict (TC_ACT_*).
    pub fn run(&mut self, from_endpoint: bool, packet: &[u8]) -> Result<u32, DatapathError> {
        let name = if from_endpoint {
            PROG_FROM_ENDPOINT
        } else {
            PROG_TO_ENDPOINT
        };
        Ok(self.run_program(name, packet, 1)?.0)
    }

    /// Programs the policy maps (as the probe does on a manifest change).
    pub fn apply_policy(&mut self, state: DatapathState) -> Result<PolicyUpdate, DatapathError> {
        self.policy.apply(state)
    }

    /// One packet through a program: (verdict, nanoseconds the kernel measured).
    /// `program` is one of the `PROG_*` classifier names.
    pub fn run_timed(&mut self, program: &'static str, packet: &[u8]) -> Result<(u32, f64), DatapathError> {
        self.run_program(program, packet, 1)
    }

    /// (verdict, mean ns per run) of `repeat` runs of a program on one packet.
    fn run_program(
        &mut self,
        name: &'static str,
        packet: &[u8],
        repeat: u32,
    ) -> Result<(u32, f64), DatapathError> {
        use aya::programs::{TestRun, TestRunOptions};
        let r = classifier(&mut self.ebpf, name)?
            .test_run(TestRunOptions {
                data_in: Some(packet),
                repeat,
                ..Default::default()
            })
            .map_err(prog_err(name))?;
        Ok((r.return_value, r.duration.as_nanos() as f64))
    }

    /// Events emitted since the last call.
    pub fn events(&mut self) -> Vec<flows_common::RawEvent> {
        let mut out = Vec::new();
        while let Some(item) = self.events.next() {
            if item.len() == flows_common::RAW_EVENT_SIZE {
                // SAFETY: length checked; RawEvent is plain data.
                out.push(unsafe {
                    std::ptr::read_unaligned(item.as_ptr() as *const flows_common::RawEvent)
                });
            }
        }
        out
    }

    pub fn counters(&self) -> Result<[u64; counter::COUNT as usize], DatapathError> {
        read_counters(&self.counters)
    }
}
