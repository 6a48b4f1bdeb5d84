//! Labs for tests. The lab's netns and link names are global, so only one lab can be up on a
//! machine: `LabGuard` takes `/run/flows-lab.lock` (flock) for the lab's whole lifetime, which
//! serializes lab tests across test binaries and crates, and downs the lab on drop, also when
//! the test fails.
//!
//! ```no_run
//! use flows_lab::testing::{LabGuard, skip_unless_root};
//! if skip_unless_root("my_test") { return; }
//! let lab = LabGuard::from_yaml("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: c}]}\n", 2)
//!     .expect("lab up");
//! let pod = lab.state.pod("default", "p").expect("pod");
//! # let _ = pod;
//! ```

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::error::LabError;
use crate::state::State;
use crate::cni::CniMode;
use crate::{DownReport, UpOptions};

/// Held for the lifetime of a test's lab.
pub const LAB_LOCK: &str = "/run/flows-lab.lock";

pub use crate::is_root;

/// Set by `scripts/test.sh`: a test that needs root fails instead of skipping, so a run
/// that lost its privileges cannot pass by testing nothing.
pub const REQUIRE_ROOT_ENV: &str = "FLOWS_REQUIRE_ROOT";

/// True (after printing why) when the test cannot run because it is not root. Panics
/// instead when `FLOWS_REQUIRE_ROOT=1`.
pub fn skip_unless_root(test: &str) -> bool {
    if is_root() {
        return false;
    }
    let why = format!("{test}: needs root (network namespaces, veths, nftables, BPF)");
    if std::env::var(REQUIRE_ROOT_ENV).is_ok_and(|v| v == "1") {
        panic!("{why}, and {REQUIRE_ROOT_ENV}=1 says it must run");
    }
    eprintln!("skipping {why}");
    true
}

/// A lab that is up while this value lives.
pub struct LabGuard {
    pub state: State,
    /// The lab's state dir (a fresh temp dir unless given).
    pub dir: PathBuf,
    own_dir: bool,
    done: bool,
    _lock: File,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A fresh directory under the system temp dir.
pub fn temp_dir(prefix: &str) -> Result<PathBuf, LabError> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!(
        "{prefix}-{}-{}-{nanos:x}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).map_err(|e| LabError::io(&dir, e))?;
    Ok(dir)
}

/// The machine-wide lab lock (`/run/flows-lab.lock`), held until dropped. `LabGuard` takes
/// it itself; take it directly to run `up`/`down` by hand in a test without racing others.
pub struct LabLock {
    _file: File,
}

/// Takes the lock, then removes a lab left over by a crashed run (see `LabGuard`).
pub fn lab_lock() -> Result<LabLock, LabError> {
    let file = take_lab_lock()?;
    clear_leftovers(&[crate::state::default_dir()])?;
    Ok(LabLock { _file: file })
}

fn take_lab_lock() -> Result<File, LabError> {
    let path = Path::new(LAB_LOCK);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| LabError::io(path, e))?;
    // SAFETY: flock on a valid fd.
    let free = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
    if !free {
        eprintln!("waiting for {LAB_LOCK}: another test's lab is up");
        crate::state::flock(&file, path)?;
    }
    Ok(file)
}

/// Holding the lab lock, a lab that is still present is either a crashed test's leftover (no
/// agent alive: removed) or one somebody started by hand with `flows lab up` (its agent is
/// alive: left alone, and the test fails saying so).
fn clear_leftovers(dirs: &[PathBuf]) -> Result<(), LabError> {
    let _build = crate::take_build_lock()?;
    let present = crate::netns::list_netns(crate::net::NETNS_PREFIX);
    let Some(first) = present.first() else {
        return Ok(());
    };
    if crate::agent::any_agent_alive() {
        return Err(LabError::AlreadyUp {
            detail: format!(
                "netns {first} exists and its agent is running: a lab started outside the tests \
                 (flows lab up?) is in use; tests will not remove it"
            ),
        });
    }
    eprintln!(
        "removing a lab left over by an earlier run ({} netns)",
        present.len()
    );
    // Its state dir is unknown: the default one and ours are where its daemons may be recorded.
    for dir in dirs {
        crate::down_unlocked(dir)?;
    }
    Ok(())
}

impl LabGuard {
    /// Takes the lab lock, removes any lab left over (a crashed test's), and brings up a lab
    /// with these options. `state_dir` is used as given and kept afterwards.
    pub fn with_options(opts: UpOptions) -> Result<LabGuard, LabError> {
        Self::start(opts, false)
    }

    /// A lab from YAML files or directories, with its state in a fresh temp dir.
    pub fn up(paths: &[PathBuf], nodes: usize) -> Result<LabGuard, LabError> {
        Self::up_wired(paths, nodes, CniMode::Bridge)
    }

    /// As [`LabGuard::up`], its pods wired as `cni` does.
    pub fn up_wired(paths: &[PathBuf], nodes: usize, cni: CniMode) -> Result<LabGuard, LabError> {
        let dir = temp_dir("flows-lab-test")?;
        let mut opts = UpOptions::new(paths.to_vec(), &dir);
        opts.nodes = nodes;
        opts.cni = cni;
        Self::start(opts, true)
    }

    /// A lab from a YAML text (written to `input.yaml` in the fresh temp state dir).
    pub fn from_yaml(yaml: &str, nodes: usize) -> Result<LabGuard, LabError> {
        Self::from_yaml_wired(yaml, nodes, CniMode::Bridge)
    }

    /// As [`LabGuard::from_yaml`], its pods wired as `cni` does.
    pub fn from_yaml_wired(yaml: &str, nodes: usize, cni: CniMode) -> Result<LabGuard, LabError> {
        let dir = temp_dir("flows-lab-test")?;
        let file = dir.join("input.yaml");
        let write = || -> std::io::Result<()> {
            let mut f = File::create(&file)?;
            f.write_all(yaml.as_bytes())
        };
        if let Err(e) = write() {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(LabError::io(&file, e));
        }
        let mut opts = UpOptions::new(vec![file], &dir);
        opts.nodes = nodes;
        opts.cni = cni;
        Self::start(opts, true)
    }

    fn start(opts: UpOptions, own_dir: bool) -> Result<LabGuard, LabError> {
        let lock = take_lab_lock()?;
        clear_leftovers(&[crate::state::default_dir(), opts.state_dir.clone()])?;
        match crate::up(&opts) {
            Ok(state) => Ok(LabGuard {
                state,
                dir: opts.state_dir,
                own_dir,
                done: false,
                _lock: lock,
            }),
            // The state dir stays: its agent.log may say what went wrong.
            Err(e) => Err(e),
        }
    }

    /// The state as it is now (other crates may have added daemons).
    pub fn reload(&mut self) -> Result<&State, LabError> {
        self.state = State::load(&self.dir)?;
        Ok(&self.state)
    }

    /// Downs the lab now and reports errors (dropping the guard does the same, quietly).
    pub fn down(mut self) -> Result<DownReport, LabError> {
        self.done = true;
        let report = crate::down(&self.dir);
        if self.own_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
        report
    }
}

impl Drop for LabGuard {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if let Err(e) = crate::down(&self.dir) {
            eprintln!("flows-lab: taking the test lab down failed: {e}");
        }
        if self.own_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A Kubernetes control plane for a test, without a lab around it (loopback only, no
/// root needed): stopped, and its directory removed, when dropped.
pub struct ControlPlane {
    pub api: crate::state::ApiRec,
    pub bin: PathBuf,
    /// Running programs: (program, pid), in start order.
    pids: Vec<(String, u32)>,
    dir: PathBuf,
}

impl ControlPlane {
    /// Starts etcd, the API server, the controller manager and the scheduler from
    /// [`crate::control_plane::bin_dir`], and applies flows' access objects (the chart's
    /// ServiceAccounts and roles).
    pub fn start(prefix: &str) -> Result<ControlPlane, LabError> {
        let dir = temp_dir(prefix)?;
        let bin = crate::control_plane::bin_dir();
        // Made first, so that whatever starts is stopped when it drops, even on a panic.
        let mut cp = ControlPlane {
            api: crate::state::ApiRec { url: String::new(), kubeconfig: PathBuf::new(), dir: dir.clone() },
            bin: bin.clone(),
            pids: Vec::new(),
            dir: dir.clone(),
        };
        cp.api = crate::control_plane::start(&dir, &bin, |program, pid| {
            cp.pids.push((program.to_string(), pid));
            Ok(())
        })?;
        crate::cluster_api::grant_components(&cp.api)?;
        Ok(cp)
    }

    /// A kubeconfig with a fresh token of flows' component `c` (its own identity and
    /// role, as in a cluster).
    pub fn kubeconfig_of(&self, c: crate::components::Component) -> Result<PathBuf, LabError> {
        crate::cluster_api::issue_component_token(&self.api, c)?;
        Ok(crate::components::kubeconfig(&self.api, c))
    }

    /// Stops the API server (SIGTERM) and returns once it is gone.
    pub fn stop_apiserver(&mut self) {
        let pids: Vec<u32> = self.pids.iter().filter(|(p, _)| p == "kube-apiserver").map(|(_, pid)| *pid).collect();
        crate::stop_processes(&pids);
        self.pids.retain(|(p, _)| p != "kube-apiserver");
    }

    /// Starts the API server again as it ran, and returns once it is ready.
    pub fn start_apiserver(&mut self) -> Result<(), LabError> {
        let pid = crate::control_plane::respawn(&self.api, &self.bin, "kube-apiserver")?;
        self.pids.push(("kube-apiserver".into(), pid));
        Ok(())
    }

    /// Restarts the API server with `flags` added to its arguments (limits, faults).
    pub fn restart_apiserver_with(&mut self, flags: &[&str]) -> Result<(), LabError> {
        self.stop_apiserver();
        let path = self.api.dir.join("kube-apiserver.args");
        let mut args = std::fs::read_to_string(&path).map_err(|e| LabError::io(&path, e))?;
        for f in flags {
            args.push('\n');
            args.push_str(f);
        }
        std::fs::write(&path, args).map_err(|e| LabError::io(&path, e))?;
        self.start_apiserver()
    }

    /// The API server's audit log: one JSON object per request of anyone but the
    /// control plane itself.
    pub fn audit(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.api.dir.join(crate::control_plane::AUDIT_LOG))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        // etcd last: an API server whose etcd is gone ignores SIGTERM.
        let (etcd, rest): (Vec<_>, Vec<_>) = self.pids.iter().partition(|(p, _)| p == "lab-etcd");
        crate::stop_processes(&rest.iter().map(|(_, pid)| *pid).collect::<Vec<_>>());
        crate::stop_processes(&etcd.iter().map(|(_, pid)| *pid).collect::<Vec<_>>());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One test per wiring mode of the lab, each running `$run(mode)`: `per_cni!(name)` makes
/// `name::bridge`, `name::flannel_vxlan`, `name::kindnet`, `name::calico` and
/// `name::calico_vxlan`.
#[macro_export]
macro_rules! per_cni {
    ($run:ident) => {
        mod $run {
            use $crate::cni::CniMode;
            #[test]
            fn bridge() {
                super::$run(CniMode::Bridge)
            }
            #[test]
            fn flannel_vxlan() {
                super::$run(CniMode::FlannelVxlan)
            }
            #[test]
            fn kindnet() {
                super::$run(CniMode::Kindnet)
            }
            #[test]
            fn calico() {
                super::$run(CniMode::Calico)
            }
            #[test]
            fn calico_vxlan() {
                super::$run(CniMode::CalicoVxlan)
            }
        }
    };
}
