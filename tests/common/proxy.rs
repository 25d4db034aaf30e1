//! Runs the real `pgmtls` binary for a test: quick mode or a config file, JSON logs collected
//! line by line, readiness taken from the `pgmtls: listening` / `pgmtls: ready` lines it prints.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::pki::TestPki;

pub const BIN: &str = env!("CARGO_BIN_EXE_pgmtls");

pub struct ProxyProcess {
    child: Child,
    /// Listener address per database name.
    pub addrs: BTreeMap<String, SocketAddr>,
    /// The admin endpoint, from the `pgmtls: admin addr=` line; `None` when it is off.
    pub admin: Option<SocketAddr>,
    log_rx: Receiver<String>,
    log: Arc<Mutex<Vec<String>>>,
    stdout_rx: Receiver<String>,
}

impl ProxyProcess {
    /// `pgmtls serve` with the given arguments, JSON logs, waiting for readiness.
    pub fn spawn(args: &[&str]) -> ProxyProcess {
        Self::spawn_env(args, &[])
    }

    pub fn spawn_env(args: &[&str], env: &[(&str, &str)]) -> ProxyProcess {
        let mut cmd = Command::new(BIN);
        cmd.arg("--log-format")
            .arg("json")
            .arg("serve")
            .args(args)
            .env("PGMTLS_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn pgmtls");
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        let (log_tx, log_rx) = mpsc::channel();
        let log = Arc::new(Mutex::new(Vec::new()));
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                log2.lock().unwrap().push(line.clone());
                let _ = log_tx.send(line);
            }
        });
        let (out_tx, stdout_rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = out_tx.send(line);
            }
        });
        let mut p = ProxyProcess {
            child,
            addrs: BTreeMap::new(),
            admin: None,
            log_rx,
            log,
            stdout_rx,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match p.stdout_rx.recv_timeout(left) {
                Ok(line) if line == "pgmtls: ready" => break,
                Ok(line) => {
                    if let Some(addr) = line.strip_prefix("pgmtls: admin addr=") {
                        p.admin = Some(addr.parse().expect("admin addr"));
                    }
                    if let Some(rest) = line.strip_prefix("pgmtls: listening database=") {
                        let (db, addr) = rest.split_once(" addr=").expect("listening line");
                        p.addrs.insert(db.to_owned(), addr.parse().expect("addr"));
                    }
                }
                Err(_) => {
                    let status = p.child.try_wait().ok().flatten();
                    panic!(
                        "pgmtls did not become ready (exit: {status:?}); log:\n{}",
                        p.log_text()
                    );
                }
            }
        }
        p
    }

    /// Quick mode against `upstream`, server cert `pki.server`, client CA `pki.ca`.
    pub fn quick(pki: &TestPki, upstream: SocketAddr, allow: &[&str], extra: &[&str]) -> Self {
        Self::quick_env(pki, upstream, allow, extra, &[])
    }

    /// [`quick`](Self::quick) with extra environment variables.
    pub fn quick_env(
        pki: &TestPki,
        upstream: SocketAddr,
        allow: &[&str],
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let up = upstream.to_string();
        // `extra` may choose its own listen address.
        let listen = if extra.contains(&"--listen") {
            vec![]
        } else {
            vec!["--listen", "127.0.0.1:0"]
        };
        let mut args: Vec<&str> = listen;
        args.extend_from_slice(&[
            "--upstream",
            &up,
            "--cert",
            path(&pki.server.chain_path),
            "--key",
            path(&pki.server.key_path),
            "--client-ca",
            path(&pki.ca.cert_path),
            "--admin-listen",
            "off",
        ]);
        for a in allow {
            args.push("--allow");
            args.push(a);
        }
        args.extend_from_slice(extra);
        Self::spawn_env(&args, env)
    }

    /// `pgmtls serve --config FILE`.
    pub fn with_config(config: &Path) -> Self {
        Self::spawn(&["--config", path(config)])
    }

    /// The admin endpoint's address; panics when it is off.
    pub fn admin(&self) -> SocketAddr {
        self.admin.expect("admin endpoint enabled")
    }

    /// Waits until at least `n` JSON log lines satisfy `pred`; returns the `n`-th.
    pub fn wait_for_nth_log(
        &self,
        n: usize,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        let mut seen = 0;
        let mut found = 0;
        loop {
            {
                let log = self.log.lock().unwrap();
                for line in &log[seen..] {
                    if let Ok(v) = serde_json::from_str::<Value>(line) {
                        if pred(&v) {
                            found += 1;
                            if found == n {
                                return v;
                            }
                        }
                    }
                }
                seen = log.len();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if let Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) =
                self.log_rx.recv_timeout(left)
            {
                panic!(
                    "fewer than {n} matching log lines within {timeout:?}; log:\n{}",
                    self.log_text()
                )
            }
        }
    }

    /// How many JSON log lines so far satisfy `pred`.
    pub fn count_logs(&self, pred: impl Fn(&Value) -> bool) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| pred(v))
            .count()
    }

    /// The single listener's address (quick mode).
    pub fn addr(&self) -> SocketAddr {
        *self.addrs.values().next().expect("one listener")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Every log line so far.
    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Waits for a JSON log line for which `pred` holds, returning it. Lines already seen are
    /// searched first, so a line logged before the call is found too.
    pub fn wait_for_log(&self, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let parse = |l: &str| serde_json::from_str::<Value>(l).ok();
        let deadline = Instant::now() + timeout;
        let mut seen = 0;
        loop {
            {
                let log = self.log.lock().unwrap();
                for line in &log[seen..] {
                    if let Some(v) = parse(line) {
                        if pred(&v) {
                            return v;
                        }
                    }
                }
                seen = log.len();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.log_rx.recv_timeout(left) {
                // A new line arrived; loop to scan it from the shared log.
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {
                    panic!(
                        "no matching log line within {timeout:?}; log:\n{}",
                        self.log_text()
                    )
                }
            }
        }
    }

    /// Waits for the `connection closed` line with this `error_kind`.
    pub fn wait_for_refusal(&self, kind: &str) -> Value {
        self.wait_for_log(Duration::from_secs(20), |v| {
            v["message"] == "connection closed" && v["error_kind"] == kind
        })
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Waits until stderr reaches its end (the process has exited and closed it), so every
    /// line it wrote is in the log.
    pub fn wait_log_end(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.log_rx.recv_timeout(left) {
                Ok(_) => {}
                Err(RecvTimeoutError::Disconnected) => return,
                Err(RecvTimeoutError::Timeout) => panic!("stderr still open after {timeout:?}"),
            }
        }
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "pgmtls did not exit within {timeout:?}"
            );
            // Child exit has no async readiness signal without a SIGCHLD handler; poll.
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}
