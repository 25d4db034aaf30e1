//! Stage peer: whose address the allowlist checks. A connection from a trusted load balancer
//! (`proxy_protocol_from`) must open with a PROXY protocol header, v1 text or v2 binary, that
//! names the client; every other connection is its own client, and a header it sends is not
//! believed (it reaches the negotiation as bytes that are not Postgres and is refused there).
//!
//! The header is read to its exact end and not a byte further, so the SSLRequest behind it is
//! still in the socket for the negotiation: v2 says its length in its first 16 bytes, and a v1
//! line is found with a peek (or, when it arrives in pieces, a byte at a time) up to its
//! 107-byte limit. The caller's handshake deadline bounds the wait.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use super::error::{ConnError, ErrorKind};
use crate::allowlist::canonical;

/// The v2 signature: 12 bytes no text protocol starts with.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// v1's longest line, CRLF included (the protocol's own limit).
const V1_MAX: usize = 107;
/// Longest v2 address block plus TLVs accepted. Addresses take at most 216 bytes (AF_UNIX);
/// load balancers add a few TLVs (AWS: the VPC endpoint id). Anything longer is refused.
const V2_MAX_BODY: usize = 512;

/// The address the allowlist and the logs use, and the load balancer it came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr {
    pub addr: SocketAddr,
    /// The socket peer when a PROXY header named someone else.
    pub via: Option<SocketAddr>,
}

impl ClientAddr {
    pub fn direct(peer: SocketAddr) -> Self {
        ClientAddr {
            addr: peer,
            via: None,
        }
    }
}

/// Whether connections from `peer` must carry a PROXY header.
pub fn is_trusted(trusted: &[IpNet], peer: SocketAddr) -> bool {
    let ip = canonical(peer.ip());
    trusted.iter().any(|n| n.contains(&ip))
}

fn invalid(detail: impl Into<String>) -> ConnError {
    ConnError::new(ErrorKind::ProxyProtocolInvalid, detail)
}

fn read_error(e: std::io::Error) -> ConnError {
    invalid(format!("reading the PROXY header: {e}"))
}

/// Reads the PROXY header a trusted load balancer must send first.
pub async fn read_header(
    stream: &mut TcpStream,
    peer: SocketAddr,
) -> Result<ClientAddr, ConnError> {
    let mut head = [0u8; 16];
    stream
        .read_exact(&mut head[..6])
        .await
        .map_err(read_error)?;
    let source = if &head[..6] == b"PROXY " {
        read_v1(stream).await?
    } else if head[..6] == V2_SIGNATURE[..6] {
        stream
            .read_exact(&mut head[6..])
            .await
            .map_err(read_error)?;
        if head[..12] != V2_SIGNATURE[..] {
            return Err(invalid("bad PROXY v2 signature"));
        }
        let body_len = usize::from(u16::from_be_bytes([head[14], head[15]]));
        if body_len > V2_MAX_BODY {
            return Err(invalid(format!(
                "PROXY v2 header of {body_len} bytes is longer than {V2_MAX_BODY}"
            )));
        }
        // On the stack, like the rest of the path up to the allowlist check.
        let mut header = [0u8; 16 + V2_MAX_BODY];
        header[..16].copy_from_slice(&head);
        stream
            .read_exact(&mut header[16..16 + body_len])
            .await
            .map_err(read_error)?;
        v2_source(&header[..16 + body_len])?
    } else {
        return Err(invalid(
            "a connection from a trusted load balancer must start with a PROXY header",
        ));
    };
    Ok(match source {
        Some(addr) if addr != peer => ClientAddr {
            addr,
            via: Some(peer),
        },
        _ => ClientAddr::direct(peer),
    })
}

/// The rest of a v1 line after `PROXY `, consumed exactly.
async fn read_v1(stream: &mut TcpStream) -> Result<Option<SocketAddr>, ConnError> {
    let mut line = [0u8; V1_MAX];
    line[..6].copy_from_slice(b"PROXY ");
    let n = stream.peek(&mut line[6..]).await.map_err(read_error)?;
    let len = if let Some(end) = line[6..6 + n].windows(2).position(|w| w == b"\r\n") {
        let len = 6 + end + 2;
        stream
            .read_exact(&mut line[6..len])
            .await
            .map_err(read_error)?;
        len
    } else {
        // Arriving in pieces: a byte at a time, so nothing behind the line is consumed.
        let mut len = 6;
        while !line[..len].ends_with(b"\r\n") {
            if len == V1_MAX {
                return Err(invalid("PROXY v1 line longer than 107 bytes"));
            }
            stream
                .read_exact(&mut line[len..len + 1])
                .await
                .map_err(read_error)?;
            len += 1;
        }
        len
    };
    v1_source(&line[..len])
}

/// The client address a complete v1 line names; `None` for `PROXY UNKNOWN`.
pub fn v1_source(line: &[u8]) -> Result<Option<SocketAddr>, ConnError> {
    let header =
        ppp::v1::Header::try_from(line).map_err(|e| invalid(format!("bad PROXY v1 line: {e}")))?;
    Ok(match header.addresses {
        ppp::v1::Addresses::Tcp4(a) => {
            Some(SocketAddr::new(IpAddr::V4(a.source_address), a.source_port))
        }
        ppp::v1::Addresses::Tcp6(a) => {
            Some(SocketAddr::new(IpAddr::V6(a.source_address), a.source_port))
        }
        ppp::v1::Addresses::Unknown => None,
    })
}

/// The client address a complete v2 header names; `None` for LOCAL (the balancer's own
/// health check) and for address families that are not IP.
pub fn v2_source(header: &[u8]) -> Result<Option<SocketAddr>, ConnError> {
    let header = ppp::v2::Header::try_from(header)
        .map_err(|e| invalid(format!("bad PROXY v2 header: {e}")))?;
    if header.command == ppp::v2::Command::Local {
        return Ok(None);
    }
    Ok(match header.addresses {
        ppp::v2::Addresses::IPv4(a) => {
            Some(SocketAddr::new(IpAddr::V4(a.source_address), a.source_port))
        }
        ppp::v2::Addresses::IPv6(a) => {
            Some(SocketAddr::new(IpAddr::V6(a.source_address), a.source_port))
        }
        ppp::v2::Addresses::Unspecified | ppp::v2::Addresses::Unix(_) => None,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use ppp::v2::{Builder, Command, Protocol, Version};
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    use super::*;

    const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

    fn v2(command: Command, addresses: ppp::v2::Addresses) -> Vec<u8> {
        Builder::with_addresses(Version::Two | command, Protocol::Stream, addresses)
            .build()
            .unwrap()
    }

    fn tcp4(src: &str, port: u16) -> ppp::v2::Addresses {
        let src: std::net::Ipv4Addr = src.parse().unwrap();
        ppp::v2::Addresses::IPv4(ppp::v2::IPv4::new(
            src,
            std::net::Ipv4Addr::LOCALHOST,
            port,
            5432,
        ))
    }

    /// Sends `chunks` (pausing between them so they arrive apart) and then an SSLRequest;
    /// returns what the reader made of the header and the next 8 bytes left in the socket.
    async fn feed(chunks: Vec<Vec<u8>>) -> (Result<ClientAddr, ConnError>, Vec<u8>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let writer = tokio::spawn(async move {
            let mut c = TcpStream::connect(addr).await.unwrap();
            c.set_nodelay(true).unwrap();
            for chunk in chunks {
                c.write_all(&chunk).await.unwrap();
                c.flush().await.unwrap();
                tokio::task::yield_now().await;
            }
            let _ = c.write_all(&SSL_REQUEST).await;
            c
        });
        let (mut s, peer) = l.accept().await.unwrap();
        let result = read_header(&mut s, peer).await;
        let _client = writer.await.unwrap();
        let mut rest = vec![0u8; 8];
        let got = match &result {
            Ok(_) => {
                s.read_exact(&mut rest).await.unwrap();
                rest
            }
            Err(_) => Vec::new(),
        };
        (result, got)
    }

    #[tokio::test]
    async fn v1_and_v2_name_the_client_and_leave_the_ssl_request_in_the_socket() {
        let (r, rest) = feed(vec![
            b"PROXY TCP4 203.0.113.9 127.0.0.1 40001 5432\r\n".to_vec()
        ])
        .await;
        let c = r.unwrap();
        assert_eq!(c.addr, "203.0.113.9:40001".parse().unwrap());
        assert_eq!(c.via.unwrap().ip(), "127.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(rest, SSL_REQUEST);

        let (r, rest) = feed(vec![
            b"PROXY TCP6 2001:db8::7 2001:db8::1 40002 5432\r\n".to_vec()
        ])
        .await;
        assert_eq!(r.unwrap().addr, "[2001:db8::7]:40002".parse().unwrap());
        assert_eq!(rest, SSL_REQUEST);

        let (r, rest) = feed(vec![v2(Command::Proxy, tcp4("198.51.100.4", 40003))]).await;
        assert_eq!(r.unwrap().addr, "198.51.100.4:40003".parse().unwrap());
        assert_eq!(rest, SSL_REQUEST);
    }

    #[tokio::test]
    async fn a_header_in_pieces_is_read_exactly() {
        let line = b"PROXY TCP4 203.0.113.10 127.0.0.1 40004 5432\r\n".to_vec();
        let (r, rest) = feed(vec![
            line[..9].to_vec(),
            line[9..30].to_vec(),
            line[30..].to_vec(),
        ])
        .await;
        assert_eq!(r.unwrap().addr, "203.0.113.10:40004".parse().unwrap());
        assert_eq!(rest, SSL_REQUEST);

        let h = v2(Command::Proxy, tcp4("198.51.100.5", 40005));
        let (r, rest) = feed(vec![h[..5].to_vec(), h[5..17].to_vec(), h[17..].to_vec()]).await;
        assert_eq!(r.unwrap().addr, "198.51.100.5:40005".parse().unwrap());
        assert_eq!(rest, SSL_REQUEST);
    }

    #[tokio::test]
    async fn local_and_unknown_mean_the_balancer_itself() {
        let (r, rest) = feed(vec![b"PROXY UNKNOWN\r\n".to_vec()]).await;
        let c = r.unwrap();
        assert_eq!(c.via, None);
        assert_eq!(c.addr.ip(), "127.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(rest, SSL_REQUEST);

        let (r, _) = feed(vec![v2(Command::Local, ppp::v2::Addresses::Unspecified)]).await;
        assert_eq!(r.unwrap().via, None);

        let unix = ppp::v2::Addresses::Unix(ppp::v2::Unix::new([1; 108], [2; 108]));
        let (r, _) = feed(vec![v2(Command::Proxy, unix)]).await;
        assert_eq!(r.unwrap().via, None);
    }

    #[tokio::test]
    async fn anything_else_from_a_trusted_balancer_is_refused() {
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("no header, straight to the SSLRequest", Vec::new()),
            ("HTTP", b"GET / HTTP/1.1\r\n\r\n".to_vec()),
            ("v1 without CRLF within 107 bytes", {
                let mut l = b"PROXY TCP4 ".to_vec();
                l.extend(std::iter::repeat_n(b'1', 120));
                l
            }),
            (
                "v1 with a bad address",
                b"PROXY TCP4 999.1.1.1 127.0.0.1 1 2\r\n".to_vec(),
            ),
            (
                "v1 with a bad protocol",
                b"PROXY UDP4 1.1.1.1 127.0.0.1 1 2\r\n".to_vec(),
            ),
            ("v2 with a broken signature", {
                let mut h = v2(Command::Proxy, tcp4("198.51.100.6", 1));
                h[8] = b'X';
                h
            }),
            ("v2 version 3", {
                let mut h = v2(Command::Proxy, tcp4("198.51.100.6", 1));
                h[12] = 0x31;
                h
            }),
            ("v2 longer than the cap", {
                let mut h = v2(Command::Proxy, tcp4("198.51.100.6", 1));
                h[14..16].copy_from_slice(&2000u16.to_be_bytes());
                h.resize(16 + 2000, 0);
                h
            }),
            ("v2 length shorter than its addresses", {
                let mut h = v2(Command::Proxy, tcp4("198.51.100.6", 1));
                h[14..16].copy_from_slice(&4u16.to_be_bytes());
                h.truncate(20);
                h
            }),
        ];
        for (what, bytes) in cases {
            let (r, _) = feed(vec![bytes]).await;
            let e = r.expect_err(what);
            assert_eq!(e.kind, ErrorKind::ProxyProtocolInvalid, "{what}: {e:?}");
        }
    }

    #[tokio::test]
    async fn a_balancer_that_hangs_up_mid_header_is_an_error() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let mut c = TcpStream::connect(addr).await.unwrap();
        let (mut s, peer) = l.accept().await.unwrap();
        c.write_all(b"PROXY TCP4 1.2").await.unwrap();
        drop(c);
        let e = read_header(&mut s, peer).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::ProxyProtocolInvalid);
    }

    proptest::proptest! {
        #[test]
        fn header_parsers_never_panic(tail in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let mut v1 = b"PROXY ".to_vec();
            v1.extend_from_slice(&tail);
            let _ = v1_source(&v1);
            let mut v2 = V2_SIGNATURE.to_vec();
            v2.extend_from_slice(&tail);
            let _ = v2_source(&v2);
        }
    }

    #[test]
    fn trust_is_by_cidr_and_sees_through_ipv4_mapped_addresses() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        assert!(is_trusted(&trusted, "10.1.2.3:1".parse().unwrap()));
        assert!(is_trusted(&trusted, "[::ffff:10.1.2.3]:1".parse().unwrap()));
        assert!(!is_trusted(&trusted, "11.1.2.3:1".parse().unwrap()));
        assert!(!is_trusted(&[], "10.1.2.3:1".parse().unwrap()));
    }
}
