//! The console's HTML. Pages are built from plain values the handlers gathered; nothing here
//! reads state or decides anything. maud escapes every value put into the markup.

use maud::{html, Markup, DOCTYPE};

use super::activity::{Refusals, BUCKETS, WINDOW};
use super::auth::Session;
use crate::allowlist::MAX_RULES;
use crate::sessions::SessionView;
use crate::state::{AuditEntry, MAX_DESCRIPTION};

/// One row of the databases page.
#[derive(Debug, Clone, Default)]
pub struct DbRow {
    pub name: String,
    pub listen: Option<String>,
    pub upstream: Option<String>,
    pub tls_status: String,
    pub rules: Option<usize>,
    pub certificates: Option<usize>,
    pub next_expiry: Option<String>,
    /// Why the database does not load, when it does not.
    pub error: Option<String>,
}

/// One IP rule as listed.
#[derive(Debug, Clone)]
pub struct RuleRow {
    pub id: String,
    pub cidr: String,
    pub description: String,
    pub created: String,
    pub status: String,
}

/// One client certificate as listed.
#[derive(Debug, Clone)]
pub struct CertRow {
    pub id: String,
    pub common_name: String,
    pub created: String,
    pub expires: String,
    pub status: String,
    pub revoked: bool,
    /// For a usable certificate: the psql line and the libpq environment variables for its
    /// files as the download names them with the default prefix, run where they were unpacked.
    pub connect: Option<(String, Vec<(&'static str, String)>)>,
}

/// The prefix the download form suggests: the database's name, so that the files of several
/// databases can sit in one directory.
pub fn default_prefix(database: &str) -> String {
    format!("{database}_")
}

/// The enable form's typed values, and why it was refused. The fields are the flags of
/// `pgmtls mtls create`.
#[derive(Debug, Clone)]
pub struct EnableForm {
    pub message: Option<String>,
    pub name: String,
    pub listen: String,
    pub upstream: String,
    /// `--server-name`, repeated: names separated by commas or spaces.
    pub server_name: String,
    pub upstream_tls: String,
    /// `--upstream-ca`: the CA certificate itself (PEM), pasted.
    pub upstream_ca: String,
    pub upstream_server_name: String,
    pub allow_plaintext_remote_upstream: bool,
    pub user_must_match_cn: bool,
    pub key_type: String,
    pub common_name: String,
}

impl Default for EnableForm {
    /// The defaults of `mtls create`.
    fn default() -> Self {
        EnableForm {
            message: None,
            name: String::new(),
            listen: String::new(),
            upstream: String::new(),
            server_name: String::new(),
            upstream_tls: "disable".into(),
            upstream_ca: String::new(),
            upstream_server_name: String::new(),
            allow_plaintext_remote_upstream: false,
            user_must_match_cn: false,
            key_type: crate::pki::KeyType::default().as_str().into(),
            common_name: String::new(),
        }
    }
}

impl EnableForm {
    /// Something other than a default was typed in the "more options" part: it opens.
    fn more(&self) -> bool {
        let d = EnableForm::default();
        self.upstream_tls != d.upstream_tls
            || !self.upstream_ca.is_empty()
            || !self.upstream_server_name.is_empty()
            || self.allow_plaintext_remote_upstream
            || self.user_must_match_cn
            || self.key_type != d.key_type
            || !self.common_name.is_empty()
    }
}

/// Everything the page of one database shows.
#[derive(Debug, Clone)]
pub struct DbView {
    pub name: String,
    pub tls_status: String,
    pub settings: Vec<(&'static str, String)>,
    pub rules: Vec<RuleRow>,
    /// The trusted IP ranges, shown read-only (`pgmtls trusted-ips` changes them).
    pub trusted_ips: Vec<RuleRow>,
    pub certificates: Vec<CertRow>,
    /// The database's audit records, newest first, or why they could not be read.
    pub audit: Result<Vec<AuditEntry>, String>,
    /// What the proxy's admin endpoint says is happening now.
    pub live: Live,
}

/// The Activity section's parts read from the running proxy.
#[derive(Debug, Clone)]
pub struct Live {
    /// The admin endpoint asked, as shown (`None`: none configured).
    pub proxy: Option<String>,
    /// The database's live sessions, or why they cannot be read.
    pub sessions: Result<Vec<SessionView>, String>,
    pub refusals: Refusals,
}

/// Which form an inline error belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    Rules,
    Certificates,
    Disable,
}

/// A refused change, shown next to the form it came from, with what was typed.
#[derive(Debug, Clone)]
pub struct FormError {
    pub section: Section,
    pub message: String,
    pub cidr: String,
    pub description: String,
}

fn layout(title: &str, session: Option<&Session>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · pgmtls console" }
                link rel="stylesheet" href="/style.css";
            }
            body {
                header.top {
                    a.brand href="/" { "pgmtls console" }
                    @if let Some(s) = session {
                        nav {
                            a href="/" { "Databases" }
                            form.inline method="post" action="/logout" {
                                (csrf(s))
                                button.link type="submit" { "Log out" }
                            }
                        }
                    }
                }
                main { (body) }
            }
        }
    }
}

fn csrf(s: &Session) -> Markup {
    html! { input type="hidden" name="csrf" value=(s.csrf); }
}

fn flash(message: Option<&str>) -> Markup {
    html! {
        @if let Some(m) = message {
            p.notice role="status" { (m) }
        }
    }
}

/// `/login` without a (good) token.
pub fn login(message: &str) -> Markup {
    layout(
        "Log in",
        None,
        html! {
            h1 { "Log in" }
            p.error role="alert" { (message) }
            p {
                "Open the login URL that " code { "pgmtls console" } " printed when it started ("
                code { "http://127.0.0.1:PORT/login?token=…" } "). It works once; to log in "
                "again, restart the console for a new one."
            }
        },
    )
}

/// A page that only says what went wrong.
pub fn error(session: Option<&Session>, title: &str, message: &str) -> Markup {
    layout(
        title,
        session,
        html! {
            h1 { (title) }
            p.error role="alert" { (message) }
            p { a href="/" { "Back to the databases" } }
        },
    )
}

/// `/`: every database.
pub fn databases(
    session: &Session,
    rows: &[DbRow],
    proxy_note: Option<&str>,
    login_failures: u64,
    notice: Option<&str>,
    enable: &EnableForm,
) -> Markup {
    let n = |v: Option<usize>| v.map(|v| v.to_string()).unwrap_or_else(|| "-".into());
    layout(
        "Databases",
        Some(session),
        html! {
            h1 { "Databases" }
            (flash(notice))
            @if let Some(note) = proxy_note {
                p.note { "Proxy: " (note) }
            }
            @if rows.is_empty() {
                p { "No databases yet. Enable one with " code { "pgmtls mtls create" } "." }
            } @else {
                div.scroll {
                    table {
                        thead { tr {
                            th scope="col" { "Name" } th scope="col" { "Listen" }
                            th scope="col" { "Upstream" } th scope="col" { "mTLS status" }
                            th scope="col" { "IP rules" } th scope="col" { "Certificates" }
                            th scope="col" { "Next certificate expiry" }
                        } }
                        tbody {
                            @for r in rows {
                                tr {
                                    td { a href={ "/databases/" (r.name) } { (r.name) } }
                                    @if let Some(e) = &r.error {
                                        td colspan="6" .error { "does not load: " (e) }
                                    } @else {
                                        td { code { (r.listen.as_deref().unwrap_or("-")) } }
                                        td { code { (r.upstream.as_deref().unwrap_or("-")) } }
                                        td { (r.tls_status) }
                                        td.num { (n(r.rules)) }
                                        td.num { (n(r.certificates)) }
                                        td { (r.next_expiry.as_deref().unwrap_or("-")) }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            section aria-labelledby="enable" {
                h2 #enable { "Enable mTLS for a database" }
                p.warning {
                    "Enabling mTLS opens this database to clients on the network that hold one of \
                     its client certificates (and pass its IP rules). The change is recorded in \
                     the audit log under your session."
                }
                @if let Some(e) = &enable.message {
                    p.error role="alert" #enable-error { (e) }
                }
                form.stacked method="post" action="/mtls" {
                    (csrf(session))
                    label for="enable-name" { "Database name (lowercase letters, digits, '-' or '_')" }
                    input #enable-name type="text" name="name" required value=(enable.name);
                    label for="enable-listen" { "Listen address (ADDR:PORT; port 0 takes a free one)" }
                    input #enable-listen type="text" name="listen" required value=(enable.listen);
                    label for="enable-upstream" { "Upstream PostgreSQL (HOST:PORT; plaintext only to loopback)" }
                    input #enable-upstream type="text" name="upstream" required value=(enable.upstream);
                    label for="enable-server-name" { "Server names clients use (optional; DNS names or IPs, separated by commas)" }
                    input #enable-server-name type="text" name="server_name" value=(enable.server_name);
                    details open[enable.more()] {
                        summary { "More options (as the flags of " code { "mtls create" } ")" }
                        div.more {
                        label for="enable-upstream-tls" { "TLS to the upstream (--upstream-tls)" }
                        select #enable-upstream-tls name="upstream_tls" {
                            @for (v, text) in [
                                ("disable", "disable: plaintext (loopback only)"),
                                ("require", "require: encrypted, certificate not checked"),
                                ("verify-full", "verify-full: checked against the CA below"),
                            ] {
                                option value=(v) selected[enable.upstream_tls == v] { (text) }
                            }
                        }
                        label for="enable-upstream-ca" { "Upstream CA certificate, PEM (--upstream-ca; for verify-full)" }
                        textarea #enable-upstream-ca name="upstream_ca" rows="4" { (enable.upstream_ca) }
                        label for="enable-upstream-server-name" { "Name checked against the upstream certificate (--upstream-server-name; default: the upstream host)" }
                        input #enable-upstream-server-name type="text" name="upstream_server_name" value=(enable.upstream_server_name);
                        div.check {
                            input #enable-allow-plaintext type="checkbox" name="allow_plaintext_remote_upstream" value="yes" checked[enable.allow_plaintext_remote_upstream];
                            label for="enable-allow-plaintext" { "Allow plaintext to an upstream off loopback (--allow-plaintext-remote-upstream; exposes passwords and data on the network)" }
                        }
                        div.check {
                            input #enable-user-must-match-cn type="checkbox" name="user_must_match_cn" value="yes" checked[enable.user_must_match_cn];
                            label for="enable-user-must-match-cn" { "Refuse sessions whose user is not the certificate's common name (--user-must-match-cn)" }
                        }
                        label for="enable-key-type" { "Key type of the CA, server and first client certificate (--key-type)" }
                        select #enable-key-type name="key_type" {
                            @for k in crate::pki::KeyType::ALL {
                                option value=(k.as_str()) selected[enable.key_type == k.as_str()] { (k.as_str()) }
                            }
                        }
                        label for="enable-common-name" { "Common name of the first client certificate (--common-name; default: its id)" }
                        input #enable-common-name type="text" name="common_name" value=(enable.common_name);
                        }
                    }
                    label for="enable-confirm" { "Type the database name again to confirm" }
                    input #enable-confirm type="text" name="confirm" required;
                    button type="submit" { "Enable mTLS" }
                }
            }
            p.small { "Refused login attempts since the console started: " (login_failures) }
        },
    )
}

/// `/databases/NAME`.
pub fn database(
    session: &Session,
    view: &DbView,
    proxy_note: Option<&str>,
    notice: Option<&str>,
    error: Option<&FormError>,
) -> Markup {
    let name = &view.name;
    let form_error = |section: Section| error.filter(|e| e.section == section);
    let full = view.rules.len() >= MAX_RULES;
    layout(
        name,
        Some(session),
        html! {
            h1 { "Database " code { (name) } }
            (flash(notice))
            @if let Some(note) = proxy_note {
                p.note { "Proxy: " (note) }
            }
            section aria-labelledby="settings" {
                h2 #settings { "Settings" }
                dl.settings {
                    dt { "mTLS status" } dd { (view.tls_status) }
                    @for (k, v) in &view.settings {
                        dt { (k) } dd { code { (v) } }
                    }
                }
            }
            section aria-labelledby="rules" {
                h2 #rules { "IP rules" }
                p.count { (view.rules.len()) " of " (MAX_RULES) " rules" }
                @if view.rules.is_empty() {
                    p { "No IP rules: nobody can connect." }
                } @else {
                    div.scroll { table {
                        thead { tr {
                            th scope="col" { "ID" } th scope="col" { "CIDR" }
                            th scope="col" { "Description" } th scope="col" { "Created" }
                            th scope="col" { "Status" } th scope="col" { "Delete" }
                        } }
                        tbody { @for r in &view.rules { tr {
                            td { code.id { (r.id) } }
                            td { code { (r.cidr) } }
                            td { (r.description) }
                            td { (r.created) }
                            td { (r.status) }
                            td {
                                form.inline method="post" action={ "/databases/" (name) "/ip-rules/delete" } {
                                    (csrf(session))
                                    input type="hidden" name="id" value=(r.id);
                                    label {
                                        input type="checkbox" name="confirm" value="yes" required;
                                        " confirm"
                                    }
                                    button.danger type="submit" { "Delete " (r.cidr) }
                                }
                            }
                        } } }
                    } }
                }
                h3 { "Add a rule" }
                @if let Some(e) = form_error(Section::Rules) {
                    p.error role="alert" #rule-error { (e.message) }
                }
                @if full {
                    p.error { "This database has the maximum of " (MAX_RULES) " rules: delete one before adding another." }
                }
                form.stacked method="post" action={ "/databases/" (name) "/ip-rules" } {
                    (csrf(session))
                    label for="cidr" { "CIDR block (no host bits), e.g. 203.0.113.7/32 or 2001:db8::/48" }
                    input #cidr type="text" name="cidr" required
                        value=(form_error(Section::Rules).map(|e| e.cidr.as_str()).unwrap_or(""));
                    label for="description" { "Description (at most " (MAX_DESCRIPTION) " characters)" }
                    input #description type="text" name="description"
                        value=(form_error(Section::Rules).map(|e| e.description.as_str()).unwrap_or(""));
                    button type="submit" disabled[full] { "Add rule" }
                }
            }
            section aria-labelledby="trusted-ips" {
                h2 #trusted-ips { "Trusted IP ranges" }
                p { "Admitted over TLS without a client certificate where no IP rule covers the \
                     address; Postgres' authentication decides. Changed with "
                    code { "pgmtls trusted-ips" } "." }
                @if view.trusted_ips.is_empty() {
                    p { "No trusted IP ranges." }
                } @else {
                    div.scroll { table {
                        thead { tr {
                            th scope="col" { "ID" } th scope="col" { "CIDR" }
                            th scope="col" { "Description" } th scope="col" { "Created" }
                            th scope="col" { "Status" }
                        } }
                        tbody { @for r in &view.trusted_ips { tr {
                            td { code.id { (r.id) } }
                            td { code { (r.cidr) } }
                            td { (r.description) }
                            td { (r.created) }
                            td { (r.status) }
                        } } }
                    } }
                }
            }
            section aria-labelledby="certificates" {
                h2 #certificates { "Client certificates" }
                @if view.certificates.is_empty() {
                    p { "No client certificates." }
                } @else {
                    div.scroll { table {
                        thead { tr {
                            th scope="col" { "ID" } th scope="col" { "Common name" }
                            th scope="col" { "Created" } th scope="col" { "Expires" }
                            th scope="col" { "Status" } th scope="col" { "Download" }
                            th scope="col" { "Revoke" }
                        } }
                        tbody { @for c in &view.certificates { tr {
                            td { code.id { (c.id) } }
                            td { (c.common_name) }
                            td { (c.created) }
                            td { (c.expires) }
                            td { (c.status) }
                            td {
                                @if !c.revoked {
                                    form.inline method="post" action={ "/databases/" (name) "/certificates/download" } {
                                        (csrf(session))
                                        input type="hidden" name="id" value=(c.id);
                                        label for={ "prefix-" (c.id) } { "File name prefix" }
                                        input id={ "prefix-" (c.id) } type="text" name="prefix"
                                            value=(default_prefix(name)) size="12";
                                        button type="submit" { "Download .tar" }
                                    }
                                }
                            }
                            td {
                                @if !c.revoked {
                                    form.inline method="post" action={ "/databases/" (name) "/certificates/revoke" } {
                                        (csrf(session))
                                        input type="hidden" name="id" value=(c.id);
                                        label {
                                            input type="checkbox" name="confirm" value="yes" required;
                                            " confirm"
                                        }
                                        button.danger type="submit" { "Revoke" }
                                    }
                                }
                            }
                        } } }
                    } }
                }
                p.small {
                    "The download is one tar archive of four files: the certificate chain, its \
                     key (mode 0600), the database CA and the key as DER PKCS#8 (for JDBC). It \
                     is recorded in the activity list. The CLI writes the same files with "
                    code { "pgmtls certificates download " (name) " --id ID" } "."
                }
                @for c in view.certificates.iter().filter(|c| c.connect.is_some()) {
                    @if let Some((line, env)) = &c.connect {
                        h3 { "Connect with certificate " code.id { (c.id) } }
                        p { "In the directory where the archive was unpacked:" }
                        pre { code { "psql \"" (line) "\"" } }
                        p { "or with libpq's environment variables:" }
                        pre { code { @for (k, v) in env { (k) "=" (v) "\n" } } }
                    }
                }
                h3 { "Create a certificate" }
                @if let Some(e) = form_error(Section::Certificates) {
                    p.error role="alert" #certificate-error { (e.message) }
                }
                form.stacked method="post" action={ "/databases/" (name) "/certificates" } {
                    (csrf(session))
                    label for="common_name" { "Common name (optional; default: the certificate's id)" }
                    input #common_name type="text" name="common_name";
                    button type="submit" { "Create certificate" }
                }
            }
            section aria-labelledby="disable" {
                h2 #disable { "Disable mTLS" }
                p.warning {
                    "Disabling mTLS stops all access to this database through pgmtls and closes \
                     its sessions. Its directory, keys included, is archived, not deleted. The \
                     change is recorded in the audit log under your session."
                }
                @if let Some(e) = form_error(Section::Disable) {
                    p.error role="alert" #disable-error { (e.message) }
                }
                form.stacked method="post" action={ "/databases/" (name) "/disable" } {
                    (csrf(session))
                    label for="disable-confirm" { "Type " code { (name) } " to confirm" }
                    input #disable-confirm type="text" name="confirm" required;
                    button.danger type="submit" { "Disable mTLS" }
                }
            }
            section aria-labelledby="activity" {
                h2 #activity { "Activity" }
                (live(&view.live))
                h3 #changes { "Changes" }
                @match &view.audit {
                    Err(e) => p.error { "The audit log cannot be read: " (e) },
                    Ok(entries) if entries.is_empty() => p { "No changes recorded." },
                    Ok(entries) => div.scroll { table {
                        thead { tr {
                            th scope="col" { "Time" } th scope="col" { "Actor" }
                            th scope="col" { "Action" } th scope="col" { "Details" }
                        } }
                        tbody { @for a in entries { tr.audit {
                            td { (crate::cli::output::human_time(a.time)) }
                            td { (a.actor) }
                            td { code { (a.action) } }
                            td { code.details { (a.details.to_string()) } }
                        } } }
                    } },
                }
            }
        },
    )
}

/// Live sessions and the refusals chart. Says `unknown` and why when the proxy does not answer.
fn live(live: &Live) -> Markup {
    let from = live.proxy.as_deref().unwrap_or("no admin endpoint");
    let minutes = WINDOW.as_secs() / 60 / BUCKETS as u64;
    let r = &live.refusals;
    // One scale for every reason, so bars compare across rows.
    let max = r
        .by_reason
        .iter()
        .flat_map(|(_, b, _)| b.iter().copied())
        .max()
        .unwrap_or(0)
        .max(1);
    html! {
        h3 #sessions { "Live sessions" }
        @match &live.sessions {
            Err(e) => p.note { "unknown: " (e) },
            Ok(list) if list.is_empty() => p { "No live sessions on the proxy at " code { (from) } "." },
            Ok(list) => {
                p.small { (list.len()) " on the proxy at " code { (from) } ", oldest first." }
                div.scroll { table {
                    thead { tr {
                        th scope="col" { "Client" } th scope="col" { "Certificate" }
                        th scope="col" { "User" } th scope="col" { "Postgres database" }
                        th scope="col" { "State" } th scope="col" { "Since" }
                    } }
                    tbody { @for s in list { tr {
                        td { code { (s.client_addr) } }
                        td {
                            code.id { (s.certificate_id.as_deref().unwrap_or("(no record)")) }
                            @if let Some(cn) = &s.common_name { " CN " (cn) }
                            br;
                            span.small { "serial " code.details { (s.certificate_serial) } }
                        }
                        td { (s.user.as_deref().unwrap_or("-")) }
                        td { (s.pg_database.as_deref().unwrap_or("-")) }
                        td { (s.state) }
                        td { (crate::cli::output::human_time(s.since)) }
                    } } }
                } }
            }
        }
        h3 #refusals { "Refusals in the last hour" }
        @if let Some(e) = &r.error {
            p.note { "unknown: the last sample of the proxy's metrics failed: " (e) }
        }
        @if let Some(since) = r.since.filter(|_| r.by_reason.is_empty()) {
            p { "No refusals since " (crate::cli::output::human_time(since)) "." }
        } @else if r.since.is_none() {
            p.note { "unknown: no sample of the proxy's metrics yet." }
        }
        @if !r.by_reason.is_empty() {
            p.small {
                "Connections the proxy at " code { (from) } " refused or cut, by reason"
                @if let Some(since) = r.since { ", since " (crate::cli::output::human_time(since)) }
                ". Each bar is " (minutes) " minutes, the oldest on the left; the tallest is "
                (max) "."
            }
            div.scroll { table.refusals {
                thead { tr {
                    th scope="col" { "Reason" }
                    th scope="col" { "Per " (minutes) " minutes" }
                    th scope="col" .num { "Total" }
                } }
                tbody { @for (reason, buckets, total) in &r.by_reason { tr {
                    td { code { (reason) } }
                    td { (bars(reason, buckets, max, minutes)) }
                    td.num { (total) }
                } } }
            } }
        }
    }
}

/// A small bar chart as inline SVG (the CSP allows it: no script, no style attribute; the
/// stylesheet colours it). Its label spells out the counts for those who cannot see it.
fn bars(reason: &str, buckets: &[u64; BUCKETS], max: u64, minutes: u64) -> Markup {
    const BAR: u64 = 12;
    const GAP: u64 = 3;
    const HEIGHT: u64 = 32;
    let width = BUCKETS as u64 * (BAR + GAP) - GAP;
    let label = format!(
        "{reason}, per {minutes} minutes, oldest first: {}",
        buckets
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    );
    html! {
        svg.bars role="img" aria-label=(label) width=(width) height=(HEIGHT)
            viewBox={ "0 0 " (width) " " (HEIGHT) } xmlns="http://www.w3.org/2000/svg" {
            @for (i, &n) in buckets.iter().enumerate() {
                @let h = if n == 0 { 1 } else { (n * (HEIGHT - 2) / max).max(3) };
                rect class=(if n == 0 { "zero" } else { "bar" })
                    x=(i as u64 * (BAR + GAP)) y=(HEIGHT - h) width=(BAR) height=(h) {
                    title { (n) }
                }
            }
        }
    }
}

/// The stylesheet, served as `/style.css` (CSP allows styles from the console itself only).
pub const STYLE: &str = include_str!("style.css");
