//! Extractors shared by the sandbox routes.

use crate::app::AppState;
use crate::auth::Caller;
use crate::error::ApiError;
use axum::extract::{FromRequestParts, RawPathParams};
use axum::http::request::Parts;
use envd_protocol::client::EnvdClient;

/// The agent of the caller's running sandbox named by the route's `{id}`:
/// 401 without a valid key, 404 for an unknown or foreign sandbox, 410 for
/// a killed one. Every sandbox route that talks to envd starts here.
pub struct SandboxAgent(pub EnvdClient);

impl FromRequestParts<AppState> for SandboxAgent {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let Caller(owner) = Caller::from_request_parts(parts, state).await?;
        let params = RawPathParams::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::BadRequest(e.to_string()))?;
        let id = params
            .iter()
            .find(|(name, _)| *name == "id")
            .map(|(_, value)| value.to_string())
            .ok_or_else(|| ApiError::Internal(anyhow::anyhow!("route has no {{id}}")))?;
        Ok(SandboxAgent(
            state.orchestrator.agent(&owner.id, &id).await?,
        ))
    }
}
