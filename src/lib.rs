//! energy-stream: energy-retail events from Kafka into PostgreSQL through Arrow
//! micro-batches, exactly once.
//!
//! # Layout
//!
//! One module per stage of the data path, in the order data flows:
//!
//! | module | owns |
//! |---|---|
//! | [`source`] | the Kafka consumer-group member: assignment at the offsets stored in Postgres, ownership generations, pause/resume, the group-commit copy |
//! | [`decode`] | message bytes → one Arrow `RecordBatch` per micro-batch, without a JSON tree per message |
//! | [`validate`] | the business rules: a decoded batch → valid events + rejects with their reason |
//! | [`kpi`] | KPI files in `queries/`: planning with DataFusion, per-batch partial aggregates, the distinct members (in memory and as a log), their exact merge into Postgres, backfill and verify |
//! | [`sink`] | Postgres: connections, migrations (`sql/`), COPY BINARY from Arrow, the one transaction per batch, the stored offsets |
//! | [`pipeline`] | the only place that knows the stages' channels: intake thread, compute task, the writer's two connection lanes and their commit order, retries, shutdown order, the in-process restart when KPI files change |
//! | [`telemetry`] | every metric name, logging set-up, `/metrics` `/healthz` `/readyz` |
//! | [`config`] | the CLI, env fallbacks, secrets; typed settings for the stages |
//! | [`event`] | the shared contract: event types, Arrow schemas between stages, reject reasons |
//!
//! Tools around the pipeline: [`generate`] (sample data), [`produce`] (replay
//! JSONL into Kafka, or live events), [`demo`] (the newcomer's one command),
//! [`bench`] (the throughput race against Postgres' COPY) and [`localpg`]
//! (a throwaway Postgres from the installed binaries, for the demo and tests).
//! [`cli`] is the edge: it turns the command line into typed configs.
//!
//! The one data path: Kafka consumer group → micro-batch (max rows / max
//! linger / max bytes) → decode → validate → KPI partials → one Postgres transaction
//! holding the COPY of the valid rows, the rejects, the KPI merges and the next
//! offsets → COMMIT → Kafka group commit.

pub mod bench;
pub mod cli;
pub mod config;
pub mod decode;
pub mod demo;
pub mod event;
pub mod generate;
pub mod kpi;
pub mod localpg;
pub mod pipeline;
pub mod produce;
pub mod sink;
pub mod source;
pub mod telemetry;
pub mod validate;
