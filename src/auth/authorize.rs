//! Authorization: is the key allowed on this route's namespace with the
//! permission the request needs?

use http::Method;

use super::VerifiedKey;
use crate::store::Permission;

/// The key may not do this here. Carries nothing: the response never says
/// which rule refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the API key is not allowed to do this")]
pub struct Forbidden(());

/// `read` for GET/HEAD/OPTIONS, `write` for everything else, unless the
/// route overrides it.
pub fn required_permission(method: &Method, route_override: Option<Permission>) -> Permission {
    if let Some(p) = route_override {
        return p;
    }
    if method == Method::GET || method == Method::HEAD || method == Method::OPTIONS {
        Permission::Read
    } else {
        Permission::Write
    }
}

/// A route without a namespace only needs a valid key. A namespaced route
/// needs the namespace inside the key's scope (an empty scope means all of
/// its owner's namespaces) and the owner's permission on it to cover
/// `required`.
pub fn authorize(
    key: &VerifiedKey,
    namespace: Option<&str>,
    required: Permission,
) -> Result<(), Forbidden> {
    let Some(namespace) = namespace else {
        return Ok(());
    };
    if key.out_of_scope(namespace) {
        return Err(Forbidden(()));
    }
    match key.owner.access.permission_on(namespace) {
        Some(granted) if granted >= required => Ok(()),
        _ => Err(Forbidden(())),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::key::{Digest, KeyId};
    use crate::store::{Access, AccountRole, KeyRecord, OwnerType};

    fn key(role: AccountRole, access: &[(&str, Permission)], scope: &[&str]) -> VerifiedKey {
        VerifiedKey::new(KeyRecord {
            id: KeyId::generate(),
            digest: Digest::of(b"x"),
            previous: None,
            disabled: false,
            expiry: None,
            namespaces: scope.iter().map(|s| s.to_string()).collect(),
            owner_id: "u".into(),
            owner_type: OwnerType::User,
            owner_name: "a@b".into(),
            owner_access: Access {
                account_role: role,
                namespaces: access
                    .iter()
                    .map(|(n, p)| (n.to_string(), *p))
                    .collect::<BTreeMap<_, _>>(),
            },
            owner_disabled: false,
        })
    }

    #[test]
    fn permissions_cover_by_rank() {
        let k = key(AccountRole::Developer, &[("orders", Permission::Read)], &[]);
        assert!(authorize(&k, Some("orders"), Permission::Read).is_ok());
        assert!(authorize(&k, Some("orders"), Permission::Write).is_err());
        assert!(authorize(&k, Some("billing"), Permission::Read).is_err());
        assert!(authorize(&k, None, Permission::Admin).is_ok());
    }

    #[test]
    fn admin_has_everything_but_scope_still_limits() {
        let k = key(AccountRole::Admin, &[], &[]);
        assert!(authorize(&k, Some("any"), Permission::Admin).is_ok());
        let scoped = key(AccountRole::Admin, &[], &["orders"]);
        assert!(authorize(&scoped, Some("orders"), Permission::Write).is_ok());
        assert!(authorize(&scoped, Some("billing"), Permission::Read).is_err());
    }

    #[test]
    fn method_decides_the_requirement() {
        assert_eq!(required_permission(&Method::GET, None), Permission::Read);
        assert_eq!(
            required_permission(&Method::OPTIONS, None),
            Permission::Read
        );
        assert_eq!(required_permission(&Method::POST, None), Permission::Write);
        assert_eq!(
            required_permission(&Method::GET, Some(Permission::Admin)),
            Permission::Admin
        );
    }
}
