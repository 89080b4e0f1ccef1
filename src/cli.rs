//! The command-line edge: turns a parsed [`Cli`] into calls on the library,
//! with `anyhow` errors and exit codes. Signals become shutdown futures here.

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;

use crate::config::{Cli, Command, flag_in_argv, parse_metrics_addr};
use crate::telemetry::Metrics;

fn env_vars() -> Vec<(String, String)> {
    std::env::vars().collect()
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // KPI plans run here batch by batch, and evaluating an expression
        // recurses once per level: 2 MiB is too little for the deepest a
        // KPI file may hold (see `kpi::PLANNING_STACK`).
        .thread_stack_size(crate::kpi::EXECUTION_STACK)
        .build()
        .context("cannot start the async runtime")
}

/// Resolves on the first SIGINT or SIGTERM. The handlers are installed when
/// this is called (inside the runtime), not when the future is first polled,
/// so a signal that arrives during start-up is not lost to the default action.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let argv: Vec<String> = std::env::args().collect();
    let db_in_argv = flag_in_argv(&argv, "--database-url");
    let verify = matches!(cli.command, Command::Verify(_));
    match cli.command {
        Command::Run(args) => {
            let cfg = args.to_config(db_in_argv, env_vars())?;
            tracing::info!(
                db = %cfg.database,
                brokers = %cfg.kafka.brokers,
                topic = %cfg.kafka.topic,
                group = %cfg.kafka.group_id,
                batch_max_rows = cfg.batch_max_rows,
                batch_max_wait_ms = cfg.batch_max_wait.as_millis() as u64,
                "starting pipeline"
            );
            let rt = runtime()?;
            let shutdown = {
                let _enter = rt.enter();
                shutdown_signal()
            };
            let summary = rt.block_on(crate::pipeline::run(cfg, Metrics::new(), shutdown))?;
            // One line on stdout for scripts (the throughput harness reads it).
            // A reader gone (a killed harness) is no reason to panic after a
            // clean stop.
            let _ = writeln!(std::io::stdout().lock(), "run summary: {summary}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Migrate(args) => {
            let database = args.db.require_database(db_in_argv)?;
            let rt = runtime()?;
            rt.block_on(async {
                // Before anything changes: a directory that does not load
                // (run from elsewhere than the repo) stopped `migrate` after
                // the schema and before the grants.
                let engine = if args.no_kpis {
                    None
                } else {
                    let dir = &args.queries.queries_dir;
                    let engine = crate::kpi::KpiEngine::load_dir(&crate::kpi::KpiConfig {
                        dir: dir.clone(),
                        ..Default::default()
                    })
                    .await
                    .with_context(|| {
                        format!(
                            "nothing was changed: the KPI files of {} do not load (give --queries-dir, or --no-kpis for the schema and grants only)",
                            dir.display()
                        )
                    })?;
                    Some(engine)
                };
                // The target named: "connection refused" alone does not say
                // which of several databases an operator meant.
                let mut client = database
                    .connect()
                    .await
                    .with_context(|| format!("cannot connect to {database}"))?;
                crate::sink::migrate::check_roles(
                    &client,
                    &[args.grant_app.as_deref(), args.grant_read.as_deref()],
                )
                .await?;
                // Regression: an empty directory (a volume not mounted)
                // retired every KPI, while `run` refuses such a start.
                if let Some(engine) = &engine
                    && engine.is_empty()
                    && !args.retire_all
                {
                    let live = crate::kpi::maintained(&client).await?;
                    if !live.is_empty() {
                        anyhow::bail!(
                            "nothing was changed: {} holds no KPI file, and the database maintains {} KPI(s) ({}), which migrate would retire; point --queries-dir at the KPI files, or give --retire-all to retire every KPI on purpose (--no-kpis does the schema and grants only)",
                            args.queries.queries_dir.display(),
                            live.len(),
                            live.join(", ")
                        );
                    }
                }
                let report = crate::sink::migrate::migrate(&mut client).await?;
                println!(
                    "migrations: {} applied{}, {} already in place",
                    report.applied.len(),
                    listed(&report.applied),
                    report.already
                );
                if let Some(engine) = engine {
                    let kpis = crate::kpi::install(&mut client, &engine).await?;
                    println!(
                        "KPIs: {} installed, {} (re)computed from events{}",
                        engine.len(),
                        kpis.backfilled.len(),
                        listed(&kpis.backfilled)
                    );
                    let retired = crate::kpi::retire_missing(&client, &engine).await?;
                    if !retired.is_empty() {
                        println!(
                            "KPIs retired (no file in the queries directory; their tables and views stay, no longer updated): {}",
                            retired.join(", ")
                        );
                    }
                }
                crate::sink::migrate::grant(
                    &client,
                    args.grant_app.as_deref(),
                    args.grant_read.as_deref(),
                )
                .await?;
                for (what, role) in [("app", &args.grant_app), ("read-only", &args.grant_read)] {
                    if let Some(r) = role {
                        println!("granted {what} privileges to {r}");
                    }
                }
                anyhow::Ok(())
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Generate(args) => {
            let cfg = crate::generate::GenerateConfig {
                events: args.events,
                customers: args.customers,
                days: args.days,
                start: args.start,
                seed: args.seed,
                bad_ratio: args.bad_ratio,
            };
            crate::generate::check(&cfg)?;
            let summary = match &args.output {
                Some(path) => {
                    let f = std::fs::File::create(path)
                        .with_context(|| format!("cannot create {}", path.display()))?;
                    crate::generate::generate(&cfg, f)?
                }
                None => match crate::generate::generate(&cfg, std::io::stdout().lock()) {
                    // `generate | head`: the reader has what it wanted.
                    Err(crate::generate::GenerateError::Io(e))
                        if e.kind() == std::io::ErrorKind::BrokenPipe =>
                    {
                        return Ok(ExitCode::SUCCESS);
                    }
                    r => r?,
                },
            };
            eprintln!(
                "generated {} events ({} valid, {} invalid)",
                summary.good + summary.bad,
                summary.good,
                summary.bad
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Produce(args) => {
            let cfg = crate::produce::ProduceConfig {
                kafka: args.kafka.to_config("energy-stream-producer", env_vars())?,
                input: args.input.clone(),
                partitions: args.partitions,
                rate: args.rate,
                shuffle: args.shuffle,
                repeat: args.repeat,
                live: args.live,
                input_once: args.input_once,
                bad_lines: args.bad_lines.clone(),
            };
            let metrics = Metrics::new();
            let stop = Arc::new(AtomicBool::new(false));
            let rt = runtime()?;
            metrics.initialise_producer_labels();
            let explicit_addr = args.metrics_addr.is_some();
            let metrics_addr = parse_metrics_addr(
                args.metrics_addr
                    .as_deref()
                    .unwrap_or(crate::config::DEFAULT_METRICS_ADDR),
            )
            .map_err(anyhow::Error::msg)?;
            // Ready means the broker can be reached: the producer has no
            // Postgres, and `produce` sets and clears the Kafka condition.
            let health = Arc::new(crate::telemetry::Health::default());
            health.postgres_ok.store(true, Ordering::Relaxed);
            {
                let stop = stop.clone();
                let _enter = rt.enter();
                let signal = shutdown_signal();
                rt.spawn(async move {
                    signal.await;
                    stop.store(true, Ordering::Relaxed);
                });
            }
            if let Some(addr) = metrics_addr {
                let serve = |addr| {
                    let stop = stop.clone();
                    rt.block_on(crate::telemetry::serve(
                        addr,
                        metrics.clone(),
                        health.clone(),
                        async move {
                            while !stop.load(Ordering::Relaxed) {
                                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                            }
                        },
                    ))
                };
                let bound = match serve(addr) {
                    Ok((bound, _)) => bound,
                    // The default port is most likely taken by `run` on this host.
                    Err(e) if !explicit_addr && e.kind() == std::io::ErrorKind::AddrInUse => {
                        let fallback = std::net::SocketAddr::new(addr.ip(), 0);
                        serve(fallback)
                            .with_context(|| {
                                format!("cannot bind the metrics endpoint on {fallback}")
                            })?
                            .0
                    }
                    Err(e) => {
                        return Err(anyhow::Error::new(e)
                            .context(format!("cannot bind the metrics endpoint on {addr}")));
                    }
                };
                tracing::info!(addr = %bound, "serving /metrics, /healthz and /readyz");
            }
            let summary = crate::produce::produce(&cfg, &stop, metrics, health)?;
            println!("{summary}");
            if summary.bad_lines > 0 {
                println!("bad lines written to {}", cfg.bad_lines.display());
            }
            Ok(if summary.failed > 0 {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Check(args) => {
            let rt = runtime()?;
            let queries_dir = &args.queries.queries_dir;
            // Resolved first: a bad DATABASE_URL is refused before any output.
            let database = args.db.database(db_in_argv)?;
            let cfg = crate::kpi::KpiConfig {
                dir: queries_dir.clone(),
                ..Default::default()
            };
            let engine = rt.block_on(crate::kpi::KpiEngine::load_dir(&cfg))?;
            for def in engine.defs() {
                println!(
                    "{}  →  view {}, table {}",
                    def.name,
                    def.name,
                    crate::kpi::state_table(def, "")
                );
                if let Some(d) = &def.description {
                    println!("  {d}");
                }
                let keys: Vec<&str> = def.keys.iter().map(|k| k.name.as_str()).collect();
                println!("  keys: {}", keys.join(", "));
                for m in &def.measures {
                    println!("  measure {}: {}", m.display, m.func.rule());
                }
                let outputs: Vec<&str> = def.outputs.iter().map(|o| o.name.as_str()).collect();
                println!("  columns: {}, updated_at", outputs.join(", "));
                // DataFusion names an unaliased expression after its text,
                // which makes a view column that must be quoted to be read;
                // so does a quoted alias such as "Revenue".
                for o in outputs.iter().filter(|o| !plain_identifier(o)) {
                    println!(
                        "  note: column \"{o}\" must be quoted to be read (no alias, or not a lowercase name); `... AS some_name` gives it a name that needs no quotes"
                    );
                }
                // `SELECT user FROM kpi` reads the current user, not the
                // column, and `SELECT order FROM kpi` does not parse.
                for o in outputs.iter().filter(|o| {
                    plain_identifier(o) && crate::kpi::plan::PG_RESERVED_WORDS.contains(o)
                }) {
                    println!(
                        "  note: column {o} is a reserved word in Postgres' SQL and must be quoted to be read (\"{o}\"); `... AS another_name` avoids that"
                    );
                }
                // Postgres cuts identifiers to 63 bytes without a word.
                for o in outputs
                    .iter()
                    .filter(|o| o.len() > crate::kpi::plan::PG_NAME_BYTES)
                {
                    println!(
                        "  note: column \"{o}\" is longer than Postgres' 63-byte names; the view calls it \"{}\"",
                        crate::kpi::plan::pg_name(o)
                    );
                }
            }
            if engine.is_empty() {
                println!(
                    "no KPI files (*.sql) in {}: nothing to check",
                    queries_dir.display()
                );
                return Ok(ExitCode::SUCCESS);
            }
            // Planning does not evaluate the SQL: an expression that fails
            // on every row, such as to_timestamp('now'), passed and then
            // disabled its KPI at the first batch of `run`.
            let (_, failures) = rt.block_on(engine.compute_tolerant(&sample_events()?));
            let mut ok = true;
            for f in &failures {
                ok = false;
                let file = queries_dir.join(format!("{}.sql", f.kpi));
                eprintln!(
                    "error: {}: fails on {SAMPLE_EVENTS} sample events (every type and channel), as it would at the first batch of `run`: {}",
                    file.display(),
                    f.error
                );
            }
            match &database {
                Some(database) => {
                    let refused = rt.block_on(async {
                        let mut client = database
                            .connect()
                            .await
                            .with_context(|| format!("cannot connect to {database} to plan the KPIs' views (unset DATABASE_URL to check without a database)"))?;
                        anyhow::Ok(crate::kpi::check_views(&mut client, &engine).await?)
                    })?;
                    for (kpi, why) in &refused {
                        ok = false;
                        let file = queries_dir.join(format!("{kpi}.sql"));
                        eprintln!("error: {}: {why}", file.display());
                    }
                    if ok {
                        println!("views planned in {database}");
                    }
                }
                None => println!(
                    "note: no database given, so the views were not planned in Postgres; with DATABASE_URL set, `check` also finds functions Postgres lacks"
                ),
            }
            if ok {
                println!("{} KPI file(s) OK", engine.len());
                Ok(ExitCode::SUCCESS)
            } else {
                Ok(ExitCode::FAILURE)
            }
        }
        Command::Backfill(args) | Command::Verify(args) => {
            let database = args.db.require_database(db_in_argv)?;
            let rt = runtime()?;
            rt.block_on(async {
                let engine = crate::kpi::KpiEngine::load_dir(&crate::kpi::KpiConfig {
                    dir: args.queries.queries_dir.clone(),
                    ..Default::default()
                })
                .await?;
                if let Some(k) = &args.kpi
                    && !engine.defs().any(|d| &d.name == k)
                {
                    anyhow::bail!("no KPI named {k} in {}", args.queries.queries_dir.display());
                }
                // The target named: "connection refused" alone does not say
                // which of several databases an operator meant.
                let mut client = database
                    .connect()
                    .await
                    .with_context(|| format!("cannot connect to {database}"))?;
                // Pointed at the wrong database (a mistyped DATABASE_URL),
                // neither may leave energy-stream's schema there. `backfill`
                // applies the migrations a schema it finds may lack.
                if !verify {
                    let schema: bool = client
                        .query_one("SELECT to_regclass('events') IS NOT NULL", &[])
                        .await?
                        .get(0);
                    if !schema {
                        anyhow::bail!(
                            "{database} has no energy-stream schema (no events table), so there is nothing to backfill from; run `energy-stream migrate` first, or check DATABASE_URL"
                        );
                    }
                    crate::sink::migrate::migrate(&mut client).await?;
                }
                if verify {
                    let report =
                        crate::kpi::verify_report(&mut client, &engine, args.kpi.as_deref())
                            .await?;
                    for m in &report.mismatches {
                        println!("{}: {} {}", m.kpi, m.side, m.row);
                    }
                    for n in report.not_verified.iter().chain(&report.without_file) {
                        println!("{}: not verified: {}", n.kpi, n.reason);
                    }
                    let (keys, kpis) = (
                        report.differing_keys,
                        report.not_verified.len() + report.without_file.len(),
                    );
                    if keys == 0 && kpis == 0 {
                        match &args.kpi {
                            Some(k) => println!("verify: {k} equals its recomputation over events"),
                            None if engine.is_empty() => println!(
                                "verify: nothing to verify: no KPI file in {}, and the database maintains no KPI",
                                args.queries.queries_dir.display()
                            ),
                            None => println!(
                                "verify: every KPI ({}) equals its recomputation over events",
                                engine.len()
                            ),
                        }
                        Ok(ExitCode::SUCCESS)
                    } else if kpis == 0 {
                        println!("verify: {keys} key(s) differ");
                        Ok(ExitCode::FAILURE)
                    } else {
                        // Exit 1 as for differences: what was asked to be
                        // checked was not shown to be right.
                        let others = match keys {
                            0 => String::new(),
                            n => format!(", and {n} key(s) differ in the others"),
                        };
                        println!(
                            "verify: {kpis} KPI(s) not verified (the database does not hold them as the files given define them){others}"
                        );
                        Ok(ExitCode::FAILURE)
                    }
                } else {
                    let names: Vec<String> = engine.defs().map(|d| d.name.clone()).collect();
                    if names.is_empty() {
                        println!(
                            "backfill: nothing to backfill: no KPI file in {}",
                            args.queries.queries_dir.display()
                        );
                    }
                    for (i, name) in names.iter().enumerate() {
                        if args.kpi.as_ref().is_some_and(|k| k != name) {
                            continue;
                        }
                        let n = crate::kpi::backfill(&mut client, &engine, i).await?;
                        println!("backfilled {name} from {n} events");
                    }
                    Ok(ExitCode::SUCCESS)
                }
            })
        }
        Command::Bench(args) => {
            let cfg = crate::bench::BenchConfig {
                brokers: args.brokers.clone(),
                // For the bench's own producer and topic set-up; its `run`
                // and `migrate` children read them from the environment
                // they inherit, so secrets never reach their argv.
                kafka_options: crate::config::kafka_env_options(env_vars())?,
                database: args.db.resolve(db_in_argv)?,
                events: args
                    .events
                    .unwrap_or(if args.quick { 100_000 } else { 1_000_000 }),
                partitions: args.partitions,
                min_ratio: args.min_ratio,
                latency_secs: args.latency_secs,
                run_args: args.run_args.clone(),
                queries_dir: args.queries_dir.clone(),
            };
            let rt = runtime()?;
            let interrupted = {
                let _enter = rt.enter();
                shutdown_signal()
            };
            let Some(report) = rt.block_on(crate::bench::run(cfg.clone(), interrupted))? else {
                // As a shell reports a command ended by SIGINT.
                return Ok(ExitCode::from(130));
            };
            println!("{report}");
            if report.ratio_a() < cfg.min_ratio || report.ratio_b() < cfg.min_ratio {
                println!(
                    "FAIL: the pipeline ran at {:.2}x / {:.2}x of the COPY ceilings, below --min-ratio {}",
                    report.ratio_a(),
                    report.ratio_b(),
                    cfg.min_ratio
                );
                return Ok(ExitCode::FAILURE);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo(args) => {
            let cfg = crate::demo::DemoConfig {
                database: args.db.resolve(db_in_argv)?,
                input: args.input.clone(),
                keep_running: args.keep_running,
                // Checked before the demo, not after it: the endpoint is
                // bound only once the summary is out.
                metrics_addr: if args.keep_running {
                    parse_metrics_addr(
                        args.metrics_addr
                            .as_deref()
                            .unwrap_or(crate::config::DEFAULT_METRICS_ADDR),
                    )
                    .map_err(anyhow::Error::msg)?
                    .map(|a| crate::config::metrics_addr_or_free(a, args.metrics_addr.is_some()))
                    .transpose()
                    .map_err(anyhow::Error::msg)?
                } else {
                    None
                },
            };
            let rt = runtime()?;
            let shutdown = {
                let _enter = rt.enter();
                shutdown_signal()
            };
            rt.block_on(crate::demo::run(cfg, shutdown))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Whether Postgres reads `name` as a column name without quotes.
fn plain_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// ` (a, b)` after a count; nothing for none.
fn listed(names: &[String]) -> String {
    if names.is_empty() {
        String::new()
    } else {
        format!(" ({})", names.join(", "))
    }
}

/// How many generated events `check` runs the KPIs on.
const SAMPLE_EVENTS: u64 = 500;

/// Valid events of every type and channel, from `generate`'s default data
/// set, decoded and validated as `run` would.
fn sample_events() -> anyhow::Result<datafusion::arrow::record_batch::RecordBatch> {
    let cfg = crate::generate::GenerateConfig {
        events: SAMPLE_EVENTS,
        ..Default::default()
    };
    let mut lines = Vec::new();
    crate::generate::generate(&cfg, &mut lines)?;
    let decoded = crate::decode::decode_batch(
        crate::decode::DecodeConfig::default(),
        lines
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .enumerate()
            .map(|(i, l)| {
                (
                    Some(l),
                    crate::decode::MessageMeta {
                        partition: 0,
                        offset: i as i64,
                        timestamp_ms: None,
                    },
                )
            }),
    );
    let validated = crate::validate::validate(
        &decoded,
        &crate::validate::ValidationRules::default(),
        chrono::Utc::now(),
    )?;
    Ok(validated.valid)
}
