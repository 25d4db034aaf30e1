//! `pgmtls.yaml`: settings of the process itself. Databases live in the state directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;

use super::yaml::{convert, ConfigErrors, Fields};

/// Default admin endpoint: loopback only, so metrics and status are never exposed by accident.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9480";

#[derive(Debug, Clone, PartialEq, Eq, Copy, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("must be text or json, not {other:?}")),
        }
    }
}

/// Validated process settings. Every field has a safe default except `state_dir`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Where the file was read from; `None` in quick mode.
    pub source: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    /// Serve the state of an etcd prefix instead of `state_dir` (exactly one of the two).
    pub etcd: Option<EtcdSettings>,
    /// `None` disables the admin endpoint.
    pub admin_listen: Option<SocketAddr>,
    pub timeouts: Timeouts,
    /// Sessions (connections past TLS) open at once, all databases together.
    pub max_connections: usize,
    /// Connections that have not finished TLS, all databases together.
    pub max_handshakes: usize,
    /// Connections that have not finished TLS from one client address (an IPv6 /64).
    pub max_handshakes_per_source: usize,
    /// Closing source prefixes that keep failing handshakes at accept (`handshake_throttle_*`).
    pub handshake_throttle: crate::throttle::ThrottleConfig,
    pub reload_poll_interval: Duration,
    pub enforce_on_live_sessions: bool,
    pub log_format: LogFormat,
    /// Data-plane threads; `None` means one fewer than the CPUs, at least one.
    pub worker_threads: Option<usize>,
    /// Load balancers whose connections open with a PROXY protocol header naming the client.
    pub proxy_protocol_from: Vec<IpNet>,
    /// Peers allowed the admin endpoint's `/status`; loopback by default.
    pub admin_status_from: Vec<IpNet>,
    /// This replica's place in a fleet (`replica_id` and the peer keys); `None`: one node.
    pub fleet: Option<crate::fleet::FleetConfig>,
    /// The one address serving every database with `listen: shared`, picked by SNI.
    pub shared_listen: Option<SocketAddr>,
    /// The shared-listener database a client without SNI, or with a name no database has,
    /// is served; `None` closes such connections.
    pub default_database: Option<String>,
    /// `console_tls`: the web console serves HTTPS with these files (read by `pgmtls
    /// console` only; the proxy never serves the console).
    pub console_tls: Option<ConsoleTlsPaths>,
    /// `console_token_file`: the console's login token, instead of a random one printed.
    pub console_token_file: Option<PathBuf>,
}

/// The `console_tls:` mapping, paths resolved against the config file's folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleTlsPaths {
    /// The console's certificate chain (PEM), leaf first.
    pub cert_file: PathBuf,
    /// Its private key (PEM), not readable by group or others.
    pub key_file: PathBuf,
    /// With it, a client certificate chained to this CA is required at the handshake and is
    /// the login (docs/CONSOLE.md).
    pub client_ca_file: Option<PathBuf>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConsoleTls {
    cert_file: String,
    key_file: String,
    #[serde(default)]
    client_ca_file: Option<String>,
}

/// Every key of the `console_tls:` mapping, for the docs check.
pub const CONSOLE_TLS_KEYS: &[&str] = &["cert_file", "key_file", "client_ca_file"];

/// The `etcd:` section: where a replica reads its state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdSettings {
    /// Client URLs, `http://HOST:PORT` or `https://HOST:PORT`.
    pub endpoints: Vec<String>,
    /// Key prefix of this installation, absolute, without a trailing `/`.
    pub prefix: String,
    pub user: Option<String>,
    /// File holding `user`'s password, resolved against the config file's folder.
    pub password_file: Option<PathBuf>,
    /// Lease TTL of this replica's registry entry (`PREFIX/replicas/ID`).
    pub registry_ttl: Duration,
    /// CA of etcd's server certificate, for `https://` endpoints.
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key, for an etcd with `--client-cert-auth`.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

impl EtcdSettings {
    /// Reads the TLS files; errors name the key and the file.
    pub fn tls(&self) -> Result<Option<crate::store::etcd::EtcdTls>, String> {
        let client = match (&self.cert_file, &self.key_file) {
            (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
            _ => None,
        };
        if self.ca_file.is_none() && client.is_none() {
            return Ok(None);
        }
        crate::store::etcd::EtcdTls::read(self.ca_file.as_deref(), client).map(Some)
    }
}

/// Every key of the `etcd:` section, for the docs check.
pub const ETCD_KEYS: &[&str] = &[
    "endpoints",
    "prefix",
    "user",
    "password_file",
    "registry_ttl",
    "ca_file",
    "cert_file",
    "key_file",
];

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEtcd {
    endpoints: Vec<String>,
    prefix: String,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    password_file: Option<String>,
    #[serde(default)]
    registry_ttl: Option<String>,
    #[serde(default)]
    ca_file: Option<String>,
    #[serde(default)]
    cert_file: Option<String>,
    #[serde(default)]
    key_file: Option<String>,
}

impl RawEtcd {
    /// Errors are `(key, message)`: `etcd` with the sub-key in the message, or the TLS key
    /// itself (`etcd.cert_file`) with the file in the message.
    fn check(self, base: &Path) -> Result<EtcdSettings, (String, String)> {
        let etcd = |m: String| ("etcd".to_string(), m);
        if self.endpoints.is_empty() {
            return Err(etcd("endpoints: give at least one etcd client URL".into()));
        }
        for e in &self.endpoints {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                return Err(etcd(format!(
                    "endpoints: {e:?} is not an http:// or https:// URL"
                )));
            }
        }
        let prefix = self.prefix.trim_end_matches('/').to_owned();
        if !prefix.starts_with('/') || prefix.len() < 2 {
            return Err(etcd(format!(
                "prefix: {:?} must be an absolute key prefix such as /pgmtls",
                self.prefix
            )));
        }
        if self.user.is_some() != self.password_file.is_some() {
            return Err(etcd("user and password_file go together".into()));
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            let missing = if self.cert_file.is_some() {
                "key_file"
            } else {
                "cert_file"
            };
            return Err((
                format!("etcd.{missing}"),
                "cert_file and key_file go together (the client certificate and its key)".into(),
            ));
        }
        let https = self
            .endpoints
            .iter()
            .filter(|e| e.starts_with("https://"))
            .count();
        let tls_given = self.ca_file.is_some() || self.cert_file.is_some();
        // The client speaks TLS to every endpoint or to none.
        if https > 0 && https < self.endpoints.len() {
            return Err(etcd(
                "endpoints: give all https:// or all http:// URLs, not a mix".into(),
            ));
        }
        if tls_given && https == 0 {
            let key = if self.ca_file.is_some() {
                "etcd.ca_file"
            } else {
                "etcd.cert_file"
            };
            return Err((
                key.into(),
                "TLS settings need https:// endpoints; these are http://".into(),
            ));
        }
        if https > 0 && self.ca_file.is_none() {
            return Err((
                "etcd.ca_file".into(),
                "https:// endpoints need the CA that signed etcd's server certificate".into(),
            ));
        }
        let registry_ttl = match &self.registry_ttl {
            None => crate::fleet::registry::DEFAULT_TTL,
            Some(s) => {
                let d = humantime::parse_duration(s)
                    .map_err(|e| etcd(format!("registry_ttl: invalid duration {s:?}: {e}")))?;
                // etcd leases count whole seconds.
                if d < Duration::from_secs(1) || d.subsec_nanos() != 0 {
                    return Err(etcd(format!(
                        "registry_ttl: {s:?}: give whole seconds, at least 1s"
                    )));
                }
                d
            }
        };
        let settings = EtcdSettings {
            endpoints: self.endpoints,
            prefix,
            user: self.user,
            password_file: self.password_file.map(|p| base.join(p)),
            registry_ttl,
            ca_file: self.ca_file.map(|p| base.join(p)),
            cert_file: self.cert_file.map(|p| base.join(p)),
            key_file: self.key_file.map(|p| base.join(p)),
        };
        // A missing or unreadable file is found now, not at the first connection.
        settings.tls().map_err(|m| {
            let key = m.split(':').next().unwrap_or("etcd").to_owned();
            let message = m[key.len()..]
                .trim_start_matches(':')
                .trim_start()
                .to_owned();
            (key, message)
        })?;
        Ok(settings)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// From accept to the end of the client's StartupMessage inside TLS.
    pub handshake: Duration,
    /// TCP connect plus upstream TLS handshake.
    pub upstream_connect: Duration,
    /// From the upstream dial to the upstream's first ReadyForQuery: the authentication
    /// exchange. Postgres' own `authentication_timeout` is longer and the proxy holds a
    /// connection slot meanwhile.
    pub auth: Duration,
    /// How long live sessions may run after SIGTERM before they are closed.
    pub shutdown_grace: Duration,
    /// Dead-peer detection on client and upstream TCP sockets.
    pub keepalive: Keepalive,
}

/// TCP keepalive and `TCP_USER_TIMEOUT` on every client and upstream TCP socket, modelled on
/// Postgres' `tcp_keepalives_*` and `tcp_user_timeout`: without them a client that vanishes
/// without a FIN or RST (a dead host, a cut link, a NAT that forgot the flow) keeps its
/// session slot and its Postgres backend, with any locks it holds, for ever.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    /// Idle time before the first probe; `None` turns keepalive off.
    pub idle: Option<Duration>,
    pub interval: Duration,
    /// Unanswered probes before the connection is dropped.
    pub count: u32,
    /// How long sent data (probes included) may stay unacknowledged; `None` is off.
    pub user_timeout: Option<Duration>,
}

/// Linux caps `TCP_KEEPIDLE` and `TCP_KEEPINTVL` at this many seconds.
pub const MAX_KEEPALIVE_SECS: u64 = 32_767;
/// Linux caps `TCP_KEEPCNT` at this.
pub const MAX_KEEPALIVE_COUNT: u32 = 127;

impl Keepalive {
    /// With `user_timeout` not given, a dead peer is declared after the last probe goes
    /// unanswered: idle + interval * count, so both mechanisms agree.
    pub fn new(
        idle: Option<Duration>,
        interval: Duration,
        count: u32,
        user_timeout: Option<Option<Duration>>,
    ) -> Keepalive {
        let derived = idle.map(|i| i + interval * count);
        Keepalive {
            idle,
            interval,
            count,
            user_timeout: user_timeout.unwrap_or(derived),
        }
    }
}

impl Default for Keepalive {
    fn default() -> Self {
        Keepalive::new(
            Some(Duration::from_secs(60)),
            Duration::from_secs(10),
            6,
            None,
        )
    }
}

/// `tcp_keepalives_idle` / `_interval`: whole seconds, within what the kernel accepts.
pub fn keepalive_seconds(d: Duration) -> Result<Duration, String> {
    if d.subsec_nanos() != 0 || d.as_secs() == 0 || d.as_secs() > MAX_KEEPALIVE_SECS {
        return Err(format!(
            "must be whole seconds from 1s to {MAX_KEEPALIVE_SECS}s, not {}",
            humantime::format_duration(d)
        ));
    }
    Ok(d)
}

/// `tcp_keepalives_count`.
pub fn keepalive_count(n: usize) -> Result<u32, String> {
    match u32::try_from(n) {
        Ok(n) if (1..=MAX_KEEPALIVE_COUNT).contains(&n) => Ok(n),
        _ => Err(format!("must be from 1 to {MAX_KEEPALIVE_COUNT}")),
    }
}

/// `tcp_user_timeout`: milliseconds in a 32-bit kernel field.
pub fn user_timeout(d: Duration) -> Result<Duration, String> {
    if d.as_millis() == 0 || d.as_millis() > u128::from(u32::MAX) {
        return Err("must be from 1ms to about 49 days".into());
    }
    Ok(d)
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            handshake: Duration::from_secs(10),
            upstream_connect: Duration::from_secs(5),
            auth: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(30),
            keepalive: Keepalive::default(),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            source: None,
            state_dir: None,
            etcd: None,
            admin_listen: DEFAULT_ADMIN_LISTEN.parse().ok(),
            timeouts: Timeouts::default(),
            max_connections: 10_000,
            // About 69 KiB each while a large ClientHello is half sent (docs/CONFIG.md), so
            // at most ~70 MiB held by peers that have shown no certificate.
            max_handshakes: 1_000,
            max_handshakes_per_source: 16,
            handshake_throttle: crate::throttle::ThrottleConfig::default(),
            reload_poll_interval: Duration::from_secs(30),
            enforce_on_live_sessions: true,
            log_format: LogFormat::Text,
            worker_threads: None,
            proxy_protocol_from: Vec::new(),
            admin_status_from: crate::admin::AdminOptions::default().status_from,
            fleet: None,
            shared_listen: None,
            default_database: None,
            console_tls: None,
            console_token_file: None,
        }
    }
}

/// Every key `pgmtls.yaml` accepts, for the docs check.
pub const KEYS: &[&str] = &[
    "state_dir",
    "etcd",
    "admin_listen",
    "handshake_timeout",
    "upstream_connect_timeout",
    "auth_timeout",
    "shutdown_grace",
    "max_connections",
    "max_handshakes",
    "max_handshakes_per_source",
    "handshake_throttle_burst",
    "handshake_throttle_backoff",
    "handshake_throttle_max_backoff",
    "handshake_throttle_decay",
    "handshake_throttle_prefixes",
    "tcp_keepalives_idle",
    "tcp_keepalives_interval",
    "tcp_keepalives_count",
    "tcp_user_timeout",
    "reload_poll_interval",
    "enforce_on_live_sessions",
    "log_format",
    "worker_threads",
    "proxy_protocol_from",
    "admin_status_from",
    "replica_id",
    "peer_listen",
    "peers",
    "peer_tls",
    "shared_listen",
    "default_database",
    "console_tls",
    "console_token_file",
];

impl Config {
    /// Reads and validates a config file; relative paths are resolved against its directory.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors::one(path, "", None, format!("cannot read config file: {e}"))
        })?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigErrors> {
        let mut f = Fields::parse(path, text)?;
        let d = Config::default();
        let base = path.parent().unwrap_or(Path::new("."));
        let state_dir = f
            .optional_with("state_dir", convert::string)
            .map(|s| base.join(s));
        let etcd = f.optional::<RawEtcd>("etcd").and_then(|raw| {
            raw.check(base)
                .map_err(|(key, m)| {
                    let line = f.line_of("etcd");
                    f.push(&key, line, m);
                })
                .ok()
        });
        let has_etcd = f.line_of("etcd").is_some();
        match (&state_dir, f.line_of("etcd")) {
            (None, None) => f.push("state_dir", None, "is required"),
            (Some(_), Some(line)) => f.push(
                "etcd",
                Some(line),
                "give state_dir or etcd, not both: the state is served from one of them",
            ),
            _ => {}
        }
        let admin_listen = match f.optional_with("admin_listen", convert::string) {
            None => d.admin_listen,
            Some(s) if s == "off" => None,
            Some(s) => match s.parse::<SocketAddr>() {
                Ok(a) => Some(a),
                Err(_) => {
                    let line = f.line_of("admin_listen");
                    f.push(
                        "admin_listen",
                        line,
                        format!("invalid address {s:?}: expected IP:PORT or \"off\""),
                    );
                    None
                }
            },
        };
        let timeouts = Timeouts {
            handshake: f
                .optional_with("handshake_timeout", convert::duration)
                .unwrap_or(d.timeouts.handshake),
            upstream_connect: f
                .optional_with("upstream_connect_timeout", convert::duration)
                .unwrap_or(d.timeouts.upstream_connect),
            auth: f
                .optional_with("auth_timeout", convert::duration)
                .unwrap_or(d.timeouts.auth),
            shutdown_grace: f
                .optional_with("shutdown_grace", convert::duration)
                .unwrap_or(d.timeouts.shutdown_grace),
            keepalive: {
                let dk = d.timeouts.keepalive;
                let idle = f
                    .optional_with("tcp_keepalives_idle", |v| {
                        convert::duration_or_off(v)?
                            .map(keepalive_seconds)
                            .transpose()
                    })
                    .unwrap_or(dk.idle);
                let interval = f
                    .optional_with("tcp_keepalives_interval", |v| {
                        keepalive_seconds(convert::duration(v)?)
                    })
                    .unwrap_or(dk.interval);
                let count = f
                    .optional_with("tcp_keepalives_count", |v| {
                        keepalive_count(convert::positive_usize(v)?)
                    })
                    .unwrap_or(dk.count);
                let user = f.optional_with("tcp_user_timeout", |v| {
                    convert::duration_or_off(v)?.map(user_timeout).transpose()
                });
                Keepalive::new(idle, interval, count, user)
            },
        };
        let cfg = Config {
            source: Some(path.to_path_buf()),
            state_dir,
            etcd,
            admin_listen,
            timeouts,
            max_connections: f
                .optional_with("max_connections", convert::positive_usize)
                .unwrap_or(d.max_connections),
            max_handshakes: f
                .optional_with("max_handshakes", convert::positive_usize)
                .unwrap_or(d.max_handshakes),
            max_handshakes_per_source: f
                .optional_with("max_handshakes_per_source", convert::positive_usize)
                .unwrap_or(d.max_handshakes_per_source),
            handshake_throttle: {
                let dt = d.handshake_throttle;
                crate::throttle::ThrottleConfig {
                    burst: f
                        .optional_with("handshake_throttle_burst", |v| {
                            // YAML 1.1 reads a bare `off` as false.
                            if v.as_str() == Some("off") || v.as_bool() == Some(false) {
                                return Ok(None);
                            }
                            convert::positive_u32(v)
                                .map(Some)
                                .map_err(|_| "must be a positive integer or off".to_string())
                        })
                        .unwrap_or(dt.burst),
                    backoff: f
                        .optional_with("handshake_throttle_backoff", convert::duration)
                        .unwrap_or(dt.backoff),
                    max_backoff: f
                        .optional_with("handshake_throttle_max_backoff", convert::duration)
                        .unwrap_or(dt.max_backoff),
                    decay: f
                        .optional_with("handshake_throttle_decay", convert::duration)
                        .unwrap_or(dt.decay),
                    max_prefixes: f
                        .optional_with("handshake_throttle_prefixes", convert::positive_usize)
                        .unwrap_or(dt.max_prefixes),
                }
            },
            reload_poll_interval: f
                .optional_with("reload_poll_interval", convert::duration)
                .unwrap_or(d.reload_poll_interval),
            enforce_on_live_sessions: f
                .optional_with("enforce_on_live_sessions", convert::bool)
                .unwrap_or(d.enforce_on_live_sessions),
            log_format: f
                .optional_with("log_format", |v| convert::string(v)?.parse())
                .unwrap_or_default(),
            worker_threads: f.optional_with("worker_threads", convert::positive_usize),
            proxy_protocol_from: f
                .optional_with("proxy_protocol_from", convert::cidr_list)
                .unwrap_or_default(),
            admin_status_from: f
                .optional_with("admin_status_from", convert::cidr_list)
                .unwrap_or(d.admin_status_from),
            fleet: crate::fleet::config::take(&mut f, base, has_etcd),
            shared_listen: f.optional_with("shared_listen", convert::socket_addr),
            default_database: f.optional_with("default_database", |v| {
                let name = convert::string(v)?;
                crate::state::validate_database_name(&name)?;
                Ok(name)
            }),
            console_tls: f.optional_with("console_tls", |v| {
                let raw: RawConsoleTls = serde_json::from_value(v).map_err(|e| {
                    format!("must be a mapping with cert_file, key_file and optionally client_ca_file: {e}")
                })?;
                Ok(ConsoleTlsPaths {
                    cert_file: base.join(raw.cert_file),
                    key_file: base.join(raw.key_file),
                    client_ca_file: raw.client_ca_file.map(|c| base.join(c)),
                })
            }),
            console_token_file: f
                .optional_with("console_token_file", convert::string)
                .map(|s| base.join(s)),
        };
        f.finish().into_result(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etcd_tls_keys_are_checked_at_load_and_errors_name_the_key_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let ca = rcgen::generate_simple_self_signed(vec!["etcd".into()]).unwrap();
        let cert_pem = ca.cert.pem();
        let key_pem = ca.signing_key.serialize_pem();
        std::fs::write(dir.path().join("ca.pem"), &cert_pem).unwrap();
        std::fs::write(dir.path().join("c.pem"), &cert_pem).unwrap();
        std::fs::write(dir.path().join("k.pem"), &key_pem).unwrap();
        let file = dir.path().join("p.yaml");
        let parse = |endpoints: &str, extra: &str| {
            Config::parse(
                &file,
                &format!("etcd:\n  endpoints: [{endpoints}]\n  prefix: /p\n{extra}"),
            )
            .map_err(|e| e.to_string())
        };
        let tls = "  ca_file: ca.pem\n  cert_file: c.pem\n  key_file: k.pem\n";
        let ok = parse("https://a:1, https://b:1", tls)
            .unwrap()
            .etcd
            .unwrap();
        assert_eq!(ok.cert_file, Some(dir.path().join("c.pem")));
        let read = ok.tls().unwrap().unwrap();
        assert!(read.ca_pem.is_some() && read.identity.is_some());
        // A server CA alone: etcd without client-certificate authentication.
        let ca_only = parse("https://a:1", "  ca_file: ca.pem\n").unwrap();
        assert!(ca_only
            .etcd
            .unwrap()
            .tls()
            .unwrap()
            .unwrap()
            .identity
            .is_none());
        let cases = [
            (
                "https://a:1",
                "",
                "etcd.ca_file: https:// endpoints need the CA",
            ),
            (
                "http://a:1",
                tls,
                "etcd.ca_file: TLS settings need https://",
            ),
            ("https://a:1, http://b:1", tls, "not a mix"),
            (
                "https://a:1",
                "  ca_file: ca.pem\n  cert_file: c.pem\n",
                "etcd.key_file: cert_file and key_file go together",
            ),
            ("https://a:1", "  ca_file: gone.pem\n", "etcd.ca_file: "),
            (
                "https://a:1",
                "  ca_file: ca.pem\n  cert_file: k.pem\n  key_file: k.pem\n",
                "etcd.cert_file: ",
            ),
            (
                "https://a:1",
                "  ca_file: ca.pem\n  cert_file: c.pem\n  key_file: c.pem\n",
                "etcd.key_file: ",
            ),
        ];
        for (endpoints, extra, want) in cases {
            let err = parse(endpoints, extra).unwrap_err();
            assert!(err.contains(want), "{endpoints} {extra:?}: {err}");
        }
        let err = parse("https://a:1", "  ca_file: gone.pem\n").unwrap_err();
        let gone = dir.path().join("gone.pem").display().to_string();
        assert!(
            err.contains(&format!("etcd.ca_file: {gone}: cannot read")),
            "{err}"
        );
        let err = parse(
            "https://a:1",
            "  ca_file: ca.pem\n  cert_file: k.pem\n  key_file: k.pem\n",
        )
        .unwrap_err();
        assert!(err.contains("no PEM certificate"), "{err}");
    }

    #[test]
    fn in_etcd_mode_a_replica_needs_no_peers_list_but_an_address_others_can_dial() {
        let fleet = "replica_id: 2\npeer_tls: {cert: c, key: k, ca: a}\n";
        let etcd = "etcd:\n  endpoints: [http://a:1]\n  prefix: /p\n";
        let parse =
            |text: String| Config::parse(Path::new("p.yaml"), &text).map_err(|e| e.to_string());
        let c = parse(format!("{etcd}{fleet}peer_listen: 10.0.0.2:6433\n")).unwrap();
        assert!(c.fleet.unwrap().peers.is_empty());
        let err = parse(format!("{etcd}{fleet}peer_listen: 0.0.0.0:6433\n")).unwrap_err();
        assert!(
            err.contains("peer_listen: 0.0.0.0:6433: the replica registry advertises"),
            "{err}"
        );
        // With every replica listed the registry's address is not used.
        let listed = format!(
            "{etcd}{fleet}peer_listen: 0.0.0.0:6433\npeers: [{{id: 1, addr: \"10.0.0.1:6433\"}}]\n"
        );
        assert_eq!(parse(listed).unwrap().fleet.unwrap().peers.len(), 1);
        // A state directory has no registry: the list is required.
        let err = parse(format!("state_dir: s\n{fleet}peer_listen: 10.0.0.2:6433\n")).unwrap_err();
        assert!(
            err.contains("needs peer_listen, peers and peer_tls"),
            "{err}"
        );
    }

    #[test]
    fn registry_ttl_defaults_and_refuses_less_than_a_whole_second() {
        let parse = |extra: &str| {
            Config::parse(
                Path::new("p.yaml"),
                &format!("etcd:\n  endpoints: [http://a:1]\n  prefix: /p\n{extra}"),
            )
        };
        let d = parse("").unwrap().etcd.unwrap();
        assert_eq!(d.registry_ttl, crate::fleet::registry::DEFAULT_TTL);
        let two = parse("  registry_ttl: 2s\n").unwrap().etcd.unwrap();
        assert_eq!(two.registry_ttl, Duration::from_secs(2));
        for bad in ["500ms", "1500ms", "soon"] {
            let err = parse(&format!("  registry_ttl: {bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("p.yaml:1: etcd: registry_ttl:"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn etcd_replaces_state_dir_and_is_checked() {
        let c = Config::parse(
            Path::new("/etc/pgmtls/p.yaml"),
            "etcd:\n  endpoints: [http://10.0.0.7:2379]\n  prefix: /pgmtls/\n  user: proxy\n  password_file: etcd.pw\n",
        )
        .unwrap();
        let e = c.etcd.unwrap();
        assert_eq!(e.prefix, "/pgmtls");
        assert_eq!(e.password_file, Some(PathBuf::from("/etc/pgmtls/etcd.pw")));
        assert_eq!(c.state_dir, None);
        let both = Config::parse(
            Path::new("p.yaml"),
            "state_dir: s\netcd:\n  endpoints: [http://a:1]\n  prefix: /p\n",
        )
        .unwrap_err();
        assert!(
            both.to_string()
                .contains("p.yaml:2: etcd: give state_dir or etcd, not both"),
            "{both}"
        );
        let bad = Config::parse(
            Path::new("p.yaml"),
            "etcd:\n  endpoints: [a:1]\n  prefix: p\n",
        )
        .unwrap_err();
        assert!(
            bad.to_string()
                .contains("p.yaml:1: etcd: endpoints: \"a:1\" is not"),
            "{bad}"
        );
    }

    #[test]
    fn handshake_throttle_keys_parse_and_refuse_bad_values() {
        let c = Config::parse(Path::new("p.yaml"), "state_dir: s\n").unwrap();
        assert_eq!(
            c.handshake_throttle,
            crate::throttle::ThrottleConfig::default()
        );
        let c = Config::parse(
            Path::new("p.yaml"),
            "state_dir: s\nhandshake_throttle_burst: 5\nhandshake_throttle_backoff: 2s\n\
             handshake_throttle_max_backoff: 1m\nhandshake_throttle_decay: 10s\n\
             handshake_throttle_prefixes: 100\n",
        )
        .unwrap();
        let t = c.handshake_throttle;
        assert_eq!(t.burst, Some(5));
        assert_eq!(
            (t.backoff, t.max_backoff, t.decay, t.max_prefixes),
            (
                Duration::from_secs(2),
                Duration::from_secs(60),
                Duration::from_secs(10),
                100
            )
        );
        for off in ["off", "\"off\""] {
            let text = format!("state_dir: s\nhandshake_throttle_burst: {off}\n");
            let c = Config::parse(Path::new("p.yaml"), &text).unwrap();
            assert_eq!(c.handshake_throttle.burst, None, "{off}");
        }
        for (bad, want) in [
            (
                "handshake_throttle_burst: 0",
                "p.yaml:2: handshake_throttle_burst: must be a positive integer or off",
            ),
            (
                "handshake_throttle_backoff: soon",
                "p.yaml:2: handshake_throttle_backoff: invalid duration",
            ),
            (
                "handshake_throttle_prefixes: -1",
                "p.yaml:2: handshake_throttle_prefixes: must be a positive integer",
            ),
        ] {
            let e = Config::parse(Path::new("p.yaml"), &format!("state_dir: s\n{bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{bad}: {e}");
        }
    }

    #[test]
    fn minimal_file_takes_safe_defaults() {
        let c = Config::parse(Path::new("/etc/pgmtls/p.yaml"), "state_dir: state\n").unwrap();
        assert_eq!(c.state_dir, Some(PathBuf::from("/etc/pgmtls/state")));
        assert!(c.admin_listen.is_some_and(|a| a.ip().is_loopback()));
        assert!(
            c.admin_status_from.len() == 2
                && c.admin_status_from.iter().all(|n| n.addr().is_loopback())
        );
        assert_eq!(c.timeouts, Timeouts::default());
        assert!(c.enforce_on_live_sessions);
    }

    #[test]
    fn all_keys_parse() {
        let text = "state_dir: /var/lib/pgmtls\nadmin_listen: \"off\"\nhandshake_timeout: 3s\n\
                    upstream_connect_timeout: 1s\nauth_timeout: 7s\nshutdown_grace: 1m\nmax_connections: 50\n\
                    reload_poll_interval: 5s\nenforce_on_live_sessions: false\nlog_format: json\n\
                    worker_threads: 1\nproxy_protocol_from: [10.0.0.0/16, \"2001:db8::/48\"]\n\
                    max_handshakes: 7\nmax_handshakes_per_source: 3\ntcp_keepalives_idle: 30s\n\
                    tcp_keepalives_interval: 5s\ntcp_keepalives_count: 4\ntcp_user_timeout: 45s\n\
                    admin_status_from: [10.0.0.0/24]\nreplica_id: 2\npeer_listen: 10.0.0.2:6433\n\
                    peers: [{id: 1, addr: \"10.0.0.1:6433\"}, {id: 3, addr: \"10.0.0.3:6433\", name: r3.example}]\n\
                    peer_tls: {cert: peer.crt, key: peer.key, ca: /etc/peer-ca.crt}\n\
                    shared_listen: 0.0.0.0:5432\ndefault_database: orders\n\
                    console_tls: {cert_file: c.crt, key_file: /k.key, client_ca_file: ops.crt}\n\
                    console_token_file: token\nhandshake_throttle_burst: 9\n\
                    handshake_throttle_backoff: 3s\nhandshake_throttle_max_backoff: 2m\n\
                    handshake_throttle_decay: 20s\nhandshake_throttle_prefixes: 64\n";
        let c = Config::parse(Path::new("/etc/p.yaml"), text).unwrap();
        let tls = c.console_tls.clone().unwrap();
        assert_eq!(tls.cert_file, PathBuf::from("/etc/c.crt"));
        assert_eq!(tls.key_file, PathBuf::from("/k.key"));
        assert_eq!(tls.client_ca_file, Some(PathBuf::from("/etc/ops.crt")));
        assert_eq!(c.console_token_file, Some(PathBuf::from("/etc/token")));
        assert_eq!(c.shared_listen, Some("0.0.0.0:5432".parse().unwrap()));
        assert_eq!(c.default_database.as_deref(), Some("orders"));
        let fleet = c.fleet.clone().unwrap();
        assert_eq!(fleet.replica_id, 2);
        assert_eq!(fleet.peers.len(), 2);
        assert_eq!(fleet.peers[0].name, "10.0.0.1");
        assert_eq!(fleet.peers[1].name, "r3.example");
        assert_eq!(fleet.tls.ca, PathBuf::from("/etc/peer-ca.crt"));
        assert_eq!(c.admin_listen, None);
        assert_eq!(c.timeouts.shutdown_grace, Duration::from_secs(60));
        assert_eq!(c.timeouts.auth, Duration::from_secs(7));
        assert_eq!(c.max_connections, 50);
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.worker_threads, Some(1));
        assert_eq!(c.proxy_protocol_from.len(), 2);
        assert_eq!(
            c.admin_status_from,
            ["10.0.0.0/24".parse::<IpNet>().unwrap()]
        );
        assert!(!c.enforce_on_live_sessions);
        assert_eq!((c.max_handshakes, c.max_handshakes_per_source), (7, 3));
        let t = c.handshake_throttle;
        assert_eq!((t.burst, t.max_prefixes), (Some(9), 64));
        assert_eq!(
            (t.backoff, t.max_backoff, t.decay),
            (
                Duration::from_secs(3),
                Duration::from_secs(120),
                Duration::from_secs(20)
            )
        );
        let k = c.timeouts.keepalive;
        assert_eq!(k.idle, Some(Duration::from_secs(30)));
        assert_eq!(k.interval, Duration::from_secs(5));
        assert_eq!(k.count, 4);
        assert_eq!(k.user_timeout, Some(Duration::from_secs(45)));
        for key in KEYS {
            // `etcd` excludes `state_dir`: it has its own test.
            if *key == "etcd" {
                continue;
            }
            assert!(text.contains(&format!("{key}:")), "{key} untested");
        }
    }

    #[test]
    fn keepalive_is_on_by_default_and_can_be_turned_off() {
        let k = Keepalive::default();
        assert_eq!(k.idle, Some(Duration::from_secs(60)));
        assert_eq!(k.user_timeout, Some(Duration::from_secs(120)));
        let c = Config::parse(
            Path::new("p.yaml"),
            "state_dir: s\ntcp_keepalives_idle: 10s\ntcp_keepalives_interval: 2s\n",
        )
        .unwrap();
        // Not given: the user timeout follows the probes.
        assert_eq!(
            c.timeouts.keepalive.user_timeout,
            Some(Duration::from_secs(22))
        );
        let c = Config::parse(
            Path::new("p.yaml"),
            "state_dir: s\ntcp_keepalives_idle: \"off\"\ntcp_user_timeout: 0\n",
        )
        .unwrap();
        assert_eq!(c.timeouts.keepalive.idle, None);
        assert_eq!(c.timeouts.keepalive.user_timeout, None);
    }

    #[test]
    fn keepalive_values_the_kernel_would_refuse_name_their_key() {
        for (line, needle) in [
            (
                "tcp_keepalives_idle: 500ms",
                "p.yaml:2: tcp_keepalives_idle: must be whole seconds",
            ),
            (
                "tcp_keepalives_interval: 10h",
                "p.yaml:2: tcp_keepalives_interval: must be whole seconds",
            ),
            (
                "tcp_keepalives_count: 200",
                "p.yaml:2: tcp_keepalives_count: must be from 1 to 127",
            ),
            (
                "tcp_user_timeout: soon",
                "p.yaml:2: tcp_user_timeout: invalid duration",
            ),
            (
                "max_handshakes: 0",
                "p.yaml:2: max_handshakes: must be a positive integer",
            ),
        ] {
            let s = Config::parse(Path::new("p.yaml"), &format!("state_dir: s\n{line}\n"))
                .unwrap_err()
                .to_string();
            assert!(s.contains(needle), "{line}: {s}");
        }
    }

    #[test]
    fn fleet_keys_are_checked_and_name_their_key() {
        let ok = "peer_listen: 127.0.0.1:1\npeers: [{id: 1, addr: \"127.0.0.1:2\"}]\n\
                  peer_tls: {cert: c, key: k, ca: a}\n";
        let single = Config::parse(Path::new("p.yaml"), "state_dir: s\n").unwrap();
        assert_eq!(single.fleet, None);
        let zero = Config::parse(Path::new("p.yaml"), "state_dir: s\nreplica_id: 0\n").unwrap();
        assert_eq!(zero.fleet, None);
        for (text, needle) in [
            (
                "replica_id: 256\n".to_string(),
                "p.yaml:2: replica_id: must be an integer from 0",
            ),
            (
                "replica_id: 2\n".into(),
                "replica_id: a replica of a fleet needs peer_listen",
            ),
            (
                format!("replica_id: 1\n{ok}"),
                "peers: peer id 1 is this replica's own",
            ),
            (ok.to_string(), "peer_listen: needs a replica_id"),
            (
                "replica_id: 2\npeers: [{id: 1, addr: nowhere}]\n".into(),
                "p.yaml:3: peers: peer 1: invalid address",
            ),
            (
                "replica_id: 2\npeers: [{id: 1, addr: \"127.0.0.1:2\", name: \"a b\"}]\n".into(),
                "p.yaml:3: peers: peer 1: name \"a b\" is not a DNS name",
            ),
            (
                "replica_id: 2\npeers: [{id: 0, addr: \"127.0.0.1:2\"}]\n".into(),
                "peers: peer id 0 is not a replica id",
            ),
            (
                "replica_id: 2\npeers: [{id: 1, addr: \"127.0.0.1:2\", port: 3}]\n".into(),
                "p.yaml:3: peers: must be a list of",
            ),
            (
                "replica_id: 2\npeer_tls: {cert: c}\n".into(),
                "p.yaml:3: peer_tls: must be a mapping with cert, key and ca",
            ),
            (
                "replica_id: 3\npeer_listen: 127.0.0.1:1\npeer_tls: {cert: c, key: k, ca: a}\n\
                 peers: [{id: 1, addr: \"127.0.0.1:2\"}, {id: 1, addr: \"127.0.0.1:3\"}]\n"
                    .into(),
                "peers: peer id 1 is listed twice",
            ),
        ] {
            let s = Config::parse(Path::new("p.yaml"), &format!("state_dir: s\n{text}"))
                .unwrap_err()
                .to_string();
            assert!(s.contains(needle), "{text}: {s}");
        }
    }

    #[test]
    fn proxy_protocol_sources_are_checked_like_ip_rules() {
        for (value, needle) in [
            ("[10.0.0.1/8]", "host bits set"),
            ("[everyone]", "is not a CIDR block"),
            ("[10]", "must be a list of CIDR strings"),
        ] {
            let text = format!("state_dir: s\nproxy_protocol_from: {value}\n");
            let s = Config::parse(Path::new("p.yaml"), &text)
                .unwrap_err()
                .to_string();
            assert!(s.contains("p.yaml:2: proxy_protocol_from"), "{s}");
            assert!(s.contains(needle), "{value}: {s}");
        }
    }

    #[test]
    fn bad_values_are_all_reported() {
        let text = "handshake_timeout: soon\nmax_connections: -1\nadmin_listen: nowhere\nlog_format: xml\nextra: 1\n\
                    proxy_protocol_from: 10.0.0.0/8\n";
        let errs = Config::parse(Path::new("p.yaml"), text).unwrap_err();
        let s = errs.to_string();
        assert_eq!(errs.0.len(), 7, "{s}");
        for needle in [
            "p.yaml: state_dir: is required",
            "p.yaml:1: handshake_timeout",
            "p.yaml:2: max_connections",
            "p.yaml:3: admin_listen",
            "p.yaml:4: log_format",
            "p.yaml:5: extra: unknown key",
            "p.yaml:6: proxy_protocol_from: must be a list",
        ] {
            assert!(s.contains(needle), "missing {needle:?} in\n{s}");
        }
    }
}
