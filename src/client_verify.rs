//! A client-certificate verifier that remembers the chains it already accepted.
//!
//! Checking a client chain costs one ECDSA verify (the CA's signature, ~57 µs on P-256) plus
//! path building and the CRL lookup: about a third of the server's handshake CPU. Clients
//! reconnect with the same certificate all day (libpq opens a new TLS session per connection),
//! so the answer is worth keeping. The proof of possession, the client's CertificateVerify
//! signature over this very handshake, is still checked on every connection.
//!
//! Why a remembered answer is the right answer: webpki's verdict depends only on the presented
//! certificates, the trust anchors, the CRLs and the time. The presented certificates are the
//! cache key, compared byte for byte. Anchors and CRLs are fixed for one verifier: a reload
//! (new CA, new CRL after a revocation) builds a new verifier with an empty cache, so a
//! revocation takes effect on the very next handshake. Time enters through the validity periods
//! (CRL expiry is not enforced by the inner verifier), so a remembered chain is used only while
//! `now` lies inside every presented certificate's validity period; outside it, the inner
//! verifier decides again. Only accepted chains are stored, so a peer without a valid
//! certificate cannot grow the cache.
//!
//! Besides the CRLs, the verifier refuses a fixed set of end-entity serials as revoked: those
//! of the certificate records marked `revoked_at`. So the handshake, `/status` and live
//! enforcement agree on one set (`DatabaseRuntime::is_revoked`) even when the CRL lacks an
//! entry the records have.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};

use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, Error, SignatureScheme};
use rustls_pki_types::{CertificateDer, UnixTime};

/// Distinct accepted chains kept per verifier. A full cache is emptied rather than managed:
/// reaching this many distinct valid certificates between two reloads is rare, and a miss only
/// costs the full check.
const MAX_ENTRIES: usize = 1024;

/// Seconds since the epoch, inclusive on both ends, like webpki's own check.
#[derive(Debug, Clone, Copy)]
struct Window {
    not_before: u64,
    not_after: u64,
}

impl Window {
    fn contains(&self, now: UnixTime) -> bool {
        let now = now.as_secs();
        self.not_before <= now && now <= self.not_after
    }
}

#[derive(Debug)]
pub struct CachingClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    accepted: Mutex<HashMap<Vec<u8>, Window>>,
    /// End-entity serials (lowercase hex, as `tls_store::serial_hex`) refused as revoked
    /// besides what the inner verifier's CRLs say: the certificate records marked
    /// `revoked_at`, so that a CRL missing an entry does not let a revoked certificate back.
    refused: HashSet<String>,
}

impl CachingClientVerifier {
    pub fn new(inner: Arc<dyn ClientCertVerifier>) -> Self {
        Self {
            inner,
            accepted: Mutex::new(HashMap::new()),
            refused: HashSet::new(),
        }
    }

    /// Also refuses end-entity certificates with these serials, as revoked. Fixed for the
    /// verifier's lifetime like the CRLs, so a remembered chain was checked against them.
    pub fn refusing(mut self, serials: HashSet<String>) -> Self {
        self.refused = serials;
        self
    }

    /// Whether the end-entity certificate's serial is refused. A certificate that does not
    /// parse is left to the inner verifier, which refuses it.
    fn is_refused(&self, end_entity: &CertificateDer<'_>) -> bool {
        if self.refused.is_empty() {
            return false;
        }
        x509_parser::parse_x509_certificate(end_entity.as_ref()).is_ok_and(|(_, cert)| {
            self.refused
                .contains(&crate::tls_store::serial_hex(cert.raw_serial()))
        })
    }

    fn lookup(&self, key: &[u8], now: UnixTime) -> bool {
        let map = self.accepted.lock().unwrap_or_else(PoisonError::into_inner);
        map.get(key).is_some_and(|w| w.contains(now))
    }

    fn remember(&self, key: Vec<u8>, window: Window) {
        let mut map = self.accepted.lock().unwrap_or_else(PoisonError::into_inner);
        if map.len() >= MAX_ENTRIES && !map.contains_key(&key) {
            map.clear();
        }
        map.insert(key, window);
    }
}

/// The presented chain as one byte string; length prefixes keep two different chains from
/// concatenating to the same key.
fn chain_key(end_entity: &CertificateDer<'_>, intermediates: &[CertificateDer<'_>]) -> Vec<u8> {
    let total: usize = intermediates.iter().map(|c| c.len() + 4).sum::<usize>() + end_entity.len();
    let mut key = Vec::with_capacity(total + 4);
    for cert in std::iter::once(end_entity).chain(intermediates) {
        key.extend_from_slice(&(cert.len() as u32).to_be_bytes());
        key.extend_from_slice(cert.as_ref());
    }
    key
}

/// The intersection of the certificates' validity periods; `None` if one does not parse or
/// the periods do not overlap (then nothing is remembered).
fn common_window(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
) -> Option<Window> {
    let mut window = Window {
        not_before: 0,
        not_after: u64::MAX,
    };
    for cert in std::iter::once(end_entity).chain(intermediates) {
        let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
        let validity = parsed.validity();
        let nb = u64::try_from(validity.not_before.timestamp()).unwrap_or(0);
        let na = u64::try_from(validity.not_after.timestamp()).ok()?;
        window.not_before = window.not_before.max(nb);
        window.not_after = window.not_after.min(na);
    }
    (window.not_before <= window.not_after).then_some(window)
}

impl ClientCertVerifier for CachingClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let key = chain_key(end_entity, intermediates);
        if self.lookup(&key, now) {
            return Ok(ClientCertVerified::assertion());
        }
        // Only accepted chains are remembered, so a refused serial never reaches the cache.
        if self.is_refused(end_entity) {
            return Err(Error::InvalidCertificate(rustls::CertificateError::Revoked));
        }
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        if let Some(window) = common_window(end_entity, intermediates) {
            self.remember(key, window);
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The same verifier for a client that may present no certificate at all: an address only a
/// trusted range admits. A certificate that is presented goes through the inner verifier
/// unchanged (chain, validity, CRL, revoked records), so a bad one is still refused.
#[derive(Debug)]
pub struct CertificateOptional {
    inner: Arc<CachingClientVerifier>,
}

impl CertificateOptional {
    pub fn new(inner: Arc<CachingClientVerifier>) -> Self {
        Self { inner }
    }
}

impl ClientCertVerifier for CertificateOptional {
    fn offer_client_auth(&self) -> bool {
        // Still asked for, so a client that has one can show it (and be named in the log).
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use rustls::server::WebPkiClientVerifier;
    use rustls::RootCertStore;
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateRevocationListDer;

    use super::*;
    use crate::pki::{create_ca, issue_client, CaSigner, KeyType};
    use crate::tls_store::provider;

    /// Counts how often the real verifier is asked.
    #[derive(Debug)]
    struct Counting {
        inner: Arc<dyn ClientCertVerifier>,
        calls: AtomicUsize,
    }

    impl ClientCertVerifier for Counting {
        fn root_hint_subjects(&self) -> &[DistinguishedName] {
            self.inner.root_hint_subjects()
        }
        fn verify_client_cert(
            &self,
            e: &CertificateDer<'_>,
            i: &[CertificateDer<'_>],
            now: UnixTime,
        ) -> Result<ClientCertVerified, Error> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            self.inner.verify_client_cert(e, i, now)
        }
        fn verify_tls12_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, Error> {
            self.inner.verify_tls12_signature(m, c, d)
        }
        fn verify_tls13_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, Error> {
            self.inner.verify_tls13_signature(m, c, d)
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.inner.supported_verify_schemes()
        }
    }

    fn verifier_for(
        ca_pem: &str,
        crls: Vec<CertificateRevocationListDer<'static>>,
    ) -> (Arc<Counting>, CachingClientVerifier) {
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
            .unwrap();
        let webpki = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .with_crls(crls)
            .only_check_end_entity_revocation()
            .build()
            .unwrap();
        let counting = Arc::new(Counting {
            inner: webpki,
            calls: AtomicUsize::new(0),
        });
        let caching = CachingClientVerifier::new(counting.clone());
        (counting, caching)
    }

    fn at(t: time::OffsetDateTime) -> UnixTime {
        UnixTime::since_unix_epoch(Duration::from_secs(
            u64::try_from(t.unix_timestamp()).unwrap(),
        ))
    }

    #[test]
    fn an_accepted_chain_is_checked_once_and_only_inside_its_validity() {
        let ca = create_ca("cache ca", KeyType::EcdsaP256, time::Duration::days(30)).unwrap();
        let signer = CaSigner::from_issued(&ca).unwrap();
        let now = time::OffsetDateTime::now_utc();
        let start = now - time::Duration::hours(1);
        let end = now + time::Duration::days(2);
        let client = issue_client(&signer, "app", KeyType::EcdsaP256, start, end).unwrap();
        let leaf = CertificateDer::from_pem_slice(client.cert_pem.as_bytes()).unwrap();
        let (count, v) = verifier_for(&ca.cert_pem, Vec::new());

        v.verify_client_cert(&leaf, &[], at(now)).unwrap();
        v.verify_client_cert(&leaf, &[], at(now)).unwrap();
        v.verify_client_cert(&leaf, &[], at(now + time::Duration::days(1)))
            .unwrap();
        assert_eq!(count.calls.load(Ordering::SeqCst), 1, "hits skip the check");

        // Past the certificate's end the real verifier decides again, and says expired.
        let late = v.verify_client_cert(&leaf, &[], at(end + time::Duration::seconds(1)));
        assert!(
            matches!(
                late,
                Err(Error::InvalidCertificate(
                    rustls::CertificateError::Expired
                        | rustls::CertificateError::ExpiredContext { .. }
                ))
            ),
            "{late:?}"
        );
        assert_eq!(count.calls.load(Ordering::SeqCst), 2);
        // Before its start, likewise.
        let early = v.verify_client_cert(&leaf, &[], at(start - time::Duration::seconds(1)));
        assert!(early.is_err(), "{early:?}");
        assert_eq!(count.calls.load(Ordering::SeqCst), 3);

        // The same leaf presented with an extra certificate is a different chain.
        let ca_der = CertificateDer::from_pem_slice(ca.cert_pem.as_bytes()).unwrap();
        let _ = v.verify_client_cert(&leaf, &[ca_der], at(now));
        assert_eq!(count.calls.load(Ordering::SeqCst), 4);
    }

    #[test]
    fn a_rejected_chain_is_never_remembered() {
        let ours = create_ca("ours", KeyType::EcdsaP256, time::Duration::days(30)).unwrap();
        let other = create_ca("other", KeyType::EcdsaP256, time::Duration::days(30)).unwrap();
        let now = time::OffsetDateTime::now_utc();
        let foreign = issue_client(
            &CaSigner::from_issued(&other).unwrap(),
            "intruder",
            KeyType::EcdsaP256,
            now - time::Duration::hours(1),
            now + time::Duration::days(1),
        )
        .unwrap();
        let leaf = CertificateDer::from_pem_slice(foreign.cert_pem.as_bytes()).unwrap();
        let (count, v) = verifier_for(&ours.cert_pem, Vec::new());
        for _ in 0..3 {
            assert!(v.verify_client_cert(&leaf, &[], at(now)).is_err());
        }
        assert_eq!(count.calls.load(Ordering::SeqCst), 3);
        assert!(v.accepted.lock().unwrap().is_empty());
    }

    #[test]
    fn a_full_cache_starts_over_and_keeps_answering_correctly() {
        let ca = create_ca("full", KeyType::EcdsaP256, time::Duration::days(30)).unwrap();
        let (_, v) = verifier_for(&ca.cert_pem, Vec::new());
        let window = Window {
            not_before: 0,
            not_after: u64::MAX,
        };
        for i in 0..MAX_ENTRIES {
            v.remember(i.to_be_bytes().to_vec(), window);
        }
        assert_eq!(v.accepted.lock().unwrap().len(), MAX_ENTRIES);
        v.remember(b"one more".to_vec(), window);
        assert_eq!(v.accepted.lock().unwrap().len(), 1);
        assert!(v.lookup(b"one more", UnixTime::now()));
        assert!(!v.lookup(&0usize.to_be_bytes(), UnixTime::now()));
    }

    #[test]
    fn a_refused_serial_is_revoked_although_no_crl_lists_it() {
        let ca = create_ca("refusing", KeyType::EcdsaP256, time::Duration::days(30)).unwrap();
        let signer = CaSigner::from_issued(&ca).unwrap();
        let now = time::OffsetDateTime::now_utc();
        let (start, end) = (
            now - time::Duration::hours(1),
            now + time::Duration::days(2),
        );
        let revoked = issue_client(&signer, "gone", KeyType::EcdsaP256, start, end).unwrap();
        let kept = issue_client(&signer, "kept", KeyType::EcdsaP256, start, end).unwrap();
        let (count, v) = verifier_for(&ca.cert_pem, Vec::new());
        let v = v.refusing([revoked.serial.clone()].into_iter().collect());
        let leaf = CertificateDer::from_pem_slice(revoked.cert_pem.as_bytes()).unwrap();
        for _ in 0..2 {
            assert!(matches!(
                v.verify_client_cert(&leaf, &[], at(now)),
                Err(Error::InvalidCertificate(rustls::CertificateError::Revoked))
            ));
        }
        assert!(v.accepted.lock().unwrap().is_empty());
        let other = CertificateDer::from_pem_slice(kept.cert_pem.as_bytes()).unwrap();
        v.verify_client_cert(&other, &[], at(now)).unwrap();
        assert_eq!(count.calls.load(Ordering::SeqCst), 1);
    }
}
