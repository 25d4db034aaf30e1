//! CancelRequest forwarding. Only keys of sessions a replica relays reach a Postgres: the
//! proxy must not become a way to guess cancel keys of other sessions on the upstream. In a
//! fleet the key names the replica that relays the session (see `fleet::key`), and a request
//! for another replica's session is passed to it over the peer channel, one hop at most. The
//! same path cancels the statement of a session the proxy cuts (see [`send`]).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::error::{ConnError, ErrorKind};
use super::upstream;
use super::Context;
use crate::config::Timeouts;
use crate::fleet::message::Reply;
use crate::fleet::Route;
use crate::snapshot::{DatabaseRuntime, UpstreamTarget};
use crate::wire::frontend::CancelKey;

/// Forwards the CancelRequest `key` that `source` sent to `db`'s listener, to whichever
/// Postgres backend relays it, if any does.
pub async fn forward(
    ctx: &Context,
    db: &DatabaseRuntime,
    key: CancelKey,
    source: IpAddr,
) -> Result<(), ConnError> {
    if !ctx.cancel_limiter.admit(source, Instant::now()) {
        db.metrics.cancel_refused.inc();
        return Err(rate_limited());
    }
    forward_admitted(ctx, db, key).await
}

fn rate_limited() -> ConnError {
    ConnError::new(
        ErrorKind::CancelRateLimited,
        "too many cancel requests from this source",
    )
}

/// A CancelRequest on the shared listener: it carries no SNI, so its key names the database
/// (that of the session which handed it out), and that database's IP rules must admit
/// `source`. `picked` learns the database as soon as it is known, to charge the refusal to it.
/// The rate limit comes first, so that guessing keys costs the same as on a database's port.
pub async fn forward_shared(
    ctx: &Context,
    key: CancelKey,
    source: IpAddr,
    picked: &mut Option<Arc<DatabaseRuntime>>,
) -> Result<(), ConnError> {
    if !ctx.cancel_limiter.admit(source, Instant::now()) {
        return Err(rate_limited());
    }
    let db = ctx
        .sessions
        .cancel_database(&key)
        .and_then(|name| ctx.snapshot.load().databases.get(&*name).cloned())
        .filter(|db| db.settings.listen.is_shared());
    let Some(db) = db else {
        return Err(ConnError::new(
            ErrorKind::CancelUnknownKey,
            "cancel key of no session on the shared listener relayed by this proxy",
        ));
    };
    *picked = Some(Arc::clone(&db));
    if db.admit(source).is_none() {
        db.metrics.cancel_refused.inc();
        return Err(ConnError::new(
            ErrorKind::IpNotAllowed,
            "no IP rule or trusted range of the session's database admits this address",
        ));
    }
    forward_admitted(ctx, &db, key).await
}

/// Forwards `key` for `db` once the source has passed the rate limit.
async fn forward_admitted(
    ctx: &Context,
    db: &DatabaseRuntime,
    key: CancelKey,
) -> Result<(), ConnError> {
    let unknown = || {
        db.metrics.cancel_refused.inc();
        ConnError::new(
            ErrorKind::CancelUnknownKey,
            "cancel key of no session relayed by this proxy",
        )
    };
    match (
        ctx.fleet.as_deref(),
        ctx.fleet.as_deref().map(|f| f.route(&key)),
    ) {
        (Some(fleet), Some(Route::Peer(owner))) => {
            let asked = fleet
                .ask_owner(owner, &db.name, &key, ctx.timeouts.upstream_connect)
                .await;
            match asked {
                Ok(Reply::Forwarded) => {}
                Ok(Reply::UnknownKey)
                | Err(crate::fleet::channel::ForwardError::UnknownReplica(_)) => {
                    return Err(unknown())
                }
                Ok(Reply::UpstreamFailed) => {
                    return Err(ConnError::new(
                        ErrorKind::UpstreamUnavailable,
                        format!("replica {owner} could not reach its upstream"),
                    ))
                }
                Err(e) => {
                    return Err(ConnError::new(
                        ErrorKind::CancelPeerUnavailable,
                        e.to_string(),
                    ))
                }
            }
        }
        _ => {
            let Some(real) = ctx.sessions.real_cancel_key(&key, &db.name) else {
                return Err(unknown());
            };
            send(&db.upstream, &ctx.timeouts, &real).await?;
        }
    }
    db.metrics.cancel_forwarded.inc();
    Ok(())
}

/// A CancelRequest another replica passed on: looked up in this process only (never
/// forwarded again) and sent to this process' upstream of `database`.
pub async fn forward_local(ctx: &Context, database: &str, key: &CancelKey) -> Reply {
    let Some(real) = ctx.sessions.real_cancel_key(key, database) else {
        return Reply::UnknownKey;
    };
    let Some(db) = ctx.snapshot.load().databases.get(database).cloned() else {
        return Reply::UnknownKey;
    };
    match send(&db.upstream, &ctx.timeouts, &real).await {
        Ok(()) => Reply::Forwarded,
        Err(_) => Reply::UpstreamFailed,
    }
}

/// Cancels a client address may send in a burst, and how many a second after that. libpq
/// sends one per Ctrl-C and drivers one per timeout; a guesser needs millions.
const CANCEL_BURST: f64 = 20.0;
const CANCELS_PER_SECOND: f64 = 5.0;
/// Sources tracked at once. Full, buckets that have refilled are dropped; if none has, a new
/// source is refused rather than the table grown.
const MAX_TRACKED_SOURCES: usize = 16_384;

/// A token bucket per client address (an IPv6 /64, as `max_handshakes_per_source` counts).
#[derive(Default)]
pub struct CancelLimiter {
    buckets: Mutex<HashMap<IpAddr, (f64, Instant)>>,
}

impl CancelLimiter {
    /// Takes one token from `source`'s bucket; `false` when it has none.
    pub fn admit(&self, source: IpAddr, now: Instant) -> bool {
        let source = crate::limits::source_key(source);
        let mut map = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let level = |(tokens, at): (f64, Instant)| {
            let refill = now.saturating_duration_since(at).as_secs_f64() * CANCELS_PER_SECOND;
            (tokens + refill).min(CANCEL_BURST)
        };
        if !map.contains_key(&source) && map.len() >= MAX_TRACKED_SOURCES {
            map.retain(|_, b| level(*b) < CANCEL_BURST);
            if map.len() >= MAX_TRACKED_SOURCES {
                return false;
            }
        }
        let tokens = map.get(&source).map_or(CANCEL_BURST, |b| level(*b));
        if tokens < 1.0 {
            map.insert(source, (tokens, now));
            return false;
        }
        map.insert(source, (tokens - 1.0, now));
        true
    }
}

/// Sends one CancelRequest for `key` to the upstream and waits, all within the upstream
/// connect timeout, until
/// the server closes that connection, which it does once it has signalled the backend (libpq
/// waits the same way). A caller that then closes the session's own socket knows the cancel
/// reached the backend while it still served that session, so the key cannot hit a later
/// backend that reused the process id.
pub async fn send(
    target: &UpstreamTarget,
    timeouts: &Timeouts,
    key: &CancelKey,
) -> Result<(), ConnError> {
    let timeout = timeouts.upstream_connect;
    let io = |e: std::io::Error| ConnError::new(ErrorKind::UpstreamIo, e.to_string());
    let exchange = async {
        let mut up = upstream::connect(target, timeouts).await?;
        up.write_all(&key.to_request()).await.map_err(io)?;
        up.flush().await.map_err(io)?;
        // The server sends nothing back; EOF, or a reset or a TLS close without close_notify,
        // means it is done with the request.
        let mut sink = [0u8; 64];
        while matches!(up.read(&mut sink).await, Ok(n) if n > 0) {}
        Ok(())
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(r) => r,
        Err(_) => Err(ConnError::new(
            ErrorKind::UpstreamUnavailable,
            format!("cancel request not acknowledged within {timeout:?}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_source_gets_a_burst_then_a_steady_rate_and_others_are_not_affected() {
        let l = CancelLimiter::default();
        let t0 = Instant::now();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let burst = CANCEL_BURST as usize;
        assert!((0..burst).all(|_| l.admit(a, t0)));
        assert!(!l.admit(a, t0), "the burst is spent");
        assert!(l.admit(b, t0), "another source has its own bucket");
        // 1/CANCELS_PER_SECOND later one more token is there, and only one.
        let later = t0 + Duration::from_millis(201);
        assert!(l.admit(a, later));
        assert!(!l.admit(a, later));
        // Refused attempts do not earn tokens.
        assert!(!l.admit(a, later + Duration::from_millis(10)));
        // Long idle: back to the burst, not beyond.
        let idle = later + Duration::from_secs(3600);
        assert!((0..burst).all(|_| l.admit(a, idle)));
        assert!(!l.admit(a, idle));
    }

    #[test]
    fn an_ipv6_source_is_its_slash_64() {
        let l = CancelLimiter::default();
        let t0 = Instant::now();
        for i in 0..CANCEL_BURST as u16 {
            let ip = IpAddr::V6(std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 1, 0, 0, 0, i + 1));
            assert!(l.admit(ip, t0));
        }
        let same_64: IpAddr = "2001:db8:0:1::ffff".parse().unwrap();
        assert!(!l.admit(same_64, t0));
        assert!(l.admit("2001:db8:0:2::1".parse().unwrap(), t0));
    }

    #[test]
    fn the_table_of_sources_is_bounded() {
        let l = CancelLimiter::default();
        let t0 = Instant::now();
        for i in 0..MAX_TRACKED_SOURCES as u32 {
            assert!(l.admit(IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i)), t0));
        }
        // Every tracked bucket is below full: a new source is refused, the table stays put.
        assert!(!l.admit("192.0.2.1".parse().unwrap(), t0));
        // Once they have refilled, they make room.
        assert!(l.admit("192.0.2.1".parse().unwrap(), t0 + Duration::from_secs(10)));
        assert!(l.buckets.lock().unwrap().len() <= MAX_TRACKED_SOURCES);
    }
}
