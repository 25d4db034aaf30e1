//! What a person sees when they get a command slightly wrong: a mistyped subcommand is named
//! with the near one, a delete without a selector names both selectors, a bare address is
//! echoed as the block it means, a download into a file says so, every flag has help text, and
//! the connect line fills in what pgmtls knows.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cli_support;

use std::collections::BTreeSet;

use cli_support::Env;

#[test]
fn a_mistyped_subcommand_is_named_with_the_near_one() {
    let env = Env::new();
    env.create_db("orders", "127.0.0.1:0", "127.0.0.1:5432");
    for (args, typed, near) in [
        (
            ["certificates", "downlaod", "orders"],
            "downlaod",
            "download",
        ),
        (["mtls", "crate", "orders"], "crate", "create"),
        (["ip-rules", "delet", "orders"], "delet", "delete"),
    ] {
        let out = env.run(&args);
        assert_eq!(out.code, Some(2), "{out:?}");
        assert!(
            out.stderr
                .contains(&format!("unrecognized subcommand '{typed}'")),
            "{}",
            out.stderr
        );
        assert!(
            out.stderr
                .contains(&format!("a similar subcommand exists: '{near}'")),
            "{}",
            out.stderr
        );
        assert!(
            !out.stderr.contains("cannot be used with"),
            "{}",
            out.stderr
        );
    }
    // Listing a database by name still works, and so do the real subcommands with options.
    assert!(env
        .run(&["ip-rules", "orders"])
        .ok()
        .contains("No IP rules"));
    let out = env.run(&["ip-rules", "create", "orders", "--cidr", "10.0.0.0/8"]);
    out.ok();
}

#[test]
fn delete_without_a_selector_names_both_and_a_bare_address_is_echoed_as_its_block() {
    let env = Env::new();
    env.create_db("orders", "127.0.0.1:0", "127.0.0.1:5432");
    let out = env.run(&["ip-rules", "delete", "orders"]);
    assert_eq!(out.code, Some(2));
    assert!(out.stderr.contains("--id"), "{}", out.stderr);
    assert!(out.stderr.contains("--cidr"), "{}", out.stderr);

    let out = env.run(&["ip-rules", "create", "orders", "--cidr", "10.1.2.3"]);
    assert!(out.ok().contains("cidr: 10.1.2.3/32"), "{}", out.stdout);
    assert!(
        out.stderr
            .contains("--cidr 10.1.2.3 is the single address 10.1.2.3/32"),
        "{}",
        out.stderr
    );
    // A block written as one says nothing extra.
    let out = env.run(&["ip-rules", "create", "orders", "--cidr", "10.9.0.0/16"]);
    out.ok();
    assert!(!out.stderr.contains("note:"), "{}", out.stderr);
}

fn first_certificate(env: &Env, db: &str) -> String {
    let list = env.run(&["certificates", db, "--json"]).json();
    list[0]["id"].as_str().unwrap().to_owned()
}

#[test]
fn a_download_into_a_file_says_it_is_not_a_directory_and_a_new_dir_is_announced() {
    let env = Env::new();
    env.run(&[
        "mtls",
        "create",
        "orders",
        "--listen",
        "127.0.0.1:6543",
        "--upstream",
        "127.0.0.1:5432",
        "--server-name",
        "orders.db.example",
        "--confirm",
        "orders",
    ])
    .ok();
    let id = first_certificate(&env, "orders");
    let file = env.dir.path().join("afile");
    std::fs::write(&file, "x").unwrap();
    let out = env.run(&[
        "certificates",
        "download",
        "orders",
        "--id",
        &id,
        "--prefix",
        "o_",
        "--dir",
        file.to_str().unwrap(),
    ]);
    assert!(out.error().contains("is not a directory"), "{out:?}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "x");

    let nested = env.dir.path().join("new/nested");
    let out = env.run(&[
        "certificates",
        "download",
        "orders",
        "--id",
        &id,
        "--prefix",
        "o_",
        "--dir",
        nested.to_str().unwrap(),
    ]);
    let stdout = out.ok();
    assert!(
        out.stderr
            .contains(&format!("created {}", nested.display())),
        "{}",
        out.stderr
    );
    // The connect line carries the server name and the port; only the database name and the
    // role (unknown to pgmtls without user_must_match_cn) are left to fill in.
    let line = stdout
        .lines()
        .find(|l| l.starts_with("connect with: psql"))
        .unwrap();
    assert!(
        line.contains("host=orders.db.example port=6543 dbname=DBNAME user=USER"),
        "{line}"
    );
    assert!(!line.contains("HOST"), "{line}");
    let again = env.run(&[
        "certificates",
        "download",
        "orders",
        "--id",
        &id,
        "--prefix",
        "o_",
        "--dir",
        nested.to_str().unwrap(),
        "--force",
        "--json",
    ]);
    let v = again.json();
    assert_eq!(v["dir_created"], false);
    assert!(!again.stderr.contains("created"), "{}", again.stderr);
}

#[test]
fn with_user_must_match_cn_the_connect_line_names_the_role() {
    let env = Env::new();
    env.run(&[
        "mtls",
        "create",
        "billing",
        "--listen",
        "127.0.0.1:6544",
        "--upstream",
        "127.0.0.1:5432",
        "--user-must-match-cn",
        "--common-name",
        "reporting app",
        "--confirm",
        "billing",
    ])
    .ok();
    let id = first_certificate(&env, "billing");
    let dir = env.dir.path().join("dl");
    let v = env
        .run(&[
            "certificates",
            "download",
            "billing",
            "--id",
            &id,
            "--prefix",
            "b_",
            "--dir",
            dir.to_str().unwrap(),
            "--json",
        ])
        .json();
    let line = v["connect"].as_str().unwrap();
    // No server name: the specific listen address; a CN with a space is quoted for libpq.
    assert!(
        line.starts_with("host=127.0.0.1 port=6544 dbname=DBNAME user='reporting app' "),
        "{line}"
    );
}

/// `pgmtls CMD --help` for every command and subcommand, walking the "Commands:" sections.
fn all_helps(env: &Env) -> Vec<(String, String)> {
    let mut todo = vec![Vec::<String>::new()];
    let mut out = Vec::new();
    while let Some(path) = todo.pop() {
        let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
        args.push("--help");
        let help = env.run(&args).ok().to_owned();
        let mut in_commands = false;
        for line in help.lines() {
            if line.starts_with("Commands:") {
                in_commands = true;
                continue;
            }
            if in_commands {
                let Some(name) = line
                    .strip_prefix("  ")
                    .and_then(|l| l.split_whitespace().next())
                else {
                    in_commands = false;
                    continue;
                };
                if name != "help" {
                    let mut next = path.clone();
                    next.push(name.to_owned());
                    todo.push(next);
                }
            }
        }
        out.push((path.join(" "), help));
    }
    out
}

#[test]
fn every_flag_of_every_command_has_help_text() {
    let env = Env::new();
    let helps = all_helps(&env);
    let commands: BTreeSet<&str> = helps.iter().map(|(c, _)| c.as_str()).collect();
    for must in [
        "serve",
        "mtls create",
        "certificates download",
        "ip-rules delete",
    ] {
        assert!(commands.contains(must), "{must} not reached: {commands:?}");
    }
    let mut bare = Vec::new();
    for (command, help) in &helps {
        let lines: Vec<&str> = help.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let t = line.trim_start();
            if !t.starts_with('-') || t.len() < 2 {
                continue;
            }
            // Short layouts put the description after the flag on the same line; long ones on
            // the next line. A flag without one goes straight to its `[env: ...]` or
            // `[default: ...]` annotations, or to the next flag.
            let same_line = t
                .split_once("  ")
                .map(|(_, d)| d.trim_start())
                .unwrap_or("");
            let next = lines.get(i + 1).map(|l| l.trim_start()).unwrap_or("");
            let described = if same_line.is_empty() {
                !next.is_empty() && !next.starts_with('[') && !next.starts_with('-')
            } else {
                !same_line.starts_with('[')
            };
            if !described {
                bare.push(format!("pgmtls {command}: {t}"));
            }
        }
    }
    assert!(bare.is_empty(), "flags without help text: {bare:#?}");
    // The key types are listed where they are chosen.
    let create = &helps.iter().find(|(c, _)| c == "mtls create").unwrap().1;
    assert!(
        create.contains("[possible values: p256, p384, rsa2048, rsa4096]"),
        "{create}"
    );
}

#[test]
fn a_missing_state_directory_is_named_not_taken_for_an_empty_one() {
    let env = Env::new();
    let nope = env.dir.path().join("nope");
    let dir = nope.to_str().unwrap();
    let out = env.run(&["databases", "--state-dir", dir]);
    assert!(out.error().contains("does not exist"), "{out:?}");
    assert!(!out.stdout.contains("No databases"), "{}", out.stdout);
    let out = env.run(&["ip-rules", "orders", "--state-dir", dir]);
    assert!(out.error().contains("does not exist"), "{out:?}");

    let config = env.dir.path().join("pgmtls.yaml");
    std::fs::write(
        &config,
        format!("state_dir: {dir}\nadmin_listen: \"off\"\n"),
    )
    .unwrap();
    let out = env.run(&["check-config", "--config", config.to_str().unwrap()]);
    assert!(out.ok().contains("ok (0 databases)"), "{out:?}");
    assert!(out.stderr.contains("does not exist"), "{}", out.stderr);

    let out = env.run(&[
        "mtls",
        "create",
        "orders",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        "127.0.0.1:5432",
        "--confirm",
        "orders",
        "--state-dir",
        dir,
    ]);
    out.ok();
    assert!(
        out.stderr
            .contains(&format!("created the state directory {dir}")),
        "{}",
        out.stderr
    );
}

#[test]
fn a_database_on_port_zero_shows_the_port_the_proxy_serves() {
    let env = Env::new();
    env.create_db("orders", "127.0.0.1:0", "127.0.0.1:5432");
    // A stand-in admin endpoint answering /status as a proxy that bound port 41234.
    let status = serde_json::json!({
        "version": "x", "ready": true, "draining": false, "generation": 1,
        "content_hash": "h",
        "last_reload": {"at": "2026-12-01T00:00:00Z", "trigger": "startup", "ok": true,
                        "error": null, "last_success_at": null},
        "databases": {"orders": {"operational": true, "listen": "127.0.0.1:41234",
                                 "rules": [], "certificates": [], "crl_entries": 0,
                                 "server_cert_expires_at": null, "ca_expires_at": null}}
    });
    let url = cli_support::fake_admin(status.to_string());
    let rows = env
        .run(&["databases", "--json", "--admin-url", &url])
        .json();
    assert_eq!(rows[0]["listen"], "127.0.0.1:41234");
    let url = cli_support::fake_admin(status.to_string());
    let view = env
        .run(&["mtls", "orders", "--json", "--admin-url", &url])
        .json();
    assert_eq!(view["listen"], "127.0.0.1:41234");
    // Without a proxy the configured address is all there is to say.
    let rows = env.run(&["databases", "--json"]).json();
    assert_eq!(rows[0]["listen"], "127.0.0.1:0");
}
