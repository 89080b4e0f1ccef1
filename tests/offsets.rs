//! The offsets a batch stores, against a real Postgres: first writes insert,
//! later ones advance every partition in one statement, a stale expectation
//! is fenced, two consumers racing for a new partition never overwrite
//! each other, a batch copied while the one before is still open commits
//! only after it, a writer frozen inside its transaction lets go of its
//! locks, and a writer's long lock wait is told with the session that holds
//! it.

mod common;

use std::collections::BTreeMap;

use common::*;
use datafusion::arrow::record_batch::RecordBatch;
use energy_stream::event::{event_schema, reject_schema};
use energy_stream::kpi::Memberships;
use energy_stream::sink::{self, BatchWrite, PartitionOffsets, SinkError};

fn offsets(list: &[(i32, Option<i64>, i64)]) -> Vec<PartitionOffsets> {
    list.iter()
        .map(|&(partition, expected, next)| PartitionOffsets {
            partition,
            expected,
            next,
            last: energy_stream::source::LastWritten {
                timestamp_ms: None,
                fingerprint: energy_stream::source::fingerprint(None),
            },
        })
        .collect()
}

/// A batch of `events` (no rejects, no KPIs) that stores `offsets`.
fn write<'a>(
    events: &'a RecordBatch,
    rejects: &'a RecordBatch,
    offsets: &'a [PartitionOffsets],
    members: &'a Memberships,
) -> BatchWrite<'a> {
    BatchWrite {
        group_id: "g",
        topic: "t",
        events,
        rejects,
        offsets,
        kpis: &[],
        members,
        stale_kpis: &[],
        claim: false,
        abort_mid_copy: false,
    }
}

/// A batch that carries only offsets, through the real transaction.
async fn prepare<'c>(
    client: &'c mut tokio_postgres::Client,
    members: &Memberships,
    offsets: &[PartitionOffsets],
) -> Result<sink::Prepared<'c>, SinkError> {
    let events = RecordBatch::new_empty(event_schema());
    let rejects = RecordBatch::new_empty(reject_schema());
    sink::prepare(client, &write(&events, &rejects, offsets, members)).await
}

async fn stored(c: &tokio_postgres::Client) -> BTreeMap<i32, i64> {
    c.query(
        "SELECT kafka_partition, next_offset FROM consumer_offsets WHERE group_id = 'g' AND topic = 't'",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

#[tokio::test]
async fn offsets_advance_together_and_a_racing_consumer_is_fenced_not_overwritten() {
    let db = fresh_db("offsets").await;
    let mut a = client(&db).await;
    let mut b = client(&db).await;
    sink::migrate::migrate(&mut a).await.unwrap();
    let members = Memberships::new(1000);

    // First batch: every partition is new.
    let first = offsets(&[(0, None, 10), (1, None, 5)]);
    prepare(&mut a, &members, &first)
        .await
        .unwrap()
        .commit()
        .await
        .unwrap();
    assert_eq!(stored(&a).await, BTreeMap::from([(0, 10), (1, 5)]));

    // Known partitions advance together, and a new one joins in the same batch.
    let second = offsets(&[(0, Some(10), 20), (1, Some(5), 7), (3, None, 1)]);
    prepare(&mut a, &members, &second)
        .await
        .unwrap()
        .commit()
        .await
        .unwrap();
    assert_eq!(stored(&a).await, BTreeMap::from([(0, 20), (1, 7), (3, 1)]));

    // A consumer that still expects the old position is fenced; nothing it wrote stays.
    let stale = offsets(&[(0, Some(10), 30)]);
    match prepare(&mut b, &members, &stale).await {
        Err(
            e @ SinkError::Fenced {
                partition: 0,
                stored: Some(20),
                expected: Some(10),
            },
        ) => assert!(e.to_string().contains("another consumer"), "{e}"),
        Err(e) => panic!("expected the stale batch to be fenced, got {e}"),
        Ok(_) => panic!("expected the stale batch to be fenced, it was written"),
    }

    // Two consumers take the same new partition: the second one to insert
    // waits for the first, then loses, and the first one's offset stays.
    let winner = prepare(&mut a, &members, &offsets(&[(2, None, 3)]))
        .await
        .unwrap();
    let loser = tokio::spawn(async move {
        let members = Memberships::new(1000);
        match prepare(&mut b, &members, &offsets(&[(2, None, 9)])).await {
            Err(e @ SinkError::Fenced { .. }) => Ok(e.to_string()),
            Err(e) => Err(format!("expected fenced, got {e}")),
            Ok(p) => {
                p.commit().await.unwrap();
                Err("the racing consumer wrote its offset".to_string())
            }
        }
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    winner.commit().await.unwrap();
    let fenced = loser.await.unwrap().unwrap();
    assert!(
        fenced.starts_with("partition 2:"),
        "the error names the partition: {fenced}"
    );
    assert_eq!(
        stored(&a).await,
        BTreeMap::from([(0, 20), (1, 7), (2, 3), (3, 1)])
    );
}

/// The writer COPYs batch N+1 on a second connection while batch N still
/// merges and commits: the COPY must not wait for batch N, and batch N+1 is
/// only good if batch N commits; when it rolls back, N+1 is fenced.
#[tokio::test]
async fn a_batch_copied_while_the_one_before_is_open_commits_only_after_it() {
    let db = fresh_db("offsets_overlap").await;
    let mut a = client(&db).await;
    let mut b = client(&db).await;
    sink::migrate::migrate(&mut a).await.unwrap();
    let members = Memberships::new(1000);
    let lines: Vec<String> = (0..20)
        .map(|i| event("user_login", &format!("C{i}"), i, i as u32))
        .collect();
    let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
    let all = validated(&lines);
    assert_eq!(all.valid.num_rows(), 20);
    let rejects = RecordBatch::new_empty(reject_schema());
    let (n0, n1, n2, n3) = (
        all.valid.slice(0, 5),
        all.valid.slice(5, 5),
        all.valid.slice(10, 5),
        all.valid.slice(15, 5),
    );
    let o0 = offsets(&[(0, None, 5)]);
    let o1 = offsets(&[(0, Some(5), 10)]);
    let o2 = offsets(&[(0, Some(10), 15)]);
    let o3 = offsets(&[(0, Some(15), 20)]);
    let bw = |events, offsets| write(events, &rejects, offsets, &members);
    let wait = std::time::Duration::from_secs(30);

    // Batch 0 is written but not committed; batch 1's COPY goes ahead anyway.
    let (w0, w1) = (bw(&n0, &o0), bw(&n1, &o1));
    let p0 = sink::prepare(&mut a, &w0).await.unwrap();
    let c1 = tokio::time::timeout(wait, sink::begin_copy(&mut b, &w1))
        .await
        .expect("the COPY of the next batch waited for the open batch before it")
        .unwrap();
    p0.commit().await.unwrap();
    c1.finish(&w1).await.unwrap().commit().await.unwrap();
    assert_eq!(stored(&a).await, BTreeMap::from([(0, 10)]));
    assert_eq!(events_stored(&a).await, 10);

    // Batch 2 gives up (a rebalance, an error): batch 3, copied meanwhile,
    // is fenced and its rows go with it.
    let (w2, w3) = (bw(&n2, &o2), bw(&n3, &o3));
    let p2 = sink::prepare(&mut a, &w2).await.unwrap();
    let c3 = tokio::time::timeout(wait, sink::begin_copy(&mut b, &w3))
        .await
        .expect("the COPY of the next batch waited for the open batch before it")
        .unwrap();
    p2.rollback().await.unwrap();
    match c3.finish(&w3).await {
        // Regression: this, its own batch given up, was blamed on "another
        // consumer".
        Err(
            e @ SinkError::Fenced {
                partition: 0,
                stored: Some(10),
                expected: Some(15),
            },
        ) => assert!(
            e.to_string().contains("a batch of its own") && !e.to_string().contains("another"),
            "{e}"
        ),
        Err(e) => panic!("expected the batch after a rolled-back one to be fenced, got {e}"),
        Ok(_) => panic!("the batch after a rolled-back one was written"),
    }
    assert_eq!(stored(&a).await, BTreeMap::from([(0, 10)]));
    assert_eq!(events_stored(&a).await, 10);
}

async fn events_stored(c: &tokio_postgres::Client) -> i64 {
    c.query_one("SELECT count(*) FROM events", &[])
        .await
        .unwrap()
        .get(0)
}

/// Regression: a consumer frozen inside a batch's transaction (`docker
/// pause`, a stalled VM) kept its locks, the offsets' and the KPI
/// registry's, and every other consumer of the database waited until it
/// thawed. Postgres now ends a writer's session that idles inside a
/// transaction, and the locks go with it.
#[tokio::test]
async fn a_writer_frozen_inside_its_transaction_lets_go_of_its_locks() {
    let cfg = fresh_db("frozen_writer").await;
    let mut admin = client(&cfg).await;
    sink::migrate::migrate(&mut admin).await.unwrap();
    let mut db = sink::Database::new(cfg.clone());
    db.timeout = std::time::Duration::from_secs(1);
    let frozen = db.connect_writer().await.unwrap();
    frozen
        .batch_execute(
            "BEGIN; INSERT INTO consumer_offsets (group_id, topic, kafka_partition, next_offset) \
             VALUES ('g', 't', 0, 1)",
        )
        .await
        .unwrap();
    // The frozen consumer sends nothing more; another one wants the row.
    let started = std::time::Instant::now();
    admin
        .batch_execute(
            "SET lock_timeout = '30s'; INSERT INTO consumer_offsets \
             (group_id, topic, kafka_partition, next_offset) VALUES ('g', 't', 0, 5)",
        )
        .await
        .expect("the frozen writer's lock is let go");
    let waited = started.elapsed();
    assert!(
        waited >= std::time::Duration::from_secs(5),
        "the lock was held at first: {waited:?}"
    );
    assert_eq!(stored(&admin).await, BTreeMap::from([(0, 5)]));
    // What the frozen one finds when it thaws: its session is gone.
    assert!(frozen.batch_execute("COMMIT").await.is_err());
}

/// A writer held up by a lock only timed out and was retried; nothing said
/// who held it. The idle probe's look names the holder of each long wait of
/// this consumer's sessions (same role, same `application_name`), and
/// leaves other clients' waits and short ones alone.
#[tokio::test]
async fn a_writer_waiting_for_a_lock_is_told_who_holds_it() {
    let cfg = fresh_db("lock_wait").await;
    let named = |name: &str| {
        let mut c = cfg.clone();
        c.application_name(name);
        c
    };
    let holder = client(&named("nightly-maintenance")).await;
    holder
        .batch_execute(
            "CREATE TABLE held_rows (n int); INSERT INTO held_rows VALUES (1); \
             CREATE TABLE held_table (n int)",
        )
        .await
        .unwrap();
    holder
        .batch_execute(
            "BEGIN; SELECT n FROM held_rows FOR UPDATE; \
             LOCK TABLE held_table IN ACCESS EXCLUSIVE MODE",
        )
        .await
        .unwrap();
    let holder_pid = backend_pid(&holder).await;
    let waiter = |app: &'static str, sql: &'static str| {
        let cfg = named(app);
        async move {
            let c = client(&cfg).await;
            let pid = backend_pid(&c).await;
            let waiting = tokio::spawn(async move { c.batch_execute(sql).await });
            (pid, waiting)
        }
    };
    let (row_pid, row_wait) = waiter("es-writer", "UPDATE held_rows SET n = 2").await;
    let (table_pid, table_wait) = waiter("es-writer", "SELECT count(*) FROM held_table").await;
    let (_, other_wait) = waiter("someone-else", "SELECT count(*) FROM held_table").await;

    let mut db = sink::Database::new(named("es-writer"));
    db.timeout = std::time::Duration::from_secs(10);
    let probe = db.connect().await.unwrap();
    assert_eq!(
        db.lock_waits(&probe, std::time::Duration::from_secs(60))
            .await
            .unwrap(),
        vec![],
        "waits shorter than asked are left alone"
    );
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let waits = db
        .lock_waits(&probe, std::time::Duration::from_secs(1))
        .await
        .unwrap();
    let told: Vec<_> = waits
        .iter()
        .map(|w| {
            (
                w.pid,
                w.relations.as_deref(),
                w.holder_pid,
                w.holder_application.as_deref(),
                w.holder_state.as_deref(),
            )
        })
        .collect();
    let mut expected = vec![
        (
            row_pid,
            Some("held_rows"),
            holder_pid,
            Some("nightly-maintenance"),
            Some("idle in transaction"),
        ),
        (
            table_pid,
            Some("held_table"),
            holder_pid,
            Some("nightly-maintenance"),
            Some("idle in transaction"),
        ),
    ];
    expected.sort_by_key(|e| e.0);
    assert_eq!(told, expected, "{waits:#?}");
    for w in &waits {
        assert!(w.waiting_for >= std::time::Duration::from_secs(1), "{w:?}");
        assert!(
            w.holder_in_transaction_for
                .is_some_and(|t| t >= w.waiting_for),
            "{w:?}"
        );
        // `local` over a Unix socket, else the address.
        assert!(
            w.holder_client.as_ref().is_some_and(|c| !c.is_empty()),
            "{w:?}"
        );
    }
    let modes: Vec<_> = waits.iter().map(|w| w.mode.as_deref()).collect();
    assert!(
        modes.contains(&Some("AccessShareLock")),
        "the table's wait asks for ACCESS SHARE: {modes:?}"
    );

    holder.batch_execute("COMMIT").await.unwrap();
    for w in [row_wait, table_wait, other_wait] {
        w.await.unwrap().unwrap();
    }
    assert_eq!(
        db.lock_waits(&probe, std::time::Duration::ZERO)
            .await
            .unwrap(),
        vec![],
        "nothing waits once the holder lets go"
    );
}

async fn backend_pid(c: &tokio_postgres::Client) -> i32 {
    c.query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0)
}
