//! Pre-TLS negotiation on the raw socket: `SSLRequest`, `GSSENCRequest`, direct TLS,
//! `CancelRequest`, or a plaintext `StartupMessage` that we refuse.

use std::mem::MaybeUninit;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::error::{ConnError, ErrorKind, NOTICE_TLS_REQUIRED};
use crate::wire::error_response;
use crate::wire::frontend::{
    parse_cancel_body, parse_header, CancelKey, PacketHeader, MAX_CANCEL_BODY, TLS_HANDSHAKE_BYTE,
};

/// How the client wants to continue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Negotiated {
    /// Start TLS; `direct` when the client sent a TLS ClientHello straight away.
    Tls { direct: bool },
    /// A plaintext `CancelRequest` (libpq before 17 sends these even with `verify-ca`).
    Cancel(CancelKey),
}

impl Negotiated {
    pub fn mode(&self) -> &'static str {
        match self {
            Negotiated::Tls { direct: true } => "direct",
            Negotiated::Tls { direct: false } => "sslrequest",
            Negotiated::Cancel(_) => "cancel",
        }
    }
}

/// Reads startup packets until the client asks for TLS or cancels. Every read is bounded by
/// the packet-size cap in `parse_header`; the caller bounds the time.
pub async fn negotiate(stream: &mut TcpStream) -> Result<Negotiated, ConnError> {
    let mut gssenc_refused = false;
    loop {
        let mut first = [0u8; 1];
        let n = stream
            .peek(&mut first)
            .await
            .map_err(|e| ConnError::new(ErrorKind::ClientIo, e.to_string()))?;
        if n == 0 {
            return Err(ConnError::new(ErrorKind::ClientIo, "closed before startup"));
        }
        if first[0] == TLS_HANDSHAKE_BYTE {
            return Ok(Negotiated::Tls { direct: true });
        }
        let mut header = [0u8; 8];
        read_exact(stream, &mut header).await?;
        match parse_header(header)? {
            PacketHeader::SslRequest => {
                // Anything already buffered behind the SSLRequest was sent before our 'S':
                // a client must wait for the answer, so this is buffer stuffing
                // (CVE-2021-23222). Refuse rather than risk mixing it into the TLS stream.
                if has_pending_bytes(stream) {
                    return Err(ConnError::new(
                        ErrorKind::EarlyData,
                        "bytes after SSLRequest before the server's answer",
                    ));
                }
                write(stream, b"S").await?;
                return Ok(Negotiated::Tls { direct: false });
            }
            PacketHeader::GssEncRequest if !gssenc_refused => {
                // We do not speak GSSAPI encryption; 'N' lets libpq fall back to SSLRequest on
                // the same socket.
                gssenc_refused = true;
                write(stream, b"N").await?;
            }
            PacketHeader::GssEncRequest => {
                return Err(ConnError::new(
                    ErrorKind::ProtocolViolation,
                    "second GSSENCRequest",
                ))
            }
            PacketHeader::Cancel { body_len } => {
                let mut body = [0u8; MAX_CANCEL_BODY];
                read_exact(stream, &mut body[..body_len]).await?;
                return Ok(Negotiated::Cancel(parse_cancel_body(&body[..body_len])?));
            }
            PacketHeader::Startup { body_len, .. } => {
                // Drain the (bounded) body so the close is orderly and the client reads
                // our error instead of a reset.
                let mut body = vec![0u8; body_len];
                read_exact(stream, &mut body).await?;
                let n = NOTICE_TLS_REQUIRED;
                let _ = write(stream, &error_response(n.sqlstate, n.message, n.hint)).await;
                let _ = stream.shutdown().await;
                return Err(ConnError::new(
                    ErrorKind::TlsRequired,
                    "plaintext StartupMessage",
                ));
            }
        }
    }
}

/// Non-blocking check for bytes in the socket's receive queue.
fn has_pending_bytes(stream: &TcpStream) -> bool {
    let mut buf = [MaybeUninit::<u8>::uninit(); 1];
    // The tokio socket is non-blocking, so this peek returns WouldBlock when nothing waits.
    matches!(socket2::SockRef::from(stream).peek(&mut buf), Ok(n) if n > 0)
}

async fn read_exact(stream: &mut TcpStream, buf: &mut [u8]) -> Result<(), ConnError> {
    stream.read_exact(buf).await.map(|_| ()).map_err(|e| {
        let kind = if e.kind() == std::io::ErrorKind::UnexpectedEof {
            ErrorKind::ProtocolViolation
        } else {
            ErrorKind::ClientIo
        };
        ConnError::new(kind, format!("reading startup packet: {e}"))
    })
}

async fn write(stream: &mut TcpStream, bytes: &[u8]) -> Result<(), ConnError> {
    stream
        .write_all(bytes)
        .await
        .map_err(|e| ConnError::new(ErrorKind::ClientIo, e.to_string()))
}
