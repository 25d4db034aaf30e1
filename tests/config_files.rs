//! Every example in `config/` loads, and `check-config` reports every error of a broken file
//! with file, key and line.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::Command;

use pgmtls::config::Config;

#[test]
fn every_example_config_loads() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let c = Config::load(&path).unwrap_or_else(|e| panic!("{}:\n{e}", path.display()));
            assert!(c.state_dir.is_some(), "{}", path.display());
            n += 1;
        }
    }
    assert!(
        n >= 3,
        "expected the standard, sidecar and gateway examples"
    );
}

#[test]
fn check_config_reports_all_errors_and_exits_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.yaml");
    std::fs::write(
        &file,
        "state_dir: state\nhandshake_timeout: forever\nmax_conections: 5\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_pgmtls"))
        .args(["check-config", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let f = file.display();
    assert!(
        err.contains(&format!("{f}:2: handshake_timeout: invalid duration")),
        "{err}"
    );
    assert!(
        err.contains(&format!("{f}:3: max_conections: unknown key")),
        "{err}"
    );
    assert!(err.contains("2 error(s)"), "{err}");
}

#[test]
fn check_config_accepts_a_valid_file_with_an_empty_state_dir() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ok.yaml");
    std::fs::write(&file, "state_dir: state\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_pgmtls"))
        .args(["check-config", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok (0 databases)"));
}

#[test]
fn quick_mode_cidr_and_keepalive_flags_refuse_bad_values_naming_the_flag() {
    for (flag, value, needle) in [
        (
            "--allow",
            "10.0.0.1/8",
            "--allow: 10.0.0.1/8 has host bits set",
        ),
        (
            "--proxy-protocol-from",
            "lb",
            "--proxy-protocol-from: \"lb\" is not a CIDR block",
        ),
        (
            "--proxy-protocol-from",
            "10.0.0.1/8",
            "--proxy-protocol-from: 10.0.0.1/8 has host bits set",
        ),
        (
            "--tcp-keepalives-idle",
            "500ms",
            "--tcp-keepalives-idle: must be whole seconds",
        ),
        (
            "--tcp-keepalives-count",
            "500",
            "--tcp-keepalives-count: must be from 1 to 127",
        ),
        (
            "--tcp-user-timeout",
            "soon",
            "--tcp-user-timeout: invalid duration",
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_pgmtls"))
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--upstream",
                "127.0.0.1:5432",
                "--cert",
                "c",
                "--key",
                "k",
                "--client-ca",
                "ca",
                flag,
                value,
            ])
            .env_remove("PGMTLS_CONFIG")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flag} {value} accepted");
        assert!(stderr.contains(needle), "{flag} {value}: {stderr}");
    }
}

/// README step 0 exports `PGMTLS_CONFIG` for the CLI; `serve --listen ...` typed later in the
/// same shell is quick mode, served with a warning, not refused over a flag nobody typed.
#[tokio::test]
async fn an_exported_pgmtls_config_does_not_block_quick_mode() {
    if !common::pg::pg_available_or_skip() {
        return;
    }
    let pg = common::pg::PgServer::start();
    let pki = common::pki::TestPki::new();
    let proxy = common::proxy::ProxyProcess::quick_env(
        &pki,
        pg.addr(),
        &["127.0.0.1/32"],
        &[],
        &[("PGMTLS_CONFIG", "/nonexistent/pgmtls.yaml")],
    );
    let out = common::clients::Psql::new(
        pg.psql_path(),
        "127.0.0.1",
        proxy.addr().port(),
        common::pg::APP_USER,
        common::pg::APP_DB,
    )
    .verify_ca(
        &pki.ca.cert_path,
        Some((&pki.client.chain_path, &pki.client.key_path)),
    )
    .password(common::pg::APP_PASSWORD)
    .run_async("SELECT 'quick'")
    .await;
    assert_eq!(out.expect_ok().trim(), "quick");
    assert!(
        proxy
            .log_text()
            .contains("PGMTLS_CONFIG is set in the environment, but --listen selects quick mode"),
        "{}",
        proxy.log_text()
    );

    // Typed on the command line, the two modes still conflict, and the message says so.
    let out = Command::new(env!("CARGO_BIN_EXE_pgmtls"))
        .args([
            "serve",
            "--config",
            "/nonexistent/pgmtls.yaml",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "127.0.0.1:5432",
            "--cert",
            "c",
            "--key",
            "k",
            "--client-ca",
            "ca",
        ])
        .env_remove("PGMTLS_CONFIG")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--listen (quick mode) cannot be used with --config"),
        "{err}"
    );
}
