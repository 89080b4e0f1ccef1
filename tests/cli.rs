//! The binary's edges: start-up and shutdown when the world is not ready.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Regression: SIGTERM while Postgres was still unreachable at start was
/// ignored (the connect loop never looked at the shutdown signal).
#[test]
fn sigterm_while_postgres_is_unreachable_exits_cleanly() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // Nothing listens on `port` once the listener above is dropped.
    let mut child = Command::new(env!("CARGO_BIN_EXE_energy-stream"))
        .args(["run", "--metrics-addr", "off", "--no-kpis"])
        .env(
            "DATABASE_URL",
            format!("postgres://energy@127.0.0.1:{port}/energy"),
        )
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        child.try_wait().unwrap().is_none(),
        "it retries, it does not give up"
    );
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "exit 0, got {status}");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "SIGTERM honoured within 10 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("cannot reach Postgres"), "{log}");
    assert!(
        log.contains("Connection refused"),
        "the cause is named: {log}"
    );
}
