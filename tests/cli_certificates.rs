//! `pgmtls certificates`: issuing, the libpq download set, revocation onto the CRL, and the
//! idempotent 75-day renewal.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cli_support;

use cli_support::{mode, Env};
use pgmtls::pki::{inspect_cert_pem, parse_crl_pem};
use pgmtls::state::StateDir;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use serde_json::Value;

fn first_cert(env: &Env) -> String {
    env.run(&["certificates", "app", "--json"]).json()[0]["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn crl(env: &Env) -> pgmtls::pki::CrlInfo {
    parse_crl_pem(&std::fs::read_to_string(env.db_dir("app").join("crl.pem")).unwrap()).unwrap()
}

#[test]
fn download_writes_the_libpq_file_set_and_refuses_to_overwrite() {
    let env = Env::new();
    env.create_db("app", "127.0.0.1:0", "127.0.0.1:5432");
    let id = first_cert(&env);
    let dir = env.dir.path().join("folder");
    let d = dir.to_str().unwrap();
    let out = env.run(&[
        "certificates",
        "download",
        "app",
        "--id",
        &id,
        "--prefix",
        "demo_",
        "--dir",
        d,
    ]);
    let text = out.ok().to_owned();
    assert!(
        text.contains(&format!("your certificates are now in {d}")),
        "{text}"
    );
    // The directory did not exist: the command made it and says so, nothing else.
    assert_eq!(
        out.stderr.trim().lines().collect::<Vec<_>>(),
        [
            format!("pgmtls: created {d} (and any missing parents), mode 0700").as_str(),
            "Downloading certificates for database app... done"
        ]
    );

    let crt = dir.join("demo_postgresql.crt");
    let key = dir.join("demo_postgresql.key");
    let root = dir.join("demo_root.crt");
    let pk8 = dir.join("demo_postgresql.pk8");
    assert_eq!(mode(&key), 0o600);
    assert_eq!(mode(&pk8), 0o600);
    assert_eq!(mode(&dir), 0o700);
    // Client certificate followed by its CA.
    let chain: Vec<_> = CertificateDer::pem_file_iter(&crt)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(chain.len(), 2);
    let db_dir = env.db_dir("app");
    assert_eq!(
        std::fs::read(&root).unwrap(),
        std::fs::read(db_dir.join("ca.crt")).unwrap()
    );
    let leaf = inspect_cert_pem(&std::fs::read_to_string(&crt).unwrap()).unwrap();
    let ca = inspect_cert_pem(&std::fs::read_to_string(&root).unwrap()).unwrap();
    assert_eq!(leaf.issuer_cn, ca.subject_cn);
    let months = (leaf.not_after - leaf.not_before).whole_days();
    assert!(
        (393..=400).contains(&months),
        "13 months, got {months} days"
    );
    // The .pk8 is unencrypted PKCS-8 DER of the same key as the PEM.
    let der = std::fs::read(&pk8).unwrap();
    let pem_key = PrivatePkcs8KeyDer::from_pem_file(&key).unwrap();
    assert_eq!(der, pem_key.secret_pkcs8_der());
    let pair = rcgen::KeyPair::try_from(der.as_slice()).expect("PKCS-8 DER parses");
    assert!(pgmtls::pki::key_matches_cert(
        &std::fs::read_to_string(&crt).unwrap(),
        &pair.serialize_pem()
    )
    .unwrap());

    // A second download refuses to overwrite, names the file, and changes nothing.
    std::fs::write(&root, "mine").unwrap();
    let again = [
        "certificates",
        "download",
        "app",
        "--id",
        &id,
        "--prefix",
        "demo_",
        "--dir",
        d,
    ];
    let e = env.run(&again).error().to_owned();
    assert!(e.contains("already exists") && e.contains("--force"), "{e}");
    assert_eq!(std::fs::read(&root).unwrap(), b"mine");
    let mut forced = again.to_vec();
    forced.push("--force");
    env.run(&forced).ok();
    assert_ne!(std::fs::read(&root).unwrap(), b"mine");
    assert_eq!(
        env.audit_lines().last().unwrap()["action"],
        "certificate.download"
    );
}

#[test]
fn download_to_the_default_directory_warns_about_unprefixed_files() {
    let env = Env::new();
    env.create_db("app", "127.0.0.1:0", "127.0.0.1:5432");
    let id = first_cert(&env);
    let out = env.run(&[
        "certificates",
        "download",
        "app",
        "--id",
        &id,
        "--prefix",
        "app_",
    ]);
    out.ok();
    assert!(!out.stderr.contains("warning"), "{}", out.stderr);
    let out = env.run(&["certificates", "download", "app", "--id", &id]);
    out.ok();
    assert!(
        out.stderr.contains("warning: unprefixed files"),
        "{}",
        out.stderr
    );
    let pgdir = env.home.join(".postgresql");
    for f in [
        "postgresql.crt",
        "postgresql.key",
        "root.crt",
        "postgresql.pk8",
    ] {
        assert!(pgdir.join(f).is_file(), "{f}");
    }
}

#[test]
fn create_get_and_list_show_status_and_lifetime() {
    let env = Env::new();
    env.create_db("app", "127.0.0.1:0", "127.0.0.1:5432");
    let c = env
        .run(&[
            "certificates",
            "create",
            "app",
            "--valid-for",
            "70d",
            "--common-name",
            "reporting",
            "--json",
        ])
        .json();
    assert_eq!(c["common_name"], "reporting");
    assert_eq!(c["status"], "expiring", "{c}");
    let id = c["id"].as_str().unwrap();
    let text = env
        .run(&["certificates", "get", "app", "--id", id])
        .ok()
        .to_owned();
    assert!(text.contains("status: expiring\n"), "{text}");
    assert!(text.contains("common_name: reporting\n"), "{text}");
    let table = env.run(&["certificates", "app"]).ok().to_owned();
    let header = table.lines().next().unwrap();
    for col in ["ID", "Created At", "Expires At", "Status"] {
        assert!(header.contains(col), "{table}");
    }
    assert!(
        table.contains(" ready\n") && table.contains(" expiring\n"),
        "{table}"
    );
    let rec = StateDir::new(&env.state).load_database("app").unwrap();
    let r = rec.certificates.iter().find(|r| r.id == id).unwrap();
    assert_eq!((r.expires_at - r.created_at).whole_days(), 70);
}

#[test]
fn bad_certificate_input_is_refused_and_changes_nothing() {
    let env = Env::new();
    env.create_db("app", "127.0.0.1:0", "127.0.0.1:5432");
    let before = env.snapshot();
    let dir = env.dir.path().join("dl");
    // One byte more than a PostgreSQL role name: Postgres would truncate it to `a`x63.
    let long_cn = format!("{}b", "a".repeat(63));
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["certificates", "get", "app", "--id", "nope"],
            "no certificate with id",
        ),
        (
            vec!["certificates", "revoke", "app", "--id", "nope"],
            "no certificate with id",
        ),
        (
            vec![
                "certificates",
                "download",
                "app",
                "--id",
                "nope",
                "--dir",
                dir.to_str().unwrap(),
            ],
            "no certificate with id",
        ),
        (vec!["certificates", "nope"], "unknown database"),
        (vec!["certificates", "create", "nope"], "unknown database"),
        (vec!["certificates", "renew", "nope"], "unknown database"),
        (
            vec!["certificates", "create", "app", "--valid-for", "14months"],
            "at most 13 months",
        ),
        (
            vec!["certificates", "create", "app", "--common-name", &long_cn],
            "longer than 63 bytes",
        ),
        (
            vec![
                "certificates",
                "download",
                "app",
                "--id",
                "x",
                "--prefix",
                "a/b",
            ],
            "--prefix",
        ),
    ];
    for (args, want) in &cases {
        let out = env.run(args);
        let e = out.error();
        assert!(
            e.contains(want),
            "`{}`: expected {want:?} in {e:?}",
            args.join(" ")
        );
    }
    assert_eq!(env.snapshot(), before);
    assert!(!dir.exists());
}

#[test]
fn revoke_adds_the_serial_to_the_crl_with_a_growing_number() {
    let env = Env::new();
    env.create_db("app", "127.0.0.1:0", "127.0.0.1:5432");
    let first = crl(&env);
    assert_eq!(first.crl_number, Some(1));
    assert!(first.revoked_serials.is_empty());
    let year = first.next_update.unwrap() - first.this_update;
    assert!(year.whole_days() >= 365, "{year}");

    let a = env.run(&["certificates", "create", "app", "--json"]).json();
    let b = env.run(&["certificates", "create", "app", "--json"]).json();
    let out = env
        .run(&[
            "certificates",
            "revoke",
            "app",
            "--id",
            a["id"].as_str().unwrap(),
            "--json",
        ])
        .json();
    assert_eq!(out["status"], "revoked");
    let c1 = crl(&env);
    assert_eq!(c1.crl_number, Some(2));
    assert_eq!(
        c1.revoked_serials,
        vec![a["serial"].as_str().unwrap().to_owned()]
    );
    env.run(&[
        "certificates",
        "revoke",
        "app",
        "--id",
        b["id"].as_str().unwrap(),
    ])
    .ok();
    let c2 = crl(&env);
    assert_eq!(c2.crl_number, Some(3));
    assert_eq!(c2.revoked_serials.len(), 2);

    // Revoking twice is refused; a revoked certificate cannot be downloaded.
    let before = env.snapshot();
    let e = env
        .run(&[
            "certificates",
            "revoke",
            "app",
            "--id",
            a["id"].as_str().unwrap(),
        ])
        .error()
        .to_owned();
    assert!(e.contains("already revoked"), "{e}");
    let e = env
        .run(&[
            "certificates",
            "download",
            "app",
            "--id",
            a["id"].as_str().unwrap(),
        ])
        .error()
        .to_owned();
    assert!(e.contains("is revoked"), "{e}");
    assert_eq!(env.snapshot(), before);

    // The proxy's loader sees both serials as revoked.
    let db = StateDir::new(&env.state).load_database("app").unwrap();
    let rt =
        pgmtls::snapshot::DatabaseRuntime::build(&db, &pgmtls::metrics::Metrics::new()).unwrap();
    assert!(rt.is_revoked(a["serial"].as_str().unwrap()));
    assert!(rt.is_revoked(b["serial"].as_str().unwrap()));
    let audit = env.audit_lines();
    let last = audit.last().unwrap();
    assert_eq!(last["action"], "certificate.revoke");
    assert_eq!(last["details"]["crl_number"], 3);
}

#[test]
fn renew_issues_one_successor_when_due_and_is_idempotent() {
    let env = Env::new();
    env.create_db("app", "127.0.0.1:0", "127.0.0.1:5432");
    let soon = env
        .run(&[
            "certificates",
            "create",
            "app",
            "--valid-for",
            "70d",
            "--common-name",
            "etl",
            "--key-type",
            "p384",
            "--json",
        ])
        .json();
    let later = env
        .run(&[
            "certificates",
            "create",
            "app",
            "--valid-for",
            "100d",
            "--json",
        ])
        .json();
    let revoked = env
        .run(&[
            "certificates",
            "create",
            "app",
            "--valid-for",
            "10d",
            "--json",
        ])
        .json();
    env.run(&[
        "certificates",
        "revoke",
        "app",
        "--id",
        revoked["id"].as_str().unwrap(),
    ])
    .ok();
    let crl_before = crl(&env).crl_number;

    let notes = env.dir.path().join("notes");
    let cmd = format!(
        "env | grep ^PGMTLS_ | sort >> {} && echo --- >> {}",
        notes.display(),
        notes.display()
    );
    let report = env
        .run(&["certificates", "renew", "--notify-command", &cmd, "--json"])
        .json();
    let renewed = report["renewed"].as_array().unwrap();
    assert_eq!(renewed.len(), 1, "{report}");
    let r = &renewed[0];
    assert_eq!(r["previous_id"], soon["id"]);
    assert_eq!(r["common_name"], "etl");
    assert!(report["server_certificates"].as_array().unwrap().is_empty());
    assert!(report["crls_refreshed"].as_array().unwrap().is_empty());
    assert_eq!(
        crl(&env).crl_number,
        crl_before,
        "a fresh CRL is left alone"
    );

    let db = StateDir::new(&env.state).load_database("app").unwrap();
    let find = |id: &Value| {
        db.certificates
            .iter()
            .find(|c| c.id == id.as_str().unwrap())
            .unwrap()
            .clone()
    };
    let old = find(&soon["id"]);
    let new = find(&r["id"]);
    assert_eq!(old.successor.as_deref(), Some(new.id.as_str()));
    assert_eq!(new.successor_of.as_deref(), Some(old.id.as_str()));
    assert_eq!(new.key_type, "p384");
    assert!(
        (new.expires_at - new.created_at).whole_days() >= 393,
        "13 months"
    );
    assert!(
        find(&later["id"]).successor.is_none(),
        "100 days is not due"
    );

    let notes_text = std::fs::read_to_string(&notes).unwrap();
    assert_eq!(notes_text.matches("---").count(), 1, "{notes_text}");
    for line in [
        "PGMTLS_EVENT=certificate.renew".to_owned(),
        "PGMTLS_DATABASE=app".to_owned(),
        format!("PGMTLS_CERTIFICATE_ID={}", new.id),
        format!("PGMTLS_PREVIOUS_CERTIFICATE_ID={}", old.id),
        format!("PGMTLS_SERIAL={}", new.serial),
        "PGMTLS_COMMON_NAME=etl".to_owned(),
    ] {
        assert!(
            notes_text.lines().any(|l| l == line),
            "{line} missing in\n{notes_text}"
        );
    }

    // Again: nothing is due any more, nothing is written, nobody is notified.
    let before = env.snapshot();
    let text = env
        .run(&["certificates", "renew", "app", "--notify-command", &cmd])
        .ok()
        .to_owned();
    assert!(
        text.contains("No client certificates need renewal."),
        "{text}"
    );
    assert_eq!(env.snapshot(), before);
    assert_eq!(std::fs::read_to_string(&notes).unwrap(), notes_text);

    let renewals: Vec<Value> = env
        .audit_lines()
        .into_iter()
        .filter(|l| l["action"] == "certificate.renew")
        .collect();
    assert_eq!(renewals.len(), 1);
    assert_eq!(renewals[0]["details"]["previous_id"], old.id.as_str());

    let table = env.run(&["certificates", "app"]).ok().to_owned();
    assert!(table.contains("expiring (renewed)"), "{table}");
}

#[test]
fn renew_reports_a_failing_notify_command() {
    let env = Env::new();
    env.create_db("app", "127.0.0.1:0", "127.0.0.1:5432");
    env.run(&["certificates", "create", "app", "--valid-for", "30d"])
        .ok();
    let out = env.run(&["certificates", "renew", "--notify-command", "exit 3"]);
    assert_eq!(out.code, Some(1));
    assert!(out.stderr.contains("notify command"), "{}", out.stderr);
    // The successor exists regardless: the renewal is not undone by a failed notification.
    let db = StateDir::new(&env.state).load_database("app").unwrap();
    assert_eq!(db.certificates.len(), 3);
}

#[test]
fn renew_refreshes_a_crl_close_to_its_next_update() {
    let env = Env::new();
    env.create_db("app", "127.0.0.1:0", "127.0.0.1:5432");
    // Replace the CRL with one whose nextUpdate is in 30 days, signed by the same CA.
    let dir = env.db_dir("app");
    let signer = pgmtls::pki::CaSigner::from_pem(
        &std::fs::read_to_string(dir.join("ca.crt")).unwrap(),
        &std::fs::read_to_string(dir.join("ca.key")).unwrap(),
    )
    .unwrap();
    let now = time::OffsetDateTime::now_utc();
    let pem = pgmtls::pki::build_crl::<&str>(&signer, &[], 7, now, now + time::Duration::days(30))
        .unwrap();
    std::fs::write(dir.join("crl.pem"), pem).unwrap();
    let report = env.run(&["certificates", "renew", "--json"]).json();
    assert_eq!(report["crls_refreshed"][0]["crl_number"], 8, "{report}");
    let c = crl(&env);
    assert_eq!(c.crl_number, Some(8));
    assert!((c.next_update.unwrap() - now).whole_days() >= 364);
    // Fresh now: a second run leaves it alone.
    let report = env.run(&["certificates", "renew", "--json"]).json();
    assert!(report["crls_refreshed"].as_array().unwrap().is_empty());
}

#[test]
fn prefixed_download_still_warns_about_unprefixed_files_left_in_the_default_directory() {
    let env = Env::new();
    env.create_db("app", "127.0.0.1:0", "127.0.0.1:5432");
    let id = first_cert(&env);
    let pgdir = env.home.join(".postgresql");
    std::fs::create_dir(&pgdir).unwrap();
    std::fs::write(pgdir.join("root.crt"), "someone else's root").unwrap();
    let out = env.run(&[
        "certificates",
        "download",
        "app",
        "--id",
        &id,
        "--prefix",
        "app_",
    ]);
    out.ok();
    assert!(
        out.stderr.contains("warning: unprefixed files"),
        "{}",
        out.stderr
    );
    assert_eq!(
        std::fs::read_to_string(pgdir.join("root.crt")).unwrap(),
        "someone else's root"
    );
}

/// A database that lost its CRL is invalid (the proxy would accept what it revoked); the CLI
/// says so, and `certificates renew` writes a new CRL from the records marked revoked.
#[test]
fn a_lost_crl_is_reported_and_renew_rewrites_it_from_the_records() {
    let env = Env::new();
    env.create_db("app", "127.0.0.1:0", "127.0.0.1:5432");
    let a = env.run(&["certificates", "create", "app", "--json"]).json();
    let serial = a["serial"].as_str().unwrap().to_owned();
    env.run(&[
        "certificates",
        "revoke",
        "app",
        "--id",
        a["id"].as_str().unwrap(),
    ])
    .ok();
    std::fs::remove_file(env.db_dir("app").join("crl.pem")).unwrap();

    let out = env.run(&["databases"]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("crl.pem: missing"), "{}", out.stderr);

    env.run(&["certificates", "renew", "app"]).ok();
    let c = crl(&env);
    assert_eq!(c.revoked_serials, vec![serial]);
    env.run(&["databases"]).ok();
}

fn renewal_record(env: &Env) -> pgmtls::state::RenewalRecord {
    pgmtls::state::RenewalRecord::read(&env.state)
        .unwrap()
        .expect("renewal.yaml written")
}

/// Every run over all databases leaves `renewal.yaml` and a `renewal.run` audit record; a
/// failed run moves last_run_at and keeps last_success_at; `renew DB` records nothing.
#[test]
fn renew_records_each_run_and_a_failure_keeps_the_last_success() {
    use pgmtls::state::RenewalResult;
    use std::os::unix::fs::PermissionsExt as _;
    let env = Env::new();
    env.create_db("app", "127.0.0.1:0", "127.0.0.1:5432");
    assert!(pgmtls::state::RenewalRecord::read(&env.state)
        .unwrap()
        .is_none());
    env.run(&["certificates", "renew", "--notify-command", "true"])
        .ok();
    let ok = renewal_record(&env);
    assert_eq!(ok.last_run_result, RenewalResult::Success);
    assert_eq!(ok.last_run_errors, 0);
    assert_eq!(ok.last_success_at, Some(ok.last_run_at));
    assert_eq!(mode(&env.state.join("renewal.yaml")), 0o644);
    let audit = env.audit_lines();
    let run = audit.last().unwrap();
    assert_eq!(run["action"], "renewal.run");
    assert_eq!(run["details"]["result"], "success");

    // A CA key readable by others is refused when signing: that database fails the run.
    let key = env.db_dir("app").join("ca.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = env.run(&["certificates", "renew", "--notify-command", "true"]);
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("database app"), "{}", out.stderr);
    let failed = renewal_record(&env);
    assert_eq!(failed.last_run_result, RenewalResult::Failure);
    assert_eq!(failed.last_run_errors, 1);
    assert!(failed.last_run_at >= ok.last_run_at);
    assert_eq!(failed.last_success_at, ok.last_success_at);
    let run = env.audit_lines().last().unwrap().clone();
    assert_eq!(run["action"], "renewal.run");
    assert_eq!(run["details"]["result"], "failure");
    assert_eq!(run["details"]["errors"], 1);

    // One database is not a scheduled run: the record stays as it was.
    let before = std::fs::read(env.state.join("renewal.yaml")).unwrap();
    let out = env.run(&["certificates", "renew", "app"]);
    assert_eq!(out.code, Some(1));
    assert_eq!(
        std::fs::read(env.state.join("renewal.yaml")).unwrap(),
        before
    );

    // A record that does not parse does not stop the next run: it is replaced.
    std::fs::write(env.state.join("renewal.yaml"), "last_run_at: yesterday\n").unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    env.run(&["certificates", "renew"]).ok();
    let again = renewal_record(&env);
    assert_eq!(again.last_run_result, RenewalResult::Success);
}
