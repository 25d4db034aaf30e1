//! The one way a connection is refused before TLS: whatever the reason (`ip_not_allowed`,
//! a connection budget, a disabled database), the peer is given one fixed, generic answer in
//! the protocol it opened with, and then closed in order.
//!
//! Closing without a word is not enough: a socket closed with the client's SSLRequest still
//! unread goes out as a reset, which every client reports at once, but a load balancer in
//! front turns the reset into a clean FIN, and some clients (postgres.js) take a FIN before the
//! SSLRequest's answer for a dropped connection and retry until their connect timeout. An
//! ErrorResponse is an answer every client reports at once, directly and through a balancer.
//!
//! What is read and written is bounded and costs no cryptography: at most the PROXY header,
//! two 8-byte request headers and one startup packet (itself capped), then a drain of at most
//! [`DRAIN_CAP`] bytes; each wait for the peer ends after [`PEER_IDLE`], all of it within
//! [`FAREWELL_TIMEOUT`]; and at most [`FAREWELL_SLOTS`] farewells run at once in the process. A refused connection that finds no slot is closed at
//! once, as before (a reset when its request is unread). The answer never says why.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use super::error::NOTICE_REFUSED;
use super::peer;
use crate::wire::error_response;
use crate::wire::frontend::{parse_header, PacketHeader, TLS_HANDSHAKE_BYTE};

/// Everything a refused peer gets, from the first byte read to the close: all a slow one can
/// hold a socket for.
pub const FAREWELL_TIMEOUT: Duration = Duration::from_secs(1);

/// How long each wait for the peer's next bytes lasts. A client sends its first packet right
/// after connecting and its next one right after reading the answer, so this is ample for a
/// real one, and all a silent one costs.
pub const PEER_IDLE: Duration = Duration::from_millis(250);

/// How many refused connections may be in their farewell at once, process-wide: a flood of
/// refused connections costs at most this many sockets for [`FAREWELL_TIMEOUT`].
pub const FAREWELL_SLOTS: usize = 256;

/// What is read after the answer, so that the close is a FIN and not a reset that could
/// destroy the answer in flight (a ClientHello the client sent meanwhile, say).
pub const DRAIN_CAP: usize = 32 * 1024;

/// A TLS fatal `access_denied` alert in a plaintext record: the answer to a client that starts
/// TLS at once (or after its SSLRequest was refused). A fixed byte string: no crypto is done.
pub const TLS_ACCESS_DENIED: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 49];

static SLOTS: Semaphore = Semaphore::const_new(FAREWELL_SLOTS);

/// Where in its stream the refused peer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Position {
    /// At its first byte: the client's first packet comes next.
    Start,
    /// A trusted load balancer whose PROXY header comes next (it is read first, so that the
    /// answer goes to the client behind it).
    ProxyHeaderNext,
    /// Somewhere in bytes that did not parse (a PROXY header that was not one): the client is
    /// answered as if it had sent an SSLRequest, without reading on.
    Unknown,
}

/// Refuses `stream` before TLS. Returns at once: the farewell runs on its own task, so the
/// refused connection holds none of the connection budgets meanwhile. The caller has logged
/// and counted the refusal.
pub fn before_tls(stream: TcpStream, peer: SocketAddr, position: Position) {
    let Ok(slot) = SLOTS.try_acquire() else {
        // Over the bound: closed at once, which a direct client sees as a reset.
        return;
    };
    tokio::spawn(async move {
        let _slot = slot;
        farewell(stream, peer, position).await;
    });
}

async fn farewell(mut stream: TcpStream, peer: SocketAddr, position: Position) {
    let _ = tokio::time::timeout(FAREWELL_TIMEOUT, async {
        match position {
            Position::ProxyHeaderNext => {
                if idle(peer::read_header(&mut stream, peer))
                    .await
                    .is_none_or(|r| r.is_err())
                {
                    return;
                }
                answer(&mut stream).await;
            }
            Position::Start => answer(&mut stream).await,
            Position::Unknown => {
                let refused = error_response(NOTICE_REFUSED.sqlstate, NOTICE_REFUSED.message, None);
                let _ = stream.write_all(&refused).await;
            }
        }
        // Our FIN, then the client's: what it sent meanwhile is read and dropped, so the
        // close is orderly and the answer is not lost to a reset.
        let _ = stream.shutdown().await;
        let mut sink = [0u8; 2048];
        let mut drained = 0;
        while drained < DRAIN_CAP {
            match idle(stream.read(&mut sink)).await {
                Some(Ok(n)) if n > 0 => drained += n,
                _ => break,
            }
        }
    })
    .await;
}

/// Answers the peer's opening in kind: an SSLRequest or a plaintext StartupMessage with the
/// generic ErrorResponse, a TLS ClientHello with the alert, a GSSENCRequest with `N` (as for
/// everyone; the SSLRequest that follows is then refused). A client whose SSLRequest was
/// refused may go on in plaintext (postgres.js with `ssl: 'prefer'` does) or with TLS anyway;
/// it is answered again, once. A CancelRequest and anything unparsable get nothing.
async fn answer(stream: &mut TcpStream) {
    let refused = error_response(NOTICE_REFUSED.sqlstate, NOTICE_REFUSED.message, None);
    let (mut gssenc_answered, mut ssl_answered) = (false, false);
    loop {
        let mut first = [0u8; 1];
        match idle(stream.peek(&mut first)).await {
            Some(Ok(1)) => {}
            _ => return,
        }
        if first[0] == TLS_HANDSHAKE_BYTE {
            let _ = stream.write_all(&TLS_ACCESS_DENIED).await;
            return;
        }
        let mut header = [0u8; 8];
        if idle(stream.read_exact(&mut header))
            .await
            .is_none_or(|r| r.is_err())
        {
            return;
        }
        match parse_header(header) {
            Ok(PacketHeader::SslRequest) if !ssl_answered => {
                ssl_answered = true;
                if stream.write_all(&refused).await.is_err() {
                    return;
                }
            }
            Ok(PacketHeader::GssEncRequest) if !gssenc_answered && !ssl_answered => {
                gssenc_answered = true;
                if stream.write_all(b"N").await.is_err() {
                    return;
                }
            }
            Ok(PacketHeader::Startup { body_len, .. }) => {
                // The body is capped by `parse_header`; read in pieces, never buffered whole.
                let mut left = body_len;
                let mut sink = [0u8; 1024];
                while left > 0 {
                    let n = left.min(sink.len());
                    if idle(stream.read_exact(&mut sink[..n]))
                        .await
                        .is_none_or(|r| r.is_err())
                    {
                        return;
                    }
                    left -= n;
                }
                let _ = stream.write_all(&refused).await;
                return;
            }
            _ => return,
        }
    }
}

/// `fut` unless the peer stays silent for [`PEER_IDLE`].
async fn idle<T>(fut: impl std::future::Future<Output = T>) -> Option<T> {
    tokio::time::timeout(PEER_IDLE, fut).await.ok()
}
