#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, ServerName, UnixTime};
use time::macros::datetime;
use time::{Duration, OffsetDateTime};

use super::*;

// ---------------------------------------------------------------------------
// Helpers

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn new_ca(key_type: KeyType) -> (Issued, CaSigner) {
    let ca = create_ca("test CA", key_type, DEFAULT_CA_VALIDITY).unwrap();
    let signer = CaSigner::from_issued(&ca).unwrap();
    (ca, signer)
}

fn client(signer: &CaSigner, cn: &str, key_type: KeyType) -> Issued {
    let (not_before, not_after) = client_validity(OffsetDateTime::now_utc());
    issue_client(signer, cn, key_type, not_before, not_after).unwrap()
}

fn der(pem: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
}

fn roots(signer: &CaSigner) -> Arc<RootCertStore> {
    let mut roots = RootCertStore::empty();
    roots.add(signer.cert_der().clone()).unwrap();
    Arc::new(roots)
}

fn client_verifier(signer: &CaSigner, crls: &[&str]) -> Arc<dyn ClientCertVerifier> {
    let crls = crls
        .iter()
        .map(|pem| CertificateRevocationListDer::from_pem_slice(pem.as_bytes()).unwrap())
        .collect::<Vec<_>>();
    WebPkiClientVerifier::builder_with_provider(roots(signer), provider())
        .with_crls(crls)
        .build()
        .unwrap()
}

fn verify_client(verifier: &dyn ClientCertVerifier, cert: &Issued) -> Result<(), rustls::Error> {
    verifier
        .verify_client_cert(&der(&cert.cert_pem), &[], UnixTime::now())
        .map(|_| ())
}

fn cert_error(result: Result<(), rustls::Error>) -> CertificateError {
    match result {
        Err(rustls::Error::InvalidCertificate(e)) => e,
        other => panic!("expected a certificate error, got {other:?}"),
    }
}

/// Minimal PEM encoder for building test inputs.
fn pem_encode(label: &str, der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::new();
    for chunk in der.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                b64.push('=');
            }
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn pem_body(pem: &str) -> Vec<u8> {
    <(rustls_pki_types::pem::SectionKind, Vec<u8>)>::from_pem_slice(pem.as_bytes())
        .unwrap()
        .1
}

fn public_key_of_pkcs8(pkcs8: &[u8]) -> Vec<u8> {
    use rcgen::PublicKeyData;
    let key = rcgen::KeyPair::try_from(pkcs8).unwrap();
    key.der_bytes().to_vec()
}

fn public_key_of_cert(cert_pem: &str) -> Vec<u8> {
    let der = der(cert_pem);
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    cert.public_key().subject_public_key.data.to_vec()
}

// ---------------------------------------------------------------------------
// Client certificates and the rustls client verifier

#[test]
fn client_cert_from_the_ca_is_accepted_by_webpki_client_verifier() {
    let (_, signer) = new_ca(KeyType::EcdsaP256);
    let alice = client(&signer, "alice", KeyType::EcdsaP256);
    verify_client(&*client_verifier(&signer, &[]), &alice).unwrap();
}

#[test]
fn every_key_type_issues_certificates_webpki_accepts() {
    for key_type in KeyType::ALL {
        let (ca, signer) = new_ca(key_type);
        assert!(ca.key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        let info = inspect_cert_pem(&ca.cert_pem).unwrap();
        assert_eq!(info.key_algorithm, key_type.as_str());

        let alice = client(&signer, "alice", key_type);
        let info = inspect_cert_pem(&alice.cert_pem).unwrap();
        assert_eq!(info.key_algorithm, key_type.as_str(), "{key_type}");
        assert!(key_matches_cert(&alice.cert_pem, &alice.key_pem).unwrap());
        verify_client(&*client_verifier(&signer, &[]), &alice)
            .unwrap_or_else(|e| panic!("{key_type}: {e}"));

        let server = issue_server(
            &signer,
            &["db.example.com".to_string()],
            key_type,
            DEFAULT_SERVER_VALIDITY,
        )
        .unwrap();
        WebPkiServerVerifier::builder_with_provider(roots(&signer), provider())
            .build()
            .unwrap()
            .verify_server_cert(
                &der(&server.cert_pem),
                &[],
                &ServerName::try_from("db.example.com").unwrap(),
                &[],
                UnixTime::now(),
            )
            .unwrap_or_else(|e| panic!("{key_type}: {e}"));
    }
}

#[test]
fn a_ca_of_one_key_type_signs_leaves_of_another() {
    let (_, signer) = new_ca(KeyType::EcdsaP384);
    let alice = client(&signer, "alice", KeyType::Rsa2048);
    verify_client(&*client_verifier(&signer, &[]), &alice).unwrap();
    let (_, signer) = new_ca(KeyType::Rsa2048);
    let bob = client(&signer, "bob", KeyType::EcdsaP256);
    verify_client(&*client_verifier(&signer, &[]), &bob).unwrap();
}

#[test]
fn revoked_client_is_rejected_while_another_client_still_passes() {
    let (_, signer) = new_ca(KeyType::EcdsaP256);
    let alice = client(&signer, "alice", KeyType::EcdsaP256);
    let bob = client(&signer, "bob", KeyType::EcdsaP256);
    let now = OffsetDateTime::now_utc();
    let crl = build_crl(
        &signer,
        &[(alice.serial.as_str(), now)],
        1,
        now,
        now + Duration::days(7),
    )
    .unwrap();
    assert!(crl.starts_with("-----BEGIN X509 CRL-----"));

    let verifier = client_verifier(&signer, &[&crl]);
    assert_eq!(
        cert_error(verify_client(&*verifier, &alice)),
        CertificateError::Revoked
    );
    verify_client(&*verifier, &bob).unwrap();
}

#[test]
fn crl_serials_may_be_written_with_colons_and_upper_case() {
    let (_, signer) = new_ca(KeyType::EcdsaP256);
    let alice = client(&signer, "alice", KeyType::EcdsaP256);
    let shouted = alice
        .serial
        .to_uppercase()
        .as_bytes()
        .chunks(2)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect::<Vec<_>>()
        .join(":");
    let now = OffsetDateTime::now_utc();
    let crl = build_crl(&signer, &[(shouted, now)], 2, now, now + Duration::days(1)).unwrap();
    assert_eq!(
        parse_crl_pem(&crl).unwrap().revoked_serials,
        std::slice::from_ref(&alice.serial)
    );
    assert_eq!(
        cert_error(verify_client(&*client_verifier(&signer, &[&crl]), &alice)),
        CertificateError::Revoked
    );
}

#[test]
fn empty_crl_is_valid_and_clients_pass() {
    let (_, signer) = new_ca(KeyType::EcdsaP256);
    let alice = client(&signer, "alice", KeyType::EcdsaP256);
    let now = OffsetDateTime::now_utc();
    let crl = build_crl::<&str>(&signer, &[], 1, now, now + Duration::days(7)).unwrap();
    let info = parse_crl_pem(&crl).unwrap();
    assert!(info.revoked_serials.is_empty());
    assert_eq!(info.crl_number, Some(1));
    verify_client(&*client_verifier(&signer, &[&crl]), &alice).unwrap();
}

#[test]
fn crl_from_an_rsa_ca_is_accepted_by_rustls() {
    let (_, signer) = new_ca(KeyType::Rsa2048);
    let alice = client(&signer, "alice", KeyType::EcdsaP256);
    let bob = client(&signer, "bob", KeyType::EcdsaP256);
    let now = OffsetDateTime::now_utc();
    let crl = build_crl(
        &signer,
        &[(&bob.serial, now)],
        9,
        now,
        now + Duration::days(1),
    )
    .unwrap();
    let verifier = client_verifier(&signer, &[&crl]);
    verify_client(&*verifier, &alice).unwrap();
    assert_eq!(
        cert_error(verify_client(&*verifier, &bob)),
        CertificateError::Revoked
    );
}

#[test]
fn client_cert_from_another_ca_is_rejected_as_unknown_issuer() {
    let (_, signer) = new_ca(KeyType::EcdsaP256);
    let other = create_ca("other CA", KeyType::EcdsaP256, DEFAULT_CA_VALIDITY).unwrap();
    let other = CaSigner::from_issued(&other).unwrap();
    let mallory = client(&other, "alice", KeyType::EcdsaP256);
    assert_eq!(
        cert_error(verify_client(&*client_verifier(&signer, &[]), &mallory)),
        CertificateError::UnknownIssuer
    );
}

#[test]
fn client_cert_from_another_ca_with_the_same_name_is_rejected_as_bad_signature() {
    // webpki links certificates to CAs by name; a different CA that happens
    // to share the name is found, and its signature check fails.
    let (_, signer) = new_ca(KeyType::EcdsaP256);
    let (_, twin) = new_ca(KeyType::EcdsaP256);
    let mallory = client(&twin, "alice", KeyType::EcdsaP256);
    assert_eq!(
        cert_error(verify_client(&*client_verifier(&signer, &[]), &mallory)),
        CertificateError::BadSignature
    );
}

#[test]
fn expired_client_cert_is_rejected_as_expired() {
    let (_, signer) = new_ca(KeyType::EcdsaP256);
    let now = OffsetDateTime::now_utc();
    let old = issue_client(
        &signer,
        "alice",
        KeyType::EcdsaP256,
        now - Duration::days(400),
        now - Duration::days(30),
    )
    .unwrap();
    let err = cert_error(verify_client(&*client_verifier(&signer, &[]), &old));
    assert!(
        matches!(
            err,
            CertificateError::Expired | CertificateError::ExpiredContext { .. }
        ),
        "{err:?}"
    );
}

#[test]
fn client_cert_has_the_requested_identity_and_dates() {
    let (ca, signer) = new_ca(KeyType::EcdsaP256);
    let not_before = datetime!(2025-01-31 10:20:30.999 UTC);
    let not_after = add_months(not_before, 13);
    let alice = issue_client(&signer, "alice", KeyType::EcdsaP256, not_before, not_after).unwrap();
    let info = inspect_cert_pem(&alice.cert_pem).unwrap();
    assert_eq!(info.subject_cn.as_deref(), Some("alice"));
    assert_eq!(info.issuer_cn.as_deref(), Some("test CA"));
    assert_eq!(info.serial, alice.serial);
    assert_eq!(alice.not_before, datetime!(2025-01-31 10:20:30 UTC));
    assert_eq!(alice.not_after, datetime!(2026-02-28 10:20:30 UTC));
    assert_eq!(info.not_before, alice.not_before);
    assert_eq!(info.not_after, alice.not_after);
    assert!(!info.is_ca);
    assert!(info.sans.is_empty());
    // 16 random bytes, positive, always 32 hex digits.
    assert_eq!(alice.serial.len(), 32);
    assert!(alice
        .serial
        .chars()
        .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)));
    assert_ne!(alice.serial, ca.serial);
    let again = issue_client(&signer, "alice", KeyType::EcdsaP256, not_before, not_after).unwrap();
    assert_ne!(alice.serial, again.serial);
}

#[test]
fn client_cert_dates_in_other_offsets_are_converted_to_utc() {
    let (_, signer) = new_ca(KeyType::EcdsaP256);
    let alice = issue_client(
        &signer,
        "alice",
        KeyType::EcdsaP256,
        datetime!(2025-06-01 00:30 +02:00),
        datetime!(2026-06-01 00:30 +02:00),
    )
    .unwrap();
    assert_eq!(alice.not_before, datetime!(2025-05-31 22:30 UTC));
    assert_eq!(
        inspect_cert_pem(&alice.cert_pem).unwrap().not_before,
        alice.not_before
    );
}

#[test]
fn client_cert_is_cut_at_the_ca_expiry() {
    let ca = create_ca("short CA", KeyType::EcdsaP256, Duration::days(30)).unwrap();
    let signer = CaSigner::from_issued(&ca).unwrap();
    let alice = client(&signer, "alice", KeyType::EcdsaP256);
    assert_eq!(alice.not_after, ca.not_after);

    let now = OffsetDateTime::now_utc();
    let err = issue_client(
        &signer,
        "alice",
        KeyType::EcdsaP256,
        now + Duration::days(60),
        now + Duration::days(90),
    )
    .unwrap_err();
    assert!(matches!(err, PkiError::BadValidity(_)), "{err}");
}

#[test]
fn client_cert_validity_must_be_a_forward_window_in_encodable_years() {
    let (_, signer) = new_ca(KeyType::EcdsaP256);
    let now = OffsetDateTime::now_utc();
    for (nb, na) in [
        (now, now),
        (now, now - Duration::days(1)),
        (datetime!(1900-01-01 0:00 UTC), now),
    ] {
        let err = issue_client(&signer, "alice", KeyType::EcdsaP256, nb, na).unwrap_err();
        assert!(matches!(err, PkiError::BadValidity(_)), "{err}");
    }
}

#[test]
fn client_common_names_are_checked() {
    let (_, signer) = new_ca(KeyType::EcdsaP256);
    let (nb, na) = client_validity(OffsetDateTime::now_utc());
    let long = "x".repeat(65);
    // A byte over PostgreSQL's 63-byte role names, in ASCII and in two-byte characters.
    let over = format!("{}b", "a".repeat(63));
    let wide = "é".repeat(32);
    for cn in ["", "  ", "bad\nname", &long, &over, &wide] {
        let err = issue_client(&signer, cn, KeyType::EcdsaP256, nb, na).unwrap_err();
        assert!(matches!(err, PkiError::BadName { .. }), "{err}");
    }
    assert!(issue_client(&signer, &"a".repeat(63), KeyType::EcdsaP256, nb, na).is_ok());
    // Non-ASCII user names are fine; PostgreSQL role names can be any text.
    let user = issue_client(&signer, "jürgen", KeyType::EcdsaP256, nb, na).unwrap();
    assert_eq!(
        inspect_cert_pem(&user.cert_pem)
            .unwrap()
            .subject_cn
            .as_deref(),
        Some("jürgen")
    );
}

// ---------------------------------------------------------------------------
// CA

#[test]
fn ca_certificate_is_a_path_length_zero_ca_with_key_identifier() {
    let (ca, signer) = new_ca(KeyType::EcdsaP256);
    let der = der(&ca.cert_pem);
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    let bc = cert.basic_constraints().unwrap().unwrap();
    assert!(bc.critical);
    assert!(bc.value.ca);
    assert_eq!(bc.value.path_len_constraint, Some(0));
    let ku = cert.key_usage().unwrap().unwrap().value;
    assert!(ku.key_cert_sign() && ku.crl_sign() && !ku.digital_signature());
    assert!(signer.key_id.is_some());
    let info = signer.info();
    assert!(info.is_ca);
    assert_eq!(info.serial, ca.serial);
    let lifetime = ca.not_after - ca.not_before;
    assert_eq!(lifetime, DEFAULT_CA_VALIDITY + BACKDATE);
}

#[test]
fn ca_signer_rejects_a_leaf_certificate() {
    let (_, signer) = new_ca(KeyType::EcdsaP256);
    let alice = client(&signer, "alice", KeyType::EcdsaP256);
    let err = CaSigner::from_pem(&alice.cert_pem, &alice.key_pem).unwrap_err();
    assert!(matches!(err, PkiError::NotACa(_)), "{err}");
}

#[test]
fn ca_signer_rejects_a_key_that_is_not_the_cas() {
    let (ca, _) = new_ca(KeyType::EcdsaP256);
    let (other, _) = new_ca(KeyType::EcdsaP256);
    let err = CaSigner::from_pem(&ca.cert_pem, &other.key_pem).unwrap_err();
    assert!(matches!(err, PkiError::KeyMismatch), "{err}");
    let (rsa, _) = new_ca(KeyType::Rsa2048);
    let err = CaSigner::from_pem(&ca.cert_pem, &rsa.key_pem).unwrap_err();
    assert!(matches!(err, PkiError::KeyMismatch), "{err}");
}

#[test]
fn ca_signer_accepts_sec1_and_pkcs1_keys() {
    let (ca, _) = new_ca(KeyType::EcdsaP256);
    let sec1 = pkcs8_to_sec1_pem(&pem_body(&ca.key_pem));
    let signer = CaSigner::from_pem(&ca.cert_pem, &sec1).unwrap();
    verify_client(
        &*client_verifier(&signer, &[]),
        &client(&signer, "alice", KeyType::EcdsaP256),
    )
    .unwrap();

    let (ca, _) = new_ca(KeyType::Rsa2048);
    let pkcs1 = pem_encode("RSA PRIVATE KEY", &pkcs8_inner_key(&pem_body(&ca.key_pem)));
    let signer = CaSigner::from_pem(&ca.cert_pem, &pkcs1).unwrap();
    verify_client(
        &*client_verifier(&signer, &[]),
        &client(&signer, "alice", KeyType::EcdsaP256),
    )
    .unwrap();
}

// ---------------------------------------------------------------------------
// Server certificates

#[test]
fn server_cert_verifies_for_its_dns_name_and_ip() {
    let (_, signer) = new_ca(KeyType::EcdsaP256);
    let names = vec![
        "db.example.com".to_string(),
        "10.1.2.3".to_string(),
        "::1".to_string(),
        "*.pool.example.com".to_string(),
    ];
    let server =
        issue_server(&signer, &names, KeyType::EcdsaP256, DEFAULT_SERVER_VALIDITY).unwrap();
    let verifier = WebPkiServerVerifier::builder_with_provider(roots(&signer), provider())
        .build()
        .unwrap();
    let verify = |name: &str| {
        verifier
            .verify_server_cert(
                &der(&server.cert_pem),
                &[],
                &ServerName::try_from(name.to_string()).unwrap(),
                &[],
                UnixTime::now(),
            )
            .map(|_| ())
    };
    for good in ["db.example.com", "10.1.2.3", "::1", "a.pool.example.com"] {
        verify(good).unwrap_or_else(|e| panic!("{good}: {e}"));
    }
    for bad in ["other.example.com", "10.1.2.4", "example.com"] {
        let err = cert_error(verify(bad));
        assert!(
            matches!(
                err,
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. }
            ),
            "{bad}: {err:?}"
        );
    }

    // A server certificate is not a client certificate.
    let err = cert_error(verify_client(&*client_verifier(&signer, &[]), &server));
    assert!(
        matches!(
            err,
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. }
        ),
        "{err:?}"
    );

    let info = inspect_cert_pem(&server.cert_pem).unwrap();
    assert_eq!(info.subject_cn.as_deref(), Some("db.example.com"));
    assert_eq!(info.sans, names);
    assert_eq!(
        server.not_after - server.not_before,
        DEFAULT_SERVER_VALIDITY + BACKDATE
    );
}

#[test]
fn server_cert_without_names_is_called_pgmtls_server() {
    let (_, signer) = new_ca(KeyType::EcdsaP256);
    let server = issue_server(&signer, &[], KeyType::EcdsaP256, Duration::days(1)).unwrap();
    let info = inspect_cert_pem(&server.cert_pem).unwrap();
    assert_eq!(info.subject_cn.as_deref(), Some(DEFAULT_SERVER_CN));
    assert!(info.sans.is_empty());
}

#[test]
fn server_names_are_validated() {
    let (_, signer) = new_ca(KeyType::EcdsaP256);
    for bad in ["", "has space.example", "bücher.example", "a..b", "*"] {
        let err = issue_server(
            &signer,
            &[bad.to_string()],
            KeyType::EcdsaP256,
            Duration::days(1),
        )
        .unwrap_err();
        assert!(matches!(err, PkiError::BadName { .. }), "{bad:?}: {err}");
    }
}

// ---------------------------------------------------------------------------
// CRLs

#[test]
fn crl_parses_back_to_what_was_built() {
    let (_, signer) = new_ca(KeyType::EcdsaP256);
    let this_update = datetime!(2025-03-01 12:00 UTC);
    let next_update = datetime!(2025-03-08 12:00 UTC);
    let revoked = [
        ("0a1b".to_string(), datetime!(2025-02-01 0:00 UTC)),
        (
            "7fffffffffffffffffffffffffffffff".to_string(),
            datetime!(2025-02-02 0:00 UTC),
        ),
        ("00ff".to_string(), datetime!(2025-02-03 0:00 UTC)),
    ];
    let crl = build_crl(&signer, &revoked, u64::MAX, this_update, next_update).unwrap();
    let info = parse_crl_pem(&crl).unwrap();
    assert_eq!(info.crl_number, Some(u64::MAX));
    assert_eq!(info.issuer_cn.as_deref(), Some("test CA"));
    assert_eq!(info.this_update, this_update);
    assert_eq!(info.next_update, Some(next_update));
    assert_eq!(
        info.revoked_serials,
        ["a1b", "7fffffffffffffffffffffffffffffff", "ff"]
    );
    assert_eq!(info.revoked[0], ("a1b".to_string(), revoked[0].1));

    // The CRL's authority key identifier is the CA's subject key identifier.
    let der = CertificateRevocationListDer::from_pem_slice(crl.as_bytes()).unwrap();
    let (_, parsed) = x509_parser::parse_x509_crl(&der).unwrap();
    let aki = parsed
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            x509_parser::extensions::ParsedExtension::AuthorityKeyIdentifier(aki) => {
                aki.key_identifier.as_ref().map(|k| k.0.to_vec())
            }
            _ => None,
        })
        .unwrap();
    assert_eq!(Some(aki), signer.key_id);
    // And it is signed by the CA.
    let ca_der = signer.cert_der().clone();
    let (_, ca) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
    parsed.verify_signature(ca.public_key()).unwrap();
}

#[test]
fn crl_rejects_bad_serials_and_windows() {
    let (_, signer) = new_ca(KeyType::EcdsaP256);
    let now = OffsetDateTime::now_utc();
    let later = now + Duration::days(1);
    for bad in ["", "xyz", "0", "00:00", &"ab".repeat(21)] {
        let err = build_crl(&signer, &[(bad, now)], 1, now, later).unwrap_err();
        assert!(matches!(err, PkiError::BadSerial(_)), "{bad:?}: {err}");
    }
    let err = build_crl::<&str>(&signer, &[], 1, now, now).unwrap_err();
    assert!(matches!(err, PkiError::BadValidity(_)), "{err}");
    let err = build_crl::<&str>(&signer, &[], 1, later, now).unwrap_err();
    assert!(err.to_string().contains("next_update"), "{err}");
}

#[test]
fn crl_dates_near_2050_in_other_offsets_do_not_panic() {
    // 2049-12-31 23:00 -05:00 is 2050-01-01 04:00 UTC: it must be written
    // as GeneralizedTime, which only happens if the date is converted to
    // UTC before encoding.
    let (_, signer) = new_ca(KeyType::EcdsaP256);
    let next = datetime!(2049-12-31 23:00 -05:00);
    let crl = build_crl::<&str>(&signer, &[], 1, OffsetDateTime::now_utc(), next).unwrap();
    assert_eq!(parse_crl_pem(&crl).unwrap().next_update, Some(next));
}

// ---------------------------------------------------------------------------
// add_months

#[test]
fn add_months_clamps_to_the_end_of_shorter_months() {
    assert_eq!(
        add_months(datetime!(2023-01-31 13:14:15 UTC), 1),
        datetime!(2023-02-28 13:14:15 UTC)
    );
    assert_eq!(
        add_months(datetime!(2024-01-31 13:14:15 UTC), 1),
        datetime!(2024-02-29 13:14:15 UTC)
    );
    assert_eq!(
        add_months(datetime!(2024-03-31 0:00 UTC), 1),
        datetime!(2024-04-30 0:00 UTC)
    );
    assert_eq!(
        add_months(datetime!(2024-02-29 0:00 UTC), 12),
        datetime!(2025-02-28 0:00 UTC)
    );
    assert_eq!(
        add_months(datetime!(2024-02-29 0:00 UTC), 48),
        datetime!(2028-02-29 0:00 UTC)
    );
}

#[test]
fn add_months_rolls_over_years_and_keeps_time_and_offset() {
    assert_eq!(
        add_months(datetime!(2024-12-15 8:00 +05:30), 1),
        datetime!(2025-01-15 8:00 +05:30)
    );
    assert_eq!(
        add_months(datetime!(2024-11-30 23:59:59.5 -03:00), 13),
        datetime!(2025-12-30 23:59:59.5 -03:00)
    );
    assert_eq!(
        add_months(datetime!(2024-01-31 0:00 UTC), 13),
        datetime!(2025-02-28 0:00 UTC)
    );
    assert_eq!(
        add_months(datetime!(2024-05-17 0:00 UTC), 0),
        datetime!(2024-05-17 0:00 UTC)
    );
    assert_eq!(
        add_months(datetime!(2024-05-17 0:00 UTC), 120),
        datetime!(2034-05-17 0:00 UTC)
    );
}

#[test]
fn add_months_saturates_instead_of_overflowing() {
    let max = add_months(datetime!(2024-05-17 0:00 UTC), u32::MAX);
    assert_eq!(max.year(), 9999);
    assert_eq!(add_months(datetime!(9999-12-01 0:00 UTC), 1).year(), 9999);
}

#[test]
fn default_client_validity_is_thirteen_months() {
    let now = datetime!(2025-01-31 9:00 UTC);
    assert_eq!(client_validity(now), (now, datetime!(2026-02-28 9:00 UTC)));
}

// ---------------------------------------------------------------------------
// Keys

fn pkcs8_inner_key(pkcs8: &[u8]) -> Vec<u8> {
    // PrivateKeyInfo ::= SEQUENCE { version, algorithm, privateKey OCTET STRING }
    let (_, obj) = x509_parser::der_parser::parse_der(pkcs8).unwrap();
    let seq = obj.as_sequence().unwrap();
    seq[2].as_slice().unwrap().to_vec()
}

fn pkcs8_to_sec1_pem(pkcs8: &[u8]) -> String {
    use aws_lc_rs::encoding::{AsDer, EcPrivateKeyRfc5915Der};
    let key = aws_lc_rs::signature::EcdsaKeyPair::from_private_key_der(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        pkcs8,
    )
    .unwrap();
    let sec1: EcPrivateKeyRfc5915Der<'static> = key.private_key().as_der().unwrap();
    pem_encode("EC PRIVATE KEY", sec1.as_ref())
}

#[test]
fn pkcs8_keys_convert_to_identical_pk8_der() {
    for key_type in KeyType::ALL {
        let (_, signer) = new_ca(KeyType::EcdsaP256);
        let alice = client(&signer, "alice", key_type);
        let pk8 = pem_key_to_pkcs8_der(&alice.key_pem).unwrap();
        assert_eq!(pk8, pem_body(&alice.key_pem), "{key_type}");
        assert_eq!(
            public_key_of_pkcs8(&pk8),
            public_key_of_cert(&alice.cert_pem)
        );
    }
}

#[test]
fn sec1_ec_key_converts_to_pk8_of_the_same_key() {
    for key_type in [KeyType::EcdsaP256, KeyType::EcdsaP384] {
        let (_, signer) = new_ca(KeyType::EcdsaP256);
        let alice = client(&signer, "alice", key_type);
        let alg = match key_type {
            KeyType::EcdsaP256 => &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            _ => &aws_lc_rs::signature::ECDSA_P384_SHA384_ASN1_SIGNING,
        };
        let sec1 = {
            use aws_lc_rs::encoding::{AsDer, EcPrivateKeyRfc5915Der};
            let key = aws_lc_rs::signature::EcdsaKeyPair::from_private_key_der(
                alg,
                &pem_body(&alice.key_pem),
            )
            .unwrap();
            let der: EcPrivateKeyRfc5915Der<'static> = key.private_key().as_der().unwrap();
            pem_encode("EC PRIVATE KEY", der.as_ref())
        };
        assert!(key_matches_cert(&alice.cert_pem, &sec1).unwrap());
        let pk8 = pem_key_to_pkcs8_der(&sec1).unwrap();
        // The result is PKCS#8 (parses as such) and holds the same key.
        assert!(aws_lc_rs::signature::EcdsaKeyPair::from_pkcs8(alg, &pk8).is_ok());
        assert_eq!(
            public_key_of_pkcs8(&pk8),
            public_key_of_cert(&alice.cert_pem)
        );
    }
}

#[test]
fn pkcs1_rsa_key_converts_to_pk8_of_the_same_key() {
    let (_, signer) = new_ca(KeyType::EcdsaP256);
    let alice = client(&signer, "alice", KeyType::Rsa2048);
    let pkcs1 = pem_encode(
        "RSA PRIVATE KEY",
        &pkcs8_inner_key(&pem_body(&alice.key_pem)),
    );
    assert!(key_matches_cert(&alice.cert_pem, &pkcs1).unwrap());
    let pk8 = pem_key_to_pkcs8_der(&pkcs1).unwrap();
    assert!(aws_lc_rs::rsa::KeyPair::from_pkcs8(&pk8).is_ok());
    assert_eq!(
        public_key_of_pkcs8(&pk8),
        public_key_of_cert(&alice.cert_pem)
    );
}

#[test]
fn key_matches_cert_tells_own_key_from_others() {
    let (ca, signer) = new_ca(KeyType::EcdsaP256);
    let server = issue_server(
        &signer,
        &["localhost".to_string()],
        KeyType::EcdsaP256,
        Duration::days(1),
    )
    .unwrap();
    assert!(key_matches_cert(&server.cert_pem, &server.key_pem).unwrap());
    assert!(!key_matches_cert(&server.cert_pem, &ca.key_pem).unwrap());
    let rsa = client(&signer, "rsa", KeyType::Rsa2048);
    assert!(!key_matches_cert(&server.cert_pem, &rsa.key_pem).unwrap());
    assert!(!key_matches_cert(&rsa.cert_pem, &server.key_pem).unwrap());
}

// ---------------------------------------------------------------------------
// Bad input: errors, never panics, never key material in messages

const GARBAGE: &str = "this is not PEM at all\n\u{0}\u{1}binary?";
const BAD_BASE64: &str =
    "-----BEGIN CERTIFICATE-----\n!!!notbase64***\n-----END CERTIFICATE-----\n";
const NO_END: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n";

#[test]
fn certificate_parsers_reject_garbage_keys_and_truncated_der() {
    let (ca, signer) = new_ca(KeyType::EcdsaP256);
    assert!(matches!(
        inspect_cert_pem(GARBAGE),
        Err(PkiError::NoPem { .. })
    ));
    assert!(matches!(inspect_cert_pem(""), Err(PkiError::NoPem { .. })));
    assert!(matches!(
        inspect_cert_pem(BAD_BASE64),
        Err(PkiError::BadPem { .. })
    ));
    assert!(matches!(
        inspect_cert_pem(NO_END),
        Err(PkiError::BadPem { .. })
    ));
    let err = inspect_cert_pem(&ca.key_pem).unwrap_err();
    assert!(matches!(err, PkiError::WrongPemKind { .. }), "{err}");
    assert!(err.to_string().contains("PRIVATE KEY"), "{err}");

    let full = signer.cert_der().to_vec();
    for len in 0..full.len() {
        let err = inspect_cert_der(&full[..len]).unwrap_err();
        assert!(matches!(err, PkiError::BadCertificate(_)), "{len}: {err}");
    }
    let mut trailing = full.clone();
    trailing.push(0);
    assert!(matches!(
        inspect_cert_der(&trailing),
        Err(PkiError::BadCertificate(_))
    ));
    let truncated = pem_encode("CERTIFICATE", &full[..full.len() / 2]);
    assert!(matches!(
        inspect_cert_pem(&truncated),
        Err(PkiError::BadCertificate(_))
    ));
}

#[test]
fn crl_parser_rejects_garbage_other_pem_and_truncated_der() {
    let (ca, signer) = new_ca(KeyType::EcdsaP256);
    let now = OffsetDateTime::now_utc();
    let crl = build_crl(&signer, &[("01", now)], 1, now, now + Duration::days(1)).unwrap();
    assert!(matches!(
        parse_crl_pem(GARBAGE),
        Err(PkiError::NoPem { .. })
    ));
    assert!(matches!(
        parse_crl_pem(&ca.cert_pem),
        Err(PkiError::WrongPemKind { .. })
    ));
    assert!(matches!(
        parse_crl_pem(&ca.key_pem),
        Err(PkiError::WrongPemKind { .. })
    ));
    let full = pem_body(&crl);
    for len in 0..full.len() {
        assert!(
            matches!(parse_crl_der(&full[..len]), Err(PkiError::BadCrl(_))),
            "{len}"
        );
    }
    assert!(matches!(
        parse_crl_der(signer.cert_der()),
        Err(PkiError::BadCrl(_))
    ));
}

#[test]
fn key_functions_reject_garbage_certificates_and_truncated_keys() {
    let (ca, _) = new_ca(KeyType::EcdsaP256);
    for input in [GARBAGE, ""] {
        assert!(matches!(
            pem_key_to_pkcs8_der(input),
            Err(PkiError::NoPem { .. })
        ));
    }
    let err = pem_key_to_pkcs8_der(&ca.cert_pem).unwrap_err();
    assert!(matches!(err, PkiError::WrongPemKind { .. }), "{err}");
    assert!(matches!(
        key_matches_cert(&ca.key_pem, &ca.key_pem),
        Err(PkiError::WrongPemKind { .. })
    ));
    assert!(matches!(
        key_matches_cert(&ca.cert_pem, &ca.cert_pem),
        Err(PkiError::WrongPemKind { .. })
    ));
    assert!(matches!(
        CaSigner::from_pem(GARBAGE, &ca.key_pem),
        Err(PkiError::NoPem { .. })
    ));
    assert!(matches!(
        CaSigner::from_pem(&ca.cert_pem, GARBAGE),
        Err(PkiError::NoPem { .. })
    ));
    assert!(matches!(
        CaSigner::from_pem(&ca.key_pem, &ca.cert_pem),
        Err(PkiError::WrongPemKind { .. })
    ));

    let full = pem_body(&ca.key_pem);
    for (label, body) in [
        ("PRIVATE KEY", full.clone()),
        ("EC PRIVATE KEY", pkcs8_inner_key(&full)),
        ("RSA PRIVATE KEY", full.clone()),
    ] {
        for len in 0..body.len() {
            let pem = pem_encode(label, &body[..len]);
            if label == "RSA PRIVATE KEY" || len < body.len() {
                let err = pem_key_to_pkcs8_der(&pem).unwrap_err();
                assert!(matches!(err, PkiError::BadKey(_)), "{label} {len}: {err}");
                let err = CaSigner::from_pem(&ca.cert_pem, &pem).unwrap_err();
                assert!(matches!(err, PkiError::BadKey(_)), "{label} {len}: {err}");
            }
        }
    }
}

#[test]
fn errors_never_echo_key_material() {
    let (ca, _) = new_ca(KeyType::EcdsaP256);
    let body_lines: Vec<&str> = ca
        .key_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    // Corrupt the base64 in the middle of the key.
    let corrupted = ca.key_pem.replacen(&body_lines[0][..10], "!!!!!!!!!!", 1);
    let wrong_label = ca.key_pem.replace("PRIVATE KEY", "PRIVATE KEX");
    let as_cert = ca.key_pem.replace("PRIVATE KEY", "CERTIFICATE");
    let messages = [
        pem_key_to_pkcs8_der(&corrupted).unwrap_err().to_string(),
        pem_key_to_pkcs8_der(&wrong_label).unwrap_err().to_string(),
        inspect_cert_pem(&ca.key_pem).unwrap_err().to_string(),
        inspect_cert_pem(&as_cert).unwrap_err().to_string(),
        CaSigner::from_pem(&ca.cert_pem, &corrupted)
            .unwrap_err()
            .to_string(),
        format!("{:?}", CaSigner::from_issued(&ca).unwrap()),
    ];
    for msg in &messages {
        for line in &body_lines {
            for window in line.as_bytes().windows(8) {
                let window = std::str::from_utf8(window).unwrap();
                assert!(
                    !msg.contains(window),
                    "{msg:?} contains key text {window:?}"
                );
            }
        }
    }
    // Issued's Debug shows the certificate (which shares the public key
    // with the key PEM) but not the key.
    let debug = format!("{ca:?}");
    assert!(debug.contains("[redacted]"));
    assert!(!debug.contains("PRIVATE KEY"));
    assert!(!debug.contains(body_lines[0]));
}

#[test]
fn key_type_names_round_trip() {
    for key_type in KeyType::ALL {
        assert_eq!(key_type.to_string().parse::<KeyType>().unwrap(), key_type);
    }
    assert_eq!("RSA2048".parse::<KeyType>().unwrap(), KeyType::Rsa2048);
    assert_eq!(KeyType::default(), KeyType::EcdsaP256);
    assert!(matches!(
        "ed448".parse::<KeyType>(),
        Err(PkiError::UnknownKeyType(_))
    ));
}

#[test]
fn serial_hex_is_canonical() {
    assert_eq!(serial_to_hex(&[0, 0, 0x0a, 0xbc]), "abc");
    assert_eq!(serial_to_hex(&[]), "0");
    assert_eq!(serial_to_hex(&[0]), "0");
    assert_eq!(serial_from_hex("0A:BC").unwrap(), [0x0a, 0xbc]);
    assert_eq!(serial_from_hex(" 0xabc ").unwrap(), [0x0a, 0xbc]);
    assert_eq!(serial_from_hex("000abc").unwrap(), [0x0a, 0xbc]);
    assert_eq!(normalize_serial("0A:BC").unwrap(), "abc");
    assert!(matches!(normalize_serial("0"), Err(PkiError::BadSerial(_))));
}

#[test]
fn server_cert_with_a_long_first_name_uses_the_default_cn() {
    let (_, signer) = new_ca(KeyType::EcdsaP256);
    let long = format!("{}.example.com", "a".repeat(60));
    let server = issue_server(
        &signer,
        std::slice::from_ref(&long),
        KeyType::EcdsaP256,
        Duration::days(1),
    )
    .unwrap();
    let info = inspect_cert_pem(&server.cert_pem).unwrap();
    assert_eq!(info.subject_cn.as_deref(), Some(DEFAULT_SERVER_CN));
    assert_eq!(info.sans, [long]);
}

#[test]
fn signer_certificates_and_errors_can_cross_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<CaSigner>();
    send_sync::<Issued>();
    send_sync::<PkiError>();
    send_sync::<CertInfo>();
    send_sync::<CrlInfo>();
}

#[test]
fn cert_info_and_key_type_serialize_for_json_output() {
    let (ca, _) = new_ca(KeyType::EcdsaP384);
    let info = inspect_cert_pem(&ca.cert_pem).unwrap();
    let json: serde_json::Value = serde_json::to_value(&info).unwrap();
    assert_eq!(json["subject_cn"], "test CA");
    assert_eq!(json["key_algorithm"], "p384");
    let not_after = json["not_after"].as_str().unwrap();
    assert_eq!(
        OffsetDateTime::parse(not_after, &time::format_description::well_known::Rfc3339).unwrap(),
        ca.not_after
    );
    for key_type in KeyType::ALL {
        let json = serde_json::to_string(&key_type).unwrap();
        assert_eq!(json, format!("\"{key_type}\""));
        assert_eq!(serde_json::from_str::<KeyType>(&json).unwrap(), key_type);
    }
}
