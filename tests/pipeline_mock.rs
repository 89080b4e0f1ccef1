//! The pipeline against a real Postgres, with Kafka served by librdkafka's
//! in-process MockCluster: counts, reasons, stored offsets, resume.

mod common;

use std::time::Duration;

use common::*;
use energy_stream::config::PipelineConfig;
use energy_stream::pipeline;
use energy_stream::source::KafkaConfig;
use energy_stream::telemetry::Metrics;
use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

fn pipeline_config(brokers: &str, topic: &str, db: tokio_postgres::Config) -> PipelineConfig {
    let mut cfg = PipelineConfig::new(
        KafkaConfig {
            brokers: brokers.to_string(),
            topic: topic.to_string(),
            group_id: unique("group"),
            options: vec![],
        },
        db,
    );
    cfg.batch_max_rows = 64;
    cfg.batch_max_wait = Duration::from_millis(100);
    cfg.stop_when_caught_up = true;
    cfg
}

/// Runs the pipeline until it stops on its own; panics with `what` when that
/// takes longer than `limit`.
async fn run_within(
    cfg: PipelineConfig,
    metrics: std::sync::Arc<Metrics>,
    limit: Duration,
    what: &str,
) -> Result<pipeline::RunSummary, pipeline::PipelineError> {
    tokio::time::timeout(limit, pipeline::run(cfg, metrics, std::future::pending()))
        .await
        .expect(what)
}

/// Runs the pipeline, which must stop with an error (`why`) within `limit`;
/// the error's text.
async fn run_refused(cfg: PipelineConfig, limit: Duration, why: &str) -> String {
    run_within(
        cfg,
        Metrics::new(),
        limit,
        &format!("the run ends within {limit:?}"),
    )
    .await
    .expect_err(why)
    .to_string()
}

async fn run_to_end(cfg: PipelineConfig) -> pipeline::RunSummary {
    run_within(
        cfg,
        Metrics::new(),
        Duration::from_secs(120),
        "pipeline caught up within 120 s",
    )
    .await
    .expect("pipeline ran without error")
}

async fn event_rows(c: &tokio_postgres::Client) -> i64 {
    c.query_one("SELECT count(*) FROM events", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_and_invalid_messages_land_exactly_once_with_reasons() {
    let cluster = MockCluster::new(1).unwrap();
    let brokers = cluster.bootstrap_servers();
    let topic = unique("events");
    mock_topic(&cluster, &topic, 3);

    let n_valid = 700;
    let mut messages: Vec<Option<Vec<u8>>> = Vec::new();
    let mut expected_reasons = std::collections::BTreeMap::<String, i64>::new();
    let bad = bad_messages();
    for i in 0..n_valid {
        messages.push(Some(
            event(TYPES[i % 7], &format!("C{}", i % 50), i as i64, i as u32).into_bytes(),
        ));
        // Interleave the bad ones so every batch mixes good and bad rows.
        if i % 40 == 0 {
            let (m, reason) = &bad[(i / 40) % bad.len()];
            messages.push(m.clone());
            *expected_reasons.entry(reason.to_string()).or_default() += 1;
        }
    }
    for (m, reason) in &bad {
        messages.push(m.clone());
        *expected_reasons.entry(reason.to_string()).or_default() += 1;
    }
    let n_invalid: i64 = expected_reasons.values().sum();
    send_raw(&brokers, &topic, &messages);

    let db = fresh_db("core").await;
    let cfg = pipeline_config(&brokers, &topic, db.clone());
    let group = cfg.kafka.group_id.clone();
    let summary = run_to_end(cfg.clone()).await;
    assert_eq!(summary.events_written, n_valid as u64);
    assert_eq!(summary.rejected, n_invalid as u64);

    let c = client(&db).await;
    let rows = event_rows(&c).await;
    assert_eq!(rows, n_valid as i64);
    let reasons = counts(
        &c,
        "SELECT reason, count(*) FROM rejected_events GROUP BY 1",
    )
    .await;
    assert_eq!(reasons, expected_reasons);

    // Raw payloads are kept byte for byte; tombstones keep NULL.
    let nulls: i64 = c
        .query_one(
            "SELECT count(*) FROM rejected_events WHERE raw_payload IS NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(nulls, expected_reasons["tombstone"]);
    let utf8: Vec<u8> = c
        .query_one(
            "SELECT raw_payload FROM rejected_events WHERE reason = 'not_utf8' LIMIT 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(utf8, b"\xc3\x28 not utf8");
    let topics: i64 = c
        .query_one(
            "SELECT count(*) FROM rejected_events WHERE topic = $1",
            &[&topic],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(topics, n_invalid);

    // Stored offsets are the last offset + 1 of each partition (= the high watermark).
    let hw = high_watermarks(&brokers, &topic, 3);
    let stored = c
        .query(
            "SELECT kafka_partition, next_offset FROM consumer_offsets WHERE group_id = $1 AND topic = $2 ORDER BY 1",
            &[&group, &topic],
        )
        .await
        .unwrap();
    let stored: std::collections::BTreeMap<i32, i64> =
        stored.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(stored, hw);
    // Every (partition, offset) below the watermark is in exactly one of the two tables.
    let total: i64 = c
        .query_one(
            "SELECT count(*) FROM (SELECT kafka_partition, kafka_offset FROM events UNION ALL SELECT kafka_partition, kafka_offset FROM rejected_events) x",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(total, hw.values().sum::<i64>());

    // Values survive the trip exactly.
    let row = c
        .query_one(
            "SELECT energy_consumed::text, event_time = '2025-06-01T00:04:00Z'::timestamptz FROM events WHERE event_type = 'energy_consumed' AND session_id = 4",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "1.234");
    assert!(row.get::<_, bool>(1));

    // Resume: a restart after a clean finish writes nothing new.
    let again = run_to_end(cfg).await;
    assert_eq!(again.events_written + again.rejected, 0);
    let rows_after = event_rows(&c).await;
    assert_eq!(rows_after, rows);
}

/// The healthy KPI beside a failing one in the KPI-failure tests.
const BY_TYPE: (&str, &str) = (
    "by_type.sql",
    "SELECT event_type, count(*) AS n FROM events GROUP BY event_type",
);

/// After a run of `n` events in which KPI `failed` failed on a batch: the
/// healthy `by_type` saw every event, `failed` is marked stale for the next
/// start to rebuild, and its failure is counted once.
async fn assert_kpi_given_up(
    c: &tokio_postgres::Client,
    metrics: &Metrics,
    failed: &str,
    n: usize,
) {
    assert_eq!(event_rows(c).await, n as i64);
    let by_type: i64 = c
        .query_one("SELECT sum(n)::bigint FROM by_type", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(by_type, n as i64, "the healthy KPI saw every batch");
    let hash: String = c
        .query_one(
            "SELECT sql_hash FROM kpi_registry WHERE name = $1",
            &[&failed],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(hash, "stale", "the next start rebuilds it");
    let text = metrics.render();
    assert!(
        text.contains(&format!(
            "energy_stream_kpi_failures_total{{kpi=\"{failed}\"}} 1"
        )),
        "{text}"
    );
    // Regression: a KPI that never failed had no failures series at all,
    // so `rate(...)` over it was empty rather than 0.
    assert!(
        text.contains("energy_stream_kpi_failures_total{kpi=\"by_type\"} 0"),
        "{text}"
    );
}

/// A KPI that blows DataFusion's memory pool on a batch is stopped, logged,
/// disabled and marked stale; the pipeline goes on and loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kpi_that_exceeds_its_memory_pool_is_disabled_not_fatal() {
    let cluster = MockCluster::new(1).unwrap();
    let brokers = cluster.bootstrap_servers();
    let topic = unique("events");
    mock_topic(&cluster, &topic, 2);
    let n = 600;
    send_raw(&brokers, &topic, &sample_messages(0..n, 40));

    // Every row adds a 20 kB distinct value: far beyond a 1 MiB pool.
    let mut kpi_cfg = kpi_dir(&[
        BY_TYPE,
        (
            "bomb.sql",
            "SELECT customer_id, count(DISTINCT concat(session_id, repeat('x', 20000))) AS n FROM events GROUP BY customer_id",
        ),
    ]);
    kpi_cfg.memory_limit = 1 << 20;
    // What stops it is the memory pool, not some other error.
    let engine = energy_stream::kpi::KpiEngine::load_dir(&kpi_cfg)
        .await
        .unwrap();
    let lines: Vec<String> = (0..200)
        .map(|i| event(TYPES[i % 7], &format!("C{}", i % 40), i as i64, i as u32))
        .collect();
    let v = validated(&lines.iter().map(String::as_str).collect::<Vec<_>>());
    let (deltas, failures) = engine.compute_tolerant(&v.valid).await;
    assert_eq!(deltas.len(), 1, "by_type computed");
    assert_eq!(failures.len(), 1);
    assert!(
        failures[0].error.contains("Resources exhausted"),
        "{}",
        failures[0].error
    );

    let db = fresh_db("bomb").await;
    let mut cfg = pipeline_config(&brokers, &topic, db.clone());
    cfg.kpi = Some(kpi_cfg);
    let metrics = Metrics::new();
    let summary = run_within(
        cfg,
        metrics.clone(),
        Duration::from_secs(120),
        "caught up within 120 s",
    )
    .await
    .expect("a failing KPI does not stop the pipeline");
    assert_eq!(summary.events_written, n as u64);

    assert_kpi_given_up(&client(&db).await, &metrics, "bomb", n).await;
}

/// Regression: a KPI whose keys, for some events, outgrew what the unique
/// index over them takes (about 2.7 kB; three 790-byte fields under
/// `--max-field-bytes 800` and a key joining two of them) had its merge
/// refused by Postgres on every retry, counted as Postgres away: the
/// partition stalled for good, its valid events and every other KPI with it.
/// Now that KPI is disabled and marked stale, as when it fails in
/// DataFusion, the batch commits without it, and the next start says what
/// to change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kpi_whose_keys_postgres_refuses_is_disabled_not_retried_forever() {
    let cluster = MockCluster::new(1).unwrap();
    let brokers = cluster.bootstrap_servers();
    let topic = unique("events");
    mock_topic(&cluster, &topic, 1);
    // Incompressible text, so that Postgres cannot squeeze it into the index.
    let mut seed: u64 = 7;
    let mut noise = |len: usize| -> String {
        (0..len)
            .map(|_| {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                char::from(b"abcdefghijklmnopqrstuvwxyz0123456789"[(seed >> 33) as usize % 36])
            })
            .collect()
    };
    let mut messages = sample_messages(0..100, 10);
    for i in 0..3 {
        let line = format!(
            r#"{{"event_type":"view_tariffs","event_time":"2025-06-01T10:{i:02}:00Z","payload":{{"customer_id":"{}","session_id":{i},"channel":"{}","tariff_type":"{}"}}}}"#,
            noise(790),
            noise(790),
            noise(790)
        );
        messages.push(Some(line.into_bytes()));
    }
    messages.extend(sample_messages(103..200, 10));
    send_raw(&brokers, &topic, &messages);

    let kpi_cfg = kpi_dir(&[
        BY_TYPE,
        (
            "segments.sql",
            "SELECT customer_id, channel, tariff_type, concat(channel, '/', tariff_type) AS segment, \
             count(*) AS n FROM events GROUP BY 1, 2, 3, 4",
        ),
    ]);
    let db = fresh_db("wide_keys").await;
    let mut cfg = pipeline_config(&brokers, &topic, db.clone());
    cfg.rules.max_field_bytes = 800;
    cfg.kpi = Some(kpi_cfg);
    let metrics = Metrics::new();
    let summary = run_within(
        cfg.clone(),
        metrics.clone(),
        Duration::from_secs(120),
        "the run catches up: the refused KPI holds nothing up",
    )
    .await
    .expect("a KPI Postgres refuses does not stop the pipeline");
    assert_eq!(summary.events_written, 200);

    assert_kpi_given_up(&client(&db).await, &metrics, "segments", 200).await;
    // The KPI's fault, not Postgres being away: no write was retried.
    assert_eq!(metrics.db_errors.with_label_values(&["query"]).get(), 0);
    assert_eq!(metrics.retries.get(), 0);

    // The next start rebuilds the stale KPI from `events` and meets the same
    // rows: it stops, naming the KPI and what to change.
    let msg = run_refused(
        cfg,
        Duration::from_secs(60),
        "the stale KPI cannot be rebuilt as it is",
    )
    .await;
    assert!(
        msg.contains("KPI segments")
            && msg.contains("segments.sql")
            && msg.contains("too long")
            && msg.contains("left(x, 100)"),
        "{msg}"
    );
}

/// Regression: a run to the end held its last, partial batch until
/// --batch-max-wait-ms ran out, since it looked for the end only with no
/// batch open: with the hour the flag allows, a batch job ran for an hour.
/// It now cuts that batch once every partition is consumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_to_the_end_does_not_wait_out_the_batch_linger() {
    let Named {
        _cluster,
        db,
        name: _,
        mut cfg,
    } = Named::new("linger_end", &sample_messages(0..30, 5)).await;
    assert!(cfg.stop_when_caught_up);
    cfg.batch_max_wait = Duration::from_secs(3600);
    let summary = run_within(
        cfg,
        Metrics::new(),
        Duration::from_secs(60),
        "a run to the end stops once caught up, not an hour later",
    )
    .await
    .unwrap();
    assert_eq!(summary.events_written, 30);
    assert_eq!(event_rows(&client(&db).await).await, 30);
}

/// Regression: a run to the end waited for ever for a topic that is not
/// there (a typo, the wrong broker), logging every 30 s, and SIGTERM then
/// ended it with exit 0. It fails after twice the rebalance limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_to_the_end_of_a_missing_topic_fails() {
    let cluster = MockCluster::new(1).unwrap();
    let topic = unique("never_created");
    let db = fresh_db("missing_topic").await;
    let mut cfg = pipeline_config(&cluster.bootstrap_servers(), &topic, db.clone());
    assert!(cfg.stop_when_caught_up);
    cfg.rebalance_limit = Duration::from_secs(2);
    let e = run_within(
        cfg,
        Metrics::new(),
        Duration::from_secs(60),
        "a run to the end of a missing topic ends",
    )
    .await
    .expect_err("nothing to read is a failure");
    let msg = e.to_string();
    assert!(
        msg.contains(&format!("topic {topic} not found on the broker for 4s"))
            && msg.contains("nothing was committed"),
        "{msg}"
    );
}

/// Regression: Postgres refused some KPI rows at the COPY into the staging
/// table (text holding U+0000, a time before 4713 BC), or met one key twice
/// in one merge (NaN and -NaN, two groups for DataFusion and one for
/// Postgres' index). Only errors of the merge statement itself disabled the
/// KPI, so these were retried every few seconds for good, holding every
/// event of the partition back. Each KPI is now disabled on its own while
/// the batches commit, and the next start's rebuild names the KPI.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kpi_rows_refused_at_the_staging_copy_or_merged_twice_are_disabled() {
    let cluster = MockCluster::new(1).unwrap();
    let brokers = cluster.bootstrap_servers();
    let topic = unique("events");
    mock_topic(&cluster, &topic, 1);
    send_raw(&brokers, &topic, &sample_messages(0..200, 10));
    let bad = [
        (
            "nul_key.sql",
            "SELECT concat(channel, chr(0)) AS k, count(*) AS n FROM events GROUP BY 1",
        ),
        (
            "ancient.sql",
            "SELECT date_trunc('day', event_time) - INTERVAL '2500000 days' AS k, count(*) AS n \
             FROM events GROUP BY 1",
        ),
        (
            "nan_keys.sql",
            "SELECT CASE WHEN session_id % 2 = 0 THEN CAST('NaN' AS DOUBLE) \
             ELSE -CAST('NaN' AS DOUBLE) END AS k, count(*) AS n FROM events GROUP BY 1",
        ),
    ];
    let mut files = vec![BY_TYPE];
    files.extend(bad);
    let db = fresh_db("refused_at_copy").await;
    let mut cfg = pipeline_config(&brokers, &topic, db.clone());
    cfg.kpi = Some(kpi_dir(&files));
    let metrics = Metrics::new();
    let summary = run_within(
        cfg.clone(),
        metrics.clone(),
        Duration::from_secs(120),
        "the run catches up: the refused KPIs hold nothing up",
    )
    .await
    .expect("KPIs Postgres refuses do not stop the pipeline");
    assert_eq!(summary.events_written, 200);
    let c = client(&db).await;
    for (file, _) in bad {
        assert_kpi_given_up(&c, &metrics, file.trim_end_matches(".sql"), 200).await;
    }
    assert_eq!(metrics.db_errors.with_label_values(&["query"]).get(), 0);
    assert_eq!(metrics.retries.get(), 0);

    let msg = run_refused(
        cfg,
        Duration::from_secs(60),
        "the stale KPIs cannot be rebuilt",
    )
    .await;
    assert!(
        bad.iter().any(
            |(file, _)| msg.contains(&format!("KPI {}", file.trim_end_matches(".sql")))
                && msg.contains(file)
        ),
        "{msg}"
    );
}

/// Regression: `migrate` run with fewer KPI files retired the missing KPIs,
/// but a consumer that had started with their files kept merging into them:
/// a retired KPI's tables, which stay as they are, went on changing. The
/// consumer now leaves them alone from the first batch after the retirement,
/// and keeps the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kpi_retired_while_a_consumer_runs_is_left_as_it_is() {
    let (first, n) = (100, 300);
    let Named {
        _cluster,
        db,
        name: _,
        mut cfg,
    } = Named::with_partitions("retired_live", 1, &sample_messages(0..first, 10)).await;
    cfg.stop_when_caught_up = false;
    let by_channel = (
        "by_channel.sql",
        "SELECT channel, count(*) AS n FROM events GROUP BY channel",
    );
    cfg.kpi = Some(kpi_dir(&[BY_TYPE, by_channel]));
    let (brokers, topic) = (cfg.kafka.brokers.clone(), cfg.kafka.topic.clone());
    let metrics = Metrics::new();
    let running = Running::spawn(cfg.clone(), metrics.clone());
    wait_until(
        &db,
        &format!("SELECT count(*) = {first} FROM events"),
        "the first batches",
    )
    .await;
    // What `migrate` from a directory with by_type.sql alone does.
    let c = client(&db).await;
    let only_by_type = energy_stream::kpi::KpiEngine::load_dir(&kpi_dir(&[BY_TYPE]))
        .await
        .unwrap();
    let retired = energy_stream::kpi::retire_missing(&c, &only_by_type)
        .await
        .unwrap();
    assert_eq!(retired, ["by_channel"]);
    send_raw(&brokers, &topic, &sample_messages(first..n, 10));
    wait_until(
        &db,
        &format!("SELECT count(*) = {n} FROM events"),
        "the events sent after the retirement",
    )
    .await;
    let sum = |table: &'static str| {
        let c = &c;
        async move {
            c.query_one(&format!("SELECT sum(n)::bigint FROM {table}"), &[])
                .await
                .unwrap()
                .get::<_, i64>(0)
        }
    };
    // The batch that wrote the last events has committed its KPI rows too.
    assert_eq!(sum("by_type").await, n as i64, "the kept KPI goes on");
    assert_eq!(
        sum("by_channel").await,
        first as i64,
        "the retired KPI stays as it was when retired"
    );
    let hash: String = c
        .query_one(
            "SELECT sql_hash FROM kpi_registry WHERE name = 'by_channel'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        hash,
        energy_stream::kpi::RETIRED_HASH,
        "still retired, not stale"
    );
    assert_eq!(metrics.retries.get(), 0);
    running.stop().await;
}

/// Regression: a batch of an assignment already given up (cut before a
/// rebalance or a resync) was fenced before its generation was looked at,
/// and its fence asked for one more resync. That threw away the batches read
/// since the last one, the first of which would have committed, so the next
/// was fenced in turn, and so on: a partition made no progress for as long
/// as the timing held (seen with three consumers on tansu). Here Postgres
/// loses the consumer's last commits (a failover to a lagging replica,
/// played by deleting them) while batches queue behind a lock: one resync
/// must do, and every event is then written again, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fence_of_a_batch_already_given_up_asks_for_no_resync() {
    let (first, n) = (640, 4000);
    let Named {
        _cluster,
        db,
        name: _,
        mut cfg,
    } = Named::with_partitions("fence_loop", 1, &sample_messages(0..first, 30)).await;
    cfg.stop_when_caught_up = false;
    let (brokers, topic) = (cfg.kafka.brokers.clone(), cfg.kafka.topic.clone());
    let group = cfg.kafka.group_id.clone();
    let metrics = Metrics::new();
    let running = Running::spawn(cfg, metrics.clone());
    wait_until(
        &db,
        &format!("SELECT count(*) = {first} FROM events"),
        "the first batches",
    )
    .await;
    // The next batches queue behind the lock: their fences wait.
    let lost = client(&db).await;
    lost.batch_execute("BEGIN; LOCK TABLE consumer_offsets IN EXCLUSIVE MODE")
        .await
        .unwrap();
    send_raw(&brokers, &topic, &sample_messages(first..n, 30));
    tokio::time::sleep(Duration::from_secs(3)).await;
    lost.batch_execute(&format!(
        "DELETE FROM events; DELETE FROM rejected_events; \
         DELETE FROM consumer_offsets WHERE group_id = '{group}'; COMMIT"
    ))
    .await
    .unwrap();
    let c = client(&db).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while event_rows(&c).await < n as i64 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let fenced = metrics.db_errors.with_label_values(&["fenced"]).get();
    let given_up = metrics
        .batches_discarded
        .with_label_values(&["rebalance"])
        .get();
    let rows = event_rows(&c).await;
    running.stop().await;
    assert_eq!(
        rows, n as i64,
        "every event written again ({fenced} fences)"
    );
    // The first fence is the lost commits'; the batches queued behind it
    // are given up without fences of their own.
    assert_eq!(fenced, 1, "one fence, one resync ({given_up} given up)");
    assert!(given_up >= 1, "batches were queued behind the fenced one");
    // Regression: messages were counted as consumed when read, so those of
    // the discarded batches, read again, counted twice. What is committed
    // counts: the first batches twice (Postgres lost them), the rest once.
    let sum = |v: &prometheus::IntCounterVec| -> u64 {
        use prometheus::core::Collector;
        v.collect()[0]
            .get_metric()
            .iter()
            .map(|m| m.get_counter().value() as u64)
            .sum()
    };
    assert_eq!(
        metrics.events_consumed.get(),
        sum(&metrics.events_written) + sum(&metrics.events_rejected),
        "consumed is what was written or rejected"
    );
    assert_eq!(metrics.events_consumed.get(), (first + n) as u64);
}

/// Regression: a message whose Kafka timestamp Postgres cannot store (before
/// 4714 BC; a broker such as tansu keeps what the producer sent) failed its
/// batch's COPY on every retry, counted as Postgres away: nothing of the
/// partition was written again. Such a timestamp now reads as none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kafka_timestamp_postgres_cannot_store_holds_nothing_up() {
    let cluster = MockCluster::new(1).unwrap();
    let brokers = cluster.bootstrap_servers();
    let topic = unique("events");
    mock_topic(&cluster, &topic, 1);
    send_raw(&brokers, &topic, &sample_messages(0..20, 5));
    send_stamped(
        &brokers,
        &topic,
        &sample_messages(20..21, 5),
        Some(-300_000_000_000_000),
    );
    send_raw(&brokers, &topic, &sample_messages(21..40, 5));
    let db = fresh_db("kafka_ts").await;
    let cfg = pipeline_config(&brokers, &topic, db.clone());
    let summary = run_within(
        cfg,
        Metrics::new(),
        Duration::from_secs(60),
        "the run catches up within 60 s",
    )
    .await
    .expect("no error");
    assert_eq!(summary.events_written, 40);
    let c = client(&db).await;
    let stamps: Vec<(i64, bool)> = c
        .query(
            "SELECT kafka_offset, kafka_timestamp IS NULL FROM events ORDER BY kafka_offset",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let expected: Vec<(i64, bool)> = (0..40).map(|o| (o, o == 20)).collect();
    assert_eq!(
        stamps, expected,
        "only the implausible timestamp is dropped"
    );
}

/// Regression: a `--stop-when-caught-up` run that joined a group whose other
/// members own every partition (more members than partitions) waited for an
/// assignment for ever. It stops once it has held no partition for 10 s,
/// saying which partitions the others own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_to_the_end_given_no_partition_stops() {
    let Named {
        _cluster,
        db,
        name: _,
        mut cfg,
    } = Named::with_partitions("left_out", 1, &sample_messages(0..100, 10)).await;
    // Static members, so that the range assignor gives the one partition to
    // the first group.instance.id in order, the owner. Otherwise it sorts by
    // member id, which the MockCluster makes from a heap address: the late
    // run then got the partition about half the time, caught up at once, and
    // stopped without having waited for anything.
    let mut late = cfg.clone();
    late.kafka
        .options
        .push(("group.instance.id".into(), "1-late".into()));
    cfg.kafka
        .options
        .push(("group.instance.id".into(), "0-owner".into()));
    cfg.stop_when_caught_up = false;
    let owner = Running::spawn(cfg, Metrics::new());
    wait_until(
        &db,
        "SELECT count(*) = 100 FROM events",
        "the owner's events",
    )
    .await;
    let started = std::time::Instant::now();
    late.stop_when_caught_up = true;
    let ended = tokio::time::timeout(
        Duration::from_secs(60),
        pipeline::run(late, Metrics::new(), std::future::pending()),
    )
    .await;
    let took = started.elapsed();
    // Stopped first, so that a failure below ends the test.
    let owned = owner.stop().await;
    let summary = ended
        .expect("a run given no partition stops within 60 s")
        .expect("no error");
    assert_eq!(summary.events_written + summary.rejected, 0);
    assert!(
        took >= Duration::from_secs(10),
        "not before it has waited for a rebalance: {took:?}"
    );
    assert_eq!(owned.events_written, 100);
}

/// A LATIN1 database refuses characters outside Latin-1 (SQLSTATE 22P05) on
/// every retry, which would stall the partition that carries one: `run`
/// refuses such a database at start, before creating anything in it.
/// Regression: `migrate` installed the schema in it, so the deploy step
/// passed and the consumers then refused to start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_cannot_store_unicode_is_refused_at_start() {
    let admin: tokio_postgres::Config = server_url().parse().unwrap();
    let name = unique("latin1");
    client(&admin)
        .await
        .batch_execute(&format!(
            "CREATE DATABASE \"{name}\" ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"
        ))
        .await
        .unwrap();
    let mut db = admin.clone();
    db.dbname(&name);
    let mock = MockCluster::new(1).unwrap();
    let cfg = pipeline_config(&mock.bootstrap_servers(), "latin1_events", db.clone());
    let msg = run_refused(cfg, Duration::from_secs(60), "a LATIN1 database is refused").await;
    assert!(
        msg.contains("LATIN1") && msg.contains("ENCODING 'UTF8'"),
        "{msg}"
    );
    let tables = || async {
        client(&db)
            .await
            .query_one(
                "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    assert_eq!(tables().await, 0, "nothing was created in it");
    let refused = energy_stream::sink::migrate::migrate(&mut client(&db).await)
        .await
        .expect_err("migrate refuses it too");
    assert!(refused.to_string().contains("LATIN1"), "{refused}");
    assert_eq!(tables().await, 0, "migrate created nothing in it");
}

/// Regression: consumers starting together on a fresh database raced to
/// create `schema_migrations` before taking the migration lock, and one died
/// with "duplicate key value violates unique constraint pg_type_typname_nsp_index".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_from_many_starters_at_once_all_succeed() {
    let db = fresh_db("migrace").await;
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let db = db.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = energy_stream::sink::connect(&db).await.unwrap();
            energy_stream::sink::migrate::migrate(&mut c).await
        }));
    }
    let mut applied = 0;
    for t in tasks {
        let report = t.await.unwrap().expect("every concurrent migrate succeeds");
        applied += report.applied.len();
    }
    assert_eq!(
        applied,
        energy_stream::sink::migrate::MIGRATIONS.len(),
        "each migration applied exactly once"
    );
}

/// Regression: Postgres committed a batch and the connection broke before
/// the reply arrived (seen once in CI when `pg_ctl stop -m immediate` landed
/// inside a COMMIT). The retry took the batch's own rows for another
/// consumer's, dropped it as fenced and never counted it. Now the retry asks
/// Postgres first: the batch is counted once, nothing is written twice, and
/// nothing is fetched again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_whose_reply_is_lost_is_counted_once_and_not_rewritten() {
    let cluster = MockCluster::new(1).unwrap();
    let brokers = cluster.bootstrap_servers();
    let topic = unique("lostreply");
    mock_topic(&cluster, &topic, 3);
    let n = 600;
    send_raw(&brokers, &topic, &sample_messages(0..n, 40));

    let db = fresh_db("lostreply").await;
    let mut cfg = pipeline_config(&brokers, &topic, db.clone());
    let group = cfg.kafka.group_id.clone();
    cfg.kpi = Some(energy_stream::kpi::KpiConfig {
        dir: std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("queries"),
        ..Default::default()
    });
    cfg.fault = Some(energy_stream::config::Fault {
        point: energy_stream::config::FaultPoint::LostCommitReply,
        batch: 2,
    });
    let metrics = Metrics::new();
    let summary = run_within(
        cfg,
        metrics.clone(),
        Duration::from_secs(120),
        "caught up within 120 s",
    )
    .await
    .expect("a lost COMMIT reply is retried, not fatal");

    assert_eq!(summary.events_written, n as u64, "every batch counted once");
    let c = client(&db).await;
    let rows = event_rows(&c).await;
    assert_eq!(rows, n as i64);
    let ends = assert_exactly_once_by_position(&c, &group, &topic).await;
    assert_eq!(
        ends.values().sum::<i64>(),
        n as i64,
        "stored offsets are the end"
    );
    let written: u64 = TYPES
        .iter()
        .map(|t| metrics.events_written.with_label_values(&[t]).get())
        .sum();
    assert_eq!(written, n as u64, "the written counter counts it once");
    assert_eq!(
        metrics.db_errors.with_label_values(&["connection"]).get(),
        1,
        "the lost reply was seen as a connection error"
    );
    for why in ["fenced", "rebalance"] {
        assert_eq!(
            metrics.batches_discarded.with_label_values(&[why]).get(),
            0,
            "the landed batch is not discarded as {why}"
        );
    }
    assert_eq!(
        metrics
            .kafka_errors
            .with_label_values(&["redelivered"])
            .get(),
        0,
        "nothing is fetched again"
    );
    verify_ok(&db_url(&db), &[]);
}

/// Regression: when librdkafka cannot read what a partition holds (a corrupt
/// record batch, a codec it lacks), it reports consumption errors and delivers
/// nothing. The partition used to look settled after a few quiet checks, and
/// `run --stop-when-caught-up` stopped and logged "caught up" with the rest of
/// the partition unread. It must wait while the errors last, then read it all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_whose_fetches_fail_is_not_reported_caught_up() {
    let cluster = MockCluster::new(1).unwrap();
    let brokers = cluster.bootstrap_servers();
    let topic = unique("fetcherr");
    mock_topic(&cluster, &topic, 1);
    send_raw(&brokers, &topic, &sample_messages(0..100, 30));
    let db = fresh_db("fetcherr").await;
    let cfg = pipeline_config(&brokers, &topic, db.clone());
    let group = cfg.kafka.group_id.clone();
    assert_eq!(run_to_end(cfg.clone()).await.events_written, 100);

    // The second run resumes at offset 100 and its first fetches all fail
    // (each fetch takes one error; librdkafka waits 500 ms after each).
    send_raw(&brokers, &topic, &sample_messages(100..200, 30));
    cluster.request_errors(
        RDKafkaApiKey::Fetch,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_MSG; 16],
    );
    let metrics = Metrics::new();
    let summary = run_within(
        cfg,
        metrics.clone(),
        Duration::from_secs(120),
        "caught up within 120 s",
    )
    .await
    .expect("consumption errors are waited out, not fatal");

    assert!(
        metrics.kafka_errors.with_label_values(&["consume"]).get() > 0,
        "the fetch errors reached the consumer"
    );
    assert_eq!(
        summary.events_written, 100,
        "the run read what the failing fetches held back before it stopped"
    );
    let c = client(&db).await;
    let ends = assert_exactly_once_by_position(&c, &group, &topic).await;
    assert_eq!(
        ends.values().sum::<i64>(),
        200,
        "stored offsets are the end"
    );
}

/// A second topic loaded into a database that already holds another topic's
/// rows. Regression: where the rows collided (same partitions, same offsets)
/// that was taken for a fenced batch and retried forever; where they did not
/// (partitions or offsets the first topic had not reached), the two topics
/// mixed in `events` for good, with no way to tell them apart. Now a second
/// topic is refused at start; and rows left without their offsets (a start
/// over that kept `events`) are refused at the first batch, not retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_another_topic_wrote_are_refused_not_retried_forever() {
    let cluster = MockCluster::new(1).unwrap();
    let brokers = cluster.bootstrap_servers();
    let messages = sample_messages(0..100, 30);
    let first_topic = unique("first_topic");
    let second_topic = unique("second_topic");
    for topic in [&first_topic, &second_topic] {
        mock_topic(&cluster, topic, 2);
        send_raw(&brokers, topic, &messages);
    }
    let db = fresh_db("two_topics").await;
    let cfg = pipeline_config(&brokers, &first_topic, db.clone());
    assert_eq!(run_to_end(cfg).await.events_written, 100);

    let c = client(&db).await;
    let second = || pipeline_config(&brokers, &second_topic, db.clone());
    let msg = run_refused(
        second(),
        Duration::from_secs(60),
        "a second topic is an error",
    )
    .await;
    assert!(
        msg.contains(&format!("already holds the events of topic {first_topic}"))
            && msg.contains(&format!("cannot take topic {second_topic}"))
            && msg.contains("One database holds one topic"),
        "{msg}"
    );
    assert_eq!(
        event_rows(&c).await,
        100,
        "nothing of the second topic written"
    );

    // The first topic's offsets removed, its rows kept.
    c.execute("DELETE FROM consumer_offsets", &[])
        .await
        .unwrap();
    let msg = run_refused(
        second(),
        Duration::from_secs(60),
        "rows another topic wrote are an error",
    )
    .await;
    assert!(
        msg.contains("another consumer group, or another topic")
            && msg.contains(&second_topic)
            && msg.contains("consumer_offsets")
            && msg.contains("Starting a topic over"),
        "{msg}"
    );
    assert_eq!(event_rows(&c).await, 100, "nothing written twice");
    let groups = counts(
        &c,
        "SELECT group_id, sum(next_offset)::bigint FROM consumer_offsets GROUP BY 1",
    )
    .await;
    assert!(groups.is_empty(), "no offsets stored: {groups:?}");
}

/// Regression: the start-up check that a database holds one topic reads
/// `consumer_offsets` and holds nothing, so two runs of different topics
/// started together on a fresh database both passed it, and both committed
/// where their rows did not collide: two topics mixed in `events`, and every
/// later start of either was refused. A run's first batch now checks again
/// under an advisory lock. The test holds both first batches at their
/// offsets (a SHARE lock on `consumer_offsets`) so that both have passed
/// the start-up check, then lets them go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_topics_started_together_do_not_both_get_in() {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let cluster = MockCluster::new(1).unwrap();
    let brokers = cluster.bootstrap_servers();
    // Rows that do not collide: topic a fills partition 0, topic b partition 1.
    let (a, b) = (unique("race_a"), unique("race_b"));
    mock_topic(&cluster, &a, 1);
    mock_topic(&cluster, &b, 2);
    let producer: BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .unwrap();
    for (topic, partition) in [(&a, 0), (&b, 1)] {
        for m in sample_messages(0..50, 10).into_iter().flatten() {
            producer
                .send(
                    BaseRecord::<(), _>::to(topic)
                        .partition(partition)
                        .payload(&m),
                )
                .unwrap();
        }
    }
    producer.flush(Duration::from_secs(10)).unwrap();
    let db = fresh_db("race_topics").await;
    energy_stream::sink::migrate::migrate(&mut client(&db).await)
        .await
        .unwrap();

    let held = client(&db).await;
    held.batch_execute("BEGIN; LOCK TABLE consumer_offsets IN SHARE MODE")
        .await
        .unwrap();
    let runs: Vec<_> = [&a, &b]
        .into_iter()
        .map(|topic| {
            let cfg = pipeline_config(&brokers, topic, db.clone());
            tokio::spawn(pipeline::run(cfg, Metrics::new(), std::future::pending()))
        })
        .collect();
    // Both first batches wait: on the offsets' table, or (with the fix) one
    // of them on the advisory lock the other holds.
    let c = client(&db).await;
    let waiting = || async {
        c.query_one(
            "SELECT count(DISTINCT pid) FROM pg_locks WHERE NOT granted \
             AND (locktype = 'advisory' OR relation = 'consumer_offsets'::regclass)",
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while waiting().await < 2 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let both_waited = waiting().await >= 2;
    held.batch_execute("COMMIT").await.unwrap();
    let mut outcomes = Vec::new();
    for run in runs {
        outcomes.push(
            tokio::time::timeout(Duration::from_secs(60), run)
                .await
                .expect("each run ends")
                .unwrap(),
        );
    }
    assert!(both_waited, "both first batches were held at their offsets");
    let topics = texts(&c, "SELECT DISTINCT topic FROM consumer_offsets", &[]).await;
    assert_eq!(topics.len(), 1, "one topic in the database: {topics:?}");
    assert_eq!(event_rows(&c).await, 50, "{outcomes:?}");
    let refused: Vec<String> = outcomes
        .iter()
        .filter_map(|o| o.as_ref().err().map(|e| e.to_string()))
        .collect();
    assert_eq!(refused.len(), 1, "{outcomes:?}");
    assert!(refused[0].contains("cannot take topic"), "{}", refused[0]);
}

/// Regression: a KPI file edited back and forth in a directory two consumers
/// share stopped one of them for good: the other had installed a version
/// the files no longer held, and by the time this one re-read its files they
/// matched what it ran, so it stopped as if they differed. It now waits a
/// few watch intervals for the other consumer's watch to install the files'
/// version again, and goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kpi_edited_back_and_forth_does_not_stop_a_consumer() {
    let cluster = MockCluster::new(1).unwrap();
    let brokers = cluster.bootstrap_servers();
    let topic = unique("events");
    mock_topic(&cluster, &topic, 2);
    send_raw(&brokers, &topic, &sample_messages(0..300, 40));
    let v1 = kpi_dir(&[(
        "by_type.sql",
        "SELECT event_type, count(*) AS n FROM events GROUP BY event_type",
    )]);
    let v2 = kpi_dir(&[(
        "by_type.sql",
        "SELECT event_type, count(*) AS n, count(session_id) AS sessions FROM events GROUP BY event_type",
    )]);
    let db = fresh_db("flipflop").await;
    let mut cfg = pipeline_config(&brokers, &topic, db.clone());
    cfg.kpi = Some(v1.clone());
    cfg.kpi_watch = Some(Duration::from_secs(1));
    cfg.stop_when_caught_up = false;
    let metrics = Metrics::new();
    let running = Running::spawn(cfg, metrics.clone());
    wait_until(
        &db,
        "SELECT count(*) = 300 FROM events",
        "the first 300 events",
    )
    .await;

    // The other consumer, which read the files while they said v2.
    let mut other = client(&db).await;
    let engine_v2 = energy_stream::kpi::KpiEngine::load_dir(&v2).await.unwrap();
    energy_stream::kpi::install(&mut other, &engine_v2)
        .await
        .unwrap();
    send_raw(&brokers, &topic, &sample_messages(300..600, 40));
    let refused = || {
        metrics
            .batches_discarded
            .with_label_values(&["kpis_changed"])
            .get()
    };
    if !counted(refused, 1).await {
        fail(
            running,
            "the batch was not refused for the other definition".into(),
        )
        .await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !running.is_finished(),
        "the consumer stopped instead of waiting"
    );

    // Its watch saw the files say v1 again, and installs them.
    let engine_v1 = energy_stream::kpi::KpiEngine::load_dir(&v1).await.unwrap();
    energy_stream::kpi::install(&mut other, &engine_v1)
        .await
        .unwrap();
    wait_until(
        &db,
        "SELECT count(*) = 600 FROM events",
        "the next 300 events",
    )
    .await;
    let summary = running.stop().await;
    assert_eq!(summary.events_written, 600);
    // Regression: the hand-over counted as db_errors_total{kind="fatal"},
    // so every KPI rollout showed on the ops dashboard as a fatal error.
    assert_eq!(metrics.db_errors.with_label_values(&["fatal"]).get(), 0);
    assert_eq!(
        energy_stream::kpi::verify(&mut other, &engine_v1, None)
            .await
            .unwrap(),
        vec![]
    );
}

/// Consumers of one database must compute the same KPIs. A consumer started
/// before another one installed a new KPI file used to go on committing its
/// batches without that KPI, which then stayed short for good (`verify`
/// failed). Now its next batch is refused and it stops; so does a start with
/// the old files; `migrate` retiring the KPI lets the old files run again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_without_a_kpi_another_installed_stops_instead_of_leaving_it_short() {
    let cluster = MockCluster::new(1).unwrap();
    let brokers = cluster.bootstrap_servers();
    let topic = unique("events");
    mock_topic(&cluster, &topic, 2);
    send_raw(&brokers, &topic, &sample_messages(0..300, 40));

    let by_type = (
        "by_type.sql",
        "SELECT event_type, count(*) AS n FROM events GROUP BY event_type",
    );
    let by_channel = (
        "by_channel.sql",
        "SELECT channel, count(DISTINCT customer_id) AS customers FROM events GROUP BY channel",
    );
    let old = kpi_dir(&[by_type]);
    let new = kpi_dir(&[by_type, by_channel]);

    let db = fresh_db("kpiset").await;
    let c = client(&db).await;
    let mut cfg = pipeline_config(&brokers, &topic, db.clone());
    cfg.kpi = Some(old.clone());
    cfg.stop_when_caught_up = false;
    let group = cfg.kafka.group_id.clone();
    let running = tokio::spawn(pipeline::run(cfg, Metrics::new(), std::future::pending()));
    wait_until(
        &db,
        "SELECT count(*) = 300 FROM events",
        "first 300 events stored",
    )
    .await;

    // Another consumer starts with the new file and installs it.
    let engine = energy_stream::kpi::KpiEngine::load_dir(&new).await.unwrap();
    let mut other = client(&db).await;
    energy_stream::kpi::install(&mut other, &engine)
        .await
        .unwrap();
    send_raw(&brokers, &topic, &sample_messages(300..600, 40));
    let err = tokio::time::timeout(Duration::from_secs(60), running)
        .await
        .expect("the consumer with the old files stops")
        .unwrap()
        .expect_err("its batch is refused");
    assert!(
        err.to_string().contains("by_channel (not computed here)"),
        "{err}"
    );
    assert_eq!(
        event_rows(&c).await,
        300,
        "nothing committed without by_channel"
    );

    // Started again with the old files, or from a stray directory: refused
    // before reading anything, and before changing the registry (a stray
    // file's KPI, installed first, stopped the consumers that ran the right
    // files).
    let registry = || async {
        texts(
            &c,
            "SELECT name || ' ' || sql_hash FROM kpi_registry ORDER BY name",
            &[],
        )
        .await
    };
    let before = registry().await;
    let stray = kpi_dir(&[(
        "zz_stray.sql",
        "SELECT channel, count(*) AS n FROM events GROUP BY channel",
    )]);
    for (files, lacks) in [(&old, "by_channel"), (&stray, "by_type")] {
        let mut cfg = pipeline_config(&brokers, &topic, db.clone());
        cfg.kafka.group_id = group.clone();
        cfg.kpi = Some(files.clone());
        let err = run_refused(cfg, Duration::from_secs(60), "wrong files refused at start").await;
        assert!(
            err.contains(&format!("{lacks} (not computed here)")),
            "{err}"
        );
        assert_eq!(registry().await, before, "the registry is as it was");
    }
    let stray_tables: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_class WHERE relname LIKE '%zz_stray%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stray_tables, 0, "nothing of the stray file was created");

    // With the new files it catches up, and every KPI equals its recomputation.
    let mut cfg = pipeline_config(&brokers, &topic, db.clone());
    cfg.kafka.group_id = group.clone();
    cfg.kpi = Some(new.clone());
    let summary = run_to_end(cfg).await;
    assert_eq!(summary.events_written, 300);
    let new_dir = new.dir.to_str().unwrap();
    verify_ok(&db_url(&db), &["--queries-dir", new_dir]);

    // `migrate` with by_channel's file deleted retires it; the old files run.
    let engine = energy_stream::kpi::KpiEngine::load_dir(&old).await.unwrap();
    let retired = energy_stream::kpi::retire_missing(&other, &engine)
        .await
        .unwrap();
    assert_eq!(retired, vec!["by_channel".to_string()]);
    send_raw(&brokers, &topic, &sample_messages(600..700, 40));
    let mut cfg = pipeline_config(&brokers, &topic, db.clone());
    cfg.kafka.group_id = group;
    cfg.kpi = Some(old.clone());
    assert_eq!(run_to_end(cfg).await.events_written, 100);
    verify_ok(&db_url(&db), &["--queries-dir", old.dir.to_str().unwrap()]);
}

/// KPI files added, broken, changed and deleted while `run` runs are picked
/// up without a restart (issue 3's stretch goal): the pipeline commits its
/// in-flight batches and starts again in-process with the new files. A new
/// KPI is backfilled from the stored events, a changed one rebuilt, a
/// deleted one retired; a file that does not load is logged and changes
/// nothing. Before, files were read at start only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kpi_files_changed_while_running_are_picked_up() {
    let cluster = MockCluster::new(1).unwrap();
    let brokers = cluster.bootstrap_servers();
    let topic = unique("events");
    mock_topic(&cluster, &topic, 2);
    send_raw(&brokers, &topic, &sample_messages(0..300, 40));

    let kpi_cfg = kpi_dir(&[(
        "by_type.sql",
        "SELECT event_type, count(*) AS n FROM events GROUP BY event_type",
    )]);
    let dir = kpi_cfg.dir.clone();
    let write = |name: &str, sql: &str| std::fs::write(dir.join(name), sql).unwrap();

    let db = fresh_db("watch").await;
    let c = client(&db).await;
    let mut cfg = pipeline_config(&brokers, &topic, db.clone());
    cfg.kpi = Some(kpi_cfg);
    cfg.kpi_watch = Some(Duration::from_millis(200));
    cfg.stop_when_caught_up = false;
    let running = Running::spawn(cfg, Metrics::new());
    wait_until(&db, "SELECT count(*) = 300 FROM events", "300 events").await;

    // Added: backfilled from the 300 stored events, then kept up to date.
    write(
        "by_channel.sql",
        "SELECT channel, count(*) AS n, count(DISTINCT customer_id) AS customers FROM events GROUP BY channel",
    );
    wait_until(
        &db,
        "SELECT sum(n) = 300 FROM by_channel",
        "by_channel backfilled",
    )
    .await;
    send_raw(&brokers, &topic, &sample_messages(300..600, 40));
    wait_until(
        &db,
        "SELECT sum(n) = 600 FROM by_channel",
        "by_channel kept up",
    )
    .await;

    // Broken: logged; the running KPIs go on.
    write("broken.sql", "SELECT nonsense FROM");
    tokio::time::sleep(Duration::from_secs(1)).await;
    send_raw(&brokers, &topic, &sample_messages(600..700, 40));
    wait_until(
        &db,
        "SELECT sum(n) = 700 FROM by_channel",
        "past a broken file",
    )
    .await;

    // Changed and deleted at once (the broken file too).
    std::fs::remove_file(dir.join("broken.sql")).unwrap();
    std::fs::remove_file(dir.join("by_channel.sql")).unwrap();
    write(
        "by_type.sql",
        "SELECT event_type, count(*) AS n, count(DISTINCT customer_id) AS customers FROM events GROUP BY event_type",
    );
    wait_until(
        &db,
        "SELECT sql_hash = 'retired' FROM kpi_registry WHERE name = 'by_channel'",
        "by_channel retired",
    )
    .await;
    send_raw(&brokers, &topic, &sample_messages(700..800, 40));
    wait_until(
        &db,
        "SELECT sum(n) = 800 FROM by_type",
        "all 800 in by_type",
    )
    .await;
    let frozen: i64 = c
        .query_one("SELECT sum(n)::bigint FROM by_channel", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(frozen, 700, "a retired KPI is kept, no longer updated");

    let summary = running.stop().await;
    assert_eq!(
        summary.events_written, 800,
        "the summary covers every restart"
    );
    assert_eq!(event_rows(&c).await, 800);
    let customers: i64 = c
        .query_one("SELECT sum(customers)::bigint FROM by_type", &[])
        .await
        .unwrap()
        .get(0);
    assert!(customers > 0, "by_type rebuilt with its new column");
    verify_ok(&db_url(&db), &["--queries-dir", dir.to_str().unwrap()]);
}

/// The app role may not create tables, so a KPI file added while it runs
/// cannot be installed by the consumer: it says so and goes on with the
/// KPIs it had. Once the owner has run `migrate` with the file, the
/// consumer's next batch finds the new KPI installed and starts again with
/// it, from the stored offsets, so the KPI misses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kpi_file_the_app_role_cannot_install_waits_for_migrate() {
    let (_, [(_, owner_cfg), (app, app_cfg)]) = db_with_roles(["owner", "app"]).await;

    let kpi_cfg = kpi_dir(&[(
        "by_type.sql",
        "SELECT event_type, count(*) AS n FROM events GROUP BY event_type",
    )]);
    let dir = kpi_cfg.dir.clone();
    // `energy-stream migrate --grant-app`, as the owner.
    let migrate = async || {
        let mut c = client(&owner_cfg).await;
        energy_stream::sink::migrate::migrate(&mut c).await.unwrap();
        let engine = energy_stream::kpi::KpiEngine::load_dir(&kpi_cfg)
            .await
            .unwrap();
        energy_stream::kpi::install(&mut c, &engine).await.unwrap();
        energy_stream::sink::migrate::grant(&c, Some(&app), None)
            .await
            .unwrap();
    };
    migrate().await;

    let cluster = MockCluster::new(1).unwrap();
    let brokers = cluster.bootstrap_servers();
    let topic = unique("events");
    mock_topic(&cluster, &topic, 2);
    send_raw(&brokers, &topic, &sample_messages(0..200, 40));
    let name = unique("app_watch");
    let mut named = app_cfg;
    named.application_name(&name);
    let mut cfg = pipeline_config(&brokers, &topic, named);
    cfg.kpi = Some(kpi_cfg.clone());
    cfg.kpi_watch = Some(Duration::from_millis(200));
    cfg.stop_when_caught_up = false;
    let running = Running::spawn(cfg, Metrics::new());
    let c = client(&owner_cfg).await;
    wait_until(&owner_cfg, "SELECT sum(n) = 200 FROM by_type", "200 events").await;
    // A restart opens new connections: the pids tell whether it restarted.
    let backends = async || -> Vec<i32> {
        c.query_one(
            "SELECT coalesce(array_agg(pid ORDER BY pid), '{}') FROM pg_stat_activity \
             WHERE application_name = $1",
            &[&name],
        )
        .await
        .unwrap()
        .get(0)
    };
    let before = backends().await;
    assert!(!before.is_empty(), "the pipeline's connections are seen");

    std::fs::write(
        dir.join("by_channel.sql"),
        "SELECT channel, count(*) AS n FROM events GROUP BY channel",
    )
    .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    send_raw(&brokers, &topic, &sample_messages(200..400, 40));
    wait_until(
        &owner_cfg,
        "SELECT sum(n) = 400 FROM by_type",
        "the old KPIs go on",
    )
    .await;
    assert!(
        !running.is_finished(),
        "the consumer carries on without the file it may not install"
    );
    // Regression: it stopped and started again (a rebalance) for a file it
    // could not install, then went back to the KPIs it had.
    assert_eq!(
        backends().await,
        before,
        "the consumer is not restarted for files it cannot install"
    );
    let installed: bool = c
        .query_one("SELECT to_regclass('by_channel') IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!installed);

    // The owner installs it; the consumer picks it up at its next batch.
    migrate().await;
    send_raw(&brokers, &topic, &sample_messages(400..500, 40));
    wait_until(
        &owner_cfg,
        "SELECT sum(n) = 500 FROM by_channel",
        "by_channel kept up",
    )
    .await;
    wait_until(
        &owner_cfg,
        "SELECT sum(n) = 500 FROM by_type",
        "by_type kept up",
    )
    .await;

    let summary = running.stop().await;
    assert_eq!(summary.events_written, 500);
    verify_ok(
        &db_url_with_password(&owner_cfg),
        &["--queries-dir", dir.to_str().unwrap()],
    );
}

/// Holds an exclusive lock on `table` in an open transaction until dropped,
/// as a `VACUUM FULL`, a long migration or an operator's `LOCK TABLE` would.
struct TableLock {
    _client: tokio_postgres::Client,
}

impl TableLock {
    async fn take(db: &tokio_postgres::Config, table: &str) -> TableLock {
        let c = client(db).await;
        c.batch_execute(&format!(
            "BEGIN; LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"
        ))
        .await
        .unwrap();
        TableLock { _client: c }
    }
}

/// Waits until a backend of `application_name` waits for a lock; returns its pid.
async fn backend_waiting_for_lock(db: &tokio_postgres::Config, application_name: &str) -> i32 {
    let c = client(db).await;
    for _ in 0..300 {
        let row = c
            .query_opt(
                "SELECT pid FROM pg_stat_activity \
                 WHERE application_name = $1 AND wait_event_type = 'Lock'",
                &[&application_name],
            )
            .await
            .unwrap();
        if let Some(row) = row {
            return row.get(0);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no backend of {application_name} waited for the lock within 30 s");
}

/// A pipeline on a 2-partition MockCluster topic holding `messages`, over a
/// fresh migrated database. The pipeline's connections carry their own
/// `application_name`, so that the test finds its backends in
/// `pg_stat_activity`; `db`, for the test's own connections, does not.
struct Named {
    _cluster: MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    db: tokio_postgres::Config,
    name: String,
    cfg: PipelineConfig,
}

impl Named {
    async fn new(prefix: &str, messages: &[Option<Vec<u8>>]) -> Named {
        Named::with_partitions(prefix, 2, messages).await
    }

    async fn with_partitions(prefix: &str, partitions: i32, messages: &[Option<Vec<u8>>]) -> Named {
        let cluster = MockCluster::new(1).unwrap();
        let brokers = cluster.bootstrap_servers();
        let topic = unique("events");
        mock_topic(&cluster, &topic, partitions);
        send_raw(&brokers, &topic, messages);
        let db = fresh_db(prefix).await;
        energy_stream::sink::migrate::migrate(&mut client(&db).await)
            .await
            .unwrap();
        let name = unique(prefix);
        let mut named = db.clone();
        named.application_name(&name);
        let cfg = pipeline_config(&brokers, &topic, named);
        Named {
            _cluster: cluster,
            db,
            name,
            cfg,
        }
    }
}

/// A pipeline that keeps running on a [`Named`] database, once it has stored
/// the first 200 sample messages.
struct Live {
    _cluster: MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    db: tokio_postgres::Config,
    name: String,
    brokers: String,
    topic: String,
    metrics: std::sync::Arc<Metrics>,
    running: Running,
}

impl Live {
    async fn start(prefix: &str) -> Live {
        let Named {
            _cluster,
            db,
            name,
            mut cfg,
        } = Named::new(prefix, &sample_messages(0..200, 20)).await;
        cfg.stop_when_caught_up = false;
        let (brokers, topic) = (cfg.kafka.brokers.clone(), cfg.kafka.topic.clone());
        let metrics = Metrics::new();
        let running = Running::spawn(cfg, metrics.clone());
        wait_until(
            &db,
            "SELECT count(*) = 200 FROM events",
            "the first 200 events",
        )
        .await;
        Live {
            _cluster,
            db,
            name,
            brokers,
            topic,
            metrics,
            running,
        }
    }
}

/// `ALTER DATABASE <db's> <setting>`: what every later connection to it reads.
async fn alter_database(c: &tokio_postgres::Client, db: &tokio_postgres::Config, setting: &str) {
    let name = db.get_dbname().unwrap();
    c.batch_execute(&format!("ALTER DATABASE \"{name}\" {setting}"))
        .await
        .unwrap();
}

/// Regression: start-up work (migrations, the group check, KPI backfills)
/// ignored SIGTERM, so a lock held on one of its tables kept `run` alive for
/// as long as the lock lasted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_during_start_up_ends_at_once() {
    let Named {
        _cluster,
        db,
        name,
        mut cfg,
    } = Named::new("startup_stop", &sample_messages(0..100, 10)).await;
    let lock = TableLock::take(&db, "consumer_offsets").await;

    cfg.stop_when_caught_up = false;
    let running = Running::spawn(cfg, Metrics::new());
    backend_waiting_for_lock(&db, &name).await;
    // The lock is still held: only the shutdown can end the run now.
    let summary = tokio::time::timeout(Duration::from_secs(20), running.stop())
        .await
        .expect("run ends within 20 s of the shutdown while its start-up waits for a lock");
    assert_eq!(summary.events_written, 0);
    drop(lock);
    assert_eq!(event_rows(&client(&db).await).await, 0);
}

/// Regression: Postgres going away during start-up (here the connection is
/// terminated while the group check waits for a lock; a restart does the
/// same) ended `run` with "postgres unavailable" instead of retrying.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_lost_during_start_up_is_retried() {
    let Named {
        _cluster,
        db,
        name,
        cfg,
    } = Named::new("startup_lost", &sample_messages(0..300, 20)).await;
    let lock = TableLock::take(&db, "consumer_offsets").await;

    let metrics = Metrics::new();
    let run = tokio::spawn(run_within(
        cfg,
        metrics.clone(),
        Duration::from_secs(120),
        "pipeline caught up within 120 s",
    ));
    let pid = backend_waiting_for_lock(&db, &name).await;
    let c = client(&db).await;
    c.execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    // It comes back on a new connection and waits for the lock again.
    let again = backend_waiting_for_lock(&db, &name).await;
    assert_ne!(again, pid);
    drop(lock);

    let summary = run.await.unwrap().expect("start-up retried, not fatal");
    assert_eq!(summary.events_written, 300);
    assert_eq!(event_rows(&c).await, 300);
    assert!(
        metrics.db_errors.with_label_values(&["shutdown"]).get() >= 1,
        "the lost connection is counted as a database error"
    );
}

/// Regression: a connection Postgres closed while the pipeline idled (a
/// restart, an operator's `pg_terminate_backend`, a proxy's idle timeout)
/// was reopened at the next batch without a trace in `db_errors_total`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_closed_while_idle_is_counted_and_reopened() {
    let Live {
        _cluster,
        db,
        name,
        brokers,
        topic,
        metrics,
        running,
    } = Live::start("idle_closed").await;
    let connection_errors = || {
        metrics
            .db_errors
            .with_label_values(&[energy_stream::telemetry::DB_IDLE_CLOSED])
            .get()
    };
    let before = connection_errors();

    let c = client(&db).await;
    let closed: i64 = c
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE application_name = $1 AND state = 'idle'",
            &[&name],
        )
        .await
        .unwrap()
        .get(0);
    assert!(closed >= 1, "the pipeline holds an idle connection");
    send_raw(&brokers, &topic, &sample_messages(200..400, 20));
    wait_until(
        &db,
        "SELECT count(*) = 400 FROM events",
        "the next 200 events",
    )
    .await;

    assert!(
        connection_errors() > before,
        "the closed connection is counted as a database error"
    );
    let summary = running.stop().await;
    assert_eq!(summary.events_written, 400);
}

/// Polls `sql` (a boolean) on `c` for up to 60 s.
async fn poll_true(c: &tokio_postgres::Client, sql: &str) -> bool {
    for _ in 0..600 {
        if c.query_one(sql, &[]).await.unwrap().get::<_, bool>(0) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// Waits up to 60 s for `counter` to reach `at_least`.
async fn counted(counter: impl Fn() -> u64, at_least: u64) -> bool {
    for _ in 0..600 {
        if counter() >= at_least {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// Whether the pipeline serving `addr` answers `/readyz` with 200 (not
/// listening yet counts as not ready).
fn ready(addr: &str) -> bool {
    std::net::TcpStream::connect(addr).is_ok()
        && http_get(addr, "/readyz").starts_with("HTTP/1.0 200")
}

/// Polls `cond` every 100 ms; panics with `what` when it is still false
/// after `secs`.
async fn within(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..secs * 10 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what} (within {secs} s)");
}

/// Stops a pipeline that may be stuck retrying before failing the test, so
/// that the failure is reported instead of waiting on the pipeline's tasks.
async fn fail(running: Running, why: String) -> ! {
    let _ = running.stop_result().await;
    panic!("{why}");
}

/// Regression: with every connection slot taken, the error was Postgres'
/// text alone ("too many connections for role"), without what to raise or
/// how many connections a consumer holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_connection_slot_left_says_what_to_raise() {
    let db = fresh_db("no_slot").await;
    let c = client(&db).await;
    let role = unique("capped").replace('-', "_");
    c.batch_execute(&format!("CREATE ROLE {role} LOGIN CONNECTION LIMIT 0"))
        .await
        .unwrap();
    let mut capped = db.clone();
    capped.user(&role);
    let e = energy_stream::sink::Database::new(capped)
        .connect()
        .await
        .expect_err("the role may not connect");
    let text = e.to_string();
    assert_eq!(e.kind(), "resources", "{text}");
    assert!(
        text.contains("too many connections for role")
            && text.contains("CONNECTION LIMIT")
            && text.contains("up to four"),
        "{text}"
    );
    c.batch_execute(&format!("DROP ROLE {role}")).await.unwrap();
}

/// Regression: a `statement_timeout` set for the database, and lifted again,
/// failed every retry until someone killed the pipeline's connections: the
/// retries ran on the connections that had read the setting when they
/// opened. And the cancellations were counted as kind "shutdown".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_timeout_lifted_is_left_behind_by_the_retry() {
    let Live {
        _cluster,
        db,
        name,
        brokers,
        topic,
        metrics,
        running,
    } = Live::start("stmt_timeout").await;

    // Both opened before the setting, so it does not reach them.
    let c = client(&db).await;
    let lock = client(&db).await;
    alter_database(&c, &db, "SET statement_timeout = '1ms'").await;
    c.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
        &[&name],
    )
    .await
    .unwrap();
    // Every batch locks the offset rows: held here, each attempt waits, and
    // one that read the setting is cancelled.
    lock.batch_execute("BEGIN; SELECT * FROM consumer_offsets FOR UPDATE")
        .await
        .unwrap();
    send_raw(&brokers, &topic, &sample_messages(200..400, 20));
    let canceled = || metrics.db_errors.with_label_values(&["canceled"]).get();
    if !counted(canceled, 2).await {
        fail(
            running,
            format!("{} cancellations counted as kind canceled", canceled()),
        )
        .await;
    }

    alter_database(&c, &db, "RESET statement_timeout").await;
    // A retry on a new connection waits on the lock as any batch would; one
    // on an old connection is cancelled again after 1 ms.
    let waits = format!(
        "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE application_name = '{name}' \
         AND wait_event_type = 'Lock' AND now() - query_start > interval '500 ms')"
    );
    if !poll_true(&c, &waits).await {
        fail(
            running,
            "no retry waited on the lock: the retries kept the connections that read \
             statement_timeout"
                .into(),
        )
        .await;
    }
    lock.batch_execute("COMMIT").await.unwrap();
    wait_until(
        &db,
        "SELECT count(*) = 400 FROM events",
        "the next 200 events",
    )
    .await;
    let summary = running.stop().await;
    assert_eq!(summary.events_written, 400);
}

/// Regression: while Postgres refused writes (`default_transaction_read_only`
/// set for the database), each retry was counted twice: as `read_only`, and,
/// since the refusal closed the connection after the retry had let go of
/// it, as an idle connection closed, with a warning that said so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_spell_counts_each_retry_once() {
    let Live {
        _cluster,
        db,
        name,
        brokers,
        topic,
        metrics,
        running,
    } = Live::start("ro_spell").await;

    let c = client(&db).await;
    alter_database(&c, &db, "SET default_transaction_read_only = on").await;
    let closed: i64 = c
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1",
            &[&name],
        )
        .await
        .unwrap()
        .get(0);
    let idle_closed = || {
        metrics
            .db_errors
            .with_label_values(&[energy_stream::telemetry::DB_IDLE_CLOSED])
            .get()
    };
    let before = idle_closed();
    send_raw(&brokers, &topic, &sample_messages(200..400, 20));
    let read_only = || metrics.db_errors.with_label_values(&["read_only"]).get();
    if !counted(read_only, 6).await {
        fail(running, format!("{} read-only refusals", read_only())).await;
    }
    alter_database(&c, &db, "RESET default_transaction_read_only").await;
    wait_until(
        &db,
        "SELECT count(*) = 400 FROM events",
        "the next 200 events",
    )
    .await;
    let summary = running.stop().await;
    assert_eq!(summary.events_written, 400);
    assert!(
        idle_closed() - before <= closed as u64,
        "{} idle connections closed counted for the {closed} the test closed, over {} read-only retries",
        idle_closed() - before,
        read_only()
    );
}

/// Regression: a read-only Postgres at start (a standby the URL points at
/// during a failover, or a database set read-only) ended `run` with
/// "postgres unavailable (query)", where a batch would have retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_postgres_at_start_is_waited_for() {
    let cluster = MockCluster::new(1).unwrap();
    let brokers = cluster.bootstrap_servers();
    let topic = unique("events");
    mock_topic(&cluster, &topic, 2);
    send_raw(&brokers, &topic, &sample_messages(0..200, 10));
    let db = fresh_db("read_only").await;
    let c = client(&db).await;
    alter_database(&c, &db, "SET default_transaction_read_only = on").await;

    let metrics = Metrics::new();
    let run = tokio::spawn(run_within(
        pipeline_config(&brokers, &topic, db.clone()),
        metrics.clone(),
        Duration::from_secs(120),
        "pipeline caught up within 120 s",
    ));
    let refused = || metrics.db_errors.with_label_values(&["read_only"]).get();
    for _ in 0..300 {
        if refused() >= 1 || run.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !run.is_finished(),
        "run ended while Postgres was read-only: {:?}",
        run.await
    );
    assert!(refused() >= 1, "the refusals are counted as read_only");
    alter_database(&c, &db, "RESET default_transaction_read_only").await;

    let summary = run.await.unwrap().expect("start-up retried, not fatal");
    assert_eq!(summary.events_written, 200);
    assert_eq!(event_rows(&c).await, 200);
}

/// Regression: an offset stored in Postgres past the end of its partition
/// (the topic deleted and created again) counted as caught up, and every
/// message of the new log below it was dropped as already written, without
/// a word. Now the run stops with an error that says what happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_offset_past_the_end_of_the_topic_stops_the_run() {
    let Named {
        _cluster,
        db,
        name: _,
        cfg,
    } = Named::new("past_end", &sample_messages(0..100, 10)).await;
    let c = client(&db).await;
    c.execute(
        "INSERT INTO consumer_offsets (group_id, topic, kafka_partition, next_offset) VALUES ($1, $2, 0, 5000)",
        &[&cfg.kafka.group_id, &cfg.kafka.topic],
    )
    .await
    .unwrap();

    let msg = run_refused(
        cfg,
        Duration::from_secs(120),
        "an offset past the end is not taken as caught up",
    )
    .await;
    assert!(msg.contains("partition 0"), "{msg}");
    assert!(msg.contains("stored in Postgres is 5000"), "{msg}");
    assert!(msg.contains("deleted and created again"), "{msg}");
    let stored: i64 = c
        .query_one(
            "SELECT next_offset FROM consumer_offsets WHERE kafka_partition = 0",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, 5000, "the stored offset is left as it was");
}

/// Regression: a topic deleted and created again (or a broker that lost its
/// log) whose new log had grown past the stored offsets had its first
/// messages skipped as already written, silently: only a stored offset past
/// the end was caught. Now the message before each stored offset is compared
/// with the last one consumed, as stored beside the offset. Here the log is
/// the same and what is stored is changed, which the comparison cannot tell
/// apart from a new log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_that_is_not_the_one_written_stops_the_run() {
    let Named {
        _cluster,
        db,
        name: _,
        cfg,
    } = Named::new("other_log", &sample_messages(0..100, 10)).await;
    // Resuming the same log compares and reads on.
    assert_eq!(run_to_end(cfg.clone()).await.events_written, 100);
    send_raw(
        &cfg.kafka.brokers,
        &cfg.kafka.topic,
        &sample_messages(100..150, 10),
    );
    assert_eq!(run_to_end(cfg.clone()).await.events_written, 50);

    let c = client(&db).await;
    let changed = c
        .execute(
            "UPDATE consumer_offsets SET last_fingerprint = last_fingerprint + 1 WHERE kafka_partition = 1",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(changed, 1);
    send_raw(
        &cfg.kafka.brokers,
        &cfg.kafka.topic,
        &sample_messages(150..200, 10),
    );
    let before = counts(
        &c,
        "SELECT kafka_partition::text, next_offset FROM consumer_offsets",
    )
    .await;

    let msg = run_refused(cfg, Duration::from_secs(120), "another log is not read on").await;
    assert!(msg.contains("partition 1 of"), "{msg}");
    assert!(msg.contains("is not the one written to Postgres"), "{msg}");
    assert!(msg.contains("Starting a topic over"), "{msg}");
    let after = counts(
        &c,
        "SELECT kafka_partition::text, next_offset FROM consumer_offsets",
    )
    .await;
    assert_eq!(after["1"], before["1"], "nothing of partition 1 is written");
    let rows: i64 = c
        .query_one("SELECT count(*) FROM events WHERE kafka_partition = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, before["1"], "partition 1 holds what it held");
}

/// Regression: a batch whose COPY waited behind a lock was given up after the
/// database timeout, but its backend went on waiting, since the connection
/// stayed open while a reply was owed. Each retry left one more, until
/// `max_connections` would run out for every client of the database. Now the
/// query is cancelled when the connection is given up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_given_up_behind_a_lock_are_cancelled_not_left_waiting() {
    let Named {
        _cluster,
        db,
        name,
        mut cfg,
    } = Named::new("lock_cancel", &sample_messages(0..400, 20)).await;
    let lock = TableLock::take(&db, "events").await;

    cfg.database.timeout = Duration::from_secs(1);
    let metrics = Metrics::new();
    let run = tokio::spawn(run_within(
        cfg,
        metrics.clone(),
        Duration::from_secs(120),
        "pipeline caught up within 120 s",
    ));
    let timeouts = || metrics.db_errors.with_label_values(&["timeout"]).get();
    for _ in 0..600 {
        if timeouts() >= 6 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(timeouts() >= 6, "the lock makes the writes time out");
    let c = client(&db).await;
    for _ in 0..5 {
        let backends: i64 = c
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
                &[&name],
            )
            .await
            .unwrap()
            .get(0);
        // Two writer lanes, and one just given up whose cancel is in flight
        // (the test's own connection no longer counts: it is not named).
        assert!(
            backends <= 3,
            "{backends} backends of the pipeline after {} timeouts: given-up queries were left waiting",
            timeouts()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    drop(lock);

    let summary = run.await.unwrap().expect("retried until the lock went");
    assert_eq!(summary.events_written, 400);
    assert_eq!(event_rows(&c).await, 400);
}

/// Regression: batches closed only by rows and time, so large messages (an
/// upstream bug, an unknown field of 900 kB: both accepted) made batches of
/// tens of MB, several of them in flight: 356 MB of RSS on a 2.7 GB topic
/// (251 MB with the limit). `batch_max_bytes` closes a batch once its
/// messages add up to that much.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_messages_close_batches_by_bytes() {
    let cluster = MockCluster::new(1).unwrap();
    let brokers = cluster.bootstrap_servers();
    let topic = unique("events");
    mock_topic(&cluster, &topic, 2);
    // 4.8 MB in all: the MockCluster drops a partition's oldest messages
    // beyond about 5 MB.
    let pad = "x".repeat(40_000);
    let messages: Vec<Option<Vec<u8>>> = (0..120)
        .map(|i| {
            let e = event("user_login", &format!("C{}", i % 7), i, i as u32);
            Some(format!("{{\"extra\":\"{pad}\",{}", &e[1..]).into_bytes())
        })
        .collect();
    send_raw(&brokers, &topic, &messages);

    let db = fresh_db("batch_bytes").await;
    let mut cfg = pipeline_config(&brokers, &topic, db.clone());
    cfg.batch_max_rows = 10_000;
    cfg.batch_max_wait = Duration::from_secs(2);
    cfg.batch_max_bytes = 256 * 1024;
    let summary = run_to_end(cfg).await;
    assert_eq!(summary.events_written, 120, "{summary:?}");
    assert_eq!(summary.rejected, 0);
    // Batches of at most 256 KiB plus the message that crosses it: 7
    // messages. Closed by rows or time, 4.8 MB would be one or two batches.
    assert!(
        summary.batches >= 15,
        "{} batches for 4.8 MB with a 256 KiB limit",
        summary.batches
    );
    assert_eq!(event_rows(&client(&db).await).await, 120);
}

/// Whether the run named `name` has ended start-up and given its connection
/// to a writer lane, within 30 s. Start-up's last statement there is the
/// writers' idle limit, and nothing is written without data.
async fn start_up_handed_over(c: &tokio_postgres::Client, name: &str) -> bool {
    for _ in 0..1500 {
        let handed: bool = c
            .query_one(
                "SELECT count(*) > 0 FROM pg_stat_activity WHERE application_name = $1 \
                 AND state = 'idle' AND query LIKE '%idle_in_transaction_session_timeout%'",
                &[&name],
            )
            .await
            .unwrap()
            .get(0);
        if handed {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// Regression: start-up's connection, which the writer keeps for one of its
/// lanes, went without the writers' idle limit, so a consumer frozen inside
/// that lane's transaction held its locks, and every other consumer, for as
/// long as it was frozen. Other sessions' settings cannot be read, so this
/// looks for the limit as the last statement of start-up's connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_ups_connection_takes_the_writers_idle_limit() {
    let Named {
        _cluster,
        db,
        name,
        mut cfg,
    } = Named::new("startup_idle", &[]).await;
    cfg.stop_when_caught_up = false;
    let running = Running::spawn(cfg, Metrics::new());
    let c = client(&db).await;
    let handed = start_up_handed_over(&c, &name).await;
    let sessions = texts(
        &c,
        "SELECT state || ': ' || query FROM pg_stat_activity WHERE application_name = $1",
        &[&name],
    )
    .await;
    running.stop().await;
    assert!(
        handed,
        "start-up's connection took the idle limit; the run's sessions: {sessions:#?}"
    );
}

/// Regression: the read of the stored offsets on an assignment (in the
/// rebalance callback) ignored a shutdown, so a read waiting behind a lock or
/// on a frozen server held SIGTERM for the whole database timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_while_the_stored_offsets_wait_ends_at_once() {
    let Named {
        _cluster,
        db,
        name,
        mut cfg,
    } = Named::new("offsets_stop", &[]).await;
    cfg.stop_when_caught_up = false;
    cfg.database.timeout = Duration::from_secs(90);
    let running = Running::spawn(cfg, Metrics::new());

    // The MockCluster assigns the partitions about 3 s after the consumer
    // joins. Lock once start-up is over.
    let c = client(&db).await;
    assert!(start_up_handed_over(&c, &name).await, "start-up ends");
    let lock = TableLock::take(&db, "consumer_offsets").await;
    let pid = backend_waiting_for_lock(&db, &name).await;
    let query: String = c
        .query_one("SELECT query FROM pg_stat_activity WHERE pid = $1", &[&pid])
        .await
        .unwrap()
        .get(0);
    assert!(
        query.contains("next_offset") && query.contains("FROM consumer_offsets"),
        "the offset read waits: {query}"
    );
    let summary = tokio::time::timeout(Duration::from_secs(20), running.stop())
        .await
        .expect("run ends within 20 s of the shutdown while its offset read waits for a lock");
    assert_eq!(summary.events_written, 0);
    drop(lock);
}

/// Regression: a writer frozen in the middle of a COPY (`docker pause`, a
/// stalled VM) held every consumer that needed its locks for as long as it
/// was frozen: Postgres ends a session idle inside its transaction, not one
/// it reads COPY data from. Here the frozen writer is the test's session,
/// which holds the lock of the row that stores partition 0's offset and
/// then begins a COPY it never feeds. The held-up consumer now ends it once
/// it has waited past the writers' bound; a frozen COPY that holds nobody
/// up, and a slow one that holds someone up but keeps receiving, are left
/// alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_frozen_in_a_copy_is_ended_once_it_holds_others_up() {
    let Named {
        _cluster: cluster,
        db,
        name,
        mut cfg,
    } = Named::with_partitions("frozen_copy", 1, &[]).await;
    cfg.stop_when_caught_up = false;
    // Frozen after twice the timeout, but never under 10 s.
    cfg.database.timeout = Duration::from_secs(2);
    let (topic, group) = (cfg.kafka.topic.clone(), cfg.kafka.group_id.clone());
    let running = Running::spawn(cfg, Metrics::new());
    let c = client(&db).await;
    assert!(start_up_handed_over(&c, &name).await, "start-up ends");

    let pid = |c: tokio_postgres::Client| async move {
        let pid: i32 = c
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0);
        (c, pid)
    };
    let (frozen, frozen_pid) = pid(client(&db).await).await;
    frozen
        .batch_execute(&format!(
            "BEGIN; INSERT INTO consumer_offsets (group_id, topic, kafka_partition, next_offset) \
             VALUES ('{group}', '{topic}', 0, 0)"
        ))
        .await
        .unwrap();
    let copy = "COPY rejected_events FROM STDIN (FORMAT binary)";
    let _frozen_copy = frozen.copy_in::<_, bytes::Bytes>(copy).await.unwrap();
    let (alone, alone_pid) = pid(client(&db).await).await;
    alone.batch_execute("BEGIN").await.unwrap();
    let _alone_copy = alone.copy_in::<_, bytes::Bytes>(copy).await.unwrap();
    // A slow COPY that holds another session up but keeps receiving a row
    // a second is alive, however long it runs.
    let (slow, slow_pid) = pid(client(&db).await).await;
    slow.batch_execute("CREATE TABLE slow_copy (n int)")
        .await
        .unwrap();
    slow.batch_execute("BEGIN; LOCK TABLE slow_copy IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let waiter = client(&db).await;
    let waiting = tokio::spawn(async move {
        waiter
            .query_one("SELECT count(*) FROM slow_copy", &[])
            .await
            .map(|r| r.get::<_, i64>(0))
    });
    let slow_started = std::time::Instant::now();
    let (stop_feeding, mut feeding) = tokio::sync::watch::channel(false);
    let feeder = tokio::spawn(async move {
        use futures_util::SinkExt;
        let sink = slow
            .copy_in::<_, bytes::Bytes>("COPY slow_copy FROM STDIN (FORMAT binary)")
            .await?;
        let mut sink = std::pin::pin!(sink);
        sink.send(bytes::Bytes::from_static(
            b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0",
        ))
        .await?;
        let mut n: i32 = 0;
        while !*feeding.borrow() {
            let mut row = vec![0, 1, 0, 0, 0, 4];
            row.extend_from_slice(&n.to_be_bytes());
            sink.send(bytes::Bytes::from(row)).await?;
            n += 1;
            let _ = tokio::time::timeout(Duration::from_secs(1), feeding.changed()).await;
        }
        sink.send(bytes::Bytes::from_static(&[0xff, 0xff])).await?;
        let copied = sink.finish().await?;
        slow.batch_execute("COMMIT").await?;
        Ok::<_, tokio_postgres::Error>(copied)
    });

    send_raw(
        &cluster.bootstrap_servers(),
        &topic,
        &sample_messages(0..50, 10),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let mut written = event_rows(&c).await;
    while written < 50 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        written = event_rows(&c).await;
    }
    if written < 50 {
        // Thaw the frozen writer first, so that the run can stop.
        drop((_frozen_copy, frozen));
        running.stop().await;
        panic!("{written} of 50 events written after 90 s: the frozen COPY was not ended");
    }
    let alive = |pid: i32| {
        let c = &c;
        async move {
            c.query_one(
                "SELECT count(*) = 1 FROM pg_stat_activity WHERE pid = $1",
                &[&pid],
            )
            .await
            .unwrap()
            .get::<_, bool>(0)
        }
    };
    assert!(
        !alive(frozen_pid).await,
        "the frozen COPY that held the batch up is ended"
    );
    assert!(
        alive(alone_pid).await,
        "a frozen COPY that holds nobody up stays"
    );
    // Long past the bound, and looked at many times.
    tokio::time::sleep(Duration::from_secs(25).saturating_sub(slow_started.elapsed())).await;
    assert!(alive(slow_pid).await, "a COPY that keeps receiving stays");
    stop_feeding.send(true).unwrap();
    let copied = feeder
        .await
        .unwrap()
        .expect("the slow COPY ends as it began");
    assert!(copied >= 20, "{copied} rows in the slow COPY");
    assert_eq!(waiting.await.unwrap().unwrap(), copied as i64);
    let summary = running.stop().await;
    assert_eq!(summary.events_written, 50);
    let stored: i64 = c
        .query_one(
            "SELECT next_offset FROM consumer_offsets \
             WHERE group_id = $1 AND topic = $2 AND kafka_partition = 0",
            &[&group, &topic],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        stored, 50,
        "the offset is the batch's, not the frozen session's"
    );
}

/// A pipeline that keeps running on a one-partition [`Named`] database,
/// serving `/readyz`, once it has stored the first 50 sample messages.
struct Served {
    cluster: MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    db: tokio_postgres::Config,
    brokers: String,
    topic: String,
    addr: String,
    stop: tokio::sync::oneshot::Sender<()>,
    run: tokio::task::JoinHandle<Result<pipeline::RunSummary, pipeline::PipelineError>>,
}

impl Served {
    async fn start(prefix: &str, tune: impl FnOnce(&mut PipelineConfig)) -> Served {
        let Named {
            _cluster: cluster,
            db,
            mut cfg,
            ..
        } = Named::with_partitions(prefix, 1, &sample_messages(0..50, 10)).await;
        cfg.stop_when_caught_up = false;
        let addr = format!("127.0.0.1:{}", free_port());
        cfg.metrics_addr = Some(addr.parse().unwrap());
        tune(&mut cfg);
        let (brokers, topic) = (cfg.kafka.brokers.clone(), cfg.kafka.topic.clone());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let run = tokio::spawn(pipeline::run(cfg, Metrics::new(), async {
            let _ = stopped.await;
        }));
        wait_until(&db, "SELECT count(*) = 50 FROM events", "the first events").await;
        let served = Served {
            cluster,
            db,
            brokers,
            topic,
            addr,
            stop,
            run,
        };
        served.wait_ready(true, 60, "ready once committing").await;
        served
    }

    /// Waits up to `secs` for `/readyz` to say `want`; panics with `what`.
    async fn wait_ready(&self, want: bool, secs: u64, what: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(secs);
        while ready(&self.addr) != want {
            assert!(std::time::Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn stop(self) -> pipeline::RunSummary {
        self.stop.send(()).unwrap();
        self.run.await.unwrap().expect("a clean stop")
    }
}

/// Regression: a consumer whose partitions were revoked and whose rejoin
/// never completed (tansu, paused past the session timeout) read nothing
/// for good, stayed ready, and said nothing. It now says so once the wait
/// passes the limit, and is not ready until the group assigns again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebalance_that_does_not_end_makes_the_consumer_not_ready() {
    let served = Served::start("stuckjoin", |cfg| {
        cfg.rebalance_limit = Duration::from_secs(5);
    })
    .await;
    // The coordinator asks for a rejoin, and then refuses every join (more
    // refusals than librdkafka's retries can use up meanwhile). On a busy
    // machine (CI, or three runs at once) the consumer turned not ready
    // about a minute after the refusals began, hence the long wait below.
    served.cluster.request_errors(
        RDKafkaApiKey::JoinGroup,
        &vec![RDKafkaRespErr::RD_KAFKA_RESP_ERR_COORDINATOR_LOAD_IN_PROGRESS; 100_000],
    );
    served.cluster.request_errors(
        RDKafkaApiKey::Heartbeat,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_REBALANCE_IN_PROGRESS; 1],
    );
    served
        .wait_ready(false, 120, "not ready while the rebalance does not end")
        .await;
    served
        .cluster
        .clear_request_errors(RDKafkaApiKey::JoinGroup);
    served
        .wait_ready(true, 60, "ready again once the group assigns")
        .await;
    send_raw(&served.brokers, &served.topic, &sample_messages(50..80, 10));
    wait_until(
        &served.db,
        "SELECT count(*) = 80 FROM events",
        "reading again",
    )
    .await;
    assert_eq!(served.stop().await.events_written, 80);
}

/// Regression: a `--stop-when-caught-up` run that the group never gave an
/// assignment (tansu keeping members SIGKILLed minutes before) waited for
/// ever. It now fails once twice the rebalance limit has passed without one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_to_the_end_that_the_group_never_assigns_fails() {
    let Named {
        _cluster: cluster,
        db,
        mut cfg,
        ..
    } = Named::with_partitions("never_assigned", 1, &sample_messages(0..20, 5)).await;
    cluster.request_errors(
        RDKafkaApiKey::JoinGroup,
        &vec![RDKafkaRespErr::RD_KAFKA_RESP_ERR_COORDINATOR_LOAD_IN_PROGRESS; 100_000],
    );
    cfg.rebalance_limit = Duration::from_secs(5);
    let err = run_refused(cfg, Duration::from_secs(120), "a run never assigned fails").await;
    assert!(err.contains("no assignment from consumer group"), "{err}");
    assert_eq!(event_rows(&client(&db).await).await, 0);
}

/// Regression: after a short broker outage, an idle consumer stayed not
/// ready (`/readyz` 503) until new data arrived: losing every broker was
/// noted, getting one back was not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_again_once_the_broker_is_back_without_new_data() {
    let served = Served::start("brokerback", |_| {}).await;
    served.cluster.broker_down(1).unwrap();
    served
        .wait_ready(false, 60, "not ready while the broker is away")
        .await;
    served.cluster.broker_up(1).unwrap();
    served
        .wait_ready(
            true,
            60,
            "ready again once the broker is back, with nothing new to read",
        )
        .await;
    assert_eq!(served.stop().await.events_written, 50);
}

/// Regression: a member the group left without partitions reported nothing
/// that said so (no lag series, `lag=0` in its progress line), so a group
/// whose members all held none looked healthy. Each consumer now exports
/// how many partitions it holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_consumer_exports_how_many_partitions_it_holds() {
    let Named {
        _cluster,
        db,
        mut cfg,
        ..
    } = Named::new("assigned", &sample_messages(0..200, 20)).await;
    cfg.stop_when_caught_up = false;
    let (brokers, topic) = (cfg.kafka.brokers.clone(), cfg.kafka.topic.clone());
    let held = |m: &std::sync::Arc<Metrics>| m.assigned_partitions.get();
    let first = Metrics::new();
    let a = Running::spawn(cfg.clone(), first.clone());
    wait_until(&db, "SELECT count(*) = 200 FROM events", "the first 200").await;
    assert_eq!(held(&first), 2, "the only member holds both partitions");

    // Three members, two partitions: one member is left with none.
    let (second, third) = (Metrics::new(), Metrics::new());
    let b = Running::spawn(cfg.clone(), second.clone());
    let c = Running::spawn(cfg, third.clone());
    let members = [&first, &second, &third];
    let settled = || {
        let counts: Vec<i64> = members.iter().map(|m| held(m)).collect();
        counts.iter().sum::<i64>() == 2 && counts.iter().filter(|&&n| n == 0).count() == 1
    };
    within(60, "the group settles on 1, 1 and 0 partitions", settled).await;
    send_raw(&brokers, &topic, &sample_messages(200..400, 20));
    wait_until(&db, "SELECT count(*) = 400 FROM events", "the next 200").await;

    for running in [a, b, c] {
        running.stop().await;
    }
    for m in members {
        assert_eq!(held(m), 0, "a stopped member holds nothing");
    }
}

/// A partition held by a member of the group that writes nothing (one gone
/// but kept in the group by the broker, as tansu keeps a SIGKILLed one, or a
/// stuck one) showed no lag anywhere, and every live consumer looked
/// healthy. The consumers now count the topic's partitions whose stored
/// offsets stand still while messages wait, whoever holds them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_a_silent_member_holds_are_counted_as_stalled() {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let Named {
        _cluster,
        db,
        mut cfg,
        ..
    } = Named::new("stalled", &[]).await;
    cfg.stop_when_caught_up = false;
    cfg.rebalance_limit = Duration::from_secs(1);
    let (brokers, topic) = (cfg.kafka.brokers.clone(), cfg.kafka.topic.clone());
    // A member that polls, so the group keeps it, and writes nothing.
    let silent: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", &cfg.kafka.group_id)
        .set("enable.auto.commit", "false")
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "500")
        .create()
        .unwrap();
    silent.subscribe(&[&topic]).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let polling = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = silent.poll(Duration::from_millis(100));
            }
            silent.unsubscribe();
            for _ in 0..20 {
                let _ = silent.poll(Duration::from_millis(100));
            }
        })
    };
    let metrics = Metrics::new();
    let running = Running::spawn(cfg, metrics.clone());
    let held = || metrics.assigned_partitions.get();
    within(60, "the pipeline holds one partition of two", || {
        held() == 1
    })
    .await;
    send_raw(&brokers, &topic, &sample_messages(0..200, 20));
    let stalled = || metrics.stalled_partitions.get();
    within(
        60,
        "the silent member's partition counts as stalled",
        || stalled() == 1,
    )
    .await;
    let written: i64 = client(&db)
        .await
        .query_one("SELECT count(*) FROM events", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        written > 0 && written < 200,
        "the pipeline's own partition moved: {written}"
    );

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    polling.join().unwrap();
    within(
        60,
        "the pipeline holds both partitions once it left",
        || held() == 2,
    )
    .await;
    wait_until(
        &db,
        "SELECT count(*) = 200 FROM events",
        "all 200 once it left",
    )
    .await;
    within(60, "nothing counts as stalled once it moves", || {
        stalled() == 0
    })
    .await;
    running.stop().await;
}

/// Regression: a consumer holding no partition whose topic went away
/// (deleted, or a broker that lost it) said it was ready, and nothing in its
/// log named the topic. (tansu cannot show this: librdkafka crashes on the
/// metadata it sends for a deleted topic.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_whose_topic_is_gone_is_not_ready() {
    let Named {
        _cluster: cluster,
        db,
        mut cfg,
        ..
    } = Named::with_partitions("gone", 1, &sample_messages(0..100, 10)).await;
    let topic = cfg.kafka.topic.clone();
    cfg.stop_when_caught_up = false;
    let member = |cfg: &PipelineConfig| {
        let addr = format!("127.0.0.1:{}", free_port());
        let mut cfg = cfg.clone();
        cfg.metrics_addr = Some(addr.parse().unwrap());
        let metrics = Metrics::new();
        (Running::spawn(cfg, metrics.clone()), metrics, addr)
    };
    let (a, a_metrics, a_addr) = member(&cfg);
    wait_until(&db, "SELECT count(*) = 100 FROM events", "the 100 events").await;
    // One partition, two members: the second holds none and idles, ready.
    let (b, b_metrics, b_addr) = member(&cfg);
    let held = || [&a_metrics, &b_metrics].map(|m| m.assigned_partitions.get());
    within(
        60,
        "the group settles with one idle member, both ready",
        || held().iter().sum::<i64>() == 1 && ready(&a_addr) && ready(&b_addr),
    )
    .await;
    let idle_addr = if held()[0] == 0 { &a_addr } else { &b_addr };

    cluster
        .topic_error(
            &topic,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART,
        )
        .unwrap();
    within(
        30,
        "the idle member is not ready once its topic is gone",
        || !ready(idle_addr),
    )
    .await;
    cluster
        .topic_error(&topic, RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR)
        .unwrap();
    within(60, "ready again once the topic is back", || {
        ready(&a_addr) || ready(&b_addr)
    })
    .await;
    a.stop().await;
    b.stop().await;
}
