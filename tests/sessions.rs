//! Real clients through pgmtls to a real PostgreSQL: queries, large results, COPY both ways,
//! transactions, prepared statements, and many concurrent sessions without cross-talk.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::clients::{pg_connect_tls, tls_client_config, Psql, SslNegotiation};
use common::pg::{pg_available_or_skip, PgServer, APP_DB, APP_PASSWORD, APP_USER, TRUST_USER};
use common::pki::TestPki;
use common::proxy::ProxyProcess;
use futures_util::{SinkExt, StreamExt};

const HOST: &str = "127.0.0.1";

fn setup() -> Option<(PgServer, TestPki, ProxyProcess)> {
    if !pg_available_or_skip() {
        return None;
    }
    let pg = PgServer::start();
    let pki = TestPki::new();
    let proxy = ProxyProcess::quick(&pki, pg.addr(), &["127.0.0.1/32"], &[]);
    Some((pg, pki, proxy))
}

async fn client(
    pki: &TestPki,
    proxy: &ProxyProcess,
) -> (
    tokio_postgres::Client,
    tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
) {
    let tls = tls_client_config(
        &pki.ca.cert_path,
        Some((&pki.client.chain_path, &pki.client.key_path)),
        false,
    );
    pg_connect_tls(
        HOST,
        proxy.addr().port(),
        APP_USER,
        APP_DB,
        Some(APP_PASSWORD),
        tls,
        SslNegotiation::Postgres,
    )
    .await
    .expect("connect through pgmtls")
}

#[tokio::test]
async fn psql_with_verify_ca_runs_a_query_and_the_close_is_logged() {
    let Some((pg, pki, proxy)) = setup() else {
        return;
    };
    let out = Psql::new(pg.psql_path(), HOST, proxy.addr().port(), APP_USER, APP_DB)
        .verify_ca(
            &pki.ca.cert_path,
            Some((&pki.client.chain_path, &pki.client.key_path)),
        )
        .password(APP_PASSWORD)
        .run_async("SELECT current_user || ':' || 40 + 2")
        .await;
    assert_eq!(out.expect_ok().trim(), "app:42");
    let line = proxy.wait_for_log(Duration::from_secs(10), |v| {
        v["message"] == "connection closed" && v["outcome"] == "closed"
    });
    assert_eq!(line["pg_user"], "\"app\"");
    assert_eq!(line["client_cn"], "\"app-client\"");
    assert_eq!(line["rule_id"], "allow-1");
    assert_eq!(line["tls_version"], "TLSv1.3");
    assert_eq!(line["negotiation"], "sslrequest");
    assert!(line["bytes_to_client"].as_u64().unwrap() > 0);
    assert!(line["bytes_to_upstream"].as_u64().unwrap() > 0);
}

#[tokio::test]
async fn queries_transactions_and_prepared_statements_work() {
    let Some((_pg, pki, proxy)) = setup() else {
        return;
    };
    let (mut c, _conn) = client(&pki, &proxy).await;
    c.batch_execute("CREATE TABLE t (id int primary key, v text)")
        .await
        .unwrap();
    let stmt = c.prepare("INSERT INTO t VALUES ($1, $2)").await.unwrap();
    for i in 0..20 {
        c.execute(&stmt, &[&i, &format!("v{i}")]).await.unwrap();
    }
    let tx = c.transaction().await.unwrap();
    tx.execute("DELETE FROM t WHERE id < 10", &[])
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    let tx = c.transaction().await.unwrap();
    tx.execute("DELETE FROM t WHERE id >= 15", &[])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let sel = c.prepare("SELECT v FROM t WHERE id = $1").await.unwrap();
    let row = c.query_one(&sel, &[&7i32]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "v7");
    let n: i64 = c
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 15);
}

#[tokio::test]
async fn a_50_mb_result_arrives_intact() {
    let Some((_pg, pki, proxy)) = setup() else {
        return;
    };
    let (c, _conn) = client(&pki, &proxy).await;
    // 50,000 rows of 1,000 bytes, each row distinct so reordering or loss would show.
    let rows = c
        .query(
            "SELECT i, lpad(i::text, 1000, md5(i::text)) FROM generate_series(1, 50000) i",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 50_000);
    let mut total = 0usize;
    for (n, row) in rows.iter().enumerate() {
        let i: i32 = row.get(0);
        assert_eq!(i as usize, n + 1);
        let s: String = row.get(1);
        assert_eq!(s.len(), 1000);
        assert!(s.ends_with(&format!("{i}")));
        total += s.len();
    }
    assert_eq!(total, 50_000_000);
}

#[tokio::test]
async fn copy_in_and_out_round_trips() {
    let Some((_pg, pki, proxy)) = setup() else {
        return;
    };
    let (c, _conn) = client(&pki, &proxy).await;
    c.batch_execute("CREATE TABLE c (id int, v text)")
        .await
        .unwrap();
    let mut input = String::new();
    for i in 0..100_000 {
        input.push_str(&format!("{i}\trow-{i}\n"));
    }
    let sink = c.copy_in("COPY c FROM STDIN").await.unwrap();
    futures_util::pin_mut!(sink);
    for chunk in input.as_bytes().chunks(64 * 1024) {
        sink.send(bytes::Bytes::copy_from_slice(chunk))
            .await
            .unwrap();
    }
    assert_eq!(sink.finish().await.unwrap(), 100_000);
    let stream = c
        .copy_out("COPY (SELECT * FROM c ORDER BY id) TO STDOUT")
        .await
        .unwrap();
    futures_util::pin_mut!(stream);
    let mut output = Vec::new();
    while let Some(chunk) = stream.next().await {
        output.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(String::from_utf8(output).unwrap(), input);
}

#[tokio::test]
async fn two_hundred_concurrent_sessions_see_only_their_own_results() {
    let Some((_pg, pki, proxy)) = setup() else {
        return;
    };
    let mut tasks = Vec::new();
    for n in 0..200i32 {
        let tls = tls_client_config(
            &pki.ca.cert_path,
            Some((&pki.client.chain_path, &pki.client.key_path)),
            false,
        );
        let port = proxy.addr().port();
        tasks.push(tokio::spawn(async move {
            // The trusted role: 200 SCRAM exchanges (PBKDF2 on both ends, in a debug build, on
            // this test's one thread) can outlast auth_timeout on a loaded machine, and
            // authentication is not what this test is about.
            let (c, _conn) = pg_connect_tls(
                HOST,
                port,
                TRUST_USER,
                APP_DB,
                None,
                tls,
                SslNegotiation::Postgres,
            )
            .await
            .expect("connect");
            for k in 0..10i32 {
                let row = c
                    .query_one(
                        "SELECT $1::int4 * 1000 + $2::int4, pg_backend_pid()",
                        &[&n, &k],
                    )
                    .await
                    .unwrap();
                assert_eq!(row.get::<_, i32>(0), n * 1000 + k);
            }
            let pid: i32 = c
                .query_one("SELECT pg_backend_pid()", &[])
                .await
                .unwrap()
                .get(0);
            pid
        }));
    }
    let mut pids = std::collections::HashSet::new();
    for t in tasks {
        pids.insert(t.await.unwrap());
    }
    // Every session had its own backend: nothing was pooled or crossed.
    assert_eq!(pids.len(), 200);
}
