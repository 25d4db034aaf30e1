//! What one database folder holds, with the parsers the proxy and CLI share.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_saphyr::Spanned;
use time::OffsetDateTime;

use super::*;
use crate::allowlist::{parse_cidr, MAX_RULES, MAX_TRUSTED_IPS};
use crate::config::yaml::{convert, parse_doc, Fields};
use crate::config::ConfigErrors;

/// Longest IP-rule description, as in the hosted feature.
pub const MAX_DESCRIPTION: usize = 255;

/// Where a database is served: its own address, or the shared listener (`shared_listen` in
/// `pgmtls.yaml`), where the client's SNI picks it among the others served there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Listen {
    Addr(SocketAddr),
    Shared,
}

impl Listen {
    /// The database's own address, `None` on the shared listener.
    pub fn addr(self) -> Option<SocketAddr> {
        match self {
            Listen::Addr(a) => Some(a),
            Listen::Shared => None,
        }
    }

    pub fn is_shared(self) -> bool {
        self == Listen::Shared
    }
}

impl std::str::FromStr for Listen {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "shared" {
            return Ok(Listen::Shared);
        }
        s.parse().map(Listen::Addr).map_err(|_| {
            format!("invalid address {s:?}: expected IP:PORT (e.g. 0.0.0.0:5433) or \"shared\"")
        })
    }
}

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Listen::Addr(a) => a.fmt(f),
            Listen::Shared => f.write_str("shared"),
        }
    }
}

/// How pgmtls talks to the database behind it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum UpstreamTls {
    /// Plaintext; only to loopback unless `allow_plaintext_remote_upstream` is set.
    #[default]
    Disable,
    /// TLS without certificate checks (encrypts, does not authenticate the server).
    Require,
    /// TLS, server certificate verified against `upstream_ca` and the host name.
    VerifyFull,
}

impl std::str::FromStr for UpstreamTls {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "disable" => Ok(UpstreamTls::Disable),
            "require" => Ok(UpstreamTls::Require),
            "verify-full" => Ok(UpstreamTls::VerifyFull),
            other => Err(format!(
                "must be disable, require or verify-full, not {other:?}"
            )),
        }
    }
}

impl fmt::Display for UpstreamTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            UpstreamTls::Disable => "disable",
            UpstreamTls::Require => "require",
            UpstreamTls::VerifyFull => "verify-full",
        })
    }
}

/// Where the upstream Postgres listens: `host:port` (the host may be a name, resolved at
/// connect time), or `unix:/path/.s.PGSQL.5432` for a server on the same host, which spares
/// both sides the loopback TCP stack. For a Unix socket `host` holds the path and `port` is 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamAddr {
    pub host: String,
    pub port: u16,
}

impl UpstreamAddr {
    /// The socket path of a `unix:` upstream.
    pub fn unix_path(&self) -> Option<&Path> {
        (self.port == 0 && self.host.starts_with('/')).then(|| Path::new(&self.host))
    }

    pub fn is_loopback(&self) -> bool {
        self.unix_path().is_some()
            || self.host == "localhost"
            || self
                .host
                .trim_matches(['[', ']'])
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }
}

impl std::str::FromStr for UpstreamAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if !path.starts_with('/') || path.len() < 2 {
                return Err(format!(
                    "invalid upstream {s:?}: a Unix socket needs an absolute path, e.g. \
                     unix:/var/run/postgresql/.s.PGSQL.5432"
                ));
            }
            return Ok(UpstreamAddr {
                host: path.to_owned(),
                port: 0,
            });
        }
        let bad = || {
            format!(
                "invalid upstream {s:?}: expected HOST:PORT (e.g. 10.0.0.5:5432) or \
                 unix:/path/.s.PGSQL.5432"
            )
        };
        let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        let host = host.trim_matches(['[', ']']);
        if host.is_empty() || port == 0 || host.contains(char::is_whitespace) {
            return Err(bad());
        }
        Ok(UpstreamAddr {
            host: host.to_owned(),
            port,
        })
    }
}

impl fmt::Display for UpstreamAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(p) = self.unix_path() {
            write!(f, "unix:{}", p.display())
        } else if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// `database.yaml`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatabaseSettings {
    pub listen: Listen,
    pub upstream: UpstreamAddr,
    pub upstream_tls: UpstreamTls,
    /// CA file (relative to the database folder) for `verify-full`.
    pub upstream_ca: Option<PathBuf>,
    /// Name checked against the upstream certificate; defaults to the upstream host.
    pub upstream_server_name: Option<String>,
    pub allow_plaintext_remote_upstream: bool,
    /// Names in the server certificate; on the shared listener also the SNI names that pick
    /// this database (at least one is required there).
    pub server_names: Vec<String>,
    /// Refuse a session whose user name is not the client certificate's common name.
    pub user_must_match_cn: bool,
    /// Sessions this database may have open at once on this proxy (`None`: only the process
    /// limit). Applies to new sessions on reload; sessions already open are never cut for it.
    pub max_connections: Option<u32>,
    /// Sessions one client source (an IPv4 address or an IPv6 /64) may have open at once to
    /// this database.
    pub max_connections_per_ip: Option<u32>,
    pub enabled_by: Option<String>,
    pub created_at: Option<OffsetDateTime>,
}

/// Every key of `database.yaml`, for the docs check.
pub const DATABASE_KEYS: &[&str] = &[
    "listen",
    "upstream",
    "upstream_tls",
    "upstream_ca",
    "upstream_server_name",
    "allow_plaintext_remote_upstream",
    "server_names",
    "user_must_match_cn",
    "max_connections",
    "max_connections_per_ip",
    "enabled_by",
    "created_at",
];

impl DatabaseSettings {
    pub fn parse(file: &Path, text: &str) -> Result<Self, ConfigErrors> {
        let mut f = Fields::parse(file, text)?;
        let listen: Option<Listen> = f.required_with("listen", |v| convert::string(v)?.parse());
        let upstream: Option<UpstreamAddr> =
            f.required_with("upstream", |v| convert::string(v)?.parse());
        let upstream_tls = f
            .optional_with("upstream_tls", |v| convert::string(v)?.parse())
            .unwrap_or_default();
        let upstream_ca = f
            .optional_with("upstream_ca", convert::string)
            .map(PathBuf::from);
        let upstream_server_name = f.optional_with("upstream_server_name", convert::string);
        let allow_remote = f
            .optional_with("allow_plaintext_remote_upstream", convert::bool)
            .unwrap_or(false);
        let server_names: Vec<String> = f.optional("server_names").unwrap_or_default();
        let user_must_match_cn = f
            .optional_with("user_must_match_cn", convert::bool)
            .unwrap_or(false);
        let max_connections = f.optional_with("max_connections", convert::positive_u32);
        let max_connections_per_ip =
            f.optional_with("max_connections_per_ip", convert::positive_u32);
        if listen == Some(Listen::Shared) && server_names.is_empty() {
            let line = f.line_of("listen");
            f.push(
                "server_names",
                line,
                "a database on the shared listener needs at least one server name: clients \
                 reach it by naming it in their SNI",
            );
        }
        let enabled_by = f.optional_with("enabled_by", convert::string);
        let created_at = f.optional_with("created_at", |v| {
            let s = convert::string(v)?;
            OffsetDateTime::parse(&s, &time::format_description::well_known::Rfc3339)
                .map_err(|e| format!("invalid timestamp {s:?}: {e}"))
        });
        if upstream_tls == UpstreamTls::VerifyFull && upstream_ca.is_none() {
            let line = f.line_of("upstream_tls");
            f.push(
                "upstream_ca",
                line,
                "is required when upstream_tls is verify-full",
            );
        }
        if let Some(up) = &upstream {
            if up.unix_path().is_some() && upstream_tls != UpstreamTls::Disable {
                let line = f.line_of("upstream_tls");
                f.push(
                    "upstream_tls",
                    line,
                    "a unix: upstream is on this host; use upstream_tls: disable",
                );
            }
            if upstream_tls == UpstreamTls::Disable && !up.is_loopback() && !allow_remote {
                let line = f.line_of("upstream");
                f.push(
                    "upstream",
                    line,
                    "plaintext to a non-loopback upstream exposes passwords and data; use \
                     upstream_tls: verify-full, or set allow_plaintext_remote_upstream: true",
                );
            }
        }
        let errors = f.finish();
        match (listen, upstream) {
            (Some(listen), Some(upstream)) if errors.is_empty() => Ok(DatabaseSettings {
                listen,
                upstream,
                upstream_tls,
                upstream_ca,
                upstream_server_name,
                allow_plaintext_remote_upstream: allow_remote,
                server_names,
                user_must_match_cn,
                max_connections,
                max_connections_per_ip,
                enabled_by,
                created_at,
            }),
            _ => Err(errors),
        }
    }

    pub fn to_yaml(&self) -> String {
        #[derive(Serialize)]
        struct Out<'a> {
            listen: String,
            upstream: String,
            upstream_tls: String,
            #[serde(skip_serializing_if = "Option::is_none")]
            upstream_ca: Option<String>,
            #[serde(skip_serializing_if = "Option::is_none")]
            upstream_server_name: &'a Option<String>,
            #[serde(skip_serializing_if = "std::ops::Not::not")]
            allow_plaintext_remote_upstream: bool,
            #[serde(skip_serializing_if = "<[String]>::is_empty")]
            server_names: &'a [String],
            #[serde(skip_serializing_if = "std::ops::Not::not")]
            user_must_match_cn: bool,
            #[serde(skip_serializing_if = "Option::is_none")]
            max_connections: Option<u32>,
            #[serde(skip_serializing_if = "Option::is_none")]
            max_connections_per_ip: Option<u32>,
            #[serde(skip_serializing_if = "Option::is_none")]
            enabled_by: &'a Option<String>,
            #[serde(skip_serializing_if = "Option::is_none")]
            created_at: Option<String>,
        }
        let out = Out {
            listen: self.listen.to_string(),
            upstream: self.upstream.to_string(),
            upstream_tls: self.upstream_tls.to_string(),
            upstream_ca: self
                .upstream_ca
                .as_ref()
                .map(|p| p.to_string_lossy().into_owned()),
            upstream_server_name: &self.upstream_server_name,
            allow_plaintext_remote_upstream: self.allow_plaintext_remote_upstream,
            server_names: &self.server_names,
            user_must_match_cn: self.user_must_match_cn,
            max_connections: self.max_connections,
            max_connections_per_ip: self.max_connections_per_ip,
            enabled_by: &self.enabled_by,
            created_at: self.created_at.map(rfc3339),
        };
        to_yaml(&out)
    }
}

/// One IP rule of `ip-rules.yaml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IpRule {
    pub id: String,
    pub cidr: IpNet,
    #[serde(default)]
    pub description: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRules {
    #[serde(default)]
    rules: Vec<Spanned<RawRule>>,
}

/// `trusted-ips.yaml`: its own top-level key, so a rules file copied into its place by
/// mistake is refused instead of silently waiving certificates for its ranges.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTrusted {
    #[serde(default)]
    trusted_ips: Vec<Spanned<RawRule>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    id: String,
    cidr: String,
    #[serde(default)]
    description: String,
    created_at: String,
    updated_at: String,
}

/// Checks a description the way the CLI and the loader both must.
pub fn validate_description(d: &str) -> Result<(), String> {
    if d.chars().count() > MAX_DESCRIPTION {
        return Err(format!(
            "description is longer than {MAX_DESCRIPTION} characters"
        ));
    }
    if d.chars().any(char::is_control) {
        return Err("description contains control characters".into());
    }
    Ok(())
}

/// Parses `ip-rules.yaml`, reporting every bad rule with its line.
pub fn parse_ip_rules(file: &Path, text: &str) -> Result<Vec<IpRule>, ConfigErrors> {
    let raw: RawRules = if text.trim().is_empty() {
        RawRules { rules: Vec::new() }
    } else {
        parse_doc(file, text)?
    };
    parse_entries(file, ("rules", "rule"), raw.rules, MAX_RULES)
}

/// One trusted range of `trusted-ips.yaml`: the same fields as an IP rule. A trusted range
/// admits an address without a client certificate, unless an IP rule also covers it.
pub type TrustedIp = IpRule;

/// Parses `trusted-ips.yaml`, reporting every bad range with its line. A missing or empty
/// file trusts nothing.
pub fn parse_trusted_ips(file: &Path, text: &str) -> Result<Vec<TrustedIp>, ConfigErrors> {
    let raw: RawTrusted = if text.trim().is_empty() {
        RawTrusted {
            trusted_ips: Vec::new(),
        }
    } else {
        parse_doc(file, text)?
    };
    parse_entries(
        file,
        ("trusted_ips", "trusted range"),
        raw.trusted_ips,
        MAX_TRUSTED_IPS,
    )
}

/// The checks an IP rule and a trusted range share; `key` names the list and `noun` one of
/// its entries in errors.
fn parse_entries(
    file: &Path,
    (key, noun): (&str, &str),
    raw: Vec<Spanned<RawRule>>,
    max: usize,
) -> Result<Vec<IpRule>, ConfigErrors> {
    let mut errors = ConfigErrors::default();
    let mut rules: Vec<IpRule> = Vec::new();
    if raw.len() > max {
        errors.extend(ConfigErrors::one(
            file,
            key,
            None,
            format!("{} {noun}s; at most {max} are allowed", raw.len()),
        ));
    }
    for (i, spanned) in raw.into_iter().enumerate() {
        let line = Some(spanned.referenced.line());
        let r = spanned.value;
        let mut err = |field: &str, msg: String| {
            errors.0.push(crate::config::ConfigError {
                file: file.to_path_buf(),
                key: format!("{key}[{i}].{field}"),
                line,
                message: msg,
            })
        };
        let cidr = parse_cidr(&r.cidr).map_err(|m| err("cidr", m)).ok();
        let created = parse_time(&r.created_at)
            .map_err(|m| err("created_at", m))
            .ok();
        let updated = parse_time(&r.updated_at)
            .map_err(|m| err("updated_at", m))
            .ok();
        if let Err(m) = validate_description(&r.description) {
            err("description", m);
        }
        if r.id.is_empty() || r.id.len() > 64 || r.id.chars().any(|c| c.is_control()) {
            err("id", "must be 1-64 printable characters".into());
        }
        if rules.iter().any(|x| x.id == r.id) {
            err("id", format!("duplicate id {}", r.id));
        }
        if let Some(c) = cidr {
            if rules.iter().any(|x| x.cidr == c) {
                err("cidr", format!("duplicate {noun} for {c}"));
            }
        }
        if let (Some(cidr), Some(created_at), Some(updated_at)) = (cidr, created, updated) {
            rules.push(IpRule {
                id: r.id,
                cidr,
                description: r.description,
                created_at,
                updated_at,
            });
        }
    }
    errors.into_result(rules)
}

pub fn ip_rules_to_yaml(rules: &[IpRule]) -> String {
    #[derive(Serialize)]
    struct Out<'a> {
        rules: &'a [IpRule],
    }
    to_yaml(&Out { rules })
}

pub fn trusted_ips_to_yaml(trusted_ips: &[TrustedIp]) -> String {
    #[derive(Serialize)]
    struct Out<'a> {
        trusted_ips: &'a [TrustedIp],
    }
    to_yaml(&Out { trusted_ips })
}

/// `certificates/ID/certificate.yaml`: the record of one client certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateRecord {
    pub id: String,
    pub common_name: String,
    /// Lowercase hex, as in the CRL and the connection log.
    pub serial: String,
    pub key_type: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub not_before: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub revoked_at: Option<OffsetDateTime>,
    /// The certificate this one renews.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub successor_of: Option<String>,
    /// The certificate issued to renew this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub successor: Option<String>,
}

impl CertificateRecord {
    pub fn to_yaml(&self) -> String {
        to_yaml(self)
    }
}

/// Files of one database's TLS material.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaterialPaths {
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub ca: PathBuf,
    pub crl: PathBuf,
}

impl MaterialPaths {
    pub fn in_dir(dir: &Path) -> Self {
        MaterialPaths {
            server_cert: dir.join(SERVER_CERT),
            server_key: dir.join(SERVER_KEY),
            ca: dir.join(CA_CERT),
            crl: dir.join(CRL),
        }
    }
}

/// Everything the proxy needs from one database folder, read but not yet turned into TLS
/// objects (that is `tls_store`'s job, which names these same files in its errors).
#[derive(Debug, Clone)]
pub struct DatabaseState {
    pub name: String,
    pub dir: PathBuf,
    /// Where the TLS material came from, to name files in errors.
    pub paths: MaterialPaths,
    pub settings: DatabaseSettings,
    pub rules: Vec<IpRule>,
    /// `trusted-ips.yaml`: ranges admitted without a client certificate where no rule of
    /// `rules` covers the address.
    pub trusted_ips: Vec<TrustedIp>,
    pub server_cert_pem: Vec<u8>,
    pub server_key_pem: Vec<u8>,
    pub ca_pem: Vec<u8>,
    pub crl_pem: Option<Vec<u8>>,
    /// Whether a missing `crl_pem` makes the database invalid. True in a state directory,
    /// where every database has a CRL from `mtls create` on, so a missing one means a file was
    /// lost or removed, and serving on would fail open; false in quick mode, where `--crl` is
    /// optional.
    pub crl_required: bool,
    /// The upstream CA's bytes when they came with the records (a store has no files to read
    /// later); `None` for a directory, where the snapshot reads `upstream_ca` from disk.
    pub upstream_ca_pem: Option<Vec<u8>>,
    pub certificates: Vec<CertificateRecord>,
}

impl DatabaseState {
    /// Loads a database folder: the directory reader produces its records (with the checks
    /// only a directory needs), and the same parser as for any store turns them into state.
    pub fn load(name: &str, dir: &Path) -> Result<DatabaseState, ConfigErrors> {
        DatabaseState::from_records(name, dir, super::records::read_database_dir(dir))
    }
}

/// Reads every `certificates/*/certificate.yaml`, sorted by creation time.
pub fn load_certificate_records(db_dir: &Path) -> Result<Vec<CertificateRecord>, ConfigErrors> {
    let dir = db_dir.join(CERTIFICATES_DIR);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(ConfigErrors::one(
                &dir,
                "",
                None,
                format!("cannot list: {e}"),
            ))
        }
    };
    let mut errors = ConfigErrors::default();
    let mut out = Vec::new();
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let file = entry.path().join(CERTIFICATE_YAML);
        match read_text(&file).and_then(|(p, t)| parse_doc::<CertificateRecord>(&p, &t)) {
            Ok(r) => out.push(r),
            Err(e) => errors.extend(e),
        }
    }
    out.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
    errors.into_result(out)
}

fn read_text(path: &Path) -> Result<(PathBuf, String), ConfigErrors> {
    std::fs::read_to_string(path)
        .map(|t| (path.to_path_buf(), t))
        .map_err(|e| ConfigErrors::one(path, "", None, format!("cannot read: {e}")))
}

fn read_bytes(path: &Path) -> Result<Vec<u8>, ConfigErrors> {
    std::fs::read(path).map_err(|e| ConfigErrors::one(path, "", None, format!("cannot read: {e}")))
}

/// Reads a private key, refusing one that group or others can read, as libpq does: a key
/// that leaked to other local users is not one to keep serving with.
pub fn read_private_key(path: &Path) -> Result<Vec<u8>, ConfigErrors> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path)
        .map_err(|e| ConfigErrors::one(path, "", None, format!("cannot read: {e}")))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(ConfigErrors::one(
            path,
            "",
            None,
            format!(
                "private key has permissions {mode:04o}; it must not be readable by group or \
                 others (chmod 0600)"
            ),
        ));
    }
    read_bytes(path)
}

pub fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

fn parse_time(s: &str) -> Result<OffsetDateTime, String> {
    OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map_err(|e| format!("invalid timestamp {s:?}: {e}"))
}

fn to_yaml<T: Serialize>(v: &T) -> String {
    // Serialising our own plain structs cannot fail; fall back to an empty doc defensively.
    serde_saphyr::to_string(v).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DB: &str = "listen: 127.0.0.1:6432\nupstream: 127.0.0.1:5432\n";

    #[test]
    fn session_limits_parse_round_trip_and_refuse_bad_values() {
        let s = DatabaseSettings::parse(Path::new("d.yaml"), DB).unwrap();
        assert_eq!((s.max_connections, s.max_connections_per_ip), (None, None));
        let text = format!("{DB}max_connections: 20\nmax_connections_per_ip: 5\n");
        let s = DatabaseSettings::parse(Path::new("d.yaml"), &text).unwrap();
        assert_eq!(
            (s.max_connections, s.max_connections_per_ip),
            (Some(20), Some(5))
        );
        let again = DatabaseSettings::parse(Path::new("d.yaml"), &s.to_yaml()).unwrap();
        assert_eq!(s, again);
        for (bad, want) in [
            (
                "max_connections: 0",
                "d.yaml:3: max_connections: must be a positive integer",
            ),
            (
                "max_connections: many",
                "d.yaml:3: max_connections: must be a positive integer",
            ),
            (
                "max_connections_per_ip: -2",
                "d.yaml:3: max_connections_per_ip: must be a positive integer",
            ),
            (
                "max_connections_per_ip: 9999999999",
                "d.yaml:3: max_connections_per_ip: is too large",
            ),
        ] {
            let e = DatabaseSettings::parse(Path::new("d.yaml"), &format!("{DB}{bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{bad}: {e}");
        }
    }

    #[test]
    fn settings_round_trip() {
        let s = DatabaseSettings::parse(Path::new("d.yaml"), DB).unwrap();
        assert_eq!(s.upstream_tls, UpstreamTls::Disable);
        let again = DatabaseSettings::parse(Path::new("d.yaml"), &s.to_yaml()).unwrap();
        assert_eq!(s, again);
        assert!(!s.user_must_match_cn);
        let bound = format!("{DB}user_must_match_cn: true\n");
        let s = DatabaseSettings::parse(Path::new("d.yaml"), &bound).unwrap();
        assert!(s.user_must_match_cn);
        assert_eq!(
            DatabaseSettings::parse(Path::new("d.yaml"), &s.to_yaml()).unwrap(),
            s
        );
        let e = DatabaseSettings::parse(
            Path::new("d.yaml"),
            &format!("{DB}user_must_match_cn: sometimes\n"),
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("d.yaml:3: user_must_match_cn: must be true or false"),
            "{e}"
        );
    }

    #[test]
    fn settings_refuse_plaintext_to_remote_and_verify_full_without_ca() {
        let e = DatabaseSettings::parse(
            Path::new("d.yaml"),
            "listen: 0.0.0.0:6432\nupstream: db.internal:5432\n",
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("d.yaml:2: upstream: plaintext"),
            "{e}"
        );
        let e = DatabaseSettings::parse(
            Path::new("d.yaml"),
            "listen: 0.0.0.0:6432\nupstream: db.internal:5432\nupstream_tls: verify-full\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("upstream_ca: is required"), "{e}");
        let e = DatabaseSettings::parse(
            Path::new("d.yaml"),
            "listen: nowhere\nupstream: x\nupstream_tls: maybe\nfoo: 1\n",
        )
        .unwrap_err();
        assert_eq!(e.0.len(), 4, "{e}");
    }

    #[test]
    fn ip_rules_report_each_bad_rule_with_its_line() {
        let now = "2026-01-01T00:00:00Z";
        let text = format!(
            "rules:\n  - id: a\n    cidr: 10.0.0.0/8\n    created_at: {now}\n    updated_at: {now}\n  \
             - id: b\n    cidr: 10.0.0.1/8\n    created_at: {now}\n    updated_at: {now}\n  \
             - id: a\n    cidr: 10.0.0.0/8\n    description: \"x\\u0007\"\n    created_at: bad\n    updated_at: {now}\n"
        );
        let e = parse_ip_rules(Path::new("r.yaml"), &text).unwrap_err();
        let s = e.to_string();
        assert!(
            s.contains("r.yaml:6: rules[1].cidr: 10.0.0.1/8 has host bits set"),
            "{s}"
        );
        assert!(s.contains("rules[2].id: duplicate id a"), "{s}");
        assert!(s.contains("rules[2].created_at: invalid timestamp"), "{s}");
        assert!(
            s.contains("rules[2].description: description contains control"),
            "{s}"
        );
    }

    #[test]
    fn ip_rules_round_trip_and_cap() {
        let now = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
        let mk = |i: usize| IpRule {
            id: format!("id-{i}"),
            cidr: format!("10.0.{i}.0/24").parse().unwrap(),
            description: "office".into(),
            created_at: now,
            updated_at: now,
        };
        let rules: Vec<_> = (0..MAX_RULES).map(mk).collect();
        let back = parse_ip_rules(Path::new("r.yaml"), &ip_rules_to_yaml(&rules)).unwrap();
        assert_eq!(back, rules);
        let too_many: Vec<_> = (0..=MAX_RULES).map(mk).collect();
        let e = parse_ip_rules(Path::new("r.yaml"), &ip_rules_to_yaml(&too_many)).unwrap_err();
        assert!(e.to_string().contains("at most 60"), "{e}");
        assert_eq!(parse_ip_rules(Path::new("r.yaml"), "").unwrap(), vec![]);
        assert!(parse_ip_rules(Path::new("r.yaml"), "rules: 5").is_err());
        assert!(parse_ip_rules(Path::new("r.yaml"), "other: []").is_err());
    }

    #[test]
    fn trusted_ips_report_bad_entries_by_field_and_line_and_cap_at_twenty() {
        let now = "2026-01-01T00:00:00Z";
        let text = format!(
            "trusted_ips:\n  - id: a\n    cidr: 10.0.0.0/8\n    created_at: {now}\n    updated_at: {now}\n  \
             - id: a\n    cidr: 10.0.0.0/8\n    created_at: {now}\n    updated_at: {now}\n  \
             - id: c\n    cidr: 192.0.2.1/24\n    created_at: {now}\n    updated_at: {now}\n"
        );
        let e = parse_trusted_ips(Path::new("t.yaml"), &text).unwrap_err();
        let s = e.to_string();
        assert!(
            s.contains("t.yaml:6: trusted_ips[1].id: duplicate id a"),
            "{s}"
        );
        assert!(
            s.contains("trusted_ips[1].cidr: duplicate trusted range for 10.0.0.0/8"),
            "{s}"
        );
        assert!(
            s.contains("t.yaml:10: trusted_ips[2].cidr: 192.0.2.1/24 has host bits set"),
            "{s}"
        );
        // The rules file's key is not the trusted ranges': refused, not read as ranges.
        assert!(parse_trusted_ips(Path::new("t.yaml"), "rules: []").is_err());
        assert_eq!(parse_trusted_ips(Path::new("t.yaml"), "").unwrap(), vec![]);
        let at = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
        let mk = |i: usize| IpRule {
            id: format!("t-{i}"),
            cidr: format!("10.0.{i}.0/24").parse().unwrap(),
            description: String::new(),
            created_at: at,
            updated_at: at,
        };
        let twenty: Vec<_> = (0..MAX_TRUSTED_IPS).map(mk).collect();
        let back = parse_trusted_ips(Path::new("t.yaml"), &trusted_ips_to_yaml(&twenty)).unwrap();
        assert_eq!(back, twenty);
        let more: Vec<_> = (0..=MAX_TRUSTED_IPS).map(mk).collect();
        let e = parse_trusted_ips(Path::new("t.yaml"), &trusted_ips_to_yaml(&more)).unwrap_err();
        assert!(
            e.to_string()
                .contains("trusted_ips: 21 trusted ranges; at most 20 are allowed"),
            "{e}"
        );
    }

    #[test]
    fn upstream_addr_parses_names_and_v6() {
        let a: UpstreamAddr = "[::1]:5432".parse().unwrap();
        assert!(a.is_loopback());
        assert_eq!(a.to_string(), "[::1]:5432");
        let b: UpstreamAddr = "db.example:6543".parse().unwrap();
        assert!(!b.is_loopback());
        for bad in [
            "",
            "db",
            "db:0",
            "db:99999",
            ":5432",
            "a b:1",
            "unix:",
            "unix:rel/sock",
        ] {
            assert!(bad.parse::<UpstreamAddr>().is_err(), "{bad}");
        }
        let u: UpstreamAddr = "unix:/run/postgresql/.s.PGSQL.5432".parse().unwrap();
        assert!(u.is_loopback());
        assert_eq!(
            u.unix_path(),
            Some(Path::new("/run/postgresql/.s.PGSQL.5432"))
        );
        assert_eq!(u.to_string(), "unix:/run/postgresql/.s.PGSQL.5432");
        let e = DatabaseSettings::parse(
            Path::new("d.yaml"),
            "listen: 0.0.0.0:6432\nupstream: unix:/run/pg/.s.PGSQL.5432\nupstream_tls: require\n",
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("upstream_tls: a unix: upstream"),
            "{e}"
        );
    }
}
