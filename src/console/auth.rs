//! Who may use the console: a one-time login token printed at start, exchanged for a session
//! cookie; a CSRF token per session for every change; a lockout after repeated bad tokens.
//!
//! Everything lives in this process's memory: a restart ends every session and prints a new
//! token, which is what an operator who suspects a leak wants.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::Rng as _;
use subtle::ConstantTimeEq as _;

/// The session cookie's name.
pub const COOKIE: &str = "pgmtls_console";

/// How long a session lasts from login; there is no renewal, the operator logs in again.
pub const SESSION_LIFETIME: Duration = Duration::from_secs(12 * 60 * 60);

/// Bad tokens in a row before the login is locked.
pub const MAX_FAILURES: u32 = 5;

/// How long the login stays locked after [`MAX_FAILURES`] bad tokens. Every attempt in that
/// time is refused, the right token too, and the token stays unused.
pub const LOCKOUT: Duration = Duration::from_secs(60);

/// Hex of `n` random bytes from the thread's CSPRNG (seeded from the OS).
pub fn random_hex(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    rand::rng().fill(bytes.as_mut_slice());
    hex::encode(bytes)
}

/// Equality that takes the same time wherever the first difference is (the length is not
/// secret: every token and CSRF value has the same one).
pub fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// One logged-in browser.
#[derive(Debug, Clone)]
pub struct Session {
    /// The cookie value (32 random bytes, hex). Never logged or shown.
    pub id: String,
    /// A separate random short name for logs and audit actors, so neither carries any part
    /// of the cookie.
    pub label: String,
    /// The value every form of this session carries in its `csrf` field.
    pub csrf: String,
    pub client: IpAddr,
    /// In mTLS mode, the SHA-256 of the client certificate the session started with: the
    /// cookie works only on connections presenting that certificate.
    pub certificate: Option<String>,
    expires: Instant,
    /// A message for the next page this session loads (after a change's redirect).
    flash: Option<String>,
}

impl Session {
    /// The audit log's actor for a change made in this session.
    pub fn actor(&self) -> String {
        format!("console:{}@{}", self.label, self.client)
    }
}

/// What a login attempt came to.
#[derive(Debug)]
pub enum Login {
    /// The token was right: a new session.
    Ok(Session),
    /// Wrong, or already used; `failures` counts every refused attempt since start.
    Refused { failures: u64 },
    /// Too many bad tokens: nothing is checked until the lockout ends.
    Locked {
        failures: u64,
        retry_after: Duration,
    },
}

#[derive(Debug)]
struct Inner {
    /// `None` once it has been used.
    token: Option<String>,
    sessions: HashMap<String, Session>,
    failures_total: u64,
    failures_in_a_row: u32,
    locked_until: Option<Instant>,
}

/// The console's login state.
#[derive(Debug)]
pub struct Auth {
    inner: Mutex<Inner>,
}

impl Auth {
    /// A fresh state with `token` as the one login token (`None` in mTLS mode, where the
    /// client certificate is the login).
    pub fn new(token: Option<String>) -> Auth {
        Auth {
            inner: Mutex::new(Inner {
                token,
                sessions: HashMap::new(),
                failures_total: 0,
                failures_in_a_row: 0,
                locked_until: None,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data behind; keep serving.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Exchanges `token` for a session: works once; a bad token counts towards the lockout.
    pub fn login(&self, token: &str, client: IpAddr) -> Login {
        let mut inner = self.lock();
        let now = Instant::now();
        if let Some(until) = inner.locked_until {
            if now < until {
                inner.failures_total += 1;
                return Login::Locked {
                    failures: inner.failures_total,
                    retry_after: until - now,
                };
            }
            inner.locked_until = None;
        }
        let good = inner.token.as_deref().is_some_and(|t| same(t, token));
        if !good {
            inner.failures_total += 1;
            inner.failures_in_a_row += 1;
            if inner.failures_in_a_row >= MAX_FAILURES {
                inner.failures_in_a_row = 0;
                inner.locked_until = Some(now + LOCKOUT);
            }
            return Login::Refused {
                failures: inner.failures_total,
            };
        }
        inner.token = None;
        inner.failures_in_a_row = 0;
        Login::Ok(Self::start(&mut inner, client, None))
    }

    /// mTLS mode: a session for the holder of the client certificate whose SHA-256 is
    /// `fingerprint` (the handshake verified it), bound to that certificate.
    pub fn login_with_certificate(&self, client: IpAddr, fingerprint: &str) -> Session {
        Self::start(&mut self.lock(), client, Some(fingerprint.to_owned()))
    }

    fn start(inner: &mut Inner, client: IpAddr, certificate: Option<String>) -> Session {
        let now = Instant::now();
        inner.sessions.retain(|_, s| s.expires > now);
        let session = Session {
            id: random_hex(32),
            label: random_hex(4),
            csrf: random_hex(32),
            client,
            certificate,
            expires: now + SESSION_LIFETIME,
            flash: None,
        };
        inner.sessions.insert(session.id.clone(), session.clone());
        session
    }

    /// The live session a cookie value names.
    pub fn session(&self, id: &str) -> Option<Session> {
        let mut inner = self.lock();
        let now = Instant::now();
        match inner.sessions.get(id) {
            Some(s) if s.expires > now => Some(s.clone()),
            Some(_) => {
                inner.sessions.remove(id);
                None
            }
            None => None,
        }
    }

    /// Ends a session; its cookie and CSRF value stop working at once.
    pub fn logout(&self, id: &str) -> Option<Session> {
        self.lock().sessions.remove(id)
    }

    /// Leaves a message for the session's next page.
    pub fn set_flash(&self, id: &str, message: String) {
        if let Some(s) = self.lock().sessions.get_mut(id) {
            s.flash = Some(message);
        }
    }

    /// Takes the message left for this page, if any.
    pub fn take_flash(&self, id: &str) -> Option<String> {
        self.lock()
            .sessions
            .get_mut(id)
            .and_then(|s| s.flash.take())
    }

    /// Refused login attempts since start.
    pub fn failures(&self) -> u64 {
        self.lock().failures_total
    }
}

/// The shortest login token read from a file: 128 bits as hex.
pub const MIN_TOKEN_LEN: usize = 32;

/// Reads the login token from `path` (`label` names the setting in errors): the file must not
/// be readable by group or others, as for private keys, and hold one token of at least
/// [`MIN_TOKEN_LEN`] characters that a URL carries unchanged (letters, digits, `-._~`).
/// Surrounding whitespace (the final newline) is dropped.
pub fn read_token_file(path: &std::path::Path, label: &str) -> Result<String, String> {
    let bytes = crate::state::read_private_key(path).map_err(|e| {
        let detail =
            e.0.first()
                .map(|e| e.message.as_str())
                .unwrap_or("cannot read");
        format!("{label} {}: {detail}", path.display())
    })?;
    let text = String::from_utf8(bytes)
        .map_err(|_| format!("{label} {}: the token is not UTF-8 text", path.display()))?;
    let token = text.trim();
    if let Some(c) = token
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "-._~".contains(*c)))
    {
        return Err(format!(
            "{label} {}: the token holds {c:?}; use letters, digits, '-', '.', '_' or '~' \
             (for example `openssl rand -hex 32`)",
            path.display()
        ));
    }
    if token.len() < MIN_TOKEN_LEN {
        return Err(format!(
            "{label} {}: the token has {} characters, fewer than {MIN_TOKEN_LEN} (for example \
             `openssl rand -hex 32`)",
            path.display(),
            token.len()
        ));
    }
    Ok(token.to_owned())
}

/// The value of cookie `name` in a `Cookie` header.
pub fn cookie<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header.split(';').find_map(|pair| {
        let (k, v) = pair.trim().split_once('=')?;
        (k == name).then_some(v)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip() -> IpAddr {
        "127.0.0.1".parse().unwrap()
    }

    #[test]
    fn the_token_works_once_and_bad_ones_lock_the_login() {
        let auth = Auth::new(Some("t".repeat(64)));
        assert!(matches!(auth.login(&"t".repeat(64), ip()), Login::Ok(_)));
        assert!(matches!(
            auth.login(&"t".repeat(64), ip()),
            Login::Refused { failures: 1 }
        ));
        for _ in 1..MAX_FAILURES {
            assert!(matches!(auth.login("x", ip()), Login::Refused { .. }));
        }
        assert!(matches!(auth.login("x", ip()), Login::Locked { .. }));
        assert_eq!(auth.failures(), u64::from(MAX_FAILURES) + 1);
    }

    #[test]
    fn a_lockout_refuses_the_right_token_without_using_it() {
        let auth = Auth::new(Some("t".repeat(64)));
        for _ in 0..MAX_FAILURES {
            auth.login("x", ip());
        }
        assert!(matches!(
            auth.login(&"t".repeat(64), ip()),
            Login::Locked { .. }
        ));
        auth.lock().locked_until = Some(Instant::now());
        assert!(matches!(auth.login(&"t".repeat(64), ip()), Login::Ok(_)));
    }

    #[test]
    fn cookies_are_found_by_name() {
        assert_eq!(cookie("a=1; pgmtls_console=abc", COOKIE), Some("abc"));
        assert_eq!(cookie("xpgmtls_console=abc", COOKIE), None);
    }
}
