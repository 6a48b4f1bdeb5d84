//! How the `flows` command reaches a relay or node-probe: plaintext, or mutual TLS from
//! the global `--tls-*` flags (or `FLOWS_TLS_*`). A lab started with `--tls` keeps its
//! certificates in its state directory; they are used when no flag says otherwise.

use std::{path::Path, sync::OnceLock};

use anyhow::Context;
use flows_tls::{ClientTls, ClientTlsArgs, Dialer};
use tonic::transport::Channel;

static FLAGS: OnceLock<ClientTlsArgs> = OnceLock::new();

/// Called once by main with the parsed global flags.
pub fn set_flags(flags: ClientTlsArgs) {
    let _ = FLAGS.set(flags);
}

/// The lab's client TLS towards a server with this certificate name, if the lab runs
/// with TLS.
pub fn lab_tls(lab_dir: &Path, name: &str) -> Option<ClientTls> {
    let dir = flows_lab::state::tls_dir(lab_dir);
    dir.join("ca.crt").exists().then(|| ClientTls {
        ca: dir.join("ca.crt"),
        cert: Some(dir.join("client.crt")),
        key: Some(dir.join("client.key")),
        server_name: Some(name.to_string()),
    })
}

/// Which of the lab's servers a command talks to (their certificates' names differ).
#[derive(Clone, Copy)]
pub enum LabServer {
    Relay,
    Probe,
}

/// The dialer for this invocation: the flags if any were given, else the lab's TLS
/// when the server is the lab's own, else plaintext.
pub fn dialer(lab_dir: &Path, lab: Option<LabServer>) -> anyhow::Result<Dialer> {
    let flags = FLAGS.get().cloned().unwrap_or_default();
    let tls = match (flags.to_config()?, lab) {
        (Some(t), _) => Some(t),
        (None, Some(LabServer::Relay)) => lab_tls(lab_dir, flows_lab::state::LAB_RELAY_NAME),
        (None, Some(LabServer::Probe)) => lab_tls(lab_dir, flows_lab::state::LAB_PROBE_NAME),
        (None, None) => None,
    };
    Ok(Dialer::new(tls.as_ref())?)
}

/// The server a command talks to: `--server` when given, else the lab's relay (with the
/// lab's TLS), else the error `missing` (what to give instead).
pub fn relay_or_flag(server: Option<&String>, lab_dir: &Path, missing: &str) -> anyhow::Result<(String, Dialer)> {
    let addr = match (server, crate::lab::probes::relay_address(lab_dir)) {
        (Some(s), _) => s.clone(),
        (None, Some(r)) => r,
        (None, None) => anyhow::bail!("{missing}"),
    };
    let dialer = dialer(lab_dir, server.is_none().then_some(LabServer::Relay))?;
    Ok((addr, dialer))
}

/// A connected channel to `server` (`host:port`, `http://…` or `https://…`).
pub async fn channel(dialer: &Dialer, server: &str) -> anyhow::Result<Channel> {
    let ep = dialer.endpoint(server)?;
    ep.connect()
        .await
        .map_err(|e| anyhow::anyhow!(flows_tls::error_chain(&e)))
        .with_context(|| format!("connecting to {server}"))
}
