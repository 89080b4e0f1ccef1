//! Throwaway local PostgreSQL clusters started from the installed server binaries.
//!
//! A [`LocalPostgres`] owns one temp directory (`$TMPDIR/energy-stream-pg-<pid>-<n>`) that holds
//! a freshly `initdb`-ed cluster, its server log and the server process itself: 127.0.0.1 on a
//! free TCP port, trust authentication, superuser `postgres`. Dropping it kills the server and
//! deletes the directory. It backs `energy-stream demo` when `DATABASE_URL` is unset, the
//! integration tests, and the fault tests that crash and restart PostgreSQL.
//!
//! `initdb` and `postgres` refuse to run as root, and CI runs as root, so under euid 0 every
//! server binary runs as the `postgres` system user, which then owns the temp directory.
//!
//! The cluster is tuned for speed, not for surviving the machine: `fsync` and `full_page_writes`
//! are off, so an OS crash or power loss can corrupt it. Killing the server processes
//! ([`LocalPostgres::stop_immediate`], [`LocalPostgres::restart_immediate`]) loses nothing that
//! was committed, which is what the fault tests rely on.
//!
//! Every method blocks (it runs `pg_ctl` and may wait up to 30 s); from async code use
//! `tokio::task::spawn_blocking` unless blocking the current thread is acceptable.

use std::ffi::CString;
use std::fs;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long `pg_ctl` may wait for the server to start or stop.
const READY_TIMEOUT_SECS: u64 = 30;
/// Attempts with a fresh port when the chosen port is taken before the server binds it.
const START_ATTEMPTS: u32 = 3;
const DIR_PREFIX: &str = "energy-stream-pg-";
const LOG_FILE: &str = "postgres.log";
const CONF_FILE: &str = "energy_stream_localpg.conf";
/// Lines of a log or of stderr kept in an error message.
const TAIL_LINES: usize = 12;

static NEXT_DIR: AtomicU64 = AtomicU64::new(0);

/// Why a throwaway cluster could not be created, started or stopped.
#[derive(Debug, thiserror::Error)]
pub enum LocalPgError {
    #[error(
        "PostgreSQL server binaries not found: install them with `apt-get install -y postgresql` \
         (looked in PATH and /usr/lib/postgresql/*/bin)"
    )]
    BinariesNotFound,
    #[error(
        "running as root but there is no `postgres` system user to run initdb/postgres as (they \
         refuse to run as root): install the server with `apt-get install -y postgresql`"
    )]
    NoPostgresUser,
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("initdb failed: {0}")]
    Initdb(String),
    #[error("postgres failed to start: {0}")]
    Start(String),
    #[error(
        "postgres could not listen on 127.0.0.1:{port}, address already in use ({attempts} port(s) tried): {log}"
    )]
    PortInUse {
        port: u16,
        attempts: u32,
        log: String,
    },
    #[error("postgres did not become ready within {secs}s: {log}")]
    NotReady { secs: u64, log: String },
    #[error("pg_ctl stop failed: {0}")]
    Stop(String),
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> LocalPgError {
    let context = context.into();
    move |source| LocalPgError::Io { context, source }
}

/// The user the server binaries run as, when that is not the current user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RunAs {
    uid: u32,
    gid: u32,
}

/// A running (or deliberately stopped) throwaway PostgreSQL cluster; see the module docs.
#[derive(Debug)]
pub struct LocalPostgres {
    root: PathBuf,
    data_dir: PathBuf,
    bin_dir: PathBuf,
    run_as: Option<RunAs>,
    port: u16,
}

impl LocalPostgres {
    /// Creates a cluster in a fresh temp dir under [`std::env::temp_dir`], starts it on
    /// 127.0.0.1 with a free TCP port (trust auth, superuser `postgres`) and returns once it
    /// accepts connections.
    pub fn start() -> Result<Self, LocalPgError> {
        Self::start_with_ports(free_port)
    }

    fn start_with_ports(
        mut next_port: impl FnMut() -> io::Result<u16>,
    ) -> Result<Self, LocalPgError> {
        let bin_dir = find_bin_dir().ok_or(LocalPgError::BinariesNotFound)?;
        let run_as = server_user()?;
        reap_stale_clusters(&bin_dir, run_as);
        let root = create_root(run_as)?;
        // Constructed before anything can fail so that Drop cleans up every error path.
        let mut pg = LocalPostgres {
            data_dir: root.join("data"),
            root,
            bin_dir,
            run_as,
            port: 0,
        };
        pg.initdb()?;
        let mut attempt = 1;
        loop {
            pg.port = next_port().map_err(io_err("could not find a free TCP port on 127.0.0.1"))?;
            pg.write_port_conf()?;
            match pg.pg_ctl_start() {
                Ok(()) => {
                    tracing::debug!(port = pg.port, dir = %pg.root.display(), "throwaway PostgreSQL started");
                    return Ok(pg);
                }
                Err(LocalPgError::PortInUse { port, log, .. }) => {
                    if attempt >= START_ATTEMPTS {
                        return Err(LocalPgError::PortInUse {
                            port,
                            attempts: attempt,
                            log,
                        });
                    }
                    tracing::debug!(
                        port,
                        attempt,
                        "port taken before postgres bound it; retrying on another"
                    );
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// `postgres://postgres@127.0.0.1:<port>/postgres`
    pub fn url(&self) -> String {
        self.url_for("postgres")
    }

    /// The URL of database `database` on this cluster (name percent-encoded as needed).
    pub fn url_for(&self, database: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/{}",
            self.port,
            percent_encode(database)
        )
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Kills the server with `pg_ctl stop -m immediate` (no shutdown checkpoint, like a crash);
    /// the data dir is kept. Fails if the server is not running.
    pub fn stop_immediate(&self) -> Result<(), LocalPgError> {
        let out = run(self.pg_ctl("stop").args(["-m", "immediate"]), "pg_ctl stop")?;
        if out.status.success() {
            Ok(())
        } else {
            Err(LocalPgError::Stop(output_tail(&out)))
        }
    }

    /// Starts the server again on the same port and data dir (running crash recovery if it
    /// was killed) and waits until it accepts connections.
    pub fn start_again(&self) -> Result<(), LocalPgError> {
        self.pg_ctl_start()
    }

    /// `pg_ctl restart -m immediate`: kills the server as in a crash, starts it again on the
    /// same port and waits until it accepts connections.
    pub fn restart_immediate(&self) -> Result<(), LocalPgError> {
        let log_offset = self.log_len();
        let out = run(
            self.pg_ctl("restart")
                .args(["-m", "immediate", "-l"])
                .arg(self.log_path()),
            "pg_ctl restart",
        )?;
        if out.status.success() {
            self.wait_accepting()
        } else {
            Err(self.start_failure(&out, log_offset))
        }
    }

    /// Stops every process of the server with SIGSTOP, as `docker pause` or a
    /// hung host would: connections stay open and the kernel still accepts
    /// new ones, but nothing answers. [`LocalPostgres::thaw`] undoes it.
    pub fn freeze(&self) -> Result<(), LocalPgError> {
        signal_cluster(&self.data_dir, libc::SIGSTOP)
    }

    /// Lets a [`LocalPostgres::freeze`]d server run again.
    pub fn thaw(&self) -> Result<(), LocalPgError> {
        signal_cluster(&self.data_dir, libc::SIGCONT)
    }

    fn initdb(&self) -> Result<(), LocalPgError> {
        let out = run(
            server_command(&self.bin_dir.join("initdb"), self.run_as)
                .arg("-D")
                .arg(&self.data_dir)
                // --locale=C: the host's LANG may name a locale that is not generated, which
                // makes initdb fail; C also keeps server messages English for start_failure().
                .args([
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--locale=C",
                    // Syncing a cluster that dies with the test run only costs seconds.
                    "--no-sync",
                ]),
            "initdb",
        )?;
        if !out.status.success() {
            let mut msg = output_tail(&out);
            if self.run_as.is_some() && msg.contains("Permission denied") {
                msg.push_str(&format!(
                    " (initdb runs as the postgres user, which must be able to reach {}; point \
                     TMPDIR at a directory it can traverse)",
                    self.root.display()
                ));
            }
            return Err(LocalPgError::Initdb(msg));
        }
        let conf = self.data_dir.join("postgresql.conf");
        let settings = format!(
            "\n# energy-stream throwaway cluster (src/localpg.rs)\n\
             listen_addresses = '127.0.0.1'\n\
             unix_socket_directories = '{}'\n\
             # Throwaway: an OS crash may corrupt the cluster; killed server processes lose nothing.\n\
             fsync = off\n\
             full_page_writes = off\n\
             # Deliberately on: with synchronous_commit=off an acknowledged commit can still sit in\n\
             # shared memory and vanish on `pg_ctl stop -m immediate`, which breaks the fault tests.\n\
             # With fsync=off it only costs a write() into the page cache per commit.\n\
             synchronous_commit = on\n\
             max_connections = 200\n\
             shared_buffers = 128MB\n\
             # The port changes between start attempts, so it lives in a file we rewrite.\n\
             include = '{CONF_FILE}'\n",
            conf_escape(&self.socket_dir()),
        );
        fs::OpenOptions::new()
            .append(true)
            .open(&conf)
            .and_then(|mut f| f.write_all(settings.as_bytes()))
            .map_err(io_err(format!("could not append to {}", conf.display())))
    }

    /// The data dir keeps sockets away from /var/run/postgresql (root-owned or absent), but a
    /// Unix socket path is limited to 107 bytes; past that, run TCP-only rather than fail.
    fn socket_dir(&self) -> String {
        let dir = self.data_dir.to_string_lossy().into_owned();
        if dir.len() + "/.s.PGSQL.65535".len() < 108 {
            dir
        } else {
            String::new()
        }
    }

    fn write_port_conf(&self) -> Result<(), LocalPgError> {
        let path = self.data_dir.join(CONF_FILE);
        fs::write(&path, format!("port = {}\n", self.port))
            .map_err(io_err(format!("could not write {}", path.display())))?;
        chown_to(&path, self.run_as)
    }

    fn pg_ctl(&self, action: &str) -> Command {
        let mut cmd = server_command(&self.bin_dir.join("pg_ctl"), self.run_as);
        cmd.arg(action).arg("-D").arg(&self.data_dir).args([
            "-w",
            "-t",
            &READY_TIMEOUT_SECS.to_string(),
        ]);
        cmd
    }

    fn pg_ctl_start(&self) -> Result<(), LocalPgError> {
        let log_offset = self.log_len();
        let out = run(
            self.pg_ctl("start").arg("-l").arg(self.log_path()),
            "pg_ctl start",
        )?;
        if out.status.success() {
            self.wait_accepting()
        } else {
            Err(self.start_failure(&out, log_offset))
        }
    }

    /// Classifies a failed `pg_ctl start`/`restart` from its output and the log it appended.
    fn start_failure(&self, out: &Output, log_offset: u64) -> LocalPgError {
        let log = self.read_log_from(log_offset);
        if log.contains("could not create any TCP/IP sockets")
            || log.contains("Address already in use")
        {
            return LocalPgError::PortInUse {
                port: self.port,
                attempts: 1,
                log: tail(&log),
            };
        }
        let pg_ctl_said = output_text(out);
        if pg_ctl_said.contains("did not start in time") {
            // pg_ctl gave up, but the postmaster may still come up later and hold the port and
            // data dir; kill it so a retry or Drop starts from a stopped cluster.
            let _ = self.stop_immediate();
            return LocalPgError::NotReady {
                secs: READY_TIMEOUT_SECS,
                log: tail(&log),
            };
        }
        LocalPgError::Start(format!("{} | log: {}", output_tail(out), tail(&log)))
    }

    /// `pg_ctl -w` returns once postmaster.pid says "ready"; also confirm the TCP listener
    /// because that, not the pid file, is what callers use.
    fn wait_accepting(&self) -> Result<(), LocalPgError> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let deadline = Instant::now() + Duration::from_secs(READY_TIMEOUT_SECS);
        loop {
            if TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(LocalPgError::NotReady {
                    secs: READY_TIMEOUT_SECS,
                    log: tail(&self.read_log_from(0)),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_path(&self) -> PathBuf {
        self.data_dir.join(LOG_FILE)
    }

    fn log_len(&self) -> u64 {
        fs::metadata(self.log_path()).map(|m| m.len()).unwrap_or(0)
    }

    fn read_log_from(&self, offset: u64) -> String {
        let mut bytes = Vec::new();
        let read = fs::File::open(self.log_path()).and_then(|mut f| {
            f.seek(SeekFrom::Start(offset))?;
            f.read_to_end(&mut bytes)
        });
        match read {
            Ok(_) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(e) => format!("(could not read {}: {e})", self.log_path().display()),
        }
    }

    /// Stops the server and deletes its directory, as dropping it does; a
    /// second call does nothing. For a cluster that is never dropped, such as
    /// one in a `static` shared by a test binary: call this at exit, or the
    /// detached postmaster outlives the process until the next start reaps it.
    pub fn shut_down(&self) {
        if self.data_dir.join("postmaster.pid").exists() {
            // A frozen server would hold the signal pg_ctl sends until thawed.
            let _ = self.thaw();
            match self.stop_immediate() {
                Ok(()) => {}
                Err(e) => {
                    tracing::warn!(dir = %self.root.display(), "stopping throwaway PostgreSQL: {e}")
                }
            }
        }
        if let Err(e) = fs::remove_dir_all(&self.root)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(dir = %self.root.display(), "removing throwaway PostgreSQL dir: {e}");
        }
    }
}

impl Drop for LocalPostgres {
    fn drop(&mut self) {
        self.shut_down();
    }
}

/// A command for a server binary: run as the server user if we are root, with no stdin and
/// with stdout/stderr captured for error messages.
fn server_command(program: &Path, run_as: Option<RunAs>) -> Command {
    let mut cmd = Command::new(program);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Our cwd may be unreadable for the postgres user (e.g. /root); all paths are absolute.
        .current_dir("/")
        // English messages: start_failure() recognises a taken port by the log text.
        .env("LC_ALL", "C")
        .env_remove("PGDATA");
    if let Some(user) = run_as {
        cmd.uid(user.uid).gid(user.gid);
    }
    cmd
}

fn run(cmd: &mut Command, what: &str) -> Result<Output, LocalPgError> {
    cmd.output().map_err(io_err(format!(
        "could not run {what} ({:?})",
        cmd.get_program()
    )))
}

/// Binds port 0 and releases it. Another process can grab the port before postgres binds it;
/// `start` detects that from the server log and retries on a new port.
fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

fn find_bin_dir() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if has_server_binaries(&dir) {
                return Some(dir);
            }
        }
    }
    highest_version_bin_dir(Path::new("/usr/lib/postgresql"))
}

fn has_server_binaries(dir: &Path) -> bool {
    ["pg_ctl", "initdb", "postgres"]
        .iter()
        .all(|name| is_executable(&dir.join(name)))
}

fn is_executable(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// `<base>/<version>/bin` with the highest version (numeric, so 10 beats 9.6) that holds the
/// server binaries.
fn highest_version_bin_dir(base: &Path) -> Option<PathBuf> {
    fs::read_dir(base)
        .ok()?
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let version = name
                .split('.')
                .map(|part| part.parse::<u32>().ok())
                .collect::<Option<Vec<u32>>>()?;
            let bin = entry.path().join("bin");
            has_server_binaries(&bin).then_some((version, bin))
        })
        .max_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, bin)| bin)
}

fn server_user() -> Result<Option<RunAs>, LocalPgError> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    lookup_user("postgres")
        .map(Some)
        .ok_or(LocalPgError::NoPostgresUser)
}

fn lookup_user(name: &str) -> Option<RunAs> {
    let name = CString::new(name).ok()?;
    // SAFETY: passwd is plain old data; all-zero is a valid (empty) value.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // getpwnam_r, not getpwnam: parallel tests start clusters concurrently, and getpwnam
    // returns a process-wide static buffer.
    // SAFETY: every pointer is valid for the call and buf.len() is its real size.
    let rc = unsafe {
        libc::getpwnam_r(
            name.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    (rc == 0 && !result.is_null()).then_some(RunAs {
        uid: pwd.pw_uid,
        gid: pwd.pw_gid,
    })
}

fn chown_to(path: &Path, run_as: Option<RunAs>) -> Result<(), LocalPgError> {
    match run_as {
        Some(user) => std::os::unix::fs::chown(path, Some(user.uid), Some(user.gid))
            .map_err(io_err(format!("could not chown {}", path.display()))),
        None => Ok(()),
    }
}

fn temp_base() -> PathBuf {
    let base = std::env::temp_dir();
    std::path::absolute(&base).unwrap_or(base)
}

/// Creates `energy-stream-pg-<pid>-<n>` (mode 0700, owned by the server user). The pid lets a
/// later run recognise directories whose owner died; the counter keeps parallel tests apart.
fn create_root(run_as: Option<RunAs>) -> Result<PathBuf, LocalPgError> {
    let base = temp_base();
    let pid = std::process::id();
    let root = loop {
        let n = NEXT_DIR.fetch_add(1, Ordering::Relaxed);
        let dir = base.join(format!("{DIR_PREFIX}{pid}-{n}"));
        match fs::create_dir(&dir) {
            Ok(()) => break dir,
            // Left by an earlier process that had the same pid.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io_err(format!("could not create {}", dir.display()))(e)),
        }
    };
    fs::set_permissions(&root, fs::Permissions::from_mode(0o700))
        .map_err(io_err(format!("could not chmod {}", root.display())))?;
    if let Err(e) = chown_to(&root, run_as) {
        let _ = fs::remove_dir(&root);
        return Err(e);
    }
    Ok(root)
}

/// Drop does not run when a test binary aborts or is killed (timeout, SIGKILL, panic=abort),
/// and the postmaster is detached from us, so it would keep running. Each start stops and
/// deletes the clusters of processes that no longer exist.
fn reap_stale_clusters(bin_dir: &Path, run_as: Option<RunAs>) {
    let Ok(entries) = fs::read_dir(temp_base()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(owner) = name
            .to_str()
            .and_then(|n| n.strip_prefix(DIR_PREFIX))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        if owner <= 0 || owner as u32 == std::process::id() || process_exists(owner) {
            continue;
        }
        let root = entry.path();
        let data_dir = root.join("data");
        if data_dir.join("postmaster.pid").exists() {
            let _ = signal_cluster(&data_dir, libc::SIGCONT);
            let _ = server_command(&bin_dir.join("pg_ctl"), run_as)
                .arg("stop")
                .arg("-D")
                .arg(&data_dir)
                .args(["-m", "immediate", "-w", "-t", "10"])
                .output();
        }
        if fs::remove_dir_all(&root).is_ok() {
            tracing::info!(dir = %root.display(), pid = owner, "removed throwaway PostgreSQL cluster left by an exited process");
        }
    }
}

/// Signals the postmaster of the cluster in `data_dir` first (so that it forks
/// nothing meanwhile), then each of its children.
fn signal_cluster(data_dir: &Path, signal: libc::c_int) -> Result<(), LocalPgError> {
    let pid_file = data_dir.join("postmaster.pid");
    let postmaster: libc::pid_t = fs::read_to_string(&pid_file)
        .map_err(io_err(format!("cannot read {}", pid_file.display())))?
        .lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .ok_or_else(|| LocalPgError::Stop(format!("no pid in {}", pid_file.display())))?;
    let mut pids = vec![postmaster];
    for entry in fs::read_dir("/proc").map_err(io_err("cannot list /proc"))? {
        let Some(pid) = entry
            .ok()
            .and_then(|e| e.file_name().to_str()?.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        // The parent is the second field: after the state.
        let parent = stat_fields(pid).and_then(|f| f.split_whitespace().nth(1)?.parse().ok());
        if parent == Some(postmaster) {
            pids.push(pid);
        }
    }
    for pid in pids {
        // SAFETY: kill(2) with a pid and a signal number has no memory effects.
        if unsafe { libc::kill(pid, signal) } != 0 {
            let e = io::Error::last_os_error();
            // A child that exited meanwhile is fine; the postmaster is not.
            if pid == postmaster || e.raw_os_error() != Some(libc::ESRCH) {
                return Err(io_err(format!("cannot signal postgres process {pid}"))(e));
            }
        }
    }
    Ok(())
}

/// The fields of `/proc/<pid>/stat` after the command name, starting with the
/// state; None once the process is gone. The name is in parentheses and may
/// hold spaces and ')' itself, so it ends at the last ')'.
fn stat_fields(pid: libc::pid_t) -> Option<String> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(stat[stat.rfind(')')? + 1..].to_string())
}

fn process_exists(pid: libc::pid_t) -> bool {
    // SAFETY: signal 0 sends nothing; it only checks that the process exists.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

fn conf_escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('\'', "''")
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn output_text(out: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// stderr carries the error; stdout is progress chatter, used only when stderr is empty.
fn output_tail(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stderr.trim().is_empty() {
        tail(&String::from_utf8_lossy(&out.stdout))
    } else {
        tail(&stderr)
    }
}

/// The last non-empty lines of `text` on one line, so errors stay one-line.
fn tail(text: &str) -> String {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    if lines.is_empty() {
        return "(no output)".to_owned();
    }
    lines[lines.len().saturating_sub(TAIL_LINES)..].join(" | ")
}

#[cfg(test)]
mod tests {
    //! These need the PostgreSQL server binaries; without them they fail with
    //! LocalPgError::BinariesNotFound's install hint rather than skip.
    //!
    //! LocalPostgres blocks; calling it inside #[tokio::test] (a current-thread runtime) is fine
    //! because nothing else needs that thread meanwhile.

    use super::*;
    use tokio_postgres::{Client, NoTls};

    fn start() -> LocalPostgres {
        LocalPostgres::start().unwrap_or_else(|e| panic!("{e}"))
    }

    async fn connect(url: &str) -> Result<Client, tokio_postgres::Error> {
        let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(client)
    }

    async fn count(pg: &LocalPostgres) -> i64 {
        let client = connect(&pg.url()).await.expect("connect");
        client
            .query_one("SELECT count(*) FROM kept", &[])
            .await
            .expect("count")
            .get(0)
    }

    #[tokio::test]
    async fn starts_accepts_connections_and_creates_databases() {
        let pg = start();
        assert_eq!(
            pg.url(),
            format!("postgres://postgres@127.0.0.1:{}/postgres", pg.port())
        );
        assert!(pg.data_dir().join("PG_VERSION").is_file());

        let client = connect(&pg.url()).await.expect("connect to url()");
        let one: i32 = client.query_one("SELECT 1", &[]).await.unwrap().get(0);
        assert_eq!(one, 1);
        for (setting, want) in [
            ("fsync", "off"),
            ("synchronous_commit", "on"),
            ("max_connections", "200"),
            ("shared_buffers", "128MB"),
        ] {
            let row = client
                .query_one(&format!("SHOW {setting}"), &[])
                .await
                .unwrap();
            assert_eq!(row.get::<_, String>(0), want, "{setting}");
        }

        client
            .batch_execute("CREATE DATABASE localpg_test")
            .await
            .unwrap();
        let other = connect(&pg.url_for("localpg_test"))
            .await
            .expect("connect to url_for()");
        let name: String = other
            .query_one("SELECT current_database()", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(name, "localpg_test");
    }

    #[tokio::test]
    async fn committed_data_survives_immediate_stop_and_restart() {
        let pg = start();
        let port = pg.port();
        let client = connect(&pg.url()).await.unwrap();
        client
            .batch_execute("CREATE TABLE kept (id int); INSERT INTO kept VALUES (1);")
            .await
            .unwrap();
        drop(client);

        pg.stop_immediate().unwrap();
        assert!(
            connect(&pg.url()).await.is_err(),
            "server still accepts connections after stop_immediate"
        );

        pg.start_again().unwrap();
        assert_eq!(pg.port(), port);
        assert_eq!(count(&pg).await, 1);

        let client = connect(&pg.url()).await.unwrap();
        client
            .batch_execute("INSERT INTO kept VALUES (2)")
            .await
            .unwrap();
        pg.restart_immediate().unwrap();
        assert_eq!(count(&pg).await, 2);
    }

    #[test]
    fn drop_stops_the_server_and_removes_the_dir() {
        let pg = start();
        let data_dir = pg.data_dir().to_path_buf();
        let root = data_dir.parent().unwrap().to_path_buf();
        let pid_file = fs::read_to_string(data_dir.join("postmaster.pid")).unwrap();
        let postmaster: libc::pid_t = pid_file.lines().next().unwrap().trim().parse().unwrap();

        drop(pg);
        assert!(!data_dir.exists(), "{} still exists", data_dir.display());
        assert!(!root.exists(), "{} still exists", root.display());
        // pg_ctl returns once postmaster.pid is unlinked, a moment before the postmaster exits,
        // and then it lingers as a zombie until init reaps it.
        let deadline = Instant::now() + Duration::from_secs(10);
        while process_exists(postmaster) && !is_zombie(postmaster) {
            assert!(
                Instant::now() < deadline,
                "postmaster {postmaster} still runs"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn is_zombie(pid: libc::pid_t) -> bool {
        stat_fields(pid).is_some_and(|f| f.trim_start().starts_with('Z'))
    }

    #[test]
    fn start_moves_to_another_port_when_the_chosen_one_is_taken() {
        let squatter = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let taken = squatter.local_addr().unwrap().port();

        let mut offered = vec![free_port().unwrap(), taken];
        let pg = LocalPostgres::start_with_ports(|| Ok(offered.pop().unwrap()))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_ne!(pg.port(), taken);
        assert!(TcpStream::connect((Ipv4Addr::LOCALHOST, pg.port())).is_ok());
        drop(pg);

        match LocalPostgres::start_with_ports(|| Ok(taken)) {
            Err(LocalPgError::PortInUse { port, attempts, .. }) => {
                assert_eq!((port, attempts), (taken, START_ATTEMPTS));
            }
            other => panic!("expected PortInUse, got {other:?}"),
        }
    }

    #[test]
    fn picks_the_highest_installed_version() {
        let base = temp_base().join(format!(
            "energy-stream-localpg-versions-{}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&base);
        for (version, binaries) in [
            ("9.6", &["pg_ctl", "initdb", "postgres"][..]),
            ("15", &["pg_ctl", "initdb", "postgres"][..]),
            ("16", &["pg_ctl", "initdb"][..]),
            ("common", &["pg_ctl", "initdb", "postgres"][..]),
        ] {
            let bin = base.join(version).join("bin");
            fs::create_dir_all(&bin).unwrap();
            for name in binaries {
                fs::write(bin.join(name), "").unwrap();
                fs::set_permissions(bin.join(name), fs::Permissions::from_mode(0o755)).unwrap();
            }
        }
        let found = highest_version_bin_dir(&base);
        fs::remove_dir_all(&base).unwrap();
        assert_eq!(found, Some(base.join("15").join("bin")));
    }

    #[test]
    fn url_for_encodes_the_database_name() {
        let pg = LocalPostgres {
            root: PathBuf::from("/nonexistent-localpg-root"),
            data_dir: PathBuf::from("/nonexistent-localpg-root/data"),
            bin_dir: PathBuf::new(),
            run_as: None,
            port: 5433,
        };
        assert_eq!(
            pg.url_for("my db/x"),
            "postgres://postgres@127.0.0.1:5433/my%20db%2Fx"
        );
    }
}
