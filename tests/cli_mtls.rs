//! `pgmtls mtls create|destroy|DB` and `pgmtls databases`: what `create` writes loads in the
//! proxy, refusals change nothing, and status words come only from a running proxy.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cli_support;

use cli_support::{fake_admin, free_listen, mode, Env};
use pgmtls::metrics::Metrics;
use pgmtls::pki::inspect_cert_pem;
use pgmtls::snapshot::Snapshot;
use pgmtls::state::StateDir;
use serde_json::json;

#[test]
fn mtls_create_writes_a_database_the_proxy_loads() {
    let env = Env::new();
    let listen = free_listen();
    let out = env
        .run(&[
            "mtls",
            "create",
            "app",
            "--listen",
            &listen,
            "--upstream",
            "127.0.0.1:5432",
            "--server-name",
            "db.example.com",
            "--confirm",
            "app",
            "--actor",
            "alice@example.com",
            "--json",
        ])
        .json();
    assert_eq!(out["database"], "app");
    assert_eq!(out["enabled_by"], "alice@example.com");
    assert_eq!(out["status"], "unknown", "no proxy runs: {out}");

    // The proxy's own loader and snapshot builder accept it.
    let states = StateDir::new(&env.state).load_all().unwrap();
    Snapshot::build(1, &states, &Metrics::new()).unwrap();
    let db = &states[0];
    assert_eq!(db.settings.listen.to_string(), listen);
    assert!(!db.settings.user_must_match_cn, "off unless asked for");
    assert!(db.rules.is_empty(), "a new database admits nobody");
    assert_eq!(db.certificates.len(), 1);
    assert_eq!(db.certificates[0].id, out["certificate_id"]);
    assert!(db.crl_pem.is_some(), "an empty CRL exists from the start");

    let dir = env.db_dir("app");
    for key in ["ca.key", "server.key"] {
        assert_eq!(mode(&dir.join(key)), 0o600, "{key}");
    }
    let cert_dir = dir.join("certificates").join(&db.certificates[0].id);
    assert_eq!(mode(&cert_dir.join("client.key")), 0o600);
    assert_eq!(mode(&dir), 0o700);

    // One CA per database, named after it, signs the server certificate: ca.crt is what
    // clients verify the server with.
    let ca = inspect_cert_pem(&String::from_utf8_lossy(&db.ca_pem)).unwrap();
    assert!(ca.is_ca);
    assert!(ca.subject_cn.as_deref().unwrap().contains("app"), "{ca:?}");
    let server = inspect_cert_pem(&String::from_utf8_lossy(&db.server_cert_pem)).unwrap();
    assert_eq!(server.issuer_cn, ca.subject_cn);
    let listen_ip = listen.split(':').next().unwrap();
    assert_eq!(server.sans, vec!["db.example.com", listen_ip]);
    let lifetime = server.not_after - server.not_before;
    assert!(
        lifetime.whole_days() >= 397 && lifetime.whole_days() <= 398,
        "{lifetime}"
    );
    let ca_years = (ca.not_after - ca.not_before).whole_days() / 365;
    assert_eq!(ca_years, 10);

    let audit = env.audit_lines();
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0]["action"], "mtls.create");
    assert_eq!(audit[0]["actor"], "alice@example.com");
    assert_eq!(audit[0]["database"], "app");
    let raw = std::fs::read_to_string(env.state.join("audit.log")).unwrap();
    assert!(!raw.contains("PRIVATE KEY"), "{raw}");
}

#[test]
fn mtls_create_can_bind_certificates_to_roles() {
    let env = Env::new();
    env.run(&[
        "mtls",
        "create",
        "app",
        "--listen",
        &free_listen(),
        "--upstream",
        "127.0.0.1:5432",
        "--user-must-match-cn",
        "--common-name",
        "reporting",
        "--confirm",
        "app",
    ])
    .ok();
    let states = StateDir::new(&env.state).load_all().unwrap();
    assert!(states[0].settings.user_must_match_cn);
    assert_eq!(states[0].certificates[0].common_name, "reporting");
    let yaml = std::fs::read_to_string(env.db_dir("app").join("database.yaml")).unwrap();
    assert!(yaml.contains("user_must_match_cn: true"), "{yaml}");
    let shown = env.run(&["mtls", "app", "--json"]).json();
    assert_eq!(shown["user_must_match_cn"], true);
    assert!(env
        .run(&["mtls", "app"])
        .ok()
        .contains("user_must_match_cn: yes"));
    assert_eq!(env.audit_lines()[0]["details"]["user_must_match_cn"], true);
}

#[test]
fn mtls_create_without_confirmation_refuses_when_stdin_is_not_a_terminal() {
    let env = Env::new();
    let base = [
        "mtls",
        "create",
        "app",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        "127.0.0.1:5432",
    ];
    let e = env.run(&base).error().to_owned();
    assert!(e.contains("--confirm app"), "{e}");
    let mut wrong = base.to_vec();
    wrong.extend(["--confirm", "other"]);
    let e = env.run(&wrong).error().to_owned();
    assert!(e.contains("does not match"), "{e}");
    assert!(env.snapshot().is_empty(), "nothing may be created");
}

#[test]
fn mtls_create_refuses_bad_input_and_changes_nothing() {
    let env = Env::new();
    let listen = free_listen();
    env.create_db("app", &listen, "127.0.0.1:5432");
    let before = env.snapshot();
    let create = |name: &str, listen: &str, upstream: &str, extra: &[&str]| {
        let mut args = vec![
            "mtls",
            "create",
            name,
            "--listen",
            listen,
            "--upstream",
            upstream,
            "--confirm",
            name,
        ];
        args.extend_from_slice(extra);
        env.run(&args).error().to_owned()
    };
    let other = free_listen();
    let cases = [
        (
            create("app", &other, "127.0.0.1:5432", &[]),
            "already enabled",
        ),
        (
            create("Bad/Name", &other, "127.0.0.1:5432", &[]),
            "invalid database name",
        ),
        (
            create("two", &listen, "127.0.0.1:5432", &[]),
            "already the listen address",
        ),
        (
            create("two", &other, "db.internal:5432", &[]),
            "not loopback",
        ),
        (
            create(
                "two",
                &other,
                "db.internal:5432",
                &["--upstream-tls", "verify-full"],
            ),
            "needs --upstream-ca",
        ),
        (create("two", &other, "nowhere", &[]), "--upstream"),
        (
            create(
                "two",
                &other,
                "127.0.0.1:5432",
                &["--server-name", "bad name!"],
            ),
            "invalid name",
        ),
        (
            create(
                "two",
                &other,
                "127.0.0.1:5432",
                &[
                    "--upstream-tls",
                    "verify-full",
                    "--upstream-ca",
                    "/nonexistent.pem",
                ],
            ),
            "cannot read --upstream-ca",
        ),
    ];
    for (err, want) in &cases {
        assert!(err.contains(want), "expected {want:?} in {err:?}");
    }
    assert_eq!(env.snapshot(), before, "a refused create changed the state");
}

#[test]
fn mtls_create_checks_the_upstream_ca_like_the_proxy_does() {
    let env = Env::new();
    let bogus = env.dir.path().join("bogus-ca.pem");
    std::fs::write(&bogus, "not a certificate\n").unwrap();
    let out = env.run(&[
        "mtls",
        "create",
        "app",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        "db.internal:5432",
        "--upstream-tls",
        "verify-full",
        "--upstream-ca",
        bogus.to_str().unwrap(),
        "--confirm",
        "app",
    ]);
    // Refused by the request's check, before any key is made or anything staged.
    let e = out.error();
    assert_eq!(e, "pgmtls: error: --upstream-ca: no PEM certificate found");
    assert!(!env.db_dir("app").exists());
    // Nothing was staged: not even the state directory was made.
    assert!(!env.state.join("databases").exists());
    // A PEM block that is no certificate passes that check and is refused by the proxy's
    // own load of the staged folder, which is then removed.
    std::fs::write(
        &bogus,
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let out = env.run(&[
        "mtls",
        "create",
        "app",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        "db.internal:5432",
        "--upstream-tls",
        "verify-full",
        "--upstream-ca",
        bogus.to_str().unwrap(),
        "--confirm",
        "app",
    ]);
    let e = out.error();
    assert!(e.contains("refusing"), "{e}");
    assert!(!env.db_dir("app").exists());
    let leftovers: Vec<_> = std::fs::read_dir(env.state.join("databases"))
        .unwrap()
        .collect();
    assert!(leftovers.is_empty(), "the staged folder is removed");
}

#[test]
fn mtls_create_honours_the_key_type() {
    let env = Env::new();
    env.run(&[
        "mtls",
        "create",
        "app",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        "127.0.0.1:5432",
        "--key-type",
        "p384",
        "--confirm",
        "app",
    ])
    .ok();
    let dir = env.db_dir("app");
    for f in ["ca.crt", "server.crt"] {
        let info = inspect_cert_pem(&std::fs::read_to_string(dir.join(f)).unwrap()).unwrap();
        assert_eq!(info.key_algorithm, "p384", "{f}");
    }
    let certs = env.run(&["certificates", "app", "--json"]).json();
    assert_eq!(certs[0]["key_type"], "p384");
}

#[test]
fn mtls_destroy_archives_the_database_instead_of_deleting_it() {
    let env = Env::new();
    env.create_db("app", "127.0.0.1:0", "127.0.0.1:5432");
    let e = env.run(&["mtls", "destroy", "app"]).error().to_owned();
    assert!(e.contains("--confirm app"), "{e}");
    let e = env
        .run(&["mtls", "destroy", "nope", "--confirm", "nope"])
        .error()
        .to_owned();
    assert!(e.contains("unknown database"), "{e}");
    let out = env
        .run(&["mtls", "destroy", "app", "--confirm", "app", "--json"])
        .json();
    let archived = std::path::PathBuf::from(out["archived_to"].as_str().unwrap());
    assert!(
        archived.starts_with(env.state.join("archive")),
        "{archived:?}"
    );
    assert!(archived.join("ca.key").is_file());
    assert!(!env.db_dir("app").exists());
    assert!(StateDir::new(&env.state).load_all().unwrap().is_empty());
    assert_eq!(env.audit_lines().last().unwrap()["action"], "mtls.destroy");
    // The name is free again.
    env.create_db("app", "127.0.0.1:0", "127.0.0.1:5432");
}

#[test]
fn status_words_come_from_the_running_proxy() {
    let env = Env::new();
    env.create_db("app", "127.0.0.1:0", "127.0.0.1:5432");
    let rule = env
        .run(&[
            "ip-rules",
            "create",
            "app",
            "--cidr",
            "10.1.0.0/16",
            "--json",
        ])
        .json();
    let pending_rule = env
        .run(&[
            "ip-rules",
            "create",
            "app",
            "--cidr",
            "10.2.0.0/16",
            "--json",
        ])
        .json();
    let certs = env.run(&["certificates", "app", "--json"]).json();
    let cert_id = certs[0]["id"].as_str().unwrap().to_owned();
    let new_cert = env.run(&["certificates", "create", "app", "--json"]).json();

    // Without a proxy, nothing claims to be Operational or Authorized.
    let text = env.run(&["mtls", "app"]).ok().to_owned();
    assert!(
        text.starts_with("TLS-status: unknown (no proxy reachable)\n"),
        "{text}"
    );
    let text = env.run(&["ip-rules", "app"]).ok().to_owned();
    assert!(!text.contains("Authorized"), "{text}");
    assert!(text.contains("unknown (no proxy reachable)"), "{text}");

    let status = json!({
        "generation": 4,
        "content_hash": "abc",
        "last_reload": {"at": "2026-05-05T12:00:00Z", "trigger": "watch", "ok": true, "error": null},
        "databases": {"app": {
            "operational": true,
            "listen": "127.0.0.1:6432",
            "rules": [rule["id"]],
            "certificates": [{"id": cert_id, "serial": "01", "expires_at": "2027-06-05T12:00:00Z", "revoked": false}],
            "crl_entries": 0,
            "server_cert_expires_at": "2027-06-05T12:00:00Z",
            "ca_expires_at": "2036-05-05T12:00:00Z"
        }}
    });
    let url = fake_admin(status.to_string());
    let with = |args: &[&str]| {
        let mut a = args.to_vec();
        a.extend(["--admin-url", &url]);
        env.run(&a)
    };
    let text = with(&["mtls", "app"]).ok().to_owned();
    assert!(text.starts_with("TLS-status: Operational\n"), "{text}");
    let rules = with(&["ip-rules", "app", "--json"]).json();
    let by_id = |id: &serde_json::Value| {
        rules
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["id"] == *id)
            .unwrap()["status"]
            .clone()
    };
    assert_eq!(by_id(&rule["id"]), "Authorized");
    assert_eq!(by_id(&pending_rule["id"]), "Authorizing");
    let certs = with(&["certificates", "app", "--json"]).json();
    // Both were issued within a second: find them by id, not by position.
    let cert = |id: &serde_json::Value| {
        certs
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["id"] == *id)
            .unwrap()
            .clone()
    };
    let loaded = cert(&json!(cert_id));
    assert_eq!(loaded["status"], "ready");
    assert_eq!(loaded["served"], true);
    let fresh = cert(&new_cert["id"]);
    assert_eq!(
        fresh["status"], "pending",
        "the proxy has not loaded it yet"
    );
    assert_eq!(fresh["served"], false);

    // The same proxy found through --config's admin_listen.
    let config = env.dir.path().join("pgmtls.yaml");
    let addr = url.trim_start_matches("http://");
    std::fs::write(
        &config,
        format!("state_dir: {}\nadmin_listen: {addr}\n", env.state.display()),
    )
    .unwrap();
    let mut cmd = env.command(&["databases", "--json", "--config", config.to_str().unwrap()]);
    cmd.env_remove("PGMTLS_STATE_DIR");
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dbs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(dbs[0]["name"], "app");
    assert_eq!(dbs[0]["tls_status"], "Operational");

    // A proxy that answers but does not serve the database yet: Provisioning.
    let url = fake_admin(json!({"generation": 1, "databases": {}}).to_string());
    let text = env
        .run(&["mtls", "app", "--admin-url", &url])
        .ok()
        .to_owned();
    assert!(text.starts_with("TLS-status: Provisioning\n"), "{text}");
}

#[test]
fn databases_lists_every_database_and_fails_on_a_broken_one() {
    let env = Env::new();
    // A missing state directory is named as such; an empty one has no databases.
    assert!(env.run(&["databases"]).error().contains("does not exist"));
    std::fs::create_dir(&env.state).unwrap();
    let out = env.run(&["databases"]).ok().to_owned();
    assert!(out.starts_with("No databases"), "{out}");
    env.create_db("app", "127.0.0.1:0", "127.0.0.1:5432");
    env.create_db("billing", &free_listen(), "127.0.0.1:5433");
    let text = env.run(&["databases"]).ok().to_owned();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("Name"), "{text}");
    assert!(lines[1].starts_with("────"), "{text}");
    assert!(lines[2].starts_with("app "), "{text}");
    assert!(lines[3].starts_with("billing "), "{text}");

    std::fs::write(env.db_dir("billing").join("ip-rules.yaml"), "rules: 5\n").unwrap();
    let out = env.run(&["databases", "--json"]);
    assert_eq!(out.code, Some(1));
    let rows: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert!(
        rows[1]["error"].as_str().unwrap().contains("ip-rules.yaml"),
        "{rows}"
    );
    assert!(
        out.stderr.contains("database billing does not load"),
        "{}",
        out.stderr
    );
}

#[test]
fn state_dir_comes_from_the_config_file_or_the_command_fails() {
    let env = Env::new();
    let config = env.dir.path().join("pgmtls.yaml");
    std::fs::write(&config, "state_dir: state\nadmin_listen: \"off\"\n").unwrap();
    let mut cmd = env.command(&[
        "mtls",
        "create",
        "app",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        "127.0.0.1:5432",
        "--confirm",
        "app",
        "--config",
        config.to_str().unwrap(),
    ]);
    cmd.env_remove("PGMTLS_STATE_DIR");
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // `state: state` is relative to the config file's folder, which is env.state's parent.
    assert!(env.db_dir("app").is_dir());

    let mut cmd = env.command(&["databases"]);
    cmd.env_remove("PGMTLS_STATE_DIR");
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--state-dir"));
}

#[test]
fn unwritable_state_dir_is_a_one_line_error() {
    let env = Env::new();
    let file = env.dir.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let state = file.join("state");
    let e = env
        .run_env(
            &[
                "mtls",
                "create",
                "app",
                "--listen",
                "127.0.0.1:0",
                "--upstream",
                "127.0.0.1:5432",
                "--confirm",
                "app",
            ],
            &[("PGMTLS_STATE_DIR", state.to_str().unwrap())],
        )
        .error()
        .to_owned();
    assert!(e.contains("Not a directory"), "{e}");
    assert_eq!(std::fs::read(&file).unwrap(), b"x");
}

#[test]
fn an_audit_log_that_cannot_be_opened_stops_the_change_before_it_is_made() {
    let env = Env::new();
    env.create_db("app", "127.0.0.1:0", "127.0.0.1:5432");
    // A directory where the log should be: unwritable even for root.
    std::fs::remove_file(env.state.join("audit.log")).unwrap();
    std::fs::create_dir(env.state.join("audit.log")).unwrap();
    let before = env.snapshot();
    let e = env
        .run(&["ip-rules", "create", "app", "--cidr", "10.0.0.0/8"])
        .error()
        .to_owned();
    assert!(e.contains("audit.log"), "{e}");
    let e = env
        .run(&["certificates", "revoke", "app", "--id", "whatever"])
        .error()
        .to_owned();
    assert!(e.contains("audit.log"), "{e}");
    assert_eq!(env.snapshot(), before);
}

/// Answers the confirmation prompt on a pseudo-terminal made by util-linux `script`.
fn with_tty(env: &Env, args: &[&str], answer: &str) -> cli_support::Out {
    use std::io::Write;
    let line = std::iter::once(cli_support::BIN)
        .chain(args.iter().copied())
        .map(|a| format!("'{a}'"))
        .collect::<Vec<_>>()
        .join(" ");
    // The same environment the plain runs get, around `script`.
    let base = env.command(&[]);
    let mut cmd = std::process::Command::new("script");
    cmd.args(["-qec", &line, "/dev/null"]);
    for (k, v) in base.get_envs() {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    cmd.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{answer}\n").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    cli_support::Out {
        args: line,
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[test]
fn the_prompt_on_a_terminal_takes_yes_and_refuses_anything_else() {
    if std::process::Command::new("script")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipping: util-linux `script` is not installed");
        return;
    }
    let env = Env::new();
    let create = [
        "mtls",
        "create",
        "app",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        "127.0.0.1:5432",
    ];
    let out = with_tty(&env, &create, "no");
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stdout.contains("This action will be logged. Continue?"),
        "{out:?}"
    );
    assert!(
        out.stdout.contains("aborted: nothing was changed"),
        "{out:?}"
    );
    assert!(!env.db_dir("app").exists());
    let out = with_tty(&env, &create, "yes");
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(env.db_dir("app").is_dir());
}

#[test]
fn mtls_create_accepts_a_unix_socket_upstream() {
    let env = Env::new();
    let out = env.create_db(
        "app",
        "127.0.0.1:0",
        "unix:/var/run/postgresql/.s.PGSQL.5432",
    );
    assert_eq!(out["upstream"], "unix:/var/run/postgresql/.s.PGSQL.5432");
    let db = StateDir::new(&env.state).load_database("app").unwrap();
    assert!(db.settings.upstream.unix_path().is_some());
    let e = env
        .run(&[
            "mtls",
            "create",
            "two",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "unix:relative",
            "--confirm",
            "two",
        ])
        .error()
        .to_owned();
    assert!(e.contains("absolute path"), "{e}");
}

/// A proxy that rejected one database's change says so for that database only: `mtls DB` and
/// `databases` show the error next to the database it concerns.
#[test]
fn a_database_the_proxy_rejected_shows_its_error_and_only_there() {
    let env = Env::new();
    env.create_db("app", &free_listen(), "127.0.0.1:5432");
    env.create_db("other", &free_listen(), "127.0.0.1:5432");
    let error = "/s/databases/app/ip-rules.yaml: error: line 2: did not find expected node";
    let db = |reload_error: Option<&str>| {
        json!({"operational": true, "listen": "127.0.0.1:6432", "rules": [], "certificates": [],
               "crl_entries": 0, "reload_error": reload_error})
    };
    let status = json!({
        "generation": 4,
        "content_hash": "abc",
        "last_reload": {"at": "2026-05-05T12:00:00Z", "trigger": "watch", "ok": false,
                        "error": error, "database_errors": {"app": error}},
        "databases": {"app": db(Some(error)), "other": db(None)}
    });
    let url = fake_admin(status.to_string());
    let with = |args: &[&str]| {
        let mut a = args.to_vec();
        a.extend(["--admin-url", &url]);
        env.run(&a)
    };
    let text = with(&["mtls", "app"]).ok().to_owned();
    assert!(text.contains("proxy_reload_error"), "{text}");
    assert!(text.contains("did not find expected node"), "{text}");
    let json = with(&["mtls", "app", "--json"]).json();
    assert_eq!(json["proxy_reload_error"], error);
    let text = with(&["mtls", "other"]).ok().to_owned();
    assert!(!text.contains("proxy_reload_error"), "{text}");
    assert!(with(&["mtls", "other", "--json"]).json()["proxy_reload_error"].is_null());

    let out = with(&["databases", "--json"]);
    let rows = out.json();
    assert_eq!(rows[0]["name"], "app");
    assert_eq!(rows[0]["proxy_reload_error"], error);
    assert!(rows[1]["proxy_reload_error"].is_null());
    assert!(
        out.stderr
            .contains("the proxy rejected the last change of database app"),
        "{}",
        out.stderr
    );
}
