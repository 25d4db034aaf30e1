//! Creating and loading the certificate authority.

use std::fmt;

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyUsagePurpose};
use rustls_pki_types::CertificateDer;
use time::{Duration, OffsetDateTime};
use x509_parser::extensions::ParsedExtension;

use super::inspect::{inspect_cert_der, parse_cert_der, read_cert_pem, CertInfo};
use super::issue::{distinguished_name, random_serial};
use super::keys::{key_matches_x509, load_key_pair};
use super::{serial_to_hex, validity_window, Issued, KeyType, PkiError, Result, BACKDATE};

/// Creates a self-signed CA certificate and its key.
///
/// The certificate has basicConstraints CA:TRUE with pathLenConstraint 0
/// (it may only sign leaf certificates), keyUsage keyCertSign and cRLSign,
/// and a subject key identifier. It is valid from five minutes ago
/// ([`BACKDATE`]) until `validity` from now; [`super::DEFAULT_CA_VALIDITY`]
/// is the usual choice.
///
/// Verifiers find a certificate's CA by name, so give every CA a distinct
/// `common_name` (e.g. include the database name): a client certificate
/// from another CA with the same name is still rejected, but as a bad
/// signature rather than as an unknown issuer, which makes logs misleading.
pub fn create_ca(common_name: &str, key_type: KeyType, validity: Duration) -> Result<Issued> {
    let now = OffsetDateTime::now_utc();
    let not_after = now
        .checked_add(validity)
        .ok_or_else(|| PkiError::BadValidity("CA validity is too long".to_string()))?;
    let (not_before, not_after) = validity_window(now - BACKDATE, not_after)?;

    let serial = random_serial()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = distinguished_name(common_name)?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
    params.not_before = not_before;
    params.not_after = not_after;

    let key = key_type.generate()?;
    let cert = params.self_signed(&key)?;
    Ok(Issued {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        serial: serial_to_hex(&serial),
        not_before,
        not_after,
    })
}

/// A loaded CA certificate and key, ready to sign certificates and CRLs.
pub struct CaSigner {
    pub(crate) issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pub(crate) cert_der: CertificateDer<'static>,
    /// DER of the CA's subject name; every issued certificate's issuer
    /// name must be byte-identical, or verifiers will not find the CA.
    pub(crate) subject_raw: Vec<u8>,
    /// Subject key identifier of the CA, if the certificate has one.
    pub(crate) key_id: Option<Vec<u8>>,
    pub(crate) info: CertInfo,
}

impl CaSigner {
    /// Loads a CA from its certificate PEM (first CERTIFICATE block) and
    /// private key PEM (PKCS#8, SEC1 or PKCS#1).
    ///
    /// Fails with [`PkiError::NotACa`] when the certificate lacks
    /// basicConstraints CA:TRUE or its keyUsage excludes keyCertSign, and
    /// with [`PkiError::KeyMismatch`] when the key is not the certificate's.
    /// An expired CA loads (so it can still sign CRLs), but cannot issue.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self> {
        let cert_der = CertificateDer::from(read_cert_pem(cert_pem)?);
        let key = load_key_pair(key_pem)?;

        let (subject_raw, key_id) = {
            let cert = parse_cert_der(&cert_der)?;
            match cert.basic_constraints() {
                Ok(Some(bc)) if bc.value.ca => {}
                Ok(_) => {
                    return Err(PkiError::NotACa(
                        "basicConstraints CA:TRUE is missing".to_string(),
                    ))
                }
                Err(e) => return Err(PkiError::BadCertificate(e.to_string())),
            }
            if let Ok(Some(ku)) = cert.key_usage() {
                if !ku.value.key_cert_sign() {
                    return Err(PkiError::NotACa(
                        "keyUsage does not include keyCertSign".to_string(),
                    ));
                }
            }
            if !key_matches_x509(&cert, &key) {
                return Err(PkiError::KeyMismatch);
            }
            let key_id = cert
                .iter_extensions()
                .find_map(|ext| match ext.parsed_extension() {
                    ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0.to_vec()),
                    _ => None,
                });
            (cert.subject().as_raw().to_vec(), key_id)
        };
        let info = inspect_cert_der(&cert_der)?;
        let issuer = rcgen::Issuer::from_ca_cert_der(&cert_der, key)
            .map_err(|e| PkiError::BadCertificate(format!("cannot use as issuer: {e}")))?;
        Ok(CaSigner {
            issuer,
            cert_der,
            subject_raw,
            key_id,
            info,
        })
    }

    /// Loads the CA returned by [`create_ca`].
    pub fn from_issued(ca: &Issued) -> Result<Self> {
        Self::from_pem(&ca.cert_pem, &ca.key_pem)
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// Description of the CA certificate.
    pub fn info(&self) -> &CertInfo {
        &self.info
    }
}

impl fmt::Debug for CaSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaSigner")
            .field("subject_cn", &self.info.subject_cn)
            .field("serial", &self.info.serial)
            .field("not_after", &self.info.not_after)
            .finish_non_exhaustive()
    }
}
