//! Produce: replay a JSONL file into a Kafka topic.
//!
//! It owns topic creation (many brokers, tansu among them, do not auto-create),
//! the idempotent producer keyed by `customer_id`, pacing (`--rate`), shuffling
//! and looping, and the bad-lines file: a line that is not a JSON object with
//! `event_type`, `event_time` and `payload` is never sent, but written there with
//! its reason and counted. The pipeline, not the producer, judges everything else.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rdkafka::ClientContext;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::DeliveryResult;
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, ThreadedProducer};

use crate::source::KafkaConfig;
use crate::telemetry::Metrics;

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
}

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
    #[error("cannot create topic {topic}: {message}")]
    CreateTopic { topic: String, message: String },
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("broker unreachable at {0}: no metadata within 10s")]
    Unreachable(String),
}

/// Creates `topic` with `partitions` partitions unless it exists.
pub fn ensure_topic(kafka: &KafkaConfig, partitions: i32) -> Result<bool, ProduceError> {
    let admin: AdminClient<DefaultClientContext> = kafka.client_config().create()?;
    // Ask for all topics: a request naming the topic would auto-create it, with
    // the broker's default partition count, on brokers that allow that.
    let md = admin
        .inner()
        .fetch_metadata(None, Duration::from_secs(10))
        .map_err(|_| ProduceError::Unreachable(kafka.brokers.clone()))?;
    if md
        .topics()
        .iter()
        .any(|t| t.name() == kafka.topic && t.error().is_none() && !t.partitions().is_empty())
    {
        return Ok(false);
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
    Ok(true)
}

struct DeliveryCounter {
    ok: AtomicU64,
    failed: AtomicU64,
    metrics: Arc<Metrics>,
}

impl ClientContext for DeliveryCounter {}

impl ProducerContext for DeliveryCounter {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => {
                self.ok.fetch_add(1, Ordering::Relaxed);
            }
            Err((e, _)) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "delivery failed");
            }
        }
    }
}

/// Why a line is not sent.
pub fn check_line(line: &str) -> Result<Option<String>, &'static str> {
    if line.trim().is_empty() {
        return Err("empty_line");
    }
    let v: serde_json::Value = serde_json::from_str(line).map_err(|_| "invalid_json")?;
    let obj = v.as_object().ok_or("not_object")?;
    for k in ["event_type", "event_time", "payload"] {
        if !obj.contains_key(k) {
            return Err("missing_top_level_key");
        }
    }
    let key = obj
        .get("payload")
        .and_then(|p| p.get("customer_id"))
        .and_then(|c| c.as_str())
        .map(str::to_string);
    Ok(key)
}

/// Replays the file; returns when done (or, with `repeat`, when `stop` is set).
pub fn produce(
    cfg: &ProduceConfig,
    stop: &AtomicBool,
    metrics: Arc<Metrics>,
) -> Result<ProduceSummary, ProduceError> {
    let input_err = |source| ProduceError::Input {
        path: cfg.input.display().to_string(),
        source,
    };
    // Open the input before touching the broker, so a typo fails fast.
    File::open(&cfg.input).map_err(input_err)?;
    ensure_topic(&cfg.kafka, cfg.partitions)?;

    let ctx = DeliveryCounter {
        ok: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        metrics: metrics.clone(),
    };
    let mut c = cfg.kafka.client_config();
    c.set("enable.idempotence", "true")
        .set("linger.ms", "10")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "200000");
    for (k, v) in &cfg.kafka.options {
        c.set(k, v);
    }
    let producer: ThreadedProducer<DeliveryCounter> = c.create_with_context(ctx)?;
    let bad_path = cfg.bad_lines.display().to_string();
    let mut bad_out: Option<BufWriter<File>> = None;
    let mut summary = ProduceSummary::default();
    let started = Instant::now();
    let mut offered: u64 = 0;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);

    'outer: loop {
        let lines: Box<dyn Iterator<Item = std::io::Result<String>>> = if cfg.shuffle {
            let mut all: Vec<String> = read_lines(&cfg.input)
                .map_err(input_err)?
                .collect::<Result<_, _>>()
                .map_err(input_err)?;
            all.shuffle(&mut rng);
            Box::new(all.into_iter().map(Ok))
        } else {
            Box::new(read_lines(&cfg.input).map_err(input_err)?)
        };
        for (n, line) in lines.enumerate() {
            if stop.load(Ordering::Relaxed) {
                break 'outer;
            }
            let line = line.map_err(input_err)?;
            let key = match check_line(&line) {
                Ok(k) => k,
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
                    let record = serde_json::json!({"line": n + 1, "reason": reason, "text": line});
                    writeln!(out, "{record}").map_err(|source| ProduceError::BadLines {
                        path: bad_path.clone(),
                        source,
                    })?;
                    continue;
                }
            };
            if let Some(rate) = cfg.rate {
                let due = Duration::from_secs_f64(offered as f64 / rate.max(0.001));
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    std::thread::sleep(wait);
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
                        tracing::warn!(error = %e, "send failed");
                        producer.context().failed.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                }
            }
            offered += 1;
        }
        if !cfg.repeat {
            break;
        }
    }
    if let Some(mut o) = bad_out {
        o.flush().map_err(|source| ProduceError::BadLines {
            path: bad_path.clone(),
            source,
        })?;
    }
    producer.flush(Duration::from_secs(60))?;
    let ctx = producer.context();
    summary.sent = ctx.ok.load(Ordering::Relaxed);
    summary.failed = ctx.failed.load(Ordering::Relaxed)
        + offered.saturating_sub(summary.sent + ctx.failed.load(Ordering::Relaxed));
    summary.elapsed = started.elapsed();
    ctx.metrics
        .producer_sent
        .with_label_values(&["ok"])
        .inc_by(summary.sent);
    ctx.metrics
        .producer_sent
        .with_label_values(&["failed"])
        .inc_by(summary.failed);
    Ok(summary)
}

fn read_lines(path: &Path) -> std::io::Result<impl Iterator<Item = std::io::Result<String>>> {
    Ok(BufReader::new(File::open(path)?).lines())
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(check_line("[1]"), Err("not_object"));
        assert_eq!(
            check_line(r#"{"event_type":"x","payload":{}}"#),
            Err("missing_top_level_key")
        );
    }
}
