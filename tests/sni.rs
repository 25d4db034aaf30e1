//! Many databases on one port, picked by SNI: two databases made by the CLI with
//! `--listen shared`, each with its own CA, server certificate and IP rules, in front of two
//! Postgres servers (so that `inet_server_port()` tells which one a client reached), next to a
//! database on its own port. Real psql and tokio-postgres, real TLS.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cli_support;
mod common;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cli_support::Env;
use common::admin::scrape;
use common::clients::{connect_from, pg_config, pg_connect_tls_over, tls_client_config, Psql};
use common::pg::{pg_available_or_skip, PgServer, APP_DB, APP_PASSWORD, APP_USER};
use common::proxy::ProxyProcess;
use common::wire::assert_generic_refusal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::config::SslMode;
use tokio_postgres::error::SqlState;

const ORDERS: &str = "orders.db.test";
const BILLING: &str = "billing.db.test";
const SLEEP_SQL: &str = "SELECT pg_sleep(60)";

/// The libpq files of one database's first certificate.
struct Files {
    crt: PathBuf,
    key: PathBuf,
    root: PathBuf,
    /// The key as DER PKCS#8, the form pgjdbc reads.
    pk8: PathBuf,
}

struct Gateway {
    env: Env,
    pg_orders: PgServer,
    pg_billing: PgServer,
    orders: Files,
    billing: Files,
    legacy: Files,
    proxy: ProxyProcess,
}

fn create(env: &Env, name: &str, listen: &str, server_name: &str, upstream: SocketAddr) {
    env.run(&[
        "mtls",
        "create",
        name,
        "--listen",
        listen,
        "--server-name",
        server_name,
        "--upstream",
        &upstream.to_string(),
        "--confirm",
        name,
        "--json",
    ])
    .ok();
}

fn rule(env: &Env, name: &str, cidr: &str) {
    env.run(&["ip-rules", "create", name, "--cidr", cidr]).ok();
}

fn download(env: &Env, name: &str) -> Files {
    let id = env.run(&["certificates", name, "--json"]).json()[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let dir = env.dir.path().join("client");
    let prefix = format!("{name}_");
    env.run(&[
        "certificates",
        "download",
        name,
        "--id",
        &id,
        "--prefix",
        &prefix,
        "--dir",
        dir.to_str().unwrap(),
    ])
    .ok();
    Files {
        crt: dir.join(format!("{prefix}postgresql.crt")),
        key: dir.join(format!("{prefix}postgresql.key")),
        root: dir.join(format!("{prefix}root.crt")),
        pk8: dir.join(format!("{prefix}postgresql.pk8")),
    }
}

fn spawn(env: &Env, extra: &str) -> ProxyProcess {
    let path = env.dir.path().join(format!("pgmtls-{}.yaml", extra.len()));
    std::fs::write(
        &path,
        format!(
            "state_dir: {}\nadmin_listen: 127.0.0.1:0\nlog_format: json\n\
             shared_listen: 127.0.0.1:0\n{extra}",
            env.state.display()
        ),
    )
    .unwrap();
    ProxyProcess::spawn(&["--config", path.to_str().unwrap()])
}

/// orders (shared, admits 127.0.0.1 and .2), billing (shared, admits 127.0.0.1 and .4) and
/// legacy (its own port, admits 127.0.0.1, in front of the orders Postgres).
fn gateway(extra: &str) -> Option<Gateway> {
    if !pg_available_or_skip() {
        return None;
    }
    let pg_orders = PgServer::start();
    let pg_billing = PgServer::start();
    let env = Env::new();
    create(&env, "orders", "shared", ORDERS, pg_orders.addr());
    create(&env, "billing", "shared", BILLING, pg_billing.addr());
    create(
        &env,
        "legacy",
        "127.0.0.1:0",
        "legacy.db.test",
        pg_orders.addr(),
    );
    for (db, cidr) in [
        ("orders", "127.0.0.1/32"),
        ("orders", "127.0.0.2/32"),
        ("billing", "127.0.0.1/32"),
        ("billing", "127.0.0.4/32"),
        ("legacy", "127.0.0.1/32"),
    ] {
        rule(&env, db, cidr);
    }
    let (orders, billing, legacy) = (
        download(&env, "orders"),
        download(&env, "billing"),
        download(&env, "legacy"),
    );
    let proxy = spawn(&env, extra);
    Some(Gateway {
        env,
        pg_orders,
        pg_billing,
        orders,
        billing,
        legacy,
        proxy,
    })
}

impl Gateway {
    fn shared(&self) -> SocketAddr {
        self.proxy.addrs["orders"]
    }

    /// psql to the shared port as `host` (SNI) at 127.0.0.1, verifying the server fully
    /// against `root` when `host` is a name, presenting `files`' certificate.
    fn psql(&self, host: &str, files: &Files, root: &Path) -> Psql {
        let p = Psql::new(
            self.pg_orders.psql_path(),
            host,
            self.shared().port(),
            APP_USER,
            APP_DB,
        )
        .verify_ca(root, Some((files.crt.as_path(), files.key.as_path())))
        .password(APP_PASSWORD);
        if host.parse::<IpAddr>().is_ok() {
            p
        } else {
            p.param("hostaddr", "127.0.0.1")
                .param("sslmode", "verify-full")
        }
    }
}

async fn upstream_port_via_psql(psql: &Psql) -> u16 {
    psql.run_async("SELECT inet_server_port()")
        .await
        .expect_ok()
        .parse()
        .unwrap()
}

/// tokio-postgres from `src` to `addr`, sending `sni` as the TLS server name.
async fn tokio_pg(
    src: &str,
    addr: SocketAddr,
    sni: &str,
    files: &Files,
    mode: SslMode,
) -> Result<(tokio_postgres::Client, common::clients::ConnTask), tokio_postgres::Error> {
    let stream = connect_from(src.parse().unwrap(), addr).await.unwrap();
    let mut cfg = pg_config(sni, addr.port(), APP_USER, APP_DB, Some(APP_PASSWORD));
    cfg.ssl_mode(mode);
    let tls = tls_client_config(&files.root, Some((&files.crt, &files.key)), false);
    pg_connect_tls_over(stream, &cfg, tls).await
}

async fn server_port(c: &tokio_postgres::Client) -> u16 {
    let port: i32 = c
        .query_one("SELECT inet_server_port()", &[])
        .await
        .unwrap()
        .get(0);
    port as u16
}

async fn refused_metric(proxy: &ProxyProcess, name: &str, labels: &str) -> f64 {
    scrape(proxy.admin()).await.value(name, labels)
}

/// Waits until the metric reaches `want` (the log line and the counter are written by the
/// same connection task; the scrape may come a moment before the counter).
async fn wait_metric(proxy: &ProxyProcess, name: &str, labels: &str, want: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = refused_metric(proxy, name, labels).await;
        if v >= want {
            return;
        }
        assert!(Instant::now() < deadline, "{name}{{{labels}}} is {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_and_tokio_postgres_reach_the_database_their_server_name_picks() {
    let Some(g) = gateway("") else {
        return;
    };
    // Every database's listener is the shared one, except the per-port database's.
    assert_eq!(g.proxy.addrs["orders"], g.proxy.addrs["billing"]);
    assert_ne!(g.proxy.addrs["legacy"], g.shared());

    // psql with verify-full: each name gets its own database's certificate and upstream.
    let orders = g.psql(ORDERS, &g.orders, &g.orders.root);
    assert_eq!(upstream_port_via_psql(&orders).await, g.pg_orders.port());
    let billing = g.psql(BILLING, &g.billing, &g.billing.root);
    assert_eq!(upstream_port_via_psql(&billing).await, g.pg_billing.port());
    let line = g.proxy.wait_for_log(Duration::from_secs(10), |v| {
        v["message"] == "connection closed" && v["database"] == "billing"
    });
    assert_eq!(line["listener"], "shared");
    assert_eq!(line["outcome"], "closed");

    // tokio-postgres (rustls sends the host as SNI), over SSLRequest, from 127.0.0.2.
    let (c, _conn) = tokio_pg("127.0.0.2", g.shared(), ORDERS, &g.orders, SslMode::Require)
        .await
        .unwrap();
    assert_eq!(server_port(&c).await, g.pg_orders.port());
    let (c, _conn) = tokio_pg(
        "127.0.0.1",
        g.shared(),
        BILLING,
        &g.billing,
        SslMode::Require,
    )
    .await
    .unwrap();
    assert_eq!(server_port(&c).await, g.pg_billing.port());

    // Direct TLS (PostgreSQL 17's sslnegotiation=direct) is picked by SNI the same way.
    let stream = connect_from("127.0.0.1".parse().unwrap(), g.shared())
        .await
        .unwrap();
    let mut cfg = pg_config(
        BILLING,
        g.shared().port(),
        APP_USER,
        APP_DB,
        Some(APP_PASSWORD),
    );
    cfg.ssl_mode(SslMode::Require)
        .ssl_negotiation(tokio_postgres::config::SslNegotiation::Direct);
    let tls = tls_client_config(
        &g.billing.root,
        Some((&g.billing.crt, &g.billing.key)),
        true,
    );
    let (c, _conn) = pg_connect_tls_over(stream, &cfg, tls).await.unwrap();
    assert_eq!(server_port(&c).await, g.pg_billing.port());

    // The per-database port keeps working next to the shared one.
    let legacy = Psql::new(
        g.pg_orders.psql_path(),
        "127.0.0.1",
        g.proxy.addrs["legacy"].port(),
        APP_USER,
        APP_DB,
    )
    .verify_ca(
        &g.legacy.root,
        Some((g.legacy.crt.as_path(), g.legacy.key.as_path())),
    )
    .password(APP_PASSWORD);
    assert_eq!(upstream_port_via_psql(&legacy).await, g.pg_orders.port());
    // The shared port does not serve the per-port database's name.
    let out = g
        .psql("legacy.db.test", &g.legacy, &g.legacy.root)
        .run_async("SELECT 1")
        .await;
    assert!(!out.success(), "the shared port served a per-port database");
    g.proxy.wait_for_refusal("sni_unknown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_sni_or_an_unknown_name_is_closed_with_its_reason_unless_a_default_is_set() {
    let Some(g) = gateway("") else {
        return;
    };
    // libpq sends no SNI for an IP address host.
    let out = g
        .psql("127.0.0.1", &g.orders, &g.orders.root)
        .run_async("SELECT 1")
        .await;
    assert!(!out.success(), "a client without SNI was served");
    let line = g.proxy.wait_for_refusal("sni_missing");
    assert_eq!(line["listener"], "shared");
    assert!(line.get("database").is_none_or(|d| d.is_null()), "{line}");
    wait_metric(
        &g.proxy,
        "pgmtls_shared_listener_refused_total",
        "reason=\"sni_missing\"",
        1.0,
    )
    .await;

    let out = g
        .psql("nobody.db.test", &g.orders, &g.orders.root)
        .run_async("SELECT 1")
        .await;
    assert!(!out.success(), "an unknown server name was served");
    let line = g.proxy.wait_for_refusal("sni_unknown");
    assert!(
        line["detail"].as_str().unwrap().contains("nobody.db.test"),
        "{line}"
    );
    wait_metric(
        &g.proxy,
        "pgmtls_shared_listener_refused_total",
        "reason=\"sni_unknown\"",
        1.0,
    )
    .await;

    // With a default database, both reach it.
    let with_default = spawn(&g.env, "default_database: billing\n");
    let shared = with_default.addrs["billing"];
    for host in ["127.0.0.1", "nobody.db.test"] {
        let mut p = Psql::new(
            g.pg_orders.psql_path(),
            host,
            shared.port(),
            APP_USER,
            APP_DB,
        )
        .verify_ca(
            &g.billing.root,
            Some((g.billing.crt.as_path(), g.billing.key.as_path())),
        )
        .password(APP_PASSWORD);
        if host != "127.0.0.1" {
            p = p.param("hostaddr", "127.0.0.1");
        }
        assert_eq!(upstream_port_via_psql(&p).await, g.pg_billing.port());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_of_one_database_is_refused_for_another_databases_name() {
    let Some(g) = gateway("") else {
        return;
    };
    // A client that trusts both CAs, so that it accepts billing's server and sends orders'
    // certificate to it: billing's CA must refuse it.
    let both = g.env.dir.path().join("both-roots.crt");
    let mut roots = std::fs::read(&g.orders.root).unwrap();
    roots.extend(std::fs::read(&g.billing.root).unwrap());
    std::fs::write(&both, roots).unwrap();
    let out = g
        .psql(BILLING, &g.orders, &both)
        .run_async("SELECT 1")
        .await;
    assert!(!out.success(), "orders' certificate opened billing");
    let line = g.proxy.wait_for_refusal("client_cert_untrusted");
    assert_eq!(line["database"], "billing");
    wait_metric(
        &g.proxy,
        "pgmtls_connections_refused_total",
        "database=\"billing\",reason=\"client_cert_untrusted\"",
        1.0,
    )
    .await;
    // The same files for their own name work.
    let ok = g.psql(ORDERS, &g.orders, &both);
    assert_eq!(upstream_port_via_psql(&ok).await, g.pg_orders.port());
}

/// pgjdbc (Debian's `libpostgresql-jdbc-java`, which `.ci/run` installs with a JRE) is
/// required; `PGMTLS_TEST_SKIP_JDBC=1` skips its test on a laptop without it.
const JDBC_JAR: &str = "/usr/share/java/postgresql.jar";

fn jdbc_available_or_skip() -> bool {
    let java = std::process::Command::new("java").arg("-version").output();
    if Path::new(JDBC_JAR).exists() && java.is_ok_and(|o| o.status.success()) {
        return true;
    }
    if std::env::var_os("PGMTLS_TEST_SKIP_JDBC").is_some() {
        eprintln!("skipping: pgjdbc or java missing and PGMTLS_TEST_SKIP_JDBC is set");
        return false;
    }
    panic!(
        "{JDBC_JAR} or java not found: apt-get install libpostgresql-jdbc-java \
         openjdk-17-jre-headless, or set PGMTLS_TEST_SKIP_JDBC=1"
    );
}

/// Runs tests/jdbc/Probe.java: one pgjdbc connection to `name` (resolved to 127.0.0.1 by a
/// hosts file of the test's own, as libpq's hostaddr would) on the shared port, with
/// verify-full and `files`' certificate; returns pgjdbc's stdout line and whether it got in.
fn jdbc(g: &Gateway, name: &str, files: &Files, sql: &str) -> (bool, String) {
    let hosts = g.env.dir.path().join("jdbc-hosts");
    std::fs::write(
        &hosts,
        format!("127.0.0.1 {ORDERS} {BILLING} nobody.db.test\n"),
    )
    .unwrap();
    let url = format!(
        "jdbc:postgresql://{name}:{port}/{APP_DB}?user={APP_USER}&password={APP_PASSWORD}\
         &sslmode=verify-full&sslrootcert={root}&sslcert={crt}&sslkey={pk8}\
         &connectTimeout=10&socketTimeout=20",
        port = g.shared().port(),
        root = files.root.display(),
        crt = files.crt.display(),
        pk8 = files.pk8.display(),
    );
    let probe = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/jdbc/Probe.java");
    let out = std::process::Command::new("java")
        .arg(format!("-Djdk.net.hosts.file={}", hosts.display()))
        .args(["-cp", JDBC_JAR])
        .arg(&probe)
        .args([&url, sql])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stdout.starts_with("ERROR") || out.status.success(),
        "java failed to run the probe: {stdout}\n{stderr}"
    );
    (out.status.success(), stdout)
}

/// pgjdbc sends the host name as SNI (Java's TLS does for a host name, not for an address),
/// so it reaches the database that name picks, and the other database's CA refuses its
/// certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgjdbc_reaches_the_database_its_host_name_picks() {
    if !jdbc_available_or_skip() {
        return;
    }
    let Some(g) = gateway("") else {
        return;
    };
    let sql = "SELECT inet_server_port()";
    let (ok, port) = jdbc(&g, ORDERS, &g.orders, sql);
    assert!(ok, "pgjdbc to {ORDERS}: {port}");
    assert_eq!(port, g.pg_orders.port().to_string());
    let (ok, port) = jdbc(&g, BILLING, &g.billing, sql);
    assert!(ok, "pgjdbc to {BILLING}: {port}");
    assert_eq!(port, g.pg_billing.port().to_string());

    // With billing's root and orders' certificate, pgjdbc reaches billing's server but
    // offers no certificate: Java's key manager sends one only if its issuer is among the
    // CA names billing's CertificateRequest lists. The refusal says so.
    let crossed = Files {
        crt: g.orders.crt.clone(),
        key: g.orders.key.clone(),
        root: g.billing.root.clone(),
        pk8: g.orders.pk8.clone(),
    };
    let (ok, out) = jdbc(&g, BILLING, &crossed, sql);
    assert!(
        !ok,
        "orders' certificate opened billing through pgjdbc: {out}"
    );
    let line = g.proxy.wait_for_refusal("client_cert_missing");
    assert_eq!(line["database"], "billing");

    // An unknown name is closed with its reason.
    let (ok, out) = jdbc(&g, "nobody.db.test", &g.orders, sql);
    assert!(!ok, "an unknown name was served to pgjdbc: {out}");
    g.proxy.wait_for_refusal("sni_unknown");
}

fn ssl_request() -> [u8; 8] {
    let mut r = [0u8; 8];
    r[..4].copy_from_slice(&8u32.to_be_bytes());
    r[4..].copy_from_slice(&80_877_103u32.to_be_bytes());
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_comes_before_crypto_on_the_shared_port() {
    let Some(g) = gateway("") else {
        return;
    };
    // 127.0.0.3: no database on the shared listener admits it. Refused before the SSLRequest
    // is answered: not the 'S', only the generic refusal.
    let mut s = connect_from("127.0.0.3".parse().unwrap(), g.shared())
        .await
        .unwrap();
    let _ = s.write_all(&ssl_request()).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("a refused peer is closed");
    assert_generic_refusal(&out);
    let line = g.proxy.wait_for_log(Duration::from_secs(10), |v| {
        v["error_kind"] == "ip_not_allowed"
            && v["client_addr"]
                .as_str()
                .is_some_and(|a| a.starts_with("127.0.0.3:"))
    });
    assert_eq!(line["listener"], "shared");
    assert!(
        line.get("negotiation").is_none_or(|n| n.is_null()),
        "{line}"
    );
    wait_metric(
        &g.proxy,
        "pgmtls_shared_listener_refused_total",
        "reason=\"ip_not_allowed\"",
        1.0,
    )
    .await;

    // 127.0.0.2 is admitted by orders but not by billing: naming billing, it is refused
    // after the ClientHello, before the handshake goes on (no certificate is looked at).
    let refused = tokio_pg(
        "127.0.0.2",
        g.shared(),
        BILLING,
        &g.billing,
        SslMode::Require,
    )
    .await;
    assert!(refused.is_err(), "billing admitted 127.0.0.2");
    let line = g.proxy.wait_for_log(Duration::from_secs(10), |v| {
        v["error_kind"] == "ip_not_allowed" && v["database"] == "billing"
    });
    assert!(
        line.get("client_serial").is_none_or(|s| s.is_null()),
        "{line}"
    );
    wait_metric(
        &g.proxy,
        "pgmtls_connections_refused_total",
        "database=\"billing\",reason=\"ip_not_allowed\"",
        1.0,
    )
    .await;
    // The same source naming orders gets in.
    let (c, _conn) = tokio_pg("127.0.0.2", g.shared(), ORDERS, &g.orders, SslMode::Require)
        .await
        .unwrap();
    assert_eq!(server_port(&c).await, g.pg_orders.port());
}

async fn wait_until_sleeping(pg: &PgServer) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let n = pg.superuser_exec(
            "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60)' AND state = 'active'",
        );
        if n == "1" {
            return;
        }
        assert!(Instant::now() < deadline, "the sleep never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plaintext_cancel_on_the_shared_port_reaches_the_sessions_database_under_its_rules() {
    let Some(g) = gateway("") else {
        return;
    };
    // `prefer` with a TLS connector: the session is TLS, and tokio-postgres sends its cancel
    // in plaintext, as libpq before 17 does.
    let (c, _conn) = tokio_pg("127.0.0.2", g.shared(), ORDERS, &g.orders, SslMode::Prefer)
        .await
        .unwrap();
    let token = c.cancel_token();
    let query = tokio::spawn(async move { c.simple_query(SLEEP_SQL).await.map(|_| ()) });
    wait_until_sleeping(&g.pg_orders).await;

    // From 127.0.0.4: billing admits it, orders (the session's database) does not.
    let s = connect_from("127.0.0.4".parse().unwrap(), g.shared())
        .await
        .unwrap();
    let _ = token.cancel_query_raw(s, tokio_postgres::NoTls).await;
    let line = g.proxy.wait_for_log(Duration::from_secs(10), |v| {
        v["negotiation"] == "cancel" && v["error_kind"] == "ip_not_allowed"
    });
    assert_eq!(line["database"], "orders");
    assert!(!query.is_finished(), "a refused cancel cancelled the query");

    // From 127.0.0.2, which orders admits: the key finds the session and cancels it.
    let s = connect_from("127.0.0.2".parse().unwrap(), g.shared())
        .await
        .unwrap();
    token
        .cancel_query_raw(s, tokio_postgres::NoTls)
        .await
        .expect("cancel on the shared port");
    let err = tokio::time::timeout(Duration::from_secs(30), query)
        .await
        .expect("cancelled quickly")
        .unwrap()
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::QUERY_CANCELED));
    let line = g.proxy.wait_for_log(Duration::from_secs(10), |v| {
        v["outcome"] == "cancel_forwarded"
    });
    assert_eq!(line["database"], "orders");
    assert_eq!(line["listener"], "shared");
}

#[test]
fn two_databases_cannot_share_a_server_name_on_the_shared_listener() {
    let env = Env::new();
    create(
        &env,
        "orders",
        "shared",
        ORDERS,
        "127.0.0.1:5432".parse().unwrap(),
    );
    let out = env.run(&[
        "mtls",
        "create",
        "billing",
        "--listen",
        "shared",
        "--server-name",
        "ORDERS.db.test",
        "--upstream",
        "127.0.0.1:5432",
        "--confirm",
        "billing",
    ]);
    assert_ne!(out.code, Some(0), "{out:?}");
    assert!(
        out.stderr
            .contains("is already a server name of database \"orders\" on the shared listener"),
        "{}",
        out.stderr
    );
    let out = env.run(&[
        "mtls",
        "create",
        "billing",
        "--listen",
        "shared",
        "--upstream",
        "127.0.0.1:5432",
        "--confirm",
        "billing",
    ]);
    assert_ne!(out.code, Some(0), "{out:?}");
    assert!(
        out.stderr.contains("--listen shared needs --server-name"),
        "{}",
        out.stderr
    );
    // Any number of databases share the listener itself.
    create(
        &env,
        "billing",
        "shared",
        BILLING,
        "127.0.0.1:5432".parse().unwrap(),
    );
}
