//! The first packet inside TLS: a `StartupMessage` (or, from libpq 17, a `CancelRequest`).

use tokio::io::{AsyncRead, AsyncReadExt};

use super::error::{ConnError, ErrorKind};
use crate::wire::frontend::{
    parse_cancel_body, parse_header, parse_startup_body, CancelKey, PacketHeader, StartupParams,
    MAX_CANCEL_BODY,
};

pub enum Startup {
    Session(StartupParams),
    Cancel(CancelKey),
}

pub async fn read<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Startup, ConnError> {
    let mut header = [0u8; 8];
    read_exact(stream, &mut header).await?;
    let invalid = |detail: String| ConnError::new(ErrorKind::StartupInvalid, detail);
    match parse_header(header).map_err(|e| invalid(e.to_string()))? {
        PacketHeader::Startup { body_len, minor } => {
            let mut body = vec![0u8; body_len];
            read_exact(stream, &mut body).await?;
            let params = parse_startup_body(minor, &body).map_err(|e| invalid(e.to_string()))?;
            Ok(Startup::Session(params))
        }
        PacketHeader::Cancel { body_len } => {
            let mut body = [0u8; MAX_CANCEL_BODY];
            read_exact(stream, &mut body[..body_len]).await?;
            let key = parse_cancel_body(&body[..body_len]).map_err(|e| invalid(e.to_string()))?;
            Ok(Startup::Cancel(key))
        }
        PacketHeader::SslRequest | PacketHeader::GssEncRequest => {
            Err(invalid("encryption request inside TLS".into()))
        }
    }
}

async fn read_exact<S: AsyncRead + Unpin>(s: &mut S, buf: &mut [u8]) -> Result<(), ConnError> {
    s.read_exact(buf)
        .await
        .map(|_| ())
        .map_err(|e| ConnError::new(ErrorKind::ClientIo, format!("reading startup: {e}")))
}
