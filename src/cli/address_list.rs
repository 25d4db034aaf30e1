//! What `pgmtls ip-rules` and `pgmtls trusted-ips` share. Both lists hold CIDR blocks of one
//! database and change through one control path ([`control::ip_rules::create_in`] and
//! [`control::ip_rules::delete_in`]); they print through this one module too, so a fix to one
//! command's output is a fix to the other's. Each command's module keeps only its flags (their
//! help text differs) and what it alone says.

use std::process::ExitCode;

use anyhow::{anyhow, bail};
use clap::Args;
use serde::Serialize;
use serde_json::json;
use time::OffsetDateTime;

use super::output::{self, human_time, Block, Table};
use super::status::{waiting_text, Lag, ProxyView, RuleStatus, Shown};
use super::{actor, done, ChangeArgs, Ctx, StateArgs};
use crate::control::ip_rules::{self as control, List, Selector};
use crate::state::{DatabaseState, IpRule};

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
    /// The block, e.g. 203.0.113.7/32 or 2001:db8::/48 (no host bits).
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
    /// The entry's id, as the list shows it.
    #[arg(long)]
    pub id: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub state: StateArgs,
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("entry").required(true).args(["id", "cidr"])))]
pub struct DeleteArgs {
    /// Database name.
    #[arg(value_name = "DATABASE")]
    pub database: String,
    /// The entry's id, as the list shows it.
    #[arg(long)]
    pub id: Option<String>,
    /// The entry's CIDR block.
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

/// A subcommand of either list, or a bare `pgmtls ip-rules DB` (a list).
pub enum Command {
    Create(CreateArgs),
    Get(GetArgs),
    Delete(DeleteArgs),
    List(ListArgs),
}

pub(crate) fn run(list: List, command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Create(a) => create(list, a),
        Command::Get(a) => get(list, a),
        Command::Delete(a) => delete(list, a),
        Command::List(a) => list_entries(list, a),
    }
}

/// One entry as shown by every command of both lists.
#[derive(Debug, Clone, Serialize)]
pub struct EntryView {
    pub id: String,
    pub cidr: String,
    pub description: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    /// Authorized, Authorizing or unknown.
    pub status: &'static str,
    /// etcd mode only: the live replicas that do not serve the entry yet.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lagging: Option<Vec<Lag>>,
    #[serde(skip)]
    pub status_text: String,
}

impl EntryView {
    fn new(list: List, db: &str, r: &IpRule, proxy: &ProxyView) -> EntryView {
        let status = status(list, proxy, db, &r.id);
        EntryView {
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

fn status(list: List, proxy: &ProxyView, db: &str, id: &str) -> Shown<RuleStatus> {
    match list {
        List::IpRules => proxy.rule_status(db, id),
        List::TrustedIps => proxy.trusted_ip_status(db, id),
    }
}

/// The verb of what an entry makes the proxy do, for the deletion's report: "admit"/"trust".
fn verb(list: List) -> (&'static str, &'static str) {
    match list {
        List::IpRules => ("admit", "admitting"),
        List::TrustedIps => ("trust", "trusting"),
    }
}

fn list_entries(list: List, args: ListArgs) -> anyhow::Result<ExitCode> {
    let database = args.database.as_deref().unwrap_or_default();
    let json = args.json;
    let ctx = Ctx::new(&args.state)?;
    let db = ctx.load(database)?;
    let proxy = ctx.proxy();
    let views: Vec<EntryView> = list
        .entries(&db)
        .iter()
        .map(|r| EntryView::new(list, database, r, &proxy))
        .collect();
    if json {
        say_raw!("{}", output::json(&views));
        return Ok(ExitCode::SUCCESS);
    }
    if views.is_empty() {
        match list {
            List::IpRules => say!(
                "No IP rules for database {database}: nobody can connect. Add one with `pgmtls \
                 ip-rules create {database} --cidr CIDR`."
            ),
            List::TrustedIps => say!(
                "No trusted IP ranges for database {database}: every client needs a certificate \
                 and an IP rule. Add one with `pgmtls trusted-ips create {database} --cidr CIDR`."
            ),
        }
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

fn get(list: List, args: GetArgs) -> anyhow::Result<ExitCode> {
    let (id, json) = (args.id.as_str(), args.json);
    let ctx = Ctx::new(&args.state)?;
    let db = ctx.load(&args.database)?;
    let entry = list
        .entries(&db)
        .iter()
        .find(|r| r.id == id)
        .ok_or_else(|| anyhow!("no {} with id {id:?} for database {}", list.noun(), db.name))?;
    print_one(&EntryView::new(list, &db.name, entry, &ctx.proxy()), json);
    Ok(ExitCode::SUCCESS)
}

fn print_one(view: &EntryView, json: bool) {
    if json {
        say_raw!("{}", output::json(view));
    } else {
        say_raw!("{}", view.block().render());
    }
}

fn create(list: List, args: CreateArgs) -> anyhow::Result<ExitCode> {
    let ctx = Ctx::new(&args.state)?;
    let name = args.database.as_str();
    let created = control::create_in(
        list,
        &ctx.control(),
        name,
        &args.cidr,
        &args.description,
        &actor(&args.change),
    )?;
    done(&format!("Creating {} for database {name}", list.noun()));
    if !args.cidr.contains('/') {
        eprintln!(
            "pgmtls: note: --cidr {} is the single address {}",
            args.cidr, created.rule.cidr
        );
    }
    if list == List::TrustedIps {
        if let Ok(db) = ctx.load(name) {
            if let Some(rule) = covering_rule(&db, &created.rule) {
                eprintln!(
                    "pgmtls: note: IP rule {} ({}) overlaps {}: addresses it covers still need \
                     a client certificate",
                    rule.id, rule.cidr, created.rule.cidr
                );
            }
        }
    }
    print_one(
        &EntryView::new(list, name, &created.rule, &ctx.proxy()),
        args.json,
    );
    Ok(ExitCode::SUCCESS)
}

/// An IP rule sharing addresses with `range`, whose certificate requirement wins there.
fn covering_rule<'a>(db: &'a DatabaseState, range: &IpRule) -> Option<&'a IpRule> {
    db.rules
        .iter()
        .find(|r| r.cidr.contains(&range.cidr.network()) || range.cidr.contains(&r.cidr.network()))
}

fn delete(list: List, args: DeleteArgs) -> anyhow::Result<ExitCode> {
    let ctx = Ctx::new(&args.state)?;
    let name = args.database.as_str();
    let noun = list.noun();
    let selector = match (&args.id, &args.cidr) {
        (Some(id), _) => Selector::Id(id),
        (None, Some(cidr)) => Selector::Cidr(cidr),
        (None, None) => bail!("name the {noun} to delete with --id ID or --cidr CIDR"),
    };
    let removed =
        control::delete_in(list, &ctx.control(), name, selector, &actor(&args.change))?.rule;
    done(&format!("Deleting {noun} for database {name}"));
    // etcd mode: the replicas that have not applied the deletion still honour the block.
    let lagging = match ctx.proxy() {
        ProxyView::Fleet(f) => Some(f.lagging(match list {
            List::IpRules => f.rule_deleted_needs(name, &removed.id),
            List::TrustedIps => f.trusted_ip_deleted_needs(name, &removed.id),
        })),
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
        return Ok(ExitCode::SUCCESS);
    }
    say_raw!(
        "{}",
        Block::new()
            .row("cidr", removed.cidr.to_string())
            .row("id", &removed.id)
            .render()
    );
    let (verb, verbing) = verb(list);
    match (&lagging, list) {
        (Some(l), _) if l.is_empty() => {
            say!("Every live replica has stopped {verbing} this block.")
        }
        (Some(l), _) => say!(
            "Replicas {verb} this block until they apply the deletion: {}.",
            waiting_text(l)
        ),
        (None, List::IpRules) => say!("The proxy stops admitting this block from its next reload."),
        (None, List::TrustedIps) => say!(
            "The proxy stops trusting this block from its next reload, and closes the sessions \
             it admitted."
        ),
    }
    Ok(ExitCode::SUCCESS)
}
