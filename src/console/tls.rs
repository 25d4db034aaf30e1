//! The console over TLS (`console_tls`): the rustls server config built from the operator's
//! files, and a listener for axum that finishes each handshake before the connection reaches
//! the router, with the client certificate (mTLS mode) handed to every request.
//!
//! A handshake that fails (no client certificate, one from another CA, a plaintext client)
//! never reaches a handler: it is logged and counted here with its reason.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::serve::IncomingStream;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Semaphore};

use super::metrics::{ConsoleMetrics, Refusal};
use crate::config::process::ConsoleTlsPaths;
use crate::config::ConfigErrors;

/// How long a client has to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes in progress at once; a client that opens more waits in the kernel's backlog.
const MAX_HANDSHAKES: usize = 64;

/// Where each file came from, for error messages: the config key or the flag.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub paths: ConsoleTlsPaths,
    /// Names of the three settings as the operator wrote them: `console_tls.cert_file` or
    /// `--tls-cert`, and so on.
    pub labels: [&'static str; 3],
}

impl TlsFiles {
    pub fn from_config(paths: ConsoleTlsPaths) -> TlsFiles {
        TlsFiles {
            paths,
            labels: [
                "console_tls.cert_file",
                "console_tls.key_file",
                "console_tls.client_ca_file",
            ],
        }
    }

    pub fn from_flags(paths: ConsoleTlsPaths) -> TlsFiles {
        TlsFiles {
            paths,
            labels: ["--tls-cert", "--tls-key", "--tls-client-ca"],
        }
    }

    pub fn mtls(&self) -> bool {
        self.paths.client_ca_file.is_some()
    }
}

/// The console's TLS: the rustls config, and the names its certificate is for (DNS names and
/// IPs), which the `Host` check accepts.
pub struct Served {
    pub config: Arc<ServerConfig>,
    pub names: Vec<String>,
}

fn err(file: &Path, key: &str, message: impl Into<String>) -> ConfigErrors {
    ConfigErrors::one(file, key, None, message)
}

fn read(file: &Path, key: &str) -> Result<Vec<u8>, ConfigErrors> {
    std::fs::read(file).map_err(|e| err(file, key, format!("cannot read: {e}")))
}

/// Reads the three files and builds the server config. Every error names the setting and
/// the file; a private key readable by group or others is refused, as for the databases'.
pub fn server_config(files: &TlsFiles) -> Result<Served, ConfigErrors> {
    let [cert_key, key_key, ca_key] = files.labels;
    let p = &files.paths;
    let chain = crate::tls_store::certs(&p.cert_file, &read(&p.cert_file, cert_key)?).map_err(
        |mut e| {
            for one in &mut e.0 {
                one.key = cert_key.to_owned();
            }
            e
        },
    )?;
    let key_pem = crate::state::read_private_key(&p.key_file).map_err(|mut e| {
        for one in &mut e.0 {
            one.key = key_key.to_owned();
        }
        e
    })?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| err(&p.key_file, key_key, format!("no usable private key: {e}")))?;
    let provider = crate::tls_store::provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| err(&p.cert_file, cert_key, format!("TLS versions: {e}")))?;
    let builder = match &p.client_ca_file {
        None => builder.with_no_client_auth(),
        Some(ca_file) => {
            let mut roots = RootCertStore::empty();
            let cas =
                crate::tls_store::certs(ca_file, &read(ca_file, ca_key)?).map_err(|mut e| {
                    for one in &mut e.0 {
                        one.key = ca_key.to_owned();
                    }
                    e
                })?;
            for ca in cas {
                roots.add(ca).map_err(|e| {
                    err(ca_file, ca_key, format!("not a usable CA certificate: {e}"))
                })?;
            }
            // Not `allow_unauthenticated`: without a certificate from this CA there is no
            // handshake, so nothing of the console is reachable.
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| err(ca_file, ca_key, format!("CA rejected: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let names = chain.first().map(cert_names).unwrap_or_default();
    let mut config = builder.with_single_cert(chain, key).map_err(|e| {
        err(
            &p.key_file,
            key_key,
            format!("certificate and key do not go together: {e}"),
        )
    })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Served {
        config: Arc::new(config),
        names,
    })
}

/// The DNS names and IP addresses of a certificate's subjectAltName.
fn cert_names(der: &CertificateDer<'_>) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der.as_ref()) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(d) => Some(d.to_ascii_lowercase()),
            GeneralName::IPAddress(b) => match b.len() {
                4 => <[u8; 4]>::try_from(*b)
                    .ok()
                    .map(|a| std::net::Ipv4Addr::from(a).to_string()),
                16 => <[u8; 16]>::try_from(*b)
                    .ok()
                    .map(|a| format!("[{}]", std::net::Ipv6Addr::from(a))),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

/// The operator certificate a connection presented (mTLS mode).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert {
    /// Its subject's common name, or `-` without one.
    pub common_name: String,
    /// Lowercase hex, as everywhere in pgmtls.
    pub serial: String,
    /// SHA-256 of the DER: a session started with this certificate is bound to it.
    pub fingerprint: String,
}

impl ClientCert {
    fn of(der: &CertificateDer<'_>) -> ClientCert {
        let fingerprint = hex::encode(Sha256::digest(der.as_ref()));
        match x509_parser::parse_x509_certificate(der.as_ref()) {
            Ok((_, cert)) => ClientCert {
                common_name: cert
                    .subject()
                    .iter_common_name()
                    .next()
                    .and_then(|cn| cn.as_str().ok())
                    .unwrap_or("-")
                    .to_owned(),
                serial: crate::tls_store::serial_hex(cert.raw_serial()),
                fingerprint,
            },
            Err(_) => ClientCert {
                common_name: "-".into(),
                serial: "-".into(),
                fingerprint,
            },
        }
    }
}

/// Who is on the other end of a connection: what handlers get as `ConnectInfo`.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    /// The verified client certificate, in mTLS mode.
    pub cert: Option<Arc<ClientCert>>,
}

impl Connected<IncomingStream<'_, tokio::net::TcpListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, tokio::net::TcpListener>) -> Peer {
        Peer {
            addr: *stream.remote_addr(),
            cert: None,
        }
    }
}

impl Connected<IncomingStream<'_, Incoming>> for Peer {
    fn connect_info(stream: IncomingStream<'_, Incoming>) -> Peer {
        stream.remote_addr().clone()
    }
}

/// A stream that finished its TLS handshake.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

/// The connections that passed the handshake, for `axum::serve`.
pub struct Incoming {
    rx: mpsc::Receiver<(Box<dyn Io>, Peer)>,
    local: SocketAddr,
}

impl axum::serve::Listener for Incoming {
    type Io = Box<dyn Io>;
    type Addr = Peer;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(c) => c,
            // The acceptor ended (it does not, short of a panic): serve nothing more.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(Peer {
            addr: self.local,
            cert: None,
        })
    }
}

/// Accepts TCP connections on `listener` and runs each handshake on a task of its own, so a
/// slow client holds up no other; the connections that pass go to the returned listener.
pub fn incoming(
    listener: TcpListener,
    local: SocketAddr,
    config: Arc<ServerConfig>,
    metrics: Arc<ConsoleMetrics>,
) -> Incoming {
    let (tx, rx) = mpsc::channel::<(Box<dyn Io>, Peer)>(MAX_HANDSHAKES);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let permits = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let Ok(permit) = permits.clone().acquire_owned().await else {
                return;
            };
            let (tcp, addr) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little rather than spin.
                    eprintln!("pgmtls console: cannot accept a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let (acceptor, tx, metrics) = (acceptor.clone(), tx.clone(), metrics.clone());
            tokio::spawn(async move {
                let _permit = permit;
                let done = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
                let tls = match done {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        let (reason, what) = handshake_refusal(&e);
                        metrics.refused(reason);
                        eprintln!(
                            "pgmtls console: refused {addr}: {what}: {e} (reason {})",
                            reason.as_str()
                        );
                        return;
                    }
                    Err(_) => {
                        metrics.refused(Refusal::TlsHandshake);
                        eprintln!(
                            "pgmtls console: refused {addr}: TLS handshake not finished in {} s \
                             (reason {})",
                            HANDSHAKE_TIMEOUT.as_secs(),
                            Refusal::TlsHandshake.as_str()
                        );
                        return;
                    }
                };
                let cert = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|c| Arc::new(ClientCert::of(c)));
                let _ = tx.send((Box::new(tls), Peer { addr, cert })).await;
            });
        }
    });
    Incoming { rx, local }
}

/// Why a handshake failed: the client's certificate (missing, from another CA, expired), or
/// anything else (a plaintext client, no common version or cipher).
fn handshake_refusal(e: &std::io::Error) -> (Refusal, &'static str) {
    let tls = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    match tls {
        Some(rustls::Error::NoCertificatesPresented) => {
            (Refusal::ClientCertificate, "no client certificate")
        }
        Some(rustls::Error::InvalidCertificate(_)) => (
            Refusal::ClientCertificate,
            "client certificate not accepted",
        ),
        _ => (Refusal::TlsHandshake, "TLS handshake failed"),
    }
}

/// Turns `console_tls` (or the flags) into the paths of [`TlsFiles`].
pub fn paths(cert: PathBuf, key: PathBuf, client_ca: Option<PathBuf>) -> ConsoleTlsPaths {
    ConsoleTlsPaths {
        cert_file: cert,
        key_file: key,
        client_ca_file: client_ca,
    }
}
