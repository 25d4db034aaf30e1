//! A client that vanishes without a FIN or RST (a dead host, a cut link) must not keep its
//! session, and the Postgres backend behind it with its locks, for ever: TCP keepalive and
//! `TCP_USER_TIMEOUT` notice it and the proxy closes both sides.
//!
//! Loopback peers cannot vanish, so the client runs in a network namespace of its own behind
//! a veth pair, and the test cuts the link. Needs root (as CI has); skips otherwise.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::pg::{effective_uid, libpq_env_vars, pg_available_or_skip, PgServer};
use common::pg::{APP_DB, APP_PASSWORD, APP_USER};
use common::pki::TestPki;
use common::proxy::ProxyProcess;

fn ip(args: &[&str]) -> std::process::Output {
    Command::new("ip").args(args).output().expect("run ip")
}

fn ip_ok(args: &[&str]) {
    let out = ip(args);
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A namespace with one veth pair to the host; removed (with the pair) when dropped, also
/// when the test panics.
struct Netns {
    name: String,
    host_if: String,
    /// The host's address on the pair, and the namespace's.
    host_ip: String,
    ns_ip: String,
    ns_if: String,
}

impl Netns {
    fn create() -> Netns {
        static N: AtomicU32 = AtomicU32::new(0);
        let pid = std::process::id();
        let n = N.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{}{}", pid % 100_000, n);
        // 198.18.0.0/15 is for benchmarks; it exists only inside this pair. Each run and test
        // gets its own /30 so parallel runs do not meet.
        let block = (pid.wrapping_mul(31).wrapping_add(n)) % 16_384;
        let (o3, o4) = (block / 64, (block % 64) * 4);
        let ns = Netns {
            name: format!("pgmtls-ka-{tag}"),
            host_if: format!("pk{tag}h"),
            ns_if: format!("pk{tag}c"),
            host_ip: format!("198.18.{o3}.{}", o4 + 1),
            ns_ip: format!("198.18.{o3}.{}", o4 + 2),
        };
        ip_ok(&["netns", "add", &ns.name]);
        ip_ok(&[
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &ns.ns_if,
            "netns",
            &ns.name,
        ]);
        ip_ok(&[
            "addr",
            "add",
            &format!("{}/30", ns.host_ip),
            "dev",
            &ns.host_if,
        ]);
        ip_ok(&["link", "set", &ns.host_if, "up"]);
        ip_ok(&[
            "-n",
            &ns.name,
            "addr",
            "add",
            &format!("{}/30", ns.ns_ip),
            "dev",
            &ns.ns_if,
        ]);
        ip_ok(&["-n", &ns.name, "link", "set", &ns.ns_if, "up"]);
        ip_ok(&["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    /// Pulls the cable: the namespace's end goes down, so nothing it sends arrives and
    /// nothing sent to it is answered. No FIN, no RST, no ICMP.
    fn cut(&self) {
        ip_ok(&["-n", &self.name, "link", "set", &self.ns_if, "down"]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes its end of the pair and with it the host's end.
        let _ = ip(&["netns", "del", &self.name]);
        let _ = ip(&["link", "del", &self.host_if]);
    }
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn root_or_skip() -> bool {
    if effective_uid() != 0 {
        eprintln!("SKIP: needs root for a network namespace (CI runs these as root)");
        return false;
    }
    if !Command::new("ip")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        eprintln!("SKIP: iproute2 `ip` not found");
        return false;
    }
    true
}

const APP_NAME: &str = "pgmtls-keepalive-test";

fn backends_holding_the_lock(pg: &PgServer) -> u32 {
    pg.superuser_exec(&format!(
        "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) \
         WHERE l.locktype = 'advisory' AND a.application_name = '{APP_NAME}'"
    ))
    .parse()
    .unwrap()
}

/// Polls `cond` (a query against Postgres, which has no event to wait on) until it holds.
fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !cond() {
        assert!(
            started.elapsed() < timeout,
            "{what}: not within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    started.elapsed()
}

#[test]
fn a_vanished_client_loses_its_session_and_its_backend() {
    if !pg_available_or_skip() || !root_or_skip() {
        return;
    }
    let pg = PgServer::start();
    let pki = TestPki::new();
    let ns = Netns::create();
    let listen = format!("{}:0", ns.host_ip);
    let allow = format!("{}/32", ns.ns_ip);
    let proxy = ProxyProcess::quick(
        &pki,
        pg.addr(),
        &[&allow],
        &[
            "--listen",
            &listen,
            "--tcp-keepalives-idle",
            "1s",
            "--tcp-keepalives-interval",
            "1s",
            "--tcp-keepalives-count",
            "2",
        ],
    );

    // A real psql inside the namespace takes a lock and then sits idle, as an application
    // holding a transaction open would.
    let conninfo = format!(
        "host={} port={} user={APP_USER} dbname={APP_DB} sslmode=verify-ca sslrootcert={} \
         sslcert={} sslkey={} application_name={APP_NAME}",
        ns.host_ip,
        proxy.addr().port(),
        pki.ca.cert_path.display(),
        pki.client.chain_path.display(),
        pki.client.key_path.display(),
    );
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.name])
        .arg(pg.psql_path())
        .args(["-X", "-A", "-t", "-w", "-d", &conninfo])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for var in libpq_env_vars() {
        cmd.env_remove(var);
    }
    cmd.env("PGPASSWORD", APP_PASSWORD);
    let mut psql = KillOnDrop(cmd.spawn().expect("spawn psql in the namespace"));
    let mut stdin = psql.0.stdin.take().unwrap();
    stdin
        .write_all(b"SELECT pg_advisory_lock(4242);\n")
        .unwrap();
    stdin.flush().unwrap();
    wait_until(
        "psql's session holds the lock",
        Duration::from_secs(20),
        || backends_holding_the_lock(&pg) == 1,
    );

    ns.cut();
    let cut_at = Instant::now();
    let line = proxy.wait_for_log(Duration::from_secs(30), |v| {
        v["message"] == "connection closed"
            && v["client_addr"]
                .as_str()
                .is_some_and(|a| a.starts_with(&format!("{}:", ns.ns_ip)))
    });
    let closed_after = cut_at.elapsed();
    eprintln!("session closed {closed_after:?} after the cut");
    // idle 1s + 2 probes 1s apart, user timeout 3s; generous for a loaded machine.
    assert!(closed_after < Duration::from_secs(15), "{closed_after:?}");
    assert_eq!(line["pg_user"], format!("{APP_USER:?}"), "{line}");
    // The backend and its lock go with the session.
    wait_until("the backend is gone", Duration::from_secs(10), || {
        backends_holding_the_lock(&pg) == 0
    });
    drop(stdin);
}
