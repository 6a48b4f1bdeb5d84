//! The one error type of the lab. Every variant names what it was doing and on what, so a
//! message read alone (in CI output, in a test failure) says where to look. Underlying
//! errors are part of the message (fields named `error`), not a separate `source()`, so
//! nothing is printed twice by error reporters that walk the chain.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// Reading or writing a file.
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },

    /// Listing the manifest files of the paths given.
    #[error("{error}")]
    Files { error: flows_manifest_files::ListError },

    /// YAML that is not YAML (syntax), before any object could be read.
    #[error("{file}: {message}")]
    Yaml { file: PathBuf, message: String },

    /// A Kubernetes object (or a document of one) that is invalid. `object` is "Kind ns/name"
    /// as far as known, `field` the path inside the object.
    #[error("{file}: document {doc} ({object}): {field}: {message}")]
    Spec {
        file: PathBuf,
        doc: usize,
        object: String,
        field: String,
        message: String,
    },

    /// A traffic scenario that is invalid or names things the lab does not have. `at` is
    /// "connections[2] (name)" or "scenario"; `field` the path inside it.
    #[error("{file}: {at}: {field}: {message}")]
    Scenario {
        file: String,
        at: String,
        field: String,
        message: String,
    },

    /// The input is valid but cannot be laid out (too many pods for a node, ...).
    #[error("cannot lay out the lab: {message}")]
    Plan { message: String },

    /// Encoding the lab's manifests failed.
    #[error("writing the lab's manifests: {message}")]
    Manifests { message: String },

    /// The Kubernetes control plane (etcd, API server, controllers, scheduler) or the
    /// lab's writes to it. `log` is the daemon's log when one is to blame.
    #[error("control plane: {message}{}", log.as_ref().map(|l| format!(" (log: {})", l.display())).unwrap_or_default())]
    ControlPlane { message: String, log: Option<PathBuf> },

    #[error("a lab is already up ({detail}); run `flows lab down` first")]
    AlreadyUp { detail: String },

    #[error("no lab is up: no state file {path}")]
    NoState { path: PathBuf },

    #[error("state file {path} is unreadable: {error}")]
    StateParse {
        path: PathBuf,
        error: serde_json::Error,
    },

    #[error("the lab needs root (network namespaces, veths, nftables); run it as root")]
    NotRoot,

    /// A helper program (ip, nft) could not be started.
    #[error("could not run `{command}`: {error}{hint}")]
    Spawn {
        command: String,
        hint: String,
        error: std::io::Error,
    },

    /// A helper program ran and failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },

    /// A system call made inside a network namespace (setns, socket, sysctl).
    #[error("{op} in netns {netns}: {error}")]
    Netns {
        netns: String,
        op: String,
        error: std::io::Error,
    },

    /// The agent process did not come up.
    #[error("the lab agent failed: {message} (log: {log})")]
    Agent { message: String, log: PathBuf },

    /// Something named on the command line that the lab does not have.
    #[error("{what} {name:?} is not in the lab{hint}")]
    NotFound {
        what: &'static str,
        name: String,
        hint: String,
    },

    /// A system call outside any namespace (signals, locks, threads).
    #[error("{op}: {error}")]
    Sys { op: String, error: std::io::Error },
}

impl LabError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        LabError::Io {
            path: path.into(),
            error: source,
        }
    }

    pub(crate) fn sys(op: impl Into<String>, source: std::io::Error) -> Self {
        LabError::Sys {
            op: op.into(),
            error: source,
        }
    }

    pub(crate) fn netns(netns: &str, op: impl Into<String>, source: std::io::Error) -> Self {
        LabError::Netns {
            netns: netns.to_string(),
            op: op.into(),
            error: source,
        }
    }

    pub(crate) fn plan(message: impl Into<String>) -> Self {
        LabError::Plan {
            message: message.into(),
        }
    }
}
