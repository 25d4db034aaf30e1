//! Pre-TLS negotiation: SSLRequest, GSSENCRequest, direct TLS with ALPN, plaintext refusal,
//! and hostile input. After every bad input a good client still connects.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::clients::{
    error_chain, pg_config, pg_connect_tls, pg_connect_tls_over, tls_client_config, Psql,
    SslNegotiation,
};
use common::pg::{pg_available_or_skip, PgServer, APP_DB, APP_PASSWORD, APP_USER};
use common::pki::TestPki;
use common::proxy::ProxyProcess;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::config::SslMode;

const HOST: &str = "127.0.0.1";

fn setup(extra: &[&str]) -> Option<(PgServer, TestPki, ProxyProcess)> {
    if !pg_available_or_skip() {
        return None;
    }
    let pg = PgServer::start();
    let pki = TestPki::new();
    let proxy = ProxyProcess::quick(&pki, pg.addr(), &["127.0.0.1/32"], extra);
    Some((pg, pki, proxy))
}

fn client_tls(pki: &TestPki, alpn: bool) -> rustls::ClientConfig {
    tls_client_config(
        &pki.ca.cert_path,
        Some((&pki.client.chain_path, &pki.client.key_path)),
        alpn,
    )
}

async fn good_client_queries(pki: &TestPki, addr: SocketAddr) {
    let (c, _conn) = pg_connect_tls(
        HOST,
        addr.port(),
        APP_USER,
        APP_DB,
        Some(APP_PASSWORD),
        client_tls(pki, false),
        SslNegotiation::Postgres,
    )
    .await
    .expect("a good client still connects");
    let v: i32 = c.query_one("SELECT 7", &[]).await.unwrap().get(0);
    assert_eq!(v, 7);
}

/// Reads until EOF (or reset), returning what arrived; panics if the proxy keeps it open.
async fn read_to_close(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(Duration::from_secs(15), s.read(&mut buf)).await {
            Err(_) => panic!("proxy kept the connection open; got {out:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return out,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

fn startup_message(user: &str) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&196_608u32.to_be_bytes());
    for kv in ["user", user, "database", APP_DB] {
        body.extend_from_slice(kv.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut msg = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    msg.extend_from_slice(&body);
    msg
}

fn request(code: u32) -> Vec<u8> {
    let mut v = 8u32.to_be_bytes().to_vec();
    v.extend_from_slice(&code.to_be_bytes());
    v
}

#[tokio::test]
async fn plaintext_startup_gets_one_28000_error_naming_verify_ca() {
    let Some((pg, _pki, proxy)) = setup(&[]) else {
        return;
    };
    let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
    s.write_all(&startup_message(APP_USER)).await.unwrap();
    let reply = read_to_close(&mut s).await;
    assert_eq!(reply[0], b'E', "{reply:?}");
    let text = String::from_utf8_lossy(&reply);
    assert!(text.contains("C28000"), "{text}");
    assert!(text.contains("sslmode=verify-ca"), "{text}");
    let len = u32::from_be_bytes([reply[1], reply[2], reply[3], reply[4]]) as usize;
    assert_eq!(reply.len(), len + 1, "exactly one message, then close");

    let out = Psql::new(pg.psql_path(), HOST, proxy.addr().port(), APP_USER, APP_DB)
        .param("sslmode", "disable")
        .run_async("SELECT 1")
        .await;
    assert!(!out.success());
    assert!(
        out.stderr
            .contains("TLS with a client certificate is required"),
        "{}",
        out.stderr
    );
    proxy.wait_for_refusal("tls_required");
}

#[tokio::test]
async fn gssenc_request_is_declined_and_ssl_follows_on_the_same_socket() {
    let Some((_pg, pki, proxy)) = setup(&[]) else {
        return;
    };
    let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
    s.write_all(&request(80_877_104)).await.unwrap();
    let mut answer = [0u8; 1];
    s.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"N");
    let mut cfg = pg_config(
        HOST,
        proxy.addr().port(),
        APP_USER,
        APP_DB,
        Some(APP_PASSWORD),
    );
    cfg.ssl_mode(SslMode::Require);
    let (c, _conn) = pg_connect_tls_over(s, &cfg, client_tls(&pki, false))
        .await
        .expect("SSLRequest after GSSENC refusal");
    let v: i32 = c.query_one("SELECT 3", &[]).await.unwrap().get(0);
    assert_eq!(v, 3);
}

#[tokio::test]
async fn direct_tls_with_alpn_postgresql_is_served() {
    let Some((_pg, pki, proxy)) = setup(&[]) else {
        return;
    };
    let (c, conn) = pg_connect_tls(
        HOST,
        proxy.addr().port(),
        APP_USER,
        APP_DB,
        Some(APP_PASSWORD),
        client_tls(&pki, true),
        SslNegotiation::Direct,
    )
    .await
    .expect("direct TLS with ALPN");
    let v: i32 = c.query_one("SELECT 5", &[]).await.unwrap().get(0);
    assert_eq!(v, 5);
    // Dropping the client sends Terminate; the connection task finishes the close.
    drop(c);
    conn.await.unwrap().unwrap();
    let line = proxy.wait_for_log(Duration::from_secs(10), |v| {
        v["message"] == "connection closed" && v["negotiation"] == "direct"
    });
    assert_eq!(line["alpn"], "postgresql");
}

#[tokio::test]
async fn direct_tls_without_alpn_is_refused() {
    let Some((_pg, pki, proxy)) = setup(&[]) else {
        return;
    };
    let result = pg_connect_tls(
        HOST,
        proxy.addr().port(),
        APP_USER,
        APP_DB,
        Some(APP_PASSWORD),
        client_tls(&pki, false),
        SslNegotiation::Direct,
    )
    .await;
    let Err(err) = result else {
        panic!("direct TLS without ALPN must fail");
    };
    assert!(!error_chain(&err).is_empty());
    proxy.wait_for_refusal("alpn_required");
    good_client_queries(&pki, proxy.addr()).await;
}

#[tokio::test]
async fn bad_lengths_garbage_and_oversize_packets_are_closed() {
    let Some((_pg, pki, proxy)) = setup(&[]) else {
        return;
    };
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "length 0",
            [0u32.to_be_bytes(), 196_608u32.to_be_bytes()].concat(),
        ),
        (
            "length 7",
            [7u32.to_be_bytes(), 196_608u32.to_be_bytes()].concat(),
        ),
        (
            "length 2^31-1",
            [0x7fff_ffffu32.to_be_bytes(), 196_608u32.to_be_bytes()].concat(),
        ),
        (
            "oversize startup",
            [10_001u32.to_be_bytes(), 196_608u32.to_be_bytes()].concat(),
        ),
        (
            "http garbage",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        ),
        ("unknown code", request(12345)),
    ];
    let mut oversize_body = [10_001u32.to_be_bytes(), 196_608u32.to_be_bytes()].concat();
    oversize_body.extend(std::iter::repeat_n(b'a', 9_993));
    cases.push(("oversize startup with body", oversize_body));
    for (name, bytes) in cases {
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        // The proxy may close before reading everything; a reset on write is fine.
        let _ = s.write_all(&bytes).await;
        let reply = read_to_close(&mut s).await;
        assert!(reply.is_empty(), "{name}: pre-TLS reply {reply:?}");
        good_client_queries(&pki, proxy.addr()).await;
    }
    // The log is written off the data path: wait for the seventh line, then check no more.
    proxy.wait_for_nth_log(7, Duration::from_secs(10), |v| {
        v["error_kind"] == "protocol_violation"
    });
    let refusals = proxy.count_logs(|v| v["error_kind"] == "protocol_violation");
    assert_eq!(refusals, 7, "{}", proxy.log_text());
}

#[tokio::test]
async fn bytes_sent_after_sslrequest_before_the_answer_are_refused() {
    let Some((_pg, pki, proxy)) = setup(&[]) else {
        return;
    };
    let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
    let mut stuffed = request(80_877_103);
    stuffed.extend_from_slice(&startup_message("injected"));
    s.write_all(&stuffed).await.unwrap();
    let reply = read_to_close(&mut s).await;
    assert!(
        reply.is_empty(),
        "no 'S' for a stuffed SSLRequest: {reply:?}"
    );
    proxy.wait_for_refusal("early_data");
    good_client_queries(&pki, proxy.addr()).await;
}

#[tokio::test]
async fn a_silent_socket_is_reaped_by_handshake_timeout() {
    let Some((_pg, pki, proxy)) = setup(&["--handshake-timeout", "1s"]) else {
        return;
    };
    let started = Instant::now();
    let mut silent = TcpStream::connect(proxy.addr()).await.unwrap();
    let mut half = TcpStream::connect(proxy.addr()).await.unwrap();
    half.write_all(&request(80_877_103)[..4]).await.unwrap();
    // While they hang, others are served.
    good_client_queries(&pki, proxy.addr()).await;
    assert!(read_to_close(&mut silent).await.is_empty());
    assert!(read_to_close(&mut half).await.is_empty());
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900),
        "closed too early: {waited:?}"
    );
    assert!(waited < Duration::from_secs(10), "not reaped: {waited:?}");
    proxy.wait_for_refusal("handshake_timeout");
    good_client_queries(&pki, proxy.addr()).await;
}
