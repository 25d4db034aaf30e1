//! Refused connections are counted exactly by `pgmtls_connections_refused_total`, but their
//! log lines are rate-limited: whoever sends the refused connections would otherwise decide how
//! much the proxy writes (tens of thousands of lines a second from one host). Per database and
//! reason, the first [`LINES_PER_WINDOW`] refusals of each [`WINDOW`] are logged in full; the
//! rest are only counted, and one `refusals suppressed` line per database and reason says how
//! many when the window closes. Sessions that were relayed are never sampled.
//!
//! The state is process-wide, like the log it protects.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;

/// Refusal lines logged in full per database and reason in each window.
pub const LINES_PER_WINDOW: u64 = 10;
/// How long a window lasts; its summary lines are written when it closes.
pub const WINDOW: Duration = Duration::from_secs(10);

struct State {
    started: Instant,
    /// reason -> database ("" for the admin endpoint) -> counts in the current window.
    counts: HashMap<&'static str, HashMap<Box<str>, Counts>>,
    /// Every refusal line left out since start, for the metric.
    suppressed_total: u64,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Counts {
    logged: u64,
    suppressed: u64,
}

static STATE: LazyLock<Mutex<State>> = LazyLock::new(|| {
    Mutex::new(State {
        started: Instant::now(),
        counts: HashMap::new(),
        suppressed_total: 0,
    })
});

/// One closed window's counts for a (database, reason) that had lines left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Suppressed {
    pub database: Option<String>,
    pub reason: &'static str,
    pub logged: u64,
    pub suppressed: u64,
}

fn lock() -> std::sync::MutexGuard<'static, State> {
    // The state is plain counters; a panic elsewhere mid-update leaves them usable.
    STATE.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether to log this refusal of `database` (`None`: the admin endpoint) for `reason`;
/// counts it either way. Closes the window first when it is over.
pub fn admit(database: Option<&str>, reason: &'static str) -> bool {
    let now = Instant::now();
    let (admitted, closed) = {
        let mut s = lock();
        let closed = if now.duration_since(s.started) >= WINDOW {
            take_window(&mut s, now)
        } else {
            Vec::new()
        };
        let per_db = s.counts.entry(reason).or_default();
        let key = database.unwrap_or("");
        let c = match per_db.get_mut(key) {
            Some(c) => c,
            None => per_db.entry(key.into()).or_default(),
        };
        let admitted = if c.logged < LINES_PER_WINDOW {
            c.logged += 1;
            true
        } else {
            c.suppressed += 1;
            false
        };
        if !admitted {
            s.suppressed_total += 1;
        }
        (admitted, closed)
    };
    // Written outside the lock: formatting a line is not a reason to hold up other threads.
    log_summaries(&closed);
    admitted
}

/// Closes the current window now and logs its summary lines; the periodic tick and the end of
/// the process call this so a burst's last counts are not left unsaid.
pub fn flush() {
    let closed = take_window(&mut lock(), Instant::now());
    log_summaries(&closed);
}

/// Runs [`flush`] every [`WINDOW`] on the current runtime until the process exits.
pub fn spawn_ticker() -> tokio::task::JoinHandle<()> {
    tokio::spawn(async {
        let mut tick = tokio::time::interval(WINDOW);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            flush();
        }
    })
}

fn take_window(s: &mut State, now: Instant) -> Vec<Suppressed> {
    s.started = now;
    let mut out = Vec::new();
    for (reason, per_db) in s.counts.drain() {
        for (db, c) in per_db {
            if c.suppressed > 0 {
                out.push(Suppressed {
                    database: (!db.is_empty()).then(|| db.into()),
                    reason,
                    logged: c.logged,
                    suppressed: c.suppressed,
                });
            }
        }
    }
    out.sort_by(|a, b| (&a.database, a.reason).cmp(&(&b.database, b.reason)));
    out
}

fn log_summaries(closed: &[Suppressed]) {
    for s in closed {
        tracing::info!(
            database = s.database.as_deref(),
            error_kind = s.reason,
            logged = s.logged,
            suppressed = s.suppressed,
            window_seconds = WINDOW.as_secs(),
            "refusals suppressed"
        );
    }
}

/// `pgmtls_log_refusals_suppressed_total`, read at scrape time.
#[derive(Debug, Default, Clone, Copy)]
pub struct RefusalLogCollector;

impl Collector for RefusalLogCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let m = ConstCounter::new(lock().suppressed_total);
        let e = encoder.encode_descriptor(
            "log_refusals_suppressed",
            "Refusal log lines left out by rate limiting (each is still in connections_refused)",
            None,
            m.metric_type(),
        )?;
        m.encode(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_lines_of_a_window_are_logged_and_the_rest_summarised() {
        // Process-wide state: use a reason no other test uses and read only its entries.
        let reason = "test_reason_window";
        let logged = (0..LINES_PER_WINDOW * 3)
            .filter(|_| admit(Some("orders"), reason))
            .count() as u64;
        assert_eq!(logged, LINES_PER_WINDOW);
        // Another database has its own budget.
        assert!(admit(Some("billing"), reason));
        let closed = take_window(&mut lock(), Instant::now());
        let mine: Vec<_> = closed.iter().filter(|s| s.reason == reason).collect();
        assert_eq!(
            mine,
            [&Suppressed {
                database: Some("orders".into()),
                reason,
                logged: LINES_PER_WINDOW,
                suppressed: LINES_PER_WINDOW * 2,
            }]
        );
        // A new window starts with a full budget.
        assert!(admit(Some("orders"), reason));
    }
}
