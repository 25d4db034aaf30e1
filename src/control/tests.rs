//! The mutation path called directly, as a front end other than the CLI would: each change
//! returns what changed with its audit record, and a refused change writes nothing.

use std::path::Path;

use super::certificates::{self, NewCertificate};
use super::ip_rules::{self, Selector};
use super::mtls::{self, EnableRequest};
use super::{Control, ControlError};
use crate::allowlist::MAX_RULES;
use crate::pki::KeyType;
use crate::state::{parse_audit_log, StateDir, UpstreamTls};

fn request(name: &str, port: u16) -> EnableRequest {
    EnableRequest {
        name: name.into(),
        listen: format!("127.0.0.1:{port}").parse().unwrap(),
        upstream: "127.0.0.1:5432".parse().unwrap(),
        upstream_tls: UpstreamTls::Disable,
        upstream_ca_pem: None,
        upstream_server_name: None,
        allow_plaintext_remote_upstream: false,
        user_must_match_cn: false,
        server_names: vec!["localhost".into()],
        key_type: KeyType::EcdsaP256,
        common_name: None,
    }
}

fn enabled(dir: &Path) -> Control {
    let control = Control::new(StateDir::new(dir));
    mtls::enable(&control, &request("app", 16432), "alice").unwrap();
    control
}

/// Every file under `dir` with its bytes, to prove a refused change wrote nothing.
fn tree(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((p.display().to_string(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

fn audit_actions(control: &Control) -> Vec<(String, String)> {
    let path = control.state().audit_log();
    let text = std::fs::read_to_string(&path).unwrap();
    parse_audit_log(&path, &text)
        .unwrap()
        .into_iter()
        .map(|e| (e.actor, e.action))
        .collect()
}

#[test]
fn each_change_returns_what_changed_and_the_audit_record_it_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let control = enabled(dir.path());
    let created = ip_rules::create(&control, "app", "10.1.0.0/16", "office", "bob").unwrap();
    assert_eq!(created.rule.cidr.to_string(), "10.1.0.0/16");
    assert_eq!(created.audit.action, "ip_rule.create");
    assert_eq!(created.audit.actor, "bob");
    assert_eq!(created.audit.details["id"], created.rule.id.as_str());
    assert_eq!(
        control.load("app").unwrap().rules,
        vec![created.rule.clone()]
    );

    let cert = certificates::create(&control, "app", &NewCertificate::default(), "carol").unwrap();
    let revoked = certificates::revoke(&control, "app", &cert.record.id, "dave").unwrap();
    assert!(revoked.record.revoked_at.is_some());
    assert_eq!(revoked.crl_number, 2);
    assert!(certificates::crl_serials(&control.load("app").unwrap()).contains(&cert.record.serial));

    let removed = ip_rules::delete(&control, "app", Selector::Cidr("10.1.0.0/16"), "erin").unwrap();
    assert_eq!(removed.rule.id, created.rule.id);
    assert!(control.load("app").unwrap().rules.is_empty());

    let disabled = mtls::disable(&control, "app", "frank").unwrap();
    assert!(disabled.archived_to.starts_with(dir.path().join("archive")));
    assert!(!control.state().has_database("app"));
    assert_eq!(
        audit_actions(&control),
        [
            ("alice", "mtls.create"),
            ("bob", "ip_rule.create"),
            ("carol", "certificate.create"),
            ("dave", "certificate.revoke"),
            ("erin", "ip_rule.delete"),
            ("frank", "mtls.destroy"),
        ]
        .map(|(a, b)| (a.to_owned(), b.to_owned()))
    );
}

#[test]
fn refused_changes_say_why_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let control = enabled(dir.path());
    for i in 0..MAX_RULES {
        ip_rules::create(&control, "app", &format!("10.0.{i}.0/24"), "", "bob").unwrap();
    }
    let before = tree(dir.path());
    let refusals: Vec<(ControlError, &str)> = vec![
        (
            ip_rules::create(&control, "app", "10.9.0.0/16", "", "bob").unwrap_err(),
            "already has 60 IP rules",
        ),
        (
            ip_rules::create(&control, "app", "10.0.0.1/8", "", "bob").unwrap_err(),
            "did you mean 10.0.0.0/8",
        ),
        (
            ip_rules::create(&control, "nope", "10.9.0.0/16", "", "bob").unwrap_err(),
            "unknown database \"nope\"",
        ),
        (
            ip_rules::delete(&control, "app", Selector::Id("x"), "bob").unwrap_err(),
            "no IP rule with id \"x\"",
        ),
        (
            certificates::revoke(&control, "app", "x", "bob").unwrap_err(),
            "no certificate with id \"x\"",
        ),
        (
            mtls::enable(&control, &request("app", 16433), "bob").unwrap_err(),
            "already enabled",
        ),
        (
            mtls::enable(&control, &request("other", 16432), "bob").unwrap_err(),
            "already the listen address of database \"app\"",
        ),
    ];
    for (err, want) in &refusals {
        assert!(err.to_string().contains(want), "{err} lacks {want:?}");
    }
    assert!(matches!(refusals[0].0, ControlError::Conflict(_)));
    assert!(matches!(refusals[1].0, ControlError::Invalid(_)));
    assert!(matches!(
        refusals[2].0,
        ControlError::UnknownDatabase { .. }
    ));
    assert!(matches!(refusals[3].0, ControlError::NotFound(_)));
    assert_eq!(tree(dir.path()), before, "a refused change wrote something");
}

#[test]
fn concurrent_creates_never_pass_the_rule_limit() {
    let dir = tempfile::tempdir().unwrap();
    let control = enabled(dir.path());
    for i in 0..MAX_RULES - 2 {
        ip_rules::create(&control, "app", &format!("10.0.{i}.0/24"), "", "bob").unwrap();
    }
    // Eight writers race for the last two places; the lock makes each read-check-write whole.
    let results: Vec<Result<_, ControlError>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let control = control.clone();
                s.spawn(move || {
                    ip_rules::create(&control, "app", &format!("10.200.{i}.0/24"), "", "w")
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let won = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(won, 2);
    for r in results.iter().filter_map(|r| r.as_ref().err()) {
        assert!(matches!(r, ControlError::Conflict(_)), "{r}");
    }
    assert_eq!(control.load("app").unwrap().rules.len(), MAX_RULES);
    let creates = audit_actions(&control)
        .into_iter()
        .filter(|(a, _)| a == "w")
        .count();
    assert_eq!(creates, 2, "one audit record per change that landed");
}

#[test]
fn session_limits_are_set_and_removed_with_one_audit_record_each() {
    let dir = tempfile::tempdir().unwrap();
    let control = enabled(dir.path());
    let set = mtls::LimitsChange {
        max_connections: Some(Some(20)),
        max_connections_per_ip: Some(Some(4)),
    };
    let u = mtls::update_limits(&control, "app", set, "bob").unwrap();
    assert_eq!(u.settings.max_connections, Some(20));
    assert_eq!(u.audit.details["max_connections_per_ip"], 4);
    let db = control.load("app").unwrap();
    assert_eq!(
        (
            db.settings.max_connections,
            db.settings.max_connections_per_ip
        ),
        (Some(20), Some(4))
    );
    // Removing one leaves the other as it was.
    let clear = mtls::LimitsChange {
        max_connections: Some(None),
        max_connections_per_ip: None,
    };
    let u = mtls::update_limits(&control, "app", clear, "bob").unwrap();
    assert_eq!(u.audit.details["previous_max_connections"], 20);
    let db = control.load("app").unwrap();
    assert_eq!(
        (
            db.settings.max_connections,
            db.settings.max_connections_per_ip
        ),
        (None, Some(4))
    );
    let actions = audit_actions(&control);
    assert_eq!(
        actions.iter().filter(|(_, a)| a == "mtls.update").count(),
        2,
        "{actions:?}"
    );
    // Refused changes write nothing.
    let before = tree(dir.path());
    for bad in [
        mtls::LimitsChange::default(),
        mtls::LimitsChange {
            max_connections: Some(Some(0)),
            max_connections_per_ip: None,
        },
    ] {
        let e = mtls::update_limits(&control, "app", bad, "bob").unwrap_err();
        assert!(matches!(e, ControlError::Invalid(_)), "{e}");
    }
    let e = mtls::update_limits(&control, "nope", set, "bob").unwrap_err();
    assert!(e.to_string().contains("nope"), "{e}");
    assert_eq!(before, tree(dir.path()));
}
