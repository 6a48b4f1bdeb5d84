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

use std::{
    collections::{BTreeMap, VecDeque},
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::Duration,
};

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
    /// The node's clock less the relay's, in nanoseconds (0 until measured).
    offset: Arc<AtomicI64>,
    /// How far off that may be: half the round trip it was measured over.
    uncertainty: Arc<AtomicI64>,
}

impl Peer {
    /// The node's clock less the relay's (nanoseconds), from its status answers: add it
    /// to a relay time to get the same moment in the node's flow times.
    pub fn clock_offset(&self) -> i64 {
        self.offset.load(Ordering::Relaxed)
    }

    /// How far the offset may be off (nanoseconds): a starting time moved to the node's
    /// clock is moved earlier by this, so that no flow is missed for it.
    pub fn clock_uncertainty(&self) -> i64 {
        self.uncertainty.load(Ordering::Relaxed)
    }

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
    let (offset, uncertainty) = (Arc::new(AtomicI64::new(0)), Arc::new(AtomicI64::new(0)));
    tokio::spawn(maintain(addr.clone(), dialer, tx, backoff, Clocks::new(offset.clone(), uncertainty.clone())));
    Arc::new(Peer {
        offset,
        uncertainty,
        addr,
        configured_name: name,
        state: rx,
    })
}

/// A node's clock offset from its status answers: of the last few samples, the one
/// with the shortest round trip (the least uncertain).
struct Clocks {
    offset: Arc<AtomicI64>,
    uncertainty: Arc<AtomicI64>,
    /// (round trip, offset), nanoseconds.
    samples: VecDeque<(i64, i64)>,
}

impl Clocks {
    const KEPT: usize = 8;

    fn new(offset: Arc<AtomicI64>, uncertainty: Arc<AtomicI64>) -> Clocks {
        Clocks { offset, uncertainty, samples: VecDeque::with_capacity(Clocks::KEPT) }
    }

    /// A status call that left at `sent` and came back at `received` (relay clock),
    /// answered at `node_time` (node clock).
    fn sample(&mut self, sent: i64, received: i64, node_time: Option<&flows_proto::Timestamp>) {
        let Some(t) = node_time else { return };
        let rtt = received.saturating_sub(sent);
        let offset = flows_proto::timestamp_nanos(t).saturating_sub(sent + rtt / 2);
        if self.samples.len() == Clocks::KEPT {
            self.samples.pop_front();
        }
        self.samples.push_back((rtt, offset));
        if let Some((rtt, best)) = self.samples.iter().min_by_key(|(rtt, _)| *rtt) {
            self.offset.store(*best, Ordering::Relaxed);
            self.uncertainty.store(rtt / 2 + 1, Ordering::Relaxed);
        }
    }
}

fn now_ns() -> i64 {
    flows_proto::timestamp_nanos(&flows_proto::timestamp_now())
}

/// A status call, bounded, with its clock sample.
async fn status(
    client: &mut ObserverClient<Channel>,
    clocks: &mut Clocks,
) -> Result<flows_proto::ServerStatusResponse, tonic::Status> {
    let sent = now_ns();
    let st = bounded(client.server_status(ServerStatusRequest {})).await?.into_inner();
    clocks.sample(sent, now_ns(), st.time.as_ref());
    Ok(st)
}

async fn maintain(url: String, dialer: Dialer, tx: watch::Sender<PeerState>, backoff: Backoff, mut clocks: Clocks) {
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
            let st = status(&mut client, &mut clocks).await.map_err(|e| error_chain(&e))?;
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
                    if let Err(e) = status(&mut client, &mut clocks).await {
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

#[cfg(test)]
mod clock_tests {
    use super::*;

    #[test]
    fn the_offset_is_the_sample_with_the_shortest_round_trip() {
        let (shared, unsure) = (Arc::new(AtomicI64::new(0)), Arc::new(AtomicI64::new(0)));
        let mut c = Clocks::new(shared.clone(), unsure.clone());
        let at = |ns: i64| flows_proto::timestamp_from_nanos(ns);
        // Sent at 1,000, back at 1,200: the node said 6,100 (5,000 ahead, ±100).
        c.sample(1_000, 1_200, Some(&at(6_100)));
        assert_eq!((shared.load(Ordering::Relaxed), unsure.load(Ordering::Relaxed)), (5_000, 101));
        // A slow round trip is less certain: kept, not used.
        c.sample(2_000, 4_000, Some(&at(8_000)));
        assert_eq!(shared.load(Ordering::Relaxed), 5_000);
        c.sample(3_000, 3_020, Some(&at(-1_990)));
        assert_eq!(shared.load(Ordering::Relaxed), -5_000, "a node behind");
        // An answer without a time (an older probe) changes nothing.
        c.sample(4_000, 4_001, None);
        assert_eq!(shared.load(Ordering::Relaxed), -5_000);
        // Only the last few count: a clock that was stepped is followed.
        for i in 0..Clocks::KEPT as i64 {
            c.sample(10_000 + i, 10_100 + i, Some(&at(10_050 + i + 700)));
        }
        assert_eq!(shared.load(Ordering::Relaxed), 700);
    }
}
