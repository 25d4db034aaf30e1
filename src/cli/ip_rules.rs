//! `pgmtls ip-rules DB|get|create|delete`: the allowlist of one database. Changes are
//! [`control::ip_rules`]'s; this module parses flags and prints.

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
use crate::state::IpRule;

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct IpRulesArgs {
    #[command(subcommand)]
    pub command: Option<IpRulesCommand>,
    #[command(flatten)]
    pub list: ListArgs,
}

#[derive(Subcommand, Debug)]
pub enum IpRulesCommand {
    /// Allow a CIDR block to connect (at most 60 rules per database).
    Create(CreateArgs),
    /// Show one rule.
    Get(GetArgs),
    /// Remove a rule by --id or --cidr; the proxy stops admitting it from its next reload.
    Delete(DeleteArgs),
    /// List rules (same as `pgmtls ip-rules DB`).
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
    /// Block to allow, e.g. 203.0.113.7/32 or 2001:db8::/48 (no host bits).
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
    /// Rule id.
    #[arg(long)]
    pub id: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub state: StateArgs,
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("rule").required(true).args(["id", "cidr"])))]
pub struct DeleteArgs {
    /// Database name.
    #[arg(value_name = "DATABASE")]
    pub database: String,
    /// Rule id.
    #[arg(long)]
    pub id: Option<String>,
    /// The rule's CIDR block.
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

pub fn run(args: IpRulesArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        Some(IpRulesCommand::Create(a)) => create(a),
        Some(IpRulesCommand::Get(a)) => get(a),
        Some(IpRulesCommand::Delete(a)) => delete(a),
        Some(IpRulesCommand::List(a)) => list(a),
        None => list(args.list),
    }
}

/// One rule as shown by every command.
#[derive(Debug, Clone, Serialize)]
pub struct RuleView {
    pub id: String,
    pub cidr: String,
    pub description: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    /// Authorized, Authorizing or unknown.
    pub status: &'static str,
    /// etcd mode only: the live replicas that do not serve the rule yet.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lagging: Option<Vec<Lag>>,
    #[serde(skip)]
    pub status_text: String,
}

impl RuleView {
    fn new(db: &str, r: &IpRule, proxy: &ProxyView) -> RuleView {
        let status = proxy.rule_status(db, &r.id);
        RuleView {
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
    let views: Vec<RuleView> = db
        .rules
        .iter()
        .map(|r| RuleView::new(&name, r, &proxy))
        .collect();
    if args.json {
        say_raw!("{}", output::json(&views));
        return Ok(ExitCode::SUCCESS);
    }
    if views.is_empty() {
        say!(
            "No IP rules for database {name}: nobody can connect. Add one with `pgmtls ip-rules \
             create {name} --cidr CIDR`."
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
        .rules
        .iter()
        .find(|r| r.id == args.id)
        .ok_or_else(|| anyhow!("no IP rule with id {:?} for database {}", args.id, db.name))?;
    let view = RuleView::new(&db.name, rule, &ctx.proxy());
    print_one(&view, args.json);
    Ok(ExitCode::SUCCESS)
}

fn print_one(view: &RuleView, json: bool) {
    if json {
        say_raw!("{}", output::json(view));
    } else {
        say_raw!("{}", view.block().render());
    }
}

fn create(args: CreateArgs) -> anyhow::Result<ExitCode> {
    let ctx = Ctx::new(&args.state)?;
    let name = args.database.as_str();
    let created = control::ip_rules::create(
        &ctx.control(),
        name,
        &args.cidr,
        &args.description,
        &actor(&args.change),
    )?;
    done(&format!("Creating IP rule for database {name}"));
    if !args.cidr.contains('/') {
        eprintln!(
            "pgmtls: note: --cidr {} is the single address {}",
            args.cidr, created.rule.cidr
        );
    }
    print_one(&RuleView::new(name, &created.rule, &ctx.proxy()), args.json);
    Ok(ExitCode::SUCCESS)
}

fn delete(args: DeleteArgs) -> anyhow::Result<ExitCode> {
    let ctx = Ctx::new(&args.state)?;
    let name = args.database.as_str();
    let selector = match (&args.id, &args.cidr) {
        (Some(id), _) => Selector::Id(id),
        (None, Some(cidr)) => Selector::Cidr(cidr),
        (None, None) => bail!("name the rule to delete with --id ID or --cidr CIDR"),
    };
    let removed =
        control::ip_rules::delete(&ctx.control(), name, selector, &actor(&args.change))?.rule;
    done(&format!("Deleting IP rule for database {name}"));
    // etcd mode: the replicas that have not applied the deletion still admit the block.
    let lagging = match ctx.proxy() {
        ProxyView::Fleet(f) => Some(f.lagging(f.rule_deleted_needs(name, &removed.id))),
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
            say!("Every live replica has stopped admitting this block.");
        } else {
            say!(
                "Replicas admit this block until they apply the deletion: {}.",
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
        say!("The proxy stops admitting this block from its next reload.");
    }
    Ok(ExitCode::SUCCESS)
}
