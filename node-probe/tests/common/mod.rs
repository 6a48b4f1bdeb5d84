//! Shared by the kernel tests and benches: node-probe processes for a lab's nodes.
#![allow(dead_code)]

use std::{
    path::Path,
    process::{Child, Command},
    time::{Duration, Instant},
};

use flows_lab::state::State;
use flows_proto::{
    Flow, GetFlowsRequest, ServerStatusRequest, ServerStatusResponse,
    get_flows_response::ResponseTypes, observer_client::ObserverClient,
};

/// A node-probe process; SIGTERM (or SIGKILL) and reaped on drop.
pub struct Probe {
    pub node: String,
    child: Option<Child>,
    pub addr: String,
}

impl Probe {
    pub fn start(state: &State, node: &str, dir: &Path) -> Probe {
        Probe::start_with(state, node, dir, &[])
    }

    pub fn start_with(state: &State, node: &str, dir: &Path, extra: &[&str]) -> Probe {
        let n = state.node(node).expect("node in state");
        let ready = dir.join(format!("probe-{node}.ready"));
        let _ = std::fs::remove_file(&ready);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_flows-node-probe"));
        cmd.args(["--node-name", node, "--netns", &n.netns])
            .args(["--listen", "127.0.0.1:0", "--iface-poll-secs", "0.2"])
            .arg("--ready-file")
            .arg(&ready)
            .arg("--drop-netns")
            .arg(Path::new("/run/netns").join(&n.netns));
        for p in state.pods.iter().filter(|p| p.node == node) {
            cmd.arg("--drop-netns").arg(Path::new("/run/netns").join(&p.netns));
        }
        cmd.args(extra);
        cmd.env("RUST_LOG", "warn");
        let child = cmd.spawn().expect("spawn node-probe");
        let mut probe = Probe {
            node: node.to_string(),
            child: Some(child),
            addr: String::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(a) = std::fs::read_to_string(&ready) {
                if !a.is_empty() {
                    probe.addr = a;
                    break;
                }
            }
            if let Some(Ok(Some(status))) = probe.child.as_mut().map(|c| c.try_wait()) {
                panic!("node-probe for {node} exited early: {status}");
            }
            assert!(Instant::now() < deadline, "node-probe for {node} not ready in 30 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        probe
    }

    /// The probe's process id (0 once it was signalled away).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    pub fn signal(&mut self, sig: nix::sys::signal::Signal) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, sig);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                return st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return child.wait().expect("wait");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = c.wait();
        }
    }
}

pub fn all_flows(addr: &str) -> Vec<Flow> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut client = ObserverClient::connect(format!("http://{addr}"))
            .await
            .expect("connect");
        let mut stream = client
            .get_flows(GetFlowsRequest::default())
            .await
            .expect("GetFlows")
            .into_inner();
        let mut out = Vec::new();
        while let Some(r) = stream.message().await.expect("stream") {
            match r.response_types {
                Some(ResponseTypes::Flow(f)) => out.push(f),
                Some(ResponseTypes::LostEvents(l)) => panic!("events lost: {l:?}"),
                _ => {}
            }
        }
        out
    })
}

pub fn server_status(addr: &str) -> ServerStatusResponse {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut client = ObserverClient::connect(format!("http://{addr}"))
            .await
            .expect("connect");
        client
            .server_status(ServerStatusRequest {})
            .await
            .expect("ServerStatus")
            .into_inner()
    })
}

/// Runs `change`, then waits until every probe has read the changed manifests.
pub fn after_policy_change(probes: &[Probe], change: impl FnOnce()) {
    let before: Vec<u64> = probes.iter().map(|p| server_status(&p.addr).policy_reads).collect();
    change();
    let deadline = Instant::now() + Duration::from_secs(15);
    for (p, b) in probes.iter().zip(before) {
        while server_status(&p.addr).policy_reads <= b {
            assert!(Instant::now() < deadline, "node-probe {} did not read the change", p.node);
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
/// Waits until every probe has reported a marker sent after this call. A probe reads
/// its node's events in the order the kernel emitted them, so once its marker is in the
/// ring, so is every event of that node before it: the caller may then assert what is
/// absent. The marker is one UDP datagram from a pod of the node to the world, on a
/// port nothing else uses; it is reported where it leaves the pod, even when dropped.
pub fn settle(state: &State, probes: &[Probe]) {
    use flows_lab::drive::{self, DriveOptions, Scenario};
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    let port = 20_000 + nanos % 10_000;
    let mut yaml = String::from("connections:\n");
    for p in probes {
        let pod = state.pods.iter().find(|x| x.node == p.node).expect("a pod on every probed node");
        yaml.push_str(&format!(
            "  - {{ name: marker-{}, from: {}/{}, to: {{ ip: world }}, protocol: UDP, port: {port}, timeout_ms: 50 }}\n",
            p.node, pod.namespace, pod.name
        ));
    }
    let scenario = Scenario::parse("marker", &yaml).expect("marker scenario");
    drive::run(state, &scenario, &DriveOptions::default()).expect("marker");
    let deadline = Instant::now() + Duration::from_secs(20);
    for p in probes {
        let marked = |f: &Flow| {
            matches!(f.l4.as_ref().and_then(|l| l.protocol.as_ref()),
                Some(flows_proto::layer4::Protocol::Udp(u)) if u.destination_port == port)
        };
        while !all_flows(&p.addr).iter().any(marked) {
            assert!(Instant::now() < deadline, "the marker on port {port} never reached {}'s ring", p.node);
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
