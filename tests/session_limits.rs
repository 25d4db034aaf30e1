//! A database's own session limits (`max_connections`, `max_connections_per_ip` in its
//! database.yaml, set with `pgmtls mtls update`): one session over a limit completes TLS and
//! is told SQLSTATE 53300, slots come back as sessions end, and a reload that lowers a limit
//! applies to new sessions without cutting the open ones.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::admin::scrape;
use common::clients::{error_chain, session_from, ConnTask, Psql};
use common::pg::{pg_available_or_skip, PgServer, APP_DB, APP_PASSWORD, APP_USER};
use common::pki::TestPki;
use common::proxy::{ProxyProcess, BIN};
use common::state::{start_orders, TestState};
use serde_json::Value;
use tokio_postgres::Client;

const WAIT: Duration = Duration::from_secs(30);

/// `pgmtls mtls update orders ARGS` against the test's state directory, through the CLI.
fn update(state: &TestState, args: &[&str]) -> Value {
    let out = Command::new(BIN)
        .args(["mtls", "update", "orders", "--json", "--actor", "tests"])
        .args(args)
        .arg("--state-dir")
        .arg(&state.root)
        .env_remove("PGMTLS_CONFIG")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mtls update {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Applies `args` and waits until the proxy has reloaded them.
fn update_and_reload(state: &TestState, proxy: &ProxyProcess, args: &[&str], generation: u64) {
    update(state, args);
    proxy.wait_for_log(WAIT, |v| {
        v["message"] == "configuration reloaded" && v["generation"] == generation
    });
}

async fn session(src: &str, pki: &TestPki, proxy: &ProxyProcess) -> (Client, ConnTask) {
    let (c, conn) = session_from(src, pki, &pki.client, proxy)
        .await
        .unwrap_or_else(|e| panic!("session from {src} refused: {}", error_chain(&e)));
    let v: i32 = c.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(v, 1);
    (c, conn)
}

/// The refusal a session from `src` gets: its SQLSTATE and message.
async fn refused(src: &str, pki: &TestPki, proxy: &ProxyProcess) -> (String, String) {
    let Err(e) = session_from(src, pki, &pki.client, proxy).await else {
        panic!("a session from {src} was admitted over the limit");
    };
    let db = e
        .as_db_error()
        .unwrap_or_else(|| panic!("not a Postgres error: {}", error_chain(&e)));
    (db.code().code().to_owned(), db.message().to_owned())
}

/// Ends a session and waits for the proxy's line saying it closed (its slots are free by
/// then); `closed` counts the sessions ended so far.
async fn close(proxy: &ProxyProcess, closed: &mut usize, (c, conn): (Client, ConnTask)) {
    drop(c);
    conn.await.unwrap().ok();
    *closed += 1;
    proxy.wait_for_nth_log(*closed, WAIT, |v| {
        v["message"] == "connection closed" && v["outcome"] == "closed"
    });
}

/// Waits until `reason` has been counted `want` times (the client may hear its refusal an
/// instant before the proxy counts it).
async fn wait_refusals(proxy: &ProxyProcess, reason: &str, want: f64) {
    let labels = format!(r#"database="orders",reason="{reason}""#);
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let got = scrape(proxy.admin())
            .await
            .value("pgmtls_connections_refused_total", &labels);
        if got == want {
            return;
        }
        assert!(
            got < want && std::time::Instant::now() < deadline,
            "{reason}: {got} refusals counted, want {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_databases_max_connections_refuses_with_53300_frees_slots_and_follows_reloads() {
    if !pg_available_or_skip() {
        return;
    }
    let pg = PgServer::start();
    let pki = TestPki::new();
    let (state, proxy) = start_orders(&pki, &pg, &[("lo", "127.0.0.0/24")], "");
    update_and_reload(&state, &proxy, &["--max-connections", "2"], 2);

    let mut closed = 0;
    let a = session("127.0.0.2", &pki, &proxy).await;
    let b = session("127.0.0.3", &pki, &proxy).await;
    // The third completes TLS and is told why, in its own words, by SQLSTATE 53300.
    let (code, message) = refused("127.0.0.4", &pki, &proxy).await;
    assert_eq!(code, "53300");
    assert_eq!(
        message,
        "pgmtls: too many sessions are open to this database"
    );
    let line = proxy.wait_for_refusal("too_many_for_database");
    assert_eq!(line["database"], "orders");
    assert!(line["tls_version"].is_string(), "refused after TLS: {line}");
    // psql, too, hears it.
    let psql = Psql::new(
        pg.psql_path(),
        "127.0.0.1",
        proxy.addr().port(),
        APP_USER,
        APP_DB,
    )
    .verify_ca(
        &pki.ca.cert_path,
        Some((
            pki.client.chain_path.as_path(),
            pki.client.key_path.as_path(),
        )),
    )
    .password(APP_PASSWORD);
    let out = psql.run_async("SELECT 1").await;
    assert!(!out.success(), "psql admitted over the limit");
    assert!(
        out.stderr
            .contains("pgmtls: too many sessions are open to this database"),
        "{}",
        out.stderr
    );
    wait_refusals(&proxy, "too_many_for_database", 2.0).await;

    // One closes: its slot is free for the next.
    close(&proxy, &mut closed, a).await;
    let a = session("127.0.0.4", &pki, &proxy).await;
    assert!(!psql.run_async("SELECT 1").await.success());

    // Lowered to 1 with two open: both keep running, a new one is refused...
    update_and_reload(&state, &proxy, &["--max-connections", "1"], 3);
    for (c, _) in [&a, &b] {
        c.simple_query("SELECT 1").await.unwrap();
    }
    assert_eq!(refused("127.0.0.5", &pki, &proxy).await.0, "53300");
    // ...also with one of them gone (one open is the limit now)...
    close(&proxy, &mut closed, a).await;
    assert_eq!(refused("127.0.0.5", &pki, &proxy).await.0, "53300");
    // ...and with none open, one gets in again.
    close(&proxy, &mut closed, b).await;
    let c = session("127.0.0.5", &pki, &proxy).await;
    // Removed: only the process limit is left.
    update_and_reload(&state, &proxy, &["--max-connections", "none"], 4);
    let d = session("127.0.0.6", &pki, &proxy).await;
    let out = psql.run_async("SELECT 7").await;
    assert_eq!(out.expect_ok(), "7");
    drop((c, d));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_per_ip_counts_each_source_apart() {
    if !pg_available_or_skip() {
        return;
    }
    let pg = PgServer::start();
    let pki = TestPki::new();
    let (state, proxy) = start_orders(&pki, &pg, &[("lo", "127.0.0.0/24")], "");
    let shown = update(&state, &["--max-connections-per-ip", "1"]);
    assert_eq!(shown["max_connections_per_ip"], 1);
    assert!(shown["max_connections"].is_null());
    proxy.wait_for_log(WAIT, |v| {
        v["message"] == "configuration reloaded" && v["generation"] == 2
    });

    let mut closed = 0;
    let a = session("127.0.0.2", &pki, &proxy).await;
    let (code, message) = refused("127.0.0.2", &pki, &proxy).await;
    assert_eq!(code, "53300");
    assert_eq!(
        message,
        "pgmtls: too many sessions are open to this database from this address"
    );
    let line = proxy.wait_for_refusal("too_many_from_ip");
    assert!(line["client_addr"]
        .as_str()
        .unwrap()
        .starts_with("127.0.0.2:"));
    // Another source has its own count.
    let b = session("127.0.0.3", &pki, &proxy).await;
    wait_refusals(&proxy, "too_many_from_ip", 1.0).await;
    close(&proxy, &mut closed, a).await;
    let a = session("127.0.0.2", &pki, &proxy).await;
    drop((a, b));
}
