//! One whole batch into a real Postgres, commit included:
//! `cargo bench --bench pipeline_batch`.
//!
//! Timed per batch: decode → validate → every shipped KPI → one transaction
//! (offset fence, COPY of events and rejects, KPI merges, offsets) → COMMIT.
//! It uses `BENCH_DATABASE_URL` (a server it may create a database on) or
//! starts a throwaway cluster from the installed PostgreSQL binaries; with
//! neither it says so and skips, so the other benches still run.

mod common;

use std::time::Duration;

use chrono::Utc;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use energy_stream::localpg::LocalPostgres;
use energy_stream::sink::{self, BatchWrite, PartitionOffsets};
use energy_stream::validate::{ValidationRules, validate};

fn server() -> Option<(String, Option<LocalPostgres>)> {
    if let Ok(url) = std::env::var("BENCH_DATABASE_URL") {
        return Some((url, None));
    }
    match LocalPostgres::start() {
        Ok(pg) => Some((pg.url(), Some(pg))),
        Err(e) => {
            eprintln!(
                "pipeline_batch skipped: no Postgres ({e}). Install it (apt-get install -y postgresql) \
                 or set BENCH_DATABASE_URL."
            );
            None
        }
    }
}

fn benches(c: &mut Criterion) {
    let Some((url, _pg)) = server() else {
        return;
    };
    let (rt, engine) = common::runtime_and_kpis();
    let mut client = rt.block_on(async {
        let admin: tokio_postgres::Config = url.parse().expect("a Postgres URL");
        let a = sink::connect(&admin).await.expect("connect");
        let db = format!("energy_stream_bench_{}", std::process::id());
        // Two statements: DROP DATABASE refuses to run in a multi-statement string.
        a.batch_execute(&format!("DROP DATABASE IF EXISTS {db}"))
            .await
            .expect("drop an old bench database");
        a.batch_execute(&format!("CREATE DATABASE {db}"))
            .await
            .expect("create the bench database");
        let mut cfg = admin.clone();
        cfg.dbname(&db);
        let mut c = sink::connect(&cfg).await.expect("connect");
        sink::migrate::migrate(&mut c).await.expect("migrate");
        energy_stream::kpi::install(&mut c, &engine)
            .await
            .expect("install KPIs");
        c
    });

    let all = common::messages(*common::SIZES.last().unwrap());
    let rules = ValidationRules::default();
    let mut stored: Option<i64> = None;
    let members = energy_stream::kpi::Memberships::new(1_000_000);
    let mut g = c.benchmark_group("pipeline_batch");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    for n in common::SIZES {
        let msgs = &all[..n];
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                // Each batch continues the partition, so every row is new.
                let first = stored.unwrap_or(0);
                let next = first + n as i64;
                let decoded = common::decode(msgs, first);
                let v = validate(&decoded, &rules, Utc::now()).unwrap();
                rt.block_on(async {
                    let writes = engine.writes(engine.compute(&v.valid).await.unwrap());
                    let offsets = [PartitionOffsets {
                        partition: 0,
                        expected: stored,
                        next,
                        last: energy_stream::source::LastWritten {
                            timestamp_ms: None,
                            fingerprint: energy_stream::source::fingerprint(None),
                        },
                    }];
                    let write = BatchWrite {
                        group_id: "bench",
                        topic: "bench",
                        events: &v.valid,
                        rejects: &v.rejects,
                        offsets: &offsets,
                        kpis: &writes,
                        members: &members,
                        stale_kpis: &[],
                        claim: false,
                        abort_mid_copy: false,
                    };
                    let mut prepared = sink::prepare(&mut client, &write).await.unwrap();
                    let pending = std::mem::take(&mut prepared.pending);
                    prepared.commit().await.unwrap();
                    members.commit(pending);
                });
                stored = Some(next);
            })
        });
    }
    g.finish();
}

criterion_group!(pipeline, benches);
criterion_main!(pipeline);
