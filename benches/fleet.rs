//! Fleet figures with real parts: a throwaway etcd, real pgmtls replica processes, the real
//! CLI and (for cancels) a real PostgreSQL.
//!
//! - `propagation`: three replicas follow one etcd prefix; 100 changes are made with the CLI
//!   (`ip-rules create` / `delete`, alternating), and for each the time is taken until every
//!   replica's registry entry says it serves a revision that includes the change (what
//!   `pgmtls fleet` and the status words read). Measured from the CLI's start (the operator's
//!   Enter) and from its exit.
//! - `cancel`: two replicas with the peer channel; a session on replica 1 runs
//!   `pg_sleep(60)`, and a CancelRequest (inside TLS, as libpq 17 sends it) is sent to replica 1 itself (local) or to
//!   replica 2 (forwarded over the peer mTLS channel). The time is from sending the cancel to
//!   the client seeing 57014.
//!
//!   cargo bench --bench fleet [-- propagation|cancel] [-- ROUNDS]

#![allow(clippy::expect_used, clippy::unwrap_used)] // set-up failures in a bench are bugs

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::clients::{free_port, pg_connect_tls, tls_client_config, SslNegotiation};
use common::etcd::EtcdServer;
use common::pg::{PgServer, APP_DB, APP_PASSWORD, APP_USER};
use common::pki::TestPki;
use common::proxy::ProxyProcess;
use common::state::TestState;
use etcd_client::{GetOptions, WatchOptions};
use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres_rustls::MakeRustlsConnect;

const BIN: &str = env!("CARGO_BIN_EXE_pgmtls");
const PREFIX: &str = "/pgmtls";
const WAIT: Duration = Duration::from_secs(30);
/// Time between two cancels, under the per-source cancel budget (5 a second).
const CANCEL_PACE: Duration = Duration::from_millis(250);

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rounds: Option<usize> = args.iter().find_map(|a| a.parse().ok());
    let only = |name: &str| {
        !args.iter().any(|a| a == "propagation" || a == "cancel") || args.iter().any(|a| a == name)
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    if only("propagation") {
        rt.block_on(propagation(rounds.unwrap_or(100)));
    }
    if only("cancel") {
        rt.block_on(cancel(rounds.unwrap_or(50)));
    }
}

/// p50 / p99 / max of `v` in milliseconds, as one line.
fn summary(v: &mut [f64]) -> String {
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    format!(
        "p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms  (n = {})",
        at(0.5),
        at(0.99),
        v[v.len() - 1],
        v.len()
    )
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

async fn propagation(changes: usize) {
    let etcd = EtcdServer::start();
    let pki = TestPki::new();
    let state = TestState::new("");
    // The upstream is never dialled: no client connects in this bench.
    state.add_database(
        "orders",
        &pki,
        "127.0.0.1:0",
        "127.0.0.1:9".parse().unwrap(),
        &[],
    );
    etcd.import_state(&state.root, PREFIX);
    let operator = state.dir().join("operator.yaml");
    std::fs::write(
        &operator,
        format!(
            "etcd:\n  endpoints: [{}]\n  prefix: {PREFIX}\n",
            etcd.endpoint()
        ),
    )
    .unwrap();
    let replicas: Vec<ProxyProcess> = (1..=3)
        .map(|i| {
            let path = state.dir().join(format!("replica{i}.yaml"));
            std::fs::write(
                &path,
                format!(
                    "etcd:\n  endpoints: [{}]\n  prefix: {PREFIX}\n  registry_ttl: 10s\n\
                     admin_listen: 127.0.0.1:0\nreload_poll_interval: 1h\n",
                    etcd.endpoint()
                ),
            )
            .unwrap();
            ProxyProcess::with_config(&path)
        })
        .collect();

    // Every registry update, stamped when this process saw it.
    let mut client = etcd_client::Client::connect([etcd.endpoint()], None)
        .await
        .unwrap();
    let seen: Arc<Mutex<Vec<(Instant, String, i64)>>> = Arc::default();
    let registry = format!("{PREFIX}/replicas/");
    let mut stream = client
        .watch(registry.as_str(), Some(WatchOptions::new().with_prefix()))
        .await
        .unwrap();
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok(Some(resp)) = stream.message().await {
            let now = Instant::now();
            for ev in resp.events() {
                if let Some(kv) = ev.kv() {
                    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(kv.value()) {
                        let id = v["id"].as_str().unwrap_or("").to_owned();
                        let rev = v["revision"].as_i64().unwrap_or(0);
                        log.lock().unwrap().push((now, id, rev));
                    }
                }
            }
        }
    });
    // All three registered (a get, since they may have registered before the watch began).
    let deadline = Instant::now() + WAIT;
    loop {
        let r = client
            .get(registry.as_str(), Some(GetOptions::new().with_prefix()))
            .await
            .unwrap();
        if r.kvs().len() == 3 {
            break;
        }
        assert!(Instant::now() < deadline, "replicas did not register");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let rules_key = format!("{PREFIX}/databases/orders/ip-rules.yaml");
    let mut from_start = Vec::new();
    let mut from_exit = Vec::new();
    let mut cli = Vec::new();
    for i in 0..changes {
        let cidr = format!("10.{}.{}.0/24", 1 + i / 2 / 256, (i / 2) % 256);
        let args: Vec<String> = if i % 2 == 0 {
            ["ip-rules", "create", "orders", "--cidr", &cidr]
        } else {
            ["ip-rules", "delete", "orders", "--cidr", &cidr]
        }
        .iter()
        .map(|s| s.to_string())
        .collect();
        let op = operator.clone();
        let started = Instant::now();
        let out = tokio::task::spawn_blocking(move || {
            Command::new(BIN)
                .args(&args)
                .args(["--config"])
                .arg(&op)
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        let exited = Instant::now();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let change = client.get(rules_key.as_str(), None).await.unwrap().kvs()[0].mod_revision();
        let deadline = Instant::now() + WAIT;
        let all_at = loop {
            if let Some(t) = all_serving(&seen.lock().unwrap(), change) {
                break t;
            }
            assert!(
                Instant::now() < deadline,
                "change {i} never reached every replica"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        from_start.push(ms(all_at.saturating_duration_since(started)));
        // Negative when every replica served it before the CLI process had exited.
        from_exit.push(if all_at >= exited {
            ms(all_at - exited)
        } else {
            -ms(exited - all_at)
        });
        cli.push(ms(exited - started));
    }
    println!("propagation over {changes} CLI changes, 3 replicas on one etcd:");
    println!(
        "  CLI start -> every replica serves it: {}",
        summary(&mut from_start)
    );
    println!(
        "  CLI exit  -> every replica serves it: {}",
        summary(&mut from_exit)
    );
    println!(
        "  CLI command wall time:                {}",
        summary(&mut cli)
    );
    drop(replicas);
}

/// When every replica (the last id seen per replica) first reported a revision >= `change`.
fn all_serving(seen: &[(Instant, String, i64)], change: i64) -> Option<Instant> {
    let mut first: HashMap<&str, Instant> = HashMap::new();
    let mut ids: HashMap<&str, ()> = HashMap::new();
    for (t, id, rev) in seen {
        ids.insert(id, ());
        if *rev >= change {
            first.entry(id.as_str()).or_insert(*t);
        }
    }
    if ids.len() < 3 || first.len() < ids.len() {
        return None;
    }
    first.values().max().copied()
}

/// A CA for the replicas' peer channel and one certificate per replica.
fn peer_certs(dir: &Path, n: usize) -> (PathBuf, Vec<(PathBuf, PathBuf)>) {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, "bench peer CA");
    let ca = params.self_signed(&key).unwrap();
    let ca_path = dir.join("peer-ca.crt");
    std::fs::write(&ca_path, ca.pem()).unwrap();
    let issuer = Issuer::new(params, key);
    let certs = (1..=n)
        .map(|i| {
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
            let mut p = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
            p.distinguished_name
                .push(DnType::CommonName, format!("replica{i}"));
            p.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let cert = p.signed_by(&key, &issuer).unwrap();
            let (c, k) = (dir.join(format!("r{i}.crt")), dir.join(format!("r{i}.key")));
            std::fs::write(&c, cert.pem()).unwrap();
            std::fs::write(&k, key.serialize_pem()).unwrap();
            (c, k)
        })
        .collect();
    (ca_path, certs)
}

async fn cancel(rounds: usize) {
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
    let (ca, certs) = peer_certs(state.dir(), 2);
    let ports = [free_port(), free_port()];
    let replicas: Vec<ProxyProcess> = (0..2)
        .map(|i| {
            let other = 1 - i;
            let path = state.dir().join(format!("replica{}.yaml", i + 1));
            std::fs::write(
                &path,
                format!(
                    "state_dir: state\nadmin_listen: 127.0.0.1:0\nreload_poll_interval: 1h\n\
                     replica_id: {}\npeer_listen: 127.0.0.1:{}\n\
                     peers: [{{id: {}, addr: \"127.0.0.1:{}\"}}]\n\
                     peer_tls: {{cert: {}, key: {}, ca: {}}}\n",
                    i + 1,
                    ports[i],
                    other + 1,
                    ports[other],
                    certs[i].0.display(),
                    certs[i].1.display(),
                    ca.display()
                ),
            )
            .unwrap();
            ProxyProcess::with_config(&path)
        })
        .collect();
    let tls = tls_client_config(
        &pki.ca.cert_path,
        Some((&pki.client.chain_path, &pki.client.key_path)),
        false,
    );
    let (client, _conn) = pg_connect_tls(
        "127.0.0.1",
        replicas[0].addr().port(),
        APP_USER,
        APP_DB,
        Some(APP_PASSWORD),
        tls.clone(),
        SslNegotiation::Postgres,
    )
    .await
    .unwrap();
    let client = Arc::new(client);
    let mut local = Vec::new();
    let mut forwarded = Vec::new();
    let mut last_cancel: Option<Instant> = None;
    // Interleaved, so both see the same machine.
    for i in 0..rounds * 2 {
        let target = if i % 2 == 0 { 0 } else { 1 };
        let token = client.cancel_token();
        let c = client.clone();
        let query =
            tokio::spawn(async move { c.simple_query("SELECT pg_sleep(60)").await.map(|_| ()) });
        if !sleeping(&pg).await {
            let end = tokio::time::timeout(Duration::from_secs(1), query).await;
            panic!("round {i}: the sleep never started; the query ended with {end:?}");
        }
        // Cancels are rate-limited per source address (a burst of 20, then 5 a second): pace
        // them under that, or the limiter, not the path, is what this would measure.
        if let Some(prev) = last_cancel {
            tokio::time::sleep_until((prev + CANCEL_PACE).into()).await;
        }
        last_cancel = Some(Instant::now());
        let started = Instant::now();
        let stream = tokio::net::TcpStream::connect(replicas[target].addr())
            .await
            .unwrap();
        token.cancel_query_raw(stream, tls_for(&tls)).await.unwrap();
        let err = tokio::time::timeout(WAIT, query)
            .await
            .expect("the cancel was lost")
            .unwrap()
            .unwrap_err();
        let took = ms(started.elapsed());
        assert_eq!(
            err.code(),
            Some(&tokio_postgres::error::SqlState::QUERY_CANCELED)
        );
        if target == 0 {
            local.push(took);
        } else {
            forwarded.push(took);
        }
    }
    println!("cancel latency (send CancelRequest -> client sees 57014), {rounds} each:");
    println!(
        "  to the replica relaying the session:  {}",
        summary(&mut local)
    );
    println!(
        "  to the other replica (peer channel):  {}",
        summary(&mut forwarded)
    );
    drop(replicas);
}

/// The client's TLS, for a cancel on a stream this bench connected itself.
fn tls_for(
    cfg: &rustls::ClientConfig,
) -> <MakeRustlsConnect as MakeTlsConnect<tokio::net::TcpStream>>::TlsConnect {
    let mut make = MakeRustlsConnect::new(cfg.clone());
    MakeTlsConnect::<tokio::net::TcpStream>::make_tls_connect(&mut make, "127.0.0.1").unwrap()
}

/// Polls until Postgres shows the sleep running (there is no event to wait on); false when
/// it never does.
async fn sleeping(pg: &PgServer) -> bool {
    let deadline = Instant::now() + WAIT;
    loop {
        let n = pg.superuser_exec(
            "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60)' AND state = 'active'",
        );
        if n == "1" {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
