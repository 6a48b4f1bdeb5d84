//! How flows' gRPC servers serve, beside their TLS: the bounds every server applies, so
//! that no client (or crowd of them) exhausts a probe or the relay.
//!
//! - Connections: HTTP/2 streams per connection are capped, idle peers are pinged and
//!   dropped when they stop answering, TCP keepalive finds dead hosts.
//! - Streams: `GetFlows` streams (a follower holds one for hours) take a slot from a
//!   fixed number; with none left the request is refused with RESOURCE_EXHAUSTED,
//!   saying so, instead of queueing without bound.

use std::{
    collections::BTreeSet,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use futures_core::Stream;
use tokio::{
    net::TcpListener,
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tonic::{
    Request, Status,
    transport::{Server, server::Router},
};

use crate::reload::ReloadingTls;

/// HTTP/2 streams one connection may have open at once.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 64;

/// A server with flows' connection bounds; [`serve`] adds the TLS.
pub fn server() -> Server {
    Server::builder()
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
}

/// Serves `router` on `listener` until `shutdown`: with mutual TLS from files that are
/// read again when they change, or plaintext (whoever allowed that decided it).
pub async fn serve(
    router: Router,
    listener: TcpListener,
    tls: Option<Arc<ReloadingTls>>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    match tls {
        Some(tls) => router.serve_with_incoming_shutdown(tls.incoming(listener), shutdown).await,
        None => {
            use tokio_stream::StreamExt;
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(|r| {
                if let Ok(tcp) = &r {
                    crate::keep_alive(tcp);
                }
                r
            });
            router.serve_with_incoming_shutdown(incoming, shutdown).await
        }
    }
}

/// A fixed number of `GetFlows` streams a server serves at once.
#[derive(Clone, Debug)]
pub struct StreamSlots {
    slots: Arc<Semaphore>,
    max: usize,
}

impl StreamSlots {
    pub fn new(max: usize) -> StreamSlots {
        StreamSlots {
            slots: Arc::new(Semaphore::new(max.max(1))),
            max: max.max(1),
        }
    }

    /// A slot for one stream, held until the stream is dropped (`Slotted`), or the
    /// refusal to send the client.
    pub fn take(&self) -> Result<OwnedSemaphorePermit, Status> {
        self.slots.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "this server already serves {} flow streams: try again later",
                self.max
            ))
        })
    }

    /// Slots in use now.
    pub fn in_use(&self) -> usize {
        self.max - self.slots.available_permits()
    }
}

/// A response stream that holds its slot: the slot comes back when the server drops the
/// stream (the client went, or it ended).
pub struct Slotted<S> {
    inner: S,
    _slot: OwnedSemaphorePermit,
}

impl<S> Slotted<S> {
    pub fn new(inner: S, slot: OwnedSemaphorePermit) -> Slotted<S> {
        Slotted { inner, _slot: slot }
    }
}

impl<S: Stream + Unpin> Stream for Slotted<S> {
    type Item = S::Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        Pin::new(&mut self.inner).poll_next(cx)
    }
}

/// Which clients may call a server, by the names in their certificates: identity, not
/// just "any certificate our CA signed". Empty: every client the TLS handshake admitted.
#[derive(Clone, Debug, Default)]
pub struct ClientAllowList {
    names: Arc<BTreeSet<String>>,
}

impl ClientAllowList {
    pub fn new(names: &[String]) -> ClientAllowList {
        ClientAllowList {
            names: Arc::new(names.iter().cloned().collect()),
        }
    }

    /// A tonic interceptor: the request goes on when its client certificate names an
    /// allowed client (a DNS name, or the common name), else PERMISSION_DENIED.
    pub fn check(&self, req: Request<()>) -> Result<Request<()>, Status> {
        if self.names.is_empty() {
            return Ok(req);
        }
        let certs = req.peer_certs();
        let leaf = certs.as_ref().and_then(|c| c.first());
        let names = leaf.map(|c| certificate_names(c.as_ref())).unwrap_or_default();
        if names.iter().any(|n| self.names.contains(n)) {
            Ok(req)
        } else {
            Err(Status::permission_denied(format!(
                "client certificate {} is not allowed here",
                if names.is_empty() { "(none)".to_string() } else { names.join(", ") }
            )))
        }
    }
}

/// The names a certificate is for: its DNS names, then its common name.
pub fn certificate_names(der: &[u8]) -> Vec<String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let Ok((_, cert)) = X509Certificate::from_der(der) else { return Vec::new() };
    let mut names: Vec<String> = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::DNSName(d) => Some(d.to_string()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    names.extend(cert.subject().iter_common_name().filter_map(|cn| cn.as_str().ok().map(str::to_string)));
    names
}
