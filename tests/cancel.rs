//! Query cancellation through the proxy: psql's Ctrl-C (a plaintext CancelRequest from libpq
//! before 17), tokio-postgres' cancel over TLS, and refusal of keys the proxy never issued.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::clients::{pg_connect_tls, tls_client_config, Psql, SslNegotiation};
use common::pg::{pg_available_or_skip, PgServer, APP_DB, APP_PASSWORD, APP_USER};
use common::pki::TestPki;
use common::proxy::ProxyProcess;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::error::SqlState;
use tokio_postgres_rustls::MakeRustlsConnect;

const HOST: &str = "127.0.0.1";
const SLEEP_SQL: &str = "SELECT pg_sleep(60)";

fn setup() -> Option<(PgServer, TestPki, ProxyProcess)> {
    if !pg_available_or_skip() {
        return None;
    }
    let pg = PgServer::start();
    let pki = TestPki::new();
    let proxy = ProxyProcess::quick(&pki, pg.addr(), &["127.0.0.1/32"], &[]);
    Some((pg, pki, proxy))
}

/// Waits until the upstream shows the sleep running: the readiness signal for "the query is in
/// flight". Polls the server's own view, there is no event to wait on.
async fn wait_until_sleeping(pg: &PgServer) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let n = pg.superuser_exec(
            "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60)' AND state = 'active'",
        );
        if n == "1" {
            return;
        }
        assert!(Instant::now() < deadline, "the sleep never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_in_psql_cancels_a_running_query_through_the_proxy() {
    let Some((pg, pki, proxy)) = setup() else {
        return;
    };
    let psql = Psql::new(pg.psql_path(), HOST, proxy.addr().port(), APP_USER, APP_DB)
        .verify_ca(
            &pki.ca.cert_path,
            Some((&pki.client.chain_path, &pki.client.key_path)),
        )
        .password(APP_PASSWORD);
    let mut cmd = tokio::process::Command::new(pg.psql_path());
    cmd.arg(psql.conninfo())
        .args(["-X", "-c", SLEEP_SQL])
        .env("PGPASSWORD", APP_PASSWORD)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().unwrap();
    let pid = child.id().unwrap();
    wait_until_sleeping(&pg).await;
    let started = Instant::now();
    let ok = std::process::Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("psql returns once cancelled")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("canceling statement due to user request"),
        "{stderr}"
    );
    assert!(started.elapsed() < Duration::from_secs(30));
    let line = proxy.wait_for_log(Duration::from_secs(10), |v| {
        v["message"] == "connection closed" && v["outcome"] == "cancel_forwarded"
    });
    assert_eq!(line["negotiation"], "cancel");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_cancel_over_tls_cancels_the_query() {
    let Some((_pg, pki, proxy)) = setup() else {
        return;
    };
    let tls = tls_client_config(
        &pki.ca.cert_path,
        Some((&pki.client.chain_path, &pki.client.key_path)),
        false,
    );
    let (c, _conn) = pg_connect_tls(
        HOST,
        proxy.addr().port(),
        APP_USER,
        APP_DB,
        Some(APP_PASSWORD),
        tls.clone(),
        SslNegotiation::Postgres,
    )
    .await
    .unwrap();
    let token = c.cancel_token();
    let query = tokio::spawn(async move { c.simple_query(SLEEP_SQL).await.map(|_| ()) });
    // The proxy logs nothing until the session ends; wait for the backend instead.
    let (probe, _pconn) = pg_connect_tls(
        HOST,
        proxy.addr().port(),
        APP_USER,
        APP_DB,
        Some(APP_PASSWORD),
        tls.clone(),
        SslNegotiation::Postgres,
    )
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let n: i64 = probe
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE query = $1 AND state = 'active'",
                &[&SLEEP_SQL],
            )
            .await
            .unwrap()
            .get(0);
        if n == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "the sleep never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    token
        .cancel_query(MakeRustlsConnect::new(tls))
        .await
        .expect("cancel through pgmtls");
    let err = tokio::time::timeout(Duration::from_secs(30), query)
        .await
        .expect("cancelled quickly")
        .unwrap()
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::QUERY_CANCELED));
}

#[tokio::test]
async fn cancel_with_a_key_the_proxy_never_issued_is_refused() {
    let Some((_pg, _pki, proxy)) = setup() else {
        return;
    };
    let mut s = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
    let mut req = 16u32.to_be_bytes().to_vec();
    req.extend_from_slice(&80_877_102u32.to_be_bytes());
    req.extend_from_slice(&1234u32.to_be_bytes());
    req.extend_from_slice(&5678u32.to_be_bytes());
    s.write_all(&req).await.unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    proxy.wait_for_refusal("cancel_unknown_key");
}
