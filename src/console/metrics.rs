//! The console's own counters: every refusal by reason, and sessions started. The console is
//! a process of its own, so these are not in the proxy's `/metrics`; the console serves them
//! at its own `GET /metrics`, to loopback peers only (docs/METRICS.md).

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

/// Why the console refused a request or a connection.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Refusal {
    /// A login with a wrong or already used token.
    BadToken,
    /// A login attempt during the lockout after too many bad tokens.
    LoginLocked,
    /// A request without a live session (a POST; a GET is sent to the login page).
    NoSession,
    /// A POST without the session's CSRF value.
    CsrfMissing,
    /// A POST with another value.
    CsrfWrong,
    /// A `Host` that is not the console's own address.
    Host,
    /// A form larger than the console reads.
    FormTooLarge,
    /// `/metrics` asked from a peer that is not on loopback.
    MetricsNotLoopback,
    /// mTLS mode: no client certificate, or one the operator's CA did not sign.
    ClientCertificate,
    /// Any other failed TLS handshake (plaintext HTTP to the TLS port, a timeout).
    TlsHandshake,
}

impl Refusal {
    pub const ALL: [Refusal; 10] = [
        Refusal::BadToken,
        Refusal::LoginLocked,
        Refusal::NoSession,
        Refusal::CsrfMissing,
        Refusal::CsrfWrong,
        Refusal::Host,
        Refusal::FormTooLarge,
        Refusal::MetricsNotLoopback,
        Refusal::ClientCertificate,
        Refusal::TlsHandshake,
    ];

    /// The `reason` label, and the word in the log line.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::BadToken => "bad_token",
            Refusal::LoginLocked => "login_locked",
            Refusal::NoSession => "no_session",
            Refusal::CsrfMissing => "csrf_missing",
            Refusal::CsrfWrong => "csrf_wrong",
            Refusal::Host => "host",
            Refusal::FormTooLarge => "form_too_large",
            Refusal::MetricsNotLoopback => "metrics_not_loopback",
            Refusal::ClientCertificate => "client_certificate",
            Refusal::TlsHandshake => "tls_handshake",
        }
    }
}

impl EncodeLabelValue for Refusal {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: Refusal,
}

/// The console's registry.
#[derive(Debug)]
pub struct ConsoleMetrics {
    registry: Registry,
    refusals: Family<ReasonLabel, Counter>,
    sessions: Counter,
}

impl Default for ConsoleMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ConsoleMetrics {
    pub fn new() -> ConsoleMetrics {
        let mut registry = Registry::default();
        let refusals = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "pgmtls_console_refusals",
            "Requests and connections the console refused, by reason",
            refusals.clone(),
        );
        let sessions = Counter::default();
        registry.register(
            "pgmtls_console_sessions",
            "Console sessions started (a login or, in mTLS mode, a client certificate)",
            sessions.clone(),
        );
        // Every reason from the start at 0, so a rate() sees the first refusal.
        for reason in Refusal::ALL {
            let _ = refusals.get_or_create(&ReasonLabel { reason });
        }
        ConsoleMetrics {
            registry,
            refusals,
            sessions,
        }
    }

    pub fn refused(&self, reason: Refusal) {
        self.refusals.get_or_create(&ReasonLabel { reason }).inc();
    }

    pub fn session_started(&self) {
        self.sessions.inc();
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
