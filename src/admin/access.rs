//! Who may do what on the admin API (RBAC).
//!
//! The caller is identified exactly as on the proxy: the same credential
//! (`Authorization: Bearer`, `Basic`, or the key header) extracted by
//! `auth::CredentialExtractor` and verified by the shared
//! `auth::Authenticator`. The key's owner is the caller, with the owner's
//! access: a service account's key acts with the service account's access,
//! never with that of whoever created it.
//!
//! A key scoped to namespaces (`spec.namespaces` not empty) acts only
//! within them, as Temporal Cloud's and Confluent Cloud's scoped keys do:
//! its permission on a namespace is its owner's if the namespace is in the
//! scope and none otherwise, and it is never an account admin, whatever its
//! owner's role. So with a scoped key, even an account admin's:
//! - no user, service account, account setting or audit event may be read
//!   or changed (beyond reading its own principal and the settings, as any
//!   caller may);
//! - no namespace outside the scope may be read, listed, edited, created or
//!   deleted; inside it, the owner's permission applies, and an account
//!   admin owner may also create (re-create) and delete those namespaces;
//! - only keys of its own owner may be read or managed, and a new key must
//!   be scoped within the calling key's scope: a scoped key cannot mint a
//!   broader (or unscoped) one; nor may it edit, enable, disable, rotate or
//!   delete a key broader than itself (rotating would hand it that key's
//!   new secret).
//!
//! The rules:
//! - account admins (`accountAccess.role = admin`) with an unscoped key may
//!   do everything;
//! - every caller may read the account settings, the namespaces it has
//!   access to (within its key's scope), its own principal and its own keys;
//! - every caller may edit, enable, disable, rotate and delete its own keys,
//!   but not enable one that an account admin (not the owner) disabled:
//!   the admin's disable holds until an admin enables the key (the store
//!   keeps `disabled_by_admin`, checked in the update's transaction);
//! - a user may create keys for itself, scoped within its own access (and
//!   within its calling key's scope, so a scoped key cannot mint a broader
//!   one);
//! - only account admins with an unscoped key create, change or delete
//!   users, service accounts and namespaces, create keys for others or for
//!   service accounts, change the account settings and read the audit log;
//!   a namespace admin may also edit that namespace's description, and a
//!   scoped account admin key may create and delete the namespaces of its
//!   scope.
//!
//! A key presented with the secret its last rotation replaced (within the
//! grace period) may only read here: the grace lets running clients switch
//! over on the proxy, and a leak is the usual reason to rotate, so the old
//! secret may change nothing. Minting a secret (creating or rotating a
//! key) would outlive the grace; disabling, editing or deleting the key,
//! or anything an admin may do, would let whoever holds the leaked secret
//! act against the rotation itself.
//!
//! While the account-wide `apiKeysEnabled` switch is off, keys fail on the
//! proxy; on this API an account admin's unscoped key still works, so that
//! an admin can turn the switch back on without touching the store by hand
//! (a scoped key could not change the switch, so it gets no exemption).

use std::time::SystemTime;

use axum::extract::FromRequestParts;
use std::sync::Arc;

use axum::http::request::Parts;

use super::error::AdminError;
use super::AdminState;
use crate::auth::{AuthError, VerifiedKey};
use crate::key::Digest;
use crate::store::{AccountRole, Actor, ApiKey, OwnerType, Permission};

/// The authenticated caller of an admin request.
pub struct Caller {
    /// The verified key, as the proxy's cache holds it: owner and access
    /// included.
    key: Arc<VerifiedKey>,
    /// Whether the key was presented with the secret its last rotation
    /// replaced (still valid through the grace period).
    rotated_out: bool,
}

impl FromRequestParts<AdminState> for Caller {
    type Rejection = AdminError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AdminState,
    ) -> Result<Caller, AdminError> {
        let credential = state.credentials.extract(&parts.headers)?;
        let caller = match state
            .authenticator
            .verify(&credential.token, SystemTime::now())
            .await
        {
            Ok(key) => Caller::new(key, &credential.token.digest),
            // `verify` says this only after the secret verified and the key
            // passed every other check, so reading the record is safe.
            Err(AuthError::ApiKeysDisabled) => {
                let record = state
                    .store
                    .find_key(&credential.token.id)
                    .await?
                    .ok_or(AuthError::Invalid)?;
                if record.owner_access.account_role != AccountRole::Admin
                    || !record.namespaces.is_empty()
                {
                    return Err(AuthError::ApiKeysDisabled.into());
                }
                Caller::new(Arc::new(VerifiedKey::new(record)), &credential.token.digest)
            }
            Err(e) => return Err(e.into()),
        };
        if caller.rotated_out && !parts.method.is_safe() {
            return Err(AdminError::forbidden(
                "the calling API key was presented with a secret that was rotated out: it \
                 works until its grace period ends, but only to read here; use the key's new \
                 secret to change anything",
            ));
        }
        Ok(caller)
    }
}

impl Caller {
    fn new(key: Arc<VerifiedKey>, presented: &Digest) -> Caller {
        let rotated_out = !key.is_current_secret(presented);
        Caller { key, rotated_out }
    }

    /// Whether the caller acts as an account admin: its owner has the admin
    /// role and the calling key is not limited to namespaces.
    pub fn is_admin(&self) -> bool {
        self.owner_is_admin() && !self.is_scoped()
    }

    fn owner_is_admin(&self) -> bool {
        self.key.owner.access.account_role == AccountRole::Admin
    }

    /// Whether the calling key is limited to namespaces.
    fn is_scoped(&self) -> bool {
        !self.key.namespaces.is_empty()
    }

    /// The calling key's namespace scope, for messages.
    fn scope(&self) -> Vec<&str> {
        self.key.namespaces.iter().map(|n| &**n).collect()
    }

    /// The caller's principal id.
    pub fn principal_id(&self) -> &str {
        &self.key.owner.id
    }

    pub fn principal_type(&self) -> OwnerType {
        self.key.owner.kind
    }

    /// The audit log's "who": the key's owner.
    pub fn actor(&self) -> Actor {
        let owner = &self.key.owner;
        Actor {
            id: owner.id.clone(),
            kind: owner.kind.as_str().into(),
            name: owner.name.clone(),
        }
    }

    pub fn require_admin(&self, what: &str) -> Result<(), AdminError> {
        if self.is_admin() {
            Ok(())
        } else if self.owner_is_admin() {
            Err(AdminError::forbidden(format!(
                "the calling API key is limited to namespaces {:?}; only an account admin's \
                 unscoped key may {what}",
                self.scope()
            )))
        } else {
            Err(AdminError::forbidden(format!(
                "only account admins may {what}"
            )))
        }
    }

    /// Creating or deleting the namespace `name`: account admins, with an
    /// unscoped key or one scoped to `name`.
    pub fn may_create_or_delete_namespace(&self, what: &str, name: &str) -> Result<(), AdminError> {
        if self.owner_is_admin() && !self.key.out_of_scope(name) {
            Ok(())
        } else {
            self.require_admin(what)
        }
    }

    /// Reading a user or service account: admins, or the principal itself.
    pub fn may_read_principal(&self, kind: OwnerType, id: &str) -> Result<(), AdminError> {
        if self.is_admin() || (self.principal_type() == kind && self.principal_id() == id) {
            Ok(())
        } else {
            Err(AdminError::forbidden(format!(
                "only account admins may read another {}",
                kind_name(kind)
            )))
        }
    }

    /// The caller's permission on a namespace, if any: its owner's, when
    /// the namespace is within the calling key's scope.
    pub fn permission_on(&self, namespace: &str) -> Option<Permission> {
        if self.key.out_of_scope(namespace) {
            return None;
        }
        self.key.owner.access.permission_on(namespace)
    }

    /// The namespaces the caller may see, or `None` for all of them (an
    /// account admin's unscoped key): those it has a permission on, within
    /// the calling key's scope.
    pub fn visible_namespaces(&self) -> Option<Vec<String>> {
        if self.is_admin() {
            return None;
        }
        let candidates: Vec<String> = if self.is_scoped() {
            self.key.namespaces.iter().map(|n| n.to_string()).collect()
        } else {
            self.key.owner.access.namespaces.keys().cloned().collect()
        };
        Some(
            candidates
                .into_iter()
                .filter(|n| self.permission_on(n).is_some())
                .collect(),
        )
    }

    pub fn may_read_namespace(&self, namespace: &str) -> Result<(), AdminError> {
        match self.permission_on(namespace) {
            Some(_) => Ok(()),
            None if self.key.out_of_scope(namespace) => Err(AdminError::forbidden(format!(
                "the calling API key is not scoped to namespace {namespace:?}"
            ))),
            None => Err(AdminError::forbidden(format!(
                "you have no access to namespace {namespace:?}"
            ))),
        }
    }

    pub fn may_edit_namespace(&self, namespace: &str) -> Result<(), AdminError> {
        match self.permission_on(namespace) {
            Some(Permission::Admin) => Ok(()),
            _ => Err(AdminError::forbidden(format!(
                "only account admins and admins of namespace {namespace:?} may edit it"
            ))),
        }
    }

    /// Reading a key or its usage: admins, or the key's owner (changing one
    /// is [`Caller::may_change_key`]).
    pub fn may_manage_key(&self, key: &ApiKey) -> Result<(), AdminError> {
        if self.is_admin() || self.owns(key) {
            Ok(())
        } else {
            Err(AdminError::forbidden(format!(
                "API key {} belongs to someone else; only its owner and account admins may use it here",
                key.id
            )))
        }
    }

    /// Editing, enabling, disabling, rotating or deleting a key: as
    /// [`Caller::may_manage_key`], and a scoped calling key may change only
    /// keys scoped within its own scope. Rotating answers with the key's new
    /// secret, so a scoped key that could rotate a broader key of its owner
    /// would mint itself that broader key; enabling one (disabled because it
    /// leaked, say), or disabling and deleting the keys its owner relies on,
    /// reaches past the scope as well.
    pub fn may_change_key(&self, key: &ApiKey) -> Result<(), AdminError> {
        self.may_manage_key(key)?;
        if !self.is_scoped() {
            return Ok(());
        }
        let within = !key.namespaces.is_empty()
            && key.namespaces.iter().all(|ns| !self.key.out_of_scope(ns));
        if within {
            Ok(())
        } else {
            Err(AdminError::forbidden(format!(
                "API key {} reaches beyond namespaces {:?}, to which the calling API key is \
                 limited; change it with a key that is not limited to them",
                key.id,
                self.scope()
            )))
        }
    }

    /// Whether a change to `key` is an account admin's over a key it does
    /// not own: its disable then holds against the owner.
    pub fn overrules_owner_of(&self, key: &ApiKey) -> bool {
        self.is_admin() && !self.owns(key)
    }

    fn owns(&self, key: &ApiKey) -> bool {
        key.owner_id == self.principal_id() && key.owner_type == self.principal_type()
    }

    /// Listing keys: admins list anyone's; others only their own, so their
    /// listing is filtered to themselves.
    pub fn may_list_keys_of(&self, owner_id: Option<&str>) -> Result<(), AdminError> {
        match owner_id {
            _ if self.is_admin() => Ok(()),
            Some(id) if id != self.principal_id() => Err(AdminError::forbidden(
                "only account admins may list other principals' API keys",
            )),
            _ => Ok(()),
        }
    }

    /// Creating a key for `owner` scoped to `namespaces`. The store checks
    /// that the owner and namespaces exist and the key policies; this checks
    /// who may ask.
    pub fn may_create_key(
        &self,
        owner_type: OwnerType,
        owner_id: &str,
        namespaces: &[String],
    ) -> Result<(), AdminError> {
        if self.is_admin() {
            return Ok(());
        }
        if owner_type == OwnerType::ServiceAccount {
            return self.require_admin("create API keys for service accounts");
        }
        if owner_type != self.principal_type() || owner_id != self.principal_id() {
            return self.require_admin("create API keys for other users");
        }
        if self.is_scoped() && namespaces.is_empty() {
            return Err(AdminError::forbidden(format!(
                "the calling API key is limited to namespaces {:?}; a new key must be too",
                self.scope()
            )));
        }
        for ns in namespaces {
            if self.key.out_of_scope(ns) {
                return Err(AdminError::forbidden(format!(
                    "the calling API key is not scoped to namespace {ns:?}"
                )));
            }
            if self.permission_on(ns).is_none() {
                return Err(AdminError::forbidden(format!(
                    "you have no access to namespace {ns:?}, so a key of yours cannot be scoped to it"
                )));
            }
        }
        Ok(())
    }
}

pub fn kind_name(kind: OwnerType) -> &'static str {
    match kind {
        OwnerType::User => "user",
        OwnerType::ServiceAccount => "service account",
    }
}
