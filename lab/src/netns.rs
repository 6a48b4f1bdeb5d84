//! Working inside network namespaces from this process: a thread setns()s into a netns and
//! whatever it then opens (sockets, /proc/sys/net files) belongs to that netns for good.
//! Only dedicated threads ever switch; the caller's thread stays where it was.

use std::collections::HashMap;
use std::fs::File;
use std::path::PathBuf;

use nix::sched::{CloneFlags, setns};

use crate::error::LabError;

/// Where `ip netns` keeps its names.
pub const NETNS_DIR: &str = "/run/netns";

pub fn netns_path(name: &str) -> PathBuf {
    PathBuf::from(NETNS_DIR).join(name)
}

pub fn netns_exists(name: &str) -> bool {
    netns_path(name).exists()
}

/// Names in /run/netns that start with `prefix`, sorted.
pub fn list_netns(prefix: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(NETNS_DIR)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix))
        .collect();
    names.sort();
    names
}

/// Moves the calling thread into netns `name`. Only for threads that are dedicated to it.
pub fn enter(name: &str) -> Result<(), LabError> {
    let path = netns_path(name);
    let file = File::open(&path).map_err(|e| LabError::netns(name, "open", e))?;
    setns(&file, CloneFlags::CLONE_NEWNET).map_err(|e| LabError::netns(name, "setns", e.into()))
}

/// Runs `f` on a fresh thread inside netns `name` and returns its result.
pub fn in_netns<T, F>(name: &str, f: F) -> Result<T, LabError>
where
    T: Send,
    F: FnOnce() -> Result<T, LabError> + Send,
{
    std::thread::scope(|s| {
        let handle = std::thread::Builder::new()
            .name(format!("netns-{name}"))
            .spawn_scoped(s, || {
                enter(name)?;
                f()
            })
            .map_err(|e| LabError::sys("spawn a netns thread", e))?;
        handle.join().map_err(|_| {
            LabError::sys(
                format!("thread in netns {name}"),
                std::io::Error::other("panicked"),
            )
        })?
    })
}

/// Writes sysctls (`net.ipv4.ip_forward` style keys) inside netns `name`: /proc/sys/net
/// shows the netns of the thread that opens it.
pub fn sysctls(name: &str, settings: &[(&str, &str)]) -> Result<(), LabError> {
    in_netns(name, || {
        for (key, value) in settings {
            write_sysctl(key, value)
                .map_err(|e| LabError::netns(name, format!("sysctl {key}={value}"), e))?;
        }
        Ok(())
    })
}

/// Writes one sysctl in the calling thread's netns.
pub fn write_sysctl(key: &str, value: &str) -> std::io::Result<()> {
    let path = PathBuf::from("/proc/sys").join(key.replace('.', "/"));
    std::fs::write(path, value)
}

/// A per-thread cache of netns files, so a worker that switches often opens each only once.
#[derive(Default)]
pub struct Switcher {
    files: HashMap<String, File>,
    current: Option<String>,
}

impl Switcher {
    /// Moves the calling thread into `name` unless it is already there.
    pub fn enter(&mut self, name: &str) -> Result<(), LabError> {
        if self.current.as_deref() == Some(name) {
            return Ok(());
        }
        if !self.files.contains_key(name) {
            let file =
                File::open(netns_path(name)).map_err(|e| LabError::netns(name, "open", e))?;
            self.files.insert(name.to_string(), file);
        }
        let file = self
            .files
            .get(name)
            .ok_or_else(|| LabError::netns(name, "open", std::io::Error::other("not cached")))?;
        setns(file, CloneFlags::CLONE_NEWNET)
            .map_err(|e| LabError::netns(name, "setns", e.into()))?;
        self.current = Some(name.to_string());
        Ok(())
    }
}
