//! The control commands with an `etcd:` pgmtls.yaml, with the real binary against a real etcd:
//! each change lands in etcd as one transaction with its audit key, concurrent writers never
//! both win (the 60-rule limit holds under concurrent creates, one of two `mtls create` of a
//! name wins, two renews renew each certificate once), a destroy archives under `secrets/`
//! whatever the number of certificates, a renewal too large for one transaction is split,
//! and with etcd down a change fails naming the endpoint and changes nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cli_support;
mod common;

use std::path::PathBuf;
use std::process::Command;

use cli_support::{free_listen, Env};
use common::etcd::{etcd_available_or_skip, EtcdServer};
use serde_json::Value;

const PREFIX: &str = "/pgmtls";

/// A state directory with one database and one rule, imported into etcd, and a pgmtls.yaml
/// naming that etcd prefix.
struct Fleet {
    env: Env,
    etcd: EtcdServer,
    config: PathBuf,
}

impl Fleet {
    fn new(extra_rules: usize) -> Fleet {
        let etcd = EtcdServer::start();
        let env = Env::new();
        env.create_db("app", &free_listen(), "127.0.0.1:5432");
        env.run(&["ip-rules", "create", "app", "--cidr", "127.0.0.2/32"])
            .ok();
        for i in 0..extra_rules {
            let cidr = format!("10.1.{i}.0/24");
            env.run(&["ip-rules", "create", "app", "--cidr", &cidr])
                .ok();
        }
        env.run(&[
            "state",
            "import",
            "--etcd-endpoints",
            &etcd.endpoint(),
            "--etcd-prefix",
            PREFIX,
        ])
        .ok();
        let config = env.dir.path().join("pgmtls.yaml");
        std::fs::write(
            &config,
            format!(
                "etcd:\n  endpoints: [{}]\n  prefix: {PREFIX}\n",
                etcd.endpoint()
            ),
        )
        .unwrap();
        Fleet { env, etcd, config }
    }

    /// `pgmtls ARGS` with the etcd config and no state directory.
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = self.env.command(args);
        cmd.env_remove("PGMTLS_STATE_DIR")
            .env("PGMTLS_CONFIG", &self.config);
        cmd
    }

    fn run(&self, args: &[&str]) -> std::process::Output {
        self.command(args).output().unwrap()
    }

    #[track_caller]
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "`pgmtls {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn json(&self, args: &[&str]) -> Value {
        serde_json::from_str(&self.ok(args)).unwrap()
    }

    /// The value of `PREFIX/KEY` in etcd, read with etcdctl.
    fn get(&self, key: &str) -> Option<String> {
        let out = self
            .etcd
            .etcdctl(&["get", "--print-value-only", &format!("{PREFIX}/{key}")]);
        assert!(out.status.success(), "etcdctl get {key}");
        let text = String::from_utf8(out.stdout).unwrap();
        (!text.is_empty()).then_some(text)
    }

    /// Keys under `PREFIX/UNDER`, with etcdctl.
    fn keys(&self, under: &str) -> Vec<String> {
        let out = self.etcd.etcdctl(&[
            "get",
            "--prefix",
            "--keys-only",
            &format!("{PREFIX}/{under}"),
        ]);
        assert!(out.status.success(), "etcdctl get --prefix {under}");
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// The audit records in etcd, in order.
    fn audit(&self) -> Vec<Value> {
        self.keys("audit/")
            .iter()
            .map(|k| {
                let out = self.etcd.etcdctl(&["get", "--print-value-only", k]);
                serde_json::from_slice(&out.stdout).unwrap()
            })
            .collect()
    }

    fn rules(&self) -> String {
        self.get("databases/app/ip-rules.yaml").unwrap()
    }
}

#[test]
fn each_change_lands_in_etcd_with_one_audit_key_and_the_directory_is_untouched() {
    if !etcd_available_or_skip() {
        return;
    }
    let f = Fleet::new(0);
    let on_disk = f.env.snapshot();
    let audit_before = f.audit().len();

    let rule = f.json(&[
        "ip-rules",
        "create",
        "app",
        "--cidr",
        "127.0.0.9/32",
        "--json",
    ]);
    assert!(f.rules().contains("127.0.0.9/32"), "{}", f.rules());
    let listed = f.json(&["ip-rules", "app", "--json"]);
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["cidr"] == "127.0.0.9/32"),
        "the listing reads etcd: {listed}"
    );
    let audit = f.audit();
    assert_eq!(audit.len(), audit_before + 1);
    assert_eq!(audit.last().unwrap()["action"], "ip_rule.create");
    assert_eq!(audit.last().unwrap()["actor"], "tester");

    let cert = f.json(&["certificates", "create", "app", "--json"]);
    let id = cert["id"].as_str().unwrap().to_owned();
    let record = f
        .get(&format!("databases/app/certificates/{id}/certificate.yaml"))
        .expect("certificate record in etcd");
    assert!(record.contains(&id), "{record}");
    assert!(f
        .get(&format!("databases/app/certificates/{id}/client.crt"))
        .is_some());
    assert!(
        f.get(&format!("databases/app/certificates/{id}/client.key"))
            .is_none(),
        "the client key is a secret"
    );
    assert!(f
        .get(&format!(
            "secrets/databases/app/certificates/{id}/client.key"
        ))
        .unwrap()
        .contains("PRIVATE KEY"));
    let audit = f.audit();
    assert_eq!(audit.len(), audit_before + 2);
    assert_eq!(audit.last().unwrap()["action"], "certificate.create");
    let listed = f.json(&["certificates", "app", "--json"]);
    assert!(listed.to_string().contains(&id), "{listed}");

    let crl_before = f.get("databases/app/crl.pem").unwrap();
    f.ok(&["certificates", "revoke", "app", "--id", &id]);
    let record = f
        .get(&format!("databases/app/certificates/{id}/certificate.yaml"))
        .unwrap();
    assert!(record.contains("revoked_at"), "{record}");
    assert_ne!(f.get("databases/app/crl.pem").unwrap(), crl_before);
    let audit = f.audit();
    assert_eq!(audit.len(), audit_before + 3);
    assert_eq!(audit.last().unwrap()["action"], "certificate.revoke");

    let rule_id = rule["id"].as_str().unwrap();
    f.ok(&["ip-rules", "delete", "app", "--id", rule_id]);
    assert!(!f.rules().contains("127.0.0.9/32"), "{}", f.rules());
    let audit = f.audit();
    assert_eq!(audit.len(), audit_before + 4);
    assert_eq!(audit.last().unwrap()["action"], "ip_rule.delete");

    let dbs = f.json(&["databases", "--json"]);
    assert_eq!(dbs[0]["name"], "app");
    assert_eq!(dbs[0]["ip_rules"], 1, "{dbs}");
    // The directory the state was imported from is not the store any more.
    assert_eq!(f.env.snapshot(), on_disk);
}

#[test]
fn concurrent_creates_never_pass_the_sixty_rule_limit() {
    if !etcd_available_or_skip() {
        return;
    }
    // 1 + 57 = 58 rules.
    let f = Fleet::new(57);
    assert_eq!(f.rules().matches("cidr:").count(), 58);
    let audit_before = f.audit().len();
    let children: Vec<_> = (0..8)
        .map(|i| {
            let cidr = format!("10.9.{i}.0/24");
            let child = f
                .command(&["ip-rules", "create", "app", "--cidr", &cidr, "--json"])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            (cidr, child)
        })
        .collect();
    let mut won = Vec::new();
    for (cidr, child) in children {
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if out.status.success() {
            won.push(cidr);
        } else {
            assert!(
                stderr.contains("the maximum is 60") || stderr.contains("changed underneath"),
                "{cidr}: {stderr}"
            );
        }
    }
    assert_eq!(won.len(), 2, "exactly two creates fit: {won:?}");
    let rules = f.rules();
    assert_eq!(rules.matches("cidr:").count(), 60, "{rules}");
    for cidr in won.iter().map(String::as_str).chain(["127.0.0.2/32"]) {
        assert!(rules.contains(cidr), "{cidr} lost: {rules}");
    }
    for i in 0..57 {
        assert!(rules.contains(&format!("10.1.{i}.0/24")), "rule {i} lost");
    }
    let audit = f.audit();
    assert_eq!(audit.len(), audit_before + 2, "one audit key per success");
}

#[test]
fn with_etcd_stopped_a_change_fails_naming_the_endpoint_and_changes_nothing() {
    if !etcd_available_or_skip() {
        return;
    }
    let mut f = Fleet::new(0);
    let rules = f.rules();
    let keys = f.keys("");
    f.etcd.stop();
    let out = f.run(&["ip-rules", "create", "app", "--cidr", "127.0.0.7/32"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&f.etcd.endpoint()), "{stderr}");
    assert!(stderr.contains("nothing was changed"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    f.etcd.restart();
    assert_eq!(f.rules(), rules);
    assert_eq!(f.keys(""), keys);
}

#[test]
fn mtls_create_and_destroy_write_etcd_in_one_transaction_and_one_create_of_a_name_wins() {
    if !etcd_available_or_skip() {
        return;
    }
    let f = Fleet::new(0);
    let on_disk = f.env.snapshot();
    let audit_before = f.audit().len();
    let app_keys = f.keys("databases/app/");
    let listen = free_listen();
    let create = [
        "mtls",
        "create",
        "other",
        "--listen",
        &listen,
        "--upstream",
        "127.0.0.1:5432",
        "--confirm",
        "other",
        "--json",
    ];
    // Two creates of one name at once: exactly one wins, the other is told why.
    let children: Vec<_> = (0..2)
        .map(|_| {
            f.command(&create)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outs: Vec<_> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    let won: Vec<_> = outs.iter().filter(|o| o.status.success()).collect();
    assert_eq!(won.len(), 1, "exactly one create wins");
    let lost = outs.iter().find(|o| !o.status.success()).unwrap();
    let stderr = String::from_utf8_lossy(&lost.stderr);
    assert!(
        stderr.contains("mTLS is already enabled for database \"other\""),
        "{stderr}"
    );
    let created: Value = serde_json::from_slice(&won[0].stdout).unwrap();
    let first = created["certificate_id"].as_str().unwrap().to_owned();
    for rel in [
        "database.yaml",
        "ca.crt",
        "server.crt",
        "server.key",
        "crl.pem",
        "ip-rules.yaml",
    ] {
        assert!(f.get(&format!("databases/other/{rel}")).is_some(), "{rel}");
    }
    assert!(
        f.get("databases/other/ca.key").is_none(),
        "the CA key is a secret"
    );
    assert!(f
        .get("secrets/databases/other/ca.key")
        .unwrap()
        .contains("PRIVATE KEY"));
    assert!(f
        .get(&format!(
            "secrets/databases/other/certificates/{first}/client.key"
        ))
        .is_some());
    let audit = f.audit();
    assert_eq!(audit.len(), audit_before + 1, "one audit key");
    assert_eq!(audit.last().unwrap()["action"], "mtls.create");
    assert_eq!(audit.last().unwrap()["database"], "other");
    let dbs = f.json(&["databases", "--json"]);
    assert_eq!(dbs.as_array().unwrap().len(), 2, "{dbs}");
    // The address is taken now, as the etcd listing says.
    let out = f.run(&[
        "mtls",
        "create",
        "third",
        "--listen",
        &listen,
        "--upstream",
        "127.0.0.1:5432",
        "--confirm",
        "third",
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "--listen {listen} is already the listen address of database \"other\""
        )),
        "{stderr}"
    );

    // 40 certificates: deleting them key by key would take over 128 operations.
    for _ in 0..39 {
        f.ok(&["certificates", "create", "other"]);
    }
    assert_eq!(f.keys("secrets/databases/other/certificates/").len(), 40);
    let audit_before = f.audit().len();
    let destroyed = f.json(&["mtls", "destroy", "other", "--confirm", "other", "--json"]);
    assert!(f.keys("databases/other/").is_empty());
    assert!(f.keys("secrets/databases/other/").is_empty());
    let archived = f.keys("secrets/archive/other/");
    assert_eq!(archived.len(), 1, "{archived:?}");
    assert_eq!(
        destroyed["archived_to"].as_str().unwrap(),
        format!("etcd:{}", archived[0])
    );
    let out = f.etcd.etcdctl(&["get", "--print-value-only", &archived[0]]);
    let archive: Value = serde_json::from_slice(&out.stdout).unwrap();
    let records = archive["records"].as_object().unwrap();
    assert!(records["secrets/databases/other/ca.key"]
        .as_str()
        .unwrap()
        .contains("PRIVATE KEY"));
    assert_eq!(
        records
            .keys()
            .filter(|k| k.ends_with("/client.key"))
            .count(),
        40
    );
    let audit = f.audit();
    assert_eq!(audit.len(), audit_before + 1, "one audit key");
    assert_eq!(audit.last().unwrap()["action"], "mtls.destroy");
    assert_eq!(
        audit.last().unwrap()["details"]["archived_to"],
        destroyed["archived_to"]
    );
    assert_eq!(
        f.keys("databases/app/"),
        app_keys,
        "the other database is untouched"
    );
    // The name is free again; the archive is no state (export leaves it out).
    f.ok(&create);
    let to = f.env.dir.path().join("exported");
    f.ok(&[
        "state",
        "export",
        "--etcd-endpoints",
        &f.etcd.endpoint(),
        "--etcd-prefix",
        PREFIX,
        "--to",
        to.to_str().unwrap(),
    ]);
    assert!(to.join("databases/other/database.yaml").is_file());
    assert!(!to.join("archive").exists() && !to.join("secrets").exists());
    // Replacing the prefix from a directory keeps the archive, as a directory keeps its own.
    f.env
        .run(&[
            "state",
            "import",
            "--force",
            "--etcd-endpoints",
            &f.etcd.endpoint(),
            "--etcd-prefix",
            PREFIX,
        ])
        .ok();
    assert!(f.keys("databases/other/").is_empty());
    assert_eq!(f.keys("secrets/archive/other/"), archived);
    assert_eq!(f.env.snapshot(), on_disk, "the directory is not the store");
    assert!(
        !f.env.dir.path().join("etcd:").exists() && !std::path::Path::new("etcd:").exists(),
        "no directory named after the prefix"
    );
}

#[test]
fn renew_on_etcd_renews_more_than_one_transaction_holds_each_once_with_its_audit_key() {
    if !etcd_available_or_skip() {
        return;
    }
    let f = Fleet::new(0);
    // 30 due: 30 renewals of five operations each are more than one transaction may hold.
    let due: Vec<String> = (0..30)
        .map(|_| {
            f.json(&[
                "certificates",
                "create",
                "app",
                "--valid-for",
                "30d",
                "--json",
            ])["id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    let audit_before = f.audit().len();
    let report = f.json(&["certificates", "renew", "--json"]);
    let renewed = report["renewed"].as_array().unwrap();
    assert_eq!(renewed.len(), 30, "{report:#}");
    let mut previous: Vec<String> = renewed
        .iter()
        .map(|r| r["previous_id"].as_str().unwrap().to_owned())
        .collect();
    previous.sort();
    let mut expected = due.clone();
    expected.sort();
    assert_eq!(previous, expected, "each due certificate renewed once");
    for r in renewed {
        let (old, new) = (
            r["previous_id"].as_str().unwrap(),
            r["id"].as_str().unwrap(),
        );
        let record = f
            .get(&format!(
                "databases/app/certificates/{old}/certificate.yaml"
            ))
            .unwrap();
        assert!(record.contains(&format!("successor: {new}")), "{record}");
        assert!(f
            .get(&format!(
                "secrets/databases/app/certificates/{new}/client.key"
            ))
            .is_some());
    }
    let audit = f.audit();
    // One audit key per renewal, and the run's own record (renewal.yaml's `renewal.run`).
    assert_eq!(audit.len(), audit_before + 31, "one audit key per renewal");
    assert_eq!(actions(&audit[audit_before..], "renewal.run"), 1);
    let mut logged: Vec<String> = audit[audit_before..]
        .iter()
        .filter(|e| e["action"] != "renewal.run")
        .map(|e| {
            assert_eq!(e["action"], "certificate.renew", "{e}");
            e["details"]["previous_id"].as_str().unwrap().to_owned()
        })
        .collect();
    logged.sort();
    assert_eq!(logged, expected);
    let listed = f.json(&["certificates", "app", "--json"]);
    assert_eq!(listed.as_array().unwrap().len(), 61, "{listed}");

    let again = f.json(&["certificates", "renew", "--json"]);
    assert!(again["renewed"].as_array().unwrap().is_empty(), "{again:#}");
    let audit = f.audit();
    assert_eq!(actions(&audit[audit_before..], "certificate.renew"), 30);
    assert_eq!(actions(&audit[audit_before..], "renewal.run"), 2);
}

/// How many of `records` are of `action`.
fn actions(records: &[Value], action: &str) -> usize {
    records.iter().filter(|e| e["action"] == action).count()
}

#[test]
fn two_renews_at_once_renew_each_certificate_once() {
    if !etcd_available_or_skip() {
        return;
    }
    let f = Fleet::new(0);
    for _ in 0..25 {
        f.ok(&["certificates", "create", "app", "--valid-for", "30d"]);
    }
    let audit_before = f.audit().len();
    let children: Vec<_> = (0..2)
        .map(|_| {
            f.command(&["certificates", "renew", "--json"])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut previous = Vec::new();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: Value = serde_json::from_slice(&out.stdout).unwrap();
        for r in report["renewed"].as_array().unwrap() {
            previous.push(r["previous_id"].as_str().unwrap().to_owned());
        }
    }
    previous.sort();
    previous.dedup();
    assert_eq!(previous.len(), 25, "{previous:?}");
    let audit = f.audit();
    assert_eq!(
        actions(&audit[audit_before..], "certificate.renew"),
        25,
        "one audit key per renewal"
    );
    // Each run records itself, and nothing else was written.
    assert_eq!(actions(&audit[audit_before..], "renewal.run"), 2);
    assert_eq!(audit.len(), audit_before + 27);
    let listed = f.json(&["certificates", "app", "--json"]);
    assert_eq!(listed.as_array().unwrap().len(), 51, "no second successor");
}

#[test]
fn shared_listener_databases_are_created_in_etcd_and_a_taken_server_name_is_refused() {
    if !etcd_available_or_skip() {
        return;
    }
    let f = Fleet::new(0);
    let create = |name: &str, server_name: &str| {
        f.run(&[
            "mtls",
            "create",
            name,
            "--listen",
            "shared",
            "--server-name",
            server_name,
            "--upstream",
            "127.0.0.1:5432",
            "--confirm",
            name,
        ])
    };
    let orders = create("orders", "orders.db.test");
    assert!(
        orders.status.success(),
        "{}",
        String::from_utf8_lossy(&orders.stderr)
    );
    let yaml = f.get("databases/orders/database.yaml").unwrap();
    assert!(yaml.contains("listen: shared"), "{yaml}");
    // Two databases share the listener, not a name on it.
    let taken = create("billing", "Orders.DB.test");
    assert!(!taken.status.success());
    let err = String::from_utf8_lossy(&taken.stderr);
    assert!(
        err.contains("is already a server name of database \"orders\" on the shared listener"),
        "{err}"
    );
    assert!(f.keys("databases/billing/").is_empty(), "nothing written");
    let billing = create("billing", "billing.db.test");
    assert!(
        billing.status.success(),
        "{}",
        String::from_utf8_lossy(&billing.stderr)
    );
}
