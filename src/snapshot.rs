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
use crate::metrics::{DbMetrics, Metrics};
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
        let (tls, upstream) = match (tls, upstream) {
            (Ok(t), Ok(u)) => (t, u),
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
        let mut h = Sha256::new();
        h.update(state.settings.to_yaml());
        h.update(crate::state::ip_rules_to_yaml(&state.rules));
        h.update(&state.server_cert_pem);
        h.update(&state.server_key_pem);
        h.update(&state.ca_pem);
        if let Some(c) = &state.crl_pem {
            h.update(c);
        }
        for c in &state.certificates {
            h.update(c.to_yaml());
        }
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
            content_hash: hex::encode(h.finalize()),
        })
    }

    /// Whether a client certificate with this serial is on the CRL.
    pub fn is_revoked(&self, serial: &str) -> bool {
        self.tls.revoked_serials.contains(serial)
    }
}

fn build_upstream(dir: &Path, s: &DatabaseSettings) -> Result<UpstreamTarget, ConfigErrors> {
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
            Some(build_upstream_tls(UpstreamVerify::Full {
                ca_file: &ca_file,
                ca_pem: &ca_pem,
            })?)
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
    Ok(UpstreamTarget {
        addr: s.upstream.clone(),
        tls,
    })
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
}
