//! A real ClickHouse server on loopback, from the same `libchdb.so` as the embedded store:
//! its HTTP and native ports open for as long as this process lives. For tests and the
//! lab (a stand-in for a cluster's ClickHouse), not for production.
//!
//! `flows-clickhouse-server --path DIR --http-port P [--tcp-port Q] [--lib libchdb.so]`

use std::{
    ffi::{CString, c_char, c_int},
    path::PathBuf,
};

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(path), Some(http)) = (arg(&args, "--path"), arg(&args, "--http-port")) else {
        eprintln!("usage: flows-clickhouse-server --path DIR --http-port P [--tcp-port Q] [--lib libchdb.so]");
        std::process::exit(2);
    };
    let lib = arg(&args, "--lib")
        .map(PathBuf::from)
        .unwrap_or_else(flows_store::chdb::default_library);
    let tcp = arg(&args, "--tcp-port");
    if let Err(e) = std::fs::create_dir_all(&path) {
        eprintln!("creating {path}: {e}");
        std::process::exit(1);
    }
    // SAFETY: loading chDB runs ClickHouse's initialisers only.
    let lib = match unsafe { libloading::Library::new(&lib) } {
        Ok(l) => l,
        Err(e) => {
            eprintln!("loading {}: {e}", lib.display());
            std::process::exit(1);
        }
    };
    type Cmdline = unsafe extern "C" fn(c_int, *mut *mut c_char) -> *mut std::ffi::c_void;
    // SAFETY: the symbol has this signature in chdb.h.
    let cmdline: libloading::Symbol<Cmdline> = match unsafe { lib.get(b"chdb_query_cmdline\0") } {
        Ok(f) => f,
        Err(e) => {
            eprintln!("chdb_query_cmdline: {e}");
            std::process::exit(1);
        }
    };
    let mut listen = "SYSTEM START LISTEN HTTP; ".to_string();
    if tcp.is_some() {
        listen.push_str("SYSTEM START LISTEN TCP; ");
    }
    // The ports stay open while this query runs: about 100 years of one-second sleeps.
    let query = format!(
        "{listen}SELECT count() FROM (SELECT sleepEachRow(1) FROM numbers(3153600000) SETTINGS max_block_size = 1)"
    );
    let mut argv_s = vec![
        "clickhouse".to_string(),
        format!("--path={path}"),
        "--listen_host=127.0.0.1".to_string(),
        format!("--http_port={http}"),
        "--multiquery".to_string(),
        format!("--query={query}"),
    ];
    if let Some(t) = tcp {
        argv_s.insert(4, format!("--tcp_port={t}"));
    }
    let cs: Vec<CString> = argv_s.iter().filter_map(|a| CString::new(a.as_str()).ok()).collect();
    let mut argv: Vec<*mut c_char> = cs.iter().map(|c| c.as_ptr() as *mut c_char).collect();
    eprintln!("ClickHouse serving HTTP on 127.0.0.1:{http}, data in {path}");
    // SAFETY: argv holds NUL-terminated strings that outlive the call, which blocks.
    unsafe { cmdline(argv.len() as c_int, argv.as_mut_ptr()) };
    eprintln!("ClickHouse server query ended");
    std::process::exit(1);
}
