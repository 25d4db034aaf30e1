//! Failed-handshake throttling: a flood of failing handshakes from one /24 is closed at
//! accept, before any byte is read or any crypto is done, while a good client from another
//! prefix keeps connecting. The `--ignored` test measures what that buys.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::admin::{scrape, status};
use common::clients::{app_session_over, connect_from, error_chain, tls_client_config};
use common::pg::{pg_available_or_skip, PgServer};
use common::pki::TestPki;
use common::state::start_orders;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(30);
const SSL_REQUEST: &[u8] = b"\x00\x00\x00\x08\x04\xd2\x16\x2f";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// How one failing attempt ended.
#[derive(Debug, PartialEq, Eq)]
enum Attempt {
    /// Refused before TLS: the generic refusal (an 08004 ErrorResponse, docs/SECURITY.md) or
    /// a close instead of `S`, so no crypto was done.
    ClosedBeforeTls,
    /// The proxy said `S` and the handshake went on (and failed).
    Handshook,
}

/// One failing handshake from `src`: SSLRequest, then with `real_tls` a TLS handshake
/// without a client certificate (the proxy does the key exchange and signs, then refuses:
/// `client_cert_missing`), else a record of garbage (`tls_handshake`).
async fn failing_attempt(src: IpAddr, proxy: SocketAddr, pki: &TestPki, real_tls: bool) -> Attempt {
    let Ok(mut s) = connect_from(src, proxy).await else {
        return Attempt::ClosedBeforeTls;
    };
    if s.write_all(SSL_REQUEST).await.is_err() {
        return Attempt::ClosedBeforeTls;
    }
    let mut answer = [0u8; 1];
    match s.read(&mut answer).await {
        Ok(1) if answer == *b"S" => {}
        Ok(1) if answer == *b"E" => return Attempt::ClosedBeforeTls,
        Ok(0) | Err(_) => return Attempt::ClosedBeforeTls,
        Ok(_) => panic!("unexpected answer {answer:?}"),
    }
    if real_tls {
        let cfg = tls_client_config(&pki.ca.cert_path, None, false);
        let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        if let Ok(mut tls) = connector.connect(name, s).await {
            // TLS 1.3: the client is done before the server has judged its (empty)
            // certificate; the refusal is the alert read next.
            let mut b = [0u8; 64];
            let _ = tls.read(&mut b).await;
        }
    } else {
        let _ = s.write_all(b"\x16\x03\x01\x00\x05hello").await;
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest).await;
    }
    Attempt::Handshook
}

fn counted(m: &common::admin::Scrape, reason: &str) -> f64 {
    m.value(
        "pgmtls_connections_refused_total",
        &format!(r#"database="orders",reason="{reason}""#),
    )
}

/// A good client's session and one query, through the proxy from `src`.
async fn good_query(src: IpAddr, proxy: SocketAddr, pki: &TestPki) -> Duration {
    let started = Instant::now();
    let s = connect_from(src, proxy).await.unwrap();
    let (c, conn) = app_session_over(s, proxy, pki, &pki.client)
        .await
        .unwrap_or_else(|e| panic!("good client from {src} refused: {}", error_chain(&e)));
    let v: i32 = c.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(v, 1);
    let took = started.elapsed();
    drop(c);
    conn.await.unwrap().ok();
    took
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_failing_handshakes_is_closed_before_crypto_and_others_get_in() {
    if !pg_available_or_skip() {
        return;
    }
    let pg = PgServer::start();
    let pki = TestPki::new();
    // A block long enough to outlast the test on a loaded machine.
    let (_state, proxy) = start_orders(
        &pki,
        &pg,
        &[("lo", "127.0.0.0/16")],
        "handshake_throttle_burst: 10\nhandshake_throttle_backoff: 2m\n",
    );
    let addr = proxy.addr();
    let flood = ip("127.0.0.3");

    // Ten failures, every other one a real TLS handshake without a certificate: the burst.
    for i in 0..10 {
        let a = failing_attempt(flood, addr, &pki, i % 2 == 0).await;
        assert_eq!(a, Attempt::Handshook, "attempt {i} was not handshaken");
    }
    let blocked = proxy.wait_for_log(WAIT, |v| {
        v["message"] == "handshake failures: source prefix throttled"
    });
    assert_eq!(blocked["prefix"], "127.0.0.0/24");
    assert_eq!(blocked["backoff_ms"], 120_000);
    // From now on the flood is closed before the proxy answers its SSLRequest.
    for i in 0..40 {
        let a = failing_attempt(flood, addr, &pki, true).await;
        assert_eq!(
            a,
            Attempt::ClosedBeforeTls,
            "flood attempt {i} got a handshake"
        );
    }
    let line = proxy.wait_for_refusal("handshake_throttled");
    assert!(line["client_addr"]
        .as_str()
        .unwrap()
        .starts_with("127.0.0.3:"));
    assert!(line["tls_version"].is_null(), "{line}");
    // The whole /24 is blocked; another /24 is served throughout.
    assert_eq!(
        failing_attempt(ip("127.0.0.2"), addr, &pki, false).await,
        Attempt::ClosedBeforeTls
    );
    good_query(ip("127.0.1.2"), addr, &pki).await;
    let m = scrape(proxy.admin()).await;
    assert_eq!(counted(&m, "handshake_throttled"), 41.0);
    assert_eq!(counted(&m, "client_cert_missing"), 5.0);
    assert_eq!(counted(&m, "tls_handshake"), 5.0);
    // /status names the prefix.
    let st = status(proxy.admin()).await;
    let t = &st["handshake_throttle"];
    assert_eq!(t["throttled"], 1, "{t}");
    assert_eq!(t["prefixes"][0]["prefix"], "127.0.0.0/24");
    assert!(
        t["prefixes"][0]["remaining_ms"].as_u64().unwrap() > 60_000,
        "{t}"
    );
}

/// The figures for the notes: refusals per second before crypto during a flood, and a good
/// client's connect+query p99 with and without it, and with the throttle off.
/// `cargo test --test throttle -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn measure_throttling() {
    if !pg_available_or_skip() {
        return;
    }
    let pg = PgServer::start();
    let pki = Arc::new(TestPki::new());
    let rounds = 100;
    for (label, config) in [
        ("throttle on", "handshake_throttle_burst: 20\n"),
        ("throttle off", "handshake_throttle_burst: off\n"),
    ] {
        let (_state, proxy) = start_orders(&pki, &pg, &[("lo", "127.0.0.0/16")], config);
        let addr = proxy.addr();
        let good = ip("127.0.1.2");
        for _ in 0..20 {
            good_query(good, addr, &pki).await;
        }
        let mut quiet = Vec::new();
        for _ in 0..rounds {
            quiet.push(good_query(good, addr, &pki).await);
        }
        // Four flooding tasks, real TLS handshakes without a certificate, 50 a second each
        // (the same load both times, and CPU left for the good client).
        let stop = Arc::new(AtomicBool::new(false));
        let (closed, handshook) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let (stop, closed, handshook, pki) =
                (stop.clone(), closed.clone(), handshook.clone(), pki.clone());
            tasks.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(20));
                while !stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    match failing_attempt(ip("127.0.0.3"), addr, &pki, true).await {
                        Attempt::ClosedBeforeTls => closed.fetch_add(1, Ordering::Relaxed),
                        Attempt::Handshook => handshook.fetch_add(1, Ordering::Relaxed),
                    };
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = scrape(proxy.admin()).await;
        let started = Instant::now();
        let mut flooded = Vec::new();
        for _ in 0..rounds {
            flooded.push(good_query(good, addr, &pki).await);
        }
        let elapsed = started.elapsed().as_secs_f64();
        let after = scrape(proxy.admin()).await;
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            t.await.unwrap();
        }
        let p99 = |v: &mut Vec<Duration>| {
            v.sort();
            v[v.len() * 99 / 100 - 1].as_secs_f64() * 1e3
        };
        let (q, f) = (p99(&mut quiet), p99(&mut flooded));
        let rate = |reason: &str| (counted(&after, reason) - counted(&before, reason)) / elapsed;
        eprintln!(
            "{label}: good client connect+query p99 {q:.1} ms quiet, {f:.1} ms during the \
             flood ({:.2}x); flood refused before crypto {:.0}/s, failed handshakes {:.0}/s \
             (flood totals: {} closed before TLS, {} handshaken)",
            f / q,
            rate("handshake_throttled"),
            rate("client_cert_missing"),
            closed.load(Ordering::Relaxed),
            handshook.load(Ordering::Relaxed),
        );
    }
}
