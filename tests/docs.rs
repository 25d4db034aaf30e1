//! The docs cannot silently fall behind the code: every config key, every flag and environment
//! variable of `serve`, `demo` and `check-config`, and every refusal reason that exists in code
//! is documented, and the links between the documents resolve. (State-file fields and the
//! control commands are checked in `cli_docs.rs`, metrics in `metrics_docs.rs`.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use regex::Regex;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn doc(name: &str) -> String {
    std::fs::read_to_string(root().join("docs").join(name))
        .unwrap_or_else(|e| panic!("docs/{name}: {e}"))
}

/// README.md and every page under docs/.
fn markdown_files() -> Vec<PathBuf> {
    let mut files = vec![root().join("README.md")];
    for entry in std::fs::read_dir(root().join("docs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "md") {
            files.push(path);
        }
    }
    files.sort();
    files
}

#[test]
fn every_process_config_key_is_documented() {
    let config = doc("CONFIG.md");
    let reload = doc("RELOAD.md");
    for key in pgmtls::config::process::KEYS {
        assert!(
            config.contains(&format!("| `{key}` |")),
            "docs/CONFIG.md has no table row for `{key}`"
        );
        // Every key must say whether a reload applies it or a restart is needed.
        assert!(
            reload.contains(&format!("`{key}`")),
            "docs/RELOAD.md does not say whether `{key}` reloads"
        );
    }
}

fn help(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_pgmtls"))
        .args(args)
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success(), "pgmtls {args:?} --help failed");
    String::from_utf8(out.stdout).unwrap()
}

/// Long flags (but `--help`) and `[env: ...]` variables of a `--help` text.
fn flags_and_envs(help: &str) -> BTreeSet<String> {
    let flags = Regex::new(r"--[a-z][a-z0-9-]*").unwrap();
    let envs = Regex::new(r"\[env: ([A-Z0-9_]+)=").unwrap();
    flags
        .find_iter(help)
        .map(|m| m.as_str().to_owned())
        .filter(|f| f != "--help")
        .chain(envs.captures_iter(help).map(|c| c[1].to_owned()))
        .collect()
}

/// The subcommands defined by the binary itself rather than by `pgmtls::cli` (whose flags
/// `cli_docs.rs` checks): `serve` in CONFIG.md, `demo` and `check-config` in CLI.md. Global
/// flags (`--log-format`) are documented once, in CONFIG.md.
#[test]
fn every_binary_subcommand_flag_and_environment_variable_is_documented() {
    let global = flags_and_envs(&help(&[]));
    let mut missing = Vec::new();
    for (command, page, min) in [
        ("serve", "CONFIG.md", 30),
        ("demo", "CLI.md", 3),
        ("check-config", "CLI.md", 2),
    ] {
        let text = doc(page);
        let found = flags_and_envs(&help(&[command]));
        assert!(found.len() >= min, "pgmtls {command} --help: {found:?}");
        for name in found {
            let owned = command == "serve" || !global.contains(&name);
            let documented = if name.starts_with("--") {
                text.contains(&format!("`{name}"))
            } else {
                text.contains(&format!("`{name}`"))
            };
            if owned && !documented {
                missing.push(format!("{command} {name} (docs/{page})"));
            }
        }
    }
    assert!(missing.is_empty(), "undocumented: {missing:?}");
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

#[test]
fn the_docs_index_lists_every_page() {
    let index = doc("README.md");
    for path in markdown_files() {
        let name = path.file_name().unwrap().to_str().unwrap();
        if path.parent() == Some(&root().join("docs")) && name != "README.md" {
            assert!(
                index.contains(&format!("]({name})")),
                "docs/README.md does not link {name}"
            );
        }
    }
}

/// GitHub's anchor for a heading: lowercase, punctuation dropped, spaces to hyphens.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .chars()
        .filter_map(|c| match c {
            ' ' | '-' => Some('-'),
            '_' => Some('_'),
            c if c.is_alphanumeric() => Some(c.to_ascii_lowercase()),
            _ => None,
        })
        .collect()
}

fn anchors(text: &str) -> BTreeSet<String> {
    let mut in_code = false;
    let mut out = BTreeSet::new();
    for line in text.lines() {
        if line.starts_with("```") {
            in_code = !in_code;
        } else if !in_code && line.starts_with('#') {
            out.insert(slug(line.trim_start_matches('#')));
        }
    }
    out
}

#[test]
fn relative_links_in_the_docs_resolve() {
    let link = Regex::new(r"\]\(([^)\s]+)\)").unwrap();
    let mut broken = Vec::new();
    for file in markdown_files() {
        let text = std::fs::read_to_string(&file).unwrap();
        let dir = file.parent().unwrap();
        for cap in link.captures_iter(&text) {
            let target = &cap[1];
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let (path, anchor) = match target.split_once('#') {
                Some((p, a)) => (p, Some(a)),
                None => (target, None),
            };
            let resolved = if path.is_empty() {
                file.clone()
            } else {
                dir.join(path)
            };
            if !resolved.exists() {
                broken.push(format!("{}: {target}", file.display()));
                continue;
            }
            if let Some(anchor) = anchor {
                let body = std::fs::read_to_string(&resolved).unwrap_or_default();
                if !anchors(&body).contains(anchor) {
                    broken.push(format!("{}: {target} (no such heading)", file.display()));
                }
            }
        }
    }
    assert!(broken.is_empty(), "broken links: {broken:#?}");
}
