//! API key tokens: their format, generation, parsing and checksum, and the
//! SHA-256 digests that are all the store ever keeps of a secret.
//!
//! This module does no I/O. It must never log, print or format a secret: the
//! secret and the issued token are wrapped in types whose `Debug` and
//! `Display` print `***`.

mod digest;
mod token;

/// What is written where a token, or the secret of one, was found in text
/// that goes out: the access log's path, an admin API error message. One
/// marker for both, so that one search finds every redaction.
pub const REDACTED: &str = "<redacted>";

pub use digest::Digest;
pub use token::{
    imported_character, random_id, IssuedToken, KeyId, ParsedToken, TokenError, TokenFormat,
    CHECK_LEN, ID_LEN, SECRET_LEN,
};
