//! `pgmtls ip-rules`: rules round-trip through the proxy's parser, bad input is refused with
//! one line and changes nothing, and concurrent runs never lose a rule.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cli_support;

use cli_support::Env;
use pgmtls::state::{ip_rules_to_yaml, parse_ip_rules, IpRule, StateDir};
use time::OffsetDateTime;

fn rules(env: &Env) -> Vec<IpRule> {
    StateDir::new(&env.state)
        .load_database("app")
        .unwrap()
        .rules
}

#[test]
fn rule_is_created_listed_fetched_and_deleted() {
    let env = Env::new();
    env.create_db("app", "127.0.0.1:0", "127.0.0.1:5432");
    let out = env.run(&[
        "ip-rules",
        "create",
        "app",
        "--cidr",
        "203.0.113.7/32",
        "--description",
        "My Office IP",
    ]);
    let block = out.ok().to_owned();
    assert_eq!(
        out.stderr.trim(),
        "Creating IP rule for database app... done"
    );
    let keys: Vec<&str> = block
        .lines()
        .map(|l| l.split_once(": ").unwrap().0)
        .collect();
    assert_eq!(
        keys,
        [
            "cidr",
            "created_at",
            "description",
            "id",
            "status",
            "updated_at"
        ]
    );
    assert!(
        block.contains("status: unknown (no proxy reachable)\n"),
        "{block}"
    );
    let id = block
        .lines()
        .find_map(|l| l.strip_prefix("id: "))
        .unwrap()
        .to_owned();
    assert_eq!(uuid::Uuid::parse_str(&id).unwrap().get_version_num(), 4);

    let v6 = env
        .run(&[
            "ip-rules",
            "create",
            "app",
            "--cidr",
            "2001:db8::/48",
            "--json",
        ])
        .json();
    assert_eq!(v6["cidr"], "2001:db8::/48");
    assert_eq!(v6["description"], "");

    let table = env.run(&["ip-rules", "app"]).ok().to_owned();
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("ID") && lines[0].contains("CIDR") && lines[0].contains("Status"),
        "{table}"
    );
    assert!(lines[1].chars().all(|c| c == '─' || c == ' '), "{table}");
    assert!(
        lines[2].starts_with(&id) && lines[2].contains("My Office IP"),
        "{table}"
    );
    assert_eq!(lines.len(), 4, "{table}");
    // The explicit `list` form prints the same.
    assert_eq!(env.run(&["ip-rules", "list", "app"]).ok(), table);

    let got = env
        .run(&["ip-rules", "get", "app", "--id", &id, "--json"])
        .json();
    assert_eq!(got["cidr"], "203.0.113.7/32");
    assert_eq!(got["status"], "unknown");

    let loaded = rules(&env);
    assert_eq!(loaded.len(), 2);
    assert_eq!(loaded[0].id, id);

    env.run(&["ip-rules", "delete", "app", "--id", &id]).ok();
    env.run(&["ip-rules", "delete", "app", "--cidr", "2001:db8::/48"])
        .ok();
    assert!(rules(&env).is_empty());
    let out = env.run(&["ip-rules", "app"]).ok().to_owned();
    assert!(out.contains("nobody can connect"), "{out}");

    let actions: Vec<String> = env
        .audit_lines()
        .iter()
        .map(|l| l["action"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        actions,
        [
            "mtls.create",
            "ip_rule.create",
            "ip_rule.create",
            "ip_rule.delete",
            "ip_rule.delete"
        ]
    );
    let created = &env.audit_lines()[1];
    assert_eq!(created["actor"], "tester");
    assert_eq!(created["details"]["cidr"], "203.0.113.7/32");
    assert_eq!(created["details"]["id"], id.as_str());
}

#[test]
fn bad_rule_input_is_refused_with_one_line_and_changes_nothing() {
    let env = Env::new();
    env.create_db("app", "127.0.0.1:0", "127.0.0.1:5432");
    let id = env
        .run(&[
            "ip-rules",
            "create",
            "app",
            "--cidr",
            "10.0.0.0/8",
            "--json",
        ])
        .json()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let before = env.snapshot();
    let long = "x".repeat(256);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["ip-rules", "create", "app", "--cidr", "10.0.0.1/8"],
            "10.0.0.1/8 has host bits set; did you mean 10.0.0.0/8?",
        ),
        (
            vec!["ip-rules", "create", "app", "--cidr", "2001:db8::1/48"],
            "did you mean 2001:db8::/48?",
        ),
        (
            vec!["ip-rules", "create", "app", "--cidr", "banana"],
            "is not a CIDR block",
        ),
        (
            vec!["ip-rules", "create", "app", "--cidr", "10.0.0.0/33"],
            "is not a CIDR block",
        ),
        (
            vec!["ip-rules", "create", "app", "--cidr", "10.0.0.0/8"],
            "already exists",
        ),
        (
            vec!["ip-rules", "create", "app", "--cidr", "::ffff:10.0.0.0/104"],
            "write it as 10.0.0.0/8",
        ),
        (
            vec![
                "ip-rules",
                "create",
                "app",
                "--cidr",
                "10.9.0.0/16",
                "--description",
                &long,
            ],
            "longer than 255",
        ),
        (
            vec![
                "ip-rules",
                "create",
                "app",
                "--cidr",
                "10.9.0.0/16",
                "--description",
                "bell\x07",
            ],
            "control characters",
        ),
        (
            vec!["ip-rules", "create", "nope", "--cidr", "10.9.0.0/16"],
            "unknown database \"nope\"",
        ),
        (vec!["ip-rules", "nope"], "unknown database"),
        (
            vec!["ip-rules", "get", "app", "--id", "nope"],
            "no IP rule with id",
        ),
        (
            vec!["ip-rules", "delete", "app", "--id", "nope"],
            "no IP rule with id",
        ),
        (
            vec!["ip-rules", "delete", "app", "--cidr", "10.1.0.0/16"],
            "no IP rule for 10.1.0.0/16",
        ),
        (
            vec!["ip-rules", "delete", "app", "--cidr", "10.0.0.5/8"],
            "did you mean",
        ),
    ];
    for (args, want) in &cases {
        let out = env.run(args);
        let e = out.error();
        assert!(
            e.contains(want),
            "`{}`: expected {want:?} in {e:?}",
            args.join(" ")
        );
    }
    // Both or neither of --id/--cidr is a usage error (clap's exit code 2).
    let out = env.run(&["ip-rules", "delete", "app"]);
    assert_eq!(out.code, Some(2));
    let out = env.run(&[
        "ip-rules",
        "delete",
        "app",
        "--id",
        &id,
        "--cidr",
        "10.0.0.0/8",
    ]);
    assert_eq!(out.code, Some(2));
    assert_eq!(
        env.snapshot(),
        before,
        "a refused command changed the state"
    );
}

#[test]
fn sixty_first_rule_is_refused() {
    let env = Env::new();
    env.create_db("app", "127.0.0.1:0", "127.0.0.1:5432");
    let now = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
    let sixty: Vec<IpRule> = (0..59)
        .map(|i| IpRule {
            id: format!("rule-{i}"),
            cidr: format!("10.{i}.0.0/16").parse().unwrap(),
            description: String::new(),
            created_at: now,
            updated_at: now,
        })
        .collect();
    std::fs::write(
        env.db_dir("app").join("ip-rules.yaml"),
        ip_rules_to_yaml(&sixty),
    )
    .unwrap();
    // The 60th lands through the CLI...
    env.run(&["ip-rules", "create", "app", "--cidr", "192.0.2.0/24"])
        .ok();
    assert_eq!(rules(&env).len(), 60);
    let before = env.snapshot();
    // ...the 61st does not.
    let out = env.run(&["ip-rules", "create", "app", "--cidr", "198.51.100.0/24"]);
    let e = out.error();
    assert!(e.contains("the maximum is 60"), "{e}");
    assert_eq!(env.snapshot(), before);
}

#[test]
fn concurrent_creates_all_land_and_the_file_stays_valid() {
    let env = Env::new();
    env.create_db("app", "127.0.0.1:0", "127.0.0.1:5432");
    let children: Vec<_> = (0..10)
        .map(|i| {
            let cidr = format!("10.{i}.0.0/16");
            env.command(&["ip-rules", "create", "app", "--cidr", &cidr])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let file = env.db_dir("app").join("ip-rules.yaml");
    let parsed = parse_ip_rules(&file, &std::fs::read_to_string(&file).unwrap()).unwrap();
    assert_eq!(parsed.len(), 10, "a concurrent write was lost");
    let mut cidrs: Vec<String> = parsed.iter().map(|r| r.cidr.to_string()).collect();
    cidrs.sort();
    let mut want: Vec<String> = (0..10).map(|i| format!("10.{i}.0.0/16")).collect();
    want.sort();
    assert_eq!(cidrs, want);
    let creates = env
        .audit_lines()
        .iter()
        .filter(|l| l["action"] == "ip_rule.create")
        .count();
    assert_eq!(creates, 10);
    // No temp files or staging folders were left behind.
    let stray: Vec<_> = env
        .snapshot()
        .into_keys()
        .filter(|p| p.to_string_lossy().contains(".tmp-") || p.to_string_lossy().contains(".new-"))
        .collect();
    assert!(stray.is_empty(), "{stray:?}");
}
