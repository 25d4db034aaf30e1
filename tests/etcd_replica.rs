//! A proxy replica serving from etcd, end to end: real etcd, real Postgres, the real `pgmtls`
//! binary. The state is moved in with `pgmtls state import`; a rule deleted in etcd closes
//! the live session it admitted; bad content keeps the last good state and is named in
//! `/status` by key and field; with etcd down the proxy keeps serving and says it is stale;
//! when etcd is back it catches up; a database created, renewed and destroyed with the CLI
//! on etcd is served, keeps serving, and has its sessions closed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::admin::{scrape, status, wait_status};
use common::clients::session_from;
use common::etcd::{etcd_available_or_skip, EtcdServer};
use common::pg::{pg_available_or_skip, PgServer};
use common::pki::TestPki;
use common::proxy::ProxyProcess;
use common::state::{rules_yaml, TestState};
use serde_json::Value;
use tokio_postgres::Client;

const WAIT: Duration = Duration::from_secs(20);
const BIN: &str = env!("CARGO_BIN_EXE_pgmtls");
const KEY: &str = "/pgmtls/databases/orders/ip-rules.yaml";

async fn one(c: &Client) -> i32 {
    c.query_one("SELECT 1", &[]).await.unwrap().get(0)
}

fn reloaded(generation: u64) -> impl Fn(&Value) -> bool {
    move |v| v["message"] == "configuration reloaded" && v["generation"] == generation
}

fn put(etcd: &EtcdServer, key: &str, value: &str) {
    let out = etcd.etcdctl(&["put", key, value]);
    assert!(
        out.status.success(),
        "etcdctl put: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_follows_etcd_enforces_live_and_survives_an_outage() {
    if !pg_available_or_skip() || !etcd_available_or_skip() {
        return;
    }
    let pg = PgServer::start();
    let mut etcd = EtcdServer::start();
    let pki = TestPki::new();
    let state = TestState::new("");
    state.add_database(
        "orders",
        &pki,
        "127.0.0.1:0",
        pg.addr(),
        &[("r2", "127.0.0.2/32"), ("r3", "127.0.0.3/32")],
    );
    etcd.import_state(&state.root, "/pgmtls");
    // The replica's config names etcd only: the directory is not read.
    let config = state.dir().join("replica.yaml");
    std::fs::write(
        &config,
        format!(
            "etcd:\n  endpoints: [{}]\n  prefix: /pgmtls\nadmin_listen: 127.0.0.1:0\n\
             reload_poll_interval: 1h\n",
            etcd.endpoint()
        ),
    )
    .unwrap();
    std::fs::remove_dir_all(&state.root).unwrap();
    let proxy = ProxyProcess::with_config(&config);
    let st = status(proxy.admin()).await;
    assert_eq!(st["source"]["kind"], "etcd", "{st:#}");
    assert!(st["source"]["stale_since"].is_null(), "{st:#}");

    let (a, a_conn) = session_from("127.0.0.2", &pki, &pki.client, &proxy)
        .await
        .unwrap();
    let (b, _b_conn) = session_from("127.0.0.3", &pki, &pki.client, &proxy)
        .await
        .unwrap();
    assert_eq!(one(&a).await, 1);
    assert_eq!(one(&b).await, 1);

    // A rule deleted in etcd closes the session it admitted, within a second of the reload.
    let written = Instant::now();
    put(&etcd, KEY, &rules_yaml(&[("r3", "127.0.0.3/32")]));
    let line = proxy.wait_for_log(WAIT, reloaded(2));
    assert_eq!(line["sessions_closed"], 1, "{line}");
    tokio::time::timeout(Duration::from_secs(1), a_conn)
        .await
        .expect("session of the deleted rule still open a second after the reload")
        .unwrap()
        .ok();
    eprintln!(
        "rule deleted in etcd: applied {:?} after the put",
        written.elapsed()
    );
    let closed = proxy.wait_for_refusal("revoked_live");
    assert_eq!(closed["rule_id"], "r2");
    assert!(session_from("127.0.0.2", &pki, &pki.client, &proxy)
        .await
        .is_err());
    assert_eq!(one(&b).await, 1);

    // Bad content: refused with key and field, the last good state keeps serving.
    put(
        &etcd,
        KEY,
        "rules:\n- id: r3\n  cidr: 127.0.0.3/8\n  created_at: 2026-01-01T00:00:00Z\n  \
         updated_at: 2026-01-01T00:00:00Z\n",
    );
    let st = wait_status(proxy.admin(), WAIT, |s| {
        !s["databases"]["orders"]["reload_error"].is_null()
    })
    .await;
    let err = st["databases"]["orders"]["reload_error"].as_str().unwrap();
    assert!(
        err.contains(&format!(
            "etcd:{KEY}:2: rules[0].cidr: 127.0.0.3/8 has host bits set"
        )),
        "{err}"
    );
    assert_eq!(st["generation"], 2);
    assert_eq!(one(&b).await, 1);
    let (c, _c_conn) = session_from("127.0.0.3", &pki, &pki.client, &proxy)
        .await
        .unwrap();
    assert_eq!(one(&c).await, 1);
    let m = scrape(proxy.admin()).await;
    assert_eq!(
        m.value("pgmtls_database_change_rejected", r#"database="orders""#),
        1.0
    );
    let revision = st["source"]["revision"].as_i64().unwrap();
    assert_eq!(m.value("pgmtls_state_revision", ""), revision as f64);

    // etcd down: live and new allowed sessions go on, and the proxy says it is stale.
    etcd.stop();
    let st = wait_status(proxy.admin(), WAIT, |s| {
        !s["source"]["stale_since"].is_null()
    })
    .await;
    assert!(st["source"]["error"].is_string(), "{st:#}");
    assert_eq!(one(&b).await, 1);
    let (d, _d_conn) = session_from("127.0.0.3", &pki, &pki.client, &proxy)
        .await
        .unwrap();
    assert_eq!(one(&d).await, 1);
    // The gauge counts the outage in whole seconds: poll until it shows one.
    let deadline = Instant::now() + WAIT;
    while scrape(proxy.admin())
        .await
        .value("pgmtls_state_stale_seconds", "")
        < 1.0
    {
        assert!(
            Instant::now() < deadline,
            "pgmtls_state_stale_seconds never rose"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // etcd back with the same data, and a change made as it returns: the proxy catches up.
    etcd.restart();
    put(
        &etcd,
        KEY,
        &rules_yaml(&[("r2", "127.0.0.2/32"), ("r3", "127.0.0.3/32")]),
    );
    let st = wait_status(proxy.admin(), WAIT, |s| {
        s["source"]["stale_since"].is_null()
            && s["databases"]["orders"]["reload_error"].is_null()
            && s["generation"] == 3
    })
    .await;
    assert!(
        st["source"]["revision"].as_i64().unwrap() > revision,
        "{st:#}"
    );
    let (e, _e_conn) = session_from("127.0.0.2", &pki, &pki.client, &proxy)
        .await
        .unwrap();
    assert_eq!(one(&e).await, 1);
    assert_eq!(one(&b).await, 1);
    let m = scrape(proxy.admin()).await;
    assert_eq!(m.value("pgmtls_state_stale_seconds", ""), 0.0);
}

/// The operator's CLI writes the replica's etcd prefix: `certificates revoke` through an
/// `etcd:` pgmtls.yaml commits the CRL and the record in one transaction, and the replica,
/// following by watch, closes the session of that certificate within a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_made_with_the_cli_on_etcd_closes_the_live_session() {
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
    state.write_file("orders", "ca.key", pki.ca.key_pem.as_bytes(), 0o600);
    state.add_certificate_record("orders", "c1", &pki.client);
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
    let cli_config = state.dir().join("operator.yaml");
    std::fs::write(&cli_config, &etcd_section).unwrap();
    let proxy = ProxyProcess::with_config(&config);
    let (a, a_conn) = session_from("127.0.0.2", &pki, &pki.client, &proxy)
        .await
        .unwrap();
    assert_eq!(one(&a).await, 1);

    let out = std::process::Command::new(BIN)
        .args(["certificates", "revoke", "orders", "--id", "c1"])
        .env_remove("PGMTLS_STATE_DIR")
        .env("PGMTLS_CONFIG", &cli_config)
        .output()
        .unwrap();
    let committed = Instant::now();
    assert!(
        out.status.success(),
        "certificates revoke: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    tokio::time::timeout(Duration::from_secs(1), a_conn)
        .await
        .expect("session of the revoked certificate still open a second after the CLI commit")
        .unwrap()
        .ok();
    eprintln!(
        "revoked with the CLI on etcd: session closed {:?} after the command returned",
        committed.elapsed()
    );
    let closed = proxy.wait_for_refusal("revoked_live");
    assert_eq!(closed["database"], "orders", "{closed}");
    assert!(session_from("127.0.0.2", &pki, &pki.client, &proxy)
        .await
        .is_err());
}

/// `pgmtls ARGS` run as the operator against the etcd prefix that `config` names; panics
/// with its stderr when it fails, returns its stdout.
fn cli(config: &std::path::Path, args: &[&str]) -> String {
    let out = std::process::Command::new(BIN)
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

fn keys(etcd: &EtcdServer, under: &str) -> Vec<String> {
    let out = etcd.etcdctl(&["get", "--prefix", "--keys-only", under]);
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

/// A session of the test application through the proxy on `port`, with exactly the files
/// `certificates download` wrote into `dir` (prefix `app_`).
async fn session_with_download(
    dir: &std::path::Path,
    port: u16,
) -> Result<(Client, common::clients::ConnTask), tokio_postgres::Error> {
    use common::pg::{APP_DB, APP_PASSWORD, APP_USER};
    let tls = common::clients::tls_client_config(
        &dir.join("app_root.crt"),
        Some((
            &dir.join("app_postgresql.crt"),
            &dir.join("app_postgresql.key"),
        )),
        false,
    );
    common::clients::pg_connect_tls(
        "127.0.0.1",
        port,
        APP_USER,
        APP_DB,
        Some(APP_PASSWORD),
        tls,
        tokio_postgres::config::SslNegotiation::Postgres,
    )
    .await
}

/// A whole database's life made with the CLI on etcd while a replica follows the prefix:
/// `mtls create` (one transaction) makes the replica serve it and a client connects with the
/// downloaded files; `certificates renew` of more certificates than fit in one etcd
/// transaction renews each once while the session goes on; `mtls destroy` removes it (with
/// 30 more certificates than one transaction could delete key by key) and the replica closes
/// the live session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_created_renewed_and_destroyed_with_the_cli_on_etcd() {
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

    // Create: the replica starts serving the new database.
    let port = common::clients::free_port();
    let listen = format!("127.0.0.1:{port}");
    let created: Value = serde_json::from_str(&cli(
        &operator,
        &[
            "mtls",
            "create",
            "app",
            "--listen",
            &listen,
            "--upstream",
            &pg.addr().to_string(),
            "--confirm",
            "app",
            "--json",
        ],
    ))
    .unwrap();
    let first = created["certificate_id"].as_str().unwrap().to_owned();
    cli(
        &operator,
        &["ip-rules", "create", "app", "--cidr", "127.0.0.1/32"],
    );
    let st = wait_status(proxy.admin(), WAIT, |s| {
        s["databases"]["app"]["operational"] == true
            && s["databases"]["app"]["rules"].as_array().map(Vec::len) == Some(1)
    })
    .await;
    assert_eq!(st["databases"]["app"]["listen"], listen.as_str(), "{st:#}");
    let dir = state.dir().join("client");
    cli(
        &operator,
        &[
            "certificates",
            "download",
            "app",
            "--id",
            &first,
            "--prefix",
            "app_",
            "--dir",
            dir.to_str().unwrap(),
        ],
    );
    let (a, a_conn) = session_with_download(&dir, port).await.unwrap();
    assert_eq!(one(&a).await, 1);

    // Renew more certificates than one transaction holds: each once, the session goes on.
    for _ in 0..30 {
        cli(
            &operator,
            &["certificates", "create", "app", "--valid-for", "30d"],
        );
    }
    let audit_before = keys(&etcd, "/pgmtls/audit/").len();
    let report: Value =
        serde_json::from_str(&cli(&operator, &["certificates", "renew", "app", "--json"])).unwrap();
    let renewed = report["renewed"].as_array().unwrap();
    assert_eq!(renewed.len(), 30, "{report:#}");
    assert!(
        report["errors"].as_array().unwrap().is_empty(),
        "{report:#}"
    );
    let audit = keys(&etcd, "/pgmtls/audit/");
    assert_eq!(audit.len(), audit_before + 30, "one audit key per renewal");
    for key in &audit[audit_before..] {
        let out = etcd.etcdctl(&["get", "--print-value-only", key]);
        let entry: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(entry["action"], "certificate.renew", "{entry}");
    }
    // 1 + 30 + 30 successors, all served.
    let st = wait_status(proxy.admin(), WAIT, |s| {
        s["databases"]["app"]["certificates"]
            .as_array()
            .map(Vec::len)
            == Some(61)
    })
    .await;
    assert!(st["databases"]["app"]["reload_error"].is_null(), "{st:#}");
    assert_eq!(one(&a).await, 1);
    let (b, _b_conn) = session_with_download(&dir, port).await.unwrap();
    assert_eq!(one(&b).await, 1);
    let again: Value =
        serde_json::from_str(&cli(&operator, &["certificates", "renew", "app", "--json"])).unwrap();
    assert!(again["renewed"].as_array().unwrap().is_empty(), "{again:#}");
    assert_eq!(keys(&etcd, "/pgmtls/audit/").len(), audit_before + 30);

    // Destroy: 61 certificates' keys go in one transaction; the replica closes the session.
    let destroyed: Value = serde_json::from_str(&cli(
        &operator,
        &["mtls", "destroy", "app", "--confirm", "app", "--json"],
    ))
    .unwrap();
    tokio::time::timeout(Duration::from_secs(5), a_conn)
        .await
        .expect("session of the destroyed database still open")
        .unwrap()
        .ok();
    let closed = proxy.wait_for_refusal("revoked_live");
    assert_eq!(closed["database"], "app", "{closed}");
    assert_eq!(closed["detail"], "database disabled", "{closed}");
    proxy.wait_for_log(WAIT, |v| {
        v["message"] == "database disabled; listener closed" && v["database"] == "app"
    });
    assert!(keys(&etcd, "/pgmtls/databases/app/").is_empty());
    assert!(keys(&etcd, "/pgmtls/secrets/databases/app/").is_empty());
    let archived = keys(&etcd, "/pgmtls/secrets/archive/app/");
    assert_eq!(archived.len(), 1, "{archived:?}");
    assert_eq!(
        destroyed["archived_to"].as_str().unwrap(),
        format!("etcd:{}", archived[0]),
        "{destroyed}"
    );
    assert!(session_with_download(&dir, port).await.is_err());
    // The other database is untouched and still served.
    let st = status(proxy.admin()).await;
    assert!(st["databases"]["app"].is_null(), "{st:#}");
    assert_eq!(st["databases"]["orders"]["operational"], true, "{st:#}");
}
