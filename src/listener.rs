//! Bind, accept, hand each socket to `conn::serve` under the connection limit.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

use crate::conn::error::ErrorKind;
use crate::conn::{self, Context};

/// Binds a listener with `SO_REUSEADDR`, so a restart does not wait out TIME_WAIT.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Accepts until `stop` turns true. Each connection holds a permit of `limit` for its whole
/// life, which is also how shutdown knows when every connection is gone.
pub async fn run(
    listener: TcpListener,
    database: Arc<str>,
    ctx: Arc<Context>,
    limit: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stop.wait_for(|s| *s) => return,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE/ENFILE/ENOBUFS: the socket stays in the backlog; back off briefly
                // instead of spinning on the same error.
                tracing::warn!(database = &*database, error = %e, "accept failed; backing off");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&limit).try_acquire_owned() else {
            refuse_over_limit(&ctx, &database, stream, peer);
            continue;
        };
        let ctx = Arc::clone(&ctx);
        let database = Arc::clone(&database);
        tokio::spawn(async move {
            conn::serve(ctx, database, stream, peer).await;
            drop(permit);
        });
    }
}

fn refuse_over_limit(ctx: &Context, database: &str, stream: TcpStream, peer: SocketAddr) {
    drop(stream);
    if let Some(db) = ctx.snapshot.load().databases.get(database) {
        db.metrics.refuse(ErrorKind::TooManyConnections);
    }
    tracing::info!(
        client_addr = %peer,
        database,
        outcome = "refused",
        error_kind = ErrorKind::TooManyConnections.as_str(),
        "connection closed"
    );
}
