//! Builds the eBPF object (crate `flows-ebpf`, target bpfel) with the pinned nightly and
//! places it in OUT_DIR, where `include_bytes_aligned!` embeds it into the probe.

fn main() {
    // The pinned nightly that bpf-linker was built against (see scripts/setup.sh).
    let toolchain = std::env::var("FLOWS_NIGHTLY").unwrap_or_else(|_| "nightly".to_string());
    println!("cargo:rerun-if-env-changed=FLOWS_NIGHTLY");
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../ebpf");
    let pkg = aya_build::Package {
        name: "flows-ebpf",
        root_dir: root,
        ..Default::default()
    };
    if let Err(e) = aya_build::build_ebpf([pkg], aya_build::Toolchain::Custom(&toolchain)) {
        panic!("building the eBPF programs failed: {e:#}\n(run scripts/setup.sh once: it installs the nightly's rust-src and bpf-linker)");
    }
}
