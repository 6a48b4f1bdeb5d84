//! The datapath thread: it joins the node's network namespace (in the lab, each
//! simulated node is a namespace; on a real node it is the host's), because interface
//! names and TCX attachment resolve in the caller's namespace, and owns the `Ebpf`
//! object: attachments live exactly as long as it does, and TCX links are released by
//! the kernel if the process dies, unless they are pinned.

use std::{collections::HashMap, os::fd::AsFd, path::PathBuf, sync::mpsc, thread::JoinHandle};

use aya::{
    Ebpf,
    maps::HashMap as BpfHashMap,
    programs::{
        BtfTracePoint, SchedClassifier, TcAttachType,
        links::{FdLink, LinkOrder, PinnedLink},
        tc::{SchedClassifierLinkId, TcAttachOptions},
    },
};
use flows_common::{CtOffsets, KernelOffsets};

use crate::{
    btf::Btf,
    datapath::{
        error::{DatapathError, map_err, prog_err},
        load::{
            DatapathMaps, PROG_FROM_ENDPOINT, PROG_FROM_NETWORK, PROG_KFREE_SKB, PROG_TO_ENDPOINT,
            PROG_TO_NETWORK, classifier, load_object, take_maps,
        },
    },
};

pub struct DatapathConfig {
    /// Network namespace to attach in (a file such as /run/netns/NAME); None: our own.
    pub netns: Option<PathBuf>,
    /// Report kernel drops (kfree_skb).
    pub kernel_drops: bool,
    /// When several probes share one kernel (the lab), each reports only the drops that
    /// happen in these network namespaces (inode numbers). Empty: report all.
    pub drop_netns: Vec<u32>,
    /// The kernel's drop reason numbers for TC_INGRESS and TC_EGRESS.
    pub tc_drop_reasons: (u32, u32),
    /// Where the TC links are pinned (bpffs), so that enforcement outlives the probe:
    /// a probe that stops or dies leaves its programs deciding with the policy they
    /// had, and the next probe takes each interface over atomically (its program
    /// attached first, then the old link removed). None: links end with the process.
    pub pin_dir: Option<PathBuf>,
}

enum Cmd {
    Attach(String, mpsc::Sender<Result<(), DatapathError>>),
    AttachUplink(String, mpsc::Sender<Result<(), DatapathError>>),
    Detach(String),
    /// Removes pinned links of an earlier probe on interfaces not taken over.
    Prune(mpsc::Sender<Vec<String>>),
    /// At shutdown: keep pinned links in force (true) or remove them (false).
    KeepPinned(bool),
    /// The namespaces (inodes) whose kernel drops are reported, from now on.
    DropNetns(Vec<u32>, mpsc::Sender<Result<(), DatapathError>>),
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
        let ct = match crate::btf::conntrack_offsets(btf) {
            Ok(ct) => ct,
            Err(e) => {
                tracing::warn!(error = %e, "no conntrack types to read: traffic masqueraded on its way out is decided with the node's address, not the pod's");
                CtOffsets::default()
            }
        };
        let (init_tx, init_rx) = mpsc::channel();
        let (cmd_tx, cmd_rx) = mpsc::channel::<Cmd>();
        let thread = std::thread::Builder::new()
            .name("datapath".into())
            .spawn(move || {
                let mut state = match DatapathThread::init(&cfg, offsets, ct) {
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
                        Cmd::DropNetns(inodes, reply) => {
                            let _ = reply.send(state.set_drop_netns(&inodes));
                        }
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

    /// Reports kernel drops in these namespaces only (those of the filter the datapath
    /// started with: a filter that was off stays off).
    pub fn set_drop_netns(&self, inodes: Vec<u32>) -> Result<(), DatapathError> {
        let (tx, rx) = mpsc::channel();
        self.cmds
            .as_ref()
            .ok_or(DatapathError::Stopped)?
            .send(Cmd::DropNetns(inodes, tx))
            .map_err(|_| DatapathError::Stopped)?;
        rx.recv().map_err(|_| DatapathError::Stopped)?
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
        ct: CtOffsets,
    ) -> Result<(DatapathThread, DatapathMaps), DatapathError> {
        if let Some(path) = &cfg.netns {
            enter_netns(path)?;
        }
        let mut ebpf = load_object(offsets, ct, !cfg.drop_netns.is_empty(), cfg.tc_drop_reasons)?;

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
    fn set_drop_netns(&mut self, inodes: &[u32]) -> Result<(), DatapathError> {
        let map = self.ebpf.map_mut("DROP_NETNS").ok_or(DatapathError::MissingMap { name: "DROP_NETNS" })?;
        let mut netns: BpfHashMap<_, u32, u8> = BpfHashMap::try_from(map).map_err(map_err("DROP_NETNS"))?;
        let old: Vec<u32> = netns.keys().filter_map(Result::ok).filter(|k| !inodes.contains(k)).collect();
        for ino in inodes {
            netns.insert(ino, 1, 0).map_err(map_err("DROP_NETNS"))?;
        }
        for ino in &old {
            netns.remove(ino).map_err(map_err("DROP_NETNS"))?;
        }
        Ok(())
    }

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
