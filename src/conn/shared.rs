//! The shared listener: many databases on one port, the ClientHello's SNI picking which one.
//! The pick happens after the ClientHello is read and before any cryptography, so the
//! handshake runs under the chosen database's own certificate, CA and CRL, and its own IP
//! rules decide before that.

use std::net::IpAddr;
use std::sync::Arc;

use super::error::{ConnError, ErrorKind};
use super::{Context, Served};
use crate::allowlist::AdmittedBy;
use crate::snapshot::{DatabaseRuntime, Snapshot};

/// The database on the shared listener that a ClientHello with server name `sni` reaches:
/// the one with that name, else `default` (the `default_database`), else none. What the
/// handshake does, and what `pgmtls doctor --sni` reports.
pub fn route<'a>(
    snap: &'a Snapshot,
    default: Option<&str>,
    sni: Option<&str>,
) -> Result<&'a Arc<DatabaseRuntime>, ConnError> {
    let default = default
        .and_then(|d| snap.databases.get(d))
        .filter(|db| db.settings.listen.is_shared());
    match sni {
        None => default.ok_or_else(|| {
            ConnError::new(
                ErrorKind::SniMissing,
                "no server name (SNI) in the ClientHello and no default_database",
            )
        }),
        Some(name) => snap.by_server_name(name).or(default).ok_or_else(|| {
            // The name is the client's: bounded by rustls (a DNS name), logged quoted.
            ConnError::new(
                ErrorKind::SniUnknown,
                format!("no database on the shared listener has server name {name:?}"),
            )
        }),
    }
}

/// The database `sni` names on the shared listener (or the configured default), checked
/// against that database's IP rules and trusted ranges for `ip`. `picked`, `rule_id` and
/// `admitted_by` learn the database and the admitting entry as soon as they are known, so
/// that a refusal is charged to the database and names the list.
pub fn pick(
    ctx: &Context,
    served: &Served,
    sni: Option<&str>,
    ip: IpAddr,
    picked: &mut Option<Arc<DatabaseRuntime>>,
    (rule_id, admitted_by): (&mut Option<Arc<str>>, &mut Option<AdmittedBy>),
) -> Result<(Arc<DatabaseRuntime>, AdmittedBy), ConnError> {
    let snap = ctx.snapshot.load();
    let default = match served {
        Served::Shared { default } => default.as_deref(),
        Served::Database(_) => None,
    };
    let db = route(&snap, default, sni)?;
    *picked = Some(Arc::clone(db));
    let Some(admitted) = db.admit(ip) else {
        return Err(ConnError::new(
            ErrorKind::IpNotAllowed,
            "no IP rule or trusted range of the database the server name picks admits this \
             address",
        ));
    };
    *rule_id = Some(admitted.entry.id.clone());
    *admitted_by = Some(admitted.by);
    Ok((Arc::clone(db), admitted.by))
}
