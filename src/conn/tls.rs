//! TLS accept with a client certificate (required, or optional from a trusted range) ->
//! `ClientIdentity`.

use std::sync::Arc;
use std::time::Instant;

use time::OffsetDateTime;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::LazyConfigAcceptor;

use super::error::{classify_tls_error, ConnError, ErrorKind};
use crate::allowlist::AdmittedBy;
use crate::snapshot::DatabaseRuntime;
use crate::tls_store::{serial_hex, ALPN_POSTGRESQL};

/// Who is on the other end, as the verified certificate says. Read with x509-parser only after
/// rustls/webpki accepted the chain: these fields never decide trust.
#[derive(Debug, Clone, Default)]
pub struct ClientIdentity {
    pub common_name: Option<String>,
    pub serial: String,
    pub not_after: Option<OffsetDateTime>,
    /// The id the CLI gave this certificate, if the state directory knows it.
    pub cert_id: Option<String>,
    pub tls_version: &'static str,
    pub alpn: Option<&'static str>,
}

/// Reads the ClientHello, lets `choose` pick the database from its SNI (before any
/// cryptography: on the shared listener the name decides whose certificate, CA and rules
/// apply; on a database's own listener `choose` returns that database), then completes the
/// handshake under the chosen database's configuration: with a required client certificate
/// when an IP rule admits the address, with an optional one when only a trusted range does.
pub async fn accept(
    stream: TcpStream,
    choose: impl FnOnce(Option<&str>) -> Result<(Arc<DatabaseRuntime>, AdmittedBy), ConnError>,
    direct: bool,
) -> Result<
    (
        TlsStream<TcpStream>,
        ClientIdentity,
        Arc<DatabaseRuntime>,
        AdmittedBy,
    ),
    ConnError,
> {
    let started = Instant::now();
    let start = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream)
        .await
        .map_err(|e| ConnError::new(ErrorKind::TlsHandshake, e.to_string()))?;
    let (db, admitted_by) = choose(start.client_hello().server_name())?;
    if direct {
        // PostgreSQL 17 requires ALPN on direct TLS so that a TLS connection meant for another
        // protocol cannot be replayed against the database.
        let offers_pg = start
            .client_hello()
            .alpn()
            .is_some_and(|mut protos| protos.any(|p| p == ALPN_POSTGRESQL));
        if !offers_pg {
            return Err(ConnError::new(
                ErrorKind::AlpnRequired,
                "direct TLS without ALPN \"postgresql\"",
            ));
        }
    }
    let config = match admitted_by {
        AdmittedBy::MtlsRule => &db.tls.config,
        AdmittedBy::TrustedIp => &db.tls.cert_optional,
    };
    let tls = start
        .into_stream(Arc::clone(config))
        .await
        .map_err(|e| ConnError::new(classify_tls_error(&e), e.to_string()))?;
    db.metrics
        .tls_handshake_seconds
        .observe(started.elapsed().as_secs_f64());
    let identity = identify(&tls, &db);
    Ok((tls, identity, db, admitted_by))
}

fn identify(tls: &TlsStream<TcpStream>, db: &DatabaseRuntime) -> ClientIdentity {
    let conn = tls.get_ref().1;
    let tls_version = match conn.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
        _ => "unknown",
    };
    let alpn = conn
        .alpn_protocol()
        .filter(|p| *p == ALPN_POSTGRESQL)
        .map(|_| "postgresql");
    let mut id = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|leaf| leaf_identity(leaf, db))
        .unwrap_or_default();
    id.tls_version = tls_version;
    id.alpn = alpn;
    id
}

/// Who a client certificate names, as the log and the identity policy see it: common name,
/// serial, expiry, and the id of its record in `db`. Also `pgmtls doctor`'s reading.
pub fn leaf_identity(
    leaf: &rustls_pki_types::CertificateDer<'_>,
    db: &DatabaseRuntime,
) -> ClientIdentity {
    let mut id = ClientIdentity::default();
    if let Ok((_, cert)) = x509_parser::parse_x509_certificate(leaf.as_ref()) {
        id.common_name = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned);
        id.serial = serial_hex(cert.raw_serial());
        id.not_after = Some(cert.validity().not_after.to_datetime());
        id.cert_id = db.certificates.get(&id.serial).map(|r| r.id.clone());
    }
    id
}
