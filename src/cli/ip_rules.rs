//! `pgmtls ip-rules DB|get|create|delete`: the allowlist of one database. Changes are
//! [`crate::control::ip_rules`]'s; this module holds the flags, [`super::address_list`]
//! prints, as it does for `pgmtls trusted-ips`.

use std::process::ExitCode;

use clap::{Args, Subcommand};

use super::address_list::{self, Command, CreateArgs, DeleteArgs, GetArgs, ListArgs};
use crate::control::ip_rules::List;

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

pub fn run(args: IpRulesArgs) -> anyhow::Result<ExitCode> {
    let command = match args.command {
        Some(IpRulesCommand::Create(a)) => Command::Create(a),
        Some(IpRulesCommand::Get(a)) => Command::Get(a),
        Some(IpRulesCommand::Delete(a)) => Command::Delete(a),
        Some(IpRulesCommand::List(a)) => Command::List(a),
        None => Command::List(args.list),
    };
    address_list::run(List::IpRules, command)
}
