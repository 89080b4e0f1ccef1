//! Fault-suite scenarios 5 and 6, with `run` as a process on the real broker:
//! Postgres away for 60 s under a growing backlog (no offset advances, memory
//! stays bounded, not ready, then full recovery), and the broker stopped for
//! 30 s and started again (no crash, reconnects, nothing lost). Also: SIGTERM
//! while the broker does not answer at all still ends `run`.

mod common;

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use energy_stream::localpg::LocalPostgres;

const BIN: &str = env!("CARGO_BIN_EXE_energy-stream");

/// `run` with default batch sizes (the memory promise is about defaults).
fn spawn_run(brokers: &str, topic: &str, group: &str, db: &str, metrics: &str) -> Reaped {
    Reaped::new(
        Command::new(BIN)
            .args([
                "run",
                "--brokers",
                brokers,
                "--topic",
                topic,
                "--group-id",
                group,
                "--metrics-addr",
                metrics,
            ])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("DATABASE_URL", db)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    )
}

fn generated(events: u64, seed: u64) -> Vec<Option<Vec<u8>>> {
    generated_messages(&energy_stream::generate::GenerateConfig {
        events,
        customers: 2_000,
        bad_ratio: 0.01,
        seed,
        ..Default::default()
    })
}

/// The status line of an HTTP GET, or "" while nothing listens.
fn status(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.lines().next().unwrap_or_default().to_string()
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn sigterm_and_wait(child: Child, limit: Duration) {
    // SAFETY: plain kill(2) on a child we spawned and have not reaped.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    wait_exit_success(child, limit, "run after SIGTERM");
}

async fn pg_offsets(c: &tokio_postgres::Client) -> Vec<(i32, i64)> {
    c.query(
        "SELECT kafka_partition, next_offset FROM consumer_offsets ORDER BY 1",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

/// Waits until `n` messages are stored (events + rejects), or panics.
async fn wait_stored(c: &tokio_postgres::Client, n: i64, limit: Duration, child: &mut Child) {
    let started = Instant::now();
    loop {
        let got = stored_messages(c).await.unwrap_or(0);
        if got >= n {
            return;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "run exited early with {got} of {n} stored"
        );
        assert!(
            started.elapsed() < limit,
            "only {got} of {n} stored after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// R == P: per partition the offsets 0..n once each, and the stored offset n.
async fn check_exactly_once(c: &tokio_postgres::Client, group: &str, topic: &str, produced: i64) {
    let ends = assert_exactly_once_by_position(c, group, topic).await;
    assert_eq!(
        ends.values().sum::<i64>(),
        produced,
        "every produced message stored once"
    );
}

/// The group's offsets as Kafka has them (the copy `run` commits after
/// Postgres), per partition.
fn kafka_committed(brokers: &str, group: &str, topic: &str, partitions: i32) -> BTreeMap<i32, i64> {
    use rdkafka::config::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    c.committed_offsets(tpl, Duration::from_secs(10))
        .unwrap()
        .elements()
        .iter()
        .map(|e| {
            let o = match e.offset() {
                Offset::Offset(o) => o,
                _ => -1,
            };
            (e.partition(), o)
        })
        .collect()
}

/// Scenario 5. Postgres stops while `run` is committing; during the 60 s
/// outage 700 000 more events (over 100 MiB) arrive. Passes when no offset
/// advances (in Postgres, nor the copy in the Kafka group), the consumer's
/// resident memory grows by less than 64 MiB (it stops polling once two
/// batches wait and librdkafka's prefetch queue is bounded), `/readyz` is
/// 503 while `/healthz` stays 200, and after Postgres returns everything is
/// stored exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_away_for_60_seconds_pauses_intake_and_recovers() {
    let pg = std::sync::Arc::new(
        tokio::task::spawn_blocking(|| LocalPostgres::start().expect("postgres"))
            .await
            .unwrap(),
    );
    let db = fresh_db_on(&pg.url(), "away").await;
    let broker = Broker::get();
    let topic = unique("away");
    let partitions = 4;
    create_topic(&broker.brokers, &topic, partitions);
    let before = generated(50_000, 51);
    let during = generated(700_000, 52);
    let during_bytes: usize = during.iter().flatten().map(Vec::len).sum();
    let produced = (before.len() + during.len()) as i64;
    send_raw(&broker.brokers, &topic, &before);

    let group = unique("away-g");
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut child = spawn_run(&broker.brokers, &topic, &group, &db_url(&db), &metrics);
    let c = client(&db).await;
    wait_stored(
        &c,
        before.len() as i64,
        Duration::from_secs(180),
        &mut child,
    )
    .await;
    assert!(
        status(&metrics, "/readyz").contains("200"),
        "ready while committing"
    );
    let pg_offsets_before = pg_offsets(&c).await;
    drop(c);

    {
        let pg = pg.clone();
        tokio::task::spawn_blocking(move || pg.stop_immediate().unwrap())
            .await
            .unwrap();
    }
    let outage = Instant::now();
    let rss_at_stop = rss_kb(child.id());
    let sender = {
        let brokers = broker.brokers.clone();
        let topic = topic.clone();
        std::thread::spawn(move || send_raw(&brokers, &topic, &during))
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    let kafka_before = kafka_committed(&broker.brokers, &group, &topic, partitions);
    let mut rss_max = rss_at_stop;
    let mut not_ready = 0;
    while outage.elapsed() < Duration::from_secs(60) {
        assert!(
            child.try_wait().unwrap().is_none(),
            "run must survive the outage"
        );
        let rss = rss_kb(child.id());
        rss_max = rss_max.max(rss);
        if outage.elapsed().as_secs().is_multiple_of(10) {
            eprintln!(
                "{:>3} s into the outage: rss {} MiB",
                outage.elapsed().as_secs(),
                rss / 1024
            );
        }
        if outage.elapsed() > Duration::from_secs(10) {
            assert!(status(&metrics, "/healthz").contains("200"), "alive");
            if status(&metrics, "/readyz").contains("503") {
                not_ready += 1;
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(
        not_ready >= 45,
        "/readyz was 503 in only {not_ready} of ~50 checks"
    );
    sender.join().unwrap();
    assert_eq!(
        kafka_committed(&broker.brokers, &group, &topic, partitions),
        kafka_before,
        "no offset reaches the Kafka group while Postgres is away"
    );
    let grown_mb = (rss_max.saturating_sub(rss_at_stop)) / 1024;
    eprintln!(
        "postgres away 60 s: rss {} MiB at the stop, max {} MiB; backlog {} MiB",
        rss_at_stop / 1024,
        rss_max / 1024,
        during_bytes >> 20
    );

    assert!(
        during_bytes > 100 << 20,
        "the backlog ({during_bytes} bytes) must dwarf the bound"
    );
    assert!(
        grown_mb < 64,
        "memory grew by {grown_mb} MiB while {} MiB waited in the topic",
        during_bytes >> 20
    );
    {
        let pg = pg.clone();
        tokio::task::spawn_blocking(move || pg.start_again().unwrap())
            .await
            .unwrap();
    }
    let c = client(&db).await;
    assert_eq!(
        pg_offsets(&c).await,
        pg_offsets_before,
        "no offset advanced in Postgres during the outage"
    );
    wait_stored(&c, produced, Duration::from_secs(600), &mut child).await;
    let started = Instant::now();
    while !status(&metrics, "/readyz").contains("200") {
        assert!(started.elapsed() < Duration::from_secs(30), "ready again");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    sigterm_and_wait(child.into_inner(), Duration::from_secs(60));
    check_exactly_once(&c, &group, &topic, produced).await;
}

/// What both broker scenarios stand on: a private broker that can be
/// restarted without losing its log, a topic of 3 partitions loaded with
/// `first`, a fresh database, and `run` consuming the topic into it.
struct BrokerRig {
    broker: Broker,
    db: String,
    topic: String,
    group: String,
    metrics: String,
    c: tokio_postgres::Client,
}

impl BrokerRig {
    async fn new(prefix: &str, first: &[Option<Vec<u8>>]) -> BrokerRig {
        let broker = Broker::own_restartable();
        let db = fresh_db(prefix).await;
        let topic = unique(prefix);
        create_topic(&broker.brokers, &topic, 3);
        send_raw(&broker.brokers, &topic, first);
        BrokerRig {
            broker,
            c: client(&db).await,
            db: db_url(&db),
            topic,
            group: unique(&format!("{prefix}-g")),
            metrics: format!("127.0.0.1:{}", free_port()),
        }
    }

    fn spawn_run(&self) -> Reaped {
        spawn_run(
            &self.broker.brokers,
            &self.topic,
            &self.group,
            &self.db,
            &self.metrics,
        )
    }
}

/// Scenario 6. The broker (tansu, keeping its log in a SQLite file so that a
/// restart loses nothing) is stopped for 30 s mid-stream and started again on
/// the same port. Passes when `run` stays up (and says it is not ready), then
/// reconnects, and every message, before and after, is stored exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_down_for_30_seconds_then_back() {
    let first = generated(20_000, 61);
    let second = generated(20_000, 62);
    let produced = (first.len() + second.len()) as i64;
    let mut rig = BrokerRig::new("brokerdown", &first).await;
    let metrics = rig.metrics.clone();
    let mut child = rig.spawn_run();
    // Stop the broker once part of the first load is in.
    wait_stored(&rig.c, 2_000, Duration::from_secs(120), &mut child).await;
    rig.broker.kill();
    let down = Instant::now();
    let mut not_ready = 0;
    while down.elapsed() < Duration::from_secs(30) {
        assert!(
            child.try_wait().unwrap().is_none(),
            "run must survive the broker outage"
        );
        assert!(status(&metrics, "/healthz").contains("200"), "alive");
        if down.elapsed() > Duration::from_secs(20) && status(&metrics, "/readyz").contains("503") {
            not_ready += 1;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(
        not_ready >= 5,
        "/readyz says not ready while the broker is away"
    );
    rig.broker.start();
    send_raw(&rig.broker.brokers, &rig.topic, &second);
    wait_stored(&rig.c, produced, Duration::from_secs(300), &mut child).await;
    sigterm_and_wait(child.into_inner(), Duration::from_secs(60));
    check_exactly_once(&rig.c, &rig.group, &rig.topic, produced).await;
}

/// A broker that stops answering (SIGSTOP on tansu, as a frozen host, a
/// paused container or a network that drops packets does) when `run` gets
/// SIGTERM: `run` still exits 0, with everything it consumed committed. It
/// does not wait for the broker to acknowledge that it left the group; the
/// offsets live in Postgres, so the next run stores the rest exactly once.
/// Regression: the Kafka client's close waited for the broker forever, so
/// SIGTERM never ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_the_broker_is_frozen_exits() {
    let first = generated(100_000, 71);
    let second = generated(5_000, 72);
    let produced = (first.len() + second.len()) as i64;
    // Restartable, for the second half below.
    let mut rig = BrokerRig::new("brokerfrozen", &first).await;
    let mut child = rig.spawn_run();
    // Frozen mid-stream, with requests in flight that nobody answers.
    wait_stored(&rig.c, 10_000, Duration::from_secs(120), &mut child).await;
    rig.broker.freeze();
    tokio::time::sleep(Duration::from_secs(2)).await;
    // A bound on hanging, not a speed check: the drain timeout is 30 s. A
    // failure kills `run`, and dropping the broker ends it too.
    sigterm_and_wait(child.into_inner(), Duration::from_secs(90));
    // What was stored is whole: every row once, offsets at the rows' end.
    assert_exactly_once_by_position(&rig.c, &rig.group, &rig.topic).await;

    // The member that could not say it left stays in the group until the
    // broker expires it; tansu kept such a member for over 5 minutes, which
    // blocks the next assignment. A restart of the broker forgets it.
    rig.broker.kill();
    rig.broker.start();
    send_raw(&rig.broker.brokers, &rig.topic, &second);
    let mut child = rig.spawn_run();
    wait_stored(&rig.c, produced, Duration::from_secs(120), &mut child).await;
    sigterm_and_wait(child.into_inner(), Duration::from_secs(60));
    check_exactly_once(&rig.c, &rig.group, &rig.topic, produced).await;
}
