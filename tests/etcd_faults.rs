//! Faults in an etcd fleet, with real etcd, real Postgres, real replicas and real clients:
//! one replica cut off from etcd (a TCP forwarder in this process that the test stops and
//! resumes) while a rule is deleted with the CLI: the others enforce the change, the cut-off
//! one serves its last good snapshot and says it is stale, and catches up when etcd is back.
//! And a replica killed with SIGKILL behind HAProxy: its clients reconnect through the others.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::admin::{scrape, status, wait_status};
use common::clients::{pg_connect_tls, session_from, tls_client_config, SslNegotiation};
use common::etcd::{etcd_available_or_skip, EtcdServer};
use common::haproxy::{haproxy_available_or_skip, HaProxy};
use common::pg::{pg_available_or_skip, PgServer, APP_DB, APP_PASSWORD, APP_USER};
use common::pki::TestPki;
use common::proxy::ProxyProcess;
use common::state::TestState;
use serde_json::Value;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

const BIN: &str = env!("CARGO_BIN_EXE_pgmtls");
const WAIT: Duration = Duration::from_secs(30);

/// A TCP forwarder to `target` that can be stopped (listener closed, every forwarded
/// connection dropped) and resumed on the same port: an etcd outage seen by one replica only.
struct Forwarder {
    addr: SocketAddr,
    target: SocketAddr,
    task: Option<JoinHandle<()>>,
}

fn listen(addr: SocketAddr) -> TcpListener {
    let s = TcpSocket::new_v4().unwrap();
    s.set_reuseaddr(true).unwrap();
    s.bind(addr).unwrap();
    s.listen(64).unwrap()
}

async fn forward(listener: TcpListener, target: SocketAddr) {
    // Owned by this task: aborting it drops every forwarded connection with it.
    let mut conns = JoinSet::new();
    loop {
        let Ok((mut client, _)) = listener.accept().await else {
            return;
        };
        conns.spawn(async move {
            if let Ok(mut upstream) = TcpStream::connect(target).await {
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            }
        });
    }
}

impl Forwarder {
    fn start(target: SocketAddr) -> Forwarder {
        let listener = listen("127.0.0.1:0".parse().unwrap());
        let addr = listener.local_addr().unwrap();
        Forwarder {
            addr,
            target,
            task: Some(tokio::spawn(forward(listener, target))),
        }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    async fn stop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
    }

    fn resume(&mut self) {
        assert!(self.task.is_none());
        self.task = Some(tokio::spawn(forward(listen(self.addr), self.target)));
    }
}

fn endpoint_addr(etcd: &EtcdServer) -> SocketAddr {
    etcd.endpoint()
        .trim_start_matches("http://")
        .parse()
        .unwrap()
}

/// One database `orders` with `rules`, imported into `etcd` under /pgmtls.
fn import(etcd: &EtcdServer, pki: &TestPki, pg: &PgServer, rules: &[(&str, &str)]) -> TestState {
    let state = TestState::new("");
    state.add_database("orders", pki, "127.0.0.1:0", pg.addr(), rules);
    etcd.import_state(&state.root, "/pgmtls");
    state
}

fn replica_config(dir: &Path, name: &str, endpoint: &str, extra: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(
        &path,
        format!(
            "etcd:\n  endpoints: [{endpoint}]\n  prefix: /pgmtls\n\
             admin_listen: 127.0.0.1:0\nreload_poll_interval: 1h\n{extra}"
        ),
    )
    .unwrap();
    path
}

fn reloaded(generation: u64) -> impl Fn(&Value) -> bool {
    move |v| v["message"] == "configuration reloaded" && v["generation"] == generation
}

async fn one(c: &tokio_postgres::Client) -> Result<i32, tokio_postgres::Error> {
    c.query_one("SELECT 1", &[]).await.map(|r| r.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_cut_off_from_etcd_serves_its_last_snapshot_and_catches_up() {
    if !pg_available_or_skip() || !etcd_available_or_skip() {
        return;
    }
    let pg = PgServer::start();
    let etcd = EtcdServer::start();
    let pki = TestPki::new();
    let state = import(
        &etcd,
        &pki,
        &pg,
        &[("r2", "127.0.0.2/32"), ("r3", "127.0.0.3/32")],
    );
    let mut cut = Forwarder::start(endpoint_addr(&etcd));
    let direct = [
        replica_config(state.dir(), "r1.yaml", &etcd.endpoint(), ""),
        replica_config(state.dir(), "r2.yaml", &etcd.endpoint(), ""),
    ];
    let far = replica_config(state.dir(), "r3.yaml", &cut.endpoint(), "");
    let replicas: Vec<ProxyProcess> = direct
        .iter()
        .map(|c| ProxyProcess::with_config(c))
        .collect();
    let cut_off = ProxyProcess::with_config(&far);

    // A session admitted by rule r2 on every replica, and one by r3 on the cut-off one.
    let mut r2_sessions = Vec::new();
    for r in replicas.iter().chain([&cut_off]) {
        let (c, conn) = session_from("127.0.0.2", &pki, &pki.client, r)
            .await
            .unwrap();
        assert_eq!(one(&c).await.unwrap(), 1);
        r2_sessions.push((c, conn));
    }
    let (r3_session, _r3_conn) = session_from("127.0.0.3", &pki, &pki.client, &cut_off)
        .await
        .unwrap();

    cut.stop().await;
    let st = wait_status(cut_off.admin(), WAIT, |s| {
        !s["source"]["stale_since"].is_null()
    })
    .await;
    assert!(st["source"]["error"].is_string(), "{st:#}");

    // Rule r2 deleted with the CLI (straight to etcd) while replica 3 cannot see it.
    let out = Command::new(BIN)
        .args(["ip-rules", "delete", "orders", "--id", "r2"])
        .env_remove("PGMTLS_STATE_DIR")
        .env("PGMTLS_CONFIG", &direct[0])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ip-rules delete: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (mut r2_sessions, mut on_cut_off) = {
        let last = r2_sessions.pop().unwrap();
        (r2_sessions, last)
    };
    for (r, (c, conn)) in replicas.iter().zip(r2_sessions.iter_mut()) {
        let line = r.wait_for_log(WAIT, reloaded(2));
        assert_eq!(line["sessions_closed"], 1, "{line}");
        tokio::time::timeout(Duration::from_secs(5), conn)
            .await
            .expect("a session of the deleted rule is still open on a replica that saw it")
            .unwrap()
            .ok();
        assert!(one(c).await.is_err());
        assert!(session_from("127.0.0.2", &pki, &pki.client, r)
            .await
            .is_err());
    }

    // The cut-off replica serves its last good snapshot: the session goes on, it says stale.
    assert_eq!(one(&on_cut_off.0).await.unwrap(), 1);
    let st = status(cut_off.admin()).await;
    assert!(!st["source"]["stale_since"].is_null(), "{st:#}");
    assert_eq!(st["generation"], 1, "{st:#}");

    // etcd reachable again: it catches up and closes the session of the deleted rule.
    cut.resume();
    let line = cut_off.wait_for_log(WAIT, reloaded(2));
    assert_eq!(line["sessions_closed"], 1, "{line}");
    tokio::time::timeout(Duration::from_secs(5), &mut on_cut_off.1)
        .await
        .expect("the cut-off replica kept the session of the deleted rule after catching up")
        .unwrap()
        .ok();
    wait_status(cut_off.admin(), WAIT, |s| {
        s["source"]["stale_since"].is_null()
    })
    .await;
    assert_eq!(one(&r3_session).await.unwrap(), 1);
    assert!(session_from("127.0.0.2", &pki, &pki.client, &cut_off)
        .await
        .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_of_a_replica_killed_behind_haproxy_reconnect_through_the_others() {
    if !pg_available_or_skip() || !etcd_available_or_skip() || !haproxy_available_or_skip() {
        return;
    }
    let pg = PgServer::start();
    let etcd = EtcdServer::start();
    let pki = TestPki::new();
    let state = import(&etcd, &pki, &pg, &[("lb", "127.0.0.1/32")]);
    let mut replicas: Vec<ProxyProcess> = (1..=3)
        .map(|i| {
            let c = replica_config(
                state.dir(),
                &format!("r{i}.yaml"),
                &etcd.endpoint(),
                "proxy_protocol_from: [127.0.0.1/32]\n",
            );
            ProxyProcess::with_config(&c)
        })
        .collect();
    // A connect refused by a dead server is retried on another one.
    let lb = HaProxy::start_with(
        &replicas.iter().map(|r| r.addr()).collect::<Vec<_>>(),
        "retries 3\noption redispatch 1",
    );
    let tls = tls_client_config(
        &pki.ca.cert_path,
        Some((&pki.client.chain_path, &pki.client.key_path)),
        false,
    );
    let connect = || {
        pg_connect_tls(
            "127.0.0.1",
            lb.addr.port(),
            APP_USER,
            APP_DB,
            Some(APP_PASSWORD),
            tls.clone(),
            SslNegotiation::Postgres,
        )
    };
    // Round robin: one client on each replica.
    let mut clients = Vec::new();
    for _ in 0..3 {
        let (c, conn) = connect().await.unwrap();
        assert_eq!(one(&c).await.unwrap(), 1);
        clients.push((c, conn));
    }
    // Round robin spreads them, but HAProxy's own readiness probe and a replica still starting
    // can shift the order: ask each replica how many it relays, and kill one that has some.
    let mut held = Vec::new();
    for r in &replicas {
        let m = scrape(r.admin()).await;
        held.push(
            m.samples
                .get("pgmtls_sessions_active{database=\"orders\"}")
                .copied()
                .unwrap_or(0.0) as usize,
        );
    }
    assert_eq!(
        held.iter().sum::<usize>(),
        3,
        "sessions per replica: {held:?}"
    );
    let victim = (0..3).max_by_key(|i| held[*i]).unwrap();
    let on_victim = held[victim];
    replicas[victim].signal("KILL");
    replicas[victim].wait_exit(Duration::from_secs(10));
    let mut lost = 0;
    for (c, _) in &clients {
        match tokio::time::timeout(Duration::from_secs(10), one(c)).await {
            Ok(Ok(1)) => {}
            Ok(_) => lost += 1,
            Err(_) => panic!("a query hung after a replica was killed"),
        }
    }
    assert_eq!(
        lost, on_victim,
        "the killed replica relayed {on_victim} of {held:?}"
    );

    // Every reconnect gets a session (the killed replica is gone: from a live one).
    for round in 0..10 {
        let (c, _conn) = connect()
            .await
            .unwrap_or_else(|e| panic!("reconnect {round}: {e}"));
        assert_eq!(one(&c).await.unwrap(), 1);
    }
    // The sessions on the other replicas never noticed.
    for (i, (c, _)) in clients.iter().enumerate() {
        if let Ok(n) = one(c).await {
            assert_eq!(n, 1, "client {i}");
        }
    }
    assert_eq!(
        clients.iter().filter(|(c, _)| c.is_closed()).count(),
        on_victim
    );
}
