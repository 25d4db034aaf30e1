//! What a running proxy says it serves: `GET /status` on its admin endpoint -> [`ProxyView`],
//! which turns it into the status words the commands print. `Operational` and `Authorized`
//! come only from here; without a reachable proxy the words say so instead of guessing.
//!
//! In etcd mode there is a fleet, not one proxy: the words come from the replica registry
//! ([`FleetView`]). A change is in force when every live replica serves a revision at or
//! after the commit that made it; the replicas still behind are named ([`Lag`]).

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use std::collections::HashMap;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use serde::{Deserialize, Serialize};

use super::output;
use crate::fleet::registry::{self, ReplicaEntry};
use crate::state::records::AUDIT_PREFIX;
use crate::state::{
    CA_CERT, CERTIFICATES_DIR, CERTIFICATE_YAML, CLIENT_CERT, CRL, DATABASES_DIR, DATABASE_YAML,
    IP_RULES, SERVER_CERT, SERVER_KEY, TRUSTED_IPS,
};
use crate::store::etcd::{EtcdConfig, EtcdStore};
use crate::store::Listing;

/// How long the CLI waits for the admin endpoint, connect and response together.
pub const STATUS_TIMEOUT: Duration = Duration::from_secs(2);

/// Largest `/status` body accepted; a status for hundreds of databases fits easily.
const MAX_STATUS_BYTES: usize = 8 * 1024 * 1024;

/// The `/status` document. Every field is optional so a proxy that reports more (or a little
/// less) still parses.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyStatus {
    #[serde(default)]
    pub generation: u64,
    #[serde(default)]
    pub content_hash: String,
    #[serde(default)]
    pub last_reload: Option<LastReload>,
    #[serde(default)]
    pub databases: BTreeMap<String, DatabaseStatus>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastReload {
    #[serde(default)]
    pub at: Option<String>,
    #[serde(default)]
    pub trigger: Option<String>,
    #[serde(default)]
    pub ok: bool,
    #[serde(default)]
    pub error: Option<String>,
    /// Per database whose change the last reload rejected, its errors.
    #[serde(default)]
    pub database_errors: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatabaseStatus {
    #[serde(default)]
    pub operational: bool,
    #[serde(default)]
    pub listen: Option<String>,
    /// Ids of the IP rules the proxy applies.
    #[serde(default)]
    pub rules: Vec<String>,
    /// Ids of the trusted IP ranges the proxy applies.
    #[serde(default)]
    pub trusted_ips: Vec<String>,
    #[serde(default)]
    pub certificates: Vec<CertificateStatus>,
    #[serde(default)]
    pub crl_entries: u64,
    #[serde(default)]
    pub server_cert_expires_at: Option<String>,
    #[serde(default)]
    pub ca_expires_at: Option<String>,
    /// Why the proxy rejected this database's last change (it serves the previous one).
    #[serde(default)]
    pub reload_error: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateStatus {
    pub id: String,
    #[serde(default)]
    pub serial: String,
    #[serde(default)]
    pub expires_at: Option<String>,
    #[serde(default)]
    pub revoked: bool,
}

/// Where the admin endpoint is: `http://HOST:PORT` plus an optional path prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminUrl {
    pub host: String,
    pub port: u16,
    /// Prefix before `/status`, without a trailing slash ("" for none).
    pub prefix: String,
}

impl AdminUrl {
    /// The endpoint a proxy with `admin_listen: ADDR` serves; an unspecified address
    /// (0.0.0.0, ::) is reached over loopback.
    pub fn from_listen(addr: SocketAddr) -> AdminUrl {
        let ip = match addr.ip() {
            std::net::IpAddr::V4(v4) if v4.is_unspecified() => {
                std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)
            }
            std::net::IpAddr::V6(v6) if v6.is_unspecified() => {
                std::net::IpAddr::V6(std::net::Ipv6Addr::LOCALHOST)
            }
            ip => ip,
        };
        AdminUrl {
            host: ip.to_string(),
            port: addr.port(),
            prefix: String::new(),
        }
    }

    fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    fn status_path(&self) -> String {
        format!("{}/status", self.prefix)
    }
}

impl std::str::FromStr for AdminUrl {
    type Err = String;

    /// Accepts `http://host:port[/prefix]` or a bare `host:port`.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("invalid admin URL {s:?}: {why}");
        let with_scheme = if s.contains("://") {
            s.to_owned()
        } else {
            format!("http://{s}")
        };
        let uri: hyper::Uri = with_scheme.parse().map_err(|_| bad("not a URL"))?;
        if uri.scheme_str() != Some("http") {
            return Err(bad(
                "only http:// is supported (the admin endpoint is plain HTTP)",
            ));
        }
        let host = uri
            .host()
            .ok_or_else(|| bad("no host"))?
            .trim_matches(['[', ']'])
            .to_owned();
        let port = uri.port_u16().unwrap_or(80);
        if uri.query().is_some() {
            return Err(bad("a query string is not allowed"));
        }
        let prefix = uri.path().trim_end_matches('/');
        let prefix = prefix.strip_suffix("/status").unwrap_or(prefix).to_owned();
        Ok(AdminUrl { host, port, prefix })
    }
}

impl fmt::Display for AdminUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "http://{}{}", self.authority(), self.prefix)
    }
}

/// Why `/status` could not be read.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("cannot connect to {0}: {1}")]
    Connect(String, std::io::Error),
    #[error("no answer from {0} within {1:?}")]
    Timeout(String, Duration),
    #[error("HTTP error talking to {0}: {1}")]
    Http(String, String),
    #[error("{0} answered {1}")]
    Status(String, hyper::StatusCode),
    #[error("{0} sent a /status document that does not parse: {1}")]
    Json(String, serde_json::Error),
}

/// Fetches and parses `/status`, all within `timeout`.
pub async fn fetch(url: &AdminUrl, timeout: Duration) -> Result<ProxyStatus, StatusError> {
    let body = get(url, &url.status_path(), "application/json", timeout).await?;
    serde_json::from_slice(&body).map_err(|e| StatusError::Json(url.to_string(), e))
}

/// `GET PREFIX+path` on the admin endpoint, the body of a 2xx answer, all within `timeout`:
/// `/status` for the CLI, `/sessions` and `/metrics` for the console.
pub async fn get(
    url: &AdminUrl,
    path: &str,
    accept: &'static str,
    timeout: Duration,
) -> Result<Bytes, StatusError> {
    let shown = url.to_string();
    match tokio::time::timeout(timeout, get_inner(url, path, accept)).await {
        Ok(r) => r,
        Err(_) => Err(StatusError::Timeout(shown, timeout)),
    }
}

async fn get_inner(url: &AdminUrl, path: &str, accept: &'static str) -> Result<Bytes, StatusError> {
    let shown = url.to_string();
    let http = |e: &dyn fmt::Display| StatusError::Http(shown.clone(), e.to_string());
    let stream = tokio::net::TcpStream::connect((url.host.as_str(), url.port))
        .await
        .map_err(|e| StatusError::Connect(shown.clone(), e))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| http(&e))?;
    // The connection task ends when the response has been read and the sender is dropped.
    let driver = tokio::spawn(conn);
    let req = hyper::Request::get(format!("{}{path}", url.prefix))
        .header(hyper::header::HOST, url.authority())
        .header(hyper::header::ACCEPT, accept)
        .body(Empty::<Bytes>::new())
        .map_err(|e| http(&e))?;
    let resp = sender.send_request(req).await.map_err(|e| http(&e))?;
    if !resp.status().is_success() {
        driver.abort();
        return Err(StatusError::Status(format!("{shown}{path}"), resp.status()));
    }
    let body = Limited::new(resp.into_body(), MAX_STATUS_BYTES)
        .collect()
        .await
        .map_err(|e| http(&e))?
        .to_bytes();
    driver.abort();
    Ok(body)
}

/// What the CLI knows about the running proxy.
#[derive(Debug, Clone)]
pub enum ProxyView {
    Reachable {
        url: AdminUrl,
        status: ProxyStatus,
    },
    Unreachable {
        reason: String,
    },
    /// etcd mode: the live replicas and the revisions of the changes.
    Fleet(FleetView),
}

/// `Operational` / `Provisioning` / unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsStatus {
    /// A reachable proxy serves the database.
    Operational,
    /// A reachable proxy does not serve it (yet): not reloaded, or the reload failed.
    Provisioning,
    Unknown,
}

/// `Authorized` / `Authorizing` / unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleStatus {
    /// A reachable proxy applies the rule.
    Authorized,
    /// A reachable proxy does not apply it (yet).
    Authorizing,
    Unknown,
}

/// The human form of "no proxy to ask".
pub const UNKNOWN: &str = "unknown (no proxy reachable)";

impl fmt::Display for TlsStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TlsStatus::Operational => "Operational",
            TlsStatus::Provisioning => "Provisioning",
            TlsStatus::Unknown => UNKNOWN,
        })
    }
}

impl fmt::Display for RuleStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RuleStatus::Authorized => "Authorized",
            RuleStatus::Authorizing => "Authorizing",
            RuleStatus::Unknown => UNKNOWN,
        })
    }
}

/// A status word and, in etcd mode, the replicas that do not serve the change yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shown<S> {
    pub status: S,
    /// `None` outside etcd mode; in it, every live replica still behind (empty when none is).
    pub lagging: Option<Vec<Lag>>,
    /// The text of "unknown", which says why.
    unknown: &'static str,
}

/// The human form of "no replica to ask" in etcd mode.
pub const NO_REPLICA: &str = "unknown (no live replica registered in etcd)";

impl<S> Shown<S> {
    fn one_proxy(status: S) -> Shown<S> {
        Shown {
            status,
            lagging: None,
            unknown: UNKNOWN,
        }
    }
}

impl<S: PartialEq> PartialEq<S> for Shown<S> {
    fn eq(&self, other: &S) -> bool {
        self.status == *other
    }
}

/// `waiting for replica 3 at revision 41 < 44, replica 5 at revision 40 < 44`.
pub fn waiting_text(lagging: &[Lag]) -> String {
    let each: Vec<String> = lagging
        .iter()
        .map(|l| {
            format!(
                "replica {} at revision {} < {}",
                output::clean(&l.replica),
                l.revision,
                l.needs
            )
        })
        .collect();
    format!("waiting for {}", each.join(", "))
}

macro_rules! shown_words {
    ($t:ty, $unknown:path) => {
        impl fmt::Display for Shown<$t> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                if self.status == $unknown {
                    return f.write_str(self.unknown);
                }
                write!(f, "{}", self.status)?;
                match &self.lagging {
                    Some(l) if !l.is_empty() => write!(f, " ({})", waiting_text(l)),
                    _ => Ok(()),
                }
            }
        }

        impl Shown<$t> {
            pub fn as_json(&self) -> &'static str {
                self.status.as_json()
            }
        }
    };
}
shown_words!(TlsStatus, TlsStatus::Unknown);
shown_words!(RuleStatus, RuleStatus::Unknown);

impl TlsStatus {
    /// The JSON form: the same word, `unknown` without the explanation.
    pub fn as_json(self) -> &'static str {
        match self {
            TlsStatus::Operational => "Operational",
            TlsStatus::Provisioning => "Provisioning",
            TlsStatus::Unknown => "unknown",
        }
    }
}

impl RuleStatus {
    pub fn as_json(self) -> &'static str {
        match self {
            RuleStatus::Authorized => "Authorized",
            RuleStatus::Authorizing => "Authorizing",
            RuleStatus::Unknown => "unknown",
        }
    }
}

impl ProxyView {
    /// Asks the proxy at `url`, or records why there is none to ask.
    pub fn query(url: Option<&AdminUrl>) -> ProxyView {
        let Some(url) = url else {
            return ProxyView::Unreachable {
                reason: "no admin endpoint configured (give --admin-url, PGMTLS_ADMIN_URL, or \
                         --config with admin_listen)"
                    .into(),
            };
        };
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                return ProxyView::Unreachable {
                    reason: format!("cannot start the async runtime: {e}"),
                }
            }
        };
        match rt.block_on(fetch(url, STATUS_TIMEOUT)) {
            Ok(status) => ProxyView::Reachable {
                url: url.clone(),
                status,
            },
            Err(e) => ProxyView::Unreachable {
                reason: e.to_string(),
            },
        }
    }

    pub fn is_reachable(&self) -> bool {
        match self {
            ProxyView::Reachable { .. } => true,
            ProxyView::Unreachable { .. } => false,
            ProxyView::Fleet(f) => !f.replicas.is_empty(),
        }
    }

    /// What "unknown" means here, for a footer.
    pub fn unknown_text(&self) -> &'static str {
        match self {
            ProxyView::Fleet(_) => NO_REPLICA,
            _ => UNKNOWN,
        }
    }

    /// One proxy's report of a database (none in etcd mode: the registry has no such detail).
    pub fn database(&self, name: &str) -> Option<&DatabaseStatus> {
        match self {
            ProxyView::Reachable { status, .. } => status.databases.get(name),
            ProxyView::Unreachable { .. } | ProxyView::Fleet(_) => None,
        }
    }

    pub fn tls_status(&self, db: &str) -> Shown<TlsStatus> {
        match self {
            ProxyView::Unreachable { .. } => Shown::one_proxy(TlsStatus::Unknown),
            ProxyView::Reachable { .. } => Shown::one_proxy(match self.database(db) {
                Some(d) if d.operational => TlsStatus::Operational,
                _ => TlsStatus::Provisioning,
            }),
            ProxyView::Fleet(f) => f.shown(
                f.database_needs(db),
                TlsStatus::Operational,
                TlsStatus::Provisioning,
                TlsStatus::Unknown,
            ),
        }
    }

    pub fn rule_status(&self, db: &str, rule_id: &str) -> Shown<RuleStatus> {
        match self {
            ProxyView::Unreachable { .. } => Shown::one_proxy(RuleStatus::Unknown),
            ProxyView::Reachable { .. } => Shown::one_proxy(match self.database(db) {
                Some(d) if d.operational && d.rules.iter().any(|r| r == rule_id) => {
                    RuleStatus::Authorized
                }
                _ => RuleStatus::Authorizing,
            }),
            ProxyView::Fleet(f) => f.shown(
                f.rule_needs(db, rule_id),
                RuleStatus::Authorized,
                RuleStatus::Authorizing,
                RuleStatus::Unknown,
            ),
        }
    }

    /// Whether the proxy applies trusted range `id`: the same words as an IP rule's.
    pub fn trusted_ip_status(&self, db: &str, id: &str) -> Shown<RuleStatus> {
        match self {
            ProxyView::Unreachable { .. } => Shown::one_proxy(RuleStatus::Unknown),
            ProxyView::Reachable { .. } => Shown::one_proxy(match self.database(db) {
                Some(d) if d.operational && d.trusted_ips.iter().any(|r| r == id) => {
                    RuleStatus::Authorized
                }
                _ => RuleStatus::Authorizing,
            }),
            ProxyView::Fleet(f) => f.shown(
                f.trusted_ip_needs(db, id),
                RuleStatus::Authorized,
                RuleStatus::Authorizing,
                RuleStatus::Unknown,
            ),
        }
    }

    /// How the proxy sees a certificate: `None` when no proxy is reachable, else whether it is
    /// loaded and whether the proxy treats it as revoked. `revoked` says whether the state
    /// revokes it (in etcd mode, which change to wait for: its revocation or its creation).
    pub fn certificate(&self, db: &str, cert_id: &str, revoked: bool) -> Option<CertificateSeen> {
        if let ProxyView::Fleet(f) = self {
            return f.certificate(db, cert_id, revoked);
        }
        if !self.is_reachable() {
            return None;
        }
        let seen = self
            .database(db)
            .filter(|d| d.operational)
            .and_then(|d| d.certificates.iter().find(|c| c.id == cert_id));
        Some(CertificateSeen {
            loaded: seen.is_some(),
            revoked: seen.is_some_and(|c| c.revoked),
            lagging: None,
        })
    }

    /// The last reload's error, when the proxy reports one.
    pub fn reload_error(&self) -> Option<&str> {
        match self {
            ProxyView::Reachable { status, .. } => status
                .last_reload
                .as_ref()
                .filter(|r| !r.ok)
                .and_then(|r| r.error.as_deref()),
            ProxyView::Unreachable { .. } | ProxyView::Fleet(_) => None,
        }
    }

    /// Why the last reload rejected database `db`'s change, when it did: the proxy then serves
    /// the database's previous configuration (or, for a new one, nothing). A proxy that names
    /// no database in its errors (an older one, or a broken config file) gives its whole error.
    pub fn database_error(&self, db: &str) -> Option<&str> {
        let ProxyView::Reachable { status, .. } = self else {
            return None;
        };
        let last = status.last_reload.as_ref().filter(|r| !r.ok)?;
        if let Some(e) = last.database_errors.get(db) {
            return Some(e);
        }
        if let Some(e) = status
            .databases
            .get(db)
            .and_then(|d| d.reload_error.as_deref())
        {
            return Some(e);
        }
        if last.database_errors.is_empty() {
            return last.error.as_deref();
        }
        None
    }

    /// A JSON summary for `--json` output.
    pub fn summary(&self) -> serde_json::Value {
        match self {
            ProxyView::Reachable { url, status } => serde_json::json!({
                "reachable": true,
                "url": url.to_string(),
                "generation": status.generation,
                "last_reload_error": self.reload_error(),
                "content_hash": status.content_hash,
            }),
            ProxyView::Unreachable { reason } => serde_json::json!({
                "reachable": false,
                "error": reason,
            }),
            ProxyView::Fleet(f) => serde_json::json!({
                "reachable": !f.replicas.is_empty(),
                "etcd_prefix": f.prefix,
                "revision": f.revision,
                "replicas": f.replicas.iter().map(|r| serde_json::json!({
                    "id": r.id,
                    "revision": r.revision,
                })).collect::<Vec<_>>(),
            }),
        }
    }
}

/// A certificate as the proxy reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateSeen {
    pub loaded: bool,
    pub revoked: bool,
    /// etcd mode: the live replicas behind the change the status waits for (the revocation of
    /// a revoked certificate, else its creation).
    pub lagging: Option<Vec<Lag>>,
}

/// A live replica that does not serve a change yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Lag {
    /// Its id in the registry.
    pub replica: String,
    /// The revision it serves.
    pub revision: i64,
    /// The revision of the commit that made the change.
    pub needs: i64,
}

/// The registry's view of a change: the live replicas (each with the etcd revision of the
/// state it serves) and, for the records of the state, the revision of the commit that last
/// wrote each one. A replica that serves revision R has applied every commit up to R, so a
/// change is in force on it when R is at least the revision of the change's own commit. The
/// replicas' start-up revisions are no guide: they include other replicas' registry writes.
///
/// What this does not say: whether a replica that applied the revision also accepted it (a
/// database whose change a replica rejects keeps its previous state there; that replica's
/// `/status` says so).
#[derive(Debug, Clone, Default)]
pub struct FleetView {
    pub prefix: String,
    /// The revision the records were read at.
    pub revision: i64,
    pub replicas: Vec<ReplicaEntry>,
    /// `mod_revision` of each record under `databases/`.
    records: BTreeMap<String, i64>,
    /// The commit revision of each audited change, by (action, database, id): the latest.
    audited: HashMap<(String, String, String), i64>,
}

impl FleetView {
    /// Reads the records' revisions, the audit log and the registry from etcd.
    pub fn read(config: EtcdConfig) -> Result<FleetView, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the async runtime: {e}"))?;
        let prefix = config.prefix.clone();
        rt.block_on(async move {
            let store = EtcdStore::connect(config)
                .await
                .map_err(|e| e.to_string())?;
            // The records before the registry: a replica can only be further on than what it
            // reported, never behind, so reading it last errs on "in force" only when true.
            let databases = store
                .load_under(&format!("{DATABASES_DIR}/"))
                .await
                .map_err(|e| e.to_string())?;
            let audit = store
                .load_under(AUDIT_PREFIX)
                .await
                .map_err(|e| e.to_string())?;
            let (replicas, bad) = registry::list(&store).await.map_err(|e| e.to_string())?;
            for b in bad {
                eprintln!("pgmtls: warning: {b}");
            }
            Ok(FleetView::from_listings(
                prefix, &databases, &audit, replicas,
            ))
        })
    }

    /// The view of listings already read.
    pub fn from_listings(
        prefix: String,
        databases: &Listing,
        audit: &Listing,
        replicas: Vec<ReplicaEntry>,
    ) -> FleetView {
        // A pgmtls change commits exactly one audit key with its records, so its key's
        // revision is the change's. An import commits the whole log at once (and possibly
        // before the records it describes): audit keys sharing a revision are not trusted,
        // and the records' own revisions stand in for them.
        let mut per_revision: HashMap<i64, usize> = HashMap::new();
        for r in audit.mod_revisions.values() {
            *per_revision.entry(*r).or_default() += 1;
        }
        let mut audited: HashMap<(String, String, String), i64> = HashMap::new();
        for (key, bytes) in &audit.records {
            let Some(&revision) = audit.mod_revisions.get(key) else {
                continue;
            };
            if per_revision.get(&revision) != Some(&1) {
                continue;
            }
            let Ok(entry) = serde_json::from_slice::<serde_json::Value>(bytes) else {
                continue;
            };
            let (Some(action), Some(db)) = (entry["action"].as_str(), entry["database"].as_str())
            else {
                continue;
            };
            let id = entry["details"]["id"].as_str().unwrap_or_default();
            let slot = audited
                .entry((action.to_owned(), db.to_owned(), id.to_owned()))
                .or_default();
            *slot = (*slot).max(revision);
        }
        FleetView {
            prefix,
            revision: databases.revision.max(audit.revision),
            replicas,
            records: databases.mod_revisions.clone(),
            audited,
        }
    }

    fn audited(&self, action: &str, db: &str, id: &str) -> Option<i64> {
        self.audited
            .get(&(action.to_owned(), db.to_owned(), id.to_owned()))
            .copied()
    }

    /// The latest revision of the database's records `rels`; the revision of the read when
    /// there is none (a record missing now: whatever a replica serves, nothing older will do).
    fn record_revision(&self, db: &str, rels: &[&str]) -> i64 {
        rels.iter()
            .filter_map(|rel| self.records.get(&format!("{DATABASES_DIR}/{db}/{rel}")))
            .copied()
            .max()
            .unwrap_or(self.revision)
    }

    /// The commit that made the database: its `mtls.create`, else (imported state) the last
    /// change of the records its TLS endpoint is made of.
    pub fn database_needs(&self, db: &str) -> i64 {
        self.audited("mtls.create", db, "").unwrap_or_else(|| {
            self.record_revision(db, &[DATABASE_YAML, CA_CERT, SERVER_CERT, SERVER_KEY])
        })
    }

    /// The commit that made the rule: its `ip_rule.create`, else the last change of the rules
    /// file (never earlier than the rule, so never "in force" too early). Not before the
    /// database itself.
    pub fn rule_needs(&self, db: &str, id: &str) -> i64 {
        let rule = self
            .audited("ip_rule.create", db, id)
            .unwrap_or_else(|| self.record_revision(db, &[IP_RULES]));
        rule.max(self.database_needs(db))
    }

    /// The commit that deleted the rule: its `ip_rule.delete`, else the rules file's last
    /// change.
    pub fn rule_deleted_needs(&self, db: &str, id: &str) -> i64 {
        self.audited("ip_rule.delete", db, id)
            .unwrap_or_else(|| self.record_revision(db, &[IP_RULES]))
    }

    /// The commit that made the trusted range: its `trusted_ip.create`, else the last change
    /// of the trusted ranges file. Not before the database itself.
    pub fn trusted_ip_needs(&self, db: &str, id: &str) -> i64 {
        let made = self
            .audited("trusted_ip.create", db, id)
            .unwrap_or_else(|| self.record_revision(db, &[TRUSTED_IPS]));
        made.max(self.database_needs(db))
    }

    /// The commit that deleted the trusted range: its `trusted_ip.delete`, else the trusted
    /// ranges file's last change.
    pub fn trusted_ip_deleted_needs(&self, db: &str, id: &str) -> i64 {
        self.audited("trusted_ip.delete", db, id)
            .unwrap_or_else(|| self.record_revision(db, &[TRUSTED_IPS]))
    }

    /// The commit that made the certificate, or, when `revoked`, the one that revoked it.
    pub fn certificate_needs(&self, db: &str, id: &str, revoked: bool) -> i64 {
        let record = format!("{CERTIFICATES_DIR}/{id}/{CERTIFICATE_YAML}");
        if revoked {
            return self
                .audited("certificate.revoke", db, id)
                .unwrap_or_else(|| self.record_revision(db, &[&record, CRL]));
        }
        // The certificate file is written once, at creation; the record also changes later
        // (revocation, successor link), so it only stands in when the file is missing.
        let cert = format!("{CERTIFICATES_DIR}/{id}/{CLIENT_CERT}");
        let made = self
            .audited("certificate.create", db, id)
            .unwrap_or_else(|| {
                let file = format!("{DATABASES_DIR}/{db}/{cert}");
                match self.records.get(&file) {
                    Some(r) => *r,
                    None => self.record_revision(db, &[&record]),
                }
            });
        made.max(self.database_needs(db))
    }

    /// The live replicas serving a revision before `needs`.
    pub fn lagging(&self, needs: i64) -> Vec<Lag> {
        self.replicas
            .iter()
            .filter(|r| r.revision < needs)
            .map(|r| Lag {
                replica: r.id.clone(),
                revision: r.revision,
                needs,
            })
            .collect()
    }

    fn shown<S>(&self, needs: i64, done: S, waiting: S, unknown: S) -> Shown<S> {
        let lagging = self.lagging(needs);
        let status = if self.replicas.is_empty() {
            unknown
        } else if lagging.is_empty() {
            done
        } else {
            waiting
        };
        Shown {
            status,
            lagging: Some(lagging),
            unknown: NO_REPLICA,
        }
    }

    fn certificate(&self, db: &str, id: &str, revoked: bool) -> Option<CertificateSeen> {
        if self.replicas.is_empty() {
            return None;
        }
        let lagging = self.lagging(self.certificate_needs(db, id, revoked));
        let applied = lagging.is_empty();
        Some(CertificateSeen {
            // A revoked certificate was served before its revocation, by every replica that
            // has not applied it yet.
            loaded: applied || revoked,
            revoked: revoked && applied,
            lagging: Some(lagging),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    const STATUS: &str = r#"{"generation": 7, "content_hash": "ab",
        "last_reload": {"at": "2026-05-05T12:00:00Z", "trigger": "sighup", "ok": true, "error": null},
        "databases": {"app": {"operational": true, "listen": "127.0.0.1:6432",
            "rules": ["r1"], "certificates": [{"id": "c1", "serial": "4a", "expires_at": "2027-06-05T12:00:00Z", "revoked": false},
                                              {"id": "c2", "serial": "4b", "expires_at": "2027-06-05T12:00:00Z", "revoked": true}],
            "crl_entries": 1, "server_cert_expires_at": "2027-06-05T12:00:00Z", "ca_expires_at": "2036-05-05T12:00:00Z",
            "something_new": 1}},
        "also_new": true}"#;

    /// A one-shot HTTP server on a std listener: answers one request with `body` and returns
    /// the request line it saw.
    fn fake_admin(
        status_line: &'static str,
        body: &'static str,
    ) -> (AdminUrl, std::thread::JoinHandle<String>) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let h = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                req.extend_from_slice(&buf[..n]);
            }
            let resp = format!(
                "HTTP/1.1 {status_line}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            s.write_all(resp.as_bytes()).unwrap();
            String::from_utf8_lossy(&req)
                .lines()
                .next()
                .unwrap_or("")
                .to_owned()
        });
        (AdminUrl::from_listen(addr), h)
    }

    #[test]
    fn a_database_error_is_told_for_its_database_only() {
        let doc = r#"{"generation": 2, "content_hash": "ab",
            "last_reload": {"ok": false, "error": "b/ip-rules.yaml: bad",
                            "database_errors": {"b": "b/ip-rules.yaml: bad", "new": "new/crl.pem: missing"}},
            "databases": {"a": {"operational": true}, "b": {"operational": true, "reload_error": "b/ip-rules.yaml: bad"}}}"#;
        let view = ProxyView::Reachable {
            url: AdminUrl::from_listen("127.0.0.1:1".parse().unwrap()),
            status: serde_json::from_str(doc).unwrap(),
        };
        assert_eq!(view.database_error("a"), None);
        assert_eq!(view.database_error("b"), Some("b/ip-rules.yaml: bad"));
        assert_eq!(view.database_error("new"), Some("new/crl.pem: missing"));
        // A proxy that names no database: its whole error concerns every database.
        let old = r#"{"last_reload": {"ok": false, "error": "pgmtls.yaml:3: bad"}, "databases": {"a": {}}}"#;
        let view = ProxyView::Reachable {
            url: AdminUrl::from_listen("127.0.0.1:1".parse().unwrap()),
            status: serde_json::from_str(old).unwrap(),
        };
        assert_eq!(view.database_error("a"), Some("pgmtls.yaml:3: bad"));
    }

    #[test]
    fn reachable_proxy_drives_the_status_words() {
        let (url, h) = fake_admin("200 OK", STATUS);
        let view = ProxyView::query(Some(&url));
        assert_eq!(h.join().unwrap(), "GET /status HTTP/1.1");
        assert!(view.is_reachable(), "{view:?}");
        assert_eq!(view.tls_status("app"), TlsStatus::Operational);
        assert_eq!(view.tls_status("other"), TlsStatus::Provisioning);
        assert_eq!(view.rule_status("app", "r1"), RuleStatus::Authorized);
        assert_eq!(view.rule_status("app", "r2"), RuleStatus::Authorizing);
        assert_eq!(
            view.certificate("app", "c1", false),
            Some(CertificateSeen {
                loaded: true,
                revoked: false,
                lagging: None,
            })
        );
        assert_eq!(
            view.certificate("app", "c2", false),
            Some(CertificateSeen {
                loaded: true,
                revoked: true,
                lagging: None,
            })
        );
        assert_eq!(
            view.certificate("app", "c3", false),
            Some(CertificateSeen {
                loaded: false,
                revoked: false,
                lagging: None,
            })
        );
        assert_eq!(view.reload_error(), None);
    }

    #[test]
    fn no_proxy_means_unknown_not_a_guess() {
        // Bind and drop: nothing listens on the port any more.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url: AdminUrl = format!("127.0.0.1:{port}").parse().unwrap();
        let view = ProxyView::query(Some(&url));
        assert!(!view.is_reachable());
        assert_eq!(view.tls_status("app").to_string(), UNKNOWN);
        assert_eq!(view.rule_status("app", "r1").to_string(), UNKNOWN);
        assert_eq!(view.certificate("app", "c1", false), None);
        let none = ProxyView::query(None);
        assert_eq!(none.tls_status("app"), TlsStatus::Unknown);
    }

    #[test]
    fn error_answers_and_garbage_are_unreachable() {
        let (url, h) = fake_admin("503 Service Unavailable", "{}");
        let view = ProxyView::query(Some(&url));
        h.join().unwrap();
        match view {
            ProxyView::Unreachable { reason } => assert!(reason.contains("503"), "{reason}"),
            other => panic!("{other:?}"),
        }
        let (url, h) = fake_admin("200 OK", "not json");
        let view = ProxyView::query(Some(&url));
        h.join().unwrap();
        assert!(!view.is_reachable());
    }

    #[test]
    fn failed_reload_is_reported() {
        let (url, h) = fake_admin(
            "200 OK",
            r#"{"generation": 3, "last_reload": {"ok": false, "error": "ip-rules.yaml:3: bad"}, "databases": {}}"#,
        );
        let view = ProxyView::query(Some(&url));
        h.join().unwrap();
        assert_eq!(view.reload_error(), Some("ip-rules.yaml:3: bad"));
        assert_eq!(view.tls_status("app"), TlsStatus::Provisioning);
    }

    fn listing(revision: i64, records: &[(&str, &str, i64)]) -> Listing {
        let mut l = Listing::after_commit(revision);
        for (key, value, rev) in records {
            l.records.insert(key.to_string(), value.as_bytes().to_vec());
            l.mod_revisions.insert(key.to_string(), *rev);
        }
        l
    }

    fn replica(id: &str, revision: i64) -> ReplicaEntry {
        let mut e = ReplicaEntry::new(None, None);
        e.id = id.into();
        e.revision = revision;
        e
    }

    fn audit(action: &str, id: &str) -> String {
        format!(r#"{{"action": "{action}", "database": "app", "details": {{"id": "{id}"}}}}"#)
    }

    /// Imported at 10 (audit and records together); `mtls.create`-less. Rule r1 created by
    /// the CLI at 20, r2 at 30 (the rules file's last change), c1 revoked at 40.
    fn fleet(replicas: Vec<ReplicaEntry>) -> FleetView {
        let databases = listing(
            40,
            &[
                ("databases/app/database.yaml", "", 10),
                ("databases/app/server.crt", "", 10),
                ("databases/app/ip-rules.yaml", "", 30),
                ("databases/app/crl.pem", "", 40),
                ("databases/app/certificates/c1/certificate.yaml", "", 40),
                ("databases/app/certificates/c1/client.crt", "", 10),
            ],
        );
        let (imported_1, imported_2) = (audit("mtls.create", ""), audit("ip_rule.create", "r0"));
        let (r1, r2, c1) = (
            audit("ip_rule.create", "r1"),
            audit("ip_rule.create", "r2"),
            audit("certificate.revoke", "c1"),
        );
        let audit = listing(
            40,
            &[
                ("audit/0000000001", &imported_1, 9),
                ("audit/0000000002", &imported_2, 9),
                ("audit/0000000003", &r1, 20),
                ("audit/0000000004", &r2, 30),
                ("audit/0000000005", &c1, 40),
            ],
        );
        FleetView::from_listings("/p".into(), &databases, &audit, replicas)
    }

    #[test]
    fn a_change_is_in_force_when_every_live_replica_serves_its_commit() {
        let f = ProxyView::Fleet(fleet(vec![replica("1", 45), replica("3", 25)]));
        // r1's own commit (20), not the rules file's last change (30).
        assert_eq!(f.rule_status("app", "r1"), RuleStatus::Authorized);
        let r2 = f.rule_status("app", "r2");
        assert_eq!(r2, RuleStatus::Authorizing);
        assert_eq!(
            r2.lagging,
            Some(vec![Lag {
                replica: "3".into(),
                revision: 25,
                needs: 30
            }])
        );
        assert_eq!(
            r2.to_string(),
            "Authorizing (waiting for replica 3 at revision 25 < 30)"
        );
        // Imported audit keys share a revision (and may precede the records): the rules
        // file's revision stands in, conservatively.
        assert_eq!(f.rule_status("app", "r0"), RuleStatus::Authorizing);
        assert_eq!(f.tls_status("app"), TlsStatus::Operational);
        assert_eq!(f.tls_status("app").to_string(), "Operational");
        let c1 = f.certificate("app", "c1", true).unwrap();
        assert!(c1.loaded && !c1.revoked, "{c1:?}");
        let c1 = f.certificate("app", "c1", false).unwrap();
        assert!(c1.loaded, "created at 10: {c1:?}");
        let all = ProxyView::Fleet(fleet(vec![replica("1", 45), replica("3", 40)]));
        assert_eq!(all.rule_status("app", "r0"), RuleStatus::Authorized);
        let c1 = all.certificate("app", "c1", true).unwrap();
        assert!(c1.revoked, "{c1:?}");
        assert_eq!(c1.lagging, Some(vec![]));
        assert_eq!(all.summary()["replicas"][1]["revision"], 40);
    }

    #[test]
    fn no_live_replica_is_unknown() {
        let f = ProxyView::Fleet(fleet(vec![]));
        assert!(!f.is_reachable());
        assert_eq!(f.rule_status("app", "r1").to_string(), NO_REPLICA);
        assert_eq!(f.tls_status("app").as_json(), "unknown");
        assert_eq!(f.certificate("app", "c1", false), None);
        // A database not in the records (gone since): nothing older than the read will do.
        let one = ProxyView::Fleet(fleet(vec![replica("1", 39)]));
        assert_eq!(one.tls_status("gone"), TlsStatus::Provisioning);
    }

    #[test]
    fn admin_urls_parse() {
        let u: AdminUrl = "http://127.0.0.1:9480".parse().unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.prefix.as_str()),
            ("127.0.0.1", 9480, "")
        );
        assert_eq!(u.status_path(), "/status");
        let u: AdminUrl = "localhost:9480/pgmtls/".parse().unwrap();
        assert_eq!(u.status_path(), "/pgmtls/status");
        let u: AdminUrl = "http://[::1]:9480/status".parse().unwrap();
        assert_eq!(u.authority(), "[::1]:9480");
        assert_eq!(u.status_path(), "/status");
        assert!("https://x:1".parse::<AdminUrl>().is_err());
        assert!("http://".parse::<AdminUrl>().is_err());
        let l = AdminUrl::from_listen("0.0.0.0:9480".parse().unwrap());
        assert_eq!(l.to_string(), "http://127.0.0.1:9480");
    }
}
