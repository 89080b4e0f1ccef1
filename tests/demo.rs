//! The newcomer's command, as a newcomer runs it: no Kafka, no DATABASE_URL.

use std::process::Command;

#[test]
fn demo_runs_end_to_end_with_nothing_but_postgres_installed() {
    let out = Command::new(env!("CARGO_BIN_EXE_energy-stream"))
        .arg("demo")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("DATABASE_URL")
        .env_remove("DATABASE_URL_FILE")
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("started a throwaway cluster"), "{stdout}");
    // data/events.jsonl: 5000 lines, 25 not sent (not JSON objects), 75 rejected.
    let line = |label: &str| -> i64 {
        stdout
            .lines()
            .find(|l| l.starts_with(label))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {label:?} line in:\n{stdout}"))
    };
    assert_eq!(line("rows written to events"), 4900, "{stdout}");
    assert_eq!(line("rows in rejected_events"), 75, "{stdout}");
    assert_eq!(line("input lines not sent"), 25, "{stdout}");
    for t in energy_stream::event::EventType::ALL.map(|t| t.as_str()) {
        assert!(
            stdout.contains(t),
            "{t} missing from the summary:\n{stdout}"
        );
    }
}
