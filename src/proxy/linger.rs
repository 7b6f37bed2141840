//! Lingering close: ending a client connection without losing its answer.
//!
//! When keygate closes a connection while the client may still be sending
//! (a request refused, or answered by the upstream, before its body had all
//! arrived), closing the socket with unread bytes makes the kernel send a
//! reset, and a client that writes its whole body before it reads (curl,
//! most HTTP libraries) gets that reset on its next write instead of the
//! answer. So keygate closes its write side first (the client reads the
//! answer to its end) and then reads and drops what the client still sends,
//! until the client closes too, goes quiet for [`QUIET`], [`AT_MOST`] has
//! passed, or the proxy drains. This is nginx's lingering close, with the
//! defaults of its `lingering_timeout` and `lingering_time`.
//!
//! The relay lingers when it closes with a request body unread
//! ([`Lingering::run`]). On hyper's path [`LingerOnClose`] lingers when
//! hyper shuts the connection down (after a refusal with the body unread,
//! an idle timeout or a broken head): hyper says nothing of why it closes,
//! and lingers on nothing itself. A client that is reading closes at the
//! close it sees, which ends the lingering at once.
//!
//! Why by hand: neither hyper nor hyper-util has a lingering close, and
//! tokio's `shutdown` closes the write side only.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tokio::time::{sleep_until, Instant, Sleep};

use super::timeouts::Activity;

/// How long the client may stay quiet before the connection closes.
pub const QUIET: Duration = Duration::from_secs(5);
/// How long a connection lingers at most.
pub const AT_MOST: Duration = Duration::from_secs(30);
/// Reads made in one poll before yielding to other tasks.
const READS_PER_POLL: usize = 16;

/// One lingering close in progress.
pub struct Lingering {
    /// Ready once: later polls (a second shutdown) find it ended.
    ended: bool,
    shut: bool,
    /// When the client was last heard from (or the lingering started).
    heard: Instant,
    ends: Instant,
    timer: Pin<Box<Sleep>>,
    drained: Pin<Box<dyn Future<Output = ()> + Send>>,
}

impl Lingering {
    /// A lingering close that ends early when `drain` changes (or its
    /// sender is gone): the proxy is draining.
    pub fn new(mut drain: watch::Receiver<()>) -> Lingering {
        let now = Instant::now();
        Lingering {
            ended: false,
            shut: false,
            heard: now,
            ends: now + AT_MOST,
            timer: Box::pin(sleep_until(now + QUIET)),
            drained: Box::pin(async move {
                let _ = drain.changed().await;
            }),
        }
    }

    /// Closes `io` lingering, to the end.
    pub async fn run<S: AsyncRead + AsyncWrite + Unpin>(mut self, io: &mut S) {
        poll_fn(|cx| self.poll(cx, io)).await
    }

    /// Polls the lingering close of `io`; ready when it has ended (the
    /// socket itself closes when `io` is dropped).
    pub fn poll<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        io: &mut S,
    ) -> Poll<()> {
        if self.ended {
            return Poll::Ready(());
        }
        let polled = self.poll_to_end(cx, io);
        self.ended = polled.is_ready();
        polled
    }

    fn poll_to_end<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        io: &mut S,
    ) -> Poll<()> {
        if self.drained.as_mut().poll(cx).is_ready() {
            return Poll::Ready(());
        }
        if !self.shut {
            match Pin::new(&mut *io).poll_shutdown(cx) {
                Poll::Ready(Ok(())) => self.shut = true,
                Poll::Ready(Err(_)) => return Poll::Ready(()),
                // A TLS close_notify waiting for room: as quiet as a read.
                Poll::Pending => return self.poll_timer(cx),
            }
        }
        let mut scratch = [0u8; 8 * 1024];
        for _ in 0..READS_PER_POLL {
            let mut dropped = ReadBuf::new(&mut scratch);
            match Pin::new(&mut *io).poll_read(cx, &mut dropped) {
                Poll::Ready(Ok(())) if !dropped.filled().is_empty() => {
                    self.heard = Instant::now();
                }
                // The client closed (or reset) its side.
                Poll::Ready(_) => return Poll::Ready(()),
                Poll::Pending => return self.poll_timer(cx),
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Ready once the client has been quiet for [`QUIET`] or the time is up.
    /// The timer is moved only when it fires: a client sending steadily
    /// costs no timer update per read.
    fn poll_timer(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        while self.timer.as_mut().poll(cx).is_ready() {
            let until = (self.heard + QUIET).min(self.ends);
            if Instant::now() >= until {
                return Poll::Ready(());
            }
            self.timer.as_mut().reset(until);
        }
        Poll::Pending
    }
}

/// A client connection's I/O on hyper's path that lingers when hyper shuts
/// it down, unless the proxy is draining or the connection was upgraded (a
/// tunnel's shutdown closes one direction only, and the client's bytes
/// are the tunnel's to read).
pub struct LingerOnClose<S> {
    inner: S,
    activity: Arc<Activity>,
    drain: watch::Receiver<()>,
    lingering: Option<Box<Lingering>>,
}

impl<S> LingerOnClose<S> {
    pub fn new(inner: S, activity: Arc<Activity>, drain: watch::Receiver<()>) -> LingerOnClose<S> {
        LingerOnClose {
            inner,
            activity,
            drain,
            lingering: None,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for LingerOnClose<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for LingerOnClose<S> {
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
        let this = &mut *self;
        if this.lingering.is_none() {
            let draining = this.drain.has_changed().unwrap_or(true);
            if draining || this.activity.upgraded() {
                return Pin::new(&mut this.inner).poll_shutdown(cx);
            }
            this.lingering = Some(Box::new(Lingering::new(this.drain.clone())));
        }
        let lingering = this.lingering.as_mut().expect("set above");
        lingering.poll(cx, &mut this.inner).map(Ok)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Lingers on one end of a pipe; returns when it ended, and the client's end.
    fn linger_on_a_pipe(
        drain: watch::Receiver<()>,
    ) -> (tokio::task::JoinHandle<Instant>, tokio::io::DuplexStream) {
        let (mut server, client) = duplex(64 * 1024);
        let lingered = tokio::spawn(async move {
            Lingering::new(drain).run(&mut server).await;
            Instant::now()
        });
        (lingered, client)
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_client_is_let_go_after_the_quiet_time() {
        let (_drain, drained) = watch::channel(());
        let start = Instant::now();
        let (lingered, mut client) = linger_on_a_pipe(drained);
        // The write side is closed at once: the client reads to the end.
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        client.write_all(b"more of the body").await.unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        client.write_all(b"and more").await.unwrap();
        let ended = lingered.await.unwrap();
        assert_eq!(ended - start, Duration::from_secs(2) + QUIET);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_never_stops_is_let_go_at_the_limit() {
        let (_drain, drained) = watch::channel(());
        let start = Instant::now();
        let (lingered, mut client) = linger_on_a_pipe(drained);
        let sending = tokio::spawn(async move {
            while client.write_all(&[b'x'; 1024]).await.is_ok() {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        let ended = lingered.await.unwrap();
        assert_eq!(ended - start, AT_MOST);
        sending.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_closes_or_a_drain_ends_it_at_once() {
        let (_drain, drained) = watch::channel(());
        let start = Instant::now();
        let (lingered, client) = linger_on_a_pipe(drained);
        drop(client);
        assert_eq!(lingered.await.unwrap(), start);

        let (drain, drained) = watch::channel(());
        let (lingered, _client) = linger_on_a_pipe(drained);
        tokio::time::sleep(Duration::from_secs(1)).await;
        drain.send_replace(());
        assert_eq!(lingered.await.unwrap() - start, Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_second_shutdown_after_the_end_is_answered_at_once() {
        use tokio::io::AsyncWriteExt as _;
        let (drain, drained) = watch::channel(());
        let (server, _client) = duplex(1024);
        let activity = crate::proxy::timeouts::Connections::new(
            Duration::from_secs(60),
            Duration::from_secs(10),
        )
        .open()
        .activity();
        let mut io = LingerOnClose::new(server, activity, drained);
        // Lingering, with a quiet client: still going after a second.
        let lingering = tokio::time::timeout(Duration::from_secs(1), io.shutdown()).await;
        assert!(lingering.is_err());
        // A drain ends it; a shutdown after that is answered at once.
        drain.send_replace(());
        io.shutdown().await.unwrap();
        io.shutdown().await.unwrap();
    }
}
