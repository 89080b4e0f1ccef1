//! Produce: replay a JSONL file into a Kafka topic.
//!
//! It owns topic creation (many brokers, tansu among them, do not auto-create),
//! the idempotent producer keyed by `customer_id`, pacing (`--rate`), shuffling
//! and looping, and the bad-lines file: a line that is not a JSON object with
//! `event_type`, `event_time` and `payload` is never sent, but written there with
//! its reason and counted. The pipeline, not the producer, judges everything else.
//! With `live`, it keeps generating fresh events stamped with the current time
//! once the file is done, so that dashboards move.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rdkafka::ClientContext;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::DeliveryResult;
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, ThreadedProducer};
use rdkafka::statistics::Statistics;

use crate::source::{ErrorLog, KafkaConfig, a_broker_is_up, note_client_error};
use crate::telemetry::{Health, Metrics};

/// Settings of one replay.
#[derive(Debug, Clone)]
pub struct ProduceConfig {
    pub kafka: KafkaConfig,
    pub input: PathBuf,
    pub partitions: i32,
    pub rate: Option<f64>,
    pub shuffle: bool,
    pub repeat: bool,
    pub bad_lines: PathBuf,
    /// After the file, generate live events (at `rate`) until stopped.
    pub live: bool,
    /// Send the file only into a topic no message was ever written to, so that a
    /// restarted producer (a container started again) does not store it a
    /// second time; `live` events follow either way.
    pub input_once: bool,
}

/// Every reason [`check_line`] gives, for metric labels.
pub const BAD_LINE_REASONS: [&str; 5] = [
    "empty_line",
    "not_utf8",
    "invalid_json",
    "not_object",
    "missing_top_level_key",
];

#[derive(Debug, Default, Clone, PartialEq)]
pub struct ProduceSummary {
    pub sent: u64,
    pub failed: u64,
    pub bad_lines: u64,
    pub elapsed: Duration,
}

impl ProduceSummary {
    pub fn events_per_sec(&self) -> f64 {
        self.sent as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

impl std::fmt::Display for ProduceSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "sent {}, failed {}, bad lines {}, elapsed {:.2}s, {:.0} events/s",
            self.sent,
            self.failed,
            self.bad_lines,
            self.elapsed.as_secs_f64(),
            self.events_per_sec()
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProduceError {
    #[error("cannot read {path}: {source}")]
    Input {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot write the bad-lines file {path}: {source}")]
    BadLines {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "--loop: {path} has no line to send (empty, or every line refused), so looping would only spin"
    )]
    NothingToLoop { path: String },
    #[error("cannot create topic {topic}: {message}")]
    CreateTopic { topic: String, message: String },
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error(
        "the broker refuses every message of this producer for good ({why}): it fenced the \
         idempotent producer (a broker that lost its state, or another producer with its id), \
         and no retry can deliver with it; {sent} delivered, {failed} failed. Start `produce` \
         again for a new producer (with --input-once it sends the file only into an empty topic)"
    )]
    Fenced { why: String, sent: u64, failed: u64 },
    /// Built by [`crate::source::config_error`], without the option's value.
    #[error("invalid Kafka configuration: {0}")]
    Config(String),
    /// The broker gave no metadata: unreachable, or it refused this client
    /// (a failed SASL or TLS handshake looks the same from here).
    #[error(
        "the broker at {brokers} is unreachable, or refused this client: no metadata within 10s ({cause}); \
         check the address, and the security settings (KAFKA_OPT_SECURITY_PROTOCOL, KAFKA_OPT_SASL_*, \
         KAFKA_OPT_SSL_*) if it needs them"
    )]
    Unreachable { brokers: String, cause: String },
}

/// What [`ensure_topic`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicFound {
    /// The topic was not there, and is now, empty.
    Created,
    /// The topic was there, with these partitions.
    Existing(Vec<i32>),
}

/// Creates `topic` with `partitions` partitions unless it exists.
pub fn ensure_topic(kafka: &KafkaConfig, partitions: i32) -> Result<TopicFound, ProduceError> {
    let admin: AdminClient<DefaultClientContext> = kafka
        .client_config()
        .create()
        .map_err(|e| ProduceError::Config(crate::source::config_error(&e)))?;
    // Ask for all topics: a request naming the topic would auto-create it, with
    // the broker's default partition count, on brokers that allow that.
    let md = admin
        .inner()
        .fetch_metadata(None, Duration::from_secs(10))
        .map_err(|e| ProduceError::Unreachable {
            brokers: kafka.brokers.clone(),
            cause: e.to_string(),
        })?;
    if let Some(t) = md
        .topics()
        .iter()
        .find(|t| t.name() == kafka.topic && t.error().is_none() && !t.partitions().is_empty())
    {
        if t.partitions().len() != partitions as usize {
            // Not an error: the topic is what it is, and keys still route;
            // and --partitions has a default, so this may be no one's wish.
            tracing::info!(
                topic = %kafka.topic,
                partitions = t.partitions().len(),
                partitions_if_created = partitions,
                "the topic exists with another partition count; --partitions applies only when it is created"
            );
        }
        return Ok(TopicFound::Existing(
            t.partitions().iter().map(|p| p.id()).collect(),
        ));
    }
    let topic = NewTopic::new(&kafka.topic, partitions, TopicReplication::Fixed(1));
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    // The admin API is async; a private runtime on a scoped thread lets this
    // blocking function run from anywhere, inside another runtime included.
    let results = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| ProduceError::CreateTopic {
                        topic: kafka.topic.clone(),
                        message: e.to_string(),
                    })?;
                rt.block_on(admin.create_topics([&topic], &opts))
                    .map_err(ProduceError::from)
            })
            .join()
            .expect("topic creation thread")
    })?;
    for r in results {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, code)) => {
                return Err(ProduceError::CreateTopic {
                    topic: t,
                    message: code.to_string(),
                });
            }
        }
    }
    // Metadata propagates asynchronously; wait until the topic is visible.
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(md) = admin
            .inner()
            .fetch_metadata(Some(&kafka.topic), Duration::from_secs(2))
            && md.topics().iter().any(|t| {
                t.name() == kafka.topic && t.error().is_none() && !t.partitions().is_empty()
            })
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    tracing::info!(topic = %kafka.topic, partitions, "topic created");
    Ok(TopicFound::Created)
}

/// How many messages were ever written to `partitions` of `kafka.topic`: the
/// sum of their high watermarks, which retention does not lower (a topic
/// whose sample aged out still had it once).
fn messages_written(kafka: &KafkaConfig, partitions: &[i32]) -> Result<i64, ProduceError> {
    use rdkafka::consumer::Consumer;
    let consumer: rdkafka::consumer::BaseConsumer = kafka
        .client_config()
        .create()
        .map_err(|e| ProduceError::Config(crate::source::config_error(&e)))?;
    let unreachable = |e: KafkaError| ProduceError::Unreachable {
        brokers: kafka.brokers.clone(),
        cause: e.to_string(),
    };
    let mut held = 0;
    for &p in partitions {
        let (_, high) = consumer
            .fetch_watermarks(&kafka.topic, p, Duration::from_secs(10))
            .map_err(unreachable)?;
        held += high.max(0);
    }
    Ok(held)
}

struct DeliveryCounter {
    ok: AtomicU64,
    failed: AtomicU64,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    /// Failed sends and deliveries: a broker away for longer than
    /// `message.timeout.ms` fails every queued message at once, which was a
    /// warning per message.
    failures: Mutex<ErrorLog>,
    /// The Kafka client's own errors: a refused broker reports several a second.
    client_errors: Mutex<ErrorLog>,
    /// Why the broker refuses every message of this producer for good (see
    /// [`fenced`]); set by the first such delivery report.
    fenced: Mutex<Option<String>>,
}

/// Whether a delivery failed because the broker fenced this idempotent
/// producer: its id or epoch is no longer the broker's (a broker that lost
/// its state, such as tansu paused past the producer's timeouts). No retry
/// can deliver with that id again, so every later message failed as well,
/// while `produce` stayed ready.
fn fenced(e: &KafkaError) -> bool {
    matches!(
        e,
        KafkaError::MessageProduction(
            RDKafkaErrorCode::ProducerFenced
                | RDKafkaErrorCode::InvalidProducerEpoch
                | RDKafkaErrorCode::Fenced
                | RDKafkaErrorCode::Fatal
        )
    )
}

impl DeliveryCounter {
    /// Counts a failed message; true when it was logged.
    fn note_failure(&self, what: &str, e: &KafkaError) -> bool {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let logged = self
            .failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .note(e.to_string());
        if let Some(unlogged) = logged {
            tracing::warn!(error = %e, unlogged, "{what} failed");
        }
        logged.is_some()
    }
}

impl ClientContext for DeliveryCounter {
    fn stats(&self, stats: Statistics) {
        // Losing every broker is reported (AllBrokersDown), getting one back
        // is not; and a producer pacing at a slow rate may deliver nothing
        // for a while that would say so.
        if a_broker_is_up(&stats) {
            self.health.kafka_ok.store(true, Ordering::Relaxed);
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        note_client_error(
            &error,
            reason,
            &self.health,
            &self.metrics,
            &self.client_errors,
        );
    }
}

impl ProducerContext for DeliveryCounter {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => {
                self.ok.fetch_add(1, Ordering::Relaxed);
                if !self.health.kafka_ok.load(Ordering::Relaxed) {
                    self.health.kafka_ok.store(true, Ordering::Relaxed);
                }
            }
            Err((e, _)) => {
                if fenced(e) {
                    self.health.kafka_ok.store(false, Ordering::Relaxed);
                    self.fenced
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get_or_insert_with(|| e.to_string());
                }
                self.note_failure("delivery", e);
            }
        }
    }
}

/// Why a line is not sent.
pub fn check_line(line: &str) -> Result<Option<String>, &'static str> {
    if line.trim().is_empty() {
        return Err("empty_line");
    }
    // Values stay raw text: read into a `Value`, a number beyond a float's
    // range (`1e400`, valid JSON) failed, and the line was refused as not
    // JSON although the pipeline rejects it with its own reason.
    type Raw = std::collections::HashMap<String, Box<serde_json::value::RawValue>>;
    serde_json::from_str::<serde::de::IgnoredAny>(line).map_err(|_| "invalid_json")?;
    let obj: Raw = serde_json::from_str(line).map_err(|_| "not_object")?;
    for k in ["event_type", "event_time", "payload"] {
        if !obj.contains_key(k) {
            return Err("missing_top_level_key");
        }
    }
    let key = obj
        .get("payload")
        .and_then(|p| serde_json::from_str::<Raw>(p.get()).ok())
        .and_then(|p| serde_json::from_str::<String>(p.get("customer_id")?.get()).ok());
    Ok(key)
}

/// Replays the file; returns when done (or, with `repeat`, when `stop` is set).
///
/// `health.kafka_ok` follows the broker: set once the topic is there, unset
/// while no broker can be reached. The producer has no Postgres, so the
/// caller leaves the other conditions of readiness true.
pub fn produce(
    cfg: &ProduceConfig,
    stop: &AtomicBool,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
) -> Result<ProduceSummary, ProduceError> {
    let input_err = |source| ProduceError::Input {
        path: cfg.input.display().to_string(),
        source,
    };
    // Open the input before touching the broker, so a typo fails fast.
    let stdin = cfg.input == Path::new("-");
    if !stdin
        && File::open(&cfg.input)
            .map_err(input_err)?
            .metadata()
            .map_err(input_err)?
            .is_dir()
    {
        return Err(input_err(std::io::Error::new(
            std::io::ErrorKind::IsADirectory,
            "is a directory; give a JSONL file",
        )));
    }
    // And check where refused lines go before sending anything: the file is
    // created at the first one, which may come after most of the input.
    let bad_dir = match cfg.bad_lines.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => std::path::Path::new("."),
    };
    if !bad_dir.is_dir() {
        return Err(ProduceError::BadLines {
            path: cfg.bad_lines.display().to_string(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "its directory does not exist",
            ),
        });
    }
    let skip_input = match ensure_topic(&cfg.kafka, cfg.partitions)? {
        TopicFound::Existing(partitions) if cfg.input_once => {
            let held = messages_written(&cfg.kafka, &partitions)?;
            if held > 0 {
                tracing::info!(
                    topic = %cfg.kafka.topic,
                    messages = held,
                    input = %cfg.input.display(),
                    "messages were written to the topic before; not sending the input again (--input-once)"
                );
            }
            held > 0
        }
        _ => false,
    };
    health.kafka_ok.store(true, Ordering::Relaxed);

    let ctx = DeliveryCounter {
        ok: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        metrics: metrics.clone(),
        health,
        failures: Mutex::new(ErrorLog::default()),
        client_errors: Mutex::new(ErrorLog::default()),
        fenced: Mutex::new(None),
    };
    let mut c = cfg.kafka.client_config();
    c.set("enable.idempotence", "true")
        .set("statistics.interval.ms", "5000")
        .set("linger.ms", "10")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "200000")
        // librdkafka's default (1 000 000 bytes) is below `run`'s default
        // --max-message-bytes (1 MiB), so a message at that limit, or the
        // larger ones a user sends to see them rejected as too_large, failed
        // here. The broker's own limit still applies.
        .set("message.max.bytes", "16777216");
    for (k, v) in &cfg.kafka.options {
        c.set(k, v);
    }
    let producer: ThreadedProducer<DeliveryCounter> = c
        .create_with_context(ctx)
        .map_err(|e| ProduceError::Config(crate::source::config_error(&e)))?;
    let bad_path = cfg.bad_lines.display().to_string();
    // A previous run's file would otherwise stay when this run refuses
    // nothing, and be read as this run's refusals. Only a regular file is
    // removed: never a device (`/dev/null`), a link, or the input itself.
    if let Ok(meta) = std::fs::symlink_metadata(&cfg.bad_lines)
        && meta.file_type().is_file()
    {
        if same_file(&cfg.input, &meta) {
            return Err(ProduceError::BadLines {
                path: bad_path,
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "it is the input file; give another path",
                ),
            });
        }
        if let Err(e) = std::fs::remove_file(&cfg.bad_lines) {
            return Err(ProduceError::BadLines {
                path: bad_path,
                source: e,
            });
        }
    }
    let mut bad_out: Option<BufWriter<File>> = None;
    let mut summary = ProduceSummary::default();
    let started = Instant::now();
    let mut offered: u64 = 0;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    // Deliveries are counted in the callback with atomics and copied to the
    // metrics about once a second: never a metric call per message.
    let mut reported = (0u64, 0u64);
    let mut last_report = Instant::now();

    let mut read_failed = None;
    let mut gave_up = None;
    let mut passes = 0u64;
    'outer: loop {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        passes += 1;
        let offered_before = offered;
        // Each line with its number in the file, which the bad-lines file
        // names whatever order the lines are sent in.
        let numbered = |lines: std::io::Result<_>| {
            lines.map(|lines: LineIter| {
                lines
                    .enumerate()
                    .map(|(i, line)| line.map(|line| (i as u64 + 1, line)))
            })
        };
        let lines: Box<dyn Iterator<Item = std::io::Result<(u64, Line)>>> = if skip_input {
            Box::new(std::iter::empty())
        } else if cfg.shuffle {
            let mut all: Vec<(u64, Line)> = numbered(read_lines(&cfg.input))
                .map_err(input_err)?
                .collect::<Result<_, _>>()
                .map_err(input_err)?;
            all.shuffle(&mut rng);
            Box::new(all.into_iter().map(Ok))
        } else {
            Box::new(numbered(read_lines(&cfg.input)).map_err(input_err)?)
        };
        let live_after_file = cfg.live && !cfg.repeat;
        let lines: Box<dyn Iterator<Item = std::io::Result<(u64, Line)>>> = if live_after_file {
            // Generated here, so never refused: their number is never shown.
            Box::new(lines.chain(LiveEvents::new().map(|l| Ok((0, Ok(l))))))
        } else {
            lines
        };
        for line in lines {
            if stop.load(Ordering::Relaxed) {
                break 'outer;
            }
            if last_report.elapsed() >= Duration::from_secs(1) {
                report_deliveries(producer.context(), &mut reported);
                flush_bad_lines(&mut bad_out, &bad_path)?;
                last_report = Instant::now();
                if let Some(why) = refused_for_good(&producer) {
                    gave_up = Some(why);
                    break 'outer;
                }
            }
            let (number, line) = match line {
                Ok(line) => line,
                Err(e) => {
                    // Stop reading, but deliver what is queued before failing:
                    // dropping it would make a re-run duplicate the delivered part.
                    read_failed = Some(e);
                    break 'outer;
                }
            };
            let checked = match &line {
                Ok(text) => check_line(text),
                Err(_) => Err("not_utf8"),
            };
            let line = line.unwrap_or_else(|lossy| lossy);
            let key = match checked {
                Ok(k) => k,
                // Recorded and counted by the first pass: `--loop` wrote
                // the same lines again on every pass.
                Err(_) if passes > 1 => continue,
                Err(reason) => {
                    summary.bad_lines += 1;
                    metrics
                        .producer_bad_lines
                        .with_label_values(&[reason])
                        .inc();
                    let out = match bad_out.as_mut() {
                        Some(o) => o,
                        None => {
                            bad_out.insert(BufWriter::new(File::create(&cfg.bad_lines).map_err(
                                |source| ProduceError::BadLines {
                                    path: bad_path.clone(),
                                    source,
                                },
                            )?))
                        }
                    };
                    let record =
                        serde_json::json!({"line": number, "reason": reason, "text": line});
                    writeln!(out, "{record}").map_err(|source| ProduceError::BadLines {
                        path: bad_path.clone(),
                        source,
                    })?;
                    continue;
                }
            };
            if let Some(rate) = cfg.rate {
                let due = Duration::from_secs_f64(offered as f64 / rate.max(0.001));
                // Sleep only once a millisecond ahead: a sleep per message
                // (70 µs apart at 14 k/s) cost more CPU than the sending.
                if let Some(wait) = due.checked_sub(started.elapsed())
                    && wait >= Duration::from_millis(1)
                {
                    // In slices, so that a shutdown does not wait for a slow
                    // rate's next message.
                    let until = Instant::now() + wait;
                    while !stop.load(Ordering::Relaxed) {
                        let left = until.saturating_duration_since(Instant::now());
                        if left.is_zero() {
                            break;
                        }
                        std::thread::sleep(left.min(Duration::from_millis(50)));
                    }
                    if stop.load(Ordering::Relaxed) {
                        break 'outer;
                    }
                }
            }
            let mut record = BaseRecord::to(&cfg.kafka.topic).payload(line.as_bytes());
            if let Some(k) = key.as_deref() {
                record = record.key(k.as_bytes());
            }
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                        record = r;
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err((e, _)) => {
                        producer.context().note_failure("send", &e);
                        break;
                    }
                }
            }
            offered += 1;
        }
        // A looped or live run may go on for days: what it refused is in
        // the file by the end of each pass and within a second, not only
        // at exit.
        flush_bad_lines(&mut bad_out, &bad_path)?;
        if !cfg.repeat {
            break;
        }
        // A pass that sent nothing would be repeated as fast as the input
        // reads, forever: a file of bad lines only, an empty one, or a pipe
        // that a first pass drained.
        if offered == offered_before {
            if offered == 0 {
                return Err(ProduceError::NothingToLoop {
                    path: cfg.input.display().to_string(),
                });
            }
            tracing::warn!(
                pass = passes,
                "--loop: this pass of the input sent nothing (a pipe reads only once); stopping"
            );
            break;
        }
    }
    flush_bad_lines(&mut bad_out, &bad_path)?;
    let ctx = producer.context();
    // A short replay may finish before the next check; its queue then fails
    // as the flush waits.
    let flushed = producer.flush(Duration::from_secs(60));
    if let Some(why) = gave_up.or_else(|| refused_for_good(&producer)) {
        report_deliveries(ctx, &mut reported);
        return Err(ProduceError::Fenced {
            why,
            sent: ctx.ok.load(Ordering::Relaxed),
            failed: ctx.failed.load(Ordering::Relaxed),
        });
    }
    flushed?;
    if let Some(e) = read_failed {
        if offered > 0 {
            tracing::warn!(
                delivered = ctx.ok.load(Ordering::Relaxed),
                failed = ctx.failed.load(Ordering::Relaxed),
                "input read failed; the lines before it were delivered"
            );
        }
        return Err(input_err(e));
    }
    summary.sent = ctx.ok.load(Ordering::Relaxed);
    summary.failed = ctx.failed.load(Ordering::Relaxed)
        + offered.saturating_sub(summary.sent + ctx.failed.load(Ordering::Relaxed));
    summary.elapsed = started.elapsed();
    report_deliveries(ctx, &mut reported);
    // Messages that never got a delivery report (flush timed out) count as failed.
    let unreported = summary.failed.saturating_sub(reported.1);
    ctx.metrics
        .producer_sent
        .with_label_values(&["failed"])
        .inc_by(unreported);
    Ok(summary)
}

/// Why this producer can deliver nothing any more, if so: the broker fenced
/// it (see [`fenced`]), or librdkafka raised a fatal error.
fn refused_for_good(producer: &ThreadedProducer<DeliveryCounter>) -> Option<String> {
    if let Some(why) = producer
        .context()
        .fenced
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
    {
        return Some(why);
    }
    producer
        .client()
        .fatal_error()
        .map(|(code, reason)| format!("{code:?}: {reason}"))
}

/// Adds the deliveries since the last call to the metrics.
fn report_deliveries(ctx: &DeliveryCounter, reported: &mut (u64, u64)) {
    let ok = ctx.ok.load(Ordering::Relaxed);
    let failed = ctx.failed.load(Ordering::Relaxed);
    ctx.metrics
        .producer_sent
        .with_label_values(&["ok"])
        .inc_by(ok - reported.0);
    ctx.metrics
        .producer_sent
        .with_label_values(&["failed"])
        .inc_by(failed - reported.1);
    *reported = (ok, failed);
}

/// An endless stream of realistic events stamped with the time they are sent.
///
/// The generator lays out a day of sessions (logins before views before
/// switches); replaying its lines in order with `event_time` replaced by now
/// keeps that order while the times stay live.
struct LiveEvents {
    chunk: u64,
    lines: std::vec::IntoIter<String>,
}

impl LiveEvents {
    const CHUNK: u64 = 20_000;

    fn new() -> Self {
        LiveEvents {
            chunk: 0,
            lines: Vec::new().into_iter(),
        }
    }

    fn refill(&mut self) {
        self.chunk += 1;
        let cfg = crate::generate::GenerateConfig {
            events: Self::CHUNK,
            customers: 2_000,
            days: 1,
            start: chrono::Utc::now() - chrono::TimeDelta::days(1),
            seed: 0x11fe_0000 + self.chunk,
            bad_ratio: 0.0,
        };
        let mut buf = Vec::new();
        if let Err(e) = crate::generate::generate(&cfg, &mut buf) {
            tracing::warn!(error = %e, "live event generation failed");
        }
        let text = String::from_utf8_lossy(&buf);
        self.lines = text
            .lines()
            .map(str::to_string)
            .collect::<Vec<_>>()
            .into_iter();
    }
}

impl Iterator for LiveEvents {
    type Item = String;

    fn next(&mut self) -> Option<String> {
        loop {
            let Some(line) = self.lines.next() else {
                self.refill();
                if self.lines.len() == 0 {
                    return None;
                }
                continue;
            };
            if let Ok(mut v) = serde_json::from_str::<serde_json::Value>(&line) {
                let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
                v["event_time"] = serde_json::Value::String(now);
                return Some(v.to_string());
            }
        }
    }
}

/// One input line: its text, or, when it is not UTF-8, a lossy copy for the
/// bad-lines file.
type Line = Result<String, String>;

/// The file's lines without their `\n` or `\r\n`, and without a UTF-8 byte
/// order mark on the first, which Windows tools write and JSON does not allow.
/// A line that is not UTF-8 is one bad line, not the end of the file.
/// Whether `path` is the file that `other` describes (the same inode).
fn same_file(path: &Path, other: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).is_ok_and(|m| m.dev() == other.dev() && m.ino() == other.ino())
}

/// What [`read_lines`] gives.
type LineIter = Box<dyn Iterator<Item = std::io::Result<Line>>>;

fn read_lines(path: &Path) -> std::io::Result<LineIter> {
    let mut first = true;
    // `-` is standard input, as for most tools that read files.
    let input: Box<dyn std::io::Read> = if path == Path::new("-") {
        Box::new(std::io::stdin())
    } else {
        Box::new(File::open(path)?)
    };
    Ok(Box::new(BufReader::new(input).split(b'\n').map(
        move |bytes| {
            let mut bytes = bytes?;
            if bytes.last() == Some(&b'\r') {
                bytes.pop();
            }
            if std::mem::take(&mut first) && bytes.starts_with(b"\xef\xbb\xbf") {
                bytes.drain(..3);
            }
            Ok(String::from_utf8(bytes)
                .map_err(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()))
        },
    )))
}

/// Writes out the refused lines buffered so far.
fn flush_bad_lines(out: &mut Option<BufWriter<File>>, path: &str) -> Result<(), ProduceError> {
    match out {
        Some(o) => o.flush().map_err(|source| ProduceError::BadLines {
            path: path.to_string(),
            source,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One replay with fresh metrics and health, never stopped.
    fn produce_once(cfg: &ProduceConfig) -> Result<ProduceSummary, ProduceError> {
        produce(cfg, &AtomicBool::new(false), Metrics::new(), Arc::default())
    }

    /// Regression: every failed message was a warning of its own, so a
    /// broker away past `message.timeout.ms` wrote one line per queued
    /// message (up to 200 000).
    #[test]
    fn failed_messages_are_counted_each_and_logged_once_in_a_while() {
        let ctx = DeliveryCounter {
            ok: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            metrics: Metrics::new(),
            health: Arc::default(),
            failures: Mutex::new(ErrorLog::default()),
            client_errors: Mutex::new(ErrorLog::default()),
            fenced: Mutex::new(None),
        };
        let e = KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut);
        let logged = (0..1000)
            .filter(|_| ctx.note_failure("delivery", &e))
            .count();
        assert_eq!(ctx.failed.load(Ordering::Relaxed), 1000);
        assert_eq!(logged, 1);
    }

    #[test]
    fn live_events_are_valid_and_stamped_now() {
        let before = chrono::Utc::now();
        let lines: Vec<String> = LiveEvents::new()
            .take(LiveEvents::CHUNK as usize + 10)
            .collect();
        assert_eq!(
            lines.len(),
            LiveEvents::CHUNK as usize + 10,
            "crosses a refill"
        );
        for line in &lines {
            assert_eq!(check_line(line).map(|k| k.is_some()), Ok(true), "{line}");
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let t =
                chrono::DateTime::parse_from_rfc3339(v["event_time"].as_str().unwrap()).unwrap();
            assert!(t >= before && t <= chrono::Utc::now(), "{line}");
        }
    }

    /// A fresh directory for one test's files, named after it and this process.
    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("es-produce-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A plain replay of `input` into `topic`, refusals to `dir/bad.jsonl`,
    /// every option off.
    fn replay(brokers: String, topic: &str, input: PathBuf, dir: &Path) -> ProduceConfig {
        ProduceConfig {
            kafka: KafkaConfig {
                brokers,
                topic: topic.into(),
                group_id: "unused".into(),
                options: vec![],
            },
            input,
            partitions: 1,
            rate: None,
            shuffle: false,
            repeat: false,
            bad_lines: dir.join("bad.jsonl"),
            live: false,
            input_once: false,
        }
    }

    /// Regression: with `--shuffle`, the bad-lines file gave each refused
    /// line's place in the shuffled order as its `line`, not its line in the
    /// file.
    #[test]
    fn refused_lines_are_numbered_as_in_the_file_when_shuffled() {
        let dir = scratch("shuffle");
        let input = dir.join("in.jsonl");
        let good = r#"{"event_type":"user_login","event_time":"2025-06-01T00:00:00Z","payload":{"customer_id":"A","session_id":1,"channel":"web"}}"#;
        let mut text = String::new();
        for n in 1..=40 {
            text += &match n {
                5 => "not json at all".to_string(),
                17 => "[1,2]".to_string(),
                33 => "{}".to_string(),
                _ => good.to_string(),
            };
            text.push('\n');
        }
        std::fs::write(&input, text).unwrap();
        let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
        cluster.create_topic("shuffled", 1, 1).unwrap();
        let mut cfg = replay(cluster.bootstrap_servers(), "shuffled", input, &dir);
        cfg.shuffle = true;
        let summary = produce_once(&cfg).unwrap();
        assert_eq!((summary.sent, summary.bad_lines), (37, 3));
        let mut bad: Vec<(u64, String)> = std::fs::read_to_string(dir.join("bad.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                (
                    v["line"].as_u64().unwrap(),
                    v["text"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        bad.sort();
        assert_eq!(
            bad,
            [
                (5, "not json at all".to_owned()),
                (17, "[1,2]".to_owned()),
                (33, "{}".to_owned())
            ]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A JSONL file with a byte order mark, CRLF line ends and one line that
    /// is not UTF-8. The mark made line 1 invalid_json, and the bad line ended
    /// the replay with "stream did not contain valid UTF-8", purging the
    /// messages still queued.
    #[test]
    fn bom_crlf_and_a_non_utf8_line_do_not_stop_the_replay() {
        let dir = scratch("replay");
        let input = dir.join("in.jsonl");
        let good = |c: &str| {
            format!(
                r#"{{"event_type":"user_login","event_time":"2025-06-01T00:00:00Z","payload":{{"customer_id":"{c}","session_id":1,"channel":"web"}}}}"#
            )
        };
        let mut bytes = b"\xef\xbb\xbf".to_vec();
        bytes.extend(format!("{}\r\n{}\r\n", good("A"), good("B")).as_bytes());
        bytes.extend(b"{\"event_type\":\"user_login\",\"payload\":\"\xff\xfe\"}\n");
        bytes.extend(format!("{}\n{}", good("C"), good("D")).as_bytes());
        std::fs::write(&input, &bytes).unwrap();

        let lines: Vec<Line> = read_lines(&input).unwrap().map(Result::unwrap).collect();
        assert_eq!(lines.len(), 5);
        assert_eq!(lines[0], Ok(good("A")), "mark and CR dropped");
        assert_eq!(lines[1], Ok(good("B")));
        assert!(lines[2].as_ref().is_err_and(|l| l.contains('\u{fffd}')));
        assert_eq!(lines[4], Ok(good("D")), "last line without a newline");

        let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
        // The mock broker has no CreateTopics; produce finds the topic there.
        cluster.create_topic("bom", 1, 1).unwrap();
        let cfg = replay(cluster.bootstrap_servers(), "bom", input.clone(), &dir);
        let summary = produce_once(&cfg).unwrap();
        assert_eq!((summary.sent, summary.failed, summary.bad_lines), (4, 0, 1));
        let bad = std::fs::read_to_string(dir.join("bad.jsonl")).unwrap();
        let bad: serde_json::Value = serde_json::from_str(bad.trim()).unwrap();
        assert_eq!(bad["line"], 3);
        assert_eq!(bad["reason"], "not_utf8");

        // A directory given as the input fails before the broker is asked
        // anything (it used to create the topic first).
        let mut cfg = cfg;
        cfg.input = dir.clone();
        cfg.kafka.brokers = "127.0.0.1:1".into();
        let err = produce_once(&cfg).unwrap_err();
        assert!(err.to_string().contains("is a directory"), "{err}");

        // Regression: a bad-lines path in a missing directory failed only at
        // the first bad line, after the lines before it were sent.
        cfg.input = input.clone();
        cfg.bad_lines = dir.join("missing").join("bad.jsonl");
        let err = produce_once(&cfg).unwrap_err();
        assert!(
            err.to_string().contains("directory does not exist"),
            "{err}"
        );

        // Regression: at a slow rate the producer slept until the next
        // message was due, whatever the stop flag said.
        cfg.bad_lines = dir.join("bad.jsonl");
        cfg.kafka.brokers = cluster.bootstrap_servers();
        cfg.rate = Some(0.01);
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let stopper = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(300));
                stop.store(true, Ordering::Relaxed);
            })
        };
        // The first line goes at once, the second is due 100 s later: only
        // the stop can end this call before then.
        let summary = produce(&cfg, &stop, Metrics::new(), Arc::default()).unwrap();
        stopper.join().unwrap();
        assert_eq!(summary.sent, 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Regression: a restarted producer (`docker compose up` after `down`,
    /// or after a rebuild) sent the sample file into the topic again, and
    /// every sample event was stored twice. With `input_once` the file goes
    /// only into a topic that holds nothing yet.
    #[test]
    fn input_once_sends_the_file_into_an_empty_topic_only() {
        let dir = scratch("once");
        let input = dir.join("in.jsonl");
        std::fs::write(
            &input,
            "{\"event_type\":\"x\",\"event_time\":\"y\",\"payload\":{}}\n".repeat(3),
        )
        .unwrap();
        let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
        // The mock cluster cannot create topics through the admin API.
        cluster.create_topic("premade", 2, 1).unwrap();
        let cfg = |topic: &str| ProduceConfig {
            partitions: 2,
            input_once: true,
            ..replay(cluster.bootstrap_servers(), topic, input.clone(), &dir)
        };
        assert_eq!(produce_once(&cfg("premade")).unwrap().sent, 3, "empty");
        assert_eq!(
            produce_once(&cfg("premade")).unwrap().sent,
            0,
            "the topic holds the file already"
        );
        // Without the flag the file goes again, as asked.
        let again = ProduceConfig {
            input_once: false,
            ..cfg("premade")
        };
        assert_eq!(produce_once(&again).unwrap().sent, 3);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Regression: librdkafka's default message.max.bytes (1 000 000) made
    /// produce fail a message of exactly `run`'s default --max-message-bytes
    /// (1 MiB), and the 2 MiB one a user sends to see too_large.
    #[test]
    fn messages_past_a_mebibyte_are_sent() {
        let dir = scratch("big");
        let input = dir.join("in.jsonl");
        let line = |bytes: usize| {
            let head = "{\"event_type\":\"x\",\"event_time\":\"y\",\"payload\":{\"customer_id\":\"";
            let tail = "\"}}";
            format!(
                "{head}{}{tail}\n",
                "A".repeat(bytes - head.len() - tail.len())
            )
        };
        std::fs::write(&input, line(1 << 20) + &line(2 << 20)).unwrap();
        let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
        cluster.create_topic("big", 1, 1).unwrap();
        let cfg = replay(cluster.bootstrap_servers(), "big", input, &dir);
        let summary = produce_once(&cfg).unwrap();
        assert_eq!((summary.sent, summary.failed, summary.bad_lines), (2, 0, 0));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Regression: `--loop` wrote the input's bad lines to the bad-lines
    /// file, and counted them, again on every pass.
    #[test]
    fn a_looped_input_records_its_bad_lines_once() {
        let dir = scratch("loopbad");
        let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
        cluster.create_topic("loopbad", 1, 1).unwrap();
        let cfg = ProduceConfig {
            repeat: true,
            ..replay(
                cluster.bootstrap_servers(),
                "loopbad",
                dir.join("mixed.jsonl"),
                &dir,
            )
        };
        let good = "{\"event_type\":\"x\",\"event_time\":\"y\",\"payload\":{}}\n";
        std::fs::write(&cfg.input, format!("{good}not json\n{good}[1]\n")).unwrap();
        let stop = AtomicBool::new(false);
        let (summary, while_running) = std::thread::scope(|s| {
            let run = s.spawn(|| produce(&cfg, &stop, Metrics::new(), Arc::default()));
            // Long enough for several passes, of two lines sent each.
            std::thread::sleep(Duration::from_millis(500));
            // Regression: the file was written only at exit, so a looped or
            // live producer's file was never complete while it ran.
            let while_running = std::fs::read_to_string(&cfg.bad_lines).unwrap_or_default();
            assert!(!run.is_finished(), "still looping");
            stop.store(true, Ordering::Relaxed);
            (run.join().unwrap().unwrap(), while_running)
        });
        assert_eq!(while_running.lines().count(), 2, "{while_running:?}");
        assert!(summary.sent >= 4, "more than one pass: {summary:?}");
        assert_eq!(summary.bad_lines, 2, "{summary:?}");
        let bad = std::fs::read_to_string(&cfg.bad_lines).unwrap();
        assert_eq!(bad.lines().count(), 2, "{bad}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Regression: `--loop` over an empty file, or a file of refused lines
    /// only, re-read the input as fast as it could, forever: a spinning CPU,
    /// an ever-growing bad-lines file.
    /// And a bad-lines file of an earlier run stayed when this run refused
    /// nothing.
    #[test]
    fn loop_stops_when_a_pass_sends_nothing() {
        let dir = scratch("loop");
        let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
        cluster.create_topic("looped", 1, 1).unwrap();
        let mut cfg = ProduceConfig {
            repeat: true,
            ..replay(
                cluster.bootstrap_servers(),
                "looped",
                dir.join("empty.jsonl"),
                &dir,
            )
        };
        // An earlier run's refusals, which this run must not leave behind.
        std::fs::write(&cfg.bad_lines, "stale\n").unwrap();
        std::fs::write(&cfg.input, "").unwrap();
        // Regression: the clean-up removed whatever the path named, the
        // input file itself when both were given the same path.
        let same = ProduceConfig {
            bad_lines: cfg.input.clone(),
            ..cfg.clone()
        };
        let err = produce_once(&same).unwrap_err();
        assert!(err.to_string().contains("it is the input file"), "{err}");
        assert!(cfg.input.exists(), "the input is still there");
        let link = dir.join("link.jsonl");
        std::os::unix::fs::symlink(&cfg.bad_lines, &link).unwrap();
        let linked = ProduceConfig {
            bad_lines: link.clone(),
            input: dir.join("one.jsonl"),
            repeat: false,
            ..cfg.clone()
        };
        std::fs::write(
            &linked.input,
            "{\"event_type\":\"x\",\"event_time\":\"y\",\"payload\":{}}\n",
        )
        .unwrap();
        produce_once(&linked).unwrap();
        assert!(link.exists(), "a link is never removed");
        let err = produce_once(&cfg).unwrap_err();
        assert!(err.to_string().contains("no line to send"), "{err}");
        assert!(!cfg.bad_lines.exists(), "the stale bad-lines file is gone");

        cfg.input = dir.join("bad-only.jsonl");
        std::fs::write(&cfg.input, "not json\n[1]\n").unwrap();
        let err = produce_once(&cfg).unwrap_err();
        assert!(err.to_string().contains("every line refused"), "{err}");
        let bad = std::fs::read_to_string(&cfg.bad_lines).unwrap();
        assert_eq!(
            bad.lines().count(),
            2,
            "one pass, not a growing file: {bad}"
        );

        // A pipe that the first pass drained: `tests/cli.rs`
        // (`produce_loops_over_standard_input_once`).
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Regression: once the broker fenced the idempotent producer (seen with
    /// tansu after a 5-minute pause), every message failed with
    /// ProducerFenced, for as long as a looped or live replay ran, while
    /// `produce` said it was ready. It now stops with an error that says so.
    #[test]
    fn a_fenced_producer_stops_instead_of_failing_every_message() {
        use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
        let dir = scratch("fenced");
        let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
        cluster.create_topic("fenced", 1, 1).unwrap();
        let cfg = ProduceConfig {
            repeat: true,
            rate: Some(200.0),
            ..replay(
                cluster.bootstrap_servers(),
                "fenced",
                dir.join("in.jsonl"),
                &dir,
            )
        };
        std::fs::write(
            &cfg.input,
            "{\"event_type\":\"x\",\"event_time\":\"y\",\"payload\":{}}\n".repeat(10),
        )
        .unwrap();
        cluster.request_errors(
            RDKafkaApiKey::Produce,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_PRODUCER_FENCED; 10_000],
        );
        // Without the fix the looped replay runs until stopped: stopped
        // after 60 s, it returned a summary of failures.
        let stop = Arc::new(AtomicBool::new(false));
        let timer = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let until = Instant::now() + Duration::from_secs(60);
                while !stop.load(Ordering::Relaxed) && Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(50));
                }
                stop.store(true, Ordering::Relaxed);
            })
        };
        let health: Arc<Health> = Arc::default();
        let outcome = produce(&cfg, &stop, Metrics::new(), health.clone());
        stop.store(true, Ordering::Relaxed);
        timer.join().unwrap();
        let err = outcome.expect_err("a fenced producer stops");
        let text = err.to_string();
        assert!(
            matches!(err, ProduceError::Fenced { sent: 0, .. }),
            "{text}"
        );
        assert!(text.contains("Start `produce` again"), "{text}");
        assert!(
            !health.kafka_ok.load(Ordering::Relaxed),
            "not ready once fenced"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn line_checks() {
        assert_eq!(
            check_line(r#"{"event_type":"x","event_time":"y","payload":{"customer_id":"C1"}}"#),
            Ok(Some("C1".to_string()))
        );
        assert_eq!(
            check_line(r#"{"event_type":"x","event_time":"y","payload":7}"#),
            Ok(None),
            "a bad payload is the pipeline's to reject"
        );
        assert_eq!(check_line(""), Err("empty_line"));
        assert_eq!(check_line("{nope"), Err("invalid_json"));
        // Regression: numbers beyond a float's range are valid JSON; the
        // pipeline rejects them as number_out_of_range, so they are sent.
        assert_eq!(
            check_line(
                r#"{"event_type":"x","event_time":"y","payload":{"customer_id":"C\u0031","payment_amount":1e400,"session_id":-1e999}}"#
            ),
            Ok(Some("C1".to_string()))
        );
        assert_eq!(
            check_line(r#"{"event_type":"x","event_time":"y","payload":{"customer_id":7}}"#),
            Ok(None)
        );
        assert_eq!(check_line("null"), Err("not_object"));
        assert_eq!(check_line(r#""text""#), Err("not_object"));
        assert_eq!(check_line("[1]"), Err("not_object"));
        assert_eq!(
            check_line(r#"{"event_type":"x","payload":{}}"#),
            Err("missing_top_level_key")
        );
    }
}
