//! A body wrapper that adds the size of every data frame to a counter as it
//! streams past: bytes in (client → upstream) and out (upstream → client)
//! without buffering anything.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Buf;
use http_body::{Body, Frame, SizeHint};
use prometheus::IntCounter;

/// `B`, counting its data bytes into `counter`.
#[derive(Debug)]
pub struct CountedBody<B> {
    inner: B,
    counter: IntCounter,
}

impl<B> CountedBody<B> {
    pub fn new(inner: B, counter: IntCounter) -> CountedBody<B> {
        CountedBody { inner, counter }
    }
}

impl<B> Body for CountedBody<B>
where
    B: Body + Unpin,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                self.counter.inc_by(data.remaining() as u64);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
