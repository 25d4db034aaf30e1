//! [`PgServer`]: a real, throwaway PostgreSQL for one test.
//!
//! Every server gets its own temp dir (data dir, unix socket dir, log), a
//! free TCP port on 127.0.0.1 and the default roles. It is stopped and its
//! directory removed on drop, also when the test panics.
//!
//! Start-up cost is kept low (~0.2-0.3 s per server) by running `initdb`
//! once and caching the result as a template under cargo's per-target temp
//! dir (`target/tmp`), shared by all test binaries; each server is then a
//! directory copy plus `pg_ctl -w start`. Server directories live on
//! `/dev/shm` when it is big enough (see [`scratch_dir`]).
//!
//! Usage: `if !pg_available_or_skip() { return; }` then `PgServer::start()`
//! or `PgServer::builder().ssl(..).hba(..).start()`. Starting blocks for a
//! moment; do it before spawning anything on the test's runtime.
//!
//! PostgreSQL refuses to run as root. When the tests run as root, the
//! server's files are chowned to `postgres` and the server binaries run via
//! `runuser -u postgres --`. Clients (`psql`, tokio-postgres) run as the
//! current user; they only need the socket or TCP port.

use std::collections::hash_map::DefaultHasher;
use std::fs;
use std::hash::{Hash, Hasher};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

use tempfile::TempDir;

use super::clients::free_port;
use super::pki::Role;

pub const SUPERUSER: &str = "postgres";
/// SCRAM-authenticated role; owns database [`APP_DB`].
pub const APP_USER: &str = "app";
pub const APP_PASSWORD: &str = "app-secret";
pub const APP_DB: &str = "app";
/// Role that `trust` lets in over TLS (and plain TCP) without a password.
pub const TRUST_USER: &str = "trustuser";
/// Role that PostgreSQL itself authenticates by client certificate (CN=bench).
pub const BENCH_USER: &str = "bench";

/// The pg_hba.conf every server gets unless the test overrides it.
/// First match wins, so the specific `hostssl` lines precede the catch-alls.
pub const DEFAULT_HBA: &str = "\
local all all trust
hostssl all trustuser 127.0.0.1/32 trust
hostssl all bench 127.0.0.1/32 cert
hostssl all app 127.0.0.1/32 scram-sha-256
host all app 127.0.0.1/32 scram-sha-256
host all all 127.0.0.1/32 trust
";

/// Bumped when the template's initdb options change, so stale caches are ignored.
const TEMPLATE_VERSION: u32 = 1;
/// Port collisions between picking and binding are rare; a few retries suffice.
const START_ATTEMPTS: usize = 5;

/// Call at the top of every test that needs PostgreSQL; `return` when false.
///
/// Returns false (and says so) when `PGMTLS_SKIP_PG_TESTS=1`; otherwise
/// panics with install instructions if PostgreSQL is missing, so CI can never
/// silently skip.
pub fn pg_available_or_skip() -> bool {
    if std::env::var("PGMTLS_SKIP_PG_TESTS").as_deref() == Ok("1") {
        eprintln!("skipping: PGMTLS_SKIP_PG_TESTS=1 is set and this test needs PostgreSQL");
        return false;
    }
    bin_dir();
    true
}

/// The PostgreSQL server binaries directory, found once per process.
///
/// Order: `$PGMTLS_PG_BINDIR`, `pg_config --bindir`, `initdb` on `PATH`
/// (symlinks resolved, so `psql`/`pg_ctl` are found next to it), newest
/// `/usr/lib/postgresql/*/bin`.
pub fn bin_dir() -> &'static Path {
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match DIR.get_or_init(find_bin_dir) {
        Ok(dir) => dir,
        Err(why) => panic!("{why}"),
    }
}

fn find_bin_dir() -> Result<PathBuf, String> {
    // The same discovery `pgmtls demo` uses, plus how to skip on a laptop without Postgres.
    pgmtls::demo::postgres::find_bin_dir().map_err(|e| {
        format!(
            "{e}\nOn a developer laptop without PostgreSQL, set PGMTLS_SKIP_PG_TESTS=1 to skip \
             the tests that need it."
        )
    })
}

/// Effective uid, read without `unsafe` (shared with `pgmtls demo`).
pub fn effective_uid() -> u32 {
    pgmtls::demo::postgres::effective_uid().unwrap_or(u32::MAX)
}

/// PostgreSQL refuses to start as root, so root runs it as `postgres`.
fn run_as_postgres_user() -> bool {
    effective_uid() == 0
}

/// A command for a server binary, as `postgres` when root (shared with `pgmtls demo`).
fn server_cmd(program: &Path) -> Command {
    pgmtls::demo::postgres::server_command(program)
}

/// Runs a command to completion, panicking only if it cannot be spawned.
fn output_of(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("failed to run {cmd:?}: {e}"))
}

fn describe(out: &Output) -> String {
    format!(
        "{}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs a command that must succeed.
fn run_ok(cmd: &mut Command) -> Output {
    let out = output_of(cmd);
    assert!(out.status.success(), "{cmd:?} failed: {}", describe(&out));
    out
}

/// Hands a tree to the postgres user (no-op when not root).
fn chown_to_postgres(path: &Path) {
    if run_as_postgres_user() {
        run_ok(
            Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(path),
        );
    }
}

/// `cp -a` keeps modes (PostgreSQL insists on a 0700 data dir) and owners.
fn copy_tree(from: &Path, to: &Path) {
    run_ok(Command::new("cp").arg("-a").arg(from).arg(to));
}

/// Names of libpq environment variables (PGHOST, PGSSLMODE, …) set in this
/// process. Child clients drop them so a developer's shell cannot change
/// what a test connects to.
pub fn libpq_env_vars() -> Vec<String> {
    std::env::vars()
        .map(|(k, _)| k)
        .filter(|k| k.starts_with("PG") && !k.starts_with("PGMTLS_"))
        .collect()
}

/// Where server directories go: `$PGMTLS_PG_TMPDIR`, else `/dev/shm` when it
/// is a tmpfs with at least 1 GiB free, else the system temp dir. On disk a
/// fresh data dir costs 0.2-0.3 s of copying (39 MB); on tmpfs 0.04 s, and
/// the server's own writes get cheaper too. The size check keeps us off the
/// 64 MB /dev/shm that Docker gives containers by default.
pub fn scratch_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(dir) = std::env::var_os("PGMTLS_PG_TMPDIR") {
            return PathBuf::from(dir);
        }
        let shm = Path::new("/dev/shm");
        if shm.is_dir() && available_kib(shm).is_some_and(|kib| kib >= 1024 * 1024) {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        }
    })
}

/// Free space via `df -Pk` (POSIX output: 4th column of the 2nd line), which
/// avoids an unsafe statvfs call.
fn available_kib(path: &Path) -> Option<u64> {
    let out = Command::new("df").arg("-Pk").arg(path).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    text.lines().nth(1)?.split_whitespace().nth(3)?.parse().ok()
}

/// A fresh directory under [`scratch_dir`]; 0700, removed on drop.
fn scratch_tempdir(prefix: &str) -> TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(scratch_dir())
        .unwrap_or_else(|e| panic!("create temp dir in {}: {e}", scratch_dir().display()))
}

/// The initdb output shared by every server, created once per PostgreSQL
/// version and uid (see module docs). initdb costs ~0.5 s; a copy ~0.05 s.
fn template_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let cache = template_cache_path();
        if !cache.join("PG_VERSION").is_file() {
            build_template(&cache);
        }
        cache
    })
}

/// Keyed by server version, binary location and uid (which decides file
/// ownership), so switching any of them never reuses a wrong template.
fn template_cache_path() -> PathBuf {
    let postgres = bin_dir().join("postgres");
    let version = run_ok(Command::new(&postgres).arg("--version")).stdout;
    let mut h = DefaultHasher::new();
    (bin_dir(), version, TEMPLATE_VERSION).hash(&mut h);
    // Cargo's target/tmp is cleaned by `cargo clean`; the fallback covers a
    // target dir this uid cannot write to.
    let root = option_env!("CARGO_TARGET_TMPDIR")
        .map(PathBuf::from)
        .filter(|d| tempfile::tempfile_in(d).is_ok())
        .unwrap_or_else(std::env::temp_dir);
    let uid = effective_uid();
    root.join(format!(
        "pg-template-v{TEMPLATE_VERSION}-uid{uid}-{:016x}",
        h.finish()
    ))
}

/// Runs initdb in the scratch dir (which the postgres user can always
/// reach, unlike e.g. a target dir under a private home), then publishes the
/// result with an atomic rename so concurrent test binaries never see a
/// half-written template.
fn build_template(cache: &Path) {
    let staging = scratch_tempdir("pgmtls-initdb-");
    chown_to_postgres(staging.path());
    let data = staging.path().join("data");
    run_ok(
        server_cmd(&bin_dir().join("initdb"))
            .args([
                "-A",
                "trust",
                "-U",
                SUPERUSER,
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
                "-D",
            ])
            .arg(&data),
    );
    let parent = cache.parent().expect("template path has a parent");
    fs::create_dir_all(parent).expect("create template cache dir");
    let partial = parent.join(format!(
        ".partial-{}-{}",
        std::process::id(),
        staging
            .path()
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("x")
    ));
    copy_tree(&data, &partial);
    if fs::rename(&partial, cache).is_err() {
        // Another test binary won the race; its template is just as good.
        let _ = fs::remove_dir_all(&partial);
        assert!(
            cache.join("PG_VERSION").is_file(),
            "no template at {}",
            cache.display()
        );
    }
}

/// TLS material PostgreSQL itself serves. Files are copied into the data dir
/// (PostgreSQL needs the key owned by its user with mode 0600).
#[derive(Debug, Clone)]
pub struct ServerTls {
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    /// When set, becomes `ssl_ca_file`: PostgreSQL then asks for client
    /// certs and verifies any that are sent (needed for `cert` auth).
    pub ca_path: Option<PathBuf>,
}

impl ServerTls {
    /// `server` is typically `pki.upstream_server`; `client_ca` the CA whose
    /// client certs PostgreSQL should accept (e.g. `pki.ca`).
    pub fn from_roles(server: &Role, client_ca: Option<&Role>) -> ServerTls {
        ServerTls {
            cert_path: server.cert_path.clone(),
            key_path: server.key_path.clone(),
            ca_path: client_ca.map(|ca| ca.cert_path.clone()),
        }
    }
}

/// Options for [`PgServer`]; finish with [`start`](Self::start).
#[derive(Debug, Clone)]
pub struct PgServerBuilder {
    ssl: Option<ServerTls>,
    hba: String,
    settings: Vec<(String, String)>,
}

impl PgServerBuilder {
    /// Turns on TLS in PostgreSQL (`ssl=on` and the file settings).
    pub fn ssl(mut self, tls: ServerTls) -> Self {
        self.ssl = Some(tls);
        self
    }

    /// Replaces the whole pg_hba.conf (default: [`DEFAULT_HBA`]).
    pub fn hba(mut self, content: &str) -> Self {
        self.hba = content.to_string();
        self
    }

    /// Any postgresql.conf setting; later calls win.
    pub fn setting(mut self, name: &str, value: &str) -> Self {
        self.settings.push((name.to_string(), value.to_string()));
        self
    }

    /// Creates, starts and provisions the server (blocking, ~0.2 s).
    pub fn start(self) -> PgServer {
        PgServer::launch(self)
    }
}

/// A running PostgreSQL; see the module docs.
pub struct PgServer {
    port: u16,
    data_dir: PathBuf,
    socket_dir: PathBuf,
    log_path: PathBuf,
    // Last, so the directory goes only after Drop::drop stopped the server.
    dir: TempDir,
}

impl PgServer {
    pub fn builder() -> PgServerBuilder {
        PgServerBuilder {
            ssl: None,
            hba: DEFAULT_HBA.to_string(),
            settings: Vec::new(),
        }
    }

    /// A server with default options: no TLS, [`DEFAULT_HBA`].
    pub fn start() -> PgServer {
        Self::builder().start()
    }

    fn launch(opts: PgServerBuilder) -> PgServer {
        let template = template_dir();
        let dir = scratch_tempdir("pgmtls-pg-");
        let data_dir = dir.path().join("data");
        let socket_dir = dir.path().join("sock");
        copy_tree(template, &data_dir);
        fs::create_dir(&socket_dir).expect("create socket dir");
        let mut server = PgServer {
            port: 0,
            log_path: data_dir.join("server.log"),
            data_dir,
            socket_dir,
            dir,
        };
        server.write_config(&opts);
        chown_to_postgres(server.dir.path());
        server.start_on_free_port();
        server.create_default_roles();
        server
    }

    /// Settings go into postgresql.conf rather than `pg_ctl -o`, because
    /// pg_ctl hands `-o` to a shell and paths would need shell quoting.
    fn write_config(&self, opts: &PgServerBuilder) {
        let mut settings: Vec<(String, String)> = [
            ("listen_addresses", "127.0.0.1".to_string()),
            (
                "unix_socket_directories",
                self.socket_dir.display().to_string(),
            ),
            ("fsync", "off".into()),
            ("synchronous_commit", "off".into()),
            ("full_page_writes", "off".into()),
            ("max_connections", "300".into()),
            ("password_encryption", "scram-sha-256".into()),
            ("log_connections", "on".into()),
            ("log_line_prefix", "%m [%p] %q%u@%d ".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        if let Some(tls) = &opts.ssl {
            settings.extend(self.install_tls_files(tls));
        }
        settings.extend(opts.settings.iter().cloned());

        let mut conf = String::from("\n# pgmtls test harness\n");
        for (k, v) in settings {
            conf.push_str(&format!("{k} = '{}'\n", v.replace('\'', "''")));
        }
        let conf_path = self.data_dir.join("postgresql.conf");
        let mut base = fs::read_to_string(&conf_path).expect("read postgresql.conf");
        base.push_str(&conf);
        fs::write(&conf_path, base).expect("write postgresql.conf");
        fs::write(self.data_dir.join("pg_hba.conf"), &opts.hba).expect("write pg_hba.conf");
    }

    /// Copies cert/key/CA into the data dir and returns the matching settings.
    /// The chown of the whole tree happens afterwards.
    fn install_tls_files(&self, tls: &ServerTls) -> Vec<(String, String)> {
        let copy = |from: &Path, name: &str| -> String {
            fs::copy(from, self.data_dir.join(name))
                .unwrap_or_else(|e| panic!("copy {} into data dir: {e}", from.display()));
            name.to_string()
        };
        let mut s = vec![
            ("ssl".to_string(), "on".to_string()),
            (
                "ssl_cert_file".to_string(),
                copy(&tls.cert_path, "server.crt"),
            ),
        ];
        let key = fs::read_to_string(&tls.key_path).expect("read server key");
        super::pki::write_private(&self.data_dir.join("server.key"), &key);
        s.push(("ssl_key_file".to_string(), "server.key".to_string()));
        if let Some(ca) = &tls.ca_path {
            s.push(("ssl_ca_file".to_string(), copy(ca, "root.crt")));
        }
        s
    }

    /// Retries on a fresh port only when the log shows a bind failure: the
    /// port picked by [`free_port`] can be taken before postgres binds it.
    fn start_on_free_port(&mut self) {
        for _ in 0..START_ATTEMPTS {
            self.port = free_port();
            let log_before = self.log_len();
            let out = self.pg_ctl_start();
            if out.status.success() {
                return;
            }
            let log = self.log_since(log_before);
            if !(log.contains("could not bind") || log.contains("Address already in use")) {
                panic!(
                    "PostgreSQL failed to start: {}\nserver log:\n{log}",
                    describe(&out)
                );
            }
        }
        panic!(
            "PostgreSQL could not bind a port in {START_ATTEMPTS} attempts:\n{}",
            self.log_tail(30)
        );
    }

    /// `-w` makes pg_ctl return only once the server accepts connections:
    /// that is the readiness signal, the harness never polls or sleeps.
    /// `-l` also detaches the postmaster's
    /// stdout/stderr from our pipes (otherwise `output()` would never return).
    fn pg_ctl_start(&self) -> Output {
        output_of(
            server_cmd(&bin_dir().join("pg_ctl"))
                .args(["-w", "-t", "60", "-D"])
                .arg(&self.data_dir)
                .arg("-l")
                .arg(&self.log_path)
                .args(["-o", &format!("-p {}", self.port), "start"]),
        )
    }

    /// Creates roles `app` (SCRAM password), `trustuser`, `bench` and database
    /// `app` owned by `app`, which [`DEFAULT_HBA`] refers to. Each `-c`
    /// runs separately because CREATE DATABASE refuses to run inside the
    /// implicit transaction of a multi-statement string. PostgreSQL 15 took
    /// CREATE on schema public away from non-owners; granting it back lets
    /// e.g. `pgbench -i` run as `bench` in database `app`.
    fn create_default_roles(&self) {
        let role_sql = format!(
            "SET password_encryption = 'scram-sha-256'; \
             CREATE ROLE {APP_USER} LOGIN PASSWORD '{APP_PASSWORD}'; \
             CREATE ROLE {TRUST_USER} LOGIN; CREATE ROLE {BENCH_USER} LOGIN"
        );
        let db_sql = format!("CREATE DATABASE {APP_DB} OWNER {APP_USER}");
        let connect = format!("\\connect {APP_DB}");
        self.superuser_psql(&[
            &role_sql,
            &db_sql,
            &connect,
            "GRANT CREATE ON SCHEMA public TO PUBLIC",
        ]);
    }

    /// Runs SQL as the superuser over the unix socket (database `postgres`)
    /// and returns trimmed unaligned tuples-only output. Panics on SQL errors.
    pub fn superuser_exec(&self, sql: &str) -> String {
        self.superuser_psql(&[sql])
    }

    /// Like [`superuser_exec`](Self::superuser_exec) in another database.
    pub fn superuser_exec_in(&self, db: &str, sql: &str) -> String {
        let connect = format!("\\connect {db}");
        self.superuser_psql(&[&connect, sql])
    }

    /// Each element is a separate `-c` (SQL or a psql meta-command).
    fn superuser_psql(&self, commands: &[&str]) -> String {
        let mut cmd = Command::new(self.psql_path());
        cmd.args(["-X", "-A", "-t", "-q", "-w", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(&self.socket_dir)
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                SUPERUSER,
                "-d",
                "postgres",
            ])
            .stdin(Stdio::null());
        for var in libpq_env_vars() {
            cmd.env_remove(var);
        }
        for c in commands {
            cmd.arg("-c").arg(c);
        }
        let out = run_ok(&mut cmd);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// TCP address (the server listens on 127.0.0.1 only).
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    pub fn bin_dir(&self) -> &Path {
        bin_dir()
    }

    /// The `psql` matching this server (not Debian's /usr/bin wrapper).
    pub fn psql_path(&self) -> PathBuf {
        bin_dir().join("psql")
    }

    pub fn pgbench_path(&self) -> PathBuf {
        bin_dir().join("pgbench")
    }

    /// Directory of the unix socket, usable as libpq `host=`.
    pub fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Whole server log so far, e.g. to assert on connection/auth messages.
    pub fn log_contents(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Last `n` lines of the server log.
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log_contents();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    fn log_len(&self) -> usize {
        self.log_contents().len()
    }

    fn log_since(&self, offset: usize) -> String {
        self.log_contents()
            .get(offset..)
            .unwrap_or_default()
            .to_string()
    }

    /// Fast shutdown (waits for it); the directory stays until drop.
    /// Use to test behaviour when the upstream goes away.
    pub fn stop(&mut self) {
        run_ok(
            server_cmd(&bin_dir().join("pg_ctl"))
                .args(["-w", "-m", "fast", "-D"])
                .arg(&self.data_dir)
                .arg("stop"),
        );
    }

    /// `pg_ctl stop -m immediate`: the postmaster SIGQUITs every backend, which exit without
    /// finishing their statements, as a crash would; the next start runs crash recovery.
    /// Use to test behaviour when the upstream dies mid-query.
    pub fn stop_immediate(&mut self) {
        run_ok(
            server_cmd(&bin_dir().join("pg_ctl"))
                .args(["-w", "-m", "immediate", "-D"])
                .arg(&self.data_dir)
                .arg("stop"),
        );
    }

    /// Starts a stopped server again on the same port (panics if taken).
    pub fn start_again(&mut self) {
        let out = self.pg_ctl_start();
        assert!(
            out.status.success(),
            "restart failed: {}\n{}",
            describe(&out),
            self.log_tail(30)
        );
    }

    /// Immediate stop if a postmaster is running; falls back to SIGKILL so a
    /// server never outlives its test. Never panics (runs inside Drop).
    fn kill_if_running(&self) {
        let pid_file = self.data_dir.join("postmaster.pid");
        if !pid_file.exists() {
            return;
        }
        let stopped = server_cmd(&bin_dir().join("pg_ctl"))
            .args(["-w", "-m", "immediate", "-D"])
            .arg(&self.data_dir)
            .arg("stop")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if stopped {
            return;
        }
        let pid = fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.lines().next().map(str::to_string));
        if let Some(pid) = pid {
            eprintln!("pg_ctl stop failed; sending SIGKILL to postmaster {pid}");
            let _ = Command::new("kill").args(["-KILL", &pid]).status();
        }
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- PostgreSQL log (port {}), last 40 lines ---\n{}\n--- end of log ---",
                self.port,
                self.log_tail(40)
            );
        }
        self.kill_if_running();
        // `dir` (a TempDir) is dropped after this and removes everything.
    }
}
