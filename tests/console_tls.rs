//! Who may use `pgmtls console`: the real binary over real TLS (rustls as the client), with
//! the console's certificate and the operators' CA from a test PKI. A listen address other
//! than loopback needs `console_tls`; under TLS the session cookie is `Secure`; with
//! `client_ca_file` only a certificate from that CA gets a handshake, and it is the login; a
//! token read from a file works once; and every refusal is logged with its reason and counted
//! in the console's `/metrics`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cli_support;
mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cli_support::Env;
use common::pki::{Role, TestPki};
use rustls::pki_types::ServerName;

/// A running console, ended when dropped.
struct Console {
    child: Child,
    port: u16,
    /// The line after `pgmtls console: serving ` (the URL) and the login line.
    serving: String,
    login_line: String,
    stderr: Arc<Mutex<String>>,
    _stdout: BufReader<ChildStdout>,
}

impl Console {
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
        // The two start-up lines are the readiness signal: the listener is bound before.
        let mut lines = Vec::new();
        for _ in 0..2 {
            let mut line = String::new();
            if stdout.read_line(&mut line).unwrap() == 0 {
                break;
            }
            lines.push(line.trim().to_owned());
        }
        if lines.len() < 2 {
            let _ = child.wait();
            panic!(
                "no start-up lines ({lines:?}); stderr: {}",
                stderr.lock().unwrap()
            );
        }
        let serving = lines[0]
            .strip_prefix("pgmtls console: serving ")
            .unwrap_or_else(|| panic!("{lines:?}"))
            .to_owned();
        let port = serving
            .trim_end_matches('/')
            .rsplit(':')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        Console {
            child,
            port,
            serving,
            login_line: lines[1].clone(),
            stderr,
            _stdout: stdout,
        }
    }

    /// The token in the printed login URL.
    fn token(&self) -> String {
        self.login_line
            .split("/login?token=")
            .nth(1)
            .unwrap()
            .to_owned()
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    #[track_caller]
    fn expect_log(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self.stderr.lock().unwrap().contains(needle) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{needle:?} not in the log: {}",
                self.stderr.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `GET /metrics` over plain HTTP (a console without TLS) or TLS with `client`.
    fn refusals(&self, tls: Option<&Client>) -> Vec<(String, u64)> {
        let r = match tls {
            None => plain(self.addr(), "GET", "/metrics", None, None),
            Some(c) => c
                .request(self.addr(), "GET", "/metrics", None, None)
                .unwrap(),
        };
        assert_eq!(r.status, 200, "{}", r.body);
        r.body
            .lines()
            .filter_map(|l| l.strip_prefix("pgmtls_console_refusals_total{reason=\""))
            .map(|l| {
                let (reason, n) = l.split_once("\"} ").unwrap();
                (reason.to_owned(), n.parse().unwrap())
            })
            .collect()
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn request_bytes(
    host: &str,
    method: &str,
    path: &str,
    cookie: Option<&str>,
    body: Option<&str>,
) -> Vec<u8> {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
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
    req.into_bytes()
}

fn parse(raw: &[u8]) -> Resp {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP head in {:?}", String::from_utf8_lossy(raw)));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    Resp {
        status,
        headers,
        body: String::from_utf8_lossy(&raw[split + 4..]).into_owned(),
    }
}

/// Plain HTTP/1.1 on its own connection.
fn plain(
    addr: SocketAddr,
    method: &str,
    path: &str,
    cookie: Option<&str>,
    body: Option<&str>,
) -> Resp {
    plain_host(addr, &addr.to_string(), method, path, cookie, body)
}

fn plain_host(
    addr: SocketAddr,
    host: &str,
    method: &str,
    path: &str,
    cookie: Option<&str>,
    body: Option<&str>,
) -> Resp {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(&request_bytes(host, method, path, cookie, body))
        .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    parse(&raw)
}

/// A TLS client trusting the test CA (the console's certificate names `localhost` and
/// `127.0.0.1`), with an optional client certificate.
struct Client {
    config: Arc<rustls::ClientConfig>,
}

impl Client {
    fn new(pki: &TestPki, identity: Option<&Role>) -> Client {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(pki.ca.cert_der()).unwrap();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let config = match identity {
            Some(r) => builder
                .with_client_auth_cert(r.chain_der(), r.key_der())
                .unwrap(),
            None => builder.with_no_client_auth(),
        };
        Client {
            config: Arc::new(config),
        }
    }

    /// One request on its own TLS connection; `Err` when the handshake (or the connection)
    /// fails before any answer.
    fn request(
        &self,
        addr: SocketAddr,
        method: &str,
        path: &str,
        cookie: Option<&str>,
        body: Option<&str>,
    ) -> Result<Resp, String> {
        self.request_host(addr, &addr.to_string(), method, path, cookie, body)
    }

    fn request_host(
        &self,
        addr: SocketAddr,
        host: &str,
        method: &str,
        path: &str,
        cookie: Option<&str>,
        body: Option<&str>,
    ) -> Result<Resp, String> {
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let conn = rustls::ClientConnection::new(self.config.clone(), name).unwrap();
        let tcp = TcpStream::connect(addr).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        tls.write_all(&request_bytes(host, method, path, cookie, body))
            .map_err(|e| e.to_string())?;
        let mut raw = Vec::new();
        match tls.read_to_end(&mut raw) {
            Ok(_) => {}
            // A peer that closes without close_notify after a whole answer.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
            Err(e) => return Err(e.to_string()),
        }
        if raw.is_empty() {
            return Err("connection closed without an answer".into());
        }
        Ok(parse(&raw))
    }
}

/// The console's certificate and key, and the operators' CA, as files next to a
/// `pgmtls.yaml` that names them (relative paths: resolved against the file's folder).
fn write_config(env: &Env, pki: &TestPki, client_ca: Option<&Role>, extra: &str) -> PathBuf {
    let dir = env.dir.path();
    std::fs::copy(&pki.server.chain_path, dir.join("console.crt")).unwrap();
    std::fs::write(dir.join("console.key"), &pki.server.key_pem).unwrap();
    std::fs::set_permissions(dir.join("console.key"), PermissionsExt::from_mode(0o600)).unwrap();
    let mut tls = "console_tls:\n  cert_file: console.crt\n  key_file: console.key\n".to_owned();
    if let Some(ca) = client_ca {
        std::fs::copy(&ca.cert_path, dir.join("operators.crt")).unwrap();
        tls.push_str("  client_ca_file: operators.crt\n");
    }
    let file = dir.join("pgmtls.yaml");
    std::fs::write(
        &file,
        format!("state_dir: state\nadmin_listen: \"off\"\n{tls}{extra}"),
    )
    .unwrap();
    file
}

fn env_with_app() -> Env {
    let env = Env::new();
    env.create_db("app", "127.0.0.1:0", "127.0.0.1:5432");
    env
}

fn csrf_of(page: &str) -> String {
    let at = page.find("name=\"csrf\" value=\"").unwrap() + "name=\"csrf\" value=\"".len();
    page[at..].split('"').next().unwrap().to_owned()
}

fn count(refusals: &[(String, u64)], reason: &str) -> u64 {
    refusals
        .iter()
        .find(|(r, _)| r == reason)
        .unwrap_or_else(|| panic!("no reason {reason} in {refusals:?}"))
        .1
}

#[test]
fn a_non_loopback_listen_needs_console_tls() {
    let env = env_with_app();
    let out = env.run(&["console", "--listen", "0.0.0.0:0"]);
    let e = out.error();
    assert!(
        e.contains("--listen 0.0.0.0:0: not a loopback address"),
        "{e}"
    );
    assert!(e.contains("the console has no TLS"), "{e}");
    assert!(e.contains("console_tls in pgmtls.yaml"), "{e}");
    // Every address of 127/8 is loopback, as the operating system routes it.
    let pki = TestPki::new();
    let config = write_config(&env, &pki, None, "");
    let mut cmd = env.command(&["console", "--listen", "0.0.0.0:0"]);
    cmd.arg("--config").arg(&config);
    let console = Console::spawn(cmd);
    assert!(
        console.serving.starts_with("https://"),
        "{}",
        console.serving
    );
}

#[test]
fn over_tls_the_login_sets_a_secure_cookie_and_plaintext_is_refused() {
    let env = env_with_app();
    let pki = TestPki::new();
    let config = write_config(&env, &pki, None, "");
    // A wildcard listen: the rule for addresses other than loopback is what lets it through.
    let mut cmd = env.command(&["console", "--listen", "0.0.0.0:0"]);
    cmd.arg("--config").arg(&config);
    let console = Console::spawn(cmd);
    // The printed URL names the certificate's host, which a browser can verify.
    assert_eq!(
        console.serving,
        format!("https://localhost:{}/", console.port)
    );
    assert!(
        console.login_line.starts_with(&format!(
            "Log in (once) with: https://localhost:{}/login?token=",
            console.port
        )),
        "{}",
        console.login_line
    );
    let client = Client::new(&pki, None);
    let addr = console.addr();
    let r = client
        .request(
            addr,
            "GET",
            &format!("/login?token={}", console.token()),
            None,
            None,
        )
        .unwrap();
    assert_eq!(r.status, 303, "{}", r.body);
    let set = r.header("set-cookie").unwrap();
    assert!(set.contains("; Secure"), "{set}");
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Strict"),
        "{set}"
    );
    let cookie = set.split(';').next().unwrap();
    let page = client
        .request(addr, "GET", "/", Some(cookie), None)
        .unwrap();
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(page.body.contains("app"), "{}", page.body);
    // Logout clears the cookie with the same attributes.
    let csrf = csrf_of(&page.body);
    let out = client
        .request(
            addr,
            "POST",
            "/logout",
            Some(cookie),
            Some(&format!("csrf={csrf}")),
        )
        .unwrap();
    assert_eq!(out.status, 303);
    assert!(out.header("set-cookie").unwrap().contains("; Secure"));

    // Plain HTTP to the TLS port gets no answer, and is logged and counted.
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(&request_bytes(&addr.to_string(), "GET", "/", None, None))
        .unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    assert!(
        !String::from_utf8_lossy(&raw).contains("HTTP/1.1"),
        "{raw:?}"
    );
    console.expect_log("TLS handshake failed");
    console.expect_log("(reason tls_handshake)");
    let refusals = console.refusals(Some(&client));
    assert_eq!(count(&refusals, "tls_handshake"), 1, "{refusals:?}");
    assert_eq!(count(&refusals, "client_certificate"), 0, "{refusals:?}");
}

#[test]
fn with_a_client_ca_only_its_certificates_get_in_and_are_the_login() {
    let env = env_with_app();
    let pki = TestPki::new();
    let config = write_config(&env, &pki, Some(&pki.ca), "");
    let mut cmd = env.command(&["console"]);
    cmd.arg("--config").arg(&config);
    let console = Console::spawn(cmd);
    assert!(
        console
            .login_line
            .starts_with("Log in with a client certificate from ")
            && console
                .login_line
                .ends_with(&format!("https://127.0.0.1:{}/login", console.port)),
        "{}",
        console.login_line
    );
    let addr = console.addr();

    // No certificate: no handshake, so no page, not even the login page.
    let none = Client::new(&pki, None);
    assert!(none.request(addr, "GET", "/login", None, None).is_err());
    console.expect_log("no client certificate");
    // A certificate from another CA: refused the same way.
    let other = Client::new(&pki, Some(&pki.other_ca_client));
    assert!(other.request(addr, "GET", "/login", None, None).is_err());
    console.expect_log("client certificate not accepted");

    // The operator's certificate: `/login` starts a session, no token asked.
    let alice = Client::new(&pki, Some(&pki.client));
    let r = alice.request(addr, "GET", "/login", None, None).unwrap();
    assert_eq!(r.status, 303, "{}", r.body);
    let set = r.header("set-cookie").unwrap().to_owned();
    assert!(set.contains("; Secure"), "{set}");
    let cookie = set.split(';').next().unwrap().to_owned();
    console.expect_log("with client certificate CN=app-client serial ");
    let page = alice
        .request(addr, "GET", "/", Some(&cookie), None)
        .unwrap();
    assert_eq!(page.status, 200, "{}", page.body);
    // A change made in the session is the CLI's, with the session as actor.
    let csrf = csrf_of(&page.body);
    let added = alice
        .request(
            addr,
            "POST",
            "/databases/app/ip-rules",
            Some(&cookie),
            Some(&format!(
                "csrf={csrf}&cidr=10.1.0.0%2F16&description=office"
            )),
        )
        .unwrap();
    assert_eq!(added.status, 303, "{}", added.body);
    let listed = env.run(&["ip-rules", "list", "app", "--json"]).json();
    assert_eq!(listed[0]["cidr"], "10.1.0.0/16", "{listed}");

    // The cookie is bound to the certificate: another operator's certificate from the same
    // CA does not carry alice's session.
    let now = time::OffsetDateTime::now_utc();
    let bob_role = pki.issue_client(
        "bob",
        now - time::Duration::hours(1),
        now + time::Duration::days(1),
    );
    let bob = Client::new(&pki, Some(&bob_role));
    let r = bob.request(addr, "GET", "/", Some(&cookie), None).unwrap();
    assert_eq!(r.status, 303, "{}", r.body);
    assert_eq!(r.header("location"), Some("/login"));
    let r = bob
        .request(
            addr,
            "POST",
            "/databases/app/ip-rules",
            Some(&cookie),
            Some(&format!("csrf={csrf}&cidr=10.2.0.0%2F16&description=x")),
        )
        .unwrap();
    assert_eq!(r.status, 401, "{}", r.body);
    assert_eq!(
        env.run(&["ip-rules", "list", "app", "--json"])
            .json()
            .as_array()
            .unwrap()
            .len(),
        1
    );

    let refusals = console.refusals(Some(&alice));
    assert_eq!(count(&refusals, "client_certificate"), 2, "{refusals:?}");
    assert_eq!(count(&refusals, "no_session"), 1, "{refusals:?}");
    let metrics = alice
        .request(addr, "GET", "/metrics", None, None)
        .unwrap()
        .body;
    assert!(
        metrics.contains("pgmtls_console_sessions_total 1"),
        "{metrics}"
    );
}

#[test]
fn bad_tls_files_are_refused_at_start_naming_the_setting_and_the_file() {
    let env = env_with_app();
    let pki = TestPki::new();
    let config = write_config(&env, &pki, Some(&pki.ca), "");
    let dir = env.dir.path();
    let run = |args: &[&str]| {
        let mut cmd = env.command(&["console"]);
        cmd.arg("--config").arg(&config).args(args);
        let out = cmd.output().unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let key = dir.join("console.key");
    std::fs::set_permissions(&key, PermissionsExt::from_mode(0o644)).unwrap();
    let e = run(&[]);
    assert!(
        e.contains(&format!(
            "{}: console_tls.key_file: private key has permissions 0644",
            key.display()
        )),
        "{e}"
    );
    std::fs::set_permissions(&key, PermissionsExt::from_mode(0o600)).unwrap();
    let cert = dir.join("console.crt");
    std::fs::write(&cert, "not a certificate\n").unwrap();
    let e = run(&[]);
    assert!(
        e.contains(&format!(
            "{}: console_tls.cert_file: no PEM certificate found",
            cert.display()
        )),
        "{e}"
    );
    std::fs::copy(&pki.server.chain_path, &cert).unwrap();
    let ca = dir.join("operators.crt");
    std::fs::remove_file(&ca).unwrap();
    let e = run(&[]);
    assert!(
        e.contains(&format!(
            "{}: console_tls.client_ca_file: cannot read",
            ca.display()
        )),
        "{e}"
    );
    // The flags name themselves; a key that is not the certificate's is refused.
    let other_key = dir.join("other.key");
    std::fs::write(&other_key, &pki.other_ca.key_pem).unwrap();
    std::fs::set_permissions(&other_key, PermissionsExt::from_mode(0o600)).unwrap();
    let e = run(&[
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        other_key.to_str().unwrap(),
    ]);
    assert!(
        e.contains(&format!(
            "{}: --tls-key: certificate and key do not go together",
            other_key.display()
        )),
        "{e}"
    );
    // A bad console_tls value names the key and the line.
    std::fs::write(&config, "state_dir: state\nconsole_tls: {cert_file: a}\n").unwrap();
    let e = run(&[]);
    assert!(
        e.contains("pgmtls.yaml:2: console_tls: must be a mapping with cert_file, key_file"),
        "{e}"
    );
}

#[test]
fn a_token_file_logs_in_once_and_bad_token_files_are_refused() {
    let env = env_with_app();
    let file = env.dir.path().join("token");
    let token = "0123456789abcdef0123456789abcdef-operator";
    std::fs::write(&file, format!("{token}\n")).unwrap();
    std::fs::set_permissions(&file, PermissionsExt::from_mode(0o600)).unwrap();
    let mut cmd = env.command(&["console", "--token-file"]);
    cmd.arg(&file);
    let console = Console::spawn(cmd);
    // The token is not printed: the point of a file is that stdout may be captured.
    assert_eq!(
        console.login_line,
        format!(
            "Log in (once) with the token in {}: http://127.0.0.1:{}/login?token=TOKEN",
            file.display(),
            console.port
        )
    );
    let addr = console.addr();
    let r = plain(addr, "GET", &format!("/login?token={token}"), None, None);
    assert_eq!(r.status, 303, "{}", r.body);
    let cookie = r.header("set-cookie").unwrap();
    assert!(!cookie.contains("Secure"), "plain HTTP: {cookie}");
    let again = plain(addr, "GET", &format!("/login?token={token}"), None, None);
    assert_eq!(again.status, 401, "{}", again.body);
    console.expect_log("bad or used token (1 refused since start) (reason bad_token)");
    drop(console);

    let refused = |content: &str, mode: u32| {
        std::fs::write(&file, content).unwrap();
        std::fs::set_permissions(&file, PermissionsExt::from_mode(mode)).unwrap();
        let mut cmd = env.command(&["console", "--token-file"]);
        cmd.arg(&file);
        let out = cmd.output().unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let f = file.display();
    let e = refused(token, 0o640);
    assert!(
        e.contains(&format!(
            "--token-file {f}: private key has permissions 0640"
        )),
        "{e}"
    );
    let e = refused("short\n", 0o600);
    assert!(
        e.contains(&format!(
            "--token-file {f}: the token has 5 characters, fewer than 32"
        )),
        "{e}"
    );
    let e = refused("0123456789abcdef0123456789abcdef&x=1", 0o600);
    assert!(
        e.contains(&format!("--token-file {f}: the token holds '&'")),
        "{e}"
    );
    // From pgmtls.yaml, and refused with a client CA (the certificate is the login there).
    let pki = TestPki::new();
    std::fs::write(&file, token).unwrap();
    std::fs::set_permissions(&file, PermissionsExt::from_mode(0o600)).unwrap();
    let config = write_config(&env, &pki, Some(&pki.ca), "console_token_file: token\n");
    let mut cmd = env.command(&["console"]);
    cmd.arg("--config").arg(&config);
    let out = cmd.output().unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("console_token_file ")
            && e.contains("there is no login token when console_tls.client_ca_file is set"),
        "{e}"
    );
}

#[test]
fn every_refusal_is_logged_with_its_reason_and_counted() {
    let env = env_with_app();
    let console = Console::spawn(env.command(&["console"]));
    let addr = console.addr();
    let before = console.refusals(None);
    assert!(before.iter().all(|(_, n)| *n == 0), "{before:?}");
    let token = console.token();

    let r = plain_host(addr, "evil.example:80", "GET", "/", None, None);
    assert_eq!(r.status, 421);
    console.expect_log("(reason host)");
    let r = plain(addr, "GET", "/login?token=nope", None, None);
    assert_eq!(r.status, 401);
    console.expect_log("(reason bad_token)");
    let r = plain(addr, "POST", "/logout", None, Some("csrf=x"));
    assert_eq!(r.status, 401);
    console.expect_log("(reason no_session)");
    let r = plain(addr, "GET", &format!("/login?token={token}"), None, None);
    let cookie = r
        .header("set-cookie")
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let r = plain(addr, "POST", "/logout", Some(&cookie), Some("x=1"));
    assert_eq!(r.status, 403);
    console.expect_log("(reason csrf_missing)");
    let r = plain(addr, "POST", "/logout", Some(&cookie), Some("csrf=wrong"));
    assert_eq!(r.status, 403);
    console.expect_log("(reason csrf_wrong)");
    let big = format!("csrf={}", "x".repeat(20_000));
    let r = plain(addr, "POST", "/logout", Some(&cookie), Some(&big));
    assert_eq!(r.status, 413);
    console.expect_log("(reason form_too_large)");
    // Five bad tokens in a row (the login above reset the run) lock the login.
    for _ in 0..5 {
        plain(addr, "GET", "/login?token=nope", None, None);
    }
    let r = plain(addr, "GET", "/login?token=nope", None, None);
    assert_eq!(r.status, 429);
    console.expect_log("(reason login_locked)");

    let after = console.refusals(None);
    for (reason, n) in [
        ("host", 1),
        ("bad_token", 6),
        ("login_locked", 1),
        ("no_session", 1),
        ("csrf_missing", 1),
        ("csrf_wrong", 1),
        ("form_too_large", 1),
        ("client_certificate", 0),
        ("tls_handshake", 0),
        ("metrics_not_loopback", 0),
    ] {
        assert_eq!(count(&after, reason), n, "{reason}: {after:?}");
    }
    let metrics = plain(addr, "GET", "/metrics", None, None);
    assert_eq!(
        metrics.header("content-type"),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    assert!(
        metrics.body.contains("pgmtls_console_sessions_total 1"),
        "{}",
        metrics.body
    );
}

/// `/metrics` only to loopback peers: a console on a wildcard listen, asked from this host's
/// non-loopback address when it has one.
#[test]
fn metrics_are_refused_to_peers_off_loopback() {
    let Some(ip) = non_loopback_ip() else {
        eprintln!("skipped: no address other than loopback on this host");
        return;
    };
    let env = env_with_app();
    let pki = TestPki::new();
    let config = write_config(&env, &pki, None, "");
    let mut cmd = env.command(&["console", "--listen", "0.0.0.0:0"]);
    cmd.arg("--config").arg(&config);
    let console = Console::spawn(cmd);
    let client = Client::new(&pki, None);
    let there = SocketAddr::new(ip, console.port);
    // The Host check passes (127.0.0.1 is a name of the certificate); the peer is not loopback.
    let host = format!("127.0.0.1:{}", console.port);
    let r = client
        .request_host(there, &host, "GET", "/metrics", None, None)
        .unwrap();
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(r.body.contains("loopback peers only"), "{}", r.body);
    console.expect_log(&format!("refused GET /metrics from {ip}:"));
    console.expect_log("(reason metrics_not_loopback)");
    // A name the certificate does not list is refused by the Host check first.
    let r = client
        .request(there, "GET", "/metrics", None, None)
        .unwrap();
    assert_eq!(r.status, 421, "{}", r.body);
    let refusals = console.refusals(Some(&client));
    assert_eq!(count(&refusals, "metrics_not_loopback"), 1, "{refusals:?}");
    assert_eq!(count(&refusals, "host"), 1, "{refusals:?}");
}

fn non_loopback_ip() -> Option<std::net::IpAddr> {
    // The address the kernel would use to reach an outside host: no packet is sent.
    let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect("192.0.2.255:9").ok()?;
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}
