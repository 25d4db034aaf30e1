//! PEM files of a database -> `Arc<rustls::ServerConfig>` that requires a client certificate
//! chained to the database's CA and not on its CRL; plus the upstream `ClientConfig`.
//! Errors name the file they came from.

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName, UnixTime,
};
use time::OffsetDateTime;

use crate::client_verify::{CachingClientVerifier, CertificateOptional};
use crate::config::ConfigErrors;
use crate::state::MaterialPaths;

/// ALPN protocol id PostgreSQL 17 registered for its direct TLS negotiation.
pub const ALPN_POSTGRESQL: &[u8] = b"postgresql";

/// The one crypto provider in the process (aws-lc-rs), with AES-128-GCM first among equals:
/// with `ignore_client_order` the server picks it whenever the client offers it. Its SHA-256
/// key schedule runs on SHA-NI where SHA-384 has no hardware help, and AES-128 encrypts bulk
/// data faster; both are the TLS 1.3 mandatory suite's parts and fully secure.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            use rustls::crypto::aws_lc_rs::{cipher_suite as cs, default_provider};
            let mut p = default_provider();
            p.cipher_suites = vec![
                cs::TLS13_AES_128_GCM_SHA256,
                cs::TLS13_AES_256_GCM_SHA384,
                cs::TLS13_CHACHA20_POLY1305_SHA256,
                cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
                cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
                cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
                cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
                cs::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
                cs::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
            ];
            Arc::new(p)
        })
        .clone()
}

/// What a database's TLS material turned into, plus figures for status and metrics.
#[derive(Debug, Clone)]
pub struct ServerTls {
    /// Requires a client certificate: for addresses an IP rule admits.
    pub config: Arc<ServerConfig>,
    /// Same certificate, CA and CRL, but a client may present no certificate (one it presents
    /// must still chain, be in date and not be revoked): for addresses only a trusted range
    /// admits, where Postgres' own authentication decides.
    pub cert_optional: Arc<ServerConfig>,
    /// The client-certificate verifier inside `config`, for `pgmtls doctor` to ask the very
    /// question the handshake asks.
    pub client_verifier: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    pub server_not_after: Option<OffsetDateTime>,
    pub ca_not_after: Option<OffsetDateTime>,
    /// Serials (lowercase hex) listed in the CRL.
    pub revoked_serials: HashSet<String>,
    /// The highest cRLNumber in the CRL file; `None` without a CRL or without the extension.
    pub crl_number: Option<u64>,
}

/// Builds the server side of one database's TLS. `paths` only name files in errors.
/// `also_revoked` are serials refused at the handshake besides the CRL's (the records marked
/// `revoked_at`), so that a CRL that lost an entry cannot let a revoked certificate back in.
pub fn build_server_tls(
    paths: &MaterialPaths,
    cert_pem: &[u8],
    key_pem: &[u8],
    ca_pem: &[u8],
    crl_pem: Option<&[u8]>,
    also_revoked: &HashSet<String>,
) -> Result<ServerTls, ConfigErrors> {
    let mut errors = ConfigErrors::default();
    let (cert_file, key_file, ca_file, crl_file) =
        (&paths.server_cert, &paths.server_key, &paths.ca, &paths.crl);

    let chain = certs(cert_file, cert_pem)
        .map_err(|e| errors.extend(e))
        .ok();
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| {
            errors.extend(ConfigErrors::one(
                key_file,
                "",
                None,
                format!("no usable private key: {e}"),
            ))
        })
        .ok();
    let ca = certs(ca_file, ca_pem).map_err(|e| errors.extend(e)).ok();
    let mut revoked_serials = HashSet::new();
    let mut crl_number = None;
    let crls = match crl_pem {
        None => Some(Vec::new()),
        Some(pem) => {
            let parsed: Result<Vec<_>, _> =
                CertificateRevocationListDer::pem_slice_iter(pem).collect();
            match parsed {
                Ok(list) => {
                    if list.is_empty() {
                        errors.extend(ConfigErrors::one(
                            crl_file,
                            "",
                            None,
                            "no PEM X509 CRL found",
                        ));
                    }
                    for crl in &list {
                        match crl_facts(crl) {
                            Ok((serials, number)) => {
                                revoked_serials.extend(serials);
                                crl_number = crl_number.max(number);
                            }
                            Err(m) => errors.extend(ConfigErrors::one(crl_file, "", None, m)),
                        }
                    }
                    Some(list)
                }
                Err(e) => {
                    errors.extend(ConfigErrors::one(
                        crl_file,
                        "",
                        None,
                        format!("not a PEM CRL: {e}"),
                    ));
                    None
                }
            }
        }
    };
    let (Some(chain), Some(key), Some(ca), Some(crls)) = (chain, key, ca, crls) else {
        return Err(errors);
    };
    if !errors.is_empty() {
        return Err(errors);
    }

    let mut roots = RootCertStore::empty();
    for c in &ca {
        if let Err(e) = roots.add(c.clone()) {
            return Err(ConfigErrors::one(
                ca_file,
                "",
                None,
                format!("not a usable CA certificate: {e}"),
            ));
        }
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .with_crls(crls)
        // The CRL lists end-entity client certificates; the CA itself is the trust anchor.
        .only_check_end_entity_revocation()
        .build()
        .map_err(|e| ConfigErrors::one(crl_file, "", None, format!("CA or CRL rejected: {e}")))?;
    // One cache per build: a reload with a new CA or CRL starts from an empty one.
    let verifier = Arc::new(CachingClientVerifier::new(verifier).refusing(also_revoked.clone()));

    let server_not_after = chain.first().and_then(|c| not_after(c));
    let ca_not_after = ca.first().and_then(|c| not_after(c));
    // Both configurations share the one verifier (and so its cache): a certificate presented
    // from a trusted range is checked exactly like one from an IP rule's range.
    let optional = Arc::new(CertificateOptional::new(Arc::clone(&verifier)));
    let cert_optional = server_config(
        optional,
        chain.clone(),
        key.clone_key(),
        cert_file,
        key_file,
    )?;
    let client_verifier: Arc<dyn rustls::server::danger::ClientCertVerifier> = verifier.clone();
    let config = server_config(verifier, chain, key, cert_file, key_file)?;
    Ok(ServerTls {
        config,
        cert_optional,
        client_verifier,
        server_not_after,
        ca_not_after,
        revoked_serials,
        crl_number,
    })
}

/// One server configuration around `verifier`, with the settings every database uses.
fn server_config(
    verifier: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    cert_file: &Path,
    key_file: &Path,
) -> Result<Arc<ServerConfig>, ConfigErrors> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| ConfigErrors::one(cert_file, "", None, format!("TLS versions: {e}")))?
        .with_client_cert_verifier(verifier.clone())
        .with_single_cert(chain, key)
        .map_err(|e| {
            ConfigErrors::one(
                key_file,
                "",
                None,
                format!("server certificate and key do not go together: {e}"),
            )
        })?;
    config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    config.ignore_client_order = true;
    // A resumed session restores the peer's certificate without re-verifying it, so a revoked
    // client could come back through a ticket. libpq never resumes anyway.
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// Reads a PEM bundle of certificates; an empty bundle is an error.
pub fn certs(file: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, ConfigErrors> {
    let parsed: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem).collect();
    match parsed {
        Ok(v) if !v.is_empty() => Ok(v),
        Ok(_) => Err(ConfigErrors::one(
            file,
            "",
            None,
            "no PEM certificate found",
        )),
        Err(e) => Err(ConfigErrors::one(
            file,
            "",
            None,
            format!("not a PEM certificate: {e}"),
        )),
    }
}

fn not_after(der: &CertificateDer<'_>) -> Option<OffsetDateTime> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    Some(cert.validity().not_after.to_datetime())
}

/// The serials a CRL lists and its cRLNumber.
fn crl_facts(der: &CertificateRevocationListDer<'_>) -> Result<(Vec<String>, Option<u64>), String> {
    let info =
        crate::pki::parse_crl_der(der.as_ref()).map_err(|e| format!("CRL does not parse: {e}"))?;
    Ok((info.revoked_serials, info.crl_number))
}

/// Lowercase hex of a certificate serial without leading zeros ("0" for zero): the one format
/// used in logs, CRL lookups, `/status`, `certificate.yaml` and the CLI.
pub fn serial_hex(raw: &[u8]) -> String {
    let hex = hex::encode(raw);
    match hex.trim_start_matches('0') {
        "" => "0".to_string(),
        s => s.to_string(),
    }
}

/// How pgmtls verifies a TLS upstream.
pub enum UpstreamVerify<'a> {
    /// Encrypt only, as libpq's `sslmode=require`.
    None,
    /// Chain to these CAs and match the host name, as `sslmode=verify-full`.
    Full { ca_file: &'a Path, ca_pem: &'a [u8] },
}

pub fn build_upstream_tls(verify: UpstreamVerify<'_>) -> Result<Arc<ClientConfig>, ConfigErrors> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| ConfigErrors::one(Path::new("."), "", None, format!("TLS versions: {e}")))?;
    let mut config = match verify {
        UpstreamVerify::None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider())))
            .with_no_client_auth(),
        UpstreamVerify::Full { ca_file, ca_pem } => {
            let mut roots = RootCertStore::empty();
            for c in certs(ca_file, ca_pem)? {
                roots.add(c).map_err(|e| {
                    ConfigErrors::one(ca_file, "", None, format!("not a usable CA: {e}"))
                })?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    Ok(Arc::new(config))
}

/// `sslmode=require` semantics: the signature over the handshake is still checked, so the
/// stream is encrypted to whoever holds the key, but the certificate is not.
#[derive(Debug)]
struct NoVerify(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_material_is_refused_naming_each_file() {
        let e = build_server_tls(
            &MaterialPaths::in_dir(Path::new("/s/db")),
            b"junk",
            b"junk",
            b"-----BEGIN CERTIFICATE-----\nnotbase64!\n-----END CERTIFICATE-----\n",
            Some(b"-----BEGIN X509 CRL-----\n!!\n-----END X509 CRL-----\n"),
            &HashSet::new(),
        )
        .unwrap_err();
        let s = e.to_string();
        for f in ["server.crt", "server.key", "ca.crt", "crl.pem"] {
            assert!(s.contains(&format!("/s/db/{f}")), "{f} not named in\n{s}");
        }
    }

    #[test]
    fn serial_hex_strips_leading_zeros() {
        assert_eq!(serial_hex(&[0, 0x8f, 0x01]), "8f01");
        assert_eq!(serial_hex(&[0x0a, 0xbc]), "abc");
        assert_eq!(serial_hex(&[0x12]), "12");
        assert_eq!(serial_hex(&[]), "0");
        // The same text the PKI module writes into records and CRLs.
        assert_eq!(
            crate::pki::normalize_serial("0A:BC").unwrap(),
            serial_hex(&[0x0a, 0xbc])
        );
    }
}

#[cfg(test)]
mod handshake_tests {
    use super::*;
    use crate::pki::{create_ca, issue_client, issue_server, CaSigner, KeyType};
    use rustls::{ClientConnection, ServerConnection};
    use time::Duration;

    /// Moves handshake bytes between the two sides until neither has anything left to send.
    fn complete(c: &mut ClientConnection, s: &mut ServerConnection) {
        let mut buf = Vec::new();
        while c.wants_write() || s.wants_write() {
            buf.clear();
            c.write_tls(&mut buf).unwrap();
            s.read_tls(&mut &buf[..]).unwrap();
            s.process_new_packets().unwrap();
            buf.clear();
            s.write_tls(&mut buf).unwrap();
            c.read_tls(&mut &buf[..]).unwrap();
            c.process_new_packets().unwrap();
        }
    }

    /// A TLS 1.3 client that prefers AES-256 (as libpq/OpenSSL does) gets AES-128, and the
    /// handshake requires and verifies its certificate.
    #[test]
    fn server_prefers_aes_128_requires_a_client_certificate_and_never_resumes() {
        let ca = create_ca("t ca", KeyType::EcdsaP256, Duration::days(2)).unwrap();
        let signer = CaSigner::from_issued(&ca).unwrap();
        let server = issue_server(
            &signer,
            &["localhost".into()],
            KeyType::EcdsaP256,
            Duration::days(2),
        )
        .unwrap();
        let now = OffsetDateTime::now_utc();
        let client = issue_client(
            &signer,
            "c",
            KeyType::EcdsaP256,
            now - Duration::minutes(1),
            now + Duration::days(1),
        )
        .unwrap();
        let tls = build_server_tls(
            &MaterialPaths::in_dir(Path::new("t")),
            server.cert_pem.as_bytes(),
            server.key_pem.as_bytes(),
            ca.cert_pem.as_bytes(),
            None,
            &HashSet::new(),
        )
        .unwrap();
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(ca.cert_pem.as_bytes()).unwrap())
            .unwrap();
        let mut client_provider = rustls::crypto::aws_lc_rs::default_provider();
        client_provider.cipher_suites = vec![
            rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384,
            rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256,
        ];
        let client_cfg = ClientConfig::builder_with_provider(Arc::new(client_provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(client.cert_pem.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(client.key_pem.as_bytes()).unwrap(),
            )
            .unwrap();
        let client_cfg = Arc::new(client_cfg);
        let mut c = ClientConnection::new(
            client_cfg.clone(),
            ServerName::try_from("localhost").unwrap(),
        )
        .unwrap();
        let mut s = ServerConnection::new(tls.config.clone()).unwrap();
        complete(&mut c, &mut s);
        assert!(!s.is_handshaking());
        assert_eq!(
            s.negotiated_cipher_suite().map(|cs| cs.suite()),
            Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
        );
        assert_eq!(s.peer_certificates().map(<[_]>::len), Some(1));

        // A client that would resume (default rustls client cache) gets a full handshake
        // again: no tickets, no session cache, so every connection re-verifies against the
        // current CA and CRL.
        let mut c2 =
            ClientConnection::new(client_cfg, ServerName::try_from("localhost").unwrap()).unwrap();
        let mut s2 = ServerConnection::new(tls.config).unwrap();
        complete(&mut c2, &mut s2);
        assert!(!s2.is_handshaking());
        assert_eq!(c2.handshake_kind(), Some(rustls::HandshakeKind::Full));
        assert_eq!(s2.handshake_kind(), Some(rustls::HandshakeKind::Full));
    }
}
