//! The authentication phase, relayed message by message until the upstream's first
//! `ReadyForQuery`: pgmtls learns the backend's cancel key and refuses a client that chose
//! `SCRAM-SHA-256-PLUS` through a TLS upstream, where channel binding must fail (the client
//! binds to pgmtls' certificate, the server to its own). After this phase bytes flow unframed.
//!
//! Until the upstream's `AuthenticationOk` only authentication messages ('p': password, SASL
//! and GSS responses) reach Postgres. Anything else a client sends that early, a pipelined
//! Query for instance, is refused: it would otherwise sit in the backend's socket and run the
//! moment authentication succeeds, before the proxy gets another chance to say no. After
//! `AuthenticationOk` the client is not read at all until the relay starts, so whatever it
//! sends next reaches Postgres only through the relay, which honours revocation.

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::error::{ConnError, ErrorKind};
use super::relay::RelayStats;
use crate::wire::backend::{put_message, take_message, MAX_AUTH_PHASE_MESSAGE};
use crate::wire::frontend::{sasl_mechanism, CancelKey};
use crate::wire::{AuthRequest, BackendMessage};

const SCRAM_PLUS: &str = "SCRAM-SHA-256-PLUS";

/// The one frontend message type of the authentication exchange (PasswordMessage,
/// SASLInitialResponse, SASLResponse and GSSResponse share it).
const AUTH_RESPONSE: u8 = b'p';
const TERMINATE: u8 = b'X';

/// What the phase ended with. The buffers hold bytes read past the phase, to relay first.
pub struct AuthOutcome {
    /// The backend's own key.
    pub cancel_key: Option<CancelKey>,
    /// In a fleet, the key the client was given instead (see `fleet::key`).
    pub client_cancel_key: Option<CancelKey>,
    pub client_leftover: BytesMut,
    pub upstream_leftover: BytesMut,
}

/// Relays the authentication exchange; the bytes written each way are added to `bytes`, also
/// when the phase fails. With `replica_id` (a replica of a fleet) the client's BackendKeyData
/// carries a key of this replica's making in place of the backend's.
pub async fn relay_auth_phase<C, U>(
    client: &mut C,
    upstream: &mut U,
    upstream_is_tls: bool,
    bytes: &mut RelayStats,
    replica_id: Option<u8>,
) -> Result<AuthOutcome, ConnError>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let mut up_buf = BytesMut::with_capacity(4096);
    let mut cl_buf = BytesMut::with_capacity(1024);
    let mut out = Vec::with_capacity(4096);
    let mut plus_offered = false;
    let mut cancel_key = None;
    let mut client_cancel_key = None;
    let mut authenticated = false;
    let mut rejected = false;
    loop {
        tokio::select! {
            r = upstream.read_buf(&mut up_buf) => {
                let n = r.map_err(|e| ConnError::new(ErrorKind::UpstreamIo, e.to_string()))?;
                let mut ready = false;
                out.clear();
                while let Some((tag, body)) = take_message(&mut up_buf, MAX_AUTH_PHASE_MESSAGE)
                    .map_err(|e| ConnError::new(ErrorKind::UpstreamIo, e.to_string()))?
                {
                    let mut replaced = None;
                    match BackendMessage::parse(tag, &body) {
                        Ok(BackendMessage::Auth(AuthRequest::Sasl(mechs))) => {
                            plus_offered = upstream_is_tls && mechs.iter().any(|m| m == SCRAM_PLUS);
                        }
                        Ok(BackendMessage::Auth(AuthRequest::Ok)) => authenticated = true,
                        Ok(BackendMessage::KeyData(k)) => {
                            if let Some(id) = replica_id {
                                let visible = crate::fleet::key::client_key(id, &k);
                                replaced = Some(key_data_body(&visible));
                                client_cancel_key = Some(visible);
                            }
                            cancel_key = Some(k);
                        }
                        Ok(BackendMessage::ReadyForQuery) => ready = true,
                        Ok(BackendMessage::Error { .. }) => rejected = true,
                        _ => {}
                    }
                    put_message(&mut out, tag, replaced.as_deref().unwrap_or(&body));
                    if ready {
                        break;
                    }
                }
                client
                    .write_all(&out)
                    .await
                    .map_err(|e| ConnError::new(ErrorKind::ClientIo, e.to_string()))?;
                bytes.to_client += out.len() as u64;
                client
                    .flush()
                    .await
                    .map_err(|e| ConnError::new(ErrorKind::ClientIo, e.to_string()))?;
                if ready {
                    return Ok(AuthOutcome {
                        cancel_key,
                        client_cancel_key,
                        client_leftover: cl_buf,
                        upstream_leftover: up_buf,
                    });
                }
                if n == 0 {
                    // The upstream ended the session during authentication (wrong password,
                    // unknown role...): its ErrorResponse has just been passed on.
                    let (kind, detail) = if rejected {
                        (ErrorKind::UpstreamRejected, "upstream refused the session")
                    } else {
                        (ErrorKind::UpstreamIo, "upstream closed during authentication")
                    };
                    return Err(ConnError::new(kind, detail));
                }
            }
            r = client.read_buf(&mut cl_buf), if !authenticated => {
                let n = r.map_err(|e| ConnError::new(ErrorKind::ClientIo, e.to_string()))?;
                if n == 0 {
                    return Err(ConnError::new(ErrorKind::ClientIo, "client closed during authentication"));
                }
                out.clear();
                take_auth_responses(&mut cl_buf, &mut out, plus_offered)?;
                if out.is_empty() {
                    continue;
                }
                upstream
                    .write_all(&out)
                    .await
                    .map_err(|e| ConnError::new(ErrorKind::UpstreamIo, e.to_string()))?;
                bytes.to_upstream += out.len() as u64;
                upstream
                    .flush()
                    .await
                    .map_err(|e| ConnError::new(ErrorKind::UpstreamIo, e.to_string()))?;
            }
        }
    }
}

/// The body of a BackendKeyData carrying `key`.
fn key_data_body(key: &CancelKey) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + key.secret().len());
    b.extend_from_slice(&key.process_id().to_be_bytes());
    b.extend_from_slice(key.secret());
    b
}

/// Moves the complete authentication responses at the front of `buf` into `out`. The type
/// byte is checked as soon as it arrives, so nothing else is buffered, let alone forwarded.
fn take_auth_responses(
    buf: &mut BytesMut,
    out: &mut Vec<u8>,
    plus_offered: bool,
) -> Result<(), ConnError> {
    while let Some(&tag) = buf.first() {
        match tag {
            AUTH_RESPONSE => {}
            // A client that gives up (no password to offer) may say goodbye first.
            TERMINATE => {
                return Err(ConnError::new(
                    ErrorKind::ClientIo,
                    "client terminated during authentication",
                ))
            }
            other => {
                return Err(ConnError::new(
                    ErrorKind::UnauthenticatedMessage,
                    format!(
                        "client sent message type {:?} before authentication completed",
                        char::from(other)
                    ),
                ))
            }
        }
        let Some((tag, body)) = take_message(buf, MAX_AUTH_PHASE_MESSAGE)? else {
            break;
        };
        if plus_offered && sasl_mechanism(&body) == Some(SCRAM_PLUS) {
            return Err(ConnError::new(
                ErrorKind::ChannelBinding,
                "client chose SCRAM-SHA-256-PLUS through a TLS upstream",
            ));
        }
        put_message(out, tag, &body);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        put_message(&mut v, tag, body);
        v
    }

    #[test]
    fn only_authentication_responses_pass_before_authentication_ok() {
        let mut buf = BytesMut::from(&msg(b'p', b"secret\0")[..]);
        let mut out = Vec::new();
        take_auth_responses(&mut buf, &mut out, false).unwrap();
        assert_eq!(out, msg(b'p', b"secret\0"));
        assert!(buf.is_empty());

        // A Query behind a password is refused, and so is its first byte alone.
        for pipelined in [msg(b'Q', b"select 1\0"), vec![b'Q']] {
            let mut buf = BytesMut::from(&msg(b'p', b"secret\0")[..]);
            buf.extend_from_slice(&pipelined);
            let e = take_auth_responses(&mut buf, &mut Vec::new(), false).unwrap_err();
            assert_eq!(e.kind, ErrorKind::UnauthenticatedMessage, "{e}");
        }

        // A partial password waits for the rest.
        let full = msg(b'p', b"secret\0");
        let mut buf = BytesMut::from(&full[..4]);
        let mut out = Vec::new();
        take_auth_responses(&mut buf, &mut out, false).unwrap();
        assert!(out.is_empty());
        assert_eq!(buf.len(), 4);
    }
}
