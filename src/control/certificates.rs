//! Client certificates of one database's CA: issue, revoke, and the 75-day renewal of
//! client certificates, the server certificate and the CRL. Every record is re-read with the
//! proxy's parser and the whole database rebuilt before anything is written.

use serde::Serialize;
use serde_json::json;
use time::{Duration, OffsetDateTime};
use uuid::Uuid;

use super::{now, validate, Control, ControlError, Result, Txn};
use crate::config::yaml::parse_doc;
use crate::pki::{self, CaSigner, Issued, KeyType};
use crate::state::{
    self, certificate_dir, one_line, AuditEntry, CertificateRecord, DatabaseState, PRIVATE_MODE,
    PUBLIC_MODE,
};

/// A certificate this close to its expiry is `expiring` and gets a successor from `renew`.
pub const RENEW_WINDOW: Duration = Duration::days(75);

/// How far ahead a new CRL's nextUpdate is set.
pub const CRL_VALIDITY: Duration = Duration::days(365);

/// `renew` re-signs the CRL when its nextUpdate is this close.
pub const CRL_REFRESH_WINDOW: Duration = Duration::days(90);

/// Issues a client certificate and its record. The CN defaults to the new id; the lifetime
/// to 13 calendar months. `not_before` is backdated a little for clients with slow clocks.
pub(crate) fn issue(
    signer: &CaSigner,
    common_name: Option<&str>,
    key_type: KeyType,
    at: OffsetDateTime,
    valid_for: Option<Duration>,
    successor_of: Option<String>,
) -> Result<(CertificateRecord, Issued)> {
    let id = Uuid::new_v4().to_string();
    let cn = common_name.map(str::to_owned).unwrap_or_else(|| id.clone());
    let not_after = match valid_for {
        Some(d) => at + d,
        None => pki::client_validity(at).1,
    };
    let issued = pki::issue_client(signer, &cn, key_type, at - pki::BACKDATE, not_after)?;
    let record = CertificateRecord {
        id,
        common_name: cn,
        serial: issued.serial.clone(),
        key_type: key_type.as_str().to_owned(),
        created_at: at,
        not_before: issued.not_before,
        expires_at: issued.not_after,
        revoked_at: None,
        successor_of,
        successor: None,
    };
    Ok((record, issued))
}

/// What `create` asks for.
#[derive(Debug, Clone, Default)]
pub struct NewCertificate<'a> {
    /// Subject CN [default: the certificate id].
    pub common_name: Option<&'a str>,
    pub key_type: KeyType,
    /// Lifetime from now [default and maximum: 13 calendar months].
    pub valid_for: Option<Duration>,
}

/// A certificate that was issued or revoked, with its audit record.
#[derive(Debug, Clone)]
pub struct CertificateChange {
    pub record: CertificateRecord,
    pub audit: AuditEntry,
}

/// Issues another client certificate of `database`'s CA.
pub fn create(
    control: &Control,
    database: &str,
    request: &NewCertificate<'_>,
    actor: &str,
) -> Result<CertificateChange> {
    let at = now();
    if let Some(d) = request.valid_for {
        if d <= Duration::ZERO {
            return Err(ControlError::Invalid(
                "--valid-for must be longer than zero".into(),
            ));
        }
        if at + d > pki::client_validity(at).1 {
            return Err(ControlError::Invalid(
                "--valid-for may be at most 13 months".into(),
            ));
        }
    }
    // Sign before taking the lock: an RSA 4096 key takes seconds, and the proxy's reload
    // waits for the lock. Only the CA matters here, and it is checked again under the lock
    // (and on every retry of an etcd commit, which keeps the certificate already issued).
    let signed_with = control.load(database)?;
    let (record, issued) = issue(
        &signer(&signed_with, &control.ca_key(&signed_with)?)?,
        request.common_name,
        request.key_type,
        at,
        request.valid_for,
        None,
    )?;
    control.retrying(|| {
        create_once(
            control,
            database,
            actor,
            &signed_with,
            record.clone(),
            &issued,
        )
    })
}

fn create_once(
    control: &Control,
    database: &str,
    actor: &str,
    signed_with: &DatabaseState,
    record: CertificateRecord,
    issued: &Issued,
) -> Result<CertificateChange> {
    let mut txn = control.begin(Some(database), actor)?;
    let db = txn.load(database)?;
    if db.ca_pem != signed_with.ca_pem {
        return Err(ControlError::Conflict(format!(
            "the CA of database {database} changed while the certificate was issued; run again"
        )));
    }
    let mut candidate = db.clone();
    candidate.certificates.push(reparse(&db, &record)?);
    validate(&candidate)?;
    txn.add_certificate(
        database,
        &record,
        issued.cert_pem.as_bytes(),
        issued.key_pem.as_bytes(),
    )?;
    let audit = txn.record(
        "certificate.create",
        Some(database),
        json!({
            "id": record.id,
            "serial": record.serial,
            "common_name": record.common_name,
            "key_type": record.key_type,
            "expires_at": state::rfc3339(record.expires_at),
        }),
    )?;
    Ok(CertificateChange { record, audit })
}

/// A revocation: the record as now marked and the number of the CRL that lists it.
#[derive(Debug, Clone)]
pub struct Revocation {
    pub record: CertificateRecord,
    pub crl_number: u64,
    pub audit: AuditEntry,
}

/// Revokes certificate `id` of `database`: a new CRL that lists it, then its record marked.
pub fn revoke(control: &Control, database: &str, id: &str, actor: &str) -> Result<Revocation> {
    control.retrying(|| revoke_once(control, database, id, actor))
}

fn revoke_once(control: &Control, database: &str, id: &str, actor: &str) -> Result<Revocation> {
    let mut txn = control.begin(Some(database), actor)?;
    let db = txn.load(database)?;
    let mut record = find(&db, id)?.clone();
    if let Some(t) = record.revoked_at {
        return Err(ControlError::Conflict(format!(
            "certificate {} was already revoked at {}",
            record.id,
            state::rfc3339(t)
        )));
    }
    let at = now();
    record.revoked_at = Some(at);
    let signer = signer(&db, &txn.ca_key(&db)?)?;
    let mut records = db.certificates.clone();
    for r in records.iter_mut().filter(|r| r.id == record.id) {
        *r = reparse(&db, &record)?;
    }
    let (crl, number) = next_crl(&db, &signer, &records, at)?;
    let mut candidate = db.clone();
    candidate.certificates = records;
    candidate.crl_pem = Some(crl.clone().into_bytes());
    validate(&candidate)?;
    // The CRL is what the proxy enforces: write it first, so a crash in between leaves the
    // certificate refused rather than merely marked.
    txn.write_database_file(database, state::CRL, crl.as_bytes(), PUBLIC_MODE)?;
    txn.save_certificate_record(database, &record)?;
    let audit = txn.record(
        "certificate.revoke",
        Some(database),
        json!({"id": record.id, "serial": record.serial, "crl_number": number}),
    )?;
    Ok(Revocation {
        record,
        crl_number: number,
        audit,
    })
}

/// A successor issued by `renew`.
#[derive(Debug, Serialize)]
pub struct Renewal {
    pub database: String,
    pub previous_id: String,
    #[serde(with = "time::serde::rfc3339")]
    pub previous_expires_at: OffsetDateTime,
    pub id: String,
    pub serial: String,
    pub common_name: String,
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
}

/// A server certificate re-issued by `renew`.
#[derive(Debug, Serialize)]
pub struct ServerRenewal {
    pub database: String,
    pub serial: String,
    #[serde(with = "time::serde::rfc3339")]
    pub previous_expires_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
}

/// A CRL re-signed by `renew` because its nextUpdate was near.
#[derive(Debug, Serialize)]
pub struct CrlRefresh {
    pub database: String,
    pub crl_number: u64,
    #[serde(with = "time::serde::rfc3339")]
    pub next_update: OffsetDateTime,
}

#[derive(Debug, Default, Serialize)]
pub struct RenewReport {
    pub renewed: Vec<Renewal>,
    pub server_certificates: Vec<ServerRenewal>,
    pub crls_refreshed: Vec<CrlRefresh>,
    pub errors: Vec<String>,
}

/// How many client certificates one etcd transaction renews. Each renewal is five operations
/// (certificate, key, record, the predecessor's record, its audit key) and etcd refuses a
/// transaction of more than 128 (`--max-txn-ops`); this leaves room for the server
/// certificate, the CRL, their audit keys and the guard.
const RENEWALS_PER_COMMIT: usize = 20;

/// Renews what is due in `databases` (every database when `None`). A database that fails is
/// reported in `errors` and does not stop the others. In a directory each database's renewal
/// is one change under the lock; in etcd it is one guarded transaction per
/// [`RENEWALS_PER_COMMIT`] certificates, each computed and validated from the state the
/// previous one left (renewed certificates then have successors and are not due again).
pub fn renew(control: &Control, databases: Option<&str>, actor: &str) -> Result<RenewReport> {
    let names = match databases {
        Some(db) => {
            control.require(db)?;
            vec![db.to_owned()]
        }
        None => control.database_names()?,
    };
    let mut report = RenewReport::default();
    let at = now();
    for name in &names {
        if let Err(e) = renew_database(control, name, at, actor, &mut report) {
            report.errors.push(format!("database {name}: {e}"));
        }
    }
    Ok(report)
}

/// Renews what is due in one database, in as many changes as it takes.
fn renew_database(
    control: &Control,
    name: &str,
    at: OffsetDateTime,
    actor: &str,
    report: &mut RenewReport,
) -> Result<()> {
    loop {
        let mut part = RenewReport::default();
        let outcome = control.retrying(|| {
            part = RenewReport::default();
            let mut txn = control.begin(Some(name), actor)?;
            let limit = if txn.is_etcd() {
                RENEWALS_PER_COMMIT
            } else {
                usize::MAX
            };
            let more = renew_some(&mut txn, name, at, limit, &mut part)?;
            txn.commit()?;
            Ok(more)
        });
        // A failed pass wrote nothing, in either store: its writes land at the commit.
        let more = outcome?;
        let none = part.renewed.is_empty();
        merge(report, part);
        // Every pass that leaves more to do renewed some (they now have successors), so
        // this ends; `none` only guards against a state that would not move.
        if !more || none {
            return Ok(());
        }
    }
}

fn merge(report: &mut RenewReport, part: RenewReport) {
    report.renewed.extend(part.renewed);
    report.server_certificates.extend(part.server_certificates);
    report.crls_refreshed.extend(part.crls_refreshed);
    report.errors.extend(part.errors);
}

/// Renews what is due in one database as of `txn`, at most `limit` client certificates:
/// client certificates without a successor, the server certificate, and the CRL's
/// nextUpdate. Everything is validated together before any write; each renewal's audit
/// record goes with it. Returns whether client certificates are left for another pass.
fn renew_some(
    txn: &mut Txn<'_>,
    name: &str,
    at: OffsetDateTime,
    limit: usize,
    report: &mut RenewReport,
) -> Result<bool> {
    let db = txn.load(name)?;
    let signer = signer(&db, &txn.ca_key(&db)?)?;
    let on_crl = crl_serials(&db);
    let mut records = db.certificates.clone();
    let mut new: Vec<(CertificateRecord, Issued)> = Vec::new();
    let mut more = false;
    for i in 0..records.len() {
        let old = &records[i];
        // A successor that points back counts even if this record lost its link (a crash
        // between the two writes), so a rerun never issues a second one.
        let has_successor = old.successor.is_some()
            || records
                .iter()
                .any(|r| r.successor_of.as_deref() == Some(old.id.as_str()));
        let due = old.revoked_at.is_none()
            && !on_crl.contains(&old.serial)
            && !has_successor
            && old.expires_at - at <= RENEW_WINDOW;
        if !due {
            continue;
        }
        if new.len() >= limit {
            more = true;
            break;
        }
        let key_type: KeyType = old.key_type.parse().unwrap_or_default();
        let (rec, issued) = issue(
            &signer,
            Some(&old.common_name),
            key_type,
            at,
            None,
            Some(old.id.clone()),
        )?;
        records[i].successor = Some(rec.id.clone());
        new.push((rec, issued));
    }
    let mut candidate = db.clone();
    candidate.certificates = records
        .iter()
        .chain(new.iter().map(|(r, _)| r))
        .map(|r| reparse(&db, r))
        .collect::<Result<_>>()?;

    let server_due = std::str::from_utf8(&db.server_cert_pem)
        .ok()
        .and_then(|p| pki::inspect_cert_pem(p).ok())
        .filter(|i| i.not_after - at <= RENEW_WINDOW);
    let server = match &server_due {
        Some(info) => {
            let key_type: KeyType = info.key_algorithm.parse().unwrap_or_default();
            let names = super::mtls::server_names(&db.settings.server_names, db.settings.listen);
            let issued =
                pki::issue_server(&signer, &names, key_type, pki::DEFAULT_SERVER_VALIDITY)?;
            let chain = format!("{}{}", issued.cert_pem, String::from_utf8_lossy(&db.ca_pem));
            candidate.server_cert_pem = chain.clone().into_bytes();
            candidate.server_key_pem = issued.key_pem.clone().into_bytes();
            Some((issued, chain, info.not_after))
        }
        None => None,
    };

    let crl_due = db
        .crl_pem
        .as_deref()
        .and_then(|p| std::str::from_utf8(p).ok())
        .and_then(|p| pki::parse_crl_pem(p).ok())
        .and_then(|c| c.next_update)
        .is_none_or(|next| next - at <= CRL_REFRESH_WINDOW);
    let crl = if crl_due {
        let (pem, number) = next_crl(&db, &signer, &records, at)?;
        candidate.crl_pem = Some(pem.clone().into_bytes());
        Some((pem, number))
    } else {
        None
    };
    if new.is_empty() && server.is_none() && crl.is_none() {
        return Ok(false);
    }
    validate(&candidate)?;

    for (rec, issued) in &new {
        txn.add_certificate(
            name,
            rec,
            issued.cert_pem.as_bytes(),
            issued.key_pem.as_bytes(),
        )?;
        // Only now link the predecessor: its `successor` must never name a missing folder.
        if let Some(old) = records
            .iter()
            .find(|r| Some(r.id.as_str()) == rec.successor_of.as_deref())
        {
            txn.save_certificate_record(name, old)?;
            txn.queue_record(
                "certificate.renew",
                Some(name),
                json!({
                    "id": rec.id,
                    "serial": rec.serial,
                    "previous_id": old.id,
                    "expires_at": state::rfc3339(rec.expires_at),
                }),
            )?;
            report.renewed.push(Renewal {
                database: name.to_owned(),
                previous_id: old.id.clone(),
                previous_expires_at: old.expires_at,
                id: rec.id.clone(),
                serial: rec.serial.clone(),
                common_name: rec.common_name.clone(),
                expires_at: rec.expires_at,
            });
        }
    }
    if let Some((issued, chain, previous)) = server {
        // Key first, then certificate: a reload in between fails as a mismatch and keeps the
        // previous snapshot; the certificate write triggers the next, good, reload. (In etcd
        // both land in one revision.)
        txn.write_database_file(
            name,
            state::SERVER_KEY,
            issued.key_pem.as_bytes(),
            PRIVATE_MODE,
        )?;
        txn.write_database_file(name, state::SERVER_CERT, chain.as_bytes(), PUBLIC_MODE)?;
        txn.queue_record(
            "server_certificate.renew",
            Some(name),
            json!({"serial": issued.serial, "expires_at": state::rfc3339(issued.not_after)}),
        )?;
        report.server_certificates.push(ServerRenewal {
            database: name.to_owned(),
            serial: issued.serial,
            previous_expires_at: previous,
            expires_at: issued.not_after,
        });
    }
    if let Some((pem, number)) = crl {
        txn.write_database_file(name, state::CRL, pem.as_bytes(), PUBLIC_MODE)?;
        txn.queue_record(
            "crl.refresh",
            Some(name),
            json!({"crl_number": number, "next_update": state::rfc3339(at + CRL_VALIDITY)}),
        )?;
        report.crls_refreshed.push(CrlRefresh {
            database: name.to_owned(),
            crl_number: number,
            next_update: at + CRL_VALIDITY,
        });
    }
    Ok(more)
}

/// The certificate record `id` of `db`.
pub fn find<'a>(db: &'a DatabaseState, id: &str) -> Result<&'a CertificateRecord> {
    db.certificates.iter().find(|r| r.id == id).ok_or_else(|| {
        ControlError::NotFound(format!(
            "no certificate with id {id:?} for database {}",
            db.name
        ))
    })
}

/// Serials on the database's CRL as it is on disk.
pub fn crl_serials(db: &DatabaseState) -> Vec<String> {
    db.crl_pem
        .as_deref()
        .and_then(|p| std::str::from_utf8(p).ok())
        .and_then(|p| pki::parse_crl_pem(p).ok())
        .map(|i| i.revoked_serials)
        .unwrap_or_default()
}

/// Loads the database's CA for signing; its key is read with the same permission check the
/// proxy applies to server keys.
fn signer(db: &DatabaseState, key: &[u8]) -> Result<CaSigner> {
    let not_text =
        |file: &str| ControlError::Invalid(format!("{}: {file} is not text", db.dir.display()));
    let cert = std::str::from_utf8(&db.ca_pem).map_err(|_| not_text(state::CA_CERT))?;
    let key = std::str::from_utf8(key).map_err(|_| not_text(state::CA_KEY))?;
    Ok(CaSigner::from_pem(cert, key)?)
}

/// Re-reads a record through the proxy's parser, so what is written is what loads.
fn reparse(db: &DatabaseState, r: &CertificateRecord) -> Result<CertificateRecord> {
    let file = certificate_dir(&db.dir, &r.id).join(state::CERTIFICATE_YAML);
    parse_doc::<CertificateRecord>(&file, &r.to_yaml())
        .map_err(|e| ControlError::Invalid(one_line(&e)))
}

/// A new CRL listing everything already on the current one plus every revoked record, so an
/// entry can never drop off (even if a crash once left a record and the CRL out of step).
/// Its number is one more than the current CRL's.
fn next_crl(
    db: &DatabaseState,
    signer: &CaSigner,
    records: &[CertificateRecord],
    at: OffsetDateTime,
) -> Result<(String, u64)> {
    let current = match db.crl_pem.as_deref() {
        Some(pem) => {
            let file = db.dir.join(state::CRL);
            let text = std::str::from_utf8(pem)
                .map_err(|_| ControlError::Invalid(format!("{}: is not text", file.display())))?;
            Some(pki::parse_crl_pem(text).map_err(|e| {
                ControlError::Invalid(format!("{}: does not parse: {e}", file.display()))
            })?)
        }
        None => None,
    };
    let mut entries: Vec<(String, OffsetDateTime)> = current
        .as_ref()
        .map(|c| c.revoked.clone())
        .unwrap_or_default();
    for r in records {
        if let Some(t) = r.revoked_at {
            if !entries.iter().any(|(s, _)| *s == r.serial) {
                entries.push((r.serial.clone(), t));
            }
        }
    }
    let number = current
        .and_then(|c| c.crl_number)
        .unwrap_or(0)
        .checked_add(1)
        .ok_or_else(|| ControlError::Invalid("CRL number overflow".into()))?;
    let pem = pki::build_crl(signer, &entries, number, at, at + CRL_VALIDITY)?;
    Ok((pem, number))
}
