//! `pgmtls demo` end to end: it starts, the psql line it prints connects through mutual TLS,
//! and SIGINT stops everything and removes every file it made; with `--replicas 3` the same
//! through HAProxy over three replicas on a throwaway etcd.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::etcd::etcd_available_or_skip;
use common::haproxy::haproxy_available_or_skip;
use common::pg::{bin_dir, pg_available_or_skip};

#[test]
fn demo_prints_a_working_psql_line_and_cleans_up_on_sigint() {
    if !pg_available_or_skip() {
        return;
    }
    let mut demo = Command::new(env!("CARGO_BIN_EXE_pgmtls"))
        .arg("demo")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(demo.stdout.take().unwrap()).lines();
    let mut work = None;
    let mut conninfo = None;
    let mut pg_socket = None;
    let mut seen = Vec::new();
    for line in stdout.by_ref() {
        let line = line.unwrap();
        seen.push(line.clone());
        if let Some(dir) = line.strip_prefix("pgmtls demo: working in ") {
            work = Some(PathBuf::from(dir));
        }
        if let Some(rest) = line.strip_prefix("pgmtls demo: started PostgreSQL on unix:") {
            pg_socket = rest.split(',').next().map(PathBuf::from);
        }
        if let Some(rest) = line.trim().strip_prefix("psql \"") {
            conninfo = Some(rest.trim_end_matches('"').to_owned());
        }
        if line.starts_with("Ctrl-C stops the demo") {
            break;
        }
    }
    // Keep reading so the demo's later lines have somewhere to go.
    let rest = std::thread::spawn(move || stdout.map_while(Result::ok).collect::<Vec<_>>());
    let work = work.unwrap_or_else(|| panic!("no working dir line in {seen:?}"));
    let conninfo = conninfo.unwrap_or_else(|| panic!("no psql line in {seen:?}"));
    assert!(conninfo.contains("sslmode=verify-ca"), "{conninfo}");
    assert!(work.join("client/demo_postgresql.key").exists());

    // The throwaway server trusts everyone who reaches it, so only the proxy may: it listens
    // on a Unix socket alone, in a directory other local users cannot enter.
    let pg_socket = pg_socket.unwrap_or_else(|| panic!("no Unix-socket PostgreSQL in {seen:?}"));
    let pg_dir = pg_socket.parent().unwrap();
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(pg_dir).unwrap().permissions());
    assert_eq!(
        mode & 0o077,
        0,
        "{} is open to others: {mode:o}",
        pg_dir.display()
    );
    let conf = std::fs::read_to_string(pg_dir.join("data/postgresql.conf")).unwrap();
    assert!(
        conf.contains("listen_addresses = ''"),
        "PostgreSQL listens on TCP"
    );

    let out = Command::new(bin_dir().join("psql"))
        .arg(&conninfo)
        .args(["-X", "-A", "-t", "-c", "SELECT 'through pgmtls'"])
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "through pgmtls"
    );

    let ok = Command::new("kill")
        .args(["-INT", &demo.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = demo.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "demo did not stop");
        // Child exit has no readiness signal without a SIGCHLD handler; poll.
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut demo.stderr.take().unwrap(), &mut err).unwrap();
    assert!(status.success(), "{status:?}\n{err}");
    assert!(!work.exists(), "{} left behind", work.display());
    let rest = rest.join().unwrap();
    assert!(
        rest.iter()
            .any(|l| l.starts_with("pgmtls demo: stopped and removed")),
        "{rest:?}"
    );
    // The proxy and Postgres are gone with it.
    let again = Command::new(bin_dir().join("psql"))
        .arg(&conninfo)
        .args(["-X", "-c", "SELECT 1"])
        .env("PGCONNECT_TIMEOUT", "3")
        .output()
        .unwrap();
    assert!(!again.status.success());
}

/// What `pgmtls demo --replicas N` printed before "Ctrl-C stops the demo".
struct FleetDemo {
    child: std::process::Child,
    rest: std::thread::JoinHandle<Vec<String>>,
    work: PathBuf,
    conninfo: String,
    pgmtls_config: String,
    metrics: Vec<std::net::SocketAddr>,
    pids: Vec<(String, u32)>,
    revoke: Vec<String>,
}

fn start_fleet_demo(n: usize) -> FleetDemo {
    let mut child = Command::new(env!("CARGO_BIN_EXE_pgmtls"))
        .args(["demo", "--replicas", &n.to_string()])
        .env_remove("PGMTLS_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let (mut work, mut conninfo, mut config, mut revoke) = (None, None, None, None);
    let (mut metrics, mut pids, mut seen) = (Vec::new(), Vec::new(), Vec::new());
    for line in stdout.by_ref() {
        let line = line.unwrap();
        seen.push(line.clone());
        let t = line.trim();
        if let Some(dir) = line.strip_prefix("pgmtls demo: working in ") {
            work = Some(PathBuf::from(dir));
        } else if let Some(rest) = t.strip_prefix("psql \"") {
            conninfo = Some(rest.trim_end_matches('"').to_owned());
        } else if let Some(path) = t.strip_prefix("export PGMTLS_CONFIG=") {
            config = Some(path.to_owned());
        } else if let Some(list) = line.strip_prefix("pgmtls demo: processes ") {
            for p in list.split_whitespace() {
                let (name, pid) = p.split_once('=').unwrap();
                pids.push((name.to_owned(), pid.parse().unwrap()));
            }
        } else if t.starts_with("replica ") && t.ends_with("/metrics") {
            let addr = t.split("http://").nth(1).unwrap();
            metrics.push(addr.trim_end_matches("/metrics").parse().unwrap());
        } else if t.contains(" certificates revoke ") {
            let cmd = t.split('#').next().unwrap();
            revoke = Some(cmd.split_whitespace().skip(1).map(str::to_owned).collect());
        }
        if line.starts_with("Ctrl-C stops the demo") {
            break;
        }
    }
    let rest = std::thread::spawn(move || stdout.map_while(Result::ok).collect::<Vec<_>>());
    FleetDemo {
        child,
        rest,
        work: work.unwrap_or_else(|| panic!("no working dir line in {seen:#?}")),
        conninfo: conninfo.unwrap_or_else(|| panic!("no psql line in {seen:#?}")),
        pgmtls_config: config.unwrap_or_else(|| panic!("no PGMTLS_CONFIG line in {seen:#?}")),
        metrics,
        pids,
        revoke: revoke.unwrap_or_else(|| panic!("no revoke command in {seen:#?}")),
    }
}

fn psql(conninfo: &str) -> std::process::Output {
    Command::new(bin_dir().join("psql"))
        .arg(conninfo)
        .args(["-X", "-A", "-t", "-c", "SELECT 'through the fleet'"])
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .unwrap()
}

/// `pgmtls` with the environment line the demo printed.
fn cli(config: &str, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_pgmtls"))
        .args(args)
        .env("PGMTLS_CONFIG", config)
        .env_remove("PGMTLS_STATE_DIR")
        .env_remove("PGMTLS_ADMIN_URL")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pgmtls {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn fleet_revisions(config: &str) -> Vec<(String, i64)> {
    let v: serde_json::Value = serde_json::from_str(&cli(config, &["fleet", "--json"])).unwrap();
    let mut list: Vec<(String, i64)> = v["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["id"].as_str().unwrap().to_owned(),
                r["revision"].as_i64().unwrap(),
            )
        })
        .collect();
    list.sort();
    list
}

#[tokio::test]
async fn fleet_demo_balances_over_replicas_on_etcd_and_cleans_up_on_sigint() {
    if !pg_available_or_skip() || !etcd_available_or_skip() || !haproxy_available_or_skip() {
        return;
    }
    let demo = start_fleet_demo(3);
    assert!(
        demo.conninfo.contains("sslmode=verify-ca"),
        "{}",
        demo.conninfo
    );
    assert_eq!(demo.metrics.len(), 3, "one admin endpoint per replica");
    let names: Vec<&str> = demo.pids.iter().map(|(n, _)| n.as_str()).collect();
    for name in [
        "etcd",
        "replica-1",
        "replica-2",
        "replica-3",
        "haproxy",
        "postgres",
    ] {
        assert!(names.contains(&name), "no {name} in {:?}", demo.pids);
    }

    // Through HAProxy, round robin: six sessions reach every replica.
    for _ in 0..6 {
        let out = psql(&demo.conninfo);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "through the fleet"
        );
    }
    for (i, admin) in demo.metrics.iter().enumerate() {
        let m = common::admin::scrape(*admin).await;
        let relayed = m
            .samples
            .get(r#"pgmtls_connections_accepted_total{database="demo"}"#)
            .copied()
            .unwrap_or(0.0);
        assert!(relayed >= 1.0, "replica {} relayed no session", i + 1);
    }

    // The printed environment reaches the fleet: three replicas registered in etcd.
    let before = fleet_revisions(&demo.pgmtls_config);
    let ids: Vec<&str> = before.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids, ["1", "2", "3"], "{before:?}");

    // A revocation through the CLI reaches every replica: the next psql is refused.
    let revoke: Vec<&str> = demo.revoke.iter().map(String::as_str).collect();
    cli(&demo.pgmtls_config, &revoke);
    let served = before.iter().map(|(_, r)| *r).max().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = fleet_revisions(&demo.pgmtls_config);
        if now.len() == 3 && now.iter().all(|(_, r)| *r > served) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not every replica followed: {now:?}"
        );
        // The registry has no push signal to a client; ask again.
        std::thread::sleep(Duration::from_millis(50));
    }
    // The CLI says so too: every live replica serves the revocation.
    let certs: serde_json::Value = serde_json::from_str(&cli(
        &demo.pgmtls_config,
        &["certificates", "demo", "--json"],
    ))
    .unwrap();
    assert_eq!(certs[0]["status"], "revoked", "{certs:#}");
    for _ in 0..3 {
        let out = psql(&demo.conninfo);
        assert!(!out.status.success(), "a revoked certificate got in");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("certificate revoked"), "{err}");
    }

    stop_and_check(demo, "INT");
}

/// Sends `signal` to the demo: it exits cleanly, its directory is gone, and so is every
/// process it listed.
fn stop_and_check(mut demo: FleetDemo, signal: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{signal}"), &demo.child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = demo.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "demo did not stop");
        // Child exit has no readiness signal without a SIGCHLD handler; poll.
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    assert!(!demo.work.exists(), "{} left behind", demo.work.display());
    let rest = demo.rest.join().unwrap();
    assert!(
        rest.iter()
            .any(|l| l.starts_with("pgmtls demo: stopped and removed")),
        "{rest:?}"
    );
    // The demo reaped its own children; the postmaster (started by pg_ctl, not the demo's
    // child) removes its PID file, which `pg_ctl stop -w` waits for, just before it exits.
    let deadline = Instant::now() + Duration::from_secs(10);
    for (name, pid) in &demo.pids {
        while running(*pid) {
            assert!(Instant::now() < deadline, "{name} (pid {pid}) still runs");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Whether `pid` is a live process (a zombie has exited).
fn running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name, which may hold spaces.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

#[test]
fn fleet_demo_without_etcd_says_what_to_install_and_starts_nothing() {
    let empty = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_pgmtls"))
        .args(["demo", "--replicas", "2"])
        .env("PATH", empty.path())
        .env_remove("PGMTLS_ETCD_BIN")
        .env_remove("PGMTLS_HAPROXY_BIN")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("etcd not found"), "{err}");
    assert!(err.contains("apt-get install etcd-server haproxy"), "{err}");
    // It failed before making anything: no working directory, no PostgreSQL.
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    let out = Command::new(env!("CARGO_BIN_EXE_pgmtls"))
        .args(["demo", "--replicas", "2"])
        .env("PGMTLS_ETCD_BIN", empty.path().join("etcd"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("PGMTLS_ETCD_BIN=") && err.contains("apt-get install"),
        "{err}"
    );
}

#[test]
fn fleet_demo_stops_everything_on_sigterm() {
    if !pg_available_or_skip() || !etcd_available_or_skip() || !haproxy_available_or_skip() {
        return;
    }
    let demo = start_fleet_demo(2);
    assert_eq!(demo.metrics.len(), 2);
    let out = psql(&demo.conninfo);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let conninfo = demo.conninfo.clone();
    stop_and_check(demo, "TERM");
    assert!(
        !psql(&conninfo).status.success(),
        "the balancer still answers"
    );
}
