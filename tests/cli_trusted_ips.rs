//! `pgmtls trusted-ips`: the same shape as `pgmtls ip-rules` (create, list, get, delete,
//! `--json`, status words), the same validation and messages, at most 20 per database, and
//! every change audited.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cli_support;

use cli_support::Env;
use pgmtls::state::{trusted_ips_to_yaml, IpRule, StateDir, TrustedIp};
use time::OffsetDateTime;

fn trusted(env: &Env) -> Vec<TrustedIp> {
    StateDir::new(&env.state)
        .load_database("app")
        .unwrap()
        .trusted_ips
}

#[test]
fn trusted_range_is_created_listed_fetched_and_deleted() {
    let env = Env::new();
    env.create_db("app", "127.0.0.1:0", "127.0.0.1:5432");
    let empty = env.run(&["trusted-ips", "app"]).ok().to_owned();
    assert!(
        empty.contains("No trusted IP ranges for database app"),
        "{empty}"
    );
    let out = env.run(&[
        "trusted-ips",
        "create",
        "app",
        "--cidr",
        "198.51.100.0/24",
        "--description",
        "VPC peering",
    ]);
    let block = out.ok().to_owned();
    assert_eq!(
        out.stderr.trim(),
        "Creating trusted IP range for database app... done"
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
            "trusted-ips",
            "create",
            "app",
            "--cidr",
            "2001:db8::/48",
            "--json",
        ])
        .json();
    assert_eq!(v6["cidr"], "2001:db8::/48");
    assert_eq!(v6["status"], "unknown");

    let table = env.run(&["trusted-ips", "app"]).ok().to_owned();
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("ID") && lines[0].contains("CIDR") && lines[0].contains("Status"),
        "{table}"
    );
    assert!(
        lines[2].starts_with(&id) && lines[2].contains("VPC peering"),
        "{table}"
    );
    assert_eq!(lines.len(), 4, "{table}");
    assert_eq!(env.run(&["trusted-ips", "list", "app"]).ok(), table);
    let listed = env.run(&["trusted-ips", "app", "--json"]).json();
    assert_eq!(listed.as_array().unwrap().len(), 2);

    let got = env
        .run(&["trusted-ips", "get", "app", "--id", &id, "--json"])
        .json();
    assert_eq!(got["cidr"], "198.51.100.0/24");
    assert_eq!(got["description"], "VPC peering");

    // The trusted ranges are their own list: the IP rules are untouched.
    let db = StateDir::new(&env.state).load_database("app").unwrap();
    assert!(db.rules.is_empty());
    assert_eq!(db.trusted_ips.len(), 2);
    assert!(env.db_dir("app").join("trusted-ips.yaml").is_file());

    let deleted = env
        .run(&["trusted-ips", "delete", "app", "--id", &id, "--json"])
        .json();
    assert_eq!(deleted["deleted"], true);
    assert_eq!(deleted["cidr"], "198.51.100.0/24");
    let out = env.run(&["trusted-ips", "delete", "app", "--cidr", "2001:db8::/48"]);
    assert!(
        out.ok().contains("closes the sessions it admitted"),
        "{}",
        out.stdout
    );
    assert!(trusted(&env).is_empty());

    let actions: Vec<String> = env
        .audit_lines()
        .iter()
        .map(|l| l["action"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        actions,
        [
            "mtls.create",
            "trusted_ip.create",
            "trusted_ip.create",
            "trusted_ip.delete",
            "trusted_ip.delete"
        ]
    );
    let created = &env.audit_lines()[1];
    assert_eq!(created["actor"], "tester");
    assert_eq!(created["details"]["cidr"], "198.51.100.0/24");
    assert_eq!(created["details"]["id"], id.as_str());
}

#[test]
fn bad_input_gets_the_ip_rules_messages_and_changes_nothing() {
    let env = Env::new();
    env.create_db("app", "127.0.0.1:0", "127.0.0.1:5432");
    env.run(&["trusted-ips", "create", "app", "--cidr", "10.0.0.0/8"])
        .ok();
    let before = env.snapshot();
    let long = "x".repeat(256);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["trusted-ips", "create", "app", "--cidr", "10.0.0.1/8"],
            "10.0.0.1/8 has host bits set; did you mean 10.0.0.0/8?",
        ),
        (
            vec!["trusted-ips", "create", "app", "--cidr", "2001:db8::1/48"],
            "did you mean 2001:db8::/48?",
        ),
        (
            vec!["trusted-ips", "create", "app", "--cidr", "banana"],
            "\"banana\" is not a CIDR block (expected e.g. 203.0.113.7/32 or 2001:db8::/48)",
        ),
        (
            vec!["trusted-ips", "create", "app", "--cidr", "10.0.0.0/33"],
            "is not a CIDR block",
        ),
        (
            vec!["trusted-ips", "create", "app", "--cidr", "10.0.0.0/8"],
            "a trusted IP range for 10.0.0.0/8 already exists (id ",
        ),
        (
            vec![
                "trusted-ips",
                "create",
                "app",
                "--cidr",
                "::ffff:10.0.0.0/104",
            ],
            "write it as 10.0.0.0/8",
        ),
        (
            vec![
                "trusted-ips",
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
                "trusted-ips",
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
            vec!["trusted-ips", "create", "nope", "--cidr", "10.9.0.0/16"],
            "unknown database \"nope\"",
        ),
        (vec!["trusted-ips", "nope"], "unknown database"),
        (
            vec!["trusted-ips", "get", "app", "--id", "nope"],
            "no trusted IP range with id \"nope\" for database app",
        ),
        (
            vec!["trusted-ips", "delete", "app", "--id", "nope"],
            "no trusted IP range with id \"nope\" for database app",
        ),
        (
            vec!["trusted-ips", "delete", "app", "--cidr", "10.1.0.0/16"],
            "no trusted IP range for 10.1.0.0/16 in database app",
        ),
        (
            vec!["trusted-ips", "delete", "app", "--cidr", "10.0.0.5/8"],
            "did you mean",
        ),
    ];
    for (args, want) in &cases {
        let e = env.run(args).error().to_owned();
        assert!(
            e.contains(want),
            "`{}`: expected {want:?} in {e:?}",
            args.join(" ")
        );
        // The message is the one `ip-rules` gives for the same CIDR.
        if args[1] == "create" && args[2] == "app" && args.len() == 5 && !want.contains("exists") {
            let mut same = args.clone();
            same[0] = "ip-rules";
            assert_eq!(env.run(&same).error(), e, "`{}`", same.join(" "));
        }
    }
    assert_eq!(env.run(&["trusted-ips", "delete", "app"]).code, Some(2));
    assert_eq!(
        env.snapshot(),
        before,
        "a refused command changed the state"
    );
}

#[test]
fn twenty_first_range_is_refused_and_an_overlapping_rule_is_pointed_out() {
    let env = Env::new();
    env.create_db("app", "127.0.0.1:0", "127.0.0.1:5432");
    let now = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
    let nineteen: Vec<IpRule> = (0..19)
        .map(|i| IpRule {
            id: format!("range-{i}"),
            cidr: format!("10.{i}.0.0/16").parse().unwrap(),
            description: String::new(),
            created_at: now,
            updated_at: now,
        })
        .collect();
    std::fs::write(
        env.db_dir("app").join("trusted-ips.yaml"),
        trusted_ips_to_yaml(&nineteen),
    )
    .unwrap();
    env.run(&["ip-rules", "create", "app", "--cidr", "192.0.2.7/32"])
        .ok();
    // The 20th lands, with a note that the IP rule inside it still wants a certificate...
    let out = env.run(&["trusted-ips", "create", "app", "--cidr", "192.0.2.0/24"]);
    out.ok();
    assert!(
        out.stderr.contains("192.0.2.7/32) overlaps 192.0.2.0/24: addresses it covers still need a client certificate"),
        "{}",
        out.stderr
    );
    assert_eq!(trusted(&env).len(), 20);
    let before = env.snapshot();
    // ...the 21st does not.
    let e = env
        .run(&["trusted-ips", "create", "app", "--cidr", "198.51.100.0/24"])
        .error()
        .to_owned();
    assert_eq!(
        e,
        "pgmtls: error: database app already has 20 trusted IP ranges, the maximum is 20; delete \
         one first",
    );
    assert_eq!(env.snapshot(), before);
}

#[test]
fn a_bad_trusted_ranges_file_is_named_with_its_field() {
    let env = Env::new();
    env.create_db("app", "127.0.0.1:0", "127.0.0.1:5432");
    let file = env.db_dir("app").join("trusted-ips.yaml");
    // A rules file copied into its place is refused, not read as trusted ranges.
    std::fs::write(&file, "rules: []\n").unwrap();
    let e = env.run(&["trusted-ips", "app"]).error().to_owned();
    assert!(e.contains("trusted-ips.yaml"), "{e}");
    std::fs::write(
        &file,
        "trusted_ips:\n  - id: a\n    cidr: 10.0.0.1/8\n    created_at: 2026-01-01T00:00:00Z\n    updated_at: 2026-01-01T00:00:00Z\n",
    )
    .unwrap();
    let e = env.run(&["trusted-ips", "app"]).error().to_owned();
    assert!(
        e.contains("trusted-ips.yaml:2: trusted_ips[0].cidr: 10.0.0.1/8 has host bits set"),
        "{e}"
    );
}

/// One HTTP/1.0 request (so the answer is not chunked) to the console; the raw answer.
fn http_get(addr: &str, path: &str, cookie: Option<&str>) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let mut req = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n");
    if let Some(c) = cookie {
        req.push_str(&format!("Cookie: {c}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    String::from_utf8_lossy(&raw).into_owned()
}

#[test]
fn the_console_database_page_lists_the_trusted_ranges_read_only() {
    use std::io::BufRead;
    let env = Env::new();
    env.create_db("app", "127.0.0.1:0", "127.0.0.1:5432");
    let id = env
        .run(&[
            "trusted-ips",
            "create",
            "app",
            "--cidr",
            "198.51.100.0/24",
            "--description",
            "VPC <peering>",
            "--json",
        ])
        .json()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut child = env
        .command(&["console"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    // The login line is the readiness signal: the listener is bound before it is printed.
    let mut url = None;
    for _ in 0..5 {
        let mut line = String::new();
        if stdout.read_line(&mut line).unwrap() == 0 {
            break;
        }
        if let Some(u) = line.trim().strip_prefix("Log in (once) with: ") {
            url = Some(u.to_owned());
            break;
        }
    }
    let url = url.expect("the console prints its login URL");
    let rest = url.strip_prefix("http://").unwrap();
    let (addr, _) = rest.split_once('/').unwrap();
    let login = http_get(addr, &format!("/{}", rest.split_once('/').unwrap().1), None);
    let cookie = login
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .starts_with("set-cookie:")
                .then(|| l[11..].trim().split(';').next().unwrap().to_owned())
        })
        .unwrap_or_else(|| panic!("no session cookie: {login}"));
    let page = http_get(addr, "/databases/app", Some(&cookie));
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        page.starts_with("HTTP/1.0 200") || page.starts_with("HTTP/1.1 200"),
        "{page}"
    );
    // The section alone: the activity list further down names the range too.
    let start = page
        .find("Trusted IP ranges")
        .expect("a trusted ranges section");
    let end = start + page[start..].find("Client certificates").unwrap();
    let section = &page[start..end];
    assert!(section.contains(&id), "{section}");
    assert!(section.contains("198.51.100.0/24"), "{section}");
    assert!(section.contains("VPC &lt;peering&gt;"), "{section}");
    // Read-only: no form posts to a trusted-ips path.
    assert!(!page.contains("/trusted-ips\""), "{page}");
}
