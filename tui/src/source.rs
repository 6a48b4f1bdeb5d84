//! Where flows come from: a server's Observer API (followed, reconnected with backoff,
//! shown as disconnected meanwhile) or a file of JSON lines replayed at a given rate.
//! The source takes the state's lock only to fold in what it received: it never waits
//! for the screen.

use std::{
    io::BufRead,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use flows_proto::{GetFlowsRequest, GetFlowsResponse, observer_client::ObserverClient};

use crate::{
    now_ms,
    state::{App, Connection},
};

pub enum Source {
    /// `host:port` of a relay or node-probe; the request (history then follow).
    Server { addr: String, dialer: flows_tls::Dialer, request: GetFlowsRequest },
    /// JSON lines (`flows observe -o json`), replayed at `rate` flows a second (0: as
    /// fast as they are read).
    File { path: PathBuf, rate: u64 },
}

impl Source {
    pub fn describe(&self) -> String {
        match self {
            Source::Server { addr, .. } => addr.clone(),
            Source::File { path, rate } => format!("{} at {rate} flows/s", path.display()),
        }
    }
}

const BACKOFF_START: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

fn lock(app: &Arc<Mutex<App>>) -> std::sync::MutexGuard<'_, App> {
    app.lock().unwrap_or_else(|p| p.into_inner())
}

pub async fn feed(source: Source, app: Arc<Mutex<App>>) {
    match source {
        Source::Server { addr, dialer, request } => follow(addr, dialer, request, app).await,
        Source::File { path, rate } => replay(path, rate, app).await,
    }
}

async fn follow(addr: String, dialer: flows_tls::Dialer, request: GetFlowsRequest, app: Arc<Mutex<App>>) {
    let mut delay = BACKOFF_START;
    let mut req = request;
    loop {
        lock(&app).connection = Connection::Connecting;
        let connected = match dialer.endpoint(&addr) {
            Ok(ep) => ep.connect().await.map(ObserverClient::new).map_err(|e| flows_tls::error_chain(&e)),
            Err(e) => Err(e.to_string()),
        };
        let err = match connected {
            Err(e) => e,
            Ok(mut c) => match c.get_flows(req.clone()).await {
                Err(s) => s.message().to_string(),
                Ok(resp) => {
                    lock(&app).connection = Connection::Connected;
                    delay = BACKOFF_START;
                    // The node counts, from the server's status every few seconds.
                    let status = tokio::spawn(poll_status(c.clone(), app.clone()));
                    let mut stream = resp.into_inner();
                    let err = loop {
                        match stream.message().await {
                            Ok(Some(r)) => lock(&app).ingest(r, now_ms()),
                            Ok(None) => break "the server ended the stream".to_string(),
                            Err(s) => break s.message().to_string(),
                        }
                    };
                    status.abort();
                    err
                }
            },
        };
        lock(&app).connection = Connection::Disconnected {
            error: err,
            retry_in_ms: delay.as_millis() as u64,
        };
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(BACKOFF_MAX);
        // After a reconnect, only what is new: the table already holds the history.
        req.number = 0;
        req.follow = true;
    }
}

async fn poll_status(mut c: ObserverClient<tonic::transport::Channel>, app: Arc<Mutex<App>>) {
    loop {
        if let Ok(s) = c.server_status(flows_proto::ServerStatusRequest {}).await {
            lock(&app).server_status(&s.into_inner());
        }
        tokio::time::sleep(STATUS_EVERY).await;
    }
}

const STATUS_EVERY: Duration = Duration::from_secs(2);

/// A record from one JSON line (`flows observe -o json`'s form, or a bare flow); blank
/// and unreadable lines are skipped by the replay.
pub fn parse_line(line: &str) -> Option<GetFlowsResponse> {
    flows_flow::jsonl::read_line(line).ok().flatten()
}

async fn replay(path: PathBuf, rate: u64, app: Arc<Mutex<App>>) {
    let file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) => {
            lock(&app).connection = Connection::Disconnected {
                error: format!("{}: {e}", path.display()),
                retry_in_ms: 0,
            };
            return;
        }
    };
    lock(&app).connection = Connection::Connected;
    let start = std::time::Instant::now();
    let mut sent: u64 = 0;
    for line in std::io::BufReader::new(file).lines() {
        let Ok(line) = line else { break };
        let Some(r) = parse_line(&line) else { continue };
        lock(&app).ingest(r, now_ms());
        sent += 1;
        if rate > 0 && sent % 100 == 0 {
            let due = Duration::from_secs_f64(sent as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
    }
    lock(&app).connection = Connection::Ended;
}
