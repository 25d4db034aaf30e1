//! What exists only because there are several replicas. The data plane asks it one question,
//! "who owns this cancel key" ([`Fleet::route`]), and hands it the CancelRequests another
//! replica must serve ([`Fleet::ask_owner`]); the peer channel's server side
//! ([`channel::serve`]) answers those from other replicas. Where replica N is comes from a
//! [`Directory`]: the static `peers:` list of `pgmtls.yaml`, and in etcd mode the replica
//! registry under it ([`directory::Layered`]).

pub mod channel;
pub mod config;
pub mod directory;
pub mod key;
pub mod message;
pub mod registry;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

pub use config::{FleetConfig, PeerEntry, PeerTlsPaths};

use crate::config::ConfigErrors;
use crate::wire::frontend::CancelKey;

/// ALPN of the peer channel, so a peer port can never be mistaken for a Postgres listener.
pub const PEER_ALPN: &[u8] = b"pgmtls-cancel/1";

/// Where one replica's peer channel is reached.
#[derive(Debug, Clone)]
pub struct PeerAddr {
    pub addr: SocketAddr,
    /// The name its peer certificate must carry.
    pub server_name: ServerName<'static>,
}

/// "Where is replica N": the one lookup the fleet needs, filled by the static list or by the
/// replica registry.
pub trait Directory: Send + Sync {
    fn locate(&self, replica_id: u8) -> Option<PeerAddr>;

    /// Whether replica N was a cancel target and has left (so a key of its making was real):
    /// its cancels are reported as the peer being unavailable, not as an unknown key.
    fn departed(&self, _replica_id: u8) -> bool {
        false
    }
}

/// The `peers:` list of `pgmtls.yaml`.
pub struct StaticPeers(HashMap<u8, PeerAddr>);

impl StaticPeers {
    pub fn new(peers: &[PeerEntry]) -> Result<StaticPeers, String> {
        let mut map = HashMap::new();
        for p in peers {
            let server_name = ServerName::try_from(p.name.clone())
                .map_err(|_| format!("peer {}: {:?} is not a DNS name or IP", p.id, p.name))?;
            map.insert(
                p.id,
                PeerAddr {
                    addr: p.addr,
                    server_name,
                },
            );
        }
        Ok(StaticPeers(map))
    }
}

impl Directory for StaticPeers {
    fn locate(&self, replica_id: u8) -> Option<PeerAddr> {
        self.0.get(&replica_id).cloned()
    }
}

/// Where a CancelRequest's key says its session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// This process relays it, if anyone does.
    Local,
    /// Replica N relays it, if anyone does.
    Peer(u8),
}

/// The routing rule. `own` is this replica's id, `None` for a single node: then every key is
/// looked up locally, whatever its bytes, exactly as before fleets existed.
pub fn route(own: Option<u8>, key: &CancelKey) -> Route {
    match own {
        None => Route::Local,
        Some(me) => match key::replica_of(key) {
            id if id == me => Route::Local,
            id => Route::Peer(id),
        },
    }
}

/// This replica's place in the fleet: its id, its peers, and the TLS both ways.
pub struct Fleet {
    replica_id: u8,
    pub listen: SocketAddr,
    directory: Box<dyn Directory>,
    pub(crate) connector: tokio_rustls::TlsConnector,
    pub(crate) acceptor: tokio_rustls::TlsAcceptor,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("replica_id", &self.replica_id)
            .field("listen", &self.listen)
            .finish_non_exhaustive()
    }
}

impl Fleet {
    /// Reads the peer certificate, key and CA; errors name the file.
    pub fn new(cfg: &FleetConfig) -> Result<Fleet, ConfigErrors> {
        Self::new_with_registry(cfg, None)
    }

    /// As [`Fleet::new`]; with `registry` (etcd mode) the peers not in `peers:` are found in
    /// the replica registry.
    pub fn new_with_registry(
        cfg: &FleetConfig,
        registry: Option<directory::RegistryPeers>,
    ) -> Result<Fleet, ConfigErrors> {
        let (server, client) = peer_tls(&cfg.tls)?;
        let fixed = StaticPeers::new(&cfg.peers)
            .map_err(|m| ConfigErrors::one(Path::new("pgmtls.yaml"), "peers", None, m))?;
        let directory: Box<dyn Directory> = match registry {
            Some(registry) => Box::new(directory::Layered { fixed, registry }),
            None => Box::new(fixed),
        };
        Ok(Self::with_directory(
            cfg.replica_id,
            cfg.peer_listen,
            directory,
            server,
            client,
        ))
    }

    pub fn with_directory(
        replica_id: u8,
        listen: SocketAddr,
        directory: Box<dyn Directory>,
        server: Arc<ServerConfig>,
        client: Arc<ClientConfig>,
    ) -> Fleet {
        Fleet {
            replica_id,
            listen,
            directory,
            connector: tokio_rustls::TlsConnector::from(client),
            acceptor: tokio_rustls::TlsAcceptor::from(server),
        }
    }

    pub fn replica_id(&self) -> u8 {
        self.replica_id
    }

    pub fn route(&self, key: &CancelKey) -> Route {
        route(Some(self.replica_id), key)
    }

    pub fn locate(&self, replica_id: u8) -> Option<PeerAddr> {
        self.directory.locate(replica_id)
    }

    pub fn departed(&self, replica_id: u8) -> bool {
        self.directory.departed(replica_id)
    }
}

/// The peer channel's TLS: TLS 1.3 only, both sides present a certificate from the peer CA,
/// and each verifies the other's against it (the client also checks the peer's name).
pub fn peer_tls(
    paths: &PeerTlsPaths,
) -> Result<(Arc<ServerConfig>, Arc<ClientConfig>), ConfigErrors> {
    let read = |p: &Path| {
        std::fs::read(p)
            .map_err(|e| ConfigErrors::one(p, "peer_tls", None, format!("cannot read: {e}")))
    };
    let chain: Vec<CertificateDer<'static>> =
        crate::tls_store::certs(&paths.cert, &read(&paths.cert)?)?;
    let key_pem = read(&paths.key)?;
    let key = || {
        PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
            ConfigErrors::one(
                &paths.key,
                "peer_tls",
                None,
                format!("not a PEM private key: {e}"),
            )
        })
    };
    let mut roots = RootCertStore::empty();
    for ca in crate::tls_store::certs(&paths.ca, &read(&paths.ca)?)? {
        roots.add(ca).map_err(|e| {
            ConfigErrors::one(
                &paths.ca,
                "peer_tls",
                None,
                format!("unusable CA certificate: {e}"),
            )
        })?;
    }
    let roots = Arc::new(roots);
    let provider = crate::tls_store::provider();
    let tls_err = |file: &Path, e: rustls::Error| {
        ConfigErrors::one(file, "peer_tls", None, format!("peer TLS: {e}"))
    };
    let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(|e| ConfigErrors::one(&paths.ca, "peer_tls", None, format!("peer CA: {e}")))?;
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| tls_err(&paths.cert, e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.clone(), key()?)
        .map_err(|e| tls_err(&paths.key, e))?;
    server.alpn_protocols = vec![PEER_ALPN.to_vec()];
    let mut client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| tls_err(&paths.cert, e))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key()?)
        .map_err(|e| tls_err(&paths.key, e))?;
    client.alpn_protocols = vec![PEER_ALPN.to_vec()];
    Ok((Arc::new(server), Arc::new(client)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_single_node_looks_every_key_up_locally_whatever_its_first_byte() {
        for first in 0..=255u8 {
            let k = CancelKey::new(1, &[first, 0, 0, 0]).unwrap();
            assert_eq!(route(None, &k), Route::Local);
        }
    }

    #[test]
    fn a_replica_routes_by_the_tag_it_finds() {
        let k = CancelKey::new(1, &[2, 9, 9, 9]).unwrap();
        assert_eq!(route(Some(2), &k), Route::Local);
        assert_eq!(route(Some(1), &k), Route::Peer(2));
        let long = CancelKey::new(1, &[3u8; 32]).unwrap();
        assert_eq!(route(Some(1), &long), Route::Peer(3));
    }
}
