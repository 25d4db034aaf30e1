//! The peer channel's two messages. A replica that receives a CancelRequest for a session of
//! another replica sends that replica one [`Request`] (the client-visible key and the
//! database it arrived for) and reads back one [`Reply`] byte. Both sides are authenticated
//! by mutual TLS before a byte of these is read.
//!
//! Request: `PGMC` (4) | version 1 (1) | database length (1) | database | process id (4) |
//! secret length (2) | secret. Everything big-endian.

use crate::wire::frontend::{CancelKey, MAX_CANCEL_SECRET};

pub const MAGIC: &[u8; 4] = b"PGMC";
pub const VERSION: u8 = 1;
/// The longest request: header, a 255-byte database name, process id, longest secret.
pub const MAX_REQUEST: usize = 4 + 1 + 1 + 255 + 4 + 2 + MAX_CANCEL_SECRET;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub database: String,
    pub key: CancelKey,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// The owner holds the key and its Postgres took the CancelRequest.
    Forwarded = 0,
    /// The owner relays no session with this key for this database.
    UnknownKey = 1,
    /// The owner holds the key but could not reach its Postgres.
    UpstreamFailed = 2,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MessageError {
    #[error("peer cancel request is truncated")]
    Truncated,
    #[error("peer cancel request has trailing bytes")]
    Trailing,
    #[error("not a peer cancel request (bad magic)")]
    BadMagic,
    #[error("peer cancel request version {0} is not supported")]
    BadVersion(u8),
    #[error("peer cancel request database name is empty or not UTF-8")]
    BadDatabase,
    #[error("peer cancel request secret of {0} bytes is out of range")]
    BadSecret(usize),
    #[error("peer cancel reply byte {0} is unknown")]
    BadReply(u8),
}

impl Request {
    pub fn encode(&self) -> Vec<u8> {
        let db = self.database.as_bytes();
        let db = &db[..db.len().min(255)];
        let secret = self.key.secret();
        let mut out = Vec::with_capacity(12 + db.len() + secret.len());
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.push(db.len() as u8);
        out.extend_from_slice(db);
        out.extend_from_slice(&self.key.process_id().to_be_bytes());
        out.extend_from_slice(&(secret.len() as u16).to_be_bytes());
        out.extend_from_slice(secret);
        out
    }

    /// How many bytes the request starting with `head` has in all, once enough of it is
    /// there to say: `Ok(None)` means "read more". Lets a reader stop at the request's end.
    pub fn total_len(head: &[u8]) -> Result<Option<usize>, MessageError> {
        if head.len() < 6 {
            return Ok(None);
        }
        check_header(head)?;
        let db_len = usize::from(head[5]);
        let at = 6 + db_len + 4;
        if head.len() < at + 2 {
            return Ok(None);
        }
        let secret_len = usize::from(u16::from_be_bytes([head[at], head[at + 1]]));
        if !(4..=MAX_CANCEL_SECRET).contains(&secret_len) {
            return Err(MessageError::BadSecret(secret_len));
        }
        Ok(Some(at + 2 + secret_len))
    }

    pub fn parse(b: &[u8]) -> Result<Request, MessageError> {
        let total = Self::total_len(b)?.ok_or(MessageError::Truncated)?;
        if b.len() < total {
            return Err(MessageError::Truncated);
        }
        if b.len() > total {
            return Err(MessageError::Trailing);
        }
        let db_len = usize::from(b[5]);
        let database = std::str::from_utf8(&b[6..6 + db_len])
            .ok()
            .filter(|s| !s.is_empty())
            .ok_or(MessageError::BadDatabase)?
            .to_owned();
        let at = 6 + db_len;
        let pid = u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let secret = &b[at + 6..];
        let key = CancelKey::new(pid, secret).ok_or(MessageError::BadSecret(secret.len()))?;
        Ok(Request { database, key })
    }
}

fn check_header(head: &[u8]) -> Result<(), MessageError> {
    if &head[..4] != MAGIC {
        return Err(MessageError::BadMagic);
    }
    if head[4] != VERSION {
        return Err(MessageError::BadVersion(head[4]));
    }
    Ok(())
}

impl Reply {
    pub fn parse(b: u8) -> Result<Reply, MessageError> {
        match b {
            0 => Ok(Reply::Forwarded),
            1 => Ok(Reply::UnknownKey),
            2 => Ok(Reply::UpstreamFailed),
            other => Err(MessageError::BadReply(other)),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Reply::Forwarded => "forwarded",
            Reply::UnknownKey => "unknown_key",
            Reply::UpstreamFailed => "upstream_failed",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(secret: &[u8]) -> Request {
        Request {
            database: "orders".into(),
            key: CancelKey::new(4242, secret).unwrap(),
        }
    }

    #[test]
    fn requests_round_trip_for_short_and_long_keys() {
        for secret in [&[1u8, 2, 3, 4][..], &[7u8; 32][..], &[9u8; 256][..]] {
            let r = req(secret);
            let b = r.encode();
            assert_eq!(Request::total_len(&b), Ok(Some(b.len())));
            assert_eq!(Request::parse(&b), Ok(r));
        }
    }

    #[test]
    fn every_bad_request_is_refused_with_its_reason() {
        let good = req(&[1, 2, 3, 4]).encode();
        assert_eq!(
            Request::parse(&good[..good.len() - 1]),
            Err(MessageError::Truncated)
        );
        assert_eq!(Request::parse(&good[..3]), Err(MessageError::Truncated));
        assert_eq!(Request::parse(&[]), Err(MessageError::Truncated));
        let mut long = good.clone();
        long.push(0);
        assert_eq!(Request::parse(&long), Err(MessageError::Trailing));
        let mut magic = good.clone();
        magic[0] = b'X';
        assert_eq!(Request::parse(&magic), Err(MessageError::BadMagic));
        let mut version = good.clone();
        version[4] = 9;
        assert_eq!(Request::parse(&version), Err(MessageError::BadVersion(9)));
        // A CancelRequest sent as-is is not a peer request.
        let raw = CancelKey::new(1, &[1, 2, 3, 4]).unwrap().to_request();
        assert!(Request::parse(&raw).is_err());
        // Secret lengths outside 4..=256.
        for n in [0u16, 3, 257, u16::MAX] {
            let mut b = good[..6 + 6 + 4].to_vec();
            b.extend_from_slice(&n.to_be_bytes());
            assert_eq!(
                Request::total_len(&b),
                Err(MessageError::BadSecret(usize::from(n)))
            );
        }
        // Empty and non-UTF-8 database names.
        let mut empty = vec![b'P', b'G', b'M', b'C', 1, 0];
        empty.extend_from_slice(&1u32.to_be_bytes());
        empty.extend_from_slice(&4u16.to_be_bytes());
        empty.extend_from_slice(&[1, 2, 3, 4]);
        assert_eq!(Request::parse(&empty), Err(MessageError::BadDatabase));
        let mut bad_utf8 = good.clone();
        bad_utf8[6] = 0xff;
        assert_eq!(Request::parse(&bad_utf8), Err(MessageError::BadDatabase));
    }

    #[test]
    fn reply_bytes_parse_and_unknown_ones_are_refused() {
        for r in [Reply::Forwarded, Reply::UnknownKey, Reply::UpstreamFailed] {
            assert_eq!(Reply::parse(r as u8), Ok(r));
        }
        assert_eq!(Reply::parse(3), Err(MessageError::BadReply(3)));
        assert_eq!(Reply::parse(255), Err(MessageError::BadReply(255)));
    }
}
