//! Credential extraction: finds the API key in a request's headers and parses
//! it, without I/O and without allocating.
//!
//! Accepted: `Authorization: Bearer <token>`, `Authorization: Basic
//! base64(<id>:<secret><check>)`, and the configured key header (default
//! `x-api-key: <token>`). Never the query string: keys there end up in logs.

use base64::Engine;
use http::header::AUTHORIZATION;
use http::{HeaderMap, HeaderName};

use crate::key::{ParsedToken, TokenError, TokenFormat};

/// Which header the credential came from, so the rewrite can remove it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialSource {
    Authorization,
    ApiKeyHeader,
}

#[derive(Debug, Clone, Copy)]
pub struct Credential {
    pub token: ParsedToken,
    pub source: CredentialSource,
}

/// Why no usable credential was found. The detail goes to debug logs only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    #[error("no API key was presented")]
    Missing,
    #[error("the API key is malformed: {0}")]
    Malformed(#[from] TokenError),
    #[error("the Authorization scheme is neither Bearer nor Basic")]
    UnsupportedScheme,
    #[error("the Basic credentials are not base64 of <id>:<secret>")]
    BadBasic,
    #[error("more than one API key was presented")]
    Ambiguous,
}

/// Finds and parses credentials according to the configuration.
#[derive(Debug, Clone)]
pub struct CredentialExtractor {
    format: TokenFormat,
    api_key_header: HeaderName,
}

// Longest Basic payload we decode: `<16 id>:<38 secret+check>` is 55 bytes;
// anything longer is malformed, so a fixed stack buffer is enough.
const BASIC_MAX: usize = 64;

impl CredentialExtractor {
    pub fn new(format: TokenFormat, api_key_header: HeaderName) -> CredentialExtractor {
        CredentialExtractor {
            format,
            api_key_header,
        }
    }

    pub fn api_key_header(&self) -> &HeaderName {
        &self.api_key_header
    }

    pub fn format(&self) -> &TokenFormat {
        &self.format
    }

    pub fn extract(&self, headers: &HeaderMap) -> Result<Credential, CredentialError> {
        self.extract_values(
            headers.get_all(AUTHORIZATION).iter().map(|v| v.as_bytes()),
            headers
                .get_all(&self.api_key_header)
                .iter()
                .map(|v| v.as_bytes()),
        )
    }

    /// The same decision from raw header values: every `Authorization` value
    /// and every value of the key header, in order. The HTTP/1 relay calls
    /// this on the bytes it parsed, without building a `HeaderMap`.
    pub fn extract_values<'a>(
        &self,
        mut authorization: impl Iterator<Item = &'a [u8]>,
        mut key_header: impl Iterator<Item = &'a [u8]>,
    ) -> Result<Credential, CredentialError> {
        let from_authorization = match authorization.next() {
            Some(_) if authorization.next().is_some() => return Err(CredentialError::Ambiguous),
            Some(value) => Some(self.parse_authorization(value)),
            None => None,
        };
        let key_value = key_header.next();
        if key_header.next().is_some() {
            return Err(CredentialError::Ambiguous);
        }
        match (from_authorization, key_value) {
            (Some(Ok(token)), _) => Ok(Credential {
                token,
                source: CredentialSource::Authorization,
            }),
            // Another Authorization scheme may belong to the upstream; a key
            // header then still authenticates the request.
            (Some(Err(CredentialError::UnsupportedScheme)), Some(value)) | (None, Some(value)) => {
                Ok(Credential {
                    token: self.format.parse(trim(value))?,
                    source: CredentialSource::ApiKeyHeader,
                })
            }
            (Some(Err(e)), _) => Err(e),
            (None, None) => Err(CredentialError::Missing),
        }
    }

    fn parse_authorization(&self, value: &[u8]) -> Result<ParsedToken, CredentialError> {
        let value = trim(value);
        let split = value.iter().position(|&c| c == b' ').unwrap_or(value.len());
        let (scheme, rest) = value.split_at(split);
        let rest = trim(rest);
        if scheme.eq_ignore_ascii_case(b"bearer") {
            return Ok(self.format.parse(rest)?);
        }
        if !scheme.eq_ignore_ascii_case(b"basic") {
            return Err(CredentialError::UnsupportedScheme);
        }
        let mut buf = [0u8; BASIC_MAX];
        // base64 of 64 bytes is at most 88 characters; refuse longer input
        // before decoding so the buffer can never be too small.
        if rest.len() > 88 {
            return Err(CredentialError::BadBasic);
        }
        let len = base64::engine::general_purpose::STANDARD
            .decode_slice(rest, &mut buf)
            .map_err(|_| CredentialError::BadBasic)?;
        let decoded = &buf[..len];
        let colon = decoded
            .iter()
            .position(|&c| c == b':')
            .ok_or(CredentialError::BadBasic)?;
        let (id, secret) = (&decoded[..colon], &decoded[colon + 1..]);
        Ok(self.format.parse_pair(id, secret)?)
    }
}

fn trim(bytes: &[u8]) -> &[u8] {
    bytes.trim_ascii()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn extractor() -> CredentialExtractor {
        CredentialExtractor::new(TokenFormat::new("kg"), HeaderName::from_static("x-api-key"))
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn all_three_presentations() {
        let x = extractor();
        let (id, token, _) = x.format().generate();
        let t = token.expose();
        let bearer = x.extract(&headers(&[("authorization", &format!("Bearer {t}"))]));
        assert_eq!(bearer.unwrap().token.id, id);
        let lower = x.extract(&headers(&[("authorization", &format!("bearer  {t} "))]));
        assert_eq!(lower.unwrap().source, CredentialSource::Authorization);
        let pair = format!("{}:{}", id, &t[20..]);
        let basic = base64::engine::general_purpose::STANDARD.encode(pair);
        let basic = x.extract(&headers(&[("authorization", &format!("Basic {basic}"))]));
        assert_eq!(basic.unwrap().token.id, id);
        let header = x.extract(&headers(&[("x-api-key", t)])).unwrap();
        assert_eq!(header.source, CredentialSource::ApiKeyHeader);
    }

    #[test]
    fn refusals() {
        let x = extractor();
        let (_, token, _) = x.format().generate();
        let t = token.expose();
        assert_eq!(
            x.extract(&headers(&[])).err(),
            Some(CredentialError::Missing)
        );
        assert!(matches!(
            x.extract(&headers(&[("authorization", "Bearer kg_nope")])),
            Err(CredentialError::Malformed(_))
        ));
        assert_eq!(
            x.extract(&headers(&[("authorization", "Digest abc")]))
                .err(),
            Some(CredentialError::UnsupportedScheme)
        );
        assert_eq!(
            x.extract(&headers(&[("authorization", "Basic !!!")])).err(),
            Some(CredentialError::BadBasic)
        );
        let long = "A".repeat(200);
        assert_eq!(
            x.extract(&headers(&[("authorization", &format!("Basic {long}"))]))
                .err(),
            Some(CredentialError::BadBasic)
        );
        let bearer = format!("Bearer {t}");
        assert_eq!(
            x.extract(&headers(&[
                ("authorization", &bearer),
                ("authorization", &bearer)
            ]))
            .err(),
            Some(CredentialError::Ambiguous)
        );
        // Another scheme plus a key header: the key header authenticates.
        let ok = x.extract(&headers(&[
            ("authorization", "Digest abc"),
            ("x-api-key", t),
        ]));
        assert_eq!(ok.unwrap().source, CredentialSource::ApiKeyHeader);
    }
}
