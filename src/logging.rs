//! The process log: tracing-subscriber's text or JSON lines to stderr, through a bounded
//! in-memory queue drained by a thread of its own. A data-plane thread never waits for the log
//! sink: when the reader of stderr stalls (a full pipe, a stuck log shipper), lines beyond the
//! queue are dropped and counted in `pgmtls_log_lines_dropped_total` instead of stopping every
//! session on that thread. Lines keep their order; the queue is flushed when the returned guard
//! is dropped at exit.

use std::sync::OnceLock;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};

use crate::config::LogFormat;

/// Lines the queue holds before dropping: at a few hundred bytes a line, a few MiB, enough
/// to ride out a slow reader without letting a stalled one grow the process without bound.
pub const QUEUE_LINES: usize = 16_384;

static DROPPED: OnceLock<ErrorCounter> = OnceLock::new();

/// Installs the global subscriber. Keep the guard until exit: dropping it writes out what is
/// still queued (waiting up to a second for a stalled reader).
pub fn init(format: LogFormat) -> WorkerGuard {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PGMTLS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(QUEUE_LINES)
        .thread_name("pgmtls-log")
        .finish(std::io::stderr());
    let _ = DROPPED.set(writer.error_counter());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(writer);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
    guard
}

/// Lines dropped so far because the log queue was full; 0 before [`init`].
pub fn dropped_lines() -> u64 {
    DROPPED.get().map_or(0, |c| c.dropped_lines() as u64)
}

/// `pgmtls_log_lines_dropped_total`, read at scrape time.
#[derive(Debug, Default, Clone, Copy)]
pub struct LogCollector;

impl Collector for LogCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let m = ConstCounter::new(dropped_lines());
        let e = encoder.encode_descriptor(
            "log_lines_dropped",
            "Log lines dropped because stderr was not read fast enough",
            None,
            m.metric_type(),
        )?;
        m.encode(e)
    }
}
