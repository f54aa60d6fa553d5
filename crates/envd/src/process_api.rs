//! Process endpoints: run (foreground), start (background), wait, stdin,
//! kill, list, and the streamed variant (newline-delimited JSON events).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use bytes::Bytes;
use envd_protocol::{
    Empty, KillResponse, ProcessEvent, ProcessInfo, ProcessRequest, RunResult, SetEnvRequest,
    StartedProcess, StdinRequest,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::error::{ApiError, ApiResult};
use crate::extract::{JsonBody, Pid};
use crate::process::{OutputChunk, OutputStream, SpawnOptions, Tracked, Utf8Decoder};
use crate::server::AppState;

/// Keep-alive period of streamed responses (the contract says ≤ 15 s).
const KEEPALIVE_EVERY: Duration = Duration::from_secs(10);
/// Output chunks buffered between a process and a slow stream reader.
const STREAM_CHANNEL_DEPTH: usize = 64;

pub async fn set_env(
    State(state): State<Arc<AppState>>,
    JsonBody(request): JsonBody<SetEnvRequest>,
) -> Json<Empty> {
    state.processes.set_sandbox_env(request.envs);
    Json(Empty {})
}

/// Kills the process group if the request is dropped (client gone) before
/// the process finished: a foreground process lives as long as its request.
struct KillIfAbandoned(Arc<Tracked>);

impl Drop for KillIfAbandoned {
    fn drop(&mut self) {
        if self.0.outcome_now().is_none() {
            tracing::info!(
                pid = self.0.pid,
                "client went away: killing foreground process"
            );
            self.0.kill_group();
        }
    }
}

pub async fn run(
    State(state): State<Arc<AppState>>,
    JsonBody(request): JsonBody<ProcessRequest>,
) -> ApiResult<Json<RunResult>> {
    let options = SpawnOptions {
        capture: true,
        events: None,
        stdin: false,
        forget_on_exit: true,
        pty: None,
    };
    let tracked = state
        .processes
        .spawn(&state.root, &state.users, &request, options)?;
    let guard = KillIfAbandoned(tracked);
    let outcome = guard.0.wait().await;
    Ok(Json(guard.0.result(outcome)))
}

pub async fn start(
    State(state): State<Arc<AppState>>,
    JsonBody(request): JsonBody<ProcessRequest>,
) -> ApiResult<Json<StartedProcess>> {
    let options = SpawnOptions {
        capture: true,
        events: None,
        stdin: request.stdin,
        forget_on_exit: false,
        pty: None,
    };
    let tracked = state
        .processes
        .spawn(&state.root, &state.users, &request, options)?;
    Ok(Json(StartedProcess { pid: tracked.pid }))
}

fn tracked(state: &AppState, pid: u32) -> ApiResult<Arc<Tracked>> {
    state
        .processes
        .get(pid)
        .ok_or_else(|| ApiError::not_found(format!("process {pid} is not tracked")))
}

pub async fn wait(State(state): State<Arc<AppState>>, Pid(pid): Pid) -> ApiResult<Json<RunResult>> {
    let process = tracked(&state, pid)?;
    let outcome = process.wait().await;
    state.processes.forget(pid);
    Ok(Json(process.result(outcome)))
}

pub async fn write_stdin(
    State(state): State<Arc<AppState>>,
    Pid(pid): Pid,
    JsonBody(request): JsonBody<StdinRequest>,
) -> ApiResult<Json<Empty>> {
    let process = tracked(&state, pid)?;
    let data = if request.base64 {
        base64::engine::general_purpose::STANDARD
            .decode(request.data.as_bytes())
            .map_err(|e| ApiError::bad_request(format!("invalid base64: {e}")))?
    } else {
        request.data.into_bytes()
    };
    process.write_stdin(&data).await?;
    Ok(Json(Empty {}))
}

pub async fn close_stdin(
    State(state): State<Arc<AppState>>,
    Pid(pid): Pid,
) -> ApiResult<Json<Empty>> {
    tracked(&state, pid)?.close_stdin().await;
    Ok(Json(Empty {}))
}

pub async fn kill(State(state): State<Arc<AppState>>, Pid(pid): Pid) -> Json<KillResponse> {
    Json(KillResponse {
        killed: state.processes.kill(pid),
    })
}

pub async fn list(State(state): State<Arc<AppState>>) -> Json<Vec<ProcessInfo>> {
    Json(state.processes.list())
}

/// One long-lived response: `start`, output events as they come, periodic
/// `keepalive`, then `exit`. Errors before the start are plain JSON errors.
pub async fn stream(
    State(state): State<Arc<AppState>>,
    JsonBody(request): JsonBody<ProcessRequest>,
) -> ApiResult<Response> {
    let (chunk_sender, chunks) = mpsc::channel(STREAM_CHANNEL_DEPTH);
    let options = SpawnOptions {
        capture: false,
        events: Some(chunk_sender),
        stdin: false,
        forget_on_exit: true,
        pty: None,
    };
    let process = state
        .processes
        .spawn(&state.root, &state.users, &request, options)?;
    let (line_sender, lines) = mpsc::channel::<Result<Bytes, Infallible>>(16);
    tokio::spawn(forward_events(process, chunks, line_sender));
    let body = Body::from_stream(ReceiverStream::new(lines));
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response())
}

async fn forward_events(
    process: Arc<Tracked>,
    mut chunks: mpsc::Receiver<OutputChunk>,
    lines: mpsc::Sender<Result<Bytes, Infallible>>,
) {
    let send = |event: ProcessEvent| {
        let lines = lines.clone();
        async move {
            let mut line = serde_json::to_vec(&event).expect("events serialize");
            line.push(b'\n');
            lines.send(Ok(Bytes::from(line))).await.is_ok()
        }
    };
    if !send(ProcessEvent::Start { pid: process.pid }).await {
        return;
    }
    let mut keepalive = tokio::time::interval_at(
        tokio::time::Instant::now() + KEEPALIVE_EVERY,
        KEEPALIVE_EVERY,
    );
    let mut stdout = Utf8Decoder::default();
    let mut stderr = Utf8Decoder::default();
    loop {
        let event = tokio::select! {
            chunk = chunks.recv() => match chunk {
                Some(OutputChunk { stream: OutputStream::Stdout, data }) => ProcessEvent::Stdout { data: stdout.decode(&data) },
                Some(OutputChunk { stream: OutputStream::Stderr, data }) => ProcessEvent::Stderr { data: stderr.decode(&data) },
                None => break,
            },
            _ = keepalive.tick() => ProcessEvent::Keepalive,
        };
        let empty_output = matches!(&event, ProcessEvent::Stdout { data } | ProcessEvent::Stderr { data } if data.is_empty());
        // The listener left. Nobody can read this command's output or wait
        // for it (a streamed command is forgotten on exit), so it is a
        // producer with no consumer: end it rather than let it run on.
        if !empty_output && !send(event).await {
            tracing::info!(
                pid = process.pid,
                "stream listener left: killing the command"
            );
            process.kill_group();
            return;
        }
    }
    for (decoder, is_stdout) in [(&mut stdout, true), (&mut stderr, false)] {
        let rest = decoder.finish();
        if !rest.is_empty() {
            let event = if is_stdout {
                ProcessEvent::Stdout { data: rest }
            } else {
                ProcessEvent::Stderr { data: rest }
            };
            if !send(event).await {
                return;
            }
        }
    }
    let outcome = loop {
        tokio::select! {
            outcome = process.wait() => break outcome,
            _ = keepalive.tick() => if !send(ProcessEvent::Keepalive).await { return },
        }
    };
    send(ProcessEvent::Exit {
        exit_code: outcome.exit_code,
        timed_out: outcome.timed_out,
    })
    .await;
}
