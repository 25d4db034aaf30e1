//! Typed messages (one tag byte, a 4-byte length, a body) in both directions after the
//! startup packet, and the few backend messages pgmtls itself writes or inspects.

use bytes::{Buf, BytesMut};

use super::frontend::{parse_cancel_body, CancelKey, WireError};

/// Upper bound for one message while pgmtls still looks at messages (authentication, up to the
/// first `ReadyForQuery`). Authentication messages are tiny; the bound only stops a peer from
/// making us buffer without limit. After that phase bytes are relayed without framing.
pub const MAX_AUTH_PHASE_MESSAGE: usize = 1 << 20;

/// `Authentication*` request codes (protocol docs, "AuthenticationOk" ... "AuthenticationSASL").
const AUTH_OK: u32 = 0;
const AUTH_SASL: u32 = 10;

/// What an `Authentication` ('R') message asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthRequest {
    Ok,
    /// SASL with the mechanisms the server offers, in its order.
    Sasl(Vec<String>),
    Other(u32),
}

/// The backend messages pgmtls cares about during the authentication phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendMessage {
    Auth(AuthRequest),
    KeyData(CancelKey),
    ReadyForQuery,
    /// An `ErrorResponse`, with its SQLSTATE if present.
    Error {
        code: Option<String>,
    },
    Other(u8),
}

/// Splits one complete message off the front of `buf`, or returns `None` if more bytes are
/// needed. The length prefix includes itself, so anything below 4 is malformed.
pub fn take_message(buf: &mut BytesMut, max: usize) -> Result<Option<(u8, BytesMut)>, WireError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 || len as usize > max {
        return Err(WireError::BadLength(len));
    }
    let total = 1 + len as usize;
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let mut msg = buf.split_to(total);
    let tag = msg[0];
    msg.advance(5);
    Ok(Some((tag, msg)))
}

/// Re-frames a message taken by [`take_message`] into `out`.
pub fn put_message(out: &mut Vec<u8>, tag: u8, body: &[u8]) {
    out.push(tag);
    out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    out.extend_from_slice(body);
}

impl BackendMessage {
    pub fn parse(tag: u8, body: &[u8]) -> Result<Self, WireError> {
        Ok(match tag {
            b'R' => {
                let code = read_u32(body, 0)?;
                BackendMessage::Auth(match code {
                    AUTH_OK => AuthRequest::Ok,
                    AUTH_SASL => AuthRequest::Sasl(parse_mechanisms(&body[4..])?),
                    other => AuthRequest::Other(other),
                })
            }
            b'K' => BackendMessage::KeyData(parse_cancel_body(body)?),
            b'Z' => BackendMessage::ReadyForQuery,
            b'E' => BackendMessage::Error {
                code: error_field(body, b'C'),
            },
            other => BackendMessage::Other(other),
        })
    }
}

fn read_u32(body: &[u8], at: usize) -> Result<u32, WireError> {
    body.get(at..at + 4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or(WireError::Malformed("message too short"))
}

fn parse_mechanisms(mut rest: &[u8]) -> Result<Vec<String>, WireError> {
    let mut out = Vec::new();
    loop {
        let end = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or(WireError::Malformed("unterminated SASL mechanism list"))?;
        if end == 0 {
            return Ok(out);
        }
        let name = std::str::from_utf8(&rest[..end])
            .map_err(|_| WireError::Malformed("SASL mechanism is not UTF-8"))?;
        out.push(name.to_owned());
        rest = &rest[end + 1..];
    }
}

/// Reads one field (by its type byte) of an `ErrorResponse`/`NoticeResponse` body.
pub fn error_field(body: &[u8], field: u8) -> Option<String> {
    let mut rest = body;
    while let Some((&kind, tail)) = rest.split_first() {
        if kind == 0 {
            return None;
        }
        let end = tail.iter().position(|&b| b == 0)?;
        if kind == field {
            return std::str::from_utf8(&tail[..end]).ok().map(str::to_owned);
        }
        rest = &tail[end + 1..];
    }
    None
}

/// A FATAL `ErrorResponse` with a SQLSTATE and fixed text. libpq prints the message as
/// `FATAL:  <message>`; `hint` becomes a `HINT:` line.
pub fn error_response(code: &str, message: &str, hint: Option<&str>) -> Vec<u8> {
    let mut body = Vec::with_capacity(64 + message.len());
    for (kind, value) in [
        (b'S', "FATAL"),
        (b'V', "FATAL"),
        (b'C', code),
        (b'M', message),
    ] {
        body.push(kind);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
    }
    if let Some(hint) = hint {
        body.push(b'H');
        body.extend_from_slice(hint.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut out = Vec::with_capacity(body.len() + 5);
    put_message(&mut out, b'E', &body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(tag: u8, body: &[u8]) -> BytesMut {
        let mut v = Vec::new();
        put_message(&mut v, tag, body);
        BytesMut::from(&v[..])
    }

    #[test]
    fn takes_messages_only_when_complete() {
        let mut buf = framed(b'Z', b"I");
        let full = buf.clone();
        let mut partial = BytesMut::from(&full[..4]);
        assert_eq!(take_message(&mut partial, 1024), Ok(None));
        let (tag, body) = take_message(&mut buf, 1024).unwrap().unwrap();
        assert_eq!((tag, &body[..]), (b'Z', &b"I"[..]));
        assert!(buf.is_empty());
    }

    #[test]
    fn refuses_bad_message_lengths() {
        let mut short = BytesMut::from(&[b'Z', 0, 0, 0, 3][..]);
        assert_eq!(take_message(&mut short, 1024), Err(WireError::BadLength(3)));
        let mut huge = BytesMut::from(&[b'Z', 0x7f, 0xff, 0xff, 0xff][..]);
        assert_eq!(
            take_message(&mut huge, 1024),
            Err(WireError::BadLength(0x7fff_ffff))
        );
    }

    #[test]
    fn parses_sasl_offer() {
        let mut body = 10u32.to_be_bytes().to_vec();
        body.extend_from_slice(b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0");
        assert_eq!(
            BackendMessage::parse(b'R', &body),
            Ok(BackendMessage::Auth(AuthRequest::Sasl(vec![
                "SCRAM-SHA-256-PLUS".into(),
                "SCRAM-SHA-256".into()
            ])))
        );
        assert!(BackendMessage::parse(b'R', &body[..10]).is_err());
        assert!(BackendMessage::parse(b'R', &[0, 0]).is_err());
    }

    #[test]
    fn parses_key_data_and_errors() {
        let mut body = 7u32.to_be_bytes().to_vec();
        body.extend_from_slice(&9u32.to_be_bytes());
        assert_eq!(
            BackendMessage::parse(b'K', &body),
            Ok(BackendMessage::KeyData(CancelKey::Short {
                process_id: 7,
                secret: 9u32.to_be_bytes()
            }))
        );
        assert!(BackendMessage::parse(b'K', &body[..6]).is_err());
        // PostgreSQL 18 with protocol 3.2: a 32-byte secret.
        let mut long = 7u32.to_be_bytes().to_vec();
        long.extend_from_slice(&[0xab; 32]);
        match BackendMessage::parse(b'K', &long) {
            Ok(BackendMessage::KeyData(k)) => assert_eq!(k.secret(), &[0xab; 32]),
            other => panic!("{other:?}"),
        }
        let err = error_response("28000", "nope", Some("try again"));
        let mut buf = BytesMut::from(&err[..]);
        let (tag, body) = take_message(&mut buf, 1024).unwrap().unwrap();
        assert_eq!(
            BackendMessage::parse(tag, &body),
            Ok(BackendMessage::Error {
                code: Some("28000".into())
            })
        );
        assert_eq!(error_field(&body, b'M').as_deref(), Some("nope"));
        assert_eq!(error_field(&body, b'H').as_deref(), Some("try again"));
        assert_eq!(error_field(b"Cunterminated", b'C'), None);
    }
}
