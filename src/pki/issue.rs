//! Issuing leaf certificates.

use std::net::IpAddr;

use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose,
    SanType,
};
use rustls_pki_types::ServerName;
use time::{Duration, OffsetDateTime};

use super::ca::CaSigner;
use super::inspect::parse_cert_der;
use super::{
    add_months, serial_to_hex, validity_window, Issued, KeyType, PkiError, Result, BACKDATE,
    DEFAULT_CLIENT_VALIDITY_MONTHS, DEFAULT_SERVER_CN,
};

/// Longest common name X.520 allows (ub-common-name).
const MAX_CN_CHARS: usize = 64;
/// Longest client-certificate CN: a PostgreSQL role name (`NAMEDATALEN - 1` bytes).
const MAX_CLIENT_CN_BYTES: usize = crate::wire::frontend::MAX_IDENTIFIER_BYTES;

/// Issues a server certificate for `names`.
///
/// Each name that parses as an IP address becomes an IP SAN, every other
/// one a DNS SAN (a leading `*.` wildcard is allowed). The subject CN is the
/// first name, or [`DEFAULT_SERVER_CN`] when `names` is empty (or the first
/// name is longer than the 64 characters a CN may have). Extended key
/// usage serverAuth, key usage digitalSignature. Valid from five minutes
/// ago ([`BACKDATE`]) for `validity` from now, but never beyond the CA's own
/// expiry; [`super::DEFAULT_SERVER_VALIDITY`] is the usual choice.
pub fn issue_server(
    signer: &CaSigner,
    names: &[String],
    key_type: KeyType,
    validity: Duration,
) -> Result<Issued> {
    let mut sans = Vec::with_capacity(names.len());
    for name in names {
        let san = server_san(name)?;
        if !sans.contains(&san) {
            sans.push(san);
        }
    }
    // The CN is informational (clients match SANs); DNS names longer than
    // a CN may hold fall back to the default.
    let cn = names
        .first()
        .map(String::as_str)
        .filter(|n| n.chars().count() <= MAX_CN_CHARS)
        .unwrap_or(DEFAULT_SERVER_CN);

    let now = OffsetDateTime::now_utc();
    let not_after = now
        .checked_add(validity)
        .ok_or_else(|| PkiError::BadValidity("server validity is too long".to_string()))?;
    let mut params = leaf_params(signer, cn, now - BACKDATE, not_after)?;
    params.subject_alt_names = sans;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    sign_leaf(signer, params, key_type)
}

/// Issues a client certificate whose subject CN is `common_name`.
///
/// PostgreSQL maps the CN to the database user (`clientcert=verify-full`),
/// so the name is taken verbatim; it must be 1 to 63 bytes (the longest
/// role name PostgreSQL keeps) without control characters. Extended key usage clientAuth, key usage
/// digitalSignature, and a random 16-byte positive serial number that
/// identifies the certificate in CRLs and logs. `not_after` is cut to the
/// CA's own expiry; the returned [`Issued`] has the dates actually used.
/// See [`client_validity`] for the default period.
pub fn issue_client(
    signer: &CaSigner,
    common_name: &str,
    key_type: KeyType,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<Issued> {
    if common_name.len() > MAX_CLIENT_CN_BYTES {
        // PostgreSQL truncates role names to 63 bytes, so a longer CN would be compared
        // (by `user_must_match_cn`, or by Postgres' own `clientcert=verify-full`) with a
        // name the server then shortens into another role's.
        return Err(PkiError::BadName {
            name: common_name.to_string(),
            reason: "common name is longer than 63 bytes, the longest PostgreSQL role name",
        });
    }
    let mut params = leaf_params(signer, common_name, not_before, not_after)?;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    sign_leaf(signer, params, key_type)
}

/// Default validity of a client certificate starting at `now`:
/// `(now, now + 13 calendar months)`.
pub fn client_validity(now: OffsetDateTime) -> (OffsetDateTime, OffsetDateTime) {
    (now, add_months(now, DEFAULT_CLIENT_VALIDITY_MONTHS))
}

/// A random serial number: 16 bytes, top bit clear (positive without a
/// padding byte) and second-highest bit set (always 32 hex digits).
/// 126 random bits.
pub(crate) fn random_serial() -> Result<[u8; 16]> {
    let mut serial = [0u8; 16];
    aws_lc_rs::rand::fill(&mut serial)
        .map_err(|_| PkiError::Crypto("random number generation failed"))?;
    serial[0] = (serial[0] & 0x7f) | 0x40;
    Ok(serial)
}

/// A subject name holding only a common name.
pub(crate) fn distinguished_name(common_name: &str) -> Result<DistinguishedName> {
    let bad = |reason| PkiError::BadName {
        name: common_name.to_string(),
        reason,
    };
    if common_name.trim().is_empty() {
        return Err(bad("common name is empty"));
    }
    if common_name.chars().count() > MAX_CN_CHARS {
        return Err(bad("common name is longer than 64 characters"));
    }
    if common_name.chars().any(char::is_control) {
        return Err(bad("common name contains control characters"));
    }
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    Ok(dn)
}

fn server_san(name: &str) -> Result<SanType> {
    let bad = |reason| PkiError::BadName {
        name: name.to_string(),
        reason,
    };
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    // Validate the DNS syntax; a leading "*." wildcard label is checked as
    // if it were an ordinary label.
    let to_check = match name.strip_prefix("*.") {
        Some(rest) => format!("x.{rest}"),
        None => name.to_string(),
    };
    match ServerName::try_from(to_check.as_str()) {
        Ok(ServerName::DnsName(_)) => {}
        _ => return Err(bad("not a valid DNS name or IP address")),
    }
    let ia5 =
        rcgen::string::Ia5String::try_from(name).map_err(|_| bad("DNS names must be ASCII"))?;
    Ok(SanType::DnsName(ia5))
}

/// Parameters shared by server and client certificates.
fn leaf_params(
    signer: &CaSigner,
    common_name: &str,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<CertificateParams> {
    let (not_before, mut not_after) = validity_window(not_before, not_after)?;
    let ca_not_after = signer.info.not_after;
    if not_after > ca_not_after {
        not_after = ca_not_after;
    }
    if not_after <= not_before {
        return Err(PkiError::BadValidity(format!(
            "the CA certificate expires at {ca_not_after}, not after the requested start {not_before}"
        )));
    }

    let mut params = CertificateParams::default();
    params.distinguished_name = distinguished_name(common_name)?;
    params.not_before = not_before;
    params.not_after = not_after;
    // ExplicitNoCa writes basicConstraints CA:FALSE and a subject key
    // identifier.
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&random_serial()?));
    Ok(params)
}

fn sign_leaf(signer: &CaSigner, params: CertificateParams, key_type: KeyType) -> Result<Issued> {
    let key = key_type.generate()?;
    let cert = params.signed_by(&key, &signer.issuer)?;

    // rcgen rebuilds the issuer name from the parsed CA subject; make sure
    // the result is byte-identical, otherwise no verifier would link the
    // certificate to its CA.
    let parsed = parse_cert_der(cert.der())?;
    if parsed.issuer().as_raw() != signer.subject_raw.as_slice() {
        return Err(PkiError::NotACa(
            "the CA subject name cannot be reproduced exactly in issued certificates".to_string(),
        ));
    }
    let serial = serial_to_hex(parsed.raw_serial());

    Ok(Issued {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        serial,
        not_before: params.not_before,
        not_after: params.not_after,
    })
}
