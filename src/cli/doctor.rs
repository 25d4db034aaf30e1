//! `pgmtls doctor DB --cert FILE`: would a client with this certificate get in, and if not,
//! with which reason would the proxy refuse it? Offline, from the state (a directory or the
//! config's etcd prefix); the answers come from [`crate::doctor`], which asks the data plane's
//! own decisions. Exit status 0: admitted; 1: refused; 2: the question could not be asked.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, Context as _};
use clap::Args;

use super::{output, Ctx, StateArgs};
use crate::config::Config;
use crate::doctor::{diagnose, Client, Diagnosis};
use crate::metrics::Metrics;
use crate::snapshot::Snapshot;
use crate::state::one_line;

#[derive(Args, Debug)]
pub struct DoctorArgs {
    /// Database name.
    #[arg(value_name = "DATABASE")]
    pub database: String,
    /// The client certificate (PEM), intermediates after it if the client sends them.
    #[arg(long, value_name = "FILE")]
    pub cert: PathBuf,
    /// The client's address, as the proxy sees it (behind a balancer: as its PROXY header
    /// names it) [default: the address is not checked].
    #[arg(long, value_name = "IP")]
    pub from: Option<IpAddr>,
    /// The Postgres user the client logs in as, for the identity policy.
    #[arg(long, value_name = "NAME")]
    pub user: Option<String>,
    /// The server name (SNI) the client sends, for a database on the shared listener.
    #[arg(long, value_name = "NAME")]
    pub sni: Option<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub state: StateArgs,
}

pub fn run(a: DoctorArgs) -> anyhow::Result<ExitCode> {
    match ask(&a) {
        Ok(d) => {
            if a.json {
                println!("{}", output::json(&d));
            } else {
                print!("{}", render(&d));
            }
            Ok(if d.admitted {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Err(e) => {
            eprintln!("pgmtls: error: {e:#}");
            Ok(ExitCode::from(2))
        }
    }
}

fn ask(a: &DoctorArgs) -> anyhow::Result<Diagnosis> {
    let ctx = Ctx::new(&a.state)?;
    ctx.require(&a.database)?;
    let pem = std::fs::read(&a.cert)
        .with_context(|| format!("--cert: cannot read {}", a.cert.display()))?;
    let chain =
        crate::tls_store::certs(&a.cert, &pem).map_err(|e| anyhow!("--cert: {}", one_line(&e)))?;
    // Every database: on the shared listener the SNI may pick another one.
    let control = ctx.control();
    let mut states = Vec::new();
    for name in control.database_names()? {
        states.push(control.load(&name)?);
    }
    let snap =
        Snapshot::build(0, &states, &Metrics::new()).map_err(|e| anyhow!("{}", one_line(&e)))?;
    let default = match &a.state.config {
        Some(path) => {
            Config::load(path)
                .map_err(|e| anyhow!("{}", one_line(&e)))?
                .default_database
        }
        None => None,
    };
    let client = Client {
        chain: &chain,
        from: a.from,
        user: a.user.as_deref(),
        sni: a.sni.as_deref(),
    };
    diagnose(
        &snap,
        &a.database,
        default.as_deref(),
        &client,
        crate::cli::now(),
    )
    .map_err(|e| anyhow!(e))
}

/// One line per check: its name, `ok`, `REFUSED` or `-` (not checked), the reason label the
/// proxy would log, and what was found; then the verdict.
fn render(d: &Diagnosis) -> String {
    let mut out = String::new();
    for c in &d.checks {
        let status = match c.ok {
            Some(true) => "ok",
            Some(false) => "REFUSED",
            None => "-",
        };
        let reason = c.reason.map(|r| format!(" [{r}]")).unwrap_or_default();
        out.push_str(&format!(
            "{:<12} {:<8}{} {}\n",
            c.check,
            status,
            reason,
            output::clean(&c.detail)
        ));
    }
    match (d.admitted, d.reason) {
        (true, _) => out.push_str(&format!("verdict: admitted to {}\n", d.database)),
        (false, Some(r)) => out.push_str(&format!("verdict: refused: {r}\n")),
        (false, None) => out.push_str(&format!(
            "verdict: not {}: the server name routes elsewhere\n",
            d.database
        )),
    }
    out
}
