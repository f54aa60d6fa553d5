//! `GET /sandboxes/{id}/metrics`: the sandbox's CPU, memory and disk use.

use crate::app::AppState;
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::timefmt::iso_utc_offset;
use axum::extract::{Path, Query, State};
use axum::Json;
use chrono::{DateTime, Utc};
use sandbox_orchestrator::UsageSample;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Deserialize)]
pub struct RangeQuery {
    start: Option<String>,
    end: Option<String>,
}

/// One sample; the series is oldest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct UsageView {
    /// ISO 8601 with `+00:00` (what Python 3.10's `fromisoformat` reads).
    pub timestamp: String,
    /// Busy share of the sandbox's vCPUs since the previous sample, 0–100.
    pub cpu_usage_percent: f64,
    pub cpu_count: u32,
    pub memory_usage_mb: f64,
    pub memory_limit_mb: u64,
    pub disk_usage_mb: f64,
    pub disk_limit_mb: u64,
}

impl From<UsageSample> for UsageView {
    fn from(s: UsageSample) -> Self {
        UsageView {
            timestamp: iso_utc_offset(s.timestamp),
            cpu_usage_percent: (s.cpu_usage_percent * 100.0).round() / 100.0,
            cpu_count: s.cpu_count,
            memory_usage_mb: (s.memory_usage_mb * 100.0).round() / 100.0,
            memory_limit_mb: s.memory_limit_mb,
            disk_usage_mb: (s.disk_usage_mb * 100.0).round() / 100.0,
            disk_limit_mb: s.disk_limit_mb,
        }
    }
}

fn parse_time(name: &str, raw: &Option<String>) -> ApiResult<Option<DateTime<Utc>>> {
    raw.as_deref()
        .filter(|s| !s.is_empty())
        .map(|s| {
            DateTime::parse_from_rfc3339(s)
                .map(|t| t.with_timezone(&Utc))
                .map_err(|e| ApiError::BadRequest(format!("{name}: not an ISO 8601 time: {e}")))
        })
        .transpose()
}

#[utoipa::path(
    get, path = "/sandboxes/{id}/metrics", tag = "sandboxes",
    params(("id" = String, Path, description = "Sandbox id (`sbx-…`)"), ("start" = Option<String>, Query, description = "Oldest sample to return (ISO 8601)"), ("end" = Option<String>, Query, description = "Newest sample to return (ISO 8601)")),
    responses((status = 200, description = "Samples, oldest first: every call takes one (not while paused); the last 120 are kept", body = Vec<UsageView>), (status = 400, description = "Malformed request", body = crate::views::ErrorView), (status = 401, description = "Missing or invalid API key", body = crate::views::ErrorView), (status = 404, description = "Unknown, or another owner's", body = crate::views::ErrorView), (status = 410, description = "The sandbox was killed", body = crate::views::ErrorView))
)]
pub async fn metrics(
    State(state): State<AppState>,
    Caller(owner): Caller,
    Path(id): Path<String>,
    Query(range): Query<RangeQuery>,
) -> ApiResult<Json<Vec<UsageView>>> {
    let start = parse_time("start", &range.start)?;
    let end = parse_time("end", &range.end)?;
    let samples = state.orchestrator.usage(&owner.id, &id, start, end).await?;
    Ok(Json(samples.into_iter().map(UsageView::from).collect()))
}
