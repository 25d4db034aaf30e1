//! Full mutual-TLS connections per second of proxy CPU on one data-plane thread, against a
//! minimal fake upstream (no Postgres in the loop): SSLRequest, TLS 1.3 with an ECDSA P-256
//! client certificate, StartupMessage, upstream dial and the upstream's AuthenticationOk /
//! BackendKeyData / ReadyForQuery, Terminate. CPU is read from the data-plane thread's
//! /proc entry, so client work in the same process is not counted. Logging is off.
//!
//!   cargo bench --bench handshake_rate [-- CONNECTIONS]

#![allow(clippy::expect_used, clippy::unwrap_used)] // set-up failures in a bench are bugs

mod support;

use std::net::SocketAddr;
use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsConnector;

use support::{data_thread_cpu_seconds, fake_startup, session, Rig};

fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(2000);
    support::init_logging();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(n));
}

async fn run(n: usize) {
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up_addr = upstream.local_addr().unwrap();
    tokio::spawn(fake_upstream(upstream));
    let rig = Rig::start(up_addr).await;

    // Warm up, then measure.
    connect_many(&rig.connector, rig.addr, 50).await;
    let (user0, sys0) = data_thread_cpu_seconds();
    let t0 = Instant::now();
    connect_many(&rig.connector, rig.addr, n).await;
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
                let mut tls = session(&connector, addr).await;
                tls.write_all(&[b'X', 0, 0, 0, 4]).await.unwrap();
                let _ = tls.shutdown().await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// Answers any StartupMessage with AuthenticationOk, BackendKeyData and ReadyForQuery.
async fn fake_upstream(l: TcpListener) {
    let mut pid = 1u32;
    loop {
        let (mut s, _) = l.accept().await.unwrap();
        pid += 1;
        tokio::spawn(async move {
            if fake_startup(&mut s, pid).await {
                let mut sink = Vec::new();
                let _ = s.read_to_end(&mut sink).await;
            }
        });
    }
}
