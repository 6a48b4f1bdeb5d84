//! The probe runtime: datapath → decoder → ring → gRPC, plus interface discovery.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    os::unix::fs::MetadataExt,
    path::PathBuf,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use flows_common::counter;
use flows_proto::{LostEvent, LostEventSource};
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::watch,
};

use flows_metrics::Metrics;
use flows_policy::compile::{Mode, SetTable};

use flows_parser::{Clock, Decoder, IfNames};

use crate::{
    datapath::{CountersMap, Datapath, DatapathConfig, DatapathError, DatapathMaps, EventsMap, read_counters},
    ifaces::{AUTO, IfaceSelector, Role, classify, default_route_devs, list_links},
    programmer::{PolicyProgrammer, SharedEndpoints, SharedSets, watch_policy},
    ring::{Entry, FlowRing, RingError},
    server::ObserverService,
    stats::ProbeStats,
};

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    Ring(#[from] RingError),
    #[error("network namespace {path}: {source}")]
    Netns {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("gRPC server: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("TLS: {0}")]
    Tls(#[from] flows_tls::TlsError),
    #[error("watching the ring buffer: {0}")]
    Poll(#[source] std::io::Error),
    #[error("--uplink-iface {name}: the node's namespace has no such interface")]
    NoUplink { name: String },
    #[error("writing the ready file {path}: {source}")]
    ReadyFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, Clone)]
pub struct ProbeConfig {
    pub node_name: String,
    /// `ip netns` name of the node's namespace (the lab); None: the current one.
    pub netns: Option<String>,
    pub selector: IfaceSelector,
    pub ring_capacity: usize,
    pub kernel_drops: bool,
    /// Report only kernel drops that happen in these namespaces (files such as
    /// /run/netns/NAME); needed when several probes share a kernel.
    pub drop_netns: Vec<PathBuf>,
    /// More such paths, one per line, read again at every interface scan.
    pub drop_netns_file: Option<PathBuf>,
    pub iface_poll: Duration,
    pub listen: SocketAddr,
    /// Written (with the listen address) once interfaces are attached and the server is up.
    pub ready_file: Option<PathBuf>,
    /// The node's network interfaces (towards other nodes and the world: the uplink,
    /// tunnels), where local pods' egress is decided; [`crate::ifaces::AUTO`] finds them.
    pub uplinks: Vec<String>,
    /// Directory of Kubernetes manifests (Namespaces, Pods with nodeName and podIPs,
    /// NetworkPolicies), read again whenever a file changes. None: no policy.
    pub manifests: Option<PathBuf>,
    /// Mode of namespaces without a `flows.dev/policy-mode` annotation.
    pub default_mode: Mode,
    /// Address of the Prometheus /metrics endpoint (None: not served).
    pub metrics_listen: Option<SocketAddr>,
    /// Mutual TLS of the Observer API (None: plaintext).
    pub tls: Option<flows_tls::ServerTls>,
    /// GetFlows streams served at once.
    pub max_streams: usize,
    /// bpffs directory of this node's pinned TC links: enforcement outlives the probe
    /// and the next one takes over without a gap (None: links end with the process).
    pub pin_dir: Option<PathBuf>,
}


fn netns_inode(path: &PathBuf) -> Result<u32, ProbeError> {
    std::fs::metadata(path)
        .map(|m| m.ino() as u32)
        .map_err(|source| ProbeError::Netns {
            path: path.clone(),
            source,
        })
}

/// The namespaces whose kernel drops are reported, from the flags and the file.
fn drop_netns_at_start(cfg: &ProbeConfig) -> Result<Vec<u32>, ProbeError> {
    let mut drop_netns = Vec::new();
    for p in &cfg.drop_netns {
        drop_netns.push(netns_inode(p)?);
    }
    if let Some(file) = &cfg.drop_netns_file {
        let text = std::fs::read_to_string(file).map_err(|source| ProbeError::Netns { path: file.clone(), source })?;
        drop_netns.extend(listed_netns(&text));
        if drop_netns.is_empty() {
            // An empty list must still filter (report nothing), not turn the filter off.
            drop_netns.push(0);
        }
    }
    Ok(drop_netns)
}

/// Runs the probe until `shutdown` resolves. Everything attached is detached on return.
pub async fn run(
    cfg: ProbeConfig,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), ProbeError> {
    // Bad certificate files stop the probe before anything is attached.
    let tls = cfg.tls.as_ref().map(flows_tls::ServerTls::load).transpose()?;
    let drop_netns = drop_netns_at_start(&cfg)?;
    let netns_path = cfg.netns.as_ref().map(|n| PathBuf::from("/run/netns").join(n));
    let (datapath, maps) = Datapath::start(DatapathConfig {
        netns: netns_path,
        kernel_drops: cfg.kernel_drops,
        drop_netns,
        tc_drop_reasons: (u32::MAX, u32::MAX),
        pin_dir: cfg.pin_dir.clone(),
    })?;
    let datapath = Arc::new(datapath);
    let ring = Arc::new(FlowRing::new(cfg.ring_capacity)?);
    let stats = Arc::new(ProbeStats::default());
    let metrics = Arc::new(Metrics::new());
    let metrics_task = cfg
        .metrics_listen
        .map(|addr| tokio::spawn(flows_metrics::serve(addr, metrics.clone())));
    let ifnames: IfNames = Arc::new(RwLock::new(HashMap::new()));
    let (stop_tx, stop_rx) = watch::channel(false);

    let DatapathMaps {
        events,
        counters,
        policy,
    } = maps;
    let sets: SharedSets = Arc::new(RwLock::new(SetTable::new()));
    let endpoints: SharedEndpoints = Arc::new(RwLock::new(Arc::new(HashMap::new())));
    let decoder = Decoder::new(
        cfg.node_name.clone(),
        ifnames.clone(),
        datapath.drop_reasons.clone(),
        Clock::now(),
    )
    .with_policy_sets(sets.clone())
    .with_endpoints(endpoints.clone());
    // Policy is in place before the probe says it is ready.
    let mut programmer = PolicyProgrammer::new(stats.clone(), endpoints, policy, sets, cfg.node_name.clone(), cfg.default_mode);
    // With a policy source, nothing is attached before it has spoken: a probe that
    // took over from its predecessor with no manifests would enforce no policy.
    tokio::pin!(shutdown);
    if let Some(dir) = &cfg.manifests {
        tokio::select! {
            _ = programmer.first(dir) => {}
            _ = &mut shutdown => return Ok(()),
        }
    }
    let policy_task = tokio::spawn(watch_policy(programmer, cfg.manifests.clone(), stop_rx.clone()));
    let reader = tokio::spawn(read_events(
        events,
        decoder,
        ring.clone(),
        stats.clone(),
        metrics.clone(),
        stop_rx.clone(),
    ));
    let counter_task = tokio::spawn(poll_counters(
        counters,
        ring.clone(),
        stats.clone(),
        metrics.clone(),
        stop_rx.clone(),
    ));

    // Only now, with the policy in the maps, do our programs see traffic: attached
    // before, an empty policy would let everything through. The first attach is
    // synchronous, so "ready" means the datapath sees the pods and the node's ways out.
    let mut attached = Attached { names: ifnames.clone(), roles: HashMap::new() };
    let missing = sync_interfaces(&datapath, &cfg, &mut attached).await;
    if let Some(name) = missing.into_iter().next() {
        return Err(ProbeError::NoUplink { name });
    }
    let pruned = datapath.prune_pins();
    if !pruned.is_empty() {
        tracing::info!(?pruned, "removed an earlier probe's links on interfaces not taken over");
    }
    let watcher = tokio::spawn(watch_interfaces(
        datapath.clone(),
        cfg.clone(),
        attached,
        stop_rx.clone(),
    ));

    let service = ObserverService {
        ring: ring.clone(),
        stats: stats.clone(),
        node_name: cfg.node_name.clone(),
        streams: flows_tls::serving::StreamSlots::new(cfg.max_streams),
        started: Instant::now(),
        metrics: metrics.clone(),
        shutdown: stop_rx.clone(),
    };
    let allowed = flows_tls::serving::ClientAllowList::new(cfg.tls.as_ref().map(|t| t.allowed_clients.as_slice()).unwrap_or_default());
    let served = serve(&cfg, service, tls, allowed, shutdown, stop_tx.clone()).await;

    let _ = stop_tx.send(true);
    let _ = reader.await;
    let _ = counter_task.await;
    let _ = policy_task.await;
    if let Some(t) = metrics_task {
        t.abort();
    }
    let _ = watcher.await;
    // Last reference: joining the datapath thread detaches every program.
    match Arc::try_unwrap(datapath) {
        Ok(d) => d.shutdown(),
        Err(_) => tracing::warn!("datapath still referenced at shutdown"),
    }
    if let Some(path) = &cfg.ready_file {
        let _ = std::fs::remove_file(path);
    }
    served?;
    Ok(())
}

/// Serves the Observer API where `cfg` says until `shutdown`, announcing the address in
/// the ready file; followers' streams end with the stop signal, so the graceful shutdown
/// completes.
async fn serve(
    cfg: &ProbeConfig,
    service: ObserverService,
    tls: Option<Arc<flows_tls::reload::ReloadingTls>>,
    allowed: flows_tls::serving::ClientAllowList,
    shutdown: impl std::future::Future<Output = ()>,
    stop_all: watch::Sender<bool>,
) -> Result<(), ProbeError> {
    let listen_err = |source| ProbeError::Listen {
        addr: cfg.listen,
        source,
    };
    let listener = tokio::net::TcpListener::bind(cfg.listen).await.map_err(listen_err)?;
    let local = listener.local_addr().map_err(listen_err)?;
    if let Some(path) = &cfg.ready_file {
        std::fs::write(path, local.to_string()).map_err(|source| ProbeError::ReadyFile {
            path: path.clone(),
            source,
        })?;
    }
    tracing::info!(node = %cfg.node_name, listen = %local, "node-probe ready");
    let router = flows_tls::serving::server()
        .add_service(tonic::service::interceptor::InterceptedService::new(service.into_server(), move |r| allowed.check(r)));
    flows_tls::serving::serve(router, listener, tls, async move {
        shutdown.await;
        let _ = stop_all.send(true);
    })
    .await?;
    Ok(())
}

/// How often the ring is drained without a wakeup: the datapath wakes the reader only
/// once a batch is waiting (ebpf `WAKEUP_BYTES`), so a trickle of events waits at most
/// this long.
const DRAIN_EVERY: Duration = Duration::from_millis(10);

/// Decoded flows go into the ring this many at a time at most (one lock, one wakeup of
/// the readers each), so a full kernel ring is not held decoded all at once.
const PUSH_BATCH: usize = 1024;

async fn read_events(
    events: EventsMap,
    mut decoder: Decoder,
    ring: Arc<FlowRing>,
    stats: Arc<ProbeStats>,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), ProbeError> {
    // SAFETY: the RingBuf owns its map fd, which stays open and unchanged for as long as
    // the AsyncFd (which owns the RingBuf) lives.
    let mut afd = unsafe { AsyncFd::register_with_interest(events, Interest::READABLE) }
        .map_err(|e| ProbeError::Poll(std::io::Error::other(e.to_string())))?;
    let mut clock_at = Instant::now();
    let mut tick = tokio::time::interval(DRAIN_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut drain = |rb: &mut EventsMap| {
        // Wall clock may be stepped (NTP): refresh the offset now and then.
        if clock_at.elapsed() > Duration::from_secs(30) {
            decoder.set_clock(Clock::now());
            clock_at = Instant::now();
        }
        let mut flows = Vec::with_capacity(PUSH_BATCH);
        let mut n = 0;
        while let Some(item) = rb.next() {
            match decoder.decode_bytes(&item) {
                Ok(flow) => {
                    metrics.observe(&flow);
                    flows.push(Entry::Flow(flow));
                    if flows.len() == PUSH_BATCH {
                        n += PUSH_BATCH as u64;
                        ring.push_all(flows.drain(..));
                    }
                }
                Err(e) => {
                    stats.add_decode_error();
                    metrics.lost(LostEventSource::DecoderQueue, 1);
                    tracing::warn!(error = %e, "undecodable datapath event");
                }
            }
        }
        n += flows.len() as u64;
        ring.push_all(flows);
        stats.add_seen(n);
    };
    loop {
        tokio::select! {
            guard = afd.readable_mut() => {
                let mut guard = guard.map_err(ProbeError::Poll)?;
                drain(guard.get_inner_mut());
                guard.clear_ready();
            }
            _ = tick.tick() => drain(afd.get_mut()),
            _ = stop.changed() => return Ok(()),
        }
    }
}

async fn poll_counters(
    counters: CountersMap,
    ring: Arc<FlowRing>,
    stats: Arc<ProbeStats>,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    let mut lost_reported = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let values = match read_counters(&counters) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "reading datapath counters");
                continue;
            }
        };
        let lost = values[counter::RINGBUF_FULL as usize] + values[counter::DROP_RINGBUF_FULL as usize];
        if lost > lost_reported {
            // In-band, so every reader learns that flows are missing here.
            let ev = LostEvent {
                source: LostEventSource::KernelRingBuffer as i32,
                num_events_lost: lost - lost_reported,
                cpu: None,
            };
            ring.push(Entry::Lost(
                ev,
                flows_proto::timestamp_now(),
            ));
            stats.add_lost_kernel(lost - lost_reported);
            metrics.lost(LostEventSource::KernelRingBuffer, lost - lost_reported);
            lost_reported = lost;
        }
        let named: BTreeMap<String, u64> = counter::NAMES
            .iter()
            .zip(values.iter())
            .map(|(n, v)| (n.to_string(), *v))
            .collect();
        stats.set_datapath(named);
    }
}

/// The interfaces the programs are attached to, and as what.
struct Attached {
    names: IfNames,
    roles: HashMap<u32, Role>,
}

/// What the interfaces of the node's namespace should carry, now.
fn wanted_interfaces(cfg: &ProbeConfig) -> Result<Vec<(u32, String, Role)>, crate::ifaces::IfaceError> {
    let netns = cfg.netns.as_deref();
    let links = list_links(netns)?;
    let defaults = if cfg.uplinks.iter().any(|u| u == AUTO) { default_route_devs(netns)? } else { Vec::new() };
    Ok(classify(&links, &defaults, &cfg.selector, &cfg.uplinks))
}

/// Attaches what is new (or changed role), detaches what is gone. Returns the
/// uplinks named on the command line that the namespace does not have.
async fn sync_interfaces(datapath: &Arc<Datapath>, cfg: &ProbeConfig, attached: &mut Attached) -> Vec<String> {
    let c = cfg.clone();
    let wanted = match tokio::task::spawn_blocking(move || wanted_interfaces(&c)).await {
        Ok(Ok(w)) => w,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "listing interfaces");
            return Vec::new();
        }
        Err(e) => {
            tracing::warn!(error = %e, "interface listing task failed");
            return Vec::new();
        }
    };
    let missing = cfg
        .uplinks
        .iter()
        .filter(|u| *u != AUTO && !wanted.iter().any(|(_, n, _)| n == *u))
        .cloned()
        .collect();
    let wanted: HashMap<u32, (String, Role)> = wanted.into_iter().map(|(i, n, r)| (i, (n, r))).collect();
    let known: HashMap<u32, String> = attached.names.read().map(|m| m.clone()).unwrap_or_default();
    for (idx, name) in &known {
        let same = wanted.get(idx).is_some_and(|(n, r)| n == name && attached.roles.get(idx) == Some(r));
        if !same {
            datapath.detach(name);
            if let Ok(mut m) = attached.names.write() {
                m.remove(idx);
            }
            attached.roles.remove(idx);
            tracing::info!(ifname = %name, "interface gone");
        }
    }
    for (idx, (name, role)) in wanted {
        if attached.roles.contains_key(&idx) {
            continue;
        }
        let dp = datapath.clone();
        let n = name.clone();
        let done = tokio::task::spawn_blocking(move || match role {
            Role::Endpoint => dp.attach(&n),
            Role::Network => dp.attach_uplink(&n),
        })
        .await;
        match done {
            Ok(Ok(())) => {
                if let Ok(mut m) = attached.names.write() {
                    m.insert(idx, name.clone());
                }
                attached.roles.insert(idx, role);
                tracing::info!(ifname = %name, ifindex = idx, ?role, "attached");
            }
            Ok(Err(e)) => tracing::warn!(ifname = %name, error = %e, "attach failed"),
            Err(e) => tracing::warn!(error = %e, "attach task failed"),
        }
    }
    missing
}

async fn watch_interfaces(
    datapath: Arc<Datapath>,
    cfg: ProbeConfig,
    mut attached: Attached,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(cfg.iface_poll);
    let mut drop_netns: Option<Vec<u32>> = None;
    let mut changes = link_changes(cfg.netns.as_deref());
    loop {
        tokio::select! {
            _ = tick.tick() => {
                sync_interfaces(&datapath, &cfg, &mut attached).await;
                if let Some(file) = &cfg.drop_netns_file {
                    sync_drop_netns(&datapath, &cfg.drop_netns, file, &mut drop_netns);
                }
            }
            Some(()) = changes.recv() => {
                // A burst of lines (a veth made, moved, enslaved, set up) is one scan.
                while changes.try_recv().is_ok() {}
                sync_interfaces(&datapath, &cfg, &mut attached).await;
            }
            _ = stop.changed() => return,
        }
    }
}

/// One message per line of `ip monitor link` in the node's namespace; none if it cannot
/// run (the poll still finds every interface, a scan later).
fn link_changes(netns: Option<&str>) -> tokio::sync::mpsc::Receiver<()> {
    use tokio::io::AsyncBufReadExt;
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let mut child = match crate::ifaces::monitor_links(netns) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "no link monitor; new interfaces are found by polling");
            return rx;
        }
    };
    let Some(out) = child.stdout.take() else { return rx };
    tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(out).lines();
        loop {
            tokio::select! {
                line = lines.next_line() => match line {
                    // Full: a scan is already due.
                    Ok(Some(_)) => drop(tx.try_send(())),
                    _ => {
                        tracing::warn!("the link monitor ended; new interfaces are found by polling");
                        break;
                    }
                },
                // The probe stops watching: the monitor goes too.
                () = tx.closed() => break,
            }
        }
        // Killed on drop.
        drop(child);
    });
    rx
}

/// The inodes of the namespaces listed in `text`, one path per line; a namespace that
/// is gone is skipped (its pod was deleted between the write and the read).
fn listed_netns(text: &str) -> Vec<u32> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .filter_map(|l| std::fs::metadata(l).ok().map(|m| m.ino() as u32))
        .collect()
}

/// Hands the datapath the namespaces of `--drop-netns` and of the file, when they changed.
fn sync_drop_netns(datapath: &Datapath, fixed: &[PathBuf], file: &std::path::Path, last: &mut Option<Vec<u32>>) {
    let Ok(text) = std::fs::read_to_string(file) else {
        return; // being replaced, or gone: the filter stays as it is
    };
    let mut now: Vec<u32> = fixed.iter().filter_map(|p| std::fs::metadata(p).ok().map(|m| m.ino() as u32)).collect();
    now.extend(listed_netns(&text));
    now.sort_unstable();
    now.dedup();
    if last.as_ref() == Some(&now) {
        return;
    }
    match datapath.set_drop_netns(now.clone()) {
        Ok(()) => {
            tracing::info!(namespaces = now.len(), "kernel drops reported for these namespaces");
            *last = Some(now);
        }
        Err(e) => tracing::warn!(error = %e, "updating the namespaces of kernel drops"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listed_namespace_that_is_gone_is_skipped() {
        let own = std::fs::metadata("/proc/self/ns/net").expect("own netns").ino() as u32;
        let text = "/proc/self/ns/net\n\n  /run/netns/flows-no-such-namespace  \n";
        assert_eq!(listed_netns(text), [own]);
    }
}
