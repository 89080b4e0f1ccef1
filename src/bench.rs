//! Bench: the end-to-end throughput race against Postgres' own COPY ceiling.
//!
//! It owns one measured run: generate N events, load them into a real broker
//! topic, install the schema, time the real `run` binary (all KPIs on,
//! default settings) from start until caught up (Postgres holds its last
//! offsets, read from outside the pipeline: [`watch_offsets`]), then time a
//! plain binary COPY of the very rows it
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
    /// librdkafka options for the bench's producer and topic set-up (the
    /// `KAFKA_OPT_*` variables); `run` reads them from the environment it
    /// inherits, not from its argv, where secrets are refused.
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
    /// What was measured on, and how: (what, value) rows printed first.
    pub context: Vec<(String, String)>,
    pub events: u64,
    /// How many KPI files `run` computed.
    pub kpis: usize,
    /// The extra arguments `run` had (e.g. `--no-kpis`), for the report.
    pub run_args: Vec<String>,
    /// From starting `run` until Postgres held its last offsets.
    pub pipeline_secs: f64,
    /// From starting `run` until it exited on its own, caught up.
    pub exit_secs: f64,
    pub ceiling_a_secs: f64,
    pub ceiling_b_secs: f64,
    pub peak_rss_mb: f64,
    pub run_summary: String,
    pub latency: Option<LatencyReport>,
}

#[derive(Debug, Clone, Default)]
pub struct LatencyReport {
    /// The rate asked of the producer: 10% of the measured one.
    pub rate: f64,
    pub secs: u64,
    /// What the producer sent, and over how long.
    pub sent: u64,
    pub sent_secs: f64,
    pub run_summary: String,
    pub peak_rss_mb: f64,
    /// End-to-end latency after the warm-up, from `run`'s histogram.
    pub steady: Option<SteadyLatency>,
}

/// Seconds at the start of the latency run left out of the steady-state figures.
const LATENCY_WARM_UP_SECS: u64 = 5;

/// End-to-end latency of the batches committed after the warm-up, from the
/// difference of two scrapes of `energy_stream_end_to_end_latency_seconds`.
/// Quantiles are interpolated within buckets, as Prometheus'
/// `histogram_quantile` does.
#[derive(Debug, Clone, PartialEq)]
pub struct SteadyLatency {
    pub warm_up_secs: u64,
    pub batches: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Share of those batches at or under 750 ms (the default 500 ms
    /// `batch-max-wait` + 250 ms).
    pub share_within_750ms: f64,
}

impl SteadyLatency {
    /// `before` and `after` are cumulative (upper bound in seconds, count) buckets.
    fn between(before: &[(f64, f64)], after: &[(f64, f64)], warm_up_secs: u64) -> Self {
        let buckets: Vec<(f64, f64)> = after
            .iter()
            .map(|&(le, n)| {
                let was = before
                    .iter()
                    .find(|(l, _)| *l == le)
                    .map_or(0.0, |(_, n)| *n);
                (le, n - was)
            })
            .collect();
        let total = buckets.last().map_or(0.0, |b| b.1);
        let quantile = |q: f64| -> f64 {
            if total == 0.0 {
                return f64::NAN;
            }
            let rank = q * total;
            let mut prev = (0.0, 0.0);
            for &(le, n) in &buckets {
                if n >= rank {
                    if le.is_infinite() {
                        return prev.0 * 1000.0;
                    }
                    let within = (rank - prev.1) / (n - prev.1).max(f64::MIN_POSITIVE);
                    return (prev.0 + (le - prev.0) * within) * 1000.0;
                }
                prev = (le, n);
            }
            f64::NAN
        };
        let within = buckets
            .iter()
            .find(|(le, _)| (*le - 0.75).abs() < 1e-9)
            .map_or(f64::NAN, |(_, n)| n / total);
        SteadyLatency {
            warm_up_secs,
            batches: total,
            p50_ms: quantile(0.5),
            p99_ms: quantile(0.99),
            share_within_750ms: within,
        }
    }
}

/// The cumulative buckets of the end-to-end latency histogram at `addr`.
async fn scrape_e2e(addr: std::net::SocketAddr) -> anyhow::Result<Vec<(f64, f64)>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr).await?;
    conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await?;
    let mut body = String::new();
    conn.read_to_string(&mut body).await?;
    let buckets = parse_buckets(&body, crate::telemetry::END_TO_END_LATENCY);
    if buckets.is_empty() {
        bail!(
            "no {} buckets at {addr}",
            crate::telemetry::END_TO_END_LATENCY
        );
    }
    Ok(buckets)
}

/// `name_bucket{le="x"} n` lines of a Prometheus text exposition.
fn parse_buckets(text: &str, name: &str) -> Vec<(f64, f64)> {
    let prefix = format!("{name}_bucket{{le=\"");
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(&prefix)?;
            let (le, n) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, n.trim().parse().ok()?))
        })
        .collect()
}

/// A loopback address with a port free right now.
fn free_loopback_addr() -> anyhow::Result<std::net::SocketAddr> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?)
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
        for (what, value) in &self.context {
            writeln!(f, "| {what} | {value} |")?;
        }
        writeln!(f, "| events | {} |", self.events)?;
        let kpis = match self.kpis {
            0 => "no KPI".to_string(),
            1 => "1 KPI file".to_string(),
            n => format!("{n} KPI files"),
        };
        let run = if self.run_args.is_empty() {
            format!("`run`, defaults, {kpis}")
        } else {
            format!("`run {}`, {kpis}", self.run_args.join(" "))
        };
        writeln!(
            f,
            "| pipeline ({run}, start → last offset committed) | {:.0} events/s ({:.2} s) |",
            self.pipeline_rate(),
            self.pipeline_secs
        )?;
        writeln!(
            f,
            "| `run` exits on its own (notices it is caught up, leaves the group) | after {:.2} s |",
            self.exit_secs
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
        writeln!(f, "| peak RSS of `run` | {:.0} MiB |", self.peak_rss_mb)?;
        writeln!(f, "| `run` summary | {} |", self.run_summary)?;
        if let Some(l) = &self.latency {
            writeln!(
                f,
                "| latency run: {:.0} events/s asked for {} s; {} sent in {:.1} s ({:.0} events/s) | {} (peak RSS {:.0} MiB) |",
                l.rate,
                l.secs,
                l.sent,
                l.sent_secs,
                l.sent as f64 / l.sent_secs.max(f64::MIN_POSITIVE),
                l.run_summary,
                l.peak_rss_mb
            )?;
            if let Some(s) = &l.steady {
                writeln!(
                    f,
                    "| latency run after the first {} s ({:.0} batches) | end-to-end p50 {:.0} ms, p99 {:.0} ms; {:.1}% of batches within 750 ms |",
                    s.warm_up_secs,
                    s.batches,
                    s.p50_ms,
                    s.p99_ms,
                    s.share_within_750ms * 100.0
                )?;
            }
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

/// The `run` children alive, so that an interrupted bench stops them
/// instead of leaving them writing into a database it drops.
#[derive(Clone, Default)]
struct Children(Arc<std::sync::Mutex<Vec<libc::pid_t>>>);

impl Children {
    fn add(&self, pid: libc::pid_t) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(pid);
    }

    fn remove(&self, pid: libc::pid_t) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|p| *p != pid);
    }

    fn alive(&self) -> Vec<libc::pid_t> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// SIGTERM to each (a clean stop: in-flight batches commit), then,
    /// after `grace`, SIGKILL to those still there. Their waiters reap them.
    async fn stop(&self, grace: Duration) {
        for pid in self.alive() {
            // SAFETY: signalling our own child process, not yet reaped.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + grace;
        while !self.alive().is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for pid in self.alive() {
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        while !self.alive().is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The largest `VmHWM` of the child `pid` seen after its exec, in KiB,
/// sampled until `done`. wait4's `ru_maxrss` would do, but Linux carries the
/// high-water mark across exec: a child started while the bench held its
/// copy of the rows reported the bench's memory (223 MiB against the
/// child's own 94).
fn sample_peak_rss(pid: libc::pid_t, done: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut peak = 0;
        let proc_dir = PathBuf::from(format!("/proc/{pid}"));
        // Before its exec, the child is a copy of this process.
        let own = std::fs::read("/proc/self/cmdline").unwrap_or_default();
        while !done.load(Ordering::Relaxed) {
            let execed =
                std::fs::read(proc_dir.join("cmdline")).is_ok_and(|c| !c.is_empty() && c != own);
            if execed
                && let Ok(status) = std::fs::read_to_string(proc_dir.join("status"))
                && let Some(kib) = status
                    .lines()
                    .find_map(|l| l.strip_prefix("VmHWM:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            {
                peak = peak.max(kib);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        peak
    })
}

/// Waits for `child`, reading its stdout; returns its summary and peak RSS.
fn wait_run(
    mut child: std::process::Child,
    started: Instant,
    children: Children,
) -> anyhow::Result<RunOutcome> {
    let mut stdout = child.stdout.take().expect("piped stdout");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let pid = child.id() as libc::pid_t;
    let done = Arc::new(AtomicBool::new(false));
    let sampler = sample_peak_rss(pid, done.clone());
    let mut status = 0;
    // SAFETY: rusage is plain data; wait4 fills it for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let elapsed = started.elapsed();
    children.remove(pid);
    done.store(true, Ordering::Relaxed);
    let sampled = sampler.join().unwrap_or(0);
    if r != pid {
        bail!("wait4 failed: {}", std::io::Error::last_os_error());
    }
    let out = reader.join().unwrap_or_default();
    if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
        use std::os::unix::process::ExitStatusExt;
        let status = std::process::ExitStatus::from_raw(status);
        if out.trim().is_empty() {
            bail!("`run` failed ({status}); its errors are above");
        }
        bail!("`run` failed ({status}); its errors are above, and its stdout:\n{out}");
    }
    let summary = out
        .lines()
        .find_map(|l| l.strip_prefix("run summary: "))
        .unwrap_or("(no summary line)")
        .to_string();
    // ru_maxrss (KiB on Linux) only if no sample came: a `run` too short to
    // be seen after its exec.
    let kib = if sampled > 0 {
        sampled
    } else {
        usage.ru_maxrss as u64
    };
    Ok(RunOutcome {
        summary,
        peak_rss_mb: kib as f64 / 1024.0,
        elapsed,
    })
}

/// How often [`watch_offsets`] reads the stored offsets: a few milliseconds
/// of resolution, for a query that costs Postgres well under a millisecond.
const OFFSETS_POLL: Duration = Duration::from_millis(5);

/// Reads the offsets `run` stores for `group` until `exited` is set, and
/// returns when (after `started`) they first reached their final value: the
/// moment everything `run` consumed was committed. Polling stops only after
/// the process exited, so the final value is known to be final.
async fn watch_offsets(
    db: tokio_postgres::Config,
    group: String,
    topic: String,
    started: Instant,
    exited: Arc<AtomicBool>,
) -> anyhow::Result<Duration> {
    let client = crate::sink::connect(&db).await?;
    let mut seen: Option<(i64, Duration)> = None;
    loop {
        // Read after the exit too: that last read is the final value.
        let last = exited.load(Ordering::Relaxed);
        let read = client
            .query_one(
                "SELECT coalesce(sum(next_offset), 0)::int8 FROM consumer_offsets \
                 WHERE group_id = $1 AND topic = $2",
                &[&group, &topic],
            )
            .await;
        let at = started.elapsed();
        let sum: i64 = read.context("cannot read the offsets `run` stores")?.get(0);
        if seen.is_none_or(|(s, _)| s != sum) {
            seen = Some((sum, at));
        }
        if last {
            return seen
                .map(|(_, at)| at)
                .context("`run` exited before it stored any offset");
        }
        tokio::time::sleep(OFFSETS_POLL).await;
    }
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
        // An IPv6 address must be bracketed, or its colons read as the port's.
        Some(tokio_postgres::config::Host::Tcp(h)) if h.contains(':') => format!("[{h}]"),
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
    // The settings that change how the children reach the server: without
    // them a bench given `sslmode=require` ran its `run` and `migrate` as
    // `prefer`, and lost `options` (a search_path, say).
    let mut params = Vec::new();
    match cfg.get_ssl_mode() {
        tokio_postgres::config::SslMode::Disable => params.push("sslmode=disable".to_string()),
        tokio_postgres::config::SslMode::Require => params.push("sslmode=require".to_string()),
        _ => {}
    }
    if let Some(o) = cfg.get_options() {
        params.push(format!("options={}", enc(o)));
    }
    if cfg.get_target_session_attrs() == tokio_postgres::config::TargetSessionAttrs::ReadWrite {
        params.push("target_session_attrs=read-write".into());
    }
    let query = if params.is_empty() {
        String::new()
    } else {
        format!("?{}", params.join("&"))
    };
    format!(
        "postgres://{}{password}@{host}:{}/{}{query}",
        enc(user),
        cfg.get_ports().first().copied().unwrap_or(5432),
        cfg.get_dbname().unwrap_or("postgres")
    )
}

/// This binary's `subcommand` against the database at `db_url` (given in
/// the environment, never argv), with `run`'s KPI files and quiet logs.
fn child(cfg: &BenchConfig, subcommand: &str, db_url: &str) -> anyhow::Result<Command> {
    let exe = std::env::current_exe().context("cannot find the energy-stream binary")?;
    let mut c = Command::new(exe);
    c.arg(subcommand)
        .arg("--queries-dir")
        .arg(&cfg.queries_dir)
        .env("DATABASE_URL", db_url)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null());
    Ok(c)
}

/// Runs `energy-stream migrate` for `run`'s KPI files on the database at
/// `db_url`, and waits for it.
fn install_schema(cfg: &BenchConfig, db_url: &str) -> anyhow::Result<()> {
    let out = child(cfg, "migrate", db_url)?
        .args(cfg.run_args.iter().filter(|a| *a == "--no-kpis"))
        .output()
        .context("cannot start `migrate`")?;
    if !out.status.success() {
        bail!(
            "`migrate` failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn spawn_run(
    cfg: &BenchConfig,
    topic: &str,
    group: &str,
    db_url: &str,
    stop_when_caught_up: bool,
    metrics: Option<std::net::SocketAddr>,
    children: &Children,
) -> anyhow::Result<std::process::Child> {
    let mut c = child(cfg, "run", db_url)?;
    c.args(["--brokers", &cfg.brokers, "--topic", topic])
        .args(["--group-id", group, "--metrics-addr"])
        .arg(metrics.map_or("off".to_string(), |a| a.to_string()))
        .args(&cfg.run_args);
    if stop_when_caught_up {
        c.arg("--stop-when-caught-up");
    }
    c.stdout(Stdio::piped()).stderr(Stdio::inherit());
    let child = c.spawn().context("cannot start `run`")?;
    children.add(child.id() as libc::pid_t);
    Ok(child)
}

/// A checkpoint before each timed phase. The pipeline's million rows and the
/// ceilings' two copies write more WAL than Postgres lets pass between
/// checkpoints (with the default `max_wal_size`), so one used to start inside
/// a timed phase: in the server log of twenty-odd back-to-back 1 M benches, a
/// WAL-triggered checkpoint started in every run, during the last ceiling.
/// Starting each phase right after a checkpoint keeps that out of every
/// clock (with the defaults it moved no number beyond the spread between
/// runs; with a smaller `max_wal_size` it would). A role that may not
/// checkpoint (neither superuser nor `pg_checkpoint`) gets a warning, and the
/// phases take their chances.
struct Checkpoints {
    allowed: bool,
}

impl Checkpoints {
    async fn new(admin: &tokio_postgres::Client) -> Self {
        let allowed = admin
            .query_one(
                // pg_checkpoint is new in Postgres 15: before, only superusers.
                "SELECT r.rolsuper OR coalesce((SELECT pg_has_role(current_user, c.oid, 'MEMBER') \
                 FROM pg_roles c WHERE c.rolname = 'pg_checkpoint'), false) \
                 FROM pg_roles r WHERE r.rolname = current_user",
                &[],
            )
            .await
            .is_ok_and(|r| r.get::<_, bool>(0));
        if !allowed {
            eprintln!(
                "bench: this role may not CHECKPOINT (needs superuser or pg_checkpoint): \
                 a checkpoint may start inside a timed phase and slow it"
            );
        }
        Checkpoints { allowed }
    }

    async fn take(&self, admin: &tokio_postgres::Client) -> anyhow::Result<()> {
        if self.allowed {
            admin
                .batch_execute("CHECKPOINT")
                .await
                .context("CHECKPOINT before a timed phase")?;
        }
        Ok(())
    }
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

/// Runs the whole race and returns the report; the caller decides on
/// `min_ratio`. None when `interrupted` came first: the `run` children are
/// stopped, and the database, the generated files and a throwaway server
/// are removed all the same.
pub async fn run(
    cfg: BenchConfig,
    interrupted: impl std::future::Future<Output = ()>,
) -> anyhow::Result<Option<BenchReport>> {
    // `run` reads the KPI files only after the events are generated and
    // loaded: a wrong directory is refused before that work, not after it.
    let kpis = if cfg.run_args.iter().any(|a| a == "--no-kpis") {
        0
    } else {
        crate::kpi::KpiEngine::load_dir(&crate::kpi::KpiConfig {
            dir: cfg.queries_dir.clone(),
            ..Default::default()
        })
        .await
        .with_context(|| {
            format!(
                "the bench runs every KPI of {} (--queries-dir; `-- --no-kpis` runs none)",
                cfg.queries_dir.display()
            )
        })?
        .len()
    };
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
    let stamp = run_stamp();
    let db_name = format!("energy_stream_bench_{stamp}");
    let admin = crate::sink::connect(&server).await?;
    if _local.is_some() {
        // The throwaway server is tuned for tests (no fsync). Commits would
        // then cost the pipeline, which commits every batch, less than a
        // real server makes them cost, against the ceilings' one commit.
        // One statement at a time: ALTER SYSTEM refuses a transaction
        // block, which several statements in one query make.
        for sql in [
            "ALTER SYSTEM SET fsync = on",
            "ALTER SYSTEM SET full_page_writes = on",
            "SELECT pg_reload_conf()",
        ] {
            admin
                .batch_execute(sql)
                .await
                .context("cannot make the throwaway server durable")?;
        }
    }
    let context = context(&cfg, &admin, _local.is_some()).await;
    admin
        .batch_execute(&format!("CREATE DATABASE {db_name}"))
        .await
        .map_err(|e| {
            let hint = if e.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) {
                " (the DATABASE_URL role needs CREATEDB, or leave DATABASE_URL unset for a throwaway server)"
            } else {
                ""
            };
            anyhow::Error::new(e).context(format!("cannot create the bench database{hint}"))
        })?;
    let dir = std::env::temp_dir().join(format!("energy-stream-bench-{stamp}"));
    let children = Children::default();
    let stop = Arc::new(AtomicBool::new(false));
    let raced = race(
        &cfg, &server, &admin, &db_name, &stamp, &dir, &children, &stop,
    );
    let result = tokio::select! {
        r = raced => r.map(|mut report| {
            report.context = context;
            report.kpis = kpis;
            Some(report)
        }),
        () = interrupted => {
            eprintln!("bench: interrupted; stopping `run` and removing what the bench made");
            Ok(None)
        }
    };
    // The producers (blocking threads) and `run` children end before their
    // database goes.
    stop.store(true, Ordering::Relaxed);
    children.stop(Duration::from_secs(30)).await;
    // Whatever happened (an unreachable broker, a failed `run`, a Ctrl-C),
    // leave no bench database and no generated files behind.
    for db in [db_name.clone(), format!("{db_name}_latency")] {
        if let Err(e) = admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
            .await
        {
            eprintln!("bench: cannot drop the bench database {db}: {e}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// The machine, the server, the broker and the command, for the report:
/// BENCHMARKS.md records each run with them.
async fn context(
    cfg: &BenchConfig,
    admin: &tokio_postgres::Client,
    throwaway: bool,
) -> Vec<(String, String)> {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or("?".into(), |kib| {
            format!("{:.1} GiB", kib as f64 / 1048576.0)
        });
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or("?".into(), |k| k.trim().to_string());
    let postgres = admin
        .query_one(
            "SELECT current_setting('server_version'), current_setting('fsync'), \
             current_setting('synchronous_commit'), current_setting('ssl')",
            &[],
        )
        .await
        .map_or("?".into(), |r| {
            format!(
                "{} (fsync {}, synchronous_commit {}, ssl {}){}",
                r.get::<_, String>(0),
                r.get::<_, String>(1),
                r.get::<_, String>(2),
                r.get::<_, String>(3),
                if throwaway {
                    ", a throwaway server the bench started (DATABASE_URL unset)"
                } else {
                    ", the DATABASE_URL server"
                }
            )
        });
    vec![
        (
            "date".into(),
            chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string(),
        ),
        (
            "command".into(),
            format!("`{}`", std::env::args().collect::<Vec<_>>().join(" ")),
        ),
        (
            "build".into(),
            format!(
                "energy-stream {}{}",
                env!("CARGO_PKG_VERSION"),
                if cfg!(debug_assertions) {
                    ", debug build"
                } else {
                    ""
                }
            ),
        ),
        (
            "machine".into(),
            format!("{cpu}, {cores} CPUs, {memory}, Linux {kernel}"),
        ),
        ("Postgres".into(), postgres),
        ("broker".into(), cfg.brokers.clone()),
    ]
}

/// Names this bench's database, topic and files. Two benches started in the
/// same second (tests in parallel, two users on one server) must not share
/// them: with the time alone, one bench failed because the other's database
/// existed, and two could have streamed into one topic. The process id and a counter make
/// the name unique on a host; the sub-second digits, across hosts in practice.
fn run_stamp() -> String {
    static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let now = chrono::Utc::now();
    format!(
        "{}_{}_{}_{}",
        now.format("%Y%m%d%H%M%S"),
        now.timestamp_subsec_micros(),
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// Steps 1 to 5 in the fresh database `db_name`.
#[allow(clippy::too_many_arguments)]
async fn race(
    cfg: &BenchConfig,
    server: &tokio_postgres::Config,
    admin: &tokio_postgres::Client,
    db_name: &str,
    stamp: &str,
    dir: &std::path::Path,
    children: &Children,
    stop: &Arc<AtomicBool>,
) -> anyhow::Result<BenchReport> {
    let mut db = server.clone();
    db.dbname(db_name);
    let db_url = url_of(&db);

    // 1. N events into a real broker topic.
    std::fs::create_dir_all(dir)?;
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
        input_once: false,
        bad_lines: dir.join("bad-lines.jsonl"),
    };
    let pc = produce_cfg.clone();
    let s = stop.clone();
    let produced =
        tokio::task::spawn_blocking(move || produce(&pc, &s, Metrics::new(), Arc::default()))
            .await??;
    eprintln!("bench: loaded {produced}");
    if produced.sent != cfg.events {
        bail!(
            "only {} of {} events reached the broker",
            produced.sent,
            cfg.events
        );
    }

    // The schema and the KPI tables go in first, untimed, as a deployment
    // installs them (`energy-stream migrate`) and as the ceilings' tables
    // are created before their clock starts: `run` then starts as any
    // restart does, against an installed schema.
    install_schema(cfg, &db_url)?;
    let checkpoints = Checkpoints::new(admin).await;
    checkpoints.take(admin).await?;

    // 2. The pipeline, start to caught up. The clock stops when Postgres
    // holds the group's last offsets, seen from outside the pipeline: `run`
    // still takes a while to notice it is caught up (every partition silent
    // for a moment), leave the group and exit, and that is not ingest. The
    // exit is reported too.
    let group = format!("bench-{stamp}");
    let started = Instant::now();
    let child = spawn_run(cfg, &topic, &group, &db_url, true, None, children)?;
    let exited = Arc::new(AtomicBool::new(false));
    let watcher = tokio::spawn(watch_offsets(
        db.clone(),
        group,
        topic.clone(),
        started,
        exited.clone(),
    ));
    let reaper = children.clone();
    let outcome = tokio::task::spawn_blocking(move || wait_run(child, started, reaper)).await;
    exited.store(true, Ordering::Relaxed);
    let outcome = outcome??;
    let caught_up = watcher.await??;
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
    // Vacuum what the pipeline wrote now, so that autovacuum does not start on it
    // inside a ceiling's clock; then a checkpoint, as before every timed phase.
    client.batch_execute("VACUUM ANALYZE").await?;
    checkpoints.take(admin).await?;
    let ceiling_a_secs = timed_copy(&mut client, "bench_ceiling_a", &data).await?;
    checkpoints.take(admin).await?;
    let ceiling_b_secs = timed_copy(&mut client, "bench_ceiling_b", &data).await?;
    // Not held while the latency run's child is forked.
    drop(data);

    let mut report = BenchReport {
        context: Vec::new(),
        kpis: 0,
        events: cfg.events,
        run_args: cfg.run_args.clone(),
        pipeline_secs: caught_up.as_secs_f64(),
        exit_secs: outcome.elapsed.as_secs_f64(),
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
        let metrics_addr = free_loopback_addr()?;
        let started = Instant::now();
        let child = spawn_run(
            cfg,
            &topic,
            &format!("bench-lat-{stamp}"),
            &url_of(&ldb),
            false,
            Some(metrics_addr),
            children,
        )?;
        let pid = child.id() as libc::pid_t;
        let reaper = children.clone();
        let waiter = tokio::task::spawn_blocking(move || wait_run(child, started, reaper));
        // Let the consumer join before the producer starts.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let latency_stop = Arc::new(AtomicBool::new(false));
        let pc = ProduceConfig {
            kafka: KafkaConfig {
                topic,
                ..kafka.clone()
            },
            rate: Some(rate),
            repeat: true,
            ..produce_cfg.clone()
        };
        // Stopped at the end of the latency run, or with the bench.
        let (s, outer) = (latency_stop.clone(), stop.clone());
        let producer = tokio::task::spawn_blocking(move || {
            let both = AtomicBool::new(false);
            std::thread::scope(|scope| {
                scope.spawn(|| {
                    while !s.load(Ordering::Relaxed) && !outer.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    both.store(true, Ordering::Relaxed);
                });
                let produce_started = Instant::now();
                let sent = produce(&pc, &both, Metrics::new(), Arc::default());
                // Until the stop, not until the last delivery report.
                sent.map(|sent| (sent, produce_started.elapsed()))
            })
        });
        // A fresh producer's first messages wait for its connection and
        // producer id, and the consumer's first fetches for the group: the
        // steady state is measured after that, from `run`'s own histogram.
        let warm_up = Duration::from_secs(LATENCY_WARM_UP_SECS.min(cfg.latency_secs / 2));
        tokio::time::sleep(warm_up).await;
        let before = scrape_e2e(metrics_addr).await;
        tokio::time::sleep(Duration::from_secs(cfg.latency_secs) - warm_up).await;
        latency_stop.store(true, Ordering::Relaxed);
        let (sent, sent_for) = producer.await??;
        // Give the last batch its linger and commit, then stop `run` cleanly.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let after = scrape_e2e(metrics_addr).await;
        let steady = match (before, after) {
            (Ok(b), Ok(a)) => Some(SteadyLatency::between(&b, &a, warm_up.as_secs())),
            (Err(e), _) | (_, Err(e)) => {
                eprintln!("bench: cannot read the latency histogram of `run`: {e:#}");
                None
            }
        };
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let outcome = waiter.await??;
        report.latency = Some(LatencyReport {
            rate,
            secs: cfg.latency_secs,
            sent: sent.sent,
            sent_secs: sent_for.as_secs_f64(),
            run_summary: outcome.summary,
            peak_rss_mb: outcome.peak_rss_mb,
            steady,
        });
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression: the latency run's peak RSS was the bench's own, which
    /// Linux carries into a child's `ru_maxrss` across its exec.
    #[test]
    fn a_childs_peak_rss_is_its_own_not_its_parents() {
        // The parent holds 256 MiB, every page touched.
        let ballast = vec![1u8; 256 << 20];
        let child = Command::new("sleep").arg("0.5").spawn().unwrap();
        let pid = child.id() as libc::pid_t;
        // Reaped below by wait4, which also gives the kernel's figure.
        std::mem::forget(child);
        let done = Arc::new(AtomicBool::new(false));
        let sampler = sample_peak_rss(pid, done.clone());
        let mut status = 0;
        // SAFETY: as in wait_run.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::wait4(pid, &mut status, 0, &mut usage) }, pid);
        done.store(true, Ordering::Relaxed);
        let sampled = sampler.join().unwrap();
        assert!(
            usage.ru_maxrss as u64 >= 200 << 10,
            "the kernel's figure carries the parent's {} KiB",
            usage.ru_maxrss
        );
        assert!(
            sampled > 0 && sampled < 32 << 10,
            "sleep's own peak, not the parent's: {sampled} KiB"
        );
        assert_eq!(ballast[ballast.len() - 1], 1);
    }

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

        // Regression: only host, port, user, password and database were
        // kept, so the children lost sslmode and options, and an IPv6 host
        // did not parse.
        let mut c: tokio_postgres::Config =
            "postgres://u@[::1]:5433/db?sslmode=require&options=-c%20search_path%3Dbench&target_session_attrs=read-write"
                .parse()
                .unwrap();
        c.password("pw");
        let back: tokio_postgres::Config = url_of(&c).parse().unwrap();
        assert_eq!(
            back.get_ssl_mode(),
            tokio_postgres::config::SslMode::Require
        );
        assert_eq!(back.get_options(), Some("-c search_path=bench"));
        assert_eq!(
            back.get_target_session_attrs(),
            tokio_postgres::config::TargetSessionAttrs::ReadWrite
        );
        assert_eq!(
            back.get_hosts(),
            &[tokio_postgres::config::Host::Tcp("::1".into())]
        );
        assert_eq!(back.get_ports(), &[5433]);
    }

    /// Regression: two benches started in the same second shared a database
    /// and a topic name.
    #[test]
    fn each_bench_gets_its_own_database_and_topic_name() {
        let (a, b) = (run_stamp(), run_stamp());
        assert_ne!(a, b);
        for s in [a, b] {
            let db = format!("energy_stream_bench_{s}_latency");
            assert!(db.len() <= 63, "a Postgres identifier: {db}");
            assert!(
                s.chars().all(|c| c.is_ascii_digit() || c == '_'),
                "needs no quoting: {s}"
            );
        }
    }

    #[test]
    fn steady_latency_counts_only_batches_after_the_warm_up() {
        let metrics = Metrics::new();
        let exposition = |m: &Metrics| {
            use prometheus::Encoder;
            let mut buf = Vec::new();
            prometheus::TextEncoder::new()
                .encode(&m.registry.gather(), &mut buf)
                .unwrap();
            String::from_utf8(buf).unwrap()
        };
        // Warm-up: two slow batches.
        metrics.end_to_end_latency.observe(1.8);
        metrics.end_to_end_latency.observe(1.1);
        let before = parse_buckets(&exposition(&metrics), crate::telemetry::END_TO_END_LATENCY);
        for _ in 0..99 {
            metrics.end_to_end_latency.observe(0.65);
        }
        metrics.end_to_end_latency.observe(0.85);
        let after = parse_buckets(&exposition(&metrics), crate::telemetry::END_TO_END_LATENCY);
        let s = SteadyLatency::between(&before, &after, 5);
        assert_eq!(s.batches, 100.0);
        assert!((s.share_within_750ms - 0.99).abs() < 1e-9, "{s:?}");
        assert!(s.p50_ms > 600.0 && s.p50_ms <= 700.0, "{s:?}");
        assert!(s.p99_ms > 600.0 && s.p99_ms <= 700.0, "{s:?}");
    }
}
