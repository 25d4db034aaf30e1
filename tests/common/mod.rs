//! Shared integration-test harness: a throwaway PostgreSQL per test
//! ([`pg`]), a generated test PKI ([`pki`]) and client helpers
//! ([`clients`]).
//!
//! Each test file pulls this in with `mod common;`. Cargo compiles the module
//! once per test file, so helpers a given file does not use would otherwise
//! warn as dead code.
// Not every test file uses every helper.
#![allow(dead_code)]
// The harness panics with context on setup failures; that is the test failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod admin;
pub mod churn;
pub mod clients;
pub mod etcd;
pub mod haproxy;
pub mod netns;
pub mod pg;
pub mod pki;
pub mod proxy;
pub mod state;
pub mod wire;
