//! Certificate authority and certificate tooling.
//!
//! Each database served by pgmtls has its own small certificate authority
//! that issues client certificates (and usually the proxy's server
//! certificate), and publishes a certificate revocation list. This module is
//! a pure library: it turns parameters into PEM text and PEM text into
//! structured information. It does not know where files live.
//!
//! * [`create_ca`] makes a self-signed CA; [`CaSigner`] loads one back.
//! * [`issue_server`] and [`issue_client`] issue leaf certificates.
//! * [`build_crl`] signs a CRL; [`parse_crl_pem`] reads one for display.
//! * [`inspect_cert_pem`], [`key_matches_cert`] and [`pem_key_to_pkcs8_der`]
//!   are helpers for display, load-time checks and client configuration.
//!
//! Trust decisions are never made here: certificates are verified by rustls'
//! webpki verifiers. The parsing helpers are for display and logs.

mod ca;
mod crl;
mod inspect;
mod issue;
mod keys;
#[cfg(test)]
mod tests;

use std::fmt;
use std::str::FromStr;

use rustls_pki_types::pem::{self, PemObject, SectionKind};
use serde::{Deserialize, Serialize};
use time::{Duration, Month, OffsetDateTime, PrimitiveDateTime, UtcOffset};

pub use ca::{create_ca, CaSigner};
pub use crl::{build_crl, parse_crl_der, parse_crl_pem, CrlInfo};
pub use inspect::{inspect_cert_der, inspect_cert_pem, CertInfo};
pub use issue::{client_validity, issue_client, issue_server};
pub use keys::{key_matches_cert, pem_key_to_pkcs8_der};

/// Default lifetime of a CA certificate: ten years (including leap days).
pub const DEFAULT_CA_VALIDITY: Duration = Duration::days(3653);

/// Default lifetime of a server certificate: 397 days (the public-CA limit
/// browsers have enforced since 2020).
pub const DEFAULT_SERVER_VALIDITY: Duration = Duration::days(397);

/// Default lifetime of a client certificate, in calendar months.
pub const DEFAULT_CLIENT_VALIDITY_MONTHS: u32 = 13;

/// How far `not_before` is moved into the past for certificates whose start
/// is "now" (CA and server certificates), so that peers with a slightly
/// slow clock accept them immediately.
pub const BACKDATE: Duration = Duration::minutes(5);

/// Common name used for a server certificate issued without any name.
pub const DEFAULT_SERVER_CN: &str = "pgmtls server";

/// Errors from the PKI functions.
///
/// Messages describe what was wrong with the input; they never contain key
/// material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    /// The input is not well-formed PEM.
    #[error("malformed PEM while reading {expected}: {reason}")]
    BadPem {
        expected: &'static str,
        reason: String,
    },
    /// The input contains no PEM block at all.
    #[error("no PEM block found; expected {expected}")]
    NoPem { expected: &'static str },
    /// The input contains PEM, but of the wrong kind (e.g. a key where a
    /// certificate was expected).
    #[error("expected {expected}, but the PEM input contains {found}")]
    WrongPemKind {
        expected: &'static str,
        found: String,
    },
    /// A certificate could not be parsed.
    #[error("invalid certificate: {0}")]
    BadCertificate(String),
    /// A CRL could not be parsed.
    #[error("invalid certificate revocation list: {0}")]
    BadCrl(String),
    /// A private key could not be parsed or is of an unsupported type.
    #[error("invalid or unsupported private key: {0}")]
    BadKey(String),
    /// A certificate used as CA is not a CA certificate.
    #[error("certificate is not a usable CA: {0}")]
    NotACa(String),
    /// A private key does not belong to the certificate it was paired with.
    #[error("private key does not match the certificate's public key")]
    KeyMismatch,
    /// A serial number string is not valid hexadecimal of at most 20 bytes.
    #[error("invalid serial number {0:?}: expected 1 to 40 hex digits")]
    BadSerial(String),
    /// A name (common name, DNS name, IP address) was rejected.
    #[error("invalid name {name:?}: {reason}")]
    BadName { name: String, reason: &'static str },
    /// Validity dates were rejected.
    #[error("invalid validity period: {0}")]
    BadValidity(String),
    /// An unknown key type name was given.
    #[error("unknown key type {0:?}; expected one of p256, p384, rsa2048, rsa4096")]
    UnknownKeyType(String),
    /// Certificate or CRL generation failed inside rcgen.
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// A cryptographic primitive failed (key generation, random numbers).
    #[error("cryptographic operation failed: {0}")]
    Crypto(&'static str),
}

/// Result alias for this module.
pub type Result<T, E = PkiError> = std::result::Result<T, E>;

/// Kind of key pair to generate for a new certificate.
///
/// Written as `p256`, `p384`, `rsa2048`, `rsa4096` by [`Display`](fmt::Display),
/// [`FromStr`] (case-insensitive) and serde.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum KeyType {
    /// ECDSA on NIST P-256, signing with SHA-256.
    #[default]
    #[serde(rename = "p256")]
    EcdsaP256,
    /// ECDSA on NIST P-384, signing with SHA-384.
    #[serde(rename = "p384")]
    EcdsaP384,
    /// RSA, 2048-bit modulus, PKCS#1 v1.5 signatures with SHA-256.
    #[serde(rename = "rsa2048")]
    Rsa2048,
    /// RSA, 4096-bit modulus, PKCS#1 v1.5 signatures with SHA-256.
    /// Key generation takes about a second.
    #[serde(rename = "rsa4096")]
    Rsa4096,
}

impl KeyType {
    /// All key types, in the order they are documented.
    pub const ALL: [KeyType; 4] = [
        KeyType::EcdsaP256,
        KeyType::EcdsaP384,
        KeyType::Rsa2048,
        KeyType::Rsa4096,
    ];

    /// Short name, as accepted by [`FromStr`].
    pub fn as_str(self) -> &'static str {
        match self {
            KeyType::EcdsaP256 => "p256",
            KeyType::EcdsaP384 => "p384",
            KeyType::Rsa2048 => "rsa2048",
            KeyType::Rsa4096 => "rsa4096",
        }
    }

    /// Generates a fresh key pair of this type.
    pub(crate) fn generate(self) -> Result<rcgen::KeyPair> {
        let key = match self {
            KeyType::EcdsaP256 => rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256),
            KeyType::EcdsaP384 => rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384),
            KeyType::Rsa2048 => {
                rcgen::KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048)
            }
            KeyType::Rsa4096 => {
                rcgen::KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_4096)
            }
        };
        key.map_err(|_| PkiError::Crypto("key generation failed"))
    }
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for KeyType {
    type Err = PkiError;

    fn from_str(s: &str) -> Result<Self> {
        let lower = s.trim().to_ascii_lowercase();
        KeyType::ALL
            .into_iter()
            .find(|k| k.as_str() == lower)
            .ok_or_else(|| PkiError::UnknownKeyType(s.to_string()))
    }
}

/// A freshly issued certificate with its private key.
#[derive(Clone, PartialEq, Eq)]
pub struct Issued {
    /// The certificate, PEM ("CERTIFICATE").
    pub cert_pem: String,
    /// The private key, PKCS#8 PEM ("PRIVATE KEY"). Secret: store it with
    /// owner-only permissions. `Debug` output omits it.
    pub key_pem: String,
    /// Serial number as lowercase hex without leading zeros or separators.
    pub serial: String,
    /// Start of validity, exactly as encoded in the certificate (UTC, whole
    /// seconds).
    pub not_before: OffsetDateTime,
    /// End of validity, exactly as encoded in the certificate.
    pub not_after: OffsetDateTime,
}

impl fmt::Debug for Issued {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Issued")
            .field("serial", &self.serial)
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"[redacted]")
            .finish()
    }
}

/// Adds calendar months to a date, keeping the time of day and offset.
///
/// When the day does not exist in the target month it is clamped to the
/// month's last day: 31 January + 1 month is 28 (or 29) February. Results
/// beyond the largest representable date saturate to that date.
pub fn add_months(t: OffsetDateTime, months: u32) -> OffsetDateTime {
    let month0 = i64::from(u8::from(t.month())) - 1;
    let total = i64::from(t.year()) * 12 + month0 + i64::from(months);
    let year = total.div_euclid(12);
    let month_number = total.rem_euclid(12) + 1;
    let (Ok(year), Ok(month_number)) = (i32::try_from(year), u8::try_from(month_number)) else {
        return max_datetime(t.offset());
    };
    let Ok(month) = Month::try_from(month_number) else {
        return max_datetime(t.offset());
    };
    let day = t.day().min(time::util::days_in_month(month, year));
    match time::Date::from_calendar_date(year, month, day) {
        Ok(date) => t.replace_date(date),
        Err(_) => max_datetime(t.offset()),
    }
}

fn max_datetime(offset: UtcOffset) -> OffsetDateTime {
    PrimitiveDateTime::MAX.assume_offset(offset)
}

// ---------------------------------------------------------------------------
// Helpers shared by the submodules.

/// Converts to UTC and drops sub-second precision, which X.509 cannot
/// represent. Rejects years that cannot be encoded (rcgen would panic on
/// some of them).
pub(crate) fn normalize_time(t: OffsetDateTime, what: &str) -> Result<OffsetDateTime> {
    let t = t.to_offset(UtcOffset::UTC);
    if !(1950..=9999).contains(&t.year()) {
        return Err(PkiError::BadValidity(format!(
            "{what} {t} is outside the years 1950-9999"
        )));
    }
    t.replace_nanosecond(0)
        .map_err(|_| PkiError::BadValidity(format!("{what} cannot be represented")))
}

/// Checks and normalizes a validity window.
pub(crate) fn validity_window(
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<(OffsetDateTime, OffsetDateTime)> {
    time_window(not_before, not_after, ("not_before", "not_after"))
}

/// Checks and normalizes a time window whose ends are called `names`.
pub(crate) fn time_window(
    start: OffsetDateTime,
    end: OffsetDateTime,
    names: (&str, &str),
) -> Result<(OffsetDateTime, OffsetDateTime)> {
    let start = normalize_time(start, names.0)?;
    let end = normalize_time(end, names.1)?;
    if end <= start {
        return Err(PkiError::BadValidity(format!(
            "{} ({end}) must be later than {} ({start})",
            names.1, names.0
        )));
    }
    Ok((start, end))
}

/// Normalizes a serial number typed by a person or copied from another
/// tool (`0A:BC`, `0xabc`, `000abc`) to the form used by [`Issued::serial`],
/// [`CertInfo::serial`] and [`CrlInfo::revoked_serials`] (`abc`).
pub fn normalize_serial(text: &str) -> Result<String> {
    serial_from_hex(text).map(|bytes| serial_to_hex(&bytes))
}

/// Canonical serial text: lowercase hex of the big-endian magnitude, without
/// leading zeros ("0" for zero).
pub(crate) fn serial_to_hex(bytes: &[u8]) -> String {
    crate::tls_store::serial_hex(bytes)
}

/// Parses a serial written as hex, with optional `:` separators and any
/// case, into big-endian bytes without leading zeros.
pub(crate) fn serial_from_hex(text: &str) -> Result<Vec<u8>> {
    let bad = || PkiError::BadSerial(text.to_string());
    let digits: String = text.trim().chars().filter(|c| *c != ':').collect();
    let digits = digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0X"))
        .unwrap_or(&digits);
    if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(bad());
    }
    let padded = if digits.len() % 2 == 1 {
        format!("0{digits}")
    } else {
        digits.to_string()
    };
    let bytes = hex::decode(padded).map_err(|_| bad())?;
    let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    let bytes = bytes[start..].to_vec();
    // RFC 5280: at most 20 octets (a positive value may need one more octet
    // for the sign in DER, which webpki tolerates).
    if bytes.is_empty() || bytes.len() > 20 {
        return Err(bad());
    }
    Ok(bytes)
}

fn pem_label(kind: SectionKind) -> &'static str {
    match kind {
        SectionKind::Certificate => "a certificate (CERTIFICATE)",
        SectionKind::PublicKey => "a public key (PUBLIC KEY)",
        SectionKind::RsaPrivateKey => "a private key (RSA PRIVATE KEY)",
        SectionKind::PrivateKey => "a private key (PRIVATE KEY)",
        SectionKind::EcPrivateKey => "a private key (EC PRIVATE KEY)",
        SectionKind::Crl => "a certificate revocation list (X509 CRL)",
        SectionKind::Csr => "a certificate request (CERTIFICATE REQUEST)",
        _ => "an unsupported PEM block",
    }
}

/// Reads the first PEM block whose kind is accepted by `accept`.
///
/// Error messages describe the PEM structure only; the underlying parser's
/// messages (which may quote input lines) are not passed on.
pub(crate) fn read_pem(
    input: &str,
    expected: &'static str,
    accept: impl Fn(SectionKind) -> bool,
) -> Result<(SectionKind, Vec<u8>)> {
    let mut found: Vec<&'static str> = Vec::new();
    for item in <(SectionKind, Vec<u8>) as PemObject>::pem_slice_iter(input.as_bytes()) {
        let (kind, der) = item.map_err(|e| PkiError::BadPem {
            expected,
            reason: describe_pem_error(&e).to_string(),
        })?;
        if accept(kind) {
            return Ok((kind, der));
        }
        let label = pem_label(kind);
        if !found.contains(&label) {
            found.push(label);
        }
    }
    if found.is_empty() {
        Err(PkiError::NoPem { expected })
    } else {
        Err(PkiError::WrongPemKind {
            expected,
            found: found.join(", "),
        })
    }
}

fn describe_pem_error(e: &pem::Error) -> &'static str {
    match e {
        pem::Error::MissingSectionEnd { .. } => "a BEGIN line has no matching END line",
        pem::Error::IllegalSectionStart { .. } => "malformed BEGIN line",
        pem::Error::Base64Decode(_) => "the body is not valid base64",
        pem::Error::SectionTooLarge => "a PEM block is too large",
        _ => "unreadable PEM",
    }
}
