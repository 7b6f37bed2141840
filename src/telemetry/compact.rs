//! The log line format when logs do not go to a terminal: the same shape as
//! tracing-subscriber's compact format
//! (`2026-11-23T19:27:29.258591Z  INFO keygate::access: key_id="…" status=200`),
//! written without the `fmt::Debug` machinery for plain strings and numbers,
//! and with the date part of the timestamp kept per thread for the second
//! it names.
//!
//! Why by hand: the access log writes one line per request, so its
//! formatting is on the hot path; the stock formatter spent about 1.2 µs of
//! a 22 µs proxied request (perf, benches/load.sh setup).

use std::cell::Cell;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// See the module documentation.
pub struct FastCompact;

impl<S, N> FormatEvent<S, N> for FastCompact
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        // Only ASCII digits and punctuation.
        writer.write_str(std::str::from_utf8(&timestamp(SystemTime::now())).unwrap_or(""))?;
        let meta = event.metadata();
        writer.write_str(match *meta.level() {
            Level::ERROR => " ERROR ",
            Level::WARN => "  WARN ",
            Level::INFO => "  INFO ",
            Level::DEBUG => " DEBUG ",
            Level::TRACE => " TRACE ",
        })?;
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                writer.write_str(span.name())?;
                let extensions = span.extensions();
                if let Some(fields) = extensions.get::<FormattedFields<N>>() {
                    if !fields.is_empty() {
                        write!(writer, "{{{fields}}}")?;
                    }
                }
                writer.write_char(':')?;
            }
            writer.write_char(' ')?;
        }
        writer.write_str(meta.target())?;
        writer.write_char(':')?;
        let mut fields = Fields {
            writer: &mut writer,
            result: Ok(()),
        };
        event.record(&mut fields);
        fields.result?;
        writer.write_char('\n')
    }
}

/// Writes ` name=value` per field; the message without its name.
struct Fields<'a, 'w> {
    writer: &'a mut Writer<'w>,
    result: fmt::Result,
}

impl Fields<'_, '_> {
    fn name(&mut self, field: &Field) -> fmt::Result {
        self.writer.write_char(' ')?;
        if field.name() != "message" {
            self.writer.write_str(field.name())?;
            self.writer.write_char('=')?;
        }
        Ok(())
    }

    fn put(&mut self, field: &Field, value: impl FnOnce(&mut Writer<'_>) -> fmt::Result) {
        if self.result.is_ok() {
            self.result = self.name(field).and_then(|()| value(self.writer));
        }
    }
}

impl Visit for Fields<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        let message = field.name() == "message";
        self.put(field, |w| {
            // What `{:?}` prints for a str that needs no escaping.
            if message {
                w.write_str(value)
            } else if prints_as_is(value) {
                w.write_char('"')?;
                w.write_str(value)?;
                w.write_char('"')
            } else {
                write!(w, "{value:?}")
            }
        });
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, |w| write!(w, "{value}"));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, |w| write!(w, "{value}"));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, |w| w.write_str(if value { "true" } else { "false" }));
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, |w| write!(w, "{value}"));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, |w| write!(w, "{value:?}"));
    }
}

/// Printable ASCII other than `"` and `\`: what `{:?}` and JSON both print
/// unchanged between quotes.
pub(super) fn prints_as_is(value: &str) -> bool {
    value
        .bytes()
        .all(|b| (b.is_ascii_graphic() && b != b'"' && b != b'\\') || b == b' ')
}

thread_local! {
    /// The last second formatted on this thread, and its text.
    static SECOND: Cell<(u64, [u8; 19])> = const { Cell::new((u64::MAX, [0; 19])) };
}

/// RFC 3339 in UTC with microseconds, as tracing-subscriber prints it:
/// `2026-11-23T19:27:29.258591Z`.
pub(super) fn timestamp(now: SystemTime) -> [u8; 27] {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (cached, mut date) = SECOND.get();
    if cached != secs {
        date = format_second(secs);
        SECOND.set((secs, date));
    }
    let mut out = [0u8; 27];
    out[..19].copy_from_slice(&date);
    out[19] = b'.';
    let mut micros = since.subsec_micros();
    for digit in out[20..26].iter_mut().rev() {
        *digit = b'0' + (micros % 10) as u8;
        micros /= 10;
    }
    out[26] = b'Z';
    out
}

/// `YYYY-MM-DDTHH:MM:SS` for seconds since the epoch (UTC), by humantime's
/// RFC 3339 formatter (as the admin API uses) without its `Z`.
fn format_second(secs: u64) -> [u8; 19] {
    let text =
        humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string();
    let mut out = [b'0'; 19];
    // humantime prints four-digit years (up to 9999), so the text is
    // `YYYY-MM-DDTHH:MM:SSZ`.
    let len = text.len().saturating_sub(1).min(19);
    out[..len].copy_from_slice(&text.as_bytes()[..len]);
    out
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::{format_second, timestamp};

    #[test]
    fn seconds_become_utc_dates() {
        assert_eq!(&format_second(0), b"1970-01-01T00:00:00");
        assert_eq!(&format_second(951_782_400), b"2000-02-29T00:00:00");
        assert_eq!(&format_second(1_795_462_049), b"2026-11-23T19:27:29");
    }

    #[test]
    fn timestamps_carry_microseconds() {
        let at = UNIX_EPOCH + Duration::from_micros(1_795_462_049_000_042);
        assert_eq!(&timestamp(at), b"2026-11-23T19:27:29.000042Z");
        // The cached second is reused within it, replaced after it.
        let later = at + Duration::from_micros(999_000);
        assert_eq!(&timestamp(later), b"2026-11-23T19:27:29.999042Z");
        let next = later + Duration::from_secs(1);
        assert_eq!(&timestamp(next), b"2026-11-23T19:27:30.999042Z");
    }
}
