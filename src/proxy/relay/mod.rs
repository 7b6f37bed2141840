//! The HTTP/1.1 relay: the common request served without hyper.
//!
//! A request qualifies when its head arrives whole in one read and is
//! HTTP/1.1, not `CONNECT`, with an origin-form target, one `Host`, a head
//! within `max_header_bytes`, no body or a `Content-Length` body, no `Upgrade`,
//! `Transfer-Encoding` or `Expect`, a `Connection` header naming nothing but
//! `keep-alive`/`close`, and a route to a plain `http://` upstream spoken to
//! in HTTP/1.1. Then the relay authenticates it (a missing, malformed or
//! refused key gets `reject`'s answer, the one hyper's path gives), copies
//! the head with the rewrite of `headers` applied, streams the body by its
//! length, and passes the upstream's response back by its framing, through
//! its own pool of upstream connections. While it waits (on the store for
//! a cache miss, on a new upstream connection, on the upstream's answer)
//! it also listens to the client (the readiness tokio already has, no
//! system call): the upstream's answer may come before the body has all
//! arrived, and the client may leave (logged as 499, as on hyper's path,
//! and nothing more goes upstream). Every
//! other request is handed to hyper with the bytes read so far
//! ([`Ended::Handoff`]), and hyper serves the rest of that connection
//! through `handler`, so each limit and odd case keeps one implementation.
//!
//! Why by hand: on one core, hyper's server and client with the pooled
//! legacy client cost about twice nginx's CPU per proxied request (README,
//! Performance), and no crate offers a header-rewriting HTTP/1 relay that
//! is not a whole framework. Parsing stays httparse's, the parser hyper
//! uses; what is hand-written is the framing and the copying.

mod deadline;
mod framing;
mod pool;
mod rewind;

use std::borrow::Cow;
use std::future::{poll_fn, Future};
use std::mem::MaybeUninit;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use bytes::{Buf, BytesMut};
use http::uri::Scheme;
use http::Method;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::auth::{Credential, CredentialError, VerifiedKey};
use crate::config::UpstreamProtocol;

use super::handler::{
    authenticate, is_grpc_content_type, record, record_refusal, LoggedRequest, Outcome,
    CLIENT_CLOSED_REQUEST,
};
use super::headers::{
    connection_tokens, request_id_bytes, write_response_head, ConnectionInfo, RawHead,
};
use super::linger::Lingering;
use super::path;
use super::reject::ProxyError;
use super::routes::{strip_port, valid_host, Route, Upstream};
use super::server::ServerLimits;
use super::ProxyState;
use deadline::Deadline;
use framing::{parse_length, BadFraming, ChunkedScanner, Framing};

pub use pool::{run_sweeper as run_pool_sweeper, IdlePool};
pub use rewind::Rewind;

/// Headers parsed per head; a request with more goes to hyper, which applies
/// the configured `max_headers`.
const MAX_HEADERS: usize = 128;
/// Most headers in an upstream response (hyper's client default).
const MAX_RESPONSE_HEADERS: usize = 100;
/// Largest upstream response head accepted.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// The longest request target hyper's HTTP/1 parser takes (`MAX_URI_LEN`
/// in hyper's `proto::h1::role`); a longer one gets its 414.
const HYPER_MAX_URI_LEN: usize = u16::MAX as usize - 1;
/// Buffer space made available before each read.
const READ_CHUNK: usize = 16 * 1024;

/// How a relayed connection ended.
pub enum Ended {
    /// Closed: by the client, after `Connection: close`, a timeout, a drain
    /// or an error.
    Closed,
    /// A request the relay does not serve; these bytes, then the rest of
    /// the connection, are hyper's.
    Handoff(BytesMut),
}

/// Serves requests on `io` until the connection ends or a request needs hyper.
pub async fn serve<S>(
    io: &mut S,
    states: &ArcSwap<ProxyState>,
    conn: &ConnectionInfo,
    limits: &ServerLimits,
    drain: &mut watch::Receiver<()>,
) -> Ended
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut relay = Relay {
        io,
        conn,
        limits,
        buf: BytesMut::with_capacity(READ_CHUNK),
        out: Vec::with_capacity(READ_CHUNK),
        ubuf: BytesMut::with_capacity(READ_CHUNK),
        timer: Deadline::new(Instant::now() + limits.idle_timeout),
    };
    let mut noted = Noted::default();
    // One drain watch for the connection's life: a `changed()` per idle
    // wait registered a waiter and removed it again on every request.
    let mut watcher = drain.clone();
    let mut drained = pin!(watcher.changed());
    loop {
        match relay.read_head(drained.as_mut()).await {
            HeadRead::Ready => {}
            HeadRead::Closed => return Ended::Closed,
        }
        let started = std::time::Instant::now();
        let state = states.load_full();
        match relay.exchange(&state, started, drain, &mut noted).await {
            Next::KeepAlive if !draining(drain) => {}
            Next::KeepAlive | Next::Close => return Ended::Closed,
            Next::Linger => {
                Lingering::new(drain.clone()).run(relay.io).await;
                return Ended::Closed;
            }
            Next::Handoff => return Ended::Handoff(relay.buf),
        }
    }
}

/// Whether the proxy is draining, asked when a response head is written
/// and after each exchange rather than once per request: a SIGTERM while
/// the upstream answers must still close the connection after the answer,
/// and say so (`Connection: close`). Err: the listener is gone, which also
/// means draining.
fn draining(drain: &watch::Receiver<()>) -> bool {
    drain.has_changed().unwrap_or(true)
}

struct Relay<'a, S> {
    io: &'a mut S,
    conn: &'a ConnectionInfo,
    limits: &'a ServerLimits,
    /// Bytes from the client not yet served.
    buf: BytesMut,
    /// What is written next: the upstream request head, or the response.
    out: Vec<u8>,
    /// Bytes from the upstream not yet passed on.
    ubuf: BytesMut,
    /// The timer behind every wait's deadline.
    timer: Deadline,
}

/// What the access log names of a request, copied out of its head (which
/// is gone from `buf` by the time the line is written). Kept for the
/// connection's life, so a request costs no allocation here.
#[derive(Default)]
struct Noted {
    /// The path as sent, without the query.
    path: String,
    /// The client's `x-request-id`, or the one generated for the request.
    request_id: String,
}

enum HeadRead {
    /// `buf` holds the start of a request, whole or not.
    Ready,
    Closed,
}

enum Next {
    KeepAlive,
    Close,
    /// Close, but the client may still be sending the request body the
    /// answer came before: a lingering close (`linger`).
    Linger,
    Handoff,
}

/// What the relay decided about a request while its head was parsed.
struct Plan<'s> {
    route: &'s Route,
    /// A request without a usable credential is refused here too, with
    /// the answer hyper's path gives it (`ProxyError::from`); its upstream
    /// head is never written.
    credential: Result<Credential, CredentialError>,
    method: Method,
    body: u64,
    /// The client asked to close after this exchange.
    close: bool,
    head_request: bool,
}

/// The clock readings an exchange takes once and passes on.
#[derive(Clone, Copy)]
struct Clock {
    /// Wall-clock time of the request (expiry, usage).
    wall: SystemTime,
    /// When the request was about to be sent upstream.
    upstream_started: std::time::Instant,
    /// `request_timeout` from the request head.
    request_deadline: Instant,
}

/// Why an exchange ended before a response head reached the client.
enum Failure {
    /// Answered with this error; `body_consumed`: the connection can go on.
    Proxy {
        error: ProxyError,
        body_consumed: bool,
    },
    /// The client's connection failed (a reset) while it sent its body.
    Client,
    /// The client left (closed or reset its connection) after sending its
    /// request, before the response head.
    ClientLeft,
}

/// The upstream's response head, as the relay needs it after parsing.
struct ResponseHead {
    status: u16,
    framing: Framing,
    upstream_keep_alive: bool,
    close_client: bool,
    /// The answer came before the whole request body was sent upstream.
    body_unsent: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Relay<'_, S> {
    /// Waits, when `buf` is empty, for the next request's first bytes
    /// (within the shorter of `idle_timeout` and `header_read_timeout`).
    /// It reads once: a head that is not whole after that read (sent in
    /// pieces, slowly, or cut by the end of a pipelined batch) is found
    /// partial by [`Self::exchange`]'s parse and goes to hyper, whose parser
    /// answers a head that is broken already at once and applies
    /// `header_read_timeout` to the rest, where waiting here for the blank
    /// line would let a broken head sit until the timeout. Clients write a
    /// head at once, so this costs nothing in the common case.
    ///
    /// `drained` completes when the proxy drains (it is not polled again
    /// after it has).
    async fn read_head<D: Future>(&mut self, drained: Pin<&mut D>) -> HeadRead {
        if self.buf.is_empty() {
            let idle_deadline = Instant::now()
                + self
                    .limits
                    .idle_timeout
                    .min(self.limits.header_read_timeout);
            self.buf.reserve(READ_CHUNK);
            // Between requests a drain closes the connection at once.
            let read = tokio::select! {
                biased;
                read = self.timer.run(idle_deadline, self.io.read_buf(&mut self.buf)) => read,
                _ = drained => return HeadRead::Closed,
            };
            match read {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return HeadRead::Closed,
                Ok(Ok(_)) => {}
            }
        }
        HeadRead::Ready
    }

    /// Serves the request whose head is in `buf`, or hands it over.
    async fn exchange(
        &mut self,
        state: &ProxyState,
        started: std::time::Instant,
        drain: &watch::Receiver<()>,
        noted: &mut Noted,
    ) -> Next {
        let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut []);
        let head_len = match req.parse_with_uninit_headers(&self.buf, &mut headers) {
            // A partial or broken head is hyper's (see `read_head`), and so
            // is one over `max_header_bytes`, which hyper answers with 431.
            Ok(httparse::Status::Complete(n)) if n <= self.limits.max_header_bytes => n,
            _ => return Next::Handoff,
        };
        self.out.clear();
        let Some(plan) = plan(&req, state, self.conn, self.limits, &mut self.out, noted) else {
            return Next::Handoff;
        };
        let request = LoggedRequest {
            client: LoggedRequest::client_of(self.conn),
            method: plan.method.as_str(),
            path: Some(&noted.path),
            request_id: Some(&noted.request_id),
        };
        self.buf.advance(head_len);

        let now = SystemTime::now();
        let mut outcome = Outcome {
            route: Some(plan.route),
            ..Outcome::default()
        };
        // request_timeout: from the head to the response head (timeouts.rs
        // documents it for both paths); it covers a store read on a cache
        // miss too, as on hyper's path.
        let request_deadline = Instant::from_std(started) + state.request_timeout;
        // Outer: whether the client stayed while a cache miss read the store.
        let verified = match &plan.credential {
            Ok(credential) => {
                let verifying = authenticate(
                    state,
                    credential,
                    &plan.method,
                    Some(plan.route),
                    now,
                    &mut outcome.key,
                );
                let keep = self.limits.max_header_bytes;
                let watched = watching_client(&mut *self.io, &mut self.buf, keep, verifying);
                self.timer
                    .run(request_deadline, watched)
                    .await
                    .unwrap_or(Ok(Err(ProxyError::RequestTimeout)))
            }
            Err(error) => Ok(Err(ProxyError::from(*error))),
        };
        let forwarded = match verified {
            Err(gone) => Err(gone),
            Ok(Ok(key)) => {
                state
                    .headers
                    .write_identity(&mut self.out, &key, plan.route);
                let upstream_started = std::time::Instant::now();
                outcome.upstream_started = Some(upstream_started);
                let clock = Clock {
                    wall: now,
                    upstream_started,
                    request_deadline,
                };
                self.forward(state, &plan, &key, clock, drain).await
            }
            // A refused request's body is not waited for: the connection
            // closes after the answer unless the whole body has arrived
            // with the head and is skipped, as hyper's path drains what is
            // at hand, so the next pipelined request gets its answer.
            Ok(Err(error)) => Err(Failure::Proxy {
                error,
                body_consumed: self.skip_buffered_body(plan.body),
            }),
        };
        // Recorded when the response head is known, before it is sent (as
        // on hyper's path): whoever sees the answer also sees it counted.
        match forwarded {
            Ok((head, upstream, body)) => {
                let recorded = record(state, &request, head.status, None, &outcome, started);
                self.relay_response(upstream, head, body, plan.route, state, recorded)
                    .await
            }
            Err(Failure::ClientLeft) => {
                // Logged and counted as hyper's path logs a request whose
                // client left before its answer; the upstream connection,
                // its answer unread, is dropped with the exchange.
                record(
                    state,
                    &request,
                    CLIENT_CLOSED_REQUEST,
                    None,
                    &outcome,
                    started,
                );
                Next::Close
            }
            Err(Failure::Client) => {
                // Counted as on hyper's path, as the client's broken body,
                // with nobody left to answer.
                let error = ProxyError::MalformedBody;
                record_refusal(state, &request, error, &outcome, started);
                Next::Close
            }
            Err(Failure::Proxy {
                error,
                body_consumed,
            }) => {
                record_refusal(state, &request, error, &outcome, started);
                let close = plan.close || draining(drain) || !body_consumed;
                self.out.clear();
                error.render_http1(&mut self.out, close);
                match (self.write_out().await, close) {
                    (true, false) => Next::KeepAlive,
                    (true, true) if !body_consumed => Next::Linger,
                    _ => Next::Close,
                }
            }
        }
    }

    /// Sends the response head in `out` and its body, then keeps the
    /// upstream connection for the next request when it ended cleanly.
    async fn relay_response(
        &mut self,
        mut upstream: TcpStream,
        head: ResponseHead,
        body: BodyLeft,
        route: &Route,
        state: &ProxyState,
        head_at: std::time::Instant,
    ) -> Next {
        let relayed = self
            .relay_body(&mut upstream, head.framing, body, state)
            .await;
        let next = match relayed {
            Relayed::Complete if head.upstream_keep_alive && self.ubuf.is_empty() => {
                state.relay_pools[route.index].put(upstream, head_at);
                Next::KeepAlive
            }
            Relayed::Complete => Next::KeepAlive,
            Relayed::Broken => Next::Close,
        };
        match next {
            Next::KeepAlive if head.close_client && head.body_unsent => Next::Linger,
            Next::KeepAlive if head.close_client => Next::Close,
            next => next,
        }
    }

    /// Sends the request (head in `out`, body from the client) and reads the
    /// response head, leaving the client's version of it in `out`.
    async fn forward(
        &mut self,
        state: &ProxyState,
        plan: &Plan<'_>,
        key: &Arc<VerifiedKey>,
        clock: Clock,
        drain: &watch::Receiver<()>,
    ) -> Result<(ResponseHead, TcpStream, BodyLeft), Failure> {
        let request_deadline = clock.request_deadline;
        // Whatever of the body is already buffered goes out with the head.
        let buffered = usize::try_from(plan.body)
            .unwrap_or(usize::MAX)
            .min(self.buf.len());
        self.out.extend_from_slice(&self.buf[..buffered]);
        self.buf.advance(buffered);
        state.bytes_in.inc_by(buffered as u64);
        let body_left = plan.body - buffered as u64;

        let pool = &state.relay_pools[plan.route.index];
        let unavailable = |body_left: u64| Failure::Proxy {
            error: ProxyError::UpstreamUnavailable,
            body_consumed: body_left == 0,
        };
        let mut retried = false;
        let mut body = BodyLeft {
            left: body_left,
            sending: true,
        };
        let (mut upstream, mut sent_at) = loop {
            let (mut upstream, reused) = match pool.take(clock.upstream_started) {
                Some(idle) => (idle, true),
                None => {
                    let connecting =
                        connect(&plan.route.upstream, state.upstream.connect_timeout());
                    let keep = self.limits.max_header_bytes;
                    let connected =
                        watching_client(&mut *self.io, &mut self.buf, keep, connecting).await?;
                    (connected.map_err(|_| unavailable(body.left))?, false)
                }
            };
            self.ubuf.clear();
            // A failed write shows in the read that follows.
            let _ = upstream.write_all(&self.out).await;
            // upstream_timeout starts once the request is sent: with its
            // head, unless a body follows; `clock.upstream_started` says
            // when, unless connecting took a wait since.
            let mut sent_at = (body.left == 0).then(|| {
                if reused {
                    Instant::from_std(clock.upstream_started)
                } else {
                    Instant::now()
                }
            });
            match self
                .read_response_head(
                    &mut upstream,
                    &mut body,
                    &mut sent_at,
                    state,
                    request_deadline,
                )
                .await
            {
                Ok(()) => break (upstream, sent_at),
                // A reused connection the upstream closed just before our
                // request: nothing was processed, so one retry on a new
                // connection is safe when there was no body to lose.
                Err(UpstreamRead::Closed) if reused && plan.body == 0 && !retried => {
                    retried = true;
                }
                Err(read) => return Err(self.failure(read, &body, sent_at, plan, state, clock)),
            }
        };

        let head = loop {
            match self.parse_response_head(plan, drain, body.left > 0) {
                Ok(Some(head)) => break head,
                // An informational response (100, 103): skipped, like
                // hyper's client does; the final one follows.
                Ok(None) => {
                    let read = self
                        .read_response_head(
                            &mut upstream,
                            &mut body,
                            &mut sent_at,
                            state,
                            request_deadline,
                        )
                        .await;
                    if let Err(read) = read {
                        return Err(self.failure(read, &body, sent_at, plan, state, clock));
                    }
                }
                Err(BadFraming) => return Err(unavailable(body.left)),
            }
        };
        state.usage.record(key, clock.wall);
        Ok((head, upstream, body))
    }

    /// What an exchange whose response head did not come fails with.
    fn failure(
        &self,
        read: UpstreamRead,
        body: &BodyLeft,
        sent_at: Option<Instant>,
        plan: &Plan<'_>,
        state: &ProxyState,
        clock: Clock,
    ) -> Failure {
        let body_consumed = body.left == 0;
        let error = match read {
            UpstreamRead::TimedOut => {
                // Whichever clock ran out first names the error; while the
                // body is uploading only request_timeout runs.
                let upstream_deadline = sent_at.map(|at| at + state.upstream.response_timeout());
                if upstream_deadline.is_some_and(|at| at <= clock.request_deadline) {
                    tracing::warn!(
                        upstream = %plan.route.upstream.authority,
                        "upstream did not answer within upstream_timeout"
                    );
                    ProxyError::UpstreamTimeout
                } else {
                    ProxyError::RequestTimeout
                }
            }
            // Whoever sent all of its request and then left is gone.
            UpstreamRead::ClientClosed | UpstreamRead::ClientFailed if body_consumed => {
                return Failure::ClientLeft
            }
            // The client closed its side before the declared length: it
            // may still read the answer that says so.
            UpstreamRead::ClientClosed => ProxyError::MalformedBody,
            UpstreamRead::ClientFailed => return Failure::Client,
            UpstreamRead::Closed | UpstreamRead::Failed => ProxyError::UpstreamUnavailable,
        };
        Failure::Proxy {
            error,
            body_consumed,
        }
    }

    /// Drops a refused request's body if all of it is buffered already.
    fn skip_buffered_body(&mut self, length: u64) -> bool {
        match usize::try_from(length) {
            Ok(length) if length <= self.buf.len() => {
                self.buf.advance(length);
                true
            }
            _ => false,
        }
    }

    /// Reads until `ubuf` holds a whole response head, by the deadline:
    /// `request_timeout`'s while the body uploads, then the earlier of that
    /// and `upstream_timeout` from `sent_at`, which is set when the body
    /// has all been sent. Meanwhile the rest of the body goes upstream and
    /// the client is watched ([`pump`]): an upstream that answers before the
    /// body has all arrived (a 413, a 401) is heard at once, not after the
    /// client's stalled upload runs out of time, and a client that leaves
    /// is noticed when it does, not when its answer is written to nobody.
    async fn read_response_head(
        &mut self,
        upstream: &mut TcpStream,
        body: &mut BodyLeft,
        sent_at: &mut Option<Instant>,
        state: &ProxyState,
        request_deadline: Instant,
    ) -> Result<(), UpstreamRead> {
        let mut scanned = 0;
        loop {
            if head_complete(&self.ubuf, scanned) {
                return Ok(());
            }
            if self.ubuf.len() > MAX_RESPONSE_HEAD {
                return Err(UpstreamRead::Failed);
            }
            scanned = self.ubuf.len().saturating_sub(2);
            self.ubuf.reserve(READ_CHUNK);
            let deadline = match *sent_at {
                Some(at) => (at + state.upstream.response_timeout()).min(request_deadline),
                None => request_deadline,
            };
            let pumped = pump(
                &mut *self.io,
                &mut self.buf,
                upstream,
                &mut self.ubuf,
                body,
                self.limits.max_header_bytes,
                state,
            );
            match self.timer.run(deadline, pumped).await {
                Err(_) => return Err(UpstreamRead::TimedOut),
                Ok(Pumped::Upstream(Ok(0))) if self.ubuf.is_empty() => {
                    return Err(UpstreamRead::Closed)
                }
                Ok(Pumped::Upstream(Ok(0) | Err(_))) => return Err(UpstreamRead::Failed),
                Ok(Pumped::Upstream(Ok(_))) => {}
                Ok(Pumped::BodySent) => *sent_at = Some(Instant::now()),
                Ok(Pumped::ClientClosed) => return Err(UpstreamRead::ClientClosed),
                Ok(Pumped::ClientFailed) => return Err(UpstreamRead::ClientFailed),
            }
        }
    }

    /// Parses the response head in `ubuf` and writes the client's version
    /// of it into `out`. `None`: it was informational and is dropped.
    ///
    /// `body_unsent`: the upstream answered before the whole request body
    /// was sent. Neither connection is kept after such an exchange, as the
    /// rest of the body would be read as a next request.
    fn parse_response_head(
        &mut self,
        plan: &Plan<'_>,
        drain: &watch::Receiver<()>,
        body_unsent: bool,
    ) -> Result<Option<ResponseHead>, BadFraming> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
        let mut res = httparse::Response::new(&mut headers);
        let head_len = match res.parse(&self.ubuf) {
            Ok(httparse::Status::Complete(n)) => n,
            _ => return Err(BadFraming),
        };
        let status = res.code.ok_or(BadFraming)?;
        if status == 101 {
            // Only an `Upgrade` request may be answered so; none comes here.
            return Err(BadFraming);
        }
        if (100..200).contains(&status) {
            self.ubuf.advance(head_len);
            return Ok(None);
        }
        let http10 = res.version == Some(0);
        let framing = Framing::of_response(plan.head_request, http10, status, res.headers)?;
        if matches!(framing, Framing::Chunked(_)) {
            // A chunked body broken in the bytes already here gets a 502
            // while nothing has been sent, not a connection closed without
            // an answer; a break later can only end the connection.
            ChunkedScanner::default().scan(&self.ubuf[head_len..])?;
        }
        // A close-delimited body ends with the connection: it is never
        // pooled (the pool would find it closed on its next take, but
        // keep its descriptor, in CLOSE-WAIT, until then).
        let upstream_keep_alive = !body_unsent
            && res.version == Some(1)
            && !matches!(framing, Framing::UntilClose)
            && !connection_tokens(res.headers).any(|t| t.eq_ignore_ascii_case(b"close"));
        let close_client =
            body_unsent || plan.close || draining(drain) || matches!(framing, Framing::UntilClose);
        self.out.clear();
        write_response_head(
            &mut self.out,
            status,
            res.reason.unwrap_or("").as_bytes(),
            res.headers,
            matches!(framing, Framing::Chunked(_)),
            close_client,
        );
        self.ubuf.advance(head_len);
        Ok(Some(ResponseHead {
            status,
            framing,
            upstream_keep_alive,
            close_client,
            body_unsent,
        }))
    }

    /// Sends the response head in `out` and the body after it, as framed.
    async fn relay_body(
        &mut self,
        upstream: &mut TcpStream,
        framing: Framing,
        mut body: BodyLeft,
        state: &ProxyState,
    ) -> Relayed {
        let mut framing = framing;
        loop {
            // Move what the framing allows from `ubuf` behind the head.
            let (take, done) = match &mut framing {
                Framing::Empty => (0, true),
                Framing::Length(left) => {
                    let take = usize::try_from(*left)
                        .unwrap_or(usize::MAX)
                        .min(self.ubuf.len());
                    *left -= take as u64;
                    (take, *left == 0)
                }
                Framing::Chunked(scanner) => match scanner.scan(&self.ubuf) {
                    Ok(Some(end)) => (end, true),
                    Ok(None) => (self.ubuf.len(), false),
                    Err(BadFraming) => return Relayed::Broken,
                },
                Framing::UntilClose => (self.ubuf.len(), false),
            };
            self.out.extend_from_slice(&self.ubuf[..take]);
            self.ubuf.advance(take);
            state.bytes_out.inc_by(take as u64);
            if !self.out.is_empty() && !self.write_out().await {
                return Relayed::Broken;
            }
            self.out.clear();
            if done {
                return Relayed::Complete;
            }
            self.ubuf.reserve(READ_CHUNK);
            // While the upstream is quiet (a long poll, a stalled stream),
            // the client is watched too: one that is gone ends the exchange
            // and frees the upstream connection, where waiting for the
            // upstream's next bytes to fail on the client could hold both
            // for as long as the upstream stays quiet. A closed write side
            // counts as gone, as on hyper's path (no half-close). After an
            // early answer, what is left of the request body still goes
            // upstream meanwhile (an upstream may answer as it reads).
            let pumped = pump(
                &mut *self.io,
                &mut self.buf,
                upstream,
                &mut self.ubuf,
                &mut body,
                self.limits.max_header_bytes,
                state,
            );
            match pumped.await {
                Pumped::Upstream(Ok(0)) if matches!(framing, Framing::UntilClose) => {
                    return Relayed::Complete
                }
                Pumped::Upstream(Ok(0) | Err(_)) => return Relayed::Broken,
                Pumped::Upstream(Ok(_)) | Pumped::BodySent => {}
                Pumped::ClientClosed | Pumped::ClientFailed => return Relayed::Broken,
            }
        }
    }

    /// Writes `out` to the client; false when the client is gone.
    async fn write_out(&mut self) -> bool {
        // flush: a TLS stream holds written bytes until flushed.
        self.io.write_all(&self.out).await.is_ok() && self.io.flush().await.is_ok()
    }
}

enum Relayed {
    Complete,
    /// The upstream or the client broke off mid-body: the client connection
    /// ends, as its response cannot be completed.
    Broken,
}

/// Decides whether the relay serves the request in `req`, and if so writes
/// the upstream head (without the identity) into `out`.
fn plan<'s>(
    req: &httparse::Request<'_, '_>,
    state: &'s ProxyState,
    conn: &ConnectionInfo,
    limits: &ServerLimits,
    out: &mut Vec<u8>,
    noted: &mut Noted,
) -> Option<Plan<'s>> {
    if req.version != Some(1) || req.headers.len() > limits.max_headers {
        return None;
    }
    let method_bytes = req.method?.as_bytes();
    let method = Method::from_bytes(method_bytes).ok()?;
    // CONNECT asks for a tunnel and takes an authority, not a path: hyper's
    // path decides what becomes of it, so both paths answer it alike.
    if method == Method::CONNECT {
        return None;
    }
    let target = req.path?;
    // hyper answers a target over its limit with 414; so must this path.
    if target.len() > HYPER_MAX_URI_LEN {
        return None;
    }
    let origin_form =
        target.starts_with('/') && target.bytes().all(|c| c.is_ascii_graphic() && c != b'#');
    if !origin_form {
        return None;
    }
    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (target, None),
    };
    let path_as_sent = path;
    if let Some(forward_auth) = &state.forward_auth {
        if forward_auth.matches(path) {
            return None;
        }
    }
    // A path refused by normalization is left to hyper's path, which
    // answers it; a normalized one is routed and forwarded as hyper's path
    // does.
    let path = path::normalize(state.path_normalization, path).ok()?;
    let rewritten = match &path {
        Cow::Borrowed(_) => None,
        Cow::Owned(normal) => Some(path::with_query(normal, query)),
    };
    let target = rewritten.as_deref().unwrap_or(target);
    let (mut host, mut hosts, mut body, mut lengths, mut close) = (None, 0, 0, 0, false);
    let mut request_id = None;
    for header in req.headers.iter() {
        let name = header.name;
        let is = |known: &str| name.eq_ignore_ascii_case(known);
        if is("host") {
            hosts += 1;
            // A Host that is not a host is hyper's path's to refuse.
            if !valid_host(header.value) {
                return None;
            }
            host = std::str::from_utf8(header.value).ok();
        } else if is("content-length") {
            lengths += 1;
            body = parse_length(header.value)?;
        } else if is("transfer-encoding") || is("upgrade") || is("expect") {
            return None;
        } else if is("connection") {
            for token in header.value.split(|&c| c == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if !token.eq_ignore_ascii_case(b"keep-alive") {
                    return None;
                }
            }
        } else if is("content-type") && is_grpc_content_type(header.value) {
            return None;
        } else if is("x-request-id") {
            // The first, as `HeaderMap::get` on hyper's path.
            request_id = request_id.or(Some(header.value));
        }
    }
    if hosts != 1 || lengths > 1 {
        return None;
    }
    let route = state.routes.select(host.map(strip_port), &path)?;
    let upstream = &route.upstream;
    if upstream.scheme != Scheme::HTTP || upstream.protocol == UpstreamProtocol::H2c {
        return None;
    }
    noted.path.clear();
    noted.path.push_str(path_as_sent);
    noted.request_id.clear();
    let new_request_id = request_id_bytes();
    let request_id = request_id.unwrap_or(&new_request_id);
    noted
        .request_id
        .push_str(&String::from_utf8_lossy(request_id));
    let key_header = state.credentials.api_key_header().as_str();
    let credential = state.credentials.extract_values(
        req.headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("authorization"))
            .map(|h| h.value),
        req.headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(key_header))
            .map(|h| h.value),
    );
    // A CORS preflight without a key, where its route lets it pass, is
    // hyper's path's to judge and forward (cors.rs): it is rare, and the
    // relay writes heads only for requests that carry a key.
    if matches!(credential, Err(CredentialError::Missing))
        && route.cors_allow_preflight
        && method == Method::OPTIONS
    {
        return None;
    }
    if let Ok(credential) = &credential {
        let head = RawHead {
            method: method_bytes,
            target: target.as_bytes(),
            headers: req.headers,
        };
        state
            .headers
            .write_request_head(out, &head, conn, credential.source, &new_request_id);
    }
    Some(Plan {
        route,
        credential,
        head_request: method == Method::HEAD,
        method,
        body,
        close,
    })
}

/// Whether a head in `buf` is complete: an empty line after the start
/// line. `from` skips what an earlier call already searched.
fn head_complete(buf: &[u8], from: usize) -> bool {
    let mut i = from.min(buf.len());
    while let Some(p) = memchr::memchr(b'\n', &buf[i..]) {
        let at = i + p;
        if matches!(&buf[at + 1..], [b'\n', ..] | [b'\r', b'\n', ..]) {
            return true;
        }
        i = at + 1;
    }
    false
}

enum UpstreamRead {
    TimedOut,
    /// The upstream closed before a whole head arrived.
    Closed,
    Failed,
    /// The client closed its connection.
    ClientClosed,
    /// The client's connection failed (a reset).
    ClientFailed,
}

/// What of a request body is still to be sent upstream.
struct BodyLeft {
    /// Bytes by its `Content-Length`.
    left: u64,
    /// False once the upstream stopped taking it (it may have answered and
    /// closed): what it answered is still read.
    sending: bool,
}

/// What ended a [`pump`].
enum Pumped {
    /// The upstream sent bytes into `ubuf` (0: it closed), or failed.
    Upstream(std::io::Result<usize>),
    /// The last of the request body went upstream.
    BodySent,
    /// The client closed its connection.
    ClientClosed,
    /// The client's connection failed.
    ClientFailed,
}

/// Waits for the upstream's next bytes (`ubuf` must have room) while
/// sending it the rest of the request body from `buf` as the client sends
/// it, and watching the client: its departure ends the wait. Bytes past
/// the body (a pipelined request) are kept in `buf`, up to `keep`; past
/// that they wait unread.
///
/// The upstream is always polled first. Polling a socket that has nothing
/// to read costs no system call (tokio remembers its readiness from
/// epoll), so watching the client costs nothing while it is quiet.
async fn pump<S: AsyncRead + Unpin>(
    client: &mut S,
    buf: &mut BytesMut,
    upstream: &mut TcpStream,
    ubuf: &mut BytesMut,
    body: &mut BodyLeft,
    keep: usize,
    state: &ProxyState,
) -> Pumped {
    let (mut from, mut to) = upstream.split();
    loop {
        let pending = if body.sending {
            usize::try_from(body.left)
                .unwrap_or(usize::MAX)
                .min(buf.len())
        } else {
            0
        };
        if pending > 0 {
            tokio::select! {
                biased;
                read = from.read_buf(ubuf) => return Pumped::Upstream(read),
                wrote = to.write(&buf[..pending]) => match wrote {
                    Ok(n) if n > 0 => {
                        buf.advance(n);
                        state.bytes_in.inc_by(n as u64);
                        body.left -= n as u64;
                        if body.left == 0 {
                            return Pumped::BodySent;
                        }
                    }
                    // The upstream takes no more: what it says is read.
                    _ => body.sending = false,
                },
            }
        } else {
            let watch_client = (body.sending && body.left > 0) || buf.len() < keep;
            if watch_client {
                buf.reserve(READ_CHUNK);
            }
            tokio::select! {
                biased;
                read = from.read_buf(ubuf) => return Pumped::Upstream(read),
                read = client.read_buf(buf), if watch_client => match read {
                    Ok(n) if n > 0 => {}
                    Ok(_) => return Pumped::ClientClosed,
                    Err(_) => return Pumped::ClientFailed,
                },
            }
        }
    }
}

/// Runs `work` (a store read on a cache miss, a connection to the upstream)
/// while watching the client, as [`pump`] does while the upstream answers:
/// a client that leaves ends the wait ([`Failure::ClientLeft`], logged as
/// 499, and nothing goes upstream), and what it sends meanwhile (the body,
/// a pipelined request) is kept in `buf`, up to `keep` bytes; past that it
/// waits unread. `work` is polled first.
async fn watching_client<S: AsyncRead + Unpin, F: Future>(
    client: &mut S,
    buf: &mut BytesMut,
    keep: usize,
    work: F,
) -> Result<F::Output, Failure> {
    let mut work = pin!(work);
    // A cache hit is ready at its first poll: it is answered as before
    // this watch existed, without making room in `buf` or the select.
    if let Poll::Ready(done) = poll_fn(|cx| Poll::Ready(work.as_mut().poll(cx))).await {
        return Ok(done);
    }
    loop {
        let watch_client = buf.len() < keep;
        if watch_client {
            buf.reserve(READ_CHUNK);
        }
        tokio::select! {
            biased;
            done = work.as_mut() => return Ok(done),
            read = client.read_buf(buf), if watch_client => match read {
                Ok(n) if n > 0 => {}
                // Closed or reset: gone either way.
                Ok(_) | Err(_) => return Err(Failure::ClientLeft),
            },
        }
    }
}

/// Opens a connection to a plain-http upstream within `timeout`.
async fn connect(upstream: &Upstream, timeout: Duration) -> Result<TcpStream, ()> {
    let host = upstream.authority.host();
    // `[::1]` in a URI is `::1` to the resolver.
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = upstream.authority.port_u16().unwrap_or(80);
    match tokio::time::timeout(timeout, TcpStream::connect((host, port))).await {
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
        // As hyper's path logs them (upstream.rs).
        Ok(Err(error)) => {
            tracing::warn!(%error, upstream = %upstream.authority, "upstream connect failed");
            Err(())
        }
        Err(_) => {
            tracing::warn!(upstream = %upstream.authority, "upstream connect timed out");
            Err(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::head_complete;

    #[test]
    fn heads_end_at_an_empty_line() {
        assert!(head_complete(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", 0));
        assert!(head_complete(b"GET / HTTP/1.1\nHost: a\n\n", 0));
        assert!(!head_complete(b"GET / HTTP/1.1\r\nHost: a\r\n", 0));
        assert!(!head_complete(b"GET / HTTP/1.1\r\nHost: a\r\n\r", 0));
    }
}
