//! State as bytes under logical keys. The layout of docs/STATE.md names every record by a
//! path (`databases/NAME/ip-rules.yaml`, `databases/NAME/certificates/ID/certificate.yaml`);
//! that path is the record's key. The directory maps a key to a file; [`etcd`] maps it to
//! `PREFIX/KEY` in an etcd v3 cluster. A store only keeps bytes: parsing and validation stay
//! in one model that never knows which store the bytes came from.
//!
//! What a store offers is what a fleet needs and no more: read everything at one revision,
//! commit a change guarded by the revision it was read at (two writers never both win), and
//! watch for changes from a revision on.

pub mod etcd;
pub mod follow;

use std::collections::{BTreeMap, BTreeSet};

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Someone else committed after the state this change was built from was read.
    #[error("the state changed underneath this change (now at revision {current}); read it again and retry")]
    Conflict { current: i64 },
    /// The store cannot be reached or answered with an error.
    #[error("{what}: {detail}")]
    Unavailable { what: String, detail: String },
    /// The history a watch asked for is gone; reload everything.
    #[error(
        "revision {requested} was compacted (oldest kept: {compacted}); a full reload is needed"
    )]
    Compacted { requested: i64, compacted: i64 },
    /// A key outside the logical layout (not UTF-8, empty, absolute, `..`).
    #[error("invalid key {0:?}")]
    BadKey(String),
}

/// Every record at one revision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing {
    /// The store's revision this listing is exactly the state of.
    pub revision: i64,
    /// Record bytes by logical key.
    pub records: BTreeMap<String, Vec<u8>>,
    /// The revision of each record's last change, by logical key (etcd's `mod_revision`): what
    /// tells which commit a record comes from, and so whether a replica serving revision N
    /// has it.
    pub mod_revisions: BTreeMap<String, i64>,
    /// What a commit built from this listing compares against (the guard key's last change;
    /// 0 when no commit was ever made).
    pub(crate) guard: i64,
}

impl Listing {
    /// What a commit that returned `revision` leaves as the state to build the next commit
    /// on, for a change too large for one transaction (etcd caps operations per transaction).
    /// Its records are not known here; only the guard matters to [`etcd::EtcdStore::commit`].
    pub fn after_commit(revision: i64) -> Listing {
        Listing {
            revision,
            records: BTreeMap::new(),
            mod_revisions: BTreeMap::new(),
            guard: revision,
        }
    }

    pub fn get(&self, key: &str) -> Option<&[u8]> {
        self.records.get(key).map(Vec::as_slice)
    }
}

/// What one commit writes and removes, all or nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Write {
    pub puts: BTreeMap<String, Vec<u8>>,
    pub deletes: BTreeSet<String>,
    /// Every key under `KEY/` is removed, in one operation whatever their number (etcd caps
    /// the operations of a transaction, and a database may hold many certificates).
    pub deletes_under: BTreeSet<String>,
}

impl Write {
    pub fn put(&mut self, key: impl Into<String>, bytes: impl Into<Vec<u8>>) -> &mut Self {
        let key = key.into();
        self.deletes.remove(&key);
        self.puts.insert(key, bytes.into());
        self
    }

    pub fn delete(&mut self, key: impl Into<String>) -> &mut Self {
        let key = key.into();
        self.puts.remove(&key);
        self.deletes.insert(key);
        self
    }

    /// Removes every key under `key/` (not `key` itself, nor `keyX/...`).
    pub fn delete_under(&mut self, key: impl Into<String>) -> &mut Self {
        self.deletes_under.insert(key.into());
        self
    }

    pub fn is_empty(&self) -> bool {
        self.puts.is_empty() && self.deletes.is_empty() && self.deletes_under.is_empty()
    }

    /// How many operations the commit of this write takes (without the guard).
    pub fn ops(&self) -> usize {
        self.puts.len() + self.deletes.len() + self.deletes_under.len()
    }
}

/// One change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Put { key: String, bytes: Vec<u8> },
    Delete { key: String },
}

/// The changes of one committed revision, in commit order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub revision: i64,
    pub events: Vec<Event>,
}

/// A logical key must be a relative path of plain components, as the directory store would
/// make a file of it.
pub fn check_key(key: &str) -> Result<(), StoreError> {
    let ok = !key.is_empty()
        && !key.starts_with('/')
        && key
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != ".." && !c.contains('\0'));
    if ok {
        Ok(())
    } else {
        Err(StoreError::BadKey(key.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_plain_relative_paths() {
        for good in ["audit/1", "databases/app/ip-rules.yaml", "a"] {
            assert!(check_key(good).is_ok(), "{good}");
        }
        for bad in ["", "/abs", "a//b", "a/../b", "./a", "a/", "a\0b"] {
            assert!(check_key(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_write_keeps_the_last_word_on_each_key() {
        let mut w = Write::default();
        w.put("a", "1").delete("a").put("b", "2").put("b", "3");
        assert_eq!(w.deletes, BTreeSet::from(["a".to_string()]));
        assert_eq!(w.puts, BTreeMap::from([("b".to_string(), b"3".to_vec())]));
        w.put("a", "4");
        assert!(w.deletes.is_empty());
    }

    #[test]
    fn a_range_delete_is_one_operation() {
        let mut w = Write::default();
        assert!(w.is_empty());
        w.delete_under("databases/app");
        assert!(!w.is_empty());
        w.delete_under("secrets/databases/app").put("audit/1", "x");
        assert_eq!(w.ops(), 3);
    }
}
