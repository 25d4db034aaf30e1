//! Proves the test harness itself against a real PostgreSQL: servers start,
//! authenticate the default roles, serve TLS with the generated PKI, and go
//! away when dropped.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

use common::clients::{
    error_chain, pg_connect_plain, pg_connect_tls, tls_client_config, Psql, SslNegotiation,
};
use common::pg::{
    pg_available_or_skip, PgServer, ServerTls, APP_DB, APP_PASSWORD, APP_USER, BENCH_USER,
    TRUST_USER,
};
use common::pki::TestPki;
use tokio_postgres::error::SqlState;

const LOCALHOST: &str = "127.0.0.1";

/// PostgreSQL serving `upstream_server` and trusting client certs from `ca`.
fn tls_server(pki: &TestPki) -> PgServer {
    PgServer::builder()
        .ssl(ServerTls::from_roles(&pki.upstream_server, Some(&pki.ca)))
        .start()
}

#[tokio::test]
async fn app_logs_in_with_scram_password_over_plain_tcp() {
    if !pg_available_or_skip() {
        return;
    }
    let pg = PgServer::start();

    let (client, _conn) =
        pg_connect_plain(LOCALHOST, pg.port(), APP_USER, APP_DB, Some(APP_PASSWORD))
            .await
            .expect("app connects");
    let row = client
        .query_one(
            "SELECT 1::int4, current_user::text, current_database()::text",
            &[],
        )
        .await
        .unwrap();

    assert_eq!(row.get::<_, i32>(0), 1);
    assert_eq!(row.get::<_, String>(1), "app");
    assert_eq!(row.get::<_, String>(2), "app");
    let stored = pg.superuser_exec("SELECT rolpassword FROM pg_authid WHERE rolname = 'app'");
    assert!(
        stored.starts_with("SCRAM-SHA-256$"),
        "stored verifier: {stored}"
    );
}

#[tokio::test]
async fn app_with_wrong_password_is_told_authentication_failed() {
    if !pg_available_or_skip() {
        return;
    }
    let pg = PgServer::start();

    let Err(err) = pg_connect_plain(LOCALHOST, pg.port(), APP_USER, APP_DB, Some("wrong")).await
    else {
        panic!("wrong password must be refused");
    };

    let db = err.as_db_error().expect("server-side error");
    assert_eq!(db.code(), &SqlState::INVALID_PASSWORD);
    assert_eq!(
        db.message(),
        "password authentication failed for user \"app\""
    );
}

#[tokio::test]
async fn trustuser_connects_over_tls_after_verifying_postgres_against_upstream_ca() {
    if !pg_available_or_skip() {
        return;
    }
    let pki = TestPki::new();
    let pg = tls_server(&pki);

    for alpn in [false, true] {
        let tls = tls_client_config(&pki.upstream_ca.cert_path, None, alpn);
        let (client, _conn) = pg_connect_tls(
            LOCALHOST,
            pg.port(),
            TRUST_USER,
            "postgres",
            None,
            tls,
            SslNegotiation::Postgres,
        )
        .await
        .unwrap_or_else(|e| panic!("TLS connect (alpn={alpn}): {e}"));
        let row = client
            .query_one(
                "SELECT ssl, version::text FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
            )
            .await
            .unwrap();

        assert!(row.get::<_, bool>(0), "session is encrypted (alpn={alpn})");
        assert!(row.get::<_, String>(1).starts_with("TLS"));
    }
}

#[tokio::test]
async fn tls_client_refuses_postgres_whose_cert_is_not_from_the_trusted_root() {
    if !pg_available_or_skip() {
        return;
    }
    let pki = TestPki::new();
    let pg = tls_server(&pki);
    // `ca` did not issue upstream_server.
    let tls = tls_client_config(&pki.ca.cert_path, None, false);

    let Err(err) = pg_connect_tls(
        LOCALHOST,
        pg.port(),
        TRUST_USER,
        "postgres",
        None,
        tls,
        SslNegotiation::Postgres,
    )
    .await
    else {
        panic!("untrusted server cert must fail the handshake");
    };

    let msg = error_chain(&err);
    assert!(
        msg.contains("invalid peer certificate: UnknownIssuer"),
        "{msg}"
    );
}

#[test]
fn psql_logs_in_as_bench_with_client_cert_whose_cn_is_bench() {
    if !pg_available_or_skip() {
        return;
    }
    let pki = TestPki::new();
    let bench = pki.issue_valid_client(BENCH_USER);
    let pg = tls_server(&pki);

    let out = Psql::new(pg.psql_path(), LOCALHOST, pg.port(), BENCH_USER, "postgres")
        .verify_ca(
            &pki.upstream_ca.cert_path,
            Some((&bench.cert_path, &bench.key_path)),
        )
        .run("SELECT current_user");

    assert_eq!(out.expect_ok(), "bench");
}

#[test]
fn psql_as_bench_is_refused_when_cert_cn_names_someone_else() {
    if !pg_available_or_skip() {
        return;
    }
    let pki = TestPki::new();
    let pg = tls_server(&pki);

    let out = Psql::new(pg.psql_path(), LOCALHOST, pg.port(), BENCH_USER, "postgres")
        .verify_ca(
            &pki.upstream_ca.cert_path,
            Some((&pki.client.cert_path, &pki.client.key_path)),
        )
        .run("SELECT 1");

    assert!(!out.success());
    assert!(
        out.stderr
            .contains("certificate authentication failed for user \"bench\""),
        "{}",
        out.stderr
    );
}

#[test]
fn postgres_rejects_expired_client_cert_in_the_tls_handshake() {
    if !pg_available_or_skip() {
        return;
    }
    let pki = TestPki::new();
    let pg = tls_server(&pki);
    let expired = &pki.expired_client;

    let out = Psql::new(pg.psql_path(), LOCALHOST, pg.port(), TRUST_USER, "postgres")
        .verify_ca(
            &pki.upstream_ca.cert_path,
            Some((&expired.cert_path, &expired.key_path)),
        )
        .run("SELECT 1");

    assert!(!out.success());
    assert!(out.stderr.contains("certificate expired"), "{}", out.stderr);
}

/// True when nothing accepts TCP connections at `addr` any more.
fn refuses_connections(addr: SocketAddr) -> bool {
    TcpStream::connect(addr).is_err()
}

#[test]
fn dropping_a_server_stops_it_and_deletes_its_files() {
    if !pg_available_or_skip() {
        return;
    }
    let pg = PgServer::start();
    let (addr, data_dir) = (pg.addr(), pg.data_dir().to_path_buf());
    assert!(!refuses_connections(addr));

    drop(pg);

    assert!(refuses_connections(addr));
    assert!(!data_dir.exists());
}

#[test]
fn a_panicking_test_still_stops_its_server() {
    if !pg_available_or_skip() {
        return;
    }
    let mut seen: Option<(SocketAddr, PathBuf)> = None;

    let result = catch_unwind(AssertUnwindSafe(|| {
        let pg = PgServer::start();
        seen = Some((pg.addr(), pg.data_dir().to_path_buf()));
        panic!("simulated test failure");
    }));

    assert!(result.is_err());
    let (addr, data_dir) = seen.expect("server started before the panic");
    assert!(refuses_connections(addr));
    assert!(!data_dir.exists());
}

#[test]
fn stopped_server_refuses_connections_until_started_again_on_the_same_port() {
    if !pg_available_or_skip() {
        return;
    }
    let mut pg = PgServer::start();

    pg.stop();
    assert!(refuses_connections(pg.addr()));

    pg.start_again();
    assert_eq!(
        pg.superuser_exec("SELECT count(*) FROM pg_roles WHERE rolname = 'app'"),
        "1"
    );
    assert!(!refuses_connections(pg.addr()));
}
