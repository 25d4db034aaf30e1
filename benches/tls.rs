//! TLS costs on one core, in memory (no sockets, no Postgres): full mutual-TLS handshakes with
//! the exact `ServerConfig` pgmtls serves (ECDSA P-256 server and client certificates, client
//! certificate verified against the CA and CRL), and record encryption + decryption of 16 KiB
//! relay chunks. Run with `cargo bench --bench tls`; compare with `openssl speed` figures.

#![allow(clippy::expect_used)] // set-up failures in a benchmark are bugs to see at once

use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use pgmtls::pki::{build_crl, create_ca, issue_client, issue_server, CaSigner, KeyType};
use pgmtls::state::MaterialPaths;
use pgmtls::tls_store::{build_server_tls, provider, ALPN_POSTGRESQL};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConnection};
use time::{Duration, OffsetDateTime};

struct Setup {
    server: Arc<rustls::ServerConfig>,
    client: Arc<ClientConfig>,
}

fn setup() -> Setup {
    let ca = create_ca("bench ca", KeyType::EcdsaP256, Duration::days(30)).expect("ca");
    let signer = CaSigner::from_issued(&ca).expect("signer");
    let server = issue_server(
        &signer,
        &["localhost".into()],
        KeyType::EcdsaP256,
        Duration::days(30),
    )
    .expect("server");
    let now = OffsetDateTime::now_utc();
    let client = issue_client(
        &signer,
        "bench",
        KeyType::EcdsaP256,
        now - Duration::minutes(5),
        now + Duration::days(30),
    )
    .expect("client");
    let crl = build_crl::<&str>(&signer, &[], 1, now, now + Duration::days(30)).expect("crl");
    let tls = build_server_tls(
        &MaterialPaths::in_dir(Path::new("bench")),
        server.cert_pem.as_bytes(),
        server.key_pem.as_bytes(),
        ca.cert_pem.as_bytes(),
        Some(crl.as_bytes()),
        &std::collections::HashSet::new(),
    )
    .expect("server tls");
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.cert_pem.as_bytes()).expect("ca der"))
        .expect("root");
    let chain = vec![CertificateDer::from_pem_slice(client.cert_pem.as_bytes()).expect("cert")];
    let key = PrivateKeyDer::from_pem_slice(client.key_pem.as_bytes()).expect("key");
    let mut client_cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .expect("client auth");
    client_cfg.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    // libpq never resumes; neither does this client, so every iteration is a full handshake.
    client_cfg.resumption = rustls::client::Resumption::disabled();
    Setup {
        server: tls.config,
        client: Arc::new(client_cfg),
    }
}

/// Moves TLS bytes from one side to the other until neither has anything to send.
fn pump(client: &mut ClientConnection, server: &mut ServerConnection, buf: &mut Vec<u8>) {
    loop {
        let mut moved = false;
        while client.wants_write() {
            buf.clear();
            client.write_tls(buf).expect("client write");
            server.read_tls(&mut &buf[..]).expect("server read");
            server.process_new_packets().expect("server process");
            moved = true;
        }
        while server.wants_write() {
            buf.clear();
            server.write_tls(buf).expect("server write");
            client.read_tls(&mut &buf[..]).expect("client read");
            client.process_new_packets().expect("client process");
            moved = true;
        }
        if !moved {
            return;
        }
    }
}

fn connected(s: &Setup) -> (ClientConnection, ServerConnection) {
    let name = ServerName::try_from("localhost").expect("name");
    let mut c = ClientConnection::new(s.client.clone(), name).expect("client");
    let mut sv = ServerConnection::new(s.server.clone()).expect("server");
    let mut buf = Vec::with_capacity(32 * 1024);
    pump(&mut c, &mut sv, &mut buf);
    assert!(!c.is_handshaking() && !sv.is_handshaking());
    (c, sv)
}

fn bench_handshake(c: &mut Criterion) {
    let s = setup();
    c.bench_function("mtls_handshake/p256_x25519_both_sides", |b| {
        b.iter(|| connected(&s))
    });
}

fn bench_records(c: &mut Criterion) {
    let s = setup();
    let (mut client, mut server) = connected(&s);
    let chunk = vec![0x5au8; 16 * 1024];
    let mut wire = Vec::with_capacity(64 * 1024);
    let mut plain = vec![0u8; 16 * 1024];
    let mut g = c.benchmark_group("relay_record");
    g.throughput(Throughput::Bytes(chunk.len() as u64));
    g.bench_function("encrypt_then_decrypt_16KiB", |b| {
        b.iter(|| {
            server.writer().write_all(&chunk).expect("write");
            wire.clear();
            while server.wants_write() {
                server.write_tls(&mut wire).expect("tls");
            }
            let mut rest = &wire[..];
            while !rest.is_empty() {
                client.read_tls(&mut rest).expect("read");
                client.process_new_packets().expect("process");
            }
            client.reader().read_exact(&mut plain).expect("plaintext");
        })
    });
    g.finish();
}

criterion_group!(benches, bench_handshake, bench_records);
criterion_main!(benches);
