//! The validated, immutable view of every served database that the data plane reads: one
//! `Arc<Snapshot>` per reload, loaded once per accepted connection.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::allowlist::{AllowRule, Allowlist};
use crate::config::ConfigErrors;
use crate::metrics::{DatabaseFigures, DbMetrics, Metrics};
use crate::state::{CertificateRecord, DatabaseSettings, DatabaseState, IpRule, UpstreamTls};
use crate::tls_store::{build_server_tls, build_upstream_tls, ServerTls, UpstreamVerify};

/// Where and how to dial the database behind the proxy.
#[derive(Clone)]
pub struct UpstreamTarget {
    pub addr: crate::state::UpstreamAddr,
    /// `None` for a plaintext upstream.
    pub tls: Option<(Arc<ClientConfig>, ServerName<'static>)>,
}

impl std::fmt::Debug for UpstreamTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTarget")
            .field("addr", &self.addr)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// One database, ready to serve.
#[derive(Debug)]
pub struct DatabaseRuntime {
    pub name: Arc<str>,
    pub settings: DatabaseSettings,
    pub rules: Vec<IpRule>,
    pub allowlist: Allowlist,
    pub tls: ServerTls,
    pub upstream: UpstreamTarget,
    /// Client certificate records by serial (lowercase hex), to name certificates in logs.
    pub certificates: HashMap<String, CertificateRecord>,
    pub metrics: DbMetrics,
    /// SHA-256 over every input file, to tell what a reload changed.
    pub content_hash: String,
    /// SHA-256 of each input on its own, to say in the reload log what changed.
    pub inputs: InputDigests,
}

/// Hex SHA-256 of each input of one database. `crl` and `upstream_ca` are empty when absent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InputDigests {
    pub settings: String,
    pub rules: String,
    pub server_cert: String,
    pub server_key: String,
    pub ca: String,
    pub crl: String,
    pub certificates: String,
    pub upstream_ca: String,
}

impl InputDigests {
    fn of(state: &DatabaseState, upstream_ca: Option<&[u8]>) -> Self {
        let digest = |bytes: &[u8]| hex::encode(Sha256::digest(bytes));
        let certificates: String = state.certificates.iter().map(|c| c.to_yaml()).collect();
        InputDigests {
            settings: digest(state.settings.to_yaml().as_bytes()),
            rules: digest(crate::state::ip_rules_to_yaml(&state.rules).as_bytes()),
            server_cert: digest(&state.server_cert_pem),
            server_key: digest(&state.server_key_pem),
            ca: digest(&state.ca_pem),
            crl: state.crl_pem.as_deref().map(digest).unwrap_or_default(),
            certificates: digest(certificates.as_bytes()),
            upstream_ca: upstream_ca.map(digest).unwrap_or_default(),
        }
    }

    fn combined(&self) -> String {
        let mut h = Sha256::new();
        for part in [
            &self.settings,
            &self.rules,
            &self.server_cert,
            &self.server_key,
            &self.ca,
            &self.crl,
            &self.certificates,
            &self.upstream_ca,
        ] {
            h.update(part.as_bytes());
            h.update(b"\n");
        }
        hex::encode(h.finalize())
    }
}

impl DatabaseRuntime {
    pub fn build(state: &DatabaseState, metrics: &Metrics) -> Result<Self, ConfigErrors> {
        let tls = build_server_tls(
            &state.paths,
            &state.server_cert_pem,
            &state.server_key_pem,
            &state.ca_pem,
            state.crl_pem.as_deref(),
        );
        let upstream = build_upstream(&state.dir, &state.settings);
        let (tls, upstream, inputs) = match (tls, upstream) {
            (Ok(t), Ok((u, upstream_ca))) => {
                let inputs = InputDigests::of(state, upstream_ca.as_deref());
                (t, u, inputs)
            }
            (t, u) => {
                let mut errors = ConfigErrors::default();
                if let Err(e) = t {
                    errors.extend(e);
                }
                if let Err(e) = u {
                    errors.extend(e);
                }
                return Err(errors);
            }
        };
        let allowlist = Allowlist::new(
            state
                .rules
                .iter()
                .map(|r| AllowRule {
                    id: r.id.as_str().into(),
                    cidr: r.cidr,
                })
                .collect(),
        );
        Ok(DatabaseRuntime {
            name: state.name.as_str().into(),
            settings: state.settings.clone(),
            rules: state.rules.clone(),
            allowlist,
            tls,
            upstream,
            certificates: state
                .certificates
                .iter()
                .map(|c| (c.serial.clone(), c.clone()))
                .collect(),
            metrics: metrics.for_database(&state.name),
            content_hash: inputs.combined(),
            inputs,
        })
    }

    /// The configuration gauges of this database.
    pub fn figures(&self) -> DatabaseFigures {
        let unix = |t: OffsetDateTime| t.unix_timestamp();
        let mut client_certs: Vec<(String, i64)> = self
            .certificates
            .values()
            .filter(|c| {
                c.revoked_at.is_none() && c.successor.is_none() && !self.is_revoked(&c.serial)
            })
            .map(|c| (c.id.clone(), unix(c.expires_at)))
            .collect();
        client_certs.sort();
        DatabaseFigures {
            name: self.name.to_string(),
            ip_rules: self.rules.len(),
            crl_entries: self.tls.revoked_serials.len(),
            server_cert_expiry: self.tls.server_not_after.map(unix),
            ca_cert_expiry: self.tls.ca_not_after.map(unix),
            client_certs,
        }
    }

    /// Whether a client certificate with this serial is on the CRL.
    pub fn is_revoked(&self, serial: &str) -> bool {
        self.tls.revoked_serials.contains(serial)
    }
}

/// The upstream target, plus the bytes of the upstream CA file when one was read, so that a
/// replaced upstream CA counts as a change.
fn build_upstream(
    dir: &Path,
    s: &DatabaseSettings,
) -> Result<(UpstreamTarget, Option<Vec<u8>>), ConfigErrors> {
    let mut ca_bytes = None;
    let config = match s.upstream_tls {
        UpstreamTls::Disable => None,
        UpstreamTls::Require => Some(build_upstream_tls(UpstreamVerify::None)?),
        UpstreamTls::VerifyFull => {
            // The settings parser guarantees a CA path for verify-full.
            let rel = s.upstream_ca.clone().unwrap_or_default();
            let ca_file = dir.join(rel);
            let ca_pem = std::fs::read(&ca_file).map_err(|e| {
                ConfigErrors::one(&ca_file, "", None, format!("cannot read upstream CA: {e}"))
            })?;
            let config = build_upstream_tls(UpstreamVerify::Full {
                ca_file: &ca_file,
                ca_pem: &ca_pem,
            })?;
            ca_bytes = Some(ca_pem);
            Some(config)
        }
    };
    let tls = match config {
        None => None,
        Some(c) => {
            let name = s
                .upstream_server_name
                .clone()
                .unwrap_or_else(|| s.upstream.host.clone());
            let server_name = ServerName::try_from(name.clone()).map_err(|_| {
                ConfigErrors::one(
                    &dir.join(crate::state::DATABASE_YAML),
                    "upstream_server_name",
                    None,
                    format!("{name:?} is not a valid DNS name or IP address"),
                )
            })?;
            Some((c, server_name))
        }
    };
    Ok((
        UpstreamTarget {
            addr: s.upstream.clone(),
            tls,
        },
        ca_bytes,
    ))
}

/// Every served database at one point in time.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub generation: u64,
    pub databases: BTreeMap<String, Arc<DatabaseRuntime>>,
    pub loaded_at: Option<OffsetDateTime>,
}

impl Snapshot {
    /// Builds a snapshot from loaded states; any database failing to build fails the whole
    /// snapshot, so a reload is all or nothing.
    pub fn build(
        generation: u64,
        states: &[DatabaseState],
        metrics: &Metrics,
    ) -> Result<Snapshot, ConfigErrors> {
        let mut errors = ConfigErrors::default();
        let mut databases = BTreeMap::new();
        let mut listens: HashMap<std::net::SocketAddr, &str> = HashMap::new();
        for s in states {
            if let Some(other) = listens.insert(s.settings.listen, &s.name) {
                errors.extend(ConfigErrors::one(
                    &s.dir.join(crate::state::DATABASE_YAML),
                    "listen",
                    None,
                    format!(
                        "{} is also the listen address of database {other}",
                        s.settings.listen
                    ),
                ));
            }
            match DatabaseRuntime::build(s, metrics) {
                Ok(db) => {
                    databases.insert(s.name.clone(), Arc::new(db));
                }
                Err(e) => errors.extend(e),
            }
        }
        errors.into_result(Snapshot {
            generation,
            databases,
            loaded_at: Some(OffsetDateTime::now_utc()),
        })
    }

    /// A digest of every database's inputs, shown in `/status`.
    pub fn content_hash(&self) -> String {
        let mut h = Sha256::new();
        for (name, db) in &self.databases {
            h.update(name);
            h.update(&db.content_hash);
        }
        hex::encode(h.finalize())
    }

    /// Sets the configuration gauges (generation, rules, CRL size, expiry times) from this
    /// snapshot and drops the series of databases and certificates it no longer has.
    pub fn publish_metrics(&self, metrics: &Metrics) {
        let figures: Vec<DatabaseFigures> = self.databases.values().map(|d| d.figures()).collect();
        metrics.publish_config(self.generation, &figures);
    }
}
