//! The state directory: one folder per database with its settings, PKI material, IP rules,
//! client-certificate records and CRL. The proxy reads it and the CLI writes it through this
//! one module, so the two can never disagree about the layout or what is valid.
//!
//! ```text
//! STATE/
//!   .lock                     advisory lock serialising writers
//!   audit.log                 one JSON line per change
//!   renewal.yaml              when `certificates renew` last ran and last succeeded
//!   databases/NAME/
//!     database.yaml           DatabaseSettings
//!     server.crt server.key   what the proxy presents (chain, key 0600)
//!     ca.crt ca.key           the client CA (the proxy reads only ca.crt)
//!     crl.pem                 revoked client certificates (required: missing is invalid)
//!     ip-rules.yaml           IpRules
//!     trusted-ips.yaml        TrustedIps (admitted without a certificate unless a rule covers it)
//!     certificates/ID/        certificate.yaml, client.crt, client.key
//!   archive/NAME-TIMESTAMP/   databases whose mTLS was disabled
//! ```

mod files;
mod journal;
mod model;
pub mod records;
mod renewal;
mod write;

pub use files::{write_atomic, StateLock};
pub use journal::{Pending, Recovered, JOURNAL};
pub use model::*;
pub use records::{load_each_from_records, DatabaseRecords, ReadRecords};
pub use renewal::*;
pub use write::*;

use std::path::{Path, PathBuf};

use crate::config::ConfigErrors;

pub const DATABASES_DIR: &str = "databases";
pub const ARCHIVE_DIR: &str = "archive";
pub const AUDIT_LOG: &str = "audit.log";
pub const LOCK_FILE: &str = ".lock";
pub const DATABASE_YAML: &str = "database.yaml";
pub const SERVER_CERT: &str = "server.crt";
pub const SERVER_KEY: &str = "server.key";
pub const CA_CERT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";
pub const CRL: &str = "crl.pem";
pub const IP_RULES: &str = "ip-rules.yaml";
pub const TRUSTED_IPS: &str = "trusted-ips.yaml";
pub const CERTIFICATES_DIR: &str = "certificates";
pub const CERTIFICATE_YAML: &str = "certificate.yaml";
pub const CLIENT_CERT: &str = "client.crt";
pub const CLIENT_KEY: &str = "client.key";

/// A state directory on disk.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        StateDir { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn databases_dir(&self) -> PathBuf {
        self.root.join(DATABASES_DIR)
    }

    pub fn database_dir(&self, name: &str) -> PathBuf {
        self.databases_dir().join(name)
    }

    pub fn audit_log(&self) -> PathBuf {
        self.root.join(AUDIT_LOG)
    }

    /// Takes the writers' lock (blocking). Readers never lock: every write is an atomic rename,
    /// so a reader sees either the old or the new file.
    pub fn lock(&self) -> std::io::Result<StateLock> {
        std::fs::create_dir_all(&self.root)?;
        StateLock::acquire(&self.root.join(LOCK_FILE))
    }

    /// Names of the databases with a folder, sorted. A missing `databases/` is an empty list.
    pub fn database_names(&self) -> Result<Vec<String>, ConfigErrors> {
        let dir = self.databases_dir();
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => {
                return Err(ConfigErrors::one(
                    &dir,
                    "",
                    None,
                    format!("cannot list: {e}"),
                ))
            }
        };
        let mut names = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            // Kubernetes Secret/ConfigMap volumes add `..data` and timestamped folders.
            if name.starts_with('.') || !entry.path().is_dir() {
                continue;
            }
            names.push(name);
        }
        names.sort();
        Ok(names)
    }

    pub fn load_database(&self, name: &str) -> Result<DatabaseState, ConfigErrors> {
        validate_database_name(name)
            .map_err(|m| ConfigErrors::one(&self.database_dir(name), "", None, m))?;
        DatabaseState::load(name, &self.database_dir(name))
    }

    /// Loads every database; errors of all of them are reported together.
    pub fn load_all(&self) -> Result<Vec<DatabaseState>, ConfigErrors> {
        let mut errors = ConfigErrors::default();
        let mut out = Vec::new();
        for (_, loaded) in self.load_each()? {
            match loaded {
                Ok(db) => out.push(db),
                Err(e) => errors.extend(e),
            }
        }
        errors.into_result(out)
    }

    /// Loads every database on its own, so that a reload can apply the databases that load
    /// and keep the previous state of those that do not. Only a `databases/` folder that
    /// cannot be listed fails as a whole.
    pub fn load_each(&self) -> Result<Vec<LoadedDatabase>, ConfigErrors> {
        Ok(self
            .database_names()?
            .into_iter()
            .map(|name| {
                let loaded = self.load_database(&name);
                (name, loaded)
            })
            .collect())
    }
}

/// One database folder's name and what loading it gave.
pub type LoadedDatabase = (String, Result<DatabaseState, ConfigErrors>);

/// Database names become folder names and metric labels: keep them short and path-safe.
pub fn validate_database_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && name.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid database name {name:?}: use 1-63 lowercase letters, digits, '-' or '_', starting with a letter or digit"
        ))
    }
}
