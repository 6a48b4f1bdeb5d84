//! Generates the Rust API (prost messages, tonic client and server) and serde impls
//! (pbjson, proto field names) from the .proto files.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=flow.proto");
    println!("cargo:rerun-if-changed=observer.proto");
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptors = out.join("flows_descriptors.bin");
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .file_descriptor_set_path(&descriptors)
        // Well-known types with serde support, so a Flow round-trips through JSON.
        .extern_path(".google.protobuf.Timestamp", "::pbjson_types::Timestamp")
        .compile_protos(&["flow.proto", "observer.proto"], &["."])?;
    let set = std::fs::read(&descriptors)?;
    pbjson_build::Builder::new()
        .register_descriptors(&set)?
        .preserve_proto_field_names()
        .build(&[".flows"])?;
    Ok(())
}
