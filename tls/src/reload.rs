//! A server's TLS read again when its files change: certificates are rotated (by
//! cert-manager, the chart on upgrade, a kubelet updating a Secret volume) without a
//! restart, and connections already open keep the certificate they started with.
//!
//! The files are checked on every accepted connection (three `stat`s), so the first
//! handshake after a change uses the new files. Files that do not make a valid
//! configuration (half-written, a key that does not belong to the certificate) leave
//! the last good one in force, and say so once per change.

use std::{
    io,
    path::Path,
    sync::{Arc, Mutex},
    time::SystemTime,
};

use rustls::{RootCertStore, ServerConfig, server::WebPkiClientVerifier};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, server::TlsStream};

use crate::{HANDSHAKE_TIMEOUT, ServerTls, TlsError, read_certs, read_key};

/// What identifies a version of a file: a rename into place (a Secret volume's swap)
/// changes the inode, an edit in place the time or length.
type Stamp = Vec<Option<(SystemTime, u64, u64)>>;

fn stamp(files: &ServerTls) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    [&files.cert, &files.key, &files.client_ca]
        .iter()
        .map(|p| std::fs::metadata(p).ok().map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len(), m.ino())))
        .collect()
}

fn bad(what: &'static str, path: &Path, detail: impl ToString) -> TlsError {
    TlsError::BadPem { what, path: path.to_path_buf(), detail: detail.to_string() }
}

/// The rustls configuration the files make: this certificate and key, clients must
/// present a certificate of the CA, HTTP/2.
fn build(files: &ServerTls) -> Result<Arc<ServerConfig>, TlsError> {
    let cert_pem = read_certs("server certificate", &files.cert)?;
    let key_pem = read_key(&files.key)?;
    let ca_pem = read_certs("client CA", &files.client_ca)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad("server certificate", &files.cert, e))?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| bad("private key", &files.key, e))?;
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&ca_pem) {
        let c = c.map_err(|e| bad("client CA", &files.client_ca, e))?;
        roots.add(c).map_err(|e| bad("client CA", &files.client_ca, e))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| bad("client CA", &files.client_ca, e))?;
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("server certificate", &files.cert, e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| bad("server certificate and key", &files.cert, e))?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

struct Current {
    stamp: Stamp,
    acceptor: TlsAcceptor,
}

/// A server's mutual TLS from files, read again when they change.
pub struct ReloadingTls {
    files: ServerTls,
    current: Mutex<Current>,
}

impl std::fmt::Debug for ReloadingTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadingTls").field("files", &self.files).finish()
    }
}

impl ReloadingTls {
    /// Reads the files now: a bad file is an error at start, not at the first client.
    pub fn new(files: ServerTls) -> Result<Arc<ReloadingTls>, TlsError> {
        let stamp = stamp(&files);
        let acceptor = TlsAcceptor::from(build(&files)?);
        Ok(Arc::new(ReloadingTls { files, current: Mutex::new(Current { stamp, acceptor }) }))
    }

    pub fn files(&self) -> &ServerTls {
        &self.files
    }

    /// The acceptor for the next connection: from the files as they are now, or the
    /// last good ones when they are not valid.
    pub fn acceptor(&self) -> TlsAcceptor {
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let now = stamp(&self.files);
        if now != cur.stamp {
            cur.stamp = now;
            match build(&self.files) {
                Ok(cfg) => {
                    cur.acceptor = TlsAcceptor::from(cfg);
                    tracing::info!(cert = %self.files.cert.display(), "TLS files changed: read again");
                }
                Err(e) => tracing::warn!(error = %e, "TLS files changed but are not valid; the previous ones stay in force"),
            }
        }
        cur.acceptor.clone()
    }

    /// Connections accepted on `listener` after their TLS handshake (at most
    /// [`HANDSHAKE_TIMEOUT`] each, in their own task: a client that says nothing holds
    /// up no one). Failed handshakes are dropped here; the stream never ends.
    pub fn incoming(self: Arc<Self>, listener: TcpListener) -> tokio_stream::wrappers::ReceiverStream<io::Result<TlsStream<TcpStream>>> {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let tcp = match listener.accept().await {
                    Ok((tcp, _)) => tcp,
                    Err(e) => {
                        // Out of descriptors, most often: pause, then go on accepting.
                        tracing::warn!(error = %e, "accepting a connection");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                crate::keep_alive(&tcp);
                let acceptor = self.acceptor();
                let out = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = out.send(Ok(tls)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!("TLS handshake timed out"),
                    }
                });
                if tx.is_closed() {
                    return;
                }
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(rx)
    }
}
