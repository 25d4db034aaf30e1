//! `pgmtls ip-rules DB|get|create|delete`: the allowlist of one database, written through
//! the same parser the proxy loads `ip-rules.yaml` with.

use std::process::ExitCode;

use anyhow::{anyhow, bail};
use clap::{Args, Subcommand};
use ipnet::IpNet;
use serde::Serialize;
use serde_json::json;
use time::OffsetDateTime;
use uuid::Uuid;

use super::output::{self, human_time, Block, Table};
use super::status::ProxyView;
use super::{done, now, validate, ChangeArgs, Ctx, StateArgs};
use crate::allowlist::{parse_cidr, MAX_RULES};
use crate::state::{
    self, ip_rules_to_yaml, one_line, parse_ip_rules, validate_description, IpRule, PUBLIC_MODE,
};

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
pub struct DeleteArgs {
    /// Database name.
    #[arg(value_name = "DATABASE")]
    pub database: String,
    /// Rule id.
    #[arg(long, required_unless_present = "cidr", conflicts_with = "cidr")]
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

/// Parses `--cidr` like the rules file does, and refuses IPv4-mapped IPv6 blocks: the proxy
/// matches IPv4 clients as IPv4, so such a rule would never admit anyone.
pub fn parse_rule_cidr(text: &str) -> Result<IpNet, String> {
    let net = parse_cidr(text)?;
    if let IpNet::V6(v6) = net {
        if let Some(v4) = v6.network().to_ipv4_mapped() {
            if v6.prefix_len() >= 96 {
                return Err(format!(
                    "{text} is an IPv4-mapped IPv6 block; write it as {v4}/{}",
                    v6.prefix_len() - 96
                ));
            }
        }
    }
    Ok(net)
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

/// Writes a new rule list after re-reading it with the proxy's parser and building the
/// database with it.
fn save(ctx: &Ctx, db: &state::DatabaseState, rules: &[IpRule]) -> anyhow::Result<()> {
    let file = db.dir.join(state::IP_RULES);
    let yaml = ip_rules_to_yaml(rules);
    let parsed = parse_ip_rules(&file, &yaml).map_err(|e| anyhow!("{}", one_line(&e)))?;
    let mut candidate = db.clone();
    candidate.rules = parsed;
    validate(&candidate)?;
    ctx.state
        .write_database_file(&db.name, state::IP_RULES, yaml.as_bytes(), PUBLIC_MODE)?;
    Ok(())
}

fn create(args: CreateArgs) -> anyhow::Result<ExitCode> {
    let cidr = parse_rule_cidr(&args.cidr).map_err(|e| anyhow!("{e}"))?;
    validate_description(&args.description).map_err(|e| anyhow!("{e}"))?;
    let ctx = Ctx::new(&args.state)?;
    let name = args.database.as_str();
    let mut change = ctx.begin(Some(name), &args.change)?;
    let db = ctx.load(name)?;
    if db.rules.len() >= MAX_RULES {
        bail!(
            "database {name} already has {} IP rules, the maximum is {MAX_RULES}; delete one first",
            db.rules.len()
        );
    }
    if let Some(dup) = db.rules.iter().find(|r| r.cidr == cidr) {
        bail!("an IP rule for {cidr} already exists (id {})", dup.id);
    }
    let at = now();
    let rule = IpRule {
        id: Uuid::new_v4().to_string(),
        cidr,
        description: args.description.clone(),
        created_at: at,
        updated_at: at,
    };
    let mut rules = db.rules.clone();
    rules.push(rule.clone());
    save(&ctx, &db, &rules)?;
    change.record(
        "ip_rule.create",
        Some(name),
        json!({"id": rule.id, "cidr": cidr.to_string(), "description": rule.description}),
    )?;
    drop(change);
    done(&format!("Creating IP rule for database {name}"));
    print_one(&RuleView::new(name, &rule, &ctx.proxy()), args.json);
    Ok(ExitCode::SUCCESS)
}

fn delete(args: DeleteArgs) -> anyhow::Result<ExitCode> {
    let cidr = match &args.cidr {
        Some(c) => Some(parse_rule_cidr(c).map_err(|e| anyhow!("{e}"))?),
        None => None,
    };
    let ctx = Ctx::new(&args.state)?;
    let name = args.database.as_str();
    let mut change = ctx.begin(Some(name), &args.change)?;
    let db = ctx.load(name)?;
    let found = db.rules.iter().position(|r| match (&args.id, cidr) {
        (Some(id), _) => r.id == *id,
        (None, Some(c)) => r.cidr == c,
        (None, None) => false,
    });
    let Some(index) = found else {
        match (&args.id, cidr) {
            (Some(id), _) => bail!("no IP rule with id {id:?} for database {name}"),
            _ => bail!(
                "no IP rule for {} in database {name}",
                cidr.map(|c| c.to_string()).unwrap_or_default()
            ),
        }
    };
    let mut rules = db.rules.clone();
    let removed = rules.remove(index);
    save(&ctx, &db, &rules)?;
    change.record(
        "ip_rule.delete",
        Some(name),
        json!({"id": removed.id, "cidr": removed.cidr.to_string()}),
    )?;
    drop(change);
    done(&format!("Deleting IP rule for database {name}"));
    if args.json {
        say_raw!(
            "{}",
            output::json(&json!({
                "id": removed.id,
                "cidr": removed.cidr.to_string(),
                "description": removed.description,
                "deleted": true,
            }))
        );
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_cidrs_refuse_host_bits_and_mapped_v4() {
        assert_eq!(
            parse_rule_cidr("2001:db8::/48").unwrap().to_string(),
            "2001:db8::/48"
        );
        let e = parse_rule_cidr("10.0.0.1/8").unwrap_err();
        assert!(e.contains("did you mean 10.0.0.0/8"), "{e}");
        let e = parse_rule_cidr("::ffff:10.0.0.0/104").unwrap_err();
        assert!(e.contains("write it as 10.0.0.0/8"), "{e}");
        assert!(parse_rule_cidr("::/0").is_ok());
    }
}
