//! Bidirectional relay after authentication: bytes both ways until both sides are done,
//! propagating half-close, counting bytes, and ending at once when the session is revoked.
//!
//! One hand-written future drives both directions of one session in one task, so there is no
//! stream splitting (no lock per read and write) and no per-direction task. Reads go into a
//! per-thread scratch buffer and are written straight on; only when the destination cannot
//! take everything at once is the remainder copied into a buffer owned by the session. An idle
//! session therefore owns no relay buffer at all, which is what keeps thousands of idle
//! sessions cheap.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::BytesMut;
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;

use super::error::{ConnError, ErrorKind};
use crate::sessions::EndReason;

/// Size of one read. A full TLS record carries 16 KiB of plaintext, so one read from the
/// upstream becomes one record to the client rather than many small ones.
pub const RELAY_CHUNK: usize = 16 * 1024;

thread_local! {
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; RELAY_CHUNK].into_boxed_slice());
}

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

/// Relays until both directions finish, or until `kill` fires. Returns the byte counts and the
/// error (or end reason) if the relay did not end by both peers closing.
pub async fn relay<C, U>(
    client: C,
    upstream: U,
    client_leftover: BytesMut,
    upstream_leftover: BytesMut,
    kill: &mut watch::Receiver<Option<EndReason>>,
    counters: Counters<'_>,
) -> (RelayStats, Option<ConnError>)
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let mut state = Relay {
        client,
        upstream,
        c2u: Direction::new(client_leftover),
        u2c: Direction::new(upstream_leftover),
        first_eof: None,
    };
    let result = {
        let pumping = poll_fn(|cx| state.poll_relay(cx, &counters));
        tokio::select! {
            // The kill flag first: a session told to end moves no further byte, also when it
            // was told so before the relay started.
            biased;
            r = kill.wait_for(|v| v.is_some()) => {
                let reason = r.ok().and_then(|v| *v).unwrap_or(EndReason::Shutdown);
                Some(ConnError::new(reason.kind(), reason.as_str()))
            }
            r = pumping => r.err(),
        }
    };
    let closed_by = match &result {
        Some(e) if e.kind == ErrorKind::ClientIo => ClosedBy::Client,
        Some(e) if e.kind == ErrorKind::UpstreamIo => ClosedBy::Upstream,
        Some(_) => ClosedBy::Proxy,
        None => state.first_eof.unwrap_or_default(),
    };
    let stats = RelayStats {
        to_upstream: state.c2u.sent,
        to_client: state.u2c.sent,
        closed_by,
    };
    (stats, result)
}

struct Relay<C, U> {
    client: C,
    upstream: U,
    c2u: Direction,
    u2c: Direction,
    first_eof: Option<ClosedBy>,
}

impl<C, U> Relay<C, U>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    fn poll_relay(
        &mut self,
        cx: &mut Context<'_>,
        counters: &Counters<'_>,
    ) -> Poll<Result<(), ConnError>> {
        SCRATCH.with(|cell| {
            // Only this function borrows the scratch buffer, and it never re-enters itself;
            // a failed borrow would mean that changed, so fall back to a private buffer.
            let mut fallback;
            let mut guard = cell.try_borrow_mut();
            let scratch: &mut [u8] = match guard.as_deref_mut() {
                Ok(b) => b,
                Err(_) => {
                    fallback = vec![0u8; RELAY_CHUNK];
                    &mut fallback
                }
            };
            let up = self
                .c2u
                .poll_pump(
                    cx,
                    &mut self.client,
                    &mut self.upstream,
                    scratch,
                    counters.to_upstream,
                )
                .map_err(|e| e.into_conn_error(ErrorKind::ClientIo, ErrorKind::UpstreamIo))?;
            if up.is_ready() && self.first_eof.is_none() {
                self.first_eof = Some(ClosedBy::Client);
            }
            let down = self
                .u2c
                .poll_pump(
                    cx,
                    &mut self.upstream,
                    &mut self.client,
                    scratch,
                    counters.to_client,
                )
                .map_err(|e| e.into_conn_error(ErrorKind::UpstreamIo, ErrorKind::ClientIo))?;
            if down.is_ready() && self.first_eof.is_none() {
                self.first_eof = Some(ClosedBy::Upstream);
            }
            if up.is_ready() && down.is_ready() {
                Poll::Ready(Ok(()))
            } else {
                Poll::Pending
            }
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Write out `pending`, then read more.
    Open,
    /// Data was written; make sure it left the writer's buffer (TLS records) before reading more,
    /// which is also the backpressure.
    Flush,
    /// The source is at EOF: half-close the destination.
    Shutdown,
    Done,
}

struct Direction {
    /// Bytes read but not yet taken by the writer. Empty (no allocation) in the common case.
    pending: Vec<u8>,
    pos: usize,
    phase: Phase,
    sent: u64,
}

enum PumpError {
    Read(io::Error),
    Write(io::Error),
}

impl PumpError {
    fn into_conn_error(self, read_side: ErrorKind, write_side: ErrorKind) -> ConnError {
        match self {
            PumpError::Read(e) => ConnError::new(read_side, e.to_string()),
            PumpError::Write(e) => ConnError::new(write_side, e.to_string()),
        }
    }
}

impl Direction {
    fn new(leftover: BytesMut) -> Self {
        Direction {
            phase: Phase::Open,
            pending: if leftover.is_empty() {
                Vec::new()
            } else {
                leftover.to_vec()
            },
            pos: 0,
            sent: 0,
        }
    }

    fn poll_pump<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
        w: &mut W,
        scratch: &mut [u8],
        counter: &Counter,
    ) -> Poll<Result<(), PumpError>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        loop {
            match self.phase {
                Phase::Open if self.pos < self.pending.len() => {
                    let n = ready!(Pin::new(&mut *w).poll_write(cx, &self.pending[self.pos..]))
                        .map_err(PumpError::Write)?;
                    if n == 0 {
                        return Poll::Ready(Err(PumpError::Write(io::ErrorKind::WriteZero.into())));
                    }
                    self.account(n, counter);
                    self.pos += n;
                    if self.pos == self.pending.len() {
                        // Give the memory back: an idle session should own no buffer.
                        self.pending = Vec::new();
                        self.pos = 0;
                        self.phase = Phase::Flush;
                    }
                }
                Phase::Open => {
                    let mut rb = ReadBuf::new(scratch);
                    let n = match Pin::new(&mut *r).poll_read(cx, &mut rb) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Ok(())) => rb.filled().len(),
                        // libpq closes TLS without close_notify; rustls reports that as
                        // UnexpectedEof. For a byte relay it is an ordinary end of stream.
                        Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => 0,
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(PumpError::Read(e))),
                    };
                    if n == 0 {
                        self.phase = Phase::Shutdown;
                        continue;
                    }
                    let mut off = 0;
                    while off < n {
                        match Pin::new(&mut *w).poll_write(cx, &scratch[off..n]) {
                            Poll::Ready(Ok(0)) => {
                                return Poll::Ready(Err(PumpError::Write(
                                    io::ErrorKind::WriteZero.into(),
                                )))
                            }
                            Poll::Ready(Ok(k)) => {
                                self.account(k, counter);
                                off += k;
                            }
                            Poll::Ready(Err(e)) => return Poll::Ready(Err(PumpError::Write(e))),
                            Poll::Pending => {
                                // The writer is full: keep the rest until it drains.
                                self.pending = scratch[off..n].to_vec();
                                self.pos = 0;
                                return Poll::Pending;
                            }
                        }
                    }
                    self.phase = Phase::Flush;
                }
                Phase::Flush => {
                    ready!(Pin::new(&mut *w).poll_flush(cx)).map_err(PumpError::Write)?;
                    self.phase = Phase::Open;
                }
                Phase::Shutdown => {
                    // Half-close: the other direction stays open until its peer finishes. A
                    // failed shutdown means the peer is gone already; nothing is left to send.
                    let _ = ready!(Pin::new(&mut *w).poll_shutdown(cx));
                    self.phase = Phase::Done;
                }
                Phase::Done => return Poll::Ready(Ok(())),
            }
        }
    }

    fn account(&mut self, n: usize, counter: &Counter) {
        self.sent += n as u64;
        counter.inc_by(n as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt};

    fn counters() -> (Counter, Counter) {
        (Counter::default(), Counter::default())
    }

    #[tokio::test]
    async fn relays_both_ways_and_propagates_half_close() {
        let (client, mut client_peer) = duplex(1024);
        let (upstream, mut upstream_peer) = duplex(1024);
        let (_tx, mut kill) = watch::channel(None);
        let (a, b) = counters();
        let relay = tokio::spawn(async move {
            let c = Counters {
                to_upstream: &a,
                to_client: &b,
            };
            let (stats, err) = relay(
                client,
                upstream,
                BytesMut::from(&b"early"[..]),
                BytesMut::new(),
                &mut kill,
                c,
            )
            .await;
            assert!(err.is_none(), "{err:?}");
            (stats, a.get(), b.get())
        });
        client_peer.write_all(b" query").await.unwrap();
        client_peer.shutdown().await.unwrap();
        let mut got = Vec::new();
        upstream_peer.read_to_end(&mut got).await.unwrap();
        assert_eq!(
            got, b"early query",
            "leftover first, then the stream, then EOF"
        );
        // The other direction is still open after the client's half-close.
        upstream_peer.write_all(b"answer").await.unwrap();
        upstream_peer.shutdown().await.unwrap();
        let mut back = Vec::new();
        client_peer.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"answer");
        let (stats, up, down) = relay.await.unwrap();
        assert_eq!((stats.to_upstream, stats.to_client), (11, 6));
        assert_eq!((up, down), (11, 6));
        assert_eq!(stats.closed_by, ClosedBy::Client);
    }

    #[tokio::test]
    async fn a_slow_reader_gets_every_byte_in_order() {
        // A 64-byte pipe forces partial writes and the pending-buffer path.
        let (client, mut client_peer) = duplex(64);
        let (upstream, mut upstream_peer) = duplex(64);
        let (_tx, mut kill) = watch::channel(None);
        let (a, b) = counters();
        let relay = tokio::spawn(async move {
            let c = Counters {
                to_upstream: &a,
                to_client: &b,
            };
            relay(
                client,
                upstream,
                BytesMut::new(),
                BytesMut::new(),
                &mut kill,
                c,
            )
            .await
        });
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let expected = data.clone();
        let writer = tokio::spawn(async move {
            upstream_peer.write_all(&data).await.unwrap();
            upstream_peer.shutdown().await.unwrap();
            upstream_peer
        });
        let mut got = Vec::new();
        client_peer.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, expected);
        client_peer.shutdown().await.unwrap();
        drop(writer.await.unwrap());
        let (stats, err) = relay.await.unwrap();
        assert!(err.is_none());
        assert_eq!(stats.to_client, 200_000);
    }

    #[tokio::test]
    async fn a_kill_signal_ends_the_relay_with_its_reason() {
        let (client, _client_peer) = duplex(64);
        let (upstream, _upstream_peer) = duplex(64);
        let (tx, mut kill) = watch::channel(None);
        let (a, b) = counters();
        let relay = tokio::spawn(async move {
            let c = Counters {
                to_upstream: &a,
                to_client: &b,
            };
            relay(
                client,
                upstream,
                BytesMut::new(),
                BytesMut::new(),
                &mut kill,
                c,
            )
            .await
        });
        tx.send(Some(EndReason::CertificateRevoked)).unwrap();
        let (stats, err) = relay.await.unwrap();
        assert_eq!(err.map(|e| e.kind), Some(ErrorKind::RevokedLive));
        assert_eq!(stats.closed_by, ClosedBy::Proxy);
    }
}
