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
    /// `None` disables the admin endpoint.
    pub admin_listen: Option<SocketAddr>,
    pub timeouts: Timeouts,
    pub max_connections: usize,
    pub reload_poll_interval: Duration,
    pub enforce_on_live_sessions: bool,
    pub log_format: LogFormat,
    /// Data-plane threads; `None` means one fewer than the CPUs, at least one.
    pub worker_threads: Option<usize>,
    /// Load balancers whose connections open with a PROXY protocol header naming the client.
    pub proxy_protocol_from: Vec<IpNet>,
    /// Peers allowed the admin endpoint's `/status`; loopback by default.
    pub admin_status_from: Vec<IpNet>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// From accept to the end of the client's StartupMessage inside TLS.
    pub handshake: Duration,
    /// TCP connect plus upstream TLS handshake.
    pub upstream_connect: Duration,
    /// How long live sessions may run after SIGTERM before they are closed.
    pub shutdown_grace: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            handshake: Duration::from_secs(10),
            upstream_connect: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            source: None,
            state_dir: None,
            admin_listen: DEFAULT_ADMIN_LISTEN.parse().ok(),
            timeouts: Timeouts::default(),
            max_connections: 10_000,
            reload_poll_interval: Duration::from_secs(30),
            enforce_on_live_sessions: true,
            log_format: LogFormat::Text,
            worker_threads: None,
            proxy_protocol_from: Vec::new(),
            admin_status_from: crate::admin::AdminOptions::default().status_from,
        }
    }
}

/// Every key `pgmtls.yaml` accepts, for the docs check.
pub const KEYS: &[&str] = &[
    "state_dir",
    "admin_listen",
    "handshake_timeout",
    "upstream_connect_timeout",
    "shutdown_grace",
    "max_connections",
    "reload_poll_interval",
    "enforce_on_live_sessions",
    "log_format",
    "worker_threads",
    "proxy_protocol_from",
    "admin_status_from",
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
            .required_with("state_dir", convert::string)
            .map(|s| base.join(s));
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
            shutdown_grace: f
                .optional_with("shutdown_grace", convert::duration)
                .unwrap_or(d.timeouts.shutdown_grace),
        };
        let cfg = Config {
            source: Some(path.to_path_buf()),
            state_dir,
            admin_listen,
            timeouts,
            max_connections: f
                .optional_with("max_connections", convert::positive_usize)
                .unwrap_or(d.max_connections),
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
        };
        f.finish().into_result(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
                    upstream_connect_timeout: 1s\nshutdown_grace: 1m\nmax_connections: 50\n\
                    reload_poll_interval: 5s\nenforce_on_live_sessions: false\nlog_format: json\n\
                    worker_threads: 1\nproxy_protocol_from: [10.0.0.0/16, \"2001:db8::/48\"]\n\
                    admin_status_from: [10.0.0.0/24]\n";
        let c = Config::parse(Path::new("p.yaml"), text).unwrap();
        assert_eq!(c.admin_listen, None);
        assert_eq!(c.timeouts.shutdown_grace, Duration::from_secs(60));
        assert_eq!(c.max_connections, 50);
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.worker_threads, Some(1));
        assert_eq!(c.proxy_protocol_from.len(), 2);
        assert_eq!(
            c.admin_status_from,
            ["10.0.0.0/24".parse::<IpNet>().unwrap()]
        );
        assert!(!c.enforce_on_live_sessions);
        for key in KEYS {
            assert!(text.contains(&format!("{key}:")), "{key} untested");
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
