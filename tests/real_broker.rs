//! End-to-end against a real Kafka-compatible broker (tansu in CI), with the
//! `energy-stream` binary run as separate processes: `generate` → `produce` →
//! `run`, and the crash test that SIGKILLs `run` again and again.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use rand::{Rng, SeedableRng};

const BIN: &str = env!("CARGO_BIN_EXE_energy-stream");

fn tmp(name: &str) -> PathBuf {
    let dir = scratch_dir().join(unique("es-test"));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn generate(events: u64, bad_ratio: f64, seed: u64) -> PathBuf {
    let path = tmp("events.jsonl");
    let status = Command::new(BIN)
        .args([
            "generate",
            "--events",
            &events.to_string(),
            "--bad-ratio",
            &bad_ratio.to_string(),
            "--seed",
            &seed.to_string(),
            "--output",
        ])
        .arg(&path)
        .status()
        .unwrap();
    assert!(status.success());
    path
}

/// Runs `cmd`, asserts it exits 0, returns its standard output.
fn produce(brokers: &str, topic: &str, input: &Path) -> String {
    produce_with(brokers, topic, input, &[])
}

/// [`produce`] with extra arguments, e.g. a `--kafka-option`.
fn produce_with(brokers: &str, topic: &str, input: &Path, extra: &[&str]) -> String {
    let mut cmd = Command::new(BIN);
    cmd.args(["produce", "--brokers", brokers, "--topic", topic])
        .args(extra)
        .arg("--input")
        .arg(input)
        .arg("--bad-lines")
        .arg(input.with_extension("bad"));
    succeed(cmd)
}

/// What the pipeline must make of the lines `produce` sends: (valid, rejected by reason).
fn expected(input: &Path) -> (i64, BTreeMap<String, i64>) {
    let lines = utf8_lines(&std::fs::read(input).unwrap());
    let sent: Vec<&str> = lines
        .iter()
        .map(String::as_str)
        .filter(|l| energy_stream::produce::check_line(l).is_ok())
        .collect();
    let v = validated(&sent);
    let reasons = v.rejects.column_by_name("reason").unwrap();
    let reasons = datafusion::arrow::array::AsArray::as_string::<i32>(reasons);
    let mut by = BTreeMap::new();
    for r in reasons.iter().flatten() {
        *by.entry(r.to_string()).or_default() += 1;
    }
    (v.valid.num_rows() as i64, by)
}

/// `energy-stream produce --rate`, paced, bad lines next to the input.
fn produce_command(brokers: &str, topic: &str, input: &Path, rate: u32) -> Command {
    let mut c = Command::new(BIN);
    c.args(["produce", "--brokers", brokers, "--topic", topic])
        .args(["--rate", &rate.to_string(), "--input"])
        .arg(input)
        .arg("--bad-lines")
        .arg(input.with_extension("bad"));
    c
}

/// A fresh topic of 6 partitions that `produce` fills, at `rate` a second,
/// with the events `generate` writes for (count, bad ratio, seed), and a
/// fresh database and consumer group to read it into.
struct Feed {
    topic: String,
    input: PathBuf,
    producer: Child,
    db: tokio_postgres::Config,
    url: String,
    group: String,
    c: tokio_postgres::Client,
}

async fn feed(brokers: &str, prefix: &str, events: (u64, f64, u64), rate: u32) -> Feed {
    let topic = unique(prefix);
    let input = generate(events.0, events.1, events.2);
    create_topic(brokers, &topic, 6);
    let producer = produce_command(brokers, &topic, &input, rate)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let db = fresh_db(prefix).await;
    let url = db_url(&db);
    let c = client(&db).await;
    Feed {
        topic,
        input,
        producer,
        db,
        url,
        group: unique("g"),
        c,
    }
}

fn spawn_run(brokers: &str, topic: &str, group: &str, db: &str, extra: &[&str]) -> Child {
    spawn_run_with(brokers, topic, group, db, extra, None)
}

/// `run` with the crash tests' fault hook (`ENERGY_STREAM_FAULT`) set or not.
fn spawn_run_with(
    brokers: &str,
    topic: &str,
    group: &str,
    db: &str,
    extra: &[&str],
    fault: Option<&str>,
) -> Child {
    let mut cmd = Command::new(BIN);
    if let Some(f) = fault {
        cmd.env("ENERGY_STREAM_FAULT", f);
    }
    cmd.args([
        "run",
        "--brokers",
        brokers,
        "--topic",
        topic,
        "--group-id",
        group,
        "--metrics-addr",
        "off",
        "--batch-max-rows",
        "2000",
        "--batch-max-wait-ms",
        "200",
        "--kafka-option",
        "session.timeout.ms=6000",
    ])
    .args(extra)
    .env("DATABASE_URL", db)
    .env("RUST_LOG", "warn")
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::inherit())
    .spawn()
    .unwrap()
}

/// `run --stop-when-caught-up`, which must exit 0 within `limit`.
fn run_to_end(brokers: &str, topic: &str, group: &str, db: &str, extra: &[&str], limit: Duration) {
    let mut args = vec!["--stop-when-caught-up"];
    args.extend_from_slice(extra);
    wait_success(spawn_run(brokers, topic, group, db, &args), limit);
}

fn wait_success(child: Child, limit: Duration) {
    wait_exit_success(child, limit, "run (caught up)");
}

struct Checked {
    rows: i64,
}

/// R == P: every message the producer sent is in exactly one of events /
/// rejected_events, each partition's offsets have no gap, and the stored
/// offsets are the last offset + 1. (Watermarks are derived from the data
/// because tansu's ListOffsets does not report the high watermark.)
async fn check_exactly_once(
    db: &tokio_postgres::Config,
    topic: &str,
    group: &str,
    sent: i64,
    input: &Path,
) -> Checked {
    let c = client(db).await;
    let (valid, reasons) = expected(input);
    let rows: i64 = c
        .query_one("SELECT count(*) FROM events", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, valid, "one row per valid produced message");
    let got = counts(
        &c,
        "SELECT reason, count(*) FROM rejected_events GROUP BY 1",
    )
    .await;
    assert_eq!(got, reasons, "the rejects are complete");
    let ends = assert_exactly_once_by_position(&c, group, topic).await;
    assert_eq!(
        ends.values().sum::<i64>(),
        sent,
        "every sent message is stored once"
    );
    Checked { rows }
}

fn sent_count(summary: &str) -> i64 {
    summary
        .split("sent ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no sent count in {summary:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_then_run_as_processes() {
    let broker = Broker::get();
    let topic = unique("e2e");
    let input = generate(5_000, 0.05, 7);
    let summary = produce(&broker.brokers, &topic, &input);
    assert!(summary.contains("bad lines "), "{summary}");
    let sent = sent_count(&summary);

    let db = fresh_db("e2e").await;
    let group = unique("g");
    run_to_end(
        &broker.brokers,
        &topic,
        &group,
        &db_url(&db),
        &[],
        Duration::from_secs(180),
    );
    let checked = check_exactly_once(&db, &topic, &group, sent, &input).await;
    assert!(checked.rows > 4_000);

    // Resume after a clean finish: 0 new rows.
    run_to_end(
        &broker.brokers,
        &topic,
        &group,
        &db_url(&db),
        &[],
        Duration::from_secs(120),
    );
    let again = check_exactly_once(&db, &topic, &group, sent, &input).await;
    assert_eq!(again.rows, checked.rows);
}

/// Regression: the build lacked zstd, so a topic written by a producer that
/// compresses with zstd (a common Kafka client setting) stopped at the first
/// such batch: librdkafka reported "Decompression (codec 0x4) ... Not
/// implemented" and `run` never got past it. Every codec a Kafka producer may
/// use must be consumed, each in its own stretch of one topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_producer_compression_codec_is_consumed() {
    let broker = Broker::get();
    let topic = unique("codecs");
    let input = generate(2_500, 0.02, 11);
    let text = utf8_lines(&std::fs::read(&input).unwrap());
    let lines: Vec<&str> = text.iter().map(String::as_str).collect();
    let codecs = ["none", "gzip", "snappy", "lz4", "zstd"];
    let mut sent = 0;
    for (codec, chunk) in codecs
        .iter()
        .zip(lines.chunks(lines.len().div_ceil(codecs.len())))
    {
        let part = input.with_extension(format!("{codec}.jsonl"));
        std::fs::write(&part, chunk.join("\n") + "\n").unwrap();
        let option = format!("compression.type={codec}");
        let summary = produce_with(&broker.brokers, &topic, &part, &["--kafka-option", &option]);
        sent += sent_count(&summary);
    }
    assert!(sent >= 2_400, "sent {sent}");

    let db = fresh_db("codecs").await;
    let group = unique("g");
    run_to_end(
        &broker.brokers,
        &topic,
        &group,
        &db_url(&db),
        &[],
        Duration::from_secs(120),
    );
    check_exactly_once(&db, &topic, &group, sent, &input).await;
}

/// Waits (up to 30 s from `started`) until a process has committed rows
/// beyond `before`: the group hands partitions to a new member only once the
/// previous one left or its session expired.
async fn wait_for_new_rows(c: &tokio_postgres::Client, before: i64, started: Instant) {
    while row_count(c).await == before && started.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn row_count(c: &tokio_postgres::Client) -> i64 {
    c.query_one("SELECT count(*) FROM events", &[])
        .await
        .map(|r| r.get(0))
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_points_loses_and_duplicates_nothing() {
    let broker = Broker::get();
    // Events keep arriving while the consumer is killed again and again.
    let Feed {
        topic,
        input,
        producer,
        db,
        url,
        group,
        c,
    } = feed(&broker.brokers, "crash", (200_000, 0.01, 11), 1000).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(2024);
    let mut progress = Vec::new();
    let mut aborted = 0;
    for kill in 0..20 {
        // Every fourth death is on purpose inside the COPY, every fourth
        // inside the COMMIT (which may or may not land); the rest are
        // SIGKILLs at random moments.
        let fault = match kill % 4 {
            1 => Some(format!("copy:{}", rng.random_range(1..4))),
            3 => Some(format!("commit:{}", rng.random_range(1..4))),
            _ => None,
        };
        let mut child =
            spawn_run_with(&broker.brokers, &topic, &group, &url, &[], fault.as_deref());
        let before = row_count(&c).await;
        let started = Instant::now();
        if fault.is_some() {
            // It aborts by itself at the chosen batch.
            let status = loop {
                if let Some(s) = child.try_wait().unwrap() {
                    break Some(s);
                }
                if started.elapsed() > Duration::from_secs(60) {
                    break None;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            match status {
                Some(s) => {
                    use std::os::unix::process::ExitStatusExt;
                    assert_eq!(s.signal(), Some(libc::SIGABRT), "{fault:?}: {s}");
                    aborted += 1;
                }
                None => {
                    child.kill().unwrap();
                    child.wait().unwrap();
                }
            }
            progress.push((kill, 0, row_count(&c).await));
            continue;
        }
        // Kill while it is writing: wait until this process has committed
        // something (the group hands it partitions once the previous, killed
        // member's session has expired), then a random moment later.
        wait_for_new_rows(&c, before, started).await;
        let wait = Duration::from_millis(rng.random_range(0..1_500));
        tokio::time::sleep(wait).await;
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        progress.push((kill, wait.as_millis(), row_count(&c).await));
    }
    assert!(
        aborted >= 8,
        "the fault hook fired inside COPY and COMMIT: {aborted} of 10"
    );
    eprintln!("(kill, ms after first commit, rows): {progress:?}");
    let out = producer.wait_with_output().unwrap();
    let summary = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "produce: {summary}");
    let sent = sent_count(&summary);
    assert!(sent >= 197_000, "{summary}");
    let rows_during: Vec<i64> = progress.iter().map(|p| p.2).collect();
    assert!(
        rows_during.windows(2).filter(|w| w[1] > w[0]).count() >= 12,
        "the kills landed while the pipeline was making progress: {progress:?}"
    );

    run_to_end(
        &broker.brokers,
        &topic,
        &group,
        &url,
        &[],
        Duration::from_secs(300),
    );
    check_exactly_once(&db, &topic, &group, sent, &input).await;
    // KPIs are exactly-once too: the streamed tables equal a recomputation.
    verify_ok(&url, &[]);
}

/// Regression: a consumer started again at once after a SIGKILL, within the
/// dead one's session timeout, got an empty assignment from tansu, which
/// kept the dead member and its partitions: it read nothing for as long as
/// it ran (3 minutes 40 in the probe), ready all along. Once the partitions'
/// stored offsets stand still while messages wait, it leaves the group and
/// joins it again, which gives it the partitions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_left_out_by_a_dead_member_joins_again() {
    let broker = Broker::get();
    let Feed {
        topic,
        input,
        producer,
        db,
        url,
        group,
        c,
    } = feed(&broker.brokers, "orphaned", (60_000, 0.0, 5), 1000).await;
    // librdkafka's default session timeout, as in the probe.
    let session = ["--kafka-option", "session.timeout.ms=10000"];
    let mut dead = spawn_run(&broker.brokers, &topic, &group, &url, &session);
    wait_for_new_rows(&c, 0, Instant::now()).await;
    // As in the probe: a member that has run for a while, killed, and
    // started again 2 s later.
    tokio::time::sleep(Duration::from_secs(8)).await;
    dead.kill().unwrap(); // SIGKILL: no LeaveGroup
    dead.wait().unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut again = spawn_run(
        &broker.brokers,
        &topic,
        &group,
        &url,
        &[&session[..], &["--rebalance-limit-secs", "3"]].concat(),
    );
    let before = row_count(&c).await;
    let started = Instant::now();
    while row_count(&c).await < before + 1000 && started.elapsed() < Duration::from_secs(90) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let after = row_count(&c).await;
    // A clean stop leaves the group, so the run to the end below joins at once.
    unsafe { libc::kill(again.id() as i32, libc::SIGTERM) };
    again.wait().unwrap();
    assert!(
        after >= before + 1000,
        "the consumer started after the kill wrote {} rows in 90 s",
        after - before
    );
    let out = producer.wait_with_output().unwrap();
    let summary = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "produce: {summary}");
    run_to_end(
        &broker.brokers,
        &topic,
        &group,
        &url,
        &[],
        Duration::from_secs(120),
    );
    check_exactly_once(&db, &topic, &group, sent_count(&summary), &input).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waits_for_a_missing_topic_then_drains_on_sigterm() {
    let broker = Broker::get();
    let topic = unique("late");
    let db = fresh_db("late").await;
    let url = db_url(&db);
    let group = unique("g");
    let metrics = format!("127.0.0.1:{}", free_port());
    // Started before the topic exists: it must wait, not fail.
    let mut child = Command::new(BIN)
        .args([
            "run",
            "--brokers",
            &broker.brokers,
            "--topic",
            &topic,
            "--group-id",
            &group,
            "--metrics-addr",
            &metrics,
            "--batch-max-rows",
            "500",
            "--batch-max-wait-ms",
            "100",
        ])
        .env("DATABASE_URL", &url)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        child.try_wait().unwrap().is_none(),
        "run waits for the topic"
    );
    // Regression: /readyz said 200 while run read nothing, waiting (with
    // Postgres and the broker answering).
    let ready = || http_get(&metrics, "/readyz");
    for _ in 0..20 {
        let r = ready();
        assert!(
            r.starts_with("HTTP/1.0 503"),
            "not ready while the topic is missing: {r}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    let input = generate(20_000, 0.0, 5);
    create_topic(&broker.brokers, &topic, 6);
    let producer = produce_command(&broker.brokers, &topic, &input, 4000)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let c = client(&db).await;
    let started = Instant::now();
    while row_count(&c).await < 2_000 && started.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        row_count(&c).await >= 2_000,
        "run picked the topic up once it appeared"
    );
    assert!(
        ready().starts_with("HTTP/1.0 200"),
        "ready once the topic is there and batches commit: {}",
        ready()
    );

    // SIGTERM mid-stream: stop intake, commit what is in flight, exit 0.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit 0 after SIGTERM:\n{log}");
    assert!(
        log.contains("does not exist yet"),
        "a clear line about the missing topic:\n{log}"
    );
    assert!(log.contains("shutdown requested"), "{log}");
    // What was consumed is committed: stored offsets match the rows exactly.
    let consistent: bool = c
        .query_one(
            "SELECT bool_and(o.next_offset = e.n AND e.n = e.hi) FROM consumer_offsets o \
             JOIN (SELECT kafka_partition, count(*) n, max(kafka_offset) + 1 hi FROM events GROUP BY 1) e USING (kafka_partition) \
             WHERE o.group_id = $1",
            &[&group],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        consistent,
        "stored offsets equal the committed rows after SIGTERM"
    );

    let summary = String::from_utf8_lossy(&producer.wait_with_output().unwrap().stdout).to_string();
    let sent = sent_count(&summary);
    run_to_end(
        &broker.brokers,
        &topic,
        &group,
        &url,
        &[],
        Duration::from_secs(120),
    );
    check_exactly_once(&db, &topic, &group, sent, &input).await;
}

/// README "Adding a KPI", step by step, with the SQL taken from the README.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_adding_a_kpi_example() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let block = readme
        .split("<!-- kpi-example-start -->")
        .nth(1)
        .and_then(|r| r.split("<!-- kpi-example-end -->").next())
        .expect("README has the KPI example between markers");
    let sql = block
        .split("```sql")
        .nth(1)
        .and_then(|r| r.split("```").next())
        .expect("a sql block")
        .trim();
    let dir = tmp("queries");
    std::fs::create_dir_all(&dir).unwrap();
    for f in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/queries")).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), dir.join(f.file_name())).unwrap();
    }
    let qdir = dir.display().to_string();

    // Data exists before the KPI does.
    let broker = Broker::get();
    let topic = unique("readme");
    let input = generate(3_000, 0.0, 21);
    let sent = sent_count(&produce(&broker.brokers, &topic, &input));
    let db = fresh_db("readme").await;
    let url = db_url(&db);
    let group = unique("g");
    let run = || {
        let args = ["--queries-dir", qdir.as_str()];
        run_to_end(
            &broker.brokers,
            &topic,
            &group,
            &url,
            &args,
            Duration::from_secs(120),
        );
    };
    run();

    // 1. write the file
    std::fs::write(dir.join("daily_green_switches.sql"), sql).unwrap();
    // 2. check it
    let mut check = Command::new(BIN);
    check.args(["check", "--queries-dir", &qdir]);
    let stdout = succeed(check);
    assert!(stdout.contains("daily_green_switches"), "{stdout}");
    // 3. restart: the new KPI is backfilled from the stored events
    run();
    // 4. query it
    let c = client(&db).await;
    let rows: i64 = c
        .query_one("SELECT count(*) FROM daily_green_switches", &[])
        .await
        .unwrap()
        .get(0);
    assert!(rows > 0, "the new KPI has rows");
    let total: i64 = c
        .query_one(
            "SELECT sum(green_switches)::bigint FROM daily_green_switches",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let direct: i64 = c
        .query_one(
            "SELECT count(*) FROM events WHERE event_type = 'tariff_switch' AND tariff_type = 'green'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(total, direct);
    // 5. verify it
    let v = verify_ok(
        &url,
        &["--queries-dir", &qdir, "--kpi", "daily_green_switches"],
    );
    assert!(v.contains("equals"), "{v}");
    check_exactly_once(&db, &topic, &group, sent, &input).await;
}

/// Fault suite, clean shutdown: SIGTERM at a random moment while batches are
/// in flight, 10 times, with events arriving throughout. Every time: exit 0
/// within the drain timeout, and the stored offsets equal what is committed
/// (no gap, no row beyond them). At the end: exactly once, and KPIs verify.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_batch_ten_times_is_clean_and_exact() {
    let broker = Broker::get();
    let Feed {
        topic,
        input,
        producer,
        db,
        url,
        group,
        c,
    } = feed(&broker.brokers, "term", (40_000, 0.01, 13), 1000).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(77);
    for round in 0..10 {
        let mut child = spawn_run(&broker.brokers, &topic, &group, &url, &[]);
        let before = row_count(&c).await;
        let started = Instant::now();
        wait_for_new_rows(&c, before, started).await;
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..800))).await;
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let signalled = Instant::now();
        let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
            .await
            .unwrap();
        assert!(
            status.success(),
            "round {round}: exit 0 after SIGTERM, got {status}"
        );
        assert!(
            signalled.elapsed() < Duration::from_secs(30),
            "round {round}: exited within the 30 s drain timeout"
        );
        let consistent: bool = c
            .query_one(
                "SELECT coalesce(bool_and(o.next_offset = x.n AND x.n = x.hi), false) FROM consumer_offsets o \
                 JOIN (SELECT kafka_partition, count(*) n, max(kafka_offset) + 1 hi FROM \
                       (SELECT kafka_partition, kafka_offset FROM events UNION ALL \
                        SELECT kafka_partition, kafka_offset FROM rejected_events) u GROUP BY 1) x \
                 USING (kafka_partition) WHERE o.group_id = $1",
                &[&group],
            )
            .await
            .unwrap()
            .get(0);
        assert!(
            consistent,
            "round {round}: stored offsets equal the committed rows"
        );
    }
    let out = producer.wait_with_output().unwrap();
    let summary = String::from_utf8_lossy(&out.stdout).to_string();
    let sent = sent_count(&summary);
    run_to_end(
        &broker.brokers,
        &topic,
        &group,
        &url,
        &[],
        Duration::from_secs(180),
    );
    check_exactly_once(&db, &topic, &group, sent, &input).await;
    verify_ok(&url, &[]);
}

/// Moves the group's Kafka offsets back to the start, as an operator's
/// `kafka-consumer-groups --reset-offsets --to-earliest` would.
fn reset_group(brokers: &str, topic: &str, group: &str, partitions: i32) {
    use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, rdkafka::Offset::Offset(0))
            .unwrap();
    }
    consumer.commit(&tpl, CommitMode::Sync).unwrap();
}

/// Fault suite, replay: reset the group to the earliest offsets and run again,
/// three times. Postgres holds the offsets that count, so R and K stay the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_after_a_group_reset_change_nothing() {
    let broker = Broker::get();
    let topic = unique("replay");
    let input = generate(10_000, 0.02, 17);
    create_topic(&broker.brokers, &topic, 3);
    let sent = sent_count(&produce(&broker.brokers, &topic, &input));
    let db = fresh_db("replay").await;
    let url = db_url(&db);
    let group = unique("g");
    let limit = Duration::from_secs(120);
    run_to_end(&broker.brokers, &topic, &group, &url, &[], limit);
    let first = check_exactly_once(&db, &topic, &group, sent, &input).await;
    let c = client(&db).await;
    let kpis = kpi_snapshot(&c).await;
    assert!(kpis.len() >= 4 && kpis.iter().all(|(_, r)| !r.is_empty()));
    for round in 0..3 {
        reset_group(&broker.brokers, &topic, &group, 3);
        run_to_end(&broker.brokers, &topic, &group, &url, &[], limit);
        let again = check_exactly_once(&db, &topic, &group, sent, &input).await;
        assert_eq!(again.rows, first.rows, "round {round}: R unchanged");
        assert!(kpi_snapshot(&c).await == kpis, "round {round}: K unchanged");
    }
    verify_ok(&url, &[]);
}

/// Deletes `topic` through the admin API.
async fn delete_topic(brokers: &str, topic: &str) {
    use rdkafka::admin::{AdminClient, AdminOptions};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let results = admin
        .delete_topics(&[topic], &AdminOptions::new())
        .await
        .expect("delete_topics answered");
    for r in results {
        r.unwrap_or_else(|(t, e)| panic!("deleting {t}: {e}"));
    }
}

/// `run --stop-when-caught-up`, which must stop within `limit`, however it
/// ends: its exit status and its log (warnings and errors).
fn run_until_it_stops(
    brokers: &str,
    topic: &str,
    group: &str,
    db: &str,
    limit: Duration,
) -> (std::process::ExitStatus, String) {
    let log = scratch_dir().join(format!("{topic}.log"));
    let mut child = Reaped::new(
        Command::new(BIN)
            .args(["run", "--brokers", brokers, "--topic", topic])
            .args(["--group-id", group, "--metrics-addr", "off"])
            .arg("--stop-when-caught-up")
            .env("DATABASE_URL", db)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(start.elapsed() < limit, "run did not stop within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    };
    (status, std::fs::read_to_string(&log).unwrap())
}

/// Regression: a topic deleted and created again, whose new log had grown
/// past the offsets stored in Postgres, had its first messages skipped as
/// already written, without a word (found by a probe with tansu). Now `run`
/// compares the message before each stored offset with the row written from
/// it, and stops with an error that says what happened; nothing is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_created_again_and_grown_past_the_stored_offsets_is_refused() {
    let broker = Broker::get();
    let topic = unique("again");
    create_topic(&broker.brokers, &topic, 2);
    produce(&broker.brokers, &topic, &generate(1_000, 0.0, 3));
    let db = fresh_db("again").await;
    let url = db_url(&db);
    let group = unique("g");
    let limit = Duration::from_secs(120);
    run_to_end(&broker.brokers, &topic, &group, &url, &[], limit);
    let c = client(&db).await;
    let before = stored_messages(&c).await.unwrap();
    assert!(before > 0);
    let offsets_sql = "SELECT kafka_partition::text, next_offset FROM consumer_offsets";
    let offsets = counts(&c, offsets_sql).await;

    delete_topic(&broker.brokers, &topic).await;
    create_topic(&broker.brokers, &topic, 2);
    produce(&broker.brokers, &topic, &generate(3_000, 0.0, 4));

    let (status, text) = run_until_it_stops(&broker.brokers, &topic, &group, &url, limit);
    assert!(!status.success(), "run took another log: {text}");
    assert!(
        text.contains("is not the one written to Postgres"),
        "{text}"
    );
    assert!(text.contains("deleted and created again"), "{text}");
    assert_eq!(
        stored_messages(&c).await.unwrap(),
        before,
        "nothing written"
    );
    assert_eq!(counts(&c, offsets_sql).await, offsets, "no offset moved");
}

/// Regression: the comparison looked at the Kafka timestamp alone, so a topic
/// created again whose producer stamped the same timestamps (event time, a
/// mirror) passed and its first messages were skipped; and a new log exactly
/// as long as the old one passed for caught up. Now the value is compared
/// too, and a partition is not caught up before its log is recognised.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_created_again_with_the_same_timestamps_and_length_is_refused() {
    let broker = Broker::get();
    let topic = unique("same_stamps");
    create_topic(&broker.brokers, &topic, 1);
    let stamp = Some(1_748_736_000_000);
    send_stamped(&broker.brokers, &topic, &sample_messages(0..50, 10), stamp);
    let db = fresh_db("same_stamps").await;
    let url = db_url(&db);
    let group = unique("g");
    let limit = Duration::from_secs(120);
    run_to_end(&broker.brokers, &topic, &group, &url, &[], limit);
    let c = client(&db).await;
    let before = stored_messages(&c).await.unwrap();
    assert_eq!(before, 50);

    delete_topic(&broker.brokers, &topic).await;
    create_topic(&broker.brokers, &topic, 1);
    send_stamped(
        &broker.brokers,
        &topic,
        &sample_messages(1000..1050, 7),
        stamp,
    );

    let (status, text) = run_until_it_stops(&broker.brokers, &topic, &group, &url, limit);
    assert!(
        !status.success(),
        "run took another log for caught up: {text}"
    );
    assert!(
        text.contains("is not the one written to Postgres"),
        "{text}"
    );
    assert_eq!(
        stored_messages(&c).await.unwrap(),
        before,
        "nothing written"
    );
}
