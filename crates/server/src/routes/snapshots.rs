//! Sandbox snapshots and restore (filesystem level; see the orchestrator's
//! `lifecycle/snapshot.rs`): take, list, delete, restore.

use crate::app::AppState;
use crate::auth::Caller;
use crate::error::ApiResult;
use crate::timefmt::iso_utc_offset;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use sandbox_store::SandboxSnapshot;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A snapshot. Memory is not kept (`mem_size_bytes` is null): a restore
/// brings back the files, with processes started afresh.
#[derive(Debug, Serialize, ToSchema)]
pub struct SnapshotView {
    pub snapshot_id: String,
    pub sandbox_id: String,
    /// `manual`.
    pub source: String,
    /// The snapshot's object-storage key.
    pub blob_key: String,
    pub size_bytes: i64,
    /// Empty: no memory image is kept.
    pub mem_blob_key: String,
    pub vmstate_blob_key: String,
    pub mem_size_bytes: Option<i64>,
    pub pause_duration_ms: Option<i64>,
    /// ISO 8601 with `+00:00` (what Python 3.10's `fromisoformat` reads).
    pub created_at: String,
}

impl From<SandboxSnapshot> for SnapshotView {
    fn from(s: SandboxSnapshot) -> Self {
        SnapshotView {
            snapshot_id: s.id,
            sandbox_id: s.sandbox_id,
            source: s.source,
            blob_key: s.blob_key,
            size_bytes: s.size_bytes,
            mem_blob_key: String::new(),
            vmstate_blob_key: String::new(),
            mem_size_bytes: None,
            pause_duration_ms: None,
            created_at: iso_utc_offset(s.created_at),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SnapshotListView {
    pub snapshots: Vec<SnapshotView>,
    /// Always null: one page holds them all (at most 1000).
    pub next_token: Option<String>,
}

#[utoipa::path(
    post, path = "/sandboxes/{id}/snapshot", tag = "sandboxes", params(("id" = String, Path, description = "Sandbox id (`sbx-…`)")),
    responses((status = 201, description = "The sandbox's filesystem, stored", body = SnapshotView), (status = 400, description = "The filesystem could not be packed (larger than the disk, the sandbox stopped sending)", body = crate::views::ErrorView), (status = 401, description = "Missing or invalid API key", body = crate::views::ErrorView), (status = 404, description = "Unknown, or another owner's", body = crate::views::ErrorView), (status = 409, description = "The sandbox is paused", body = crate::views::ErrorView), (status = 410, description = "The sandbox was killed", body = crate::views::ErrorView), (status = 503, description = "Object storage unavailable", body = crate::views::ErrorView))
)]
pub async fn create(
    State(state): State<AppState>,
    Caller(owner): Caller,
    Path(id): Path<String>,
) -> ApiResult<(StatusCode, Json<SnapshotView>)> {
    let snapshot = state.orchestrator.snapshot(&owner.id, &id).await?;
    Ok((StatusCode::CREATED, Json(snapshot.into())))
}

#[utoipa::path(
    get, path = "/sandboxes/{id}/snapshots", tag = "sandboxes", params(("id" = String, Path, description = "Sandbox id (`sbx-…`)")),
    responses((status = 200, description = "Its snapshots, newest first (also after it was killed)", body = SnapshotListView), (status = 401, description = "Missing or invalid API key", body = crate::views::ErrorView), (status = 404, description = "Unknown, or another owner's", body = crate::views::ErrorView))
)]
pub async fn list_for_sandbox(
    State(state): State<AppState>,
    Caller(owner): Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<SnapshotListView>> {
    state.orchestrator.get(&owner.id, &id).await?;
    list(&state, &owner.id, Some(&id), 1000).await
}

#[derive(Deserialize)]
pub struct ListQuery {
    sandbox_id: Option<String>,
    limit: Option<i64>,
}

#[utoipa::path(
    get, path = "/snapshots", tag = "sandboxes",
    params(("sandbox_id" = Option<String>, Query, description = "Only this sandbox's"), ("limit" = Option<i64>, Query, description = "At most this many (1..=1000, default 100)")),
    responses((status = 200, description = "The caller's snapshots, newest first", body = SnapshotListView), (status = 401, description = "Missing or invalid API key", body = crate::views::ErrorView))
)]
pub async fn list_all(
    State(state): State<AppState>,
    Caller(owner): Caller,
    Query(query): Query<ListQuery>,
) -> ApiResult<Json<SnapshotListView>> {
    let limit = query.limit.unwrap_or(100).clamp(1, 1000);
    list(&state, &owner.id, query.sandbox_id.as_deref(), limit).await
}

async fn list(
    state: &AppState,
    owner_id: &str,
    sandbox_id: Option<&str>,
    limit: i64,
) -> ApiResult<Json<SnapshotListView>> {
    let snapshots = state
        .store
        .list_snapshots(owner_id, sandbox_id, limit)
        .await?
        .into_iter()
        .map(SnapshotView::from)
        .collect();
    Ok(Json(SnapshotListView {
        snapshots,
        next_token: None,
    }))
}

#[utoipa::path(
    delete, path = "/sandboxes/{id}/snapshots/{snapshot_id}", tag = "sandboxes",
    params(("id" = String, Path, description = "Sandbox id (`sbx-…`)"), ("snapshot_id" = String, Path, description = "Snapshot id (`snap-…`)")),
    responses((status = 204, description = "Deleted (also when it was already gone)"), (status = 401, description = "Missing or invalid API key", body = crate::views::ErrorView), (status = 404, description = "Unknown sandbox, or another owner's", body = crate::views::ErrorView))
)]
pub async fn delete(
    State(state): State<AppState>,
    Caller(owner): Caller,
    Path((id, snapshot_id)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    state.orchestrator.get(&owner.id, &id).await?;
    state
        .orchestrator
        .delete_snapshot(&owner.id, &snapshot_id)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
pub struct RestoreQuery {
    snapshot_id: Option<String>,
}

/// What a restore answers (the SDKs then `GET /sandboxes/{id}`).
#[derive(Debug, Serialize, ToSchema)]
pub struct RestoredView {
    pub sandbox_id: String,
    pub node_id: String,
    pub snapshot_id: String,
    pub state: &'static str,
}

#[utoipa::path(
    post, path = "/sandboxes/{id}/restore", tag = "sandboxes",
    params(("id" = String, Path, description = "Sandbox id (`sbx-…`)"), ("snapshot_id" = Option<String>, Query, description = "Default: the newest snapshot")),
    responses((status = 200, description = "Running again from the snapshot's files (same id, fresh deadline, processes started afresh); killed sandboxes come back too", body = RestoredView), (status = 401, description = "Missing or invalid API key", body = crate::views::ErrorView), (status = 404, description = "Unknown sandbox or snapshot", body = crate::views::ErrorView), (status = 503, description = "Object storage or the runtime unavailable", body = crate::views::ErrorView))
)]
pub async fn restore(
    State(state): State<AppState>,
    Caller(owner): Caller,
    Path(id): Path<String>,
    Query(query): Query<RestoreQuery>,
) -> ApiResult<Json<RestoredView>> {
    let (sandbox, snapshot) = state
        .orchestrator
        .restore(&owner.id, &id, query.snapshot_id.as_deref())
        .await?;
    Ok(Json(RestoredView {
        sandbox_id: sandbox.id.clone(),
        node_id: sandbox.node_id.clone(),
        snapshot_id: snapshot.id,
        state: sandbox.shown_state(),
    }))
}
