//! The replica registry with real etcd and real replicas: two replicas register, and
//! `pgmtls fleet` lists both with the revision each serves, following a change; a replica that
//! drains (SIGTERM) leaves the list at once, one that is killed leaves within its lease TTL.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::admin::status;
use common::etcd::{etcd_available_or_skip, EtcdServer};
use common::pg::{pg_available_or_skip, PgServer};
use common::pki::TestPki;
use common::proxy::ProxyProcess;
use common::state::{rules_yaml, TestState};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_pgmtls");
const WAIT: Duration = Duration::from_secs(20);

fn replica_config(dir: &Path, name: &str, etcd: &EtcdServer, ttl: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(
        &path,
        format!(
            "etcd:\n  endpoints: [{}]\n  prefix: /pgmtls\n  registry_ttl: {ttl}\n\
             admin_listen: 127.0.0.1:0\nreload_poll_interval: 1h\n",
            etcd.endpoint()
        ),
    )
    .unwrap();
    path
}

fn fleet(config: &Path, json: bool) -> String {
    let mut c = Command::new(BIN);
    c.args(["fleet", "--config"]).arg(config);
    if json {
        c.arg("--json");
    }
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "pgmtls fleet: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `pgmtls fleet --json`'s replicas, by id.
fn replicas(config: &Path) -> Vec<Value> {
    let v: Value = serde_json::from_str(&fleet(config, true)).unwrap();
    v["replicas"].as_array().unwrap().clone()
}

fn ids(list: &[Value]) -> Vec<String> {
    let mut ids: Vec<String> = list
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids
}

/// Asks `pgmtls fleet` until `done` holds (the registry has no push signal to a client).
fn wait_fleet(config: &Path, what: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + WAIT;
    loop {
        let list = replicas(config);
        if done(&list) {
            return list;
        }
        assert!(
            Instant::now() < deadline,
            "{what}; the fleet says {list:#?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn registered_id(p: &ProxyProcess) -> String {
    let line = p.wait_for_log(WAIT, |v| {
        v["message"] == "registered in the replica registry"
    });
    line["replica"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_register_serve_revisions_and_leave_on_drain_and_on_death() {
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

    // The directory-mode config: no fleet to list.
    let out = Command::new(BIN)
        .args(["fleet", "--config"])
        .arg(&state.config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("needs an etcd: section"), "{err}");

    // A drains: a long TTL, so that only the revoke can make it leave quickly. B dies: 2 s.
    let config_a = replica_config(state.dir(), "a.yaml", &etcd, "60s");
    let config_b = replica_config(state.dir(), "b.yaml", &etcd, "2s");
    let mut a = ProxyProcess::with_config(&config_a);
    let mut b = ProxyProcess::with_config(&config_b);
    let (id_a, id_b) = (registered_id(&a), registered_id(&b));
    assert_ne!(id_a, id_b);
    // Each serves the revision it loaded at (B started after A registered: a later one).
    let revision_of = |st: &Value| st["source"]["revision"].as_i64().unwrap();
    let rev_a = revision_of(&status(a.admin()).await);
    let rev_b = revision_of(&status(b.admin()).await);

    let list = wait_fleet(&config_a, "both replicas listed", |l| l.len() == 2);
    let mut want = vec![id_a.clone(), id_b.clone()];
    want.sort();
    assert_eq!(ids(&list), want);
    for r in &list {
        let own = if r["id"] == id_a.as_str() {
            rev_a
        } else {
            rev_b
        };
        assert_eq!(r["revision"], own, "{r}");
        assert_eq!(r["version"], env!("CARGO_PKG_VERSION"), "{r}");
        assert!(r["peer_addr"].is_null(), "{r}");
        assert!(r["started_at"].is_string(), "{r}");
    }
    let table = fleet(&config_a, false);
    assert!(table.starts_with("ID "), "{table}");
    assert!(table.contains(&id_a) && table.contains(&id_b), "{table}");

    // A change: each replica reports the revision it now serves.
    let put = etcd.etcdctl(&[
        "put",
        "/pgmtls/databases/orders/ip-rules.yaml",
        &rules_yaml(&[("r3", "127.0.0.3/32")]),
    ]);
    assert!(put.status.success());
    a.wait_for_log(WAIT, |v| {
        v["message"] == "configuration reloaded" && v["generation"] == 2
    });
    let served = status(a.admin()).await["source"]["revision"]
        .as_i64()
        .unwrap();
    assert!(served > rev_a.max(rev_b));
    wait_fleet(&config_a, "both replicas at the new revision", |l| {
        l.len() == 2 && l.iter().all(|r| r["revision"] == served)
    });

    // SIGTERM: A is gone as soon as it says it left, long before its 60 s lease would end.
    let signalled = Instant::now();
    a.signal("TERM");
    a.wait_for_log(WAIT, |v| v["message"] == "left the replica registry");
    let list = replicas(&config_a);
    assert_eq!(ids(&list), vec![id_b.clone()], "{list:#?}");
    assert!(signalled.elapsed() < Duration::from_secs(10));
    a.wait_exit(WAIT);

    // SIGKILL: B cannot say goodbye; its entry expires with the lease, within the TTL.
    b.signal("KILL");
    b.wait_exit(WAIT);
    let killed = Instant::now();
    wait_fleet(&config_b, "the killed replica gone", |l| l.is_empty());
    let gone = killed.elapsed();
    eprintln!("killed replica left the fleet {gone:?} after SIGKILL (registry_ttl 2s)");
    // The TTL plus etcd's expiry check (every 500 ms) and a round of `pgmtls fleet`, with
    // room for a loaded machine: a lease that never expired would never get here at all,
    // one kept alive past its TTL would take a multiple of it.
    assert!(gone < Duration::from_secs(6), "{gone:?}");
    let text = fleet(&config_b, false);
    assert!(text.contains("No replica is registered"), "{text}");
}
