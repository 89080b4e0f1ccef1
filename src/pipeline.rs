//! Pipeline: the only module that knows how the stages connect.
//!
//! ```text
//!  intake thread                  compute task             writer: two lanes, one connection each
//!  ─────────────                  ────────────             ──────────────────────────────────────
//!  source.poll ─► decode.push ──► validate ─► hand over ─► sink::begin_copy (open tx, COPY events
//!      ▲   ─► cut                 ─► KPI partials ·······► and rejects) ─► its KPI partials ─►
//!      │   (rebalance callbacks      (DataFusion)          wait for the baton ─► finish (offsets
//!      │    run here and set                               fence, KPI merges: new distinct members
//!      │    ownership)                                     decided against the memberships,
//!      │                                                   offsets) ─► gate + generation check ─►
//!      │                                                   COMMIT ─► memberships + Kafka group
//!      │                                                   commit ─► pass the baton
//!      └── blocks while the channels are full
//! ```
//!
//! Each channel holds at most [`CHANNEL_DEPTH`] batch, and the compute task
//! takes a batch only when the writer has taken the one before; when they are
//! full (Postgres slow or away) the intake blocks and stops polling, and
//! librdkafka stops fetching once its bounded queue is full, so memory stays
//! bounded: at most five batches (one being decoded, one in each channel, one
//! in each writer lane). The compute task hands a batch over as soon as it is
//! validated and sends its KPI partials after it (the dotted line), so a
//! batch's KPIs are computed while its rows are copied: batch N+2 is decoded,
//! and batch N+1 copied into Postgres and its KPI partials computed, while
//! batch N merges and commits.
//! Commits stay in order because only the lane holding the baton fences,
//! merges and commits, and it passes the baton on only after the Kafka group
//! commit. Which distinct members are new is decided by the baton holder,
//! inside its batch's transaction ([`crate::kpi::members`]).
//!
//! Around all this, [`run`] serves the HTTP endpoints and restarts the stages
//! in-process when the KPI files change (`run_kpi_sets`): the running stages
//! stop as on shutdown, committing what is in flight, and start again with
//! the new files from the offsets stored in Postgres.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chrono::Utc;
use datafusion::arrow::array::{Array, AsArray, RecordBatch};
use prometheus::core::Collector;
use rdkafka::Message;
use tokio::sync::mpsc;
use tokio_postgres::Client;

use crate::config::{FaultPoint, PipelineConfig};
use crate::decode::{BatchDecoder, MessageMeta};
use crate::event::col;
use crate::kpi::KpiEngine;
use crate::sink::{self, BatchWrite, PartitionOffsets, SinkError};
use crate::source::{
    self, KafkaSource, LastWritten, OffsetLoader, Ownership, Polled, StoredOffset,
};
use crate::telemetry::{Health, Metrics, kafka_error, stage};
use crate::validate::validate;

/// Batches waiting in each channel (intake → compute, compute → writer).
pub const CHANNEL_DEPTH: usize = 1;

/// A decoded micro-batch on its way to the writer.
struct Batch {
    /// The rows; emptied by the compute stage once validated.
    decoded: RecordBatch,
    /// How many rows `decoded` had.
    rows: usize,
    generation: u64,
    offsets: Vec<PartitionOffsets>,
    /// Kafka timestamp (ms) of the oldest message, for end-to-end latency.
    oldest_ts_ms: Option<i64>,
    decode_time: Duration,
    /// When the batch was closed, for the batch latency (cut to commit).
    cut_at: Instant,
}

/// A validated batch on its way to the writer. Its KPI partials follow on
/// `kpis`, so that the writer can COPY the rows while they are computed.
struct Computed {
    batch: Batch,
    validated: crate::validate::Validated,
    kpis: tokio::sync::oneshot::Receiver<KpiOutcome>,
    validate_time: Duration,
}

/// A batch's KPI partials, and the KPIs that failed on it.
struct KpiOutcome {
    deltas: Vec<crate::kpi::KpiDelta>,
    failures: Vec<crate::kpi::KpiFailure>,
    time: Duration,
}

/// What a finished run did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RunSummary {
    pub batches: u64,
    pub events_written: u64,
    pub rejected: u64,
    pub by_event_type: BTreeMap<String, u64>,
    pub by_reason: BTreeMap<String, u64>,
    /// Batch latency in microseconds: from the batch closing to its commit.
    pub batch_latency_us: Sample,
    /// End-to-end latency in milliseconds: from the Kafka timestamp of a
    /// batch's oldest message to its commit.
    pub end_to_end_ms: Sample,
}

impl RunSummary {
    /// Adds a later run's figures (the pipeline restarts when KPI files change).
    fn absorb(&mut self, other: RunSummary) {
        self.batches += other.batches;
        self.events_written += other.events_written;
        self.rejected += other.rejected;
        for (k, v) in other.by_event_type {
            *self.by_event_type.entry(k).or_default() += v;
        }
        for (k, v) in other.by_reason {
            *self.by_reason.entry(k).or_default() += v;
        }
        self.batch_latency_us.absorb(other.batch_latency_us);
        self.end_to_end_ms.absorb(other.end_to_end_ms);
    }
}

impl std::fmt::Display for RunSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms =
            |us: Option<u64>| us.map_or("-".to_string(), |v| format!("{:.1}", v as f64 / 1000.0));
        let e2e = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
        write!(
            f,
            "written={} rejected={} batches={} batch_latency_ms_p50={} batch_latency_ms_p99={} \
             end_to_end_ms_p50={} end_to_end_ms_p99={}",
            self.events_written,
            self.rejected,
            self.batches,
            ms(self.batch_latency_us.quantile(0.5)),
            ms(self.batch_latency_us.quantile(0.99)),
            e2e(self.end_to_end_ms.quantile(0.5)),
            e2e(self.end_to_end_ms.quantile(0.99)),
        )
    }
}

/// A bounded uniform sample of per-batch values (reservoir sampling), so a
/// process that runs for months keeps quantiles in constant memory.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Sample {
    seen: u64,
    values: Vec<u64>,
}

impl Sample {
    const CAPACITY: usize = 100_000;

    pub fn push(&mut self, v: u64) {
        self.seen += 1;
        if self.values.len() < Self::CAPACITY {
            self.values.push(v);
        } else {
            // A fixed splitmix64 sequence: the reservoir needs uniform, not secret.
            let mut z = self.seen.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            let i = (z ^ (z >> 31)) % self.seen;
            if (i as usize) < Self::CAPACITY {
                self.values[i as usize] = v;
            }
        }
    }

    /// Adds another sample's values (those it kept, when it was full).
    fn absorb(&mut self, other: Sample) {
        for v in other.values {
            self.push(v);
        }
    }

    /// The nearest-rank quantile `q` in [0, 1]; None when empty.
    pub fn quantile(&self, q: f64) -> Option<u64> {
        if self.values.is_empty() {
            return None;
        }
        let mut v = self.values.clone();
        v.sort_unstable();
        let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
        Some(v[rank - 1])
    }
}

#[cfg(test)]
mod topic_watch_tests {
    use super::{TOPIC_CHECK_EVERY, TopicWatch};
    use std::time::Instant;

    #[test]
    fn a_topic_missed_while_no_partition_is_held_is_back_with_an_assignment() {
        let t0 = Instant::now();
        let mut w = TopicWatch::new(t0);
        let is = |b: bool| move || b;
        let never = || -> bool { panic!("not asked") };
        assert_eq!(w.observe(t0, never, never), None, "not yet time to ask");
        let t1 = t0 + TOPIC_CHECK_EVERY;
        assert_eq!(w.observe(t1, is(false), is(false)), Some(true), "gone");
        assert_eq!(w.observe(t1, is(false), never), None, "said once");
        // A rebalance hands partitions over before the next ask.
        assert_eq!(w.observe(t1, is(true), never), Some(false), "back");
        assert_eq!(w.observe(t1, never, never), None);
        assert_eq!(w.observe(t1 + TOPIC_CHECK_EVERY, is(true), never), None);
        // Partitions gone again: asked on the clock, as before.
        let t2 = t1 + TOPIC_CHECK_EVERY * 2;
        assert_eq!(w.observe(t2, is(false), is(true)), None, "still there");
        let t3 = t2 + TOPIC_CHECK_EVERY;
        assert_eq!(w.observe(t3, is(false), is(false)), Some(true));
        let t4 = t3 + TOPIC_CHECK_EVERY;
        assert_eq!(
            w.observe(t4, is(false), is(true)),
            Some(false),
            "found again"
        );
    }
}

#[cfg(test)]
mod sample_tests {
    use super::Sample;

    #[test]
    fn quantiles_are_nearest_rank_and_memory_is_bounded() {
        let mut s = Sample::default();
        assert_eq!(s.quantile(0.5), None);
        for v in 1..=100 {
            s.push(v);
        }
        assert_eq!(s.quantile(0.5), Some(50));
        assert_eq!(s.quantile(0.99), Some(99));
        assert_eq!(s.quantile(1.0), Some(100));
        let mut s = Sample::default();
        for v in 0..1_000_000u64 {
            s.push(v % 1000);
        }
        assert_eq!(s.values.len(), Sample::CAPACITY);
        let p50 = s.quantile(0.5).unwrap();
        assert!((450..=550).contains(&p50), "uniform sample, p50 {p50}");
    }
}

/// Why `run` stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error(transparent)]
    Source(#[from] crate::source::SourceError),
    #[error("cannot bind the metrics endpoint on {addr}: {source}")]
    Metrics {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(
        "shutdown drain timed out after {0:?} with a batch still uncommitted; it will be consumed again on restart"
    )]
    DrainTimeout(Duration),
    #[error("KPI: {0}")]
    Kpi(String),
    /// Installing (creating, backfilling) the KPIs failed.
    #[error(transparent)]
    KpiInstall(SinkError),
    #[error("the intake thread failed: {0}")]
    Intake(String),
    /// `stop_when_caught_up`, and the group assigned nothing since the run
    /// joined it, for twice the rebalance limit.
    #[error(
        "no assignment from consumer group {group} for {waited:?} since joining it: its rebalance has not ended \
         (a member that does not rejoin, or a broker that lost the group), so this run to the end cannot read; \
         nothing was committed meanwhile. Run again later, or with another --group-id if members of this group no longer run"
    )]
    NoAssignment { group: String, waited: Duration },
    /// `stop_when_caught_up`, and the topic was not found (or the broker
    /// not reached) for twice the rebalance limit since the start.
    #[error(
        "topic {topic} not found on the broker for {waited:?} (or the broker is unreachable; last client error: {last_error}), \
         so this run to the end has nothing to read; nothing was committed. Create the topic (`energy-stream produce` creates it), \
         or check --brokers and --topic"
    )]
    TopicNotFound {
        topic: String,
        waited: Duration,
        last_error: String,
    },
}

struct PgOffsetLoader {
    handle: tokio::runtime::Handle,
    db: sink::Database,
    group_id: String,
    topic: String,
    /// The run's stop: a read that waits (behind a lock, on a frozen server)
    /// must not hold a shutdown for the whole database timeout.
    stop: tokio::sync::watch::Receiver<bool>,
}

impl OffsetLoader for PgOffsetLoader {
    fn load(&self) -> Result<HashMap<i32, StoredOffset>, String> {
        const STOPPED: &str = "stopped while reading the stored offsets";
        self.handle.block_on(async {
            let mut stop = self.stop.clone();
            let client = tokio::select! {
                c = self.db.connect() => c.map_err(|e| e.to_string())?,
                _ = stop.wait_for(|s| *s) => return Err(STOPPED.into()),
            };
            // Runs in the rebalance callback: a Postgres that stops answering
            // must not hold the assignment, and with it the group, forever.
            let loaded = {
                let read = self.db.bounded(
                    "reading the stored offsets",
                    sink::load_offsets(&client, &self.group_id, &self.topic),
                );
                tokio::select! {
                    r = read => r.map_err(|e| (e.kind() == "timeout", e.to_string())),
                    _ = stop.wait_for(|s| *s) => Err((true, STOPPED.to_string())),
                }
            };
            match loaded {
                Ok(offsets) => Ok(offsets),
                Err((unanswered, e)) => {
                    if unanswered {
                        self.db.abandon(client);
                    }
                    Err(e)
                }
            }
        })
    }
}

/// Runs the pipeline until `shutdown` resolves (or, with
/// `stop_when_caught_up`, until every owned partition is consumed to its end
/// and committed). On shutdown it stops intake, commits the in-flight batches
/// and returns.
///
/// With `kpi_watch` set, a change to the KPI files restarts the pipeline
/// in-process with them (see `run_kpi_sets`).
pub async fn run(
    cfg: PipelineConfig,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<RunSummary, PipelineError> {
    let health = Arc::new(Health::default());
    let (stop_http_tx, stop_http_rx) = tokio::sync::oneshot::channel::<()>();
    if let Some(addr) = cfg.metrics_addr {
        let (bound, _) = crate::telemetry::serve(addr, metrics.clone(), health.clone(), async {
            let _ = stop_http_rx.await;
        })
        .await
        .map_err(|source| PipelineError::Metrics { addr, source })?;
        tracing::info!(addr = %bound, "serving /metrics, /healthz and /readyz");
    }
    // Shutdown is honoured from the first moment, including while Postgres is
    // still unreachable at start.
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        tracing::info!("shutdown requested: stopping intake, committing in-flight batches");
        let _ = shutdown_tx.send(true);
        // Keep the sender alive so that late watchers still see `true`.
        std::future::pending::<()>().await;
    });
    let result = run_kpi_sets(&cfg, &metrics, &health, shutdown_rx).await;
    let _ = stop_http_tx.send(());
    result
}

/// The KPI files as one run loaded them.
struct KpiSet {
    engine: Option<Arc<KpiEngine>>,
    /// [`crate::kpi::dir_fingerprint`] taken before the files were read, so a
    /// change made while they were read is seen as one.
    fingerprint: Option<u64>,
}

impl KpiSet {
    async fn load(cfg: &PipelineConfig) -> Result<KpiSet, PipelineError> {
        let Some(k) = &cfg.kpi else {
            return Ok(KpiSet {
                engine: None,
                fingerprint: None,
            });
        };
        let fingerprint = crate::kpi::dir_fingerprint(&k.dir).ok();
        let engine = KpiEngine::load_dir(k)
            .await
            .map_err(|e| PipelineError::Kpi(e.to_string()))?;
        Ok(KpiSet {
            engine: Some(Arc::new(engine)),
            fingerprint,
        })
    }

    fn identity(&self) -> Vec<(String, String)> {
        self.engine.as_ref().map_or_else(Vec::new, |e| e.identity())
    }
}

/// Whether `kpi_registry` maintains exactly `set`'s KPIs again within a few
/// watch intervals (another consumer's watch, its restart and backfill).
async fn registry_comes_back(
    cfg: &PipelineConfig,
    set: &KpiSet,
    every: Duration,
    shutdown: &mut tokio::sync::watch::Receiver<bool>,
) -> bool {
    let deadline =
        Instant::now() + (every * 3).clamp(Duration::from_secs(10), Duration::from_secs(60));
    let identity = set.identity();
    let known: Vec<(&str, &str)> = identity
        .iter()
        .map(|(n, h)| (n.as_str(), h.as_str()))
        .collect();
    tracing::warn!(
        waiting_secs = deadline.saturating_duration_since(Instant::now()).as_secs(),
        "the KPIs this database maintains (kpi_registry) differ from this consumer's files; waiting in case another consumer is installing files of this version, then stopping"
    );
    while Instant::now() < deadline {
        let settled = async {
            let client = cfg.database.connect().await.ok()?;
            crate::kpi::unmaintained(&client, &known, &[]).await.ok()
        };
        // A Postgres that does not answer is asked again at the next turn.
        if let Ok(Some(short)) = tokio::time::timeout(Duration::from_secs(5), settled).await
            && short.is_empty()
        {
            return true;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.wait_for(|s| *s) => return false,
        }
    }
    false
}

/// Runs [`run_once`] with the KPI files, and again each time they change:
/// - the watch ([`watch_kpis`]) sees added, changed or deleted files that
///   load: the run stops as on shutdown (in-flight batches commit), and starts
///   again with them, which backfills new and changed KPIs and retires the
///   deleted ones; it resumes from the offsets stored in Postgres;
/// - a batch finds that another consumer installed KPIs this one does not
///   compute ([`SinkError::KpisDiffer`]): if the files here changed too, it
///   starts again with them; if not, the error stands;
/// - a restart whose new KPIs cannot be installed (the app role may not
///   create tables) goes back to the KPIs it ran before, and says so.
async fn run_kpi_sets(
    cfg: &PipelineConfig,
    metrics: &Arc<Metrics>,
    health: &Arc<Health>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> Result<RunSummary, PipelineError> {
    // Bad KPI files fail fast, before anything waits on Postgres or Kafka.
    let mut set = KpiSet::load(cfg).await?;
    let mut previous: Option<KpiSet> = None;
    let mut total = RunSummary::default();
    let started = Instant::now();
    loop {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let (reload_tx, mut reload_rx) = mpsc::channel::<KpiSet>(1);
        let watch = match (&cfg.kpi, cfg.kpi_watch) {
            (Some(k), Some(every)) => Some(tokio::spawn(watch_kpis(
                k.clone(),
                cfg.database.clone(),
                every,
                set.identity(),
                set.fingerprint,
                reload_tx,
            ))),
            _ => None,
        };
        // Which KPIs this run would leave behind, should its files lack them.
        let retire: Vec<(String, String)> = match &previous {
            Some(p) => {
                let now = set.identity();
                p.identity()
                    .into_iter()
                    .filter(|(name, _)| !now.iter().any(|(n, _)| n == name))
                    .collect()
            }
            None => Vec::new(),
        };
        let mut committed = RunSummary::default();
        let mut run = Box::pin(run_once(
            cfg,
            set.engine.clone(),
            &retire,
            metrics,
            health,
            stop_rx,
            Earlier::of(&total),
            &mut committed,
        ));
        let mut reload = None;
        let mut stop_sent = false;
        let result = loop {
            tokio::select! {
                r = &mut run => break r,
                _ = shutdown.wait_for(|s| *s), if !stop_sent => {
                    let _ = stop_tx.send(true);
                    stop_sent = true;
                }
                Some(new) = reload_rx.recv(), if !stop_sent => {
                    reload = Some(new);
                    let _ = stop_tx.send(true);
                    stop_sent = true;
                }
            }
        };
        drop(run);
        if let Some(w) = watch {
            w.abort();
        }
        let stopping = *shutdown.borrow_and_update();
        tracing::debug!(
            error = ?result.as_ref().err(),
            reload = reload.is_some(),
            stopping,
            "stages stopped"
        );
        // A failed run's commits count too, whether or not the loop goes on.
        total.absorb(committed);
        match result {
            Ok(summary) => {
                total.absorb(summary);
                match reload {
                    Some(new) if !stopping => {
                        previous = Some(std::mem::replace(&mut set, new));
                        tracing::info!(
                            kpis = ?set.identity().iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
                            "KPI files changed: in-flight batches committed; starting again with them"
                        );
                    }
                    _ => {
                        log_stopped(started, &total);
                        return Ok(total);
                    }
                }
            }
            // Stopped for the new files while Postgres was away: what did not
            // commit is read again from the stored offsets by the next run.
            Err(e @ PipelineError::DrainTimeout(_)) if reload.is_some() && !stopping => {
                tracing::warn!(error = %e, "starting again with the changed KPI files");
                previous = Some(std::mem::replace(&mut set, reload.expect("checked above")));
            }
            Err(PipelineError::Sink(SinkError::KpisDiffer(kpis))) if !stopping => {
                let new = KpiSet::load(cfg).await?;
                if new.identity() != set.identity() {
                    tracing::info!(
                        ?kpis,
                        "the database now maintains KPIs this consumer did not compute (another consumer or `migrate` installed them), and the files here changed: starting again with them"
                    );
                    previous = Some(std::mem::replace(&mut set, new));
                    continue;
                }
                // Files edited back and forth in a directory the consumers
                // share: another consumer installed a version the files no
                // longer hold, and its own watch installs theirs again. This
                // one waits for that instead of stopping; consumers whose
                // files do differ still stop.
                if let Some(every) = cfg.kpi_watch
                    && registry_comes_back(cfg, &set, every, &mut shutdown).await
                {
                    tracing::info!(
                        ?kpis,
                        "the KPIs another consumer installed are this consumer's again: going on"
                    );
                    continue;
                }
                metrics.db_errors.with_label_values(&["fatal"]).inc();
                return Err(SinkError::KpisDiffer(kpis).into());
            }
            Err(PipelineError::KpiInstall(e)) if previous.is_some() && !stopping => {
                tracing::error!(
                    error = %e,
                    "cannot install the changed KPI files; carrying on with the KPIs that ran before (the watch tries again when the files change)"
                );
                let mut back = previous.take().expect("checked above");
                // Not this version of the files again, only a later one.
                back.fingerprint = set.fingerprint;
                set = back;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Looks at the KPI files every `every`. When they changed since
/// `fingerprint` and load, and define other KPIs than `running`, sends them
/// and ends. Files that do not load, and files this database role may not
/// install (the app role, until the owner runs `migrate`), are logged once
/// per change, and the running KPIs stay: stopping for them would only
/// rebalance the group.
async fn watch_kpis(
    kpi: crate::kpi::KpiConfig,
    database: crate::sink::Database,
    every: Duration,
    running: Vec<(String, String)>,
    mut fingerprint: Option<u64>,
    reload: mpsc::Sender<KpiSet>,
) {
    loop {
        tokio::time::sleep(every).await;
        let now = match crate::kpi::dir_fingerprint(&kpi.dir) {
            Ok(f) => Some(f),
            Err(e) => {
                if fingerprint.is_some() {
                    tracing::warn!(dir = %kpi.dir.display(), error = %e, "cannot read the KPI directory; the running KPIs stay");
                }
                None
            }
        };
        if now.is_none() || now == fingerprint {
            fingerprint = now;
            continue;
        }
        fingerprint = now;
        match KpiEngine::load_dir(&kpi).await {
            Ok(engine) if engine.identity() != running => {
                if let Some(refused) = install_refused(&database, &engine).await {
                    tracing::error!(
                        error = %refused,
                        "cannot install the changed KPI files; carrying on with the running KPIs (this consumer takes them up once the owner has installed them)"
                    );
                    continue;
                }
                let set = KpiSet {
                    engine: Some(Arc::new(engine)),
                    fingerprint: now,
                };
                let _ = reload.send(set).await;
                return;
            }
            // A comment or the layout changed, not what any KPI computes.
            Ok(_) => {}
            Err(e) => tracing::warn!(
                error = %e,
                "the KPI files changed but do not load; the running KPIs stay until they are fixed"
            ),
        }
    }
}

/// Why this database role may not install `engine`, when Postgres says so.
/// A Postgres that cannot be asked leaves it to the restart's install.
async fn install_refused(
    database: &crate::sink::Database,
    engine: &KpiEngine,
) -> Option<SinkError> {
    let asked = async {
        let client = database.connect().await?;
        crate::kpi::install_refused(&client, engine).await
    };
    database
        .bounded("asking whether the changed KPIs can be installed", asked)
        .await
        .ok()
        .flatten()
}

/// One run with one set of KPI files, until `stop_rx` turns true or, with
/// `stop_when_caught_up`, until caught up. KPIs in `retire` were dropped from
/// the files since the previous run: they are retired after the install.
/// When it fails, what it committed is added to `committed`.
#[allow(clippy::too_many_arguments)]
async fn run_once(
    cfg: &PipelineConfig,
    engine: Option<Arc<KpiEngine>>,
    retire: &[(String, String)],
    metrics: &Arc<Metrics>,
    health: &Arc<Health>,
    stop_rx: tokio::sync::watch::Receiver<bool>,
    earlier: Earlier,
    committed: &mut RunSummary,
) -> Result<RunSummary, PipelineError> {
    let cfg = cfg.clone();
    let metrics = metrics.clone();
    let health = health.clone();
    let Some((client, kpis)) =
        start_up(&cfg, engine, retire, &metrics, &health, stop_rx.clone()).await?
    else {
        return Ok(RunSummary::default());
    };
    if let Some(kpis) = &kpis {
        metrics.initialise_kpi_labels(kpis.defs().map(|d| d.name.as_str()));
    }

    let loader = PgOffsetLoader {
        handle: tokio::runtime::Handle::current(),
        db: cfg.database.clone(),
        group_id: cfg.kafka.group_id.clone(),
        topic: cfg.kafka.topic.clone(),
        stop: stop_rx.clone(),
    };
    let source = Arc::new(KafkaSource::new(
        &cfg.kafka,
        Box::new(loader),
        metrics.clone(),
        health.clone(),
    )?);
    let ownership = source.ownership();

    {
        let ownership = ownership.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            if stop.wait_for(|s| *s).await.is_ok() {
                ownership.request_stop();
            }
        });
    }

    let (tx, rx) = mpsc::channel::<Batch>(CHANNEL_DEPTH);
    let (computed_tx, computed_rx) = mpsc::channel::<Computed>(CHANNEL_DEPTH);
    let intake = {
        let source = source.clone();
        let cfg = cfg.clone();
        let metrics = metrics.clone();
        let rt = tokio::runtime::Handle::current();
        std::thread::Builder::new()
            .name("intake".into())
            .spawn(move || intake(&source, &cfg, &metrics, tx, &rt))
            .map_err(|e| PipelineError::Intake(e.to_string()))?
    };

    let compute = tokio::spawn({
        let rules = cfg.rules;
        let kpis = kpis.clone();
        let ownership = ownership.clone();
        async move {
            let result = compute(&rules, kpis.as_deref(), rx, computed_tx).await;
            if result.is_err() {
                ownership.request_stop();
            }
            result
        }
    });
    let probe = tokio::spawn(probe_postgres(
        cfg.database.clone(),
        metrics.clone(),
        health.clone(),
    ));
    let (summary, result) = writer(
        &cfg,
        kpis.as_deref(),
        client,
        &source,
        &ownership,
        &metrics,
        &health,
        computed_rx,
        earlier,
    )
    .await;
    probe.abort();
    tracing::debug!(error = ?result.as_ref().err(), "writer stopped");
    ownership.request_stop();
    // The intake ends on the stop, and with it the compute task. Its error
    // is returned after the intake is joined and the consumer closed.
    let computed = compute.await.unwrap_or_else(|e| {
        Err(PipelineError::Intake(format!(
            "the compute task failed: {e}"
        )))
    });
    // Joining, leaving the group and dropping the consumer can all run
    // rebalance callbacks, which block: keep them off the async workers.
    tracing::debug!("compute task stopped");
    let close_limit = cfg
        .drain_timeout
        .clamp(Duration::from_secs(1), CONSUMER_CLOSE_LIMIT);
    let intake_result = tokio::task::spawn_blocking(move || {
        let joined = intake.join();
        tracing::debug!("intake thread joined");
        close_consumer(source, close_limit, &metrics);
        joined
    })
    .await
    .map_err(|e| PipelineError::Intake(e.to_string()))
    .and_then(|joined| {
        joined.map_err(|_| PipelineError::Intake("the intake thread panicked".into()))?
    });
    // A compute failure stopped the run; the writer committed what came before.
    match intake_result.and(result).and(computed) {
        Ok(()) => Ok(summary),
        Err(e) => {
            committed.absorb(summary);
            Err(e)
        }
    }
}

/// How often [`probe_postgres`] asks, and how long without a commit makes
/// the pipeline idle.
const IDLE_PROBE_EVERY: Duration = Duration::from_secs(5);

/// While no batch commits (a quiet topic, or batches held up), asks
/// Postgres every [`IDLE_PROBE_EVERY`] whether it answers, so that
/// `/readyz` tells of an outage before a batch meets it; batches tell while
/// they flow. It also ends writers frozen in a COPY that hold others up
/// ([`sink::Database::end_frozen_copies`]): the consumers they hold are
/// the ones that stop committing; and it names the holders of the locks its
/// writers wait for ([`name_lock_holders`]). Its own connection, so that it
/// never waits behind a batch.
async fn probe_postgres(database: sink::Database, metrics: Arc<Metrics>, health: Arc<Health>) {
    let mut client: Option<Client> = None;
    let mut copies = sink::CopyWatch::default();
    let mut waits = HashSet::new();
    let mut tick = tokio::time::interval(IDLE_PROBE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let since_commit = Utc::now().timestamp() - metrics.last_commit.get();
        if since_commit < IDLE_PROBE_EVERY.as_secs() as i64 {
            continue;
        }
        if client.as_ref().is_some_and(Client::is_closed) {
            client = None;
        }
        let asked = async {
            if client.is_none() {
                client = Some(database.connect().await?);
            }
            let c = client.as_ref().expect("connected above");
            database
                .bounded("asking whether Postgres answers", async {
                    c.simple_query("SELECT 1").await.map_err(SinkError::from)
                })
                .await
        };
        match asked.await {
            Ok(_) => {
                if !health.postgres_ok.swap(true, Ordering::Relaxed) {
                    tracing::info!("Postgres answers again");
                }
                end_frozen_copies(&database, &mut client, &mut copies).await;
                name_lock_holders(&database, &mut client, &mut waits).await;
            }
            Err(e) => {
                // Once per outage, whoever met it first: a batch's failure
                // is logged by the writer.
                if health.postgres_ok.swap(false, Ordering::Relaxed) {
                    tracing::warn!(error = %e, db = %database, "Postgres does not answer while no batch is under way; not ready until it does");
                }
                if let Some(c) = client.take() {
                    database.abandon(c);
                }
            }
        }
    }
}

/// [`sink::Database::end_frozen_copies`], with a warning for each session
/// ended: rare, and an operator wants to know which consumer froze. A
/// connection that goes unanswered or breaks is given up.
async fn end_frozen_copies(
    database: &sink::Database,
    client: &mut Option<Client>,
    watch: &mut sink::CopyWatch,
) {
    let Some(c) = client.as_ref() else { return };
    match database.end_frozen_copies(c, watch).await {
        Ok(frozen) => {
            for f in frozen {
                let what = if f.ended {
                    "ended a Postgres session frozen in the middle of a COPY that held other sessions up (a consumer paused or stalled mid-batch; its batch rolls back and is written again)"
                } else {
                    "a Postgres session frozen in the middle of a COPY holds other sessions up, and Postgres did not end it"
                };
                tracing::warn!(
                    pid = f.pid,
                    application = %f.application,
                    client = %f.client,
                    copying_for_secs = f.copying_for.as_secs(),
                    "{what}"
                );
            }
        }
        Err(e) => {
            tracing::debug!(error = %e, "cannot look for sessions frozen in a COPY");
            if matches!(e, SinkError::Unavailable { .. })
                && let Some(c) = client.take()
            {
                database.abandon(c);
            }
        }
    }
}

/// Warns, once per wait, of each writer that has waited for a lock for
/// longer than [`IDLE_PROBE_EVERY`] (or half the database timeout), naming a session that holds it up
/// ([`sink::Database::lock_waits`]): the batch only times out and is
/// retried, and an operator wants to know what to end. `seen` holds the
/// waits already told, and keeps only those still under way.
async fn name_lock_holders(
    database: &sink::Database,
    client: &mut Option<Client>,
    seen: &mut HashSet<(i32, u64, i32)>,
) {
    let Some(c) = client.as_ref() else { return };
    // Under the timeout, or a writer that gives up sooner would never be seen.
    let longer_than = IDLE_PROBE_EVERY.min(database.timeout / 2);
    match database.lock_waits(c, longer_than).await {
        Ok(waits) => {
            let mut now = HashSet::with_capacity(waits.len());
            for w in waits {
                let key = (w.pid, w.since.to_bits(), w.holder_pid);
                if !seen.contains(&key) {
                    let unseen = || "not visible to this role".to_string();
                    tracing::warn!(
                        pid = w.pid,
                        waiting_secs = w.waiting_for.as_secs(),
                        tables = w.relations.as_deref().unwrap_or("-"),
                        mode = w.mode.as_deref().unwrap_or("-"),
                        holder_pid = w.holder_pid,
                        holder_application = %w.holder_application.unwrap_or_default(),
                        holder_user = %w.holder_user.unwrap_or_else(unseen),
                        holder_client = %w.holder_client.unwrap_or_else(unseen),
                        holder_state = %w.holder_state.unwrap_or_else(unseen),
                        // Left out of the line when unseen, it read as if the
                        // holder had no transaction open.
                        holder_transaction_secs = %w
                            .holder_in_transaction_for
                            .map(|d| d.as_secs().to_string())
                            .unwrap_or_else(unseen),
                        "a writer waits for a lock that another session holds; its batch times out after --db-timeout-secs and is retried until the holder lets go"
                    );
                }
                now.insert(key);
            }
            *seen = now;
        }
        Err(e) => {
            tracing::debug!(error = %e, "cannot look for writers waiting for a lock");
            if matches!(e, SinkError::Unavailable { .. })
                && let Some(c) = client.take()
            {
                database.abandon(c);
            }
        }
    }
}

/// Connects and readies the database for a run: migrations, the group
/// check, the KPI install (with its backfills) and retirements. Returns the
/// connection and the KPIs to compute, or None when shutdown came first.
///
/// Nothing has been consumed yet, so both ways out are safe at any moment:
/// - a shutdown ends it at once; the work is transactional, and a dropped
///   connection rolls it back (a lock wait or a long backfill would
///   otherwise hold SIGTERM for as long as it lasts);
/// - Postgres going away (a restart, a broken connection, a lock or
///   resource error) is retried from a new connection after a backoff, as
///   for a batch, instead of ending the process.
async fn start_up(
    cfg: &PipelineConfig,
    engine: Option<Arc<KpiEngine>>,
    retire: &[(String, String)],
    metrics: &Metrics,
    health: &Health,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<Option<(Client, Option<Arc<KpiEngine>>)>, PipelineError> {
    let mut backoff = Backoff::new();
    let started = std::time::Instant::now();
    let step = std::sync::Mutex::new("connecting");
    loop {
        // The error says whether it came from connecting, which retries on
        // any retryable error, as it always did.
        let attempt = async {
            *step.lock().unwrap_or_else(|e| e.into_inner()) = "connecting";
            let client = cfg
                .database
                .connect()
                .await
                .map_err(|e| (true, PipelineError::Sink(e)))?;
            health.postgres_ok.store(true, Ordering::Relaxed);
            prepare(cfg, engine.clone(), retire, client, &step)
                .await
                .map_err(|e| (false, e))
        };
        tokio::pin!(attempt);
        // Start-up work has no time limit (a backfill may take long), so a
        // frozen server or a lock held elsewhere would keep `run` here in
        // silence: say, now and then, what it waits on.
        let mut notices = tokio::time::interval_at(
            tokio::time::Instant::now() + START_UP_NOTICE_EVERY,
            START_UP_NOTICE_EVERY,
        );
        let (connecting, e) = loop {
            tokio::select! {
                r = &mut attempt => match r {
                    Ok(ready) => return Ok(Some(ready)),
                    Err(failed) => break failed,
                },
                _ = notices.tick() => {
                    let step = *step.lock().unwrap_or_else(|e| e.into_inner());
                    tracing::info!(
                        step,
                        waited_secs = started.elapsed().as_secs(),
                        "start-up still waiting on Postgres (a long backfill, a lock held elsewhere, or a server that does not answer); a shutdown ends it at once"
                    );
                }
                _ = stop.wait_for(|s| *s) => {
                    tracing::info!("stopped during start-up (a shutdown, or changed KPI files): nothing was consumed yet");
                    return Ok(None);
                }
            }
        };
        let e = match e {
            // Not "query" after connecting: an error the SQL itself raised
            // (a migration, a backfill) would come back the same; it ends
            // the run, as before.
            PipelineError::Sink(e) | PipelineError::KpiInstall(e)
                if e.is_retryable() && (connecting || e.kind() != "query") =>
            {
                e
            }
            e => return Err(e),
        };
        metrics.db_errors.with_label_values(&[e.kind()]).inc();
        health.postgres_ok.store(false, Ordering::Relaxed);
        if connecting {
            tracing::warn!(error = %e, db = %cfg.database, "cannot reach Postgres; retrying");
        } else {
            tracing::warn!(error = %e, "start-up failed on a database error that may pass (Postgres away, restarting, a statement cancelled); starting it again");
        }
        tokio::select! {
            _ = backoff.wait() => {}
            _ = stop.wait_for(|s| *s) => return Ok(None),
        }
    }
}

/// How often [`start_up`] says that it is still waiting.
const START_UP_NOTICE_EVERY: Duration = Duration::from_secs(30);

/// The start-up work of [`start_up`] on one connection; `step` names the
/// part under way, for the notices of a long wait.
async fn prepare(
    cfg: &PipelineConfig,
    engine: Option<Arc<KpiEngine>>,
    retire: &[(String, String)],
    mut client: Client,
    step: &std::sync::Mutex<&'static str>,
) -> Result<(Client, Option<Arc<KpiEngine>>), PipelineError> {
    let at = |name: &'static str| *step.lock().unwrap_or_else(|e| e.into_inner()) = name;
    at("checking the database encoding");
    sink::check_encoding(&client).await?;
    if cfg.migrate {
        at("applying migrations");
        let report = sink::migrate::migrate(&mut client).await?;
        if !report.applied.is_empty() {
            tracing::info!(applied = ?report.applied, "schema migrations applied");
        }
    }

    at("checking the consumer group and the topic");
    sink::check_single_group(&client, &cfg.kafka.group_id, &cfg.kafka.topic).await?;
    // Before anything else changes the registry: the files deleted while
    // this process ran are no longer maintained, and files that lack a KPI
    // the database maintains are refused as they are.
    if !retire.is_empty() {
        at("retiring deleted KPIs");
        let retired = crate::kpi::retire(&client, retire).await?;
        if !retired.is_empty() {
            tracing::info!(
                ?retired,
                "KPI files deleted: retired, their tables and views stay as they are, no longer updated"
            );
        }
    }
    at("checking the KPI files against the database");
    let names: Vec<&str> = engine
        .iter()
        .flat_map(|e| e.defs())
        .map(|d| d.name.as_str())
        .collect();
    let missing = crate::kpi::not_computed(&client, &names).await?;
    if !missing.is_empty() {
        return Err(SinkError::KpisDiffer(missing).into());
    }
    let kpis = match engine {
        Some(engine) => {
            at("installing KPIs (with any backfills)");
            let report = crate::kpi::install(&mut client, &engine)
                .await
                .map_err(PipelineError::KpiInstall)?;
            tracing::info!(
                kpis = engine.len(),
                backfilled = ?report.backfilled,
                "KPIs ready"
            );
            Some(engine)
        }
        None => None,
    };
    // Refuse before reading anything: the first batch would be refused anyway.
    let known: Vec<(&str, &str)> = kpis
        .iter()
        .flat_map(|e| e.defs())
        .map(|d| (d.name.as_str(), d.hash.as_str()))
        .collect();
    at("checking that every KPI table is maintained");
    let short = crate::kpi::unmaintained(&client, &known, &[]).await?;
    if !short.is_empty() {
        return Err(SinkError::KpisDiffer(short).into());
    }
    Ok((client, kpis))
}

/// The longest a run waits for the Kafka consumer to leave its group at the
/// end (the drain timeout when shorter, and at least 1 s).
const CONSUMER_CLOSE_LIMIT: Duration = Duration::from_secs(10);

/// Leaves the Kafka group and drops the consumer, giving up after `limit`.
///
/// The Kafka client's close waits for the group coordinator's answer with no
/// bound of its own, so a broker that stops answering (a frozen host, a
/// paused container, a partition) would hold the shutdown, and a reload of
/// the KPI files, forever. Giving up loses nothing: the offsets live in
/// Postgres, and the broker drops the silent member once it expires it (Kafka:
/// after its session timeout). The consumer is left to finish its close on a
/// detached thread, which does not keep the process from exiting.
fn close_consumer(source: Arc<KafkaSource>, limit: Duration, metrics: &Metrics) {
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let spawned = std::thread::Builder::new()
        .name("kafka-close".into())
        .spawn(move || {
            source.close();
            drop(source);
            let _ = done_tx.send(());
        });
    if let Err(e) = spawned {
        // The closure was dropped, and the consumer closed with it, here.
        tracing::warn!(error = %e, "cannot start a thread to close the Kafka consumer");
        return;
    }
    match done_rx.recv_timeout(limit) {
        Ok(()) => tracing::debug!("consumer closed"),
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            metrics
                .kafka_errors
                .with_label_values(&[kafka_error::CLOSE_TIMEOUT])
                .inc();
            tracing::warn!(
                waited = ?limit,
                "the Kafka broker did not answer while the consumer left its group; going on \
                 without its answer (nothing is lost: the offsets are stored in Postgres; the \
                 group's next member may wait for its partitions until the broker expires this one)"
            );
        }
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            tracing::warn!("closing the Kafka consumer panicked");
        }
    }
}

/// Exponential backoff, 100 ms doubling to 5 s.
struct Backoff(Duration);

impl Backoff {
    fn new() -> Self {
        Backoff(Duration::from_millis(100))
    }
    async fn wait(&mut self) {
        tokio::time::sleep(self.0).await;
        self.0 = (self.0 * 2).min(Duration::from_secs(5));
    }
}

/// Distinct members held in memory, at most (about 25 bytes each); the least
/// recently used groups beyond it are read back from Postgres when needed.
/// See [`crate::kpi::members`].
const MEMBERS_CAP: usize = 2_000_000;

/// How long a partition must be silent before the intake compares it with its
/// high watermark (stall detection, and "caught up" for `stop_when_caught_up`).
const PROGRESS_CHECK_EVERY: Duration = Duration::from_millis(500);

/// How long a `stop_when_caught_up` run given no partition waits for a
/// rebalance to give it some before it stops.
const IDLE_STOP_AFTER: Duration = Duration::from_secs(10);

/// How often a consumer that holds no partition asks whether its topic exists.
const TOPIC_CHECK_EVERY: Duration = Duration::from_secs(5);

/// Whether the topic exists, as the intake learns it. A consumer holding no
/// partition may be looking at a topic that is gone (deleted, or a broker
/// that lost it on a restart): it reads nothing, and must say so and not
/// report ready. So the broker is asked every [`TOPIC_CHECK_EVERY`] while no
/// partition is held; while one is, the topic plainly exists.
struct TopicWatch {
    missing: bool,
    checked: Instant,
}

impl TopicWatch {
    fn new(now: Instant) -> Self {
        TopicWatch {
            missing: false,
            checked: now,
        }
    }

    /// `Some(true)` when the topic has just gone missing, `Some(false)` when
    /// it has just come back. `holding` says whether a partition is held;
    /// `exists` asks the broker, only when none is and the last ask is old
    /// enough. Neither is called on most loops.
    fn observe(
        &mut self,
        now: Instant,
        holding: impl FnOnce() -> bool,
        exists: impl FnOnce() -> bool,
    ) -> Option<bool> {
        let due = now.duration_since(self.checked) >= TOPIC_CHECK_EVERY;
        if !due && !self.missing {
            return None;
        }
        let found = if holding() {
            // Regression: the ask stopped with the first assignment, so a
            // miss seen while none was held (a broker slow to answer during a
            // rebalance) kept the consumer not ready for good.
            true
        } else if due {
            self.checked = now;
            exists()
        } else {
            return None;
        };
        (found == self.missing).then(|| {
            self.missing = !found;
            self.missing
        })
    }
}

/// Messages drained per burst at most, so that the batch deadline and the
/// progress checks still run every few milliseconds under full load.
const BURST_MAX: usize = 512;

/// The intake thread: poll, decode, cut batches, hand them over.
fn intake(
    source: &KafkaSource,
    cfg: &PipelineConfig,
    metrics: &Metrics,
    tx: mpsc::Sender<Batch>,
    rt: &tokio::runtime::Handle,
) -> Result<(), PipelineError> {
    let ownership = source.ownership();
    let started = Instant::now();
    let mut waited = Instant::now();
    let mut warned_missing = false;
    while !source.topic_exists() {
        source.note_topic_found(false);
        if ownership.stop_requested() {
            return Ok(());
        }
        // A run to the end is a batch job: waiting for ever on a topic that
        // is not there (a typo, the wrong broker) hid the mistake, and
        // SIGTERM then ended it with exit 0. The same bound as for a group
        // that never assigns.
        let limit = 2 * cfg.rebalance_limit;
        if cfg.stop_when_caught_up && started.elapsed() >= limit {
            ownership.request_stop();
            return Err(PipelineError::TopicNotFound {
                topic: source.topic().to_string(),
                waited: limit,
                last_error: source.last_client_error().unwrap_or_else(|| "none".into()),
            });
        }
        source.serve_events();
        if !warned_missing || waited.elapsed() > Duration::from_secs(30) {
            tracing::warn!(
                topic = %source.topic(),
                last_client_error = source.last_client_error().as_deref().unwrap_or("none"),
                "topic does not exist yet (or the broker is unreachable); waiting for it"
            );
            warned_missing = true;
            waited = Instant::now();
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    source.note_topic_found(true);
    if let Err(e) = source.subscribe() {
        ownership.request_stop();
        return Err(e.into());
    }
    tracing::info!(topic = %source.topic(), group = %cfg.kafka.group_id, "subscribed");

    let mut dec = BatchDecoder::new(cfg.decode);
    let mut cut = Cutter::new(ownership.generation());
    let mut progress_checked = Instant::now();
    let mut topic = TopicWatch::new(Instant::now());
    let mut last_generation = ownership.generation();
    let mut decode_time = Duration::ZERO;

    loop {
        let stopping = ownership.stop_requested();
        source.resync_if_requested();

        if stopping {
            if !dec.is_empty() && ownership.generation() == cut.generation {
                let b = cut.cut(&mut dec, &ownership, decode_time);
                let _ = tx.blocking_send(b);
            }
            // Leaving the group waits for the writer (see `run`): revoking now
            // would discard the batches it is still committing.
            return Ok(());
        }

        let timeout = match cut.first_at {
            Some(t) => cfg
                .batch_max_wait
                .saturating_sub(t.elapsed())
                .min(Duration::from_millis(100)),
            _ => Duration::from_millis(100),
        };
        // Wait for one message, then drain what librdkafka already holds
        // without waiting: the clock reads and checks below then run once per
        // burst, not once per message.
        let mut burst = Vec::new();
        let mut polled = source.poll(timeout);
        let burst_at = Instant::now();
        let room = cfg
            .batch_max_rows
            .saturating_sub(dec.len())
            .clamp(1, BURST_MAX);
        let mut burst_bytes = 0;
        while let Polled::Message(m) = polled {
            if ownership.generation() != cut.generation {
                // A rebalance happened inside poll: what we hold belongs to
                // the old assignment and may now be someone else's.
                burst.clear();
                burst_bytes = 0;
                dec.finish();
                cut = Cutter::new(ownership.generation());
            }
            burst_bytes += m.payload_len();
            burst.push(m);
            if burst.len() >= room || dec.payload_bytes() + burst_bytes >= cfg.batch_max_bytes {
                break;
            }
            polled = source.poll_ready(burst_at);
        }
        if !burst.is_empty() {
            let t = Instant::now();
            for m in &burst {
                let (partition, offset) = (m.partition(), m.offset());
                let timestamp_ms = m.timestamp().to_millis();
                dec.push(
                    m.payload(),
                    MessageMeta {
                        partition,
                        offset,
                        timestamp_ms,
                    },
                );
                cut.note(partition, offset, timestamp_ms, dec.len() - 1, burst_at);
            }
            decode_time += t.elapsed();
        }
        let holding = || !ownership.assigned().is_empty();
        if let Some(missing) = topic.observe(Instant::now(), holding, || source.topic_exists()) {
            source.note_topic_found(!missing);
            if missing {
                tracing::warn!(
                    topic = %source.topic(),
                    last_client_error = source.last_client_error().as_deref().unwrap_or("none"),
                    "the topic no longer exists on the broker (or the broker does not answer); reading nothing, and not ready, until it is back"
                );
            } else {
                tracing::info!(topic = %source.topic(), "the topic is found on the broker again");
            }
        }
        // On a timer, not only when idle: a partition can stall while others
        // keep the poll busy.
        let mut last_batch_now = false;
        if progress_checked.elapsed() >= PROGRESS_CHECK_EVERY {
            progress_checked = Instant::now();
            let caught_up = match source.check_progress(PROGRESS_CHECK_EVERY) {
                Ok(c) => c,
                Err(e) => {
                    // What the intake holds is not committed; the writer
                    // drains what it has, and the run ends with the error.
                    ownership.request_stop();
                    return Err(e.into());
                }
            };
            // A run to the end that the group never gives anything to read
            // (tansu keeping dead members) would wait for ever: a batch job
            // should fail instead. Only before a first assignment, and at
            // twice the limit: after a revocation tansu was seen to answer
            // a lone member only after about a minute, and that run then
            // finished.
            let first_limit = 2 * cfg.rebalance_limit;
            if cfg.stop_when_caught_up
                && ownership.unassigned_for().is_some_and(|w| w >= first_limit)
            {
                ownership.request_stop();
                return Err(PipelineError::NoAssignment {
                    group: cfg.kafka.group_id.clone(),
                    waited: first_limit,
                });
            }
            source.note_if_stuck(cfg.rebalance_limit);
            source.rejoin_if_orphaned(cfg.rebalance_limit);
            source.compare_group_offsets();
            source.watch_stalls(cfg.rebalance_limit + cfg.batch_max_wait);
            // A run to the end cuts its last, partial batch once nothing more
            // is coming, rather than waiting out --batch-max-wait-ms (which
            // may be an hour) for messages that will not come.
            last_batch_now = cfg.stop_when_caught_up && caught_up && !dec.is_empty();
            if cfg.stop_when_caught_up && dec.is_empty() {
                // Given no partition, there is nothing to catch up with: once
                // the broker lists the topic's partitions, all of them other
                // members'. Not at once, so that a rebalance under way can
                // end first.
                let left_out = !caught_up
                    && ownership
                        .idle_for()
                        .is_some_and(|idle| idle >= IDLE_STOP_AFTER);
                let unowned = (caught_up || left_out)
                    .then(|| source.unowned_partitions())
                    .flatten()
                    .filter(|u| !u.is_empty());
                if caught_up || (left_out && unowned.is_some()) {
                    if caught_up {
                        tracing::info!("caught up with every assigned partition");
                    } else {
                        tracing::info!(
                            waited_secs = IDLE_STOP_AFTER.as_secs(),
                            "no partition assigned: other members of the group own every partition"
                        );
                    }
                    // Other members of the group own the rest: live ones, or
                    // dead ones the broker has not expired yet, whose
                    // partitions nobody reads meanwhile. Either way this run
                    // did not load the whole topic, and a batch job should
                    // hear it.
                    if let Some(unowned) = unowned {
                        tracing::warn!(
                            topic = %source.topic(),
                            group = %cfg.kafka.group_id,
                            partitions = ?unowned,
                            "stopping while other members of the group own these partitions: this run did not read them. \
                             If no other consumer runs, they belong to members that died and that the broker has not expired yet \
                             (session.timeout.ms); run again once it has"
                        );
                    }
                    ownership.request_stop();
                }
            }
        }
        if ownership.generation() != last_generation {
            last_generation = ownership.generation();
            if ownership.generation() != cut.generation {
                dec.finish();
                cut = Cutter::new(last_generation);
            }
        }

        let full = dec.len() >= cfg.batch_max_rows || dec.payload_bytes() >= cfg.batch_max_bytes;
        let due = cut
            .first_at
            .is_some_and(|t| t.elapsed() >= cfg.batch_max_wait);
        if full || due || last_batch_now {
            let b = cut.cut(&mut dec, &ownership, decode_time);
            decode_time = Duration::ZERO;
            let dropped = source.take_dropped();
            if dropped > 0 {
                metrics
                    .kafka_errors
                    .with_label_values(&[kafka_error::REDELIVERED])
                    .inc_by(dropped);
            }
            // Backpressure: while the writer is behind (Postgres slow or away)
            // this blocks and the intake stops polling, so librdkafka stops
            // fetching once its bounded queue is full. Pausing partitions
            // instead would restart fetches mid-batch on every resume.
            // Rebalances wait meanwhile, bounded by max.poll.interval.ms.
            if !hand_on(&tx, b, source, rt) {
                return Ok(());
            }
            // Silence only counts while we poll: what arrived meanwhile
            // waits in librdkafka's queue, and must not look like a stall.
            source.restart_silence_clocks();
        }
    }
}

/// How often the consumer lag is asked of the broker while the intake waits
/// on the writer: as often as the statistics carry it otherwise.
const LAG_REFRESH_EVERY: Duration = Duration::from_secs(5);

/// Hands `b` to the compute stage, waiting while the writer is behind; false
/// once the stage is gone. While it waits, nothing polls the consumer, so the
/// lag is refreshed from the broker instead ([`KafkaSource::refresh_lag`]).
fn hand_on(
    tx: &mpsc::Sender<Batch>,
    b: Batch,
    source: &KafkaSource,
    rt: &tokio::runtime::Handle,
) -> bool {
    loop {
        // The timer is made inside block_on: outside, there is no runtime.
        match rt.block_on(async { tokio::time::timeout(LAG_REFRESH_EVERY, tx.reserve()).await }) {
            Ok(Ok(permit)) => {
                permit.send(b);
                return true;
            }
            Ok(Err(_)) => return false,
            Err(_) => source.refresh_lag(),
        }
    }
}

/// Kafka timestamps before this (2000-01-01, the default
/// `--min-event-time`) do not count for end-to-end latency.
const LATENCY_FLOOR_MS: i64 = 946_684_800_000;

/// Tracks what the batch being built covers, and cuts it.
struct Cutter {
    generation: u64,
    first_at: Option<Instant>,
    /// Per partition, its last message so far: offset, Kafka timestamp, and
    /// its row in the decoder (for the value's fingerprint at the cut).
    last: BTreeMap<i32, (i64, Option<i64>, usize)>,
    oldest_ts_ms: Option<i64>,
}

impl Cutter {
    fn new(generation: u64) -> Self {
        Cutter {
            generation,
            first_at: None,
            last: BTreeMap::new(),
            oldest_ts_ms: None,
        }
    }

    /// Notes the message just pushed to the decoder, at `row`.
    fn note(&mut self, partition: i32, offset: i64, ts_ms: Option<i64>, row: usize, now: Instant) {
        self.first_at.get_or_insert(now);
        let last = self.last.entry(partition).or_insert((offset, ts_ms, row));
        if offset >= last.0 {
            *last = (offset, ts_ms, row);
        }
        // The raw timestamp above, which the next assignment compares with
        // the log's; only a plausible one for latency. A producer may set
        // any time, and 0 usually means "not set": one such message among
        // fresh ones made its whole batch's latency 57 years.
        if let Some(ts) = crate::decode::kafka_time_ms(ts_ms).filter(|&ts| ts >= LATENCY_FLOOR_MS) {
            self.oldest_ts_ms = Some(self.oldest_ts_ms.map_or(ts, |o| o.min(ts)));
        }
    }

    fn cut(
        &mut self,
        dec: &mut BatchDecoder,
        ownership: &Ownership,
        decode_time: Duration,
    ) -> Batch {
        let decoded = dec.finish();
        let raw = decoded
            .column_by_name(crate::event::col::RAW)
            .and_then(|c| {
                c.as_any()
                    .downcast_ref::<datafusion::arrow::array::BinaryArray>()
            })
            .expect("the decoded batch has its raw bytes");
        let offsets = self
            .last
            .iter()
            .map(
                |(&partition, &(offset, timestamp_ms, row))| PartitionOffsets {
                    partition,
                    expected: ownership.advance(partition, offset + 1),
                    next: offset + 1,
                    last: LastWritten {
                        timestamp_ms,
                        fingerprint: source::fingerprint(raw.is_valid(row).then(|| raw.value(row))),
                    },
                },
            )
            .collect();
        tracing::debug!(
            rows = decoded.num_rows(),
            fill_ms = self.first_at.map_or(0, |t| t.elapsed().as_millis() as u64),
            decode_ms = decode_time.as_millis() as u64,
            "batch cut"
        );
        let batch = Batch {
            rows: decoded.num_rows(),
            decoded,
            generation: self.generation,
            offsets,
            oldest_ts_ms: self.oldest_ts_ms,
            decode_time,
            cut_at: Instant::now(),
        };
        *self = Cutter::new(self.generation);
        batch
    }
}

/// The compute stage: validate each batch, hand it to the writer, then
/// compute its KPI partials, so that this CPU work overlaps the batch's own
/// COPY and the writer's wait on Postgres. One batch's KPIs at a time: the
/// engine's plans all read one slot.
async fn compute(
    rules: &crate::validate::ValidationRules,
    kpis: Option<&KpiEngine>,
    mut rx: mpsc::Receiver<Batch>,
    tx: mpsc::Sender<Computed>,
) -> Result<(), PipelineError> {
    loop {
        // Take the next batch only once the writer has taken the previous
        // one: the batch computed while the writer works is then the only one
        // this stage adds, and memory stays bounded as before while Postgres
        // is away.
        let Ok(permit) = tx.reserve().await else {
            // The writer stopped; its error is the run's result.
            break;
        };
        let Some(mut batch) = rx.recv().await else {
            break;
        };
        let t = Instant::now();
        let validated = validate(&batch.decoded, rules, Utc::now())
            .map_err(|e| PipelineError::Intake(format!("validate: {e}")))?;
        let validate_time = t.elapsed();
        // `validated` holds the rows now; `rows` keeps the count, not a second copy.
        batch.decoded = RecordBatch::new_empty(batch.decoded.schema());
        let valid = validated.valid.clone();
        let (kpi_tx, kpi_rx) = tokio::sync::oneshot::channel();
        permit.send(Computed {
            batch,
            validated,
            kpis: kpi_rx,
            validate_time,
        });
        let t = Instant::now();
        let (deltas, failures) = match kpis {
            Some(engine) => engine.compute_tolerant(&valid).await,
            None => (Vec::new(), Vec::new()),
        };
        // A writer that stopped meanwhile no longer wants them.
        let _ = kpi_tx.send(KpiOutcome {
            deltas,
            failures,
            time: t.elapsed(),
        });
    }
    Ok(())
}

/// Connections the writer keeps: batch N+1 is copied on one while batch N
/// merges and commits on the other, so Postgres works on two cores.
const WRITER_LANES: usize = 2;

/// What the writer's lanes share. The memberships and `state` are touched
/// only by the lane that holds the baton (see [`lane`]), so their locks are
/// never contended and never held across an await; the lanes take turns on
/// `rx`, which numbers the batches in the order they are taken.
struct WriterCtx<'a> {
    cfg: &'a PipelineConfig,
    kpis: Option<&'a KpiEngine>,
    source: &'a KafkaSource,
    ownership: &'a Ownership,
    metrics: &'a Metrics,
    health: &'a Health,
    members: crate::kpi::Memberships,
    /// A batch of this run has committed: later ones need not claim the
    /// database again (see [`sink::CLAIM_LOCK`]).
    claimed: AtomicBool,
    /// The computed batches and the number of the last one taken.
    rx: tokio::sync::Mutex<(mpsc::Receiver<Computed>, u64)>,
    /// The number of the last batch that committed or was given up.
    done: tokio::sync::watch::Sender<u64>,
    state: std::sync::Mutex<WriterState>,
}

impl<'a> WriterCtx<'a> {
    /// One exchange with Postgres, given up as a retryable `timeout` error
    /// after the database timeout, or once the shutdown drain has run out.
    /// Without the bound a Postgres that stops answering (frozen, paused,
    /// cut off by the network) sends no error: the lane would wait forever,
    /// holding the ownership gate (and so any rebalance), and a SIGTERM would
    /// never end. The caller drops the connection on a timeout.
    async fn bounded<T>(
        &self,
        what: &str,
        work: impl std::future::Future<Output = Result<T, SinkError>>,
    ) -> Result<T, SinkError> {
        tokio::select! {
            result = self.cfg.database.bounded(what, work) => result,
            () = self.drain_expired() => Err(SinkError::Unavailable {
                kind: "timeout",
                message: format!(
                    "the shutdown drain timeout ({:?}) ran out while {what}",
                    self.cfg.drain_timeout
                ),
            }),
        }
    }

    /// Resolves once a stop has been requested and the drain timeout has
    /// passed since the writer first saw it; never resolves otherwise.
    async fn drain_expired(&self) {
        loop {
            match self.drain_left() {
                Some(left) if left.is_zero() => return,
                Some(left) => tokio::time::sleep(left).await,
                // The stop is a flag, not a channel: look again shortly.
                None => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// What is left of the shutdown drain, counted from when the writer first
    /// saw the stop; None while no stop is requested.
    fn drain_left(&self) -> Option<Duration> {
        if !self.ownership.stop_requested() {
            return None;
        }
        let since = *self
            .state
            .lock()
            .unwrap()
            .stop_seen_at
            .get_or_insert_with(Instant::now);
        Some(self.cfg.drain_timeout.saturating_sub(since.elapsed()))
    }

    /// Backs off before a retry, cut short when the shutdown drain runs out.
    async fn back_off(&self, backoff: &mut Backoff) {
        tokio::select! {
            () = backoff.wait() => {}
            () = self.drain_expired() => {}
        }
    }

    /// What one attempt at a batch writes.
    fn batch_write<'b>(
        &'b self,
        batch: &'b Batch,
        validated: &'b crate::validate::Validated,
        kpis: &'b [crate::kpi::KpiWrite],
        stale_kpis: &'b [String],
        fault_now: Option<FaultPoint>,
    ) -> BatchWrite<'b> {
        BatchWrite {
            group_id: &self.cfg.kafka.group_id,
            topic: &self.cfg.kafka.topic,
            events: &validated.valid,
            rejects: &validated.rejects,
            offsets: &batch.offsets,
            kpis,
            members: &self.members,
            stale_kpis,
            claim: !self.claimed.load(Ordering::Relaxed),
            abort_mid_copy: fault_now == Some(FaultPoint::MidCopy),
        }
    }
}

struct WriterState {
    summary: RunSummary,
    progress: Progress,
    stop_seen_at: Option<Instant>,
    /// Disabled KPIs not yet marked stale by a committed batch.
    unmarked_stale: Vec<String>,
}

/// A committed batch's timings and what it merged.
struct Committed {
    copy: Duration,
    merge: Duration,
    merged: Vec<(String, u64)>,
    pending: crate::kpi::Pending,
    commit: Duration,
}

/// The writer: write, commit, in batch order, on [`WRITER_LANES`] connections.
///
/// Batches alternate between the lanes. A lane COPYs its batch's rows as soon
/// as it takes it, then waits for the baton (every earlier batch committed or
/// given up) before the offset fence, the KPI merges and the COMMIT, and
/// passes the baton on after the Kafka group commit. Commits therefore stay
/// in batch order; only the COPY overlaps the batch before.
#[allow(clippy::too_many_arguments)]
async fn writer(
    cfg: &PipelineConfig,
    kpis: Option<&KpiEngine>,
    client: Client,
    source: &KafkaSource,
    ownership: &Ownership,
    metrics: &Metrics,
    health: &Health,
    rx: mpsc::Receiver<Computed>,
    earlier: Earlier,
) -> (RunSummary, Result<(), PipelineError>) {
    let ctx = WriterCtx {
        cfg,
        kpis,
        source,
        ownership,
        metrics,
        health,
        members: crate::kpi::Memberships::new(MEMBERS_CAP),
        claimed: AtomicBool::new(false),
        rx: tokio::sync::Mutex::new((rx, 0)),
        done: tokio::sync::watch::channel(0).0,
        state: std::sync::Mutex::new(WriterState {
            summary: RunSummary::default(),
            progress: Progress::new(earlier),
            stop_seen_at: None,
            unmarked_stale: Vec::new(),
        }),
    };
    // Start-up's connection becomes a lane's: without the writers' idle
    // limit, a consumer frozen in that lane's batch would hold the others
    // up. If it cannot take the limit, the lane connects anew.
    let mut first = match cfg.database.limit_idle(&client).await {
        Ok(()) => Some(client),
        Err(e) => {
            tracing::debug!(error = %e, "start-up's connection is not kept for writing");
            None
        }
    };
    let lanes: Vec<_> = (0..WRITER_LANES)
        .map(|_| lane(&ctx, first.take()))
        .collect();
    // Progress lines come on a clock, not after commits: an idle pipeline,
    // or one retrying through an outage, said nothing at all.
    let every = cfg.progress_interval.max(Duration::from_millis(100));
    let ticker = async {
        let mut clock = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        clock.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            clock.tick().await;
            let mut state = ctx.state.lock().unwrap_or_else(|e| e.into_inner());
            let WriterState {
                summary, progress, ..
            } = &mut *state;
            progress.report(summary, metrics);
        }
    };
    // The first lane error ends the writer; the other lane's open transaction
    // is dropped with it and rolls back.
    let joined = tokio::select! {
        joined = futures_util::future::try_join_all(lanes) => joined,
        () = ticker => unreachable!("the progress clock never stops"),
    };
    let state = ctx.state.into_inner().unwrap_or_else(|e| e.into_inner());
    (state.summary, joined.map(drop))
}

/// One writer connection: takes the next batch, COPYs it, waits for the
/// baton, finishes and commits it (retrying as long as Postgres is away),
/// then passes the baton on.
async fn lane(ctx: &WriterCtx<'_>, mut client: Option<Client>) -> Result<(), PipelineError> {
    let WriterCtx {
        cfg,
        kpis,
        ownership,
        metrics,
        health,
        members,
        ..
    } = ctx;
    let mut baton = ctx.done.subscribe();
    loop {
        let (seq, computed) = {
            let mut rx = ctx.rx.lock().await;
            let Some(computed) = rx.0.recv().await else {
                return Ok(());
            };
            rx.1 += 1;
            (rx.1, computed)
        };
        let Computed {
            batch,
            validated,
            kpis: kpi_outcome,
            validate_time,
        } = computed;
        let fault_now = cfg.fault.filter(|f| f.batch == seq).map(|f| f.point);
        let mut kpi_writes;
        let kpi_time;
        // A batch whose COMMIT failed: it may have landed (see `commit_batch`).
        let mut in_doubt: Option<Committed> = None;
        // The head start: COPY while the batch before is still in Postgres
        // and while the compute task works out this batch's KPI partials.
        // An error here waits for the baton too, so that only the baton
        // holder touches the memberships and retries. (A block, so that
        // `copied`'s borrow of `client` ends before the retries below.)
        let mut first_attempt = {
            let copied = if ownership.generation() == batch.generation {
                Some(
                    match ctx
                        .bounded("connecting", open(cfg, metrics, &mut client))
                        .await
                    {
                        Ok(c) => {
                            let write = ctx.batch_write(&batch, &validated, &[], &[], fault_now);
                            ctx.bounded("copying a batch", sink::begin_copy(c, &write))
                                .await
                        }
                        Err(e) => Err(e),
                    },
                )
            } else {
                None
            };
            // Dropping `copied` on this error rolls the batch back.
            let outcome = kpi_outcome.await.map_err(|_| {
                PipelineError::Kpi("the compute task stopped before a batch's KPI partials".into())
            })?;
            let t = Instant::now();
            kpi_writes = match kpis {
                Some(engine) => engine.writes(outcome.deltas),
                None => Vec::new(),
            };
            kpi_time = outcome.time + t.elapsed();
            let _ = baton.wait_for(|done| *done + 1 >= seq).await;
            // Computed before a batch ahead of this one had a KPI's rows
            // refused (see below).
            if let Some(engine) = kpis {
                kpi_writes.retain(|w| !engine.is_disabled_named(&w.def.name));
            }
            let stale = note_failures(ctx, outcome.failures);
            match copied {
                Some(Ok(copied)) => {
                    let write = ctx.batch_write(&batch, &validated, &kpi_writes, &stale, fault_now);
                    Some(
                        commit_batch(
                            ctx,
                            copied,
                            &write,
                            batch.generation,
                            fault_now,
                            &mut in_doubt,
                        )
                        .await,
                    )
                }
                Some(Err(e)) => Some(Err(e)),
                None => None,
            }
        };

        let mut backoff = Backoff::new();
        let committed = loop {
            let result = match first_attempt.take() {
                Some(result) => result,
                None => {
                    if ctx.drain_left().is_some_and(|left| left.is_zero()) {
                        return Err(PipelineError::DrainTimeout(cfg.drain_timeout));
                    }
                    if ownership.generation() != batch.generation {
                        metrics
                            .batches_discarded
                            .with_label_values(&["rebalance"])
                            .inc();
                        break None;
                    }
                    let c = match ctx
                        .bounded("connecting", open(cfg, metrics, &mut client))
                        .await
                    {
                        Ok(c) => c,
                        Err(e) => {
                            on_db_error(&e, metrics, health)?;
                            // A batch waiting for Postgres to take connections
                            // again is retried like one whose COPY failed.
                            metrics.retries.inc();
                            ctx.back_off(&mut backoff).await;
                            continue;
                        }
                    };
                    let stale = ctx.state.lock().unwrap().unmarked_stale.clone();
                    let write = ctx.batch_write(&batch, &validated, &kpi_writes, &stale, fault_now);
                    if let Some(done) = in_doubt.take() {
                        match ctx
                            .bounded("asking whether a batch landed", sink::landed(c, &write))
                            .await
                        {
                            Ok(true) => {
                                tracing::info!(
                                    "the batch whose COMMIT failed had landed; not writing it again"
                                );
                                break Some(done);
                            }
                            Ok(false) => {}
                            Err(e) => {
                                in_doubt = Some(done);
                                forget_after_error(&e, &mut client, &cfg.database);
                                on_db_error(&e, metrics, health)?;
                                metrics.retries.inc();
                                ctx.back_off(&mut backoff).await;
                                continue;
                            }
                        }
                    }
                    match ctx
                        .bounded("copying a batch", sink::begin_copy(c, &write))
                        .await
                    {
                        Ok(copied) => {
                            commit_batch(
                                ctx,
                                copied,
                                &write,
                                batch.generation,
                                fault_now,
                                &mut in_doubt,
                            )
                            .await
                        }
                        Err(e) => Err(e),
                    }
                }
            };
            match result {
                Ok(Some(done)) => break Some(done),
                Ok(None) => {
                    metrics
                        .batches_discarded
                        .with_label_values(&["rebalance"])
                        .inc();
                    break None;
                }
                // A batch of an assignment given up meanwhile (a rebalance,
                // or the resync after a fence of an earlier batch, whose
                // expectations this one's chain on): its fence says nothing
                // of what is owned now. Another resync would throw away
                // what was read since the last one, the first batch of
                // which would have committed; the next would then be
                // fenced, and so on, for as long as the timing held.
                Err(SinkError::Fenced { .. } | SinkError::Duplicate(_))
                    if ownership.generation() != batch.generation =>
                {
                    metrics
                        .batches_discarded
                        .with_label_values(&["rebalance"])
                        .inc();
                    break None;
                }
                Err(e @ (SinkError::Fenced { .. } | SinkError::Duplicate(_))) => {
                    metrics.db_errors.with_label_values(&[e.kind()]).inc();
                    if let SinkError::Duplicate(message) = &e {
                        // Rows no member of this group wrote would be fenced
                        // and retried forever: refuse them. When asking fails,
                        // the retry after the resync asks again.
                        if let Ok(c) = ctx
                            .bounded("connecting", open(cfg, metrics, &mut client))
                            .await
                        {
                            let write = ctx.batch_write(&batch, &validated, &[], &[], None);
                            match ctx
                                .bounded(
                                    "checking a duplicate row",
                                    sink::check_duplicate(c, &write, message),
                                )
                                .await
                            {
                                Err(fatal @ SinkError::Fatal(_)) => {
                                    return Err(PipelineError::Sink(fatal));
                                }
                                Err(e) => forget_after_error(&e, &mut client, &cfg.database),
                                Ok(_) => {}
                            }
                        }
                    }
                    metrics
                        .batches_discarded
                        .with_label_values(&["fenced"])
                        .inc();
                    tracing::warn!(error = %e, "batch fenced off; re-reading offsets from Postgres");
                    ownership.request_resync();
                    // The batches read after this one expect what it would
                    // have stored: given up at once, not each fenced in turn
                    // before the intake gets to the resync.
                    ownership.give_up_batches();
                    // Postgres may hold less than we think (a failover to a
                    // lagging replica): forget what we remembered as stored.
                    members.clear();
                    break None;
                }
                // The same rows would fail every retry, and hold the
                // partition for good: the batch goes on without the KPI,
                // which is disabled and marked stale, as when it fails in
                // DataFusion. The transaction rolled back; the connection
                // is sound.
                Err(SinkError::KpiRefused { kpi, message }) => {
                    if let Some(engine) = kpis {
                        engine.disable(&kpi);
                    }
                    kpi_writes.retain(|w| w.def.name != kpi);
                    members.clear();
                    note_failures(
                        ctx,
                        vec![crate::kpi::KpiFailure {
                            kpi,
                            error: message,
                        }],
                    );
                }
                // Retired by `migrate` meanwhile: left as they are, as
                // retired KPIs stay, while this process goes on with the
                // rest. Not stale: the registry keeps saying retired, so
                // only a start that has the file again rebuilds the KPI.
                Err(SinkError::KpisRetired(retired)) => {
                    tracing::warn!(
                        kpis = ?retired,
                        "KPIs retired by `energy-stream migrate` while this consumer ran: it stops \
                         maintaining them; delete their files, or the next start rebuilds them"
                    );
                    for kpi in &retired {
                        if let Some(engine) = kpis {
                            engine.disable(kpi);
                        }
                    }
                    kpi_writes.retain(|w| !retired.contains(&w.def.name));
                    members.clear();
                }
                Err(e) => {
                    members.clear();
                    forget_after_error(&e, &mut client, &cfg.database);
                    on_db_error(&e, metrics, health)?;
                    metrics.retries.inc();
                    ctx.back_off(&mut backoff).await;
                }
            }
        };
        if let Some(done) = committed {
            record_commit(ctx, &batch, &validated, validate_time, kpi_time, done);
        }
        ctx.done.send_replace(seq);
    }
}

/// Gives up the connection an error came from, so that the retry opens a
/// new one:
/// - one that went unanswered may still deliver its late reply, or never
///   anything;
/// - one that still answers keeps what the error may come from: settings
///   read when it opened (a `statement_timeout` or read-only default set for
///   the role or database, and lifted since, failed every retry on it until
///   someone killed it), or a standby that `target_session_attrs` now skips;
/// - one the error closes, maybe only after this returns (a read-only
///   refusal), is counted by the caller, and [`open`] must not count it a
///   second time as closed while idle.
fn forget_after_error(e: &SinkError, client: &mut Option<Client>, db: &sink::Database) {
    if let Some(c) = client.take()
        && e.kind() == "timeout"
    {
        tracing::debug!("giving up a connection Postgres left unanswered");
        db.abandon(c);
    }
}

/// The lane's connection, reconnecting when it broke or was never opened.
///
/// A connection found closed here closed while idle, between batches (a
/// Postgres restart, an operator's `pg_terminate_backend`, a proxy's idle
/// timeout): no statement failed and no batch is retried, so it is counted
/// here, as kind `idle_closed`, or the restart would show nowhere in
/// `db_errors_total`.
async fn open<'c>(
    cfg: &PipelineConfig,
    metrics: &Metrics,
    client: &'c mut Option<Client>,
) -> Result<&'c mut Client, SinkError> {
    if client.as_ref().is_some_and(Client::is_closed) {
        *client = None;
        metrics
            .db_errors
            .with_label_values(&[crate::telemetry::DB_IDLE_CLOSED])
            .inc();
        tracing::warn!("Postgres closed the idle connection; reconnecting");
    }
    if client.is_none() {
        *client = Some(cfg.database.connect_writer().await?);
    }
    Ok(client.as_mut().expect("connected above"))
}

/// Logs and counts the KPIs that failed on a batch, and returns every KPI
/// that the next commit must mark stale. Called by the baton holder.
fn note_failures(ctx: &WriterCtx<'_>, failures: Vec<crate::kpi::KpiFailure>) -> Vec<String> {
    let mut state = ctx.state.lock().unwrap();
    for f in failures {
        // The file as this process reads it, not the default directory's.
        let file = match &ctx.cfg.kpi {
            Some(k) => k.dir.join(format!("{}.sql", f.kpi)),
            None => format!("{}.sql", f.kpi).into(),
        };
        // The batch still commits (events, rejects, the other KPIs): one
        // runaway query must not stall ingestion.
        tracing::error!(
            kpi = %f.kpi,
            error = %f.error,
            "KPI failed on a batch and is disabled in this process; its tables are marked stale \
             and rebuilt from events at the next start (fix {} first)",
            file.display()
        );
        ctx.metrics.kpi_failures.with_label_values(&[&f.kpi]).inc();
        state.unmarked_stale.push(f.kpi);
    }
    state.unmarked_stale.clone()
}

/// Fences, merges and commits a copied batch; None when a rebalance made it
/// stale first.
///
/// A failed COMMIT may still have landed: the server can commit and the
/// connection break before its reply arrives. So the batch's record goes to
/// `in_doubt`, and the retry asks Postgres ([`sink::landed`]) before writing
/// the batch again. Without that, the retry's COPY would meet the batch's own
/// rows, be taken for fenced, and the batch would go uncounted. (After a
/// rebalance it is given up unasked: its partitions may be another
/// consumer's by then, whose batch the stored offsets could describe.)
async fn commit_batch(
    ctx: &WriterCtx<'_>,
    copied: sink::Copied<'_>,
    write: &BatchWrite<'_>,
    generation: u64,
    fault_now: Option<FaultPoint>,
    in_doubt: &mut Option<Committed>,
) -> Result<Option<Committed>, SinkError> {
    let mut prepared = ctx.bounded("merging a batch", copied.finish(write)).await?;
    let merged = std::mem::take(&mut prepared.merged);
    let pending = std::mem::take(&mut prepared.pending);
    let timings = prepared.timings;
    let t = Instant::now();
    let _gate = ctx.ownership.gate.lock().await;
    if ctx.ownership.generation() != generation {
        ctx.bounded("rolling back a stale batch", prepared.rollback())
            .await?;
        return Ok(None);
    }
    if fault_now == Some(FaultPoint::InCommit) {
        // Dies while COMMIT is in flight: it may or may not land.
        std::thread::spawn(|| {
            std::thread::sleep(Duration::from_micros(300));
            tracing::warn!("fault injection: aborting inside the COMMIT");
            std::process::abort();
        });
    }
    // A COMMIT given up on may still land: `in_doubt` below settles it.
    let outcome = ctx.bounded("committing a batch", prepared.commit()).await;
    let done = Committed {
        copy: timings.copy,
        merge: timings.merge,
        merged,
        pending,
        commit: t.elapsed(),
    };
    let outcome = match outcome {
        Ok(()) if fault_now == Some(FaultPoint::LostCommitReply) => {
            tracing::warn!("fault injection: the COMMIT landed; reporting its reply as lost");
            Err(SinkError::Unavailable {
                kind: "connection",
                message: "fault injection: the reply to COMMIT was lost".into(),
            })
        }
        other => other,
    };
    match outcome {
        Ok(()) => Ok(Some(done)),
        Err(e) => {
            *in_doubt = Some(done);
            Err(e)
        }
    }
}

/// After a COMMIT: metrics, the run summary and the Kafka group commit.
fn record_commit(
    ctx: &WriterCtx<'_>,
    batch: &Batch,
    validated: &crate::validate::Validated,
    validate_time: Duration,
    kpi_time: Duration,
    done: Committed,
) {
    ctx.members.commit(done.pending);
    ctx.claimed.store(true, Ordering::Relaxed);
    let metrics = ctx.metrics;
    let mut state = ctx.state.lock().unwrap();
    state.unmarked_stale.clear();
    metrics
        .stage_duration
        .with_label_values(&[stage::KPI])
        .observe((kpi_time + done.merge).as_secs_f64());
    for (kpi, n) in done.merged {
        metrics.kpi_rows_merged.with_label_values(&[&kpi]).inc_by(n);
    }
    // The probe only asks while no batch commits, so the end of an outage
    // that batches retried through is told here.
    if !ctx.health.postgres_ok.swap(true, Ordering::Relaxed) {
        tracing::info!("Postgres answers again: a batch committed");
    }
    ctx.health.committing.store(true, Ordering::Relaxed);
    for (name, secs) in [
        (stage::COPY, done.copy),
        (stage::COMMIT, done.commit),
        (stage::DECODE, batch.decode_time),
        (stage::VALIDATE, validate_time),
    ] {
        metrics
            .stage_duration
            .with_label_values(&[name])
            .observe(secs.as_secs_f64());
    }
    let now = Utc::now();
    metrics.batches.inc();
    // Counted as the batch commits, not as it is read: a batch discarded by
    // a rebalance or a fence is read again, and its messages were counted
    // twice (0.26% more than the topic held after one outage).
    metrics.events_consumed.inc_by(batch.rows as u64);
    metrics.batch_rows.observe(batch.rows as f64);
    metrics.last_commit.set(now.timestamp());
    let summary = &mut state.summary;
    if let Some(ts) = batch.oldest_ts_ms {
        let ms = (now.timestamp_millis() - ts).max(0);
        metrics.end_to_end_latency.observe(ms as f64 / 1000.0);
        summary.end_to_end_ms.push(ms as u64);
    }
    let since_cut = batch.cut_at.elapsed();
    tracing::debug!(
        rows = batch.rows,
        validate_ms = validate_time.as_millis() as u64,
        kpi_ms = kpi_time.as_millis() as u64,
        copy_ms = done.copy.as_millis() as u64,
        merge_ms = done.merge.as_millis() as u64,
        commit_ms = done.commit.as_millis() as u64,
        since_cut_ms = since_cut.as_millis() as u64,
        "batch committed"
    );
    summary.batch_latency_us.push(since_cut.as_micros() as u64);
    let written = count_by(&validated.valid, col::EVENT_TYPE);
    let rejected = count_by(&validated.rejects, col::REASON);
    for (k, n) in &written {
        metrics.events_written.with_label_values(&[k]).inc_by(*n);
        *summary.by_event_type.entry(k.clone()).or_default() += n;
    }
    for (k, n) in &rejected {
        metrics.events_rejected.with_label_values(&[k]).inc_by(*n);
        *summary.by_reason.entry(k.clone()).or_default() += n;
    }
    summary.batches += 1;
    summary.events_written += validated.valid.num_rows() as u64;
    summary.rejected += validated.rejects.num_rows() as u64;
    let next: Vec<(i32, i64)> = batch
        .offsets
        .iter()
        .map(|o| (o.partition, o.next))
        .collect();
    ctx.source.commit_to_group(&next);
}

fn on_db_error(e: &SinkError, metrics: &Metrics, health: &Health) -> Result<(), PipelineError> {
    if let SinkError::KpisDiffer(kpis) = e {
        // Not a database error: the caller reloads the KPI files (a KPI
        // rollout does this on every consumer but the one that installed
        // it), and the batch is read again. Counted as fatal only if the
        // caller stops on it.
        metrics
            .batches_discarded
            .with_label_values(&["kpis_changed"])
            .inc();
        return Err(PipelineError::Sink(SinkError::KpisDiffer(kpis.clone())));
    }
    metrics.db_errors.with_label_values(&[e.kind()]).inc();
    if !e.is_retryable() {
        return Err(PipelineError::Sink(SinkError::Fatal(e.to_string())));
    }
    health.postgres_ok.store(false, Ordering::Relaxed);
    health.committing.store(false, Ordering::Relaxed);
    tracing::warn!(error = %e, "Postgres write failed; retrying the same batch, offsets not committed");
    Ok(())
}

/// Rows per value of a string column (event type, reject reason): per batch, not per row metric calls.
fn count_by(batch: &RecordBatch, column: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    if let Some(a) = batch.column_by_name(column) {
        let a = a.as_string::<i32>();
        for i in 0..a.len() {
            if a.is_valid(i) {
                *out.entry(a.value(i).to_string()).or_default() += 1;
            }
        }
    }
    out
}

/// What the process committed before this run of the stages: a change of
/// KPI files starts the stages again, and the progress lines go on counting
/// from the pipeline's start rather than from the change.
#[derive(Clone, Copy)]
struct Earlier {
    written: u64,
    rejected: u64,
    batches: u64,
}

impl Earlier {
    fn of(total: &RunSummary) -> Self {
        Earlier {
            written: total.events_written,
            rejected: total.rejected,
            batches: total.batches,
        }
    }
}

/// Periodic progress lines, on the writer's clock.
struct Progress {
    earlier: Earlier,
    last: Instant,
    last_written: u64,
}

impl Progress {
    fn new(earlier: Earlier) -> Self {
        Progress {
            earlier,
            last: Instant::now(),
            last_written: 0,
        }
    }

    /// One progress line: the rate since the last one, the counts since the
    /// pipeline started.
    fn report(&mut self, s: &RunSummary, metrics: &Metrics) {
        let dt = self.last.elapsed().as_secs_f64();
        let rate = (s.events_written + s.rejected - self.last_written) as f64 / dt;
        let lag: i64 = Collector::collect(&metrics.consumer_lag)
            .iter()
            .flat_map(|f| f.get_metric())
            .map(|m| m.get_gauge().value() as i64)
            .sum();
        tracing::info!(
            events_per_sec = rate.round() as u64,
            written = self.earlier.written + s.events_written,
            rejected = self.earlier.rejected + s.rejected,
            batches = self.earlier.batches + s.batches,
            partitions = metrics.assigned_partitions.get(),
            lag,
            "progress"
        );
        self.last = Instant::now();
        self.last_written = s.events_written + s.rejected;
    }
}

/// The last line of a run that stopped cleanly, with what all its KPI sets
/// committed.
fn log_stopped(started: Instant, total: &RunSummary) {
    let secs = started.elapsed().as_secs_f64();
    tracing::info!(
        written = total.events_written,
        rejected = total.rejected,
        batches = total.batches,
        elapsed_secs = format!("{secs:.1}"),
        "pipeline stopped; everything consumed is committed"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression: one message with Kafka timestamp 0 among fresh ones set
    /// its batch's end-to-end latency to the time since 1970.
    #[test]
    fn implausibly_old_kafka_timestamps_do_not_count_for_latency() {
        let now = Instant::now();
        let fresh = 1_796_000_000_000;
        let mut cut = Cutter::new(0);
        cut.note(0, 0, Some(fresh), 0, now);
        cut.note(0, 1, Some(0), 1, now);
        cut.note(1, 0, Some(LATENCY_FLOOR_MS - 1), 2, now);
        assert_eq!(cut.oldest_ts_ms, Some(fresh));
        cut.note(1, 1, Some(fresh - 3_600_000), 3, now);
        assert_eq!(
            cut.oldest_ts_ms,
            Some(fresh - 3_600_000),
            "an old message still counts"
        );
        // The raw timestamp is still kept for the log's fingerprint.
        assert_eq!(cut.last[&0], (1, Some(0), 1));
    }
}
