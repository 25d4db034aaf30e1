//! Reading certificates for display and logs.
//!
//! Nothing here verifies signatures or decides trust.

use std::net::IpAddr;

use rustls_pki_types::pem::SectionKind;
use serde::Serialize;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_NIST_EC_P521,
    OID_PKCS1_RSAENCRYPTION, OID_SIG_ED25519,
};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;
use x509_parser::x509::X509Name;

use super::{read_pem, serial_to_hex, PkiError, Result};

/// What a certificate says about itself.
///
/// Serializes to JSON with RFC 3339 dates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CertInfo {
    /// First common name of the subject, if any.
    pub subject_cn: Option<String>,
    /// First common name of the issuer, if any.
    pub issuer_cn: Option<String>,
    /// Serial number, lowercase hex without leading zeros (see [`super::Issued::serial`]).
    pub serial: String,
    /// Start of validity (UTC).
    #[serde(with = "time::serde::rfc3339")]
    pub not_before: OffsetDateTime,
    /// End of validity (UTC).
    #[serde(with = "time::serde::rfc3339")]
    pub not_after: OffsetDateTime,
    /// Whether basicConstraints says CA:TRUE.
    pub is_ca: bool,
    /// Subject alternative names: DNS names and IP addresses as plain text,
    /// e-mail addresses as `email:…`, URIs as `uri:…`.
    pub sans: Vec<String>,
    /// Public key algorithm, named like [`super::KeyType`] where possible
    /// (`p256`, `p384`, `p521`, `rsa2048`, `rsa4096`, `ed25519`); other keys
    /// show their algorithm OID.
    pub key_algorithm: String,
    /// SHA-256 of the DER SubjectPublicKeyInfo, lowercase hex (a key pin).
    pub public_key_fingerprint_sha256: String,
    /// SHA-256 of the whole DER certificate, lowercase hex.
    pub fingerprint_sha256: String,
}

/// Reads the first CERTIFICATE block of `pem` and describes it.
pub fn inspect_cert_pem(pem: &str) -> Result<CertInfo> {
    inspect_cert_der(&read_cert_pem(pem)?)
}

/// Describes a DER certificate.
pub fn inspect_cert_der(der: &[u8]) -> Result<CertInfo> {
    let cert = parse_cert_der(der)?;
    let spki = cert.public_key();
    Ok(CertInfo {
        subject_cn: first_cn(cert.subject()),
        issuer_cn: first_cn(cert.issuer()),
        serial: serial_to_hex(cert.raw_serial()),
        not_before: cert.validity().not_before.to_datetime(),
        not_after: cert.validity().not_after.to_datetime(),
        is_ca: cert.is_ca(),
        sans: sans(&cert),
        key_algorithm: key_algorithm(&cert),
        public_key_fingerprint_sha256: hex::encode(Sha256::digest(spki.raw)),
        fingerprint_sha256: hex::encode(Sha256::digest(der)),
    })
}

/// Reads the first CERTIFICATE block from PEM text.
pub(crate) fn read_cert_pem(pem: &str) -> Result<Vec<u8>> {
    let (_, der) = read_pem(pem, "a certificate (CERTIFICATE)", |k| {
        k == SectionKind::Certificate
    })?;
    Ok(der)
}

/// Parses one DER certificate, rejecting trailing bytes.
pub(crate) fn parse_cert_der(der: &[u8]) -> Result<X509Certificate<'_>> {
    let (rest, cert) = X509Certificate::from_der(der)
        .map_err(|e| PkiError::BadCertificate(format!("not a DER X.509 certificate ({e})")))?;
    if !rest.is_empty() {
        return Err(PkiError::BadCertificate(format!(
            "{} unexpected bytes after the certificate",
            rest.len()
        )));
    }
    Ok(cert)
}

pub(crate) fn first_cn(name: &X509Name<'_>) -> Option<String> {
    name.iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string)
}

fn sans(cert: &X509Certificate<'_>) -> Vec<String> {
    let Ok(Some(ext)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    ext.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::DNSName(dns) => Some((*dns).to_string()),
            GeneralName::IPAddress(bytes) => ip_from_bytes(bytes).map(|ip| ip.to_string()),
            GeneralName::RFC822Name(mail) => Some(format!("email:{mail}")),
            GeneralName::URI(uri) => Some(format!("uri:{uri}")),
            _ => None,
        })
        .collect()
}

fn ip_from_bytes(bytes: &[u8]) -> Option<IpAddr> {
    if let Ok(v4) = <[u8; 4]>::try_from(bytes) {
        return Some(IpAddr::from(v4));
    }
    <[u8; 16]>::try_from(bytes).ok().map(IpAddr::from)
}

fn key_algorithm(cert: &X509Certificate<'_>) -> String {
    let spki = cert.public_key();
    let oid = &spki.algorithm.algorithm;
    if *oid == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok());
        return match curve {
            Some(c) if c == OID_EC_P256 => "p256".to_string(),
            Some(c) if c == OID_NIST_EC_P384 => "p384".to_string(),
            Some(c) if c == OID_NIST_EC_P521 => "p521".to_string(),
            Some(c) => format!("ec {c}"),
            None => "ec".to_string(),
        };
    }
    if *oid == OID_PKCS1_RSAENCRYPTION {
        return match spki.parsed() {
            Ok(PublicKey::RSA(rsa)) => format!("rsa{}", rsa.key_size()),
            _ => "rsa".to_string(),
        };
    }
    if *oid == OID_SIG_ED25519 {
        return "ed25519".to_string();
    }
    oid.to_id_string()
}
