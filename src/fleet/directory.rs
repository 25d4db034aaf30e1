//! The cancel directory of an etcd fleet: where replica N is, read from the replica registry
//! (`PREFIX/replicas/ID`, each entry's `peer_addr`) and kept current by a watch, so that a
//! fleet in etcd mode needs no `peers:` list. A replica that leaves the registry (drained, or
//! its lease expired) is no longer a cancel target; one that comes back is again.
//!
//! While etcd cannot be reached the directory keeps what it last saw: a replica that died
//! meanwhile then fails at connect time instead, with the same outcome.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::task::JoinHandle;

use super::registry::{ReplicaEntry, REPLICAS};
use super::{Directory, PeerAddr, StaticPeers};
use crate::store::etcd::EtcdStore;
use crate::store::{Event, StoreError};

const RETRY_MIN: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(5);

#[derive(Default)]
struct Known {
    peers: HashMap<u8, PeerAddr>,
    /// Replicas seen in the registry that have left it since: a key of theirs is a session
    /// that was real, not a guess, and its cancel is reported as the peer being unavailable.
    departed: BTreeSet<u8>,
    /// Why an entry was last ignored, so that an entry rewritten at every revision is
    /// reported once, not at every state change.
    ignored: HashMap<u8, String>,
}

/// The registry's replicas, by replica id. Cheap to clone: clones share the map.
#[derive(Clone)]
pub struct RegistryPeers {
    own: u8,
    known: Arc<RwLock<Known>>,
}

impl std::fmt::Debug for RegistryPeers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryPeers")
            .field("own", &self.own)
            .finish_non_exhaustive()
    }
}

/// What one registry record says about the directory.
#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    /// A fleet replica other than this one, with a peer address others can dial.
    Peer(u8, SocketAddr),
    /// Not a cancel target (a replica without `replica_id`, or this replica), silently.
    Skip,
    /// A fleet replica whose entry cannot serve as a target: why.
    Unusable(String),
}

/// The replica id in `replicas/ID`, when ID is one (1-255).
fn id_of_key(key: &str) -> Option<u8> {
    key.strip_prefix(REPLICAS)?
        .parse::<u8>()
        .ok()
        .filter(|n| *n > 0)
}

impl RegistryPeers {
    pub fn new(own: u8) -> RegistryPeers {
        RegistryPeers {
            own,
            known: Arc::default(),
        }
    }

    fn parse(&self, key: &str, bytes: &[u8]) -> Parsed {
        // Replicas without a replica_id register under a generated id: no cancel key names them.
        let Some(id) = id_of_key(key) else {
            return Parsed::Skip;
        };
        if id == self.own {
            return Parsed::Skip;
        }
        let entry: ReplicaEntry = match serde_json::from_slice(bytes) {
            Ok(e) => e,
            Err(e) => return Parsed::Unusable(format!("not a replica entry: {e}")),
        };
        match entry.peer_addr {
            None => Parsed::Unusable("the entry has no peer_addr".into()),
            // Dialling 0.0.0.0 reaches this host, not the replica.
            Some(a) if a.ip().is_unspecified() || a.port() == 0 => Parsed::Unusable(format!(
                "peer_addr {a} is not an address another replica can reach"
            )),
            Some(a) => Parsed::Peer(id, a),
        }
    }

    fn put(&self, key: &str, bytes: &[u8]) {
        let parsed = self.parse(key, bytes);
        let mut known = write(&self.known);
        match parsed {
            Parsed::Skip => {}
            Parsed::Unusable(why) => {
                let Some(id) = id_of_key(key) else { return };
                known.peers.remove(&id);
                if known.ignored.get(&id) != Some(&why) {
                    tracing::warn!(key, reason = why, "peer directory: registry entry ignored");
                    known.ignored.insert(id, why);
                }
            }
            Parsed::Peer(id, addr) => {
                known.departed.remove(&id);
                known.ignored.remove(&id);
                let previous = known.peers.insert(id, peer_addr(addr)).map(|p| p.addr);
                if previous != Some(addr) {
                    tracing::info!(
                        replica_id = id,
                        peer_addr = %addr,
                        "peer directory: replica reachable"
                    );
                }
            }
        }
    }

    fn delete(&self, key: &str) {
        let Some(id) = id_of_key(key) else { return };
        let mut known = write(&self.known);
        known.ignored.remove(&id);
        if known.peers.remove(&id).is_some() {
            known.departed.insert(id);
            tracing::info!(
                replica_id = id,
                "peer directory: replica left the registry; no longer a cancel target"
            );
        }
    }

    /// Replaces everything with a full listing of `replicas/`.
    fn reset(&self, records: &BTreeMap<String, Vec<u8>>) {
        let listed: BTreeSet<u8> = records.keys().filter_map(|k| id_of_key(k)).collect();
        let gone: Vec<u8> = read(&self.known)
            .peers
            .keys()
            .copied()
            .filter(|id| !listed.contains(id))
            .collect();
        for id in gone {
            self.delete(&format!("{REPLICAS}{id}"));
        }
        for (key, bytes) in records {
            self.put(key, bytes);
        }
    }

    /// Follows `PREFIX/replicas/` until the process exits: a full load, then a watch from its
    /// revision; a lost watch or an unreachable etcd retries with backoff.
    pub fn follow(&self, store: EtcdStore) -> JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut wait = RETRY_MIN;
            loop {
                match me.follow_once(&store, &mut wait).await {
                    Ok(()) => return,
                    Err(e) => tracing::warn!(
                        error = %e,
                        "peer directory: cannot follow the replica registry; keeping the last known replicas, retrying"
                    ),
                }
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(RETRY_MAX);
            }
        })
    }

    async fn follow_once(&self, store: &EtcdStore, wait: &mut Duration) -> Result<(), StoreError> {
        let listing = store.load_under(REPLICAS).await?;
        self.reset(&listing.records);
        let mut watch = store.watch_under(listing.revision, REPLICAS).await?;
        *wait = RETRY_MIN;
        loop {
            let batch = watch.next().await?;
            for event in batch.events {
                match event {
                    Event::Put { key, bytes } => self.put(&key, &bytes),
                    Event::Delete { key } => self.delete(&key),
                }
            }
        }
    }
}

fn peer_addr(addr: SocketAddr) -> PeerAddr {
    PeerAddr {
        addr,
        // The registry carries no name: the peer certificate must name the address' IP.
        server_name: ServerName::IpAddress(addr.ip().into()),
    }
}

fn read(k: &RwLock<Known>) -> std::sync::RwLockReadGuard<'_, Known> {
    k.read().unwrap_or_else(|p| p.into_inner())
}

fn write(k: &RwLock<Known>) -> std::sync::RwLockWriteGuard<'_, Known> {
    k.write().unwrap_or_else(|p| p.into_inner())
}

impl Directory for RegistryPeers {
    fn locate(&self, replica_id: u8) -> Option<PeerAddr> {
        read(&self.known).peers.get(&replica_id).cloned()
    }

    fn departed(&self, replica_id: u8) -> bool {
        read(&self.known).departed.contains(&replica_id)
    }
}

/// The `peers:` list over the registry: a replica listed in `peers:` is reached where the list
/// says (with the name it gives), whatever its registry entry says; every other replica where
/// the registry says.
pub struct Layered {
    pub fixed: StaticPeers,
    pub registry: RegistryPeers,
}

impl Directory for Layered {
    fn locate(&self, replica_id: u8) -> Option<PeerAddr> {
        self.fixed
            .locate(replica_id)
            .or_else(|| self.registry.locate(replica_id))
    }

    fn departed(&self, replica_id: u8) -> bool {
        self.fixed.locate(replica_id).is_none() && self.registry.departed(replica_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: u8, addr: Option<&str>) -> Vec<u8> {
        let e = ReplicaEntry::new(Some(id), addr.map(|a| a.parse().unwrap()));
        serde_json::to_vec(&e).unwrap()
    }

    #[test]
    fn entries_come_and_go_and_a_departed_replica_is_told_apart_from_a_stranger() {
        let d = RegistryPeers::new(1);
        d.put("replicas/2", &entry(2, Some("127.0.0.1:7002")));
        d.put("replicas/1", &entry(1, Some("127.0.0.1:7001")));
        d.put("replicas/3", &entry(3, None));
        d.put("replicas/4", &entry(4, Some("0.0.0.0:7004")));
        d.put("replicas/0a1b2c3d4e5f", b"{}");
        assert_eq!(d.locate(2).unwrap().addr.port(), 7002);
        assert!(d.locate(1).is_none(), "this replica is never its own peer");
        assert!(d.locate(3).is_none() && d.locate(4).is_none());
        assert!(!d.departed(2) && !d.departed(9));
        d.delete("replicas/2");
        assert!(d.locate(2).is_none());
        assert!(d.departed(2));
        d.put("replicas/2", &entry(2, Some("127.0.0.1:7102")));
        assert_eq!(d.locate(2).unwrap().addr.port(), 7102);
        assert!(!d.departed(2));
        // A full reload after an outage drops those no longer listed.
        d.reset(&BTreeMap::from([(
            "replicas/5".to_string(),
            entry(5, Some("127.0.0.1:7005")),
        )]));
        assert!(d.locate(2).is_none() && d.departed(2));
        assert!(d.locate(5).is_some());
    }

    #[test]
    fn a_static_peer_overrides_the_registry() {
        let registry = RegistryPeers::new(1);
        registry.put("replicas/2", &entry(2, Some("127.0.0.1:7002")));
        registry.put("replicas/3", &entry(3, Some("127.0.0.1:7003")));
        let fixed = StaticPeers::new(&[super::super::PeerEntry {
            id: 2,
            addr: "10.0.0.2:6433".parse().unwrap(),
            name: "r2.internal".into(),
        }])
        .unwrap();
        let d = Layered { fixed, registry };
        let two = d.locate(2).unwrap();
        assert_eq!(two.addr, "10.0.0.2:6433".parse().unwrap());
        assert_eq!(
            two.server_name,
            ServerName::try_from("r2.internal").unwrap()
        );
        assert_eq!(d.locate(3).unwrap().addr.port(), 7003);
        d.registry.delete("replicas/2");
        assert!(d.locate(2).is_some() && !d.departed(2));
    }
}
