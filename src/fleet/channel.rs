//! The peer channel: one mutually authenticated TLS connection per forwarded CancelRequest.
//! The server side only ever looks a key up in this process; it never forwards, so a cancel
//! takes one hop at most, and a key no replica relays reaches no Postgres.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use super::message::{MessageError, Reply, Request, MAX_REQUEST};
use super::{key, Fleet};
use crate::conn::Context;
use crate::wire::frontend::CancelKey;

/// Peer connections served at once; more wait in the kernel's backlog. Only replicas holding
/// a peer certificate get past TLS, so this bounds what strangers' handshakes can take.
const MAX_PEER_CONNECTIONS: usize = 64;

/// Why a forward to the owner did not get an answer.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("no replica {0} is known")]
    UnknownReplica(u8),
    #[error("replica {0} has left the replica registry")]
    Departed(u8),
    #[error("replica {id} at {addr}: {what}")]
    Unreachable {
        id: u8,
        addr: std::net::SocketAddr,
        what: String,
    },
}

impl Fleet {
    /// Asks replica `owner` to cancel `key`'s query in `database`, all within `timeout`.
    pub async fn ask_owner(
        &self,
        owner: u8,
        database: &str,
        key: &CancelKey,
        timeout: Duration,
    ) -> Result<Reply, ForwardError> {
        let peer = self.locate(owner).ok_or_else(|| {
            if self.departed(owner) {
                ForwardError::Departed(owner)
            } else {
                ForwardError::UnknownReplica(owner)
            }
        })?;
        let fail = |what: String| ForwardError::Unreachable {
            id: owner,
            addr: peer.addr,
            what,
        };
        let request = Request {
            database: database.to_owned(),
            key: key.clone(),
        }
        .encode();
        let exchange = async {
            let tcp = TcpStream::connect(peer.addr)
                .await
                .map_err(|e| format!("connect: {e}"))?;
            let _ = tcp.set_nodelay(true);
            let mut tls = self
                .connector
                .connect(peer.server_name.clone(), tcp)
                .await
                .map_err(|e| format!("TLS: {e}"))?;
            tls.write_all(&request)
                .await
                .map_err(|e| format!("write: {e}"))?;
            tls.flush().await.map_err(|e| format!("write: {e}"))?;
            let mut b = [0u8; 1];
            tls.read_exact(&mut b)
                .await
                .map_err(|e| format!("no reply: {e}"))?;
            let _ = tls.shutdown().await;
            Reply::parse(b[0]).map_err(|e| e.to_string())
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(r) => r.map_err(fail),
            Err(_) => Err(fail(format!("no answer within {timeout:?}"))),
        }
    }
}

/// Accepts peer connections on `listener` until the process exits: sessions still running in
/// the shutdown grace can be cancelled from other replicas too.
pub async fn serve(fleet: Arc<Fleet>, listener: TcpListener, ctx: Arc<Context>) {
    let slots = Arc::new(Semaphore::new(MAX_PEER_CONNECTIONS));
    loop {
        let accepted = listener.accept().await;
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "peer channel: accept failed");
                // Out of descriptors and the like: let the condition pass instead of spinning.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let fleet = fleet.clone();
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let deadline = ctx.timeouts.handshake;
            let outcome = tokio::time::timeout(deadline, answer(&fleet, &ctx, tcp)).await;
            let outcome = outcome.unwrap_or(Err(PeerError::Timeout));
            match outcome {
                Ok((database, reply)) => tracing::info!(
                    peer_addr = %peer,
                    database = database.as_str(),
                    outcome = reply.as_str(),
                    "peer cancel request served"
                ),
                Err(e) => {
                    if crate::refusal_log::admit(None, e.reason()) {
                        tracing::warn!(
                            peer_addr = %peer,
                            reason = e.reason(),
                            detail = %e,
                            "peer cancel request refused"
                        );
                    }
                }
            }
            drop(permit);
        });
    }
}

#[derive(Debug, thiserror::Error)]
enum PeerError {
    #[error("TLS: {0}")]
    Tls(std::io::Error),
    #[error("{0}")]
    Io(std::io::Error),
    #[error("{0}")]
    Message(#[from] MessageError),
    #[error("no request within the handshake timeout")]
    Timeout,
}

impl PeerError {
    fn reason(&self) -> &'static str {
        match self {
            PeerError::Tls(_) => "peer_tls",
            PeerError::Io(_) => "peer_io",
            PeerError::Message(_) => "peer_message_invalid",
            PeerError::Timeout => "peer_timeout",
        }
    }
}

/// One peer connection: TLS (the peer's certificate is verified against the peer CA), one
/// request, one reply byte.
async fn answer(
    fleet: &Fleet,
    ctx: &Context,
    tcp: TcpStream,
) -> Result<(String, Reply), PeerError> {
    let _ = tcp.set_nodelay(true);
    let mut tls = fleet.acceptor.accept(tcp).await.map_err(PeerError::Tls)?;
    let mut buf = Vec::with_capacity(64);
    let total = loop {
        if let Some(n) = Request::total_len(&buf)? {
            if buf.len() >= n {
                break n;
            }
        }
        let mut chunk = [0u8; 512];
        let n = tls.read(&mut chunk).await.map_err(PeerError::Io)?;
        if n == 0 {
            return Err(MessageError::Truncated.into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_REQUEST {
            return Err(MessageError::Trailing.into());
        }
    };
    let request = Request::parse(&buf[..total])?;
    if buf.len() > total {
        return Err(MessageError::Trailing.into());
    }
    // One hop: a key this replica did not issue is not passed on, whoever sent it.
    let reply = if key::replica_of(&request.key) != fleet.replica_id() {
        Reply::UnknownKey
    } else {
        crate::conn::cancel::forward_local(ctx, &request.database, &request.key).await
    };
    tls.write_all(&[reply as u8]).await.map_err(PeerError::Io)?;
    tls.flush().await.map_err(PeerError::Io)?;
    let _ = tls.shutdown().await;
    Ok((request.database, reply))
}
