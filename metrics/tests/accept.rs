//! The metrics server outlives accept errors: with the process out of file descriptors,
//! accepting fails; once descriptors are free again, `/healthz` answers. (Its own test
//! binary: it lowers the process's descriptor limit.)

use std::{
    io::{Read, Write},
    net::TcpStream,
    sync::Arc,
    time::{Duration, Instant},
};

use flows_metrics::{Metrics, serve_on};

fn healthz(addr: std::net::SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_survives_running_out_of_descriptors() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let metrics = Arc::new(Metrics::new());
    let server = tokio::spawn(serve_on(listener, metrics.clone()));
    let ok = tokio::task::spawn_blocking(move || healthz(addr)).await.expect("join").expect("healthz");
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");

    // A descriptor limit just above what is open, so that running out is quick.
    let mut old = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain syscalls on a valid struct.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut old) };
    let low = libc::rlimit { rlim_cur: (open_fds() + 8) as libc::rlim_t, rlim_max: old.rlim_max };
    // SAFETY: as above.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &low) }, 0, "lowering the limit");
    let m = metrics.clone();
    let hog = tokio::task::spawn_blocking(move || {
        // Every descriptor taken, then one given back for a client: its connection
        // waits in the listen queue, and the server has none left to accept it with.
        let mut files = Vec::new();
        while let Ok(f) = std::fs::File::open("/dev/null") {
            files.push(f);
        }
        files.pop();
        let client = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connect");
        let deadline = Instant::now() + Duration::from_secs(10);
        while m.accept_errors() == 0 {
            assert!(Instant::now() < deadline, "the server never failed to accept");
            std::thread::sleep(Duration::from_millis(20));
        }
        drop((files, client));
    });
    hog.await.expect("hog");
    // SAFETY: restoring the limit read above.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &old) };
    assert!(!server.is_finished(), "the server ended on an accept error");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::task::spawn_blocking(move || healthz(addr)).await.expect("join") {
            Ok(r) if r.starts_with("HTTP/1.1 200") => break,
            other => assert!(Instant::now() < deadline, "/healthz after the descriptors came back: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.abort();
}
