//! Least privilege. The owner role migrates (schema, KPI tables, grants); the
//! app role runs the pipeline and may only read and write rows; the read-only
//! role (dashboards) may only read. Each promise is checked by trying what the
//! role must not do and expecting Postgres to refuse it.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::*;
use tokio_postgres::error::SqlState;

const BIN: &str = env!("CARGO_BIN_EXE_energy-stream");

fn energy_stream(url: &str, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("DATABASE_URL", url)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

fn run_args<'a>(brokers: &'a str, topic: &'a str, queries: &'a str) -> Vec<&'a str> {
    vec![
        "run",
        "--brokers",
        brokers,
        "--topic",
        topic,
        "--group-id",
        "roles",
        "--queries-dir",
        queries,
        "--metrics-addr",
        "off",
        "--stop-when-caught-up",
    ]
}

/// Runs `sql` and expects Postgres to refuse it for lack of privilege.
async fn refused(c: &tokio_postgres::Client, sql: &str) {
    let e = c
        .batch_execute(sql)
        .await
        .expect_err(&format!("{sql} must be refused"));
    assert_eq!(
        e.code(),
        Some(&SqlState::INSUFFICIENT_PRIVILEGE),
        "{sql}: {e:?}"
    );
}

fn copy_queries(to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/queries")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_migrates_app_only_writes_rows_reader_only_reads() {
    let (db, [(owner, owner_cfg), (app, app_cfg), (reader, read_cfg)]) =
        db_with_roles(["owner", "app", "reader"]).await;
    let admin_cfg: tokio_postgres::Config = server_url().parse().unwrap();
    let admin = client(&admin_cfg).await;
    let (owner_url, app_url) = (
        db_url_with_password(&owner_cfg),
        db_url_with_password(&app_cfg),
    );

    let broker = Broker::get();
    let topic = unique("roles");
    create_topic(&broker.brokers, &topic, 2);
    let lines: Vec<Option<Vec<u8>>> = (0..400)
        .map(|i| {
            let t = [
                "user_login",
                "view_tariffs",
                "bill_payment",
                "tariff_switch",
            ][i % 4];
            Some(event(t, &format!("c{}", i % 37), i as i64, (i % 60) as u32).into_bytes())
        })
        .collect();
    send_raw(&broker.brokers, &topic, &lines);
    let queries = scratch_dir().join(format!("queries-{db}"));
    copy_queries(&queries);
    let q = queries.to_str().unwrap();

    // Before the owner migrated, the app role cannot start, and says why.
    let o = energy_stream(&app_url, &run_args(&broker.brokers, &topic, q));
    assert!(!o.status.success());
    assert!(
        output_text(&o).contains("run `energy-stream migrate` as the owner role"),
        "{}",
        output_text(&o)
    );
    let o = energy_stream(&app_url, &["migrate", "--queries-dir", q]);
    assert!(!o.status.success(), "the app role cannot migrate");

    // Another application's table in the same schema, there before the
    // owner migrates: the grants must leave it alone.
    let mut admin_db = admin_cfg.clone();
    admin_db.dbname(&db);
    let other = client(&admin_db).await;
    other
        .batch_execute(&format!(
            "CREATE TABLE other_app (i int); ALTER TABLE other_app OWNER TO {owner}"
        ))
        .await
        .unwrap();
    // Regression: a role that does not exist was found only after every
    // migration and KPI backfill had run.
    let o = energy_stream(
        &owner_url,
        &[
            "migrate",
            "--queries-dir",
            q,
            "--grant-app",
            "no_such_role_x1",
        ],
    );
    assert!(!o.status.success());
    // The hint quotes the name, so that it can be pasted as it is.
    assert!(
        output_text(&o).contains("role \"no_such_role_x1\" does not exist")
            && output_text(&o).contains("CREATE ROLE \"no_such_role_x1\" LOGIN"),
        "{}",
        output_text(&o)
    );
    let migrated: bool = other
        .query_one("SELECT to_regclass('schema_migrations') IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!migrated, "nothing was migrated before the refusal");
    drop(other);

    let o = energy_stream(
        &owner_url,
        &[
            "migrate",
            "--queries-dir",
            q,
            "--grant-app",
            &app,
            "--grant-read",
            &reader,
        ],
    );
    assert!(o.status.success(), "{}", output_text(&o));
    assert!(
        !output_text(&o).contains("secret"),
        "no password in the output"
    );

    // The app role runs the whole pipeline: COPY, KPI merges, offsets.
    let o = energy_stream(&app_url, &run_args(&broker.brokers, &topic, q));
    assert!(o.status.success(), "{}", output_text(&o));
    let c = client(&app_cfg).await;
    let n: i64 = c
        .query_one("SELECT count(*) FROM events", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 400);
    let kpi: i64 = c
        .query_one(
            "SELECT sum(events)::bigint FROM hourly_channel_metrics",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(kpi, 400);

    // ...and nothing beyond rows.
    for sql in [
        "DROP TABLE events",
        "DROP TABLE consumer_offsets",
        "DROP VIEW hourly_channel_metrics",
        "TRUNCATE events",
        "ALTER TABLE events ADD COLUMN x int",
        "CREATE TABLE app_owned (i int)",
        "UPDATE schema_migrations SET checksum = 'x'",
        "DELETE FROM events",
        "INSERT INTO other_app VALUES (1)",
    ] {
        refused(&c, sql).await;
    }

    // The read-only role reads the KPI views and writes nothing.
    let r = client(&read_cfg).await;
    let seen: i64 = r
        .query_one("SELECT count(*) FROM hourly_channel_metrics", &[])
        .await
        .unwrap()
        .get(0);
    assert!(seen > 0);
    for sql in [
        "INSERT INTO consumer_offsets VALUES ('g', 't', 0, 0)",
        "UPDATE kpi_registry SET sql_hash = 'x'",
        "DELETE FROM rejected_events",
        "DROP VIEW hourly_channel_metrics",
        "SELECT * FROM other_app",
    ] {
        refused(&r, sql).await;
    }
    // `verify` only reads (its recomputation goes to temporary tables), so
    // the read-only role can check the KPIs.
    let o = energy_stream(
        &db_url_with_password(&read_cfg),
        &["verify", "--queries-dir", q],
    );
    assert!(o.status.success(), "{}", output_text(&o));
    assert!(
        output_text(&o).contains(") equals its recomputation over events"),
        "{}",
        output_text(&o)
    );
    // The prototype's views are readable too.
    r.query_one("SELECT count(*) FROM daily_energy_summary", &[])
        .await
        .unwrap();

    // A new KPI file needs the owner: the app role refuses to start and names
    // it; after the owner's migrate, the app role fills it.
    std::fs::write(
        queries.join("channel_events.sql"),
        "SELECT channel, count(*) AS events FROM events GROUP BY channel\n",
    )
    .unwrap();
    let o = energy_stream(&app_url, &run_args(&broker.brokers, &topic, q));
    assert!(!o.status.success());
    assert!(
        output_text(&o).contains("KPI channel_events is new")
            && output_text(&o).contains("migrate"),
        "{}",
        output_text(&o)
    );
    let o = energy_stream(&owner_url, &["migrate", "--queries-dir", q]);
    assert!(o.status.success(), "{}", output_text(&o));
    assert!(
        output_text(&o).contains("channel_events"),
        "{}",
        output_text(&o)
    );
    // Regression: the new KPI's view took the default privileges meant for
    // tables (INSERT and UPDATE for the app role); views are only read.
    for (role, privilege, held) in [
        (&app, "SELECT", true),
        (&app, "INSERT", false),
        (&app, "UPDATE", false),
        (&reader, "SELECT", true),
    ] {
        let has: bool = c
            .query_one(
                "SELECT has_table_privilege($1, 'channel_events', $2)",
                &[role, &privilege],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(has, held, "{role} {privilege} on the new KPI's view");
    }
    let more: Vec<Option<Vec<u8>>> = (0..50)
        .map(|i| Some(event("user_logout", "late", i, 5).into_bytes()))
        .collect();
    send_raw(&broker.brokers, &topic, &more);
    let o = energy_stream(&app_url, &run_args(&broker.brokers, &topic, q));
    assert!(o.status.success(), "{}", output_text(&o));
    let total: i64 = c
        .query_one("SELECT sum(events)::bigint FROM channel_events", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        total, 450,
        "backfilled by the owner, then merged by the app"
    );

    // Regression: the same role could be given both, and a role given
    // read-only after it was the app role kept its writes.
    let o = energy_stream(
        &owner_url,
        &[
            "migrate",
            "--queries-dir",
            q,
            "--grant-app",
            &app,
            "--grant-read",
            &app,
        ],
    );
    assert!(!o.status.success());
    assert!(
        output_text(&o).contains("the same role")
            && output_text(&o).contains("nothing was changed"),
        "{}",
        output_text(&o)
    );
    let o = energy_stream(
        &owner_url,
        &["migrate", "--queries-dir", q, "--grant-read", &app],
    );
    assert!(o.status.success(), "{}", output_text(&o));
    for (relation, privilege, held) in [
        ("events", "SELECT", true),
        ("events", "INSERT", false),
        ("consumer_offsets", "UPDATE", false),
        ("kpi_state_channel_events", "INSERT", false),
    ] {
        let has: bool = r
            .query_one(
                "SELECT has_table_privilege($1, $2, $3)",
                &[&app, &relation, &privilege],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            has, held,
            "{app} given read-only: {privilege} on {relation}"
        );
    }
    refused(&c, "INSERT INTO rejected_events (topic) VALUES ('x')").await;
    // The default privileges went too: a table the owner creates later is
    // only readable.
    std::fs::write(
        queries.join("later.sql"),
        "SELECT event_type, count(*) AS n FROM events GROUP BY event_type\n",
    )
    .unwrap();
    let o = energy_stream(&owner_url, &["migrate", "--queries-dir", q]);
    assert!(o.status.success(), "{}", output_text(&o));
    let has: bool = r
        .query_one(
            "SELECT has_table_privilege($1, 'kpi_state_later', 'INSERT')",
            &[&app],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!has, "no write on a table created after the demotion");

    drop((c, r));
    let _ = std::fs::remove_dir_all(&queries);
    tokio::time::sleep(Duration::from_millis(100)).await;
    admin
        .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .await
        .unwrap();
    admin
        .batch_execute(&format!(
            "DROP ROLE {owner}; DROP ROLE {app}; DROP ROLE {reader};"
        ))
        .await
        .unwrap();
}
