//! One `Metrics` struct on its own registry, passed around as `Arc<Metrics>` so tests can read
//! exact values. Labels come from closed sets (database names from the state directory, the
//! `ErrorKind` names, fixed directions); never an address, CN or user.
//!
//! Per-database handles are resolved once per snapshot ([`DbMetrics`]) so the data path does no
//! label hashing or allocation per connection or per byte.

use std::collections::BTreeSet;
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::allowlist::AdmittedBy;
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

impl EncodeLabelValue for AdmittedBy {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AdmittedLabels {
    pub database: String,
    pub admitted_by: AdmittedBy,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
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

/// What started a reload: the `kind` label of `pgmtls_reloads_total`.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum ReloadKind {
    /// The first load, when the process starts.
    startup,
    /// A change seen by the directory watch.
    watch,
    /// SIGHUP.
    sighup,
    /// The periodic content-hash poll found a change the watch missed.
    poll,
}

impl ReloadKind {
    pub const ALL: &'static [ReloadKind] = &[
        ReloadKind::startup,
        ReloadKind::watch,
        ReloadKind::sighup,
        ReloadKind::poll,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ReloadKind::startup => "startup",
            ReloadKind::watch => "watch",
            ReloadKind::sighup => "sighup",
            ReloadKind::poll => "poll",
        }
    }
}

impl std::fmt::Display for ReloadKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum ReloadResult {
    ok,
    error,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    pub kind: ReloadKind,
    pub result: ReloadResult,
}

/// One client certificate of one database. Bounded by the certificates in the state
/// directory; series of certificates that disappear are removed.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct CertLabels {
    pub database: String,
    pub certificate: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: String,
}

/// What one served database looks like after a successful load, for the gauges that describe
/// configuration rather than traffic. Times are Unix seconds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DatabaseFigures {
    pub name: String,
    pub ip_rules: usize,
    pub trusted_ips: usize,
    pub crl_entries: usize,
    pub server_cert_expiry: Option<i64>,
    pub ca_cert_expiry: Option<i64>,
    /// (certificate id, expiry) of client certificates still in service.
    pub client_certs: Vec<(String, i64)>,
}

pub struct Metrics {
    pub registry: Registry,
    pub accepted: Family<DbLabel, Counter>,
    /// Relayed sessions by the list that admitted them.
    pub admitted: Family<AdmittedLabels, Counter>,
    pub refused: Family<RefusedLabels, Counter>,
    /// Refusals on the shared listener before the SNI named a database.
    pub shared_refused: Family<ReasonLabel, Counter>,
    pub sessions_active: Family<DbLabel, Gauge>,
    pub bytes: Family<BytesLabels, Counter>,
    pub cancels: Family<CancelLabels, Counter>,
    pub tls_handshake_seconds: Histogram,
    pub upstream_connect_seconds: Family<DbLabel, Histogram>,
    pub session_seconds: Family<DbLabel, Histogram>,
    pub reloads: Family<ReloadLabels, Counter>,
    pub config_generation: Gauge,
    pub config_last_reload_successful: Gauge,
    pub config_last_reload_success_seconds: Gauge,
    /// The etcd revision the served state was read at (0 with a state directory).
    pub state_revision: Gauge,
    /// Seconds since etcd was last reachable, 0 while following it.
    pub state_stale_seconds: Gauge,
    pub ip_rules: Family<DbLabel, Gauge>,
    pub trusted_ips: Family<DbLabel, Gauge>,
    pub crl_entries: Family<DbLabel, Gauge>,
    /// 1 while the last reload rejected the database's change (it serves its previous one).
    pub change_rejected: Family<DbLabel, Gauge>,
    pub client_cert_expiry: Family<CertLabels, Gauge>,
    pub server_cert_expiry: Family<DbLabel, Gauge>,
    pub ca_cert_expiry: Family<DbLabel, Gauge>,
    pub build_info: Family<BuildLabels, Gauge>,
    /// The renewal record's times: one unlabelled series each while a record is known, none
    /// otherwise (so "absent" and "old" are both visible to an alert).
    pub renewal_last_run: Family<Vec<(String, String)>, Gauge>,
    pub renewal_last_success: Family<Vec<(String, String)>, Gauge>,
    /// Databases and certificates that have series, so the ones that disappear can be removed.
    known: Mutex<Known>,
}

#[derive(Default)]
struct Known {
    databases: BTreeSet<String>,
    certs: BTreeSet<CertLabels>,
    /// Databases whose change the last reload rejected.
    rejected: BTreeSet<String>,
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
        let admitted = Family::<AdmittedLabels, Counter>::default();
        let refused = Family::<RefusedLabels, Counter>::default();
        let shared_refused = Family::<ReasonLabel, Counter>::default();
        for &reason in ErrorKind::ALL {
            let _ = shared_refused.get_or_create(&ReasonLabel { reason });
        }
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
            "connections_admitted",
            "Connections relayed to the upstream, by the list that admitted the address (an IP rule, with a client certificate, or only a trusted range)",
            admitted.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections refused or cut, by reason",
            refused.clone(),
        );
        registry.register(
            "shared_listener_refused",
            "Connections the shared listener closed before their SNI picked a database, by reason",
            shared_refused.clone(),
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
        let reloads = Family::<ReloadLabels, Counter>::default();
        let config_generation = Gauge::default();
        let config_last_reload_successful = Gauge::default();
        let config_last_reload_success_seconds = Gauge::default();
        let state_revision = Gauge::default();
        let state_stale_seconds = Gauge::default();
        let ip_rules = Family::<DbLabel, Gauge>::default();
        let trusted_ips = Family::<DbLabel, Gauge>::default();
        let crl_entries = Family::<DbLabel, Gauge>::default();
        let change_rejected = Family::<DbLabel, Gauge>::default();
        let client_cert_expiry = Family::<CertLabels, Gauge>::default();
        let server_cert_expiry = Family::<DbLabel, Gauge>::default();
        let ca_cert_expiry = Family::<DbLabel, Gauge>::default();
        let build_info = Family::<BuildLabels, Gauge>::default();
        let renewal_last_run = Family::<Vec<(String, String)>, Gauge>::default();
        let renewal_last_success = Family::<Vec<(String, String)>, Gauge>::default();
        registry.register(
            "renewal_last_run_timestamp_seconds",
            "When `pgmtls certificates renew` last ran over every database (Unix time), from renewal.yaml",
            renewal_last_run.clone(),
        );
        registry.register(
            "renewal_last_success_timestamp_seconds",
            "When `pgmtls certificates renew` last ran without an error (Unix time), from renewal.yaml",
            renewal_last_success.clone(),
        );
        registry.register(
            "reloads",
            "Configuration reloads, by what started them and whether they were applied",
            reloads.clone(),
        );
        registry.register(
            "config_generation",
            "Generation of the configuration being served; goes up by one per applied change",
            config_generation.clone(),
        );
        registry.register(
            "config_last_reload_successful",
            "1 if the last reload was applied, 0 if it was rejected",
            config_last_reload_successful.clone(),
        );
        registry.register(
            "config_last_reload_success_timestamp_seconds",
            "When the configuration was last loaded successfully (Unix time)",
            config_last_reload_success_seconds.clone(),
        );
        registry.register(
            "state_revision",
            "The etcd revision the served state was read at (0 with a state directory)",
            state_revision.clone(),
        );
        registry.register(
            "state_stale_seconds",
            "Seconds since etcd was last reachable; 0 while the state follows it",
            state_stale_seconds.clone(),
        );
        registry.register(
            "ip_rules",
            "IP rules in force per database",
            ip_rules.clone(),
        );
        registry.register(
            "trusted_ips",
            "Trusted IP ranges in force per database",
            trusted_ips.clone(),
        );
        registry.register(
            "crl_entries",
            "Revoked certificates listed in the database's CRL",
            crl_entries.clone(),
        );
        registry.register(
            "database_change_rejected",
            "1 while the last reload rejected the database's change; it serves its previous configuration",
            change_rejected.clone(),
        );
        registry.register(
            "client_certificate_expiry_timestamp_seconds",
            "Expiry of each client certificate in service (not revoked, not renewed), Unix time",
            client_cert_expiry.clone(),
        );
        registry.register(
            "server_certificate_expiry_timestamp_seconds",
            "Expiry of the certificate the proxy presents, Unix time",
            server_cert_expiry.clone(),
        );
        registry.register(
            "ca_certificate_expiry_timestamp_seconds",
            "Expiry of the database's client CA certificate, Unix time",
            ca_cert_expiry.clone(),
        );
        registry.register(
            "build_info",
            "Always 1; the version label says which build is running",
            build_info.clone(),
        );
        registry.register_collector(Box::new(crate::process_metrics::ProcessCollector));
        registry.register_collector(Box::new(crate::logging::LogCollector));
        registry.register_collector(Box::new(crate::refusal_log::RefusalLogCollector));
        registry.register_collector(Box::new(crate::admin::AdminCollector));
        for &kind in ReloadKind::ALL {
            for result in [ReloadResult::ok, ReloadResult::error] {
                let _ = reloads.get_or_create(&ReloadLabels { kind, result });
            }
        }
        build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION").to_owned(),
            })
            .set(1);
        Metrics {
            registry,
            accepted,
            admitted,
            refused,
            shared_refused,
            sessions_active,
            bytes,
            cancels,
            tls_handshake_seconds,
            upstream_connect_seconds,
            session_seconds,
            reloads,
            config_generation,
            config_last_reload_successful,
            config_last_reload_success_seconds,
            state_revision,
            state_stale_seconds,
            ip_rules,
            trusted_ips,
            crl_entries,
            change_rejected,
            client_cert_expiry,
            server_cert_expiry,
            ca_cert_expiry,
            build_info,
            renewal_last_run,
            renewal_last_success,
            known: Mutex::new(Known::default()),
        }
    }

    /// Sets the renewal gauges from the record, or removes them when it is unknown.
    pub fn set_renewal(&self, record: Option<&crate::state::RenewalRecord>) {
        self.renewal_last_run.clear();
        self.renewal_last_success.clear();
        if let Some(r) = record {
            self.renewal_last_run
                .get_or_create(&Vec::new())
                .set(r.last_run_at.unix_timestamp());
            if let Some(t) = r.last_success_at {
                self.renewal_last_success
                    .get_or_create(&Vec::new())
                    .set(t.unix_timestamp());
            }
        }
    }

    /// Counts one reload attempt and keeps the last-reload gauges current.
    pub fn record_reload(&self, kind: ReloadKind, ok: bool, now_unix: i64) {
        let result = if ok {
            ReloadResult::ok
        } else {
            ReloadResult::error
        };
        self.reloads
            .get_or_create(&ReloadLabels { kind, result })
            .inc();
        self.config_last_reload_successful.set(i64::from(ok));
        if ok {
            self.config_last_reload_success_seconds.set(now_unix);
        }
    }

    /// Remembers which databases' changes the last reload rejected, for
    /// `pgmtls_database_change_rejected` at the next [`Metrics::publish_config`].
    pub fn set_rejected(&self, databases: BTreeSet<String>) {
        self.known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .rejected = databases;
    }

    /// Sets the configuration gauges from the snapshot being served and removes every series
    /// of a database or certificate it no longer has, so label sets stay bounded by what the
    /// state directory holds.
    pub fn publish_config(&self, generation: u64, databases: &[DatabaseFigures]) {
        self.config_generation
            .set(i64::try_from(generation).unwrap_or(i64::MAX));
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        let mut certs = BTreeSet::new();
        for d in databases {
            let db = DbLabel {
                database: d.name.clone(),
            };
            let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
            self.ip_rules.get_or_create(&db).set(count(d.ip_rules));
            self.trusted_ips
                .get_or_create(&db)
                .set(count(d.trusted_ips));
            self.crl_entries
                .get_or_create(&db)
                .set(count(d.crl_entries));
            self.change_rejected
                .get_or_create(&db)
                .set(i64::from(known.rejected.contains(&d.name)));
            for (family, value) in [
                (&self.server_cert_expiry, d.server_cert_expiry),
                (&self.ca_cert_expiry, d.ca_cert_expiry),
            ] {
                match value {
                    Some(t) => {
                        family.get_or_create(&db).set(t);
                    }
                    None => {
                        family.remove(&db);
                    }
                }
            }
            for (id, expiry) in &d.client_certs {
                let labels = CertLabels {
                    database: d.name.clone(),
                    certificate: id.clone(),
                };
                self.client_cert_expiry.get_or_create(&labels).set(*expiry);
                certs.insert(labels);
            }
        }
        for gone in known.certs.difference(&certs) {
            self.client_cert_expiry.remove(gone);
        }
        known.certs = certs;
        let served: BTreeSet<String> = databases.iter().map(|d| d.name.clone()).collect();
        // `for_database` also runs for snapshots that were rejected, so a database that was
        // never served can have series too; this removes those as well.
        for gone in known.databases.difference(&served) {
            self.forget_database(gone);
        }
        known.databases = served;
    }

    fn forget_database(&self, database: &str) {
        let db = DbLabel {
            database: database.to_owned(),
        };
        self.accepted.remove(&db);
        self.sessions_active.remove(&db);
        self.upstream_connect_seconds.remove(&db);
        self.session_seconds.remove(&db);
        self.ip_rules.remove(&db);
        self.trusted_ips.remove(&db);
        for &admitted_by in AdmittedBy::ALL {
            self.admitted.remove(&AdmittedLabels {
                database: database.to_owned(),
                admitted_by,
            });
        }
        self.crl_entries.remove(&db);
        self.change_rejected.remove(&db);
        self.server_cert_expiry.remove(&db);
        self.ca_cert_expiry.remove(&db);
        for &reason in ErrorKind::ALL {
            self.refused.remove(&RefusedLabels {
                database: database.to_owned(),
                reason,
            });
        }
        for direction in [Direction::to_upstream, Direction::to_client] {
            self.bytes.remove(&BytesLabels {
                database: database.to_owned(),
                direction,
            });
        }
        for result in [CancelResult::forwarded, CancelResult::refused] {
            self.cancels.remove(&CancelLabels {
                database: database.to_owned(),
                result,
            });
        }
    }

    /// Counts a refusal on the shared listener that no database can be charged with.
    pub fn refuse_shared(&self, kind: ErrorKind) {
        self.shared_refused
            .get_or_create(&ReasonLabel { reason: kind })
            .inc();
    }

    /// Resolves (and pre-creates at zero) every series of one database.
    pub fn for_database(&self, database: &str) -> DbMetrics {
        self.known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .databases
            .insert(database.to_owned());
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
        let admitted = |admitted_by| {
            self.admitted
                .get_or_create(&AdmittedLabels {
                    database: database.to_owned(),
                    admitted_by,
                })
                .clone()
        };
        DbMetrics {
            accepted: self.accepted.get_or_create(&db).clone(),
            admitted_mtls_rule: admitted(AdmittedBy::MtlsRule),
            admitted_trusted_ip: admitted(AdmittedBy::TrustedIp),
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
    admitted_mtls_rule: Counter,
    admitted_trusted_ip: Counter,
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
    /// The `pgmtls_connections_admitted_total` series of `by`.
    pub fn admitted(&self, by: AdmittedBy) -> &Counter {
        match by {
            AdmittedBy::MtlsRule => &self.admitted_mtls_rule,
            AdmittedBy::TrustedIp => &self.admitted_trusted_ip,
        }
    }

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

#[cfg(test)]
mod config_gauge_tests {
    use super::*;

    fn figures(name: &str, certs: &[(&str, i64)]) -> DatabaseFigures {
        DatabaseFigures {
            name: name.into(),
            ip_rules: 2,
            trusted_ips: 0,
            crl_entries: 1,
            server_cert_expiry: Some(2_000_000_000),
            ca_cert_expiry: None,
            client_certs: certs.iter().map(|(i, t)| (i.to_string(), *t)).collect(),
        }
    }

    #[test]
    fn configuration_gauges_follow_the_snapshot_and_forget_what_disappears() {
        let m = Metrics::new();
        let _ = m.for_database("orders");
        let _ = m.for_database("billing");
        m.publish_config(
            4,
            &[
                figures("orders", &[("c1", 1_900_000_000), ("c2", 1_950_000_000)]),
                figures("billing", &[]),
            ],
        );
        m.record_reload(ReloadKind::watch, false, 0);
        let text = m.encode();
        for line in [
            "pgmtls_config_generation 4",
            "pgmtls_ip_rules{database=\"orders\"} 2",
            "pgmtls_crl_entries{database=\"orders\"} 1",
            "pgmtls_client_certificate_expiry_timestamp_seconds{database=\"orders\",certificate=\"c2\"} 1950000000",
            "pgmtls_server_certificate_expiry_timestamp_seconds{database=\"billing\"} 2000000000",
            "pgmtls_reloads_total{kind=\"watch\",result=\"error\"} 1",
            "pgmtls_reloads_total{kind=\"poll\",result=\"ok\"} 0",
            "pgmtls_config_last_reload_successful 0",
            "pgmtls_build_info{version=\"",
        ] {
            assert!(text.contains(line), "missing {line:?}");
        }
        assert!(!text.contains("pgmtls_ca_certificate_expiry_timestamp_seconds{"));

        m.publish_config(5, &[figures("orders", &[("c2", 1_950_000_000)])]);
        let text = m.encode();
        assert!(!text.contains("certificate=\"c1\""), "{text}");
        assert!(!text.contains("database=\"billing\""), "{text}");
        assert!(text.contains("certificate=\"c2\""));
        assert!(text.contains(
            "pgmtls_connections_refused_total{database=\"orders\",reason=\"revoked_live\"} 0"
        ));
    }
}
