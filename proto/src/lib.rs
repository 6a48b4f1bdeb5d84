//! The flows API, generated from `flow.proto` and `observer.proto`.
//!
//! The same `Observer` service is served by every node-probe and by the relay, so a
//! client works against either.

pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("flows.v1");
}

pub use v1::*;
