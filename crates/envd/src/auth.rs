//! Per-sandbox access token, checked on every request but `/health`.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use envd_protocol::error_code;

use crate::error::ApiError;
use crate::server::AppState;

pub async fn require_token(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix(envd_protocol::AUTHORIZATION_SCHEME))
        .and_then(|rest| rest.strip_prefix(' '))
        .map(str::trim);
    let Some(expected) = state.token.get() else {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            error_code::UNAUTHORIZED,
            "this agent has no token yet: POST /init first",
        )
        .into_response();
    };
    match presented {
        Some(token) if constant_time_eq(token.as_bytes(), expected.as_bytes()) => {
            next.run(request).await
        }
        _ => ApiError::new(
            StatusCode::UNAUTHORIZED,
            error_code::UNAUTHORIZED,
            "missing or invalid access token",
        )
        .into_response(),
    }
}

/// Comparison whose duration does not depend on where the inputs differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    #[test]
    fn compares_tokens() {
        assert!(super::constant_time_eq(b"abc", b"abc"));
        assert!(!super::constant_time_eq(b"abc", b"abd"));
        assert!(!super::constant_time_eq(b"abc", b"ab"));
    }
}
