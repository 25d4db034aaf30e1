//! `pgmtls trusted-ips DB|get|create|delete`: the trusted ranges of one database, admitted
//! without a client certificate where no IP rule covers the address (an IP rule takes
//! precedence). Changes are [`control::trusted_ips`]'s; this module parses flags and prints,
//! in the shape of `pgmtls ip-rules`.

use std::process::ExitCode;

use anyhow::{anyhow, bail};
use clap::{Args, Subcommand};
use serde::Serialize;
use serde_json::json;
use time::OffsetDateTime;

use super::output::{self, human_time, Block, Table};
use super::status::{waiting_text, Lag, ProxyView};
use super::{actor, done, ChangeArgs, Ctx, StateArgs};
use crate::control::{self, ip_rules::Selector};
use crate::state::{DatabaseState, TrustedIp};

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct TrustedIpsArgs {
    #[command(subcommand)]
    pub command: Option<TrustedIpsCommand>,
    #[command(flatten)]
    pub list: ListArgs,
}

#[derive(Subcommand, Debug)]
pub enum TrustedIpsCommand {
    /// Trust a CIDR block: it connects over TLS without a client certificate, Postgres'
    /// authentication deciding, unless an IP rule covers it (at most 20 per database).
    Create(CreateArgs),
    /// Show one trusted range.
    Get(GetArgs),
    /// Remove a trusted range by --id or --cidr; the proxy closes the sessions it admitted
    /// from its next reload.
    Delete(DeleteArgs),
    /// List trusted ranges (same as `pgmtls trusted-ips DB`).
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
    /// Block to trust, e.g. 203.0.113.7/32 or 2001:db8::/48 (no host bits).
    #[arg(long)]
    pub cidr: String,
    /// What the block is, at most 255 characters.
    #[arg(long, default_value = "")]
    pub description: String,
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
    /// Trusted range id.
    #[arg(long)]
    pub id: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub state: StateArgs,
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("range").required(true).args(["id", "cidr"])))]
pub struct DeleteArgs {
    /// Database name.
    #[arg(value_name = "DATABASE")]
    pub database: String,
    /// Trusted range id.
    #[arg(long)]
    pub id: Option<String>,
    /// The trusted range's CIDR block.
    #[arg(long)]
    pub cidr: Option<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub state: StateArgs,
    #[command(flatten)]
    pub change: ChangeArgs,
}

pub fn run(args: TrustedIpsArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        Some(TrustedIpsCommand::Create(a)) => create(a),
        Some(TrustedIpsCommand::Get(a)) => get(a),
        Some(TrustedIpsCommand::Delete(a)) => delete(a),
        Some(TrustedIpsCommand::List(a)) => list(a),
        None => list(args.list),
    }
}

/// One trusted range as shown by every command.
#[derive(Debug, Clone, Serialize)]
pub struct TrustedIpView {
    pub id: String,
    pub cidr: String,
    pub description: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    /// Authorized, Authorizing or unknown.
    pub status: &'static str,
    /// etcd mode only: the live replicas that do not serve the range yet.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lagging: Option<Vec<Lag>>,
    #[serde(skip)]
    pub status_text: String,
}

impl TrustedIpView {
    fn new(db: &str, r: &TrustedIp, proxy: &ProxyView) -> TrustedIpView {
        let status = proxy.trusted_ip_status(db, &r.id);
        TrustedIpView {
            id: r.id.clone(),
            cidr: r.cidr.to_string(),
            description: r.description.clone(),
            created_at: r.created_at,
            updated_at: r.updated_at,
            status: status.as_json(),
            status_text: status.to_string(),
            lagging: status.lagging,
        }
    }

    fn block(&self) -> Block {
        Block::new()
            .row("cidr", &self.cidr)
            .row("created_at", human_time(self.created_at))
            .row("description", &self.description)
            .row("id", &self.id)
            .row("status", &self.status_text)
            .row("updated_at", human_time(self.updated_at))
    }
}

fn list(args: ListArgs) -> anyhow::Result<ExitCode> {
    let name = args.database.unwrap_or_default();
    let ctx = Ctx::new(&args.state)?;
    let db = ctx.load(&name)?;
    let proxy = ctx.proxy();
    let views: Vec<TrustedIpView> = db
        .trusted_ips
        .iter()
        .map(|r| TrustedIpView::new(&name, r, &proxy))
        .collect();
    if args.json {
        say_raw!("{}", output::json(&views));
        return Ok(ExitCode::SUCCESS);
    }
    if views.is_empty() {
        say!(
            "No trusted IP ranges for database {name}: every client needs a certificate and an \
             IP rule. Add one with `pgmtls trusted-ips create {name} --cidr CIDR`."
        );
        return Ok(ExitCode::SUCCESS);
    }
    let mut t = Table::new(&["ID", "CIDR", "Description", "Created At", "Status"]);
    for v in &views {
        t.row(vec![
            v.id.clone(),
            v.cidr.clone(),
            v.description.clone(),
            human_time(v.created_at),
            v.status_text.clone(),
        ]);
    }
    say_raw!("{}", t.render());
    if let Some(e) = proxy.reload_error() {
        say!("proxy: last reload failed: {}", output::clean(e));
    }
    Ok(ExitCode::SUCCESS)
}

fn get(args: GetArgs) -> anyhow::Result<ExitCode> {
    let ctx = Ctx::new(&args.state)?;
    let db = ctx.load(&args.database)?;
    let rule = db
        .trusted_ips
        .iter()
        .find(|r| r.id == args.id)
        .ok_or_else(|| {
            anyhow!(
                "no trusted IP range with id {:?} for database {}",
                args.id,
                db.name
            )
        })?;
    let view = TrustedIpView::new(&db.name, rule, &ctx.proxy());
    print_one(&view, args.json);
    Ok(ExitCode::SUCCESS)
}

fn print_one(view: &TrustedIpView, json: bool) {
    if json {
        say_raw!("{}", output::json(view));
    } else {
        say_raw!("{}", view.block().render());
    }
}

fn create(args: CreateArgs) -> anyhow::Result<ExitCode> {
    let ctx = Ctx::new(&args.state)?;
    let name = args.database.as_str();
    let created = control::trusted_ips::create(
        &ctx.control(),
        name,
        &args.cidr,
        &args.description,
        &actor(&args.change),
    )?;
    done(&format!("Creating trusted IP range for database {name}"));
    if !args.cidr.contains('/') {
        eprintln!(
            "pgmtls: note: --cidr {} is the single address {}",
            args.cidr, created.rule.cidr
        );
    }
    if let Ok(db) = ctx.load(name) {
        if let Some(rule) = covering_rule(&db, &created.rule) {
            eprintln!(
                "pgmtls: note: IP rule {} ({}) overlaps {}: addresses it covers still need a \
                 client certificate",
                rule.id, rule.cidr, created.rule.cidr
            );
        }
    }
    print_one(
        &TrustedIpView::new(name, &created.rule, &ctx.proxy()),
        args.json,
    );
    Ok(ExitCode::SUCCESS)
}

fn delete(args: DeleteArgs) -> anyhow::Result<ExitCode> {
    let ctx = Ctx::new(&args.state)?;
    let name = args.database.as_str();
    let selector = match (&args.id, &args.cidr) {
        (Some(id), _) => Selector::Id(id),
        (None, Some(cidr)) => Selector::Cidr(cidr),
        (None, None) => bail!("name the trusted range to delete with --id ID or --cidr CIDR"),
    };
    let removed =
        control::trusted_ips::delete(&ctx.control(), name, selector, &actor(&args.change))?.rule;
    done(&format!("Deleting trusted IP range for database {name}"));
    // etcd mode: the replicas that have not applied the deletion still trust the block.
    let lagging = match ctx.proxy() {
        ProxyView::Fleet(f) => Some(f.lagging(f.trusted_ip_deleted_needs(name, &removed.id))),
        _ => None,
    };
    if args.json {
        let mut out = json!({
            "id": removed.id,
            "cidr": removed.cidr.to_string(),
            "description": removed.description,
            "deleted": true,
        });
        if let Some(l) = &lagging {
            out["lagging"] = json!(l);
        }
        say_raw!("{}", output::json(&out));
    } else if let Some(l) = &lagging {
        say_raw!(
            "{}",
            Block::new()
                .row("cidr", removed.cidr.to_string())
                .row("id", &removed.id)
                .render()
        );
        if l.is_empty() {
            say!("Every live replica has stopped trusting this block.");
        } else {
            say!(
                "Replicas trust this block until they apply the deletion: {}.",
                waiting_text(l)
            );
        }
    } else {
        say_raw!(
            "{}",
            Block::new()
                .row("cidr", removed.cidr.to_string())
                .row("id", &removed.id)
                .render()
        );
        say!(
            "The proxy stops trusting this block from its next reload, and closes the sessions \
             it admitted."
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// An IP rule sharing addresses with `range`, whose certificate requirement wins there.
fn covering_rule<'a>(db: &'a DatabaseState, range: &TrustedIp) -> Option<&'a crate::state::IpRule> {
    db.rules
        .iter()
        .find(|r| r.cidr.contains(&range.cidr.network()) || range.cidr.contains(&r.cidr.network()))
}
