//! etcd RBAC as docs/etcd-roles.sh sets it up, against a real etcd with authentication on: the
//! operator imports the state; a replica running with the replica's credentials serves a real
//! client through real Postgres; with those credentials the CA and client keys under
//! `PREFIX/secrets/` (and the audit log) are "permission denied", to etcdctl and to pgmtls'
//! own store code alike, while `PREFIX/databases/` reads.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::clients::{app_session_over, connect_from};
use common::etcd::{etcd_available_or_skip, EtcdServer};
use common::pg::{pg_available_or_skip, PgServer};
use common::pki::TestPki;
use common::proxy::ProxyProcess;
use common::state::TestState;
use pgmtls::store::etcd::{EtcdConfig, EtcdStore};

const BIN: &str = env!("CARGO_BIN_EXE_pgmtls");
pub const ROOT_PW: &str = "root-pw-1";
pub const OPERATOR_PW: &str = "operator-pw-2";
pub const REPLICA_PW: &str = "replica-pw-3";

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/etcd-roles.sh")
}

/// Runs the shipped role script against `etcd`: users, roles, `auth enable`.
pub fn set_up_roles(etcd: &EtcdServer) {
    let out = Command::new("sh")
        .arg(script())
        .env("ETCDCTL_ENDPOINTS", etcd.endpoint())
        .env("PGMTLS_PREFIX", "/pgmtls")
        .env("ROOT_PW", ROOT_PW)
        .env("OPERATOR_PW", OPERATOR_PW)
        .env("REPLICA_PW", REPLICA_PW)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "docs/etcd-roles.sh: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn etcdctl_as(etcd: &EtcdServer, user: &str, args: &[&str]) -> Output {
    let mut all = vec![format!("--user={user}")];
    all.extend(args.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = all.iter().map(String::as_str).collect();
    etcd.etcdctl(&refs)
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

async fn store_as(etcd: &EtcdServer, user: &str, password: &str) -> EtcdStore {
    let mut c = EtcdConfig::new(vec![etcd.endpoint()], "/pgmtls");
    c.user = Some((user.into(), password.into()));
    EtcdStore::connect(c).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replicas_credentials_serve_but_cannot_read_the_secrets() {
    if !pg_available_or_skip() || !etcd_available_or_skip() {
        return;
    }
    let pg = PgServer::start();
    let etcd = EtcdServer::start();
    let pki = TestPki::new();
    set_up_roles(&etcd);

    let state = TestState::new("");
    state.add_database(
        "orders",
        &pki,
        "127.0.0.1:0",
        pg.addr(),
        &[("all", "127.0.0.0/8")],
    );
    state.write_file("orders", "ca.key", pki.ca.key_pem.as_bytes(), 0o600);
    let operator_pw = state.dir().join("operator.pw");
    std::fs::write(&operator_pw, OPERATOR_PW).unwrap();
    let replica_pw = state.dir().join("replica.pw");
    std::fs::write(&replica_pw, REPLICA_PW).unwrap();

    // Without credentials etcd refuses even the import.
    let import = |user: Option<&Path>| {
        let mut c = Command::new(BIN);
        c.args(["state", "import", "--state-dir"])
            .arg(&state.root)
            .args([
                "--etcd-endpoints",
                &etcd.endpoint(),
                "--etcd-prefix",
                "/pgmtls",
            ]);
        if let Some(pw) = user {
            c.args(["--etcd-user", "pgmtls-operator", "--etcd-password-file"])
                .arg(pw);
        }
        c.output().unwrap()
    };
    let anonymous = import(None);
    assert!(!anonymous.status.success(), "{}", text(&anonymous));
    let out = import(Some(&operator_pw));
    assert!(out.status.success(), "state import: {}", text(&out));

    // The operator sees the secret; the replica's credentials are refused it.
    let operator = format!("pgmtls-operator:{OPERATOR_PW}");
    let replica = format!("pgmtls-replica:{REPLICA_PW}");
    let secret = "/pgmtls/secrets/databases/orders/ca.key";
    let got = etcdctl_as(&etcd, &operator, &["get", secret, "--print-value-only"]);
    assert!(got.status.success(), "{}", text(&got));
    assert_eq!(
        String::from_utf8_lossy(&got.stdout).trim(),
        pki.ca.key_pem.trim()
    );
    for (key, prefix) in [
        (secret, false),
        ("/pgmtls/secrets/", true),
        ("/pgmtls/audit/", true),
        ("/pgmtls/", true),
    ] {
        let mut args = vec!["get", key];
        if prefix {
            args.push("--prefix");
        }
        let denied = etcdctl_as(&etcd, &replica, &args);
        assert!(!denied.status.success(), "{key}: {}", text(&denied));
        assert!(
            text(&denied).contains("permission denied"),
            "{key}: {}",
            text(&denied)
        );
    }
    let allowed = etcdctl_as(
        &etcd,
        &replica,
        &["get", "/pgmtls/databases/", "--prefix", "--keys-only"],
    );
    assert!(allowed.status.success(), "{}", text(&allowed));
    assert!(
        text(&allowed).contains("/pgmtls/databases/orders/server.key"),
        "{}",
        text(&allowed)
    );
    // Nor can the replica write the databases it serves.
    let write = etcdctl_as(
        &etcd,
        &replica,
        &["put", "/pgmtls/databases/orders/ip-rules.yaml", "rules: []"],
    );
    assert!(
        text(&write).contains("permission denied"),
        "{}",
        text(&write)
    );

    // pgmtls' own store code, with the replica's credentials.
    let s = store_as(&etcd, "pgmtls-replica", REPLICA_PW).await;
    for under in ["secrets/", "audit/", ""] {
        let err = s.load_under(under).await.unwrap_err().to_string();
        assert!(err.contains("permission denied"), "{under:?}: {err}");
    }
    let listing = s.load_under("databases/").await.unwrap();
    assert!(
        listing
            .records
            .contains_key("databases/orders/database.yaml"),
        "{:?}",
        listing.records.keys()
    );
    assert!(listing.records.keys().all(|k| !k.contains("ca.key")));
    let o = store_as(&etcd, "pgmtls-operator", OPERATOR_PW).await;
    let all = o.load().await.unwrap();
    assert!(all.records.contains_key("secrets/databases/orders/ca.key"));

    // A replica with those credentials starts and serves a real client through Postgres.
    let config = state.dir().join("replica.yaml");
    std::fs::write(
        &config,
        format!(
            "etcd:\n  endpoints: [{}]\n  prefix: /pgmtls\n  user: pgmtls-replica\n  \
             password_file: {}\nadmin_listen: 127.0.0.1:0\nreload_poll_interval: 1h\n",
            etcd.endpoint(),
            replica_pw.display()
        ),
    )
    .unwrap();
    let proxy = ProxyProcess::with_config(&config);
    let stream = connect_from("127.0.0.2".parse().unwrap(), proxy.addr())
        .await
        .unwrap();
    let (client, _conn) = app_session_over(stream, proxy.addr(), &pki, &pki.client)
        .await
        .unwrap();
    let one: i32 = client.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);

    // The one range it writes: its registry entry, listed by `pgmtls fleet` as the operator.
    let line = proxy.wait_for_log(std::time::Duration::from_secs(20), |v| {
        v["message"] == "registered in the replica registry"
    });
    let operator_config = state.dir().join("operator.yaml");
    std::fs::write(
        &operator_config,
        format!(
            "etcd:\n  endpoints: [{}]\n  prefix: /pgmtls\n  user: pgmtls-operator\n  \
             password_file: {}\n",
            etcd.endpoint(),
            operator_pw.display()
        ),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["fleet", "--json", "--config"])
        .arg(&operator_config)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["replicas"][0]["id"], line["replica"], "{v}");
    assert_eq!(
        proxy.count_logs(
            |v| v["message"] == "replica registry: cannot keep this replica's entry; retrying"
        ),
        0,
        "{}",
        proxy.log_text()
    );
}
