//! Client-side helpers: rustls client configs, tokio-postgres connections
//! (plain, TLS, over a pre-bound socket), a runner for the real `psql`, and
//! source-address-bound TCP connects for allowlist tests.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{aws_lc_rs, CryptoProvider};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, Error as TlsError, RootCertStore,
    SignatureScheme,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinHandle;
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{Client, Config, NoTls};
use tokio_postgres_rustls::MakeRustlsConnect;

// Re-exported so test files need not depend on tokio_postgres paths; a file
// that never names it would otherwise warn.
#[allow(unused_imports)]
pub use tokio_postgres::config::SslNegotiation;

use super::pg::{APP_DB, APP_PASSWORD, APP_USER};
use super::pki::{Role, TestPki};

/// ALPN protocol id PostgreSQL 17+ requires for direct TLS negotiation.
pub const ALPN_POSTGRESQL: &[u8] = b"postgresql";

/// Keeps a failing connect from hanging a test for libpq's default (forever).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The spawned tokio-postgres connection task; resolves when the connection
/// ends, with the error that ended it, if any.
pub type ConnTask = JoinHandle<Result<(), tokio_postgres::Error>>;

/// Explicit provider: the process-wide default would be ambiguous if another
/// crate in the graph ever enabled rustls' `ring` feature too.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(aws_lc_rs::default_provider())
}

/// All certificates in a PEM file.
pub fn load_certs(path: &Path) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .unwrap_or_else(|e| panic!("read certs from {}: {e}", path.display()))
}

/// The first private key in a PEM file.
pub fn load_key(path: &Path) -> PrivateKeyDer<'static> {
    PrivateKeyDer::from_pem_file(path)
        .unwrap_or_else(|e| panic!("read key from {}: {e}", path.display()))
}

/// A rustls client config that behaves like libpq's `sslmode=verify-ca`:
/// the server's chain must lead to the root in `root_ca_pem`, but its host
/// name is not checked. `client` is `(chain_pem, key_pem)` for mutual TLS.
/// With `alpn`, offers ALPN `postgresql` (tokio-postgres-rustls does not).
pub fn tls_client_config(
    root_ca_pem: &Path,
    client: Option<(&Path, &Path)>,
    alpn: bool,
) -> ClientConfig {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(root_ca_pem) {
        roots.add(cert).expect("add root CA");
    }
    let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .expect("build server verifier");
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(VerifyCa(webpki)));
    let mut cfg = match client {
        Some((chain, key)) => builder
            .with_client_auth_cert(load_certs(chain), load_key(key))
            .expect("client cert and key"),
        None => builder.with_no_client_auth(),
    };
    if alpn {
        cfg.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    }
    cfg
}

/// Full webpki verification minus the host-name check, i.e. `verify-ca`.
/// webpki checks the name only after the chain validated, so a name error
/// means "chain good, name different".
#[derive(Debug)]
struct VerifyCa(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for VerifyCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(TlsError::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// Base tokio-postgres config used by all connect helpers.
pub fn pg_config(host: &str, port: u16, user: &str, db: &str, password: Option<&str>) -> Config {
    let mut c = Config::new();
    c.host(host)
        .port(port)
        .user(user)
        .dbname(db)
        .application_name("pgmtls-tests")
        .connect_timeout(CONNECT_TIMEOUT);
    if let Some(pw) = password {
        c.password(pw);
    }
    c
}

/// Plaintext connection (`sslmode=disable`).
pub async fn pg_connect_plain(
    host: &str,
    port: u16,
    user: &str,
    db: &str,
    password: Option<&str>,
) -> Result<(Client, ConnTask), tokio_postgres::Error> {
    let mut c = pg_config(host, port, user, db, password);
    c.ssl_mode(SslMode::Disable);
    let (client, conn) = c.connect(NoTls).await?;
    Ok((client, tokio::spawn(conn)))
}

/// TLS connection (`sslmode=require` plus `tls`'s verification). Errors are
/// returned, not panicked on, so tests can assert rejections. The rustls
/// server name is `host`; [`tls_client_config`] ignores it for verification.
pub async fn pg_connect_tls(
    host: &str,
    port: u16,
    user: &str,
    db: &str,
    password: Option<&str>,
    tls: ClientConfig,
    negotiation: SslNegotiation,
) -> Result<(Client, ConnTask), tokio_postgres::Error> {
    let mut c = pg_config(host, port, user, db, password);
    c.ssl_mode(SslMode::Require).ssl_negotiation(negotiation);
    let (client, conn) = c.connect(MakeRustlsConnect::new(tls)).await?;
    Ok((client, tokio::spawn(conn)))
}

/// TLS connection over an already-connected stream, e.g. one from
/// [`connect_from`] bound to 127.0.0.2. `config` supplies user/db/password,
/// ssl mode/negotiation, and the host used as TLS server name.
pub async fn pg_connect_tls_over(
    stream: TcpStream,
    config: &Config,
    tls: ClientConfig,
) -> Result<(Client, ConnTask), tokio_postgres::Error> {
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        _ => "localhost".to_string(),
    };
    let connector = <MakeRustlsConnect as MakeTlsConnect<TcpStream>>::make_tls_connect(
        &mut MakeRustlsConnect::new(tls),
        &host,
    )
    .expect("valid TLS server name");
    let (client, conn) = config.connect_raw(stream, connector).await?;
    Ok((client, tokio::spawn(conn)))
}

/// The test application's session (`APP_USER` on `APP_DB`, password auth behind the proxy)
/// over `stream`, already connected to the proxy at `proxy`, e.g. from [`connect_from`]:
/// TLS that checks the proxy against `pki`'s CA and presents `cert`.
pub async fn app_session_over(
    stream: TcpStream,
    proxy: SocketAddr,
    pki: &TestPki,
    cert: &Role,
) -> Result<(Client, ConnTask), tokio_postgres::Error> {
    let mut cfg = pg_config(
        "127.0.0.1",
        proxy.port(),
        APP_USER,
        APP_DB,
        Some(APP_PASSWORD),
    );
    cfg.ssl_mode(SslMode::Require);
    let tls = tls_client_config(
        &pki.ca.cert_path,
        Some((&cert.chain_path, &cert.key_path)),
        false,
    );
    pg_connect_tls_over(stream, &cfg, tls).await
}

/// An error with all its sources, `: `-separated. tokio-postgres's Display
/// alone says only e.g. "error performing TLS handshake"; the reason (such as
/// rustls' `UnknownIssuer` or a TLS alert) is in the source chain.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![err.to_string()];
    let mut cur = err.source();
    while let Some(e) = cur {
        parts.push(e.to_string());
        cur = e.source();
    }
    parts.join(": ")
}

/// A free TCP port on 127.0.0.1: bind port 0, read it, close. Another process
/// can grab it before it is used again, so callers that bind later retry.
pub fn free_port() -> u16 {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr").port()
}

/// TCP connect from a chosen source IP. Linux routes all of 127.0.0.0/8 to
/// loopback, so 127.0.0.2, 127.0.0.3, … work as distinct clients without
/// any setup.
pub async fn connect_from(src: IpAddr, dst: SocketAddr) -> io::Result<TcpStream> {
    let socket = if dst.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.bind(SocketAddr::new(src, 0))?;
    socket.connect(dst).await
}

/// What a `psql` run printed and how it exited.
#[derive(Debug)]
pub struct PsqlOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl PsqlOutput {
    fn from_output(out: Output) -> PsqlOutput {
        PsqlOutput {
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// Trimmed stdout; panics with stderr if psql failed.
    pub fn expect_ok(&self) -> &str {
        assert!(
            self.success(),
            "psql failed ({}): {}",
            self.status,
            self.stderr
        );
        self.stdout.trim()
    }
}

/// Runs the real `psql` with a libpq conninfo string, in unaligned
/// tuples-only mode with `ON_ERROR_STOP`, never prompting for a password.
#[derive(Debug, Clone)]
pub struct Psql {
    program: PathBuf,
    params: Vec<(String, String)>,
    password: Option<String>,
}

impl Psql {
    /// `psql_path` is usually `PgServer::psql_path()`.
    pub fn new(
        psql_path: impl Into<PathBuf>,
        host: &str,
        port: u16,
        user: &str,
        dbname: &str,
    ) -> Psql {
        let psql = Psql {
            program: psql_path.into(),
            params: Vec::new(),
            password: None,
        };
        psql.param("host", host)
            .param("port", &port.to_string())
            .param("user", user)
            .param("dbname", dbname)
    }

    /// `sslmode=verify-ca` against `root_ca`, optionally presenting
    /// `(cert_pem, key_pem)` as client certificate.
    pub fn verify_ca(self, root_ca: &Path, client: Option<(&Path, &Path)>) -> Psql {
        let psql = self
            .param("sslmode", "verify-ca")
            .param("sslrootcert", &root_ca.display().to_string());
        match client {
            Some((cert, key)) => psql
                .param("sslcert", &cert.display().to_string())
                .param("sslkey", &key.display().to_string()),
            None => psql,
        }
    }

    /// Sets (or replaces) any conninfo keyword, e.g. `sslmode`.
    pub fn param(mut self, key: &str, value: &str) -> Psql {
        self.params.retain(|(k, _)| k != key);
        self.params.push((key.to_string(), value.to_string()));
        self
    }

    /// Passed as `PGPASSWORD`, so it never shows in the process list.
    pub fn password(mut self, password: &str) -> Psql {
        self.password = Some(password.to_string());
        self
    }

    /// The conninfo string; every value quoted so paths with spaces work.
    pub fn conninfo(&self) -> String {
        self.params
            .iter()
            .map(|(k, v)| format!("{k}='{}'", v.replace('\\', "\\\\").replace('\'', "\\'")))
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn command(&self, sql: &str) -> Command {
        let mut cmd = Command::new(&self.program);
        cmd.args(["-X", "-A", "-t", "-w", "-v", "ON_ERROR_STOP=1", "-d"])
            .arg(self.conninfo())
            .arg("-c")
            .arg(sql)
            .stdin(Stdio::null());
        for var in super::pg::libpq_env_vars() {
            cmd.env_remove(var);
        }
        cmd.env("PGCONNECT_TIMEOUT", CONNECT_TIMEOUT.as_secs().to_string());
        if let Some(pw) = &self.password {
            cmd.env("PGPASSWORD", pw);
        }
        cmd
    }

    /// Blocking run. Do not use it against a server running on the test's
    /// own tokio runtime (e.g. the proxy under test): blocking the runtime
    /// thread would stall that server. Use [`run_async`](Self::run_async).
    pub fn run(&self, sql: &str) -> PsqlOutput {
        let out = self
            .command(sql)
            .output()
            .unwrap_or_else(|e| panic!("run {}: {e}", self.program.display()));
        PsqlOutput::from_output(out)
    }

    /// Runs psql without blocking the tokio runtime.
    pub async fn run_async(&self, sql: &str) -> PsqlOutput {
        let out = tokio::process::Command::from(self.command(sql))
            .kill_on_drop(true)
            .output()
            .await
            .unwrap_or_else(|e| panic!("run {}: {e}", self.program.display()));
        PsqlOutput::from_output(out)
    }
}

/// The test application's session through `proxy` from source address `src`, presenting
/// `cert`.
pub async fn session_from(
    src: &str,
    pki: &TestPki,
    cert: &Role,
    proxy: &super::proxy::ProxyProcess,
) -> Result<(Client, ConnTask), tokio_postgres::Error> {
    let stream = connect_from(src.parse::<IpAddr>().expect("a source IP"), proxy.addr())
        .await
        .expect("connect to the proxy");
    app_session_over(stream, proxy.addr(), pki, cert).await
}
