//! The etcd store against a real etcd: reads at one revision, commits that lose when someone
//! else committed first (and then write nothing), a watch that replays every later change in
//! order, compaction and outages reported as such.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::etcd::{etcd_available_or_skip, EtcdServer};
use pgmtls::store::etcd::{EtcdConfig, EtcdStore};
use pgmtls::store::{Event, StoreError, Write};

async fn store(etcd: &EtcdServer) -> EtcdStore {
    EtcdStore::connect(EtcdConfig::new(vec![etcd.endpoint()], "/pgmtls"))
        .await
        .unwrap()
}

fn write(pairs: &[(&str, &str)]) -> Write {
    let mut w = Write::default();
    for (k, v) in pairs {
        w.put(*k, v.as_bytes());
    }
    w
}

#[tokio::test]
async fn a_commit_lands_whole_and_a_stale_one_is_refused_writing_nothing() {
    if !etcd_available_or_skip() {
        return;
    }
    let etcd = EtcdServer::start();
    let s = store(&etcd).await;
    let empty = s.load().await.unwrap();
    assert!(empty.records.is_empty());

    let first = write(&[
        ("databases/app/database.yaml", "listen: 127.0.0.1:6432\n"),
        ("databases/app/ip-rules.yaml", "rules: []\n"),
    ]);
    let rev = s.commit(&empty, &first).await.unwrap();
    let now = s.load().await.unwrap();
    assert_eq!(now.revision, rev);
    assert_eq!(
        now.get("databases/app/ip-rules.yaml"),
        Some(&b"rules: []\n"[..])
    );
    assert_eq!(now.records.len(), 2, "the guard key is not a record");

    // A writer still holding the empty listing lost the race: refused, nothing written.
    let late = write(&[("databases/other/database.yaml", "x")]);
    match s.commit(&empty, &late).await {
        Err(StoreError::Conflict { current }) => assert_eq!(current, rev),
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert_eq!(s.load().await.unwrap().records, now.records);

    // Deletes and puts of one commit land together.
    let mut change = Write::default();
    change
        .delete("databases/app/ip-rules.yaml")
        .put("databases/app/crl.pem", "crl");
    s.commit(&now, &change).await.unwrap();
    let after = s.load().await.unwrap();
    assert_eq!(
        after.records.keys().collect::<Vec<_>>(),
        ["databases/app/crl.pem", "databases/app/database.yaml"]
    );
}

#[tokio::test]
async fn of_writers_that_read_the_same_state_exactly_one_wins() {
    if !etcd_available_or_skip() {
        return;
    }
    let etcd = EtcdServer::start();
    let s = store(&etcd).await;
    let base = s.load().await.unwrap();
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let (s, base) = (s.clone(), base.clone());
            tokio::spawn(async move {
                s.commit(&base, &write(&[(&format!("audit/{i}"), "change")]))
                    .await
            })
        })
        .collect();
    let mut won = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => won += 1,
            Err(StoreError::Conflict { .. }) => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(won, 1);
    assert_eq!(s.load().await.unwrap().records.len(), 1);
}

#[tokio::test]
async fn a_write_that_bypassed_pgmtls_also_fails_the_guard() {
    if !etcd_available_or_skip() {
        return;
    }
    let etcd = EtcdServer::start();
    let s = store(&etcd).await;
    let read = s.load().await.unwrap();
    let out = etcd.etcdctl(&[
        "put",
        "/pgmtls/databases/app/ip-rules.yaml",
        "edited by hand",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = s
        .commit(
            &read,
            &write(&[("databases/app/ip-rules.yaml", "rules: []\n")]),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
    assert!(err.to_string().contains("retry"), "{err}");
    // Keys outside the prefix do not count.
    let read = s.load().await.unwrap();
    assert!(etcd.etcdctl(&["put", "/elsewhere/x", "1"]).status.success());
    s.commit(&read, &write(&[("audit/1", "ok")])).await.unwrap();
}

#[tokio::test]
async fn a_watch_replays_every_later_commit_in_order() {
    if !etcd_available_or_skip() {
        return;
    }
    let etcd = EtcdServer::start();
    let s = store(&etcd).await;
    let mut read = s.load().await.unwrap();
    let start = read.revision;
    let mut revisions = Vec::new();
    for i in 0..3 {
        let mut w = write(&[(&format!("databases/app/r{i}"), &i.to_string())]);
        if i == 2 {
            w.delete("databases/app/r0");
        }
        revisions.push(s.commit(&read, &w).await.unwrap());
        read = s.load().await.unwrap();
    }
    let mut watch = s.watch(start).await.unwrap();
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let batch = tokio::time::timeout(Duration::from_secs(10), watch.next())
            .await
            .expect("the watch delivers")
            .unwrap();
        seen.push(batch);
    }
    assert_eq!(
        seen.iter().map(|b| b.revision).collect::<Vec<_>>(),
        revisions
    );
    assert_eq!(
        seen[0].events,
        [Event::Put {
            key: "databases/app/r0".into(),
            bytes: b"0".to_vec()
        }]
    );
    assert!(seen[2].events.contains(&Event::Delete {
        key: "databases/app/r0".into()
    }));
    // A watch started at the newest revision waits for the next commit.
    let mut live = s.watch(read.revision).await.unwrap();
    let rev = s.commit(&read, &write(&[("audit/x", "1")])).await.unwrap();
    let batch = tokio::time::timeout(Duration::from_secs(10), live.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(batch.revision, rev);
}

#[tokio::test]
async fn compacted_history_and_an_outage_say_so() {
    if !etcd_available_or_skip() {
        return;
    }
    let mut etcd = EtcdServer::start();
    let s = store(&etcd).await;
    let first = s.load().await.unwrap();
    let mut read = first.clone();
    for i in 0..3 {
        s.commit(&read, &write(&[(&format!("audit/{i}"), "x")]))
            .await
            .unwrap();
        read = s.load().await.unwrap();
    }
    let out = etcd.etcdctl(&["compact", &read.revision.to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = match s.watch(first.revision).await {
        Ok(mut w) => tokio::time::timeout(Duration::from_secs(10), w.next())
            .await
            .unwrap()
            .unwrap_err(),
        Err(e) => e,
    };
    assert!(matches!(err, StoreError::Compacted { .. }), "{err}");

    etcd.stop();
    let err = tokio::time::timeout(Duration::from_secs(30), s.load())
        .await
        .expect("an outage is reported, not waited out")
        .unwrap_err();
    assert!(matches!(err, StoreError::Unavailable { .. }), "{err}");
    assert!(err.to_string().contains(&etcd.endpoint()), "{err}");
}

#[tokio::test]
async fn a_replica_reads_and_watches_only_the_databases_range() {
    if !etcd_available_or_skip() {
        return;
    }
    let etcd = EtcdServer::start();
    let s = store(&etcd).await;
    let empty = s.load().await.unwrap();
    let rev = s
        .commit(
            &empty,
            &write(&[
                ("databases/app/ip-rules.yaml", "rules: []\n"),
                ("secrets/databases/app/ca.key", "KEY"),
                ("audit/0000000001", "{}\n"),
            ]),
        )
        .await
        .unwrap();
    let part = s.load_under("databases/").await.unwrap();
    assert_eq!(part.revision, rev);
    assert_eq!(
        part.records.keys().collect::<Vec<_>>(),
        ["databases/app/ip-rules.yaml"]
    );
    let mut watch = s.watch_under(rev, "databases/").await.unwrap();
    let now = s.load().await.unwrap();
    let later = s
        .commit(
            &now,
            &write(&[
                ("secrets/databases/app/ca.key", "KEY2"),
                ("databases/app/ip-rules.yaml", "rules: [] # again\n"),
            ]),
        )
        .await
        .unwrap();
    let batch = tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(batch.revision, later);
    assert_eq!(
        batch.events,
        vec![Event::Put {
            key: "databases/app/ip-rules.yaml".into(),
            bytes: b"rules: [] # again\n".to_vec(),
        }]
    );
}
