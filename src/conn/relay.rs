//! Bidirectional relay after authentication: bytes both ways until both sides are done,
//! propagating half-close, counting bytes, and ending at once when the session is revoked.
//!
//! One hand-written future drives both directions of one session in one task, so there is no
//! stream splitting (no lock per read and write) and no per-direction task. Reads go into a
//! per-thread scratch buffer and are written straight on; only when the destination cannot
//! take everything at once is the remainder copied into a buffer owned by the session. An idle
//! session therefore owns no relay buffer at all, which is what keeps thousands of idle
//! sessions cheap.
//!
//! The server-to-client direction also follows the message framing (5-byte header: type and
//! length) of what it has written, at the cost of a few integer operations per message, so
//! that a session the proxy cuts can be told why: when the stream written so far ends at a
//! message boundary, a FATAL ErrorResponse naming the reason goes after it, then close_notify.
//! In the middle of a message no ErrorResponse can be inserted; the rest of that message is
//! sent first only if it is already buffered (never waiting on the backend), else the session
//! is closed without one.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::BytesMut;
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, ReadBuf};
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
    /// A cut session's client was sent the FATAL ErrorResponse naming the reason.
    pub told_client: bool,
}

/// How long a cut session's client gets to take the rest of a buffered message, the
/// ErrorResponse and close_notify. A client that does not read is not waited for.
const CUT_NOTICE_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(500);

/// The fixed text a cut session's client reads (libpq prints `FATAL:  <text>`), and its
/// SQLSTATE: 57P01 (admin_shutdown), what Postgres sends a session an administrator ends.
pub fn cut_notice(reason: EndReason) -> Vec<u8> {
    let text = match reason {
        EndReason::CertificateRevoked => {
            "terminating connection because the client certificate was revoked"
        }
        EndReason::CertificateExpired => {
            "terminating connection because the client certificate expired"
        }
        EndReason::RuleRemoved => {
            "terminating connection because the client address is no longer allowed"
        }
        EndReason::DatabaseDisabled => {
            "terminating connection because the database was disabled on the proxy"
        }
        EndReason::Shutdown => "terminating connection because the proxy is shutting down",
        EndReason::TrustedIpRemoved => {
            "terminating connection because the client address is no longer trusted"
        }
        EndReason::CertificateRequired => {
            "terminating connection because the client address now requires a client certificate"
        }
    };
    crate::wire::backend::error_response("57P01", text, None)
}

/// Where the server-to-client stream is in its message framing: `header` bytes of the current
/// message's 5-byte header seen, then `remaining` bytes of its body to come.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Framing {
    header: u8,
    len: [u8; 4],
    remaining: usize,
}

impl Framing {
    fn at_boundary(&self) -> bool {
        self.header == 0 && self.remaining == 0
    }

    /// Follows `b`, written after what was seen so far. Per message, not per byte: a body is
    /// skipped in one step.
    #[inline]
    fn advance(&mut self, mut b: &[u8]) {
        while !b.is_empty() {
            if self.remaining > 0 {
                let k = self.remaining.min(b.len());
                self.remaining -= k;
                b = &b[k..];
                continue;
            }
            if self.header > 0 {
                self.len[usize::from(self.header) - 1] = b[0];
            }
            self.header += 1;
            b = &b[1..];
            if self.header == 5 {
                self.header = 0;
                // The length counts itself; a shorter one is the backend's protocol error, and
                // ends the message at its header.
                self.remaining = (u32::from_be_bytes(self.len) as usize).saturating_sub(4);
            }
        }
    }

    /// How many bytes of `b` (following what was seen) complete the current message, if `b`
    /// holds all of them.
    fn bytes_to_boundary(&self, b: &[u8]) -> Option<usize> {
        let mut f = *self;
        if f.at_boundary() {
            return Some(0);
        }
        let mut off = 0;
        while off < b.len() {
            // Step to the end of the header or of the body, whichever comes first.
            let step = if f.remaining > 0 {
                f.remaining.min(b.len() - off)
            } else {
                1
            };
            f.advance(&b[off..off + step]);
            off += step;
            if f.at_boundary() {
                return Some(off);
            }
        }
        None
    }
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
    let mut u2c = Direction::new(upstream_leftover);
    // The relay starts where authentication stopped, after ReadyForQuery: at a boundary.
    u2c.framing = Some(Framing::default());
    let mut state = Relay {
        client,
        upstream,
        c2u: Direction::new(client_leftover),
        u2c,
        first_eof: None,
    };
    let mut cut = None;
    let result = {
        let pumping = poll_fn(|cx| state.poll_relay(cx, &counters));
        tokio::select! {
            // The kill flag first: a session told to end moves no further byte, also when it
            // was told so before the relay started.
            biased;
            r = kill.wait_for(|v| v.is_some()) => {
                let reason = r.ok().and_then(|v| *v).unwrap_or(EndReason::Shutdown);
                cut = Some(reason);
                Some(ConnError::new(reason.kind(), reason.as_str()))
            }
            r = pumping => r.err(),
        }
    };
    let mut told_client = false;
    if let Some(reason) = cut {
        // Boxed: the notice's state (and its timer) live on the heap only while a cut session
        // is told, so the task every idle session keeps stays small.
        told_client = Box::pin(tokio::time::timeout(
            CUT_NOTICE_TIMEOUT,
            state.tell_client(reason, counters.to_client),
        ))
        .await
        .unwrap_or(false);
    }
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
        told_client,
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
    /// Tells the client of a cut session why, if the stream to it can reach a message boundary
    /// with what is already buffered; then closes TLS. Whether the notice was sent.
    async fn tell_client(&mut self, reason: EndReason, counter: &Counter) -> bool {
        let d = &mut self.u2c;
        let open = matches!(d.phase, Phase::Open | Phase::Flush);
        let framing = d.framing.unwrap_or_default();
        let rest = &d.pending[d.pos.min(d.pending.len())..];
        let told = match framing.bytes_to_boundary(rest).filter(|_| open) {
            Some(n) => {
                let mut out = Vec::with_capacity(n + 128);
                out.extend_from_slice(&rest[..n]);
                out.extend_from_slice(&cut_notice(reason));
                let ok =
                    self.client.write_all(&out).await.is_ok() && self.client.flush().await.is_ok();
                if ok {
                    d.account(n, counter);
                }
                ok
            }
            None => false,
        };
        // close_notify: the client reads a clean end after the notice, not a reset.
        let _ = self.client.shutdown().await;
        told
    }

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
    /// The message framing of what was written, server to client only.
    framing: Option<Framing>,
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
            framing: None,
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
                    if let Some(f) = &mut self.framing {
                        f.advance(&self.pending[self.pos..self.pos + n]);
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
                                if let Some(f) = &mut self.framing {
                                    f.advance(&scratch[off..off + k]);
                                }
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

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn framing_finds_boundaries_across_any_split() {
        let mut stream = msg(b'D', &[7u8; 300]);
        stream.extend(msg(b'C', b"SELECT 1\0"));
        stream.extend(msg(b'Z', b"I"));
        let ends = [305, 305 + 14, 305 + 14 + 6];
        for split in 1..stream.len() {
            let mut f = Framing::default();
            let mut seen = 0;
            for chunk in stream.chunks(split) {
                f.advance(chunk);
                seen += chunk.len();
                assert_eq!(
                    f.at_boundary(),
                    ends.contains(&seen),
                    "split {split} at {seen}"
                );
            }
        }
        // From inside the first message, the rest of it is what reaches the boundary.
        let mut f = Framing::default();
        f.advance(&stream[..100]);
        assert_eq!(f.bytes_to_boundary(&stream[100..]), Some(205));
        assert_eq!(f.bytes_to_boundary(&stream[100..200]), None);
        let mut f = Framing::default();
        f.advance(&stream[..2]);
        assert_eq!(f.bytes_to_boundary(&stream[2..]), Some(303));
    }

    #[tokio::test]
    async fn a_cut_at_a_boundary_tells_the_client_why_and_mid_message_does_not() {
        for (sent, told) in [
            (msg(b'Z', b"I"), true),
            (msg(b'D', &[1u8; 50])[..20].to_vec(), false),
        ] {
            let (client, mut client_peer) = duplex(4096);
            let (upstream, mut upstream_peer) = duplex(4096);
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
            upstream_peer.write_all(&sent).await.unwrap();
            let mut got = vec![0u8; sent.len()];
            client_peer.read_exact(&mut got).await.unwrap();
            tx.send_replace(Some(EndReason::CertificateRevoked));
            let (stats, err) = relay.await.unwrap();
            assert_eq!(err.unwrap().kind, ErrorKind::RevokedLive);
            assert_eq!(stats.told_client, told);
            let mut rest = Vec::new();
            client_peer.read_to_end(&mut rest).await.unwrap();
            let expected = if told {
                cut_notice(EndReason::CertificateRevoked)
            } else {
                Vec::new()
            };
            assert_eq!(rest, expected);
        }
    }

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
