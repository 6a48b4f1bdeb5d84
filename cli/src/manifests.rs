//! Manifest files as the commands take them (the shared rule of `flows_manifest_files`),
//! read into `flows_policy::Manifests`.

use std::path::PathBuf;

use anyhow::bail;
use flows_policy::Manifests;

/// The files `paths` name, by the rule every component shares (`flows_manifest_files`).
pub fn manifest_files(paths: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    Ok(flows_manifest_files::list(paths)?.into_iter().map(|f| f.path).collect())
}

pub fn read_manifests(paths: &[PathBuf]) -> anyhow::Result<Manifests> {
    let files = flows_manifest_files::list(paths)?;
    if files.is_empty() {
        bail!("no manifest files found in {paths:?}");
    }
    let texts = flows_manifest_files::read(&files)?;
    Ok(Manifests::parse(texts.iter().map(|(n, t)| (n.as_str(), t.as_str())))?)
}
