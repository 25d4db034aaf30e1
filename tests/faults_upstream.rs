//! The upstream Postgres dies under its sessions (`pg_ctl stop -m immediate`, as a crash of
//! the server would look to the proxy): every client of it gets an error, not a hang, the
//! proxy frees the sessions and says why, a database on another upstream does not notice,
//! and once Postgres is back on the same port new sessions work with no proxy restart.
//! Nothing committed is lost and nothing half-done is kept.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::admin::scrape;
use common::clients::{app_session_over, connect_from, error_chain, ConnTask};
use common::pg::{pg_available_or_skip, PgServer};
use common::pki::TestPki;
use common::proxy::ProxyProcess;
use common::state::TestState;
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

/// A client of a dead upstream must learn of it within this (it takes well under a second:
/// the kernel closes the dead backends' sockets at once; this bounds a hang).
const ERROR_BOUND: Duration = Duration::from_secs(10);
const WAIT: Duration = Duration::from_secs(30);
const APP_NAME: &str = "pgmtls-tests";

async fn session(
    proxy: &ProxyProcess,
    pki: &TestPki,
    db: &str,
) -> Result<(Client, ConnTask), tokio_postgres::Error> {
    let addr = proxy.addrs[db];
    let stream = connect_from(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)), addr)
        .await
        .expect("connect to the proxy");
    app_session_over(stream, addr, pki, &pki.client).await
}

/// How many of this test's backends run a statement starting with `prefix`.
fn active(pg: &PgServer, prefix: &str) -> u32 {
    pg.superuser_exec(&format!(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = '{APP_NAME}' \
         AND state = 'active' AND query LIKE '{prefix}%'"
    ))
    .parse()
    .unwrap()
}

/// Polls `cond` (Postgres' view of its backends has no event to wait on) until it holds.
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let started = Instant::now();
    while !cond() {
        assert!(started.elapsed() < WAIT, "{what}: not within {WAIT:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn closed_on(db: &'static str) -> impl Fn(&Value) -> bool {
    move |v| v["message"] == "connection closed" && v["database"] == db
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_killed_mid_query_ends_its_sessions_and_serves_again_after_a_restart() {
    if !pg_available_or_skip() {
        return;
    }
    let mut pg = PgServer::start();
    let other_pg = PgServer::start();
    let pki = TestPki::new();
    let state = TestState::new("");
    let rules = [("lo", "127.0.0.0/8")];
    state.add_database("orders", &pki, "127.0.0.1:0", pg.addr(), &rules);
    state.add_database("billing", &pki, "127.0.0.5:0", other_pg.addr(), &rules);
    let proxy = ProxyProcess::with_config(&state.config);

    // Committed through the proxy before the fault: must all be there afterwards.
    let (setup, _setup_conn) = session(&proxy, &pki, "orders").await.unwrap();
    setup
        .batch_execute(
            "CREATE TABLE kept (n int); INSERT INTO kept SELECT generate_series(1, 1000); \
             CREATE TABLE copied (line text)",
        )
        .await
        .unwrap();
    drop(setup);
    proxy.wait_for_log(WAIT, closed_on("orders"));

    // The sessions the crash hits: a long statement, a COPY FROM STDIN streaming data, an
    // open transaction with an uncommitted row, an idle session.
    let (sleeper, sleeper_conn) = session(&proxy, &pki, "orders").await.unwrap();
    let sleeping = tokio::spawn(async move {
        let r = sleeper.simple_query("SELECT pg_sleep(30)").await;
        (r.map(|_| ()), Instant::now())
    });
    let (copier, copier_conn) = session(&proxy, &pki, "orders").await.unwrap();
    let copy_sent = Arc::new(AtomicU64::new(0));
    let sent = copy_sent.clone();
    let copying = tokio::spawn(async move {
        let chunk = Bytes::from("a line of a COPY that never finishes\n".repeat(1000));
        let r: Result<(), tokio_postgres::Error> = async {
            let sink = copier.copy_in("COPY copied FROM STDIN").await?;
            futures_util::pin_mut!(sink);
            loop {
                sink.send(chunk.clone()).await?;
                sent.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                // Paced, so the COPY runs for as long as the test needs without filling the disk.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        .await;
        (r, Instant::now())
    });
    let (in_tx, in_tx_conn) = session(&proxy, &pki, "orders").await.unwrap();
    in_tx
        .batch_execute("BEGIN; INSERT INTO kept VALUES (-1)")
        .await
        .unwrap();
    let (_idle, idle_conn) = session(&proxy, &pki, "orders").await.unwrap();
    // A database on another upstream, through the same proxy.
    let (bystander, _bystander_conn) = session(&proxy, &pki, "billing").await.unwrap();
    bystander.simple_query("SELECT 1").await.unwrap();

    tokio::task::block_in_place(|| {
        wait_until("pg_sleep and COPY are running", || {
            active(&pg, "SELECT pg_sleep") == 1
                && active(&pg, "COPY") == 1
                && copy_sent.load(Ordering::Relaxed) > 1 << 20
        })
    });
    let m = scrape(proxy.admin()).await;
    assert_eq!(
        m.value("pgmtls_sessions_active", r#"database="orders""#),
        4.0
    );

    let killed_at = Instant::now();
    tokio::task::block_in_place(|| pg.stop_immediate());
    eprintln!("pg_ctl stop -m immediate took {:?}", killed_at.elapsed());

    let (slept, at) = tokio::time::timeout(ERROR_BOUND, sleeping)
        .await
        .expect("pg_sleep's client hangs after the kill")
        .unwrap();
    let err = slept.expect_err("pg_sleep(30) cannot succeed on a killed server");
    eprintln!(
        "pg_sleep client: error {:?} after the kill: {}",
        at - killed_at,
        error_chain(&err)
    );
    let (copied, at) = tokio::time::timeout(ERROR_BOUND, copying)
        .await
        .expect("the COPY's client hangs after the kill")
        .unwrap();
    let err = copied.expect_err("the COPY cannot succeed on a killed server");
    eprintln!(
        "COPY client: error {:?} after the kill: {}",
        at - killed_at,
        error_chain(&err)
    );
    let err = tokio::time::timeout(ERROR_BOUND, in_tx.simple_query("COMMIT"))
        .await
        .expect("the open transaction's COMMIT hangs after the kill")
        .expect_err("COMMIT cannot succeed on a killed server");
    eprintln!(
        "open transaction: COMMIT fails {:?} after the kill: {}",
        killed_at.elapsed(),
        error_chain(&err)
    );
    for (what, conn) in [
        ("pg_sleep", sleeper_conn),
        ("COPY", copier_conn),
        ("transaction", in_tx_conn),
        ("idle", idle_conn),
    ] {
        tokio::time::timeout(ERROR_BOUND, conn)
            .await
            .unwrap_or_else(|_| panic!("the {what} session's connection still open"))
            .unwrap()
            .ok();
    }
    eprintln!(
        "all four connections closed {:?} after the kill",
        killed_at.elapsed()
    );

    // The proxy freed all four and says who ended them; one line each (the setup session's
    // line was the first).
    let last = proxy.wait_for_nth_log(5, WAIT, closed_on("orders"));
    eprintln!("proxy log: {last}");
    assert_eq!(last["closed_by"], "upstream", "{last}");
    assert_eq!(
        // Not the setup session (conn_id 1): it ended before the kill, by its own
        // Terminate, and which side the proxy saw close first is a race.
        proxy.count_logs(|v| closed_on("orders")(v)
            && v["conn_id"] != 1
            && v["closed_by"] == "upstream"
            && v["outcome"] == "closed"
            && v["pg_user"] == "\"app\""),
        4,
        "{}",
        proxy.log_text()
    );
    let m = scrape(proxy.admin()).await;
    assert_eq!(
        m.value("pgmtls_sessions_active", r#"database="orders""#),
        0.0
    );
    assert_eq!(
        m.value("pgmtls_sessions_active", r#"database="billing""#),
        1.0
    );

    // While Postgres is down a new session is told so, inside TLS, and counted.
    let err = session(&proxy, &pki, "orders")
        .await
        .map(|_| ())
        .expect_err("no session while Postgres is down");
    assert_eq!(
        err.code(),
        Some(&SqlState::CONNECTION_FAILURE),
        "{}",
        error_chain(&err)
    );
    let refused = proxy.wait_for_refusal("upstream_unavailable");
    eprintln!("proxy log: {refused}");
    assert_eq!(refused["database"], "orders", "{refused}");
    // The other database's session never noticed.
    bystander.simple_query("SELECT 1").await.unwrap();

    // Postgres comes back on the same port; the same proxy process serves it again.
    let restarted_at = Instant::now();
    tokio::task::block_in_place(|| pg.start_again());
    eprintln!(
        "Postgres restarted (crash recovery) in {:?}",
        restarted_at.elapsed()
    );
    let (after, _after_conn) = session(&proxy, &pki, "orders").await.unwrap();
    let kept: i64 = after
        .query_one("SELECT count(*) FROM kept", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        kept, 1000,
        "committed rows survive, the uncommitted one is gone"
    );
    let copied: i64 = after
        .query_one("SELECT count(*) FROM copied", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(copied, 0, "the interrupted COPY left nothing behind");
    let input: String = (0..20_000).map(|i| format!("row {i}\n")).collect();
    let sink = after.copy_in("COPY copied FROM STDIN").await.unwrap();
    futures_util::pin_mut!(sink);
    sink.send(Bytes::from(input.clone())).await.unwrap();
    assert_eq!(sink.finish().await.unwrap(), 20_000);
    let out = after
        .copy_out("COPY copied TO STDOUT")
        .await
        .unwrap()
        .fold(Vec::new(), |mut all, c| async move {
            all.extend_from_slice(&c.unwrap());
            all
        })
        .await;
    assert_eq!(out, input.as_bytes());
    bystander.simple_query("SELECT 1").await.unwrap();

    let m = scrape(proxy.admin()).await;
    assert_eq!(
        m.value(
            "pgmtls_connections_refused_total",
            r#"database="orders",reason="upstream_unavailable""#
        ),
        1.0
    );
    assert_eq!(
        m.value("pgmtls_sessions_active", r#"database="orders""#),
        1.0
    );
}
