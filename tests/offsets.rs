//! The offsets a batch stores, against a real Postgres: first writes insert,
//! later ones advance every partition in one statement, a stale expectation
//! is fenced, and two consumers racing for a new partition never overwrite
//! each other.

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
        })
        .collect()
}

/// A batch that carries only offsets, through the real transaction.
async fn prepare<'c>(
    client: &'c mut tokio_postgres::Client,
    members: &Memberships,
    offsets: &[PartitionOffsets],
) -> Result<sink::Prepared<'c>, SinkError> {
    let events = RecordBatch::new_empty(event_schema());
    let rejects = RecordBatch::new_empty(reject_schema());
    let write = BatchWrite {
        group_id: "g",
        topic: "t",
        events: &events,
        rejects: &rejects,
        offsets,
        kpis: &[],
        members,
        stale_kpis: &[],
        abort_mid_copy: false,
    };
    sink::prepare(client, &write).await
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

    // A consumer that still expects the old position is fenced before it writes.
    let stale = offsets(&[(0, Some(10), 30)]);
    match prepare(&mut b, &members, &stale).await {
        Err(SinkError::Fenced {
            partition: 0,
            stored: Some(20),
            expected: Some(10),
        }) => {}
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
