//! The fleet keys of `pgmtls.yaml`: `replica_id`, `peer_listen`, `peers`, `peer_tls`. All of
//! them are fixed at start: a replica's id is inside every cancel key it has handed out, so it
//! cannot change under live sessions.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::config::Fields;

/// One other replica, as `peers:` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerEntry {
    pub id: u8,
    pub addr: SocketAddr,
    /// The name its peer certificate must carry; the address' IP when not given.
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerTlsPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// A replica of a fleet. Absent (`replica_id` 0 or not given): a single node, whose cancel
/// keys are Postgres' own, untouched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetConfig {
    pub replica_id: u8,
    pub peer_listen: SocketAddr,
    pub peers: Vec<PeerEntry>,
    pub tls: PeerTlsPaths,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeer {
    id: u8,
    addr: String,
    name: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: String,
    key: String,
    ca: String,
}

pub const KEYS: &[&str] = &["replica_id", "peer_listen", "peers", "peer_tls"];

/// Takes the fleet keys from `f`; relative paths are resolved against `base`. Errors are
/// recorded in `f` against the key they concern.
pub fn take(f: &mut Fields, base: &Path) -> Option<FleetConfig> {
    let id = f.optional_with("replica_id", |v| match v.as_u64() {
        Some(n) if n <= 255 => Ok(n as u8),
        _ => Err("must be an integer from 0 (single node) to 255".into()),
    });
    let listen = f.optional_with("peer_listen", crate::config::yaml::convert::socket_addr);
    let peers = f.optional_with("peers", |v| {
        let raw: Vec<RawPeer> = serde_json::from_value(v).map_err(|e| {
            format!("must be a list of {{id, addr, name}} (id 1-255, addr IP:PORT): {e}")
        })?;
        raw.into_iter()
            .map(|p| {
                if p.id == 0 {
                    return Err("peer id 0 is not a replica id (use 1-255)".to_string());
                }
                let addr: SocketAddr = p.addr.parse().map_err(|_| {
                    format!(
                        "peer {}: invalid address {:?}: expected IP:PORT",
                        p.id, p.addr
                    )
                })?;
                Ok(PeerEntry {
                    id: p.id,
                    addr,
                    name: p.name.unwrap_or_else(|| addr.ip().to_string()),
                })
            })
            .collect::<Result<Vec<_>, _>>()
    });
    let tls = f.optional_with("peer_tls", |v| {
        let raw: RawTls = serde_json::from_value(v)
            .map_err(|e| format!("must be a mapping with cert, key and ca: {e}"))?;
        Ok(PeerTlsPaths {
            cert: base.join(raw.cert),
            key: base.join(raw.key),
            ca: base.join(raw.ca),
        })
    });
    let id = id.unwrap_or(0);
    if id == 0 {
        for key in ["peer_listen", "peers", "peer_tls"] {
            if f.line_of(key).is_some() {
                let line = f.line_of(key);
                f.push(key, line, "needs a replica_id from 1 to 255");
            }
        }
        return None;
    }
    let line = f.line_of("replica_id");
    let (Some(listen), Some(peers), Some(tls)) = (listen, peers, tls) else {
        f.push(
            "replica_id",
            line,
            "a replica of a fleet needs peer_listen, peers and peer_tls",
        );
        return None;
    };
    let mut seen = BTreeSet::new();
    for p in &peers {
        if p.id == id {
            f.push(
                "peers",
                f.line_of("peers"),
                format!("peer id {} is this replica's own replica_id", p.id),
            );
            return None;
        }
        if !seen.insert(p.id) {
            f.push(
                "peers",
                f.line_of("peers"),
                format!("peer id {} is listed twice", p.id),
            );
            return None;
        }
    }
    Some(FleetConfig {
        replica_id: id,
        peer_listen: listen,
        peers,
        tls,
    })
}
