//! The Heroku-style control commands (`mtls`, `ip-rules`, `trusted-ips`, `certificates`,
//! `databases`): flags in, changes to the state directory and human or JSON output out.
//!
//! Every change is a call into [`crate::control`], the one mutation path the console shares:
//! it takes the writers' lock, loads the database through the proxy's parsers, checks the new
//! content with [`DatabaseRuntime::build`](crate::snapshot::DatabaseRuntime::build) (what the
//! proxy runs on reload), writes it atomically and appends one audit line. These modules only
//! parse flags, ask for confirmation, and print. A check that fails changes nothing.
//! Status words (`Operational`, `Authorized`, `ready`, ...) that describe the running proxy
//! come from its `/status` endpoint ([`status`]), never from the files alone; in etcd mode
//! from the replica registry, against the revision of the change.

pub mod address_list;
pub mod certificates;
pub mod doctor;
pub mod fleet;
pub mod ip_rules;
pub mod mtls;
pub mod output;
pub mod state;
pub mod status;
pub mod trusted_ips;

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context as _};
use clap::{Args, Subcommand};

use crate::config::Config;
use crate::control::{Control, EtcdBackend};
use crate::state::{one_line, DatabaseState, StateDir};
use crate::store::etcd::EtcdConfig;
use status::{AdminUrl, FleetView, ProxyView};

/// The control commands, flattened into `pgmtls`'s own subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Enable (`create`), show (`mtls DB`) or disable (`destroy`) mutual TLS for a database.
    Mtls(Box<mtls::MtlsArgs>),
    /// Manage the IP allowlist of a database (at most 60 rules).
    #[command(name = "ip-rules")]
    IpRules(Box<ip_rules::IpRulesArgs>),
    /// Manage the trusted IP ranges of a database: admitted without a client certificate
    /// where no IP rule covers the address (at most 20).
    #[command(name = "trusted-ips")]
    TrustedIps(Box<trusted_ips::TrustedIpsArgs>),
    /// Manage client certificates: list, create, download, revoke, renew.
    Certificates(Box<certificates::CertificatesArgs>),
    /// List the databases with mutual TLS enabled.
    Databases(mtls::DatabasesArgs),
    /// Move the state between a directory and an etcd prefix (`import`, `export`).
    State(state::StateCmdArgs),
    /// List the replicas serving from etcd: id, version, revision served, peer address, age.
    Fleet(fleet::FleetArgs),
    /// Serve the web console on loopback: the same changes as these commands, in a browser.
    Console(crate::console::ConsoleArgs),
    /// Would a client with this certificate get in? Each check with the reason the proxy
    /// would log; exit 0 when admitted, 1 when refused (offline, from the state).
    Doctor(Box<doctor::DoctorArgs>),
}

/// Runs one control command.
pub fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Mtls(a) => mtls::run(*a),
        Command::IpRules(a) => ip_rules::run(*a),
        Command::TrustedIps(a) => trusted_ips::run(*a),
        Command::Certificates(a) => certificates::run(*a),
        Command::Databases(a) => mtls::databases(a),
        Command::State(a) => state::run(a),
        Command::Fleet(a) => fleet::run(a),
        Command::Console(a) => crate::console::run(a),
        Command::Doctor(a) => doctor::run(*a),
    }
}

/// Where the state is, and where the proxy that serves it answers.
#[derive(Args, Debug, Clone, Default)]
pub struct StateArgs {
    /// State directory [default: the config file's state_dir].
    #[arg(long, env = "PGMTLS_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// pgmtls.yaml; its state_dir and admin_listen are used unless given directly.
    #[arg(long, env = "PGMTLS_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Admin endpoint of the running proxy (http://HOST:PORT), for status words.
    #[arg(long, env = "PGMTLS_ADMIN_URL", value_name = "URL")]
    pub admin_url: Option<String>,
}

/// `--key-type`: clap lists the values in `--help` and refuses others before anything runs.
pub(crate) fn key_type_parser() -> impl clap::builder::TypedValueParser<Value = crate::pki::KeyType>
{
    use clap::builder::TypedValueParser as _;
    clap::builder::PossibleValuesParser::new(
        crate::pki::KeyType::ALL.map(crate::pki::KeyType::as_str),
    )
    .try_map(|s| s.parse::<crate::pki::KeyType>())
}

/// Options of every command that changes something.
#[derive(Args, Debug, Clone, Default)]
pub struct ChangeArgs {
    /// Who makes the change, for the audit log [default: the OS user].
    #[arg(long, env = "PGMTLS_ACTOR", value_name = "NAME")]
    pub actor: Option<String>,
}

/// A resolved state store (a directory, or the config's etcd prefix) plus the way to reach
/// the proxy.
pub(crate) struct Ctx {
    pub state: StateDir,
    control: Control,
    admin: Option<AdminUrl>,
    /// Set in etcd mode: status words come from the replica registry there.
    fleet: Option<EtcdConfig>,
}

/// The `etcd:` section as the store's settings; reads the password file.
pub fn etcd_config(e: &crate::config::EtcdSettings) -> anyhow::Result<EtcdConfig> {
    let mut c = EtcdConfig::new(e.endpoints.clone(), &e.prefix);
    if let (Some(user), Some(file)) = (&e.user, &e.password_file) {
        let password = std::fs::read_to_string(file)
            .with_context(|| format!("etcd.password_file: cannot read {}", file.display()))?;
        c.user = Some((
            user.clone(),
            password.trim_end_matches(['\n', '\r']).to_owned(),
        ));
    }
    c.tls = e.tls().map_err(|m| anyhow::anyhow!(m))?;
    Ok(c)
}

impl Ctx {
    pub fn new(args: &StateArgs) -> anyhow::Result<Ctx> {
        let config = match &args.config {
            Some(path) => Some(Config::load(path).map_err(|e| anyhow!("{}", one_line(&e)))?),
            None => None,
        };
        let admin = match &args.admin_url {
            Some(url) => Some(url.parse::<AdminUrl>().map_err(|e| anyhow!("{e}"))?),
            None => config
                .as_ref()
                .and_then(|c| c.admin_listen)
                .map(AdminUrl::from_listen),
        };
        // The config's etcd prefix is the state unless a directory is named directly: what
        // the CLI shows and changes is then what the fleet serves.
        let etcd = config.as_ref().and_then(|c| c.etcd.as_ref());
        let mut fleet = None;
        let control = match (&args.state_dir, etcd) {
            (Some(dir), _) => Control::new(StateDir::new(dir)),
            (None, Some(e)) => {
                let store = etcd_config(e)?;
                fleet = Some(store.clone());
                Control::etcd(EtcdBackend::connect(store)?)
            }
            (None, None) => match config.as_ref().and_then(|c| c.state_dir.clone()) {
                Some(dir) => Control::new(StateDir::new(dir)),
                None => bail!(
                    "no state directory: give --state-dir DIR (or PGMTLS_STATE_DIR), or --config \
                     FILE"
                ),
            },
        };
        Ok(Ctx {
            state: control.state().clone(),
            control,
            admin,
            fleet,
        })
    }

    /// Write access to the state, through the one mutation path.
    pub fn control(&self) -> Control {
        self.control.clone()
    }

    /// The etcd store, when the state lives there.
    pub fn etcd(&self) -> Option<&EtcdBackend> {
        self.control.etcd_backend()
    }

    /// Asks the running proxy what it serves (one request, short timeout); in etcd mode, the
    /// replica registry what the live replicas serve.
    pub fn proxy(&self) -> ProxyView {
        match &self.fleet {
            Some(config) => match FleetView::read(config.clone()) {
                Ok(view) => ProxyView::Fleet(view),
                Err(reason) => ProxyView::Unreachable { reason },
            },
            None => ProxyView::query(self.admin.as_ref()),
        }
    }

    /// The running proxy's admin endpoint, as `--admin-url` or the config's `admin_listen`
    /// name it (in etcd mode, the replica this config describes).
    pub fn admin_url(&self) -> Option<&AdminUrl> {
        self.admin.as_ref()
    }

    /// Loads one database through the proxy's own loader.
    pub fn load(&self, name: &str) -> anyhow::Result<DatabaseState> {
        Ok(self.control().load(name)?)
    }

    /// Fails with a one-line error for an invalid or unknown database name.
    pub fn require(&self, name: &str) -> anyhow::Result<()> {
        Ok(self.control().require(name)?)
    }
}

pub(crate) use crate::control::now;

/// `--actor`, else the person behind sudo, else the OS user.
pub(crate) fn actor(change: &ChangeArgs) -> String {
    if let Some(a) = change.actor.as_deref().filter(|a| !a.trim().is_empty()) {
        return output::clean(a.trim());
    }
    for var in ["SUDO_USER", "USER", "LOGNAME"] {
        if let Ok(v) = std::env::var(var) {
            if !v.is_empty() {
                return output::clean(&v);
            }
        }
    }
    // No login variables (cron, systemd, containers): name the effective uid.
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(str::to_owned))
        })
        .unwrap_or_else(|| "?".into());
    let name = std::fs::read_to_string("/etc/passwd").ok().and_then(|p| {
        p.lines().find_map(|l| {
            let mut f = l.split(':');
            let (name, _, id) = (f.next()?, f.next()?, f.next()?);
            (id == uid).then(|| name.to_owned())
        })
    });
    match name {
        Some(n) => output::clean(&n),
        None => format!("uid:{uid}"),
    }
}

/// Asks before a change that opens or closes access. `--confirm DB` answers without a prompt;
/// without it and without a terminal the command refuses rather than assuming yes.
pub(crate) fn confirm(database: &str, given: Option<&str>, question: &str) -> anyhow::Result<()> {
    match given {
        Some(g) if g == database => return Ok(()),
        Some(g) => bail!("--confirm {g:?} does not match the database name {database:?}"),
        None => {}
    }
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        bail!(
            "confirmation required and stdin is not a terminal: re-run with --confirm {database}"
        );
    }
    eprint!("{question} (yes/no): ");
    let mut answer = String::new();
    stdin
        .read_line(&mut answer)
        .context("cannot read the answer")?;
    let answer = answer.trim();
    if answer.eq_ignore_ascii_case("yes") || answer.eq_ignore_ascii_case("y") || answer == database
    {
        Ok(())
    } else {
        bail!("aborted: nothing was changed")
    }
}

/// Prints a progress line the way the reference does (`Doing X... done`), on stderr so that
/// stdout carries only the result.
pub(crate) fn done(what: &str) {
    eprintln!("{what}... done");
}

/// A mistyped subcommand of a command group, such as `certificates downlaod orders`: clap reads
/// `downlaod` as the database and then cannot place `orders`, and says so in terms of that
/// misreading. When a group gets two words where the first is no subcommand of it, this names
/// the unknown subcommand and the closest real one instead, as clap does for flags.
pub fn subcommand_typo(argv: &[std::ffi::OsString], root: &clap::Command) -> Option<clap::Error> {
    let words = positionals(argv.get(1..).unwrap_or_default(), root);
    let group_name = words.first()?;
    let group = root.find_subcommand(group_name)?;
    if !group.has_subcommands() {
        return None;
    }
    let rest = positionals(
        argv.iter()
            .skip_while(|a| a.to_str() != Some(group_name.as_str()))
            .skip(1)
            .cloned()
            .collect::<Vec<_>>()
            .as_slice(),
        group,
    );
    let [typed, _database, ..] = rest.as_slice() else {
        return None;
    };
    let known = |name: &str| {
        name == "help"
            || group
                .get_subcommands()
                .any(|s| s.get_name() == name || s.get_all_aliases().any(|a| a == name))
    };
    if known(typed) {
        return None;
    }
    let best = group
        .get_subcommands()
        .map(|s| (strsim::jaro(typed, s.get_name()), s.get_name()))
        .filter(|(score, _)| *score > 0.7)
        .max_by(|a, b| a.0.total_cmp(&b.0));
    let tip = best
        .map(|(_, name)| format!("\n\n  tip: a similar subcommand exists: '{name}'"))
        .unwrap_or_default();
    Some(clap::Error::raw(
        clap::error::ErrorKind::InvalidSubcommand,
        format!(
            "unrecognized subcommand '{typed}' for 'pgmtls {group_name}'{tip}\n\nUsage: pgmtls \
             {group_name} <COMMAND> <DATABASE> [OPTIONS]\n\nFor more information, try 'pgmtls \
             {group_name} --help'.\n"
        ),
    ))
}

/// The words of `args` that are not options of `cmd` or their values.
fn positionals(args: &[std::ffi::OsString], cmd: &clap::Command) -> Vec<String> {
    let takes_value = |word: &str| {
        cmd.get_arguments().any(|a| {
            let named = word
                .strip_prefix("--")
                .map(|l| a.get_long() == Some(l))
                .or_else(|| {
                    word.strip_prefix('-').map(|s| {
                        s.len() == 1 && a.get_short().map(String::from).as_deref() == Some(s)
                    })
                })
                .unwrap_or(false);
            named && a.get_action().takes_values()
        })
    };
    let mut out = Vec::new();
    let mut iter = args.iter().filter_map(|a| a.to_str());
    while let Some(word) = iter.next() {
        if word == "--" {
            out.extend(iter.map(str::to_owned));
            break;
        }
        if word.starts_with('-') && word.len() > 1 {
            if !word.contains('=') && takes_value(word) {
                iter.next();
            }
            continue;
        }
        out.push(word.to_owned());
    }
    out
}
