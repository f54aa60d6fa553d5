//! The metadata repository: owners, API keys and volumes.
//!
//! One [`Store`] trait, two backends: Postgres (production) and SQLite (the
//! embedded default). Both run the same SQL text, so one conformance suite
//! (`tests/conformance.rs`) covers both.

mod model;
mod sql;

use async_trait::async_trait;
use std::sync::Arc;

pub use model::{
    IdempotencyClaim, NewVolume, Owner, Sandbox, SandboxPage, SandboxState, Volume, VolumeState,
};
pub use sql::{PgStore, SqliteStore};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("unsupported database url {0:?}: expected postgres://… or sqlite:…")]
    UnsupportedUrl(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Human-readable backend name for logs and `/health`.
    fn backend(&self) -> &'static str;
    async fn migrate(&self) -> StoreResult<()>;
    async fn ping(&self) -> StoreResult<()>;

    /// Returns the owner with this name, creating it when absent.
    async fn ensure_owner(&self, name: &str) -> StoreResult<Owner>;
    async fn insert_api_key(&self, owner_id: &str, key_hash: &str, prefix: &str)
        -> StoreResult<()>;
    async fn owner_by_key_hash(&self, key_hash: &str) -> StoreResult<Option<Owner>>;
    async fn count_api_keys(&self) -> StoreResult<i64>;

    async fn insert_volume(&self, volume: &NewVolume) -> StoreResult<Volume>;
    /// A ready volume of this owner; deleted and foreign volumes are `None`.
    async fn get_volume(&self, owner_id: &str, id: &str) -> StoreResult<Option<Volume>>;
    /// Any volume of this owner, including deleted tombstones.
    async fn get_volume_any_state(&self, owner_id: &str, id: &str) -> StoreResult<Option<Volume>>;
    /// Ready volumes of this owner, newest first.
    async fn list_volumes(&self, owner_id: &str) -> StoreResult<Vec<Volume>>;
    /// Marks a ready volume deleted; returns false when it was not ready.
    async fn mark_volume_deleted(&self, owner_id: &str, id: &str) -> StoreResult<bool>;
    async fn volume_id_exists(&self, id: &str) -> StoreResult<bool>;

    async fn insert_sandbox(&self, sandbox: &Sandbox) -> StoreResult<()>;
    /// This owner's sandbox in any state; foreign ids are `None`.
    async fn get_sandbox(&self, owner_id: &str, id: &str) -> StoreResult<Option<Sandbox>>;
    async fn list_sandboxes(&self, owner_id: &str, page: &SandboxPage)
        -> StoreResult<Vec<Sandbox>>;
    /// Running sandboxes placed on `node_id` (restart reconciliation).
    async fn running_sandboxes_on(&self, node_id: &str) -> StoreResult<Vec<Sandbox>>;
    /// Sets a running sandbox's timeout and deadline; false if not running.
    async fn set_sandbox_deadline(
        &self,
        owner_id: &str,
        id: &str,
        timeout_secs: i64,
        end_at: Option<chrono::DateTime<chrono::Utc>>,
    ) -> StoreResult<bool>;
    /// Marks a running sandbox killed; false if it already was.
    async fn mark_sandbox_killed(&self, id: &str) -> StoreResult<bool>;

    /// Claims `key` for a create with this body hash. Keys live 24 hours;
    /// an in-progress claim older than `stale_after_secs` counts as
    /// abandoned (its server died) and is taken over.
    async fn claim_idempotency_key(
        &self,
        owner_id: &str,
        key: &str,
        body_hash: &str,
        stale_after_secs: i64,
    ) -> StoreResult<IdempotencyClaim>;
    async fn finish_idempotency_key(
        &self,
        owner_id: &str,
        key: &str,
        status: u16,
        response: &str,
    ) -> StoreResult<()>;
    /// Forgets a claim whose request failed, so a retry may run again.
    async fn release_idempotency_key(&self, owner_id: &str, key: &str) -> StoreResult<()>;
}

/// Opens the store a URL names: `postgres://…` or `sqlite:PATH`.
pub async fn connect(url: &str, max_connections: u32) -> StoreResult<Arc<dyn Store>> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(PgStore::connect(url, max_connections).await?))
    } else if url.starts_with("sqlite:") {
        Ok(Arc::new(SqliteStore::connect(url, max_connections).await?))
    } else {
        Err(StoreError::UnsupportedUrl(url.to_string()))
    }
}
