//! A reload storm: state changes made with the real CLI, one after another, while 32 pgbench
//! clients run through the proxy with client certificates. None of the changes concerns the
//! clients' admission (a rule for another network, new certificates), so no transaction may
//! fail, no client may be aborted, and every transaction pgbench counts is in
//! `pgbench_history`.
//!
//! `PGMTLS_STORM_CHANGES` sets the number of changes (default 150; the figure in
//! docs/RELIABILITY.md is for 1,000).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cli_support;
mod common;

use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cli_support::Env;
use common::admin::{scrape, status};
use common::pg::{pg_available_or_skip, PgServer, APP_DB, APP_PASSWORD, APP_USER};
use common::proxy::ProxyProcess;

const WAIT: Duration = Duration::from_secs(60);

fn pgbench(
    pg: &PgServer,
    args: &[&str],
    port: u16,
    tls: Option<(&Path, &Path, &Path)>,
) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(pg.pgbench_path());
    cmd.args(args)
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            APP_USER,
            APP_DB,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for var in common::pg::libpq_env_vars() {
        cmd.env_remove(var);
    }
    cmd.env("PGPASSWORD", APP_PASSWORD);
    if let Some((root, crt, key)) = tls {
        cmd.env("PGSSLMODE", "require")
            .env("PGSSLROOTCERT", root)
            .env("PGSSLCERT", crt)
            .env("PGSSLKEY", key);
    }
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_cli_changes_under_pgbench_lose_no_transaction() {
    if !pg_available_or_skip() {
        return;
    }
    let changes: usize = std::env::var("PGMTLS_STORM_CHANGES")
        .map(|v| v.parse().expect("PGMTLS_STORM_CHANGES is a number"))
        .unwrap_or(150);
    let pg = PgServer::start();
    let env = Env::new();
    env.create_db("app", "127.0.0.1:0", &pg.addr().to_string());
    env.run(&["ip-rules", "create", "app", "--cidr", "127.0.0.1/32"])
        .ok();
    let id = env.run(&["certificates", "app", "--json"]).json()[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let dir = env.dir.path().join("client");
    env.run(&[
        "certificates",
        "download",
        "app",
        "--id",
        &id,
        "--prefix",
        "bench_",
        "--dir",
        dir.to_str().unwrap(),
    ])
    .ok();
    let root = dir.join("bench_root.crt");
    let crt = dir.join("bench_postgresql.crt");
    let key = dir.join("bench_postgresql.key");
    let config = env.dir.path().join("pgmtls.yaml");
    std::fs::write(
        &config,
        format!(
            "state_dir: {}\nadmin_listen: 127.0.0.1:0\nlog_format: json\n",
            env.state.display()
        ),
    )
    .unwrap();
    let proxy = ProxyProcess::spawn(&["--config", config.to_str().unwrap()]);
    let admin = proxy.admin();
    let port = proxy.addrs["app"].port();

    let init = pgbench(&pg, &["-i", "-s", "1", "-q"], pg.port(), None)
        .output()
        .await
        .unwrap();
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );

    let generation_before = status(admin).await["generation"].as_u64().unwrap();
    // The changes run on a thread of their own while pgbench runs in windows of `-T 20`, one
    // after another, until the changes are done: however slow the machine, every change
    // lands while 32 clients are connected (or connecting again for the next window).
    let state = env.state.clone();
    let home = env.home.clone();
    let done = Arc::new(AtomicBool::new(false));
    let go = Arc::new(AtomicBool::new(false));
    let changer = {
        let (done, go) = (done.clone(), go.clone());
        std::thread::spawn(move || {
            let env = Env {
                dir: tempfile::tempdir().unwrap(),
                state,
                home,
            };
            while !go.load(Ordering::SeqCst) {
                // Set once the first window has all 32 sessions relaying.
                std::thread::sleep(Duration::from_millis(10));
            }
            let started = Instant::now();
            for i in 0..changes {
                let args: &[&str] = match i % 3 {
                    0 => &["ip-rules", "create", "app", "--cidr", "10.20.0.0/16"],
                    1 => &["ip-rules", "delete", "app", "--cidr", "10.20.0.0/16"],
                    _ => &["certificates", "create", "app"],
                };
                env.run(args).ok();
            }
            done.store(true, Ordering::SeqCst);
            started.elapsed()
        })
    };

    let (mut processed, mut failed, mut windows) = (0u64, 0u64, 0u32);
    let mut applied = None;
    loop {
        let run = pgbench(
            &pg,
            &["-c", "32", "-j", "2", "-T", "20", "-n"],
            port,
            Some((&root, &crt, &key)),
        )
        .spawn()
        .unwrap();
        if windows == 0 {
            let deadline = Instant::now() + WAIT;
            loop {
                let m = scrape(admin).await;
                if m.value("pgmtls_sessions_active", r#"database="app""#) == 32.0 {
                    break;
                }
                assert!(Instant::now() < deadline, "pgbench never had 32 sessions");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            go.store(true, Ordering::SeqCst);
        }
        let last = done.load(Ordering::SeqCst);
        if last {
            // The proxy applies the last change while this window runs.
            let certificates = 1 + changes / 3;
            let st = common::admin::wait_status(admin, WAIT, |s| {
                s["databases"]["app"]["certificates"]
                    .as_array()
                    .is_some_and(|c| c.len() == certificates)
            })
            .await;
            applied = st["generation"].as_u64();
        }
        let out = run.wait_with_output().await.unwrap();
        windows += 1;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "pgbench failed:\n{stdout}\n{stderr}");
        assert!(!stderr.contains("aborted"), "{stderr}");
        let field = |prefix: &str| -> u64 {
            stdout
                .lines()
                .find_map(|l| l.trim().strip_prefix(prefix))
                .and_then(|rest| rest.split_whitespace().next())
                .unwrap_or_else(|| panic!("no {prefix:?} in\n{stdout}"))
                .parse()
                .unwrap()
        };
        processed += field("number of transactions actually processed:");
        failed += field("number of failed transactions:");
        if last {
            break;
        }
    }
    let storm = changer.join().unwrap();
    let history: u64 = pg
        .superuser_exec_in(APP_DB, "SELECT count(*) FROM pgbench_history")
        .parse()
        .unwrap();
    let m = scrape(admin).await;
    let revoked_live = m.value(
        "pgmtls_connections_refused_total",
        r#"database="app",reason="revoked_live""#,
    );
    let applied = applied.unwrap();
    eprintln!(
        "storm: {changes} CLI changes in {storm:?} ({:.1}/s), configuration generation \
         {generation_before} -> {applied}; pgbench -c 32 in {windows} windows of -T 20: \
         {processed} transactions, {failed} failed, {history} rows in pgbench_history, \
         {revoked_live} sessions cut",
        changes as f64 / storm.as_secs_f64()
    );
    assert_eq!(failed, 0);
    assert!(processed > 0);
    assert_eq!(history, processed, "every counted transaction committed");
    assert_eq!(revoked_live, 0.0);
    assert!(applied > generation_before, "the storm was never applied");
    // The audit log recorded every change, and every line parses.
    let path = env.state.join("audit.log");
    let text = std::fs::read_to_string(&path).unwrap();
    let entries = pgmtls::state::parse_audit_log(&path, &text).unwrap();
    let storm_entries = entries
        .iter()
        .filter(|e| {
            matches!(
                e.action.as_str(),
                "ip_rule.create" | "ip_rule.delete" | "certificate.create"
            )
        })
        .count();
    // The initial rule and the storm.
    assert_eq!(storm_entries, 1 + changes);
}
