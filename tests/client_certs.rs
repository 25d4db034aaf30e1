//! Client certificates: missing, from another CA, or expired each fail the TLS handshake and
//! are logged with their own reason; psql sees a TLS alert, never a database error.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::clients::Psql;
use common::pg::{pg_available_or_skip, PgServer, APP_DB, APP_PASSWORD, APP_USER};
use common::pki::{Role, TestPki};
use common::proxy::ProxyProcess;

const HOST: &str = "127.0.0.1";

fn psql_with(pg: &PgServer, pki: &TestPki, proxy: &ProxyProcess, cert: Option<&Role>) -> Psql {
    Psql::new(pg.psql_path(), HOST, proxy.addr().port(), APP_USER, APP_DB)
        .verify_ca(
            &pki.ca.cert_path,
            cert.map(|r| (r.chain_path.as_path(), r.key_path.as_path())),
        )
        .password(APP_PASSWORD)
}

fn setup() -> Option<(PgServer, TestPki, ProxyProcess)> {
    if !pg_available_or_skip() {
        return None;
    }
    let pg = PgServer::start();
    let pki = TestPki::new();
    let proxy = ProxyProcess::quick(&pki, pg.addr(), &["127.0.0.1/32"], &[]);
    Some((pg, pki, proxy))
}

#[tokio::test]
async fn client_without_certificate_fails_handshake_as_cert_missing() {
    let Some((pg, pki, proxy)) = setup() else {
        return;
    };
    let out = psql_with(&pg, &pki, &proxy, None)
        .run_async("SELECT 1")
        .await;
    assert!(!out.success());
    assert!(
        out.stderr.contains("certificate required"),
        "{}",
        out.stderr
    );
    let line = proxy.wait_for_refusal("client_cert_missing");
    assert_eq!(line["outcome"], "refused");
    assert_eq!(
        line["client_addr"].as_str().unwrap().split(':').next(),
        Some(HOST)
    );
}

#[tokio::test]
async fn certificate_from_another_ca_fails_handshake_as_untrusted() {
    let Some((pg, pki, proxy)) = setup() else {
        return;
    };
    let out = psql_with(&pg, &pki, &proxy, Some(&pki.other_ca_client))
        .run_async("SELECT 1")
        .await;
    assert!(!out.success());
    assert!(out.stderr.contains("SSL error"), "{}", out.stderr);
    proxy.wait_for_refusal("client_cert_untrusted");
}

#[tokio::test]
async fn expired_certificate_fails_handshake_as_expired() {
    let Some((pg, pki, proxy)) = setup() else {
        return;
    };
    let out = psql_with(&pg, &pki, &proxy, Some(&pki.expired_client))
        .run_async("SELECT 1")
        .await;
    assert!(!out.success());
    assert!(out.stderr.contains("certificate expired"), "{}", out.stderr);
    proxy.wait_for_refusal("client_cert_expired");
    // The same proxy still serves a valid certificate.
    let ok = psql_with(&pg, &pki, &proxy, Some(&pki.client))
        .run_async("SELECT 'still served'")
        .await;
    assert_eq!(ok.expect_ok().trim(), "still served");
}
