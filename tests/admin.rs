//! The admin endpoint over real HTTP: exact metric values after a scripted set of
//! connections, `/status` and `/healthz`, `/readyz` flipping on SIGTERM before the drain ends,
//! and peer-supplied strings reaching the log escaped.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::admin::{get, scrape, status};
use common::clients::{connect_from, pg_config, pg_connect_tls_over, tls_client_config, ConnTask};
use common::pg::{pg_available_or_skip, PgServer, APP_DB, APP_PASSWORD, APP_USER};
use common::pki::{Role, TestPki};
use common::proxy::ProxyProcess;
use common::state::TestState;
use pgmtls::admin::OPENMETRICS_CONTENT_TYPE;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::config::SslMode;
use tokio_postgres::Client;

const WAIT: Duration = Duration::from_secs(20);

async fn session(
    proxy: &ProxyProcess,
    pki: &TestPki,
    cert: Option<&Role>,
    user: &str,
) -> Result<(Client, ConnTask), tokio_postgres::Error> {
    let stream = connect_from("127.0.0.2".parse().unwrap(), proxy.addr())
        .await
        .unwrap();
    let mut cfg = pg_config(
        "127.0.0.1",
        proxy.addr().port(),
        user,
        APP_DB,
        Some(APP_PASSWORD),
    );
    cfg.ssl_mode(SslMode::Require);
    let tls = tls_client_config(
        &pki.ca.cert_path,
        cert.map(|c| (c.chain_path.as_path(), c.key_path.as_path())),
        false,
    );
    pg_connect_tls_over(stream, &cfg, tls).await
}

/// A plaintext StartupMessage, which the proxy answers with one ErrorResponse and a close.
async fn plaintext_startup(from: &str, addr: SocketAddr) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&196_608u32.to_be_bytes());
    body.extend_from_slice(b"user\0app\0\0");
    let mut msg = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    msg.extend(body);
    let mut s = connect_from(from.parse::<IpAddr>().unwrap(), addr)
        .await
        .unwrap();
    s.write_all(&msg).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    out
}

async fn probe(from: &str, addr: SocketAddr) {
    let mut s = connect_from(from.parse::<IpAddr>().unwrap(), addr)
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    assert!(out.is_empty());
}

fn closed(v: &Value) -> bool {
    v["message"] == "connection closed"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_a_scripted_set_of_connections_exactly() {
    if !pg_available_or_skip() {
        return;
    }
    let pg = PgServer::start();
    let pki = TestPki::new();
    let state = TestState::new("");
    state.add_database(
        "orders",
        &pki,
        "127.0.0.1:0",
        pg.addr(),
        &[("r2", "127.0.0.2/32")],
    );
    let proxy = ProxyProcess::with_config(&state.config);
    let addr = proxy.addr();
    let admin = proxy.admin();

    // Three good sessions, each with a query.
    for i in 0..3 {
        let (c, conn) = session(&proxy, &pki, Some(&pki.client), APP_USER)
            .await
            .unwrap();
        let v: i32 = c.query_one("SELECT $1::int", &[&i]).await.unwrap().get(0);
        assert_eq!(v, i);
        drop(c);
        conn.await.unwrap().unwrap();
    }
    // Two peers outside the allowlist, one plaintext startup, and three bad certificates.
    probe("127.0.0.3", addr).await;
    probe("127.0.0.4", addr).await;
    assert_eq!(plaintext_startup("127.0.0.2", addr).await[0], b'E');
    assert!(session(&proxy, &pki, None, APP_USER).await.is_err());
    assert!(session(&proxy, &pki, Some(&pki.other_ca_client), APP_USER)
        .await
        .is_err());
    assert!(session(&proxy, &pki, Some(&pki.expired_client), APP_USER)
        .await
        .is_err());
    let last = proxy.wait_for_nth_log(9, WAIT, closed);
    let _ = last;

    let r = get(admin, "/metrics").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some(OPENMETRICS_CONTENT_TYPE));
    assert!(r.body.ends_with("# EOF\n"));
    let m = common::admin::Scrape::parse(&r.body);
    let db = r#"database="orders""#;
    assert_eq!(m.value("pgmtls_connections_accepted_total", db), 3.0);
    let expected = [
        ("ip_not_allowed", 2.0),
        ("tls_required", 1.0),
        ("client_cert_missing", 1.0),
        ("client_cert_untrusted", 1.0),
        ("client_cert_expired", 1.0),
    ];
    for kind in pgmtls::conn::error::ErrorKind::ALL {
        let want = expected
            .iter()
            .find(|(k, _)| *k == kind.as_str())
            .map_or(0.0, |(_, n)| *n);
        let got = m.value(
            "pgmtls_connections_refused_total",
            &format!(r#"database="orders",reason="{}""#, kind.as_str()),
        );
        assert_eq!(got, want, "reason {kind}");
    }
    assert_eq!(m.value("pgmtls_sessions_active", db), 0.0);
    assert_eq!(
        m.value("pgmtls_tls_handshake_duration_seconds_count", ""),
        3.0
    );
    assert_eq!(
        m.value("pgmtls_upstream_connect_duration_seconds_count", db),
        3.0
    );
    assert_eq!(m.value("pgmtls_session_duration_seconds_count", db), 3.0);
    // Bytes agree exactly with the three sessions' close lines.
    let (mut up, mut down) = (0.0, 0.0);
    for n in 1..=3 {
        let line = proxy.wait_for_nth_log(n, WAIT, |v| closed(v) && v["outcome"] == "closed");
        up += line["bytes_to_upstream"].as_f64().unwrap();
        down += line["bytes_to_client"].as_f64().unwrap();
    }
    assert!(up > 0.0 && down > 0.0);
    assert_eq!(
        m.value(
            "pgmtls_relayed_bytes_total",
            r#"database="orders",direction="to_upstream""#
        ),
        up
    );
    assert_eq!(
        m.value(
            "pgmtls_relayed_bytes_total",
            r#"database="orders",direction="to_client""#
        ),
        down
    );
    assert_eq!(
        m.value(
            "pgmtls_cancel_requests_total",
            r#"database="orders",result="forwarded""#
        ),
        0.0
    );
    assert_eq!(
        m.value("pgmtls_reloads_total", r#"kind="startup",result="ok""#),
        1.0
    );
    assert_eq!(m.value("pgmtls_config_generation", ""), 1.0);
    assert_eq!(m.value("pgmtls_ip_rules", db), 1.0);
    assert_eq!(
        m.value(
            "pgmtls_build_info",
            &format!(r#"version="{}""#, env!("CARGO_PKG_VERSION"))
        ),
        1.0
    );
    assert!(m.value("pgmtls_process_resident_memory_bytes", "") > 1e6);
    assert!(m.value("pgmtls_process_open_fds", "") >= 5.0);
    assert!(m.value("pgmtls_process_cpu_seconds_total", "") > 0.0);
    let expiry = m.value("pgmtls_server_certificate_expiry_timestamp_seconds", db);
    assert!(expiry > time::OffsetDateTime::now_utc().unix_timestamp() as f64);
}

#[tokio::test]
async fn status_and_health_describe_the_running_configuration() {
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
    state.add_certificate_record("orders", "app-1", &pki.client);
    let proxy = ProxyProcess::with_config(&state.config);
    let admin = proxy.admin();
    assert!(admin.ip().is_loopback());

    let h = get(admin, "/healthz").await;
    assert_eq!((h.status, h.body.as_str()), (200, "ok\n"));
    assert_eq!(get(admin, "/readyz").await.status, 200);
    assert_eq!(get(admin, "/nothing").await.status, 404);

    let s = status(admin).await;
    assert_eq!(s["generation"], 1);
    assert_eq!(s["ready"], true);
    assert_eq!(s["draining"], false);
    assert_eq!(s["content_hash"].as_str().unwrap().len(), 64);
    let lr = &s["last_reload"];
    assert_eq!(lr["trigger"], "startup");
    assert_eq!(lr["ok"], true);
    assert!(lr["error"].is_null());
    time::OffsetDateTime::parse(
        lr["at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let db = &s["databases"]["orders"];
    assert_eq!(db["operational"], true);
    assert_eq!(db["listen"], proxy.addr().to_string());
    assert_eq!(db["rules"], serde_json::json!(["r2"]));
    assert_eq!(db["crl_entries"], 0);
    let cert = &db["certificates"][0];
    assert_eq!(cert["id"], "app-1");
    assert_eq!(cert["serial"], common::state::serial_of(&pki.client));
    assert_eq!(cert["revoked"], false);
    assert!(cert["expires_at"].is_string());
    assert!(db["server_cert_expires_at"].is_string());
    assert!(db["ca_expires_at"].is_string());
    // The CLI reads this with the library's own type: the JSON round-trips.
    let typed: pgmtls::admin::Status = serde_json::from_value(s.clone()).unwrap();
    assert_eq!(typed.databases["orders"].rules, ["r2"]);

    let m = scrape(admin).await;
    assert_eq!(
        m.value(
            "pgmtls_client_certificate_expiry_timestamp_seconds",
            r#"database="orders",certificate="app-1""#
        ),
        typed.databases["orders"].certificates[0]
            .expires_at
            .unix_timestamp() as f64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_fails_as_soon_as_sigterm_starts_the_drain() {
    if !pg_available_or_skip() {
        return;
    }
    let pg = PgServer::start();
    let pki = TestPki::new();
    let state = TestState::new("shutdown_grace: 60s\n");
    state.add_database(
        "orders",
        &pki,
        "127.0.0.1:0",
        pg.addr(),
        &[("r2", "127.0.0.2/32")],
    );
    let mut proxy = ProxyProcess::with_config(&state.config);
    let admin = proxy.admin();
    let (c, conn) = session(&proxy, &pki, Some(&pki.client), APP_USER)
        .await
        .unwrap();
    assert_eq!(get(admin, "/readyz").await.status, 200);

    proxy.signal("TERM");
    proxy.wait_for_log(WAIT, |v| v["message"] == "draining");
    // The live session holds the drain open; meanwhile the load balancer is told to stop.
    let r = get(admin, "/readyz").await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.body.contains("draining"));
    assert_eq!(get(admin, "/healthz").await.status, 200);
    let s = status(admin).await;
    assert_eq!(s["draining"], true);
    assert_eq!(s["ready"], false);
    let v: i32 = c.query_one("SELECT 7", &[]).await.unwrap().get(0);
    assert_eq!(v, 7, "the drain has not cut the session");

    drop(c);
    conn.await.unwrap().unwrap();
    let exit = proxy.wait_exit(WAIT);
    assert!(exit.success(), "{exit:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_supplied_strings_are_escaped_in_the_log() {
    if !pg_available_or_skip() {
        return;
    }
    let pg = PgServer::start();
    let pki = TestPki::new();
    let state = TestState::new("");
    state.add_database(
        "orders",
        &pki,
        "127.0.0.1:0",
        pg.addr(),
        &[("r2", "127.0.0.2/32")],
    );
    let proxy = ProxyProcess::with_config(&state.config);
    let evil = "evil\u{1b}[2J\n{\"outcome\":\"closed\"}";
    assert!(session(&proxy, &pki, Some(&pki.client), evil)
        .await
        .is_err());
    let line = proxy.wait_for_log(WAIT, |v| closed(v) && v["pg_user"].is_string());
    let logged = line["pg_user"].as_str().unwrap();
    assert!(
        !logged.contains('\u{1b}') && !logged.contains('\n'),
        "{logged:?}"
    );
    assert!(logged.contains("\\u{1b}"), "{logged:?}");
    assert_ne!(line["outcome"], "closed");
    assert!(
        !proxy.log_text().contains('\u{1b}'),
        "a raw escape reached the log"
    );
}

/// The admin endpoint's limits (src/admin.rs `MAX_PER_SOURCE`, `MAX_CONNECTIONS`), spelled out
/// so the attack reads the same against any build.
const PER_SOURCE: usize = 16;
const GENERAL_SLOTS: usize = 256;

/// `GET path` from source address `src` with `Connection: close`: the status code and body.
async fn get_from(src: &str, addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = connect_from(src.parse::<IpAddr>().unwrap(), addr).await?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let code = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {text:?}")))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((code, body))
}

/// A kept-alive connection from `src` that has had one `/healthz` answered, then sits idle;
/// `None` if the endpoint closed it or did not answer within a second.
async fn held_keep_alive(src: IpAddr, addr: SocketAddr) -> Option<tokio::net::TcpStream> {
    let attempt = async {
        let mut s = connect_from(src, addr).await.ok()?;
        let req = format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut raw = Vec::new();
        let mut buf = [0u8; 512];
        while !raw.ends_with(b"ok\n") {
            let n = s.read(&mut buf).await.ok()?;
            if n == 0 {
                return None;
            }
            raw.extend_from_slice(&buf[..n]);
        }
        let head = String::from_utf8_lossy(&raw).to_ascii_lowercase();
        (!head.contains("connection: close")).then_some(s)
    };
    tokio::time::timeout(Duration::from_secs(1), attempt)
        .await
        .ok()
        .flatten()
}

/// `/healthz` and `/readyz` from 127.0.0.1, each answered 200 within 500 ms (user-visible
/// bound: half of a kubelet probe's default 1 s timeout; a debug build on a loaded CI machine
/// must still pass, a probe stuck behind the data path must not).
async fn assert_probes_answer_quickly(admin: SocketAddr) {
    for path in ["/healthz", "/readyz"] {
        let t = std::time::Instant::now();
        let r =
            tokio::time::timeout(Duration::from_secs(2), get_from("127.0.0.1", admin, path)).await;
        let took = t.elapsed();
        let (code, _) = r
            .unwrap_or_else(|_| panic!("{path} did not answer within 2 s"))
            .unwrap();
        assert_eq!(code, 200, "{path}");
        assert!(took < Duration::from_millis(500), "{path} took {took:?}");
    }
}

fn admin_only_proxy() -> (TestState, ProxyProcess) {
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
    state.add_certificate_record("orders", "app-1", &pki.client);
    let proxy = ProxyProcess::with_config(&state.config);
    (state, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_answer_while_one_peer_holds_idle_and_kept_alive_connections() {
    let (_state, proxy) = admin_only_proxy();
    let admin = proxy.admin();
    let attacker: IpAddr = "127.0.0.2".parse().unwrap();
    // More than the 64 slots the endpoint used to have, of both kinds, all from one peer.
    let kept =
        futures_util::future::join_all((0..70).map(|_| held_keep_alive(attacker, admin))).await;
    let mut idle = Vec::new();
    for _ in 0..70 {
        if let Ok(s) = connect_from(attacker, admin).await {
            idle.push(s);
        }
    }
    assert_probes_answer_quickly(admin).await;
    // The peer got its share and no more, and the refusals are counted.
    let kept = kept.into_iter().flatten().count();
    assert!(kept <= PER_SOURCE, "{kept} kept-alive connections");
    let m = scrape(admin).await;
    assert!(
        m.value(
            "pgmtls_admin_connections_refused_total",
            r#"reason="per_source_limit""#
        ) >= 70.0,
        "{}",
        m.text
    );
    drop(idle);
}

/// A connection from `src` that asks for `/healthz` once a second, keeping its slot however
/// long setting up the others takes; says on `held` whether its first answer kept it alive.
async fn busy_keep_alive(src: IpAddr, addr: SocketAddr, held: tokio::sync::mpsc::Sender<bool>) {
    let Ok(mut s) = connect_from(src, addr).await else {
        let _ = held.send(false).await;
        return;
    };
    let req = format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    let mut first = true;
    loop {
        let mut raw = Vec::new();
        let mut buf = [0u8; 512];
        let answered = s.write_all(req.as_bytes()).await.is_ok()
            && loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break false,
                    Ok(n) => raw.extend_from_slice(&buf[..n]),
                }
                if raw.ends_with(b"ok\n") {
                    break true;
                }
            };
        let kept = answered
            && !String::from_utf8_lossy(&raw)
                .to_ascii_lowercase()
                .contains("connection: close");
        if first {
            let _ = held.send(kept).await;
            first = false;
        }
        if !kept {
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_have_room_reserved_when_many_peers_fill_the_endpoint() {
    let (_state, proxy) = admin_only_proxy();
    let admin = proxy.admin();
    // One source more than it takes to fill every general slot at the per-source cap, each
    // connection busy enough that the header deadline never frees it.
    let sources = GENERAL_SLOTS / PER_SOURCE + 1;
    let (tx, mut rx) = tokio::sync::mpsc::channel(sources * PER_SOURCE);
    let mut tasks = Vec::new();
    for i in 1..=sources {
        let src: IpAddr = format!("127.0.1.{i}").parse().unwrap();
        for _ in 0..PER_SOURCE {
            tasks.push(tokio::spawn(busy_keep_alive(src, admin, tx.clone())));
        }
    }
    drop(tx);
    let mut held = 0;
    let settle = async {
        for _ in 0..tasks.len() {
            match rx.recv().await {
                Some(kept) => held += usize::from(kept),
                None => break,
            }
        }
    };
    // On a build that makes connections wait for a slot, most never hear back.
    let _ = tokio::time::timeout(Duration::from_secs(5), settle).await;
    assert_probes_answer_quickly(admin).await;
    // Every general slot is held (the last source's extra connections got the reserve, which
    // closes after one answer, or were refused), and the probe came in on the reserve: the
    // other routes wait for a general slot.
    assert_eq!(held, GENERAL_SLOTS);
    let (code, body) = get_from("127.0.0.1", admin, "/metrics").await.unwrap();
    assert_eq!(code, 503, "/metrics: {body}");
    for t in tasks {
        t.abort();
    }
}

#[tokio::test]
async fn status_is_only_for_admin_status_from() {
    let (state, proxy) = admin_only_proxy();
    let admin = proxy.admin();
    // Default: loopback 127.0.0.1 only. 127.0.0.2 stands for a peer on the pod network.
    let (code, body) = get_from("127.0.0.2", admin, "/status").await.unwrap();
    assert_eq!(code, 403, "{body}");
    assert!(
        !body.contains("orders") && !body.contains("app-1"),
        "{body}"
    );
    for path in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(
            get_from("127.0.0.2", admin, path).await.unwrap().0,
            200,
            "{path}"
        );
    }
    let (code, body) = get_from("127.0.0.1", admin, "/status").await.unwrap();
    assert_eq!(code, 200);
    assert!(body.contains("app-1"), "{body}");
    drop(proxy);

    // A listed network gets it; the rest, loopback 127.0.0.1 aside, do not.
    state.write_config("admin_status_from: [127.0.0.2/32]\n");
    let proxy = ProxyProcess::with_config(&state.config);
    let admin = proxy.admin();
    assert_eq!(
        get_from("127.0.0.2", admin, "/status").await.unwrap().0,
        200
    );
    assert_eq!(
        get_from("127.0.0.3", admin, "/status").await.unwrap().0,
        403
    );
}

#[tokio::test]
async fn idle_connections_give_their_slot_back_within_the_header_deadline() {
    let (_state, proxy) = admin_only_proxy();
    let admin = proxy.admin();
    let src: IpAddr = "127.0.0.2".parse().unwrap();
    let mut kept = held_keep_alive(src, admin).await.expect("kept alive");
    let mut idle = connect_from(src, admin).await.unwrap();
    for s in [&mut kept, &mut idle] {
        let t = std::time::Instant::now();
        let mut rest = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(4), s.read_to_end(&mut rest)).await;
        assert!(r.is_ok(), "still open after {:?}", t.elapsed());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_names_a_live_session_to_admin_status_from_only() {
    if !pg_available_or_skip() {
        return;
    }
    let pg = PgServer::start();
    let pki = TestPki::new();
    let state = TestState::new("");
    state.add_database(
        "orders",
        &pki,
        "127.0.0.1:0",
        pg.addr(),
        &[("r2", "127.0.0.2/32")],
    );
    state.add_certificate_record("orders", "app-1", &pki.client);
    let proxy = ProxyProcess::with_config(&state.config);
    let admin = proxy.admin();
    let s = get(admin, "/sessions").await;
    assert_eq!(s.status, 200, "{}", s.body);
    assert_eq!(
        serde_json::from_str::<Value>(&s.body).unwrap(),
        serde_json::json!({"sessions": []})
    );

    let (c, conn) = session(&proxy, &pki, Some(&pki.client), APP_USER)
        .await
        .unwrap();
    let v: i32 = c.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(v, 1);
    let s = get(admin, "/sessions").await;
    assert_eq!(s.status, 200, "{}", s.body);
    assert_eq!(s.header("content-type"), Some("application/json"));
    let doc: Value = serde_json::from_str(&s.body).unwrap();
    let list = doc["sessions"].as_array().unwrap();
    assert_eq!(list.len(), 1, "{doc}");
    let one = &list[0];
    assert_eq!(one["database"], "orders");
    assert!(
        one["client_addr"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.2:"),
        "{one}"
    );
    assert_eq!(one["certificate_id"], "app-1");
    assert_eq!(
        one["certificate_serial"],
        common::state::serial_of(&pki.client)
    );
    assert_eq!(one["common_name"], "app-client");
    assert_eq!(one["user"], APP_USER);
    assert_eq!(one["pg_database"], APP_DB);
    assert_eq!(one["state"], "active");
    let since = time::OffsetDateTime::parse(
        one["since"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    assert!(since <= time::OffsetDateTime::now_utc());
    // The CLI and the console read it with the library's type.
    let typed: pgmtls::admin::Sessions = serde_json::from_value(doc).unwrap();
    assert_eq!(typed.sessions[0].user.as_deref(), Some(APP_USER));

    // It names clients: a peer outside admin_status_from gets nothing of it.
    let (code, body) = get_from("127.0.0.2", admin, "/sessions").await.unwrap();
    assert_eq!(code, 403, "{body}");
    assert!(
        !body.contains("app-1") && !body.contains("127.0.0.2:"),
        "{body}"
    );

    drop(c);
    conn.await.unwrap().unwrap();
    // The session leaves the list when it ends.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let doc: Value = serde_json::from_str(&get(admin, "/sessions").await.body).unwrap();
        if doc["sessions"].as_array().unwrap().is_empty() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{doc}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
