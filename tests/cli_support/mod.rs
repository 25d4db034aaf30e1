//! Runs the real `pgmtls` binary's control commands against a temporary state directory.
//!
//! Each test gets its own state directory and its own `HOME` (so `certificates download`
//! never touches the real `~/.postgresql`), and the `PGMTLS_*` variables of the calling
//! environment are removed so they cannot leak into a test.
// Not every test file uses every helper.
#![allow(dead_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;
use tempfile::TempDir;

pub const BIN: &str = env!("CARGO_BIN_EXE_pgmtls");

/// A state directory and a home directory for one test.
pub struct Env {
    pub dir: TempDir,
    pub state: PathBuf,
    pub home: PathBuf,
}

impl Env {
    pub fn new() -> Env {
        let dir = tempfile::Builder::new()
            .prefix("pgmtls-cli-")
            .tempdir()
            .unwrap();
        let state = dir.path().join("state");
        let home = dir.path().join("home");
        std::fs::create_dir(&home).unwrap();
        Env { dir, state, home }
    }

    /// `pgmtls ARGS` with `PGMTLS_STATE_DIR` set to this test's state directory.
    pub fn run(&self, args: &[&str]) -> Out {
        self.run_env(args, &[])
    }

    pub fn run_env(&self, args: &[&str], env: &[(&str, &str)]) -> Out {
        let mut cmd = self.command(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Out::from(cmd.output().unwrap(), args)
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(BIN);
        for (k, _) in std::env::vars() {
            if k.starts_with("PGMTLS_") {
                cmd.env_remove(k);
            }
        }
        cmd.args(args)
            .env("PGMTLS_STATE_DIR", &self.state)
            .env("HOME", &self.home)
            .env("USER", "tester")
            .env_remove("SUDO_USER")
            .stdin(Stdio::null());
        cmd
    }

    /// `mtls create NAME` on loopback with a plaintext loopback upstream.
    pub fn create_db(&self, name: &str, listen: &str, upstream: &str) -> Value {
        self.run(&[
            "mtls",
            "create",
            name,
            "--listen",
            listen,
            "--upstream",
            upstream,
            "--confirm",
            name,
            "--json",
        ])
        .json()
    }

    /// Every file and folder under the state directory with its mode and content, to prove
    /// that a refused command changed nothing.
    pub fn snapshot(&self) -> BTreeMap<PathBuf, (u32, Vec<u8>)> {
        let mut out = BTreeMap::new();
        if self.state.exists() {
            walk(&self.state, &self.state, &mut out);
        }
        out
    }

    pub fn db_dir(&self, name: &str) -> PathBuf {
        self.state.join("databases").join(name)
    }

    pub fn audit_lines(&self) -> Vec<Value> {
        std::fs::read_to_string(self.state.join("audit.log"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, (u32, Vec<u8>)>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let meta = std::fs::metadata(&p).unwrap();
        let mode = meta.permissions().mode() & 0o7777;
        let rel = p.strip_prefix(root).unwrap().to_path_buf();
        if meta.is_dir() {
            out.insert(rel, (mode, Vec::new()));
            walk(root, &p, out);
        } else {
            out.insert(rel, (mode, std::fs::read(&p).unwrap()));
        }
    }
}

/// What one run printed.
#[derive(Debug)]
pub struct Out {
    pub args: String,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    fn from(o: Output, args: &[&str]) -> Out {
        Out {
            args: args.join(" "),
            code: o.status.code(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }

    /// Stdout of a successful run.
    #[track_caller]
    pub fn ok(&self) -> &str {
        assert_eq!(
            self.code,
            Some(0),
            "`pgmtls {}` failed: {}",
            self.args,
            self.stderr
        );
        &self.stdout
    }

    #[track_caller]
    pub fn json(&self) -> Value {
        serde_json::from_str(self.ok())
            .unwrap_or_else(|e| panic!("`pgmtls {}`: not JSON ({e}): {}", self.args, self.stdout))
    }

    /// The one-line error of a refused run (exit 1, nothing on stdout).
    #[track_caller]
    pub fn error(&self) -> &str {
        assert_eq!(
            self.code,
            Some(1),
            "`pgmtls {}` should fail: {}{}",
            self.args,
            self.stdout,
            self.stderr
        );
        assert_eq!(self.stdout, "", "`pgmtls {}` printed on failure", self.args);
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(
            lines.len(),
            1,
            "`pgmtls {}`: not one line: {}",
            self.args,
            self.stderr
        );
        let line = lines[0];
        assert!(line.starts_with("pgmtls: error: "), "{line}");
        line
    }
}

pub fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// A free loopback address for a database's listener.
pub fn free_listen() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// A one-shot fake admin endpoint: answers every request with `body` until dropped, on a
/// thread, and returns its URL.
pub fn fake_admin(body: String) -> String {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            let resp = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(resp.as_bytes());
        }
    });
    url
}
