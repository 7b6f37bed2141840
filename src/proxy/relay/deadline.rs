//! One timer per relayed connection for every deadline it keeps (idle,
//! header read, request, upstream response), armed lazily.
//!
//! Each wait names its deadline. The timer is only moved when a wait's
//! deadline is earlier than the one it is set for; a later deadline is just
//! remembered, and when the timer fires early the wait sees that its own
//! deadline has not passed and sets the timer again. On a busy keep-alive
//! connection every deadline is later than the last, so the timer is set
//! about once per timeout period instead of twice per request.
//!
//! Why not `tokio::time::timeout_at` per wait: each one registers a timer
//! entry and removes it again, about 600 instructions and a lock per
//! request in the relay (callgrind, benches/load.sh setup). This is the
//! lazy-deadline scheme of netty's idle handler, over tokio's `Sleep`.

use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::task::Poll;

use tokio::time::{sleep_until, Instant, Sleep};

/// A wait ran past its deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elapsed;

pub struct Deadline {
    timer: Pin<Box<Sleep>>,
}

impl Deadline {
    /// A timer not yet set for anything earlier than `first`.
    pub fn new(first: Instant) -> Deadline {
        Deadline {
            timer: Box::pin(sleep_until(first)),
        }
    }

    /// Runs `work` until it completes, or fails with [`Elapsed`] once `at`
    /// has passed.
    pub async fn run<F: Future>(&mut self, at: Instant, work: F) -> Result<F::Output, Elapsed> {
        if at < self.timer.deadline() {
            self.timer.as_mut().reset(at);
        }
        let mut work = pin!(work);
        poll_fn(|cx| {
            if let Poll::Ready(output) = work.as_mut().poll(cx) {
                return Poll::Ready(Ok(output));
            }
            while self.timer.as_mut().poll(cx).is_ready() {
                if Instant::now() >= at {
                    return Poll::Ready(Err(Elapsed));
                }
                // Fired for an earlier deadline than this wait's.
                self.timer.as_mut().reset(at);
            }
            Poll::Pending
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn each_wait_keeps_its_own_deadline() {
        let start = Instant::now();
        let mut deadline = Deadline::new(start + Duration::from_secs(10));
        // Work that finishes in time is unaffected.
        let done = deadline
            .run(start + Duration::from_secs(10), async { 7 })
            .await;
        assert_eq!(done, Ok(7));
        // A later deadline than the timer's: the early firing is ignored.
        let late = start + Duration::from_secs(30);
        let slept = deadline
            .run(late, tokio::time::sleep(Duration::from_secs(20)))
            .await;
        assert_eq!(slept, Ok(()));
        assert_eq!(Instant::now(), start + Duration::from_secs(20));
        // It still ends the wait at its own deadline.
        let never = deadline.run(late, std::future::pending::<()>()).await;
        assert_eq!(never, Err(Elapsed));
        assert_eq!(Instant::now(), late);
        // The timer, fired at `late`, is set again for a later wait...
        let far = late + Duration::from_secs(100);
        let short = deadline
            .run(far, tokio::time::sleep(Duration::from_secs(5)))
            .await;
        assert_eq!(short, Ok(()));
        // ...and moved when a wait's deadline is earlier than that.
        let soon = late + Duration::from_secs(6);
        let cut = deadline.run(soon, std::future::pending::<()>()).await;
        assert_eq!(cut, Err(Elapsed));
        assert_eq!(Instant::now(), soon);
    }
}
