//! Kernel event -> Flow decode throughput on one core, against a baseline of copying the
//! same events out of a byte buffer (what the reader does before decoding anyway).
//! Run: `cargo bench -p flows-node-probe --bench decode`.

use std::{
    collections::HashMap,
    hint::black_box,
    sync::{Arc, RwLock},
    time::Instant,
};

use flows_common::{POINT_FROM_ENDPOINT, RawEvent};
use flows_node_probe::ring::{Entry, FlowRing};
use flows_parser::{Clock, Decoder, event_bytes, sample_event};

fn main() {
    let n: usize = 1_000_000;
    let events: Vec<Vec<u8>> = (0..1024u16)
        .map(|i| event_bytes(&sample_event(POINT_FROM_ENDPOINT, 10_000 + i)).to_vec())
        .collect();
    let decoder = Decoder::new(
        "node-1".into(),
        Arc::new(RwLock::new(HashMap::from([(7, "fl00000001".to_string())]))),
        HashMap::new(),
        Clock::now(),
    );

    // Baseline: read each record out of the buffer.
    let t = Instant::now();
    for i in 0..n {
        let b = &events[i & 1023];
        // SAFETY: each buffer holds exactly one RawEvent.
        let raw = unsafe { std::ptr::read_unaligned(b.as_ptr() as *const RawEvent) };
        black_box(raw);
    }
    let base = t.elapsed();

    let t = Instant::now();
    for i in 0..n {
        black_box(decoder.decode_bytes(&events[i & 1023]).ok());
    }
    let decode = t.elapsed();

    let ring = FlowRing::new(4096).expect("ring");
    let t = Instant::now();
    for i in 0..n {
        if let Ok(f) = decoder.decode_bytes(&events[i & 1023]) {
            ring.push(Entry::Flow(f));
        }
    }
    let decode_push = t.elapsed();

    let rate = |d: std::time::Duration| n as f64 / d.as_secs_f64();
    println!("decode throughput, one core, {n} events");
    println!("  copy only (baseline): {:>12.0} events/s", rate(base));
    println!(
        "  decode to Flow:       {:>12.0} flows/s  ({:.1}x the baseline's time)",
        rate(decode),
        decode.as_secs_f64() / base.as_secs_f64()
    );
    println!(
        "  decode + ring push:   {:>12.0} flows/s  ({:.1}x the baseline's time)",
        rate(decode_push),
        decode_push.as_secs_f64() / base.as_secs_f64()
    );
}
