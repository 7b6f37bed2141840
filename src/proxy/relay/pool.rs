//! Idle upstream connections kept by the relay, one pool per route, reused
//! last-in first-out so that the warmest connections serve first.
//!
//! A connection comes back only after a complete exchange with nothing left
//! unread. Taking one skips connections idle too long and those the upstream
//! has closed or written to meanwhile (seen as read readiness, which costs no
//! system call: the runtime already learned it from epoll).

// A plain Mutex: held for a push or a pop, never across an await.
#![allow(clippy::disallowed_types)]

use std::sync::{Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

/// How long an idle upstream connection is kept (the old client pool's
/// setting, below common upstream keep-alive timeouts of 60 s or more).
const IDLE_FOR: Duration = Duration::from_secs(90);
/// Most idle connections kept per route.
const MAX_IDLE: usize = 1024;

#[derive(Debug, Default)]
pub struct IdlePool {
    idle: Mutex<Vec<(TcpStream, Instant)>>,
}

impl IdlePool {
    /// A connection believed open and quiet at `now`, if any. (The caller's
    /// clock reading: the pool's bound is 90 s, a few microseconds of age
    /// do not matter, and a clock read per call would.)
    pub fn take(&self, now: Instant) -> Option<TcpStream> {
        let mut idle = self.lock();
        while let Some((stream, since)) = idle.pop() {
            if now.saturating_duration_since(since) < IDLE_FOR && is_quiet(&stream) {
                return Some(stream);
            }
        }
        None
    }

    /// Keeps a connection whose last exchange ended cleanly, about `now`.
    pub fn put(&self, stream: TcpStream, now: Instant) {
        let mut idle = self.lock();
        if idle.len() < MAX_IDLE {
            idle.push((stream, now));
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<(TcpStream, Instant)>> {
        self.idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// An idle HTTP/1 connection has nothing to read; readiness means the
/// upstream closed it (EOF) or sent something unasked for.
fn is_quiet(stream: &TcpStream) -> bool {
    let mut cx = Context::from_waker(Waker::noop());
    matches!(stream.poll_read_ready(&mut cx), Poll::Pending)
}
