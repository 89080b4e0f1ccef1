//! Inputs shared by the benches: realistic messages as the broker delivers them.

use energy_stream::decode::{DecodeConfig, MessageMeta, decode_batch};
use energy_stream::generate::{GenerateConfig, generate};
use energy_stream::kpi::{KpiConfig, KpiEngine};

/// The batch sizes every bench runs over.
pub const SIZES: [usize; 6] = [64, 256, 1_024, 4_096, 16_384, 65_536];

/// `n` generated events (1% of them invalid, as in production), one message each.
pub fn messages(n: usize) -> Vec<Vec<u8>> {
    let cfg = GenerateConfig {
        events: n as u64,
        customers: 5_000,
        days: 7,
        seed: 5,
        bad_ratio: 0.01,
        ..Default::default()
    };
    let mut out = Vec::new();
    generate(&cfg, &mut out).expect("generate");
    out.split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(<[u8]>::to_vec)
        .collect()
}

/// Decodes messages as if read from one partition starting at `first_offset`.
pub fn decode(msgs: &[Vec<u8>], first_offset: i64) -> datafusion::arrow::record_batch::RecordBatch {
    decode_batch(
        DecodeConfig::default(),
        msgs.iter().enumerate().map(|(i, m)| {
            (
                Some(m.as_slice()),
                MessageMeta {
                    partition: 0,
                    offset: first_offset + i as i64,
                    timestamp_ms: Some(1_750_000_000_000),
                },
            )
        }),
    )
}

/// A single-threaded runtime and every shipped KPI file, planned.
pub fn runtime_and_kpis() -> (tokio::runtime::Runtime, KpiEngine) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let engine = rt
        .block_on(KpiEngine::load_dir(&KpiConfig {
            dir: concat!(env!("CARGO_MANIFEST_DIR"), "/queries").into(),
            ..Default::default()
        }))
        .expect("the shipped KPI files load");
    (rt, engine)
}
