//! Bench: the end-to-end throughput race against Postgres' own COPY ceiling.
//!
//! It owns one measured run: generate N events, load them into a real broker
//! topic, time the real `run` binary (all KPIs on, default settings) from
//! start until caught up, then time a plain binary COPY of the very rows it
//! wrote into an identical fresh table (ceiling A) and into one with the
//! primary key only (ceiling B), and report rates, ratios, batch latency and
//! the pipeline process's peak RSS. Optionally it also measures end-to-end
//! latency at a fixed, lower rate. Nothing here is used by the pipeline.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};

use crate::localpg::LocalPostgres;
use crate::produce::{ProduceConfig, produce};
use crate::source::KafkaConfig;
use crate::telemetry::Metrics;

#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub brokers: String,
    pub kafka_options: Vec<(String, String)>,
    /// A server to create the bench database on; None starts a throwaway one.
    pub database: Option<tokio_postgres::Config>,
    pub events: u64,
    pub partitions: i32,
    /// Fail (exit 1) when pipeline / ceiling falls below this for either ceiling.
    pub min_ratio: f64,
    /// Seconds of the latency run at 10% of the measured rate; 0 skips it.
    pub latency_secs: u64,
    /// Extra arguments for `run` (e.g. `--batch-max-rows 5000`).
    pub run_args: Vec<String>,
    pub queries_dir: PathBuf,
}

/// What one bench run measured.
#[derive(Debug, Clone, Default)]
pub struct BenchReport {
    pub events: u64,
    pub pipeline_secs: f64,
    pub ceiling_a_secs: f64,
    pub ceiling_b_secs: f64,
    pub peak_rss_mb: f64,
    pub run_summary: String,
    pub latency: Option<LatencyReport>,
}

#[derive(Debug, Clone, Default)]
pub struct LatencyReport {
    pub rate: f64,
    pub secs: u64,
    pub run_summary: String,
    pub peak_rss_mb: f64,
}

impl BenchReport {
    pub fn pipeline_rate(&self) -> f64 {
        self.events as f64 / self.pipeline_secs
    }
    pub fn ceiling_a_rate(&self) -> f64 {
        self.events as f64 / self.ceiling_a_secs
    }
    pub fn ceiling_b_rate(&self) -> f64 {
        self.events as f64 / self.ceiling_b_secs
    }
    pub fn ratio_a(&self) -> f64 {
        self.pipeline_rate() / self.ceiling_a_rate()
    }
    pub fn ratio_b(&self) -> f64 {
        self.pipeline_rate() / self.ceiling_b_rate()
    }
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "| measure | value |")?;
        writeln!(f, "|---|---|")?;
        writeln!(f, "| events | {} |", self.events)?;
        writeln!(
            f,
            "| pipeline (`run`, all KPIs, start → caught up) | {:.0} events/s ({:.2} s) |",
            self.pipeline_rate(),
            self.pipeline_secs
        )?;
        writeln!(
            f,
            "| ceiling A: COPY into `events` clone (PK + BRIN) | {:.0} rows/s ({:.2} s) |",
            self.ceiling_a_rate(),
            self.ceiling_a_secs
        )?;
        writeln!(
            f,
            "| ceiling B: COPY into same columns, PK only | {:.0} rows/s ({:.2} s) |",
            self.ceiling_b_rate(),
            self.ceiling_b_secs
        )?;
        writeln!(f, "| ratio to A | {:.2} |", self.ratio_a())?;
        writeln!(f, "| ratio to B | {:.2} |", self.ratio_b())?;
        writeln!(f, "| peak RSS of `run` | {:.0} MB |", self.peak_rss_mb)?;
        writeln!(f, "| `run` summary | {} |", self.run_summary)?;
        if let Some(l) = &self.latency {
            writeln!(
                f,
                "| latency run: {:.0} events/s for {} s | {} (peak RSS {:.0} MB) |",
                l.rate, l.secs, l.run_summary, l.peak_rss_mb
            )?;
        }
        Ok(())
    }
}

/// The `run` process's stdout summary line and peak RSS.
struct RunOutcome {
    summary: String,
    peak_rss_mb: f64,
    elapsed: Duration,
}

/// Waits for `child`, reading its stdout; returns its peak RSS from wait4.
fn wait_run(mut child: std::process::Child, started: Instant) -> anyhow::Result<RunOutcome> {
    let mut stdout = child.stdout.take().expect("piped stdout");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: rusage is plain data; wait4 fills it for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let elapsed = started.elapsed();
    if r != pid {
        bail!("wait4 failed: {}", std::io::Error::last_os_error());
    }
    let out = reader.join().unwrap_or_default();
    if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
        bail!("`run` failed (status {status}); its stdout:\n{out}");
    }
    let summary = out
        .lines()
        .find_map(|l| l.strip_prefix("run summary: "))
        .unwrap_or("(no summary line)")
        .to_string();
    Ok(RunOutcome {
        summary,
        // ru_maxrss is in KiB on Linux.
        peak_rss_mb: usage.ru_maxrss as f64 / 1024.0,
        elapsed,
    })
}

/// A connection URL for a child process's environment (never its argv).
fn url_of(cfg: &tokio_postgres::Config) -> String {
    let enc = |s: &str| {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect::<String>()
    };
    let host = match cfg.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(tokio_postgres::config::Host::Unix(p)) => enc(&p.display().to_string()),
        None => "localhost".into(),
    };
    let user = cfg.get_user().unwrap_or("postgres");
    let password = cfg
        .get_password()
        .map(|p| format!(":{}", enc(&String::from_utf8_lossy(p))))
        .unwrap_or_default();
    format!(
        "postgres://{}{password}@{host}:{}/{}",
        enc(user),
        cfg.get_ports().first().copied().unwrap_or(5432),
        cfg.get_dbname().unwrap_or("postgres")
    )
}

fn spawn_run(
    cfg: &BenchConfig,
    topic: &str,
    group: &str,
    db_url: &str,
    stop_when_caught_up: bool,
) -> anyhow::Result<std::process::Child> {
    let exe = std::env::current_exe().context("cannot find the energy-stream binary")?;
    let mut c = Command::new(exe);
    c.args(["run", "--brokers", &cfg.brokers, "--topic", topic])
        .args(["--group-id", group, "--metrics-addr", "off"])
        .arg("--queries-dir")
        .arg(&cfg.queries_dir)
        .args(&cfg.run_args);
    for (k, v) in &cfg.kafka_options {
        c.arg("--kafka-option").arg(format!("{k}={v}"));
    }
    if stop_when_caught_up {
        c.arg("--stop-when-caught-up");
    }
    c.env("DATABASE_URL", db_url)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    c.spawn().context("cannot start `run`")
}

/// Times a binary COPY of `data` into `table`, commit included.
async fn timed_copy(
    client: &mut tokio_postgres::Client,
    table: &str,
    data: &bytes::Bytes,
) -> anyhow::Result<f64> {
    let t = Instant::now();
    let tx = client.transaction().await?;
    let sink = tx
        .copy_in(&format!("COPY {table} FROM STDIN (FORMAT binary)"))
        .await?;
    let mut sink = std::pin::pin!(sink);
    let mut rest = data.clone();
    while !rest.is_empty() {
        let chunk = rest.split_to(rest.len().min(4 << 20));
        sink.send(chunk).await?;
    }
    sink.as_mut().finish().await?;
    tx.commit().await?;
    Ok(t.elapsed().as_secs_f64())
}

/// Runs the whole race and returns the report; the caller decides on `min_ratio`.
pub async fn run(cfg: BenchConfig) -> anyhow::Result<BenchReport> {
    let mut _local = None;
    let server = match &cfg.database {
        Some(c) => c.clone(),
        None => {
            let pg = tokio::task::spawn_blocking(LocalPostgres::start)
                .await?
                .context("DATABASE_URL is not set, so the bench starts its own Postgres")?;
            let c = pg.url().parse()?;
            _local = Some(pg);
            c
        }
    };
    let stamp = chrono::Utc::now().format("%Y%m%d%H%M%S").to_string();
    let db_name = format!("energy_stream_bench_{stamp}");
    let admin = crate::sink::connect(&server).await?;
    admin
        .batch_execute(&format!("CREATE DATABASE {db_name}"))
        .await
        .context("cannot create the bench database")?;
    let mut db = server.clone();
    db.dbname(&db_name);
    let db_url = url_of(&db);

    // 1. N events into a real broker topic.
    let dir = std::env::temp_dir().join(format!("energy-stream-bench-{stamp}"));
    std::fs::create_dir_all(&dir)?;
    let input = dir.join("events.jsonl");
    let gen_cfg = crate::generate::GenerateConfig {
        events: cfg.events,
        customers: 10_000,
        days: 7,
        seed: 1,
        bad_ratio: 0.0,
        ..Default::default()
    };
    crate::generate::generate(&gen_cfg, std::fs::File::create(&input)?)?;
    let topic = format!("energy_bench_{stamp}");
    let kafka = KafkaConfig {
        brokers: cfg.brokers.clone(),
        topic: topic.clone(),
        group_id: "energy-stream-bench".into(),
        options: cfg.kafka_options.clone(),
    };
    let produce_cfg = ProduceConfig {
        kafka: kafka.clone(),
        input: input.clone(),
        partitions: cfg.partitions,
        rate: None,
        shuffle: false,
        repeat: false,
        live: false,
        bad_lines: dir.join("bad-lines.jsonl"),
    };
    let pc = produce_cfg.clone();
    let produced =
        tokio::task::spawn_blocking(move || produce(&pc, &AtomicBool::new(false), Metrics::new()))
            .await??;
    eprintln!("bench: loaded {produced}");
    if produced.sent != cfg.events {
        bail!(
            "only {} of {} events reached the broker",
            produced.sent,
            cfg.events
        );
    }

    // 2. The pipeline, start to caught up.
    let started = Instant::now();
    let child = spawn_run(&cfg, &topic, &format!("bench-{stamp}"), &db_url, true)?;
    let outcome = tokio::task::spawn_blocking(move || wait_run(child, started)).await??;
    eprintln!("bench: run {}", outcome.summary);
    let mut client = crate::sink::connect(&db).await?;
    let written: i64 = client
        .query_one("SELECT count(*) FROM events", &[])
        .await?
        .get(0);
    if written as u64 != cfg.events {
        bail!("`run` wrote {written} of {} events", cfg.events);
    }

    // 3. and 4. The same rows by plain COPY: the same table, then PK only.
    let mut data = bytes::BytesMut::new();
    {
        let stream = client
            .copy_out("COPY (SELECT * FROM events ORDER BY kafka_partition, kafka_offset) TO STDOUT (FORMAT binary)")
            .await?;
        let mut stream = std::pin::pin!(stream);
        while let Some(chunk) = stream.next().await {
            data.extend_from_slice(&chunk?);
        }
    }
    let data = data.freeze();
    client
        .batch_execute(
            "CREATE TABLE bench_ceiling_a (LIKE events INCLUDING ALL);
             CREATE TABLE bench_ceiling_b (LIKE events INCLUDING DEFAULTS);
             ALTER TABLE bench_ceiling_b ADD PRIMARY KEY (kafka_partition, kafka_offset)",
        )
        .await?;
    // Flush what the pipeline left dirty, so the ceilings start from the same calm.
    client.batch_execute("VACUUM ANALYZE").await?;
    let ceiling_a_secs = timed_copy(&mut client, "bench_ceiling_a", &data).await?;
    let ceiling_b_secs = timed_copy(&mut client, "bench_ceiling_b", &data).await?;

    let mut report = BenchReport {
        events: cfg.events,
        pipeline_secs: outcome.elapsed.as_secs_f64(),
        ceiling_a_secs,
        ceiling_b_secs,
        peak_rss_mb: outcome.peak_rss_mb,
        run_summary: outcome.summary,
        latency: None,
    };

    // 5. Latency at about 10% of the measured rate, on a second topic.
    if cfg.latency_secs > 0 {
        let rate = (report.pipeline_rate() * 0.1).max(1.0);
        let topic = format!("{topic}_latency");
        crate::produce::ensure_topic(
            &KafkaConfig {
                topic: topic.clone(),
                ..kafka.clone()
            },
            cfg.partitions,
        )?;
        admin
            .batch_execute(&format!("CREATE DATABASE {db_name}_latency"))
            .await?;
        let mut ldb = server.clone();
        ldb.dbname(format!("{db_name}_latency"));
        let started = Instant::now();
        let child = spawn_run(
            &cfg,
            &topic,
            &format!("bench-lat-{stamp}"),
            &url_of(&ldb),
            false,
        )?;
        let pid = child.id() as libc::pid_t;
        let waiter = tokio::task::spawn_blocking(move || wait_run(child, started));
        // Let the consumer join before the clock starts.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let stop = Arc::new(AtomicBool::new(false));
        let pc = ProduceConfig {
            kafka: KafkaConfig {
                topic,
                ..kafka.clone()
            },
            rate: Some(rate),
            repeat: true,
            ..produce_cfg.clone()
        };
        let s = stop.clone();
        let producer = tokio::task::spawn_blocking(move || produce(&pc, &s, Metrics::new()));
        tokio::time::sleep(Duration::from_secs(cfg.latency_secs)).await;
        stop.store(true, Ordering::Relaxed);
        producer.await??;
        // Give the last batch its linger and commit, then stop `run` cleanly.
        tokio::time::sleep(Duration::from_secs(3)).await;
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let outcome = waiter.await??;
        report.latency = Some(LatencyReport {
            rate,
            secs: cfg.latency_secs,
            run_summary: outcome.summary,
            peak_rss_mb: outcome.peak_rss_mb,
        });
        admin
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {db_name}_latency WITH (FORCE)"
            ))
            .await?;
    }

    drop(client);
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {db_name} WITH (FORCE)"))
        .await?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn child_urls_carry_every_part_encoded() {
        let mut c = tokio_postgres::Config::new();
        c.host("db.example")
            .port(6543)
            .user("app user")
            .password("p@ss:w/rd")
            .dbname("bench");
        let url = url_of(&c);
        assert_eq!(
            url,
            "postgres://app%20user:p%40ss%3Aw%2Frd@db.example:6543/bench"
        );
        let back: tokio_postgres::Config = url.parse().unwrap();
        assert_eq!(back.get_password(), Some(&b"p@ss:w/rd"[..]));
        assert_eq!(back.get_user(), Some("app user"));
    }
}
