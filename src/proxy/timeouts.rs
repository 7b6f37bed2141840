//! The proxy's clocks, and when a client connection ends.
//!
//! This module owns:
//! - the life of a client connection after it is accepted: it is closed
//!   gracefully (HTTP/2 GOAWAY; HTTP/1 after the response in progress) once
//!   it has had no request in progress for `idle_timeout`, or when the proxy
//!   drains on shutdown;
//! - the request deadline, `request_timeout`: from the request head to the
//!   response head, so it covers the client's upload and the upstream's
//!   answer, and then `408 request_timeout`;
//! - when the upstream's clock, `upstream_timeout`, starts: once the whole
//!   request has been sent, so a client's slow upload is not blamed on the
//!   upstream;
//! - that a request body whose exchange was abandoned (deadline, timeout)
//!   never reaches the upstream as if it were complete;
//! - whether a connection hyper's `header_read_timeout` closed had started
//!   a request head ([`CountReads`]), which is logged, or was idle between
//!   requests, which is not.
//!
//! It must never cut a response that has started: gRPC streams, SSE,
//! WebSocket tunnels and long downloads run for as long as both ends keep
//! them open. Its cost per request is two atomic counter updates, one clock
//! read when a connection becomes idle, and timers; it allocates only for a
//! request that has a body (the state its upload shares with the wait for
//! the answer).

use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use super::reject::ProxyError;

/// Every client connection of one listener: they share the drain signal and
/// the idle timeouts.
pub struct Connections {
    drain: watch::Sender<()>,
    idle_timeout: Duration,
    first_byte_timeout: Duration,
}

impl Connections {
    /// `header_read_timeout` also bounds the wait for a new connection's
    /// first byte, when it is the shorter (see [`OpenConnection::serve`]).
    pub fn new(idle_timeout: Duration, header_read_timeout: Duration) -> Connections {
        let (drain, _) = watch::channel(());
        Connections {
            drain,
            idle_timeout,
            first_byte_timeout: idle_timeout.min(header_read_timeout),
        }
    }

    /// Starts watching a newly accepted connection. Call it before the
    /// connection's task is spawned, so that a drain signalled meanwhile is
    /// not missed.
    pub fn open(&self) -> OpenConnection {
        OpenConnection {
            activity: Arc::new(Activity::new()),
            drain: self.drain.subscribe(),
            idle_timeout: self.idle_timeout,
            first_byte_timeout: self.first_byte_timeout,
        }
    }

    /// Closes every connection gracefully and resolves once all have ended.
    pub async fn drain(self) {
        // Err means no connection is open: nothing to tell.
        let _ = self.drain.send(());
        self.drain.closed().await;
    }
}

/// One accepted connection: its request counter, for the service, and what
/// [`OpenConnection::serve`] needs to close it.
pub struct OpenConnection {
    activity: Arc<Activity>,
    drain: watch::Receiver<()>,
    idle_timeout: Duration,
    first_byte_timeout: Duration,
}

impl OpenConnection {
    /// The drain signal, for code that serves the connection before
    /// [`OpenConnection::serve`] does (the relay): it changes, or its
    /// sender is gone, when the proxy drains.
    pub fn drain_signal(&self) -> watch::Receiver<()> {
        self.drain.clone()
    }

    /// The idle timeout this connection gets.
    pub fn idle_timeout(&self) -> Duration {
        self.idle_timeout
    }

    /// Marks the connection idle from now: the relay served requests before
    /// handing it over, so the idle clock restarts at the handover.
    pub fn restart_idle_clock(&self) {
        // At least 1: 0 means no request has ended (`Activity::never_read`).
        let ms = u64::try_from(self.activity.opened.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        self.activity.idle_since_ms.fetch_max(ms, Ordering::AcqRel);
    }

    /// The counter the connection's service reports requests to (see [`track`]).
    pub fn activity(&self) -> Arc<Activity> {
        self.activity.clone()
    }

    /// Drives `conn` to its end, calling `graceful_shutdown` once when it has
    /// been idle for the idle timeout or when the proxy drains.
    ///
    /// hyper's HTTP/2 server has no idle timeout, and `hyper_util`'s
    /// `GracefulShutdown` cannot be combined with another reason to close
    /// (its connection trait is sealed), so both reasons are watched here.
    ///
    /// A graceful close waits for hyper to finish the request body it is
    /// reading, and on HTTP/1.1 hyper goes on reading one after its answer
    /// has been sent (an upstream that answered early), however slowly the
    /// client sends it. So once closing, a connection with no request in
    /// progress that has read nothing for another `idle_timeout` is dropped
    /// (`None`): a stalled upload cannot hold it, or the drain, for ever.
    pub async fn serve<C: Future>(
        self,
        conn: C,
        graceful_shutdown: impl Fn(Pin<&mut C>),
    ) -> Option<C::Output> {
        let OpenConnection {
            activity,
            mut drain,
            idle_timeout,
            first_byte_timeout,
        } = self;
        let mut conn = pin!(conn);
        // The wait for the first request counts as idle too: hyper has no
        // timeout for a client that connects and never sends an HTTP/2
        // preface (or any first byte), and its HTTP/1 header timer starts
        // at the first byte. A client that sends nothing gets no longer
        // than one that sends a head slowly, as on the relay and in nginx.
        let first_byte_deadline = activity.opened + first_byte_timeout;
        let mut idle = pin!(tokio::time::sleep_until(first_byte_deadline));
        let mut closing = false;
        // Once closing: what had been read when the idle timer was last set.
        let mut read_when_closing = None;
        loop {
            tokio::select! {
                biased;
                output = conn.as_mut() => return Some(output),
                // Err: the listener is gone, which also means shut down.
                _ = drain.changed(), if !closing => {
                    closing = true;
                    graceful_shutdown(conn.as_mut());
                }
                () = idle.as_mut() => {
                    let now = Instant::now();
                    if closing {
                        let read = activity.read_total.load(Ordering::Acquire);
                        let quiet = read_when_closing == Some(read);
                        if quiet && activity.in_flight.load(Ordering::Acquire) == 0 {
                            tracing::debug!("dropping a closing client connection whose upload stalled");
                            return None;
                        }
                        read_when_closing = Some(read);
                        idle.as_mut().reset(now + idle_timeout);
                        continue;
                    }
                    let idle_deadline = if activity.never_read() {
                        Some(first_byte_deadline)
                    } else {
                        activity.idle_deadline(idle_timeout)
                    };
                    match idle_deadline {
                        Some(deadline) if deadline <= now => {
                            tracing::debug!("closing an idle client connection");
                            closing = true;
                            graceful_shutdown(conn.as_mut());
                            read_when_closing = Some(activity.read_total.load(Ordering::Acquire));
                            idle.as_mut().reset(now + idle_timeout);
                        }
                        Some(deadline) => idle.as_mut().reset(deadline),
                        // Busy: look again one idle timeout from now.
                        None => idle.as_mut().reset(now + idle_timeout),
                    }
                }
            }
        }
    }
}

/// How many requests a connection has in progress, and since when it has
/// had none.
#[derive(Debug)]
pub struct Activity {
    in_flight: AtomicUsize,
    /// When the last request ended, in milliseconds since `opened`.
    idle_since_ms: AtomicU64,
    opened: Instant,
    /// Bytes read from the client since its last request ended (or the
    /// connection opened): the start of a next head, when hyper's header
    /// read timeout closes the connection.
    read_since_request: AtomicU64,
    /// Bytes read from the client through [`CountReads`], ever.
    read_total: AtomicU64,
    /// The start of the last head read, up to the end of its request line,
    /// left here by [`CountReads`] when the connection ends.
    last_head: OnceLock<Vec<u8>>,
    /// A request was answered `101 Switching Protocols`: the connection is
    /// a tunnel's from then on (see `linger`).
    upgraded: AtomicBool,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            in_flight: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
            opened: Instant::now(),
            read_since_request: AtomicU64::new(0),
            read_total: AtomicU64::new(0),
            last_head: OnceLock::new(),
            upgraded: AtomicBool::new(false),
        }
    }

    /// Whether a request on the connection was answered `101`.
    pub fn upgraded(&self) -> bool {
        self.upgraded.load(Ordering::Acquire)
    }

    /// Whether the client has sent anything since its last request ended:
    /// asked when hyper's `header_read_timeout` closed the connection, it
    /// tells a head that stalled (logged, as nginx logs it, with 408) from
    /// an idle keep-alive connection or one that never sent a byte (not
    /// logged). A head that was read together with the request before it
    /// (pipelined) is not seen; late bytes of a body hyper reads after its
    /// request's answer (an upstream that answered early) are taken for one.
    pub fn head_started(&self) -> bool {
        self.read_since_request.load(Ordering::Acquire) > 0
    }

    /// The start of the head the client was sending when its connection
    /// ended: its request line and line end when whole (at most
    /// [`REQUEST_LINE_MAX`] bytes), else what there was of it. Set once
    /// the connection's [`CountReads`] is dropped.
    pub fn last_head(&self) -> &[u8] {
        self.last_head.get().map_or(&[], Vec::as_slice)
    }

    /// Whether nothing has been read from the client yet (the relay's
    /// reads count once it hands a request over).
    fn never_read(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0
            && self.idle_since_ms.load(Ordering::Acquire) == 0
            && self.read_since_request.load(Ordering::Acquire) == 0
    }

    /// When the connection will have been idle for `idle_timeout`; `None`
    /// while a request is in progress. A request starting concurrently can
    /// make this stale, which is harmless: a graceful close lets requests in
    /// progress finish.
    fn idle_deadline(&self, idle_timeout: Duration) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let since = Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire));
        Some(self.opened + since + idle_timeout)
    }
}

/// A request in progress on a connection, from the service call until its
/// response body is dropped (sent, or reset by the client).
#[derive(Debug)]
pub struct InFlight(Arc<Activity>);

impl InFlight {
    fn new(activity: Arc<Activity>) -> InFlight {
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(activity)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        // What was read during the request was its own; a next head starts
        // from here.
        self.0.read_since_request.store(0, Ordering::Release);
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            // At least 1: 0 means no request has ended (`never_read`).
            let ms = u64::try_from(self.0.opened.elapsed().as_millis())
                .unwrap_or(u64::MAX)
                .max(1);
            // fetch_max: two requests ending at once must not move it back.
            self.0.idle_since_ms.fetch_max(ms, Ordering::AcqRel);
        }
    }
}

/// Counts the service call `response` as in progress on the connection
/// until the response body it produces is dropped.
pub fn track<F, B, E>(
    activity: &Arc<Activity>,
    response: F,
) -> impl Future<Output = Result<Response<Tracked<B>>, E>>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    // Counted from the call, not the first poll.
    let in_flight = InFlight::new(activity.clone());
    let activity = activity.clone();
    async move {
        let response = response.await?;
        if response.status() == http::StatusCode::SWITCHING_PROTOCOLS {
            activity.upgraded.store(true, Ordering::Release);
        }
        Ok(response.map(|inner| Tracked {
            inner,
            _in_flight: in_flight,
        }))
    }
}

/// A response body that keeps its request counted as in progress.
#[derive(Debug)]
pub struct Tracked<B> {
    inner: B,
    _in_flight: InFlight,
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A client connection's I/O as hyper's server reads it, counting what is
/// read into its [`Activity`] (see [`Activity::head_started`]): hyper's
/// header read timeout ends the connection with an error that does not say
/// whether any of a head had arrived, and its read buffer is its own. One
/// atomic add per read; the relay's own reads do not come through here.
///
/// It also keeps each head's request line (a copy of a hundred bytes or
/// so per request), for the access log to name what a stalled head asked
/// for; the headers after it are never kept.
#[derive(Debug)]
pub struct CountReads<S> {
    inner: S,
    activity: Arc<Activity>,
    /// The start of the head being read, up to the end of its request line.
    line: Vec<u8>,
    /// False once the connection is seen to speak HTTP/2, whose frames
    /// have no request line (and no header read timeout) to keep.
    keep_lines: bool,
}

/// The longest request line [`CountReads`] keeps; the access log names
/// nothing of a longer one.
pub const REQUEST_LINE_MAX: usize = 8 * 1024;

impl<S> CountReads<S> {
    pub fn new(inner: S, activity: Arc<Activity>) -> CountReads<S> {
        CountReads {
            inner,
            activity,
            line: Vec::new(),
            keep_lines: true,
        }
    }

    /// Notes `fresh`, just read: a first read since the last request ended
    /// starts a head, whose request line is kept.
    fn note(&mut self, fresh: &[u8]) {
        let before = self
            .activity
            .read_since_request
            .fetch_add(fresh.len() as u64, Ordering::AcqRel);
        self.activity
            .read_total
            .fetch_add(fresh.len() as u64, Ordering::Release);
        if !self.keep_lines {
            return;
        }
        if before == 0 {
            self.line.clear();
        }
        let open = self.line.last() != Some(&b'\n') && self.line.len() < REQUEST_LINE_MAX;
        if open {
            let end = memchr::memchr(b'\n', fresh).map_or(fresh.len(), |i| i + 1);
            let room = REQUEST_LINE_MAX - self.line.len();
            self.line.extend_from_slice(&fresh[..end.min(room)]);
            // The HTTP/2 preface's first line (h2c or ALPN h2).
            if self.line == b"PRI * HTTP/2.0\r\n" {
                self.keep_lines = false;
            }
        }
    }
}

impl<S> Drop for CountReads<S> {
    fn drop(&mut self) {
        let _ = self.activity.last_head.set(std::mem::take(&mut self.line));
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for CountReads<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.note(&buf.filled()[before..]);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for CountReads<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Runs the request's exchange up to its response head under
/// `request_timeout`. When the deadline passes, `exchange` is dropped, and
/// with it the upstream request (HTTP/1: its connection is closed; HTTP/2:
/// its stream is reset), so the upstream sees the request aborted.
pub async fn within_request_timeout<T>(
    request_timeout: Duration,
    exchange: impl Future<Output = Result<T, ProxyError>>,
) -> Result<T, ProxyError> {
    tokio::time::timeout(request_timeout, exchange)
        .await
        .unwrap_or(Err(ProxyError::RequestTimeout))
}

/// Wraps the body of a request going upstream so that
/// [`wait_for_response_head`] can start the upstream's clock when it has been
/// sent, and can stop it being passed on if the exchange is abandoned. A
/// request without a body needs neither and allocates nothing.
pub fn watch_upload<B: Body>(req: Request<B>) -> (Request<Upload<B>>, UploadWatch) {
    let state = (!req.body().is_end_stream()).then(|| Arc::new(UploadState::default()));
    let watch = UploadWatch(state.clone());
    (req.map(|inner| Upload { inner, state }), watch)
}

/// Shared by a request body on its way upstream and the wait for the
/// upstream's answer.
#[derive(Debug, Default)]
struct UploadState {
    /// Notified once the body has been sent completely.
    sent: Notify,
    /// Set when nobody waits for the answer any more (request deadline,
    /// upstream timeout, client gone): what is left of the body must not
    /// reach the upstream as if it were complete.
    abandoned: AtomicBool,
    /// Set when the client's body itself failed (invalid chunked framing,
    /// the connection ending before the declared length): the exchange
    /// fails then through no fault of the upstream's.
    client_failed: AtomicBool,
}

/// The forwarding side's view of an upload.
pub struct UploadWatch(Option<Arc<UploadState>>);

impl UploadWatch {
    /// Whether the client's request body failed while it was being read:
    /// the request is then the client's fault (400), not the upstream's.
    pub fn client_body_failed(&self) -> bool {
        self.0
            .as_ref()
            .is_some_and(|s| s.client_failed.load(Ordering::Acquire))
    }
}

/// Why a request body stopped short: the exchange was abandoned.
#[derive(Debug, thiserror::Error)]
#[error("the request was abandoned before the upstream answered")]
pub struct UploadAbandoned;

/// A request body on its way upstream, signalling when it has all been read.
#[derive(Debug)]
pub struct Upload<B> {
    inner: B,
    state: Option<Arc<UploadState>>,
}

impl<B> Upload<B> {
    fn abandoned(&self) -> bool {
        self.state
            .as_ref()
            .is_some_and(|s| s.abandoned.load(Ordering::Acquire))
    }
}

impl<B> Body for Upload<B>
where
    B: Body + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if self.state.is_none() {
            return polled.map_err(Into::into);
        }
        // hyper reads a client's reset (HTTP/2 CANCEL or NO_ERROR) as the end
        // of the body, and a client does reset once it has our 408: without
        // this, the upstream would take a truncated body (a client stream
        // cut short) for a complete one. An error makes hyper's client reset
        // the upstream stream (HTTP/2) or close the connection (HTTP/1).
        if self.abandoned() {
            return Poll::Ready(Some(Err(UploadAbandoned.into())));
        }
        if let Poll::Ready(Some(Err(_))) = &polled {
            if let Some(state) = &self.state {
                state.client_failed.store(true, Ordering::Release);
            }
        }
        // hyper stops polling a body that says it has ended, so the last
        // frame may never be followed by `None`.
        let finished = match &polled {
            Poll::Ready(None) => true,
            Poll::Ready(Some(Ok(_))) => self.inner.is_end_stream(),
            _ => false,
        };
        if finished {
            if let Some(state) = self.state.take() {
                // Stores a permit if nobody waits yet.
                state.sent.notify_one();
            }
        }
        polled.map_err(Into::into)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream() && !self.abandoned()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Marks the upload abandoned unless disarmed: dropping the wait for the
/// answer, for whatever reason, abandons the exchange.
struct AbandonOnDrop(Option<Arc<UploadState>>);

impl Drop for AbandonOnDrop {
    fn drop(&mut self) {
        if let Some(state) = self.0.take() {
            state.abandoned.store(true, Ordering::Release);
        }
    }
}

/// Waits for the upstream's response head, allowing it `upstream_timeout`
/// from the moment the request has been sent completely. `Err(())` means
/// the upstream took too long. If this is dropped or times out before the
/// answer, the rest of the request body is withheld from the upstream.
pub async fn wait_for_response_head<F: Future>(
    response: F,
    upload: &UploadWatch,
    upstream_timeout: Duration,
) -> Result<F::Output, ()> {
    let mut abandon = AbandonOnDrop(upload.0.clone());
    let clock = async {
        if let Some(state) = &upload.0 {
            state.sent.notified().await;
        }
        tokio::time::sleep(upstream_timeout).await;
    };
    let answered = tokio::select! {
        biased;
        output = response => Ok(output),
        () = clock => Err(()),
    };
    if answered.is_ok() {
        // The exchange goes on: a bidirectional stream keeps uploading.
        abandon.0 = None;
    }
    answered
}

#[cfg(test)]
mod tests {
    use super::*;

    use bytes::Bytes;
    use http_body_util::{BodyExt, Full, StreamBody};

    #[tokio::test]
    async fn idle_deadline_follows_the_last_request() {
        let activity = Arc::new(Activity::new());
        let timeout = Duration::from_secs(60);
        assert_eq!(
            activity.idle_deadline(timeout),
            Some(activity.opened + timeout)
        );
        let first = InFlight::new(activity.clone());
        let second = InFlight::new(activity.clone());
        drop(first);
        assert_eq!(activity.idle_deadline(timeout), None, "one still open");
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(second);
        let idle_since = activity.idle_deadline(timeout).expect("idle") - timeout;
        assert!(idle_since >= activity.opened + Duration::from_millis(50));
        assert!(idle_since <= Instant::now());
    }

    #[tokio::test]
    async fn the_request_line_of_the_head_after_the_last_request_is_kept() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buf = [0u8; 1024];
        let activity = Arc::new(Activity::new());
        let (mut client, server) = tokio::io::duplex(1024);
        let mut io = CountReads::new(server, activity.clone());
        assert!(!activity.head_started());
        client
            .write_all(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        let _ = io.read(&mut buf).await.unwrap();
        assert!(activity.head_started());
        // A request ends: what follows is a new head.
        drop(InFlight::new(activity.clone()));
        assert!(!activity.head_started());
        client
            .write_all(b"POST /b?q HTTP/1.1\r\nHost")
            .await
            .unwrap();
        let _ = io.read(&mut buf).await.unwrap();
        assert!(activity.head_started());
        drop(io);
        assert_eq!(activity.last_head(), b"POST /b?q HTTP/1.1\r\n");

        // HTTP/2 frames are not copied: nothing after the preface is kept.
        let activity = Arc::new(Activity::new());
        let (mut client, server) = tokio::io::duplex(1024);
        let mut io = CountReads::new(server, activity.clone());
        client
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        let _ = io.read(&mut buf).await.unwrap();
        drop(InFlight::new(activity.clone()));
        client.write_all(b"\x00\x00\x04\x01frame\n").await.unwrap();
        let _ = io.read(&mut buf).await.unwrap();
        drop(io);
        assert_eq!(activity.last_head(), b"PRI * HTTP/2.0\r\n");
    }

    #[tokio::test]
    async fn a_tracked_request_is_in_flight_until_its_body_is_dropped() {
        let activity = Arc::new(Activity::new());
        let response = track(&activity, async {
            Ok::<_, ()>(Response::new(Full::new(Bytes::from_static(b"x"))))
        });
        assert_eq!(activity.in_flight.load(Ordering::Acquire), 1);
        let response = response.await.unwrap();
        assert_eq!(activity.in_flight.load(Ordering::Acquire), 1);
        drop(response);
        assert_eq!(activity.in_flight.load(Ordering::Acquire), 0);
    }

    #[tokio::test]
    async fn an_empty_body_needs_no_signal_and_a_streamed_one_signals_at_its_end() {
        let (_, upload) = watch_upload(Request::new(http_body_util::Empty::<Bytes>::new()));
        assert!(upload.0.is_none());

        let frames = futures_util::stream::iter(
            [b"a", b"b"]
                .map(|c| Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(c)))),
        );
        let (req, upload) = watch_upload(Request::new(StreamBody::new(frames)));
        let state = upload.0.clone().expect("a body to watch");
        let wait = tokio::spawn(async move { state.sent.notified().await });
        tokio::task::yield_now().await;
        assert!(!wait.is_finished());
        let body = req.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "ab");
        tokio::time::timeout(Duration::from_secs(1), wait)
            .await
            .expect("signalled")
            .unwrap();
    }

    #[tokio::test]
    async fn the_upstream_clock_starts_when_the_upload_has_been_sent() {
        let state = Arc::new(UploadState::default());
        let watch = UploadWatch(Some(state.clone()));
        let waited = tokio::spawn(async move {
            wait_for_response_head(
                std::future::pending::<()>(),
                &watch,
                Duration::from_millis(50),
            )
            .await
        });
        // Uploading for longer than the upstream timeout is not the upstream's fault.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!waited.is_finished());
        assert!(!state.abandoned.load(Ordering::Acquire));
        state.sent.notify_one();
        let result = tokio::time::timeout(Duration::from_secs(2), waited)
            .await
            .expect("the upstream timeout ran once the upload was sent");
        assert_eq!(result.unwrap(), Err(()));
        assert!(
            state.abandoned.load(Ordering::Acquire),
            "a timed-out upload is abandoned"
        );
    }

    #[tokio::test]
    async fn an_abandoned_upload_ends_in_an_error_not_a_clean_end() {
        let (tx, rx) =
            tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::convert::Infallible>>(4);
        let body = StreamBody::new(tokio_stream_from(rx));
        let (req, upload) = watch_upload(Request::new(body));
        let mut body = req.into_body();
        tx.send(Ok(Frame::data(Bytes::from_static(b"a"))))
            .await
            .unwrap();
        assert!(body.frame().await.unwrap().is_ok());
        // The answer is no longer awaited (request deadline), then the
        // client's stream stops, which hyper reports as a clean end.
        let waiting = wait_for_response_head(
            std::future::pending::<()>(),
            &upload,
            Duration::from_secs(60),
        );
        assert!(tokio::time::timeout(Duration::from_millis(10), waiting)
            .await
            .is_err());
        drop(tx);
        assert!(!body.is_end_stream());
        let last = body.frame().await.expect("not a clean end");
        assert!(last.unwrap_err().is::<UploadAbandoned>());
    }

    #[tokio::test]
    async fn an_answered_upload_keeps_streaming() {
        let frames = futures_util::stream::iter(
            [b"a", b"b"]
                .map(|c| Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(c)))),
        );
        let (req, upload) = watch_upload(Request::new(StreamBody::new(frames)));
        let answered =
            wait_for_response_head(async { "head" }, &upload, Duration::from_secs(60)).await;
        assert_eq!(answered, Ok("head"));
        let body = req.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "ab");
    }

    /// A stream of what `rx` receives.
    fn tokio_stream_from<T>(
        mut rx: tokio::sync::mpsc::Receiver<T>,
    ) -> impl futures_util::Stream<Item = T> {
        futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
    }
}
