//! Full mutual-TLS connections per second of proxy CPU on one data-plane thread, against a
//! minimal fake upstream (no Postgres in the loop): SSLRequest, TLS 1.3 with an ECDSA P-256
//! client certificate, StartupMessage, upstream dial and the upstream's AuthenticationOk /
//! BackendKeyData / ReadyForQuery, Terminate. CPU is read from the data-plane thread's
//! /proc entry, so client work in the same process is not counted. Logging is off.
//!
//!   cargo bench --bench handshake_rate [-- CONNECTIONS]

#![allow(clippy::expect_used, clippy::unwrap_used)] // set-up failures in a bench are bugs

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use pgmtls::app::{App, QuickSpec, Source};
use pgmtls::config::Config;
use pgmtls::listener::DataPlane;
use pgmtls::pki::{create_ca, issue_client, issue_server, CaSigner, KeyType};
use pgmtls::state::{UpstreamAddr, UpstreamTls};
use pgmtls::tls_store::provider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;

fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(2000);
    // PGMTLS_BENCH_LOG=json|text: include the cost of the per-connection log line (to a sink).
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
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(n));
}

async fn run(n: usize) {
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
    let (cert, key, ca_path) = (
        write("server.crt", &server.cert_pem),
        write("server.key", &server.key_pem),
        write("ca.crt", &ca.cert_pem),
    );

    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up_addr = upstream.local_addr().unwrap();
    tokio::spawn(fake_upstream(upstream));

    let spec = QuickSpec {
        name: "bench".into(),
        listen: "127.0.0.1:0".parse().unwrap(),
        upstream: UpstreamAddr {
            host: "127.0.0.1".into(),
            port: up_addr.port(),
        },
        upstream_tls: UpstreamTls::Disable,
        upstream_ca: None,
        cert,
        key,
        client_ca: ca_path,
        crl: None,
        allow: vec!["127.0.0.1/32".parse().unwrap()],
        allow_plaintext_remote_upstream: false,
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
    cfg.resumption = rustls::client::Resumption::disabled();
    let connector = TlsConnector::from(Arc::new(cfg));

    // Warm up, then measure.
    connect_many(&connector, addr, 50).await;
    let (user0, sys0) = data_thread_cpu_seconds();
    let t0 = Instant::now();
    connect_many(&connector, addr, n).await;
    let wall = t0.elapsed().as_secs_f64();
    let (user1, sys1) = data_thread_cpu_seconds();
    let (user, sys) = (user1 - user0, sys1 - sys0);
    let cpu = user + sys;
    println!(
        "connections: {n}  wall: {wall:.2} s  data-plane thread CPU: {cpu:.2} s \
         (user {:.0} µs + kernel {:.0} µs per connection)",
        user * 1e6 / n as f64,
        sys * 1e6 / n as f64
    );
    println!(
        "proxy CPU per connection: {:.0} µs  =>  {:.0} full mTLS connections per second per core",
        cpu * 1e6 / n as f64,
        n as f64 / cpu
    );
}

async fn connect_many(connector: &TlsConnector, addr: SocketAddr, n: usize) {
    let per_task = n.div_ceil(8);
    let mut tasks = Vec::new();
    for t in 0..8 {
        let connector = connector.clone();
        let count = per_task.min(n.saturating_sub(t * per_task));
        tasks.push(tokio::spawn(async move {
            for _ in 0..count {
                one_session(&connector, addr).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

async fn one_session(connector: &TlsConnector, addr: SocketAddr) {
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
    tls.write_all(&[b'X', 0, 0, 0, 4]).await.unwrap();
    let _ = tls.shutdown().await;
}

/// Answers any StartupMessage with AuthenticationOk, BackendKeyData and ReadyForQuery.
async fn fake_upstream(l: TcpListener) {
    let mut pid = 1u32;
    loop {
        let (mut s, _) = l.accept().await.unwrap();
        pid += 1;
        tokio::spawn(async move {
            let mut len = [0u8; 4];
            if s.read_exact(&mut len).await.is_err() {
                return;
            }
            let mut body = vec![0u8; u32::from_be_bytes(len) as usize - 4];
            if s.read_exact(&mut body).await.is_err() {
                return;
            }
            let mut out = vec![b'R', 0, 0, 0, 8, 0, 0, 0, 0, b'K', 0, 0, 0, 12];
            out.extend_from_slice(&pid.to_be_bytes());
            out.extend_from_slice(&7u32.to_be_bytes());
            out.extend_from_slice(&[b'Z', 0, 0, 0, 5, b'I']);
            let _ = s.write_all(&out).await;
            let mut sink = Vec::new();
            let _ = s.read_to_end(&mut sink).await;
        });
    }
}

/// (utime, stime) of the thread named `pgmtls-data-0`, in seconds.
fn data_thread_cpu_seconds() -> (f64, f64) {
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
