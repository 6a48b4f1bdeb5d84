//! Mutual TLS for flows' gRPC links: node-probe ← relay ← `flows` clients.
//!
//! Servers take a certificate, its key and the CA that client certificates must chain
//! to: with those set, a client without a certificate from that CA is refused in the
//! handshake, and so is plaintext. Clients take the CA that the server's certificate
//! must chain to, their own certificate and key, and optionally the name to check in
//! the server's certificate (when they dial an address that the certificate does not
//! name, such as a node-probe found by its pod IP).
//!
//! PEM files are checked when loaded, so a wrong path or a swapped key is reported at
//! start with the file's name rather than as a handshake failure later. Key material is
//! never formatted into errors or logs.

pub mod certs;
pub mod reload;
pub mod serving;

use std::{
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} {path}: no PEM {expected} found")]
    NoPem {
        what: &'static str,
        path: PathBuf,
        expected: &'static str,
    },
    #[error("{what} {path}: {detail}")]
    BadPem {
        what: &'static str,
        path: PathBuf,
        detail: String,
    },
    #[error("{flag} needs {needs}")]
    Incomplete { flag: &'static str, needs: &'static str },
    #[error("address {addr:?}: {detail}")]
    Address { addr: String, detail: String },
    #[error("creating certificates: {0}")]
    Create(#[from] rcgen::Error),
    #[error("writing {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error(
        "refusing to serve plaintext on {addr}: anyone who reaches it would read every flow. \
         Give --tls-cert, --tls-key and --tls-client-ca, listen on loopback, or say \
         --insecure-listen"
    )]
    PlaintextListen { addr: SocketAddr },
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// Reads a PEM file holding one or more certificates; checks that at least one parses.
fn read_certs(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    let pem = read(what, path)?;
    let mut n = 0;
    for c in CertificateDer::pem_slice_iter(&pem) {
        c.map_err(|e| TlsError::BadPem {
            what,
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
        n += 1;
    }
    if n == 0 {
        return Err(TlsError::NoPem {
            what,
            path: path.to_path_buf(),
            expected: "CERTIFICATE",
        });
    }
    Ok(pem)
}

/// Reads a PEM private key; the error never carries the file's contents.
fn read_key(path: &Path) -> Result<Vec<u8>, TlsError> {
    let what = "private key";
    let pem = read(what, path)?;
    match PrivateKeyDer::from_pem_slice(&pem) {
        Ok(_) => Ok(pem),
        Err(rustls_pki_types::pem::Error::NoItemsFound) => Err(TlsError::NoPem {
            what,
            path: path.to_path_buf(),
            expected: "PRIVATE KEY",
        }),
        Err(_) => Err(TlsError::BadPem {
            what,
            path: path.to_path_buf(),
            detail: "not a readable PEM private key".into(),
        }),
    }
}

/// How long a TLS handshake may take before the connection is dropped: a client that
/// opens a connection and says nothing must not hold a server's task forever.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A gRPC server's TLS: its certificate chain and key, and the CA of accepted clients.
#[derive(Clone, Debug, clap::Args)]
pub struct ServerTlsArgs {
    /// PEM certificate (chain) of this server. With --tls-key and --tls-client-ca it
    /// turns on mutual TLS: plaintext and clients without a certificate from that CA
    /// are refused.
    #[arg(long = "tls-cert", value_name = "FILE", requires_all = ["tls_key", "tls_client_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long = "tls-key", value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificate(s) that client certificates must chain to.
    #[arg(long = "tls-client-ca", value_name = "FILE", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Serve plaintext on an address other than loopback. Whoever reaches that address
    /// reads every flow (and, on the relay, the whole history): only for a network
    /// nothing else can reach. Without it, plaintext is served on loopback only.
    #[arg(long = "insecure-listen", conflicts_with = "tls_cert")]
    pub insecure_listen: bool,
    /// A client certificate name (DNS name or common name) allowed to call this server;
    /// repeat for more. Given, a client whose certificate names none of them is refused
    /// with PERMISSION_DENIED, even with a certificate of the CA.
    #[arg(long = "tls-allow-client", value_name = "NAME", requires = "tls_cert")]
    pub tls_allow_client: Vec<String>,
}

/// Whether only this machine can reach `addr` (127.0.0.0/8, ::1, or ::ffff:127.x).
fn is_loopback(addr: SocketAddr) -> bool {
    addr.ip().to_canonical().is_loopback()
}

/// Files of a server's mutual TLS.
#[derive(Clone, Debug)]
pub struct ServerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
    /// Names a client certificate must carry (empty: any certificate of the CA).
    pub allowed_clients: Vec<String>,
}

impl ServerTlsArgs {
    /// The TLS of a server listening on `listen`: None when TLS is off, which is refused
    /// on an address other than loopback unless `--insecure-listen` says so. (Clap has
    /// checked that the three files come together.)
    pub fn to_config(&self, listen: SocketAddr) -> Result<Option<ServerTls>, TlsError> {
        match (&self.tls_cert, &self.tls_key, &self.tls_client_ca) {
            (None, None, None) if !is_loopback(listen) && !self.insecure_listen => {
                Err(TlsError::PlaintextListen { addr: listen })
            }
            (None, None, None) => Ok(None),
            (Some(cert), Some(key), Some(ca)) => Ok(Some(ServerTls {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: ca.clone(),
                allowed_clients: self.tls_allow_client.clone(),
            })),
            _ => Err(TlsError::Incomplete {
                flag: "--tls-cert",
                needs: "--tls-key and --tls-client-ca",
            }),
        }
    }
}

impl ServerTls {
    /// Reads and checks the files, and reads them again whenever they change.
    pub fn load(&self) -> Result<std::sync::Arc<reload::ReloadingTls>, TlsError> {
        reload::ReloadingTls::new(self.clone())
    }
}

/// A gRPC client's TLS: the CA of the server, its own certificate and key.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct ClientTlsArgs {
    /// PEM CA certificate(s) that the server's certificate must chain to; turns TLS on
    /// (addresses are then dialled with https).
    #[arg(long = "tls-ca", value_name = "FILE", env = "FLOWS_TLS_CA", global = true)]
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate presented to the server (mutual TLS).
    #[arg(long = "tls-client-cert", value_name = "FILE", env = "FLOWS_TLS_CLIENT_CERT", global = true)]
    pub tls_client_cert: Option<PathBuf>,
    /// PEM private key of --tls-client-cert.
    #[arg(long = "tls-client-key", value_name = "FILE", env = "FLOWS_TLS_CLIENT_KEY", global = true)]
    pub tls_client_key: Option<PathBuf>,
    /// Name the server's certificate must carry, when it differs from the address
    /// dialled.
    #[arg(long = "tls-server-name", value_name = "NAME", env = "FLOWS_TLS_SERVER_NAME", global = true)]
    pub tls_server_name: Option<String>,
}

/// Files of a client's TLS.
#[derive(Clone, Debug)]
pub struct ClientTls {
    pub ca: PathBuf,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub server_name: Option<String>,
}

impl ClientTlsArgs {
    pub fn to_config(&self) -> Result<Option<ClientTls>, TlsError> {
        let ca = match (&self.tls_ca, &self.tls_client_cert, &self.tls_client_key) {
            (None, None, None) => return Ok(None),
            (Some(ca), _, _) => ca.clone(),
            (None, _, _) => {
                return Err(TlsError::Incomplete {
                    flag: "--tls-client-cert",
                    needs: "--tls-ca",
                });
            }
        };
        if self.tls_client_cert.is_some() != self.tls_client_key.is_some() {
            return Err(TlsError::Incomplete {
                flag: "--tls-client-cert",
                needs: "--tls-client-key (both or neither)",
            });
        }
        Ok(Some(ClientTls {
            ca,
            cert: self.tls_client_cert.clone(),
            key: self.tls_client_key.clone(),
            server_name: self.tls_server_name.clone(),
        }))
    }
}

impl ClientTls {
    pub fn load(&self) -> Result<ClientTlsConfig, TlsError> {
        let ca = read_certs("server CA", &self.ca)?;
        let mut cfg = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca))
            .timeout(HANDSHAKE_TIMEOUT);
        if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
            let cert = read_certs("client certificate", cert)?;
            let key = read_key(key)?;
            cfg = cfg.identity(Identity::from_pem(cert, key));
        }
        if let Some(name) = &self.server_name {
            cfg = cfg.domain_name(name.clone());
        }
        Ok(cfg)
    }
}

/// TCP keepalive on an accepted connection: a peer whose host is gone is found within
/// minutes even when no stream is open.
pub fn keep_alive(tcp: &tokio::net::TcpStream) {
    let ka = socket2::TcpKeepalive::new().with_time(Duration::from_secs(60)).with_interval(Duration::from_secs(10));
    let _ = socket2::SockRef::from(tcp).set_tcp_keepalive(&ka);
    let _ = tcp.set_nodelay(true);
}

/// Where a client connects: `host:port`, `http://host:port` or `https://host:port`.
/// With TLS the scheme becomes https (tonic only does TLS for https URIs); asking for
/// https without TLS, or http with it, is an error rather than a silent downgrade.
pub fn endpoint(addr: &str, tls: Option<&ClientTlsConfig>) -> Result<Endpoint, TlsError> {
    let bad = |detail: &str| TlsError::Address {
        addr: addr.to_string(),
        detail: detail.to_string(),
    };
    let (scheme, rest) = match addr.split_once("://") {
        Some((s, r)) => (Some(s), r),
        None => (None, addr),
    };
    if rest.is_empty() {
        return Err(bad("expected host:port"));
    }
    let scheme = match (scheme, tls.is_some()) {
        (None, false) | (Some("http"), false) => "http",
        (None, true) | (Some("https"), true) => "https",
        (Some("https"), false) => return Err(bad("https needs a CA (--tls-ca)")),
        (Some("http"), true) => return Err(bad("TLS is configured: use host:port or https://")),
        (Some(_), _) => return Err(bad("the scheme must be http or https")),
    };
    let uri = format!("{scheme}://{rest}");
    let mut ep = Endpoint::from_shared(uri).map_err(|e| bad(&e.to_string()))?;
    if let Some(cfg) = tls {
        ep = ep.tls_config(cfg.clone()).map_err(|e| bad(&e.to_string()))?;
    }
    Ok(ep)
}

/// Client TLS, or plaintext; cheap to clone into every connection. The files are read
/// again for every new connection, so a rotated client certificate is used from the
/// next (re)connect on; files that fail to read leave the last good ones in use.
#[derive(Clone, Default)]
pub struct Dialer {
    tls: Option<(ClientTls, std::sync::Arc<std::sync::Mutex<ClientTlsConfig>>)>,
}

impl fmt::Debug for Dialer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dialer").field("tls", &self.tls.is_some()).finish()
    }
}

impl Dialer {
    pub fn plaintext() -> Self {
        Self { tls: None }
    }

    /// Reads the files now: a bad file is an error at start.
    pub fn new(tls: Option<&ClientTls>) -> Result<Self, TlsError> {
        let tls = match tls {
            Some(files) => Some((files.clone(), std::sync::Arc::new(std::sync::Mutex::new(files.load()?)))),
            None => None,
        };
        Ok(Self { tls })
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    pub fn endpoint(&self, addr: &str) -> Result<Endpoint, TlsError> {
        let Some((files, last)) = &self.tls else { return endpoint(addr, None) };
        let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
        match files.load() {
            Ok(cfg) => *last = cfg,
            Err(e) => tracing::warn!(error = %e, "client TLS files not read again; the previous ones stay in use"),
        }
        endpoint(addr, Some(&*last))
    }
}

/// An error with its causes: tonic's transport errors say only "transport error" at the
/// top, and the reason (refused, TLS handshake, certificate) is in the chain.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let msg = s.to_string();
        if !out.contains(&msg) {
            out.push_str(": ");
            out.push_str(&msg);
        }
        src = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        tls: ServerTlsArgs,
    }

    fn config(args: &[&str], listen: &str) -> Result<Option<ServerTls>, TlsError> {
        let f = Flags::try_parse_from(std::iter::once("x").chain(args.iter().copied())).expect("flags");
        f.tls.to_config(listen.parse().expect("address"))
    }

    #[test]
    fn plaintext_only_on_loopback_unless_said() {
        for ok in ["127.0.0.1:4245", "127.1.2.3:0", "[::1]:4245", "[::ffff:127.0.0.1]:1"] {
            assert!(matches!(config(&[], ok), Ok(None)), "{ok}");
        }
        for refused in ["0.0.0.0:4245", "10.0.0.7:4245", "[::]:4244", "[fd00::1]:4244"] {
            let e = config(&[], refused).expect_err(refused);
            assert!(matches!(e, TlsError::PlaintextListen { .. }), "{e}");
            assert!(e.to_string().contains("--insecure-listen"), "{e}");
            assert!(matches!(config(&["--insecure-listen"], refused), Ok(None)), "{refused}");
        }
        // Plaintext and TLS at once is a contradiction, not a choice.
        let both = Flags::try_parse_from(["x", "--insecure-listen", "--tls-cert", "c", "--tls-key", "k", "--tls-client-ca", "a"]);
        assert!(both.is_err());
    }
}
