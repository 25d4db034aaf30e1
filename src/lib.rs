//! pgmtls: a mutual-TLS proxy for PostgreSQL.
//!
//! Data plane, in the order a connection moves through it:
//! [`listener`] accepts -> [`conn`] runs the lifecycle (admit by [`allowlist`], negotiate,
//! TLS with [`tls_store`]'s config, startup, upstream, relay) using the parsers in [`wire`],
//! reading one [`snapshot`] per connection and registering live [`sessions`].
//!
//! Control plane: [`config`] (process settings) and [`state`] (the per-database state
//! directory) are read through one parser each; [`pki`] issues and revokes certificates;
//! [`app`] builds the snapshot, binds listeners, reloads and drains; [`reload`] watches the
//! files and turns changes, SIGHUP and a poll into reloads; [`metrics`] and
//! [`process_metrics`] count; [`logging`] writes the log without blocking and
//! [`refusal_log`] rate-limits refusal lines; [`admin`] serves metrics, health and status over
//! HTTP; [`control`] is the one mutation path: every change to state, validated and audited;
//! [`cli`] holds the control commands that parse flags, call it and read `/status`.

pub mod admin;
/// `println!` for command output that treats a closed stdout (`pgmtls mtls db | head`) as the
/// reader being done rather than a reason to panic; used by the CLI and the demo.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// `print!` with the same treatment of a closed stdout as [`say!`].
macro_rules! say_raw {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout(), $($arg)*);
    }};
}

pub mod allowlist;
pub mod app;
pub mod cli;
pub mod client_verify;
pub mod config;
pub mod conn;
pub mod console;
pub mod control;
pub mod demo;
pub mod doctor;
pub mod fleet;
#[doc(hidden)]
pub mod fuzzing;
pub mod limits;
pub mod listener;
pub mod logging;
pub mod metrics;
pub mod pki;
pub mod process_metrics;
pub mod refusal_log;
pub mod reload;
pub mod sessions;
pub mod snapshot;
pub mod state;
pub mod store;
pub mod throttle;
pub mod tls_store;
pub mod wire;
