//! What can go wrong loading, attaching and programming the datapath.

use std::path::PathBuf;

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

pub(crate) fn prog_err(name: &'static str) -> impl FnOnce(aya::programs::ProgramError) -> DatapathError {
    move |e| DatapathError::Program {
        name,
        source: Box::new(e),
    }
}

pub(crate) fn map_err(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> DatapathError {
    move |e| DatapathError::Map {
        name,
        source: Box::new(e),
    }
}
