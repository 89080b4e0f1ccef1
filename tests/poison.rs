//! The poison-pill corpus (`tests/fixtures/poison.jsonl`: every kind of bad
//! message with the reason it must get, and odd-but-valid ones that must be
//! stored verbatim) mixed among 10 000 good events, through a real broker and
//! the real `run` binary into a real Postgres.

mod common;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_energy-stream");
const LIMIT: usize = 1024 * 1024;

struct Pill {
    kind: String,
    reason: String,
    payload: Option<Vec<u8>>,
    stored_customer_id: Option<String>,
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// A valid login padded with an unknown field to exactly `size` bytes.
fn padded(customer: &str, size: usize) -> Vec<u8> {
    let head = format!(
        r#"{{"event_type":"user_login","event_time":"2025-06-03T10:00:00Z","payload":{{"customer_id":"{customer}","session_id":7,"channel":"web_portal"}},"pad":""#
    );
    let mut v = head.into_bytes();
    v.resize(size - 2, b'x');
    v.extend_from_slice(b"\"}");
    assert_eq!(v.len(), size);
    v
}

fn corpus() -> Vec<Pill> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/poison.jsonl"
    ))
    .unwrap();
    text.lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            let payload = if let Some(h) = v["payload_hex"].as_str() {
                Some(hex(h))
            } else if let Some(g) = v["generate"].as_str() {
                Some(match g {
                    "2MiB" => padded("BIG", 2 * LIMIT),
                    "at_limit" => padded("AT-LIMIT", LIMIT),
                    other => panic!("unknown generator {other}"),
                })
            } else {
                v["payload"].as_str().map(|s| s.as_bytes().to_vec())
            };
            Pill {
                kind: v["kind"].as_str().unwrap().into(),
                reason: v["reason"].as_str().unwrap().into(),
                payload,
                stored_customer_id: v["stored_customer_id"].as_str().map(str::to_string),
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_pills_are_rejected_once_with_their_reason_among_good_events() {
    let pills = corpus();
    let bad: Vec<&Pill> = pills.iter().filter(|p| p.reason != "accepted").collect();
    let kinds: std::collections::BTreeSet<&str> = bad.iter().map(|p| p.kind.as_str()).collect();
    assert!(
        kinds.len() >= 25,
        "the corpus has {} kinds of bad message",
        kinds.len()
    );

    let good_cfg = energy_stream::generate::GenerateConfig {
        events: 10_000,
        ..Default::default()
    };
    let mut buf = Vec::new();
    energy_stream::generate::generate(&good_cfg, &mut buf).unwrap();
    let mut messages: Vec<Option<Vec<u8>>> = buf
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| Some(l.to_vec()))
        .collect();
    assert_eq!(messages.len(), 10_000);
    messages.extend(pills.iter().map(|p| p.payload.clone()));
    messages.shuffle(&mut rand::rngs::StdRng::seed_from_u64(3));
    let total = messages.len() as i64;
    let accepted = pills.len() - bad.len();

    let broker = Broker::get();
    let topic = unique("poison");
    create_topic(&broker.brokers, &topic, 3);
    send_raw(&broker.brokers, &topic, &messages);
    let db_cfg = fresh_db("poison").await;
    let db = client(&db_cfg).await;
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let log_path = scratch_dir().join(unique("poison-log"));
    let mut child = Command::new(BIN)
        .args(["run", "--brokers", &broker.brokers, "--topic", &topic])
        .args(["--group-id", &unique("g"), "--metrics-addr", &metrics_addr])
        .args(["--batch-max-rows", "2000", "--batch-max-wait-ms", "200"])
        .args(["--kafka-option", "session.timeout.ms=6000"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("DATABASE_URL", db_url(&db_cfg))
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();

    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let done: i64 = db
            .query_one(
                "SELECT coalesce((SELECT sum(next_offset) FROM consumer_offsets), 0)::bigint",
                &[],
            )
            .await
            .map(|r| r.get(0))
            .unwrap_or(0);
        if done == total {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "consumed {done} of {total} within 180 s"
        );
    }
    // Lag returns to 0 on every partition (the gauge comes from librdkafka's
    // statistics, every 5 s).
    let lag_deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = http_get(&metrics_addr, "/metrics");
        let lags: Vec<f64> = m
            .lines()
            .filter(|l| l.starts_with("energy_stream_consumer_lag{") && l.contains(&topic))
            .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
            .collect();
        if lags.len() == 3 && lags.iter().all(|l| *l == 0.0) {
            break;
        }
        assert!(
            Instant::now() < lag_deadline,
            "consumer lag did not return to 0 on all 3 partitions: {lags:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let metrics = http_get(&metrics_addr, "/metrics");
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    let log = std::fs::read_to_string(&log_path).unwrap();

    // Every good event (and every odd-but-valid one) is in events, once.
    let events: i64 = db
        .query_one("SELECT count(*) FROM events", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(events, 10_000 + accepted as i64);
    for p in pills.iter().filter_map(|p| p.stored_customer_id.as_deref()) {
        let n: i64 = db
            .query_one("SELECT count(*) FROM events WHERE customer_id = $1", &[&p])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 1, "customer_id {p:?} stored verbatim, once");
    }
    let t: String = db
        .query_one(
            "SELECT to_char(event_time AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI') FROM events WHERE customer_id = 'ODD-0545'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(t, "2025-06-03 10:00", "+05:45 converted to UTC");

    // Every bad message is in rejected_events exactly once, with its reason.
    let rows = db
        .query("SELECT reason, raw_payload FROM rejected_events", &[])
        .await
        .unwrap();
    assert_eq!(rows.len(), bad.len(), "one reject per bad message");
    let mut stored: Vec<(String, Option<Vec<u8>>)> =
        rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let mut wrong = Vec::new();
    for p in &bad {
        let i = stored
            .iter()
            .position(|(_, raw)| *raw == p.payload)
            .unwrap_or_else(|| panic!("{}: not in rejected_events", p.kind));
        let (reason, _) = stored.remove(i);
        if reason != p.reason {
            wrong.push(format!("{}: got {reason}, expected {}", p.kind, p.reason));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));

    // The reject counter agrees per reason.
    let mut want: BTreeMap<&str, u64> = BTreeMap::new();
    for p in &bad {
        *want.entry(p.reason.as_str()).or_default() += 1;
    }
    for (reason, n) in want {
        let line = format!("energy_stream_events_rejected_total{{reason=\"{reason}\"}} {n}");
        assert!(metrics.contains(&line), "{line} missing from:\n{metrics}");
    }

    // Regression: Postgres' notice for the staging tables of every batch
    // ("already exists, skipping") was logged at info, once per KPI.
    assert!(!log.contains("NOTICE"), "a Postgres notice at info:\n{log}");
    // Nothing of the payloads reaches the logs at info level.
    for needle in [
        "DROP TABLE",
        "meter_exploded",
        "twelve",
        "ODD-0545",
        "yesterday",
    ] {
        assert!(
            !log.contains(needle),
            "payload text {needle:?} in the log:\n{log}"
        );
    }
    let tables: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_tables WHERE tablename IN ('events', 'rejected_events')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(tables, 2, "no SQL from a payload ran");
}
