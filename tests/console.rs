//! `pgmtls console` over real HTTP: the real binary on a state directory made with the CLI,
//! a plain HTTP/1.1 client over a TCP stream. Every change the console makes must be the one
//! the CLI would make (same messages, same records, one audit line with the console's actor),
//! and every request without a session or without the session's CSRF token must change
//! nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cli_support;
mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, ChildStdout, Stdio};
use std::sync::{Arc, Mutex};

use cli_support::Env;
use serde_json::Value;

/// A running `pgmtls console`, ended when dropped.
struct Console {
    child: Child,
    addr: SocketAddr,
    token: String,
    stderr: Arc<Mutex<String>>,
    _stdout: BufReader<ChildStdout>,
}

impl Console {
    /// `pgmtls console` on the test's state directory.
    fn start(env: &Env) -> Console {
        Console::spawn(env.command(&["console"]))
    }

    fn spawn(mut cmd: std::process::Command) -> Console {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err = child.stderr.take().unwrap();
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
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
        let url = url.unwrap_or_else(|| {
            let _ = child.wait();
            panic!("no login URL; stderr: {}", stderr.lock().unwrap())
        });
        let rest = url.strip_prefix("http://").unwrap();
        let (hostport, query) = rest.split_once("/login?token=").unwrap();
        assert_eq!(query.len(), 64, "a 32-byte hex token: {url}");
        assert!(query.bytes().all(|b| b.is_ascii_hexdigit()));
        Console {
            child,
            addr: hostport.parse().unwrap(),
            token: query.to_owned(),
            stderr,
            _stdout: stdout,
        }
    }

    fn get(&self, path: &str, cookie: Option<&str>) -> Resp {
        http(self.addr, "GET", path, cookie, None)
    }

    fn post(&self, path: &str, cookie: Option<&str>, fields: &[(&str, &str)]) -> Resp {
        http(self.addr, "POST", path, cookie, Some(&form(fields)))
    }

    /// Logs in with the printed token: the session cookie and the page's CSRF value.
    fn login(&self) -> Login {
        let r = self.get(&format!("/login?token={}", self.token), None);
        assert_eq!(r.status, 303, "{}", r.body);
        assert_eq!(r.header("location"), Some("/"));
        let set = r.header("set-cookie").unwrap().to_owned();
        let cookie = set.split(';').next().unwrap().to_owned();
        let page = self.get("/", Some(&cookie));
        assert_eq!(page.status, 200, "{}", page.body);
        let csrf = field_value(&page.body, "csrf");
        Login {
            cookie,
            set_cookie: set,
            csrf,
        }
    }

    /// Waits for `needle` in the console's stderr (read by a thread, so a line the console
    /// wrote before answering may arrive here just after the answer).
    #[track_caller]
    fn expect_log(&self, needle: &str) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            if self.stderr.lock().unwrap().contains(needle) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{needle:?} not in the log: {}",
                self.stderr.lock().unwrap()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Login {
    cookie: String,
    set_cookie: String,
    csrf: String,
}

#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
    /// The body as sent (an archive is not text).
    bytes: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The page's text with maud's escapes undone, to compare messages with the CLI's.
    fn text(&self) -> String {
        self.body
            .replace("&quot;", "\"")
            .replace("&#39;", "'")
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&amp;", "&")
    }
}

/// One HTTP/1.1 request on its own connection, read to the end.
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    cookie: Option<&str>,
    body: Option<&str>,
) -> Resp {
    let mut s = TcpStream::connect(addr).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(c) = cookie {
        req.push_str(&format!("Cookie: {c}\r\n"));
    }
    if let Some(b) = body {
        req.push_str(&format!(
            "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(body.unwrap_or(""));
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> Resp {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut body = raw[split + 4..].to_vec();
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .map(|l| {
            let (k, v) = l.split_once(':').unwrap();
            (k.trim().to_ascii_lowercase(), v.trim().to_owned())
        })
        .collect();
    if headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"))
    {
        let mut out = Vec::new();
        let mut rest = body.as_slice();
        loop {
            let end = rest.windows(2).position(|w| w == b"\r\n").unwrap();
            let size = usize::from_str_radix(std::str::from_utf8(&rest[..end]).unwrap().trim(), 16)
                .unwrap();
            if size == 0 {
                break;
            }
            out.extend_from_slice(&rest[end + 2..end + 2 + size]);
            rest = &rest[end + 2 + size + 2..];
        }
        body = out;
    }
    Resp {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
        bytes: body,
    }
}

fn form(fields: &[(&str, &str)]) -> String {
    let enc = |s: &str| {
        s.bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect::<String>()
    };
    fields
        .iter()
        .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// The value of the first `<input name=NAME value=...>` of a page.
fn field_value(page: &str, name: &str) -> String {
    let at = page
        .find(&format!("name=\"{name}\" value=\""))
        .unwrap_or_else(|| panic!("no {name} field in {page}"));
    let rest = &page[at + name.len() + 15..];
    rest[..rest.find('"').unwrap()].to_owned()
}

/// A state directory with database `app`, made by the CLI.
fn env_with_app() -> Env {
    let env = Env::new();
    env.create_db("app", "127.0.0.1:0", "127.0.0.1:5432");
    env
}

fn cli_error(env: &Env, args: &[&str]) -> String {
    env.run(args)
        .error()
        .strip_prefix("pgmtls: error: ")
        .unwrap()
        .to_owned()
}

fn assert_security_headers(r: &Resp, what: &str) {
    for (name, value) in pgmtls::console::SECURITY_HEADERS {
        assert_eq!(
            r.header(name),
            Some(value),
            "{what}: {name} in {:?}",
            r.headers
        );
    }
}

const POSTS: [&str; 9] = [
    "/logout",
    "/mtls",
    "/databases/app/disable",
    "/databases/app/certificates/download",
    "/databases/app/ip-rules",
    "/databases/app/ip-rules/delete",
    "/databases/app/certificates",
    "/databases/app/certificates/revoke",
    "/databases/nosuch/ip-rules",
];

#[test]
fn every_route_refuses_without_a_session() {
    let env = env_with_app();
    let console = Console::start(&env);
    let before = env.snapshot();
    for cookie in [None, Some("pgmtls_console=00ff"), Some("other=1")] {
        for path in ["/", "/databases/app", "/databases/nosuch", "/no-such-page"] {
            let r = console.get(path, cookie);
            assert_eq!(r.status, 303, "GET {path} with {cookie:?}: {}", r.body);
            assert_eq!(r.header("location"), Some("/login"), "GET {path}");
            assert!(!r.body.contains("app"), "GET {path} leaks: {}", r.body);
            assert_security_headers(&r, path);
        }
        for path in POSTS {
            let r = console.post(
                path,
                cookie,
                &[
                    ("cidr", "10.0.0.0/8"),
                    ("id", "x"),
                    ("confirm", "yes"),
                    ("name", "app"),
                    ("csrf", "x"),
                ],
            );
            assert_eq!(r.status, 401, "POST {path} with {cookie:?}: {}", r.body);
            assert!(r.text().contains("nothing was changed"), "{}", r.body);
            assert_security_headers(&r, path);
        }
    }
    assert_eq!(
        env.snapshot(),
        before,
        "a refused request changed the state"
    );
    console.expect_log("no session");
    // The login page and the stylesheet are the only things served without a session.
    let r = console.get("/login", None);
    assert_eq!(r.status, 401);
    assert!(
        r.text().contains("Log in with the URL the console printed"),
        "{}",
        r.body
    );
    assert_security_headers(&r, "/login");
    let css = console.get("/style.css", None);
    assert_eq!(css.status, 200);
    assert_eq!(css.header("content-type"), Some("text/css; charset=utf-8"));
    assert_security_headers(&css, "/style.css");
    // Another name for the same address (DNS rebinding) is refused before anything else.
    let mut s = TcpStream::connect(console.addr).unwrap();
    s.write_all(b"GET /login HTTP/1.1\r\nHost: evil.example:80\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    assert_eq!(parse_response(&raw).status, 421);
}

#[test]
fn the_login_token_works_once_and_logout_ends_the_session() {
    let env = env_with_app();
    let console = Console::start(&env);
    let wrong = console.get(&format!("/login?token={}", "0".repeat(64)), None);
    assert_eq!(wrong.status, 401);
    assert!(wrong.header("set-cookie").is_none());
    let login = console.login();
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=43200"] {
        assert!(
            login.set_cookie.contains(attr),
            "{attr}: {}",
            login.set_cookie
        );
    }
    let id = login.cookie.strip_prefix("pgmtls_console=").unwrap();
    assert_eq!(id.len(), 64);
    assert!(!id.contains(&console.token), "the cookie is not the token");
    let again = console.get(&format!("/login?token={}", console.token), None);
    assert_eq!(again.status, 401, "the token works once: {}", again.body);
    assert!(again.header("set-cookie").is_none());
    console.expect_log("login refused from 127.0.0.1");
    console.expect_log("(2 refused since start)");
    let page = console.get("/", Some(&login.cookie));
    assert_eq!(page.status, 200);
    assert!(
        page.body.contains("href=\"/databases/app\""),
        "{}",
        page.body
    );
    assert!(page
        .text()
        .contains("Refused login attempts since the console started: 2"));
    assert_security_headers(&page, "/");
    assert_eq!(
        page.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    // Logout is a POST with the CSRF value; afterwards the cookie opens nothing.
    let out = console.post("/logout", Some(&login.cookie), &[("csrf", &login.csrf)]);
    assert_eq!(out.status, 303);
    assert!(out.header("set-cookie").unwrap().contains("Max-Age=0"));
    let after = console.get("/", Some(&login.cookie));
    assert_eq!(after.status, 303);
    assert_eq!(after.header("location"), Some("/login"));
}

#[test]
fn repeated_bad_tokens_lock_the_login() {
    let env = env_with_app();
    let console = Console::start(&env);
    for i in 0..5 {
        let r = console.get(&format!("/login?token=bad{i}"), None);
        assert_eq!(r.status, 401, "attempt {i}");
    }
    // Locked: even the right token is refused, and it is not used up by the refusal.
    let r = console.get(&format!("/login?token={}", console.token), None);
    assert_eq!(r.status, 429, "{}", r.body);
    assert!(r.header("set-cookie").is_none());
    assert!(r.header("retry-after").is_some());
    assert!(r.text().contains("logins are locked"), "{}", r.body);
    console.expect_log("locked after 5 bad tokens");
}

#[test]
fn a_post_without_the_sessions_csrf_token_changes_nothing() {
    let env = env_with_app();
    let id = env.run(&["certificates", "create", "app", "--json"]).json()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let console = Console::start(&env);
    let login = console.login();
    let before = env.snapshot();
    let wrong = "f".repeat(64);
    for csrf in [
        None,
        Some(""),
        Some(wrong.as_str()),
        Some(&login.csrf[..63]),
    ] {
        let with = |mut f: Vec<(&'static str, String)>| {
            if let Some(c) = csrf {
                f.push(("csrf", c.to_owned()));
            }
            f
        };
        let forms: [(&str, Vec<(&str, String)>); 7] = [
            (
                "/mtls",
                with(vec![
                    ("name", "other".into()),
                    ("listen", "127.0.0.1:0".into()),
                    ("upstream", "127.0.0.1:5432".into()),
                    ("confirm", "other".into()),
                ]),
            ),
            (
                "/databases/app/disable",
                with(vec![("confirm", "app".into())]),
            ),
            (
                "/databases/app/ip-rules",
                with(vec![("cidr", "10.0.0.0/8".into())]),
            ),
            (
                "/databases/app/certificates/revoke",
                with(vec![("id", id.clone()), ("confirm", "yes".into())]),
            ),
            ("/databases/app/certificates", with(vec![])),
            (
                "/databases/app/ip-rules/delete",
                with(vec![("id", "x".into()), ("confirm", "yes".into())]),
            ),
            ("/logout", with(vec![])),
        ];
        for (path, fields) in forms {
            let f: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let r = console.post(path, Some(&login.cookie), &f);
            assert_eq!(r.status, 403, "POST {path} with csrf {csrf:?}: {}", r.body);
            assert!(r.text().contains("nothing was changed"), "{}", r.body);
            assert_security_headers(&r, path);
        }
    }
    assert_eq!(
        env.snapshot(),
        before,
        "a POST without the CSRF token changed the state"
    );
    console.expect_log("missing CSRF token");
    console.expect_log("wrong CSRF token");
    // The session survived the refused logout, and with the right token the same form works.
    let ok = console.post(
        "/databases/app/ip-rules",
        Some(&login.cookie),
        &[("cidr", "10.0.0.0/8"), ("csrf", &login.csrf)],
    );
    assert_eq!(ok.status, 303, "{}", ok.body);
    assert_ne!(env.snapshot(), before);
}

#[test]
fn a_rule_added_and_deleted_in_the_console_is_the_clis() {
    let env = env_with_app();
    let console = Console::start(&env);
    let login = console.login();
    let audit_before = env.audit_lines().len();
    let r = console.post(
        "/databases/app/ip-rules",
        Some(&login.cookie),
        &[
            ("cidr", "203.0.113.0/24"),
            ("description", "Office <VPN> & co"),
            ("csrf", &login.csrf),
        ],
    );
    assert_eq!(r.status, 303, "{}", r.body);
    assert_eq!(r.header("location"), Some("/databases/app"));
    let rules = env.run(&["ip-rules", "app", "--json"]).json();
    let rules = rules.as_array().unwrap();
    assert_eq!(rules.len(), 1);
    assert_eq!(rules[0]["cidr"], "203.0.113.0/24");
    assert_eq!(rules[0]["description"], "Office <VPN> & co");
    let rule_id = rules[0]["id"].as_str().unwrap().to_owned();
    let audit = env.audit_lines();
    assert_eq!(audit.len(), audit_before + 1, "one audit record per change");
    let last = audit.last().unwrap();
    assert_eq!(last["action"], "ip_rule.create");
    assert_eq!(last["database"], "app");
    assert_eq!(last["details"]["id"], Value::String(rule_id.clone()));
    let actor = last["actor"].as_str().unwrap();
    let label = actor
        .strip_prefix("console:")
        .and_then(|a| a.strip_suffix("@127.0.0.1"))
        .unwrap_or_else(|| panic!("actor {actor}"));
    assert_eq!(label.len(), 8);
    assert!(
        !login.cookie.contains(label),
        "the actor names no part of the cookie"
    );
    // The page shows the rule (escaped), the count, the notice and the audit record.
    let page = console.get("/databases/app", Some(&login.cookie));
    assert_eq!(page.status, 200);
    assert!(
        page.body.contains("Office &lt;VPN&gt; &amp; co"),
        "{}",
        page.body
    );
    assert!(page.text().contains("1 of 60 rules"));
    assert!(page
        .text()
        .contains(&format!("Added IP rule {rule_id} for 203.0.113.0/24")));
    assert!(
        page.body.contains(actor),
        "the activity list names the actor"
    );
    assert!(page.body.contains("ip_rule.create"));
    // Delete without ticking the confirmation: refused inline, nothing changed.
    let before = env.snapshot();
    let r = console.post(
        "/databases/app/ip-rules/delete",
        Some(&login.cookie),
        &[("id", &rule_id), ("csrf", &login.csrf)],
    );
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.text().contains("tick \"confirm\""), "{}", r.body);
    assert_eq!(env.snapshot(), before);
    let r = console.post(
        "/databases/app/ip-rules/delete",
        Some(&login.cookie),
        &[("id", &rule_id), ("confirm", "yes"), ("csrf", &login.csrf)],
    );
    assert_eq!(r.status, 303, "{}", r.body);
    assert_eq!(
        env.run(&["ip-rules", "app", "--json"]).json(),
        Value::Array(vec![])
    );
    let last = env.audit_lines().pop().unwrap();
    assert_eq!(last["action"], "ip_rule.delete");
    assert_eq!(last["actor"], actor);
    // An id the database does not have: the CLI's message, inline.
    let r = console.post(
        "/databases/app/ip-rules/delete",
        Some(&login.cookie),
        &[("id", &rule_id), ("confirm", "yes"), ("csrf", &login.csrf)],
    );
    assert_eq!(r.status, 404);
    let cli = cli_error(&env, &["ip-rules", "delete", "app", "--id", &rule_id]);
    assert!(r.text().contains(&cli), "{cli} not in {}", r.body);
}

#[test]
fn bad_input_gets_the_clis_message_inline_and_changes_nothing() {
    let env = env_with_app();
    let console = Console::start(&env);
    let login = console.login();
    let long = "d".repeat(256);
    let cases: [(&str, &str, &str, u16); 4] = [
        ("app", "10.0.0.1/8", "", 400),
        ("app", "not-a-cidr", "", 400),
        ("app", "10.0.0.0/8", long.as_str(), 400),
        ("nosuch", "10.0.0.0/8", "", 404),
    ];
    let before = env.snapshot();
    for (db, cidr, description, status) in cases {
        let cli = cli_error(
            &env,
            &[
                "ip-rules",
                "create",
                db,
                "--cidr",
                cidr,
                "--description",
                description,
            ],
        );
        let r = console.post(
            &format!("/databases/{db}/ip-rules"),
            Some(&login.cookie),
            &[
                ("cidr", cidr),
                ("description", description),
                ("csrf", &login.csrf),
            ],
        );
        assert_eq!(r.status, status, "{db} {cidr}: {}", r.body);
        assert!(
            r.text().contains(&cli),
            "{cli:?} not in the page: {}",
            r.body
        );
        if db == "app" {
            // Inline, by the form, with what was typed kept in it.
            assert!(r.body.contains("id=\"rule-error\""), "{}", r.body);
            assert!(r.body.contains(&format!("value=\"{cidr}\"")), "{}", r.body);
        }
        assert_eq!(env.snapshot(), before, "{db} {cidr} changed the state");
    }
    assert!(
        cli_error(&env, &["ip-rules", "create", "app", "--cidr", "10.0.0.1/8"])
            .contains("did you mean 10.0.0.0/8")
    );
    // The 61st rule.
    let now = time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap();
    let rules: Vec<pgmtls::state::IpRule> = (0..60)
        .map(|i| pgmtls::state::IpRule {
            id: format!("rule-{i}"),
            cidr: format!("10.{i}.0.0/16").parse().unwrap(),
            description: String::new(),
            created_at: now,
            updated_at: now,
        })
        .collect();
    std::fs::write(
        env.db_dir("app").join("ip-rules.yaml"),
        pgmtls::state::ip_rules_to_yaml(&rules),
    )
    .unwrap();
    let page = console.get("/databases/app", Some(&login.cookie));
    assert!(page.text().contains("60 of 60 rules"), "{}", page.body);
    assert!(page.text().contains("maximum of 60 rules"));
    let before = env.snapshot();
    let cli = cli_error(
        &env,
        &["ip-rules", "create", "app", "--cidr", "192.0.2.0/24"],
    );
    assert!(cli.contains("the maximum is 60"), "{cli}");
    let r = console.post(
        "/databases/app/ip-rules",
        Some(&login.cookie),
        &[("cidr", "192.0.2.0/24"), ("csrf", &login.csrf)],
    );
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(r.text().contains(&cli), "{}", r.body);
    assert_eq!(env.snapshot(), before);
}

#[test]
fn certificates_created_and_revoked_in_the_console_are_the_clis() {
    let env = env_with_app();
    let id = env.run(&["certificates", "create", "app", "--json"]).json()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let certificates_before = listed_count(&env);
    let console = Console::start(&env);
    let login = console.login();
    let page = console.get("/databases/app", Some(&login.cookie));
    assert!(page.body.contains(&id), "{}", page.body);
    // Revoke without the confirmation: refused, nothing changed.
    let before = env.snapshot();
    let r = console.post(
        "/databases/app/certificates/revoke",
        Some(&login.cookie),
        &[("id", &id), ("csrf", &login.csrf)],
    );
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("id=\"certificate-error\""), "{}", r.body);
    assert_eq!(env.snapshot(), before);
    let r = console.post(
        "/databases/app/certificates/revoke",
        Some(&login.cookie),
        &[("id", &id), ("confirm", "yes"), ("csrf", &login.csrf)],
    );
    assert_eq!(r.status, 303, "{}", r.body);
    let status = |id: &str| {
        let listed = env.run(&["certificates", "app", "--json"]).json();
        let one = listed
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["id"] == id)
            .cloned();
        one.map(|c| c["status"].as_str().unwrap().to_owned())
    };
    assert_eq!(status(&id).as_deref(), Some("revoked"));
    let last = env.audit_lines().pop().unwrap();
    assert_eq!(last["action"], "certificate.revoke");
    assert!(last["actor"].as_str().unwrap().starts_with("console:"));
    // Revoking it again: the CLI's refusal, inline.
    let cli = cli_error(&env, &["certificates", "revoke", "app", "--id", &id]);
    let r = console.post(
        "/databases/app/certificates/revoke",
        Some(&login.cookie),
        &[("id", &id), ("confirm", "yes"), ("csrf", &login.csrf)],
    );
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(r.text().contains(&cli), "{cli} not in {}", r.body);
    // Create one through the form, with a common name.
    let r = console.post(
        "/databases/app/certificates",
        Some(&login.cookie),
        &[("common_name", "reporting"), ("csrf", &login.csrf)],
    );
    assert_eq!(r.status, 303, "{}", r.body);
    let last = env.audit_lines().pop().unwrap();
    assert_eq!(last["action"], "certificate.create");
    assert_eq!(last["details"]["common_name"], "reporting");
    let new_id = last["details"]["id"].as_str().unwrap();
    assert_eq!(status(new_id).as_deref(), Some("ready"));
    assert_eq!(listed_count(&env), certificates_before + 1);
}

/// The entries of a tar archive: name, recorded mode, contents.
fn untar(bytes: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
    let mut archive = tar::Archive::new(bytes);
    archive
        .entries()
        .unwrap()
        .map(|e| {
            let mut e = e.unwrap();
            let name = e.path().unwrap().display().to_string();
            let mode = e.header().mode().unwrap();
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            (name, mode, data)
        })
        .collect()
}

#[test]
fn a_certificate_downloaded_in_the_console_is_the_clis_four_files_in_one_tar() {
    let env = env_with_app();
    let id = env.run(&["certificates", "create", "app", "--json"]).json()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let console = Console::start(&env);
    let login = console.login();
    let page = console.get("/databases/app", Some(&login.cookie));
    assert!(
        page.body.contains("/databases/app/certificates/download"),
        "{}",
        page.body
    );
    // The page shows the CLI's connect line for the default prefix.
    assert!(
        page.text().contains(
            "sslcert=app_postgresql.crt sslkey=app_postgresql.key sslrootcert=app_root.crt"
        ),
        "{}",
        page.body
    );
    assert!(page.text().contains("PGSSLMODE=verify-ca"), "{}", page.body);
    // Without the CSRF token: refused, no archive, no audit record.
    let audit_before = env.audit_lines().len();
    let r = console.post(
        "/databases/app/certificates/download",
        Some(&login.cookie),
        &[("id", &id), ("prefix", "demo_")],
    );
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(!r.body.contains("postgresql.key"));
    assert_eq!(env.audit_lines().len(), audit_before);
    // A prefix with a '/' is refused with the CLI's reason.
    let r = console.post(
        "/databases/app/certificates/download",
        Some(&login.cookie),
        &[("id", &id), ("prefix", "../x"), ("csrf", &login.csrf)],
    );
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(
        r.text().contains("prefix must not contain '/'"),
        "{}",
        r.body
    );
    assert_eq!(env.audit_lines().len(), audit_before);

    let r = console.post(
        "/databases/app/certificates/download",
        Some(&login.cookie),
        &[("id", &id), ("prefix", "demo_"), ("csrf", &login.csrf)],
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("cache-control"), Some("no-store"));
    assert_eq!(r.header("content-type"), Some("application/x-tar"));
    let disposition = r.header("content-disposition").unwrap();
    assert!(disposition.starts_with("attachment;"), "{disposition}");
    let entries = untar(&r.bytes);
    let listed: Vec<(&str, u32)> = entries.iter().map(|(n, m, _)| (n.as_str(), *m)).collect();
    assert_eq!(
        listed,
        [
            ("demo_postgresql.crt", 0o644),
            ("demo_postgresql.key", 0o600),
            ("demo_root.crt", 0o644),
            ("demo_postgresql.pk8", 0o600),
        ]
    );
    // The same bytes the CLI writes.
    let dir = tempfile::tempdir().unwrap();
    env.run(&[
        "certificates",
        "download",
        "app",
        "--id",
        &id,
        "--prefix",
        "demo_",
        "--dir",
        dir.path().to_str().unwrap(),
    ])
    .ok();
    for (name, _, data) in &entries {
        assert_eq!(
            &std::fs::read(dir.path().join(name)).unwrap(),
            data,
            "{name} differs from the CLI's"
        );
    }
    // The .pk8 is DER PKCS#8 of the same key as the PEM.
    let pem = std::str::from_utf8(&entries[1].2).unwrap();
    let from_pem = rcgen::KeyPair::from_pem(pem).unwrap();
    let der = rustls_pki_types::PrivateKeyDer::Pkcs8(rustls_pki_types::PrivatePkcs8KeyDer::from(
        entries[3].2.clone(),
    ));
    let from_der = rcgen::KeyPair::try_from(&der).unwrap();
    assert_eq!(from_pem.public_key_pem(), from_der.public_key_pem());
    // One audit record with the console's actor (the CLI's download added one more).
    let lines = env.audit_lines();
    let console_line = &lines[audit_before];
    assert_eq!(console_line["action"], "certificate.download");
    assert_eq!(console_line["database"], "app");
    assert_eq!(console_line["details"]["id"], id.as_str());
    assert!(
        console_line["actor"]
            .as_str()
            .unwrap()
            .starts_with("console:"),
        "{console_line}"
    );
    // A revoked certificate is not handed out.
    let r = console.post(
        "/databases/app/certificates/revoke",
        Some(&login.cookie),
        &[("id", &id), ("confirm", "yes"), ("csrf", &login.csrf)],
    );
    assert_eq!(r.status, 303, "{}", r.body);
    let r = console.post(
        "/databases/app/certificates/download",
        Some(&login.cookie),
        &[("id", &id), ("prefix", ""), ("csrf", &login.csrf)],
    );
    assert_ne!(r.status, 200, "{}", r.body);
    assert!(r.text().contains("is revoked"), "{}", r.body);
}

#[test]
fn psql_connects_through_the_proxy_with_the_files_of_the_console_download() {
    use common::pg::{pg_available_or_skip, PgServer, APP_DB, APP_PASSWORD, APP_USER};
    if !pg_available_or_skip() {
        return;
    }
    let pg = PgServer::start();
    let env = Env::new();
    env.create_db("app", "127.0.0.1:0", &pg.addr().to_string());
    env.run(&["ip-rules", "create", "app", "--cidr", "127.0.0.1/32"])
        .ok();
    let id = env.run(&["certificates", "app", "--json"]).json()[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let console = Console::start(&env);
    let login = console.login();
    let r = console.post(
        "/databases/app/certificates/download",
        Some(&login.cookie),
        &[("id", &id), ("prefix", "app_"), ("csrf", &login.csrf)],
    );
    assert_eq!(r.status, 200, "{}", r.body);
    // Unpacked as `tar -xpf` would: libpq refuses a key readable by group or others.
    let dir = tempfile::tempdir().unwrap();
    let mut archive = tar::Archive::new(r.bytes.as_slice());
    archive.set_preserve_permissions(true);
    archive.unpack(dir.path()).unwrap();
    let key = dir.path().join("app_postgresql.key");
    assert_eq!(cli_support::mode(&key), 0o600);

    let config = env.dir.path().join("pgmtls.yaml");
    std::fs::write(
        &config,
        format!(
            "state_dir: {}\nadmin_listen: \"off\"\nlog_format: json\n",
            env.state.display()
        ),
    )
    .unwrap();
    let proxy = common::proxy::ProxyProcess::spawn(&["--config", config.to_str().unwrap()]);
    let out = common::clients::Psql::new(
        pg.psql_path(),
        "127.0.0.1",
        proxy.addrs["app"].port(),
        APP_USER,
        APP_DB,
    )
    .verify_ca(
        &dir.path().join("app_root.crt"),
        Some((
            dir.path().join("app_postgresql.crt").as_path(),
            key.as_path(),
        )),
    )
    .password(APP_PASSWORD)
    .run("SELECT 'downloaded in the console'");
    assert_eq!(out.expect_ok(), "downloaded in the console");
}

#[test]
fn mtls_enabled_and_disabled_in_the_console_is_the_clis() {
    let env = Env::new();
    let taken = cli_support::free_listen();
    env.create_db("app", &taken, "127.0.0.1:5432");
    let console = Console::start(&env);
    let login = console.login();
    let page = console.get("/", Some(&login.cookie));
    assert!(page.body.contains("action=\"/mtls\""), "{}", page.body);
    assert!(
        page.text().contains("recorded in the audit log"),
        "{}",
        page.body
    );
    let free = cli_support::free_listen();
    let enable = |name: &str, listen: &str, upstream: &str, confirm: &str| {
        console.post(
            "/mtls",
            Some(&login.cookie),
            &[
                ("name", name),
                ("listen", listen),
                ("upstream", upstream),
                ("server_name", ""),
                ("confirm", confirm),
                ("csrf", &login.csrf),
            ],
        )
    };
    // Bad input: the CLI's message by the form, the typed values kept, nothing written.
    let before = env.snapshot();
    for (name, listen, upstream) in [
        ("Bad Name", free.as_str(), "127.0.0.1:5432"),
        ("new", taken.as_str(), "127.0.0.1:5432"),
        ("new", free.as_str(), "192.0.2.10:5432"),
    ] {
        let cli = cli_error(
            &env,
            &[
                "mtls",
                "create",
                name,
                "--listen",
                listen,
                "--upstream",
                upstream,
                "--confirm",
                name,
            ],
        );
        let r = enable(name, listen, upstream, name);
        assert!(
            r.status == 400 || r.status == 409,
            "{name} {listen} {upstream}: {}",
            r.body
        );
        assert!(r.body.contains("id=\"enable-error\""), "{}", r.body);
        assert!(r.text().contains(&cli), "{cli} not in {}", r.body);
        assert!(
            r.text().contains(upstream),
            "typed upstream kept: {}",
            r.body
        );
        assert_eq!(env.snapshot(), before, "{name} {listen} {upstream}");
    }
    // Without the name typed again: refused.
    let r = enable("new", &free, "127.0.0.1:5432", "");
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(
        r.text().contains("to enable mTLS: nothing was changed"),
        "{}",
        r.body
    );
    assert_eq!(env.snapshot(), before);
    // Without CSRF: refused.
    let r = console.post(
        "/mtls",
        Some(&login.cookie),
        &[
            ("name", "new"),
            ("listen", &free),
            ("upstream", "127.0.0.1:5432"),
            ("confirm", "new"),
        ],
    );
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(env.snapshot(), before);

    let r = enable("new", &free, "127.0.0.1:5432", "new");
    assert_eq!(r.status, 303, "{}", r.body);
    assert_eq!(r.header("location"), Some("/databases/new"));
    assert!(env.db_dir("new").exists());
    let last = env.audit_lines().pop().unwrap();
    assert_eq!(last["database"], "new");
    assert!(
        last["actor"].as_str().unwrap().starts_with("console:"),
        "{last}"
    );
    let shown = env.run(&["mtls", "new", "--json"]).json();
    assert_eq!(shown["listen"], free.as_str(), "{shown}");
    let page = console.get("/databases/new", Some(&login.cookie));
    assert!(page.text().contains("Enabled mTLS on new"), "{}", page.body);

    // Disable: the name typed again, else nothing changes.
    let r = console.post(
        "/databases/new/disable",
        Some(&login.cookie),
        &[("confirm", "app"), ("csrf", &login.csrf)],
    );
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("id=\"disable-error\""), "{}", r.body);
    assert!(env.db_dir("new").exists());
    let r = console.post(
        "/databases/new/disable",
        Some(&login.cookie),
        &[("confirm", "new"), ("csrf", &login.csrf)],
    );
    assert_eq!(r.status, 303, "{}", r.body);
    assert!(!env.db_dir("new").exists());
    let last = env.audit_lines().pop().unwrap();
    assert_eq!(last["database"], "new");
    assert!(
        last["actor"].as_str().unwrap().starts_with("console:"),
        "{last}"
    );
    let page = console.get("/", Some(&login.cookie));
    assert!(
        page.text().contains("Disabled mTLS on new"),
        "{}",
        page.body
    );
    assert!(env.db_dir("app").exists());
}

/// The enable form takes every flag of `mtls create`: a bad value in each is refused with the
/// CLI's message by the form and nothing written; good values are recorded as the CLI
/// records them.
#[test]
fn the_enable_form_takes_every_flag_of_mtls_create_with_the_clis_messages() {
    let env = env_with_app();
    let console = Console::start(&env);
    let login = console.login();
    let free = cli_support::free_listen();
    let garbage = env.dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    let long_cn = "a".repeat(70);
    let enable = |extra: &[(&str, &str)]| {
        let mut fields = vec![
            ("name", "new"),
            ("listen", free.as_str()),
            ("upstream", "127.0.0.1:5432"),
            ("confirm", "new"),
            ("csrf", login.csrf.as_str()),
        ];
        fields.extend_from_slice(extra);
        console.post("/mtls", Some(&login.cookie), &fields)
    };
    let cli = |extra: &[&str]| {
        let mut args = vec![
            "mtls",
            "create",
            "new",
            "--listen",
            free.as_str(),
            "--upstream",
            "127.0.0.1:5432",
            "--confirm",
            "new",
        ];
        args.extend_from_slice(extra);
        let out = env.run(&args);
        match out.code {
            // clap's usage error, on several lines.
            Some(2) => out.stderr,
            _ => out.error().to_owned(),
        }
    };
    let before = env.snapshot();
    // Refused by the CLI's check (src/control): the message after `pgmtls: error: `, verbatim.
    let g = garbage.to_str().unwrap();
    for (form, flags) in [
        (
            vec![("upstream_tls", "verify-full")],
            vec!["--upstream-tls", "verify-full"],
        ),
        (
            vec![
                ("upstream_tls", "verify-full"),
                ("upstream_ca", "not a certificate"),
            ],
            vec!["--upstream-tls", "verify-full", "--upstream-ca", g],
        ),
        (
            vec![("upstream_server_name", "bad name")],
            vec!["--upstream-server-name", "bad name"],
        ),
        (
            vec![("common_name", long_cn.as_str())],
            vec!["--common-name", long_cn.as_str()],
        ),
        (
            vec![("server_name", "bad_name!")],
            vec!["--server-name", "bad_name!"],
        ),
    ] {
        let message = cli(&flags);
        let message = message.strip_prefix("pgmtls: error: ").unwrap();
        let r = enable(&form);
        assert_eq!(r.status, 400, "{form:?}: {}", r.body);
        let error = r.body.split("id=\"enable-error\"").nth(1).unwrap_or("");
        let error = error.split_once('>').map(|(_, e)| e).unwrap_or("");
        let error = Resp {
            status: 0,
            headers: Vec::new(),
            body: error.split("</p>").next().unwrap().to_owned(),
            bytes: Vec::new(),
        }
        .text();
        assert_eq!(error, message, "{form:?}");
        // The typed values are kept, and "more options" is open when one of them was typed.
        assert!(r.text().contains(form[0].1), "{form:?}: {}", r.body);
        assert_eq!(
            r.body.contains("<details open"),
            form[0].0 != "server_name",
            "{form:?}: {}",
            r.body
        );
        assert_eq!(env.snapshot(), before, "{form:?}");
    }
    // Refused by clap for the CLI (a value outside the list): the same parser's words.
    let r = enable(&[("upstream_tls", "bogus")]);
    assert_eq!(r.status, 400, "{}", r.body);
    let clap = cli(&["--upstream-tls", "bogus"]);
    let reason = clap
        .split("<MODE>': ")
        .nth(1)
        .unwrap()
        .lines()
        .next()
        .unwrap();
    assert!(
        r.text().contains(&format!("--upstream-tls: {reason}")),
        "{reason} not in {}",
        r.body
    );
    let r = enable(&[("key_type", "p999")]);
    assert_eq!(r.status, 400, "{}", r.body);
    let clap = cli(&["--key-type", "p999"]);
    assert!(
        clap.contains("[possible values: p256, p384, rsa2048, rsa4096]"),
        "{clap}"
    );
    assert!(
        r.text().contains(
            "--key-type: unknown key type \"p999\"; expected one of p256, p384, rsa2048, rsa4096"
        ),
        "{}",
        r.body
    );
    assert_eq!(env.snapshot(), before);

    // Every option at once, as the CLI records it.
    let ca = std::fs::read_to_string(env.db_dir("app").join("ca.crt")).unwrap();
    let r = enable(&[
        ("upstream_tls", "verify-full"),
        ("upstream_ca", ca.as_str()),
        ("upstream_server_name", "db.internal"),
        ("user_must_match_cn", "yes"),
        ("key_type", "p384"),
        ("common_name", "alice"),
        ("server_name", "db.example.com, 10.0.0.5"),
    ]);
    assert_eq!(r.status, 303, "{}", r.body);
    let shown = env.run(&["mtls", "new", "--json"]).json();
    assert_eq!(shown["upstream_tls"], "verify-full", "{shown}");
    assert_eq!(shown["user_must_match_cn"], true, "{shown}");
    assert_eq!(
        shown["server_names"],
        serde_json::json!(["db.example.com", "10.0.0.5", "127.0.0.1"]),
        "{shown}"
    );
    assert_eq!(shown["certificates"][0]["common_name"], "alice", "{shown}");
    assert_eq!(shown["certificates"][0]["key_type"], "p384", "{shown}");
    let yaml = std::fs::read_to_string(env.db_dir("new").join("database.yaml")).unwrap();
    assert!(yaml.contains("upstream_server_name: db.internal"), "{yaml}");
    let copied = std::fs::read_to_string(env.db_dir("new").join("upstream-ca.crt")).unwrap();
    assert_eq!(copied.trim(), ca.trim());
    // Plaintext to an upstream off loopback only with the box ticked, as with the flag.
    let other = cli_support::free_listen();
    let remote = |extra: &[(&str, &str)]| {
        let mut fields = vec![
            ("name", "remote"),
            ("listen", other.as_str()),
            ("upstream", "192.0.2.10:5432"),
            ("confirm", "remote"),
            ("csrf", login.csrf.as_str()),
        ];
        fields.extend_from_slice(extra);
        console.post("/mtls", Some(&login.cookie), &fields)
    };
    assert_eq!(
        remote(&[("allow_plaintext_remote_upstream", "on")]).status,
        400
    );
    let r = remote(&[("allow_plaintext_remote_upstream", "yes")]);
    assert_eq!(r.status, 303, "{}", r.body);
    let yaml = std::fs::read_to_string(env.db_dir("remote").join("database.yaml")).unwrap();
    assert!(
        yaml.contains("allow_plaintext_remote_upstream: true"),
        "{yaml}"
    );
}

fn listed_count(env: &Env) -> usize {
    env.run(&["certificates", "app", "--json"])
        .json()
        .as_array()
        .unwrap()
        .len()
}

#[test]
fn a_non_loopback_listen_is_refused() {
    let env = env_with_app();
    let out = env.run(&["console", "--listen", "0.0.0.0:0"]);
    let e = out.error();
    assert!(e.contains("--listen 0.0.0.0:0"), "{e}");
    assert!(e.contains("not a loopback address"), "{e}");
    assert!(e.contains("the console has no TLS"), "{e}");
}

/// The same flows in a real browser: headless Chromium (Debian's `chromium`) driven by
/// playwright-core (`tests/browser`, installed by `.ci/run`), with page JavaScript off. The
/// changes it makes must then be what the CLI shows, with the console's actor.
#[test]
fn a_browser_logs_in_changes_rules_and_certificates_and_logs_out() {
    let browser_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    let chromium = std::env::var("PGMTLS_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        std::path::Path::new(&chromium).exists(),
        "{chromium} missing: `apt-get install chromium` (.ci/run does)"
    );
    assert!(
        browser_dir.join("node_modules/playwright-core").exists(),
        "playwright-core missing: `npm ci --prefix tests/browser` (.ci/run does)"
    );
    let env = env_with_app();
    let certificates_before = listed_count(&env);
    let console = Console::start(&env);
    let shots = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("console-screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let login_url = format!("http://{}/login?token={}", console.addr, console.token);
    let out = std::process::Command::new("node")
        .arg(browser_dir.join("console.mjs"))
        .arg(&login_url)
        .arg(&shots)
        .env("PGMTLS_CHROMIUM", &chromium)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "browser run failed:\n{}\n{}\nconsole log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        console.stderr.lock().unwrap()
    );
    eprintln!("screenshots in {}", shots.display());
    for name in [
        "databases-1280",
        "rule-error-1280",
        "database-1280",
        "database-390",
    ] {
        let png = std::fs::read(shots.join(format!("{name}.png"))).unwrap();
        assert!(png.starts_with(b"\x89PNG"), "{name}.png");
    }
    // What the browser did is what the CLI sees: the rule added and deleted, one certificate
    // revoked, each change one audit record by the console's session.
    assert_eq!(
        env.run(&["ip-rules", "app", "--json"]).json(),
        Value::Array(vec![])
    );
    let listed = env.run(&["certificates", "app", "--json"]).json();
    let revoked = listed
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["status"] == "revoked")
        .count();
    assert_eq!(revoked, 1);
    assert_eq!(listed_count(&env), certificates_before);
    let audit = env.audit_lines();
    let by_console: Vec<&str> = audit
        .iter()
        .filter(|a| a["actor"].as_str().unwrap().starts_with("console:"))
        .map(|a| a["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        by_console,
        ["ip_rule.create", "ip_rule.delete", "certificate.revoke"]
    );
}

/// With an `etcd:` config the console changes etcd, as the CLI does there: a rule added in the
/// page is what `ip-rules` reads from etcd, its audit key names the console's session, and the
/// page's activity list reads the audit keys back.
#[test]
fn on_etcd_a_rule_added_in_the_console_is_in_etcd_with_its_audit_record() {
    if !common::etcd::etcd_available_or_skip() {
        return;
    }
    let etcd = common::etcd::EtcdServer::start();
    let env = env_with_app();
    env.run(&[
        "state",
        "import",
        "--etcd-endpoints",
        &etcd.endpoint(),
        "--etcd-prefix",
        "/pgmtls",
    ])
    .ok();
    let config = env.dir.path().join("pgmtls.yaml");
    std::fs::write(
        &config,
        format!(
            "etcd:\n  endpoints: [{}]\n  prefix: /pgmtls\n",
            etcd.endpoint()
        ),
    )
    .unwrap();
    let on_etcd = |args: &[&str]| {
        let mut cmd = env.command(args);
        cmd.env_remove("PGMTLS_STATE_DIR")
            .env("PGMTLS_CONFIG", &config);
        cmd
    };
    let dir_before = env.snapshot();
    let console = Console::spawn(on_etcd(&["console"]));
    let login = console.login();
    let r = console.post(
        "/databases/app/ip-rules",
        Some(&login.cookie),
        &[
            ("cidr", "198.51.100.0/24"),
            ("description", "etcd"),
            ("csrf", &login.csrf),
        ],
    );
    assert_eq!(r.status, 303, "{}", r.body);
    let out = on_etcd(&["ip-rules", "app", "--json"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rules: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rules[0]["cidr"], "198.51.100.0/24");
    assert_eq!(
        env.snapshot(),
        dir_before,
        "the directory is not the state any more"
    );
    let page = console.get("/databases/app", Some(&login.cookie));
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(page.text().contains("1 of 60 rules"), "{}", page.body);
    let activity = &page.body[page.body.find("id=\"activity\"").unwrap()..];
    assert!(
        activity.contains("console:") && activity.contains("ip_rule.create"),
        "{activity}"
    );
    // The same refusal as the CLI's, from etcd's state.
    let cli = on_etcd(&["ip-rules", "create", "app", "--cidr", "198.51.100.0/24"])
        .output()
        .unwrap();
    let cli = String::from_utf8_lossy(&cli.stderr);
    let cli = cli.trim().strip_prefix("pgmtls: error: ").unwrap();
    let r = console.post(
        "/databases/app/ip-rules",
        Some(&login.cookie),
        &[("cidr", "198.51.100.0/24"), ("csrf", &login.csrf)],
    );
    assert_eq!(r.status, 409);
    assert!(r.text().contains(cli), "{cli} not in {}", r.body);
}

/// The Activity section against a real proxy and Postgres: a psql session held open is listed
/// with its client, certificate and user; connections from an address no rule admits show up
/// as `ip_not_allowed` refusals with their count in the chart and its text; with the proxy
/// gone, both say `unknown` and why, and the counts already sampled stay.
#[test]
fn the_activity_section_shows_live_sessions_and_refusals_from_the_proxy() {
    use common::pg::{pg_available_or_skip, PgServer, APP_DB, APP_PASSWORD, APP_USER};
    if !pg_available_or_skip() {
        return;
    }
    let pg = PgServer::start();
    let env = Env::new();
    env.create_db("app", "127.0.0.1:0", &pg.addr().to_string());
    env.run(&["ip-rules", "create", "app", "--cidr", "127.0.0.1/32"])
        .ok();
    let id = env.run(&["certificates", "app", "--json"]).json()[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let files = env.dir.path().join("files");
    env.run(&[
        "certificates",
        "download",
        "app",
        "--id",
        &id,
        "--dir",
        files.to_str().unwrap(),
    ])
    .ok();
    let config = env.dir.path().join("pgmtls.yaml");
    std::fs::write(
        &config,
        format!(
            "state_dir: {}\nadmin_listen: 127.0.0.1:0\nlog_format: json\n",
            env.state.display()
        ),
    )
    .unwrap();
    let mut proxy = common::proxy::ProxyProcess::spawn(&["--config", config.to_str().unwrap()]);
    let admin = format!("http://{}", proxy.admin());
    let console = Console::spawn(env.command(&["console", "--admin-url", &admin]));
    let login = console.login();
    let page = console.get("/databases/app", Some(&login.cookie));
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(
        page.body.contains("No live sessions on the proxy at"),
        "{}",
        page.body
    );
    assert!(page.body.contains("No refusals since"), "{}", page.body);

    // A session held open by a query that sleeps.
    let psql = common::clients::Psql::new(
        pg.psql_path(),
        "127.0.0.1",
        proxy.addrs["app"].port(),
        APP_USER,
        APP_DB,
    )
    .verify_ca(
        &files.join("root.crt"),
        Some((
            files.join("postgresql.crt").as_path(),
            files.join("postgresql.key").as_path(),
        )),
    );
    let mut held = std::process::Command::new(pg.psql_path())
        .args(["-X", "-A", "-t", "-w", "-d"])
        .arg(psql.conninfo())
        .args(["-c", "SELECT pg_sleep(120)"])
        .env("PGPASSWORD", APP_PASSWORD)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let page = loop {
        let page = console.get("/databases/app", Some(&login.cookie));
        if page.body.contains(">active<") {
            break page;
        }
        assert!(std::time::Instant::now() < deadline, "{}", page.body);
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let sessions = page.body.split("Live sessions").nth(1).unwrap();
    let sessions = sessions.split("Refusals in the last hour").next().unwrap();
    assert!(sessions.contains("<code>127.0.0.1:"), "{sessions}");
    assert!(
        sessions.contains(&format!("<code class=\"id\">{id}</code>")),
        "{sessions}"
    );
    assert!(
        sessions.contains(&format!("<td>{APP_USER}</td>")),
        "{sessions}"
    );
    assert!(
        sessions.contains(&format!("<td>{APP_DB}</td>")),
        "{sessions}"
    );

    // Three connections from an address no rule admits, counted by the proxy first.
    for _ in 0..3 {
        let sock =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        sock.bind(&"127.0.0.2:0".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        sock.connect(&proxy.addrs["app"].into()).unwrap();
        let mut s: TcpStream = sock.into();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let series = "pgmtls_connections_refused_total{database=\"app\",reason=\"ip_not_allowed\"} 3";
    loop {
        let m = http(proxy.admin(), "GET", "/metrics", None, None);
        if m.body.contains(series) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{}", m.body);
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let page = console.get("/databases/app", Some(&login.cookie));
    let refusals = page.body.split("Refusals in the last hour").nth(1).unwrap();
    assert!(
        refusals.contains(
            "aria-label=\"ip_not_allowed, per 5 minutes, oldest first: 0, 0, 0, 0, 0, 0, 0, 0, \
             0, 0, 0, 3\""
        ),
        "{refusals}"
    );
    assert!(refusals.contains("<td class=\"num\">3</td>"), "{refusals}");
    assert!(refusals.contains("<svg class=\"bars\""), "{refusals}");

    // The proxy goes: unknown, and why; what was sampled stays.
    let _ = held.kill();
    let _ = held.wait();
    proxy.signal("KILL");
    let _ = proxy.wait_exit(std::time::Duration::from_secs(20));
    let page = console.get("/databases/app", Some(&login.cookie));
    let sessions = page.body.split("Live sessions").nth(1).unwrap();
    assert!(
        sessions.contains("unknown: cannot connect to"),
        "{sessions}"
    );
    assert!(
        sessions.contains("unknown: the last sample of the proxy&#39;s metrics failed")
            || sessions.contains("unknown: the last sample of the proxy's metrics failed"),
        "{sessions}"
    );
    assert!(sessions.contains("<td class=\"num\">3</td>"), "{sessions}");
}

/// The reference's whole flow in a real browser against a real proxy and Postgres
/// (`tests/browser/e2e.mjs`): log in with the printed URL, enable mTLS for a database from the
/// keyboard, add a rule and wait for the proxy to authorize it, download the bundle, connect the
/// real psql with the downloaded files and the page's psql line, revoke the certificate in the
/// page and see psql refused with "certificate revoked", delete the rule. Screenshots of every
/// page at 1280x800 and 390 px, axe-core on every page.
#[test]
fn a_browser_runs_the_references_flow_against_a_real_proxy() {
    use common::pg::{pg_available_or_skip, PgServer, APP_DB, APP_PASSWORD, APP_USER};
    if !pg_available_or_skip() {
        return;
    }
    let browser_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    let chromium = std::env::var("PGMTLS_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        std::path::Path::new(&chromium).exists(),
        "{chromium} missing: `apt-get install chromium` (.ci/run does)"
    );
    let pg = PgServer::start();
    // A state directory (with a database of its own) for the proxy to serve from the start.
    let env = env_with_app();
    let config = env.dir.path().join("pgmtls.yaml");
    std::fs::write(
        &config,
        format!(
            "state_dir: {}\nadmin_listen: 127.0.0.1:0\nlog_format: json\n",
            env.state.display()
        ),
    )
    .unwrap();
    let proxy = common::proxy::ProxyProcess::spawn(&["--config", config.to_str().unwrap()]);
    let admin = format!("http://{}", proxy.admin());
    let console = Console::spawn(env.command(&["console", "--admin-url", &admin]));
    let shots = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("console-e2e-screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let work = tempfile::tempdir().unwrap();
    let login_url = format!("http://{}/login?token={}", console.addr, console.token);
    let listen = cli_support::free_listen();
    let mut node = std::process::Command::new("node");
    node.arg(browser_dir.join("e2e.mjs"))
        .arg(&login_url)
        .arg(&shots)
        .arg(work.path())
        .arg(pg.psql_path())
        .arg(&listen)
        .arg(pg.addr().to_string())
        .arg(APP_USER)
        .arg(APP_DB)
        .env("PGMTLS_CHROMIUM", &chromium)
        .env("HOME", &env.home);
    for var in common::pg::libpq_env_vars() {
        node.env_remove(var);
    }
    let out = node.env("PGPASSWORD", APP_PASSWORD).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "browser run failed:\n{stdout}\n{}\nconsole log:\n{}\nproxy log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        console.stderr.lock().unwrap(),
        proxy.log_text()
    );
    eprintln!("{stdout}screenshots in {}", shots.display());
    assert!(stdout.contains("psql refused:"), "{stdout}");
    for page in [
        "databases",
        "database",
        "database-after",
        "rule-error",
        "databases-after",
    ] {
        for width in ["1280", "390"] {
            let png = std::fs::read(shots.join(format!("{page}-{width}.png"))).unwrap();
            assert!(png.starts_with(b"\x89PNG"), "{page}-{width}.png");
        }
    }
    // What the browser did is the CLI's: the database enabled, its rule gone, its first
    // certificate revoked, each change one audit record by the console's session.
    assert_eq!(
        env.run(&["ip-rules", "web", "--json"]).json(),
        Value::Array(vec![])
    );
    let by_console: Vec<String> = env
        .audit_lines()
        .iter()
        .filter(|a| a["actor"].as_str().unwrap().starts_with("console:"))
        .map(|a| a["action"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        by_console,
        [
            "mtls.create",
            "ip_rule.create",
            "certificate.download",
            "certificate.revoke",
            "ip_rule.delete"
        ]
    );
    // The proxy refused the revoked certificate with its reason.
    let m = http(proxy.admin(), "GET", "/metrics", None, None);
    assert!(
        m.body.lines().any(|l| l.starts_with(
            "pgmtls_connections_refused_total{database=\"web\",reason=\"client_cert_revoked\"}"
        ) && !l.ends_with(" 0")),
        "{}",
        m.body
    );
}
