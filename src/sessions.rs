//! Live sessions, so a reload can close the ones whose admission no longer holds, and so a
//! CancelRequest is forwarded only for a backend this proxy actually opened.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use time::OffsetDateTime;
use tokio::sync::watch;

use crate::conn::error::ErrorKind;
use crate::snapshot::Snapshot;
use crate::wire::frontend::CancelKey;

/// Why a live session was closed by enforcement. Logged as `detail`; counted as `revoked_live`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    DatabaseDisabled,
    RuleRemoved,
    CertificateRevoked,
    CertificateExpired,
    Shutdown,
}

impl EndReason {
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::DatabaseDisabled => "database disabled",
            EndReason::RuleRemoved => "ip rule removed",
            EndReason::CertificateRevoked => "client certificate revoked",
            EndReason::CertificateExpired => "client certificate expired",
            EndReason::Shutdown => "shutdown grace period over",
        }
    }

    pub fn kind(self) -> ErrorKind {
        match self {
            EndReason::Shutdown => ErrorKind::Shutdown,
            _ => ErrorKind::RevokedLive,
        }
    }
}

struct Entry {
    database: Arc<str>,
    ip: IpAddr,
    serial: String,
    not_after: Option<OffsetDateTime>,
    kill: watch::Sender<Option<EndReason>>,
}

#[derive(Default)]
pub struct Sessions {
    live: Mutex<HashMap<u64, Entry>>,
    cancel_keys: Mutex<HashMap<CancelKey, Arc<str>>>,
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
    pub fn set_cancel_key(&mut self, key: CancelKey, database: Arc<str>) {
        lock(&self.sessions.cancel_keys).insert(key, database);
        self.cancel_key = Some(key);
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        lock(&self.sessions.live).remove(&self.conn_id);
        if let Some(k) = self.cancel_key {
            lock(&self.sessions.cancel_keys).remove(&k);
        }
    }
}

impl Sessions {
    pub fn register(
        self: &Arc<Self>,
        conn_id: u64,
        database: Arc<str>,
        ip: IpAddr,
        serial: String,
        not_after: Option<OffsetDateTime>,
    ) -> SessionGuard {
        let (kill, rx) = watch::channel(None);
        lock(&self.live).insert(
            conn_id,
            Entry {
                database,
                ip,
                serial,
                not_after,
                kill,
            },
        );
        SessionGuard {
            sessions: self.clone(),
            conn_id,
            cancel_key: None,
            kill: rx,
        }
    }

    /// Whether `key` belongs to a session of `database` that this process relays.
    pub fn cancel_key_known(&self, key: &CancelKey, database: &str) -> bool {
        lock(&self.cancel_keys)
            .get(key)
            .is_some_and(|d| &**d == database)
    }

    pub fn count(&self) -> usize {
        lock(&self.live).len()
    }

    /// Signals every session whose admission `snap` no longer grants; returns how many, by
    /// reason. Sessions still allowed are not touched.
    pub fn enforce(&self, snap: &Snapshot, now: OffsetDateTime) -> Vec<(u64, EndReason)> {
        let live = lock(&self.live);
        let mut ended = Vec::new();
        for (id, e) in live.iter() {
            let reason = match snap.databases.get(&*e.database) {
                None => Some(EndReason::DatabaseDisabled),
                Some(db) if db.allowlist.check(e.ip).is_none() => Some(EndReason::RuleRemoved),
                Some(db) if db.is_revoked(&e.serial) => Some(EndReason::CertificateRevoked),
                Some(_) if e.not_after.is_some_and(|t| t < now) => {
                    Some(EndReason::CertificateExpired)
                }
                Some(_) => None,
            };
            if let Some(r) = reason {
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
