//! pgmtls: a mutual-TLS proxy for PostgreSQL.
#![doc = include_str!("../README.md")]

pub mod admin;
pub mod allowlist;
pub mod app;
pub mod config;
pub mod conn;
pub mod listener;
pub mod metrics;
pub mod process_metrics;
pub mod reload;
pub mod sessions;
pub mod snapshot;
pub mod state;
pub mod tls_store;
pub mod wire;
