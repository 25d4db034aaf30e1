//! pgmtls: a mutual-TLS proxy for PostgreSQL.
#![doc = include_str!("../README.md")]

pub mod allowlist;
pub mod config;
pub mod state;
pub mod wire;
