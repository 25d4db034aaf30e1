//! A hand-driven PostgreSQL client for messages no real client library will send (repeated
//! startup keys, over-long names): SSLRequest, TLS with a client certificate, raw bytes, and
//! backend messages read one at a time.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::clients::tls_client_config;
use super::pki::{Role, TestPki};

const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// A StartupMessage (protocol 3.0) carrying `pairs` in this order, repeats and all.
pub fn startup_packet(pairs: &[(&str, &str)]) -> Vec<u8> {
    let mut body = 196_608u32.to_be_bytes().to_vec();
    for (k, v) in pairs {
        for s in [k, v] {
            body.extend_from_slice(s.as_bytes());
            body.push(0);
        }
    }
    body.push(0);
    let mut msg = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    msg.extend_from_slice(&body);
    msg
}

/// A simple-protocol Query message.
pub fn query_message(sql: &str) -> Vec<u8> {
    let mut msg = vec![b'Q'];
    msg.extend_from_slice(&((sql.len() + 5) as u32).to_be_bytes());
    msg.extend_from_slice(sql.as_bytes());
    msg.push(0);
    msg
}

/// SSLRequest, then TLS over `stream` presenting `cert`, verified against `pki`'s CA.
pub async fn tls_over(stream: TcpStream, pki: &TestPki, cert: &Role) -> TlsStream<TcpStream> {
    let mut stream = stream;
    stream.write_all(&SSL_REQUEST).await.unwrap();
    let mut answer = [0u8; 1];
    stream.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"S", "the proxy accepts SSLRequest");
    let config = tls_client_config(
        &pki.ca.cert_path,
        Some((&cert.chain_path, &cert.key_path)),
        false,
    );
    TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), stream)
        .await
        .expect("TLS handshake with the proxy")
}

/// TLS to the proxy at `addr` from 127.0.0.1.
pub async fn tls_to(addr: SocketAddr, pki: &TestPki, cert: &Role) -> TlsStream<TcpStream> {
    tls_over(TcpStream::connect(addr).await.unwrap(), pki, cert).await
}

/// One backend message: its tag and body, or `None` at end of stream.
pub async fn read_message(s: &mut TlsStream<TcpStream>) -> Option<(u8, Vec<u8>)> {
    let read = async {
        let mut head = [0u8; 5];
        s.read_exact(&mut head).await.ok()?;
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let mut body = vec![0u8; len.checked_sub(4)?];
        s.read_exact(&mut body).await.ok()?;
        Some((head[0], body))
    };
    tokio::time::timeout(Duration::from_secs(15), read)
        .await
        .expect("the proxy answers or closes within 15 s")
}

/// The fields of an ErrorResponse body, by their one-letter codes.
pub fn error_fields(body: &[u8]) -> Vec<(char, String)> {
    body.split(|&b| b == 0)
        .filter(|f| !f.is_empty())
        .map(|f| (f[0] as char, String::from_utf8_lossy(&f[1..]).into_owned()))
        .collect()
}

/// The SQLSTATE of an ErrorResponse body.
pub fn sqlstate(body: &[u8]) -> String {
    error_fields(body)
        .into_iter()
        .find(|(c, _)| *c == 'C')
        .map(|(_, v)| v)
        .unwrap_or_default()
}

pub fn cancel_request(pid: u32, secret: &[u8]) -> Vec<u8> {
    let mut req = (12 + secret.len() as u32).to_be_bytes().to_vec();
    req.extend_from_slice(&80_877_102u32.to_be_bytes());
    req.extend_from_slice(&pid.to_be_bytes());
    req.extend_from_slice(secret);
    req
}

/// A stand-in for PostgreSQL 18 speaking protocol 3.2: answers a StartupMessage with
/// AuthenticationOk, a BackendKeyData carrying `secret` (32 bytes, as PostgreSQL 18 issues)
/// and ReadyForQuery, and reports every CancelRequest it receives, byte for byte.
pub async fn protocol_32_upstream(
    listener: tokio::net::TcpListener,
    secret: Vec<u8>,
    cancels: tokio::sync::mpsc::UnboundedSender<Vec<u8>>,
) {
    loop {
        let (mut s, _) = listener.accept().await.unwrap();
        let secret = secret.clone();
        let cancels = cancels.clone();
        tokio::spawn(async move {
            let mut header = [0u8; 8];
            s.read_exact(&mut header).await.unwrap();
            let len = u32::from_be_bytes(header[..4].try_into().unwrap()) as usize;
            let mut body = vec![0u8; len - 8];
            s.read_exact(&mut body).await.unwrap();
            if header[4..] == 80_877_102u32.to_be_bytes() {
                cancels.send([&header[..], &body].concat()).unwrap();
                return;
            }
            let mut out = vec![b'R', 0, 0, 0, 8, 0, 0, 0, 0];
            out.push(b'K');
            out.extend_from_slice(&(8 + secret.len() as u32).to_be_bytes());
            out.extend_from_slice(&4242u32.to_be_bytes());
            out.extend_from_slice(&secret);
            out.extend_from_slice(&[b'Z', 0, 0, 0, 5, b'I']);
            s.write_all(&out).await.unwrap();
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest).await;
        });
    }
}

/// Panics unless `out`, everything a refused peer got before the close, is exactly the one
/// generic refusal every refusal before TLS sends: an ErrorResponse with SQLSTATE 08004 and
/// the fixed text, and nothing that says why.
pub fn assert_generic_refusal(out: &[u8]) {
    assert_eq!(out.first(), Some(&b'E'), "an ErrorResponse: {out:?}");
    let len = out
        .get(1..5)
        .map(|l| u32::from_be_bytes([l[0], l[1], l[2], l[3]]) as usize)
        .unwrap_or(0);
    assert_eq!(
        out.len(),
        1 + len,
        "one message and nothing after it: {out:?}"
    );
    assert_eq!(
        error_fields(&out[5..]),
        vec![
            ('S', "FATAL".to_owned()),
            ('V', "FATAL".to_owned()),
            ('C', "08004".to_owned()),
            ('M', "pgmtls: connection refused".to_owned()),
        ]
    );
}
