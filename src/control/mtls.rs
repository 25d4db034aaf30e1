//! Enabling and disabling mutual TLS for a database: a database folder with its CA, server
//! certificate, first client certificate, empty CRL and empty allowlist in; an archived
//! database out.

use std::path::PathBuf;

use serde_json::json;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use super::{certificates, now, Control, ControlError, Result};
use crate::pki::{self, CaSigner, KeyType};
use crate::state::{
    self, ip_rules_to_yaml, AuditEntry, CertificateRecord, DatabaseSettings, Listen, UpstreamAddr,
    UpstreamTls, PRIVATE_MODE, PUBLIC_MODE,
};

/// Name of the copied upstream CA file inside the database folder.
pub const UPSTREAM_CA_FILE: &str = "upstream-ca.crt";

/// Longest CN a certificate may carry (X.520 ub-common-name).
const MAX_CN: usize = 64;

/// What enabling mTLS for a database asks for.
#[derive(Debug, Clone)]
pub struct EnableRequest {
    pub name: String,
    /// Its own address, or `shared`: the shared listener, where its server names pick it.
    pub listen: Listen,
    pub upstream: UpstreamAddr,
    pub upstream_tls: UpstreamTls,
    /// The CA (PEM) for `verify-full`, copied into the database folder.
    pub upstream_ca_pem: Option<Vec<u8>>,
    pub upstream_server_name: Option<String>,
    pub allow_plaintext_remote_upstream: bool,
    pub user_must_match_cn: bool,
    pub server_names: Vec<String>,
    pub key_type: KeyType,
    /// CN of the first client certificate [default: its id].
    pub common_name: Option<String>,
}

/// A database whose mTLS was enabled.
#[derive(Debug, Clone)]
pub struct Enabled {
    pub settings: DatabaseSettings,
    /// Names in the server certificate.
    pub server_names: Vec<String>,
    /// The first client certificate.
    pub certificate: CertificateRecord,
    pub audit: AuditEntry,
}

/// The CA's common name. Verifiers find a CA by its name, so it names the database; names
/// too long for a CN keep a prefix plus a digest of the whole name.
pub fn ca_common_name(database: &str) -> String {
    let full = format!("pgmtls CA {database}");
    if full.chars().count() <= MAX_CN {
        return full;
    }
    let digest = hex::encode(Sha256::digest(database.as_bytes()));
    let keep: String = database.chars().take(MAX_CN - 10 - 9).collect();
    format!("pgmtls CA {keep}~{}", &digest[..8])
}

/// Names in the server certificate: the given ones plus the listen IP when it is specific.
pub fn server_names(given: &[String], listen: Listen) -> Vec<String> {
    let mut names: Vec<String> = given.to_vec();
    let Listen::Addr(listen) = listen else {
        return names;
    };
    if !listen.ip().is_unspecified() {
        let ip = listen.ip().to_string();
        if !names.contains(&ip) {
            names.push(ip);
        }
    }
    names
}

/// Everything about `request` that can be checked without generating keys: a front end calls
/// this before asking for confirmation, and [`enable`] again against the state it commits to.
pub fn check(control: &Control, request: &EnableRequest) -> Result<()> {
    check_request(request)?;
    check_free(
        request,
        control.has_database(&request.name)?,
        control.listen_addresses()?,
    )
}

fn check_request(request: &EnableRequest) -> Result<()> {
    let name = request.name.as_str();
    state::validate_database_name(name).map_err(ControlError::Invalid)?;
    if request.listen.is_shared() && request.server_names.is_empty() {
        return Err(ControlError::Invalid(
            "--listen shared needs --server-name NAME: on the shared listener the name a \
             client sends (SNI) picks the database"
                .into(),
        ));
    }
    if request.upstream_tls == UpstreamTls::VerifyFull && request.upstream_ca_pem.is_none() {
        return Err(ControlError::Invalid(
            "--upstream-tls verify-full needs --upstream-ca FILE".into(),
        ));
    }
    // A CA that does not parse would be copied into the state and refused by the proxy at
    // its next reload: refuse it here, before anything is written.
    if let Some(pem) = &request.upstream_ca_pem {
        let path = std::path::Path::new(UPSTREAM_CA_FILE);
        crate::tls_store::certs(path, pem).map_err(|e| {
            let detail = e.0.first().map(|e| e.message.clone()).unwrap_or_default();
            ControlError::Invalid(format!("--upstream-ca: {detail}"))
        })?;
    }
    if let Some(n) = &request.upstream_server_name {
        if rustls_pki_types::ServerName::try_from(n.as_str()).is_err() {
            return Err(ControlError::Invalid(format!(
                "--upstream-server-name: {n:?} is not a valid DNS name or IP address"
            )));
        }
    }
    if request.upstream_tls == UpstreamTls::Disable
        && !request.upstream.is_loopback()
        && !request.allow_plaintext_remote_upstream
    {
        return Err(ControlError::Invalid(format!(
            "--upstream {} is not loopback: use --upstream-tls verify-full --upstream-ca FILE, \
             or accept plaintext with --allow-plaintext-remote-upstream",
            request.upstream
        )));
    }
    Ok(())
}

/// The name must be new, and two databases on one listen address (or with one server name on
/// the shared listener, where it would not pick one database) would make the proxy refuse
/// the second. Any number of databases share `--listen shared`.
fn check_free(
    request: &EnableRequest,
    exists: bool,
    listens: Vec<(String, super::Listening)>,
) -> Result<()> {
    let name = request.name.as_str();
    if exists {
        return Err(ControlError::Conflict(format!(
            "mTLS is already enabled for database {name:?}"
        )));
    }
    for (other, l) in listens {
        if other == name {
            continue;
        }
        match (request.listen, l.listen) {
            (Listen::Addr(a), Listen::Addr(b)) if a == b => {
                return Err(ControlError::Conflict(format!(
                    "--listen {a} is already the listen address of database {other:?}"
                )));
            }
            (Listen::Shared, Listen::Shared) => {
                let taken = request
                    .server_names
                    .iter()
                    .find(|n| l.server_names.iter().any(|o| o.eq_ignore_ascii_case(n)));
                if let Some(n) = taken {
                    return Err(ControlError::Conflict(format!(
                        "--server-name {n} is already a server name of database {other:?} on \
                         the shared listener; SNI must pick one database"
                    )));
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// The keys and certificates of a new database, made once: a commit that lost a race in etcd
/// is recomputed with the same material.
struct Material {
    at: OffsetDateTime,
    ca: pki::Issued,
    server: pki::Issued,
    names: Vec<String>,
    first: (CertificateRecord, pki::Issued),
    crl: String,
}

/// Enables mTLS for a new database: CA, server certificate, a first client certificate, an
/// empty CRL and an empty allowlist, written as one folder (or one etcd transaction) that
/// appears whole or not at all.
pub fn enable(control: &Control, request: &EnableRequest, actor: &str) -> Result<Enabled> {
    check(control, request)?;
    let name = request.name.as_str();
    // Keys are generated before the lock is taken: RSA 4096 takes a while, and nothing here
    // depends on the state.
    let at = now();
    let key_type = request.key_type;
    let ca = pki::create_ca(&ca_common_name(name), key_type, pki::DEFAULT_CA_VALIDITY)?;
    let signer = CaSigner::from_issued(&ca)?;
    let names = server_names(&request.server_names, request.listen);
    let server = pki::issue_server(&signer, &names, key_type, pki::DEFAULT_SERVER_VALIDITY)?;
    let first = certificates::issue(
        &signer,
        request.common_name.as_deref(),
        key_type,
        at,
        None,
        None,
    )?;
    let crl = pki::build_crl::<&str>(&signer, &[], 1, at, at + certificates::CRL_VALIDITY)?;
    let material = Material {
        at,
        ca,
        server,
        names,
        first,
        crl,
    };
    control.retrying(|| enable_once(control, request, &material, actor))
}

fn enable_once(
    control: &Control,
    request: &EnableRequest,
    m: &Material,
    actor: &str,
) -> Result<Enabled> {
    let name = request.name.as_str();
    let mut txn = control.begin(None, actor)?;
    // Again against the state this change commits to: another `mtls create` may have taken
    // the name or the address meanwhile.
    check_free(request, txn.has_database(name)?, txn.listen_addresses()?)?;
    let settings = DatabaseSettings {
        listen: request.listen,
        upstream: request.upstream.clone(),
        upstream_tls: request.upstream_tls,
        upstream_ca: request
            .upstream_ca_pem
            .as_ref()
            .map(|_| PathBuf::from(UPSTREAM_CA_FILE)),
        upstream_server_name: request.upstream_server_name.clone(),
        allow_plaintext_remote_upstream: request.allow_plaintext_remote_upstream,
        server_names: request.server_names.clone(),
        user_must_match_cn: request.user_must_match_cn,
        max_connections: None,
        max_connections_per_ip: None,
        enabled_by: Some(txn.actor().to_owned()),
        created_at: Some(m.at),
    };
    let (record, issued) = &m.first;
    // The proxy presents the leaf and its CA, so clients holding only root.crt can verify.
    let chain = format!("{}{}", m.server.cert_pem, m.ca.cert_pem);
    let cert_dir = format!("{}/{}", state::CERTIFICATES_DIR, record.id);
    let mut files: Vec<(String, Vec<u8>, u32)> = vec![
        (
            state::DATABASE_YAML.into(),
            settings.to_yaml().into_bytes(),
            PUBLIC_MODE,
        ),
        (
            state::CA_CERT.into(),
            m.ca.cert_pem.clone().into_bytes(),
            PUBLIC_MODE,
        ),
        (
            state::CA_KEY.into(),
            m.ca.key_pem.clone().into_bytes(),
            PRIVATE_MODE,
        ),
        (state::SERVER_CERT.into(), chain.into_bytes(), PUBLIC_MODE),
        (
            state::SERVER_KEY.into(),
            m.server.key_pem.clone().into_bytes(),
            PRIVATE_MODE,
        ),
        (state::CRL.into(), m.crl.clone().into_bytes(), PUBLIC_MODE),
        (
            state::IP_RULES.into(),
            ip_rules_to_yaml(&[]).into_bytes(),
            PUBLIC_MODE,
        ),
    ];
    if let Some(pem) = &request.upstream_ca_pem {
        files.push((UPSTREAM_CA_FILE.into(), pem.clone(), PUBLIC_MODE));
    }
    files.extend([
        (
            format!("{cert_dir}/{}", state::CLIENT_CERT),
            issued.cert_pem.clone().into_bytes(),
            PUBLIC_MODE,
        ),
        (
            format!("{cert_dir}/{}", state::CLIENT_KEY),
            issued.key_pem.clone().into_bytes(),
            PRIVATE_MODE,
        ),
        (
            format!("{cert_dir}/{}", state::CERTIFICATE_YAML),
            record.to_yaml().into_bytes(),
            PUBLIC_MODE,
        ),
    ]);
    // Loaded exactly as the proxy (or a replica) will load it, and built, before it lands.
    txn.add_database(name, &files)?;
    let audit = txn.record(
        "mtls.create",
        Some(name),
        json!({
            "listen": request.listen.to_string(),
            "upstream": settings.upstream.to_string(),
            "upstream_tls": settings.upstream_tls.to_string(),
            "server_names": m.names,
            "user_must_match_cn": settings.user_must_match_cn,
            "key_type": request.key_type.as_str(),
            "ca_serial": m.ca.serial,
            "server_serial": m.server.serial,
            "certificate_id": record.id,
            "certificate_serial": record.serial,
        }),
    )?;
    Ok(Enabled {
        settings,
        server_names: m.names.clone(),
        certificate: record.clone(),
        audit,
    })
}

/// A database whose mTLS was disabled, and where its records went.
#[derive(Debug, Clone)]
pub struct Disabled {
    pub archived_to: PathBuf,
    pub audit: AuditEntry,
}

/// Disables mTLS for `name`: the proxy (every replica, in etcd) stops serving it and closes
/// its sessions on its next reload; the CA, keys and records are archived, not deleted.
pub fn disable(control: &Control, name: &str, actor: &str) -> Result<Disabled> {
    control.retrying(|| {
        let mut txn = control.begin(Some(name), actor)?;
        let archived_to = txn.archive_database(name, now())?;
        let audit = txn.record(
            "mtls.destroy",
            Some(name),
            json!({ "archived_to": archived_to.display().to_string() }),
        )?;
        Ok(Disabled { archived_to, audit })
    })
}

/// A change to a database's session limits: `None` leaves a limit as it is,
/// `Some(None)` removes it, `Some(Some(n))` sets it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LimitsChange {
    pub max_connections: Option<Option<u32>>,
    pub max_connections_per_ip: Option<Option<u32>>,
}

/// A database whose settings were changed: the settings now written, and the audit record.
#[derive(Debug, Clone)]
pub struct Updated {
    pub settings: DatabaseSettings,
    pub audit: AuditEntry,
}

/// Sets or removes `name`'s `max_connections` and `max_connections_per_ip` in its
/// `database.yaml`. A running proxy (every replica, in etcd) applies them on its next reload
/// to new sessions; sessions already open are not cut.
pub fn update_limits(
    control: &Control,
    name: &str,
    change: LimitsChange,
    actor: &str,
) -> Result<Updated> {
    if change == LimitsChange::default() {
        return Err(ControlError::Invalid(
            "nothing to change: give --max-connections or --max-connections-per-ip".into(),
        ));
    }
    if [change.max_connections, change.max_connections_per_ip].contains(&Some(Some(0))) {
        return Err(ControlError::Invalid(
            "a session limit must be a positive integer, or `none` to remove it".into(),
        ));
    }
    control.retrying(|| {
        let mut txn = control.begin(Some(name), actor)?;
        let db = txn.load(name)?;
        let mut settings = db.settings.clone();
        if let Some(v) = change.max_connections {
            settings.max_connections = v;
        }
        if let Some(v) = change.max_connections_per_ip {
            settings.max_connections_per_ip = v;
        }
        let yaml = settings.to_yaml();
        // Re-read with the proxy's parser and built, as the proxy will, before it lands.
        let file = db.dir.join(state::DATABASE_YAML);
        let parsed = DatabaseSettings::parse(&file, &yaml)
            .map_err(|e| ControlError::Invalid(state::one_line(&e)))?;
        let mut candidate = db.clone();
        candidate.settings = parsed;
        super::validate(&candidate)?;
        txn.write_database_file(name, state::DATABASE_YAML, yaml.as_bytes(), PUBLIC_MODE)?;
        let audit = txn.record(
            "mtls.update",
            Some(name),
            json!({
                "max_connections": settings.max_connections,
                "max_connections_per_ip": settings.max_connections_per_ip,
                "previous_max_connections": db.settings.max_connections,
                "previous_max_connections_per_ip": db.settings.max_connections_per_ip,
            }),
        )?;
        Ok(Updated { settings, audit })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_names_name_the_database_and_fit_a_cn() {
        assert_eq!(ca_common_name("app"), "pgmtls CA app");
        let long = "a".repeat(63);
        let cn = ca_common_name(&long);
        assert!(cn.chars().count() <= MAX_CN, "{cn}");
        assert_ne!(cn, ca_common_name(&format!("{}b", "a".repeat(62))));
    }

    #[test]
    fn server_names_add_a_specific_listen_ip_once() {
        let l: Listen = "10.0.0.5:6432".parse().unwrap();
        assert_eq!(server_names(&[], l), vec!["10.0.0.5"]);
        assert_eq!(
            server_names(&["db.example".into(), "10.0.0.5".into()], l),
            vec!["db.example", "10.0.0.5"]
        );
        let any: Listen = "0.0.0.0:6432".parse().unwrap();
        assert!(server_names(&[], any).is_empty());
        let any6: Listen = "[::]:6432".parse().unwrap();
        assert_eq!(server_names(&["x".into()], any6), vec!["x"]);
        assert_eq!(server_names(&["x".into()], Listen::Shared), vec!["x"]);
    }
}
