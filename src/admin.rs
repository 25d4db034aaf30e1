//! Loopback HTTP for operators and the CLI: receives the application as an [`AdminSource`] and
//! serves `/metrics` (OpenMetrics text), `/healthz`, `/readyz`, `/status` (JSON, the
//! [`Status`] contract documented in docs/METRICS.md) and `/sessions` (JSON, the live
//! sessions).
//!
//! Three or four read-only routes do not need a framework: plain hyper 1, one task per
//! connection. Nothing here reads files or mutates state.
//!
//! The endpoint is reachable by whoever can reach `admin_listen` (the pod network in the shipped
//! manifests), so nobody may be able to starve the probes: every connection is accepted at once
//! and then admitted by [`Slots`] (a cap per source, a cap overall, and a reserve beyond it
//! that only `/healthz` and `/readyz` may use), and a short header deadline bounds how long an
//! idle connection holds its slot. `/status` names databases, rule ids and certificate serials,
//! and `/sessions` clients and users, so they answer only peers in `admin_status_from`
//! (loopback by default).

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONNECTION, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use ipnet::IpNet;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::snapshot::Snapshot;

/// The content type Prometheus negotiates for the OpenMetrics text format.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Connections that may use every route, from all sources together.
pub const MAX_CONNECTIONS: usize = 256;
/// Connections one source (an IPv4 address, an IPv6 /64) may hold, in both lanes together: one
/// peer cannot take the endpoint from the others.
pub const MAX_PER_SOURCE: usize = 16;
/// Beyond [`MAX_CONNECTIONS`], this many more for `/healthz` and `/readyz` only, one request
/// each: a liveness probe is answered even while many sources fill the endpoint.
pub const HEALTH_RESERVE: usize = 32;
/// Of the reserve, at most this many per source, so filling it takes many sources too.
pub const HEALTH_RESERVE_PER_SOURCE: usize = 4;
/// A client must send each request's headers within this time (hyper also applies it to the
/// wait for the next request on a kept-alive connection). Probes send theirs at once.
const HEADER_TIMEOUT: Duration = Duration::from_secs(2);
/// And a connection, however busy, is closed after this time.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// Who may read `/status` unless `admin_status_from` says otherwise: loopback.
pub const DEFAULT_STATUS_FROM: &[&str] = &["127.0.0.1/32", "::1/128"];

/// How the admin endpoint treats its peers; from `pgmtls.yaml`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminOptions {
    /// Peers allowed `/status`. A peer connecting from the address it connected to (the same
    /// host, or the same pod) is allowed too, so the CLI finds the proxy at any `admin_listen`.
    pub status_from: Vec<IpNet>,
}

impl Default for AdminOptions {
    fn default() -> Self {
        AdminOptions {
            status_from: DEFAULT_STATUS_FROM
                .iter()
                .filter_map(|c| c.parse().ok())
                .collect(),
        }
    }
}

/// What the admin endpoint reads from the running application.
pub trait AdminSource: Send + Sync + 'static {
    /// The OpenMetrics text exposition.
    fn metrics_text(&self) -> String;
    /// `Ok` when the process should receive traffic; otherwise why not.
    fn readiness(&self) -> Result<(), &'static str>;
    fn status(&self) -> Status;
    /// The live sessions, for `/sessions`.
    fn sessions(&self) -> Vec<crate::sessions::SessionView>;
}

/// `/status`. Field names are a contract with the CLI and with scripts: add fields, never
/// rename or remove them.
/// The `/sessions` document: an object, so fields can be added beside the list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sessions {
    pub sessions: Vec<crate::sessions::SessionView>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    /// What `/readyz` says.
    pub ready: bool,
    /// SIGTERM received; live sessions are draining.
    pub draining: bool,
    /// Goes up by one each time a changed configuration is applied; 1 after start-up.
    pub generation: u64,
    /// SHA-256 over every database's inputs as served.
    pub content_hash: String,
    pub last_reload: LastReload,
    pub databases: BTreeMap<String, DatabaseStatus>,
    /// Where the state comes from; absent in older versions.
    #[serde(default)]
    pub source: Option<SourceStatus>,
    /// The last run of `pgmtls certificates renew`, from the state's `renewal.yaml`; absent
    /// where the source keeps none (etcd replicas, quick mode) and in older versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renewal: Option<RenewalStatus>,
    /// Source prefixes closed at accept for failing handshakes; absent in older versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handshake_throttle: Option<ThrottleStatus>,
}

/// The failed-handshake throttle (`handshake_throttle_*`), as of this request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThrottleStatus {
    /// Prefixes blocked now.
    pub throttled: usize,
    /// Prefixes with recent failures, blocked or not (at most `handshake_throttle_prefixes`).
    pub tracked: usize,
    /// The blocked prefixes, longest remaining block first (at most 100).
    pub prefixes: Vec<ThrottledPrefixStatus>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThrottledPrefixStatus {
    /// An IPv4 /24 or an IPv6 /64.
    pub prefix: String,
    /// Milliseconds until new connections from it are accepted again.
    pub remaining_ms: u64,
    /// Its failure score now (failed handshakes, decayed).
    pub failures: u64,
}

impl ThrottleStatus {
    pub fn of(throttle: &crate::throttle::HandshakeThrottle) -> Self {
        let (blocked, tracked) = throttle.blocked_now(std::time::Instant::now());
        ThrottleStatus {
            throttled: blocked.len(),
            tracked,
            prefixes: blocked
                .iter()
                .take(100)
                .map(|p| ThrottledPrefixStatus {
                    prefix: p.prefix.to_string(),
                    remaining_ms: p.remaining.as_millis() as u64,
                    failures: p.failures.round() as u64,
                })
                .collect(),
        }
    }
}

/// When certificate renewal last ran and last succeeded, as of the last reload. Every field
/// is null until a run is recorded; `error` says why the record could not be read (then the
/// times are unknown, and nothing served is affected).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenewalStatus {
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub last_run_at: Option<OffsetDateTime>,
    /// `success` or `failure`.
    #[serde(default)]
    pub last_run_result: Option<String>,
    #[serde(default)]
    pub last_run_errors: Option<u64>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub last_success_at: Option<OffsetDateTime>,
    #[serde(default)]
    pub error: Option<String>,
}

/// The state's source: `state_dir`, `etcd` or `flags` (quick mode).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceStatus {
    pub kind: String,
    /// etcd: the revision the served state was read at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<i64>,
    /// etcd: since when it could not be reached (the state served may be behind); null while
    /// following it.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub stale_since: Option<OffsetDateTime>,
    /// etcd: why it cannot be reached, while stale.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The last reload attempt, successful or not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastReload {
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// `startup`, `watch`, `sighup` or `poll`.
    pub trigger: String,
    pub ok: bool,
    /// Every problem found, one per line, each naming file and key; null when `ok`.
    pub error: Option<String>,
    /// When a configuration was last loaded successfully.
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_success_at: Option<OffsetDateTime>,
    /// Per database whose change the last reload rejected, its errors (one per line). Such a
    /// database keeps serving its previous configuration; a new one is not served. Empty when
    /// every database was applied.
    #[serde(default)]
    pub database_errors: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatabaseStatus {
    /// In the served configuration and its listener is accepting connections.
    pub operational: bool,
    /// The bound address when listening (port 0 resolved), else the configured one.
    pub listen: String,
    /// Ids of the IP rules in force.
    pub rules: Vec<String>,
    /// Ids of the trusted IP ranges in force (admitted without a certificate where no IP rule
    /// covers the address).
    #[serde(default)]
    pub trusted_ips: Vec<String>,
    pub certificates: Vec<CertificateStatus>,
    /// Serials listed in the CRL in force.
    pub crl_entries: usize,
    #[serde(with = "time::serde::rfc3339::option")]
    pub server_cert_expires_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub ca_expires_at: Option<OffsetDateTime>,
    /// Why the last reload rejected this database's change (it serves its previous
    /// configuration); null when its files were applied.
    #[serde(default)]
    pub reload_error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateStatus {
    pub id: String,
    /// Lowercase hex, as in the CRL and the connection log.
    pub serial: String,
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
    /// On the CRL in force or its record has `revoked_at`: the proxy refuses this certificate
    /// and has closed its sessions.
    pub revoked: bool,
}

impl DatabaseStatus {
    /// Describes one database of `snap`; `bound` is its listener's address, if it has one.
    pub fn of(db: &crate::snapshot::DatabaseRuntime, bound: Option<SocketAddr>) -> Self {
        let mut certificates: Vec<CertificateStatus> = db
            .certificates
            .values()
            .map(|c| CertificateStatus {
                id: c.id.clone(),
                serial: c.serial.clone(),
                expires_at: c.expires_at,
                revoked: db.is_revoked(&c.serial),
            })
            .collect();
        certificates.sort_by(|a, b| a.id.cmp(&b.id));
        DatabaseStatus {
            operational: bound.is_some(),
            listen: bound.map_or_else(|| db.settings.listen.to_string(), |b| b.to_string()),
            rules: db.rules.iter().map(|r| r.id.clone()).collect(),
            trusted_ips: db.trusted_ips.iter().map(|r| r.id.clone()).collect(),
            certificates,
            crl_entries: db.tls.revoked_serials.len(),
            server_cert_expires_at: db.tls.server_not_after,
            ca_expires_at: db.tls.ca_not_after,
            reload_error: None,
        }
    }
}

impl Status {
    pub fn databases_of(
        snap: &Snapshot,
        bound: &BTreeMap<String, SocketAddr>,
    ) -> BTreeMap<String, DatabaseStatus> {
        snap.databases
            .iter()
            .map(|(name, db)| {
                (
                    name.clone(),
                    DatabaseStatus::of(db, bound.get(name).copied()),
                )
            })
            .collect()
    }
}

/// Binds the admin socket. Separate from [`spawn`] so the caller can print the bound address
/// (port 0 in tests) before serving.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves the admin routes on `listener` until the process exits.
pub fn spawn<S: AdminSource>(
    listener: TcpListener,
    source: Arc<S>,
    options: AdminOptions,
) -> JoinHandle<()> {
    let options = Arc::new(options);
    tokio::spawn(async move {
        let slots = Arc::new(Slots::default());
        loop {
            // Accept first, always: a connection waiting in the kernel backlog is one nobody
            // can answer, which is how probes used to time out behind idle connections.
            let (stream, peer) = match listener.accept().await {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed; backing off");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let slot = match slots.admit(peer.ip()) {
                Ok(slot) => slot,
                Err(reason) => {
                    drop(stream);
                    reason.count();
                    if crate::refusal_log::admit(None, reason.as_str()) {
                        tracing::info!(
                            client_addr = %peer,
                            reason = reason.as_str(),
                            "admin connection refused"
                        );
                    }
                    continue;
                }
            };
            let local = stream.local_addr().ok();
            let peer_ctx = Peer {
                status_allowed: status_allowed(&options.status_from, peer, local),
                health_only: slot.lane == Lane::HealthOnly,
            };
            let source = Arc::clone(&source);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let source = Arc::clone(&source);
                    async move { Ok::<_, Infallible>(route_for(&*source, &req, peer_ctx)) }
                });
                let mut builder = hyper::server::conn::http1::Builder::new();
                builder
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .keep_alive(!peer_ctx.health_only);
                let conn = builder.serve_connection(TokioIo::new(stream), service);
                let limit = if peer_ctx.health_only {
                    HEADER_TIMEOUT
                } else {
                    CONNECTION_TIMEOUT
                };
                let _ = tokio::time::timeout(limit, conn).await;
                drop(slot);
            });
        }
    })
}

/// What the routes need to know about the connection a request came on.
#[derive(Debug, Clone, Copy)]
struct Peer {
    status_allowed: bool,
    /// Admitted to the health reserve: every other route answers 503.
    health_only: bool,
}

/// `/status` is for `status_from`, or a peer on the same host (its address is the one it
/// connected to). IPv4 peers of a `[::]` socket arrive as `::ffff:a.b.c.d`.
fn status_allowed(status_from: &[IpNet], peer: SocketAddr, local: Option<SocketAddr>) -> bool {
    let ip = peer.ip().to_canonical();
    local.is_some_and(|l| l.ip().to_canonical() == ip)
        || status_from.iter().any(|n| n.contains(&ip))
}

/// Which routes an admitted connection may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lane {
    General,
    HealthOnly,
}

/// Why a connection was closed at accept: the `reason` label of
/// `pgmtls_admin_connections_refused_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminRefusal {
    /// The source already holds [`MAX_PER_SOURCE`] connections (or its share of the reserve).
    PerSourceLimit,
    /// Every slot, the health reserve included, is taken.
    Capacity,
}

static REFUSED_PER_SOURCE: AtomicU64 = AtomicU64::new(0);
static REFUSED_CAPACITY: AtomicU64 = AtomicU64::new(0);

impl AdminRefusal {
    pub const ALL: &'static [AdminRefusal] =
        &[AdminRefusal::PerSourceLimit, AdminRefusal::Capacity];

    pub fn as_str(self) -> &'static str {
        match self {
            AdminRefusal::PerSourceLimit => "per_source_limit",
            AdminRefusal::Capacity => "capacity",
        }
    }

    fn counter(self) -> &'static AtomicU64 {
        match self {
            AdminRefusal::PerSourceLimit => &REFUSED_PER_SOURCE,
            AdminRefusal::Capacity => &REFUSED_CAPACITY,
        }
    }

    fn count(self) {
        self.counter().fetch_add(1, Ordering::Relaxed);
    }
}

/// `pgmtls_admin_connections_refused_total`, read at scrape time. Process-wide, like the
/// admin endpoint itself.
#[derive(Debug, Default, Clone, Copy)]
pub struct AdminCollector;

impl Collector for AdminCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut e = encoder.encode_descriptor(
            "admin_connections_refused",
            "Admin endpoint connections closed at accept, by reason",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for &r in AdminRefusal::ALL {
            let m = ConstCounter::new(r.counter().load(Ordering::Relaxed));
            m.encode(e.encode_family(&[("reason", r.as_str())])?)?;
        }
        Ok(())
    }
}

/// The admission bookkeeping: connections per source and per lane.
#[derive(Debug, Default)]
struct Slots {
    inner: Mutex<SlotCounts>,
}

#[derive(Debug, Default)]
struct SlotCounts {
    general: usize,
    reserve: usize,
    /// Connections of each source in both lanes, and of those in the reserve.
    per_source: HashMap<IpAddr, (usize, usize)>,
}

/// One admitted connection; gives its slot back when dropped.
struct Slot {
    slots: Arc<Slots>,
    source: IpAddr,
    lane: Lane,
}

/// The unit one peer is counted as: an IPv4 address, or an IPv6 /64 (one host's usual share,
/// which it can draw addresses from at will).
fn source_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let mut o = v6.octets();
            o[8..].fill(0);
            IpAddr::V6(o.into())
        }
        v4 => v4,
    }
}

impl Slots {
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, AdminRefusal> {
        let source = source_key(ip);
        // A poisoned lock only means a panic elsewhere mid-update of plain counters.
        let mut c = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (total, reserved) = c.per_source.get(&source).copied().unwrap_or((0, 0));
        if total >= MAX_PER_SOURCE {
            return Err(AdminRefusal::PerSourceLimit);
        }
        let lane = if c.general < MAX_CONNECTIONS {
            c.general += 1;
            Lane::General
        } else if c.reserve >= HEALTH_RESERVE {
            return Err(AdminRefusal::Capacity);
        } else if reserved >= HEALTH_RESERVE_PER_SOURCE {
            return Err(AdminRefusal::PerSourceLimit);
        } else {
            c.reserve += 1;
            Lane::HealthOnly
        };
        let entry = c.per_source.entry(source).or_default();
        entry.0 += 1;
        if lane == Lane::HealthOnly {
            entry.1 += 1;
        }
        Ok(Slot {
            slots: Arc::clone(self),
            source,
            lane,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.slots.inner.lock().unwrap_or_else(|p| p.into_inner());
        match self.lane {
            Lane::General => c.general = c.general.saturating_sub(1),
            Lane::HealthOnly => c.reserve = c.reserve.saturating_sub(1),
        }
        if let Some(e) = c.per_source.get_mut(&self.source) {
            e.0 = e.0.saturating_sub(1);
            if self.lane == Lane::HealthOnly {
                e.1 = e.1.saturating_sub(1);
            }
            if e.0 == 0 {
                c.per_source.remove(&self.source);
            }
        }
    }
}

/// Maps one request from a peer allowed everything to its response. Public for tests that
/// exercise routing without sockets.
pub fn route<S: AdminSource + ?Sized>(
    source: &S,
    req: &Request<Incoming>,
) -> Response<Full<Bytes>> {
    let peer = Peer {
        status_allowed: true,
        health_only: false,
    };
    respond(source, req.method(), req.uri().path(), peer)
}

fn route_for<S: AdminSource + ?Sized>(
    source: &S,
    req: &Request<Incoming>,
    peer: Peer,
) -> Response<Full<Bytes>> {
    let mut r = respond(source, req.method(), req.uri().path(), peer);
    if peer.health_only {
        r.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    r
}

fn respond<S: AdminSource + ?Sized>(
    source: &S,
    method: &Method,
    path: &str,
    peer: Peer,
) -> Response<Full<Bytes>> {
    if method != Method::GET && method != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
    }
    if peer.health_only && path != "/healthz" && path != "/readyz" {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "admin endpoint busy; only /healthz and /readyz are answered\n",
        );
    }
    // `/sessions` names clients, their certificates and users: the same peers as `/status`.
    if (path == "/status" || path == "/sessions") && !peer.status_allowed {
        return text(
            StatusCode::FORBIDDEN,
            &format!("{path} is served only to addresses in admin_status_from\n"),
        );
    }
    match path {
        "/metrics" => with_type(
            StatusCode::OK,
            source.metrics_text(),
            OPENMETRICS_CONTENT_TYPE,
        ),
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => match source.readiness() {
            Ok(()) => text(StatusCode::OK, "ready\n"),
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("not ready: {why}\n"),
            ),
        },
        "/status" => match serde_json::to_string_pretty(&source.status()) {
            Ok(mut body) => {
                body.push('\n');
                with_type(StatusCode::OK, body, "application/json")
            }
            Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "cannot encode status\n"),
        },
        "/sessions" => match serde_json::to_string_pretty(&Sessions {
            sessions: source.sessions(),
        }) {
            Ok(mut body) => {
                body.push('\n');
                with_type(StatusCode::OK, body, "application/json")
            }
            Err(_) => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "cannot encode sessions\n",
            ),
        },
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /metrics, /healthz, /readyz, /status or /sessions\n",
        ),
    }
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    with_type(status, body.to_owned(), "text/plain; charset=utf-8")
}

fn with_type(
    status: StatusCode,
    body: String,
    content_type: &'static str,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake {
        ready: bool,
    }

    impl AdminSource for Fake {
        fn metrics_text(&self) -> String {
            "# EOF\n".into()
        }
        fn readiness(&self) -> Result<(), &'static str> {
            if self.ready {
                Ok(())
            } else {
                Err("draining")
            }
        }
        fn sessions(&self) -> Vec<crate::sessions::SessionView> {
            Vec::new()
        }
        fn status(&self) -> Status {
            Status {
                version: "0".into(),
                ready: self.ready,
                draining: !self.ready,
                generation: 3,
                content_hash: "ab".into(),
                last_reload: LastReload {
                    at: OffsetDateTime::UNIX_EPOCH,
                    trigger: "watch".into(),
                    ok: false,
                    error: Some("f.yaml: rules[0].cidr: bad".into()),
                    last_success_at: None,
                    database_errors: BTreeMap::new(),
                },
                databases: BTreeMap::new(),
                source: None,
                handshake_throttle: None,
                renewal: None,
            }
        }
    }

    const ALL: Peer = Peer {
        status_allowed: true,
        health_only: false,
    };

    fn respond<S: AdminSource + ?Sized>(s: &S, m: &Method, path: &str) -> Response<Full<Bytes>> {
        super::respond(s, m, path, ALL)
    }

    #[test]
    fn routes_answer_with_the_right_codes_and_types() {
        let up = Fake { ready: true };
        let down = Fake { ready: false };
        let get = Method::GET;
        assert_eq!(respond(&up, &get, "/readyz").status(), StatusCode::OK);
        assert_eq!(
            respond(&down, &get, "/readyz").status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(respond(&down, &get, "/healthz").status(), StatusCode::OK);
        let m = respond(&up, &get, "/metrics");
        assert_eq!(m.headers()[CONTENT_TYPE], OPENMETRICS_CONTENT_TYPE);
        assert_eq!(respond(&up, &get, "/nope").status(), StatusCode::NOT_FOUND);
        assert_eq!(
            respond(&up, &Method::POST, "/status").status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
    }

    #[test]
    fn reserve_and_remote_peers_get_only_what_they_may() {
        let up = Fake { ready: true };
        let get = Method::GET;
        let reserve = Peer {
            status_allowed: true,
            health_only: true,
        };
        for path in ["/healthz", "/readyz"] {
            assert_eq!(
                super::respond(&up, &get, path, reserve).status(),
                StatusCode::OK
            );
        }
        for path in ["/metrics", "/status", "/sessions"] {
            assert_eq!(
                super::respond(&up, &get, path, reserve).status(),
                StatusCode::SERVICE_UNAVAILABLE
            );
        }
        let remote = Peer {
            status_allowed: false,
            health_only: false,
        };
        assert_eq!(
            super::respond(&up, &get, "/status", remote).status(),
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            super::respond(&up, &get, "/sessions", remote).status(),
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            super::respond(&up, &get, "/metrics", remote).status(),
            StatusCode::OK
        );
    }

    #[test]
    fn status_is_for_listed_and_same_host_peers() {
        let from = AdminOptions::default().status_from;
        let at = |s: &str| s.parse::<SocketAddr>().unwrap();
        let admin = Some(at("127.0.0.1:9480"));
        assert!(status_allowed(&from, at("127.0.0.1:5000"), admin));
        assert!(status_allowed(
            &from,
            at("[::1]:5000"),
            Some(at("[::1]:9480"))
        ));
        assert!(status_allowed(
            &from,
            at("[::ffff:127.0.0.1]:5000"),
            Some(at("[::]:9480"))
        ));
        assert!(!status_allowed(&from, at("127.0.0.2:5000"), admin));
        assert!(!status_allowed(
            &from,
            at("10.0.0.7:5000"),
            Some(at("10.0.0.5:9480"))
        ));
        // The CLI on the host of a proxy bound to a non-loopback address connects from it.
        assert!(status_allowed(
            &from,
            at("10.0.0.5:5000"),
            Some(at("10.0.0.5:9480"))
        ));
    }

    #[test]
    fn one_source_cannot_take_every_slot_and_the_reserve_is_for_many() {
        let slots = Arc::new(Slots::default());
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let held: Vec<Slot> = (0..MAX_PER_SOURCE)
            .map(|_| slots.admit(a).unwrap())
            .collect();
        assert_eq!(slots.admit(a).err(), Some(AdminRefusal::PerSourceLimit));
        // An IPv6 /64 counts as one source.
        let v6 = |s: &str| s.parse::<IpAddr>().unwrap();
        let six: Vec<Slot> = (0..MAX_PER_SOURCE)
            .map(|i| slots.admit(v6(&format!("2001:db8::{:x}", i + 1))).unwrap())
            .collect();
        assert_eq!(
            slots.admit(v6("2001:db8::ffff")).err(),
            Some(AdminRefusal::PerSourceLimit)
        );
        drop(held);
        drop(six);
        assert!(slots.inner.lock().unwrap().per_source.is_empty());
        // Fill the general lane from many sources; the next source gets the health reserve,
        // a few slots of it, and when the reserve is gone too, nothing.
        let mut all = Vec::new();
        for i in 0..MAX_CONNECTIONS {
            let ip: IpAddr = format!("10.1.{}.{}", i / 200, i % 200 + 1).parse().unwrap();
            all.push(slots.admit(ip).unwrap());
        }
        let b: IpAddr = "10.2.0.1".parse().unwrap();
        for _ in 0..HEALTH_RESERVE_PER_SOURCE {
            let s = slots.admit(b).unwrap();
            assert_eq!(s.lane, Lane::HealthOnly);
            all.push(s);
        }
        assert_eq!(slots.admit(b).err(), Some(AdminRefusal::PerSourceLimit));
        let mut i = 0;
        while slots.inner.lock().unwrap().reserve < HEALTH_RESERVE {
            i += 1;
            all.push(slots.admit(format!("10.3.0.{i}").parse().unwrap()).unwrap());
        }
        assert_eq!(
            slots.admit("10.4.0.1".parse().unwrap()).err(),
            Some(AdminRefusal::Capacity)
        );
        drop(all);
        let c = slots.inner.lock().unwrap();
        assert_eq!((c.general, c.reserve, c.per_source.len()), (0, 0, 0));
    }

    #[test]
    fn status_json_has_the_documented_shape_and_round_trips() {
        let s = Fake { ready: true }.status();
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["generation"], 3);
        assert_eq!(v["last_reload"]["at"], "1970-01-01T00:00:00Z");
        assert_eq!(v["last_reload"]["ok"], false);
        assert!(v["last_reload"]["last_success_at"].is_null());
        let back: Status = serde_json::from_value(v).unwrap();
        assert_eq!(back, s);
    }
}
