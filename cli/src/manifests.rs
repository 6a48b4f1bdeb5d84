//! Manifest files as the commands take them: files, and the YAML/JSON files of
//! directories (sorted), read into `flows_policy::Manifests`.

use std::path::PathBuf;

use anyhow::{Context, bail};
use flows_policy::Manifests;

/// The files `paths` name: each file, and the .yaml/.yml/.json files of each directory.
pub fn manifest_files(paths: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("reading directory {}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| {
                    f.extension()
                        .is_some_and(|x| x == "yaml" || x == "yml" || x == "json")
                })
                .collect();
            found.sort();
            out.extend(found);
        } else {
            out.push(p.clone());
        }
    }
    Ok(out)
}

pub fn read_manifests(paths: &[PathBuf]) -> anyhow::Result<Manifests> {
    let files = manifest_files(paths)?;
    if files.is_empty() {
        bail!("no manifest files found in {paths:?}");
    }
    let mut texts = Vec::new();
    for f in &files {
        let t = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        texts.push((f.display().to_string(), t));
    }
    Ok(Manifests::parse(texts.iter().map(|(n, t)| (n.as_str(), t.as_str())))?)
}
