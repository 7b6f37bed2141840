//! Idle upstream connections kept by the relay, one pool per route, reused
//! last-in first-out so that the warmest connections serve first.
//!
//! A connection comes back only after a complete exchange with nothing left
//! unread. Taking one skips connections idle too long and those the upstream
//! has closed or written to meanwhile (seen as read readiness, which costs no
//! system call: the runtime already learned it from epoll). A sweeper drops
//! such connections every [`SWEEP_EVERY`] too, so that an upstream's
//! keep-alive timeout does not leave them in CLOSE-WAIT, holding a file
//! descriptor each, until traffic happens to reach them.

// A plain Mutex: held for a push or a pop, never across an await.
#![allow(clippy::disallowed_types)]

use std::sync::{Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::net::TcpStream;

use crate::proxy::ProxyState;

/// How long an idle upstream connection is kept (the old client pool's
/// setting, below common upstream keep-alive timeouts of 60 s or more).
const IDLE_FOR: Duration = Duration::from_secs(90);
/// Most idle connections kept per route.
const MAX_IDLE: usize = 1024;
/// How often idle connections are checked without traffic. A sweep locks
/// each route's pool once and asks readiness of each connection, which the
/// runtime already holds: no system call.
const SWEEP_EVERY: Duration = Duration::from_secs(2);

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

    /// Drops the connections [`IdlePool::take`] would skip: idle too long,
    /// closed by the upstream or written to.
    pub fn sweep(&self, now: Instant) {
        self.lock().retain(|(stream, since)| {
            now.saturating_duration_since(*since) < IDLE_FOR && is_quiet(stream)
        });
    }

    fn lock(&self) -> MutexGuard<'_, Vec<(TcpStream, Instant)>> {
        self.idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Sweeps the current proxy state's pools every [`SWEEP_EVERY`] until
/// `stopped`. (A state a reload replaced drops its pools with it.)
pub async fn run_sweeper(
    states: std::sync::Arc<ArcSwap<ProxyState>>,
    stopped: impl std::future::Future,
) {
    let mut every = tokio::time::interval(SWEEP_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            _ = &mut stopped => return,
            _ = every.tick() => {
                let now = Instant::now();
                for pool in &states.load().relay_pools {
                    pool.sweep(now);
                }
            }
        }
    }
}

/// An idle HTTP/1 connection has nothing to read; readiness means the
/// upstream closed it (EOF) or sent something unasked for.
fn is_quiet(stream: &TcpStream) -> bool {
    let mut cx = Context::from_waker(Waker::noop());
    matches!(stream.poll_read_ready(&mut cx), Poll::Pending)
}
