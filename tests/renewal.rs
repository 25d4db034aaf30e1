//! The proxy shows when certificate renewal last ran and last succeeded: `certificates renew`
//! leaves `renewal.yaml`, and after a reload `/status` and the gauges say what it says. A
//! record that does not load makes the renewal times unknown and nothing else.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cli_support;
mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::time::Duration;

use cli_support::Env;
use common::admin::{scrape, status};
use common::proxy::ProxyProcess;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(20);
const LAST_RUN: &str = "pgmtls_renewal_last_run_timestamp_seconds";
const LAST_SUCCESS: &str = "pgmtls_renewal_last_success_timestamp_seconds";

fn unix(v: &Value) -> f64 {
    let t = time::OffsetDateTime::parse(
        v.as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    t.unix_timestamp() as f64
}

/// SIGHUP, and the `n`-th SIGHUP reload has run (so it read the state after the change).
fn reload(proxy: &ProxyProcess, n: usize) {
    proxy.signal("HUP");
    proxy.wait_for_nth_log(n, WAIT, |v| {
        v["trigger"] == "sighup"
            && (v["message"] == "configuration unchanged"
                || v["message"] == "configuration reloaded")
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_metrics_show_the_last_renewal_run_after_a_reload() {
    let env = Env::new();
    env.create_db("app", "127.0.0.1:0", "127.0.0.1:5432");
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

    // Never ran: every field null, no series (the alert's "absent" case).
    let s = status(admin).await;
    assert!(s["renewal"]["last_run_at"].is_null(), "{s}");
    assert!(s["renewal"]["error"].is_null(), "{s}");
    let names = scrape(admin).await.sample_names();
    assert!(!names.contains(LAST_RUN) && !names.contains(LAST_SUCCESS));

    env.run(&["certificates", "renew", "--notify-command", "true"])
        .ok();
    reload(&proxy, 1);
    let s = status(admin).await;
    let r = &s["renewal"];
    assert_eq!(r["last_run_result"], "success", "{s}");
    assert_eq!(r["last_run_errors"], 0);
    assert_eq!(r["last_run_at"], r["last_success_at"]);
    let success = unix(&r["last_success_at"]);
    let m = scrape(admin).await;
    assert_eq!(m.value(LAST_SUCCESS, ""), success);
    assert_eq!(m.value(LAST_RUN, ""), success);

    // A failed run: last run moves (or stays within the same second), last success does not.
    let key = env.db_dir("app").join("ca.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = env.run(&["certificates", "renew", "--notify-command", "true"]);
    assert_eq!(out.code, Some(1));
    reload(&proxy, 2);
    let s = status(admin).await;
    let r = &s["renewal"];
    assert_eq!(r["last_run_result"], "failure", "{s}");
    assert_eq!(r["last_run_errors"], 1);
    assert_eq!(unix(&r["last_success_at"]), success);
    let m = scrape(admin).await;
    assert_eq!(m.value(LAST_SUCCESS, ""), success);
    assert_eq!(m.value(LAST_RUN, ""), unix(&r["last_run_at"]));

    // A record that does not load: named with its field, renewal unknown, the database still
    // served and the reload still ok.
    std::fs::write(
        env.state.join("renewal.yaml"),
        "last_run_at: yesterday\nlast_run_result: success\n",
    )
    .unwrap();
    reload(&proxy, 3);
    let s = status(admin).await;
    let error = s["renewal"]["error"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        error.contains("renewal.yaml") && error.contains("last_run_at"),
        "{s}"
    );
    assert!(s["renewal"]["last_success_at"].is_null());
    assert_eq!(s["last_reload"]["ok"], true, "{s}");
    assert_eq!(s["databases"]["app"]["operational"], true, "{s}");
    let names = scrape(admin).await.sample_names();
    assert!(!names.contains(LAST_RUN) && !names.contains(LAST_SUCCESS));
    proxy.wait_for_log(WAIT, |v| {
        v["message"] == "renewal record does not load; renewal times are unknown"
            && v["error"]
                .as_str()
                .is_some_and(|e| e.contains("last_run_at"))
    });
}
