//! The etcd side of [`super::Control`]: a change reads the whole prefix at one revision,
//! builds its records with the same code as for a directory, and commits them with its audit
//! key in one transaction guarded by that revision ([`EtcdStore::commit`]). The CLI is
//! synchronous, so the backend owns a small current-thread runtime and blocks on each call.

use std::path::PathBuf;

use time::OffsetDateTime;

use super::{ControlError, Result};
use crate::config::ConfigErrors;
use crate::state::records::{
    audit_line_key, databases_of, etcd_origin, DatabaseRecords, ARCHIVE_PREFIX, AUDIT_PREFIX,
    SECRETS_PREFIX,
};
use crate::state::{
    one_line, DatabaseSettings, DatabaseState, ReadRecords, DATABASES_DIR, DATABASE_YAML,
};
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

    /// A record at the root of the prefix (`renewal.yaml`), as of this read.
    pub(super) fn root_record(&self, key: &str) -> Option<&[u8]> {
        self.listing.get(key)
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

    pub(super) fn prefix(&self) -> &str {
        &self.prefix
    }

    /// One database through the same record parser the replicas use.
    pub(super) fn load(&self, name: &str) -> Result<DatabaseState> {
        self.require(name)?;
        let records = databases_of(&self.listing.records)
            .remove(name)
            .unwrap_or_default();
        self.load_records(name, records)
            .map_err(|e| ControlError::DoesNotLoad {
                name: name.to_owned(),
                detail: one_line(&e),
            })
    }

    /// Parses a database's records (keys relative to its folder) exactly as a replica does,
    /// with errors naming `etcd:PREFIX/databases/NAME/KEY`.
    pub(super) fn load_records(
        &self,
        name: &str,
        records: DatabaseRecords,
    ) -> std::result::Result<DatabaseState, ConfigErrors> {
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
    }

    /// The listen address of every database whose `database.yaml` parses.
    pub(super) fn listen_addresses(&self) -> Vec<(String, super::Listening)> {
        databases_of(&self.listing.records)
            .into_iter()
            .filter_map(|(name, records)| {
                let bytes = records.get(DATABASE_YAML)?;
                let text = std::str::from_utf8(bytes).ok()?;
                let file = etcd_origin(&self.prefix, &name).join(DATABASE_YAML);
                let settings = DatabaseSettings::parse(&file, text).ok()?;
                Some((name, super::Listening::of(&settings)))
            })
            .collect()
    }

    /// The archive of database `name` as one value: every key under `databases/NAME/` and
    /// `secrets/databases/NAME/`, with when and from which revision. One value, so that a
    /// database with any number of certificates is archived in one operation. Its key,
    /// `secrets/archive/NAME/TIMESTAMP` (`-2`, `-3`... if taken), is in the secrets range:
    /// it holds the CA key, which the replicas' etcd role must not read.
    pub(super) fn archive(&self, name: &str, at: OffsetDateTime) -> Result<(String, Vec<u8>)> {
        let under = [
            format!("{DATABASES_DIR}/{name}/"),
            format!("{SECRETS_PREFIX}{DATABASES_DIR}/{name}/"),
        ];
        let mut records = serde_json::Map::new();
        let mut binary = serde_json::Map::new();
        for (key, bytes) in &self.listing.records {
            if !under.iter().any(|u| key.starts_with(u.as_str())) {
                continue;
            }
            match std::str::from_utf8(bytes) {
                Ok(text) => records.insert(key.clone(), text.into()),
                Err(_) => binary.insert(key.clone(), hex::encode(bytes).into()),
            };
        }
        let mut archive = serde_json::json!({
            "database": name,
            "archived_at": crate::state::rfc3339(at),
            "revision": self.listing.revision,
            "records": records,
        });
        if !binary.is_empty() {
            archive["records_hex"] = binary.into();
        }
        let value = serde_json::to_vec_pretty(&archive)
            .map_err(|e| ControlError::Invalid(format!("archive of database {name}: {e}")))?;
        let stamp = at
            .to_offset(time::UtcOffset::UTC)
            .format(time::macros::format_description!(
                "[year][month][day]T[hour][minute][second]Z"
            ))
            .unwrap_or_else(|_| at.unix_timestamp().to_string());
        let base = format!("{ARCHIVE_PREFIX}{name}/{stamp}");
        let mut key = base.clone();
        let mut n = 1;
        while self.has(&key) {
            n += 1;
            key = format!("{base}-{n}");
        }
        Ok((key, value))
    }

    pub(super) fn secret(&self, database: &str, rel: &str) -> Result<Vec<u8>> {
        let key = format!("{SECRETS_PREFIX}{DATABASES_DIR}/{database}/{rel}");
        self.listing
            .get(&key)
            .map(<[u8]>::to_vec)
            .ok_or_else(|| ControlError::NotFound(format!("etcd:{}/{key}: missing", self.prefix)))
    }

    /// The audit records under `PREFIX/audit/`, in key order (the order they were written).
    pub(super) fn audit_entries(&self) -> Result<Vec<crate::state::AuditEntry>> {
        self.listing
            .records
            .range(AUDIT_PREFIX.to_owned()..)
            .take_while(|(k, _)| k.starts_with(AUDIT_PREFIX))
            .map(|(k, v)| {
                serde_json::from_slice(v).map_err(|e| {
                    ControlError::Invalid(format!(
                        "etcd:{}/{k}: not an audit record: {e}",
                        self.prefix
                    ))
                })
            })
            .collect()
    }

    /// The key after the last audit line and the `queued` keys already added to the change:
    /// two writers that read the same state pick the same one, and the guard lets only one
    /// of them commit.
    pub(super) fn next_audit_key(&self, queued: usize) -> String {
        let last = self
            .listing
            .records
            .range(AUDIT_PREFIX.to_owned()..)
            .take_while(|(k, _)| k.starts_with(AUDIT_PREFIX))
            .filter_map(|(k, _)| k[AUDIT_PREFIX.len()..].parse::<usize>().ok())
            .max()
            .unwrap_or(0);
        audit_line_key(last + 1 + queued)
    }
}
