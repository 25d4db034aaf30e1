//! TLS to etcd: a real etcd serving `https://` with `--client-cert-auth`. A replica with the
//! right client certificate serves a real client, and the CLI (`pgmtls fleet`, a rule
//! deleted with `pgmtls ip-rules delete`) works over the same TLS; a replica without a client
//! certificate, with one of another CA, or trusting another server CA cannot load and says
//! which endpoint it could not reach.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::admin::status;
use common::clients::session_from;
use common::etcd::{etcd_available_or_skip, EtcdServer, EtcdTlsFiles};
use common::pg::{pg_available_or_skip, PgServer};
use common::pki::TestPki;
use common::proxy::ProxyProcess;
use common::state::TestState;

const BIN: &str = env!("CARGO_BIN_EXE_pgmtls");
const WAIT: Duration = Duration::from_secs(20);

/// etcd's server certificate and the CA it trusts for clients, both from `pki`.
fn etcd_tls(pki: &TestPki) -> EtcdServer {
    EtcdServer::start_tls(&EtcdTlsFiles {
        cert: pki.server.chain_path.clone(),
        key: pki.server.key_path.clone(),
        client_ca: pki.ca.cert_path.clone(),
    })
}

/// A replica config for `etcd` with the given `etcd:` TLS lines.
fn config(dir: &Path, name: &str, etcd: &EtcdServer, tls: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(
        &path,
        format!(
            "etcd:\n  endpoints: [{}]\n  prefix: /pgmtls\n{tls}\
             admin_listen: 127.0.0.1:0\nreload_poll_interval: 1h\n",
            etcd.endpoint()
        ),
    )
    .unwrap();
    path
}

fn tls_lines(ca: &Path, client: Option<(&Path, &Path)>) -> String {
    let mut s = format!("  ca_file: {}\n", ca.display());
    if let Some((c, k)) = client {
        s.push_str(&format!(
            "  cert_file: {}\n  key_file: {}\n",
            c.display(),
            k.display()
        ));
    }
    s
}

/// Imports one database `orders` (rules r2: 127.0.0.2, r3: 127.0.0.3) over TLS.
fn import(etcd: &EtcdServer, etcd_pki: &TestPki, pki: &TestPki, pg: &PgServer) -> TestState {
    let state = TestState::new("");
    state.add_database(
        "orders",
        pki,
        "127.0.0.1:0",
        pg.addr(),
        &[("r2", "127.0.0.2/32"), ("r3", "127.0.0.3/32")],
    );
    let out = Command::new(BIN)
        .args(["state", "import", "--state-dir"])
        .arg(&state.root)
        .args([
            "--etcd-endpoints",
            &etcd.endpoint(),
            "--etcd-prefix",
            "/pgmtls",
            "--etcd-ca-file",
        ])
        .arg(&etcd_pki.ca.cert_path)
        .arg("--etcd-cert-file")
        .arg(&etcd_pki.client.chain_path)
        .arg("--etcd-key-file")
        .arg(&etcd_pki.client.key_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "state import over TLS: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    state
}

/// `pgmtls serve --config FILE` that must fail: its stderr.
fn serve_fails(config: &Path) -> String {
    let out = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(config)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "served: {stderr}");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("pgmtls: ready"),
        "{stderr}"
    );
    stderr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_with_a_client_certificate_serves_from_a_tls_etcd_and_the_cli_works_over_tls() {
    if !pg_available_or_skip() || !etcd_available_or_skip() {
        return;
    }
    let pg = PgServer::start();
    let etcd_pki = TestPki::new();
    let etcd = etcd_tls(&etcd_pki);
    assert!(etcd.endpoint().starts_with("https://"));
    let pki = TestPki::new();
    let state = import(&etcd, &etcd_pki, &pki, &pg);
    let tls = tls_lines(
        &etcd_pki.ca.cert_path,
        Some((&etcd_pki.client.chain_path, &etcd_pki.client.key_path)),
    );
    let cfg = config(state.dir(), "replica.yaml", &etcd, &tls);
    let proxy = ProxyProcess::with_config(&cfg);
    let st = status(proxy.admin()).await;
    assert_eq!(st["source"]["kind"], "etcd", "{st:#}");
    assert!(st["source"]["stale_since"].is_null(), "{st:#}");
    let (a, a_conn) = session_from("127.0.0.2", &pki, &pki.client, &proxy)
        .await
        .unwrap();
    let one: i32 = a.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);

    // `pgmtls fleet` reads the registry over the same TLS.
    proxy.wait_for_log(WAIT, |v| {
        v["message"] == "registered in the replica registry"
    });
    let out = Command::new(BIN)
        .args(["fleet", "--json", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pgmtls fleet: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fleet: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(fleet["replicas"].as_array().unwrap().len(), 1, "{fleet:#}");

    // A rule deleted with the CLI over TLS reaches the replica and closes its session.
    let out = Command::new(BIN)
        .args(["ip-rules", "delete", "orders", "--id", "r2"])
        .env_remove("PGMTLS_STATE_DIR")
        .env("PGMTLS_CONFIG", &cfg)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ip-rules delete over TLS: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = proxy.wait_for_log(WAIT, |v| {
        v["message"] == "configuration reloaded" && v["generation"] == 2
    });
    assert_eq!(line["sessions_closed"], 1, "{line}");
    tokio::time::timeout(Duration::from_secs(5), a_conn)
        .await
        .expect("the session of the deleted rule is still open")
        .unwrap()
        .ok();
    assert!(session_from("127.0.0.2", &pki, &pki.client, &proxy)
        .await
        .is_err());
    let (b, _b_conn) = session_from("127.0.0.3", &pki, &pki.client, &proxy)
        .await
        .unwrap();
    let one: i32 = b.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_right_client_certificate_or_server_ca_a_replica_cannot_load() {
    if !pg_available_or_skip() || !etcd_available_or_skip() {
        return;
    }
    let pg = PgServer::start();
    let etcd_pki = TestPki::new();
    let etcd = etcd_tls(&etcd_pki);
    let pki = TestPki::new();
    let state = import(&etcd, &etcd_pki, &pki, &pg);
    let endpoint = etcd.endpoint();
    // (what, the config's TLS lines, what the error must also say)
    let cases = [
        (
            "no client certificate",
            tls_lines(&etcd_pki.ca.cert_path, None),
            "etcd.cert_file",
        ),
        (
            "a client certificate of another CA",
            tls_lines(
                &etcd_pki.ca.cert_path,
                Some((
                    &etcd_pki.other_ca_client.chain_path,
                    &etcd_pki.other_ca_client.key_path,
                )),
            ),
            "etcd.cert_file",
        ),
        (
            "another CA as etcd's server CA",
            tls_lines(
                &etcd_pki.other_ca.cert_path,
                Some((&etcd_pki.client.chain_path, &etcd_pki.client.key_path)),
            ),
            "UnknownIssuer",
        ),
    ];
    for (i, (what, tls, hint)) in cases.iter().enumerate() {
        let cfg = config(state.dir(), &format!("bad{i}.yaml"), &etcd, tls);
        let err = serve_fails(&cfg);
        assert!(
            err.contains("cannot load the state from etcd")
                && err.contains(&endpoint)
                && err.contains(hint),
            "{what}: {err}"
        );
    }

    // Files that are missing or are not what the key says are errors of the config file,
    // naming the key and the file, before any connection.
    let missing = state.dir().join("nowhere.pem");
    let bad = config(
        state.dir(),
        "missing.yaml",
        &etcd,
        &tls_lines(
            &etcd_pki.ca.cert_path,
            Some((&missing, &etcd_pki.client.key_path)),
        ),
    );
    let err = serve_fails(&bad);
    assert!(
        err.contains("etcd.cert_file:")
            && err.contains(&missing.display().to_string())
            && err.contains("cannot read"),
        "{err}"
    );
    let swapped = config(
        state.dir(),
        "swapped.yaml",
        &etcd,
        &tls_lines(
            &etcd_pki.ca.cert_path,
            Some((&etcd_pki.client.chain_path, &etcd_pki.client.chain_path)),
        ),
    );
    let err = serve_fails(&swapped);
    assert!(
        err.contains("etcd.key_file:") && err.contains("not a PEM private key"),
        "{err}"
    );
    // The CLI names the same key and file.
    let out = Command::new(BIN)
        .args(["fleet", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("etcd.cert_file:"), "{err}");
}
