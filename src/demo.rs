//! Demo: the whole path on one machine with nothing but Rust and Postgres.
//!
//! It owns the newcomer's tour: an in-process Kafka (librdkafka's MockCluster),
//! `DATABASE_URL` or else a throwaway local Postgres, the sample events replayed
//! into a 6-partition topic, the real pipeline run until caught up, and a
//! summary read back from Postgres. With a `DATABASE_URL` it works in its own
//! schema, `energy_stream_demo`, which it recreates on every run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::mocking::MockCluster;

use crate::config::PipelineConfig;
use crate::localpg::LocalPostgres;
use crate::produce::{ProduceConfig, produce};
use crate::source::KafkaConfig;
use crate::telemetry::Metrics;

pub const DEMO_SCHEMA: &str = "energy_stream_demo";
const TOPIC: &str = "energy_events";
/// The committed sample events, relative to the repository.
const SAMPLE: &str = "data/events.jsonl";

pub struct DemoConfig {
    pub database: Option<tokio_postgres::Config>,
    /// None: the sample file, or generated events when it is not there.
    pub input: Option<PathBuf>,
    pub keep_running: bool,
    pub metrics_addr: Option<std::net::SocketAddr>,
}

/// What the demo found in Postgres at the end.
#[derive(Debug, Default)]
pub struct DemoReport {
    pub by_event_type: BTreeMap<String, i64>,
    pub by_reason: BTreeMap<String, i64>,
    pub rows_written: i64,
    pub rejected: i64,
    pub elapsed: Duration,
    pub bad_lines: u64,
    /// KPI view → rows.
    pub kpis: BTreeMap<String, i64>,
}

impl std::fmt::Display for DemoReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "{:<28} {:>10}", "events by type", "rows")?;
        for (k, v) in &self.by_event_type {
            writeln!(f, "  {k:<26} {v:>10}")?;
        }
        writeln!(f, "{:<28} {:>10}", "rejects by reason", "rows")?;
        if self.by_reason.is_empty() {
            writeln!(f, "  {:<26} {:>10}", "(none)", 0)?;
        }
        for (k, v) in &self.by_reason {
            writeln!(f, "  {k:<26} {v:>10}")?;
        }
        writeln!(
            f,
            "{:<28} {:>10}",
            "rows written to events", self.rows_written
        )?;
        writeln!(f, "{:<28} {:>10}", "rows in rejected_events", self.rejected)?;
        for (k, v) in &self.kpis {
            writeln!(f, "{:<28} {:>10}", format!("KPI {k}"), v)?;
        }
        if self.bad_lines > 0 {
            writeln!(f, "{:<28} {:>10}", "input lines not sent", self.bad_lines)?;
        }
        write!(f, "{:<28} {:>9.1}s", "elapsed", self.elapsed.as_secs_f64())
    }
}

/// Runs the demo and prints its summary. `shutdown` ends `--keep-running`.
pub async fn run(
    cfg: DemoConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<DemoReport> {
    let started = Instant::now();
    // Ctrl-C is honoured from here on, not only with --keep-running.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    // Before starting anything: a wrong --input is the user's to fix first.
    let input = resolve_input(cfg.input.as_deref())?;
    // A sample generated here goes with the run, also when it fails.
    let _generated =
        (cfg.input.is_none() && input != Path::new(SAMPLE)).then(|| RemoveOnDrop(input.clone()));
    let mut local = None;
    let mut database = match cfg.database {
        Some(db) => {
            println!(
                "Postgres: {} (schema {DEMO_SCHEMA})",
                crate::sink::describe(&db)
            );
            db
        }
        None => {
            let pg = tokio::task::spawn_blocking(LocalPostgres::start)
                .await?
                .context("DATABASE_URL is not set, so the demo starts its own Postgres")?;
            println!(
                "Postgres: started a throwaway cluster at {} (data in {}; removed on exit)",
                pg.url(),
                pg.data_dir().display()
            );
            let db = pg.url().parse()?;
            local = Some(pg);
            db
        }
    };
    database.options(format!("-c search_path={DEMO_SCHEMA}"));
    let mut admin = database.clone();
    admin.options("");
    // Held until the demo ends: two demos on one database would drop each
    // other's schema mid-run and mix their rows.
    let lock_holder = crate::sink::connect(&admin).await?;
    let locked: bool = lock_holder
        .query_one(
            "SELECT pg_try_advisory_lock(hashtext('energy-stream demo'))",
            &[],
        )
        .await
        .context("cannot take the demo's lock")?
        .get(0);
    anyhow::ensure!(
        locked,
        "another energy-stream demo is running against this database; wait for it to end, \
         or point DATABASE_URL at another database"
    );
    let existed = lock_holder
        .query_opt(
            "SELECT 1 FROM pg_namespace WHERE nspname = $1",
            &[&DEMO_SCHEMA],
        )
        .await?
        .is_some();
    lock_holder
        .batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {DEMO_SCHEMA} CASCADE; CREATE SCHEMA {DEMO_SCHEMA}"
        ))
        .await
        .context("cannot create the demo schema")?;
    if existed {
        println!("Dropped the schema {DEMO_SCHEMA} an earlier demo left, with everything in it");
    }

    let cluster = MockCluster::new(1).context("cannot start the in-process Kafka")?;
    cluster
        .create_topic(TOPIC, 6, 1)
        .context("cannot create the demo topic")?;
    let brokers = cluster.bootstrap_servers();
    println!("Kafka: in-process mock cluster at {brokers}, topic {TOPIC} (6 partitions)");
    let kafka = KafkaConfig {
        brokers,
        topic: TOPIC.into(),
        group_id: "energy-stream-demo".into(),
        options: vec![],
    };

    // Per process, so that demos never share one; the summary counts the
    // lines, and the file goes once they are counted.
    let bad_lines = std::env::temp_dir().join(format!(
        "energy-stream-demo-bad-lines-{}.jsonl",
        std::process::id()
    ));
    let _bad_lines = RemoveOnDrop(bad_lines.clone());
    let produce_cfg = ProduceConfig {
        kafka: kafka.clone(),
        input: input.clone(),
        partitions: 6,
        rate: None,
        shuffle: false,
        repeat: false,
        live: false,
        input_once: false,
        bad_lines: bad_lines.clone(),
    };
    let metrics = Metrics::new();
    let m = metrics.clone();
    // The demo serves the pipeline's readiness, not the producer's.
    let produce_health = Arc::new(crate::telemetry::Health::default());
    let produced = tokio::task::spawn_blocking(move || {
        produce(&produce_cfg, &AtomicBool::new(false), m, produce_health)
    })
    .await??;
    println!("Produced {} from {}", produced, input.display());

    let mut pcfg = PipelineConfig::new(kafka, database.clone());
    // Runs until caught up; with --keep-running it then goes on, see below.
    pcfg.batch_max_wait = Duration::from_millis(200);
    pcfg.stop_when_caught_up = true;
    let queries = std::path::Path::new("queries");
    if queries.is_dir() {
        pcfg.kpi = Some(crate::kpi::KpiConfig {
            dir: queries.to_path_buf(),
            ..Default::default()
        });
    } else {
        println!("no queries/ directory here: writing raw events only, no KPIs");
    }
    crate::pipeline::run(pcfg.clone(), metrics.clone(), stopped(stop_rx.clone())).await?;
    let interrupted = *stop_rx.borrow();

    let mut report = DemoReport {
        bad_lines: produced.bad_lines,
        ..DemoReport::default()
    };
    let client = crate::sink::connect(&database).await?;
    let set_up: bool = client
        .query_one("SELECT to_regclass('events') IS NOT NULL", &[])
        .await?
        .get(0);
    if !set_up {
        // Stopped during the pipeline's start-up: there is nothing to count.
        println!("Interrupted before the pipeline had created its tables: nothing was written.");
        drop(cluster);
        if let Some(pg) = local {
            tokio::task::spawn_blocking(move || drop(pg)).await?;
        }
        return Ok(report);
    }
    for r in client
        .query(
            "SELECT event_type, count(*) FROM events GROUP BY 1 ORDER BY 1",
            &[],
        )
        .await?
    {
        report.by_event_type.insert(r.get(0), r.get(1));
    }
    for r in client
        .query(
            "SELECT reason, count(*) FROM rejected_events GROUP BY 1 ORDER BY 1",
            &[],
        )
        .await?
    {
        report.by_reason.insert(r.get(0), r.get(1));
    }
    report.rows_written = report.by_event_type.values().sum();
    for r in client
        .query("SELECT name FROM kpi_registry ORDER BY name", &[])
        .await?
    {
        let name: String = r.get(0);
        let n: i64 = client
            .query_one(&format!("SELECT count(*) FROM \"{name}\""), &[])
            .await?
            .get(0);
        report.kpis.insert(name, n);
    }
    report.rejected = report.by_reason.values().sum();
    report.elapsed = started.elapsed();
    println!("\n{report}");
    if interrupted {
        println!("Interrupted: the summary counts what was committed before Ctrl-C.");
    }

    if cfg.keep_running && !interrupted {
        // The same pipeline resumes from the offsets it stored, now serving
        // its endpoints, until Ctrl-C.
        match cfg.metrics_addr {
            Some(a) => println!("\nStill running: http://{a}/metrics (Ctrl-C to stop)"),
            None => println!("\nStill running (Ctrl-C to stop)"),
        }
        pcfg.stop_when_caught_up = false;
        pcfg.metrics_addr = cfg.metrics_addr;
        crate::pipeline::run(pcfg, metrics, stopped(stop_rx)).await?;
    }
    drop(cluster);
    if let Some(pg) = local {
        tokio::task::spawn_blocking(move || drop(pg)).await?;
    }
    Ok(report)
}

/// Removes a temporary file when dropped, however the demo ends.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The file given, which must exist; without one, the sample file, or a
/// freshly generated one when it is not there (running outside the
/// repository, or from the container image).
fn resolve_input(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(path) = given {
        anyhow::ensure!(
            path.is_file(),
            "cannot read the --input file {}: no such file",
            path.display()
        );
        return Ok(path.to_path_buf());
    }
    let path = Path::new(SAMPLE);
    if path.exists() {
        return Ok(path.to_path_buf());
    }
    // A name of this process's own, created new: a shared temporary
    // directory may hold another user's file, or a link, by a fixed name.
    let generated = std::env::temp_dir().join(format!(
        "energy-stream-demo-events-{}.jsonl",
        std::process::id()
    ));
    println!(
        "{} not found; generating sample events into {} (removed once sent)",
        path.display(),
        generated.display()
    );
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&generated)
        .with_context(|| format!("cannot write {}", generated.display()))?;
    crate::generate::generate(
        &crate::generate::GenerateConfig {
            bad_ratio: 0.02,
            ..Default::default()
        },
        file,
    )?;
    Ok(generated)
}
