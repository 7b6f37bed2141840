//! Authentication and authorization of a request: extracting the credential
//! from its headers, verifying it against the cached key store, and checking
//! the route's namespace permission.
//!
//! Nothing here builds a response: errors are typed and `proxy::reject` (or
//! the admin API's error module) turns them into HTTP.

mod authenticator;
mod authorize;
mod credential;

pub use authenticator::{
    run_store_probe, run_sweeper, AuthError, Authenticator, CacheSettings, Owner, OwnerHeaders,
    VerifiedKey, STORE_READ_TIMEOUT,
};
pub use authorize::{authorize, required_permission, Forbidden};
pub use credential::{Credential, CredentialError, CredentialExtractor, CredentialSource};
