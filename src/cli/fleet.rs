//! `pgmtls fleet`: the replicas registered under `PREFIX/replicas/` (each one's id, version,
//! the revision it serves, its peer address and age), read from the etcd of `pgmtls.yaml`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context as _};
use clap::Args;
use serde_json::json;
use time::OffsetDateTime;

use super::output::{self, Table};
use crate::config::Config;
use crate::fleet::registry::{self, ReplicaEntry};
use crate::state::one_line;
use crate::store::etcd::EtcdStore;

#[derive(Args, Debug)]
pub struct FleetArgs {
    /// pgmtls.yaml with an `etcd:` section; its endpoints, prefix and credentials are used.
    #[arg(long, env = "PGMTLS_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Print JSON: an object with a `replicas` array.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: FleetArgs) -> anyhow::Result<ExitCode> {
    let Some(path) = &args.config else {
        bail!(
            "no config: give --config FILE (or PGMTLS_CONFIG), a pgmtls.yaml with an etcd: section"
        );
    };
    let config = Config::load(path).map_err(|e| anyhow!("{}", one_line(&e)))?;
    let Some(etcd) = &config.etcd else {
        bail!(
            "{}: serves a state directory (one node); a fleet of replicas needs an etcd: section",
            path.display()
        );
    };
    let store_config = super::etcd_config(etcd)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let (entries, bad) = runtime.block_on(async {
        let store = EtcdStore::connect(store_config).await?;
        registry::list(&store).await
    })?;
    for b in &bad {
        eprintln!("warning: {b}");
    }
    let now = OffsetDateTime::now_utc();
    if args.json {
        print!("{}", output::json(&json!({ "replicas": entries })));
    } else if entries.is_empty() {
        println!(
            "No replica is registered under {}/{}",
            etcd.prefix,
            registry::REPLICAS
        );
    } else {
        print!("{}", table(&entries, now).render());
    }
    Ok(ExitCode::SUCCESS)
}

fn table(entries: &[ReplicaEntry], now: OffsetDateTime) -> Table {
    let mut t = Table::new(&["ID", "VERSION", "REVISION", "PEER", "AGE"]);
    for e in entries {
        let age = (now - e.started_at).whole_seconds().max(0);
        t.row(vec![
            e.id.clone(),
            e.version.clone(),
            e.revision.to_string(),
            e.peer_addr.map_or_else(|| "-".into(), |a| a.to_string()),
            humantime::format_duration(std::time::Duration::from_secs(age.unsigned_abs()))
                .to_string(),
        ]);
    }
    t
}
