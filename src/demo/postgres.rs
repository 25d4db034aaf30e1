//! Finding and running a local PostgreSQL installation: shared by `pgmtls demo` and the test
//! harness, so both find the same binaries and say the same thing when there are none.

use std::path::{Path, PathBuf};
use std::process::Command;

/// What to do when no PostgreSQL server binaries are found.
pub const INSTALL_HINT: &str = "Install PostgreSQL (Debian/Ubuntu: `apt-get install postgresql`) \
     or set PGMTLS_PG_BINDIR to the directory holding initdb, pg_ctl, postgres and psql.";

/// Directory of `initdb`, `pg_ctl`, `postgres` and `psql`. Order: `$PGMTLS_PG_BINDIR`,
/// `pg_config --bindir`, `initdb` on `PATH` (symlinks resolved, so its siblings are found), the
/// newest `/usr/lib/postgresql/*/bin`.
pub fn find_bin_dir() -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os("PGMTLS_PG_BINDIR") {
        let dir = PathBuf::from(dir);
        return if has_server_bins(&dir) {
            Ok(dir)
        } else {
            Err(format!(
                "PGMTLS_PG_BINDIR={} lacks initdb/pg_ctl/postgres/psql. {INSTALL_HINT}",
                dir.display()
            ))
        };
    }
    [
        bin_dir_from_pg_config(),
        bin_dir_from_path(),
        newest_debian_bin_dir(),
    ]
    .into_iter()
    .flatten()
    .find(|d| has_server_bins(d))
    .ok_or_else(|| format!("PostgreSQL server binaries not found. {INSTALL_HINT}"))
}

/// Debian ships `pg_config` with libpq-dev even without a server, hence the caller's check.
fn bin_dir_from_pg_config() -> Option<PathBuf> {
    let out = Command::new("pg_config").arg("--bindir").output().ok()?;
    let dir = String::from_utf8(out.stdout).ok()?;
    out.status.success().then(|| PathBuf::from(dir.trim()))
}

fn bin_dir_from_path() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("initdb"))
        .find(|p| p.is_file())
        .and_then(|p| std::fs::canonicalize(p).ok())
        .and_then(|p| p.parent().map(Path::to_path_buf))
}

fn newest_debian_bin_dir() -> Option<PathBuf> {
    let version_key =
        |name: &str| -> Vec<u32> { name.split('.').map(|n| n.parse().unwrap_or(0)).collect() };
    std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .max_by_key(|name| version_key(name))
        .map(|v| Path::new("/usr/lib/postgresql").join(v).join("bin"))
}

pub fn has_server_bins(dir: &Path) -> bool {
    ["initdb", "pg_ctl", "postgres", "psql"]
        .iter()
        .all(|b| dir.join(b).is_file())
}

/// Effective uid without `unsafe`: the second field of `Uid:` in /proc/self/status.
pub fn effective_uid() -> Option<u32> {
    std::fs::read_to_string("/proc/self/status")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .and_then(|euid| euid.parse().ok())
}

/// PostgreSQL refuses to run as root; as root, its binaries run as the `postgres` user.
pub fn server_command(program: &Path) -> Command {
    let mut cmd = if effective_uid() == Some(0) {
        let mut c = Command::new(runuser());
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    };
    // The postgres user may not be allowed into the caller's directory.
    cmd.current_dir("/").stdin(std::process::Stdio::null());
    cmd
}

/// `runuser` lives in /usr/sbin, which a non-login root PATH may lack.
fn runuser() -> PathBuf {
    ["/usr/sbin/runuser", "/sbin/runuser", "/usr/bin/runuser"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("runuser"))
}
