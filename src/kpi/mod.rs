//! KPI: the SQL files in `queries/`, computed on each micro-batch with
//! DataFusion and merged into Postgres inside the batch transaction.
//!
//! This module owns the contract of a KPI file ([`plan`]), the plans that run
//! on every batch (built once against a [`slot`], executed per batch), and the
//! Postgres side of a KPI: its state table `kpi_state_<name>` (keys plus the
//! mergeable parts of each measure), one membership log per set of
//! count(DISTINCT) measures over the same expression ([`members`]), the view
//! `<name>` that users query, and the SQL that merges a batch's partial rows
//! (COPY into a staging table, then `INSERT ... ON CONFLICT DO UPDATE` with
//! each measure's rule, keys sorted so that concurrent consumers take row
//! locks in the same order).
//!
//! Because each stored part merges exactly (counts and sums add, min and max
//! take the least and greatest, avg is kept as sum and count, distinct counts
//! grow by genuinely new members), the streamed table equals the query run
//! once over all valid events.

pub mod members;
pub mod plan;
pub mod slot;
mod utc;

use std::sync::Arc;

use datafusion::arrow::array::Int64Array;
use datafusion::arrow::compute::{cast, concat_batches};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::execution_plan::reset_plan_states;
use datafusion::prelude::{SessionConfig, SessionContext};

pub use members::{Memberships, Pending, Writers};
pub use plan::{Func, KpiDef, KpiError, MemberSet};
use plan::{PG_NAME_BYTES, StateCol, quote};

use crate::event::event_schema;

/// Settings of the KPI stage; part of [`crate::config`].
#[derive(Debug, Clone)]
pub struct KpiConfig {
    pub dir: std::path::PathBuf,
    /// DataFusion's memory pool for one batch's KPI work.
    pub memory_limit: usize,
}

impl Default for KpiConfig {
    fn default() -> Self {
        KpiConfig {
            dir: "queries".into(),
            memory_limit: 256 << 20,
        }
    }
}

struct Kpi {
    def: Arc<KpiDef>,
    /// The file it was read from, for errors that ask to fix it.
    file: std::path::PathBuf,
    partial: Arc<dyn ExecutionPlan>,
    /// One per membership set, in [`KpiDef::sets`] order.
    sets: Vec<Arc<dyn ExecutionPlan>>,
}

/// Every KPI, planned once.
pub struct KpiEngine {
    ctx: SessionContext,
    slot: Arc<slot::Slot>,
    kpis: Vec<Kpi>,
    /// KPIs that failed on a batch and are no longer computed by this process.
    disabled: std::sync::Mutex<Vec<bool>>,
}

/// A KPI that failed on a batch and was disabled.
#[derive(Debug, Clone)]
pub struct KpiFailure {
    pub kpi: String,
    pub error: String,
}

/// One batch's contribution to one KPI.
pub struct KpiDelta {
    pub kpi: usize,
    /// keys and partial measures, one row per key.
    pub partial: RecordBatch,
    /// per membership set (index into [`KpiDef::sets`]): rows of keys,
    /// member `v` and flags `f`, one per (keys, member).
    pub distinct: Vec<(usize, RecordBatch)>,
}

/// A staged merge for [`write`]: COPY `batch` into `stage`, then run `merge_sql`.
#[derive(Debug, Clone)]
struct MergeStep {
    /// The temporary staging table.
    stage: String,
    /// Creates `stage` if this session has not yet. It is `ON COMMIT DELETE
    /// ROWS`, and each stage serves one step per batch transaction, so it is
    /// empty whenever a batch starts: no TRUNCATE, which costs a new file per
    /// table per batch (a fifth of a small batch's time in Postgres).
    stage_ddl: String,
    copy_sql: String,
    batch: RecordBatch,
    merge_sql: String,
}

#[derive(Debug, thiserror::Error)]
pub enum KpiLoadError {
    #[error("cannot read the KPI directory {path}: {source}")]
    Dir {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot read the KPI file {path}: {source}")]
    File {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(#[from] KpiError),
    #[error("{count} KPI file(s) are invalid:\n{list}")]
    Many { count: usize, list: String },
    #[error("cannot start planning the KPI files: {0}")]
    Planner(String),
}

/// The stack KPI files are planned on: the deepest expression that
/// [`plan::MAX_KPI_TOKENS`] allows plans within it, in debug builds too
/// (`tests/kpi.rs`). Only the pages touched are ever resident.
pub const PLANNING_STACK: usize = 256 << 20;

/// The stack of the threads that execute KPI plans, for the same reason.
pub const EXECUTION_STACK: usize = 32 << 20;

impl KpiEngine {
    fn context(memory_limit: usize, slot: &Arc<slot::Slot>) -> SessionContext {
        let config = SessionConfig::new()
            .with_target_partitions(1)
            .with_information_schema(false);
        let runtime = RuntimeEnvBuilder::new()
            .with_memory_limit(memory_limit, 1.0)
            .build_arc()
            .expect("a memory-limited runtime");
        let ctx = SessionContext::new_with_config_rt(config, runtime);
        // Same results as DataFusion's date_trunc, without its per-value cost
        // on UTC timestamps (see `utc`).
        ctx.register_udf(utc::date_trunc());
        ctx.register_table(
            "events",
            Arc::new(slot::SlotTable::new(event_schema(), slot.clone())),
        )
        .expect("register events");
        ctx
    }

    /// Loads every `*.sql` in the directory, in name order. Reports every bad
    /// file, not only the first.
    pub async fn load_dir(cfg: &KpiConfig) -> Result<KpiEngine, KpiLoadError> {
        let dir_err = |source| KpiLoadError::Dir {
            path: cfg.dir.display().to_string(),
            source,
        };
        let (files, ignored) = kpi_files(&cfg.dir).map_err(dir_err)?;
        for f in ignored {
            // `Revenue.SQL` looks like a KPI to its author; saying nothing
            // would leave them wondering why its view never appears.
            tracing::warn!(
                file = %f.display(),
                "ignored: KPI files must end in lowercase .sql"
            );
        }
        let mut sources = Vec::new();
        for f in files {
            let sql = std::fs::read_to_string(&f).map_err(|source| KpiLoadError::File {
                path: f.display().to_string(),
                source,
            })?;
            // Editors on Windows start UTF-8 files with a byte-order mark,
            // which the SQL tokenizer refused as an unknown character.
            let sql = match sql.strip_prefix('\u{feff}') {
                Some(rest) => rest.to_string(),
                None => sql,
            };
            sources.push((f, sql));
        }
        Self::from_sources(sources, cfg.memory_limit).await
    }

    /// Plans KPI sources given as (file path, SQL), on a thread of its own
    /// with a stack of [`PLANNING_STACK`]: DataFusion's planner and the
    /// analysis here recurse once per level of an expression, and a
    /// runtime worker's 2 MiB overflowed (an abort, not an error) at about 150
    /// chained operators, in `run` reloading a file that `check` accepted.
    pub async fn from_sources(
        sources: Vec<(std::path::PathBuf, String)>,
        memory_limit: usize,
    ) -> Result<KpiEngine, KpiLoadError> {
        let (done, planned) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("kpi-planner".into())
            .stack_size(PLANNING_STACK)
            .spawn(move || {
                let result = tokio::runtime::Builder::new_current_thread()
                    .build()
                    .map_err(|e| KpiLoadError::Planner(e.to_string()))
                    .and_then(|rt| rt.block_on(Self::plan_sources(sources, memory_limit)));
                let _ = done.send(result);
            })
            .map_err(|e| KpiLoadError::Planner(e.to_string()))?;
        planned.await.map_err(|_| {
            KpiLoadError::Planner("the planning thread ended without a result".into())
        })?
    }

    async fn plan_sources(
        sources: Vec<(std::path::PathBuf, String)>,
        memory_limit: usize,
    ) -> Result<KpiEngine, KpiLoadError> {
        let slot = Arc::new(slot::Slot::default());
        let ctx = Self::context(memory_limit, &slot);
        let mut kpis = Vec::new();
        let mut errors = Vec::new();
        for (path, sql) in sources {
            let name = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let file = path.display().to_string();
            match plan::analyse(&ctx, &file, &name, &sql).await {
                Ok(def) => match Self::physical(&ctx, &def).await {
                    Ok((partial, sets)) => kpis.push(Kpi {
                        def: Arc::new(def),
                        file: path,
                        partial,
                        sets,
                    }),
                    Err(e) => errors.push(KpiError {
                        file,
                        construct: format!("planning failed: {e}"),
                        hint: String::new(),
                    }),
                },
                Err(e) => errors.push(e),
            }
        }
        match errors.len() {
            0 => Ok(KpiEngine {
                ctx,
                slot,
                disabled: std::sync::Mutex::new(vec![false; kpis.len()]),
                kpis,
            }),
            1 => Err(KpiLoadError::Invalid(errors.remove(0))),
            n => Err(KpiLoadError::Many {
                count: n,
                list: errors
                    .iter()
                    .map(|e| format!("  {e}"))
                    .collect::<Vec<_>>()
                    .join("\n"),
            }),
        }
    }

    async fn physical(
        ctx: &SessionContext,
        def: &KpiDef,
    ) -> datafusion::error::Result<(Arc<dyn ExecutionPlan>, Vec<Arc<dyn ExecutionPlan>>)> {
        let state = ctx.state();
        let partial = state
            .create_physical_plan(&state.optimize(&def.partial)?)
            .await?;
        let mut sets = Vec::new();
        for set in &def.sets {
            sets.push(
                state
                    .create_physical_plan(&state.optimize(&set.plan)?)
                    .await?,
            );
        }
        Ok((partial, sets))
    }

    pub fn defs(&self) -> impl Iterator<Item = &KpiDef> {
        self.kpis.iter().map(|k| &*k.def)
    }

    /// Each KPI's name and SQL hash, in engine order: two engines with the
    /// same identity maintain the same tables the same way.
    pub fn identity(&self) -> Vec<(String, String)> {
        self.defs()
            .map(|d| (d.name.clone(), d.hash.clone()))
            .collect()
    }

    pub fn def(&self, idx: usize) -> &KpiDef {
        &self.kpis[idx].def
    }

    /// The file KPI `idx` was read from.
    pub fn file(&self, idx: usize) -> &std::path::Path {
        &self.kpis[idx].file
    }

    pub fn len(&self) -> usize {
        self.kpis.len()
    }

    pub fn is_empty(&self) -> bool {
        self.kpis.is_empty()
    }

    /// Runs every KPI's plans on `events` (in [`event_schema`]).
    pub async fn compute(&self, events: &RecordBatch) -> datafusion::error::Result<Vec<KpiDelta>> {
        self.compute_some(0..self.kpis.len(), events).await
    }

    /// Computes every KPI still enabled, each on its own: a KPI that fails
    /// (DataFusion's memory pool stopping a runaway query, say) is disabled
    /// and reported, and the others go on. The caller must mark a failed
    /// KPI's tables stale, since they stop receiving this batch and later ones.
    pub async fn compute_tolerant(&self, events: &RecordBatch) -> (Vec<KpiDelta>, Vec<KpiFailure>) {
        let mut deltas = Vec::with_capacity(self.kpis.len());
        let mut failures = Vec::new();
        for i in 0..self.kpis.len() {
            if self.is_disabled(i) {
                continue;
            }
            match self.compute_one(i, events).await {
                Ok(d) => deltas.extend(d),
                Err(e) => {
                    self.disabled.lock().expect("not poisoned")[i] = true;
                    failures.push(KpiFailure {
                        kpi: self.kpis[i].def.name.clone(),
                        error: e.to_string(),
                    });
                }
            }
        }
        (deltas, failures)
    }

    pub fn is_disabled(&self, idx: usize) -> bool {
        self.disabled.lock().expect("not poisoned")[idx]
    }

    /// Stops computing the KPI called `name` (its rows failed in Postgres),
    /// if it is one of these.
    pub fn disable(&self, name: &str) {
        if let Some(i) = self.index_of(name) {
            self.disabled.lock().expect("not poisoned")[i] = true;
        }
    }

    /// Whether the KPI called `name` is disabled.
    pub fn is_disabled_named(&self, name: &str) -> bool {
        self.index_of(name).is_some_and(|i| self.is_disabled(i))
    }

    fn index_of(&self, name: &str) -> Option<usize> {
        self.kpis.iter().position(|k| k.def.name == name)
    }

    /// Runs one KPI's plans on `events`.
    pub async fn compute_one(
        &self,
        idx: usize,
        events: &RecordBatch,
    ) -> datafusion::error::Result<Vec<KpiDelta>> {
        self.compute_some(idx..idx + 1, events).await
    }

    async fn compute_some(
        &self,
        which: std::ops::Range<usize>,
        events: &RecordBatch,
    ) -> datafusion::error::Result<Vec<KpiDelta>> {
        let mut out = Vec::with_capacity(which.len());
        if events.num_rows() == 0 {
            return Ok(out);
        }
        self.slot.set(vec![events.clone()]);
        let result = async {
            for i in which {
                let k = &self.kpis[i];
                let cols = k.def.partial_cols();
                let partial = self.run(&k.partial, &cols).await?;
                let mut distinct = Vec::new();
                for (s, plan) in k.sets.iter().enumerate() {
                    distinct.push((s, self.run(plan, &set_cols(&k.def, s)).await?));
                }
                out.push(KpiDelta {
                    kpi: i,
                    partial,
                    distinct,
                });
            }
            Ok(out)
        }
        .await;
        self.slot.set(Vec::new());
        result
    }

    /// Executes a prepared plan and returns one batch whose columns have the
    /// COPY-able types of `cols`, named as the state columns.
    async fn run(
        &self,
        plan: &Arc<dyn ExecutionPlan>,
        cols: &[StateCol],
    ) -> datafusion::error::Result<RecordBatch> {
        let plan = reset_plan_states(plan.clone())?;
        let batches = datafusion::physical_plan::collect(plan.clone(), self.ctx.task_ctx()).await?;
        let batch = concat_batches(&plan.schema(), &batches)?;
        let mut fields = Vec::with_capacity(cols.len());
        let mut arrays = Vec::with_capacity(cols.len());
        for (c, a) in cols.iter().zip(batch.columns()) {
            fields.push(Field::new(&c.name, c.data_type.clone(), true));
            arrays.push(if a.data_type() == &c.data_type {
                a.clone()
            } else {
                cast(a, &c.data_type)?
            });
        }
        Ok(RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays)?)
    }

    /// A batch's deltas, ready for the sink.
    pub fn writes(&self, deltas: Vec<KpiDelta>) -> Vec<KpiWrite> {
        deltas
            .into_iter()
            .map(|d| KpiWrite {
                def: self.kpis[d.kpi].def.clone(),
                partial: d.partial,
                distinct: d.distinct,
            })
            .collect()
    }
}

/// One batch's contribution to one KPI, as the sink writes it.
pub struct KpiWrite {
    pub def: Arc<KpiDef>,
    /// Keys and partial measures, one row per key.
    pub partial: RecordBatch,
    /// Per membership set: rows of keys, member `v` and flags `f`.
    pub distinct: Vec<(usize, RecordBatch)>,
}

/// Merges a batch's KPI writes inside its transaction (into tables named
/// with `suffix`): per KPI, the membership sets decide which members are new
/// ([`Memberships::add`]), then one staged upsert adds everything to the
/// state table. KPIs go in engine order and keys in sorted order, so two
/// consumers take their locks in the same order. Returns rows merged per KPI.
pub async fn write(
    tx: &Transaction<'_>,
    members: &Memberships,
    writes: &[KpiWrite],
    suffix: &str,
    writers: Writers,
    pending: &mut Pending,
) -> Result<Vec<(String, u64)>, SinkError> {
    let mut merged = Vec::with_capacity(writes.len());
    for w in writes {
        if w.partial.num_rows() == 0 {
            continue;
        }
        let counts = if w.def.sets.is_empty() {
            members::Counts::new()
        } else {
            members
                .add(tx, &w.def, &w.distinct, suffix, writers, pending)
                .await?
        };
        let step = main_merge(&w.def, with_counts(&w.def, &w.partial, &counts)?, suffix);
        match writers {
            Writers::Shared => tx.batch_execute(&step.stage_ddl).await?,
            // A backfill's transaction uses each stage once per chunk.
            Writers::Exclusive { .. } => {
                tx.batch_execute(&format!("{}; TRUNCATE {}", step.stage_ddl, step.stage))
                    .await?
            }
        }
        // Postgres checks the keys' values as they arrive in the staging
        // table (U+0000 in text, a time before 4713 BC): refused there, not
        // only at the merge.
        sink::copy_in_judged(tx, &step.copy_sql, &step.batch, |e| refused(&w.def, e)).await?;
        let n = tx
            .execute_typed(&step.merge_sql, &[])
            .await
            .map_err(|e| refused(&w.def, e))?;
        merged.push((w.def.name.clone(), n));
    }
    Ok(merged)
}

/// A KPI merge's error: [`SinkError::KpiRefused`] when Postgres refuses
/// the rows themselves (SQLSTATE classes 22, data exceptions, and 54,
/// program limits), or meets one of their keys twice in one merge (21000:
/// keys DataFusion keeps apart and Postgres' index does not, such as NaN
/// and -NaN), which no retry can change; else as any write error.
fn refused(def: &KpiDef, e: tokio_postgres::Error) -> SinkError {
    let Some(code) = e.code() else {
        return e.into();
    };
    let class = &code.code()[..2];
    if class != "22"
        && class != "54"
        && *code != tokio_postgres::error::SqlState::CARDINALITY_VIOLATION
    {
        return e.into();
    }
    let message = e
        .as_db_error()
        .map_or_else(|| e.to_string(), |db| db.message().to_string());
    let hint = if *code == tokio_postgres::error::SqlState::PROGRAM_LIMIT_EXCEEDED {
        " — a key of this KPI is too long for the unique index over its keys (all keys \
         together must stay under about 2.7 kB): group by a shorter expression (`left(x, 100)`), \
         or lower --max-field-bytes"
    } else {
        ""
    };
    SinkError::KpiRefused {
        kpi: def.name.clone(),
        message: format!("{message}{hint}"),
    }
}

/// The indexes of a KPI's count(DISTINCT) measures, in measure order.
pub(crate) fn distinct_measures(def: &KpiDef) -> Vec<usize> {
    def.measures
        .iter()
        .enumerate()
        .filter(|(_, m)| m.func == Func::CountDistinct)
        .map(|(i, _)| i)
        .collect()
}

/// The partial rows with one more column per distinct measure: how many new
/// members each group gained in this batch (0 when none).
fn with_counts(
    def: &KpiDef,
    partial: &RecordBatch,
    counts: &members::Counts,
) -> Result<RecordBatch, SinkError> {
    let distinct = distinct_measures(def);
    if distinct.is_empty() {
        return Ok(partial.clone());
    }
    let n = partial.num_rows();
    let grps = if counts.is_empty() {
        Vec::new()
    } else {
        members::group_keys(partial, def.keys.len())?
    };
    let matched = grps.iter().filter(|g| counts.contains_key(*g)).count();
    if matched != counts.len() {
        // Every member's group has a partial row; losing a count silently
        // would make the KPI wrong, so refuse the batch instead.
        return Err(SinkError::Fatal(format!(
            "KPI {}: {} group(s) gained distinct members but have no partial row",
            def.name,
            counts.len() - matched
        )));
    }
    let schema = partial.schema();
    let mut fields: Vec<Field> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
    let mut columns = partial.columns().to_vec();
    for (slot, i) in distinct.iter().enumerate() {
        let values: Int64Array = if grps.is_empty() {
            Int64Array::from(vec![0; n])
        } else {
            grps.iter()
                .map(|g| Some(counts.get(g).map_or(0, |c| c[slot])))
                .collect()
        };
        fields.push(Field::new(format!("m{i}"), DataType::Int64, false));
        columns.push(Arc::new(values));
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
        .map_err(|e| SinkError::Fatal(format!("KPI {}: its new distinct counts: {e}", def.name)))
}

fn key_list(def: &KpiDef) -> String {
    def.keys
        .iter()
        .map(|k| quote(&k.col.name))
        .collect::<Vec<_>>()
        .join(", ")
}

fn col_defs<'a>(cols: impl Iterator<Item = &'a StateCol>) -> String {
    cols.map(|c| format!("{} {}", quote(&c.name), c.pg_type))
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn state_table(def: &KpiDef, suffix: &str) -> String {
    format!("kpi_state_{}{suffix}", def.name)
}

/// The membership table of set `set` (`_m<i>` tables are the layout before
/// membership sets, dropped when a KPI is rebuilt).
pub fn members_table(def: &KpiDef, set: usize, suffix: &str) -> String {
    format!("kpi_members_{}_s{set}{suffix}", def.name)
}

/// The columns of a membership set's batch rows: keys, member `v`, flags `f`.
fn set_cols(def: &KpiDef, set: usize) -> Vec<StateCol> {
    let mut cols: Vec<StateCol> = def.keys.iter().map(|k| k.col.clone()).collect();
    cols.push(def.sets[set].member.clone());
    cols.push(StateCol {
        name: "f".into(),
        data_type: datafusion::arrow::datatypes::DataType::Int32,
        pg_type: "integer".into(),
    });
    cols
}

/// DDL of a KPI's state and membership tables (with a name suffix, for backfills).
pub fn create_tables_sql(def: &KpiDef, suffix: &str) -> String {
    let state = state_table(def, suffix);
    let mut cols: Vec<String> = def
        .keys
        .iter()
        .map(|k| format!("{} {}", quote(&k.col.name), k.col.pg_type))
        .collect();
    for m in &def.measures {
        for c in &m.cols {
            // Sums are widened to unbounded numeric so they never overflow.
            let ty = match (m.func, c.pg_type.as_str()) {
                (Func::Count | Func::CountDistinct, _) => "bigint NOT NULL DEFAULT 0".to_string(),
                (Func::Avg, "bigint") if c.name.ends_with("_n") => {
                    "bigint NOT NULL DEFAULT 0".into()
                }
                (Func::Sum | Func::Avg, t)
                    if t.starts_with("numeric") || t == "bigint" || t == "integer" =>
                {
                    "numeric".into()
                }
                (_, t) => t.to_string(),
            };
            cols.push(format!("{} {ty}", quote(&c.name)));
        }
    }
    cols.push("updated_at timestamptz NOT NULL DEFAULT now()".into());
    let mut sql = format!(
        "CREATE TABLE IF NOT EXISTS {state} ({}, CONSTRAINT {state}_keys UNIQUE NULLS NOT DISTINCT ({}));\n",
        cols.join(", "),
        key_list(def)
    );
    // The membership logs: see `members`. No unique index: uniqueness is
    // decided in memory, under the KPI's generation lock. Members are stored
    // uncompressed: pglz on every batch's rows was Postgres' top function.
    for i in 0..def.sets.len() {
        let t = members_table(def, i, suffix);
        sql.push_str(&format!(
            "CREATE TABLE IF NOT EXISTS {t} (grp bytea NOT NULL, gen bigint NOT NULL, members bytea NOT NULL);\n\
             ALTER TABLE {t} ALTER COLUMN members SET STORAGE EXTERNAL;\n\
             CREATE INDEX IF NOT EXISTS {t}_grp ON {t} (grp);\n\
             CREATE INDEX IF NOT EXISTS {t}_gen ON {t} (gen);\n"
        ));
    }
    sql
}

/// The view's columns (keys and outputs), as Postgres expressions over the
/// state table.
fn view_columns(def: &KpiDef) -> String {
    def.outputs
        .iter()
        .map(|o| format!("{} AS {}", o.pg_expr, quote(&o.name)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// What the view reads: the state table, with its text columns in byte
/// order (`COLLATE "C"`), as DataFusion compares text. Under a database's
/// linguistic collation (en-US in the official Postgres image) the view's
/// `min(customer_id) < 'b'` or `greatest(channel, 'B')` read otherwise.
fn view_source(def: &KpiDef, suffix: &str) -> String {
    let table = state_table(def, suffix);
    let cols: Vec<&plan::StateCol> = def
        .keys
        .iter()
        .map(|k| &k.col)
        .chain(def.measures.iter().flat_map(|m| m.cols.iter()))
        .collect();
    if cols.iter().all(|c| c.pg_type != "text") {
        return table;
    }
    let list: Vec<String> = cols
        .iter()
        .map(|c| {
            let n = quote(&c.name);
            if c.pg_type == "text" {
                format!("{n} COLLATE \"C\" AS {n}")
            } else {
                n
            }
        })
        .collect();
    format!("(SELECT {}, updated_at FROM {table}) AS s", list.join(", "))
}

/// The view users query: keys, outputs, updated_at.
///
/// `migrate`'s default privileges give the app role INSERT and UPDATE on
/// every table the owner creates, for the state tables a backfill swaps in;
/// Postgres applies them to views too. A view is only read, so a new one
/// keeps SELECT alone for every role but its owner, as the views of the
/// first `migrate` have.
pub fn create_view_sql(def: &KpiDef) -> String {
    let mut sql = format!(
        "DROP VIEW IF EXISTS {name};\nCREATE VIEW {name} AS SELECT {}, updated_at FROM {};\n\
         DO $$DECLARE g text; BEGIN \
           FOR g IN SELECT DISTINCT a.grantee::regrole::text \
                    FROM pg_class c, aclexplode(c.relacl) a \
                    WHERE c.oid = '{name}'::regclass AND a.grantee NOT IN (0, c.relowner) \
                      AND a.privilege_type <> 'SELECT' \
           LOOP EXECUTE format('REVOKE INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER ON {name} FROM %s', g); \
           END LOOP; END$$;\n",
        view_columns(def),
        view_source(def, ""),
        name = quote(&def.name)
    );
    if let Some(d) = &def.description {
        sql.push_str(&format!(
            "COMMENT ON VIEW {} IS '{}';\n",
            quote(&def.name),
            d.replace('\'', "''")
        ));
    }
    sql
}

/// Plans the view's expressions in Postgres against the state table named
/// with `suffix`, reading no row. The view is DataFusion SQL unparsed for
/// Postgres, and `check` cannot know every function Postgres lacks
/// (`signum`, `nvl`, `to_unixtime`, ...): without this, such a KPI failed at
/// start with Postgres' bare error, without its name.
async fn check_view(tx: &Transaction<'_>, def: &KpiDef, suffix: &str) -> Result<(), SinkError> {
    let sql = format!(
        "SELECT {} FROM {} LIMIT 0",
        view_columns(def),
        view_source(def, suffix)
    );
    // In a savepoint, so that the caller's transaction stays usable (its
    // owner rolls it back on our error, but should not have to).
    tx.batch_execute("SAVEPOINT kpi_view_check").await?;
    match tx.batch_execute(&sql).await {
        Ok(()) => Ok(tx.batch_execute("RELEASE SAVEPOINT kpi_view_check").await?),
        Err(e) if e.as_db_error().is_some() => {
            tx.batch_execute("ROLLBACK TO SAVEPOINT kpi_view_check")
                .await?;
            let db = e.as_db_error().expect("checked");
            Err(SinkError::Fatal(format!(
                "KPI {name}: Postgres cannot compute its view: {msg}. Its expressions over aggregates \
                 are computed in Postgres when the view is read; write them with functions and \
                 types Postgres has (README: KPIs as SQL files), or compute them when reading the view",
                name = def.name,
                msg = db.message()
            )))
        }
        Err(e) => Err(e.into()),
    }
}

/// Plans each KPI's view in Postgres (see [`check_view`]) against empty
/// temporary tables of its layout, in a transaction that is rolled back:
/// `check` with a database finds the functions Postgres lacks before a
/// start does. Returns each KPI whose view Postgres cannot compute, with
/// Postgres' reason. Needs the TEMP privilege only.
pub async fn check_views(
    client: &mut Client,
    engine: &KpiEngine,
) -> Result<Vec<(String, String)>, SinkError> {
    let tx = client.transaction().await?;
    tx.batch_execute(TEMP_TABLES_FIRST).await?;
    let mut refused = Vec::new();
    for def in engine.defs() {
        tx.batch_execute(&create_tables_sql(def, CHECK_SUFFIX))
            .await?;
        match check_view(&tx, def, CHECK_SUFFIX).await {
            Ok(()) => {}
            Err(SinkError::Fatal(why)) => refused.push((def.name.clone(), why)),
            Err(e) => return Err(e),
        }
    }
    tx.rollback().await?;
    Ok(refused)
}

/// Makes the transaction's unqualified names create and find temporary
/// tables first, so that `check` and `verify` leave nothing behind and need
/// only TEMP.
const TEMP_TABLES_FIRST: &str =
    "SELECT set_config('search_path', 'pg_temp, ' || current_setting('search_path'), true)";

/// The suffix of the temporary tables [`check_views`] plans views against:
/// as short as [`NEW_SUFFIX`], so that the names of a KPI's longest name fit
/// Postgres' 63 bytes as theirs do.
const CHECK_SUFFIX: &str = "$c";

fn stage_name(def: &KpiDef, what: &str) -> String {
    format!("stage_{}_{}_{}", def.name, what, &def.hash[..8])
}

fn main_merge(def: &KpiDef, batch: RecordBatch, suffix: &str) -> MergeStep {
    let stage = stage_name(def, "main");
    let state = state_table(def, suffix);
    let names: Vec<String> = batch
        .schema()
        .fields()
        .iter()
        .map(|f| quote(f.name()))
        .collect();
    let mut stage_cols = def.partial_cols();
    for i in distinct_measures(def) {
        stage_cols.push(StateCol {
            name: format!("m{i}"),
            data_type: DataType::Int64,
            pg_type: "bigint".into(),
        });
    }
    let cols = col_defs(stage_cols.iter());
    let mut sets = Vec::new();
    for m in &def.measures {
        for c in &m.cols {
            let n = quote(&c.name);
            sets.push(match m.func {
                // New members only (see `members`), so counts add.
                Func::Count | Func::CountDistinct => format!("{n} = s.{n} + EXCLUDED.{n}"),
                Func::Avg if c.name.ends_with("_n") => format!("{n} = s.{n} + EXCLUDED.{n}"),
                Func::Sum | Func::Avg => {
                    format!("{n} = COALESCE(s.{n} + EXCLUDED.{n}, s.{n}, EXCLUDED.{n})")
                }
                // Text compares bytewise, as DataFusion does, whatever the
                // database's collation.
                Func::Min | Func::Max => {
                    let f = if m.func == Func::Min {
                        "LEAST"
                    } else {
                        "GREATEST"
                    };
                    let collate = if c.pg_type == "text" {
                        " COLLATE \"C\""
                    } else {
                        ""
                    };
                    format!("{n} = {f}(s.{n}{collate}, EXCLUDED.{n}{collate})")
                }
            });
        }
    }
    sets.push("updated_at = now()".into());
    MergeStep {
        stage: stage.clone(),
        stage_ddl: format!(
            "CREATE TEMP TABLE IF NOT EXISTS {stage} ({cols}) ON COMMIT DELETE ROWS"
        ),
        copy_sql: format!(
            "COPY {stage} ({}) FROM STDIN (FORMAT binary)",
            names.join(", ")
        ),
        merge_sql: format!(
            "INSERT INTO {state} AS s ({cols}) SELECT {cols} FROM {stage} ORDER BY {keys} \
             ON CONFLICT ON CONSTRAINT {state_c}_keys DO UPDATE SET {sets}",
            cols = names.join(", "),
            keys = key_list(def),
            state_c = state_table(def, suffix),
            sets = sets.join(", ")
        ),
        batch,
    }
}

// ---- Postgres side: install, backfill, verify ------------------------------

use datafusion::arrow::array::{
    Decimal128Builder, Int32Builder, Int64Builder, StringBuilder, TimestampMicrosecondBuilder,
};
use tokio_postgres::{Client, Row, Transaction};

use crate::event::{ENERGY_PRECISION, ENERGY_SCALE, MONEY_PRECISION, MONEY_SCALE};
use crate::sink::{self, SinkError};

/// Rows read from `events` per chunk during backfills.
const CHUNK_ROWS: i32 = 50_000;

/// Distinct members a backfill holds in memory (about 25 bytes each); the
/// rest are read back from the new logs as chunks need them.
const BACKFILL_MEMBERS_CAP: usize = 2_000_000;

const EVENTS_SELECT: &str = "SELECT kafka_partition, kafka_offset, kafka_timestamp, event_type, event_time, \
     customer_id, session_id, channel, tariff_type, \
     (energy_consumed * 1000)::bigint, (payment_amount * 100)::bigint FROM events";

/// Postgres rows of [`EVENTS_SELECT`] → a batch in [`event_schema`].
pub fn events_from_rows(rows: &[Row]) -> Result<RecordBatch, SinkError> {
    let mut part = Int32Builder::new();
    let mut off = Int64Builder::new();
    let mut kts = TimestampMicrosecondBuilder::new().with_timezone("UTC");
    let mut et = StringBuilder::new();
    let mut etime = TimestampMicrosecondBuilder::new().with_timezone("UTC");
    let mut cust = StringBuilder::new();
    let mut sess = Int64Builder::new();
    let mut chan = StringBuilder::new();
    let mut tariff = StringBuilder::new();
    let decimal = |p, s| {
        Decimal128Builder::new()
            .with_precision_and_scale(p, s)
            .expect("valid")
    };
    let mut energy = decimal(ENERGY_PRECISION, ENERGY_SCALE);
    let mut pay = decimal(MONEY_PRECISION, MONEY_SCALE);
    let ts = |v: Option<chrono::DateTime<chrono::Utc>>| v.map(|t| t.timestamp_micros());
    for r in rows {
        part.append_value(r.get(0));
        off.append_value(r.get(1));
        kts.append_option(ts(r.get(2)));
        et.append_value(r.get::<_, &str>(3));
        etime.append_value(
            r.get::<_, chrono::DateTime<chrono::Utc>>(4)
                .timestamp_micros(),
        );
        cust.append_value(r.get::<_, &str>(5));
        sess.append_value(r.get(6));
        chan.append_value(r.get::<_, &str>(7));
        tariff.append_option(r.get::<_, Option<&str>>(8));
        energy.append_option(r.get::<_, Option<i64>>(9).map(i128::from));
        pay.append_option(r.get::<_, Option<i64>>(10).map(i128::from));
    }
    let columns: Vec<datafusion::arrow::array::ArrayRef> = vec![
        Arc::new(part.finish()),
        Arc::new(off.finish()),
        Arc::new(kts.finish()),
        Arc::new(et.finish()),
        Arc::new(etime.finish()),
        Arc::new(cust.finish()),
        Arc::new(sess.finish()),
        Arc::new(chan.finish()),
        Arc::new(tariff.finish()),
        Arc::new(energy.finish()),
        Arc::new(pay.finish()),
    ];
    RecordBatch::try_new(event_schema(), columns)
        .map_err(|e| SinkError::Fatal(format!("events → Arrow: {e}")))
}

/// KPI `idx`'s query failed on the stored events that `what` (a backfill, a
/// verify) ran it over. Among many files, only the KPI's name and file say
/// which to fix; and since the events are stored, the same query fails on
/// them every time, so this is not retryable.
fn compute_err(engine: &KpiEngine, idx: usize, what: &str, e: impl std::fmt::Display) -> SinkError {
    SinkError::Fatal(format!(
        "KPI {name}: its query failed on the events stored in Postgres, during {what}: {e}. \
         Fix {file} so that it computes over every stored event (each backfill of it, at the \
         start of `run` too, and each verify fails the same way until then), or delete the file \
         and run `energy-stream migrate` to retire the KPI",
        name = engine.def(idx).name,
        file = engine.file(idx).display()
    ))
}

/// The KPI files in `dir` (`*.sql`, in name order), and the files that only
/// differ by the case of that extension, which are not read.
fn kpi_files(
    dir: &std::path::Path,
) -> std::io::Result<(Vec<std::path::PathBuf>, Vec<std::path::PathBuf>)> {
    let mut files = Vec::new();
    let mut ignored = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        match path.extension() {
            Some(x) if x == "sql" => files.push(path),
            Some(x) if x.eq_ignore_ascii_case("sql") => ignored.push(path),
            _ => {}
        }
    }
    files.sort();
    ignored.sort();
    Ok((files, ignored))
}

/// A hash of the names and contents of the `*.sql` files in `dir`, which is
/// all [`KpiEngine::load_dir`] reads: the KPI watch reloads when it changes.
pub fn dir_fingerprint(dir: &std::path::Path) -> std::io::Result<u64> {
    use std::hash::{Hash, Hasher};
    let (files, _) = kpi_files(dir)?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for f in files {
        f.hash(&mut h);
        std::fs::read(&f)?.hash(&mut h);
    }
    Ok(h.finish())
}

/// `kpi_registry.sql_hash` of a KPI whose tables a failed batch left behind;
/// the next start that has its file rebuilds it.
pub const STALE_HASH: &str = "stale";
/// `kpi_registry.sql_hash` of a KPI whose file `migrate` no longer found: its
/// tables and view stay, no longer updated, until a file of that name is back
/// (which rebuilds it, as any new definition is).
pub const RETIRED_HASH: &str = "retired";

/// The KPIs `kpi_registry` says are maintained ("live": not stale or retired)
/// that a process computing `known` (name, hash) would leave short, because it
/// has no file for them or another definition, leaving out `given_up` (KPIs
/// the caller is marking stale). Each is named with the reason.
///
/// In the batch transaction, after the COPY into `events` (whose lock a
/// backfill must wait for), this fences a consumer whose KPI files differ
/// from the ones another consumer installed: without it, its batches would
/// commit with no rows for the KPIs it does not know, and they would stay
/// short for good.
pub async fn unmaintained(
    client: &impl tokio_postgres::GenericClient,
    known: &[(&str, &str)],
    given_up: &[String],
) -> Result<Vec<String>, SinkError> {
    Ok(judge(client, known, given_up).await?.short)
}

/// What `kpi_registry` says of the KPIs a process computes, from one read
/// of it (a batch asks both on its hot path).
#[derive(Debug, Default)]
pub struct RegistryVerdict {
    /// As [`unmaintained`] says.
    pub short: Vec<String>,
    /// The KPIs of `known` that `migrate` retired while this process, which
    /// still has their files, was running. Its batches must leave them as
    /// they are, or a retired KPI's tables went on changing for as long as
    /// the consumers that started before it ran.
    pub retired: Vec<String>,
}

/// [`unmaintained`], and which of `known` are retired, by name.
pub async fn judge(
    client: &impl tokio_postgres::GenericClient,
    known: &[(&str, &str)],
    given_up: &[String],
) -> Result<RegistryVerdict, SinkError> {
    let rows = client
        .query("SELECT name, sql_hash FROM kpi_registry ORDER BY name", &[])
        .await?;
    let mut verdict = RegistryVerdict::default();
    for r in &rows {
        let (name, hash): (&str, &str) = (r.get(0), r.get(1));
        // Said of what this consumer computes, not of its files: one that
        // could not install a new file (the app role) has the file.
        let computed = known.iter().find(|(n, _)| *n == name);
        if hash == RETIRED_HASH {
            if computed.is_some() {
                verdict.retired.push(name.to_string());
            }
            continue;
        }
        if hash == STALE_HASH || given_up.iter().any(|g| g == name) {
            continue;
        }
        match computed {
            Some((_, h)) if *h == hash => {}
            Some(_) => verdict.short.push(format!("{name} (another definition)")),
            None => verdict.short.push(not_computed_here(name)),
        }
    }
    Ok(verdict)
}

/// The KPIs `kpi_registry` maintains (live: not stale or retired), as rows
/// of name and SQL hash, by name.
async fn live_kpis(
    client: &impl tokio_postgres::GenericClient,
) -> Result<Vec<tokio_postgres::Row>, SinkError> {
    Ok(client
        .query(
            "SELECT name, sql_hash FROM kpi_registry WHERE sql_hash <> ALL($1) ORDER BY name",
            &[&vec![STALE_HASH, RETIRED_HASH]],
        )
        .await?)
}

/// The KPIs the database maintains (live in `kpi_registry`), none before
/// the schema exists.
pub async fn maintained(client: &Client) -> Result<Vec<String>, SinkError> {
    let schema: bool = client
        .query_one("SELECT to_regclass('kpi_registry') IS NOT NULL", &[])
        .await?
        .get(0);
    if !schema {
        return Ok(Vec::new());
    }
    Ok(live_kpis(client)
        .await?
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect())
}

fn not_computed_here(name: &str) -> String {
    format!("{name} (not computed here)")
}

/// The KPIs `kpi_registry` maintains (live: not stale or retired) that
/// `names` lacks, each named as [`unmaintained`] names it. A start whose
/// files lack one is refused before it installs anything: installed first,
/// a stray directory's files, or an old copy of the files, changed the
/// registry and stopped the consumers that ran the right ones.
pub async fn not_computed(
    client: &impl tokio_postgres::GenericClient,
    names: &[&str],
) -> Result<Vec<String>, SinkError> {
    Ok(live_kpis(client)
        .await?
        .iter()
        .map(|r| r.get::<_, &str>(0))
        .filter(|name| !names.contains(name))
        .map(not_computed_here)
        .collect())
}

/// Marks the KPIs in `kpi_registry` that `engine` has no file for as retired,
/// so that consumers without them may write; returns their names. `migrate`
/// calls this with the files it installed.
pub async fn retire_missing(client: &Client, engine: &KpiEngine) -> Result<Vec<String>, SinkError> {
    let names: Vec<&str> = engine.defs().map(|d| d.name.as_str()).collect();
    let rows = client
        .query(
            "UPDATE kpi_registry SET sql_hash = $2 WHERE name <> ALL($1) AND sql_hash <> $2 RETURNING name",
            &[&names, &RETIRED_HASH],
        )
        .await?;
    let mut retired: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    retired.sort();
    Ok(retired)
}

/// Retires the KPIs `gone` (name, SQL hash) whose files were deleted while
/// `run` ran, each only if it is still installed with that hash: a KPI that
/// another consumer has since redefined is theirs. Returns those retired.
pub async fn retire(client: &Client, gone: &[(String, String)]) -> Result<Vec<String>, SinkError> {
    let (names, hashes): (Vec<&str>, Vec<&str>) =
        gone.iter().map(|(n, h)| (n.as_str(), h.as_str())).unzip();
    let rows = client
        .query(
            "UPDATE kpi_registry r SET sql_hash = $3 FROM unnest($1::text[], $2::text[]) AS g(name, hash) \
             WHERE r.name = g.name AND r.sql_hash = g.hash RETURNING r.name",
            &[&names, &hashes, &RETIRED_HASH],
        )
        .await?;
    let mut retired: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    retired.sort();
    Ok(retired)
}

/// What [`install`] did.
#[derive(Debug, Default)]
pub struct InstallReport {
    pub backfilled: Vec<String>,
}

/// Creates each KPI's tables and view; a KPI that is new or whose SQL changed
/// (its hash differs from `kpi_registry`) is backfilled from `events` first.
pub async fn install(client: &mut Client, engine: &KpiEngine) -> Result<InstallReport, SinkError> {
    // Consumers starting together must not create or backfill the same KPI at once.
    client
        .execute("SELECT pg_advisory_lock($1)", &[&INSTALL_LOCK])
        .await?;
    let result = install_locked(client, engine).await;
    client
        .execute("SELECT pg_advisory_unlock($1)", &[&INSTALL_LOCK])
        .await?;
    result
}

/// Arbitrary key shared by every energy-stream process.
const INSTALL_LOCK: i64 = 0x6b70_695f_696e_7374;

async fn install_locked(
    client: &mut Client,
    engine: &KpiEngine,
) -> Result<InstallReport, SinkError> {
    let mut report = InstallReport::default();
    for i in 0..engine.len() {
        let def = engine.def(i);
        let installed = registered_as(client, def).await?;
        // Installed as it is: no DDL, so that the app role (which may not
        // change the schema) starts.
        if installed && relations_exist(client, def).await? {
            continue;
        }
        if !may_change_schema(client).await? {
            return Err(schema_change_refused(def));
        }
        if installed {
            // Re-create only what went missing.
            let file = engine.file(i);
            let tx = client.transaction().await?;
            tx.batch_execute(&create_tables_sql(def, ""))
                .await
                .map_err(|e| install_err(def, file, "its tables", e))?;
            check_view(&tx, def, "").await?;
            tx.batch_execute(&create_view_sql(def))
                .await
                .map_err(|e| install_err(def, file, "its view", e))?;
            tx.commit().await?;
        } else {
            backfill(client, engine, i).await?;
            report.backfilled.push(def.name.clone());
        }
    }
    Ok(report)
}

/// Whether `kpi_registry` holds the KPI with this definition.
async fn registered_as(client: &Client, def: &KpiDef) -> Result<bool, SinkError> {
    let stored: Option<String> = client
        .query_opt(
            "SELECT sql_hash FROM kpi_registry WHERE name = $1",
            &[&def.name],
        )
        .await?
        .map(|r| r.get(0));
    Ok(stored.as_deref() == Some(def.hash.as_str()))
}

async fn may_change_schema(client: &Client) -> Result<bool, SinkError> {
    Ok(client
        .query_one(
            "SELECT has_schema_privilege(current_schema(), 'CREATE')",
            &[],
        )
        .await?
        .get(0))
}

fn schema_change_refused(def: &KpiDef) -> SinkError {
    SinkError::Fatal(format!(
        "KPI {} is new, changed or incomplete, and this database role may not change the schema: run `energy-stream migrate` as the owner role first (README: Roles)",
        def.name
    ))
}

/// The error [`install`] would stop with because this role may not change
/// the schema (the app role), or None when it could install `engine`. Asked
/// before a running consumer stops for changed files, so that one which
/// cannot install them is not restarted (and its group rebalanced) for nothing.
pub async fn install_refused(
    client: &Client,
    engine: &KpiEngine,
) -> Result<Option<SinkError>, SinkError> {
    if may_change_schema(client).await? {
        return Ok(None);
    }
    for def in engine.defs() {
        if !(registered_as(client, def).await? && relations_exist(client, def).await?) {
            return Ok(Some(schema_change_refused(def)));
        }
    }
    Ok(None)
}

/// True when the KPI's view, state table and membership tables all exist.
async fn relations_exist(client: &Client, def: &KpiDef) -> Result<bool, SinkError> {
    let mut names = vec![quote(&def.name), state_table(def, "")];
    names.extend((0..def.sets.len()).map(|i| members_table(def, i, "")));
    let missing: i64 = client
        .query_one(
            "SELECT count(*) FROM unnest($1::text[]) n WHERE to_regclass(n) IS NULL",
            &[&names],
        )
        .await?
        .get(0);
    Ok(missing == 0)
}

/// Recomputes KPIs `which` from `events` into their tables of `suffix`, in
/// one pass over `events`, chunk by chunk through the plans and merges that
/// batches use, so that memory stays bounded by a chunk and the members
/// held, whatever `events` holds. `what` names the caller in errors. Returns
/// the events read and the generation of the membership logs' last rows.
async fn recompute_into(
    tx: &Transaction<'_>,
    engine: &KpiEngine,
    which: &[usize],
    suffix: &str,
    what: &str,
) -> Result<(u64, i64), SinkError> {
    let portal = tx.bind(EVENTS_SELECT, &[]).await?;
    let mut events = 0u64;
    // The tables' only writer: each chunk is one generation of their logs.
    let members = Memberships::new(BACKFILL_MEMBERS_CAP);
    let mut generation = 0i64;
    loop {
        let rows = tx.query_portal(&portal, CHUNK_ROWS).await?;
        if rows.is_empty() {
            break;
        }
        events += rows.len() as u64;
        generation += 1;
        let batch = events_from_rows(&rows)?;
        drop(rows);
        let mut deltas = Vec::with_capacity(which.len());
        for &idx in which {
            deltas.extend(
                engine
                    .compute_one(idx, &batch)
                    .await
                    .map_err(|e| compute_err(engine, idx, what, e))?,
            );
        }
        let mut pending = Pending::default();
        write(
            tx,
            &members,
            &engine.writes(deltas),
            suffix,
            Writers::Exclusive { generation },
            &mut pending,
        )
        .await
        .map_err(|e| match e {
            SinkError::KpiRefused { kpi, message } => {
                let file = match engine.index_of(&kpi) {
                    Some(idx) => engine.file(idx).display().to_string(),
                    None => "its file".into(),
                };
                SinkError::Fatal(format!(
                    "KPI {kpi}: Postgres refuses the rows {what} computes from `events`: \
                     {message}. Fix {file}, or delete it and run `energy-stream migrate` to \
                     retire the KPI"
                ))
            }
            e => e,
        })?;
        members.commit(pending);
    }
    Ok((events, generation))
}

/// Recomputes KPI `idx` from `events` (Postgres → Arrow → the same plan →
/// the same merge) into fresh tables, then swaps them in, all in one
/// transaction: readers see the old version until it commits, and writers of
/// `events` wait, so the new tables match `events` exactly.
pub async fn backfill(
    client: &mut Client,
    engine: &KpiEngine,
    idx: usize,
) -> Result<u64, SinkError> {
    let def = &engine.kpis[idx].def;
    let file = engine.file(idx);
    let new = NEW_SUFFIX;
    if let Some(long) = created_names(def)
        .into_iter()
        .find(|n| n.len() > PG_NAME_BYTES)
    {
        return Err(SinkError::Fatal(format!(
            "KPI {name}: its table or index name {long} would be longer than the {PG_NAME_BYTES} bytes \
             Postgres keeps of a name; give {file} a shorter name, or fewer distinct counts",
            name = def.name,
            file = file.display()
        )));
    }
    let tx = client.transaction().await?;
    tx.batch_execute("SET LOCAL client_min_messages = warning; LOCK TABLE events IN SHARE MODE")
        .await?;
    // The view and the registry row are created in one transaction (below),
    // so a relation of the KPI's name without a row is someone else's: a
    // view of another application, which DROP VIEW would replace without a
    // word, or a table, on which it would fail.
    let foreign: bool = tx
        .query_one(
            "SELECT NOT EXISTS (SELECT 1 FROM kpi_registry WHERE name = $1) \
             AND EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                         WHERE n.nspname = current_schema() AND c.relname = $1)",
            &[&def.name],
        )
        .await?
        .get(0);
    if foreign {
        return Err(SinkError::Fatal(format!(
            "KPI {name}: a table or view named {name} already exists and is not an energy-stream KPI; \
             rename the KPI file (its name becomes the view), or drop that relation if nothing needs it",
            name = def.name
        )));
    }
    tx.batch_execute(&drop_tables_sql(&tx, def, new).await?)
        .await?;
    tx.batch_execute(&create_tables_sql(def, new))
        .await
        .map_err(|e| install_err(def, file, "its new tables", e))?;
    // Before the backfill's work, not at the swap after it.
    check_view(&tx, def, new).await?;
    let (events, generation) = recompute_into(&tx, engine, &[idx], new, "its backfill").await?;
    let mut swap = drop_tables_sql(&tx, def, "").await?;
    swap.push_str(&format!("DROP VIEW IF EXISTS {};\n", quote(&def.name)));
    let state = state_table(def, "");
    swap.push_str(&format!(
        "ALTER TABLE {state}{new} RENAME TO {state};\nALTER TABLE {state} RENAME CONSTRAINT {state}{new}_keys TO {state}_keys;\n"
    ));
    for i in 0..def.sets.len() {
        let t = members_table(def, i, "");
        swap.push_str(&format!(
            "ALTER TABLE {t}{new} RENAME TO {t};\nALTER INDEX {t}{new}_grp RENAME TO {t}_grp;\n\
             ALTER INDEX {t}{new}_gen RENAME TO {t}_gen;\n"
        ));
    }
    swap.push_str(&create_view_sql(def));
    tx.batch_execute(&swap)
        .await
        .map_err(|e| install_err(def, file, "the swap of its new tables and its view", e))?;
    tx.execute(
        // A new epoch: consumers' memories of the old logs start over.
        "INSERT INTO kpi_registry (name, sql_hash, sql, backfilled_at, member_epoch, member_gen) \
         VALUES ($1, $2, $3, now(), floor(random() * 9e18)::bigint, $4) \
         ON CONFLICT (name) DO UPDATE SET sql_hash = EXCLUDED.sql_hash, sql = EXCLUDED.sql, backfilled_at = now(), \
         member_epoch = EXCLUDED.member_epoch, member_gen = EXCLUDED.member_gen",
        &[&def.name, &def.hash, &def.sql, &generation],
    )
    .await?;
    tx.commit().await?;
    Ok(events)
}

/// The suffix of the tables a backfill builds before it swaps them in. A
/// KPI name cannot hold a `$`, so `kpi_state_<name>$n` is never another
/// KPI's table (with `__new`, the backfill of `x` dropped the state table
/// of a KPI named `x__new`); and two bytes keep the longest index name,
/// `kpi_members_<40-byte name>_s99$n_grp`, within Postgres' 63 (`__new`
/// made `…_s10__new_grp` and `…_s10__new_gen` 65 bytes, both cut to the
/// same name). The backfill is one transaction, so no table with an older
/// suffix can be left behind.
const NEW_SUFFIX: &str = "$n";

/// Every table, index and constraint name a backfill of `def` creates, under
/// [`NEW_SUFFIX`] (as `verify` does, in its temporary tables) and after the
/// swap, and the temporary table of the batch merge.
fn created_names(def: &KpiDef) -> Vec<String> {
    let mut names = vec![stage_name(def, "main")];
    for suffix in [NEW_SUFFIX, ""] {
        let state = state_table(def, suffix);
        names.push(format!("{state}_keys"));
        names.push(state);
        for i in 0..def.sets.len() {
            let t = members_table(def, i, suffix);
            names.push(format!("{t}_grp"));
            names.push(format!("{t}_gen"));
            names.push(t);
        }
    }
    names
}

/// An error of Postgres on a statement that creates or swaps `def`'s own
/// relations. Errors that may pass (a broken connection, a lock, a restart,
/// a read-only standby) stay retryable as [`sink::classify`] says. Any other
/// is this KPI's own (a name that another object of the schema has, two
/// column names that share their first 63 bytes), not Postgres being away,
/// and not a missing schema, whatever the SQLSTATE: `migrate` has run by
/// then, and the relations these statements name are the KPI's.
fn install_err(
    def: &KpiDef,
    file: &std::path::Path,
    what: &str,
    e: tokio_postgres::Error,
) -> SinkError {
    let classified = sink::classify(&e);
    let Some(db) = e.as_db_error() else {
        return classified;
    };
    if classified.is_retryable() && classified.kind() != "query" {
        return classified;
    }
    if *db.code() == tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE {
        return SinkError::Fatal(format!("KPI {}: {classified}", def.name));
    }
    let mut msg = format!(
        "KPI {name}: Postgres refused {what}: {severity}: {message}",
        name = def.name,
        severity = db.severity(),
        message = db.message()
    );
    for extra in [db.detail(), db.hint()].into_iter().flatten() {
        msg.push_str(&format!(" ({extra})"));
    }
    let file = file.display();
    msg.push_str(&match db.code().code() {
        // The view's columns: Postgres cuts each name to 63 bytes.
        "42701" => format!(
            ". Postgres keeps the first {PG_NAME_BYTES} bytes of a column name, so two columns whose \
             names share them are one name to it: give one a shorter alias in {file}"
        ),
        "42P07" | "42710" => format!(
            ". Another object of the schema has that name: rename {file} (its name is the view's), \
             or drop that object if nothing needs it"
        ),
        _ => format!(". Fix {file}, or what in the schema Postgres names"),
    });
    SinkError::Fatal(msg)
}

/// DROP statements for a KPI's state table and every membership table it has,
/// including those of an older definition or storage layout (`_m<i>`, `_s<i>`).
async fn drop_tables_sql(
    tx: &Transaction<'_>,
    def: &KpiDef,
    suffix: &str,
) -> Result<String, SinkError> {
    let prefix = format!("kpi_members_{}_", def.name);
    let tables: Vec<String> = tx
        .query(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() AND left(tablename, length($1)) = $1",
            &[&prefix],
        )
        .await?
        .iter()
        .map(|r| r.get::<_, String>(0))
        .filter(|t| {
            let rest = &t[prefix.len()..];
            let digits = rest
                .trim_end_matches(suffix)
                .strip_prefix(['m', 's'])
                .unwrap_or_default();
            (suffix.is_empty() || rest.ends_with(suffix))
                && !digits.is_empty()
                && digits.chars().all(|c| c.is_ascii_digit())
        })
        .collect();
    let mut sql = String::new();
    sql.push_str(&format!(
        "DROP TABLE IF EXISTS {} CASCADE;\n",
        state_table(def, suffix)
    ));
    for t in tables {
        sql.push_str(&format!("DROP TABLE IF EXISTS {t};\n"));
    }
    Ok(sql)
}

/// How far apart, relative to the larger, a float state column of `verify`'s
/// two sides may be: a sum of doubles taken batch by batch differs from one
/// taken at once by rounding, about 1e-16 of its value per addition.
const FLOAT_TOLERANCE: &str = "1e-9";

/// A key whose streamed values differ from a recomputation over `events`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    pub kpi: String,
    /// "recomputed" (the row as it should be) or "streamed" (the row as stored).
    pub side: String,
    pub row: String,
}

/// A KPI that `verify` did not compare, because the database does not hold
/// it as its file defines it: its tables hold another query's results, or
/// none, and counting their differences would blame the streamed data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotVerified {
    pub kpi: String,
    /// What differs and what to do.
    pub reason: String,
}

/// What [`verify_report`] found.
#[derive(Debug, Default)]
pub struct VerifyReport {
    /// One line per side of each differing key: a key whose values differ
    /// has two, a key only one side holds has one.
    pub mismatches: Vec<Mismatch>,
    /// How many keys (of all compared KPIs) differ.
    pub differing_keys: usize,
    pub not_verified: Vec<NotVerified>,
    /// KPIs the database maintains (in `kpi_registry`, not retired) that no
    /// file given defines, so nothing recomputed them: without this, a
    /// `verify` pointed at the wrong or an empty directory said that every
    /// KPI was right. Only filled when every KPI is asked for.
    pub without_file: Vec<NotVerified>,
}

/// [`verify_report`], for callers that expect every KPI installed as its
/// file says: a KPI that is not is an error, not a list of differences.
pub async fn verify(
    client: &mut Client,
    engine: &KpiEngine,
    only: Option<&str>,
) -> Result<Vec<Mismatch>, SinkError> {
    let report = verify_report(client, engine, only).await?;
    if !report.not_verified.is_empty() {
        return Err(SinkError::Fatal(
            report
                .not_verified
                .iter()
                .map(|n| format!("{}: not verified: {}", n.kpi, n.reason))
                .collect::<Vec<_>>()
                .join("; "),
        ));
    }
    Ok(report.mismatches)
}

/// Why KPI `idx` cannot be compared with its tables, from its
/// `kpi_registry` row (hash and SQL), or None when it is installed as its
/// file defines it.
fn not_installed_as_file(
    engine: &KpiEngine,
    idx: usize,
    stored: Option<(&str, &str)>,
) -> Option<String> {
    let def = engine.def(idx);
    let file = engine.file(idx).display();
    let rebuild =
        "`energy-stream migrate` or `run` with this file computes it from the stored events";
    Some(match stored {
        Some((hash, _)) if hash == def.hash => return None,
        None => format!("it is not installed in this database; {rebuild}"),
        Some((RETIRED_HASH, _)) => format!(
            "it is retired (its file was deleted and `migrate` stopped maintaining it), so its \
             tables are no longer updated; {rebuild}"
        ),
        Some((STALE_HASH, _)) => format!(
            "it is marked stale (it failed on a batch, so its tables lack that batch and the \
             later ones); fix {file} if it fails, then `energy-stream backfill --kpi {name}` or \
             the next start of `run` computes it again from the stored events",
            name = def.name
        ),
        Some((_, sql)) if sql == def.sql => format!(
            "it was installed by an energy-stream version that stored KPIs another way; {rebuild}"
        ),
        Some(_) => format!(
            "{file} differs from the SQL it was installed from (kpi_registry.sql), so its tables \
             hold another query's results; install the file ({rebuild}), or verify with the \
             files it was installed from (--queries-dir)"
        ),
    })
}

/// Recomputes each KPI (or only `only`) over all of `events` in one batch and
/// compares every stored part with the streamed state table, in Postgres
/// (so 12.5 equals 12.50, and NULL keys match). A KPI whose `kpi_registry`
/// row does not hold its file's hash is not compared but listed with the
/// reason.
pub async fn verify_report(
    client: &mut Client,
    engine: &KpiEngine,
    only: Option<&str>,
) -> Result<VerifyReport, SinkError> {
    let tx = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .start()
        .await?;
    tx.batch_execute("SET LOCAL client_min_messages = warning")
        .await?;
    let registry = tx
        .query("SELECT name, sql_hash, sql FROM kpi_registry", &[])
        .await?;
    let stored = |name: &str| {
        registry
            .iter()
            .find(|r| r.get::<_, &str>(0) == name)
            .map(|r| (r.get::<_, &str>(1), r.get::<_, &str>(2)))
    };
    let mut report = VerifyReport::default();
    if only.is_none() {
        for r in &registry {
            let (name, hash): (&str, &str) = (r.get(0), r.get(1));
            if hash != RETIRED_HASH && engine.index_of(name).is_none() {
                report.without_file.push(NotVerified {
                    kpi: name.to_string(),
                    reason: "the database maintains it, but no file given defines it, so \
                             nothing recomputed it; verify with the files it was installed \
                             from (--queries-dir), or delete its file and run `energy-stream \
                             migrate` with the rest to retire it"
                        .into(),
                });
            }
        }
        report.without_file.sort_by(|a, b| a.kpi.cmp(&b.kpi));
    }
    let mut compared = Vec::new();
    for idx in 0..engine.len() {
        let def = engine.def(idx);
        if only.is_some_and(|o| o != def.name) {
            continue;
        }
        match not_installed_as_file(engine, idx, stored(&def.name)) {
            Some(reason) => report.not_verified.push(NotVerified {
                kpi: def.name.clone(),
                reason,
            }),
            None => compared.push(idx),
        }
    }
    if compared.is_empty() {
        tx.commit().await?;
        return Ok(report);
    }
    // The KPIs are recomputed, in one pass over `events`, into temporary
    // tables of their own layout, as a backfill would, and each is compared
    // with its state table: memory stays that of a chunk, however many
    // events there are. What differs is what streaming did to the tables
    // (a batch lost or merged twice, members remembered from a transaction
    // that rolled back), since the chunks cut `events` elsewhere than the
    // batches did; that the merge itself computes what DataFusion does is
    // the golden tests' part. `pg_temp` first makes the unqualified names
    // the merge uses create and find the temporary tables (so a read-only
    // role can verify, and nothing is left behind).
    tx.batch_execute(TEMP_TABLES_FIRST).await?;
    let new = NEW_SUFFIX;
    for &idx in &compared {
        tx.batch_execute(&create_tables_sql(engine.def(idx), new))
            .await?;
    }
    recompute_into(&tx, engine, &compared, new, "verify").await?;
    let out = &mut report.mismatches;
    for idx in compared {
        let def = engine.def(idx);
        let keys = key_list(def);
        let mut ctes = Vec::new();
        let mut actual: Vec<String> = def.keys.iter().map(|k| quote(&k.col.name)).collect();
        // How each measure column of both sides must agree.
        let mut agree: Vec<String> = Vec::new();
        for (m, c) in def
            .measures
            .iter()
            .flat_map(|m| m.cols.iter().map(move |c| (m, c)))
        {
            let n = quote(&c.name);
            agree.push(if c.pg_type == "double precision" {
                // A float sum depends on how the events were split into
                // batches (addition is not associative in floating point),
                // so streamed and recomputed may differ in the last digits;
                // anything beyond that is a real difference.
                format!(
                    "(x.{n} IS NOT DISTINCT FROM y.{n} OR abs(x.{n} - y.{n}) <= {FLOAT_TOLERANCE} * greatest(abs(x.{n}), abs(y.{n})))"
                )
            } else if m.func == Func::Sum && c.data_type == DataType::Int64 {
                // DataFusion's integer sum wraps past 2^63 within a batch
                // or a chunk, so the two sides may wrap at different points;
                // both are right modulo 2^64 (the view wraps the same way).
                format!(
                    "(x.{n} IS NOT DISTINCT FROM y.{n} OR mod(x.{n} - y.{n}, 18446744073709551616) = 0)"
                )
            } else {
                format!("x.{n} IS NOT DISTINCT FROM y.{n}")
            });
            actual.push(n);
        }
        ctes.push(format!(
            "expected AS (SELECT {} FROM {})",
            actual.join(", "),
            state_table(def, new)
        ));
        ctes.push(format!(
            "actual AS (SELECT {} FROM {})",
            actual.join(", "),
            state_table(def, "")
        ));
        // Both sides hold one row per key; the row of the keys as text is a
        // join key that matches NULL keys and that Postgres can hash.
        let key_row = format!("ROW({keys})::text");
        ctes.push(format!(
            "x AS (SELECT {key_row} AS \"verify key\", * FROM expected)"
        ));
        ctes.push(format!(
            "y AS (SELECT {key_row} AS \"verify key\", * FROM actual)"
        ));
        let row_of = |side: &str| {
            let cols: Vec<String> = actual.iter().map(|c| format!("{side}.{c}")).collect();
            format!(
                "CASE WHEN {side}.\"verify key\" IS NOT NULL THEN ROW({})::text END",
                cols.join(", ")
            )
        };
        let sql = format!(
            "WITH {} SELECT {}, {} FROM x FULL JOIN y ON x.\"verify key\" = y.\"verify key\" \
             WHERE x.\"verify key\" IS NULL OR y.\"verify key\" IS NULL OR NOT ({})",
            ctes.join(", "),
            row_of("x"),
            row_of("y"),
            if agree.is_empty() {
                "true".to_string()
            } else {
                agree.join(" AND ")
            }
        );
        for r in tx.query(&sql, &[]).await? {
            report.differing_keys += 1;
            for (i, side) in ["recomputed", "streamed"].into_iter().enumerate() {
                if let Some(row) = r.get::<_, Option<String>>(i) {
                    out.push(Mismatch {
                        kpi: def.name.clone(),
                        side: side.into(),
                        row,
                    });
                }
            }
        }
    }
    // Nothing to keep: the recomputed tables go with the transaction.
    tx.rollback().await?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The longest name a KPI may have (40 bytes) with 100 sets of distinct
    /// counts: every name its backfill, merge and verify create fits in
    /// what Postgres keeps, so none is cut into another.
    #[tokio::test]
    async fn every_created_name_fits_in_postgres_names() {
        let measures: Vec<String> = (0..100)
            .map(|i| format!("count(DISTINCT session_id + {i}) AS d{i}"))
            .collect();
        let sql = format!(
            "SELECT channel, {} FROM events GROUP BY channel",
            measures.join(", ")
        );
        let file = "queries/a123456789b123456789c123456789d123456789.sql";
        let engine = KpiEngine::from_sources(vec![(file.into(), sql)], 1 << 28)
            .await
            .unwrap();
        let def = engine.def(0);
        assert_eq!(def.sets.len(), 100);
        let names = created_names(def);
        let long: Vec<&String> = names.iter().filter(|n| n.len() > PG_NAME_BYTES).collect();
        assert!(long.is_empty(), "{long:?}");
        let distinct: std::collections::HashSet<&String> = names.iter().collect();
        assert_eq!(distinct.len(), names.len());
    }
}
