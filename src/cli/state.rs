//! `pgmtls state import|export`: moves the state between a directory and an etcd prefix, for
//! migrating a single node to a fleet and for backups. Keys follow docs/STATE.md: each file is
//! the record at its relative path, except the CA and client keys (under `PREFIX/secrets/`)
//! and the audit log (one key per line under `PREFIX/audit/`). A round trip directory -> etcd
//! -> directory gives the same bytes and the same file modes. `archive/` is not moved.

use std::collections::BTreeMap;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use clap::{Args, Subcommand};

use super::{done, StateArgs};
use crate::state::records::{
    audit_line_key, from_store_key, to_store_key, ARCHIVE_PREFIX, AUDIT_PREFIX,
};
use crate::state::{
    one_line, write_atomic, StateDir, AUDIT_LOG, CA_KEY, CLIENT_KEY, DATABASES_DIR,
    PRIVATE_DIR_MODE, PRIVATE_MODE, PUBLIC_MODE, SERVER_KEY,
};
use crate::store::check_key;
use crate::store::etcd::{EtcdConfig, EtcdStore};
use crate::store::{Listing, Write};

/// etcd's default `--max-txn-ops` is 128: leave room for the guard.
const MAX_OPS_PER_COMMIT: usize = 100;
/// etcd's default `--max-request-bytes` is 1.5 MiB.
const MAX_BYTES_PER_COMMIT: usize = 1024 * 1024;

#[derive(Args, Debug)]
pub struct StateCmdArgs {
    #[command(subcommand)]
    pub command: StateCommand,
}

#[derive(Subcommand, Debug)]
pub enum StateCommand {
    /// Copy the state directory into an etcd prefix (refuses a non-empty prefix without --force).
    Import(ImportArgs),
    /// Copy the state under an etcd prefix into a new directory (a backup, or back to one node).
    Export(ExportArgs),
}

/// How to reach etcd.
#[derive(Args, Debug, Clone)]
pub struct EtcdArgs {
    /// etcd client URLs, comma-separated (http://HOST:PORT or https://HOST:PORT).
    #[arg(
        long,
        env = "PGMTLS_ETCD_ENDPOINTS",
        value_name = "URLS",
        value_delimiter = ','
    )]
    pub etcd_endpoints: Vec<String>,
    /// Key prefix of this installation, e.g. /pgmtls.
    #[arg(long, env = "PGMTLS_ETCD_PREFIX", value_name = "PREFIX")]
    pub etcd_prefix: String,
    /// etcd user, when the cluster has authentication on.
    #[arg(long, env = "PGMTLS_ETCD_USER", value_name = "NAME")]
    pub etcd_user: Option<String>,
    /// File holding the etcd user's password.
    #[arg(long, value_name = "FILE", requires = "etcd_user")]
    pub etcd_password_file: Option<PathBuf>,
    /// CA of etcd's server certificate, for https:// endpoints.
    #[arg(long, env = "PGMTLS_ETCD_CA_FILE", value_name = "FILE")]
    pub etcd_ca_file: Option<PathBuf>,
    /// Client certificate, for an etcd with --client-cert-auth.
    #[arg(long, value_name = "FILE", requires = "etcd_key_file")]
    pub etcd_cert_file: Option<PathBuf>,
    /// The client certificate's private key.
    #[arg(long, value_name = "FILE", requires = "etcd_cert_file")]
    pub etcd_key_file: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct ImportArgs {
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// Replace what the prefix holds (records not in the directory are deleted).
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub state: StateArgs,
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// Directory to write; must be absent or empty.
    #[arg(long, value_name = "DIR")]
    pub to: PathBuf,
}

pub fn run(args: StateCmdArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    match args.command {
        StateCommand::Import(a) => runtime.block_on(import(a)),
        StateCommand::Export(a) => runtime.block_on(export(a)),
    }
}

impl EtcdArgs {
    pub fn config(&self) -> anyhow::Result<EtcdConfig> {
        if self.etcd_endpoints.is_empty() {
            bail!("no etcd endpoint: give --etcd-endpoints URL (or PGMTLS_ETCD_ENDPOINTS)");
        }
        let prefix = self.etcd_prefix.trim_end_matches('/');
        if !prefix.starts_with('/') || prefix.len() < 2 {
            bail!(
                "--etcd-prefix {:?}: give an absolute key prefix such as /pgmtls",
                self.etcd_prefix
            );
        }
        let mut config = EtcdConfig::new(self.etcd_endpoints.clone(), prefix);
        if let Some(user) = &self.etcd_user {
            let password = match &self.etcd_password_file {
                Some(f) => std::fs::read_to_string(f)
                    .with_context(|| format!("cannot read {}", f.display()))?
                    .trim_end_matches(['\n', '\r'])
                    .to_owned(),
                None => bail!("--etcd-user needs --etcd-password-file"),
            };
            config.user = Some((user.clone(), password));
        }
        let client = match (&self.etcd_cert_file, &self.etcd_key_file) {
            (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
            _ => None,
        };
        if self.etcd_ca_file.is_some() || client.is_some() {
            let tls = crate::store::etcd::EtcdTls::read(self.etcd_ca_file.as_deref(), client)
                .map_err(|m| {
                    anyhow::anyhow!(
                        "--{}",
                        m.replacen("etcd.", "etcd-", 1).replacen('_', "-", 1)
                    )
                })?;
            config.tls = Some(tls);
        }
        config.timeout = Duration::from_secs(10);
        Ok(config)
    }
}

/// Whether a file of the state directory is a private key (written 0600).
fn is_private(rel: &str) -> bool {
    let file = rel.rsplit('/').next().unwrap_or(rel);
    rel.starts_with(&format!("{DATABASES_DIR}/"))
        && [SERVER_KEY, CA_KEY, CLIENT_KEY].contains(&file)
}

/// Every file under `databases/` (dot-names skipped), by path relative to the root.
fn walk(root: &Path, rel: &str, out: &mut BTreeMap<String, Vec<u8>>) -> anyhow::Result<()> {
    let dir = root.join(rel);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && rel == DATABASES_DIR => return Ok(()),
        Err(e) => return Err(anyhow!("{}: cannot list: {e}", dir.display())),
    };
    for entry in entries {
        let entry = entry.with_context(|| format!("{}: cannot list", dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let child = format!("{rel}/{name}");
        let path = entry.path();
        let kind = entry
            .file_type()
            .with_context(|| format!("{}: cannot stat", path.display()))?;
        if kind.is_dir() {
            walk(root, &child, out)?;
        } else if kind.is_file() {
            if is_private(&child) {
                let mode = entry
                    .metadata()
                    .with_context(|| format!("{}: cannot stat", path.display()))?
                    .permissions()
                    .mode();
                if mode & 0o077 != 0 {
                    bail!(
                        "{}: private key has permissions {:04o}; it must not be readable by \
                         group or others (chmod 0600)",
                        path.display(),
                        mode & 0o777
                    );
                }
            }
            let bytes =
                std::fs::read(&path).with_context(|| format!("{}: cannot read", path.display()))?;
            out.insert(child, bytes);
        } else {
            bail!(
                "{}: neither a file nor a folder; the state holds only files",
                path.display()
            );
        }
    }
    Ok(())
}

/// The audit log as one record per line (the last one may lack its newline).
fn audit_records(text: &[u8]) -> Vec<(String, Vec<u8>)> {
    text.split_inclusive(|b| *b == b'\n')
        .enumerate()
        .map(|(i, line)| (audit_line_key(i + 1), line.to_vec()))
        .collect()
}

/// The group a key commits with: everything of one database lands in one transaction when it
/// fits, so a replica watching never sees half of a database it did not have before.
fn group_of(key: &str) -> String {
    let rel = key.strip_prefix("secrets/").unwrap_or(key);
    let mut parts = rel.splitn(3, '/');
    match (parts.next(), parts.next()) {
        (Some(DATABASES_DIR), Some(name)) => format!("{DATABASES_DIR}/{name}"),
        (Some(first), _) => first.to_owned(),
        _ => String::new(),
    }
}

/// Splits one logical change into writes etcd accepts, keeping each group together when it
/// fits.
fn chunks(write: Write) -> Vec<Write> {
    let mut groups: BTreeMap<String, Write> = BTreeMap::new();
    for key in write.deletes {
        groups.entry(group_of(&key)).or_default().delete(key);
    }
    for (key, bytes) in write.puts {
        groups.entry(group_of(&key)).or_default().put(key, bytes);
    }
    let size = |w: &Write| -> (usize, usize) {
        (
            w.puts.len() + w.deletes.len(),
            w.puts.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
                + w.deletes.iter().map(String::len).sum::<usize>(),
        )
    };
    let mut out: Vec<Write> = Vec::new();
    let mut current = Write::default();
    let push_op = |current: &mut Write, out: &mut Vec<Write>, op: (String, Option<Vec<u8>>)| {
        let (ops, bytes) = size(current);
        let extra = op.0.len() + op.1.as_ref().map_or(0, Vec::len);
        if ops + 1 > MAX_OPS_PER_COMMIT || bytes + extra > MAX_BYTES_PER_COMMIT {
            out.push(std::mem::take(current));
        }
        match op.1 {
            Some(b) => current.put(op.0, b),
            None => current.delete(op.0),
        };
    };
    for (_, group) in groups {
        let (ops, bytes) = size(&group);
        let (cur_ops, cur_bytes) = size(&current);
        if !current.is_empty()
            && (cur_ops + ops > MAX_OPS_PER_COMMIT || cur_bytes + bytes > MAX_BYTES_PER_COMMIT)
        {
            out.push(std::mem::take(&mut current));
        }
        for key in group.deletes {
            push_op(&mut current, &mut out, (key, None));
        }
        for (key, b) in group.puts {
            push_op(&mut current, &mut out, (key, Some(b)));
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

async fn import(args: ImportArgs) -> anyhow::Result<ExitCode> {
    let ctx = super::Ctx::new(&args.state)?;
    let state: &StateDir = &ctx.state;
    let config = args.etcd.config()?;
    // Hold the writers' lock while reading, so no CLI change lands halfway through the copy.
    let _lock = state
        .lock()
        .with_context(|| format!("{}: cannot take the lock", state.root().display()))?;
    // Only state the proxy would serve is imported: etcd would refuse it to every replica.
    let mut errors = Vec::new();
    for (_, loaded) in state.load_each().map_err(|e| anyhow!("{}", one_line(&e)))? {
        if let Err(e) = loaded {
            errors.push(one_line(&e));
        }
    }
    if !errors.is_empty() {
        bail!(
            "the state directory does not load; fix it first: {}",
            errors.join("; ")
        );
    }
    let mut files = BTreeMap::new();
    walk(state.root(), DATABASES_DIR, &mut files)?;
    let mut write = Write::default();
    for (rel, bytes) in files {
        let key = to_store_key(&rel);
        check_key(&key).map_err(|e| anyhow!("{rel}: {e}"))?;
        write.put(key, bytes);
    }
    let audit = match std::fs::read(state.audit_log()) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => bail!("{}: cannot read: {e}", state.audit_log().display()),
    };
    for (key, line) in audit_records(&audit) {
        write.put(key, line);
    }

    let store = EtcdStore::connect(config.clone()).await?;
    let listing = store.load().await?;
    if !listing.records.is_empty() {
        if !args.force {
            bail!(
                "etcd prefix {} already holds {} records (revision {}); refusing to overwrite \
                 them without --force",
                config.prefix,
                listing.records.len(),
                listing.revision
            );
        }
        // Archives of destroyed databases are kept, as a directory's archive/ is.
        for key in listing.records.keys() {
            if !write.puts.contains_key(key) && !key.starts_with(ARCHIVE_PREFIX) {
                write.delete(key.clone());
            }
        }
    }
    let records = write.puts.len();
    let mut read = listing;
    let mut revision = read.revision;
    for chunk in chunks(write) {
        revision = store.commit(&read, &chunk).await?;
        read = Listing::after_commit(revision);
    }
    done(&format!(
        "Importing {records} records from {} into etcd {} (revision {revision})",
        state.root().display(),
        config.prefix
    ));
    Ok(ExitCode::SUCCESS)
}

async fn export(args: ExportArgs) -> anyhow::Result<ExitCode> {
    let config = args.etcd.config()?;
    let to = &args.to;
    match std::fs::read_dir(to) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                bail!(
                    "{}: not empty; export writes a new state directory",
                    to.display()
                );
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => bail!("{}: {e}", to.display()),
    }
    let store = EtcdStore::connect(config.clone()).await?;
    let listing = store.load().await?;
    if listing.records.is_empty() {
        bail!(
            "etcd prefix {} holds no records (revision {})",
            config.prefix,
            listing.revision
        );
    }
    // Check every key before writing anything: a key is a path, and one with `..` or an
    // unknown shape must never make the export write outside its directory.
    let mut files: Vec<(String, &[u8])> = Vec::new();
    let mut audit: Vec<u8> = Vec::new();
    for (key, bytes) in &listing.records {
        if key.starts_with(ARCHIVE_PREFIX) {
            // Archives of destroyed databases are not state (as archive/ is not imported).
            continue;
        }
        if key.starts_with(AUDIT_PREFIX) {
            // Keys are fixed-width line numbers, so the map's order is the log's order.
            audit.extend_from_slice(bytes);
            continue;
        }
        let rel = from_store_key(key)
            .filter(|rel| check_key(rel).is_ok())
            .filter(|rel| rel.starts_with(&format!("{DATABASES_DIR}/")))
            .filter(|rel| !rel.split('/').any(|c| c.starts_with('.')))
            .ok_or_else(|| {
                anyhow!(
                    "etcd:{}/{key}: not a key of the state layout (docs/STATE.md); nothing was \
                     written",
                    config.prefix
                )
            })?;
        files.push((rel, bytes));
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(PRIVATE_DIR_MODE)
        .create(to)
        .with_context(|| format!("{}: cannot create", to.display()))?;
    for (rel, bytes) in &files {
        let path = to.join(rel);
        // Database and certificate folders hold private keys: 0700, as the CLI makes them.
        let parts: Vec<&str> = rel.split('/').collect();
        for depth in [2, 4] {
            if parts.len() > depth {
                let dir = to.join(parts[..depth].join("/"));
                if !dir.exists() {
                    if let Some(parent) = dir.parent() {
                        std::fs::create_dir_all(parent)
                            .with_context(|| format!("{}: cannot create", parent.display()))?;
                    }
                    std::fs::DirBuilder::new()
                        .mode(PRIVATE_DIR_MODE)
                        .create(&dir)
                        .with_context(|| format!("{}: cannot create", dir.display()))?;
                }
            }
        }
        let mode = if is_private(rel) {
            PRIVATE_MODE
        } else {
            PUBLIC_MODE
        };
        write_atomic(&path, bytes, mode)
            .with_context(|| format!("{}: cannot write", path.display()))?;
    }
    if !audit.is_empty() {
        let path = to.join(AUDIT_LOG);
        write_atomic(&path, &audit, PRIVATE_MODE)
            .with_context(|| format!("{}: cannot write", path.display()))?;
    }
    done(&format!(
        "Exporting {} records of etcd {} (revision {}) to {}",
        listing.records.len(),
        config.prefix,
        listing.revision,
        to.display()
    ));
    // Say what the proxy would refuse, without refusing the backup.
    for (name, loaded) in StateDir::new(to)
        .load_each()
        .map_err(|e| anyhow!("{}", one_line(&e)))?
    {
        if let Err(e) = loaded {
            eprintln!("warning: database {name} does not load: {}", one_line(&e));
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_changes_split_but_keep_a_database_together() {
        let mut w = Write::default();
        for i in 0..150 {
            w.put(audit_line_key(i + 1), b"{}\n".to_vec());
        }
        for f in ["database.yaml", "server.crt", "server.key"] {
            w.put(format!("databases/app/{f}"), b"x".to_vec());
        }
        w.put("secrets/databases/app/ca.key", b"k".to_vec());
        let parts = chunks(w);
        assert!(parts
            .iter()
            .all(|p| p.puts.len() + p.deletes.len() <= MAX_OPS_PER_COMMIT));
        assert_eq!(parts.iter().map(|p| p.puts.len()).sum::<usize>(), 154);
        let with_app: Vec<_> = parts
            .iter()
            .filter(|p| p.puts.keys().any(|k| group_of(k) == "databases/app"))
            .collect();
        assert_eq!(with_app.len(), 1);
        assert_eq!(
            with_app[0]
                .puts
                .keys()
                .filter(|k| group_of(k) == "databases/app")
                .count(),
            4
        );
    }

    #[test]
    fn audit_lines_keep_every_byte() {
        let text = b"{\"a\":1}\n{\"b\":2}\npartial";
        let lines = audit_records(text);
        assert_eq!(lines.len(), 3);
        let back: Vec<u8> = lines.into_iter().flat_map(|(_, l)| l).collect();
        assert_eq!(back, text);
    }
}
