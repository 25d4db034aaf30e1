//! File descriptors exhausted: with its `RLIMIT_NOFILE` lowered to just above what it holds,
//! the proxy, flooded with held connections, backs off on EMFILE instead of spinning on it
//! (little CPU, one log line per interval), and serves again once the connections close.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::IpAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use common::clients::{connect_from, error_chain, session_from};
use common::pg::{pg_available_or_skip, PgServer};
use common::pki::TestPki;
use common::state::start_orders;
use serde_json::Value;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// User plus system CPU time of `pid`, in clock ticks (`utime` and `stime` of
/// /proc/PID/stat, fields 14 and 15; the name in field 2 holds no space here).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_name = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after_name.split_whitespace().collect();
    // Field 3 is f[0] here.
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

fn clock_ticks_per_second() -> u64 {
    let out = Command::new("getconf").arg("CLK_TCK").output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

fn accept_failing(v: &Value) -> bool {
    v["message"]
        .as_str()
        .is_some_and(|m| m.starts_with("accept fail"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_the_proxy_backs_off_and_recovers() {
    if !pg_available_or_skip() {
        return;
    }
    let pg = PgServer::start();
    let pki = TestPki::new();
    let (_state, proxy) = start_orders(
        &pki,
        &pg,
        &[("lo", "127.0.0.0/24")],
        "worker_threads: 1\nhandshake_timeout: 5m\n",
    );
    let (c, conn) = session_from("127.0.0.2", &pki, &pki.client, &proxy)
        .await
        .unwrap();
    c.simple_query("SELECT 1").await.unwrap();
    drop(c);
    conn.await.unwrap().ok();

    // Room for a few more descriptors only.
    let pid = proxy.pid();
    let limit = open_fds(pid) + 6;
    let st = Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={limit}:{limit}"))
        .status()
        .unwrap();
    assert!(st.success(), "prlimit failed");

    // Idle sockets that send nothing: each the proxy takes holds a descriptor until
    // handshake_timeout, and the rest wait in the backlog once accept fails.
    let mut held = Vec::new();
    for _ in 0..40 {
        held.push(connect_from(ip("127.0.0.3"), proxy.addr()).await.unwrap());
    }
    let first = proxy.wait_for_log(Duration::from_secs(30), accept_failing);
    assert!(
        first["error"]
            .as_str()
            .unwrap()
            .contains("Too many open files"),
        "{first}"
    );

    // A few seconds of exhaustion: how much CPU, how many lines.
    let window = Duration::from_secs(6);
    let lines_before = proxy.count_logs(accept_failing);
    let (t0, c0) = (Instant::now(), cpu_ticks(pid));
    tokio::time::sleep(window).await;
    let (elapsed, used) = (t0.elapsed(), cpu_ticks(pid) - c0);
    let lines = proxy.count_logs(accept_failing) - lines_before;
    let cpu = used as f64 / clock_ticks_per_second() as f64 / elapsed.as_secs_f64();
    eprintln!(
        "out of descriptors for {elapsed:.1?}: proxy CPU {:.1}% of a core, {lines} \
         `accept failing` lines",
        cpu * 100.0
    );
    assert!(cpu < 0.10, "the proxy used {:.0}% of a core", cpu * 100.0);
    // One line per 5 s interval: at most two in a 6 s window.
    assert!(
        lines <= 2,
        "{lines} lines in {elapsed:?}:\n{}",
        proxy.log_text()
    );

    // The held sockets close: descriptors come back, and a new client is served.
    drop(held);
    proxy.wait_for_log(Duration::from_secs(30), |v| {
        v["message"] == "accepting again"
    });
    let (c, _conn) = session_from("127.0.0.2", &pki, &pki.client, &proxy)
        .await
        .unwrap_or_else(|e| panic!("not served after recovery: {}", error_chain(&e)));
    let v: i32 = c.query_one("SELECT 9", &[]).await.unwrap().get(0);
    assert_eq!(v, 9);
}
