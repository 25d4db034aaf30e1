//! Client certificates: missing, from another CA, or expired each fail the TLS handshake and
//! are logged with their own reason; psql sees a TLS alert, never a database error. And the
//! identity a certificate may log in as cannot be changed by how the StartupMessage is built.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::clients::Psql;
use common::pg::{pg_available_or_skip, PgServer, APP_DB, APP_PASSWORD, APP_USER, SUPERUSER};
use common::pki::{Role, TestPki};
use common::proxy::ProxyProcess;
use common::wire;
use tokio::io::AsyncWriteExt;

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

#[tokio::test]
async fn with_user_must_match_cn_a_certificate_logs_in_only_as_its_common_name() {
    if !pg_available_or_skip() {
        return;
    }
    let pg = PgServer::start();
    let pki = TestPki::new();
    let proxy = ProxyProcess::quick(
        &pki,
        pg.addr(),
        &["127.0.0.1/32"],
        &["--user-must-match-cn"],
    );
    // CN "app" is the role the session asks for.
    let app = pki.issue_valid_client(APP_USER);
    let out = psql_with(&pg, &pki, &proxy, Some(&app))
        .run_async("SELECT current_user")
        .await;
    assert_eq!(out.expect_ok(), APP_USER);

    // The default test certificate is CN "app-client": refused inside TLS, with a fixed
    // message, before Postgres is asked anything.
    let connections_before = pg.log_contents().matches("connection received").count();
    assert!(
        connections_before >= 1,
        "the admitted session shows in the log"
    );
    let out = psql_with(&pg, &pki, &proxy, Some(&pki.client))
        .run_async("SELECT 1")
        .await;
    assert!(!out.success());
    assert!(
        out.stderr
            .contains("this client certificate may not log in as that user"),
        "{}",
        out.stderr
    );
    let line = proxy.wait_for_refusal("identity_denied");
    // Peer-supplied strings are logged escaped (quoted).
    assert_eq!(line["client_cn"], "\"app-client\"");
    assert_eq!(line["pg_user"], format!("{APP_USER:?}"));
    // Postgres logs every connection it receives (log_connections): none for the refusal.
    assert_eq!(
        pg.log_contents().matches("connection received").count(),
        connections_before
    );
}

/// Sends `pairs` as the StartupMessage with `cert` and returns the first backend message.
async fn first_answer_to_startup(
    proxy: &ProxyProcess,
    pki: &TestPki,
    cert: &Role,
    pairs: &[(&str, &str)],
) -> (u8, Vec<u8>) {
    let mut tls = wire::tls_to(proxy.addr(), pki, cert).await;
    tls.write_all(&wire::startup_packet(pairs)).await.unwrap();
    let first = wire::read_message(&mut tls)
        .await
        .expect("an answer before the proxy closes");
    if first.0 == b'E' {
        // Refusals end the connection.
        assert_eq!(wire::read_message(&mut tls).await, None);
    }
    first
}

/// PostgreSQL keeps the last of repeated startup keys. A certificate with CN=app that sends
/// `user=app, database=app, user=postgres` must not reach Postgres at all: the identity
/// check would have looked at the first `user` while the server logs in the second (here a
/// superuser that `trust` admits from the proxy's address).
#[tokio::test]
async fn a_repeated_user_key_cannot_log_a_certificate_in_as_another_role() {
    if !pg_available_or_skip() {
        return;
    }
    let pg = PgServer::start();
    let pki = TestPki::new();
    let proxy = ProxyProcess::quick(
        &pki,
        pg.addr(),
        &["127.0.0.1/32"],
        &["--user-must-match-cn"],
    );
    let app = pki.issue_valid_client(APP_USER);
    let connections_before = pg.log_contents().matches("connection received").count();

    let (tag, body) = first_answer_to_startup(
        &proxy,
        &pki,
        &app,
        &[
            ("user", APP_USER),
            ("database", APP_DB),
            ("user", SUPERUSER),
        ],
    )
    .await;
    assert_eq!(
        tag, b'E',
        "expected an ErrorResponse, got message {:?} (Postgres accepted the session)",
        tag as char
    );
    assert_eq!(wire::sqlstate(&body), "08P01");
    let line = proxy.wait_for_refusal("startup_invalid");
    assert!(
        line["detail"]
            .as_str()
            .unwrap()
            .contains(r#""user" appears more than once"#),
        "{line}"
    );
    // Nothing reached Postgres: it logs every connection it receives.
    assert_eq!(
        pg.log_contents().matches("connection received").count(),
        connections_before
    );

    // Any other repeated key, in any case, is refused the same way.
    let (tag, body) = first_answer_to_startup(
        &proxy,
        &pki,
        &app,
        &[
            ("user", APP_USER),
            ("database", APP_DB),
            ("DateStyle", "ISO"),
            ("datestyle", "SQL"),
        ],
    )
    .await;
    assert_eq!((tag, wire::sqlstate(&body).as_str()), (b'E', "08P01"));

    // The honest form of the same session still works, as the certificate's role.
    let out = psql_with(&pg, &pki, &proxy, Some(&app))
        .run_async("SELECT current_user")
        .await;
    assert_eq!(out.expect_ok(), APP_USER);
}

/// PostgreSQL truncates role names to 63 bytes. A certificate whose CN is `a`x63 + `b` (made
/// by some other CA tool; pgmtls' CLI refuses to issue it) asking for that same user would
/// pass the CN check and then be logged in as the role `a`x63. A user name of 64 bytes or
/// more is refused before Postgres is dialled.
#[tokio::test]
async fn a_user_name_postgres_would_truncate_is_refused() {
    if !pg_available_or_skip() {
        return;
    }
    let pg = PgServer::start();
    let truncated = "a".repeat(63);
    pg.superuser_exec(&format!("CREATE ROLE {truncated} LOGIN"));
    let pki = TestPki::new();
    let proxy = ProxyProcess::quick(
        &pki,
        pg.addr(),
        &["127.0.0.1/32"],
        &["--user-must-match-cn"],
    );
    let long_cn = format!("{truncated}b");
    let cert = pki.issue_valid_client(&long_cn);
    let connections_before = pg.log_contents().matches("connection received").count();

    let (tag, body) = first_answer_to_startup(
        &proxy,
        &pki,
        &cert,
        &[("user", &long_cn), ("database", APP_DB)],
    )
    .await;
    assert_eq!(
        tag, b'E',
        "expected an ErrorResponse, got message {:?} (logged in as the truncated role)",
        tag as char
    );
    assert_eq!(wire::sqlstate(&body), "08P01");
    let line = proxy.wait_for_refusal("startup_invalid");
    assert!(
        line["detail"]
            .as_str()
            .unwrap()
            .contains("longer than 63 bytes"),
        "{line}"
    );
    assert_eq!(
        pg.log_contents().matches("connection received").count(),
        connections_before
    );
}
