//! `pgmtls doctor`: with real certificates issued by the CLI, each way in or out is answered
//! with the reason the proxy logs; one test runs the real proxy and psql with the very same
//! certificates and addresses and compares the labels.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cli_support;
mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use cli_support::{free_listen, Env};
use common::clients::Psql;
use common::pg::{pg_available_or_skip, PgServer, APP_DB, APP_PASSWORD, APP_USER};
use common::proxy::ProxyProcess;
use serde_json::Value;

/// `certificates download DB --id ID` into its own folder; the certificate and key files.
fn download(env: &Env, db: &str, id: &str) -> (PathBuf, PathBuf, PathBuf) {
    let dir = env.dir.path().join(format!("dl-{db}-{id}"));
    env.run(&[
        "certificates",
        "download",
        db,
        "--id",
        id,
        "--dir",
        dir.to_str().unwrap(),
    ])
    .ok();
    (
        dir.join("postgresql.crt"),
        dir.join("postgresql.key"),
        dir.join("root.crt"),
    )
}

fn first_cert(env: &Env, db: &str) -> String {
    env.run(&["certificates", db, "--json"]).json()[0]["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn new_cert(env: &Env, db: &str, extra: &[&str]) -> String {
    let mut args = vec!["certificates", "create", db, "--json"];
    args.extend_from_slice(extra);
    env.run(&args).json()["id"].as_str().unwrap().to_owned()
}

/// `pgmtls doctor ... --json`: exit code and the diagnosis.
fn doctor(env: &Env, db: &str, cert: &Path, extra: &[&str]) -> (i32, Value) {
    let mut args = vec!["doctor", db, "--cert", cert.to_str().unwrap(), "--json"];
    args.extend_from_slice(extra);
    let out = env.run(&args);
    let v: Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}{}", out.stdout, out.stderr));
    (out.code.unwrap(), v)
}

fn check<'a>(d: &'a Value, name: &str) -> &'a Value {
    d["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == name)
        .unwrap_or_else(|| panic!("no {name} check: {d:#}"))
}

#[test]
fn each_refusal_is_named_with_the_reason_the_proxy_logs() {
    let env = Env::new();
    env.create_db("app", &free_listen(), "127.0.0.1:9");
    env.run(&["ip-rules", "create", "app", "--cidr", "127.0.0.2/32"])
        .ok();
    let (good, _, _) = download(&env, "app", &first_cert(&env, "app"));

    // Good: every check passes, exit 0, the admitting rule named.
    let (code, d) = doctor(&env, "app", &good, &["--from", "127.0.0.2"]);
    assert_eq!(code, 0, "{d:#}");
    assert_eq!(d["admitted"], true);
    assert!(d["reason"].is_null());
    assert!(
        check(&d, "address")["detail"]
            .as_str()
            .unwrap()
            .starts_with("IP rule "),
        "{d:#}"
    );
    assert_eq!(check(&d, "certificate")["ok"], true);
    let human = env.run(&[
        "doctor",
        "app",
        "--cert",
        good.to_str().unwrap(),
        "--from",
        "127.0.0.2",
    ]);
    assert!(
        human.ok().contains("verdict: admitted to app"),
        "{}",
        human.stdout
    );

    // An address no rule admits.
    let (code, d) = doctor(&env, "app", &good, &["--from", "127.0.0.3"]);
    assert_eq!(
        (code, &d["reason"]),
        (1, &Value::from("ip_not_allowed")),
        "{d:#}"
    );
    assert_eq!(check(&d, "address")["reason"], "ip_not_allowed");
    let human = env.run(&[
        "doctor",
        "app",
        "--cert",
        good.to_str().unwrap(),
        "--from",
        "127.0.0.3",
    ]);
    assert_eq!(human.code, Some(1));
    assert!(
        human.stdout.contains("[ip_not_allowed]")
            && human.stdout.contains("verdict: refused: ip_not_allowed"),
        "{}",
        human.stdout
    );

    // A trusted range admits an address no IP rule covers (the certificate is then optional,
    // but the one given is still checked); an IP rule over the same address takes precedence.
    env.run(&["trusted-ips", "create", "app", "--cidr", "127.0.0.0/29"])
        .ok();
    let (code, d) = doctor(&env, "app", &good, &["--from", "127.0.0.3"]);
    assert_eq!(code, 0, "{d:#}");
    assert!(
        check(&d, "address")["detail"]
            .as_str()
            .unwrap()
            .starts_with("trusted IP range "),
        "{d:#}"
    );
    let (code, d) = doctor(&env, "app", &good, &["--from", "127.0.0.2"]);
    assert_eq!(code, 0, "{d:#}");
    assert!(
        check(&d, "address")["detail"]
            .as_str()
            .unwrap()
            .starts_with("IP rule "),
        "{d:#}"
    );
    let range = env.run(&["trusted-ips", "app", "--json"]).json()[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    env.run(&["trusted-ips", "delete", "app", "--id", &range])
        .ok();

    // Revoked: on the CRL.
    let revoked = new_cert(&env, "app", &[]);
    let (revoked_crt, _, _) = download(&env, "app", &revoked);
    env.run(&["certificates", "revoke", "app", "--id", &revoked])
        .ok();
    let (code, d) = doctor(&env, "app", &revoked_crt, &["--from", "127.0.0.2"]);
    assert_eq!(
        (code, &d["reason"]),
        (1, &Value::from("client_cert_revoked")),
        "{d:#}"
    );
    assert_eq!(check(&d, "revocation")["reason"], "client_cert_revoked");

    // Expired: issued for one second, judged once that second is over.
    let short = new_cert(&env, "app", &["--valid-for", "1s"]);
    let (short_crt, _, _) = download(&env, "app", &short);
    std::thread::sleep(Duration::from_millis(2100));
    let (code, d) = doctor(&env, "app", &short_crt, &["--from", "127.0.0.2"]);
    assert_eq!(
        (code, &d["reason"]),
        (1, &Value::from("client_cert_expired")),
        "{d:#}"
    );
    assert_eq!(check(&d, "validity")["reason"], "client_cert_expired");

    // Another database's CA.
    env.create_db("other", &free_listen(), "127.0.0.1:9");
    let (foreign, _, _) = download(&env, "other", &first_cert(&env, "other"));
    let (code, d) = doctor(&env, "app", &foreign, &["--from", "127.0.0.2"]);
    assert_eq!(
        (code, &d["reason"]),
        (1, &Value::from("client_cert_untrusted")),
        "{d:#}"
    );

    // The identity policy: the user must be the certificate's CN.
    env.run(&[
        "mtls",
        "create",
        "strict",
        "--listen",
        &free_listen(),
        "--upstream",
        "127.0.0.1:9",
        "--user-must-match-cn",
        "--confirm",
        "strict",
        "--json",
    ])
    .ok();
    let alice = new_cert(&env, "strict", &["--common-name", "alice"]);
    let (alice_crt, _, _) = download(&env, "strict", &alice);
    let (code, d) = doctor(&env, "strict", &alice_crt, &["--user", "bob"]);
    assert_eq!(
        (code, &d["reason"]),
        (1, &Value::from("identity_denied")),
        "{d:#}"
    );
    let (code, d) = doctor(&env, "strict", &alice_crt, &["--user", "alice"]);
    assert_eq!(code, 0, "{d:#}");
    assert_eq!(
        check(&d, "address")["ok"],
        Value::Null,
        "not checked without --from"
    );

    // The shared listener: the server name picks the database.
    env.run(&[
        "mtls",
        "create",
        "shop",
        "--listen",
        "shared",
        "--server-name",
        "shop.db.test",
        "--upstream",
        "127.0.0.1:9",
        "--confirm",
        "shop",
        "--json",
    ])
    .ok();
    env.run(&["ip-rules", "create", "shop", "--cidr", "127.0.0.2/32"])
        .ok();
    let (shop, _, _) = download(&env, "shop", &first_cert(&env, "shop"));
    let (code, d) = doctor(
        &env,
        "shop",
        &shop,
        &["--from", "127.0.0.2", "--sni", "shop.db.test"],
    );
    assert_eq!(code, 0, "{d:#}");
    assert_eq!(check(&d, "sni")["ok"], true);
    let (code, d) = doctor(
        &env,
        "shop",
        &shop,
        &["--from", "127.0.0.2", "--sni", "nope.db.test"],
    );
    assert_eq!(
        (code, &d["reason"]),
        (1, &Value::from("sni_unknown")),
        "{d:#}"
    );
    let (code, d) = doctor(&env, "shop", &shop, &["--from", "127.0.0.2"]);
    assert_eq!(
        (code, &d["reason"]),
        (1, &Value::from("sni_missing")),
        "{d:#}"
    );

    // A question that cannot be asked is not an answer: exit 2.
    let out = env.run(&["doctor", "nosuch", "--cert", good.to_str().unwrap()]);
    assert_eq!(out.code, Some(2), "{}", out.stderr);
}

/// The same certificates and addresses through the real proxy and psql: the label the proxy
/// logs is the one doctor gives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_and_the_proxy_refuse_with_the_same_reason() {
    if !pg_available_or_skip() {
        return;
    }
    let pg = PgServer::start();
    let env = Env::new();
    let up = pg.addr().to_string();
    env.create_db("app", &free_listen(), &up);
    env.create_db("closed", &free_listen(), &up);
    // psql comes from 127.0.0.1: admitted to app, and no rule of closed admits it.
    env.run(&["ip-rules", "create", "app", "--cidr", "127.0.0.1/32"])
        .ok();
    let good = first_cert(&env, "app");
    let revoked = new_cert(&env, "app", &[]);
    let closed = first_cert(&env, "closed");
    // Downloaded while still valid, as a client that had them would hold them.
    let files: Vec<_> = [("app", &good), ("app", &revoked), ("closed", &closed)]
        .into_iter()
        .map(|(db, id)| download(&env, db, id))
        .collect();
    env.run(&["certificates", "revoke", "app", "--id", &revoked])
        .ok();
    let config = env.dir.path().join("pgmtls.yaml");
    std::fs::write(
        &config,
        format!(
            "state_dir: {}\nadmin_listen: \"off\"\nlog_format: json\n",
            env.state.display()
        ),
    )
    .unwrap();
    let proxy = ProxyProcess::spawn(&["--config", config.to_str().unwrap()]);

    for ((db, want), (crt, key, root)) in [
        ("app", None),
        ("app", Some("client_cert_revoked")),
        ("closed", Some("ip_not_allowed")),
    ]
    .into_iter()
    .zip(files)
    {
        let (code, d) = doctor(&env, db, &crt, &["--from", "127.0.0.1", "--user", APP_USER]);
        let out = Psql::new(
            pg.psql_path(),
            "127.0.0.1",
            proxy.addrs[db].port(),
            APP_USER,
            APP_DB,
        )
        .verify_ca(&root, Some((&crt, &key)))
        .password(APP_PASSWORD)
        .run_async("SELECT 1")
        .await;
        match want {
            None => {
                assert_eq!(out.expect_ok(), "1");
                assert_eq!(code, 0, "{d:#}");
            }
            Some(reason) => {
                assert!(!out.success(), "{db}: psql got in");
                let line = proxy.wait_for_log(Duration::from_secs(20), |v| {
                    v["message"] == "connection closed"
                        && v["database"] == db
                        && v["outcome"] == "refused"
                });
                assert_eq!(line["error_kind"], reason, "{line}");
                assert_eq!(code, 1, "{d:#}");
                assert_eq!(d["reason"], line["error_kind"], "{d:#}\n{line}");
            }
        }
    }
}
