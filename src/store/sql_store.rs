//! `impl KeyStore` for the SQL stores, written once.
//!
//! Both stores answer most of the trait with one call to the shared
//! statements (`Sql<DB>` in `queries.rs` and `writes.rs`): a read on the
//! store's read pool, or a change in a transaction from the store's
//! `begin()`. What differs between them (how a store closes, which keys
//! exist, how usage is added, whether changes are announced) each store
//! writes as inherent methods, named below, that the impl forwards to.
//!
//! Why a macro: a generic `impl<S: SqlBackend> KeyStore for S` would repeat
//! the fifteen bounds `Sql<DB>` needs, fourteen of them higher-ranked (Rust
//! does not imply where-clauses), and the two impls were 120 lines of the same
//! delegations. The store writes `sql_key_store!(Store, reads: field);` and
//! provides:
//!
//! - `fn begin(&self) -> Result<Transaction<'static, DB>, StoreError>` (async)
//! - `still_there(&self) -> Result<(), StoreError>`, checked by `ping`
//!   (the SQLite file may have been deleted under the process)
//! - `close_pools(&self)`, `keys_that_exist(&self, &[KeyId])`,
//!   `add_usage(&self, &FlushId, &[UsageDelta])` and `change_subscription(&self)`
//!   (async), the trait's `close`, `existing_keys`, `record_usage` and
//!   `subscribe`.

/// Implements `KeyStore` for `$store`, reading through its pool `$reads`.
macro_rules! sql_key_store {
    ($store:ty, reads: $reads:ident) => {
        #[async_trait::async_trait]
        impl $crate::store::KeyStore for $store {
            async fn close(&self) {
                self.close_pools().await
            }

            async fn ping(&self) -> Result<(), StoreError> {
                self.still_there()?;
                sqlx::query("SELECT 1").execute(&self.$reads).await?;
                Ok(())
            }

            async fn find_key(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
                Sql::key_record(&self.$reads, id).await
            }

            async fn existing_keys(&self, ids: &[KeyId]) -> Result<Vec<KeyId>, StoreError> {
                self.keys_that_exist(ids).await
            }

            async fn settings(&self) -> Result<AccountSettings, StoreError> {
                Sql::settings(&self.$reads, NO_LOCK).await
            }

            async fn update_settings(
                &self,
                actor: &Actor,
                api_keys_enabled: bool,
                max_key_lifetime: Duration,
                max_keys_per_owner: u32,
                expected_version: Option<i64>,
            ) -> Result<AccountSettings, StoreError> {
                let tx = self.begin().await?;
                Sql::update_settings(
                    tx,
                    actor,
                    api_keys_enabled,
                    max_key_lifetime,
                    max_keys_per_owner,
                    expected_version,
                )
                .await
            }

            async fn create_principal(
                &self,
                actor: &Actor,
                kind: OwnerType,
                spec: PrincipalSpec,
            ) -> Result<Principal, StoreError> {
                Sql::create_principal(self.begin().await?, actor, kind, spec).await
            }

            async fn get_principal(
                &self,
                kind: OwnerType,
                id: &str,
            ) -> Result<Option<Principal>, StoreError> {
                Sql::principal_by(&self.$reads, "id", kind, id, NO_LOCK).await
            }

            async fn find_principal_by_name(
                &self,
                kind: OwnerType,
                name: &str,
            ) -> Result<Option<Principal>, StoreError> {
                Sql::principal_by(&self.$reads, "name", kind, name, NO_LOCK).await
            }

            async fn list_principals(
                &self,
                kind: OwnerType,
                page: &PageRequest,
            ) -> Result<Page<Principal>, StoreError> {
                Sql::list_principals(&self.$reads, kind, page).await
            }

            async fn update_principal(
                &self,
                actor: &Actor,
                kind: OwnerType,
                id: &str,
                spec: PrincipalSpec,
                expected_version: Option<i64>,
            ) -> Result<(Principal, Vec<KeyId>), StoreError> {
                let tx = self.begin().await?;
                Sql::update_principal(tx, actor, kind, id, spec, expected_version).await
            }

            async fn delete_principal(
                &self,
                actor: &Actor,
                kind: OwnerType,
                id: &str,
            ) -> Result<Vec<KeyId>, StoreError> {
                Sql::delete_principal(self.begin().await?, actor, kind, id).await
            }

            async fn count_principals(&self, kind: OwnerType) -> Result<u64, StoreError> {
                Sql::count_principals(&self.$reads, kind).await
            }

            async fn create_namespace(
                &self,
                actor: &Actor,
                name: &str,
                description: &str,
            ) -> Result<Namespace, StoreError> {
                Sql::create_namespace(self.begin().await?, actor, name, description).await
            }

            async fn get_namespace(
                &self,
                id_or_name: &str,
            ) -> Result<Option<Namespace>, StoreError> {
                Sql::namespace(&self.$reads, id_or_name).await
            }

            async fn list_namespaces(
                &self,
                names: Option<&[String]>,
                page: &PageRequest,
            ) -> Result<Page<Namespace>, StoreError> {
                Sql::list_namespaces(&self.$reads, names, page).await
            }

            async fn update_namespace(
                &self,
                actor: &Actor,
                id: &str,
                description: &str,
                expected_version: Option<i64>,
            ) -> Result<Namespace, StoreError> {
                let tx = self.begin().await?;
                Sql::update_namespace(tx, actor, id, description, expected_version).await
            }

            async fn delete_namespace(
                &self,
                actor: &Actor,
                id: &str,
            ) -> Result<Vec<KeyId>, StoreError> {
                Sql::delete_namespace(self.begin().await?, actor, id).await
            }

            async fn create_key(&self, actor: &Actor, key: NewKey) -> Result<ApiKey, StoreError> {
                Sql::create_key(self.begin().await?, actor, key).await
            }

            async fn bootstrap(
                &self,
                actor: &Actor,
                spec: PrincipalSpec,
                key: NewKey,
            ) -> Result<(Principal, ApiKey), StoreError> {
                Sql::bootstrap(self.begin().await?, actor, spec, key).await
            }

            async fn import_keys(&self, actor: &Actor, keys: &[NewKey]) -> Result<u64, StoreError> {
                Sql::import_keys(self.begin().await?, actor, keys).await
            }

            async fn get_key(&self, id: &KeyId) -> Result<Option<ApiKey>, StoreError> {
                Sql::key(&self.$reads, id, NO_LOCK).await
            }

            async fn list_keys(
                &self,
                filter: &KeyFilter,
                page: &PageRequest,
            ) -> Result<Page<ApiKey>, StoreError> {
                Sql::list_keys(&self.$reads, filter, page).await
            }

            async fn update_key(
                &self,
                actor: &Actor,
                id: &KeyId,
                update: KeyUpdate,
                expected_version: Option<i64>,
            ) -> Result<ApiKey, StoreError> {
                let tx = self.begin().await?;
                Sql::update_key(tx, actor, id, update, expected_version).await
            }

            async fn rotate_key(
                &self,
                actor: &Actor,
                id: &KeyId,
                digest: Digest,
                grace_until: SystemTime,
            ) -> Result<ApiKey, StoreError> {
                Sql::rotate_key(self.begin().await?, actor, id, digest, grace_until).await
            }

            async fn delete_key(&self, actor: &Actor, id: &KeyId) -> Result<(), StoreError> {
                Sql::delete_key(self.begin().await?, actor, id).await
            }

            async fn record_usage(
                &self,
                flush: &FlushId,
                batch: &[UsageDelta],
            ) -> Result<Recorded, StoreError> {
                self.add_usage(flush, batch).await
            }

            async fn list_audit(&self, page: &PageRequest) -> Result<Page<AuditEvent>, StoreError> {
                Sql::list_audit(&self.$reads, page).await
            }

            async fn changes_since(
                &self,
                watermark: i64,
            ) -> Result<(i64, Vec<Change>), StoreError> {
                Sql::changes_since(&self.$reads, watermark).await
            }

            async fn subscribe(&self) -> Result<Option<Box<dyn ChangeSubscription>>, StoreError> {
                self.change_subscription().await
            }
        }
    };
}

pub(super) use sql_key_store;
