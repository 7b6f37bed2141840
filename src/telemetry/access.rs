//! The access log: one line per proxied request, at INFO under the target
//! `keygate::access`, with the key id, owner id, client address, method,
//! path, route, upstream, status, refusal reason, latency and request id.
//! Never the credential, nor the query (where a misplaced secret would be),
//! nor a token a client put in the path: a stretch of the path that looks
//! like one of the configured prefix is written as `<redacted>`
//! ([`REDACTED`]).
//!
//! When [`super::init_logging`] installs the process's logging and lines go
//! to a file or collector (JSON, or the compact format off a terminal), the
//! line is written here straight into the shared log buffer, byte for byte
//! what the tracing formatter prints for the same event. Otherwise (a
//! terminal's coloured output, or a subscriber a test installed) it is an
//! ordinary `tracing` event. Either way the subscriber's filter decides
//! whether it is written (`RUST_LOG=keygate::access=off` turns it off).
//!
//! Why by hand: through `tracing`'s field visitors and `fmt::Write`, one
//! access line cost about 4,000 instructions (callgrind, benches/load.sh
//! setup), a fifth of keygate's own work on a proxied request; appending
//! the same bytes to a buffer costs a few hundred.

// The log buffer is a plain Mutex: held to copy one line, never across an
// await.
#![allow(clippy::disallowed_types)]

use std::cell::RefCell;
use std::io::{BufWriter, Stderr, Write};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::SystemTime;

use super::compact::{prints_as_is, timestamp};
use crate::key::{TokenFormat, REDACTED};

/// What the access log says of one request.
#[derive(Debug, Clone, Copy)]
pub struct AccessEntry<'a> {
    pub key_id: Option<&'a str>,
    pub owner_id: Option<&'a str>,
    /// The peer's IP address (not a forwarded client's).
    pub client: &'a str,
    pub method: &'a str,
    /// The path as the client sent it, without the query; `None` when the
    /// head did not parse.
    pub path: Option<&'a str>,
    pub route: Option<&'a str>,
    pub upstream: Option<&'a str>,
    pub status: u16,
    pub refusal: Option<&'static str>,
    pub latency_us: u64,
    /// The `x-request-id` the upstream received (the client's or a new
    /// one), which correlates this line with the upstream's logs.
    pub request_id: Option<&'a str>,
    /// The configured token format, to find tokens in `path` (a client
    /// that put its key there, by mistake or by a badly written client).
    pub tokens: &'a TokenFormat,
}

/// `path` with every stretch that looks like a token replaced by
/// [`REDACTED`]; `None` when it has none, the common case, which costs one
/// substring search and no allocation.
fn redact_tokens(path: &str, tokens: &TokenFormat) -> Option<String> {
    let first = tokens.find_token_like(path, 0)?;
    let mut out = String::with_capacity(path.len());
    let mut copied = 0;
    let mut found = Some(first);
    while let Some(token) = found {
        out.push_str(&path[copied..token.start]);
        out.push_str(REDACTED);
        copied = token.end;
        found = tokens.find_token_like(path, copied);
    }
    out.push_str(&path[copied..]);
    Some(out)
}

/// The shape of the lines written directly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineFormat {
    /// tracing-subscriber's compact format without colours.
    Compact,
    /// tracing-subscriber's JSON format with the event's fields flattened.
    Json,
}

struct Sink {
    format: LineFormat,
    buffer: Arc<Mutex<BufWriter<Stderr>>>,
}

static SINK: OnceLock<Sink> = OnceLock::new();

thread_local! {
    /// The line being built on this thread.
    static LINE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Writes access lines directly into `buffer` from now on.
pub(super) fn install(format: LineFormat, buffer: Arc<Mutex<BufWriter<Stderr>>>) {
    let _ = SINK.set(Sink { format, buffer });
}

/// Logs one request, if the filter lets `keygate::access` INFO through.
pub fn log(entry: &AccessEntry<'_>) {
    if !tracing::enabled!(target: "keygate::access", tracing::Level::INFO) {
        return;
    }
    let redacted = entry.path.and_then(|p| redact_tokens(p, entry.tokens));
    let entry = &AccessEntry {
        path: redacted.as_deref().or(entry.path),
        ..*entry
    };
    let Some(sink) = SINK.get() else {
        tracing::info!(
            target: "keygate::access",
            key_id = entry.key_id,
            owner_id = entry.owner_id,
            client = entry.client,
            method = entry.method,
            path = entry.path,
            route = entry.route,
            upstream = entry.upstream,
            status = entry.status,
            refusal = entry.refusal,
            latency_us = entry.latency_us,
            request_id = entry.request_id,
        );
        return;
    };
    LINE.with(|line| {
        let mut line = line.borrow_mut();
        line.clear();
        write_line(&mut line, entry, sink.format, SystemTime::now());
        // As for every other log line: a failed write to stderr is dropped.
        let _ = super::lock(&sink.buffer).write_all(&line);
    });
}

/// A field's value: tracing records these as `str` and `u64`.
#[derive(Clone, Copy)]
enum Value<'a> {
    Str(&'a str),
    Num(u64),
}

impl<'a> AccessEntry<'a> {
    /// The fields in the order the event names them; `None` is left out,
    /// as tracing leaves out an `Option` that is `None`.
    fn fields(&self) -> [(&'static str, Option<Value<'a>>); 11] {
        [
            ("key_id", self.key_id.map(Value::Str)),
            ("owner_id", self.owner_id.map(Value::Str)),
            ("client", Some(Value::Str(self.client))),
            ("method", Some(Value::Str(self.method))),
            ("path", self.path.map(Value::Str)),
            ("route", self.route.map(Value::Str)),
            ("upstream", self.upstream.map(Value::Str)),
            ("status", Some(Value::Num(self.status.into()))),
            ("refusal", self.refusal.map(Value::Str)),
            ("latency_us", Some(Value::Num(self.latency_us))),
            ("request_id", self.request_id.map(Value::Str)),
        ]
    }
}

/// Compact: `2026-11-23T21:29:59.494507Z  INFO keygate::access: key_id="…" … latency_us=1307`
/// JSON: `{"timestamp":"…","level":"INFO","key_id":"…",…,"latency_us":1307,"target":"keygate::access"}`
fn write_line(out: &mut Vec<u8>, entry: &AccessEntry<'_>, format: LineFormat, now: SystemTime) {
    match format {
        LineFormat::Compact => {
            out.extend_from_slice(&timestamp(now));
            out.extend_from_slice(b"  INFO keygate::access:");
        }
        LineFormat::Json => {
            out.extend_from_slice(b"{\"timestamp\":\"");
            out.extend_from_slice(&timestamp(now));
            out.extend_from_slice(b"\",\"level\":\"INFO\"");
        }
    }
    for (name, value) in entry.fields() {
        let Some(value) = value else { continue };
        match format {
            LineFormat::Compact => {
                out.push(b' ');
                out.extend_from_slice(name.as_bytes());
                out.push(b'=');
            }
            LineFormat::Json => {
                out.extend_from_slice(b",\"");
                out.extend_from_slice(name.as_bytes());
                out.extend_from_slice(b"\":");
            }
        }
        match value {
            Value::Num(n) => out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes()),
            Value::Str(text) if prints_as_is(text) => {
                out.push(b'"');
                out.extend_from_slice(text.as_bytes());
                out.push(b'"');
            }
            // What `{:?}` prints, as tracing's compact format does.
            Value::Str(text) if format == LineFormat::Compact => {
                let _ = write!(out, "{text:?}");
            }
            // serde_json's escaping, as tracing-subscriber's JSON format uses.
            Value::Str(text) => {
                let _ = serde_json::to_writer(&mut *out, text);
            }
        }
    }
    match format {
        LineFormat::Compact => out.push(b'\n'),
        LineFormat::Json => out.extend_from_slice(b",\"target\":\"keygate::access\"}\n"),
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    static TOKENS: OnceLock<TokenFormat> = OnceLock::new();

    fn tokens() -> &'static TokenFormat {
        TOKENS.get_or_init(|| TokenFormat::new("kg"))
    }

    #[test]
    fn tokens_in_the_path_are_redacted() {
        let (_, first, _) = tokens().generate();
        let (_, second, _) = tokens().generate();
        let (first, second) = (first.expose(), second.expose());
        assert_eq!(
            redact_tokens(&format!("/v1/{first}/thing/{second}"), tokens()).as_deref(),
            Some("/v1/<redacted>/thing/<redacted>")
        );
        assert_eq!(
            redact_tokens(&format!("/{first}"), tokens()).as_deref(),
            Some("/<redacted>")
        );
        assert_eq!(redact_tokens("/v1/orders", tokens()), None);
        // Another prefix's token is not this keygate's.
        let other = TokenFormat::new("zz");
        assert_eq!(redact_tokens(&format!("/v1/{first}"), &other), None);
    }

    fn entry() -> AccessEntry<'static> {
        AccessEntry {
            tokens: tokens(),
            key_id: Some("1mf7b9nsycnm6tzn"),
            owner_id: Some("zwf1rfd5fz3vhj8p"),
            client: "127.0.0.1",
            method: "GET",
            path: Some("/v1/orders"),
            route: Some("default"),
            upstream: Some("127.0.0.1:18080"),
            status: 200,
            refusal: None,
            latency_us: 1307,
            request_id: Some("6a1f0c5e9b2d4e7f0000000000000001"),
        }
    }

    /// A refusal on a route whose name needs escaping.
    fn refused() -> AccessEntry<'static> {
        AccessEntry {
            key_id: None,
            owner_id: None,
            path: Some("/a\"b"),
            route: Some("odd \"name\"\n"),
            status: 401,
            request_id: Some("client's \u{1b}[31m id"),
            refusal: Some("invalid_api_key"),
            ..entry()
        }
    }

    const AT: Duration = Duration::from_micros(1_795_462_049_258_591);

    #[test]
    fn compact_lines_match_the_tracing_format() {
        let mut out = Vec::new();
        write_line(&mut out, &entry(), LineFormat::Compact, UNIX_EPOCH + AT);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "2026-11-23T19:27:29.258591Z  INFO keygate::access: key_id=\"1mf7b9nsycnm6tzn\" \
             owner_id=\"zwf1rfd5fz3vhj8p\" client=\"127.0.0.1\" method=\"GET\" \
             path=\"/v1/orders\" route=\"default\" upstream=\"127.0.0.1:18080\" status=200 \
             latency_us=1307 request_id=\"6a1f0c5e9b2d4e7f0000000000000001\"\n"
        );
        let refused = refused();
        let mut out = Vec::new();
        write_line(&mut out, &refused, LineFormat::Compact, UNIX_EPOCH + AT);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "2026-11-23T19:27:29.258591Z  INFO keygate::access: client=\"127.0.0.1\" \
             method=\"GET\" path=\"/a\\\"b\" route=\"odd \\\"name\\\"\\n\" \
             upstream=\"127.0.0.1:18080\" status=401 refusal=\"invalid_api_key\" \
             latency_us=1307 request_id=\"client's \\u{1b}[31m id\"\n"
        );
    }

    #[test]
    fn json_lines_match_the_tracing_format() {
        let mut out = Vec::new();
        let refused = refused();
        write_line(&mut out, &refused, LineFormat::Json, UNIX_EPOCH + AT);
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text,
            "{\"timestamp\":\"2026-11-23T19:27:29.258591Z\",\"level\":\"INFO\",\
             \"client\":\"127.0.0.1\",\"method\":\"GET\",\"path\":\"/a\\\"b\",\
             \"route\":\"odd \\\"name\\\"\\n\",\"upstream\":\"127.0.0.1:18080\",\
             \"status\":401,\"refusal\":\"invalid_api_key\",\"latency_us\":1307,\
             \"request_id\":\"client's \\u001b[31m id\",\"target\":\"keygate::access\"}\n"
        );
        let parsed: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(parsed["route"], "odd \"name\"\n");
        assert_eq!(parsed["request_id"], "client's \u{1b}[31m id");
    }
}
