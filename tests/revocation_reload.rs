//! Revocation cannot fail open through a reload, and one database's broken file holds back no
//! other database: against a real PostgreSQL behind the proxy, with state-directory reloads.
//!
//! - A revoked certificate stays refused when `crl.pem` is deleted; the reload names the file.
//! - A record marked `revoked_at` is refused even though the CRL does not list it.
//! - An older CRL (lower CRL number) put back over a newer one is rejected.
//! - A typo in one database's rules does not delay a revocation in another; the broken
//!   database keeps serving its last good configuration and `/status` says why.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use common::admin::{scrape, status, wait_status};
use common::clients::{app_session_over, connect_from, ConnTask};
use common::pg::{pg_available_or_skip, PgServer};
use common::pki::{Role, TestPki};
use common::proxy::ProxyProcess;
use common::state::{crl_pem_numbered, TestState};
use serde_json::Value;
use tokio_postgres::Client;

const WAIT: Duration = Duration::from_secs(20);

/// The test application's session through the proxy listener `addr`, from 127.0.0.2.
async fn session(
    addr: SocketAddr,
    pki: &TestPki,
    cert: &Role,
) -> Result<(Client, ConnTask), tokio_postgres::Error> {
    let stream = connect_from("127.0.0.2".parse::<IpAddr>().unwrap(), addr)
        .await
        .unwrap();
    app_session_over(stream, addr, pki, cert).await
}

async fn one(c: &Client) -> i32 {
    c.query_one("SELECT 1", &[]).await.unwrap().get(0)
}

fn revoked_refusal(v: &Value) -> bool {
    v["message"] == "connection closed" && v["error_kind"] == "client_cert_revoked"
}

/// Logging in with `cert` fails, and the proxy logs the refusal as a revoked certificate.
async fn assert_refused_as_revoked(proxy: &ProxyProcess, addr: SocketAddr, pki: &TestPki) {
    let before = proxy.count_logs(revoked_refusal);
    let attempt = session(addr, pki, &pki.client).await;
    assert!(attempt.is_err(), "the revoked certificate logged in");
    proxy.wait_for_nth_log(before + 1, WAIT, revoked_refusal);
}

/// A reload rejected as a whole whose errors contain `text`.
fn rejected_with(text: &str) -> impl Fn(&Value) -> bool + '_ {
    move |v| {
        v["message"] == "reload rejected; keeping the previous configuration"
            && v["errors"].as_str().is_some_and(|e| e.contains(text))
    }
}

/// A reload that applied a change whose description contains `text`.
fn reloaded_with(text: &str) -> impl Fn(&Value) -> bool + '_ {
    move |v| {
        v["message"] == "configuration reloaded"
            && v["changes"].as_str().is_some_and(|c| c.contains(text))
    }
}

/// The record of `certificates revoke` (written after the CRL) has been applied.
const RECORD_UPDATED: &str = "orders: certificate records 1 -> 1 (";

/// Waits for the connection task to end (the proxy closed the socket), at most `limit`.
async fn closed_within(conn: ConnTask, limit: Duration) {
    tokio::time::timeout(limit, conn)
        .await
        .unwrap_or_else(|_| panic!("session still open {limit:?} after the reload"))
        .unwrap()
        .ok();
}

/// Database `orders` in front of `pg`, admitting 127.0.0.0/8, with the record `app-1` for
/// `pki.client`.
fn start(pki: &TestPki, pg: &PgServer) -> (TestState, ProxyProcess) {
    let state = TestState::new("");
    state.add_database(
        "orders",
        pki,
        "127.0.0.1:0",
        pg.addr(),
        &[("lo", "127.0.0.0/8")],
    );
    state.add_certificate_record("orders", "app-1", &pki.client);
    let proxy = ProxyProcess::with_config(&state.config);
    (state, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_the_crl_does_not_let_a_revoked_certificate_back_in() {
    if !pg_available_or_skip() {
        return;
    }
    let pg = PgServer::start();
    let pki = TestPki::new();
    let (state, proxy) = start(&pki, &pg);
    let addr = proxy.addr();
    let (a, a_conn) = session(addr, &pki, &pki.client).await.unwrap();
    assert_eq!(one(&a).await, 1);

    state.revoke("orders", &pki, "app-1", &pki.client, 2);
    proxy.wait_for_log(WAIT, reloaded_with(RECORD_UPDATED));
    closed_within(a_conn, WAIT).await;
    assert_refused_as_revoked(&proxy, addr, &pki).await;

    // The attack: the CRL disappears (deleted, or lost when shipping the state).
    let crl = state.db_dir("orders").join("crl.pem");
    std::fs::remove_file(&crl).unwrap();
    let line = proxy.wait_for_log(WAIT, rejected_with("crl.pem: missing"));
    assert!(
        line["errors"]
            .as_str()
            .unwrap()
            .contains(&crl.display().to_string()),
        "the file is named: {line}"
    );
    assert_refused_as_revoked(&proxy, addr, &pki).await;

    let s = status(proxy.admin()).await;
    assert_eq!(s["last_reload"]["ok"], false);
    let shown = s["databases"]["orders"]["reload_error"].as_str().unwrap();
    assert!(shown.contains("crl.pem: missing"), "{s:#}");
    assert_eq!(s["last_reload"]["database_errors"]["orders"], shown);
    assert_eq!(s["databases"]["orders"]["certificates"][0]["revoked"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_marked_revoked_is_refused_though_the_crl_lacks_it() {
    if !pg_available_or_skip() {
        return;
    }
    let pg = PgServer::start();
    let pki = TestPki::new();
    let (state, proxy) = start(&pki, &pg);
    let addr = proxy.addr();
    let other = pki.issue_valid_client("other-app");
    let (a, a_conn) = session(addr, &pki, &pki.client).await.unwrap();
    let (b, _b_conn) = session(addr, &pki, &other).await.unwrap();
    assert_eq!(one(&a).await, 1);

    // The record says revoked; the CRL (number 1, empty) does not list it: a crash between
    // the two writes of a revocation, or a CRL restored from before it.
    state.mark_revoked("orders", "app-1", &pki.client);
    let line = proxy.wait_for_log(WAIT, reloaded_with(RECORD_UPDATED));
    assert_eq!(line["sessions_closed"], 1, "{line}");
    closed_within(a_conn, Duration::from_secs(1)).await;
    let closed = proxy.wait_for_refusal("revoked_live");
    assert_eq!(closed["detail"], "client certificate revoked");
    assert_refused_as_revoked(&proxy, addr, &pki).await;
    assert_eq!(one(&b).await, 1, "another certificate is untouched");
    assert!(
        line["changes"]
            .as_str()
            .unwrap()
            .contains("(revoked app-1)"),
        "{line}"
    );

    let s = status(proxy.admin()).await;
    assert_eq!(s["databases"]["orders"]["certificates"][0]["revoked"], true);
    assert_eq!(s["databases"]["orders"]["crl_entries"], 0);
    assert_eq!(s["last_reload"]["ok"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_crl_put_back_is_rejected_and_the_revocation_stands() {
    if !pg_available_or_skip() {
        return;
    }
    let pg = PgServer::start();
    let pki = TestPki::new();
    let (state, proxy) = start(&pki, &pg);
    let addr = proxy.addr();
    assert_eq!(
        one(&session(addr, &pki, &pki.client).await.unwrap().0).await,
        1
    );
    let crl = state.db_dir("orders").join("crl.pem");
    let before_revocation = std::fs::read(&crl).unwrap();

    // Revoked by the CRL alone (as a CRL from another tool would): number 2.
    let newer = crl_pem_numbered(&pki, &[&pki.client], 2);
    state.write_file("orders", "crl.pem", newer.as_bytes(), 0o644);
    proxy.wait_for_log(WAIT, reloaded_with("orders: crl 0 -> 1 entries"));
    assert_refused_as_revoked(&proxy, addr, &pki).await;

    // The attack: the CRL saved before the revocation (number 1) is put back.
    state.write_file("orders", "crl.pem", &before_revocation, 0o644);
    let line = proxy.wait_for_log(WAIT, rejected_with("CRL number 1 is lower than 2"));
    assert!(
        line["errors"]
            .as_str()
            .unwrap()
            .contains(&crl.display().to_string()),
        "{line}"
    );
    assert_refused_as_revoked(&proxy, addr, &pki).await;
    let s = status(proxy.admin()).await;
    assert_eq!(s["databases"]["orders"]["crl_entries"], 1);
    assert!(s["databases"]["orders"]["reload_error"]
        .as_str()
        .unwrap()
        .contains("crl.pem: CRL number 1 is lower than 2"));

    // A newer CRL is taken, and the error clears.
    let next = crl_pem_numbered(&pki, &[&pki.client], 3);
    state.write_file("orders", "crl.pem", next.as_bytes(), 0o644);
    let s = wait_status(proxy.admin(), WAIT, |s| s["last_reload"]["ok"] == true).await;
    assert!(s["databases"]["orders"]["reload_error"].is_null(), "{s:#}");
    assert_refused_as_revoked(&proxy, addr, &pki).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_typo_in_one_database_does_not_hold_back_a_revocation_in_another() {
    if !pg_available_or_skip() {
        return;
    }
    let pg = PgServer::start();
    let pki = TestPki::new();
    let state = TestState::new("");
    let lo = [("lo", "127.0.0.0/8")];
    state.add_database("orders", &pki, "127.0.0.1:0", pg.addr(), &lo);
    state.add_certificate_record("orders", "app-1", &pki.client);
    state.add_database("billing", &pki, "127.0.0.4:0", pg.addr(), &lo);
    let proxy = ProxyProcess::with_config(&state.config);
    let (orders, billing) = (proxy.addrs["orders"], proxy.addrs["billing"]);
    let admin = proxy.admin();
    let (a, a_conn) = session(orders, &pki, &pki.client).await.unwrap();
    let (b, _b_conn) = session(billing, &pki, &pki.client).await.unwrap();
    assert_eq!(one(&a).await, 1);
    assert_eq!(one(&b).await, 1);

    // billing breaks: its rules file is cut short.
    state.write_file("billing", "ip-rules.yaml", b"rules: [\n  - id: x\n", 0o644);
    proxy.wait_for_log(WAIT, rejected_with("billing/ip-rules.yaml"));

    // orders revokes a certificate meanwhile: applied at once, billing's typo notwithstanding.
    let written = Instant::now();
    state.revoke("orders", &pki, "app-1", &pki.client, 2);
    let line = proxy.wait_for_log(WAIT, reloaded_with(RECORD_UPDATED));
    closed_within(a_conn, Duration::from_secs(1)).await;
    eprintln!(
        "revocation in orders with billing broken: session closed {:?} after the write",
        written.elapsed()
    );
    assert_eq!(line["failed"], r#"["billing"]"#, "{line}");
    assert_refused_as_revoked(&proxy, orders, &pki).await;
    let named = proxy.wait_for_log(WAIT, |v| {
        v["message"] == "database change rejected; it keeps its previous configuration"
            && v["database"] == "billing"
    });
    assert_eq!(named["kept_previous"], true);

    // billing keeps serving its last good configuration, live and new sessions alike.
    assert_eq!(one(&b).await, 1);
    let (b2, _b2_conn) = session(billing, &pki, &pki.client).await.unwrap();
    assert_eq!(one(&b2).await, 1);
    let s = status(admin).await;
    assert_eq!(s["last_reload"]["ok"], false);
    let err = s["databases"]["billing"]["reload_error"].as_str().unwrap();
    assert!(err.contains("billing/ip-rules.yaml"), "{s:#}");
    assert_eq!(s["last_reload"]["database_errors"]["billing"], err);
    assert!(s["databases"]["orders"]["reload_error"].is_null());
    assert!(s["last_reload"]["database_errors"]["orders"].is_null());
    assert_eq!(s["databases"]["billing"]["operational"], true);
    assert_eq!(s["databases"]["billing"]["rules"][0], "lo");
    let m = scrape(admin).await;
    let rejected = |db: &str| {
        m.value(
            "pgmtls_database_change_rejected",
            &format!("database=\"{db}\""),
        )
    };
    assert_eq!(rejected("billing"), 1.0);
    assert_eq!(rejected("orders"), 0.0);

    // Fixed, billing's change is applied and its error clears.
    state.write_rules("billing", &[("lo", "127.0.0.0/8"), ("ten", "10.0.0.0/8")]);
    let s = wait_status(admin, WAIT, |s| s["last_reload"]["ok"] == true).await;
    assert!(s["databases"]["billing"]["reload_error"].is_null(), "{s:#}");
    assert_eq!(
        s["last_reload"]["database_errors"],
        serde_json::json!({}),
        "{s:#}"
    );
    assert_eq!(s["databases"]["billing"]["rules"][1], "ten");
    let m = scrape(admin).await;
    assert_eq!(
        m.value("pgmtls_database_change_rejected", r#"database="billing""#),
        0.0
    );
}
