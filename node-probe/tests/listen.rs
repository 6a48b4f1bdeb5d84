//! The probe refuses to serve flows in plaintext to the network unless told to, before
//! it touches the kernel (no root needed to see the refusal).

use std::process::Command;

#[test]
fn plaintext_on_a_network_address_is_refused_unless_said() {
    let out = Command::new(env!("CARGO_BIN_EXE_flows-node-probe"))
        .args(["--node-name", "n1", "--listen", "0.0.0.0:0"])
        .output()
        .expect("run flows-node-probe");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refusing to serve plaintext on 0.0.0.0:0"), "{err}");
    assert!(err.contains("--insecure-listen"), "{err}");
}
