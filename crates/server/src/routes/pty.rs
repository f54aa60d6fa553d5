//! `/sandboxes/{id}/pty`: interactive terminals. The agent runs a login
//! shell on a real pseudo-terminal; this relays its output as SSE (raw
//! bytes, base64), its input (UTF-8 text), window resizes and the kill.

use crate::error::{ApiError, ApiResult};
use crate::extract::SandboxAgent;
use crate::json::JsonBody;
use crate::routes::commands::{async_stream, kill_pid, parse_pid};
use crate::views::{KilledView, StartedView};
use axum::extract::Path;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use envd_protocol::{PtyEvent, PtyRequest, PtySize};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Duration;
use utoipa::ToSchema;

/// A terminal lives at most this long (the SDKs default to an hour).
const MAX_PTY_SECS: f64 = 24.0 * 3600.0;
const DEFAULT_PTY_SECS: u64 = 3600;
/// Window sizes past this are nonsense (and large allocations in TUIs).
const MAX_DIMENSION: u16 = 1000;

#[derive(Deserialize, ToSchema)]
pub struct SizeBody {
    cols: u16,
    rows: u16,
}

impl SizeBody {
    fn parse(&self) -> ApiResult<PtySize> {
        let ok = |n: u16| (1..=MAX_DIMENSION).contains(&n);
        if !ok(self.cols) || !ok(self.rows) {
            return Err(ApiError::BadRequest(format!(
                "size must be 1..={MAX_DIMENSION} columns and rows"
            )));
        }
        Ok(PtySize {
            cols: self.cols,
            rows: self.rows,
        })
    }
}

#[derive(Deserialize, ToSchema)]
pub struct PtyBody {
    size: SizeBody,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    cwd: Option<String>,
    #[serde(default)]
    envs: Option<BTreeMap<String, String>>,
    /// Seconds the shell may run (default 3600, at most a day).
    #[serde(default)]
    timeout: Option<f64>,
}

#[utoipa::path(
    post, path = "/sandboxes/{id}/pty", tag = "commands", params(("id" = String, Path, description = "Sandbox id (`sbx-…`)")),
    request_body = PtyBody,
    responses((status = 200, description = "A login shell started on a new pseudo-terminal", body = StartedView), (status = 400, description = "Malformed request", body = crate::views::ErrorView), (status = 401, description = "Missing or invalid API key", body = crate::views::ErrorView), (status = 404, description = "Unknown, or another owner's", body = crate::views::ErrorView), (status = 410, description = "The sandbox was killed", body = crate::views::ErrorView))
)]
pub async fn create(
    SandboxAgent(agent): SandboxAgent,
    JsonBody(body): JsonBody<PtyBody>,
) -> ApiResult<Json<StartedView>> {
    let timeout = match body.timeout {
        None => DEFAULT_PTY_SECS,
        Some(t) if t.is_finite() && t > 0.0 => t.min(MAX_PTY_SECS).ceil() as u64,
        Some(_) => MAX_PTY_SECS as u64,
    };
    let request = PtyRequest {
        user: body
            .user
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| "user".into()),
        cwd: body.cwd.filter(|c| !c.is_empty()),
        envs: body.envs.unwrap_or_default(),
        size: body.size.parse()?,
        timeout: Some(timeout),
    };
    let pid = agent.pty_start(&request).await?;
    Ok(Json(StartedView { pid }))
}

#[utoipa::path(
    get, path = "/sandboxes/{id}/pty/{pid}/stream", tag = "commands", params(("id" = String, Path, description = "Sandbox id (`sbx-…`)"), ("pid" = u32, Path, description = "The terminal's pid")),
    responses((status = 200, description = "Server-Sent Events: `data` (`{\"data\": base64}`) as output arrives (the first listener also gets what came before it), then `exit` (`{\"exit_code\"}`)", content_type = "text/event-stream", body = String), (status = 400, description = "Malformed request", body = crate::views::ErrorView), (status = 401, description = "Missing or invalid API key", body = crate::views::ErrorView), (status = 404, description = "No such sandbox or terminal", body = crate::views::ErrorView), (status = 410, description = "The sandbox was killed", body = crate::views::ErrorView))
)]
pub async fn stream(
    SandboxAgent(agent): SandboxAgent,
    Path((_, pid)): Path<(String, String)>,
) -> ApiResult<Response> {
    let mut events = agent.pty_stream(parse_pid(&pid)?).await?;
    let sse = async_stream(move |tx| async move {
        while let Some(event) = events.next().await {
            let event = match event {
                Ok(PtyEvent::Data { data }) => Event::default()
                    .event("data")
                    .data(json!({ "data": data }).to_string()),
                Ok(PtyEvent::Exit { exit_code }) => {
                    let last = Event::default()
                        .event("exit")
                        .data(json!({ "exit_code": exit_code }).to_string());
                    let _ = tx.send(last).await;
                    return;
                }
                Ok(PtyEvent::Keepalive) => continue,
                Err(e) => Event::default()
                    .event("error")
                    .data(json!({ "error": e.to_string() }).to_string()),
            };
            if tx.send(event).await.is_err() {
                return;
            }
        }
    });
    let keep_alive = KeepAlive::new()
        .interval(Duration::from_secs(10))
        .text(" ping");
    Ok(Sse::new(sse).keep_alive(keep_alive).into_response())
}

#[derive(Deserialize, ToSchema)]
pub struct InputBody {
    /// UTF-8 text typed into the terminal (not base64).
    data: String,
}

#[utoipa::path(
    post, path = "/sandboxes/{id}/pty/{pid}/stdin", tag = "commands", params(("id" = String, Path, description = "Sandbox id (`sbx-…`)"), ("pid" = u32, Path, description = "The terminal's pid")),
    request_body = InputBody,
    responses((status = 200, description = "Typed", body = crate::views::EmptyView), (status = 400, description = "Malformed request", body = crate::views::ErrorView), (status = 401, description = "Missing or invalid API key", body = crate::views::ErrorView), (status = 404, description = "No such sandbox or terminal", body = crate::views::ErrorView), (status = 410, description = "The sandbox was killed", body = crate::views::ErrorView))
)]
pub async fn input(
    SandboxAgent(agent): SandboxAgent,
    Path((_, pid)): Path<(String, String)>,
    JsonBody(body): JsonBody<InputBody>,
) -> ApiResult<Json<crate::views::EmptyView>> {
    agent.write_stdin(parse_pid(&pid)?, &body.data).await?;
    Ok(Json(crate::views::EmptyView {}))
}

#[derive(Deserialize, ToSchema)]
pub struct ResizeBody {
    size: SizeBody,
}

#[utoipa::path(
    patch, path = "/sandboxes/{id}/pty/{pid}", tag = "commands", params(("id" = String, Path, description = "Sandbox id (`sbx-…`)"), ("pid" = u32, Path, description = "The terminal's pid")),
    request_body = ResizeBody,
    responses((status = 200, description = "Resized (the shell gets SIGWINCH)", body = crate::views::EmptyView), (status = 400, description = "Malformed request", body = crate::views::ErrorView), (status = 401, description = "Missing or invalid API key", body = crate::views::ErrorView), (status = 404, description = "No such sandbox or terminal", body = crate::views::ErrorView), (status = 410, description = "The sandbox was killed", body = crate::views::ErrorView))
)]
pub async fn resize(
    SandboxAgent(agent): SandboxAgent,
    Path((_, pid)): Path<(String, String)>,
    JsonBody(body): JsonBody<ResizeBody>,
) -> ApiResult<Json<crate::views::EmptyView>> {
    agent
        .pty_resize(parse_pid(&pid)?, body.size.parse()?)
        .await?;
    Ok(Json(crate::views::EmptyView {}))
}

#[utoipa::path(
    delete, path = "/sandboxes/{id}/pty/{pid}", tag = "commands", params(("id" = String, Path, description = "Sandbox id (`sbx-…`)"), ("pid" = u32, Path, description = "The terminal's pid")),
    responses((status = 200, description = "`killed` false when there is no such terminal", body = KilledView), (status = 400, description = "Malformed request", body = crate::views::ErrorView), (status = 401, description = "Missing or invalid API key", body = crate::views::ErrorView), (status = 404, description = "Unknown, or another owner's", body = crate::views::ErrorView), (status = 410, description = "The sandbox was killed", body = crate::views::ErrorView))
)]
pub async fn kill(
    SandboxAgent(agent): SandboxAgent,
    Path((_, pid)): Path<(String, String)>,
) -> ApiResult<Json<KilledView>> {
    kill_pid(&agent, parse_pid(&pid)?).await
}
