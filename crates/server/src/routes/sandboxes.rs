//! `/sandboxes`: create (idempotent), get, list, status, timeout, kill.

use crate::app::AppState;
use crate::auth::Caller;
use crate::config::SandboxesConfig;
use crate::error::{ApiError, ApiResult};
use crate::json::{JsonBody, JsonWithBytes};
use crate::views::{
    KillManyView, KillOutcomeView, KilledView, OkView, QueuedView, SandboxListView,
    SandboxStatusView, SandboxView,
};
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use sandbox_orchestrator::CreateSandbox;
use sandbox_store::{ListedState, Owner, Sandbox, SandboxPage};
use serde::Deserialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::time::Duration;
use utoipa::ToSchema;

/// How long a create may run before its idempotency claim counts as abandoned.
const IDEMPOTENCY_STALE_SECS: i64 = 600;
/// What a listing shows unless told otherwise: every sandbox not killed.
const LIVE: [ListedState; 2] = [ListedState::Running, ListedState::Paused];
const MAX_LIST_LIMIT: i64 = 1000;
const MAX_IDEMPOTENCY_KEY_LEN: usize = 256;

#[derive(Deserialize, ToSchema)]
pub struct CreateBody {
    #[serde(default)]
    template: Option<String>,
    #[serde(default)]
    timeout: Option<u64>,
    #[serde(default)]
    metadata: Option<BTreeMap<String, String>>,
    #[serde(default)]
    envs: Option<BTreeMap<String, String>>,
    #[serde(default)]
    #[schema(value_type = Option<Vec<crate::attachments::RawAttachment>>)]
    volumes: Option<Value>,
    /// Extension: fail the create if a volume cannot be hydrated.
    #[serde(default)]
    hydrate_strict: Option<bool>,
    /// Anything else (`network`, `lifecycle`, …) is kept and echoed back.
    #[serde(flatten)]
    #[schema(ignore)]
    extra: Map<String, Value>,
}

fn parse_create(body: CreateBody, sandboxes: &SandboxesConfig) -> ApiResult<CreateSandbox> {
    if body.extra.contains_key("resources") {
        return Err(ApiError::Forbidden(
            "per-request resources are not allowed; they come from the template".into(),
        ));
    }
    let template = body
        .template
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| "base".into());
    Ok(CreateSandbox {
        template,
        timeout_secs: sandboxes.effective_timeout(body.timeout),
        metadata: body.metadata.unwrap_or_default(),
        envs: body.envs.unwrap_or_default(),
        volumes: crate::attachments::parse(body.volumes, sandboxes.max_attachments)?,
        strict_hydrate: body.hydrate_strict,
        extra: body.extra,
    })
}

#[utoipa::path(
    post, path = "/sandboxes", tag = "sandboxes",
    request_body = CreateBody,
    params(("Idempotency-Key" = Option<String>, Header, description = "A retry with the same key and body gets the first answer")),
    responses((status = 201, description = "Created, volumes hydrated", body = SandboxView), (status = 400, description = "Malformed request", body = crate::views::ErrorView), (status = 401, description = "Missing or invalid API key", body = crate::views::ErrorView), (status = 403, description = "Per-request resources, or a deleted or foreign volume", body = crate::views::ErrorView), (status = 404, description = "Unknown template", body = crate::views::ErrorView), (status = 409, description = "Template still building, or the same Idempotency-Key in flight", body = crate::views::ErrorView), (status = 422, description = "Idempotency-Key reused with another body", body = crate::views::ErrorView), (status = 429, description = "Running-sandbox quota reached", body = crate::views::ErrorView), (status = 503, description = "No capacity, no runtime, or a strict hydrate failed", body = crate::views::ErrorView))
)]
pub async fn create(
    State(state): State<AppState>,
    Caller(owner): Caller,
    headers: HeaderMap,
    JsonWithBytes { value, bytes: body }: JsonWithBytes<CreateBody>,
) -> ApiResult<Response> {
    let request = parse_create(value, &state.config.sandboxes)?;
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .filter(|k| !k.is_empty())
        .map(str::to_string);
    if key
        .as_ref()
        .is_some_and(|k| k.len() > MAX_IDEMPOTENCY_KEY_LEN)
    {
        return Err(ApiError::BadRequest(format!(
            "Idempotency-Key is longer than {MAX_IDEMPOTENCY_KEY_LEN} bytes"
        )));
    }
    // Detached: a client that hangs up mid-create leaves neither a
    // half-made sandbox nor an unsettled idempotency key, and the quota
    // counts the create until its row exists.
    tokio::spawn(async move {
        match key {
            None => {
                let _admission = state.quotas.admit_sandbox(&owner.id).await?;
                let sandbox = state.orchestrator.create(&owner.id, request).await?;
                Ok((StatusCode::CREATED, Json(SandboxView::from(&sandbox))).into_response())
            }
            Some(key) => create_idempotent(state, owner, key, body, request).await,
        }
    })
    .await
    .map_err(|e| ApiError::Internal(anyhow::anyhow!("create task failed: {e}")))?
}

async fn create_idempotent(
    state: AppState,
    owner: Owner,
    key: String,
    body: Bytes,
    request: CreateSandbox,
) -> ApiResult<Response> {
    let key = key.as_str();

    let body_hash = hex::encode(Sha256::digest(&body));
    use sandbox_store::IdempotencyClaim::*;
    match state
        .store
        .claim_idempotency_key(&owner.id, key, &body_hash, IDEMPOTENCY_STALE_SECS)
        .await?
    {
        Fresh => {}
        InProgress => {
            return Err(ApiError::Conflict {
                code: "idempotency_in_progress",
                message: "a create with this Idempotency-Key is still in progress".into(),
                retry_after: Some(1),
            })
        }
        Done { status, response } => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::CREATED);
            return Ok((status, [("content-type", "application/json")], response).into_response());
        }
        Mismatch => {
            return Err(ApiError::Unprocessable {
                code: "idempotency_key_reused",
                message: "this Idempotency-Key was used with a different request body".into(),
            })
        }
    }
    // Only a fresh claim counts against the quota: a retry of a create that
    // succeeded gets its stored answer above, never a 429.
    let _admission = match state.quotas.admit_sandbox(&owner.id).await {
        Ok(admission) => admission,
        Err(e) => {
            state.store.release_idempotency_key(&owner.id, key).await?;
            return Err(e);
        }
    };
    match state.orchestrator.create(&owner.id, request).await {
        Ok(sandbox) => {
            let response = serde_json::to_string(&SandboxView::from(&sandbox))
                .map_err(|e| ApiError::Internal(e.into()))?;
            if let Err(e) = record_idempotent_result(&state, &owner.id, key, &response).await {
                // Without the record a retry would create a second sandbox:
                // take this one back and let the retry start clean.
                tracing::error!(sandbox_id = %sandbox.id, error = %e, "could not record an idempotent create: undoing it");
                let _ = state.orchestrator.kill(&owner.id, &sandbox.id).await;
                let _ = state.store.release_idempotency_key(&owner.id, key).await;
                return Err(ApiError::Unavailable(
                    "the database did not record the create, so it was undone; retry".into(),
                ));
            }
            Ok((
                StatusCode::CREATED,
                [("content-type", "application/json")],
                response,
            )
                .into_response())
        }
        Err(e) => {
            // A failed create leaves no trace, so the SDK's retry runs afresh.
            state.store.release_idempotency_key(&owner.id, key).await?;
            Err(e.into())
        }
    }
}

/// A few quick retries ride out a blip (a Postgres restart) before the
/// caller gives up and undoes the create.
async fn record_idempotent_result(
    state: &AppState,
    owner_id: &str,
    key: &str,
    response: &str,
) -> Result<(), sandbox_store::StoreError> {
    let mut attempt = 0;
    loop {
        match state
            .store
            .finish_idempotency_key(owner_id, key, 201, response)
            .await
        {
            Ok(()) => return Ok(()),
            Err(e) if attempt >= 4 => return Err(e),
            Err(e) => {
                tracing::warn!(error = %e, attempt, "recording an idempotent create failed; retrying");
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(250 << attempt)).await;
            }
        }
    }
}

#[utoipa::path(
    get, path = "/sandboxes/{id}", tag = "sandboxes", params(("id" = String, Path, description = "Sandbox id (`sbx-…`)")),
    responses((status = 200, description = "The sandbox", body = SandboxView), (status = 401, description = "Missing or invalid API key", body = crate::views::ErrorView), (status = 404, description = "Unknown, or another owner's", body = crate::views::ErrorView))
)]
pub async fn get(
    State(state): State<AppState>,
    Caller(owner): Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<SandboxView>> {
    let sandbox = state.orchestrator.get(&owner.id, &id).await?;
    Ok(Json(SandboxView::from(&sandbox)))
}

#[utoipa::path(
    get, path = "/sandboxes/{id}/status", tag = "sandboxes", params(("id" = String, Path, description = "Sandbox id (`sbx-…`)")),
    responses((status = 200, description = "Whether it runs", body = SandboxStatusView), (status = 401, description = "Missing or invalid API key", body = crate::views::ErrorView), (status = 404, description = "Unknown, or another owner's", body = crate::views::ErrorView))
)]
pub async fn status(
    State(state): State<AppState>,
    Caller(owner): Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<SandboxStatusView>> {
    let sandbox = state.orchestrator.get(&owner.id, &id).await?;
    Ok(Json(SandboxStatusView {
        is_running: sandbox.shown_state() == "running",
    }))
}

/// Cursor: `{started_at µs}_{id}` of the last sandbox on the page.
fn encode_cursor(sandbox: &Sandbox) -> String {
    format!("{}_{}", sandbox.started_at.timestamp_micros(), sandbox.id)
}

fn decode_cursor(token: &str) -> ApiResult<(chrono::DateTime<chrono::Utc>, String)> {
    let invalid = || ApiError::BadRequest(format!("invalid next_token {token:?}"));
    let (micros, id) = token.split_once('_').ok_or_else(invalid)?;
    let micros: i64 = micros.parse().map_err(|_| invalid())?;
    let at = chrono::DateTime::from_timestamp_micros(micros).ok_or_else(invalid)?;
    Ok((at, id.to_string()))
}

#[utoipa::path(
    get, path = "/sandboxes", tag = "sandboxes",
    params(("state" = Option<String>, Query, description = "`running` (default), `killed` or `all`; repeatable"),
           ("limit" = Option<i64>, Query, description = "Page size, 1..=1000 (100)"),
           ("next_token" = Option<String>, Query, description = "The previous page's `next_token`")),
    responses((status = 200, description = "Newest first", body = SandboxListView), (status = 400, description = "Malformed request", body = crate::views::ErrorView), (status = 401, description = "Missing or invalid API key", body = crate::views::ErrorView))
)]
pub async fn list(
    State(state): State<AppState>,
    Caller(owner): Caller,
    RawQuery(query): RawQuery,
) -> ApiResult<Json<SandboxListView>> {
    let pairs: Vec<(String, String)> =
        serde_urlencoded::from_str(query.as_deref().unwrap_or(""))
            .map_err(|e| ApiError::BadRequest(format!("invalid query: {e}")))?;
    let mut page = SandboxPage {
        limit: 100,
        ..Default::default()
    };
    let mut all_states = false;
    for (key, value) in &pairs {
        match (key.as_str(), value.as_str()) {
            ("state", "all") => all_states = true,
            ("state", "running") => page.states.push(ListedState::Running),
            ("state", "paused") => page.states.push(ListedState::Paused),
            ("state", "live") => page.states.extend(LIVE),
            ("state", "killed") => page.states.push(ListedState::Killed),
            ("state", "creating") => {} // a create answers once it is running
            ("state", other) => {
                return Err(ApiError::BadRequest(format!("unknown state {other:?}")))
            }
            ("limit", n) => {
                let n: i64 = n
                    .parse()
                    .map_err(|_| ApiError::BadRequest(format!("invalid limit {n:?}")))?;
                page.limit = n.clamp(1, MAX_LIST_LIMIT);
            }
            ("next_token", token) if !token.is_empty() => page.before = Some(decode_cursor(token)?),
            _ => {} // metadata filters from the SDKs are not supported; ignored
        }
    }
    if all_states {
        page.states.clear();
    } else if page.states.is_empty() {
        // Killed sandboxes are hidden unless asked for; a filter that named
        // only states we never have matches nothing.
        let asked_for_states = pairs.iter().any(|(k, _)| k == "state");
        if asked_for_states {
            return Ok(Json(SandboxListView {
                sandboxes: Vec::new(),
                next_token: None,
            }));
        }
        page.states.extend(LIVE);
    }
    let limit = page.limit;
    page.limit += 1;
    let mut sandboxes = state.store.list_sandboxes(&owner.id, &page).await?;
    let next_token = if sandboxes.len() as i64 > limit {
        sandboxes.truncate(limit as usize);
        sandboxes.last().map(encode_cursor)
    } else {
        None
    };
    Ok(Json(SandboxListView {
        sandboxes: sandboxes.iter().map(SandboxView::from).collect(),
        next_token,
    }))
}

#[derive(Deserialize, ToSchema)]
pub struct TimeoutBody {
    timeout: u64,
}

#[utoipa::path(
    patch, path = "/sandboxes/{id}/timeout", tag = "sandboxes", params(("id" = String, Path, description = "Sandbox id (`sbx-…`)")),
    request_body = TimeoutBody,
    responses((status = 200, description = "New deadline set", body = OkView), (status = 400, description = "Malformed request", body = crate::views::ErrorView), (status = 401, description = "Missing or invalid API key", body = crate::views::ErrorView), (status = 404, description = "Unknown, or another owner's", body = crate::views::ErrorView), (status = 410, description = "The sandbox was killed", body = crate::views::ErrorView))
)]
pub async fn set_timeout(
    State(state): State<AppState>,
    Caller(owner): Caller,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<TimeoutBody>,
) -> ApiResult<Json<OkView>> {
    state
        .orchestrator
        .set_timeout(
            &owner.id,
            &id,
            state.config.sandboxes.effective_timeout(Some(body.timeout)),
        )
        .await?;
    Ok(Json(OkView { ok: true }))
}

#[derive(Deserialize, Default)]
pub struct KillQuery {
    #[serde(default, rename = "async")]
    asynchronous: Option<String>,
}

impl KillQuery {
    fn is_async(&self) -> bool {
        matches!(self.asynchronous.as_deref(), Some("true" | "1"))
    }
}

#[utoipa::path(
    delete, path = "/sandboxes/{id}", tag = "sandboxes",
    params(("id" = String, Path, description = "Sandbox id (`sbx-…`)"), ("async" = Option<bool>, Query, description = "Answer 202 at once and kill in the background")),
    responses((status = 200, description = "Killed", body = KilledView), (status = 202, description = "Queued", body = QueuedView), (status = 401, description = "Missing or invalid API key", body = crate::views::ErrorView), (status = 404, description = "Unknown, or another owner's", body = crate::views::ErrorView))
)]
pub async fn kill(
    State(state): State<AppState>,
    Caller(owner): Caller,
    Path(id): Path<String>,
    axum::extract::Query(query): axum::extract::Query<KillQuery>,
) -> ApiResult<Response> {
    if query.is_async() {
        state
            .orchestrator
            .kill_in_background(&owner.id, &id)
            .await?;
        return Ok((StatusCode::ACCEPTED, Json(QueuedView { queued: true })).into_response());
    }
    let killed = state.orchestrator.kill(&owner.id, &id).await?;
    Ok(Json(KilledView { killed }).into_response())
}

#[derive(Deserialize, ToSchema)]
pub struct KillManyBody {
    sandbox_ids: Vec<String>,
}

#[utoipa::path(
    post, path = "/sandboxes/kill-many", tag = "sandboxes",
    params(("async" = Option<bool>, Query, description = "Answer 202 and kill in the background")),
    request_body = KillManyBody,
    responses((status = 200, description = "Per-id outcome", body = KillManyView), (status = 202, description = "Queued", body = KillManyView), (status = 400, description = "Malformed request", body = crate::views::ErrorView), (status = 401, description = "Missing or invalid API key", body = crate::views::ErrorView))
)]
pub async fn kill_many(
    State(state): State<AppState>,
    Caller(owner): Caller,
    axum::extract::Query(query): axum::extract::Query<KillQuery>,
    JsonBody(body): JsonBody<KillManyBody>,
) -> ApiResult<Response> {
    let cap = state.config.http.max_list_items;
    if body.sandbox_ids.len() > cap {
        return Err(ApiError::BadRequest(format!(
            "kill-many takes at most {cap} ids, got {}",
            body.sandbox_ids.len()
        )));
    }
    let kills = body.sandbox_ids.iter().map(|id| {
        let orchestrator = state.orchestrator.clone();
        let owner_id = owner.id.clone();
        let id = id.clone();
        async move {
            let outcome = orchestrator.kill(&owner_id, &id).await;
            (id, outcome)
        }
    });
    let outcomes = futures::future::join_all(kills).await;
    let asynchronous = query.is_async();
    let results = outcomes
        .into_iter()
        .map(|(id, outcome)| {
            let outcome = match outcome {
                Ok(_) if asynchronous => KillOutcomeView::Queued { queued: true },
                Ok(killed) => KillOutcomeView::Killed { killed },
                Err(e) => KillOutcomeView::Failed {
                    error: e.to_string(),
                },
            };
            (id, outcome)
        })
        .collect();
    let status = if asynchronous {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(KillManyView { results })).into_response())
}
