//! The metric names are a contract: every metric and label the code exposes is documented in
//! docs/METRICS.md, every metric the docs name exists, and the shipped alerting rules and
//! Grafana dashboard use only metrics that exist.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::Path;

use pgmtls::conn::error::ErrorKind;
use pgmtls::metrics::{DatabaseFigures, Metrics, ReloadKind};
use regex::Regex;
use serde_json::Value;

/// The exposition with every family populated: one database, one certificate, one reload,
/// one renewal run.
fn exposition() -> String {
    let m = Metrics::new();
    let _ = m.for_database("orders");
    m.publish_config(
        1,
        &[DatabaseFigures {
            name: "orders".into(),
            ip_rules: 1,
            trusted_ips: 1,
            crl_entries: 0,
            server_cert_expiry: Some(2_000_000_000),
            ca_cert_expiry: Some(2_100_000_000),
            client_certs: vec![("app-1".into(), 1_900_000_000)],
        }],
    );
    m.record_reload(ReloadKind::startup, true, 1_700_000_000);
    m.set_renewal(Some(&pgmtls::state::RenewalRecord::after_run(
        None,
        time::OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap(),
        0,
    )));
    m.encode()
}

/// The console's exposition (`pgmtls console` is a process of its own, with its own
/// `/metrics`): documented in the same file, not shown on the proxy's dashboard.
fn console_exposition() -> String {
    pgmtls::console::metrics::ConsoleMetrics::new().encode()
}

/// `# TYPE` lines: (family, type).
fn families(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| {
            let (n, t) = l.split_once(' ').unwrap();
            (n.to_owned(), t.to_owned())
        })
        .collect()
}

/// Names a sample line can carry: `x_total`, `x`, `x_bucket`, ...
fn sample_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap().to_owned())
        .collect()
}

fn docs() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/METRICS.md")).unwrap()
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)).unwrap()
}

fn metric_refs(text: &str) -> BTreeSet<String> {
    Regex::new(r"\bpgmtls_[a-z0-9_]*[a-z0-9]")
        .unwrap()
        .find_iter(text)
        .map(|m| m.as_str().to_owned())
        .collect()
}

#[test]
fn every_exposed_metric_and_label_is_documented() {
    let text = exposition() + &console_exposition();
    let docs = docs();
    let mut missing = Vec::new();
    for (family, kind) in families(&text) {
        let name = match kind.as_str() {
            "counter" => format!("{family}_total"),
            _ => family.clone(),
        };
        if !docs.contains(&format!("`{name}`")) {
            missing.push(name);
        }
    }
    let labels = Regex::new(r#"([a-z_]+)=""#).unwrap();
    for cap in labels.captures_iter(&text) {
        let label = &cap[1];
        if label != "le" && !docs.contains(&format!("`{label}`")) {
            missing.push(format!("label {label}"));
        }
    }
    for kind in ErrorKind::ALL {
        if !docs.contains(&format!("| `{}` |", kind.as_str())) {
            missing.push(format!("reason {kind}"));
        }
    }
    for reason in pgmtls::console::metrics::Refusal::ALL {
        if !docs.contains(&format!("| `{}` |", reason.as_str())) {
            missing.push(format!("console reason {}", reason.as_str()));
        }
    }
    for kind in ReloadKind::ALL {
        if !docs.contains(&format!("`{}`", kind.as_str())) {
            missing.push(format!("reload kind {kind}"));
        }
    }
    assert!(
        missing.is_empty(),
        "exposed but not in docs/METRICS.md: {missing:?}"
    );
}

#[test]
fn every_documented_metric_exists() {
    let names = sample_names(&(exposition() + &console_exposition()));
    let stale: Vec<String> = metric_refs(&docs())
        .into_iter()
        .filter(|n| !names.contains(n) && !names.contains(&format!("{n}_count")))
        .collect();
    assert!(stale.is_empty(), "documented but not exposed: {stale:?}");
}

#[test]
fn alerting_rules_parse_and_use_only_existing_metrics() {
    let names = sample_names(&exposition());
    let text = read("deploy/prometheus/alerts.yaml");
    let doc: Value = serde_saphyr::from_str(&text).unwrap();
    let mut alerts = BTreeSet::new();
    for group in doc["groups"].as_array().unwrap() {
        assert!(group["name"].is_string());
        for rule in group["rules"].as_array().unwrap() {
            let alert = rule["alert"].as_str().unwrap();
            assert!(alerts.insert(alert.to_owned()), "duplicate alert {alert}");
            let expr = rule["expr"].as_str().unwrap();
            assert!(!expr.trim().is_empty());
            assert!(
                matches!(
                    rule["labels"]["severity"].as_str(),
                    Some("warning" | "critical")
                ),
                "{alert}: severity"
            );
            assert!(
                rule["annotations"]["summary"].is_string(),
                "{alert}: summary"
            );
            for m in metric_refs(expr) {
                assert!(names.contains(&m), "{alert} uses unknown metric {m}");
            }
        }
    }
    // What the issue asks the rules to cover.
    for needle in [
        "< 75 * 86400",
        "< 14 * 86400",
        "pgmtls_server_certificate_expiry_timestamp_seconds",
        "pgmtls_ca_certificate_expiry_timestamp_seconds",
        "pgmtls_config_last_reload_successful",
        "upstream_unavailable",
        "up{job=\"pgmtls\"} == 0",
        "PgmtlsRefusalSpike",
    ] {
        assert!(text.contains(needle), "alerts.yaml lacks {needle}");
    }
    // Every metric name anywhere in the file (annotations included) exists.
    for m in metric_refs(&text) {
        assert!(names.contains(&m), "alerts.yaml names unknown metric {m}");
    }
}

#[test]
fn dashboard_parses_and_uses_only_existing_metrics() {
    let names = sample_names(&exposition());
    let text = read("deploy/grafana/pgmtls.json");
    let doc: Value = serde_json::from_str(&text).unwrap();
    let mut exprs = Vec::new();
    collect_exprs(&doc, &mut exprs);
    assert!(exprs.len() >= 20, "only {} queries", exprs.len());
    let mut used = BTreeSet::new();
    for e in &exprs {
        for m in metric_refs(e) {
            assert!(
                names.contains(&m),
                "dashboard query uses unknown metric {m}: {e}"
            );
            used.insert(m);
        }
    }
    // The dashboard shows every family, not just some.
    for (family, kind) in families(&exposition()) {
        let shown = used.iter().any(|u| {
            u == &family
                || (kind == "counter" && u == &format!("{family}_total"))
                || (kind == "histogram" && u.starts_with(&format!("{family}_")))
        });
        assert!(shown, "dashboard has no panel for {family}");
    }
    for m in metric_refs(&text) {
        assert!(names.contains(&m), "dashboard names unknown metric {m}");
    }
}

fn collect_exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr", Value::String(s)) => out.push(s.clone()),
                    ("query", Value::String(s)) | ("definition", Value::String(s)) => {
                        out.push(s.clone())
                    }
                    _ => collect_exprs(v, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}
