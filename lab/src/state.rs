//! The state record: what a running lab is made of. It is the contract with the other crates
//! (the node probe finds its node's netns here, tests find pod IPs and 5-tuples here), so the
//! field names and types are fixed; add fields only with `#[serde(default)]`.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::LabError;

pub const STATE_VERSION: u32 = 1;
pub const STATE_FILE: &str = "state.json";
/// Serializes read-modify-write of the state file (`add_daemon`).
pub const LOCK_FILE: &str = "state.lock";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub version: u32,
    pub nodes: Vec<Node>,
    pub namespaces: Vec<NamespaceRec>,
    pub pods: Vec<PodRec>,
    pub services: Vec<ServiceRec>,
    pub world: WorldRec,
    pub daemons: Vec<Daemon>,
    /// The Kubernetes control plane the lab runs on; none for a lab from manifests only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api: Option<ApiRec>,
    /// How pods are wired to their nodes.
    #[serde(default)]
    pub cni: crate::wiring::CniMode,
    /// Pods' traffic to the world leaves with its node's address.
    #[serde(default)]
    pub masquerade: bool,
    /// Services translated by the real kube-proxy in this mode (None: the lab's rules).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kube_proxy: Option<crate::wiring::ProxyMode>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub name: String,
    pub netns: String,
    pub uplink_ipv4: Ipv4Addr,
    pub uplink_ipv6: Ipv6Addr,
    pub pod_cidr_v4: String,
    pub pod_cidr_v6: String,
    pub bridge: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamespaceRec {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRec {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub labels: BTreeMap<String, String>,
    pub node: String,
    pub netns: String,
    pub host_ifname: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    pub ports: Vec<PortRec>,
    /// The direct owner (a ReplicaSet for Deployment pods).
    pub owner: Option<OwnerRec>,
    /// The top-level workload (the Deployment).
    pub workload: Option<OwnerRec>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortRec {
    pub name: Option<String>,
    pub port: u16,
    /// "TCP", "UDP" or "SCTP".
    pub protocol: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerRec {
    pub kind: String,
    pub name: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceRec {
    pub namespace: String,
    pub name: String,
    pub cluster_ipv4: Ipv4Addr,
    pub cluster_ipv6: Ipv6Addr,
    pub selector: BTreeMap<String, String>,
    pub ports: Vec<ServicePortRec>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicePortRec {
    pub name: Option<String>,
    pub port: u16,
    /// A port number ("8080") or the name of a container port ("http").
    pub target_port: String,
    pub protocol: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorldRec {
    pub netns: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
}

/// How to reach a running control plane.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiRec {
    /// `https://127.0.0.1:PORT`.
    pub url: String,
    /// The administrator's kubeconfig (system:masters).
    pub kubeconfig: PathBuf,
    /// The directory of the PKI, kubeconfigs, etcd data and logs.
    pub dir: PathBuf,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Daemon {
    /// "agent" for the lab's own listener process; other crates add their own roles.
    pub role: String,
    pub node: Option<String>,
    pub pid: u32,
}

impl State {
    /// Reads `<dir>/state.json`. A missing file is `LabError::NoState`.
    pub fn load(dir: &Path) -> Result<State, LabError> {
        let path = dir.join(STATE_FILE);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(LabError::NoState { path });
            }
            Err(e) => return Err(LabError::io(path, e)),
        };
        serde_json::from_str(&text).map_err(|error| LabError::StateParse { path, error })
    }

    /// Writes `<dir>/state.json` atomically (temp file + rename), creating `dir`.
    pub fn save(&self, dir: &Path) -> Result<(), LabError> {
        fs::create_dir_all(dir).map_err(|e| LabError::io(dir, e))?;
        let path = dir.join(STATE_FILE);
        // Unique per process and call, so concurrent savers never share a temp file.
        static SAVES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = SAVES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = dir.join(format!(".{STATE_FILE}.{}.{n}.tmp", std::process::id()));
        let json = serde_json::to_vec_pretty(self).map_err(|error| LabError::StateParse {
            path: path.clone(),
            error,
        })?;
        let write = || -> std::io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(&json)?;
            f.write_all(b"\n")?;
            f.sync_all()
        };
        if let Err(e) = write() {
            let _ = fs::remove_file(&tmp);
            return Err(LabError::io(&tmp, e));
        }
        fs::rename(&tmp, &path).map_err(|e| LabError::io(&path, e))
    }

    pub fn pod(&self, namespace: &str, name: &str) -> Option<&PodRec> {
        self.pods
            .iter()
            .find(|p| p.namespace == namespace && p.name == name)
    }

    pub fn service(&self, namespace: &str, name: &str) -> Option<&ServiceRec> {
        self.services
            .iter()
            .find(|s| s.namespace == namespace && s.name == name)
    }

    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// Pods of a Deployment (by workload), sorted by name.
    pub fn deployment_pods(&self, namespace: &str, name: &str) -> Vec<&PodRec> {
        let mut pods: Vec<&PodRec> = self
            .pods
            .iter()
            .filter(|p| {
                p.namespace == namespace
                    && p.workload
                        .as_ref()
                        .is_some_and(|w| w.kind == "Deployment" && w.name == name)
            })
            .collect();
        pods.sort_by(|a, b| a.name.cmp(&b.name));
        pods
    }

    /// The pod, node or world host that owns `ip`, as "ns/pod", "node-1" or "world".
    pub fn owner_of_ip(&self, ip: IpAddr) -> Option<String> {
        for p in &self.pods {
            if ip == IpAddr::V4(p.ipv4) || ip == IpAddr::V6(p.ipv6) {
                return Some(format!("{}/{}", p.namespace, p.name));
            }
        }
        for n in &self.nodes {
            if ip == IpAddr::V4(n.uplink_ipv4) || ip == IpAddr::V6(n.uplink_ipv6) {
                return Some(n.name.clone());
            }
        }
        if ip == IpAddr::V4(self.world.ipv4) || ip == IpAddr::V6(self.world.ipv6) {
            return Some("world".to_string());
        }
        None
    }
}

/// The file listing the namespaces whose kernel drops a node's probe reports (its own
/// and its pods'): every lab node shares one kernel, so each probe must be told which
/// drops are its node's. Rewritten whenever pods come or go; the probe reads it again.
pub fn drop_netns_file(dir: &Path, node: &str) -> PathBuf {
    dir.join("drop-netns").join(node)
}

impl State {
    /// Writes [`drop_netns_file`] for every node, atomically.
    pub fn write_drop_netns(&self, dir: &Path) -> Result<(), LabError> {
        let to = dir.join("drop-netns");
        fs::create_dir_all(&to).map_err(|e| LabError::io(&to, e))?;
        for node in &self.nodes {
            let mut text = format!("/run/netns/{}\n", node.netns);
            for p in self.pods.iter().filter(|p| p.node == node.name) {
                text.push_str(&format!("/run/netns/{}\n", p.netns));
            }
            let path = drop_netns_file(dir, &node.name);
            let tmp = to.join(format!(".{}.tmp", node.name));
            fs::write(&tmp, text).map_err(|e| LabError::io(&tmp, e))?;
            fs::rename(&tmp, &path).map_err(|e| LabError::io(&path, e))?;
        }
        Ok(())
    }
}

/// An exclusive flock on `<dir>/state.lock`, released on drop.
pub(crate) struct DirLock {
    _file: File,
}

impl DirLock {
    pub(crate) fn take(dir: &Path) -> Result<DirLock, LabError> {
        fs::create_dir_all(dir).map_err(|e| LabError::io(dir, e))?;
        let path = dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| LabError::io(&path, e))?;
        flock(&file, &path)?;
        Ok(DirLock { _file: file })
    }
}

/// Blocks until an exclusive flock on `file` is held (the lock goes with the file).
pub(crate) fn flock(file: &File, path: &Path) -> Result<(), LabError> {
    loop {
        // SAFETY: flock on a valid open fd has no memory effects.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if rc == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(LabError::sys(format!("flock {}", path.display()), e));
        }
    }
}

/// Records a daemon in the state of the lab in `dir` (load, push, save under a lock, so
/// concurrent writers do not lose entries).
pub fn add_daemon(dir: &Path, daemon: Daemon) -> Result<(), LabError> {
    let _lock = DirLock::take(dir)?;
    let mut state = State::load(dir)?;
    state.daemons.push(daemon);
    state.save(dir)
}

/// Removes the daemons with this pid from the state (used when a daemon stops on its own).
pub fn remove_daemon(dir: &Path, pid: u32) -> Result<(), LabError> {
    let _lock = DirLock::take(dir)?;
    let mut state = State::load(dir)?;
    state.daemons.retain(|d| d.pid != pid);
    state.save(dir)
}

/// Where a lab started with `--tls` keeps its CA and certificates (`flows certs create`'s
/// files).
pub fn tls_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("tls")
}

/// The names the lab's certificates carry: probes and the relay are dialled by address,
/// so clients check these names instead.
pub const LAB_PROBE_NAME: &str = "node-probe.flows.local";
pub const LAB_RELAY_NAME: &str = "relay.flows.local";

/// Where the lab's node-probes pin their TC links (bpffs), one directory per node. One
/// lab runs on a machine at a time; `down` removes it all.
pub const LAB_PIN_ROOT: &str = "/sys/fs/bpf/flows-lab";

pub fn pin_dir(node: &str) -> PathBuf {
    Path::new(LAB_PIN_ROOT).join(node)
}

/// The state directory: `$FLOWS_LAB_DIR` if set, else `/run/flows-lab`.
pub fn default_dir() -> PathBuf {
    match std::env::var_os("FLOWS_LAB_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => PathBuf::from("/run/flows-lab"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> State {
        State {
            version: STATE_VERSION,
            nodes: vec![Node {
                name: "node-1".into(),
                netns: "flows-node-1".into(),
                uplink_ipv4: Ipv4Addr::new(10, 99, 0, 2),
                uplink_ipv6: "fd00:99::2".parse().expect("literal"),
                pod_cidr_v4: "10.244.1.0/24".into(),
                pod_cidr_v6: "fd00:10:244:1::/64".into(),
                bridge: "flbr0".into(),
            }],
            namespaces: Vec::new(),
            pods: Vec::new(),
            services: Vec::new(),
            world: WorldRec {
                netns: "flows-world".into(),
                ipv4: Ipv4Addr::new(203, 0, 113, 10),
                ipv6: "2001:db8:100::10".parse().expect("literal"),
            },
            daemons: Vec::new(),
            api: None,
            cni: Default::default(),
            masquerade: false,
            kube_proxy: None,
        }
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("flows-lab-state-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn json_field_names_are_the_contract() {
        let v = serde_json::to_value(sample()).expect("serialize");
        let keys: Vec<&str> = v
            .as_object()
            .expect("object")
            .keys()
            .map(String::as_str)
            .collect();
        for k in [
            "version",
            "nodes",
            "namespaces",
            "pods",
            "services",
            "world",
            "daemons",
        ] {
            assert!(keys.contains(&k), "missing {k}");
        }
        assert_eq!(v["nodes"][0]["uplink_ipv4"], "10.99.0.2");
        assert_eq!(v["nodes"][0]["pod_cidr_v6"], "fd00:10:244:1::/64");
        assert_eq!(v["world"]["ipv6"], "2001:db8:100::10");
    }

    #[test]
    fn save_load_round_trip_and_missing_state() {
        let dir = temp_dir("roundtrip");
        assert!(matches!(State::load(&dir), Err(LabError::NoState { .. })));
        let s = sample();
        s.save(&dir).expect("save");
        assert_eq!(State::load(&dir).expect("load"), s);
        fs::write(dir.join(STATE_FILE), "{not json").expect("write");
        assert!(matches!(
            State::load(&dir),
            Err(LabError::StateParse { .. })
        ));
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn concurrent_add_daemon_loses_nothing() {
        let dir = temp_dir("daemons");
        sample().save(&dir).expect("save");
        std::thread::scope(|s| {
            for t in 0..8u32 {
                let dir = &dir;
                s.spawn(move || {
                    for i in 0..10u32 {
                        add_daemon(
                            dir,
                            Daemon {
                                role: "test".into(),
                                node: Some(format!("node-{t}")),
                                pid: 1000 + t * 100 + i,
                            },
                        )
                        .expect("add_daemon");
                    }
                });
            }
        });
        let state = State::load(&dir).expect("load");
        assert_eq!(state.daemons.len(), 80);
        remove_daemon(&dir, 1000).expect("remove");
        assert_eq!(State::load(&dir).expect("load").daemons.len(), 79);
        let _ = fs::remove_dir_all(&dir);
    }
}
