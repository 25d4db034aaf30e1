//! Live sessions, so a reload can close the ones whose admission no longer holds, and so a
//! CancelRequest is forwarded only for a backend this proxy actually opened.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use time::OffsetDateTime;
use tokio::sync::watch;

use crate::allowlist::AdmittedBy;
use crate::conn::error::ErrorKind;
use crate::conn::tls::ClientIdentity;
use crate::snapshot::Snapshot;
use crate::wire::frontend::CancelKey;

/// Why a live session was closed by enforcement. Logged as `detail`; counted as `revoked_live`.
/// New reasons go at the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    DatabaseDisabled,
    RuleRemoved,
    CertificateRevoked,
    CertificateExpired,
    Shutdown,
    /// The trusted range that admitted a session (without an IP rule) was deleted.
    TrustedIpRemoved,
    /// An IP rule now covers the address of a session that presented no certificate: the
    /// rule's certificate requirement takes precedence over the trusted range.
    CertificateRequired,
}

impl EndReason {
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::DatabaseDisabled => "database disabled",
            EndReason::RuleRemoved => "ip rule removed",
            EndReason::CertificateRevoked => "client certificate revoked",
            EndReason::CertificateExpired => "client certificate expired",
            EndReason::Shutdown => "shutdown grace period over",
            EndReason::TrustedIpRemoved => "trusted ip range removed",
            EndReason::CertificateRequired => "ip rule requires a client certificate",
        }
    }

    pub fn kind(self) -> ErrorKind {
        match self {
            EndReason::Shutdown => ErrorKind::Shutdown,
            _ => ErrorKind::RevokedLive,
        }
    }

    /// The reason a connection that has not yet reached Postgres is refused with: the same
    /// one a fresh connection would get under the configuration now in force.
    pub fn refusal_kind(self) -> ErrorKind {
        match self {
            EndReason::DatabaseDisabled => ErrorKind::DatabaseDisabled,
            EndReason::RuleRemoved => ErrorKind::IpNotAllowed,
            EndReason::CertificateRevoked => ErrorKind::ClientCertRevoked,
            EndReason::CertificateExpired => ErrorKind::ClientCertExpired,
            EndReason::Shutdown => ErrorKind::Shutdown,
            EndReason::TrustedIpRemoved => ErrorKind::IpNotAllowed,
            EndReason::CertificateRequired => ErrorKind::ClientCertMissing,
        }
    }
}

struct Entry {
    database: Arc<str>,
    ip: IpAddr,
    /// Which list admitted the session when it was registered.
    admitted_by: AdmittedBy,
    /// Empty when the client presented no certificate (admitted by a trusted range).
    serial: String,
    not_after: Option<OffsetDateTime>,
    kill: watch::Sender<Option<EndReason>>,
    /// What `/sessions` shows; boxed so the map's entries stay small for the enforcement scan.
    shown: Box<Shown>,
}

/// Who a session is, for the operator: set at registration and after the StartupMessage.
struct Shown {
    client_addr: SocketAddr,
    cert_id: Option<String>,
    common_name: Option<String>,
    since: OffsetDateTime,
    user: Option<String>,
    pg_database: Option<String>,
    active: bool,
}

/// One live session as `/sessions` lists it (docs/METRICS.md).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SessionView {
    pub database: String,
    pub client_addr: String,
    #[serde(default)]
    pub certificate_id: Option<String>,
    pub certificate_serial: String,
    #[serde(default)]
    pub common_name: Option<String>,
    /// The Postgres user and database of the StartupMessage, once read.
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub pg_database: Option<String>,
    /// `authenticating` until Postgres sent ReadyForQuery, then `active`.
    pub state: String,
    /// Which list admitted the session: `mtls_rule` or `trusted_ip`.
    #[serde(default)]
    pub admitted_by: String,
    #[serde(with = "time::serde::rfc3339")]
    pub since: OffsetDateTime,
}

impl Entry {
    /// Why this session may no longer run under `snap`, if it may not.
    fn verdict(&self, snap: &Snapshot, now: OffsetDateTime) -> Option<EndReason> {
        let Some(db) = snap.databases.get(&*self.database) else {
            return Some(EndReason::DatabaseDisabled);
        };
        match db.admit(self.ip).map(|a| a.by) {
            None if self.admitted_by == AdmittedBy::TrustedIp => {
                return Some(EndReason::TrustedIpRemoved)
            }
            None => return Some(EndReason::RuleRemoved),
            Some(by) if by.requires_certificate() && self.serial.is_empty() => {
                return Some(EndReason::CertificateRequired)
            }
            Some(_) => {}
        }
        if db.is_revoked(&self.serial) {
            Some(EndReason::CertificateRevoked)
        } else if self.not_after.is_some_and(|t| t < now) {
            Some(EndReason::CertificateExpired)
        } else {
            None
        }
    }
}

struct CancelEntry {
    database: Arc<str>,
    real: Option<CancelKey>,
}

#[derive(Default)]
pub struct Sessions {
    live: Mutex<HashMap<u64, Entry>>,
    /// Client-visible cancel key -> the session's database and, in a fleet, the backend's own
    /// key (a single node hands out the backend's key itself: `None`).
    cancel_keys: Mutex<HashMap<CancelKey, CancelEntry>>,
    /// `enforce_on_live_sessions: false`. Stored negated so that `Default` enforces.
    keep_live: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding these locks cannot leave the maps inconsistent (single inserts
    // and removes), so recover instead of propagating the poison.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Removes the session (and its cancel key) from the registry when the connection ends.
pub struct SessionGuard {
    sessions: Arc<Sessions>,
    conn_id: u64,
    cancel_key: Option<CancelKey>,
    pub kill: watch::Receiver<Option<EndReason>>,
}

impl SessionGuard {
    /// Records the StartupMessage's user and database, for `/sessions`.
    pub fn set_startup(&self, user: Option<&str>, pg_database: Option<&str>) {
        if let Some(e) = lock(&self.sessions.live).get_mut(&self.conn_id) {
            e.shown.user = user.map(str::to_owned);
            e.shown.pg_database = pg_database.map(str::to_owned);
        }
    }

    /// Marks the session authenticated (Postgres sent ReadyForQuery), for `/sessions`.
    pub fn set_active(&self) {
        if let Some(e) = lock(&self.sessions.live).get_mut(&self.conn_id) {
            e.shown.active = true;
        }
    }

    /// The backend's own cancel key, once the authentication phase has learned it.
    pub fn cancel_key(&self) -> Option<CancelKey> {
        let visible = self.cancel_key.as_ref()?;
        let keys = lock(&self.sessions.cancel_keys);
        let e = keys.get(visible)?;
        Some(e.real.clone().unwrap_or_else(|| visible.clone()))
    }

    /// Why the session was told to end, if it was.
    pub fn end_reason(&self) -> Option<EndReason> {
        *self.kill.borrow()
    }

    /// Resolves when the session is told to end, with the reason.
    pub async fn killed(&mut self) -> EndReason {
        match self.kill.wait_for(|v| v.is_some()).await {
            Ok(v) => v.unwrap_or(EndReason::Shutdown),
            // The registry dropped the sender: the session is gone from it, as at shutdown.
            Err(_) => EndReason::Shutdown,
        }
    }

    /// Records the backend's key `real` and, in a fleet, the key the client was given
    /// instead. A visible key already held by another live session (a collision of the random
    /// part with the same process id on another upstream) is not taken over: this session's
    /// cancels then find nothing, which is safe, where a takeover would cancel a stranger's
    /// query. Returns whether the key was recorded.
    pub fn set_cancel_key(
        &mut self,
        real: CancelKey,
        visible: Option<CancelKey>,
        database: Arc<str>,
    ) -> bool {
        let (visible, real) = match visible {
            Some(v) => (v, Some(real)),
            None => (real, None),
        };
        let mut keys = lock(&self.sessions.cancel_keys);
        if keys.contains_key(&visible) {
            return false;
        }
        keys.insert(visible.clone(), CancelEntry { database, real });
        drop(keys);
        self.cancel_key = Some(visible);
        true
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        lock(&self.sessions.live).remove(&self.conn_id);
        if let Some(k) = &self.cancel_key {
            lock(&self.sessions.cancel_keys).remove(k);
        }
    }
}

impl Sessions {
    pub fn register(
        self: &Arc<Self>,
        conn_id: u64,
        database: Arc<str>,
        client_addr: SocketAddr,
        admitted_by: AdmittedBy,
        identity: &ClientIdentity,
    ) -> SessionGuard {
        let (kill, rx) = watch::channel(None);
        let shown = Box::new(Shown {
            client_addr,
            cert_id: identity.cert_id.clone(),
            common_name: identity.common_name.clone(),
            since: OffsetDateTime::now_utc(),
            user: None,
            pg_database: None,
            active: false,
        });
        lock(&self.live).insert(
            conn_id,
            Entry {
                database,
                ip: client_addr.ip(),
                admitted_by,
                serial: identity.serial.clone(),
                not_after: identity.not_after,
                kill,
                shown,
            },
        );
        SessionGuard {
            sessions: self.clone(),
            conn_id,
            cancel_key: None,
            kill: rx,
        }
    }

    /// The backend key behind the client-visible `key`, if it belongs to a session of
    /// `database` that this process relays.
    pub fn real_cancel_key(&self, key: &CancelKey, database: &str) -> Option<CancelKey> {
        lock(&self.cancel_keys)
            .get(key)
            .filter(|e| &*e.database == database)
            .map(|e| e.real.clone().unwrap_or_else(|| key.clone()))
    }

    /// The database of the session that handed out `key`, if this process relays it: how a
    /// CancelRequest on the shared listener, which carries no SNI, finds its database.
    pub fn cancel_database(&self, key: &CancelKey) -> Option<Arc<str>> {
        lock(&self.cancel_keys)
            .get(key)
            .map(|e| Arc::clone(&e.database))
    }

    /// The live sessions, oldest first: `/sessions`.
    pub fn list(&self) -> Vec<SessionView> {
        let mut all: Vec<SessionView> = lock(&self.live)
            .values()
            .map(|e| SessionView {
                database: e.database.to_string(),
                client_addr: e.shown.client_addr.to_string(),
                certificate_id: e.shown.cert_id.clone(),
                certificate_serial: e.serial.clone(),
                common_name: e.shown.common_name.clone(),
                user: e.shown.user.clone(),
                pg_database: e.shown.pg_database.clone(),
                state: if e.shown.active {
                    "active"
                } else {
                    "authenticating"
                }
                .to_owned(),
                admitted_by: e.admitted_by.as_str().to_owned(),
                since: e.shown.since,
            })
            .collect();
        all.sort_by(|a, b| (a.since, &a.client_addr).cmp(&(b.since, &b.client_addr)));
        all
    }

    pub fn count(&self) -> usize {
        lock(&self.live).len()
    }

    /// Whether reloads close live sessions that are no longer admitted
    /// (`enforce_on_live_sessions`).
    pub fn enforcing(&self) -> bool {
        !self.keep_live.load(Ordering::Relaxed)
    }

    pub fn set_enforcing(&self, on: bool) {
        self.keep_live.store(!on, Ordering::Relaxed);
    }

    /// Re-admits a session just registered against `snap`, the snapshot published now, and
    /// says why it may not run if it may not. The connection was admitted at accept under the
    /// snapshot of that moment and may have spent seconds in its handshake since; this check
    /// holds whatever `enforce_on_live_sessions` says, because nothing has run yet. A reload
    /// that swaps the snapshot after this load runs `enforce` after the swap, and so sees this
    /// session: registering first and loading second leaves no gap.
    pub fn admit(&self, conn_id: u64, snap: &Snapshot, now: OffsetDateTime) -> Option<EndReason> {
        let live = lock(&self.live);
        live.get(&conn_id).and_then(|e| e.verdict(snap, now))
    }

    /// Signals every session whose admission `snap` no longer grants; returns how many, by
    /// reason. Sessions still allowed are not touched.
    pub fn enforce(&self, snap: &Snapshot, now: OffsetDateTime) -> Vec<(u64, EndReason)> {
        let live = lock(&self.live);
        let mut ended = Vec::new();
        for (id, e) in live.iter() {
            // A session already told to end is not counted twice.
            if e.kill.borrow().is_some() {
                continue;
            }
            if let Some(r) = e.verdict(snap, now) {
                if e.kill.send(Some(r)).is_ok() {
                    ended.push((*id, r));
                }
            }
        }
        ended
    }

    /// Signals every session to end (shutdown grace over).
    pub fn end_all(&self, reason: EndReason) -> usize {
        lock(&self.live)
            .values()
            .filter(|e| e.kill.send(Some(reason)).is_ok())
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(pid: u32, s: [u8; 4]) -> CancelKey {
        CancelKey::new(pid, &s).unwrap()
    }

    #[test]
    fn the_visible_key_maps_to_the_real_one_and_only_for_its_database() {
        let sessions = Arc::new(Sessions::default());
        let mut g = sessions.register(
            1,
            "orders".into(),
            "10.0.0.1:5000".parse().unwrap(),
            AdmittedBy::MtlsRule,
            &ClientIdentity::default(),
        );
        let (real, visible) = (key(7, [1, 2, 3, 4]), key(7, [2, 9, 9, 9]));
        assert!(g.set_cancel_key(real.clone(), Some(visible.clone()), "orders".into()));
        assert_eq!(
            sessions.real_cancel_key(&visible, "orders"),
            Some(real.clone())
        );
        assert_eq!(g.cancel_key(), Some(real.clone()));
        // The real key was never handed out, so it finds nothing; nor does another database.
        assert_eq!(sessions.real_cancel_key(&real, "orders"), None);
        assert_eq!(sessions.real_cancel_key(&visible, "billing"), None);
        // A second session whose random part collides does not take the key over.
        let mut g2 = sessions.register(
            2,
            "orders".into(),
            "10.0.0.1:5000".parse().unwrap(),
            AdmittedBy::MtlsRule,
            &ClientIdentity::default(),
        );
        assert!(!g2.set_cancel_key(key(7, [5, 5, 5, 5]), Some(visible.clone()), "orders".into()));
        drop(g2);
        assert_eq!(sessions.real_cancel_key(&visible, "orders"), Some(real));
        drop(g);
        assert_eq!(sessions.real_cancel_key(&visible, "orders"), None);
    }

    #[test]
    fn a_single_node_key_is_its_own_real_key() {
        let sessions = Arc::new(Sessions::default());
        let mut g = sessions.register(
            1,
            "orders".into(),
            "10.0.0.1:5000".parse().unwrap(),
            AdmittedBy::MtlsRule,
            &ClientIdentity::default(),
        );
        let real = key(7, [1, 2, 3, 4]);
        assert!(g.set_cancel_key(real.clone(), None, "orders".into()));
        assert_eq!(
            sessions.real_cancel_key(&real, "orders"),
            Some(real.clone())
        );
        assert_eq!(g.cancel_key(), Some(real));
    }
}
