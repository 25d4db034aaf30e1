//! `pgmtls mtls create|destroy|DB` and `pgmtls databases`: a database folder with its CA,
//! server certificate, first client certificate, empty CRL and empty allowlist in; a served
//! (or archived) database out.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context as _};
use clap::{Args, Subcommand};
use serde::Serialize;
use serde_json::json;
use sha2::{Digest, Sha256};

use super::certificates::{self, CertView};
use super::output::{self, human_time, Block, Table};
use super::status::ProxyView;
use super::{confirm, done, now, validate, ChangeArgs, Ctx, StateArgs};
use crate::pki::{self, CaSigner, KeyType};
use crate::state::{
    self, ip_rules_to_yaml, one_line, DatabaseSettings, DatabaseState, UpstreamAddr, UpstreamTls,
    PRIVATE_MODE, PUBLIC_MODE,
};

/// Name of the copied `--upstream-ca` file inside the database folder.
pub const UPSTREAM_CA_FILE: &str = "upstream-ca.crt";

/// Longest CN a certificate may carry (X.520 ub-common-name).
const MAX_CN: usize = 64;

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
    /// Address the proxy accepts clients on for this database (port 0: any free port).
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: SocketAddr,
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
    #[arg(long, value_name = "TYPE", default_value = "p256")]
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
        Some(MtlsCommand::Status(a)) => show(a),
        None => show(args.show),
    }
}

/// The CA's common name. Verifiers find a CA by its name, so it names the database; names
/// too long for a CN keep a prefix plus a digest of the whole name.
pub fn ca_common_name(database: &str) -> String {
    let full = format!("pgmtls CA {database}");
    if full.chars().count() <= MAX_CN {
        return full;
    }
    let digest = hex::encode(Sha256::digest(database.as_bytes()));
    let keep: String = database.chars().take(MAX_CN - 10 - 9).collect();
    format!("pgmtls CA {keep}~{}", &digest[..8])
}

/// Names in the server certificate: the given ones plus the listen IP when it is specific.
pub fn server_names(given: &[String], listen: SocketAddr) -> Vec<String> {
    let mut names: Vec<String> = given.to_vec();
    if !listen.ip().is_unspecified() {
        let ip = listen.ip().to_string();
        if !names.contains(&ip) {
            names.push(ip);
        }
    }
    names
}

fn create(args: CreateArgs) -> anyhow::Result<ExitCode> {
    let name = args.database.as_str();
    state::validate_database_name(name).map_err(|e| anyhow!("{e}"))?;
    let upstream: UpstreamAddr = args
        .upstream
        .parse()
        .map_err(|e: String| anyhow!("--upstream: {e}"))?;
    if args.upstream_tls == UpstreamTls::VerifyFull && args.upstream_ca.is_none() {
        bail!("--upstream-tls verify-full needs --upstream-ca FILE");
    }
    if args.upstream_tls == UpstreamTls::Disable
        && !upstream.is_loopback()
        && !args.allow_plaintext_remote_upstream
    {
        bail!(
            "--upstream {upstream} is not loopback: use --upstream-tls verify-full --upstream-ca \
             FILE, or accept plaintext with --allow-plaintext-remote-upstream"
        );
    }
    let upstream_ca_pem = match &args.upstream_ca {
        Some(p) => Some(
            std::fs::read(p)
                .with_context(|| format!("cannot read --upstream-ca {}", p.display()))?,
        ),
        None => None,
    };
    let ctx = Ctx::new(&args.state)?;
    if ctx.state.has_database(name) {
        bail!("mTLS is already enabled for database {name:?}");
    }
    check_listen_free(&ctx, name, args.listen)?;
    confirm(
        name,
        args.confirm.as_deref(),
        "Enabling Mutual TLS will allow external access to this database. This action will be \
         logged. Continue?",
    )?;

    // Keys are generated before the lock is taken: RSA 4096 takes a while, and nothing here
    // depends on the state directory.
    let at = now();
    let key_type = args.key_type;
    let ca = pki::create_ca(&ca_common_name(name), key_type, pki::DEFAULT_CA_VALIDITY)?;
    let signer = CaSigner::from_issued(&ca)?;
    let names = server_names(&args.server_names, args.listen);
    let server = pki::issue_server(&signer, &names, key_type, pki::DEFAULT_SERVER_VALIDITY)?;
    let first = certificates::issue(
        &signer,
        args.common_name.as_deref(),
        key_type,
        at,
        None,
        None,
    )?;
    let crl = pki::build_crl::<&str>(&signer, &[], 1, at, at + certificates::CRL_VALIDITY)?;

    let mut change = ctx.begin(None, &args.change)?;
    // Again under the lock: another `mtls create` may have taken the address meanwhile.
    check_listen_free(&ctx, name, args.listen)?;
    let settings = DatabaseSettings {
        listen: args.listen,
        upstream,
        upstream_tls: args.upstream_tls,
        upstream_ca: upstream_ca_pem
            .as_ref()
            .map(|_| PathBuf::from(UPSTREAM_CA_FILE)),
        upstream_server_name: args.upstream_server_name.clone(),
        allow_plaintext_remote_upstream: args.allow_plaintext_remote_upstream,
        server_names: args.server_names.clone(),
        user_must_match_cn: args.user_must_match_cn,
        enabled_by: Some(change.actor.clone()),
        created_at: Some(at),
    };
    let staged = ctx.state.stage_database(name)?;
    staged.write(
        state::DATABASE_YAML,
        settings.to_yaml().as_bytes(),
        PUBLIC_MODE,
    )?;
    staged.write(state::CA_CERT, ca.cert_pem.as_bytes(), PUBLIC_MODE)?;
    staged.write(state::CA_KEY, ca.key_pem.as_bytes(), PRIVATE_MODE)?;
    // The proxy presents the leaf and its CA, so clients holding only root.crt can verify.
    let chain = format!("{}{}", server.cert_pem, ca.cert_pem);
    staged.write(state::SERVER_CERT, chain.as_bytes(), PUBLIC_MODE)?;
    staged.write(state::SERVER_KEY, server.key_pem.as_bytes(), PRIVATE_MODE)?;
    staged.write(state::CRL, crl.as_bytes(), PUBLIC_MODE)?;
    staged.write(
        state::IP_RULES,
        ip_rules_to_yaml(&[]).as_bytes(),
        PUBLIC_MODE,
    )?;
    if let Some(pem) = &upstream_ca_pem {
        staged.write(UPSTREAM_CA_FILE, pem, PUBLIC_MODE)?;
    }
    let (record, issued) = &first;
    let cert_dir = format!("{}/{}", state::CERTIFICATES_DIR, record.id);
    staged.write(
        &format!("{cert_dir}/{}", state::CLIENT_CERT),
        issued.cert_pem.as_bytes(),
        PUBLIC_MODE,
    )?;
    staged.write(
        &format!("{cert_dir}/{}", state::CLIENT_KEY),
        issued.key_pem.as_bytes(),
        PRIVATE_MODE,
    )?;
    staged.write(
        &format!("{cert_dir}/{}", state::CERTIFICATE_YAML),
        record.to_yaml().as_bytes(),
        PUBLIC_MODE,
    )?;
    // Load the staged folder exactly as the proxy will, and build what it would build.
    let loaded = DatabaseState::load(name, staged.path())
        .map_err(|e| anyhow!("refusing to enable mTLS: {}", one_line(&e)))?;
    validate(&loaded)?;
    staged.commit()?;
    change.record(
        "mtls.create",
        Some(name),
        json!({
            "listen": args.listen.to_string(),
            "upstream": settings.upstream.to_string(),
            "upstream_tls": settings.upstream_tls.to_string(),
            "server_names": names,
            "user_must_match_cn": settings.user_must_match_cn,
            "key_type": key_type.as_str(),
            "ca_serial": ca.serial,
            "server_serial": server.serial,
            "certificate_id": record.id,
            "certificate_serial": record.serial,
        }),
    )?;
    drop(change);
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

/// Two databases on one listen address would make the proxy refuse the whole state.
fn check_listen_free(ctx: &Ctx, name: &str, listen: SocketAddr) -> anyhow::Result<()> {
    for other in ctx
        .state
        .database_names()
        .map_err(|e| anyhow!("{}", one_line(&e)))?
    {
        if other == name {
            continue;
        }
        let file = ctx.state.database_dir(&other).join(state::DATABASE_YAML);
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        if let Ok(s) = DatabaseSettings::parse(&file, &text) {
            if s.listen == listen {
                bail!("--listen {listen} is already the listen address of database {other:?}");
            }
        }
    }
    Ok(())
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
    let mut change = ctx.begin(Some(name), &args.change)?;
    let archived = ctx.state.archive_database(name, now())?;
    change.record(
        "mtls.destroy",
        Some(name),
        json!({ "archived_to": archived.display().to_string() }),
    )?;
    drop(change);
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

/// `mtls DB` as JSON.
#[derive(Debug, Serialize)]
struct StatusView {
    database: String,
    tls_status: &'static str,
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
    #[serde(with = "time::serde::rfc3339::option")]
    server_certificate_expires_at: Option<time::OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    ca_expires_at: Option<time::OffsetDateTime>,
    ip_rules: usize,
    certificates: Vec<CertView>,
    proxy: serde_json::Value,
}

fn show(args: ShowArgs) -> anyhow::Result<ExitCode> {
    let name = args.database.unwrap_or_default();
    let ctx = Ctx::new(&args.state)?;
    let db = ctx.load(&name)?;
    let proxy = ctx.proxy();
    let at = now();
    let certs = certificates::views(&db, &proxy, at);
    let server_info = cert_info(&db.server_cert_pem);
    let view = StatusView {
        database: name.clone(),
        tls_status: proxy.tls_status(&name).as_json(),
        enabled_by: db.settings.enabled_by.clone(),
        created_at: db.settings.created_at,
        listen: db.settings.listen.to_string(),
        upstream: db.settings.upstream.to_string(),
        upstream_tls: db.settings.upstream_tls.to_string(),
        server_names: server_info
            .as_ref()
            .map(|i| i.sans.clone())
            .unwrap_or_default(),
        user_must_match_cn: db.settings.user_must_match_cn,
        server_certificate_expires_at: server_info.as_ref().map(|i| i.not_after),
        ca_expires_at: cert_info(&db.ca_pem).map(|i| i.not_after),
        ip_rules: db.rules.len(),
        certificates: certs,
        proxy: proxy.summary(),
    };
    if args.json {
        say_raw!("{}", output::json(&view));
        return Ok(ExitCode::SUCCESS);
    }
    let opt_time = |t: Option<time::OffsetDateTime>| t.map(human_time).unwrap_or_default();
    let mut block = Block::new()
        .row("TLS-status", proxy.tls_status(&name).to_string())
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
    if let Some(e) = proxy.reload_error() {
        block = block.row("proxy_reload_error", e);
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
    /// Why the database does not load, if it does not.
    error: Option<String>,
}

pub fn databases(args: DatabasesArgs) -> anyhow::Result<ExitCode> {
    let ctx = Ctx::new(&args.state)?;
    let names = ctx
        .state
        .database_names()
        .map_err(|e| anyhow!("{}", one_line(&e)))?;
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
        match ctx.state.load_database(&name) {
            Ok(db) => rows.push(DatabaseRow {
                tls_status: proxy.tls_status(&name).as_json(),
                listen: Some(db.settings.listen.to_string()),
                upstream: Some(db.settings.upstream.to_string()),
                ip_rules: Some(db.rules.len()),
                certificates: Some(db.certificates.len()),
                error: None,
                name,
            }),
            Err(e) => {
                broken += 1;
                rows.push(DatabaseRow {
                    tls_status: proxy.tls_status(&name).as_json(),
                    listen: None,
                    upstream: None,
                    ip_rules: None,
                    certificates: None,
                    error: Some(one_line(&e)),
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
        }
    }
    // A database that does not load makes the proxy refuse every reload: say so in the exit code.
    Ok(if broken > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_names_name_the_database_and_fit_a_cn() {
        assert_eq!(ca_common_name("app"), "pgmtls CA app");
        let long = "a".repeat(63);
        let cn = ca_common_name(&long);
        assert!(cn.chars().count() <= MAX_CN, "{cn}");
        assert_ne!(cn, ca_common_name(&format!("{}b", "a".repeat(62))));
    }

    #[test]
    fn server_names_add_a_specific_listen_ip_once() {
        let l: SocketAddr = "10.0.0.5:6432".parse().unwrap();
        assert_eq!(server_names(&[], l), vec!["10.0.0.5"]);
        assert_eq!(
            server_names(&["db.example".into(), "10.0.0.5".into()], l),
            vec!["db.example", "10.0.0.5"]
        );
        let any: SocketAddr = "0.0.0.0:6432".parse().unwrap();
        assert!(server_names(&[], any).is_empty());
        let any6: SocketAddr = "[::]:6432".parse().unwrap();
        assert_eq!(server_names(&["x".into()], any6), vec!["x"]);
    }
}
