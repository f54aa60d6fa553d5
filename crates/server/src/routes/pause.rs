//! `POST /sandboxes/{id}/pause` and `/resume`.

use crate::app::AppState;
use crate::auth::Caller;
use crate::error::ApiResult;
use crate::views::EmptyView;
use axum::extract::{Path, State};
use axum::Json;

#[utoipa::path(
    post, path = "/sandboxes/{id}/pause", tag = "sandboxes", params(("id" = String, Path, description = "Sandbox id (`sbx-…`)")),
    responses((status = 200, description = "Paused: its processes are stopped, its memory and files kept, its deadline on hold", body = EmptyView), (status = 401, description = "Missing or invalid API key", body = crate::views::ErrorView), (status = 404, description = "Unknown, or another owner's", body = crate::views::ErrorView), (status = 409, description = "Already paused, or this runtime cannot pause", body = crate::views::ErrorView), (status = 410, description = "The sandbox was killed", body = crate::views::ErrorView))
)]
pub async fn pause(
    State(state): State<AppState>,
    Caller(owner): Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<EmptyView>> {
    state.orchestrator.pause(&owner.id, &id).await?;
    Ok(Json(EmptyView {}))
}

#[utoipa::path(
    post, path = "/sandboxes/{id}/resume", tag = "sandboxes", params(("id" = String, Path, description = "Sandbox id (`sbx-…`)")),
    responses((status = 200, description = "Running again (also when it was not paused); the deadline moved on by the paused time", body = EmptyView), (status = 401, description = "Missing or invalid API key", body = crate::views::ErrorView), (status = 404, description = "Unknown, or another owner's", body = crate::views::ErrorView), (status = 410, description = "The sandbox was killed", body = crate::views::ErrorView))
)]
pub async fn resume(
    State(state): State<AppState>,
    Caller(owner): Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<EmptyView>> {
    state.orchestrator.resume(&owner.id, &id).await?;
    Ok(Json(EmptyView {}))
}
