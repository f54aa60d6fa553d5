//! `/sandboxes/{id}/files`: everything goes through the sandbox's envd.

use crate::app::AppState;
use crate::error::{ApiError, ApiResult};
use crate::extract::SandboxAgent;
use crate::timefmt::iso_utc;
use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::Json;
use envd_protocol::types::EntryInfo;
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};

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

fn entry_json(entry: EntryInfo) -> Value {
    let modified = chrono::DateTime::from_timestamp(entry.mtime, 0).map(iso_utc);
    json!({
        "name": entry.name,
        "path": entry.path,
        "type": entry.file_type,
        "size": if entry.file_type == envd_protocol::types::FileType::Dir { 0 } else { entry.size },
        "mode": entry.mode,
        "modified": modified,
    })
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> ApiResult<T> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))
}

pub async fn read(
    SandboxAgent(agent): SandboxAgent,
    Query(params): Query<PathParams>,
) -> ApiResult<Response> {
    let stream = agent.read_file(params.path()?, params.user()).await?;
    let body = Body::from_stream(stream.map(|chunk| chunk.map_err(std::io::Error::other)));
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], body).into_response())
}

#[derive(Deserialize)]
struct WriteBody {
    path: String,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    data: String,
}

pub async fn write(SandboxAgent(agent): SandboxAgent, body: Bytes) -> ApiResult<Json<Value>> {
    let body: WriteBody = parse_json(&body)?;
    let info = agent
        .write_bytes(
            &body.path,
            user_or_default(&body.username),
            body.data.into_bytes(),
        )
        .await?;
    Ok(Json(json!({ "path": info.path, "size": info.size })))
}

pub async fn write_raw(
    SandboxAgent(agent): SandboxAgent,
    Query(params): Query<PathParams>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<Value>> {
    let path = params.path()?.to_string();
    let too_large = || {
        ApiError::PayloadTooLarge(format!(
            "file uploads are limited to {RAW_FILE_LIMIT} bytes"
        ))
    };
    if super::declared_length(&headers).is_some_and(|len| len > RAW_FILE_LIMIT) {
        return Err(too_large());
    }
    // Count as we stream: a chunked body has no declared length.
    let mut seen = 0u64;
    let capped = body.into_data_stream().map(move |chunk| {
        let chunk = chunk.map_err(std::io::Error::other)?;
        seen += chunk.len() as u64;
        if seen > RAW_FILE_LIMIT {
            return Err(std::io::Error::other("file too large"));
        }
        Ok::<_, std::io::Error>(chunk)
    });
    match agent.write_file(&path, params.user(), None, capped).await {
        Ok(info) => Ok(Json(json!({ "path": info.path, "size": info.size }))),
        Err(e) if e.to_string().contains("file too large") => {
            let _ = agent.remove(&path, params.user()).await;
            Err(too_large())
        }
        Err(e) => Err(e.into()),
    }
}

#[derive(Deserialize)]
struct BatchFile {
    path: String,
    #[serde(default)]
    data: String,
}

#[derive(Deserialize)]
struct BatchBody {
    files: Vec<BatchFile>,
    #[serde(default)]
    username: Option<String>,
}

pub async fn write_batch(
    State(state): State<AppState>,
    SandboxAgent(agent): SandboxAgent,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    let body: BatchBody = parse_json(&body)?;
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
    let mut infos = Vec::new();
    while let Some(result) = results.next().await {
        let info = result?;
        infos.push(json!({ "path": info.path, "size": info.size }));
    }
    Ok(Json(Value::Array(infos)))
}

pub async fn list(
    SandboxAgent(agent): SandboxAgent,
    Query(params): Query<PathParams>,
) -> ApiResult<Json<Value>> {
    let entries = agent
        .list(
            params.path()?,
            params.user(),
            params.depth.unwrap_or(1).max(1),
        )
        .await?;
    Ok(Json(Value::Array(
        entries.into_iter().map(entry_json).collect(),
    )))
}

pub async fn exists(
    SandboxAgent(agent): SandboxAgent,
    Query(params): Query<PathParams>,
) -> ApiResult<Json<Value>> {
    let exists = agent.exists(params.path()?, params.user()).await?;
    Ok(Json(json!({ "exists": exists })))
}

pub async fn info(
    SandboxAgent(agent): SandboxAgent,
    Query(params): Query<PathParams>,
) -> ApiResult<Json<Value>> {
    Ok(Json(entry_json(
        agent.stat(params.path()?, params.user()).await?,
    )))
}

pub async fn remove(
    SandboxAgent(agent): SandboxAgent,
    Query(params): Query<PathParams>,
) -> ApiResult<Json<Value>> {
    agent.remove(params.path()?, params.user()).await?;
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
struct RenameBody {
    old_path: String,
    new_path: String,
    #[serde(default)]
    username: Option<String>,
}

pub async fn rename(SandboxAgent(agent): SandboxAgent, body: Bytes) -> ApiResult<Json<Value>> {
    let body: RenameBody = parse_json(&body)?;
    let entry = agent
        .rename(
            &body.old_path,
            &body.new_path,
            user_or_default(&body.username),
        )
        .await?;
    Ok(Json(entry_json(entry)))
}

#[derive(Deserialize)]
struct MkdirBody {
    path: String,
    #[serde(default)]
    username: Option<String>,
}

pub async fn mkdir(SandboxAgent(agent): SandboxAgent, body: Bytes) -> ApiResult<Json<Value>> {
    let body: MkdirBody = parse_json(&body)?;
    let created = agent
        .mkdir(&body.path, user_or_default(&body.username))
        .await?;
    Ok(Json(json!({ "created": created })))
}

/// Accepted for SDK compatibility (for a running sandbox of the caller's);
/// no events are delivered (as upstream).
pub async fn watch(SandboxAgent(_): SandboxAgent) -> ApiResult<Json<Value>> {
    Ok(Json(json!({})))
}
