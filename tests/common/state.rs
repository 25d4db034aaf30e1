//! State directories and config files for tests, written through `pgmtls::state` (the same
//! serialisers the CLI uses), plus CRLs signed by the test CA.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use pgmtls::state::{
    ip_rules_to_yaml, trusted_ips_to_yaml, write_atomic, CertificateRecord, DatabaseSettings,
    IpRule, UpstreamAddr, UpstreamTls, CA_CERT, CERTIFICATES_DIR, CERTIFICATE_YAML, CRL,
    DATABASE_YAML, IP_RULES, SERVER_CERT, SERVER_KEY, TRUSTED_IPS,
};
use rcgen::{Issuer, KeyPair};
use tempfile::TempDir;
use time::{Duration, OffsetDateTime};

use super::pki::{Role, TestPki};

/// A config file `pgmtls.yaml` next to a state directory `state/`, in a temp dir.
pub struct TestState {
    pub root: PathBuf,
    pub config: PathBuf,
    dir: TempDir,
}

impl TestState {
    /// Config with the admin endpoint on an ephemeral port and the poll effectively off, so a
    /// test of the watch cannot pass because of the poll. `extra` is appended verbatim.
    pub fn new(extra: &str) -> TestState {
        let dir = tempfile::Builder::new()
            .prefix("pgmtls-state-")
            .tempdir()
            .unwrap();
        let root = dir.path().join("state");
        std::fs::create_dir_all(&root).unwrap();
        let config = dir.path().join("pgmtls.yaml");
        let s = TestState { root, config, dir };
        s.write_config(extra);
        s
    }

    pub fn write_config(&self, extra: &str) {
        let text = format!(
            "state_dir: state\nadmin_listen: 127.0.0.1:0\nreload_poll_interval: 1h\n{extra}"
        );
        write_atomic(&self.config, text.as_bytes(), 0o644).unwrap();
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn db_dir(&self, name: &str) -> PathBuf {
        self.root.join("databases").join(name)
    }

    /// Writes a complete database folder: settings, the PKI's server certificate and key,
    /// its CA as client CA, and `rules` as `(id, cidr)`.
    pub fn add_database(
        &self,
        name: &str,
        pki: &TestPki,
        listen: &str,
        upstream: SocketAddr,
        rules: &[(&str, &str)],
    ) {
        write_database(&self.db_dir(name), pki, listen, upstream, rules);
    }

    /// Replaces `ip-rules.yaml` atomically (temp file + rename), as the CLI does.
    pub fn write_rules(&self, db: &str, rules: &[(&str, &str)]) {
        write_atomic(
            &self.db_dir(db).join(IP_RULES),
            rules_yaml(rules).as_bytes(),
            0o644,
        )
        .unwrap();
    }

    /// Replaces `trusted-ips.yaml` atomically with `ranges` as `(id, cidr)`.
    pub fn write_trusted_ips(&self, db: &str, ranges: &[(&str, &str)]) {
        let ranges: Vec<IpRule> = ranges.iter().map(|(id, cidr)| rule(id, cidr)).collect();
        write_atomic(
            &self.db_dir(db).join(TRUSTED_IPS),
            trusted_ips_to_yaml(&ranges).as_bytes(),
            0o644,
        )
        .unwrap();
    }

    pub fn write_file(&self, db: &str, file: &str, bytes: &[u8], mode: u32) {
        write_atomic(&self.db_dir(db).join(file), bytes, mode).unwrap();
    }

    /// `certificates/ID/certificate.yaml` describing `role`.
    pub fn add_certificate_record(&self, db: &str, id: &str, role: &Role) {
        self.write_certificate_record(db, &certificate_record(id, role));
    }

    /// Revokes `role` as `certificates revoke` does: a CRL numbered `crl_number` listing it
    /// first, then its record `id` marked `revoked_at`.
    pub fn revoke(&self, db: &str, pki: &TestPki, id: &str, role: &Role, crl_number: u64) {
        let crl = crl_pem_numbered(pki, &[role], crl_number);
        self.write_file(db, CRL, crl.as_bytes(), 0o644);
        self.mark_revoked(db, id, role);
    }

    /// Marks the record `id` of `role` `revoked_at`, leaving the CRL as it is.
    pub fn mark_revoked(&self, db: &str, id: &str, role: &Role) {
        let mut rec = certificate_record(id, role);
        rec.revoked_at = Some(OffsetDateTime::now_utc().replace_nanosecond(0).unwrap());
        self.write_certificate_record(db, &rec);
    }

    fn write_certificate_record(&self, db: &str, rec: &CertificateRecord) {
        let id = &rec.id;
        let path = self
            .db_dir(db)
            .join(CERTIFICATES_DIR)
            .join(id)
            .join(CERTIFICATE_YAML);
        write_atomic(&path, rec.to_yaml().as_bytes(), 0o644).unwrap();
    }
}

/// Writes one database folder at `dir`.
pub fn write_database(
    dir: &Path,
    pki: &TestPki,
    listen: &str,
    upstream: SocketAddr,
    rules: &[(&str, &str)],
) {
    let settings = DatabaseSettings {
        listen: listen.parse().unwrap(),
        upstream: UpstreamAddr {
            host: upstream.ip().to_string(),
            port: upstream.port(),
        },
        upstream_tls: UpstreamTls::Disable,
        upstream_ca: None,
        upstream_server_name: None,
        allow_plaintext_remote_upstream: false,
        server_names: vec!["localhost".into()],
        user_must_match_cn: false,
        max_connections: None,
        max_connections_per_ip: None,
        enabled_by: Some("tests".into()),
        created_at: None,
    };
    write_atomic(
        &dir.join(DATABASE_YAML),
        settings.to_yaml().as_bytes(),
        0o644,
    )
    .unwrap();
    let chain = std::fs::read(&pki.server.chain_path).unwrap();
    write_atomic(&dir.join(SERVER_CERT), &chain, 0o644).unwrap();
    write_atomic(&dir.join(SERVER_KEY), pki.server.key_pem.as_bytes(), 0o600).unwrap();
    write_atomic(&dir.join(CA_CERT), pki.ca.cert_pem.as_bytes(), 0o644).unwrap();
    write_atomic(&dir.join(IP_RULES), rules_yaml(rules).as_bytes(), 0o644).unwrap();
    // As `mtls create`: every database in a state directory has a CRL, number 1, empty.
    write_atomic(&dir.join(CRL), crl_pem(pki, &[]).as_bytes(), 0o644).unwrap();
}

pub fn rule(id: &str, cidr: &str) -> IpRule {
    let now = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
    IpRule {
        id: id.into(),
        cidr: cidr.parse().unwrap(),
        description: format!("test rule {id}"),
        created_at: now,
        updated_at: now,
    }
}

pub fn rules_yaml(rules: &[(&str, &str)]) -> String {
    let rules: Vec<IpRule> = rules.iter().map(|(id, cidr)| rule(id, cidr)).collect();
    ip_rules_to_yaml(&rules)
}

/// Lowercase hex serial without leading zero bytes, as pgmtls logs and compares it.
pub fn serial_of(role: &Role) -> String {
    let der = role.cert_der();
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).unwrap();
    pgmtls::tls_store::serial_hex(cert.raw_serial())
}

pub fn certificate_record(id: &str, role: &Role) -> CertificateRecord {
    let der = role.cert_der();
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).unwrap();
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|c| c.as_str().ok())
        .unwrap_or_default()
        .to_owned();
    CertificateRecord {
        id: id.into(),
        common_name: cn,
        serial: serial_of(role),
        key_type: "ecdsa-p256".into(),
        created_at: OffsetDateTime::now_utc().replace_nanosecond(0).unwrap(),
        not_before: cert.validity().not_before.to_datetime(),
        expires_at: cert.validity().not_after.to_datetime(),
        revoked_at: None,
        successor_of: None,
        successor: None,
    }
}

/// A PEM CRL signed by the test CA listing `revoked`, made by `pgmtls::pki::build_crl`, the
/// function the CLI revokes with. Its CRL number is 1, as the first CRL `mtls create` writes.
pub fn crl_pem(pki: &TestPki, revoked: &[&Role]) -> String {
    crl_pem_numbered(pki, revoked, 1)
}

/// As [`crl_pem`], with CRL number `number`.
pub fn crl_pem_numbered(pki: &TestPki, revoked: &[&Role], number: u64) -> String {
    let signer = pgmtls::pki::CaSigner::from_pem(&pki.ca.cert_pem, &pki.ca.key_pem).unwrap();
    let now = OffsetDateTime::now_utc();
    let entries: Vec<(String, OffsetDateTime)> = revoked
        .iter()
        .map(|r| (serial_of(r), now - Duration::minutes(1)))
        .collect();
    pgmtls::pki::build_crl(
        &signer,
        &entries,
        number,
        now - Duration::minutes(1),
        now + Duration::days(7),
    )
    .unwrap()
}

/// Mode bits of a file, for assertions.
pub fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// A fresh server certificate for `localhost` under the test CA: (chain PEM, key PEM).
pub fn server_cert(pki: &TestPki) -> (String, String) {
    let key = KeyPair::from_pem(&pki.ca.key_pem).unwrap();
    let issuer = Issuer::from_ca_cert_pem(&pki.ca.cert_pem, key).unwrap();
    let mut params =
        rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "rotated server");
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::days(1);
    params.not_after = now + Duration::days(90);
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let leaf_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let cert = params.signed_by(&leaf_key, &issuer).unwrap();
    (
        format!("{}{}", cert.pem(), pki.ca.cert_pem),
        leaf_key.serialize_pem(),
    )
}

/// A proxy serving one database `orders` in front of `pg`, with `rules` and `extra`
/// pgmtls.yaml lines, from a fresh state directory.
pub fn start_orders(
    pki: &super::pki::TestPki,
    pg: &super::pg::PgServer,
    rules: &[(&str, &str)],
    extra: &str,
) -> (TestState, super::proxy::ProxyProcess) {
    let state = TestState::new(extra);
    state.add_database("orders", pki, "127.0.0.1:0", pg.addr(), rules);
    let proxy = super::proxy::ProxyProcess::with_config(&state.config);
    (state, proxy)
}
