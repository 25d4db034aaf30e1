//! A throwaway PKI for tests, generated with rcgen (ECDSA P-256) into a
//! temporary directory that disappears with the [`TestPki`].
//!
//! Layout of trust:
//! - `ca` issues `server` (the proxy's listener cert), `client` and
//!   `expired_client`, and anything from [`TestPki::issue_client`].
//! - `other_ca` is unrelated and issues `other_ca_client`: a well-formed
//!   client cert that a proxy trusting only `ca` must reject.
//! - `upstream_ca` issues `upstream_server`, the cert PostgreSQL itself
//!   presents when a test configures TLS on the server.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tempfile::TempDir;
use time::{Duration, OffsetDateTime};

/// One certificate holder: PEM files on disk plus the same material in memory.
#[derive(Debug, Clone)]
pub struct Role {
    /// File stem used on disk, e.g. `client`.
    pub name: String,
    /// The certificate alone (PEM).
    pub cert_path: PathBuf,
    /// The PKCS#8 private key (PEM), mode 0600 so libpq and PostgreSQL accept it.
    pub key_path: PathBuf,
    /// Leaf followed by its issuing CA (PEM). For a CA this equals `cert_path`'s content.
    pub chain_path: PathBuf,
    pub cert_pem: String,
    pub key_pem: String,
}

impl Role {
    /// The certificate as DER, for rustls APIs.
    pub fn cert_der(&self) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(self.cert_pem.as_bytes())
            .unwrap_or_else(|e| panic!("{}: bad cert PEM: {e}", self.name))
    }

    /// Leaf plus issuer, as a client or server would present it.
    pub fn chain_der(&self) -> Vec<CertificateDer<'static>> {
        CertificateDer::pem_file_iter(&self.chain_path)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .unwrap_or_else(|e| panic!("{}: bad chain file: {e}", self.name))
    }

    /// The private key as DER (PKCS#8), for rustls APIs.
    pub fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes())
            .unwrap_or_else(|e| panic!("{}: bad key PEM: {e}", self.name))
    }
}

/// All roles a test may need, in one temp dir.
pub struct TestPki {
    pub ca: Role,
    pub server: Role,
    pub client: Role,
    pub other_ca: Role,
    pub other_ca_client: Role,
    pub expired_client: Role,
    pub upstream_ca: Role,
    pub upstream_server: Role,
    /// Kept so `issue_client` can sign more certs under `ca`.
    ca_issuer: Issuer<'static, KeyPair>,
    /// Makes file names of ad-hoc certs unique even for repeated CNs.
    issued: AtomicUsize,
    // Declared last so the files outlive every other field during drop.
    dir: TempDir,
}

impl TestPki {
    /// Generates the whole PKI. Takes a few milliseconds.
    pub fn new() -> TestPki {
        let dir = tempfile::Builder::new()
            .prefix("pgmtls-pki-")
            .tempdir()
            .expect("create PKI temp dir");
        let d = dir.path();
        let (from, until) = default_validity();

        let (ca, ca_issuer) = new_ca(d, "ca", "pgmtls test CA");
        let (other_ca, other_issuer) = new_ca(d, "other_ca", "unrelated test CA");
        let (upstream_ca, upstream_issuer) = new_ca(d, "upstream_ca", "pgmtls upstream test CA");

        let server_sans = ["localhost", "127.0.0.1", "::1"];
        let server = issue(
            d,
            "server",
            &server_params("localhost", &server_sans),
            &ca_issuer,
            &ca,
        );
        let upstream_sans = ["localhost", "127.0.0.1"];
        let upstream_server = issue(
            d,
            "upstream_server",
            &server_params("localhost", &upstream_sans),
            &upstream_issuer,
            &upstream_ca,
        );
        let client = issue(
            d,
            "client",
            &client_params("app-client", from, until),
            &ca_issuer,
            &ca,
        );
        let other_ca_client = issue(
            d,
            "other_ca_client",
            &client_params("app-client", from, until),
            &other_issuer,
            &other_ca,
        );
        let now = OffsetDateTime::now_utc();
        let expired = client_params(
            "expired-client",
            now - Duration::days(30),
            now - Duration::days(1),
        );
        let expired_client = issue(d, "expired_client", &expired, &ca_issuer, &ca);

        TestPki {
            ca,
            server,
            client,
            other_ca,
            other_ca_client,
            expired_client,
            upstream_ca,
            upstream_server,
            ca_issuer,
            issued: AtomicUsize::new(0),
            dir,
        }
    }

    /// Issues a client cert (clientAuth EKU) under `ca` with a custom CN and
    /// validity, e.g. CN `bench` for PostgreSQL `cert` auth, or a cert that is
    /// not yet valid.
    pub fn issue_client(
        &self,
        cn: &str,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Role {
        let n = self.issued.fetch_add(1, Ordering::Relaxed);
        let safe_cn: String = cn
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let name = format!("issued{n}_{safe_cn}");
        let params = client_params(cn, not_before, not_after);
        issue(self.dir.path(), &name, &params, &self.ca_issuer, &self.ca)
    }

    /// Like [`issue_client`](Self::issue_client) with the default validity
    /// (yesterday until a year from now).
    pub fn issue_valid_client(&self, cn: &str) -> Role {
        let (from, until) = default_validity();
        self.issue_client(cn, from, until)
    }

    /// The directory holding all PEM files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}

/// Starts a day in the past so clock skew between generation and use never
/// makes a fresh cert "not yet valid".
fn default_validity() -> (OffsetDateTime, OffsetDateTime) {
    let now = OffsetDateTime::now_utc();
    (now - Duration::days(1), now + Duration::days(365))
}

fn new_key() -> KeyPair {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("generate P-256 key")
}

fn dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "pgmtls tests");
    dn.push(DnType::CommonName, cn);
    dn
}

/// A self-signed root. Distinct CNs per CA matter: OpenSSL looks issuers up by
/// name, and a clash would turn "unknown CA" into a confusing signature error.
fn new_ca(dir: &Path, name: &str, cn: &str) -> (Role, Issuer<'static, KeyPair>) {
    let (from, until) = default_validity();
    let mut params = CertificateParams::default();
    params.distinguished_name = dn(cn);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = from;
    params.not_after = until;
    let key = new_key();
    let cert = params.self_signed(&key).expect("self-sign CA");
    let role = write_role(dir, name, &cert.pem(), &key.serialize_pem(), None);
    (role, Issuer::new(params, key))
}

fn server_params(cn: &str, sans: &[&str]) -> CertificateParams {
    let (from, until) = default_validity();
    let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
    let mut params = CertificateParams::new(sans).expect("server SANs");
    params.distinguished_name = dn(cn);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.not_before = from;
    params.not_after = until;
    params
}

fn client_params(
    cn: &str,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = dn(cn);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.not_before = not_before;
    params.not_after = not_after;
    params
}

/// Signs `params` with a fresh key under `issuer` and writes the files.
fn issue(
    dir: &Path,
    name: &str,
    params: &CertificateParams,
    issuer: &Issuer<'static, KeyPair>,
    issuer_role: &Role,
) -> Role {
    let key = new_key();
    let cert = params.signed_by(&key, issuer).expect("sign leaf cert");
    write_role(
        dir,
        name,
        &cert.pem(),
        &key.serialize_pem(),
        Some(&issuer_role.cert_pem),
    )
}

fn write_role(
    dir: &Path,
    name: &str,
    cert_pem: &str,
    key_pem: &str,
    issuer_pem: Option<&str>,
) -> Role {
    let cert_path = dir.join(format!("{name}.crt"));
    let key_path = dir.join(format!("{name}.key"));
    let chain_path = dir.join(format!("{name}.chain.crt"));
    fs::write(&cert_path, cert_pem).expect("write cert");
    write_private(&key_path, key_pem);
    let chain = format!("{cert_pem}{}", issuer_pem.unwrap_or(""));
    fs::write(&chain_path, chain).expect("write chain");
    Role {
        name: name.to_string(),
        cert_path,
        key_path,
        chain_path,
        cert_pem: cert_pem.to_string(),
        key_pem: key_pem.to_string(),
    }
}

/// Creates the file with mode 0600 from the start: libpq refuses keys that
/// are group/world readable, and there is no window where it is.
pub fn write_private(path: &Path, contents: &str) {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.write_all(contents.as_bytes())
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}
