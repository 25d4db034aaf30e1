//! The validated, immutable view of every served database that the data plane reads: one
//! `Arc<Snapshot>` per reload, loaded once per accepted connection.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::allowlist::{Admitted, AllowRule, Allowlist};
use crate::config::ConfigErrors;
use crate::metrics::{DatabaseFigures, DbMetrics, Metrics};
use crate::state::{
    CertificateRecord, DatabaseSettings, DatabaseState, IpRule, LoadedDatabase, UpstreamTls,
};
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
    /// `trusted-ips.yaml`, and the list admitting without a certificate built from it.
    pub trusted_ips: Vec<IpRule>,
    pub trusted: Allowlist,
    pub tls: ServerTls,
    pub upstream: UpstreamTarget,
    /// Client certificate records by serial (lowercase hex), to name certificates in logs.
    pub certificates: HashMap<String, CertificateRecord>,
    /// Every serial refused as revoked: the CRL's entries and the records marked
    /// `revoked_at`. The TLS verifier refuses the same set.
    revoked: HashSet<String>,
    pub metrics: DbMetrics,
    /// SHA-256 over every input file, to tell what a reload changed.
    pub content_hash: String,
    /// SHA-256 of each input on its own, to say in the reload log what changed.
    pub inputs: InputDigests,
    /// The CRL file, to name it in errors.
    crl_file: std::path::PathBuf,
}

/// Hex SHA-256 of each input of one database. `crl` and `upstream_ca` are empty when absent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InputDigests {
    pub settings: String,
    pub rules: String,
    pub trusted_ips: String,
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
            trusted_ips: digest(crate::state::trusted_ips_to_yaml(&state.trusted_ips).as_bytes()),
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
            &self.trusted_ips,
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
        let revoked_by_record: HashSet<String> = state
            .certificates
            .iter()
            .filter(|c| c.revoked_at.is_some())
            .map(|c| c.serial.clone())
            .collect();
        let tls = if state.crl_required && state.crl_pem.is_none() {
            // Serving on would accept every certificate the lost CRL listed.
            Err(ConfigErrors::one(
                &state.paths.crl,
                "",
                None,
                format!(
                    "missing: a database in the state directory must have its CRL (one with no \
                     entries revokes nothing); restore it, or write a new one with \
                     `pgmtls certificates renew {}`",
                    state.name
                ),
            ))
        } else {
            build_server_tls(
                &state.paths,
                &state.server_cert_pem,
                &state.server_key_pem,
                &state.ca_pem,
                state.crl_pem.as_deref(),
                &revoked_by_record,
            )
        };
        let upstream = build_upstream(
            &state.dir,
            &state.settings,
            state.upstream_ca_pem.as_deref(),
        );
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
        let list = |rules: &[IpRule]| {
            Allowlist::new(
                rules
                    .iter()
                    .map(|r| AllowRule {
                        id: r.id.as_str().into(),
                        cidr: r.cidr,
                    })
                    .collect(),
            )
        };
        let allowlist = list(&state.rules);
        let trusted = list(&state.trusted_ips);
        let mut revoked = tls.revoked_serials.clone();
        revoked.extend(revoked_by_record);
        Ok(DatabaseRuntime {
            name: state.name.as_str().into(),
            settings: state.settings.clone(),
            rules: state.rules.clone(),
            allowlist,
            trusted_ips: state.trusted_ips.clone(),
            trusted,
            revoked,
            tls,
            upstream,
            certificates: state
                .certificates
                .iter()
                .map(|c| (c.serial.clone(), c.clone()))
                .collect(),
            metrics: metrics.for_database(&state.name),
            crl_file: state.paths.crl.clone(),
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
            trusted_ips: self.trusted_ips.len(),
            crl_entries: self.tls.revoked_serials.len(),
            server_cert_expiry: self.tls.server_not_after.map(unix),
            ca_cert_expiry: self.tls.ca_not_after.map(unix),
            client_certs,
        }
    }

    /// Which of this database's lists admits `ip`, if one does: an IP rule before a trusted
    /// range (see [`crate::allowlist::admit`]).
    pub fn admit(&self, ip: std::net::IpAddr) -> Option<Admitted<'_>> {
        crate::allowlist::admit(&self.allowlist, &self.trusted, ip)
    }

    /// Whether a client certificate with this serial is revoked: on the CRL, or its record is
    /// marked `revoked_at`. The one question the handshake, re-admission and live enforcement
    /// ask, so they cannot disagree.
    pub fn is_revoked(&self, serial: &str) -> bool {
        self.revoked.contains(serial)
    }

    /// Refuses a CRL older than `previous`'s: replacing the CRL in force by one with a lower
    /// cRLNumber (an old copy restored, a stale Secret) would un-revoke what was revoked since.
    fn check_crl_not_older(&self, previous: &DatabaseRuntime) -> Result<(), ConfigErrors> {
        let Some(in_force) = previous.tls.crl_number else {
            return Ok(());
        };
        let file = &self.crl_file;
        match self.tls.crl_number {
            Some(n) if n >= in_force => Ok(()),
            Some(n) => Err(ConfigErrors::one(
                file,
                "",
                None,
                format!(
                    "CRL number {n} is lower than {in_force}, the number of the CRL in force; \
                     an older CRL could let revoked certificates back in (keeping the CRL in \
                     force)"
                ),
            )),
            None => Err(ConfigErrors::one(
                file,
                "",
                None,
                format!(
                    "{what}, but the CRL in force has number {in_force}; an older CRL could \
                     let revoked certificates back in (keeping the CRL in force)",
                    what = if self.inputs.crl.is_empty() {
                        "no CRL"
                    } else {
                        "CRL has no CRL number"
                    }
                ),
            )),
        }
    }
}

/// The upstream target, plus the bytes of the upstream CA file when one was read, so that a
/// replaced upstream CA counts as a change.
fn build_upstream(
    dir: &Path,
    s: &DatabaseSettings,
    ca_from_records: Option<&[u8]>,
) -> Result<(UpstreamTarget, Option<Vec<u8>>), ConfigErrors> {
    let mut ca_bytes = None;
    let config = match s.upstream_tls {
        UpstreamTls::Disable => None,
        UpstreamTls::Require => Some(build_upstream_tls(UpstreamVerify::None)?),
        UpstreamTls::VerifyFull => {
            // The settings parser guarantees a CA path for verify-full.
            let rel = s.upstream_ca.clone().unwrap_or_default();
            let ca_file = dir.join(rel);
            let ca_pem = match ca_from_records {
                Some(b) => b.to_vec(),
                None => std::fs::read(&ca_file).map_err(|e| {
                    ConfigErrors::one(&ca_file, "", None, format!("cannot read upstream CA: {e}"))
                })?,
            };
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
    /// Server name (lowercase) -> the database on the shared listener it picks.
    by_server_name: HashMap<String, Arc<DatabaseRuntime>>,
    pub loaded_at: Option<OffsetDateTime>,
}

impl Snapshot {
    /// Builds a snapshot from loaded states; any database failing to build fails the whole
    /// snapshot. Start-up and `check-config` use this: a proxy that starts serves all of its
    /// state or refuses to start.
    pub fn build(
        generation: u64,
        states: &[DatabaseState],
        metrics: &Metrics,
    ) -> Result<Snapshot, ConfigErrors> {
        let mut errors = ConfigErrors::default();
        let mut databases = BTreeMap::new();
        let mut claimed: HashMap<Claim, &str> = HashMap::new();
        for s in states {
            for claim in claims(&s.settings) {
                if let Some(other) = claimed.insert(claim.clone(), &s.name) {
                    errors.extend(claim.taken(&s.dir.join(crate::state::DATABASE_YAML), other));
                }
            }
            match DatabaseRuntime::build(s, metrics) {
                Ok(db) => {
                    databases.insert(s.name.clone(), Arc::new(db));
                }
                Err(e) => errors.extend(e),
            }
        }
        errors.into_result(Snapshot::new(generation, databases))
    }

    fn new(generation: u64, databases: BTreeMap<String, Arc<DatabaseRuntime>>) -> Snapshot {
        let mut by_server_name = HashMap::new();
        for db in databases.values() {
            if db.settings.listen.is_shared() {
                for n in &db.settings.server_names {
                    by_server_name.insert(n.to_ascii_lowercase(), Arc::clone(db));
                }
            }
        }
        Snapshot {
            generation,
            databases,
            by_server_name,
            loaded_at: Some(OffsetDateTime::now_utc()),
        }
    }

    /// The database on the shared listener that SNI name `name` picks.
    pub fn by_server_name(&self, name: &str) -> Option<&Arc<DatabaseRuntime>> {
        self.by_server_name.get(&name.to_ascii_lowercase())
    }

    /// The databases served on the shared listener.
    pub fn shared(&self) -> impl Iterator<Item = &Arc<DatabaseRuntime>> {
        self.databases
            .values()
            .filter(|d| d.settings.listen.is_shared())
    }

    /// Whether any database on the shared listener has an IP rule or a trusted range admitting
    /// `ip`: the shared port's admission on accept, before a byte is read. The database the
    /// SNI then picks decides again with its own lists.
    pub fn shared_admits(&self, ip: std::net::IpAddr) -> bool {
        self.shared().any(|d| d.admit(ip).is_some())
    }

    /// Builds the next snapshot database by database, for a reload: each database that loads
    /// and builds is taken whole; one that does not keeps its runtime from `previous` (a new
    /// one is left out) and its errors are returned under its name. So a typo in one database
    /// never holds back a revocation in another, and no database is ever half applied.
    pub fn rebuild(
        generation: u64,
        loaded: Vec<LoadedDatabase>,
        previous: &Snapshot,
        metrics: &Metrics,
    ) -> (Snapshot, BTreeMap<String, ConfigErrors>) {
        let mut failed: BTreeMap<String, ConfigErrors> = BTreeMap::new();
        let mut states: HashMap<String, DatabaseState> = HashMap::new();
        let mut databases: BTreeMap<String, Arc<DatabaseRuntime>> = BTreeMap::new();
        for (name, result) in loaded {
            let built = result.and_then(|state| {
                let db = DatabaseRuntime::build(&state, metrics)?;
                if let Some(prev) = previous.databases.get(&name) {
                    db.check_crl_not_older(prev)?;
                }
                states.insert(name.clone(), state);
                Ok(db)
            });
            match built {
                Ok(db) => {
                    // An unchanged database keeps its runtime, and with it the TLS verifier's
                    // cache of accepted chains.
                    let db = match previous.databases.get(&name) {
                        Some(prev) if prev.content_hash == db.content_hash => Arc::clone(prev),
                        _ => Arc::new(db),
                    };
                    databases.insert(name, db);
                }
                Err(e) => {
                    if let Some(prev) = previous.databases.get(&name) {
                        databases.insert(name.clone(), Arc::clone(prev));
                    }
                    failed.insert(name, e);
                }
            }
        }
        // Two databases on one address: the one already served there keeps it; a database
        // that moved onto it (or a new one) fails and falls back to its previous runtime, at
        // an address it holds, so it never loses again and the loop ends.
        // The same holds for a server name on the shared listener.
        loop {
            let mut by_claim: BTreeMap<Claim, Vec<String>> = BTreeMap::new();
            for (name, db) in &databases {
                for claim in claims(&db.settings) {
                    by_claim.entry(claim).or_default().push(name.clone());
                }
            }
            let mut losers = Vec::new();
            for (claim, names) in by_claim.iter().filter(|(_, n)| n.len() > 1) {
                // At most one: the previous snapshot had no two databases with one claim.
                let holder = names.iter().find(|n| {
                    previous
                        .databases
                        .get(*n)
                        .is_some_and(|p| claims(&p.settings).contains(claim))
                });
                for n in names {
                    if Some(n) != holder {
                        let other = holder
                            .or_else(|| names.iter().find(|o| *o != n))
                            .cloned()
                            .unwrap_or_default();
                        losers.push((n.clone(), other, claim.clone()));
                    }
                }
            }
            if losers.is_empty() {
                break;
            }
            for (name, other, claim) in losers {
                let file = states
                    .get(&name)
                    .map(|s| s.dir.join(crate::state::DATABASE_YAML))
                    .unwrap_or_default();
                failed
                    .entry(name.clone())
                    .or_default()
                    .extend(claim.taken(&file, &other));
                match previous.databases.get(&name) {
                    Some(prev) => {
                        databases.insert(name, Arc::clone(prev));
                    }
                    None => {
                        databases.remove(&name);
                    }
                }
            }
        }
        (Snapshot::new(generation, databases), failed)
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

/// What a database holds exclusively: its own listen address, or on the shared listener each
/// of its server names (lowercase, as SNI is compared).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Claim {
    Addr(std::net::SocketAddr),
    ServerName(String),
}

fn claims(s: &DatabaseSettings) -> Vec<Claim> {
    match s.listen {
        crate::state::Listen::Addr(a) => vec![Claim::Addr(a)],
        crate::state::Listen::Shared => {
            let mut names: Vec<Claim> = s
                .server_names
                .iter()
                .map(|n| Claim::ServerName(n.to_ascii_lowercase()))
                .collect();
            names.sort();
            names.dedup();
            names
        }
    }
}

impl Claim {
    fn taken(&self, file: &Path, other: &str) -> ConfigErrors {
        match self {
            Claim::Addr(a) => ConfigErrors::one(
                file,
                "listen",
                None,
                format!("{a} is also the listen address of database {other}"),
            ),
            Claim::ServerName(n) => ConfigErrors::one(
                file,
                "server_names",
                None,
                format!(
                    "{n} is also a server name of database {other} on the shared listener; \
                     SNI must pick one database"
                ),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{build_crl, create_ca, issue_server, CaSigner, KeyType};
    use crate::state::{MaterialPaths, UpstreamAddr};

    struct Pki {
        ca: String,
        signer: CaSigner,
        cert: String,
        key: String,
    }

    fn pki() -> Pki {
        let ca = create_ca("snap ca", KeyType::EcdsaP256, time::Duration::days(30)).unwrap();
        let signer = CaSigner::from_issued(&ca).unwrap();
        let server = issue_server(
            &signer,
            &["localhost".into()],
            KeyType::EcdsaP256,
            time::Duration::days(2),
        )
        .unwrap();
        Pki {
            ca: ca.cert_pem,
            signer,
            cert: server.cert_pem,
            key: server.key_pem,
        }
    }

    fn crl(p: &Pki, number: u64) -> Vec<u8> {
        let now = OffsetDateTime::now_utc();
        build_crl::<&str>(&p.signer, &[], number, now, now + time::Duration::days(7))
            .unwrap()
            .into_bytes()
    }

    /// Database `name` on `listen` with `rules` IP rules and a CRL numbered `crl_number`.
    fn state(p: &Pki, name: &str, listen: &str, rules: usize, crl_number: u64) -> DatabaseState {
        let dir = std::path::PathBuf::from(format!("/s/databases/{name}"));
        let at = OffsetDateTime::UNIX_EPOCH;
        DatabaseState {
            name: name.into(),
            paths: MaterialPaths::in_dir(&dir),
            dir,
            settings: DatabaseSettings {
                listen: listen.parse().unwrap(),
                upstream: UpstreamAddr {
                    host: "127.0.0.1".into(),
                    port: 5432,
                },
                upstream_tls: UpstreamTls::Disable,
                upstream_ca: None,
                upstream_server_name: None,
                allow_plaintext_remote_upstream: false,
                server_names: Vec::new(),
                user_must_match_cn: false,
                max_connections: None,
                max_connections_per_ip: None,
                enabled_by: None,
                created_at: None,
            },
            rules: (0..rules)
                .map(|i| IpRule {
                    id: format!("r{i}"),
                    cidr: format!("10.0.0.{i}/32").parse().unwrap(),
                    description: String::new(),
                    created_at: at,
                    updated_at: at,
                })
                .collect(),
            trusted_ips: Vec::new(),
            server_cert_pem: p.cert.clone().into_bytes(),
            server_key_pem: p.key.clone().into_bytes(),
            ca_pem: p.ca.clone().into_bytes(),
            crl_pem: Some(crl(p, crl_number)),
            crl_required: true,
            upstream_ca_pem: None,
            certificates: Vec::new(),
        }
    }

    fn loaded(states: Vec<DatabaseState>) -> Vec<LoadedDatabase> {
        states
            .into_iter()
            .map(|s| (s.name.clone(), Ok(s)))
            .collect()
    }

    #[test]
    fn each_database_is_applied_or_kept_on_its_own() {
        let p = pki();
        let m = Metrics::new();
        let first = [
            state(&p, "a", "127.0.0.1:7001", 1, 1),
            state(&p, "b", "127.0.0.1:7002", 1, 1),
            state(&p, "c", "127.0.0.1:7003", 1, 5),
        ];
        let previous = Snapshot::build(1, &first, &m).unwrap();
        let mut broken = state(&p, "b", "127.0.0.1:7002", 2, 1);
        broken.crl_pem = None;
        let next = vec![
            // a changes and stays on its address; a new database and b both move onto it.
            ("a".into(), Ok(state(&p, "a", "127.0.0.1:7001", 2, 1))),
            (
                "b".into(),
                Err(ConfigErrors::one(Path::new("/s/b"), "", None, "bad")),
            ),
            ("c".into(), Ok(state(&p, "c", "127.0.0.1:7003", 2, 4))),
            ("d".into(), Ok(state(&p, "d", "127.0.0.1:7001", 1, 1))),
            ("e".into(), Ok(state(&p, "e", "127.0.0.1:7005", 1, 1))),
        ];
        let (snap, failed) = Snapshot::rebuild(2, next, &previous, &m);

        assert_eq!(snap.databases["a"].rules.len(), 2, "a's change is applied");
        assert!(Arc::ptr_eq(&snap.databases["b"], &previous.databases["b"]));
        assert_eq!(failed["b"].to_string(), "/s/b: bad");
        // c's CRL went from number 5 to 4: refused, the old runtime stays.
        assert!(Arc::ptr_eq(&snap.databases["c"], &previous.databases["c"]));
        assert!(failed["c"].to_string().contains(
            "/s/databases/c/crl.pem: CRL number 4 is lower than 5, the number of the CRL in force"
        ));
        assert!(
            !snap.databases.contains_key("d"),
            "a new database that fails is not added"
        );
        assert_eq!(
            failed["d"].to_string(),
            "/s/databases/d/database.yaml: listen: 127.0.0.1:7001 is also the listen address \
             of database a"
        );
        assert_eq!(
            snap.databases["e"].rules.len(),
            1,
            "a new valid database is added"
        );
        assert_eq!(failed.len(), 3);

        // A database that moves onto a served address falls back to its previous runtime.
        let (snap, failed) = Snapshot::rebuild(
            3,
            loaded(vec![
                first[0].clone(),
                state(&p, "b", "127.0.0.1:7001", 3, 1),
                first[2].clone(),
            ]),
            &previous,
            &m,
        );
        assert!(Arc::ptr_eq(&snap.databases["a"], &previous.databases["a"]));
        assert!(Arc::ptr_eq(&snap.databases["b"], &previous.databases["b"]));
        assert!(failed["b"]
            .to_string()
            .contains("also the listen address of database a"));
        assert_eq!(failed.len(), 1);
        assert_eq!(snap.content_hash(), previous.content_hash());

        // A database without its CRL is refused by name; quick mode's optional CRL is not.
        let (_, failed) = Snapshot::rebuild(4, loaded(vec![broken.clone()]), &previous, &m);
        assert!(failed["b"]
            .to_string()
            .contains("/s/databases/b/crl.pem: missing"));
        broken.crl_required = false;
        let none = Snapshot::default();
        let (snap, failed) = Snapshot::rebuild(4, loaded(vec![broken]), &none, &m);
        assert!(failed.is_empty(), "{failed:?}");
        assert!(snap.databases.contains_key("b"));
    }
}
