//! Soak: one real `pgmtls serve` process (the release binary) in front of a stand-in upstream
//! (tests/common/churn.rs: startup, AuthenticationOk, ParameterStatus, BackendKeyData,
//! ReadyForQuery, one simple query, Terminate), driven by concurrent clients that each run full
//! mutual-TLS sessions (connect, handshake with a client certificate, startup, `SELECT 1`,
//! Terminate, close). Then `--idle` sessions are opened and held for `--idle-secs`, then each
//! runs one query and closes.
//!
//! Every `--interval` seconds the proxy's RSS (`VmRSS`) and open fds (`/proc/PID/fd`) are
//! sampled. At the end it prints sessions/s (with the load average: the machine may be shared),
//! RSS after the run vs after the first 100,000 sessions, fds at the end vs the baseline, and
//! error counts; the series goes to `OUT/soak.csv` and a plot to `OUT/soak.svg`.
//!
//!   cargo bench --bench soak -- [--sessions N] [--idle N] [--idle-secs S] [--workers N]
//!                               [--churn-secs S] [--proxy-threads N] [--interval S] [--out DIR]
//!
//! `--churn-secs` ends the churn early (no session starts after it) when time is short; the
//! summary then says how many sessions ran.
//!
//! The open-file limit of this process is raised (setrlimit, so root may raise the hard limit
//! too) before the proxy is spawned, and the proxy inherits it: `--idle` sessions take two fds
//! each in the proxy (client and upstream socket) and two here.

#![allow(clippy::expect_used, clippy::unwrap_used)] // set-up failures in a bench are bugs

#[path = "../tests/common/mod.rs"]
mod common;

use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::admin::{scrape, Scrape};
use common::churn::{
    churn, fd_limits, open_fds, process_limits, rss_kib, Errors, FakeUpstream, Session,
    SessionClient,
};
use common::pki::TestPki;
use common::proxy::path;

const BIN: &str = env!("CARGO_BIN_EXE_pgmtls");
/// RSS after the whole run is compared with RSS after this many sessions.
const EARLY: u64 = 100_000;

struct Args {
    sessions: u64,
    idle: u64,
    idle_secs: u64,
    /// Stop starting churn sessions after this long, however many have run.
    churn_secs: Option<u64>,
    workers: usize,
    /// The proxy's `--worker-threads`; `None` leaves its default.
    proxy_threads: Option<u64>,
    interval: u64,
    out: PathBuf,
}

fn args() -> Args {
    let mut a = Args {
        sessions: 1_000_000,
        idle: 10_000,
        idle_secs: 600,
        churn_secs: None,
        workers: 8,
        proxy_threads: None,
        interval: 10,
        out: std::env::temp_dir().join("pgmtls-soak"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        let num = |v: String| -> u64 { v.parse().unwrap_or_else(|_| panic!("{flag}: {v}")) };
        match flag.as_str() {
            "--sessions" => a.sessions = num(value()),
            "--idle" => a.idle = num(value()),
            "--idle-secs" => a.idle_secs = num(value()),
            "--churn-secs" => a.churn_secs = Some(num(value())),
            "--workers" => a.workers = num(value()) as usize,
            "--proxy-threads" => a.proxy_threads = Some(num(value())),
            "--interval" => a.interval = num(value()).max(1),
            "--out" => a.out = PathBuf::from(value()),
            // cargo bench passes --bench to every harness = false target.
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

/// One sample of the series.
#[derive(Clone)]
struct Sample {
    t: f64,
    phase: &'static str,
    sessions: u64,
    idle_open: u64,
    rss_kib: u64,
    fds: u64,
    errors: u64,
}

struct Proxy {
    child: Child,
    addr: SocketAddr,
    admin: SocketAddr,
    /// Log lines at WARN or ERROR, and the total line count (stderr is read and counted,
    /// not stored: a million `connection closed` lines would not fit).
    warnings: Arc<Mutex<Vec<String>>>,
    lines: Arc<AtomicU64>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_proxy(
    pki: &TestPki,
    upstream: SocketAddr,
    max_connections: u64,
    threads: Option<u64>,
) -> Proxy {
    let up = upstream.to_string();
    let max = max_connections.to_string();
    // 0 is the proxy's own default (one fewer than the CPUs).
    let threads = threads.unwrap_or(0).to_string();
    let mut child = Command::new(BIN)
        .args(["--log-format", "json", "serve", "--listen", "127.0.0.1:0"])
        .args(["--upstream", &up])
        .args(["--cert", path(&pki.server.chain_path)])
        .args(["--key", path(&pki.server.key_path)])
        .args(["--client-ca", path(&pki.ca.cert_path)])
        .args(["--allow", "127.0.0.1/32", "--admin-listen", "127.0.0.1:0"])
        .args(["--max-connections", &max, "--worker-threads", &threads])
        .env("PGMTLS_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn pgmtls");
    let stderr = child.stderr.take().unwrap();
    let warnings = Arc::new(Mutex::new(Vec::new()));
    let lines = Arc::new(AtomicU64::new(0));
    {
        let (warnings, lines) = (warnings.clone(), lines.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                lines.fetch_add(1, Ordering::Relaxed);
                if line.contains("\"level\":\"WARN\"") || line.contains("\"level\":\"ERROR\"") {
                    let mut w = warnings.lock().unwrap();
                    if w.len() < 1000 {
                        w.push(line);
                    }
                }
            }
        });
    }
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let (mut addr, mut admin) = (None, None);
    let mut line = String::new();
    while stdout.read_line(&mut line).unwrap() > 0 && line.trim() != "pgmtls: ready" {
        let l = line.trim();
        if let Some((_, a)) = l.split_once("pgmtls: listening database=default addr=") {
            addr = Some(a.parse().unwrap());
        }
        if let Some(a) = l.strip_prefix("pgmtls: admin addr=") {
            admin = Some(a.parse().unwrap());
        }
        line.clear();
    }
    // Keep draining stdout so the proxy never blocks on it.
    std::thread::spawn(move || for _ in stdout.lines() {});
    Proxy {
        child,
        addr: addr.expect("pgmtls printed its listener"),
        admin: admin.expect("pgmtls printed its admin address"),
        warnings,
        lines,
    }
}

fn raise_fd_limit(want: u64) {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let cur = getrlimit(Resource::Nofile);
    if cur.current.is_some_and(|c| c >= want) {
        return;
    }
    let new = Rlimit {
        current: Some(want),
        maximum: Some(want.max(cur.maximum.unwrap_or(0))),
    };
    if let Err(e) = setrlimit(Resource::Nofile, new) {
        // Raising the hard limit needs CAP_SYS_RESOURCE (a container may not grant it even
        // to root); then both this process and the proxy stop at the hard limit, about
        // (limit - 100) / 2 idle sessions.
        eprintln!(
            "could not raise RLIMIT_NOFILE to {want} (hard limit {:?}): {e}; --idle fits only \
             if twice it stays under the hard limit",
            cur.maximum
        );
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn main() {
    let a = args();
    raise_fd_limit(a.idle * 2 + 20_000);
    std::fs::create_dir_all(&a.out).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(a));
}

fn refused_total(m: &Scrape) -> f64 {
    m.samples
        .iter()
        .filter(|(k, _)| k.starts_with("pgmtls_connections_refused_total{"))
        .map(|(_, v)| v)
        .sum()
}

async fn wait_sessions_zero(admin: SocketAddr) -> Scrape {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let m = scrape(admin).await;
        if m.value("pgmtls_sessions_active", "database=\"default\"") == 0.0 {
            return m;
        }
        assert!(
            Instant::now() < deadline,
            "sessions still active after 120 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn run(a: Args) {
    let pki = TestPki::new();
    let upstream = FakeUpstream::start().await;
    let proxy = spawn_proxy(&pki, upstream.addr, a.idle + 1000, a.proxy_threads);
    let pid = proxy.child.id();
    let (fd_soft, fd_hard) = fd_limits(pid).unwrap();
    let (proc_soft, proc_hard) = process_limits(pid).unwrap();
    println!(
        "pgmtls pid {pid}: open files limit {fd_soft} (hard {fd_hard}), processes {proc_soft} \
         (hard {proc_hard}); {} sessions on {} workers, then {} idle for {} s; load average {}",
        a.sessions,
        a.workers,
        a.idle,
        a.idle_secs,
        load_average()
    );
    let client = SessionClient::new(&pki, &pki.client, proxy.addr);
    let done = Arc::new(AtomicU64::new(0));
    let idle_open = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(Errors::default());

    // Warm-up, so what the proxy opens once and keeps is in the baseline.
    churn(&client, 20, 2, None, &Arc::new(AtomicU64::new(0)), &errors).await;
    wait_sessions_zero(proxy.admin).await;
    let baseline_fds = open_fds(pid).unwrap();
    let baseline_rss = rss_kib(pid).unwrap();

    // The sampler.
    let series: Arc<Mutex<Vec<Sample>>> = Arc::default();
    let phase: Arc<Mutex<&'static str>> = Arc::new(Mutex::new("churn"));
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let take = {
        let (done, idle_open, errors, phase) = (
            done.clone(),
            idle_open.clone(),
            errors.clone(),
            phase.clone(),
        );
        move || Sample {
            t: t0.elapsed().as_secs_f64(),
            phase: *phase.lock().unwrap(),
            sessions: done.load(Ordering::SeqCst),
            idle_open: idle_open.load(Ordering::SeqCst),
            rss_kib: rss_kib(pid).unwrap_or(0),
            fds: open_fds(pid).unwrap_or(0),
            errors: errors.total(),
        }
    };
    series.lock().unwrap().push(take());
    let sampler = {
        let (series, stop, take) = (series.clone(), stop.clone(), take.clone());
        let interval = Duration::from_secs(a.interval);
        tokio::spawn(async move {
            let mut tick =
                tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
            let mut last = (0.0, 0u64);
            while !stop.load(Ordering::SeqCst) {
                tick.tick().await;
                let s = take();
                let rate = (s.sessions - last.1) as f64 / (s.t - last.0);
                last = (s.t, s.sessions);
                println!(
                    "t={:>6.0}s {:<6} sessions={:>8} ({rate:>5.0}/s) idle={:>5} rss={:>7} KiB \
                     fds={:>6} errors={} load={}",
                    s.t,
                    s.phase,
                    s.sessions,
                    s.idle_open,
                    s.rss_kib,
                    s.fds,
                    s.errors,
                    load_average()
                );
                series.lock().unwrap().push(s);
            }
        })
    };

    // Phase 1: churn, with a settled reading after the first EARLY sessions.
    let first = a.sessions.min(EARLY);
    let load_start = load_average();
    let until = a
        .churn_secs
        .map(|s| Instant::now() + Duration::from_secs(s));
    churn(&client, first, a.workers, until, &done, &errors).await;
    wait_sessions_zero(proxy.admin).await;
    let first = done.load(Ordering::SeqCst);
    let early_rss = rss_kib(pid).unwrap();
    let early_fds = open_fds(pid).unwrap();
    churn(
        &client,
        a.sessions - first,
        a.workers,
        until,
        &done,
        &errors,
    )
    .await;
    let churn_secs = t0.elapsed().as_secs_f64();
    let ran = done.load(Ordering::SeqCst);
    let load_churn = load_average();
    let after_churn = wait_sessions_zero(proxy.admin).await;
    let end_rss = rss_kib(pid).unwrap();
    let end_churn_fds = open_fds(pid).unwrap();
    println!(
        "churn: {} sessions in {churn_secs:.0} s = {:.0} sessions/s (load average {load_start} at \
         the start, {load_churn} at the end); RSS {baseline_rss} KiB at the start, {early_rss} \
         KiB after {first}, {end_rss} KiB after {}; fds {baseline_fds} / {early_fds} / \
         {end_churn_fds}",
        ran,
        ran as f64 / churn_secs,
        ran
    );

    // Phase 2: idle sessions, opened `workers` at a time, held, then one query each and close.
    *phase.lock().unwrap() = "idle";
    let t_idle = t0.elapsed().as_secs_f64();
    let held: Arc<Mutex<Vec<Session>>> = Arc::default();
    {
        let claimed = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for _ in 0..a.workers {
            let (client, claimed, held, errors, idle_open) = (
                client.clone(),
                claimed.clone(),
                held.clone(),
                errors.clone(),
                idle_open.clone(),
            );
            let n = a.idle;
            tasks.push(tokio::spawn(async move {
                while claimed.fetch_add(1, Ordering::SeqCst) < n {
                    match client.open().await {
                        Ok(s) => {
                            held.lock().unwrap().push(s);
                            idle_open.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(e) => errors.add(format!("idle {e}")),
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    }
    let opened_secs = t0.elapsed().as_secs_f64() - t_idle;
    let m = scrape(proxy.admin).await;
    let active = m.value("pgmtls_sessions_active", "database=\"default\"");
    let idle_rss = rss_kib(pid).unwrap();
    let idle_fds = open_fds(pid).unwrap();
    println!(
        "idle: {} sessions open after {opened_secs:.0} s (pgmtls_sessions_active {active}); \
         RSS {idle_rss} KiB, fds {idle_fds}; holding {} s",
        idle_open.load(Ordering::SeqCst),
        a.idle_secs
    );
    tokio::time::sleep(Duration::from_secs(a.idle_secs)).await;
    let held_rss = rss_kib(pid).unwrap();
    let held_fds = open_fds(pid).unwrap();
    *phase.lock().unwrap() = "close";
    let sessions: Vec<Session> = std::mem::take(&mut *held.lock().unwrap());
    let queue = Arc::new(Mutex::new(sessions));
    {
        let mut tasks = Vec::new();
        for _ in 0..a.workers {
            let (queue, errors, idle_open) = (queue.clone(), errors.clone(), idle_open.clone());
            tasks.push(tokio::spawn(async move {
                loop {
                    let Some(mut s) = queue.lock().unwrap().pop() else {
                        break;
                    };
                    let r = match s.query().await {
                        Ok(()) => s.close().await,
                        Err(e) => Err(e),
                    };
                    if let Err(e) = r {
                        errors.add(format!("idle {e}"));
                    }
                    idle_open.fetch_sub(1, Ordering::SeqCst);
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    }

    // The end: registry empty, fds back to the baseline (bounded wait).
    let last = wait_sessions_zero(proxy.admin).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut final_fds = open_fds(pid).unwrap();
    while final_fds > baseline_fds && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        final_fds = open_fds(pid).unwrap();
    }
    let final_rss = rss_kib(pid).unwrap();
    stop.store(true, Ordering::SeqCst);
    let _ = sampler.await;
    *phase.lock().unwrap() = "end";
    series.lock().unwrap().push(take());

    let total = ran + a.idle + 20;
    let accepted = last.value("pgmtls_connections_accepted_total", "database=\"default\"");
    let refused = refused_total(&last);
    let c = &upstream.counts;
    let warnings = proxy.warnings.lock().unwrap().clone();
    let rss_ratio = end_rss as f64 / early_rss as f64;
    let threads = a
        .proxy_threads
        .map_or("default (one fewer than the CPUs)".to_owned(), |n| {
            n.to_string()
        });
    let mut summary = String::new();
    let _ = writeln!(
        summary,
        "pgmtls soak: {} sessions on {} workers, then {} idle sessions held {} s\n\
         proxy: --worker-threads {threads}; limits: open files {fd_soft} (hard {fd_hard}), processes {proc_soft} (hard {proc_hard})\n\
         churn: {churn_secs:.0} s, {:.0} sessions/s; load average {load_start} at the start, {load_churn} at the end\n\
         RSS: {baseline_rss} KiB at the start, {early_rss} KiB after {first} sessions, {end_rss} KiB after {} \
         (ratio {rss_ratio:.3}, {}), {idle_rss} KiB with {} idle open, {held_rss} KiB after {} s idle, \
         {final_rss} KiB at the end\n\
         fds: {baseline_fds} baseline, {early_fds} after {first}, {end_churn_fds} after the churn, \
         {idle_fds} with the idle sessions open, {held_fds} at the end of the hold, {final_fds} at the end ({})\n\
         errors: {} client ({}), {} upstream, {refused} refused by the proxy (metric), {} WARN/ERROR log lines of {}\n\
         metrics: pgmtls_connections_accepted_total {accepted} of {total} sessions; \
         pgmtls_sessions_active 0 at the end; pgmtls_connections_refused_total after the churn {}\n\
         upstream: {} connections, {} open at the end, {} queries, {} Terminates",
        ran,
        a.workers,
        a.idle,
        a.idle_secs,
        ran as f64 / churn_secs,
        ran,
        if (rss_ratio - 1.0).abs() <= 0.05 { "within 5%" } else { "NOT within 5%" },
        a.idle,
        a.idle_secs,
        if final_fds <= baseline_fds { "back to the baseline" } else { "NOT back to the baseline" },
        errors.total(),
        if errors.total() == 0 { "none".to_owned() } else { errors.summary() },
        c.errors.load(Ordering::SeqCst),
        warnings.len(),
        proxy.lines.load(Ordering::Relaxed),
        refused_total(&after_churn),
        c.accepted.load(Ordering::SeqCst),
        c.open(),
        c.queries.load(Ordering::SeqCst),
        c.terminated.load(Ordering::SeqCst),
    );
    for w in warnings.iter().take(5) {
        let _ = writeln!(summary, "  {w}");
    }
    print!("{summary}");
    let series = series.lock().unwrap().clone();
    std::fs::write(a.out.join("summary.txt"), &summary).unwrap();
    std::fs::write(a.out.join("soak.csv"), csv(&series)).unwrap();
    std::fs::write(a.out.join("soak.svg"), svg(&series, t_idle, ran, &a)).unwrap();
    println!(
        "series: {}/soak.csv, plot: {}/soak.svg",
        a.out.display(),
        a.out.display()
    );
}

fn csv(series: &[Sample]) -> String {
    let mut s = String::from("t_s,phase,sessions,idle_open,rss_kib,fds,errors\n");
    for x in series {
        let _ = writeln!(
            s,
            "{:.1},{},{},{},{},{},{}",
            x.t, x.phase, x.sessions, x.idle_open, x.rss_kib, x.fds, x.errors
        );
    }
    s
}

/// Two stacked panels over time: RSS (MiB) and open fds, a polyline each, with the start of
/// the idle phase marked. Plain SVG, no plotting dependency.
fn svg(series: &[Sample], t_idle: f64, ran: u64, a: &Args) -> String {
    let (w, h, left, right, top, panel, gap) = (900.0, 520.0, 70.0, 20.0, 40.0, 190.0, 60.0);
    let t_max = series.last().map_or(1.0, |s| s.t).max(1.0);
    let x = |t: f64| left + (w - left - right) * t / t_max;
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" \
         viewBox=\"0 0 {w} {h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{left}\" y=\"20\" font-size=\"14\">pgmtls soak: {} sessions, then {} idle \
         held {} s (RSS and open fds of the proxy, sampled every {} s)</text>\n",
        ran, a.idle, a.idle_secs, a.interval
    );
    type Panel = (&'static str, fn(&Sample) -> f64, &'static str);
    let panels: [Panel; 2] = [
        ("RSS (MiB)", |s| s.rss_kib as f64 / 1024.0, "#1f77b4"),
        ("open fds", |s| s.fds as f64, "#d62728"),
    ];
    for (i, (label, value, color)) in panels.iter().enumerate() {
        let y0 = top + i as f64 * (panel + gap);
        let v_max = series.iter().map(*value).fold(0.0, f64::max).max(1.0) * 1.1;
        let y = |v: f64| y0 + panel - panel * v / v_max;
        let _ = writeln!(
            out,
            "<rect x=\"{left}\" y=\"{y0}\" width=\"{}\" height=\"{panel}\" fill=\"none\" \
             stroke=\"#999\"/>\n<text x=\"5\" y=\"{}\">{label}</text>\n\
             <text x=\"{}\" y=\"{}\" text-anchor=\"end\">{:.0}</text>\n\
             <text x=\"{}\" y=\"{}\" text-anchor=\"end\">0</text>",
            w - left - right,
            y0 + panel / 2.0,
            left - 4.0,
            y0 + 10.0,
            v_max,
            left - 4.0,
            y0 + panel
        );
        let xi = x(t_idle);
        let _ = writeln!(
            out,
            "<line x1=\"{xi:.1}\" y1=\"{y0}\" x2=\"{xi:.1}\" y2=\"{}\" stroke=\"#aaa\" \
             stroke-dasharray=\"4 3\"/>\n<text x=\"{:.1}\" y=\"{}\" fill=\"#666\">idle</text>",
            y0 + panel,
            xi + 3.0,
            y0 + 14.0
        );
        let points: Vec<String> = series
            .iter()
            .map(|s| format!("{:.1},{:.1}", x(s.t), y(value(s))))
            .collect();
        let _ = writeln!(
            out,
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\" points=\"{}\"/>",
            points.join(" ")
        );
        let _ = writeln!(
            out,
            "<text x=\"{left}\" y=\"{}\">0 s</text><text x=\"{}\" y=\"{}\" \
             text-anchor=\"end\">{t_max:.0} s</text>",
            y0 + panel + 15.0,
            w - right,
            y0 + panel + 15.0
        );
    }
    out.push_str("</svg>\n");
    out
}
