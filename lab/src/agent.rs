//! The lab agent: one background process holding every listener of the lab. For each pod it
//! opens, inside the pod's netns, a TCP listener per declared TCP port (answers one line
//! `<ns>/<pod> <port>` and closes) and a UDP socket per UDP port (echoes datagrams), on IPv4
//! and IPv6; the kube-dns pod's port 53 answers DNS instead; the world host has TCP 80 and
//! 443 and a UDP echo on 123. One mio event loop on one thread serves all of them, so
//! hundreds of pods cost file descriptors, not threads.
//!
//! The agent is started by `up` either as `flows lab agent --state <dir>` (the CLI) or by
//! re-executing the current binary with `FLOWS_LAB_AGENT_DIR` set, which a constructor in
//! this crate intercepts before `main` (so test binaries can host it too).

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::{self, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream, UdpSocket};
use mio::{Events, Interest, Poll, Token};
use socket2::{Domain, Socket, Type};

use crate::dns::Zone;
use crate::kubelet::{self, AgentLink, ToAgent};
use crate::error::LabError;
use crate::netns::Switcher;
use crate::plan::{self, WORLD_TCP_PORTS, WORLD_UDP_PORTS};
use crate::state::State;

/// Set to the state dir to make any binary linking this crate run the agent instead of main.
pub const ENV_AGENT_DIR: &str = "FLOWS_LAB_AGENT_DIR";
/// Written by the agent once every socket is bound: "ready" or "error: <why>".
pub const READY_FILE: &str = "agent.ready";
/// The agent's own pid, so `down` finds it even if the state never recorded it.
pub const PID_FILE: &str = "agent.pid";
pub const LOG_FILE: &str = "agent.log";
/// The role of the agent in `State::daemons`.
pub const ROLE: &str = "agent";
/// Every live agent holds a shared flock on this file, so "is a lab in use?" has an answer
/// that no stale file can fake: if an exclusive lock can be had, no agent is running.
pub const ACTIVE_LOCK: &str = "/run/flows-lab.active.lock";

/// True if some agent process (of any state dir) is alive.
pub fn any_agent_alive() -> bool {
    let Ok(file) = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(ACTIVE_LOCK)
    else {
        return false;
    };
    // SAFETY: flock on a valid fd; the lock, if taken, goes away with `file`.
    unsafe {
        libc::flock(
            std::os::fd::AsRawFd::as_raw_fd(&file),
            libc::LOCK_EX | libc::LOCK_NB,
        ) != 0
    }
}

/// How `up` starts the agent process.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum AgentLaunch {
    /// Re-execute the current binary with `FLOWS_LAB_AGENT_DIR` set (works in any binary
    /// that links flows-lab, including test binaries).
    #[default]
    SelfExec,
    /// Run this program with these arguments (the CLI: `flows lab agent --state <dir>`).
    Command {
        program: PathBuf,
        args: Vec<OsString>,
    },
}

/// Runs the agent from a process-start constructor when `FLOWS_LAB_AGENT_DIR` is set.
extern "C" fn agent_hook() {
    if let Some(dir) = std::env::var_os(ENV_AGENT_DIR) {
        let code = main(Path::new(&dir));
        std::process::exit(code);
    }
}

#[used]
#[unsafe(link_section = ".init_array")]
static AGENT_HOOK: extern "C" fn() = agent_hook;

/// The agent's entry point: runs until killed; returns an exit code if it cannot start.
/// Setup errors are also written to the ready file so `up` can report them.
pub fn main(dir: &Path) -> i32 {
    // Writes to a peer that reset must not kill the process (pre-main, std has not done this).
    // SAFETY: setting a signal disposition to SIG_IGN has no memory effects.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    match run(dir) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("flows lab agent: {e}");
            let _ = fs::write(dir.join(READY_FILE), format!("error: {e}\n"));
            1
        }
    }
}

/// What one socket serves.
#[derive(Clone, Debug)]
enum Kind {
    /// TCP: write this line, then close.
    Line(String),
    /// UDP: echo.
    Echo,
    /// TCP or UDP: answer DNS.
    Dns,
}

#[derive(Clone, Debug)]
struct ListenSpec {
    netns: String,
    tcp: bool,
    addr: SocketAddr,
    kind: Kind,
}

fn listen_specs(state: &State) -> Vec<ListenSpec> {
    let mut specs = pod_specs(&state.pods);
    world_specs(state, &mut specs);
    specs
}

/// Each pod's declared ports.
fn pod_specs(pods: &[crate::state::PodRec]) -> Vec<ListenSpec> {
    let mut specs = Vec::new();
    for pod in pods {
        let dns = plan::is_dns_pod(pod);
        for port in &pod.ports {
            let tcp = match port.protocol.as_str() {
                "TCP" => true,
                "UDP" => false,
                _ => continue, // SCTP is recorded, not served
            };
            let kind = match (dns && port.port == 53, tcp) {
                (true, _) => Kind::Dns,
                (false, true) => {
                    Kind::Line(format!("{}/{} {}\n", pod.namespace, pod.name, port.port))
                }
                (false, false) => Kind::Echo,
            };
            // TCP answers from whatever address was dialled; UDP binds the pod's address so
            // replies always leave from the address the client sent to.
            let addrs: [IpAddr; 2] = if tcp {
                [Ipv4Addr::UNSPECIFIED.into(), Ipv6Addr::UNSPECIFIED.into()]
            } else {
                [pod.ipv4.into(), pod.ipv6.into()]
            };
            for ip in addrs {
                specs.push(ListenSpec {
                    netns: pod.netns.clone(),
                    tcp,
                    addr: SocketAddr::new(ip, port.port),
                    kind: kind.clone(),
                });
            }
        }
    }
    specs
}

/// The world host's services.
fn world_specs(state: &State, specs: &mut Vec<ListenSpec>) {
    let world = &state.world;
    for port in WORLD_TCP_PORTS {
        for ip in [IpAddr::V4(world.ipv4), IpAddr::V6(world.ipv6)] {
            specs.push(ListenSpec {
                netns: world.netns.clone(),
                tcp: true,
                addr: SocketAddr::new(ip, port),
                kind: Kind::Line(format!("world {port}\n")),
            });
        }
    }
    for port in WORLD_UDP_PORTS {
        for ip in [IpAddr::V4(world.ipv4), IpAddr::V6(world.ipv6)] {
            specs.push(ListenSpec {
                netns: world.netns.clone(),
                tcp: false,
                addr: SocketAddr::new(ip, port),
                kind: Kind::Echo,
            });
        }
    }
}

fn open_socket(spec: &ListenSpec) -> std::io::Result<Socket> {
    let ty = if spec.tcp { Type::STREAM } else { Type::DGRAM };
    let socket = Socket::new(Domain::for_address(spec.addr), ty, None)?;
    if spec.addr.is_ipv6() {
        socket.set_only_v6(true)?;
        socket.set_freebind_v6(true)?;
    } else {
        socket.set_freebind_v4(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&spec.addr.into())?;
    if spec.tcp {
        socket.listen(1024)?;
    }
    Ok(socket)
}

/// Opens every listener, a few netns-switching threads at a time.
fn open_all(specs: &[ListenSpec]) -> Result<Vec<Socket>, LabError> {
    // Group by netns (in order) so each thread enters each netns once.
    let mut groups: Vec<(String, Vec<usize>)> = Vec::new();
    let mut index: HashMap<&str, usize> = HashMap::new();
    for (i, s) in specs.iter().enumerate() {
        let g = *index.entry(s.netns.as_str()).or_insert_with(|| {
            groups.push((s.netns.clone(), Vec::new()));
            groups.len() - 1
        });
        groups[g].1.push(i);
    }
    let next = AtomicUsize::new(0);
    let workers = groups.len().clamp(1, 4);
    let results: Vec<Result<Vec<(usize, Socket)>, LabError>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                s.spawn(|| {
                    let mut switcher = Switcher::default();
                    let mut out = Vec::new();
                    loop {
                        let g = next.fetch_add(1, Ordering::Relaxed);
                        let Some((netns, members)) = groups.get(g) else {
                            break;
                        };
                        switcher.enter(netns)?;
                        for &i in members {
                            let socket = open_socket(&specs[i]).map_err(|e| {
                                let proto = if specs[i].tcp { "tcp" } else { "udp" };
                                LabError::netns(
                                    netns,
                                    format!("listen on {proto} {}", specs[i].addr),
                                    e,
                                )
                            })?;
                            out.push((i, socket));
                        }
                    }
                    Ok(out)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(LabError::sys(
                        "listener thread",
                        std::io::Error::other("panicked"),
                    ))
                })
            })
            .collect()
    });
    let mut sockets: Vec<Option<Socket>> = specs.iter().map(|_| None).collect();
    for r in results {
        for (i, s) in r? {
            sockets[i] = Some(s);
        }
    }
    sockets
        .into_iter()
        .map(|s| {
            s.ok_or_else(|| {
                LabError::sys(
                    "open listeners",
                    std::io::Error::other("a socket is missing"),
                )
            })
        })
        .collect()
}

/// File descriptors: a few per pod; lift the soft limit to the hard one.
fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

enum Entry {
    Listener(TcpListener, Kind),
    Udp(UdpSocket, Kind),
    Conn(Conn),
}

struct Conn {
    stream: TcpStream,
    dns: bool,
    buf: Vec<u8>,
    deadline: Instant,
}

/// Closed connections that linger (unanswered, idle) are dropped after this.
const CONN_IDLE: Duration = Duration::from_secs(10);
const MAX_CONNS: usize = 8192;

struct Agent {
    poll: Poll,
    entries: Vec<Option<Entry>>,
    free: Vec<usize>,
    conns: usize,
    zone: Zone,
    scratch: Vec<u8>,
    /// The listener slots in each pod's namespace, closed when the pod goes.
    by_netns: HashMap<String, Vec<usize>>,
}

/// The token of the kubelet's wake-ups; no entry has it.
const WAKE: Token = Token(usize::MAX);

impl Agent {
    /// Registers the listeners of `specs`, opened as `sockets`.
    fn listen(&mut self, specs: &[ListenSpec], sockets: Vec<Socket>) -> std::io::Result<()> {
        for (spec, socket) in specs.iter().zip(sockets) {
            let entry = if spec.tcp {
                Entry::Listener(TcpListener::from_std(socket.into()), spec.kind.clone())
            } else {
                Entry::Udp(UdpSocket::from_std(socket.into()), spec.kind.clone())
            };
            let slot = self.insert(entry)?;
            self.by_netns.entry(spec.netns.clone()).or_default().push(slot);
        }
        Ok(())
    }

    /// Closes every listener in `netns` (connections already accepted end as they do).
    fn forget(&mut self, netns: &str) {
        for slot in self.by_netns.remove(netns).unwrap_or_default() {
            let registry = self.poll.registry();
            match self.entries.get_mut(slot).and_then(Option::take) {
                Some(Entry::Listener(mut l, _)) => drop(registry.deregister(&mut l)),
                Some(Entry::Udp(mut u, _)) => drop(registry.deregister(&mut u)),
                Some(other) => {
                    self.entries[slot] = Some(other);
                    continue;
                }
                None => continue,
            }
            self.free.push(slot);
        }
    }

    /// Does what the kubelet asked, and says so.
    fn answer(&mut self, ask: ToAgent) {
        match ask {
            ToAgent::Serve { pods, zone, done } => {
                let specs = pod_specs(&pods);
                let opened = open_all(&specs)
                    .and_then(|sockets| self.listen(&specs, sockets).map_err(|e| LabError::sys("epoll_ctl", e)));
                if opened.is_ok() {
                    self.zone = zone;
                    eprintln!("flows lab agent: serving {} sockets of {} new pods", specs.len(), pods.len());
                } else {
                    // Half-opened: closed again, so the kubelet can try the pod afresh.
                    for p in &pods {
                        self.forget(&p.netns);
                    }
                }
                let _ = done.send(opened);
            }
            ToAgent::Forget { netns, zone, done } => {
                for n in &netns {
                    self.forget(n);
                }
                self.zone = zone;
                let _ = done.send(Ok(()));
            }
        }
    }

    fn insert(&mut self, mut entry: Entry) -> std::io::Result<usize> {
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.entries.push(None);
                self.entries.len() - 1
            }
        };
        let token = Token(slot);
        let registry = self.poll.registry();
        let res = match &mut entry {
            Entry::Listener(l, _) => registry.register(l, token, Interest::READABLE),
            Entry::Udp(u, _) => registry.register(u, token, Interest::READABLE),
            Entry::Conn(c) => registry.register(&mut c.stream, token, Interest::READABLE),
        };
        if let Err(e) = res {
            self.free.push(slot);
            return Err(e);
        }
        if matches!(entry, Entry::Conn(_)) {
            self.conns += 1;
        }
        self.entries[slot] = Some(entry);
        Ok(slot)
    }

    fn close(&mut self, slot: usize) {
        if let Some(Some(Entry::Conn(mut c))) = self.entries.get_mut(slot).map(Option::take) {
            let _ = self.poll.registry().deregister(&mut c.stream);
            self.conns -= 1;
            self.free.push(slot);
        }
    }

    fn handle(&mut self, slot: usize) {
        let Some(entry) = self.entries.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        match entry {
            Entry::Listener(listener, kind) => {
                let mut accepted = Vec::new();
                loop {
                    match listener.accept() {
                        Ok((stream, _)) => accepted.push(stream),
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                        Err(e) => {
                            eprintln!("accept: {e}");
                            break;
                        }
                    }
                }
                let kind = kind.clone();
                for mut stream in accepted {
                    let dns = match &kind {
                        Kind::Line(text) => {
                            // A short line fits the socket buffer; then FIN, and drain what the
                            // client sends so closing does not turn into a reset.
                            let _ = stream.write(text.as_bytes());
                            let _ = stream.shutdown(Shutdown::Write);
                            false
                        }
                        _ => true,
                    };
                    if self.conns >= MAX_CONNS {
                        continue; // dropped: closes
                    }
                    let conn = Conn {
                        stream,
                        dns,
                        buf: Vec::new(),
                        deadline: Instant::now() + CONN_IDLE,
                    };
                    if let Err(e) = self.insert(Entry::Conn(conn)) {
                        eprintln!("register connection: {e}");
                    }
                }
            }
            Entry::Udp(socket, kind) => loop {
                match socket.recv_from(&mut self.scratch) {
                    Ok((n, from)) => {
                        let reply = match kind {
                            Kind::Dns => self.zone.answer(&self.scratch[..n]),
                            _ => Some(self.scratch[..n].to_vec()),
                        };
                        if let Some(reply) = reply {
                            let _ = socket.send_to(&reply, from);
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    // ICMP errors from earlier sends surface here; keep serving.
                    Err(_) => continue,
                }
            },
            Entry::Conn(conn) => {
                let mut close = false;
                loop {
                    match conn.stream.read(&mut self.scratch) {
                        Ok(0) => {
                            close = true;
                            break;
                        }
                        Ok(n) => {
                            conn.deadline = Instant::now() + CONN_IDLE;
                            if conn.dns {
                                conn.buf.extend_from_slice(&self.scratch[..n]);
                                if !answer_dns_tcp(&self.zone, conn) {
                                    close = true;
                                    break;
                                }
                            }
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                        Err(_) => {
                            close = true;
                            break;
                        }
                    }
                }
                if close {
                    self.close(slot);
                }
            }
        }
    }

    fn sweep(&mut self) {
        let now = Instant::now();
        let expired: Vec<usize> = self
            .entries
            .iter()
            .enumerate()
            .filter_map(|(i, e)| match e {
                Some(Entry::Conn(c)) if c.deadline <= now => Some(i),
                _ => None,
            })
            .collect();
        for slot in expired {
            self.close(slot);
        }
    }
}

/// Answers every complete length-prefixed query in the buffer; false to close.
fn answer_dns_tcp(zone: &Zone, conn: &mut Conn) -> bool {
    loop {
        if conn.buf.len() < 2 {
            return true;
        }
        let len = usize::from(u16::from_be_bytes([conn.buf[0], conn.buf[1]]));
        if conn.buf.len() < 2 + len {
            return conn.buf.len() <= 2 + 65535;
        }
        let Some(reply) = zone.answer(&conn.buf[2..2 + len]) else {
            return false;
        };
        conn.buf.drain(..2 + len);
        let mut framed = (reply.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(&reply);
        // Small replies fit the send buffer; a client that does not read is dropped.
        match conn.stream.write(&framed) {
            Ok(n) if n == framed.len() => {}
            _ => return false,
        }
    }
}

/// The agent body: opens every listener, reports ready, serves until killed.
pub fn run(dir: &Path) -> Result<(), LabError> {
    let pid_path = dir.join(PID_FILE);
    fs::write(&pid_path, format!("{}\n", std::process::id()))
        .map_err(|e| LabError::io(&pid_path, e))?;
    raise_nofile();
    // Bound for the whole of `run`: the shared lock is held until the process ends.
    let active = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(ACTIVE_LOCK)
        .map_err(|e| LabError::io(ACTIVE_LOCK, e))?;
    // SAFETY: flock on a valid fd; held (shared) until this process ends.
    if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&active), libc::LOCK_SH) } != 0 {
        return Err(LabError::sys(
            format!("flock {ACTIVE_LOCK}"),
            std::io::Error::last_os_error(),
        ));
    }
    let state = State::load(dir)?;
    let specs = listen_specs(&state);
    let sockets = open_all(&specs)?;
    let poll = Poll::new().map_err(|e| LabError::sys("epoll_create", e))?;
    let waker = Arc::new(mio::Waker::new(poll.registry(), WAKE).map_err(|e| LabError::sys("eventfd", e))?);
    let mut agent = Agent {
        poll,
        entries: Vec::new(),
        free: Vec::new(),
        conns: 0,
        zone: Zone::from_state(&state),
        scratch: vec![0u8; 65536],
        by_netns: HashMap::new(),
    };
    agent.listen(&specs, sockets).map_err(|e| LabError::sys("epoll_ctl", e))?;
    let (tx, asks) = mpsc::channel();
    if let Some(api) = &state.api {
        if state.kube_proxy.is_some() {
            crate::kube_proxy::bridge(&state, api)?;
        }
        kubelet::spawn(dir.to_path_buf(), api.clone(), AgentLink { tx, waker });
    }
    let ready = dir.join(READY_FILE);
    let tmp = dir.join(format!(".{READY_FILE}.tmp"));
    fs::write(&tmp, "ready\n").map_err(|e| LabError::io(&tmp, e))?;
    fs::rename(&tmp, &ready).map_err(|e| LabError::io(&ready, e))?;
    eprintln!(
        "flows lab agent {}: ready, {} sockets in {} pods and the world",
        std::process::id(),
        specs.len(),
        state.pods.len()
    );

    let mut events = Events::with_capacity(1024);
    let mut last_sweep = Instant::now();
    loop {
        match agent
            .poll
            .poll(&mut events, Some(Duration::from_millis(500)))
        {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(LabError::sys("epoll_wait", e)),
        }
        for event in events.iter() {
            agent.handle(event.token().0);
        }
        while let Ok(ask) = asks.try_recv() {
            agent.answer(ask);
        }
        if last_sweep.elapsed() >= Duration::from_secs(1) {
            agent.sweep();
            last_sweep = Instant::now();
        }
    }
}

/// Starts the agent process detached (own session, output to `<dir>/agent.log`); returns
/// its pid. It is not waited for here: see `wait_ready`.
pub(crate) fn spawn(dir: &Path, launch: &AgentLaunch) -> Result<u32, LabError> {
    // Keep the constructor linked into every binary that can reach this function.
    std::hint::black_box(&AGENT_HOOK);
    let _ = fs::remove_file(dir.join(READY_FILE));
    let _ = fs::remove_file(dir.join(PID_FILE));
    let log_path = dir.join(LOG_FILE);
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| LabError::io(&log_path, e))?;
    let log2 = log.try_clone().map_err(|e| LabError::io(&log_path, e))?;
    let (mut cmd, shown) = match launch {
        AgentLaunch::SelfExec => {
            let exe = std::env::current_exe()
                .map_err(|e| LabError::sys("find the current executable", e))?;
            let mut c = Command::new(&exe);
            c.env(ENV_AGENT_DIR, dir);
            (
                c,
                format!("{ENV_AGENT_DIR}={} {}", dir.display(), exe.display()),
            )
        }
        AgentLaunch::Command { program, args } => {
            let mut c = Command::new(program);
            c.args(args);
            (c, program.display().to_string())
        }
    };
    cmd.stdin(Stdio::null()).stdout(log).stderr(log2);
    crate::daemon::spawn_detached(cmd, shown)
}

/// Waits until the agent wrote its ready file, or failed, or `timeout` passed.
pub(crate) fn wait_ready(dir: &Path, pid: u32, timeout: Duration) -> Result<(), LabError> {
    let ready = dir.join(READY_FILE);
    let log = dir.join(LOG_FILE);
    let start = Instant::now();
    loop {
        if let Ok(text) = fs::read_to_string(&ready) {
            let text = text.trim();
            if text == "ready" {
                return Ok(());
            }
            return Err(LabError::Agent {
                message: text.strip_prefix("error: ").unwrap_or(text).to_string(),
                log,
            });
        }
        if !crate::process_alive(pid) {
            let tail = fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(5).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            return Err(LabError::Agent {
                message: format!("exited before it was ready: {}", tail.join(" | ")),
                log,
            });
        }
        if start.elapsed() > timeout {
            return Err(LabError::Agent {
                message: format!("not ready after {}s", timeout.as_secs()),
                log,
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
