//! `pgmtls console`: the control commands as web pages, served by a process of its own on
//! loopback. It holds the state store's write access (the proxy stays read-only) and makes
//! every change through [`crate::control`], the path the CLI takes, with the session as the
//! audit record's actor. This module parses form fields and renders HTML ([`pages`]); login,
//! sessions and CSRF are [`auth`]'s. See docs/CONSOLE.md.

pub mod auth;
pub mod pages;

use std::collections::HashMap;
use std::net::SocketAddr;
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
use pages::{DbRow, DbView, EnableForm, FormError, Section};

/// `pgmtls console`.
#[derive(Args, Debug)]
pub struct ConsoleArgs {
    /// Address to serve the console on; loopback only (the console has no TLS yet).
    #[arg(
        long,
        env = "PGMTLS_CONSOLE_LISTEN",
        value_name = "ADDR",
        default_value = "127.0.0.1:0"
    )]
    pub listen: SocketAddr,
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
    /// `Host` values the console answers to (its bound address, and `localhost:PORT` for
    /// loopback): a page on another name that resolves to loopback (DNS rebinding) is refused.
    hosts: Vec<String>,
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

pub fn run(args: ConsoleArgs) -> anyhow::Result<ExitCode> {
    if !args.listen.ip().is_loopback() {
        bail!(
            "--listen {}: the console serves loopback addresses only: it has no TLS yet, so its \
             login token and session cookie would cross the network in the clear; listen on \
             127.0.0.1 or [::1] and reach it through an SSH tunnel",
            args.listen
        );
    }
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
    rt.block_on(serve(args.listen, ctx.clone()))?;
    // The runtime goes before `ctx`, which holds the last handle on an etcd store's runtime
    // (dropping that one inside this runtime would panic).
    drop(rt);
    drop(ctx);
    Ok(ExitCode::SUCCESS)
}

async fn serve(listen: SocketAddr, ctx: Arc<Ctx>) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("--listen {listen}: cannot bind"))?;
    let bound = listener
        .local_addr()
        .context("cannot read the bound address")?;
    let token = auth::random_hex(32);
    let app = Arc::new(App {
        control: ctx.control(),
        ctx,
        auth: Auth::new(token.clone()),
        hosts: vec![bound.to_string(), format!("localhost:{}", bound.port())],
    });
    // The readiness signal for whoever started the console: both lines, flushed.
    say!("pgmtls console: serving http://{bound}/");
    say!("Log in (once) with: http://{bound}/login?token={token}");
    let router = router(app);
    axum::serve(
        listener,
        router.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown())
    .await
    .context("console server failed")
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
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
    next: Next,
) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    if !app.hosts.iter().any(|h| h == host) {
        tracing::warn!(client = %peer, host, reason = "host", "console: request refused: unexpected Host");
        eprintln!("pgmtls console: refused {peer}: unexpected Host header {host:?}");
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
    if path == "/login" || path == "/style.css" {
        return next.run(req).await;
    }
    let session = req
        .headers()
        .get(header::COOKIE)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| auth::cookie(h, COOKIE))
        .and_then(|id| app.auth.session(id));
    let Some(session) = session else {
        if req.method() == Method::GET || req.method() == Method::HEAD {
            return see_other("/login");
        }
        eprintln!(
            "pgmtls console: refused {} {} from {peer}: no session",
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
                return html(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    pages::error(Some(&session), "Form too large", "Nothing was changed."),
                )
            }
        };
        let fields: HashMap<String, String> =
            serde_urlencoded::from_bytes::<Vec<(String, String)>>(&bytes)
                .map(|v| v.into_iter().collect())
                .unwrap_or_default();
        let given = fields.get("csrf").map(String::as_str).unwrap_or("");
        if !auth::same(given, &session.csrf) {
            eprintln!(
                "pgmtls console: refused POST {} from {peer} (session {}): {} CSRF token",
                parts.uri.path(),
                session.label,
                if given.is_empty() { "missing" } else { "wrong" }
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

async fn login(
    State(app): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let Some(token) = query.get("token") else {
        return html(
            StatusCode::UNAUTHORIZED,
            pages::login("Log in with the URL the console printed."),
        );
    };
    match app.auth.login(token, peer.ip()) {
        Login::Ok(s) => {
            eprintln!("pgmtls console: session {} started from {peer}", s.label);
            let cookie = format!(
                "{COOKIE}={}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}",
                s.id,
                auth::SESSION_LIFETIME.as_secs()
            );
            (
                StatusCode::SEE_OTHER,
                [
                    (header::LOCATION, "/".to_owned()),
                    (header::SET_COOKIE, cookie),
                ],
            )
                .into_response()
        }
        Login::Refused { failures } => {
            eprintln!(
                "pgmtls console: login refused from {peer}: bad or used token ({failures} \
                 refused since start)"
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
            eprintln!(
                "pgmtls console: login refused from {peer}: locked after {} bad tokens \
                 ({failures} refused since start)",
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
        "{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"
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

/// `POST /mtls`: `control::mtls::enable` with the CLI's defaults for what the form does not
/// ask (no upstream TLS, a P-256 key, no CN binding), after the name is typed twice as the
/// CLI's `--confirm` asks.
async fn enable_mtls(
    State(app): State<Shared>,
    Extension(session): Extension<Session>,
    Extension(fields): Extension<Fields>,
) -> Response {
    let form = EnableForm {
        message: None,
        name: fields.get("name").trim().to_owned(),
        listen: fields.get("listen").trim().to_owned(),
        upstream: fields.get("upstream").trim().to_owned(),
        server_name: fields.get("server_name").trim().to_owned(),
    };
    let confirm = fields.get("confirm").trim().to_owned();
    let (control, actor, f) = (app.control.clone(), session.actor(), form.clone());
    let result = blocking(move || {
        // The CLI's own parser: an address, or `shared` for the SNI listener.
        let listen: crate::state::Listen = f
            .listen
            .parse()
            .map_err(|e: String| ControlError::Invalid(format!("listen: {e}")))?;
        let upstream = f
            .upstream
            .parse()
            .map_err(|e: String| ControlError::Invalid(format!("upstream: {e}")))?;
        let request = control::mtls::EnableRequest {
            name: f.name.clone(),
            listen,
            upstream,
            upstream_tls: Default::default(),
            upstream_ca_pem: None,
            upstream_server_name: None,
            allow_plaintext_remote_upstream: false,
            user_must_match_cn: false,
            server_names: Some(f.server_name.clone())
                .filter(|n| !n.is_empty())
                .into_iter()
                .collect(),
            key_type: Default::default(),
            common_name: None,
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
    let proxy = proxy_view(app).await;
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
        certificates,
        audit,
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
        ControlError::Invalid(_) => StatusCode::BAD_REQUEST,
        ControlError::UnknownDatabase { .. } | ControlError::NotFound(_) => StatusCode::NOT_FOUND,
        ControlError::Conflict(_) | ControlError::Changed { .. } => StatusCode::CONFLICT,
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
