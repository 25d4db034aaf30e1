//! `pgmtls demo`: from nothing to a psql session through pgmtls in one command. It starts a
//! throwaway PostgreSQL (or uses `--upstream`), enables mTLS for a database `demo` with the
//! real CLI commands, allowlists this machine, downloads a client certificate, runs the proxy
//! with its admin endpoint, and prints what to type next. Ctrl-C stops everything and removes
//! every file it made. `--replicas N` runs the same database as a fleet on this machine
//! instead ([`fleet`]).

mod fleet;
pub mod postgres;

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use clap::Args;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::signal::unix::{signal, SignalKind};

const DB: &str = "demo";
const PREFIX: &str = "demo_";

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Use this PostgreSQL (HOST:PORT) instead of starting a throwaway one.
    #[arg(long, value_name = "HOST:PORT")]
    pub upstream: Option<String>,
    /// Role the printed psql line connects as.
    #[arg(long, default_value = "postgres")]
    pub pg_user: String,
    /// Database the printed psql line connects to.
    #[arg(long, default_value = "postgres")]
    pub pg_database: String,
    /// Run N replicas on etcd behind HAProxy (round robin, PROXY v2) instead of one proxy on a
    /// state directory; 1 is the single-node demo.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u8).range(1..=fleet::MAX_REPLICAS))]
    pub replicas: u8,
}

pub fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    if args.replicas > 1 {
        rt.block_on(fleet::demo(args))?;
    } else {
        rt.block_on(demo(args))?;
    }
    Ok(ExitCode::SUCCESS)
}

async fn demo(args: DemoArgs) -> anyhow::Result<()> {
    // Signals first, so a Ctrl-C during set-up still cleans up.
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let exe = std::env::current_exe().context("cannot find the pgmtls binary")?;
    let work = tempfile::Builder::new()
        .prefix("pgmtls-demo.")
        .tempdir()
        .context("cannot create a temporary directory")?;
    // The postgres user (when we are root) must be able to reach its data directory inside.
    std::fs::set_permissions(
        work.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o711),
    )?;
    say!("pgmtls demo: working in {}", work.path().display());

    let listen = format!("127.0.0.1:{}", free_port()?);
    let setup = set_up_database(&exe, work.path(), &args, &listen)?;
    let Setup {
        local_pg,
        state_arg,
        client_dir,
        cert_id,
    } = setup;

    let config = work.path().join("pgmtls.yaml");
    std::fs::write(
        &config,
        "state_dir: state\nadmin_listen: 127.0.0.1:0\nshutdown_grace: 5s\n",
    )?;
    let mut proxy = tokio::process::Command::new(&exe)
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("cannot start pgmtls serve")?;
    let stdout = proxy.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let mut lines = BufReader::new(stdout).lines();
    let (mut proxy_addr, mut admin_addr) = (None::<String>, None::<String>);
    while let Some(line) = lines.next_line().await? {
        if let Some(rest) = line.strip_prefix("pgmtls: listening database=demo addr=") {
            proxy_addr = Some(rest.to_owned());
        } else if let Some(rest) = line.strip_prefix("pgmtls: admin addr=") {
            admin_addr = Some(rest.to_owned());
        } else if line == "pgmtls: ready" {
            break;
        }
    }
    let (Some(proxy_addr), Some(admin_addr)) = (proxy_addr, admin_addr) else {
        bail!("pgmtls serve stopped before it was ready");
    };
    let (host, port) = proxy_addr
        .rsplit_once(':')
        .ok_or_else(|| anyhow!("bad listen address {proxy_addr}"))?;
    print_next_steps(
        &exe,
        &args,
        host,
        port,
        &client_dir,
        &admin_addr,
        &state_arg,
        &cert_id,
    );

    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
        status = proxy.wait() => say!("pgmtls demo: the proxy exited ({status:?})"),
    }
    say!("pgmtls demo: stopping");
    stop_child(&mut proxy).await;
    drop(local_pg);
    let dir = work.path().to_path_buf();
    work.close().context("cannot remove the demo directory")?;
    say!("pgmtls demo: stopped and removed {}", dir.display());
    Ok(())
}

/// What the database set-up made: the throwaway server (stopped when dropped), the state
/// directory, the client's files and the id of its certificate.
struct Setup {
    local_pg: Option<LocalPostgres>,
    state_arg: String,
    client_dir: PathBuf,
    cert_id: String,
}

/// The throwaway PostgreSQL (unless `--upstream`), then the database `demo` with the real CLI
/// commands: mTLS on `listen`, a rule for this machine, a client certificate downloaded.
fn set_up_database(
    exe: &Path,
    work: &Path,
    args: &DemoArgs,
    listen: &str,
) -> anyhow::Result<Setup> {
    let mut local_pg = None;
    let upstream = match &args.upstream {
        Some(u) => u.clone(),
        None => {
            let pg = LocalPostgres::start(&work.join("pg")).map_err(|e| {
                anyhow!(
                    "{e}\nOr point the demo at a running server: pgmtls demo --upstream HOST:PORT"
                )
            })?;
            let addr = format!("unix:{}", pg.socket_path().display());
            say!(
                "pgmtls demo: started PostgreSQL on {addr}, reachable only through pgmtls \
                 (data in {})",
                pg.dir.display()
            );
            local_pg = Some(pg);
            addr
        }
    };

    let state = work.join("state");
    let client_dir = work.join("client");
    let state_arg = state.to_string_lossy().into_owned();
    let cli = |a: &[&str]| run_cli(exe, a, &state_arg);
    cli(&[
        "mtls",
        "create",
        DB,
        "--listen",
        listen,
        "--upstream",
        &upstream,
        "--confirm",
        DB,
    ])?;
    cli(&[
        "ip-rules",
        "create",
        DB,
        "--cidr",
        "127.0.0.1/32",
        "--description",
        "this machine (demo)",
    ])?;
    let certs: serde_json::Value = serde_json::from_str(&cli(&["certificates", DB, "--json"])?)
        .context("certificates --json")?;
    let cert_id = certs
        .get(0)
        .and_then(|c| c["id"].as_str())
        .ok_or_else(|| anyhow!("mtls create made no client certificate"))?
        .to_owned();
    let dir_arg = client_dir.to_string_lossy().into_owned();
    cli(&[
        "certificates",
        "download",
        DB,
        "--id",
        &cert_id,
        "--prefix",
        PREFIX,
        "--dir",
        &dir_arg,
    ])?;

    Ok(Setup {
        local_pg,
        state_arg,
        client_dir,
        cert_id,
    })
}

#[allow(clippy::too_many_arguments)]
fn print_next_steps(
    exe: &Path,
    args: &DemoArgs,
    host: &str,
    port: &str,
    client: &Path,
    admin: &str,
    state: &str,
    cert_id: &str,
) {
    let f = |name: &str| client.join(format!("{PREFIX}{name}")).display().to_string();
    let psql = format!(
        "psql \"host={host} port={port} user={} dbname={} sslmode=verify-ca sslcert={} sslkey={} sslrootcert={}\"",
        args.pg_user,
        args.pg_database,
        f("postgresql.crt"),
        f("postgresql.key"),
        f("root.crt"),
    );
    let env = format!(
        "PGMTLS_STATE_DIR={state} PGMTLS_ADMIN_URL=http://{admin} {}",
        exe.display()
    );
    say!(
        "\npgmtls demo is running. Connect through mutual TLS:\n\n  {psql}\n\n\
         Metrics: http://{admin}/metrics   Status: http://{admin}/status\n\n\
         Try next (another terminal):\n  \
         {env} mtls {DB}\n  \
         {env} ip-rules create {DB} --cidr 10.1.2.0/24 --description office\n  \
         {env} certificates revoke {DB} --id {cert_id}   # then run psql again: refused\n\n\
         Ctrl-C stops the demo and removes everything it created."
    );
}

/// Runs one CLI command of this same binary against the demo's state directory.
fn run_cli(exe: &Path, args: &[&str], state: &str) -> anyhow::Result<String> {
    let out = std::process::Command::new(exe)
        .args(args)
        .args(["--state-dir", state])
        .env_remove("PGMTLS_CONFIG")
        .env_remove("PGMTLS_ADMIN_URL")
        .output()
        .with_context(|| format!("cannot run pgmtls {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "pgmtls {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

async fn stop_child(child: &mut tokio::process::Child) {
    if let Some(pid) = child.id() {
        // SIGTERM lets the proxy drain; `kill` avoids unsafe FFI for one signal.
        let _ = tokio::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await;
    }
    if tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}

fn free_port() -> anyhow::Result<u16> {
    let l = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))?;
    Ok(l.local_addr()?.port())
}

/// A PostgreSQL cluster in a directory of the demo's, stopped when dropped.
struct LocalPostgres {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
}

impl LocalPostgres {
    fn start(dir: &Path) -> anyhow::Result<LocalPostgres> {
        let bin = postgres::find_bin_dir().map_err(|e| anyhow!(e))?;
        std::fs::create_dir_all(dir)?;
        if postgres::effective_uid() == Some(0) {
            let ok = std::process::Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir)
                .status()?
                .success();
            if !ok {
                bail!("cannot hand {} to the postgres user", dir.display());
            }
        }
        let data = dir.join("data");
        let out = postgres::server_command(&bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"])
            .output()?;
        if !out.status.success() {
            bail!(
                "initdb failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let port = free_port()?;
        // The server trusts whoever connects, so it must not be reachable by anyone but the
        // proxy: no TCP at all (on 127.0.0.1 every local user could log in as its superuser),
        // and a socket in a directory only its owner may enter.
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
        let conf = format!(
            "port = {port}\nlisten_addresses = ''\nunix_socket_directories = '{}'\n\
             unix_socket_permissions = 0700\n",
            dir.display()
        );
        let conf_path = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf_path)?;
        text.push_str(&conf);
        std::fs::write(&conf_path, text)?;
        let pg = LocalPostgres {
            dir: dir.to_path_buf(),
            bin,
            port,
        };
        let out = postgres::server_command(&pg.bin.join("pg_ctl"))
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(dir.join("postgres.log"))
            .args(["-w", "start"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()?;
        if !out.status.success() {
            let log = std::fs::read_to_string(dir.join("postgres.log")).unwrap_or_default();
            bail!(
                "PostgreSQL did not start: {}\n{log}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(pg)
    }
}

impl LocalPostgres {
    fn socket_path(&self) -> PathBuf {
        self.dir.join(format!(".s.PGSQL.{}", self.port))
    }

    /// The postmaster's PID: the first line of its `postmaster.pid`.
    fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.dir.join("data/postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }
}

impl Drop for LocalPostgres {
    fn drop(&mut self) {
        let _ = postgres::server_command(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "fast", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
