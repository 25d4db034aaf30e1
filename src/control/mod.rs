//! The one mutation path of the control plane. Every change to state (the CLI today, the
//! console and anything later) is one function here that validates its input, builds the new
//! records, proves the proxy would load them, writes them together with the audit record, and
//! returns what changed. Front ends parse input, ask for confirmation and render output; none
//! of them writes state or decides what is valid.
//!
//! A change runs as one [`Txn`]: the writers' lock is held from the first read to the audit
//! record, so two writers never both act on what they read (the directory store's form of a
//! compare-and-swap), and the state a change validated is the state it replaces.

pub mod certificates;
pub mod ip_rules;
pub mod mtls;

use std::path::PathBuf;

use serde_json::Value;
use time::OffsetDateTime;

use crate::metrics::Metrics;
use crate::pki::PkiError;
use crate::snapshot::DatabaseRuntime;
use crate::state::{
    one_line, validate_database_name, AuditEntry, AuditLog, DatabaseState, StateDir, StateError,
    StateLock,
};

/// Why a change was refused or failed. The messages are what an operator reads, so each one
/// names the database, record or field concerned.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The input itself is wrong (a bad CIDR, an over-long description, a bad duration).
    #[error("{0}")]
    Invalid(String),
    #[error("unknown database {name:?} in {} (`pgmtls databases` lists them)", root.display())]
    UnknownDatabase { name: String, root: PathBuf },
    #[error("the state directory {} does not exist (`pgmtls mtls create` makes it)", .0.display())]
    NoStateDir(PathBuf),
    /// A record the change names does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The change collides with what is there (a duplicate, a limit, a concurrent change).
    #[error("{0}")]
    Conflict(String),
    #[error("database {name} does not load: {detail}")]
    DoesNotLoad { name: String, detail: String },
    /// The change would leave a state the proxy refuses to load; nothing was written.
    #[error("refusing to write a state the proxy would reject: {0}")]
    WouldReject(String),
    #[error("cannot lock {}: {source}", path.display())]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Pki(#[from] PkiError),
}

pub type Result<T, E = ControlError> = std::result::Result<T, E>;

/// Write access to one state store.
#[derive(Debug, Clone)]
pub struct Control {
    state: StateDir,
}

impl Control {
    pub fn new(state: StateDir) -> Control {
        Control { state }
    }

    pub fn state(&self) -> &StateDir {
        &self.state
    }

    /// Fails for an invalid or unknown database name.
    pub fn require(&self, name: &str) -> Result<()> {
        validate_database_name(name).map_err(ControlError::Invalid)?;
        if !self.state.root().exists() {
            return Err(ControlError::NoStateDir(self.state.root().to_path_buf()));
        }
        if !self.state.has_database(name) {
            return Err(ControlError::UnknownDatabase {
                name: name.to_owned(),
                root: self.state.root().to_path_buf(),
            });
        }
        Ok(())
    }

    /// Loads one database through the proxy's own loader.
    pub fn load(&self, name: &str) -> Result<DatabaseState> {
        self.require(name)?;
        self.state
            .load_database(name)
            .map_err(|e| ControlError::DoesNotLoad {
                name: name.to_owned(),
                detail: one_line(&e),
            })
    }

    /// Names of every database, sorted.
    pub fn database_names(&self) -> Result<Vec<String>> {
        self.state
            .database_names()
            .map_err(|e| ControlError::State(StateError::Invalid(e)))
    }

    /// Starts a change by `actor`: checks the database exists (before touching anything, so a
    /// typo creates no files), takes the writers' lock, opens the audit log.
    pub fn begin(&self, database: Option<&str>, actor: &str) -> Result<Txn<'_>> {
        if let Some(db) = database {
            self.require(db)?;
        }
        let lock = self.state.lock().map_err(|source| ControlError::Lock {
            path: self.state.root().to_path_buf(),
            source,
        })?;
        // Another writer may have removed it while we waited for the lock.
        if let Some(db) = database {
            self.require(db)?;
        }
        let audit = self.state.open_audit_log()?;
        Ok(Txn {
            control: self,
            _lock: lock,
            audit,
            actor: actor.to_owned(),
        })
    }
}

/// An open change: the writers' lock is held until it is dropped.
pub struct Txn<'a> {
    control: &'a Control,
    _lock: StateLock,
    audit: AuditLog,
    actor: String,
}

impl Txn<'_> {
    pub fn actor(&self) -> &str {
        &self.actor
    }

    pub fn state(&self) -> &StateDir {
        &self.control.state
    }

    /// Loads a database as it is now, under the lock.
    pub fn load(&self, name: &str) -> Result<DatabaseState> {
        self.control.load(name)
    }

    /// Appends the audit record of a change that has been written, and returns it.
    pub fn record(
        &mut self,
        action: &str,
        database: Option<&str>,
        details: Value,
    ) -> Result<AuditEntry> {
        let entry = AuditEntry {
            time: now(),
            actor: self.actor.clone(),
            action: action.to_owned(),
            database: database.map(str::to_owned),
            details,
        };
        self.audit.append(&entry)?;
        Ok(entry)
    }
}

/// Checks that the proxy would accept `state` on its next reload.
pub fn validate(state: &DatabaseState) -> Result<()> {
    let metrics = Metrics::new();
    DatabaseRuntime::build(state, &metrics)
        .map(|_| ())
        .map_err(|e| ControlError::WouldReject(one_line(&e)))
}

/// The current time in whole seconds (the precision of certificates and the YAML files).
pub fn now() -> OffsetDateTime {
    let t = OffsetDateTime::now_utc();
    t.replace_nanosecond(0).unwrap_or(t)
}

#[cfg(test)]
mod tests;
