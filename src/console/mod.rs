//! `pgmtls console`: the control commands as web pages, served by a process of its own on
//! loopback. It holds the state store's write access (the proxy stays read-only) and makes
//! every change through [`crate::control`], the path the CLI takes, with the session as the
//! audit record's actor. This module parses form fields and renders HTML ([`pages`]); login,
//! sessions and CSRF are [`auth`]'s. See docs/CONSOLE.md.

pub mod activity;
pub mod auth;
pub mod metrics;
pub mod pages;
pub mod tls;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context as _};
use axum::body::Body;
use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use clap::Args;
use maud::Markup;

use crate::cli::status::{ProxyView, UNKNOWN};
use crate::cli::{Ctx, StateArgs};
use crate::control::{self, ip_rules::Selector, Control, ControlError};
use auth::{Auth, Login, Session, COOKIE};
use metrics::{ConsoleMetrics, Refusal};
use pages::{DbRow, DbView, EnableForm, FormError, Section};
use tls::{Peer, TlsFiles};

/// `pgmtls console`.
#[derive(Args, Debug)]
pub struct ConsoleArgs {
    /// Address to serve the console on; an address other than loopback needs TLS
    /// (console_tls in pgmtls.yaml, or --tls-cert and --tls-key).
    #[arg(
        long,
        env = "PGMTLS_CONSOLE_LISTEN",
        value_name = "ADDR",
        default_value = "127.0.0.1:0"
    )]
    pub listen: SocketAddr,
    /// Serve HTTPS with this certificate chain (PEM) [default: console_tls.cert_file].
    #[arg(
        long,
        env = "PGMTLS_CONSOLE_TLS_CERT",
        value_name = "FILE",
        requires = "tls_key"
    )]
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM, mode 0600).
    #[arg(
        long,
        env = "PGMTLS_CONSOLE_TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    pub tls_key: Option<PathBuf>,
    /// Require a client certificate from this CA (PEM); the certificate is then the login.
    #[arg(
        long,
        env = "PGMTLS_CONSOLE_TLS_CLIENT_CA",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    pub tls_client_ca: Option<PathBuf>,
    /// Read the one-time login token from FILE (mode 0600) instead of making one
    /// [default: console_token_file].
    #[arg(long, env = "PGMTLS_CONSOLE_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    #[command(flatten)]
    pub state: StateArgs,
}

/// The headers every response carries: no script, no framing, styles from the console only,
/// forms post only to it, nothing cached or sent on as a referrer.
pub const SECURITY_HEADERS: [(&str, &str); 4] = [
    (
        "content-security-policy",
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; \
         frame-ancestors 'none'; base-uri 'none'",
    ),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    ("cache-control", "no-store"),
];

/// The largest form body read; every form of the console is far smaller.
const MAX_FORM_BYTES: usize = 16 * 1024;

/// What every request handler shares.
struct App {
    control: Control,
    /// The state and the way to the proxy, as the CLI resolves them: status words come from
    /// [`Ctx::proxy`], the CLI's own call.
    ctx: Arc<Ctx>,
    auth: Auth,
    /// `Host` values the console answers to (its bound address, `localhost:PORT` for
    /// loopback, and under TLS the names of its certificate): a page on another name that
    /// resolves to the console (DNS rebinding) is refused.
    hosts: Vec<String>,
    /// Served over TLS: the cookie is `Secure`.
    tls: bool,
    /// mTLS mode: the verified client certificate is the login; there is no token.
    mtls: bool,
    metrics: Arc<ConsoleMetrics>,
    /// Samples of the proxy's refusal counters, for the Activity chart.
    history: Arc<activity::History>,
}

type Shared = Arc<App>;

/// The fields of a POST, parsed once by the CSRF check and handed to the handler.
#[derive(Debug, Clone, Default)]
struct Fields(HashMap<String, String>);

impl Fields {
    fn get(&self, name: &str) -> &str {
        self.0.get(name).map(String::as_str).unwrap_or("")
    }
}

/// How the console serves, resolved from the flags and `pgmtls.yaml` before anything binds.
struct Settings {
    listen: SocketAddr,
    tls: Option<TlsFiles>,
    /// The token read from the file, and the file's path for the start-up line.
    token: Option<(String, PathBuf)>,
}

fn settings(args: &ConsoleArgs) -> anyhow::Result<Settings> {
    let config = match &args.state.config {
        Some(path) => Some(
            crate::config::process::Config::load(path)
                .map_err(|e| anyhow::anyhow!("{}", crate::state::one_line(&e)))?,
        ),
        None => None,
    };
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(TlsFiles::from_flags(tls::paths(
            cert.clone(),
            key.clone(),
            args.tls_client_ca.clone(),
        ))),
        _ => config
            .as_ref()
            .and_then(|c| c.console_tls.clone())
            .map(TlsFiles::from_config),
    };
    if !args.listen.ip().is_loopback() && tls.is_none() {
        bail!(
            "--listen {}: not a loopback address, and the console has no TLS: its login token \
             and session cookie would cross the network in the clear. Give console_tls in \
             pgmtls.yaml (or --tls-cert and --tls-key), or listen on 127.0.0.1 or [::1] and \
             reach it through an SSH tunnel",
            args.listen
        );
    }
    let token_file = match &args.token_file {
        Some(p) => Some((p.clone(), "--token-file")),
        None => config
            .as_ref()
            .and_then(|c| c.console_token_file.clone())
            .map(|p| (p, "console_token_file")),
    };
    let token = match token_file {
        None => None,
        Some((path, label)) => {
            if let Some(t) = tls.as_ref().filter(|t| t.mtls()) {
                bail!(
                    "{label} {}: there is no login token when {} is set: the client \
                     certificate is the login",
                    path.display(),
                    t.labels[2]
                );
            }
            let token = auth::read_token_file(&path, label).map_err(|e| anyhow::anyhow!(e))?;
            Some((token, path))
        }
    };
    Ok(Settings {
        listen: args.listen,
        tls,
        token,
    })
}

pub fn run(args: ConsoleArgs) -> anyhow::Result<ExitCode> {
    let settings = settings(&args)?;
    // The files are read before anything binds: a bad file is an error at start, not a
    // console that refuses every connection.
    let served = match &settings.tls {
        Some(files) => Some(
            tls::server_config(files)
                .map_err(|e| anyhow::anyhow!("{}", crate::state::one_line(&e)))?,
        ),
        None => None,
    };
    // Built before the runtime: an etcd store runs its calls on a runtime of its own.
    let ctx = Arc::new(Ctx::new(&args.state)?);
    if ctx.etcd().is_none() && !ctx.state.root().exists() {
        return Err(ControlError::NoStateDir(ctx.state.root().to_path_buf()).into());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(serve(settings, served, ctx.clone()))?;
    // The runtime goes before `ctx`, which holds the last handle on an etcd store's runtime
    // (dropping that one inside this runtime would panic).
    drop(rt);
    drop(ctx);
    Ok(ExitCode::SUCCESS)
}

async fn serve(
    settings: Settings,
    served: Option<tls::Served>,
    ctx: Arc<Ctx>,
) -> anyhow::Result<()> {
    let listen = settings.listen;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("--listen {listen}: cannot bind"))?;
    let bound = listener
        .local_addr()
        .context("cannot read the bound address")?;
    let mtls = settings.tls.as_ref().is_some_and(TlsFiles::mtls);
    let (token, token_file) = match settings.token {
        Some((t, file)) => (Some(t), Some(file)),
        None if mtls => (None, None),
        None => (Some(auth::random_hex(32)), None),
    };
    let port = bound.port();
    let mut hosts = vec![bound.to_string()];
    if bound.ip().is_loopback() {
        hosts.push(format!("localhost:{port}"));
    }
    if let Some(s) = &served {
        hosts.extend(s.names.iter().map(|n| format!("{n}:{port}")));
    }
    let metrics = Arc::new(ConsoleMetrics::new());
    let app = Arc::new(App {
        control: ctx.control(),
        ctx,
        auth: Auth::new(token.clone()),
        hosts,
        tls: served.is_some(),
        mtls,
        metrics: metrics.clone(),
        history: Arc::default(),
    });
    activity::spawn_sampler(app.history.clone(), app.ctx.admin_url().cloned());
    // The address to print: the bound one, or for a wildcard listen the certificate's name.
    let shown = match (&served, bound.ip().is_unspecified()) {
        (Some(s), true) => s
            .names
            .first()
            .map(|n| format!("{n}:{port}"))
            .unwrap_or_else(|| bound.to_string()),
        _ => bound.to_string(),
    };
    let scheme = if served.is_some() { "https" } else { "http" };
    // The readiness signal for whoever started the console: both lines, flushed.
    say!("pgmtls console: serving {scheme}://{shown}/");
    match (&token, &token_file, &settings.tls) {
        (Some(_), Some(file), _) => say!(
            "Log in (once) with the token in {}: {scheme}://{shown}/login?token=TOKEN",
            file.display()
        ),
        (Some(t), None, _) => say!("Log in (once) with: {scheme}://{shown}/login?token={t}"),
        (None, _, Some(files)) => say!(
            "Log in with a client certificate from {}: {scheme}://{shown}/login",
            files
                .paths
                .client_ca_file
                .as_deref()
                .unwrap_or(std::path::Path::new("-"))
                .display()
        ),
        (None, _, None) => {}
    }
    let router = router(app);
    match served {
        None => axum::serve(
            listener,
            router.into_make_service_with_connect_info::<Peer>(),
        )
        .with_graceful_shutdown(shutdown())
        .await
        .context("console server failed"),
        Some(s) => axum::serve(
            tls::incoming(listener, bound, s.config, metrics),
            router.into_make_service_with_connect_info::<Peer>(),
        )
        .with_graceful_shutdown(shutdown())
        .await
        .context("console server failed"),
    }
}

async fn shutdown() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

fn router(app: Shared) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/login", get(login))
        .route("/logout", post(logout))
        .route("/style.css", get(style))
        .route("/metrics", get(metrics_page))
        .route("/mtls", post(enable_mtls))
        .route("/databases/{name}", get(database))
        .route("/databases/{name}/disable", post(disable_mtls))
        .route("/databases/{name}/ip-rules", post(add_rule))
        .route("/databases/{name}/ip-rules/delete", post(delete_rule))
        .route("/databases/{name}/certificates", post(create_certificate))
        .route(
            "/databases/{name}/certificates/download",
            post(download_certificate),
        )
        .route(
            "/databases/{name}/certificates/revoke",
            post(revoke_certificate),
        )
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(app.clone(), guard))
        .layer(middleware::map_response(security_headers))
        .with_state(app)
}

async fn security_headers(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    for (name, value) in SECURITY_HEADERS {
        h.insert(name, HeaderValue::from_static(value));
    }
    resp
}

fn html(status: StatusCode, page: Markup) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        page.into_string(),
    )
        .into_response()
}

fn see_other(to: &str) -> Response {
    (StatusCode::SEE_OTHER, [(header::LOCATION, to.to_owned())]).into_response()
}

/// Every request passes here first: the Host check, then the session (except for `/login`
/// and the stylesheet), then for a POST the CSRF field. A refusal is logged with its reason.
async fn guard(
    State(app): State<Shared>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    req: Request,
    next: Next,
) -> Response {
    let cert = peer.cert.clone();
    let peer = peer.addr;
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    if !app.hosts.iter().any(|h| h == host) {
        tracing::warn!(client = %peer, host, reason = "host", "console: request refused: unexpected Host");
        app.refused(Refusal::Host);
        eprintln!("pgmtls console: refused {peer}: unexpected Host header {host:?} (reason host)");
        return html(
            StatusCode::MISDIRECTED_REQUEST,
            pages::error(
                None,
                "Wrong address",
                "This console answers only to its own address.",
            ),
        );
    }
    let path = req.uri().path();
    if path == "/login" || path == "/style.css" || path == "/metrics" {
        return next.run(req).await;
    }
    let session = req
        .headers()
        .get(header::COOKIE)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| auth::cookie(h, COOKIE))
        .and_then(|id| app.auth.session(id))
        // A session started with a client certificate works only with that certificate: a
        // cookie carried to another operator's connection is no session there.
        .filter(|s| match &s.certificate {
            None => true,
            Some(fp) => cert.as_ref().is_some_and(|c| &c.fingerprint == fp),
        });
    let Some(session) = session else {
        if req.method() == Method::GET || req.method() == Method::HEAD {
            return see_other("/login");
        }
        app.refused(Refusal::NoSession);
        eprintln!(
            "pgmtls console: refused {} {} from {peer}: no session (reason no_session)",
            req.method(),
            path
        );
        return html(
            StatusCode::UNAUTHORIZED,
            pages::login("Not logged in: nothing was changed."),
        );
    };
    let mut req = req;
    if req.method() == Method::POST {
        let (parts, body) = req.into_parts();
        let bytes = match axum::body::to_bytes(body, MAX_FORM_BYTES).await {
            Ok(b) => b,
            Err(_) => {
                app.refused(Refusal::FormTooLarge);
                eprintln!(
                    "pgmtls console: refused POST {} from {peer} (session {}): form larger than \
                     {MAX_FORM_BYTES} bytes (reason form_too_large)",
                    parts.uri.path(),
                    session.label
                );
                return html(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    pages::error(Some(&session), "Form too large", "Nothing was changed."),
                );
            }
        };
        let fields: HashMap<String, String> =
            serde_urlencoded::from_bytes::<Vec<(String, String)>>(&bytes)
                .map(|v| v.into_iter().collect())
                .unwrap_or_default();
        let given = fields.get("csrf").map(String::as_str).unwrap_or("");
        if !auth::same(given, &session.csrf) {
            let reason = if given.is_empty() {
                Refusal::CsrfMissing
            } else {
                Refusal::CsrfWrong
            };
            app.refused(reason);
            eprintln!(
                "pgmtls console: refused POST {} from {peer} (session {}): {} CSRF token \
                 (reason {})",
                parts.uri.path(),
                session.label,
                if given.is_empty() { "missing" } else { "wrong" },
                reason.as_str()
            );
            return html(
                StatusCode::FORBIDDEN,
                pages::error(
                    Some(&session),
                    "Refused",
                    "The form's security token is missing or wrong (an old page, or a form \
                     from another site): nothing was changed. Reload the page and try again.",
                ),
            );
        }
        req = Request::from_parts(parts, Body::from(bytes));
        req.extensions_mut().insert(Fields(fields));
    }
    req.extensions_mut().insert(session);
    next.run(req).await
}

impl App {
    fn refused(&self, reason: Refusal) {
        self.metrics.refused(reason);
    }
}

/// `GET /metrics`: the console's counters for Prometheus, without a session (a scraper has
/// none) but to loopback peers only: they tell a stranger nothing they need, yet a console on
/// the network should not hand them out either.
async fn metrics_page(State(app): State<Shared>, ConnectInfo(peer): ConnectInfo<Peer>) -> Response {
    if !peer.addr.ip().to_canonical().is_loopback() {
        app.refused(Refusal::MetricsNotLoopback);
        eprintln!(
            "pgmtls console: refused GET /metrics from {}: not a loopback peer (reason \
             metrics_not_loopback)",
            peer.addr
        );
        return (
            StatusCode::FORBIDDEN,
            "metrics are served to loopback peers only\n",
        )
            .into_response();
    }
    (
        [(header::CONTENT_TYPE, crate::admin::OPENMETRICS_CONTENT_TYPE)],
        app.metrics.encode(),
    )
        .into_response()
}

async fn style() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        pages::STYLE,
    )
        .into_response()
}

async fn not_found(Extension(session): Extension<Session>) -> Response {
    html(
        StatusCode::NOT_FOUND,
        pages::error(Some(&session), "Not found", "There is no such page."),
    )
}

/// The session cookie: `Secure` under TLS, so a browser never sends it in the clear.
fn session_cookie(app: &App, s: &Session) -> String {
    format!(
        "{COOKIE}={}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}{}",
        s.id,
        auth::SESSION_LIFETIME.as_secs(),
        if app.tls { "; Secure" } else { "" }
    )
}

fn started(app: &App, s: &Session) -> Response {
    app.metrics.session_started();
    (
        StatusCode::SEE_OTHER,
        [
            (header::LOCATION, "/".to_owned()),
            (header::SET_COOKIE, session_cookie(app, s)),
        ],
    )
        .into_response()
}

async fn login(
    State(app): State<Shared>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    if app.mtls {
        // The handshake verified the certificate against the operator's CA: that is the
        // login. A connection without one never got this far.
        let Some(cert) = &peer.cert else {
            app.refused(Refusal::ClientCertificate);
            return html(
                StatusCode::UNAUTHORIZED,
                pages::login("This console needs a client certificate."),
            );
        };
        let s = app
            .auth
            .login_with_certificate(peer.addr.ip(), &cert.fingerprint);
        eprintln!(
            "pgmtls console: session {} started from {} with client certificate CN={} \
             serial {}",
            s.label, peer.addr, cert.common_name, cert.serial
        );
        return started(&app, &s);
    }
    let peer = peer.addr;
    let Some(token) = query.get("token") else {
        return html(
            StatusCode::UNAUTHORIZED,
            pages::login("Log in with the URL the console printed."),
        );
    };
    match app.auth.login(token, peer.ip()) {
        Login::Ok(s) => {
            eprintln!("pgmtls console: session {} started from {peer}", s.label);
            started(&app, &s)
        }
        Login::Refused { failures } => {
            app.refused(Refusal::BadToken);
            eprintln!(
                "pgmtls console: login refused from {peer}: bad or used token ({failures} \
                 refused since start) (reason bad_token)"
            );
            html(
                StatusCode::UNAUTHORIZED,
                pages::login("That login token is wrong or was already used."),
            )
        }
        Login::Locked {
            failures,
            retry_after,
        } => {
            app.refused(Refusal::LoginLocked);
            eprintln!(
                "pgmtls console: login refused from {peer}: locked after {} bad tokens \
                 ({failures} refused since start) (reason login_locked)",
                auth::MAX_FAILURES
            );
            let secs = retry_after.as_secs().max(1);
            let mut resp = html(
                StatusCode::TOO_MANY_REQUESTS,
                pages::login(&format!(
                    "Too many wrong login tokens: logins are locked for {secs} more seconds."
                )),
            );
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
            resp
        }
    }
}

async fn logout(State(app): State<Shared>, Extension(session): Extension<Session>) -> Response {
    app.auth.logout(&session.id);
    eprintln!("pgmtls console: session {} logged out", session.label);
    let mut resp = see_other("/login");
    if let Ok(v) = HeaderValue::from_str(&format!(
        "{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0{}",
        if app.tls { "; Secure" } else { "" }
    )) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    resp
}

/// What the running proxy (or, in etcd mode, the fleet) says: the CLI's own query, on a
/// blocking thread since it runs a runtime of its own.
async fn proxy_view(app: &App) -> ProxyView {
    let ctx = app.ctx.clone();
    tokio::task::spawn_blocking(move || ctx.proxy())
        .await
        .unwrap_or_else(|e| ProxyView::Unreachable {
            reason: format!("internal error: {e}"),
        })
}

/// A line saying what the status words rest on, when there is something to say.
fn proxy_note(proxy: &ProxyView) -> Option<String> {
    match proxy {
        ProxyView::Unreachable { reason } => Some(format!("{UNKNOWN}: {reason}")),
        _ => proxy
            .reload_error()
            .map(|e| format!("last reload failed: {e}")),
    }
}

/// Runs blocking control-plane work (file locks, an etcd store's own runtime) off the
/// runtime's threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> control::Result<T> + Send + 'static,
) -> control::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(ControlError::Invalid(format!("internal error: {e}"))))
}

async fn index(State(app): State<Shared>, Extension(session): Extension<Session>) -> Response {
    render_index(&app, &session, StatusCode::OK, &EnableForm::default()).await
}

/// The databases page, with the enable form's message and typed values when it was refused.
async fn render_index(
    app: &App,
    session: &Session,
    status: StatusCode,
    enable: &EnableForm,
) -> Response {
    let session = session.clone();
    let control = app.control.clone();
    let loaded = blocking(move || {
        let names = control.database_names()?;
        Ok(names
            .into_iter()
            .map(|n| {
                let db = control.load(&n).map_err(|e| match e {
                    ControlError::DoesNotLoad { detail, .. } => detail,
                    other => other.to_string(),
                });
                (n, db)
            })
            .collect::<Vec<_>>())
    })
    .await;
    let loaded = match loaded {
        Ok(l) => l,
        Err(e) => {
            return html(
                StatusCode::INTERNAL_SERVER_ERROR,
                pages::error(Some(&session), "The state cannot be read", &e.to_string()),
            )
        }
    };
    let proxy = proxy_view(app).await;
    let at = control::now();
    let rows: Vec<DbRow> = loaded
        .into_iter()
        .map(|(name, db)| match db {
            Ok(db) => DbRow {
                tls_status: proxy.tls_status(&name).to_string(),
                listen: Some(db.settings.listen.to_string()),
                upstream: Some(db.settings.upstream.to_string()),
                rules: Some(db.rules.len()),
                certificates: Some(db.certificates.len()),
                next_expiry: db
                    .certificates
                    .iter()
                    .filter(|c| c.revoked_at.is_none() && c.expires_at > at)
                    .map(|c| c.expires_at)
                    .min()
                    .map(crate::cli::output::human_time),
                error: None,
                name,
            },
            Err(e) => DbRow {
                tls_status: proxy.tls_status(&name).to_string(),
                error: Some(e),
                name,
                ..DbRow::default()
            },
        })
        .collect();
    let notice = app.auth.take_flash(&session.id);
    html(
        status,
        pages::databases(
            &session,
            &rows,
            proxy_note(&proxy).as_deref(),
            app.auth.failures(),
            notice.as_deref(),
            enable,
        ),
    )
}

/// `POST /mtls`: `control::mtls::enable` with the fields of `mtls create`, each parsed as the
/// CLI parses its flag, after the name is typed twice as the CLI's `--confirm` asks.
async fn enable_mtls(
    State(app): State<Shared>,
    Extension(session): Extension<Session>,
    Extension(fields): Extension<Fields>,
) -> Response {
    let d = EnableForm::default();
    let or = |name: &str, default: &str| match fields.get(name).trim() {
        "" => default.to_owned(),
        v => v.to_owned(),
    };
    let form = EnableForm {
        message: None,
        name: fields.get("name").trim().to_owned(),
        listen: fields.get("listen").trim().to_owned(),
        upstream: fields.get("upstream").trim().to_owned(),
        server_name: fields.get("server_name").trim().to_owned(),
        upstream_tls: or("upstream_tls", &d.upstream_tls),
        upstream_ca: fields.get("upstream_ca").trim().to_owned(),
        upstream_server_name: fields.get("upstream_server_name").trim().to_owned(),
        allow_plaintext_remote_upstream: fields.get("allow_plaintext_remote_upstream") == "yes",
        user_must_match_cn: fields.get("user_must_match_cn") == "yes",
        key_type: or("key_type", &d.key_type),
        common_name: fields.get("common_name").trim().to_owned(),
    };
    let confirm = fields.get("confirm").trim().to_owned();
    let (control, actor, f) = (app.control.clone(), session.actor(), form.clone());
    let result = blocking(move || {
        // The CLI's own parsers, named by the CLI's flags: an address, or `shared` for the
        // SNI listener; the upstream; the TLS mode and the key type.
        let listen: crate::state::Listen = f
            .listen
            .parse()
            .map_err(|e: String| ControlError::Invalid(format!("--listen: {e}")))?;
        let upstream = f
            .upstream
            .parse()
            .map_err(|e: String| ControlError::Invalid(format!("--upstream: {e}")))?;
        let upstream_tls = f
            .upstream_tls
            .parse()
            .map_err(|e: String| ControlError::Invalid(format!("--upstream-tls: {e}")))?;
        let key_type = f
            .key_type
            .parse()
            .map_err(|e: crate::pki::PkiError| ControlError::Invalid(format!("--key-type: {e}")))?;
        let some = |v: &str| Some(v.to_owned()).filter(|v| !v.is_empty());
        let request = control::mtls::EnableRequest {
            name: f.name.clone(),
            listen,
            upstream,
            upstream_tls,
            // Pasted rather than a file: the browser may be on another machine than the
            // console. The CLI reads the file into the same field.
            upstream_ca_pem: some(&f.upstream_ca).map(String::into_bytes),
            upstream_server_name: some(&f.upstream_server_name),
            allow_plaintext_remote_upstream: f.allow_plaintext_remote_upstream,
            user_must_match_cn: f.user_must_match_cn,
            server_names: f
                .server_name
                .split([',', ' '])
                .filter(|n| !n.is_empty())
                .map(str::to_owned)
                .collect(),
            key_type,
            common_name: some(&f.common_name),
        };
        // Refuse what can be refused before looking at the confirmation, as the CLI does.
        control::mtls::check(&control, &request)?;
        if confirm != f.name {
            return Err(ControlError::Invalid(format!(
                "type the database name {:?} in \"confirm\" to enable mTLS: nothing was changed",
                f.name
            )));
        }
        control::mtls::enable(&control, &request, &actor)
    })
    .await;
    match result {
        Ok(enabled) => {
            let name = form.name.clone();
            changed(
                &app,
                &session,
                &name,
                format!(
                    "Enabled mTLS on {name}: listen {}, upstream {}, first certificate {}",
                    enabled.settings.listen, enabled.settings.upstream, enabled.certificate.id
                ),
            )
        }
        Err(e) => {
            eprintln!(
                "pgmtls console: refused enabling mTLS on {:?} ({}): {e}",
                form.name,
                session.actor()
            );
            let status = status_of(&e);
            let form = EnableForm {
                message: Some(e.to_string()),
                ..form
            };
            render_index(&app, &session, status, &form).await
        }
    }
}

/// `POST /databases/NAME/disable`: `control::mtls::disable` (the directory is archived), after
/// the name is typed again.
async fn disable_mtls(
    State(app): State<Shared>,
    Extension(session): Extension<Session>,
    Extension(fields): Extension<Fields>,
    Path(name): Path<String>,
) -> Response {
    let confirm = fields.get("confirm").trim().to_owned();
    let (control, db, actor) = (app.control.clone(), name.clone(), session.actor());
    let result = blocking(move || {
        control.require(&db)?;
        if confirm != db {
            return Err(ControlError::Invalid(format!(
                "type the database name {db:?} in \"confirm\" to disable mTLS: nothing was changed"
            )));
        }
        control::mtls::disable(&control, &db, &actor)
    })
    .await;
    match result {
        Ok(d) => {
            let message = format!(
                "Disabled mTLS on {name}; its directory was archived to {}",
                d.archived_to.display()
            );
            eprintln!("pgmtls console: {message} ({})", session.actor());
            app.auth.set_flash(&session.id, message);
            see_other("/")
        }
        Err(e) => refused_in(&app, &session, &name, Section::Disable, e).await,
    }
}

async fn database(
    State(app): State<Shared>,
    Extension(session): Extension<Session>,
    Path(name): Path<String>,
) -> Response {
    render_database(&app, &session, &name, StatusCode::OK, None).await
}

/// The page of database `name`, with `error` next to its form when a change was refused.
async fn render_database(
    app: &App,
    session: &Session,
    name: &str,
    status: StatusCode,
    error: Option<FormError>,
) -> Response {
    let control = app.control.clone();
    let n = name.to_owned();
    let loaded = blocking(move || {
        let db = control.load(&n)?;
        let audit = control.audit_log().map_err(|e| e.to_string()).map(|all| {
            let mut mine: Vec<_> = all
                .into_iter()
                .filter(|a| a.database.as_deref() == Some(n.as_str()))
                .collect();
            mine.reverse();
            mine
        });
        Ok((db, audit))
    })
    .await;
    let (db, audit) = match loaded {
        Ok(l) => l,
        Err(e) => return control_error_page(session, &e),
    };
    let url = app.ctx.admin_url();
    let (proxy, sessions, ()) = tokio::join!(
        proxy_view(app),
        activity::sessions(url, &db.name),
        app.history.sample(url),
    );
    let live = pages::Live {
        proxy: url.map(|u| u.to_string()),
        sessions,
        refusals: app
            .history
            .refusals(&db.name, time::OffsetDateTime::now_utc()),
    };
    let at = control::now();
    let s = &db.settings;
    let mut settings = vec![
        ("listen", s.listen.to_string()),
        ("upstream", s.upstream.to_string()),
        ("upstream_tls", s.upstream_tls.to_string()),
        ("server_names", s.server_names.join(", ")),
        ("user_must_match_cn", s.user_must_match_cn.to_string()),
    ];
    if let Some(by) = &s.enabled_by {
        settings.push(("enabled_by", by.clone()));
    }
    if let Some(t) = s.created_at {
        settings.push(("created_at", crate::cli::output::human_time(t)));
    }
    let rules = db
        .rules
        .iter()
        .map(|r| pages::RuleRow {
            id: r.id.clone(),
            cidr: r.cidr.to_string(),
            description: r.description.clone(),
            created: crate::cli::output::human_time(r.created_at),
            status: proxy.rule_status(&db.name, &r.id).to_string(),
        })
        .collect();
    let trusted_ips = db
        .trusted_ips
        .iter()
        .map(|r| pages::RuleRow {
            id: r.id.clone(),
            cidr: r.cidr.to_string(),
            description: r.description.clone(),
            created: crate::cli::output::human_time(r.created_at),
            status: proxy.trusted_ip_status(&db.name, &r.id).to_string(),
        })
        .collect();
    let files = control::download::names(&pages::default_prefix(&db.name));
    let certificates = crate::cli::certificates::views(&db, &proxy, at)
        .into_iter()
        .map(|v| pages::CertRow {
            connect: (v.revoked_at.is_none() && v.status != "revoked")
                .then(|| db.certificates.iter().find(|r| r.id == v.id))
                .flatten()
                .map(|r| connect_help(&db, r, &proxy, &files)),
            revoked: v.revoked_at.is_some() || v.status == "revoked",
            id: v.id,
            common_name: v.common_name,
            created: crate::cli::output::human_time(v.created_at),
            expires: crate::cli::output::human_time(v.expires_at),
            status: v.status_text,
        })
        .collect();
    let view = DbView {
        name: db.name.clone(),
        tls_status: proxy.tls_status(&db.name).to_string(),
        settings,
        rules,
        trusted_ips,
        certificates,
        audit,
        live,
    };
    let notice = app.auth.take_flash(&session.id);
    html(
        status,
        pages::database(
            session,
            &view,
            proxy_note(&proxy).as_deref(),
            notice.as_deref(),
            error.as_ref(),
        ),
    )
}

/// The CLI's psql line for the downloaded files, and the same as libpq environment variables.
fn connect_help(
    db: &crate::state::DatabaseState,
    record: &crate::state::CertificateRecord,
    proxy: &ProxyView,
    files: &[String; 4],
) -> (String, Vec<(&'static str, String)>) {
    let line = crate::cli::certificates::connect_line(db, record, proxy, files);
    let mut env = Vec::new();
    // The line is `key=value` pairs, each value quoted by libpq's rules only when needed.
    for (key, var) in [
        ("host", "PGHOST"),
        ("port", "PGPORT"),
        ("dbname", "PGDATABASE"),
        ("user", "PGUSER"),
        ("sslmode", "PGSSLMODE"),
    ] {
        if let Some(v) = line
            .split(' ')
            .find_map(|kv| kv.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
        {
            env.push((var, v.to_owned()));
        }
    }
    env.push(("PGSSLCERT", files[0].clone()));
    env.push(("PGSSLKEY", files[1].clone()));
    env.push(("PGSSLROOTCERT", files[2].clone()));
    (line, env)
}

/// Builds the tar archive of a download. Tar, because each entry's header carries its Unix
/// mode (the key's 0600 survives `tar -xpf`), every client system unpacks it without extra
/// tools, and the `tar` crate writes it with no compression code to pull in: the files are a
/// few kilobytes.
fn tar_of(bundle: &control::download::Bundle, mtime: u64) -> std::io::Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    for f in &bundle.files {
        let mut header = tar::Header::new_ustar();
        header.set_size(f.bytes.len() as u64);
        header.set_mode(f.mode);
        header.set_mtime(mtime);
        header.set_entry_type(tar::EntryType::Regular);
        builder.append_data(&mut header, &f.name, f.bytes.as_slice())?;
    }
    builder.into_inner()
}

async fn download_certificate(
    State(app): State<Shared>,
    Extension(session): Extension<Session>,
    Extension(fields): Extension<Fields>,
    Path(name): Path<String>,
) -> Response {
    let id = fields.get("id").to_owned();
    let prefix = fields.get("prefix").to_owned();
    let (control, db, actor, i, p) = (
        app.control.clone(),
        name.clone(),
        session.actor(),
        id.clone(),
        prefix.clone(),
    );
    let result = blocking(move || {
        let state = control.load(&db)?;
        let bundle = control::download::bundle(&control, &state, &i, &p)?;
        let at = control::now();
        let tar = tar_of(&bundle, at.unix_timestamp().max(0) as u64)
            .map_err(|e| ControlError::Invalid(format!("cannot build the archive: {e}")))?;
        let details = serde_json::json!({"id": bundle.record.id, "prefix": p, "via": "console"});
        let logged = control::download::note(&control, &db, details, &actor);
        Ok((bundle.record.id, tar, logged))
    })
    .await;
    match result {
        Ok((id, tar, logged)) => {
            if let Err(e) = logged {
                eprintln!("pgmtls console: warning: download not recorded in the audit log: {e}");
            }
            eprintln!(
                "pgmtls console: downloaded certificate {id} (database {name}, {})",
                session.actor()
            );
            let disposition = format!("attachment; filename=\"{name}-{id}.tar\"");
            let mut resp = (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/x-tar")],
                tar,
            )
                .into_response();
            if let Ok(v) = HeaderValue::from_str(&disposition) {
                resp.headers_mut().insert(header::CONTENT_DISPOSITION, v);
            }
            resp
        }
        Err(e) => refused_in(&app, &session, &name, Section::Certificates, e).await,
    }
}

/// The status a refused change answers with.
fn status_of(e: &ControlError) -> StatusCode {
    match e {
        // A name or key type the operator typed that a certificate cannot carry.
        ControlError::Invalid(_)
        | ControlError::Pki(
            crate::pki::PkiError::BadName { .. } | crate::pki::PkiError::UnknownKeyType(_),
        ) => StatusCode::BAD_REQUEST,
        ControlError::UnknownDatabase { .. } | ControlError::NotFound(_) => StatusCode::NOT_FOUND,
        ControlError::Conflict(_) | ControlError::Changed { .. } => StatusCode::CONFLICT,
        // Well-formed input whose result the proxy would refuse to load (a pasted CA the
        // TLS library rejects, say): the operator's to fix, not the console's failure.
        ControlError::WouldReject(_) => StatusCode::UNPROCESSABLE_ENTITY,
        // etcd down or refusing: nothing was written, and retrying later may work.
        ControlError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// A page for an error that leaves no database page to show (an unknown database).
fn control_error_page(session: &Session, e: &ControlError) -> Response {
    html(
        status_of(e),
        pages::error(Some(session), "Nothing was changed", &e.to_string()),
    )
}

/// After a change: log it, leave its message for the next page, and send the browser there
/// (so reloading the page does not post the form again).
fn changed(app: &App, session: &Session, name: &str, message: String) -> Response {
    eprintln!(
        "pgmtls console: {} (database {name}, {})",
        message,
        session.actor()
    );
    app.auth.set_flash(&session.id, message);
    see_other(&format!("/databases/{name}"))
}

/// A refused change: the database's page with the message by its form, or an error page when
/// there is no such database.
async fn refused(
    app: &App,
    session: &Session,
    name: &str,
    e: ControlError,
    error: FormError,
) -> Response {
    eprintln!(
        "pgmtls console: refused change to database {name} ({}): {e}",
        session.actor()
    );
    match e {
        ControlError::UnknownDatabase { .. } | ControlError::NoStateDir(_) => {
            control_error_page(session, &e)
        }
        ControlError::Invalid(_) if crate::state::validate_database_name(name).is_err() => {
            control_error_page(session, &e)
        }
        _ => render_database(app, session, name, status_of(&e), Some(error)).await,
    }
}

fn confirmation(fields: &Fields, what: &str) -> Result<(), ControlError> {
    if fields.get("confirm") == "yes" {
        Ok(())
    } else {
        Err(ControlError::Invalid(format!(
            "tick \"confirm\" to {what}: nothing was changed"
        )))
    }
}

async fn add_rule(
    State(app): State<Shared>,
    Extension(session): Extension<Session>,
    Extension(fields): Extension<Fields>,
    Path(name): Path<String>,
) -> Response {
    let cidr = fields.get("cidr").trim().to_owned();
    let description = fields.get("description").to_owned();
    let (control, db, actor) = (app.control.clone(), name.clone(), session.actor());
    let (c, d) = (cidr.clone(), description.clone());
    match blocking(move || control::ip_rules::create(&control, &db, &c, &d, &actor)).await {
        Ok(change) => changed(
            &app,
            &session,
            &name,
            format!("Added IP rule {} for {}", change.rule.id, change.rule.cidr),
        ),
        Err(e) => {
            let form = FormError {
                section: Section::Rules,
                message: e.to_string(),
                cidr,
                description,
            };
            refused(&app, &session, &name, e, form).await
        }
    }
}

/// A refused change whose form has no fields to give back: the message in `section`.
async fn refused_in(
    app: &App,
    session: &Session,
    name: &str,
    section: Section,
    e: ControlError,
) -> Response {
    let form = no_form(section, &e);
    refused(app, session, name, e, form).await
}

fn no_form(section: Section, e: &ControlError) -> FormError {
    FormError {
        section,
        message: e.to_string(),
        cidr: String::new(),
        description: String::new(),
    }
}

async fn delete_rule(
    State(app): State<Shared>,
    Extension(session): Extension<Session>,
    Extension(fields): Extension<Fields>,
    Path(name): Path<String>,
) -> Response {
    let id = fields.get("id").to_owned();
    let result = match confirmation(&fields, &format!("delete IP rule {id}")) {
        Err(e) => Err(e),
        Ok(()) => {
            let (control, db, actor, id) = (
                app.control.clone(),
                name.clone(),
                session.actor(),
                id.clone(),
            );
            blocking(move || control::ip_rules::delete(&control, &db, Selector::Id(&id), &actor))
                .await
        }
    };
    match result {
        Ok(change) => changed(
            &app,
            &session,
            &name,
            format!(
                "Deleted IP rule {} for {}",
                change.rule.id, change.rule.cidr
            ),
        ),
        Err(e) => refused_in(&app, &session, &name, Section::Rules, e).await,
    }
}

async fn create_certificate(
    State(app): State<Shared>,
    Extension(session): Extension<Session>,
    Extension(fields): Extension<Fields>,
    Path(name): Path<String>,
) -> Response {
    let cn = fields.get("common_name").trim().to_owned();
    let (control, db, actor) = (app.control.clone(), name.clone(), session.actor());
    let result = blocking(move || {
        let request = control::certificates::NewCertificate {
            common_name: (!cn.is_empty()).then_some(cn.as_str()),
            ..Default::default()
        };
        control::certificates::create(&control, &db, &request, &actor)
    })
    .await;
    match result {
        Ok(change) => changed(
            &app,
            &session,
            &name,
            format!(
                "Created certificate {} (download it with `pgmtls certificates download {name} \
                 --id {}`)",
                change.record.id, change.record.id
            ),
        ),
        Err(e) => refused_in(&app, &session, &name, Section::Certificates, e).await,
    }
}

async fn revoke_certificate(
    State(app): State<Shared>,
    Extension(session): Extension<Session>,
    Extension(fields): Extension<Fields>,
    Path(name): Path<String>,
) -> Response {
    let id = fields.get("id").to_owned();
    let result = match confirmation(&fields, &format!("revoke certificate {id}")) {
        Err(e) => Err(e),
        Ok(()) => {
            let (control, db, actor, id) = (
                app.control.clone(),
                name.clone(),
                session.actor(),
                id.clone(),
            );
            blocking(move || control::certificates::revoke(&control, &db, &id, &actor)).await
        }
    };
    match result {
        Ok(r) => changed(
            &app,
            &session,
            &name,
            format!(
                "Revoked certificate {} (CRL number {})",
                r.record.id, r.crl_number
            ),
        ),
        Err(e) => refused_in(&app, &session, &name, Section::Certificates, e).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_change_answers_with_the_status_of_its_cause() {
        let cases = [
            (ControlError::Invalid("x".into()), StatusCode::BAD_REQUEST),
            (ControlError::NotFound("x".into()), StatusCode::NOT_FOUND),
            (ControlError::Conflict("x".into()), StatusCode::CONFLICT),
            (
                ControlError::WouldReject("x".into()),
                StatusCode::UNPROCESSABLE_ENTITY,
            ),
            (
                ControlError::Store(crate::store::StoreError::Unavailable {
                    what: "etcd".into(),
                    detail: "connection refused".into(),
                }),
                StatusCode::SERVICE_UNAVAILABLE,
            ),
            (
                ControlError::DoesNotLoad {
                    name: "db".into(),
                    detail: "x".into(),
                },
                StatusCode::INTERNAL_SERVER_ERROR,
            ),
        ];
        for (e, want) in cases {
            assert_eq!(status_of(&e), want, "{e}");
        }
    }
}
