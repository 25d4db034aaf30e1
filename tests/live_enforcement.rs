//! Live sessions after a reload: a session whose IP rule was deleted, whose certificate was
//! revoked, or whose database was removed is closed within a second with reason
//! `revoked_live`; every other session keeps running, also 32 pgbench clients through
//! several reloads.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::admin::scrape;
use common::clients::{session_from, ConnTask};
use common::pg::{pg_available_or_skip, PgServer, APP_DB, APP_PASSWORD, APP_USER};
use common::pki::TestPki;
use common::state::{crl_pem, server_cert, start_orders};
use serde_json::Value;
use tokio_postgres::Client;

const WAIT: Duration = Duration::from_secs(20);

async fn one(c: &Client) -> i32 {
    c.query_one("SELECT 1", &[]).await.unwrap().get(0)
}

fn reloaded(generation: u64) -> impl Fn(&Value) -> bool {
    move |v| v["message"] == "configuration reloaded" && v["generation"] == generation
}

/// Waits for the connection task to end (the proxy closed the socket), at most `limit`.
async fn closed_within(conn: ConnTask, limit: Duration) -> Duration {
    let started = Instant::now();
    tokio::time::timeout(limit, conn)
        .await
        .unwrap_or_else(|_| panic!("session still open {limit:?} after the reload"))
        .unwrap()
        .ok();
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_the_rule_of_a_live_session_closes_it_within_a_second_and_spares_others() {
    if !pg_available_or_skip() {
        return;
    }
    let pg = PgServer::start();
    let pki = TestPki::new();
    let (state, proxy) = start_orders(
        &pki,
        &pg,
        &[("r2", "127.0.0.2/32"), ("r3", "127.0.0.3/32")],
        "",
    );
    let (a, a_conn) = session_from("127.0.0.2", &pki, &pki.client, &proxy)
        .await
        .unwrap();
    let (b, _b_conn) = session_from("127.0.0.3", &pki, &pki.client, &proxy)
        .await
        .unwrap();
    assert_eq!(one(&a).await, 1);
    assert_eq!(one(&b).await, 1);

    let written = Instant::now();
    state.write_rules("orders", &[("r3", "127.0.0.3/32")]);
    let line = proxy.wait_for_log(WAIT, reloaded(2));
    let reload_seen = written.elapsed();
    assert_eq!(line["sessions_closed"], 1);
    let after_reload = closed_within(a_conn, Duration::from_secs(1)).await;
    eprintln!(
        "rule deleted: reload applied {reload_seen:?} after the write, session closed \
         {after_reload:?} after that"
    );
    assert!(a.simple_query("SELECT 1").await.is_err());

    let closed = proxy.wait_for_refusal("revoked_live");
    assert!(closed["client_addr"]
        .as_str()
        .unwrap()
        .starts_with("127.0.0.2:"));
    assert_eq!(closed["outcome"], "cut");
    assert_eq!(closed["detail"], "ip rule removed");
    assert_eq!(closed["rule_id"], "r2");
    assert_eq!(closed["closed_by"], "proxy");

    // The other session never noticed.
    assert_eq!(one(&b).await, 1);
    let m = scrape(proxy.admin()).await;
    assert_eq!(
        m.value(
            "pgmtls_connections_refused_total",
            r#"database="orders",reason="revoked_live""#
        ),
        1.0
    );
    assert_eq!(
        m.value("pgmtls_sessions_active", r#"database="orders""#),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_live_sessions_certificate_closes_it_and_refuses_it_next_time() {
    if !pg_available_or_skip() {
        return;
    }
    let pg = PgServer::start();
    let pki = TestPki::new();
    let (state, proxy) = start_orders(&pki, &pg, &[("lo", "127.0.0.0/8")], "");
    let other = pki.issue_valid_client("other-app");
    let (a, a_conn) = session_from("127.0.0.2", &pki, &pki.client, &proxy)
        .await
        .unwrap();
    let (b, _b_conn) = session_from("127.0.0.2", &pki, &other, &proxy)
        .await
        .unwrap();
    assert_eq!(one(&a).await, 1);

    state.write_file(
        "orders",
        "crl.pem",
        crl_pem(&pki, &[&pki.client]).as_bytes(),
        0o644,
    );
    let line = proxy.wait_for_log(WAIT, reloaded(2));
    assert_eq!(line["sessions_closed"], 1);
    closed_within(a_conn, Duration::from_secs(1)).await;
    let closed = proxy.wait_for_refusal("revoked_live");
    assert_eq!(closed["detail"], "client certificate revoked");
    assert_eq!(
        closed["client_serial"],
        common::state::serial_of(&pki.client).as_str()
    );
    assert_eq!(
        one(&b).await,
        1,
        "a session with another certificate is untouched"
    );

    // And the revoked certificate cannot come back.
    let again = session_from("127.0.0.2", &pki, &pki.client, &proxy).await;
    assert!(again.is_err());
    proxy.wait_for_refusal("client_cert_revoked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_database_closes_its_live_sessions() {
    if !pg_available_or_skip() {
        return;
    }
    let pg = PgServer::start();
    let pki = TestPki::new();
    let (state, proxy) = start_orders(&pki, &pg, &[("lo", "127.0.0.0/8")], "");
    let (a, a_conn) = session_from("127.0.0.2", &pki, &pki.client, &proxy)
        .await
        .unwrap();
    assert_eq!(one(&a).await, 1);
    std::fs::create_dir_all(state.root.join("archive")).unwrap();
    std::fs::rename(state.db_dir("orders"), state.root.join("archive/orders-1")).unwrap();
    proxy.wait_for_log(WAIT, reloaded(2));
    closed_within(a_conn, Duration::from_secs(1)).await;
    let closed = proxy.wait_for_refusal("revoked_live");
    assert_eq!(closed["detail"], "database disabled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_enforcement_off_live_sessions_outlast_their_rule() {
    if !pg_available_or_skip() {
        return;
    }
    let pg = PgServer::start();
    let pki = TestPki::new();
    let (state, proxy) = start_orders(
        &pki,
        &pg,
        &[("r2", "127.0.0.2/32")],
        "enforce_on_live_sessions: false\n",
    );
    let (a, _a_conn) = session_from("127.0.0.2", &pki, &pki.client, &proxy)
        .await
        .unwrap();
    state.write_rules("orders", &[]);
    let line = proxy.wait_for_log(WAIT, reloaded(2));
    assert_eq!(line["sessions_closed"], 0);
    assert_eq!(one(&a).await, 1, "the live session stays");
    // New connections follow the new rules at once.
    assert!(session_from("127.0.0.2", &pki, &pki.client, &proxy)
        .await
        .is_err());
    proxy.wait_for_refusal("ip_not_allowed");
}

/// 32 pgbench clients through the proxy while the rules, the CRL and the server certificate
/// change and a SIGHUP arrives: no client aborts, no transaction fails, and every transaction
/// pgbench counted is in `pgbench_history`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_under_pgbench_lose_no_transaction() {
    if !pg_available_or_skip() {
        return;
    }
    let pg = PgServer::start();
    let pki = TestPki::new();
    let (state, proxy) = start_orders(&pki, &pg, &[("lo", "127.0.0.1/32")], "");
    let pgbench = |args: &[&str], host: &str, port: u16, tls: bool| {
        let mut cmd = tokio::process::Command::new(pg.pgbench_path());
        cmd.args(args)
            .args(["-h", host, "-p", &port.to_string(), "-U", APP_USER, APP_DB])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for var in common::pg::libpq_env_vars() {
            cmd.env_remove(var);
        }
        cmd.env("PGPASSWORD", APP_PASSWORD);
        if tls {
            cmd.env("PGSSLMODE", "verify-ca")
                .env("PGSSLROOTCERT", &pki.ca.cert_path)
                .env("PGSSLCERT", &pki.client.chain_path)
                .env("PGSSLKEY", &pki.client.key_path);
        }
        cmd
    };
    let init = pgbench(&["-i", "-s", "1", "-q"], "127.0.0.1", pg.port(), false)
        .output()
        .await
        .unwrap();
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );

    let run = pgbench(
        &["-c", "32", "-j", "2", "-T", "6", "-P", "1", "-n"],
        "127.0.0.1",
        proxy.addr().port(),
        true,
    )
    .spawn()
    .unwrap();
    // Reload only once all 32 sessions are relaying.
    let admin = proxy.admin();
    let deadline = Instant::now() + WAIT;
    loop {
        let m = scrape(admin).await;
        if m.value("pgmtls_sessions_active", r#"database="orders""#) == 32.0 {
            break;
        }
        assert!(Instant::now() < deadline, "pgbench never had 32 sessions");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let unrelated = pki.issue_valid_client("unrelated");
    let (chain, key) = server_cert(&pki);
    let steps: Vec<Box<dyn Fn()>> = vec![
        Box::new(|| state.write_rules("orders", &[("lo", "127.0.0.1/32"), ("net", "10.0.0.0/8")])),
        Box::new(|| {
            state.write_file(
                "orders",
                "crl.pem",
                crl_pem(&pki, &[&unrelated]).as_bytes(),
                0o644,
            )
        }),
        Box::new(|| {
            state.write_file("orders", "server.key", key.as_bytes(), 0o600);
            state.write_file("orders", "server.crt", chain.as_bytes(), 0o644);
        }),
    ];
    let mut applied = Vec::new();
    for (i, step) in steps.iter().enumerate() {
        let t = Instant::now();
        step();
        proxy.wait_for_log(WAIT, reloaded(2 + i as u64));
        applied.push(t.elapsed());
    }
    proxy.signal("HUP");
    proxy.wait_for_log(WAIT, |v| {
        v["message"] == "configuration unchanged" && v["trigger"] == "sighup"
    });

    let out = run.wait_with_output().await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "pgbench failed:\n{stdout}\n{stderr}");
    assert!(!stderr.contains("aborted"), "{stderr}");
    let field = |prefix: &str| -> u64 {
        stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("no {prefix:?} in\n{stdout}"))
            .parse()
            .unwrap()
    };
    let processed = field("number of transactions actually processed:");
    let failed = field("number of failed transactions:");
    let history: u64 = pg
        .superuser_exec_in(APP_DB, "SELECT count(*) FROM pgbench_history")
        .parse()
        .unwrap();
    eprintln!(
        "pgbench -c 32 -T 6 through 3 reloads and a SIGHUP: {processed} transactions, \
         {failed} failed, {history} rows in pgbench_history; reloads applied after {applied:?}"
    );
    assert_eq!(failed, 0);
    assert!(processed > 0);
    assert_eq!(history, processed, "every counted transaction committed");
    let m = scrape(admin).await;
    assert_eq!(
        m.value(
            "pgmtls_connections_refused_total",
            r#"database="orders",reason="revoked_live""#
        ),
        0.0
    );
    // 32 clients plus the connection pgbench opens first to read the scale.
    assert!(m.value("pgmtls_connections_accepted_total", r#"database="orders""#) >= 32.0);
}
