//! Hot reload of the state directory: every way a file gets replaced is seen (in-place write,
//! rename, Kubernetes' `..data` symlink swap, SIGHUP); a database's broken change is rejected
//! as a whole and shown in `/status` and the metrics; databases come and go; a rotated server
//! certificate is served to the next connection.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::admin::{scrape, status, wait_status};
use common::clients::{connect_from, free_port, load_certs, load_key};
use common::pki::TestPki;
use common::proxy::ProxyProcess;
use common::state::{crl_pem, rules_yaml, server_cert, write_database, TestState};
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(20);

fn ssl_request() -> [u8; 8] {
    let mut r = [0u8; 8];
    r[..4].copy_from_slice(&8u32.to_be_bytes());
    r[4..].copy_from_slice(&80_877_103u32.to_be_bytes());
    r
}

/// Whether a peer at `src` is admitted: an admitted peer's SSLRequest is answered with 'S',
/// a refused one is closed without a byte.
async fn admits(src: &str, addr: SocketAddr) -> bool {
    let mut s = connect_from(src.parse::<IpAddr>().unwrap(), addr)
        .await
        .unwrap();
    s.write_all(&ssl_request()).await.unwrap();
    let mut b = [0u8; 1];
    match tokio::time::timeout(Duration::from_secs(10), s.read(&mut b))
        .await
        .expect("answered or closed")
    {
        Ok(1) => b[0] == b'S',
        _ => false,
    }
}

/// One database `orders` admitting 127.0.0.2 (rule `r2`), upstream unreachable (these tests
/// stop at the TLS handshake).
fn start(pki: &TestPki, extra_config: &str) -> (TestState, ProxyProcess) {
    let state = TestState::new(extra_config);
    let upstream: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    state.add_database(
        "orders",
        pki,
        "127.0.0.1:0",
        upstream,
        &[("r2", "127.0.0.2/32")],
    );
    let proxy = ProxyProcess::with_config(&state.config);
    (state, proxy)
}

fn reloaded(generation: u64) -> impl Fn(&Value) -> bool {
    move |v| v["message"] == "configuration reloaded" && v["generation"] == generation
}

fn rejected(v: &Value) -> bool {
    v["message"] == "reload rejected; keeping the previous configuration"
}

fn rule_ids(status: &Value, db: &str) -> Vec<String> {
    status["databases"][db]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn rules_written_in_place_are_applied_to_new_connections() {
    let pki = TestPki::new();
    let (state, proxy) = start(&pki, "");
    let addr = proxy.addr();
    assert!(admits("127.0.0.2", addr).await);
    assert!(!admits("127.0.0.3", addr).await);

    // Truncate and write the same inode, as `echo > file` or an editor writing in place.
    let written = Instant::now();
    std::fs::write(
        state.db_dir("orders").join("ip-rules.yaml"),
        rules_yaml(&[("r2", "127.0.0.2/32"), ("r3", "127.0.0.3/32")]),
    )
    .unwrap();
    // An in-place write is a truncate then a write; the settle window makes one reload of
    // both the rule, but a writer stalled between the two could show an empty file first.
    let line = proxy.wait_for_log(WAIT, |v| {
        v["message"] == "configuration reloaded" && v["ip_rules"] == 2
    });
    eprintln!(
        "reload latency, in-place write -> applied: {:?}",
        written.elapsed()
    );
    assert_eq!(line["trigger"], "watch");
    let changes = line["changes"].as_str().unwrap();
    assert!(changes.contains("orders: ip rules"), "{line}");
    assert!(changes.contains("+r3"), "{line}");

    assert!(admits("127.0.0.3", addr).await);
    let s = status(proxy.admin()).await;
    assert_eq!(s["generation"], line["generation"]);
    assert_eq!(rule_ids(&s, "orders"), ["r2", "r3"]);
    assert_eq!(s["last_reload"]["trigger"], "watch");
    assert_eq!(s["last_reload"]["ok"], true);
    let m = scrape(proxy.admin()).await;
    assert_eq!(
        m.value("pgmtls_reloads_total", r#"kind="watch",result="ok""#),
        1.0
    );
    assert_eq!(m.value("pgmtls_config_generation", ""), 2.0);
    assert_eq!(m.value("pgmtls_ip_rules", r#"database="orders""#), 2.0);
}

#[tokio::test]
async fn rules_replaced_by_rename_are_applied() {
    let pki = TestPki::new();
    let (state, proxy) = start(&pki, "");
    let addr = proxy.addr();
    // Temp file + rename, as the CLI and most editors save.
    let written = Instant::now();
    state.write_rules("orders", &[("r3", "127.0.0.3/32")]);
    let line = proxy.wait_for_log(WAIT, reloaded(2));
    eprintln!("reload latency, rename -> applied: {:?}", written.elapsed());
    assert!(line["changes"]
        .as_str()
        .unwrap()
        .contains("ip rules 1 -> 1 (+r3 -r2)"));
    assert!(admits("127.0.0.3", addr).await);
    assert!(!admits("127.0.0.2", addr).await);
}

/// Kubernetes mounts a ConfigMap or Secret as `..TIMESTAMP/` directories, a `..data` symlink to
/// the current one, and top-level symlinks through `..data`. An update writes a new timestamped
/// directory and renames a new symlink over `..data`; no file the proxy reads is written.
#[tokio::test]
async fn kubernetes_data_symlink_swap_is_applied() {
    let pki = TestPki::new();
    let state = TestState::new("");
    let upstream: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let root = &state.root;
    let v1 = root.join("..2026_01_01_00_00_00.000000001");
    write_database(
        &v1.join("databases/orders"),
        &pki,
        "127.0.0.1:0",
        upstream,
        &[("r2", "127.0.0.2/32")],
    );
    std::os::unix::fs::symlink(v1.file_name().unwrap(), root.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/databases", root.join("databases")).unwrap();
    let proxy = ProxyProcess::with_config(&state.config);
    let addr = proxy.addr();
    assert!(admits("127.0.0.2", addr).await);
    assert!(!admits("127.0.0.3", addr).await);

    let v2 = root.join("..2026_01_02_00_00_00.000000002");
    write_database(
        &v2.join("databases/orders"),
        &pki,
        "127.0.0.1:0",
        upstream,
        &[("r3", "127.0.0.3/32")],
    );
    let swapped = Instant::now();
    std::os::unix::fs::symlink(v2.file_name().unwrap(), root.join("..data_tmp")).unwrap();
    std::fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
    std::fs::remove_dir_all(&v1).unwrap();
    let line = proxy.wait_for_log(WAIT, reloaded(2));
    eprintln!(
        "reload latency, ..data swap -> applied: {:?}",
        swapped.elapsed()
    );
    assert_eq!(line["trigger"], "watch");
    assert!(admits("127.0.0.3", addr).await);
    assert!(!admits("127.0.0.2", addr).await);
    // Only the swap happened: exactly one reload, and it was not rejected half-way.
    assert_eq!(proxy.count_logs(rejected), 0, "{}", proxy.log_text());
}

#[tokio::test]
async fn sighup_reloads_through_the_same_path() {
    let pki = TestPki::new();
    let (_state, proxy) = start(&pki, "");
    proxy.signal("HUP");
    let line = proxy.wait_for_log(WAIT, |v| {
        v["message"] == "configuration unchanged" && v["trigger"] == "sighup"
    });
    assert_eq!(line["generation"], 1, "nothing changed, nothing swapped");
    let s = status(proxy.admin()).await;
    assert_eq!(s["last_reload"]["trigger"], "sighup");
    assert_eq!(s["last_reload"]["ok"], true);
    assert_eq!(s["generation"], 1);
    let m = scrape(proxy.admin()).await;
    assert_eq!(
        m.value("pgmtls_reloads_total", r#"kind="sighup",result="ok""#),
        1.0
    );
    assert_eq!(
        m.value("pgmtls_reloads_total", r#"kind="startup",result="ok""#),
        1.0
    );
}

/// Each broken change is rejected as a whole: the previous rules keep working, the error names
/// the file and the key, `/status` and the error counter show it until a good change arrives.
/// The breakages pile up (each step changes one file), so each step is exactly one reload.
#[tokio::test]
async fn broken_changes_keep_the_previous_rules_and_show_in_status_and_metrics() {
    let pki = TestPki::new();
    let (state, proxy) = start(&pki, "");
    let addr = proxy.addr();
    let admin = proxy.admin();
    let bad_cidr = rules_yaml(&[("r2", "127.0.0.2/32")]).replace("127.0.0.2/32", "127.0.0.300/32");
    // The CRL goes first: it is parsed only once every file has loaded, so later breakages
    // would hide it.
    let steps: [(&str, &str, &[u8], u32, &str); 4] = [
        (
            "CRL that does not parse",
            "crl.pem",
            b"-----BEGIN X509 CRL-----\nMAA=\n-----END X509 CRL-----\n",
            0o644,
            "crl.pem",
        ),
        (
            "bad CIDR",
            "ip-rules.yaml",
            bad_cidr.as_bytes(),
            0o644,
            "rules[0].cidr",
        ),
        (
            "bad YAML",
            "ip-rules.yaml",
            b"rules: [\n  - id: x\n",
            0o644,
            "ip-rules.yaml: error: line 2",
        ),
        (
            "key readable by others",
            "server.key",
            pki.server.key_pem.as_bytes(),
            0o644,
            "server.key: private key has permissions 0644",
        ),
    ];
    for (n, (what, file, bytes, mode, expect)) in steps.into_iter().enumerate() {
        state.write_file("orders", file, bytes, mode);
        proxy.wait_for_log(WAIT, |v| {
            rejected(v) && v["errors"].as_str().is_some_and(|e| e.contains(expect))
        });
        let s = status(admin).await;
        assert_eq!(s["generation"], 1, "{what}");
        assert_eq!(s["last_reload"]["ok"], false, "{what}");
        let shown = s["last_reload"]["error"].as_str().unwrap();
        assert!(shown.contains(expect), "{what}: {shown}");
        assert_eq!(rule_ids(&s, "orders"), ["r2"], "{what}");
        let m = scrape(admin).await;
        // One rejection per step: the watch does not reload content it has already read.
        assert_eq!(
            m.value("pgmtls_reloads_total", r#"kind="watch",result="error""#),
            (n + 1) as f64,
            "{what}: {}",
            proxy.log_text()
        );
        assert_eq!(m.value("pgmtls_config_last_reload_successful", ""), 0.0);
        assert!(
            admits("127.0.0.2", addr).await,
            "{what}: previous rules still apply"
        );
        assert!(!admits("127.0.0.3", addr).await, "{what}");
    }
    let cidr = proxy.wait_for_log(WAIT, |v| {
        rejected(v)
            && v["errors"]
                .as_str()
                .is_some_and(|e| e.contains("rules[0].cidr"))
    });
    let text = cidr["errors"].as_str().unwrap();
    assert!(
        text.contains("ip-rules.yaml:"),
        "file and line named: {text}"
    );

    // A good change clears the error.
    state.write_file("orders", "crl.pem", crl_pem(&pki, &[]).as_bytes(), 0o644);
    state.write_file("orders", "server.key", pki.server.key_pem.as_bytes(), 0o600);
    state.write_rules("orders", &[("r3", "127.0.0.3/32")]);
    let s = wait_status(admin, WAIT, |s| s["generation"] == 2).await;
    assert_eq!(s["last_reload"]["ok"], true);
    assert!(s["last_reload"]["error"].is_null());
    assert!(admits("127.0.0.3", addr).await);
    let m = scrape(admin).await;
    assert_eq!(m.value("pgmtls_config_last_reload_successful", ""), 1.0);
}

#[tokio::test]
async fn database_added_starts_serving_and_archived_database_stops() {
    let pki = TestPki::new();
    let (state, proxy) = start(&pki, "");
    let admin = proxy.admin();
    let upstream: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    // Built aside and renamed in, so the reload never sees half a database.
    let staging = state.root.join("databases/.billing.tmp");
    write_database(
        &staging,
        &pki,
        "127.0.0.4:0",
        upstream,
        &[("b2", "127.0.0.2/32")],
    );
    std::fs::rename(&staging, state.db_dir("billing")).unwrap();
    let line = proxy.wait_for_log(WAIT, reloaded(2));
    assert_eq!(line["added"], r#"["billing"]"#);
    let s = status(admin).await;
    let billing = &s["databases"]["billing"];
    assert_eq!(billing["operational"], true, "{s:#}");
    let billing_addr: SocketAddr = billing["listen"].as_str().unwrap().parse().unwrap();
    assert_ne!(billing_addr.port(), 0);
    assert!(admits("127.0.0.2", billing_addr).await);

    // `mtls destroy` moves the folder out of `databases/`.
    std::fs::create_dir_all(state.root.join("archive")).unwrap();
    std::fs::rename(
        state.db_dir("billing"),
        state.root.join("archive/billing-1"),
    )
    .unwrap();
    let line = proxy.wait_for_log(WAIT, reloaded(3));
    assert_eq!(line["removed"], r#"["billing"]"#);
    let s = status(admin).await;
    assert!(s["databases"]["billing"].is_null());
    assert_eq!(s["databases"]["orders"]["operational"], true);
    let m = scrape(admin).await;
    assert!(
        !m.text.contains("database=\"billing\""),
        "series of a removed database stay"
    );
    // The listener is closed: nothing accepts on that port any more.
    proxy.wait_for_log(WAIT, |v| {
        v["message"] == "database disabled; listener closed"
    });
    let refused = tokio::net::TcpStream::connect(billing_addr).await;
    assert!(refused.is_err(), "listener still open");
}

/// The handshake's server certificate, to tell which one the proxy presented.
async fn served_certificate(pki: &TestPki, addr: SocketAddr) -> CertificateDer<'static> {
    let mut roots = rustls::RootCertStore::empty();
    for c in load_certs(&pki.ca.cert_path) {
        roots.add(c).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            load_certs(&pki.client.chain_path),
            load_key(&pki.client.key_path),
        )
        .unwrap();
    let mut tcp = connect_from("127.0.0.2".parse().unwrap(), addr)
        .await
        .unwrap();
    tcp.write_all(&ssl_request()).await.unwrap();
    let mut s = [0u8; 1];
    tcp.read_exact(&mut s).await.unwrap();
    assert_eq!(s[0], b'S');
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].clone()
}

#[tokio::test]
async fn rotated_server_certificate_is_served_to_the_next_connection() {
    let pki = TestPki::new();
    let (state, proxy) = start(&pki, "");
    let addr = proxy.addr();
    assert_eq!(served_certificate(&pki, addr).await, pki.server.cert_der());

    // A new server certificate and key from the same CA, written key first.
    let rotated = server_cert(&pki);
    state.write_file("orders", "server.key", rotated.1.as_bytes(), 0o600);
    state.write_file("orders", "server.crt", rotated.0.as_bytes(), 0o644);
    proxy.wait_for_log(WAIT, |v| {
        v["message"] == "configuration reloaded"
            && v["changes"]
                .as_str()
                .is_some_and(|c| c.contains("server certificate replaced"))
    });
    let served = served_certificate(&pki, addr).await;
    assert_ne!(served, pki.server.cert_der());
    let expected = load_certs_from_pem(&rotated.0);
    assert_eq!(served, expected[0]);
    let s = status(proxy.admin()).await;
    assert!(s["databases"]["orders"]["server_cert_expires_at"].is_string());
}

fn load_certs_from_pem(pem: &str) -> Vec<CertificateDer<'static>> {
    use rustls_pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap()
}

#[tokio::test]
async fn config_file_changes_that_need_a_restart_are_named_in_the_log() {
    let pki = TestPki::new();
    let (state, proxy) = start(&pki, "");
    state.write_config("max_connections: 5\nenforce_on_live_sessions: false\n");
    let line = proxy.wait_for_log(WAIT, |v| {
        v["message"] == "config file changed; restart pgmtls to apply these keys"
    });
    assert_eq!(line["keys"], r#"["max_connections"]"#);
    proxy.wait_for_log(WAIT, |v| {
        v["message"] == "enforce_on_live_sessions changed" && v["enforce_on_live_sessions"] == false
    });
    // A broken config file is a rejected reload like any other.
    state.write_config("max_connections: lots\n");
    let line = proxy.wait_for_log(WAIT, rejected);
    assert!(
        line["errors"]
            .as_str()
            .unwrap()
            .contains("pgmtls.yaml:4: max_connections"),
        "{line}"
    );
    let s = status(proxy.admin()).await;
    assert_eq!(s["last_reload"]["ok"], false);
}

#[tokio::test]
async fn crl_change_is_described_in_the_reload_line() {
    let pki = TestPki::new();
    let (state, proxy) = start(&pki, "");
    state.add_certificate_record("orders", "app-1", &pki.client);
    proxy.wait_for_log(WAIT, reloaded(2));
    let m = scrape(proxy.admin()).await;
    let expiry = m.value(
        "pgmtls_client_certificate_expiry_timestamp_seconds",
        r#"database="orders",certificate="app-1""#,
    );
    assert!(expiry > time::OffsetDateTime::now_utc().unix_timestamp() as f64);

    let crl = crl_pem(&pki, &[&pki.client]);
    state.write_file("orders", "crl.pem", crl.as_bytes(), 0o644);
    let line = proxy.wait_for_log(WAIT, reloaded(3));
    assert!(
        line["changes"]
            .as_str()
            .unwrap()
            .contains("orders: crl 0 -> 1 entries"),
        "{line}"
    );
    assert_eq!(line["crl_entries"], 1);
    let s = status(proxy.admin()).await;
    let cert = &s["databases"]["orders"]["certificates"][0];
    assert_eq!(cert["id"], "app-1");
    assert_eq!(cert["revoked"], true);
    assert_eq!(s["databases"]["orders"]["crl_entries"], 1);
    // A revoked certificate no longer has an expiry series to alert on.
    let m = scrape(proxy.admin()).await;
    assert!(!m.text.contains(r#"certificate="app-1""#));
    assert_eq!(m.value("pgmtls_crl_entries", r#"database="orders""#), 1.0);
}

/// Quick mode has no state directory: it watches the directories of its PEM files.
#[tokio::test]
async fn quick_mode_follows_its_crl_file() {
    let pki = TestPki::new();
    let crl = pki.dir().join("quick.crl.pem");
    std::fs::write(&crl, crl_pem(&pki, &[])).unwrap();
    let upstream: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let proxy = ProxyProcess::quick(
        &pki,
        upstream,
        &["127.0.0.2/32"],
        &["--crl", common::proxy::path(&crl)],
    );
    let addr = proxy.addr();
    served_certificate(&pki, addr).await;

    pgmtls::state::write_atomic(&crl, crl_pem(&pki, &[&pki.client]).as_bytes(), 0o644).unwrap();
    let line = proxy.wait_for_log(WAIT, reloaded(2));
    assert!(line["changes"]
        .as_str()
        .unwrap()
        .contains("default: crl 0 -> 1 entries"));
    // The revoked client now fails the handshake.
    let _ = handshake_with(
        &pki.ca.cert_path,
        &pki.client.chain_path,
        &pki.client.key_path,
        addr,
    )
    .await;
    proxy.wait_for_refusal("client_cert_revoked");
}

/// A TLS handshake plus one read: with TLS 1.3 a refused client certificate shows only when
/// the server's alert arrives after the client's Finished.
async fn handshake_with(
    ca: &std::path::Path,
    chain: &std::path::Path,
    key: &std::path::Path,
    addr: SocketAddr,
) -> std::io::Result<usize> {
    let mut roots = rustls::RootCertStore::empty();
    for c in load_certs(ca) {
        roots.add(c).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(load_certs(chain), load_key(key))
        .unwrap();
    let mut tcp = connect_from("127.0.0.2".parse().unwrap(), addr).await?;
    tcp.write_all(&ssl_request()).await?;
    let mut s = [0u8; 1];
    tcp.read_exact(&mut s).await?;
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await?;
    let mut b = [0u8; 1];
    tls.read(&mut b).await
}

/// Quick mode's inputs are its command line and PEM files: with none of them changed, a
/// reload changes nothing, not even the content hash.
#[tokio::test]
async fn quick_mode_unchanged_input_keeps_its_content_hash() {
    let pki = TestPki::new();
    let upstream: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let proxy = ProxyProcess::quick(&pki, upstream, &["127.0.0.2/32", "127.0.0.3/32"], &[]);
    proxy.signal("HUP");
    let line = proxy.wait_for_log(WAIT, |v| {
        v["trigger"] == "sighup"
            && (v["message"] == "configuration unchanged"
                || v["message"] == "configuration reloaded")
    });
    assert_eq!(line["message"], "configuration unchanged", "{line}");
    assert_eq!(line["generation"], 1);
}

/// A new database on the address another already serves is refused on its own; the one
/// serving there is untouched.
#[tokio::test]
async fn a_new_database_on_a_taken_listen_address_is_refused_alone() {
    let pki = TestPki::new();
    let (state, proxy) = start(&pki, "");
    let addr = proxy.addr();
    let upstream: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let staging = state.root.join("databases/.billing.tmp");
    // `orders` is configured as 127.0.0.1:0 too.
    write_database(
        &staging,
        &pki,
        "127.0.0.1:0",
        upstream,
        &[("b2", "127.0.0.2/32")],
    );
    std::fs::rename(&staging, state.db_dir("billing")).unwrap();
    let line = proxy.wait_for_log(WAIT, rejected);
    let errors = line["errors"].as_str().unwrap();
    assert!(
        errors.contains("billing/database.yaml: listen: 127.0.0.1:0 is also the listen address of database orders"),
        "{line}"
    );
    let s = status(proxy.admin()).await;
    assert!(s["databases"]["billing"].is_null(), "{s:#}");
    assert!(s["last_reload"]["database_errors"]["billing"].is_string());
    assert!(s["databases"]["orders"]["reload_error"].is_null());
    assert!(admits("127.0.0.2", addr).await);
}

/// `serve` started before its state directory exists (README step 0 order, or a typo fixed
/// later): once the directory appears it is watched, so a change written into it afterwards is
/// applied at once, not at the next poll.
#[test]
fn a_state_directory_created_after_start_is_watched_from_then_on() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let config = dir.path().join("pgmtls.yaml");
    // The poll is an hour away: only the watch can see what happens in this test.
    std::fs::write(
        &config,
        format!(
            "state_dir: {}\nadmin_listen: \"off\"\nreload_poll_interval: 1h\n",
            state.display()
        ),
    )
    .unwrap();
    let proxy = ProxyProcess::spawn(&["--config", config.to_str().unwrap()]);
    proxy.wait_for_log(WAIT, |v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("state directory does not exist yet"))
    });
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgmtls"))
            .args(args)
            .args(["--state-dir", state.to_str().unwrap()])
            .env_remove("PGMTLS_CONFIG")
            .env_remove("PGMTLS_STATE_DIR")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    cli(&[
        "mtls",
        "create",
        "app",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        "127.0.0.1:5432",
        "--confirm",
        "app",
    ]);
    proxy.wait_for_log(WAIT, |v| {
        v["message"] == "configuration reloaded" && v["databases"] == 1
    });
    let generation = proxy.wait_for_log(WAIT, |v| {
        v["message"] == "listening" && v["database"] == "app"
    });
    drop(generation);
    cli(&["ip-rules", "create", "app", "--cidr", "10.0.0.0/8"]);
    let line = proxy.wait_for_log(Duration::from_secs(10), |v| {
        v["message"] == "configuration reloaded" && v["ip_rules"] == 1
    });
    assert_eq!(line["trigger"], "watch", "{line}");
}
