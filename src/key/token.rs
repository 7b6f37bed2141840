//! Token format `<prefix>_<id>_<secret><check>` (SPEC section 1).
//!
//! - `<id>`: 16 characters of lowercase Crockford base32, 80 random bits.
//! - `<secret>`: 32 base62 characters from the OS CSPRNG (about 190 bits).
//! - `<check>`: 6 base62 characters of the CRC32 of everything before it, so
//!   a mistyped or truncated token is refused without a store lookup.
//!
//! Parsing works on borrowed bytes and allocates nothing: it runs on every
//! proxied request. It hashes the secret once, so what leaves this module is
//! the key id and the digest, never the secret.
//!
//! Imported keys: keys issued by another system can be migrated (`keygate
//! apikey import`) when `[keys] accept_imported` is on. Such a token is any
//! `<prefix>_...` string of URL-safe characters; its digest is the SHA-256 of
//! the whole token and its id is derived from that digest, so it is stored
//! and verified like a native key.

use std::fmt;
use std::ops::Range;

use super::Digest;

pub const ID_LEN: usize = 16;
pub const SECRET_LEN: usize = 32;
pub const CHECK_LEN: usize = 6;

const CROCKFORD: &[u8; 32] = b"0123456789abcdefghjkmnpqrstvwxyz";
const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Why a presented token was refused before any lookup. Every variant maps to
/// `malformed_api_key`; the detail is for debug logs and tests only, and none
/// of it echoes the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token has the wrong length")]
    Length,
    #[error("token does not start with the configured prefix")]
    Prefix,
    #[error("token is not made of <prefix>_<id>_<secret><check>")]
    Shape,
    #[error("key id is not 16 lowercase Crockford base32 characters")]
    Id,
    #[error("secret is not base62")]
    SecretCharacters,
    #[error("token checksum does not match")]
    Checksum,
}

/// The public id of a key: 16 lowercase Crockford base32 characters.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId([u8; ID_LEN]);

impl KeyId {
    /// Parses an id as it appears in URLs, listings and tokens.
    pub fn parse(s: &str) -> Result<KeyId, TokenError> {
        Self::from_bytes(s.as_bytes())
    }

    /// The id of an imported token: the first 80 bits of its digest in
    /// Crockford base32.
    pub fn from_digest(digest: &Digest) -> KeyId {
        KeyId(crockford(
            digest.as_bytes()[..10].try_into().unwrap_or([0; 10]),
        ))
    }

    fn from_bytes(bytes: &[u8]) -> Result<KeyId, TokenError> {
        let id: [u8; ID_LEN] = bytes.try_into().map_err(|_| TokenError::Id)?;
        if id.iter().all(|c| CROCKFORD.contains(c)) {
            Ok(KeyId(id))
        } else {
            Err(TokenError::Id)
        }
    }

    /// A new random id (80 bits from the OS CSPRNG).
    pub fn generate() -> KeyId {
        KeyId(random_crockford())
    }

    pub fn as_str(&self) -> &str {
        // Only Crockford characters are ever stored, which are ASCII.
        std::str::from_utf8(&self.0).unwrap_or("????????????????")
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({})", self.as_str())
    }
}

/// A random 16-character Crockford id, used for every resource id.
pub fn random_id() -> String {
    KeyId::generate().as_str().to_owned()
}

fn random_crockford() -> [u8; ID_LEN] {
    let mut raw = [0u8; 10];
    fill_random(&mut raw);
    crockford(raw)
}

/// 80 bits as 16 Crockford characters, 5 bits each.
fn crockford(raw: [u8; 10]) -> [u8; ID_LEN] {
    let mut bits: u128 = 0;
    for b in raw {
        bits = (bits << 8) | u128::from(b);
    }
    let mut out = [0u8; ID_LEN];
    for (i, slot) in out.iter_mut().enumerate() {
        let shift = 5 * (ID_LEN - 1 - i);
        *slot = CROCKFORD[((bits >> shift) & 0x1f) as usize];
    }
    out
}

fn fill_random(buf: &mut [u8]) {
    // The OS CSPRNG failing leaves no safe way to issue a key.
    getrandom::getrandom(buf).expect("the operating system's random number generator failed");
}

/// The secret part of a presented or new token. Never printed.
#[derive(Clone, Copy)]
pub struct Secret([u8; SECRET_LEN]);

impl Secret {
    pub fn digest(&self) -> Digest {
        Digest::of(&self.0)
    }

    fn generate() -> Secret {
        let mut out = [0u8; SECRET_LEN];
        let mut filled = 0;
        let mut pool = [0u8; 64];
        while filled < SECRET_LEN {
            fill_random(&mut pool);
            for b in pool {
                // Rejection sampling keeps every character equally likely.
                if b < 248 && filled < SECRET_LEN {
                    out[filled] = BASE62[usize::from(b % 62)];
                    filled += 1;
                }
            }
        }
        Secret(out)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// A full token just issued by create or rotate: shown to its owner once,
/// never stored, never printed by `Debug` or `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct IssuedToken(String);

impl IssuedToken {
    /// The token itself, for the one response that returns it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for IssuedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for IssuedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// A presented credential that passed format and checksum checks: the key
/// id to look up and the digest of the presented secret.
#[derive(Debug, Clone, Copy)]
pub struct ParsedToken {
    pub id: KeyId,
    pub digest: Digest,
}

/// Imported tokens: at least the prefix, `_` and 16 characters; at most 256.
const IMPORTED_MIN: usize = 16;
const IMPORTED_MAX: usize = 256;

/// Whether an imported token may hold `c`: URL-safe characters only (every
/// native token's are among them).
pub fn imported_character(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.')
}

/// The token format with its configured prefix.
#[derive(Debug, Clone)]
pub struct TokenFormat {
    prefix: Box<str>,
    /// Also accept imported tokens (see the module docs).
    accept_imported: bool,
}

impl TokenFormat {
    /// `prefix` must be validated by the config (lowercase alphanumerics).
    pub fn new(prefix: &str) -> TokenFormat {
        TokenFormat {
            prefix: prefix.into(),
            accept_imported: false,
        }
    }

    /// Also accepts imported tokens of another system's shape.
    pub fn accepting_imported(mut self, accept: bool) -> TokenFormat {
        self.accept_imported = accept;
        self
    }

    /// Reads an imported token: `<prefix>_` then URL-safe characters. Its
    /// digest covers the whole token; its id comes from the digest.
    pub fn parse_imported(&self, token: &[u8]) -> Result<ParsedToken, TokenError> {
        let p = self.prefix.len();
        if !self.imported_lengths().contains(&token.len()) {
            return Err(TokenError::Length);
        }
        if &token[..p] != self.prefix.as_bytes() || token[p] != b'_' {
            return Err(TokenError::Prefix);
        }
        if !token.iter().copied().all(imported_character) {
            return Err(TokenError::SecretCharacters);
        }
        let digest = Digest::of(token);
        Ok(ParsedToken {
            id: KeyId::from_digest(&digest),
            digest,
        })
    }

    /// How long an imported token may be, in bytes (its prefix and `_`
    /// included).
    pub fn imported_lengths(&self) -> std::ops::RangeInclusive<usize> {
        self.prefix.len() + 1 + IMPORTED_MIN..=IMPORTED_MAX
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Length of a whole token with this prefix.
    pub fn token_len(&self) -> usize {
        self.prefix.len() + 1 + ID_LEN + 1 + SECRET_LEN + CHECK_LEN
    }

    /// Parses `<prefix>_<id>_<secret><check>`, or, when imported tokens are
    /// accepted, any token of their shape that is not a native one.
    pub fn parse(&self, token: &[u8]) -> Result<ParsedToken, TokenError> {
        match self.parse_native(token) {
            Err(native) if self.accept_imported && native != TokenError::Prefix => {
                self.parse_imported(token).map_err(|_| native)
            }
            result => result,
        }
    }

    fn parse_native(&self, token: &[u8]) -> Result<ParsedToken, TokenError> {
        if token.len() != self.token_len() {
            return Err(TokenError::Length);
        }
        let p = self.prefix.len();
        if &token[..p] != self.prefix.as_bytes() {
            return Err(TokenError::Prefix);
        }
        if token[p] != b'_' || token[p + 1 + ID_LEN] != b'_' {
            return Err(TokenError::Shape);
        }
        let id = &token[p + 1..p + 1 + ID_LEN];
        let rest = &token[p + 2 + ID_LEN..];
        self.parse_pair(id, rest)
    }

    /// Parses the `<id>` and `<secret><check>` halves, as presented by HTTP
    /// Basic authentication (`<id>:<secret><check>`).
    pub fn parse_pair(
        &self,
        id: &[u8],
        secret_and_check: &[u8],
    ) -> Result<ParsedToken, TokenError> {
        if secret_and_check.len() != SECRET_LEN + CHECK_LEN {
            return Err(TokenError::Length);
        }
        let id = KeyId::from_bytes(id)?;
        let (secret, check) = secret_and_check.split_at(SECRET_LEN);
        if !secret.iter().all(u8::is_ascii_alphanumeric) {
            return Err(TokenError::SecretCharacters);
        }
        let presented = decode_check(check).ok_or(TokenError::Checksum)?;
        if presented != self.checksum(&id, secret) {
            return Err(TokenError::Checksum);
        }
        Ok(ParsedToken {
            id,
            digest: Digest::of(secret),
        })
    }

    /// Issues a brand-new key: its id, the token to show once, and the digest
    /// to store.
    pub fn generate(&self) -> (KeyId, IssuedToken, Digest) {
        let id = KeyId::generate();
        let (token, digest) = self.issue_secret(&id);
        (id, token, digest)
    }

    /// Issues a new secret for an existing id (rotation).
    pub fn issue_secret(&self, id: &KeyId) -> (IssuedToken, Digest) {
        let secret = Secret::generate();
        let check = encode_check(self.checksum(id, &secret.0));
        let mut token = String::with_capacity(self.token_len());
        token.push_str(&self.prefix);
        token.push('_');
        token.push_str(id.as_str());
        token.push('_');
        // Both are base62 ASCII.
        token.push_str(std::str::from_utf8(&secret.0).unwrap_or_default());
        token.push_str(std::str::from_utf8(&check).unwrap_or_default());
        (IssuedToken(token), secret.digest())
    }

    /// The first stretch of `text` at or after byte `from` that looks like
    /// a token with this prefix: `<prefix>_` and the URL-safe characters
    /// after it, at least as long as the shortest imported token, wherever
    /// it starts (`/user_kg_...` too). Looser than [`Self::parse`] on
    /// purpose: for a log, a token that is truncated, mistyped, imported or
    /// glued to other text is a secret all the same. One substring search
    /// when nothing matches; allocates nothing.
    pub fn find_token_like(&self, text: &str, from: usize) -> Option<Range<usize>> {
        let bytes = text.as_bytes();
        let shortest = *self.imported_lengths().start();
        let mut at = from;
        while let Some(found) = text.get(at..)?.find(&*self.prefix) {
            let start = at + found;
            let after = start + self.prefix.len();
            let end = after
                + bytes[after..]
                    .iter()
                    .take_while(|&&c| imported_character(c))
                    .count();
            if bytes.get(after) == Some(&b'_') && end - start >= shortest {
                return Some(start..end);
            }
            at = after;
        }
        None
    }

    fn checksum(&self, id: &KeyId, secret: &[u8]) -> u32 {
        let mut crc = crc32fast::Hasher::new();
        crc.update(self.prefix.as_bytes());
        crc.update(b"_");
        crc.update(&id.0);
        crc.update(b"_");
        crc.update(secret);
        crc.finalize()
    }
}

fn encode_check(mut value: u32) -> [u8; CHECK_LEN] {
    let mut out = [b'0'; CHECK_LEN];
    for slot in out.iter_mut().rev() {
        *slot = BASE62[(value % 62) as usize];
        value /= 62;
    }
    out
}

fn decode_check(check: &[u8]) -> Option<u32> {
    let mut value: u64 = 0;
    for &c in check {
        let digit = match c {
            b'0'..=b'9' => c - b'0',
            b'A'..=b'Z' => c - b'A' + 10,
            b'a'..=b'z' => c - b'a' + 36,
            _ => return None,
        };
        value = value * 62 + u64::from(digit);
    }
    u32::try_from(value).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn format() -> TokenFormat {
        TokenFormat::new("kg")
    }

    #[test]
    fn token_like_stretches_are_found_where_they_start_a_run() {
        let f = format();
        let (_, token, _) = f.generate();
        let token = token.expose();
        let find = |text: &str| f.find_token_like(text, 0).map(|r| text[r].to_owned());
        let some = |s: &str| Some(s.to_owned());
        assert_eq!(find(&format!("/v1/{token}/thing")), some(token));
        assert_eq!(find(&format!("/{token}")), some(token));
        assert_eq!(find(&format!("/k={token};x")), some(token));
        // Truncated, or imported: a secret all the same.
        assert_eq!(find(&format!("/{}", &token[..30])), some(&token[..30]));
        assert_eq!(
            find("/kg_imported-Token.0123456789"),
            some("kg_imported-Token.0123456789")
        );
        // Glued to what comes before it.
        assert_eq!(find(&format!("/user_{token}")), some(token));
        for plain in [
            "/v1/orders",
            "/backgrounds/kg",
            "/kg_short",
            "/kg_0123456789/abcdefghijkl",
            "/kgx0123456789abcdefghijklmnop",
            "",
        ] {
            assert_eq!(find(plain), None, "{plain}");
        }
        // A later match after an early near miss, and from an offset.
        let text = format!("/kg_x/{token}");
        assert_eq!(find(&text), some(token));
        assert_eq!(f.find_token_like(&text, text.len()), None);
    }

    #[test]
    fn generated_tokens_parse_back() {
        let f = format();
        for _ in 0..100 {
            let (id, token, digest) = f.generate();
            let t = token.expose().as_bytes();
            assert_eq!(t.len(), f.token_len());
            let parsed = f.parse(t).expect("own token parses");
            assert_eq!(parsed.id, id);
            assert!(bool::from(parsed.digest.ct_eq(&digest)));
        }
    }

    #[test]
    fn token_shape_matches_spec() {
        let (id, token, _) = format().generate();
        let t = token.expose();
        assert!(t.starts_with("kg_"));
        assert_eq!(&t[3..19], id.as_str());
        assert_eq!(&t[19..20], "_");
        assert!(t[20..].bytes().all(|c| c.is_ascii_alphanumeric()));
        assert!(id.as_str().bytes().all(|c| CROCKFORD.contains(&c)));
    }

    #[test]
    fn every_single_character_change_is_refused() {
        let f = format();
        let (_, token, _) = f.generate();
        let original = token.expose().as_bytes().to_vec();
        for i in 0..original.len() {
            for replacement in [b'0', b'a', b'Z', b'_', b'-'] {
                if original[i] == replacement {
                    continue;
                }
                let mut t = original.clone();
                t[i] = replacement;
                assert!(f.parse(&t).is_err(), "mutation at {i} accepted");
            }
        }
    }

    #[test]
    fn wrong_prefix_length_and_shape() {
        let f = format();
        let (_, token, _) = f.generate();
        let t = token.expose();
        assert_eq!(f.parse(&t.as_bytes()[1..]).err(), Some(TokenError::Length));
        let other = TokenFormat::new("xx").parse(t.as_bytes());
        assert_eq!(other.err(), Some(TokenError::Prefix));
        assert_eq!(f.parse(b"").err(), Some(TokenError::Length));
    }

    #[test]
    fn imported_tokens_only_when_accepted() {
        let legacy = b"kg_a1b2c3d4e5f6_Zx9Yw8Vu7Ts6Rq5Po4Nm3Lk2Ji1Hg0FeDcBa";
        assert!(format().parse(legacy).is_err());
        let f = format().accepting_imported(true);
        let parsed = f.parse(legacy).expect("imported token parses");
        assert!(bool::from(parsed.digest.ct_eq(&Digest::of(legacy))));
        assert_eq!(parsed.id, KeyId::from_digest(&Digest::of(legacy)));
        assert_ne!(
            f.parse(b"kg_a1b2c3d4e5f6_Zx9Yw8Vu7Ts6Rq5Po4Nm3Lk2Ji1Hg0FeDcBax")
                .unwrap()
                .id,
            parsed.id
        );
        assert!(f.parse(b"xx_a1b2c3d4e5f6_Zx9Yw8Vu7Ts6Rq5Po4Nm3").is_err());
        assert!(f.parse(b"kg_short").is_err());
        assert!(f.parse(b"kg_a1b2c3d4e5f6_Zx9Yw8Vu7Ts6 space").is_err());
        // Native tokens still parse natively with imports on.
        let (id, token, _) = f.generate();
        assert_eq!(f.parse(token.expose().as_bytes()).unwrap().id, id);
    }

    #[test]
    fn checksum_round_trips() {
        for v in [0u32, 1, 61, 62, u32::MAX, 123_456_789] {
            assert_eq!(decode_check(&encode_check(v)), Some(v));
        }
        assert_eq!(decode_check(b"zzzzzz"), None);
    }

    #[test]
    fn secrets_never_print() {
        let (_, token, _) = format().generate();
        let parsed = format().parse(token.expose().as_bytes()).expect("parses");
        assert_eq!(format!("{token:?} {token}"), "*** ***");
        let debug = format!("{parsed:?}");
        assert!(!debug.contains(&token.expose()[20..52]), "{debug}");
    }
}
