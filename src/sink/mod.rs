//! Sink: everything that touches Postgres on the write path.
//!
//! It owns the connections, the migrations, the COPY encoding and the one
//! transaction per micro-batch, in two halves: [`begin_copy`] COPYs the valid
//! rows into `events` and the rejects into `rejected_events`;
//! [`Copied::finish`] fences the offsets, merges the KPI rows and advances the
//! offsets. The pipeline runs the first half of batch N+1 while batch N is
//! finishing on another connection. The caller decides when to COMMIT
//! ([`Prepared::commit`]), which lets the pipeline check, at the last moment,
//! that it still owns the partitions.
//!
//! Offsets live here and nowhere else: `consumer_offsets` is read on partition
//! assignment ([`load_offsets`]) and after a COMMIT that failed without a
//! clear answer ([`landed`]), and written only inside the batch transaction.

pub mod copy;
pub mod migrate;

use std::collections::HashMap;
use std::pin::pin;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use std::sync::Arc;

use datafusion::arrow::array::{RecordBatch, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use futures_util::SinkExt;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::Type;
use tokio_postgres::{Client, GenericClient, Transaction};

use crate::event::event_schema;
use crate::source::{LastWritten, StoredOffset};

/// Where the batch's offsets stand: the stored value it expects to find (None
/// when this partition has never been written) and the value to store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionOffsets {
    pub partition: i32,
    pub expected: Option<i64>,
    pub next: i64,
    /// The message at `next - 1`, stored beside the offset for the source
    /// to recognise the log on the next assignment.
    pub last: LastWritten,
}

/// What one transaction writes.
pub struct BatchWrite<'a> {
    pub group_id: &'a str,
    pub topic: &'a str,
    /// Valid rows, in [`event_schema`].
    pub events: &'a RecordBatch,
    /// Rejects, in [`crate::event::reject_schema`].
    pub rejects: &'a RecordBatch,
    pub offsets: &'a [PartitionOffsets],
    /// KPI writes that commit with the batch.
    pub kpis: &'a [crate::kpi::KpiWrite],
    /// The memory of the count(DISTINCT) members ([`crate::kpi::members`]).
    pub members: &'a crate::kpi::Memberships,
    /// KPIs that failed on this batch: marked stale in `kpi_registry` in the
    /// same transaction, so the next start rebuilds them from `events`.
    pub stale_kpis: &'a [String],
    /// This run has committed no batch yet: the transaction checks again,
    /// under [`CLAIM_LOCK`], that the database holds no other topic or group
    /// (see [`check_single_group`]).
    pub claim: bool,
    /// Crash-test hook: abort the process halfway through the events COPY.
    pub abort_mid_copy: bool,
}

/// The transaction-scoped advisory lock under which a run's first batch
/// checks that the database is its topic's and group's alone. The check at
/// start holds nothing: two runs of different topics started together on a
/// fresh database both passed it and both committed, mixing two topics in
/// `events`. Taken once per run, so consumers of one group do not
/// serialise their batches on it. Not migrations' lock, which a run's
/// start-up takes.
pub const CLAIM_LOCK: i64 = migrate::LOCK_KEY + 1;

/// Sink errors carry the retry decision.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// Postgres is down, restarting, or the connection broke: back off and retry
    /// the same batch. Nothing was committed. Kind "query" is an error the
    /// statement raised with no class that says Postgres is away; a batch
    /// retries it too, but it is not worded as an outage.
    #[error("{}", unavailable_text(kind, message))]
    Unavailable { kind: &'static str, message: String },
    /// Another consumer has advanced this partition since we read its offset:
    /// our copy of it is stale. Drop in-flight work and re-read the offsets.
    #[error(
        "partition {partition}: stored offset is {stored:?}, this consumer expected {expected:?}; {}",
        fence_reason(*stored, *expected)
    )]
    Fenced {
        partition: i32,
        stored: Option<i64>,
        expected: Option<i64>,
    },
    /// A row that this batch writes is already stored: another consumer of the
    /// group won a race (handled like [`SinkError::Fenced`]), or another group
    /// or topic wrote the same keys (see [`check_duplicate`]).
    #[error("duplicate row: {0}")]
    Duplicate(String),
    /// A mistake that retrying cannot fix: missing tables, missing privileges, a bad URL.
    #[error("{0}")]
    Fatal(String),
    /// `kpi_registry` maintains KPIs this process does not compute as they
    /// are (each named with the reason): it must not write events until it
    /// runs the same KPI files ([`crate::kpi::unmaintained`]).
    #[error(
        "the database maintains KPIs that this consumer would not: {}. Its events would leave them short for good, so it stops. \
         Run every consumer with the same KPI files (--queries-dir); another consumer may have installed a new or changed file since this one started, so restart this one with it. \
         To stop maintaining a KPI, delete its file and run `energy-stream migrate`, which retires it (README: KPIs as SQL files)",
        .0.join(", ")
    )]
    KpisDiffer(Vec<String>),
    /// Postgres refused a KPI's rows for what they hold: a key past the size
    /// its unique index can take, a value outside its column's range. The
    /// same rows fail every retry, so the pipeline disables that KPI and
    /// writes the batch without it, as for a KPI that fails in DataFusion.
    #[error("KPI {kpi}: Postgres refuses its rows: {message}")]
    KpiRefused { kpi: String, message: String },
    /// `migrate` retired these KPIs (their files were deleted) while this
    /// process, which computes them, ran: the batch goes on without them,
    /// as retired KPIs stay as they are.
    #[error(
        "KPIs retired by `energy-stream migrate` while this consumer ran: {}; it stops maintaining them",
        .0.join(", ")
    )]
    KpisRetired(Vec<String>),
}

fn unavailable_text(kind: &str, message: &str) -> String {
    if kind == "query" {
        format!("postgres refused the statement: {message}")
    } else {
        format!("postgres unavailable ({kind}): {message}")
    }
}

/// Why a fence met other offsets than this consumer expected. Behind is not
/// another consumer's doing: a batch of its own before this one that did not
/// commit (it failed, timed out or was dropped at a rebalance), or a failover
/// to a replica that had not received the last commits.
fn fence_reason(stored: Option<i64>, expected: Option<i64>) -> &'static str {
    if stored > expected {
        "another consumer has written past it and owns it now"
    } else {
        "Postgres holds less than this consumer counted on (a batch of its own before this one \
         did not commit: it failed, timed out or was dropped at a rebalance; or a failover to a \
         replica that lagged)"
    }
}

impl SinkError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, SinkError::Unavailable { .. })
    }

    /// A low-cardinality label for `energy_stream_db_errors_total{kind}`.
    /// Every value [`SinkError::kind`] returns, for metric labels.
    pub const KINDS: [&'static str; 11] = [
        "connection",
        "timeout",
        "shutdown",
        "canceled",
        "conflict",
        "resources",
        "lock",
        "read_only",
        "query",
        "fenced",
        "fatal",
    ];

    /// Postgres did not answer `what` within `after`.
    pub fn timed_out(what: &str, after: Duration) -> SinkError {
        SinkError::Unavailable {
            kind: "timeout",
            message: format!(
                "no answer from Postgres within {after:?} while {what} (the server is down or frozen, or another session holds a lock this one waits for: a warning of its own names the holder); dropping the connection"
            ),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            SinkError::Unavailable { kind, .. } => kind,
            SinkError::Fenced { .. } | SinkError::Duplicate(_) => "fenced",
            SinkError::Fatal(_) | SinkError::KpisDiffer(_) => "fatal",
            // The SQL's own error, not Postgres being away; counted as the
            // KPI's failure by the pipeline.
            SinkError::KpiRefused { .. } => "query",
            // Not an error of Postgres: the pipeline goes on without them.
            SinkError::KpisRetired(_) => "retired",
        }
    }
}

impl From<tokio_postgres::Error> for SinkError {
    fn from(e: tokio_postgres::Error) -> Self {
        classify(&e)
    }
}

/// Sorts Postgres errors into retryable and fatal by SQLSTATE class.
pub fn classify(e: &tokio_postgres::Error) -> SinkError {
    let message = match e.as_db_error() {
        Some(db) => format!("{}: {}", db.severity(), db.message()),
        // "error connecting to server" alone does not say why; the source does.
        None => match std::error::Error::source(e) {
            Some(source) => format!("{e}: {source}"),
            None => e.to_string(),
        },
    };
    let Some(code) = e.code() else {
        // A setting the server asks for and the URL lacks: retrying cannot
        // supply it.
        if message.contains("invalid configuration") {
            let hint = if message.contains("password missing") {
                "the server asks for a password: put it in DATABASE_URL, or in a file named by DATABASE_PASSWORD_FILE"
            } else {
                "check DATABASE_URL"
            };
            return SinkError::Fatal(format!("{message} — {hint}"));
        }
        // `sslmode=require` against a server without TLS: as permanent as a
        // wrong password, so retrying for ever only hid it.
        if message.contains("server does not support TLS") {
            return SinkError::Fatal(format!(
                "{message} — TLS is required (sslmode=require in DATABASE_URL, or a CA file given \
                 with --database-ca-file / DATABASE_CA_FILE, which requires it whatever the sslmode) \
                 and this server does not offer it: turn ssl on in the server, or use sslmode=prefer \
                 without a CA file"
            ));
        }
        // No SQLSTATE: the socket closed, the server vanished, or connecting failed.
        return SinkError::Unavailable {
            kind: "connection",
            message,
        };
    };
    let c = code.code();
    if *code == SqlState::UNDEFINED_TABLE
        || *code == SqlState::UNDEFINED_COLUMN
        || *code == SqlState::UNDEFINED_FUNCTION
    {
        return SinkError::Fatal(format!(
            "{message} — the schema is missing or old: run `energy-stream migrate` (or start `run` without --no-migrate)"
        ));
    }
    if *code == SqlState::UNIQUE_VIOLATION {
        return SinkError::Duplicate(message);
    }
    if *code == SqlState::INSUFFICIENT_PRIVILEGE {
        return SinkError::Fatal(format!(
            "{message} — check the database role and its grants"
        ));
    }
    if c.starts_with("28") {
        return SinkError::Fatal(format!(
            "{message} — check the user and password (DATABASE_URL, DATABASE_PASSWORD_FILE) and the server's pg_hba.conf"
        ));
    }
    if *code == SqlState::INVALID_CATALOG_NAME {
        return SinkError::Fatal(format!("{message} — create the database first"));
    }
    // A standby (the URL points at a replica, or a failover has not moved it
    // yet) or a database set read-only for maintenance or a full disk: an
    // operator or the failover ends it, and the same work then succeeds.
    if *code == SqlState::READ_ONLY_SQL_TRANSACTION {
        return SinkError::Unavailable {
            kind: "read_only",
            message: format!(
                "{message} — Postgres is read-only here (a standby, a failover in progress, or \
                 default_transaction_read_only); `target_session_attrs=read-write` in the URL \
                 skips standbys"
            ),
        };
    }
    // Not a shutdown, though it shares class 57: a `statement_timeout` set
    // for the role or database, or someone's `pg_cancel_backend`.
    if *code == SqlState::QUERY_CANCELED {
        return SinkError::Unavailable {
            kind: "canceled",
            message: format!(
                "{message} — Postgres cancelled the statement (a statement_timeout set for the \
                 role or database, or pg_cancel_backend); retried on a new connection"
            ),
        };
    }
    // Postgres' own text says only that the slots are taken.
    if *code == SqlState::TOO_MANY_CONNECTIONS {
        return SinkError::Unavailable {
            kind: "resources",
            message: format!(
                "{message} (SQLSTATE 53300) — every connection slot allowed is taken \
                 (max_connections, or the CONNECTION LIMIT of the role or database); each `run` \
                 holds up to four (two writers, the offset reader, the health probe), so raise \
                 the limit or end other sessions; retried"
            ),
        };
    }
    let kind = match &c[..2] {
        "08" => "connection",
        "57" => "shutdown",
        "40" => "conflict",
        "53" => "resources",
        "55" => "lock",
        _ => "query",
    };
    // The code, for the operator to look the error up by: the classes above
    // say what went wrong, a query's error may not.
    let message = if kind == "query" {
        format!("{message} (SQLSTATE {c})")
    } else {
        message
    };
    SinkError::Unavailable { kind, message }
}

/// Connects, with TLS unless `sslmode=disable`.
///
/// As in libpq, `prefer` and `require` encrypt without checking the server's
/// certificate; set `DATABASE_CA_FILE` (see [`crate::config`]) to verify it
/// against a CA, which the pipeline passes in as `ca_file`.
pub async fn connect(config: &tokio_postgres::Config) -> Result<Client, SinkError> {
    connect_with_ca(config, None).await
}

pub async fn connect_with_ca(
    config: &tokio_postgres::Config,
    ca_file: Option<&std::path::Path>,
) -> Result<Client, SinkError> {
    let client = match tls_connector(config, ca_file)? {
        None => {
            let (client, conn) = config.connect(tokio_postgres::NoTls).await?;
            tokio::spawn(drive(conn));
            client
        }
        Some(tls) => {
            let (client, conn) = config.connect(tls).await?;
            tokio::spawn(drive(conn));
            client
        }
    };
    Ok(client)
}

/// Runs a connection's I/O until it closes; the client talks to it through channels.
///
/// Postgres' notices go to the debug log: `CREATE TEMP TABLE IF NOT EXISTS`
/// says "already exists, skipping" on every batch, which tokio-postgres
/// would log at info, and a server shutting down warns each session it
/// ends, which the retries already report.
async fn drive<S, T>(mut conn: tokio_postgres::Connection<S, T>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        match std::future::poll_fn(|cx| conn.poll_message(cx)).await {
            Some(Ok(tokio_postgres::AsyncMessage::Notice(n))) => {
                tracing::debug!(severity = n.severity(), "postgres: {}", n.message());
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                tracing::debug!(error = %e, "postgres connection closed");
                return;
            }
            None => return,
        }
    }
}

/// The TLS set-up for `config`, None when `sslmode=disable`.
fn tls_connector(
    config: &tokio_postgres::Config,
    ca_file: Option<&std::path::Path>,
) -> Result<Option<postgres_openssl::MakeTlsConnector>, SinkError> {
    if config.get_ssl_mode() == tokio_postgres::config::SslMode::Disable {
        return Ok(None);
    }
    let tls_err =
        |e: openssl::error::ErrorStack| SinkError::Fatal(format!("cannot set up TLS: {e}"));
    let mut builder =
        openssl::ssl::SslConnector::builder(openssl::ssl::SslMethod::tls()).map_err(tls_err)?;
    match ca_file {
        Some(ca) => builder.set_ca_file(ca).map_err(tls_err)?,
        None => builder.set_verify(openssl::ssl::SslVerifyMode::NONE),
    }
    let mut tls = postgres_openssl::MakeTlsConnector::new(builder.build());
    if ca_file.is_none() {
        tls.set_callback(|c, _| {
            c.set_verify_hostname(false);
            Ok(())
        });
    }
    Ok(Some(tls))
}

/// How long Postgres may take to answer one exchange (see [`Database::timeout`]).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Where Postgres is, how to trust its certificate, and how long to wait for it.
#[derive(Clone)]
pub struct Database {
    pub config: tokio_postgres::Config,
    /// CA bundle to verify the server certificate against; without it TLS
    /// encrypts but does not verify (libpq's `require`).
    pub ca_file: Option<std::path::PathBuf>,
    /// How long a connection attempt, or an exchange that the caller bounds
    /// with [`Database::bounded`], may go unanswered before it counts as
    /// Postgres being away. A frozen server, a paused container or a
    /// partitioned network sends no error: the socket simply stays quiet, and
    /// the kernel's TCP timeouts take from minutes to hours.
    pub timeout: Duration,
}

impl Database {
    pub fn new(config: tokio_postgres::Config) -> Self {
        Database {
            config,
            ca_file: None,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Connects, giving up after [`Database::timeout`]. tokio-postgres's own
    /// `connect_timeout` bounds only the TCP connect, not the start-up and
    /// TLS exchanges that a frozen server never answers.
    pub async fn connect(&self) -> Result<Client, SinkError> {
        self.bounded(
            "connecting",
            connect_with_ca(&self.config, self.ca_file.as_deref()),
        )
        .await
    }

    /// A connection for writing batches. Postgres ends its session when it
    /// sits idle inside a transaction for twice [`Database::timeout`] (at
    /// least 10 s): a consumer frozen mid-batch (`docker pause`, a stalled
    /// VM) would otherwise hold its locks, the KPI registry's among them,
    /// and stop every consumer of the database until it thawed. A healthy
    /// batch idles between its statements for milliseconds, or while its
    /// lane waits for the previous batch's commit, which that batch's own
    /// timeouts bound.
    pub async fn connect_writer(&self) -> Result<Client, SinkError> {
        let client = self.connect().await?;
        self.limit_idle(&client).await?;
        Ok(client)
    }

    /// Makes `client` a writer's connection (see [`Database::connect_writer`]).
    pub async fn limit_idle(&self, client: &Client) -> Result<(), SinkError> {
        let set = format!(
            "SET idle_in_transaction_session_timeout = {}",
            self.frozen_after().as_millis()
        );
        self.bounded("setting the session's idle limit", async {
            client.batch_execute(&set).await.map_err(SinkError::from)
        })
        .await
    }

    /// How long a writer's session may wait on its client inside a
    /// transaction before it counts as frozen: twice [`Database::timeout`],
    /// at least 10 s. A live writer bounds each exchange by the timeout.
    pub fn frozen_after(&self) -> Duration {
        (self.timeout * 2).max(Duration::from_secs(10))
    }

    /// Ends, with `pg_terminate_backend`, the sessions of this database that
    /// sit in a binary `COPY ... FROM STDIN`, waiting on their client, while
    /// another session waits for their locks (at this look or the previous
    /// one), once their COPY has run for longer than
    /// [`Database::frozen_after`] and received nothing since the previous
    /// look (`watch`, a few seconds before); returns them.
    ///
    /// That is a writer frozen mid-COPY (`docker pause`, a stalled VM).
    /// Postgres ends a writer frozen between statements by itself
    /// ([`Database::connect_writer`]), but not one it reads COPY data from:
    /// frozen in a KPI merge's staging COPY, it would hold every consumer of
    /// the database until it thawed. A live writer's COPY keeps receiving,
    /// and gives up at its own bound besides. Progress is read from
    /// `pg_stat_progress_copy` (Postgres 14 and later; earlier ones fail the
    /// look and nothing is ended). Sessions of roles this one may not signal
    /// are left alone.
    pub async fn end_frozen_copies(
        &self,
        client: &Client,
        watch: &mut CopyWatch,
    ) -> Result<Vec<FrozenCopy>, SinkError> {
        let rows = self
            .bounded("looking for sessions frozen in a COPY", async {
                client
                    .query(
                        "SELECT b.pid, b.application_name, \
                         coalesce(host(b.client_addr), 'local'), \
                         extract(epoch FROM b.query_start)::float8, \
                         extract(epoch FROM now() - b.query_start)::float8, \
                         p.bytes_processed, \
                         EXISTS (SELECT 1 FROM pg_stat_activity w \
                                 WHERE b.pid = ANY (pg_blocking_pids(w.pid))) \
                         FROM pg_stat_activity b JOIN pg_stat_progress_copy p ON p.pid = b.pid \
                         WHERE b.datname = current_database() AND b.pid <> pg_backend_pid() \
                         AND b.state = 'active' AND b.wait_event = 'ClientRead' \
                         AND b.query LIKE 'COPY % FROM STDIN (FORMAT binary)' \
                         AND (pg_has_role(b.usesysid, 'USAGE') \
                              OR (pg_has_role('pg_signal_backend', 'USAGE') \
                                  AND NOT (SELECT rolsuper FROM pg_roles WHERE oid = b.usesysid)))",
                        &[],
                    )
                    .await
                    .map_err(SinkError::from)
            })
            .await?;
        let frozen_secs = self.frozen_after().as_secs_f64();
        let mut seen = HashMap::with_capacity(rows.len());
        let mut frozen = Vec::new();
        for r in &rows {
            let pid: i32 = r.get(0);
            let copy = (r.get::<_, f64>(3), r.get::<_, i64>(5));
            let running = r.get::<_, f64>(4);
            let blocking = r.get::<_, bool>(6);
            // A waiter that gives up and retries is not always waiting at
            // the moment of a look: blocking at this one or the last counts.
            let before = watch.seen.get(&pid);
            let unchanged = before.is_some_and(|(c, _)| *c == copy);
            if running > frozen_secs && unchanged && (blocking || before.is_some_and(|(_, b)| *b)) {
                frozen.push(FrozenCopy {
                    pid,
                    application: r.get::<_, Option<String>>(1).unwrap_or_default(),
                    client: r.get(2),
                    copying_for: Duration::from_secs_f64(running.max(0.0)),
                    ended: false,
                });
            }
            seen.insert(pid, (copy, blocking));
        }
        watch.seen = seen;
        if frozen.is_empty() {
            return Ok(frozen);
        }
        let pids: Vec<i32> = frozen.iter().map(|f| f.pid).collect();
        let ended = self
            .bounded("ending sessions frozen in a COPY", async {
                client
                    .query(
                        "SELECT pid, pg_terminate_backend(pid) FROM unnest($1::int4[]) AS pid",
                        &[&pids],
                    )
                    .await
                    .map_err(SinkError::from)
            })
            .await?;
        for r in &ended {
            let pid: i32 = r.get(0);
            if let Some(f) = frozen.iter_mut().find(|f| f.pid == pid) {
                f.ended = r.get(1);
            }
        }
        Ok(frozen)
    }

    /// The sessions of this database that run as this role under this
    /// connection's `application_name` (this consumer's writers, or those of
    /// consumers configured alike), whose statement has waited for a lock
    /// for longer than `longer_than`, each with a session that holds it up.
    ///
    /// A writer held up by a lock only times out and is retried, which
    /// counts as `db_errors_total{kind="timeout"}` and says nothing of who
    /// holds it: a `VACUUM FULL`, a migration, an operator's open
    /// transaction, or another consumer frozen mid-batch. This names the
    /// holder while the wait lasts. Fields of sessions of other roles that
    /// this role may not see (`pg_read_all_stats`) are None.
    pub async fn lock_waits(
        &self,
        client: &Client,
        longer_than: Duration,
    ) -> Result<Vec<LockWait>, SinkError> {
        let rows = self
            .bounded("looking for writers waiting for a lock", async {
                client
                    .query(
                        "SELECT w.pid, \
                         extract(epoch FROM w.query_start)::float8, \
                         extract(epoch FROM now() - w.query_start)::float8, \
                         (SELECT string_agg(DISTINCT l.relation::regclass::text, ', ') \
                          FROM pg_locks l WHERE l.pid = w.pid AND l.relation IS NOT NULL \
                          AND (NOT l.granted OR l.locktype = 'tuple')), \
                         (SELECT min(l.mode) FROM pg_locks l WHERE l.pid = w.pid AND NOT l.granted), \
                         b.pid, b.application_name, b.usename::text, \
                         CASE WHEN b.client_port = -1 THEN 'local' ELSE host(b.client_addr) END, \
                         b.state, \
                         extract(epoch FROM now() - b.xact_start)::float8 \
                         FROM pg_stat_activity w \
                         CROSS JOIN LATERAL unnest(pg_blocking_pids(w.pid)) AS h(pid) \
                         JOIN pg_stat_activity b ON b.pid = h.pid \
                         WHERE w.datname = current_database() AND w.pid <> pg_backend_pid() \
                         AND w.usename = current_user \
                         AND w.application_name = current_setting('application_name') \
                         AND w.wait_event_type = 'Lock' \
                         AND w.query_start < now() - make_interval(secs => $1) \
                         ORDER BY w.pid, b.pid",
                        &[&longer_than.as_secs_f64()],
                    )
                    .await
                    .map_err(SinkError::from)
            })
            .await?;
        Ok(rows
            .iter()
            .map(|r| LockWait {
                pid: r.get(0),
                since: r.get(1),
                waiting_for: Duration::from_secs_f64(r.get::<_, f64>(2).max(0.0)),
                relations: r.get(3),
                mode: r.get(4),
                holder_pid: r.get(5),
                holder_application: r.get(6),
                holder_user: r.get(7),
                holder_client: r.get(8),
                holder_state: r.get(9),
                holder_in_transaction_for: r
                    .get::<_, Option<f64>>(10)
                    .map(|s| Duration::from_secs_f64(s.max(0.0))),
            })
            .collect())
    }

    /// Gives up on a connection whose exchange went unanswered: asks Postgres
    /// to cancel what it runs there, then lets the connection go.
    ///
    /// Dropping the client alone is not enough. The connection stays open
    /// while a reply is owed, and its backend goes on waiting: behind a lock
    /// (a `VACUUM FULL`, a long migration, an operator's `LOCK TABLE`), each
    /// retry would leave one more waiting backend, until `max_connections`
    /// ran out for every client of the database. The cancel request is sent
    /// in the background and bounded, since a frozen server answers it no
    /// more than the exchange.
    pub fn abandon(&self, client: Client) {
        let token = client.cancel_token();
        drop(client);
        let tls = match tls_connector(&self.config, self.ca_file.as_deref()) {
            Ok(tls) => tls,
            Err(e) => {
                tracing::debug!(error = %e, "cannot cancel an unanswered query");
                return;
            }
        };
        // At least a few seconds: a busy server can be slow to take the
        // cancel's new connection, and a cancel that gives up leaves the wait.
        let limit = self.timeout.max(Duration::from_secs(5));
        tokio::spawn(async move {
            let cancel = async {
                match tls {
                    None => token.cancel_query(tokio_postgres::NoTls).await,
                    Some(tls) => token.cancel_query(tls).await,
                }
            };
            match tokio::time::timeout(limit, cancel).await {
                Ok(Ok(())) => tracing::debug!("cancelled an unanswered query"),
                Ok(Err(e)) => tracing::debug!(error = %e, "cannot cancel an unanswered query"),
                Err(_) => tracing::debug!("no answer to the cancel request either"),
            }
        });
    }

    /// `work`, or a retryable [`SinkError::Unavailable`] of kind `timeout`
    /// when Postgres has not answered within [`Database::timeout`]. The
    /// caller must give up the connection `work` used ([`Database::abandon`]):
    /// its reply may still come.
    pub async fn bounded<T>(
        &self,
        what: &str,
        work: impl std::future::Future<Output = Result<T, SinkError>>,
    ) -> Result<T, SinkError> {
        match tokio::time::timeout(self.timeout, work).await {
            Ok(result) => result,
            Err(_) => Err(SinkError::timed_out(what, self.timeout)),
        }
    }
}

/// What [`Database::end_frozen_copies`] saw of each COPY at its last look,
/// by session: the statement's start, the bytes it had received, and
/// whether another session waited for its locks.
#[derive(Debug, Default)]
pub struct CopyWatch {
    seen: HashMap<i32, ((f64, i64), bool)>,
}

/// A session [`Database::end_frozen_copies`] found frozen in a COPY.
#[derive(Debug, Clone, PartialEq)]
pub struct FrozenCopy {
    pub pid: i32,
    pub application: String,
    /// The client's address, or `local` for a Unix socket.
    pub client: String,
    /// How long its COPY had run.
    pub copying_for: Duration,
    /// Whether Postgres accepted to end it.
    pub ended: bool,
}

/// A writer waiting for a lock, and a session that holds it up (see
/// [`Database::lock_waits`]).
#[derive(Debug, Clone, PartialEq)]
pub struct LockWait {
    pub pid: i32,
    /// When the waiting statement began (epoch seconds): with `pid` and the
    /// holder, it tells one wait from the next.
    pub since: f64,
    /// How long the waiting statement has run.
    pub waiting_for: Duration,
    /// The tables whose locks it waits for, when Postgres names them (a
    /// row's lock is waited for as the holder's transaction, and the row's
    /// table shows as the tuple lock it holds meanwhile).
    pub relations: Option<String>,
    /// The lock mode it asks for.
    pub mode: Option<String>,
    pub holder_pid: i32,
    pub holder_application: Option<String>,
    pub holder_user: Option<String>,
    /// The holder's address, or `local` for a Unix socket.
    pub holder_client: Option<String>,
    /// `active`, `idle in transaction` and so on.
    pub holder_state: Option<String>,
    pub holder_in_transaction_for: Option<Duration>,
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&describe(&self.config))
    }
}

impl std::fmt::Display for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&describe(&self.config))
    }
}

/// Describes a database for logs: user, host, port and database, never the password.
pub fn describe(c: &tokio_postgres::Config) -> String {
    let host = c
        .get_hosts()
        .first()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(s) => s.clone(),
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .unwrap_or_else(|| "localhost".into());
    let port = c.get_ports().first().copied().unwrap_or(5432);
    format!(
        "postgres://{}@{host}:{port}/{}",
        c.get_user().unwrap_or("?"),
        c.get_dbname().unwrap_or("?")
    )
}

/// Reads the group's stored next offsets of `topic`, each with the last
/// message consumed before it (when recorded). Absent partitions are not in
/// the map.
pub async fn load_offsets(
    client: &Client,
    group_id: &str,
    topic: &str,
) -> Result<HashMap<i32, StoredOffset>, SinkError> {
    let rows = client
        .query(
            "SELECT kafka_partition, next_offset, last_timestamp_ms, last_fingerprint \
             FROM consumer_offsets WHERE group_id = $1 AND topic = $2",
            &[&group_id, &topic],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let stored = StoredOffset {
                next: r.get(1),
                last_written: r.get::<_, Option<i64>>(3).map(|fingerprint| LastWritten {
                    timestamp_ms: r.get(2),
                    fingerprint,
                }),
            };
            (r.get::<_, i32>(0), stored)
        })
        .collect())
}

/// Refuses a database whose encoding cannot hold every character an event
/// may carry: Postgres would refuse such a batch on every retry (SQLSTATE
/// 22P05), stalling its partitions. UTF8 holds everything; SQL_ASCII stores
/// the bytes unchecked.
pub async fn check_encoding(client: &Client) -> Result<(), SinkError> {
    let encoding: String = client
        .query_one("SELECT current_setting('server_encoding')", &[])
        .await?
        .get(0);
    match encoding.as_str() {
        "UTF8" | "SQL_ASCII" => Ok(()),
        other => Err(SinkError::Fatal(format!(
            "the database's encoding is {other}, which cannot store every character an event may \
             carry; create the database with ENCODING 'UTF8' (CREATE DATABASE ... ENCODING 'UTF8' \
             TEMPLATE template0)"
        ))),
    }
}

/// Refuses to start a group on a topic that another group already loads into
/// this database: `events` is keyed by (partition, offset), so a second copy
/// of the topic would collide row by row and never make progress. Refuses a
/// second topic too: its rows would collide the same way, or, on partitions
/// or offsets the first one has not reached, mix with its rows for good
/// (`events` has no topic column), and the KPIs would count both.
pub async fn check_single_group(
    client: &impl GenericClient,
    group_id: &str,
    topic: &str,
) -> Result<(), SinkError> {
    let topics: Vec<String> = client
        .query(
            "SELECT DISTINCT topic FROM consumer_offsets WHERE topic <> $1 ORDER BY 1",
            &[&topic],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if !topics.is_empty() {
        return Err(SinkError::Fatal(format!(
            "this database already holds the events of topic {} (see consumer_offsets), so it cannot take topic {topic}: \
             events are keyed by partition and offset alone, and the two would mix. One database holds one topic: \
             run with --topic {} or point DATABASE_URL at another database; to replace the old topic, see README: Starting a topic over",
            topics.join(", "),
            topics[0]
        )));
    }
    let others: Vec<String> = client
        .query(
            "SELECT DISTINCT group_id FROM consumer_offsets WHERE topic = $1 AND group_id <> $2 \
             AND NOT EXISTS (SELECT 1 FROM consumer_offsets WHERE topic = $1 AND group_id = $2) ORDER BY 1",
            &[&topic, &group_id],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if others.is_empty() {
        return Ok(());
    }
    Err(SinkError::Fatal(format!(
        "topic {topic} is already loaded into this database by consumer group(s) {} and group {group_id} has no offsets here; \
         one database holds one copy of a topic, so run with --group-id {} or point DATABASE_URL at a fresh database",
        others.join(", "),
        others[0]
    )))
}

/// Timings of one prepared transaction, for the stage histograms.
#[derive(Debug, Default, Clone, Copy)]
pub struct WriteTimings {
    pub copy: Duration,
    pub merge: Duration,
}

/// A batch written inside an open transaction, waiting for COMMIT.
pub struct Prepared<'c> {
    tx: Transaction<'c>,
    pub timings: WriteTimings,
    /// Rows merged per KPI (kpi name, rows).
    pub merged: Vec<(String, u64)>,
    /// Distinct members this batch adds: [`crate::kpi::Memberships::commit`]
    /// them once the COMMIT succeeded.
    pub pending: crate::kpi::Pending,
}

impl Prepared<'_> {
    pub async fn commit(self) -> Result<(), SinkError> {
        self.tx.commit().await.map_err(SinkError::from)
    }

    pub async fn rollback(self) -> Result<(), SinkError> {
        self.tx.rollback().await.map_err(SinkError::from)
    }
}

/// Opens the batch transaction and writes everything but the COMMIT:
/// [`begin_copy`] then [`Copied::finish`].
pub async fn prepare<'c>(
    client: &'c mut Client,
    batch: &BatchWrite<'_>,
) -> Result<Prepared<'c>, SinkError> {
    begin_copy(client, batch).await?.finish(batch).await
}

/// The first half of a batch transaction: the rows are copied, nothing else
/// is written and no lock is held that another batch of this consumer needs.
pub struct Copied<'c> {
    tx: Transaction<'c>,
    copy: Duration,
}

/// Opens the batch transaction and COPYs the valid rows and the rejects.
///
/// The COPY comes before the offset fence so that it can run while the
/// previous batch is still merging and committing on another connection:
/// the rows take no lock that batch waits for (their keys are new offsets),
/// while the fence would wait on that batch's offset rows. A batch that turns
/// out to be fenced still rolls back whole; a zombie's rows that are already
/// stored fail here as [`SinkError::Duplicate`], which is handled as fenced.
pub async fn begin_copy<'c>(
    client: &'c mut Client,
    batch: &BatchWrite<'_>,
) -> Result<Copied<'c>, SinkError> {
    let tx = client.transaction().await?;
    let start = Instant::now();
    if batch.events.num_rows() > 0 {
        copy_events(&tx, batch.events, batch.abort_mid_copy).await?;
    }
    if batch.rejects.num_rows() > 0 {
        insert_rejects(&tx, batch.topic, batch.rejects).await?;
    }
    Ok(Copied {
        tx,
        copy: start.elapsed(),
    })
}

impl<'c> Copied<'c> {
    /// The second half, once every earlier batch of this consumer has
    /// committed or given up: fence the offsets (locked in partition order,
    /// so two consumers never deadlock), merge the KPIs, store the offsets.
    pub async fn finish(self, batch: &BatchWrite<'_>) -> Result<Prepared<'c>, SinkError> {
        let Copied { tx, copy } = self;
        if batch.claim {
            // Before the fence, which locks offset rows: a run waiting here
            // holds only the new rows it copied.
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&CLAIM_LOCK])
                .await?;
            check_single_group(&tx, batch.group_id, batch.topic).await?;
        }
        fence_offsets(&tx, batch).await?;
        // Before the merges: tables of another definition would fail them
        // with a misleading error.
        if batch.events.num_rows() > 0 {
            // Every enabled KPI has a write when there are events, so these
            // are the KPIs this batch keeps up to date.
            let known: Vec<(&str, &str)> = batch
                .kpis
                .iter()
                .map(|k| (k.def.name.as_str(), k.def.hash.as_str()))
                .collect();
            // KPIs this batch marks stale (below) are given up, not short.
            let verdict = crate::kpi::judge(&tx, &known, batch.stale_kpis).await?;
            if !verdict.short.is_empty() {
                return Err(SinkError::KpisDiffer(verdict.short));
            }
            if !verdict.retired.is_empty() {
                return Err(SinkError::KpisRetired(verdict.retired));
            }
        }
        let start = Instant::now();
        let mut pending = crate::kpi::Pending::default();
        let merged = crate::kpi::write(
            &tx,
            batch.members,
            batch.kpis,
            "",
            crate::kpi::Writers::Shared,
            &mut pending,
        )
        .await?;
        // After the merges, which lock `kpi_registry` rows in engine order.
        if !batch.stale_kpis.is_empty() {
            // A hash that no file has: the next start backfills these KPIs.
            tx.execute(
                "UPDATE kpi_registry SET sql_hash = $2 WHERE name = ANY($1)",
                &[&batch.stale_kpis, &crate::kpi::STALE_HASH],
            )
            .await?;
        }
        store_offsets(&tx, batch).await?;
        Ok(Prepared {
            tx,
            timings: WriteTimings {
                copy,
                merge: start.elapsed(),
            },
            merged,
            pending,
        })
    }

    /// Gives the batch up (a rebalance made it stale before it was finished).
    pub async fn rollback(self) -> Result<(), SinkError> {
        self.tx.rollback().await.map_err(SinkError::from)
    }
}

/// Whether a batch whose COMMIT failed was stored after all: a connection
/// can break after the server committed and before its reply arrived. The
/// batch landed if every partition's stored offset is the batch's end; it
/// did not if they are still where the batch started (then retrying it is
/// safe, and anything else is fenced by the retry as usual).
pub async fn landed(client: &Client, batch: &BatchWrite<'_>) -> Result<bool, SinkError> {
    if batch.offsets.is_empty() {
        return Ok(false);
    }
    let stored = stored_offsets(client, batch, false).await?;
    Ok(batch
        .offsets
        .iter()
        .all(|o| stored.get(&o.partition) == Some(&o.next)))
}

/// After a batch's COPY found some of its rows already stored
/// ([`SinkError::Duplicate`], whose text is `message`): who wrote them.
/// When this consumer group did (a zombie's batch, or a race with the
/// partition's new owner), its stored offsets have moved from where the batch
/// expected them, and the batch is fenced as usual: returns Ok. When every
/// partition's stored offset is still the expected one, no member of this
/// group wrote those rows: another consumer group, or another topic, wrote
/// the same (partition, offset) keys. Retrying can never succeed, so that is
/// a [`SinkError::Fatal`] that says what to do.
pub async fn check_duplicate(
    client: &Client,
    batch: &BatchWrite<'_>,
    message: &str,
) -> Result<(), SinkError> {
    let stored = stored_offsets(client, batch, false).await?;
    if batch
        .offsets
        .iter()
        .any(|o| stored.get(&o.partition).copied() != o.expected)
    {
        return Ok(());
    }
    let at: Vec<String> = batch
        .offsets
        .iter()
        .map(|o| match o.expected {
            Some(e) => format!("partition {} offsets {e} to {}", o.partition, o.next - 1),
            None => format!("partition {} offsets up to {}", o.partition, o.next - 1),
        })
        .collect();
    Err(SinkError::Fatal(format!(
        "rows at the partitions and offsets this batch of topic '{}' holds ({}) are already stored ({message}), but consumer group '{}' never wrote them: another consumer group, or another topic (an old log of this one included), did. This database holds one topic's events, keyed by (partition, offset) alone. Run with the group that wrote them (see the consumer_offsets table), point this group or topic at another database, or, if the rows are an old topic's left behind, see README: Starting a topic over",
        batch.topic,
        at.join("; "),
        batch.group_id,
    )))
}

/// This group's stored next offset of each of the batch's partitions. With
/// `lock`, the rows are locked in partition order, so that two consumers
/// never deadlock on them.
async fn stored_offsets(
    client: &impl GenericClient,
    batch: &BatchWrite<'_>,
    lock: bool,
) -> Result<HashMap<i32, i64>, SinkError> {
    let partitions: Vec<i32> = batch.offsets.iter().map(|o| o.partition).collect();
    let sql = if lock {
        "SELECT kafka_partition, next_offset FROM consumer_offsets \
         WHERE group_id = $1 AND topic = $2 AND kafka_partition = ANY($3) \
         ORDER BY kafka_partition FOR UPDATE"
    } else {
        "SELECT kafka_partition, next_offset FROM consumer_offsets \
         WHERE group_id = $1 AND topic = $2 AND kafka_partition = ANY($3)"
    };
    // Typed statements go out as one round trip (parse, bind and execute
    // together); a batch's fixed cost is mostly round trips.
    let rows = client
        .query_typed(
            sql,
            &[
                (&batch.group_id, Type::TEXT),
                (&batch.topic, Type::TEXT),
                (&partitions, Type::INT4_ARRAY),
            ],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

async fn fence_offsets(tx: &Transaction<'_>, batch: &BatchWrite<'_>) -> Result<(), SinkError> {
    let stored = stored_offsets(tx, batch, true).await?;
    for o in batch.offsets {
        let s = stored.get(&o.partition).copied();
        if s != o.expected {
            return Err(SinkError::Fenced {
                partition: o.partition,
                stored: s,
                expected: o.expected,
            });
        }
    }
    Ok(())
}

async fn copy_events(
    tx: &Transaction<'_>,
    events: &RecordBatch,
    abort_mid_copy: bool,
) -> Result<(), SinkError> {
    let schema = event_schema();
    let columns: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    let sql = format!(
        "COPY events ({}) FROM STDIN (FORMAT binary)",
        columns.join(", ")
    );
    copy_batch(tx, &sql, events, abort_mid_copy, SinkError::from).await
}

/// Streams `batch` as COPY BINARY into the statement `sql`.
pub async fn copy_in(
    tx: &Transaction<'_>,
    sql: &str,
    batch: &RecordBatch,
) -> Result<(), SinkError> {
    copy_batch(tx, sql, batch, false, SinkError::from).await
}

/// [`copy_in`], with Postgres' errors sorted by `judge`: a KPI's rows may be
/// refused at the COPY itself (a key Postgres cannot store), which no retry
/// changes, so the caller tells that apart from Postgres being away.
pub async fn copy_in_judged(
    tx: &Transaction<'_>,
    sql: &str,
    batch: &RecordBatch,
    judge: impl Fn(tokio_postgres::Error) -> SinkError,
) -> Result<(), SinkError> {
    copy_batch(tx, sql, batch, false, judge).await
}

/// [`copy_in`], with the crash tests' "killed inside the COPY": when
/// `abort_halfway`, half the data reaches the server, then the process dies
/// without a word to Postgres.
async fn copy_batch(
    tx: &Transaction<'_>,
    sql: &str,
    batch: &RecordBatch,
    abort_halfway: bool,
    judge: impl Fn(tokio_postgres::Error) -> SinkError,
) -> Result<(), SinkError> {
    let mut buf = BytesMut::new();
    copy::encode_batch(batch, &mut buf).map_err(|e| SinkError::Fatal(e.to_string()))?;
    let sink = tx.copy_in(sql).await.map_err(&judge)?;
    let mut sink = pin!(sink);
    let mut data = buf.freeze();
    if abort_halfway {
        sink.send(data.split_to(data.len() / 2)).await?;
        sink.flush().await?;
        tracing::warn!("fault injection: aborting inside the COPY");
        std::process::abort();
    }
    // One chunk per 4 MiB keeps the socket busy without a second full copy.
    while !data.is_empty() {
        let chunk = data.split_to(data.len().min(4 << 20));
        sink.send(chunk).await.map_err(&judge)?;
    }
    sink.as_mut().finish().await.map_err(&judge)?;
    Ok(())
}

async fn insert_rejects(
    tx: &Transaction<'_>,
    topic: &str,
    rejects: &RecordBatch,
) -> Result<(), SinkError> {
    let mut fields: Vec<_> = rejects.schema().fields().iter().cloned().collect();
    fields.push(Arc::new(Field::new("topic", DataType::Utf8, false)));
    let mut columns = rejects.columns().to_vec();
    columns.push(Arc::new(StringArray::from(vec![topic; rejects.num_rows()])));
    let with_topic = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
        .map_err(|e| SinkError::Fatal(format!("reject batch: {e}")))?;
    let names: Vec<&str> = with_topic
        .schema_ref()
        .fields()
        .iter()
        .map(|f| f.name().as_str())
        .collect();
    let sql = format!(
        "COPY rejected_events ({}) FROM STDIN (FORMAT binary)",
        names.join(", ")
    );
    copy_in(tx, &sql, &with_topic).await
}

async fn store_offsets(tx: &Transaction<'_>, batch: &BatchWrite<'_>) -> Result<(), SinkError> {
    let (known, new): (Vec<&PartitionOffsets>, Vec<&PartitionOffsets>) =
        batch.offsets.iter().partition(|o| o.expected.is_some());
    // One statement per kind, not one per partition: the rows are locked by
    // the fence already, so the order inside the statement cannot deadlock.
    for (rows, sql) in [
        (
            known,
            "UPDATE consumer_offsets c SET next_offset = v.next, last_timestamp_ms = v.ts, \
             last_fingerprint = v.fp, updated_at = now() \
             FROM unnest($3::int4[], $4::int8[], $5::int8[], $6::int8[]) AS v(p, next, ts, fp) \
             WHERE c.group_id = $1 AND c.topic = $2 AND c.kafka_partition = v.p \
             RETURNING c.kafka_partition",
        ),
        (
            // A plain INSERT: if another consumer inserted a partition
            // meanwhile, it is skipped here and reported as fenced below
            // instead of being overwritten.
            new,
            "INSERT INTO consumer_offsets \
             (group_id, topic, kafka_partition, next_offset, last_timestamp_ms, last_fingerprint) \
             SELECT $1, $2, p, next, ts, fp FROM unnest($3::int4[], $4::int8[], $5::int8[], $6::int8[]) AS v(p, next, ts, fp) \
             ON CONFLICT DO NOTHING RETURNING kafka_partition",
        ),
    ] {
        if rows.is_empty() {
            continue;
        }
        let partitions: Vec<i32> = rows.iter().map(|o| o.partition).collect();
        let next: Vec<i64> = rows.iter().map(|o| o.next).collect();
        let timestamps: Vec<Option<i64>> = rows.iter().map(|o| o.last.timestamp_ms).collect();
        let fingerprints: Vec<i64> = rows.iter().map(|o| o.last.fingerprint).collect();
        let written: Vec<i32> = tx
            .query_typed(
                sql,
                &[
                    (&batch.group_id, Type::TEXT),
                    (&batch.topic, Type::TEXT),
                    (&partitions, Type::INT4_ARRAY),
                    (&next, Type::INT8_ARRAY),
                    (&timestamps, Type::INT8_ARRAY),
                    (&fingerprints, Type::INT8_ARRAY),
                ],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if let Some(o) = rows.iter().find(|o| !written.contains(&o.partition)) {
            return Err(SinkError::Fenced {
                partition: o.partition,
                stored: None,
                expected: o.expected,
            });
        }
    }
    Ok(())
}
