//! Loopback HTTP for operators and the CLI: receives the application as an [`AdminSource`] and
//! serves `/metrics` (OpenMetrics text), `/healthz`, `/readyz` and `/status` (JSON, the
//! [`Status`] contract documented in docs/METRICS.md).
//!
//! Three or four read-only routes do not need a framework: plain hyper 1, one task per
//! connection, a cap on concurrent connections and a header deadline so a stuck client cannot
//! pin resources. Nothing here reads files or mutates state.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use crate::snapshot::Snapshot;

/// The content type Prometheus negotiates for the OpenMetrics text format.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// At most this many admin connections at once; more wait in the kernel backlog.
const MAX_CONNECTIONS: usize = 64;
/// A client must send its request headers within this time.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// And the whole exchange must be over within this time.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// What the admin endpoint reads from the running application.
pub trait AdminSource: Send + Sync + 'static {
    /// The OpenMetrics text exposition.
    fn metrics_text(&self) -> String;
    /// `Ok` when the process should receive traffic; otherwise why not.
    fn readiness(&self) -> Result<(), &'static str>;
    fn status(&self) -> Status;
}

/// `/status`. Field names are a contract with the CLI and with scripts: add fields, never
/// rename or remove them.
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
            listen: bound.unwrap_or(db.settings.listen).to_string(),
            rules: db.rules.iter().map(|r| r.id.clone()).collect(),
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
pub fn spawn<S: AdminSource>(listener: TcpListener, source: Arc<S>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        loop {
            let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
                return;
            };
            let (stream, _) = match listener.accept().await {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed; backing off");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let source = Arc::clone(&source);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let source = Arc::clone(&source);
                    async move { Ok::<_, Infallible>(route(&*source, &req)) }
                });
                let mut builder = hyper::server::conn::http1::Builder::new();
                builder
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .keep_alive(true);
                let conn = builder.serve_connection(TokioIo::new(stream), service);
                let _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn).await;
                drop(permit);
            });
        }
    })
}

/// Maps one request to its response. Public for tests that exercise routing without sockets.
pub fn route<S: AdminSource + ?Sized>(
    source: &S,
    req: &Request<Incoming>,
) -> Response<Full<Bytes>> {
    respond(source, req.method(), req.uri().path())
}

fn respond<S: AdminSource + ?Sized>(
    source: &S,
    method: &Method,
    path: &str,
) -> Response<Full<Bytes>> {
    if method != Method::GET && method != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
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
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /metrics, /healthz, /readyz or /status\n",
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
            }
        }
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
