//! CancelRequest forwarding. Only keys of backends this process opened are forwarded: the
//! proxy must not become a way to guess cancel keys of other sessions on the upstream. The
//! same path cancels the statement of a session the proxy cuts (see [`send`]).

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::error::{ConnError, ErrorKind};
use super::upstream;
use super::Context;
use crate::config::Timeouts;
use crate::snapshot::{DatabaseRuntime, UpstreamTarget};
use crate::wire::frontend::CancelKey;

pub async fn forward(ctx: &Context, db: &DatabaseRuntime, key: CancelKey) -> Result<(), ConnError> {
    if !ctx.sessions.cancel_key_known(&key, &db.name) {
        db.metrics.cancel_refused.inc();
        return Err(ConnError::new(
            ErrorKind::CancelUnknownKey,
            "cancel key of no session relayed by this proxy",
        ));
    }
    send(&db.upstream, &ctx.timeouts, &key).await?;
    db.metrics.cancel_forwarded.inc();
    Ok(())
}

/// Sends one CancelRequest for `key` to the upstream and waits, all within the upstream
/// connect timeout, until
/// the server closes that connection, which it does once it has signalled the backend (libpq
/// waits the same way). A caller that then closes the session's own socket knows the cancel
/// reached the backend while it still served that session, so the key cannot hit a later
/// backend that reused the process id.
pub async fn send(
    target: &UpstreamTarget,
    timeouts: &Timeouts,
    key: &CancelKey,
) -> Result<(), ConnError> {
    let timeout = timeouts.upstream_connect;
    let io = |e: std::io::Error| ConnError::new(ErrorKind::UpstreamIo, e.to_string());
    let exchange = async {
        let mut up = upstream::connect(target, timeouts).await?;
        up.write_all(&key.to_request()).await.map_err(io)?;
        up.flush().await.map_err(io)?;
        // The server sends nothing back; EOF, or a reset or a TLS close without close_notify,
        // means it is done with the request.
        let mut sink = [0u8; 64];
        while matches!(up.read(&mut sink).await, Ok(n) if n > 0) {}
        Ok(())
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(r) => r,
        Err(_) => Err(ConnError::new(
            ErrorKind::UpstreamUnavailable,
            format!("cancel request not acknowledged within {timeout:?}"),
        )),
    }
}
