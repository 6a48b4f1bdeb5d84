//! The one rule for turning manifest paths into files, shared by the CLI, the lab, the
//! node-probe's policy source and the relay's manifest index.
//!
//! - A path naming a file is taken as it is, whatever its name.
//! - A directory contributes its `*.yaml`, `*.yml` and `*.json` files and those of its
//!   subdirectories, in path order.
//! - Entries whose name starts with `.` are skipped. A ConfigMap mounted as a volume holds
//!   every file three times (`x.yaml`, `..data/x.yaml`, `..<timestamp>/x.yaml`); only the
//!   visible one is the manifest.
//! - Symbolic links are followed (the visible ConfigMap files are links), to a bounded
//!   depth, so a link back to a parent cannot loop.
//!
//! Each file comes with its length and modification time, so a watcher can tell that the
//! set changed (a file added, removed, rewritten or swapped) by comparing two listings.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// How deep directories are followed below a path given.
pub const MAX_DEPTH: usize = 8;

/// One manifest file, as it was when listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestFile {
    pub path: PathBuf,
    pub len: u64,
    pub modified: Option<SystemTime>,
}

#[derive(Debug, thiserror::Error)]
pub enum ListError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: directories nested deeper than {MAX_DEPTH} levels (a symbolic link loop?)", path.display())]
    TooDeep { path: PathBuf },
}

/// Whether a directory entry with this name is read as a manifest.
pub fn is_manifest_name(name: &str) -> bool {
    !name.starts_with('.')
        && Path::new(name)
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"))
}

/// The manifest files `paths` name, in order: each path's files sorted by path.
pub fn list(paths: &[PathBuf]) -> Result<Vec<ManifestFile>, ListError> {
    let mut out = Vec::new();
    for p in paths {
        let meta = std::fs::metadata(p).map_err(|source| io(p, source))?;
        if meta.is_dir() {
            walk(p, 0, &mut out)?;
        } else {
            out.push(file(p.clone(), &meta));
        }
    }
    Ok(out)
}

/// The texts of `files`, named by their paths, for `Manifests::parse` and its kin.
pub fn read(files: &[ManifestFile]) -> Result<Vec<(String, String)>, ListError> {
    files
        .iter()
        .map(|f| {
            let text = std::fs::read_to_string(&f.path).map_err(|source| io(&f.path, source))?;
            Ok((f.path.display().to_string(), text))
        })
        .collect()
}

fn walk(dir: &Path, depth: usize, out: &mut Vec<ManifestFile>) -> Result<(), ListError> {
    if depth >= MAX_DEPTH {
        return Err(ListError::TooDeep { path: dir.to_path_buf() });
    }
    let mut entries = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|source| io(dir, source))? {
        let e = e.map_err(|source| io(dir, source))?;
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if !name.starts_with('.') {
            entries.push((name.to_string(), e.path()));
        }
    }
    entries.sort();
    for (name, path) in entries {
        // metadata() follows links; a dangling link is skipped like a file being replaced.
        let Ok(meta) = std::fs::metadata(&path) else { continue };
        if meta.is_dir() {
            walk(&path, depth + 1, out)?;
        } else if meta.is_file() && is_manifest_name(&name) {
            out.push(file(path, &meta));
        }
    }
    Ok(())
}

fn file(path: PathBuf, meta: &std::fs::Metadata) -> ManifestFile {
    ManifestFile {
        path,
        len: meta.len(),
        modified: meta.modified().ok(),
    }
}

fn io(path: &Path, source: std::io::Error) -> ListError {
    ListError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("flows-manifest-files-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("tmp dir");
        d
    }

    fn names(files: &[ManifestFile], root: &Path) -> Vec<String> {
        files
            .iter()
            .map(|f| f.path.strip_prefix(root).unwrap_or(&f.path).display().to_string())
            .collect()
    }

    #[test]
    fn directories_give_their_manifests_sorted_and_recursively() {
        let d = tmp("sorted");
        for f in ["b.yaml", "a.yml", "c.json", "notes.txt", "README"] {
            std::fs::write(d.join(f), "x").expect("write");
        }
        std::fs::create_dir_all(d.join("policies")).expect("mkdir");
        std::fs::write(d.join("policies/p.yaml"), "x").expect("write");
        let got = list(&[d.clone()]).expect("list");
        assert_eq!(names(&got, &d), ["a.yml", "b.yaml", "c.json", "policies/p.yaml"]);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_configmap_volume_gives_each_file_once() {
        // The layout the kubelet writes for a ConfigMap volume.
        let d = tmp("configmap");
        let ts = d.join("..2026_12_03_20_00_00.123");
        std::fs::create_dir_all(&ts).expect("mkdir");
        std::fs::write(ts.join("policy.yaml"), "x").expect("write");
        std::os::unix::fs::symlink(ts.file_name().expect("name"), d.join("..data")).expect("link");
        std::os::unix::fs::symlink("..data/policy.yaml", d.join("policy.yaml")).expect("link");
        let got = list(&[d.clone()]).expect("list");
        assert_eq!(names(&got, &d), ["policy.yaml"]);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_link_loop_is_an_error_not_a_hang() {
        let d = tmp("loop");
        std::fs::create_dir_all(d.join("sub")).expect("mkdir");
        std::os::unix::fs::symlink("..", d.join("sub/up")).expect("link");
        let err = list(&[d.clone()]).expect_err("loop");
        assert!(matches!(err, ListError::TooDeep { .. }), "{err}");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_named_file_is_taken_whatever_its_name_and_a_missing_path_is_an_error() {
        let d = tmp("named");
        std::fs::write(d.join("cluster.txt"), "x").expect("write");
        let got = list(&[d.join("cluster.txt")]).expect("list");
        assert_eq!(got.len(), 1);
        assert!(matches!(list(&[d.join("absent")]), Err(ListError::Io { .. })));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_rewrite_changes_the_listing() {
        let d = tmp("rewrite");
        std::fs::write(d.join("a.yaml"), "x").expect("write");
        let before = list(&[d.clone()]).expect("list");
        std::fs::write(d.join("a.yaml"), "xy").expect("write");
        assert_ne!(before, list(&[d.clone()]).expect("list"));
        let _ = std::fs::remove_dir_all(&d);
    }
}
