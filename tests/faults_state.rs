//! Faults on the state and control side, each checked for "nothing lost": what the operator
//! or client sees, what the log and the audit log say, and that the state still loads and
//! later commands and sessions are fine.
//!
//! - a full disk under the state directory (a small tmpfs, as root),
//! - the CLI killed with SIGKILL at random points of its writes,
//! - the clock: a certificate expiring under a live session, one not valid yet.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cli_support;
mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cli_support::Env;
use common::admin::{scrape, status};
use common::clients::{
    connect_from, error_chain, pg_config, pg_connect_tls_over, tls_client_config, ConnTask,
};
use common::pg::{effective_uid, pg_available_or_skip, PgServer, APP_DB, APP_PASSWORD, APP_USER};
use common::proxy::ProxyProcess;
use rand::{Rng, SeedableRng};
use tokio_postgres::config::SslMode;
use tokio_postgres::Client;

const WAIT: Duration = Duration::from_secs(30);

/// A tmpfs of `size` mounted on a fresh temp dir, unmounted on drop.
struct Tmpfs {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::Builder::new()
            .prefix("pgmtls-tmpfs-")
            .tempdir()
            .unwrap();
        let path = dir.path().to_path_buf();
        let ok = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(&path)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount -t tmpfs on {}", path.display());
        Tmpfs { path, _dir: dir }
    }

    /// Writes 4 KiB files until the file system refuses; returns them, to free later.
    fn fill(&self) -> Vec<PathBuf> {
        let page = vec![0x55u8; 4096];
        let mut files = Vec::new();
        for n in 0.. {
            let p = self.path.join(format!("fill-{n}"));
            let mut f = std::fs::File::create(&p).unwrap();
            let r = f.write_all(&page).and_then(|_| f.sync_all());
            files.push(p);
            if let Err(e) = r {
                assert_eq!(e.raw_os_error(), Some(28), "{e}");
                break;
            }
        }
        files
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.path)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            // A process of this test still holds a file there: detach it all the same.
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
    }
}

/// The files `certificates download` wrote for one certificate.
struct Download {
    crt: PathBuf,
    key: PathBuf,
    root: PathBuf,
}

fn download(env: &Env, db: &str, id: &str, prefix: &str) -> Download {
    let dir = env.dir.path().join("client");
    env.run(&[
        "certificates",
        "download",
        db,
        "--id",
        id,
        "--prefix",
        prefix,
        "--dir",
        dir.to_str().unwrap(),
    ])
    .ok();
    Download {
        crt: dir.join(format!("{prefix}postgresql.crt")),
        key: dir.join(format!("{prefix}postgresql.key")),
        root: dir.join(format!("{prefix}root.crt")),
    }
}

/// The application's session through the proxy with the downloaded files.
async fn session(
    addr: std::net::SocketAddr,
    files: &Download,
) -> Result<(Client, ConnTask), tokio_postgres::Error> {
    let stream = connect_from("127.0.0.1".parse().unwrap(), addr)
        .await
        .unwrap();
    let mut cfg = pg_config(
        "127.0.0.1",
        addr.port(),
        APP_USER,
        APP_DB,
        Some(APP_PASSWORD),
    );
    cfg.ssl_mode(SslMode::Require);
    let tls = tls_client_config(&files.root, Some((&files.crt, &files.key)), false);
    pg_connect_tls_over(stream, &cfg, tls).await
}

async fn one(c: &Client) -> i32 {
    c.query_one("SELECT 1", &[]).await.unwrap().get(0)
}

/// `pgmtls.yaml` next to the test's home, serving `state`.
fn config_file(env: &Env, extra: &str) -> PathBuf {
    let path = env.dir.path().join("pgmtls.yaml");
    std::fs::write(
        &path,
        format!(
            "state_dir: {}\nadmin_listen: 127.0.0.1:0\nlog_format: json\n{extra}",
            env.state.display()
        ),
    )
    .unwrap();
    path
}

/// Every line of the audit log parses as JSON with the fields the loader wants.
fn audit_lines_parse(env: &Env) -> usize {
    let path = env.state.join("audit.log");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(
        text.is_empty() || text.ends_with('\n'),
        "audit log ends in a torn line: {:?}",
        text.lines().last()
    );
    pgmtls::state::parse_audit_log(&path, &text)
        .unwrap_or_else(|e| panic!("audit log does not parse: {e:?}"))
        .len()
}

fn rule_cidrs(env: &Env, db: &str) -> BTreeSet<String> {
    env.run(&["ip-rules", db, "--json"])
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["cidr"].as_str().unwrap().to_owned())
        .collect()
}

type Snapshot = std::collections::BTreeMap<PathBuf, (u32, Vec<u8>)>;

/// Every file and folder of the state directory (the fill files are next to it).
fn state_snapshot(env: &Env) -> Snapshot {
    env.snapshot()
}

/// The state directory is exactly as in `before`; names the paths that differ.
#[track_caller]
fn same_state(env: &Env, before: &Snapshot, what: &str) {
    let now = state_snapshot(env);
    let differ: Vec<_> = before
        .keys()
        .chain(now.keys())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .filter(|k| before.get(*k) != now.get(*k))
        .collect();
    assert!(differ.is_empty(), "{what} left a trace: {differ:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_every_change_cleanly_and_the_proxy_keeps_the_last_good_state() {
    if !pg_available_or_skip() {
        return;
    }
    if effective_uid() != 0 {
        eprintln!("skipping: mounting a tmpfs needs root");
        return;
    }
    let pg = PgServer::start();
    let fs = Tmpfs::mount("1m");
    let mut env = Env::new();
    env.state = fs.path.join("state");
    env.create_db("app", "127.0.0.1:0", &pg.addr().to_string());
    env.run(&["ip-rules", "create", "app", "--cidr", "127.0.0.1/32"])
        .ok();
    let first = env.run(&["certificates", "app", "--json"]).json()[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let files = download(&env, "app", &first, "app_");
    let config = config_file(&env, "reload_poll_interval: 1h\n");
    let proxy = ProxyProcess::spawn(&["--config", config.to_str().unwrap()]);
    let addr = proxy.addrs["app"];
    let (live, _live_conn) = session(addr, &files).await.unwrap();
    assert_eq!(one(&live).await, 1);
    let generation = status(proxy.admin()).await["generation"].as_u64().unwrap();

    // Bring the audit log's last block close to full, so that the next line fits only in
    // part once the disk is full: a download's note is the one write that reaches the audit
    // log without a state file written first.
    let audit = env.state.join("audit.log");
    let size = || std::fs::metadata(&audit).unwrap().len();
    let before = size();
    download(&env, "app", &first, "p00_");
    let line = size() - before;
    for n in 1..100 {
        let room = 4096 - size() % 4096;
        if room < line - 16 {
            break;
        }
        download(&env, "app", &first, &format!("p{n:02}_"));
    }
    let room = 4096 - size() % 4096;
    assert!(room > 0 && room < line, "room {room}, line {line}");
    let audit_before = audit_lines_parse(&env);

    let fill = fs.fill();
    let snap = state_snapshot(&env);
    let listen2 = cli_support::free_listen();
    let upstream = pg.addr().to_string();
    let changes: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["ip-rules", "create", "app", "--cidr", "10.1.0.0/16"],
            "databases/app/ip-rules.yaml",
        ),
        (
            vec!["ip-rules", "delete", "app", "--cidr", "127.0.0.1/32"],
            "databases/app/ip-rules.yaml",
        ),
        (
            vec!["certificates", "create", "app"],
            "databases/app/certificates/",
        ),
        (
            vec!["certificates", "revoke", "app", "--id", &first],
            "databases/app/crl.pem",
        ),
        (
            vec![
                "mtls",
                "create",
                "app2",
                "--listen",
                &listen2,
                "--upstream",
                &upstream,
                "--confirm",
                "app2",
            ],
            "databases/app2/",
        ),
    ];
    for (args, file) in &changes {
        let out = env.run(args);
        let line = out.error();
        eprintln!("full disk: `pgmtls {}`: {line}", args.join(" "));
        assert!(
            line.contains("No space left on device"),
            "`{}`: {line}",
            args.join(" ")
        );
        let named = format!("{}/{file}", env.state.display());
        assert!(
            line.contains(&named),
            "`{}` names {named}: {line}",
            args.join(" ")
        );
        // The file as it would have appeared, not a staged dot-folder; the reason once.
        assert!(!line.contains("/."), "names a temporary path: {line}");
        assert_eq!(line.matches("No space left on device").count(), 1, "{line}");
        same_state(&env, &snap, &format!("`{}`", args.join(" ")));
    }
    // A download still hands out its files, warns that it could not be recorded, and leaves
    // no torn line behind.
    let dir = env.dir.path().join("client");
    let out = env.run(&[
        "certificates",
        "download",
        "app",
        "--id",
        &first,
        "--prefix",
        "full_",
        "--dir",
        dir.to_str().unwrap(),
    ]);
    out.ok();
    eprintln!("full disk: download: {}", out.stderr.trim());
    assert!(
        out.stderr.contains(&format!(
            "not recorded in the audit log: cannot write {}: No space left on device",
            audit.display()
        )),
        "{}",
        out.stderr
    );
    assert_eq!(audit_lines_parse(&env), audit_before);
    same_state(&env, &snap, "the failed note");

    // The state still loads: the CLI lists it, the proxy's loader takes it, and the proxy
    // keeps serving it without a new generation.
    assert_eq!(
        rule_cidrs(&env, "app"),
        BTreeSet::from(["127.0.0.1/32".into()])
    );
    assert_eq!(
        env.run(&["certificates", "app", "--json"])
            .json()
            .as_array()
            .unwrap()
            .len(),
        1
    );
    env.run(&["databases"]).ok();
    pgmtls::state::StateDir::new(&env.state).load_all().unwrap();
    proxy.signal("HUP");
    proxy.wait_for_log(WAIT, |v| {
        v["message"] == "configuration unchanged" && v["trigger"] == "sighup"
    });
    let st = status(proxy.admin()).await;
    assert_eq!(st["generation"].as_u64(), Some(generation), "{st:#}");
    assert_eq!(one(&live).await, 1, "the live session is untouched");
    let (fresh, _c) = session(addr, &files).await.unwrap();
    assert_eq!(one(&fresh).await, 1, "a new client still connects");

    // Space back: the same commands work again, and the log records each.
    for f in &fill {
        std::fs::remove_file(f).unwrap();
    }
    env.run(&["ip-rules", "create", "app", "--cidr", "10.1.0.0/16"])
        .ok();
    env.run(&["certificates", "create", "app"]).ok();
    download(&env, "app", &first, "after_");
    assert_eq!(audit_lines_parse(&env), audit_before + 3);
    proxy.wait_for_log(WAIT, |v| {
        v["message"] == "configuration reloaded"
            && v["generation"].as_u64().is_some_and(|g| g > generation)
    });
    let (again, _c) = session(addr, &files).await.unwrap();
    assert_eq!(one(&again).await, 1);
    assert_eq!(one(&live).await, 1);
    assert!(rule_cidrs(&env, "app").contains("10.1.0.0/16"));
}

/// Rules (by CIDR) and certificate ids of `db` as the proxy's loader reads the directory.
fn loaded(state: &Path, db: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let all = pgmtls::state::StateDir::new(state)
        .load_all()
        .unwrap_or_else(|e| panic!("the state does not load: {e:?}"));
    let d = all
        .iter()
        .find(|d| d.name == db)
        .expect("the database loads");
    (
        d.rules.iter().map(|r| r.cidr.to_string()).collect(),
        d.certificates.iter().map(|c| c.id.clone()).collect(),
    )
}

fn leftovers(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if name.contains(".tmp-") || name.contains(".new-") {
            out.push(p.clone());
        }
        if p.is_dir() {
            leftovers(&p, out);
        }
    }
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name}={v:?} is not a number"))
        })
        .unwrap_or(default)
}

/// `PGMTLS_KILLS` (default 1000) runs of the CLI, each killed with SIGKILL after a random
/// delay; `PGMTLS_KILL_SEED` replays a run (the seed is printed either way).
#[test]
fn the_cli_killed_at_random_points_leaves_the_old_or_the_new_state() {
    let kills = env_number("PGMTLS_KILLS", 1000);
    let seed = env_number(
        "PGMTLS_KILL_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    );
    eprintln!("kill test: PGMTLS_KILLS={kills} PGMTLS_KILL_SEED={seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let env = Env::new();
    // Nothing listens on the upstream: only the files matter here.
    env.create_db("app", "127.0.0.1:0", "127.0.0.1:9");
    env.run(&["ip-rules", "create", "app", "--cidr", "127.0.0.1/32"])
        .ok();
    let toggled = "10.9.0.0/16";

    // The delays span a whole run: from before it starts to after it is done.
    let t = Instant::now();
    for _ in 0..3 {
        env.run(&["ip-rules", "create", "app", "--cidr", toggled])
            .ok();
        env.run(&["ip-rules", "delete", "app", "--cidr", toggled])
            .ok();
    }
    env.run(&["certificates", "create", "app"]).ok();
    let max_delay = t.elapsed().as_micros() as u64 / 7 * 3 / 2;
    eprintln!(
        "kill test: one run takes ~{} us; delays 0..{max_delay} us",
        max_delay * 2 / 3
    );

    let audit = env.state.join("audit.log");
    let journal = env.state.join(pgmtls::state::JOURNAL);
    let audit_start = audit_lines_parse(&env);
    let next_writer = pgmtls::control::Control::new(pgmtls::state::StateDir::new(&env.state));
    let (mut old, mut new, mut completed_later) = (0u64, 0u64, 0u64);
    let started = Instant::now();
    for i in 0..kills {
        let (rules, certs) = loaded(&env.state, "app");
        let audit_before = audit_lines_parse(&env);
        let create_cert = i % 4 == 3;
        let args: Vec<&str> = if create_cert {
            vec!["certificates", "create", "app"]
        } else if rules.contains(toggled) {
            vec!["ip-rules", "delete", "app", "--cidr", toggled]
        } else {
            vec!["ip-rules", "create", "app", "--cidr", toggled]
        };
        let mut child = env
            .command(&args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let delay = rng.random_range(0..=max_delay);
        // The delay is the fault being injected, not a wait for readiness.
        std::thread::sleep(Duration::from_micros(delay));
        let _ = child.kill();
        let exit = child.wait().unwrap();
        // What the proxy may load now, before any writer ran again, and then what the next
        // writer leaves once it has completed a journal the killed run left: both are the
        // old or the new state, never a mix.
        let check = |rules_after: &BTreeSet<String>, certs_after: &BTreeSet<String>| {
            if create_cert {
                assert_eq!(
                    rules_after, &rules,
                    "run {i}: certificates create touched the rules"
                );
                let added: Vec<_> = certs_after.difference(&certs).collect();
                assert!(
                    certs.is_subset(certs_after),
                    "run {i}: a certificate vanished"
                );
                assert!(added.len() <= 1, "run {i}: {added:?}");
                added.len() == 1
            } else {
                assert_eq!(
                    certs_after, &certs,
                    "run {i}: ip-rules touched the certificates"
                );
                let mut flipped = rules.clone();
                if !flipped.remove(toggled) {
                    flipped.insert(toggled.to_owned());
                }
                assert!(
                    rules_after == &rules || rules_after == &flipped,
                    "run {i} (`{}`, killed after {delay} us, seed {seed}): {rules_after:?} is \
                     neither {rules:?} nor {flipped:?}",
                    args.join(" ")
                );
                rules_after == &flipped
            }
        };
        let (rules_after, certs_after) = loaded(&env.state, "app");
        check(&rules_after, &certs_after);
        if journal.exists() {
            completed_later += 1;
            // The next writer: any change starts by completing the journal.
            drop(next_writer.begin(None, "kill-test").unwrap());
            assert!(!journal.exists(), "run {i}: the journal was not completed");
        }
        let (rules_after, certs_after) = loaded(&env.state, "app");
        let changed = check(&rules_after, &certs_after);
        // Nothing is lost: a change that became visible has its audit line, and a run
        // that changed nothing left none. Every line parses after every kill.
        let audit_after = audit_lines_parse(&env);
        if changed {
            new += 1;
            assert_eq!(
                audit_after,
                audit_before + 1,
                "run {i} (`{}`, killed after {delay} us, seed {seed}): a change without its \
                 audit line",
                args.join(" ")
            );
        } else {
            old += 1;
            assert_eq!(
                audit_after, audit_before,
                "run {i}: an audit line for no change"
            );
        }
        if exit.success() {
            assert!(changed, "run {i}: exit 0 without the change");
        }
    }
    let elapsed = started.elapsed();
    let mut left = Vec::new();
    leftovers(&env.state, &mut left);
    eprintln!(
        "kill test: {kills} kills in {elapsed:?} (seed {seed}): {old} left the old state, {new} \
         the new one, each with its audit line; {completed_later} left a journal that the next \
         writer completed; {} temporary files left at the end of the loop (swept by each next \
         writer)",
        left.len()
    );
    assert!(
        old > 0 && new > 0,
        "the delays never hit both sides: {old} old, {new} new"
    );
    // Leftover temp files never stop a later command, the loader skips them, and the next
    // writer removes them.
    env.run(&["ip-rules", "create", "app", "--cidr", "10.10.0.0/16"])
        .ok();
    env.run(&["certificates", "create", "app"]).ok();
    env.run(&["databases"]).ok();
    let (rules, _) = loaded(&env.state, "app");
    assert!(rules.contains("10.10.0.0/16"));
    // Nothing is lost: once a writer has run, every change that became visible has its
    // audit line (the two commands above add one each), no line is there twice, and no
    // line stands for a change that did not happen.
    assert!(!journal.exists(), "a journal left after a complete run");
    // ...and what killed runs staged (private keys of certificates that never came to be
    // among it) is gone too: every writer sweeps it first.
    let mut left = Vec::new();
    leftovers(&env.state, &mut left);
    assert!(left.is_empty(), "left after a complete run: {left:?}");
    let text = std::fs::read_to_string(&audit).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let unique: std::collections::HashSet<&str> = lines.iter().copied().collect();
    assert_eq!(unique.len(), lines.len(), "an audit line written twice");
    assert_eq!(
        audit_lines_parse(&env) as u64,
        audit_start as u64 + new + 2,
        "{new} changes were made"
    );
}

/// A proxy on `orders` with the enforcement poll every second.
fn start_polling(
    pki: &common::pki::TestPki,
    pg: &PgServer,
) -> (common::state::TestState, ProxyProcess) {
    let state = common::state::TestState::new("");
    std::fs::write(
        &state.config,
        "state_dir: state\nadmin_listen: 127.0.0.1:0\nreload_poll_interval: 1s\n",
    )
    .unwrap();
    state.add_database(
        "orders",
        pki,
        "127.0.0.1:0",
        pg.addr(),
        &[("lo", "127.0.0.1/32")],
    );
    let proxy = ProxyProcess::with_config(&state.config);
    (state, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_expiring_under_a_live_session_is_cut_by_the_poll_and_told_so() {
    if !pg_available_or_skip() {
        return;
    }
    let pg = PgServer::start();
    let pki = common::pki::TestPki::new();
    let (_state, proxy) = start_polling(&pki, &pg);
    let now = time::OffsetDateTime::now_utc();
    let not_after = now + time::Duration::seconds(10);
    let short = pki.issue_client("short-lived", now - time::Duration::hours(1), not_after);
    let (c, conn) = common::clients::session_from("127.0.0.1", &pki, &short, &proxy)
        .await
        .unwrap();
    let (other, _other_conn) =
        common::clients::session_from("127.0.0.1", &pki, &pki.client, &proxy)
            .await
            .unwrap();
    assert_eq!(one(&c).await, 1);

    let line = proxy.wait_for_log(WAIT, |v| {
        v["message"] == "connection closed" && v["error_kind"] == "revoked_live"
    });
    let late = time::OffsetDateTime::now_utc() - not_after;
    eprintln!("expired certificate: session cut {late} after its notAfter (poll every 1s)");
    assert_eq!(line["detail"], "client certificate expired", "{line}");
    assert_eq!(line["outcome"], "cut");
    assert_eq!(line["told_client"], true, "{line}");
    assert_eq!(
        line["client_serial"],
        common::state::serial_of(&short).as_str()
    );
    assert!(
        late >= time::Duration::ZERO && late < time::Duration::seconds(10),
        "{late}"
    );

    let e = tokio::time::timeout(WAIT, conn)
        .await
        .expect("the cut session's connection ends")
        .unwrap()
        .expect_err("the session was cut, not closed by us");
    let db = e
        .as_db_error()
        .unwrap_or_else(|| panic!("not a server error: {e:?}"));
    assert_eq!(db.code(), &tokio_postgres::error::SqlState::ADMIN_SHUTDOWN);
    assert_eq!(
        db.message(),
        "terminating connection because the client certificate expired"
    );
    assert!(c.simple_query("SELECT 1").await.is_err());
    assert_eq!(
        one(&other).await,
        1,
        "a session with a valid certificate is untouched"
    );

    let m = scrape(proxy.admin()).await;
    assert_eq!(
        m.value(
            "pgmtls_connections_refused_total",
            r#"database="orders",reason="revoked_live""#
        ),
        1.0
    );
    // And it cannot come back.
    let again = common::clients::session_from("127.0.0.1", &pki, &short, &proxy).await;
    assert!(again.is_err());
    proxy.wait_for_refusal("client_cert_expired");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_not_valid_yet_is_refused_with_its_own_reason() {
    if !pg_available_or_skip() {
        return;
    }
    let pg = PgServer::start();
    let pki = common::pki::TestPki::new();
    let (_state, proxy) = start_polling(&pki, &pg);
    let now = time::OffsetDateTime::now_utc();
    let early = pki.issue_client(
        "from-tomorrow",
        now + time::Duration::days(1),
        now + time::Duration::days(30),
    );
    let e = common::clients::session_from("127.0.0.1", &pki, &early, &proxy)
        .await
        .expect_err("a certificate not valid yet connected");
    eprintln!("not yet valid: client sees {}", error_chain(&e));
    let line = proxy.wait_for_refusal("client_cert_not_yet_valid");
    assert_eq!(line["outcome"], "refused", "{line}");
    let m = scrape(proxy.admin()).await;
    assert_eq!(
        m.value(
            "pgmtls_connections_refused_total",
            r#"database="orders",reason="client_cert_not_yet_valid""#
        ),
        1.0
    );
    assert_eq!(
        m.value(
            "pgmtls_connections_refused_total",
            r#"database="orders",reason="client_cert_expired""#
        ),
        0.0
    );
    // The same proxy still serves a valid certificate.
    let (c, _conn) = common::clients::session_from("127.0.0.1", &pki, &pki.client, &proxy)
        .await
        .unwrap();
    assert_eq!(one(&c).await, 1);
}
