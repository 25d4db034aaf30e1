//! Connection budgets. A connection that has not finished TLS has shown nothing but an
//! address, so it draws on a pool of its own (`max_handshakes`) and on a per-source cap
//! (`max_handshakes_per_source`); only a client that completed mutual TLS takes one of the
//! `max_connections` session slots. One allowlisted source holding idle sockets therefore
//! cannot lock other clients out of any database, and the memory unfinished handshakes can
//! hold is bounded by `max_handshakes`, not by `max_connections`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::conn::error::{ConnError, ErrorKind};
use crate::throttle::{HandshakeThrottle, ThrottleConfig};

/// Budgets shared by every listener of the process.
pub struct Limits {
    handshakes: Arc<Semaphore>,
    max_handshakes: u32,
    sessions: Arc<Semaphore>,
    max_sessions: u32,
    per_source: u32,
    /// Handshakes in progress per source; an entry exists only while its count is above 0,
    /// so the map never holds more than `max_handshakes` entries.
    sources: Mutex<HashMap<IpAddr, u32>>,
    /// Sessions open per database, and per source within each (the per-database
    /// `max_connections` and `max_connections_per_ip`). Keyed by name, not by the snapshot's
    /// runtime, so the counts survive reloads; entries exist only while above 0, so the map is
    /// bounded by the session slots.
    databases: Mutex<HashMap<Arc<str>, DatabaseSessions>>,
    throttle: HandshakeThrottle,
}

#[derive(Default)]
struct DatabaseSessions {
    total: u32,
    by_source: HashMap<IpAddr, u32>,
}

/// A database's own session limits, as its `database.yaml` sets them (`None`: unlimited).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DatabaseLimits {
    pub max_connections: Option<u32>,
    pub max_connections_per_ip: Option<u32>,
}

/// What a connection holds: a handshake permit (and a per-source slot once its source is
/// known) until TLS completes, a session slot afterwards.
pub struct Admission {
    limits: Arc<Limits>,
    state: Held,
}

enum Held {
    Handshake {
        _pool: OwnedSemaphorePermit,
        source: Option<IpAddr>,
    },
    Session {
        _slot: OwnedSemaphorePermit,
        /// The database and source this session is counted under, once taken.
        database: Option<(Arc<str>, IpAddr)>,
    },
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The key a source is counted under: an IPv4 address (also when it arrives IPv4-mapped), or
/// an IPv6 /64, the smallest block a single site is usually given, so one host cannot take a
/// fresh cap from every address of its own prefix.
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

impl Limits {
    pub fn new(max_handshakes: usize, per_source: usize, max_sessions: usize) -> Arc<Limits> {
        Self::with_throttle(
            max_handshakes,
            per_source,
            max_sessions,
            ThrottleConfig::default(),
        )
    }

    pub fn with_throttle(
        max_handshakes: usize,
        per_source: usize,
        max_sessions: usize,
        throttle: ThrottleConfig,
    ) -> Arc<Limits> {
        let clamp = |n: usize| {
            u32::try_from(n.min(Semaphore::MAX_PERMITS))
                .unwrap_or(u32::MAX)
                .max(1)
        };
        let (max_handshakes, max_sessions) = (clamp(max_handshakes), clamp(max_sessions));
        Arc::new(Limits {
            handshakes: Arc::new(Semaphore::new(max_handshakes as usize)),
            max_handshakes,
            sessions: Arc::new(Semaphore::new(max_sessions as usize)),
            max_sessions,
            per_source: clamp(per_source),
            sources: Mutex::new(HashMap::new()),
            databases: Mutex::new(HashMap::new()),
            throttle: HandshakeThrottle::new(throttle),
        })
    }

    /// Source prefixes closed at accept after failing handshakes.
    pub fn throttle(&self) -> &HandshakeThrottle {
        &self.throttle
    }

    /// Counts one more session of `database` from `key` unless that would pass one of
    /// `limits`; the error names the limit that binds.
    fn take_database(
        &self,
        database: &Arc<str>,
        key: IpAddr,
        limits: DatabaseLimits,
    ) -> Result<(), ErrorKind> {
        let mut m = lock(&self.databases);
        let d = m.entry(Arc::clone(database)).or_default();
        let from_source = d.by_source.get(&key).copied().unwrap_or(0);
        let refused = if limits.max_connections.is_some_and(|max| d.total >= max) {
            Some(ErrorKind::TooManyForDatabase)
        } else if limits
            .max_connections_per_ip
            .is_some_and(|max| from_source >= max)
        {
            Some(ErrorKind::TooManyFromIp)
        } else {
            None
        };
        if let Some(kind) = refused {
            if d.total == 0 {
                m.remove(database);
            }
            return Err(kind);
        }
        d.total += 1;
        *d.by_source.entry(key).or_insert(0) += 1;
        Ok(())
    }

    fn release_database(&self, database: &Arc<str>, key: IpAddr) {
        let mut m = lock(&self.databases);
        let Some(d) = m.get_mut(database) else {
            return;
        };
        d.total = d.total.saturating_sub(1);
        if let Some(n) = d.by_source.get_mut(&key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                d.by_source.remove(&key);
            }
        }
        if d.total == 0 {
            m.remove(database);
        }
    }

    /// Sessions of `database` open now, and those of them from `ip`'s source.
    pub fn sessions_of(&self, database: &str, ip: IpAddr) -> (u32, u32) {
        lock(&self.databases).get(database).map_or((0, 0), |d| {
            (
                d.total,
                d.by_source.get(&source_key(ip)).copied().unwrap_or(0),
            )
        })
    }

    /// At accept, before a byte is read: a handshake permit, and the per-source slot of
    /// `source` when the socket peer is the client itself (`None` for a trusted balancer,
    /// whose client is known only after its PROXY header).
    pub fn admit(self: &Arc<Self>, source: Option<IpAddr>) -> Result<Admission, ErrorKind> {
        let pool = Arc::clone(&self.handshakes)
            .try_acquire_owned()
            .map_err(|_| ErrorKind::TooManyHandshakes)?;
        let mut a = Admission {
            limits: Arc::clone(self),
            state: Held::Handshake {
                _pool: pool,
                source: None,
            },
        };
        if let Some(ip) = source {
            a.count_source(ip)?;
        }
        Ok(a)
    }

    /// Connections before the end of TLS, this one included.
    fn handshakes_in_use(&self) -> usize {
        (self.max_handshakes as usize).saturating_sub(self.handshakes.available_permits())
    }

    /// The cap binds only under pressure, once half the handshake pool is in use: a source
    /// may burst past it while there is room (an application host warming a pool of 200
    /// connections at once is not an attack), but as the pool fills, every source is held to
    /// its cap, so the other half stays open to sources below theirs.
    fn take_source(&self, key: IpAddr) -> bool {
        let contended = self.handshakes_in_use() * 2 > self.max_handshakes as usize;
        let mut m = lock(&self.sources);
        let n = m.entry(key).or_insert(0);
        if contended && *n >= self.per_source {
            if *n == 0 {
                m.remove(&key);
            }
            return false;
        }
        *n += 1;
        true
    }

    fn release_source(&self, key: IpAddr) {
        let mut m = lock(&self.sources);
        if let Some(n) = m.get_mut(&key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&key);
            }
        }
    }

    /// Handshakes in progress counted against `ip`'s source.
    pub fn handshakes_from(&self, ip: IpAddr) -> u32 {
        lock(&self.sources)
            .get(&source_key(ip))
            .copied()
            .unwrap_or(0)
    }

    /// Waits until every connection, handshaking or in session, is gone. Handshakes first:
    /// once all their permits are held here, no connection can still move into a session.
    pub async fn drain(&self) {
        // One after the other: a handshake finishing during the drain still finds its
        // session slot instead of a drain queued in front of it.
        let h = self.handshakes.acquire_many(self.max_handshakes).await;
        let s = self.sessions.acquire_many(self.max_sessions).await;
        // The permits go back at once: nothing is accepted any more.
        drop((h, s));
    }
}

impl Admission {
    pub fn limits(&self) -> &Arc<Limits> {
        &self.limits
    }

    /// Counts this handshake against `ip`'s source; `too_many_from_source` when the source
    /// is at its cap. Idempotent once counted.
    pub fn count_source(&mut self, ip: IpAddr) -> Result<(), ErrorKind> {
        let Held::Handshake { source, .. } = &mut self.state else {
            return Ok(());
        };
        if source.is_some() {
            return Ok(());
        }
        let key = source_key(ip);
        if !self.limits.take_source(key) {
            return Err(ErrorKind::TooManyFromSource);
        }
        *source = Some(key);
        Ok(())
    }

    /// After TLS: exchanges the handshake permit and source slot for a session slot
    /// (`too_many_connections` when `max_connections` sessions are open).
    pub fn promote(&mut self) -> Result<(), ConnError> {
        if matches!(self.state, Held::Session { .. }) {
            return Ok(());
        }
        let slot = Arc::clone(&self.limits.sessions)
            .try_acquire_owned()
            .map_err(|_| {
                ConnError::new(
                    ErrorKind::TooManyConnections,
                    "max_connections sessions are open",
                )
            })?;
        // Taking the session slot before letting the handshake permit go keeps the
        // connection visible to `drain` at every instant.
        let old = std::mem::replace(
            &mut self.state,
            Held::Session {
                _slot: slot,
                database: None,
            },
        );
        if let Held::Handshake {
            source: Some(key), ..
        } = old
        {
            self.limits.release_source(key);
        }
        Ok(())
    }
}

impl Admission {
    /// After [`Admission::promote`], once the database is known under the snapshot in force:
    /// counts the session against that database's `max_connections` and its source's
    /// `max_connections_per_ip`, read from `limits` now, so a reload that lowers them applies
    /// to every session that gets this far after it (those already counted keep running).
    pub fn take_database_slot(
        &mut self,
        database: &Arc<str>,
        ip: IpAddr,
        limits: DatabaseLimits,
    ) -> Result<(), ConnError> {
        let Held::Session { database: held, .. } = &mut self.state else {
            return Ok(());
        };
        if held.is_some() {
            return Ok(());
        }
        let key = source_key(ip);
        self.limits
            .take_database(database, key, limits)
            .map_err(|kind| {
                let detail = match kind {
                    ErrorKind::TooManyFromIp => {
                        "this database's max_connections_per_ip sessions from this source are open"
                    }
                    _ => "this database's max_connections sessions are open",
                };
                ConnError::new(kind, detail)
            })?;
        *held = Some((Arc::clone(database), key));
        Ok(())
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        match &self.state {
            Held::Handshake {
                source: Some(key), ..
            } => self.limits.release_source(*key),
            Held::Session {
                database: Some((db, key)),
                ..
            } => self.limits.release_database(db, *key),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_source_at_its_cap_is_refused_while_others_are_not() {
        // Pool of 4: from the third handshake on, more than half is in use.
        let l = Limits::new(4, 2, 10);
        let a = l.admit(Some(ip("10.0.0.1"))).unwrap();
        let _b = l.admit(Some(ip("10.0.0.1"))).unwrap();
        assert_eq!(
            l.admit(Some(ip("10.0.0.1"))).err(),
            Some(ErrorKind::TooManyFromSource)
        );
        let _c = l.admit(Some(ip("10.0.0.2"))).unwrap();
        drop(a);
        assert_eq!(l.handshakes_from(ip("10.0.0.1")), 1);
        let _d = l.admit(Some(ip("10.0.0.1"))).unwrap();
    }

    #[test]
    fn a_source_may_burst_past_its_cap_while_the_pool_is_at_most_half_full() {
        let l = Limits::new(10, 2, 10);
        let held: Vec<_> = (0..5)
            .map(|_| l.admit(Some(ip("10.0.0.1"))).unwrap())
            .collect();
        assert_eq!(l.handshakes_from(ip("10.0.0.1")), 5);
        // The sixth would make the pool more than half full.
        assert_eq!(
            l.admit(Some(ip("10.0.0.1"))).err(),
            Some(ErrorKind::TooManyFromSource)
        );
        // Others, below their cap, still get the rest of the pool.
        let others: Vec<_> = (0..2)
            .map(|_| l.admit(Some(ip("10.0.0.2"))).unwrap())
            .collect();
        let _third = l.admit(Some(ip("10.0.0.3"))).unwrap();
        drop((held, others));
    }

    #[test]
    fn the_handshake_pool_is_separate_from_sessions() {
        let l = Limits::new(2, 10, 1);
        let mut a = l.admit(None).unwrap();
        let _b = l.admit(None).unwrap();
        assert_eq!(l.admit(None).err(), Some(ErrorKind::TooManyHandshakes));
        a.promote().unwrap();
        // The promoted connection gave its handshake permit back...
        let mut c = l.admit(None).unwrap();
        // ...and holds the only session slot.
        assert_eq!(c.promote().unwrap_err().kind, ErrorKind::TooManyConnections);
        drop(a);
        c.promote().unwrap();
    }

    #[test]
    fn promotion_frees_the_source_slot() {
        let l = Limits::new(10, 1, 10);
        let mut a = l.admit(Some(ip("10.0.0.1"))).unwrap();
        a.promote().unwrap();
        assert_eq!(l.handshakes_from(ip("10.0.0.1")), 0);
        let _b = l.admit(Some(ip("10.0.0.1"))).unwrap();
    }

    #[test]
    fn ipv6_sources_share_a_slash_64_and_mapped_v4_is_v4() {
        assert_eq!(
            source_key(ip("2001:db8:1:2:aaaa::1")),
            source_key(ip("2001:db8:1:2:bbbb::9"))
        );
        assert_ne!(
            source_key(ip("2001:db8:1:2::1")),
            source_key(ip("2001:db8:1:3::1"))
        );
        assert_eq!(source_key(ip("::ffff:10.0.0.1")), ip("10.0.0.1"));
    }

    fn session(l: &Arc<Limits>, src: &str) -> Admission {
        let mut a = l.admit(Some(ip(src))).unwrap();
        a.promote().unwrap();
        a
    }

    #[test]
    fn a_databases_limits_count_its_sessions_and_free_them_when_they_end() {
        let l = Limits::new(100, 100, 100);
        let db: Arc<str> = "app".into();
        let other: Arc<str> = "other".into();
        let lim = DatabaseLimits {
            max_connections: Some(3),
            max_connections_per_ip: Some(2),
        };
        let mut a = session(&l, "10.0.0.1");
        a.take_database_slot(&db, ip("10.0.0.1"), lim).unwrap();
        let mut b = session(&l, "10.0.0.1");
        b.take_database_slot(&db, ip("10.0.0.1"), lim).unwrap();
        let mut c = session(&l, "10.0.0.1");
        let e = c.take_database_slot(&db, ip("10.0.0.1"), lim).unwrap_err();
        assert_eq!(e.kind, ErrorKind::TooManyFromIp);
        // Another source still has room, up to the database's total.
        let mut d = session(&l, "10.0.0.2");
        d.take_database_slot(&db, ip("10.0.0.2"), lim).unwrap();
        let mut e2 = session(&l, "10.0.0.3");
        let e = e2.take_database_slot(&db, ip("10.0.0.3"), lim).unwrap_err();
        assert_eq!(e.kind, ErrorKind::TooManyForDatabase);
        // Another database is not affected.
        e2.take_database_slot(&other, ip("10.0.0.3"), lim).unwrap();
        assert_eq!(l.sessions_of("app", ip("10.0.0.1")), (3, 2));
        drop(a);
        assert_eq!(l.sessions_of("app", ip("10.0.0.1")), (2, 1));
        c.take_database_slot(&db, ip("10.0.0.1"), lim).unwrap();
        // A lower limit applies to the next session; those counted stay.
        let lowered = DatabaseLimits {
            max_connections: Some(1),
            max_connections_per_ip: None,
        };
        let mut f = session(&l, "10.0.0.9");
        let e = f
            .take_database_slot(&db, ip("10.0.0.9"), lowered)
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::TooManyForDatabase);
        drop((b, c, d, e2));
        f.take_database_slot(&db, ip("10.0.0.9"), lowered).unwrap();
        drop(f);
        assert!(
            lock(&l.databases).is_empty(),
            "entries outlive their sessions"
        );
    }

    #[tokio::test]
    async fn drain_waits_for_handshakes_and_sessions() {
        let l = Limits::new(2, 2, 2);
        let h = l.admit(None).unwrap();
        let mut s = l.admit(None).unwrap();
        s.promote().unwrap();
        let drain = tokio::spawn({
            let l = Arc::clone(&l);
            async move { l.drain().await }
        });
        tokio::task::yield_now().await;
        drop(h);
        tokio::task::yield_now().await;
        assert!(!drain.is_finished());
        drop(s);
        tokio::time::timeout(std::time::Duration::from_secs(5), drain)
            .await
            .unwrap()
            .unwrap();
    }
}
