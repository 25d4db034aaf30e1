//! CancelRequest forwarding. Only keys of backends this process opened are forwarded: the
//! proxy must not become a way to guess cancel keys of other sessions on the upstream.

use tokio::io::AsyncWriteExt;

use super::error::{ConnError, ErrorKind};
use super::upstream;
use super::Context;
use crate::snapshot::DatabaseRuntime;
use crate::wire::frontend::CancelKey;

pub async fn forward(ctx: &Context, db: &DatabaseRuntime, key: CancelKey) -> Result<(), ConnError> {
    if !ctx.sessions.cancel_key_known(&key, &db.name) {
        db.metrics.cancel_refused.inc();
        return Err(ConnError::new(
            ErrorKind::CancelUnknownKey,
            "cancel key of no session relayed by this proxy",
        ));
    }
    let mut up = upstream::connect(&db.upstream, &ctx.timeouts).await?;
    up.write_all(&key.to_request())
        .await
        .map_err(|e| ConnError::new(ErrorKind::UpstreamIo, e.to_string()))?;
    let _ = up.shutdown().await;
    db.metrics.cancel_forwarded.inc();
    Ok(())
}
