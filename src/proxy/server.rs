//! The proxy listener: accepts TCP connections and serves HTTP/1.1 and h2c
//! (prior knowledge) on the same port, or TLS with ALPN h2/http1.1, with
//! header limits, a header read timeout, a connection cap, an idle timeout
//! and graceful draining on shutdown (the last two are `timeouts`' work).
//!
//! Each request reads the current `ProxyState` from an `ArcSwap`, so a
//! config reload applies to the next request on every connection.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use http::HeaderValue;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

use super::handler::handle;
use super::headers::ConnectionInfo;
use super::timeouts::{self, Connections};
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
        }
    }
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
        // hyper's read buffer bounds the request head; it needs at least 8 KiB.
        .max_buf_size(limits.max_header_bytes.max(8192))
        .max_headers(limits.max_headers);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(Duration::from_secs(30));
    let connections = Connections::new(limits.idle_timeout);
    let permits = Arc::new(Semaphore::new(limits.max_connections));
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
        let proto = if tls.is_some() { "https" } else { "http" };
        let conn_info = Arc::new(connection_info(peer, proto));
        let state = state.clone();
        let open = connections.open();
        let activity = open.activity();
        let service = service_fn(move |req| {
            timeouts::track(&activity, handle(state.load_full(), conn_info.clone(), req))
        });
        match &tls {
            None => {
                let connection =
                    builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                let connection = open.serve(connection.into_owned(), |c| c.graceful_shutdown());
                tokio::spawn(async move {
                    if let Err(error) = connection.await {
                        tracing::debug!(%error, %peer, "connection ended with an error");
                    }
                    drop(permit);
                });
            }
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                let builder = builder.clone();
                let handshake_timeout = limits.header_read_timeout;
                tokio::spawn(async move {
                    // The handshake gets the same budget as a request head:
                    // a client that stalls it is a slow-loris too.
                    let stream = match tokio::time::timeout(
                        handshake_timeout,
                        acceptor.accept(stream),
                    )
                    .await
                    {
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
                    let connection =
                        builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                    let connection = open.serve(connection.into_owned(), |c| c.graceful_shutdown());
                    if let Err(error) = connection.await {
                        tracing::debug!(%error, %peer, "connection ended with an error");
                    }
                    drop(permit);
                });
            }
        }
    }
    drop(listener);
    tokio::select! {
        _ = connections.drain() => tracing::info!("proxy drained"),
        _ = tokio::time::sleep(limits.drain_timeout) => {
            tracing::warn!("drain deadline reached; closing remaining connections");
        }
    }
}

fn connection_info(peer: SocketAddr, proto: &'static str) -> ConnectionInfo {
    ConnectionInfo {
        peer_ip: HeaderValue::from_str(&peer.ip().to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown")),
        proto: HeaderValue::from_static(proto),
    }
}
