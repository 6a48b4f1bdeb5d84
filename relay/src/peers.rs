//! Connections to the node-probes, kept up with backoff.
//!
//! Each peer has a task that connects, learns the node's name from ServerStatus, checks
//! the connection twice a second and reconnects with exponential backoff when it fails.
//! Its state is published on a watch channel, which both the relay's requests and its
//! status read.
//!
//! A probe that hangs (stopped, or its node frozen) keeps its TCP connection open and
//! answers nothing: every call to it is bounded (`CALL_TIMEOUT`), so it is reported
//! unavailable within seconds, and HTTP/2 keepalive ends the streams open to it.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use flows_proto::{ServerStatusRequest, observer_client::ObserverClient};
use tokio::sync::watch;
use flows_tls::{Dialer, error_chain};
use tonic::transport::Channel;

/// How long one unary call to a probe (its status) may take: past it, the probe counts
/// as unavailable.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// HTTP/2 pings on every connection to a probe, and how long an answer may take: a
/// stream from a probe that stopped answering ends within their sum.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(3);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(3);

/// A call to a probe, bounded by `CALL_TIMEOUT`.
pub async fn bounded<T>(
    call: impl std::future::Future<Output = Result<T, tonic::Status>>,
) -> Result<T, tonic::Status> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(r) => r,
        Err(_) => Err(tonic::Status::deadline_exceeded(format!(
            "no answer within {} s",
            CALL_TIMEOUT.as_secs()
        ))),
    }
}

#[derive(Debug, Clone)]
pub enum PeerState {
    Connecting,
    Connected {
        node: String,
        client: ObserverClient<Channel>,
    },
    Unavailable {
        error: String,
    },
}

pub struct Peer {
    /// As configured: `name=host:port` or `host:port`.
    pub addr: String,
    /// The name given in the configuration, if any (else learnt from ServerStatus).
    pub configured_name: Option<String>,
    pub state: watch::Receiver<PeerState>,
}

impl Peer {
    /// The node's name: as configured, as it reported, or its address.
    pub fn name(&self) -> String {
        if let Some(n) = &self.configured_name {
            return n.clone();
        }
        match &*self.state.borrow() {
            PeerState::Connected { node, .. } => node.clone(),
            _ => self.addr.clone(),
        }
    }

    pub fn client(&self) -> Option<ObserverClient<Channel>> {
        match &*self.state.borrow() {
            PeerState::Connected { client, .. } => Some(client.clone()),
            _ => None,
        }
    }
}

/// Parses `name=host:port` or `host:port`.
pub fn parse_peer(s: &str) -> (Option<String>, String) {
    match s.split_once('=') {
        Some((n, a)) if !n.is_empty() => (Some(n.to_string()), a.to_string()),
        _ => (None, s.to_string()),
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(10),
        }
    }
}

/// Starts the connection task of one peer.
pub fn spawn(spec: &str, backoff: Backoff, dialer: Dialer) -> Arc<Peer> {
    let (name, addr) = parse_peer(spec);
    let (tx, rx) = watch::channel(PeerState::Connecting);
    tokio::spawn(maintain(addr.clone(), dialer, tx, backoff));
    Arc::new(Peer {
        addr,
        configured_name: name,
        state: rx,
    })
}

async fn maintain(url: String, dialer: Dialer, tx: watch::Sender<PeerState>, backoff: Backoff) {
    let mut delay = backoff.initial;
    loop {
        let attempt = async {
            let ep = dialer
                .endpoint(&url)
                .map_err(|e| e.to_string())?
                .connect_timeout(Duration::from_secs(2))
                .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
                .keep_alive_timeout(KEEPALIVE_TIMEOUT)
                .keep_alive_while_idle(true);
            let channel = ep.connect().await.map_err(|e| error_chain(&e))?;
            let mut client = ObserverClient::new(channel);
            let st = bounded(client.server_status(ServerStatusRequest {}))
                .await
                .map_err(|e| error_chain(&e))?
                .into_inner();
            Ok::<_, String>((client, st.node_name))
        };
        match attempt.await {
            Ok((mut client, node)) => {
                tracing::info!(%url, %node, "node-probe connected");
                delay = backoff.initial;
                let _ = tx.send(PeerState::Connected {
                    node,
                    client: client.clone(),
                });
                // Health check: a failed status call means the probe is gone.
                loop {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    if tx.is_closed() {
                        return;
                    }
                    if let Err(e) = bounded(client.server_status(ServerStatusRequest {})).await {
                        tracing::warn!(%url, error = %e, "node-probe unavailable");
                        let _ = tx.send(PeerState::Unavailable {
                            error: e.message().to_string(),
                        });
                        break;
                    }
                }
            }
            Err(error) => {
                if !matches!(&*tx.borrow(), PeerState::Unavailable { .. }) {
                    tracing::warn!(%url, %error, "node-probe unavailable");
                }
                let _ = tx.send(PeerState::Unavailable { error });
            }
        }
        if tx.is_closed() {
            return;
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(backoff.max);
    }
}

/// The node-probes the relay reads, which may change (discovery) while it serves.
pub struct PeerSet {
    current: watch::Sender<Vec<Arc<Peer>>>,
    backoff: Backoff,
    dialer: Dialer,
}

impl PeerSet {
    /// A fixed set, from `name=host:port` or `host:port` specs, over plaintext.
    pub fn fixed(specs: &[String], backoff: Backoff) -> Arc<PeerSet> {
        Self::with_dialer(specs, backoff, Dialer::plaintext())
    }

    /// A fixed set whose connections go through `dialer` (mutual TLS when it has it).
    pub fn with_dialer(specs: &[String], backoff: Backoff, dialer: Dialer) -> Arc<PeerSet> {
        let peers = specs.iter().map(|s| spawn(s, backoff, dialer.clone())).collect();
        Arc::new(PeerSet {
            current: watch::channel(peers).0,
            backoff,
            dialer,
        })
    }

    pub fn snapshot(&self) -> Vec<Arc<Peer>> {
        self.current.borrow().clone()
    }

    /// Changes of the set: a receiver that sees the current set first.
    pub fn subscribe(&self) -> watch::Receiver<Vec<Arc<Peer>>> {
        self.current.subscribe()
    }

    /// Makes the set `wanted` (node name → address): unchanged peers keep their
    /// connection, new ones connect, removed ones are dropped (their readers end).
    pub fn set(&self, wanted: &BTreeMap<String, String>) {
        let backoff = self.backoff;
        self.current.send_if_modified(|cur| {
            let keep: Vec<Arc<Peer>> = cur
                .iter()
                .filter(|p| {
                    p.configured_name
                        .as_ref()
                        .is_some_and(|n| wanted.get(n) == Some(&p.addr))
                })
                .cloned()
                .collect();
            let mut next = keep.clone();
            for (name, addr) in wanted {
                if !keep.iter().any(|p| p.configured_name.as_ref() == Some(name)) {
                    next.push(spawn(&format!("{name}={addr}"), backoff, self.dialer.clone()));
                }
            }
            let changed = next.len() != cur.len() || keep.len() != cur.len();
            if changed {
                next.sort_by(|a, b| a.configured_name.cmp(&b.configured_name));
                *cur = next;
            }
            changed
        });
    }
}
