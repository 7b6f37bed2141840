//! gRPC through keygate: real tonic servers (the standard health service,
//! and a hand-written Echo service) behind the proxy and real tonic clients
//! in front of it, HTTP/2 on both sides (h2c upstream): unary,
//! server-streaming, client-streaming and bidirectional calls, and the
//! request deadline.
// Test servers record what they saw behind a plain Mutex; no hot path here.
#![allow(clippy::disallowed_types)]

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::Gate;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::StreamExt;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// Starts a tonic health server on 127.0.0.1:0; "orders" is SERVING.
async fn grpc_upstream() -> std::net::SocketAddr {
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("orders", tonic_health::ServingStatus::Serving)
        .await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        // Keep the reporter alive so that watch streams stay open.
        let _reporter = reporter;
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    addr
}

async fn channel(gate: &Gate) -> Channel {
    Channel::from_shared(gate.proxy_url(""))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
        .expect("connect to keygate")
}

fn with_key(
    token: Option<String>,
) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |mut req: Request<()>| {
        if let Some(token) = &token {
            let value: MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
            req.metadata_mut().insert("authorization", value);
            // A spoofed identity in metadata must be replaced, not passed on.
            req.metadata_mut()
                .insert("x-keygate-role", "admin".parse().unwrap());
        }
        Ok(req)
    }
}

#[tokio::test]
async fn unary_and_streaming_calls_pass_with_a_valid_key() {
    let upstream = grpc_upstream().await;
    let gate = Gate::builder().upstream(upstream).start().await;
    let mut client = HealthClient::with_interceptor(
        channel(&gate).await,
        with_key(Some(gate.admin_token.clone())),
    );

    let reply = client
        .check(HealthCheckRequest {
            service: "orders".into(),
        })
        .await
        .expect("unary call through the proxy");
    assert_eq!(reply.into_inner().status(), ServingStatus::Serving);

    // An unknown service is the upstream's own NOT_FOUND, carried back in
    // trailers: the proxy keeps HTTP/2 trailers.
    let err = client
        .check(HealthCheckRequest {
            service: "nope".into(),
        })
        .await
        .expect_err("upstream says not found");
    assert_eq!(err.code(), Code::NotFound);

    let mut stream = client
        .watch(HealthCheckRequest {
            service: "orders".into(),
        })
        .await
        .expect("streaming call")
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("first message in time")
        .expect("a message")
        .expect("not an error");
    assert_eq!(first.status(), ServingStatus::Serving);
    gate.stop().await;
}

#[tokio::test]
async fn calls_without_a_valid_key_get_unauthenticated() {
    let upstream = grpc_upstream().await;
    let gate = Gate::builder().upstream(upstream).start().await;
    let channel = channel(&gate).await;

    let mut anonymous = HealthClient::with_interceptor(channel.clone(), with_key(None));
    let err = anonymous
        .check(HealthCheckRequest {
            service: "orders".into(),
        })
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(
        err.message().contains("API key is required"),
        "{}",
        err.message()
    );

    let unknown = gate.tokens.generate().1.expose().to_string();
    let mut wrong = HealthClient::with_interceptor(channel, with_key(Some(unknown)));
    let err = wrong
        .check(HealthCheckRequest {
            service: "orders".into(),
        })
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Code::Unauthenticated);
    gate.stop().await;
}

/// A gRPC-web client (a browser's) is refused in its own content type,
/// the text variant in its own too: one that gets `application/grpc`
/// takes the answer for a protocol it does not speak and loses the status.
/// Over HTTP/1.1 (relay on and off) and HTTP/2.
#[tokio::test]
async fn grpc_web_refusals_carry_the_grpc_web_content_type() {
    let upstream = grpc_upstream().await;
    // An empty message, framed as gRPC-web frames it (flag, 4-byte length).
    let frame: &[u8] = &[0, 0, 0, 0, 0];
    for relay in [true, false] {
        let gate = Gate::with_relay(upstream, relay).await;
        let http1 = reqwest::Client::new();
        let h2 = reqwest::Client::builder()
            .http2_prior_knowledge()
            .build()
            .unwrap();
        for (client, version) in [(&http1, "HTTP/1.1"), (&h2, "HTTP/2")] {
            for (sent, expected, body) in [
                (
                    "application/grpc-web+proto",
                    "application/grpc-web+proto",
                    frame.to_vec(),
                ),
                (
                    "application/grpc-web",
                    "application/grpc-web+proto",
                    frame.to_vec(),
                ),
                (
                    "application/grpc-web-text",
                    "application/grpc-web-text+proto",
                    b"AAAAAAA=".to_vec(),
                ),
            ] {
                let response = client
                    .post(gate.proxy_url("/grpc.health.v1.Health/Check"))
                    .header("content-type", sent)
                    .header("x-grpc-web", "1")
                    .body(body)
                    .send()
                    .await
                    .unwrap();
                let context = format!("relay {relay}, {version}, {sent}");
                assert_eq!(response.status(), 200, "{context}");
                assert_eq!(response.headers()["content-type"], expected, "{context}");
                assert_eq!(response.headers()["grpc-status"], "16", "{context}");
            }
        }
        gate.stop().await;
    }
}

#[tokio::test]
async fn grpc_upstream_down_is_unavailable() {
    let dead = support::dead_address().await;
    let gate = Gate::builder().upstream(dead).start().await;
    let mut client = HealthClient::with_interceptor(
        channel(&gate).await,
        with_key(Some(gate.admin_token.clone())),
    );
    let err = client
        .check(HealthCheckRequest {
            service: "orders".into(),
        })
        .await
        .expect_err("no upstream");
    assert_eq!(err.code(), Code::Unavailable);
    gate.stop().await;
}

#[tokio::test]
async fn identity_reaches_the_grpc_server_as_metadata() {
    // The upstream records the metadata each call arrives with.
    type Seen = Arc<Mutex<Vec<[String; 4]>>>;
    let seen: Seen = Arc::default();
    let recorder = seen.clone();
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("orders", tonic_health::ServingStatus::Serving)
        .await;
    let service =
        tonic::service::interceptor::InterceptedService::new(service, move |req: Request<()>| {
            let get = |name: &str| {
                req.metadata()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string()
            };
            recorder.lock().unwrap().push([
                get("x-keygate-key-id"),
                get("x-keygate-role"),
                get("host"),
                get("x-forwarded-host"),
            ]);
            if req.metadata().contains_key("authorization") {
                return Err(Status::internal("the credential reached the upstream"));
            }
            Ok(req)
        });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _reporter = reporter;
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    let gate = Gate::builder().upstream(addr).start().await;
    let bob = gate
        .user("bob@example.com", keygate::store::AccountRole::Read, &[])
        .await;
    let (bob_id, bob_token) = gate.key_for(&bob).await;
    let mut client =
        HealthClient::with_interceptor(channel(&gate).await, with_key(Some(bob_token)));
    client
        .check(HealthCheckRequest {
            service: "orders".into(),
        })
        .await
        .expect("call passes, without the credential upstream");
    let seen = seen.lock().unwrap().clone();
    // The client sent x-keygate-role: admin; the server saw the key's owner's
    // role. Its :authority names it, with no Host beside it that differs
    // (RFC 9113 section 8.3.1); the client's authority is x-forwarded-host.
    let authority = gate.proxy.to_string();
    assert_eq!(
        seen,
        vec![[bob_id, "read".to_string(), String::new(), authority]]
    );
    gate.stop().await;
}

// === Client-streaming and bidirectional calls ===
//
// A tiny Echo service written by hand on tonic's generic server and client
// (no protoc, no build script): `Sum` adds up a client stream of numbers,
// `Chat` answers every number with ten times it, as it arrives.

/// The Echo service's one message.
#[derive(Clone, PartialEq, prost::Message)]
struct Number {
    #[prost(int64, tag = "1")]
    value: i64,
}

type NumberCodec = tonic_prost::ProstCodec<Number, Number>;

const SUM: &str = "/keygate.test.Echo/Sum";
const CHAT: &str = "/keygate.test.Echo/Chat";

/// What the Echo server saw, in order.
#[derive(Debug, Clone, PartialEq)]
enum Event {
    /// A call arrived with this key id metadata, and an `authorization` or not.
    Call {
        method: &'static str,
        key_id: String,
        authorization: bool,
    },
    Message(i64),
    /// The client's stream ended normally.
    Finished,
    /// The call ended before the client's stream did (reset or dropped).
    Aborted,
}

type Log = Arc<Mutex<Vec<Event>>>;

/// Logs `Aborted` when a call ends without `finish`: hyper drops the
/// handler of a stream that was reset.
struct CallGuard {
    log: Log,
    finished: bool,
}

impl CallGuard {
    fn start<T>(log: &Log, method: &'static str, req: &Request<T>) -> CallGuard {
        let key_id = req
            .metadata()
            .get("x-keygate-key-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let authorization = req.metadata().contains_key("authorization");
        log.lock().unwrap().push(Event::Call {
            method,
            key_id,
            authorization,
        });
        CallGuard {
            log: log.clone(),
            finished: false,
        }
    }

    fn message(&self, value: i64) {
        self.log.lock().unwrap().push(Event::Message(value));
    }

    fn finish(mut self) {
        self.finished = true;
        self.log.lock().unwrap().push(Event::Finished);
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        if !self.finished {
            self.log.lock().unwrap().push(Event::Aborted);
        }
    }
}

#[derive(Clone, Default)]
struct EchoServer {
    log: Log,
}

impl tonic::server::NamedService for EchoServer {
    const NAME: &'static str = "keygate.test.Echo";
}

impl tonic::codegen::Service<http::Request<tonic::body::Body>> for EchoServer {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = tonic::codegen::BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let log = self.log.clone();
        let mut grpc = tonic::server::Grpc::new(NumberCodec::default());
        match req.uri().path() {
            SUM => Box::pin(async move {
                let sum = tower::service_fn(move |req: Request<tonic::Streaming<Number>>| {
                    let log = log.clone();
                    async move {
                        let call = CallGuard::start(&log, "Sum", &req);
                        let mut numbers = req.into_inner();
                        let mut sum = 0;
                        while let Some(number) = numbers.message().await? {
                            call.message(number.value);
                            sum += number.value;
                        }
                        call.finish();
                        Ok::<_, Status>(tonic::Response::new(Number { value: sum }))
                    }
                });
                Ok(grpc.client_streaming(sum, req).await)
            }),
            CHAT => Box::pin(async move {
                let chat = tower::service_fn(move |req: Request<tonic::Streaming<Number>>| {
                    let log = log.clone();
                    async move {
                        let call = CallGuard::start(&log, "Chat", &req);
                        let mut numbers = req.into_inner();
                        let (replies, rx) = tokio::sync::mpsc::channel(4);
                        tokio::spawn(async move {
                            loop {
                                match numbers.message().await {
                                    Ok(Some(number)) => {
                                        call.message(number.value);
                                        let reply = Number {
                                            value: number.value * 10,
                                        };
                                        if replies.send(Ok(reply)).await.is_err() {
                                            return;
                                        }
                                    }
                                    Ok(None) => return call.finish(),
                                    Err(_) => return,
                                }
                            }
                        });
                        let rx = tokio_stream::wrappers::ReceiverStream::new(rx);
                        Ok::<_, Status>(tonic::Response::new(rx))
                    }
                });
                Ok(grpc.streaming(chat, req).await)
            }),
            _ => Box::pin(async move { Ok(Status::unimplemented("no such method").into_http()) }),
        }
    }
}

/// Starts the Echo server on 127.0.0.1:0.
async fn echo_upstream() -> (std::net::SocketAddr, Log) {
    let server = EchoServer::default();
    let log = server.log.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(server)
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    (addr, log)
}

type EchoClient = tonic::client::Grpc<
    tonic::service::interceptor::InterceptedService<
        Channel,
        Box<dyn FnMut(Request<()>) -> Result<Request<()>, Status> + Send + Sync>,
    >,
>;

fn echo_client(channel: Channel, token: Option<String>) -> EchoClient {
    tonic::client::Grpc::new(tonic::service::interceptor::InterceptedService::new(
        channel,
        Box::new(with_key(token)),
    ))
}

async fn sum(
    client: &mut EchoClient,
    numbers: impl tokio_stream::Stream<Item = Number> + Send + 'static,
) -> Result<i64, Status> {
    client
        .ready()
        .await
        .map_err(|e| Status::unknown(e.to_string()))?;
    let reply = client
        .client_streaming(
            Request::new(numbers),
            http::uri::PathAndQuery::from_static(SUM),
            NumberCodec::default(),
        )
        .await?;
    Ok(reply.into_inner().value)
}

/// Opens a Chat call; numbers sent on the returned sender go up the stream.
async fn chat(
    client: &mut EchoClient,
) -> Result<(tokio::sync::mpsc::Sender<Number>, tonic::Streaming<Number>), Status> {
    client
        .ready()
        .await
        .map_err(|e| Status::unknown(e.to_string()))?;
    let (numbers, rx) = tokio::sync::mpsc::channel(4);
    let replies = client
        .streaming(
            Request::new(tokio_stream::wrappers::ReceiverStream::new(rx)),
            http::uri::PathAndQuery::from_static(CHAT),
            NumberCodec::default(),
        )
        .await?
        .into_inner();
    Ok((numbers, replies))
}

/// Waits for the next Chat reply.
async fn reply(replies: &mut tonic::Streaming<Number>) -> i64 {
    tokio::time::timeout(Duration::from_secs(5), replies.message())
        .await
        .expect("a reply in time")
        .expect("not an error")
        .expect("a reply, not the end")
        .value
}

/// The events of the call to `method` (log entries up to the next call).
fn call_events(log: &Log, method: &str) -> Vec<Event> {
    let log = log.lock().unwrap();
    let start = log
        .iter()
        .position(|e| matches!(e, Event::Call { method: m, .. } if *m == method))
        .unwrap_or_else(|| panic!("no {method} call in {log:?}"));
    let end = log[start + 1..]
        .iter()
        .position(|e| matches!(e, Event::Call { .. }))
        .map_or(log.len(), |i| start + 1 + i);
    log[start..end].to_vec()
}

#[tokio::test]
async fn client_streaming_and_bidi_calls_pass_in_order_with_the_identity() {
    let (upstream, log) = echo_upstream().await;
    let gate = Gate::builder().upstream(upstream).start().await;
    let bob = gate
        .user("bob@example.com", keygate::store::AccountRole::Read, &[])
        .await;
    let (bob_id, bob_token) = gate.key_for(&bob).await;
    let mut client = echo_client(channel(&gate).await, Some(bob_token));
    let identity = |method| Event::Call {
        method,
        key_id: bob_id.clone(),
        authorization: false,
    };

    // Client streaming: 1..=50, one message each, summed by the server.
    let numbers = tokio_stream::iter((1..=50).map(|value| Number { value }));
    assert_eq!(sum(&mut client, numbers).await.expect("Sum"), 1275);
    let mut expected = vec![identity("Sum")];
    expected.extend((1..=50).map(Event::Message));
    expected.push(Event::Finished);
    assert_eq!(call_events(&log, "Sum"), expected);

    // Bidirectional: each reply comes back before the next number is sent,
    // so both directions stream through the proxy, unbuffered.
    let (numbers, mut replies) = chat(&mut client).await.expect("Chat");
    for value in 1..=20 {
        numbers.send(Number { value }).await.unwrap();
        assert_eq!(reply(&mut replies).await, value * 10);
    }
    drop(numbers);
    let end = tokio::time::timeout(Duration::from_secs(5), replies.message())
        .await
        .expect("the stream ends");
    assert!(matches!(end, Ok(None)), "{end:?}");
    let mut expected = vec![identity("Chat")];
    expected.extend((1..=20).map(Event::Message));
    expected.push(Event::Finished);
    assert_eq!(call_events(&log, "Chat"), expected);
    gate.stop().await;
}

#[tokio::test]
async fn streaming_calls_without_a_valid_key_get_unauthenticated() {
    let (upstream, log) = echo_upstream().await;
    let gate = Gate::builder().upstream(upstream).start().await;
    let channel = channel(&gate).await;

    let mut anonymous = echo_client(channel.clone(), None);
    let numbers = tokio_stream::iter((1..=3).map(|value| Number { value }));
    let err = sum(&mut anonymous, numbers).await.expect_err("refused");
    assert_eq!(err.code(), Code::Unauthenticated);

    let unknown = gate.tokens.generate().1.expose().to_string();
    let mut wrong = echo_client(channel, Some(unknown));
    let err = chat(&mut wrong).await.expect_err("refused");
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(
        log.lock().unwrap().is_empty(),
        "a refused call reached the upstream"
    );
    gate.stop().await;
}

#[tokio::test]
async fn a_bidi_stream_outlives_the_request_and_idle_timeouts_once_answered() {
    let (upstream, log) = echo_upstream().await;
    let gate = Gate::builder()
        .upstream(upstream)
        .proxy("request_timeout = \"1s\"\nidle_timeout = \"1s\"")
        .start()
        .await;
    let mut client = echo_client(channel(&gate).await, Some(gate.admin_token.clone()));
    let started = std::time::Instant::now();
    let (numbers, mut replies) = chat(&mut client).await.expect("Chat");
    // 10 messages, 250 ms apart: the call lasts 2.5 s, over both timeouts.
    for value in 1..=10 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        numbers.send(Number { value }).await.unwrap();
        assert_eq!(reply(&mut replies).await, value * 10);
    }
    assert!(started.elapsed() >= Duration::from_secs(2));
    drop(numbers);
    let end = tokio::time::timeout(Duration::from_secs(5), replies.message())
        .await
        .expect("the stream ends");
    assert!(matches!(end, Ok(None)), "{end:?}");
    let events = call_events(&log, "Chat");
    assert_eq!(events.last(), Some(&Event::Finished), "{events:?}");
    assert_eq!(events.len(), 12);
    gate.stop().await;
}

#[tokio::test]
async fn a_client_stream_longer_than_request_timeout_gets_deadline_exceeded() {
    // The upstream is a plain hyper HTTP/2 server: tonic's server reads a
    // request stream reset with CANCEL as the stream's normal end, so only
    // a server that reports body errors can tell the abort from a finish.
    let upstream = support::RecordingUpstream::start().await;
    let gate = Gate::builder()
        .upstream(upstream.addr)
        .proxy("request_timeout = \"1s\"")
        .start()
        .await;
    let mut client = echo_client(channel(&gate).await, Some(gate.admin_token.clone()));
    // The upstream answers only when the client's stream ends, which this
    // one never does: a number every 200 ms.
    let numbers = futures_util::stream::unfold(1, |value| async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        Some((Number { value }, value + 1))
    });
    let started = std::time::Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(5), sum(&mut client, numbers))
        .await
        .expect("the call was ended")
        .expect_err("deadline exceeded");
    let elapsed = started.elapsed();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(
        err.message().contains("request_timeout"),
        "{}",
        err.message()
    );
    assert!(elapsed >= Duration::from_millis(900), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");

    // The upstream got the call over HTTP/2, then a reset, not an end.
    let mut seen = None;
    for _ in 0..40 {
        if upstream.count() > 0 {
            seen = Some(upstream.last());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seen = seen.expect("the upstream saw the call end");
    assert_eq!(seen.path, SUM);
    assert_eq!(seen.version, http::Version::HTTP_2);
    assert!(
        !seen.body_complete,
        "the cut stream reached the upstream as complete"
    );
    gate.stop().await;
}

/// gRPC-web carries its trailers in the body so that it works over
/// HTTP/1.1: with `upstream_protocol = "auto"` it goes to the upstream over
/// HTTP/1.1, and gRPC over h2c. (gRPC-web went over h2c too, which an
/// upstream serving gRPC-web over HTTP/1.1 only cannot answer.)
#[tokio::test]
async fn grpc_web_goes_upstream_over_http1_and_grpc_over_h2c() {
    let upstream = support::RecordingUpstream::start().await;
    for relay in [true, false] {
        let gate = Gate::with_relay(upstream.addr, relay).await;
        let client = reqwest::Client::new();
        for (content_type, version) in [
            ("application/grpc-web+proto", http::Version::HTTP_11),
            ("application/grpc-web-text", http::Version::HTTP_11),
            ("application/grpc", http::Version::HTTP_2),
        ] {
            let response = client
                .post(gate.proxy_url("/pkg.Service/Call"))
                .bearer_auth(&gate.admin_token)
                .header("content-type", content_type)
                .body(vec![0u8, 0, 0, 0, 0])
                .send()
                .await
                .unwrap();
            let context = format!("relay {relay}, {content_type}");
            assert_eq!(response.status(), 200, "{context}");
            let seen = upstream.seen.lock().unwrap().last().cloned().unwrap();
            assert_eq!(seen.version, version, "{context}");
        }
        gate.stop().await;
    }
}
