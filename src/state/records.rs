//! The state as records: bytes under logical keys that are the directory's relative paths
//! (`databases/NAME/ip-rules.yaml`, `databases/NAME/certificates/ID/certificate.yaml`). The
//! database loader parses such a map; the directory is one way to produce it (reading files,
//! with the checks that only make sense on disk), an etcd listing is another.
//!
//! In etcd a record lives at `PREFIX/KEY`, except the keys the proxy never needs (the CA key
//! and the client keys), which live under `PREFIX/secrets/KEY` so that the replicas' etcd
//! role can be denied that range. The audit log becomes one key per line under
//! `PREFIX/audit/`. [`to_store_key`] and [`from_store_key`] are that mapping.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::*;
use crate::config::yaml::parse_doc;
use crate::config::ConfigErrors;

/// Records of one database, by key relative to its folder (`database.yaml`,
/// `certificates/ID/certificate.yaml`).
pub type DatabaseRecords = BTreeMap<String, Vec<u8>>;

/// Where the secrets the proxy never reads live in a store.
pub const SECRETS_PREFIX: &str = "secrets/";
/// Where the audit log's lines live in a store, one key per line.
pub const AUDIT_PREFIX: &str = "audit/";
/// Where `mtls destroy` keeps a database's records in a store, one value per destroyed
/// database (`secrets/archive/NAME/TIMESTAMP`): in the secrets range, since it holds the CA
/// key. Not state: the loaders, `state export` and `state import --force` leave it alone.
pub const ARCHIVE_PREFIX: &str = "secrets/archive/";

/// Whether a key relative to the state root is one the proxy must never need: the CA's
/// private key and the client keys.
pub fn is_secret(rel: &str) -> bool {
    let mut parts = rel.split('/');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(DATABASES_DIR), Some(_), Some(CA_KEY), None) => true,
        (Some(DATABASES_DIR), Some(_), Some(CERTIFICATES_DIR), Some(_)) => {
            parts.next() == Some(CLIENT_KEY) && parts.next().is_none()
        }
        _ => false,
    }
}

/// The store key of a file of the state directory (a path relative to its root).
pub fn to_store_key(rel: &str) -> String {
    if is_secret(rel) {
        format!("{SECRETS_PREFIX}{rel}")
    } else {
        rel.to_owned()
    }
}

/// The directory path of a store key; `None` for keys that are not files (audit lines).
pub fn from_store_key(key: &str) -> Option<String> {
    if let Some(rel) = key.strip_prefix(SECRETS_PREFIX) {
        // Only secrets may come from the secrets range; anything else there is not state.
        return is_secret(rel).then(|| rel.to_owned());
    }
    if key.starts_with(AUDIT_PREFIX) || is_secret(key) {
        return None;
    }
    Some(key.to_owned())
}

/// The store key of the audit log's line number `n` (from 1): fixed width, so the keys sort
/// in line order.
pub fn audit_line_key(n: usize) -> String {
    format!("{AUDIT_PREFIX}{n:010}")
}

/// Splits a listing (store keys) into each database's records, keyed relative to its folder.
/// Dot-names are skipped everywhere, as the directory loader skips them.
pub fn databases_of(records: &BTreeMap<String, Vec<u8>>) -> BTreeMap<String, DatabaseRecords> {
    let mut out: BTreeMap<String, DatabaseRecords> = BTreeMap::new();
    for (key, bytes) in records {
        let Some(rest) = key
            .strip_prefix(DATABASES_DIR)
            .and_then(|k| k.strip_prefix('/'))
        else {
            continue;
        };
        let Some((name, rel)) = rest.split_once('/') else {
            continue;
        };
        if name.starts_with('.') || rel.split('/').any(|c| c.starts_with('.')) {
            continue;
        }
        out.entry(name.to_owned())
            .or_default()
            .insert(rel.to_owned(), bytes.clone());
    }
    out
}

/// What the directory reader found for one database: the records it could read and the
/// errors for those it could not (so the parser does not report them twice as missing).
#[derive(Debug, Default)]
pub struct ReadRecords {
    pub records: DatabaseRecords,
    pub errors: ConfigErrors,
    /// Keys the reader already reported.
    pub failed: std::collections::BTreeSet<String>,
    /// The records came from a store, not a directory: every file the database names is a
    /// record (there is no disk to read it from later).
    pub from_store: bool,
}

/// Reads what the proxy needs of one database folder, with the checks that only make sense
/// on disk (a private key readable by others is refused), keeping today's messages.
pub fn read_database_dir(dir: &Path) -> ReadRecords {
    let mut out = ReadRecords::default();
    let take = |out: &mut ReadRecords, rel: String, read: Result<Vec<u8>, ConfigErrors>| match read
    {
        Ok(b) => {
            out.records.insert(rel, b);
        }
        Err(e) => {
            out.errors.extend(e);
            out.failed.insert(rel);
        }
    };
    for rel in [DATABASE_YAML, SERVER_CERT, CA_CERT] {
        take(&mut out, rel.to_owned(), read_bytes(&dir.join(rel)));
    }
    take(
        &mut out,
        SERVER_KEY.to_owned(),
        read_private_key(&dir.join(SERVER_KEY)),
    );
    for rel in [IP_RULES, TRUSTED_IPS, CRL] {
        // Missing is for the parser to judge (no rules admit nobody, no trusted ranges trust
        // nobody; no CRL is invalid).
        match std::fs::read(dir.join(rel)) {
            Ok(b) => {
                out.records.insert(rel.to_owned(), b);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => take(
                &mut out,
                rel.to_owned(),
                Err(ConfigErrors::one(
                    &dir.join(rel),
                    "",
                    None,
                    format!("cannot read: {e}"),
                )),
            ),
        }
    }
    let certs = dir.join(CERTIFICATES_DIR);
    match std::fs::read_dir(&certs) {
        Ok(entries) => {
            for entry in entries.flatten() {
                let id = entry.file_name().to_string_lossy().into_owned();
                if id.starts_with('.') {
                    continue;
                }
                let rel = format!("{CERTIFICATES_DIR}/{id}/{CERTIFICATE_YAML}");
                take(&mut out, rel.clone(), read_bytes(&dir.join(&rel)));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            out.errors.extend(ConfigErrors::one(
                &certs,
                "",
                None,
                format!("cannot list: {e}"),
            ));
            out.failed.insert(CERTIFICATES_DIR.to_owned());
        }
    }
    out
}

impl DatabaseState {
    /// Parses one database from its records. `origin` names the database folder in errors: a
    /// path for the directory, `etcd:PREFIX/databases/NAME` for etcd, so every error names
    /// the record (`origin/KEY`) and the field.
    pub fn from_records(
        name: &str,
        origin: &Path,
        read: ReadRecords,
    ) -> Result<DatabaseState, ConfigErrors> {
        let ReadRecords {
            records,
            mut errors,
            failed,
            from_store,
        } = read;
        let file = |rel: &str| origin.join(rel);
        let required = |rel: &str, errors: &mut ConfigErrors| -> Option<Vec<u8>> {
            match records.get(rel) {
                Some(b) => Some(b.clone()),
                None => {
                    if !failed.contains(rel) {
                        errors.extend(ConfigErrors::one(&file(rel), "", None, "missing"));
                    }
                    None
                }
            }
        };
        let settings = required(DATABASE_YAML, &mut errors)
            .and_then(|b| {
                text_of(&file(DATABASE_YAML), b)
                    .map_err(|e| errors.extend(e))
                    .ok()
            })
            .and_then(|t| {
                DatabaseSettings::parse(&file(DATABASE_YAML), &t)
                    .map_err(|e| errors.extend(e))
                    .ok()
            });
        let server_cert_pem = required(SERVER_CERT, &mut errors);
        let server_key_pem = required(SERVER_KEY, &mut errors);
        let ca_pem = required(CA_CERT, &mut errors);
        let rules = if failed.contains(IP_RULES) {
            None
        } else {
            match records.get(IP_RULES) {
                // No rules record yet: nobody is admitted, which is the safe reading.
                None => Some(Vec::new()),
                Some(b) => text_of(&file(IP_RULES), b.clone())
                    .and_then(|t| parse_ip_rules(&file(IP_RULES), &t))
                    .map_err(|e| errors.extend(e))
                    .ok(),
            }
        };
        let trusted_ips = if failed.contains(TRUSTED_IPS) {
            None
        } else {
            match records.get(TRUSTED_IPS) {
                // Databases made before trusted ranges existed have no such record.
                None => Some(Vec::new()),
                Some(b) => text_of(&file(TRUSTED_IPS), b.clone())
                    .and_then(|t| parse_trusted_ips(&file(TRUSTED_IPS), &t))
                    .map_err(|e| errors.extend(e))
                    .ok(),
            }
        };
        let crl_pem = records.get(CRL).cloned();
        let mut certificates = Vec::new();
        for (rel, bytes) in &records {
            let mut parts = rel.split('/');
            let is_record = parts.next() == Some(CERTIFICATES_DIR)
                && parts.next().is_some()
                && parts.next() == Some(CERTIFICATE_YAML)
                && parts.next().is_none();
            if !is_record {
                continue;
            }
            let path = file(rel);
            match text_of(&path, bytes.clone())
                .and_then(|t| parse_doc::<CertificateRecord>(&path, &t))
            {
                Ok(r) => certificates.push(r),
                Err(e) => errors.extend(e),
            }
        }
        certificates.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        // From a store, a relative `upstream_ca` is a record of the database like any other;
        // the directory keeps reading it (or an absolute path) from disk when it builds.
        let mut upstream_ca_pem = None;
        if from_store {
            if let Some(rel) = settings
                .as_ref()
                .and_then(|s| s.upstream_ca.as_ref())
                .filter(|p| p.is_relative())
            {
                let rel = rel.to_string_lossy().into_owned();
                match records.get(&rel) {
                    Some(b) => upstream_ca_pem = Some(b.clone()),
                    None => errors.extend(ConfigErrors::one(
                        &file(&rel),
                        "",
                        None,
                        "missing: database.yaml names it as upstream_ca",
                    )),
                }
            }
        }
        match (settings, rules, server_cert_pem, server_key_pem, ca_pem) {
            (Some(settings), Some(rules), Some(c), Some(k), Some(ca))
                if errors.is_empty() && trusted_ips.is_some() =>
            {
                Ok(DatabaseState {
                    name: name.to_owned(),
                    dir: origin.to_path_buf(),
                    paths: MaterialPaths::in_dir(origin),
                    settings,
                    rules,
                    trusted_ips: trusted_ips.unwrap_or_default(),
                    server_cert_pem: c,
                    server_key_pem: k,
                    ca_pem: ca,
                    crl_pem,
                    crl_required: true,
                    certificates,
                    upstream_ca_pem,
                })
            }
            _ => Err(errors),
        }
    }
}

/// How a store names a database folder in errors: `etcd:PREFIX/databases/NAME`.
pub fn etcd_origin(prefix: &str, name: &str) -> PathBuf {
    PathBuf::from(format!("etcd:{prefix}/{DATABASES_DIR}/{name}"))
}

/// Loads every database of a listing (store keys) on its own, as [`StateDir::load_each`]
/// does for a directory; errors name `etcd:PREFIX/KEY` and the field.
pub fn load_each_from_records(
    prefix: &str,
    records: &BTreeMap<String, Vec<u8>>,
) -> Vec<LoadedDatabase> {
    databases_of(records)
        .into_iter()
        .map(|(name, recs)| {
            let origin = etcd_origin(prefix, &name);
            let loaded = validate_database_name(&name)
                .map_err(|m| ConfigErrors::one(&origin, "", None, m))
                .and_then(|()| {
                    DatabaseState::from_records(
                        &name,
                        &origin,
                        ReadRecords {
                            records: recs,
                            from_store: true,
                            ..ReadRecords::default()
                        },
                    )
                });
            (name, loaded)
        })
        .collect()
}

fn text_of(path: &Path, bytes: Vec<u8>) -> Result<String, ConfigErrors> {
    String::from_utf8(bytes)
        .map_err(|e| ConfigErrors::one(path, "", None, format!("cannot read: not UTF-8: {e}")))
}

fn read_bytes(path: &Path) -> Result<Vec<u8>, ConfigErrors> {
    std::fs::read(path).map_err(|e| ConfigErrors::one(path, "", None, format!("cannot read: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_and_audit_lines_map_to_their_own_ranges() {
        for (rel, key) in [
            ("databases/app/ca.key", "secrets/databases/app/ca.key"),
            (
                "databases/app/certificates/X/client.key",
                "secrets/databases/app/certificates/X/client.key",
            ),
            ("databases/app/server.key", "databases/app/server.key"),
            ("databases/app/ip-rules.yaml", "databases/app/ip-rules.yaml"),
            (
                "databases/app/certificates/X/client.crt",
                "databases/app/certificates/X/client.crt",
            ),
        ] {
            assert_eq!(to_store_key(rel), key);
            assert_eq!(from_store_key(key).as_deref(), Some(rel));
        }
        // A secret outside the secrets range, or a non-secret inside it, is not state.
        assert_eq!(from_store_key("databases/app/ca.key"), None);
        assert_eq!(from_store_key("secrets/databases/app/server.key"), None);
        assert_eq!(from_store_key(&audit_line_key(7)), None);
        assert!(audit_line_key(9) < audit_line_key(10));
    }

    #[test]
    fn a_relative_upstream_ca_is_a_record_in_a_store() {
        let settings = b"listen: 127.0.0.1:6432\nupstream: db.internal:5432\nupstream_tls: verify-full\nupstream_ca: upstream-ca.crt\n";
        let mut records = BTreeMap::new();
        records.insert("databases/app/database.yaml".to_string(), settings.to_vec());
        let e = load_each_from_records("/p", &records)[0]
            .1
            .as_ref()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("etcd:/p/databases/app/upstream-ca.crt: missing: database.yaml names it"),
            "{e}"
        );
        records.insert("databases/app/upstream-ca.crt".to_string(), b"PEM".to_vec());
        let e = load_each_from_records("/p", &records)[0]
            .1
            .as_ref()
            .unwrap_err()
            .to_string();
        assert!(!e.contains("upstream-ca.crt"), "{e}");
    }

    #[test]
    fn a_listing_loads_with_errors_naming_the_etcd_key_and_field() {
        let mut records = BTreeMap::new();
        records.insert(
            "databases/app/database.yaml".to_string(),
            b"listen: 127.0.0.1:6432\nupstream: 127.0.0.1:5432\n".to_vec(),
        );
        records.insert(
            "databases/app/ip-rules.yaml".to_string(),
            b"rules:\n- id: a\n  cidr: 10.0.0.1/8\n  created_at: 2026-01-01T00:00:00Z\n  updated_at: 2026-01-01T00:00:00Z\n"
                .to_vec(),
        );
        records.insert(
            "databases/.staging/database.yaml".to_string(),
            b"x".to_vec(),
        );
        let loaded = load_each_from_records("/pgmtls", &records);
        assert_eq!(loaded.len(), 1, "dot-names are skipped");
        let e = loaded[0].1.as_ref().unwrap_err().to_string();
        assert!(
            e.contains("etcd:/pgmtls/databases/app/ip-rules.yaml:2: rules[0].cidr: 10.0.0.1/8 has host bits set"),
            "{e}"
        );
        assert!(
            e.contains("etcd:/pgmtls/databases/app/server.key: missing"),
            "{e}"
        );
    }
}
