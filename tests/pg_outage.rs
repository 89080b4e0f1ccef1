//! Postgres goes away for 10 s in the middle of a run: the pipeline keeps
//! running, retries without committing offsets, and the counts are exact after.
//! Postgres frozen (it stops answering without an error): the database timeout
//! gives the exchange up, and a shutdown still ends at the drain timeout.
//! Also: the throwaway server a test binary shares does not outlive it.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use energy_stream::config::PipelineConfig;
use energy_stream::localpg::LocalPostgres;
use energy_stream::source::KafkaConfig;
use energy_stream::telemetry::Metrics;
use rdkafka::mocking::MockCluster;

/// What every fault test stands on: a private Postgres (the tests stop,
/// restart or freeze it), a fresh database on it, and a MockCluster topic.
struct Rig {
    pg: Arc<LocalPostgres>,
    db: tokio_postgres::Config,
    _cluster: MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    brokers: String,
    topic: String,
}

async fn rig(prefix: &str, partitions: i32) -> Rig {
    let pg = Arc::new(
        tokio::task::spawn_blocking(|| LocalPostgres::start().expect("postgres"))
            .await
            .unwrap(),
    );
    let db = fresh_db_on(&pg.url(), prefix).await;
    let cluster = MockCluster::new(1).unwrap();
    let topic = unique(prefix);
    mock_topic(&cluster, &topic, partitions);
    Rig {
        pg,
        db,
        brokers: cluster.bootstrap_servers(),
        _cluster: cluster,
        topic,
    }
}

impl Rig {
    fn config(&self) -> PipelineConfig {
        PipelineConfig::new(
            KafkaConfig {
                brokers: self.brokers.clone(),
                topic: self.topic.clone(),
                group_id: unique("g"),
                options: vec![],
            },
            self.db.clone(),
        )
    }

    /// `run` with small batches, so that many commit around the fault,
    /// serving `/metrics`, `/healthz` and `/readyz` on a free port; `edit`
    /// adjusts the config. Returns it, its metrics and that address.
    fn spawn_served(
        &self,
        edit: impl FnOnce(&mut PipelineConfig),
    ) -> (Running, Arc<Metrics>, String) {
        let mut cfg = self.config();
        cfg.batch_max_rows = 200;
        cfg.batch_max_wait = Duration::from_millis(50);
        let addr = format!("127.0.0.1:{}", free_port());
        cfg.metrics_addr = Some(addr.parse().unwrap());
        edit(&mut cfg);
        let metrics = Metrics::new();
        (Running::spawn(cfg, metrics.clone()), metrics, addr)
    }

    /// Sends `total` events in `chunks` chunks, pausing between them, from a
    /// thread, so that the stream goes on while the test breaks Postgres.
    fn produce_in_chunks(
        &self,
        total: usize,
        chunks: usize,
        customers: usize,
        pause: Duration,
    ) -> std::thread::JoinHandle<()> {
        let (brokers, topic) = (self.brokers.clone(), self.topic.clone());
        std::thread::spawn(move || {
            for chunk in 0..chunks {
                let msgs: Vec<Option<Vec<u8>>> = (0..total / chunks)
                    .map(|i| {
                        let n = chunk * (total / chunks) + i;
                        Some(
                            event(
                                TYPES[n % 7],
                                &format!("C{}", n % customers),
                                n as i64,
                                (n % 1440) as u32,
                            )
                            .into_bytes(),
                        )
                    })
                    .collect();
                send_raw(&brokers, &topic, &msgs);
                std::thread::sleep(pause);
            }
        })
    }

    /// Exactly once, after the fault: `total` events, one row per message,
    /// no rejects (an infrastructure error is never bad data), and stored
    /// offsets at the end of every partition.
    async fn assert_stored_once(&self, total: usize, partitions: i32) {
        let c = client(&self.db).await;
        let r = c
            .query_one(
                "SELECT count(*), count(DISTINCT (kafka_partition, kafka_offset)), \
                        (SELECT count(*) FROM rejected_events) FROM events",
                &[],
            )
            .await
            .unwrap();
        let (rows, distinct, rejects): (i64, i64, i64) = (r.get(0), r.get(1), r.get(2));
        assert_eq!(rows as usize, total, "R == P after the fault");
        assert_eq!(distinct, rows, "no duplicates");
        assert_eq!(rejects, 0, "infrastructure errors are never rejects");
        let hw = high_watermarks(&self.brokers, &self.topic, partitions);
        let stored: i64 = c
            .query_one("SELECT sum(next_offset)::bigint FROM consumer_offsets", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(stored, hw.values().sum::<i64>(), "stored offsets = the end");
    }
}

/// Whether `/readyz` at `addr` says ready.
fn ready(addr: &str) -> bool {
    http_get(addr, "/readyz").starts_with("HTTP/1.0 200")
}

/// The sum of every series of the metric `name`, whatever its labels.
fn metric_sum(metrics: &Metrics, name: &str) -> f64 {
    let prefix = format!("{name}{{");
    metrics
        .render()
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// All database errors counted, whatever their kind.
fn db_errors(metrics: &Metrics) -> f64 {
    metric_sum(metrics, "energy_stream_db_errors_total")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_for_ten_seconds_mid_run() {
    let rig = rig("outage", 4).await;
    let (pg, db) = (rig.pg.clone(), rig.db.clone());
    let (run, metrics, metrics_addr) = rig.spawn_served(|_| {});

    // Produce 30 000 events over ~12 s while Postgres goes down and comes back.
    let total = 30_000usize;
    let producer = rig.produce_in_chunks(total, 30, 300, Duration::from_millis(400));

    let c = client(&db).await;
    let waiting = Instant::now();
    let mut before = 0i64;
    while before == 0 && waiting.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Regression: under load the first poll came before the pipeline had
        // migrated, and "relation events does not exist" failed the test.
        before = c
            .query_one("SELECT count(*) FROM events", &[])
            .await
            .map(|r| r.get(0))
            .unwrap_or(0);
    }
    assert!(before > 0, "the pipeline committed before the outage");
    assert!(ready(&metrics_addr), "ready while committing");
    assert!((before as usize) < total, "the outage starts mid-run");
    drop(c);
    {
        let pg = pg.clone();
        tokio::task::spawn_blocking(move || pg.stop_immediate().unwrap())
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        !ready(&metrics_addr),
        "/readyz is false while Postgres is away"
    );
    assert!(
        http_get(&metrics_addr, "/healthz").starts_with("HTTP/1.0 200"),
        "alive"
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(!run.is_finished(), "the pipeline survives the outage");
    {
        let pg = pg.clone();
        tokio::task::spawn_blocking(move || pg.start_again().unwrap())
            .await
            .unwrap();
    }
    tokio::task::spawn_blocking(move || producer.join().unwrap())
        .await
        .unwrap();

    let c = client(&db).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let rows: i64 = c
            .query_one("SELECT count(*) FROM events", &[])
            .await
            .unwrap()
            .get(0);
        if rows as usize >= total || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(ready(&metrics_addr), "ready again after the outage");
    let summary = run.stop().await;

    rig.assert_stored_once(total, 4).await;
    assert_eq!(summary.events_written as usize, total);
    assert!(
        db_errors(&metrics) > 0.0,
        "the outage was counted as db errors:\n{}",
        metrics.render()
    );
    // Regression: a batch waiting for Postgres to take connections again
    // was retried without being counted, so the retries panel stayed near 0
    // through an outage.
    // A connection found closed before an attempt (Postgres stopped while
    // the lane idled) is counted, but is no failed attempt.
    let idle_closed = metrics
        .db_errors
        .with_label_values(&[energy_stream::telemetry::DB_IDLE_CLOSED])
        .get() as f64;
    assert_eq!(
        metrics.retries.get() as f64,
        db_errors(&metrics) - idle_closed,
        "every failed attempt at the batch is a retry:\n{}",
        metrics.render()
    );
    // The intake waited on the writer for the whole outage; that wait must
    // not look like a stalled partition (see `Cursor::stalled`), or it would
    // seek back and fetch messages twice.
    let redelivered = metrics
        .kafka_errors
        .with_label_values(&["redelivered"])
        .get();
    assert_eq!(
        redelivered, 0,
        "no partition is sought back after the intake waited for Postgres"
    );
}

/// Regression: with nothing to consume, nothing asked Postgres, so
/// `/readyz` said ready through a whole outage until the next batch met it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_pipeline_is_not_ready_while_postgres_is_away() {
    let rig = rig("idle_outage", 2).await;
    let (pg, db) = (rig.pg.clone(), rig.db.clone());
    let (run, _metrics, metrics_addr) = rig.spawn_served(|_| {});
    rig.produce_in_chunks(100, 1, 10, Duration::ZERO)
        .join()
        .unwrap();
    wait_until(
        &db,
        "SELECT count(*) >= 100 FROM events",
        "the events were committed",
    )
    .await;
    assert!(ready(&metrics_addr), "ready once committed");
    {
        let pg = pg.clone();
        tokio::task::spawn_blocking(move || pg.stop_immediate().unwrap())
            .await
            .unwrap();
    }
    let within = |what: &'static str, want: bool| {
        let addr = metrics_addr.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            while ready(&addr) != want {
                assert!(Instant::now() < deadline, "{what}");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    };
    within("not ready while Postgres is away, with no batch", false).await;
    {
        let pg = pg.clone();
        tokio::task::spawn_blocking(move || pg.start_again().unwrap())
            .await
            .unwrap();
    }
    within("ready again once Postgres answers", true).await;
    let summary = run.stop().await;
    assert_eq!(summary.events_written, 100);
}

/// Fault suite: Postgres restarted (`pg_ctl restart -m immediate`) five times
/// while batches stream in, so each restart lands in a batch's COPY or
/// commit. The process survives, the errors are counted as database errors
/// and never as rejects, and every message is stored exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_five_times_mid_stream() {
    let rig = rig("restarts", 3).await;
    let (pg, db) = (rig.pg.clone(), rig.db.clone());
    let mut cfg = rig.config();
    // Every KPI on, so each batch's transaction holds several COPYs.
    cfg.batch_max_rows = 5_000;
    cfg.batch_max_wait = Duration::from_millis(100);
    cfg.kpi = Some(energy_stream::kpi::KpiConfig {
        dir: concat!(env!("CARGO_MANIFEST_DIR"), "/queries").into(),
        ..Default::default()
    });
    let metrics = Metrics::new();
    let run = Running::spawn(cfg, metrics.clone());

    let total = 60_000usize;
    let producer = rig.produce_in_chunks(total, 60, 500, Duration::from_millis(150));

    let rows = |c: tokio_postgres::Client| async move {
        c.query_one("SELECT count(*) FROM events", &[])
            .await
            .map(|r| r.get::<_, i64>(0))
            .unwrap_or(0)
    };
    let mut seen = Vec::new();
    for restart in 0..5 {
        // Wait for progress since the last restart, then for a COPY that is
        // running right now, and restart under it.
        let before = match energy_stream::sink::connect(&db).await {
            Ok(c) => rows(c).await,
            Err(_) => 0,
        };
        let waiting = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = match energy_stream::sink::connect(&db).await {
                Ok(c) => rows(c).await,
                Err(_) => before,
            };
            if now > before || waiting.elapsed() > Duration::from_secs(60) {
                seen.push(now);
                break;
            }
        }
        let watcher = energy_stream::sink::connect(&db).await.unwrap();
        let waiting = Instant::now();
        loop {
            let copying: i64 = watcher
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE 'COPY%'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            if copying > 0 {
                break;
            }
            assert!(
                waiting.elapsed() < Duration::from_secs(60),
                "restart {restart}: no COPY seen within 60 s"
            );
        }
        let pg = pg.clone();
        tokio::task::spawn_blocking(move || pg.restart_immediate().unwrap())
            .await
            .unwrap();
        assert!(
            !run.is_finished(),
            "restart {restart}: the pipeline survives"
        );
    }
    assert!(
        seen.windows(2).all(|w| w[1] > w[0]),
        "progress between restarts: {seen:?}"
    );
    tokio::task::spawn_blocking(move || producer.join().unwrap())
        .await
        .unwrap();

    let deadline = Instant::now() + Duration::from_secs(180);
    while rows(client(&db).await).await < total as i64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    run.stop().await;

    rig.assert_stored_once(total, 3).await;
    assert!(
        db_errors(&metrics) >= 5.0,
        "each restart under a COPY counted as a database error:\n{}",
        metrics.render()
    );
}

/// Regression: the cluster a test binary shares lives in a static, which is
/// never dropped, and its postmaster is detached from the binary, so the last
/// binary's server kept running after `cargo test` until a later start
/// reaped it. This test runs itself again as a child that starts the shared
/// cluster and returns; once the child has exited, the server must be gone.
#[test]
fn the_shared_cluster_stops_when_its_test_binary_exits() {
    const CHILD: &str = "ENERGY_STREAM_TEST_CHILD_STARTS_SHARED_CLUSTER";
    const NAME: &str = "the_shared_cluster_stops_when_its_test_binary_exits";
    if std::env::var_os(CHILD).is_some() {
        // The child: start the shared cluster, say where it is, and return.
        server_url();
        let pg = shared_cluster().expect("the shared cluster was started");
        let pid = std::fs::read_to_string(pg.data_dir().join("postmaster.pid")).unwrap();
        println!(
            "shared cluster: {} {}",
            pid.lines().next().unwrap(),
            pg.data_dir().display()
        );
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([NAME, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, "1")
        .env_remove("TEST_DATABASE_URL")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "child failed:\n{stdout}\n{stderr}");
    let line = stdout
        .lines()
        .find_map(|l| l.split_once("shared cluster: ").map(|(_, at)| at))
        .unwrap_or_else(|| panic!("the child did not report its cluster:\n{stdout}\n{stderr}"));
    let (pid, data_dir) = line.split_once(' ').unwrap();
    // A process that has exited but not yet been reaped (state Z) is gone:
    // whoever adopted the detached postmaster reaps it in its own time.
    let running = || {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| {
                let state = stat.rsplit_once(") ")?.1.chars().next()?;
                Some(!matches!(state, 'Z' | 'X'))
            })
            .unwrap_or(false)
    };
    assert!(
        !running(),
        "the postmaster (pid {pid}) outlived its test binary:\n{stdout}"
    );
    assert!(
        !std::path::Path::new(data_dir).exists(),
        "{data_dir} outlived its test binary"
    );
}

/// KPI files that change while Postgres is away: the stop for the new files
/// cannot commit the batch in flight and times out. That used to end `run`
/// with the drain error; now it starts again with the new files, waits for
/// Postgres, and reads the uncommitted batch again from the stored offsets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kpi_files_changed_while_postgres_is_away_are_picked_up_after() {
    // Shown only when the test fails: where the stop for the new files went.
    let _ = tracing_subscriber::fmt()
        .with_env_filter("info,energy_stream=debug")
        .with_test_writer()
        .try_init();
    let rig = rig("watch_outage", 2).await;
    let (pg, db) = (rig.pg.clone(), rig.db.clone());
    let kpi_cfg = kpi_dir(&[(
        "by_type.sql",
        "SELECT event_type, count(*) AS n FROM events GROUP BY event_type",
    )]);
    let dir = kpi_cfg.dir.clone();
    let mut cfg = rig.config();
    cfg.batch_max_wait = Duration::from_millis(50);
    cfg.drain_timeout = Duration::from_secs(2);
    cfg.kpi = Some(kpi_cfg);
    cfg.kpi_watch = Some(Duration::from_millis(200));
    let run = Running::spawn(cfg, Metrics::new());
    rig.produce_in_chunks(200, 1, 20, Duration::ZERO)
        .join()
        .unwrap();
    wait_until(&db, "SELECT count(*) = 200 FROM events", "200 events").await;

    {
        let pg = pg.clone();
        tokio::task::spawn_blocking(move || pg.stop_immediate().unwrap())
            .await
            .unwrap();
    }
    // A batch that cannot commit, then the new file.
    send_raw(&rig.brokers, &rig.topic, &sample_messages(200..300, 20));
    tokio::time::sleep(Duration::from_secs(1)).await;
    std::fs::write(
        dir.join("by_channel.sql"),
        "SELECT channel, count(*) AS n FROM events GROUP BY channel",
    )
    .unwrap();
    // Past the 2 s drain timeout of the stop for the new file.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        !run.is_finished(),
        "the drain timeout of the stop for the new files does not end run"
    );
    {
        let pg = pg.clone();
        tokio::task::spawn_blocking(move || pg.start_again().unwrap())
            .await
            .unwrap();
    }
    wait_until(&db, "SELECT count(*) = 300 FROM events", "300 events").await;
    wait_until(
        &db,
        "SELECT sum(n) = 300 FROM by_channel",
        "by_channel has all 300",
    )
    .await;
    let summary = run.stop().await;
    assert_eq!(summary.events_written, 300);
    rig.assert_stored_once(300, 2).await;
    verify_ok(&db_url(&db), &["--queries-dir", dir.to_str().unwrap()]);
}

/// Freezes (SIGSTOP) or thaws the rig's server off the async workers.
async fn set_frozen(pg: &Arc<LocalPostgres>, frozen: bool) {
    let pg = pg.clone();
    tokio::task::spawn_blocking(move || {
        if frozen {
            pg.freeze().unwrap()
        } else {
            pg.thaw().unwrap()
        }
    })
    .await
    .unwrap();
}

/// Fault suite: Postgres frozen mid-stream (every server process stopped
/// with SIGSTOP, as `docker pause` or a hung host does). It sends no error and
/// the kernel keeps its sockets open, so only the database timeout can tell:
/// the writer gives the exchange up, counts a `timeout`, reports not ready
/// and keeps retrying; after the thaw every message is stored exactly once.
/// Regression: the writer waited for the answer forever, ready all along.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_frozen_mid_run_times_out_and_recovers() {
    let rig = rig("frozen", 4).await;
    let (pg, db) = (rig.pg.clone(), rig.db.clone());
    let (run, metrics, metrics_addr) =
        rig.spawn_served(|cfg| cfg.database.timeout = Duration::from_secs(2));

    // 16 000 events over about 8 s, while Postgres freezes and thaws.
    let total = 16_000usize;
    let producer = rig.produce_in_chunks(total, 20, 300, Duration::from_millis(400));
    wait_until(&db, "SELECT count(*) > 0 FROM events", "a first commit").await;
    assert!(ready(&metrics_addr), "ready while committing");

    set_frozen(&pg, true).await;
    // Several database timeouts long: the batch in flight, then reconnects
    // that the kernel accepts and nobody answers.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let timeouts = metrics.db_errors.with_label_values(&["timeout"]).get();
    let was_ready = ready(&metrics_addr);
    let finished = run.is_finished();
    set_frozen(&pg, false).await;
    assert!(
        timeouts >= 1,
        "an unanswered exchange counts as db_errors_total{{kind=\"timeout\"}}:\n{}",
        metrics.render()
    );
    assert!(
        !was_ready,
        "/readyz is false while Postgres does not answer"
    );
    assert!(!finished, "the pipeline survives the freeze");

    tokio::task::spawn_blocking(move || producer.join().unwrap())
        .await
        .unwrap();
    wait_until(
        &db,
        &format!("SELECT count(*) = {total} FROM events"),
        "every event after the thaw",
    )
    .await;
    assert!(ready(&metrics_addr), "ready again after the thaw");
    run.stop().await;
    rig.assert_stored_once(total, 4).await;
}

/// A shutdown while Postgres is frozen ends at the drain timeout, with the
/// drain error, although the database timeout is longer; the batch it could
/// not commit is consumed again by the next run, exactly once.
/// Regression: the stop waited for Postgres' answer forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_while_postgres_is_frozen_ends_at_the_drain_timeout() {
    let rig = rig("frozen_stop", 2).await;
    let (pg, db) = (rig.pg.clone(), rig.db.clone());
    let mut cfg = rig.config();
    cfg.batch_max_wait = Duration::from_millis(50);
    cfg.drain_timeout = Duration::from_secs(3);
    cfg.database.timeout = Duration::from_secs(120);
    let run = Running::spawn(cfg.clone(), Metrics::new());
    send_raw(&rig.brokers, &rig.topic, &sample_messages(0..200, 20));
    wait_until(&db, "SELECT count(*) = 200 FROM events", "200 events").await;

    set_frozen(&pg, true).await;
    send_raw(&rig.brokers, &rig.topic, &sample_messages(200..300, 20));
    // The batch is cut and its writer waits on the frozen server.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut stopping = tokio::spawn(run.stop_result());
    // A bound on hanging, not a speed check: the database timeout is 120 s.
    let in_time = tokio::time::timeout(Duration::from_secs(30), &mut stopping).await;
    // Thawed before any assertion, so that a failure cannot leave it frozen.
    set_frozen(&pg, false).await;
    let ended = match in_time {
        Ok(ended) => ended.unwrap(),
        Err(_) => {
            let late = stopping.await.unwrap();
            panic!("the shutdown waited for the frozen server, then ended with {late:?}")
        }
    };
    assert!(
        matches!(
            ended,
            Err(energy_stream::pipeline::PipelineError::DrainTimeout(_))
        ),
        "ends with the drain error: {ended:?}"
    );

    let again = Running::spawn(cfg, Metrics::new());
    wait_until(
        &db,
        "SELECT count(*) = 300 FROM events",
        "the rest after the thaw",
    )
    .await;
    again.stop().await;
    rig.assert_stored_once(300, 2).await;
}

/// Sum of every partition's `energy_stream_consumer_lag`.
fn lag(metrics: &Metrics) -> f64 {
    metric_sum(metrics, "energy_stream_consumer_lag")
}

/// Regression: while Postgres was away the intake waited on the writer and
/// stopped polling, so the statistics that carry the lag stopped too: the
/// lag froze at its last value while the backlog grew, and the "lag growing"
/// and "no commit while lag > 0" alerts could not fire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_lag_keeps_counting_while_postgres_is_away() {
    let rig = rig("lagaway", 2).await;
    let (run, metrics, _) = rig.spawn_served(|_| {});
    rig.produce_in_chunks(200, 1, 20, Duration::ZERO)
        .join()
        .unwrap();
    let c = client(&rig.db).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let rows = c
            .query_one("SELECT count(*) FROM events", &[])
            .await
            .map_or(0, |r| r.get::<_, i64>(0));
        if rows == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "the first events land");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(c);
    {
        let pg = rig.pg.clone();
        tokio::task::spawn_blocking(move || pg.stop_immediate().unwrap())
            .await
            .unwrap();
    }
    // The intake takes a few batches of these, then waits on the writer.
    rig.produce_in_chunks(3_000, 1, 20, Duration::ZERO)
        .join()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(6)).await;
    // These arrive while nothing polls: only a lag asked of the broker sees them.
    rig.produce_in_chunks(3_000, 1, 20, Duration::ZERO)
        .join()
        .unwrap();
    // All of it is missing from Postgres, what the intake read before it
    // stopped included (it counted from its own position at first).
    let deadline = Instant::now() + Duration::from_secs(30);
    while lag(&metrics) != 6_000.0 {
        assert!(
            Instant::now() < deadline,
            "the lag counts what Postgres lacks: {}\n{}",
            lag(&metrics),
            metrics.render()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    {
        let pg = rig.pg.clone();
        tokio::task::spawn_blocking(move || pg.start_again().unwrap())
            .await
            .unwrap();
    }
    let c = client(&rig.db).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let rows: i64 = c
            .query_one("SELECT count(*) FROM events", &[])
            .await
            .unwrap()
            .get(0);
        if rows == 6_200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "every event lands after the outage"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    run.stop().await;
    rig.assert_stored_once(6_200, 2).await;
}
