//! Bidirectional relay after authentication: bytes both ways until both sides are done,
//! propagating half-close, counting bytes, and ending at once when the session is revoked.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::BytesMut;
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

use super::error::{ConnError, ErrorKind};
use crate::sessions::EndReason;

/// Size of one read. A full TLS record carries 16 KiB of plaintext, so one read from the
/// upstream becomes one record to the client rather than many small ones.
pub const RELAY_CHUNK: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClosedBy {
    #[default]
    Client,
    Upstream,
    Proxy,
}

impl ClosedBy {
    pub fn as_str(self) -> &'static str {
        match self {
            ClosedBy::Client => "client",
            ClosedBy::Upstream => "upstream",
            ClosedBy::Proxy => "proxy",
        }
    }
}

#[derive(Debug, Default)]
pub struct RelayStats {
    pub to_upstream: u64,
    pub to_client: u64,
    pub closed_by: ClosedBy,
}

pub struct Counters<'a> {
    pub to_upstream: &'a Counter,
    pub to_client: &'a Counter,
}

/// Relays until both directions finish. On error or revocation, returns the error with the
/// bytes counted so far.
pub async fn relay<C, U>(
    client: C,
    upstream: U,
    client_leftover: BytesMut,
    upstream_leftover: BytesMut,
    kill: &mut watch::Receiver<Option<EndReason>>,
    counters: Counters<'_>,
) -> (RelayStats, Option<ConnError>)
where
    C: AsyncRead + AsyncWrite,
    U: AsyncRead + AsyncWrite,
{
    let (client_r, client_w) = tokio::io::split(client);
    let (up_r, up_w) = tokio::io::split(upstream);
    let sent_up = AtomicU64::new(0);
    let sent_client = AtomicU64::new(0);
    let first_eof = std::sync::Mutex::new(None::<ClosedBy>);
    let mark_eof = |side| {
        let mut g = first_eof.lock().unwrap_or_else(|p| p.into_inner());
        g.get_or_insert(side);
    };

    let c2u = async {
        let r = pump(
            client_r,
            up_w,
            client_leftover,
            &sent_up,
            counters.to_upstream,
        )
        .await;
        match r {
            Ok(()) => {
                mark_eof(ClosedBy::Client);
                Ok(())
            }
            Err(PumpError::Read(e)) => Err(ConnError::new(ErrorKind::ClientIo, e.to_string())),
            Err(PumpError::Write(e)) => Err(ConnError::new(ErrorKind::UpstreamIo, e.to_string())),
        }
    };
    let u2c = async {
        let r = pump(
            up_r,
            client_w,
            upstream_leftover,
            &sent_client,
            counters.to_client,
        )
        .await;
        match r {
            Ok(()) => {
                mark_eof(ClosedBy::Upstream);
                Ok(())
            }
            Err(PumpError::Read(e)) => Err(ConnError::new(ErrorKind::UpstreamIo, e.to_string())),
            Err(PumpError::Write(e)) => Err(ConnError::new(ErrorKind::ClientIo, e.to_string())),
        }
    };
    let both = async { tokio::try_join!(c2u, u2c).map(|_| ()) };
    let result = tokio::select! {
        r = both => r.err(),
        r = kill.wait_for(|v| v.is_some()) => {
            let reason = r.ok().and_then(|v| *v).unwrap_or(EndReason::Shutdown);
            Some(ConnError::new(reason.kind(), reason.as_str()))
        }
    };
    let closed_by = match &result {
        Some(e) if e.kind == ErrorKind::ClientIo => ClosedBy::Client,
        Some(e) if e.kind == ErrorKind::UpstreamIo => ClosedBy::Upstream,
        Some(_) => ClosedBy::Proxy,
        None => first_eof
            .lock()
            .map(|g| g.unwrap_or_default())
            .unwrap_or_default(),
    };
    let stats = RelayStats {
        to_upstream: sent_up.load(Ordering::Relaxed),
        to_client: sent_client.load(Ordering::Relaxed),
        closed_by,
    };
    (stats, result)
}

enum PumpError {
    Read(io::Error),
    Write(io::Error),
}

async fn pump<R, W>(
    mut r: R,
    mut w: W,
    first: BytesMut,
    sent: &AtomicU64,
    counter: &Counter,
) -> Result<(), PumpError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    if !first.is_empty() {
        w.write_all(&first).await.map_err(PumpError::Write)?;
        w.flush().await.map_err(PumpError::Write)?;
        add(sent, counter, first.len());
    }
    let mut buf = vec![0u8; RELAY_CHUNK];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(n) => n,
            // libpq closes TLS without close_notify; rustls reports that as UnexpectedEof.
            // For a byte relay it is an ordinary end of stream.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => 0,
            Err(e) => return Err(PumpError::Read(e)),
        };
        if n == 0 {
            // Half-close: tell the other side this direction is finished, keep the other open.
            let _ = w.shutdown().await;
            return Ok(());
        }
        w.write_all(&buf[..n]).await.map_err(PumpError::Write)?;
        w.flush().await.map_err(PumpError::Write)?;
        add(sent, counter, n);
    }
}

fn add(sent: &AtomicU64, counter: &Counter, n: usize) {
    sent.fetch_add(n as u64, Ordering::Relaxed);
    counter.inc_by(n as u64);
}
