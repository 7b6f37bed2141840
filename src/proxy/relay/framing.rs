//! Message framing for the relay: where an upstream response body ends
//! (RFC 9112 section 6.3), and a scanner that follows a chunked body while
//! its bytes pass through unchanged.
//!
//! Written by hand because hyper's decoder is not public and re-encoding
//! chunks would cost a copy; the scanner only reads sizes and line ends.

/// How the body after a response head is delimited.
#[derive(Debug)]
pub enum Framing {
    /// No body: HEAD responses, 1xx, 204 and 304.
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked; the scanner finds the last chunk and the trailers' end.
    Chunked(ChunkedScanner),
    /// Everything until the upstream closes the connection.
    UntilClose,
}

/// The upstream's response cannot be framed; the exchange fails with 502.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadFraming;

impl Framing {
    /// The framing of a response to a request (`head_request`: it was HEAD),
    /// from its version (`http10`: HTTP/1.0), status and headers.
    pub fn of_response(
        head_request: bool,
        http10: bool,
        status: u16,
        headers: &[httparse::Header<'_>],
    ) -> Result<Framing, BadFraming> {
        // RFC 9112 section 6.1: Transfer-Encoding in an HTTP/1.0 message is
        // faulty framing (hyper's client refuses it too).
        let transfer_encoded = || {
            headers
                .iter()
                .any(|h| h.name.eq_ignore_ascii_case("transfer-encoding"))
        };
        if http10 && transfer_encoded() {
            return Err(BadFraming);
        }
        if head_request || status < 200 || status == 204 || status == 304 {
            return Ok(Framing::Empty);
        }
        let mut length: Option<u64> = None;
        let mut chunked = None;
        for header in headers {
            if header.name.eq_ignore_ascii_case("transfer-encoding") {
                // Only the final coding decides; anything but chunked last
                // means the body runs until the connection closes.
                let last = header.value.rsplit(|&c| c == b',').next().unwrap_or(b"");
                chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            } else if header.name.eq_ignore_ascii_case("content-length") {
                let value = parse_length(header.value).ok_or(BadFraming)?;
                if length.is_some_and(|seen| seen != value) {
                    return Err(BadFraming);
                }
                length = Some(value);
            }
        }
        Ok(match (chunked, length) {
            (Some(true), _) => Framing::Chunked(ChunkedScanner::default()),
            (Some(false), _) => Framing::UntilClose,
            (None, Some(0)) => Framing::Empty,
            (None, Some(n)) => Framing::Length(n),
            (None, None) => Framing::UntilClose,
        })
    }
}

/// A Content-Length value: ASCII digits only (no sign, no spaces inside),
/// small enough for a u64.
pub fn parse_length(value: &[u8]) -> Option<u64> {
    let value = value.trim_ascii();
    if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    value.iter().try_fold(0u64, |n, &d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

/// Longest chunk extension or trailer section accepted, so that a broken
/// upstream cannot make the scanner walk forever without progress.
const MAX_LINE_BYTES: usize = 64 * 1024;

/// Follows `chunk-size [ext] CRLF data CRLF ... 0 CRLF trailers CRLF`.
#[derive(Debug, Default)]
pub struct ChunkedScanner {
    state: State,
    /// Bytes left in the current chunk's data.
    remaining: u64,
    /// Hex digits seen in the current size, and bytes of extension or
    /// trailer lines seen, for the limits.
    digits: u8,
    line_bytes: usize,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum State {
    #[default]
    Size,
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    TrailerStart,
    Trailer,
    TrailerLf,
    EndLf,
    Done,
}

impl ChunkedScanner {
    /// Reads `bytes`, the next part of the body. Returns the offset just past
    /// the body's end when it ends inside `bytes`, `None` when more is needed.
    pub fn scan(&mut self, bytes: &[u8]) -> Result<Option<usize>, BadFraming> {
        let mut i = 0;
        while i < bytes.len() {
            if self.state == State::Data {
                let take = usize::try_from(self.remaining)
                    .unwrap_or(usize::MAX)
                    .min(bytes.len() - i);
                i += take;
                self.remaining -= take as u64;
                if self.remaining == 0 {
                    self.state = State::DataCr;
                }
                continue;
            }
            let c = bytes[i];
            i += 1;
            self.state = match (self.state, c) {
                (State::Size, b'\r') if self.digits > 0 => State::SizeLf,
                (State::Size, b';' | b' ' | b'\t') if self.digits > 0 => State::Extension,
                (State::Size, c) if c.is_ascii_hexdigit() && self.digits < 16 => {
                    let digit = (c as char).to_digit(16).ok_or(BadFraming)?;
                    self.remaining = self.remaining * 16 + u64::from(digit);
                    self.digits += 1;
                    State::Size
                }
                (State::Extension, b'\r') => State::SizeLf,
                (State::Extension, b'\n') => return Err(BadFraming),
                (State::Extension, _) => {
                    self.count_line_byte()?;
                    State::Extension
                }
                (State::SizeLf, b'\n') => {
                    self.digits = 0;
                    if self.remaining == 0 {
                        State::TrailerStart
                    } else {
                        State::Data
                    }
                }
                (State::DataCr, b'\r') => State::DataLf,
                (State::DataLf, b'\n') => State::Size,
                (State::TrailerStart, b'\r') => State::EndLf,
                (State::Trailer, b'\r') => State::TrailerLf,
                (State::TrailerStart | State::Trailer, b'\n') => return Err(BadFraming),
                (State::TrailerStart | State::Trailer, _) => {
                    self.count_line_byte()?;
                    State::Trailer
                }
                (State::TrailerLf, b'\n') => State::TrailerStart,
                (State::EndLf, b'\n') => {
                    self.state = State::Done;
                    return Ok(Some(i));
                }
                _ => return Err(BadFraming),
            };
        }
        Ok(None)
    }

    fn count_line_byte(&mut self) -> Result<(), BadFraming> {
        self.line_bytes += 1;
        if self.line_bytes > MAX_LINE_BYTES {
            return Err(BadFraming);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_all(body: &[u8], split: usize) -> Result<Option<usize>, BadFraming> {
        let mut scanner = ChunkedScanner::default();
        let (a, b) = body.split_at(split.min(body.len()));
        if let Some(end) = scanner.scan(a)? {
            return Ok(Some(end));
        }
        Ok(scanner.scan(b)?.map(|end| end + a.len()))
    }

    #[test]
    fn finds_the_end_at_every_split() {
        let body =
            b"5\r\nhello\r\n1a;ext=1\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nx-t: 1\r\n\r\nNEXT";
        for split in 0..=body.len() {
            assert_eq!(
                scan_all(body, split),
                Ok(Some(body.len() - 4)),
                "split {split}"
            );
        }
    }

    #[test]
    fn refuses_broken_framing() {
        for bad in [
            &b"zz\r\n"[..],
            b"5\r\nhelloXX",
            b"\r\n",
            b"5\nhello",
            b"11111111111111111\r\n",
        ] {
            assert_eq!(scan_all(bad, bad.len()), Err(BadFraming), "{bad:?}");
        }
        assert_eq!(scan_all(b"5\r\nhel", 3), Ok(None));
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let h = |name: &'static str, value: &'static [u8]| httparse::Header { name, value };
        assert!(matches!(
            Framing::of_response(false, false, 200, &[h("content-length", b"12")]),
            Ok(Framing::Length(12))
        ));
        assert!(matches!(
            Framing::of_response(true, false, 200, &[h("content-length", b"12")]),
            Ok(Framing::Empty)
        ));
        assert!(matches!(
            Framing::of_response(
                false,
                false,
                200,
                &[h("Transfer-Encoding", b"gzip, chunked")]
            ),
            Ok(Framing::Chunked(_))
        ));
        assert!(matches!(
            Framing::of_response(false, false, 200, &[h("transfer-encoding", b"gzip")]),
            Ok(Framing::UntilClose)
        ));
        assert!(matches!(
            Framing::of_response(false, false, 200, &[]),
            Ok(Framing::UntilClose)
        ));
        assert!(Framing::of_response(
            false,
            false,
            200,
            &[h("content-length", b"1"), h("content-length", b"2")]
        )
        .is_err());
        assert!(Framing::of_response(false, false, 200, &[h("content-length", b"+1")]).is_err());
        assert!(
            Framing::of_response(false, true, 200, &[h("transfer-encoding", b"chunked")]).is_err()
        );
        assert!(matches!(
            Framing::of_response(false, true, 200, &[h("content-length", b"2")]),
            Ok(Framing::Length(2))
        ));
        assert_eq!(parse_length(b"18446744073709551616"), None);
    }
}
