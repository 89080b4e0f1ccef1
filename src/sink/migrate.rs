//! Versioned schema migrations from `sql/`, embedded in the binary so that a
//! deployed binary never runs against SQL files of another version.
//!
//! Each migration runs once, in its own transaction, and is recorded with a
//! checksum in `schema_migrations`; an advisory lock keeps concurrent starters
//! (several consumers starting together) from racing.
//!
//! It also owns the roles' grants (`migrate --grant-app/--grant-read`): the
//! owner runs migrations, the app role only reads and writes rows, so `run`
//! checks with reads alone that nothing is pending and does no DDL then.

use tokio_postgres::Client;

use super::SinkError;

/// (version, name, sql). Every file in `sql/` named `NNN_*.sql` must be listed
/// here; a unit test checks that.
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "001_core.sql", include_str!("../../sql/001_core.sql")),
    (2, "002_kpi.sql", include_str!("../../sql/002_kpi.sql")),
    (3, "003_views.sql", include_str!("../../sql/003_views.sql")),
    (
        4,
        "004_member_log.sql",
        include_str!("../../sql/004_member_log.sql"),
    ),
    (
        5,
        "005_offset_fingerprint.sql",
        include_str!("../../sql/005_offset_fingerprint.sql"),
    ),
    (
        6,
        "006_prototype_views_utc.sql",
        include_str!("../../sql/006_prototype_views_utc.sql"),
    ),
];

/// The advisory lock migrations take: an arbitrary constant shared by every
/// energy-stream process, so that starters on one database take turns.
pub const LOCK_KEY: i64 = 0x656e_6572_6779;

/// What `migrate` did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct MigrateReport {
    pub applied: Vec<String>,
    pub already: usize,
}

fn checksum(sql: &str) -> String {
    // FNV-1a: stable across Rust versions, unlike `DefaultHasher`.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in sql.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

fn is_privilege(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE)
}

/// The error for a role that may not change the schema but needed to (any
/// other error is classified as usual).
fn needs_owner(e: &tokio_postgres::Error, what: &str) -> SinkError {
    if is_privilege(e) {
        return SinkError::Fatal(format!(
            "{what}, and this database role may not change the schema ({}): run `energy-stream migrate` as the owner role first (README: Roles)",
            e.as_db_error()
                .map_or_else(|| e.to_string(), |d| d.message().to_string())
        ));
    }
    super::classify(e)
}

/// True when every migration of this binary is applied, with the same
/// checksum. Reads only, so the app role passes once the owner migrated.
async fn up_to_date(client: &Client) -> Result<bool, SinkError> {
    let exists: bool = client
        .query_one("SELECT to_regclass('schema_migrations') IS NOT NULL", &[])
        .await?
        .get(0);
    if !exists {
        return Ok(false);
    }
    let applied: std::collections::HashMap<i32, String> = client
        .query("SELECT version, checksum FROM schema_migrations", &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    Ok(MIGRATIONS
        .iter()
        .all(|(v, _, sql)| applied.get(v) == Some(&checksum(sql))))
}

/// Applies the pending migrations. Fails if an applied migration's file changed.
/// Refuses a database `run` would refuse ([`super::check_encoding`]) before
/// changing it: the deploy step is where that is to be found, not the
/// consumers' start.
pub async fn migrate(client: &mut Client) -> Result<MigrateReport, SinkError> {
    super::check_encoding(client).await?;
    client
        .batch_execute("SET client_min_messages = warning")
        .await?;
    let mut report = MigrateReport::default();
    if up_to_date(client).await? {
        report.already = MIGRATIONS.len();
        return Ok(report);
    }
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY])
        .await?;
    // Under the lock: consumers starting together on a fresh database raced
    // here ("duplicate key value violates unique constraint
    // pg_type_typname_nsp_index") when this ran before it.
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
            version integer PRIMARY KEY,
            name text NOT NULL,
            checksum text NOT NULL,
            applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .await
    .map_err(|e| needs_owner(&e, "schema migrations are pending"))?;
    for (version, name, sql) in MIGRATIONS {
        let row = tx
            .query_opt(
                "SELECT checksum FROM schema_migrations WHERE version = $1",
                &[version],
            )
            .await?;
        let sum = checksum(sql);
        match row {
            Some(r) => {
                let stored: String = r.get(0);
                if stored != sum {
                    return Err(SinkError::Fatal(format!(
                        "migration {name} was changed after it was applied (checksum {stored} in the database, {sum} in this binary); add a new migration instead"
                    )));
                }
                report.already += 1;
            }
            None => {
                tx.batch_execute(sql).await.map_err(|e| {
                    if is_privilege(&e) {
                        needs_owner(&e, &format!("migration {name} is pending"))
                    } else {
                        SinkError::Fatal(format!(
                            "migration {name} failed: {}",
                            super::classify(&e)
                        ))
                    }
                })?;
                tx.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    &[version, name, &sum],
                )
                .await?;
                report.applied.push((*name).to_string());
            }
        }
    }
    tx.commit().await?;
    Ok(report)
}

/// The relations of the migrations in `sql/`; the KPI tables and views are
/// found by name (`kpi_state_*`, `kpi_members_*`, and `kpi_registry`).
pub const CORE_RELATIONS: &[&str] = &[
    "events",
    "rejected_events",
    "consumer_offsets",
    "kpi_registry",
    "schema_migrations",
    "customer_view",
    "rolling_24h_metrics",
    "daily_energy_summary",
    "daily_event_summary",
];

/// Refuses a role to grant to that does not exist (or has no name), before
/// anything is migrated or backfilled, rather than after.
pub async fn check_roles(client: &Client, roles: &[Option<&str>]) -> Result<(), SinkError> {
    if let [Some(app), Some(read)] = roles
        && app == read
    {
        return Err(SinkError::Fatal(format!(
            "the same role {app:?} for --grant-app and --grant-read: a read-only role that may \
             write is not read-only; give the dashboards a role of their own (README: Roles); \
             nothing was changed"
        )));
    }
    for role in roles.iter().flatten() {
        if role.trim().is_empty() {
            return Err(SinkError::Fatal(
                "an empty role name to grant to: give --grant-app / --grant-read (APP_ROLE / READ_ROLE) a role".into(),
            ));
        }
        let exists: bool = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)",
                &[role],
            )
            .await?
            .get(0);
        if !exists {
            return Err(SinkError::Fatal(format!(
                "role {role:?} does not exist: create it first (CREATE ROLE {} LOGIN; README: Roles); nothing was changed",
                crate::kpi::plan::quote(role)
            )));
        }
    }
    Ok(())
}

/// Grants for the two non-owner roles on energy-stream's own tables and
/// views, and (default privileges) on the tables the owner creates later: new
/// KPIs, and the fresh tables a backfill swaps in. Other relations in the
/// schema are left alone. `app` may read and write rows, which is all `run`
/// does once migrated: no TRUNCATE, no DELETE, no DDL, and only SELECT on the
/// migration history. `read` may only SELECT (dashboards). The roles must
/// exist; creating them, with their passwords, is the operator's job.
pub async fn grant(
    client: &Client,
    app: Option<&str>,
    read: Option<&str>,
) -> Result<(), SinkError> {
    if app.is_none() && read.is_none() {
        return Ok(());
    }
    let schema: String = client
        .query_one("SELECT current_schema()", &[])
        .await?
        .get(0);
    let core: Vec<String> = CORE_RELATIONS.iter().map(|r| r.to_string()).collect();
    // (quoted name, is a table)
    let relations: Vec<(String, bool)> = client
        .query(
            "SELECT quote_ident(c.relname), c.relkind IN ('r', 'p') \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p', 'v') \
               AND (c.relname::text = ANY($1::text[]) OR c.relname LIKE 'kpi\\_state\\_%' \
                    OR c.relname LIKE 'kpi\\_members\\_%' \
                    OR c.relname IN (SELECT name FROM kpi_registry)) \
             ORDER BY 1",
            &[&core],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let s = crate::kpi::plan::quote(&schema);
    // Each role gets exactly its privileges: what it held before goes first
    // (in the same transaction), so a role that was the app role and is
    // now given read-only keeps no write, and an app role given DELETE by
    // hand loses it.
    let mut sql = String::new();
    let reset = |sql: &mut String, r: &str| {
        for (rel, _) in &relations {
            sql.push_str(&format!("REVOKE ALL ON {rel} FROM {r};\n"));
        }
        sql.push_str(&format!(
            "ALTER DEFAULT PRIVILEGES IN SCHEMA {s} REVOKE ALL ON TABLES FROM {r};\n"
        ));
    };
    if let Some(app) = app {
        let r = crate::kpi::plan::quote(app);
        reset(&mut sql, &r);
        sql.push_str(&format!("GRANT USAGE ON SCHEMA {s} TO {r};\n"));
        for (rel, table) in &relations {
            let privileges = if *table && rel != "schema_migrations" {
                "SELECT, INSERT, UPDATE"
            } else {
                "SELECT"
            };
            sql.push_str(&format!("GRANT {privileges} ON {rel} TO {r};\n"));
        }
        sql.push_str(&format!(
            "ALTER DEFAULT PRIVILEGES IN SCHEMA {s} GRANT SELECT, INSERT, UPDATE ON TABLES TO {r};\n"
        ));
    }
    if let Some(read) = read {
        let r = crate::kpi::plan::quote(read);
        reset(&mut sql, &r);
        sql.push_str(&format!("GRANT USAGE ON SCHEMA {s} TO {r};\n"));
        for (rel, _) in &relations {
            sql.push_str(&format!("GRANT SELECT ON {rel} TO {r};\n"));
        }
        sql.push_str(&format!(
            "ALTER DEFAULT PRIVILEGES IN SCHEMA {s} GRANT SELECT ON TABLES TO {r};\n"
        ));
    }
    client
        .batch_execute(&sql)
        .await
        .map_err(|e| needs_owner(&e, "granting privileges failed"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_sql_file_is_a_listed_migration() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/sql");
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".sql"))
            .collect();
        files.sort();
        let listed: Vec<String> = MIGRATIONS.iter().map(|m| m.1.to_string()).collect();
        assert_eq!(files, listed);
        for (i, (v, name, _)) in MIGRATIONS.iter().enumerate() {
            assert_eq!(*v as usize, i + 1, "versions are dense and ordered");
            assert!(name.starts_with(&format!("{v:03}_")));
        }
    }
}
