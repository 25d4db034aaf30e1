//! A real HAProxy in front of pgmtls replicas: TCP mode, round robin, a PROXY protocol v2
//! header on every connection to a replica, as production setups run it. Bound to a free
//! loopback port, run in the foreground, stopped on drop.
//!
//! HAProxy is required (Debian package `haproxy`; `.ci/run` installs it). On a laptop without
//! it, `PGMTLS_TEST_SKIP_HAPROXY=1` skips the tests that need it; CI never sets that.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::clients::free_port;

pub const HAPROXY: &str = "/usr/sbin/haproxy";
pub const SKIP_ENV: &str = "PGMTLS_TEST_SKIP_HAPROXY";

/// Whether HAProxy can be used; panics with an install hint when it is missing, unless the
/// skip variable is set.
pub fn haproxy_available_or_skip() -> bool {
    if Path::new(HAPROXY).exists() {
        return true;
    }
    if std::env::var_os(SKIP_ENV).is_some() {
        eprintln!("skipping: {HAPROXY} not installed and {SKIP_ENV} is set");
        return false;
    }
    panic!("{HAPROXY} not found: install HAProxy (apt-get install haproxy) or set {SKIP_ENV}=1");
}

pub struct HaProxy {
    child: Child,
    pub addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

impl HaProxy {
    /// HAProxy balancing round robin over `servers`, each sent a PROXY v2 header.
    pub fn start(servers: &[SocketAddr]) -> HaProxy {
        Self::start_with(servers, "")
    }

    /// As [`HaProxy::start`], with `backend` lines added to the backend section (e.g.
    /// `option redispatch 1`).
    pub fn start_with(servers: &[SocketAddr], backend: &str) -> HaProxy {
        // The port is chosen before HAProxy binds it: another process may take it in between,
        // so a failed start is retried on a fresh port.
        let mut last = String::new();
        for _ in 0..5 {
            match Self::try_start(servers, free_port(), backend) {
                Ok(h) => return h,
                Err(e) => last = e,
            }
        }
        panic!("HAProxy did not start: {last}");
    }

    fn try_start(servers: &[SocketAddr], port: u16, backend: &str) -> Result<HaProxy, String> {
        let dir = tempfile::Builder::new()
            .prefix("pgmtls-haproxy-")
            .tempdir()
            .unwrap();
        let mut cfg = String::from(
            "global\n  maxconn 256\n\ndefaults\n  mode tcp\n  timeout connect 5s\n  \
             timeout client 2m\n  timeout server 2m\n\n",
        );
        // A frontend of its own for the readiness probe below, which HAProxy binds together
        // with `pg` and closes itself: a probe of `pg` would reach a replica as a connection
        // of its own, a refusal in its log and its metrics.
        let ready_port = free_port();
        cfg.push_str(&format!(
            "frontend ready\n  bind 127.0.0.1:{ready_port}\n  \
             tcp-request connection reject\n\n"
        ));
        cfg.push_str(&format!(
            "frontend pg\n  bind 127.0.0.1:{port}\n  default_backend replicas\n\n\
             backend replicas\n  balance roundrobin\n"
        ));
        for line in backend.lines() {
            cfg.push_str(&format!("  {}\n", line.trim()));
        }
        for (i, s) in servers.iter().enumerate() {
            cfg.push_str(&format!("  server r{} {s} send-proxy-v2\n", i + 1));
        }
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, cfg).unwrap();
        let mut child = Command::new(HAPROXY)
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawn {HAPROXY}: {e}"))?;
        let log = Arc::new(Mutex::new(Vec::new()));
        for pipe in [
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    log.lock().unwrap().push(line);
                }
            });
        }
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut h = HaProxy {
            child,
            addr,
            log,
            _dir: dir,
        };
        // Ready when the frontends accept. HAProxy prints nothing on a successful start in
        // the foreground, so a listening socket is the signal; poll the probe's own.
        let probe: SocketAddr = format!("127.0.0.1:{ready_port}").parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = h.child.try_wait().unwrap() {
                return Err(format!("exited with {status}: {}", h.log_text()));
            }
            if TcpStream::connect_timeout(&probe, Duration::from_millis(200)).is_ok() {
                return Ok(h);
            }
            if Instant::now() > deadline {
                return Err(format!("frontend never accepted; log: {}", h.log_text()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }
}

impl Drop for HaProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
