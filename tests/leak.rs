//! Leak check: 20,000 full mutual-TLS sessions (handshake with a client certificate, startup,
//! one query, Terminate) through the real proxy process against a stand-in upstream, then the
//! proxy must be back where it started: as many open fds as before, no session left in the
//! registry, no upstream socket left open. `cargo bench --bench soak` is the long version.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::admin::scrape;
use common::churn::{churn, open_fds, Errors, FakeUpstream, SessionClient};
use common::pki::TestPki;
use common::proxy::{path, ProxyProcess};

const SESSIONS: u64 = 20_000;
/// Concurrent clients: enough to keep both cores busy, few enough that every handshake is
/// served at once (under `max_handshakes_per_source`).
const WORKERS: usize = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_sessions_leave_no_fd_and_no_session_behind() {
    let pki = TestPki::new();
    let upstream = FakeUpstream::start().await;
    let up = upstream.addr.to_string();
    let proxy = ProxyProcess::spawn(&[
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &up,
        "--cert",
        path(&pki.server.chain_path),
        "--key",
        path(&pki.server.key_path),
        "--client-ca",
        path(&pki.ca.cert_path),
        "--allow",
        "127.0.0.1/32",
        "--admin-listen",
        "127.0.0.1:0",
    ]);
    let admin = proxy.admin();
    let pid = proxy.pid();
    let client = SessionClient::new(&pki, &pki.client, proxy.addr());
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(Errors::default());

    // A few sessions first, so whatever the proxy opens once and keeps (its first upstream
    // dial, lazily built state) is in the baseline rather than counted as a leak.
    churn(&client, 20, 2, None, &done, &errors).await;
    assert_eq!(errors.total(), 0, "warm-up errors:\n{}", errors.summary());
    wait_for_zero_sessions(admin).await;
    let baseline = open_fds(pid).unwrap();

    let t0 = Instant::now();
    churn(&client, SESSIONS, WORKERS, None, &done, &errors).await;
    let elapsed = t0.elapsed();
    assert_eq!(
        errors.total(),
        0,
        "client errors in {SESSIONS} sessions:\n{}\nproxy log tail:\n{}",
        errors.summary(),
        tail(&proxy.log_text())
    );

    // The registry empties and the sockets close a moment after the last client saw its end
    // of stream; wait for both, bounded.
    let m = wait_for_zero_sessions(admin).await;
    let accepted = m.value("pgmtls_connections_accepted_total", "database=\"default\"");
    assert_eq!(accepted, (SESSIONS + 20) as f64, "sessions relayed");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut fds = open_fds(pid).unwrap();
    while fds > baseline || upstream.counts.open() > 0 {
        assert!(
            Instant::now() < deadline,
            "after {SESSIONS} sessions the proxy holds {fds} fds (baseline {baseline}) and \
             {} upstream connections are open",
            upstream.counts.open()
        );
        // fds have no readiness signal; poll /proc.
        tokio::time::sleep(Duration::from_millis(50)).await;
        fds = open_fds(pid).unwrap();
    }
    let c = &upstream.counts;
    assert_eq!(c.errors.load(Ordering::SeqCst), 0, "upstream errors");
    assert_eq!(c.queries.load(Ordering::SeqCst), SESSIONS + 20, "queries");
    assert_eq!(
        c.terminated.load(Ordering::SeqCst),
        SESSIONS + 20,
        "Terminates"
    );
    eprintln!(
        "{SESSIONS} sessions in {:.1} s ({:.0}/s); fds {baseline} before, {fds} after",
        elapsed.as_secs_f64(),
        SESSIONS as f64 / elapsed.as_secs_f64()
    );
}

/// Scrapes /metrics until `pgmtls_sessions_active` is 0, returning that scrape.
async fn wait_for_zero_sessions(admin: std::net::SocketAddr) -> common::admin::Scrape {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let m = scrape(admin).await;
        let active = m.value("pgmtls_sessions_active", "database=\"default\"");
        if active == 0.0 {
            return m;
        }
        assert!(
            Instant::now() < deadline,
            "pgmtls_sessions_active still {active} after 60 s"
        );
        // The gauge has no change notification; poll it.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
