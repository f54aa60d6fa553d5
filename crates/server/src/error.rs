//! The one place where failures become HTTP statuses and JSON bodies.
//! Every error answer is `{"message": …, "code": …}`; the Declaw SDKs read
//! `message` and map the status to their exception types.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use envd_protocol::client::EnvdError;
use sandbox_orchestrator::OrchestratorError;
use serde_json::json;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("unauthorized: missing or invalid API key")]
    Unauthorized,
    #[error("{0}")]
    BadRequest(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    Gone(String),
    #[error("{message}")]
    Unprocessable { code: &'static str, message: String },
    #[error("{0}")]
    BadGateway(String),
    #[error("{0}")]
    NotImplemented(String),
    /// An error the sandbox agent reported, passed through as it came.
    #[error("{message}")]
    Agent {
        status: StatusCode,
        code: String,
        message: String,
    },
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{message}")]
    Conflict {
        code: &'static str,
        message: String,
        retry_after: Option<u64>,
    },
    #[error("{0}")]
    Unavailable(String),
    /// The client stopped sending a request body.
    #[error("{0}")]
    RequestTimeout(String),
    /// An owner's quota is used up.
    #[error("{0}")]
    QuotaExceeded(String),
    #[error("internal error: {0}")]
    Internal(#[from] anyhow::Error),
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::Gone(_) => StatusCode::GONE,
            ApiError::Unprocessable { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::BadGateway(_) => StatusCode::BAD_GATEWAY,
            ApiError::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
            ApiError::Agent { status, .. } => *status,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Conflict { .. } => StatusCode::CONFLICT,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::QuotaExceeded(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn code(&self) -> &str {
        match self {
            ApiError::Unauthorized => "unauthorized",
            ApiError::BadRequest(_) => "bad_request",
            ApiError::NotFound(_) => "not_found",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::Gone(_) => "sandbox_killed",
            ApiError::Unprocessable { code, .. } => code,
            ApiError::BadGateway(_) => "envd_unreachable",
            ApiError::NotImplemented(_) => "not_implemented",
            ApiError::Agent { code, .. } => code,
            ApiError::PayloadTooLarge(_) => "payload_too_large",
            ApiError::Conflict { code, .. } => code,
            ApiError::Unavailable(_) => "unavailable",
            ApiError::RequestTimeout(_) => "request_timeout",
            ApiError::QuotaExceeded(_) => "quota_exceeded",
            ApiError::Internal(_) => "internal",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!(error = %self, "request failed");
        }
        let body = Json(json!({ "message": self.to_string(), "code": self.code() }));
        let mut response = (status, body).into_response();
        if let ApiError::Conflict {
            retry_after: Some(secs),
            ..
        } = self
        {
            response
                .headers_mut()
                .insert("retry-after", HeaderValue::from(secs));
        }
        response
    }
}

impl From<sandbox_store::StoreError> for ApiError {
    fn from(e: sandbox_store::StoreError) -> Self {
        if e.is_unavailable() {
            ApiError::Unavailable(format!("database unavailable: {e}"))
        } else {
            ApiError::Internal(e.into())
        }
    }
}

impl From<sandbox_blobs::BlobError> for ApiError {
    fn from(e: sandbox_blobs::BlobError) -> Self {
        match e {
            sandbox_blobs::BlobError::NotFound(key) => ApiError::NotFound(format!("blob {key}")),
            other => ApiError::Unavailable(format!("object storage unavailable: {other}")),
        }
    }
}

impl From<OrchestratorError> for ApiError {
    fn from(e: OrchestratorError) -> Self {
        let message = e.to_string();
        match e {
            OrchestratorError::SandboxNotFound(_) | OrchestratorError::TemplateNotFound(_) => {
                ApiError::NotFound(message.trim_end_matches(" not found").to_string())
            }
            OrchestratorError::SandboxKilled(_) => ApiError::Gone(message),
            OrchestratorError::TemplateNotReady(_) => ApiError::Conflict {
                code: "template_not_ready",
                message,
                retry_after: None,
            },
            OrchestratorError::InvalidRequest(_) => ApiError::BadRequest(message),
            OrchestratorError::Forbidden(_) => ApiError::Forbidden(message),
            OrchestratorError::NoCapacity(_) | OrchestratorError::RuntimeUnavailable(_) => {
                ApiError::Unavailable(message)
            }
            OrchestratorError::AgentUnreachable(_) => ApiError::BadGateway(message),
            OrchestratorError::Agent(EnvdError::Api {
                status,
                code,
                message,
            }) => ApiError::Agent {
                status: StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
                code,
                message,
            },
            OrchestratorError::Agent(other) => ApiError::BadGateway(other.to_string()),
            OrchestratorError::QuotaExceeded(_) => ApiError::QuotaExceeded(message),
            OrchestratorError::HydrateFailed(_) => ApiError::Unavailable(message),
            OrchestratorError::Internal(_) => ApiError::Internal(anyhow::anyhow!(message)),
        }
    }
}

impl From<EnvdError> for ApiError {
    fn from(e: EnvdError) -> Self {
        OrchestratorError::from(e).into()
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
