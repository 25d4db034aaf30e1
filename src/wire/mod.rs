//! PostgreSQL wire format: bytes in, typed values out. Pure and synchronous so that every
//! parser here can be unit-tested and fuzzed without sockets.
//!
//! Protocol reference: <https://www.postgresql.org/docs/current/protocol-message-formats.html>.

pub mod backend;
pub mod frontend;

pub use backend::{error_response, AuthRequest, BackendMessage};
pub use frontend::{FirstPacket, StartupParams, WireError, MAX_STARTUP_PACKET};

#[cfg(test)]
mod fuzz_tests;
