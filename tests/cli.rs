//! The binary's edges: start-up and shutdown when the world is not ready.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Regression: SIGTERM while Postgres was still unreachable at start was
/// ignored (the connect loop never looked at the shutdown signal).
#[test]
fn sigterm_while_postgres_is_unreachable_exits_cleanly() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // Nothing listens on `port` once the listener above is dropped.
    let mut child = Command::new(env!("CARGO_BIN_EXE_energy-stream"))
        .args(["run", "--metrics-addr", "off", "--no-kpis"])
        .env(
            "DATABASE_URL",
            format!("postgres://energy@127.0.0.1:{port}/energy"),
        )
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        child.try_wait().unwrap().is_none(),
        "it retries, it does not give up"
    );
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "exit 0, got {status}");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "SIGTERM honoured within 10 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("cannot reach Postgres"), "{log}");
    assert!(
        log.contains("Connection refused"),
        "the cause is named: {log}"
    );
}

/// Secrets come from the environment or files and never show: not in
/// `--help`, not in logs (even at debug level), and a password typed on the
/// command line is refused before anything runs.
#[test]
fn passwords_never_appear_in_help_or_logs() {
    const DB_SECRET: &str = "Db-Secret-9f3a";
    const KAFKA_SECRET: &str = "Kafka-Secret-77c1";
    let bin = env!("CARGO_BIN_EXE_energy-stream");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("postgres://energy:{DB_SECRET}@127.0.0.1:{port}/energy");
    let pw_file = common::scratch_dir().join("kafka-password");
    std::fs::write(&pw_file, format!("{KAFKA_SECRET}\n")).unwrap();

    for cmd in [
        vec!["--help"],
        vec!["run", "--help"],
        vec!["produce", "--help"],
    ] {
        let out = Command::new(bin)
            .args(&cmd)
            .env("DATABASE_URL", &url)
            .env("KAFKA_OPT_SASL_PASSWORD", KAFKA_SECRET)
            .output()
            .unwrap();
        let text = common::output_text(&out);
        assert!(
            !text.contains(DB_SECRET) && !text.contains(KAFKA_SECRET),
            "{cmd:?}:\n{text}"
        );
    }

    let child = Command::new(bin)
        .args(["run", "--metrics-addr", "off", "--no-kpis"])
        .env("DATABASE_URL", &url)
        .env("KAFKA_OPT_SASL_PASSWORD_FILE", &pw_file)
        .env("RUST_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    let log = common::output_text(&out);
    assert!(
        log.contains("cannot reach Postgres"),
        "it did try to connect: {log}"
    );
    assert!(
        log.contains("energy@127.0.0.1"),
        "the database is named without its password: {log}"
    );
    assert!(
        !log.contains(DB_SECRET),
        "database password in the logs:\n{log}"
    );
    assert!(
        !log.contains(KAFKA_SECRET),
        "Kafka password in the logs:\n{log}"
    );

    // Regression: librdkafka's refusal of an option it does not know (a
    // typo of a secret's name) carried the value, and it was printed.
    for (var, value) in [
        ("KAFKA_OPT_SASL_PASSWROD", KAFKA_SECRET.to_string()),
        (
            "KAFKA_OPT_SASL_PASSWROD_FILE",
            pw_file.display().to_string(),
        ),
    ] {
        // `run` builds its consumer from the same options, through the
        // same redaction, once Postgres is up.
        let out = Command::new(bin)
            .args(["produce", "--input", "/dev/null"])
            .env(var, &value)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let text = common::output_text(&out);
        assert!(!out.status.success(), "{var}: {text}");
        assert!(text.contains("sasl.passwrod"), "{var}: {text}");
        assert!(!text.contains(KAFKA_SECRET), "{var}: {text}");
    }

    let out = Command::new(bin)
        .args(["run", "--database-url", &url])
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    assert!(!out.status.success(), "a password on argv is refused");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        !text.contains(DB_SECRET),
        "the refusal does not echo it: {text}"
    );
    let _ = std::fs::remove_file(pw_file);
}

/// The bench tests count the bench databases on one shared server, so they
/// take turns.
static BENCH_DBS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A bench test's turn on the shared server: the server's URL, a client
/// on it, and how many bench databases it held when the turn began.
struct BenchTurn {
    _turn: tokio::sync::MutexGuard<'static, ()>,
    server: String,
    admin: tokio_postgres::Client,
    before: i64,
}

async fn bench_turn() -> BenchTurn {
    let turn = BENCH_DBS.lock().await;
    let server = common::server_url();
    let admin = common::client(&server.parse().unwrap()).await;
    let before = bench_dbs(&admin).await;
    BenchTurn {
        _turn: turn,
        server,
        admin,
        before,
    }
}

/// `energy-stream bench <args>` against the Postgres server at `server`.
fn bench(server: &str, args: &[&str]) -> std::process::Output {
    bench_with_env(server, &[], args)
}

/// `bench` with extra environment variables.
fn bench_with_env(server: &str, env: &[(&str, &str)], args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_energy-stream"))
        .arg("bench")
        .args(args)
        .env("DATABASE_URL", server)
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// How many bench databases the server has.
async fn bench_dbs(admin: &tokio_postgres::Client) -> i64 {
    admin
        .query_one(
            "SELECT count(*) FROM pg_database WHERE datname LIKE 'energy\\_stream\\_bench\\_%'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// `bench` with `env` against a port no broker listens on: its stderr, once
/// it has failed and left no bench database on the server.
async fn failed_bench_stderr(env: &[(&str, &str)]) -> String {
    failed_bench_stderr_with(env, &[]).await
}

/// [`failed_bench_stderr`] with extra arguments.
async fn failed_bench_stderr_with(env: &[(&str, &str)], args: &[&str]) -> String {
    let turn = bench_turn().await;
    let broker = format!("127.0.0.1:{}", common::free_port());
    let mut all = vec!["--events", "100", "--brokers", &broker];
    all.extend_from_slice(args);
    let out = bench_with_env(&turn.server, env, &all);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{stderr}");
    assert_eq!(
        bench_dbs(&turn.admin).await,
        turn.before,
        "a bench database was left on the server"
    );
    stderr
}

/// Regression: a bench that failed (here: no broker) left its database
/// behind on the user's server.
#[tokio::test]
async fn a_failed_bench_leaves_no_database_behind() {
    let stderr = failed_bench_stderr(&[]).await;
    assert!(stderr.contains("unreachable"), "{stderr}");
}

/// Regression: a bench run from a directory without `queries/` generated and
/// loaded its events, then failed on the missing KPI directory.
#[tokio::test]
async fn a_bench_without_its_kpi_files_fails_before_any_work() {
    let missing = std::env::temp_dir().join(common::unique("no-queries"));
    let stderr = failed_bench_stderr_with(&[], &["--queries-dir", missing.to_str().unwrap()]).await;
    assert!(
        stderr.contains("--queries-dir") && stderr.contains(missing.to_str().unwrap()),
        "{stderr}"
    );
    assert!(
        !stderr.contains("unreachable"),
        "refused before it reached for the broker: {stderr}"
    );
}

/// Regression: the bench's own producer and topic set-up ignored the
/// `KAFKA_OPT_*` variables that `run` honours, so against a broker that
/// needs TLS or SASL the bench could not load its topic.
#[tokio::test]
async fn the_bench_takes_kafka_options_from_the_environment() {
    let stderr = failed_bench_stderr(&[("KAFKA_OPT_SECURITY_PROTOCOL", "bogus")]).await;
    assert!(
        stderr.contains("invalid Kafka configuration") && stderr.contains("security.protocol"),
        "the producer was built with the option: {stderr}"
    );
}

/// The harness end to end on a real broker: every figure the issue asks for
/// is reported, the bench database is dropped afterwards, and `--min-ratio`
/// fails the command (exit 1) when the pipeline is below it.
#[tokio::test]
async fn bench_reports_every_figure_and_gates_on_the_ratio() {
    let turn = bench_turn().await;
    let broker = common::Broker::get();
    // No pipeline reaches 10x a plain COPY: the gate must trip.
    let out = bench(
        &turn.server,
        &[
            "--events",
            "3000",
            "--partitions",
            "2",
            "--latency-secs",
            "7",
            "--min-ratio",
            "10",
            "--brokers",
            &broker.brokers,
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    for row in [
        "| date | ",
        "| command | `",
        "| build | energy-stream ",
        "| machine | ",
        "| Postgres | ",
        "| broker | ",
        "| events | 3000 |",
        "KPI files, start → last offset committed) |",
        "| `run` exits on its own (notices it is caught up, leaves the group) | after ",
        "| ceiling A: COPY into `events` clone (PK + BRIN) |",
        "| ceiling B: COPY into same columns, PK only |",
        "| ratio to A |",
        "| ratio to B |",
        "| peak RSS of `run` |",
        " MiB |",
        "batch_latency_ms_p50=",
        "batch_latency_ms_p99=",
        "| latency run: ",
        " sent in ",
        "FAIL: the pipeline ran at",
    ] {
        assert!(
            stdout.contains(row),
            "missing {row:?} in:\n{stdout}\n{stderr}"
        );
    }
    assert!(
        stdout.contains("written=3000 rejected=0"),
        "every generated event is valid and written: {stdout}"
    );
    let superuser: bool = turn
        .admin
        .query_one(
            "SELECT rolsuper FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    if superuser {
        assert!(
            !stderr.contains("may not CHECKPOINT"),
            "a superuser takes the checkpoints: {stderr}"
        );
    }
    // The clock stops when Postgres holds the last offsets, which `run`
    // reaches before it notices, leaves the group and exits.
    let secs_after = |row: &str, open: &str, close: &str| -> f64 {
        let line = stdout.lines().find(|l| l.starts_with(row)).unwrap();
        let from = line.rfind(open).unwrap() + open.len();
        let to = from + line[from..].find(close).unwrap();
        line[from..to].trim().parse().unwrap()
    };
    let caught_up = secs_after("| pipeline (", "(", " s)");
    let exited = secs_after("| `run` exits", "after ", " s");
    assert!(
        caught_up > 0.0 && caught_up < exited,
        "caught up after {caught_up} s, exited after {exited} s:\n{stdout}"
    );
    assert_eq!(
        bench_dbs(&turn.admin).await,
        turn.before,
        "the bench database was left on the server"
    );
}

/// Without DATABASE_URL the bench starts a throwaway server, tuned for tests
/// without fsync, and turns fsync back on so that commits cost what they
/// cost on a real server. (The first version of that failed every such
/// bench at once: ALTER SYSTEM refuses a transaction block.)
#[test]
fn a_bench_on_its_own_server_measures_with_fsync_on() {
    let broker = common::Broker::get();
    let out = Command::new(env!("CARGO_BIN_EXE_energy-stream"))
        .args(["bench", "--events", "1000", "--partitions", "1"])
        .args(["--min-ratio", "0", "--brokers", &broker.brokers])
        .env_remove("DATABASE_URL")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = common::output_text(&out);
    assert!(out.status.success(), "{text}");
    let postgres = text
        .lines()
        .find(|l| l.starts_with("| Postgres | "))
        .unwrap_or_else(|| panic!("no Postgres row: {text}"));
    assert!(postgres.contains("fsync on"), "{postgres}");
    assert!(postgres.contains("throwaway server"), "{postgres}");
    assert!(text.contains("written=1000 rejected=0"), "{text}");
}

/// Regression: `--min-ratio NaN` or a negative one passed every run,
/// switching the gate off without a word.
#[test]
fn a_min_ratio_that_cannot_gate_is_refused() {
    for bad in ["NaN", "-1", "-0.5", "inf", "11", "x"] {
        let out = Command::new(env!("CARGO_BIN_EXE_energy-stream"))
            .args(["bench", &format!("--min-ratio={bad}")])
            .env_remove("DATABASE_URL")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let text = common::output_text(&out);
        assert_eq!(out.status.code(), Some(2), "{bad}: {text}");
        assert!(text.contains("--min-ratio"), "{bad}: {text}");
    }
}

/// Regression: a Ctrl-C or SIGTERM killed the bench at once, leaving its
/// database, its generated file and its `run` child (still writing).
#[tokio::test]
async fn an_interrupted_bench_leaves_nothing_behind() {
    let turn = bench_turn().await;
    let broker = common::Broker::get();
    let mut child = common::Reaped::new(
        Command::new(env!("CARGO_BIN_EXE_energy-stream"))
            .args(["bench", "--events", "200000", "--partitions", "2"])
            .args(["--min-ratio", "0", "--brokers", &broker.brokers])
            .env("DATABASE_URL", &turn.server)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let pid = child.id();
    let lines = stderr_lines(&mut child);
    // Loaded: `migrate` and then `run` come next.
    line_where(&lines, Duration::from_secs(120), "the load", |l| {
        l.contains("bench: loaded")
    });
    let dir = std::env::temp_dir();
    let made_here = || {
        std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.starts_with("energy-stream-bench-") && name.contains(&format!("_{pid}_"))
            })
            .count()
    };
    assert_eq!(made_here(), 1, "the bench's files are there while it runs");
    // Into `run`, when the bench has a child to stop.
    // Whichever of its threads started them.
    let children = || {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .map(|t| std::fs::read_to_string(t.path().join("children")).unwrap_or_default())
            .collect::<Vec<_>>()
            .join(" ")
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !children().split_whitespace().any(|c| {
        std::fs::read(format!("/proc/{c}/cmdline"))
            .is_ok_and(|l| l.split(|b| *b == 0).nth(1) == Some(b"run"))
    }) {
        assert!(Instant::now() < deadline, "no `run` child came");
        std::thread::sleep(Duration::from_millis(20));
    }
    let run_pids: Vec<String> = children().split_whitespace().map(str::to_owned).collect();
    unsafe { libc::kill(pid as i32, libc::SIGINT) };
    line_where(&lines, Duration::from_secs(60), "the interruption", |l| {
        l.contains("bench: interrupted")
    });
    let status = child.into_inner().wait().unwrap();
    assert_eq!(status.code(), Some(130));
    assert_eq!(
        bench_dbs(&turn.admin).await,
        turn.before,
        "its database was dropped"
    );
    assert_eq!(made_here(), 0, "its files were removed");
    for p in run_pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{p}")).exists(),
            "its `run` child {p} is gone"
        );
    }
}

/// The bench takes a checkpoint before each timed phase, which needs
/// superuser or `pg_checkpoint`. A role with only CREATEDB still gets its
/// whole report, with a warning that says what it lacks.
#[tokio::test]
async fn a_role_that_may_not_checkpoint_still_gets_its_bench() {
    let _turn = BENCH_DBS.lock().await;
    let broker = common::Broker::get();
    let admin_cfg: tokio_postgres::Config = common::server_url().parse().unwrap();
    let admin = common::client(&admin_cfg).await;
    let role = common::unique("es_bench").replace('-', "_");
    admin
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN CREATEDB PASSWORD 'bench-secret'"
        ))
        .await
        .unwrap();
    let mut cfg = admin_cfg.clone();
    cfg.user(&role).password("bench-secret").dbname("postgres");
    let url = common::db_url_with_password(&cfg);
    let out = bench(
        &url,
        &[
            "--events",
            "1000",
            "--partitions",
            "2",
            "--min-ratio",
            "0",
            "--brokers",
            &broker.brokers,
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("may not CHECKPOINT (needs superuser or pg_checkpoint)"),
        "{stderr}"
    );
    assert!(stdout.contains("| ratio to B |"), "{stdout}");
    assert!(stdout.contains("written=1000 rejected=0"), "{stdout}");
    admin
        .batch_execute(&format!("DROP ROLE {role}"))
        .await
        .unwrap();
}

/// Regression: while `run` waited for its topic, nothing served the Kafka
/// client's events, so the log said only "does not exist yet (or the broker
/// is unreachable)", and why (here: connection refused) came out after
/// the shutdown, hundreds of lines at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn why_the_broker_cannot_be_reached_is_logged_while_run_waits() {
    let db = common::fresh_db("no_broker").await;
    let mut child = Command::new(env!("CARGO_BIN_EXE_energy-stream"))
        .args([
            "run",
            "--brokers",
            "127.0.0.1:1",
            "--metrics-addr",
            "off",
            "--no-kpis",
        ])
        .env("DATABASE_URL", common::db_url_with_password(&db))
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read the log as it comes: the cause must be there before the shutdown.
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut log = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let named = loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => {
                let found =
                    line.contains("kafka client error") && line.contains("Connection refused");
                log.push(line);
                if found {
                    break true;
                }
            }
            Err(_) => break false,
        }
    };
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(
        named,
        "the refused connection is logged while run waits:\n{}",
        log.join("\n")
    );
    assert!(status.success());
}

/// Regression: with --log-json the error a command ended on was the one
/// line that was not JSON.
#[test]
fn with_log_json_the_final_error_is_json_too() {
    let out = Command::new(env!("CARGO_BIN_EXE_energy-stream"))
        .args(["--log-json", "migrate"])
        .env_remove("DATABASE_URL")
        .env_remove("DATABASE_URL_FILE")
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.lines().last().unwrap_or_default();
    let record: serde_json::Value =
        serde_json::from_str(last).unwrap_or_else(|e| panic!("{e}: {stderr}"));
    assert_eq!(record["level"], "ERROR");
    assert!(
        record["fields"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("no database configured")),
        "{record}"
    );
}

/// Regression: `verify`, which only reads, applied the migrations to the
/// database it was pointed at before it found nothing to compare.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_leaves_a_database_without_the_schema_as_it_was() {
    let db = common::fresh_db("verify_ro").await;
    let url = common::db_url_with_password(&db);
    let c = common::client(&db).await;
    // Regression: `backfill` pointed at an empty database (a mistyped
    // DATABASE_URL) built the whole schema there and said it backfilled.
    let queries = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("queries");
    for cmd in ["verify", "backfill"] {
        let out = kpi_command(&url, &queries, &[cmd]);
        let text = common::output_text(&out);
        assert!(!out.status.success(), "{cmd}: {text}");
        assert!(
            text.contains("energy-stream migrate"),
            "{cmd} says what to run: {text}"
        );
        assert_eq!(schema_tables(&c).await, 0, "{cmd} created tables: {text}");
    }
}

/// Regression: `migrate` run where its default `queries` directory does not
/// exist applied the schema, then failed on the directory before the grants:
/// the app role could not run. It now changes nothing and says what to give.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_without_its_kpi_directory_changes_nothing() {
    let db = common::fresh_db("migrate_nodir").await;
    let url = common::db_url_with_password(&db);
    let elsewhere = common::scratch_dir().join("no_queries_here");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let text = failed_migrate(&url, &[], &elsewhere);
    assert!(
        text.contains("nothing was changed") && text.contains("--queries-dir"),
        "{text}"
    );
    let c = common::client(&db).await;
    assert_eq!(schema_tables(&c).await, 0, "migrate created tables: {text}");
}

/// Regression: a migration refused by the database (here a type named
/// `events` that the table's own row type collides with) ended `migrate`
/// with "postgres unavailable (query)", an outage that was not one. It now
/// says Postgres refused the statement, with the SQLSTATE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_the_database_refuses_is_not_called_an_outage() {
    let db = common::fresh_db("migrate_refused").await;
    let c = common::client(&db).await;
    c.batch_execute("CREATE TYPE events AS (x int)")
        .await
        .unwrap();
    let text = failed_migrate(
        &common::db_url_with_password(&db),
        &["--no-kpis"],
        &common::scratch_dir(),
    );
    assert!(!text.contains("unavailable"), "{text}");
    assert!(
        text.contains("postgres refused the statement") && text.contains("(SQLSTATE 42"),
        "{text}"
    );
}

/// `energy-stream migrate <args>` against `url`, run in `dir` without
/// QUERIES_DIR, which must fail: its output.
fn failed_migrate(url: &str, args: &[&str], dir: &std::path::Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_energy-stream"))
        .arg("migrate")
        .args(args)
        .current_dir(dir)
        .env("DATABASE_URL", url)
        .env_remove("QUERIES_DIR")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = common::output_text(&out);
    assert!(!out.status.success(), "{text}");
    text
}

/// How many tables the database's current schema holds.
async fn schema_tables(c: &tokio_postgres::Client) -> i64 {
    c.query_one(
        "SELECT count(*) FROM pg_tables WHERE schemaname = current_schema()",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// Regression: `check` said "0 KPI file(s) OK" for a directory without KPI
/// files, passed over `Revenue.SQL` without a word (it is never read), and
/// listed unaliased measures as view columns such as `count(*)` that every
/// reader must quote, without saying so.
#[test]
fn check_says_what_it_did_not_read_and_which_columns_need_a_name() {
    let dir = common::scratch_dir().join("check");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let check = || {
        Command::new(env!("CARGO_BIN_EXE_energy-stream"))
            .args(["check", "--queries-dir", dir.to_str().unwrap()])
            .env_remove("DATABASE_URL")
            .env_remove("DATABASE_URL_FILE")
            .output()
            .unwrap()
    };

    let out = check();
    let text = common::output_text(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("no KPI files (*.sql) in"), "{text}");
    assert!(!text.contains("OK"), "{text}");

    std::fs::write(
        dir.join("Revenue.SQL"),
        "SELECT channel, count(*) AS n FROM events GROUP BY channel",
    )
    .unwrap();
    std::fs::write(
        dir.join("by_channel.sql"),
        "SELECT channel, count(*), sum(energy_consumed) AS kwh, count(*) AS \"Events\", \
         sum(payment_amount) FILTER (WHERE event_type = 'bill_payment'), \
         min(session_id) AS \"user\" FROM events GROUP BY channel",
    )
    .unwrap();
    let out = check();
    let text = common::output_text(&out);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("Revenue.SQL"),
        "the ignored file is named: {text}"
    );
    assert!(text.contains("lowercase .sql"), "{text}");
    assert!(text.contains("1 KPI file(s) OK"), "{text}");
    assert!(
        text.contains("column \"count(*)\" must be quoted to be read"),
        "the unnamed column is pointed out: {text}"
    );
    assert!(!text.contains("\"kwh\""), "named columns are fine: {text}");
    // Regression: a quoted alias was said to have no alias, and a name that
    // Postgres cuts to 63 bytes was cut without a word.
    assert!(
        text.contains(
            "column \"Events\" must be quoted to be read (no alias, or not a lowercase name)"
        ),
        "{text}"
    );
    assert!(
        text.contains("longer than Postgres' 63-byte names"),
        "{text}"
    );
    // Regression: a column named after a reserved word passed without a
    // note, and `SELECT user FROM by_channel` read the current user.
    assert!(
        text.contains("column user is a reserved word in Postgres' SQL and must be quoted"),
        "{text}"
    );
    // Regression: an expression that fails on every row planned, so `check`
    // passed it, and `run` disabled the KPI at its first batch.
    std::fs::write(
        dir.join("clock.sql"),
        "SELECT channel, max(to_timestamp('now')) AS latest FROM events GROUP BY channel",
    )
    .unwrap();
    let out = check();
    let text = common::output_text(&out);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("clock.sql: fails on 500 sample events")
            && text.contains("Error parsing timestamp from 'now'"),
        "{text}"
    );
    assert!(!text.contains("by_channel.sql: fails"), "{text}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Regression: a KPI using a function Postgres lacks (`signum`) passed
/// `check`, whose planning is DataFusion's, and failed at the start. Given a
/// database, `check` plans each view there, in a transaction it rolls back,
/// with the TEMP privilege alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_with_a_database_plans_the_views_in_postgres() {
    let db = common::fresh_db("check_views").await;
    let dir = common::scratch_dir().join("check_views");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("fine.sql"),
        "SELECT channel, count(DISTINCT customer_id) AS customers FROM events GROUP BY channel",
    )
    .unwrap();
    std::fs::write(
        dir.join("sign.sql"),
        "SELECT channel, signum(max(session_id)) AS s FROM events GROUP BY channel",
    )
    .unwrap();
    let check = |url: Option<String>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_energy-stream"));
        cmd.args(["check", "--queries-dir", dir.to_str().unwrap()])
            .env_remove("DATABASE_URL_FILE");
        match url {
            Some(u) => cmd.env("DATABASE_URL", u),
            None => cmd.env_remove("DATABASE_URL"),
        };
        let out = cmd.output().unwrap();
        (out.status.success(), common::output_text(&out))
    };
    let (ok, text) = check(None);
    assert!(
        ok,
        "without a database, DataFusion's planning passes it: {text}"
    );
    assert!(text.contains("no database given"), "{text}");

    let (ok, text) = check(Some(common::db_url_with_password(&db)));
    assert!(!ok, "{text}");
    assert!(
        text.contains("sign.sql: KPI sign: Postgres cannot compute its view: function signum"),
        "{text}"
    );
    assert!(!text.contains("fine.sql:"), "{text}");
    let c = common::client(&db).await;
    let left: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_class WHERE relname LIKE 'kpi_%' AND relpersistence <> 't'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "nothing is left in the database");

    std::fs::remove_file(dir.join("sign.sql")).unwrap();
    let (ok, text) = check(Some(common::db_url_with_password(&db)));
    assert!(ok && text.contains("views planned in"), "{text}");
    let (ok, text) = check(Some("postgres://nobody@127.0.0.1:1/none".into()));
    assert!(
        !ok && text.contains("unset DATABASE_URL to check without a database"),
        "{text}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Regression: `generate -o FILE` with a bad option created (emptied) the
/// file before refusing the option, so a typo destroyed the data there.
#[test]
fn generate_refuses_bad_options_before_touching_the_output() {
    let path = common::scratch_dir().join("gen-keep.jsonl");
    std::fs::write(&path, "precious\n").unwrap();
    for bad in [["--customers", "0"], ["--days", "0"], ["--bad-ratio", "2"]] {
        let out = Command::new(env!("CARGO_BIN_EXE_energy-stream"))
            .args(["generate", "-o", path.to_str().unwrap()])
            .args(bad)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{bad:?}");
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "precious\n",
            "{bad:?} left the file as it was"
        );
    }
    std::fs::remove_file(&path).unwrap();
}

/// `produce --input -` (plus `extra`) into a fresh mock topic, with `input`
/// written to its standard input and closed. Returns the child, the cluster
/// it sends to (which must outlive it) and its bad-lines path.
fn produce_from_stdin(
    topic: &str,
    extra: &[&str],
    input: &str,
) -> (
    std::process::Child,
    rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    std::path::PathBuf,
) {
    use std::io::Write;
    let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
    cluster.create_topic(topic, 1, 1).unwrap();
    let bad = common::scratch_dir().join(format!("{topic}-bad.jsonl"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_energy-stream"))
        .args(["produce", "--input", "-", "--topic", topic])
        .args(extra)
        .args(["--brokers", &cluster.bootstrap_servers()])
        .args([
            "--metrics-addr",
            "off",
            "--bad-lines",
            bad.to_str().unwrap(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input.as_bytes()).unwrap();
    drop(stdin);
    (child, cluster, bad)
}

/// One valid event line, for the standard-input tests.
const STDIN_EVENT: &str = r#"{"event_type":"user_login","event_time":"2025-06-01T00:00:00Z","payload":{"customer_id":"A","session_id":1,"channel":"web"}}"#;

/// Regression: `produce --input -` looked for a file named `-`.
#[test]
fn produce_reads_standard_input_given_as_a_dash() {
    let (child, _cluster, bad) = produce_from_stdin(
        "from_stdin",
        &[],
        &format!("{STDIN_EVENT}\n{STDIN_EVENT}\nnot json\n"),
    );
    let out = child.wait_with_output().unwrap();
    let text = common::output_text(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("sent 2"), "{text}");
    assert!(text.contains("bad lines 1"), "{text}");
    let _ = std::fs::remove_file(&bad);
}

/// Regression: `generate | head` ended with "cannot write events: Broken
/// pipe" and exit 1, where Unix tools stop quietly.
#[test]
fn generate_into_a_closed_pipe_stops_quietly() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_energy-stream"))
        .args(["generate", "--events", "1000000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 100];
    std::io::Read::read_exact(child.stdout.as_mut().unwrap(), &mut first).unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let text = common::output_text(&out);
    assert!(out.status.success(), "{text}");
    assert!(!text.contains("Broken pipe"), "{text}");
}

/// Regression: `produce --loop` over a pipe sent it once, then re-read the
/// drained pipe as fast as it could, forever, deaf to SIGTERM.
#[test]
fn produce_loops_over_standard_input_once() {
    let (mut child, _cluster, bad) = produce_from_stdin(
        "looped_stdin",
        &["--loop"],
        &format!("{STDIN_EVENT}\n{STDIN_EVENT}\n"),
    );
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("produce --loop over a drained pipe did not stop");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let text = common::output_text(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("sent 2"), "{text}");
    assert!(text.contains("sent nothing"), "{text}");
    let _ = std::fs::remove_file(&bad);
}

/// Regression: `produce`'s `/readyz` answered 200 whatever the broker did.
/// It now follows the broker: ready once the topic is found, not ready while
/// no broker can be reached, ready again when one is back.
#[test]
fn produce_is_ready_only_while_the_broker_answers() {
    use std::io::Write;
    let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
    cluster.create_topic("ready_producer", 1, 1).unwrap();
    let addr = format!("127.0.0.1:{}", common::free_port());
    let bad = common::scratch_dir().join("ready-bad.jsonl");
    let mut child = common::Reaped::new(
        Command::new(env!("CARGO_BIN_EXE_energy-stream"))
            .args(["produce", "--input", "-", "--topic", "ready_producer"])
            .args(["--brokers", &cluster.bootstrap_servers()])
            .args(["--live", "--rate", "2", "--metrics-addr", &addr])
            .args(["--bad-lines", bad.to_str().unwrap()])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(format!("{STDIN_EVENT}\n").as_bytes())
        .unwrap();
    drop(stdin);
    let ready = || {
        std::net::TcpStream::connect(&addr).is_ok()
            && common::http_get(&addr, "/readyz").starts_with("HTTP/1.0 200")
    };
    let wait_for = |child: &mut common::Reaped, want: bool, what: &str| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while ready() != want {
            assert!(
                child.try_wait().unwrap().is_none(),
                "produce exited while waiting: {what}"
            );
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    wait_for(&mut child, true, "ready once the topic is found");
    cluster.broker_down(1).unwrap();
    wait_for(&mut child, false, "not ready while the broker is away");
    assert!(common::http_get(&addr, "/healthz").starts_with("HTTP/1.0 200"));
    cluster.broker_up(1).unwrap();
    wait_for(&mut child, true, "ready again once the broker is back");
    drop(child);
    let _ = std::fs::remove_file(&bad);
}

/// The lines a child writes to its standard error, as they come.
fn stderr_lines(child: &mut common::Reaped) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let (lines_tx, lines) = std::sync::mpsc::channel::<String>();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = lines_tx.send(line);
        }
    });
    lines
}

/// `energy-stream run` with `args`, writing the database `db`, and its log
/// lines as they come.
fn run_logged(
    args: &[&str],
    db: &tokio_postgres::Config,
) -> (common::Reaped, std::sync::mpsc::Receiver<String>) {
    let mut child = common::Reaped::new(
        Command::new(env!("CARGO_BIN_EXE_energy-stream"))
            .args(["run", "--metrics-addr", "off"])
            .args(args)
            .env("DATABASE_URL", common::db_url_with_password(db))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let lines = stderr_lines(&mut child);
    (child, lines)
}

/// Stops a `run` with SIGTERM, as an orchestrator does, and requires a
/// clean exit.
fn stop_run(child: common::Reaped) {
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    common::wait_exit_success(child.into_inner(), Duration::from_secs(20), "run");
}

/// A MockCluster holding `topic`, and its bootstrap servers.
fn mock_topic(
    topic: &str,
    partitions: i32,
) -> (
    rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    String,
) {
    let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
    cluster.create_topic(topic, partitions, 1).unwrap();
    let brokers = cluster.bootstrap_servers();
    (cluster, brokers)
}

/// The first line for which `done` is true, waiting at most `limit`; panics
/// with every line read when none comes.
fn line_where(
    lines: &std::sync::mpsc::Receiver<String>,
    limit: Duration,
    what: &str,
    mut done: impl FnMut(&str) -> bool,
) -> String {
    let deadline = Instant::now() + limit;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if done(&line) => return line,
            Ok(line) => seen.push(line),
            Err(_) => panic!("{what}: none within {limit:?}:\n{}", seen.join("\n")),
        }
    }
}

/// Regression: start-up work has no time limit (a KPI backfill may take
/// long), and `run` waited on a migration lock held elsewhere, or on a
/// server that stopped answering after the connect, without a word. It now
/// says every 30 s what it waits on, and a shutdown still ends it at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_up_that_waits_on_postgres_says_what_it_waits_on() {
    let db = common::fresh_db("startwait").await;
    let holder = common::client(&db).await;
    // As another starter's migrations would hold it.
    holder
        .batch_execute(&format!(
            "BEGIN; SELECT pg_advisory_xact_lock({})",
            energy_stream::sink::migrate::LOCK_KEY
        ))
        .await
        .unwrap();
    let (child, lines) = run_logged(&["--no-kpis", "--brokers", "127.0.0.1:1"], &db);
    let notice = line_where(
        &lines,
        Duration::from_secs(90),
        "a notice of the wait",
        |l| l.contains("start-up still waiting on Postgres"),
    );
    assert!(notice.contains("applying migrations"), "{notice}");
    assert!(notice.contains("waited_secs=3"), "{notice}");
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    common::wait_exit_success(child.into_inner(), Duration::from_secs(10), "run");
    holder.batch_execute("ROLLBACK").await.unwrap();
}

/// Regression: progress lines came only after a commit, so an idle pipeline
/// (or one retrying through an outage) logged none, whatever
/// `--progress-interval-secs` said.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_run_still_logs_progress_on_its_interval() {
    let (_cluster, brokers) = mock_topic("idle_progress", 1);
    let db = common::fresh_db("idleprogress").await;
    let (child, lines) = run_logged(
        &[
            "--no-kpis",
            "--brokers",
            &brokers,
            "--topic",
            "idle_progress",
            "--progress-interval-secs",
            "1",
        ],
        &db,
    );
    let mut progress = 0;
    line_where(
        &lines,
        Duration::from_secs(60),
        "3 progress lines from an idle run",
        |l| {
            if l.contains("progress") && l.contains("written=0") {
                progress += 1;
            }
            progress == 3
        },
    );
    stop_run(child);
}

/// Regression: a change of KPI files starts the stages again, and the
/// progress lines then counted from the change, while "pipeline stopped;
/// everything consumed is committed" was logged at the change, mid-run, and
/// at the end with only what came after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_lines_count_from_the_start_across_a_kpi_reload() {
    let (_cluster, brokers) = mock_topic("reload_counts", 1);
    common::send_raw(
        &brokers,
        "reload_counts",
        &common::sample_messages(0..50, 5),
    );
    let kpis = common::kpi_dir(&[(
        "per_channel.sql",
        "SELECT channel, count(*) AS events FROM events GROUP BY channel",
    )]);
    let db = common::fresh_db("reloadcounts").await;
    let (child, lines) = run_logged(
        &[
            "--kpi-watch-secs",
            "1",
            "--brokers",
            &brokers,
            "--topic",
            "reload_counts",
            "--progress-interval-secs",
            "1",
            "--batch-max-wait-ms",
            "100",
            "--queries-dir",
            kpis.dir.to_str().unwrap(),
        ],
        &db,
    );
    let mut stopped = Vec::new();
    let mut note_stop = |l: &str| {
        if l.contains("pipeline stopped") {
            stopped.push(l.to_owned());
        }
    };
    line_where(
        &lines,
        Duration::from_secs(60),
        "progress with the first 50",
        |l| {
            note_stop(l);
            l.contains("progress") && l.contains("written=50")
        },
    );
    std::fs::write(
        kpis.dir.join("per_type.sql"),
        "SELECT event_type, count(*) AS events FROM events GROUP BY event_type",
    )
    .unwrap();
    line_where(&lines, Duration::from_secs(60), "the reload", |l| {
        note_stop(l);
        l.contains("KPI files changed")
    });
    common::send_raw(
        &brokers,
        "reload_counts",
        &common::sample_messages(50..80, 5),
    );
    let written = |l: &str| -> Option<u64> {
        let at = l.find("written=")? + "written=".len();
        l[at..].split(' ').next()?.parse().ok()
    };
    let after = line_where(
        &lines,
        Duration::from_secs(60),
        "progress after the reload",
        |l| {
            note_stop(l);
            l.contains("progress") && written(l).is_some_and(|n| !(50..80).contains(&n))
        },
    );
    assert_eq!(
        written(&after),
        Some(80),
        "counts restarted at the reload: {after}"
    );
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    line_where(&lines, Duration::from_secs(30), "the last line", |l| {
        note_stop(l);
        l.contains("pipeline stopped")
    });
    common::wait_exit_success(child.into_inner(), Duration::from_secs(20), "run");
    assert_eq!(
        stopped.len(),
        1,
        "logged as stopped while it ran on: {stopped:?}"
    );
    assert!(stopped[0].contains("written=80"), "{}", stopped[0]);
}

/// Regression: "Postgres answers again" came only from the probe, which asks
/// while no batch commits, so after an outage that a batch retried through
/// it was logged at the next idle spell, after the rows were long in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_end_of_an_outage_is_logged_when_the_retried_batch_commits() {
    let pg = std::sync::Arc::new(
        tokio::task::spawn_blocking(|| {
            energy_stream::localpg::LocalPostgres::start().expect("postgres")
        })
        .await
        .unwrap(),
    );
    let db = common::fresh_db_on(&pg.url(), "answersagain").await;
    let (_cluster, brokers) = mock_topic("answers_again", 1);
    common::send_raw(
        &brokers,
        "answers_again",
        &common::sample_messages(0..50, 5),
    );
    let (child, lines) = run_logged(
        &[
            "--no-kpis",
            "--brokers",
            &brokers,
            "--topic",
            "answers_again",
            "--progress-interval-secs",
            "1",
            "--batch-max-wait-ms",
            "100",
        ],
        &db,
    );
    line_where(&lines, Duration::from_secs(60), "the first 50 in", |l| {
        l.contains("progress") && l.contains("written=50 ")
    });
    {
        let pg = pg.clone();
        tokio::task::spawn_blocking(move || pg.stop_immediate().unwrap())
            .await
            .unwrap();
    }
    common::send_raw(
        &brokers,
        "answers_again",
        &common::sample_messages(50..80, 5),
    );
    line_where(&lines, Duration::from_secs(60), "the failed batch", |l| {
        l.contains("Postgres write failed")
    });
    {
        let pg = pg.clone();
        tokio::task::spawn_blocking(move || pg.start_again().unwrap())
            .await
            .unwrap();
    }
    let first = line_where(
        &lines,
        Duration::from_secs(60),
        "the end of the outage, or the rows in",
        |l| l.contains("answers again") || (l.contains("progress") && l.contains("written=80 ")),
    );
    assert!(
        first.contains("answers again"),
        "the rows were in before the end of the outage was told: {first}"
    );
    stop_run(child);
}

/// Two `run`s of one group id writing different databases split the topic
/// between them, and nothing said so. The group's offsets, which only
/// committed batches reach, now tell: a consumer assigned partitions that
/// the group has read further than its database warns, naming them. Its
/// own database's consumers never make it warn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_read_further_than_the_database_is_warned_of() {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let (_cluster, brokers) = mock_topic("split_group", 2);
    common::send_raw(&brokers, "split_group", &common::sample_messages(0..40, 5));
    let (first, second) = (
        common::fresh_db("splitfirst").await,
        common::fresh_db("splitsecond").await,
    );
    let run = |db: &tokio_postgres::Config| {
        let out = Command::new(env!("CARGO_BIN_EXE_energy-stream"))
            .args(["run", "--metrics-addr", "off", "--no-kpis"])
            .args(["--stop-when-caught-up", "--group-id", "split"])
            .args(["--brokers", &brokers, "--topic", "split_group"])
            .env("DATABASE_URL", common::db_url_with_password(db))
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", common::output_text(&out));
        common::output_text(&out)
    };
    let group_read = |total: i64| {
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", "split")
            .create()
            .unwrap();
        let mut tpl = rdkafka::TopicPartitionList::new();
        tpl.add_partition("split_group", 0);
        tpl.add_partition("split_group", 1);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let committed = consumer
                .committed_offsets(tpl.clone(), Duration::from_secs(5))
                .unwrap();
            let sum: i64 = committed
                .elements()
                .iter()
                .filter_map(|e| e.offset().to_raw())
                .filter(|o| *o >= 0)
                .sum();
            if sum == total {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the group holds {sum} of {total}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    const WARNING: &str = "committed offsets of these partitions are ahead";
    let text = run(&first);
    assert!(!text.contains(WARNING), "a fresh group: {text}");
    group_read(40);
    let text = run(&second);
    let warning = text
        .lines()
        .find(|l| l.contains(WARNING))
        .unwrap_or_else(|| panic!("the other database's run was not warned: {text}"));
    assert!(warning.contains("partitions=[0, 1]"), "{warning}");
    assert!(warning.contains("stored_offsets=[None, None]"), "{warning}");
    assert!(warning.contains("--group-id"), "{warning}");
    // The first database's consumer again, after the second caught up: the
    // group is at the end, and so is the first database.
    group_read(40);
    common::send_raw(&brokers, "split_group", &common::sample_messages(40..50, 5));
    let text = run(&first);
    assert!(!text.contains(WARNING), "its own database: {text}");
}

/// Regression: a KPI that failed on a batch was logged with "fix
/// queries/<name>.sql first" whatever `--queries-dir` said, so the user was
/// sent to a file that was not the one running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kpi_failing_on_a_batch_names_the_file_it_was_read_from() {
    let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
    let brokers = cluster.bootstrap_servers();
    cluster.create_topic("failing_kpi", 1, 1).unwrap();
    common::send_raw(&brokers, "failing_kpi", &common::sample_messages(0..50, 5));
    // Plans and installs; every channel name then fails the cast.
    let kpis = common::kpi_dir(&[(
        "bad_cast.sql",
        "SELECT channel, sum(CAST(channel AS BIGINT)) AS x FROM events GROUP BY channel",
    )]);
    let db = common::fresh_db("failingkpi").await;
    let (child, lines) = run_logged(
        &[
            "--stop-when-caught-up",
            "--brokers",
            &brokers,
            "--topic",
            "failing_kpi",
            "--queries-dir",
            kpis.dir.to_str().unwrap(),
        ],
        &db,
    );
    let failed = line_where(&lines, Duration::from_secs(60), "the KPI's failure", |l| {
        l.contains("KPI failed on a batch")
    });
    let file = kpis.dir.join("bad_cast.sql");
    assert!(
        failed.contains(&format!("fix {} first", file.display())),
        "{failed}"
    );
    common::wait_exit_success(child.into_inner(), Duration::from_secs(60), "run");
}

/// Regression: `--stop-when-caught-up` exited 0 once the partitions it was
/// given were read, without a word about the others, which other members of
/// the group held: live ones, or dead ones the broker had not expired yet
/// (found by a probe that killed consumers and then ran a batch load).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_when_caught_up_names_the_partitions_other_members_own() {
    let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
    let brokers = cluster.bootstrap_servers();
    cluster.create_topic("shared_group", 2, 1).unwrap();
    common::send_raw(
        &brokers,
        "shared_group",
        &common::sample_messages(0..100, 10),
    );
    let db = common::fresh_db("sharedgroup").await;
    let spawn = |extra: &[&str]| {
        common::Reaped::new(
            Command::new(env!("CARGO_BIN_EXE_energy-stream"))
                .args(["run", "--metrics-addr", "off", "--no-kpis"])
                .args(["--brokers", &brokers, "--topic", "shared_group"])
                .args(["--group-id", "shared_group"])
                .args(extra)
                .env("DATABASE_URL", common::db_url_with_password(&db))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        )
    };
    let mut first = spawn(&[]);
    let first_lines = stderr_lines(&mut first);
    line_where(
        &first_lines,
        Duration::from_secs(60),
        "the first member owning both partitions",
        |l| l.contains("partitions assigned") && l.contains("[0, 1]"),
    );

    let mut second = spawn(&["--stop-when-caught-up"]);
    let lines = stderr_lines(&mut second);
    let warning = line_where(
        &lines,
        Duration::from_secs(120),
        "a warning naming the partitions it did not read",
        |l| l.contains("other members of the group own these partitions"),
    );
    assert!(
        warning.contains("partitions=[0]") || warning.contains("partitions=[1]"),
        "{warning}"
    );
    common::wait_exit_success(
        second.into_inner(),
        Duration::from_secs(30),
        "run (caught up)",
    );
    unsafe { libc::kill(first.id() as i32, libc::SIGTERM) };
    common::wait_exit_success(first.into_inner(), Duration::from_secs(30), "run");
}

/// Regression: `LOG_JSON=1` ended every command with "invalid value '1' for
/// '--log-json'": switches from the environment took only true or false.
#[test]
fn switches_in_the_environment_take_1_and_0() {
    for (v, json) in [("1", true), ("yes", true), ("0", false)] {
        // A command that ends on an error: with LOG_JSON its last line is JSON.
        let out = Command::new(env!("CARGO_BIN_EXE_energy-stream"))
            .args(["check", "--queries-dir", "/nonexistent-energy-stream-kpis"])
            .env("LOG_JSON", v)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("invalid value"), "LOG_JSON={v}: {stderr}");
        assert_eq!(out.status.code(), Some(1), "LOG_JSON={v}: {stderr}");
        let last = stderr.lines().last().unwrap_or_default();
        assert_eq!(last.starts_with('{'), json, "LOG_JSON={v}: {stderr}");
        assert!(last.contains("nonexistent-energy-stream-kpis"), "{stderr}");
    }
}

/// Regression: a bad value in an environment variable was reported with the
/// flag's name only (`invalid value 'abc' for '--batch-max-rows'`), and a
/// bad METRICS_ADDR with neither: the operator looked for a flag nobody gave.
#[test]
fn a_bad_value_from_the_environment_names_its_variable() {
    let refused = |var: &str, value: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_energy-stream"))
            .arg("run")
            .env(var, value)
            .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(!out.status.success(), "{var}={value} is refused");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = refused("BATCH_MAX_ROWS", "abc");
    assert!(
        err.contains("--batch-max-rows") && err.contains("environment variable BATCH_MAX_ROWS"),
        "{err}"
    );
    let err = refused("METRICS_ADDR", "nonsense");
    assert!(err.contains("METRICS_ADDR"), "{err}");
    // Regression: 0 was refused in the flag's name alone, and an empty
    // METRICS_ADDR turned /metrics, /healthz and /readyz off without a word.
    let err = refused("BATCH_MAX_ROWS", "0");
    assert!(
        err.contains("--batch-max-rows") && err.contains("environment variable BATCH_MAX_ROWS"),
        "{err}"
    );
    let err = refused("METRICS_ADDR", "");
    assert!(
        err.contains("empty metrics address") && err.contains("METRICS_ADDR"),
        "{err}"
    );
}

/// Regression: `migrate`, `verify` and `backfill` said "connection refused"
/// without saying which database they tried; they name it now, without
/// its password.
#[test]
fn a_database_that_cannot_be_reached_is_named() {
    let queries = concat!(env!("CARGO_MANIFEST_DIR"), "/queries");
    for command in ["migrate", "verify", "backfill"] {
        let out = Command::new(env!("CARGO_BIN_EXE_energy-stream"))
            .args([command, "--queries-dir", queries])
            .env(
                "DATABASE_URL",
                "postgres://nobody:pw-secret-9@127.0.0.1:1/nowhere_db",
            )
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let text = common::output_text(&out);
        assert_eq!(out.status.code(), Some(1), "{command}: {text}");
        assert!(
            text.contains("cannot connect to postgres://nobody@127.0.0.1:1/nowhere_db"),
            "{command}: {text}"
        );
        assert!(!text.contains("pw-secret-9"), "{command}: {text}");
    }
}

/// Regression: `sslmode=require` against a server that does not offer TLS
/// was retried for ever by `run` ("cannot reach Postgres; retrying"), while
/// a wrong password, just as permanent, stopped it at once. The stand-in
/// server answers every SSLRequest with 'N', as Postgres with `ssl = off`.
#[test]
fn tls_required_of_a_server_without_it_stops_the_run() {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut request = [0u8; 8];
            if stream.read_exact(&mut request).is_ok() {
                let _ = stream.write_all(b"N");
            }
        }
    });
    // Debian's postgresql package brings this certificate (through ssl-cert).
    let ca = "/etc/ssl/certs/ssl-cert-snakeoil.pem";
    assert!(
        std::path::Path::new(ca).exists(),
        "{ca} is missing: apt-get install -y postgresql (ssl-cert) makes it"
    );
    // Regression: with a CA file and sslmode=prefer (which the CA file
    // makes require), the advice was "use sslmode=prefer", as the URL said.
    for (url_mode, ca_file) in [("require", None), ("prefer", Some(ca))] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_energy-stream"));
        cmd.args([
            "run",
            "--no-kpis",
            "--metrics-addr",
            "off",
            "--brokers",
            "127.0.0.1:1",
        ])
        .env(
            "DATABASE_URL",
            format!("postgres://nobody@127.0.0.1:{port}/energy?sslmode={url_mode}"),
        )
        .env_remove("DATABASE_CA_FILE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        if let Some(ca) = ca_file {
            cmd.env("DATABASE_CA_FILE", ca);
        }
        let mut child = cmd.spawn().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while child.try_wait().unwrap().is_none() {
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                panic!("run still retrying a server that will never offer TLS");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let out = child.wait_with_output().unwrap();
        let text = common::output_text(&out);
        assert_eq!(out.status.code(), Some(1), "{text}");
        assert!(text.contains("server does not support TLS"), "{text}");
        assert!(text.contains("sslmode=prefer without a CA file"), "{text}");
        if ca_file.is_some() {
            assert!(text.contains("--database-ca-file"), "{text}");
        }
    }
}

/// Regression: `migrate` read `--no-kpis` but not NO_KPIS, which the README
/// lists for it, so NO_KPIS=1 with --retire-all retired every KPI.
#[test]
fn migrate_reads_no_kpis_from_the_environment() {
    let out = Command::new(env!("CARGO_BIN_EXE_energy-stream"))
        .args(["migrate", "--retire-all"])
        .env("NO_KPIS", "1")
        .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = common::output_text(&out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(
        text.contains("--retire-all") && text.contains("--no-kpis"),
        "{text}"
    );
}

/// `energy-stream <args…>` against `url` with `dir` as its KPI directory.
fn kpi_command(url: &str, dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_energy-stream"))
        .args(args)
        .arg("--queries-dir")
        .arg(dir)
        .env("DATABASE_URL", url)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// [`kpi_command`], which must succeed.
fn kpi_ok(url: &str, dir: &std::path::Path, args: &[&str]) {
    let out = kpi_command(url, dir, args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        common::output_text(&out)
    );
}

/// A fresh database with the schema and no KPI, holding `n` login events of
/// customers `cust0000`, `cust0001`, … on two channels.
async fn db_with_events(prefix: &str, n: i64) -> (tokio_postgres::Config, tokio_postgres::Client) {
    let db = common::fresh_db(prefix).await;
    let mut c = common::client(&db).await;
    energy_stream::sink::migrate::migrate(&mut c).await.unwrap();
    insert_events(&c, 0..n, "cust").await;
    (db, c)
}

/// Login events at `offsets` of partition 0, customer `{prefix}{offset:04}`.
async fn insert_events(c: &tokio_postgres::Client, offsets: std::ops::Range<i64>, prefix: &str) {
    c.execute(
        "INSERT INTO events (kafka_partition, kafka_offset, event_type, event_time, customer_id, session_id, channel) \
         SELECT 0, g, 'user_login', timestamptz '2025-06-01 00:00Z' + g * interval '1 minute', \
                $3 || lpad(g::text, 4, '0'), g, CASE WHEN g % 2 = 0 THEN 'web_portal' ELSE 'mobile_app' END \
         FROM generate_series($1::bigint, $2::bigint - 1) g",
        &[&offsets.start, &offsets.end, &prefix],
    )
    .await
    .unwrap();
}

/// Regression: a KPI with the longest legal name (40 characters) and 12
/// sets of distinct counts passed `check`, but `migrate` failed with
/// `relation "kpi_members_<name>_s10__new_g" does not exist — the schema is
/// missing or old: run energy-stream migrate`: the backfill's temporary index
/// names `…_s10__new_grp` and `…_s10__new_gen` were longer than the 63 bytes
/// Postgres keeps, and both were cut to the same name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kpi_with_the_longest_name_and_many_distinct_sets_installs() {
    let name = "a123456789b123456789c123456789d123456789";
    assert_eq!(name.len(), 40);
    let counted = [
        "customer_id",
        "session_id",
        "channel",
        "event_type",
        "tariff_type",
        "energy_consumed",
        "payment_amount",
        "kafka_offset",
        "kafka_partition",
        "event_time",
        "customer_id || channel",
        "session_id % 7",
    ];
    let measures: Vec<String> = counted
        .iter()
        .enumerate()
        .map(|(i, x)| format!("count(DISTINCT {x}) AS d{i}"))
        .collect();
    let sql = format!(
        "SELECT channel, {} FROM events GROUP BY channel",
        measures.join(", ")
    );
    let kpis = common::kpi_dir(&[(&format!("{name}.sql"), &sql)]);
    let (db, c) = db_with_events("longname", 50).await;
    let url = common::db_url_with_password(&db);

    for cmd in ["check", "migrate", "backfill", "verify"] {
        kpi_ok(&url, &kpis.dir, &[cmd]);
    }
    // No two of its indexes were cut to one name.
    let indexes: i64 = c
        .query_one(
            "SELECT count(DISTINCT indexname) FROM pg_indexes WHERE tablename LIKE $1",
            &[&format!("kpi_members_{name}_s%")],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(indexes, 2 * counted.len() as i64);
    let rows: i64 = c
        .query_one(&format!("SELECT sum(d0)::bigint FROM {name}"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 50);
}

/// Regression: a KPI whose query failed on events already stored (a cast
/// that a `guest-42` customer breaks) stopped `backfill` and `verify` (and
/// every start of `run`, which backfills) with a bare `KPI computation
/// failed: <Arrow error>`, which said neither which KPI nor which file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kpi_failing_on_stored_events_is_named_with_its_file() {
    let kpis = common::kpi_dir(&[
        (
            "by_channel.sql",
            "SELECT channel, count(*) AS n FROM events GROUP BY channel",
        ),
        (
            "customer_numbers.sql",
            "SELECT channel, sum(CAST(substr(customer_id, 5) AS INT)) AS total FROM events GROUP BY channel",
        ),
    ]);
    let (db, c) = db_with_events("failstored", 20).await;
    let url = common::db_url_with_password(&db);
    for cmd in ["migrate", "verify"] {
        kpi_ok(&url, &kpis.dir, &[cmd]);
    }
    insert_events(&c, 20..21, "guest-").await;
    let file = kpis.dir.join("customer_numbers.sql");
    for cmd in ["verify", "backfill"] {
        let out = kpi_command(&url, &kpis.dir, &[cmd]);
        let text = common::output_text(&out);
        assert_eq!(out.status.code(), Some(1), "{cmd}: {text}");
        assert!(text.contains("KPI customer_numbers"), "{cmd}: {text}");
        assert!(
            text.contains(&format!("Fix {}", file.display())),
            "{cmd}: {text}"
        );
        assert!(text.contains("t-0020"), "the cause stays: {cmd}: {text}");
    }
}

/// Regression: an error of Postgres while installing a KPI's tables or view
/// (here another application's type of the KPI's name, and two column
/// names that share their first 63 bytes) read `postgres unavailable
/// (query): ERROR: …`, without the KPI's name, as if Postgres were down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kpi_that_postgres_refuses_to_install_is_named() {
    let clash = common::kpi_dir(&[(
        "clash.sql",
        "SELECT channel, count(*) AS n FROM events GROUP BY channel",
    )]);
    let (db, c) = db_with_events("refused", 10).await;
    let url = common::db_url_with_password(&db);
    c.batch_execute("CREATE TYPE clash AS ENUM ('a', 'b')")
        .await
        .unwrap();
    let out = kpi_command(&url, &clash.dir, &["migrate"]);
    let text = common::output_text(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("KPI clash"), "{text}");
    assert!(text.contains("type \"clash\" already exists"), "{text}");
    assert!(
        text.contains(&clash.dir.join("clash.sql").display().to_string()),
        "{text}"
    );
    assert!(!text.contains("unavailable"), "{text}");

    // `check` now refuses this one before Postgres sees it; either way the
    // KPI is named and Postgres is not said to be away.
    let long = "a".repeat(63);
    let aliases = common::kpi_dir(&[(
        "long_aliases.sql",
        &format!(
            "SELECT channel, count(*) AS {long}_x, sum(session_id) AS {long}_y FROM events GROUP BY channel"
        ),
    )]);
    let out = kpi_command(&url, &aliases.dir, &["migrate"]);
    let text = common::output_text(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("long_aliases"), "{text}");
    assert!(!text.contains("unavailable"), "{text}");
}

/// Regression: `verify` with a KPI file other than the one installed (an
/// edited file not yet installed, or another checkout's) compared the new
/// query's results with the tables of the old one and reported "N
/// mismatching row(s)", as if the streamed data were wrong; a file never
/// installed failed it with "the schema is missing or old". Each is now
/// named with what differs and what to do, and not compared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_says_which_kpis_are_not_installed_as_their_files_say() {
    let by_channel = "SELECT channel, count(*) AS n FROM events GROUP BY channel";
    let installed = common::kpi_dir(&[
        ("by_channel.sql", by_channel),
        (
            "gone.sql",
            "SELECT channel, count(*) AS n FROM events GROUP BY channel",
        ),
        (
            "same.sql",
            "SELECT event_type, count(*) AS n FROM events GROUP BY event_type",
        ),
    ]);
    let (db, c) = db_with_events("verifydef", 30).await;
    let url = common::db_url_with_password(&db);
    kpi_ok(&url, &installed.dir, &["migrate"]);
    // `gone` retired: its file deleted, then `migrate`.
    std::fs::remove_file(installed.dir.join("gone.sql")).unwrap();
    kpi_ok(&url, &installed.dir, &["migrate"]);

    let edited = common::kpi_dir(&[
        (
            "by_channel.sql",
            "SELECT channel, count(*) AS n FROM events WHERE event_type = 'tariff_switch' GROUP BY channel",
        ),
        (
            "gone.sql",
            "SELECT channel, count(*) AS n FROM events GROUP BY channel",
        ),
        (
            "brand_new.sql",
            "SELECT channel, count(*) AS n FROM events GROUP BY channel",
        ),
        (
            "same.sql",
            "SELECT event_type, count(*) AS n FROM events GROUP BY event_type",
        ),
    ]);
    let out = kpi_command(&url, &edited.dir, &["verify"]);
    let text = common::output_text(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(!text.contains("mismatching"), "{text}");
    assert!(!text.contains("run `energy-stream migrate`"), "{text}");
    let line = |kpi: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("{kpi}: not verified: ")))
            .unwrap_or_else(|| panic!("no line for {kpi}: {text}"))
            .to_string()
    };
    let file = edited.dir.join("by_channel.sql");
    assert!(
        line("by_channel").contains(&format!(
            "{} differs from the SQL it was installed from",
            file.display()
        )),
        "{text}"
    );
    assert!(line("by_channel").contains("--queries-dir"), "{text}");
    assert!(line("gone").contains("retired"), "{text}");
    assert!(line("brand_new").contains("not installed"), "{text}");
    assert!(
        !text.contains("same: not verified"),
        "the installed KPI is compared: {text}"
    );
    assert!(text.contains("verify: 3 KPI(s) not verified"), "{text}");

    // The case that read as wrong data: the edited file alone.
    let out = kpi_command(&url, &edited.dir, &["verify", "--kpi", "by_channel"]);
    let text = common::output_text(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("by_channel: not verified"), "{text}");
    assert!(!text.contains("by_channel: recomputed"), "{text}");

    // One KPI asked for: only it is looked at.
    kpi_ok(&url, &edited.dir, &["verify", "--kpi", "same"]);
    let out = kpi_command(&url, &edited.dir, &["verify", "--kpi", "brand_new"]);
    let text = common::output_text(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("brand_new: not verified"), "{text}");
    assert!(!text.contains("by_channel"), "{text}");

    // With the files it was installed from, it passes.
    kpi_ok(&url, &installed.dir, &["verify"]);

    // Regression: pointed at a directory that lacks some of the KPIs the
    // database maintains, or at an empty one, it said every KPI equals its
    // recomputation and exited 0, having recomputed nothing of them.
    let some = common::kpi_dir(&[(
        "same.sql",
        "SELECT event_type, count(*) AS n FROM events GROUP BY event_type",
    )]);
    let none = common::kpi_dir(&[]);
    for (dir, missing) in [
        (&some.dir, vec!["by_channel"]),
        (&none.dir, vec!["by_channel", "same"]),
    ] {
        let out = kpi_command(&url, dir, &["verify"]);
        let text = common::output_text(&out);
        assert_eq!(out.status.code(), Some(1), "{text}");
        for kpi in &missing {
            assert!(
                line_of(&text, kpi)
                    .contains("the database maintains it, but no file given defines it"),
                "{text}"
            );
        }
        assert!(
            !text.contains("gone: not verified"),
            "a retired KPI is not maintained: {text}"
        );
        assert!(
            text.contains(&format!("verify: {} KPI(s) not verified", missing.len())),
            "{text}"
        );
    }
    // One KPI asked for still looks at that one only.
    kpi_ok(&url, &some.dir, &["verify", "--kpi", "same"]);

    // Regression: `migrate` from that empty directory (a volume not mounted)
    // retired every KPI. It is refused, changing nothing, unless asked for.
    let out = kpi_command(&url, &none.dir, &["migrate"]);
    let text = common::output_text(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("nothing was changed")
            && text.contains("holds no KPI file")
            && text.contains("2 KPI(s) (by_channel, same)")
            && text.contains("--retire-all"),
        "{text}"
    );
    kpi_ok(&url, &installed.dir, &["verify"]);
    kpi_ok(&url, &none.dir, &["migrate", "--retire-all"]);
    let retired: i64 = c
        .query_one(
            "SELECT count(*) FROM kpi_registry WHERE sql_hash = 'retired'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(retired, 3, "by_channel and same, and gone before them");
    drop(c);
}

fn line_of(text: &str, kpi: &str) -> String {
    text.lines()
        .find(|l| l.starts_with(&format!("{kpi}: not verified: ")))
        .unwrap_or_else(|| panic!("no line for {kpi}: {text}"))
        .to_string()
}

/// Regression: `verify`'s summary counted printed lines as "mismatching
/// row(s)", so a key whose values differ (printed once as recomputed and
/// once as streamed) counted twice. It counts keys, as the README says.
/// More events than one chunk of the recomputation (50 000), with customers
/// in several chunks each. `migrate`'s backfill and `verify` share that
/// recomputation, so the stored values are also checked against Postgres'
/// own counts: a chunk left out, or a customer counted once per chunk,
/// would show there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_counts_the_keys_that_differ() {
    let kpis = common::kpi_dir(&[(
        "by_channel.sql",
        "SELECT channel, count(*) AS n, count(DISTINCT customer_id) AS customers \
         FROM events GROUP BY channel",
    )]);
    let (db, c) = db_with_events("verifykeys", 120_000).await;
    let url = common::db_url_with_password(&db);
    kpi_ok(&url, &kpis.dir, &["migrate"]);
    let rows = |sql: &'static str| {
        let c = &c;
        async move {
            c.query(sql, &[])
                .await
                .unwrap()
                .iter()
                .map(|r| {
                    (
                        r.get::<_, String>(0),
                        r.get::<_, i64>(1),
                        r.get::<_, i64>(2),
                    )
                })
                .collect::<Vec<_>>()
        }
    };
    let stored = rows("SELECT channel, n, customers FROM by_channel ORDER BY 1").await;
    let want = rows(
        "SELECT channel, count(*), count(DISTINCT customer_id) FROM events GROUP BY 1 ORDER BY 1",
    )
    .await;
    assert_eq!(stored, want);
    kpi_ok(&url, &kpis.dir, &["verify"]);
    // One key's value changed (two lines), one key only streamed (one line).
    c.batch_execute(
        "UPDATE kpi_state_by_channel SET m0 = m0 + 1 WHERE k0 = 'web_portal';
         INSERT INTO kpi_state_by_channel (k0, m0, m1) VALUES ('fax', 1, 1);",
    )
    .await
    .unwrap();
    let out = kpi_command(&url, &kpis.dir, &["verify"]);
    let text = common::output_text(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let lines = |prefix: &str| text.lines().filter(|l| l.starts_with(prefix)).count();
    assert_eq!(lines("by_channel: recomputed "), 1, "{text}");
    assert_eq!(lines("by_channel: streamed "), 2, "{text}");
    assert!(text.contains("verify: 2 key(s) differ"), "{text}");
    // Its recomputation went to temporary tables, gone with it.
    let left: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_class WHERE relname LIKE 'kpi\\_%$n%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
    drop(c);
}
