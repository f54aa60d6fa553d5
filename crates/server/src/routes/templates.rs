//! `/templates`: custom templates, built per owner from a structured spec or
//! a Dockerfile subset (see `sandbox_orchestrator::BuildRecipe`), then
//! created from by alias (`POST /sandboxes {"template": ALIAS}`). Built-in
//! names stay available to every owner and no alias can shadow them; one
//! owner's aliases are invisible to every other.

use crate::app::AppState;
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::json::JsonBody;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use sandbox_orchestrator::{BuildRecipe, BuildRequest, BuildState};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

#[derive(Deserialize, ToSchema)]
pub struct BuildBody {
    /// `{"dockerfile": TEXT}` or `{"base_image", "packages", "run_cmds", "envs", "start_cmd"}`.
    #[schema(value_type = Object)]
    template: Value,
    alias: String,
    #[serde(default)]
    cpu_count: Option<u32>,
    #[serde(default)]
    memory_mb: Option<u64>,
    #[serde(default)]
    disk_mb: Option<u64>,
}

/// A build: `status` is `building`, `completed` or `failed`.
#[derive(Debug, Serialize, ToSchema)]
pub struct BuildInfoView {
    pub build_id: String,
    pub status: &'static str,
    pub template_id: String,
    /// Bounded; `... [earlier build output truncated]` first once lines
    /// were dropped.
    pub logs: Vec<String>,
}

impl From<BuildState> for BuildInfoView {
    fn from(state: BuildState) -> Self {
        BuildInfoView {
            build_id: state.build_id,
            status: state.status.as_str(),
            template_id: state.template_id,
            logs: state.logs,
        }
    }
}

/// Aliases are names in URLs and logs: keep them boring.
fn check_alias(alias: &str) -> ApiResult<()> {
    let ok = !alias.is_empty()
        && alias.len() <= 64
        && alias.as_bytes()[0].is_ascii_alphanumeric()
        && alias
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
        && !alias.starts_with("tpl-");
    if ok {
        Ok(())
    } else {
        Err(ApiError::BadRequest(format!(
            "alias {alias:?} must be 1-64 of [a-z0-9._-], start with a letter or digit, and not start with tpl-"
        )))
    }
}

#[utoipa::path(
    post, path = "/templates/build", tag = "templates",
    request_body = BuildBody,
    responses((status = 202, description = "The build started (status `building`); follow it at `/templates/builds/{build_id}`", body = BuildInfoView), (status = 400, description = "Invalid spec (the message names the Dockerfile line), alias or resources", body = crate::views::ErrorView), (status = 401, description = "Missing or invalid API key", body = crate::views::ErrorView), (status = 503, description = "No sandbox runtime on this host", body = crate::views::ErrorView))
)]
pub async fn build(
    State(state): State<AppState>,
    Caller(owner): Caller,
    JsonBody(body): JsonBody<BuildBody>,
) -> ApiResult<(StatusCode, Json<BuildInfoView>)> {
    check_alias(&body.alias)?;
    let recipe = BuildRecipe::from_spec(&body.template).map_err(ApiError::BadRequest)?;
    let request = BuildRequest {
        alias: body.alias,
        recipe,
        vcpus: body.cpu_count,
        memory_mb: body.memory_mb,
        disk_mb: body.disk_mb,
    };
    let started = state.orchestrator.start_build(&owner.id, request).await?;
    Ok((StatusCode::ACCEPTED, Json(started.into())))
}

#[utoipa::path(
    post, path = "/templates/{template_id}/rebuild", tag = "templates",
    params(("template_id" = String, Path, description = "Template id (`tpl-…`) or alias")),
    responses((status = 202, description = "A new build of the stored spec started; sandboxes keep the previous build until it completes", body = BuildInfoView), (status = 401, description = "Missing or invalid API key", body = crate::views::ErrorView), (status = 404, description = "Unknown, or another owner's", body = crate::views::ErrorView))
)]
pub async fn rebuild(
    State(state): State<AppState>,
    Caller(owner): Caller,
    Path(template_id): Path<String>,
) -> ApiResult<(StatusCode, Json<BuildInfoView>)> {
    let started = state.orchestrator.rebuild(&owner.id, &template_id).await?;
    Ok((StatusCode::ACCEPTED, Json(started.into())))
}

#[utoipa::path(
    get, path = "/templates/builds/{build_id}", tag = "templates",
    params(("build_id" = String, Path, description = "Build id (`bld-…`)")),
    responses((status = 200, description = "The build's status and log so far", body = BuildInfoView), (status = 401, description = "Missing or invalid API key", body = crate::views::ErrorView), (status = 404, description = "Unknown, or another owner's", body = crate::views::ErrorView))
)]
pub async fn status(
    State(state): State<AppState>,
    Caller(owner): Caller,
    Path(build_id): Path<String>,
) -> ApiResult<Json<BuildInfoView>> {
    let build = state.orchestrator.build_state(&owner.id, &build_id).await?;
    Ok(Json(build.into()))
}
