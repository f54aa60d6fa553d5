//! The two SQL backends. Postgres and SQLite (via sqlx's `$N` support) accept
//! the same statements, so one macro writes both implementations and they
//! cannot drift apart.

use crate::model::{
    BuildStatus, CustomTemplate, IdempotencyClaim, NewVolume, Owner, QuotaOverride, Sandbox,
    SandboxPage, SandboxRow, SandboxSnapshot, SandboxState, SweepCounts, TemplateBuild, Usage,
    Volume, VolumeRow, VolumeState,
};
use crate::{Store, StoreResult};
use async_trait::async_trait;
use chrono::Utc;
use rand::Rng;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use std::str::FromStr;
use std::time::Duration;

const SANDBOX_COLUMNS: &str = "id, owner_id, template, state, node_id, envd_token, timeout_secs, \
     metadata, envs, extra, volumes, started_at, end_at, killed_at, paused_at";

const IDEMPOTENCY_TTL_HOURS: i64 = 24;

const TEMPLATE_COLUMNS: &str =
    "id, owner_id, alias, spec, vcpus, memory_mb, disk_mb, ready_build, created_at, updated_at";

const SNAPSHOT_COLUMNS: &str =
    "id, owner_id, sandbox_id, template, source, blob_key, size_bytes, created_at";

const BUILD_COLUMNS: &str =
    "id, template_id, owner_id, status, logs, node_id, created_at, finished_at";

const VOLUME_COLUMNS: &str = "id, owner_id, name, blob_key, size_bytes, sha256, content_type, \
     uncompressed_bytes, entry_count, metadata, state, created_at, updated_at";

fn new_owner_id() -> String {
    format!(
        "own-{:012x}",
        rand::rng().random::<u64>() & 0xffff_ffff_ffff
    )
}

pub struct PgStore {
    pool: PgPool,
}

impl PgStore {
    pub async fn connect(url: &str, max_connections: u32) -> StoreResult<Self> {
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(10))
            .connect(url)
            .await?;
        Ok(PgStore { pool })
    }
}

pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    pub async fn connect(url: &str, max_connections: u32) -> StoreResult<Self> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(max_connections)
            .connect_with(options)
            .await?;
        Ok(SqliteStore { pool })
    }
}

macro_rules! sql_store {
    ($store:ty, $backend:literal, $migrations:literal) => {
        #[async_trait]
        impl Store for $store {
            fn backend(&self) -> &'static str {
                $backend
            }

            async fn migrate(&self) -> StoreResult<()> {
                sqlx::migrate!($migrations).run(&self.pool).await?;
                Ok(())
            }

            async fn ping(&self) -> StoreResult<()> {
                sqlx::query("SELECT 1").execute(&self.pool).await?;
                Ok(())
            }

            async fn ensure_owner(&self, name: &str) -> StoreResult<Owner> {
                sqlx::query(
                    "INSERT INTO owners (id, name, created_at) VALUES ($1, $2, $3) \
                     ON CONFLICT (name) DO NOTHING",
                )
                .bind(new_owner_id())
                .bind(name)
                .bind(Utc::now())
                .execute(&self.pool)
                .await?;
                let owner = sqlx::query_as::<_, Owner>(
                    "SELECT id, name, created_at FROM owners WHERE name = $1",
                )
                .bind(name)
                .fetch_one(&self.pool)
                .await?;
                Ok(owner)
            }

            async fn insert_api_key(
                &self,
                owner_id: &str,
                key_hash: &str,
                prefix: &str,
            ) -> StoreResult<()> {
                sqlx::query(
                    "INSERT INTO api_keys (key_hash, owner_id, prefix, created_at) \
                     VALUES ($1, $2, $3, $4)",
                )
                .bind(key_hash)
                .bind(owner_id)
                .bind(prefix)
                .bind(Utc::now())
                .execute(&self.pool)
                .await?;
                Ok(())
            }

            async fn owner_by_key_hash(&self, key_hash: &str) -> StoreResult<Option<Owner>> {
                let owner = sqlx::query_as::<_, Owner>(
                    "SELECT o.id, o.name, o.created_at FROM owners o \
                     JOIN api_keys k ON k.owner_id = o.id WHERE k.key_hash = $1",
                )
                .bind(key_hash)
                .fetch_optional(&self.pool)
                .await?;
                Ok(owner)
            }

            async fn count_api_keys(&self) -> StoreResult<i64> {
                let (count,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM api_keys")
                    .fetch_one(&self.pool)
                    .await?;
                Ok(count)
            }

            async fn get_volume(&self, owner_id: &str, id: &str) -> StoreResult<Option<Volume>> {
                Ok(self
                    .get_volume_any_state(owner_id, id)
                    .await?
                    .filter(|v| v.state == VolumeState::Ready))
            }

            async fn get_volume_any_state(
                &self,
                owner_id: &str,
                id: &str,
            ) -> StoreResult<Option<Volume>> {
                let sql =
                    format!("SELECT {VOLUME_COLUMNS} FROM volumes WHERE owner_id = $1 AND id = $2");
                let row = sqlx::query_as::<_, VolumeRow>(&sql)
                    .bind(owner_id)
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await?;
                Ok(row.map(Volume::from))
            }

            async fn list_volumes(&self, owner_id: &str) -> StoreResult<Vec<Volume>> {
                let sql = format!(
                    "SELECT {VOLUME_COLUMNS} FROM volumes WHERE owner_id = $1 AND state = $2 \
                     ORDER BY created_at DESC, id DESC"
                );
                let rows = sqlx::query_as::<_, VolumeRow>(&sql)
                    .bind(owner_id)
                    .bind(VolumeState::Ready.as_str())
                    .fetch_all(&self.pool)
                    .await?;
                Ok(rows.into_iter().map(Volume::from).collect())
            }

            async fn mark_volume_deleted(&self, owner_id: &str, id: &str) -> StoreResult<bool> {
                let result = sqlx::query(
                    "UPDATE volumes SET state = $1, updated_at = $2 \
                     WHERE owner_id = $3 AND id = $4 AND state = $5",
                )
                .bind(VolumeState::Deleted.as_str())
                .bind(Utc::now())
                .bind(owner_id)
                .bind(id)
                .bind(VolumeState::Ready.as_str())
                .execute(&self.pool)
                .await?;
                Ok(result.rows_affected() == 1)
            }

            async fn volume_id_exists(&self, id: &str) -> StoreResult<bool> {
                let found: Option<(String,)> =
                    sqlx::query_as("SELECT id FROM volumes WHERE id = $1")
                        .bind(id)
                        .fetch_optional(&self.pool)
                        .await?;
                Ok(found.is_some())
            }

            async fn insert_pending_volume(&self, v: &NewVolume) -> StoreResult<()> {
                let now = Utc::now();
                sqlx::query(
                    "INSERT INTO volumes (id, owner_id, name, blob_key, size_bytes, sha256, \
                     content_type, uncompressed_bytes, entry_count, metadata, state, \
                     created_at, updated_at) \
                     VALUES ($1, $2, $3, $4, 0, '', $5, 0, 0, $6, $7, $8, $9)",
                )
                .bind(&v.id)
                .bind(&v.owner_id)
                .bind(&v.name)
                .bind(&v.blob_key)
                .bind(&v.content_type)
                .bind(sqlx::types::Json(&v.metadata))
                .bind(VolumeState::Pending.as_str())
                .bind(now)
                .bind(now)
                .execute(&self.pool)
                .await?;
                Ok(())
            }

            async fn finish_pending_volume(&self, v: &NewVolume) -> StoreResult<Option<Volume>> {
                let result = sqlx::query(
                    "UPDATE volumes SET size_bytes = $1, sha256 = $2, uncompressed_bytes = $3, \
                     entry_count = $4, state = $5, updated_at = $6 \
                     WHERE id = $7 AND owner_id = $8 AND state = $9",
                )
                .bind(v.size_bytes)
                .bind(&v.sha256)
                .bind(v.uncompressed_bytes)
                .bind(v.entry_count)
                .bind(VolumeState::Ready.as_str())
                .bind(Utc::now())
                .bind(&v.id)
                .bind(&v.owner_id)
                .bind(VolumeState::Pending.as_str())
                .execute(&self.pool)
                .await?;
                if result.rows_affected() != 1 {
                    return Ok(None);
                }
                self.get_volume(&v.owner_id, &v.id).await
            }

            async fn volumes_in_state(
                &self,
                state: VolumeState,
                before: chrono::DateTime<Utc>,
            ) -> StoreResult<Vec<Volume>> {
                let sql = format!(
                    "SELECT {VOLUME_COLUMNS} FROM volumes WHERE state = $1 AND updated_at < $2"
                );
                let rows = sqlx::query_as::<_, VolumeRow>(&sql)
                    .bind(state.as_str())
                    .bind(before)
                    .fetch_all(&self.pool)
                    .await?;
                Ok(rows.into_iter().map(Volume::from).collect())
            }

            async fn live_volume_keys(&self) -> StoreResult<Vec<String>> {
                let rows: Vec<(String,)> =
                    sqlx::query_as("SELECT blob_key FROM volumes WHERE state IN ($1, $2)")
                        .bind(VolumeState::Ready.as_str())
                        .bind(VolumeState::Pending.as_str())
                        .fetch_all(&self.pool)
                        .await?;
                Ok(rows.into_iter().map(|(key,)| key).collect())
            }

            async fn delete_volume_row(&self, id: &str, state: VolumeState) -> StoreResult<bool> {
                let result = sqlx::query("DELETE FROM volumes WHERE id = $1 AND state = $2")
                    .bind(id)
                    .bind(state.as_str())
                    .execute(&self.pool)
                    .await?;
                Ok(result.rows_affected() == 1)
            }

            async fn owner_by_name(&self, name: &str) -> StoreResult<Option<Owner>> {
                let owner = sqlx::query_as::<_, Owner>(
                    "SELECT id, name, created_at FROM owners WHERE name = $1",
                )
                .bind(name)
                .fetch_optional(&self.pool)
                .await?;
                Ok(owner)
            }

            async fn owner_ids(&self) -> StoreResult<Vec<String>> {
                let rows: Vec<(String,)> = sqlx::query_as("SELECT id FROM owners")
                    .fetch_all(&self.pool)
                    .await?;
                Ok(rows.into_iter().map(|(id,)| id).collect())
            }

            async fn usage(&self, owner_id: &str) -> StoreResult<Usage> {
                let (running_sandboxes,): (i64,) = sqlx::query_as(
                    "SELECT COUNT(*) FROM sandboxes WHERE owner_id = $1 AND state = $2",
                )
                .bind(owner_id)
                .bind(SandboxState::Running.as_str())
                .fetch_one(&self.pool)
                .await?;
                let (volumes, volume_bytes): (i64, Option<i64>) = sqlx::query_as(
                    "SELECT COUNT(*), CAST(SUM(size_bytes) AS BIGINT) FROM volumes \
                     WHERE owner_id = $1 AND state = $2",
                )
                .bind(owner_id)
                .bind(VolumeState::Ready.as_str())
                .fetch_one(&self.pool)
                .await?;
                Ok(Usage {
                    running_sandboxes,
                    volumes,
                    volume_bytes: volume_bytes.unwrap_or(0),
                })
            }

            async fn quota_override(&self, owner_id: &str) -> StoreResult<QuotaOverride> {
                let quota = sqlx::query_as::<_, QuotaOverride>(
                    "SELECT max_running_sandboxes, max_volumes, max_volume_bytes \
                     FROM owner_quotas WHERE owner_id = $1",
                )
                .bind(owner_id)
                .fetch_optional(&self.pool)
                .await?;
                Ok(quota.unwrap_or_default())
            }

            async fn set_quota_override(
                &self,
                owner_id: &str,
                quota: &QuotaOverride,
            ) -> StoreResult<()> {
                sqlx::query(
                    "INSERT INTO owner_quotas \
                     (owner_id, max_running_sandboxes, max_volumes, max_volume_bytes) \
                     VALUES ($1, $2, $3, $4) ON CONFLICT (owner_id) DO UPDATE SET \
                     max_running_sandboxes = $2, max_volumes = $3, max_volume_bytes = $4",
                )
                .bind(owner_id)
                .bind(quota.max_running_sandboxes)
                .bind(quota.max_volumes)
                .bind(quota.max_volume_bytes)
                .execute(&self.pool)
                .await?;
                Ok(())
            }

            async fn sweep(
                &self,
                keys_before: chrono::DateTime<Utc>,
                tombstones_before: chrono::DateTime<Utc>,
            ) -> StoreResult<SweepCounts> {
                let keys = sqlx::query("DELETE FROM idempotency_keys WHERE created_at < $1")
                    .bind(keys_before)
                    .execute(&self.pool)
                    .await?;
                let sandboxes =
                    sqlx::query("DELETE FROM sandboxes WHERE state = $1 AND killed_at < $2")
                        .bind(SandboxState::Killed.as_str())
                        .bind(tombstones_before)
                        .execute(&self.pool)
                        .await?;
                let volumes =
                    sqlx::query("DELETE FROM volumes WHERE state = $1 AND updated_at < $2")
                        .bind(VolumeState::Deleted.as_str())
                        .bind(tombstones_before)
                        .execute(&self.pool)
                        .await?;
                Ok(SweepCounts {
                    idempotency_keys: keys.rows_affected(),
                    killed_sandboxes: sandboxes.rows_affected(),
                    deleted_volumes: volumes.rows_affected(),
                })
            }

            async fn insert_sandbox(&self, sb: &Sandbox) -> StoreResult<()> {
                sqlx::query(
                    "INSERT INTO sandboxes (id, owner_id, template, state, node_id, envd_token, \
                     timeout_secs, metadata, envs, extra, volumes, started_at, end_at, killed_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
                )
                .bind(&sb.id)
                .bind(&sb.owner_id)
                .bind(&sb.template)
                .bind(sb.state.as_str())
                .bind(&sb.node_id)
                .bind(&sb.envd_token)
                .bind(sb.timeout_secs)
                .bind(sqlx::types::Json(&sb.metadata))
                .bind(sqlx::types::Json(&sb.envs))
                .bind(sqlx::types::Json(&sb.extra))
                .bind(sqlx::types::Json(&sb.volumes))
                .bind(sb.started_at)
                .bind(sb.end_at)
                .bind(sb.killed_at)
                .execute(&self.pool)
                .await?;
                Ok(())
            }

            async fn get_sandbox(&self, owner_id: &str, id: &str) -> StoreResult<Option<Sandbox>> {
                let sql = format!(
                    "SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE owner_id = $1 AND id = $2"
                );
                let row = sqlx::query_as::<_, SandboxRow>(&sql)
                    .bind(owner_id)
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await?;
                Ok(row.map(Sandbox::from))
            }

            async fn list_sandboxes(
                &self,
                owner_id: &str,
                page: &SandboxPage,
            ) -> StoreResult<Vec<Sandbox>> {
                let states: Vec<&str> = page.states.iter().map(|s| s.condition()).collect();
                let state_filter = if states.is_empty() {
                    String::new()
                } else {
                    format!(" AND ({})", states.join(" OR "))
                };
                let rows = match &page.before {
                    Some((started_at, id)) => {
                        let sql = format!(
                            "SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE owner_id = $1{state_filter} \
                             AND (started_at < $2 OR (started_at = $2 AND id < $3)) \
                             ORDER BY started_at DESC, id DESC LIMIT $4"
                        );
                        sqlx::query_as::<_, SandboxRow>(&sql)
                            .bind(owner_id)
                            .bind(started_at)
                            .bind(id)
                            .bind(page.limit)
                            .fetch_all(&self.pool)
                            .await?
                    }
                    None => {
                        let sql = format!(
                            "SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE owner_id = $1{state_filter} \
                             ORDER BY started_at DESC, id DESC LIMIT $2"
                        );
                        sqlx::query_as::<_, SandboxRow>(&sql)
                            .bind(owner_id)
                            .bind(page.limit)
                            .fetch_all(&self.pool)
                            .await?
                    }
                };
                Ok(rows.into_iter().map(Sandbox::from).collect())
            }

            async fn running_sandboxes_on(&self, node_id: &str) -> StoreResult<Vec<Sandbox>> {
                let sql = format!(
                    "SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE node_id = $1 AND state = $2"
                );
                let rows = sqlx::query_as::<_, SandboxRow>(&sql)
                    .bind(node_id)
                    .bind(SandboxState::Running.as_str())
                    .fetch_all(&self.pool)
                    .await?;
                Ok(rows.into_iter().map(Sandbox::from).collect())
            }

            async fn set_sandbox_deadline(
                &self,
                owner_id: &str,
                id: &str,
                timeout_secs: i64,
                end_at: Option<chrono::DateTime<Utc>>,
            ) -> StoreResult<bool> {
                let result = sqlx::query(
                    "UPDATE sandboxes SET timeout_secs = $1, end_at = $2 \
                     WHERE owner_id = $3 AND id = $4 AND state = $5",
                )
                .bind(timeout_secs)
                .bind(end_at)
                .bind(owner_id)
                .bind(id)
                .bind(SandboxState::Running.as_str())
                .execute(&self.pool)
                .await?;
                Ok(result.rows_affected() == 1)
            }

            async fn set_sandbox_paused(
                &self,
                owner_id: &str,
                id: &str,
                paused_at: Option<chrono::DateTime<Utc>>,
                end_at: Option<chrono::DateTime<Utc>>,
            ) -> StoreResult<bool> {
                // Only a running sandbox changes, and only from the other
                // side (paused to resumed or back), so two racing calls
                // cannot both win.
                let from_paused = if paused_at.is_some() { "IS NULL" } else { "IS NOT NULL" };
                let sql = format!(
                    "UPDATE sandboxes SET paused_at = $1, end_at = $2 \
                     WHERE owner_id = $3 AND id = $4 AND state = $5 AND paused_at {from_paused}"
                );
                let result = sqlx::query(&sql)
                    .bind(paused_at)
                    .bind(end_at)
                    .bind(owner_id)
                    .bind(id)
                    .bind(SandboxState::Running.as_str())
                    .execute(&self.pool)
                    .await?;
                Ok(result.rows_affected() == 1)
            }

            async fn mark_sandbox_killed(&self, id: &str) -> StoreResult<bool> {
                let result = sqlx::query(
                    "UPDATE sandboxes SET state = $1, killed_at = $2 WHERE id = $3 AND state = $4",
                )
                .bind(SandboxState::Killed.as_str())
                .bind(Utc::now())
                .bind(id)
                .bind(SandboxState::Running.as_str())
                .execute(&self.pool)
                .await?;
                Ok(result.rows_affected() == 1)
            }

            async fn claim_idempotency_key(
                &self,
                owner_id: &str,
                key: &str,
                body_hash: &str,
                stale_after_secs: i64,
            ) -> StoreResult<IdempotencyClaim> {
                let now = Utc::now();
                // Expired keys and abandoned claims make room for a fresh one.
                sqlx::query(
                    "DELETE FROM idempotency_keys WHERE owner_id = $1 AND key = $2 \
                     AND (created_at < $3 OR (status IS NULL AND created_at < $4))",
                )
                .bind(owner_id)
                .bind(key)
                .bind(now - chrono::Duration::hours(IDEMPOTENCY_TTL_HOURS))
                .bind(now - chrono::Duration::seconds(stale_after_secs))
                .execute(&self.pool)
                .await?;
                let inserted = sqlx::query(
                    "INSERT INTO idempotency_keys (owner_id, key, body_hash, created_at) \
                     VALUES ($1, $2, $3, $4) ON CONFLICT (owner_id, key) DO NOTHING",
                )
                .bind(owner_id)
                .bind(key)
                .bind(body_hash)
                .bind(now)
                .execute(&self.pool)
                .await?;
                if inserted.rows_affected() == 1 {
                    return Ok(IdempotencyClaim::Fresh);
                }
                let existing: Option<(String, Option<i32>, Option<String>)> = sqlx::query_as(
                    "SELECT body_hash, status, response FROM idempotency_keys \
                     WHERE owner_id = $1 AND key = $2",
                )
                .bind(owner_id)
                .bind(key)
                .fetch_optional(&self.pool)
                .await?;
                Ok(match existing {
                    // Released between our insert and select: treat as busy.
                    None => IdempotencyClaim::InProgress,
                    Some((hash, _, _)) if hash != body_hash => IdempotencyClaim::Mismatch,
                    Some((_, Some(status), Some(response))) => {
                        IdempotencyClaim::Done { status: status as u16, response }
                    }
                    Some(_) => IdempotencyClaim::InProgress,
                })
            }

            async fn finish_idempotency_key(
                &self,
                owner_id: &str,
                key: &str,
                status: u16,
                response: &str,
            ) -> StoreResult<()> {
                sqlx::query(
                    "UPDATE idempotency_keys SET status = $1, response = $2 \
                     WHERE owner_id = $3 AND key = $4",
                )
                .bind(status as i32)
                .bind(response)
                .bind(owner_id)
                .bind(key)
                .execute(&self.pool)
                .await?;
                Ok(())
            }

            async fn upsert_template(&self, t: &CustomTemplate) -> StoreResult<CustomTemplate> {
                let sql = format!(
                    "INSERT INTO templates ({TEMPLATE_COLUMNS}) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, NULL, $8, $8) \
                     ON CONFLICT (owner_id, alias) DO UPDATE SET spec = excluded.spec, \
                     vcpus = excluded.vcpus, memory_mb = excluded.memory_mb, \
                     disk_mb = excluded.disk_mb, updated_at = excluded.updated_at \
                     RETURNING {TEMPLATE_COLUMNS}"
                );
                let row = sqlx::query_as::<_, CustomTemplate>(&sql)
                .bind(&t.id)
                .bind(&t.owner_id)
                .bind(&t.alias)
                .bind(&t.spec)
                .bind(t.vcpus)
                .bind(t.memory_mb)
                .bind(t.disk_mb)
                .bind(t.updated_at)
                .fetch_one(&self.pool)
                .await?;
                Ok(row)
            }

            async fn get_template(
                &self,
                owner_id: &str,
                id_or_alias: &str,
            ) -> StoreResult<Option<CustomTemplate>> {
                let sql = format!(
                    "SELECT {TEMPLATE_COLUMNS} FROM templates \
                     WHERE owner_id = $1 AND (id = $2 OR alias = $2)"
                );
                let row = sqlx::query_as::<_, CustomTemplate>(&sql)
                .bind(owner_id)
                .bind(id_or_alias)
                .fetch_optional(&self.pool)
                .await?;
                Ok(row)
            }

            async fn insert_template_build(&self, b: &TemplateBuild) -> StoreResult<()> {
                let sql = format!(
                    "INSERT INTO template_builds ({BUILD_COLUMNS}) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
                );
                sqlx::query(&sql)
                .bind(&b.id)
                .bind(&b.template_id)
                .bind(&b.owner_id)
                .bind(&b.status)
                .bind(&b.logs)
                .bind(&b.node_id)
                .bind(b.created_at)
                .bind(b.finished_at)
                .execute(&self.pool)
                .await?;
                Ok(())
            }

            async fn get_template_build(
                &self,
                owner_id: &str,
                id: &str,
            ) -> StoreResult<Option<TemplateBuild>> {
                let sql = format!(
                    "SELECT {BUILD_COLUMNS} FROM template_builds WHERE owner_id = $1 AND id = $2"
                );
                let row = sqlx::query_as::<_, TemplateBuild>(&sql)
                .bind(owner_id)
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
                Ok(row)
            }

            async fn finish_template_build(
                &self,
                id: &str,
                status: BuildStatus,
                logs: &[String],
            ) -> StoreResult<()> {
                let now = Utc::now();
                let mut tx = self.pool.begin().await?;
                sqlx::query(
                    "UPDATE template_builds SET status = $1, logs = $2, finished_at = $3 \
                     WHERE id = $4",
                )
                .bind(status.as_str())
                .bind(sqlx::types::Json(logs))
                .bind(now)
                .bind(id)
                .execute(&mut *tx)
                .await?;
                if status == BuildStatus::Completed {
                    sqlx::query(
                        "UPDATE templates SET ready_build = $1, updated_at = $2 WHERE id = \
                         (SELECT template_id FROM template_builds WHERE id = $1)",
                    )
                    .bind(id)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await?;
                Ok(())
            }

            async fn fail_unfinished_builds(
                &self,
                node_id: &str,
                note: &str,
            ) -> StoreResult<Vec<String>> {
                let sql = format!(
                    "SELECT {BUILD_COLUMNS} FROM template_builds WHERE node_id = $1 AND status = $2"
                );
                let unfinished: Vec<TemplateBuild> = sqlx::query_as(&sql)
                .bind(node_id)
                .bind(BuildStatus::Building.as_str())
                .fetch_all(&self.pool)
                .await?;
                for build in &unfinished {
                    let mut logs = build.logs.0.clone();
                    logs.push(note.to_string());
                    self.finish_template_build(&build.id, BuildStatus::Failed, &logs)
                        .await?;
                }
                Ok(unfinished.into_iter().map(|b| b.id).collect())
            }

            async fn insert_snapshot(&self, snap: &SandboxSnapshot) -> StoreResult<()> {
                let sql = format!(
                    "INSERT INTO snapshots ({SNAPSHOT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
                );
                sqlx::query(&sql)
                    .bind(&snap.id)
                    .bind(&snap.owner_id)
                    .bind(&snap.sandbox_id)
                    .bind(&snap.template)
                    .bind(&snap.source)
                    .bind(&snap.blob_key)
                    .bind(snap.size_bytes)
                    .bind(snap.created_at)
                    .execute(&self.pool)
                    .await?;
                Ok(())
            }

            async fn list_snapshots(
                &self,
                owner_id: &str,
                sandbox_id: Option<&str>,
                limit: i64,
            ) -> StoreResult<Vec<SandboxSnapshot>> {
                let sql = format!(
                    "SELECT {SNAPSHOT_COLUMNS} FROM snapshots WHERE owner_id = $1 \
                     AND ($2 IS NULL OR sandbox_id = $2) \
                     ORDER BY created_at DESC, id DESC LIMIT $3"
                );
                let rows = sqlx::query_as::<_, SandboxSnapshot>(&sql)
                    .bind(owner_id)
                    .bind(sandbox_id)
                    .bind(limit)
                    .fetch_all(&self.pool)
                    .await?;
                Ok(rows)
            }

            async fn delete_snapshot(
                &self,
                owner_id: &str,
                id: &str,
            ) -> StoreResult<Option<SandboxSnapshot>> {
                let sql = format!(
                    "DELETE FROM snapshots WHERE owner_id = $1 AND id = $2 \
                     RETURNING {SNAPSHOT_COLUMNS}"
                );
                let row = sqlx::query_as::<_, SandboxSnapshot>(&sql)
                    .bind(owner_id)
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await?;
                Ok(row)
            }

            async fn revive_sandbox(
                &self,
                owner_id: &str,
                id: &str,
                template: &str,
                envd_token: &str,
                started_at: chrono::DateTime<Utc>,
                end_at: Option<chrono::DateTime<Utc>>,
            ) -> StoreResult<bool> {
                let result = sqlx::query(
                    "UPDATE sandboxes SET state = $1, template = $2, envd_token = $3, \
                     started_at = $4, end_at = $5, killed_at = NULL, paused_at = NULL \
                     WHERE owner_id = $6 AND id = $7",
                )
                .bind(SandboxState::Running.as_str())
                .bind(template)
                .bind(envd_token)
                .bind(started_at)
                .bind(end_at)
                .bind(owner_id)
                .bind(id)
                .execute(&self.pool)
                .await?;
                Ok(result.rows_affected() == 1)
            }

            async fn release_idempotency_key(&self, owner_id: &str, key: &str) -> StoreResult<()> {
                sqlx::query("DELETE FROM idempotency_keys WHERE owner_id = $1 AND key = $2")
                    .bind(owner_id)
                    .bind(key)
                    .execute(&self.pool)
                    .await?;
                Ok(())
            }
        }
    };
}

sql_store!(PgStore, "postgres", "../../migrations/postgres");
sql_store!(SqliteStore, "sqlite", "../../migrations/sqlite");
