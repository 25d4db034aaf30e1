//! A change to the state directory and its audit record land together, or the next writer
//! completes them. A change is staged first (temp files and staged folders, invisible to
//! the loaders), then [`StateDir::apply`] writes one journal, `STATE/.pending-change`,
//! naming every rename still to do and the change's audit lines, then renames, appends the
//! lines and removes the journal. A writer killed anywhere in between leaves the journal;
//! the next writer, under the lock, finishes the renames it names and appends the lines the
//! log lacks ([`StateDir::recover`]). So a change that became visible always gets its audit
//! record, and a change whose journal never landed was never visible: the staged files it
//! leaves are dot-names the loaders skip.
//!
//! This is what an etcd commit does in one transaction (records and audit key under one
//! revision guard); a directory has no multi-file atomic write, so it gets a redo log.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use super::{
    write_atomic, AuditEntry, AuditLog, StateDir, StateError, CERTIFICATES_DIR, DATABASES_DIR,
    PRIVATE_MODE,
};

/// The journal's name at the state root (a dot-name: no loader reads it).
pub const JOURNAL: &str = ".pending-change";

/// Temp names of one process are numbered, so that a change writing one file twice stages
/// two temps and dropping the first cannot remove the second.
static SEQ: AtomicU64 = AtomicU64::new(0);

/// A write made but not visible yet: what is renamed to where at [`StateDir::apply`].
/// Dropped unapplied, a staged temp file or folder is removed (a live folder being archived
/// is not ours to remove).
#[derive(Debug)]
pub struct Pending {
    from: PathBuf,
    to: PathBuf,
    staged: bool,
    done: bool,
}

impl Pending {
    /// A staged temp file or folder at `from`, to appear as `to`.
    pub(super) fn staged(from: PathBuf, to: PathBuf) -> Pending {
        Pending {
            from,
            to,
            staged: true,
            done: false,
        }
    }

    /// A live path that moves (a database folder into the archive).
    pub(super) fn moved(from: PathBuf, to: PathBuf) -> Pending {
        Pending {
            from,
            to,
            staged: false,
            done: false,
        }
    }

    /// Where the write appears.
    pub fn target(&self) -> &Path {
        &self.to
    }

    /// Makes this one write visible now: one rename, so it needs no journal.
    pub fn show(mut self) -> Result<(), StateError> {
        rename(&self.from, &self.to)?;
        self.done = true;
        Ok(())
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if self.staged && !self.done {
            let _ =
                std::fs::remove_file(&self.from).or_else(|_| std::fs::remove_dir_all(&self.from));
        }
    }
}

/// Writes `bytes` where `path` will appear (mode `mode`, synced), without making it visible.
/// Errors name `path`, the file as it would have appeared.
pub(super) fn stage_file(path: &Path, bytes: &[u8], mode: u32) -> Result<Pending, StateError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let tmp = dir.join(format!(".{name}.tmp-{}-{seq}", std::process::id()));
    // The Pending exists before the file does: a failed write leaves nothing behind.
    let pending = Pending::staged(tmp.clone(), path.to_path_buf());
    super::files::write_synced(&tmp, bytes, mode).map_err(|e| StateError::io(path, e))?;
    Ok(pending)
}

/// What the journal holds: paths relative to the state root (the folder may move between a
/// crash and its recovery), and the audit lines exactly as they are appended.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Journal {
    renames: Vec<(PathBuf, PathBuf)>,
    audit: Vec<String>,
}

/// What [`StateDir::recover`] found and did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Renames of the interrupted change that were still to do.
    pub renamed: usize,
    /// Its audit lines that the log lacked.
    pub audited: usize,
    /// Temp files and staging folders that killed writers left behind, removed.
    pub swept: usize,
}

/// Whether `name` is a temp file or staging folder of a writer other than this process:
/// `.NAME.tmp-PID`, `.NAME.tmp-PID-N` or `.NAME.new-PID`. Only those exact shapes, so that a
/// dot-name someone else put there (Kubernetes' `..data`) is never touched.
fn is_leftover(name: &str) -> bool {
    let Some(rest) = name.strip_prefix('.') else {
        return false;
    };
    let Some(at) = rest.rfind(".tmp-").or_else(|| rest.rfind(".new-")) else {
        return false;
    };
    let suffix = &rest[at + 5..];
    let mut parts = suffix.splitn(2, '-');
    let pid = parts.next().and_then(|p| p.parse::<u32>().ok());
    let seq_ok = parts
        .next()
        .is_none_or(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    at > 0 && seq_ok && pid.is_some_and(|p| p != std::process::id())
}

fn relative<'a>(root: &Path, p: &'a Path) -> Result<&'a Path, StateError> {
    p.strip_prefix(root).map_err(|_| {
        StateError::io(
            p,
            std::io::Error::other(format!("outside the state directory {}", root.display())),
        )
    })
}

fn sync_dir(dir: &Path) -> Result<(), StateError> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| StateError::io(dir, e))
}

fn rename(from: &Path, to: &Path) -> Result<(), StateError> {
    std::fs::rename(from, to).map_err(|e| StateError::io(to, e))?;
    for dir in [from.parent(), to.parent()].into_iter().flatten() {
        sync_dir(dir)?;
    }
    Ok(())
}

impl StateDir {
    fn journal_path(&self) -> PathBuf {
        self.root().join(JOURNAL)
    }

    /// Makes `pending` visible, in order, and appends `entries` to `audit`, as one change:
    /// from the moment its journal is written, a crash leaves the rest to [`Self::recover`].
    /// A change with nothing to rename appends its lines at once (there is no gap to close).
    pub fn apply(
        &self,
        pending: &mut [Pending],
        audit: &mut AuditLog,
        entries: &[AuditEntry],
    ) -> Result<(), StateError> {
        let lines = entries
            .iter()
            .map(|e| audit.line_of(e))
            .collect::<Result<Vec<_>, _>>()?;
        if pending.is_empty() {
            return lines.iter().try_for_each(|l| audit.append_line(l));
        }
        let root = self.root();
        let journal = Journal {
            renames: pending
                .iter()
                .map(|p| {
                    Ok((
                        relative(root, &p.from)?.to_path_buf(),
                        relative(root, &p.to)?.to_path_buf(),
                    ))
                })
                .collect::<Result<_, StateError>>()?,
            audit: lines,
        };
        let path = self.journal_path();
        let bytes = serde_json::to_vec(&journal)
            .map_err(|e| StateError::io(&path, std::io::Error::other(e)))?;
        write_atomic(&path, &bytes, PRIVATE_MODE).map_err(|e| StateError::io(&path, e))?;
        // From here on the staged files belong to the journal: a rename that fails leaves
        // them for the next writer to finish, so nothing may remove them on the way out.
        for p in pending.iter_mut() {
            p.done = true;
        }
        for p in pending.iter() {
            rename(&p.from, &p.to)?;
        }
        for line in &journal.audit {
            audit.append_line(line)?;
        }
        std::fs::remove_file(&path).map_err(|e| StateError::io(&path, e))?;
        sync_dir(root)
    }

    /// Completes a change whose writer died after writing its journal: the renames it still
    /// had to do, then the audit lines the log does not hold yet. Then removes what writers
    /// killed before their journal left: staged files (private keys among them) of changes
    /// that never happened. Called by every writer, under the lock, before it reads.
    /// Idempotent: a crash during recovery leaves the journal for the next writer.
    pub fn recover(&self, audit: &mut AuditLog) -> Result<Recovered, StateError> {
        // The journal first: the files it still has to rename look like leftovers, and the
        // sweep runs only once they are in place (a journal that cannot be completed stops
        // here, keeping them).
        let mut done = self.complete_journal(audit)?;
        done.swept = self.sweep();
        Ok(done)
    }

    /// Removes the leftovers of killed writers, where writers stage: the root, the databases
    /// folder, each database folder, its certificates folder and each certificate folder.
    /// Best effort: one that cannot be removed is left for the next writer.
    fn sweep(&self) -> usize {
        let mut dirs = vec![self.root().to_path_buf()];
        let databases = self.root().join(DATABASES_DIR);
        dirs.push(databases.clone());
        for db in subdirs(&databases) {
            let certs = db.join(CERTIFICATES_DIR);
            dirs.extend(subdirs(&certs));
            dirs.push(certs);
            dirs.push(db);
        }
        let mut swept = 0;
        for dir in dirs {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                if !is_leftover(&e.file_name().to_string_lossy()) {
                    continue;
                }
                let p = e.path();
                let removed = match e.file_type() {
                    Ok(t) if t.is_dir() => std::fs::remove_dir_all(&p),
                    _ => std::fs::remove_file(&p),
                };
                swept += usize::from(removed.is_ok());
            }
        }
        swept
    }

    fn complete_journal(&self, audit: &mut AuditLog) -> Result<Recovered, StateError> {
        let path = self.journal_path();
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Recovered::default()),
            Err(e) => return Err(StateError::io(&path, e)),
        };
        // Written with write_atomic, so never torn: unreadable means someone edited it.
        let journal: Journal = serde_json::from_slice(&bytes).map_err(|e| {
            StateError::io(
                &path,
                std::io::Error::other(format!(
                    "an interrupted change's journal does not parse ({e}); compare the state \
                     with its last audit line, then remove the file"
                )),
            )
        })?;
        let root = self.root();
        // Only paths inside the state directory: the journal never names anything else.
        let inside = |p: &Path| {
            p.components()
                .all(|c| matches!(c, std::path::Component::Normal(_)))
        };
        if let Some((from, to)) = journal
            .renames
            .iter()
            .find(|(from, to)| !inside(from) || !inside(to))
        {
            return Err(StateError::io(
                &path,
                std::io::Error::other(format!(
                    "names a path outside the state directory ({} -> {}); remove the file",
                    from.display(),
                    to.display()
                )),
            ));
        }
        let mut done = Recovered::default();
        for (from, to) in &journal.renames {
            let (from, to) = (root.join(from), root.join(to));
            // Renames run in order and each is atomic: one whose source is gone happened.
            if from.symlink_metadata().is_ok() {
                rename(&from, &to).map_err(|e| {
                    StateError::io(
                        &path,
                        std::io::Error::other(format!(
                            "cannot complete an interrupted change: {e}; every change waits \
                             until this rename can be done"
                        )),
                    )
                })?;
                done.renamed += 1;
            }
        }
        let log =
            std::fs::read_to_string(audit.path()).map_err(|e| StateError::io(audit.path(), e))?;
        for line in &journal.audit {
            if !log.lines().any(|l| l == line) {
                audit.append_line(line)?;
                done.audited += 1;
            }
        }
        std::fs::remove_file(&path).map_err(|e| StateError::io(&path, e))?;
        sync_dir(root)?;
        Ok(done)
    }
}

/// The folders in `dir` whose names a loader reads (not dot-names).
fn subdirs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| e.path())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(action: &str) -> AuditEntry {
        AuditEntry {
            time: time::OffsetDateTime::UNIX_EPOCH,
            actor: "test".into(),
            action: action.into(),
            database: Some("app".into()),
            details: serde_json::json!({"n": 1}),
        }
    }

    fn setup() -> (tempfile::TempDir, StateDir, AuditLog) {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::new(tmp.path());
        let audit = state.open_audit_log().unwrap();
        (tmp, state, audit)
    }

    fn read(p: &Path) -> String {
        std::fs::read_to_string(p).unwrap()
    }

    fn audit_text(state: &StateDir) -> String {
        std::fs::read_to_string(state.audit_log()).unwrap()
    }

    #[test]
    fn a_change_lands_with_its_audit_lines_and_leaves_no_journal() {
        let (tmp, state, mut audit) = setup();
        let (a, b) = (tmp.path().join("a.yaml"), tmp.path().join("b.yaml"));
        let mut pending = vec![
            stage_file(&a, b"a", 0o644).unwrap(),
            stage_file(&b, b"b", 0o644).unwrap(),
        ];
        // Staged, not visible.
        assert!(!a.exists() && !b.exists());
        state
            .apply(&mut pending, &mut audit, &[entry("x.one"), entry("x.two")])
            .unwrap();
        assert_eq!((read(&a), read(&b)), ("a".into(), "b".into()));
        let log = audit_text(&state);
        assert_eq!(log.lines().count(), 2, "{log}");
        assert!(log.contains("x.one") && log.contains("x.two"));
        assert!(!tmp.path().join(JOURNAL).exists());
        // Nothing to recover, and dropping the applied writes removes nothing.
        drop(pending);
        assert_eq!(state.recover(&mut audit).unwrap(), Recovered::default());
        assert!(a.exists() && b.exists());
    }

    #[test]
    fn an_unapplied_change_leaves_no_file_behind() {
        let (tmp, _state, _audit) = setup();
        let a = tmp.path().join("a.yaml");
        let p = stage_file(&a, b"a", 0o644).unwrap();
        drop(p);
        let names: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["audit.log".to_owned()]);
    }

    /// The writer died after its journal and its first rename: the next writer does the
    /// second rename and appends the audit line once, however often recovery runs.
    #[test]
    fn a_writer_killed_half_way_is_completed_by_the_next_one() {
        let (tmp, state, mut audit) = setup();
        let (a, b) = (tmp.path().join("a.yaml"), tmp.path().join("b.yaml"));
        let mut p1 = stage_file(&a, b"a", 0o644).unwrap();
        let mut p2 = stage_file(&b, b"b", 0o644).unwrap();
        let line = audit.line_of(&entry("x.change")).unwrap();
        let journal = Journal {
            renames: vec![
                (
                    p1.from.strip_prefix(tmp.path()).unwrap().into(),
                    "a.yaml".into(),
                ),
                (
                    p2.from.strip_prefix(tmp.path()).unwrap().into(),
                    "b.yaml".into(),
                ),
            ],
            audit: vec![line.clone()],
        };
        std::fs::write(
            tmp.path().join(JOURNAL),
            serde_json::to_vec(&journal).unwrap(),
        )
        .unwrap();
        std::fs::rename(&p1.from, &a).unwrap();
        // The dead writer's process is gone: nothing of it cleans up.
        (p1.done, p2.done) = (true, true);
        assert!(!b.exists());
        let done = state.recover(&mut audit).unwrap();
        assert_eq!(
            done,
            Recovered {
                renamed: 1,
                audited: 1,
                swept: 0,
            }
        );
        assert_eq!((read(&a), read(&b)), ("a".into(), "b".into()));
        assert_eq!(audit_text(&state), format!("{line}\n"));
        assert!(!tmp.path().join(JOURNAL).exists());

        // Killed after its audit line, before removing the journal: the line is not doubled.
        std::fs::write(
            tmp.path().join(JOURNAL),
            serde_json::to_vec(&journal).unwrap(),
        )
        .unwrap();
        assert_eq!(state.recover(&mut audit).unwrap(), Recovered::default());
        assert_eq!(audit_text(&state), format!("{line}\n"));
    }

    #[test]
    fn a_journal_that_does_not_parse_stops_the_writer_and_names_the_file() {
        let (tmp, state, mut audit) = setup();
        std::fs::write(tmp.path().join(JOURNAL), b"{\"renames\": [").unwrap();
        let e = state.recover(&mut audit).unwrap_err().to_string();
        assert!(e.contains(JOURNAL), "{e}");
        assert!(e.contains("does not parse"), "{e}");
        // It is left for the operator, not removed.
        assert!(tmp.path().join(JOURNAL).exists());
        // Nor does one that names a path outside the state directory move anything.
        let outside = Journal {
            renames: vec![("a".into(), "../../etc/passwd".into())],
            audit: vec![],
        };
        std::fs::write(tmp.path().join("a"), b"x").unwrap();
        std::fs::write(
            tmp.path().join(JOURNAL),
            serde_json::to_vec(&outside).unwrap(),
        )
        .unwrap();
        let e = state.recover(&mut audit).unwrap_err().to_string();
        assert!(e.contains("outside the state directory"), "{e}");
        assert!(tmp.path().join("a").exists());
    }

    #[test]
    fn leftovers_of_other_writers_are_named_exactly() {
        let other = std::process::id().wrapping_add(1);
        for name in [
            format!(".ip-rules.yaml.tmp-{other}"),
            format!(".client.key.tmp-{other}-3"),
            format!(".0b5e.new-{other}"),
            format!("..pending-change.tmp-{other}"),
        ] {
            assert!(is_leftover(&name), "{name}");
        }
        let own = std::process::id();
        for name in [
            format!(".ip-rules.yaml.tmp-{own}"),
            "..data".to_owned(),
            ".lock".to_owned(),
            ".pending-change".to_owned(),
            "ip-rules.yaml.tmp-12".to_owned(),
            ".x.tmp-".to_owned(),
            ".x.tmp-12-".to_owned(),
            ".x.tmp-12-a".to_owned(),
            ".x.new-abc".to_owned(),
            ".tmp-12".to_owned(),
        ] {
            assert!(!is_leftover(&name), "{name}");
        }
    }

    /// A writer killed after staging, before its journal: what it staged (a private key
    /// among it) is removed by the next writer; live files and other dot-names stay.
    #[test]
    fn the_next_writer_removes_what_killed_writers_staged() {
        let (tmp, state, mut audit) = setup();
        let other = std::process::id().wrapping_add(1);
        let db = tmp.path().join("databases/app");
        let cert = db.join("certificates/0b5e");
        std::fs::create_dir_all(&cert).unwrap();
        std::fs::create_dir_all(db.join(format!("certificates/.1c6f.new-{other}"))).unwrap();
        std::fs::create_dir_all(db.join("..data")).unwrap();
        for (dir, name) in [
            (&db, format!(".ip-rules.yaml.tmp-{other}-7")),
            (&cert, format!(".certificate.yaml.tmp-{other}")),
            (
                &tmp.path().to_path_buf(),
                format!(".renewal.yaml.tmp-{other}"),
            ),
        ] {
            std::fs::write(dir.join(name), b"x").unwrap();
        }
        std::fs::write(db.join("ip-rules.yaml"), b"ip_rules: []\n").unwrap();
        assert_eq!(state.recover(&mut audit).unwrap().swept, 4);
        let mut left = Vec::new();
        for d in [tmp.path(), &db, &db.join("certificates"), &cert] {
            for e in std::fs::read_dir(d).unwrap() {
                left.push(e.unwrap().file_name().to_string_lossy().into_owned());
            }
        }
        left.sort();
        assert_eq!(
            left,
            [
                "..data",
                "0b5e",
                "audit.log",
                "certificates",
                "databases",
                "ip-rules.yaml"
            ]
        );
        assert_eq!(state.recover(&mut audit).unwrap(), Recovered::default());
    }

    /// A rename that fails after the journal (the target is a folder that is not empty)
    /// keeps the staged file, so that the next writer can finish once the way is clear.
    #[test]
    fn a_rename_that_fails_after_the_journal_keeps_what_it_staged() {
        let (tmp, state, mut audit) = setup();
        let target = tmp.path().join("a");
        let mut pending = vec![stage_file(&target, b"a", 0o644).unwrap()];
        std::fs::create_dir_all(target.join("in-the-way")).unwrap();
        assert!(state
            .apply(&mut pending, &mut audit, &[entry("x.change")])
            .is_err());
        drop(pending);
        assert_eq!(audit_text(&state), "");
        let e = state.recover(&mut audit).unwrap_err().to_string();
        assert!(e.contains("cannot complete an interrupted change"), "{e}");
        assert!(e.contains(JOURNAL), "{e}");
        std::fs::remove_dir_all(&target).unwrap();
        let done = state.recover(&mut audit).unwrap();
        assert_eq!((done.renamed, done.audited), (1, 1));
        assert_eq!(read(&target), "a");
        assert!(audit_text(&state).contains("x.change"));
    }
}
