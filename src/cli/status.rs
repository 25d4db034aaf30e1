//! What a running proxy says it serves: `GET /status` on its admin endpoint -> [`ProxyView`],
//! which turns it into the status words the commands print. `Operational` and `Authorized`
//! come only from here; without a reachable proxy the words say so instead of guessing.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use serde::{Deserialize, Serialize};

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
    let shown = url.to_string();
    match tokio::time::timeout(timeout, fetch_inner(url)).await {
        Ok(r) => r,
        Err(_) => Err(StatusError::Timeout(shown, timeout)),
    }
}

async fn fetch_inner(url: &AdminUrl) -> Result<ProxyStatus, StatusError> {
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
    let req = hyper::Request::get(url.status_path())
        .header(hyper::header::HOST, url.authority())
        .header(hyper::header::ACCEPT, "application/json")
        .body(Empty::<Bytes>::new())
        .map_err(|e| http(&e))?;
    let resp = sender.send_request(req).await.map_err(|e| http(&e))?;
    if !resp.status().is_success() {
        driver.abort();
        return Err(StatusError::Status(shown, resp.status()));
    }
    let body = Limited::new(resp.into_body(), MAX_STATUS_BYTES)
        .collect()
        .await
        .map_err(|e| http(&e))?
        .to_bytes();
    driver.abort();
    serde_json::from_slice(&body).map_err(|e| StatusError::Json(shown, e))
}

/// What the CLI knows about the running proxy.
#[derive(Debug, Clone)]
pub enum ProxyView {
    Reachable { url: AdminUrl, status: ProxyStatus },
    Unreachable { reason: String },
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
        matches!(self, ProxyView::Reachable { .. })
    }

    pub fn database(&self, name: &str) -> Option<&DatabaseStatus> {
        match self {
            ProxyView::Reachable { status, .. } => status.databases.get(name),
            ProxyView::Unreachable { .. } => None,
        }
    }

    pub fn tls_status(&self, db: &str) -> TlsStatus {
        match self {
            ProxyView::Unreachable { .. } => TlsStatus::Unknown,
            ProxyView::Reachable { .. } => match self.database(db) {
                Some(d) if d.operational => TlsStatus::Operational,
                _ => TlsStatus::Provisioning,
            },
        }
    }

    pub fn rule_status(&self, db: &str, rule_id: &str) -> RuleStatus {
        match self {
            ProxyView::Unreachable { .. } => RuleStatus::Unknown,
            ProxyView::Reachable { .. } => match self.database(db) {
                Some(d) if d.operational && d.rules.iter().any(|r| r == rule_id) => {
                    RuleStatus::Authorized
                }
                _ => RuleStatus::Authorizing,
            },
        }
    }

    /// How the proxy sees a certificate: `None` when no proxy is reachable, else whether it is
    /// loaded and whether the proxy treats it as revoked.
    pub fn certificate(&self, db: &str, cert_id: &str) -> Option<CertificateSeen> {
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
            ProxyView::Unreachable { .. } => None,
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
        }
    }
}

/// A certificate as the proxy reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CertificateSeen {
    pub loaded: bool,
    pub revoked: bool,
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
            view.certificate("app", "c1"),
            Some(CertificateSeen {
                loaded: true,
                revoked: false
            })
        );
        assert_eq!(
            view.certificate("app", "c2"),
            Some(CertificateSeen {
                loaded: true,
                revoked: true
            })
        );
        assert_eq!(
            view.certificate("app", "c3"),
            Some(CertificateSeen {
                loaded: false,
                revoked: false
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
        assert_eq!(view.certificate("app", "c1"), None);
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
