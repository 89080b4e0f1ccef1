//! Scale-out: three consumers in one group, started together on a
//! 6-partition topic, leave the same rows and exactly the same KPI tables as
//! one consumer alone on the same input.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_energy-stream");

fn spawn_run(brokers: &str, topic: &str, group: &str, db: &str) -> Child {
    Command::new(BIN)
        .args([
            "run",
            "--brokers",
            brokers,
            "--topic",
            topic,
            "--group-id",
            group,
        ])
        .args(["--metrics-addr", "off", "--stop-when-caught-up"])
        .args(["--batch-max-rows", "2000", "--batch-max-wait-ms", "200"])
        .args(["--kafka-option", "session.timeout.ms=6000"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("DATABASE_URL", db)
        .env(
            "RUST_LOG",
            std::env::var("SCALE_OUT_LOG").unwrap_or("info".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log_path(group, db)).unwrap())
        .spawn()
        .unwrap()
}

/// Where a consumer's log goes; shown when the test fails.
fn log_path(group: &str, db: &str) -> std::path::PathBuf {
    let n = LOGS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let p = std::env::temp_dir().join(format!("{group}-{}-{n}.log", db.len()));
    LOG_FILES.lock().unwrap().push(p.clone());
    p
}

static LOGS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
static LOG_FILES: std::sync::Mutex<Vec<std::path::PathBuf>> = std::sync::Mutex::new(Vec::new());

fn dump_logs() -> String {
    LOG_FILES
        .lock()
        .unwrap()
        .iter()
        .map(|p| {
            format!(
                "== {}\n{}",
                p.display(),
                std::fs::read_to_string(p).unwrap_or_default()
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn wait_all(children: Vec<Child>, limit: Duration) {
    let started = Instant::now();
    for mut c in children {
        loop {
            if let Some(s) = c.try_wait().unwrap() {
                assert!(s.success(), "run exited with {s}\n{}", dump_logs());
                break;
            }
            if started.elapsed() > limit {
                let _ = c.kill();
                panic!("run did not finish within {limit:?}\n{}", dump_logs());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

// This test found two problems, both fixed: a migration race (regression test
// in pipeline_mock.rs), and consumers that stalled or stopped early when they
// resumed inside tansu's last stored record batch (see `Cursor::stalled`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_consumers_give_the_same_kpis_as_one() {
    let broker = Broker::get();
    let topic = unique("scale");
    create_topic(&broker.brokers, &topic, 6);
    let cfg = energy_stream::generate::GenerateConfig {
        events: 60_000,
        customers: 500,
        bad_ratio: 0.01,
        seed: 21,
        ..Default::default()
    };
    let mut buf = Vec::new();
    energy_stream::generate::generate(&cfg, &mut buf).unwrap();
    let messages: Vec<Option<Vec<u8>>> = buf
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| Some(l.to_vec()))
        .collect();
    send_raw(&broker.brokers, &topic, &messages);

    let three = fresh_db("three").await;
    let one = fresh_db("one").await;
    let group = unique("g3");
    let children = (0..3)
        .map(|_| spawn_run(&broker.brokers, &topic, &group, &db_url(&three)))
        .collect();
    wait_all(children, Duration::from_secs(300));
    wait_all(
        vec![spawn_run(
            &broker.brokers,
            &topic,
            &unique("g1"),
            &db_url(&one),
        )],
        Duration::from_secs(300),
    );

    let (a, b) = (client(&three).await, client(&one).await);
    let total: i64 = a
        .query_one(
            "SELECT (SELECT count(*) FROM events) + (SELECT count(*) FROM rejected_events)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        total,
        messages.len() as i64,
        "every message once, with three consumers"
    );
    let skip = ["updated_at", "created_at", "rejected_at"];
    assert_eq!(
        relation_rows(&a, "events", &skip).await,
        relation_rows(&b, "events", &skip).await
    );
    let kpis: Vec<String> = a
        .query("SELECT name FROM kpi_registry ORDER BY name", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(kpis.len() >= 4, "{kpis:?}");
    for k in &kpis {
        let (x, y) = (
            relation_rows(&a, k, &skip).await,
            relation_rows(&b, k, &skip).await,
        );
        assert!(!x.is_empty(), "{k} is empty");
        assert!(x == y, "{k}: three consumers and one consumer differ");
    }
    let out = Command::new(BIN)
        .arg("verify")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("DATABASE_URL", db_url(&three))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "verify after three consumers:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
