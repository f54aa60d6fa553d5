//! `POST /init`: the one-time hand-over to an agent started with
//! `--await-init` (see `envd_protocol::InitRequest`).

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use base64::Engine;
use envd_protocol::{error_code, Empty, InitRequest};

use crate::error::ApiError;
use crate::guest;
use crate::server::AppState;

pub async fn init(
    State(state): State<Arc<AppState>>,
    Json(request): Json<InitRequest>,
) -> Result<Json<Empty>, ApiError> {
    let token = request.token.trim();
    if token.is_empty() {
        return Err(ApiError::bad_request("token must not be empty"));
    }
    let entropy = match &request.entropy {
        Some(text) => Some(
            base64::engine::general_purpose::STANDARD
                .decode(text)
                .map_err(|e| ApiError::bad_request(format!("entropy is not base64: {e}")))?,
        ),
        None => None,
    };
    // Serialised so two racing calls cannot both apply their settings.
    let _once = state.init_lock.lock().await;
    if state.token.get().is_some() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            error_code::CONFLICT,
            "this agent is already initialised",
        ));
    }
    // Best effort: an unprivileged envd (tests) cannot set these, and a
    // sandbox with a stale clock is still better than none.
    if let Some(time) = request.unix_time_ns {
        if let Err(error) = guest::set_clock(time) {
            tracing::warn!(%error, "could not set the clock");
        }
    }
    if let Some(seed) = entropy {
        if let Err(error) = guest::add_entropy(&seed) {
            tracing::warn!(%error, "could not reseed the kernel's random pool");
        }
    }
    if let Some(hostname) = &request.hostname {
        if let Err(error) = guest::set_hostname(hostname) {
            tracing::warn!(%error, hostname, "could not set the hostname");
        }
    }
    let _ = state.token.set(token.to_string());
    tracing::info!("initialised by the host");
    Ok(Json(Empty {}))
}
