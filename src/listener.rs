//! Bind, accept, hand each socket to `conn::serve` within the connection budgets.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::config::Keepalive;
use crate::conn::error::ErrorKind;
use crate::conn::{self, peer, Context, Served};
use crate::limits::Limits;

/// The threads that run connections: one single-threaded tokio runtime per thread, each with
/// its own accept socket on the shared port (`SO_REUSEPORT`), so the kernel spreads new
/// connections and a connection never changes thread. That saves the work-stealing
/// scheduler's cross-thread wake-ups on every message, which is most of a relay's CPU besides
/// the syscalls themselves. An empty plane runs everything on the caller's runtime (tests).
#[derive(Clone, Default)]
pub struct DataPlane {
    handles: Vec<tokio::runtime::Handle>,
}

impl DataPlane {
    /// Starts `threads` data-plane threads. They live as long as the process.
    pub fn start(threads: usize) -> std::io::Result<DataPlane> {
        let mut handles = Vec::with_capacity(threads);
        for i in 0..threads.max(1) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(rt.handle().clone());
            std::thread::Builder::new()
                .name(format!("pgmtls-data-{i}"))
                .spawn(move || rt.block_on(std::future::pending::<()>()))?;
        }
        Ok(DataPlane { handles })
    }

    /// How many accept sockets each listener gets.
    pub fn width(&self) -> usize {
        self.handles.len().max(1)
    }

    fn spawn<F>(&self, i: usize, fut: F) -> tokio::task::JoinHandle<()>
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        match self.handles.get(i % self.width()) {
            Some(h) => h.spawn(fut),
            None => tokio::spawn(fut),
        }
    }

    /// Binds `addr` once per data-plane thread and starts an accept loop on each; returns the
    /// bound address (port 0 resolved) and the accept tasks.
    pub fn listen(
        &self,
        addr: SocketAddr,
        served: Served,
        ctx: &Arc<Context>,
        limits: &Arc<Limits>,
        stop: &watch::Sender<bool>,
    ) -> std::io::Result<(SocketAddr, Vec<tokio::task::JoinHandle<()>>)> {
        let keepalive = &ctx.timeouts.keepalive;
        let first = bind_std(addr, self.width() > 1, keepalive)?;
        let bound = first.local_addr()?;
        let mut sockets = vec![first];
        for _ in 1..self.width() {
            sockets.push(bind_std(bound, true, keepalive)?);
        }
        let tasks = sockets
            .into_iter()
            .enumerate()
            .map(|(i, socket)| {
                let (served, ctx, limits) = (served.clone(), ctx.clone(), limits.clone());
                let stop = stop.subscribe();
                self.spawn(i, async move {
                    // Registration must happen on the runtime that will drive the socket.
                    match TcpListener::from_std(socket) {
                        Ok(l) => run(l, served, ctx, limits, stop).await,
                        Err(e) => tracing::error!(database = served.database(), error = %e, "cannot register listener"),
                    }
                })
            })
            .collect();
        Ok((bound, tasks))
    }
}

/// Binds a non-blocking listening socket with `SO_REUSEADDR` (a restart does not wait out
/// TIME_WAIT) and, when several threads share the port, `SO_REUSEPORT`. The keepalive options
/// are set here once: Linux copies them to every socket `accept` returns, which saves five
/// `setsockopt` calls per connection.
fn bind_std(
    addr: SocketAddr,
    reuse_port: bool,
    keepalive: &Keepalive,
) -> std::io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    if addr.is_ipv6() {
        // `[::]` serves IPv4 too (peers appear as ::ffff:a.b.c.d), as the default would.
        socket.set_only_v6(false)?;
    }
    set_keepalive(&socket, keepalive)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// Accepts until `stop` turns true. Each connection holds an [`crate::limits::Admission`]
/// for its whole life, which is also how shutdown knows when every connection is gone.
pub async fn run(
    listener: TcpListener,
    served: Served,
    ctx: Arc<Context>,
    limits: Arc<Limits>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = AcceptBackoff::default();
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stop.wait_for(|s| *s) => return,
        };
        let (stream, peer) = match accepted {
            Ok(a) => {
                backoff.succeeded();
                a
            }
            Err(e) => {
                // EMFILE/ENFILE/ENOBUFS/ENOMEM: the connection stays in the backlog and the
                // next accept fails at once, so without a pause the loop would spin a core.
                let pause = backoff.failed(served.database(), &e);
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                continue;
            }
        };
        // A trusted balancer's client is counted once its PROXY header names it; until then
        // the balancer's connection is bounded by the handshake pool alone.
        let source = (!peer::is_trusted(&ctx.proxy_protocol_from, peer)).then(|| peer.ip());
        // A prefix that keeps failing handshakes is closed before any byte is read or any
        // crypto is done (a balancer's client is checked once its header names it).
        if source.is_some_and(|ip| limits.throttle().is_blocked(ip, std::time::Instant::now())) {
            refuse_at_accept(
                &ctx,
                served.database(),
                stream,
                peer,
                false,
                ErrorKind::HandshakeThrottled,
            );
            continue;
        }
        let admission = match limits.admit(source) {
            Ok(a) => Box::new(a),
            Err(kind) => {
                refuse_at_accept(
                    &ctx,
                    served.database(),
                    stream,
                    peer,
                    source.is_none(),
                    kind,
                );
                continue;
            }
        };
        let task = conn::serve(Arc::clone(&ctx), served.clone(), stream, peer, admission);
        ctx.tasks.spawn(task);
    }
}

/// The first pause after a failed accept, and the longest: it doubles while accepts keep
/// failing, so a process out of file descriptors wakes at most once a second per accept
/// loop, and is serving again at most that long after descriptors free up.
const ACCEPT_PAUSE_MIN: Duration = Duration::from_millis(10);
const ACCEPT_PAUSE_MAX: Duration = Duration::from_secs(1);
/// While accepts fail, one line per this interval for the whole process (with the count).
pub const ACCEPT_LOG_INTERVAL: Duration = Duration::from_secs(5);

/// One accept loop's pause after errors.
struct AcceptBackoff {
    pause: Duration,
}

impl Default for AcceptBackoff {
    fn default() -> Self {
        AcceptBackoff {
            pause: ACCEPT_PAUSE_MIN,
        }
    }
}

impl AcceptBackoff {
    /// Counts a failed accept, logs when a line is due, and returns how long to pause.
    fn failed(&mut self, database: Option<&str>, e: &std::io::Error) -> Duration {
        let pause = self.pause;
        self.pause = (self.pause * 2).min(ACCEPT_PAUSE_MAX);
        ACCEPT_ERRORS.failed(database, e, std::time::Instant::now());
        pause
    }

    fn succeeded(&mut self) {
        self.pause = ACCEPT_PAUSE_MIN;
        ACCEPT_ERRORS.succeeded();
    }
}

/// Accept errors of every loop of the process, so the log says once per interval that
/// accepting fails (a flood of identical lines would only add to an overloaded host's
/// trouble), and once that it works again.
struct AcceptErrors {
    failing: std::sync::atomic::AtomicBool,
    log: std::sync::Mutex<AcceptLog>,
}

#[derive(Default)]
struct AcceptLog {
    last_line: Option<std::time::Instant>,
    /// Errors since the last line.
    since_line: u64,
    /// Errors since accepting last worked.
    total: u64,
}

static ACCEPT_ERRORS: AcceptErrors = AcceptErrors {
    failing: std::sync::atomic::AtomicBool::new(false),
    log: std::sync::Mutex::new(AcceptLog {
        last_line: None,
        since_line: 0,
        total: 0,
    }),
};

impl AcceptErrors {
    fn lock(&self) -> std::sync::MutexGuard<'_, AcceptLog> {
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn failed(&self, database: Option<&str>, e: &std::io::Error, now: std::time::Instant) {
        use std::sync::atomic::Ordering;
        self.failing.store(true, Ordering::Relaxed);
        let mut log = self.lock();
        log.since_line += 1;
        log.total += 1;
        let due = log
            .last_line
            .is_none_or(|t| now.duration_since(t) >= ACCEPT_LOG_INTERVAL);
        if !due {
            return;
        }
        let errors = std::mem::take(&mut log.since_line);
        log.last_line = Some(now);
        drop(log);
        tracing::warn!(
            database,
            error = %e,
            errors,
            interval_s = ACCEPT_LOG_INTERVAL.as_secs(),
            "accept failing; backing off (connections wait in the listen backlog)"
        );
    }

    /// Cheap on the hot path: one relaxed load unless accepts were failing.
    fn succeeded(&self) {
        use std::sync::atomic::Ordering;
        if !self.failing.load(Ordering::Relaxed) {
            return;
        }
        self.failing.store(false, Ordering::Relaxed);
        let mut log = self.lock();
        if log.total == 0 {
            return;
        }
        let errors = std::mem::take(&mut log.total);
        *log = AcceptLog::default();
        drop(log);
        tracing::info!(errors, "accepting again");
    }
}

/// Refuses a socket over budget before any crypto is done, with the same generic answer as
/// every refusal before TLS (`conn::refuse`). `from_balancer`: the peer is a trusted load
/// balancer, whose PROXY header comes first. On the shared listener (`database` is `None`) no
/// database is known yet.
fn refuse_at_accept(
    ctx: &Context,
    database: Option<&str>,
    stream: TcpStream,
    peer: SocketAddr,
    from_balancer: bool,
    kind: ErrorKind,
) {
    let position = if from_balancer {
        conn::refuse::Position::ProxyHeaderNext
    } else {
        conn::refuse::Position::Start
    };
    conn::refuse::before_tls(stream, peer, position);
    match database {
        Some(name) => {
            if let Some(db) = ctx.snapshot.load().databases.get(name) {
                db.metrics.refuse(kind);
            }
        }
        None => ctx.metrics.refuse_shared(kind),
    }
    let reason = kind.as_str();
    if !crate::refusal_log::admit(database, reason) {
        return;
    }
    tracing::info!(
        client_addr = %peer,
        database,
        listener = database.is_none().then_some("shared"),
        outcome = "refused",
        error_kind = reason,
        "connection closed"
    );
}

/// Keepalive probes and `TCP_USER_TIMEOUT`, so that a peer that vanished without a FIN or
/// RST is noticed and its connection (and, through it, the other side) is closed.
pub fn set_keepalive<S: std::os::fd::AsFd>(socket: &S, k: &Keepalive) -> std::io::Result<()> {
    let sock = socket2::SockRef::from(socket);
    match k.idle {
        Some(idle) => sock.set_tcp_keepalive(
            &socket2::TcpKeepalive::new()
                .with_time(idle)
                .with_interval(k.interval)
                .with_retries(k.count),
        )?,
        None => sock.set_keepalive(false)?,
    }
    // `None` writes 0, the kernel's "off".
    sock.set_tcp_user_timeout(k.user_timeout)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s)
    }

    #[tokio::test]
    async fn keepalive_settings_land_on_the_socket() {
        let (_c, s) = pair().await;
        let k = Keepalive::new(
            Some(Duration::from_secs(7)),
            Duration::from_secs(3),
            4,
            Some(Some(Duration::from_millis(12_500))),
        );
        set_keepalive(&s, &k).unwrap();
        let sock = socket2::SockRef::from(&s);
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.tcp_keepalive_time().unwrap(), Duration::from_secs(7));
        assert_eq!(
            sock.tcp_keepalive_interval().unwrap(),
            Duration::from_secs(3)
        );
        assert_eq!(sock.tcp_keepalive_retries().unwrap(), 4);
        assert_eq!(
            sock.tcp_user_timeout().unwrap(),
            Some(Duration::from_millis(12_500))
        );
    }

    /// The proxy sets keepalive on the listening socket only; what it serves is the socket
    /// `accept` returns, so that one must carry the options.
    #[tokio::test]
    async fn accepted_sockets_inherit_the_listeners_keepalive() {
        let k = Keepalive::new(
            Some(Duration::from_secs(9)),
            Duration::from_secs(2),
            5,
            Some(Some(Duration::from_millis(23_000))),
        );
        let std = bind_std("127.0.0.1:0".parse().unwrap(), false, &k).unwrap();
        let l = TcpListener::from_std(std).unwrap();
        let _c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        let sock = socket2::SockRef::from(&s);
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.tcp_keepalive_time().unwrap(), Duration::from_secs(9));
        assert_eq!(
            sock.tcp_keepalive_interval().unwrap(),
            Duration::from_secs(2)
        );
        assert_eq!(sock.tcp_keepalive_retries().unwrap(), 5);
        assert_eq!(
            sock.tcp_user_timeout().unwrap(),
            Some(Duration::from_millis(23_000))
        );
    }

    #[test]
    fn accept_pauses_double_up_to_a_second_and_reset_on_success() {
        let mut b = AcceptBackoff::default();
        let e = std::io::Error::from_raw_os_error(24);
        let pauses: Vec<u128> = (0..9).map(|_| b.failed(None, &e).as_millis()).collect();
        assert_eq!(pauses, [10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        b.succeeded();
        assert_eq!(b.failed(None, &e), ACCEPT_PAUSE_MIN);
    }

    #[tokio::test]
    async fn keepalive_off_clears_both_options() {
        let (_c, s) = pair().await;
        set_keepalive(&s, &Keepalive::default()).unwrap();
        set_keepalive(&s, &Keepalive::new(None, Duration::from_secs(1), 1, None)).unwrap();
        let sock = socket2::SockRef::from(&s);
        assert!(!sock.keepalive().unwrap());
        assert_eq!(sock.tcp_user_timeout().unwrap(), None);
    }
}
