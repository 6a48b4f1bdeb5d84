//! Starting the lab's long-lived processes (the agent, the control plane).

use std::{os::unix::process::CommandExt, process::Command};

use crate::LabError;

/// Starts `cmd` in its own session (so it outlives the caller and a terminal's signals);
/// returns its pid. `shown` names it in errors.
pub(crate) fn spawn_detached(mut cmd: Command, shown: String) -> Result<u32, LabError> {
    // SAFETY: setsid is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|error| LabError::Spawn {
        command: shown,
        hint: String::new(),
        error,
    })?;
    let pid = child.id();
    // Reap it when it ends so a long-lived caller (a test binary) keeps no zombie; the thread
    // simply dies with a short-lived caller (the CLI), and the daemon lives on.
    let _ = std::thread::Builder::new()
        .name("flows-lab-reaper".to_string())
        .spawn(move || {
            let _ = child.wait();
        });
    Ok(pid)
}

