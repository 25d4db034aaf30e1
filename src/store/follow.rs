//! A replica's view of an etcd prefix: the records at the last revision seen, kept current by
//! a watch. Loading the state for a snapshot reads this cache (no network on the reload
//! path); the follower task updates it and asks for a reload after each change.
//!
//! A compacted revision or a lost watch falls back to a full load. While etcd cannot be
//! reached the cache keeps what it had, so the proxy keeps serving its last good snapshot,
//! and `stale_since` says since when; the first successful load after that catches up.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use time::OffsetDateTime;

use super::etcd::{EtcdConfig, EtcdStore};
use super::{Event, StoreError};
use crate::config::ConfigErrors;
use crate::state::{load_each_from_records, LoadedDatabase};

/// What a replica reads and watches: the databases only. The CA and client keys
/// (`secrets/`) and the audit log (`audit/`) are none of its business, so its etcd role can
/// be limited to this range.
const WATCHED: &str = "databases/";

/// How long the follower waits between attempts to reach etcd again.
const RETRY_MIN: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// What `/status` says about the source.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FollowStatus {
    /// The etcd revision the cache is exactly the state of.
    pub revision: i64,
    /// Since when etcd could not be reached (the cache may be behind); `None` while following.
    pub stale_since: Option<OffsetDateTime>,
    /// Why, while stale.
    pub error: Option<String>,
}

#[derive(Default)]
struct Cache {
    records: BTreeMap<String, Vec<u8>>,
    status: FollowStatus,
}

/// The etcd source of a replica. Cheap to clone: clones share the cache.
#[derive(Clone)]
pub struct EtcdSource {
    config: EtcdConfig,
    cache: Arc<Mutex<Cache>>,
    /// The revision the proxy serves: published once the reload of a revision has run.
    served: Arc<tokio::sync::watch::Sender<i64>>,
}

// By hand: the cache holds server keys, which must never reach a log line.
impl std::fmt::Debug for EtcdSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdSource")
            .field("config", &self.config)
            .field("status", &self.status())
            .finish()
    }
}

fn lock(m: &Mutex<Cache>) -> std::sync::MutexGuard<'_, Cache> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl EtcdSource {
    pub fn new(config: EtcdConfig) -> EtcdSource {
        EtcdSource {
            config,
            cache: Arc::default(),
            served: Arc::new(tokio::sync::watch::channel(0).0),
        }
    }

    pub fn config(&self) -> &EtcdConfig {
        &self.config
    }

    /// Follows the revision the proxy serves (the replica registry publishes it).
    pub fn served(&self) -> tokio::sync::watch::Receiver<i64> {
        self.served.subscribe()
    }

    fn publish_served(&self) {
        let revision = self.status().revision;
        self.served.send_if_modified(|r| {
            let changed = *r != revision;
            *r = revision;
            changed
        });
    }

    pub fn status(&self) -> FollowStatus {
        lock(&self.cache).status.clone()
    }

    /// Connects and loads the prefix at one revision; the start-up load. An error here is
    /// fatal to start-up: there is no last good state to serve yet.
    pub async fn connect_and_load(&self) -> Result<EtcdStore, StoreError> {
        let store = EtcdStore::connect(self.config.clone()).await?;
        self.full_load(&store).await?;
        // Start-up builds the first snapshot from this load before anything is served.
        self.publish_served();
        Ok(store)
    }

    async fn full_load(&self, store: &EtcdStore) -> Result<(), StoreError> {
        let listing = store.load_under(WATCHED).await?;
        let mut c = lock(&self.cache);
        c.records = listing.records;
        c.status = FollowStatus {
            revision: listing.revision,
            stale_since: None,
            error: None,
        };
        Ok(())
    }

    /// Every database of the cached records, each loaded on its own.
    pub fn load_each(&self) -> Vec<LoadedDatabase> {
        load_each_from_records(&self.config.prefix, &lock(&self.cache).records)
    }

    /// Every database, all errors together (start-up).
    pub fn load_all(&self) -> Result<Vec<crate::state::DatabaseState>, ConfigErrors> {
        let mut errors = ConfigErrors::default();
        let mut out = Vec::new();
        for (_, loaded) in self.load_each() {
            match loaded {
                Ok(db) => out.push(db),
                Err(e) => errors.extend(e),
            }
        }
        errors.into_result(out)
    }

    fn mark_stale(&self, e: &StoreError) {
        let mut c = lock(&self.cache);
        if c.status.stale_since.is_none() {
            c.status.stale_since = Some(OffsetDateTime::now_utc());
        }
        c.status.error = Some(e.to_string());
    }

    /// Follows the prefix from the start-up revision for as long as the task runs, calling
    /// `changed` after each revision that changed records (and after a catch-up load).
    pub async fn follow<F, Fut>(self, store: EtcdStore, changed: F)
    where
        F: Fn() -> Fut,
        Fut: Future<Output = ()>,
    {
        let mut store = store;
        loop {
            let from = self.status().revision;
            let error = match store.watch_under(from, WATCHED).await {
                Ok(mut watch) => loop {
                    match watch.next().await {
                        Ok(batch) => {
                            let touched = !batch.events.is_empty();
                            {
                                let mut c = lock(&self.cache);
                                for event in batch.events {
                                    match event {
                                        Event::Put { key, bytes } => {
                                            c.records.insert(key, bytes);
                                        }
                                        Event::Delete { key } => {
                                            c.records.remove(&key);
                                        }
                                    }
                                }
                                c.status.revision = batch.revision;
                            }
                            if touched {
                                changed().await;
                            }
                            self.publish_served();
                        }
                        Err(e) => break e,
                    }
                },
                Err(e) => e,
            };
            // A compacted history is not an outage: load everything now. A lost connection
            // is: say so until a load succeeds again.
            match &error {
                StoreError::Compacted { .. } => {
                    tracing::warn!(error = %error, "etcd watch fell behind; loading the whole prefix")
                }
                _ => {
                    tracing::warn!(error = %error, "etcd unreachable; serving the last good state");
                    self.mark_stale(&error);
                }
            }
            let mut wait = RETRY_MIN;
            loop {
                let attempt = match self.full_load(&store).await {
                    Ok(()) => Ok(()),
                    // The old channel may be dead for good: dial again.
                    Err(_) => match EtcdStore::connect(self.config.clone()).await {
                        Ok(s) => {
                            store = s;
                            self.full_load(&store).await
                        }
                        Err(e) => Err(e),
                    },
                };
                match attempt {
                    Ok(()) => {
                        tracing::info!(
                            revision = self.status().revision,
                            "etcd reachable; state reloaded"
                        );
                        changed().await;
                        self.publish_served();
                        break;
                    }
                    Err(e) => {
                        self.mark_stale(&e);
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(RETRY_MAX);
                    }
                }
            }
        }
    }
}
