//! Dial the upstream Postgres under a deadline, with TLS (SSLRequest first) when configured.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::error::{ConnError, ErrorKind};
use crate::config::Timeouts;
use crate::snapshot::UpstreamTarget;
use crate::wire::frontend::SSL_REQUEST_CODE;

/// A plaintext or TLS connection to the upstream.
pub enum UpstreamStream {
    Plain(TcpStream),
    Unix(UnixStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl UpstreamStream {
    pub fn is_tls(&self) -> bool {
        matches!(self, UpstreamStream::Tls(_))
    }
}

/// Dials under `upstream_connect_timeout`, with the keepalive settings on a TCP socket.
pub async fn connect(
    target: &UpstreamTarget,
    timeouts: &Timeouts,
) -> Result<UpstreamStream, ConnError> {
    let timeout = timeouts.upstream_connect;
    match tokio::time::timeout(timeout, dial(target, timeouts)).await {
        Ok(r) => r,
        Err(_) => Err(ConnError::new(
            ErrorKind::UpstreamUnavailable,
            format!("upstream connect timed out after {timeout:?}"),
        )),
    }
}

/// Measures [`connect`] into the database's histogram.
pub async fn connect_timed(
    target: &UpstreamTarget,
    timeouts: &Timeouts,
    histogram: &prometheus_client::metrics::histogram::Histogram,
) -> Result<UpstreamStream, ConnError> {
    let started = Instant::now();
    let r = connect(target, timeouts).await;
    histogram.observe(started.elapsed().as_secs_f64());
    r
}

async fn dial(target: &UpstreamTarget, timeouts: &Timeouts) -> Result<UpstreamStream, ConnError> {
    let unavailable = |e: io::Error| ConnError::new(ErrorKind::UpstreamUnavailable, e.to_string());
    if let Some(path) = target.addr.unix_path() {
        return UnixStream::connect(path)
            .await
            .map(UpstreamStream::Unix)
            .map_err(unavailable);
    }
    let mut tcp = TcpStream::connect((target.addr.host.as_str(), target.addr.port))
        .await
        .map_err(unavailable)?;
    // Postgres messages are small and latency-bound; never let Nagle hold them back.
    let _ = tcp.set_nodelay(true);
    // An upstream host that dies silently would otherwise keep the client's session open
    // until the client gives up. A unix socket cannot vanish that way.
    if let Err(e) = crate::listener::set_keepalive(&tcp, &timeouts.keepalive) {
        tracing::debug!(error = %e, "cannot set TCP keepalive on the upstream socket");
    }
    let Some((config, name)) = &target.tls else {
        return Ok(UpstreamStream::Plain(tcp));
    };
    let mut req = [0u8; 8];
    req[..4].copy_from_slice(&8u32.to_be_bytes());
    req[4..].copy_from_slice(&SSL_REQUEST_CODE.to_be_bytes());
    tcp.write_all(&req).await.map_err(unavailable)?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await.map_err(unavailable)?;
    if answer[0] != b'S' {
        return Err(ConnError::new(
            ErrorKind::UpstreamTls,
            "upstream refused SSLRequest (is ssl=on in postgresql.conf?)",
        ));
    }
    let tls = TlsConnector::from(Arc::clone(config))
        .connect(name.clone(), tcp)
        .await
        .map_err(|e| ConnError::new(ErrorKind::UpstreamTls, e.to_string()))?;
    Ok(UpstreamStream::Tls(Box::new(tls)))
}

impl AsyncRead for UpstreamStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamStream::Unix(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamStream::Unix(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_flush(cx),
            UpstreamStream::Unix(s) => Pin::new(s).poll_flush(cx),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamStream::Unix(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::Keepalive;

    #[tokio::test]
    async fn the_upstream_socket_gets_the_keepalive_settings() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = UpstreamTarget {
            addr: crate::state::UpstreamAddr {
                host: "127.0.0.1".into(),
                port: l.local_addr().unwrap().port(),
            },
            tls: None,
        };
        let timeouts = Timeouts {
            keepalive: Keepalive::new(
                Some(Duration::from_secs(9)),
                Duration::from_secs(2),
                3,
                None,
            ),
            ..Timeouts::default()
        };
        let UpstreamStream::Plain(s) = connect(&target, &timeouts).await.unwrap() else {
            panic!("plaintext upstream expected");
        };
        let sock = socket2::SockRef::from(&s);
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.tcp_keepalive_time().unwrap(), Duration::from_secs(9));
        assert_eq!(
            sock.tcp_keepalive_interval().unwrap(),
            Duration::from_secs(2)
        );
        assert_eq!(sock.tcp_keepalive_retries().unwrap(), 3);
        assert_eq!(
            sock.tcp_user_timeout().unwrap(),
            Some(Duration::from_secs(15))
        );
    }
}
