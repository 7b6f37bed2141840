//! gRPC through keygate: a real tonic server (the standard health service)
//! behind the proxy and a real tonic client in front of it, HTTP/2 on both
//! sides (h2c upstream), unary and server-streaming calls.
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
    type Seen = Arc<Mutex<Vec<(String, String)>>>;
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
            recorder
                .lock()
                .unwrap()
                .push((get("x-keygate-key-id"), get("x-keygate-role")));
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
    // The client sent x-keygate-role: admin; the server saw the key's owner's role.
    assert_eq!(seen, vec![(bob_id, "read".to_string())]);
    gate.stop().await;
}
