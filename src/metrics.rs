//! One `Metrics` struct on its own registry, passed around as `Arc<Metrics>` so tests can read
//! exact values. Labels come from closed sets (database names from the state directory, the
//! `ErrorKind` names, fixed directions); never an address, CN or user.
//!
//! Per-database handles are resolved once per snapshot ([`DbMetrics`]) so the data path does no
//! label hashing or allocation per connection or per byte.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::conn::error::ErrorKind;

impl EncodeLabelValue for ErrorKind {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DbLabel {
    pub database: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    pub database: String,
    pub reason: ErrorKind,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Direction {
    to_upstream,
    to_client,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    pub database: String,
    pub direction: Direction,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum CancelResult {
    forwarded,
    refused,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CancelLabels {
    pub database: String,
    pub result: CancelResult,
}

pub struct Metrics {
    pub registry: Registry,
    pub accepted: Family<DbLabel, Counter>,
    pub refused: Family<RefusedLabels, Counter>,
    pub sessions_active: Family<DbLabel, Gauge>,
    pub bytes: Family<BytesLabels, Counter>,
    pub cancels: Family<CancelLabels, Counter>,
    pub tls_handshake_seconds: Histogram,
    pub upstream_connect_seconds: Family<DbLabel, Histogram>,
    pub session_seconds: Family<DbLabel, Histogram>,
}

fn latency_histogram() -> Histogram {
    // 100 µs .. ~13 s
    Histogram::new(exponential_buckets(0.0001, 2.0, 18))
}

fn session_histogram() -> Histogram {
    // 10 ms .. ~11 h
    Histogram::new(exponential_buckets(0.01, 4.0, 12))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("pgmtls");
        let accepted = Family::<DbLabel, Counter>::default();
        let refused = Family::<RefusedLabels, Counter>::default();
        let sessions_active = Family::<DbLabel, Gauge>::default();
        let bytes = Family::<BytesLabels, Counter>::default();
        let cancels = Family::<CancelLabels, Counter>::default();
        let tls_handshake_seconds = latency_histogram();
        let upstream_connect_seconds =
            Family::<DbLabel, Histogram>::new_with_constructor(latency_histogram as fn() -> _);
        let session_seconds =
            Family::<DbLabel, Histogram>::new_with_constructor(session_histogram as fn() -> _);
        registry.register(
            "connections_accepted",
            "Connections that passed every check and were relayed to the upstream",
            accepted.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections refused or cut, by reason",
            refused.clone(),
        );
        registry.register(
            "sessions_active",
            "Sessions currently relaying",
            sessions_active.clone(),
        );
        registry.register(
            "relayed_bytes",
            "Bytes relayed, by direction",
            bytes.clone(),
        );
        registry.register(
            "cancel_requests",
            "CancelRequests forwarded to the upstream or refused",
            cancels.clone(),
        );
        registry.register(
            "tls_handshake_duration_seconds",
            "Client TLS handshake duration",
            tls_handshake_seconds.clone(),
        );
        registry.register(
            "upstream_connect_duration_seconds",
            "Upstream connect (TCP and TLS) duration",
            upstream_connect_seconds.clone(),
        );
        registry.register(
            "session_duration_seconds",
            "Duration of relayed sessions",
            session_seconds.clone(),
        );
        Metrics {
            registry,
            accepted,
            refused,
            sessions_active,
            bytes,
            cancels,
            tls_handshake_seconds,
            upstream_connect_seconds,
            session_seconds,
        }
    }

    /// Resolves (and pre-creates at zero) every series of one database.
    pub fn for_database(&self, database: &str) -> DbMetrics {
        let db = DbLabel {
            database: database.to_owned(),
        };
        let refused = ErrorKind::ALL
            .iter()
            .map(|&reason| {
                (
                    reason,
                    self.refused
                        .get_or_create(&RefusedLabels {
                            database: database.to_owned(),
                            reason,
                        })
                        .clone(),
                )
            })
            .collect();
        let bytes = |direction| {
            self.bytes
                .get_or_create(&BytesLabels {
                    database: database.to_owned(),
                    direction,
                })
                .clone()
        };
        let cancels = |result| {
            self.cancels
                .get_or_create(&CancelLabels {
                    database: database.to_owned(),
                    result,
                })
                .clone()
        };
        DbMetrics {
            accepted: self.accepted.get_or_create(&db).clone(),
            refused,
            sessions_active: self.sessions_active.get_or_create(&db).clone(),
            bytes_to_upstream: bytes(Direction::to_upstream),
            bytes_to_client: bytes(Direction::to_client),
            cancel_forwarded: cancels(CancelResult::forwarded),
            cancel_refused: cancels(CancelResult::refused),
            tls_handshake_seconds: self.tls_handshake_seconds.clone(),
            upstream_connect_seconds: self.upstream_connect_seconds.get_or_create(&db).clone(),
            session_seconds: self.session_seconds.get_or_create(&db).clone(),
        }
    }

    /// The Prometheus text exposition of everything registered.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Handles to one database's series.
#[derive(Clone, Debug)]
pub struct DbMetrics {
    pub accepted: Counter,
    refused: Vec<(ErrorKind, Counter)>,
    pub sessions_active: Gauge,
    pub bytes_to_upstream: Counter<u64, AtomicU64>,
    pub bytes_to_client: Counter<u64, AtomicU64>,
    pub cancel_forwarded: Counter,
    pub cancel_refused: Counter,
    pub tls_handshake_seconds: Histogram,
    pub upstream_connect_seconds: Histogram,
    pub session_seconds: Histogram,
}

impl DbMetrics {
    pub fn refuse(&self, kind: ErrorKind) {
        if let Some((_, c)) = self.refused.iter().find(|(k, _)| *k == kind) {
            c.inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_is_precreated_at_zero() {
        let m = Metrics::new();
        let db = m.for_database("orders");
        db.refuse(ErrorKind::IpNotAllowed);
        let text = m.encode();
        assert!(text.contains(
            "pgmtls_connections_refused_total{database=\"orders\",reason=\"ip_not_allowed\"} 1"
        ));
        for k in ErrorKind::ALL {
            assert!(
                text.contains(&format!("reason=\"{}\"", k.as_str())),
                "{k} missing"
            );
        }
        assert!(text
            .contains("pgmtls_relayed_bytes_total{database=\"orders\",direction=\"to_client\"} 0"));
    }
}
