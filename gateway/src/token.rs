//! Device tokens: checked by the gateway alone, with no round trip, so a reconnect storm costs one HMAC per device.
//!
//! A token is `tp1.<expiry>.<mac>`: `expiry` in seconds since the Unix epoch (decimal), `mac` the unpadded
//! base64url HMAC-SHA256, keyed by the provisioning secret, of `thingport-token-v1\n<thing>\n<expiry>`. The thing
//! name is not in the token: the device sends it in `HELLO`, and a token is valid for that name only.

use std::collections::HashSet;
use std::path::Path;

use anyhow::{Context, Result, bail};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::hmac;
use thingport_protocol::ErrorCode;

const PREFIX: &str = "tp1";
const CONTEXT: &[u8] = b"thingport-token-v1\n";
/// Shortest provisioning secret accepted, in bytes.
pub const MIN_SECRET: usize = 32;

/// Issues and checks tokens with one provisioning secret.
pub struct TokenKey {
    key: hmac::Key,
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKey(..)")
    }
}

/// Why a token was refused; each maps to the `ERROR` code the device gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token is not valid for this thing")]
    Invalid,
    #[error("token has expired")]
    Expired,
    #[error("token or thing is revoked")]
    Revoked,
}

impl TokenError {
    pub fn code(self) -> ErrorCode {
        match self {
            TokenError::Invalid => ErrorCode::AUTH_FAILED,
            TokenError::Expired => ErrorCode::TOKEN_EXPIRED,
            TokenError::Revoked => ErrorCode::REVOKED,
        }
    }

    /// Label of the refusal counter.
    pub fn reason(self) -> &'static str {
        match self {
            TokenError::Invalid => "auth_failed",
            TokenError::Expired => "token_expired",
            TokenError::Revoked => "revoked",
        }
    }
}

impl TokenKey {
    pub fn new(secret: &[u8]) -> Result<Self> {
        if secret.len() < MIN_SECRET {
            bail!(
                "the provisioning secret has {} bytes; at least {MIN_SECRET} are needed",
                secret.len()
            );
        }
        Ok(TokenKey { key: hmac::Key::new(hmac::HMAC_SHA256, secret) })
    }

    /// Reads a secret file (its bytes, with surrounding whitespace removed).
    pub fn from_file(path: &Path) -> Result<Self> {
        let raw = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        TokenKey::new(raw.trim_ascii()).with_context(|| format!("secret in {}", path.display()))
    }

    fn mac(&self, thing: &str, expiry: u64) -> hmac::Tag {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(CONTEXT);
        ctx.update(thing.as_bytes());
        ctx.update(b"\n");
        ctx.update(expiry.to_string().as_bytes());
        ctx.sign()
    }

    /// A token for `thing` valid until `expiry` (seconds since the Unix epoch).
    pub fn issue(&self, thing: &str, expiry: u64) -> String {
        format!("{PREFIX}.{expiry}.{}", URL_SAFE_NO_PAD.encode(self.mac(thing, expiry).as_ref()))
    }

    /// Checks a token presented for `thing` at `now` (seconds since the Unix epoch). The MAC is checked before the
    /// expiry, so a forged token is `Invalid` whatever its date.
    pub fn verify(&self, thing: &str, token: &[u8], now: u64) -> Result<(), TokenError> {
        let token = std::str::from_utf8(token).map_err(|_| TokenError::Invalid)?;
        let mut parts = token.split('.');
        let (Some(PREFIX), Some(expiry), Some(mac), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Invalid);
        };
        let expiry_value: u64 = expiry.parse().map_err(|_| TokenError::Invalid)?;
        // the MAC covers the decimal text as issued: refuse other spellings of the same number
        if expiry_value.to_string() != expiry {
            return Err(TokenError::Invalid);
        }
        let mac = URL_SAFE_NO_PAD.decode(mac).map_err(|_| TokenError::Invalid)?;
        let mut message = Vec::with_capacity(CONTEXT.len() + thing.len() + 24);
        message.extend_from_slice(CONTEXT);
        message.extend_from_slice(thing.as_bytes());
        message.push(b'\n');
        message.extend_from_slice(expiry.as_bytes());
        hmac::verify(&self.key, &message, &mac).map_err(|_| TokenError::Invalid)?;
        if now >= expiry_value {
            return Err(TokenError::Expired);
        }
        Ok(())
    }
}

/// Revoked things and tokens.
#[derive(Debug, Default, Clone)]
pub struct Revocations {
    things: HashSet<String>,
    tokens: HashSet<String>,
}

impl Revocations {
    /// Parses a revocation list: one thing name or whole token per line; `#` starts a comment line.
    pub fn parse(text: &str) -> Revocations {
        let mut revoked = Revocations::default();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
            if line.starts_with("tp1.") {
                revoked.tokens.insert(line.to_string());
            } else {
                revoked.things.insert(line.to_string());
            }
        }
        revoked
    }

    pub fn load(path: &Path) -> Result<Revocations> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Ok(Revocations::parse(&text))
    }

    pub fn is_revoked(&self, thing: &str, token: Option<&[u8]>) -> bool {
        self.things.contains(thing)
            || token
                .and_then(|t| std::str::from_utf8(t).ok())
                .is_some_and(|t| self.tokens.contains(t))
    }

    pub fn len(&self) -> usize {
        self.things.len() + self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Parses a time-to-live such as `365d`, `12h` or `90m`.
pub fn parse_ttl(text: &str) -> Result<std::time::Duration> {
    humantime::parse_duration(text)
        .with_context(|| format!("not a duration: {text:?} (try 365d, 12h)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> TokenKey {
        TokenKey::new(&[7u8; 32]).unwrap()
    }

    #[test]
    fn issued_tokens_verify_for_their_thing_only() {
        let token = key().issue("pump-1", 2_000);
        assert!(token.starts_with("tp1.2000."));
        assert_eq!(key().verify("pump-1", token.as_bytes(), 1_999), Ok(()));
        assert_eq!(key().verify("pump-2", token.as_bytes(), 1_999), Err(TokenError::Invalid));
        assert_eq!(key().verify("pump-1", token.as_bytes(), 2_000), Err(TokenError::Expired));
        let other = TokenKey::new(&[8u8; 32]).unwrap();
        assert_eq!(other.verify("pump-1", token.as_bytes(), 0), Err(TokenError::Invalid));
    }

    #[test]
    fn tampered_tokens_are_invalid() {
        let token = key().issue("pump-1", 2_000);
        let later = token.replace("tp1.2000.", "tp1.9000.");
        assert_eq!(key().verify("pump-1", later.as_bytes(), 0), Err(TokenError::Invalid));
        let padded = token.replace("tp1.2000.", "tp1.02000.");
        assert_eq!(key().verify("pump-1", padded.as_bytes(), 0), Err(TokenError::Invalid));
        for bad in ["", "tp1", "tp1..", "tp2.1.AAAA", "tp1.1.@@@", &format!("{token}.x")] {
            assert_eq!(
                key().verify("pump-1", bad.as_bytes(), 0),
                Err(TokenError::Invalid),
                "{bad}"
            );
        }
        assert_eq!(key().verify("pump-1", &[0xff, 0xfe], 0), Err(TokenError::Invalid));
    }

    #[test]
    fn short_secrets_are_refused() {
        assert!(TokenKey::new(b"short").is_err());
    }

    #[test]
    fn revocations() {
        let token = key().issue("pump-1", 2_000);
        let list = Revocations::parse(&format!("# revoked\nvalve-9\n\n{token}\n"));
        assert_eq!(list.len(), 2);
        assert!(list.is_revoked("valve-9", None));
        assert!(list.is_revoked("pump-1", Some(token.as_bytes())));
        assert!(!list.is_revoked("pump-1", Some(key().issue("pump-1", 3_000).as_bytes())));
    }
}
