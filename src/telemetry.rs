//! Telemetry: every metric name, the registry, the log set-up and the
//! `/metrics`, `/healthz`, `/readyz` endpoints.
//!
//! Metric names are a contract with the dashboards and alerts in `monitoring/`,
//! so they are spelled once, here. The pipeline records them once per batch,
//! never per row; the one stage that touches them is the source, which alone
//! sees the consumer lag and the Kafka client's errors, through the handles
//! the pipeline gives it. Labels stay low-cardinality (event type, reject
//! reason, stage, partition).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

pub const EVENTS_CONSUMED: &str = "energy_stream_events_consumed_total";
pub const EVENTS_WRITTEN: &str = "energy_stream_events_written_total";
pub const EVENTS_REJECTED: &str = "energy_stream_events_rejected_total";
pub const BATCHES: &str = "energy_stream_batches_total";
pub const BATCH_ROWS: &str = "energy_stream_batch_rows";
pub const STAGE_DURATION: &str = "energy_stream_stage_duration_seconds";
pub const END_TO_END_LATENCY: &str = "energy_stream_end_to_end_latency_seconds";
pub const CONSUMER_LAG: &str = "energy_stream_consumer_lag";
pub const ASSIGNED_PARTITIONS: &str = "energy_stream_assigned_partitions";
pub const STALLED_PARTITIONS: &str = "energy_stream_stalled_partitions";
pub const DB_ERRORS: &str = "energy_stream_db_errors_total";
/// The `kind` of [`DB_ERRORS`] for a connection Postgres closed while the
/// pipeline idled (no statement failed, so no batch was retried).
pub const DB_IDLE_CLOSED: &str = "idle_closed";
pub const RETRIES: &str = "energy_stream_retries_total";
pub const LAST_COMMIT: &str = "energy_stream_last_commit_timestamp_seconds";
pub const KPI_ROWS_MERGED: &str = "energy_stream_kpi_rows_merged_total";
pub const KPI_FAILURES: &str = "energy_stream_kpi_failures_total";
pub const BATCHES_DISCARDED: &str = "energy_stream_batches_discarded_total";
pub const KAFKA_ERRORS: &str = "energy_stream_kafka_errors_total";
pub const UP: &str = "energy_stream_ready";
pub const PRODUCER_SENT: &str = "energy_stream_producer_events_sent_total";
pub const PRODUCER_BAD_LINES: &str = "energy_stream_producer_bad_lines_total";

/// Stage label values of [`STAGE_DURATION`].
pub mod stage {
    pub const DECODE: &str = "decode";
    pub const VALIDATE: &str = "validate";
    pub const KPI: &str = "kpi";
    pub const COPY: &str = "copy";
    pub const COMMIT: &str = "commit";
    pub const ALL: [&str; 5] = [DECODE, VALIDATE, KPI, COPY, COMMIT];
}

/// The `kind` label values of [`KAFKA_ERRORS`].
pub mod kafka_error {
    /// No broker can be reached.
    pub const ALL_BROKERS_DOWN: &str = "all_brokers_down";
    /// A connection to a broker failed.
    pub const TRANSPORT: &str = "transport";
    /// A fetch failed: a partition is held at its offset until it reads.
    pub const CONSUME: &str = "consume";
    /// Any other client error.
    pub const OTHER: &str = "other";
    /// Leaving the group at the end went unanswered.
    pub const CLOSE_TIMEOUT: &str = "close_timeout";
    /// Messages the client delivered twice and the intake dropped.
    pub const REDELIVERED: &str = "redelivered";
    pub const ALL: [&str; 6] = [
        ALL_BROKERS_DOWN,
        TRANSPORT,
        CONSUME,
        OTHER,
        CLOSE_TIMEOUT,
        REDELIVERED,
    ];
}

/// The pipeline's metrics, registered in their own registry so that several
/// pipelines in one test process do not share counters.
pub struct Metrics {
    pub registry: Registry,
    pub events_consumed: IntCounter,
    pub events_written: IntCounterVec,
    pub events_rejected: IntCounterVec,
    pub batches: IntCounter,
    pub batch_rows: Histogram,
    pub stage_duration: HistogramVec,
    pub end_to_end_latency: Histogram,
    pub consumer_lag: IntGaugeVec,
    pub assigned_partitions: IntGauge,
    pub stalled_partitions: IntGauge,
    pub db_errors: IntCounterVec,
    pub retries: IntCounter,
    pub last_commit: IntGauge,
    pub kpi_rows_merged: IntCounterVec,
    pub kpi_failures: IntCounterVec,
    pub batches_discarded: IntCounterVec,
    pub kafka_errors: IntCounterVec,
    pub ready: IntGauge,
    pub producer_sent: IntCounterVec,
    pub producer_bad_lines: IntCounterVec,
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique metric");
    g
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let r = Registry::new();
        #[cfg(target_os = "linux")]
        r.register(Box::new(process::ProcessMetrics::new()))
            .expect("process collector");
        let secs = vec![
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            30.0,
        ];
        let batch_rows = Histogram::with_opts(
            HistogramOpts::new(BATCH_ROWS, "Messages per micro-batch.")
                .buckets(prometheus::exponential_buckets(1.0, 4.0, 10).expect("valid buckets")),
        )
        .expect("valid metric");
        r.register(Box::new(batch_rows.clone())).expect("unique");
        let stage_duration = HistogramVec::new(
            HistogramOpts::new(STAGE_DURATION, "Time per batch spent in each stage.")
                .buckets(secs.clone()),
            &["stage"],
        )
        .expect("valid metric");
        r.register(Box::new(stage_duration.clone()))
            .expect("unique");
        let e2e = Histogram::with_opts(
            HistogramOpts::new(
                END_TO_END_LATENCY,
                "From the Kafka timestamp of a batch's oldest message to its Postgres commit (one sample per batch).",
            )
            // Finer around a second, where the latency target sits
            // (batch-max-wait + 250 ms).
            .buckets(vec![
                0.05, 0.1, 0.25, 0.5, 0.6, 0.7, 0.75, 0.8, 0.9, 1.0, 1.25, 1.5, 2.0, 2.5, 5.0,
                10.0, 30.0, 60.0,
            ]),
        )
        .expect("valid metric");
        r.register(Box::new(e2e.clone())).expect("unique");
        let lag = IntGaugeVec::new(
            Opts::new(
                CONSUMER_LAG,
                "Messages behind the high watermark per assigned partition.",
            ),
            &["topic", "partition"],
        )
        .expect("valid metric");
        r.register(Box::new(lag.clone())).expect("unique");

        let m = Arc::new(Metrics {
            events_consumed: counter(
                &r,
                EVENTS_CONSUMED,
                "Messages consumed from Kafka and committed to Postgres, as events or rejects; one re-read after its batch was discarded counts once.",
            ),
            events_written: counter_vec(
                &r,
                EVENTS_WRITTEN,
                "Valid events committed to Postgres.",
                &["event_type"],
            ),
            events_rejected: counter_vec(
                &r,
                EVENTS_REJECTED,
                "Messages committed to rejected_events, by reason.",
                &["reason"],
            ),
            batches: counter(&r, BATCHES, "Micro-batches committed."),
            batch_rows,
            stage_duration,
            end_to_end_latency: e2e,
            consumer_lag: lag,
            assigned_partitions: gauge(
                &r,
                ASSIGNED_PARTITIONS,
                "Kafka partitions assigned to this consumer (0: it reads nothing).",
            ),
            stalled_partitions: gauge(
                &r,
                STALLED_PARTITIONS,
                "Partitions of the topic, whoever owns them, with messages past their offset stored in Postgres that did not move over the last check (--rebalance-limit-secs plus --batch-max-wait-ms).",
            ),
            db_errors: counter_vec(
                &r,
                DB_ERRORS,
                "Postgres errors, by kind (connection, shutdown, conflict, fenced, idle_closed, ...).",
                &["kind"],
            ),
            retries: counter(&r, RETRIES, "Batch write attempts retried after an error."),
            last_commit: gauge(
                &r,
                LAST_COMMIT,
                "Unix time of the last successful Postgres commit.",
            ),
            kpi_rows_merged: counter_vec(
                &r,
                KPI_ROWS_MERGED,
                "KPI rows merged into KPI tables.",
                &["kpi"],
            ),
            kpi_failures: counter_vec(
                &r,
                KPI_FAILURES,
                "KPIs disabled after failing on a batch (memory limit, runtime error).",
                &["kpi"],
            ),
            batches_discarded: counter_vec(
                &r,
                BATCHES_DISCARDED,
                "Batches dropped uncommitted, to be read again: their partitions moved (rebalance, fenced), or another consumer changed the KPIs under them (kpis_changed).",
                &["cause"],
            ),
            kafka_errors: counter_vec(
                &r,
                KAFKA_ERRORS,
                "Errors reported by the Kafka client.",
                &["kind"],
            ),
            ready: gauge(
                &r,
                UP,
                "1 when connected to Kafka and Postgres and able to commit.",
            ),
            producer_sent: counter_vec(
                &r,
                PRODUCER_SENT,
                "Events the producer sent, by delivery status.",
                &["status"],
            ),
            producer_bad_lines: counter_vec(
                &r,
                PRODUCER_BAD_LINES,
                "Input lines the producer refused to send, by reason.",
                &["reason"],
            ),
            registry: r,
        });
        m.initialise_known_labels();
        m
    }

    /// Creates every series whose label values are known up front, at 0.
    ///
    /// A labelled counter has no series until its first increment, so
    /// `rate(energy_stream_db_errors_total[5m])` would be empty (not 0) on a
    /// healthy pipeline, and dashboards and alerts could not tell "no errors"
    /// from "not scraped". Kafka partitions are not known up front; their lag
    /// series appear on assignment.
    fn initialise_known_labels(&self) {
        for t in crate::event::EventType::ALL {
            self.events_written.with_label_values(&[t.as_str()]);
        }
        for r in crate::event::RejectReason::ALL {
            self.events_rejected.with_label_values(&[r.as_str()]);
        }
        for s in stage::ALL {
            self.stage_duration.with_label_values(&[s]);
        }
        for k in crate::sink::SinkError::KINDS {
            self.db_errors.with_label_values(&[k]);
        }
        self.db_errors.with_label_values(&[DB_IDLE_CLOSED]);
        for c in ["rebalance", "fenced", "kpis_changed"] {
            self.batches_discarded.with_label_values(&[c]);
        }
        for k in kafka_error::ALL {
            self.kafka_errors.with_label_values(&[k]);
        }
    }

    /// Each KPI's series, at 0, once the KPIs are known: a KPI that never
    /// failed then reads `rate(energy_stream_kpi_failures_total[5m])` as 0,
    /// not as an empty result.
    pub fn initialise_kpi_labels<'a>(&self, kpis: impl IntoIterator<Item = &'a str>) {
        for k in kpis {
            self.kpi_rows_merged.with_label_values(&[k]);
            self.kpi_failures.with_label_values(&[k]);
        }
    }

    /// The producer's series, created only in the producer so a consumer's
    /// scrape does not carry empty producer metrics.
    pub fn initialise_producer_labels(&self) {
        for s in ["ok", "failed"] {
            self.producer_sent.with_label_values(&[s]);
        }
        for r in crate::produce::BAD_LINE_REASONS {
            self.producer_bad_lines.with_label_values(&[r]);
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding cannot fail");
        String::from_utf8(buf).expect("exposition is UTF-8")
    }
}

#[cfg(target_os = "linux")]
mod process {
    use std::sync::Mutex;

    use prometheus::core::{Collector, Desc};
    use prometheus::proto::MetricFamily;
    use prometheus::{Counter, Opts};

    const CPU: &str = "process_cpu_seconds_total";

    /// The standard `process_*` metrics, with a CPU counter in microseconds.
    ///
    /// The prometheus crate's collector divides clock ticks by their rate in
    /// integers, so its `process_cpu_seconds_total` moves in whole seconds:
    /// `rate()` over a 15 s scrape read a process using 0.3 cores as 0 or
    /// 0.07 at random, and the ops dashboard's CPU panel showed steps, not
    /// use. Every other series is the crate's, passed on.
    pub struct ProcessMetrics {
        inner: prometheus::process_collector::ProcessCollector,
        cpu: Counter,
        // Two scrapes at once must not both add the same interval.
        last: Mutex<f64>,
    }

    impl ProcessMetrics {
        pub fn new() -> Self {
            let inner = prometheus::process_collector::ProcessCollector::for_self();
            let help = inner
                .desc()
                .into_iter()
                .find(|d| d.fq_name == CPU)
                .map_or_else(
                    || "Total user and system CPU time spent in seconds.".to_string(),
                    |d| d.help.clone(),
                );
            ProcessMetrics {
                inner,
                cpu: Counter::with_opts(Opts::new(CPU, help)).expect("valid metric"),
                last: Mutex::new(0.0),
            }
        }
    }

    /// User plus system CPU time of every thread of the process, in seconds.
    pub fn cpu_seconds() -> Option<f64> {
        let mut usage = std::mem::MaybeUninit::<libc::rusage>::uninit();
        // SAFETY: getrusage writes the whole struct when it returns 0.
        if unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) } != 0 {
            return None;
        }
        // SAFETY: initialised by the successful call above.
        let usage = unsafe { usage.assume_init() };
        let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        Some(secs(usage.ru_utime) + secs(usage.ru_stime))
    }

    impl Collector for ProcessMetrics {
        fn desc(&self) -> Vec<&Desc> {
            // The crate's descriptors include one for the CPU counter, with
            // the same name and help as ours.
            self.inner.desc()
        }

        fn collect(&self) -> Vec<MetricFamily> {
            let mut families: Vec<MetricFamily> = self
                .inner
                .collect()
                .into_iter()
                .filter(|f| f.name() != CPU)
                .collect();
            if let Some(now) = cpu_seconds() {
                let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
                if now > *last {
                    self.cpu.inc_by(now - *last);
                    *last = now;
                }
            }
            families.extend(self.cpu.collect());
            families
        }
    }
}

/// Liveness and readiness, shared between the pipeline and the HTTP server.
///
/// Ready means all four: the broker answers, the topic is there, Postgres
/// answers, and batches commit. A writer that keeps retrying a batch
/// (Postgres read-only, disk full, a lock it cannot get) is not ready even
/// while the connection is up, nor is a consumer waiting for its topic.
pub struct Health {
    pub postgres_ok: AtomicBool,
    pub kafka_ok: AtomicBool,
    /// False while `run` waits for its topic to be created.
    pub topic_ok: AtomicBool,
    /// False from a failed batch write until the next successful commit.
    pub committing: AtomicBool,
    /// False while a revocation has gone without a new assignment for too
    /// long (a rebalance that does not end), until one comes.
    pub in_group: AtomicBool,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            postgres_ok: AtomicBool::new(false),
            kafka_ok: AtomicBool::new(false),
            topic_ok: AtomicBool::new(true),
            committing: AtomicBool::new(true),
            in_group: AtomicBool::new(true),
        }
    }
}

impl Health {
    pub fn is_ready(&self) -> bool {
        self.postgres_ok.load(Ordering::Relaxed)
            && self.kafka_ok.load(Ordering::Relaxed)
            && self.topic_ok.load(Ordering::Relaxed)
            && self.committing.load(Ordering::Relaxed)
            && self.in_group.load(Ordering::Relaxed)
    }
}

#[derive(Clone)]
struct AppState {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

/// Binds the metrics endpoint; the returned future serves until `shutdown` resolves.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let app = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(AppState { metrics, health });
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let handle = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::warn!(error = %e, "metrics endpoint stopped");
        }
    });
    Ok((local, handle))
}

async fn render_metrics(State(s): State<AppState>) -> ([(&'static str, &'static str); 1], String) {
    s.metrics.ready.set(i64::from(s.health.is_ready()));
    (
        [("content-type", "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
}

async fn readyz(State(s): State<AppState>) -> (StatusCode, &'static str) {
    if s.health.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

/// Writes the error a command ends on to stderr: `error: ...` for a person,
/// or, with `--log-json`, one JSON line shaped like the log's, so that a
/// collector reading JSON lines gets the reason too. Written directly, not
/// through the log filter: `RUST_LOG=off` must not hide why it stopped.
pub fn report_exit_error(json: bool, line: &str) {
    if json {
        let record = serde_json::json!({
            "timestamp": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            "level": "ERROR",
            "fields": {"message": "exiting on an error", "error": line},
        });
        eprintln!("{record}");
    } else {
        eprintln!("error: {line}");
    }
}

/// Installs the tracing subscriber: human-readable lines (or JSON), the
/// `RUST_LOG` filter, `info` by default. Called once, by `main`.
pub fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,rdkafka=warn,tokio_postgres=warn")
    });
    use std::io::IsTerminal;
    // Colour codes only for a person at a terminal, not in files, pipes or
    // a container's log collector.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_follows_prometheus_conventions() {
        let m = Metrics::new();
        m.events_written.with_label_values(&["user_login"]).inc();
        m.events_rejected.with_label_values(&["empty"]).inc();
        m.stage_duration
            .with_label_values(&[stage::COPY])
            .observe(0.1);
        m.consumer_lag.with_label_values(&["t", "0"]).set(3);
        m.db_errors.with_label_values(&["connection"]).inc();
        m.kpi_rows_merged.with_label_values(&["k"]).inc();
        m.batches_discarded.with_label_values(&["rebalance"]).inc();
        m.kafka_errors.with_label_values(&["transport"]).inc();
        m.producer_sent.with_label_values(&["ok"]).inc();
        m.producer_bad_lines.with_label_values(&["x"]).inc();
        let text = m.render();
        for name in [
            EVENTS_CONSUMED,
            EVENTS_WRITTEN,
            EVENTS_REJECTED,
            BATCHES,
            BATCH_ROWS,
            STAGE_DURATION,
            END_TO_END_LATENCY,
            CONSUMER_LAG,
            DB_ERRORS,
            RETRIES,
            LAST_COMMIT,
            KPI_ROWS_MERGED,
            PRODUCER_SENT,
            PRODUCER_BAD_LINES,
            "process_resident_memory_bytes",
        ] {
            assert!(text.contains(&format!("# TYPE {name} ")), "{name} missing");
            assert!(name.starts_with("energy_stream_") || name.starts_with("process_"));
        }
        for name in [EVENTS_CONSUMED, EVENTS_WRITTEN, DB_ERRORS, RETRIES] {
            assert!(name.ends_with("_total"));
        }
    }

    fn sample(text: &str, name: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("{name} missing in\n{text}"))
            .trim()
            .parse()
            .expect("a number")
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn process_cpu_seconds_are_not_whole_seconds() {
        // Regression: the prometheus crate's collector counted whole seconds,
        // so rate() over it read 0 or a whole core per interval.
        let m = Metrics::new();
        let before = sample(&m.render(), "process_cpu_seconds_total");
        let start = process::cpu_seconds().expect("getrusage");
        let mut x = 0u64;
        while process::cpu_seconds().expect("getrusage") - start < 0.05 {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let after = sample(&m.render(), "process_cpu_seconds_total");
        assert!(after - before >= 0.05, "{before} -> {after}");
        // Microseconds: a whole number of seconds twice is one in 10^12.
        assert!(
            before.fract() != 0.0 || after.fract() != 0.0,
            "{before} -> {after}"
        );
        let text = m.render();
        assert_eq!(
            text.matches("# TYPE process_cpu_seconds_total counter")
                .count(),
            1
        );
        assert!(text.contains("# TYPE process_resident_memory_bytes gauge"));
    }

    #[test]
    fn every_kafka_error_kind_starts_at_zero() {
        // Regression: kind="redelivered" appeared only once it first
        // happened, so rate() over it had no series to start from.
        let text = Metrics::new().render();
        for k in kafka_error::ALL {
            let line = format!("{KAFKA_ERRORS}{{kind=\"{k}\"}} 0");
            assert!(text.contains(&line), "{line} missing");
        }
    }
}
