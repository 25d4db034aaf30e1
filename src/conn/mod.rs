//! One client connection, from accept to close. [`serve`] reads as the table in
//! docs/LIFECYCLE.md: each stage is an `async fn` taking the previous stage's output. One
//! deadline set at accept covers everything up to the StartupMessage, the upstream dial has
//! its own, and so has the authentication exchange. From TLS on the connection is registered
//! as a session: it is re-admitted under the snapshot then in force, and every later stage
//! ends as soon as a reload or the shutdown tells the session to end.

pub mod auth;
pub mod cancel;
pub mod error;
pub mod negotiate;
pub mod peer;
pub mod refuse;
pub mod relay;
pub mod shared;
pub mod startup;
pub mod tls;
pub mod upstream;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::Timeouts;
use crate::limits::Admission;
use crate::metrics::Metrics;
use crate::sessions::{SessionGuard, Sessions};
use crate::snapshot::{DatabaseRuntime, Snapshot};
use crate::wire::error_response;
use error::{ConnError, ErrorKind};
use negotiate::Negotiated;
use relay::{ClosedBy, Counters, RelayStats};
use tls::ClientIdentity;

/// What every connection shares: the current snapshot and the process-wide registries.
pub struct Context {
    pub snapshot: ArcSwap<Snapshot>,
    pub metrics: Arc<Metrics>,
    pub sessions: Arc<Sessions>,
    pub timeouts: Timeouts,
    /// Load balancers whose connections must open with a PROXY header (fixed at start).
    pub proxy_protocol_from: Vec<ipnet::IpNet>,
    /// This replica's fleet; `None` for a single node (fixed at start).
    pub fleet: Option<Arc<crate::fleet::Fleet>>,
    pub cancel_limiter: cancel::CancelLimiter,
    /// Every connection task, so that shutdown can wait for the last one to log its line:
    /// the slots it waits on go back just before that line, and the data-plane threads die
    /// with the process.
    pub tasks: tokio_util::task::TaskTracker,
    next_conn_id: AtomicU64,
}

impl Context {
    pub fn new(snapshot: Snapshot, metrics: Arc<Metrics>, timeouts: Timeouts) -> Self {
        Context {
            snapshot: ArcSwap::from_pointee(snapshot),
            metrics,
            sessions: Arc::new(Sessions::default()),
            timeouts,
            proxy_protocol_from: Vec::new(),
            fleet: None,
            cancel_limiter: cancel::CancelLimiter::default(),
            tasks: tokio_util::task::TaskTracker::new(),
            next_conn_id: AtomicU64::new(1),
        }
    }

    pub fn with_proxy_protocol_from(mut self, trusted: Vec<ipnet::IpNet>) -> Self {
        self.proxy_protocol_from = trusted;
        self
    }

    pub fn with_fleet(mut self, fleet: Option<Arc<crate::fleet::Fleet>>) -> Self {
        self.fleet = fleet;
        self
    }
}

/// What one listener serves: one database on its own address, or every database with
/// `listen: shared`, picked by the ClientHello's SNI.
#[derive(Debug, Clone)]
pub enum Served {
    Database(Arc<str>),
    /// `default` serves a client that names no database, or one no database has.
    Shared {
        default: Option<Arc<str>>,
    },
}

impl From<&str> for Served {
    fn from(name: &str) -> Self {
        Served::Database(name.into())
    }
}

impl Served {
    /// The database of a database's own listener; `None` on the shared listener.
    pub fn database(&self) -> Option<&str> {
        match self {
            Served::Database(name) => Some(name),
            Served::Shared { .. } => None,
        }
    }
}

/// Everything the per-connection summary line says.
#[derive(Debug, Default)]
struct ConnLog {
    /// The client as the PROXY header named it, and the balancer it came through.
    client: Option<peer::ClientAddr>,
    /// The IP rule or trusted range that admitted the client, and which of the two it is.
    rule_id: Option<Arc<str>>,
    admitted_by: Option<crate::allowlist::AdmittedBy>,
    /// The database this connection is for, once known (on the shared listener, from SNI or
    /// a cancel key): what its log line names and its refusal is charged to.
    db: Option<Arc<DatabaseRuntime>>,
    identity: ClientIdentity,
    pg_user: Option<String>,
    pg_database: Option<String>,
    negotiation: &'static str,
    stats: RelayStats,
    relayed: bool,
}

/// Serves one accepted socket of a listener to the end, then logs one line.
/// `admission` is held until then (boxed: every idle session's task carries it).
pub async fn serve(
    ctx: Arc<Context>,
    served: Served,
    stream: TcpStream,
    peer: SocketAddr,
    mut admission: Box<Admission>,
) {
    let started = Instant::now();
    let conn_id = ctx.next_conn_id.fetch_add(1, Ordering::Relaxed);
    let mut log = ConnLog::default();
    let result = run(
        &ctx,
        &served,
        stream,
        peer,
        conn_id,
        &mut admission,
        &mut log,
    )
    .await;
    let error_kind = result.as_ref().err().map(|e| e.kind);
    let client = log.client.unwrap_or(peer::ClientAddr::direct(peer));
    // A trusted balancer's own connections (a PROXY LOCAL health check) are never throttled,
    // so their failures are not counted either.
    if error_kind.is_some_and(crate::throttle::is_handshake_failure)
        && !peer::is_trusted(&ctx.proxy_protocol_from, client.addr)
    {
        note_handshake_failure(&admission, client.addr.ip());
    }
    // The connection's slots go back before its line is logged, so whoever reads that line
    // may count on them being free.
    drop(admission);
    match (&log.db, error_kind) {
        (Some(db), Some(kind)) => db.metrics.refuse(kind),
        (None, Some(kind)) if served.database().is_none() => ctx.metrics.refuse_shared(kind),
        _ => {}
    }
    let database: Option<&str> = log
        .db
        .as_ref()
        .map(|d| &*d.name)
        .or_else(|| served.database());
    let outcome = match (&result, log.relayed) {
        (Ok(()), _) if log.negotiation == "cancel" => "cancel_forwarded",
        (Ok(()), _) => "closed",
        (Err(_), true) => "cut",
        (Err(_), false) => "refused",
    };
    let detail = result.as_ref().err().map(|e| e.detail.as_str());
    // Refusals are rate-limited (their count is in the metric); sessions are always logged.
    let reason = error_kind.map_or("", ErrorKind::as_str);
    if outcome == "refused" && !crate::refusal_log::admit(database, reason) {
        return;
    }
    tracing::info!(
        conn_id,
        client_addr = %client.addr,
        lb_addr = client.via.map(tracing::field::display),
        database,
        listener = served.database().is_none().then_some("shared"),
        rule_id = log.rule_id.as_deref(),
        admitted_by = log.admitted_by.map(crate::allowlist::AdmittedBy::as_str),
        client_cert_id = log.identity.cert_id.as_deref(),
        client_cn = log.identity.common_name.as_deref().map(tracing::field::debug),
        client_serial = (!log.identity.serial.is_empty()).then_some(log.identity.serial.as_str()),
        pg_user = log.pg_user.as_deref().map(tracing::field::debug),
        pg_database = log.pg_database.as_deref().map(tracing::field::debug),
        tls_version = (!log.identity.tls_version.is_empty()).then_some(log.identity.tls_version),
        alpn = log.identity.alpn,
        negotiation = (!log.negotiation.is_empty()).then_some(log.negotiation),
        outcome,
        error_kind = error_kind.map(ErrorKind::as_str),
        detail,
        closed_by = log.relayed.then(|| log.stats.closed_by.as_str()),
        told_client = log.stats.told_client.then_some(true),
        bytes_to_upstream = log.stats.to_upstream,
        bytes_to_client = log.stats.to_client,
        duration_ms = started.elapsed().as_millis() as u64,
        "connection closed"
    );
}

/// Counts a failed handshake against its source's prefix; says so once when that starts a
/// block (the refusals during it are counted and rate-limited like every refusal).
fn note_handshake_failure(admission: &Admission, ip: std::net::IpAddr) {
    let throttle = admission.limits().throttle();
    if let Some(b) = throttle.record_failure(ip, std::time::Instant::now()) {
        tracing::warn!(
            prefix = %b.prefix,
            failures = b.failures.round() as u64,
            backoff_ms = b.backoff.as_millis() as u64,
            "handshake failures: source prefix throttled"
        );
    }
}

async fn run(
    ctx: &Context,
    served: &Served,
    stream: TcpStream,
    peer: SocketAddr,
    conn_id: u64,
    admission: &mut Admission,
    log: &mut ConnLog,
) -> Result<(), ConnError> {
    // The stages before the relay run once; boxed, their state lives on the heap only while
    // they run, and the task an idle session keeps holds just the relay's state.
    let prelude = Box::pin(establish(
        ctx, served, stream, peer, conn_id, admission, log,
    ))
    .await;
    // The startup packet and the authentication exchange count like relayed bytes.
    if let Some(db) = &log.db {
        db.metrics.bytes_to_upstream.inc_by(log.stats.to_upstream);
        db.metrics.bytes_to_client.inc_by(log.stats.to_client);
    }
    let est = match prelude? {
        Prelude::Cancelled => return Ok(()),
        Prelude::Relay(est) => est,
    };
    let Established {
        db,
        mut client,
        mut up,
        client_leftover,
        upstream_leftover,
        mut guard,
    } = *est;

    // Stage: relay.
    log.relayed = true;
    db.metrics.accepted.inc();
    if let Some(by) = log.admitted_by {
        db.metrics.admitted(by).inc();
    }
    db.metrics.sessions_active.inc();
    let relay_started = Instant::now();
    let (stats, err) = relay::relay(
        &mut *client,
        &mut up,
        client_leftover,
        upstream_leftover,
        &mut guard.kill,
        Counters {
            to_upstream: &db.metrics.bytes_to_upstream,
            to_client: &db.metrics.bytes_to_client,
        },
    )
    .await;
    db.metrics.sessions_active.dec();
    db.metrics
        .session_seconds
        .observe(relay_started.elapsed().as_secs_f64());
    log.stats.to_upstream += stats.to_upstream;
    log.stats.to_client += stats.to_client;
    log.stats.closed_by = stats.closed_by;
    log.stats.told_client = stats.told_client;
    // The client learns of the cut at once (told why when the relay could, see relay.rs); the backend's socket stays open until the cancel
    // has been taken.
    drop(client);
    if let Some(e) = &err {
        if matches!(e.kind, ErrorKind::RevokedLive | ErrorKind::Shutdown) {
            if let Some(key) = guard.cancel_key() {
                // Boxed: the dial's state must not grow every idle session's future.
                Box::pin(cancel_cut_session(ctx, &db, &key, conn_id)).await;
            }
        }
    }
    // Only now is the backend's socket closed.
    drop(up);
    match err {
        // A peer going away mid-session is how sessions end, not a refusal.
        Some(e) if matches!(e.kind, ErrorKind::ClientIo | ErrorKind::UpstreamIo) => {
            log.stats.closed_by = if e.kind == ErrorKind::ClientIo {
                ClosedBy::Client
            } else {
                ClosedBy::Upstream
            };
            Ok(())
        }
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// A session the proxy cuts may be in the middle of a statement, and Postgres notices a lost
/// client only when it next writes to it: cancel the statement with the key the proxy holds,
/// while the backend still serves this session, so that it does not run on and commit.
async fn cancel_cut_session(
    ctx: &Context,
    db: &DatabaseRuntime,
    key: &crate::wire::frontend::CancelKey,
    conn_id: u64,
) {
    match cancel::send(&db.upstream, &ctx.timeouts, key).await {
        Ok(()) => tracing::info!(
            conn_id,
            database = &*db.name,
            "cut session: cancel request sent to its backend"
        ),
        Err(e) => tracing::warn!(
            conn_id,
            database = &*db.name,
            error_kind = e.kind.as_str(),
            detail = e.detail.as_str(),
            "cut session: cancel request to its backend failed"
        ),
    }
}

/// What the stages before the relay hand on.
enum Prelude {
    /// A CancelRequest was forwarded; the connection is done.
    Cancelled,
    Relay(Box<Established>),
}

struct Established {
    /// The database as the snapshot in force after TLS has it.
    db: Arc<DatabaseRuntime>,
    client: Box<tokio_rustls::server::TlsStream<TcpStream>>,
    up: upstream::UpstreamStream,
    /// Bytes read past the authentication phase, relayed first.
    client_leftover: bytes::BytesMut,
    upstream_leftover: bytes::BytesMut,
    guard: SessionGuard,
}

/// Runs one stage of a registered session unless the session is told to end first (a reload
/// that no longer admits it, or the end of the shutdown grace). The kill flag is polled first,
/// so a stage never takes another step once it is set.
async fn unless_ended<T>(
    guard: &mut SessionGuard,
    stage: impl Future<Output = Result<T, ConnError>>,
) -> Result<T, ConnError> {
    tokio::select! {
        biased;
        reason = guard.killed() => Err(ConnError::new(reason.kind(), reason.as_str())),
        r = stage => r,
    }
}

/// Stages admit, negotiate, TLS, re-admit, startup, upstream and authentication.
async fn establish(
    ctx: &Context,
    served: &Served,
    mut stream: TcpStream,
    peer: SocketAddr,
    conn_id: u64,
    admission: &mut Admission,
    log: &mut ConnLog,
) -> Result<Prelude, ConnError> {
    let deadline = tokio::time::Instant::now() + ctx.timeouts.handshake;
    let timed_out = || ConnError::new(ErrorKind::HandshakeTimeout, "handshake_timeout elapsed");
    // Only a trusted load balancer's PROXY header can name another client.
    let mut header_pending = peer::is_trusted(&ctx.proxy_protocol_from, peer);
    let admitted = admit(
        ctx,
        served,
        &mut stream,
        peer,
        &mut header_pending,
        admission,
        log,
    );
    let client_addr = match tokio::time::timeout_at(deadline, admitted).await {
        Ok(Ok(a)) => a,
        Ok(Err(e)) => {
            // A peer that stalled or vanished is not waited for again.
            let position = match (e.kind, header_pending) {
                (ErrorKind::ProxyProtocolInvalid, _) => refuse::Position::Unknown,
                (_, true) => refuse::Position::ProxyHeaderNext,
                (_, false) => refuse::Position::Start,
            };
            if e.kind != ErrorKind::ClientIo {
                refuse::before_tls(stream, peer, position);
            }
            return Err(e);
        }
        Err(_) => return Err(timed_out()),
    };
    let ip = client_addr.addr.ip();
    let _ = stream.set_nodelay(true);

    // Stage: negotiate.
    let negotiated = tokio::time::timeout_at(deadline, negotiate::negotiate(&mut stream))
        .await
        .map_err(|_| timed_out())??;
    log.negotiation = negotiated.mode();
    let direct = match (negotiated, &log.db) {
        (Negotiated::Cancel(key), Some(db)) => {
            return cancel::forward(ctx, db, key, ip)
                .await
                .map(|()| Prelude::Cancelled)
        }
        (Negotiated::Cancel(key), None) => {
            return cancel::forward_shared(ctx, key, ip, &mut log.db)
                .await
                .map(|()| Prelude::Cancelled)
        }
        (Negotiated::Tls { direct }, _) => direct,
    };

    // Stage: TLS under the configuration of the accept (on the shared listener, of the
    // database the SNI names): a client certificate is required unless only a trusted range
    // admits the address.
    let own = log.db.clone().zip(log.admitted_by);
    let (picked, rule_id, by) = (&mut log.db, &mut log.rule_id, &mut log.admitted_by);
    let choose = |sni: Option<&str>| match own {
        Some(own) => Ok(own),
        None => shared::pick(ctx, served, sni, ip, picked, (rule_id, by)),
    };
    let (client, identity, accepted_db, admitted_by) =
        tokio::time::timeout_at(deadline, tls::accept(stream, choose, direct))
            .await
            .map_err(|_| timed_out())??;
    log.admitted_by = Some(admitted_by);
    // Moved by pointer from here on: the relay keeps exactly one copy of the TLS state.
    let mut client = Box::new(client);
    log.identity = identity;
    // Stage: session slot. Only a client that completed mutual TLS takes one.
    if let Err(e) = admission.promote() {
        return Err(notify(&mut client, e).await);
    }

    // Stage: re-admit. The handshake may have taken seconds, and a reload in between may have
    // revoked the certificate or deleted the rule: check again under the snapshot in force
    // now. Registered first, so a reload from here on tells this connection to end.
    let mut guard = ctx.sessions.register(
        conn_id,
        accepted_db.name.clone(),
        client_addr.addr,
        admitted_by,
        &log.identity,
    );
    let snap = ctx.snapshot.load_full();
    if let Some(r) = ctx
        .sessions
        .admit(conn_id, &snap, time::OffsetDateTime::now_utc())
    {
        let e = ConnError::new(
            r.refusal_kind(),
            format!("not admitted after TLS: {}", r.as_str()),
        );
        return Err(notify(&mut client, e).await);
    }
    let Some(db) = snap.databases.get(&*accepted_db.name).cloned() else {
        let e = ConnError::new(ErrorKind::DatabaseDisabled, "database is no longer served");
        return Err(notify(&mut client, e).await);
    };
    drop(snap);
    log.db = Some(Arc::clone(&db));
    // The re-admission held, so some list admits the address; name the one in force now.
    if let Some(admitted) = db.admit(client_addr.addr.ip()) {
        log.rule_id = Some(admitted.entry.id.clone());
        log.admitted_by = Some(admitted.by);
    }
    // Stage: the database's own session limits, under the settings now in force.
    let db_limits = crate::limits::DatabaseLimits {
        max_connections: db.settings.max_connections,
        max_connections_per_ip: db.settings.max_connections_per_ip,
    };
    if let Err(e) = admission.take_database_slot(&db.name, ip, db_limits) {
        return Err(notify(&mut client, e).await);
    }

    // Stage: StartupMessage inside TLS.
    let startup = unless_ended(&mut guard, async {
        tokio::time::timeout_at(deadline, startup::read(&mut client))
            .await
            .map_err(|_| timed_out())?
    })
    .await;
    let params = match startup {
        Err(e) => return Err(notify(&mut client, e).await),
        Ok(startup::Startup::Cancel(key)) => {
            log.negotiation = "cancel";
            return cancel::forward(ctx, &db, key, client_addr.addr.ip())
                .await
                .map(|()| Prelude::Cancelled);
        }
        Ok(startup::Startup::Session(p)) => p,
    };
    log.pg_user = params.user().map(str::to_owned);
    log.pg_database = params.database().map(str::to_owned);
    guard.set_startup(params.user(), params.database());
    // Stage: identity. The certificate names the one role it may log in as, when the
    // database asks for that; otherwise Postgres alone decides who the user may be.
    if let Err(e) = identity_admits(
        &db.settings,
        params.user(),
        log.identity.common_name.as_deref(),
    ) {
        return Err(notify(&mut client, e).await);
    }

    // Stage: upstream.
    let dialled = unless_ended(
        &mut guard,
        upstream::connect_timed(
            &db.upstream,
            &ctx.timeouts,
            &db.metrics.upstream_connect_seconds,
        ),
    )
    .await;
    let mut up = match dialled {
        Ok(u) => u,
        Err(e) => return Err(notify(&mut client, e).await),
    };

    // Stage: auth, from the StartupMessage sent on to the first ReadyForQuery.
    let is_tls = up.is_tls();
    let auth_timeout = ctx.timeouts.auth;
    let replica_id = ctx.fleet.as_ref().map(|f| f.replica_id());
    let stats = &mut log.stats;
    let authenticated = unless_ended(&mut guard, async {
        let phase = async {
            let startup = params.encode();
            up.write_all(&startup)
                .await
                .map_err(|e| ConnError::new(ErrorKind::UpstreamUnavailable, e.to_string()))?;
            stats.to_upstream += startup.len() as u64;
            auth::relay_auth_phase(&mut client, &mut up, is_tls, stats, replica_id).await
        };
        tokio::time::timeout(auth_timeout, phase)
            .await
            .map_err(|_| ConnError::new(ErrorKind::AuthTimeout, "auth_timeout elapsed"))?
    })
    .await;
    let outcome = match authenticated {
        Ok(o) => o,
        Err(e) => return Err(notify(&mut client, e).await),
    };
    guard.set_active();
    if let Some(key) = outcome.cancel_key {
        if !guard.set_cancel_key(key, outcome.client_cancel_key, db.name.clone()) {
            tracing::warn!(
                conn_id,
                database = &*db.name,
                "cancel key already held by another session; this session cannot be cancelled"
            );
        }
    }
    Ok(Prelude::Relay(Box::new(Established {
        db,
        client,
        up,
        client_leftover: outcome.client_leftover,
        upstream_leftover: outcome.upstream_leftover,
        guard,
    })))
}

/// Stages peer and admit: who the client is and whether anything admits it. Before a byte of
/// the client's own is read or any crypto is done; a refusal here is answered by
/// [`refuse::before_tls`]. On the shared listener, some database there must admit the address;
/// the one the SNI picks decides again later, before the handshake goes on.
async fn admit(
    ctx: &Context,
    served: &Served,
    stream: &mut TcpStream,
    peer: SocketAddr,
    header_pending: &mut bool,
    admission: &mut Admission,
    log: &mut ConnLog,
) -> Result<peer::ClientAddr, ConnError> {
    // A database's own listener serves that database; on the shared listener the database is
    // known only from the ClientHello (or a cancel key).
    if let Served::Database(name) = served {
        let Some(db) = ctx.snapshot.load().databases.get(&**name).cloned() else {
            return Err(ConnError::new(
                ErrorKind::DatabaseDisabled,
                "database is no longer served",
            ));
        };
        log.db = Some(db);
    }

    // Stage: peer.
    let client_addr = if *header_pending {
        *header_pending = false;
        peer::read_header(stream, peer).await?
    } else {
        peer::ClientAddr::direct(peer)
    };
    log.client = Some(client_addr);
    // A balancer's client from a throttled prefix: refused before any crypto, as at accept.
    if client_addr.via.is_some()
        && admission
            .limits()
            .throttle()
            .is_blocked(client_addr.addr.ip(), std::time::Instant::now())
    {
        return Err(ConnError::new(
            ErrorKind::HandshakeThrottled,
            "this source prefix failed too many handshakes",
        ));
    }
    // A balancer's client counts against its own source's handshake cap from here on.
    admission
        .count_source(client_addr.addr.ip())
        .map_err(|k| ConnError::new(k, "max_handshakes_per_source reached"))?;

    // Stage: admit.
    let ip = client_addr.addr.ip();
    match &log.db {
        Some(db) => {
            let Some(admitted) = db.admit(ip) else {
                return Err(ConnError::new(
                    ErrorKind::IpNotAllowed,
                    "no IP rule or trusted range admits this address",
                ));
            };
            log.rule_id = Some(admitted.entry.id.clone());
            log.admitted_by = Some(admitted.by);
        }
        None if !ctx.snapshot.load().shared_admits(ip) => {
            return Err(ConnError::new(
                ErrorKind::IpNotAllowed,
                "no IP rule or trusted range of a database on the shared listener admits this \
                 address",
            ))
        }
        None => {}
    }
    Ok(client_addr)
}

/// The identity policy: with `user_must_match_cn`, the StartupMessage's user must be the
/// client certificate's common name. The handshake's check and `pgmtls doctor --user`'s.
pub fn identity_admits(
    settings: &crate::state::DatabaseSettings,
    user: Option<&str>,
    common_name: Option<&str>,
) -> Result<(), ConnError> {
    let cn_is_user = matches!((user, common_name), (Some(u), Some(cn)) if u == cn);
    if settings.user_must_match_cn && !cn_is_user {
        return Err(ConnError::new(
            ErrorKind::IdentityDenied,
            "user name is not the certificate's common name",
        ));
    }
    Ok(())
}

/// How long a refused client gets to take its ErrorResponse and close_notify: a client that
/// does not read must not keep the connection (and its permit) for longer.
const NOTIFY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// Tells a TLS client why it is refused, if the error has a fixed notice, then closes.
async fn notify<S: AsyncWrite + Unpin>(client: &mut S, e: ConnError) -> ConnError {
    let tell = async {
        if let Some(n) = e.client_notice() {
            let _ = client
                .write_all(&error_response(n.sqlstate, n.message, n.hint))
                .await;
            let _ = client.flush().await;
        }
        let _ = client.shutdown().await;
    };
    let _ = tokio::time::timeout(NOTIFY_TIMEOUT, tell).await;
    e
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    /// Every idle session is one task holding this future: it must stay small (the TLS state
    /// and any buffers live on the heap, once).
    #[tokio::test]
    async fn the_per_session_future_stays_small() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let s = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        let ctx = Arc::new(super::Context::new(
            crate::snapshot::Snapshot::default(),
            Arc::new(crate::metrics::Metrics::new()),
            crate::config::Timeouts::default(),
        ));
        let peer = s.local_addr().unwrap();
        let admission = Box::new(crate::limits::Limits::new(1, 1, 1).admit(None).unwrap());
        let fut = super::serve(ctx, "x".into(), s, peer, admission);
        let size = std::mem::size_of_val(&fut);
        // 1280 until the relay learned the server-to-client framing (for the FATAL a cut
        // session is told): 32 more bytes of framing state, a debug build's layout.
        assert!(size <= 1312, "serve() future grew to {size} bytes");
    }
}
