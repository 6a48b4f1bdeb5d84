//! ClickHouse's engine in this process: `libchdb.so` (chDB's C API), loaded at run time.
//!
//! One database per process. Each connection is driven from one thread, which owns it and
//! runs the statements sent over its lane's channel, so async callers never block a
//! runtime worker on a query. Writes and reads have separate connections (see [`Lane`]).

use std::{
    ffi::{CStr, CString, c_char, c_int},
    path::{Path, PathBuf},
    sync::mpsc,
};

use crate::StoreError;

/// `chdb_connection` is an opaque pointer; `chdb_connect` hands out a pointer to one.
type Conn = *mut std::ffi::c_void;
type Res = *mut std::ffi::c_void;

struct Api {
    _lib: libloading::Library,
    connect: unsafe extern "C" fn(c_int, *mut *mut c_char) -> *mut Conn,
    close: unsafe extern "C" fn(*mut Conn),
    query_n: unsafe extern "C" fn(Conn, *const c_char, usize, *const c_char, usize) -> Res,
    destroy: unsafe extern "C" fn(Res),
    buffer: unsafe extern "C" fn(Res) -> *mut c_char,
    length: unsafe extern "C" fn(Res) -> usize,
    error: unsafe extern "C" fn(Res) -> *const c_char,
}

/// The library stays loaded for the life of the process: ClickHouse registers
/// thread-local destructors that must still find its code when threads exit.
static API: std::sync::OnceLock<Api> = std::sync::OnceLock::new();
static LOADING: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl Api {
    fn get(path: &Path) -> Result<&'static Api, StoreError> {
        let _one = LOADING.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(a) = API.get() {
            return Ok(a);
        }
        let a = Api::load(path)?;
        Ok(API.get_or_init(|| a))
    }

    fn load(path: &Path) -> Result<Api, StoreError> {
        let err = |e: libloading::Error| StoreError::Engine {
            message: format!(
                "loading {}: {e} (scripts/setup.sh installs it; --chdb-lib or FLOWS_CHDB_LIB point elsewhere)",
                path.display()
            ),
        };
        // SAFETY: loading chDB runs its initialisers, which set up ClickHouse's globals
        // and nothing else; the symbols are typed as chdb.h declares them.
        unsafe {
            let lib = libloading::Library::new(path).map_err(err)?;
            let connect = *lib.get(b"chdb_connect\0").map_err(err)?;
            let close = *lib.get(b"chdb_close_conn\0").map_err(err)?;
            let query_n = *lib.get(b"chdb_query_n\0").map_err(err)?;
            let destroy = *lib.get(b"chdb_destroy_query_result\0").map_err(err)?;
            let buffer = *lib.get(b"chdb_result_buffer\0").map_err(err)?;
            let length = *lib.get(b"chdb_result_length\0").map_err(err)?;
            let error = *lib.get(b"chdb_result_error\0").map_err(err)?;
            Ok(Api {
                _lib: lib,
                connect,
                close,
                query_n,
                destroy,
                buffer,
                length,
                error,
            })
        }
    }
}

/// Where `libchdb.so` is: `FLOWS_CHDB_LIB`, else where the set-up script puts it.
pub fn default_library() -> PathBuf {
    std::env::var_os("FLOWS_CHDB_LIB")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/flows-tools/chdb/libchdb.so"))
}

struct Job {
    query: Vec<u8>,
    format: String,
    reply: tokio::sync::oneshot::Sender<Result<Vec<u8>, StoreError>>,
}

/// Which connections run a statement. The engine runs the statements of one connection
/// one after another, so a long read on the writer's connection would hold every insert
/// behind it (and the probes' rings would overrun meanwhile): reads have connections of
/// their own, which the engine runs beside the writer's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// Inserts and schema changes: one connection, in the order they were sent.
    Write,
    /// Reads: [`READERS`] connections, so one heavy read does not hold every other read.
    Read,
}

/// Connections serving reads. Two: a heavy audit leaves one for the pages of a stream and
/// for status, and the machine's cores are shared with ingest anyway.
pub const READERS: usize = 2;

struct Inner {
    write: Option<mpsc::SyncSender<Job>>,
    read: Option<mpsc::SyncSender<Job>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Each thread closes its connection when its queue closes; wait for that, so the
        // engine is shut down before anything else (process exit included) runs.
        self.write.take();
        self.read.take();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A handle on the engine's threads. Dropping the last handle closes the connections.
#[derive(Clone)]
pub struct Engine {
    inner: std::sync::Arc<Inner>,
}

/// The jobs of one lane, taken by whichever of its threads is free.
type Queue = std::sync::Arc<std::sync::Mutex<mpsc::Receiver<Job>>>;

impl Engine {
    /// Opens (creating if needed) the database directory `path` with the library at `lib`.
    pub fn open(lib: &Path, path: &Path) -> Result<Engine, StoreError> {
        std::fs::create_dir_all(path).map_err(|e| StoreError::Engine {
            message: format!("creating {}: {e}", path.display()),
        })?;
        let api = Api::get(lib)?;
        // Inserts carry their rows inside the query text: lift the 256 KiB query limit.
        let args = vec![
            "flows".to_string(),
            format!("--path={}", path.display()),
            "--max_query_size=4294967296".to_string(),
        ];
        let (write, write_rx) = mpsc::sync_channel::<Job>(64);
        let (read, read_rx) = mpsc::sync_channel::<Job>(64);
        let write_rx: Queue = std::sync::Arc::new(std::sync::Mutex::new(write_rx));
        let read_rx: Queue = std::sync::Arc::new(std::sync::Mutex::new(read_rx));
        // The first connection opens the database; the others join it. One at a time.
        let mut threads = Vec::with_capacity(1 + READERS);
        let lanes = std::iter::once(("chdb-write", write_rx)).chain((0..READERS).map(|_| ("chdb-read", read_rx.clone())));
        for (name, jobs) in lanes {
            match connection(api, args.clone(), name, jobs) {
                Ok(t) => threads.push(t),
                Err(e) => {
                    // Closing the queues ends the threads already started.
                    drop(Inner { write: Some(write), read: Some(read), threads });
                    return Err(e);
                }
            }
        }
        Ok(Engine {
            inner: std::sync::Arc::new(Inner {
                write: Some(write),
                read: Some(read),
                threads,
            }),
        })
    }

    /// Runs one statement on `lane`; returns its output in `format`.
    pub async fn query(&self, lane: Lane, query: Vec<u8>, format: &str) -> Result<Vec<u8>, StoreError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        let job = Job {
            query,
            format: format.to_string(),
            reply,
        };
        let jobs = match lane {
            Lane::Write => self.inner.write.clone(),
            Lane::Read => self.inner.read.clone(),
        }
        .ok_or_else(|| StoreError::Engine {
            message: "the engine is closed".into(),
        })?;
        // The channel is bounded: waiting for room is blocking work.
        tokio::task::spawn_blocking(move || jobs.send(job))
            .await
            .map_err(|e| StoreError::Engine { message: e.to_string() })?
            .map_err(|_| StoreError::Engine {
                message: "the engine thread has stopped".into(),
            })?;
        rx.await.map_err(|_| StoreError::Engine {
            message: "the engine thread dropped a query".into(),
        })?
    }
}

/// Starts a thread that opens one connection and runs the jobs it takes from `jobs` until
/// the queue closes; returns once the connection is open (or failed to open).
fn connection(api: &'static Api, args: Vec<String>, name: &str, jobs: Queue) -> Result<std::thread::JoinHandle<()>, StoreError> {
    let (ready_tx, ready_rx) = mpsc::channel::<Result<(), StoreError>>();
    let thread = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let cargs: Vec<CString> = args.iter().filter_map(|a| CString::new(a.as_str()).ok()).collect();
            let mut argv: Vec<*mut c_char> = cargs.iter().map(|a| a.as_ptr() as *mut c_char).collect();
            // SAFETY: argv points at NUL-terminated strings that outlive the call.
            let conn = unsafe { (api.connect)(argv.len() as c_int, argv.as_mut_ptr()) };
            // SAFETY: a non-null result points at a connection handle.
            if conn.is_null() || unsafe { (*conn).is_null() } {
                let _ = ready_tx.send(Err(StoreError::Engine {
                    message: "chdb_connect failed (is another process using the same directory?)".into(),
                }));
                return;
            }
            let _ = ready_tx.send(Ok(()));
            loop {
                // The lock is held only to take a job, never while running one.
                let job = match jobs.lock() {
                    Ok(rx) => rx.recv(),
                    Err(_) => break,
                };
                let Ok(job) = job else { break };
                // SAFETY: the connection is open; the buffers live through the call.
                let out = unsafe { run(api, *conn, &job.query, &job.format) };
                let _ = job.reply.send(out);
            }
            // SAFETY: closing the connection this thread opened, once.
            unsafe { (api.close)(conn) };
        })
        .map_err(|e| StoreError::Engine {
            message: format!("starting an engine thread: {e}"),
        })?;
    ready_rx.recv().map_err(|_| StoreError::Engine {
        message: "an engine thread ended while opening".into(),
    })??;
    Ok(thread)
}

/// SAFETY: `conn` must be an open connection of `api`.
unsafe fn run(api: &Api, conn: Conn, query: &[u8], format: &str) -> Result<Vec<u8>, StoreError> {
    // SAFETY: pointers and lengths describe live buffers; the result is destroyed once.
    unsafe {
        let res = (api.query_n)(
            conn,
            query.as_ptr() as *const c_char,
            query.len(),
            format.as_ptr() as *const c_char,
            format.len(),
        );
        if res.is_null() {
            return Err(StoreError::Engine {
                message: "chdb_query_n returned nothing".into(),
            });
        }
        let err = (api.error)(res);
        let out = if !err.is_null() {
            let message = CStr::from_ptr(err).to_string_lossy().into_owned();
            Err(StoreError::Query {
                message,
                query: preview(query),
            })
        } else {
            let buf = (api.buffer)(res);
            let len = (api.length)(res);
            Ok(if buf.is_null() || len == 0 {
                Vec::new()
            } else {
                std::slice::from_raw_parts(buf as *const u8, len).to_vec()
            })
        };
        (api.destroy)(res);
        out
    }
}

/// The start of a statement, for error messages (inserts carry binary data after it).
pub(crate) fn preview(query: &[u8]) -> String {
    let text = String::from_utf8_lossy(&query[..query.len().min(200)]);
    text.chars().take_while(|c| !c.is_control() || *c == '\n' || *c == ' ').collect()
}
