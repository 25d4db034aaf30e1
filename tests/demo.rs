//! `pgmtls demo` end to end: it starts, the psql line it prints connects through mutual TLS,
//! and SIGINT stops everything and removes every file it made.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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
