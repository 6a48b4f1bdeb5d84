//! Loading and attaching the eBPF datapath. The only module that speaks to aya.
//!
//! The programs are loaded and attached on a dedicated thread that has joined the
//! node's network namespace (in the lab, each simulated node is a namespace; on a real
//! node it is the host's), because interface names and TCX attachment resolve in the
//! caller's namespace. The thread owns the `Ebpf` object: attachments live exactly as
//! long as it does, and TCX links are released by the kernel if the process dies.

use std::{
    collections::HashMap,
    os::fd::AsFd,
    path::PathBuf,
    sync::mpsc,
    thread::JoinHandle,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{
        BtfTracePoint, SchedClassifier, TcAttachType,
        links::{FdLink, LinkOrder, PinnedLink},
        tc::{SchedClassifierLinkId, TcAttachOptions},
    },
};
use flows_common::{
    DIR_EGRESS, DIR_INGRESS, EP_EGRESS_ISOLATED, EP_INGRESS_ISOLATED, EndpointValue, KernelOffsets,
    MODE_AUDIT, MODE_ENFORCE, MODE_OFF, POLICY_KEY_FIXED_BITS, PolicyKey, counter,
};
use flows_policy::compile::{DatapathState, Direction, Mode};

use crate::btf::Btf;

/// The eBPF object built by aya-build from the `flows-ebpf` crate.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/flows-ebpf"));

pub const PROG_FROM_ENDPOINT: &str = "flows_from_ep";
pub const PROG_TO_ENDPOINT: &str = "flows_to_ep";
pub const PROG_KFREE_SKB: &str = "flows_kfree_skb";
pub const PROG_TO_NETWORK: &str = "flows_to_net";
pub const PROG_FROM_NETWORK: &str = "flows_from_net";
/// An empty classifier: the baseline of the cost benchmarks.
pub const PROG_BENCH_NOP: &str = "flows_bench_nop";

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("loading the eBPF object: {0}")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    #[error("pinning {path}: {detail}")]
    Pin { path: PathBuf, detail: String },
    #[error("map {name} is missing from the eBPF object")]
    MissingMap { name: &'static str },
    #[error("attaching to {ifname}: {source}")]
    Attach {
        ifname: String,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("entering network namespace {path}: {source}")]
    Netns {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel BTF: {0}")]
    Btf(#[from] crate::btf::BtfError),
    #[error("the datapath thread has stopped")]
    Stopped,
}

fn prog_err(name: &'static str) -> impl FnOnce(aya::programs::ProgramError) -> DatapathError {
    move |e| DatapathError::Program {
        name,
        source: Box::new(e),
    }
}

fn map_err(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> DatapathError {
    move |e| DatapathError::Map {
        name,
        source: Box::new(e),
    }
}

pub struct DatapathConfig {
    /// Network namespace to attach in (a file such as /run/netns/NAME); None: our own.
    pub netns: Option<PathBuf>,
    /// Report kernel drops (kfree_skb).
    pub kernel_drops: bool,
    /// When several probes share one kernel (the lab), each reports only the drops that
    /// happen in these network namespaces (inode numbers). Empty: report all.
    pub drop_netns: Vec<u32>,
    /// The node's interface towards other nodes and the world, where local pods' egress
    /// policy is enforced after kube-proxy's DNAT.
    pub uplink: Option<String>,
    /// The kernel's drop reason numbers for TC_INGRESS and TC_EGRESS.
    pub tc_drop_reasons: (u32, u32),
    /// Where the TC links are pinned (bpffs), so that enforcement outlives the probe:
    /// a probe that stops or dies leaves its programs deciding with the policy they
    /// had, and the next probe takes each interface over atomically (its program
    /// attached first, then the old link removed). None: links end with the process.
    pub pin_dir: Option<PathBuf>,
}

pub type EventsMap = RingBuf<MapData>;
pub type CountersMap = PerCpuArray<MapData, u64>;

/// Maps that user space reads or programs, handed out once the datapath is loaded.
pub struct DatapathMaps {
    pub events: EventsMap,
    pub counters: CountersMap,
    pub policy: PolicyMaps,
}

enum Cmd {
    Attach(String, mpsc::Sender<Result<(), DatapathError>>),
    AttachUplink(String, mpsc::Sender<Result<(), DatapathError>>),
    Detach(String),
    /// Removes pinned links of an earlier probe on interfaces not taken over.
    Prune(mpsc::Sender<Vec<String>>),
    /// At shutdown: keep pinned links in force (true) or remove them (false).
    KeepPinned(bool),
}

/// Handle to the datapath thread. Dropping it detaches everything.
pub struct Datapath {
    cmds: Option<mpsc::Sender<Cmd>>,
    thread: Option<JoinHandle<()>>,
    pub drop_reasons: HashMap<u32, String>,
}

impl Datapath {
    pub fn start(cfg: DatapathConfig) -> Result<(Datapath, DatapathMaps), DatapathError> {
        let btf = Btf::from_sys_fs()?;
        let offsets = btf.kernel_offsets()?;
        let drop_reasons = btf.drop_reasons()?;
        let find = |name: &str| {
            drop_reasons
                .iter()
                .find(|(_, n)| n.as_str() == name)
                .map(|(v, _)| *v)
                .unwrap_or(u32::MAX)
        };
        let mut cfg = cfg;
        cfg.tc_drop_reasons = (find("TC_INGRESS"), find("TC_EGRESS"));
        let (init_tx, init_rx) = mpsc::channel();
        let (cmd_tx, cmd_rx) = mpsc::channel::<Cmd>();
        let thread = std::thread::Builder::new()
            .name("datapath".into())
            .spawn(move || {
                let mut state = match DatapathThread::init(&cfg, offsets) {
                    Ok((state, maps)) => {
                        let _ = init_tx.send(Ok(maps));
                        state
                    }
                    Err(e) => {
                        let _ = init_tx.send(Err(e));
                        return;
                    }
                };
                // Runs until the handle is dropped (the channel closes).
                while let Ok(cmd) = cmd_rx.recv() {
                    match cmd {
                        Cmd::Attach(ifname, reply) => {
                            let _ = reply.send(state.attach(&ifname));
                        }
                        Cmd::AttachUplink(ifname, reply) => {
                            let _ = reply.send(state.attach_pair(&ifname, PROG_FROM_NETWORK, PROG_TO_NETWORK));
                        }
                        Cmd::Detach(ifname) => state.detach(&ifname),
                        Cmd::Prune(reply) => {
                            let _ = reply.send(state.prune());
                        }
                        Cmd::KeepPinned(keep) => state.keep_pinned = keep,
                    }
                }
                state.release();
                // Dropping `state` detaches every link and unloads the programs.
            })
            .map_err(|e| DatapathError::Netns {
                path: "(thread)".into(),
                source: e,
            })?;
        let maps = init_rx.recv().map_err(|_| DatapathError::Stopped)??;
        Ok((
            Datapath {
                cmds: Some(cmd_tx),
                thread: Some(thread),
                drop_reasons,
            },
            maps,
        ))
    }

    /// Attaches both TC programs to a pod interface (host side), in the datapath's netns.
    pub fn attach(&self, ifname: &str) -> Result<(), DatapathError> {
        let (tx, rx) = mpsc::channel();
        self.cmds
            .as_ref()
            .ok_or(DatapathError::Stopped)?
            .send(Cmd::Attach(ifname.to_string(), tx))
            .map_err(|_| DatapathError::Stopped)?;
        rx.recv().map_err(|_| DatapathError::Stopped)?
    }

    /// Attaches the uplink's programs (local pods' egress policy). Called once the
    /// policy is in the maps: attached earlier, an empty policy would let all through.
    pub fn attach_uplink(&self, ifname: &str) -> Result<(), DatapathError> {
        let (tx, rx) = mpsc::channel();
        self.cmds
            .as_ref()
            .ok_or(DatapathError::Stopped)?
            .send(Cmd::AttachUplink(ifname.to_string(), tx))
            .map_err(|_| DatapathError::Stopped)?;
        rx.recv().map_err(|_| DatapathError::Stopped)?
    }

    /// After the first attach of every current interface: removes what an earlier
    /// probe pinned on interfaces this one did not take over. Returns their names.
    pub fn prune_pins(&self) -> Vec<String> {
        let (tx, rx) = mpsc::channel();
        match self.cmds.as_ref().map(|c| c.send(Cmd::Prune(tx))) {
            Some(Ok(())) => rx.recv().unwrap_or_default(),
            _ => Vec::new(),
        }
    }

    /// What happens to pinned links when the datapath stops: kept in force (a probe
    /// restart: the next one takes over) or removed (the probe is going away).
    pub fn keep_pinned_on_exit(&self, keep: bool) {
        if let Some(c) = &self.cmds {
            let _ = c.send(Cmd::KeepPinned(keep));
        }
    }

    /// Forgets an interface (it disappeared; the kernel already released its links).
    pub fn detach(&self, ifname: &str) {
        if let Some(c) = &self.cmds {
            let _ = c.send(Cmd::Detach(ifname.to_string()));
        }
    }

    /// Detaches everything and waits for the datapath thread to finish.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.cmds.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Datapath {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One interface's pair of links: owned by the process, or pinned in bpffs.
enum Links {
    Owned([SchedClassifierLinkId; 2], &'static str, &'static str),
    /// The pins (which hold the links in the kernel) and our descriptors of them.
    Pinned([(PathBuf, FdLink); 2]),
}

struct DatapathThread {
    ebpf: Ebpf,
    links: HashMap<String, Links>,
    pin_dir: Option<PathBuf>,
    keep_pinned: bool,
}

/// The pin paths of an interface's two links: `ingress/NAME` and `egress/NAME`. bpffs
/// refuses names with a dot (reserved for its own files), which interface names may
/// have (VLANs: eth0.100): dots become colons, which interface names never contain.
fn pin_paths(dir: &std::path::Path, ifname: &str) -> [PathBuf; 2] {
    let name = ifname.replace('.', ":");
    [dir.join("ingress").join(&name), dir.join("egress").join(&name)]
}

/// The interface a pin file stands for.
fn pinned_ifname(file: &std::ffi::OsStr) -> String {
    file.to_string_lossy().replace(':', ".")
}

/// Removes a pinned link: the pin goes, and with no holder left the kernel detaches it.
fn remove_pin(path: &std::path::Path) {
    match PinnedLink::from_pin(path) {
        Ok(l) => {
            if let Err(e) = l.unpin() {
                tracing::warn!(path = %path.display(), error = %e, "removing a pinned link");
            }
        }
        // Not a link (or unreadable): the file itself still holds whatever it is.
        Err(_) => {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Detaches and removes every link pinned under `dir` (the probe is uninstalled), and
/// the directory. Returns how many links were removed.
pub fn remove_pinned(dir: &std::path::Path) -> Result<usize, DatapathError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => {
            return Err(DatapathError::Pin {
                path: dir.to_path_buf(),
                detail: e.to_string(),
            });
        }
    };
    let mut n = 0;
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            for f in std::fs::read_dir(&p).into_iter().flatten().flatten() {
                remove_pin(&f.path());
                n += 1;
            }
            let _ = std::fs::remove_dir(&p);
        } else {
            remove_pin(&p);
            n += 1;
        }
    }
    let _ = std::fs::remove_dir(dir);
    Ok(n)
}

impl DatapathThread {
    fn init(
        cfg: &DatapathConfig,
        offsets: KernelOffsets,
    ) -> Result<(DatapathThread, DatapathMaps), DatapathError> {
        if let Some(path) = &cfg.netns {
            enter_netns(path)?;
        }
        let mut ebpf = load_object(offsets, !cfg.drop_netns.is_empty(), cfg.tc_drop_reasons)?;

        for name in [PROG_FROM_ENDPOINT, PROG_TO_ENDPOINT, PROG_TO_NETWORK, PROG_FROM_NETWORK] {
            classifier(&mut ebpf, name)?.load().map_err(prog_err(name))?;
        }

        if !cfg.drop_netns.is_empty() {
            let map = ebpf
                .map_mut("DROP_NETNS")
                .ok_or(DatapathError::MissingMap { name: "DROP_NETNS" })?;
            let mut netns: BpfHashMap<_, u32, u8> =
                BpfHashMap::try_from(map).map_err(map_err("DROP_NETNS"))?;
            for ino in &cfg.drop_netns {
                netns.insert(ino, 1, 0).map_err(map_err("DROP_NETNS"))?;
            }
        }

        if cfg.kernel_drops {
            let btf = aya::Btf::from_sys_fs().map_err(|e| DatapathError::Program {
                name: PROG_KFREE_SKB,
                source: Box::new(aya::programs::ProgramError::Btf(e)),
            })?;
            let prog: &mut BtfTracePoint = ebpf
                .program_mut(PROG_KFREE_SKB)
                .ok_or(DatapathError::Program {
                    name: PROG_KFREE_SKB,
                    source: Box::new(aya::programs::ProgramError::UnexpectedProgramType),
                })?
                .try_into()
                .map_err(prog_err(PROG_KFREE_SKB))?;
            prog.load("kfree_skb", &btf).map_err(prog_err(PROG_KFREE_SKB))?;
            prog.attach().map_err(prog_err(PROG_KFREE_SKB))?;
        }

        let maps = take_maps(&mut ebpf)?;
        if let Some(dir) = &cfg.pin_dir {
            // Left in staging by a probe that died mid-hand-over: not in force anywhere
            // that counts (the renamed pins are), so released.
            for e in std::fs::read_dir(dir.join("staging")).into_iter().flatten().flatten() {
                remove_pin(&e.path());
            }
            for sub in ["ingress", "egress", "staging"] {
                std::fs::create_dir_all(dir.join(sub)).map_err(|e| DatapathError::Pin {
                    path: dir.join(sub),
                    detail: e.to_string(),
                })?;
            }
        }
        let thread = DatapathThread {
            ebpf,
            links: HashMap::new(),
            pin_dir: cfg.pin_dir.clone(),
            keep_pinned: cfg.pin_dir.is_some(),
        };
        Ok((thread, maps))
    }

    fn classifier(&mut self, name: &'static str) -> Result<&mut SchedClassifier, DatapathError> {
        classifier(&mut self.ebpf, name)
    }

    fn attach(&mut self, ifname: &str) -> Result<(), DatapathError> {
        self.attach_pair(ifname, PROG_FROM_ENDPOINT, PROG_TO_ENDPOINT)
    }

    /// Attaches `ingress_prog` to the interface's ingress and `egress_prog` to its egress.
    fn attach_pair(
        &mut self,
        ifname: &str,
        ingress_prog: &'static str,
        egress_prog: &'static str,
    ) -> Result<(), DatapathError> {
        if self.links.contains_key(ifname) {
            return Ok(());
        }
        let stale = remove_stale_filters(ifname);
        if stale > 0 {
            tracing::warn!(ifname, stale, "removed filters left by an earlier probe");
        }
        let attach_err = |e| DatapathError::Attach {
            ifname: ifname.to_string(),
            source: Box::new(e),
        };
        // Ahead of whatever an earlier probe left pinned here: our program decides
        // first (and passing ends the chain), so there is no moment without a program.
        let taking_over = self
            .pin_dir
            .as_ref()
            .is_some_and(|d| pin_paths(d, ifname).iter().any(|p| p.exists()));
        let order = || {
            TcAttachOptions::TcxOrder(if taking_over { LinkOrder::first() } else { LinkOrder::default() })
        };
        // Pod -> host is the host side's ingress; host -> pod its egress.
        let from = self
            .classifier(ingress_prog)?
            .attach_with_options(ifname, TcAttachType::Ingress, order())
            .map_err(attach_err)?;
        let to = match self
            .classifier(egress_prog)?
            .attach_with_options(ifname, TcAttachType::Egress, order())
        {
            Ok(l) => l,
            Err(e) => {
                let _ = self.classifier(ingress_prog)?.detach(from);
                return Err(attach_err(e));
            }
        };
        let Some(dir) = self.pin_dir.clone() else {
            self.links
                .insert(ifname.to_string(), Links::Owned([from, to], ingress_prog, egress_prog));
            return Ok(());
        };
        // Hand-over: the earlier probe's links (now behind ours) go, ours take their pins.
        let paths = pin_paths(&dir, ifname);
        let pin_err = |path: &PathBuf, e: &dyn std::error::Error| {
            let mut detail = e.to_string();
            let mut src = e.source();
            while let Some(s) = src {
                detail = format!("{detail}: {s}");
                src = s.source();
            }
            DatapathError::Pin { path: path.clone(), detail }
        };
        // Both links out of the program's keeping first: on any failure below, dropping
        // them detaches both, and the next scan tries the interface again from scratch.
        let ingress = self.classifier(ingress_prog)?.take_link(from).map_err(attach_err);
        let egress = self.classifier(egress_prog)?.take_link(to).map_err(attach_err);
        let (ingress, egress) = (ingress?, egress?);
        let ingress: FdLink = ingress.try_into().map_err(|e| pin_err(&paths[0], &e))?;
        let egress: FdLink = egress.try_into().map_err(|e| pin_err(&paths[1], &e))?;
        // Pinned aside first, then renamed over the earlier probe's pins: the rename
        // releases those links in the same step, and a failure before it leaves them
        // in force.
        let staged = [
            dir.join("staging").join(format!("ingress-{}", ifname.replace('.', ":"))),
            dir.join("staging").join(format!("egress-{}", ifname.replace('.', ":"))),
        ];
        let ingress = ingress.pin(&staged[0]).map_err(|e| pin_err(&staged[0], &e))?;
        let egress = match egress.pin(&staged[1]) {
            Ok(p) => p,
            Err(e) => {
                let _ = ingress.unpin();
                return Err(pin_err(&staged[1], &e));
            }
        };
        for (from, to) in staged.iter().zip(&paths) {
            if let Err(e) = std::fs::rename(from, to) {
                let _ = ingress.unpin();
                let _ = egress.unpin();
                let _ = std::fs::remove_file(&staged[0]);
                let _ = std::fs::remove_file(&staged[1]);
                return Err(pin_err(to, &e));
            }
        }
        let (ingress, egress): (FdLink, FdLink) = (ingress.into(), egress.into());
        let [pi, pe] = paths;
        self.links.insert(ifname.to_string(), Links::Pinned([(pi, ingress), (pe, egress)]));
        Ok(())
    }

    /// Pins under the pin directory that no interface of ours holds: an earlier probe's,
    /// on interfaces gone or no longer selected. Removed (their programs detach).
    fn prune(&mut self) -> Vec<String> {
        let Some(dir) = &self.pin_dir else { return Vec::new() };
        let mut removed = Vec::new();
        for sub in ["ingress", "egress"] {
            for e in std::fs::read_dir(dir.join(sub)).into_iter().flatten().flatten() {
                let ifname = pinned_ifname(&e.file_name());
                if !self.links.contains_key(&ifname) {
                    remove_pin(&e.path());
                    removed.push(format!("{ifname} ({sub})"));
                }
            }
        }
        removed
    }

    /// At the end: owned links go with the object; pinned ones stay in force unless
    /// the probe is going away for good.
    fn release(&mut self) {
        for (ifname, l) in self.links.drain() {
            if let Links::Pinned(pins) = l {
                if self.keep_pinned {
                    tracing::info!(ifname, "leaving the datapath in force for the next probe");
                } else {
                    for (path, _) in &pins {
                        let _ = std::fs::remove_file(path);
                    }
                }
                // Closing our descriptors: a link still pinned stays, an unpinned one goes.
                drop(pins);
            }
        }
        if !self.keep_pinned {
            if let Some(dir) = &self.pin_dir {
                let _ = remove_pinned(dir);
            }
        }
    }

    fn detach(&mut self, ifname: &str) {
        match self.links.remove(ifname) {
            Some(Links::Owned([from, to], ingress_prog, egress_prog)) => {
                // The interface is usually gone already, and its links with it; errors
                // here only mean there was nothing left to detach.
                if let Ok(p) = self.classifier(ingress_prog) {
                    let _ = p.detach(from);
                }
                if let Ok(p) = self.classifier(egress_prog) {
                    let _ = p.detach(to);
                }
            }
            Some(Links::Pinned(pins)) => {
                for (path, _) in &pins {
                    let _ = std::fs::remove_file(path);
                }
            }
            None => {}
        }
    }
}

/// Takes the maps user space reads out of the loaded object.
fn take_maps(ebpf: &mut Ebpf) -> Result<DatapathMaps, DatapathError> {
    let events = RingBuf::try_from(
        ebpf.take_map("EVENTS")
            .ok_or(DatapathError::MissingMap { name: "EVENTS" })?,
    )
    .map_err(map_err("EVENTS"))?;
    let counters = PerCpuArray::try_from(
        ebpf.take_map("COUNTERS")
            .ok_or(DatapathError::MissingMap { name: "COUNTERS" })?,
    )
    .map_err(map_err("COUNTERS"))?;
    let take = |ebpf: &mut Ebpf, name: &'static str| {
        ebpf.take_map(name).ok_or(DatapathError::MissingMap { name })
    };
    let policy = PolicyMaps {
        ipcache: LpmTrie::try_from(take(ebpf, "IPCACHE")?).map_err(map_err("IPCACHE"))?,
        endpoints: BpfHashMap::try_from(take(ebpf, "ENDPOINTS")?).map_err(map_err("ENDPOINTS"))?,
        policy: LpmTrie::try_from(take(ebpf, "POLICY")?).map_err(map_err("POLICY"))?,
        rev: Array::try_from(take(ebpf, "POLICY_REV")?).map_err(map_err("POLICY_REV"))?,
        current: DatapathState::default(),
        revision: 0,
    };
    Ok(DatapathMaps {
        events,
        counters,
        policy,
    })
}

/// Loads the object with the globals the kernel programs read.
fn load_object(
    offsets: KernelOffsets,
    drop_netns_filter: bool,
    tc_drop_reasons: (u32, u32),
) -> Result<Ebpf, DatapathError> {
    let filter = u32::from(drop_netns_filter);
    EbpfLoader::new()
        .override_global("OFFSETS", &offsets, true)
        .override_global("DROP_NETNS_FILTER", &filter, true)
        .override_global("DROP_REASON_TC_INGRESS", &tc_drop_reasons.0, true)
        .override_global("DROP_REASON_TC_EGRESS", &tc_drop_reasons.1, true)
        .load(EBPF_OBJECT)
        .map_err(|e| DatapathError::Load(Box::new(e)))
}

fn classifier<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, DatapathError> {
    ebpf.program_mut(name)
        .ok_or(DatapathError::Program {
            name,
            source: Box::new(aya::programs::ProgramError::UnexpectedProgramType),
        })?
        .try_into()
        .map_err(prog_err(name))
}

fn enter_netns(path: &PathBuf) -> Result<(), DatapathError> {
    let err = |source| DatapathError::Netns {
        path: path.clone(),
        source,
    };
    let f = std::fs::File::open(path).map_err(err)?;
    nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| err(std::io::Error::from(e)))?;
    Ok(())
}

/// Sums the per-CPU datapath counters.
pub fn read_counters(
    counters: &CountersMap,
) -> Result<[u64; counter::COUNT as usize], DatapathError> {
    let mut out = [0u64; counter::COUNT as usize];
    for (i, slot) in out.iter_mut().enumerate() {
        let values = counters.get(&(i as u32), 0).map_err(map_err("COUNTERS"))?;
        *slot = values.iter().sum();
    }
    Ok(out)
}

/// Names of programs attached through TCX to an interface in the current namespace.
/// Used to check that nothing of ours is left behind.
pub fn tcx_programs(ifname: &str) -> Result<Vec<String>, DatapathError> {
    let mut names = Vec::new();
    for at in [TcAttachType::Ingress, TcAttachType::Egress] {
        let (_, progs) = SchedClassifier::query_tcx(ifname, at).map_err(|e| DatapathError::Attach {
            ifname: ifname.to_string(),
            source: Box::new(e),
        })?;
        for p in progs {
            if let Some(n) = p.name_as_str() {
                names.push(n.to_string());
            } else {
                names.push(format!("id {}", p.id()));
            }
        }
    }
    Ok(names)
}

/// Removes legacy (clsact/netlink) attachments of our programs from an interface.
/// TCX links die with the process; netlink filters do not, so a probe of an older
/// attach mode killed with SIGKILL could have left some.
pub fn remove_stale_filters(ifname: &str) -> usize {
    let mut removed = 0;
    for at in [TcAttachType::Ingress, TcAttachType::Egress] {
        for name in [PROG_FROM_ENDPOINT, PROG_TO_ENDPOINT] {
            if aya::programs::tc::qdisc_detach_program(ifname, at, name).is_ok() {
                removed += 1;
            }
        }
    }
    removed
}

/// Per-packet cost of the TC programs, measured with BPF_PROG_TEST_RUN.
#[derive(Debug, Clone, Copy)]
pub struct PacketCost {
    /// Mean nanoseconds per run of the empty baseline program.
    pub nop_ns: f64,
    /// Mean nanoseconds per run of `flows_from_ep` on a new connection (a SYN with a
    /// fresh tuple: conntrack insert, drop-watch insert, ring buffer event).
    pub syn_ns: f64,
    /// Same for a packet of a tracked connection (conntrack hit, no event).
    pub established_ns: f64,
    /// Same for the empty program run the way `syn_ns` is (one packet per syscall).
    pub nop_single_ns: f64,
}

/// Measures [`PacketCost`]: `syn` runs one syscall per packet (each with a new source
/// port, so each is a new attempt); the others repeat one packet `repeat` times.
pub fn measure_packet_cost(
    syn: impl Fn(u16) -> Vec<u8>,
    established: &[u8],
    syns: u16,
    repeat: u32,
) -> Result<PacketCost, DatapathError> {
    let mut h = TestHarness::new()?;
    let mut syn_total = 0.0;
    let mut nop_single_total = 0.0;
    for i in 0..syns {
        let pkt = syn(10_000 + i);
        syn_total += h.run_program(PROG_FROM_ENDPOINT, &pkt, 1)?.1;
        nop_single_total += h.run_program(PROG_BENCH_NOP, &pkt, 1)?.1;
    }
    // Prime the conntrack entry, then measure hits.
    h.run_program(PROG_FROM_ENDPOINT, established, 1)?;
    let established_ns = h.run_program(PROG_FROM_ENDPOINT, established, repeat)?.1;
    let nop_ns = h.run_program(PROG_BENCH_NOP, established, repeat)?.1;
    Ok(PacketCost {
        nop_ns,
        syn_ns: syn_total / syns as f64,
        established_ns,
        nop_single_ns: nop_single_total / syns as f64,
    })
}

/// The TC programs loaded on their own, driven with BPF_PROG_TEST_RUN: crafted packets
/// in, the events and counters they produce out. For tests and benchmarks; attaches
/// nothing. Each harness has its own maps, so tests do not see each other's state.
pub struct TestHarness {
    ebpf: Ebpf,
    events: EventsMap,
    counters: CountersMap,
    policy: PolicyMaps,
}

impl TestHarness {
    pub fn new() -> Result<TestHarness, DatapathError> {
        let mut ebpf = load_object(Btf::from_sys_fs()?.kernel_offsets()?, false, (u32::MAX, u32::MAX))?;
        for name in [PROG_FROM_ENDPOINT, PROG_TO_ENDPOINT, PROG_TO_NETWORK, PROG_BENCH_NOP] {
            classifier(&mut ebpf, name)?.load().map_err(prog_err(name))?;
        }
        let DatapathMaps {
            events,
            counters,
            policy,
        } = take_maps(&mut ebpf)?;
        Ok(TestHarness {
            ebpf,
            events,
            counters,
            policy,
        })
    }

    /// Runs one packet through `flows_from_ep` (leaving the pod) or `flows_to_ep`
    /// (entering it); returns the program's verdict (TC_ACT_*).
    pub fn run(&mut self, from_endpoint: bool, packet: &[u8]) -> Result<u32, DatapathError> {
        let name = if from_endpoint {
            PROG_FROM_ENDPOINT
        } else {
            PROG_TO_ENDPOINT
        };
        Ok(self.run_program(name, packet, 1)?.0)
    }

    /// Programs the policy maps (as the probe does on a manifest change).
    pub fn apply_policy(&mut self, state: DatapathState) -> Result<PolicyUpdate, DatapathError> {
        self.policy.apply(state)
    }

    /// One packet through a program: (verdict, nanoseconds the kernel measured).
    /// `program` is one of the `PROG_*` classifier names.
    pub fn run_timed(&mut self, program: &'static str, packet: &[u8]) -> Result<(u32, f64), DatapathError> {
        self.run_program(program, packet, 1)
    }

    /// (verdict, mean ns per run) of `repeat` runs of a program on one packet.
    fn run_program(
        &mut self,
        name: &'static str,
        packet: &[u8],
        repeat: u32,
    ) -> Result<(u32, f64), DatapathError> {
        use aya::programs::{TestRun, TestRunOptions};
        let r = classifier(&mut self.ebpf, name)?
            .test_run(TestRunOptions {
                data_in: Some(packet),
                repeat,
                ..Default::default()
            })
            .map_err(prog_err(name))?;
        Ok((r.return_value, r.duration.as_nanos() as f64))
    }

    /// Events emitted since the last call.
    pub fn events(&mut self) -> Vec<flows_common::RawEvent> {
        let mut out = Vec::new();
        while let Some(item) = self.events.next() {
            if item.len() == flows_common::RAW_EVENT_SIZE {
                // SAFETY: length checked; RawEvent is plain data.
                out.push(unsafe {
                    std::ptr::read_unaligned(item.as_ptr() as *const flows_common::RawEvent)
                });
            }
        }
        out
    }

    pub fn counters(&self) -> Result<[u64; counter::COUNT as usize], DatapathError> {
        read_counters(&self.counters)
    }
}


/// The policy maps and what was last written to them.
pub struct PolicyMaps {
    ipcache: LpmTrie<MapData, [u8; 16], u32>,
    endpoints: BpfHashMap<MapData, [u8; 16], EndpointValue>,
    policy: LpmTrie<MapData, PolicyKey, u32>,
    rev: Array<MapData, u32>,
    current: DatapathState,
    revision: u32,
}

/// A new policy revision: connections decided before it are decided again.
fn bump(rev: &mut Array<MapData, u32>, revision: &mut u32) -> Result<(), DatapathError> {
    *revision = revision.wrapping_add(1);
    rev.set(0, *revision, 0).map_err(map_err("POLICY_REV"))
}

/// Counts of one update, for logs and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PolicyUpdate {
    pub written: usize,
    pub removed: usize,
    pub revision: u32,
}

fn ip_key(ip: std::net::IpAddr) -> [u8; 16] {
    match ip {
        std::net::IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        std::net::IpAddr::V6(a) => a.octets(),
    }
}

fn cidr_key(c: &flows_policy::cidr::Cidr) -> Key<[u8; 16]> {
    let extra = if c.addr.is_ipv4() { 96 } else { 0 };
    Key::new(c.len as u32 + extra, ip_key(c.addr))
}

fn policy_key(k: &flows_policy::compile::PolicyKey) -> Key<PolicyKey> {
    Key::new(
        POLICY_KEY_FIXED_BITS + k.port_bits as u32,
        PolicyKey {
            endpoint_be: k.endpoint.to_be(),
            identity_be: k.identity.to_be(),
            direction: match k.direction {
                Direction::Ingress => DIR_INGRESS,
                Direction::Egress => DIR_EGRESS,
            },
            proto: k.protocol,
            port_be: k.port.to_be(),
        },
    )
}

fn endpoint_value(e: &flows_policy::compile::EndpointEntry) -> EndpointValue {
    let mut flags = 0;
    if e.ingress_isolation.is_some() {
        flags |= EP_INGRESS_ISOLATED;
    }
    if e.egress_isolation.is_some() {
        flags |= EP_EGRESS_ISOLATED;
    }
    EndpointValue {
        endpoint: e.endpoint,
        mode: match e.mode {
            Mode::Off => MODE_OFF,
            Mode::Audit => MODE_AUDIT,
            Mode::Enforce => MODE_ENFORCE,
        },
        flags,
        _pad: [0; 2],
        ingress_isolation: e.ingress_isolation.unwrap_or(0),
        egress_isolation: e.egress_isolation.unwrap_or(0),
    }
}

impl PolicyMaps {
    /// Moves the maps to `next`, touching only what differs, in an order that never
    /// denies what both the old and the new state allow: new policy entries first, then
    /// the ipcache (identities may move to entries that now exist), then endpoints, then
    /// the revision (established connections are decided again), and only then removal
    /// of what is no longer needed.
    pub fn apply(&mut self, next: DatapathState) -> Result<PolicyUpdate, DatapathError> {
        let mut u = PolicyUpdate::default();
        // `current` is replaced only once the maps hold `next`: after a failed write the
        // next update still knows what is in the kernel and removes what is stale.
        let cur = &self.current;
        for (k, set) in &next.policy {
            if cur.policy.get(k) != Some(set) {
                self.policy
                    .insert(&policy_key(k), set, 0)
                    .map_err(map_err("POLICY"))?;
                u.written += 1;
            }
        }
        for (c, id) in &next.ipcache {
            if cur.ipcache.get(c) != Some(id) {
                self.ipcache
                    .insert(&cidr_key(c), id, 0)
                    .map_err(map_err("IPCACHE"))?;
                u.written += 1;
            }
        }
        for (ip, e) in &next.endpoints {
            if cur.endpoints.get(ip) != Some(e) {
                self.endpoints
                    .insert(ip_key(*ip), endpoint_value(e), 0)
                    .map_err(map_err("ENDPOINTS"))?;
                u.written += 1;
            }
        }
        if u.written > 0 {
            bump(&mut self.rev, &mut self.revision)?;
        }
        for ip in cur.endpoints.keys() {
            if !next.endpoints.contains_key(ip) {
                let _ = self.endpoints.remove(&ip_key(*ip));
                u.removed += 1;
            }
        }
        for k in cur.policy.keys() {
            if !next.policy.contains_key(k) {
                let _ = self.policy.remove(&policy_key(k));
                u.removed += 1;
            }
        }
        for c in cur.ipcache.keys() {
            if !next.ipcache.contains_key(c) {
                let _ = self.ipcache.remove(&cidr_key(c));
                u.removed += 1;
            }
        }
        // Connections decided while removals were under way saw a mix of old and new:
        // decide them again against the final state.
        if u.removed > 0 {
            bump(&mut self.rev, &mut self.revision)?;
        }
        u.revision = self.revision;
        self.current = next;
        Ok(u)
    }

    /// The policy sets of the state last applied (for naming policies in flows).
    pub fn current(&self) -> &DatapathState {
        &self.current
    }

    /// The revision last written to the datapath.
    pub fn revision(&self) -> u32 {
        self.revision
    }
}
