//! The replica registry: in etcd mode each replica keeps `PREFIX/replicas/ID` (its id,
//! version, the revision it serves, its peer address, when it started) attached to a lease it
//! keeps alive. A replica that dies leaves the list when the lease expires (the TTL,
//! `etcd.registry_ttl`); one that drains revokes the lease and leaves at once. `pgmtls fleet`
//! reads the list.
//!
//! A replica whose registration fails keeps serving (and says why in the log, retrying); the
//! only reader on the data path is the cancel directory of a fleet in etcd mode
//! ([`super::directory`]), for which the entry's `peer_addr` is where to forward cancels.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::store::etcd::EtcdStore;
use crate::store::StoreError;

/// Where the entries live, relative to the prefix. A replica's etcd role needs write access
/// to this range and nothing else.
pub const REPLICAS: &str = "replicas/";

/// The default lease TTL.
pub const DEFAULT_TTL: Duration = Duration::from_secs(10);

const RETRY_MIN: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// How long a draining replica waits for etcd to confirm the revoke.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(5);

/// One replica's entry, as JSON under `PREFIX/replicas/ID`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaEntry {
    pub id: String,
    /// pgmtls version of the replica.
    pub version: String,
    /// The etcd revision of the state it serves (updated after each applied watch batch).
    pub revision: i64,
    /// Its peer channel (`peer_listen`, as bound), if it has one.
    pub peer_addr: Option<SocketAddr>,
    #[serde(with = "time::serde::rfc3339")]
    pub started_at: OffsetDateTime,
}

impl ReplicaEntry {
    /// This process's entry: `replica_id` when it has one, else a generated id.
    pub fn new(replica_id: Option<u8>, peer_addr: Option<SocketAddr>) -> ReplicaEntry {
        let id = match replica_id {
            Some(n) if n > 0 => n.to_string(),
            _ => {
                let mut u = uuid::Uuid::new_v4().simple().to_string();
                u.truncate(12);
                u
            }
        };
        ReplicaEntry {
            id,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            revision: 0,
            peer_addr,
            started_at: OffsetDateTime::now_utc()
                .replace_nanosecond(0)
                .unwrap_or(OffsetDateTime::UNIX_EPOCH),
        }
    }

    pub fn key(&self) -> String {
        format!("{REPLICAS}{}", self.id)
    }
}

/// Every entry under `PREFIX/replicas/`, by id. An entry that does not parse is returned as
/// an error naming its key, next to the good ones.
pub async fn list(store: &EtcdStore) -> Result<(Vec<ReplicaEntry>, Vec<String>), StoreError> {
    let listing = store.load_under(REPLICAS).await?;
    let mut entries = Vec::new();
    let mut bad = Vec::new();
    for (key, bytes) in &listing.records {
        match serde_json::from_slice::<ReplicaEntry>(bytes) {
            Ok(e) => entries.push(e),
            Err(e) => bad.push(format!(
                "etcd:{}/{key}: not a replica entry: {e}",
                store.config().prefix
            )),
        }
    }
    entries.sort_by(|a, b| a.id.cmp(&b.id));
    Ok((entries, bad))
}

/// A running registration. [`Registration::leave`] on drain.
pub struct Registration {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Registration {
    /// Registers `entry` under a lease of `ttl` and keeps it current: its `revision` follows
    /// `served`. Retries (with backoff) while etcd is unreachable.
    pub fn start(
        store: EtcdStore,
        entry: ReplicaEntry,
        ttl: Duration,
        served: watch::Receiver<i64>,
    ) -> Registration {
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(run(store, entry, ttl, served, stopped));
        Registration { stop, task }
    }

    /// Revokes the lease, so the entry is gone from the list at once; waits briefly for etcd.
    pub async fn leave(self) {
        self.stop.send_replace(true);
        if tokio::time::timeout(LEAVE_TIMEOUT, self.task)
            .await
            .is_err()
        {
            tracing::warn!("etcd did not confirm leaving the replica registry in time; the entry expires with its lease");
        }
    }
}

async fn run(
    store: EtcdStore,
    mut entry: ReplicaEntry,
    ttl: Duration,
    mut served: watch::Receiver<i64>,
    mut stop: watch::Receiver<bool>,
) {
    let mut wait = RETRY_MIN;
    loop {
        match registered(&store, &mut entry, ttl, &mut served, &mut stop).await {
            Ok(()) => return,
            Err(e) => tracing::warn!(
                replica = entry.id,
                error = %e,
                "replica registry: cannot keep this replica's entry; retrying"
            ),
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stopped(&mut stop) => return,
        }
        wait = (wait * 2).min(RETRY_MAX);
    }
}

/// One lease's life: grant, put, keep alive and update, until `stop` (then revoke: `Ok`) or
/// an error (the lease is left to expire: `Err`).
async fn registered(
    store: &EtcdStore,
    entry: &mut ReplicaEntry,
    ttl: Duration,
    served: &mut watch::Receiver<i64>,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), StoreError> {
    if *stop.borrow() {
        return Ok(());
    }
    let lease = store.grant_lease(ttl).await?;
    let key = entry.key();
    entry.revision = *served.borrow_and_update();
    store.put_leased(&key, &encode(entry), lease).await?;
    tracing::info!(
        replica = entry.id,
        revision = entry.revision,
        ttl = ?ttl,
        "registered in the replica registry"
    );
    let mut keep = store.keep_alive(lease).await?;
    // Three renewals per TTL: one lost renewal does not drop the entry.
    let mut tick = tokio::time::interval((ttl / 3).max(Duration::from_millis(200)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut source_open = true;
    loop {
        tokio::select! {
            _ = stopped(stop) => {
                store.revoke_lease(lease).await?;
                tracing::info!(replica = entry.id, "left the replica registry");
                return Ok(());
            }
            _ = tick.tick() => {
                if keep.renew().await? == 0 {
                    return Err(StoreError::Unavailable {
                        what: format!("lease of {key}"),
                        detail: "expired before it was renewed".into(),
                    });
                }
            }
            changed = served.changed(), if source_open => {
                if changed.is_err() {
                    source_open = false;
                    continue;
                }
                entry.revision = *served.borrow_and_update();
                store.put_leased(&key, &encode(entry), lease).await?;
            }
        }
    }
}

/// Resolves once `stop` is set (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns must not live across an await of the caller.
    let _ = stop.wait_for(|s| *s).await.map(|_| ());
}

fn encode(entry: &ReplicaEntry) -> Vec<u8> {
    // A plain struct of strings and numbers always serialises.
    serde_json::to_vec(entry).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_entry_round_trips_and_uses_the_replica_id() {
        let e = ReplicaEntry::new(Some(3), Some("127.0.0.1:7000".parse().unwrap()));
        assert_eq!(e.key(), "replicas/3");
        let back: ReplicaEntry = serde_json::from_slice(&encode(&e)).unwrap();
        assert_eq!(back, e);
        let generated = ReplicaEntry::new(None, None);
        assert_eq!(generated.id.len(), 12);
        assert_ne!(generated.id, ReplicaEntry::new(None, None).id);
    }
}
