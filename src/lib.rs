//! pgmtls: a mutual-TLS proxy for PostgreSQL.
