//! CI's own scripts, against stand-ins for the tools they probe.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A fresh directory holding a `tansu` that prints `stderr` and exits 1, as
/// the real one does when its storage engine cannot start.
fn fake_tansu(name: &str, stderr: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("es-fake-tansu-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let exe = dir.join("tansu");
    std::fs::write(&exe, format!("#!/bin/sh\necho '{stderr}' >&2\nexit 1\n")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// Runs `.ci/tansu-has-sqlite` with `path` as PATH; true when it says yes.
fn probe_says_sqlite(path: &str) -> bool {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join(".ci/tansu-has-sqlite");
    let status = Command::new("/bin/bash")
        .arg(script)
        .env("PATH", path)
        .status()
        .unwrap();
    assert!(
        matches!(status.code(), Some(0 | 1)),
        "the probe itself failed: {status}"
    );
    status.success()
}

fn with_system_path(dir: &Path) -> String {
    format!("{}:/usr/bin:/bin", dir.display())
}

/// Regression: the probe piped tansu into `grep -q` under pipefail, so its
/// answer was tansu's own exit status (1) and a tansu built without libsql
/// passed; CI then skipped the reinstall and the broker-outage test failed.
#[test]
fn a_tansu_without_libsql_is_reinstalled() {
    let dir = fake_tansu(
        "no-libsql",
        r#"Error: Server(Storage(FeatureNotEnabled { feature: "libsql", message: "sqlite:///nonexistent-dir/probe.db" }))"#,
    );
    let says = probe_says_sqlite(&with_system_path(&dir));
    std::fs::remove_dir_all(dir).unwrap();
    assert!(!says);
}

#[test]
fn a_tansu_with_libsql_is_kept() {
    // With the feature, tansu gets past the storage engine or fails for
    // another reason (the probe points it at a directory that is missing).
    let dir = fake_tansu(
        "libsql",
        "Error: Server(Storage(LibSql(SqliteFailure(unable to open database file))))",
    );
    let says = probe_says_sqlite(&with_system_path(&dir));
    std::fs::remove_dir_all(dir).unwrap();
    assert!(says);
}

#[test]
fn no_tansu_at_all_is_installed() {
    let empty = std::env::temp_dir().join(format!("es-no-tansu-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    let says = probe_says_sqlite(&empty.display().to_string());
    std::fs::remove_dir_all(empty).unwrap();
    assert!(!says);
}

/// Regression: `.ci/run` (errexit, pipefail) read a failing `cargo test`'s
/// status from PIPESTATUS on the next line, which errexit never reached: the
/// script ended at the failure, without the test summary and the bench. Every
/// pipeline through `tee` must keep its status with `|| var=$?` instead.
#[test]
fn ci_run_keeps_going_after_a_failing_step() {
    let run =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(".ci/run")).unwrap();
    assert!(run.contains("set -euo pipefail"), "the premise changed");
    assert!(
        !run.contains("PIPESTATUS"),
        "PIPESTATUS after a failing pipeline is never read under errexit"
    );
    let tees: Vec<&str> = run.lines().filter(|l| l.contains("| tee ")).collect();
    assert!(tees.len() >= 2, "expected the test and bench pipelines");
    for line in tees {
        assert!(
            line.contains("|| status=$?") || line.contains("|| bench_status=$?"),
            "this pipeline ends .ci/run when it fails: {line}"
        );
    }
}
