//! The flows API, generated from `flow.proto` and `observer.proto`.
//!
//! The same `Observer` service is served by every node-probe and by the relay, so a
//! client works against either. Every message also has serde impls (JSON with the proto
//! field names), used by `flows observe -o json` and `--input-file`.

pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("flows.v1");
    include!(concat!(env!("OUT_DIR"), "/flows.v1.serde.rs"));
}

pub use pbjson_types::Timestamp;
pub use v1::*;

/// A Timestamp for a point in wall-clock time.
pub fn timestamp(t: std::time::SystemTime) -> Timestamp {
    let (seconds, nanos) = match t.duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => (d.as_secs() as i64, d.subsec_nanos() as i32),
        Err(e) => {
            // Before 1970: a negative count of seconds with non-negative nanos.
            let d = e.duration();
            let mut s = -(d.as_secs() as i64);
            let mut n = d.subsec_nanos() as i32;
            if n > 0 {
                s -= 1;
                n = 1_000_000_000 - n;
            }
            (s, n)
        }
    };
    Timestamp { seconds, nanos }
}

pub fn timestamp_now() -> Timestamp {
    timestamp(std::time::SystemTime::now())
}

/// The SystemTime of a Timestamp (None when out of range).
pub fn system_time(t: &Timestamp) -> Option<std::time::SystemTime> {
    if !(0..1_000_000_000).contains(&t.nanos) {
        return None;
    }
    let base = std::time::UNIX_EPOCH;
    if t.seconds >= 0 {
        base.checked_add(std::time::Duration::new(t.seconds as u64, t.nanos as u32))
    } else {
        base.checked_sub(std::time::Duration::from_secs(t.seconds.unsigned_abs()))?
            .checked_add(std::time::Duration::from_nanos(t.nanos as u64))
    }
}
