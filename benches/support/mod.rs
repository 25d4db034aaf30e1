//! What the standalone data-plane benches share: a throwaway PKI, a real pgmtls on one
//! data-plane thread in front of a fake upstream, a client that gets a session to
//! ReadyForQuery, and the data-plane thread's CPU time from /proc.

#![allow(clippy::expect_used, clippy::unwrap_used, dead_code)] // set-up failures in a bench are bugs

use std::net::SocketAddr;
use std::sync::Arc;

use pgmtls::app::{App, QuickSpec, Source};
use pgmtls::config::Config;
use pgmtls::listener::DataPlane;
use pgmtls::pki::{create_ca, issue_client, issue_server, CaSigner, KeyType};
use pgmtls::state::{UpstreamAddr, UpstreamTls};
use pgmtls::tls_store::provider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// `PGMTLS_BENCH_LOG=json|text` includes the cost of the per-connection log line (to a sink).
pub fn init_logging() {
    match std::env::var("PGMTLS_BENCH_LOG").as_deref() {
        Ok("json") => tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_writer(std::io::sink)
            .init(),
        Ok("text") => tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(std::io::sink)
            .init(),
        _ => {}
    }
}

/// pgmtls (one data-plane thread, ECDSA P-256 everywhere) in front of `upstream`, and a
/// connector holding a valid client certificate.
pub struct Rig {
    pub app: Arc<App>,
    pub addr: SocketAddr,
    pub connector: TlsConnector,
    _dir: tempfile::TempDir,
}

impl Rig {
    pub async fn start(upstream: SocketAddr) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let ca = create_ca("bench ca", KeyType::EcdsaP256, time::Duration::days(2)).unwrap();
        let signer = CaSigner::from_issued(&ca).unwrap();
        let server = issue_server(
            &signer,
            &["localhost".into()],
            KeyType::EcdsaP256,
            time::Duration::days(2),
        )
        .unwrap();
        let now = time::OffsetDateTime::now_utc();
        let client = issue_client(
            &signer,
            "bench",
            KeyType::EcdsaP256,
            now - time::Duration::minutes(5),
            now + time::Duration::days(1),
        )
        .unwrap();
        let write = |name: &str, text: &str| {
            let p = dir.path().join(name);
            pgmtls::state::write_atomic(&p, text.as_bytes(), 0o600).unwrap();
            p
        };
        let spec = QuickSpec {
            name: "bench".into(),
            listen: "127.0.0.1:0".parse().unwrap(),
            upstream: UpstreamAddr {
                host: upstream.ip().to_string(),
                port: upstream.port(),
            },
            upstream_tls: UpstreamTls::Disable,
            upstream_ca: None,
            cert: write("server.crt", &server.cert_pem),
            key: write("server.key", &server.key_pem),
            client_ca: write("ca.crt", &ca.cert_pem),
            crl: None,
            allow: vec!["127.0.0.1/32".parse().unwrap()],
            allow_plaintext_remote_upstream: false,
            user_must_match_cn: false,
        };
        let app = App::start_on(
            Config::default(),
            Source::Quick(Box::new(spec)),
            DataPlane::start(1).unwrap(),
        )
        .await
        .unwrap();
        let addr = *app.bound_addrs().values().next().unwrap();

        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(ca.cert_pem.as_bytes()).unwrap())
            .unwrap();
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(client.cert_pem.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(client.key_pem.as_bytes()).unwrap(),
            )
            .unwrap();
        // libpq never resumes; neither does the proxy, but say so on this side too.
        cfg.resumption = rustls::client::Resumption::disabled();
        Rig {
            app,
            addr,
            connector: TlsConnector::from(Arc::new(cfg)),
            _dir: dir,
        }
    }
}

/// SSLRequest, TLS with the client certificate, StartupMessage, then reads up to and
/// including the upstream's ReadyForQuery.
pub async fn session(connector: &TlsConnector, addr: SocketAddr) -> TlsStream<TcpStream> {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    tcp.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
        .await
        .unwrap();
    let mut s = [0u8; 1];
    tcp.read_exact(&mut s).await.unwrap();
    assert_eq!(&s, b"S");
    let mut tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let startup = pgmtls::wire::frontend::StartupParams {
        minor: 0,
        params: vec![("user".into(), "bench".into())],
    };
    tls.write_all(&startup.encode()).await.unwrap();
    tls.flush().await.unwrap();
    let mut buf = vec![0u8; 256];
    let mut got = Vec::new();
    while !got.ends_with(&[b'Z', 0, 0, 0, 5, b'I']) {
        let n = tls.read(&mut buf).await.unwrap();
        assert!(n > 0, "proxy closed before ReadyForQuery");
        got.extend_from_slice(&buf[..n]);
    }
    tls
}

/// Reads one StartupMessage from a fresh upstream socket and answers AuthenticationOk,
/// BackendKeyData and ReadyForQuery, as a trusting Postgres would. False if the peer left.
pub async fn fake_startup(s: &mut TcpStream, pid: u32) -> bool {
    let mut len = [0u8; 4];
    if s.read_exact(&mut len).await.is_err() {
        return false;
    }
    let Some(body_len) = (u32::from_be_bytes(len) as usize).checked_sub(4) else {
        return false;
    };
    let mut body = vec![0u8; body_len];
    if s.read_exact(&mut body).await.is_err() {
        return false;
    }
    let mut out = vec![b'R', 0, 0, 0, 8, 0, 0, 0, 0, b'K', 0, 0, 0, 12];
    out.extend_from_slice(&pid.to_be_bytes());
    out.extend_from_slice(&7u32.to_be_bytes());
    out.extend_from_slice(&[b'Z', 0, 0, 0, 5, b'I']);
    s.write_all(&out).await.is_ok()
}

/// (utime, stime) of the thread named `pgmtls-data-0`, in seconds.
pub fn data_thread_cpu_seconds() -> (f64, f64) {
    let ticks = 100.0; // USER_HZ on Linux
    for entry in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if comm.trim() == "pgmtls-data-0" {
            let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap();
            // Fields after the parenthesised name: state is field 3; utime 14, stime 15.
            let rest = &stat[stat.rfind(')').unwrap() + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            let utime: f64 = f[11].parse().unwrap();
            let stime: f64 = f[12].parse().unwrap();
            return (utime / ticks, stime / ticks);
        }
    }
    panic!("no pgmtls-data-0 thread");
}
