//! `pgmtls doctor`: would this client get in, and if not, why? Answered offline from the
//! state, by the data plane's own decisions in the data plane's own order: the IP rules
//! (`Allowlist::check`), the shared listener's routing by SNI (`conn::shared::route`), the
//! database's client-certificate verifier (the one inside its TLS configuration, CA and CRL and
//! revoked records together), and the identity policy (`conn::identity_admits`). Each answer is
//! a line with the reason label the proxy would log for the same client.

use std::net::IpAddr;
use std::sync::Arc;

use rustls_pki_types::{CertificateDer, UnixTime};
use serde::Serialize;
use time::OffsetDateTime;

use crate::allowlist::AdmittedBy;
use crate::conn::error::{classify_rustls_error, ErrorKind};
use crate::conn::{identity_admits, shared, tls};
use crate::snapshot::{DatabaseRuntime, Snapshot};

/// What the client would present and from where.
#[derive(Debug, Default)]
pub struct Client<'a> {
    /// The certificate first, then any intermediates, as a client sends them.
    pub chain: &'a [CertificateDer<'static>],
    pub from: Option<IpAddr>,
    pub user: Option<&'a str>,
    pub sni: Option<&'a str>,
}

/// One answer.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// `address`, `sni`, `certificate`, `validity`, `revocation`, `identity`.
    pub check: &'static str,
    /// `None`: not checked (the input that decides it was not given, or it does not apply).
    pub ok: Option<bool>,
    /// The reason the proxy would log when this check refuses.
    pub reason: Option<&'static str>,
    pub detail: String,
}

/// Every answer and the verdict: the first refusal in the order the proxy decides.
#[derive(Debug, Clone, Serialize)]
pub struct Diagnosis {
    /// The database the client would reach (on the shared listener, the one its SNI picks).
    pub database: String,
    pub admitted: bool,
    pub reason: Option<&'static str>,
    pub checks: Vec<Check>,
}

/// Who else admits an address besides the database's IP rules. One line per source, in the
/// order the data plane asks them.
fn admitted_by(db: &DatabaseRuntime, ip: IpAddr) -> Option<String> {
    // The data plane's own decision: an IP rule wins over a trusted range.
    db.admit(ip).map(|a| match a.by {
        AdmittedBy::MtlsRule => format!("IP rule {}", a.entry.id),
        AdmittedBy::TrustedIp => format!(
            "trusted IP range {} (no IP rule covers it: a certificate is optional, but one that \
             is sent must pass the checks below)",
            a.entry.id
        ),
    })
}

/// Diagnoses `client` connecting to `database`. `default` is the shared listener's
/// `default_database`; `now` the time the certificate is judged at.
pub fn diagnose(
    snap: &Snapshot,
    database: &str,
    default: Option<&str>,
    client: &Client<'_>,
    now: OffsetDateTime,
) -> Result<Diagnosis, String> {
    let Some(own) = snap.databases.get(database) else {
        return Err(format!("no database {database:?} in the state"));
    };
    let mut checks = Vec::new();
    let refuse = |check, kind: ErrorKind, detail: String| Check {
        check,
        ok: Some(false),
        reason: Some(kind.as_str()),
        detail,
    };
    let pass = |check, detail: String| Check {
        check,
        ok: Some(true),
        reason: None,
        detail,
    };
    let skip = |check, detail: &str| Check {
        check,
        ok: None,
        reason: None,
        detail: detail.to_owned(),
    };

    // On the shared listener some database there must admit the address at accept, before
    // anything is read; then SNI picks whose rules, CA and policy apply.
    if let (true, Some(ip)) = (own.settings.listen.is_shared(), client.from) {
        if !snap.shared_admits(ip) {
            checks.push(refuse(
                "address",
                ErrorKind::IpNotAllowed,
                format!(
                    "no IP rule or trusted range of a database on the shared listener admits {ip}"
                ),
            ));
            return Ok(finish(database.to_owned(), checks));
        }
    }
    let db: Arc<DatabaseRuntime> = if own.settings.listen.is_shared() {
        match shared::route(snap, default, client.sni) {
            Ok(db) if db.name == own.name => {
                checks.push(pass(
                    "sni",
                    format!("the shared listener routes it to {}", db.name),
                ));
                Arc::clone(db)
            }
            Ok(db) => {
                // The proxy goes on with the database the name picks; so does the diagnosis.
                checks.push(Check {
                    check: "sni",
                    ok: Some(false),
                    reason: None,
                    detail: format!(
                        "the shared listener routes it to {}, not {database}; the checks below \
                         are {}'s",
                        db.name, db.name
                    ),
                });
                Arc::clone(db)
            }
            Err(e) => {
                checks.push(refuse("sni", e.kind, e.detail));
                return Ok(finish(database.to_owned(), checks));
            }
        }
    } else {
        checks.push(skip(
            "sni",
            "not on the shared listener: its own port serves it whatever the name",
        ));
        Arc::clone(own)
    };

    checks.push(match client.from {
        Some(ip) => match admitted_by(&db, ip) {
            Some(by) => pass("address", format!("{by} admits {ip}")),
            None => refuse(
                "address",
                ErrorKind::IpNotAllowed,
                format!("no IP rule or trusted range of {} admits {ip}", db.name),
            ),
        },
        None => skip("address", "not checked: give --from IP"),
    });

    let Some((leaf, intermediates)) = client.chain.split_first() else {
        return Err("the certificate file holds no certificate".to_owned());
    };
    let unix = UnixTime::since_unix_epoch(std::time::Duration::from_secs(
        now.unix_timestamp().max(0) as u64,
    ));
    checks.push(
        match db
            .tls
            .client_verifier
            .verify_client_cert(leaf, intermediates, unix)
        {
            Ok(_) => pass(
                "certificate",
                format!("chains to {}'s CA, in date and not revoked", db.name),
            ),
            Err(e) => refuse("certificate", classify_rustls_error(&e), e.to_string()),
        },
    );
    let id = tls::leaf_identity(leaf, &db);
    checks.push(validity(leaf, now));
    checks.push(if id.serial.is_empty() {
        skip("revocation", "the certificate does not parse")
    } else if db.is_revoked(&id.serial) {
        refuse(
            "revocation",
            ErrorKind::ClientCertRevoked,
            format!("serial {} is revoked (CRL or record)", id.serial),
        )
    } else {
        pass("revocation", format!("serial {} is not revoked", id.serial))
    });
    checks.push(match client.user {
        None if db.settings.user_must_match_cn => skip(
            "identity",
            "not checked: give --user NAME (user_must_match_cn is on)",
        ),
        None => pass(
            "identity",
            "user_must_match_cn is off: Postgres alone decides the user".to_owned(),
        ),
        Some(user) => match identity_admits(&db.settings, Some(user), id.common_name.as_deref()) {
            Ok(()) if db.settings.user_must_match_cn => {
                pass("identity", format!("user {user:?} is the certificate's CN"))
            }
            Ok(()) => pass(
                "identity",
                format!("user_must_match_cn is off: Postgres decides whether {user:?} may log in"),
            ),
            Err(e) => refuse(
                "identity",
                e.kind,
                format!(
                    "user {user:?} is not the certificate's CN {:?}",
                    id.common_name.unwrap_or_default()
                ),
            ),
        },
    });
    Ok(finish(db.name.to_string(), checks))
}

/// The validity window, as a line of its own; the verifier's verdict above is what decides.
fn validity(leaf: &CertificateDer<'_>, now: OffsetDateTime) -> Check {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(leaf.as_ref()) else {
        return Check {
            check: "validity",
            ok: None,
            reason: None,
            detail: "the certificate does not parse".to_owned(),
        };
    };
    let (from, until) = (
        cert.validity().not_before.to_datetime(),
        cert.validity().not_after.to_datetime(),
    );
    let fmt = |t: OffsetDateTime| {
        t.format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_else(|_| t.to_string())
    };
    let window = format!("valid from {} until {}", fmt(from), fmt(until));
    if from <= now && now <= until {
        Check {
            check: "validity",
            ok: Some(true),
            reason: None,
            detail: window,
        }
    } else {
        Check {
            check: "validity",
            ok: Some(false),
            reason: Some(ErrorKind::ClientCertExpired.as_str()),
            detail: format!("{window}: not now"),
        }
    }
}

/// The verdict: the first check that refuses with a reason, in the order the checks ran
/// (the proxy's); supplementary lines (validity, revocation) only explain the certificate's.
fn finish(database: String, checks: Vec<Check>) -> Diagnosis {
    let decisive = ["sni", "address", "certificate", "identity"];
    let reason = checks
        .iter()
        .filter(|c| decisive.contains(&c.check) && c.ok == Some(false))
        .find_map(|c| c.reason);
    // Routed to another database: not refused, but not this database either.
    let elsewhere = checks
        .iter()
        .any(|c| c.check == "sni" && c.ok == Some(false));
    Diagnosis {
        database,
        admitted: reason.is_none() && !elsewhere,
        reason,
        checks,
    }
}
