//! The pooled upstream clients: HTTP/1.1 and HTTP/2 (h2c with prior
//! knowledge over `http://`, ALPN h2 over `https://`), both streaming bodies
//! without buffering, with connect and response timeouts mapped to 502 and
//! 504 (when the response timeout starts is `timeouts`' business), and a
//! request that failed because the client's own body did to 400.

use std::time::Duration;

use http::uri::PathAndQuery;
use http::{Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::UpstreamProtocol;

use super::reject::ProxyError;
use super::routes::Upstream;
use super::timeouts::{self, Upload};
use super::UpstreamBody;

type Connector = HttpsConnector<HttpConnector>;

/// Both clients share nothing but their settings; each keeps its own pool.
#[derive(Clone)]
pub struct UpstreamClients {
    http1: Client<Connector, Upload<UpstreamBody>>,
    h2c: Client<Connector, Upload<UpstreamBody>>,
    /// How long to wait for the upstream's response headers once the
    /// request has been sent.
    timeout: Duration,
    connect_timeout: Duration,
}

impl UpstreamClients {
    /// `tls` is used for `https://` upstreams.
    pub fn new(
        connect_timeout: Duration,
        response_timeout: Duration,
        tls: rustls::ClientConfig,
    ) -> UpstreamClients {
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(connect_timeout));
        http.set_nodelay(true);
        // The TLS layer decides per URI scheme; plain http stays plain.
        http.enforce_http(false);
        let h1_connector = HttpsConnectorBuilder::new()
            .with_tls_config(tls.clone())
            .https_or_http()
            .enable_http1()
            .wrap_connector(http.clone());
        let h2_connector = HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http2()
            .wrap_connector(http);
        let http1 = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(1024)
            .build(h1_connector);
        let h2c = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .http2_only(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .build(h2_connector);
        UpstreamClients {
            http1,
            h2c,
            timeout: response_timeout,
            connect_timeout,
        }
    }

    /// How long to wait for the upstream's response head (the relay uses
    /// the same setting).
    pub fn response_timeout(&self) -> Duration {
        self.timeout
    }

    /// How long to wait for a TCP connection to the upstream.
    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// Sends the request to the upstream and waits for its response head,
    /// for up to the response timeout once the request body has been sent
    /// (the upload itself is bounded by the caller's request deadline). The
    /// response body streams afterwards, without a deadline: long downloads
    /// and gRPC streams are legitimate.
    pub async fn forward(
        &self,
        upstream: &Upstream,
        mut req: Request<UpstreamBody>,
        grpc: bool,
    ) -> Result<Response<Incoming>, ProxyError> {
        let h2 = match upstream.protocol {
            UpstreamProtocol::H2c => true,
            UpstreamProtocol::Http1 => false,
            UpstreamProtocol::Auto => grpc,
        };
        let path = req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        *req.uri_mut() = Uri::builder()
            .scheme(upstream.scheme.clone())
            .authority(upstream.authority.clone())
            .path_and_query(path)
            .build()
            .map_err(|_| ProxyError::UpstreamUnavailable)?;
        let (client, version) = if h2 {
            (&self.h2c, Version::HTTP_2)
        } else {
            (&self.http1, Version::HTTP_11)
        };
        *req.version_mut() = version;
        if h2 {
            // `:authority` names the upstream (the URI above), and an HTTP/2
            // request must not carry a Host that differs from it (RFC 9113
            // section 8.3.1); the client's host is in x-forwarded-host.
            req.headers_mut().remove(http::header::HOST);
        }
        let (req, upload) = timeouts::watch_upload(req);
        match timeouts::wait_for_response_head(client.request(req), &upload, self.timeout).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(error)) if upload.client_body_failed() => {
                tracing::debug!(%error, "the client's request body failed");
                Err(ProxyError::MalformedBody)
            }
            // Logged as nginx logs a failed upstream, once per request, with
            // the cause (hyper's own message alone says "client error
            // (Connect)"), for the 502 the client got.
            Ok(Err(error)) => {
                let error = crate::telemetry::error_chain(&error);
                tracing::warn!(%error, upstream = %upstream.authority, "upstream request failed");
                Err(ProxyError::UpstreamUnavailable)
            }
            Err(_) => {
                tracing::warn!(upstream = %upstream.authority, "upstream did not answer within upstream_timeout");
                Err(ProxyError::UpstreamTimeout)
            }
        }
    }
}
