//! The newcomer's command, as a newcomer runs it: no Kafka, no DATABASE_URL.

mod common;

use std::process::Command;

#[test]
fn demo_runs_end_to_end_with_nothing_but_postgres_installed() {
    let child = Command::new(env!("CARGO_BIN_EXE_energy-stream"))
        .arg("demo")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("DATABASE_URL")
        .env_remove("DATABASE_URL_FILE")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    // The refused lines are counted in the summary; their file is not left
    // in the shared temporary directory.
    let bad_lines = std::env::temp_dir().join(format!("energy-stream-demo-bad-lines-{pid}.jsonl"));
    assert!(!bad_lines.exists(), "{} left behind", bad_lines.display());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    // Regression: the throwaway cluster's shutdown warned every session it
    // ended ("terminating connection due to immediate shutdown command").
    assert!(
        !stderr.contains("WARN"),
        "a clean demo warns of nothing:\n{stderr}"
    );
    assert!(stdout.contains("started a throwaway cluster"), "{stdout}");
    // data/events.jsonl: 5000 lines, 33 not sent (not JSON objects with the
    // three keys, not UTF-8, or empty), 67 rejected.
    let line = |label: &str| -> i64 {
        stdout
            .lines()
            .find(|l| l.starts_with(label))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {label:?} line in:\n{stdout}"))
    };
    assert_eq!(line("rows written to events"), 4900, "{stdout}");
    assert_eq!(line("rows in rejected_events"), 67, "{stdout}");
    assert_eq!(line("input lines not sent"), 33, "{stdout}");
    for t in energy_stream::event::EventType::ALL.map(|t| t.as_str()) {
        assert!(
            stdout.contains(t),
            "{t} missing from the summary:\n{stdout}"
        );
    }
}

/// Regression: an --input that does not exist was replaced by generated
/// events (exit 0), after a Postgres cluster had been started for it.
#[test]
fn demo_refuses_a_missing_input_before_starting_anything() {
    let out = Command::new(env!("CARGO_BIN_EXE_energy-stream"))
        .args(["demo", "--input", "/nonexistent/events.jsonl"])
        .env_remove("DATABASE_URL")
        .env_remove("DATABASE_URL_FILE")
        .output()
        .unwrap();
    let text = common::output_text(&out);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("cannot read the --input file /nonexistent/events.jsonl"),
        "{text}"
    );
    assert!(!text.contains("started a throwaway cluster"), "{text}");
}

#[test]
fn demo_keep_running_serves_metrics_after_the_summary_until_sigterm() {
    use std::io::{BufRead, BufReader};
    let addr = format!("127.0.0.1:{}", common::free_port());
    let mut child = Command::new(env!("CARGO_BIN_EXE_energy-stream"))
        .args(["demo", "--keep-running", "--metrics-addr", &addr])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("DATABASE_URL")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        seen.push(line.clone());
        if line.starts_with("Still running") {
            break;
        }
    }
    let text = seen.join("\n");
    assert!(
        text.contains("rows written to events"),
        "summary first:\n{text}"
    );
    let mut metrics = String::new();
    for _ in 0..100 {
        if std::net::TcpStream::connect(&addr).is_ok() {
            metrics = common::http_get(&addr, "/metrics");
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(metrics.contains("energy_stream_batches_total"), "{metrics}");
    assert!(common::http_get(&addr, "/healthz").starts_with("HTTP/1.0 200"));
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(status.success(), "exit 0 on SIGTERM: {status}");
}

/// The demo against `db`, from the repository, with its output.
fn demo_on(db: &tokio_postgres::Config) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_energy-stream"))
        .arg("demo")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("DATABASE_URL", common::db_url_with_password(db))
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

/// Regression: two demos on one database dropped each other's schema
/// mid-run and mixed their rows (one reported more rows than its input
/// held); and a second demo dropped the first one's schema without a word.
#[tokio::test]
async fn one_demo_at_a_time_per_database_and_says_what_it_replaced() {
    let db = common::fresh_db("demolock").await;
    let holder = common::client(&db).await;
    // What a running demo holds.
    holder
        .query_one(
            "SELECT pg_advisory_lock(hashtext('energy-stream demo'))",
            &[],
        )
        .await
        .unwrap();
    let out = tokio::task::spawn_blocking({
        let db = db.clone();
        move || demo_on(&db)
    })
    .await
    .unwrap();
    let text = common::output_text(&out);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("another energy-stream demo is running"),
        "{text}"
    );
    drop(holder);

    let first = tokio::task::spawn_blocking({
        let db = db.clone();
        move || demo_on(&db)
    })
    .await
    .unwrap();
    assert!(first.status.success(), "{}", common::output_text(&first));
    assert!(!common::output_text(&first).contains("Dropped the schema"));
    let second = tokio::task::spawn_blocking(move || demo_on(&db))
        .await
        .unwrap();
    let text = common::output_text(&second);
    assert!(second.status.success(), "{text}");
    assert!(
        text.contains("Dropped the schema energy_stream_demo"),
        "{text}"
    );
}

/// Regression: Ctrl-C during a demo without `--keep-running` was ignored
/// until the run was over.
#[test]
fn ctrl_c_during_the_demo_ends_it_with_a_marked_summary() {
    use std::io::BufRead;
    let mut child = Command::new(env!("CARGO_BIN_EXE_energy-stream"))
        .arg("demo")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("DATABASE_URL")
        .env_remove("DATABASE_URL_FILE")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut seen = String::new();
    // Once Kafka is up, before anything is produced: the run that follows
    // starts already told to stop.
    loop {
        let mut line = String::new();
        assert!(stdout.read_line(&mut line).unwrap() > 0, "{seen}");
        seen.push_str(&line);
        if line.starts_with("Kafka:") {
            break;
        }
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{seen}{rest}");
    assert!(
        rest.contains("Interrupted: the summary counts what was committed")
            || rest.contains("Interrupted before the pipeline had created its tables"),
        "{seen}{rest}"
    );
}
