//! Prometheus metrics of the node-probe and the relay, served as text on
//! `--metrics-listen`.
//!
//! Label sets are bounded: verdicts and event types are enums, drop reasons are the
//! kernel's enum names (plus POLICY_DENIED), protocols five, directions two, loss
//! sources four. Nothing per pod or per address.

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use flows_proto::{EventType, Flow, LostEventSource, Verdict, layer4};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FlowLabels {
    verdict: String,
    event_type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropLabels {
    reason: String,
    protocol: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PolicyLabels {
    direction: String,
    action: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LostLabels {
    source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeLabels {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: String,
}

pub struct Metrics {
    registry: Registry,
    flows: Family<FlowLabels, Counter>,
    drops: Family<DropLabels, Counter>,
    policy: Family<PolicyLabels, Counter>,
    lost: Family<LostLabels, Counter>,
    nodes: Family<NodeLabels, Gauge>,
    store_rows: Family<ResultLabels, Counter>,
    store_batches: Family<ResultLabels, Counter>,
    accept_errors: Counter,
}

fn verdict_name(v: i32) -> &'static str {
    match Verdict::try_from(v) {
        Ok(Verdict::Forwarded) => "forwarded",
        Ok(Verdict::Dropped) => "dropped",
        Ok(Verdict::Audit) => "audit",
        Ok(Verdict::Error) => "error",
        _ => "unknown",
    }
}

fn type_name(t: i32) -> &'static str {
    match EventType::try_from(t) {
        Ok(EventType::Trace) => "trace",
        Ok(EventType::Drop) => "drop",
        Ok(EventType::PolicyVerdict) => "policy-verdict",
        _ => "unknown",
    }
}

fn protocol_name(f: &Flow) -> &'static str {
    match f.l4.as_ref().and_then(|l| l.protocol.as_ref()) {
        Some(layer4::Protocol::Tcp(_)) => "tcp",
        Some(layer4::Protocol::Udp(_)) => "udp",
        Some(layer4::Protocol::Sctp(_)) => "sctp",
        Some(layer4::Protocol::Icmpv4(_)) => "icmpv4",
        Some(layer4::Protocol::Icmpv6(_)) => "icmpv6",
        // Ports unread or a protocol without them (the flow's l4_unknown says which).
        None => "other",
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("flows");
        let flows = Family::<FlowLabels, Counter>::default();
        let drops = Family::<DropLabels, Counter>::default();
        let policy = Family::<PolicyLabels, Counter>::default();
        let lost = Family::<LostLabels, Counter>::default();
        registry.register("flows_processed", "Flows processed, by verdict and event type", flows.clone());
        registry.register("drops", "Dropped flows, by drop reason and protocol", drops.clone());
        registry.register(
            "policy_verdicts",
            "Policy decisions, by direction and action (allowed, denied, audit)",
            policy.clone(),
        );
        registry.register("lost_events", "Events lost, by where they were lost", lost.clone());
        let nodes = Family::<NodeLabels, Gauge>::default();
        registry.register("nodes", "Node-probes by connection state (relay)", nodes.clone());
        let store_rows = Family::<ResultLabels, Counter>::default();
        registry.register(
            "store_rows",
            "Flows for the store, by result (written, set_aside, lost_buffer_full, lost_shutdown, lost_refused, lost_unrecoverable, recovered) (relay)",
            store_rows.clone(),
        );
        let store_batches = Family::<ResultLabels, Counter>::default();
        registry.register("store_batches", "Store inserts, by result (ok, failed) (relay)", store_batches.clone());
        let accept_errors = Counter::default();
        registry.register(
            "metrics_accept_errors",
            "Connections the metrics server failed to accept (out of descriptors, most often)",
            accept_errors.clone(),
        );
        Metrics {
            registry,
            flows,
            drops,
            policy,
            lost,
            nodes,
            store_rows,
            store_batches,
            accept_errors,
        }
    }

    /// Failed accepts of the metrics server so far.
    pub fn accept_errors(&self) -> u64 {
        self.accept_errors.get()
    }

    pub fn observe(&self, f: &Flow) {
        self.flows
            .get_or_create(&FlowLabels {
                verdict: verdict_name(f.verdict).into(),
                event_type: type_name(f.event_type).into(),
            })
            .inc();
        if f.verdict == Verdict::Dropped as i32 {
            self.drops
                .get_or_create(&DropLabels {
                    reason: f.drop_reason.clone(),
                    protocol: protocol_name(f).into(),
                })
                .inc();
        }
        if f.event_type == EventType::PolicyVerdict as i32 {
            let action = match Verdict::try_from(f.verdict) {
                Ok(Verdict::Dropped) => "denied",
                Ok(Verdict::Audit) => "audit",
                _ => "allowed",
            };
            for (direction, decided) in [
                ("ingress", !f.ingress_allowed_by.is_empty() || !f.ingress_denied_by.is_empty()),
                ("egress", !f.egress_allowed_by.is_empty() || !f.egress_denied_by.is_empty()),
            ] {
                if decided {
                    self.policy
                        .get_or_create(&PolicyLabels {
                            direction: direction.into(),
                            action: action.into(),
                        })
                        .inc();
                }
            }
        }
    }

    pub fn lost(&self, source: LostEventSource, n: u64) {
        let name = match source {
            LostEventSource::KernelRingBuffer => "kernel_ring_buffer",
            LostEventSource::DecoderQueue => "decoder",
            LostEventSource::FlowRingBuffer => "flow_ring_buffer",
            LostEventSource::RelayQueue => "relay_queue",
            LostEventSource::Unspecified => "unknown",
        };
        self.lost
            .get_or_create(&LostLabels { source: name.into() })
            .inc_by(n);
    }

    /// The relay's view of its node-probes.
    pub fn set_nodes(&self, connected: i64, unavailable: i64) {
        self.nodes
            .get_or_create(&NodeLabels { state: "connected".into() })
            .set(connected);
        self.nodes
            .get_or_create(&NodeLabels { state: "unavailable".into() })
            .set(unavailable);
    }

    /// Rows for the store: `written`, `lost_buffer_full` or `lost_shutdown`.
    pub fn store_rows(&self, result: &'static str, n: u64) {
        self.store_rows
            .get_or_create(&ResultLabels { result: result.into() })
            .inc_by(n);
    }

    pub fn store_batch(&self, ok: bool) {
        self.store_batches
            .get_or_create(&ResultLabels { result: if ok { "ok" } else { "failed" }.into() })
            .inc();
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// Connections served at once; more wait in the listen queue.
pub const MAX_CONNECTIONS: usize = 32;

/// After a failed accept (out of descriptors, most often), the pause before the next:
/// descriptors free up instead of the loop spinning on the same error.
const ACCEPT_ERROR_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);

/// Binds `addr` and serves on it (`serve_on`).
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "metrics on /metrics");
    serve_on(listener, metrics).await
}

/// Serves `GET /metrics`, and `GET /healthz` (200 while the process serves: the
/// liveness check of its Kubernetes pod); other paths get 404. A failed accept is
/// logged and survived: one error must not end `/healthz` and get a healthy process
/// restarted. At most `MAX_CONNECTIONS` at once, one request each, and a client that
/// sends nothing is dropped after 10 s.
pub async fn serve_on(listener: tokio::net::TcpListener, metrics: Arc<Metrics>) -> std::io::Result<()> {
    use http_body_util::Full;
    use hyper::{Response, body::Bytes, service::service_fn};
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else { return Ok(()) };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                metrics.accept_errors.inc();
                tracing::warn!(error = %e, "metrics: accepting a connection");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        let m = metrics.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let m = m.clone();
                async move {
                    let resp = if req.uri().path() == "/metrics" {
                        Response::builder()
                            .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
                            .body(Full::new(Bytes::from(m.render())))
                    } else if req.uri().path() == "/healthz" {
                        Response::builder().body(Full::new(Bytes::from_static(b"ok\n")))
                    } else {
                        Response::builder().status(404).body(Full::new(Bytes::from_static(b"not found\n")))
                    };
                    Ok::<_, Infallible>(resp.unwrap_or_else(|_| Response::new(Full::new(Bytes::new()))))
                }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            // A client that opens a connection and sends nothing is dropped.
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                // One request per connection: an idle keep-alive cannot hold a slot.
                .keep_alive(false)
                .serve_connection(io, svc)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flows_proto::Policy;

    #[test]
    fn counts_with_bounded_labels() {
        let m = Metrics::new();
        m.observe(&Flow {
            verdict: Verdict::Dropped as i32,
            event_type: EventType::PolicyVerdict as i32,
            drop_reason: "POLICY_DENIED".into(),
            ingress_denied_by: vec![Policy::default()],
            ..Default::default()
        });
        m.observe(&Flow {
            verdict: Verdict::Forwarded as i32,
            event_type: EventType::Trace as i32,
            ..Default::default()
        });
        m.lost(LostEventSource::KernelRingBuffer, 3);
        let t = m.render();
        assert!(t.contains(r#"flows_flows_processed_total{verdict="dropped",event_type="policy-verdict"} 1"#), "{t}");
        assert!(t.contains(r#"flows_drops_total{reason="POLICY_DENIED",protocol="other"} 1"#), "{t}");
        assert!(t.contains(r#"flows_policy_verdicts_total{direction="ingress",action="denied"} 1"#), "{t}");
        assert!(t.contains(r#"flows_lost_events_total{source="kernel_ring_buffer"} 3"#), "{t}");
    }

    /// A plain HTTP/1.1 GET over a socket; returns the status line and body.
    async fn get(addr: SocketAddr, path: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
            .await
            .expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("read");
        out
    }

    #[tokio::test]
    async fn serves_metrics_health_and_nothing_else() {
        let addr = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port");
        let m = Arc::new(Metrics::new());
        tokio::spawn(serve(addr, m));
        let mut tries = 0;
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            tries += 1;
            assert!(tries < 200, "metrics endpoint did not open");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let health = get(addr, "/healthz").await;
        assert!(health.starts_with("HTTP/1.1 200") && health.ends_with("ok\n"), "{health}");
        let metrics = get(addr, "/metrics").await;
        assert!(metrics.starts_with("HTTP/1.1 200") && metrics.contains("# HELP flows_"), "{metrics}");
        assert!(get(addr, "/debug").await.starts_with("HTTP/1.1 404"));
    }
}
