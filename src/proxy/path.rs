//! The request path as routes see it and as the upstream receives it.
//!
//! A route is an authorization boundary: its namespace and permission cover
//! the paths under its prefix. When keygate and the upstream read one path
//! differently, a request is authorized under one route and served under
//! another. `/%61dmin`, `/public/../admin` and `//admin` all miss the route
//! `/admin` byte for byte, yet most upstreams serve them as `/admin`
//! (frameworks decode escapes before routing; nginx also resolves dot
//! segments and merges slashes).
//!
//! So by default ([`PathNormalization::Strict`]) the path is normalized
//! before routing (RFC 3986 section 6.2.2: escapes of unreserved characters
//! decoded, the hex digits of other escapes in upper case, dot segments
//! removed; and runs of slashes merged, as nginx does), and the upstream
//! receives the normalized path, so that what was authorized is what is
//! served. What normalization cannot settle is refused: an encoded slash or
//! backslash (upstreams disagree on whether it separates segments), a raw
//! backslash (some servers take it for a slash), an encoded NUL (C upstreams
//! end the path there) and a `%` that does not start an escape. Envoy's
//! `normalize_path`, `merge_slashes` and `path_with_escaped_slashes_action`
//! do the same, off by default; Spring's `StrictHttpFirewall` refuses the
//! same characters.
//!
//! The query is left as it is: routes do not look at it. And all this only
//! where paths decide something: without a route whose prefix is not `/`
//! (the sidecar), the proxy runs with [`PathNormalization::Off`] and the
//! upstream gets the path as sent (`ProxyState::path_normalization`).

use std::borrow::Cow;

use crate::config::PathNormalization;

use super::reject::ProxyError;

/// How a path failed normalization.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathRefusal {
    /// An encoded slash or backslash, a backslash or an encoded NUL.
    Ambiguous,
    /// A `%` not followed by two hex digits.
    MalformedEscape,
}

impl From<PathRefusal> for ProxyError {
    fn from(refusal: PathRefusal) -> ProxyError {
        match refusal {
            PathRefusal::Ambiguous => ProxyError::AmbiguousPath,
            PathRefusal::MalformedEscape => ProxyError::MalformedPath,
        }
    }
}

/// The path routes match and the upstream receives, under `policy`.
/// Borrows `path` when it is already normal (the common case allocates
/// nothing). A path that does not start with `/` (`*`, an authority) is
/// not a path to route on and is returned as it is.
pub fn normalize(policy: PathNormalization, path: &str) -> Result<Cow<'_, str>, PathRefusal> {
    if policy == PathNormalization::Off || !path.starts_with('/') || is_normal(path) {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode(policy, path.as_bytes())?;
    let normal = resolve_segments(&decoded);
    if normal == path.as_bytes() {
        return Ok(Cow::Borrowed(path));
    }
    // Only ASCII goes in: decoding yields unreserved characters, everything
    // else stays escaped.
    Ok(Cow::Owned(String::from_utf8(normal).expect("ASCII")))
}

/// The same path with `query` (without its `?`) appended, for a target.
pub fn with_query(path: &str, query: Option<&str>) -> String {
    match query {
        Some(query) => format!("{path}?{query}"),
        None => path.to_owned(),
    }
}

/// Whether `path` holds nothing normalization would change or refuse: no
/// `%`, no backslash, and no slash followed by a slash or a dot. A single
/// pass over the bytes, so that the common path costs no more.
fn is_normal(path: &str) -> bool {
    let bytes = path.as_bytes();
    !bytes.iter().enumerate().any(|(i, &c)| {
        c == b'%' || c == b'\\' || (c == b'/' && matches!(bytes.get(i + 1), Some(b'/' | b'.')))
    })
}

/// Decodes escapes of unreserved characters, upper-cases the hex of the
/// others, and refuses what cannot be settled.
fn decode(policy: PathNormalization, path: &[u8]) -> Result<Vec<u8>, PathRefusal> {
    let mut out = Vec::with_capacity(path.len());
    let mut i = 0;
    while i < path.len() {
        match path[i] {
            b'%' => {
                let (hi, lo) = match (path.get(i + 1), path.get(i + 2)) {
                    (Some(&hi), Some(&lo)) if hi.is_ascii_hexdigit() && lo.is_ascii_hexdigit() => {
                        (hi, lo)
                    }
                    _ => return Err(PathRefusal::MalformedEscape),
                };
                let value = hex_value(hi) << 4 | hex_value(lo);
                match value {
                    v if is_unreserved(v) => out.push(v),
                    0 => return Err(PathRefusal::Ambiguous),
                    b'/' | b'\\' if policy == PathNormalization::Strict => {
                        return Err(PathRefusal::Ambiguous)
                    }
                    _ => out.extend_from_slice(&[
                        b'%',
                        hi.to_ascii_uppercase(),
                        lo.to_ascii_uppercase(),
                    ]),
                }
                i += 3;
            }
            b'\\' => return Err(PathRefusal::Ambiguous),
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    Ok(out)
}

fn hex_value(digit: u8) -> u8 {
    match digit {
        b'0'..=b'9' => digit - b'0',
        b'a'..=b'f' => digit - b'a' + 10,
        _ => digit - b'A' + 10,
    }
}

/// RFC 3986 section 2.3.
fn is_unreserved(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~')
}

/// Removes dot segments (RFC 3986 section 5.2.4; `..` stops at the root)
/// and merges runs of slashes. A trailing slash stays, and a path ending in
/// a dot segment gets one, as in the RFC: `/a/.` and `/a/b/..` become `/a/`.
fn resolve_segments(path: &[u8]) -> Vec<u8> {
    let mut segments: Vec<&[u8]> = Vec::new();
    let mut trailing_slash = false;
    // The path starts with '/': the first piece is the empty one before it.
    for segment in path.split(|&c| c == b'/').skip(1) {
        trailing_slash = false;
        match segment {
            b"" | b"." => trailing_slash = true,
            b".." => {
                segments.pop();
                trailing_slash = true;
            }
            _ => segments.push(segment),
        }
    }
    let mut out = Vec::with_capacity(path.len());
    for segment in &segments {
        out.push(b'/');
        out.extend_from_slice(segment);
    }
    if trailing_slash || segments.is_empty() {
        out.push(b'/');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strict(path: &str) -> Result<Cow<'_, str>, PathRefusal> {
        normalize(PathNormalization::Strict, path)
    }

    #[test]
    fn normal_paths_are_borrowed() {
        for path in [
            "/",
            "/api/v1/users",
            "/a/b/",
            "/.well-known/x",
            "/a.b/c..d/...",
            "/x;y=1/z",
            "*",
        ] {
            assert!(
                matches!(strict(path), Ok(Cow::Borrowed(p)) if p == path),
                "{path}"
            );
        }
    }

    #[test]
    fn the_ways_around_a_prefix_become_the_path_they_mean() {
        for (path, normal) in [
            ("/%61dmin/x", "/admin/x"),
            ("/%41%44MIN", "/ADMIN"),
            ("/public/../admin", "/admin"),
            ("/public/%2e%2e/admin", "/admin"),
            ("/public/%2E./admin", "/admin"),
            ("/./admin", "/admin"),
            ("//admin", "/admin"),
            ("/admin//x///y", "/admin/x/y"),
            ("/../../admin", "/admin"),
            ("/a/b/..", "/a/"),
            ("/a/.", "/a/"),
            ("/a/..", "/"),
            ("/..", "/"),
            ("/a//", "/a/"),
            ("/caf%c3%a9", "/caf%C3%A9"),
            ("/a%20b", "/a%20b"),
            ("/a%3fb", "/a%3Fb"),
        ] {
            assert_eq!(strict(path).as_deref(), Ok(normal), "{path}");
        }
    }

    #[test]
    fn what_cannot_be_settled_is_refused() {
        for path in [
            "/a%2fb",
            "/a%2Fb",
            "/public/..%2fadmin",
            "/a%5cb",
            "/a\\b",
            "/admin%00",
        ] {
            assert_eq!(strict(path), Err(PathRefusal::Ambiguous), "{path}");
        }
        for path in ["/a%", "/a%4", "/a%zz", "/a%g1/b"] {
            assert_eq!(strict(path), Err(PathRefusal::MalformedEscape), "{path}");
        }
    }

    #[test]
    fn encoded_slashes_can_be_kept_as_escapes() {
        let keep = |path| normalize(PathNormalization::KeepEncodedSlashes, path);
        assert_eq!(keep("/repos/a%2fb/../c").as_deref(), Ok("/repos/c"));
        assert_eq!(keep("/repos/a%2fb").as_deref(), Ok("/repos/a%2Fb"));
        assert_eq!(keep("/repos/a%5Cb").as_deref(), Ok("/repos/a%5Cb"));
        assert_eq!(keep("/a\\b"), Err(PathRefusal::Ambiguous));
        assert_eq!(keep("/a%00"), Err(PathRefusal::Ambiguous));
    }

    #[test]
    fn off_passes_every_path_through() {
        for path in ["/%61dmin", "/a/../b", "/a%2fb", "/a%zz"] {
            let off = normalize(PathNormalization::Off, path);
            assert!(matches!(off, Ok(Cow::Borrowed(p)) if p == path), "{path}");
        }
    }

    #[test]
    fn normalizing_twice_changes_nothing() {
        for path in ["/%61/./b//../c%7e", "/x/%2E%2E/%2e/y", "/a%3a/b"] {
            let once = strict(path).unwrap().into_owned();
            assert_eq!(strict(&once).as_deref(), Ok(once.as_str()), "{path}");
        }
    }
}
