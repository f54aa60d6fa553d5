//! `/sandboxes/{id}/files`: everything goes through the sandbox's envd.

use crate::app::AppState;
use crate::error::{ApiError, ApiResult};
use crate::extract::SandboxAgent;
use crate::json::JsonBody;
use crate::views::{CreatedView, EmptyView, EntryView, ExistsView, WrittenFileView};
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use serde::Deserialize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use utoipa::ToSchema;

/// File writes of one batch in flight at once.
const BATCH_CONCURRENCY: usize = 8;

/// `/files/raw` bodies above this get 413 (what the SDKs expect).
pub const RAW_FILE_LIMIT: u64 = 500 << 20;

#[derive(Deserialize)]
pub struct PathParams {
    path: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    depth: Option<u32>,
}

impl PathParams {
    fn path(&self) -> ApiResult<&str> {
        self.path
            .as_deref()
            .filter(|p| !p.is_empty())
            .ok_or_else(|| ApiError::BadRequest("path is required".into()))
    }
    fn user(&self) -> &str {
        user_or_default(&self.username)
    }
}

fn user_or_default(username: &Option<String>) -> &str {
    username
        .as_deref()
        .filter(|u| !u.is_empty())
        .unwrap_or("user")
}

#[utoipa::path(
    get, path = "/sandboxes/{id}/files", tag = "files", params(("id" = String, Path, description = "Sandbox id (`sbx-…`)"), ("path" = String, Query, description = "Absolute path inside the sandbox"), ("username" = Option<String>, Query, description = "User the call acts as; default `user`")),
    responses((status = 200, description = "The file's bytes (also at `/files/raw`)", content_type = "application/octet-stream", body = Vec<u8>), (status = 400, description = "Malformed request", body = crate::views::ErrorView), (status = 401, description = "Missing or invalid API key", body = crate::views::ErrorView), (status = 404, description = "Unknown, or another owner's", body = crate::views::ErrorView), (status = 410, description = "The sandbox was killed", body = crate::views::ErrorView))
)]
pub async fn read(
    SandboxAgent(agent): SandboxAgent,
    Query(params): Query<PathParams>,
) -> ApiResult<Response> {
    let stream = agent.read_file(params.path()?, params.user()).await?;
    let body = Body::from_stream(stream.map(|chunk| chunk.map_err(std::io::Error::other)));
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], body).into_response())
}

#[derive(Deserialize, ToSchema)]
pub struct WriteBody {
    path: String,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    data: String,
}

#[utoipa::path(
    get, path = "/sandboxes/{id}/files/raw", tag = "files",
    params(("id" = String, Path, description = "Sandbox id (`sbx-…`)"), ("path" = String, Query, description = "Absolute path inside the sandbox"), ("username" = Option<String>, Query, description = "User the call acts as; default `user`")),
    responses((status = 200, description = "The file's bytes", content_type = "application/octet-stream", body = Vec<u8>), (status = 404, description = "No such file, or no such sandbox", body = crate::views::ErrorView))
)]
pub async fn read_raw(agent: SandboxAgent, params: Query<PathParams>) -> ApiResult<Response> {
    read(agent, params).await
}

#[utoipa::path(
    post, path = "/sandboxes/{id}/files", tag = "files", params(("id" = String, Path, description = "Sandbox id (`sbx-…`)")),
    request_body = WriteBody,
    responses((status = 200, description = "Written", body = WrittenFileView), (status = 400, description = "Malformed request", body = crate::views::ErrorView), (status = 401, description = "Missing or invalid API key", body = crate::views::ErrorView), (status = 404, description = "Unknown, or another owner's", body = crate::views::ErrorView), (status = 410, description = "The sandbox was killed", body = crate::views::ErrorView))
)]
pub async fn write(
    SandboxAgent(agent): SandboxAgent,
    JsonBody(body): JsonBody<WriteBody>,
) -> ApiResult<Json<WrittenFileView>> {
    let info = agent
        .write_bytes(
            &body.path,
            user_or_default(&body.username),
            body.data.into_bytes(),
        )
        .await?;
    Ok(Json(info.into()))
}

#[utoipa::path(
    put, path = "/sandboxes/{id}/files/raw", tag = "files", params(("id" = String, Path, description = "Sandbox id (`sbx-…`)"), ("path" = String, Query, description = "Absolute path inside the sandbox"), ("username" = Option<String>, Query, description = "User the call acts as; default `user`")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "The file's bytes, streamed (at most 500 MiB)"),
    responses((status = 200, description = "Written", body = WrittenFileView), (status = 400, description = "Malformed request", body = crate::views::ErrorView), (status = 401, description = "Missing or invalid API key", body = crate::views::ErrorView), (status = 404, description = "Unknown, or another owner's", body = crate::views::ErrorView), (status = 410, description = "The sandbox was killed", body = crate::views::ErrorView), (status = 413, description = "Body or quota too large", body = crate::views::ErrorView))
)]
pub async fn write_raw(
    SandboxAgent(agent): SandboxAgent,
    Query(params): Query<PathParams>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<WrittenFileView>> {
    let path = params.path()?.to_string();
    let too_large = || {
        ApiError::PayloadTooLarge(format!(
            "file uploads are limited to {RAW_FILE_LIMIT} bytes"
        ))
    };
    if super::declared_length(&headers).is_some_and(|len| len > RAW_FILE_LIMIT) {
        return Err(too_large());
    }
    // Count as we stream: a chunked body has no declared length. The flag,
    // not the error text, tells our cut from any other failed write.
    let mut seen = 0u64;
    let cut = Arc::new(AtomicBool::new(false));
    let cut_here = cut.clone();
    let capped = body.into_data_stream().map(move |chunk| {
        let chunk = chunk.map_err(std::io::Error::other)?;
        seen += chunk.len() as u64;
        if seen > RAW_FILE_LIMIT {
            cut_here.store(true, Ordering::Relaxed);
            return Err(std::io::Error::other("file too large"));
        }
        Ok::<_, std::io::Error>(chunk)
    });
    match agent.write_file(&path, params.user(), None, capped).await {
        Ok(info) => Ok(Json(info.into())),
        Err(_) if cut.load(Ordering::Relaxed) => {
            let _ = agent.remove(&path, params.user()).await;
            Err(too_large())
        }
        Err(e) => Err(e.into()),
    }
}

#[derive(Deserialize, ToSchema)]
pub struct BatchFile {
    path: String,
    #[serde(default)]
    data: String,
}

#[derive(Deserialize, ToSchema)]
pub struct BatchBody {
    files: Vec<BatchFile>,
    #[serde(default)]
    username: Option<String>,
}

#[utoipa::path(
    post, path = "/sandboxes/{id}/files/batch", tag = "files", params(("id" = String, Path, description = "Sandbox id (`sbx-…`)")),
    request_body = BatchBody,
    responses((status = 200, description = "One entry per file, in input order", body = Vec<WrittenFileView>), (status = 400, description = "Malformed request", body = crate::views::ErrorView), (status = 401, description = "Missing or invalid API key", body = crate::views::ErrorView), (status = 404, description = "Unknown, or another owner's", body = crate::views::ErrorView), (status = 410, description = "The sandbox was killed", body = crate::views::ErrorView))
)]
pub async fn write_batch(
    State(state): State<AppState>,
    SandboxAgent(agent): SandboxAgent,
    JsonBody(body): JsonBody<BatchBody>,
) -> ApiResult<Json<Vec<WrittenFileView>>> {
    let cap = state.config.http.max_list_items;
    if body.files.len() > cap {
        return Err(ApiError::BadRequest(format!(
            "a batch holds at most {cap} files, got {}",
            body.files.len()
        )));
    }
    let user = user_or_default(&body.username);
    let agent = &agent;
    let writes = body.files.into_iter().map(|file| async move {
        agent
            .write_bytes(&file.path, user, file.data.into_bytes())
            .await
    });
    // A few at a time over the sandbox's agent connections, not one
    // connection per file; results in input order (the Python SDK zips
    // them back onto its inputs).
    let mut results = futures::stream::iter(writes).buffered(BATCH_CONCURRENCY);
    let mut written = Vec::new();
    while let Some(result) = results.next().await {
        written.push(WrittenFileView::from(result?));
    }
    Ok(Json(written))
}

#[utoipa::path(
    get, path = "/sandboxes/{id}/files/list", tag = "files",
    params(("id" = String, Path, description = "Sandbox id (`sbx-…`)"), ("path" = String, Query, description = "Absolute path inside the sandbox"), ("username" = Option<String>, Query, description = "User the call acts as; default `user`"), ("depth" = Option<u32>, Query, description = "Levels to descend (1)")),
    responses((status = 200, description = "Entries", body = Vec<EntryView>), (status = 400, description = "Malformed request", body = crate::views::ErrorView), (status = 401, description = "Missing or invalid API key", body = crate::views::ErrorView), (status = 404, description = "Unknown, or another owner's", body = crate::views::ErrorView), (status = 410, description = "The sandbox was killed", body = crate::views::ErrorView))
)]
pub async fn list(
    SandboxAgent(agent): SandboxAgent,
    Query(params): Query<PathParams>,
) -> ApiResult<Json<Vec<EntryView>>> {
    let entries = agent
        .list(
            params.path()?,
            params.user(),
            params.depth.unwrap_or(1).max(1),
        )
        .await?;
    Ok(Json(entries.into_iter().map(EntryView::from).collect()))
}

#[utoipa::path(
    get, path = "/sandboxes/{id}/files/exists", tag = "files", params(("id" = String, Path, description = "Sandbox id (`sbx-…`)"), ("path" = String, Query, description = "Absolute path inside the sandbox"), ("username" = Option<String>, Query, description = "User the call acts as; default `user`")),
    responses((status = 200, description = "Whether the path exists", body = ExistsView), (status = 400, description = "Malformed request", body = crate::views::ErrorView), (status = 401, description = "Missing or invalid API key", body = crate::views::ErrorView), (status = 404, description = "Unknown, or another owner's", body = crate::views::ErrorView), (status = 410, description = "The sandbox was killed", body = crate::views::ErrorView))
)]
pub async fn exists(
    SandboxAgent(agent): SandboxAgent,
    Query(params): Query<PathParams>,
) -> ApiResult<Json<ExistsView>> {
    let exists = agent.exists(params.path()?, params.user()).await?;
    Ok(Json(ExistsView { exists }))
}

#[utoipa::path(
    get, path = "/sandboxes/{id}/files/info", tag = "files", params(("id" = String, Path, description = "Sandbox id (`sbx-…`)"), ("path" = String, Query, description = "Absolute path inside the sandbox"), ("username" = Option<String>, Query, description = "User the call acts as; default `user`")),
    responses((status = 200, description = "The entry", body = EntryView), (status = 400, description = "Malformed request", body = crate::views::ErrorView), (status = 401, description = "Missing or invalid API key", body = crate::views::ErrorView), (status = 404, description = "Unknown, or another owner's", body = crate::views::ErrorView), (status = 410, description = "The sandbox was killed", body = crate::views::ErrorView))
)]
pub async fn info(
    SandboxAgent(agent): SandboxAgent,
    Query(params): Query<PathParams>,
) -> ApiResult<Json<EntryView>> {
    Ok(Json(
        agent.stat(params.path()?, params.user()).await?.into(),
    ))
}

#[utoipa::path(
    delete, path = "/sandboxes/{id}/files", tag = "files", params(("id" = String, Path, description = "Sandbox id (`sbx-…`)"), ("path" = String, Query, description = "Absolute path inside the sandbox"), ("username" = Option<String>, Query, description = "User the call acts as; default `user`")),
    responses((status = 200, description = "Removed", body = EmptyView), (status = 400, description = "Malformed request", body = crate::views::ErrorView), (status = 401, description = "Missing or invalid API key", body = crate::views::ErrorView), (status = 404, description = "Unknown, or another owner's", body = crate::views::ErrorView), (status = 410, description = "The sandbox was killed", body = crate::views::ErrorView))
)]
pub async fn remove(
    SandboxAgent(agent): SandboxAgent,
    Query(params): Query<PathParams>,
) -> ApiResult<Json<EmptyView>> {
    agent.remove(params.path()?, params.user()).await?;
    Ok(Json(EmptyView {}))
}

#[derive(Deserialize, ToSchema)]
pub struct RenameBody {
    old_path: String,
    new_path: String,
    #[serde(default)]
    username: Option<String>,
}

#[utoipa::path(
    patch, path = "/sandboxes/{id}/files", tag = "files", params(("id" = String, Path, description = "Sandbox id (`sbx-…`)")),
    request_body = RenameBody,
    responses((status = 200, description = "The entry at its new path", body = EntryView), (status = 400, description = "Malformed request", body = crate::views::ErrorView), (status = 401, description = "Missing or invalid API key", body = crate::views::ErrorView), (status = 404, description = "Unknown, or another owner's", body = crate::views::ErrorView), (status = 410, description = "The sandbox was killed", body = crate::views::ErrorView))
)]
pub async fn rename(
    SandboxAgent(agent): SandboxAgent,
    JsonBody(body): JsonBody<RenameBody>,
) -> ApiResult<Json<EntryView>> {
    let entry = agent
        .rename(
            &body.old_path,
            &body.new_path,
            user_or_default(&body.username),
        )
        .await?;
    Ok(Json(entry.into()))
}

#[derive(Deserialize, ToSchema)]
pub struct MkdirBody {
    path: String,
    #[serde(default)]
    username: Option<String>,
}

#[utoipa::path(
    post, path = "/sandboxes/{id}/files/mkdir", tag = "files", params(("id" = String, Path, description = "Sandbox id (`sbx-…`)")),
    request_body = MkdirBody,
    responses((status = 200, description = "`created` false when it existed", body = CreatedView), (status = 400, description = "Malformed request", body = crate::views::ErrorView), (status = 401, description = "Missing or invalid API key", body = crate::views::ErrorView), (status = 404, description = "Unknown, or another owner's", body = crate::views::ErrorView), (status = 410, description = "The sandbox was killed", body = crate::views::ErrorView))
)]
pub async fn mkdir(
    SandboxAgent(agent): SandboxAgent,
    JsonBody(body): JsonBody<MkdirBody>,
) -> ApiResult<Json<CreatedView>> {
    let created = agent
        .mkdir(&body.path, user_or_default(&body.username))
        .await?;
    Ok(Json(CreatedView { created }))
}

/// Accepted for SDK compatibility (for a running sandbox of the caller's);
/// no events are delivered (as upstream).
#[utoipa::path(
    post, path = "/sandboxes/{id}/files/watch", tag = "files", params(("id" = String, Path, description = "Sandbox id (`sbx-…`)")),
    responses((status = 200, description = "Accepted; no events are delivered", body = EmptyView), (status = 401, description = "Missing or invalid API key", body = crate::views::ErrorView), (status = 404, description = "Unknown, or another owner's", body = crate::views::ErrorView), (status = 410, description = "The sandbox was killed", body = crate::views::ErrorView))
)]
pub async fn watch(SandboxAgent(_): SandboxAgent) -> ApiResult<Json<EmptyView>> {
    Ok(Json(EmptyView {}))
}
