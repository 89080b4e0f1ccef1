//! Config: the command line, its environment fallbacks, and the typed settings
//! handed to the stages.
//!
//! This module defines every setting; the edge (`cli`) reads the environment
//! and argv once and hands them here, and `RUST_LOG` goes to the log set-up.
//! The settings of a running service (`run`, `migrate`, the database and
//! Kafka options) have env fallbacks, shown in `--help`; one-off tools
//! (`generate`, most of `produce` and `bench`) take flags only. Secrets are
//! accepted only from the environment or from a `*_FILE` path, never from
//! argv, and `--help` hides env values. Stages receive plain typed structs
//! ([`PipelineConfig`] and its parts) and never see clap.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use clap::{Args, Parser, Subcommand};

use crate::decode::DecodeConfig;
use crate::source::KafkaConfig;
use crate::validate::ValidationRules;

/// Errors in the user's configuration, each a one-line explanation.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "no database configured: set DATABASE_URL (or DATABASE_URL_FILE), e.g. postgres://user@localhost:5432/energy"
    )]
    NoDatabase,
    #[error(
        "both DATABASE_URL and DATABASE_URL_FILE (or --database-url-file) are set: set only one of them"
    )]
    DatabaseUrlTwice,
    #[error("invalid database URL: {0}")]
    BadDatabaseUrl(String),
    #[error(
        "refusing a password on the command line (it would show in `ps`): pass the URL in DATABASE_URL or DATABASE_URL_FILE, or the password in DATABASE_PASSWORD_FILE"
    )]
    PasswordInArgv,
    #[error("cannot read {var} file {path}: {source}")]
    SecretFile {
        var: String,
        path: String,
        source: std::io::Error,
    },
    #[error("invalid --kafka-option {0:?}: expected key=value")]
    BadKafkaOption(String),
    #[error(
        "refusing Kafka option {0} on the command line because it holds a secret: set KAFKA_OPT_{env} (or KAFKA_OPT_{env}_FILE) instead",
        env = .0.to_uppercase().replace('.', "_")
    )]
    SecretKafkaOption(String),
    #[error("refusing Kafka option {key}: {why}")]
    OwnedKafkaOption { key: String, why: &'static str },
    #[error("both {0} and {0}_FILE are set: set only one of them")]
    KafkaOptionTwice(String),
    #[error(
        "--database-ca-file (DATABASE_CA_FILE) is set but the database URL says sslmode=disable, so the server's certificate would never be checked: use sslmode=require, or drop the CA file"
    )]
    CaFileWithoutTls,
}

#[derive(Debug, Parser)]
#[command(
    name = "energy-stream",
    version,
    about = "Streams energy-retail events from Kafka into PostgreSQL through Arrow micro-batches, exactly once."
)]
pub struct Cli {
    /// Log as JSON lines instead of text.
    #[arg(long, env = "LOG_JSON", global = true, value_parser = clap::builder::BoolishValueParser::new())]
    pub log_json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the pipeline: consume, validate, write to Postgres exactly once.
    Run(RunArgs),
    /// As the owner role: apply the schema migrations in sql/, install the KPI
    /// tables of --queries-dir, grant the app and read-only roles, and exit.
    Migrate(MigrateArgs),
    /// Write deterministic, realistic sample events as JSONL.
    Generate(GenerateArgs),
    /// Replay a JSONL file into a Kafka topic.
    Produce(ProduceArgs),
    /// The newcomer's tour: in-process Kafka, a local Postgres, sample data, one summary.
    Demo(DemoArgs),
    /// Parse, plan and trial-run every KPI file (and plan its view in Postgres when a database is given); print keys, measures, merge rules and tables.
    Check(CheckArgs),
    /// Recompute KPIs from the events table into fresh tables and swap them in.
    Backfill(KpiDbArgs),
    /// Recompute KPIs from the events table and diff them with the streamed tables.
    Verify(KpiDbArgs),
    /// Throughput race: `run` against a plain COPY of the same rows (see BENCHMARKS.md).
    Bench(BenchArgs),
}

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub db: DbArgs,
    /// Kafka bootstrap servers of the real broker to load.
    #[arg(long, env = "KAFKA_BROKERS", default_value = "localhost:9092")]
    pub brokers: String,
    /// Events to generate, load and stream (default 1 000 000; 100 000 with --quick).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub events: Option<u64>,
    /// The CI size: 100 000 events.
    #[arg(long)]
    pub quick: bool,
    /// Exit 1 when the pipeline's rate is below this fraction of either COPY
    /// ceiling (0 to 10; 0 only measures).
    #[arg(long, default_value_t = 0.6, value_parser = parse_min_ratio)]
    pub min_ratio: f64,
    /// Afterwards, stream at 10% of the measured rate for this many seconds and
    /// report end-to-end latency (0 skips it; at most 86400).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=DAY_SECS))]
    pub latency_secs: u64,
    /// Partitions of the bench topic (1 to 1000).
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(i32).range(1..=1000))]
    pub partitions: i32,
    /// KPI files `run` computes.
    #[arg(long, default_value = "queries")]
    pub queries_dir: PathBuf,
    /// Extra arguments for `run`, after `--` (e.g. `-- --batch-max-rows 5000`).
    #[arg(last = true)]
    pub run_args: Vec<String>,
}

/// `--min-ratio`: a number from 0 to 10. NaN and negative values passed
/// every run, switching the gate off without a word.
fn parse_min_ratio(text: &str) -> Result<f64, String> {
    let v: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a number"))?;
    if (0.0..=10.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{text} is not between 0 and 10"))
    }
}

#[derive(Debug, Clone, Args)]
pub struct QueriesArgs {
    /// Directory of KPI files (*.sql).
    #[arg(long, env = "QUERIES_DIR", default_value = "queries")]
    pub queries_dir: PathBuf,
}

#[derive(Debug, Clone, Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    pub db: DbArgs,
    #[command(flatten)]
    pub queries: QueriesArgs,
    /// Only the schema; leave KPI tables to `run` (single-role set-ups).
    #[arg(long, env = "NO_KPIS", value_parser = clap::builder::BoolishValueParser::new())]
    pub no_kpis: bool,
    /// Let a --queries-dir that holds no KPI file retire every KPI the
    /// database maintains. Without it that is refused: an empty or missing
    /// mount looks the same as deleting every file on purpose.
    #[arg(long, conflicts_with = "no_kpis")]
    pub retire_all: bool,
    /// Role that runs the pipeline: gets SELECT, INSERT and UPDATE on the
    /// pipeline's tables (also on tables created later), nothing else. The
    /// role must exist.
    #[arg(long, env = "APP_ROLE")]
    pub grant_app: Option<String>,
    /// Read-only role (dashboards): gets SELECT only. The role must exist.
    #[arg(long, env = "READ_ROLE")]
    pub grant_read: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub queries: QueriesArgs,
    /// With a database (optional), each KPI's view is also planned in
    /// Postgres, in a transaction that is rolled back, so that functions
    /// Postgres lacks are found before a start.
    #[command(flatten)]
    pub db: DbArgs,
}

#[derive(Debug, Clone, Args)]
pub struct KpiDbArgs {
    #[command(flatten)]
    pub db: DbArgs,
    #[command(flatten)]
    pub queries: QueriesArgs,
    /// Only this KPI (the file name without .sql).
    #[arg(long)]
    pub kpi: Option<String>,
}

/// Where Postgres is. The URL may carry a password only when it comes from the
/// environment or a file.
#[derive(Debug, Clone, Args)]
pub struct DbArgs {
    /// PostgreSQL URL, e.g. postgres://energy@localhost:5432/energy?sslmode=require.
    /// Without a password here; put secrets in DATABASE_URL or the *_FILE variables.
    #[arg(long = "database-url", env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// A file holding the database URL (for container secrets).
    #[arg(long, env = "DATABASE_URL_FILE")]
    pub database_url_file: Option<PathBuf>,
    /// A file holding the database password, applied to the URL.
    #[arg(long, env = "DATABASE_PASSWORD_FILE")]
    pub database_password_file: Option<PathBuf>,
    /// CA certificate(s) to verify the server against. With it the connection
    /// needs TLS (sslmode=prefer acts as require; disable is refused).
    /// Without it TLS encrypts but does not verify.
    #[arg(long, env = "DATABASE_CA_FILE")]
    pub database_ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct KafkaArgs {
    /// Kafka bootstrap servers.
    #[arg(long, env = "KAFKA_BROKERS", default_value = "localhost:9092", value_parser = non_empty("a broker list, host:port[,host:port...]"))]
    pub brokers: String,
    /// Topic to read (run) or write (produce).
    #[arg(long, env = "TOPIC", default_value = "energy_events", value_parser = parse_topic)]
    pub topic: String,
    /// Any librdkafka option, as key=value (repeatable): SASL, TLS, fetch tuning.
    /// Options holding secrets (sasl.password, ssl.key.password, ...) must come
    /// from KAFKA_OPT_* environment variables instead, e.g.
    /// KAFKA_OPT_SASL_PASSWORD or KAFKA_OPT_SASL_PASSWORD_FILE.
    #[arg(long = "kafka-option", value_name = "KEY=VALUE")]
    pub kafka_options: Vec<String>,
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub db: DbArgs,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// Consumer group; consumers with the same group share the partitions.
    #[arg(long, env = "GROUP_ID", default_value = "energy-stream", value_parser = non_empty("a consumer group name"))]
    pub group_id: String,
    /// A micro-batch closes at this many messages...
    #[arg(long, env = "BATCH_MAX_ROWS", default_value_t = 20_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub batch_max_rows: u64,
    /// ...or this many milliseconds after its first message, whichever comes
    /// first (0 to 3600000).
    #[arg(long, env = "BATCH_MAX_WAIT_MS", default_value_t = 500,
          value_parser = clap::value_parser!(u64).range(0..=3_600_000))]
    pub batch_max_wait_ms: u64,
    /// ...or once its messages add up to this many bytes. It bounds memory
    /// when messages are large; events of a few hundred bytes fill
    /// --batch-max-rows long before.
    #[arg(long, env = "BATCH_MAX_BYTES", default_value_t = 16 * 1024 * 1024,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub batch_max_bytes: u64,
    /// Serve /metrics, /healthz and /readyz here ("off" to disable).
    /// Loopback by default; the container image sets 0.0.0.0:9898.
    #[arg(long, env = "METRICS_ADDR", default_value = "127.0.0.1:9898")]
    pub metrics_addr: String,
    /// Messages larger than this are rejected as too_large (1 to 1 GiB).
    #[arg(long, env = "MAX_MESSAGE_BYTES", default_value_t = 1024 * 1024,
          value_parser = clap::value_parser!(u64).range(1..=1 << 30))]
    pub max_message_bytes: u64,
    /// Events before this instant are rejected (event_time_too_old).
    #[arg(long, env = "MIN_EVENT_TIME", default_value = "2000-01-01T00:00:00Z", value_parser = parse_start)]
    pub min_event_time: DateTime<Utc>,
    /// Events more than this many seconds ahead of the clock are rejected
    /// (event_time_in_future). At most 100 years.
    #[arg(long, env = "MAX_FUTURE_SECS", default_value_t = 86_400,
          value_parser = clap::value_parser!(i64).range(0..=MAX_FUTURE_SECS_LIMIT))]
    pub max_future_secs: i64,
    /// customer_id, channel and tariff_type longer than this many bytes are
    /// rejected (field_too_long). At most 800: KPIs group by these fields, and
    /// Postgres caps an index entry at about 2.7 kB.
    #[arg(long, env = "MAX_FIELD_BYTES", default_value_t = 256,
          value_parser = clap::value_parser!(u16).range(1..=crate::validate::MAX_FIELD_BYTES_LIMIT as i64))]
    pub max_field_bytes: u16,
    /// Do not apply migrations at start.
    #[arg(long, env = "NO_MIGRATE", value_parser = clap::builder::BoolishValueParser::new())]
    pub no_migrate: bool,
    /// Exit once every assigned partition is consumed to its end and
    /// committed, or once no partition has been assigned for 10 s while
    /// other members of the group own every one.
    #[arg(long)]
    pub stop_when_caught_up: bool,
    /// On SIGTERM/SIGINT, how long to keep trying to commit in-flight
    /// batches (0 to 86400).
    #[arg(long, env = "DRAIN_TIMEOUT_SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(0..=DAY_SECS))]
    pub drain_timeout_secs: u64,
    /// How long the group may leave this consumer without partitions before
    /// it acts: with no assignment at all after joining or a revocation (a
    /// rebalance that does not end), it says so and stops being ready; with
    /// an empty one while partitions it does not own have messages whose
    /// stored offsets stand still that long (their owner gone, and still in
    /// the group), it leaves the group and joins it again. A
    /// `--stop-when-caught-up` run never given an assignment fails at twice
    /// this. 1 to 86400.
    #[arg(long, env = "REBALANCE_LIMIT_SECS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..=DAY_SECS))]
    pub rebalance_limit_secs: u64,
    /// How long Postgres may leave a connection attempt, a batch's COPY,
    /// merges or COMMIT, or the read of the stored offsets unanswered before
    /// it counts as away: the connection is dropped and the batch retried on
    /// a new one. Start-up work (migrations, KPI backfills) is not bounded,
    /// though a shutdown ends it at once, and a connection whose host is gone
    /// fails within about a minute (TCP keepalives; see the README). 1 to
    /// 86400: Postgres' idle limit, twice this, must fit its settings.
    #[arg(long, env = "DB_TIMEOUT_SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=DAY_SECS))]
    pub db_timeout_secs: u64,
    /// Directory of KPI files (*.sql), each computed on every batch. Default:
    /// ./queries when it exists; without it, no KPIs are computed (logged).
    #[arg(long, env = "QUERIES_DIR")]
    pub queries_dir: Option<PathBuf>,
    /// Write raw events and rejects only; compute no KPIs.
    #[arg(long, env = "NO_KPIS", value_parser = clap::builder::BoolishValueParser::new())]
    pub no_kpis: bool,
    /// Memory for DataFusion's KPI work on one batch, in MiB (1 to 1048576).
    #[arg(long, env = "KPI_MEMORY_MB", default_value_t = 256,
          value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    pub kpi_memory_mb: u64,
    /// Seconds between looks at the KPI directory for added, changed or
    /// deleted files, which restart the pipeline in-process with them; 0 turns
    /// the watch off (files are then read at start only); at most 86400.
    #[arg(long, env = "KPI_WATCH_SECS", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(0..=DAY_SECS))]
    pub kpi_watch_secs: u64,
    /// Seconds between progress log lines (0 to 86400; 0 counts as 1).
    #[arg(long, env = "PROGRESS_INTERVAL_SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(0..=DAY_SECS))]
    pub progress_interval_secs: u64,
}

#[derive(Debug, Clone, Args)]
pub struct GenerateArgs {
    /// Number of lines to write.
    #[arg(long, default_value_t = 10_000)]
    pub events: u64,
    /// Number of distinct customers the events are spread over.
    #[arg(long, default_value_t = 200)]
    pub customers: u32,
    /// Length of the generated period, in days from --start.
    #[arg(long, default_value_t = 7)]
    pub days: u32,
    /// First instant of the generated period (RFC 3339, or a date for its
    /// midnight UTC).
    #[arg(long, default_value = "2025-06-01T00:00:00Z", value_parser = parse_start)]
    pub start: DateTime<Utc>,
    /// Random seed: the same options and seed write the same lines.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Fraction of lines replaced by invalid ones of every kind.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub bad_ratio: f64,
    /// Output file; standard output when absent.
    #[arg(long, short)]
    pub output: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct ProduceArgs {
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// The JSONL file to replay (`-` reads standard input).
    #[arg(long, short, default_value = "data/events.jsonl")]
    pub input: PathBuf,
    /// Partitions for the topic when it has to be created.
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(i32).range(1..))]
    pub partitions: i32,
    /// Events per second; as fast as possible when absent.
    #[arg(long, value_parser = parse_rate)]
    pub rate: Option<f64>,
    /// Send the lines in a random (seeded) order.
    #[arg(long)]
    pub shuffle: bool,
    /// Replay the file again and again until interrupted.
    #[arg(long = "loop", conflicts_with = "live")]
    pub repeat: bool,
    /// After the file, keep sending freshly generated events stamped with the
    /// current time, at --rate, until interrupted (keeps dashboards moving).
    #[arg(long, requires = "rate")]
    pub live: bool,
    /// Send the file only into a topic no message was ever written to: when a
    /// restarted producer finds the topic already filled, it skips the file
    /// (and goes straight to --live events), so the file is never stored twice.
    #[arg(long, conflicts_with = "repeat")]
    pub input_once: bool,
    /// Where refused lines go, with their reason.
    #[arg(long, default_value = "bad-lines.jsonl")]
    pub bad_lines: PathBuf,
    /// Serve /metrics, /healthz and /readyz here while producing ("off" to disable).
    /// Default 127.0.0.1:9898; when that port is taken (say, by `run` on the
    /// same host) a free loopback port is used and logged instead. The
    /// container image sets 0.0.0.0:9898.
    #[arg(long, env = "METRICS_ADDR")]
    pub metrics_addr: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    #[command(flatten)]
    pub db: DbArgs,
    /// Keep the pipeline and the metrics endpoint running after the summary, until Ctrl-C.
    #[arg(long)]
    pub keep_running: bool,
    /// The events to replay. Default: data/events.jsonl, or freshly generated
    /// sample events when it is not there (outside the repository).
    #[arg(long)]
    pub input: Option<PathBuf>,
    /// With --keep-running, serve /metrics, /healthz and /readyz here ("off"
    /// to disable). Default 127.0.0.1:9898; when that port is taken (say,
    /// by `run` on the same host) a free loopback port is used and printed.
    #[arg(long, env = "METRICS_ADDR")]
    pub metrics_addr: Option<String>,
}

/// Everything the pipeline needs, typed.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    pub kafka: KafkaConfig,
    pub database: crate::sink::Database,
    pub decode: DecodeConfig,
    pub rules: ValidationRules,
    pub batch_max_rows: usize,
    pub batch_max_wait: Duration,
    /// Message bytes (payloads) after which a batch closes, whatever its rows.
    pub batch_max_bytes: usize,
    pub migrate: bool,
    pub stop_when_caught_up: bool,
    pub drain_timeout: Duration,
    pub metrics_addr: Option<SocketAddr>,
    pub progress_interval: Duration,
    /// KPI files to compute; None writes raw events only.
    pub kpi: Option<crate::kpi::KpiConfig>,
    /// How often to look at the KPI files for changes while running; None
    /// reads them at start only.
    pub kpi_watch: Option<Duration>,
    /// How long after a revocation without a new assignment the consumer
    /// says the group's rebalance is stuck and stops being ready, and how
    /// long an empty assignment may stand while others' partitions make no
    /// progress before it joins the group again (`--rebalance-limit-secs`,
    /// 60 s). A
    /// `stop_when_caught_up` run that has had no assignment since joining
    /// fails at twice this.
    pub rebalance_limit: Duration,
    /// Fault injection for the crash tests; None in production.
    pub fault: Option<Fault>,
}

/// The environment variable of the crash tests' fault hook.
pub const FAULT_ENV: &str = "ENERGY_STREAM_FAULT";

/// Where the crash tests make the process fail, on purpose: `copy:N` aborts
/// in the middle of the COPY of this process's N-th batch, `commit:N` while
/// its COMMIT is in flight (so the commit may or may not land), and
/// `commit-reply:N` lets that COMMIT land but reports it as a broken
/// connection, as when the reply is lost on the way back. Set only by tests,
/// through `ENERGY_STREAM_FAULT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    pub point: FaultPoint,
    pub batch: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultPoint {
    MidCopy,
    InCommit,
    LostCommitReply,
}

impl Fault {
    pub fn parse(s: &str) -> Result<Fault, String> {
        let bad =
            || format!("{FAULT_ENV}={s:?}: expected copy:N, commit:N or commit-reply:N (N >= 1)");
        let (point, n) = s.split_once(':').ok_or_else(bad)?;
        let point = match point {
            "copy" => FaultPoint::MidCopy,
            "commit" => FaultPoint::InCommit,
            "commit-reply" => FaultPoint::LostCommitReply,
            _ => return Err(bad()),
        };
        let batch = n.parse().ok().filter(|n| *n >= 1).ok_or_else(bad)?;
        Ok(Fault { point, batch })
    }
}

impl PipelineConfig {
    /// Defaults for tests, the demo and benches: everything but where things are.
    pub fn new(kafka: KafkaConfig, database: tokio_postgres::Config) -> Self {
        PipelineConfig {
            kafka,
            database: crate::sink::Database::new(database),
            decode: DecodeConfig::default(),
            rules: ValidationRules::default(),
            batch_max_rows: 20_000,
            batch_max_wait: Duration::from_millis(500),
            batch_max_bytes: 16 * 1024 * 1024,
            migrate: true,
            stop_when_caught_up: false,
            drain_timeout: Duration::from_secs(30),
            metrics_addr: None,
            progress_interval: Duration::from_secs(10),
            kpi: None,
            kpi_watch: None,
            rebalance_limit: Duration::from_secs(60),
            fault: None,
        }
    }
}

fn read_secret_file(var: &str, path: &PathBuf) -> Result<String, ConfigError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim_end_matches(['\n', '\r']).to_string())
        .map_err(|source| ConfigError::SecretFile {
            var: var.into(),
            path: path.display().to_string(),
            source,
        })
}

/// tokio-postgres's idle time before the first TCP keepalive probe, as
/// libpq's: what the URL holds when it sets none.
const KEEPALIVES_IDLE_UNSET: Duration = Duration::from_secs(2 * 60 * 60);

/// Makes a connection whose peer is gone fail within about a minute, unless the
/// URL sets these itself (`keepalives_idle`, `keepalives_interval`,
/// `keepalives_retries`, `tcp_user_timeout`; `keepalives=0` turns probes off).
///
/// A host that fails over, dies or is cut off sends nothing, and a connection
/// waiting for its answer waits for the kernel: up to 2 h 11 min with the
/// default keepalives when the request was acknowledged, about 15 min of
/// retransmissions when it was not. Exchanges that the pipeline bounds with
/// `--db-timeout-secs` do not depend on this; the others do: start-up
/// (migrations, KPI backfills, which may rightly take long), `migrate`,
/// `backfill` and `verify`. A live server's kernel answers the probes however
/// long a statement runs, so only a dead peer is cut.
fn notice_dead_peers(config: &mut tokio_postgres::Config) {
    if config.get_keepalives() {
        if config.get_keepalives_idle() == KEEPALIVES_IDLE_UNSET {
            config.keepalives_idle(Duration::from_secs(15));
        }
        if config.get_keepalives_interval().is_none() {
            config.keepalives_interval(Duration::from_secs(5));
        }
        if config.get_keepalives_retries().is_none() {
            config.keepalives_retries(3);
        }
    }
    if config.get_tcp_user_timeout().is_none() {
        config.tcp_user_timeout(Duration::from_secs(30));
    }
}

impl DbArgs {
    /// Resolves the database settings. `from_argv` tells whether `--database-url`
    /// was typed on the command line (as opposed to taken from DATABASE_URL).
    pub fn resolve(&self, from_argv: bool) -> Result<Option<tokio_postgres::Config>, ConfigError> {
        let url = match (&self.database_url, &self.database_url_file) {
            // Both from the environment (or the file's flag against the
            // URL's variable): which one meant the database is a guess, and
            // the URL silently won.
            (Some(_), Some(_)) if !from_argv => return Err(ConfigError::DatabaseUrlTwice),
            (Some(u), _) => Some(u.clone()),
            (None, Some(f)) => Some(read_secret_file("DATABASE_URL_FILE", f)?),
            (None, None) => None,
        };
        // An empty DATABASE_URL (a variable set to nothing) is no database,
        // not libpq's "connect to the defaults".
        let Some(url) = url.filter(|u| !u.trim().is_empty()) else {
            return Ok(None);
        };
        let mut config: tokio_postgres::Config =
            url.parse().map_err(|e: tokio_postgres::Error| {
                // tokio-postgres says "invalid connection string" and keeps
                // which option and why in the source; it names options, never
                // their values.
                let why = match std::error::Error::source(&e) {
                    Some(why) => format!("{e}: {why}"),
                    None => e.to_string(),
                };
                ConfigError::BadDatabaseUrl(format!("{why}{}", url_hint(&url, &why)))
            })?;
        // A password with an unencoded @ parses: the URL's first @ ends the
        // user part, so the rest of the password becomes part of the host,
        // which every log line names. No host name holds an @.
        if config
            .get_hosts()
            .iter()
            .any(|h| matches!(h, tokio_postgres::config::Host::Tcp(h) if h.contains('@')))
        {
            return Err(ConfigError::BadDatabaseUrl(format!(
                "its host holds an @ (not shown here){PASSWORD_ENCODING_HINT}"
            )));
        }
        if from_argv && self.database_url.is_some() && config.get_password().is_some() {
            return Err(ConfigError::PasswordInArgv);
        }
        if let Some(f) = &self.database_password_file {
            config.password(read_secret_file("DATABASE_PASSWORD_FILE", f)?);
        }
        // A CA file says the server must be verified; with TLS off it was
        // silently ignored and the connection went out in clear text.
        if self.database_ca_file.is_some()
            && config.get_ssl_mode() == tokio_postgres::config::SslMode::Disable
        {
            return Err(ConfigError::CaFileWithoutTls);
        }
        // Nor may sslmode=prefer, the default, fall back to clear text
        // against a server without TLS when a CA file asks for verification.
        if self.database_ca_file.is_some() {
            config.ssl_mode(tokio_postgres::config::SslMode::Require);
        }
        if config.get_application_name().is_none() {
            config.application_name("energy-stream");
        }
        notice_dead_peers(&mut config);
        Ok(Some(config))
    }

    /// `--database-ca-file`, checked to be readable now rather than at the
    /// first connection, where OpenSSL reports it as an error stack.
    pub fn ca_file(&self) -> Result<Option<PathBuf>, ConfigError> {
        let Some(f) = &self.database_ca_file else {
            return Ok(None);
        };
        let bad = |source| ConfigError::SecretFile {
            var: "--database-ca-file (DATABASE_CA_FILE)".into(),
            path: f.display().to_string(),
            source,
        };
        let pem = std::fs::read(f).map_err(bad)?;
        // A directory opens; an empty or non-PEM file reads. Both only
        // failed at the first connection, as an OpenSSL error stack.
        if openssl::x509::X509::stack_from_pem(&pem).is_ok_and(|certs| !certs.is_empty()) {
            Ok(Some(f.clone()))
        } else {
            Err(bad(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "it holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            )))
        }
    }

    pub fn require(&self, from_argv: bool) -> Result<tokio_postgres::Config, ConfigError> {
        self.resolve(from_argv)?.ok_or(ConfigError::NoDatabase)
    }

    /// The database these settings name, with its CA file; None when none
    /// is given.
    pub fn database(&self, from_argv: bool) -> Result<Option<crate::sink::Database>, ConfigError> {
        let Some(config) = self.resolve(from_argv)? else {
            return Ok(None);
        };
        Ok(Some(crate::sink::Database {
            ca_file: self.ca_file()?,
            ..crate::sink::Database::new(config)
        }))
    }

    /// [`DbArgs::database`], which must be given. The CA file is read
    /// first, as before the URL is looked at.
    pub fn require_database(&self, from_argv: bool) -> Result<crate::sink::Database, ConfigError> {
        let ca_file = self.ca_file()?;
        Ok(crate::sink::Database {
            ca_file,
            ..crate::sink::Database::new(self.require(from_argv)?)
        })
    }
}

/// What to do when a password's own characters end the URL's user part.
const PASSWORD_ENCODING_HINT: &str = " — if the password holds @, :, / or #, percent-encode them \
     (%40, %3A, %2F, %23), or put the password in DATABASE_PASSWORD_FILE";

/// What to do about a database URL that does not parse, for the mistakes
/// its parser's words do not explain. Never quotes the URL.
fn url_hint(url: &str, why: &str) -> &'static str {
    let scheme = url.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
    if scheme
        .as_deref()
        .is_some_and(|s| s != "postgres" && s != "postgresql")
    {
        " — expected a postgres:// or postgresql:// URL"
    } else if why.contains("sslmode") {
        " — sslmode may be disable, prefer or require; to verify the server's certificate \
         (libpq's verify-ca and verify-full), use sslmode=require with --database-ca-file \
         (DATABASE_CA_FILE)"
    } else if why.contains("option `port`") || why.contains("option `host`") {
        PASSWORD_ENCODING_HINT
    } else {
        ""
    }
}

/// Option keys that hold secrets and are refused on argv.
fn is_secret_key(key: &str) -> bool {
    let k = key.trim().to_ascii_lowercase();
    k.contains("password")
        || k.contains("passphrase")
        || k.contains("secret")
        || k.ends_with(".key.pem")
        || k.contains("token")
        // Holds client secrets as key=value pairs.
        || k == "sasl.oauthbearer.config"
}

/// librdkafka options that energy-stream sets itself and that its
/// guarantees rest on, with what to use instead. Applied after them, a
/// user's value silently won: `group.id` joined another Kafka group than the
/// one whose offsets Postgres holds and the logs named, and
/// `auto.offset.reset=latest` would skip a new partition's first messages.
const OWNED_KAFKA_OPTIONS: &[(&str, &str)] = &[
    (
        "bootstrap.servers",
        "give the brokers with --brokers (KAFKA_BROKERS)",
    ),
    (
        "metadata.broker.list",
        "give the brokers with --brokers (KAFKA_BROKERS)",
    ),
    (
        "group.id",
        "give the consumer group with --group-id (GROUP_ID)",
    ),
    (
        "enable.auto.commit",
        "the pipeline commits offsets itself, to Postgres with each batch and then to the group",
    ),
    (
        // The legacy topic-level name of enable.auto.commit.
        "auto.commit.enable",
        "the pipeline commits offsets itself, to Postgres with each batch and then to the group",
    ),
    (
        "enable.auto.offset.store",
        "the pipeline commits offsets itself, to Postgres with each batch and then to the group",
    ),
    (
        "auto.offset.reset",
        "a partition without an offset stored in Postgres is read from its first message, so that nothing is skipped",
    ),
    (
        "enable.partition.eof",
        "the pipeline needs the end-of-partition events to know when it is caught up",
    ),
    (
        "isolation.level",
        "only messages of committed Kafka transactions are read, so that an aborted one is never stored",
    ),
];

fn owned_kafka_option(key: &str) -> Result<(), ConfigError> {
    let k = key.trim().to_ascii_lowercase();
    // librdkafka reads `topic.auto.offset.reset` as the topic setting
    // `auto.offset.reset`; `topic.metadata.*` are global settings of their
    // own, none of them owned.
    let k = k.strip_prefix("topic.").unwrap_or(&k);
    match OWNED_KAFKA_OPTIONS.iter().find(|(o, _)| *o == k) {
        Some((o, why)) => Err(ConfigError::OwnedKafkaOption {
            key: o.to_string(),
            why,
        }),
        None => Ok(()),
    }
}

/// The librdkafka options that `KAFKA_OPT_*` variables in `env` give
/// (`KAFKA_OPT_SASL_MECHANISM=PLAIN` → `sasl.mechanism=PLAIN`; a `_FILE`
/// suffix reads the value from that file), sorted by key.
pub fn kafka_env_options(
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Vec<(String, String)>, ConfigError> {
    let mut from_env: Vec<(String, String)> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (name, value) in env {
        let Some(rest) = name.strip_prefix("KAFKA_OPT_") else {
            continue;
        };
        let (base, value) = match rest.strip_suffix("_FILE") {
            Some(base) => (base, read_secret_file(&name, &PathBuf::from(&value))?),
            None => (rest, value),
        };
        // Both forms of one option: which one won depended on sorting.
        if !seen.insert(base.to_string()) {
            return Err(ConfigError::KafkaOptionTwice(format!("KAFKA_OPT_{base}")));
        }
        let key = base.to_lowercase().replace('_', ".");
        owned_kafka_option(&key)?;
        from_env.push((key, value));
    }
    from_env.sort();
    Ok(from_env)
}

impl KafkaArgs {
    /// `KAFKA_OPT_*` variables from `env` (`KAFKA_OPT_SASL_MECHANISM=PLAIN`
    /// → `sasl.mechanism=PLAIN`; a `_FILE` suffix reads the value from that
    /// file), then `--kafka-option` values. The client applies them in
    /// order, so a flag wins over the environment, as for every other
    /// setting; a key given by both appears once, with the flag's value.
    pub fn options(
        &self,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Vec<(String, String)>, ConfigError> {
        let mut flags = Vec::new();
        for kv in &self.kafka_options {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| ConfigError::BadKafkaOption(kv.clone()))?;
            if k.trim().is_empty() {
                return Err(ConfigError::BadKafkaOption(kv.clone()));
            }
            if is_secret_key(k) {
                return Err(ConfigError::SecretKafkaOption(k.trim().to_string()));
            }
            owned_kafka_option(k)?;
            flags.push((k.trim().to_string(), v.to_string()));
        }
        let mut from_env = kafka_env_options(env)?;
        from_env.retain(|(k, _)| !flags.iter().any(|(f, _)| f.eq_ignore_ascii_case(k)));
        from_env.extend(flags);
        Ok(from_env)
    }

    pub fn to_config(
        &self,
        group_id: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<KafkaConfig, ConfigError> {
        Ok(KafkaConfig {
            brokers: self.brokers.clone(),
            topic: self.topic.clone(),
            group_id: group_id.to_string(),
            options: self.options(env)?,
        })
    }
}

/// The largest `--max-future-secs`: 100 years of 365.25 days, as the README
/// says, far below where a time plus it leaves chrono's range.
const MAX_FUTURE_SECS_LIMIT: i64 = 100 * 36_525 * 864;

/// The longest a duration flag in seconds may be: longer ones overflowed
/// the clock or Postgres' settings (`--db-timeout-secs` past about 12 days
/// made every batch fail, as Postgres refused the writers' idle limit).
const DAY_SECS: u64 = 86_400;

/// Where `run` and `produce` serve metrics unless told otherwise: loopback,
/// so a laptop does not expose them; the container image sets 0.0.0.0:9898.
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9898";

/// A Kafka topic name as Kafka accepts it: 1 to 249 of `[A-Za-z0-9._-]`,
/// not `.` or `..`. Some brokers (tansu) take any name, which the next
/// Kafka, or a tool that checks, then cannot use.
fn parse_topic(s: &str) -> Result<String, String> {
    let legal = !s.is_empty()
        && s.len() <= 249
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if legal {
        Ok(s.to_string())
    } else {
        Err(format!(
            "{s:?} is not a Kafka topic name: use 1 to 249 letters, digits, '.', '_' or '-'"
        ))
    }
}

/// Events per second: a positive, finite number.
fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 => Ok(r),
        _ => Err(format!(
            "{s:?} is not a rate: give events per second, above 0"
        )),
    }
}

/// Checks, before any work, that the metrics endpoint can be bound at
/// `addr`. When it cannot because the port is taken and the address was not
/// given (`explicit` false), a free port on the same interface is chosen
/// instead, as `produce` does.
pub fn metrics_addr_or_free(addr: SocketAddr, explicit: bool) -> Result<SocketAddr, String> {
    let cannot = |a: SocketAddr, e: std::io::Error| {
        format!(
            "cannot bind the metrics endpoint on {a}: {e}; give another with --metrics-addr (or off)"
        )
    };
    match std::net::TcpListener::bind(addr) {
        Ok(_) => Ok(addr),
        Err(e) if !explicit && e.kind() == std::io::ErrorKind::AddrInUse => {
            let free = SocketAddr::new(addr.ip(), 0);
            std::net::TcpListener::bind(free)
                .and_then(|l| l.local_addr())
                .map_err(|e| cannot(free, e))
        }
        Err(e) => Err(cannot(addr, e)),
    }
}

/// A string option that must not be empty: an empty broker list waited
/// forever for a topic, and an empty group id failed deep in the Kafka client.
fn non_empty(what: &'static str) -> impl Fn(&str) -> Result<String, String> + Clone {
    move |s: &str| {
        if s.trim().is_empty() {
            Err(format!("must not be empty: give {what}"))
        } else {
            Ok(s.to_string())
        }
    }
}

/// "off" or an address.
pub fn parse_metrics_addr(s: &str) -> Result<Option<SocketAddr>, String> {
    if s.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    // An empty value turned the endpoints off without a word, and with them
    // the health check a container relies on.
    if s.trim().is_empty() {
        return Err(
            "empty metrics address (--metrics-addr, METRICS_ADDR): give host:port, or off to serve nothing"
                .into(),
        );
    }
    use std::net::ToSocketAddrs;
    // A host name (localhost:9898) too, not only an IP; its first address.
    match s.to_socket_addrs() {
        Ok(mut addrs) => addrs
            .next()
            .map(Some)
            .ok_or_else(|| {
                format!(
                    "invalid metrics address {s:?} (--metrics-addr, METRICS_ADDR): it resolves to no address"
                )
            }),
        Err(e) => Err(format!(
            "invalid metrics address {s:?} (--metrics-addr, METRICS_ADDR): {e} (expected host:port or off)"
        )),
    }
}

impl RunArgs {
    pub fn to_config(
        &self,
        database_from_argv: bool,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> anyhow::Result<PipelineConfig> {
        let database = self.db.require(database_from_argv)?;
        let env: Vec<(String, String)> = env.into_iter().collect();
        let fault = env
            .iter()
            .find(|(k, _)| k == FAULT_ENV)
            .map(|(_, v)| Fault::parse(v))
            .transpose()
            .map_err(anyhow::Error::msg)?;
        let kafka = self.kafka.to_config(&self.group_id, env)?;
        let mut cfg = PipelineConfig::new(kafka, database);
        cfg.fault = fault;
        cfg.database.ca_file = self.db.ca_file()?;
        cfg.database.timeout = Duration::from_secs(self.db_timeout_secs);
        cfg.decode = DecodeConfig {
            max_message_bytes: usize::try_from(self.max_message_bytes).unwrap_or(usize::MAX),
        };
        cfg.rules = ValidationRules {
            min_event_time: self.min_event_time,
            max_future: TimeDelta::seconds(self.max_future_secs),
            max_field_bytes: usize::from(self.max_field_bytes),
        };
        cfg.batch_max_rows = usize::try_from(self.batch_max_rows).unwrap_or(usize::MAX);
        cfg.batch_max_wait = Duration::from_millis(self.batch_max_wait_ms);
        cfg.batch_max_bytes = usize::try_from(self.batch_max_bytes).unwrap_or(usize::MAX);
        cfg.migrate = !self.no_migrate;
        cfg.stop_when_caught_up = self.stop_when_caught_up;
        cfg.drain_timeout = Duration::from_secs(self.drain_timeout_secs);
        cfg.rebalance_limit = Duration::from_secs(self.rebalance_limit_secs);
        cfg.metrics_addr = parse_metrics_addr(&self.metrics_addr).map_err(anyhow::Error::msg)?;
        cfg.progress_interval = Duration::from_secs(self.progress_interval_secs.max(1));
        // An explicit directory must exist (the KPI loader says so if not);
        // the default is optional, so the binary also runs outside the repo.
        let dir = match &self.queries_dir {
            Some(d) => Some(d.clone()),
            None => {
                let d = PathBuf::from("queries");
                if d.is_dir() {
                    Some(d)
                } else if self.no_kpis {
                    None
                } else {
                    tracing::warn!(
                        "no ./queries directory and no --queries-dir: computing no KPIs"
                    );
                    None
                }
            }
        };
        cfg.kpi = dir
            .filter(|_| !self.no_kpis)
            .map(|dir| crate::kpi::KpiConfig {
                dir,
                // At most 2^20 MiB (clap checks), so the shift cannot wrap.
                memory_limit: usize::try_from(self.kpi_memory_mb << 20).unwrap_or(usize::MAX),
            });
        cfg.kpi_watch = (self.kpi_watch_secs > 0).then(|| Duration::from_secs(self.kpi_watch_secs));
        Ok(cfg)
    }
}

/// True when `flag` (e.g. `--database-url`) was typed in `args`.
pub fn flag_in_argv(args: &[String], flag: &str) -> bool {
    args.iter()
        .any(|a| a == flag || a.starts_with(&format!("{flag}=")))
}

/// Parses the command line. clap names only the flag of a value it refuses,
/// so a value that came from the environment (its flag absent from `args`)
/// gets a tip naming the variable: `BATCH_MAX_ROWS=abc` otherwise reads as if
/// `--batch-max-rows` had been given. `env_set` says whether a variable is
/// set (the process environment in `main`).
pub fn parse_cli(
    args: Vec<std::ffi::OsString>,
    env_set: impl Fn(&str) -> bool,
) -> Result<Cli, clap::Error> {
    use clap::CommandFactory;
    use clap::error::{ContextKind, ContextValue};
    let mut err = match Cli::try_parse_from(&args) {
        Ok(cli) => return Ok(cli),
        Err(e) => e,
    };
    // "--batch-max-rows <BATCH_MAX_ROWS>"
    let Some(ContextValue::String(invalid)) = err.get(ContextKind::InvalidArg) else {
        return Err(err);
    };
    let Some(long) = invalid
        .split_whitespace()
        .next()
        .and_then(|f| f.strip_prefix("--"))
        .map(str::to_string)
    else {
        return Err(err);
    };
    let text: Vec<String> = args
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    if flag_in_argv(&text, &format!("--{long}")) {
        return Err(err);
    }
    let cmd = Cli::command();
    let var = std::iter::once(&cmd)
        .chain(cmd.get_subcommands())
        .flat_map(|c| c.get_arguments())
        .find(|a| a.get_long() == Some(long.as_str()))
        .and_then(|a| a.get_env())
        .map(|v| v.to_string_lossy().into_owned());
    if let Some(var) = var.filter(|v| env_set(v)) {
        err.insert(
            ContextKind::Suggested,
            ContextValue::StyledStrs(vec![
                format!("the value comes from the environment variable {var}").into(),
            ]),
        );
    }
    Err(err)
}

/// `generate --start`: an RFC 3339 instant, or a date (`2025-06-01`) for
/// its midnight UTC.
fn parse_start(s: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc())
        .ok_or_else(|| {
            format!("{s:?} is not a date (2025-06-01) or an RFC 3339 time (2025-06-01T00:00:00Z)")
        })
}

#[cfg(test)]
mod tests {
    /// Regression: `demo --keep-running` with the default port taken (by a
    /// `run` on the same host) ran the whole demo, then ended on "cannot
    /// bind the metrics endpoint" instead of serving.
    #[test]
    fn a_taken_default_metrics_port_falls_back_and_a_given_one_fails_first() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let free = metrics_addr_or_free(addr, false).unwrap();
        assert_eq!(free.ip(), addr.ip());
        assert_ne!(free.port(), addr.port());
        assert_ne!(free.port(), 0);
        let err = metrics_addr_or_free(addr, true).unwrap_err();
        assert!(err.contains(&addr.to_string()), "{err}");
        assert!(err.contains("--metrics-addr"), "{err}");
        drop(taken);
        assert_eq!(metrics_addr_or_free(addr, true), Ok(addr));
    }

    /// Regression: `KAFKA_OPT_SECURITY_PROTOCOL` beat `--kafka-option
    /// security.protocol=...` (the flags went first, and the client applies
    /// options in order); with both `KAFKA_OPT_X` and `KAFKA_OPT_X_FILE` set,
    /// sorting chose.
    #[test]
    fn a_kafka_option_flag_wins_over_the_environment() {
        let cli = Cli::parse_from([
            "energy-stream",
            "run",
            "--kafka-option",
            "security.protocol=plaintext",
        ]);
        let Command::Run(args) = cli.command else {
            panic!()
        };
        let env = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<Vec<_>>()
        };
        let opts = args
            .kafka
            .options(env(&[
                ("KAFKA_OPT_SECURITY_PROTOCOL", "BOGUS"),
                ("KAFKA_OPT_SASL_MECHANISM", "PLAIN"),
            ]))
            .unwrap();
        assert_eq!(
            opts,
            vec![
                ("sasl.mechanism".to_string(), "PLAIN".to_string()),
                ("security.protocol".to_string(), "plaintext".to_string()),
            ]
        );
        let file = std::env::temp_dir().join(format!("es-opt-{}", std::process::id()));
        std::fs::write(&file, "SCRAM-SHA-256\n").unwrap();
        let err = args
            .kafka
            .options(env(&[
                ("KAFKA_OPT_SASL_MECHANISM", "PLAIN"),
                ("KAFKA_OPT_SASL_MECHANISM_FILE", file.to_str().unwrap()),
            ]))
            .unwrap_err()
            .to_string();
        std::fs::remove_file(&file).unwrap();
        assert!(err.contains("KAFKA_OPT_SASL_MECHANISM_FILE"), "{err}");
    }

    /// Regression: `--kpi-memory-mb 0` (or 2^44, which wrapped to 0 bytes)
    /// was taken, and every KPI failed on its first batch; an empty broker
    /// list waited forever, and an empty group id failed in the Kafka client
    /// without naming the option.
    #[test]
    fn empty_or_unusable_values_are_refused_by_name() {
        for (args, flag) in [
            (vec!["--kpi-memory-mb", "0"], "--kpi-memory-mb"),
            (vec!["--kpi-memory-mb", "17592186044416"], "--kpi-memory-mb"),
            (vec!["--brokers", ""], "--brokers"),
            (vec!["--brokers", " "], "--brokers"),
            (vec!["--group-id", ""], "--group-id"),
        ] {
            let err = Cli::try_parse_from(["energy-stream", "run"].into_iter().chain(args.clone()))
                .unwrap_err()
                .to_string();
            assert!(err.contains(flag), "{args:?}: {err}");
        }
        let cli = Cli::parse_from(["energy-stream", "run", "--kpi-memory-mb", "1048576"]);
        let Command::Run(args) = cli.command else {
            panic!()
        };
        assert_eq!(args.kpi_memory_mb, 1 << 20);
    }

    /// Regression: a directory, or an empty or non-PEM file, given as the CA
    /// bundle passed the start-up check and failed at the first connection as
    /// an OpenSSL error stack that named neither the option nor the path.
    #[test]
    fn a_ca_file_without_certificates_is_refused_at_start() {
        let dir = std::env::temp_dir().join(format!("es-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let junk = dir.join("junk.pem");
        std::fs::write(&junk, "not a certificate\n").unwrap();
        for path in [&dir, &empty, &junk] {
            let cli = Cli::parse_from([
                "energy-stream",
                "run",
                "--database-ca-file",
                path.to_str().unwrap(),
            ]);
            let Command::Run(args) = cli.command else {
                panic!()
            };
            let err = args.db.ca_file().unwrap_err().to_string();
            assert!(err.contains("--database-ca-file"), "{err}");
            assert!(err.contains(path.to_str().unwrap()), "{err}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Regression: `LOG_JSON=1` (or `NO_KPIS=yes`) was refused, since only
    /// true/false were read; `--min-event-time 2020-01-01` said "premature
    /// end of input".
    #[test]
    fn switches_from_the_environment_take_1_and_yes_and_times_take_a_date() {
        let cli = Cli::try_parse_from([
            "energy-stream",
            "run",
            "--no-kpis",
            "--min-event-time",
            "2020-01-01",
        ])
        .unwrap();
        let Command::Run(args) = cli.command else {
            panic!()
        };
        assert!(args.no_kpis);
        assert!(!args.no_migrate);
        assert_eq!(
            args.min_event_time,
            "2020-01-01T00:00:00Z".parse::<DateTime<Utc>>().unwrap()
        );
        let err = Cli::try_parse_from(["energy-stream", "run", "--min-event-time", "soon"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--min-event-time") && err.contains("RFC 3339"),
            "{err}"
        );
        let parser = clap::builder::BoolishValueParser::new();
        let cmd = Cli::command();
        for (v, want) in [
            ("1", true),
            ("yes", true),
            ("true", true),
            ("0", false),
            ("off", false),
        ] {
            let got = clap::builder::TypedValueParser::parse_ref(
                &parser,
                &cmd,
                None,
                std::ffi::OsStr::new(v),
            )
            .unwrap();
            assert_eq!(got, want, "{v}");
        }
    }

    #[test]
    fn generate_start_takes_a_date_or_an_instant() {
        let midnight = "2025-06-01T00:00:00Z".parse::<DateTime<Utc>>().unwrap();
        assert_eq!(parse_start("2025-06-01"), Ok(midnight));
        assert_eq!(parse_start("2025-06-01T02:00:00+02:00"), Ok(midnight));
        let err = parse_start("June").unwrap_err();
        assert!(err.contains("RFC 3339"), "{err}");
    }

    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(args).unwrap()
    }

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    /// Regression: `--progress-interval-secs` and `--log-json` were missing
    /// from the README's configuration table, which says it lists every flag
    /// of `run` with its environment fallback; the defaults must match too.
    #[test]
    fn the_readme_configuration_table_lists_every_run_flag_and_its_env() {
        let readme = include_str!("../README.md");
        let table = readme
            .split("\n## Configuration\n")
            .nth(1)
            .and_then(|rest| rest.split("\n## ").next())
            .expect("README has a Configuration section");
        let rows: Vec<&str> = table.lines().filter(|l| l.starts_with("| `--")).collect();
        let cli = Cli::command();
        let run = cli.find_subcommand("run").unwrap();
        let mut missing = Vec::new();
        for arg in cli.get_arguments().chain(run.get_arguments()) {
            let Some(long) = arg.get_long() else { continue };
            if matches!(long, "help" | "version") {
                continue;
            }
            let flag = format!("| `--{long}");
            let Some(row) = rows
                .iter()
                .find(|r| r.starts_with(&flag) && r[flag.len()..].starts_with(['`', ' ']))
            else {
                missing.push(format!("--{long}"));
                continue;
            };
            if let Some(env) = arg.get_env() {
                let env = format!("`{}`", env.to_str().unwrap());
                if !row.contains(&env) {
                    missing.push(format!("--{long}'s {env}"));
                }
            }
            for default in arg.get_default_values() {
                let default = format!("| `{}` |", default.to_str().unwrap());
                if !row.contains(&default) {
                    missing.push(format!("--{long}'s default {default}"));
                }
            }
        }
        assert!(missing.is_empty(), "not in the README's table: {missing:?}");
    }

    #[test]
    fn run_defaults_and_options() {
        let cli = parse(&[
            "energy-stream",
            "run",
            "--database-url",
            "postgres://u@h/db",
            "--kafka-option",
            "security.protocol=SASL_SSL",
            "--batch-max-rows",
            "500",
        ]);
        let Command::Run(args) = cli.command else {
            panic!()
        };
        let env = vec![
            ("KAFKA_OPT_SASL_MECHANISM".to_string(), "PLAIN".to_string()),
            ("HOME".to_string(), "/root".to_string()),
        ];
        let cfg = args.to_config(true, env).unwrap();
        assert_eq!(cfg.batch_max_rows, 500);
        assert_eq!(cfg.batch_max_wait, Duration::from_millis(500));
        assert_eq!(cfg.kafka.topic, "energy_events");
        assert_eq!(
            cfg.kafka.options,
            vec![
                ("sasl.mechanism".to_string(), "PLAIN".to_string()),
                ("security.protocol".to_string(), "SASL_SSL".to_string())
            ]
        );
        assert_eq!(cfg.decode.max_message_bytes, 1 << 20);
        assert_eq!(cfg.rules.max_future, TimeDelta::hours(24));
        assert_eq!(cfg.rules.max_field_bytes, 256);
        assert_eq!(
            cfg.metrics_addr,
            Some("127.0.0.1:9898".parse().unwrap()),
            "loopback by default"
        );
        assert!(
            !format!("{:?}", cfg.kafka).contains("PLAIN"),
            "option values are not logged"
        );
    }

    /// Longer fields would not fit the KPI tables' index entries, so clap
    /// refuses a limit above MAX_FIELD_BYTES_LIMIT (and zero).
    #[test]
    fn field_limit_is_bounded() {
        let run = |v: &str| {
            Cli::try_parse_from(["energy-stream", "run", "--max-field-bytes", v]).map(|c| c.command)
        };
        let Ok(Command::Run(args)) = run("800") else {
            panic!("800 is accepted")
        };
        assert_eq!(args.max_field_bytes, 800);
        for bad in ["801", "0", "1000000"] {
            let err = run(bad).expect_err("refused").to_string();
            assert!(err.contains("--max-field-bytes"), "{bad}: {err}");
        }
    }

    /// The database timeout reaches the sink; zero would time out every
    /// exchange, so clap refuses it.
    #[test]
    fn db_timeout_reaches_the_database_and_zero_is_refused() {
        let run = |v: &str| {
            Cli::try_parse_from(["energy-stream", "run", "--db-timeout-secs", v]).map(|c| c.command)
        };
        let Ok(Command::Run(mut args)) = run("7") else {
            panic!("7 is accepted")
        };
        args.db.database_url = Some("postgres://u@h/db".into());
        let cfg = args.to_config(false, Vec::new()).unwrap();
        assert_eq!(cfg.database.timeout, Duration::from_secs(7));
        let err = run("0").expect_err("0 is refused").to_string();
        assert!(err.contains("--db-timeout-secs"), "{err}");
    }

    /// The batch byte limit reaches the pipeline (16 MiB by default); zero
    /// would close a batch at every message, so clap refuses it.
    #[test]
    fn batch_max_bytes_reaches_the_pipeline_and_zero_is_refused() {
        let run = |extra: &[&str]| {
            let mut argv = vec![
                "energy-stream",
                "run",
                "--database-url",
                "postgres://u@h/db",
            ];
            argv.extend_from_slice(extra);
            Cli::try_parse_from(argv).map(|c| c.command)
        };
        let cfg = |extra: &[&str]| {
            let Ok(Command::Run(args)) = run(extra) else {
                panic!("{extra:?} is accepted")
            };
            args.to_config(true, Vec::new()).unwrap()
        };
        assert_eq!(cfg(&[]).batch_max_bytes, 16 << 20);
        assert_eq!(cfg(&["--batch-max-bytes", "65536"]).batch_max_bytes, 65536);
        let err = run(&["--batch-max-bytes", "0"])
            .expect_err("0 is refused")
            .to_string();
        assert!(err.contains("--batch-max-bytes"), "{err}");
    }

    /// A value refused from a flag is not blamed on the environment, even
    /// when the flag's variable is set too (the flag wins). The variable's
    /// own case runs the binary: `tests/cli.rs`.
    #[test]
    fn a_refused_flag_value_is_not_blamed_on_the_environment() {
        for argv in [&["--batch-max-rows", "abc"][..], &["--batch-max-rows=abc"]] {
            let args = ["energy-stream", "run"]
                .iter()
                .chain(argv)
                .map(std::ffi::OsString::from)
                .collect();
            let err = parse_cli(args, |_| true).expect_err("refused").to_string();
            assert!(err.contains("--batch-max-rows"), "{err}");
            assert!(!err.contains("environment variable"), "{err}");
        }
    }

    /// Regression: duration flags had no upper bound. `--db-timeout-secs
    /// 1073742` made Postgres refuse the writers' idle limit, so every batch
    /// failed for ever; larger values, and a huge `--progress-interval-secs`,
    /// panicked (exit 101). `--max-message-bytes 0` rejected every event.
    #[test]
    fn duration_and_size_flags_are_bounded() {
        let run = |flag: &str, v: &str| {
            Cli::try_parse_from([
                "energy-stream",
                "run",
                "--database-url",
                "postgres://u@h/db",
                &format!("{flag}={v}"),
            ])
            .map(|c| c.command)
        };
        let refused = [
            ("--db-timeout-secs", "86401"),
            ("--db-timeout-secs", "1073742"),
            ("--db-timeout-secs", "10000000000000000000"),
            ("--drain-timeout-secs", "86401"),
            ("--kpi-watch-secs", "86401"),
            ("--progress-interval-secs", "18446744073709551615"),
            ("--batch-max-wait-ms", "3600001"),
            ("--max-message-bytes", "0"),
            ("--max-message-bytes", "1073741825"),
        ];
        for (flag, v) in refused {
            let err = run(flag, v).expect_err(v).to_string();
            assert!(err.contains(flag), "{flag}={v}: {err}");
        }
        let accepted = [
            ("--db-timeout-secs", "86400"),
            ("--drain-timeout-secs", "0"),
            ("--kpi-watch-secs", "0"),
            ("--progress-interval-secs", "86400"),
            ("--batch-max-wait-ms", "0"),
            ("--max-message-bytes", "1"),
        ];
        for (flag, v) in accepted {
            let Ok(Command::Run(args)) = run(flag, v) else {
                panic!("{flag}={v} is accepted")
            };
            let cfg = args.to_config(true, Vec::new()).unwrap();
            // The longest timeout still gives Postgres an idle limit it takes
            // (at most 2^31 - 1 ms).
            assert!(cfg.database.frozen_after().as_millis() <= i32::MAX as u128);
        }
    }

    /// Regression: a `--max-future-secs` past chrono's range panicked, at
    /// start (exit 101) or in every batch.
    #[test]
    fn max_future_secs_is_bounded() {
        let run = |v: &str| {
            Cli::try_parse_from([
                "energy-stream",
                "run",
                "--database-url",
                "postgres://u@h/db",
                &format!("--max-future-secs={v}"),
            ])
            .map(|c| c.command)
        };
        // Regression: the bound was 100 * 366 days, more than the
        // README's 100 years.
        for bad in ["3155760001", "10000000000000", "9223372036854775807", "-1"] {
            let err = run(bad).expect_err(bad).to_string();
            assert!(err.contains("--max-future-secs"), "{err}");
        }
        let Ok(Command::Run(args)) = run("3155760000") else {
            panic!("100 years is accepted")
        };
        let cfg = args.to_config(true, Vec::new()).unwrap();
        assert_eq!(cfg.rules.max_future, TimeDelta::seconds(3_155_760_000));
    }

    /// A bench of no events has no rate to report and no offsets to wait
    /// for: clap refuses it before anything starts.
    #[test]
    fn bench_refuses_zero_events() {
        let err = Cli::try_parse_from(["energy-stream", "bench", "--events", "0"])
            .expect_err("--events 0 is refused")
            .to_string();
        assert!(err.contains("--events"), "{err}");
        assert!(Cli::try_parse_from(["energy-stream", "bench", "--events", "1"]).is_ok());
    }

    /// Regressions: `produce --rate 0` (or negative, or NaN) slept about
    /// 1 000 s per message; `--partitions 0` made a topic nothing could be
    /// sent to; topic names Kafka refuses were created on brokers that do
    /// not check (tansu).
    #[test]
    fn rates_partitions_and_topic_names_are_checked() {
        let produce = |extra: &[&str]| {
            let mut argv = vec!["energy-stream", "produce"];
            argv.extend_from_slice(extra);
            Cli::try_parse_from(argv)
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        for bad in [
            &["--rate=0"][..],
            &["--rate=-5"],
            &["--rate=NaN"],
            &["--rate=inf"],
            &["--partitions=0"],
            &["--topic="],
            &["--topic=bad topic!"],
            &["--topic=.."],
        ] {
            let err = produce(bad).expect_err(&format!("{bad:?} is refused"));
            let flag = bad[0].split('=').next().unwrap();
            assert!(err.contains(flag), "{bad:?}: {err}");
        }
        produce(&["--rate=0.5", "--partitions=1", "--topic=energy.events_v-2"]).unwrap();
        assert!(parse_topic(&"t".repeat(249)).is_ok());
        assert!(parse_topic(&"t".repeat(250)).is_err());
    }

    /// Regressions: every bad URL said only "invalid connection string"; an
    /// empty DATABASE_URL was libpq's defaults; a missing CA file surfaced as
    /// an OpenSSL error stack at the first connection; `localhost:9898` was
    /// "invalid socket address syntax".
    #[test]
    fn database_settings_and_metrics_addresses_explain_themselves() {
        let db = |url: &str, ca: Option<&str>| DbArgs {
            database_url: Some(url.into()),
            database_url_file: None,
            database_password_file: None,
            database_ca_file: ca.map(PathBuf::from),
        };
        let err = db("postgres://u@h:99999/db", None)
            .require(false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("port"), "{err}");
        let err = db("postgres://u@h/db?sslmode=bogus", None)
            .require(false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("sslmode"), "{err}");
        assert!(matches!(
            db("  ", None).require(false),
            Err(ConfigError::NoDatabase)
        ));
        // Regression: a CA file with sslmode=disable was silently ignored.
        let err = db(
            "postgres://u@h/db?sslmode=disable",
            Some("/nonexistent/ca.pem"),
        )
        .require(false)
        .unwrap_err()
        .to_string();
        assert!(err.contains("sslmode=disable"), "{err}");
        let with_ca = db("postgres://u@h/db", Some("/x.pem"))
            .require(false)
            .unwrap();
        assert_eq!(
            with_ca.get_ssl_mode(),
            tokio_postgres::config::SslMode::Require,
            "a CA file never falls back to clear text"
        );
        let err = db("postgres://u@h/db", Some("/nonexistent/ca.pem"))
            .ca_file()
            .unwrap_err()
            .to_string();
        assert!(err.contains("DATABASE_CA_FILE"), "{err}");
        assert!(err.contains("/nonexistent/ca.pem"), "{err}");

        let addr = parse_metrics_addr("localhost:9898").unwrap().unwrap();
        assert!(addr.ip().is_loopback() && addr.port() == 9898, "{addr}");
        assert_eq!(parse_metrics_addr("off").unwrap(), None);
        assert!(parse_metrics_addr("localhost").is_err());
    }

    #[test]
    fn secret_option_names() {
        for k in [
            "sasl.password",
            " sasl.password",
            "ssl.key.password",
            "sasl.oauthbearer.client.secret",
            "sasl.oauthbearer.assertion.private.key.passphrase",
            "sasl.oauthbearer.config",
            "ssl.keystore.password",
        ] {
            assert!(is_secret_key(k), "{k}");
        }
        for k in ["sasl.mechanism", "security.protocol", "ssl.ca.location"] {
            assert!(!is_secret_key(k), "{k}");
        }
    }

    #[test]
    fn a_database_url_and_its_file_together_are_refused() {
        let file = std::env::temp_dir().join(format!("es-url-{}", std::process::id()));
        std::fs::write(&file, "postgres://u@file-host/db").unwrap();
        let f = file.to_str().unwrap();
        let cli = Cli::parse_from([
            "energy-stream",
            "verify",
            "--database-url",
            "postgres://u@env-host/db",
            "--database-url-file",
            f,
        ]);
        let Command::Verify(args) = cli.command else {
            panic!()
        };
        // Regression: from the environment, the URL silently won.
        let e = args.db.resolve(false).unwrap_err().to_string();
        assert!(e.contains("set only one of them"), "{e}");
        // Typed on the command line, the URL wins over the environment.
        let c = args.db.resolve(true).unwrap().unwrap();
        assert_eq!(c.get_hosts().len(), 1);
        std::fs::remove_file(&file).unwrap();
    }

    #[test]
    fn database_urls_that_do_not_parse_say_what_to_do() {
        let refused = |url: &str| {
            let cli = Cli::parse_from(["energy-stream", "verify", "--database-url", url]);
            let Command::Verify(args) = cli.command else {
                panic!()
            };
            // As from DATABASE_URL, where a password may be.
            let e = args.db.resolve(false).unwrap_err().to_string();
            assert!(!e.contains("s3cr"), "no password in {e}");
            e
        };
        assert!(
            refused("mysql://u:s3cr@h/db").contains("expected a postgres:// or postgresql:// URL")
        );
        assert!(refused("postgres://u@h/db?sslmode=verify-full").contains("--database-ca-file"));
        assert!(
            refused("postgres://es_owner:s3cr@ss:w/rd%20#@127.0.0.1:55503/energy")
                .contains("percent-encode")
        );
        // Regression: this one parsed, with "s3cr@h2" taken into the host,
        // which the logs and errors then named.
        let e = refused("postgres://u:pw@s3cr@h2:5432/db");
        assert!(e.contains("percent-encode") && !e.contains("h2"), "{e}");
    }

    #[test]
    fn options_the_pipeline_sets_itself_are_refused() {
        // Regression: applied after the pipeline's own, these silently won
        // (another Kafka group than the logs and Postgres' offsets named).
        for kv in [
            "group.id=other",
            "GROUP.ID=other",
            "bootstrap.servers=127.0.0.1:1",
            "enable.auto.commit=true",
            "auto.offset.reset=latest",
            "isolation.level=read_uncommitted",
            // Regression: the topic-level spellings slipped past.
            "topic.auto.offset.reset=latest",
            "auto.commit.enable=true",
        ] {
            let cli = Cli::parse_from(["energy-stream", "run", "--kafka-option", kv]);
            let Command::Run(args) = cli.command else {
                panic!()
            };
            let e = args.kafka.options(Vec::new()).unwrap_err().to_string();
            let key = kv.split('=').next().unwrap().to_ascii_lowercase();
            let key = key.strip_prefix("topic.").unwrap_or(&key);
            assert!(
                e.starts_with(&format!("refusing Kafka option {key}: ")),
                "{e}"
            );
        }
        let e = kafka_env_options(vec![("KAFKA_OPT_GROUP_ID".into(), "other".into())])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--group-id (GROUP_ID)"), "{e}");
        // Other options still pass, from either side.
        let cli = Cli::parse_from([
            "energy-stream",
            "run",
            "--kafka-option",
            "session.timeout.ms=30000",
        ]);
        let Command::Run(args) = cli.command else {
            panic!()
        };
        assert_eq!(
            args.kafka
                .options(vec![("KAFKA_OPT_FETCH_WAIT_MAX_MS".into(), "50".into())])
                .unwrap(),
            vec![
                ("fetch.wait.max.ms".to_string(), "50".to_string()),
                ("session.timeout.ms".to_string(), "30000".to_string())
            ]
        );
    }

    #[test]
    fn secrets_are_refused_on_argv() {
        let cli = parse(&[
            "energy-stream",
            "run",
            "--database-url",
            "postgres://u:hunter2@h/db",
        ]);
        let Command::Run(args) = cli.command else {
            panic!()
        };
        let err = args.to_config(true, vec![]).unwrap_err().to_string();
        assert!(err.contains("refusing a password"), "{err}");
        assert!(!err.contains("hunter2"));
        // The same URL from the environment is fine.
        assert!(args.to_config(false, vec![]).is_ok());

        let cli = parse(&[
            "energy-stream",
            "run",
            "--database-url",
            "postgres://u@h/db",
            "--kafka-option",
            "sasl.password=hunter2",
        ]);
        let Command::Run(args) = cli.command else {
            panic!()
        };
        let err = args.to_config(true, vec![]).unwrap_err().to_string();
        assert!(err.contains("KAFKA_OPT_SASL_PASSWORD"), "{err}");
        assert!(!err.contains("hunter2"));
    }

    #[test]
    fn secret_files() {
        let dir = std::env::temp_dir().join(format!("es-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pw = dir.join("pw");
        std::fs::write(&pw, "s3cret\n").unwrap();
        let db = DbArgs {
            database_url: Some("postgres://u@h/db".into()),
            database_url_file: None,
            database_password_file: Some(pw.clone()),
            database_ca_file: None,
        };
        let c = db.require(false).unwrap();
        assert_eq!(c.get_password(), Some(&b"s3cret"[..]));
        let k = KafkaArgs {
            brokers: "b".into(),
            topic: "t".into(),
            kafka_options: vec![],
        };
        let opts = k
            .options(vec![(
                "KAFKA_OPT_SASL_PASSWORD_FILE".to_string(),
                pw.display().to_string(),
            )])
            .unwrap();
        assert_eq!(
            opts,
            vec![("sasl.password".to_string(), "s3cret".to_string())]
        );
        let missing = DbArgs {
            database_url: None,
            database_url_file: Some(dir.join("nope")),
            database_password_file: None,
            database_ca_file: None,
        };
        assert!(
            missing
                .require(false)
                .unwrap_err()
                .to_string()
                .contains("cannot read")
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_dead_database_host_is_noticed_unless_the_url_says_otherwise() {
        let db = |url: &str| {
            DbArgs {
                database_url: Some(url.into()),
                database_url_file: None,
                database_password_file: None,
                database_ca_file: None,
            }
            .require(false)
            .unwrap()
        };
        // Regression: a connection cut while start-up waited for Postgres
        // (a failed-over host) kept `run` waiting on the 2 h keepalive.
        let c = db("postgres://u@h/db");
        assert!(c.get_keepalives());
        assert_eq!(c.get_keepalives_idle(), Duration::from_secs(15));
        assert_eq!(c.get_keepalives_interval(), Some(Duration::from_secs(5)));
        assert_eq!(c.get_keepalives_retries(), Some(3));
        assert_eq!(c.get_tcp_user_timeout(), Some(&Duration::from_secs(30)));

        let c = db(
            "postgres://u@h/db?keepalives_idle=600&keepalives_interval=60&keepalives_retries=9&tcp_user_timeout=900",
        );
        assert_eq!(c.get_keepalives_idle(), Duration::from_secs(600));
        assert_eq!(c.get_keepalives_interval(), Some(Duration::from_secs(60)));
        assert_eq!(c.get_keepalives_retries(), Some(9));
        assert_eq!(c.get_tcp_user_timeout(), Some(&Duration::from_secs(900)));

        let c = db("postgres://u@h/db?keepalives=0");
        assert!(!c.get_keepalives());
        assert_eq!(c.get_keepalives_interval(), None);
    }

    #[test]
    fn help_never_shows_env_values() {
        // SAFETY: tests in this module do not read this variable concurrently.
        unsafe { std::env::set_var("DATABASE_URL", "postgres://u:hunter2@h/db") };
        let mut cmd = Cli::command();
        let run = cmd.find_subcommand_mut("run").unwrap();
        let help = run.render_long_help().to_string();
        unsafe { std::env::remove_var("DATABASE_URL") };
        assert!(help.contains("DATABASE_URL"));
        assert!(!help.contains("hunter2"));
    }

    #[test]
    fn fault_hook_forms() {
        let f = |s| Fault::parse(s);
        assert_eq!(f("copy:3").unwrap().point, FaultPoint::MidCopy);
        assert_eq!(f("commit:1").unwrap().point, FaultPoint::InCommit);
        let lost = f("commit-reply:2").unwrap();
        assert_eq!((lost.point, lost.batch), (FaultPoint::LostCommitReply, 2));
        for bad in ["commit", "commit:0", "reply:2", "commit-reply:x"] {
            let e = f(bad).unwrap_err();
            assert!(e.contains("commit-reply:N"), "{bad}: {e}");
        }
    }
}
