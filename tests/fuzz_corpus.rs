//! Replays every committed fuzz corpus (`fuzz/corpus/NAME/*`) through its target's body in
//! `pgmtls::fuzzing`, on the stable toolchain and without libFuzzer, so an input that once
//! crashed a parser (and every seed) fails `cargo test` if it crashes again. The bodies
//! assert round trips where a parser has a writer, so those are checked here too.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use pgmtls::fuzzing::TARGETS;

fn corpus_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(name)
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    out.sort();
    out
}

#[test]
fn every_corpus_file_replays_without_a_panic() {
    let mut failed = Vec::new();
    for (name, run) in TARGETS {
        for file in files(&corpus_dir(name)) {
            let data = std::fs::read(&file).unwrap();
            let run = *run;
            if std::panic::catch_unwind(move || run(&data)).is_err() {
                failed.push(file.display().to_string());
            }
        }
    }
    assert!(failed.is_empty(), "inputs that panic: {failed:#?}");
}

#[test]
fn every_target_has_a_seeded_corpus_and_a_fuzz_target() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    for (name, _) in TARGETS {
        let n = files(&corpus_dir(name)).len();
        // A guard against committing an unminimized dump, not a cap on coverage: `cargo fuzz
        // cmin` of an hour's corpus keeps up to about 1,800 inputs for the YAML targets, each
        // reaching an edge the others miss (an unminimized one holds 5,000 to 15,000).
        assert!(
            (1..=2000).contains(&n),
            "fuzz/corpus/{name}: {n} files (want a seeded, minimized corpus)"
        );
        let target = root.join("fuzz_targets").join(format!("{name}.rs"));
        let text = std::fs::read_to_string(&target)
            .unwrap_or_else(|e| panic!("{}: {e}", target.display()));
        assert!(
            text.contains(&format!("pgmtls::fuzzing::{name}(")),
            "{} does not call pgmtls::fuzzing::{name}",
            target.display()
        );
        assert!(
            manifest.contains(&format!("name = \"{name}\"")),
            "fuzz/Cargo.toml has no [[bin]] {name}"
        );
    }
    // And no target directory the replay would miss.
    for file in files(&root.join("fuzz_targets")) {
        let stem = file.file_stem().unwrap().to_string_lossy().into_owned();
        assert!(
            TARGETS.iter().any(|(n, _)| *n == stem),
            "{} is not in pgmtls::fuzzing::TARGETS",
            file.display()
        );
    }
}

/// The state seeds are whole databases as the CLI wrote them: they load, so the fuzzer starts
/// from inputs that reach every record's parser, not from ones refused at the first check.
#[test]
fn the_state_record_seeds_load() {
    for file in files(&corpus_dir("state_records")) {
        if !file
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("seed-")
        {
            continue;
        }
        let records = pgmtls::fuzzing::records_of(&std::fs::read(&file).unwrap());
        let loaded = pgmtls::state::load_each_from_records("/pgmtls", &records);
        assert_eq!(loaded.len(), 1, "{}", file.display());
        for (name, result) in loaded {
            let db = result.unwrap_or_else(|e| panic!("{}: {name}: {e}", file.display()));
            assert!(!db.certificates.is_empty(), "{}", file.display());
        }
    }
}
