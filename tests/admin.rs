//! The admin endpoint over real HTTP: exact metric values after a scripted set of
//! connections, `/status` and `/healthz`, `/readyz` flipping on SIGTERM before the drain ends,
//! and peer-supplied strings reaching the log escaped.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::admin::{get, scrape, status};
use common::clients::{connect_from, pg_config, pg_connect_tls_over, tls_client_config, ConnTask};
use common::pg::{pg_available_or_skip, PgServer, APP_DB, APP_PASSWORD, APP_USER};
use common::pki::{Role, TestPki};
use common::proxy::ProxyProcess;
use common::state::TestState;
use pgmtls::admin::OPENMETRICS_CONTENT_TYPE;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::config::SslMode;
use tokio_postgres::Client;

const WAIT: Duration = Duration::from_secs(20);

async fn session(
    proxy: &ProxyProcess,
    pki: &TestPki,
    cert: Option<&Role>,
    user: &str,
) -> Result<(Client, ConnTask), tokio_postgres::Error> {
    let stream = connect_from("127.0.0.2".parse().unwrap(), proxy.addr())
        .await
        .unwrap();
    let mut cfg = pg_config(
        "127.0.0.1",
        proxy.addr().port(),
        user,
        APP_DB,
        Some(APP_PASSWORD),
    );
    cfg.ssl_mode(SslMode::Require);
    let tls = tls_client_config(
        &pki.ca.cert_path,
        cert.map(|c| (c.chain_path.as_path(), c.key_path.as_path())),
        false,
    );
    pg_connect_tls_over(stream, &cfg, tls).await
}

/// A plaintext StartupMessage, which the proxy answers with one ErrorResponse and a close.
async fn plaintext_startup(from: &str, addr: SocketAddr) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&196_608u32.to_be_bytes());
    body.extend_from_slice(b"user\0app\0\0");
    let mut msg = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    msg.extend(body);
    let mut s = connect_from(from.parse::<IpAddr>().unwrap(), addr)
        .await
        .unwrap();
    s.write_all(&msg).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    out
}

async fn probe(from: &str, addr: SocketAddr) {
    let mut s = connect_from(from.parse::<IpAddr>().unwrap(), addr)
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    assert!(out.is_empty());
}

fn closed(v: &Value) -> bool {
    v["message"] == "connection closed"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_a_scripted_set_of_connections_exactly() {
    if !pg_available_or_skip() {
        return;
    }
    let pg = PgServer::start();
    let pki = TestPki::new();
    let state = TestState::new("");
    state.add_database(
        "orders",
        &pki,
        "127.0.0.1:0",
        pg.addr(),
        &[("r2", "127.0.0.2/32")],
    );
    let proxy = ProxyProcess::with_config(&state.config);
    let addr = proxy.addr();
    let admin = proxy.admin();

    // Three good sessions, each with a query.
    for i in 0..3 {
        let (c, conn) = session(&proxy, &pki, Some(&pki.client), APP_USER)
            .await
            .unwrap();
        let v: i32 = c.query_one("SELECT $1::int", &[&i]).await.unwrap().get(0);
        assert_eq!(v, i);
        drop(c);
        conn.await.unwrap().unwrap();
    }
    // Two peers outside the allowlist, one plaintext startup, and three bad certificates.
    probe("127.0.0.3", addr).await;
    probe("127.0.0.4", addr).await;
    assert_eq!(plaintext_startup("127.0.0.2", addr).await[0], b'E');
    assert!(session(&proxy, &pki, None, APP_USER).await.is_err());
    assert!(session(&proxy, &pki, Some(&pki.other_ca_client), APP_USER)
        .await
        .is_err());
    assert!(session(&proxy, &pki, Some(&pki.expired_client), APP_USER)
        .await
        .is_err());
    let last = proxy.wait_for_nth_log(9, WAIT, closed);
    let _ = last;

    let r = get(admin, "/metrics").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some(OPENMETRICS_CONTENT_TYPE));
    assert!(r.body.ends_with("# EOF\n"));
    let m = common::admin::Scrape::parse(&r.body);
    let db = r#"database="orders""#;
    assert_eq!(m.value("pgmtls_connections_accepted_total", db), 3.0);
    let expected = [
        ("ip_not_allowed", 2.0),
        ("tls_required", 1.0),
        ("client_cert_missing", 1.0),
        ("client_cert_untrusted", 1.0),
        ("client_cert_expired", 1.0),
    ];
    for kind in pgmtls::conn::error::ErrorKind::ALL {
        let want = expected
            .iter()
            .find(|(k, _)| *k == kind.as_str())
            .map_or(0.0, |(_, n)| *n);
        let got = m.value(
            "pgmtls_connections_refused_total",
            &format!(r#"database="orders",reason="{}""#, kind.as_str()),
        );
        assert_eq!(got, want, "reason {kind}");
    }
    assert_eq!(m.value("pgmtls_sessions_active", db), 0.0);
    assert_eq!(
        m.value("pgmtls_tls_handshake_duration_seconds_count", ""),
        3.0
    );
    assert_eq!(
        m.value("pgmtls_upstream_connect_duration_seconds_count", db),
        3.0
    );
    assert_eq!(m.value("pgmtls_session_duration_seconds_count", db), 3.0);
    // Bytes agree exactly with the three sessions' close lines.
    let (mut up, mut down) = (0.0, 0.0);
    for n in 1..=3 {
        let line = proxy.wait_for_nth_log(n, WAIT, |v| closed(v) && v["outcome"] == "closed");
        up += line["bytes_to_upstream"].as_f64().unwrap();
        down += line["bytes_to_client"].as_f64().unwrap();
    }
    assert!(up > 0.0 && down > 0.0);
    assert_eq!(
        m.value(
            "pgmtls_relayed_bytes_total",
            r#"database="orders",direction="to_upstream""#
        ),
        up
    );
    assert_eq!(
        m.value(
            "pgmtls_relayed_bytes_total",
            r#"database="orders",direction="to_client""#
        ),
        down
    );
    assert_eq!(
        m.value(
            "pgmtls_cancel_requests_total",
            r#"database="orders",result="forwarded""#
        ),
        0.0
    );
    assert_eq!(
        m.value("pgmtls_reloads_total", r#"kind="startup",result="ok""#),
        1.0
    );
    assert_eq!(m.value("pgmtls_config_generation", ""), 1.0);
    assert_eq!(m.value("pgmtls_ip_rules", db), 1.0);
    assert_eq!(
        m.value(
            "pgmtls_build_info",
            &format!(r#"version="{}""#, env!("CARGO_PKG_VERSION"))
        ),
        1.0
    );
    assert!(m.value("pgmtls_process_resident_memory_bytes", "") > 1e6);
    assert!(m.value("pgmtls_process_open_fds", "") >= 5.0);
    assert!(m.value("pgmtls_process_cpu_seconds_total", "") > 0.0);
    let expiry = m.value("pgmtls_server_certificate_expiry_timestamp_seconds", db);
    assert!(expiry > time::OffsetDateTime::now_utc().unix_timestamp() as f64);
}

#[tokio::test]
async fn status_and_health_describe_the_running_configuration() {
    let pki = TestPki::new();
    let state = TestState::new("");
    let upstream: SocketAddr = "127.0.0.1:9".parse().unwrap();
    state.add_database(
        "orders",
        &pki,
        "127.0.0.1:0",
        upstream,
        &[("r2", "127.0.0.2/32")],
    );
    state.add_certificate_record("orders", "app-1", &pki.client);
    let proxy = ProxyProcess::with_config(&state.config);
    let admin = proxy.admin();
    assert!(admin.ip().is_loopback());

    let h = get(admin, "/healthz").await;
    assert_eq!((h.status, h.body.as_str()), (200, "ok\n"));
    assert_eq!(get(admin, "/readyz").await.status, 200);
    assert_eq!(get(admin, "/nothing").await.status, 404);

    let s = status(admin).await;
    assert_eq!(s["generation"], 1);
    assert_eq!(s["ready"], true);
    assert_eq!(s["draining"], false);
    assert_eq!(s["content_hash"].as_str().unwrap().len(), 64);
    let lr = &s["last_reload"];
    assert_eq!(lr["trigger"], "startup");
    assert_eq!(lr["ok"], true);
    assert!(lr["error"].is_null());
    time::OffsetDateTime::parse(
        lr["at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let db = &s["databases"]["orders"];
    assert_eq!(db["operational"], true);
    assert_eq!(db["listen"], proxy.addr().to_string());
    assert_eq!(db["rules"], serde_json::json!(["r2"]));
    assert_eq!(db["crl_entries"], 0);
    let cert = &db["certificates"][0];
    assert_eq!(cert["id"], "app-1");
    assert_eq!(cert["serial"], common::state::serial_of(&pki.client));
    assert_eq!(cert["revoked"], false);
    assert!(cert["expires_at"].is_string());
    assert!(db["server_cert_expires_at"].is_string());
    assert!(db["ca_expires_at"].is_string());
    // The CLI reads this with the library's own type: the JSON round-trips.
    let typed: pgmtls::admin::Status = serde_json::from_value(s.clone()).unwrap();
    assert_eq!(typed.databases["orders"].rules, ["r2"]);

    let m = scrape(admin).await;
    assert_eq!(
        m.value(
            "pgmtls_client_certificate_expiry_timestamp_seconds",
            r#"database="orders",certificate="app-1""#
        ),
        typed.databases["orders"].certificates[0]
            .expires_at
            .unix_timestamp() as f64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_fails_as_soon_as_sigterm_starts_the_drain() {
    if !pg_available_or_skip() {
        return;
    }
    let pg = PgServer::start();
    let pki = TestPki::new();
    let state = TestState::new("shutdown_grace: 60s\n");
    state.add_database(
        "orders",
        &pki,
        "127.0.0.1:0",
        pg.addr(),
        &[("r2", "127.0.0.2/32")],
    );
    let mut proxy = ProxyProcess::with_config(&state.config);
    let admin = proxy.admin();
    let (c, conn) = session(&proxy, &pki, Some(&pki.client), APP_USER)
        .await
        .unwrap();
    assert_eq!(get(admin, "/readyz").await.status, 200);

    proxy.signal("TERM");
    proxy.wait_for_log(WAIT, |v| v["message"] == "draining");
    // The live session holds the drain open; meanwhile the load balancer is told to stop.
    let r = get(admin, "/readyz").await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.body.contains("draining"));
    assert_eq!(get(admin, "/healthz").await.status, 200);
    let s = status(admin).await;
    assert_eq!(s["draining"], true);
    assert_eq!(s["ready"], false);
    let v: i32 = c.query_one("SELECT 7", &[]).await.unwrap().get(0);
    assert_eq!(v, 7, "the drain has not cut the session");

    drop(c);
    conn.await.unwrap().unwrap();
    let exit = proxy.wait_exit(WAIT);
    assert!(exit.success(), "{exit:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_supplied_strings_are_escaped_in_the_log() {
    if !pg_available_or_skip() {
        return;
    }
    let pg = PgServer::start();
    let pki = TestPki::new();
    let state = TestState::new("");
    state.add_database(
        "orders",
        &pki,
        "127.0.0.1:0",
        pg.addr(),
        &[("r2", "127.0.0.2/32")],
    );
    let proxy = ProxyProcess::with_config(&state.config);
    let evil = "evil\u{1b}[2J\n{\"outcome\":\"closed\"}";
    assert!(session(&proxy, &pki, Some(&pki.client), evil)
        .await
        .is_err());
    let line = proxy.wait_for_log(WAIT, |v| closed(v) && v["pg_user"].is_string());
    let logged = line["pg_user"].as_str().unwrap();
    assert!(
        !logged.contains('\u{1b}') && !logged.contains('\n'),
        "{logged:?}"
    );
    assert!(logged.contains("\\u{1b}"), "{logged:?}");
    assert_ne!(line["outcome"], "closed");
    assert!(
        !proxy.log_text().contains('\u{1b}'),
        "a raw escape reached the log"
    );
}
