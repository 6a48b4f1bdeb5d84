//! Mutual TLS on the Observer API over real loopback connections: a client with a
//! certificate from the deployment's CA is served; plaintext, a client without a
//! certificate, a certificate from another CA and a server name the certificate does
//! not carry are all refused. Bad certificate files are reported by name at load.

use std::{path::PathBuf, sync::Arc, time::Instant};

use flows_node_probe::{
    ring::{Entry, FlowRing},
    server::ObserverService,
    stats::ProbeStats,
};
use flows_proto::{Flow, GetFlowsRequest, ServerStatusRequest, observer_client::ObserverClient};
use flows_tls::{ClientTls, Dialer, ServerTls, certs};

fn temp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("flows-tls-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

struct Dirs(Vec<PathBuf>);
impl Drop for Dirs {
    fn drop(&mut self) {
        for d in &self.0 {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

async fn serve_tls(tls: &ServerTls) -> String {
    let ring = Arc::new(FlowRing::new(8).expect("ring"));
    ring.push(Entry::Flow(Flow { packet_length: 7, ..Default::default() }));
    let (_stop, shutdown) = tokio::sync::watch::channel(false);
    std::mem::forget(_stop);
    let svc = ObserverService {
        ring,
        stats: Arc::new(ProbeStats::default()),
        node_name: "node-tls".into(),
        streams: flows_tls::serving::StreamSlots::new(64),
        started: Instant::now(),
        metrics: Arc::new(flows_node_probe::metrics::Metrics::new()),
        shutdown,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let router = flows_tls::serving::server().add_service(svc.into_server());
    let tls = tls.load().expect("server TLS");
    tokio::spawn(flows_tls::serving::serve(router, listener, Some(tls), std::future::pending()));
    addr.to_string()
}

/// The node name from ServerStatus, or the error as text.
async fn status(dialer: &Dialer, addr: &str) -> Result<String, String> {
    let ep = dialer.endpoint(addr).map_err(|e| e.to_string())?;
    let channel = ep.connect().await.map_err(|e| flows_tls::error_chain(&e))?;
    let mut c = ObserverClient::new(channel);
    let st = c.server_status(ServerStatusRequest {}).await.map_err(|s| format!("{s:?}"))?;
    // A stream works too, not just one call.
    let mut s = c.get_flows(GetFlowsRequest::default()).await.map_err(|s| format!("{s:?}"))?.into_inner();
    while s.message().await.map_err(|s| format!("{s:?}"))?.is_some() {}
    Ok(st.into_inner().node_name)
}

fn client(dir: &std::path::Path, cert: bool, name: &str) -> ClientTls {
    ClientTls {
        ca: dir.join("ca.crt"),
        cert: cert.then(|| dir.join("client.crt")),
        key: cert.then(|| dir.join("client.key")),
        server_name: Some(name.into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_serves_its_clients_and_refuses_everyone_else() {
    let (ours, theirs) = (temp("ours"), temp("theirs"));
    let _clean = Dirs(vec![ours.clone(), theirs.clone()]);
    let spec = certs::CertSpec::default();
    certs::create(&ours, &spec, false).expect("our certificates");
    certs::create(&theirs, &spec, false).expect("another CA's certificates");
    // Keys are private to their owner.
    use std::os::unix::fs::PermissionsExt;
    for k in ["ca.key", "probe.key", "relay.key", "client.key"] {
        let mode = std::fs::metadata(ours.join(k)).expect("key").permissions().mode();
        assert_eq!(mode & 0o077, 0, "{k} is readable by others: {mode:o}");
    }
    // Files are not replaced unless asked.
    let again = certs::create(&ours, &spec, false).expect_err("existing files are kept");
    assert!(again.to_string().contains("ca.crt"), "{again}");

    let addr = serve_tls(&ServerTls {
        cert: ours.join("probe.crt"),
        key: ours.join("probe.key"),
        client_ca: ours.join("ca.crt"),
        allowed_clients: Vec::new(),
    })
    .await;
    let probe_name = &spec.probe_names[0];

    // Our client, checking the probe's name: served.
    let good = Dialer::new(Some(&client(&ours, true, probe_name))).expect("client TLS");
    assert_eq!(status(&good, &addr).await, Ok("node-tls".to_string()));
    // The relay's certificate is a client certificate too (it dials the probes).
    let relay = ClientTls {
        cert: Some(ours.join("relay.crt")),
        key: Some(ours.join("relay.key")),
        ..client(&ours, true, probe_name)
    };
    assert_eq!(status(&Dialer::new(Some(&relay)).expect("relay TLS"), &addr).await, Ok("node-tls".to_string()));

    // Plaintext: refused.
    let plain = status(&Dialer::plaintext(), &addr).await;
    assert!(plain.is_err(), "plaintext was served: {plain:?}");
    // TLS without a client certificate: refused.
    let anonymous = status(&Dialer::new(Some(&client(&ours, false, probe_name))).expect("tls"), &addr).await;
    assert!(anonymous.is_err(), "a client without a certificate was served: {anonymous:?}");
    // A client certificate from another CA: refused.
    let stranger = ClientTls {
        cert: Some(theirs.join("client.crt")),
        key: Some(theirs.join("client.key")),
        ..client(&ours, true, probe_name)
    };
    let stranger = status(&Dialer::new(Some(&stranger)).expect("tls"), &addr).await;
    assert!(stranger.is_err(), "another CA's client was served: {stranger:?}");
    // A server whose certificate is not from the CA we trust: refused by the client.
    let wrong_ca = status(&Dialer::new(Some(&client(&theirs, true, probe_name))).expect("tls"), &addr).await;
    let e = wrong_ca.expect_err("a server from another CA was trusted");
    assert!(e.contains("certificate"), "{e}");
    // The right CA but another name: refused by the client, saying which names it has.
    let wrong_name = status(&Dialer::new(Some(&client(&ours, true, "relay.flows.local"))).expect("tls"), &addr).await;
    let e = wrong_name.expect_err("a certificate for another name was accepted");
    assert!(e.contains("not valid for name"), "{e}");
    // Asking for plaintext to a TLS address is refused before dialling.
    let e = good.endpoint(&format!("http://{addr}")).expect_err("http with TLS configured");
    assert!(e.to_string().contains("TLS is configured"), "{e}");
}

#[test]
fn bad_certificate_files_are_named() {
    let dir = temp("bad");
    let _clean = Dirs(vec![dir.clone()]);
    certs::create(&dir, &certs::CertSpec::default(), false).expect("certificates");
    let missing = ServerTls {
        cert: dir.join("nope.crt"),
        key: dir.join("probe.key"),
        client_ca: dir.join("ca.crt"),
        allowed_clients: Vec::new(),
    };
    let e = missing.load().expect_err("a missing file").to_string();
    assert!(e.contains("nope.crt"), "{e}");
    // A certificate where the key should be.
    let swapped = ServerTls {
        cert: dir.join("probe.crt"),
        key: dir.join("probe.crt"),
        client_ca: dir.join("ca.crt"),
        allowed_clients: Vec::new(),
    };
    let e = swapped.load().expect_err("a certificate as key").to_string();
    assert!(e.contains("probe.crt") && e.contains("PRIVATE KEY"), "{e}");
    // The error never carries key material.
    let not_a_cert = ServerTls {
        cert: dir.join("probe.key"),
        key: dir.join("probe.key"),
        client_ca: dir.join("ca.crt"),
        allowed_clients: Vec::new(),
    };
    let e = not_a_cert.load().expect_err("a key as certificate").to_string();
    let key = std::fs::read_to_string(dir.join("probe.key")).expect("key");
    let body: String = key.lines().nth(1).unwrap_or_default().to_string();
    assert!(!body.is_empty() && !e.contains(&body), "{e}");
}


/// Certificates rotated on disk the way a Secret volume does it (new files renamed into
/// place) are served from the next connection, without a restart; a connection opened
/// before keeps working; files that do not make a valid pair leave the last good ones
/// in force.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_certificates_are_served_without_a_restart() {
    let (live, old, new) = (temp("live"), temp("old"), temp("new"));
    let _clean = Dirs(vec![live.clone(), old.clone(), new.clone()]);
    let spec = certs::CertSpec::default();
    certs::create(&old, &spec, false).expect("the first CA's certificates");
    certs::create(&new, &spec, false).expect("the next CA's certificates");
    std::fs::create_dir_all(&live).expect("dir");
    let put = |from: &std::path::Path, file: &str, as_: &str| {
        let tmp = live.join(format!(".{as_}.tmp"));
        std::fs::copy(from.join(file), &tmp).expect("copy");
        std::fs::rename(&tmp, live.join(as_)).expect("rename into place");
    };
    for f in ["probe.crt", "probe.key", "ca.crt"] {
        put(&old, f, f);
    }
    let addr = serve_tls(&ServerTls {
        cert: live.join("probe.crt"),
        key: live.join("probe.key"),
        client_ca: live.join("ca.crt"),
        allowed_clients: Vec::new(),
    })
    .await;
    let name = &spec.probe_names[0];
    let (before, after) = (
        Dialer::new(Some(&client(&old, true, name))).expect("tls"),
        Dialer::new(Some(&client(&new, true, name))).expect("tls"),
    );
    assert_eq!(status(&before, &addr).await, Ok("node-tls".to_string()));
    assert!(status(&after, &addr).await.is_err(), "the next CA is not trusted yet");
    let kept = before.endpoint(&addr).expect("endpoint").connect().await.expect("connect");
    let mut kept = ObserverClient::new(kept);
    kept.server_status(ServerStatusRequest {}).await.expect("an open connection");

    for f in ["probe.crt", "probe.key", "ca.crt"] {
        put(&new, f, f);
    }
    assert_eq!(status(&after, &addr).await, Ok("node-tls".to_string()), "the rotated files are served");
    assert!(status(&before, &addr).await.is_err(), "the old CA's clients are refused now");
    kept.server_status(ServerStatusRequest {}).await.expect("the connection opened before still works");

    // A key that does not belong to the certificate (a rotation caught halfway): the
    // last good pair stays in force.
    put(&old, "probe.key", "probe.key");
    assert_eq!(status(&after, &addr).await, Ok("node-tls".to_string()), "the last good files stay in force");
    put(&new, "probe.key", "probe.key");
    assert_eq!(status(&after, &addr).await, Ok("node-tls".to_string()));

    // The client side (the relay dialling probes): one Dialer, its files rotated under
    // it, is let in again from its next connection on.
    let mine = live.join("client");
    std::fs::create_dir_all(&mine).expect("dir");
    let put_client = |from: &std::path::Path| {
        for f in ["ca.crt", "client.crt", "client.key"] {
            let tmp = mine.join(format!(".{f}.tmp"));
            std::fs::copy(from.join(f), &tmp).expect("copy");
            std::fs::rename(&tmp, mine.join(f)).expect("rename into place");
        }
    };
    put_client(&old);
    let dialer = Dialer::new(Some(&client(&mine, true, name))).expect("tls");
    assert!(status(&dialer, &addr).await.is_err(), "the old CA's client is refused");
    put_client(&new);
    assert_eq!(status(&dialer, &addr).await, Ok("node-tls".to_string()), "the same dialer with rotated files");
}
