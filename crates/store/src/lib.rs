//! The metadata repository: owners, API keys, volumes, sandboxes,
//! idempotency keys and quota overrides.
//!
//! One [`Store`] trait, two backends: Postgres (production) and SQLite (the
//! embedded default). Both run the same SQL text, so one conformance suite
//! (`tests/conformance.rs`) covers both.

mod model;
mod sql;

use async_trait::async_trait;
use std::sync::Arc;

pub use model::{
    BuildStatus, CustomTemplate, IdempotencyClaim, ListedState, NewVolume, Owner, QuotaOverride,
    Sandbox, SandboxPage, SandboxSnapshot, SandboxState, SweepCounts, TemplateBuild, Usage, Volume,
    VolumeState,
};
pub use sql::{PgStore, SqliteStore};
/// JSON column values (custom template specs and build logs).
pub use sqlx::types::Json;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("unsupported database url {0:?}: expected postgres://… or sqlite:…")]
    UnsupportedUrl(String),
}

impl StoreError {
    /// The database could not be reached (down, restarting, pool exhausted):
    /// a transient condition callers report as 503, not a bug.
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Database(e) => match e {
                sqlx::Error::Io(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::Tls(_)
                | sqlx::Error::WorkerCrashed => true,
                // Class 08 (connection exception), 57P0x (shutdown, cannot
                // connect now), 53300 (too many connections).
                sqlx::Error::Database(db) => db.code().is_some_and(|code| {
                    code.starts_with("08") || code.starts_with("57P") || code == "53300"
                }),
                _ => false,
            },
            _ => false,
        }
    }
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

    /// A ready volume of this owner; deleted and foreign volumes are `None`.
    async fn get_volume(&self, owner_id: &str, id: &str) -> StoreResult<Option<Volume>>;
    /// Any volume of this owner, including deleted tombstones.
    async fn get_volume_any_state(&self, owner_id: &str, id: &str) -> StoreResult<Option<Volume>>;
    /// Ready volumes of this owner, newest first.
    async fn list_volumes(&self, owner_id: &str) -> StoreResult<Vec<Volume>>;
    /// Marks a ready volume deleted; returns false when it was not ready.
    async fn mark_volume_deleted(&self, owner_id: &str, id: &str) -> StoreResult<bool>;
    async fn volume_id_exists(&self, id: &str) -> StoreResult<bool>;
    /// Writes the row of an upload about to start, in state pending.
    async fn insert_pending_volume(&self, volume: &NewVolume) -> StoreResult<()>;
    /// Fills in a pending volume's blob facts and makes it ready; `None`
    /// if it is no longer pending (the reconciler took it).
    async fn finish_pending_volume(&self, volume: &NewVolume) -> StoreResult<Option<Volume>>;
    /// Volumes in `state` last updated before `before` (any owner).
    async fn volumes_in_state(
        &self,
        state: VolumeState,
        before: chrono::DateTime<chrono::Utc>,
    ) -> StoreResult<Vec<Volume>>;
    /// Blob keys of every ready or pending volume (any owner).
    async fn live_volume_keys(&self) -> StoreResult<Vec<String>>;
    /// Removes a volume row outright (a pending row whose upload died).
    async fn delete_volume_row(&self, id: &str, state: VolumeState) -> StoreResult<bool>;

    async fn owner_by_name(&self, name: &str) -> StoreResult<Option<Owner>>;
    /// Every owner id (the reconciler touches only its own owners' blobs).
    async fn owner_ids(&self) -> StoreResult<Vec<String>>;
    async fn usage(&self, owner_id: &str) -> StoreResult<Usage>;
    async fn quota_override(&self, owner_id: &str) -> StoreResult<QuotaOverride>;
    async fn set_quota_override(&self, owner_id: &str, quota: &QuotaOverride) -> StoreResult<()>;
    /// Deletes idempotency keys created before `keys_before`, killed
    /// sandboxes killed before `tombstones_before` and deleted volume rows
    /// last updated before it.
    async fn sweep(
        &self,
        keys_before: chrono::DateTime<chrono::Utc>,
        tombstones_before: chrono::DateTime<chrono::Utc>,
    ) -> StoreResult<SweepCounts>;

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
    /// Pauses (`paused_at` set) or resumes (`None`) a running sandbox and
    /// sets its deadline; false if it is not running or already so.
    async fn set_sandbox_paused(
        &self,
        owner_id: &str,
        id: &str,
        paused_at: Option<chrono::DateTime<chrono::Utc>>,
        end_at: Option<chrono::DateTime<chrono::Utc>>,
    ) -> StoreResult<bool>;
    /// Creates the owner's template `alias`, or updates its spec and
    /// limits (keeping its id and ready build); returns the row.
    async fn upsert_template(&self, template: &CustomTemplate) -> StoreResult<CustomTemplate>;
    /// The owner's template by id or alias; other owners' are `None`.
    async fn get_template(
        &self,
        owner_id: &str,
        id_or_alias: &str,
    ) -> StoreResult<Option<CustomTemplate>>;
    async fn insert_template_build(&self, build: &TemplateBuild) -> StoreResult<()>;
    async fn get_template_build(
        &self,
        owner_id: &str,
        id: &str,
    ) -> StoreResult<Option<TemplateBuild>>;
    /// Records a build's end and log; a completed one becomes its
    /// template's ready build.
    async fn finish_template_build(
        &self,
        id: &str,
        status: BuildStatus,
        logs: &[String],
    ) -> StoreResult<()>;
    /// Builds this node left running (it restarted): marked failed with
    /// `note` appended; returns their ids.
    async fn fail_unfinished_builds(&self, node_id: &str, note: &str) -> StoreResult<Vec<String>>;
    async fn insert_snapshot(&self, snapshot: &SandboxSnapshot) -> StoreResult<()>;
    /// The owner's snapshots, newest first, of one sandbox or all.
    async fn list_snapshots(
        &self,
        owner_id: &str,
        sandbox_id: Option<&str>,
        limit: i64,
    ) -> StoreResult<Vec<SandboxSnapshot>>;
    /// Removes the owner's snapshot row; returns it if there was one.
    async fn delete_snapshot(
        &self,
        owner_id: &str,
        id: &str,
    ) -> StoreResult<Option<SandboxSnapshot>>;
    /// Brings the owner's sandbox row back to running (a restore): new
    /// agent token and template, fresh start and deadline, not paused.
    async fn revive_sandbox(
        &self,
        owner_id: &str,
        id: &str,
        template: &str,
        envd_token: &str,
        started_at: chrono::DateTime<chrono::Utc>,
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
