//! `flows certs create`: a CA and the certificates of a flows deployment, as PEM files.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use flows_tls::certs::{CertSpec, create};

#[derive(Subcommand)]
pub enum CertsCommand {
    /// A new CA, and signed by it: the node-probe server certificate, the relay's
    /// (server towards clients, client towards node-probes) and a client certificate
    /// for `flows` users. Keys are written mode 0600; keep ca.key off the cluster.
    Create {
        /// Directory to write ca.crt, ca.key, probe.crt/key, relay.crt/key, client.crt/key.
        #[arg(long)]
        out: PathBuf,
        /// Name (DNS or IP) in the node-probe certificate; the relay checks it with
        /// --peer-tls-server-name (repeatable).
        #[arg(long = "probe-name", default_values_t = CertSpec::default().probe_names)]
        probe_names: Vec<String>,
        /// Name (DNS or IP) in the relay certificate: its Service's names, or the
        /// address clients dial (repeatable).
        #[arg(long = "relay-name", default_values_t = CertSpec::default().relay_names)]
        relay_names: Vec<String>,
        /// Common name of the client certificate.
        #[arg(long, default_value = "flows-client")]
        client_name: String,
        /// Days the certificates are valid (the CA: twice as long).
        #[arg(long, default_value_t = 365)]
        days: u32,
        /// Replace files that exist.
        #[arg(long)]
        force: bool,
    },
}

pub fn run(cmd: CertsCommand) -> anyhow::Result<()> {
    match cmd {
        CertsCommand::Create { out, probe_names, relay_names, client_name, days, force } => {
            if days == 0 {
                anyhow::bail!("--days must be at least 1");
            }
            let spec = CertSpec { probe_names, relay_names, client_name, days };
            let created = create(&out, &spec, force).with_context(|| format!("creating certificates in {}", out.display()))?;
            for f in &created.files {
                println!("{}", f.display());
            }
            Ok(())
        }
    }
}
