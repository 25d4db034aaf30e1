//! Behind a load balancer that speaks the PROXY protocol: connections from the trusted
//! balancer (127.0.0.4 here) are judged by the client address their header names, everyone
//! else by their own address, and nobody else can claim an address with a header.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::clients::{app_session_over, connect_from, Psql};
use common::pg::{pg_available_or_skip, PgServer, APP_DB, APP_PASSWORD, APP_USER};
use common::pki::TestPki;
use common::proxy::ProxyProcess;
use common::wire::assert_generic_refusal;
use ppp::v2::{Builder, Command, Protocol, Version};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const BALANCER: &str = "127.0.0.4";

fn setup() -> Option<(PgServer, TestPki, ProxyProcess)> {
    if !pg_available_or_skip() {
        return None;
    }
    let pg = PgServer::start();
    let pki = TestPki::new();
    let proxy = ProxyProcess::quick(
        &pki,
        pg.addr(),
        &["127.0.0.2/32"],
        &["--proxy-protocol-from", "127.0.0.4/32"],
    );
    Some((pg, pki, proxy))
}

fn v2_header(client: SocketAddr, proxy: SocketAddr) -> Vec<u8> {
    let (SocketAddr::V4(c), SocketAddr::V4(p)) = (client, proxy) else {
        panic!("IPv4 only in this test");
    };
    let addresses = ppp::v2::IPv4::new(*c.ip(), *p.ip(), c.port(), p.port());
    Builder::with_addresses(Version::Two | Command::Proxy, Protocol::Stream, addresses)
        .build()
        .unwrap()
}

fn ssl_request() -> [u8; 8] {
    [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]
}

/// Connects from `src`, writes `bytes`, returns everything the proxy sent before closing.
async fn send_from(src: &str, proxy: &ProxyProcess, bytes: &[u8]) -> Vec<u8> {
    let mut s = connect_from(src.parse::<IpAddr>().unwrap(), proxy.addr())
        .await
        .unwrap();
    let _ = s.write_all(bytes).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("a refused connection is closed, not left hanging");
    out
}

async fn query_through_balancer(
    pki: &TestPki,
    proxy: &ProxyProcess,
    claimed: SocketAddr,
) -> Result<i32, String> {
    let mut stream = connect_from(BALANCER.parse().unwrap(), proxy.addr())
        .await
        .unwrap();
    stream
        .write_all(&v2_header(claimed, proxy.addr()))
        .await
        .unwrap();
    let (c, conn) = app_session_over(stream, proxy.addr(), pki, &pki.client)
        .await
        .map_err(|e| e.to_string())?;
    let v: i32 = c
        .query_one("SELECT 7", &[])
        .await
        .map_err(|e| e.to_string())?
        .get(0);
    // Dropping the client sends Terminate; the session's log line follows its end.
    drop(c);
    let _ = conn.await;
    Ok(v)
}

#[tokio::test]
async fn the_client_a_trusted_balancer_names_is_what_the_allowlist_checks() {
    let Some((_pg, pki, proxy)) = setup() else {
        return;
    };
    // The balancer's own address has no IP rule; the client it names does.
    let allowed: SocketAddr = "127.0.0.2:40001".parse().unwrap();
    assert_eq!(query_through_balancer(&pki, &proxy, allowed).await, Ok(7));
    let line = proxy.wait_for_log(Duration::from_secs(20), |v| {
        v["message"] == "connection closed" && v["client_addr"] == "127.0.0.2:40001"
    });
    assert!(
        line["lb_addr"].as_str().unwrap().starts_with("127.0.0.4:"),
        "{line}"
    );
    assert_eq!(line["rule_id"], "allow-1");

    // A client the rules do not admit is closed before TLS, and the log names it.
    let denied: SocketAddr = "127.0.0.3:40002".parse().unwrap();
    assert!(query_through_balancer(&pki, &proxy, denied).await.is_err());
    let line = proxy.wait_for_refusal("ip_not_allowed");
    assert_eq!(line["client_addr"], "127.0.0.3:40002");
    assert!(line["tls_version"].is_null(), "{line}");
}

#[tokio::test]
async fn a_trusted_balancer_must_send_the_header_and_others_cannot_use_one() {
    let Some((_pg, _pki, proxy)) = setup() else {
        return;
    };
    // From the balancer, an SSLRequest without a header: the generic refusal, nothing
    // specific (not read as a request: the header's first bytes were taken from it).
    assert_generic_refusal(&send_from(BALANCER, &proxy, &ssl_request()).await);
    let line = proxy.wait_for_refusal("proxy_protocol_invalid");
    assert!(line["client_addr"]
        .as_str()
        .unwrap()
        .starts_with("127.0.0.4:"));

    // From an address without a rule, a header claiming an allowed client changes nothing.
    let mut spoof = v2_header("127.0.0.2:40003".parse().unwrap(), proxy.addr());
    spoof.extend_from_slice(&ssl_request());
    // Its bytes are not Postgres, so it is not even told it was refused.
    assert_eq!(
        send_from("127.0.0.3", &proxy, &spoof).await,
        Vec::<u8>::new()
    );
    let line = proxy.wait_for_refusal("ip_not_allowed");
    assert!(line["client_addr"]
        .as_str()
        .unwrap()
        .starts_with("127.0.0.3:"));

    // From an allowed client, a header is just bytes that are not Postgres.
    let mut header = b"PROXY TCP4 127.0.0.2 127.0.0.1 40004 5432\r\n".to_vec();
    header.extend_from_slice(&ssl_request());
    assert_eq!(
        send_from("127.0.0.2", &proxy, &header).await,
        Vec::<u8>::new()
    );
    proxy.wait_for_refusal("protocol_violation");

    // A balancer that stalls mid-header does not hold up anyone else.
    let mut stalled = connect_from(BALANCER.parse().unwrap(), proxy.addr())
        .await
        .unwrap();
    stalled.write_all(b"PROXY TCP4 127.0").await.unwrap();
    let mut again = v2_header("127.0.0.2:40005".parse().unwrap(), proxy.addr());
    again.extend_from_slice(&ssl_request());
    let mut s = connect_from(BALANCER.parse().unwrap(), proxy.addr())
        .await
        .unwrap();
    s.write_all(&again).await.unwrap();
    let mut answer = [0u8; 1];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut answer))
        .await
        .expect("served while another balancer connection stalls")
        .unwrap();
    assert_eq!(&answer, b"S");
    drop(stalled);
}

/// A minimal TCP load balancer: accepts on loopback, dials pgmtls from 127.0.0.4, writes a v1
/// header naming `claimed` as the client, then copies bytes both ways.
async fn balancer(listener: TcpListener, target: SocketAddr, claimed: SocketAddr) {
    let (mut client, _) = listener.accept().await.unwrap();
    let mut up = connect_from(BALANCER.parse().unwrap(), target)
        .await
        .unwrap();
    let header = format!(
        "PROXY TCP4 {} {} {} {}\r\n",
        claimed.ip(),
        target.ip(),
        claimed.port(),
        target.port()
    );
    up.write_all(header.as_bytes()).await.unwrap();
    let _ = tokio::io::copy_bidirectional(&mut client, &mut up).await;
}

#[tokio::test]
async fn psql_through_a_v1_balancer() {
    let Some((pg, pki, proxy)) = setup() else {
        return;
    };
    let lb = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let lb_port = lb.local_addr().unwrap().port();
    let task = tokio::spawn(balancer(
        lb,
        proxy.addr(),
        "127.0.0.2:40006".parse().unwrap(),
    ));
    let out = Psql::new(pg.psql_path(), "127.0.0.1", lb_port, APP_USER, APP_DB)
        .verify_ca(
            &pki.ca.cert_path,
            Some((&pki.client.chain_path, &pki.client.key_path)),
        )
        .password(APP_PASSWORD)
        .run_async("SELECT 'through the balancer'")
        .await;
    assert!(out.expect_ok().contains("through the balancer"));
    // The balancer still has to pass psql's goodbye on, and this thread is its runtime: let it
    // finish (it ends once pgmtls has closed both sides) before blocking on the log.
    tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .expect("the session through the balancer ends")
        .unwrap();
    let line = proxy.wait_for_log(Duration::from_secs(20), |v| {
        v["message"] == "connection closed" && v["client_addr"] == "127.0.0.2:40006"
    });
    assert_eq!(line["outcome"], "closed", "{line}");
    assert!(line["lb_addr"].as_str().unwrap().starts_with("127.0.0.4:"));
}
