//! The proxy's clocks, and when a client connection ends.
//!
//! This module owns:
//! - the life of a client connection after it is accepted: it is closed
//!   gracefully (HTTP/2 GOAWAY; HTTP/1 after the response in progress) once
//!   it has had no request in progress for `idle_timeout`, or when the proxy
//!   drains on shutdown.
//!
//! It must never cut a response that has started: gRPC streams, SSE,
//! WebSocket tunnels and long downloads run for as long as both ends keep
//! them open. Its cost per request is two atomic counter updates and one
//! clock read when a connection becomes idle.

use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Response;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::watch;
use tokio::time::Instant;

/// Every client connection of one listener: they share the drain signal and
/// the idle timeout.
pub struct Connections {
    drain: watch::Sender<()>,
    idle_timeout: Duration,
}

impl Connections {
    pub fn new(idle_timeout: Duration) -> Connections {
        let (drain, _) = watch::channel(());
        Connections {
            drain,
            idle_timeout,
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
}

impl OpenConnection {
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
    pub async fn serve<C: Future>(
        self,
        conn: C,
        graceful_shutdown: impl Fn(Pin<&mut C>),
    ) -> C::Output {
        let OpenConnection {
            activity,
            mut drain,
            idle_timeout,
        } = self;
        let mut conn = pin!(conn);
        // The wait for the first request counts as idle too: hyper has no
        // timeout for a client that connects and never sends an HTTP/2
        // preface (or any first byte).
        let mut idle = pin!(tokio::time::sleep_until(activity.opened + idle_timeout));
        let mut closing = false;
        loop {
            tokio::select! {
                biased;
                output = conn.as_mut() => return output,
                // Err: the listener is gone, which also means shut down.
                _ = drain.changed(), if !closing => {
                    closing = true;
                    graceful_shutdown(conn.as_mut());
                }
                () = idle.as_mut(), if !closing => {
                    let now = Instant::now();
                    match activity.idle_deadline(idle_timeout) {
                        Some(deadline) if deadline <= now => {
                            tracing::debug!("closing an idle client connection");
                            closing = true;
                            graceful_shutdown(conn.as_mut());
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
}

impl Activity {
    fn new() -> Activity {
        Activity {
            in_flight: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
            opened: Instant::now(),
        }
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
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            let ms = u64::try_from(self.0.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
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
    async move {
        let response = response.await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    use bytes::Bytes;
    use http_body_util::Full;

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
}
