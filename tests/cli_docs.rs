//! docs/STATE.md documents every field of every state file, and docs/CLI.md every command and
//! every variable the notify command gets: adding one without documenting it fails here.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use clap::Subcommand;
use pgmtls::state::{AuditEntry, CertificateRecord, IpRule, DATABASE_KEYS};
use serde_json::Value;
use time::OffsetDateTime;

fn doc(name: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("docs")
            .join(name),
    )
    .unwrap()
}

fn keys(v: Value) -> Vec<String> {
    v.as_object().unwrap().keys().cloned().collect()
}

#[test]
fn state_md_documents_every_field() {
    let text = doc("STATE.md");
    let now = OffsetDateTime::now_utc();
    let rule = IpRule {
        id: "x".into(),
        cidr: "10.0.0.0/8".parse().unwrap(),
        description: String::new(),
        created_at: now,
        updated_at: now,
    };
    let cert = CertificateRecord {
        id: "x".into(),
        common_name: "x".into(),
        serial: "1".into(),
        key_type: "p256".into(),
        created_at: now,
        not_before: now,
        expires_at: now,
        revoked_at: Some(now),
        successor_of: Some("y".into()),
        successor: Some("z".into()),
    };
    let audit = AuditEntry {
        time: now,
        actor: "a".into(),
        action: "b".into(),
        database: Some("c".into()),
        details: Value::Null,
    };
    let mut fields: Vec<String> = DATABASE_KEYS.iter().map(|k| k.to_string()).collect();
    fields.extend(keys(serde_json::to_value(&rule).unwrap()));
    fields.extend(keys(serde_json::to_value(&cert).unwrap()));
    fields.extend(keys(serde_json::to_value(&audit).unwrap()));
    for f in fields {
        assert!(
            text.contains(&format!("| `{f}` |")),
            "docs/STATE.md has no table row for `{f}`"
        );
    }
    for lifetime in ["10 years", "397 days", "13 calendar months"] {
        assert!(text.contains(lifetime), "{lifetime}");
    }
}

#[test]
fn cli_md_documents_every_command_and_notify_variable() {
    let text = doc("CLI.md");
    let cmd = pgmtls::cli::Command::augment_subcommands(clap::Command::new("pgmtls"));
    for top in cmd.get_subcommands() {
        let name = top.get_name();
        assert!(
            text.contains(&format!("`{name}")),
            "docs/CLI.md lacks `{name}`"
        );
        for sub in top.get_subcommands() {
            let full = format!("{name} {}", sub.get_name());
            assert!(text.contains(&full), "docs/CLI.md lacks `{full}`");
            for arg in sub.get_arguments() {
                if let Some(long) = arg.get_long() {
                    assert!(
                        text.contains(&format!("--{long}")),
                        "docs/CLI.md lacks --{long} of `{full}`"
                    );
                }
            }
        }
    }
    for var in pgmtls::cli::certificates::NOTIFY_ENV {
        assert!(text.contains(&format!("| `{var}` |")), "{var}");
    }
}
