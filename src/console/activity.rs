//! The Activity section's live parts, read from the running proxy's admin endpoint: its live
//! sessions (`/sessions`), and refusals by reason over the last hour, from samples of
//! `pgmtls_connections_refused_total` in `/metrics` that a task started with the console takes
//! every [`SAMPLE_EVERY`] (and each page load, so a page shows what happened a moment ago).
//! The samples stay in memory: a restarted console starts a new hour.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use time::OffsetDateTime;

use crate::admin::Sessions;
use crate::cli::status::{self, AdminUrl, STATUS_TIMEOUT};
use crate::sessions::SessionView;

/// The metric family the chart is drawn from.
pub const REFUSED: &str = "pgmtls_connections_refused_total";
/// How often the background task samples `/metrics`.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(30);
/// The span the chart covers.
pub const WINDOW: Duration = Duration::from_secs(3600);
/// The chart's bars: one per this many minutes of [`WINDOW`].
pub const BUCKETS: usize = 12;
/// Samples kept: an hour's worth at [`SAMPLE_EVERY`], plus those page loads add; the oldest
/// beyond this go, whatever their age.
const MAX_SAMPLES: usize = 512;

/// A malformed `pgmtls_connections_refused_total` line of a `/metrics` text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("/metrics line {line}: {REFUSED}: {why}")]
pub struct MetricsError {
    pub line: usize,
    pub why: String,
}

/// Counter values by (database, reason).
pub type Counts = BTreeMap<(String, String), u64>;

/// Reads every `pgmtls_connections_refused_total{database="..",reason=".."} N` sample of an
/// OpenMetrics text. Other families are skipped unread; a line of this family that does not
/// parse is an error naming the line, since a chart drawn from half a scrape would lie.
pub fn parse_refusals(text: &str) -> Result<Counts, MetricsError> {
    let mut out = Counts::new();
    for (i, line) in text.lines().enumerate() {
        let Some(rest) = line.strip_prefix(REFUSED) else {
            continue;
        };
        let bad = |why: &str| MetricsError {
            line: i + 1,
            why: why.to_owned(),
        };
        let rest = rest
            .strip_prefix('{')
            .ok_or_else(|| bad("expected '{' and the labels after the name"))?;
        let (labels, value) = parse_labels(rest).map_err(|w| bad(&w))?;
        // A sample line is `VALUE` or `VALUE TIMESTAMP`.
        let value = value
            .split_whitespace()
            .next()
            .ok_or_else(|| bad("no value after the labels"))?;
        let n: f64 = value
            .parse()
            .map_err(|_| bad(&format!("value {value:?} is not a number")))?;
        if !n.is_finite() || n < 0.0 {
            return Err(bad(&format!("value {value:?} is not a counter's")));
        }
        let get = |k: &str| {
            labels
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.clone())
                .ok_or_else(|| bad(&format!("no {k:?} label")))
        };
        out.insert((get("database")?, get("reason")?), n as u64);
    }
    Ok(out)
}

/// A sample's labels, (name, value), in their order.
type Labels = Vec<(String, String)>;

/// `name="value",...}` -> the labels and what follows the `}`. Values use OpenMetrics'
/// escapes (`\\`, `\"`, `\n`).
fn parse_labels(s: &str) -> Result<(Labels, &str), String> {
    let mut labels = Vec::new();
    let mut rest = s;
    loop {
        rest = rest.trim_start_matches(',');
        if let Some(after) = rest.strip_prefix('}') {
            return Ok((labels, after));
        }
        let (name, after) = rest
            .split_once("=\"")
            .ok_or_else(|| "a label without =\"value\"".to_owned())?;
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("bad label name {name:?}"));
        }
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next() {
                None => return Err(format!("label {name:?}: unterminated value")),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    _ => return Err(format!("label {name:?}: bad escape")),
                },
                Some((_, c)) => value.push(c),
            }
        };
        labels.push((name.to_owned(), value));
        rest = &after[end + 1..];
        if !(rest.starts_with(',') || rest.starts_with('}')) {
            return Err(format!(
                "label {name:?}: expected ',' or '}}' after the value"
            ));
        }
    }
}

/// One scrape's counters, or why there was none.
#[derive(Debug, Clone)]
struct Sample {
    at: OffsetDateTime,
    counts: Result<Counts, String>,
}

/// The samples of the last hour, oldest first.
#[derive(Debug, Default)]
pub struct History {
    samples: Mutex<VecDeque<Sample>>,
}

/// What the chart shows for one database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusals {
    /// Per reason with at least one refusal in the window: the count in each bucket, oldest
    /// first, and the total.
    pub by_reason: Vec<(String, [u64; BUCKETS], u64)>,
    /// When the window starts: an hour ago, or when the first sample was taken if later.
    pub since: Option<OffsetDateTime>,
    /// Why the last sample failed, when it did.
    pub error: Option<String>,
}

impl History {
    fn push(&self, at: OffsetDateTime, counts: Result<Counts, String>) {
        // Plain values under the lock: a panic elsewhere cannot leave them half-written.
        let mut s = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        let window = time::Duration::try_from(WINDOW).unwrap_or(time::Duration::HOUR);
        // One sample older than the window stays: the first increase inside it needs a base.
        while s.len() > 1 && s.get(1).is_some_and(|x| x.at < at - window) {
            s.pop_front();
        }
        // Page loads sample too; of samples closer together than the task's, only the newest
        // stays (its increase covers the dropped one's), so page loads cannot crowd the hour
        // out of the buffer. A failed scrape never replaces a good one: that would lose the
        // increase the good one carries.
        let every = time::Duration::try_from(SAMPLE_EVERY).unwrap_or(time::Duration::SECOND);
        let keep_last = s.back().is_some_and(|l| l.counts.is_ok()) && counts.is_err();
        if s.len() >= 2 && s[s.len() - 2].at > at - every && !keep_last {
            s.pop_back();
        }
        while s.len() >= MAX_SAMPLES {
            s.pop_front();
        }
        s.push_back(Sample { at, counts });
    }

    /// Scrapes `url`'s `/metrics` once and keeps the result.
    pub async fn sample(&self, url: Option<&AdminUrl>) {
        let counts = match url {
            None => Err("no admin endpoint configured".to_owned()),
            Some(url) => match status::get(url, "/metrics", "text/plain", STATUS_TIMEOUT).await {
                Err(e) => Err(e.to_string()),
                Ok(body) => {
                    parse_refusals(&String::from_utf8_lossy(&body)).map_err(|e| e.to_string())
                }
            },
        };
        if let Err(e) = &counts {
            eprintln!("pgmtls console: cannot sample the proxy's refusals: {e}");
        }
        self.push(OffsetDateTime::now_utc(), counts);
    }

    /// Refusals of `database` by reason, in [`BUCKETS`] buckets ending at `now`. An increase
    /// between two good samples counts in the later one's bucket; a counter that went down
    /// (the proxy restarted) counts from zero.
    pub fn refusals(&self, database: &str, now: OffsetDateTime) -> Refusals {
        let s = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        let window = time::Duration::try_from(WINDOW).unwrap_or(time::Duration::HOUR);
        let start = now - window;
        let bucket = window / BUCKETS as u32;
        let mut by: BTreeMap<String, [u64; BUCKETS]> = BTreeMap::new();
        let mut prev: Option<&Counts> = None;
        let mut since = None;
        for x in s.iter() {
            let Ok(counts) = &x.counts else {
                continue;
            };
            if x.at >= start {
                since.get_or_insert(x.at.max(start));
                if let Some(p) = prev {
                    let i = (((x.at - start).as_seconds_f64() / bucket.as_seconds_f64()) as usize)
                        .min(BUCKETS - 1);
                    for ((db, reason), &v) in counts.range((database.to_owned(), String::new())..) {
                        if db != database {
                            break;
                        }
                        let before = p.get(&(db.clone(), reason.clone())).copied().unwrap_or(0);
                        let inc = if v >= before { v - before } else { v };
                        if inc > 0 {
                            by.entry(reason.clone()).or_insert([0; BUCKETS])[i] += inc;
                        }
                    }
                }
            }
            prev = Some(counts);
        }
        // The window starts an hour ago only if a sample that old is the base.
        if let Some(first) = s.iter().find(|x| x.counts.is_ok()) {
            if first.at < start {
                since = Some(start);
            }
        }
        let error = s.back().and_then(|x| x.counts.as_ref().err().cloned());
        Refusals {
            by_reason: by
                .into_iter()
                .map(|(r, b)| {
                    let total = b.iter().sum();
                    (r, b, total)
                })
                .collect(),
            since,
            error,
        }
    }
}

/// Samples `/metrics` every [`SAMPLE_EVERY`] for as long as the console runs.
pub fn spawn_sampler(history: Arc<History>, url: Option<AdminUrl>) {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(SAMPLE_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            history.sample(url.as_ref()).await;
        }
    });
}

/// The proxy's live sessions of `database`, or why they cannot be read.
pub async fn sessions(url: Option<&AdminUrl>, database: &str) -> Result<Vec<SessionView>, String> {
    let Some(url) = url else {
        return Err(
            "no admin endpoint configured (give --admin-url, PGMTLS_ADMIN_URL, or \
                    --config with admin_listen)"
                .to_owned(),
        );
    };
    let body = status::get(url, "/sessions", "application/json", STATUS_TIMEOUT)
        .await
        .map_err(|e| e.to_string())?;
    let all: Sessions = serde_json::from_slice(&body)
        .map_err(|e| format!("{url}/sessions sent a document that does not parse: {e}"))?;
    Ok(all
        .sessions
        .into_iter()
        .filter(|s| s.database == database)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP pgmtls_connections_refused Connections refused or cut, by reason\n\
        # TYPE pgmtls_connections_refused counter\n\
        pgmtls_connections_refused_total{database=\"orders\",reason=\"ip_not_allowed\"} 3\n\
        pgmtls_connections_refused_total{database=\"orders\",reason=\"client_cert_revoked\"} 0\n\
        pgmtls_connections_refused_total{reason=\"sni_missing\",database=\"a\\\"b\\\\c\"} 2 1700000000\n\
        pgmtls_connections_accepted_total{database=\"orders\"} 9\n\
        # EOF\n";

    #[test]
    fn refusal_counters_are_read_by_database_and_reason() {
        let c = parse_refusals(TEXT).unwrap();
        assert_eq!(c.len(), 3);
        assert_eq!(c[&("orders".into(), "ip_not_allowed".into())], 3);
        assert_eq!(c[&("a\"b\\c".into(), "sni_missing".into())], 2);
    }

    #[test]
    fn bad_refusal_lines_are_errors_naming_the_line() {
        for (line, why) in [
            ("pgmtls_connections_refused_total 3", "expected '{'"),
            (
                "pgmtls_connections_refused_total{database=\"x\"} 3",
                "no \"reason\" label",
            ),
            (
                "pgmtls_connections_refused_total{database=\"x\",reason=\"y\"} lots",
                "not a number",
            ),
            (
                "pgmtls_connections_refused_total{database=\"x\",reason=\"y\"} -1",
                "not a counter's",
            ),
            (
                "pgmtls_connections_refused_total{database=\"x",
                "unterminated",
            ),
            (
                "pgmtls_connections_refused_total{database=\"x\\q\"} 1",
                "bad escape",
            ),
            ("pgmtls_connections_refused_total{database=x} 1", "without"),
            (
                "pgmtls_connections_refused_total{database=\"x\"reason=\"y\"} 1",
                "expected ','",
            ),
            (
                "pgmtls_connections_refused_total{database=\"x\",reason=\"y\"}",
                "no value",
            ),
        ] {
            let text = format!("# TYPE x counter\n{line}\n# EOF\n");
            let e = parse_refusals(&text).unwrap_err();
            assert_eq!(e.line, 2, "{line}");
            let shown = e.to_string();
            assert!(
                shown.starts_with("/metrics line 2: pgmtls_connections_refused_total: "),
                "{shown}"
            );
            assert!(shown.contains(why), "{line}: {shown}");
        }
        // Other families are not this parser's business.
        assert!(parse_refusals("garbage\npgmtls_other{{{ x\n")
            .unwrap()
            .is_empty());
    }

    fn counts(v: &[(&str, &str, u64)]) -> Result<Counts, String> {
        Ok(v.iter()
            .map(|(d, r, n)| ((d.to_string(), r.to_string()), *n))
            .collect())
    }

    #[test]
    fn increases_land_in_their_bucket_and_a_reset_counts_from_zero() {
        let h = History::default();
        let now = OffsetDateTime::now_utc();
        let m = time::Duration::minutes;
        // Before the window: the base only.
        h.push(now - m(70), counts(&[("orders", "ip_not_allowed", 5)]));
        h.push(
            now - m(58),
            counts(&[
                ("orders", "ip_not_allowed", 7),
                ("billing", "ip_not_allowed", 1),
            ]),
        );
        h.push(now - m(30), Err("down".into()));
        // The proxy restarted: 2 is two new refusals, not minus five.
        h.push(
            now - m(1),
            counts(&[
                ("orders", "ip_not_allowed", 2),
                ("orders", "client_cert_revoked", 4),
            ]),
        );
        let r = h.refusals("orders", now);
        assert_eq!(r.since, Some(now - m(60)));
        assert_eq!(r.error, None);
        let mut want = [0; BUCKETS];
        want[0] = 2;
        want[BUCKETS - 1] = 2;
        assert_eq!(r.by_reason[1], ("ip_not_allowed".into(), want, 4));
        let mut revoked = [0; BUCKETS];
        revoked[BUCKETS - 1] = 4;
        assert_eq!(r.by_reason[0], ("client_cert_revoked".into(), revoked, 4));
        h.push(now, Err("cannot connect".into()));
        assert_eq!(
            h.refusals("orders", now).error.as_deref(),
            Some("cannot connect")
        );
        assert!(h.refusals("nobody", now).by_reason.is_empty());
    }

    #[test]
    fn close_samples_keep_the_newest_and_a_failure_never_replaces_a_count() {
        let h = History::default();
        let now = OffsetDateTime::now_utc();
        let s = time::Duration::seconds;
        h.push(now - s(20), counts(&[("orders", "ip_not_allowed", 1)]));
        h.push(now - s(10), counts(&[("orders", "ip_not_allowed", 2)]));
        h.push(now - s(5), counts(&[("orders", "ip_not_allowed", 4)]));
        h.push(now - s(4), Err("down".into()));
        h.push(now - s(3), Err("still down".into()));
        assert_eq!(h.samples.lock().unwrap().len(), 3);
        let r = h.refusals("orders", now);
        assert_eq!(r.by_reason[0].2, 3);
        assert_eq!(r.error.as_deref(), Some("still down"));
    }
}
