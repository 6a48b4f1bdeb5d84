//! Batches the store refuses, kept on disk instead of retried forever.
//!
//! Each is one file of ClickHouse RowBinary in the columns of `flows`, so an operator
//! can look at it and, once the cause is fixed, load it as it is:
//! `clickhouse-client -q 'INSERT INTO flows.flows FORMAT RowBinary' < FILE`. The
//! directory has a byte bound; a batch that does not fit is counted lost instead.

use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
};

use flows_store::FlowRow;

#[derive(Debug, thiserror::Error)]
pub enum AsideError {
    #[error("{dir} is full ({used} of {max} bytes): the batch is counted lost")]
    Full { dir: PathBuf, used: u64, max: u64 },
    #[error("writing {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

pub struct SetAside {
    dir: PathBuf,
    max_bytes: u64,
    used: AtomicU64,
}

impl SetAside {
    /// Counts what the directory already holds against the bound (it is made when the
    /// first batch is set aside).
    pub fn open(dir: &Path, max_bytes: u64) -> Result<SetAside, AsideError> {
        let io = |source| AsideError::Io { path: dir.to_path_buf(), source };
        let mut used = 0;
        match std::fs::read_dir(dir) {
            Ok(entries) => {
                for e in entries.flatten() {
                    used += e.metadata().map(|m| m.len()).unwrap_or(0);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        Ok(SetAside { dir: dir.to_path_buf(), max_bytes, used: AtomicU64::new(used) })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes the batch to a new file (written whole, then renamed: a reader never sees
    /// half a batch) and returns its path.
    pub fn keep(&self, rows: &[FlowRow]) -> Result<PathBuf, AsideError> {
        let mut data = Vec::with_capacity(rows.len() * 512);
        for r in rows {
            r.encode(&mut data);
        }
        let used = self.used.load(Ordering::Relaxed);
        if used + data.len() as u64 > self.max_bytes {
            return Err(AsideError::Full { dir: self.dir.clone(), used, max: self.max_bytes });
        }
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let name = format!("flows-{stamp}-{}.rowbinary", rows.len());
        let path = self.dir.join(&name);
        let partial = self.dir.join(format!(".{name}.partial"));
        let io = |source| AsideError::Io { path: path.clone(), source };
        std::fs::create_dir_all(&self.dir).map_err(io)?;
        std::fs::write(&partial, &data).map_err(io)?;
        std::fs::rename(&partial, &path).map_err(io)?;
        self.used.fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(path)
    }
}
