//! The proxy listener: accepts TCP connections and serves HTTP/1.1 and h2c
//! (prior knowledge) on the same port, or TLS with ALPN h2/http1.1, with
//! header limits, a header read timeout, a connection cap and graceful
//! draining on shutdown.
//!
//! Plain HTTP/1.1 connections (and TLS ones that did not choose h2) start
//! in the relay (`super::relay`), which serves the common request itself
//! and hands the connection to hyper at the first request it does not;
//! h2c is recognised there too, by its preface failing to parse as
//! HTTP/1.1.
//!
//! Each request reads the current `ProxyState` from an `ArcSwap`, so a
//! config reload applies to the next request on every connection.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::BytesMut;
use http::HeaderValue;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

use super::handler::{handle, record_refusal, LoggedRequest, Outcome};
use super::headers::ConnectionInfo;
use super::linger::LingerOnClose;
use super::reject::ProxyError;
use super::relay::{self, Ended, Rewind};
use super::timeouts::{self, Connections, CountReads, OpenConnection};
use super::ProxyState;
use crate::config::ProxyConfig;

/// Limits applied to every client connection.
#[derive(Debug, Clone)]
pub struct ServerLimits {
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub drain_timeout: Duration,
    /// Serve what it can with `relay` before handing over to hyper.
    pub http1_relay: bool,
}

impl From<&ProxyConfig> for ServerLimits {
    fn from(c: &ProxyConfig) -> Self {
        ServerLimits {
            max_header_bytes: c.max_header_bytes,
            max_headers: c.max_headers,
            header_read_timeout: c.header_read_timeout,
            idle_timeout: c.idle_timeout,
            max_connections: c.max_connections,
            drain_timeout: c.drain_timeout,
            http1_relay: c.http1_relay,
        }
    }
}

/// What every connection task shares.
struct Shared {
    states: Arc<ArcSwap<ProxyState>>,
    limits: ServerLimits,
    builder: auto::Builder<TokioExecutor>,
}

/// Serves the proxy on `listener` until `shutdown` resolves, then stops
/// accepting and lets in-flight requests finish for up to `drain_timeout`.
pub async fn serve(
    listener: TcpListener,
    state: Arc<ArcSwap<ProxyState>>,
    tls: Option<TlsAcceptor>,
    limits: ServerLimits,
    shutdown: impl Future<Output = ()>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        // hyper's read buffer bounds the request head; it needs at least
        // 8 KiB (a smaller max_header_bytes is checked by the pipeline).
        .max_buf_size(limits.max_header_bytes.max(HYPER_MIN_READ_BUFFER))
        .max_headers(limits.max_headers);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(Duration::from_secs(30));
    let drain_timeout = limits.drain_timeout;
    let connections = Connections::new(limits.idle_timeout, limits.header_read_timeout);
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let shared = Arc::new(Shared {
        states: state,
        limits,
        builder,
    });
    tokio::pin!(shutdown);
    loop {
        // Waiting for a permit before accepting leaves excess connections in
        // the kernel's backlog instead of spending memory on them.
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    // EMFILE and friends: back off rather than spin.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let open = connections.open();
        match &tls {
            None => {
                tokio::spawn(async move {
                    let conn_info = connection_info(&shared, peer, "http");
                    serve_connection(stream, &shared, conn_info, open, peer).await;
                    drop(permit);
                });
            }
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    // The handshake gets the same budget as a request head:
                    // a client that stalls it is a slow-loris too.
                    let handshake = tokio::time::timeout(
                        shared.limits.header_read_timeout,
                        acceptor.accept(stream),
                    );
                    let stream = match handshake.await {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(error)) => {
                            tracing::debug!(%error, %peer, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake timed out");
                            return;
                        }
                    };
                    let conn_info = connection_info(&shared, peer, "https");
                    if stream.get_ref().1.alpn_protocol() == Some(b"h2") {
                        serve_hyper(stream, &shared, conn_info, open, peer).await;
                    } else {
                        serve_connection(stream, &shared, conn_info, open, peer).await;
                    }
                    drop(permit);
                });
            }
        }
    }
    drop(listener);
    tokio::select! {
        _ = connections.drain() => tracing::info!("proxy drained"),
        _ = tokio::time::sleep(drain_timeout) => {
            tracing::warn!("drain deadline reached; closing remaining connections");
        }
    }
}

/// An HTTP/1.1 or h2c connection: the relay first, when enabled, then hyper
/// for whatever the relay hands over.
async fn serve_connection<S>(
    mut stream: S,
    shared: &Shared,
    conn_info: ConnectionInfo,
    open: OpenConnection,
    peer: SocketAddr,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let prefix = if shared.limits.http1_relay {
        let mut drain = open.drain_signal();
        let ended = relay::serve(
            &mut stream,
            &shared.states,
            &conn_info,
            &shared.limits,
            &mut drain,
        )
        .await;
        match ended {
            Ended::Closed => return,
            Ended::Handoff(prefix) => {
                open.restart_idle_clock();
                prefix
            }
        }
    } else {
        BytesMut::new()
    };
    serve_hyper(Rewind::new(prefix, stream), shared, conn_info, open, peer).await;
}

/// Serves a connection with hyper (HTTP/1.1 with upgrades, or HTTP/2) until
/// it ends; `timeouts` closes it gracefully when idle or draining.
async fn serve_hyper<S>(
    stream: S,
    shared: &Shared,
    conn_info: ConnectionInfo,
    open: OpenConnection,
    peer: SocketAddr,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let conn_info = Arc::new(conn_info);
    let client = conn_info.clone();
    let states = shared.states.clone();
    let activity = open.activity();
    let reads = activity.clone();
    let max_header_bytes = shared.limits.max_header_bytes;
    let head_limit = (max_header_bytes < HYPER_MIN_READ_BUFFER).then_some(max_header_bytes);
    let service = service_fn(move |req| {
        timeouts::track(
            &activity,
            handle(states.load_full(), conn_info.clone(), req, head_limit),
        )
    });
    let io = LingerOnClose::new(stream, reads.clone(), open.drain_signal());
    let connection = shared
        .builder
        .serve_connection_with_upgrades(TokioIo::new(CountReads::new(io, reads.clone())), service);
    if let Some(Err(error)) = open.serve(connection, |c| c.graceful_shutdown()).await {
        let hyper_error = error.downcast_ref::<hyper::Error>();
        let unparsed = hyper_error.and_then(ProxyError::from_unparsed_head);
        // hyper's server times out nothing but a request head (HTTP/1
        // `header_read_timeout`; it builds no other timeout error). It
        // closes the connection without an answer, as nginx does; a head
        // that had started is logged with 408, as nginx logs it, and an
        // idle keep-alive connection, or one that never sent a byte, is
        // not.
        let stalled_head =
            hyper_error.is_some_and(hyper::Error::is_timeout) && reads.head_started();
        let refusal = if stalled_head {
            Some(ProxyError::HeaderReadTimeout)
        } else {
            unparsed
        };
        match refusal {
            // hyper has answered it (or closed the connection on it); it
            // is counted and logged like every other refusal, with no
            // method, path, route, key or request id to name (nothing of a
            // partial head is logged, where a secret may be) and a latency
            // of nothing: it never became a request.
            Some(refusal) => {
                let state = shared.states.load();
                let named = match refusal {
                    ProxyError::HeaderReadTimeout => request_line(reads.last_head()),
                    _ => None,
                };
                let request = LoggedRequest {
                    client: LoggedRequest::client_of(&client),
                    method: named.map_or("-", |(method, _)| method),
                    path: named.map(|(_, path)| path),
                    request_id: None,
                };
                let (outcome, now) = (Outcome::default(), Instant::now());
                record_refusal(&state, &request, refusal, &outcome, now);
            }
            None => tracing::debug!(%error, %peer, "connection ended with an error"),
        }
    }
}

/// The method and path (without the query) of a head that stalled, if its
/// request line had arrived whole: nothing else of it is logged, as a
/// partial head may hold a secret. Only an origin-form target names a path
/// (an absolute one may carry user info).
fn request_line(head: &[u8]) -> Option<(&str, &str)> {
    let mut req = httparse::Request::new(&mut []);
    // With no room for headers, a whole request line parses as partial.
    match req.parse(head) {
        Ok(httparse::Status::Partial) if head.ends_with(b"\n") && req.version.is_some() => {}
        _ => return None,
    }
    let target = req.path.filter(|t| t.starts_with('/'))?;
    let path = target.split_once('?').map_or(target, |(path, _)| path);
    Some((req.method?, path))
}

/// The smallest read buffer hyper's HTTP/1 server takes, which is what
/// bounds a request head on its path.
const HYPER_MIN_READ_BUFFER: usize = 8192;

fn connection_info(shared: &Shared, peer: SocketAddr, proto: &'static str) -> ConnectionInfo {
    // An IPv4 client on a dual-stack listener is `::ffff:a.b.c.d`.
    let ip = peer.ip().to_canonical();
    ConnectionInfo {
        peer_ip: HeaderValue::from_str(&peer.ip().to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown")),
        proto: HeaderValue::from_static(proto),
        trusted_proxy: shared
            .states
            .load()
            .trusted_proxies
            .iter()
            .any(|net| net.contains(&ip)),
    }
}

#[cfg(test)]
mod tests {
    use super::request_line;

    #[test]
    fn a_stalled_head_is_named_by_a_whole_request_line_only() {
        let named = request_line(b"GET /orders?token=s HTTP/1.1\r\n");
        assert_eq!(named, Some(("GET", "/orders")));
        assert_eq!(request_line(b"POST /a HTTP/1.1\n"), Some(("POST", "/a")));
        for unnamed in [
            &b""[..],
            b"GET /orders?token=s HTTP/1.",
            b"GET /orders HTTP/1.1",
            b"GET http://user:pw@host/ HTTP/1.1\r\n",
            b"GET * HTTP/1.1\r\n",
            b"G\x01T / HTTP/1.1\r\n",
        ] {
            assert_eq!(request_line(unnamed), None, "{unnamed:?}");
        }
    }
}
