//! Builds the shared state, binds one listener per database, reloads, and drains on shutdown.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipnet::IpNet;
use time::OffsetDateTime;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admin::{AdminSource, LastReload, RenewalStatus, SourceStatus, Status};
use crate::config::{Config, ConfigErrors};
use crate::conn::Context;
use crate::limits::Limits;
use crate::listener::DataPlane;
use crate::metrics::{Metrics, ReloadKind};
use crate::reload::{describe_changes, restart_needed, Reloadable, WatchPlan};
use crate::sessions::EndReason;
use crate::snapshot::Snapshot;
use crate::state::{
    read_private_key, DatabaseSettings, DatabaseState, IpRule, LoadedDatabase, MaterialPaths,
    RenewalRecord, StateDir, UpstreamAddr, UpstreamTls,
};

/// Where the databases come from.
#[derive(Debug, Clone)]
pub enum Source {
    StateDir(StateDir),
    /// An etcd prefix, followed by watch (a fleet replica).
    Etcd(crate::store::follow::EtcdSource),
    /// One database from command-line flags (sidecar, benchmarks).
    Quick(Box<QuickSpec>),
}

#[derive(Debug, Clone)]
pub struct QuickSpec {
    pub name: String,
    pub listen: SocketAddr,
    pub upstream: UpstreamAddr,
    pub upstream_tls: UpstreamTls,
    pub upstream_ca: Option<PathBuf>,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
    pub crl: Option<PathBuf>,
    pub allow: Vec<IpNet>,
    pub allow_plaintext_remote_upstream: bool,
    pub user_must_match_cn: bool,
}

impl QuickSpec {
    fn load(&self) -> Result<DatabaseState, ConfigErrors> {
        let mut errors = ConfigErrors::default();
        let read = |p: &PathBuf, errors: &mut ConfigErrors| {
            std::fs::read(p)
                .map_err(|e| {
                    errors.extend(ConfigErrors::one(p, "", None, format!("cannot read: {e}")))
                })
                .ok()
        };
        let cert = read(&self.cert, &mut errors);
        let key = read_private_key(&self.key)
            .map_err(|e| errors.extend(e))
            .ok();
        let ca = read(&self.client_ca, &mut errors);
        let crl = self.crl.as_ref().and_then(|p| read(p, &mut errors));
        let settings = DatabaseSettings {
            listen: crate::state::Listen::Addr(self.listen),
            upstream: self.upstream.clone(),
            upstream_tls: self.upstream_tls,
            upstream_ca: self.upstream_ca.clone(),
            upstream_server_name: None,
            allow_plaintext_remote_upstream: self.allow_plaintext_remote_upstream,
            server_names: Vec::new(),
            user_must_match_cn: self.user_must_match_cn,
            max_connections: None,
            max_connections_per_ip: None,
            enabled_by: None,
            created_at: None,
        };
        if self.upstream.unix_path().is_some() && self.upstream_tls != UpstreamTls::Disable {
            errors.extend(ConfigErrors::one(
                std::path::Path::new("--upstream-tls"),
                "",
                None,
                "a unix: upstream is on this host; use --upstream-tls disable",
            ));
        }
        if self.upstream_tls == UpstreamTls::Disable
            && !self.upstream.is_loopback()
            && !self.allow_plaintext_remote_upstream
        {
            errors.extend(ConfigErrors::one(
                std::path::Path::new("--upstream"),
                "",
                None,
                "plaintext to a non-loopback upstream; use --upstream-tls verify-full or \
                 --allow-plaintext-remote-upstream",
            ));
        }
        // One time for the process, not the time of this load: the rules are part of the
        // content hash, and an unchanged command line must give an unchanged hash.
        static RULES_CREATED: std::sync::OnceLock<OffsetDateTime> = std::sync::OnceLock::new();
        let now = *RULES_CREATED.get_or_init(OffsetDateTime::now_utc);
        let rules = self
            .allow
            .iter()
            .enumerate()
            .map(|(i, cidr)| IpRule {
                id: format!("allow-{}", i + 1),
                cidr: *cidr,
                description: "--allow".into(),
                created_at: now,
                updated_at: now,
            })
            .collect();
        match (cert, key, ca) {
            (Some(c), Some(k), Some(ca)) if errors.is_empty() => Ok(DatabaseState {
                name: self.name.clone(),
                dir: std::env::current_dir().unwrap_or_default(),
                paths: MaterialPaths {
                    server_cert: self.cert.clone(),
                    server_key: self.key.clone(),
                    ca: self.client_ca.clone(),
                    crl: self.crl.clone().unwrap_or_default(),
                },
                settings,
                rules,
                trusted_ips: Vec::new(),
                server_cert_pem: c,
                server_key_pem: k,
                ca_pem: ca,
                crl_pem: crl,
                // `--crl` is optional in quick mode; one that was given must be there.
                crl_required: false,
                upstream_ca_pem: None,
                certificates: Vec::new(),
            }),
            _ => Err(errors),
        }
    }
}

impl Source {
    pub fn load(&self) -> Result<Vec<DatabaseState>, ConfigErrors> {
        match self {
            Source::StateDir(s) => s.load_all(),
            Source::Etcd(e) => e.load_all(),
            Source::Quick(q) => q.load().map(|d| vec![d]),
        }
    }

    /// Every database with what loading it gave, for a reload that applies each on its own.
    pub fn load_each(&self) -> Result<Vec<LoadedDatabase>, ConfigErrors> {
        match self {
            Source::StateDir(s) => s.load_each(),
            // The follower keeps the records current; loading them needs no network.
            Source::Etcd(e) => Ok(e.load_each()),
            Source::Quick(q) => Ok(vec![(q.name.clone(), q.load())]),
        }
    }

    /// The renewal record (`renewal.yaml`), where this source has one: a directory's. An etcd
    /// replica reads `PREFIX/databases/` only, and quick mode has no state to renew.
    pub fn renewal(&self) -> Result<Option<RenewalRecord>, ConfigErrors> {
        match self {
            Source::StateDir(s) => RenewalRecord::read(s.root()),
            Source::Etcd(_) | Source::Quick(_) => Ok(None),
        }
    }

    /// What the reloader watches: the state directory (recursively) and the config file, or
    /// in quick mode the PEM files named on the command line.
    pub fn watch_plan(&self, config_file: Option<&Path>) -> WatchPlan {
        match self {
            Source::StateDir(s) => {
                let files: Vec<&Path> = config_file.into_iter().collect();
                WatchPlan::new(Some(s.root()), &files)
            }
            // The etcd watch is the follower's; the files watch covers the config file.
            Source::Etcd(_) => {
                let files: Vec<&Path> = config_file.into_iter().collect();
                WatchPlan::new(None, &files)
            }
            Source::Quick(q) => {
                let mut files: Vec<&Path> = vec![&q.cert, &q.key, &q.client_ca];
                files.extend(q.crl.as_deref());
                files.extend(q.upstream_ca.as_deref());
                WatchPlan::new(None, &files)
            }
        }
    }
}

/// The outcome of the last reload, for logs and `/status`.
#[derive(Debug, Clone, Default)]
pub struct ReloadStatus {
    pub last_attempt: Option<OffsetDateTime>,
    pub last_success: Option<OffsetDateTime>,
    pub last_error: Option<String>,
    pub last_trigger: Option<ReloadKind>,
    /// The errors of each database the last reload could not apply; each such database
    /// keeps serving its previous configuration, if it had one.
    pub database_errors: BTreeMap<String, String>,
}

/// What the proxy last read of the renewal record: the record, or why it could not be read
/// (then the renewal times are unknown; nothing served depends on them).
#[derive(Debug, Clone, Default)]
pub struct RenewalView {
    pub record: Option<RenewalRecord>,
    pub error: Option<String>,
}

/// What a reload could not apply: the config file or the state as a whole (`global`), and
/// each database that failed on its own.
#[derive(Debug, Clone, Default)]
pub struct ReloadErrors {
    pub global: ConfigErrors,
    pub databases: BTreeMap<String, ConfigErrors>,
}

impl ReloadErrors {
    pub fn is_empty(&self) -> bool {
        self.global.is_empty() && self.databases.values().all(ConfigErrors::is_empty)
    }

    /// Every error, the global ones first.
    pub fn all(&self) -> ConfigErrors {
        let mut all = self.global.clone();
        for e in self.databases.values() {
            all.extend(e.clone());
        }
        all
    }

    fn failed(&self) -> Vec<String> {
        self.databases.keys().cloned().collect()
    }
}

/// What a successful reload changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReloadReport {
    pub generation: u64,
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
    /// Databases whose change was rejected; they keep their previous configuration.
    pub failed: Vec<String>,
    pub sessions_closed: usize,
}

struct ListenerHandle {
    configured: SocketAddr,
    bound: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
}

pub struct App {
    pub ctx: Arc<Context>,
    pub config: Config,
    source: Source,
    limits: Arc<Limits>,
    listeners: Mutex<BTreeMap<String, ListenerHandle>>,
    /// Databases in the served configuration whose listener could not be bound, and why;
    /// retried on every reload, shown in `/status` until it binds.
    bind_errors: Mutex<BTreeMap<String, String>>,
    data_plane: DataPlane,
    stop: watch::Sender<bool>,
    generation: AtomicU64,
    reload_lock: tokio::sync::Mutex<()>,
    pub reload_status: Mutex<ReloadStatus>,
    renewal: Mutex<RenewalView>,
    draining: watch::Sender<bool>,
    /// Where the peer channel listens, once bound (the replica registry advertises it).
    peer_addr: std::sync::OnceLock<SocketAddr>,
    /// The cancel directory's view of the replica registry (a fleet replica in etcd mode).
    registry_peers: Option<crate::fleet::directory::RegistryPeers>,
    /// Where the shared listener (`shared_listen`) is bound, when configured.
    shared_addr: std::sync::OnceLock<SocketAddr>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl App {
    /// Loads and validates everything, binds every listener, and starts accepting. Any error
    /// here is fatal: a proxy that starts must serve what its state says.
    pub async fn start(config: Config, source: Source) -> anyhow::Result<Arc<App>> {
        Self::start_on(config, source, DataPlane::default()).await
    }

    /// As [`App::start`], with connections served on `data_plane`'s threads.
    pub async fn start_on(
        config: Config,
        source: Source,
        data_plane: DataPlane,
    ) -> anyhow::Result<Arc<App>> {
        let metrics = Arc::new(Metrics::new());
        let states = source.load()?;
        let snapshot = Snapshot::build(1, &states, &metrics)?;
        snapshot.publish_metrics(&metrics);
        metrics.record_reload(
            ReloadKind::startup,
            true,
            OffsetDateTime::now_utc().unix_timestamp(),
        );
        // In etcd mode the replica registry says where the other replicas are; the follower
        // starts once the store is connected ([`App::follow_peers`]).
        let registry_peers = match (&config.fleet, &source) {
            (Some(f), Source::Etcd(_)) => {
                Some(crate::fleet::directory::RegistryPeers::new(f.replica_id))
            }
            _ => None,
        };
        let fleet = match &config.fleet {
            Some(f) => Some(Arc::new(crate::fleet::Fleet::new_with_registry(
                f,
                registry_peers.clone(),
            )?)),
            None => None,
        };
        let ctx = Arc::new(
            Context::new(snapshot, metrics, config.timeouts)
                .with_proxy_protocol_from(config.proxy_protocol_from.clone())
                .with_fleet(fleet.clone()),
        );
        ctx.sessions.set_enforcing(config.enforce_on_live_sessions);
        let (stop, _) = watch::channel(false);
        let (draining, _) = watch::channel(false);
        let limits = Limits::with_throttle(
            config.max_handshakes,
            config.max_handshakes_per_source,
            config.max_connections,
            config.handshake_throttle,
        );
        let app = Arc::new(App {
            ctx,
            limits,
            config,
            source,
            listeners: Mutex::new(BTreeMap::new()),
            bind_errors: Mutex::new(BTreeMap::new()),
            data_plane,
            stop,
            generation: AtomicU64::new(1),
            reload_lock: tokio::sync::Mutex::new(()),
            reload_status: Mutex::new(ReloadStatus {
                last_attempt: Some(OffsetDateTime::now_utc()),
                last_success: Some(OffsetDateTime::now_utc()),
                last_error: None,
                last_trigger: Some(ReloadKind::startup),
                database_errors: BTreeMap::new(),
            }),
            renewal: Mutex::new(RenewalView::default()),
            draining,
            peer_addr: std::sync::OnceLock::new(),
            registry_peers,
            shared_addr: std::sync::OnceLock::new(),
        });
        let renewal = app.source.renewal();
        app.apply_renewal(renewal);
        let dbs: Vec<(String, SocketAddr)> = app
            .ctx
            .snapshot
            .load()
            .databases
            .values()
            .filter_map(|d| Some((d.name.to_string(), d.settings.listen.addr()?)))
            .collect();
        for (name, addr) in dbs {
            app.start_listener(&name, addr)
                .map_err(|e| anyhow::anyhow!("database {name}: cannot listen on {addr}: {e}"))?;
        }
        app.start_shared_listener()?;
        if let Some(fleet) = fleet {
            let addr = fleet.listen;
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("peer_listen: cannot listen on {addr}: {e}"))?;
            let bound = listener.local_addr().unwrap_or(addr);
            let _ = app.peer_addr.set(bound);
            tracing::info!(
                replica_id = fleet.replica_id(),
                addr = %bound,
                "peer channel listening"
            );
            tokio::spawn(crate::fleet::channel::serve(
                fleet,
                listener,
                app.ctx.clone(),
            ));
        }
        Ok(app)
    }

    /// Binds a served database that has no listener yet; a failure is kept for `/status` (and
    /// the CLI's status words) until a later reload binds it.
    fn bind_one(&self, name: &str, addr: SocketAddr) {
        match self.start_listener(name, addr) {
            Ok(()) => {
                lock(&self.bind_errors).remove(name);
            }
            Err(e) => {
                tracing::error!(database = name, %addr, error = %e, "cannot listen for database");
                lock(&self.bind_errors)
                    .insert(name.to_owned(), format!("cannot listen on {addr}: {e}"));
            }
        }
    }

    /// Retries every database of `snap` whose listener could not be bound.
    fn bind_missing(&self, snap: &Snapshot) {
        let missing: Vec<(String, SocketAddr)> = {
            let listeners = lock(&self.listeners);
            snap.databases
                .values()
                .filter(|d| !listeners.contains_key(&*d.name))
                .filter_map(|d| Some((d.name.to_string(), d.settings.listen.addr()?)))
                .collect()
        };
        for (name, addr) in missing {
            self.bind_one(&name, addr);
        }
    }

    /// Starts following the replica registry for the cancel directory, when this is a fleet
    /// replica in etcd mode; a no-op otherwise.
    pub fn follow_peers(&self, store: crate::store::etcd::EtcdStore) {
        if let Some(r) = &self.registry_peers {
            r.follow(store);
        }
    }

    /// The peer channel's bound address, when this replica has one.
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.peer_addr.get().copied()
    }

    /// Binds `shared_listen`, the one port of every database with `listen: shared`. Fixed at
    /// start, like every listen address.
    fn start_shared_listener(&self) -> anyhow::Result<()> {
        let shared = self.ctx.snapshot.load().shared().count();
        let Some(addr) = self.config.shared_listen else {
            if shared > 0 {
                tracing::warn!(
                    databases = shared,
                    "databases with listen: shared are not served: pgmtls.yaml has no shared_listen"
                );
            }
            return Ok(());
        };
        if let Some(d) = &self.config.default_database {
            let snap = self.ctx.snapshot.load();
            if !snap.shared().any(|db| &*db.name == d) {
                tracing::warn!(
                    default_database = d.as_str(),
                    "default_database is not a database with listen: shared; clients without \
                     a known server name are refused until it is one"
                );
            }
        }
        let served = crate::conn::Served::Shared {
            default: self.config.default_database.as_deref().map(Arc::from),
        };
        let (bound, _tasks) = self
            .data_plane
            .listen(addr, served, &self.ctx, &self.limits, &self.stop)
            .map_err(|e| anyhow::anyhow!("shared_listen: cannot listen on {addr}: {e}"))?;
        let _ = self.shared_addr.set(bound);
        tracing::info!(addr = %bound, databases = shared, "shared listener listening");
        Ok(())
    }

    fn start_listener(&self, name: &str, addr: SocketAddr) -> std::io::Result<()> {
        let (bound, tasks) =
            self.data_plane
                .listen(addr, name.into(), &self.ctx, &self.limits, &self.stop)?;
        tracing::info!(database = name, addr = %bound, "listening");
        lock(&self.listeners).insert(
            name.to_owned(),
            ListenerHandle {
                configured: addr,
                bound,
                tasks,
            },
        );
        Ok(())
    }

    /// The address each database's listener is bound to (resolves port 0); for a database
    /// on the shared listener, that listener's.
    pub fn bound_addrs(&self) -> BTreeMap<String, SocketAddr> {
        let mut out: BTreeMap<String, SocketAddr> = lock(&self.listeners)
            .iter()
            .map(|(k, v)| (k.clone(), v.bound))
            .collect();
        if let Some(shared) = self.shared_addr.get() {
            for db in self.ctx.snapshot.load().shared() {
                out.insert(db.name.to_string(), *shared);
            }
        }
        out
    }

    /// The shared listener's bound address, when `shared_listen` is set.
    pub fn shared_addr(&self) -> Option<SocketAddr> {
        self.shared_addr.get().copied()
    }

    pub fn source(&self) -> &Source {
        &self.source
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// Re-reads the config file and the source, validates each database on its own, and swaps
    /// in every one that is valid; one with an error keeps its previous runtime (a new one is
    /// not added) and is named in `ReloadReport::failed`, the log and `/status`. Live sessions
    /// no longer admitted are closed when the config says so. An unchanged configuration is
    /// not swapped and keeps its generation. `Err` when nothing could be applied and something
    /// failed.
    pub async fn reload(&self, trigger: ReloadKind) -> Result<ReloadReport, ConfigErrors> {
        let _serial = self.reload_lock.lock().await;
        self.reload_locked(trigger).await
    }

    /// Keeps what was read of the renewal record for `/status` and the gauges. A record that
    /// does not load is a warning that names file and field; it never fails a reload.
    fn apply_renewal(&self, read: Result<Option<RenewalRecord>, ConfigErrors>) {
        let view = match read {
            Ok(record) => RenewalView {
                record,
                error: None,
            },
            Err(e) => {
                let error = crate::state::one_line(&e);
                tracing::warn!(error = %error, "renewal record does not load; renewal times are unknown");
                RenewalView {
                    record: None,
                    error: Some(error),
                }
            }
        };
        self.ctx.metrics.set_renewal(view.record.as_ref());
        *lock(&self.renewal) = view;
    }

    /// `/status`'s `renewal`: absent where the source keeps no renewal record.
    fn renewal_status(&self) -> Option<RenewalStatus> {
        if !matches!(self.source, Source::StateDir(_)) {
            return None;
        }
        let view = lock(&self.renewal).clone();
        let r = view.record.as_ref();
        Some(RenewalStatus {
            last_run_at: r.map(|r| r.last_run_at),
            last_run_result: r.map(|r| r.last_run_result.as_str().to_owned()),
            last_run_errors: r.map(|r| r.last_run_errors),
            last_success_at: r.and_then(|r| r.last_success_at),
            error: view.error,
        })
    }

    /// Makes the outcome visible in `/status` and the metrics. Called before the outcome's log
    /// line, so whoever reacts to the line finds status and metrics already agreeing with it.
    fn record_outcome(&self, trigger: ReloadKind, errors: &ReloadErrors) {
        let now = OffsetDateTime::now_utc();
        let ok = errors.is_empty();
        self.ctx
            .metrics
            .record_reload(trigger, ok, now.unix_timestamp());
        self.ctx
            .metrics
            .set_rejected(errors.databases.keys().cloned().collect());
        // Also after a rejected reload: building it may have created series for databases
        // that are not served.
        self.ctx.snapshot.load().publish_metrics(&self.ctx.metrics);
        let mut st = lock(&self.reload_status);
        st.last_attempt = Some(now);
        st.last_trigger = Some(trigger);
        st.database_errors = errors
            .databases
            .iter()
            .map(|(name, e)| (name.clone(), e.to_string()))
            .collect();
        if ok {
            st.last_success = Some(now);
            st.last_error = None;
        } else {
            st.last_error = Some(errors.all().to_string());
        }
    }

    /// One line per database whose change was not applied, naming it.
    fn log_failed_databases(&self, trigger: ReloadKind, errors: &ReloadErrors) {
        let snap = self.ctx.snapshot.load();
        for (name, e) in &errors.databases {
            tracing::warn!(
                trigger = trigger.as_str(),
                database = name.as_str(),
                kept_previous = snap.databases.contains_key(name),
                errors = %e,
                "database change rejected; it keeps its previous configuration"
            );
        }
    }

    async fn reload_locked(&self, trigger: ReloadKind) -> Result<ReloadReport, ConfigErrors> {
        let next_gen = self.generation() + 1;
        let source = self.source.clone();
        let config_file = self.config.source.clone();
        let metrics = Arc::clone(&self.ctx.metrics);
        let old = self.ctx.snapshot.load_full();
        let previous = Arc::clone(&old);
        // Reading files and parsing certificates blocks: keep it off the async workers so
        // that accept loops and relays never wait behind a reload.
        let (file_config, snapshot, errors, renewal) = tokio::task::spawn_blocking(move || {
            let _lock = match &source {
                Source::StateDir(s) => crate::reload::read_lock(s.root()),
                Source::Etcd(_) | Source::Quick(_) => None,
            };
            let mut errors = ReloadErrors::default();
            let config = config_file
                .as_deref()
                .map(Config::load)
                .transpose()
                .map_err(|e| errors.global.extend(e))
                .ok()
                .flatten();
            // Each database stands on its own: one that fails keeps its previous runtime and
            // holds back no other (nor does a broken config file hold back any database).
            let snapshot = match source.load_each() {
                Ok(loaded) => {
                    let (snapshot, failed) =
                        Snapshot::rebuild(next_gen, loaded, &previous, &metrics);
                    errors.databases = failed;
                    Some(snapshot)
                }
                Err(e) => {
                    errors.global.extend(e);
                    None
                }
            };
            let renewal = source.renewal();
            (config, snapshot, errors, Some(renewal))
        })
        .await
        .unwrap_or_else(|e| {
            let errors = ReloadErrors {
                global: ConfigErrors::one(
                    Path::new("."),
                    "",
                    None,
                    format!("reload task failed: {e}"),
                ),
                databases: BTreeMap::new(),
            };
            (None, None, errors, None)
        });
        if let Some(fc) = &file_config {
            self.apply_file_config(fc);
        }
        if let Some(r) = renewal {
            self.apply_renewal(r);
        }
        let snapshot = match snapshot {
            Some(s) if s.content_hash() != old.content_hash() => s,
            _ => {
                // Still enforce: a certificate may have expired since the last look.
                let closed = self.enforce(&old);
                // A listen address taken earlier may be free now.
                self.bind_missing(&old);
                self.record_outcome(trigger, &errors);
                if errors.is_empty() {
                    tracing::info!(
                        trigger = trigger.as_str(),
                        generation = old.generation,
                        sessions_closed = closed,
                        "configuration unchanged"
                    );
                    return Ok(ReloadReport {
                        generation: old.generation,
                        sessions_closed: closed,
                        ..Default::default()
                    });
                }
                self.log_failed_databases(trigger, &errors);
                let all = errors.all();
                tracing::warn!(
                    trigger = trigger.as_str(),
                    failed = ?errors.failed(),
                    errors = %all,
                    "reload rejected; keeping the previous configuration"
                );
                return Err(all);
            }
        };
        let changes = describe_changes(&old, &snapshot);
        let mut report = ReloadReport {
            generation: next_gen,
            failed: errors.failed(),
            ..Default::default()
        };
        for (name, db) in &snapshot.databases {
            match old.databases.get(name) {
                None => report.added.push(name.clone()),
                Some(o) if o.content_hash != db.content_hash => report.changed.push(name.clone()),
                Some(_) => {}
            }
        }
        report.removed = old
            .databases
            .keys()
            .filter(|n| !snapshot.databases.contains_key(*n))
            .cloned()
            .collect();
        let listens: Vec<(String, SocketAddr)> = snapshot
            .databases
            .values()
            .filter_map(|d| Some((d.name.to_string(), d.settings.listen.addr()?)))
            .collect();
        let ip_rules: usize = snapshot.databases.values().map(|d| d.rules.len()).sum();
        let crl_entries: usize = snapshot
            .databases
            .values()
            .map(|d| d.tls.revoked_serials.len())
            .sum();
        let database_count = snapshot.databases.len();
        let snapshot = Arc::new(snapshot);
        self.ctx.snapshot.store(Arc::clone(&snapshot));
        self.generation.store(next_gen, Ordering::Relaxed);

        for name in &report.removed {
            let removed = lock(&self.listeners).remove(name);
            if let Some(h) = removed {
                h.tasks.iter().for_each(JoinHandle::abort);
                // An aborted task drops its socket only when its runtime next polls it: wait
                // for that, so the line below is true when it is written.
                for t in h.tasks {
                    let _ = t.await;
                }
                tracing::info!(
                    database = name.as_str(),
                    "database disabled; listener closed"
                );
            }
            lock(&self.bind_errors).remove(name);
        }
        for (name, addr) in listens {
            let existing = lock(&self.listeners).get(&name).map(|h| h.configured);
            match existing {
                None => self.bind_one(&name, addr),
                Some(old_addr) if old_addr != addr => tracing::warn!(
                    database = name.as_str(),
                    old = %old_addr,
                    new = %addr,
                    "listen address changed; restart pgmtls to apply it"
                ),
                Some(_) => {}
            }
        }
        for db in snapshot.shared() {
            if lock(&self.listeners).contains_key(&*db.name) {
                tracing::warn!(
                    database = &*db.name,
                    "listen changed to shared; its own port serves it until pgmtls is restarted"
                );
            }
        }
        report.sessions_closed = self.enforce(&snapshot);
        self.record_outcome(trigger, &errors);
        if !errors.is_empty() {
            self.log_failed_databases(trigger, &errors);
            tracing::warn!(
                trigger = trigger.as_str(),
                failed = ?report.failed,
                errors = %errors.all(),
                "reload partly rejected; what failed keeps its previous configuration"
            );
        }
        tracing::info!(
            trigger = trigger.as_str(),
            generation = next_gen,
            added = ?report.added,
            removed = ?report.removed,
            changed = ?report.changed,
            failed = ?report.failed,
            changes = %changes.join("; "),
            databases = database_count,
            ip_rules,
            crl_entries,
            sessions_closed = report.sessions_closed,
            "configuration reloaded"
        );
        Ok(report)
    }

    /// Applies what can change at run time from a re-read config file and says what cannot.
    fn apply_file_config(&self, file: &Config) {
        let enforce = file.enforce_on_live_sessions;
        if self.ctx.sessions.enforcing() != enforce {
            self.ctx.sessions.set_enforcing(enforce);
            tracing::info!(
                enforce_on_live_sessions = enforce,
                "enforce_on_live_sessions changed"
            );
        }
        let pending = restart_needed(&self.config, file);
        if !pending.is_empty() {
            tracing::warn!(
                file = %file.source.as_deref().unwrap_or(Path::new("")).display(),
                keys = ?pending,
                "config file changed; restart pgmtls to apply these keys"
            );
        }
    }

    /// Closes the live sessions `snap` no longer admits, when enforcement is on; returns how
    /// many were told to close.
    fn enforce(&self, snap: &Snapshot) -> usize {
        if !self.ctx.sessions.enforcing() {
            return 0;
        }
        let ended = self.ctx.sessions.enforce(snap, OffsetDateTime::now_utc());
        for (conn_id, reason) in &ended {
            tracing::info!(
                conn_id,
                reason = reason.as_str(),
                error_kind = reason.kind().as_str(),
                "closing live session: no longer admitted"
            );
        }
        ended.len()
    }

    /// Stops accepting, lets live sessions finish for up to `shutdown_grace`, then closes the
    /// rest. Returns once every connection is gone.
    pub async fn shutdown(&self) {
        // `send` would not store the value while nobody subscribes; readiness reads it later.
        self.draining.send_replace(true);
        self.stop.send_replace(true);
        let live = self.ctx.sessions.count();
        tracing::info!(live_sessions = live, grace = ?self.config.timeouts.shutdown_grace, "draining");
        // Handshaking connections too: one finishing TLS now still becomes a session.
        let drained =
            tokio::time::timeout(self.config.timeouts.shutdown_grace, self.limits.drain()).await;
        if drained.is_err() {
            let n = self.ctx.sessions.end_all(EndReason::Shutdown);
            tracing::info!(
                sessions = n,
                "shutdown grace over; closing remaining sessions"
            );
            // Registered sessions, also those still authenticating, end at once but may first
            // cancel their backend's statement (bounded by the upstream connect timeout);
            // handshakes before TLS end by their own deadline. Wait for both, briefly.
            let t = &self.config.timeouts;
            let _ = tokio::time::timeout(
                t.handshake.max(t.upstream_connect) + Duration::from_secs(1),
                self.limits.drain(),
            )
            .await;
        }
        // A connection gives its slots back just before it logs its line: wait for the
        // lines too, or the process may exit between the two and a session's end goes
        // unrecorded. Bounded: a task still running now is one the drain gave up on.
        self.ctx.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.ctx.tasks.wait()).await;
        tracing::info!("stopped");
    }
}

impl Reloadable for App {
    async fn on_trigger(&self, kind: ReloadKind) {
        // The outcome is logged, counted and kept for /status by `reload` itself.
        let _ = self.reload(kind).await;
    }

    fn on_tick(&self) {
        // Certificates expire without any file changing.
        self.enforce(&self.ctx.snapshot.load());
    }
}

impl AdminSource for App {
    fn metrics_text(&self) -> String {
        if let Source::Etcd(e) = &self.source {
            let st = e.status();
            let stale = st.stale_since.map_or(0, |t| {
                (OffsetDateTime::now_utc() - t).whole_seconds().max(0)
            });
            self.ctx.metrics.state_revision.set(st.revision);
            self.ctx.metrics.state_stale_seconds.set(stale);
        }
        self.ctx.metrics.encode()
    }

    /// Ready from the end of start-up (every listener bound, a valid snapshot loaded) until
    /// SIGTERM. A database added later that cannot bind shows as not operational in /status
    /// but does not take the whole process out of a load balancer.
    fn readiness(&self) -> Result<(), &'static str> {
        if *self.draining.borrow() {
            Err("draining")
        } else {
            Ok(())
        }
    }

    fn sessions(&self) -> Vec<crate::sessions::SessionView> {
        self.ctx.sessions.list()
    }

    fn status(&self) -> Status {
        let snap = self.ctx.snapshot.load();
        let st = lock(&self.reload_status).clone();
        // A database whose listener could not be bound is served by nobody: say why, next to
        // the reload's own per-database errors, and do not call the last reload ok.
        let bind_errors = lock(&self.bind_errors).clone();
        let mut database_errors = st.database_errors.clone();
        for (name, e) in &bind_errors {
            database_errors
                .entry(name.clone())
                .or_insert_with(|| e.clone());
        }
        Status {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            ready: self.readiness().is_ok(),
            draining: *self.draining.borrow(),
            generation: self.generation(),
            content_hash: snap.content_hash(),
            last_reload: LastReload {
                at: st.last_attempt.unwrap_or(OffsetDateTime::UNIX_EPOCH),
                trigger: st
                    .last_trigger
                    .map_or("startup", ReloadKind::as_str)
                    .to_owned(),
                ok: st.last_error.is_none() && bind_errors.is_empty(),
                error: st.last_error.clone().or_else(|| {
                    (!bind_errors.is_empty())
                        .then(|| bind_errors.values().cloned().collect::<Vec<_>>().join("\n"))
                }),
                last_success_at: st.last_success,
                database_errors: database_errors.clone(),
            },
            databases: Status::databases_of(&snap, &self.bound_addrs())
                .into_iter()
                .map(|(name, mut db)| {
                    db.reload_error = database_errors.get(&name).cloned();
                    (name, db)
                })
                .collect(),
            renewal: self.renewal_status(),
            handshake_throttle: Some(crate::admin::ThrottleStatus::of(self.limits.throttle())),
            source: Some(match &self.source {
                Source::StateDir(_) => SourceStatus {
                    kind: "state_dir".into(),
                    revision: None,
                    stale_since: None,
                    error: None,
                },
                Source::Etcd(e) => {
                    let f = e.status();
                    SourceStatus {
                        kind: "etcd".into(),
                        revision: Some(f.revision),
                        stale_since: f.stale_since,
                        error: f.error,
                    }
                }
                Source::Quick(_) => SourceStatus {
                    kind: "flags".into(),
                    revision: None,
                    stale_since: None,
                    error: None,
                },
            }),
        }
    }
}
