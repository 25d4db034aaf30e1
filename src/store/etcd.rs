//! The etcd v3 store: records under `PREFIX/`, read at one revision, committed in one
//! transaction guarded by what was read, followed by watch.
//!
//! The guard: every commit also rewrites `PREFIX/.revision`, and succeeds only if that key's
//! last change is the one the writer read (and no record under the prefix changed after the
//! read, which also catches a writer that bypasses pgmtls). So two writers that read the same
//! state never both win, whatever keys they touch: the loser gets
//! [`StoreError::Conflict`] and nothing of its change is written.

use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    TlsOptions, Txn, TxnOp, WatchOptions,
};

use super::{check_key, Batch, Event, Listing, StoreError, Write};

/// The key every commit rewrites, relative to the prefix. A dot-name: never a record.
const GUARD_KEY: &str = ".revision";

/// How to reach the cluster.
#[derive(Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// `http://HOST:PORT` or `https://HOST:PORT`, one or more members.
    pub endpoints: Vec<String>,
    /// Key prefix of this pgmtls installation, e.g. `/pgmtls`; no trailing slash.
    pub prefix: String,
    /// etcd user and password, when the cluster has authentication on.
    pub user: Option<(String, String)>,
    /// Dial and per-request timeout.
    pub timeout: Duration,
    /// TLS to `https://` endpoints: the CA to verify etcd with, and the client certificate
    /// for a cluster started with `--client-cert-auth`.
    pub tls: Option<EtcdTls>,
}

/// TLS to etcd, as PEM bytes (read once, when the settings are read).
#[derive(Clone, PartialEq, Eq, Default)]
pub struct EtcdTls {
    /// The CA(s) that signed etcd's server certificate.
    pub ca_pem: Option<Vec<u8>>,
    /// Client certificate chain and private key.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl EtcdTls {
    /// Reads and checks the files; an error names the key (`etcd.cert_file`) and the file.
    pub fn read(
        ca_file: Option<&std::path::Path>,
        client: Option<(&std::path::Path, &std::path::Path)>,
    ) -> Result<EtcdTls, String> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let read = |key: &str, p: &std::path::Path| {
            std::fs::read(p).map_err(|e| format!("etcd.{key}: {}: cannot read: {e}", p.display()))
        };
        let certs = |key: &str, p: &std::path::Path| -> Result<Vec<u8>, String> {
            let pem = read(key, p)?;
            let n = CertificateDer::pem_slice_iter(&pem)
                .map(|c| c.map(|_| ()))
                .collect::<Result<Vec<()>, _>>()
                .map_err(|e| format!("etcd.{key}: {}: not PEM certificates: {e}", p.display()))?
                .len();
            if n == 0 {
                return Err(format!(
                    "etcd.{key}: {}: no PEM certificate in the file",
                    p.display()
                ));
            }
            Ok(pem)
        };
        let ca_pem = ca_file.map(|p| certs("ca_file", p)).transpose()?;
        let identity = match client {
            None => None,
            Some((cert, key)) => {
                let chain = certs("cert_file", cert)?;
                let key_pem = read("key_file", key)?;
                PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
                    format!(
                        "etcd.key_file: {}: not a PEM private key: {e}",
                        key.display()
                    )
                })?;
                Some((chain, key_pem))
            }
        };
        Ok(EtcdTls { ca_pem, identity })
    }
}

// By hand: the password must never reach a log line.
impl std::fmt::Debug for EtcdConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdConfig")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .field("user", &self.user.as_ref().map(|(u, _)| u))
            .field("timeout", &self.timeout)
            .field(
                "tls",
                &self.tls.as_ref().map(|t| {
                    (
                        t.ca_pem.as_ref().map(|_| "ca"),
                        t.identity.as_ref().map(|_| "client certificate"),
                    )
                }),
            )
            .finish()
    }
}

impl EtcdConfig {
    pub fn new(endpoints: Vec<String>, prefix: &str) -> EtcdConfig {
        EtcdConfig {
            endpoints,
            prefix: prefix.trim_end_matches('/').to_owned(),
            user: None,
            timeout: Duration::from_secs(5),
            tls: None,
        }
    }
}

/// A connected etcd store. Cheap to clone: clones share the connection.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    config: EtcdConfig,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.config.endpoints)
            .field("prefix", &self.config.prefix)
            .finish()
    }
}

impl EtcdStore {
    pub async fn connect(config: EtcdConfig) -> Result<EtcdStore, StoreError> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(config.timeout)
            .with_timeout(config.timeout)
            .with_keep_alive(Duration::from_secs(10), config.timeout);
        if let Some((user, password)) = &config.user {
            options = options.with_user(user.clone(), password.clone());
        }
        if let Some(tls) = &config.tls {
            let mut t = TlsOptions::new();
            if let Some(ca) = &tls.ca_pem {
                t = t.ca_certificate(Certificate::from_pem(ca));
            }
            if let Some((cert, key)) = &tls.identity {
                t = t.identity(Identity::from_pem(cert, key));
            }
            options = options.with_tls(t);
        }
        let client = Client::connect(&config.endpoints, Some(options))
            .await
            .map_err(|e| unavailable(&config, "cannot connect", e))?;
        Ok(EtcdStore { client, config })
    }

    pub fn config(&self) -> &EtcdConfig {
        &self.config
    }

    fn full_key(&self, key: &str) -> String {
        format!("{}/{key}", self.config.prefix)
    }

    /// The range every record lives in: `PREFIX/`.
    fn range(&self) -> String {
        format!("{}/", self.config.prefix)
    }

    /// Every record under the prefix, at one revision.
    pub async fn load(&self) -> Result<Listing, StoreError> {
        self.load_under("").await
    }

    /// The records whose logical key starts with `under` (e.g. `databases/`), at one
    /// revision: what a replica reads, so that its etcd role needs no access to the rest of
    /// the prefix (`secrets/`, `audit/`). Keys stay relative to the prefix. A listing of part
    /// of the prefix has no guard: commit only from a full [`EtcdStore::load`].
    pub async fn load_under(&self, under: &str) -> Result<Listing, StoreError> {
        let mut kv = self.client.kv_client();
        let response = kv
            .get(
                format!("{}{under}", self.range()),
                Some(GetOptions::new().with_prefix()),
            )
            .await
            .map_err(|e| unavailable(&self.config, "cannot read", e))?;
        let revision = response.header().map_or(0, |h| h.revision());
        let mut listing = Listing {
            revision,
            ..Listing::default()
        };
        let range = self.range();
        for kv in response.kvs() {
            let Some(key) = std::str::from_utf8(kv.key())
                .ok()
                .and_then(|k| k.strip_prefix(range.as_str()))
            else {
                continue;
            };
            if key == GUARD_KEY {
                listing.guard = kv.mod_revision();
                continue;
            }
            listing.records.insert(key.to_owned(), kv.value().to_vec());
            listing
                .mod_revisions
                .insert(key.to_owned(), kv.mod_revision());
        }
        Ok(listing)
    }

    /// Writes `write` as one transaction, only if nothing changed since `read` was loaded.
    /// Returns the new revision.
    pub async fn commit(&self, read: &Listing, write: &Write) -> Result<i64, StoreError> {
        for key in write
            .puts
            .keys()
            .chain(&write.deletes)
            .chain(&write.deletes_under)
        {
            check_key(key)?;
        }
        let guard = self.full_key(GUARD_KEY);
        let compares = vec![
            Compare::mod_revision(guard.clone(), CompareOp::Equal, read.guard),
            // Nothing under the prefix changed after the read (a write that bypassed pgmtls).
            Compare::mod_revision(self.range(), CompareOp::Less, read.revision + 1).with_prefix(),
        ];
        let mut ops: Vec<TxnOp> = Vec::with_capacity(write.ops() + 1);
        // etcd refuses a transaction whose puts fall inside one of its delete ranges
        // ("duplicate key given in txn request"): callers keep them apart.
        for key in &write.deletes_under {
            let range = format!("{}/", self.full_key(key));
            ops.push(TxnOp::delete(
                range,
                Some(etcd_client::DeleteOptions::new().with_prefix()),
            ));
        }
        for (key, bytes) in &write.puts {
            ops.push(TxnOp::put(self.full_key(key), bytes.clone(), None));
        }
        for key in &write.deletes {
            ops.push(TxnOp::delete(self.full_key(key), None));
        }
        ops.push(TxnOp::put(guard, read.revision.to_string(), None));
        let txn = Txn::new().when(compares).and_then(ops);
        let mut kv = self.client.kv_client();
        let response = kv
            .txn(txn)
            .await
            .map_err(|e| unavailable(&self.config, "cannot commit", e))?;
        let revision = response.header().map_or(0, |h| h.revision());
        if response.succeeded() {
            Ok(revision)
        } else {
            Err(StoreError::Conflict { current: revision })
        }
    }

    /// Follows every change after `from`, one committed revision at a time. Ends with
    /// [`StoreError::Compacted`] when that history is gone, or `Unavailable` when the
    /// connection is lost; either way the caller reloads and watches again.
    pub async fn watch(&self, from: i64) -> Result<Watch, StoreError> {
        self.watch_under(from, "").await
    }

    /// As [`EtcdStore::watch`], for the keys starting with `under` only.
    pub async fn watch_under(&self, from: i64, under: &str) -> Result<Watch, StoreError> {
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(from + 1);
        let mut client = self.client.watch_client();
        let stream = client
            .watch(format!("{}{under}", self.range()), Some(options))
            .await
            .map_err(|e| unavailable(&self.config, "cannot watch", e))?;
        Ok(Watch {
            stream,
            pending: Default::default(),
            range: self.range(),
            from,
            config: self.config.clone(),
        })
    }
}

/// Leases: what a replica's registry entry hangs on, so that the entry leaves with the
/// process (revoked on drain, expired within the TTL when it dies).
impl EtcdStore {
    /// A new lease of `ttl` (whole seconds, at least one); returns its id.
    pub async fn grant_lease(&self, ttl: Duration) -> Result<i64, StoreError> {
        let secs = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let response = self
            .client
            .lease_client()
            .grant(secs, None)
            .await
            .map_err(|e| unavailable(&self.config, "cannot grant a lease from", e))?;
        Ok(response.id())
    }

    /// Writes `PREFIX/KEY` attached to `lease`: it is deleted when the lease ends. Returns the
    /// new revision.
    pub async fn put_leased(&self, key: &str, bytes: &[u8], lease: i64) -> Result<i64, StoreError> {
        check_key(key)?;
        let response = self
            .client
            .kv_client()
            .put(
                self.full_key(key),
                bytes.to_vec(),
                Some(etcd_client::PutOptions::new().with_lease(lease)),
            )
            .await
            .map_err(|e| unavailable(&self.config, "cannot write", e))?;
        Ok(response.header().map_or(0, |h| h.revision()))
    }

    /// Keeps `lease` alive: call [`LeaseKeepAlive::renew`] well within the TTL.
    pub async fn keep_alive(&self, lease: i64) -> Result<LeaseKeepAlive, StoreError> {
        let (keeper, stream) = self
            .client
            .lease_client()
            .keep_alive(lease)
            .await
            .map_err(|e| unavailable(&self.config, "cannot keep a lease alive at", e))?;
        Ok(LeaseKeepAlive {
            keeper,
            stream,
            config: self.config.clone(),
        })
    }

    /// Ends `lease` now: every key attached to it is deleted in one revision.
    pub async fn revoke_lease(&self, lease: i64) -> Result<(), StoreError> {
        self.client
            .lease_client()
            .revoke(lease)
            .await
            .map_err(|e| unavailable(&self.config, "cannot revoke a lease at", e))?;
        Ok(())
    }
}

/// The keep-alive stream of one lease.
pub struct LeaseKeepAlive {
    keeper: etcd_client::LeaseKeeper,
    stream: etcd_client::LeaseKeepAliveStream,
    config: EtcdConfig,
}

impl LeaseKeepAlive {
    /// Renews the lease once; returns the TTL left, 0 when the lease is gone (expired or
    /// revoked: its keys are deleted and it must be granted again).
    pub async fn renew(&mut self) -> Result<i64, StoreError> {
        self.keeper
            .keep_alive()
            .await
            .map_err(|e| unavailable(&self.config, "cannot renew a lease at", e))?;
        match self
            .stream
            .message()
            .await
            .map_err(|e| unavailable(&self.config, "cannot renew a lease at", e))?
        {
            Some(response) => Ok(response.ttl()),
            None => Err(StoreError::Unavailable {
                what: format!("lease keep-alive at {}", self.config.endpoints.join(",")),
                detail: "the server closed the stream".into(),
            }),
        }
    }
}

/// A running watch.
pub struct Watch {
    stream: etcd_client::WatchStream,
    /// Revisions received but not yet handed out.
    pending: std::collections::VecDeque<Batch>,
    range: String,
    from: i64,
    config: EtcdConfig,
}

impl Watch {
    /// The next revision's changes to records (guard-key writes are left out, so a batch may
    /// be empty: the revision still counts as seen).
    pub async fn next(&mut self) -> Result<Batch, StoreError> {
        loop {
            if let Some(batch) = self.pending.pop_front() {
                self.from = batch.revision;
                return Ok(batch);
            }
            let message = self
                .stream
                .message()
                .await
                .map_err(|e| unavailable(&self.config, "watch failed", e))?;
            let Some(response) = message else {
                return Err(StoreError::Unavailable {
                    what: format!("watch of {} ended", self.range),
                    detail: "the server closed the stream".into(),
                });
            };
            if response.compact_revision() > 0 {
                return Err(StoreError::Compacted {
                    requested: self.from + 1,
                    compacted: response.compact_revision(),
                });
            }
            if response.canceled() {
                return Err(StoreError::Unavailable {
                    what: format!("watch of {} was cancelled", self.range),
                    detail: response.cancel_reason().to_owned(),
                });
            }
            // One response may carry several revisions: each becomes its own batch.
            for event in response.events() {
                let Some(kv) = event.kv() else { continue };
                let revision = kv.mod_revision();
                if self.pending.back().is_none_or(|b| b.revision != revision) {
                    self.pending.push_back(Batch {
                        revision,
                        events: Vec::new(),
                    });
                }
                let Some(key) = std::str::from_utf8(kv.key())
                    .ok()
                    .and_then(|k| k.strip_prefix(self.range.as_str()))
                else {
                    continue;
                };
                if key == GUARD_KEY {
                    continue;
                }
                let change = match event.event_type() {
                    EventType::Put => Event::Put {
                        key: key.to_owned(),
                        bytes: kv.value().to_vec(),
                    },
                    EventType::Delete => Event::Delete {
                        key: key.to_owned(),
                    },
                };
                if let Some(batch) = self.pending.back_mut() {
                    batch.events.push(change);
                }
            }
        }
    }
}

fn unavailable(config: &EtcdConfig, what: &str, e: etcd_client::Error) -> StoreError {
    // A transport error says only "transport error"; the TLS reason is in its sources.
    let mut detail = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        let text = s.to_string();
        if !detail.contains(&text) {
            detail.push_str(": ");
            detail.push_str(&text);
        }
        source = s.source();
    }
    // TLS 1.3 hands the client its session before the server checks the client certificate:
    // a refused one shows as a closed connection or a bare alert, so say what it likely means.
    let refused = [
        "connection closed",
        "broken pipe",
        "connection reset",
        "badcertificate",
        "certificaterequired",
        "unknownca",
    ];
    let lower = detail.to_ascii_lowercase();
    if config.tls.is_some() && refused.iter().any(|r| lower.contains(r)) {
        detail.push_str(
            " (etcd closed the TLS connection: with --client-cert-auth it wants a client \
             certificate of the CA it trusts, see etcd.cert_file and etcd.key_file)",
        );
    }
    StoreError::Unavailable {
        what: format!("{what} etcd at {}", config.endpoints.join(",")),
        detail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_never_shows_the_password() {
        let mut c = EtcdConfig::new(vec!["http://a:1".into()], "/p");
        c.user = Some(("proxy".into(), "s3cret-pw".into()));
        let shown = format!("{c:?}");
        assert!(shown.contains("proxy"), "{shown}");
        assert!(!shown.contains("s3cret-pw"), "{shown}");
    }
}
