//! `pgmtls`: command-line dispatch only. The work happens in the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use ipnet::IpNet;
use tokio::signal::unix::{signal, SignalKind};

use pgmtls::app::{App, QuickSpec, Source};
use pgmtls::config::{Config, LogFormat};
use pgmtls::listener::DataPlane;
use pgmtls::reload::{ReloadKind, Reloader};
use pgmtls::state::{StateDir, UpstreamAddr, UpstreamTls};
use pgmtls::store::follow::EtcdSource;

#[derive(Parser, Debug)]
#[command(name = "pgmtls", version, about = "Mutual-TLS proxy for PostgreSQL")]
struct Cli {
    /// Log format: text or json.
    #[arg(long, global = true, env = "PGMTLS_LOG_FORMAT")]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the proxy.
    Serve(Box<ServeArgs>),
    /// Validate a config file and the state directory it names; exit non-zero on any error.
    CheckConfig {
        /// The pgmtls.yaml to check (and the state directory it names).
        #[arg(long, env = "PGMTLS_CONFIG")]
        config: PathBuf,
    },
    /// Start a throwaway PostgreSQL behind pgmtls and print how to connect (Ctrl-C cleans up).
    Demo(pgmtls::demo::DemoArgs),
    #[command(flatten)]
    Control(pgmtls::cli::Command),
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// Process settings and state directory (YAML).
    #[arg(long, env = "PGMTLS_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    quick: QuickArgs,
}

/// Quick mode: one database from flags, no state directory.
#[derive(Args, Debug)]
struct QuickArgs {
    /// Address to accept clients on.
    #[arg(long, env = "PGMTLS_LISTEN", requires_all = ["upstream", "cert", "key", "client_ca"])]
    listen: Option<SocketAddr>,
    /// Upstream Postgres HOST:PORT.
    #[arg(long, env = "PGMTLS_UPSTREAM")]
    upstream: Option<String>,
    /// TLS to the upstream: disable (loopback or unix: only), require, verify-full.
    #[arg(long, env = "PGMTLS_UPSTREAM_TLS", default_value = "disable")]
    upstream_tls: String,
    /// CA for --upstream-tls verify-full.
    #[arg(long, env = "PGMTLS_UPSTREAM_CA")]
    upstream_ca: Option<PathBuf>,
    /// Server certificate chain (PEM).
    #[arg(long, env = "PGMTLS_CERT")]
    cert: Option<PathBuf>,
    /// Server private key (PEM, mode 0600).
    #[arg(long, env = "PGMTLS_KEY")]
    key: Option<PathBuf>,
    /// CA that client certificates must chain to (PEM).
    #[arg(long, env = "PGMTLS_CLIENT_CA")]
    client_ca: Option<PathBuf>,
    /// CRL of revoked client certificates (PEM).
    #[arg(long, env = "PGMTLS_CRL")]
    crl: Option<PathBuf>,
    /// CIDR allowed to connect; repeat for more. None means nobody.
    #[arg(long, env = "PGMTLS_ALLOW", value_delimiter = ',')]
    allow: Vec<String>,
    /// Name of the database in logs and metrics.
    #[arg(long, env = "PGMTLS_NAME", default_value = "default")]
    name: String,
    /// Allow plaintext to a non-loopback upstream (passwords and data cross the network).
    #[arg(long, env = "PGMTLS_ALLOW_PLAINTEXT_REMOTE_UPSTREAM")]
    allow_plaintext_remote_upstream: bool,
    /// Refuse sessions whose user name is not the client certificate's common name.
    #[arg(long, env = "PGMTLS_USER_MUST_MATCH_CN")]
    user_must_match_cn: bool,
    /// Admin endpoint (/metrics, /healthz, /readyz, /status) ADDR:PORT, or "off"
    /// [default: 127.0.0.1:9480].
    #[arg(long, env = "PGMTLS_ADMIN_LISTEN")]
    admin_listen: Option<String>,
    /// Sessions (clients past mutual TLS) at once, all databases together [default: 10000].
    #[arg(long, env = "PGMTLS_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// Connections that have not finished TLS, all together.
    #[arg(long, env = "PGMTLS_MAX_HANDSHAKES")]
    max_handshakes: Option<usize>,
    /// Connections that have not finished TLS from one client address.
    #[arg(long, env = "PGMTLS_MAX_HANDSHAKES_PER_SOURCE")]
    max_handshakes_per_source: Option<usize>,
    /// Idle time before TCP keepalive probes start, or "off".
    #[arg(long, env = "PGMTLS_TCP_KEEPALIVES_IDLE")]
    tcp_keepalives_idle: Option<String>,
    /// Time between TCP keepalive probes [default: 10s].
    #[arg(long, env = "PGMTLS_TCP_KEEPALIVES_INTERVAL")]
    tcp_keepalives_interval: Option<humantime::Duration>,
    /// Unanswered keepalive probes before the connection is dropped [default: 6].
    #[arg(long, env = "PGMTLS_TCP_KEEPALIVES_COUNT")]
    tcp_keepalives_count: Option<usize>,
    /// TCP_USER_TIMEOUT, or "off" (default: idle + interval * count).
    #[arg(long, env = "PGMTLS_TCP_USER_TIMEOUT")]
    tcp_user_timeout: Option<String>,
    /// Data-plane threads (default: one fewer than the CPUs, at least one).
    #[arg(long, env = "PGMTLS_WORKER_THREADS")]
    worker_threads: Option<usize>,
    /// How long live sessions may finish after SIGTERM before they are closed [default: 30s].
    #[arg(long, env = "PGMTLS_SHUTDOWN_GRACE")]
    shutdown_grace: Option<humantime::Duration>,
    /// Deadline from accept to the end of the StartupMessage [default: 10s].
    #[arg(long, env = "PGMTLS_HANDSHAKE_TIMEOUT")]
    handshake_timeout: Option<humantime::Duration>,
    /// CIDR of a load balancer whose connections open with a PROXY protocol header naming the
    /// client; repeat for more.
    #[arg(long, env = "PGMTLS_PROXY_PROTOCOL_FROM", value_delimiter = ',')]
    proxy_protocol_from: Vec<String>,
    /// This replica's id in a fleet, 1-255 (cancel keys then name it); 0 or absent: one node.
    #[arg(long, env = "PGMTLS_REPLICA_ID")]
    replica_id: Option<u8>,
    /// IP:PORT of the peer channel (mutual TLS between replicas).
    #[arg(long, env = "PGMTLS_PEER_LISTEN")]
    peer_listen: Option<String>,
    /// Another replica, ID=IP:PORT or ID=IP:PORT/NAME; repeat for more.
    #[arg(long = "peer", env = "PGMTLS_PEERS", value_delimiter = ',')]
    peers: Vec<String>,
    /// This replica's peer certificate chain (PEM).
    #[arg(long, env = "PGMTLS_PEER_CERT")]
    peer_cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, env = "PGMTLS_PEER_KEY")]
    peer_key: Option<PathBuf>,
    /// CA of every replica's peer certificate (PEM).
    #[arg(long, env = "PGMTLS_PEER_CA")]
    peer_ca: Option<PathBuf>,
}

fn main() -> std::process::ExitCode {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if let Some(e) = pgmtls::cli::subcommand_typo(&argv, &<Cli as clap::CommandFactory>::command())
    {
        e.exit();
    }
    let cli = Cli::parse_from(argv);
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("pgmtls: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<std::process::ExitCode> {
    match cli.command {
        Command::CheckConfig { config } => check_config(&config),
        Command::Control(c) => pgmtls::cli::run(c),
        Command::Demo(a) => pgmtls::demo::run(a),
        Command::Serve(args) => {
            let (config, source) = serve_inputs(*args)?;
            // Held to the end of `run`: dropping it writes out the lines still queued.
            let _log = pgmtls::logging::init(cli.log_format.unwrap_or(config.log_format));
            // Connections run on the data-plane threads; this runtime keeps the control plane
            // (signals, reloads, the admin endpoint) off their path.
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            rt.block_on(serve(config, source))?;
            Ok(std::process::ExitCode::SUCCESS)
        }
    }
}

fn check_config(path: &std::path::Path) -> anyhow::Result<std::process::ExitCode> {
    if let Ok(Config { etcd: Some(e), .. }) = Config::load(path) {
        // The state is in etcd: `pgmtls state export` takes a copy to check.
        println!(
            "{}: ok (state in etcd {}, not checked here)",
            path.display(),
            e.prefix
        );
        return Ok(std::process::ExitCode::SUCCESS);
    }
    let mut missing_dir = None;
    let result = Config::load(path).and_then(|c| {
        let dir = c.state_dir.clone().unwrap_or_default();
        if !dir.exists() {
            missing_dir = Some(dir.clone());
        }
        let states = StateDir::new(dir).load_all()?;
        let metrics = pgmtls::metrics::Metrics::new();
        pgmtls::snapshot::Snapshot::build(0, &states, &metrics)?;
        Ok(states.len())
    });
    match result {
        Ok(n) => {
            println!("{}: ok ({n} databases)", path.display());
            if let Some(dir) = missing_dir {
                // Not an error (the proxy waits for it), but not an empty directory either.
                eprintln!(
                    "pgmtls: warning: state_dir {} does not exist: the proxy serves no database \
                     until it does (`pgmtls mtls create` makes it)",
                    dir.display()
                );
            }
            Ok(std::process::ExitCode::SUCCESS)
        }
        Err(errors) => {
            for e in &errors.0 {
                eprintln!("{e}");
            }
            eprintln!("{} error(s)", errors.0.len());
            Ok(std::process::ExitCode::FAILURE)
        }
    }
}

/// The `etcd:` section as the store's settings; reads the password file.
fn etcd_config(
    e: &pgmtls::config::EtcdSettings,
) -> anyhow::Result<pgmtls::store::etcd::EtcdConfig> {
    pgmtls::cli::etcd_config(e)
}

fn serve_inputs(mut args: ServeArgs) -> anyhow::Result<(Config, Source)> {
    if args.config.is_some() && args.quick.listen.is_some() {
        // README's step 0 exports PGMTLS_CONFIG for the CLI; a quick-mode `serve --listen`
        // typed later in the same shell means quick mode, so say what is ignored rather than
        // fail over a flag the user never typed.
        let typed = std::env::args().any(|a| a == "--config" || a.starts_with("--config="));
        if typed {
            anyhow::bail!(
                "--listen (quick mode) cannot be used with --config: quick mode takes its \
                 settings from flags"
            );
        }
        eprintln!(
            "pgmtls: warning: PGMTLS_CONFIG is set in the environment, but --listen selects \
             quick mode: ignoring PGMTLS_CONFIG"
        );
        args.config = None;
    }
    if let Some(path) = args.config {
        let config = Config::load(&path).map_err(|e| anyhow::anyhow!("{e}"))?;
        if let Some(e) = &config.etcd {
            let source = Source::Etcd(EtcdSource::new(etcd_config(e)?));
            return Ok((config, source));
        }
        let dir = config.state_dir.clone().context("state_dir is required")?;
        return Ok((config, Source::StateDir(StateDir::new(dir))));
    }
    let q = args.quick;
    let Some(listen) = q.listen else {
        anyhow::bail!(
            "give --config FILE, or quick mode: --listen ADDR --upstream HOST:PORT --cert FILE \
             --key FILE --client-ca FILE --allow CIDR"
        );
    };
    let need = |v: Option<PathBuf>, flag: &str| v.with_context(|| format!("{flag} is required"));
    let upstream: UpstreamAddr = q
        .upstream
        .as_deref()
        .context("--upstream is required")?
        .parse()
        .map_err(|e: String| anyhow::anyhow!("--upstream: {e}"))?;
    let upstream_tls: UpstreamTls = q
        .upstream_tls
        .parse()
        .map_err(|e: String| anyhow::anyhow!("--upstream-tls: {e}"))?;
    let allow = cidr_flag("--allow", &q.allow)?;
    pgmtls::state::validate_database_name(&q.name).map_err(|e| anyhow::anyhow!("--name: {e}"))?;
    let mut config = Config::default();
    config.timeouts.keepalive = keepalive_flags(&q, config.timeouts.keepalive)?;
    if let Some(a) = q.admin_listen {
        config.admin_listen = if a == "off" {
            None
        } else {
            Some(
                a.parse()
                    .map_err(|_| anyhow::anyhow!("--admin-listen: invalid address {a:?}"))?,
            )
        };
    }
    if let Some(m) = q.max_connections {
        config.max_connections = m;
    }
    if let Some(m) = q.max_handshakes {
        config.max_handshakes = m;
    }
    if let Some(m) = q.max_handshakes_per_source {
        config.max_handshakes_per_source = m;
    }
    if let Some(w) = q.worker_threads.filter(|w| *w > 0) {
        config.worker_threads = Some(w);
    }
    if let Some(g) = q.shutdown_grace {
        config.timeouts.shutdown_grace = g.into();
    }
    if let Some(h) = q.handshake_timeout {
        config.timeouts.handshake = h.into();
    }
    config.proxy_protocol_from = cidr_flag("--proxy-protocol-from", &q.proxy_protocol_from)?;
    config.fleet = pgmtls::fleet::config::from_flags(
        q.replica_id,
        q.peer_listen.as_deref(),
        &q.peers,
        (q.peer_cert, q.peer_key, q.peer_ca),
    )
    .map_err(|e| anyhow::anyhow!(e))?;
    let spec = QuickSpec {
        name: q.name,
        listen,
        upstream,
        upstream_tls,
        upstream_ca: q.upstream_ca,
        cert: need(q.cert, "--cert")?,
        key: need(q.key, "--key")?,
        client_ca: need(q.client_ca, "--client-ca")?,
        crl: q.crl,
        allow,
        allow_plaintext_remote_upstream: q.allow_plaintext_remote_upstream,
        user_must_match_cn: q.user_must_match_cn,
    };
    Ok((config, Source::Quick(Box::new(spec))))
}

async fn serve(config: Config, source: Source) -> anyhow::Result<()> {
    // Handlers first: until they exist, SIGHUP and SIGTERM keep their default action, which
    // kills the process, and "ready" invites both.
    let mut hup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    // Fingerprint before the first load, so that a change racing start-up is caught by the
    // first poll even though the watch starts after the load.
    let plan = source.watch_plan(config.source.as_deref());
    let baseline = plan.fingerprint();
    let threads = config.worker_threads.unwrap_or_else(|| {
        // Leave a core to Postgres, the clients and the control plane; measured best on 2 cores.
        std::thread::available_parallelism().map_or(1, |n| n.get().saturating_sub(1).max(1))
    });
    let data_plane = DataPlane::start(threads).context("cannot start the data-plane threads")?;
    // A replica loads the prefix at one revision before serving, then watches from there.
    let etcd_store =
        match &source {
            Source::Etcd(e) => Some(e.connect_and_load().await.with_context(|| {
                format!("cannot load the state from etcd {}", e.config().prefix)
            })?),
            _ => None,
        };
    let app = App::start_on(config, source, data_plane).await?;
    let mut registration = None;
    if let (Some(store), Source::Etcd(e)) = (etcd_store, app.source()) {
        app.follow_peers(store.clone());
        let entry = pgmtls::fleet::registry::ReplicaEntry::new(
            app.config.fleet.as_ref().map(|f| f.replica_id),
            app.peer_addr(),
        );
        registration = Some(pgmtls::fleet::registry::Registration::start(
            store.clone(),
            entry,
            app.config
                .etcd
                .as_ref()
                .map_or(pgmtls::fleet::registry::DEFAULT_TTL, |s| s.registry_ttl),
            e.served(),
        ));
        let follower = e.clone();
        let target = Arc::clone(&app);
        tokio::spawn(async move {
            follower
                .follow(store, || {
                    let app = Arc::clone(&target);
                    // Same path as the file watch: serialised, counted, shown in /status.
                    async move {
                        let _ = app.reload(ReloadKind::watch).await;
                    }
                })
                .await;
        });
    }
    let reloader = Reloader::start(
        Arc::clone(&app),
        plan,
        baseline,
        app.config.reload_poll_interval,
    );
    // Machine-readable readiness lines: tests and scripts wait for these, not for time.
    for (db, addr) in app.bound_addrs() {
        println!("pgmtls: listening database={db} addr={addr}");
    }
    if let Some(addr) = app.shared_addr() {
        println!("pgmtls: listening shared addr={addr}");
    }
    if let Some(addr) = app.config.admin_listen {
        let listener = pgmtls::admin::bind(addr)
            .await
            .with_context(|| format!("admin_listen: cannot listen on {addr}"))?;
        let bound = listener.local_addr().context("admin socket address")?;
        let options = pgmtls::admin::AdminOptions {
            status_from: app.config.admin_status_from.clone(),
        };
        pgmtls::admin::spawn(listener, Arc::clone(&app), options);
        tracing::info!(addr = %bound, "admin endpoint listening");
        println!("pgmtls: admin addr={bound}");
    }
    pgmtls::refusal_log::spawn_ticker();
    println!("pgmtls: ready");
    loop {
        tokio::select! {
            // Same path as the file watch: serialised, counted, shown in /status.
            _ = hup.recv() => reloader.request(ReloadKind::sighup),
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    // Leave the registry at once, while the live sessions drain.
    let leaving = registration.map(|r| tokio::spawn(r.leave()));
    app.shutdown().await;
    if let Some(l) = leaving {
        let _ = l.await;
    }
    drop(reloader);
    // The last window's counts, so the log adds up to the refusal metrics.
    pgmtls::refusal_log::flush();
    Ok(())
}

/// The `--tcp-*` flags, checked like their `pgmtls.yaml` keys; errors name the flag.
fn keepalive_flags(
    q: &QuickArgs,
    d: pgmtls::config::Keepalive,
) -> anyhow::Result<pgmtls::config::Keepalive> {
    use pgmtls::config::{process, yaml::convert};
    let flag = |name: &'static str| move |e: String| anyhow::anyhow!("{name}: {e}");
    let idle = match &q.tcp_keepalives_idle {
        None => d.idle,
        Some(s) => convert::duration_or_off_str(s)
            .and_then(|o| o.map(process::keepalive_seconds).transpose())
            .map_err(flag("--tcp-keepalives-idle"))?,
    };
    let interval = match q.tcp_keepalives_interval {
        None => d.interval,
        Some(i) => {
            process::keepalive_seconds(i.into()).map_err(flag("--tcp-keepalives-interval"))?
        }
    };
    let count = match q.tcp_keepalives_count {
        None => d.count,
        Some(n) => process::keepalive_count(n).map_err(flag("--tcp-keepalives-count"))?,
    };
    let user = q
        .tcp_user_timeout
        .as_deref()
        .map(|s| {
            convert::duration_or_off_str(s).and_then(|o| o.map(process::user_timeout).transpose())
        })
        .transpose()
        .map_err(flag("--tcp-user-timeout"))?;
    Ok(pgmtls::config::Keepalive::new(idle, interval, count, user))
}

/// A repeatable CIDR flag, checked like IP rules; errors name the flag.
fn cidr_flag(flag: &str, values: &[String]) -> anyhow::Result<Vec<IpNet>> {
    values
        .iter()
        .map(|c| pgmtls::allowlist::parse_cidr(c).map_err(|e| anyhow::anyhow!("{flag}: {e}")))
        .collect()
}
