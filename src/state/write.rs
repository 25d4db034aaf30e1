//! The writer side of the state directory: staged creation of database and certificate
//! folders, single-file replacement, archiving and the audit log. The proxy may reload at any
//! instant, so every change becomes visible in one rename: a whole new folder (staged under a
//! dot-name, which the loaders skip, then renamed into place) or one replaced file.
//!
//! These functions do not lock. Callers take [`StateDir::lock`] around each read-modify-write
//! so that two writers never interleave.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::journal::stage_file;
use super::*;
use crate::config::ConfigErrors;

/// What can go wrong while changing the state directory.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    // The reason is in the message and deliberately not a `source`: the CLI prints the
    // whole chain (`{:#}`), which would say "No space left on device" twice.
    #[error("cannot write {}: {error}", path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("unknown database {0:?}")]
    UnknownDatabase(String),
    #[error("mTLS is already enabled for database {0:?}")]
    DatabaseExists(String),
    #[error("certificate {0} already exists")]
    CertificateExists(String),
    #[error("{}", one_line(.0))]
    Invalid(ConfigErrors),
}

impl StateError {
    pub fn io(path: &Path, source: std::io::Error) -> StateError {
        StateError::Io {
            path: path.to_path_buf(),
            error: source,
        }
    }
}

impl From<ConfigErrors> for StateError {
    fn from(e: ConfigErrors) -> Self {
        StateError::Invalid(e)
    }
}

/// Every error of a validation pass on one line, for a CLI that promises one-line errors.
pub fn one_line(errors: &ConfigErrors) -> String {
    errors
        .0
        .iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}

/// Mode of files that hold no secret.
pub const PUBLIC_MODE: u32 = 0o644;
/// Mode of private keys: the proxy refuses keys readable by group or others.
pub const PRIVATE_MODE: u32 = 0o600;
/// Mode of folders that hold private keys.
pub const PRIVATE_DIR_MODE: u32 = 0o700;

/// A folder being filled before it appears under its real name. Dropped without
/// [`Staged::commit`], it is removed, so a failed command leaves nothing behind.
#[derive(Debug)]
pub struct Staged {
    dir: PathBuf,
    target: PathBuf,
    committed: bool,
}

impl Staged {
    /// Creates `.NAME.new-PID` next to `target`, mode 0700.
    fn create(target: PathBuf) -> Result<Staged, StateError> {
        let parent = target.parent().unwrap_or(Path::new(".")).to_path_buf();
        std::fs::create_dir_all(&parent).map_err(|e| StateError::io(&parent, e))?;
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let dir = parent.join(format!(".{name}.new-{}", std::process::id()));
        // A leftover from a crashed run of a process with the same pid: it was never visible.
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| StateError::io(&dir, e))?;
        }
        DirBuilder::new()
            .mode(PRIVATE_DIR_MODE)
            .create(&dir)
            .map_err(|e| StateError::io(&dir, e))?;
        Ok(Staged {
            dir,
            target,
            committed: false,
        })
    }

    /// Where the files go until the commit.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Writes one file (relative path) into the staged folder.
    pub fn write(&self, rel: &str, bytes: &[u8], mode: u32) -> Result<(), StateError> {
        // The error names the file as it would have appeared (`databases/app/ca.crt`), not
        // the staged dot-folder that is removed when the command fails.
        write_atomic(&self.dir.join(rel), bytes, mode)
            .map_err(|e| StateError::io(&self.target.join(rel), e))
    }

    /// Hands the folder to a change that makes it visible with its audit record
    /// ([`StateDir::apply`]); dropped before that, the folder is removed as before.
    pub fn into_pending(mut self) -> Pending {
        self.committed = true;
        Pending::staged(self.dir.clone(), self.target.clone())
    }

    /// Renames the folder into place now, with no audit record. The caller holds the lock
    /// and has checked that the target does not exist; rename(2) would silently replace an
    /// empty folder.
    pub fn commit(self) -> Result<PathBuf, StateError> {
        let target = self.target.clone();
        self.into_pending().show()?;
        Ok(target)
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl StateDir {
    /// Whether the database has a folder (it may still fail to load).
    pub fn has_database(&self, name: &str) -> bool {
        validate_database_name(name).is_ok() && self.database_dir(name).is_dir()
    }

    /// Starts a new database folder; fails if the database exists.
    pub fn stage_database(&self, name: &str) -> Result<Staged, StateError> {
        validate_database_name(name)
            .map_err(|m| ConfigErrors::one(&self.database_dir(name), "", None, m))?;
        let target = self.database_dir(name);
        if target.exists() {
            return Err(StateError::DatabaseExists(name.to_owned()));
        }
        Staged::create(target)
    }

    /// Replaces one file of an existing database folder, visible at once.
    pub fn write_database_file(
        &self,
        name: &str,
        file: &str,
        bytes: &[u8],
        mode: u32,
    ) -> Result<(), StateError> {
        self.stage_database_file(name, file, bytes, mode)?.show()
    }

    /// Stages a replacement of one file of an existing database folder.
    pub fn stage_database_file(
        &self,
        name: &str,
        file: &str,
        bytes: &[u8],
        mode: u32,
    ) -> Result<Pending, StateError> {
        if !self.has_database(name) {
            return Err(StateError::UnknownDatabase(name.to_owned()));
        }
        stage_file(&self.database_dir(name).join(file), bytes, mode)
    }

    /// Stages a file at the state root (`renewal.yaml`).
    pub fn stage_root_file(
        &self,
        file: &str,
        bytes: &[u8],
        mode: u32,
    ) -> Result<Pending, StateError> {
        stage_file(&self.root().join(file), bytes, mode)
    }

    /// Adds a client certificate folder (record, certificate, key) in one rename, so the
    /// proxy never sees a certificate folder without its record; visible at once.
    pub fn add_certificate(
        &self,
        name: &str,
        record: &CertificateRecord,
        cert_pem: &[u8],
        key_pem: &[u8],
    ) -> Result<PathBuf, StateError> {
        let pending = self.stage_certificate(name, record, cert_pem, key_pem)?;
        let target = pending.target().to_path_buf();
        pending.show()?;
        Ok(target)
    }

    /// Stages a client certificate folder, to appear in one rename.
    pub fn stage_certificate(
        &self,
        name: &str,
        record: &CertificateRecord,
        cert_pem: &[u8],
        key_pem: &[u8],
    ) -> Result<Pending, StateError> {
        if !self.has_database(name) {
            return Err(StateError::UnknownDatabase(name.to_owned()));
        }
        let target = certificate_dir(&self.database_dir(name), &record.id);
        if target.exists() {
            return Err(StateError::CertificateExists(record.id.clone()));
        }
        let staged = Staged::create(target)?;
        staged.write(CLIENT_CERT, cert_pem, PUBLIC_MODE)?;
        staged.write(CLIENT_KEY, key_pem, PRIVATE_MODE)?;
        staged.write(CERTIFICATE_YAML, record.to_yaml().as_bytes(), PUBLIC_MODE)?;
        Ok(staged.into_pending())
    }

    /// Replaces the record of an existing certificate (revocation, successor link), visible
    /// at once.
    pub fn save_certificate_record(
        &self,
        name: &str,
        record: &CertificateRecord,
    ) -> Result<(), StateError> {
        self.stage_certificate_record(name, record)?.show()
    }

    /// Stages a replacement of the record of an existing certificate.
    pub fn stage_certificate_record(
        &self,
        name: &str,
        record: &CertificateRecord,
    ) -> Result<Pending, StateError> {
        let dir = certificate_dir(&self.database_dir(name), &record.id);
        if !dir.is_dir() {
            return Err(StateError::Io {
                path: dir,
                error: std::io::ErrorKind::NotFound.into(),
            });
        }
        stage_file(
            &dir.join(CERTIFICATE_YAML),
            record.to_yaml().as_bytes(),
            PUBLIC_MODE,
        )
    }

    /// Moves a database folder to `archive/NAME-TIMESTAMP`: the proxy stops serving it on its
    /// next reload, and its CA, keys and records are kept rather than deleted. At once.
    pub fn archive_database(&self, name: &str, at: OffsetDateTime) -> Result<PathBuf, StateError> {
        let pending = self.stage_archive(name, at)?;
        let target = pending.target().to_path_buf();
        pending.show()?;
        Ok(target)
    }

    /// Plans the move of a database folder into the archive (the archive folder is made now,
    /// the move is the rename); [`Pending::target`] is where it goes.
    pub fn stage_archive(&self, name: &str, at: OffsetDateTime) -> Result<Pending, StateError> {
        if !self.has_database(name) {
            return Err(StateError::UnknownDatabase(name.to_owned()));
        }
        let archive = self.root().join(ARCHIVE_DIR);
        DirBuilder::new()
            .recursive(true)
            .mode(PRIVATE_DIR_MODE)
            .create(&archive)
            .map_err(|e| StateError::io(&archive, e))?;
        let stamp = at
            .to_offset(time::UtcOffset::UTC)
            .format(time::macros::format_description!(
                "[year][month][day]T[hour][minute][second]Z"
            ))
            .unwrap_or_else(|_| at.unix_timestamp().to_string());
        let mut target = archive.join(format!("{name}-{stamp}"));
        let mut n = 1;
        while target.exists() {
            n += 1;
            target = archive.join(format!("{name}-{stamp}-{n}"));
        }
        Ok(Pending::moved(self.database_dir(name), target))
    }

    /// Opens the audit log for appending, creating it (0600) if needed. Opening it before a
    /// change is made means an unwritable log stops the command before anything changes.
    pub fn open_audit_log(&self) -> Result<AuditLog, StateError> {
        let path = self.audit_log();
        std::fs::create_dir_all(self.root()).map_err(|e| StateError::io(self.root(), e))?;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(PRIVATE_MODE)
            .open(&path)
            .map_err(|e| StateError::io(&path, e))?;
        Ok(AuditLog { file, path })
    }
}

/// The folder of one client certificate.
pub fn certificate_dir(db_dir: &Path, id: &str) -> PathBuf {
    db_dir.join(CERTIFICATES_DIR).join(id)
}

/// One line of `STATE/audit.log`. Details never hold key material.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditEntry {
    #[serde(with = "time::serde::rfc3339")]
    pub time: OffsetDateTime,
    pub actor: String,
    /// `mtls.create`, `ip_rule.delete`, `certificate.revoke`, ... (see docs/STATE.md).
    pub action: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<String>,
    #[serde(default)]
    pub details: serde_json::Value,
}

/// An open audit log.
#[derive(Debug)]
pub struct AuditLog {
    file: File,
    path: PathBuf,
}

impl AuditLog {
    /// Appends one JSON line and syncs it.
    pub fn append(&mut self, entry: &AuditEntry) -> Result<(), StateError> {
        let line = self.line_of(entry)?;
        self.append_line(&line)
    }

    /// The line `entry` is in the log, without its newline.
    pub fn line_of(&self, entry: &AuditEntry) -> Result<String, StateError> {
        serde_json::to_string(entry)
            .map_err(|e| StateError::io(&self.path, std::io::Error::other(e)))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `line` and a newline, and syncs. One `write` of a whole line on an `O_APPEND`
    /// file keeps lines whole even if a writer ignored the lock.
    pub fn append_line(&mut self, line: &str) -> Result<(), StateError> {
        let line = format!("{line}\n");
        let before = self
            .file
            .metadata()
            .map_err(|e| StateError::io(&self.path, e))?
            .len();
        let mut done = 0;
        let written = loop {
            match self.file.write(&line.as_bytes()[done..]) {
                Ok(0) => break Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    done += n;
                    if done == line.len() {
                        break self.file.sync_data();
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        if let Err(e) = written {
            // A full disk takes the part of the line that fits in the file's last block and
            // refuses the rest: cut that part off again, or the next line would be glued to a
            // torn one and the log would no longer parse. Only if the file ends with exactly
            // our part: a download notes itself without the writers' lock, and a line another
            // process appended meanwhile is not ours to cut.
            let ours = self
                .file
                .metadata()
                .is_ok_and(|m| m.len() == before + done as u64);
            if done > 0 && ours {
                let _ = self
                    .file
                    .set_len(before)
                    .and_then(|_| self.file.sync_data());
            }
            return Err(StateError::io(&self.path, e));
        }
        Ok(())
    }
}

/// Reads every line of an audit log (for tests and tools); a bad line is an error with its
/// line number.
pub fn parse_audit_log(path: &Path, text: &str) -> Result<Vec<AuditEntry>, ConfigErrors> {
    let mut errors = ConfigErrors::default();
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<AuditEntry>(line) {
            Ok(e) => out.push(e),
            Err(e) => errors.extend(ConfigErrors::one(
                path,
                "",
                Some(i as u64 + 1),
                e.to_string(),
            )),
        }
    }
    errors.into_result(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn staged_folder_appears_only_on_commit_and_vanishes_on_drop() {
        let root = tempfile::tempdir().unwrap();
        let state = StateDir::new(root.path());
        {
            let s = state.stage_database("db1").unwrap();
            s.write("a.txt", b"x", PUBLIC_MODE).unwrap();
            assert_eq!(state.database_names().unwrap(), Vec::<String>::new());
        }
        let leftovers = std::fs::read_dir(state.databases_dir()).unwrap().count();
        assert_eq!(leftovers, 0);
        let s = state.stage_database("db1").unwrap();
        s.write("a.txt", b"x", PUBLIC_MODE).unwrap();
        s.commit().unwrap();
        assert_eq!(state.database_names().unwrap(), vec!["db1".to_string()]);
        let mode = std::fs::metadata(state.database_dir("db1"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, PRIVATE_DIR_MODE);
        assert!(matches!(
            state.stage_database("db1"),
            Err(StateError::DatabaseExists(_))
        ));
        assert!(state.stage_database("../x").is_err());
    }

    #[test]
    fn archive_moves_the_folder_and_never_overwrites() {
        let root = tempfile::tempdir().unwrap();
        let state = StateDir::new(root.path());
        let at = OffsetDateTime::now_utc();
        for _ in 0..2 {
            state.stage_database("db1").unwrap().commit().unwrap();
            let to = state.archive_database("db1", at).unwrap();
            assert!(to.is_dir());
        }
        assert!(!state.has_database("db1"));
        let n = std::fs::read_dir(root.path().join(ARCHIVE_DIR))
            .unwrap()
            .count();
        assert_eq!(n, 2);
        assert!(matches!(
            state.archive_database("db1", at),
            Err(StateError::UnknownDatabase(_))
        ));
    }

    #[test]
    fn audit_lines_round_trip() {
        let root = tempfile::tempdir().unwrap();
        let state = StateDir::new(root.path());
        let mut log = state.open_audit_log().unwrap();
        let entry = AuditEntry {
            time: OffsetDateTime::now_utc().replace_nanosecond(0).unwrap(),
            actor: "alice".into(),
            action: "ip_rule.create".into(),
            database: Some("db1".into()),
            details: serde_json::json!({"cidr": "10.0.0.0/8"}),
        };
        log.append(&entry).unwrap();
        log.append(&entry).unwrap();
        let text = std::fs::read_to_string(state.audit_log()).unwrap();
        let back = parse_audit_log(&state.audit_log(), &text).unwrap();
        assert_eq!(back, vec![entry.clone(), entry]);
        let mode = std::fs::metadata(state.audit_log())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, PRIVATE_MODE);
    }
}
