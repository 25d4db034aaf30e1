//! The etcd side of [`super::Control`]: a change reads the whole prefix at one revision,
//! builds its records with the same code as for a directory, and commits them with its audit
//! key in one transaction guarded by that revision ([`EtcdStore::commit`]). The CLI is
//! synchronous, so the backend owns a small current-thread runtime and blocks on each call.

use std::path::PathBuf;

use super::{ControlError, Result};
use crate::state::records::{
    audit_line_key, databases_of, etcd_origin, AUDIT_PREFIX, SECRETS_PREFIX,
};
use crate::state::{one_line, DatabaseState, ReadRecords, DATABASES_DIR};
use crate::store::etcd::{EtcdConfig, EtcdStore};
use crate::store::{Listing, Write};

/// A connected etcd prefix and the runtime its calls run on.
pub struct EtcdBackend {
    store: EtcdStore,
    runtime: tokio::runtime::Runtime,
}

impl std::fmt::Debug for EtcdBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdBackend")
            .field("store", &self.store)
            .finish()
    }
}

impl EtcdBackend {
    /// Connects to the cluster. Must not be called from inside another tokio runtime.
    pub fn connect(config: EtcdConfig) -> Result<EtcdBackend> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| ControlError::Invalid(format!("cannot start the async runtime: {e}")))?;
        let store = runtime
            .block_on(EtcdStore::connect(config))
            .map_err(ControlError::Store)?;
        Ok(EtcdBackend { store, runtime })
    }

    pub fn prefix(&self) -> &str {
        &self.store.config().prefix
    }

    /// How errors name the state: `etcd:PREFIX`.
    pub fn origin(&self) -> PathBuf {
        PathBuf::from(format!("etcd:{}", self.prefix()))
    }

    /// Everything under the prefix at one revision (secrets and audit keys included: the
    /// operator's role reads them, and the commit's guard needs the whole listing).
    pub(super) fn read(&self) -> Result<Read> {
        let listing = self
            .runtime
            .block_on(self.store.load())
            .map_err(ControlError::Store)?;
        Ok(Read {
            listing,
            prefix: self.prefix().to_owned(),
        })
    }

    /// Commits `write` only if nothing changed since `read`; a lost race is
    /// `Store(Conflict)`, which [`super::Control::retrying`] recomputes.
    pub(super) fn commit(&self, read: &Read, write: &Write) -> Result<i64> {
        self.runtime
            .block_on(self.store.commit(&read.listing, write))
            .map_err(ControlError::Store)
    }

    /// A secret record of a database as of now (`client.key` for a download).
    pub fn secret(&self, database: &str, rel: &str) -> Result<Vec<u8>> {
        self.read()?.secret(database, rel)
    }

    /// A record of a database as of now, by key relative to its folder.
    pub fn record(&self, database: &str, rel: &str) -> Result<Vec<u8>> {
        let read = self.read()?;
        let key = format!("{DATABASES_DIR}/{database}/{rel}");
        read.listing
            .get(&key)
            .map(<[u8]>::to_vec)
            .ok_or_else(|| ControlError::NotFound(format!("etcd:{}/{key}: missing", read.prefix)))
    }
}

/// The state one change was computed from.
pub(super) struct Read {
    listing: Listing,
    prefix: String,
}

impl Read {
    pub(super) fn has(&self, key: &str) -> bool {
        self.listing.get(key).is_some()
    }

    pub(super) fn database_names(&self) -> Vec<String> {
        databases_of(&self.listing.records).into_keys().collect()
    }

    pub(super) fn require(&self, name: &str) -> Result<()> {
        if self.database_names().iter().any(|n| n == name) {
            Ok(())
        } else {
            Err(ControlError::UnknownDatabase {
                name: name.to_owned(),
                root: PathBuf::from(format!("etcd:{}", self.prefix)),
            })
        }
    }

    /// One database through the same record parser the replicas use.
    pub(super) fn load(&self, name: &str) -> Result<DatabaseState> {
        self.require(name)?;
        let records = databases_of(&self.listing.records)
            .remove(name)
            .unwrap_or_default();
        let origin = etcd_origin(&self.prefix, name);
        DatabaseState::from_records(
            name,
            &origin,
            ReadRecords {
                records,
                from_store: true,
                ..ReadRecords::default()
            },
        )
        .map_err(|e| ControlError::DoesNotLoad {
            name: name.to_owned(),
            detail: one_line(&e),
        })
    }

    pub(super) fn secret(&self, database: &str, rel: &str) -> Result<Vec<u8>> {
        let key = format!("{SECRETS_PREFIX}{DATABASES_DIR}/{database}/{rel}");
        self.listing
            .get(&key)
            .map(<[u8]>::to_vec)
            .ok_or_else(|| ControlError::NotFound(format!("etcd:{}/{key}: missing", self.prefix)))
    }

    /// The key after the last audit line: two writers that read the same state pick the same
    /// one, and the guard lets only one of them commit.
    pub(super) fn next_audit_key(&self) -> String {
        let last = self
            .listing
            .records
            .range(AUDIT_PREFIX.to_owned()..)
            .take_while(|(k, _)| k.starts_with(AUDIT_PREFIX))
            .filter_map(|(k, _)| k[AUDIT_PREFIX.len()..].parse::<usize>().ok())
            .max()
            .unwrap_or(0);
        audit_line_key(last + 1)
    }
}
