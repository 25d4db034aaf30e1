//! `renewal.yaml` at the state root: when `pgmtls certificates renew` last ran and last
//! succeeded. The CLI writes it at the end of every run; the proxy reads it on start and on
//! every reload to show it in `/status` and as gauges, so an alert can fire when renewal has
//! stopped running. It is not part of any database: a bad or missing record only makes the
//! renewal information unknown and never affects what is served.

use std::path::Path;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::config::yaml::parse_doc;
use crate::config::ConfigErrors;

pub const RENEWAL_YAML: &str = "renewal.yaml";

/// The outcome of one renewal run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RenewalResult {
    /// Every database was checked and everything due was renewed (and notified).
    Success,
    /// At least one database, or one notify command, failed.
    Failure,
}

impl RenewalResult {
    pub fn as_str(self) -> &'static str {
        match self {
            RenewalResult::Success => "success",
            RenewalResult::Failure => "failure",
        }
    }
}

/// The record. A failed run moves `last_run_at` and leaves `last_success_at` where it was, so
/// "has not succeeded for two days" is one comparison.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RenewalRecord {
    #[serde(with = "time::serde::rfc3339")]
    pub last_run_at: OffsetDateTime,
    pub last_run_result: RenewalResult,
    /// How many errors the last run reported (0 on success).
    pub last_run_errors: u64,
    /// Absent until a run has succeeded.
    #[serde(
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub last_success_at: Option<OffsetDateTime>,
}

impl RenewalRecord {
    /// The record after a run at `at`, given the record before it.
    pub fn after_run(
        previous: Option<&RenewalRecord>,
        at: OffsetDateTime,
        errors: usize,
    ) -> RenewalRecord {
        let ok = errors == 0;
        RenewalRecord {
            last_run_at: at,
            last_run_result: if ok {
                RenewalResult::Success
            } else {
                RenewalResult::Failure
            },
            last_run_errors: errors as u64,
            last_success_at: if ok {
                Some(at)
            } else {
                previous.and_then(|p| p.last_success_at)
            },
        }
    }

    pub fn to_yaml(&self) -> String {
        serde_saphyr::to_string(self).unwrap_or_default()
    }

    /// Parses the record; `file` names it in errors (a path, or `etcd:PREFIX/renewal.yaml`).
    pub fn parse(file: &Path, bytes: &[u8]) -> Result<RenewalRecord, ConfigErrors> {
        let text = std::str::from_utf8(bytes)
            .map_err(|_| ConfigErrors::one(file, "", None, "is not UTF-8 text"))?;
        // Read as text first, so a bad value is reported with the field it is in.
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Raw {
            last_run_at: String,
            last_run_result: String,
            #[serde(default)]
            last_run_errors: u64,
            #[serde(default)]
            last_success_at: Option<String>,
        }
        let raw: Raw = parse_doc(file, text)?;
        let time = |field: &str, v: &str| {
            OffsetDateTime::parse(v, &time::format_description::well_known::Rfc3339).map_err(|e| {
                ConfigErrors::one(
                    file,
                    field,
                    None,
                    format!("invalid timestamp {v:?} (RFC 3339 expected): {e}"),
                )
            })
        };
        let record = RenewalRecord {
            last_run_at: time("last_run_at", &raw.last_run_at)?,
            last_run_result: match raw.last_run_result.as_str() {
                "success" => RenewalResult::Success,
                "failure" => RenewalResult::Failure,
                other => {
                    return Err(ConfigErrors::one(
                        file,
                        "last_run_result",
                        None,
                        format!("{other:?} is neither success nor failure"),
                    ))
                }
            },
            last_run_errors: raw.last_run_errors,
            last_success_at: raw
                .last_success_at
                .as_deref()
                .map(|v| time("last_success_at", v))
                .transpose()?,
        };
        if let Some(s) = record.last_success_at {
            if s > record.last_run_at {
                return Err(ConfigErrors::one(
                    file,
                    "last_success_at",
                    None,
                    "is later than last_run_at",
                ));
            }
        }
        if record.last_run_result == RenewalResult::Success
            && record.last_success_at != Some(record.last_run_at)
        {
            return Err(ConfigErrors::one(
                file,
                "last_success_at",
                None,
                "must equal last_run_at when last_run_result is success",
            ));
        }
        Ok(record)
    }

    /// Reads `STATE/renewal.yaml`: `Ok(None)` when it does not exist (renew never ran).
    pub fn read(root: &Path) -> Result<Option<RenewalRecord>, ConfigErrors> {
        let file = root.join(RENEWAL_YAML);
        match std::fs::read(&file) {
            Ok(bytes) => RenewalRecord::parse(&file, &bytes).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ConfigErrors::one(
                &file,
                "",
                None,
                format!("cannot read: {e}"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> OffsetDateTime {
        OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).unwrap()
    }

    #[test]
    fn a_failed_run_keeps_the_last_success() {
        let first = RenewalRecord::after_run(None, t("2026-01-01T00:00:00Z"), 0);
        assert_eq!(first.last_success_at, Some(first.last_run_at));
        let failed = RenewalRecord::after_run(Some(&first), t("2026-01-02T00:00:00Z"), 2);
        assert_eq!(failed.last_run_result, RenewalResult::Failure);
        assert_eq!(failed.last_run_errors, 2);
        assert_eq!(failed.last_success_at, Some(t("2026-01-01T00:00:00Z")));
        let text = failed.to_yaml();
        assert_eq!(
            RenewalRecord::parse(Path::new("renewal.yaml"), text.as_bytes()).unwrap(),
            failed
        );
    }

    #[test]
    fn bad_records_name_the_file_and_field() {
        let f = Path::new("/s/renewal.yaml");
        let e = RenewalRecord::parse(f, b"last_run_at: yesterday\nlast_run_result: success\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/s/renewal.yaml") && e.contains("last_run_at"),
            "{e}"
        );
        let e = RenewalRecord::parse(
            f,
            b"last_run_at: \"2026-01-01T00:00:00Z\"\nlast_run_result: success\nlast_success_at: \"2026-01-02T00:00:00Z\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("last_success_at"), "{e}");
        let e = RenewalRecord::parse(
            f,
            b"last_run_at: \"2026-01-01T00:00:00Z\"\nlast_run_result: maybe\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("last_run_result"), "{e}");
    }
}
