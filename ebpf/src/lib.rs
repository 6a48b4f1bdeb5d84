//! The eBPF programs live in `main.rs` (a bin target built for bpfel by aya-build).
//! This empty library lets node-probe declare a build-dependency on the crate, so cargo
//! rebuilds the probe when the kernel side changes.
#![no_std]
