//! The whole control loop with real processes: the CLI writes a state directory, `pgmtls
//! serve` loads it, the real `psql` connects with exactly the downloaded files, and revocation
//! and rule deletion refuse it after the proxy reloads.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cli_support;
mod common;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cli_support::Env;
use common::clients::{connect_from, pg_config, pg_connect_tls_over, tls_client_config, Psql};
use common::pg::{pg_available_or_skip, PgServer, APP_DB, APP_PASSWORD, APP_USER};
use common::proxy::ProxyProcess;
use common::wire::assert_generic_refusal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::config::SslMode;

/// The files `certificates download` wrote for one certificate.
struct Download {
    crt: PathBuf,
    key: PathBuf,
    root: PathBuf,
}

fn download(env: &Env, id: &str, prefix: &str) -> Download {
    let dir = env.dir.path().join("client");
    env.run(&[
        "certificates",
        "download",
        "app",
        "--id",
        id,
        "--prefix",
        prefix,
        "--dir",
        dir.to_str().unwrap(),
    ])
    .ok();
    Download {
        crt: dir.join(format!("{prefix}postgresql.crt")),
        key: dir.join(format!("{prefix}postgresql.key")),
        root: dir.join(format!("{prefix}root.crt")),
    }
}

/// psql with `sslmode=verify-ca` and nothing but the downloaded files.
fn psql(pg: &PgServer, proxy: &ProxyProcess, files: &Download) -> Psql {
    Psql::new(
        pg.psql_path(),
        "127.0.0.1",
        proxy.addrs["app"].port(),
        APP_USER,
        APP_DB,
    )
    .verify_ca(
        &files.root,
        Some((files.crt.as_path(), files.key.as_path())),
    )
    .password(APP_PASSWORD)
}

/// The newest configuration generation the proxy has logged (1 after start-up).
fn generation(proxy: &ProxyProcess) -> u64 {
    proxy
        .log_text()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == "configuration reloaded")
        .filter_map(|v| v["generation"].as_u64())
        .max()
        .unwrap_or(1)
}

/// Runs a CLI change, sends SIGHUP, and waits until the proxy has applied a configuration
/// newer than the one it had before the change (a file watch may get there first).
fn change_and_reload<T>(proxy: &ProxyProcess, change: impl FnOnce() -> T) -> T {
    let before = generation(proxy);
    let out = change();
    proxy.signal("HUP");
    proxy.wait_for_log(Duration::from_secs(20), |v| {
        v["message"] == "configuration reloaded" && v["generation"].as_u64() > Some(before)
    });
    out
}

fn config_file(env: &Env) -> PathBuf {
    let path = env.dir.path().join("pgmtls.yaml");
    std::fs::write(
        &path,
        format!(
            "state_dir: {}\nadmin_listen: \"off\"\nlog_format: json\n",
            env.state.display()
        ),
    )
    .unwrap();
    path
}

fn ssl_request() -> [u8; 8] {
    let mut r = [0u8; 8];
    r[..4].copy_from_slice(&8u32.to_be_bytes());
    r[4..].copy_from_slice(&80_877_103u32.to_be_bytes());
    r
}

/// Connects from `src` and returns whatever the proxy sent before closing.
async fn probe_from(src: &str, proxy: &ProxyProcess) -> Vec<u8> {
    let mut s = connect_from(src.parse::<IpAddr>().unwrap(), proxy.addrs["app"])
        .await
        .unwrap();
    let _ = s.write_all(&ssl_request()).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("a refused peer is closed");
    out
}

async fn select_from(src: &str, proxy: &ProxyProcess, files: &Download) -> i32 {
    let stream = connect_from(src.parse().unwrap(), proxy.addrs["app"])
        .await
        .unwrap();
    let mut cfg = pg_config(
        "127.0.0.1",
        proxy.addrs["app"].port(),
        APP_USER,
        APP_DB,
        Some(APP_PASSWORD),
    );
    cfg.ssl_mode(SslMode::Require);
    let tls = tls_client_config(&files.root, Some((&files.crt, &files.key)), false);
    let (c, _conn) = pg_connect_tls_over(stream, &cfg, tls).await.unwrap();
    c.query_one("SELECT 7", &[]).await.unwrap().get(0)
}

fn pk8_parses(path: &Path) {
    let der = std::fs::read(path).unwrap();
    rcgen::KeyPair::try_from(der.as_slice()).expect(".pk8 is PKCS-8 DER");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_managed_database_admits_psql_until_revoked_or_its_rule_is_deleted() {
    if !pg_available_or_skip() {
        return;
    }
    let pg = PgServer::start();
    let env = Env::new();
    env.create_db("app", "127.0.0.1:0", &pg.addr().to_string());
    // psql cannot choose its source address: it comes from 127.0.0.1. The 127.0.0.2 rule is
    // exercised with tokio-postgres bound to that address.
    env.run(&[
        "ip-rules",
        "create",
        "app",
        "--cidr",
        "127.0.0.1/32",
        "--description",
        "psql",
    ])
    .ok();
    env.run(&["ip-rules", "create", "app", "--cidr", "127.0.0.2/32"])
        .ok();
    let first = env.run(&["certificates", "app", "--json"]).json()[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let files = download(&env, &first, "demo_");
    pk8_parses(&env.dir.path().join("client/demo_postgresql.pk8"));

    let config = config_file(&env);
    let proxy = ProxyProcess::spawn(&["--config", config.to_str().unwrap()]);

    let out = psql(&pg, &proxy, &files)
        .run_async("SELECT 'through the proxy'")
        .await;
    assert_eq!(out.expect_ok(), "through the proxy");
    assert_eq!(select_from("127.0.0.2", &proxy, &files).await, 7);
    assert_generic_refusal(&probe_from("127.0.0.3", &proxy).await);
    proxy.wait_for_refusal("ip_not_allowed");

    // Revoked: the same psql, with the same files, is refused once the proxy reloads.
    change_and_reload(&proxy, || {
        env.run(&["certificates", "revoke", "app", "--id", &first])
            .ok();
    });
    let out = psql(&pg, &proxy, &files).run_async("SELECT 1").await;
    assert!(!out.success(), "a revoked certificate connected");
    proxy.wait_for_refusal("client_cert_revoked");

    // A new certificate works again...
    let second = change_and_reload(&proxy, || {
        env.run(&["certificates", "create", "app", "--json"]).json()["id"]
            .as_str()
            .unwrap()
            .to_owned()
    });
    let files2 = download(&env, &second, "second_");
    let out = psql(&pg, &proxy, &files2).run_async("SELECT 'again'").await;
    assert_eq!(out.expect_ok(), "again");

    // ...until the rule for its address is deleted.
    change_and_reload(&proxy, || {
        env.run(&["ip-rules", "delete", "app", "--cidr", "127.0.0.1/32"])
            .ok();
    });
    let out = psql(&pg, &proxy, &files2).run_async("SELECT 1").await;
    assert!(!out.success(), "a deleted rule still admitted psql");
    // The log is written off the data path: wait for the line rather than read it at once.
    proxy.wait_for_log(Duration::from_secs(10), |v| {
        v["error_kind"] == "ip_not_allowed"
            && v["client_addr"]
                .as_str()
                .is_some_and(|a| a.starts_with("127.0.0.1:"))
    });
    // 127.0.0.2 keeps its rule.
    assert_eq!(select_from("127.0.0.2", &proxy, &files2).await, 7);

    // Disabling mTLS closes the listener on the next reload.
    change_and_reload(&proxy, || {
        env.run(&["mtls", "destroy", "app", "--confirm", "app"])
            .ok();
    });
    proxy.wait_for_log(Duration::from_secs(10), |v| {
        v["message"] == "database disabled; listener closed"
    });
    let refused = tokio::net::TcpStream::connect(proxy.addrs["app"]).await;
    assert!(refused.is_err(), "listener still open after destroy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_words_follow_the_running_proxys_status_endpoint() {
    if !pg_available_or_skip() {
        return;
    }
    let pg = PgServer::start();
    let env = Env::new();
    env.create_db("app", "127.0.0.1:0", &pg.addr().to_string());
    let rule = env
        .run(&[
            "ip-rules",
            "create",
            "app",
            "--cidr",
            "127.0.0.1/32",
            "--json",
        ])
        .json();
    let config = env.dir.path().join("pgmtls.yaml");
    std::fs::write(
        &config,
        format!(
            "state_dir: {}\nadmin_listen: 127.0.0.1:0\nlog_format: json\n",
            env.state.display()
        ),
    )
    .unwrap();
    let proxy = ProxyProcess::spawn(&["--config", config.to_str().unwrap()]);
    let admin = proxy.admin().to_string();
    let url = format!("http://{admin}");
    let with = |args: &[&str]| {
        let mut a = args.to_vec();
        a.extend(["--admin-url", &url]);
        env.run(&a)
    };

    let text = with(&["mtls", "app"]).ok().to_owned();
    assert!(text.starts_with("TLS-status: Operational\n"), "{text}");
    let rules = with(&["ip-rules", "app", "--json"]).json();
    assert_eq!(rules[0]["id"], rule["id"]);
    assert_eq!(rules[0]["status"], "Authorized");
    let certs = with(&["certificates", "app", "--json"]).json();
    assert_eq!(certs[0]["status"], "ready", "{certs}");
    assert_eq!(certs[0]["served"], true);
    let id = certs[0]["id"].as_str().unwrap().to_owned();

    // A new rule is Authorized once the proxy has reloaded.
    let second = change_and_reload(&proxy, || {
        env.run(&[
            "ip-rules",
            "create",
            "app",
            "--cidr",
            "10.0.0.0/8",
            "--json",
        ])
        .json()
    });
    let got = with(&[
        "ip-rules",
        "get",
        "app",
        "--id",
        second["id"].as_str().unwrap(),
        "--json",
    ])
    .json();
    assert_eq!(got["status"], "Authorized");

    // Revoked, and the proxy agrees once it has reloaded.
    change_and_reload(&proxy, || {
        env.run(&["certificates", "revoke", "app", "--id", &id])
            .ok();
    });
    let got = with(&["certificates", "get", "app", "--id", &id, "--json"]).json();
    assert_eq!(got["status"], "revoked");
    assert_eq!(got["served"], false);

    // The same proxy, found through the config file's admin_listen.
    let listen = admin.clone();
    let cfg2 = env.dir.path().join("cli.yaml");
    std::fs::write(
        &cfg2,
        format!(
            "state_dir: {}\nadmin_listen: {listen}\n",
            env.state.display()
        ),
    )
    .unwrap();
    let dbs = env
        .run(&["databases", "--json", "--config", cfg2.to_str().unwrap()])
        .json();
    assert_eq!(dbs[0]["tls_status"], "Operational");

    // Disabled: the proxy no longer serves it.
    change_and_reload(&proxy, || {
        env.run(&["mtls", "destroy", "app", "--confirm", "app"])
            .ok();
    });
    let status = pgmtls::cli::status::fetch(&url.parse().unwrap(), Duration::from_secs(5))
        .await
        .unwrap();
    assert!(!status.databases.contains_key("app"), "{status:?}");
}

/// A database whose listen address is taken is not `Provisioning` for ever with a reload that
/// says ok: `/status` and the CLI name the bind error, and the next reload after the address
/// frees up binds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listen_address_in_use_is_reported_until_it_binds() {
    if !pg_available_or_skip() {
        return;
    }
    let pg = PgServer::start();
    let env = Env::new();
    env.create_db("app", "127.0.0.1:0", &pg.addr().to_string());
    let config = env.dir.path().join("pgmtls.yaml");
    std::fs::write(
        &config,
        format!(
            "state_dir: {}\nadmin_listen: 127.0.0.1:0\nlog_format: json\n",
            env.state.display()
        ),
    )
    .unwrap();
    let proxy = ProxyProcess::spawn(&["--config", config.to_str().unwrap()]);
    let url = format!("http://{}", proxy.admin());

    // Something else holds the port the new database asks for.
    let squatter = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = squatter.local_addr().unwrap().to_string();
    change_and_reload(&proxy, || {
        env.create_db("busy", &busy, &pg.addr().to_string());
    });
    let text = env
        .run(&["mtls", "busy", "--admin-url", &url])
        .ok()
        .to_owned();
    assert!(text.starts_with("TLS-status: Provisioning\n"), "{text}");
    assert!(
        text.contains(&format!("cannot listen on {busy}")),
        "the bind error is shown: {text}"
    );
    let status = common::admin::status(proxy.admin()).await;
    assert_eq!(status["last_reload"]["ok"], false, "{status}");
    assert!(status["databases"]["busy"]["reload_error"]
        .as_str()
        .unwrap()
        .contains("in use"));
    // The other database is untouched.
    assert_eq!(status["databases"]["app"]["operational"], true);

    // Freed, the address is bound by the next reload, and the error clears.
    drop(squatter);
    proxy.signal("HUP");
    proxy.wait_for_log(Duration::from_secs(20), |v| {
        v["message"] == "listening" && v["database"] == "busy"
    });
    let text = env
        .run(&["mtls", "busy", "--admin-url", &url])
        .ok()
        .to_owned();
    assert!(text.starts_with("TLS-status: Operational\n"), "{text}");
    let status = common::admin::status(proxy.admin()).await;
    assert_eq!(status["last_reload"]["ok"], true, "{status}");
}
