//! The upstream side: unreachable upstream, TLS upstreams with `verify-full`, and SCRAM channel
//! binding, which cannot work through any TLS terminator and must fail clearly.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::clients::{
    error_chain, free_port, pg_connect_tls, tls_client_config, Psql, SslNegotiation,
};
use common::pg::{
    pg_available_or_skip, PgServer, ServerTls, APP_DB, APP_PASSWORD, APP_USER, TRUST_USER,
};
use common::pki::TestPki;
use common::proxy::{path, ProxyProcess};
use tokio_postgres::error::SqlState;

const HOST: &str = "127.0.0.1";

fn psql(pg: &PgServer, pki: &TestPki, proxy: &ProxyProcess, user: &str) -> Psql {
    Psql::new(pg.psql_path(), HOST, proxy.addr().port(), user, APP_DB).verify_ca(
        &pki.ca.cert_path,
        Some((&pki.client.chain_path, &pki.client.key_path)),
    )
}

/// Postgres doing TLS itself, and pgmtls dialing it with `verify-full`.
fn tls_upstream() -> Option<(PgServer, TestPki, ProxyProcess)> {
    if !pg_available_or_skip() {
        return None;
    }
    let pki = TestPki::new();
    let pg = PgServer::builder()
        .ssl(ServerTls::from_roles(&pki.upstream_server, None))
        .start();
    let proxy = ProxyProcess::quick(
        &pki,
        pg.addr(),
        &["127.0.0.1/32"],
        &[
            "--upstream-tls",
            "verify-full",
            "--upstream-ca",
            path(&pki.upstream_ca.cert_path),
        ],
    );
    Some((pg, pki, proxy))
}

#[tokio::test]
async fn unreachable_upstream_gets_08006_inside_tls_without_addresses() {
    if !pg_available_or_skip() {
        return;
    }
    let pki = TestPki::new();
    let dead = format!("127.0.0.1:{}", free_port());
    let proxy = ProxyProcess::quick(&pki, dead.parse().unwrap(), &["127.0.0.1/32"], &[]);
    let tls = tls_client_config(
        &pki.ca.cert_path,
        Some((&pki.client.chain_path, &pki.client.key_path)),
        false,
    );
    let result = pg_connect_tls(
        HOST,
        proxy.addr().port(),
        APP_USER,
        APP_DB,
        Some(APP_PASSWORD),
        tls,
        SslNegotiation::Postgres,
    )
    .await;
    let Err(err) = result else {
        panic!("must fail with the upstream down");
    };
    let db = err
        .as_db_error()
        .expect("an ErrorResponse, not a dropped socket");
    assert_eq!(db.code(), &SqlState::CONNECTION_FAILURE);
    assert!(db.message().contains("not reachable"), "{}", db.message());
    assert!(
        !db.message().contains(&dead),
        "address leaked: {}",
        db.message()
    );
    proxy.wait_for_refusal("upstream_unavailable");
}

#[tokio::test]
async fn verify_full_tls_upstream_serves_a_cert_less_trust_role() {
    let Some((pg, pki, proxy)) = tls_upstream() else {
        return;
    };
    let out = psql(&pg, &pki, &proxy, TRUST_USER)
        .run_async("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .await;
    assert_eq!(out.expect_ok().trim(), "t", "the upstream leg is TLS too");
}

#[tokio::test]
async fn verify_full_refuses_an_upstream_certificate_from_another_ca() {
    if !pg_available_or_skip() {
        return;
    }
    let pki = TestPki::new();
    let pg = PgServer::builder()
        .ssl(ServerTls::from_roles(&pki.upstream_server, None))
        .start();
    // Trusting the client CA instead of the upstream's CA must fail closed.
    let proxy = ProxyProcess::quick(
        &pki,
        pg.addr(),
        &["127.0.0.1/32"],
        &[
            "--upstream-tls",
            "verify-full",
            "--upstream-ca",
            path(&pki.ca.cert_path),
        ],
    );
    let out = psql(&pg, &pki, &proxy, TRUST_USER)
        .run_async("SELECT 1")
        .await;
    assert!(!out.success());
    assert!(out.stderr.contains("not reachable"), "{}", out.stderr);
    proxy.wait_for_refusal("upstream_tls");
}

#[tokio::test]
async fn scram_through_a_tls_upstream_fails_with_the_channel_binding_remedy() {
    let Some((pg, pki, proxy)) = tls_upstream() else {
        return;
    };
    // Default psql: channel_binding=prefer picks SCRAM-SHA-256-PLUS over TLS.
    let out = psql(&pg, &pki, &proxy, APP_USER)
        .password(APP_PASSWORD)
        .run_async("SELECT 1")
        .await;
    assert!(!out.success());
    assert!(
        out.stderr.contains("channel binding cannot succeed"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("channel_binding=disable"),
        "{}",
        out.stderr
    );
    proxy.wait_for_refusal("channel_binding");

    // The remedy it names works.
    let ok = psql(&pg, &pki, &proxy, APP_USER)
        .password(APP_PASSWORD)
        .param("channel_binding", "disable")
        .run_async("SELECT current_user")
        .await;
    assert_eq!(ok.expect_ok().trim(), APP_USER);
}

#[tokio::test]
async fn tokio_postgres_with_channel_binding_gets_the_same_clear_error() {
    let Some((_pg, pki, proxy)) = tls_upstream() else {
        return;
    };
    let tls = tls_client_config(
        &pki.ca.cert_path,
        Some((&pki.client.chain_path, &pki.client.key_path)),
        false,
    );
    let result = pg_connect_tls(
        HOST,
        proxy.addr().port(),
        APP_USER,
        APP_DB,
        Some(APP_PASSWORD),
        tls,
        SslNegotiation::Postgres,
    )
    .await;
    let Err(err) = result else {
        panic!("SCRAM-SHA-256-PLUS through a terminator cannot succeed");
    };
    let text = error_chain(&err);
    assert!(text.contains("channel_binding=disable"), "{text}");
}

#[tokio::test]
async fn default_psql_with_scram_works_over_a_plaintext_loopback_upstream() {
    if !pg_available_or_skip() {
        return;
    }
    let pg = PgServer::start();
    let pki = TestPki::new();
    let proxy = ProxyProcess::quick(&pki, pg.addr(), &["127.0.0.1/32"], &[]);
    let out = psql(&pg, &pki, &proxy, APP_USER)
        .password(APP_PASSWORD)
        .run_async("SELECT current_user")
        .await;
    assert_eq!(out.expect_ok().trim(), APP_USER);
    let method = pg.superuser_exec("SHOW password_encryption");
    assert_eq!(method, "scram-sha-256");
}

#[tokio::test]
async fn a_unix_socket_upstream_serves_psql_with_scram() {
    if !pg_available_or_skip() {
        return;
    }
    let pg = PgServer::builder()
        .hba("local all app scram-sha-256\nlocal all all trust\nhost all all 127.0.0.1/32 trust\n")
        .start();
    let pki = TestPki::new();
    let socket = format!("unix:{}/.s.PGSQL.{}", pg.socket_dir().display(), pg.port());
    let proxy = ProxyProcess::spawn(&[
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &socket,
        "--cert",
        path(&pki.server.chain_path),
        "--key",
        path(&pki.server.key_path),
        "--client-ca",
        path(&pki.ca.cert_path),
        "--allow",
        "127.0.0.1/32",
        "--admin-listen",
        "off",
    ]);
    let out = psql(&pg, &pki, &proxy, APP_USER)
        .password(APP_PASSWORD)
        .run_async("SELECT current_user || ' ' || coalesce(inet_client_addr()::text, 'local')")
        .await;
    assert_eq!(out.expect_ok().trim(), "app local");
}
