//! `pgmtls certificates DB|get|create|download|revoke|renew`: client certificates of one
//! database's CA, the libpq file set for a client, the CRL, and the 75-day renewal. Changes
//! are [`control::certificates`]'s; this module parses flags, writes downloads and prints.

use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};

use anyhow::{anyhow, bail, Context as _};
use clap::{Args, Subcommand};
use serde::Serialize;
use serde_json::json;
use time::{Duration, OffsetDateTime};

use super::output::{self, human_time, Block, Table};
use super::status::{waiting_text, CertificateSeen, Lag, ProxyView, NO_REPLICA, UNKNOWN};
use super::{actor, done, now, ChangeArgs, Ctx, StateArgs};
use crate::control::{
    self,
    certificates::{crl_serials, find, NewCertificate, RenewReport, Renewal},
};
use crate::pki::KeyType;
use crate::state::{self, write_atomic, CertificateRecord, DatabaseState};

pub use crate::control::certificates::{CRL_REFRESH_WINDOW, CRL_VALIDITY, RENEW_WINDOW};

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct CertificatesArgs {
    #[command(subcommand)]
    pub command: Option<CertificatesCommand>,
    #[command(flatten)]
    pub list: ListArgs,
}

#[derive(Subcommand, Debug)]
pub enum CertificatesCommand {
    /// Issue another client certificate (13 months unless --valid-for is shorter).
    Create(CreateArgs),
    /// Show one certificate.
    Get(GetArgs),
    /// Write the libpq files of a certificate: PREFIXpostgresql.crt, .key, .pk8, PREFIXroot.crt.
    Download(DownloadArgs),
    /// Put a certificate on the database's CRL; the proxy refuses it from its next reload.
    Revoke(RevokeArgs),
    /// Issue a successor for every certificate within 75 days of expiry; safe from cron.
    Renew(RenewArgs),
    /// List certificates (same as `pgmtls certificates DB`).
    List(ListArgs),
}

#[derive(Args, Debug)]
pub struct ListArgs {
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
    /// Database name.
    #[arg(value_name = "DATABASE")]
    pub database: String,
    /// Lifetime, e.g. 90d or "30days"; at most (and by default) 13 months.
    #[arg(long, value_name = "DURATION")]
    pub valid_for: Option<humantime::Duration>,
    /// Subject common name [default: the certificate id].
    #[arg(long, value_name = "CN")]
    pub common_name: Option<String>,
    /// Key type of the new certificate.
    #[arg(long, value_name = "TYPE", default_value = "p256", value_parser = super::key_type_parser())]
    pub key_type: KeyType,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub state: StateArgs,
    #[command(flatten)]
    pub change: ChangeArgs,
}

#[derive(Args, Debug)]
pub struct GetArgs {
    /// Database name.
    #[arg(value_name = "DATABASE")]
    pub database: String,
    /// Certificate id.
    #[arg(long)]
    pub id: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub state: StateArgs,
}

#[derive(Args, Debug)]
pub struct DownloadArgs {
    /// Database name.
    #[arg(value_name = "DATABASE")]
    pub database: String,
    /// Certificate id.
    #[arg(long)]
    pub id: String,
    /// Put in front of every file name, e.g. "demo_".
    #[arg(long, default_value = "")]
    pub prefix: String,
    /// Directory to write to [default: ~/.postgresql].
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Overwrite existing files.
    #[arg(long)]
    pub force: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub state: StateArgs,
    #[command(flatten)]
    pub change: ChangeArgs,
}

#[derive(Args, Debug)]
pub struct RevokeArgs {
    /// Database name.
    #[arg(value_name = "DATABASE")]
    pub database: String,
    /// Certificate id.
    #[arg(long)]
    pub id: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub state: StateArgs,
    #[command(flatten)]
    pub change: ChangeArgs,
}

#[derive(Args, Debug)]
pub struct RenewArgs {
    /// Only this database [default: all].
    #[arg(value_name = "DATABASE")]
    pub database: Option<String>,
    /// Run through `sh -c` once per renewal, with the details in PGMTLS_* environment variables.
    #[arg(long, value_name = "CMD")]
    pub notify_command: Option<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub state: StateArgs,
    #[command(flatten)]
    pub change: ChangeArgs,
}

pub fn run(args: CertificatesArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        Some(CertificatesCommand::Create(a)) => create(a),
        Some(CertificatesCommand::Get(a)) => get(a),
        Some(CertificatesCommand::Download(a)) => download(a),
        Some(CertificatesCommand::Revoke(a)) => revoke(a),
        Some(CertificatesCommand::Renew(a)) => renew(a),
        Some(CertificatesCommand::List(a)) => list(a),
        None => list(args.list),
    }
}

/// One certificate as shown by every command.
#[derive(Debug, Clone, Serialize)]
pub struct CertView {
    pub id: String,
    pub common_name: String,
    pub serial: String,
    pub key_type: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub not_before: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub revoked_at: Option<OffsetDateTime>,
    pub successor_of: Option<String>,
    pub successor: Option<String>,
    /// pending, ready, expiring, expired or revoked.
    pub status: &'static str,
    /// Whether a reachable proxy accepts the certificate; null when no proxy was reachable.
    /// In etcd mode: whether some live replica still does (true until every one of them
    /// serves the revocation).
    pub served: Option<bool>,
    /// etcd mode only: the live replicas that do not serve the certificate's last change yet
    /// (its revocation, else its creation).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lagging: Option<Vec<Lag>>,
    #[serde(skip)]
    pub status_text: String,
}

impl CertView {
    /// `on_crl` comes from the database's CRL, the file the proxy enforces; `seen` from the
    /// running proxy, if one answered.
    pub fn new(
        r: &CertificateRecord,
        at: OffsetDateTime,
        on_crl: bool,
        seen: Option<CertificateSeen>,
    ) -> CertView {
        let revoked = r.revoked_at.is_some() || on_crl;
        let status = if revoked {
            "revoked"
        } else if r.expires_at <= at {
            "expired"
        } else if seen.as_ref().is_some_and(|s| !s.loaded) {
            "pending"
        } else if r.expires_at - at <= RENEW_WINDOW {
            "expiring"
        } else {
            "ready"
        };
        let served = seen
            .as_ref()
            .map(|s| s.loaded && !s.revoked && r.expires_at > at);
        let lagging = seen.and_then(|s| s.lagging);
        let waiting = lagging
            .as_deref()
            .filter(|l| !l.is_empty())
            .map(waiting_text);
        let status_text = match (revoked, served, &r.successor, &waiting) {
            (true, Some(true), _, Some(w)) => format!("revoked ({w})"),
            (true, Some(true), _, None) => "revoked (proxy has not reloaded yet)".to_owned(),
            (false, _, _, Some(w)) if status == "pending" => format!("pending ({w})"),
            (false, _, Some(_), _) if status == "expiring" => "expiring (renewed)".to_owned(),
            _ => status.to_owned(),
        };
        CertView {
            id: r.id.clone(),
            common_name: r.common_name.clone(),
            serial: r.serial.clone(),
            key_type: r.key_type.clone(),
            created_at: r.created_at,
            not_before: r.not_before,
            expires_at: r.expires_at,
            revoked_at: r.revoked_at,
            successor_of: r.successor_of.clone(),
            successor: r.successor.clone(),
            status,
            served,
            lagging,
            status_text,
        }
    }

    pub fn block(&self) -> Block {
        let mut b = Block::new()
            .row("common_name", &self.common_name)
            .row("created_at", human_time(self.created_at))
            .row("expires_at", human_time(self.expires_at))
            .row("id", &self.id)
            .row("key_type", &self.key_type);
        if let Some(t) = self.revoked_at {
            b = b.row("revoked_at", human_time(t));
        }
        b = b
            .row("serial", &self.serial)
            .row("status", &self.status_text);
        if let Some(s) = &self.successor {
            b = b.row("successor", s);
        }
        if let Some(s) = &self.successor_of {
            b = b.row("successor_of", s);
        }
        b
    }
}

/// Views of every certificate of a database.
pub(crate) fn views(db: &DatabaseState, proxy: &ProxyView, at: OffsetDateTime) -> Vec<CertView> {
    let on_crl = crl_serials(db);
    db.certificates
        .iter()
        .map(|r| {
            let on_crl = on_crl.contains(&r.serial);
            let revoked = on_crl || r.revoked_at.is_some();
            CertView::new(r, at, on_crl, proxy.certificate(&db.name, &r.id, revoked))
        })
        .collect()
}

/// The certificates table: ID, Created At, Expires At, Status.
pub(crate) fn table(views: &[CertView]) -> Table {
    let mut t = Table::new(&["ID", "Created At", "Expires At", "Status"]);
    for v in views {
        t.row(vec![
            v.id.clone(),
            human_time(v.created_at),
            human_time(v.expires_at),
            v.status_text.clone(),
        ]);
    }
    t
}

/// Says what the statuses rest on when no proxy answered, or that its last reload failed.
pub(crate) fn footer(proxy: &ProxyView) {
    if let ProxyView::Fleet(f) = proxy {
        if f.replicas.is_empty() {
            say!(
                "fleet: {NO_REPLICA}; statuses describe the certificates, not what a replica \
                 serves"
            );
        }
    } else if !proxy.is_reachable() {
        say!("proxy: {UNKNOWN}; statuses describe the certificates, not what a proxy serves");
    } else if let Some(e) = proxy.reload_error() {
        say!("proxy: last reload failed: {}", output::clean(e));
    }
}

fn list(args: ListArgs) -> anyhow::Result<ExitCode> {
    let name = args.database.unwrap_or_default();
    let ctx = Ctx::new(&args.state)?;
    let db = ctx.load(&name)?;
    let proxy = ctx.proxy();
    let views = views(&db, &proxy, now());
    if args.json {
        say_raw!("{}", output::json(&views));
    } else if views.is_empty() {
        say!("No certificates for database {name}. Create one with `pgmtls certificates create {name}`.");
    } else {
        say_raw!("{}", table(&views).render());
        footer(&proxy);
    }
    Ok(ExitCode::SUCCESS)
}

fn get(args: GetArgs) -> anyhow::Result<ExitCode> {
    let ctx = Ctx::new(&args.state)?;
    let db = ctx.load(&args.database)?;
    find(&db, &args.id)?;
    let proxy = ctx.proxy();
    let views = views(&db, &proxy, now());
    let Some(view) = views.into_iter().find(|v| v.id == args.id) else {
        bail!(
            "no certificate with id {:?} for database {}",
            args.id,
            db.name
        );
    };
    print_one(&view, &proxy, args.json);
    Ok(ExitCode::SUCCESS)
}

fn print_one(view: &CertView, proxy: &ProxyView, json: bool) {
    if json {
        say_raw!("{}", output::json(view));
    } else {
        say_raw!("{}", view.block().render());
        footer(proxy);
    }
}

fn create(args: CreateArgs) -> anyhow::Result<ExitCode> {
    let ctx = Ctx::new(&args.state)?;
    let name = args.database.as_str();
    let valid_for = match args.valid_for {
        None => None,
        Some(d) => Some(
            Duration::try_from(std::time::Duration::from(d))
                .map_err(|_| anyhow!("--valid-for is too long"))?,
        ),
    };
    let request = NewCertificate {
        common_name: args.common_name.as_deref(),
        key_type: args.key_type,
        valid_for,
    };
    let created =
        control::certificates::create(&ctx.control(), name, &request, &actor(&args.change))?;
    done(&format!("Creating certificate for database {name}"));
    let proxy = ctx.proxy();
    let record = &created.record;
    let view = CertView::new(
        record,
        now(),
        false,
        proxy.certificate(name, &record.id, false),
    );
    print_one(&view, &proxy, args.json);
    Ok(ExitCode::SUCCESS)
}

/// The four files `download` writes, in order: chain, key, root, PKCS-8 key.
pub fn download_names(prefix: &str) -> [String; 4] {
    control::download::names(prefix)
}

fn default_download_dir() -> anyhow::Result<PathBuf> {
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .context("HOME is not set; give --dir")?;
    Ok(PathBuf::from(home).join(".postgresql"))
}

fn download(args: DownloadArgs) -> anyhow::Result<ExitCode> {
    if control::download::validate_prefix(&args.prefix).is_err() {
        bail!("--prefix must not contain '/' or control characters");
    }
    let ctx = Ctx::new(&args.state)?;
    let db = ctx.load(&args.database)?;
    let bundle = control::download::bundle(&ctx.control(), &db, &args.id, &args.prefix)?;
    let record = &bundle.record;
    let at = now();
    if record.expires_at <= at {
        eprintln!(
            "pgmtls: warning: certificate {} expired at {}",
            record.id,
            human_time(record.expires_at)
        );
    }
    let default_dir = default_download_dir();
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => default_dir.as_ref().map_err(|e| anyhow!("{e}"))?.clone(),
    };
    if dir.exists() && !dir.is_dir() {
        bail!("--dir {} is not a directory", dir.display());
    }
    let names = download_names(&args.prefix);
    if !args.force {
        for n in &names {
            let p = dir.join(n);
            if p.exists() {
                bail!("{} already exists; use --force to overwrite", p.display());
            }
        }
    }
    let created_dir = !dir.exists();
    if created_dir {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(state::PRIVATE_DIR_MODE)
            .create(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        eprintln!(
            "pgmtls: created {} (and any missing parents), mode 0700",
            dir.display()
        );
    }
    let paths: Vec<PathBuf> = names.iter().map(|n| dir.join(n)).collect();
    for (path, file) in paths.iter().zip(&bundle.files) {
        write_atomic(path, &file.bytes, file.mode)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    let in_default = default_dir.ok().is_some_and(|d| same_dir(&d, &dir));
    let unprefixed = download_names("");
    let present = unprefixed[..3].iter().any(|n| dir.join(n).exists());
    if in_default && present {
        eprintln!(
            "pgmtls: warning: unprefixed files in {} (postgresql.crt, postgresql.key, root.crt) \
             are used by every libpq connection of this user, to any server; prefer --prefix \
             and sslcert/sslkey/sslrootcert",
            dir.display()
        );
    }
    // Downloading copies key material out of the state directory: worth a line in the log,
    // but a read-only state directory must not stop a client from getting its files.
    let details = json!({"id": record.id, "dir": dir.display().to_string(), "prefix": args.prefix});
    let logged = control::download::note(
        &ctx.control(),
        &db.name,
        details,
        &super::actor(&args.change),
    );
    if let Err(e) = logged {
        eprintln!("pgmtls: warning: not recorded in the audit log: {e}");
    }
    done(&format!(
        "Downloading certificates for database {}",
        db.name
    ));
    let shown: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    if args.json {
        say_raw!(
            "{}",
            output::json(&json!({
                "database": db.name,
                "id": record.id,
                "dir": dir.display().to_string(),
                "sslcert": shown[0],
                "sslkey": shown[1],
                "sslrootcert": shown[2],
                "pk8": shown[3],
                "dir_created": created_dir,
                "connect": connect_line(&db, record, &ctx.proxy(), &shown),
            }))
        );
    } else {
        say!("your certificates are now in {}", dir.display());
        say_raw!(
            "{}",
            Block::new()
                .row("sslcert", &shown[0])
                .row("sslkey", &shown[1])
                .row("sslrootcert", &shown[2])
                .row("sslkey_pk8", &shown[3])
                .row("sslmode", "verify-ca")
                .render()
        );
        say!(
            "connect with: psql \"{}\"",
            connect_line(&db, record, &ctx.proxy(), &shown)
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The libpq connection string for the downloaded files, with what pgmtls knows filled in:
/// the host clients use (the first server name, else a specific listen address), the port the
/// proxy serves (asked of the proxy when the configured port is 0), and the user when the
/// database binds certificates to their CN. Only what pgmtls cannot know stays a placeholder.
pub(crate) fn connect_line(
    db: &DatabaseState,
    record: &CertificateRecord,
    proxy: &ProxyView,
    files: &[String],
) -> String {
    // On the shared listener the port is the proxy's shared one, and the host must be a
    // server name (the SNI picks the database).
    let listen = db.settings.listen.addr();
    let host = match (db.settings.server_names.first(), listen) {
        (Some(name), _) => name.clone(),
        (None, Some(l)) if !l.ip().is_unspecified() => l.ip().to_string(),
        (None, _) => "HOST".to_owned(),
    };
    let served = proxy
        .database(&db.name)
        .and_then(|d| d.listen.as_deref())
        .and_then(|l| l.parse::<std::net::SocketAddr>().ok())
        .map(|a| a.port());
    let port = match (listen.map_or(0, |l| l.port()), served) {
        (0, Some(p)) => p.to_string(),
        (0, None) => "PORT".to_owned(),
        (p, _) => p.to_string(),
    };
    let user = if db.settings.user_must_match_cn {
        record.common_name.clone()
    } else {
        "USER".to_owned()
    };
    [
        ("host", host.as_str()),
        ("port", &port),
        ("dbname", "DBNAME"),
        ("user", &user),
        ("sslmode", "verify-ca"),
        ("sslcert", &files[0]),
        ("sslkey", &files[1]),
        ("sslrootcert", &files[2]),
    ]
    .iter()
    .map(|(k, v)| format!("{k}={}", conninfo_value(v)))
    .collect::<Vec<_>>()
    .join(" ")
}

/// A libpq connection-string value: single-quoted, with `\` and `'` escaped, when it holds
/// anything but plain characters (a CN or a path with a space, say).
fn conninfo_value(v: &str) -> String {
    if !v.is_empty()
        && !v
            .chars()
            .any(|c| c.is_whitespace() || c == '\'' || c == '\\')
    {
        return v.to_owned();
    }
    let escaped = v.replace('\\', "\\\\").replace('\'', "\\'");
    format!("'{escaped}'")
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

fn revoke(args: RevokeArgs) -> anyhow::Result<ExitCode> {
    let ctx = Ctx::new(&args.state)?;
    let name = args.database.as_str();
    let revoked =
        control::certificates::revoke(&ctx.control(), name, &args.id, &actor(&args.change))?;
    let record = &revoked.record;
    done(&format!(
        "Revoking certificate {} for database {name}",
        record.id
    ));
    let proxy = ctx.proxy();
    let view = CertView::new(
        record,
        now(),
        true,
        proxy.certificate(name, &record.id, true),
    );
    print_one(&view, &proxy, args.json);
    if !args.json && !matches!(proxy, ProxyView::Fleet(_)) {
        say!("The proxy refuses this certificate from its next reload (file change or SIGHUP).");
    }
    Ok(ExitCode::SUCCESS)
}

fn renew(args: RenewArgs) -> anyhow::Result<ExitCode> {
    let ctx = Ctx::new(&args.state)?;
    let started = control::now();
    // Only a run over every database is a scheduled run worth recording (control::renewal).
    let record = |summary: control::renewal::RunSummary| -> anyhow::Result<()> {
        if args.database.is_none() {
            control::renewal::record_run(&ctx.control(), started, summary, &actor(&args.change))
                .context("cannot record the renewal run")?;
        }
        Ok(())
    };
    // The notify command runs after the change (and its lock) is over.
    let mut report = match control::certificates::renew(
        &ctx.control(),
        args.database.as_deref(),
        &actor(&args.change),
    ) {
        Ok(r) => r,
        Err(e) => {
            // The run failed as a whole; say so in the record too, unless that fails as well
            // (then the original error is the one to read).
            let _ = record(control::renewal::RunSummary {
                errors: 1,
                ..Default::default()
            });
            return Err(e.into());
        }
    };
    let mut failed = !report.errors.is_empty();
    if let Some(cmd) = &args.notify_command {
        for r in &report.renewed {
            let env = notify_env(r, ctx.state.root());
            if let Err(e) = notify(cmd, &env) {
                report
                    .errors
                    .push(format!("notify command for certificate {}: {e:#}", r.id));
                failed = true;
            }
        }
    }
    if let Err(e) = record(control::renewal::RunSummary {
        errors: report.errors.len(),
        renewed: report.renewed.len(),
        server_certificates: report.server_certificates.len(),
        crls_refreshed: report.crls_refreshed.len(),
    }) {
        report.errors.push(format!("{e:#}"));
        failed = true;
    }
    if args.json {
        say_raw!("{}", output::json(&report));
    } else {
        print_report(&report);
    }
    for e in &report.errors {
        eprintln!("pgmtls: error: {e}");
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn print_report(report: &RenewReport) {
    if report.renewed.is_empty() {
        say!("No client certificates need renewal.");
    } else {
        let mut t = Table::new(&[
            "Database",
            "Previous ID",
            "Expires At",
            "New ID",
            "New Expires At",
        ]);
        for r in &report.renewed {
            t.row(vec![
                r.database.clone(),
                r.previous_id.clone(),
                human_time(r.previous_expires_at),
                r.id.clone(),
                human_time(r.expires_at),
            ]);
        }
        say_raw!("{}", t.render());
        say!(
            "Download each new certificate with `pgmtls certificates download DATABASE --id NEW_ID` \
             and switch clients to it before the previous one expires."
        );
    }
    for s in &report.server_certificates {
        say!(
            "Server certificate of {} renewed: serial {}, expires {}",
            s.database,
            s.serial,
            human_time(s.expires_at)
        );
    }
    for c in &report.crls_refreshed {
        say!(
            "CRL of {} re-signed: number {}, next update {}",
            c.database,
            c.crl_number,
            human_time(c.next_update)
        );
    }
}

/// Names of the variables `--notify-command` gets (documented in docs/CLI.md).
pub const NOTIFY_ENV: [&str; 10] = [
    "PGMTLS_EVENT",
    "PGMTLS_DATABASE",
    "PGMTLS_CERTIFICATE_ID",
    "PGMTLS_SERIAL",
    "PGMTLS_COMMON_NAME",
    "PGMTLS_EXPIRES_AT",
    "PGMTLS_PREVIOUS_CERTIFICATE_ID",
    "PGMTLS_PREVIOUS_EXPIRES_AT",
    "PGMTLS_STATE_DIR",
    "PGMTLS_DOWNLOAD_COMMAND",
];

/// The details of one renewal for the notify command, in [`NOTIFY_ENV`] order.
fn notify_env(r: &Renewal, state_dir: &Path) -> Vec<(&'static str, String)> {
    // An array of the same length as NOTIFY_ENV: a missing value does not compile.
    let values: [String; NOTIFY_ENV.len()] = [
        "certificate.renew".to_owned(),
        r.database.clone(),
        r.id.clone(),
        r.serial.clone(),
        r.common_name.clone(),
        state::rfc3339(r.expires_at),
        r.previous_id.clone(),
        state::rfc3339(r.previous_expires_at),
        state_dir.display().to_string(),
        format!(
            "pgmtls certificates download {} --id {} --state-dir {}",
            r.database,
            r.id,
            state_dir.display()
        ),
    ];
    NOTIFY_ENV.into_iter().zip(values).collect()
}

/// Runs the notify command with `sh -c`; its stdout goes to our stderr so `--json` output
/// stays parseable.
fn notify(cmd: &str, env: &[(&str, String)]) -> anyhow::Result<()> {
    use std::os::fd::AsFd as _;
    let stderr = std::io::stderr()
        .as_fd()
        .try_clone_to_owned()
        .context("cannot duplicate stderr")?;
    let mut c = std::process::Command::new("sh");
    c.arg("-c")
        .arg(cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::from(stderr));
    for (k, v) in env {
        c.env(k, v);
    }
    let status = c.status().context("cannot run the notify command")?;
    if !status.success() {
        bail!("exited with {status}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(expires_in: Duration, at: OffsetDateTime) -> CertificateRecord {
        CertificateRecord {
            id: "c1".into(),
            common_name: "c1".into(),
            serial: "4a".into(),
            key_type: "p256".into(),
            created_at: at - Duration::days(300),
            not_before: at - Duration::days(300),
            expires_at: at + expires_in,
            revoked_at: None,
            successor_of: None,
            successor: None,
        }
    }

    #[test]
    fn status_words_follow_expiry_revocation_and_the_proxy() {
        let at = now();
        let st = |r: &CertificateRecord, crl: bool, seen: &Option<CertificateSeen>| {
            CertView::new(r, at, crl, seen.clone()).status
        };
        let loaded = Some(CertificateSeen {
            loaded: true,
            revoked: false,
            lagging: None,
        });
        let missing = Some(CertificateSeen {
            loaded: false,
            revoked: false,
            lagging: None,
        });
        assert_eq!(st(&record(Duration::days(100), at), false, &None), "ready");
        assert_eq!(
            st(&record(Duration::days(100), at), false, &loaded),
            "ready"
        );
        assert_eq!(
            st(&record(Duration::days(100), at), false, &missing),
            "pending"
        );
        assert_eq!(
            st(&record(Duration::days(70), at), false, &None),
            "expiring"
        );
        assert_eq!(st(&record(Duration::days(-1), at), false, &None), "expired");
        assert_eq!(st(&record(Duration::days(100), at), true, &None), "revoked");
        let mut r = record(Duration::days(100), at);
        r.revoked_at = Some(at);
        let v = CertView::new(&r, at, false, loaded);
        assert_eq!(v.status, "revoked");
        assert_eq!(v.served, Some(true));
        assert_eq!(v.status_text, "revoked (proxy has not reloaded yet)");
        assert_eq!(v.lagging, None);
        // etcd mode: the replicas behind are named.
        let lag = vec![Lag {
            replica: "3".into(),
            revision: 41,
            needs: 44,
        }];
        let behind = Some(CertificateSeen {
            loaded: true,
            revoked: false,
            lagging: Some(lag.clone()),
        });
        let v = CertView::new(&r, at, true, behind);
        assert_eq!(v.served, Some(true));
        assert_eq!(
            v.status_text,
            "revoked (waiting for replica 3 at revision 41 < 44)"
        );
        let not_yet = Some(CertificateSeen {
            loaded: false,
            revoked: false,
            lagging: Some(lag),
        });
        let v = CertView::new(&record(Duration::days(100), at), at, false, not_yet);
        assert_eq!(v.status, "pending");
        assert_eq!(
            v.status_text,
            "pending (waiting for replica 3 at revision 41 < 44)"
        );
    }

    #[test]
    fn conninfo_values_are_quoted_only_when_needed() {
        assert_eq!(
            conninfo_value("/tmp/x_postgresql.crt"),
            "/tmp/x_postgresql.crt"
        );
        assert_eq!(conninfo_value("my app"), "'my app'");
        assert_eq!(conninfo_value(r"o'brien\x"), r"'o\'brien\\x'");
        assert_eq!(conninfo_value(""), "''");
    }

    #[test]
    fn download_names_carry_the_prefix() {
        assert_eq!(
            download_names("demo_"),
            [
                "demo_postgresql.crt",
                "demo_postgresql.key",
                "demo_root.crt",
                "demo_postgresql.pk8"
            ]
        );
    }
}
