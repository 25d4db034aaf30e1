//! `pgmtls demo --replicas N`: the fleet on one machine. A throwaway etcd (authentication on,
//! with the operator and replica roles of docs/etcd-roles.sh), the database `demo` made as the
//! single-node demo makes it and then imported into etcd, N replicas following that prefix and
//! forwarding cancels to each other over the peer channel, and HAProxy in front (round robin,
//! PROXY v2). Everything lives in the demo's temporary directory; Ctrl-C stops every process
//! it started, by PID, and removes the directory.

use std::fs::OpenOptions;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::{free_port, set_up_database, DemoArgs, Setup, DB, PREFIX};
use crate::cli::state::{EtcdArgs, ImportArgs, StateCmdArgs, StateCommand};
use crate::cli::StateArgs;
use crate::state::{write_atomic, PRIVATE_DIR_MODE, PRIVATE_MODE, PUBLIC_MODE};
use crate::store::etcd::{EtcdConfig, EtcdStore};

/// Replicas one machine runs for a demo; ids are 1..=N.
pub const MAX_REPLICAS: i64 = 16;
/// The etcd key prefix of the demo's installation.
const ETCD_PREFIX: &str = "/pgmtls";
const OPERATOR: &str = "pgmtls-operator";
const REPLICA: &str = "pgmtls-replica";
/// What to install when etcd or HAProxy is missing.
const INSTALL_HINT: &str = "`pgmtls demo --replicas N` runs a throwaway etcd and HAProxy: \
     install them (Debian/Ubuntu: `apt-get install etcd-server haproxy`), or run the \
     single-node demo without --replicas";
/// How long one process may take to say it is ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a process may take to stop after SIGTERM before it gets SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// A program the fleet demo runs: `$ENV` when set, else `name` on `PATH`, else in the sbin
/// directories a non-login PATH may lack (Debian installs HAProxy in /usr/sbin).
fn find_program(env: &str, name: &str) -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(anyhow!(
                "{env}={} is not a file. {INSTALL_HINT}",
                p.display()
            ))
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| anyhow!("{name} not found on PATH (or {env}). {INSTALL_HINT}"))
}

/// One process the demo started. Its exit is reported on the demo's channel by a task that
/// owns the child (and kills it, with `kill_on_drop`, if the demo itself fails).
struct Proc {
    name: String,
    pid: u32,
    /// Stopped in descending stage order: the balancer, then the replicas, then etcd.
    stage: u8,
    waiter: JoinHandle<()>,
}

struct Procs {
    list: Vec<Proc>,
    /// Where each waiter reports its process' exit; the demo stops when one comes early.
    exits: mpsc::UnboundedSender<String>,
}

impl Procs {
    fn adopt(
        &mut self,
        name: &str,
        stage: u8,
        mut child: tokio::process::Child,
    ) -> anyhow::Result<u32> {
        let pid = child
            .id()
            .ok_or_else(|| anyhow!("{name} exited as it started"))?;
        let exits = self.exits.clone();
        let label = name.to_owned();
        let waiter = tokio::spawn(async move {
            let status = child.wait().await;
            // Nobody listens once the demo is stopping; that is fine.
            let _ = exits.send(format!("{label} exited ({})", describe(status)));
        });
        self.list.push(Proc {
            name: name.to_owned(),
            pid,
            stage,
            waiter,
        });
        Ok(pid)
    }

    /// SIGTERM to each stage's processes at once, then their exit awaited (SIGKILL after
    /// [`STOP_TIMEOUT`]).
    async fn stop_all(&mut self) {
        let mut stages: Vec<u8> = self.list.iter().map(|p| p.stage).collect();
        stages.sort_unstable();
        stages.dedup();
        for stage in stages.into_iter().rev() {
            let (now, rest): (Vec<Proc>, Vec<Proc>) = std::mem::take(&mut self.list)
                .into_iter()
                .partition(|p| p.stage == stage);
            self.list = rest;
            for p in &now {
                // A process already reaped must not be signalled: its PID may be reused.
                if !p.waiter.is_finished() {
                    signal_pid("TERM", p.pid).await;
                }
            }
            for mut p in now {
                if tokio::time::timeout(STOP_TIMEOUT, &mut p.waiter)
                    .await
                    .is_err()
                {
                    say!("pgmtls demo: {} did not stop in time; killing it", p.name);
                    signal_pid("KILL", p.pid).await;
                    let _ = p.waiter.await;
                }
            }
        }
    }

    fn pid_list(&self) -> String {
        self.list
            .iter()
            .map(|p| format!("{}={}", p.name, p.pid))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

fn describe(status: std::io::Result<ExitStatus>) -> String {
    match status {
        Ok(s) => s.to_string(),
        Err(e) => e.to_string(),
    }
}

/// `kill -SIG PID`: avoids unsafe FFI for one signal, as the single-node demo does.
async fn signal_pid(sig: &str, pid: u32) {
    let _ = tokio::process::Command::new("kill")
        .args([format!("-{sig}"), pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await;
}

/// A private file (0600) for a process' log.
fn log_file(path: &Path) -> anyhow::Result<std::fs::File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(PRIVATE_MODE)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))
}

/// [`write_atomic`], with the path in the error.
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    write_atomic(path, bytes, mode).with_context(|| format!("cannot write {}", path.display()))
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

pub async fn demo(args: DemoArgs) -> anyhow::Result<()> {
    // Signals first, so a Ctrl-C during set-up still cleans up.
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let exe = std::env::current_exe().context("cannot find the pgmtls binary")?;
    // Before anything starts: a missing program is the likeliest failure.
    let etcd_bin = find_program("PGMTLS_ETCD_BIN", "etcd")?;
    let haproxy_bin = find_program("PGMTLS_HAPROXY_BIN", "haproxy")?;
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

    let (tx, mut exits) = mpsc::unbounded_channel();
    let mut procs = Procs {
        list: Vec::new(),
        exits: tx,
    };
    let mut local_pg = None;
    let started = start(
        &exe,
        &etcd_bin,
        &haproxy_bin,
        work.path(),
        &args,
        &mut procs,
        &mut local_pg,
    )
    .await;
    if started.is_ok() {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
            Some(what) = exits.recv() => say!("pgmtls demo: {what}"),
        }
    }
    say!("pgmtls demo: stopping");
    procs.stop_all().await;
    drop(local_pg);
    let dir = work.path().to_path_buf();
    let closed = work.close();
    started?;
    closed.context("cannot remove the demo directory")?;
    say!("pgmtls demo: stopped and removed {}", dir.display());
    Ok(())
}

/// Everything up to the printed next steps. What it started is in `procs` and `local_pg`, so
/// the caller stops it whether this succeeds or not.
async fn start(
    exe: &Path,
    etcd_bin: &Path,
    haproxy_bin: &Path,
    work: &Path,
    args: &DemoArgs,
    procs: &mut Procs,
    local_pg: &mut Option<super::LocalPostgres>,
) -> anyhow::Result<()> {
    let n = args.replicas;
    // Port 0: each replica binds a port of its own for the same database.
    let setup = set_up_database(exe, work, args, "127.0.0.1:0")?;
    let Setup {
        local_pg: pg,
        state_arg,
        client_dir,
        cert_id,
    } = setup;
    *local_pg = pg;

    let endpoint = start_etcd(etcd_bin, work, procs).await?;
    let secrets = work.join("secrets");
    std::fs::DirBuilder::new()
        .mode(PRIVATE_DIR_MODE)
        .create(&secrets)
        .with_context(|| format!("cannot create {}", secrets.display()))?;
    let (operator_pw, replica_pw) = (
        secrets.join("etcd-operator.password"),
        secrets.join("etcd-replica.password"),
    );
    enable_auth(&endpoint, &operator_pw, &replica_pw).await?;
    say!(
        "pgmtls demo: started etcd on {endpoint} (authentication on: users {OPERATOR} and \
         {REPLICA}, passwords in {})",
        secrets.display()
    );

    import_state(&state_arg, &endpoint, &operator_pw)?;
    // etcd holds the state now; a second copy would only invite edits nobody serves.
    std::fs::remove_dir_all(&state_arg).with_context(|| format!("cannot remove {state_arg}"))?;
    say!("pgmtls demo: moved the state into etcd prefix {ETCD_PREFIX} (pgmtls state import)");

    let peer_dir = work.join("peer");
    write_peer_pki(&peer_dir, n)?;
    let peer_ports = (0..n)
        .map(|_| free_port())
        .collect::<anyhow::Result<Vec<u16>>>()?;
    let mut replicas = Vec::new();
    for id in 1..=n {
        let config = work.join(format!("replica-{id}.yaml"));
        std::fs::write(&config, replica_config(&endpoint, id, &peer_ports))
            .with_context(|| format!("cannot write {}", config.display()))?;
        let r = start_replica(exe, work, id, &config, procs).await?;
        say!(
            "pgmtls demo: replica {id} listening on {}, admin http://{}, peer channel \
             127.0.0.1:{}, log {}",
            r.listen,
            r.admin,
            peer_ports[usize::from(id - 1)],
            r.log.display()
        );
        replicas.push(r);
    }

    let operator = work.join("pgmtls.yaml");
    std::fs::write(
        &operator,
        format!(
            "# The operator's pgmtls.yaml: with PGMTLS_CONFIG set to this file the CLI (pgmtls \
             fleet,\n# certificates, ip-rules, mtls) reads and changes the etcd prefix the \
             replicas follow.\n\
             etcd:\n  endpoints: [{endpoint}]\n  prefix: {ETCD_PREFIX}\n  user: {OPERATOR}\n  \
             password_file: secrets/etcd-operator.password\n\
             # The status words (Authorized, revoked, ...) come from the replica registry.\n"
        ),
    )
    .with_context(|| format!("cannot write {}", operator.display()))?;
    wait_registered(&endpoint, &operator_pw, n).await?;

    let listens: Vec<String> = replicas.iter().map(|r| r.listen.clone()).collect();
    let lb_port = start_haproxy(haproxy_bin, work, &listens, procs).await?;
    say!(
        "pgmtls demo: HAProxy on 127.0.0.1:{lb_port}: round robin over the {n} replicas, a \
         PROXY v2 header on each connection (log {})",
        work.join("haproxy.log").display()
    );
    let mut pids = procs.pid_list();
    if let Some(pid) = local_pg.as_ref().and_then(|pg| pg.pid()) {
        pids.push_str(&format!(" postgres={pid}"));
    }
    say!("pgmtls demo: processes {pids}");
    print_next_steps(
        exe,
        args,
        lb_port,
        &client_dir,
        &operator,
        &replicas,
        &cert_id,
    );
    Ok(())
}

/// etcd on free loopback ports, its data and log in the demo directory. Ready when it logs
/// that it serves clients; a port taken meanwhile makes it exit, and it is tried again.
async fn start_etcd(bin: &Path, work: &Path, procs: &mut Procs) -> anyhow::Result<String> {
    let log_path = work.join("etcd.log");
    for attempt in 0..3 {
        let (client, peer) = (free_port()?, free_port()?);
        let client_url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let data = work.join(format!("etcd-{attempt}"));
        let mut child = tokio::process::Command::new(bin)
            .arg("--name=demo")
            .arg(format!("--data-dir={}", data.display()))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=demo={peer_url}"))
            .arg("--logger=zap")
            .arg("--log-outputs=stderr")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| anyhow!("no etcd stderr"))?;
        let mut file = log_file(&log_path)?;
        let (ready_tx, ready) = oneshot::channel();
        // Copies the log to its file for as long as etcd runs, and reports readiness once.
        tokio::spawn(async move {
            use std::io::Write as _;
            let mut ready_tx = Some(ready_tx);
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = writeln!(file, "{line}");
                // etcd 3.4's zap logger says the first once the member has joined its cluster
                // and the client port answers; older loggers said the second.
                if line.contains("serving client traffic")
                    || line.contains("ready to serve client requests")
                {
                    if let Some(tx) = ready_tx.take() {
                        let _ = tx.send(());
                    }
                }
            }
        });
        match tokio::time::timeout(READY_TIMEOUT, ready).await {
            Ok(Ok(())) => {
                procs.adopt("etcd", 0, child)?;
                return Ok(client_url);
            }
            // Exited (the log ended before readiness) or never got ready.
            _ => {
                let _ = child.kill().await;
            }
        }
    }
    bail!(
        "etcd did not start; its log ({}):\n{}",
        log_path.display(),
        tail(&log_path)
    )
}

fn random_password() -> String {
    hex::encode(rand::random::<[u8; 18]>())
}

/// The users and roles of docs/etcd-roles.sh, then `auth enable`: other local users cannot
/// read the CA keys in etcd or change the state, and the replicas get the replica role alone
/// (they read `PREFIX/databases/` and write their registry entry, nothing else).
async fn enable_auth(endpoint: &str, operator_pw: &Path, replica_pw: &Path) -> anyhow::Result<()> {
    use etcd_client::{Client, Permission};
    let unavailable =
        |e: etcd_client::Error| anyhow!("etcd {endpoint}: cannot set up authentication: {e}");
    let mut c = Client::connect([endpoint], None)
        .await
        .map_err(unavailable)?;
    let (operator, replica) = (random_password(), random_password());
    write_file(
        operator_pw,
        format!("{operator}\n").as_bytes(),
        PRIVATE_MODE,
    )?;
    write_file(replica_pw, format!("{replica}\n").as_bytes(), PRIVATE_MODE)?;
    // Nobody needs root after this: its password is not kept.
    c.user_add("root", random_password(), None)
        .await
        .map_err(unavailable)?;
    c.user_grant_role("root", "root")
        .await
        .map_err(unavailable)?;
    c.role_add(OPERATOR).await.map_err(unavailable)?;
    c.role_grant_permission(
        OPERATOR,
        Permission::read_write(format!("{ETCD_PREFIX}/")).with_prefix(),
    )
    .await
    .map_err(unavailable)?;
    c.user_add(OPERATOR, operator, None)
        .await
        .map_err(unavailable)?;
    c.user_grant_role(OPERATOR, OPERATOR)
        .await
        .map_err(unavailable)?;
    c.role_add(REPLICA).await.map_err(unavailable)?;
    c.role_grant_permission(
        REPLICA,
        Permission::read(format!("{ETCD_PREFIX}/databases/")).with_prefix(),
    )
    .await
    .map_err(unavailable)?;
    c.role_grant_permission(
        REPLICA,
        Permission::read_write(format!("{ETCD_PREFIX}/replicas/")).with_prefix(),
    )
    .await
    .map_err(unavailable)?;
    c.user_add(REPLICA, replica, None)
        .await
        .map_err(unavailable)?;
    c.user_grant_role(REPLICA, REPLICA)
        .await
        .map_err(unavailable)?;
    c.auth_enable().await.map_err(unavailable)?;
    Ok(())
}

/// `pgmtls state import` of the state directory, as the operator, through the command's own
/// code. It runs its own runtime, hence its own thread.
fn import_state(state: &str, endpoint: &str, password_file: &Path) -> anyhow::Result<()> {
    let args = StateCmdArgs {
        command: StateCommand::Import(ImportArgs {
            etcd: EtcdArgs {
                etcd_endpoints: vec![endpoint.to_owned()],
                etcd_prefix: ETCD_PREFIX.to_owned(),
                etcd_user: Some(OPERATOR.to_owned()),
                etcd_password_file: Some(password_file.to_path_buf()),
                // The demo's etcd listens on loopback only, without TLS.
                etcd_ca_file: None,
                etcd_cert_file: None,
                etcd_key_file: None,
            },
            force: false,
            state: StateArgs {
                state_dir: Some(PathBuf::from(state)),
                ..StateArgs::default()
            },
        }),
    };
    std::thread::spawn(move || crate::cli::state::run(args))
        .join()
        .map_err(|_| anyhow!("pgmtls state import panicked"))?
        .context("pgmtls state import")?;
    Ok(())
}

/// A CA of the peer channel's own and one certificate per replica (serverAuth and clientAuth,
/// for 127.0.0.1), in a private directory.
fn write_peer_pki(dir: &Path, n: u8) -> anyhow::Result<()> {
    let pki_err = |e: rcgen::Error| anyhow!("cannot make the peer certificates: {e}");
    std::fs::DirBuilder::new()
        .mode(PRIVATE_DIR_MODE)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(pki_err)?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(pki_err)?;
    ca.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "pgmtls demo peer CA");
    let ca_cert = ca.self_signed(&ca_key).map_err(pki_err)?;
    write_file(&dir.join("ca.crt"), ca_cert.pem().as_bytes(), PUBLIC_MODE)?;
    let issuer = Issuer::new(ca, ca_key);
    for id in 1..=n {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(pki_err)?;
        let mut params = CertificateParams::new(vec!["127.0.0.1".to_owned()]).map_err(pki_err)?;
        params
            .distinguished_name
            .push(DnType::CommonName, format!("pgmtls demo replica {id}"));
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &issuer).map_err(pki_err)?;
        write_file(
            &dir.join(format!("replica-{id}.crt")),
            cert.pem().as_bytes(),
            PUBLIC_MODE,
        )?;
        write_file(
            &dir.join(format!("replica-{id}.key")),
            key.serialize_pem().as_bytes(),
            PRIVATE_MODE,
        )?;
    }
    Ok(())
}

/// One replica's pgmtls.yaml: the etcd prefix as the replica user, the balancer's PROXY
/// headers believed from loopback, and its place in the peer channel.
fn replica_config(endpoint: &str, id: u8, peer_ports: &[u16]) -> String {
    let peers: Vec<String> = (1..=peer_ports.len())
        .filter(|j| *j != usize::from(id))
        .map(|j| format!("{{id: {j}, addr: \"127.0.0.1:{}\"}}", peer_ports[j - 1]))
        .collect();
    format!(
        "etcd:\n  endpoints: [{endpoint}]\n  prefix: {ETCD_PREFIX}\n  user: {REPLICA}\n  \
         password_file: secrets/etcd-replica.password\n  registry_ttl: 5s\n\
         admin_listen: 127.0.0.1:0\nshutdown_grace: 5s\n\
         # HAProxy runs on this machine and names the client in a PROXY v2 header.\n\
         proxy_protocol_from: [127.0.0.1/32]\n\
         replica_id: {id}\npeer_listen: 127.0.0.1:{}\npeers: [{}]\n\
         peer_tls: {{cert: peer/replica-{id}.crt, key: peer/replica-{id}.key, ca: peer/ca.crt}}\n",
        peer_ports[usize::from(id - 1)],
        peers.join(", ")
    )
}

struct Replica {
    listen: String,
    admin: String,
    log: PathBuf,
}

/// `pgmtls serve --config` for one replica; ready on its `pgmtls: ready` line.
async fn start_replica(
    exe: &Path,
    work: &Path,
    id: u8,
    config: &Path,
    procs: &mut Procs,
) -> anyhow::Result<Replica> {
    let log = work.join(format!("replica-{id}.log"));
    let mut child = tokio::process::Command::new(exe)
        .arg("serve")
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log_file(&log)?)
        .kill_on_drop(true)
        .spawn()
        .context("cannot start pgmtls serve")?;
    let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let name = format!("replica-{id}");
    procs.adopt(&name, 1, child)?;
    let mut lines = BufReader::new(stdout).lines();
    let (mut listen, mut admin) = (None::<String>, None::<String>);
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let line = tokio::time::timeout_at(deadline.into(), lines.next_line()).await;
        match line {
            Ok(Ok(Some(line))) => {
                if let Some(rest) =
                    line.strip_prefix(&format!("pgmtls: listening database={DB} addr="))
                {
                    listen = Some(rest.to_owned());
                } else if let Some(rest) = line.strip_prefix("pgmtls: admin addr=") {
                    admin = Some(rest.to_owned());
                } else if line == "pgmtls: ready" {
                    break;
                }
            }
            Ok(_) => bail!(
                "{name} stopped before it was ready; its log ({}):\n{}",
                log.display(),
                tail(&log)
            ),
            Err(_) => bail!(
                "{name} was not ready within {READY_TIMEOUT:?}; its log ({}):\n{}",
                log.display(),
                tail(&log)
            ),
        }
    }
    // Keep its stdout open (a closed pipe would fail its later prints) and unread lines moving.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let (Some(listen), Some(admin)) = (listen, admin) else {
        bail!(
            "{name} is ready but did not say where it listens; its log: {}",
            log.display()
        );
    };
    Ok(Replica { listen, admin, log })
}

/// Waits until all `n` replicas are in the registry (`pgmtls fleet` lists them), following
/// the registry by watch.
async fn wait_registered(endpoint: &str, password_file: &Path, n: u8) -> anyhow::Result<()> {
    let mut config = EtcdConfig::new(vec![endpoint.to_owned()], ETCD_PREFIX);
    let password = std::fs::read_to_string(password_file)
        .with_context(|| format!("cannot read {}", password_file.display()))?;
    config.user = Some((OPERATOR.to_owned(), password.trim_end().to_owned()));
    let store = EtcdStore::connect(config).await?;
    let wait = async {
        loop {
            let listing = store.load_under(crate::fleet::registry::REPLICAS).await?;
            if listing.records.len() >= usize::from(n) {
                return Ok::<_, anyhow::Error>(());
            }
            let mut watch = store
                .watch_under(listing.revision, crate::fleet::registry::REPLICAS)
                .await?;
            watch.next().await?;
        }
    };
    tokio::time::timeout(READY_TIMEOUT, wait)
        .await
        .map_err(|_| {
            anyhow!("the {n} replicas did not all register in etcd within {READY_TIMEOUT:?}")
        })?
}

/// HAProxy in the foreground on a free loopback port: TCP, round robin, `send-proxy-v2` to
/// every replica. It prints nothing when it starts, so the signal is its frontend accepting.
async fn start_haproxy(
    bin: &Path,
    work: &Path,
    replicas: &[String],
    procs: &mut Procs,
) -> anyhow::Result<u16> {
    let log = work.join("haproxy.log");
    let path = work.join("haproxy.cfg");
    for _ in 0..5 {
        let port = free_port()?;
        let mut cfg = format!(
            "global\n  maxconn 256\n\ndefaults\n  mode tcp\n  timeout connect 5s\n  \
             timeout client 1h\n  timeout server 1h\n\n\
             frontend pgmtls\n  bind 127.0.0.1:{port}\n  default_backend replicas\n\n\
             backend replicas\n  balance roundrobin\n"
        );
        for (i, addr) in replicas.iter().enumerate() {
            cfg.push_str(&format!(
                "  server replica-{} {addr} send-proxy-v2\n",
                i + 1
            ));
        }
        std::fs::write(&path, cfg).with_context(|| format!("cannot write {}", path.display()))?;
        let mut child = tokio::process::Command::new(bin)
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(log_file(&log)?)
            .stderr(log_file(&log)?)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let addr = std::net::SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, port));
        let deadline = Instant::now() + READY_TIMEOUT;
        let ready = loop {
            if child.try_wait()?.is_some() {
                break false;
            }
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                break true;
            }
            if Instant::now() > deadline {
                let _ = child.kill().await;
                break false;
            }
            // No readiness line to wait on; poll the socket.
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        if ready {
            procs.adopt("haproxy", 2, child)?;
            return Ok(port);
        }
    }
    bail!(
        "HAProxy did not start; its log ({}):\n{}",
        log.display(),
        tail(&log)
    )
}

fn print_next_steps(
    exe: &Path,
    args: &DemoArgs,
    lb_port: u16,
    client: &Path,
    operator: &Path,
    replicas: &[Replica],
    cert_id: &str,
) {
    let f = |name: &str| client.join(format!("{PREFIX}{name}")).display().to_string();
    let psql = format!(
        "psql \"host=127.0.0.1 port={lb_port} user={} dbname={} sslmode=verify-ca sslcert={} sslkey={} sslrootcert={}\"",
        args.pg_user,
        args.pg_database,
        f("postgresql.crt"),
        f("postgresql.key"),
        f("root.crt"),
    );
    let metrics: Vec<String> = replicas
        .iter()
        .enumerate()
        .map(|(i, r)| format!("  replica {}: http://{}/metrics", i + 1, r.admin))
        .collect();
    let exe = exe.display();
    say!(
        "\npgmtls demo is running: {} replicas on etcd behind HAProxy. Connect through mutual \
         TLS (each connection goes to the next replica):\n\n  {psql}\n\n\
         Metrics:\n{}\n\n\
         Try next (another terminal):\n  \
         export PGMTLS_CONFIG={}\n  \
         {exe} fleet\n  \
         {exe} mtls {DB}\n  \
         {exe} ip-rules create {DB} --cidr 10.1.2.0/24 --description office\n  \
         {exe} certificates revoke {DB} --id {cert_id}   # every replica follows: psql is refused\n\n\
         Ctrl-C stops the demo and removes everything it created.",
        replicas.len(),
        metrics.join("\n"),
        operator.display(),
    );
}
