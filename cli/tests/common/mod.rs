//! What the lab tests share: running `flows` against a lab's state directory, and
//! driving a scenario. (Each test file is its own crate; not all use every helper.)
#![allow(dead_code)]

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use flows_lab::drive::Report;

/// The repository root (the lab's seed scenario is under lab/examples/).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs `flows` with the lab's state in `dir`.
pub fn flows(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flows"))
        .args(args)
        .env("FLOWS_LAB_DIR", dir)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run flows")
}

/// Runs `flows`, which must succeed; its standard output.
pub fn ok(dir: &Path, args: &[&str]) -> String {
    let out = flows(dir, args);
    assert!(
        out.status.success(),
        "flows {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `flows lab drive SCENARIO -o json`: the report. Failed expectations make drive exit
/// non-zero; the report says what happened, so the exit status is not checked here.
pub fn drive(dir: &Path, scenario: &Path) -> Report {
    let d = dir.display().to_string();
    let out = flows(dir, &["lab", "drive", &scenario.display().to_string(), "-o", "json", "--state-dir", &d]);
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("drive report: {e}\n{}", String::from_utf8_lossy(&out.stderr)))
}

/// A scenario of `n` allowed TCP attempts, frontend to backend:80.
pub fn scenario(dir: &Path, name: &str, n: usize) -> PathBuf {
    let p = dir.join(format!("{name}.yaml"));
    std::fs::write(
        &p,
        format!(
            "connections:\n  - {{ name: {name}, from: frontend/frontend, to: {{ service: backend/backend }}, protocol: TCP, port: 80, count: {n}, expect: success }}\n"
        ),
    )
    .expect("scenario");
    p
}
