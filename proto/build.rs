fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=flow.proto");
    println!("cargo:rerun-if-changed=observer.proto");
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(&["flow.proto", "observer.proto"], &["."])?;
    Ok(())
}
