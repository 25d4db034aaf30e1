//! Certificate revocation lists.

use rcgen::{CertificateRevocationListParams, KeyIdMethod, RevokedCertParams, SerialNumber};
use rustls_pki_types::pem::SectionKind;
use time::OffsetDateTime;
use x509_parser::prelude::FromDer;
use x509_parser::revocation_list::CertificateRevocationList;

use super::ca::CaSigner;
use super::inspect::first_cn;
use super::{
    normalize_time, read_pem, serial_from_hex, serial_to_hex, time_window, PkiError, Result,
};

/// What a CRL says (not verified; for display and bookkeeping).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrlInfo {
    /// First common name of the issuer, if any.
    pub issuer_cn: Option<String>,
    /// The cRLNumber extension; `None` when absent.
    pub crl_number: Option<u64>,
    /// thisUpdate.
    pub this_update: OffsetDateTime,
    /// nextUpdate, if present.
    pub next_update: Option<OffsetDateTime>,
    /// Serials of the revoked certificates, lowercase hex without leading
    /// zeros (the same form as [`super::Issued::serial`]), in CRL order.
    pub revoked_serials: Vec<String>,
    /// The same entries with their revocation dates, in the shape
    /// [`build_crl`] accepts.
    pub revoked: Vec<(String, OffsetDateTime)>,
}

/// Builds a CRL signed by the CA, as PEM ("X509 CRL").
///
/// `revoked` lists `(serial, revoked_at)`; serials are hex, with or without
/// `:` separators, any case. An empty list gives a valid empty CRL. The CRL
/// carries the CA's authority key identifier and `crl_number`, which should
/// grow with every CRL the CA publishes. `next_update` must be later than
/// `this_update`.
pub fn build_crl<S: AsRef<str>>(
    signer: &CaSigner,
    revoked: &[(S, OffsetDateTime)],
    crl_number: u64,
    this_update: OffsetDateTime,
    next_update: OffsetDateTime,
) -> Result<String> {
    let (this_update, next_update) =
        time_window(this_update, next_update, ("this_update", "next_update"))?;
    let revoked_certs = revoked
        .iter()
        .map(|(serial, at)| {
            Ok(RevokedCertParams {
                serial_number: SerialNumber::from_slice(&serial_from_hex(serial.as_ref())?),
                revocation_time: normalize_time(*at, "revocation time")?,
                reason_code: None,
                invalidity_date: None,
            })
        })
        .collect::<Result<Vec<_>>>()?;

    // Use the CA certificate's own subject key identifier so that the CRL's
    // authority key identifier matches it even when the CA was made by
    // another tool with another key identifier method.
    let key_identifier_method = match &signer.key_id {
        Some(id) => KeyIdMethod::PreSpecified(id.clone()),
        None => KeyIdMethod::Sha256,
    };
    let params = CertificateRevocationListParams {
        this_update,
        next_update,
        crl_number: SerialNumber::from(crl_number),
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method,
    };
    let crl = params.signed_by(&signer.issuer).map_err(|e| match e {
        rcgen::Error::IssuerNotCrlSigner => {
            PkiError::NotACa("keyUsage does not include cRLSign".to_string())
        }
        other => PkiError::Rcgen(other),
    })?;
    Ok(crl.pem()?)
}

/// Reads the first X509 CRL block of `pem`. Does not check the signature.
pub fn parse_crl_pem(pem: &str) -> Result<CrlInfo> {
    let (_, der) = read_pem(pem, "a certificate revocation list (X509 CRL)", |k| {
        k == SectionKind::Crl
    })?;
    parse_crl_der(&der)
}

/// Reads a DER CRL. Does not check the signature.
pub fn parse_crl_der(der: &[u8]) -> Result<CrlInfo> {
    let (rest, crl) = CertificateRevocationList::from_der(der)
        .map_err(|e| PkiError::BadCrl(format!("not a DER X.509 CRL ({e})")))?;
    if !rest.is_empty() {
        return Err(PkiError::BadCrl(format!(
            "{} unexpected bytes after the CRL",
            rest.len()
        )));
    }
    let crl_number = match crl.crl_number() {
        None => None,
        Some(n) => match n.to_u64_digits().as_slice() {
            [] => Some(0),
            [v] => Some(*v),
            _ => return Err(PkiError::BadCrl("CRL number exceeds 64 bits".to_string())),
        },
    };
    let revoked: Vec<(String, OffsetDateTime)> = crl
        .iter_revoked_certificates()
        .map(|r| {
            (
                serial_to_hex(r.raw_serial()),
                r.revocation_date.to_datetime(),
            )
        })
        .collect();
    Ok(CrlInfo {
        issuer_cn: first_cn(crl.issuer()),
        crl_number,
        this_update: crl.last_update().to_datetime(),
        next_update: crl.next_update().map(|t| t.to_datetime()),
        revoked_serials: revoked.iter().map(|(s, _)| s.clone()).collect(),
        revoked,
    })
}
