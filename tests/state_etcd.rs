//! `pgmtls state import` / `state export` with the real binary against a real etcd: a round
//! trip directory -> etcd -> directory gives the same bytes and modes, secrets sit under
//! their own prefix, a non-empty prefix is refused without `--force`, and bad content in etcd
//! is named by its key and field when loaded.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cli_support;
mod common;

use std::path::PathBuf;

use cli_support::{free_listen, mode, Env};
use common::etcd::{etcd_available_or_skip, EtcdServer};

fn etcd_args(etcd: &EtcdServer) -> Vec<String> {
    vec![
        "--etcd-endpoints".into(),
        etcd.endpoint(),
        "--etcd-prefix".into(),
        "/pgmtls".into(),
    ]
}

fn run(env: &Env, args: &[&str], etcd: &EtcdServer) -> cli_support::Out {
    let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    all.extend(etcd_args(etcd));
    let refs: Vec<&str> = all.iter().map(String::as_str).collect();
    env.run(&refs)
}

/// A state directory with two databases, rules, extra and revoked certificates.
fn populated() -> Env {
    let env = Env::new();
    for db in ["app", "reports"] {
        env.create_db(db, &free_listen(), "127.0.0.1:5432");
        env.run(&["ip-rules", "create", db, "--cidr", "127.0.0.2/32"])
            .ok();
    }
    let id = env.run(&["certificates", "create", "app", "--json"]).json()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    env.run(&["certificates", "revoke", "app", "--id", &id])
        .ok();
    env
}

type Files = std::collections::BTreeMap<PathBuf, (u32, Vec<u8>)>;

/// Every regular file under `root` with its mode and bytes (the writers' lock aside: it is
/// not state).
fn files(root: &std::path::Path) -> Files {
    fn walk(root: &std::path::Path, dir: &std::path::Path, out: &mut Files) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let meta = std::fs::symlink_metadata(&p).unwrap();
            if meta.is_dir() {
                walk(root, &p, out);
            } else if p.file_name().unwrap() != ".lock" {
                let rel = p.strip_prefix(root).unwrap().to_path_buf();
                out.insert(rel, (mode(&p), std::fs::read(&p).unwrap()));
            }
        }
    }
    let mut out = Files::new();
    walk(root, root, &mut out);
    out
}

#[test]
fn a_round_trip_through_etcd_is_byte_identical_and_keeps_key_modes() {
    if !etcd_available_or_skip() {
        return;
    }
    let etcd = EtcdServer::start();
    let env = populated();
    let before = files(&env.state);
    assert!(before.keys().any(|p| p.ends_with("client.key")));

    run(&env, &["state", "import"], &etcd).ok();

    // The keys the proxy never needs are only under the secrets prefix.
    let keys = etcd.etcdctl(&["get", "--prefix", "--keys-only", "/pgmtls/"]);
    let keys = String::from_utf8(keys.stdout).unwrap();
    let keys: Vec<&str> = keys.lines().filter(|l| !l.is_empty()).collect();
    for k in &keys {
        if k.ends_with("/ca.key") || k.ends_with("/client.key") {
            assert!(k.starts_with("/pgmtls/secrets/databases/"), "{k}");
        }
    }
    assert!(
        keys.contains(&"/pgmtls/databases/app/server.key"),
        "{keys:?}"
    );
    assert!(
        keys.contains(&"/pgmtls/secrets/databases/app/ca.key"),
        "{keys:?}"
    );
    assert!(
        keys.iter().any(|k| k.starts_with("/pgmtls/audit/")),
        "{keys:?}"
    );

    let back = Env::new();
    run(
        &back,
        &["state", "export", "--to", back.state.to_str().unwrap()],
        &etcd,
    )
    .ok();
    let after = files(&back.state);
    assert_eq!(
        after.keys().collect::<Vec<_>>(),
        before.keys().collect::<Vec<_>>()
    );
    assert_eq!(after, before);
    for (p, (m, _)) in &after {
        if p.extension().is_some_and(|e| e == "key") {
            assert_eq!(*m, 0o600, "{}", p.display());
        }
    }
    assert_eq!(mode(&back.db_dir("app")), 0o700);
    // And the exported directory is one the CLI and the proxy read.
    assert!(back.run(&["ip-rules", "app"]).ok().contains("127.0.0.2/32"));
}

#[test]
fn import_refuses_a_non_empty_prefix_without_force_and_replaces_it_with() {
    if !etcd_available_or_skip() {
        return;
    }
    let etcd = EtcdServer::start();
    let env = Env::new();
    env.create_db("app", &free_listen(), "127.0.0.1:5432");
    run(&env, &["state", "import"], &etcd).ok();

    let other = Env::new();
    other.create_db("billing", &free_listen(), "127.0.0.1:5432");
    let e = run(&other, &["state", "import"], &etcd);
    let line = e.error();
    assert!(line.contains("already holds"), "{line}");
    assert!(line.contains("--force"), "{line}");
    let still = etcd.etcdctl(&["get", "--prefix", "--keys-only", "/pgmtls/databases/"]);
    let still = String::from_utf8(still.stdout).unwrap();
    assert!(still.contains("/pgmtls/databases/app/"), "{still}");
    assert!(!still.contains("billing"), "{still}");

    run(&other, &["state", "import", "--force"], &etcd).ok();
    let now = etcd.etcdctl(&["get", "--prefix", "--keys-only", "/pgmtls/"]);
    let now = String::from_utf8(now.stdout).unwrap();
    assert!(now.contains("/pgmtls/databases/billing/"), "{now}");
    assert!(
        !now.contains("/databases/app/"),
        "records not in the imported directory are gone: {now}"
    );
}

#[test]
fn export_refuses_keys_outside_the_layout_and_writes_nothing() {
    if !etcd_available_or_skip() {
        return;
    }
    let etcd = EtcdServer::start();
    let env = Env::new();
    env.create_db("app", &free_listen(), "127.0.0.1:5432");
    run(&env, &["state", "import"], &etcd).ok();
    let out = etcd.etcdctl(&["put", "/pgmtls/databases/../../escape", "x"]);
    assert!(out.status.success());
    let back = Env::new();
    let e = run(
        &back,
        &["state", "export", "--to", back.state.to_str().unwrap()],
        &etcd,
    );
    let line = e.error();
    assert!(
        line.contains("etcd:/pgmtls/databases/../../escape: not a key of the state layout"),
        "{line}"
    );
    assert!(!back.state.exists());
    assert!(!back.dir.path().join("escape").exists());
}

#[tokio::test]
async fn bad_content_in_etcd_is_named_by_key_and_field() {
    if !etcd_available_or_skip() {
        return;
    }
    let etcd = EtcdServer::start();
    let env = Env::new();
    env.create_db("app", &free_listen(), "127.0.0.1:5432");
    run(&env, &["state", "import"], &etcd).ok();
    let out = etcd.etcdctl(&[
        "put",
        "/pgmtls/databases/app/ip-rules.yaml",
        "rules:\n- id: a\n  cidr: 10.0.0.1/8\n  created_at: 2026-01-01T00:00:00Z\n  updated_at: 2026-01-01T00:00:00Z\n",
    ]);
    assert!(out.status.success());
    let store = pgmtls::store::etcd::EtcdStore::connect(pgmtls::store::etcd::EtcdConfig::new(
        vec![etcd.endpoint()],
        "/pgmtls",
    ))
    .await
    .unwrap();
    let listing = store.load().await.unwrap();
    let loaded = pgmtls::state::load_each_from_records("/pgmtls", &listing.records);
    assert_eq!(loaded.len(), 1);
    let e = loaded[0].1.as_ref().unwrap_err().to_string();
    assert_eq!(
        e,
        "etcd:/pgmtls/databases/app/ip-rules.yaml:2: rules[0].cidr: 10.0.0.1/8 has host bits set; \
         did you mean 10.0.0.0/8?"
    );
}
