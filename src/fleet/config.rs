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

/// A peer's `name` must be something a certificate can be checked against.
fn check_name(id: u8, name: &str) -> Result<(), String> {
    rustls::pki_types::ServerName::try_from(name)
        .map(|_| ())
        .map_err(|_| format!("peer {id}: name {name:?} is not a DNS name or IP address"))
}

/// Peer ids are distinct and not this replica's own.
fn check_peers(id: u8, peers: &[PeerEntry]) -> Result<(), String> {
    let mut seen = BTreeSet::new();
    for p in peers {
        if p.id == id {
            return Err(format!("peer id {} is this replica's own replica_id", p.id));
        }
        if !seen.insert(p.id) {
            return Err(format!("peer id {} is listed twice", p.id));
        }
    }
    Ok(())
}

/// One `--peer` flag: `ID=IP:PORT`, or `ID=IP:PORT/NAME` when the peer's certificate carries
/// a name other than that IP.
pub fn parse_peer_flag(s: &str) -> Result<PeerEntry, String> {
    let bad = || format!("--peer {s:?}: expected ID=IP:PORT or ID=IP:PORT/NAME, ID 1-255");
    let (id, rest) = s.split_once('=').ok_or_else(bad)?;
    let id: u8 = id.trim().parse().map_err(|_| bad())?;
    if id == 0 {
        return Err(bad());
    }
    let (addr, name) = match rest.split_once('/') {
        Some((a, n)) if !n.is_empty() => (a, Some(n.to_owned())),
        Some(_) => return Err(bad()),
        None => (rest, None),
    };
    let addr: SocketAddr = addr.trim().parse().map_err(|_| bad())?;
    let name = name.unwrap_or_else(|| addr.ip().to_string());
    check_name(id, &name).map_err(|m| format!("--peer {s:?}: {m}"))?;
    Ok(PeerEntry { id, addr, name })
}

/// The quick-mode flags' fleet: all of `--peer-listen`, `--peer-cert`, `--peer-key` and
/// `--peer-ca` with a `--replica-id` from 1, or none of them.
pub fn from_flags(
    replica_id: Option<u8>,
    peer_listen: Option<&str>,
    peers: &[String],
    tls: (Option<PathBuf>, Option<PathBuf>, Option<PathBuf>),
) -> Result<Option<FleetConfig>, String> {
    let id = replica_id.unwrap_or(0);
    let any = peer_listen.is_some()
        || !peers.is_empty()
        || tls.0.is_some()
        || tls.1.is_some()
        || tls.2.is_some();
    if id == 0 {
        return if any {
            Err("--peer-listen, --peer and --peer-cert/--peer-key/--peer-ca need a --replica-id from 1 to 255".into())
        } else {
            Ok(None)
        };
    }
    let need = "--replica-id needs --peer-listen, --peer-cert, --peer-key and --peer-ca";
    let listen: SocketAddr = peer_listen
        .ok_or(need)?
        .parse()
        .map_err(|_| "--peer-listen: expected IP:PORT".to_string())?;
    let (Some(cert), Some(key), Some(ca)) = tls else {
        return Err(need.into());
    };
    let peers = peers
        .iter()
        .map(|p| parse_peer_flag(p))
        .collect::<Result<Vec<_>, _>>()?;
    check_peers(id, &peers).map_err(|m| format!("--peer: {m}"))?;
    Ok(Some(FleetConfig {
        replica_id: id,
        peer_listen: listen,
        peers,
        tls: PeerTlsPaths { cert, key, ca },
    }))
}

/// Takes the fleet keys from `f`; relative paths are resolved against `base`. Errors are
/// recorded in `f` against the key they concern. With `etcd` (the state is an etcd prefix)
/// `peers` may be left out: the replica registry says where the other replicas are.
pub fn take(f: &mut Fields, base: &Path, etcd: bool) -> Option<FleetConfig> {
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
                let name = p.name.unwrap_or_else(|| addr.ip().to_string());
                check_name(p.id, &name)?;
                Ok(PeerEntry {
                    id: p.id,
                    addr,
                    name,
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
    let given_peers = peers.is_some() || f.line_of("peers").is_some();
    let peers = match peers {
        None if etcd && !given_peers => Some(Vec::new()),
        p => p,
    };
    let (Some(listen), Some(peers), Some(tls)) = (listen, peers, tls) else {
        let needs = if etcd {
            "a replica of a fleet needs peer_listen and peer_tls"
        } else {
            "a replica of a fleet needs peer_listen, peers and peer_tls (or an etcd: section, \
             whose replica registry lists the peers)"
        };
        f.push("replica_id", line, needs);
        return None;
    };
    // Without a list the others find this replica at the address it registers: one they
    // cannot dial would lose every cancel of its sessions that reaches another replica.
    if etcd && !given_peers && listen.ip().is_unspecified() {
        f.push(
            "peer_listen",
            f.line_of("peer_listen"),
            format!(
                "{listen}: the replica registry advertises this address to the other replicas; \
                 give the address they reach this one at (or list every replica in peers:)"
            ),
        );
        return None;
    }
    if let Err(m) = check_peers(id, &peers) {
        f.push("peers", f.line_of("peers"), m);
        return None;
    }
    Some(FleetConfig {
        replica_id: id,
        peer_listen: listen,
        peers,
        tls,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_flags_parse_and_bad_ones_say_what_is_expected() {
        let p = parse_peer_flag("2=10.0.0.2:6433").unwrap();
        assert_eq!(
            (p.id, p.addr.port(), p.name.as_str()),
            (2, 6433, "10.0.0.2")
        );
        let p = parse_peer_flag("3=10.0.0.3:6433/r3.internal").unwrap();
        assert_eq!(p.name, "r3.internal");
        for bad in [
            "",
            "2",
            "0=10.0.0.2:1",
            "256=10.0.0.2:1",
            "x=10.0.0.2:1",
            "2=nowhere",
            "2=10.0.0.2:1/",
        ] {
            let e = parse_peer_flag(bad).unwrap_err();
            assert!(e.contains("expected ID=IP:PORT"), "{bad}: {e}");
        }
        let e = parse_peer_flag("2=10.0.0.2:1/not a name").unwrap_err();
        assert!(e.contains("is not a DNS name"), "{e}");
    }

    #[test]
    fn quick_mode_fleet_flags_come_all_together_or_not_at_all() {
        let tls = || {
            (
                Some(PathBuf::from("c")),
                Some(PathBuf::from("k")),
                Some(PathBuf::from("a")),
            )
        };
        assert_eq!(from_flags(None, None, &[], (None, None, None)), Ok(None));
        assert_eq!(from_flags(Some(0), None, &[], (None, None, None)), Ok(None));
        let f = from_flags(
            Some(1),
            Some("127.0.0.1:7001"),
            &["2=127.0.0.1:7002".into()],
            tls(),
        )
        .unwrap()
        .unwrap();
        assert_eq!((f.replica_id, f.peers.len()), (1, 1));
        assert!(
            from_flags(None, Some("127.0.0.1:1"), &[], (None, None, None))
                .unwrap_err()
                .contains("need a --replica-id")
        );
        assert!(from_flags(Some(1), None, &[], tls())
            .unwrap_err()
            .contains("needs --peer-listen"));
        assert!(from_flags(
            Some(1),
            Some("127.0.0.1:1"),
            &["1=127.0.0.1:2".into()],
            tls()
        )
        .unwrap_err()
        .contains("this replica's own"));
        assert!(from_flags(Some(1), Some("nowhere"), &[], tls())
            .unwrap_err()
            .contains("--peer-listen"));
    }
}
