//! SIGTERM: stop accepting, let live sessions finish within `shutdown_grace`, then exit 0.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::clients::{pg_connect_tls, tls_client_config, SslNegotiation};
use common::pg::{pg_available_or_skip, PgServer, APP_DB, APP_PASSWORD, APP_USER};
use common::pki::TestPki;
use common::proxy::ProxyProcess;

async fn session(
    pki: &TestPki,
    proxy: &ProxyProcess,
) -> Result<
    (
        tokio_postgres::Client,
        tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
    ),
    tokio_postgres::Error,
> {
    let tls = tls_client_config(
        &pki.ca.cert_path,
        Some((&pki.client.chain_path, &pki.client.key_path)),
        false,
    );
    pg_connect_tls(
        "127.0.0.1",
        proxy.addr().port(),
        APP_USER,
        APP_DB,
        Some(APP_PASSWORD),
        tls,
        SslNegotiation::Postgres,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_a_running_session_then_exits_zero() {
    if !pg_available_or_skip() {
        return;
    }
    let pg = PgServer::start();
    let pki = TestPki::new();
    let mut proxy = ProxyProcess::quick(&pki, pg.addr(), &["127.0.0.1/32"], &[]);
    let (c, conn) = session(&pki, &proxy).await.unwrap();
    c.batch_execute("CREATE TABLE d (v int)").await.unwrap();

    proxy.signal("TERM");
    proxy.wait_for_log(Duration::from_secs(10), |v| v["message"] == "draining");
    // New connections are no longer accepted...
    assert!(session(&pki, &proxy).await.is_err());
    // ...while the live session keeps working.
    for i in 0..10 {
        c.execute("INSERT INTO d VALUES ($1)", &[&i]).await.unwrap();
    }
    let n: i64 = c
        .query_one("SELECT count(*) FROM d", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 10);
    drop(c);
    conn.await.unwrap().unwrap();
    let status = proxy.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_still_open_after_the_grace_period_are_closed() {
    if !pg_available_or_skip() {
        return;
    }
    let pg = PgServer::start();
    let pki = TestPki::new();
    let mut proxy = ProxyProcess::quick(
        &pki,
        pg.addr(),
        &["127.0.0.1/32"],
        &["--shutdown-grace", "1s"],
    );
    let (c, _conn) = session(&pki, &proxy).await.unwrap();
    let started = Instant::now();
    proxy.signal("TERM");
    let status = proxy.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "{status:?}");
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert!(c.simple_query("SELECT 1").await.is_err(), "session was cut");
    let line = proxy.wait_for_refusal("shutdown");
    assert_eq!(line["outcome"], "cut");
}
