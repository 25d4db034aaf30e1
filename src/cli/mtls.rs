//! `pgmtls mtls create|destroy|DB` and `pgmtls databases`: enabling and disabling mutual TLS
//! for a database ([`control::mtls`] makes the change), and what a database serves.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, Context as _};
use clap::{Args, Subcommand};
use serde::Serialize;
use serde_json::json;

use super::certificates::{self, CertView};
use super::output::{self, human_time, Block, Table};
use super::status::{Lag, ProxyView};
use super::{actor, confirm, done, now, ChangeArgs, Ctx, StateArgs};
use crate::control::{self, mtls::EnableRequest};
use crate::pki::{self, KeyType};
use crate::state::{self, one_line, UpstreamAddr, UpstreamTls};

pub use crate::control::mtls::{ca_common_name, server_names, UPSTREAM_CA_FILE};

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct MtlsArgs {
    #[command(subcommand)]
    pub command: Option<MtlsCommand>,
    #[command(flatten)]
    pub show: ShowArgs,
}

#[derive(Subcommand, Debug)]
pub enum MtlsCommand {
    /// Enable mutual TLS for a database: CA, server certificate, a first client certificate,
    /// an empty CRL and an empty allowlist.
    Create(Box<CreateArgs>),
    /// Disable mutual TLS: the proxy stops serving the database and closes its sessions on its
    /// next reload; the CA, keys and records are archived, not deleted.
    Destroy(DestroyArgs),
    /// Change a database's session limits (`max_connections`, `max_connections_per_ip` in its
    /// database.yaml); a running proxy applies them to new sessions on its next reload.
    Update(UpdateArgs),
    /// Show TLS status and certificates (same as `pgmtls mtls DB`).
    Status(ShowArgs),
}

#[derive(Args, Debug)]
pub struct ShowArgs {
    /// Database name.
    #[arg(value_name = "DATABASE", required = true)]
    pub database: Option<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub state: StateArgs,
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    /// Database name: 1-63 lowercase letters, digits, '-' or '_'.
    #[arg(value_name = "DATABASE")]
    pub database: String,
    /// Address the proxy accepts clients on for this database (port 0: any free port), or
    /// `shared`: the shared listener (`shared_listen` in pgmtls.yaml), where the client's SNI
    /// picks the database by its --server-name.
    #[arg(long, value_name = "ADDR:PORT|shared")]
    pub listen: state::Listen,
    /// The PostgreSQL server behind the proxy, or unix:/path/.s.PGSQL.5432 on the same host.
    #[arg(long, value_name = "HOST:PORT")]
    pub upstream: String,
    /// TLS to the upstream: disable (loopback only), require, verify-full.
    #[arg(long, value_name = "MODE", default_value = "disable")]
    pub upstream_tls: UpstreamTls,
    /// CA certificate (PEM) for --upstream-tls verify-full; copied into the state directory.
    #[arg(long, value_name = "FILE")]
    pub upstream_ca: Option<PathBuf>,
    /// Name checked against the upstream certificate [default: the upstream host].
    #[arg(long, value_name = "NAME")]
    pub upstream_server_name: Option<String>,
    /// Allow plaintext to a non-loopback upstream (exposes passwords and data on the network).
    #[arg(long)]
    pub allow_plaintext_remote_upstream: bool,
    /// Refuse sessions whose user name is not the client certificate's common name (issue
    /// certificates with --common-name set to the role they may log in as).
    #[arg(long)]
    pub user_must_match_cn: bool,
    /// DNS name or IP clients use to reach the proxy; repeat for more. The listen IP is added
    /// unless it is 0.0.0.0 or ::.
    #[arg(long = "server-name", value_name = "NAME")]
    pub server_names: Vec<String>,
    /// Key type of the CA, server and first client certificate.
    #[arg(long, value_name = "TYPE", default_value = "p256", value_parser = super::key_type_parser())]
    pub key_type: KeyType,
    /// Common name of the first client certificate [default: its id].
    #[arg(long, value_name = "CN")]
    pub common_name: Option<String>,
    /// Skip the prompt: repeat the database name.
    #[arg(long, value_name = "DATABASE")]
    pub confirm: Option<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub state: StateArgs,
    #[command(flatten)]
    pub change: ChangeArgs,
}

#[derive(Args, Debug)]
pub struct DestroyArgs {
    /// Database name.
    #[arg(value_name = "DATABASE")]
    pub database: String,
    /// Skip the prompt: repeat the database name.
    #[arg(long, value_name = "DATABASE")]
    pub confirm: Option<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub state: StateArgs,
    #[command(flatten)]
    pub change: ChangeArgs,
}

#[derive(Args, Debug)]
pub struct UpdateArgs {
    /// Database name.
    #[arg(value_name = "DATABASE")]
    pub database: String,
    /// Sessions the database may have open at once on each proxy, or `none` for no limit
    /// but the process's max_connections.
    #[arg(long, value_name = "N|none", value_parser = limit_value)]
    pub max_connections: Option<SessionLimit>,
    /// Sessions one client address (an IPv6 /64) may have open at once to the database, or
    /// `none` for no such limit.
    #[arg(long, value_name = "N|none", value_parser = limit_value)]
    pub max_connections_per_ip: Option<SessionLimit>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub state: StateArgs,
    #[command(flatten)]
    pub change: ChangeArgs,
}

/// A session limit as given: a number, or `None` for `none` (no limit). A type of its own:
/// clap reads `Option<Option<_>>` as a flag whose value may be left out.
#[derive(Debug, Clone, Copy)]
pub struct SessionLimit(pub Option<u32>);

/// A session limit: a positive integer, or `none` to remove it.
fn limit_value(s: &str) -> Result<SessionLimit, String> {
    if s == "none" {
        return Ok(SessionLimit(None));
    }
    match s.parse::<u32>() {
        Ok(n) if n > 0 => Ok(SessionLimit(Some(n))),
        _ => Err(format!(
            "{s:?} is not a session limit: give a positive integer, or `none` to remove it"
        )),
    }
}

#[derive(Args, Debug)]
pub struct DatabasesArgs {
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub state: StateArgs,
}

pub fn run(args: MtlsArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        Some(MtlsCommand::Create(a)) => create(*a),
        Some(MtlsCommand::Destroy(a)) => destroy(a),
        Some(MtlsCommand::Update(a)) => update(a),
        Some(MtlsCommand::Status(a)) => show(a),
        None => show(args.show),
    }
}

fn create(args: CreateArgs) -> anyhow::Result<ExitCode> {
    let name = args.database.as_str();
    let upstream: UpstreamAddr = args
        .upstream
        .parse()
        .map_err(|e: String| anyhow!("--upstream: {e}"))?;
    let upstream_ca_pem = match &args.upstream_ca {
        Some(p) => Some(
            std::fs::read(p)
                .with_context(|| format!("cannot read --upstream-ca {}", p.display()))?,
        ),
        None => None,
    };
    let request = EnableRequest {
        name: name.to_owned(),
        listen: args.listen,
        upstream,
        upstream_tls: args.upstream_tls,
        upstream_ca_pem,
        upstream_server_name: args.upstream_server_name.clone(),
        allow_plaintext_remote_upstream: args.allow_plaintext_remote_upstream,
        user_must_match_cn: args.user_must_match_cn,
        server_names: args.server_names.clone(),
        key_type: args.key_type,
        common_name: args.common_name.clone(),
    };
    let ctx = Ctx::new(&args.state)?;
    let control = ctx.control();
    // Refuse what can be refused before asking.
    control::mtls::check(&control, &request)?;
    confirm(
        name,
        args.confirm.as_deref(),
        "Enabling Mutual TLS will allow external access to this database. This action will be \
         logged. Continue?",
    )?;
    // In etcd mode the state is the prefix: no directory is made.
    let had_state_dir = ctx.etcd().is_some() || ctx.state.root().exists();
    let enabled = control::mtls::enable(&control, &request, &actor(&args.change))?;
    if !had_state_dir {
        eprintln!(
            "pgmtls: created the state directory {}",
            ctx.state.root().display()
        );
    }
    let (settings, names, record) = (
        &enabled.settings,
        &enabled.server_names,
        &enabled.certificate,
    );
    let at = enabled.settings.created_at.unwrap_or_else(now);
    done(&format!("Enabling mTLS on {name}"));
    if names.is_empty() {
        eprintln!(
            "pgmtls: warning: the server certificate names no host (listen address {} is \
             unspecified and no --server-name was given): clients can use sslmode=verify-ca, \
             not verify-full",
            args.listen
        );
    }

    let proxy = ctx.proxy();
    let tls_status = proxy.tls_status(name);
    if args.json {
        say_raw!(
            "{}",
            output::json(&json!({
                "database": name,
                "enabled_by": settings.enabled_by,
                "created_at": state::rfc3339(at),
                "listen": args.listen.to_string(),
                "upstream": settings.upstream.to_string(),
                "upstream_tls": settings.upstream_tls.to_string(),
                "server_names": names,
                "certificate_id": record.id,
                "status": tls_status.as_json(),
                "proxy": proxy.summary(),
            }))
        );
    } else {
        let block = Block::new()
            .row("database", name)
            .row("enabled_by", settings.enabled_by.as_deref().unwrap_or(""))
            .row("listen", args.listen.to_string())
            .row("upstream", settings.upstream.to_string())
            .row("certificate", &record.id)
            .row("status", tls_status.to_string());
        say_raw!("{}", block.render());
    }
    Ok(ExitCode::SUCCESS)
}

fn destroy(args: DestroyArgs) -> anyhow::Result<ExitCode> {
    let name = args.database.as_str();
    let ctx = Ctx::new(&args.state)?;
    ctx.require(name)?;
    confirm(
        name,
        args.confirm.as_deref(),
        "Disabling Mutual TLS stops external access to this database through pgmtls and closes \
         its sessions. This action will be logged. Continue?",
    )?;
    let archived = control::mtls::disable(&ctx.control(), name, &actor(&args.change))?.archived_to;
    done(&format!("Disabling mTLS on {name}"));
    if args.json {
        say_raw!(
            "{}",
            output::json(&json!({
                "database": name,
                "archived_to": archived.display().to_string(),
            }))
        );
    } else {
        say_raw!(
            "{}",
            Block::new()
                .row("database", name)
                .row("archived_to", archived.display().to_string())
                .render()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn update(args: UpdateArgs) -> anyhow::Result<ExitCode> {
    let name = args.database.as_str();
    let ctx = Ctx::new(&args.state)?;
    ctx.require(name)?;
    let change = control::mtls::LimitsChange {
        max_connections: args.max_connections.map(|l| l.0),
        max_connections_per_ip: args.max_connections_per_ip.map(|l| l.0),
    };
    let updated = control::mtls::update_limits(&ctx.control(), name, change, &actor(&args.change))?;
    done(&format!("Updating {name}"));
    let s = &updated.settings;
    let shown = |v: Option<u32>| v.map_or_else(|| "none".to_owned(), |n| n.to_string());
    if args.json {
        say_raw!(
            "{}",
            output::json(&json!({
                "database": name,
                "max_connections": s.max_connections,
                "max_connections_per_ip": s.max_connections_per_ip,
            }))
        );
    } else {
        say_raw!(
            "{}",
            Block::new()
                .row("database", name)
                .row("max_connections", shown(s.max_connections))
                .row("max_connections_per_ip", shown(s.max_connections_per_ip))
                .render()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `mtls DB` as JSON.
#[derive(Debug, Serialize)]
struct StatusView {
    database: String,
    tls_status: &'static str,
    /// etcd mode only: the live replicas that do not serve the database yet.
    #[serde(skip_serializing_if = "Option::is_none")]
    lagging: Option<Vec<Lag>>,
    enabled_by: Option<String>,
    #[serde(with = "time::serde::rfc3339::option")]
    created_at: Option<time::OffsetDateTime>,
    listen: String,
    upstream: String,
    upstream_tls: String,
    /// Names in the server certificate (SANs).
    server_names: Vec<String>,
    /// Sessions must use the certificate's common name as their user name.
    user_must_match_cn: bool,
    /// The database's session limits (`null`: none of its own).
    max_connections: Option<u32>,
    max_connections_per_ip: Option<u32>,
    #[serde(with = "time::serde::rfc3339::option")]
    server_certificate_expires_at: Option<time::OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    ca_expires_at: Option<time::OffsetDateTime>,
    ip_rules: usize,
    certificates: Vec<CertView>,
    proxy: serde_json::Value,
    /// Why the proxy rejected this database's last change (it serves the previous one).
    proxy_reload_error: Option<String>,
}

fn show(args: ShowArgs) -> anyhow::Result<ExitCode> {
    let name = args.database.unwrap_or_default();
    let ctx = Ctx::new(&args.state)?;
    let db = ctx.load(&name)?;
    let proxy = ctx.proxy();
    let at = now();
    let certs = certificates::views(&db, &proxy, at);
    let server_info = cert_info(&db.server_cert_pem);
    let tls_status = proxy.tls_status(&name);
    let view = StatusView {
        database: name.clone(),
        tls_status: tls_status.as_json(),
        lagging: tls_status.lagging.clone(),
        enabled_by: db.settings.enabled_by.clone(),
        created_at: db.settings.created_at,
        listen: served_listen(&name, db.settings.listen, &proxy),
        upstream: db.settings.upstream.to_string(),
        upstream_tls: db.settings.upstream_tls.to_string(),
        server_names: server_info
            .as_ref()
            .map(|i| i.sans.clone())
            .unwrap_or_default(),
        user_must_match_cn: db.settings.user_must_match_cn,
        max_connections: db.settings.max_connections,
        max_connections_per_ip: db.settings.max_connections_per_ip,
        server_certificate_expires_at: server_info.as_ref().map(|i| i.not_after),
        ca_expires_at: cert_info(&db.ca_pem).map(|i| i.not_after),
        ip_rules: db.rules.len(),
        certificates: certs,
        proxy: proxy.summary(),
        proxy_reload_error: proxy.database_error(&name).map(str::to_owned),
    };
    if args.json {
        say_raw!("{}", output::json(&view));
        return Ok(ExitCode::SUCCESS);
    }
    let opt_time = |t: Option<time::OffsetDateTime>| t.map(human_time).unwrap_or_default();
    let mut block = Block::new()
        .row("TLS-status", tls_status.to_string())
        .row("database", &name)
        .row("created_at", opt_time(view.created_at))
        .row("enabled_by", view.enabled_by.as_deref().unwrap_or(""))
        .row("listen", &view.listen)
        .row(
            "upstream",
            format!("{} (tls: {})", view.upstream, view.upstream_tls),
        )
        .row("server_names", view.server_names.join(", "))
        .row(
            "user_must_match_cn",
            if view.user_must_match_cn { "yes" } else { "no" },
        )
        .row(
            "server_certificate_expires_at",
            opt_time(view.server_certificate_expires_at),
        )
        .row("ca_expires_at", opt_time(view.ca_expires_at))
        .row("ip_rules", view.ip_rules.to_string());
    if let Some(n) = view.max_connections {
        block = block.row("max_connections", n.to_string());
    }
    if let Some(n) = view.max_connections_per_ip {
        block = block.row("max_connections_per_ip", n.to_string());
    }
    if let Some(e) = &view.proxy_reload_error {
        block = block.row("proxy_reload_error", output::clean(e));
    }
    say_raw!("{}", block.render());
    say!();
    say!("Certificates");
    say_raw!("{}", certificates::table(&view.certificates).render());
    certificates::footer(&proxy);
    Ok(ExitCode::SUCCESS)
}

fn cert_info(pem: &[u8]) -> Option<pki::CertInfo> {
    let text = std::str::from_utf8(pem).ok()?;
    pki::inspect_cert_pem(text).ok()
}

/// One row of `pgmtls databases`.
#[derive(Debug, Serialize)]
struct DatabaseRow {
    name: String,
    listen: Option<String>,
    upstream: Option<String>,
    ip_rules: Option<usize>,
    certificates: Option<usize>,
    tls_status: &'static str,
    /// etcd mode only: the live replicas that do not serve the database yet.
    #[serde(skip_serializing_if = "Option::is_none")]
    lagging: Option<Vec<Lag>>,
    /// Why the database does not load, if it does not.
    error: Option<String>,
    /// Why the proxy rejected the database's last change (it serves the previous one).
    proxy_reload_error: Option<String>,
}

/// The address a database listens on: with port 0 ("any free port"), the one the running
/// proxy bound, when it answers; otherwise what is configured.
fn served_listen(name: &str, configured: state::Listen, proxy: &ProxyView) -> String {
    let state::Listen::Addr(configured) = configured else {
        return match proxy.database(name).and_then(|d| d.listen.clone()) {
            Some(bound) => format!("shared ({bound})"),
            None => "shared".to_owned(),
        };
    };
    if configured.port() == 0 {
        if let Some(bound) = proxy.database(name).and_then(|d| d.listen.clone()) {
            return bound;
        }
    }
    configured.to_string()
}

pub fn databases(args: DatabasesArgs) -> anyhow::Result<ExitCode> {
    let ctx = Ctx::new(&args.state)?;
    let control = ctx.control();
    if ctx.etcd().is_none() && !ctx.state.root().exists() {
        // Not the same as an empty one: a mistyped path should not read as "no databases".
        return Err(
            crate::control::ControlError::NoStateDir(ctx.state.root().to_path_buf()).into(),
        );
    }
    let names = control.database_names()?;
    let proxy = if names.is_empty() {
        ProxyView::Unreachable {
            reason: "not asked".into(),
        }
    } else {
        ctx.proxy()
    };
    let mut rows = Vec::new();
    let mut broken = 0;
    for name in names {
        // What the proxy would make of it, not only whether the files parse: a database
        // without its CRL loads but is refused.
        let loaded = control
            .load(&name)
            .map_err(|e| match e {
                // The loader's own words, as for a directory.
                crate::control::ControlError::DoesNotLoad { detail, .. } => detail,
                other => other.to_string(),
            })
            .and_then(|db| {
                let metrics = crate::metrics::Metrics::new();
                crate::snapshot::DatabaseRuntime::build(&db, &metrics)
                    .map(|_| db)
                    .map_err(|e| one_line(&e))
            });
        let proxy_reload_error = proxy.database_error(&name).map(str::to_owned);
        let tls_status = proxy.tls_status(&name);
        let lagging = tls_status.lagging.clone();
        match loaded {
            Ok(db) => rows.push(DatabaseRow {
                tls_status: tls_status.as_json(),
                lagging,
                listen: Some(served_listen(&name, db.settings.listen, &proxy)),
                upstream: Some(db.settings.upstream.to_string()),
                ip_rules: Some(db.rules.len()),
                certificates: Some(db.certificates.len()),
                error: None,
                proxy_reload_error,
                name,
            }),
            Err(e) => {
                broken += 1;
                rows.push(DatabaseRow {
                    tls_status: tls_status.as_json(),
                    lagging,
                    listen: None,
                    upstream: None,
                    ip_rules: None,
                    certificates: None,
                    error: Some(e),
                    proxy_reload_error,
                    name,
                })
            }
        }
    }
    if args.json {
        say_raw!("{}", output::json(&rows));
    } else if rows.is_empty() {
        say!(
            "No databases in {}. Enable one with `pgmtls mtls create`.",
            ctx.state.root().display()
        );
    } else {
        let mut t = Table::new(&[
            "Name",
            "Listen",
            "Upstream",
            "IP Rules",
            "Certificates",
            "TLS-status",
        ]);
        for r in &rows {
            let n = |v: Option<usize>| v.map(|v| v.to_string()).unwrap_or_else(|| "-".into());
            t.row(vec![
                r.name.clone(),
                r.listen.clone().unwrap_or_else(|| "-".into()),
                r.upstream.clone().unwrap_or_else(|| "-".into()),
                n(r.ip_rules),
                n(r.certificates),
                if r.error.is_some() {
                    "invalid".into()
                } else {
                    proxy.tls_status(&r.name).to_string()
                },
            ]);
        }
        say_raw!("{}", t.render());
    }
    for r in &rows {
        if let Some(e) = &r.error {
            eprintln!("pgmtls: error: database {} does not load: {e}", r.name);
        } else if let Some(e) = &r.proxy_reload_error {
            eprintln!(
                "pgmtls: warning: the proxy rejected the last change of database {}: {}",
                r.name,
                output::clean(e)
            );
        }
    }
    // A database that does not load is not served as it is on disk: say so in the exit code.
    Ok(if broken > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
