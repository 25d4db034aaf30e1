//! A session the proxy cuts is told why: its client reads a FATAL ErrorResponse (57P01) with
//! fixed text naming the reason, inside TLS, before the connection closes: real psql and
//! tokio-postgres, for a revoked certificate, a deleted rule, a disabled database and the end
//! of the shutdown grace.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::clients::{session_from, ConnTask, Psql};
use common::pg::{pg_available_or_skip, PgServer, APP_DB, APP_PASSWORD, APP_USER};
use common::pki::TestPki;
use common::proxy::ProxyProcess;
use common::state::{crl_pem, start_orders};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio_postgres::error::SqlState;

const WAIT: Duration = Duration::from_secs(20);
const REVOKED: &str = "terminating connection because the client certificate was revoked";
const NOT_ALLOWED: &str = "terminating connection because the client address is no longer allowed";
const DISABLED: &str = "terminating connection because the database was disabled on the proxy";
const SHUTDOWN: &str = "terminating connection because the proxy is shutting down";

/// What an idle tokio-postgres session's connection task ended with.
async fn ended_with(conn: ConnTask) -> tokio_postgres::Error {
    tokio::time::timeout(WAIT, conn)
        .await
        .expect("the cut session's connection ends")
        .unwrap()
        .expect_err("the session was cut, not closed by us")
}

fn assert_told(e: &tokio_postgres::Error, text: &str) {
    let db = e
        .as_db_error()
        .unwrap_or_else(|| panic!("not a server error: {e:?}"));
    assert_eq!(db.severity(), "FATAL");
    assert_eq!(db.code(), &SqlState::ADMIN_SHUTDOWN);
    assert_eq!(db.message(), text);
}

/// Waits until the proxy has logged both sessions (tokio-postgres and psql) as cut and told.
fn both_told(proxy: &ProxyProcess) {
    proxy.wait_for_nth_log(2, WAIT, |v| {
        v["message"] == "connection closed" && v["told_client"] == true
    });
}

/// An interactive psql from 127.0.0.1, idle after its first query.
struct IdlePsql {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
}

impl IdlePsql {
    async fn start(pg: &PgServer, pki: &TestPki, proxy: &ProxyProcess) -> IdlePsql {
        let psql = Psql::new(
            pg.psql_path(),
            "127.0.0.1",
            proxy.addr().port(),
            APP_USER,
            APP_DB,
        )
        .verify_ca(
            &pki.ca.cert_path,
            Some((&pki.client.chain_path, &pki.client.key_path)),
        );
        let mut cmd = tokio::process::Command::new(pg.psql_path());
        cmd.args(["-X", "-A", "-t", "-w", "-d"])
            .arg(psql.conninfo())
            .env("PGPASSWORD", APP_PASSWORD)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for var in common::pg::libpq_env_vars() {
            cmd.env_remove(var);
        }
        let mut child = cmd.spawn().unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"SELECT 'idle';\n").await.unwrap();
        // The answer is the readiness signal: the session is through the proxy and idle.
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        tokio::time::timeout(WAIT, out.read_line(&mut line))
            .await
            .expect("psql answers")
            .unwrap();
        assert_eq!(line.trim(), "idle");
        IdlePsql { child, stdin }
    }

    /// Sends the next statement and returns psql's stderr once it exits.
    async fn next_statement(mut self) -> String {
        let _ = self.stdin.write_all(b"SELECT 2;\n").await;
        drop(self.stdin);
        let mut err = String::new();
        let mut stderr = self.child.stderr.take().unwrap();
        tokio::time::timeout(WAIT, stderr.read_to_string(&mut err))
            .await
            .expect("psql ends")
            .unwrap();
        let _ = self.child.wait().await;
        err
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_certificates_sessions_are_told_why() {
    if !pg_available_or_skip() {
        return;
    }
    let pg = PgServer::start();
    let pki = TestPki::new();
    let (state, proxy) = start_orders(&pki, &pg, &[("lo", "127.0.0.0/8")], "");
    let (a, a_conn) = session_from("127.0.0.2", &pki, &pki.client, &proxy)
        .await
        .unwrap();
    a.simple_query("SELECT 1").await.unwrap();
    let psql = IdlePsql::start(&pg, &pki, &proxy).await;

    state.write_file(
        "orders",
        "crl.pem",
        crl_pem(&pki, &[&pki.client]).as_bytes(),
        0o644,
    );
    assert_told(&ended_with(a_conn).await, REVOKED);
    // psql hears of the cut only with its next statement: send it once the proxy has cut both
    // sessions, or it may still reach Postgres.
    both_told(&proxy);
    let stderr = psql.next_statement().await;
    assert!(stderr.contains(&format!("FATAL:  {REVOKED}")), "{stderr}");
    let line = proxy.wait_for_refusal("revoked_live");
    assert_eq!(line["told_client"], true, "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_whose_rule_is_deleted_are_told_why() {
    if !pg_available_or_skip() {
        return;
    }
    let pg = PgServer::start();
    let pki = TestPki::new();
    let (state, proxy) = start_orders(
        &pki,
        &pg,
        &[("psql", "127.0.0.1/32"), ("r2", "127.0.0.2/32")],
        "",
    );
    let (a, a_conn) = session_from("127.0.0.2", &pki, &pki.client, &proxy)
        .await
        .unwrap();
    a.simple_query("SELECT 1").await.unwrap();
    let psql = IdlePsql::start(&pg, &pki, &proxy).await;
    state.write_rules("orders", &[]);
    assert_told(&ended_with(a_conn).await, NOT_ALLOWED);
    // psql hears of the cut only with its next statement: send it once the proxy has cut both
    // sessions, or it may still reach Postgres.
    both_told(&proxy);
    let stderr = psql.next_statement().await;
    assert!(
        stderr.contains(&format!("FATAL:  {NOT_ALLOWED}")),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_of_a_disabled_database_are_told_why() {
    if !pg_available_or_skip() {
        return;
    }
    let pg = PgServer::start();
    let pki = TestPki::new();
    let (state, proxy) = start_orders(&pki, &pg, &[("lo", "127.0.0.0/8")], "");
    let (a, a_conn) = session_from("127.0.0.2", &pki, &pki.client, &proxy)
        .await
        .unwrap();
    a.simple_query("SELECT 1").await.unwrap();
    std::fs::create_dir_all(state.root.join("archive")).unwrap();
    std::fs::rename(state.db_dir("orders"), state.root.join("archive/orders-1")).unwrap();
    assert_told(&ended_with(a_conn).await, DISABLED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_left_at_the_end_of_the_shutdown_grace_are_told_why() {
    if !pg_available_or_skip() {
        return;
    }
    let pg = PgServer::start();
    let pki = TestPki::new();
    let (_state, mut proxy) =
        start_orders(&pki, &pg, &[("lo", "127.0.0.0/8")], "shutdown_grace: 1s\n");
    let (a, a_conn) = session_from("127.0.0.2", &pki, &pki.client, &proxy)
        .await
        .unwrap();
    a.simple_query("SELECT 1").await.unwrap();
    let psql = IdlePsql::start(&pg, &pki, &proxy).await;
    proxy.signal("TERM");
    assert_told(&ended_with(a_conn).await, SHUTDOWN);
    // psql hears of the cut only with its next statement: send it once the proxy has cut both
    // sessions, or it may still reach Postgres.
    both_told(&proxy);
    let stderr = psql.next_statement().await;
    assert!(stderr.contains(&format!("FATAL:  {SHUTDOWN}")), "{stderr}");
    assert!(proxy.wait_exit(WAIT).success());
}
