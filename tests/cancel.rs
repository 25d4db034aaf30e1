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
use common::wire::{cancel_request, protocol_32_upstream};
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

#[tokio::test]
async fn a_postgresql_18_cancel_key_is_learned_and_forwarded_byte_for_byte() {
    let pki = TestPki::new();
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up_addr = upstream.local_addr().unwrap();
    let secret: Vec<u8> = (0u8..32).map(|i| i.wrapping_mul(37) ^ 0xa5).collect();
    let (tx, mut cancels) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(protocol_32_upstream(upstream, secret.clone(), tx));
    let proxy = ProxyProcess::quick(&pki, up_addr, &["127.0.0.1/32"], &[]);

    // A session asking for protocol 3.2, as libpq 18 does with max_protocol_version=3.2.
    let mut tcp = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
    tcp.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
        .await
        .unwrap();
    let mut s = [0u8; 1];
    tcp.read_exact(&mut s).await.unwrap();
    assert_eq!(&s, b"S");
    let tls = tls_client_config(
        &pki.ca.cert_path,
        Some((&pki.client.chain_path, &pki.client.key_path)),
        false,
    );
    let mut session = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls))
        .connect(
            rustls_pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    let startup = pgmtls::wire::frontend::StartupParams {
        minor: 2,
        params: vec![("user".into(), "app".into())],
    };
    session.write_all(&startup.encode()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    while !got.ends_with(&[b'Z', 0, 0, 0, 5, b'I']) {
        let n = session.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed before ReadyForQuery");
        got.extend_from_slice(&buf[..n]);
    }
    let mut key_data = vec![b'K', 0, 0, 0, 40];
    key_data.extend_from_slice(&4242u32.to_be_bytes());
    key_data.extend_from_slice(&secret);
    assert!(
        got.windows(key_data.len()).any(|w| w == key_data),
        "the 32-byte BackendKeyData reaches the client unchanged"
    );

    // A wrong 32-byte secret is refused and never reaches the upstream...
    let mut wrong = secret.clone();
    wrong[31] ^= 1;
    let mut c = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
    c.write_all(&cancel_request(4242, &wrong)).await.unwrap();
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).await.unwrap();
    proxy.wait_for_refusal("cancel_unknown_key");

    // ...the right one is forwarded exactly as the client sent it.
    let right = cancel_request(4242, &secret);
    let mut c = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
    c.write_all(&right).await.unwrap();
    let forwarded = tokio::time::timeout(Duration::from_secs(10), cancels.recv())
        .await
        .expect("the cancel reaches the upstream")
        .unwrap();
    assert_eq!(forwarded, right);
    assert!(
        cancels.try_recv().is_err(),
        "the wrong key was forwarded too"
    );
    drop(session);
}
