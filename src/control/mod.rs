//! The one mutation path of the control plane. Every change to state (the CLI today, the
//! console and anything later) is one function here that validates its input, builds the new
//! records, proves the proxy would load them, writes them together with the audit record, and
//! returns what changed. Front ends parse input, ask for confirmation and render output; none
//! of them writes state or decides what is valid.
//!
//! A change runs as one [`Txn`]: the writers' lock is held from the first read to the audit
//! record, so two writers never both act on what they read (the directory store's form of a
//! compare-and-swap), and the state a change validated is the state it replaces. In both
//! stores a change's writes and its audit records land at [`Txn::commit`], together: one
//! guarded transaction in etcd, a journal in a directory (`state::journal`), which the next
//! writer completes if this one dies half-way.

pub mod certificates;
pub mod download;
mod etcd;
pub mod ip_rules;
pub mod mtls;
pub mod renewal;
pub mod trusted_ips;

use std::path::PathBuf;
use std::sync::Arc;

pub use etcd::EtcdBackend;

use serde_json::Value;
use time::OffsetDateTime;

use crate::metrics::Metrics;
use crate::pki::PkiError;
use crate::snapshot::DatabaseRuntime;
use crate::state::records::{to_store_key, SECRETS_PREFIX};
use crate::state::{
    self, one_line, validate_database_name, AuditEntry, AuditLog, CertificateRecord,
    DatabaseSettings, DatabaseState, StateDir, StateError, StateLock, CERTIFICATES_DIR,
    CERTIFICATE_YAML, CLIENT_CERT, CLIENT_KEY, DATABASES_DIR,
};

/// Where a database is reached: its listen address, and its server names (what picks it on
/// the shared listener).
#[derive(Debug, Clone)]
pub struct Listening {
    pub listen: state::Listen,
    pub server_names: Vec<String>,
}

impl Listening {
    pub fn of(s: &DatabaseSettings) -> Self {
        Listening {
            listen: s.listen,
            server_names: s.server_names.clone(),
        }
    }
}

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
    /// Another writer committed to etcd after this change read the state, every time it was
    /// tried; nothing of it was written.
    #[error(
        "the state in etcd {prefix} changed underneath this change ({attempts} attempts); \
         nothing was written: retry"
    )]
    Changed { prefix: String, attempts: u32 },
    /// etcd could not be reached or refused the request; nothing was written.
    #[error("{0}; nothing was changed")]
    Store(crate::store::StoreError),
}

pub type Result<T, E = ControlError> = std::result::Result<T, E>;

/// Write access to one state store.
#[derive(Debug, Clone)]
pub struct Control {
    state: StateDir,
    /// Set when the state lives in etcd: reads and commits go there, `state` is unused.
    etcd: Option<Arc<EtcdBackend>>,
}

/// How often a change that lost a race in etcd is recomputed from the new state before the
/// command gives up. Every conflict means another change won, so this only bounds the wait.
const ETCD_ATTEMPTS: u32 = 8;

impl Control {
    pub fn new(state: StateDir) -> Control {
        Control { state, etcd: None }
    }

    /// A control over an etcd prefix (the `etcd:` section of pgmtls.yaml).
    pub fn etcd(backend: EtcdBackend) -> Control {
        Control {
            state: StateDir::new(backend.origin()),
            etcd: Some(Arc::new(backend)),
        }
    }

    /// The state directory (in etcd mode a path naming the prefix, `etcd:PREFIX`, that is
    /// never written).
    pub fn state(&self) -> &StateDir {
        &self.state
    }

    pub fn etcd_backend(&self) -> Option<&EtcdBackend> {
        self.etcd.as_deref()
    }

    /// Whether `name` has any record (a folder, or keys under `databases/NAME/`), loadable or
    /// not.
    pub fn has_database(&self, name: &str) -> Result<bool> {
        match &self.etcd {
            Some(etcd) => Ok(etcd.read()?.database_names().iter().any(|n| n == name)),
            None => Ok(self.state.has_database(name)),
        }
    }

    /// The listen address and server names of every database whose settings parse, by name.
    pub fn listen_addresses(&self) -> Result<Vec<(String, Listening)>> {
        if let Some(etcd) = &self.etcd {
            return Ok(etcd.read()?.listen_addresses());
        }
        let mut out = Vec::new();
        for name in self.database_names()? {
            let file = self.state.database_dir(&name).join(state::DATABASE_YAML);
            let Ok(text) = std::fs::read_to_string(&file) else {
                continue;
            };
            if let Ok(s) = DatabaseSettings::parse(&file, &text) {
                out.push((name, Listening::of(&s)));
            }
        }
        Ok(out)
    }

    /// Runs one whole change. In etcd mode a change that lost the race to another writer is
    /// recomputed from the new state (so every check, such as the 60-rule limit, runs again)
    /// a few times before the command gives up; a directory change runs once, under the lock.
    pub fn retrying<T>(&self, mut change: impl FnMut() -> Result<T>) -> Result<T> {
        let Some(etcd) = &self.etcd else {
            return change();
        };
        for _ in 0..ETCD_ATTEMPTS {
            match change() {
                Err(ControlError::Store(crate::store::StoreError::Conflict { .. })) => continue,
                other => return other,
            }
        }
        Err(ControlError::Changed {
            prefix: etcd.prefix().to_owned(),
            attempts: ETCD_ATTEMPTS,
        })
    }

    /// Fails for an invalid or unknown database name.
    pub fn require(&self, name: &str) -> Result<()> {
        validate_database_name(name).map_err(ControlError::Invalid)?;
        if let Some(etcd) = &self.etcd {
            return etcd.read()?.require(name).map(|_| ());
        }
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
        if let Some(etcd) = &self.etcd {
            validate_database_name(name).map_err(ControlError::Invalid)?;
            return etcd.read()?.load(name);
        }
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
        if let Some(etcd) = &self.etcd {
            return Ok(etcd.read()?.database_names());
        }
        self.state
            .database_names()
            .map_err(|e| ControlError::State(StateError::Invalid(e)))
    }

    /// Starts a change by `actor`: checks the database exists (before touching anything, so a
    /// typo creates no files), takes the writers' lock, opens the audit log.
    pub fn begin(&self, database: Option<&str>, actor: &str) -> Result<Txn<'_>> {
        if let Some(etcd) = &self.etcd {
            let read = etcd.read()?;
            if let Some(db) = database {
                validate_database_name(db).map_err(ControlError::Invalid)?;
                read.require(db)?;
            }
            return Ok(Txn {
                control: self,
                inner: TxnInner::Etcd {
                    read,
                    write: crate::store::Write::default(),
                    queued_audit: 0,
                },
                actor: actor.to_owned(),
            });
        }
        if let Some(db) = database {
            self.require(db)?;
        }
        let lock = self.state.lock().map_err(|source| ControlError::Lock {
            path: self.state.root().to_path_buf(),
            source,
        })?;
        let mut audit = self.state.open_audit_log()?;
        // A writer that died after its journal left a change half-visible or unrecorded:
        // finish it before reading, so this change starts from a whole state.
        self.state.recover(&mut audit)?;
        // Another writer may have removed it while we waited for the lock (or the change
        // just finished did).
        if let Some(db) = database {
            self.require(db)?;
        }
        Ok(Txn {
            control: self,
            inner: TxnInner::Dir {
                _lock: lock,
                audit,
                pending: Vec::new(),
                queued: Vec::new(),
            },
            actor: actor.to_owned(),
        })
    }

    /// Records an event that changes no state (a download of key material) as one audit
    /// record of its own.
    pub fn note(
        &self,
        action: &str,
        database: Option<&str>,
        details: Value,
        actor: &str,
    ) -> Result<AuditEntry> {
        self.retrying(|| {
            let mut txn = self.begin(None, actor)?;
            txn.record(action, database, details.clone())
        })
    }

    /// Every audit record, oldest first: `STATE/audit.log`, or the keys under `PREFIX/audit/`.
    /// Read-only (the console's activity list); a missing log is an empty one.
    pub fn audit_log(&self) -> Result<Vec<AuditEntry>> {
        if let Some(etcd) = &self.etcd {
            return etcd.read()?.audit_entries();
        }
        let path = self.state.audit_log();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => {
                return Err(ControlError::Invalid(format!(
                    "{}: cannot read: {e}",
                    path.display()
                )))
            }
        };
        state::parse_audit_log(&path, &text).map_err(|e| ControlError::Invalid(one_line(&e)))
    }

    /// The CA private key of a database, to sign with: a file of the directory (with the
    /// proxy's permission check), or `PREFIX/secrets/databases/NAME/ca.key` in etcd.
    pub fn ca_key(&self, db: &DatabaseState) -> Result<Vec<u8>> {
        match &self.etcd {
            Some(etcd) => etcd.read()?.secret(&db.name, state::CA_KEY),
            None => state::read_private_key(&db.dir.join(state::CA_KEY))
                .map_err(|e| ControlError::Invalid(one_line(&e))),
        }
    }
}

/// An open change: the writers' lock is held until it is dropped.
pub struct Txn<'a> {
    control: &'a Control,
    inner: TxnInner,
    actor: String,
}

/// What a change holds while it runs: the directory's lock and audit log, or the etcd listing
/// it read and the records it will commit (with its audit record) in one transaction.
enum TxnInner {
    Dir {
        _lock: StateLock,
        audit: AuditLog,
        /// Staged writes, made visible in this order at the commit.
        pending: Vec<state::Pending>,
        /// Audit records appended at the commit, after `pending`.
        queued: Vec<AuditEntry>,
    },
    Etcd {
        read: etcd::Read,
        write: crate::store::Write,
        /// Audit keys already in `write`, so the next one is numbered after them.
        queued_audit: usize,
    },
}

impl Txn<'_> {
    pub fn actor(&self) -> &str {
        &self.actor
    }

    /// Whether `name` has any record as of this change (see [`Control::has_database`]).
    pub fn has_database(&self, name: &str) -> Result<bool> {
        match &self.inner {
            TxnInner::Dir { .. } => self.control.has_database(name),
            TxnInner::Etcd { read, .. } => Ok(read.database_names().iter().any(|n| n == name)),
        }
    }

    /// The listen addresses as of this change (see [`Control::listen_addresses`]).
    pub fn listen_addresses(&self) -> Result<Vec<(String, Listening)>> {
        match &self.inner {
            TxnInner::Dir { .. } => self.control.listen_addresses(),
            TxnInner::Etcd { read, .. } => Ok(read.listen_addresses()),
        }
    }

    /// Whether this change commits to etcd (and so to a transaction of bounded size).
    pub fn is_etcd(&self) -> bool {
        matches!(self.inner, TxnInner::Etcd { .. })
    }

    /// Adds a new database from its files (`rel` relative to its folder, mode for the
    /// directory), after loading them exactly as a reader will and proving the proxy would
    /// serve them: a staged folder loaded by the directory loader and renamed into place, or
    /// records parsed by the replicas' record loader and put into this change's commit. Fails
    /// if the database exists. Returns the database as loaded.
    pub fn add_database(
        &mut self,
        name: &str,
        files: &[(String, Vec<u8>, u32)],
    ) -> Result<DatabaseState> {
        if let TxnInner::Dir { pending, .. } = &mut self.inner {
            let staged = self.control.state.stage_database(name)?;
            for (rel, bytes, mode) in files {
                staged.write(rel, bytes, *mode)?;
            }
            let loaded = DatabaseState::load(name, staged.path())
                .map_err(|e| ControlError::WouldReject(one_line(&e)))?;
            validate(&loaded)?;
            pending.push(staged.into_pending());
            return Ok(loaded);
        }
        if self.has_database(name)? {
            return Err(StateError::DatabaseExists(name.to_owned()).into());
        }
        let TxnInner::Etcd { read, .. } = &self.inner else {
            return Err(ControlError::Invalid("no etcd store".into()));
        };
        let records = files
            .iter()
            .map(|(rel, bytes, _)| (rel.clone(), bytes.clone()))
            .collect();
        let loaded = read
            .load_records(name, records)
            .map_err(|e| ControlError::WouldReject(one_line(&e)))?;
        validate(&loaded)?;
        for (rel, bytes, mode) in files {
            self.write_database_file(name, rel, bytes, *mode)?;
        }
        Ok(loaded)
    }

    /// Takes a database out of service, keeping its records: the directory moves its folder
    /// to `archive/NAME-TIMESTAMP`; etcd removes `databases/NAME/` and
    /// `secrets/databases/NAME/` (one range delete each, whatever the number of
    /// certificates) and keeps every record in one value under the secrets range,
    /// `secrets/archive/NAME/TIMESTAMP`, all in this change's commit. Returns where the
    /// records went.
    pub fn archive_database(&mut self, name: &str, at: OffsetDateTime) -> Result<PathBuf> {
        match &mut self.inner {
            TxnInner::Dir { pending, .. } => {
                let moved = self.control.state.stage_archive(name, at)?;
                let target = moved.target().to_path_buf();
                pending.push(moved);
                Ok(target)
            }
            TxnInner::Etcd { read, write, .. } => {
                read.require(name)?;
                let (key, value) = read.archive(name, at)?;
                write.delete_under(format!("{DATABASES_DIR}/{name}"));
                write.delete_under(format!("{SECRETS_PREFIX}{DATABASES_DIR}/{name}"));
                let path = PathBuf::from(format!("etcd:{}/{key}", read.prefix()));
                write.put(key, value);
                Ok(path)
            }
        }
    }

    /// Loads a database as it is now: under the lock, or as of the etcd listing this change
    /// commits against.
    pub fn load(&self, name: &str) -> Result<DatabaseState> {
        match &self.inner {
            TxnInner::Dir { .. } => self.control.load(name),
            TxnInner::Etcd { read, .. } => read.load(name),
        }
    }

    /// The CA key of `db` as of this change.
    pub fn ca_key(&self, db: &DatabaseState) -> Result<Vec<u8>> {
        match &self.inner {
            TxnInner::Dir { .. } => self.control.ca_key(db),
            TxnInner::Etcd { read, .. } => read.secret(&db.name, state::CA_KEY),
        }
    }

    /// Replaces one file of a database (`rel` relative to its folder): written now in a
    /// directory, part of the commit in etcd.
    pub fn write_database_file(
        &mut self,
        database: &str,
        rel: &str,
        bytes: &[u8],
        mode: u32,
    ) -> Result<()> {
        match &mut self.inner {
            TxnInner::Dir { pending, .. } => {
                let staged = self
                    .control
                    .state
                    .stage_database_file(database, rel, bytes, mode)?;
                pending.push(staged);
            }
            TxnInner::Etcd { write, .. } => {
                write.put(
                    to_store_key(&format!("{DATABASES_DIR}/{database}/{rel}")),
                    bytes.to_vec(),
                );
            }
        }
        Ok(())
    }

    /// The renewal record as of this change, with the name errors give it; `Ok(None)` when
    /// there is none yet.
    pub fn renewal_record(&self) -> std::result::Result<Option<state::RenewalRecord>, StateError> {
        match &self.inner {
            TxnInner::Dir { .. } => {
                state::RenewalRecord::read(self.control.state.root()).map_err(StateError::Invalid)
            }
            TxnInner::Etcd { read, .. } => {
                let origin =
                    PathBuf::from(format!("etcd:{}/{}", read.prefix(), state::RENEWAL_YAML));
                read.root_record(state::RENEWAL_YAML)
                    .map(|b| state::RenewalRecord::parse(&origin, b))
                    .transpose()
                    .map_err(StateError::Invalid)
            }
        }
    }

    /// Replaces the renewal record at the state root: written now in a directory (0644, it
    /// holds no secret), part of the commit in etcd (key `renewal.yaml`).
    pub fn write_renewal_record(&mut self, record: &state::RenewalRecord) -> Result<()> {
        let bytes = record.to_yaml().into_bytes();
        match &mut self.inner {
            TxnInner::Dir { pending, .. } => {
                let staged = self.control.state.stage_root_file(
                    state::RENEWAL_YAML,
                    &bytes,
                    state::PUBLIC_MODE,
                )?;
                pending.push(staged);
            }
            TxnInner::Etcd { write, .. } => {
                write.put(state::RENEWAL_YAML, bytes);
            }
        }
        Ok(())
    }

    /// Adds a client certificate (record, certificate, key) to a database.
    pub fn add_certificate(
        &mut self,
        database: &str,
        record: &CertificateRecord,
        cert_pem: &[u8],
        key_pem: &[u8],
    ) -> Result<()> {
        if let TxnInner::Dir { pending, .. } = &mut self.inner {
            let staged = self
                .control
                .state
                .stage_certificate(database, record, cert_pem, key_pem)?;
            pending.push(staged);
            return Ok(());
        }
        let dir = format!("{CERTIFICATES_DIR}/{}", record.id);
        if let TxnInner::Etcd { read, .. } = &self.inner {
            if read.has(&format!(
                "{DATABASES_DIR}/{database}/{dir}/{CERTIFICATE_YAML}"
            )) {
                return Err(StateError::CertificateExists(record.id.clone()).into());
            }
        }
        self.write_database_file(database, &format!("{dir}/{CLIENT_CERT}"), cert_pem, 0)?;
        self.write_database_file(database, &format!("{dir}/{CLIENT_KEY}"), key_pem, 0)?;
        self.write_database_file(
            database,
            &format!("{dir}/{CERTIFICATE_YAML}"),
            record.to_yaml().as_bytes(),
            0,
        )
    }

    /// Replaces the record of an existing certificate (revocation, successor link).
    pub fn save_certificate_record(
        &mut self,
        database: &str,
        record: &CertificateRecord,
    ) -> Result<()> {
        if let TxnInner::Dir { pending, .. } = &mut self.inner {
            let staged = self
                .control
                .state
                .stage_certificate_record(database, record)?;
            pending.push(staged);
            return Ok(());
        }
        self.write_database_file(
            database,
            &format!("{CERTIFICATES_DIR}/{}/{CERTIFICATE_YAML}", record.id),
            record.to_yaml().as_bytes(),
            0,
        )
    }

    /// Adds the audit record of the change and commits it, and returns the record: the
    /// change's writes and its record land together (one guarded transaction in etcd, the
    /// journal in a directory), or none of them does.
    pub fn record(
        &mut self,
        action: &str,
        database: Option<&str>,
        details: Value,
    ) -> Result<AuditEntry> {
        let entry = self.queue_record(action, database, details)?;
        self.commit()?;
        Ok(entry)
    }

    /// Adds an audit record to the change without committing it, for a change made of
    /// several events (each renewal of `certificates renew` keeps its own record). It lands
    /// with [`Txn::commit`], after the writes queued so far (in etcd numbered after the
    /// audit keys already queued).
    pub fn queue_record(
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
        match &mut self.inner {
            TxnInner::Dir { queued, .. } => queued.push(entry.clone()),
            TxnInner::Etcd {
                read,
                write,
                queued_audit,
            } => {
                let mut line = serde_json::to_string(&entry)
                    .map_err(|e| ControlError::Invalid(format!("audit record: {e}")))?;
                line.push('\n');
                write.put(read.next_audit_key(*queued_audit), line.into_bytes());
                *queued_audit += 1;
            }
        }
        Ok(entry)
    }

    /// Commits what the change collected: in etcd, in one transaction guarded by the
    /// revision it read (a lost race is `Store(Conflict)`, for [`Control::retrying`]); in a
    /// directory, its staged writes in order and then its audit records, through the
    /// journal. A change is over once committed: the next one starts with
    /// [`Control::begin`] from the new state.
    pub fn commit(&mut self) -> Result<()> {
        let (read, write, queued_audit) = match &mut self.inner {
            TxnInner::Dir {
                audit,
                pending,
                queued,
                ..
            } => {
                // Taken out first: whatever happens, nothing is applied twice.
                let (mut pending, queued) = (std::mem::take(pending), std::mem::take(queued));
                self.control.state.apply(&mut pending, audit, &queued)?;
                return Ok(());
            }
            TxnInner::Etcd {
                read,
                write,
                queued_audit,
            } => (read, write, queued_audit),
        };
        if write.is_empty() {
            return Ok(());
        }
        let etcd = self
            .control
            .etcd
            .as_ref()
            .ok_or_else(|| ControlError::Invalid("no etcd store".into()))?;
        etcd.commit(read, write)?;
        *write = crate::store::Write::default();
        *queued_audit = 0;
        Ok(())
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
