//! Failed-handshake throttling. A TLS handshake costs the proxy a key exchange and a
//! signature before it can tell a client without a valid certificate from one with, so a
//! source that keeps failing handshakes (no certificate, a wrong CA, an expired or revoked
//! certificate, garbage instead of TLS) is, after a burst, closed at accept, before any byte
//! is read or any crypto is done, for a backoff that doubles while its failures continue and
//! winds down once they stop. Sources are grouped by IPv4 /24 and IPv6 /64, the blocks one
//! host can usually draw addresses from, so hopping addresses inside them does not help.
//!
//! The score is a failure count that decays exponentially (half-life `decay`): a burst of
//! `burst` failures within about `decay` starts a block of `backoff`. A prefix that keeps at
//! it, failing again once a block runs out (its attempts during the block are closed unseen,
//! and keep its record alive), is blocked again at once, each time for twice as long, up to
//! `max_backoff`. Once it stops, every `decay` of quiet after its last attempt takes one
//! doubling back off; with none left and its score below the burst it is forgiven. The table
//! holds at most `max_prefixes` prefixes; when full, forgiven entries go first, then the one
//! with the lowest score that is not blocked, so a flood from many prefixes cannot push the
//! worst offenders out.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ipnet::IpNet;

use crate::conn::error::ErrorKind;

/// `handshake_throttle_*` in pgmtls.yaml.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThrottleConfig {
    /// Failures (decayed) at which a prefix is blocked; `None` turns throttling off.
    pub burst: Option<u32>,
    /// The first block.
    pub backoff: Duration,
    pub max_backoff: Duration,
    /// Half-life of the failure score, and the time after which one doubling is undone.
    pub decay: Duration,
    pub max_prefixes: usize,
}

impl Default for ThrottleConfig {
    fn default() -> Self {
        ThrottleConfig {
            burst: Some(20),
            backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(300),
            decay: Duration::from_secs(30),
            max_prefixes: 4096,
        }
    }
}

/// Whether a connection that ended with `kind` counts as a failed handshake: the peer could
/// not prove who it is. Timeouts are not counted (slow clients are bounded by the handshake
/// pool), nor refusals that cost no crypto (the allowlist, the budgets).
pub fn is_handshake_failure(kind: ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::ClientCertMissing
            | ErrorKind::ClientCertUntrusted
            | ErrorKind::ClientCertExpired
            | ErrorKind::ClientCertNotYetValid
            | ErrorKind::ClientCertRevoked
            | ErrorKind::TlsHandshake
            | ErrorKind::TlsRequired
            | ErrorKind::ProtocolViolation
            | ErrorKind::EarlyData
    )
}

/// The prefix a source is throttled under: an IPv4 /24 (also when IPv4-mapped), an IPv6 /64.
pub fn prefix_of(ip: IpAddr) -> IpNet {
    let v4 = match ip {
        IpAddr::V4(v4) => v4,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4,
            None => {
                let s = v6.segments();
                let net = Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0);
                return IpNet::V6(ipnet::Ipv6Net::new_assert(net, 64));
            }
        },
    };
    let o = v4.octets();
    IpNet::V4(ipnet::Ipv4Net::new_assert(
        Ipv4Addr::new(o[0], o[1], o[2], 0),
        24,
    ))
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    score: f64,
    /// When `score` was last brought forward.
    updated: Instant,
    /// Blocks in a row: the next one lasts `backoff * 2^strikes`.
    strikes: u32,
    blocked_until: Option<Instant>,
    /// The last failure or blocked attempt; quiet is counted from here (or the block's end).
    last_attempt: Instant,
}

impl Entry {
    /// Brings the score and the strikes forward to `now`.
    fn decay_to(&mut self, now: Instant, c: &ThrottleConfig) {
        let half = c.decay.as_secs_f64().max(0.001);
        let dt = now.saturating_duration_since(self.updated);
        self.score *= (-dt.as_secs_f64() / half).exp2();
        self.updated = now;
        let quiet_from = self
            .blocked_until
            .map_or(self.last_attempt, |b| b.max(self.last_attempt));
        let quiet = now.saturating_duration_since(quiet_from).as_secs_f64() / half;
        let forgiven = quiet as u32;
        if forgiven > 0 {
            self.strikes = self.strikes.saturating_sub(forgiven);
            // The quiet counted is spent: it is not counted again at the next look.
            self.last_attempt = now;
            self.blocked_until = self.blocked_until.filter(|b| *b > now);
        }
    }

    fn blocked(&self, now: Instant) -> bool {
        self.blocked_until.is_some_and(|t| t > now)
    }

    /// Nothing worth remembering: not blocked, no strikes, too little score to matter.
    fn idle(&self, now: Instant, c: &ThrottleConfig) -> bool {
        let mut e = *self;
        e.decay_to(now, c);
        !e.blocked(now) && e.score < 0.5 && e.strikes == 0
    }
}

/// The block a prefix gets as its `strikes`-th in a row: `backoff * 2^(strikes-1)`, at most
/// `max_backoff`.
pub fn backoff_for(strikes: u32, c: &ThrottleConfig) -> Duration {
    let doublings = strikes.saturating_sub(1).min(30);
    c.backoff
        .saturating_mul(1u32 << doublings)
        .min(c.max_backoff)
}

/// A block just started, for the log.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Blocked {
    pub prefix: IpNet,
    pub backoff: Duration,
    pub failures: f64,
}

/// One prefix currently blocked, for `/status`.
#[derive(Debug, Clone, PartialEq)]
pub struct ThrottledPrefix {
    pub prefix: IpNet,
    pub remaining: Duration,
    pub failures: f64,
}

pub struct HandshakeThrottle {
    config: ThrottleConfig,
    table: Mutex<HashMap<IpNet, Entry>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl HandshakeThrottle {
    pub fn new(config: ThrottleConfig) -> Self {
        HandshakeThrottle {
            config,
            table: Mutex::new(HashMap::new()),
        }
    }

    pub fn config(&self) -> &ThrottleConfig {
        &self.config
    }

    /// At accept: whether `ip`'s prefix is blocked now. A blocked attempt counts as the
    /// prefix still being at it, so its doublings do not wear off during the flood.
    pub fn is_blocked(&self, ip: IpAddr, now: Instant) -> bool {
        if self.config.burst.is_none() {
            return false;
        }
        let mut table = lock(&self.table);
        if table.is_empty() {
            return false;
        }
        match table.get_mut(&prefix_of(ip)) {
            Some(e) if e.blocked(now) => {
                e.last_attempt = now;
                true
            }
            _ => false,
        }
    }

    /// After a failed handshake from `ip`: adds to its prefix's score, and starts a block
    /// (returned, for the log) when the score has reached the burst, or at once when the
    /// prefix was blocked before and has not been quiet long enough to be forgiven.
    pub fn record_failure(&self, ip: IpAddr, now: Instant) -> Option<Blocked> {
        let burst = self.config.burst?;
        let c = &self.config;
        let prefix = prefix_of(ip);
        let mut table = lock(&self.table);
        if !table.contains_key(&prefix) && table.len() >= c.max_prefixes.max(1) {
            make_room(&mut table, now, c);
        }
        let e = table.entry(prefix).or_insert(Entry {
            score: 0.0,
            updated: now,
            strikes: 0,
            blocked_until: None,
            last_attempt: now,
        });
        e.decay_to(now, c);
        e.score += 1.0;
        e.last_attempt = now;
        // A failure that lands while blocked (a handshake that began before the block) does
        // not lengthen it: only attempts after a block has run out do.
        // Rounded: `burst` failures in quick succession reach it although the first ones
        // have decayed a little.
        let reached = e.score + 0.5 >= f64::from(burst);
        if e.blocked(now) || (e.strikes == 0 && !reached) {
            return None;
        }
        e.strikes = e.strikes.saturating_add(1);
        let backoff = backoff_for(e.strikes, c);
        e.blocked_until = Some(now + backoff);
        Some(Blocked {
            prefix,
            backoff,
            failures: e.score,
        })
    }

    /// The prefixes blocked now, longest block first, and how many prefixes are tracked.
    pub fn blocked_now(&self, now: Instant) -> (Vec<ThrottledPrefix>, usize) {
        let table = lock(&self.table);
        let mut out: Vec<ThrottledPrefix> = table
            .iter()
            .filter(|(_, e)| e.blocked(now))
            .map(|(p, e)| {
                let mut d = *e;
                d.decay_to(now, &self.config);
                ThrottledPrefix {
                    prefix: *p,
                    remaining: e
                        .blocked_until
                        .map_or(Duration::ZERO, |t| t.saturating_duration_since(now)),
                    failures: d.score,
                }
            })
            .collect();
        out.sort_by_key(|p| std::cmp::Reverse(p.remaining));
        (out, table.len())
    }
}

/// Frees one slot of a full table: every idle entry goes; if none is idle, the entry with
/// the lowest score that is not blocked, else the lowest score of all.
fn make_room(table: &mut HashMap<IpNet, Entry>, now: Instant, c: &ThrottleConfig) {
    table.retain(|_, e| !e.idle(now, c));
    if table.len() < c.max_prefixes.max(1) {
        return;
    }
    let score = |e: &Entry| {
        let mut d = *e;
        d.decay_to(now, c);
        (d.blocked(now), d.score)
    };
    let victim = table
        .iter()
        .min_by(|a, b| {
            let (ba, sa) = score(a.1);
            let (bb, sb) = score(b.1);
            ba.cmp(&bb).then(sa.total_cmp(&sb))
        })
        .map(|(p, _)| *p);
    if let Some(p) = victim {
        table.remove(&p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn config() -> ThrottleConfig {
        ThrottleConfig {
            burst: Some(5),
            backoff: Duration::from_secs(2),
            max_backoff: Duration::from_secs(60),
            decay: Duration::from_secs(10),
            max_prefixes: 3,
        }
    }

    #[test]
    fn prefixes_are_slash_24_and_slash_64() {
        assert_eq!(prefix_of(ip("10.1.2.3")).to_string(), "10.1.2.0/24");
        assert_eq!(prefix_of(ip("::ffff:10.1.2.3")).to_string(), "10.1.2.0/24");
        assert_eq!(
            prefix_of(ip("2001:db8:1:2:aaaa::1")).to_string(),
            "2001:db8:1:2::/64"
        );
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let c = config();
        let secs: Vec<u64> = (1..=8).map(|s| backoff_for(s, &c).as_secs()).collect();
        assert_eq!(secs, [2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(backoff_for(u32::MAX, &c), Duration::from_secs(60));
    }

    #[test]
    fn a_burst_blocks_the_prefix_and_not_others() {
        let t = HandshakeThrottle::new(config());
        let t0 = Instant::now();
        for i in 0..4 {
            assert_eq!(t.record_failure(ip("10.0.0.7"), t0), None, "failure {i}");
        }
        assert!(!t.is_blocked(ip("10.0.0.9"), t0));
        let b = t.record_failure(ip("10.0.0.7"), t0).unwrap();
        assert_eq!(b.prefix.to_string(), "10.0.0.0/24");
        assert_eq!(b.backoff, Duration::from_secs(2));
        // The whole /24, and only it.
        assert!(t.is_blocked(ip("10.0.0.200"), t0));
        assert!(!t.is_blocked(ip("10.0.1.7"), t0));
        assert!(!t.is_blocked(ip("10.0.0.7"), t0 + Duration::from_secs(2)));
        let (blocked, tracked) = t.blocked_now(t0 + Duration::from_secs(1));
        assert_eq!((blocked.len(), tracked), (1, 1));
        assert_eq!(blocked[0].remaining, Duration::from_secs(1));
    }

    #[test]
    fn the_backoff_grows_while_failures_continue_and_decays_when_they_stop() {
        let t = HandshakeThrottle::new(config());
        let p = ip("10.0.0.7");
        let mut now = Instant::now();
        for _ in 0..4 {
            t.record_failure(p, now);
        }
        let mut blocks = Vec::new();
        // A flood: attempts all through each block (closed unseen), and a failure as soon as
        // each block runs out.
        for _ in 0..7 {
            let b = t.record_failure(p, now).unwrap();
            blocks.push(b.backoff.as_secs());
            let end = now + b.backoff;
            while now + Duration::from_millis(500) < end {
                now += Duration::from_millis(500);
                assert!(t.is_blocked(p, now));
            }
            now = end;
            assert!(!t.is_blocked(p, now));
        }
        assert_eq!(blocks, [2, 4, 8, 16, 32, 60, 60]);
        // A failure during a block does not extend it.
        let b = t.record_failure(p, now).unwrap();
        assert_eq!(b.backoff.as_secs(), 60);
        assert_eq!(t.record_failure(p, now + Duration::from_secs(1)), None);
        // The flood stops. 30 s (three half-lives) of quiet after the block: three doublings
        // are undone, so the next failure blocks for 2^(8-3) x 2 s, capped at 60 s.
        now += Duration::from_secs(60) + Duration::from_secs(30);
        assert!(!t.is_blocked(p, now));
        assert_eq!(t.record_failure(p, now).unwrap().backoff.as_secs(), 60);
        // Long quiet: forgiven, and it takes a whole burst again, for the first block.
        now += Duration::from_secs(60) + Duration::from_secs(600);
        for _ in 0..4 {
            assert_eq!(t.record_failure(p, now), None);
        }
        assert_eq!(
            t.record_failure(p, now).unwrap().backoff,
            Duration::from_secs(2)
        );
    }

    #[test]
    fn quiet_undoes_one_doubling_per_half_life() {
        let t = HandshakeThrottle::new(config());
        let p = ip("10.0.0.7");
        let mut now = Instant::now();
        for _ in 0..5 {
            t.record_failure(p, now);
        }
        // Three blocks in a row: 2, 4, 8 s.
        for want in [4, 8] {
            now += Duration::from_secs(want / 2);
            assert_eq!(t.record_failure(p, now).unwrap().backoff.as_secs(), want);
        }
        // 8 s block, then 10 s of quiet: one strike off (3 -> 2), the next block is the
        // third again (8 s), not the fourth (16 s).
        now += Duration::from_secs(8) + Duration::from_secs(10);
        assert_eq!(t.record_failure(p, now).unwrap().backoff.as_secs(), 8);
    }

    #[test]
    fn a_quick_burst_reaches_the_threshold_although_it_decays_a_little() {
        let t = HandshakeThrottle::new(config());
        let mut now = Instant::now();
        for _ in 0..4 {
            assert_eq!(t.record_failure(ip("10.0.0.7"), now), None);
            now += Duration::from_millis(50);
        }
        assert!(t.record_failure(ip("10.0.0.7"), now).is_some());
    }

    #[test]
    fn slow_failures_never_reach_the_burst() {
        let t = HandshakeThrottle::new(config());
        let mut now = Instant::now();
        // One failure every 10 s (the half-life): the score settles near 2, under 5.
        for _ in 0..100 {
            assert_eq!(t.record_failure(ip("10.0.0.7"), now), None);
            now += Duration::from_secs(10);
        }
    }

    #[test]
    fn the_table_is_capped_and_keeps_the_worst_offenders() {
        let t = HandshakeThrottle::new(config());
        let now = Instant::now();
        for _ in 0..5 {
            t.record_failure(ip("10.0.1.1"), now);
        }
        assert!(t.is_blocked(ip("10.0.1.1"), now));
        for i in 2..50 {
            t.record_failure(ip(&format!("10.0.{i}.1")), now);
            assert!(lock(&t.table).len() <= 3);
        }
        assert!(
            t.is_blocked(ip("10.0.1.1"), now),
            "the blocked prefix was evicted"
        );
    }

    #[test]
    fn off_never_blocks() {
        let t = HandshakeThrottle::new(ThrottleConfig {
            burst: None,
            ..config()
        });
        let now = Instant::now();
        for _ in 0..100 {
            assert_eq!(t.record_failure(ip("10.0.0.7"), now), None);
        }
        assert!(!t.is_blocked(ip("10.0.0.7"), now));
        assert!(lock(&t.table).is_empty());
    }
}
