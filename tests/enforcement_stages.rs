//! Revocation holds in every stage, not only in the relay: a connection accepted before a
//! reload is re-admitted after TLS under the new configuration, a reload while it
//! authenticates ends it, nothing but authentication messages reaches Postgres before
//! AuthenticationOk, authentication has a deadline, and a session cut mid-statement has that
//! statement cancelled instead of committing after the cut. All against a real Postgres, with
//! a raw TLS client where the attack needs bytes no well-behaved driver sends.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::clients::{app_session_over, connect_from, tls_client_config};
use common::pg::{pg_available_or_skip, PgServer, APP_DB, APP_USER, TRUST_USER};
use common::pki::{Role, TestPki};
use common::state::{crl_pem, start_orders, TestState};
use pgmtls::wire::frontend::StartupParams;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

const WAIT: Duration = Duration::from_secs(20);

fn reloaded(generation: u64) -> impl Fn(&Value) -> bool {
    move |v| v["message"] == "configuration reloaded" && v["generation"] == generation
}

fn revoke(state: &TestState, pki: &TestPki, role: &Role) {
    state.write_file("orders", "crl.pem", crl_pem(pki, &[role]).as_bytes(), 0o644);
}

/// A TCP connection from `src` that the proxy has admitted and answered `S` to: it now waits
/// for our ClientHello, under the configuration of the accept.
async fn admitted_before_tls(src: &str, proxy: SocketAddr) -> TcpStream {
    let mut tcp = connect_from(src.parse::<IpAddr>().unwrap(), proxy)
        .await
        .unwrap();
    let mut req = 8u32.to_be_bytes().to_vec();
    req.extend_from_slice(&80_877_103u32.to_be_bytes());
    tcp.write_all(&req).await.unwrap();
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"S");
    tcp
}

async fn tls(tcp: TcpStream, pki: &TestPki, cert: &Role) -> TlsStream<TcpStream> {
    let cfg = tls_client_config(
        &pki.ca.cert_path,
        Some((&cert.chain_path, &cert.key_path)),
        false,
    );
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(
            rustls_pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap()
}

fn startup(user: &str) -> Vec<u8> {
    StartupParams {
        minor: 0,
        params: vec![
            ("user".into(), user.into()),
            ("database".into(), APP_DB.into()),
        ],
    }
    .encode()
}

fn query(sql: &str) -> Vec<u8> {
    let mut m = vec![b'Q'];
    m.extend_from_slice(&(4 + sql.len() as u32 + 1).to_be_bytes());
    m.extend_from_slice(sql.as_bytes());
    m.push(0);
    m
}

/// Everything the server sends until it closes (or `limit` passes, which fails the test).
async fn read_until_closed(s: &mut TlsStream<TcpStream>, limit: Duration) -> Vec<u8> {
    let mut got = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        // libpq-style servers close without close_notify; any read error is the end too.
        while let Ok(n @ 1..) = s.read(&mut buf).await {
            got.extend_from_slice(&buf[..n]);
        }
    };
    tokio::time::timeout(limit, read)
        .await
        .unwrap_or_else(|_| panic!("connection still open after {limit:?}"));
    got
}

/// Reads until one complete backend message of type `tag` has arrived; returns all bytes.
async fn read_until_message(s: &mut TlsStream<TcpStream>, tag: u8) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if messages(&got).iter().any(|(t, _)| *t == tag) {
            return got;
        }
        let n = tokio::time::timeout(WAIT, s.read(&mut buf))
            .await
            .expect("no message in time")
            .unwrap();
        assert!(n > 0, "closed before a {:?} message", char::from(tag));
        got.extend_from_slice(&buf[..n]);
    }
}

/// The complete backend messages in `bytes`, as (type, body).
fn messages(bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while rest.len() >= 5 {
        let len = u32::from_be_bytes(rest[1..5].try_into().unwrap()) as usize;
        if rest.len() < 1 + len {
            break;
        }
        out.push((rest[0], rest[5..1 + len].to_vec()));
        rest = &rest[1 + len..];
    }
    out
}

/// (SQLSTATE, message) of every ErrorResponse in `bytes`.
fn errors(bytes: &[u8]) -> Vec<(String, String)> {
    messages(bytes)
        .into_iter()
        .filter(|(t, _)| *t == b'E')
        .map(|(_, body)| {
            let mut code = String::new();
            let mut message = String::new();
            for field in body.split(|b| *b == 0).filter(|f| !f.is_empty()) {
                let value = String::from_utf8_lossy(&field[1..]).into_owned();
                match field[0] {
                    b'C' => code = value,
                    b'M' => message = value,
                    _ => {}
                }
            }
            (code, message)
        })
        .collect()
}

fn table_exists(pg: &PgServer, name: &str) -> bool {
    pg.superuser_exec_in(
        APP_DB,
        &format!("SELECT to_regclass('public.{name}') IS NOT NULL"),
    ) == "t"
}

/// The original attack: hold a connection open before TLS, let the certificate be revoked (or
/// the rule deleted) and the reload happen, then finish TLS with the old certificate and
/// pipeline SQL right behind the StartupMessage. `trustuser` needs no password upstream, so
/// nothing but the proxy stands between those bytes and Postgres.
async fn held_connection_after(
    change: impl FnOnce(&TestState, &TestPki),
    reason: &str,
    detail: &str,
) {
    let pg = PgServer::start();
    let pki = TestPki::new();
    let (state, proxy) = start_orders(
        &pki,
        &pg,
        &[("r2", "127.0.0.2/32"), ("r3", "127.0.0.3/32")],
        "",
    );
    let tcp = admitted_before_tls("127.0.0.2", proxy.addr()).await;
    change(&state, &pki);
    proxy.wait_for_log(WAIT, reloaded(2));

    let mut s = tls(tcp, &pki, &pki.client).await;
    let mut attack = startup(TRUST_USER);
    attack.extend(query(
        "CREATE TABLE stolen (x int); INSERT INTO stolen VALUES (1)",
    ));
    // The proxy may already have closed; the write failing is fine, the outcome is what counts.
    let _ = s.write_all(&attack).await;
    let _ = s.flush().await;
    let got = read_until_closed(&mut s, WAIT).await;
    assert!(
        !messages(&got).iter().any(|(t, _)| *t == b'C' || *t == b'Z'),
        "the pipelined SQL ran: {:?}",
        messages(&got)
    );

    let line = proxy.wait_for_log(WAIT, |v| {
        v["message"] == "connection closed"
            && v["client_addr"]
                .as_str()
                .is_some_and(|a| a.starts_with("127.0.0.2:"))
    });
    assert_eq!(line["error_kind"], reason, "{line}");
    assert_eq!(line["outcome"], "refused");
    assert_eq!(line["detail"], format!("not admitted after TLS: {detail}"));
    assert_eq!(line["bytes_to_upstream"], 0, "Postgres was never dialled");
    assert!(!table_exists(&pg, "stolen"), "the table was created");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_held_before_tls_cannot_use_a_certificate_revoked_meanwhile() {
    if !pg_available_or_skip() {
        return;
    }
    held_connection_after(
        |state, pki| revoke(state, pki, &pki.client),
        "client_cert_revoked",
        "client certificate revoked",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_held_before_tls_cannot_use_an_ip_rule_deleted_meanwhile() {
    if !pg_available_or_skip() {
        return;
    }
    held_connection_after(
        |state, _| state.write_rules("orders", &[("r3", "127.0.0.3/32")]),
        "ip_not_allowed",
        "ip rule removed",
    )
    .await;
}

/// SCRAM through the proxy: Postgres asks for a SASL response, and a client that pipelines a
/// Query behind its StartupMessage is refused before that Query reaches Postgres.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_pipelined_before_authentication_never_reaches_postgres() {
    if !pg_available_or_skip() {
        return;
    }
    let pg = PgServer::start();
    let pki = TestPki::new();
    let (_state, proxy) = start_orders(&pki, &pg, &[("lo", "127.0.0.0/8")], "");
    let tcp = admitted_before_tls("127.0.0.2", proxy.addr()).await;
    let mut s = tls(tcp, &pki, &pki.client).await;
    let hello = startup(APP_USER);
    let mut attack = hello.clone();
    attack.extend(query("CREATE TABLE early (x int)"));
    s.write_all(&attack).await.unwrap();
    s.flush().await.unwrap();
    let got = read_until_closed(&mut s, WAIT).await;
    assert_eq!(
        errors(&got),
        vec![(
            "08P01".to_owned(),
            "pgmtls: only authentication messages may be sent before authentication completes"
                .to_owned()
        )]
    );
    let line = proxy.wait_for_refusal("unauthenticated_message");
    assert_eq!(line["outcome"], "refused");
    assert_eq!(
        line["detail"],
        "client sent message type 'Q' before authentication completed"
    );
    assert_eq!(
        line["bytes_to_upstream"],
        hello.len(),
        "the StartupMessage is counted, nothing else was sent"
    );
    assert!(!table_exists(&pg, "early"));
    // Postgres never saw the Query: it would have said so in its log.
    let log = pg.log_contents();
    assert!(!log.contains("expected SASL response"), "{log}");
}

/// A client that stops answering in the middle of authentication is closed by
/// `auth_timeout`, not left to Postgres' own (default 60 s) authentication_timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentication_that_never_finishes_ends_at_auth_timeout() {
    if !pg_available_or_skip() {
        return;
    }
    let pg = PgServer::start();
    let pki = TestPki::new();
    let (_state, proxy) = start_orders(&pki, &pg, &[("lo", "127.0.0.0/8")], "auth_timeout: 1s\n");
    let tcp = admitted_before_tls("127.0.0.2", proxy.addr()).await;
    let mut s = tls(tcp, &pki, &pki.client).await;
    let hello = startup(APP_USER);
    s.write_all(&hello).await.unwrap();
    s.flush().await.unwrap();
    let asked = read_until_message(&mut s, b'R').await;
    let started = Instant::now();
    let rest = read_until_closed(&mut s, Duration::from_secs(10)).await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "closed only after {took:?}");
    assert_eq!(
        errors(&rest),
        vec![(
            "08006".to_owned(),
            "pgmtls: authentication did not complete in time".to_owned()
        )]
    );
    let line = proxy.wait_for_refusal("auth_timeout");
    assert_eq!(line["outcome"], "refused");
    assert_eq!(line["bytes_to_upstream"], hello.len());
    assert_eq!(
        line["bytes_to_client"],
        asked.len(),
        "the SASL request is counted"
    );
}

/// A reload that revokes the certificate of a connection still authenticating ends it at once
/// with 57P01, although no byte of the session was relayed yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_during_authentication_ends_the_connection() {
    if !pg_available_or_skip() {
        return;
    }
    let pg = PgServer::start();
    let pki = TestPki::new();
    let (state, proxy) = start_orders(&pki, &pg, &[("lo", "127.0.0.0/8")], "");
    let tcp = admitted_before_tls("127.0.0.2", proxy.addr()).await;
    let mut s = tls(tcp, &pki, &pki.client).await;
    s.write_all(&startup(APP_USER)).await.unwrap();
    s.flush().await.unwrap();
    read_until_message(&mut s, b'R').await;

    revoke(&state, &pki, &pki.client);
    let line = proxy.wait_for_log(WAIT, reloaded(2));
    assert_eq!(line["sessions_closed"], 1);
    let rest = read_until_closed(&mut s, Duration::from_secs(2)).await;
    assert_eq!(
        errors(&rest),
        vec![(
            "57P01".to_owned(),
            "pgmtls: this session is no longer authorized".to_owned()
        )]
    );
    let closed = proxy.wait_for_refusal("revoked_live");
    assert_eq!(closed["outcome"], "refused");
    assert_eq!(closed["detail"], "client certificate revoked");
}

const SLEEP_THEN_INSERT: &str = "SELECT pg_sleep(6); INSERT INTO t VALUES (1)";

/// Creates table `t` and starts [`SLEEP_THEN_INSERT`] on `client`, returning once Postgres
/// shows the statement running.
async fn start_sleep_then_insert(
    pg: &PgServer,
    client: tokio_postgres::Client,
) -> tokio::task::JoinHandle<Result<(), tokio_postgres::Error>> {
    client.simple_query("CREATE TABLE t (x int)").await.unwrap();
    let running =
        tokio::spawn(async move { client.simple_query(SLEEP_THEN_INSERT).await.map(|_| ()) });
    let active = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE query = '{SLEEP_THEN_INSERT}' AND state = 'active'"
    );
    let deadline = Instant::now() + WAIT;
    // pg_stat_activity is the only view of "the statement is running"; poll it.
    while pg.superuser_exec(&active) != "1" {
        assert!(Instant::now() < deadline, "the statement never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    running
}

/// Waits for the backend of [`SLEEP_THEN_INSERT`] to go, at most until `limit` after `cut_at`
/// (well before the 6 s sleep would have ended), then checks that the INSERT never committed.
async fn assert_statement_cancelled(pg: &PgServer, cut_at: Instant, limit: Duration) {
    let backend =
        format!("SELECT count(*) FROM pg_stat_activity WHERE query = '{SLEEP_THEN_INSERT}'");
    // The backend is gone once it handled the cancel; only then is "not committed" final.
    while pg.superuser_exec(&backend) != "0" {
        assert!(
            cut_at.elapsed() < limit,
            "the backend still runs the statement {:?} after the cut",
            cut_at.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        pg.superuser_exec_in(APP_DB, "SELECT count(*) FROM t"),
        "0",
        "the INSERT after the sleep committed although its session was cut"
    );
    assert!(
        pg.log_contents()
            .contains("canceling statement due to user request"),
        "Postgres did not log the cancel"
    );
}

/// `SELECT pg_sleep(6); INSERT ...` is one implicit transaction. Cutting the session during
/// the sleep must cancel it: Postgres would otherwise notice the lost client only when it
/// writes the result, after the INSERT committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_session_has_its_running_statement_cancelled() {
    if !pg_available_or_skip() {
        return;
    }
    let pg = PgServer::start();
    let pki = TestPki::new();
    let (state, proxy) = start_orders(&pki, &pg, &[("lo", "127.0.0.0/8")], "");
    let stream = connect_from("127.0.0.2".parse().unwrap(), proxy.addr())
        .await
        .unwrap();
    let (client, conn) = app_session_over(stream, proxy.addr(), &pki, &pki.client)
        .await
        .unwrap();
    let running = start_sleep_then_insert(&pg, client).await;

    let cut_at = Instant::now();
    revoke(&state, &pki, &pki.client);
    proxy.wait_for_log(WAIT, reloaded(2));
    tokio::time::timeout(Duration::from_secs(2), conn)
        .await
        .expect("the session was not closed promptly")
        .unwrap()
        .ok();
    assert!(running.await.unwrap().is_err());
    assert_statement_cancelled(&pg, cut_at, Duration::from_secs(5)).await;
    let closed = proxy.wait_for_refusal("revoked_live");
    assert_eq!(closed["outcome"], "cut");
    proxy.wait_for_log(WAIT, |v| {
        v["message"] == "cut session: cancel request sent to its backend"
            && v["conn_id"] == closed["conn_id"]
    });
}

/// The same when the shutdown grace runs out: the statement is cancelled, not left to commit
/// after the proxy has exited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_cut_at_the_end_of_the_shutdown_grace_has_its_statement_cancelled() {
    if !pg_available_or_skip() {
        return;
    }
    let pg = PgServer::start();
    let pki = TestPki::new();
    let (_state, mut proxy) =
        start_orders(&pki, &pg, &[("lo", "127.0.0.0/8")], "shutdown_grace: 1s\n");
    let stream = connect_from("127.0.0.2".parse().unwrap(), proxy.addr())
        .await
        .unwrap();
    let (client, _conn) = app_session_over(stream, proxy.addr(), &pki, &pki.client)
        .await
        .unwrap();
    let running = start_sleep_then_insert(&pg, client).await;

    let term_at = Instant::now();
    proxy.signal("TERM");
    let status = proxy.wait_exit(WAIT);
    assert!(status.success(), "{status:?}");
    assert!(running.await.unwrap().is_err());
    assert_statement_cancelled(&pg, term_at, Duration::from_secs(5)).await;
    let closed = proxy.wait_for_refusal("shutdown");
    assert_eq!(closed["outcome"], "cut");
    proxy.wait_for_log(WAIT, |v| {
        v["message"] == "cut session: cancel request sent to its backend"
            && v["conn_id"] == closed["conn_id"]
    });
}
