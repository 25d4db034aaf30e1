//! Private key loading and conversion.

use aws_lc_rs::encoding::{AsDer, Pkcs8V1Der};
use aws_lc_rs::signature::{
    EcdsaKeyPair, EcdsaSigningAlgorithm, ECDSA_P256_SHA256_ASN1_SIGNING,
    ECDSA_P384_SHA384_ASN1_SIGNING, ECDSA_P521_SHA512_ASN1_SIGNING,
};
use rcgen::PublicKeyData;
use rustls_pki_types::pem::SectionKind;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs1KeyDer, PrivatePkcs8KeyDer, PrivateSec1KeyDer};
use x509_parser::certificate::X509Certificate;

use super::inspect::{parse_cert_der, read_cert_pem};
use super::{read_pem, PkiError, Result};

const KEY_EXPECTED: &str = "a private key (PRIVATE KEY, EC PRIVATE KEY or RSA PRIVATE KEY)";

/// Reads the first private key block (PKCS#8, SEC1 or PKCS#1) from PEM.
pub(crate) fn read_private_key(key_pem: &str) -> Result<PrivateKeyDer<'static>> {
    let (kind, der) = read_pem(key_pem, KEY_EXPECTED, |k| {
        matches!(
            k,
            SectionKind::PrivateKey | SectionKind::EcPrivateKey | SectionKind::RsaPrivateKey
        )
    })?;
    Ok(match kind {
        SectionKind::RsaPrivateKey => PrivateKeyDer::Pkcs1(PrivatePkcs1KeyDer::from(der)),
        SectionKind::EcPrivateKey => PrivateKeyDer::Sec1(PrivateSec1KeyDer::from(der)),
        _ => PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(der)),
    })
}

/// Loads a private key PEM into an rcgen key pair usable for signing.
pub(crate) fn load_key_pair(key_pem: &str) -> Result<rcgen::KeyPair> {
    let der = read_private_key(key_pem)?;
    rcgen::KeyPair::try_from(&der).map_err(|_| unsupported_key())
}

fn unsupported_key() -> PkiError {
    PkiError::BadKey(
        "not a valid ECDSA (P-256, P-384, P-521), RSA (2048 bits or more) or Ed25519 key"
            .to_string(),
    )
}

/// True when `key`'s public half is the certificate's subject public key.
pub(crate) fn key_matches_x509(cert: &X509Certificate<'_>, key: &rcgen::KeyPair) -> bool {
    // Compare the subjectPublicKey BIT STRING contents rather than the whole
    // SubjectPublicKeyInfo: encoders differ in optional algorithm parameters
    // (e.g. RSA's NULL), the key bytes themselves are canonical.
    cert.public_key().subject_public_key.data.as_ref() == key.der_bytes()
}

/// Tells whether the private key in `key_pem` belongs to the certificate in
/// `cert_pem` (first CERTIFICATE block).
///
/// Errors when either input cannot be read; `Ok(false)` when both are valid
/// but do not belong together.
pub fn key_matches_cert(cert_pem: &str, key_pem: &str) -> Result<bool> {
    let cert_der = read_cert_pem(cert_pem)?;
    let cert = parse_cert_der(&cert_der)?;
    let key = load_key_pair(key_pem)?;
    Ok(key_matches_x509(&cert, &key))
}

/// Converts a PEM private key to unencrypted PKCS#8 v1 DER, the format JDBC
/// drivers expect for `sslkey=….pk8`.
///
/// Accepts PKCS#8 ("PRIVATE KEY"), SEC1 ("EC PRIVATE KEY", curves P-256,
/// P-384 and P-521) and PKCS#1 ("RSA PRIVATE KEY"). PKCS#8 input is checked
/// and returned unchanged; the other formats are re-encoded.
pub fn pem_key_to_pkcs8_der(key_pem: &str) -> Result<Vec<u8>> {
    let key = read_private_key(key_pem)?;
    match &key {
        PrivateKeyDer::Pkcs8(der) => {
            rcgen::KeyPair::try_from(&key).map_err(|_| unsupported_key())?;
            Ok(der.secret_pkcs8_der().to_vec())
        }
        PrivateKeyDer::Sec1(der) => sec1_to_pkcs8(der.secret_sec1_der()),
        PrivateKeyDer::Pkcs1(der) => {
            let key = aws_lc_rs::rsa::KeyPair::from_der(der.secret_pkcs1_der()).map_err(|_| {
                PkiError::BadKey("RSA PRIVATE KEY is not a valid PKCS#1 RSA key".to_string())
            })?;
            let pkcs8: Pkcs8V1Der<'static> = key
                .as_der()
                .map_err(|_| PkiError::Crypto("PKCS#8 encoding failed"))?;
            Ok(pkcs8.as_ref().to_vec())
        }
        _ => Err(unsupported_key()),
    }
}

fn sec1_to_pkcs8(der: &[u8]) -> Result<Vec<u8>> {
    const CURVES: [&EcdsaSigningAlgorithm; 3] = [
        &ECDSA_P256_SHA256_ASN1_SIGNING,
        &ECDSA_P384_SHA384_ASN1_SIGNING,
        &ECDSA_P521_SHA512_ASN1_SIGNING,
    ];
    for alg in CURVES {
        if let Ok(key) = EcdsaKeyPair::from_private_key_der(alg, der) {
            let doc = key
                .to_pkcs8v1()
                .map_err(|_| PkiError::Crypto("PKCS#8 encoding failed"))?;
            return Ok(doc.as_ref().to_vec());
        }
    }
    Err(PkiError::BadKey(
        "EC PRIVATE KEY is not a valid SEC1 key on P-256, P-384 or P-521".to_string(),
    ))
}
