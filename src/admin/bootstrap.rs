//! First start and local key issuing: creating the first admin and issuing
//! keys straight into the store, for the CLI before (or without) the admin
//! API.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use crate::key::{IssuedToken, TokenFormat};
use crate::store::{
    Access, AccountRole, Actor, ApiKey, KeyStore, NewKey, OwnerType, PolicyViolation, Principal,
    PrincipalSpec, StoreError,
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
    let lifetime = lifetime_or_account_max(store, lifetime).await?;
    let (id, token, digest) = tokens.generate();
    let spec = PrincipalSpec {
        name: email.into(),
        description: "first account admin, created by keygate bootstrap".into(),
        access: Access {
            account_role: AccountRole::Admin,
            namespaces: BTreeMap::new(),
        },
        disabled: false,
    };
    let key = NewKey {
        id,
        digest,
        display_name: "bootstrap".into(),
        description: String::new(),
        // The store puts the new admin here.
        owner_id: String::new(),
        owner_type: OwnerType::User,
        namespaces: Vec::new(),
        expiry: lifetime.map(|l| SystemTime::now() + l),
        disabled: false,
    };
    // The admin and its key in one transaction, which first counts the
    // users: any refuses the bootstrap.
    match store
        .bootstrap(&Actor::system("bootstrap"), spec, key)
        .await
    {
        Ok((admin, key)) => Ok((admin, key, token)),
        Err(StoreError::Policy(PolicyViolation::UsersExist(users))) => {
            Err(BootstrapError::UsersExist(users))
        }
        Err(e) => Err(e.into()),
    }
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

/// Whether `email` has RFC 5322's common shape, `local@domain`: a dot-atom
/// local part (letters, digits and ``!#$%&'*+-/=?^_`{|}~``, dots only
/// between them) of at most 64 characters and a domain of two or more
/// dot-separated labels of up to 63 letters, digits and inner hyphens; at
/// most 254 characters in all (RFC 5321's limits). Quoted local
/// parts and address literals are legal but rare and refused. Delivery is
/// not our business; a typo'd address is. `openapi::email` says the same
/// as a pattern.
pub fn looks_like_email(email: &str) -> bool {
    let Some((local, domain)) = email.split_once('@') else {
        return false;
    };
    let atext = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c);
    let label_char = |c: char| c.is_ascii_alphanumeric() || c == '-';
    email.len() <= 254
        && local.len() <= 64
        && local
            .split('.')
            .all(|atom| !atom.is_empty() && atom.chars().all(atext))
        && domain.split('.').count() >= 2
        && domain.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.chars().all(label_char)
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

#[cfg(test)]
mod tests {
    use super::looks_like_email;

    #[test]
    fn emails_of_the_common_shape_pass_and_others_do_not() {
        for good in [
            "a@b.co",
            "first.last+tag@mail.example.com",
            "o'brien@x-y.example",
            "0@0.io",
            "!#$%&'*+-/=?^_`{|}~@a.b",
            &format!("{}@{}.co", "a".repeat(64), "b".repeat(63)),
        ] {
            assert!(looks_like_email(good), "{good}");
        }
        for bad in [
            "",
            "a",
            "a@b",
            "@b.co",
            "a@.b.co",
            "a@b.co.",
            "a@b..co",
            "a.@b.co",
            ".a@b.co",
            "a..b@c.co",
            "a@b@c.co",
            "a b@c.co",
            "\"a b\"@c.co",
            "a@[127.0.0.1]",
            "a<b@c.co",
            "a,b@c.co",
            "a@-b.co",
            "a@b-.co",
            "a@b_c.co",
            "é@b.co",
            &format!("{}@b.co", "a".repeat(65)),
            &format!("a@{}.co", "b".repeat(64)),
            // 256 characters, over the 254 allowed.
            &format!("a@{}.co", vec!["b".repeat(62); 4].join(".")),
        ] {
            assert!(!looks_like_email(bad), "{bad}");
        }
    }
}
