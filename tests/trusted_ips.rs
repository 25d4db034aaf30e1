//! Trusted IP ranges with the reference's precedence: from an address only a trusted range
//! admits, TLS is required but a client certificate is optional (one that is sent must still
//! be valid) and Postgres' own authentication decides; from an address an IP rule covers, a
//! certificate is required even if the address is also trusted. The log and the metrics say
//! which list admitted a session, and live enforcement covers trusted ranges.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::IpAddr;
use std::time::Duration;

use common::admin::{scrape, status};
use common::clients::{
    connect_from, error_chain, pg_config, pg_connect_tls_over, session_from, tls_client_config,
    ConnTask, Psql,
};
use common::pg::{pg_available_or_skip, PgServer, APP_DB, APP_PASSWORD, APP_USER};
use common::pki::{Role, TestPki};
use common::proxy::ProxyProcess;
use common::state::{start_orders, TestState};
use serde_json::Value;
use tokio_postgres::config::SslMode;
use tokio_postgres::Client;

const WAIT: Duration = Duration::from_secs(20);

/// The app's session from `src` with `password`, presenting `cert` (or none).
async fn session(
    src: &str,
    proxy: &ProxyProcess,
    pki: &TestPki,
    cert: Option<&Role>,
    password: &str,
) -> Result<(Client, ConnTask), tokio_postgres::Error> {
    let stream = connect_from(src.parse::<IpAddr>().unwrap(), proxy.addr())
        .await
        .unwrap();
    let mut cfg = pg_config(
        "127.0.0.1",
        proxy.addr().port(),
        APP_USER,
        APP_DB,
        Some(password),
    );
    cfg.ssl_mode(SslMode::Require);
    let tls = tls_client_config(
        &pki.ca.cert_path,
        cert.map(|c| (c.chain_path.as_path(), c.key_path.as_path())),
        false,
    );
    pg_connect_tls_over(stream, &cfg, tls).await
}

async fn one(c: &Client) -> i32 {
    c.query_one("SELECT 1", &[]).await.unwrap().get(0)
}

fn closed_from(src: &str) -> impl Fn(&Value) -> bool + '_ {
    move |v| {
        v["message"] == "connection closed"
            && v["client_addr"]
                .as_str()
                .is_some_and(|a| a.starts_with(&format!("{src}:")))
    }
}

fn reloaded(generation: u64) -> impl Fn(&Value) -> bool {
    move |v| v["message"] == "configuration reloaded" && v["generation"] == generation
}

/// `orders` with IP rule `r2` for 127.0.0.2 and trusted range `t` for 127.0.0.0/29 (so
/// 127.0.0.2 is on both lists, 127.0.0.1 and 127.0.0.3 only on the trusted one).
fn start(pki: &TestPki, pg: &PgServer) -> (TestState, ProxyProcess) {
    let state = TestState::new("");
    state.add_database(
        "orders",
        pki,
        "127.0.0.1:0",
        pg.addr(),
        &[("r2", "127.0.0.2/32")],
    );
    state.write_trusted_ips("orders", &[("t", "127.0.0.0/29")]);
    let proxy = ProxyProcess::with_config(&state.config);
    (state, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_only_address_needs_no_certificate_and_postgres_decides_the_password() {
    if !pg_available_or_skip() {
        return;
    }
    let pg = PgServer::start();
    let pki = TestPki::new();
    let (_state, proxy) = start(&pki, &pg);

    // tokio-postgres from 127.0.0.3, no certificate, the right password.
    let (c, _conn) = session("127.0.0.3", &proxy, &pki, None, APP_PASSWORD)
        .await
        .expect("a trusted address connects without a certificate");
    assert_eq!(one(&c).await, 1);
    let user: String = c
        .query_one("SELECT current_user", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(user, APP_USER);
    drop(c);
    let line = proxy.wait_for_log(WAIT, |v| {
        closed_from("127.0.0.3")(v) && v["outcome"] == "closed"
    });
    assert_eq!(line["admitted_by"], "trusted_ip", "{line}");
    assert_eq!(line["rule_id"], "t", "{line}");
    assert!(line["client_serial"].is_null(), "{line}");
    assert_eq!(line["tls_version"], "TLSv1.3", "{line}");

    // The wrong password: the proxy lets it through, Postgres refuses it.
    let Err(e) = session("127.0.0.3", &proxy, &pki, None, "wrong").await else {
        panic!("a wrong password is refused");
    };
    assert_eq!(
        e.as_db_error().map(|d| d.code().code()),
        Some("28P01"),
        "{}",
        error_chain(&e)
    );
    assert!(
        error_chain(&e).contains("password authentication failed for user \"app\""),
        "{}",
        error_chain(&e)
    );
    assert!(pg
        .log_contents()
        .contains("password authentication failed for user \"app\""));

    // psql (source 127.0.0.1, trusted only), verify-ca without sslcert.
    let psql = Psql::new(
        pg.psql_path(),
        "127.0.0.1",
        proxy.addr().port(),
        APP_USER,
        APP_DB,
    )
    .verify_ca(&pki.ca.cert_path, None)
    .param("sslcert", "/nonexistent/client.crt")
    .param("sslkey", "/nonexistent/client.key")
    .password(APP_PASSWORD);
    assert_eq!(psql.run_async("SELECT 40 + 2").await.expect_ok(), "42");
    let wrong = psql.clone().password("wrong").run_async("SELECT 1").await;
    assert!(!wrong.success());
    assert!(
        wrong.stderr.contains("password authentication failed"),
        "{}",
        wrong.stderr
    );

    // 127.0.0.2 is on both lists: the IP rule wins, a certificate is required.
    let Err(e) = session("127.0.0.2", &proxy, &pki, None, APP_PASSWORD).await else {
        panic!("an address with an IP rule needs a certificate even if trusted");
    };
    let refused = proxy.wait_for_refusal("client_cert_missing");
    assert!(
        refused["client_addr"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.2:"),
        "{refused} / {}",
        error_chain(&e)
    );
    assert_eq!(refused["admitted_by"], "mtls_rule");
    assert_eq!(refused["rule_id"], "r2");
    // ...and with one, it connects as an mTLS session.
    let (c, _conn) = session_from("127.0.0.2", &pki, &pki.client, &proxy)
        .await
        .unwrap();
    assert_eq!(one(&c).await, 1);
    drop(c);
    let line = proxy.wait_for_log(WAIT, |v| {
        closed_from("127.0.0.2")(v) && v["outcome"] == "closed"
    });
    assert_eq!(line["admitted_by"], "mtls_rule", "{line}");
    assert_eq!(line["client_cn"], "\"app-client\"", "{line}");

    // An address on neither list is refused before TLS.
    let mut stream = connect_from("127.0.0.9".parse().unwrap(), proxy.addr())
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut buf).await;
    let refused = proxy.wait_for_refusal("ip_not_allowed");
    assert!(refused["admitted_by"].is_null(), "{refused}");

    let m = scrape(proxy.admin()).await;
    let admitted = |by: &str| {
        m.value(
            "pgmtls_connections_admitted_total",
            &format!(r#"database="orders",admitted_by="{by}""#),
        )
    };
    // tokio-postgres and psql from trusted addresses (the wrong passwords were relayed too,
    // and refused by Postgres, which the proxy sees as an upstream refusal, not a session).
    assert_eq!(admitted("trusted_ip"), 2.0);
    assert_eq!(admitted("mtls_rule"), 1.0);
    assert_eq!(
        m.value("pgmtls_connections_accepted_total", r#"database="orders""#),
        3.0
    );
    assert_eq!(m.value("pgmtls_trusted_ips", r#"database="orders""#), 1.0);

    // /status lists the trusted range by id, apart from the IP rules.
    let status = status(proxy.admin()).await;
    assert_eq!(
        status["databases"]["orders"]["trusted_ips"],
        serde_json::json!(["t"])
    );
    assert_eq!(
        status["databases"]["orders"]["rules"],
        serde_json::json!(["r2"])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_certificate_from_a_trusted_range_is_still_refused() {
    if !pg_available_or_skip() {
        return;
    }
    let pg = PgServer::start();
    let pki = TestPki::new();
    let (state, proxy) = start(&pki, &pg);
    let revoked = pki.issue_valid_client("revoked-app");
    state.add_certificate_record("orders", "gone", &revoked);
    state.revoke("orders", &pki, "gone", &revoked, 2);
    proxy.wait_for_log(WAIT, reloaded(2));

    for (cert, kind) in [
        (&pki.other_ca_client, "client_cert_untrusted"),
        (&pki.expired_client, "client_cert_expired"),
        (&revoked, "client_cert_revoked"),
    ] {
        let e = session("127.0.0.3", &proxy, &pki, Some(cert), APP_PASSWORD)
            .await
            .err()
            .unwrap_or_else(|| panic!("{kind}: a bad certificate is refused"));
        let line = proxy.wait_for_refusal(kind);
        assert!(
            line["client_addr"]
                .as_str()
                .unwrap()
                .starts_with("127.0.0.3:"),
            "{line} / {}",
            error_chain(&e)
        );
        assert_eq!(line["admitted_by"], "trusted_ip", "{line}");
    }
    // A valid certificate from the trusted range is accepted and named.
    let (c, _conn) = session("127.0.0.3", &proxy, &pki, Some(&pki.client), APP_PASSWORD)
        .await
        .unwrap();
    assert_eq!(one(&c).await, 1);
    drop(c);
    let line = proxy.wait_for_log(WAIT, |v| {
        closed_from("127.0.0.3")(v) && v["outcome"] == "closed"
    });
    assert_eq!(line["client_cn"], "\"app-client\"", "{line}");
    assert_eq!(line["admitted_by"], "trusted_ip", "{line}");
    let m = scrape(proxy.admin()).await;
    for kind in [
        "client_cert_untrusted",
        "client_cert_expired",
        "client_cert_revoked",
    ] {
        assert_eq!(
            m.value(
                "pgmtls_connections_refused_total",
                &format!(r#"database="orders",reason="{kind}""#)
            ),
            1.0,
            "{kind}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_trusted_range_cuts_the_sessions_it_admitted_and_spares_mtls_ones() {
    if !pg_available_or_skip() {
        return;
    }
    let pg = PgServer::start();
    let pki = TestPki::new();
    let (state, proxy) = start(&pki, &pg);
    let (trusted, trusted_conn) = session("127.0.0.3", &proxy, &pki, None, APP_PASSWORD)
        .await
        .unwrap();
    let (mtls, _mtls_conn) = session_from("127.0.0.2", &pki, &pki.client, &proxy)
        .await
        .unwrap();
    assert_eq!(one(&trusted).await, 1);
    assert_eq!(one(&mtls).await, 1);

    let written = std::time::Instant::now();
    state.write_trusted_ips("orders", &[]);
    let line = proxy.wait_for_log(WAIT, reloaded(2));
    let reload_seen = written.elapsed();
    assert_eq!(line["sessions_closed"], 1, "{line}");
    assert_eq!(line["changes"], "orders: trusted ips 1 -> 0 (-t)", "{line}");
    tokio::time::timeout(WAIT, trusted_conn)
        .await
        .expect("the trusted session is closed")
        .unwrap()
        .ok();
    eprintln!(
        "trusted range deleted: reload applied {reload_seen:?} after the write, session closed \
         {:?} after the write",
        written.elapsed()
    );
    let cut = proxy.wait_for_refusal("revoked_live");
    assert!(
        cut["client_addr"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.3:"),
        "{cut}"
    );
    assert_eq!(cut["detail"], "trusted ip range removed", "{cut}");
    assert_eq!(cut["admitted_by"], "trusted_ip", "{cut}");
    assert_eq!(cut["rule_id"], "t", "{cut}");
    // The session a certificate and an IP rule admitted never noticed.
    assert_eq!(one(&mtls).await, 1);
    // And the address is no longer admitted at all.
    assert!(session("127.0.0.3", &proxy, &pki, None, APP_PASSWORD)
        .await
        .is_err());
    proxy.wait_for_refusal("ip_not_allowed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_ip_rule_over_a_trusted_session_without_a_certificate_cuts_it() {
    if !pg_available_or_skip() {
        return;
    }
    let pg = PgServer::start();
    let pki = TestPki::new();
    let (state, proxy) = start_orders(&pki, &pg, &[], "");
    state.write_trusted_ips("orders", &[("t", "127.0.0.0/29")]);
    proxy.wait_for_log(WAIT, reloaded(2));
    let (bare, bare_conn) = session("127.0.0.3", &proxy, &pki, None, APP_PASSWORD)
        .await
        .unwrap();
    let (with_cert, _c) = session("127.0.0.3", &proxy, &pki, Some(&pki.client), APP_PASSWORD)
        .await
        .unwrap();
    assert_eq!(one(&bare).await, 1);
    assert_eq!(one(&with_cert).await, 1);
    // An IP rule now covers 127.0.0.3: its certificate requirement takes precedence.
    state.write_rules("orders", &[("r3", "127.0.0.3/32")]);
    let line = proxy.wait_for_log(WAIT, reloaded(3));
    assert_eq!(line["sessions_closed"], 1, "{line}");
    tokio::time::timeout(WAIT, bare_conn)
        .await
        .expect("the session without a certificate is closed")
        .unwrap()
        .ok();
    let cut = proxy.wait_for_refusal("revoked_live");
    assert_eq!(
        cut["detail"], "ip rule requires a client certificate",
        "{cut}"
    );
    // The session with a valid certificate stays.
    assert_eq!(one(&with_cert).await, 1);
}

/// `pgmtls ARGS` against the etcd prefix `config` names; panics with stderr on failure.
fn cli(config: &std::path::Path, args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgmtls"))
        .args(args)
        .env_remove("PGMTLS_STATE_DIR")
        .env("PGMTLS_CONFIG", config)
        .env("PGMTLS_ACTOR", "tester")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "`pgmtls {}`: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_on_etcd_enforces_a_trusted_range_made_and_deleted_with_the_cli() {
    use common::etcd::{etcd_available_or_skip, EtcdServer};
    if !pg_available_or_skip() || !etcd_available_or_skip() {
        return;
    }
    let pg = PgServer::start();
    let etcd = EtcdServer::start();
    let pki = TestPki::new();
    let state = TestState::new("");
    state.add_database(
        "orders",
        &pki,
        "127.0.0.1:0",
        pg.addr(),
        &[("r2", "127.0.0.2/32")],
    );
    etcd.import_state(&state.root, "/pgmtls");
    std::fs::remove_dir_all(&state.root).unwrap();
    let etcd_section = format!(
        "etcd:\n  endpoints: [{}]\n  prefix: /pgmtls\n",
        etcd.endpoint()
    );
    let config = state.dir().join("replica.yaml");
    std::fs::write(
        &config,
        format!("{etcd_section}admin_listen: 127.0.0.1:0\nreload_poll_interval: 1h\n"),
    )
    .unwrap();
    let operator = state.dir().join("operator.yaml");
    std::fs::write(&operator, &etcd_section).unwrap();
    let proxy = ProxyProcess::with_config(&config);
    assert_eq!(status(proxy.admin()).await["source"]["kind"], "etcd");
    // Not trusted yet: 127.0.0.3 has no IP rule either.
    assert!(session("127.0.0.3", &proxy, &pki, None, APP_PASSWORD)
        .await
        .is_err());
    proxy.wait_for_refusal("ip_not_allowed");

    let created: Value = serde_json::from_str(&cli(
        &operator,
        &[
            "trusted-ips",
            "create",
            "orders",
            "--cidr",
            "127.0.0.3/32",
            "--json",
        ],
    ))
    .unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    let out = etcd.etcdctl(&[
        "get",
        "--print-value-only",
        "/pgmtls/databases/orders/trusted-ips.yaml",
    ]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&id),
        "the record is in etcd"
    );
    // The replica follows the watch; /status names the range once it is in force.
    common::admin::wait_status(proxy.admin(), WAIT, |s| {
        s["databases"]["orders"]["trusted_ips"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x == id.as_str()))
    })
    .await;
    let listed: Value =
        serde_json::from_str(&cli(&operator, &["trusted-ips", "orders", "--json"])).unwrap();
    assert_eq!(listed[0]["id"], id.as_str());

    let (c, conn) = session("127.0.0.3", &proxy, &pki, None, APP_PASSWORD)
        .await
        .expect("the replica admits the trusted range without a certificate");
    assert_eq!(one(&c).await, 1);

    cli(&operator, &["trusted-ips", "delete", "orders", "--id", &id]);
    tokio::time::timeout(WAIT, conn)
        .await
        .expect("the replica closes the session the deleted range admitted")
        .unwrap()
        .ok();
    let cut = proxy.wait_for_refusal("revoked_live");
    assert_eq!(cut["detail"], "trusted ip range removed", "{cut}");
    assert_eq!(cut["admitted_by"], "trusted_ip", "{cut}");
    assert_eq!(cut["rule_id"], id.as_str(), "{cut}");
    let audit = etcd.etcdctl(&["get", "--prefix", "--print-value-only", "/pgmtls/audit/"]);
    let audit = String::from_utf8_lossy(&audit.stdout);
    assert!(audit.contains("\"trusted_ip.create\""), "{audit}");
    assert!(audit.contains("\"trusted_ip.delete\""), "{audit}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_the_shared_listener_the_picked_database_decides_with_the_same_precedence() {
    if !pg_available_or_skip() {
        return;
    }
    let pg = PgServer::start();
    let pki = TestPki::new();
    let state = TestState::new("shared_listen: 127.0.0.1:0\ndefault_database: orders\n");
    state.add_database(
        "orders",
        &pki,
        "shared",
        pg.addr(),
        &[("r2", "127.0.0.2/32")],
    );
    state.write_trusted_ips("orders", &[("t", "127.0.0.0/29")]);
    let proxy = ProxyProcess::with_config(&state.config);
    // Admitted at accept by the trusted range alone, then by the database the pick names.
    let (c, _conn) = session("127.0.0.3", &proxy, &pki, None, APP_PASSWORD)
        .await
        .expect("a trusted address connects through the shared listener without a certificate");
    assert_eq!(one(&c).await, 1);
    drop(c);
    let line = proxy.wait_for_log(WAIT, |v| {
        closed_from("127.0.0.3")(v) && v["outcome"] == "closed"
    });
    assert_eq!(line["listener"], "shared", "{line}");
    assert_eq!(line["admitted_by"], "trusted_ip", "{line}");
    assert_eq!(line["rule_id"], "t", "{line}");
    // On both lists: the IP rule wins there too.
    assert!(session("127.0.0.2", &proxy, &pki, None, APP_PASSWORD)
        .await
        .is_err());
    let refused = proxy.wait_for_refusal("client_cert_missing");
    assert_eq!(refused["admitted_by"], "mtls_rule", "{refused}");
    // On neither: closed at accept, charged to the shared listener.
    let mut s = connect_from("127.0.0.9".parse().unwrap(), proxy.addr())
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::io::AsyncReadExt::read_to_end(&mut s, &mut buf).await;
    assert!(buf.is_empty());
    proxy.wait_for_refusal("ip_not_allowed");
}
