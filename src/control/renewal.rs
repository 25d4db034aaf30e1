//! The record of a renewal run (`renewal.yaml` at the state root), so the proxy, `/status`
//! and an alert can tell when `pgmtls certificates renew` last ran and last succeeded.
//!
//! Only a run over every database is recorded: `renew DB` renews one database and says
//! nothing about the others, so it must not look like a successful scheduled run. A run is a
//! success when no database and no notify command failed; a failed run moves `last_run_at`
//! and keeps `last_success_at`. Each record is written with one audit record, `renewal.run`
//! (details: `result`, `errors`, `renewed`, `server_certificates`, `crls_refreshed`), in the
//! same change: under the writers' lock in a directory, in one commit in etcd.

use serde_json::json;
use time::OffsetDateTime;

use super::{Control, Result};
use crate::state::{rfc3339, RenewalRecord};

/// What one run did, for the audit record.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunSummary {
    pub errors: usize,
    pub renewed: usize,
    pub server_certificates: usize,
    pub crls_refreshed: usize,
}

/// Records a run that started at `at`. A previous record that does not parse is replaced
/// (its last success is then lost: it could not be read anyway).
pub fn record_run(
    control: &Control,
    at: OffsetDateTime,
    summary: RunSummary,
    actor: &str,
) -> Result<RenewalRecord> {
    control.retrying(|| {
        let mut txn = control.begin(None, actor)?;
        let previous = txn.renewal_record().ok().flatten();
        let record = RenewalRecord::after_run(previous.as_ref(), at, summary.errors);
        txn.write_renewal_record(&record)?;
        txn.record(
            "renewal.run",
            None,
            json!({
                "result": record.last_run_result.as_str(),
                "started_at": rfc3339(at),
                "errors": summary.errors,
                "renewed": summary.renewed,
                "server_certificates": summary.server_certificates,
                "crls_refreshed": summary.crls_refreshed,
            }),
        )?;
        Ok(record)
    })
}
