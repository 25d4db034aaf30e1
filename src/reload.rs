//! Change detection for the control plane: a debounced directory watch, SIGHUP and a periodic
//! content-hash poll, merged into one sequence of reload triggers that never overlap; plus the
//! words the reload log uses to say what changed.
//!
//! Directories are watched, never files: editors replace a file by renaming a new one over it,
//! and Kubernetes updates a ConfigMap or Secret volume by swapping its `..data` symlink; a
//! watch on the file itself would see neither. The poll is the safety net for file systems
//! where inotify says nothing (NFS, some FUSE and overlay mounts) and for an event queue that
//! overflowed.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecursiveMode};
use notify_debouncer_full::{
    new_debouncer, DebounceEventResult, DebouncedEvent, Debouncer, RecommendedCache,
};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::Config;
pub use crate::metrics::ReloadKind;
use crate::snapshot::{DatabaseRuntime, Snapshot};
use crate::state::{ARCHIVE_DIR, AUDIT_LOG, LOCK_FILE};

/// How long the debouncer holds an event before passing it on.
pub const DEBOUNCE: Duration = Duration::from_millis(100);
/// A reload waits until no relevant event has arrived for this long, so a change made of
/// several files (a certificate and its key, a CRL and a certificate record) or a file
/// written in several steps is read once, whole.
pub const SETTLE: Duration = Duration::from_millis(100);
/// ... but no longer than this, so a directory that never stops changing is still reloaded.
pub const SETTLE_MAX: Duration = Duration::from_secs(2);

/// What the reloader drives. Implemented by the application, which owns the snapshot.
pub trait Reloadable: Send + Sync + 'static {
    /// Re-reads and validates everything and applies it, or keeps the previous configuration.
    fn on_trigger(&self, kind: ReloadKind) -> impl Future<Output = ()> + Send;
    /// Called on every poll tick, whether or not anything changed: time-based checks such as
    /// closing sessions whose client certificate has expired.
    fn on_tick(&self);
}

/// What to watch and fingerprint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WatchPlan {
    /// The state directory, watched recursively and fingerprinted (but for the audit log, the
    /// archive and dot-files).
    pub state_dir: Option<PathBuf>,
    /// Single files (the config file, quick mode's PEM files); their directories are watched.
    pub files: Vec<PathBuf>,
}

impl WatchPlan {
    pub fn new(state_dir: Option<&Path>, files: &[&Path]) -> WatchPlan {
        WatchPlan {
            state_dir: state_dir.map(absolute),
            files: files.iter().map(|f| absolute(f)).collect(),
        }
    }

    /// Directories to watch without recursion: those holding `files`, except the state
    /// directory itself, which the recursive watch already covers.
    pub fn flat_dirs(&self) -> Vec<PathBuf> {
        let mut dirs = BTreeSet::new();
        for f in &self.files {
            let dir = f.parent().map(Path::to_path_buf).unwrap_or_default();
            if self.state_dir.as_ref() != Some(&dir) {
                dirs.insert(dir);
            }
        }
        dirs.into_iter().collect()
    }

    /// Whether a watch event may change what a reload would read.
    pub fn is_relevant(&self, path: &Path) -> bool {
        if let Some(root) = &self.state_dir {
            if let Ok(rel) = path.strip_prefix(root) {
                return state_path_is_relevant(rel);
            }
        }
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            return false;
        };
        // `..data`, `..data_tmp` and `..2024_01_01_...` are how Kubernetes swaps a volume.
        name.starts_with("..") || self.files.iter().any(|f| f.file_name() == path.file_name())
    }

    /// SHA-256 over the names, permission bits and contents of everything a reload reads.
    /// Permission bits count because a private key that became readable by others is a
    /// change the loader rejects.
    pub fn fingerprint(&self) -> String {
        let mut h = Sha256::new();
        if let Some(root) = &self.state_dir {
            let mut files = BTreeMap::new();
            collect_tree(root, Path::new(""), 0, &mut files);
            for (rel, entry) in files {
                h.update(rel.as_os_str().as_encoded_bytes());
                h.update(entry);
            }
        }
        for f in &self.files {
            h.update(f.as_os_str().as_encoded_bytes());
            h.update(file_entry(f));
        }
        hex::encode(h.finalize())
    }
}

/// Inside the state directory: everything but the audit log, the writers' lock, archived
/// databases and dot-files (temporary files of atomic writes). `..`-names are Kubernetes'
/// volume swap and count.
fn state_path_is_relevant(rel: &Path) -> bool {
    let mut components = rel.components().peekable();
    if let Some(Component::Normal(first)) = components.peek() {
        if *first == ARCHIVE_DIR || *first == AUDIT_LOG || *first == LOCK_FILE {
            return false;
        }
    }
    components.all(|c| match c {
        Component::Normal(n) => {
            let n = n.to_string_lossy();
            !n.starts_with('.') || n.starts_with("..")
        }
        _ => true,
    })
}

/// Bounds on the fingerprint walk, so a symlink loop or a runaway tree cannot stall the poll.
const MAX_DEPTH: usize = 8;
const MAX_FILES: usize = 10_000;

fn collect_tree(dir: &Path, rel: &Path, depth: usize, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
    if depth > MAX_DEPTH || out.len() >= MAX_FILES {
        return;
    }
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            out.insert(
                rel.to_path_buf(),
                format!("dir error {:?}", e.kind()).into_bytes(),
            );
            return;
        }
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        // Dot-files are temporaries of atomic writes and Kubernetes' `..data` machinery, whose
        // content is reached through the ordinary names that link into it. At the top, the
        // audit log and the archive are written by the CLI but never read by a reload.
        let top_level_noise =
            depth == 0 && (name == AUDIT_LOG || name == ARCHIVE_DIR || name == LOCK_FILE);
        if name.to_string_lossy().starts_with('.') || top_level_noise {
            continue;
        }
        let path = entry.path();
        let rel = rel.join(&name);
        // `metadata` follows symlinks, as the loader does.
        match std::fs::metadata(&path) {
            Ok(m) if m.is_dir() => collect_tree(&path, &rel, depth + 1, out),
            _ => {
                out.insert(rel, file_entry(&path));
            }
        }
    }
}

fn file_entry(path: &Path) -> Vec<u8> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .map(|m| m.permissions().mode() & 0o7777)
        .unwrap_or(0);
    let mut out = format!("mode {mode:o}\n").into_bytes();
    match std::fs::read(path) {
        Ok(bytes) => out.extend(Sha256::digest(&bytes)),
        Err(e) => out.extend(format!("error {:?}", e.kind()).into_bytes()),
    }
    out
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// The running reloader: keeps the watch alive and takes explicit requests (SIGHUP).
pub struct Reloader {
    requests: mpsc::UnboundedSender<ReloadKind>,
    task: JoinHandle<()>,
    // Held so the watch channel stays open even when the file watch could not start.
    _fs_tx: Arc<watch::Sender<u64>>,
    // Dropping the debouncer stops the watch; it lives as long as the reloader.
    _watch: SharedWatch,
}

/// The running file watch, shared with the reload loop so that a state directory that did not
/// exist at start-up is watched from the moment it appears.
type SharedWatch =
    Arc<std::sync::Mutex<Option<Debouncer<notify::RecommendedWatcher, RecommendedCache>>>>;

impl Reloader {
    /// Starts watching `plan` and polling every `poll` (zero disables the poll). `baseline`
    /// is the fingerprint taken before the first load, so a change racing start-up is still
    /// caught by the poll. Watch failures are logged, not fatal: SIGHUP and the poll remain.
    pub fn start<R: Reloadable>(
        target: Arc<R>,
        plan: WatchPlan,
        baseline: String,
        poll: Duration,
    ) -> Reloader {
        let plan = Arc::new(plan);
        let (fs_tx, fs_rx) = watch::channel(0u64);
        let fs_tx = Arc::new(fs_tx);
        let (watch, state_dir_watched) = start_watch(&plan, Arc::clone(&fs_tx));
        let watch: SharedWatch = Arc::new(std::sync::Mutex::new(watch));
        let (requests, req_rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(run(
            target,
            Arc::clone(&plan),
            fs_rx,
            req_rx,
            poll,
            baseline,
            (Arc::clone(&watch), state_dir_watched),
        ));
        Reloader {
            requests,
            task,
            _fs_tx: fs_tx,
            _watch: watch,
        }
    }

    /// Asks for a reload (SIGHUP). Requests made while a reload runs are merged into one.
    pub fn request(&self, kind: ReloadKind) {
        let _ = self.requests.send(kind);
    }
}

impl Drop for Reloader {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts the watch; also says whether the state directory itself is watched (it cannot be
/// while it does not exist).
fn start_watch(
    plan: &Arc<WatchPlan>,
    fs_tx: Arc<watch::Sender<u64>>,
) -> (
    Option<Debouncer<notify::RecommendedWatcher, RecommendedCache>>,
    bool,
) {
    let filter = Arc::clone(plan);
    let handler = move |result: DebounceEventResult| {
        let relevant = match result {
            Ok(events) => events.iter().any(|e| event_is_relevant(&filter, e)),
            Err(errors) => {
                for e in &errors {
                    tracing::warn!(error = %e, "file watch error; reloading to be safe");
                }
                true
            }
        };
        if relevant {
            fs_tx.send_modify(|n| *n = n.wrapping_add(1));
        }
    };
    let mut debouncer = match new_debouncer(DEBOUNCE, None, handler) {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(error = %e, "cannot start the file watch; relying on SIGHUP and the poll");
            return (None, false);
        }
    };
    let mut targets: Vec<(PathBuf, RecursiveMode)> = plan
        .flat_dirs()
        .into_iter()
        .map(|d| (d, RecursiveMode::NonRecursive))
        .collect();
    let mut state_dir_watched = false;
    if let Some(root) = &plan.state_dir {
        if root.exists() {
            targets.push((root.clone(), RecursiveMode::Recursive));
        } else {
            tracing::warn!(
                dir = %root.display(),
                "state directory does not exist yet: no database is served until it does; it \
                 is watched from when it appears (the poll and SIGHUP also find it)"
            );
        }
    }
    for (dir, mode) in targets {
        match debouncer.watch(&dir, mode) {
            Ok(()) => {
                tracing::debug!(dir = %dir.display(), ?mode, "watching");
                state_dir_watched |= plan.state_dir.as_ref() == Some(&dir);
            }
            Err(e) => tracing::warn!(
                dir = %dir.display(),
                error = %e,
                "cannot watch directory; changes there are seen on SIGHUP and by the poll"
            ),
        }
    }
    (Some(debouncer), state_dir_watched)
}

/// Watches the state directory once it exists, if it could not be watched before; returns
/// whether it is watched now.
fn watch_state_dir_if_new(plan: &WatchPlan, watch: &SharedWatch) -> bool {
    let Some(root) = plan.state_dir.as_ref().filter(|r| r.is_dir()) else {
        return false;
    };
    let mut guard = watch.lock().unwrap_or_else(|p| p.into_inner());
    let Some(debouncer) = guard.as_mut() else {
        return false;
    };
    match debouncer.watch(root, RecursiveMode::Recursive) {
        Ok(()) => {
            tracing::info!(dir = %root.display(), "state directory appeared; watching it");
            true
        }
        Err(e) => {
            tracing::debug!(dir = %root.display(), error = %e, "cannot watch the state directory yet");
            false
        }
    }
}

fn event_is_relevant(plan: &WatchPlan, e: &DebouncedEvent) -> bool {
    if e.need_rescan() {
        return true;
    }
    match e.kind {
        // Opening or reading a file changes nothing (and the reload itself reads them all);
        // closing a file opened for writing ends an in-place write.
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => {}
        EventKind::Access(_) => return false,
        _ => {}
    }
    e.paths.iter().any(|p| plan.is_relevant(p))
}

async fn run<R: Reloadable>(
    target: Arc<R>,
    plan: Arc<WatchPlan>,
    mut fs_rx: watch::Receiver<u64>,
    mut req_rx: mpsc::UnboundedReceiver<ReloadKind>,
    poll: Duration,
    mut seen: String,
    (watch, mut state_dir_watched): (SharedWatch, bool),
) {
    let mut ticker = (!poll.is_zero()).then(|| {
        let mut t = tokio::time::interval_at(Instant::now() + poll, poll);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    });
    loop {
        let kind = tokio::select! {
            // The sender lives as long as the reloader, so this does not fail while it runs.
            Ok(()) = fs_rx.changed() => {
                settle(&mut fs_rx).await;
                ReloadKind::watch
            }
            Some(kind) = req_rx.recv() => kind,
            _ = tick(&mut ticker) => {
                target.on_tick();
                if fingerprint(&plan).await == seen {
                    continue;
                }
                ReloadKind::poll
            }
        };
        // A state directory created since start-up (its parent's watch, the poll or SIGHUP
        // brought us here) is watched from now on, so what is written into it is seen at once.
        if !state_dir_watched {
            state_dir_watched = watch_state_dir_if_new(&plan, &watch);
        }
        // Whatever else arrived so far is covered by the reload about to read everything; an
        // explicit request among it names the reload.
        let mut kind = kind;
        fs_rx.borrow_and_update();
        while let Ok(k) = req_rx.try_recv() {
            kind = k;
        }
        let now = fingerprint(&plan).await;
        if kind == ReloadKind::watch && now == seen {
            // Late or duplicate events of a change already read, or a file touched without
            // changing: reading everything again would only repeat the last outcome.
            tracing::debug!("watch event changed nothing a reload reads; not reloading");
            continue;
        }
        seen = now;
        target.on_trigger(kind).await;
    }
}

/// Waits until the watch has been quiet for [`SETTLE`], at most [`SETTLE_MAX`].
async fn settle(rx: &mut watch::Receiver<u64>) {
    let give_up = Instant::now() + SETTLE_MAX;
    loop {
        let quiet = tokio::time::timeout(SETTLE, rx.changed()).await.is_err();
        if quiet || Instant::now() >= give_up {
            return;
        }
    }
}

async fn tick(ticker: &mut Option<tokio::time::Interval>) {
    match ticker {
        Some(t) => {
            t.tick().await;
        }
        None => std::future::pending().await,
    }
}

async fn fingerprint(plan: &Arc<WatchPlan>) -> String {
    let plan = Arc::clone(plan);
    // Reads files: keep it off the async workers.
    tokio::task::spawn_blocking(move || plan.fingerprint())
        .await
        .unwrap_or_default()
}

/// How long a reload waits for a CLI write in progress before reading anyway.
const LOCK_WAIT: Duration = Duration::from_secs(2);

/// Takes a shared lock on `STATE/.lock`, the lock the CLI holds exclusively while it writes, so
/// a change made of several files (a renewed certificate and its key, a revocation's CRL and
/// record) is read whole. Best effort: a missing or unreadable lock file (a read-only mount
/// has none) or a writer holding it past [`LOCK_WAIT`] means reading without it; every file
/// is still replaced atomically, and the watch sees the writer's last file and reloads again.
pub fn read_lock(state_root: &Path) -> Option<std::fs::File> {
    let file = std::fs::File::open(state_root.join(LOCK_FILE)).ok()?;
    let give_up = std::time::Instant::now() + LOCK_WAIT;
    loop {
        match file.try_lock_shared() {
            Ok(()) => return Some(file),
            Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < give_up => {
                // flock has no timed wait; this runs on a blocking thread.
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => {
                tracing::warn!(error = %e, "state directory lock not taken; reading without it");
                return None;
            }
        }
    }
}

/// Settings of the config file that apply only at start-up. Everything in the file except
/// `enforce_on_live_sessions` needs a restart: listeners, the admin socket, the connection
/// limit's semaphore and the log subscriber are built once, and the timeouts are copied into
/// every connection's context.
pub fn restart_needed(running: &Config, file: &Config) -> Vec<&'static str> {
    let mut out = Vec::new();
    let mut check = |differs: bool, key: &'static str| {
        if differs {
            out.push(key);
        }
    };
    check(running.state_dir != file.state_dir, "state_dir");
    check(running.etcd != file.etcd, "etcd");
    check(running.admin_listen != file.admin_listen, "admin_listen");
    check(
        running.admin_status_from != file.admin_status_from,
        "admin_status_from",
    );
    check(
        running.timeouts.handshake != file.timeouts.handshake,
        "handshake_timeout",
    );
    check(
        running.timeouts.upstream_connect != file.timeouts.upstream_connect,
        "upstream_connect_timeout",
    );
    check(running.timeouts.auth != file.timeouts.auth, "auth_timeout");
    check(
        running.timeouts.shutdown_grace != file.timeouts.shutdown_grace,
        "shutdown_grace",
    );
    check(
        running.max_connections != file.max_connections,
        "max_connections",
    );
    check(
        running.max_handshakes != file.max_handshakes,
        "max_handshakes",
    );
    check(
        running.max_handshakes_per_source != file.max_handshakes_per_source,
        "max_handshakes_per_source",
    );
    let (rt, ft) = (running.handshake_throttle, file.handshake_throttle);
    check(rt.burst != ft.burst, "handshake_throttle_burst");
    check(rt.backoff != ft.backoff, "handshake_throttle_backoff");
    check(
        rt.max_backoff != ft.max_backoff,
        "handshake_throttle_max_backoff",
    );
    check(rt.decay != ft.decay, "handshake_throttle_decay");
    check(
        rt.max_prefixes != ft.max_prefixes,
        "handshake_throttle_prefixes",
    );
    let (rk, fk) = (running.timeouts.keepalive, file.timeouts.keepalive);
    check(rk.idle != fk.idle, "tcp_keepalives_idle");
    check(rk.interval != fk.interval, "tcp_keepalives_interval");
    check(rk.count != fk.count, "tcp_keepalives_count");
    check(rk.user_timeout != fk.user_timeout, "tcp_user_timeout");
    check(
        running.reload_poll_interval != file.reload_poll_interval,
        "reload_poll_interval",
    );
    check(running.log_format != file.log_format, "log_format");
    check(
        running.worker_threads != file.worker_threads,
        "worker_threads",
    );
    check(
        running.proxy_protocol_from != file.proxy_protocol_from,
        "proxy_protocol_from",
    );
    // A replica's id is inside every cancel key it has handed out, so the fleet keys (and
    // the peer certificate files they name) stay as they were at start.
    let (rf, ff) = (running.fleet.as_ref(), file.fleet.as_ref());
    check(
        rf.map(|f| f.replica_id) != ff.map(|f| f.replica_id),
        "replica_id",
    );
    check(
        rf.map(|f| f.peer_listen) != ff.map(|f| f.peer_listen),
        "peer_listen",
    );
    check(rf.map(|f| &f.peers) != ff.map(|f| &f.peers), "peers");
    check(rf.map(|f| &f.tls) != ff.map(|f| &f.tls), "peer_tls");
    check(running.shared_listen != file.shared_listen, "shared_listen");
    check(
        running.default_database != file.default_database,
        "default_database",
    );
    out
}

/// One short phrase per thing that differs between two snapshots, for the reload log line:
/// databases added and removed, rules added and removed by id, certificates replaced, CRL
/// size. Never certificate contents or keys.
pub fn describe_changes(old: &Snapshot, new: &Snapshot) -> Vec<String> {
    let mut out = Vec::new();
    for (name, db) in &new.databases {
        match old.databases.get(name) {
            None => out.push(format!(
                "{name}: added (listen {}, {} ip rules, {} crl entries)",
                db.settings.listen,
                db.rules.len(),
                db.tls.revoked_serials.len()
            )),
            Some(o) if o.content_hash != db.content_hash => {
                describe_database(name, o, db, &mut out)
            }
            Some(_) => {}
        }
    }
    for name in old.databases.keys() {
        if !new.databases.contains_key(name) {
            out.push(format!("{name}: removed"));
        }
    }
    out
}

/// `NAME: WHAT a -> b (+added ~changed -removed)` for an IP rule list or trusted ranges.
fn describe_list(
    name: &str,
    what: &str,
    old: &[crate::state::IpRule],
    new: &[crate::state::IpRule],
) -> String {
    let before: BTreeMap<&str, _> = old.iter().map(|r| (r.id.as_str(), r)).collect();
    let after: BTreeMap<&str, _> = new.iter().map(|r| (r.id.as_str(), r)).collect();
    let mut parts = Vec::new();
    for (id, r) in &after {
        match before.get(id) {
            None => parts.push(format!("+{id}")),
            Some(o) if o != r => parts.push(format!("~{id}")),
            Some(_) => {}
        }
    }
    for id in before.keys() {
        if !after.contains_key(id) {
            parts.push(format!("-{id}"));
        }
    }
    format!(
        "{name}: {what} {} -> {} ({})",
        old.len(),
        new.len(),
        parts.join(" ")
    )
}

fn describe_database(
    name: &str,
    old: &DatabaseRuntime,
    new: &DatabaseRuntime,
    out: &mut Vec<String>,
) {
    let (a, b) = (&old.inputs, &new.inputs);
    if a.settings != b.settings {
        out.push(format!("{name}: settings changed"));
    }
    if a.rules != b.rules {
        out.push(describe_list(name, "ip rules", &old.rules, &new.rules));
    }
    if a.trusted_ips != b.trusted_ips {
        out.push(describe_list(
            name,
            "trusted ips",
            &old.trusted_ips,
            &new.trusted_ips,
        ));
    }
    if a.server_cert != b.server_cert || a.server_key != b.server_key {
        out.push(format!("{name}: server certificate replaced"));
    }
    if a.ca != b.ca {
        out.push(format!("{name}: client CA replaced"));
    }
    if a.crl != b.crl {
        out.push(format!(
            "{name}: crl {} -> {} entries",
            old.tls.revoked_serials.len(),
            new.tls.revoked_serials.len()
        ));
    }
    if a.certificates != b.certificates {
        let before: BTreeSet<&str> = old.certificates.values().map(|c| c.id.as_str()).collect();
        let after: BTreeSet<&str> = new.certificates.values().map(|c| c.id.as_str()).collect();
        let mut parts: Vec<String> = after
            .difference(&before)
            .map(|id| format!("+{id}"))
            .collect();
        parts.extend(before.difference(&after).map(|id| format!("-{id}")));
        // A record newly marked `revoked_at` is a revocation; say which.
        let revoked = |db: &DatabaseRuntime| -> BTreeSet<String> {
            db.certificates
                .values()
                .filter(|c| c.revoked_at.is_some())
                .map(|c| c.id.clone())
                .collect()
        };
        parts.extend(
            revoked(new)
                .difference(&revoked(old))
                .map(|id| format!("revoked {id}")),
        );
        if parts.is_empty() {
            parts.push("updated".into());
        }
        out.push(format!(
            "{name}: certificate records {} -> {} ({})",
            before.len(),
            after.len(),
            parts.join(" ")
        ));
    }
    if a.upstream_ca != b.upstream_ca {
        out.push(format!("{name}: upstream CA replaced"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_paths_that_matter_and_those_that_do_not() {
        let plan = WatchPlan::new(Some(Path::new("/s")), &[Path::new("/etc/p/pgmtls.yaml")]);
        for yes in [
            "/s/databases/orders/ip-rules.yaml",
            "/s/databases/orders",
            "/s/databases",
            "/s/..data",
            "/s/..2026_01_01_00_00_00.1/databases/orders/crl.pem",
            "/etc/p/pgmtls.yaml",
            "/etc/p/..data",
        ] {
            assert!(plan.is_relevant(Path::new(yes)), "{yes}");
        }
        for no in [
            "/s/audit.log",
            "/s/.lock",
            "/s/archive/orders-2026/ip-rules.yaml",
            "/s/databases/orders/.ip-rules.yaml.tmp-42",
            "/s/databases/.orders.tmp/database.yaml",
            "/etc/p/other.yaml",
        ] {
            assert!(!plan.is_relevant(Path::new(no)), "{no}");
        }
    }

    #[test]
    fn flat_dirs_skip_the_state_dir_and_repeat_nothing() {
        let plan = WatchPlan::new(
            Some(Path::new("/s")),
            &[
                Path::new("/s/pgmtls.yaml"),
                Path::new("/e/a.pem"),
                Path::new("/e/b.pem"),
            ],
        );
        assert_eq!(plan.flat_dirs(), vec![PathBuf::from("/e")]);
    }

    #[test]
    fn fingerprint_follows_content_and_mode_but_not_temporaries() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("databases/orders");
        std::fs::create_dir_all(&db).unwrap();
        std::fs::write(db.join("ip-rules.yaml"), "rules: []\n").unwrap();
        std::fs::write(dir.path().join("audit.log"), "x").unwrap();
        let plan = WatchPlan::new(Some(dir.path()), &[]);
        let a = plan.fingerprint();
        assert_eq!(a, plan.fingerprint());
        std::fs::write(dir.path().join("audit.log"), "more").unwrap();
        std::fs::write(db.join(".ip-rules.yaml.tmp-1"), "junk").unwrap();
        assert_eq!(
            a,
            plan.fingerprint(),
            "audit log and temporaries do not count"
        );
        std::fs::set_permissions(
            db.join("ip-rules.yaml"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        let b = plan.fingerprint();
        std::fs::set_permissions(
            db.join("ip-rules.yaml"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        let c = plan.fingerprint();
        assert_ne!(b, c, "mode counts");
        std::fs::write(db.join("ip-rules.yaml"), "rules: [] \n").unwrap();
        assert_ne!(c, plan.fingerprint(), "content counts");
    }

    #[derive(Debug, PartialEq)]
    enum Seen {
        Trigger(ReloadKind),
        Tick,
    }

    struct Fake(mpsc::UnboundedSender<Seen>);

    impl Reloadable for Fake {
        async fn on_trigger(&self, kind: ReloadKind) {
            let _ = self.0.send(Seen::Trigger(kind));
        }
        fn on_tick(&self) {
            let _ = self.0.send(Seen::Tick);
        }
    }

    async fn next(rx: &mut mpsc::UnboundedReceiver<Seen>) -> Seen {
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("an event within 10 s")
            .unwrap()
    }

    #[tokio::test]
    async fn poll_catches_what_the_watch_could_not_see() {
        // The state directory does not exist yet, so it cannot be watched.
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("state");
        let plan = WatchPlan::new(Some(&root), &[]);
        let baseline = plan.fingerprint();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let _r = Reloader::start(
            Arc::new(Fake(tx)),
            plan,
            baseline,
            Duration::from_millis(30),
        );
        // Ticks while nothing changes trigger nothing.
        assert_eq!(next(&mut rx).await, Seen::Tick);
        assert_eq!(next(&mut rx).await, Seen::Tick);
        std::fs::create_dir_all(root.join("databases/orders")).unwrap();
        std::fs::write(root.join("databases/orders/ip-rules.yaml"), "rules: []\n").unwrap();
        // The tick that sees it may be one already under way.
        let mut ticks = 0;
        loop {
            match next(&mut rx).await {
                Seen::Tick => {
                    ticks += 1;
                    assert!(ticks <= 2, "the poll did not notice the change");
                }
                other => {
                    assert_eq!(other, Seen::Trigger(ReloadKind::poll));
                    break;
                }
            }
        }
        // Reloaded once: the next ticks are quiet again.
        assert_eq!(next(&mut rx).await, Seen::Tick);
        assert_eq!(next(&mut rx).await, Seen::Tick);
    }

    #[tokio::test]
    async fn watch_and_requests_trigger_reloads_and_burst_of_writes_is_one_reload() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("databases/orders");
        std::fs::create_dir_all(&db).unwrap();
        let plan = WatchPlan::new(Some(dir.path()), &[]);
        let baseline = plan.fingerprint();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let r = Reloader::start(Arc::new(Fake(tx)), plan, baseline, Duration::ZERO);
        for i in 0..20 {
            std::fs::write(db.join("ip-rules.yaml"), format!("# {i}\n")).unwrap();
        }
        assert_eq!(next(&mut rx).await, Seen::Trigger(ReloadKind::watch));
        r.request(ReloadKind::sighup);
        // Had the burst caused a second reload, it would arrive before the SIGHUP's.
        assert_eq!(next(&mut rx).await, Seen::Trigger(ReloadKind::sighup));
    }

    #[test]
    fn restart_needed_names_every_start_up_setting() {
        let a = Config::default();
        let mut b = a.clone();
        b.enforce_on_live_sessions = false;
        assert!(restart_needed(&a, &b).is_empty());
        b.max_connections = 5;
        b.admin_listen = None;
        b.admin_status_from = Vec::new();
        b.worker_threads = Some(1);
        b.proxy_protocol_from = vec!["10.0.0.0/8".parse().unwrap()];
        b.max_handshakes_per_source = 1;
        b.timeouts.keepalive.user_timeout = None;
        b.shared_listen = Some("127.0.0.1:2".parse().unwrap());
        b.default_database = Some("orders".into());
        b.fleet = Some(crate::fleet::FleetConfig {
            replica_id: 1,
            peer_listen: "127.0.0.1:1".parse().unwrap(),
            peers: Vec::new(),
            tls: crate::fleet::PeerTlsPaths {
                cert: "c".into(),
                key: "k".into(),
                ca: "a".into(),
            },
        });
        assert_eq!(
            restart_needed(&a, &b),
            vec![
                "admin_listen",
                "admin_status_from",
                "max_connections",
                "max_handshakes_per_source",
                "tcp_user_timeout",
                "worker_threads",
                "proxy_protocol_from",
                "replica_id",
                "peer_listen",
                "peers",
                "peer_tls",
                "shared_listen",
                "default_database"
            ]
        );
    }
}
