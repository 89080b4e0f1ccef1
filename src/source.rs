//! Source: the Kafka consumer-group member.
//!
//! It owns the rdkafka consumer and the answer to "which partitions do I own,
//! and from which offset". Offsets are never taken from Kafka: when partitions
//! are assigned, the source asks the [`OffsetLoader`] (Postgres, via the
//! pipeline) and assigns each partition at its stored offset, or at the
//! beginning when none is stored. Before it reads on, the message just before
//! the stored offset must match the row written from it, so that a log that
//! is not the one the offsets count (a topic created again) is never skipped
//! into. Auto-commit and the auto offset store are off; the Kafka group
//! commit is only a copy for lag tools.
//!
//! Ownership is versioned by a generation number that every rebalance bumps.
//! The revoke callback takes the commit gate first, so it waits for an
//! in-flight Postgres COMMIT to finish, and no batch read under an older
//! generation can commit afterwards (the pipeline checks under the same gate).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::BorrowedMessage;
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Message};

use crate::telemetry::{Health, Metrics, kafka_error};

/// Kafka settings; part of [`crate::config`].
#[derive(Clone)]
pub struct KafkaConfig {
    pub brokers: String,
    pub topic: String,
    pub group_id: String,
    /// Passed to librdkafka as they are (SASL, TLS, fetch tuning...). They may
    /// hold secrets, so they are never logged.
    pub options: Vec<(String, String)>,
}

impl std::fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("topic", &self.topic)
            .field("group_id", &self.group_id)
            .field(
                "options",
                &self.options.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// The text of an error creating a Kafka client, without the option's value.
///
/// librdkafka refuses an option it does not know (a typo such as
/// `sasl.passwrod`) or does not support in this build with an error that
/// carries the value, and the rdkafka crate prints it: the secret a
/// `KAFKA_OPT_*_FILE` held would end up on stderr and in the logs.
pub fn config_error(e: &KafkaError) -> String {
    match e {
        KafkaError::ClientConfig(_, desc, key, value) => {
            let desc = if value.is_empty() {
                desc.clone()
            } else {
                desc.replace(value.as_str(), "…")
            };
            format!("{desc} (option {key}; its value is not shown)")
        }
        other => other.to_string(),
    }
}

impl KafkaConfig {
    /// The base librdkafka configuration with the user's options applied last.
    pub fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers);
        for (k, v) in &self.options {
            c.set(k, v);
        }
        c.set_log_level(RDKafkaLogLevel::Warning);
        c
    }
}

/// Reads the stored next offsets of the topic's partitions. Blocking: it is
/// called from the rebalance callback on the intake thread.
pub trait OffsetLoader: Send + Sync {
    fn load(&self) -> Result<HashMap<i32, StoredOffset>, String>;
}

/// A partition's offset as Postgres stores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredOffset {
    /// The next offset to consume: the last one written + 1.
    pub next: i64,
    /// The message at `next - 1`, as it was consumed; None when not recorded
    /// (stored by an older version), so the log cannot be compared with it.
    pub last_written: Option<LastWritten>,
}

/// The last message consumed from a partition, as stored with its offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LastWritten {
    /// Its Kafka timestamp in milliseconds (None: it had none).
    pub timestamp_ms: Option<i64>,
    /// [`fingerprint`] of its value.
    pub fingerprint: i64,
}

/// A stable hash of a message's value (None: a tombstone): the first 8 bytes
/// of the SHA-256 of a tag byte and the value. Computed once per partition
/// and batch, and once per assignment: never per message.
pub fn fingerprint(value: Option<&[u8]>) -> i64 {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    match value {
        None => h.update([0u8]),
        Some(v) => {
            h.update([1u8]);
            h.update(v);
        }
    }
    let digest = h.finalize();
    i64::from_be_bytes(digest[..8].try_into().expect("a SHA-256 has 32 bytes"))
}

/// Shared between the intake thread (rebalance callbacks) and the writer.
pub struct Ownership {
    generation: AtomicU64,
    /// Held by the writer from its ownership check through COMMIT, and by the
    /// revoke callback while it bumps the generation.
    pub gate: tokio::sync::Mutex<()>,
    /// Per assigned partition: the next offset stored in Postgres as far as this
    /// consumer knows (None: nothing stored yet). Batches are fenced on it.
    positions: Mutex<HashMap<i32, Option<i64>>>,
    /// Per assigned partition: the next offset committed to Postgres (None:
    /// nothing yet). Unlike `positions`, which moves when a batch is cut,
    /// this moves at COMMIT: the lag counts from it.
    committed: Mutex<HashMap<i32, Option<i64>>>,
    /// Per assigned partition: the offset the next delivered message must have.
    cursors: Mutex<HashMap<i32, Cursor>>,
    resync: AtomicBool,
    stop: AtomicBool,
    /// Since when the last assignment has been an empty one (the group's
    /// other members own every partition); None while one is held, before
    /// the first, and between a revocation and the next.
    idle_since: Since,
    /// Since when the consumer has waited for an assignment, from joining
    /// the group or from a revocation (a rebalance under way); None otherwise.
    revoked_since: Since,
    /// Since the subscription, until the group's first assignment (an
    /// empty one too). Unlike `revoked_since`, neither a revocation nor the
    /// stuck-rebalance note starts it again.
    unassigned_since: Since,
}

/// Since when a condition has held; None while it does not.
#[derive(Default)]
struct Since(Mutex<Option<Instant>>);

impl Since {
    /// Starts the clock when `holds`, stops it otherwise.
    fn set(&self, holds: bool) {
        *self.0.lock().expect("since lock") = holds.then(Instant::now);
    }

    fn elapsed(&self) -> Option<Duration> {
        self.0.lock().expect("since lock").map(|t| t.elapsed())
    }
}

/// Where a partition's delivery stands, so that the source hands on each
/// offset once and in order, whatever the broker sends.
#[derive(Debug, Clone, Copy)]
struct Cursor {
    /// The offset we want next (None: from the beginning, whatever it is).
    next: Option<i64>,
    /// The previous message of this partition was below `next`, i.e. the
    /// broker is sending contiguously from before the wanted offset.
    prev_below: bool,
    /// How far before `next` the last corrective seek went.
    back: i64,
    /// When the broker last sent this partition anything (or when it was
    /// assigned or sought): a long silence while behind is a stall.
    heard_at: Instant,
    /// The last offset the broker sent for this partition, kept or dropped.
    last_seen: Option<i64>,
    /// A stall was looked into and nothing deliverable is missing: the offsets
    /// up to the high watermark are not messages (transaction markers).
    settled: bool,
    /// The message at `next - 1` as written to Postgres, until the broker
    /// has sent it again and it matched: see [`Cursor::judge_message`].
    verify: Option<LastWritten>,
    /// The log did not match: nothing of this partition is handed on.
    refused: bool,
}

/// What to do with one delivered message.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Accept,
    /// Already handed on (a broker re-delivered it): drop it.
    Redelivered,
    /// The broker skipped past the wanted offset: seek to this offset and drop
    /// what comes before the wanted one.
    SeekBack(i64),
    /// The message at `offset` is not the one written to Postgres from it.
    OtherLog {
        offset: i64,
        written: Option<i64>,
        found: Option<i64>,
    },
}

impl Cursor {
    fn at(next: Option<i64>) -> Self {
        Cursor {
            next,
            prev_below: false,
            back: 0,
            heard_at: Instant::now(),
            last_seen: None,
            settled: false,
            verify: None,
            refused: false,
        }
    }

    /// [`Cursor::judge`], after comparing the log with Postgres. A stored
    /// offset alone cannot tell that the partition's log is another one
    /// (the topic deleted and created again, a mirror, a broker that lost
    /// its log) once that log has grown past the offset: reading on would
    /// skip its first messages as written, silently. So the partition is
    /// assigned one message early, and that message's Kafka timestamp and
    /// value must be those of the last one consumed. Others give
    /// [`Verdict::OtherLog`], and nothing of the partition is handed on
    /// after it. A message that is gone (retention, compaction) leaves
    /// nothing to compare: reading goes on.
    fn judge_message(
        &mut self,
        offset: i64,
        timestamp_ms: Option<i64>,
        value: Option<&[u8]>,
        now: Instant,
        erroring: bool,
    ) -> Verdict {
        if self.refused {
            self.heard_at = now;
            return Verdict::Redelivered;
        }
        if let (Some(written), Some(next)) = (self.verify, self.next) {
            let before = next - 1;
            if offset == before {
                self.heard_at = now;
                self.last_seen = Some(offset);
                self.prev_below = true;
                self.verify = None;
                if timestamp_ms != written.timestamp_ms || fingerprint(value) != written.fingerprint
                {
                    self.refused = true;
                    return Verdict::OtherLog {
                        offset,
                        written: written.timestamp_ms,
                        found: timestamp_ms,
                    };
                }
                return Verdict::Redelivered;
            }
            if offset > before && !self.prev_below && before - self.back > 0 {
                // The broker started past it: look back, as for a skipped one.
                self.heard_at = now;
                self.last_seen = Some(offset);
                return Verdict::SeekBack(self.step_back(before, 0));
            }
            if offset > before {
                self.verify = None;
            }
        }
        self.judge(offset, now, erroring)
    }

    /// The broker has been silent although the partition holds offsets at or
    /// past `next` (`high` is its high watermark). With tansu this happens when
    /// `next` lies inside the last stored record batch: there is no next batch
    /// to answer with, so no message ever arrives to trigger [`Cursor::judge`]'s
    /// seek-back. Returns where to seek, or None when nothing is missing.
    fn stalled(&mut self, low: i64, high: i64) -> Option<i64> {
        // From the beginning the fetch starts at a batch start; nothing to fix.
        let next = self.next?;
        if next >= high || self.settled {
            return None;
        }
        // The broker sent everything up to `next - 1` and then nothing, or we
        // already looked back to the start: what is left up to the high
        // watermark is not messages (Kafka's transaction markers count as
        // offsets). Stop looking, or every quiet moment would re-read the log.
        if self.last_seen == Some(next - 1) || (self.back > 0 && next - self.back <= low) {
            self.settled = true;
            return None;
        }
        self.heard_at = Instant::now();
        Some(self.step_back(next, low))
    }

    /// The message to compare (see [`Cursor::judge_message`]) has not come
    /// and the partition is silent: tansu answers nothing for a fetch inside
    /// its last record batch. Returns where to look back for it, as for a
    /// stall; None once it is known to be gone (below the log's start, or not
    /// there after looking back to it), and then there is nothing to compare.
    fn look_for_written(&mut self, low: i64) -> Option<i64> {
        let before = self.next? - 1;
        if before < low || (self.back > 0 && before - self.back <= low) {
            self.verify = None;
            return None;
        }
        self.heard_at = Instant::now();
        Some(self.step_back(before, low))
    }

    /// One more look back before `from`, four times as far as the last (16
    /// offsets at first), never below `low` or 0: where to seek.
    fn step_back(&mut self, from: i64, low: i64) -> i64 {
        self.back = (self.back * 4).max(16);
        (from - self.back).max(low).max(0)
    }

    /// Some brokers (tansu's memory engine among them) answer a fetch from an
    /// offset inside a stored record batch with the *next* batch, silently
    /// skipping the rest of the one asked for, and re-send batches they already
    /// sent. Kafka returns the whole containing batch and the client drops the
    /// head. A fetch starts mid-batch after an assignment, a seek, or a
    /// pause/resume, so the rule is general: drop what is below `next`; when a
    /// message lands beyond `next`, seek back (doubling the distance) until the
    /// broker sends from at or before `next`. A gap is real (compaction,
    /// transaction markers) only when the broker sent a message below `next`
    /// and then one above it, or when seeking back to 0 did not close it, and
    /// never while `erroring` (librdkafka reports consumption errors): the
    /// gap may then be a batch it failed to read, so it seeks to `next` again.
    fn judge(&mut self, offset: i64, now: Instant, erroring: bool) -> Verdict {
        self.heard_at = now;
        self.last_seen = Some(offset);
        let Some(next) = self.next else {
            self.next = Some(offset + 1);
            return Verdict::Accept;
        };
        if offset < next {
            self.prev_below = true;
            return Verdict::Redelivered;
        }
        if offset > next && !self.prev_below && next - self.back > 0 {
            // Start a few messages back: a skipped batch is usually far larger.
            return Verdict::SeekBack(self.step_back(next, 0));
        }
        if offset > next && erroring {
            // Start over from `next`, as if no message below it had come.
            self.prev_below = false;
            return Verdict::SeekBack(next);
        }
        self.next = Some(offset + 1);
        self.prev_below = false;
        self.back = 0;
        self.settled = false;
        Verdict::Accept
    }
}

impl Ownership {
    fn new() -> Self {
        Ownership {
            generation: AtomicU64::new(0),
            gate: tokio::sync::Mutex::new(()),
            positions: Mutex::new(HashMap::new()),
            committed: Mutex::new(HashMap::new()),
            cursors: Mutex::new(HashMap::new()),
            resync: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            idle_since: Since::default(),
            revoked_since: Since::default(),
            unassigned_since: Since::default(),
        }
    }

    /// How long the consumer has waited for an assignment since it joined
    /// the group or last had its partitions revoked; None once one came (an
    /// empty one too).
    pub fn revoked_for(&self) -> Option<Duration> {
        self.revoked_since.elapsed()
    }

    /// How long the consumer has waited for its first assignment since it
    /// joined the group; None once one came (an empty one too).
    pub fn unassigned_for(&self) -> Option<Duration> {
        self.unassigned_since.elapsed()
    }

    /// How long the last assignment, an empty one, has stood (see
    /// `idle_since`).
    pub fn idle_for(&self) -> Option<Duration> {
        self.idle_since.elapsed()
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Asks the intake thread to re-read offsets from Postgres and seek to them.
    pub fn request_resync(&self) {
        self.resync.store(true, Ordering::SeqCst);
    }

    /// Gives up every batch cut so far, as a new assignment does: the writer
    /// drops them instead of writing them, and the intake the one it builds.
    /// For the writer, once a batch is fenced: those after it chain on it.
    /// The intake's positions stay until the resync asked for before this.
    pub fn give_up_batches(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    pub fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// The expected stored offset of `partition`, then records `next` as the new one.
    pub fn advance(&self, partition: i32, next: i64) -> Option<i64> {
        let mut p = self.positions.lock().expect("positions lock");
        p.insert(partition, Some(next)).flatten()
    }

    /// Each assigned partition's next offset committed to Postgres (None:
    /// nothing stored yet).
    fn stored_positions(&self) -> HashMap<i32, Option<i64>> {
        self.committed.lock().expect("committed lock").clone()
    }

    /// Records offsets that a COMMIT stored, for the partitions still owned.
    fn note_committed(&self, offsets: &[(i32, i64)]) {
        let mut committed = self.committed.lock().expect("committed lock");
        for &(p, next) in offsets {
            if let Some(at) = committed.get_mut(&p) {
                *at = Some(at.map_or(next, |a| a.max(next)));
            }
        }
    }

    pub fn assigned(&self) -> Vec<i32> {
        let mut v: Vec<i32> = self
            .positions
            .lock()
            .expect("positions lock")
            .keys()
            .copied()
            .collect();
        v.sort_unstable();
        v
    }

    /// Sets a new assignment under the gate, so no batch of the previous one
    /// can commit. `verify`: the partitions whose log is compared with
    /// Postgres first ([`Cursor::judge_message`]).
    fn reassign(&self, positions: HashMap<i32, Option<i64>>, verify: &HashMap<i32, LastWritten>) {
        let _gate = self.gate.blocking_lock();
        self.generation.fetch_add(1, Ordering::SeqCst);
        *self.cursors.lock().expect("cursors lock") = positions
            .iter()
            .map(|(&p, &next)| {
                let mut c = Cursor::at(next);
                c.verify = verify.get(&p).copied();
                (p, c)
            })
            .collect();
        *self.committed.lock().expect("committed lock") = positions.clone();
        *self.positions.lock().expect("positions lock") = positions;
    }
}

/// Each assigned partition's stored offset (None: nothing stored), and the
/// partitions whose log is compared with Postgres first.
type Assignment = (HashMap<i32, Option<i64>>, HashMap<i32, LastWritten>);

pub struct SourceContext {
    topic: String,
    ownership: Arc<Ownership>,
    loader: Box<dyn OffsetLoader>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    /// The Kafka client's errors: a broker that refuses connections reports
    /// one every few hundred milliseconds.
    client_errors: Mutex<ErrorLog>,
}

/// The last of a stream of errors, and which of them to log: one line per
/// [`CONSUME_ERROR_LOG_EVERY`], with a count of those in between.
#[derive(Default)]
pub(crate) struct ErrorLog {
    last: Option<String>,
    logged_at: Option<Instant>,
    unlogged: u64,
}

impl ErrorLog {
    /// Records `text`; Some(how many went unlogged before it) when it is to
    /// be logged.
    pub(crate) fn note(&mut self, text: String) -> Option<u64> {
        self.last = Some(text);
        if log_due(&mut self.logged_at) {
            Some(std::mem::take(&mut self.unlogged))
        } else {
            self.unlogged += 1;
            None
        }
    }
}

impl SourceContext {
    /// Sets this consumer's assignment ([`Ownership::reassign`]) and its
    /// partition count, which is what tells a member the group left idle
    /// (no lag series, nothing to commit) from one keeping up.
    fn own(&self, positions: HashMap<i32, Option<i64>>, verify: &HashMap<i32, LastWritten>) {
        // Idle only by an assignment given empty (see the rebalance
        // callback), not by a revocation or an error.
        self.ownership.idle_since.set(false);
        let count = positions.len() as i64;
        self.ownership.reassign(positions, verify);
        self.metrics.assigned_partitions.set(count);
    }

    /// Loads stored offsets, retrying while Postgres is away (unless stopping).
    fn stored_offsets(&self) -> Option<HashMap<i32, StoredOffset>> {
        let mut backoff = Duration::from_millis(200);
        loop {
            match self.loader.load() {
                Ok(m) => return Some(m),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read stored offsets from Postgres; retrying");
                    self.health.postgres_ok.store(false, Ordering::Relaxed);
                    if self.ownership.stop_requested() {
                        return None;
                    }
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Points every partition of `tpl` at its stored offset, or one message
    /// before it when Postgres holds that message to compare the log with.
    /// Returns each partition's stored offset, and the messages to compare.
    fn position(&self, tpl: &mut TopicPartitionList) -> Option<Assignment> {
        let stored = self.stored_offsets()?;
        let mut positions = HashMap::new();
        let mut verify = HashMap::new();
        for el in tpl.elements() {
            let p = el.partition();
            let s = stored.get(&p);
            positions.insert(p, s.map(|s| s.next));
            if let Some(&StoredOffset {
                next,
                last_written: Some(last),
            }) = s
                && next > 0
            {
                verify.insert(p, last);
            }
        }
        for (&p, &s) in &positions {
            let offset = match s {
                None => Offset::Beginning,
                Some(next) if verify.contains_key(&p) => Offset::Offset(next - 1),
                Some(next) => Offset::Offset(next),
            };
            if let Err(e) = tpl.set_partition_offset(&self.topic, p, offset) {
                tracing::warn!(partition = p, error = %e, "cannot set start offset");
            }
        }
        Some((positions, verify))
    }
}

impl ClientContext for SourceContext {
    fn stats(&self, stats: Statistics) {
        // Losing every broker is reported (AllBrokersDown); getting one back
        // is not, and an idle consumer receives nothing else that would say
        // so: /readyz stayed false after a short outage until data came.
        if a_broker_is_up(&stats) {
            self.health.kafka_ok.store(true, Ordering::Relaxed);
        }
        // The lag is what is not in Postgres yet: counted from the offsets
        // stored there, which librdkafka does not know (it counted from the
        // group's copy or what it handed on, and skipped a partition just
        // assigned, before either existed).
        let stored = self.ownership.stored_positions();
        for (topic, t) in &stats.topics {
            for (p, s) in &t.partitions {
                if *p < 0 || !s.desired {
                    continue;
                }
                let Some(position) = stored.get(p) else {
                    continue;
                };
                let Some(lag) = partition_lag(s.hi_offset, position.unwrap_or(s.lo_offset)) else {
                    continue;
                };
                self.metrics
                    .consumer_lag
                    .with_label_values(&[topic.as_str(), &p.to_string()])
                    .set(lag);
            }
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        // Some brokers' end-of-partition notices arrive here as well as through poll.
        if let Some(rdkafka::types::RDKafkaErrorCode::PartitionEOF) = error.rdkafka_error_code() {
            return;
        }
        note_client_error(
            &error,
            reason,
            &self.health,
            &self.metrics,
            &self.client_errors,
        );
    }
}

impl ConsumerContext for SourceContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let Some((positions, verify)) = self.position(tpl) else {
                    // Stopping while Postgres is away: own nothing, read nothing.
                    self.own(HashMap::new(), &HashMap::new());
                    let _ = consumer.assign(&TopicPartitionList::new());
                    return;
                };
                let mut parts: Vec<_> = positions.iter().collect();
                parts.sort();
                let numbers: Vec<i32> = parts.iter().map(|(p, _)| **p).collect();
                let from: Vec<_> = parts.iter().map(|(_, o)| **o).collect();
                if numbers.is_empty() {
                    tracing::info!(
                        "no partitions assigned: this consumer reads nothing until a rebalance gives it some (a group with more members than the topic has partitions leaves some idle; a topic that is gone leaves all idle)"
                    );
                } else {
                    tracing::info!(partitions = ?numbers, stored_offsets = ?from, "partitions assigned; resuming from offsets stored in Postgres");
                }
                self.own(positions, &verify);
                self.ownership.idle_since.set(numbers.is_empty());
                self.ownership.revoked_since.set(false);
                self.ownership.unassigned_since.set(false);
                if !self.health.in_group.swap(true, Ordering::Relaxed) {
                    tracing::info!("the group has assigned partitions again");
                }
                if let Err(e) = consumer.assign(tpl) {
                    tracing::error!(error = %e, "assign failed");
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                // Logged once the gate is taken: no commit of these partitions
                // lands after this line (the rebalance storm test relies on it).
                self.own(HashMap::new(), &HashMap::new());
                self.ownership.revoked_since.set(true);
                let mut numbers: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
                numbers.sort_unstable();
                tracing::info!(
                    partitions = ?numbers,
                    "partitions revoked; uncommitted batches of them are dropped"
                );
                for el in tpl.elements() {
                    let _ = self
                        .metrics
                        .consumer_lag
                        .remove_label_values(&[el.topic(), &el.partition().to_string()]);
                }
                if let Err(e) = consumer.unassign() {
                    tracing::error!(error = %e, "unassign failed");
                }
            }
            other => {
                tracing::error!(error = ?other, "rebalance error; dropping the assignment");
                self.own(HashMap::new(), &HashMap::new());
                self.ownership.revoked_since.set(true);
                let _ = consumer.unassign();
            }
        }
    }
}

/// How long [`KafkaSource::compare_group_offsets`] waits for the broker.
const GROUP_OFFSETS_LIMIT: Duration = Duration::from_secs(2);

/// A partition's lag: its high watermark less the position, or None while
/// either is unknown (librdkafka reports -1 and -1001 for those).
fn partition_lag(high: i64, position: i64) -> Option<i64> {
    (high >= 0 && position >= 0).then(|| (high - position).max(0))
}

/// How long a consumption error keeps partitions that are behind from
/// counting as caught up or settled. librdkafka retries a failing fetch every
/// `fetch.error.backoff.ms` (500 ms by default), so a persisting error is seen
/// again well within it; one that went away releases the hold soon after.
const CONSUME_ERROR_HOLD: Duration = Duration::from_secs(5);

/// At most one warning per this, with the count of what it left out.
const CONSUME_ERROR_LOG_EVERY: Duration = Duration::from_secs(30);

/// Whether an error that poll returned means that some partition's data could
/// not be read: a broker's error for a fetch (positive codes, which librdkafka
/// passes on per partition: corrupt message, unsupported compression, not
/// authorized...) or a record batch the client could not parse or decompress.
/// Client-level errors (a broker unreachable, a name that does not resolve) are
/// not: they hold no data back for good, and one broker of a cluster that stays
/// down would otherwise hold every partition, and every real gap (transaction
/// markers), as long as it stays down. Nor is a reset to the earliest offset
/// after retention deleted what was wanted: the gap it leaves is real.
fn is_read_failure(code: rdkafka::types::RDKafkaErrorCode) -> bool {
    use rdkafka::types::RDKafkaErrorCode as Code;
    code as i32 > 0 || matches!(code, Code::BadMessage | Code::BadCompression)
}

/// A Kafka client's error, for the consumer and the producer alike: losing
/// every broker makes the process not ready; each error is counted, and
/// logged at most once per [`CONSUME_ERROR_LOG_EVERY`] (a refused broker
/// reports several a second).
pub(crate) fn note_client_error(
    error: &KafkaError,
    reason: &str,
    health: &Health,
    metrics: &Metrics,
    log: &Mutex<ErrorLog>,
) {
    if error.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::AllBrokersDown) {
        health.kafka_ok.store(false, Ordering::Relaxed);
    }
    let kind = error_kind(error.rdkafka_error_code());
    metrics.kafka_errors.with_label_values(&[kind]).inc();
    let logged = log
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .note(format!("{error} ({reason})"));
    if let Some(unlogged) = logged {
        tracing::warn!(error = %error, reason, unlogged, "kafka client error");
    }
}

/// Whether the client holds a working connection to a real broker (not
/// the internal or bootstrap-only entries librdkafka also lists).
pub(crate) fn a_broker_is_up(stats: &Statistics) -> bool {
    stats
        .brokers
        .values()
        .any(|b| matches!(b.source.as_str(), "learned" | "configured") && b.state == "UP")
}

/// The `kind` label of `energy_stream_kafka_errors_total` for a client error.
fn error_kind(code: Option<rdkafka::types::RDKafkaErrorCode>) -> &'static str {
    use rdkafka::types::RDKafkaErrorCode as Code;
    match code {
        Some(Code::AllBrokersDown) => kafka_error::ALL_BROKERS_DOWN,
        Some(Code::BrokerTransportFailure) => kafka_error::TRANSPORT,
        Some(c) if is_read_failure(c) => kafka_error::CONSUME,
        _ => kafka_error::OTHER,
    }
}

/// True, and starts the wait over, when `last` is unset or at least
/// [`CONSUME_ERROR_LOG_EVERY`] ago: a rate limit for warnings.
fn log_due(last: &mut Option<Instant>) -> bool {
    if last.is_some_and(|t| t.elapsed() < CONSUME_ERROR_LOG_EVERY) {
        return false;
    }
    *last = Some(Instant::now());
    true
}

/// The read failures librdkafka reported through poll (see
/// [`is_read_failure`]): when the last one came, and the last error of any
/// kind, for the logs, with how many went unlogged.
struct ConsumeErrors {
    started: Instant,
    /// Milliseconds after `started` of the last error, plus one (0: none).
    /// Read on every message, so an atomic rather than the lock below.
    last_ms: AtomicU64,
    log: Mutex<ConsumeErrorLog>,
}

#[derive(Default)]
struct ConsumeErrorLog {
    errors: ErrorLog,
    behind_warned_at: Option<Instant>,
}

impl ConsumeErrors {
    fn new() -> Self {
        ConsumeErrors {
            started: Instant::now(),
            last_ms: AtomicU64::new(0),
            log: Mutex::new(ConsumeErrorLog::default()),
        }
    }

    fn note(&self, e: &KafkaError, metrics: &Metrics) {
        let code = e.rdkafka_error_code();
        metrics
            .kafka_errors
            .with_label_values(&[error_kind(code)])
            .inc();
        if code.is_some_and(is_read_failure) {
            let ms = self.started.elapsed().as_millis() as u64 + 1;
            self.last_ms.store(ms, Ordering::Relaxed);
        }
        let logged = self
            .log
            .lock()
            .expect("consume error log")
            .errors
            .note(e.to_string());
        if let Some(earlier_unlogged) = logged {
            tracing::warn!(error = %e, earlier_unlogged, "consumer error");
        }
    }

    /// True while the last error is younger than [`CONSUME_ERROR_HOLD`].
    fn recent(&self) -> bool {
        match self.last_ms.load(Ordering::Relaxed) {
            0 => false,
            ms => {
                let at = self.started + Duration::from_millis(ms - 1);
                at.elapsed() < CONSUME_ERROR_HOLD
            }
        }
    }

    fn last_text(&self) -> String {
        self.log
            .lock()
            .expect("consume error log")
            .errors
            .last
            .clone()
            .unwrap_or_default()
    }

    /// Rate-limits the "behind while erroring" warning of check_progress.
    fn should_warn_behind(&self) -> bool {
        log_due(&mut self.log.lock().expect("consume error log").behind_warned_at)
    }
}

/// One consumed message, as the pipeline needs it.
pub enum Polled<'a> {
    Message(BorrowedMessage<'a>),
    /// The partition has no more messages right now.
    PartitionEof(i32),
    Idle,
}

pub struct KafkaSource {
    consumer: BaseConsumer<SourceContext>,
    /// Re-delivered messages dropped since the last [`KafkaSource::take_dropped`].
    dropped: std::sync::atomic::AtomicU64,
    /// Read failures (a fetch or a record batch that librdkafka could not
    /// deliver). librdkafka does not say which partition, so while any is
    /// recent no partition that is behind counts as caught up or as settled,
    /// and no gap is accepted: see [`KafkaSource::check_progress`].
    consume_errors: ConsumeErrors,
    ownership: Arc<Ownership>,
    topic: String,
    health: Arc<Health>,
    /// A partition whose log is not the one Postgres counts, found by the
    /// poll; [`KafkaSource::check_progress`] reports it.
    refusal: Mutex<Option<SourceError>>,
    /// While the assignment is an empty one: when the other members' stored
    /// offsets were last looked at, and the partitions then behind with
    /// their stored offsets (see [`KafkaSource::rejoin_if_orphaned`]).
    orphan_check: Mutex<Option<(Instant, HashMap<i32, i64>)>>,
    /// The ownership generation whose assignment was last compared with the
    /// group's offsets ([`KafkaSource::compare_group_offsets`]).
    group_compared: AtomicU64,
    /// See [`KafkaSource::watch_stalls`].
    stall_check: Mutex<StallCheck>,
}

/// When the topic's stored offsets were last looked at, the partitions then
/// behind with their stored offsets, and those found stalled.
#[derive(Default)]
struct StallCheck {
    looked: Option<Instant>,
    behind: Option<HashMap<i32, i64>>,
    stalled: Vec<i32>,
}

/// A Kafka timestamp as the error messages show it.
fn kafka_time(ms: Option<i64>) -> String {
    match ms {
        None => "no timestamp".to_string(),
        Some(ms) => chrono::DateTime::from_timestamp_millis(ms)
            .map_or_else(|| format!("{ms} ms"), |t| t.to_rfc3339()),
    }
}

/// Errors creating or running the consumer.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The offset stored in Postgres lies past the end of the partition's
    /// log: the topic was deleted and created again, truncated, or is another
    /// cluster's. Reading on would drop every message below the stored
    /// offset as already written, silently, and reading from the start would
    /// collide with the rows of the old log.
    #[error(
        "partition {partition} of {topic}: the offset stored in Postgres is {stored}, but the partition ends at {end} (as the broker reports it). \
         The topic was deleted and created again, truncated, or is another cluster's; nothing of it is skipped or written. \
         To load it from its start, remove this group's rows for the topic from consumer_offsets, \
         and the topic's old rows from events and rejected_events (README: Starting a topic over)"
    )]
    PastEnd {
        topic: String,
        partition: i32,
        stored: i64,
        end: i64,
    },
    /// The log has grown past the stored offset, but the message just
    /// before it is not the one written from it: see [`Cursor::judge_message`].
    #[error(
        "partition {partition} of {topic}: the message at offset {offset} is not the one written to Postgres from that offset \
         (its value or its Kafka timestamp differs: {found}, against {written} when it was written). The topic was deleted and created again, \
         or is another cluster's, or the broker lost its log, and the new log has grown past the offset stored in Postgres; nothing of it is skipped or written. \
         To load it from its start, remove this group's rows for the topic from consumer_offsets, \
         and the topic's old rows from events and rejected_events (README: Starting a topic over)"
    )]
    OtherLog {
        topic: String,
        partition: i32,
        offset: i64,
        written: String,
        found: String,
    },
    /// Built by [`config_error`], which leaves out the option's value.
    #[error("invalid Kafka configuration: {0}")]
    Config(String),
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error(
        "{0} is not supported: ownership is versioned per (eager) rebalance; use the classic group protocol with the range or roundrobin assignor"
    )]
    Cooperative(&'static str),
}

impl KafkaSource {
    pub fn new(
        cfg: &KafkaConfig,
        loader: Box<dyn OffsetLoader>,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
    ) -> Result<Self, SourceError> {
        let ownership = Arc::new(Ownership::new());
        let ctx = SourceContext {
            topic: cfg.topic.clone(),
            ownership: ownership.clone(),
            loader,
            metrics,
            health: health.clone(),
            client_errors: Mutex::new(ErrorLog::default()),
        };
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &cfg.brokers)
            .set("group.id", &cfg.group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "true")
            .set("statistics.interval.ms", "5000")
            // Bounded prefetch, so that memory stays flat while the writer
            // waits for Postgres: at most 4 MiB of messages queued per
            // partition (it may overshoot by one fetch), fetch responses of
            // at most 16 MiB (librdkafka's default is 50 MiB, and a
            // response's buffer lives as long as any of its messages).
            // A partition whose queue is full waits fetch.queue.backoff.ms
            // before its next fetch: librdkafka's 1 s default held the
            // intake to ~25 k events/s with queues this small (BENCHMARKS.md).
            .set("queued.max.messages.kbytes", "4096")
            .set("fetch.queue.backoff.ms", "20")
            .set("fetch.max.bytes", "16777216")
            .set("fetch.message.max.bytes", "4194304")
            // A broker that holds a fetch for its whole wait (tansu does)
            // delivers a message about two waits after it was produced: 210 ms
            // at 100 ms, 31 ms at 10 ms (BENCHMARKS.md). Kafka answers as soon
            // as data arrives, so there this only sets how often an idle
            // consumer asks: 100 times a second is nothing to a broker. At 25
            // ms the bench's steady-state p99 was 725-890 ms over four runs,
            // at 10 ms 742 and 747 (target 750).
            .set("fetch.wait.max.ms", "10")
            .set("session.timeout.ms", "10000")
            .set("heartbeat.interval.ms", "1000");
        for (k, v) in &cfg.options {
            c.set(k, v);
        }
        eager_rebalances(&c)?;
        c.set_log_level(RDKafkaLogLevel::Warning);
        let consumer: BaseConsumer<SourceContext> = c
            .create_with_context(ctx)
            .map_err(|e| SourceError::Config(config_error(&e)))?;
        Ok(KafkaSource {
            consumer,
            dropped: std::sync::atomic::AtomicU64::new(0),
            consume_errors: ConsumeErrors::new(),
            ownership,
            topic: cfg.topic.clone(),
            health,
            refusal: Mutex::new(None),
            orphan_check: Mutex::new(None),
            group_compared: AtomicU64::new(u64::MAX),
            stall_check: Mutex::new(StallCheck::default()),
        })
    }

    pub fn ownership(&self) -> Arc<Ownership> {
        self.ownership.clone()
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The Kafka client's last error, for a line that says why it waits.
    pub fn last_client_error(&self) -> Option<String> {
        self.consumer
            .context()
            .client_errors
            .lock()
            .expect("client error log")
            .last
            .clone()
    }

    /// Serves the client's events (its errors) without consuming: before the
    /// subscription, nothing else would, and its errors would wait unseen.
    pub fn serve_events(&self) {
        let _ = self.consumer.poll(Duration::from_millis(100));
    }

    /// Whether the topic has been found, for readiness: a consumer waiting
    /// for its topic reads nothing.
    pub fn note_topic_found(&self, found: bool) {
        self.health.topic_ok.store(found, Ordering::Relaxed);
    }

    /// True when the broker knows the topic. Errors (broker away) count as "not yet".
    pub fn topic_exists(&self) -> bool {
        self.partitions().is_some_and(|p| !p.is_empty())
    }

    /// The topic's partitions as the broker lists them now; None when it
    /// does not answer or reports an error for the topic.
    fn partitions(&self) -> Option<Vec<i32>> {
        match self
            .consumer
            .fetch_metadata(Some(&self.topic), Duration::from_secs(5))
        {
            Ok(md) => {
                self.health.kafka_ok.store(true, Ordering::Relaxed);
                md.topics()
                    .iter()
                    .find(|t| t.name() == self.topic && t.error().is_none())
                    .map(|t| t.partitions().iter().map(|p| p.id()).collect())
            }
            Err(e) => {
                tracing::debug!(error = %e, "metadata request failed");
                None
            }
        }
    }

    /// The topic's partitions this consumer does not own, as the broker
    /// lists them now; None when the broker does not answer.
    pub fn unowned_partitions(&self) -> Option<Vec<i32>> {
        let owned = self.ownership.assigned();
        let mut unowned: Vec<i32> = self
            .partitions()?
            .into_iter()
            .filter(|p| !owned.contains(p))
            .collect();
        unowned.sort_unstable();
        Some(unowned)
    }

    pub fn subscribe(&self) -> Result<(), SourceError> {
        self.consumer.subscribe(&[&self.topic])?;
        // The first assignment is waited for as one after a revocation.
        self.ownership.revoked_since.set(true);
        self.ownership.unassigned_since.set(true);
        Ok(())
    }

    /// A member given an empty assignment waits for the members that own the
    /// partitions. When one of them is dead and the broker never takes its
    /// partitions back (tansu, when a consumer killed with SIGKILL was
    /// started again within its session timeout: the new one got nothing,
    /// and read nothing for as long as it ran), the stored offsets stop
    /// while messages wait. So once the assignment has been empty for
    /// `limit`, this looks every `limit` at the partitions that have
    /// messages past their offset stored in Postgres; when one of them has
    /// not moved since the last look, it leaves the group and joins it
    /// again, which starts a rebalance, as a restart would. A live owner
    /// that keeps up moves its offsets, and one held up (a Postgres lock)
    /// only goes through a rebalance.
    pub fn rejoin_if_orphaned(&self, limit: Duration) {
        let mut check = self.orphan_check.lock().expect("orphan check");
        if self.ownership.idle_for().is_none_or(|idle| idle < limit) {
            *check = None;
            return;
        }
        if check.as_ref().is_some_and(|(at, _)| at.elapsed() < limit) {
            return;
        }
        // Not knowing (Postgres or the broker away), nothing is concluded.
        let Some(behind) = self.behind(1) else {
            return;
        };
        let stuck: Vec<i32> = match check.take() {
            Some((_, before)) => {
                let mut stuck: Vec<i32> = behind
                    .iter()
                    .filter(|(p, next)| before.get(p) == Some(next))
                    .map(|(p, _)| *p)
                    .collect();
                stuck.sort_unstable();
                stuck
            }
            None => Vec::new(),
        };
        if stuck.is_empty() {
            *check = Some((Instant::now(), behind));
            return;
        }
        tracing::warn!(
            partitions = ?stuck,
            waited_secs = limit.as_secs(),
            "the group gave this consumer no partition, and these partitions have messages that no \
             member has committed for that long (their owner is probably gone, and the broker \
             kept it in the group): leaving the group and joining it again, to start a rebalance"
        );
        self.rejoin();
    }

    /// Once per assignment, warns of the assigned partitions whose offset
    /// committed to the Kafka group is ahead of the one stored in Postgres.
    /// A consumer copies its offsets to the group only after Postgres has
    /// committed them, so the group is ahead only when something else
    /// committed for it: another `run` of the group writing another database
    /// (each database then gets only part of the topic), an older consumer
    /// under the same group id, or this database restored from a backup,
    /// created afresh, or with its offsets removed. Reading goes on from Postgres' offsets in every case;
    /// the warning says which, so that a split is not found months later.
    pub fn compare_group_offsets(&self) {
        let generation = self.ownership.generation();
        if self.group_compared.swap(generation, Ordering::Relaxed) == generation {
            return;
        }
        let stored = self.ownership.stored_positions();
        if stored.is_empty() {
            return;
        }
        let group = match self.consumer.committed(GROUP_OFFSETS_LIMIT) {
            Ok(tpl) => tpl,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read the group's committed offsets");
                return;
            }
        };
        let mut ahead: Vec<(i32, i64, Option<i64>)> = group
            .elements()
            .iter()
            .filter(|el| el.topic() == self.topic)
            .filter_map(|el| {
                let Offset::Offset(at) = el.offset() else {
                    return None;
                };
                let db = *stored.get(&el.partition())?;
                (at > db.unwrap_or(0)).then_some((el.partition(), at, db))
            })
            .collect();
        if ahead.is_empty() {
            return;
        }
        ahead.sort_unstable();
        tracing::warn!(
            partitions = ?ahead.iter().map(|a| a.0).collect::<Vec<_>>(),
            group_offsets = ?ahead.iter().map(|a| a.1).collect::<Vec<_>>(),
            stored_offsets = ?ahead.iter().map(|a| a.2).collect::<Vec<_>>(),
            "the Kafka group's committed offsets of these partitions are ahead of the ones stored in Postgres; \
             reading from Postgres' offsets. Something other than this database's consumers committed for the \
             group: another run of the same group id writing another database (each database then gets only \
             part of the topic: give each its own --group-id), an older consumer under this group id, or this \
             database was restored from a backup, created afresh, or had its stored offsets removed to load \
             the topic again"
        );
    }

    /// Every `every`, finds the topic's partitions, whoever owns them, that
    /// have messages past their offset stored in Postgres and whose offset
    /// has not moved since the last look: sets the stalled-partitions gauge,
    /// and warns when that set changes. Lag is only reported by a
    /// partition's owner, so a partition held by a member that is gone but
    /// kept in the group (tansu after a SIGKILL), or by one that is stuck,
    /// showed nothing anywhere while every live consumer looked healthy.
    /// Every consumer sees the same partitions, so the alert takes the
    /// largest count, not the sum. `every` must outlast a batch's linger, or
    /// a quiet partition waiting for its batch to fill would count.
    pub fn watch_stalls(&self, every: Duration) {
        let mut check = self.stall_check.lock().expect("stall check");
        if check.looked.is_some_and(|at| at.elapsed() < every) {
            return;
        }
        check.looked = Some(Instant::now());
        // Not knowing (Postgres or the broker away), nothing is concluded;
        // the next look compares with the last one that answered.
        // Two offsets at least: Kafka's transactions end a partition with a
        // commit marker, an offset that is no message, so one offset past
        // the stored one may be all there is to read.
        let Some(behind) = self.behind(2) else {
            return;
        };
        let mut stalled: Vec<i32> = match &check.behind {
            Some(before) => behind
                .iter()
                .filter(|(p, next)| before.get(p) == Some(next))
                .map(|(p, _)| *p)
                .collect(),
            None => Vec::new(),
        };
        stalled.sort_unstable();
        check.behind = Some(behind);
        let metrics = &self.consumer.context().metrics;
        metrics.stalled_partitions.set(stalled.len() as i64);
        if stalled == check.stalled {
            return;
        }
        if stalled.is_empty() {
            tracing::info!(topic = %self.topic, "every partition with messages waiting moves again");
        } else {
            let assigned = self.ownership.assigned();
            let (mine, others): (Vec<i32>, Vec<i32>) =
                stalled.iter().partition(|p| assigned.contains(p));
            tracing::warn!(
                topic = %self.topic,
                partitions = ?stalled,
                held_here = ?mine,
                held_elsewhere = ?others,
                waited_secs = every.as_secs(),
                "these partitions have messages waiting, and their offsets stored in Postgres have not moved for that long. \
                 Held elsewhere: their owner is stuck, or gone while the broker keeps it in the group (restarting a \
                 consumer starts a rebalance). Held here: see this consumer's errors"
            );
        }
        check.stalled = stalled;
    }

    /// Leaves the group and joins it again, as a restart would: a join
    /// starts a rebalance. Unlike [`KafkaSource::subscribe`], the clock of a
    /// run to the end that never had an assignment (`unassigned_since`)
    /// goes on.
    fn rejoin(&self) {
        self.consumer.unsubscribe();
        if let Err(e) = self.consumer.subscribe(&[&self.topic]) {
            tracing::error!(error = %e, "subscribing again failed");
        }
        self.ownership.idle_since.set(false);
        self.ownership.revoked_since.set(true);
    }

    /// The topic's partitions with at least `waiting` offsets past their
    /// offset stored in Postgres, with that offset (the log's start when
    /// none is stored); None when the broker or Postgres does not answer.
    fn behind(&self, waiting: i64) -> Option<HashMap<i32, i64>> {
        let stored = self.consumer.context().loader.load().ok()?;
        let mut behind = HashMap::new();
        for p in self.partitions()? {
            let (low, high) = self
                .consumer
                .fetch_watermarks(&self.topic, p, Duration::from_secs(5))
                .ok()?;
            let next = stored.get(&p).map_or(low, |s| s.next);
            if high - next >= waiting {
                behind.insert(p, next);
            }
        }
        Some(behind)
    }

    /// A rebalance that does not end leaves the consumer reading nothing, in
    /// silence, and ready as far as Postgres and the broker go. Once `limit`
    /// has passed since joining the group or since the last revocation
    /// without an assignment, this says so and makes the consumer not ready
    /// until one comes; then says it again after each further `limit`. Kafka waits up to the members'
    /// `max.poll.interval.ms` for each to rejoin; tansu, paused past the
    /// session timeout, waited until another member joined. (Leaving and
    /// joining again here did not end it on tansu after a SIGKILL: the
    /// group then gave an empty assignment, which
    /// [`KafkaSource::rejoin_if_orphaned`] deals with.)
    pub fn note_if_stuck(&self, limit: Duration) {
        if self.ownership.revoked_for().is_none_or(|w| w < limit) {
            return;
        }
        tracing::warn!(
            waited_secs = limit.as_secs(),
            topic = %self.topic,
            "no assignment from the group since joining it or since the last revocation: its rebalance has not ended \
             (a member that does not rejoin, or a broker that lost the group); reading nothing, and not ready, \
             until it ends. A new member's join can end it: restarting this consumer joins as one"
        );
        self.consumer
            .context()
            .health
            .in_group
            .store(false, Ordering::Relaxed);
        self.ownership.revoked_since.set(true);
    }

    /// Polls until a message to hand on, an end of partition, or `timeout`.
    /// Re-delivered messages and corrective seeks are handled here, so a
    /// refetch of thousands of already-handed-on messages does not look like
    /// thousands of idle polls to the caller. Rebalance callbacks run inside.
    pub fn poll(&self, timeout: Duration) -> Polled<'_> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if let Some(p) = self.poll_once(left, None) {
                return p;
            }
            if left.is_zero() {
                return Polled::Idle;
            }
        }
    }

    /// The next message librdkafka already holds, without waiting: for
    /// draining a burst after [`KafkaSource::poll`]. Arrivals are stamped
    /// with `now`, the burst's clock reading; clock reads per message were a
    /// tenth of the intake thread. Idle also when what came was dropped.
    pub fn poll_ready(&self, now: Instant) -> Polled<'_> {
        self.poll_once(Duration::ZERO, Some(now))
            .unwrap_or(Polled::Idle)
    }

    /// One librdkafka poll; None when what came was dropped (re-delivered, or
    /// a skip that needed a seek). `now` stamps the arrival (None: read the clock).
    fn poll_once(&self, timeout: Duration, now: Option<Instant>) -> Option<Polled<'_>> {
        Some(match self.consumer.poll(timeout) {
            None => Polled::Idle,
            Some(Ok(m)) => {
                self.health.kafka_ok.store(true, Ordering::Relaxed);
                let (p, offset) = (m.partition(), m.offset());
                let now = now.unwrap_or_else(Instant::now);
                let verdict = {
                    let mut cursors = self.ownership.cursors.lock().expect("cursors lock");
                    match cursors.get_mut(&p) {
                        Some(c) => c.judge_message(
                            offset,
                            m.timestamp().to_millis(),
                            m.payload(),
                            now,
                            self.consume_errors.recent(),
                        ),
                        // Not (or no longer) ours: never hand it on.
                        None => Verdict::Redelivered,
                    }
                };
                match verdict {
                    Verdict::Accept => Polled::Message(m),
                    Verdict::Redelivered => {
                        self.dropped.fetch_add(1, Ordering::Relaxed);
                        return None;
                    }
                    Verdict::SeekBack(to) => {
                        tracing::debug!(
                            partition = p,
                            got = offset,
                            seek_to = to,
                            "broker started past the requested offset; seeking back"
                        );
                        drop(m);
                        if let Err(e) = self.consumer.seek(
                            &self.topic,
                            p,
                            Offset::Offset(to),
                            Duration::from_secs(10),
                        ) {
                            tracing::warn!(partition = p, error = %e, "seek failed");
                        }
                        return None;
                    }
                    Verdict::OtherLog {
                        offset,
                        written,
                        found,
                    } => {
                        let e = SourceError::OtherLog {
                            topic: self.topic.clone(),
                            partition: p,
                            offset,
                            written: kafka_time(written),
                            found: kafka_time(found),
                        };
                        tracing::error!(partition = p, "{e}");
                        self.refusal.lock().expect("refusal lock").get_or_insert(e);
                        return None;
                    }
                }
            }
            Some(Err(KafkaError::PartitionEOF(p))) => {
                self.health.kafka_ok.store(true, Ordering::Relaxed);
                Polled::PartitionEof(p)
            }
            Some(Err(e)) => {
                self.consume_errors
                    .note(&e, &self.consumer.context().metrics);
                Polled::Idle
            }
        })
    }

    /// Re-reads the stored offsets and restarts every owned partition there.
    /// Runs on the intake thread when the writer found its view stale.
    pub fn resync_if_requested(&self) {
        if !self.ownership.resync.swap(false, Ordering::SeqCst) {
            return;
        }
        let Ok(assignment) = self.consumer.assignment() else {
            return;
        };
        let mut tpl = TopicPartitionList::new();
        for el in assignment.elements() {
            tpl.add_partition(el.topic(), el.partition());
        }
        let Some((positions, verify)) = self.consumer.context().position(&mut tpl) else {
            return;
        };
        tracing::info!("re-reading offsets from Postgres after a fenced write");
        self.consumer.context().own(positions, &verify);
        if let Err(e) = self.consumer.assign(&tpl) {
            tracing::error!(error = %e, "re-assign failed");
        }
    }

    /// Compares every owned partition that has been silent for `quiet` with
    /// its high watermark. A silent partition that is behind is a stall (see
    /// [`Cursor::stalled`]) and is sought back. Returns true when every owned
    /// partition is silent and at its high watermark, i.e. caught up. It reads
    /// the watermarks that librdkafka caches from fetch responses: no request
    /// goes to the broker, so a slow broker cannot stall the intake here. This
    /// does not rely on end-of-partition events, which librdkafka does not
    /// send again after a seek.
    ///
    /// While librdkafka reports read failures, a partition that is behind
    /// is neither caught up nor settled: what it has not delivered may be a
    /// record batch it cannot read (corrupt, or compressed with a codec it
    /// lacks), and taking the silence for the end would let `run` report
    /// "caught up" with messages left behind. It waits, and says why.
    ///
    /// A quiet partition whose position is past its high watermark, as the
    /// broker gives it, can only have come from the offset stored in
    /// Postgres (a consumer stores no offset beyond what it read, and a
    /// partition's end only grows), so its log is not the one those offsets
    /// count: [`SourceError::PastEnd`]. A log that has grown past it is
    /// caught by the poll instead, and reported here: [`SourceError::OtherLog`].
    pub fn check_progress(&self, quiet: Duration) -> Result<bool, SourceError> {
        if let Some(e) = self.refusal.lock().expect("refusal lock").take() {
            return Err(e);
        }
        let (quiet_ones, mut caught_up) = {
            let cursors = self.ownership.cursors.lock().expect("cursors lock");
            let quiet_ones: Vec<(i32, Option<i64>)> = cursors
                .iter()
                .filter(|(_, c)| c.heard_at.elapsed() >= quiet)
                .map(|(&p, c)| (p, c.next))
                .collect();
            let all_quiet = !cursors.is_empty() && quiet_ones.len() == cursors.len();
            (quiet_ones, all_quiet)
        };
        let erroring = self.consume_errors.recent();
        let mut held = Vec::new();
        for (p, next) in quiet_ones {
            let Some((low, high)) = self.cached_watermarks(p) else {
                caught_up = false;
                continue;
            };
            if let Some(stored) = next
                && stored > high
            {
                // The cache may predate the partition's return to this
                // consumer (another one has consumed it since): only the
                // broker's answer counts. This is rare, so it may block.
                match self
                    .consumer
                    .fetch_watermarks(&self.topic, p, Duration::from_secs(5))
                {
                    Ok((_, end)) if stored > end => {
                        return Err(SourceError::PastEnd {
                            topic: self.topic.clone(),
                            partition: p,
                            stored,
                            end,
                        });
                    }
                    _ => {
                        caught_up = false;
                        continue;
                    }
                }
            }
            // Not caught up before the log is known to be the one the stored
            // offset counts: a log created again with as many messages as
            // before would otherwise pass for caught up.
            let looking = {
                let mut cursors = self.ownership.cursors.lock().expect("cursors lock");
                cursors
                    .get_mut(&p)
                    .filter(|c| c.verify.is_some())
                    .map(|c| c.look_for_written(low))
            };
            if let Some(seek) = looking {
                caught_up = false;
                if let Some(to) = seek
                    && let Err(e) = self.consumer.seek(
                        &self.topic,
                        p,
                        Offset::Offset(to),
                        Duration::from_secs(10),
                    )
                {
                    tracing::warn!(partition = p, error = %e, "seek failed");
                }
                continue;
            }
            if next.unwrap_or(low) >= high {
                continue;
            }
            if erroring {
                caught_up = false;
                held.push(format!("{p} at {} of {high}", next.unwrap_or(low)));
                continue;
            }
            let settled = {
                let cursors = self.ownership.cursors.lock().expect("cursors lock");
                cursors.get(&p).is_some_and(|c| c.settled)
            };
            if settled {
                continue;
            }
            caught_up = false;
            let seek = {
                let mut cursors = self.ownership.cursors.lock().expect("cursors lock");
                match cursors.get_mut(&p) {
                    // Unchanged since the snapshot (no rebalance, no message).
                    Some(c) if c.next == next => c.stalled(low, high),
                    _ => None,
                }
            };
            if let Some(to) = seek {
                tracing::debug!(
                    partition = p,
                    next = ?next,
                    high,
                    seek_to = to,
                    "broker silent while behind its high watermark; seeking back"
                );
                if let Err(e) =
                    self.consumer
                        .seek(&self.topic, p, Offset::Offset(to), Duration::from_secs(10))
                {
                    tracing::warn!(partition = p, error = %e, "seek failed");
                }
            }
        }
        if !held.is_empty() && self.consume_errors.should_warn_behind() {
            tracing::warn!(
                partitions = %held.join(", "),
                error = %self.consume_errors.last_text(),
                "partitions behind their high watermark while the consumer reports errors; waiting, nothing is skipped"
            );
        }
        Ok(caught_up)
    }

    /// Starts every partition's silence over, after the intake was away from
    /// polling (blocked on a full channel).
    pub fn restart_silence_clocks(&self) {
        let now = Instant::now();
        for c in self
            .ownership
            .cursors
            .lock()
            .expect("cursors lock")
            .values_mut()
        {
            c.heard_at = now;
        }
    }

    /// Sets each owned partition's lag from the broker's high watermark and
    /// the offset stored in Postgres. For while the intake waits on the
    /// writer: the statistics that carry the lag come only with polls, and a
    /// frozen lag would hide a backlog that grows through a database outage.
    pub fn refresh_lag(&self) {
        let metrics = &self.consumer.context().metrics;
        for (p, stored) in self.ownership.stored_positions() {
            // A broker request each; bounded, since the caller only waits.
            // The larger of its answer and the last fetch's: some brokers
            // (tansu) answer ListOffsets with less than they hold.
            let asked = self
                .consumer
                .fetch_watermarks(&self.topic, p, Duration::from_secs(1));
            if let Err(e) = &asked {
                tracing::debug!(partition = p, error = %e, "cannot refresh the lag");
            }
            let ends = [asked.ok(), self.cached_watermarks(p)];
            let Some(low) = ends.iter().flatten().map(|e| e.0).min() else {
                continue;
            };
            let high = ends.iter().flatten().map(|e| e.1).max().unwrap_or(-1);
            if let Some(lag) = partition_lag(high, stored.unwrap_or(low)) {
                metrics
                    .consumer_lag
                    .with_label_values(&[self.topic.as_str(), &p.to_string()])
                    .set(lag);
            }
        }
    }

    /// The partition's (low, high) watermarks as of the last fetch response,
    /// or None when no fetch has answered yet.
    fn cached_watermarks(&self, partition: i32) -> Option<(i64, i64)> {
        let topic = std::ffi::CString::new(self.topic.as_str()).ok()?;
        let (mut low, mut high) = (-1i64, -1i64);
        // SAFETY: the client pointer lives as long as `self.consumer`; the topic
        // is a valid C string for the call; low and high are valid out-pointers.
        // rd_kafka_get_watermark_offsets only reads librdkafka's local cache.
        let err = unsafe {
            rdkafka::bindings::rd_kafka_get_watermark_offsets(
                self.consumer.client().native_ptr(),
                topic.as_ptr(),
                partition,
                &mut low,
                &mut high,
            )
        };
        (err == RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR && low >= 0 && high >= 0)
            .then_some((low, high))
    }

    /// How many re-delivered messages were dropped since the last call (for a
    /// per-batch metric, not a per-message one).
    pub fn take_dropped(&self) -> u64 {
        self.dropped.swap(0, Ordering::Relaxed)
    }

    /// Copies committed offsets to the Kafka group, for lag tools. Postgres stays
    /// the source of truth, so a failure here is only logged.
    pub fn commit_to_group(&self, offsets: &[(i32, i64)]) {
        self.ownership.note_committed(offsets);
        let mut tpl = TopicPartitionList::new();
        for &(p, next) in offsets {
            if tpl
                .add_partition_offset(&self.topic, p, Offset::Offset(next))
                .is_err()
            {
                return;
            }
        }
        if let Err(e) = self.consumer.commit(&tpl, CommitMode::Async) {
            tracing::debug!(error = %e, "kafka group commit failed");
        }
    }

    /// Leaves the group cleanly (runs the revoke callback).
    pub fn close(&self) {
        self.consumer.unsubscribe();
        // Serve the revoke callback.
        for _ in 0..20 {
            if let Polled::Idle = self.poll(Duration::from_millis(50))
                && self.ownership.assigned().is_empty()
            {
                break;
            }
        }
    }
}

/// Ownership is versioned per rebalance, which needs eager rebalances:
/// every partition revoked, then all assigned anew. Both the
/// cooperative-sticky assignor and the KIP-848 consumer protocol (librdkafka
/// 2.4+) hand partitions over one at a time.
fn eager_rebalances(c: &ClientConfig) -> Result<(), SourceError> {
    if c.get("partition.assignment.strategy")
        .is_some_and(|s| s.to_ascii_lowercase().contains("cooperative"))
    {
        return Err(SourceError::Cooperative(
            "partition.assignment.strategy=cooperative-sticky",
        ));
    }
    if c.get("group.protocol")
        .is_some_and(|p| !p.trim().eq_ignore_ascii_case("classic"))
    {
        return Err(SourceError::Cooperative("group.protocol=consumer"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_eager_rebalances_are_accepted() {
        let with = |k: &str, v: &str| {
            let mut c = ClientConfig::new();
            c.set(k, v);
            eager_rebalances(&c)
        };
        assert!(eager_rebalances(&ClientConfig::new()).is_ok());
        assert!(with("partition.assignment.strategy", "range,roundrobin").is_ok());
        assert!(with("group.protocol", "classic").is_ok());
        let e = with("partition.assignment.strategy", "cooperative-sticky").unwrap_err();
        assert!(e.to_string().contains("cooperative-sticky"), "{e}");
        // Regression: the KIP-848 protocol, which also rebalances partition
        // by partition, was let through.
        let e = with("group.protocol", "consumer").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("group.protocol=consumer is not supported"),
            "{e}"
        );
    }

    #[test]
    fn lag_is_unknown_until_both_ends_are_known() {
        assert_eq!(partition_lag(100, 40), Some(60));
        assert_eq!(partition_lag(100, 120), Some(0), "never negative");
        assert_eq!(partition_lag(-1, 40), None, "no fetch has answered yet");
        assert_eq!(partition_lag(100, -1001), None, "no position");
        assert_eq!(partition_lag(0, 0), Some(0));
    }

    #[test]
    fn cursor_accepts_in_order_and_drops_redeliveries() {
        let mut c = Cursor::at(Some(10));
        assert_eq!(c.judge(10, Instant::now(), false), Verdict::Accept);
        assert_eq!(c.judge(11, Instant::now(), false), Verdict::Accept);
        assert_eq!(c.judge(5, Instant::now(), false), Verdict::Redelivered);
        assert_eq!(c.judge(11, Instant::now(), false), Verdict::Redelivered);
        assert_eq!(c.judge(12, Instant::now(), false), Verdict::Accept);
        assert_eq!(c.next, Some(13));
    }

    #[test]
    fn cursor_seeks_back_when_the_broker_skips() {
        // Asked for 100, the broker answers from 150: seek back 16, 64, 256, ...
        let mut c = Cursor::at(Some(100));
        assert_eq!(c.judge(150, Instant::now(), false), Verdict::SeekBack(84));
        assert_eq!(c.judge(150, Instant::now(), false), Verdict::SeekBack(36));
        assert_eq!(c.judge(150, Instant::now(), false), Verdict::SeekBack(0));
        // Now the fetch starts before 100: the head is dropped, 100 accepted.
        assert_eq!(c.judge(90, Instant::now(), false), Verdict::Redelivered);
        assert_eq!(c.judge(99, Instant::now(), false), Verdict::Redelivered);
        assert_eq!(c.judge(100, Instant::now(), false), Verdict::Accept);
        assert_eq!(c.back, 0);
        // Mid-stream too (a fetch restarted after a reconnect).
        assert_eq!(c.judge(140, Instant::now(), false), Verdict::SeekBack(85));
    }

    #[test]
    fn cursor_accepts_a_gap_the_broker_straddles() {
        // The broker sends 8, 9 (below next = 10) then 12: 10 and 11 do not exist.
        let mut c = Cursor::at(Some(10));
        assert_eq!(c.judge(8, Instant::now(), false), Verdict::Redelivered);
        assert_eq!(c.judge(9, Instant::now(), false), Verdict::Redelivered);
        assert_eq!(c.judge(12, Instant::now(), false), Verdict::Accept);
        assert_eq!(c.next, Some(13));
    }

    #[test]
    fn cursor_accepts_a_gap_once_it_has_looked_back_to_zero() {
        let mut c = Cursor::at(Some(3));
        let mut seeks = 0;
        loop {
            match c.judge(7, Instant::now(), false) {
                Verdict::SeekBack(to) => {
                    assert!(to >= 0);
                    seeks += 1;
                }
                Verdict::Accept => break,
                other => panic!("7 is past 3: {other:?}"),
            }
        }
        assert!(seeks <= 1, "bounded: {seeks}");
        assert_eq!(c.next, Some(8));
    }

    #[test]
    fn cursor_seeks_back_when_the_broker_stays_silent_while_behind() {
        // Resumed at 100 inside tansu's last batch 40..=120: nothing arrives.
        let mut c = Cursor::at(Some(100));
        assert_eq!(c.stalled(0, 121), Some(84));
        assert_eq!(c.stalled(0, 121), Some(36));
        // The refetch starts below 100: the head is dropped, 100 accepted.
        assert_eq!(c.judge(40, Instant::now(), false), Verdict::Redelivered);
        assert_eq!(c.judge(99, Instant::now(), false), Verdict::Redelivered);
        assert_eq!(c.judge(100, Instant::now(), false), Verdict::Accept);
        // At the high watermark nothing is missing.
        assert_eq!(c.stalled(0, 101), None);
        // Never below the low watermark.
        let mut c = Cursor::at(Some(100));
        assert_eq!(c.stalled(90, 121), Some(90));
        // From the beginning the broker starts at a batch start.
        assert_eq!(Cursor::at(None).stalled(0, 10), None);
    }

    #[test]
    fn cursor_stops_looking_when_only_markers_are_left() {
        // Kafka with transactions: offsets 100..=101 are commit markers, never
        // delivered. One look back shows 99 is the last message: settled.
        let mut c = Cursor::at(Some(100));
        assert_eq!(c.stalled(0, 102), Some(84));
        for o in 84..100 {
            assert_eq!(c.judge(o, Instant::now(), false), Verdict::Redelivered);
        }
        assert_eq!(c.stalled(0, 102), None);
        assert!(c.settled);
        assert_eq!(
            c.stalled(0, 102),
            None,
            "no re-reading on every quiet moment"
        );
        // Looking back all the way to the start also settles it.
        let mut c = Cursor::at(Some(20));
        assert_eq!(c.stalled(0, 30), Some(4));
        assert_eq!(c.stalled(0, 30), Some(0));
        assert_eq!(c.stalled(0, 30), None);
        // A new message un-settles it.
        assert_eq!(c.judge(25, Instant::now(), false), Verdict::Accept);
        assert!(!c.settled);
    }

    #[test]
    fn cursor_accepts_no_gap_while_the_consumer_reports_errors() {
        // 99 came (below 100), then 150: without errors the gap is real
        // (compaction, markers) and 150 is taken.
        let mut c = Cursor::at(Some(100));
        assert_eq!(c.judge(99, Instant::now(), false), Verdict::Redelivered);
        assert_eq!(c.judge(150, Instant::now(), false), Verdict::Accept);
        // With errors, 100..150 may be a batch librdkafka failed to read:
        // seek to 100 again, however the broker got there.
        let mut c = Cursor::at(Some(100));
        assert_eq!(c.judge(99, Instant::now(), true), Verdict::Redelivered);
        assert_eq!(c.judge(150, Instant::now(), true), Verdict::SeekBack(100));
        // After looking back to the start as well.
        let mut c = Cursor::at(Some(20));
        assert_eq!(c.judge(30, Instant::now(), true), Verdict::SeekBack(4));
        assert_eq!(c.judge(30, Instant::now(), true), Verdict::SeekBack(0));
        assert_eq!(c.judge(30, Instant::now(), true), Verdict::SeekBack(20));
        assert_eq!(c.next, Some(20));
        // Once the errors stop, the usual rule takes the gap.
        assert_eq!(c.judge(30, Instant::now(), false), Verdict::Accept);
        assert_eq!(c.next, Some(31));
    }

    #[test]
    fn only_read_failures_hold_partitions() {
        use rdkafka::types::RDKafkaErrorCode as Code;
        for held in [
            Code::InvalidMessage,
            Code::UnsupportedCompressionType,
            Code::TopicAuthorizationFailed,
            Code::BadMessage,
            Code::BadCompression,
        ] {
            assert!(is_read_failure(held), "{held:?}");
        }
        for passed in [
            Code::BrokerTransportFailure,
            Code::AllBrokersDown,
            Code::Resolve,
            Code::AutoOffsetReset,
        ] {
            assert!(!is_read_failure(passed), "{passed:?}");
        }
    }

    const V: Option<&[u8]> = Some(b"the value");

    fn verifying(next: i64, timestamp_ms: Option<i64>) -> Cursor {
        let mut c = Cursor::at(Some(next));
        c.verify = Some(LastWritten {
            timestamp_ms,
            fingerprint: fingerprint(V),
        });
        c
    }

    #[test]
    fn cursor_compares_the_message_before_the_stored_offset_then_reads_on() {
        let now = Instant::now();
        let mut c = verifying(10, Some(5_000));
        assert_eq!(
            c.judge_message(9, Some(5_000), V, now, false),
            Verdict::Redelivered
        );
        assert_eq!(
            c.judge_message(10, Some(6_000), V, now, false),
            Verdict::Accept
        );
        // Compared once: a later re-delivery of 9 is only a re-delivery.
        assert_eq!(
            c.judge_message(9, Some(1), V, now, false),
            Verdict::Redelivered
        );
        assert_eq!(
            c.judge_message(11, Some(7_000), V, now, false),
            Verdict::Accept
        );
        // No timestamp when written, none now: the same.
        let mut c = verifying(10, None);
        assert_eq!(
            c.judge_message(9, None, V, now, false),
            Verdict::Redelivered
        );
        assert_eq!(c.judge_message(10, None, V, now, false), Verdict::Accept);
    }

    #[test]
    fn cursor_refuses_a_log_whose_message_before_the_stored_offset_differs() {
        // Regression: a topic created again with more messages than the
        // stored offsets had its first ones skipped, silently.
        let now = Instant::now();
        let mut c = verifying(10, Some(5_000));
        assert_eq!(
            c.judge_message(9, Some(9_999), V, now, false),
            Verdict::OtherLog {
                offset: 9,
                written: Some(5_000),
                found: Some(9_999)
            }
        );
        for o in [10, 11, 9, 50] {
            assert_eq!(
                c.judge_message(o, Some(9_999), V, now, false),
                Verdict::Redelivered,
                "nothing of it is handed on ({o})"
            );
        }
        // A timestamp where none was written, and the other way round.
        let mut c = verifying(10, None);
        assert!(matches!(
            c.judge_message(9, Some(1), V, now, false),
            Verdict::OtherLog { .. }
        ));
        let mut c = verifying(10, Some(1));
        assert!(matches!(
            c.judge_message(9, None, V, now, false),
            Verdict::OtherLog { .. }
        ));
    }

    #[test]
    fn cursor_refuses_another_value_under_the_same_timestamp() {
        // Regression: with the timestamp alone, a topic created again whose
        // producer set the same timestamps (event time, a mirror), or none,
        // passed, and its first messages were skipped.
        let now = Instant::now();
        for ts in [Some(5_000), None] {
            let mut c = verifying(10, ts);
            assert!(
                matches!(
                    c.judge_message(9, ts, Some(b"another value"), now, false),
                    Verdict::OtherLog { .. }
                ),
                "{ts:?}"
            );
        }
        // A value as large as a producer may stamp is compared as it is.
        let mut c = verifying(10, Some(i64::MAX));
        assert_eq!(
            c.judge_message(9, Some(i64::MAX), V, now, false),
            Verdict::Redelivered
        );
    }

    #[test]
    fn a_silent_partition_is_looked_back_into_for_the_message_to_compare() {
        // Assigned at 9 (stored 10) inside tansu's last batch: nothing comes.
        let mut c = verifying(10, Some(5));
        assert_eq!(c.look_for_written(0), Some(0));
        assert_eq!(
            c.judge_message(0, Some(1), V, Instant::now(), false),
            Verdict::Redelivered
        );
        assert!(c.verify.is_some(), "still looking");
        // Looked back to the start and it never came: gone, nothing to compare.
        assert_eq!(c.look_for_written(0), None);
        assert!(c.verify.is_none());
        // Below the log's start (retention): gone at once.
        let mut c = verifying(10, Some(5));
        assert_eq!(c.look_for_written(10), None);
        assert!(c.verify.is_none());
    }

    #[test]
    fn fingerprints_are_stable_and_tell_a_tombstone_from_an_empty_value() {
        assert_ne!(fingerprint(None), fingerprint(Some(b"")));
        assert_ne!(fingerprint(Some(b"a")), fingerprint(Some(b"b")));
        // Stored in Postgres: it must not change between versions.
        assert_eq!(fingerprint(Some(b"energy")), fingerprint(Some(b"energy")));
        assert_eq!(
            fingerprint(None),
            i64::from_be_bytes([0x6e, 0x34, 0x0b, 0x9c, 0xff, 0xb3, 0x7a, 0x98])
        );
    }

    #[test]
    fn cursor_looks_back_for_the_message_to_compare() {
        let now = Instant::now();
        // The broker answers from 10 (tansu skips to the next batch): look
        // back for 9 before handing 10 on.
        let mut c = verifying(100, Some(5));
        assert_eq!(
            c.judge_message(100, Some(6), V, now, false),
            Verdict::SeekBack(83)
        );
        assert_eq!(
            c.judge_message(83, Some(1), V, now, false),
            Verdict::Redelivered
        );
        assert_eq!(
            c.judge_message(99, Some(9), V, now, false),
            Verdict::OtherLog {
                offset: 99,
                written: Some(5),
                found: Some(9)
            }
        );
        // The message is gone (retention): after looking back to the start,
        // reading goes on without a comparison.
        let mut c = verifying(3, Some(5));
        let mut seeks = 0;
        loop {
            match c.judge_message(7, Some(6), V, now, false) {
                Verdict::SeekBack(to) => {
                    assert!(to >= 0);
                    seeks += 1;
                    assert!(seeks < 5, "bounded");
                }
                Verdict::Accept => break,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(c.next, Some(8));
        // A message below it came, then one past it: it does not exist.
        let mut c = verifying(10, Some(5));
        assert_eq!(
            c.judge_message(7, Some(1), V, now, false),
            Verdict::Redelivered
        );
        assert_eq!(c.judge_message(10, Some(2), V, now, false), Verdict::Accept);
    }

    #[test]
    fn cursor_from_the_beginning_takes_the_first_offset() {
        let mut c = Cursor::at(None);
        assert_eq!(c.judge(42, Instant::now(), false), Verdict::Accept);
        assert_eq!(c.judge(42, Instant::now(), false), Verdict::Redelivered);
        assert_eq!(c.judge(43, Instant::now(), false), Verdict::Accept);
    }
}
