//! A throwaway etcd per test: the `etcd` binary (Debian: `apt-get install etcd-server`), a
//! temp data dir, free client and peer ports on loopback, torn down on drop. Ready when etcd
//! logs that it serves client traffic.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use tempfile::TempDir;

use super::clients::free_port;

/// Call at the top of every test that needs etcd; `return` when false.
///
/// False (and says so) only when `PGMTLS_SKIP_ETCD_TESTS=1`; otherwise panics with install
/// instructions when the binary is missing, so CI can never skip silently.
pub fn etcd_available_or_skip() -> bool {
    if std::env::var("PGMTLS_SKIP_ETCD_TESTS").as_deref() == Ok("1") {
        eprintln!("skipping: PGMTLS_SKIP_ETCD_TESTS=1 is set and this test needs etcd");
        return false;
    }
    etcd_bin();
    true
}

/// `$PGMTLS_ETCD_BIN`, else `etcd` on PATH.
pub fn etcd_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("PGMTLS_ETCD_BIN") {
        return PathBuf::from(p);
    }
    let found = std::env::var_os("PATH")
        .map(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("etcd"))
                .find(|p| p.is_file())
        })
        .unwrap_or_default();
    found.unwrap_or_else(|| {
        panic!(
            "etcd not found: install it (Debian/Ubuntu: apt-get install etcd-server) or set \
             PGMTLS_ETCD_BIN; on a laptop without it, PGMTLS_SKIP_ETCD_TESTS=1 skips these tests"
        )
    })
}

/// The files of an etcd that serves its clients over TLS and asks each for a certificate of
/// `client_ca` (`--client-cert-auth`).
#[derive(Debug, Clone)]
pub struct EtcdTlsFiles {
    /// Server certificate (for 127.0.0.1) and key.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The CA client certificates must come from.
    pub client_ca: PathBuf,
}

pub struct EtcdServer {
    child: Option<Child>,
    client_port: u16,
    peer_port: u16,
    _dir: TempDir,
    log: PathBuf,
    tls: Option<EtcdTlsFiles>,
}

impl EtcdServer {
    pub fn start() -> EtcdServer {
        Self::start_with(None)
    }

    /// An etcd whose client URL is `https://` and which requires a client certificate.
    pub fn start_tls(files: &EtcdTlsFiles) -> EtcdServer {
        Self::start_with(Some(files.clone()))
    }

    fn start_with(tls: Option<EtcdTlsFiles>) -> EtcdServer {
        let dir = tempfile::Builder::new()
            .prefix("pgmtls-etcd-")
            .tempdir()
            .expect("temp dir for etcd");
        for _attempt in 0..5 {
            let (client, peer) = (free_port(), free_port());
            if let Some(s) = Self::try_start(&dir, client, peer, tls.as_ref()) {
                return EtcdServer {
                    child: Some(s.0),
                    client_port: s.1,
                    peer_port: peer,
                    log: s.2,
                    _dir: dir,
                    tls,
                };
            }
        }
        panic!(
            "etcd did not start; see the logs in {}",
            dir.path().display()
        );
    }

    /// One attempt on fresh ports; `None` when etcd exited (a port was taken meanwhile).
    fn try_start(
        dir: &TempDir,
        client: u16,
        peer: u16,
        tls: Option<&EtcdTlsFiles>,
    ) -> Option<(Child, u16, PathBuf)> {
        let data = dir.path().join(format!("data-{client}"));
        let log = dir.path().join(format!("etcd-{client}.log"));
        let scheme = if tls.is_some() { "https" } else { "http" };
        let client_url = format!("{scheme}://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let mut command = Command::new(etcd_bin());
        if let Some(t) = tls {
            command
                .arg(format!("--cert-file={}", t.cert.display()))
                .arg(format!("--key-file={}", t.key.display()))
                .arg(format!("--trusted-ca-file={}", t.client_ca.display()))
                .arg("--client-cert-auth");
        }
        let mut child = command
            .arg("--name=test")
            .arg(format!("--data-dir={}", data.display()))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=test={peer_url}"))
            .arg("--logger=zap")
            .arg("--log-outputs=stderr")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn etcd");
        let stderr = child.stderr.take().expect("etcd stderr");
        let (tx, rx) = mpsc::channel();
        let log_path = log.clone();
        // Copy the log to a file (for failures) and report readiness.
        std::thread::spawn(move || {
            let mut file = std::fs::File::create(&log_path).ok();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(f) = file.as_mut() {
                    use std::io::Write as _;
                    let _ = writeln!(f, "{line}");
                }
                // etcd 3.4's zap logger says this once the member has joined its cluster and
                // the client port answers (older loggers said "ready to serve client requests").
                if line.contains("serving client traffic")
                    || line.contains("ready to serve client requests")
                {
                    let _ = tx.send(());
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(()) => Some((child, client, log)),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                None
            }
        }
    }

    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Stops the server (SIGKILL: as an outage looks to a client).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the stopped server again on its ports and data directory (an outage ending).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "restart of a running etcd");
        let (child, _, log) = Self::try_start(
            &self._dir,
            self.client_port,
            self.peer_port,
            self.tls.as_ref(),
        )
        .expect("etcd did not restart on its ports");
        self.child = Some(child);
        self.log = log;
    }

    /// `etcdctl` against this server (over TLS: with `client` as its certificate and key, and
    /// the server certificate's CA `ca`).
    pub fn etcdctl_tls(
        &self,
        ca: &Path,
        client: (&Path, &Path),
        args: &[&str],
    ) -> std::process::Output {
        Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoint()))
            .arg(format!("--cacert={}", ca.display()))
            .arg(format!("--cert={}", client.0.display()))
            .arg(format!("--key={}", client.1.display()))
            .args(args)
            .output()
            .expect("run etcdctl (Debian: apt-get install etcd-client)")
    }

    /// `etcdctl` against this server.
    /// `pgmtls state import` of the state directory `root` into `prefix` of this etcd, as an
    /// operator moves state in; panics with the CLI's stderr when it fails.
    pub fn import_state(&self, root: &Path, prefix: &str) {
        let out = Command::new(super::proxy::BIN)
            .args(["state", "import", "--state-dir"])
            .arg(root)
            .args([
                "--etcd-endpoints",
                &self.endpoint(),
                "--etcd-prefix",
                prefix,
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "state import: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn etcdctl(&self, args: &[&str]) -> std::process::Output {
        Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoint()))
            .args(args)
            .output()
            .expect("run etcdctl (Debian: apt-get install etcd-client)")
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.stop();
    }
}
