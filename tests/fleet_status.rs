//! Status words in etcd mode, with three real replicas on a real etcd in front of a real
//! Postgres: `ip-rules DB` says `Authorized` only when every live replica serves the
//! revision of the rule's commit, and names the replica that lags (one frozen with SIGSTOP,
//! its lease still alive); a revocation and a rule deletion through the CLI close the
//! concerned live sessions on every replica and refuse new ones within a second of the CLI
//! returning, and the status words flip only once all three report the revision.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::clients::session_from;
use common::etcd::{etcd_available_or_skip, EtcdServer};
use common::pg::{pg_available_or_skip, PgServer};
use common::pki::{Role, TestPki};
use common::proxy::ProxyProcess;
use common::state::TestState;
use serde_json::Value;
use tokio_postgres::Client;

const BIN: &str = env!("CARGO_BIN_EXE_pgmtls");
const WAIT: Duration = Duration::from_secs(20);
const PREFIX: &str = "/pgmtls";

async fn one(c: &Client) -> i32 {
    c.query_one("SELECT 1", &[]).await.unwrap().get(0)
}

/// The CLI, on the etcd config; the admin URL names one replica, so that a CLI that asked
/// one proxy (instead of the registry) would read that one's word.
struct Cli {
    config: PathBuf,
    admin_url: String,
}

impl Cli {
    async fn run(&self, args: &[&str]) -> String {
        let mut c = std::process::Command::new(BIN);
        c.args(args)
            .env_remove("PGMTLS_STATE_DIR")
            .env("PGMTLS_CONFIG", &self.config)
            .env("PGMTLS_ADMIN_URL", &self.admin_url)
            .env("PGMTLS_ACTOR", "tester");
        let out = tokio::process::Command::from(c).output().await.unwrap();
        assert!(
            out.status.success(),
            "`pgmtls {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    async fn json(&self, args: &[&str]) -> Value {
        let text = self.run(args).await;
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
    }

    /// Revision served per replica id, from `pgmtls fleet --json`.
    async fn fleet(&self) -> Vec<(String, i64)> {
        let v = self.json(&["fleet", "--json"]).await;
        v["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["id"].as_str().unwrap().to_owned(),
                    r["revision"].as_i64().unwrap(),
                )
            })
            .collect()
    }

    async fn rule(&self, id: &str) -> Value {
        let list = self.json(&["ip-rules", "orders", "--json"]).await;
        list.as_array()
            .unwrap()
            .iter()
            .find(|r| r["id"] == id)
            .unwrap_or_else(|| panic!("rule {id} not listed: {list}"))
            .clone()
    }

    async fn certificate(&self, id: &str) -> Value {
        let list = self.json(&["certificates", "orders", "--json"]).await;
        list.as_array()
            .unwrap()
            .iter()
            .find(|c| c["id"] == id)
            .unwrap_or_else(|| panic!("certificate {id} not listed: {list}"))
            .clone()
    }
}

/// The replica ids of a `lagging` array.
fn lagging_ids(v: &Value) -> Vec<String> {
    v["lagging"]
        .as_array()
        .unwrap_or_else(|| panic!("no lagging array: {v}"))
        .iter()
        .map(|l| l["replica"].as_str().unwrap().to_owned())
        .collect()
}

/// The revision of the last audit key: the commit of the CLI change that just returned.
fn last_commit(etcd: &EtcdServer) -> i64 {
    let out = etcd.etcdctl(&[
        "get",
        "--prefix",
        &format!("{PREFIX}/audit/"),
        "--write-out=json",
    ]);
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["kvs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|kv| kv["mod_revision"].as_i64().unwrap())
        .max()
        .unwrap()
}

/// Polls a status read by `read` until `done` (the registry has no push signal to a
/// client), checking at every read that the word agrees with the registry around it: a
/// final word only when every replica serves `needs` (read after), and the final word
/// whenever every replica already did (read before).
async fn sandwich<F, Fut>(cli: &Cli, needs: i64, read: F, is_final: impl Fn(&Value) -> bool)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Value>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        let before = cli.fleet().await;
        let seen = read().await;
        let after = cli.fleet().await;
        assert_eq!(before.len(), 3, "{before:?}");
        let all_before = before.iter().all(|(_, r)| *r >= needs);
        let all_after = after.iter().all(|(_, r)| *r >= needs);
        if is_final(&seen) {
            assert!(
                all_after,
                "final word while a replica is behind {needs}: {seen} / {after:?}"
            );
            assert!(lagging_ids(&seen).is_empty(), "{seen}");
            return;
        }
        assert!(
            !all_before,
            "every replica served {needs} before the read, the word did not say so: {seen} / \
             {before:?}"
        );
        for l in seen["lagging"].as_array().unwrap() {
            assert_eq!(l["needs"], needs, "{seen}");
            assert!(l["revision"].as_i64().unwrap() < needs, "{seen}");
        }
        assert!(Instant::now() < deadline, "never final: {seen}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A certificate record (and its certificate) for `role` under id `id`, as `certificates
/// create` leaves it.
fn add_certificate(state: &TestState, id: &str, role: &Role) {
    state.add_certificate_record("orders", id, role);
    state.write_file(
        "orders",
        &format!("certificates/{id}/client.crt"),
        role.cert_pem.as_bytes(),
        0o644,
    );
}

fn replica_config(dir: &Path, n: usize, etcd: &EtcdServer) -> PathBuf {
    let path = dir.join(format!("replica{n}.yaml"));
    // A 10 s lease: a freeze of a few seconds does not drop the frozen replica from the list.
    std::fs::write(
        &path,
        format!(
            "etcd:\n  endpoints: [{}]\n  prefix: {PREFIX}\n  registry_ttl: 10s\n\
             admin_listen: 127.0.0.1:0\nreload_poll_interval: 1h\n",
            etcd.endpoint()
        ),
    )
    .unwrap();
    path
}

fn registered_id(p: &ProxyProcess) -> String {
    let line = p.wait_for_log(WAIT, |v| {
        v["message"] == "registered in the replica registry"
    });
    line["replica"].as_str().unwrap().to_owned()
}

/// Waits for a live session to be closed by the proxy, up to `deadline`.
async fn closed_by(conn: common::clients::ConnTask, deadline: Instant, what: &str) {
    let left = deadline.saturating_duration_since(Instant::now());
    tokio::time::timeout(left, conn)
        .await
        .unwrap_or_else(|_| panic!("{what}: still open a second after the CLI returned"))
        .unwrap()
        .ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_words_wait_for_every_live_replica_and_changes_reach_all_within_a_second() {
    if !pg_available_or_skip() || !etcd_available_or_skip() {
        return;
    }
    let pg = PgServer::start();
    let etcd = EtcdServer::start();
    let pki = TestPki::new();
    let bob = pki.issue_valid_client("bob");
    let carol = pki.issue_valid_client("carol");
    let state = TestState::new("");
    state.add_database(
        "orders",
        &pki,
        "127.0.0.1:0",
        pg.addr(),
        &[
            ("r2", "127.0.0.2/32"),
            ("r3", "127.0.0.3/32"),
            ("r4", "127.0.0.4/32"),
        ],
    );
    // The CA key lets `certificates revoke` sign the next CRL.
    state.write_file("orders", "ca.key", pki.ca.key_pem.as_bytes(), 0o600);
    add_certificate(&state, "c1", &pki.client);
    add_certificate(&state, "bob", &bob);
    add_certificate(&state, "carol", &carol);
    etcd.import_state(&state.root, PREFIX);

    let replicas: Vec<ProxyProcess> = (1..=3)
        .map(|n| ProxyProcess::with_config(&replica_config(state.dir(), n, &etcd)))
        .collect();
    let ids: Vec<String> = replicas.iter().map(registered_id).collect();
    let cli_config = state.dir().join("cli.yaml");
    std::fs::write(
        &cli_config,
        format!(
            "etcd:\n  endpoints: [{}]\n  prefix: {PREFIX}\n",
            etcd.endpoint()
        ),
    )
    .unwrap();
    let cli = Cli {
        config: cli_config,
        admin_url: format!("http://{}", replicas[0].admin()),
    };
    let deadline = Instant::now() + WAIT;
    while cli.fleet().await.len() < 3 {
        assert!(Instant::now() < deadline, "three replicas never listed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Imported state: every replica serves it.
    let r2 = cli.rule("r2").await;
    assert_eq!(r2["status"], "Authorized", "{r2}");
    let show = cli.json(&["mtls", "orders", "--json"]).await;
    assert_eq!(show["tls_status"], "Operational", "{show}");

    // A rule created through the CLI before the freeze: in force once all three apply it.
    let earlier = cli
        .json(&[
            "ip-rules",
            "create",
            "orders",
            "--cidr",
            "127.0.0.6/32",
            "--json",
        ])
        .await;
    let earlier_id = earlier["id"].as_str().unwrap().to_owned();
    let earlier_rev = last_commit(&etcd);
    sandwich(
        &cli,
        earlier_rev,
        || cli.rule(&earlier_id),
        |r| r["status"] == "Authorized",
    )
    .await;

    // One replica frozen (its lease outlives the freeze): a new rule is not in force on it.
    let frozen = &replicas[2];
    let frozen_id = &ids[2];
    frozen.signal("STOP");
    let created = cli
        .json(&[
            "ip-rules",
            "create",
            "orders",
            "--cidr",
            "127.0.0.5/32",
            "--json",
        ])
        .await;
    let rule_id = created["id"].as_str().unwrap().to_owned();
    let committed = last_commit(&etcd);
    assert_eq!(created["status"], "Authorizing", "{created}");
    // The two running replicas apply it (the registry says so); the word still waits for the
    // frozen one, and names it alone.
    let deadline = Instant::now() + WAIT;
    loop {
        let fleet = cli.fleet().await;
        let running = fleet.iter().filter(|(id, _)| id != frozen_id);
        if running.clone().count() == 2 && running.clone().all(|(_, r)| *r >= committed) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the running replicas never applied it: {fleet:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let waiting = cli.rule(&rule_id).await;
    assert_eq!(
        waiting["status"], "Authorizing",
        "Authorized while replica {frozen_id} is frozen before revision {committed}: {waiting}"
    );
    assert_eq!(lagging_ids(&waiting), vec![frozen_id.clone()], "{waiting}");
    assert_eq!(lagging_ids(&r2), Vec::<String>::new());
    // What the frozen replica already serves stays in force: the words compare with each
    // change's own commit (the earlier rule's audit key), not with the rules file's newest
    // revision. An imported rule has no commit of its own: the file's revision stands in.
    let earlier = cli.rule(&earlier_id).await;
    assert_eq!(earlier["status"], "Authorized", "{earlier}");
    let r2 = cli.rule("r2").await;
    assert_eq!(r2["status"], "Authorizing", "{r2}");
    let dbs = cli.json(&["databases", "--json"]).await;
    assert_eq!(dbs[0]["tls_status"], "Operational", "{dbs}");
    assert_eq!(lagging_ids(&dbs[0]), Vec::<String>::new());
    let lag = &waiting["lagging"][0];
    assert_eq!(lag["needs"], committed, "{waiting}");
    let text = cli.run(&["ip-rules", "orders"]).await;
    let expected = format!(
        "Authorizing (waiting for replica {frozen_id} at revision {} < {committed})",
        lag["revision"]
    );
    assert!(text.contains(&expected), "{expected:?} not in:\n{text}");
    eprintln!("with replica {frozen_id} frozen: {expected}");
    frozen.signal("CONT");
    sandwich(
        &cli,
        committed,
        || cli.rule(&rule_id),
        |r| r["status"] == "Authorized",
    )
    .await;
    let text = cli.run(&["ip-rules", "orders"]).await;
    assert!(!text.contains("Authorizing"), "{text}");

    // Live sessions on every replica: c1 from .2 (to be revoked), bob from .3 (rule r3 to be
    // deleted), carol from .4 (untouched).
    let mut revoked_sessions = Vec::new();
    let mut deleted_sessions = Vec::new();
    let mut kept = Vec::new();
    for p in &replicas {
        let (a, a_conn) = session_from("127.0.0.2", &pki, &pki.client, p)
            .await
            .unwrap();
        let (b, b_conn) = session_from("127.0.0.3", &pki, &bob, p).await.unwrap();
        let (c, c_conn) = session_from("127.0.0.4", &pki, &carol, p).await.unwrap();
        assert_eq!(one(&a).await + one(&b).await + one(&c).await, 3);
        revoked_sessions.push((a, a_conn));
        deleted_sessions.push((b, b_conn));
        kept.push((c, c_conn));
    }

    // Revocation: every replica closes c1's sessions and refuses c1 within a second.
    let revoked = cli
        .json(&["certificates", "revoke", "orders", "--id", "c1", "--json"])
        .await;
    let returned = Instant::now();
    let revoke_rev = last_commit(&etcd);
    assert_eq!(revoked["status"], "revoked", "{revoked}");
    assert!(revoked["lagging"].is_array(), "{revoked}");
    let within = returned + Duration::from_secs(1);
    for (i, (_client, conn)) in revoked_sessions.into_iter().enumerate() {
        closed_by(conn, within, &format!("c1's session on replica {}", ids[i])).await;
    }
    for p in &replicas {
        assert!(session_from("127.0.0.2", &pki, &pki.client, p)
            .await
            .is_err());
    }
    let took = returned.elapsed();
    eprintln!("revocation: sessions closed and c1 refused on all 3 replicas {took:?} after the CLI returned");
    assert!(took <= Duration::from_secs(1), "{took:?}");
    sandwich(
        &cli,
        revoke_rev,
        || cli.certificate("c1"),
        |c| c["served"] == false,
    )
    .await;
    let c1 = cli.certificate("c1").await;
    assert_eq!(c1["status"], "revoked", "{c1}");
    let text = cli.run(&["certificates", "orders"]).await;
    assert!(!text.contains("waiting for"), "{text}");

    // Deletion of r3: bob's sessions closed and bob refused from .3 on every replica.
    let deleted = cli
        .json(&["ip-rules", "delete", "orders", "--id", "r3", "--json"])
        .await;
    let returned = Instant::now();
    let delete_rev = last_commit(&etcd);
    assert_eq!(deleted["deleted"], true, "{deleted}");
    for l in deleted["lagging"].as_array().unwrap() {
        assert_eq!(l["needs"], delete_rev, "{deleted}");
        assert!(l["revision"].as_i64().unwrap() < delete_rev, "{deleted}");
    }
    let within = returned + Duration::from_secs(1);
    for (i, (_client, conn)) in deleted_sessions.into_iter().enumerate() {
        closed_by(
            conn,
            within,
            &format!("bob's session on replica {}", ids[i]),
        )
        .await;
    }
    for p in &replicas {
        assert!(session_from("127.0.0.3", &pki, &bob, p).await.is_err());
    }
    let took = returned.elapsed();
    eprintln!("rule deletion: sessions closed and .3 refused on all 3 replicas {took:?} after the CLI returned");
    assert!(took <= Duration::from_secs(1), "{took:?}");
    // The deletion's own word: the replicas still admitting the block, until none is.
    let deadline = Instant::now() + WAIT;
    loop {
        let fleet = cli.fleet().await;
        if fleet.iter().all(|(_, r)| *r >= delete_rev) {
            break;
        }
        assert!(Instant::now() < deadline, "{fleet:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (c, _conn) in &kept {
        assert_eq!(one(c).await, 1, "carol's sessions are untouched");
    }
    let r4 = cli.rule("r4").await;
    assert_eq!(r4["status"], "Authorized", "{r4}");
}
