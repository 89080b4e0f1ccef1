//! Shared fixtures for integration tests: a throwaway Postgres per test binary
//! (or `DATABASE_URL`), a fresh database per test, Kafka via MockCluster or a
//! real broker, and event builders.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use energy_stream::localpg::LocalPostgres;
use rdkafka::ClientConfig;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

static PG: OnceLock<LocalPostgres> = OnceLock::new();
static COUNTER: AtomicU32 = AtomicU32::new(0);

/// The server URL: `DATABASE_URL` when set, else a cluster this test binary starts.
pub fn server_url() -> String {
    if let Ok(url) = std::env::var("TEST_DATABASE_URL") {
        return url;
    }
    PG.get_or_init(|| {
        let pg = LocalPostgres::start().unwrap_or_else(|e| {
            panic!("integration tests need PostgreSQL: {e}. Install it with `apt-get install -y postgresql` or set TEST_DATABASE_URL")
        });
        // A static is never dropped, and the postmaster is detached from us:
        // without this hook the last test binary's server kept running after
        // `cargo test` until some later start reaped it.
        // SAFETY: registers a plain `extern "C" fn` with no captured state.
        unsafe { libc::atexit(stop_shared_cluster) };
        pg
    })
    .url()
}

/// The cluster this test binary started for [`server_url`], if it did.
pub fn shared_cluster() -> Option<&'static LocalPostgres> {
    PG.get()
}

extern "C" fn stop_shared_cluster() {
    if let Some(pg) = PG.get() {
        pg.shut_down();
    }
}

/// A fresh, empty database on the shared server.
pub async fn fresh_db(prefix: &str) -> tokio_postgres::Config {
    fresh_db_on(&server_url(), prefix).await
}

pub async fn fresh_db_on(server: &str, prefix: &str) -> tokio_postgres::Config {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let name = format!("{prefix}_{}_{n}", std::process::id());
    let admin: tokio_postgres::Config = server.parse().unwrap();
    let client = energy_stream::sink::connect(&admin).await.unwrap();
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    let mut cfg = admin.clone();
    cfg.dbname(&name);
    cfg
}

pub async fn client(cfg: &tokio_postgres::Config) -> tokio_postgres::Client {
    energy_stream::sink::connect(cfg).await.unwrap()
}

/// A fresh database on the shared server, owned by the first of `kinds`,
/// with a fresh login role for each kind: how production splits the owner
/// that migrates, the app that writes rows, and readers. Returns the
/// database's name and, per kind in order, the role's name and a config
/// that logs in as it to the new database. A password is `{kind}-secret`,
/// so that a test can look for "secret" in output.
pub async fn db_with_roles<const N: usize>(
    kinds: [&str; N],
) -> (String, [(String, tokio_postgres::Config); N]) {
    let admin_cfg: tokio_postgres::Config = server_url().parse().unwrap();
    let admin = client(&admin_cfg).await;
    let id = unique("r").replace('-', "_");
    let db = format!("roles_{id}");
    let roles = kinds.map(|kind| {
        let name = format!("es_{kind}_{id}");
        let mut cfg = admin_cfg.clone();
        cfg.user(&name)
            .password(format!("{kind}-secret"))
            .dbname(&db);
        (name, cfg)
    });
    for (name, cfg) in &roles {
        let pw = String::from_utf8_lossy(cfg.get_password().unwrap());
        admin
            .batch_execute(&format!("CREATE ROLE {name} LOGIN PASSWORD '{pw}'"))
            .await
            .unwrap();
    }
    admin
        .batch_execute(&format!("CREATE DATABASE {db} OWNER {}", roles[0].0))
        .await
        .unwrap();
    (db, roles)
}

/// This test binary's scratch directory (test files, KPI directories,
/// broker logs), removed when the binary exits if no test panicked: such
/// files used to pile up in the temporary directory, hundreds a run. After
/// a failure it is kept, and its path printed, for the broker logs in it.
pub fn scratch_dir() -> std::path::PathBuf {
    static DIR: OnceLock<std::path::PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = scratch_path();
        std::fs::create_dir_all(&d).unwrap();
        let report = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            A_TEST_PANICKED.store(true, std::sync::atomic::Ordering::SeqCst);
            report(info)
        }));
        // SAFETY: registers a plain `extern "C" fn` with no captured state.
        unsafe { libc::atexit(remove_scratch_dir) };
        d
    })
    .clone()
}

static A_TEST_PANICKED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn scratch_path() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("es-scratch-{}", std::process::id()))
}

extern "C" fn remove_scratch_dir() {
    if A_TEST_PANICKED.load(std::sync::atomic::Ordering::SeqCst) {
        eprintln!("kept {} for the failed test", scratch_path().display());
    } else {
        let _ = std::fs::remove_dir_all(scratch_path());
    }
}

pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

/// A valid event line of `event_type` for `customer`.
pub fn event(event_type: &str, customer: &str, session: i64, minute: u32) -> String {
    let extra = match event_type {
        "view_tariffs" | "incentive_claim" => r#","tariff_type":"green""#.to_string(),
        "tariff_switch" => r#","tariff_type":"green","payment_amount":12.5"#.to_string(),
        "energy_consumed" => r#","energy_consumed":"1.234""#.to_string(),
        "bill_payment" => r#","payment_amount":20.5"#.to_string(),
        _ => String::new(),
    };
    format!(
        r#"{{"event_type":"{event_type}","event_time":"2025-06-01T{:02}:{:02}:00Z","payload":{{"customer_id":"{customer}","session_id":{session},"channel":"web_portal"{extra}}}}}"#,
        minute / 60 % 24,
        minute % 60
    )
}

/// The event type names, in the library's order.
pub static TYPES: std::sync::LazyLock<[&str; 7]> =
    std::sync::LazyLock::new(|| energy_stream::event::EventType::ALL.map(|t| t.as_str()));

/// JSON lines decoded and validated as the pipeline does, offsets 0.. on partition 0.
pub fn validated(lines: &[&str]) -> energy_stream::validate::Validated {
    use energy_stream::decode::{DecodeConfig, MessageMeta, decode_batch};
    let decoded = decode_batch(
        DecodeConfig::default(),
        lines.iter().enumerate().map(|(i, l)| {
            (
                Some(l.as_bytes()),
                MessageMeta {
                    partition: 0,
                    offset: i as i64,
                    timestamp_ms: None,
                },
            )
        }),
    );
    energy_stream::validate::validate(
        &decoded,
        &energy_stream::validate::ValidationRules::default(),
        chrono::Utc::now(),
    )
    .unwrap()
}

/// Bad messages with the reason each must be rejected with.
pub fn bad_messages() -> Vec<(Option<Vec<u8>>, &'static str)> {
    let b = |s: &str| Some(s.as_bytes().to_vec());
    vec![
        (None, "tombstone"),
        (Some(vec![]), "empty"),
        (Some(b"\xc3\x28 not utf8".to_vec()), "not_utf8"),
        (b("{\"event_type\": "), "invalid_json"),
        (b("[1,2]"), "not_object"),
        (
            b(
                r#"{"event_time":"2025-06-01T00:00:00Z","payload":{"customer_id":"C","session_id":1,"channel":"web"}}"#,
            ),
            "missing_event_type",
        ),
        (
            b(
                r#"{"event_type":"meter_exploded","event_time":"2025-06-01T00:00:00Z","payload":{"customer_id":"C","session_id":1,"channel":"web"}}"#,
            ),
            "unknown_event_type",
        ),
        (
            b(
                r#"{"event_type":"user_login","event_time":"not a time","payload":{"customer_id":"C","session_id":1,"channel":"web"}}"#,
            ),
            "invalid_event_time",
        ),
        (
            b(
                r#"{"event_type":"user_login","event_time":"1999-01-01T00:00:00Z","payload":{"customer_id":"C","session_id":1,"channel":"web"}}"#,
            ),
            "event_time_too_old",
        ),
        (
            b(
                r#"{"event_type":"user_login","event_time":"2999-01-01T00:00:00Z","payload":{"customer_id":"C","session_id":1,"channel":"web"}}"#,
            ),
            "event_time_in_future",
        ),
        (
            b(
                r#"{"event_type":"bill_payment","event_time":"2025-06-01T00:00:00Z","payload":{"customer_id":"C","session_id":1,"channel":"web"}}"#,
            ),
            "missing_field",
        ),
        (
            b(
                r#"{"event_type":"energy_consumed","event_time":"2025-06-01T00:00:00Z","payload":{"customer_id":"C","session_id":1,"channel":"web","energy_consumed":-1}}"#,
            ),
            "negative_number",
        ),
        (
            b(
                r#"{"event_type":"energy_consumed","event_time":"2025-06-01T00:00:00Z","payload":{"customer_id":"C","session_id":1,"channel":"web","energy_consumed":"abc"}}"#,
            ),
            "invalid_number",
        ),
        (
            b(
                r#"{"event_type":"energy_consumed","event_time":"2025-06-01T00:00:00Z","payload":{"customer_id":"C","session_id":1,"channel":"web","energy_consumed":"NaN"}}"#,
            ),
            "non_finite_number",
        ),
        (
            b(
                r#"{"event_type":"user_login","event_time":"2025-06-01T00:00:00Z","payload":{"customer_id":"C","session_id":"s-1","channel":"web"}}"#,
            ),
            "invalid_type",
        ),
    ]
}

/// Sends raw payloads (None = tombstone) to `topic`, keyed so they spread over
/// the partitions, and waits until all are delivered.
pub fn send_raw(brokers: &str, topic: &str, messages: &[Option<Vec<u8>>]) {
    send_stamped(brokers, topic, messages, None);
}

/// [`send_raw`], every message with the Kafka timestamp `timestamp_ms` when
/// given (as producers that stamp event time, or mirrors, do).
pub fn send_stamped(
    brokers: &str,
    topic: &str,
    messages: &[Option<Vec<u8>>],
    timestamp_ms: Option<i64>,
) {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("message.max.bytes", "10485760")
        .create()
        .expect("producer");
    for (i, m) in messages.iter().enumerate() {
        let key = format!("k{}", i % 97);
        let mut rec: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic).key(key.as_bytes());
        if let Some(p) = m {
            rec = rec.payload(p.as_slice());
        }
        if let Some(ts) = timestamp_ms {
            rec = rec.timestamp(ts);
        }
        loop {
            match producer.send(rec) {
                Ok(()) => break,
                Err((_, r)) => {
                    rec = r;
                    producer.poll(Duration::from_millis(10));
                }
            }
        }
        producer.poll(Duration::ZERO);
    }
    producer.flush(Duration::from_secs(60)).expect("flush");
}

/// A Kafka-compatible broker for real-broker tests: `KAFKA_BROKERS` when set,
/// else a tansu process this test starts on a free port.
pub struct Broker {
    pub brokers: String,
    child: Option<std::process::Child>,
    port: u16,
    storage: String,
    /// The SQLite file a restartable broker keeps its log in, removed on drop.
    file: Option<std::path::PathBuf>,
}

impl Broker {
    pub fn get() -> Broker {
        match std::env::var("KAFKA_BROKERS") {
            Ok(b) if !b.is_empty() => Broker {
                brokers: b,
                child: None,
                port: 0,
                storage: String::new(),
                file: None,
            },
            _ => Broker::own(),
        }
    }

    /// Always a private tansu, for tests that stop and restart the broker.
    pub fn own() -> Broker {
        Broker::own_with_storage("memory://tansu/")
    }

    /// A private tansu that keeps its log in a SQLite file in the scratch dir,
    /// so that it survives a restart of the broker, unlike the memory
    /// engine; the file is removed when the broker is dropped. SQLite needs
    /// tansu's `libsql` feature, which .ci/run installs.
    pub fn own_restartable() -> Broker {
        let file = format!("{}.db", unique("tansu"));
        let mut b = Broker::own_with_storage(&format!("sqlite://{file}"));
        b.file = Some(scratch_dir().join(file));
        b
    }

    fn own_with_storage(storage: &str) -> Broker {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut b = Broker {
            brokers: format!("127.0.0.1:{port}"),
            child: None,
            port,
            storage: storage.to_string(),
            file: None,
        };
        b.start();
        b
    }

    const HOW: &str = "real-broker tests need a Kafka-compatible broker: set KAFKA_BROKERS, or install tansu \
         with `cargo install tansu --locked --features dynostore,libsql` (.ci/run does this)";

    pub fn start(&mut self) {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        // In the scratch dir, so that a passing run leaves nothing behind;
        // a broker that dies at start has its log printed below.
        let log = scratch_dir().join(format!("tansu-{}.log", self.port));
        let child = std::process::Command::new("tansu")
            .args([
                "broker",
                "--storage-engine",
                &self.storage,
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            // Where a sqlite:// storage file goes.
            .current_dir(scratch_dir())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e}", Broker::HOW));
        self.child = Some(child);
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "tansu exited with {status} (storage {}): {}\n{}",
                    self.storage,
                    Broker::HOW,
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("tansu did not listen on port {} within 10 s", self.port);
    }

    /// Stops the broker process (SIGSTOP), as a frozen host or `docker
    /// pause` does: its sockets stay open and nothing answers. `kill` still
    /// ends it.
    pub fn freeze(&self) {
        let child = self.child.as_ref().expect("a broker this test started");
        // SAFETY: kill(2) on a child we spawned and have not reaped.
        let rc = unsafe { libc::kill(child.id() as i32, libc::SIGSTOP) };
        assert_eq!(rc, 0, "SIGSTOP: {}", std::io::Error::last_os_error());
    }

    /// Kills the broker process (memory storage: its data is gone too).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
        if let Some(file) = &self.file {
            // SQLite keeps its write-ahead log and shared memory beside the
            // database file.
            for suffix in ["", "-wal", "-shm"] {
                let mut path = file.clone().into_os_string();
                path.push(suffix);
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// Creates a topic through the admin API (tansu does not auto-create).
pub fn create_topic(brokers: &str, topic: &str, partitions: i32) {
    let kafka = energy_stream::source::KafkaConfig {
        brokers: brokers.to_string(),
        topic: topic.to_string(),
        group_id: "admin".into(),
        options: vec![],
    };
    energy_stream::produce::ensure_topic(&kafka, partitions).expect("create topic");
}

/// Creates `topic` with `partitions` partitions on a mock cluster.
pub fn mock_topic(
    cluster: &rdkafka::mocking::MockCluster<'_, impl rdkafka::ClientContext>,
    topic: &str,
    partitions: i32,
) {
    cluster
        .create_topic(topic, partitions, 1)
        .expect("create topic");
}

/// Counts per value of a text column.
pub async fn counts(client: &tokio_postgres::Client, sql: &str) -> BTreeMap<String, i64> {
    client
        .query(sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1)))
        .collect()
}

/// High watermarks of every partition of `topic`.
pub fn high_watermarks(brokers: &str, topic: &str, partitions: i32) -> BTreeMap<i32, i64> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "watermarks")
        .create()
        .unwrap();
    (0..partitions)
        .map(|p| {
            let (_, hi) = c
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .unwrap();
            (p, hi)
        })
        .collect()
}

/// A free loopback port (bound and released; good enough for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A one-shot HTTP/1.0 GET; the raw response, status line first.
pub fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    // A server that never answers fails the test instead of hanging it.
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// The URL of a test database, without a password (tests use trust auth).
pub fn db_url(cfg: &tokio_postgres::Config) -> String {
    let host = match &cfg.get_hosts()[0] {
        tokio_postgres::config::Host::Tcp(h) => h.clone(),
        tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
    };
    format!(
        "postgres://{}@{}:{}/{}",
        cfg.get_user().unwrap(),
        host,
        cfg.get_ports()[0],
        cfg.get_dbname().unwrap()
    )
}

/// [`db_url`] with the config's password in it, when it has one: for a role
/// that logs in with one on a server that checks passwords
/// (`TEST_DATABASE_URL`).
pub fn db_url_with_password(cfg: &tokio_postgres::Config) -> String {
    let Some(pw) = cfg.get_password() else {
        return db_url(cfg);
    };
    let user = cfg.get_user().unwrap();
    let pw = String::from_utf8_lossy(pw);
    db_url(cfg).replacen(&format!("://{user}@"), &format!("://{user}:{pw}@"), 1)
}

/// A finished command's stdout and stderr together, for `contains` checks.
pub fn output_text(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr)
}

/// The first column of every row `sql` returns, as text.
pub async fn texts(
    c: &tokio_postgres::Client,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Vec<String> {
    c.query(sql, params)
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Every row of `relation`, as text, sorted: comparable across databases.
pub async fn relation_rows(
    c: &tokio_postgres::Client,
    relation: &str,
    skip: &[&str],
) -> Vec<String> {
    let cols: Vec<String> = texts(
        c,
        "SELECT column_name::text FROM information_schema.columns WHERE table_name = $1 ORDER BY ordinal_position",
        &[&relation],
    )
    .await
    .into_iter()
    .filter(|n| !skip.contains(&n.as_str()))
    .collect();
    assert!(!cols.is_empty(), "{relation} has no columns");
    let list = cols
        .iter()
        .map(|c| format!("coalesce(\"{c}\"::text, 'NULL')"))
        .collect::<Vec<_>>()
        .join(" || '|' || ");
    c.query(
        &format!("SELECT {list} FROM \"{relation}\" ORDER BY 1"),
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// The lines of a JSONL file that are UTF-8: the generator writes some that
/// are not (a bad kind), and `produce` refuses those before Kafka.
pub fn utf8_lines(bytes: &[u8]) -> Vec<String> {
    bytes
        .split(|b| *b == b'\n')
        .filter_map(|l| std::str::from_utf8(l).ok())
        .map(str::to_string)
        .collect()
}

/// The project's generator as broker messages, one per JSONL line; an
/// empty line (one of its bad kinds) is an empty message.
pub fn generated_messages(cfg: &energy_stream::generate::GenerateConfig) -> Vec<Option<Vec<u8>>> {
    let mut buf = Vec::new();
    energy_stream::generate::generate(cfg, &mut buf).unwrap();
    let Some(body) = buf.strip_suffix(b"\n") else {
        return Vec::new();
    };
    body.split(|b| *b == b'\n')
        .map(|l| Some(l.to_vec()))
        .collect()
}

/// R == P by position. Across `events` and `rejected_events`, each
/// partition holds the offsets 0..n exactly once (no duplicate, no gap), and
/// the offset stored for (group, topic) is n. Returns n per partition.
pub async fn assert_exactly_once_by_position(
    c: &tokio_postgres::Client,
    group: &str,
    topic: &str,
) -> BTreeMap<i32, i64> {
    let rows = c
        .query(
            "SELECT kafka_partition, count(*), count(DISTINCT kafka_offset), min(kafka_offset), max(kafka_offset) \
             FROM (SELECT kafka_partition, kafka_offset FROM events UNION ALL SELECT kafka_partition, kafka_offset FROM rejected_events) x \
             GROUP BY 1 ORDER BY 1",
            &[],
        )
        .await
        .unwrap();
    let mut ends = BTreeMap::new();
    for r in &rows {
        let (p, n, distinct, min, max): (i32, i64, i64, i64, i64) =
            (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
        assert_eq!(n, distinct, "partition {p}: no duplicates");
        assert_eq!(min, 0, "partition {p}: starts at offset 0");
        assert_eq!(max + 1, n, "partition {p}: no gaps");
        ends.insert(p, n);
    }
    let stored: BTreeMap<i32, i64> = c
        .query(
            "SELECT kafka_partition, next_offset FROM consumer_offsets WHERE group_id = $1 AND topic = $2",
            &[&group, &topic],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(stored, ends, "stored offsets = last offset + 1");
    ends
}

/// Waits for `child` to exit 0 within `limit`; kills it and fails otherwise.
pub fn wait_exit_success(mut child: std::process::Child, limit: Duration, what: &str) {
    let start = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "{what}: exited with {status}");
            return;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("{what}: did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A child process killed (and reaped) when dropped, so that a failing test
/// leaves no `run` behind.
pub struct Reaped(Option<std::process::Child>);

impl Reaped {
    pub fn new(child: std::process::Child) -> Self {
        Reaped(Some(child))
    }

    /// The child, no longer killed on drop.
    pub fn into_inner(mut self) -> std::process::Child {
        self.0.take().expect("child present until dropped")
    }
}

impl std::ops::Deref for Reaped {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        self.0.as_ref().expect("child present until dropped")
    }
}

impl std::ops::DerefMut for Reaped {
    fn deref_mut(&mut self) -> &mut Self::Target {
        self.0.as_mut().expect("child present until dropped")
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Messages stored so far: valid ones in `events` plus rejects.
pub async fn stored_messages(c: &tokio_postgres::Client) -> Result<i64, tokio_postgres::Error> {
    c.query_one(
        "SELECT (SELECT count(*) FROM events) + (SELECT count(*) FROM rejected_events)",
        &[],
    )
    .await
    .map(|r| r.get(0))
}

/// Runs `cmd`, asserts it exits 0, and returns its stdout.
pub fn succeed(mut cmd: std::process::Command) -> String {
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// `energy-stream verify` (every KPI equals its recomputation) exits 0.
pub fn verify_ok(url: &str, extra: &[&str]) -> String {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_energy-stream"));
    cmd.arg("verify")
        .args(extra)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("DATABASE_URL", url);
    succeed(cmd)
}

/// Every KPI view's rows (without `updated_at`), by KPI name.
pub async fn kpi_snapshot(c: &tokio_postgres::Client) -> Vec<(String, Vec<String>)> {
    let names: Vec<String> = c
        .query("SELECT name FROM kpi_registry ORDER BY name", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut out = Vec::new();
    for n in names {
        let rows = relation_rows(c, &n, &["updated_at"]).await;
        out.push((n, rows));
    }
    out
}

/// Valid events at `offsets`, one message each, from `customers` customers.
pub fn sample_messages(offsets: std::ops::Range<usize>, customers: usize) -> Vec<Option<Vec<u8>>> {
    offsets
        .map(|i| {
            let customer = format!("C{}", i % customers);
            Some(event(TYPES[i % 7], &customer, i as i64, i as u32).into_bytes())
        })
        .collect()
}

/// A fresh directory holding the KPI files `files` (name, SQL).
pub fn kpi_dir(files: &[(&str, &str)]) -> energy_stream::kpi::KpiConfig {
    let dir = scratch_dir().join(unique("kpis"));
    std::fs::create_dir_all(&dir).unwrap();
    for (name, sql) in files {
        std::fs::write(dir.join(name), sql).unwrap();
    }
    energy_stream::kpi::KpiConfig {
        dir,
        ..Default::default()
    }
}

/// Waits up to 60 s for `sql` (one boolean) to be true in `db`. It connects
/// for each look, so it sees through a Postgres restart; a table the
/// pipeline has not created yet, or a server that is down, reads as false.
pub async fn wait_until(db: &tokio_postgres::Config, sql: &str, what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok((c, conn)) = db.connect(tokio_postgres::NoTls).await {
            tokio::spawn(conn);
            if let Ok(row) = c.query_one(sql, &[]).await
                && row.get::<_, Option<bool>>(0) == Some(true)
            {
                return;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "waited 60 s for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `pipeline::run` in a task, until [`Running::stop`] shuts it down as
/// SIGTERM does.
pub struct Running {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<
        Result<energy_stream::pipeline::RunSummary, energy_stream::pipeline::PipelineError>,
    >,
}

impl Running {
    pub fn spawn(
        cfg: energy_stream::config::PipelineConfig,
        metrics: std::sync::Arc<energy_stream::telemetry::Metrics>,
    ) -> Running {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(energy_stream::pipeline::run(cfg, metrics, async {
            let _ = stopped.await;
        }));
        Running { stop, task }
    }

    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Shuts the pipeline down; panics unless it ends without error within 60 s.
    pub async fn stop(self) -> energy_stream::pipeline::RunSummary {
        self.stop_result().await.expect("no error")
    }

    /// Shuts the pipeline down and returns how it ended; panics unless it
    /// ends within 60 s.
    pub async fn stop_result(
        self,
    ) -> Result<energy_stream::pipeline::RunSummary, energy_stream::pipeline::PipelineError> {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(60), self.task)
            .await
            .expect("stops within 60 s of the shutdown")
            .unwrap()
    }
}
