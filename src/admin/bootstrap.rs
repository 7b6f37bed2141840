//! First start and local key issuing: creating the first admin and issuing
//! keys straight into the store, for the CLI before (or without) the admin
//! API.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use crate::key::{IssuedToken, TokenFormat};
use crate::store::{
    Access, AccountRole, Actor, ApiKey, KeyStore, NewKey, OwnerType, Principal, PrincipalSpec,
    StoreError,
};

#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("refusing to bootstrap: {0} user(s) already exist; use an admin's API key instead")]
    UsersExist(u64),
    #[error("{0:?} is not a valid email address")]
    BadEmail(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Creates the first account admin and an API key for it. Refuses when any
/// user exists, so it cannot be used to take over a running installation.
pub async fn bootstrap(
    store: &dyn KeyStore,
    tokens: &TokenFormat,
    email: &str,
    lifetime: Option<Duration>,
) -> Result<(Principal, ApiKey, IssuedToken), BootstrapError> {
    if !looks_like_email(email) {
        return Err(BootstrapError::BadEmail(email.into()));
    }
    let users = store.count_principals(OwnerType::User).await?;
    if users > 0 {
        return Err(BootstrapError::UsersExist(users));
    }
    let actor = Actor::system("bootstrap");
    let spec = PrincipalSpec {
        name: email.into(),
        description: "first account admin, created by keygate bootstrap".into(),
        access: Access {
            account_role: AccountRole::Admin,
            namespaces: BTreeMap::new(),
        },
        disabled: false,
    };
    let admin = store
        .create_principal(&actor, OwnerType::User, spec)
        .await?;
    let (key, token) = issue_key(store, tokens, &actor, &admin, "bootstrap", "", lifetime).await?;
    Ok((admin, key, token))
}

/// Issues a key for an existing principal directly in the store. `lifetime`
/// `None` means the account's longest allowed lifetime (or never expiring
/// when the account allows that).
pub async fn issue_key(
    store: &dyn KeyStore,
    tokens: &TokenFormat,
    actor: &Actor,
    owner: &Principal,
    name: &str,
    description: &str,
    lifetime: Option<Duration>,
) -> Result<(ApiKey, IssuedToken), StoreError> {
    let lifetime = lifetime_or_account_max(store, lifetime).await?;
    let (id, token, digest) = tokens.generate();
    let key = NewKey {
        id,
        digest,
        display_name: name.into(),
        description: description.into(),
        owner_id: owner.id.clone(),
        owner_type: owner.kind,
        namespaces: Vec::new(),
        expiry: lifetime.map(|l| SystemTime::now() + l),
        disabled: false,
    };
    let created = store.create_key(actor, key).await?;
    Ok((created, token))
}

/// The lifetime asked for, or else the account's longest allowed one
/// (`None`, never expiring, when the account allows that).
pub async fn lifetime_or_account_max(
    store: &dyn KeyStore,
    asked: Option<Duration>,
) -> Result<Option<Duration>, StoreError> {
    match asked {
        Some(lifetime) => Ok(Some(lifetime)),
        None => {
            let max = store.settings().await?.max_key_lifetime;
            Ok((!max.is_zero()).then_some(max))
        }
    }
}

/// A light check: something@something, printable, no spaces. Delivery is
/// not our business; a typo'd domain is.
pub fn looks_like_email(email: &str) -> bool {
    let Some((local, domain)) = email.split_once('@') else {
        return false;
    };
    !local.is_empty()
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && email.len() <= 254
        && email.chars().all(|c| c.is_ascii_graphic())
        && email.matches('@').count() == 1
}
