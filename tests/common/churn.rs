//! Session churn against a real proxy process: a stand-in upstream that speaks just enough of
//! PostgreSQL for a session (startup, one simple query, Terminate), a client that runs full
//! mutual-TLS sessions through the proxy, and readings of a process's RSS and open fds from
//! /proc. `tests/leak.rs` and `benches/soak.rs` share it, so the leak check in the test suite
//! and the long soak drive the proxy the same way.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::clients::tls_client_config;
use super::pki::{Role, TestPki};
use super::wire::{query_message, startup_packet};

const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
const READY_IDLE: [u8; 6] = [b'Z', 0, 0, 0, 5, b'I'];
/// Every step of a session must finish within this, or the session counts as an error
/// (rather than a worker hanging for good).
const STEP: Duration = Duration::from_secs(60);

/// What the stand-in upstream has seen, for the caller to check after a run.
#[derive(Default)]
pub struct UpstreamCounts {
    /// Connections accepted.
    pub accepted: AtomicU64,
    /// Connections whose handler has ended (peer closed, Terminate, or an error).
    pub closed: AtomicU64,
    /// Simple queries answered.
    pub queries: AtomicU64,
    /// Sessions that ended with a Terminate from the proxy (the client's, relayed).
    pub terminated: AtomicU64,
    /// Accept failures and protocol surprises.
    pub errors: AtomicU64,
}

impl UpstreamCounts {
    /// Upstream connections open right now.
    pub fn open(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst) - self.closed.load(Ordering::SeqCst)
    }
}

/// A trusting PostgreSQL stand-in on 127.0.0.1 (port 0). Answers a StartupMessage with
/// AuthenticationOk, ParameterStatus, BackendKeyData and ReadyForQuery, any simple Query with
/// one row (`?column?` = `1`), and closes on Terminate.
pub struct FakeUpstream {
    pub addr: SocketAddr,
    pub counts: Arc<UpstreamCounts>,
}

impl FakeUpstream {
    pub async fn start() -> FakeUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let counts = Arc::new(UpstreamCounts::default());
        tokio::spawn(accept_loop(listener, counts.clone()));
        FakeUpstream { addr, counts }
    }
}

async fn accept_loop(listener: TcpListener, counts: Arc<UpstreamCounts>) {
    let mut pid = 1000u32;
    loop {
        match listener.accept().await {
            Ok((s, _)) => {
                counts.accepted.fetch_add(1, Ordering::SeqCst);
                pid = pid.wrapping_add(1);
                let counts = counts.clone();
                tokio::spawn(async move {
                    if serve_one(s, pid, &counts).await.is_err() {
                        counts.errors.fetch_add(1, Ordering::SeqCst);
                    }
                    counts.closed.fetch_add(1, Ordering::SeqCst);
                });
            }
            Err(_) => {
                // EMFILE and friends: count it and let the run's error total show it; a
                // short pause keeps a persistent failure from spinning.
                counts.errors.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// One upstream connection. `Err` for anything a well-behaved proxy would not send.
async fn serve_one(mut s: TcpStream, pid: u32, counts: &UpstreamCounts) -> Result<(), ()> {
    s.set_nodelay(true).map_err(drop)?;
    let mut len = [0u8; 4];
    if s.read_exact(&mut len).await.is_err() {
        // Closed before a StartupMessage: a refused client, not an upstream fault.
        return Ok(());
    }
    let body_len = (u32::from_be_bytes(len) as usize)
        .checked_sub(4)
        .filter(|n| (4..10_000).contains(n))
        .ok_or(())?;
    let mut body = vec![0u8; body_len];
    s.read_exact(&mut body).await.map_err(drop)?;
    if body[..4] != 196_608u32.to_be_bytes() {
        return Err(()); // not protocol 3.0 (the proxy dials without TLS here)
    }
    let mut out = vec![b'R', 0, 0, 0, 8, 0, 0, 0, 0];
    for (k, v) in [
        ("server_version", "15.0"),
        ("client_encoding", "UTF8"),
        ("integer_datetimes", "on"),
    ] {
        put_message(
            &mut out,
            b'S',
            &[k.as_bytes(), &[0], v.as_bytes(), &[0]].concat(),
        );
    }
    put_message(
        &mut out,
        b'K',
        &[pid.to_be_bytes(), 7u32.to_be_bytes()].concat(),
    );
    out.extend_from_slice(&READY_IDLE);
    s.write_all(&out).await.map_err(drop)?;
    loop {
        let mut head = [0u8; 5];
        if s.read_exact(&mut head).await.is_err() {
            return Ok(()); // the proxy closed without a Terminate (a client that vanished)
        }
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let mut body = vec![0u8; len.checked_sub(4).filter(|n| *n < 1 << 20).ok_or(())?];
        s.read_exact(&mut body).await.map_err(drop)?;
        match head[0] {
            b'Q' => {
                counts.queries.fetch_add(1, Ordering::SeqCst);
                let mut out = Vec::with_capacity(80);
                // One int4 column named ?column?: table oid 0, attnum 0, type 23, size 4,
                // typmod -1, text format.
                let mut desc = 1u16.to_be_bytes().to_vec();
                desc.extend_from_slice(b"?column?\0");
                desc.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 23, 0, 4]);
                desc.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0, 0]);
                put_message(&mut out, b'T', &desc);
                put_message(&mut out, b'D', &[0, 1, 0, 0, 0, 1, b'1']);
                put_message(&mut out, b'C', b"SELECT 1\0");
                out.extend_from_slice(&READY_IDLE);
                s.write_all(&out).await.map_err(drop)?;
            }
            b'X' => {
                counts.terminated.fetch_add(1, Ordering::SeqCst);
                return Ok(());
            }
            _ => return Err(()),
        }
    }
}

fn put_message(out: &mut Vec<u8>, tag: u8, body: &[u8]) {
    out.push(tag);
    out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    out.extend_from_slice(body);
}

/// Opens full mutual-TLS sessions to one proxy listener. The TLS config is built once; session
/// resumption is off, as in libpq, so every session is a full handshake with the certificate.
#[derive(Clone)]
pub struct SessionClient {
    connector: TlsConnector,
    addr: SocketAddr,
}

/// A session past ReadyForQuery.
pub struct Session {
    tls: TlsStream<TcpStream>,
}

impl SessionClient {
    pub fn new(pki: &TestPki, cert: &Role, addr: SocketAddr) -> SessionClient {
        let mut cfg = tls_client_config(
            &pki.ca.cert_path,
            Some((&cert.chain_path, &cert.key_path)),
            false,
        );
        cfg.resumption = rustls::client::Resumption::disabled();
        SessionClient {
            connector: TlsConnector::from(Arc::new(cfg)),
            addr,
        }
    }

    /// SSLRequest, TLS with the client certificate, StartupMessage, up to ReadyForQuery.
    pub async fn open(&self) -> Result<Session, String> {
        let mut tcp = step("connect", TcpStream::connect(self.addr)).await?;
        tcp.set_nodelay(true).map_err(|e| format!("nodelay: {e}"))?;
        step("ssl request", tcp.write_all(&SSL_REQUEST)).await?;
        let mut answer = [0u8; 1];
        step("ssl answer", tcp.read_exact(&mut answer)).await?;
        if answer != *b"S" {
            return Err(format!("ssl answer: {:?}", answer[0] as char));
        }
        let name = ServerName::try_from("localhost").map_err(|e| e.to_string())?;
        let mut tls = step("tls handshake", self.connector.connect(name, tcp)).await?;
        let startup = startup_packet(&[("user", "app"), ("database", "app")]);
        step("startup", tls.write_all(&startup)).await?;
        read_until_ready(&mut tls, b'R', "startup answer").await?;
        Ok(Session { tls })
    }

    /// One whole session: open, one query, close.
    pub async fn session(&self) -> Result<(), String> {
        let mut s = self.open().await?;
        s.query().await?;
        s.close().await
    }
}

impl Session {
    /// `SELECT 1` as a simple Query: RowDescription, DataRow, CommandComplete, ReadyForQuery.
    pub async fn query(&mut self) -> Result<(), String> {
        step("query", self.tls.write_all(&query_message("SELECT 1"))).await?;
        read_until_ready(&mut self.tls, b'T', "query answer").await
    }

    /// Terminate, close_notify, then the proxy's end of the stream: when this returns the
    /// proxy has closed its side of the client socket.
    pub async fn close(mut self) -> Result<(), String> {
        step("terminate", self.tls.write_all(&[b'X', 0, 0, 0, 4])).await?;
        step("shutdown", self.tls.shutdown()).await?;
        let mut rest = [0u8; 64];
        // A reset instead of a clean close is fine here: the session is over either way.
        match tokio::time::timeout(STEP, self.tls.read(&mut rest)).await {
            Ok(Ok(0)) | Ok(Err(_)) => Ok(()),
            Ok(Ok(_)) => Err("data after Terminate".into()),
            Err(_) => Err("close: proxy kept the socket open".into()),
        }
    }
}

async fn step<T, E: std::fmt::Display>(
    what: &str,
    f: impl Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(STEP, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!("{what}: timed out")),
    }
}

/// Reads backend messages until ReadyForQuery; the first must carry tag `first`. An
/// ErrorResponse is an error carrying its SQLSTATE and message.
async fn read_until_ready<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    first: u8,
    what: &str,
) -> Result<(), String> {
    let mut n = 0;
    loop {
        let mut head = [0u8; 5];
        step(what, s.read_exact(&mut head)).await?;
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let mut body = vec![0u8; len.saturating_sub(4).min(1 << 16)];
        step(what, s.read_exact(&mut body)).await?;
        if head[0] == b'E' {
            let text = String::from_utf8_lossy(&body).replace('\0', " ");
            return Err(format!("{what}: ErrorResponse {}", text.trim()));
        }
        if n == 0 && head[0] != first {
            return Err(format!("{what}: first message {:?}", head[0] as char));
        }
        n += 1;
        if head[0] == b'Z' {
            return Ok(());
        }
    }
}

/// Client-side errors of a run, by kind (the text up to the first `:` after the step name),
/// with one full example each.
#[derive(Default)]
pub struct Errors {
    by_kind: Mutex<BTreeMap<String, (u64, String)>>,
}

impl Errors {
    pub fn add(&self, e: String) {
        let kind = e.split(':').next().unwrap_or("").to_owned();
        let mut m = self.by_kind.lock().unwrap();
        let entry = m.entry(kind).or_insert((0, e));
        entry.0 += 1;
    }

    pub fn total(&self) -> u64 {
        self.by_kind.lock().unwrap().values().map(|v| v.0).sum()
    }

    /// `kind: count (e.g. example)` per kind, one per line.
    pub fn summary(&self) -> String {
        self.by_kind
            .lock()
            .unwrap()
            .iter()
            .map(|(k, (n, e))| format!("{k}: {n} (e.g. {e})"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Runs `n` whole sessions on `workers` concurrent tasks, or fewer if `until` passes first (no
/// session starts after it); `done` counts finished sessions (failed ones included) as they
/// finish, for a sampler to read.
pub async fn churn(
    client: &SessionClient,
    n: u64,
    workers: usize,
    until: Option<Instant>,
    done: &Arc<AtomicU64>,
    errors: &Arc<Errors>,
) {
    let claimed = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (client, claimed, done, errors) = (
            client.clone(),
            claimed.clone(),
            done.clone(),
            errors.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while claimed.fetch_add(1, Ordering::SeqCst) < n
                && until.is_none_or(|t| Instant::now() < t)
            {
                if let Err(e) = client.session().await {
                    errors.add(e);
                }
                done.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// `VmRSS` of process `pid`, in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Open file descriptors of process `pid` (sockets included).
pub fn open_fds(pid: u32) -> Option<u64> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64)
}

/// The soft and hard `Max open files` of process `pid`, as /proc prints them.
pub fn fd_limits(pid: u32) -> Option<(String, String)> {
    limit_line(pid, "Max open files")
}

/// The soft and hard `Max processes` of process `pid`.
pub fn process_limits(pid: u32) -> Option<(String, String)> {
    limit_line(pid, "Max processes")
}

fn limit_line(pid: u32, name: &str) -> Option<(String, String)> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let rest = limits.lines().find_map(|l| l.strip_prefix(name))?;
    let mut f = rest.split_whitespace();
    Some((f.next()?.to_owned(), f.next()?.to_owned()))
}
