//! `pgmtls trusted-ips DB|get|create|delete`: the trusted ranges of one database, admitted
//! without a client certificate where no IP rule covers the address (an IP rule takes
//! precedence). Changes are [`crate::control::trusted_ips`]'s; this module holds the flags,
//! [`super::address_list`] prints, as it does for `pgmtls ip-rules`.

use std::process::ExitCode;

use clap::{Args, Subcommand};

use super::address_list::{self, Command, CreateArgs, DeleteArgs, GetArgs, ListArgs};
use crate::control::ip_rules::List;

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

pub fn run(args: TrustedIpsArgs) -> anyhow::Result<ExitCode> {
    let command = match args.command {
        Some(TrustedIpsCommand::Create(a)) => Command::Create(a),
        Some(TrustedIpsCommand::Get(a)) => Command::Get(a),
        Some(TrustedIpsCommand::Delete(a)) => Command::Delete(a),
        Some(TrustedIpsCommand::List(a)) => Command::List(a),
        None => Command::List(args.list),
    };
    address_list::run(List::TrustedIps, command)
}
