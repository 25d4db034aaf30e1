//! `/proc/self` -> process CPU, memory and file-descriptor figures, read at scrape time by a
//! prometheus-client collector. Linux only; elsewhere, or when a file cannot be read, the
//! affected series are simply left out of the scrape.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// The kernel reports CPU times in clock ticks of `USER_HZ`, which the kernel ABI fixes at 100
/// on every architecture Linux exports to user space (the Prometheus procfs library relies on
/// the same constant); reading `sysconf(_SC_CLK_TCK)` would need `unsafe` for no gain.
const USER_HZ: f64 = 100.0;

/// Reads the process figures on every scrape; holds no state.
#[derive(Debug, Default, Clone, Copy)]
pub struct ProcessCollector;

/// One reading of the process figures.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct ProcessFigures {
    pub cpu_seconds: Option<f64>,
    pub resident_bytes: Option<u64>,
    pub open_fds: Option<u64>,
    pub max_fds: Option<u64>,
}

impl ProcessFigures {
    pub fn read() -> ProcessFigures {
        ProcessFigures {
            cpu_seconds: std::fs::read_to_string("/proc/self/stat")
                .ok()
                .and_then(|s| cpu_seconds(&s)),
            resident_bytes: std::fs::read_to_string("/proc/self/status")
                .ok()
                .and_then(|s| resident_bytes(&s)),
            open_fds: std::fs::read_dir("/proc/self/fd")
                .ok()
                .map(|d| d.count() as u64),
            max_fds: std::fs::read_to_string("/proc/self/limits")
                .ok()
                .and_then(|s| max_fds(&s)),
        }
    }
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let f = ProcessFigures::read();
        if let Some(v) = f.cpu_seconds {
            let m = ConstCounter::new(v);
            let e = encoder.encode_descriptor(
                "process_cpu_seconds",
                "User and system CPU time spent by the process.",
                None,
                m.metric_type(),
            )?;
            m.encode(e)?;
        }
        let gauges = [
            (
                "process_resident_memory_bytes",
                "Resident memory of the process.",
                f.resident_bytes,
            ),
            (
                "process_open_fds",
                "File descriptors the process has open (sockets included).",
                f.open_fds,
            ),
            (
                "process_max_fds",
                "Soft limit on open file descriptors (RLIMIT_NOFILE).",
                f.max_fds,
            ),
        ];
        for (name, help, value) in gauges {
            if let Some(v) = value {
                let m = ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX));
                let e = encoder.encode_descriptor(name, help, None, m.metric_type())?;
                m.encode(e)?;
            }
        }
        Ok(())
    }
}

/// utime + stime from `/proc/self/stat`. The command name (field 2) is in parentheses and may
/// itself contain spaces or parentheses, so fields are counted after the last `)`.
fn cpu_seconds(stat: &str) -> Option<f64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // After the command come state (field 3) ... utime (14) and stime (15).
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / USER_HZ)
}

/// `VmRSS:  1234 kB` from `/proc/self/status`; in kB whatever the page size is.
fn resident_bytes(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kb.checked_mul(1024)
}

/// The soft limit of `Max open files` from `/proc/self/limits`.
fn max_fds(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line
        .strip_prefix("Max open files")?
        .split_whitespace()
        .next()?;
    match soft {
        "unlimited" => Some(u64::MAX),
        n => n.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_formats_including_odd_command_names() {
        let stat = "4242 (we(ird) name) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 130 0 0 20 0 \
                    3 0 12345 1000000 500 18446744073709551615";
        assert_eq!(cpu_seconds(stat), Some(3.8));
        assert_eq!(cpu_seconds("garbage"), None);
        let status = "Name:\tpgmtls\nVmPeak:\t  10 kB\nVmRSS:\t    2048 kB\n";
        assert_eq!(resident_bytes(status), Some(2048 * 1024));
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max open files            1024                 1048576              files\n";
        assert_eq!(max_fds(limits), Some(1024));
    }

    #[test]
    fn reads_this_process() {
        let f = ProcessFigures::read();
        if cfg!(target_os = "linux") {
            assert!(f.resident_bytes.is_some_and(|b| b > 0), "{f:?}");
            assert!(f.open_fds.is_some_and(|n| n >= 3), "{f:?}");
            assert!(f.cpu_seconds.is_some(), "{f:?}");
            assert!(f.max_fds.is_some(), "{f:?}");
        }
    }
}
