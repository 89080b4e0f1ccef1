//! Per-stage throughput over batch sizes: `cargo bench --bench stages`.
//!
//! Each stage runs on its own input, built outside the timed part, so the
//! events/s it prints is that stage's ceiling for one core. Read them with
//! `pipeline_batch` (the whole batch, into Postgres) to choose
//! `--batch-max-rows`: see BENCHMARKS.md.

mod common;

use std::hint::black_box;
use std::time::Duration;

use bytes::BytesMut;
use chrono::Utc;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use energy_stream::validate::{ValidationRules, validate};

fn group<'a>(
    c: &'a mut Criterion,
    name: &str,
) -> criterion::BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut g = c.benchmark_group(name);
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    g
}

fn benches(c: &mut Criterion) {
    let all = common::messages(*common::SIZES.last().unwrap());
    let (rt, engine) = common::runtime_and_kpis();
    let rules = ValidationRules::default();

    let mut g = group(c, "decode");
    for n in common::SIZES {
        let msgs = &all[..n];
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| black_box(common::decode(msgs, 0)))
        });
    }
    g.finish();

    let mut g = group(c, "validate");
    for n in common::SIZES {
        let decoded = common::decode(&all[..n], 0);
        let now = Utc::now();
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| black_box(validate(&decoded, &rules, now).unwrap()))
        });
    }
    g.finish();

    let mut g = group(c, "kpi");
    for n in common::SIZES {
        let valid = validate(&common::decode(&all[..n], 0), &rules, Utc::now())
            .unwrap()
            .valid;
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| black_box(rt.block_on(engine.compute(&valid)).unwrap()))
        });
    }
    g.finish();

    let mut g = group(c, "copy_encode");
    for n in common::SIZES {
        let valid = validate(&common::decode(&all[..n], 0), &rules, Utc::now())
            .unwrap()
            .valid;
        let mut buf = BytesMut::with_capacity(n * 128);
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                buf.clear();
                energy_stream::sink::copy::encode_batch(&valid, &mut buf).unwrap();
                black_box(buf.len())
            })
        });
    }
    g.finish();
}

criterion_group!(stages, benches);
criterion_main!(stages);
