//! `/sandboxes/{id}/commands`: run (foreground or background), list, wait,
//! stdin, kill, and streamed output as Server-Sent Events.

use crate::error::{ApiError, ApiResult};
use crate::extract::SandboxAgent;
use crate::json::JsonBody;
use crate::views::{EmptyView, KilledView, ProcessView, RunAnswerView, RunResultView, StartedView};
use axum::extract::Path;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use envd_protocol::types::{ProcessEvent, ProcessRequest};
use futures::{Stream, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::time::Duration;
use utoipa::ToSchema;

#[derive(Deserialize, ToSchema)]
pub struct RunBody {
    cmd: String,
    #[serde(default)]
    background: bool,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    envs: Option<BTreeMap<String, String>>,
    #[serde(default)]
    cwd: Option<String>,
    #[serde(default)]
    timeout: Option<u64>,
    /// The SDK sends this to reserve a stdin pipe for background commands.
    #[serde(default)]
    stdin: Option<Value>,
}

fn parse_run(body: RunBody) -> ApiResult<(ProcessRequest, bool)> {
    if body.cmd.trim().is_empty() {
        return Err(ApiError::BadRequest("cmd must not be empty".into()));
    }
    let request = ProcessRequest {
        cmd: body.cmd,
        user: body
            .user
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| "user".into()),
        cwd: body.cwd.filter(|c| !c.is_empty()),
        envs: body.envs.unwrap_or_default(),
        timeout: body.timeout,
        stdin: body
            .stdin
            .is_some_and(|v| !v.is_null() && v != Value::Bool(false)),
    };
    Ok((request, body.background))
}

pub(crate) fn parse_pid(pid: &str) -> ApiResult<u32> {
    pid.parse()
        .map_err(|_| ApiError::BadRequest(format!("pid must be an integer, got {pid:?}")))
}

#[utoipa::path(
    post, path = "/sandboxes/{id}/commands", tag = "commands", params(("id" = String, Path, description = "Sandbox id (`sbx-…`)")),
    request_body = RunBody,
    responses((status = 200, description = "Finished, or with `background` started", body = RunAnswerView), (status = 400, description = "Malformed request", body = crate::views::ErrorView), (status = 401, description = "Missing or invalid API key", body = crate::views::ErrorView), (status = 404, description = "Unknown, or another owner's", body = crate::views::ErrorView), (status = 410, description = "The sandbox was killed", body = crate::views::ErrorView), (status = 502, description = "The sandbox agent failed", body = crate::views::ErrorView))
)]
pub async fn run(
    SandboxAgent(agent): SandboxAgent,
    JsonBody(body): JsonBody<RunBody>,
) -> ApiResult<Json<RunAnswerView>> {
    let (request, background) = parse_run(body)?;
    if background {
        let pid = agent.start(&request).await?;
        return Ok(Json(RunAnswerView::Started(StartedView { pid })));
    }
    let result = agent.run(&request).await?;
    Ok(Json(RunAnswerView::Finished(result.into())))
}

#[utoipa::path(
    get, path = "/sandboxes/{id}/commands", tag = "commands", params(("id" = String, Path, description = "Sandbox id (`sbx-…`)")),
    responses((status = 200, description = "Running commands", body = Vec<ProcessView>), (status = 401, description = "Missing or invalid API key", body = crate::views::ErrorView), (status = 404, description = "Unknown, or another owner's", body = crate::views::ErrorView), (status = 410, description = "The sandbox was killed", body = crate::views::ErrorView))
)]
pub async fn list(SandboxAgent(agent): SandboxAgent) -> ApiResult<Json<Vec<ProcessView>>> {
    let processes = agent
        .list_processes()
        .await?
        .into_iter()
        .filter(|p| p.running)
        .map(|p| ProcessView {
            pid: p.pid,
            cmd: p.cmd,
            is_pty: false,
            envs: p.envs,
        })
        .collect();
    Ok(Json(processes))
}

#[utoipa::path(
    get, path = "/sandboxes/{id}/commands/{pid}/wait", tag = "commands", params(("id" = String, Path, description = "Sandbox id (`sbx-…`)"), ("pid" = u32, Path, description = "Process id inside the sandbox")),
    responses((status = 200, description = "Its result once it exits", body = RunResultView), (status = 400, description = "Malformed request", body = crate::views::ErrorView), (status = 401, description = "Missing or invalid API key", body = crate::views::ErrorView), (status = 404, description = "Unknown, or another owner's", body = crate::views::ErrorView), (status = 410, description = "The sandbox was killed", body = crate::views::ErrorView))
)]
pub async fn wait(
    SandboxAgent(agent): SandboxAgent,
    Path((_, pid)): Path<(String, String)>,
) -> ApiResult<Json<RunResultView>> {
    let pid = parse_pid(&pid)?;
    Ok(Json(RunResultView::from(agent.wait(pid).await?)))
}

#[derive(Deserialize, ToSchema)]
pub struct StdinBody {
    data: String,
}

#[utoipa::path(
    post, path = "/sandboxes/{id}/commands/{pid}/stdin", tag = "commands", params(("id" = String, Path, description = "Sandbox id (`sbx-…`)"), ("pid" = u32, Path, description = "Process id inside the sandbox")),
    request_body = StdinBody,
    responses((status = 200, description = "Written", body = EmptyView), (status = 400, description = "Malformed request", body = crate::views::ErrorView), (status = 401, description = "Missing or invalid API key", body = crate::views::ErrorView), (status = 404, description = "Unknown, or another owner's", body = crate::views::ErrorView), (status = 410, description = "The sandbox was killed", body = crate::views::ErrorView))
)]
pub async fn stdin(
    SandboxAgent(agent): SandboxAgent,
    Path((_, pid)): Path<(String, String)>,
    JsonBody(body): JsonBody<StdinBody>,
) -> ApiResult<Json<EmptyView>> {
    let pid = parse_pid(&pid)?;
    agent.write_stdin(pid, &body.data).await?;
    Ok(Json(EmptyView {}))
}

#[utoipa::path(
    delete, path = "/sandboxes/{id}/commands/{pid}", tag = "commands", params(("id" = String, Path, description = "Sandbox id (`sbx-…`)"), ("pid" = u32, Path, description = "Process id inside the sandbox")),
    responses((status = 200, description = "`killed` false when the pid is not tracked", body = KilledView), (status = 400, description = "Malformed request", body = crate::views::ErrorView), (status = 401, description = "Missing or invalid API key", body = crate::views::ErrorView), (status = 404, description = "Unknown, or another owner's", body = crate::views::ErrorView), (status = 410, description = "The sandbox was killed", body = crate::views::ErrorView))
)]
pub async fn kill(
    SandboxAgent(agent): SandboxAgent,
    Path((_, pid)): Path<(String, String)>,
) -> ApiResult<Json<KilledView>> {
    kill_pid(&agent, parse_pid(&pid)?).await
}

/// Kills a process (or terminal) group; a pid the agent does not track is
/// `killed: false`, not an error.
pub(crate) async fn kill_pid(
    agent: &envd_protocol::client::EnvdClient,
    pid: u32,
) -> ApiResult<Json<KilledView>> {
    let killed = match agent.kill(pid).await {
        Ok(killed) => killed,
        Err(e) if e.status() == Some(404) => false,
        Err(e) => return Err(e.into()),
    };
    Ok(Json(KilledView { killed }))
}

/// Longest line sent as one event; a longer one is split into several.
/// Bounds what one event (and the JSON escaping of its NULs) can weigh.
const MAX_LINE_BYTES: usize = 16 * 1024;

/// Splits output into lines without their newline: the Python SDK joins
/// stream chunks with "\n" (the SDKs' SSE parsers), so a chunk must be one
/// line. Each byte is scanned once and the held partial line never exceeds
/// [`MAX_LINE_BYTES`], whatever the command prints.
#[derive(Default)]
struct LineSplitter {
    partial: String,
}

impl LineSplitter {
    fn push(&mut self, data: &str) -> Vec<String> {
        let mut lines = Vec::new();
        let mut rest = data;
        while let Some(end) = rest.find('\n') {
            self.append(&rest[..end], &mut lines);
            lines.push(std::mem::take(&mut self.partial));
            rest = &rest[end + 1..];
        }
        self.append(rest, &mut lines);
        lines
    }

    /// Adds `text` to the partial line, emitting full-size pieces as it fills.
    fn append(&mut self, mut text: &str, lines: &mut Vec<String>) {
        while self.partial.len() + text.len() > MAX_LINE_BYTES {
            let mut cut = MAX_LINE_BYTES - self.partial.len();
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            self.partial.push_str(&text[..cut]);
            lines.push(std::mem::take(&mut self.partial));
            text = &text[cut..];
        }
        self.partial.push_str(text);
    }

    fn flush(&mut self) -> Option<String> {
        (!self.partial.is_empty()).then(|| std::mem::take(&mut self.partial))
    }
}

fn output_event(stream: &str, line: String) -> Event {
    Event::default()
        .event(stream)
        .data(json!({ "type": stream, "stream": stream, "data": line }).to_string())
}

/// Turns agent process events into the SSE events every SDK parses.
fn sse_events(
    mut events: impl Stream<Item = Result<ProcessEvent, envd_protocol::client::EnvdError>>
        + Unpin
        + Send
        + 'static,
) -> impl Stream<Item = Result<Event, Infallible>> {
    async_stream(move |tx| async move {
        let (mut out, mut err) = (LineSplitter::default(), LineSplitter::default());
        while let Some(event) = events.next().await {
            let sent = match event {
                Ok(ProcessEvent::Stdout { data }) => out
                    .push(&data)
                    .into_iter()
                    .map(|l| output_event("stdout", l))
                    .collect(),
                Ok(ProcessEvent::Stderr { data }) => err
                    .push(&data)
                    .into_iter()
                    .map(|l| output_event("stderr", l))
                    .collect(),
                Ok(ProcessEvent::Exit {
                    exit_code,
                    timed_out,
                }) => {
                    let mut last: Vec<Event> = Vec::new();
                    last.extend(out.flush().map(|l| output_event("stdout", l)));
                    last.extend(err.flush().map(|l| output_event("stderr", l)));
                    last.push(Event::default().event("exit").data(
                        json!({ "exit_code": exit_code, "timed_out": timed_out }).to_string(),
                    ));
                    for event in last {
                        if tx.send(event).await.is_err() {
                            return;
                        }
                    }
                    return;
                }
                Ok(ProcessEvent::Error { message }) => {
                    vec![Event::default()
                        .event("error")
                        .data(json!({ "error": message }).to_string())]
                }
                Ok(ProcessEvent::Start { .. } | ProcessEvent::Keepalive) => Vec::new(),
                Err(e) => vec![Event::default()
                    .event("error")
                    .data(json!({ "error": e.to_string() }).to_string())],
            };
            for event in sent {
                if tx.send(event).await.is_err() {
                    return;
                }
            }
        }
    })
}

/// A stream fed by a task, so the translation can be written as a loop.
pub(crate) fn async_stream<F, Fut>(produce: F) -> impl Stream<Item = Result<Event, Infallible>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Event>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(produce(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok)
}

#[utoipa::path(
    post, path = "/sandboxes/{id}/commands/stream", tag = "commands", params(("id" = String, Path, description = "Sandbox id (`sbx-…`)")),
    request_body = RunBody,
    responses((status = 200, description = "Server-Sent Events: `stdout`/`stderr` (`{\"type\",\"stream\",\"data\"}`, one line each), then `exit` (`{\"exit_code\",\"timed_out\"}`) or `error` (`{\"error\"}`)", content_type = "text/event-stream", body = String), (status = 400, description = "Malformed request", body = crate::views::ErrorView), (status = 401, description = "Missing or invalid API key", body = crate::views::ErrorView), (status = 404, description = "Unknown, or another owner's", body = crate::views::ErrorView), (status = 410, description = "The sandbox was killed", body = crate::views::ErrorView))
)]
pub async fn stream(
    SandboxAgent(agent): SandboxAgent,
    JsonBody(body): JsonBody<RunBody>,
) -> ApiResult<Response> {
    let (request, _) = parse_run(body)?;
    let events = agent.stream(&request).await?;
    // Comments keep the SDK's read timeout (the command timeout, or 60 s) fed.
    let keep_alive = KeepAlive::new()
        .interval(Duration::from_secs(10))
        .text(" ping");
    Ok(Sse::new(sse_events(events))
        .keep_alive(keep_alive)
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::LineSplitter;

    #[test]
    fn splits_lines_across_chunks() {
        let mut splitter = LineSplitter::default();
        assert_eq!(splitter.push("a\nb"), vec!["a"]);
        assert_eq!(splitter.push("c\n\nd"), vec!["bc", ""]);
        assert_eq!(splitter.flush(), Some("d".to_string()));
        assert_eq!(splitter.flush(), None);
    }

    #[test]
    fn long_lines_are_split_and_never_held_whole() {
        let mut splitter = LineSplitter::default();
        let mut pieces = Vec::new();
        for _ in 0..100 {
            pieces.extend(splitter.push(&"é".repeat(1000)));
            assert!(splitter.partial.len() <= super::MAX_LINE_BYTES);
        }
        pieces.extend(splitter.flush());
        assert!(pieces.iter().all(|p| p.len() <= super::MAX_LINE_BYTES));
        assert_eq!(pieces.concat(), "é".repeat(100_000));
    }
}
