//! Log volume is the proxy's to decide, not the refused peer's, and the log sink cannot stall
//! the data plane: a flood of refused connects yields a bounded number of refusal lines whose
//! summaries add up to the metric, and with nobody reading stderr, live sessions still answer.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Read};
use std::net::{IpAddr, SocketAddr};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::admin::scrape;
use common::clients::{
    app_session_over, connect_from, pg_config, pg_connect_tls_over, tls_client_config,
};
use common::pg::{pg_available_or_skip, PgServer, APP_DB, TRUST_USER};
use common::pki::TestPki;
use common::proxy::{path, ProxyProcess, BIN};
use common::state::TestState;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::config::SslMode;

/// The refusal log's budget (src/refusal_log.rs): lines per database and reason per window.
const LINES_PER_WINDOW: u64 = 10;
const WINDOW: Duration = Duration::from_secs(10);

/// A client refused before TLS, as libpq is: its SSLRequest, the answer, and its own close.
async fn refused_probe(from: IpAddr, addr: SocketAddr) {
    let mut s = connect_from(from, addr).await.unwrap();
    let _ = s.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]).await;
    let mut head = [0u8; 5];
    let answer = async {
        s.read_exact(&mut head).await?;
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let mut body = vec![0u8; len.saturating_sub(4)];
        s.read_exact(&mut body).await
    };
    let _ = tokio::time::timeout(Duration::from_secs(10), answer).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusal_lines_are_bounded_and_add_up_to_the_refusal_metric() {
    const CONNECTS: u64 = 3000;
    let pki = TestPki::new();
    let state = TestState::new("");
    let upstream: SocketAddr = "127.0.0.1:9".parse().unwrap();
    state.add_database(
        "orders",
        &pki,
        "127.0.0.1:0",
        upstream,
        &[("r2", "127.0.0.2/32")],
    );
    let mut proxy = ProxyProcess::with_config(&state.config);
    let (addr, admin) = (proxy.addr(), proxy.admin());
    let outsider: IpAddr = "127.0.0.3".parse().unwrap();
    let started = Instant::now();
    for _ in 0..CONNECTS {
        refused_probe(outsider, addr).await;
    }
    // The metric counts every refusal; it is bumped just after the close the client saw.
    let series = r#"database="orders",reason="ip_not_allowed""#;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let n = scrape(admin)
            .await
            .value("pgmtls_connections_refused_total", series);
        if n as u64 == CONNECTS {
            break;
        }
        assert!(Instant::now() < deadline, "metric at {n} of {CONNECTS}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let windows = started.elapsed().as_secs() / WINDOW.as_secs() + 2;
    proxy.signal("TERM");
    assert!(proxy.wait_exit(Duration::from_secs(20)).success());
    proxy.wait_log_end(Duration::from_secs(10));

    let refusal = |v: &Value| {
        v["message"] == "connection closed"
            && v["error_kind"] == "ip_not_allowed"
            && v["database"] == "orders"
    };
    let logged = proxy.count_logs(refusal) as u64;
    let suppressed: u64 = proxy
        .log_text()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| {
            v["message"] == "refusals suppressed"
                && v["error_kind"] == "ip_not_allowed"
                && v["database"] == "orders"
        })
        .map(|v| v["suppressed"].as_u64().unwrap())
        .sum();
    assert!(
        logged <= LINES_PER_WINDOW * windows,
        "{logged} refusal lines for {CONNECTS} connects in {windows} windows"
    );
    assert_eq!(
        logged + suppressed,
        CONNECTS,
        "{logged} logged + {suppressed} suppressed"
    );
    let lines = proxy.log_text().lines().count();
    assert!(lines < 100, "{lines} log lines");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_answer_while_nobody_reads_the_log() {
    if !pg_available_or_skip() {
        return;
    }
    let pg = PgServer::start();
    let pki = TestPki::new();
    let up = pg.addr().to_string();
    // Started here rather than by the harness: stderr is a pipe this test holds and does not
    // read, so once its 64 KiB are full every write to it would wait.
    let mut child = Command::new(BIN)
        .args(["--log-format", "json", "serve", "--listen", "127.0.0.1:0"])
        .args(["--upstream", &up])
        .args(["--cert", path(&pki.server.chain_path)])
        .args(["--key", path(&pki.server.key_path)])
        .args(["--client-ca", path(&pki.ca.cert_path)])
        .args(["--allow", "127.0.0.2/32", "--admin-listen", "127.0.0.1:0"])
        // One data-plane thread: a blocked log write there would stop every session.
        .args(["--worker-threads", "1", "--shutdown-grace", "1s"])
        .env("PGMTLS_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let (mut addr, mut admin) = (None::<SocketAddr>, None::<SocketAddr>);
    let mut line = String::new();
    while stdout.read_line(&mut line).unwrap() > 0 && line.trim() != "pgmtls: ready" {
        if let Some((_, a)) = line
            .trim()
            .split_once("pgmtls: listening database=default addr=")
        {
            addr = Some(a.parse().unwrap());
        }
        if let Some(a) = line.trim().strip_prefix("pgmtls: admin addr=") {
            admin = Some(a.parse().unwrap());
        }
        line.clear();
    }
    let (addr, admin) = (addr.expect("listening line"), admin.expect("admin line"));
    let client_ip: IpAddr = "127.0.0.2".parse().unwrap();

    let stream = connect_from(client_ip, addr).await.unwrap();
    let (session, conn) = app_session_over(stream, addr, &pki, &pki.client)
        .await
        .unwrap();
    let select_answers = |when: String| {
        let session = &session;
        async move {
            let t = Instant::now();
            let r = tokio::time::timeout(Duration::from_secs(1), session.simple_query("select 1"))
                .await;
            assert!(
                matches!(r, Ok(Ok(_))),
                "select 1 {when}: no answer within 1 s ({:?})",
                t.elapsed()
            );
        }
    };
    select_answers("before the log fills".into()).await;

    // Each short session writes one unsampled `connection closed` line of several hundred
    // bytes: 300 of them are more than twice what the pipe holds.
    const SHORT: usize = 300;
    let mut cfg = pg_config("127.0.0.1", addr.port(), TRUST_USER, APP_DB, None);
    cfg.ssl_mode(SslMode::Require);
    let tls = tls_client_config(
        &pki.ca.cert_path,
        Some((&pki.client.chain_path, &pki.client.key_path)),
        false,
    );
    for i in 0..SHORT {
        let short = async {
            let s = connect_from(client_ip, addr).await.unwrap();
            let (c, task) = pg_connect_tls_over(s, &cfg, tls.clone()).await.unwrap();
            drop(c);
            let _ = task.await;
        };
        if tokio::time::timeout(Duration::from_secs(2), short)
            .await
            .is_err()
        {
            select_answers(format!("after short session {i} stalled")).await;
            panic!("short session {i} not served within 2 s");
        }
        if i % 20 == 19 {
            select_answers(format!("after {} short sessions", i + 1)).await;
        }
    }
    select_answers(format!("after {SHORT} short sessions")).await;
    let m = scrape(admin).await;
    assert_eq!(m.value("pgmtls_log_lines_dropped_total", ""), 0.0);

    // Nothing was lost, only queued: once stderr is read again, every session's line comes
    // out, in order, before the process exits.
    drop(session);
    let _ = conn.await;
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        stderr.read_to_string(&mut text).unwrap();
        text
    });
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    assert!(child.wait().unwrap().success());
    let text = reader.join().unwrap();
    let ids: Vec<u64> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["message"] == "connection closed" && v["outcome"] == "closed")
        .map(|v| v["conn_id"].as_u64().unwrap())
        .collect();
    // Every short session, and the long one (connection 1). Sorted: the sessions run on
    // several data-plane threads, so one may log its close just after the next one's.
    let mut short: Vec<u64> = ids.iter().copied().filter(|&id| id != 1).collect();
    short.sort_unstable();
    assert_eq!(short, (2..=SHORT as u64 + 1).collect::<Vec<_>>(), "{text}");
    assert_eq!(ids.len(), SHORT + 1, "{text}");
}
