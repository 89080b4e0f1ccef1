//! KPIs against a real Postgres: golden outputs of every file in queries/,
//! streamed == recomputed for random events and random batch sizes
//! (proptest), a KPI added after data exists, and the refusals.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::*;
use datafusion::arrow::record_batch::RecordBatch;
use energy_stream::event::reject_schema;
use energy_stream::kpi::{self, KpiConfig, KpiEngine, Memberships};
use energy_stream::sink::{self, BatchWrite};
use proptest::prelude::*;

fn queries_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("queries")
}

async fn shipped_engine() -> KpiEngine {
    KpiEngine::load_dir(&KpiConfig {
        dir: queries_dir(),
        ..Default::default()
    })
    .await
    .expect("shipped KPI files are valid")
}

/// Valid events of JSON lines, as the pipeline would see them.
fn valid_events(lines: &[String]) -> RecordBatch {
    let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
    validated(&lines).valid
}

/// What DataFusion computes for `sql` over `events` at once, each cell as
/// Arrow displays it.
async fn datafusion_rows(events: RecordBatch, sql: &str) -> Vec<Vec<String>> {
    let ctx = datafusion::prelude::SessionContext::new();
    ctx.register_batch("events", events).unwrap();
    let mut rows = Vec::new();
    for b in ctx.sql(sql).await.unwrap().collect().await.unwrap() {
        for row in 0..b.num_rows() {
            rows.push(
                (0..b.num_columns())
                    .map(|col| {
                        datafusion::arrow::util::display::array_value_to_string(b.column(col), row)
                            .unwrap()
                    })
                    .collect(),
            );
        }
    }
    rows
}

/// Streams `events` through the real merge in batches of the given sizes,
/// one transaction per batch, exactly as the pipeline writes them.
async fn stream(
    client: &mut tokio_postgres::Client,
    engine: &KpiEngine,
    events: &RecordBatch,
    sizes: &[usize],
) {
    // A fresh memory per stream: every batch after the first finds it
    // current, so this exercises the in-memory decision.
    let members = Memberships::new(1_000_000);
    stream_with(client, engine, &members, events, sizes).await;
}

/// [`stream`] with a given memory of the distinct members, as one consumer
/// keeps it across batches.
async fn stream_with(
    client: &mut tokio_postgres::Client,
    engine: &KpiEngine,
    members: &Memberships,
    events: &RecordBatch,
    sizes: &[usize],
) {
    let mut start = 0;
    let mut i = 0;
    while start < events.num_rows() {
        let len = sizes[i % sizes.len()].max(1).min(events.num_rows() - start);
        i += 1;
        let batch = events.slice(start, len);
        start += len;
        let mut prepared = prepare_with(client, engine, members, &batch).await;
        let pending = std::mem::take(&mut prepared.pending);
        prepared.commit().await.unwrap();
        members.commit(pending);
    }
}

/// One batch's transaction, everything written and not yet committed, with a
/// memory of distinct members that knows nothing yet (it reads the logs).
async fn prepare<'c>(
    client: &'c mut tokio_postgres::Client,
    engine: &KpiEngine,
    batch: &RecordBatch,
) -> sink::Prepared<'c> {
    prepare_with(client, engine, &Memberships::new(1_000_000), batch).await
}

async fn prepare_with<'c>(
    client: &'c mut tokio_postgres::Client,
    engine: &KpiEngine,
    members: &Memberships,
    batch: &RecordBatch,
) -> sink::Prepared<'c> {
    let empty = RecordBatch::new_empty(reject_schema());
    let writes = engine.writes(engine.compute(batch).await.unwrap());
    let write = BatchWrite {
        group_id: "g",
        topic: "t",
        events: batch,
        rejects: &empty,
        offsets: &[],
        kpis: &writes,
        members,
        stale_kpis: &[],
        claim: false,
        abort_mid_copy: false,
    };
    sink::prepare(client, &write).await.unwrap()
}

/// `n` valid events of every type, customers C0..C{customers}, `step`
/// minutes apart.
fn mixed_events(n: usize, customers: usize, step: u32) -> RecordBatch {
    let lines: Vec<String> = (0..n)
        .map(|i| {
            event(
                TYPES[i % 7],
                &format!("C{}", i % customers),
                i as i64,
                i as u32 * step,
            )
        })
        .collect();
    valid_events(&lines)
}

async fn setup(prefix: &str, engine: &KpiEngine) -> tokio_postgres::Client {
    let db = fresh_db(prefix).await;
    let mut c = client(&db).await;
    sink::migrate::migrate(&mut c).await.unwrap();
    kpi::install(&mut c, engine).await.unwrap();
    c
}

/// A view test's rig: the KPI `file` of `sql` installed in a fresh database
/// (`prefix`) and streamed over `lines` through the real merge, in batches
/// of `sizes`. `want` is what DataFusion computes at once: `columns` of the
/// query's rows, by channel, each cell as Arrow displays it.
async fn view_against_datafusion(
    prefix: &str,
    file: &str,
    sql: &str,
    lines: &[String],
    sizes: &[usize],
    columns: &str,
) -> (tokio_postgres::Client, KpiEngine, Vec<Vec<String>>) {
    let engine = KpiEngine::load_dir(&kpi_dir(&[(file, sql)])).await.unwrap();
    let events = valid_events(lines);
    let mut c = setup(prefix, &engine).await;
    stream(&mut c, &engine, &events, sizes).await;
    let want = datafusion_rows(
        events,
        &format!("SELECT {columns} FROM ({sql}) ORDER BY channel"),
    )
    .await;
    (c, engine, want)
}

/// The tables whose names match any of the LIKE patterns, in name order.
async fn tables_like(c: &tokio_postgres::Client, patterns: &[&str]) -> Vec<String> {
    c.query(
        "SELECT tablename::text FROM pg_tables WHERE tablename LIKE ANY($1) ORDER BY 1",
        &[&patterns],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

async fn view_as_text(c: &tokio_postgres::Client, def: &kpi::KpiDef) -> String {
    c.batch_execute("SET TIME ZONE 'UTC'").await.unwrap();
    let cols: Vec<String> = def
        .outputs
        .iter()
        .map(|o| format!("coalesce(\"{}\"::text, 'NULL')", o.name))
        .collect();
    let keys: Vec<String> = def.keys.iter().map(|k| format!("\"{}\"", k.name)).collect();
    let sql = format!(
        "SELECT concat_ws(',', {}) FROM \"{}\" ORDER BY {}",
        cols.join(", "),
        def.name,
        keys.join(", ")
    );
    let mut out = def
        .outputs
        .iter()
        .map(|o| o.name.as_str())
        .collect::<Vec<_>>()
        .join(",");
    out.push('\n');
    for r in c.query(&sql, &[]).await.unwrap() {
        out.push_str(r.get::<_, &str>(0));
        out.push('\n');
    }
    out
}

/// Every file in queries/ against tests/fixtures/kpi_events.jsonl; the
/// expected views are in tests/golden/<kpi>.csv. `UPDATE_GOLDEN=1 cargo test
/// --test kpi golden` rewrites them (review the diff before committing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn golden_outputs_of_every_shipped_kpi() {
    let engine = shipped_engine().await;
    let fixture = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/kpi_events.jsonl"),
    )
    .unwrap();
    let lines: Vec<String> = fixture.lines().map(str::to_string).collect();
    let events = valid_events(&lines);
    assert!(events.num_rows() > 500);
    let mut c = setup("golden", &engine).await;
    stream(&mut c, &engine, &events, &[37, 1, 200, 64]).await;

    let update = std::env::var("UPDATE_GOLDEN").is_ok();
    let mut checked = 0;
    for def in engine.defs() {
        let got = view_as_text(&c, def).await;
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/golden")
            .join(format!("{}.csv", def.name));
        if update {
            std::fs::write(&path, &got).unwrap();
        }
        let want = std::fs::read_to_string(&path).unwrap_or_else(|_| {
            panic!(
                "no golden file {}: run UPDATE_GOLDEN=1 cargo test --test kpi golden",
                path.display()
            )
        });
        assert_eq!(got, want, "{} differs from its golden output", def.name);
        assert!(got.lines().count() > 2, "{} has rows", def.name);
        checked += 1;
    }
    assert_eq!(checked, std::fs::read_dir(queries_dir()).unwrap().count());
    let mismatches = kpi::verify(&mut c, &engine, None).await.unwrap();
    assert!(mismatches.is_empty(), "{mismatches:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn funnel_stages_never_exceed_the_previous_one() {
    let engine = shipped_engine().await;
    // Built to stress it: switches and payments without logins or views.
    let mut lines = Vec::new();
    for i in 0..200 {
        let t = [
            "tariff_switch",
            "bill_payment",
            "view_tariffs",
            "user_login",
        ][i % 4];
        let t = if i % 7 == 0 { "tariff_switch" } else { t };
        lines.push(event(
            t,
            &format!("C{}", i % 23),
            i as i64,
            (i * 13 % 2880) as u32,
        ));
    }
    let events = valid_events(&lines);
    let mut c = setup("funnel", &engine).await;
    stream(&mut c, &engine, &events, &[17]).await;
    let bad: i64 = c
        .query_one(
            "SELECT count(*) FROM daily_engagement_funnel WHERE NOT (active_customers >= logged_in_customers \
             AND logged_in_customers >= viewed_customers AND viewed_customers >= switched_customers \
             AND active_customers >= paid_customers)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(bad, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kpi_added_after_data_exists_is_backfilled_then_kept_up_to_date() {
    let dir = scratch_dir().join(unique("kpi-added"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        queries_dir().join("hourly_channel_metrics.sql"),
        dir.join("hourly_channel_metrics.sql"),
    )
    .unwrap();
    let cfg = KpiConfig {
        dir: dir.clone(),
        ..Default::default()
    };
    let before = KpiEngine::load_dir(&cfg).await.unwrap();
    let events = mixed_events(300, 17, 7);
    let mut c = setup("added", &before).await;
    stream(&mut c, &before, &events.slice(0, 150), &[40]).await;

    // The user writes a new file and restarts.
    std::fs::write(
        dir.join("payments_by_customer.sql"),
        "-- Payments per customer per day\n\
         SELECT date_trunc('day', event_time) AS day, customer_id, count(*) AS payments, \
         sum(payment_amount) AS paid, avg(payment_amount) AS avg_paid \
         FROM events WHERE event_type = 'bill_payment' GROUP BY 1, 2",
    )
    .unwrap();
    let after = KpiEngine::load_dir(&cfg).await.unwrap();
    let report = kpi::install(&mut c, &after).await.unwrap();
    assert_eq!(report.backfilled, vec!["payments_by_customer".to_string()]);
    let rows: i64 = c
        .query_one("SELECT count(*) FROM payments_by_customer", &[])
        .await
        .unwrap()
        .get(0);
    assert!(rows > 0, "backfilled from the events already stored");
    assert!(kpi::verify(&mut c, &after, None).await.unwrap().is_empty());

    stream(&mut c, &after, &events.slice(150, 150), &[33]).await;
    assert!(kpi::verify(&mut c, &after, None).await.unwrap().is_empty());
    // A second restart does not backfill again.
    assert!(
        kpi::install(&mut c, &after)
            .await
            .unwrap()
            .backfilled
            .is_empty()
    );
    std::fs::remove_dir_all(dir).unwrap();
}

async fn refusal(sql: &str) -> String {
    let path = std::path::PathBuf::from("queries/bad_kpi.sql");
    match KpiEngine::from_sources(vec![(path, sql.to_string())], 64 << 20).await {
        Ok(_) => panic!("accepted: {sql}"),
        Err(e) => e.to_string(),
    }
}

#[tokio::test]
async fn unsupported_files_are_refused_with_what_to_write_instead() {
    let cases = [
        (
            "SELECT e.channel, count(*) FROM events e JOIN events f ON e.customer_id = f.customer_id GROUP BY 1",
            "JOIN",
        ),
        ("CREATE TABLE x (a int)", "DDL"),
        (
            "CREATE EXTERNAL TABLE x STORED AS CSV LOCATION '/etc/passwd'",
            "DDL",
        ),
        ("INSERT INTO events SELECT * FROM events", "DML"),
        ("SET datafusion.execution.batch_size = 1", "statement"),
        (
            "SELECT date_trunc('hour', now()) AS h, count(*) FROM events GROUP BY 1",
            "non-deterministic function now()",
        ),
        (
            "SELEC channel, count(*) FROM events GROUP BY 1",
            "SQL error",
        ),
        (
            "SELECT channel, count(*) FROM events GROUP BY 1 ORDER BY 2",
            "ORDER BY",
        ),
        (
            "SELECT channel, count(*) FROM events GROUP BY 1 LIMIT 5",
            "LIMIT",
        ),
        (
            "SELECT channel, count(*) OVER (PARTITION BY channel) FROM events",
            "window functions",
        ),
        ("SELECT channel FROM events", "without aggregates"),
        ("SELECT count(*) FROM events", "without GROUP BY"),
        (
            "SELECT channel, count(*) FROM events WHERE customer_id IN (SELECT customer_id FROM events) GROUP BY 1",
            "subquery",
        ),
        (
            "SELECT channel, median(session_id) FROM events GROUP BY 1",
            "median()",
        ),
        (
            "SELECT channel, count(*) FROM other GROUP BY 1",
            "other than events",
        ),
        // Regressions: DataFusion's own errors named something else here.
        (
            "SELECT channel, count(*) AS n FROM events JOIN events USING (session_id) GROUP BY channel",
            "JOIN",
        ),
        (
            "SELECT channel, count(*) AS n FROM events, unnest([1, 2]) GROUP BY channel",
            "JOIN",
        ),
        ("SET TIME ZONE 'UTC'", "a statement such as SET"),
        ("INSERT INTO foo VALUES (1)", "DML"),
        (
            "SELECT channel, count(*) AS n FROM events WHERE random() < 0.5 GROUP BY 1",
            "cannot draw random values",
        ),
        (
            "SELECT channel, count(*) AS AS n FROM events GROUP BY 1",
            "SQL error: syntax: Expected",
        ),
        // Regressions: a bare schema error, and "DISTINCT is supported in
        // count(DISTINCT x) only" for a count(DISTINCT ...).
        (
            "SELECT channel, max(session_id) AS a, max(CAST(session_id AS VARCHAR)) AS b \
             FROM events GROUP BY channel",
            "in a KPI file of its own",
        ),
        (
            "SELECT channel, min(event_time) AS a, min(event_time AT TIME ZONE 'Europe/Berlin') AS b \
             FROM events GROUP BY channel",
            "min(t AT TIME ZONE",
        ),
        (
            "SELECT channel, count(DISTINCT customer_id, session_id) AS n FROM events GROUP BY 1",
            "count(DISTINCT concat(a, '|', b))",
        ),
        // What the view would compute otherwise than DataFusion, or not at all.
        (
            "SELECT channel, TRY_CAST(sum(energy_consumed) AS INT) AS s FROM events GROUP BY 1",
            "TRY_CAST in s",
        ),
        (
            "SELECT channel, date_part('nanosecond', max(event_time)) AS ns FROM events GROUP BY 1",
            "date_part('nanosecond'",
        ),
        (
            "SELECT channel, extract(hour FROM max(event_time) - min(event_time)) AS h FROM events GROUP BY 1",
            "of a duration",
        ),
        (
            "SELECT channel, date_bin(INTERVAL '1 hour', max(event_time), TIMESTAMP '2000-01-01 00:30:00') AS b \
             FROM events GROUP BY 1",
            "date_bin in b",
        ),
        (
            "SELECT channel, upper(min(customer_id)) AS u FROM events GROUP BY 1",
            "upper() in u",
        ),
        (
            "SELECT channel, min(customer_id) ~* 'omega' AS o FROM events GROUP BY 1",
            "regular expression",
        ),
        (
            "SELECT channel, CAST(CAST(count(*) AS DOUBLE) / 7 AS VARCHAR) AS t FROM events GROUP BY 1",
            "a float turned into text",
        ),
        (
            "SELECT channel, max(channel) SIMILAR TO '[a-z]+' AS s FROM events GROUP BY 1",
            "SIMILAR TO in s",
        ),
        (
            "SELECT channel, max(event_time) - min(event_time) > INTERVAL '30 days' AS long_lived \
             FROM events GROUP BY 1",
            "a time span compared with an interval in long_lived",
        ),
        (
            "SELECT channel, date_part('century', max(event_time)) AS c FROM events GROUP BY 1",
            "DataFusion has no such part",
        ),
    ];
    for (sql, want) in cases {
        let msg = refusal(sql).await;
        assert!(msg.contains("queries/bad_kpi.sql"), "names the file: {msg}");
        assert!(msg.contains(want), "{sql}\n→ {msg}\n(wanted {want:?})");
        assert!(msg.contains(" — "), "says what to write instead: {msg}");
        assert!(!msg.contains("SQL error: SQL error"), "{msg}");
        assert!(!msg.contains("ValueWithSpan"), "no parser internals: {msg}");
    }
    // Regression: `check` said OK to these, and installing them failed.
    let keys: Vec<String> = (0..33)
        .map(|i| format!("session_id + {i} AS k{i}"))
        .collect();
    let positions: Vec<String> = (1..=33).map(|i| i.to_string()).collect();
    let many_keys = format!(
        "SELECT {}, count(*) AS n FROM events GROUP BY {}",
        keys.join(", "),
        positions.join(", ")
    );
    for (sql, want) in [
        (many_keys.as_str(), "33 GROUP BY keys"),
        (
            "SELECT channel AS \"\", count(*) AS n FROM events GROUP BY 1",
            "an output with an empty name",
        ),
        // Regressions: an aggregate as a GROUP BY key gave DataFusion's
        // "expanding wildcard" (by position), "duplicate field name" (by
        // expression), or a dump of the aggregate's signature (in a key).
        (
            "SELECT channel, count(*) AS n FROM events GROUP BY 2",
            "a SELECT column that is neither a GROUP BY key nor inside an aggregate",
        ),
        (
            "SELECT channel, max(session_id) AS n FROM events GROUP BY max(session_id), 1",
            "an aggregate in GROUP BY (max(session_id))",
        ),
        (
            "SELECT channel, sum(energy_consumed) + 1 AS n FROM events GROUP BY 1, 2",
            "an aggregate in GROUP BY (sum(",
        ),
    ] {
        let msg = refusal(sql).await;
        assert!(msg.contains(want) && msg.contains(" — "), "{sql}\n→ {msg}");
    }
    // 32 keys are Postgres' limit, and fine.
    let keys32 = format!(
        "SELECT {}, count(*) AS n FROM events GROUP BY {}",
        keys[..32].join(", "),
        positions[..32].join(", ")
    );
    KpiEngine::from_sources(vec![("keys32.sql".into(), keys32)], 64 << 20)
        .await
        .expect("32 keys");
}

/// Regression: a KPI file that is not UTF-8 was reported as the directory,
/// without the file's name.
#[tokio::test]
async fn an_unreadable_kpi_file_is_named() {
    let cfg = kpi_dir(&[(
        "good.sql",
        "SELECT channel, count(*) AS n FROM events GROUP BY 1",
    )]);
    std::fs::write(cfg.dir.join("latin1.sql"), b"-- caf\xe9\nSELECT 1").unwrap();
    let msg = KpiEngine::load_dir(&cfg).await.err().unwrap().to_string();
    assert!(msg.contains("latin1.sql"), "{msg}");
    assert!(msg.contains("UTF-8"), "{msg}");
}

/// Regression: `check` accepted a KPI named after a shipped view (which
/// `run` then replaced without a word, or failed on) or after another KPI's
/// state table, and `pg_` names that Postgres' catalogs shadow.
#[tokio::test]
async fn kpi_names_of_the_pipelines_own_objects_are_refused() {
    let sql = "SELECT channel, count(DISTINCT customer_id) AS n FROM events GROUP BY channel";
    for name in [
        "events",
        "consumer_offsets",
        "customer_view",
        "daily_energy_summary",
        "daily_event_summary",
        "rolling_24h_metrics",
        "kpi_state_a",
        "kpi_members_a_s0",
        "pg_class",
        // Regression: these installed, and `SELECT * FROM user` then read
        // the current user, `SELECT * FROM order` did not parse.
        "user",
        "order",
        "current_date",
    ] {
        let path = std::path::PathBuf::from(format!("queries/{name}.sql"));
        let msg = match KpiEngine::from_sources(vec![(path, sql.to_string())], 64 << 20).await {
            Ok(_) => panic!("accepted a KPI named {name}"),
            Err(e) => e.to_string(),
        };
        assert!(msg.contains(&format!("queries/{name}.sql")), "{msg}");
        assert!(msg.contains("rename the file"), "{msg}");
    }
    // Names that merely resemble them stay free, and so do Postgres' key
    // words that can name a table.
    for name in ["kpi_daily", "customer_views", "a", "users", "time", "hour"] {
        let path = std::path::PathBuf::from(format!("queries/{name}.sql"));
        KpiEngine::from_sources(vec![(path, sql.to_string())], 64 << 20)
            .await
            .unwrap_or_else(|e| panic!("{name} refused: {e}"));
    }
}

#[derive(Debug, Clone)]
struct Ev {
    kind: usize,
    customer: u8,
    session: u8,
    minute: u32,
    tariff: Option<u8>,
    amount: u32,
}

fn ev() -> impl Strategy<Value = Ev> {
    (
        0usize..7,
        0u8..9,
        0u8..12,
        0u32..(3 * 1440),
        proptest::option::of(0u8..3),
        0u32..100_000,
    )
        .prop_map(|(kind, customer, session, minute, tariff, amount)| Ev {
            kind,
            customer,
            session,
            minute,
            tariff,
            amount,
        })
}

fn line(e: &Ev) -> String {
    let t = TYPES[e.kind];
    let tariff = match (t, e.tariff) {
        ("view_tariffs" | "tariff_switch" | "incentive_claim", None) => Some(0),
        (_, x) => x,
    };
    let mut payload = format!(
        r#""customer_id":"C{}","session_id":{},"channel":"{}""#,
        e.customer,
        e.session,
        ["web_portal", "mobile_app", "call_center"][e.session as usize % 3]
    );
    if let Some(x) = tariff {
        payload.push_str(&format!(
            r#","tariff_type":"{}""#,
            ["basic", "green", "premium"][x as usize]
        ));
    }
    if t == "energy_consumed" || e.amount.is_multiple_of(3) {
        payload.push_str(&format!(
            r#","energy_consumed":{}.{:03}"#,
            e.amount / 1000,
            e.amount % 1000
        ));
    }
    if matches!(t, "bill_payment" | "tariff_switch" | "incentive_claim")
        || e.amount.is_multiple_of(5)
    {
        payload.push_str(&format!(
            r#","payment_amount":"{}.{:02}""#,
            e.amount / 100,
            e.amount % 100
        ));
    }
    format!(
        r#"{{"event_type":"{t}","event_time":"2025-06-0{}T{:02}:{:02}:{:02}Z","payload":{{{payload}}}}}"#,
        1 + e.minute / 1440,
        e.minute / 60 % 24,
        e.minute % 60,
        e.amount % 60
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, max_shrink_iters: 20, ..ProptestConfig::default() })]

    /// The core guarantee: for every shipped KPI, streaming random events in
    /// random micro-batches through the real merge gives exactly what the
    /// same SQL gives over all the events at once.
    #[test]
    fn streamed_equals_recomputed(
        events in proptest::collection::vec(ev(), 1..400),
        sizes in proptest::collection::vec(1usize..10_000, 1..6),
        shuffle_seed in any::<u64>(),
    ) {
        use rand::{SeedableRng, seq::SliceRandom};
        let mut events = events;
        events.shuffle(&mut rand::rngs::StdRng::seed_from_u64(shuffle_seed));
        // Small sizes matter most: map most sizes into 1..64.
        let sizes: Vec<usize> = sizes.iter().map(|s| if s % 4 == 0 { *s } else { s % 64 + 1 }).collect();
        let lines: Vec<String> = events.iter().map(line).collect();
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let mismatches = rt.block_on(async {
            let engine = Arc::new(shipped_engine().await);
            let batch = valid_events(&lines);
            assert_eq!(batch.num_rows(), lines.len(), "generated events are valid");
            let mut c = setup("prop", &engine).await;
            stream(&mut c, &engine, &batch, &sizes).await;
            kpi::verify(&mut c, &engine, None).await.unwrap()
        });
        prop_assert!(mismatches.is_empty(), "{:?}", mismatches);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prototype_views_are_exact_and_time_based() {
    let engine = shipped_engine().await;
    let switch = |tariff: &str, minute: u32| {
        format!(
            r#"{{"event_type":"tariff_switch","event_time":"2025-06-01T{:02}:{:02}:00Z","payload":{{"customer_id":"C1","session_id":1,"channel":"web_portal","tariff_type":"{tariff}","payment_amount":10}}}}"#,
            minute / 60,
            minute % 60
        )
    };
    let mut lines = vec![
        switch("basic", 10),
        switch("green", 70),
        switch("premium", 130),
    ];
    // Two readings 30 hours apart: a time-based 24 h window never sums them.
    for t in ["2025-06-01T00:00:00Z", "2025-06-02T06:00:00Z"] {
        lines.push(format!(
            r#"{{"event_type":"energy_consumed","event_time":"{t}","payload":{{"customer_id":"C2","session_id":5,"channel":"mobile_app","energy_consumed":1.234}}}}"#
        ));
    }
    let events = valid_events(&lines);
    let mut c = setup("views", &engine).await;
    stream(&mut c, &engine, &events, &[2]).await;
    let r = c
        .query_one(
            "SELECT current_tariff, previous_tariff, tariff_switches FROM customer_view WHERE customer_id = 'C1'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(r.get::<_, String>(0), "premium");
    assert_eq!(r.get::<_, String>(1), "green");
    assert_eq!(r.get::<_, i64>(2), 3);
    let max_24h: String = c
        .query_one(
            "SELECT max(energy_consumed_24h)::text FROM rolling_24h_metrics",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        max_24h, "1.234",
        "readings 30 h apart are never in one 24 h window"
    );
    let days: i64 = c
        .query_one(
            "SELECT count(*) FROM daily_event_summary d JOIN daily_energy_summary e USING (day) WHERE d.total_energy_consumed = e.total_energy_consumed",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(days, 2);

    // Regression: the views bucketed by the reading session's time zone,
    // not by UTC as they say: in New York the 00:00Z reading fell on
    // 31 May, and at +05:45 every hour moved.
    for zone in ["America/New_York", "Asia/Kathmandu"] {
        c.batch_execute(&format!("SET TIME ZONE '{zone}'"))
            .await
            .unwrap();
        let days = texts(
            &c,
            "SELECT day::text || ' ' || events FROM daily_energy_summary ORDER BY day",
            &[],
        )
        .await;
        assert_eq!(days, ["2025-06-01 4", "2025-06-02 1"], "{zone}");
        let hours = texts(
            &c,
            "SELECT to_char(hour AT TIME ZONE 'UTC', 'MM-DD HH24:MI') FROM rolling_24h_metrics ORDER BY hour",
            &[],
        )
        .await;
        assert_eq!(
            hours,
            ["06-01 00:00", "06-01 01:00", "06-01 02:00", "06-02 06:00"],
            "{zone}"
        );
    }
}

/// An engine of one shipped file, from a directory of its own.
async fn engine_of(file: &str) -> (KpiEngine, std::path::PathBuf) {
    let dir = scratch_dir().join(unique("kpi-one"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(queries_dir().join(file), dir.join(file)).unwrap();
    let engine = KpiEngine::load_dir(&KpiConfig {
        dir: dir.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    (engine, dir)
}

/// Two consumers flag the same (day, customer) with different funnel stages
/// at the same time: the second waits for the first's row, then counts only
/// the stage the first did not store.
#[tokio::test]
async fn concurrent_batches_flag_a_member_once_per_stage() {
    let (engine, dir) = engine_of("daily_engagement_funnel.sql").await;
    let engine = Arc::new(engine);
    let db = fresh_db("flags").await;
    let mut first = client(&db).await;
    sink::migrate::migrate(&mut first).await.unwrap();
    kpi::install(&mut first, &engine).await.unwrap();
    assert!(
        kpi::verify(&mut first, &engine, None)
            .await
            .unwrap()
            .is_empty(),
        "verify on an empty events table"
    );
    let lines: Vec<String> = [
        ("user_login", 10),
        ("view_tariffs", 20),
        ("tariff_switch", 30),
        ("user_login", 40),
    ]
    .iter()
    .map(|(t, m)| event(t, "C1", 1, *m))
    .collect();
    let all = valid_events(&lines);
    let (a, b) = (all.slice(0, 2), all.slice(2, 2));

    let prepared = prepare(&mut first, &engine, &a).await;
    let other = {
        let engine = engine.clone();
        let mut second = client(&db).await;
        tokio::spawn(async move {
            stream(&mut second, &engine, &b, &[2]).await;
        })
    };
    // Not a timing assertion: the result must be the same in either order;
    // the pause only makes the second writer wait on the first's row lock.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    prepared.commit().await.unwrap();
    other.await.unwrap();

    let mut check = client(&db).await;
    assert_eq!(
        kpi::verify(&mut check, &engine, None).await.unwrap(),
        vec![]
    );
    let row = check
        .query_one(
            "SELECT active_customers, logged_in_customers, viewed_customers, switched_customers, paid_customers \
             FROM daily_engagement_funnel",
            &[],
        )
        .await
        .unwrap();
    let stages: Vec<i64> = (0..5).map(|i| row.get(i)).collect();
    assert_eq!(stages, vec![1, 1, 1, 1, 0]);
    std::fs::remove_dir_all(dir).unwrap();
}

/// A KPI stored before membership sets (one `_m<i>` table per distinct
/// count, the hash of the SQL alone) is rebuilt at the next install: the old
/// tables go, the sets come from `events`, and streaming goes on exactly.
#[tokio::test]
async fn a_kpi_in_the_layout_before_member_sets_is_rebuilt() {
    let (engine, dir) = engine_of("daily_channel_funnel.sql").await;
    let def = engine.def(0).clone();
    let events = mixed_events(200, 13, 5);
    let mut c = setup("layout", &engine).await;
    stream(&mut c, &engine, &events.slice(0, 100), &[30]).await;
    // The old layout: per-measure tables under the old names, old hash.
    c.batch_execute(&format!(
        "ALTER TABLE kpi_members_{n}_s0 RENAME TO kpi_members_{n}_m0; \
         CREATE TABLE kpi_members_{n}_m1 (k0 timestamptz, v text); \
         UPDATE kpi_registry SET sql_hash = '{old}' WHERE name = '{n}'",
        n = def.name,
        old = kpi::plan::hash(&def.sql)
    ))
    .await
    .unwrap();
    let report = kpi::install(&mut c, &engine).await.unwrap();
    assert_eq!(report.backfilled, vec![def.name.clone()]);
    let left = tables_like(&c, &["kpi\\_members\\_%"]).await;
    assert_eq!(left, vec![format!("kpi_members_{}_s0", def.name)]);
    assert_eq!(kpi::verify(&mut c, &engine, None).await.unwrap(), vec![]);
    stream(&mut c, &engine, &events.slice(100, 100), &[17]).await;
    assert_eq!(kpi::verify(&mut c, &engine, None).await.unwrap(), vec![]);
    std::fs::remove_dir_all(dir).unwrap();
}

/// The memory of distinct members against everything that can make it
/// wrong: another consumer writing the same groups in between, a COMMIT whose
/// outcome this consumer never learnt, a rolled-back batch, a cap so small
/// that groups are dropped and read back, and a backfill that rebuilds the
/// logs under a running consumer. Every count stays exact.
#[tokio::test]
async fn distinct_members_stay_exact_across_writers_doubt_eviction_and_rebuilds() {
    let engine = shipped_engine().await;
    let events = mixed_events(1200, 9, 2);
    let db = fresh_db("members").await;
    let mut a = client(&db).await;
    sink::migrate::migrate(&mut a).await.unwrap();
    kpi::install(&mut a, &engine).await.unwrap();
    let mut b = client(&db).await;
    let (mem_a, mem_b) = (Memberships::new(1_000_000), Memberships::new(1_000_000));

    // Two consumers take turns on the same hours and days.
    for (i, start) in (0..600).step_by(50).enumerate() {
        let batch = events.slice(start, 50);
        let (c, mem) = if i % 2 == 0 {
            (&mut a, &mem_a)
        } else {
            (&mut b, &mem_b)
        };
        let mut prepared = prepare_with(c, &engine, mem, &batch).await;
        let pending = std::mem::take(&mut prepared.pending);
        match i {
            // Committed, but the consumer never learns it (the connection
            // broke during COMMIT): its memory stays a generation behind.
            4 => prepared.commit().await.unwrap(),
            // Rolled back (fenced, or a rebalance): nothing of it may count.
            5 => {
                prepared.rollback().await.unwrap();
                stream_with(c, &engine, mem, &batch, &[50]).await;
            }
            _ => {
                prepared.commit().await.unwrap();
                mem.commit(pending);
            }
        }
    }
    assert!(!mem_a.is_empty(), "the memory holds members");
    assert_eq!(kpi::verify(&mut a, &engine, None).await.unwrap(), vec![]);

    // The logs are rebuilt with other contents (here: from an emptied
    // `events`) under a new epoch, the generation going on as before. The
    // memory of A, which holds these very groups, must start over.
    let tables = tables_like(&a, &["kpi\\_state\\_%", "kpi\\_members\\_%"]).await;
    a.batch_execute(&format!(
        "DELETE FROM events; TRUNCATE {}; UPDATE kpi_registry SET member_epoch = member_epoch + 1",
        tables.join(", ")
    ))
    .await
    .unwrap();
    stream_with(&mut a, &engine, &mem_a, &events.slice(0, 300), &[50]).await;
    assert_eq!(kpi::verify(&mut a, &engine, None).await.unwrap(), vec![]);

    // A cap of a few members: groups are dropped and read back all the time.
    let tiny = Memberships::new(5);
    stream_with(&mut b, &engine, &tiny, &events.slice(600, 300), &[40]).await;
    assert!(
        tiny.len() <= 5 + 40 * 6,
        "evicted down to the cap after each batch"
    );
    assert_eq!(kpi::verify(&mut a, &engine, None).await.unwrap(), vec![]);

    // A backfill rebuilds every KPI's logs while consumer A keeps its memory.
    a.batch_execute("UPDATE kpi_registry SET sql_hash = 'rebuild'")
        .await
        .unwrap();
    kpi::install(&mut a, &engine).await.unwrap();
    stream_with(&mut a, &engine, &mem_a, &events.slice(900, 300), &[60]).await;
    assert_eq!(kpi::verify(&mut a, &engine, None).await.unwrap(), vec![]);
}

/// Staging tables are not truncated per batch (they are ON COMMIT DELETE
/// ROWS): what a rolled-back batch staged must not reach the next batch on
/// the same connection.
#[tokio::test]
async fn a_rolled_back_batch_leaves_nothing_staged_for_the_next() {
    let engine = shipped_engine().await;
    let events = mixed_events(120, 11, 3);
    let mut c = setup("rollback", &engine).await;
    prepare(&mut c, &engine, &events.slice(0, 60))
        .await
        .rollback()
        .await
        .unwrap();
    stream(&mut c, &engine, &events, &[60]).await;
    assert_eq!(kpi::verify(&mut c, &engine, None).await.unwrap(), vec![]);
}

/// More distinct counts over one expression than a set's 31 flag bits: the
/// rest go to another set, and every count stays exact.
#[tokio::test]
async fn more_than_31_distinct_counts_over_one_expression_take_two_sets() {
    let measures: Vec<String> = (0..33)
        .map(|j| {
            format!("count(DISTINCT customer_id) FILTER (WHERE session_id % 33 = {j}) AS c{j}")
        })
        .collect();
    let sql = format!(
        "SELECT date_trunc('hour', event_time) AS hour, {} FROM events GROUP BY 1",
        measures.join(", ")
    );
    let engine = KpiEngine::from_sources(vec![("many_sets.sql".into(), sql)], 256 << 20)
        .await
        .unwrap();
    let sizes: Vec<usize> = engine
        .def(0)
        .sets
        .iter()
        .map(|s| s.measures.len())
        .collect();
    assert_eq!(sizes, vec![31, 2]);
    let events = mixed_events(400, 9, 1);
    let mut c = setup("many_sets", &engine).await;
    stream(&mut c, &engine, &events, &[70, 13]).await;
    assert_eq!(kpi::verify(&mut c, &engine, None).await.unwrap(), vec![]);
}

/// `verify` finds every row that differs, on either side, and only those:
/// a float sum taken batch by batch differs from one taken at once in its
/// last digits, which is rounding, not a difference. Regression: a KPI
/// summing doubles failed `verify` whenever its events were split.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_finds_each_changed_row_and_tolerates_float_rounding() {
    let engine = KpiEngine::load_dir(&kpi_dir(&[(
        "float_sums.sql",
        "SELECT channel, tariff_type, count(*) AS n, count(DISTINCT customer_id) AS customers, \
         sum(CAST(energy_consumed AS DOUBLE)) AS kwh, avg(payment_amount * 1.1) AS gross \
         FROM events GROUP BY channel, tariff_type",
    )]))
    .await
    .unwrap();
    let channels = ["web_portal", "mobile_app", "call_center"];
    let lines: Vec<String> = (0..3000)
        .map(|i| {
            let (kind, extra) = match i % 3 {
                0 => ("energy_consumed", format!(r#","energy_consumed":{}.{:03}"#, i % 89, i * 37 % 1000)),
                1 => ("bill_payment", format!(r#","payment_amount":{}.{:02}"#, i % 71, i * 13 % 100)),
                _ => ("tariff_switch", format!(r#","tariff_type":"green","payment_amount":{}.{:02}"#, i % 53, i * 7 % 100)),
            };
            format!(
                r#"{{"event_type":"{kind}","event_time":"2025-06-01T10:00:00Z","payload":{{"customer_id":"C{}","session_id":{i},"channel":"{}"{extra}}}}}"#,
                i % 40,
                channels[i / 3 % 3],
            )
        })
        .collect();
    let events = valid_events(&lines);
    assert_eq!(events.num_rows(), 3000);
    let mut c = setup("verify_diff", &engine).await;
    stream(
        &mut c,
        &engine,
        &events,
        &[37, 1, 200, 64, 999, 3, 700, 996],
    )
    .await;
    assert_eq!(kpi::verify(&mut c, &engine, None).await.unwrap(), vec![]);

    // One row of each kind of difference, each on its own key.
    c.batch_execute(
        // State columns: keys k0 (channel), k1 (tariff_type); m0 = n,
        // m1 = customers, m2 = kwh, m3_sum and m3_n = gross.
        "UPDATE kpi_state_float_sums SET m0 = m0 + 1 WHERE k0 = 'web_portal' AND k1 IS NULL;
         DELETE FROM kpi_state_float_sums WHERE k0 = 'mobile_app' AND k1 IS NULL;
         INSERT INTO kpi_state_float_sums (k0, k1, m0, m1, m2, m3_sum, m3_n)
             SELECT 'fax', k1, m0, m1, m2, m3_sum, m3_n FROM kpi_state_float_sums
             WHERE k0 = 'web_portal' AND k1 = 'green';
         UPDATE kpi_state_float_sums SET m2 = m2 * (1 + 1e-6)
             WHERE k0 = 'call_center' AND k1 IS NULL;",
    )
    .await
    .unwrap();
    let found = kpi::verify(&mut c, &engine, None).await.unwrap();
    let sides = |side: &str| {
        let mut rows: Vec<String> = found
            .iter()
            .filter(|m| m.side == side)
            .map(|m| m.row.split(',').take(2).collect::<Vec<_>>().join(","))
            .collect();
        rows.sort();
        rows
    };
    assert_eq!(
        sides("recomputed"),
        ["(call_center,", "(mobile_app,", "(web_portal,"],
        "{found:#?}"
    );
    assert_eq!(
        sides("streamed"),
        ["(call_center,", "(fax,green", "(web_portal,"],
        "{found:#?}"
    );
}

/// Regression: a KPI dividing by an aggregate that is 0 for some key (here
/// the payments of an event type without any) was accepted, and then every
/// read of its view failed with "division by zero". That row reads NULL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_divisor_of_zero_in_one_row_leaves_the_view_readable() {
    let engine = KpiEngine::load_dir(&kpi_dir(&[(
        "per_payment.sql",
        "SELECT event_type, count(*) / count(payment_amount) AS events_per_payment, \
         sum(payment_amount) % count(energy_consumed) AS odd, \
         count(*) / 2 AS halves, ln(count(payment_amount)) AS ln_paid, \
         log(2, count(payment_amount)) AS log2_paid, log(count(payment_amount)) AS log10_paid, \
         sqrt(count(payment_amount) - 1) AS root FROM events GROUP BY event_type",
    )]))
    .await
    .unwrap();
    let lines: Vec<String> = (0..70)
        .map(|i| event(TYPES[i % 7], "C1", i as i64, i as u32))
        .collect();
    let mut c = setup("div_zero", &engine).await;
    stream(&mut c, &engine, &valid_events(&lines), &[30, 40]).await;
    let rows = c
        .query(
            "SELECT event_type, events_per_payment, odd::text, halves FROM per_payment ORDER BY event_type",
            &[],
        )
        .await
        .expect("the view reads");
    let got: Vec<(String, Option<i64>, Option<String>, i64)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert_eq!(got.len(), 7);
    for (t, per_payment, odd, halves) in &got {
        let paid = matches!(t.as_str(), "bill_payment" | "tariff_switch");
        assert_eq!(per_payment.is_some(), paid, "{got:?}");
        if paid {
            assert_eq!(*per_payment, Some(1));
        }
        // No event type has both a payment and a reading.
        assert_eq!(*odd, None, "{got:?}");
        assert_eq!(*halves, 5);
    }
    // Regression: `ln`, `log` and `sqrt` outside their domain (no payments:
    // ln(0), sqrt(-1)) made every read fail, as a zero divisor did; then
    // they read NULL, where DataFusion gives -inf and NaN. `log(b, x)`
    // still reads NULL there.
    let rows = c
        .query(
            "SELECT event_type, ln_paid::float8, log2_paid::float8, log10_paid::float8, \
             root::float8 FROM per_payment ORDER BY event_type",
            &[],
        )
        .await
        .expect("the view reads");
    for r in &rows {
        let t: String = r.get(0);
        let logs: Vec<Option<f64>> = (1..5).map(|i| r.get(i)).collect();
        if matches!(t.as_str(), "bill_payment" | "tariff_switch") {
            // Ten payments each.
            let want = [10f64.ln(), 10f64.log2(), 1.0, 3.0];
            for (got, want) in logs.iter().zip(want) {
                assert!((got.unwrap() - want).abs() < 1e-9, "{t}: {logs:?}");
            }
        } else {
            assert_eq!(
                logs[..3],
                [Some(f64::NEG_INFINITY), None, Some(f64::NEG_INFINITY)],
                "{t}"
            );
            assert!(logs[3].is_some_and(f64::is_nan), "{t}: {logs:?}");
        }
    }
    assert_eq!(kpi::verify(&mut c, &engine, None).await.unwrap(), vec![]);
}

/// Regression: a KPI named like another application's view replaced that
/// view without a word, and one named like its table failed with a
/// Postgres error ("is not a view").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kpi_never_takes_over_another_applications_view_or_table() {
    let sql = "SELECT channel, count(*) AS n FROM events GROUP BY channel";
    for (name, other) in [
        ("other_view", "CREATE VIEW other_view AS SELECT 1 AS theirs"),
        ("other_table", "CREATE TABLE other_table (theirs int)"),
    ] {
        let engine = KpiEngine::load_dir(&kpi_dir(&[(&format!("{name}.sql"), sql)]))
            .await
            .unwrap();
        let db = fresh_db("foreign").await;
        let mut c = client(&db).await;
        sink::migrate::migrate(&mut c).await.unwrap();
        c.batch_execute(other).await.unwrap();
        let err = kpi::install(&mut c, &engine).await.unwrap_err().to_string();
        assert!(
            err.contains(&format!("named {name} already exists")),
            "{err}"
        );
        assert!(err.contains("rename the KPI file"), "{err}");
        let theirs = texts(
            &c,
            "SELECT column_name::text FROM information_schema.columns WHERE table_name = $1",
            &[&name],
        )
        .await;
        assert_eq!(theirs, ["theirs"], "{name} is left as it was");
    }
    // A KPI's own view is replaced as before when its file changes.
    let engine = KpiEngine::load_dir(&kpi_dir(&[("mine.sql", sql)]))
        .await
        .unwrap();
    let mut c = setup("mine", &engine).await;
    let changed = KpiEngine::load_dir(&kpi_dir(&[(
        "mine.sql",
        "SELECT channel, count(*) AS events FROM events GROUP BY channel",
    )]))
    .await
    .unwrap();
    kpi::install(&mut c, &changed).await.unwrap();
}

/// Regression: the view computed some expressions over aggregates with
/// Postgres' meaning instead of DataFusion's. A sum of integers (stored as
/// numeric) divided as a decimal where DataFusion divides integers, and a
/// cast of a decimal to an integer rounded where DataFusion truncates. The
/// view must read what the same SQL gives when DataFusion runs it once over
/// all the events; `^` (XOR in DataFusion, a power in Postgres) is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_view_reads_what_datafusion_computes_once() {
    let sql = "SELECT event_type, sum(session_id) / count(*) AS per_event, \
               sum(session_id) / 7 AS sevenths, \
               CAST(avg(payment_amount) AS BIGINT) AS avg_pay, \
               CAST(avg(session_id) AS INT) AS avg_session, \
               CAST(sum(energy_consumed) * 10 AS BIGINT) AS tenths \
               FROM events GROUP BY event_type";
    let engine = KpiEngine::load_dir(&kpi_dir(&[("meaning.sql", sql)]))
        .await
        .unwrap();
    let lines: Vec<String> = (0..70)
        .map(|i| {
            event(
                TYPES[i % 7],
                &format!("C{}", i % 5),
                i as i64 * 3 + 1,
                i as u32,
            )
        })
        .collect();
    let events = valid_events(&lines);
    let mut c = setup("meaning", &engine).await;
    stream(&mut c, &engine, &events, &[9, 13]).await;

    let want: std::collections::BTreeMap<String, Vec<String>> = datafusion_rows(events, sql)
        .await
        .into_iter()
        .map(|cells| (cells[0].clone(), cells))
        .collect();
    let rows = c
        .query(
            "SELECT event_type, per_event::text, sevenths::text, avg_pay::text, \
             avg_session::text, tenths::text FROM meaning",
            &[],
        )
        .await
        .unwrap();
    let got: std::collections::BTreeMap<String, Vec<String>> = rows
        .iter()
        .map(|r| {
            let cells: Vec<String> = (0..6)
                .map(|i| r.get::<_, Option<String>>(i).unwrap_or_default())
                .collect();
            (cells[0].clone(), cells)
        })
        .collect();
    assert_eq!(got, want);
    // The case the old view rounded: 20.5 EUR is 20 as an integer.
    assert_eq!(got["bill_payment"][3], "20");

    let err = refusal("SELECT channel, count(*) ^ 3 AS x FROM events GROUP BY channel").await;
    assert!(err.contains("bad_kpi.sql") && err.contains("XOR"), "{err}");
    // Divisors that only look like zero are kept.
    for sql in [
        "SELECT channel, sum(session_id) / 2 AS x FROM events GROUP BY channel",
        "SELECT channel, count(*) / 0.5 AS x FROM events GROUP BY channel",
        "SELECT channel, count(*) / (1 - 0) AS x FROM events GROUP BY channel",
        "SELECT channel, count(*) / nullif(count(payment_amount), 0) AS x FROM events GROUP BY channel",
    ] {
        KpiEngine::load_dir(&kpi_dir(&[("fine.sql", sql)]))
            .await
            .unwrap_or_else(|e| panic!("{sql} is refused: {e}"));
    }

    // Regression: a constant 0 divisor passed `check`; then DataFusion
    // failed every batch on it and Postgres every read of the view.
    for sql in [
        "SELECT channel, count(*) / 0 AS x FROM events GROUP BY channel",
        "SELECT channel, sum(session_id % 0) AS x FROM events GROUP BY channel",
        "SELECT channel, avg(energy_consumed) / 0.0 AS x FROM events GROUP BY channel",
        "SELECT channel, sum(session_id / CAST(0 AS BIGINT)) AS x FROM events GROUP BY channel",
        "SELECT channel, count(*) / (1 - 1) AS x FROM events GROUP BY channel",
        "SELECT channel, sum(energy_consumed) % -0.0 AS x FROM events GROUP BY channel",
    ] {
        let err = refusal(sql).await;
        assert!(
            err.contains("bad_kpi.sql") && err.contains("division by the constant 0"),
            "{sql}: {err}"
        );
    }
}

/// Regression: time functions over aggregates (`date_trunc`, `extract`, a
/// cast to a date) ran in the view in the reading session's time zone, so a
/// Grafana session in +05:45 read another day and hour than DataFusion, which
/// computes in UTC. `to_char`'s patterns differ between the two (`%Y` against
/// `YYYY`), so it is refused over aggregates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_functions_in_the_view_are_utc_whatever_the_session_zone() {
    let sql = "SELECT event_type, date_trunc('day', max(event_time)) AS last_day, \
               extract(hour FROM max(event_time)) AS last_hour, \
               CAST(max(event_time) AS DATE) AS last_date, \
               date_trunc('hour', min(event_time)) AS first_hour, \
               CAST(max(event_time) AS TIMESTAMP) AS last_wall, \
               max(event_time) + INTERVAL '6 months' AS half_year_on, \
               date_trunc('day', to_timestamp(max(session_id) + 1748807999)) AS epoch_day, \
               to_timestamp(max(session_id) + 1748807999) AS epoch_wall \
               FROM events GROUP BY event_type";
    let engine = KpiEngine::load_dir(&kpi_dir(&[("last_seen.sql", sql)]))
        .await
        .unwrap();
    // 2025-06-01 20:00 to 21:09 UTC: 2025-06-02 01:45 to 02:54 in +05:45.
    let lines: Vec<String> = (0..70)
        .map(|i| event(TYPES[i % 7], &format!("C{}", i % 5), 1, 20 * 60 + i as u32))
        .collect();
    let mut c = setup("view_zone", &engine).await;
    stream(&mut c, &engine, &valid_events(&lines), &[9, 13]).await;

    // The latest type's row: each type has its own last event.
    let read = "SELECT extract(epoch FROM last_day)::bigint, last_hour::int, \
                last_date::text, extract(epoch FROM first_hour)::bigint, last_wall::text, \
                extract(epoch FROM half_year_on)::bigint, \
                epoch_day::text || ' ' || epoch_wall::text FROM last_seen \
                ORDER BY half_year_on DESC LIMIT 1";
    for zone in ["UTC", "Asia/Kathmandu", "America/Los_Angeles"] {
        c.batch_execute(&format!("SET TIME ZONE '{zone}'"))
            .await
            .unwrap();
        let rows = c.query(read, &[]).await.unwrap();
        let got: Vec<(i64, i32, String, i64, String, i64)> = rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)))
            .collect();
        // Regression: Postgres' to_timestamp(double) is a timestamptz, read
        // (and cut by date_trunc) on the session's wall clock; DataFusion's
        // is the UTC wall clock. 2025-06-01 20:00 UTC is June 2 in Kathmandu.
        let epoch: String = rows[0].get(6);
        assert_eq!(
            epoch, "2025-06-01 00:00:00 2025-06-01 20:00:00",
            "to_timestamp read in {zone}"
        );
        // Six months on crosses Los Angeles' change to winter time: in
        // UTC it is 2025-12-01 21:09, an hour before that zone's answer.
        assert_eq!(
            got,
            vec![(
                1_748_736_000,
                21,
                "2025-06-01".to_string(),
                1_748_808_000,
                "2025-06-01 21:09:00".to_string(),
                1_764_623_340
            )],
            "read in {zone}"
        );
    }

    let err = refusal(
        "SELECT channel, to_char(max(event_time), '%Y-%m-%d') AS last FROM events GROUP BY channel",
    )
    .await;
    assert!(
        err.contains("bad_kpi.sql") && err.contains("to_char"),
        "{err}"
    );
    for expr in [
        "CAST(max(event_time) AS VARCHAR)",
        "concat('last ', max(event_time))",
        "max(event_time) || ''",
    ] {
        let err = refusal(&format!(
            "SELECT channel, {expr} AS last FROM events GROUP BY channel"
        ))
        .await;
        assert!(
            err.contains("bad_kpi.sql") && err.contains("a time turned into text"),
            "{expr}: {err}"
        );
    }
}

/// Regression: text comparisons in the view followed the database's
/// collation, so under en-US (the official Postgres image's default)
/// `min(customer_id) < 'b'` read false for "Banana", and `greatest(...)`
/// picked another value, where DataFusion compares bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_in_the_view_compares_bytewise_under_any_collation() {
    let sql = "SELECT channel, channel < 'b' AS channel_before_b, \
               min(customer_id) AS first_customer, min(customer_id) < 'b' AS first_before_b, \
               greatest(max(customer_id), 'B') AS g, count(*) AS n \
               FROM events GROUP BY channel";
    let engine = KpiEngine::load_dir(&kpi_dir(&[("bytewise.sql", sql)]))
        .await
        .unwrap();
    let line = |customer: &str, channel: &str| {
        format!(
            r#"{{"event_type":"user_login","event_time":"2025-06-01T10:00:00Z","payload":{{"customer_id":"{customer}","session_id":1,"channel":"{channel}"}}}}"#
        )
    };
    let events = valid_events(&[
        line("Banana", "Web"),
        line("apple", "Web"),
        line("cherry", "app"),
    ]);

    let admin = client(&server_url().parse().unwrap()).await;
    let name = format!("bytewise_{}", std::process::id());
    admin
        .batch_execute(&format!(
            "CREATE DATABASE {name} TEMPLATE template0 ENCODING 'UTF8' LOCALE 'C' \
             LOCALE_PROVIDER icu ICU_LOCALE 'en-US'"
        ))
        .await
        .unwrap();
    let mut cfg: tokio_postgres::Config = server_url().parse().unwrap();
    cfg.dbname(&name);
    let mut c = client(&cfg).await;
    sink::migrate::migrate(&mut c).await.unwrap();
    kpi::install(&mut c, &engine).await.unwrap();
    stream(&mut c, &engine, &events, &[1, 2]).await;
    // The database does sort linguistically, so the test can fail.
    let linguistic: bool = c
        .query_one("SELECT 'apple' < 'Banana'", &[])
        .await
        .unwrap()
        .get(0);
    assert!(linguistic);

    let rows = c
        .query(
            "SELECT channel, channel_before_b, first_customer, first_before_b, g, n \
             FROM bytewise ORDER BY channel",
            &[],
        )
        .await
        .unwrap();
    let got: Vec<(String, bool, String, bool, String, i64)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)))
        .collect();
    let row = |ch: &str, cb, first: &str, fb, g: &str, n| {
        (ch.to_string(), cb, first.to_string(), fb, g.to_string(), n)
    };
    // What DataFusion computes: bytes, so "B" < "W" < "a" < "b" < "c".
    assert_eq!(
        got,
        vec![
            row("Web", true, "Banana", true, "apple", 2),
            row("app", true, "cherry", false, "cherry", 1),
        ]
    );
    drop(c);
    admin
        .batch_execute(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .await
        .unwrap();
}

/// Regression: two aliases alike in their first 63 bytes passed `check`
/// (with a note), and then failed to install with Postgres' "column
/// specified more than once".
#[tokio::test]
async fn aliases_alike_in_their_first_63_bytes_are_refused() {
    let long = "number_of_events_counted_for_this_channel_in_the_whole_period_of_";
    let err = refusal(&format!(
        "SELECT channel, count(*) AS {long}all, count(payment_amount) AS {long}paid \
         FROM events GROUP BY channel"
    ))
    .await;
    assert!(
        err.contains("bad_kpi.sql") && err.contains("first 63 bytes"),
        "{err}"
    );
    // Longer than 63 bytes but apart within them: kept.
    KpiEngine::load_dir(&kpi_dir(&[(
        "long.sql",
        &format!("SELECT channel, count(*) AS a_{long} FROM events GROUP BY channel"),
    )]))
    .await
    .unwrap();
}

/// Regression: the view wrote time constants as zone-less timestamps and
/// dropped `AT TIME ZONE`, so `max(event_time) >= TIMESTAMP '2025-06-01
/// 12:00:00'` and the local hour of `max(event_time) AT TIME ZONE
/// 'Asia/Kathmandu'` changed with the reading session's zone, and were wrong
/// even in UTC. The view must read what DataFusion computes, in any zone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_constants_and_zones_in_the_view_read_as_datafusion_computes() {
    let sql = "SELECT date_trunc('day', event_time) AS day, \
               date_trunc('day', event_time) >= TIMESTAMP '2025-06-02 00:00:00' AS second_day, \
               max(event_time) >= TIMESTAMP '2025-06-01 12:00:00' AS after_noon, \
               max(event_time) >= TIMESTAMPTZ '2025-06-01 12:30:00+00' AS after_half_past, \
               max(event_time) >= CAST('2025-06-01T17:00:00+05:00' AS TIMESTAMP) AS folded, \
               date_trunc('day', event_time) >= DATE '2025-06-02' AS by_date, \
               extract(epoch FROM max(event_time) - TIMESTAMP '2025-06-01 00:00:00') AS since_start, \
               date_trunc('day', max(event_time) AT TIME ZONE 'Asia/Kathmandu') AS local_day, \
               extract(hour FROM max(event_time) AT TIME ZONE 'Asia/Kathmandu') AS local_hour, \
               extract(hour FROM max(event_time) AT TIME ZONE '+05:45') AS offset_hour, \
               extract(hour FROM max(event_time) AT TIME ZONE '-03:00') AS west_hour, \
               CAST(max(event_time) AT TIME ZONE 'America/Los_Angeles' AS DATE) AS la_date, \
               count(*) AS n \
               FROM events GROUP BY 1";
    let engine = KpiEngine::load_dir(&kpi_dir(&[("zones.sql", sql)]))
        .await
        .unwrap();
    let at = |time: &str, customer: &str| {
        format!(
            r#"{{"event_type":"user_login","event_time":"{time}","payload":{{"customer_id":"{customer}","session_id":1,"channel":"web"}}}}"#
        )
    };
    let lines = vec![
        at("2025-06-01T10:00:00Z", "C1"),
        at("2025-06-01T13:00:00Z", "C2"),
        at("2025-06-02T03:10:00Z", "C3"),
        at("2025-06-02T23:30:00Z", "C4"),
    ];
    let events = valid_events(&lines);
    let mut c = setup("view_consts", &engine).await;
    stream(&mut c, &engine, &events, &[1, 2]).await;

    // What DataFusion computes over all events at once, as text.
    let df_read = format!(
        "SELECT CAST(CAST(to_unixtime(day) AS BIGINT) AS VARCHAR), CAST(second_day AS VARCHAR), \
         CAST(after_noon AS VARCHAR), CAST(after_half_past AS VARCHAR), CAST(folded AS VARCHAR), \
         CAST(by_date AS VARCHAR), CAST(CAST(since_start AS BIGINT) AS VARCHAR), \
         CAST(CAST(to_unixtime(local_day) AS BIGINT) AS VARCHAR), \
         CAST(CAST(local_hour AS BIGINT) AS VARCHAR), CAST(CAST(offset_hour AS BIGINT) AS VARCHAR), \
         CAST(CAST(west_hour AS BIGINT) AS VARCHAR), CAST(la_date AS VARCHAR) \
         FROM ({sql}) ORDER BY day"
    );
    let want = datafusion_rows(events, &df_read).await;
    // DataFusion's meaning, worked out by hand: 13:00 UTC is 18:45 in
    // Kathmandu and 10:00 at -03:00; 23:30 UTC is 05:15 the next day there.
    let expected = |r: [&str; 12]| r.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(
        want,
        vec![
            expected([
                "1748736000",
                "false",
                "true",
                "true",
                "true",
                "false",
                "46800",
                "1748715300",
                "18",
                "18",
                "10",
                "2025-06-01"
            ]),
            expected([
                "1748822400",
                "true",
                "true",
                "true",
                "true",
                "true",
                "171000",
                "1748888100",
                "5",
                "5",
                "20",
                "2025-06-02"
            ]),
        ]
    );

    let pg_read = "SELECT extract(epoch FROM day)::bigint::text, second_day::text, \
                   after_noon::text, after_half_past::text, folded::text, by_date::text, \
                   since_start::bigint::text, extract(epoch FROM local_day)::bigint::text, \
                   local_hour::bigint::text, offset_hour::bigint::text, west_hour::bigint::text, \
                   la_date::text FROM zones ORDER BY day";
    for zone in [
        "UTC",
        "Asia/Kathmandu",
        "America/New_York",
        "Pacific/Kiritimati",
    ] {
        c.batch_execute(&format!("SET TIME ZONE '{zone}'"))
            .await
            .unwrap();
        let got: Vec<Vec<String>> = c
            .query(pg_read, &[])
            .await
            .unwrap()
            .iter()
            .map(|r| (0..12).map(|i| r.get::<_, String>(i)).collect())
            .collect();
        assert_eq!(got, want, "read in {zone}");
    }
}

/// Regression: a KPI whose expression over aggregates uses a function that
/// DataFusion has and Postgres lacks passed `check`, backfilled, and then
/// failed at start with Postgres' bare "function signum(numeric) does not
/// exist" and a hint to run `migrate`, naming no KPI.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_view_postgres_cannot_compute_is_refused_by_kpi_name_before_the_backfill() {
    let engine = KpiEngine::load_dir(&kpi_dir(&[(
        "signs.sql",
        "SELECT event_type, signum(sum(payment_amount)) AS sign FROM events GROUP BY event_type",
    )]))
    .await
    .unwrap();
    let db = fresh_db("viewcheck").await;
    let mut c = client(&db).await;
    sink::migrate::migrate(&mut c).await.unwrap();
    let err = kpi::install(&mut c, &engine).await.unwrap_err().to_string();
    assert!(err.contains("KPI signs"), "{err}");
    assert!(err.contains("Postgres cannot compute its view"), "{err}");
    assert!(err.contains("signum"), "{err}");
    assert!(!err.contains("migrate"), "{err}");
    // Regression: the message carried a run of spaces from a broken line.
    assert!(!err.contains("  "), "{err}");
    let left: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_class WHERE relname LIKE '%signs%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "nothing of the KPI is left behind");
}

/// Regression: the view computed with Postgres' precision where DataFusion
/// has less: a decimal average or quotient kept 16 digits and more where
/// DataFusion cuts to its result's scale (10.006666 against
/// 10.0066666666666667), and `date_part('second', ...)` read 59.746421
/// where DataFusion gives 59; the epoch of a duration kept its fraction.
#[tokio::test]
async fn decimal_quotients_and_date_parts_in_the_view_have_datafusions_precision() {
    let sql = "SELECT channel, avg(payment_amount) AS avg_pay, \
               sum(payment_amount) / count(*) AS per_event, \
               CAST(avg(payment_amount) AS BIGINT) AS whole, \
               date_part('second', max(event_time)) AS sec, \
               date_part('millisecond', max(event_time)) AS ms, \
               date_part('hour', max(event_time)) AS hour, \
               extract(epoch FROM max(event_time)) AS epoch, \
               extract(epoch FROM max(event_time) - min(event_time)) AS span, \
               extract(epoch FROM max(event_time) AT TIME ZONE 'Asia/Kathmandu') AS local_epoch, \
               avg(session_id) AS avg_session \
               FROM events GROUP BY channel";
    let pay = |time: &str, channel: &str, amount: &str, session: u64| {
        format!(
            r#"{{"event_type":"bill_payment","event_time":"{time}","payload":{{"customer_id":"C1","session_id":{session},"channel":"{channel}","payment_amount":{amount}}}}}"#
        )
    };
    let lines = vec![
        pay("2025-06-01T10:00:00.250Z", "web", "10.00", 1),
        pay("2025-06-02T13:00:59.746421Z", "web", "10.00", 2),
        pay("2025-06-03T23:59:01.999999Z", "web", "10.02", 2),
        pay("2025-06-01T00:00:00Z", "app", "0.01", 7),
        pay("2025-06-01T00:00:02.5Z", "app", "0.01", 7),
        pay("2025-06-01T00:00:09.75Z", "app", "0.02", 8),
        // Under 2.147 s DataFusion keeps a duration's fraction.
        pay("2025-06-01T00:00:00Z", "tv", "1.00", 1),
        pay("2025-06-01T00:00:00.5Z", "tv", "1.00", 1),
    ];
    let columns =
        "channel, avg_pay, per_event, whole, sec, ms, hour, epoch, span, local_epoch, avg_session";
    let (c, _, want) = view_against_datafusion(
        "view_precision",
        "precise.sql",
        sql,
        &lines,
        &[2, 4],
        columns,
    )
    .await;
    // DataFusion's own figures, by hand: averages cut at 6 places.
    assert_eq!(want[2][1], "10.006666", "DataFusion's average: {want:?}");
    assert_eq!(want[0][1], "0.013333", "DataFusion's average: {want:?}");
    assert_eq!(want[1][8], "0.5", "DataFusion's short duration: {want:?}");

    let number = |s: &str| -> f64 { s.parse().unwrap_or_else(|_| panic!("a number: {s}")) };
    for zone in ["UTC", "Asia/Kathmandu"] {
        c.batch_execute(&format!("SET TIME ZONE '{zone}'"))
            .await
            .unwrap();
        let rows = c
            .query(
                "SELECT channel, avg_pay::text, per_event::text, whole::text, sec::text, \
                 ms::text, hour::text, epoch::text, span::text, local_epoch::text, \
                 avg_session::text, pg_typeof(avg_session)::text FROM precise ORDER BY channel",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(rows.len(), want.len());
        for (row, want) in rows.iter().zip(&want) {
            assert_eq!(row.get::<_, String>(0), want[0]);
            assert_eq!(
                row.get::<_, String>(want.len()),
                "double precision",
                "an average of integers is DataFusion's double"
            );
            for (col, w) in want.iter().enumerate().skip(1) {
                let got: String = row.get(col);
                // The last bits of a double may differ (DataFusion takes a
                // zoned time's epoch from nanoseconds); a digit may not.
                let (g, w_) = (number(&got), number(w));
                assert!(
                    (g - w_).abs() <= 1e-12 * w_.abs().max(1.0),
                    "{} of {} in {zone}: the view reads {got}, DataFusion computes {w}",
                    columns.split(", ").nth(col).unwrap(),
                    want[0]
                );
            }
        }
    }
}

/// Regression: DataFusion reads `100.0` as a double, so `count(*) * 100.0 /
/// ...` is a double there; the view wrote the constant as Postgres reads
/// it, a `numeric`, and computed exact decimals (0.3 where DataFusion
/// computes 0.30000000000000004).
#[tokio::test]
async fn float_constants_over_aggregates_compute_in_doubles_as_in_datafusion() {
    let sql = "SELECT channel, \
               count(*) * 100.0 / nullif(count(DISTINCT customer_id), 0) AS per_customer_pct, \
               sum(payment_amount) * 0.1 AS tenth, \
               2.5 + avg(session_id) AS shifted, \
               round(count(*) * 100.0 / 3, 1) AS rounded \
               FROM events GROUP BY channel";
    let pay = |customer: &str, channel: &str, amount: &str| {
        format!(
            r#"{{"event_type":"bill_payment","event_time":"2025-06-01T10:00:00Z","payload":{{"customer_id":"{customer}","session_id":7,"channel":"{channel}","payment_amount":{amount}}}}}"#
        )
    };
    let lines = vec![
        pay("C1", "web", "1.00"),
        pay("C2", "web", "1.00"),
        pay("C3", "web", "1.00"),
        pay("C1", "web", "1.00"),
        pay("C1", "app", "0.70"),
        pay("C2", "app", "0.50"),
        pay("C3", "app", "1.80"),
    ];
    let columns = "channel, per_customer_pct, tenth, shifted, rounded";
    let (c, _, want) = view_against_datafusion(
        "view_float_constants",
        "ratios.sql",
        sql,
        &lines,
        &[3],
        columns,
    )
    .await;
    // DataFusion's own figures: doubles, with a double's error.
    assert_eq!(want[0][2], "0.30000000000000004", "{want:?}");
    assert_eq!(want[1][1], "133.33333333333334", "{want:?}");

    let rows = c
        .query(
            "SELECT channel, per_customer_pct, tenth, shifted, pg_typeof(per_customer_pct)::text, \
             pg_typeof(tenth)::text, rounded::float8 FROM ratios ORDER BY channel",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), want.len());
    for (row, want) in rows.iter().zip(&want) {
        assert_eq!(row.get::<_, String>(0), want[0]);
        assert_eq!(row.get::<_, String>(4), "double precision");
        assert_eq!(row.get::<_, String>(5), "double precision");
        for col in 1..=3 {
            let got: f64 = row.get(col);
            let w: f64 = want[col].parse().unwrap();
            assert_eq!(
                got.to_bits(),
                w.to_bits(),
                "{} of {}: the view reads {got}, DataFusion computes {w}",
                columns.split(", ").nth(col).unwrap(),
                want[0]
            );
        }
        let rounded: f64 = row.get(6);
        assert_eq!(
            rounded,
            want[4].parse::<f64>().unwrap(),
            "rounded of {}",
            want[0]
        );
    }
}

/// Regression (of the doubles above): `count(*) * 1.0 % 7` became a `%` of
/// doubles, which Postgres lacks, and `round(x, 400)` wrote 10^400 as `inf`;
/// `round(x, -400)` divided every read by 0.
#[tokio::test]
async fn modulo_of_doubles_and_rounding_far_past_the_point_read() {
    let sql = "SELECT channel, count(*) * 1.0 % 7 AS m, avg(session_id) % 2.5 AS a, \
               round(avg(session_id), 400) AS far, round(avg(session_id), -400) AS near \
               FROM events GROUP BY channel";
    let event = |session: i64| {
        format!(
            r#"{{"event_type":"user_login","event_time":"2025-06-01T10:30:00Z","payload":{{"customer_id":"C1","session_id":{session},"channel":"web"}}}}"#
        )
    };
    let lines: Vec<String> = [3, 4, 5, 9, 11, 2, 8, 1, 7].map(event).to_vec();
    let (c, _, want) =
        view_against_datafusion("view_modulo", "odd.sql", sql, &lines, &[4], "m, a").await;
    let row = c
        .query_one("SELECT m, a, far, near FROM odd", &[])
        .await
        .expect("the view reads");
    for (col, w) in want[0].iter().enumerate() {
        let got: f64 = row.get(col);
        assert_eq!(got, w.parse::<f64>().unwrap(), "column {col}");
    }
    assert!(row.get::<_, Option<f64>>(2).is_some());
}

/// Regression: the KPI's types came from the plan before DataFusion's type
/// coercion, so `sum(CASE ... THEN session_id ELSE 0.5 END)`, a double,
/// was stored and read as an integer: each batch's sum lost its fraction.
#[tokio::test]
async fn a_sum_of_integers_and_doubles_keeps_its_fractions() {
    let sql = "SELECT channel, \
               sum(CASE WHEN event_type = 'bill_payment' THEN session_id ELSE 0.5 END) AS s, \
               count(DISTINCT CASE WHEN event_type = 'bill_payment' THEN session_id ELSE 0.5 END) AS d \
               FROM events GROUP BY channel";
    let event = |kind: &str, session: i64| {
        format!(
            r#"{{"event_type":"{kind}","event_time":"2025-06-01T10:30:00Z","payload":{{"customer_id":"C1","session_id":{session},"channel":"web","payment_amount":1.00}}}}"#
        )
    };
    let lines = vec![
        event("bill_payment", 3),
        event("user_login", 4),
        event("user_login", 5),
        event("bill_payment", 4),
        event("user_login", 6),
    ];
    let (mut c, engine, want) =
        view_against_datafusion("view_coerced", "mixed.sql", sql, &lines, &[1], "s, d").await;
    assert_eq!(want, vec![vec!["8.5".to_string(), "3".to_string()]]);
    let row = c
        .query_one("SELECT s, d FROM mixed", &[])
        .await
        .expect("the view reads");
    assert_eq!((row.get::<_, f64>(0), row.get::<_, i64>(1)), (8.5, 3));
    assert_eq!(kpi::verify(&mut c, &engine, None).await.unwrap(), vec![]);
}

/// Regression: a sum of integers past 2^63, which DataFusion wraps, failed
/// every read of the view ("bigint out of range"), not only its own row,
/// and `verify` reported it. An average of integers wrapped within a batch,
/// where DataFusion averages in doubles.
#[tokio::test]
async fn sums_and_averages_past_the_range_of_bigint_read_as_in_datafusion() {
    let sql = "SELECT channel, sum(session_id) AS sessions, avg(session_id) AS mean \
               FROM events GROUP BY channel";
    let event = |channel: &str, session: i64| {
        format!(
            r#"{{"event_type":"user_login","event_time":"2025-06-01T10:30:00Z","payload":{{"customer_id":"C1","session_id":{session},"channel":"{channel}"}}}}"#
        )
    };
    let lines = vec![
        event("big", 1 << 62),
        event("big", 1 << 62),
        event("big", 1 << 62),
        event("pair", 1 << 62),
        event("pair", 1 << 62),
        event("web", 5),
        event("web", 7),
    ];
    // One `big` a batch, so that no batch's own sum wraps but the stored
    // one is past the range; both `pair`s in one batch.
    let (mut c, engine, want) = view_against_datafusion(
        "view_wrap",
        "sums.sql",
        sql,
        &lines,
        &[1, 1, 1, 2, 2],
        "channel, sessions, mean",
    )
    .await;
    assert_eq!(
        want[0][1],
        (-(1_i64 << 62)).to_string(),
        "DataFusion wraps: {want:?}"
    );
    let rows = c
        .query(
            "SELECT channel, sessions, mean FROM sums ORDER BY channel",
            &[],
        )
        .await
        .expect("the view reads");
    let got: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.get(0),
                r.get::<_, i64>(1).to_string(),
                format!("{:?}", r.get::<_, f64>(2)),
            ]
        })
        .collect();
    let want: Vec<Vec<String>> = want
        .into_iter()
        .map(|w| {
            let mean: f64 = w[2].parse().unwrap();
            vec![w[0].clone(), w[1].clone(), format!("{mean:?}")]
        })
        .collect();
    assert_eq!(got, want);
    assert_eq!(kpi::verify(&mut c, &engine, None).await.unwrap(), vec![]);
}

/// Regression: a double divided by a count that is 0 for a key read NULL,
/// where DataFusion divides as IEEE does (infinity, or NaN for 0 / 0).
#[tokio::test]
async fn doubles_divided_by_zero_read_as_datafusion_divides_them() {
    let sql = "SELECT channel, \
               CAST(count(*) FILTER (WHERE event_type = 'tariff_switch') AS DOUBLE) \
                 / count(*) FILTER (WHERE event_type = 'view_tariffs') AS per_view, \
               -1.0 * count(*) / count(payment_amount) AS negative \
               FROM events GROUP BY channel";
    let event = |kind: &str, channel: &str| {
        format!(
            r#"{{"event_type":"{kind}","event_time":"2025-06-01T10:30:00Z","payload":{{"customer_id":"C1","session_id":1,"channel":"{channel}","tariff_type":"green"}}}}"#
        )
    };
    let lines = vec![
        // A switch without a view; then nothing to divide; then a half.
        event("tariff_switch", "app"),
        event("user_login", "call"),
        event("tariff_switch", "web"),
        event("view_tariffs", "web"),
        event("view_tariffs", "web"),
    ];
    let (c, _, want) = view_against_datafusion(
        "view_ieee",
        "per_view.sql",
        sql,
        &lines,
        &[2],
        "channel, per_view, negative",
    )
    .await;
    assert_eq!(want[0][1], "inf", "{want:?}");
    assert_eq!(want[1][1], "NaN", "{want:?}");
    assert_eq!(want[0][2], "-inf", "{want:?}");
    let rows = c
        .query(
            "SELECT channel, per_view::text, negative::text FROM per_view ORDER BY channel",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), want.len());
    for (row, want) in rows.iter().zip(&want) {
        for col in 1..=2 {
            let got: Option<String> = row.get(col);
            let got: f64 = got
                .unwrap_or_else(|| panic!("column {col} of {} reads NULL", want[0]))
                .parse()
                .unwrap();
            let w: f64 = want[col].parse().unwrap();
            assert!(
                got.to_bits() == w.to_bits() || (got.is_nan() && w.is_nan()),
                "column {col} of {}: the view reads {got}, DataFusion computes {w}",
                want[0]
            );
        }
    }
}

/// Regression: `round` and `trunc` of a double with places do not exist
/// in Postgres; `round` was computed on a `numeric` of 15 digits (1.005,
/// the double just under it, read 1.01 where DataFusion reads 1.0), and
/// `trunc` failed the install. `round(x)` rounded 2.5 to even. And the view's
/// numbers had Postgres' types: `coalesce(sum(x), 0)` read 0 where
/// DataFusion reads 0.00, `extract` a double where DataFusion gives an
/// integer.
#[tokio::test]
async fn rounding_of_doubles_and_the_types_of_the_view_are_datafusions() {
    let sql = "SELECT channel, \
               round(avg(session_id), 2) AS r2, \
               round(avg(session_id)) AS r0, \
               round(-avg(session_id)) AS neg, \
               trunc(avg(session_id), 1) AS t1, \
               coalesce(sum(payment_amount) FILTER (WHERE event_type = 'bill_payment'), 0) AS paid, \
               extract(hour FROM min(event_time)) AS first_hour, \
               round(avg(payment_amount), 2) AS avg_pay \
               FROM events GROUP BY channel";
    let event = |channel: &str, session: u64| {
        format!(
            r#"{{"event_type":"tariff_switch","event_time":"2025-06-01T10:30:00Z","payload":{{"customer_id":"C1","session_id":{session},"channel":"{channel}","tariff_type":"green","payment_amount":1.01}}}}"#
        )
    };
    // web: 199 sessions of 1 and one of 2 average 1.005; app: 2 and 3
    // average 2.5.
    let mut lines: Vec<String> = (0..199).map(|_| event("web", 1)).collect();
    lines.push(event("web", 2));
    lines.push(event("app", 2));
    lines.push(event("app", 3));
    let columns = [
        "channel",
        "r2",
        "r0",
        "neg",
        "t1",
        "paid",
        "first_hour",
        "avg_pay",
    ];
    let (c, _, want) = view_against_datafusion(
        "view_rounding",
        "rounded.sql",
        sql,
        &lines,
        &[50, 100],
        &columns.join(", "),
    )
    .await;
    // DataFusion's own figures, by hand.
    assert_eq!(want[1][1], "1.0", "round(1.005, 2) of a double: {want:?}");
    assert_eq!(want[0][2], "3.0", "round(2.5) is away from zero: {want:?}");
    assert_eq!(want[0][3], "-3.0", "round(-2.5) too: {want:?}");
    assert_eq!(
        want[0][5], "0.00",
        "coalesce keeps the sum's scale: {want:?}"
    );

    let types = [
        "text",
        "double precision",
        "double precision",
        "double precision",
        "double precision",
        "numeric",
        "integer",
        "numeric",
    ];
    let select: Vec<String> = columns
        .iter()
        .map(|c| format!("{c}::text, pg_typeof({c})::text"))
        .collect();
    let rows = c
        .query(
            &format!("SELECT {} FROM rounded ORDER BY channel", select.join(", ")),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), want.len());
    for (row, want) in rows.iter().zip(&want) {
        for (i, name) in columns.iter().enumerate() {
            let got: String = row.get(2 * i);
            let ty: String = row.get(2 * i + 1);
            assert_eq!(ty, types[i], "the type of {name}");
            if ty == "double precision" {
                let (g, w): (f64, f64) = (got.parse().unwrap(), want[i].parse().unwrap());
                assert_eq!(
                    g.to_bits(),
                    w.to_bits(),
                    "{name} of {}: the view reads {got}, DataFusion computes {}",
                    want[0],
                    want[i]
                );
            } else {
                assert_eq!(got, want[i], "{name} of {}", want[0]);
            }
        }
    }
}

/// Regression: the README says an edited comment changes nothing, but a
/// KPI's hash covered the file's bytes, so a comment, a line break or the
/// case of a keyword rebuilt the KPI from all of `events` (and restarted a
/// running consumer). What the query means still counts.
#[tokio::test]
async fn comments_and_layout_of_a_kpi_file_do_not_rebuild_it() {
    let load = async |sql: &str| {
        KpiEngine::load_dir(&kpi_dir(&[("by_channel.sql", sql)]))
            .await
            .unwrap()
    };
    let first =
        load("-- Events per channel.\nSELECT channel, count(*) AS n FROM events GROUP BY channel")
            .await;
    let mut c = setup("kpi_comment", &first).await;
    for same in [
        "-- Events per channel, by hour of arrival.\nSELECT channel, count(*) AS n FROM events GROUP BY channel",
        "select channel,\n       count(*) as n   -- all of them\n  from events\n group by channel\n",
        "/* a block comment */ SELECT channel, count(*) AS n FROM events GROUP BY channel;",
        "SELECT CHANNEL, COUNT(*) AS N FROM EVENTS GROUP BY Channel",
    ] {
        let engine = load(same).await;
        assert_eq!(engine.identity(), first.identity(), "{same}");
        let report = kpi::install(&mut c, &engine).await.unwrap();
        assert!(report.backfilled.is_empty(), "{same}: {report:?}");
    }
    for other in [
        "SELECT channel, count(*) AS events FROM events GROUP BY channel",
        "SELECT channel, count(*) AS n FROM events WHERE channel <> 'web' GROUP BY channel",
        "SELECT channel, count(*) AS n FROM events WHERE channel <> 'Web' GROUP BY channel",
        "SELECT channel, count(*) AS \"N\" FROM events GROUP BY channel",
    ] {
        let engine = load(other).await;
        assert_ne!(engine.identity(), first.identity(), "{other}");
    }
}

/// Regression: a KPI file was planned on the calling thread, and planning
/// recurses once per operator of a chain such as `x + 1 + 1 ...`: `run`
/// reloading a file of about 150 chained operators on a runtime worker
/// (2 MiB of stack) aborted the whole process, and `check` aborted at about
/// 800. Files are now planned on a thread of their own, and a file too long
/// for it is refused by its count of tokens, before anything recurses.
#[tokio::test]
async fn the_deepest_expression_a_kpi_may_hold_plans_and_runs_and_a_longer_one_is_refused() {
    let cap = kpi::plan::MAX_KPI_TOKENS;
    let (head, tail) = (
        "SELECT channel, sum(energy_consumed",
        ") AS n FROM events GROUP BY channel",
    );
    // 14 tokens around the chain, and each `+ 1` is two more.
    let terms = (cap - 14) / 2;
    let sql = format!("{head}{}{tail}", " + 1".repeat(terms));
    let engine = KpiEngine::from_sources(vec![("deep.sql".into(), sql)], 64 << 20)
        .await
        .expect("the deepest chain the cap allows plans");
    // Its plan runs on a thread with the stack the runtime's workers get.
    let events = mixed_events(400, 9, 1);
    let rows = std::thread::Builder::new()
        .stack_size(kpi::EXECUTION_STACK)
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            let deltas = rt.block_on(engine.compute(&events)).unwrap();
            deltas.iter().map(|d| d.partial.num_rows()).sum::<usize>()
        })
        .unwrap()
        .join()
        .expect("the deep plan runs within the workers' stack");
    assert!(rows > 0, "one row per channel");

    let over = format!("{head}{}{tail}", " + 1".repeat(terms + 1));
    let msg = refusal(&over).await;
    assert!(
        msg.contains("bad_kpi.sql")
            && msg.contains(&format!("a query of {} tokens", 14 + 2 * (terms + 1)))
            && msg.contains(&format!("at most {cap} tokens"))
            && msg.contains("split the KPI into several files"),
        "{msg}"
    );
}

/// Regression: a KPI file saved with a UTF-8 byte-order mark (Windows
/// editors) was refused for its first character, which nobody can see.
#[tokio::test]
async fn a_kpi_file_with_a_byte_order_mark_loads() {
    let cfg = kpi_dir(&[(
        "bom.sql",
        "\u{feff}-- counts per channel\nSELECT channel, count(*) AS n FROM events GROUP BY channel",
    )]);
    let engine = KpiEngine::load_dir(&cfg)
        .await
        .expect("the mark is not SQL");
    assert_eq!(engine.def(0).name, "bom");
    assert_eq!(
        engine.def(0).description.as_deref(),
        Some("counts per channel")
    );
    std::fs::remove_dir_all(&cfg.dir).unwrap();
}

/// Regression: Postgres' `concat` writes a boolean as `t` or `f`, so a view
/// column `concat('b=', count(*) > 5)` read `b=t` where DataFusion computes
/// `b=true` (and `verify`, which compares the stored parts, could not tell).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn booleans_made_text_by_concat_read_as_datafusion_writes_them() {
    let sql = "SELECT channel, concat('b=', count(*) > 2) AS x, \
               concat_ws('/', max(session_id) > 3, count(*)) AS y, \
               concat(min(session_id) > 100, '') AS z \
               FROM events GROUP BY channel";
    let lines: Vec<String> = (0..7)
        .map(|i| {
            event("user_login", "C1", i as i64, i as u32)
                .replace("web_portal", if i < 3 { "app" } else { "web" })
        })
        .collect();
    let (c, _, want) = view_against_datafusion(
        "bool_concat",
        "bool_concat.sql",
        sql,
        &lines,
        &[3, 4],
        "channel, x, y, z",
    )
    .await;
    let rows = c
        .query(
            "SELECT channel, x, y, z FROM bool_concat ORDER BY channel",
            &[],
        )
        .await
        .unwrap();
    let got: Vec<Vec<String>> = rows
        .iter()
        .map(|r| (0..4).map(|i| r.get::<_, String>(i)).collect())
        .collect();
    assert_eq!(got, want);
    assert!(got.iter().any(|r| r[1] == "b=true"), "{got:?}");
}

/// Regression: DataFusion's planner expands coalesce (and nvl, nvl2,
/// ifnull) into its arguments more than once, so nesting doubled its work
/// each level: 22 levels in a file of 351 bytes took gigabytes and aborted
/// `check`, and a running `run` that reloaded the file. Deep nesting is
/// refused before planning; the allowed depth plans.
#[tokio::test]
async fn deeply_nested_coalesce_is_refused_before_it_is_planned() {
    let nested = |depth: usize, f: &str| {
        let mut e = "energy_consumed".to_string();
        for _ in 0..depth {
            e = format!("{f}({e}, 0)");
        }
        format!("SELECT channel, sum({e}) AS x FROM events GROUP BY 1")
    };
    let max = kpi::plan::MAX_NULL_FUNCTION_DEPTH;
    for f in ["coalesce", "NVL", "ifnull"] {
        let msg = refusal(&nested(22, f)).await;
        assert!(
            msg.contains("nested 22 deep") && msg.contains("coalesce(a, b, c, 0)"),
            "{msg}"
        );
    }
    KpiEngine::from_sources(vec![("ok.sql".into(), nested(max, "coalesce"))], 64 << 20)
        .await
        .expect("the allowed depth plans");
    // Side by side is not nesting.
    let wide = format!(
        "SELECT channel, {} FROM events GROUP BY 1",
        (0..12)
            .map(|i| format!("sum(coalesce(energy_consumed, {i})) AS c{i}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    KpiEngine::from_sources(vec![("wide.sql".into(), wide)], 64 << 20)
        .await
        .expect("twelve coalesces side by side");
}
