//! Cancels across replicas: two pgmtls replicas behind a real HAProxy (round robin, PROXY v2)
//! and a real Postgres. Round robin sends a client's cancel connection to the replica after
//! the one relaying its session, so every cancel here crosses the peer channel. The same with
//! three replicas on a real etcd and no `peers:` list: the replica registry is the directory.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::clients::{
    connect_from, free_port, pg_connect_tls, tls_client_config, Psql, SslNegotiation,
};
use common::etcd::{etcd_available_or_skip, EtcdServer};
use common::haproxy::{haproxy_available_or_skip, HaProxy};
use common::pg::{pg_available_or_skip, PgServer, APP_DB, APP_PASSWORD, APP_USER};
use common::pki::TestPki;
use common::proxy::ProxyProcess;
use common::state::TestState;
use common::wire::{cancel_request, protocol_32_upstream};
use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::error::SqlState;
use tokio_postgres_rustls::MakeRustlsConnect;

const SLEEP_SQL: &str = "SELECT pg_sleep(60)";
const ROUNDS: usize = 10;

/// A CA for the peer channel and certificates under it, as PEM files in `dir`.
struct PeerPki {
    dir: PathBuf,
    issuer: Issuer<'static, KeyPair>,
    pub ca_path: PathBuf,
}

impl PeerPki {
    fn new(dir: &Path, name: &str) -> PeerPki {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} peer CA"));
        let cert = params.self_signed(&key).unwrap();
        let ca_path = dir.join(format!("{name}-ca.crt"));
        std::fs::write(&ca_path, cert.pem()).unwrap();
        PeerPki {
            dir: dir.to_owned(),
            issuer: Issuer::new(params, key),
            ca_path,
        }
    }

    /// A replica's certificate (server and client use) for 127.0.0.1: (cert, key) paths.
    fn issue(&self, name: &str) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (c, k) = (
            self.dir.join(format!("{name}.crt")),
            self.dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }

    fn client_config(&self, cert: &Path, key: &Path) -> rustls::ClientConfig {
        let mut roots = rustls::RootCertStore::empty();
        for c in common::clients::load_certs(&self.ca_path) {
            roots.add(c).unwrap();
        }
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            common::clients::load_certs(cert),
            common::clients::load_key(key),
        )
        .unwrap()
    }
}

struct Fleet {
    pg: PgServer,
    pki: TestPki,
    peer_pki: PeerPki,
    replicas: Vec<ProxyProcess>,
    peer_ports: Vec<u16>,
    lb: HaProxy,
    _state: TestState,
    /// The etcd of an etcd-mode fleet; dropped last.
    _etcd: Option<EtcdServer>,
}

/// `n` replicas sharing one state directory (database `app`, rule for 127.0.0.1, which is
/// where HAProxy's PROXY headers say the clients are), each with its own `pgmtls.yaml`.
fn start_fleet(n: usize) -> Option<Fleet> {
    if !pg_available_or_skip() || !haproxy_available_or_skip() {
        return None;
    }
    let pg = PgServer::start();
    let pki = TestPki::new();
    let state = TestState::new("");
    state.add_database(
        "app",
        &pki,
        "127.0.0.1:0",
        pg.addr(),
        &[("local", "127.0.0.1/32")],
    );
    let peer_pki = PeerPki::new(state.dir(), "fleet");
    let peer_ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
    let mut replicas = Vec::new();
    for i in 0..n {
        let id = i + 1;
        let (cert, key) = peer_pki.issue(&format!("replica{id}"));
        let peers: Vec<String> = (0..n)
            .filter(|j| *j != i)
            .map(|j| format!("{{id: {}, addr: \"127.0.0.1:{}\"}}", j + 1, peer_ports[j]))
            .collect();
        let text = format!(
            "state_dir: state\nadmin_listen: 127.0.0.1:0\nreload_poll_interval: 1h\n\
             proxy_protocol_from: [127.0.0.1/32]\nreplica_id: {id}\n\
             peer_listen: 127.0.0.1:{}\npeers: [{}]\n\
             peer_tls: {{cert: {}, key: {}, ca: {}}}\n",
            peer_ports[i],
            peers.join(", "),
            cert.display(),
            key.display(),
            peer_pki.ca_path.display(),
        );
        let path = state.dir().join(format!("replica{id}.yaml"));
        std::fs::write(&path, text).unwrap();
        replicas.push(ProxyProcess::with_config(&path));
    }
    for r in &replicas {
        r.wait_for_log(Duration::from_secs(10), |v| {
            v["message"] == "peer channel listening"
        });
    }
    let addrs: Vec<_> = replicas.iter().map(|r| r.addr()).collect();
    let lb = HaProxy::start(&addrs);
    Some(Fleet {
        pg,
        pki,
        peer_pki,
        replicas,
        peer_ports,
        lb,
        _state: state,
        _etcd: None,
    })
}

/// `n` replicas on one etcd prefix with no `peers:` list: each finds the others in the replica
/// registry. The database admits 127.0.0.1 (HAProxy's PROXY headers) and 127.0.0.2 (a client
/// dialling a replica directly).
fn start_etcd_fleet(n: usize) -> Option<Fleet> {
    if !pg_available_or_skip() || !haproxy_available_or_skip() || !etcd_available_or_skip() {
        return None;
    }
    let pg = PgServer::start();
    let etcd = EtcdServer::start();
    let pki = TestPki::new();
    let state = TestState::new("");
    state.add_database(
        "app",
        &pki,
        "127.0.0.1:0",
        pg.addr(),
        &[("local", "127.0.0.1/32"), ("direct", "127.0.0.2/32")],
    );
    etcd.import_state(&state.root, "/pgmtls");
    let peer_pki = PeerPki::new(state.dir(), "fleet");
    let peer_ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
    let mut replicas = Vec::new();
    for (i, port) in peer_ports.iter().enumerate() {
        let id = i + 1;
        let (cert, key) = peer_pki.issue(&format!("replica{id}"));
        let text = format!(
            "etcd:\n  endpoints: [{}]\n  prefix: /pgmtls\n  registry_ttl: 2s\n\
             admin_listen: 127.0.0.1:0\nreload_poll_interval: 1h\n\
             proxy_protocol_from: [127.0.0.1/32]\nreplica_id: {id}\n\
             peer_listen: 127.0.0.1:{port}\n\
             peer_tls: {{cert: {}, key: {}, ca: {}}}\n",
            etcd.endpoint(),
            cert.display(),
            key.display(),
            peer_pki.ca_path.display(),
        );
        let path = state.dir().join(format!("replica{id}.yaml"));
        std::fs::write(&path, text).unwrap();
        replicas.push(ProxyProcess::with_config(&path));
    }
    // Ready when every replica's directory holds every other replica.
    let deadline = Instant::now() + Duration::from_secs(20);
    for r in &replicas {
        while r.count_logs(|v| v["message"] == "peer directory: replica reachable") < n - 1 {
            assert!(
                Instant::now() < deadline,
                "a replica never learnt its peers from the registry: {}",
                r.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let addrs: Vec<_> = replicas.iter().map(|r| r.addr()).collect();
    let lb = HaProxy::start(&addrs);
    Some(Fleet {
        pg,
        pki,
        peer_pki,
        replicas,
        peer_ports,
        lb,
        _state: state,
        _etcd: Some(etcd),
    })
}

/// Waits until Postgres shows the sleep running; there is no event to wait on.
async fn wait_until_sleeping(pg: &PgServer) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let n = pg.superuser_exec(
            "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60)' AND state = 'active'",
        );
        if n == "1" {
            return;
        }
        assert!(Instant::now() < deadline, "the sleep never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the replicas have logged `n` served peer requests with `outcome` (the owner
/// logs after it has answered, so the line may trail the client's result), returns the count.
async fn wait_peer_cancels(f: &Fleet, outcome: &str, n: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let seen = peer_cancels_served(f, outcome);
        if seen >= n || Instant::now() > deadline {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every cancel was forwarded by the replica it reached, and round robin took (nearly) all of
/// them to the replica that does not relay the session: those crossed the peer channel. The
/// first pair's order depends on when HAProxy handles its readiness probe, so one may not.
async fn assert_crossed(f: &Fleet) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let forwarded = |r: &ProxyProcess| {
        r.count_logs(|v| v["message"] == "connection closed" && v["outcome"] == "cancel_forwarded")
    };
    while f.replicas.iter().map(forwarded).sum::<usize>() < ROUNDS {
        assert!(
            Instant::now() < deadline,
            "fewer than {ROUNDS} cancels forwarded"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let crossed = wait_peer_cancels(f, "forwarded", ROUNDS).await;
    assert!(
        crossed >= ROUNDS - 1,
        "only {crossed} of {ROUNDS} cancels crossed replicas"
    );
}

fn peer_cancels_served(f: &Fleet, outcome: &str) -> usize {
    f.replicas
        .iter()
        .map(|r| {
            r.count_logs(|v| {
                v["message"] == "peer cancel request served" && v["outcome"] == outcome
            })
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_in_psql_cancels_through_any_replica_ten_times_out_of_ten() {
    let Some(f) = start_fleet(2) else {
        return;
    };
    psql_ctrl_c_cancels_ten_times(&f).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_in_psql_cancels_through_three_etcd_replicas_without_a_peers_list() {
    let Some(f) = start_etcd_fleet(3) else {
        return;
    };
    psql_ctrl_c_cancels_ten_times(&f).await;
}

/// Ten `pg_sleep(60)`s in psql through the balancer, each stopped with Ctrl-C (SIGINT).
async fn psql_ctrl_c_cancels_ten_times(f: &Fleet) {
    let psql = Psql::new(
        f.pg.psql_path(),
        "127.0.0.1",
        f.lb.addr.port(),
        APP_USER,
        APP_DB,
    )
    .verify_ca(
        &f.pki.ca.cert_path,
        Some((&f.pki.client.chain_path, &f.pki.client.key_path)),
    )
    .password(APP_PASSWORD);
    let mut cancelled = 0;
    for round in 0..ROUNDS {
        let child = tokio::process::Command::new(f.pg.psql_path())
            .arg(psql.conninfo())
            .args(["-X", "-c", SLEEP_SQL])
            .env("PGPASSWORD", APP_PASSWORD)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id().unwrap();
        wait_until_sleeping(&f.pg).await;
        let ok = std::process::Command::new("kill")
            .args(["-INT", &pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
        // A lost cancel leaves the sleep running: psql then returns only when killed.
        let out = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output()).await;
        match out {
            Ok(out) => {
                let stderr = String::from_utf8_lossy(&out.as_ref().unwrap().stderr).to_string();
                if stderr.contains("canceling statement due to user request") {
                    cancelled += 1;
                } else {
                    eprintln!("round {round}: {stderr}");
                }
            }
            Err(_) => {
                eprintln!("round {round}: the cancel was lost");
                f.pg.superuser_exec(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60)'",
                );
            }
        }
    }
    assert_eq!(
        cancelled, ROUNDS,
        "psql's Ctrl-C cancelled {cancelled} of {ROUNDS}"
    );
    assert_crossed(f).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_tls_cancel_through_any_replica_ten_times_out_of_ten() {
    let Some(f) = start_fleet(2) else {
        return;
    };
    tls_cancels_ten_times(&f).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_tls_cancel_through_three_etcd_replicas_without_a_peers_list() {
    let Some(f) = start_etcd_fleet(3) else {
        return;
    };
    tls_cancels_ten_times(&f).await;
}

/// Ten `pg_sleep(60)`s over tokio-postgres through the balancer, each cancelled over TLS.
async fn tls_cancels_ten_times(f: &Fleet) {
    let tls = tls_client_config(
        &f.pki.ca.cert_path,
        Some((&f.pki.client.chain_path, &f.pki.client.key_path)),
        false,
    );
    let mut cancelled = 0;
    for round in 0..ROUNDS {
        let (c, _conn) = pg_connect_tls(
            "127.0.0.1",
            f.lb.addr.port(),
            APP_USER,
            APP_DB,
            Some(APP_PASSWORD),
            tls.clone(),
            SslNegotiation::Postgres,
        )
        .await
        .unwrap();
        let pid: i32 = c
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0);
        let token = c.cancel_token();
        let query = tokio::spawn(async move { c.simple_query(SLEEP_SQL).await.map(|_| ()) });
        wait_until_sleeping(&f.pg).await;
        let sleeping_pid = f
            .pg
            .superuser_exec("SELECT pid FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60)'");
        // The process id the client holds is Postgres' own.
        assert_eq!(sleeping_pid, pid.to_string());
        token
            .cancel_query(MakeRustlsConnect::new(tls.clone()))
            .await
            .expect("cancel through pgmtls");
        match tokio::time::timeout(Duration::from_secs(10), query).await {
            Ok(r) => {
                let err = r.unwrap().unwrap_err();
                if err.code() == Some(&SqlState::QUERY_CANCELED) {
                    cancelled += 1;
                } else {
                    eprintln!("round {round}: {err}");
                }
            }
            Err(_) => {
                eprintln!("round {round}: the cancel was lost");
                f.pg.superuser_exec(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60)'",
                );
            }
        }
    }
    assert_eq!(
        cancelled, ROUNDS,
        "the TLS cancel cancelled {cancelled} of {ROUNDS}"
    );
    assert_crossed(f).await;
}

fn connections_received(pg: &PgServer) -> usize {
    pg.log_contents().matches("connection received").count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_no_replica_relays_reaches_no_postgres_while_a_real_one_crosses() {
    let Some(f) = start_fleet(2) else {
        return;
    };
    let tls = tls_client_config(
        &f.pki.ca.cert_path,
        Some((&f.pki.client.chain_path, &f.pki.client.key_path)),
        false,
    );
    // A live session and its real backend pid, so the guesses below use a pid that exists.
    let (c, _conn) = pg_connect_tls(
        "127.0.0.1",
        f.lb.addr.port(),
        APP_USER,
        APP_DB,
        Some(APP_PASSWORD),
        tls.clone(),
        SslNegotiation::Postgres,
    )
    .await
    .unwrap();
    let pid: i32 = c
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let before = connections_received(&f.pg);

    // Random secrets tagged for replica 1, replica 2, a replica that does not exist, and one
    // with a random first byte, each sent twice so round robin brings it to both replicas.
    let mut guesses = Vec::new();
    for tag in [1u8, 2, 77, rand::random::<u8>()] {
        let mut secret = rand::random::<[u8; 4]>();
        secret[0] = tag;
        guesses.push(secret);
        guesses.push(secret);
    }
    for secret in &guesses {
        let mut s = tokio::net::TcpStream::connect(f.lb.addr).await.unwrap();
        s.write_all(&cancel_request(pid as u32, secret))
            .await
            .unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest).await;
        assert!(rest.is_empty());
    }
    let refused = |r: &ProxyProcess| {
        r.count_logs(|v| {
            v["message"] == "connection closed" && v["error_kind"] == "cancel_unknown_key"
        })
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while f.replicas.iter().map(refused).sum::<usize>() < guesses.len() {
        assert!(Instant::now() < deadline, "not every guess was refused");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A guess tagged for the other replica was asked of it, and it refused too.
    assert!(wait_peer_cancels(&f, "unknown_key", 2).await >= 2);
    assert_eq!(peer_cancels_served(&f, "forwarded"), 0);
    // Not one of them reached Postgres (log_connections logs every connection, cancels too).
    assert_eq!(
        connections_received(&f.pg),
        before,
        "a guessed key reached Postgres"
    );

    // The session's own key still works from either replica.
    let token = c.cancel_token();
    let query = tokio::spawn(async move { c.simple_query(SLEEP_SQL).await.map(|_| ()) });
    wait_until_sleeping(&f.pg).await;
    token
        .cancel_query(MakeRustlsConnect::new(tls.clone()))
        .await
        .unwrap();
    let err = tokio::time::timeout(Duration::from_secs(10), query)
        .await
        .expect("cancelled")
        .unwrap()
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::QUERY_CANCELED));
}

/// Sends one peer request over TLS with `config`; the reply byte, if any.
async fn peer_request(port: u16, config: rustls::ClientConfig, request: &[u8]) -> Option<u8> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = match tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
    {
        Ok(t) => t,
        Err(_) => return None,
    };
    tls.write_all(request).await.ok()?;
    tls.flush().await.ok()?;
    let mut b = [0u8; 1];
    match tokio::time::timeout(Duration::from_secs(10), tls.read_exact(&mut b)).await {
        Ok(Ok(_)) => Some(b[0]),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_with_a_certificate_from_another_ca_is_refused() {
    let Some(f) = start_fleet(2) else {
        return;
    };
    let request = pgmtls::fleet::message::Request {
        database: "app".into(),
        key: pgmtls::wire::frontend::CancelKey::new(1, &[2, 1, 2, 3]).unwrap(),
    }
    .encode();
    let port = f.peer_ports[1];
    // A replica's own certificate is let in and answered: no such session.
    let (cert, key) = f.peer_pki.issue("replica-extra");
    let good = f.peer_pki.client_config(&cert, &key);
    assert_eq!(peer_request(port, good, &request).await, Some(1));

    // The same request with a certificate of another CA gets no answer.
    let stranger_pki = PeerPki::new(f._state.dir(), "stranger");
    let (cert, key) = stranger_pki.issue("stranger");
    let mut roots = rustls::RootCertStore::empty();
    for c in common::clients::load_certs(&f.peer_pki.ca_path) {
        roots.add(c).unwrap();
    }
    let stranger = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(
        common::clients::load_certs(&cert),
        common::clients::load_key(&key),
    )
    .unwrap();
    assert_eq!(peer_request(port, stranger, &request).await, None);
    // So does a database client's certificate: the client CA is not the peer CA.
    let (client_cert, client_key) = (&f.pki.client.chain_path, &f.pki.client.key_path);
    let app_client = f.peer_pki.client_config(client_cert, client_key);
    assert_eq!(peer_request(port, app_client, &request).await, None);
    let line = f.replicas[1].wait_for_nth_log(2, Duration::from_secs(10), |v| {
        v["message"] == "peer cancel request refused" && v["reason"] == "peer_tls"
    });
    assert!(line["detail"].as_str().unwrap().contains("TLS"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_peer_request_is_refused_and_the_channel_keeps_serving() {
    let Some(f) = start_fleet(2) else {
        return;
    };
    let port = f.peer_ports[0];
    let (cert, key) = f.peer_pki.issue("replica-probe");
    let good = pgmtls::fleet::message::Request {
        database: "app".into(),
        key: pgmtls::wire::frontend::CancelKey::new(1, &[1, 9, 9, 9]).unwrap(),
    }
    .encode();
    let mut bad_magic = good.clone();
    bad_magic[0] = b'X';
    let mut bad_version = good.clone();
    bad_version[4] = 2;
    // A secret length of 0 (the two bytes before the secret).
    let mut bad_secret = good[..good.len() - 4].to_vec();
    let at = bad_secret.len() - 2;
    bad_secret[at..].copy_from_slice(&0u16.to_be_bytes());
    for bad in [bad_magic, bad_version, bad_secret] {
        let reply = peer_request(port, f.peer_pki.client_config(&cert, &key), &bad).await;
        assert_eq!(reply, None, "a malformed request got an answer");
    }
    f.replicas[0].wait_for_nth_log(3, Duration::from_secs(10), |v| {
        v["message"] == "peer cancel request refused" && v["reason"] == "peer_message_invalid"
    });
    // The channel still answers a well-formed request: no session has that key.
    let reply = peer_request(port, f.peer_pki.client_config(&cert, &key), &good).await;
    assert_eq!(reply, Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancels_beyond_the_per_source_budget_are_refused() {
    let Some(f) = start_fleet(2) else {
        return;
    };
    // 60 guesses from one client address, half to each replica: more than a burst of 20 each.
    const SENT: usize = 60;
    for _ in 0..SENT {
        let mut s = tokio::net::TcpStream::connect(f.lb.addr).await.unwrap();
        let mut secret = rand::random::<[u8; 4]>();
        secret[0] = 1;
        s.write_all(&cancel_request(4242, &secret)).await.unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest).await;
    }
    // Refusal log lines are themselves rate-limited; the counters are exact.
    let mut total = (0.0, 0.0);
    let deadline = Instant::now() + Duration::from_secs(20);
    while total.0 + total.1 < SENT as f64 {
        assert!(
            Instant::now() < deadline,
            "not every cancel was answered: {total:?}"
        );
        total = (0.0, 0.0);
        for r in &f.replicas {
            let m = common::admin::scrape(r.admin()).await;
            let refused = |reason: &str| {
                m.samples
                    .get(&format!(
                        r#"pgmtls_connections_refused_total{{database="app",reason="{reason}"}}"#
                    ))
                    .copied()
                    .unwrap_or(0.0)
            };
            total.0 += refused("cancel_rate_limited");
            total.1 += refused("cancel_unknown_key");
        }
    }
    let limited = total.0 as usize;
    assert!(limited >= 1, "no cancel was rate-limited: {total:?}");
}

/// Three replicas in quick mode, the fleet given by flags and environment variables.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_quick_mode_replicas_cancel_across_the_peer_channel() {
    if !pg_available_or_skip() || !haproxy_available_or_skip() {
        return;
    }
    let pg = PgServer::start();
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let peer_pki = PeerPki::new(dir.path(), "quick");
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let mut replicas = Vec::new();
    for i in 0..3usize {
        let (cert, key) = peer_pki.issue(&format!("q{}", i + 1));
        let id = (i + 1).to_string();
        let listen = format!("127.0.0.1:{}", ports[i]);
        let peers: Vec<String> = (0..3)
            .filter(|j| *j != i)
            .map(|j| format!("{}=127.0.0.1:{}", j + 1, ports[j]))
            .collect();
        let mut extra: Vec<String> = vec![
            "--proxy-protocol-from".into(),
            "127.0.0.1/32".into(),
            "--replica-id".into(),
            id,
            "--peer-listen".into(),
            listen,
            "--peer-cert".into(),
            cert.display().to_string(),
            "--peer-key".into(),
            key.display().to_string(),
        ];
        for p in &peers {
            extra.push("--peer".into());
            extra.push(p.clone());
        }
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        // The CA through the environment, as a container would pass it.
        let mut args = vec!["--listen", "127.0.0.1:0", "--upstream"];
        let up = pg.addr().to_string();
        args.push(&up);
        args.extend_from_slice(&[
            "--cert",
            common::proxy::path(&pki.server.chain_path),
            "--key",
            common::proxy::path(&pki.server.key_path),
            "--client-ca",
            common::proxy::path(&pki.ca.cert_path),
            "--admin-listen",
            "off",
            "--allow",
            "127.0.0.1/32",
        ]);
        args.extend_from_slice(&extra);
        let ca = peer_pki.ca_path.display().to_string();
        let r = ProxyProcess::spawn_env(&args, &[("PGMTLS_PEER_CA", &ca)]);
        r.wait_for_log(Duration::from_secs(10), |v| {
            v["message"] == "peer channel listening"
        });
        replicas.push(r);
    }
    let lb = HaProxy::start(&replicas.iter().map(|r| r.addr()).collect::<Vec<_>>());
    let tls = tls_client_config(
        &pki.ca.cert_path,
        Some((&pki.client.chain_path, &pki.client.key_path)),
        false,
    );
    for _ in 0..3 {
        let (c, _conn) = pg_connect_tls(
            "127.0.0.1",
            lb.addr.port(),
            APP_USER,
            APP_DB,
            Some(APP_PASSWORD),
            tls.clone(),
            SslNegotiation::Postgres,
        )
        .await
        .unwrap();
        let token = c.cancel_token();
        let query = tokio::spawn(async move { c.simple_query(SLEEP_SQL).await.map(|_| ()) });
        wait_until_sleeping(&pg).await;
        token
            .cancel_query(MakeRustlsConnect::new(tls.clone()))
            .await
            .unwrap();
        let err = tokio::time::timeout(Duration::from_secs(10), query)
            .await
            .expect("the cancel was lost")
            .unwrap()
            .unwrap_err();
        assert_eq!(err.code(), Some(&SqlState::QUERY_CANCELED));
    }
}

/// In a fleet the client gets a key of the replica's making, for a protocol-3.2 key too: the
/// same process id and length, the replica's id first, and none of the backend's secret. That
/// key cancels; the upstream receives the backend's own key, byte for byte.
#[tokio::test]
async fn a_replica_hands_out_its_own_long_key_and_cancels_with_the_real_one() {
    let pki = TestPki::new();
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up_addr = upstream.local_addr().unwrap();
    let secret: Vec<u8> = (0u8..32).map(|i| i.wrapping_mul(37) ^ 0xa5).collect();
    let (tx, mut cancels) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(protocol_32_upstream(upstream, secret.clone(), tx));
    let dir = tempfile::tempdir().unwrap();
    let peer_pki = PeerPki::new(dir.path(), "long");
    let (cert, key) = peer_pki.issue("r7");
    let listen = format!("127.0.0.1:{}", free_port());
    let proxy = ProxyProcess::quick(
        &pki,
        up_addr,
        &["127.0.0.1/32"],
        &[
            "--replica-id",
            "7",
            "--peer-listen",
            &listen,
            "--peer-cert",
            common::proxy::path(&cert),
            "--peer-key",
            common::proxy::path(&key),
            "--peer-ca",
            common::proxy::path(&peer_pki.ca_path),
        ],
    );

    let mut tcp = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
    tcp.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
        .await
        .unwrap();
    let mut s = [0u8; 1];
    tcp.read_exact(&mut s).await.unwrap();
    assert_eq!(&s, b"S");
    let tls = tls_client_config(
        &pki.ca.cert_path,
        Some((&pki.client.chain_path, &pki.client.key_path)),
        false,
    );
    let mut session = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(
            rustls_pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    let startup = pgmtls::wire::frontend::StartupParams {
        minor: 2,
        params: vec![("user".into(), "app".into())],
    };
    session.write_all(&startup.encode()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    while !got.ends_with(&[b'Z', 0, 0, 0, 5, b'I']) {
        let n = session.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed before ReadyForQuery");
        got.extend_from_slice(&buf[..n]);
    }
    let head = [b'K', 0, 0, 0, 40, 0, 0, 0x10, 0x92]; // length 40, pid 4242
    let at = got
        .windows(head.len())
        .position(|w| w == head)
        .expect("a 32-byte BackendKeyData with the backend's pid");
    let visible = got[at + head.len()..at + head.len() + 32].to_vec();
    assert_eq!(visible[0], 7, "the key names this replica");
    assert_ne!(visible, secret);
    assert!(
        !got.windows(8).any(|w| secret.windows(8).any(|s| s == w)),
        "the backend's secret reached the client"
    );

    // The backend's own key, sent by a client, is not one this proxy handed out.
    let mut c = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
    c.write_all(&cancel_request(4242, &secret)).await.unwrap();
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).await.unwrap();
    proxy.wait_for_refusal("cancel_unknown_key");

    // The key the client holds cancels, and the upstream gets the real one.
    let mut c = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
    c.write_all(&cancel_request(4242, &visible)).await.unwrap();
    let forwarded = tokio::time::timeout(Duration::from_secs(10), cancels.recv())
        .await
        .expect("the cancel reaches the upstream")
        .unwrap();
    assert_eq!(forwarded, cancel_request(4242, &secret));
    assert!(
        cancels.try_recv().is_err(),
        "the real key was forwarded too"
    );
    drop(session);
}

/// Sends a CancelRequest for `pid` with a random secret tagged for replica `tag` straight to
/// `to` from 127.0.0.2 (no balancer, no PROXY header) and reads until it closes.
async fn cancel_tagged(to: std::net::SocketAddr, pid: u32, tag: u8) {
    let mut s = connect_from("127.0.0.2".parse().unwrap(), to)
        .await
        .unwrap();
    let mut secret = rand::random::<[u8; 4]>();
    secret[0] = tag;
    s.write_all(&cancel_request(pid, &secret)).await.unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest).await;
}

async fn refused_with(r: &ProxyProcess, reason: &str) -> f64 {
    let m = common::admin::scrape(r.admin()).await;
    m.samples
        .get(&format!(
            r#"pgmtls_connections_refused_total{{database="app",reason="{reason}"}}"#
        ))
        .copied()
        .unwrap_or(0.0)
}

/// A replica that leaves the registry (here: drained with SIGTERM, which revokes its lease)
/// is no longer a cancel target: the others answer a key of its making with
/// `cancel_peer_unavailable` and do not dial it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_leaves_the_registry_is_no_longer_a_cancel_target() {
    let Some(mut f) = start_etcd_fleet(3) else {
        return;
    };
    let first = f.replicas[0].addr();
    // While replica 3 is registered, replica 1 asks it, and 3 knows no such session.
    cancel_tagged(first, 4242, 3).await;
    assert_eq!(wait_peer_cancels(&f, "unknown_key", 1).await, 1);
    assert_eq!(
        refused_with(&f.replicas[0], "cancel_unknown_key").await,
        1.0
    );

    f.replicas[2].signal("TERM");
    f.replicas[2].wait_exit(Duration::from_secs(20));
    let left = f.replicas[0].wait_for_log(Duration::from_secs(20), |v| {
        v["message"] == "peer directory: replica left the registry; no longer a cancel target"
    });
    assert_eq!(left["replica_id"], 3, "{left}");

    cancel_tagged(first, 4242, 3).await;
    let line = f.replicas[0].wait_for_log(Duration::from_secs(10), |v| {
        v["message"] == "connection closed" && v["error_kind"] == "cancel_peer_unavailable"
    });
    let detail = line["detail"].as_str().unwrap();
    assert!(
        detail.contains("replica 3 has left the replica registry"),
        "{line}"
    );
    assert_eq!(
        refused_with(&f.replicas[0], "cancel_peer_unavailable").await,
        1.0
    );
    // A key of a replica still registered is still asked of it.
    cancel_tagged(first, 4242, 2).await;
    assert_eq!(wait_peer_cancels(&f, "unknown_key", 2).await, 2);
}
