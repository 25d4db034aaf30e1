//! The libpq files of a certificate, as `pgmtls certificates download` writes them and the
//! console hands them out: one builder, so both give the same bytes.

use serde_json::Value;

use super::certificates::{crl_serials, find};
use super::{Control, ControlError, Result};
use crate::pki;
use crate::state::{
    self, certificate_dir, one_line, AuditEntry, CertificateRecord, DatabaseState, PRIVATE_MODE,
    PUBLIC_MODE,
};

/// The audit action of a download.
pub const ACTION: &str = "certificate.download";

/// One file of a download: its name (with the prefix), contents and the mode to give it.
#[derive(Debug, Clone)]
pub struct File {
    pub name: String,
    pub bytes: Vec<u8>,
    pub mode: u32,
}

/// The four files of a download, in order: chain, key, root, PKCS-8 key.
#[derive(Debug, Clone)]
pub struct Bundle {
    pub record: CertificateRecord,
    pub files: [File; 4],
}

/// The four file names of a download, in order: chain, key, root, PKCS-8 key.
pub fn names(prefix: &str) -> [String; 4] {
    [
        format!("{prefix}postgresql.crt"),
        format!("{prefix}postgresql.key"),
        format!("{prefix}root.crt"),
        format!("{prefix}postgresql.pk8"),
    ]
}

/// A prefix is part of a file name: no directory separator, nothing a terminal or an archive
/// listing would show wrongly.
pub fn validate_prefix(prefix: &str) -> Result<()> {
    if prefix.contains('/') || prefix.chars().any(char::is_control) {
        return Err(ControlError::Invalid(
            "prefix must not contain '/' or control characters".into(),
        ));
    }
    Ok(())
}

/// Reads certificate `id` of `db` and builds its files: the client certificate followed by
/// the database CA (the chain), the client key, the CA alone (what verify-ca checks the
/// proxy's server certificate against) and the key as DER PKCS#8 (for JDBC). A revoked
/// certificate is refused; an expired one is not (the caller warns).
pub fn bundle(control: &Control, db: &DatabaseState, id: &str, prefix: &str) -> Result<Bundle> {
    validate_prefix(prefix)?;
    let record = find(db, id)?.clone();
    if record.revoked_at.is_some() || crl_serials(db).contains(&record.serial) {
        return Err(ControlError::Invalid(format!(
            "certificate {} is revoked; issue a new one with `pgmtls certificates create {}`",
            record.id, db.name
        )));
    }
    let (cert_pem, key_pem) = match control.etcd_backend() {
        // The operator's role reads the client key from PREFIX/secrets/.
        Some(etcd) => {
            let dir = format!("{}/{}", state::CERTIFICATES_DIR, record.id);
            (
                etcd.record(&db.name, &format!("{dir}/{}", state::CLIENT_CERT))?,
                etcd.secret(&db.name, &format!("{dir}/{}", state::CLIENT_KEY))?,
            )
        }
        None => {
            let cert_dir = certificate_dir(&db.dir, &record.id);
            let path = cert_dir.join(state::CLIENT_CERT);
            let cert_pem = std::fs::read(&path).map_err(|e| {
                ControlError::Invalid(format!("cannot read {}: {e}", path.display()))
            })?;
            let key_pem = state::read_private_key(&cert_dir.join(state::CLIENT_KEY))
                .map_err(|e| ControlError::Invalid(one_line(&e)))?;
            (cert_pem, key_pem)
        }
    };
    let key_text = std::str::from_utf8(&key_pem).map_err(|_| {
        ControlError::Invalid(format!(
            "{}: client.key of certificate {} is not text",
            db.name, record.id
        ))
    })?;
    let pk8 = pki::pem_key_to_pkcs8_der(key_text)?;
    let mut chain = cert_pem;
    if !chain.ends_with(b"\n") {
        chain.push(b'\n');
    }
    chain.extend_from_slice(&db.ca_pem);
    let [crt, key, root, pk8_name] = names(prefix);
    let files = [
        File {
            name: crt,
            bytes: chain,
            mode: PUBLIC_MODE,
        },
        File {
            name: key,
            bytes: key_pem,
            mode: PRIVATE_MODE,
        },
        File {
            name: root,
            bytes: db.ca_pem.clone(),
            mode: PUBLIC_MODE,
        },
        File {
            name: pk8_name,
            bytes: pk8,
            mode: PRIVATE_MODE,
        },
    ];
    Ok(Bundle { record, files })
}

/// Records a download in the audit log. Downloading copies key material out of the state:
/// worth a record, but in a directory store it is appended without the writers' lock, so a
/// read-only state directory still lets a client get its files (the caller warns on error).
pub fn note(control: &Control, database: &str, details: Value, actor: &str) -> Result<()> {
    match control.etcd_backend() {
        Some(_) => control
            .note(ACTION, Some(database), details, actor)
            .map(|_| ()),
        None => {
            let mut log = control.state().open_audit_log()?;
            log.append(&AuditEntry {
                time: super::now(),
                actor: actor.to_owned(),
                action: ACTION.into(),
                database: Some(database.to_owned()),
                details,
            })?;
            Ok(())
        }
    }
}
