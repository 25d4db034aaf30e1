//! pgmtls: a mutual-TLS proxy for PostgreSQL.

pub mod pki;
