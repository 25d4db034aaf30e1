//! Messages a client sends before and right after TLS: the untyped "startup" packets
//! (`SSLRequest`, `GSSENCRequest`, `CancelRequest`, `StartupMessage`) and the typed
//! `SASLInitialResponse` we inspect for channel binding.

/// Largest startup packet we accept. PostgreSQL's own limit is `MAX_STARTUP_PACKET_LENGTH`
/// (10,000 bytes, src/include/libpq/pqcomm.h); a peer cannot make us buffer more.
pub const MAX_STARTUP_PACKET: usize = 10_000;

/// Request codes, from "Message Formats" in the protocol docs.
pub const SSL_REQUEST_CODE: u32 = 80_877_103;
pub const GSSENC_REQUEST_CODE: u32 = 80_877_104;
pub const CANCEL_REQUEST_CODE: u32 = 80_877_102;
/// Protocol 3.0 (`196608`). Minor versions 3.x are accepted: libpq 18 may ask for 3.2 and the
/// upstream negotiates it down with `NegotiateProtocolVersion`.
pub const PROTOCOL_MAJOR_3: u16 = 3;

/// The first byte of a TLS handshake record: a client using PostgreSQL 17's
/// `sslnegotiation=direct` starts TLS without an `SSLRequest`.
pub const TLS_HANDSHAKE_BYTE: u8 = 0x16;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("startup packet length {0} is out of range")]
    BadLength(u32),
    #[error("unsupported protocol or request code {0}")]
    UnknownCode(u32),
    #[error("malformed startup packet: {0}")]
    Malformed(&'static str),
    /// PostgreSQL keeps the last of repeated pairs, so a check that reads any one of them
    /// can be made to look at a different value than the server uses.
    #[error("startup parameter {0:?} appears more than once")]
    RepeatedParameter(String),
}

/// Longest identifier PostgreSQL keeps (`NAMEDATALEN - 1`); it silently truncates longer ones.
pub const MAX_IDENTIFIER_BYTES: usize = 63;

/// What the 8-byte header of a startup packet announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PacketHeader {
    SslRequest,
    GssEncRequest,
    /// A `CancelRequest`: `body_len` bytes of body (process id, secret key) follow.
    Cancel {
        body_len: usize,
    },
    /// A `StartupMessage`; `body_len` more bytes follow.
    Startup {
        body_len: usize,
        minor: u16,
    },
}

/// A decoded packet from a peer that has not started TLS yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FirstPacket {
    SslRequest,
    GssEncRequest,
    Cancel(CancelKey),
    Startup(StartupParams),
}

/// Longest secret a cancel key may carry: protocol 3.2 (PostgreSQL 18) allows up to 256
/// bytes; protocol 3.0 keys are exactly 4.
pub const MAX_CANCEL_SECRET: usize = 256;
/// The longest `CancelRequest` body: process id plus the longest secret.
pub const MAX_CANCEL_BODY: usize = 4 + MAX_CANCEL_SECRET;

/// A backend's cancel key, from `BackendKeyData` or a `CancelRequest`. Every relayed session
/// holds one for its whole life, so protocol 3.0's key (a 4-byte secret) is kept inline in 16
/// bytes; only PostgreSQL 18's longer keys (protocol 3.2) go to the heap.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CancelKey {
    Short { process_id: u32, secret: [u8; 4] },
    Long(Box<LongCancelKey>),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LongCancelKey {
    process_id: u32,
    secret: Box<[u8]>,
}

impl CancelKey {
    /// `None` unless the secret has 4..=256 bytes, the range the protocol allows.
    pub fn new(process_id: u32, secret: &[u8]) -> Option<Self> {
        match secret.len() {
            4 => Some(CancelKey::Short {
                process_id,
                secret: [secret[0], secret[1], secret[2], secret[3]],
            }),
            5..=MAX_CANCEL_SECRET => Some(CancelKey::Long(Box::new(LongCancelKey {
                process_id,
                secret: secret.into(),
            }))),
            _ => None,
        }
    }

    pub fn process_id(&self) -> u32 {
        match self {
            CancelKey::Short { process_id, .. } => *process_id,
            CancelKey::Long(k) => k.process_id,
        }
    }

    pub fn secret(&self) -> &[u8] {
        match self {
            CancelKey::Short { secret, .. } => secret,
            CancelKey::Long(k) => &k.secret,
        }
    }

    /// The `CancelRequest` packet that asks a backend to cancel this key's query.
    pub fn to_request(&self) -> Vec<u8> {
        let secret = self.secret();
        let len = 12 + secret.len();
        let mut out = Vec::with_capacity(len);
        out.extend_from_slice(&(len as u32).to_be_bytes());
        out.extend_from_slice(&CANCEL_REQUEST_CODE.to_be_bytes());
        out.extend_from_slice(&self.process_id().to_be_bytes());
        out.extend_from_slice(secret);
        out
    }
}

/// Parameters of a `StartupMessage`, kept in order so the packet can be re-encoded verbatim.
/// [`parse_startup_body`] guarantees that no key repeats, so the value [`get`](Self::get)
/// returns is the one PostgreSQL uses.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StartupParams {
    pub minor: u16,
    pub params: Vec<(String, String)>,
}

impl StartupParams {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn user(&self) -> Option<&str> {
        self.get("user")
    }

    /// The database the client asked for; PostgreSQL defaults it to the user name.
    pub fn database(&self) -> Option<&str> {
        self.get("database").or_else(|| self.user())
    }

    /// Re-encodes the message for the upstream.
    pub fn encode(&self) -> Vec<u8> {
        let body: usize = self
            .params
            .iter()
            .map(|(k, v)| k.len() + v.len() + 2)
            .sum::<usize>()
            + 1;
        let len = 8 + body;
        let mut out = Vec::with_capacity(len);
        out.extend_from_slice(&(len as u32).to_be_bytes());
        out.extend_from_slice(&PROTOCOL_MAJOR_3.to_be_bytes());
        out.extend_from_slice(&self.minor.to_be_bytes());
        for (k, v) in &self.params {
            out.extend_from_slice(k.as_bytes());
            out.push(0);
            out.extend_from_slice(v.as_bytes());
            out.push(0);
        }
        out.push(0);
        out
    }
}

/// Decodes the 8-byte header (length, code) of a startup-phase packet.
///
/// The length includes itself. Anything shorter than 8 or longer than
/// [`MAX_STARTUP_PACKET`] is refused before a single body byte is read.
pub fn parse_header(header: [u8; 8]) -> Result<PacketHeader, WireError> {
    let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
    let code = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
    if len < 8 || len as usize > MAX_STARTUP_PACKET {
        return Err(WireError::BadLength(len));
    }
    match code {
        SSL_REQUEST_CODE | GSSENC_REQUEST_CODE if len != 8 => Err(WireError::BadLength(len)),
        SSL_REQUEST_CODE => Ok(PacketHeader::SslRequest),
        GSSENC_REQUEST_CODE => Ok(PacketHeader::GssEncRequest),
        CANCEL_REQUEST_CODE if !(16..=8 + MAX_CANCEL_BODY as u32).contains(&len) => {
            Err(WireError::BadLength(len))
        }
        CANCEL_REQUEST_CODE => Ok(PacketHeader::Cancel {
            body_len: len as usize - 8,
        }),
        _ if (code >> 16) as u16 == PROTOCOL_MAJOR_3 => Ok(PacketHeader::Startup {
            body_len: len as usize - 8,
            minor: (code & 0xffff) as u16,
        }),
        _ => Err(WireError::UnknownCode(code)),
    }
}

/// Decodes a process id followed by a secret: the body of a `CancelRequest`, and of a
/// `BackendKeyData`.
pub fn parse_cancel_body(body: &[u8]) -> Result<CancelKey, WireError> {
    let (pid, secret) = body
        .split_first_chunk::<4>()
        .ok_or(WireError::Malformed("cancel key too short"))?;
    CancelKey::new(u32::from_be_bytes(*pid), secret)
        .ok_or(WireError::Malformed("cancel secret outside 4..=256 bytes"))
}

/// Decodes the body of a `StartupMessage`: NUL-terminated key/value pairs, then a final NUL.
pub fn parse_startup_body(minor: u16, body: &[u8]) -> Result<StartupParams, WireError> {
    let Some((&0, mut rest)) = body.split_last() else {
        return Err(WireError::Malformed("missing final terminator"));
    };
    let mut params = Vec::new();
    while !rest.is_empty() {
        let key = take_cstr(&mut rest)?;
        if key.is_empty() {
            return Err(WireError::Malformed("empty parameter name"));
        }
        let value = take_cstr(&mut rest)?;
        // Configuration parameter names are case-insensitive to PostgreSQL, so `TimeZone`
        // and `timezone` are the same setting; refusing both spellings is the simple rule.
        if params
            .iter()
            .any(|(k, _): &(String, String)| k.eq_ignore_ascii_case(&key))
        {
            return Err(WireError::RepeatedParameter(key));
        }
        params.push((key, value));
    }
    let Some((_, user)) = params.iter().find(|(k, _)| k == "user") else {
        // PostgreSQL answers "no PostgreSQL user name specified in startup packet".
        return Err(WireError::Malformed("no user name"));
    };
    if user.len() > MAX_IDENTIFIER_BYTES {
        // PostgreSQL would log in as the first 63 bytes: a different role than was asked
        // for, and than a certificate's common name was compared with.
        return Err(WireError::Malformed("user name longer than 63 bytes"));
    }
    Ok(StartupParams { minor, params })
}

fn take_cstr(rest: &mut &[u8]) -> Result<String, WireError> {
    let end = rest
        .iter()
        .position(|&b| b == 0)
        .ok_or(WireError::Malformed("unterminated string"))?;
    let s = std::str::from_utf8(&rest[..end])
        .map_err(|_| WireError::Malformed("parameter is not UTF-8"))?
        .to_owned();
    *rest = &rest[end + 1..];
    Ok(s)
}

/// The mechanism a client picks in `SASLInitialResponse` (`p` message body), if the body is
/// one. Used only to detect `SCRAM-SHA-256-PLUS` through a TLS upstream.
pub fn sasl_mechanism(body: &[u8]) -> Option<&str> {
    let end = body.iter().position(|&b| b == 0)?;
    std::str::from_utf8(&body[..end]).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(len: u32, code: u32) -> [u8; 8] {
        let mut h = [0u8; 8];
        h[..4].copy_from_slice(&len.to_be_bytes());
        h[4..].copy_from_slice(&code.to_be_bytes());
        h
    }

    #[test]
    fn recognises_every_request_code() {
        assert_eq!(
            parse_header(header(8, SSL_REQUEST_CODE)),
            Ok(PacketHeader::SslRequest)
        );
        assert_eq!(
            parse_header(header(8, GSSENC_REQUEST_CODE)),
            Ok(PacketHeader::GssEncRequest)
        );
        assert_eq!(
            parse_header(header(16, CANCEL_REQUEST_CODE)),
            Ok(PacketHeader::Cancel { body_len: 8 })
        );
        // Protocol 3.2: a 32-byte secret (what PostgreSQL 18 issues), up to 256.
        assert_eq!(
            parse_header(header(44, CANCEL_REQUEST_CODE)),
            Ok(PacketHeader::Cancel { body_len: 36 })
        );
        for len in [8, 15, 12 + 257, 10_000] {
            assert_eq!(
                parse_header(header(len, CANCEL_REQUEST_CODE)),
                Err(WireError::BadLength(len)),
                "{len}"
            );
        }
        assert_eq!(
            parse_header(header(40, 196_608)),
            Ok(PacketHeader::Startup {
                body_len: 32,
                minor: 0
            })
        );
        assert_eq!(
            parse_header(header(40, 196_610)),
            Ok(PacketHeader::Startup {
                body_len: 32,
                minor: 2
            })
        );
    }

    #[test]
    fn refuses_lengths_out_of_range() {
        for len in [0, 7, 10_001, i32::MAX as u32, u32::MAX] {
            assert_eq!(
                parse_header(header(len, 196_608)),
                Err(WireError::BadLength(len))
            );
        }
        assert_eq!(
            parse_header(header(12, SSL_REQUEST_CODE)),
            Err(WireError::BadLength(12))
        );
        assert_eq!(
            parse_header(header(8, CANCEL_REQUEST_CODE)),
            Err(WireError::BadLength(8))
        );
    }

    #[test]
    fn refuses_unknown_codes() {
        assert_eq!(
            parse_header(header(8, 0x0002_0000)),
            Err(WireError::UnknownCode(0x0002_0000))
        );
        assert_eq!(
            parse_header(*b"GET / HT"),
            Err(WireError::BadLength(u32::from_be_bytes(*b"GET ")))
        );
    }

    #[test]
    fn startup_round_trips() {
        let p = StartupParams {
            minor: 0,
            params: vec![
                ("user".into(), "app".into()),
                ("database".into(), "appdb".into()),
                ("application_name".into(), "psql".into()),
            ],
        };
        let bytes = p.encode();
        let mut h = [0u8; 8];
        h.copy_from_slice(&bytes[..8]);
        let PacketHeader::Startup { body_len, minor } = parse_header(h).unwrap() else {
            panic!("not a startup header");
        };
        assert_eq!(body_len, bytes.len() - 8);
        let back = parse_startup_body(minor, &bytes[8..]).unwrap();
        assert_eq!(back, p);
        assert_eq!(back.database(), Some("appdb"));
    }

    #[test]
    fn database_defaults_to_user() {
        let p = parse_startup_body(0, b"user\0alice\0\0").unwrap();
        assert_eq!(p.database(), Some("alice"));
    }

    #[test]
    fn malformed_startup_bodies_are_errors() {
        for body in [
            &b""[..],
            b"user\0alice\0",
            b"user\0alice",
            b"user\0\xff\0\0",
            b"\0x\0\0",
            b"database\0x\0\0",
            b"user\0\0x\0",
        ] {
            assert!(parse_startup_body(0, body).is_err(), "{body:?}");
        }
    }

    #[test]
    fn a_repeated_key_is_refused_whatever_its_case() {
        // PostgreSQL keeps the last `user`: the first must not be what anyone checks.
        for body in [
            &b"user\0alice\0database\0app\0user\0postgres\0\0"[..],
            b"user\0alice\0user\0alice\0\0",
            b"user\0alice\0database\0a\0database\0b\0\0",
            b"user\0alice\0TimeZone\0UTC\0timezone\0UTC\0\0",
        ] {
            let err = parse_startup_body(0, body).unwrap_err();
            assert!(
                matches!(err, WireError::RepeatedParameter(_)),
                "{body:?}: {err}"
            );
        }
        assert_eq!(
            parse_startup_body(0, b"user\0a\0options\0x\0user\0b\0\0")
                .unwrap_err()
                .to_string(),
            "startup parameter \"user\" appears more than once"
        );
    }

    #[test]
    fn a_user_name_postgres_would_truncate_is_refused() {
        let mut at_limit = b"user\0".to_vec();
        at_limit.extend([b'a'; MAX_IDENTIFIER_BYTES]);
        at_limit.extend(b"\0\0");
        assert_eq!(
            parse_startup_body(0, &at_limit)
                .unwrap()
                .user()
                .map(str::len),
            Some(63)
        );
        let mut over = b"user\0".to_vec();
        over.extend([b'a'; MAX_IDENTIFIER_BYTES]);
        over.extend(b"b\0\0");
        assert_eq!(
            parse_startup_body(0, &over),
            Err(WireError::Malformed("user name longer than 63 bytes"))
        );
        // Bytes, not characters: 32 two-byte characters are 64 bytes.
        let mut wide = b"user\0".to_vec();
        wide.extend("é".repeat(32).as_bytes());
        wide.extend(b"\0\0");
        assert!(parse_startup_body(0, &wide).is_err());
    }

    #[test]
    fn cancel_keys_of_every_allowed_length_round_trip() {
        for secret_len in [4, 5, 32, MAX_CANCEL_SECRET] {
            let secret: Vec<u8> = (0..secret_len).map(|i| i as u8 ^ 0x5a).collect();
            let key = CancelKey::new(4242, &secret).unwrap();
            assert_eq!(matches!(key, CancelKey::Short { .. }), secret_len == 4);
            assert_eq!((key.process_id(), key.secret()), (4242, &secret[..]));
            let req = key.to_request();
            assert_eq!(req.len(), 12 + secret_len);
            let mut h = [0u8; 8];
            h.copy_from_slice(&req[..8]);
            assert_eq!(
                parse_header(h),
                Ok(PacketHeader::Cancel {
                    body_len: 4 + secret_len
                })
            );
            assert_eq!(parse_cancel_body(&req[8..]), Ok(key));
        }
    }

    #[test]
    fn a_session_holds_its_cancel_key_in_16_bytes() {
        assert!(std::mem::size_of::<Option<CancelKey>>() <= 16);
    }

    #[test]
    fn cancel_bodies_outside_the_protocol_are_refused() {
        for len in [0, 3, 4, 7, 4 + MAX_CANCEL_SECRET + 1] {
            assert!(parse_cancel_body(&vec![1u8; len]).is_err(), "{len}");
        }
    }

    #[test]
    fn sasl_mechanism_reads_the_name() {
        assert_eq!(
            sasl_mechanism(b"SCRAM-SHA-256-PLUS\0\0\0\0\x04abcd"),
            Some("SCRAM-SHA-256-PLUS")
        );
        assert_eq!(sasl_mechanism(b"no terminator"), None);
    }
}
