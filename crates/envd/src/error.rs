//! The JSON error every endpoint returns: `{"message","code"}` with a status
//! the orchestrator can pass through unchanged.

use std::io;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use envd_protocol::{error_code, ErrorBody};

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, error_code::BAD_REQUEST, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, error_code::NOT_FOUND, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            error_code::INTERNAL,
            message,
        )
    }

    /// Maps an OS error on `path` to a status the public API understands.
    pub fn from_io(error: io::Error, path: &str) -> Self {
        let message = format!("{path}: {error}");
        let (status, code) = match error.raw_os_error() {
            Some(libc::ENOENT) => (StatusCode::NOT_FOUND, error_code::NOT_FOUND),
            Some(libc::EEXIST | libc::ENOTEMPTY | libc::EBUSY | libc::ETXTBSY) => {
                (StatusCode::CONFLICT, error_code::CONFLICT)
            }
            Some(libc::ENOTDIR) => (StatusCode::BAD_REQUEST, error_code::NOT_A_DIRECTORY),
            Some(libc::EISDIR) => (StatusCode::BAD_REQUEST, error_code::IS_A_DIRECTORY),
            Some(libc::ENOSPC | libc::EDQUOT) => {
                (StatusCode::INSUFFICIENT_STORAGE, error_code::DISK_FULL)
            }
            Some(libc::EACCES | libc::EPERM | libc::EROFS) => {
                (StatusCode::FORBIDDEN, error_code::PERMISSION_DENIED)
            }
            Some(libc::ELOOP | libc::ENAMETOOLONG | libc::EINVAL | libc::EXDEV | libc::ENXIO) => {
                (StatusCode::BAD_REQUEST, error_code::BAD_REQUEST)
            }
            _ if error.kind() == io::ErrorKind::InvalidInput => {
                (StatusCode::BAD_REQUEST, error_code::BAD_REQUEST)
            }
            _ => (StatusCode::INTERNAL_SERVER_ERROR, error_code::INTERNAL),
        };
        Self::new(status, code, message)
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(status = self.status.as_u16(), code = self.code, message = %self.message, "request failed");
        } else {
            tracing::debug!(status = self.status.as_u16(), code = self.code, message = %self.message, "request rejected");
        }
        let body = ErrorBody {
            message: self.message,
            code: self.code.to_string(),
        };
        (self.status, Json(body)).into_response()
    }
}

/// A blocking task panicked or was cancelled.
impl From<tokio::task::JoinError> for ApiError {
    fn from(error: tokio::task::JoinError) -> Self {
        ApiError::internal(format!("worker failed: {error}"))
    }
}
