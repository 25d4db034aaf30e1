//! The authentication phase, relayed message by message until the upstream's first
//! `ReadyForQuery`: pgmtls learns the backend's cancel key and refuses a client that chose
//! `SCRAM-SHA-256-PLUS` through a TLS upstream, where channel binding must fail (the client
//! binds to pgmtls' certificate, the server to its own). After this phase bytes flow unframed.

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::error::{ConnError, ErrorKind};
use crate::wire::backend::{put_message, take_message, MAX_AUTH_PHASE_MESSAGE};
use crate::wire::frontend::{sasl_mechanism, CancelKey};
use crate::wire::{AuthRequest, BackendMessage};

const SCRAM_PLUS: &str = "SCRAM-SHA-256-PLUS";

/// What the phase ended with. The buffers hold bytes read past the phase, to relay first.
pub struct AuthOutcome {
    pub cancel_key: Option<CancelKey>,
    pub client_leftover: BytesMut,
    pub upstream_leftover: BytesMut,
    pub authenticated: bool,
}

pub async fn relay_auth_phase<C, U>(
    client: &mut C,
    upstream: &mut U,
    upstream_is_tls: bool,
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
                    match BackendMessage::parse(tag, &body) {
                        Ok(BackendMessage::Auth(AuthRequest::Sasl(mechs))) => {
                            plus_offered = upstream_is_tls && mechs.iter().any(|m| m == SCRAM_PLUS);
                        }
                        Ok(BackendMessage::Auth(AuthRequest::Ok)) => authenticated = true,
                        Ok(BackendMessage::KeyData(k)) => cancel_key = Some(k),
                        Ok(BackendMessage::ReadyForQuery) => ready = true,
                        Ok(BackendMessage::Error { .. }) => rejected = true,
                        _ => {}
                    }
                    put_message(&mut out, tag, &body);
                    if ready {
                        break;
                    }
                }
                client
                    .write_all(&out)
                    .await
                    .map_err(|e| ConnError::new(ErrorKind::ClientIo, e.to_string()))?;
                client
                    .flush()
                    .await
                    .map_err(|e| ConnError::new(ErrorKind::ClientIo, e.to_string()))?;
                if ready {
                    return Ok(AuthOutcome {
                        cancel_key,
                        client_leftover: cl_buf,
                        upstream_leftover: up_buf,
                        authenticated,
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
            r = client.read_buf(&mut cl_buf) => {
                let n = r.map_err(|e| ConnError::new(ErrorKind::ClientIo, e.to_string()))?;
                if n == 0 {
                    return Err(ConnError::new(ErrorKind::ClientIo, "client closed during authentication"));
                }
                out.clear();
                while let Some((tag, body)) = take_message(&mut cl_buf, MAX_AUTH_PHASE_MESSAGE)? {
                    if tag == b'p' && plus_offered && sasl_mechanism(&body) == Some(SCRAM_PLUS) {
                        return Err(ConnError::new(
                            ErrorKind::ChannelBinding,
                            "client chose SCRAM-SHA-256-PLUS through a TLS upstream",
                        ));
                    }
                    put_message(&mut out, tag, &body);
                }
                upstream
                    .write_all(&out)
                    .await
                    .map_err(|e| ConnError::new(ErrorKind::UpstreamIo, e.to_string()))?;
                upstream
                    .flush()
                    .await
                    .map_err(|e| ConnError::new(ErrorKind::UpstreamIo, e.to_string()))?;
            }
        }
    }
}
