//! A refusal before TLS fails fast for every client, directly and through a real HAProxy
//! (round robin, PROXY v2): libpq (`psql`), tokio-postgres and postgres.js all report the
//! refusal within two seconds, and the proxy logs and counts each one as `ip_not_allowed`.
//!
//! The client here connects from 127.0.0.1, which no rule admits (only 127.0.0.2 is); HAProxy
//! dials pgmtls from 127.0.0.4, the trusted balancer, and names 127.0.0.1 in its header. A
//! balancer turns pgmtls's close into a clean FIN, which postgres.js takes for a dropped
//! connection before its SSLRequest is answered and retries until its connect timeout: only an
//! answer makes it give up at once.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::admin::scrape;
use common::clients::{error_chain, pg_connect_tls, tls_client_config, Psql};
use common::haproxy::{haproxy_available_or_skip, HaProxy};
use common::pg::{pg_available_or_skip, PgServer, APP_DB, APP_USER};
use common::pki::TestPki;
use common::proxy::{path, ProxyProcess};
use serde_json::Value;
use tokio_postgres::config::SslNegotiation;

/// What "at once" means here; the clients' own connect timeouts are 10 s.
const FAST: Duration = Duration::from_secs(2);

struct Setup {
    _pg: PgServer,
    pki: TestPki,
    proxy: ProxyProcess,
    lb: HaProxy,
    psql: std::path::PathBuf,
}

fn setup() -> Option<Setup> {
    if !pg_available_or_skip() || !haproxy_available_or_skip() {
        return None;
    }
    let pg = PgServer::start();
    let pki = TestPki::new();
    let up = pg.addr().to_string();
    let proxy = ProxyProcess::spawn(&[
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &up,
        "--cert",
        path(&pki.server.chain_path),
        "--key",
        path(&pki.server.key_path),
        "--client-ca",
        path(&pki.ca.cert_path),
        "--allow",
        "127.0.0.2/32",
        "--proxy-protocol-from",
        "127.0.0.4/32",
        "--admin-listen",
        "127.0.0.1:0",
    ]);
    // HAProxy's own source for its connections to pgmtls: the trusted balancer.
    let lb = HaProxy::start_with(&[proxy.addr()], "source 127.0.0.4");
    let psql = pg.psql_path();
    Some(Setup {
        _pg: pg,
        pki,
        proxy,
        lb,
        psql,
    })
}

/// The routes a client takes: straight to pgmtls, or through HAProxy.
fn routes(s: &Setup) -> [(&'static str, SocketAddr); 2] {
    [("direct", s.proxy.addr()), ("haproxy", s.lb.addr)]
}

/// Waits for the `n`-th `ip_not_allowed` refusal of 127.0.0.1 and checks how it came: through
/// the balancer or not.
fn assert_logged(s: &Setup, n: usize, route: &str) {
    let line = s
        .proxy
        .wait_for_nth_log(n, Duration::from_secs(20), |v: &Value| {
            v["message"] == "connection closed" && v["error_kind"] == "ip_not_allowed"
        });
    assert!(
        line["client_addr"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:"),
        "{line}"
    );
    assert_eq!(line["outcome"], "refused", "{line}");
    assert!(
        line["tls_version"].is_null(),
        "no TLS was attempted: {line}"
    );
    match route {
        "haproxy" => assert!(
            line["lb_addr"].as_str().unwrap().starts_with("127.0.0.4:"),
            "{line}"
        ),
        _ => assert!(line["lb_addr"].is_null(), "{line}"),
    }
}

async fn assert_counted(s: &Setup, n: usize) {
    let m = scrape(s.proxy.admin()).await;
    assert_eq!(
        m.value(
            "pgmtls_connections_refused_total",
            r#"database="default",reason="ip_not_allowed""#
        ),
        n as f64,
        "one refusal per attempt, no retries"
    );
}

#[tokio::test]
async fn psql_is_refused_at_once_directly_and_through_haproxy() {
    let Some(s) = setup() else { return };
    for (i, (route, addr)) in routes(&s).into_iter().enumerate() {
        let started = Instant::now();
        let out = Psql::new(&s.psql, "127.0.0.1", addr.port(), APP_USER, APP_DB)
            .verify_ca(
                &s.pki.ca.cert_path,
                Some((&s.pki.client.chain_path, &s.pki.client.key_path)),
            )
            .run_async("SELECT 1")
            .await;
        let took = started.elapsed();
        assert!(!out.success(), "{route}: {}", out.stdout);
        // libpq since 15.10 does not print a message it got before TLS; older ones print ours.
        assert!(
            out.stderr
                .contains("server sent an error response during SSL exchange")
                || out.stderr.contains("pgmtls: connection refused"),
            "{route}: {}",
            out.stderr
        );
        assert!(took < FAST, "{route}: psql took {took:?}: {}", out.stderr);
        assert_logged(&s, i + 1, route);
    }
    assert_counted(&s, 2).await;
}

#[tokio::test]
async fn tokio_postgres_is_refused_at_once_directly_and_through_haproxy() {
    let Some(s) = setup() else { return };
    for (i, (route, addr)) in routes(&s).into_iter().enumerate() {
        let tls = tls_client_config(
            &s.pki.ca.cert_path,
            Some((&s.pki.client.chain_path, &s.pki.client.key_path)),
            false,
        );
        let started = Instant::now();
        let err = pg_connect_tls(
            "127.0.0.1",
            addr.port(),
            APP_USER,
            APP_DB,
            None,
            tls,
            SslNegotiation::Postgres,
        )
        .await
        .err()
        .unwrap_or_else(|| panic!("{route}: admitted"));
        let took = started.elapsed();
        // tokio-postgres reads only the first byte of the answer to its SSLRequest.
        let chain = error_chain(&err);
        assert!(
            chain.contains("server does not support TLS"),
            "{route}: {chain}"
        );
        assert!(took < FAST, "{route}: took {took:?}: {chain}");
        assert_logged(&s, i + 1, route);
    }
    assert_counted(&s, 2).await;
}

/// How one postgres.js connection attempt ended (tests/pgjs/connect.mjs). Its connect timeout
/// (10 s) restarts with every retry, so a client that keeps retrying is stopped here.
async fn postgres_js(s: &Setup, addr: SocketAddr, mode: &str) -> Value {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/pgjs");
    assert!(
        dir.join("node_modules/postgres").exists(),
        "postgres.js missing: `npm ci --prefix tests/pgjs` (.ci/run does)"
    );
    let run = tokio::process::Command::new("node")
        .arg(dir.join("connect.mjs"))
        .arg(addr.ip().to_string())
        .arg(addr.port().to_string())
        .arg(mode)
        .arg(&s.pki.ca.cert_path)
        .arg(&s.pki.client.chain_path)
        .arg(&s.pki.client.key_path)
        .arg("10")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "postgres.js still connecting after 30 s; {} refusals logged",
                s.proxy.count_logs(|v| v["error_kind"] == "ip_not_allowed")
            )
        })
        .expect("run node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "postgres.js printed no result ({e}): {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[tokio::test]
async fn postgres_js_is_refused_at_once_directly_and_through_haproxy() {
    let Some(s) = setup() else { return };
    let mut n = 0;
    // Through the balancer first: there the old close made postgres.js retry without end.
    for (route, addr) in routes(&s).into_iter().rev() {
        // With a required, verified TLS connection: it goes on to TLS after the refusal's
        // first byte and is answered with an alert.
        let r = postgres_js(&s, addr, "verify").await;
        assert_eq!(r["ok"], false, "{route}: {r}");
        assert_ne!(r["code"], "CONNECT_TIMEOUT", "{route}: {r}");
        assert!(
            r["message"].as_str().unwrap().contains("access denied"),
            "{route}: {r}"
        );
        assert!(
            r["ms"].as_u64().unwrap() < FAST.as_millis() as u64,
            "{route}: {r}"
        );
        n += 1;
        assert_logged(&s, n, route);

        // With `ssl: 'prefer'` it goes on in plaintext and reads the ErrorResponse itself.
        let r = postgres_js(&s, addr, "prefer").await;
        assert_eq!(r["ok"], false, "{route}: {r}");
        assert_eq!(r["code"], "08004", "{route}: {r}");
        assert_eq!(r["message"], "pgmtls: connection refused", "{route}: {r}");
        assert!(
            r["ms"].as_u64().unwrap() < FAST.as_millis() as u64,
            "{route}: {r}"
        );
        n += 1;
        assert_logged(&s, n, route);
    }
    assert_counted(&s, n).await;
}
