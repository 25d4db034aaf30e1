//! Why a connection ended, classified twice: a closed set of kinds (the metric label and the
//! log's `error_kind`) and, where the client may hear it, a fixed notice (SQLSTATE + text).

use std::fmt;

use crate::wire::WireError;

/// Every reason a connection is refused or cut. The `as_str` names are the `reason` label of
/// `pgmtls_connections_refused_total` and must stay stable (docs/METRICS.md lists them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    ProxyProtocolInvalid,
    IpNotAllowed,
    TooManyConnections,
    TooManyHandshakes,
    TooManyFromSource,
    DatabaseDisabled,
    HandshakeTimeout,
    TlsRequired,
    EarlyData,
    ProtocolViolation,
    AlpnRequired,
    SniMissing,
    SniUnknown,
    ClientCertMissing,
    ClientCertUntrusted,
    ClientCertExpired,
    ClientCertRevoked,
    TlsHandshake,
    StartupInvalid,
    IdentityDenied,
    UpstreamUnavailable,
    UpstreamTls,
    UpstreamRejected,
    ChannelBinding,
    UnauthenticatedMessage,
    AuthTimeout,
    CancelUnknownKey,
    CancelRateLimited,
    CancelPeerUnavailable,
    RevokedLive,
    Shutdown,
    ClientIo,
    UpstreamIo,
    ClientCertNotYetValid,
    TooManyForDatabase,
    TooManyFromIp,
    HandshakeThrottled,
}

impl ErrorKind {
    pub const ALL: &'static [ErrorKind] = &[
        ErrorKind::ProxyProtocolInvalid,
        ErrorKind::IpNotAllowed,
        ErrorKind::TooManyConnections,
        ErrorKind::TooManyHandshakes,
        ErrorKind::TooManyFromSource,
        ErrorKind::DatabaseDisabled,
        ErrorKind::HandshakeTimeout,
        ErrorKind::TlsRequired,
        ErrorKind::EarlyData,
        ErrorKind::ProtocolViolation,
        ErrorKind::AlpnRequired,
        ErrorKind::SniMissing,
        ErrorKind::SniUnknown,
        ErrorKind::ClientCertMissing,
        ErrorKind::ClientCertUntrusted,
        ErrorKind::ClientCertExpired,
        ErrorKind::ClientCertRevoked,
        ErrorKind::TlsHandshake,
        ErrorKind::StartupInvalid,
        ErrorKind::IdentityDenied,
        ErrorKind::UpstreamUnavailable,
        ErrorKind::UpstreamTls,
        ErrorKind::UpstreamRejected,
        ErrorKind::ChannelBinding,
        ErrorKind::UnauthenticatedMessage,
        ErrorKind::AuthTimeout,
        ErrorKind::CancelUnknownKey,
        ErrorKind::CancelRateLimited,
        ErrorKind::CancelPeerUnavailable,
        ErrorKind::RevokedLive,
        ErrorKind::Shutdown,
        ErrorKind::ClientIo,
        ErrorKind::UpstreamIo,
        ErrorKind::ClientCertNotYetValid,
        ErrorKind::TooManyForDatabase,
        ErrorKind::TooManyFromIp,
        ErrorKind::HandshakeThrottled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::ProxyProtocolInvalid => "proxy_protocol_invalid",
            ErrorKind::IpNotAllowed => "ip_not_allowed",
            ErrorKind::TooManyConnections => "too_many_connections",
            ErrorKind::TooManyHandshakes => "too_many_handshakes",
            ErrorKind::TooManyFromSource => "too_many_from_source",
            ErrorKind::DatabaseDisabled => "database_disabled",
            ErrorKind::HandshakeTimeout => "handshake_timeout",
            ErrorKind::TlsRequired => "tls_required",
            ErrorKind::EarlyData => "early_data",
            ErrorKind::ProtocolViolation => "protocol_violation",
            ErrorKind::AlpnRequired => "alpn_required",
            ErrorKind::SniMissing => "sni_missing",
            ErrorKind::SniUnknown => "sni_unknown",
            ErrorKind::ClientCertMissing => "client_cert_missing",
            ErrorKind::ClientCertUntrusted => "client_cert_untrusted",
            ErrorKind::ClientCertExpired => "client_cert_expired",
            ErrorKind::ClientCertRevoked => "client_cert_revoked",
            ErrorKind::TlsHandshake => "tls_handshake",
            ErrorKind::StartupInvalid => "startup_invalid",
            ErrorKind::IdentityDenied => "identity_denied",
            ErrorKind::UpstreamUnavailable => "upstream_unavailable",
            ErrorKind::UpstreamTls => "upstream_tls",
            ErrorKind::UpstreamRejected => "upstream_rejected",
            ErrorKind::ChannelBinding => "channel_binding",
            ErrorKind::UnauthenticatedMessage => "unauthenticated_message",
            ErrorKind::AuthTimeout => "auth_timeout",
            ErrorKind::CancelUnknownKey => "cancel_unknown_key",
            ErrorKind::CancelRateLimited => "cancel_rate_limited",
            ErrorKind::CancelPeerUnavailable => "cancel_peer_unavailable",
            ErrorKind::RevokedLive => "revoked_live",
            ErrorKind::Shutdown => "shutdown",
            ErrorKind::ClientIo => "client_io",
            ErrorKind::UpstreamIo => "upstream_io",
            ErrorKind::ClientCertNotYetValid => "client_cert_not_yet_valid",
            ErrorKind::TooManyForDatabase => "too_many_for_database",
            ErrorKind::TooManyFromIp => "too_many_from_ip",
            ErrorKind::HandshakeThrottled => "handshake_throttled",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Fixed texts a client may be sent. Never interpolate addresses, paths or peer strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientNotice {
    pub sqlstate: &'static str,
    pub message: &'static str,
    pub hint: Option<&'static str>,
}

pub const NOTICE_TLS_REQUIRED: ClientNotice = ClientNotice {
    sqlstate: "28000",
    message: "pgmtls: connection refused: TLS with a client certificate is required",
    hint: Some(
        "connect with sslmode=verify-ca and sslcert, sslkey and sslrootcert set to the files \
         from 'pgmtls certificates download'",
    ),
};

/// The one answer every refusal before TLS gets (src/conn/refuse.rs), whatever its reason:
/// SQLSTATE 08004, "server rejected the connection", and no word on why.
pub const NOTICE_REFUSED: ClientNotice = ClientNotice {
    sqlstate: "08004",
    message: "pgmtls: connection refused",
    hint: None,
};

pub const NOTICE_IDENTITY_DENIED: ClientNotice = ClientNotice {
    sqlstate: "28000",
    message: "pgmtls: this client certificate may not log in as that user",
    hint: Some(
        "this database requires the user name to equal the client certificate's common name",
    ),
};

pub const NOTICE_UPSTREAM_UNAVAILABLE: ClientNotice = ClientNotice {
    sqlstate: "08006",
    message: "pgmtls: the database server is not reachable right now",
    hint: None,
};

pub const NOTICE_STARTUP_INVALID: ClientNotice = ClientNotice {
    sqlstate: "08P01",
    message: "pgmtls: invalid startup packet",
    hint: None,
};

pub const NOTICE_CHANNEL_BINDING: ClientNotice = ClientNotice {
    sqlstate: "28000",
    message: "pgmtls: SCRAM channel binding cannot succeed through a TLS-terminating proxy",
    hint: Some(
        "connect with channel_binding=disable (the client certificate already authenticates \
         this connection), or point pgmtls at a plaintext loopback upstream",
    ),
};

pub const NOTICE_UNAUTHENTICATED_MESSAGE: ClientNotice = ClientNotice {
    sqlstate: "08P01",
    message: "pgmtls: only authentication messages may be sent before authentication completes",
    hint: None,
};

pub const NOTICE_AUTH_TIMEOUT: ClientNotice = ClientNotice {
    sqlstate: "08006",
    message: "pgmtls: authentication did not complete in time",
    hint: None,
};

pub const NOTICE_TOO_MANY_CONNECTIONS: ClientNotice = ClientNotice {
    sqlstate: "53300",
    message: "pgmtls: too many sessions are open",
    hint: None,
};

pub const NOTICE_TOO_MANY_FOR_DATABASE: ClientNotice = ClientNotice {
    sqlstate: "53300",
    message: "pgmtls: too many sessions are open to this database",
    hint: Some("close a session, or raise the database's max_connections"),
};

pub const NOTICE_TOO_MANY_FROM_IP: ClientNotice = ClientNotice {
    sqlstate: "53300",
    message: "pgmtls: too many sessions are open to this database from this address",
    hint: Some("close a session, or raise the database's max_connections_per_ip"),
};

pub const NOTICE_SHUTDOWN: ClientNotice = ClientNotice {
    sqlstate: "57P01",
    message: "pgmtls: the proxy is shutting down",
    hint: None,
};

pub const NOTICE_REVOKED: ClientNotice = ClientNotice {
    sqlstate: "57P01",
    message: "pgmtls: this session is no longer authorized",
    hint: None,
};

/// A connection-ending error with its classification and the detail for the log.
#[derive(Debug, thiserror::Error)]
#[error("{kind}: {detail}")]
pub struct ConnError {
    pub kind: ErrorKind,
    pub detail: String,
}

impl ConnError {
    pub fn new(kind: ErrorKind, detail: impl Into<String>) -> Self {
        ConnError {
            kind,
            detail: detail.into(),
        }
    }

    /// What a TLS client is told, if anything. Before TLS only `tls_required` says something
    /// specific; every other refusal there gets [`NOTICE_REFUSED`] (src/conn/refuse.rs).
    /// TLS-level refusals are alerts sent by rustls itself.
    pub fn client_notice(&self) -> Option<ClientNotice> {
        match self.kind {
            ErrorKind::TlsRequired => Some(NOTICE_TLS_REQUIRED),
            ErrorKind::UpstreamUnavailable | ErrorKind::UpstreamTls => {
                Some(NOTICE_UPSTREAM_UNAVAILABLE)
            }
            ErrorKind::StartupInvalid => Some(NOTICE_STARTUP_INVALID),
            ErrorKind::ChannelBinding => Some(NOTICE_CHANNEL_BINDING),
            ErrorKind::IdentityDenied => Some(NOTICE_IDENTITY_DENIED),
            ErrorKind::UnauthenticatedMessage => Some(NOTICE_UNAUTHENTICATED_MESSAGE),
            ErrorKind::AuthTimeout => Some(NOTICE_AUTH_TIMEOUT),
            // Reached only before the relay: a session cut mid-stream is sent nothing.
            ErrorKind::RevokedLive => Some(NOTICE_REVOKED),
            ErrorKind::Shutdown => Some(NOTICE_SHUTDOWN),
            // Only after TLS: before it, over-limit sockets get the generic refusal.
            ErrorKind::TooManyConnections => Some(NOTICE_TOO_MANY_CONNECTIONS),
            ErrorKind::TooManyForDatabase => Some(NOTICE_TOO_MANY_FOR_DATABASE),
            ErrorKind::TooManyFromIp => Some(NOTICE_TOO_MANY_FROM_IP),
            _ => None,
        }
    }
}

impl From<WireError> for ConnError {
    fn from(e: WireError) -> Self {
        ConnError::new(ErrorKind::ProtocolViolation, e.to_string())
    }
}

/// Classifies a failed TLS accept. tokio-rustls wraps the `rustls::Error` in an `io::Error`.
pub fn classify_tls_error(e: &std::io::Error) -> ErrorKind {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(e) => classify_rustls_error(e),
        None => ErrorKind::ClientIo,
    }
}

/// The reason a rustls error gives: what the handshake logs, and what `pgmtls doctor` says of
/// the client verifier's verdict on a certificate.
pub fn classify_rustls_error(e: &rustls::Error) -> ErrorKind {
    use rustls::{CertificateError, Error};
    match e {
        Error::NoCertificatesPresented => ErrorKind::ClientCertMissing,
        Error::InvalidCertificate(c) => match c {
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                ErrorKind::ClientCertExpired
            }
            // Its own reason: a clock or issuance problem, not an old certificate to renew.
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                ErrorKind::ClientCertNotYetValid
            }
            CertificateError::Revoked => ErrorKind::ClientCertRevoked,
            _ => ErrorKind::ClientCertUntrusted,
        },
        _ => ErrorKind::TlsHandshake,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_names_are_unique_snake_case() {
        let mut seen = std::collections::HashSet::new();
        for k in ErrorKind::ALL {
            let s = k.as_str();
            assert!(
                s.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{s}"
            );
            assert!(seen.insert(s), "{s} twice");
        }
    }

    #[test]
    fn tls_errors_map_to_their_reasons() {
        use rustls::{CertificateError, Error};
        let wrap = |e: Error| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
        assert_eq!(
            classify_tls_error(&wrap(Error::NoCertificatesPresented)),
            ErrorKind::ClientCertMissing
        );
        assert_eq!(
            classify_tls_error(&wrap(Error::InvalidCertificate(CertificateError::Expired))),
            ErrorKind::ClientCertExpired
        );
        assert_eq!(
            classify_tls_error(&wrap(Error::InvalidCertificate(CertificateError::Revoked))),
            ErrorKind::ClientCertRevoked
        );
        assert_eq!(
            classify_tls_error(&wrap(Error::InvalidCertificate(
                CertificateError::NotValidYet
            ))),
            ErrorKind::ClientCertNotYetValid
        );
        assert_eq!(
            classify_tls_error(&wrap(Error::InvalidCertificate(
                CertificateError::UnknownIssuer
            ))),
            ErrorKind::ClientCertUntrusted
        );
        assert_eq!(
            classify_tls_error(&std::io::Error::from(std::io::ErrorKind::ConnectionReset)),
            ErrorKind::ClientIo
        );
    }
}
