//! The IP allowlist is checked on accept, before any byte is read or any crypto is done.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::IpAddr;
use std::time::Duration;

use common::clients::{app_session_over, connect_from};
use common::pg::{pg_available_or_skip, PgServer};
use common::pki::TestPki;
use common::proxy::ProxyProcess;
use common::wire::assert_generic_refusal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn ssl_request() -> [u8; 8] {
    let mut r = [0u8; 8];
    r[..4].copy_from_slice(&8u32.to_be_bytes());
    r[4..].copy_from_slice(&80_877_103u32.to_be_bytes());
    r
}

/// Connects from `src`, sends an SSLRequest, and returns what came back before the close.
async fn probe_from(src: &str, proxy: &ProxyProcess) -> Vec<u8> {
    let mut s = connect_from(src.parse::<IpAddr>().unwrap(), proxy.addr())
        .await
        .unwrap();
    let _ = s.write_all(&ssl_request()).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("a refused peer is closed, not left hanging");
    out
}

#[tokio::test]
async fn peer_allowed_by_rule_connects_and_other_peer_is_closed_before_tls() {
    if !pg_available_or_skip() {
        return;
    }
    let pg = PgServer::start();
    let pki = TestPki::new();
    let proxy = ProxyProcess::quick(&pki, pg.addr(), &["127.0.0.2/32"], &[]);

    let stream = connect_from("127.0.0.2".parse().unwrap(), proxy.addr())
        .await
        .unwrap();
    let (c, _conn) = app_session_over(stream, proxy.addr(), &pki, &pki.client)
        .await
        .expect("127.0.0.2 admitted");
    let v: i32 = c.query_one("SELECT 2", &[]).await.unwrap().get(0);
    assert_eq!(v, 2);

    // 127.0.0.3 gets no 'S' and no alert: the generic refusal, nothing specific.
    assert_generic_refusal(&probe_from("127.0.0.3", &proxy).await);
    let line = proxy.wait_for_refusal("ip_not_allowed");
    assert!(line["client_addr"]
        .as_str()
        .unwrap()
        .starts_with("127.0.0.3:"));
    assert!(
        line["tls_version"].is_null(),
        "no TLS was attempted: {line}"
    );
}

#[tokio::test]
async fn database_without_rules_admits_nobody() {
    if !pg_available_or_skip() {
        return;
    }
    let pg = PgServer::start();
    let pki = TestPki::new();
    let proxy = ProxyProcess::quick(&pki, pg.addr(), &[], &[]);
    assert_generic_refusal(&probe_from("127.0.0.1", &proxy).await);
    proxy.wait_for_refusal("ip_not_allowed");
}

#[tokio::test]
async fn ipv4_peers_of_a_dual_stack_listener_are_matched_as_ipv4() {
    if !pg_available_or_skip() {
        return;
    }
    let pg = PgServer::start();
    let pki = TestPki::new();
    // On a [::] listener Linux reports IPv4 clients as ::ffff:a.b.c.d.
    let proxy = ProxyProcess::quick(&pki, pg.addr(), &["127.0.0.2/32"], &["--listen", "[::]:0"]);
    let v4_addr = std::net::SocketAddr::from(([127, 0, 0, 1], proxy.addr().port()));
    let stream = connect_from("127.0.0.2".parse().unwrap(), v4_addr)
        .await
        .unwrap();
    let (c, _conn) = app_session_over(stream, v4_addr, &pki, &pki.client)
        .await
        .expect("::ffff:127.0.0.2 matches 127.0.0.2/32");
    let v: i32 = c.query_one("SELECT 4", &[]).await.unwrap().get(0);
    assert_eq!(v, 4);
    let mut refused = connect_from("127.0.0.3".parse().unwrap(), v4_addr)
        .await
        .unwrap();
    let _ = refused.write_all(&ssl_request()).await;
    let mut out = Vec::new();
    let _ = refused.read_to_end(&mut out).await;
    assert_generic_refusal(&out);
    let line = proxy.wait_for_refusal("ip_not_allowed");
    assert!(
        line["client_addr"]
            .as_str()
            .unwrap()
            .contains("::ffff:127.0.0.3"),
        "{line}"
    );
}
