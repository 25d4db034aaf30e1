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

    // How long the changes take, to run pgbench past the last of them.
    let change = |i: usize| {
        let args: &[&str] = match i % 3 {
            0 => &["ip-rules", "create", "app", "--cidr", "10.20.0.0/16"],
            1 => &["ip-rules", "delete", "app", "--cidr", "10.20.0.0/16"],
            _ => &["certificates", "create", "app"],
        };
        env.run(args).ok();
    };
    let t = Instant::now();
    for i in 0..3 {
        change(i);
    }
    let per_change = t.elapsed() / 3;
    let seconds = (per_change * changes as u32 * 2).as_secs().max(20) + 10;
    eprintln!("storm: {changes} changes, ~{per_change:?} each; pgbench -T {seconds}");

    let generation_before = status(admin).await["generation"].as_u64().unwrap();
    let run = pgbench(
        &pg,
        &["-c", "32", "-j", "2", "-T", &seconds.to_string(), "-n"],
        port,
        Some((&root, &crt, &key)),
    )
    .spawn()
    .unwrap();
    // The storm starts once all 32 sessions are relaying.
    let deadline = Instant::now() + WAIT;
    loop {
        let m = scrape(admin).await;
        if m.value("pgmtls_sessions_active", r#"database="app""#) == 32.0 {
            break;
        }
        assert!(Instant::now() < deadline, "pgbench never had 32 sessions");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let started = Instant::now();
    // `tokio::process::Child` is only polled on await; the CLI runs block this task, so
    // whether pgbench is still running is asked once the changes are done.
    let mut run = run;
    for i in 3..3 + changes {
        change(i);
    }
    let storm = started.elapsed();
    assert!(
        run.try_wait().unwrap().is_none(),
        "pgbench ended before the last change; raise -T"
    );
    // The proxy applies the last change while pgbench still runs.
    let certificates = env
        .run(&["certificates", "app", "--json"])
        .json()
        .as_array()
        .unwrap()
        .len();
    common::admin::wait_status(admin, WAIT, |s| {
        s["databases"]["app"]["certificates"]
            .as_array()
            .is_some_and(|c| c.len() == certificates)
    })
    .await;
    let applied_generation = status(admin).await["generation"].as_u64().unwrap();
    assert!(
        run.try_wait().unwrap().is_none(),
        "pgbench ended before the proxy applied the last change; raise -T"
    );

    let out = run.wait_with_output().await.unwrap();
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
    let processed = field("number of transactions actually processed:");
    let failed = field("number of failed transactions:");
    let history: u64 = pg
        .superuser_exec_in(APP_DB, "SELECT count(*) FROM pgbench_history")
        .parse()
        .unwrap();
    let m = scrape(admin).await;
    let revoked_live = m.value(
        "pgmtls_connections_refused_total",
        r#"database="app",reason="revoked_live""#,
    );
    eprintln!(
        "storm: {changes} CLI changes in {storm:?} ({:.1}/s), configuration generation \
         {generation_before} -> {applied_generation}, {certificates} certificates; pgbench -c 32 \
         -T {seconds}: {processed} transactions, {failed} failed, {history} rows in \
         pgbench_history, {revoked_live} sessions cut",
        changes as f64 / storm.as_secs_f64()
    );
    assert_eq!(failed, 0);
    assert!(processed > 0);
    assert_eq!(history, processed, "every counted transaction committed");
    assert_eq!(revoked_live, 0.0);
    assert!(
        applied_generation > generation_before,
        "the storm was never applied"
    );
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
    // The initial rule, the three timing changes and the storm.
    assert_eq!(storm_entries, 1 + 3 + changes);
}
