//! Relay throughput of one data-plane thread, in bytes per second of that thread's CPU, for
//! both directions of one TLS session (AES-128-GCM, what pgmtls negotiates), against a fake
//! upstream that streams or swallows bytes. Printed next to what AES-GCM alone does on one
//! core of this machine in the same run, because the cipher is the floor a relay builds on.
//!
//!   cargo bench --bench relay_rate [-- MEGABYTES]     (default 2048 per direction)

#![allow(clippy::expect_used, clippy::unwrap_used)] // set-up failures in a bench are bugs

mod support;

use std::time::Instant;

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM, AES_256_GCM};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use support::{data_thread_cpu_seconds, fake_startup, session, Rig};

const CHUNK: usize = 64 * 1024;

fn main() {
    let mb: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(2048);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(mb << 20));
    for (name, alg) in [("AES-128-GCM", &AES_128_GCM), ("AES-256-GCM", &AES_256_GCM)] {
        println!(
            "{name} seal alone, 16 KiB records, one core: {:.2} GB/s",
            seal_rate(alg) / 1e9
        );
    }
}

async fn run(bytes: u64) {
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up_addr = upstream.local_addr().unwrap();
    tokio::spawn(fake_upstream(upstream));
    let rig = Rig::start(up_addr).await;
    let mut tls = session(&rig.connector, rig.addr).await;
    let mut buf = vec![0u8; CHUNK];

    // Upstream -> client: the proxy reads plaintext and encrypts (COPY OUT, big results).
    let mut cmd = vec![b'O'];
    cmd.extend_from_slice(&bytes.to_be_bytes());
    tls.write_all(&cmd).await.unwrap();
    tls.flush().await.unwrap();
    let (u0, s0) = data_thread_cpu_seconds();
    let t0 = Instant::now();
    let mut got = 0u64;
    while got < bytes {
        let n = tls.read(&mut buf).await.unwrap();
        assert!(n > 0, "proxy closed mid-stream");
        got += n as u64;
    }
    report("upstream -> client (encrypt)", bytes, t0, (u0, s0));

    // Client -> upstream: the proxy decrypts and writes plaintext (COPY IN, bulk loads).
    let mut cmd = vec![b'I'];
    cmd.extend_from_slice(&bytes.to_be_bytes());
    tls.write_all(&cmd).await.unwrap();
    let (u0, s0) = data_thread_cpu_seconds();
    let t0 = Instant::now();
    let mut sent = 0u64;
    while sent < bytes {
        let n = CHUNK.min((bytes - sent) as usize);
        tls.write_all(&buf[..n]).await.unwrap();
        sent += n as u64;
    }
    tls.flush().await.unwrap();
    let mut ack = [0u8; 1];
    tls.read_exact(&mut ack).await.unwrap();
    assert_eq!(&ack, b"k");
    report("client -> upstream (decrypt)", bytes, t0, (u0, s0));
}

fn report(direction: &str, bytes: u64, t0: Instant, (u0, s0): (f64, f64)) {
    let wall = t0.elapsed().as_secs_f64();
    let (u1, s1) = data_thread_cpu_seconds();
    let (user, sys) = (u1 - u0, s1 - s0);
    println!(
        "{direction}: {:.0} MB in {wall:.2} s; data-plane thread CPU {:.2} s (user {user:.2} + \
         kernel {sys:.2}) => {:.2} GB/s per core of proxy CPU",
        bytes as f64 / 1e6,
        user + sys,
        bytes as f64 / (user + sys) / 1e9
    );
}

/// After the startup: `O n` asks for n streamed bytes, `I n` announces n bytes to swallow,
/// acknowledged with `k`.
async fn fake_upstream(l: TcpListener) {
    loop {
        let (mut s, _) = l.accept().await.unwrap();
        tokio::spawn(async move {
            if !fake_startup(&mut s, 1).await {
                return;
            }
            let chunk = vec![b'x'; CHUNK];
            let mut buf = vec![0u8; CHUNK];
            let mut cmd = [0u8; 9];
            while s.read_exact(&mut cmd).await.is_ok() {
                let mut left = u64::from_be_bytes(cmd[1..].try_into().unwrap());
                match cmd[0] {
                    b'O' => {
                        while left > 0 {
                            let n = CHUNK.min(left as usize);
                            s.write_all(&chunk[..n]).await.unwrap();
                            left -= n as u64;
                        }
                    }
                    b'I' => {
                        while left > 0 {
                            let want = CHUNK.min(left as usize);
                            let n = s.read(&mut buf[..want]).await.unwrap();
                            assert!(n > 0, "proxy closed mid-stream");
                            left -= n as u64;
                        }
                        s.write_all(b"k").await.unwrap();
                    }
                    other => panic!("unknown command {other}"),
                }
            }
        });
    }
}

/// Bytes per second AES-GCM seals in 16 KiB records on this thread, over about half a second.
fn seal_rate(alg: &'static aws_lc_rs::aead::Algorithm) -> f64 {
    let key = LessSafeKey::new(UnboundKey::new(alg, &vec![7u8; alg.key_len()]).unwrap());
    let mut record = vec![0u8; 16 * 1024];
    let mut sealed = 0u64;
    let mut counter = 0u64;
    let t0 = Instant::now();
    while t0.elapsed().as_secs_f64() < 0.5 {
        for _ in 0..64 {
            counter += 1;
            let mut nonce = [0u8; 12];
            nonce[4..].copy_from_slice(&counter.to_be_bytes());
            let tag = key
                .seal_in_place_separate_tag(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::empty(),
                    &mut record,
                )
                .unwrap();
            let _ = std::hint::black_box(tag);
            sealed += record.len() as u64;
        }
    }
    sealed as f64 / t0.elapsed().as_secs_f64()
}
