//! keygate: an authenticating reverse-proxy sidecar.
//!
//! It sits in front of an HTTP or gRPC service, checks the API key on every
//! request against a cached key store with a constant-time comparison,
//! refuses unknown, disabled and expired keys, injects the caller's identity
//! as headers, forwards the traffic and counts usage per key. Beside it runs
//! an admin REST API to manage users, service accounts, namespaces and keys.
//!
//! # Layout
//!
//! - [`config`]: the TOML file, typed and validated once at load.
//! - [`key`]: token format, generation, parsing, checksum; digests.
//! - [`store`]: the `KeyStore` trait, its model, the SQLite backend.
//! - [`auth`]: credential extraction, the cached `Authenticator`, authorization.
//! - [`proxy`]: listener, request pipeline, header rewriting, upstream, rejections.
//! - [`admin`]: the control plane listener (API, metrics, health).
//! - [`telemetry`]: logging, Prometheus metrics, usage batching.
//! - [`app`]: wiring it all onto listeners the caller bound.
//!
//! # Life of a request
//!
//! `proxy::server` accepts; plain HTTP/1.1 requests start in `proxy::relay`,
//! which runs the steps below on raw heads without hyper and hands anything
//! else (h2c, upgrades, chunked uploads, ...) to hyper, where
//! `proxy::handler` picks the route, `auth::CredentialExtractor` finds the key,
//! `auth::Authenticator` verifies it (quick_cache, store on a miss, digest
//! compared in constant time, state and expiry checked), `auth::authorize`
//! checks the namespace, `proxy::headers` strips and injects headers,
//! `proxy::upstream` forwards with streaming bodies, and `telemetry` counts
//! it. Any failure becomes a response in `proxy::reject`, and only there.

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod admin;
pub mod app;
pub mod auth;
pub mod cli;
pub mod config;
pub mod echo;
pub mod key;
pub mod proxy;
pub mod ratelimit;
pub mod reload;
pub mod store;
pub mod telemetry;
