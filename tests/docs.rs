//! The docs cannot silently fall behind the code: every config key and every refusal reason
//! that exists in code is documented.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

fn doc(name: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("docs")
            .join(name),
    )
    .unwrap_or_else(|e| panic!("docs/{name}: {e}"))
}

#[test]
fn every_process_config_key_is_documented() {
    let text = doc("CONFIG.md");
    for key in pgmtls::config::process::KEYS {
        assert!(
            text.contains(&format!("`{key}`")),
            "docs/CONFIG.md lacks `{key}`"
        );
    }
}

#[test]
fn every_refusal_reason_is_documented_in_the_lifecycle() {
    let text = doc("LIFECYCLE.md");
    for kind in pgmtls::conn::error::ErrorKind::ALL {
        // Session-ending I/O is how sessions end, not a stage failure.
        if matches!(
            kind.as_str(),
            "client_io" | "upstream_io" | "cancel_unknown_key"
        ) {
            continue;
        }
        assert!(
            text.contains(&format!("`{}`", kind.as_str())),
            "docs/LIFECYCLE.md lacks `{}`",
            kind.as_str()
        );
    }
}
