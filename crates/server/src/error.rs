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
        if let ApiError::Internal(cause) = &self {
            // The whole chain goes to the log; the client gets the top line.
            tracing::error!(error = format!("{cause:#}"), "request failed");
        } else if status.is_server_error() {
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
        use OrchestratorError as E;
        match e {
            E::SandboxNotFound(id) => ApiError::NotFound(format!("sandbox {id}")),
            E::TemplateNotFound(name) => ApiError::NotFound(format!("template {name:?}")),
            E::SnapshotNotFound(what) => ApiError::NotFound(format!("snapshot {what}")),
            E::SandboxKilled(_) => ApiError::Gone(e.to_string()),
            E::SandboxPaused(_) => ApiError::Conflict {
                code: "sandbox_paused",
                message: e.to_string(),
                retry_after: None,
            },
            E::NotPausable(_) => ApiError::Conflict {
                code: "not_pausable",
                message: e.to_string(),
                retry_after: None,
            },
            E::TemplateNotReady(_) => ApiError::Conflict {
                code: "template_not_ready",
                message: e.to_string(),
                retry_after: None,
            },
            E::InvalidRequest(message) => ApiError::BadRequest(message),
            E::Forbidden(message) => ApiError::Forbidden(message),
            E::NoCapacity(_)
            | E::RuntimeUnavailable(_)
            | E::DatabaseUnavailable(_)
            | E::ShuttingDown
            | E::StorageUnavailable(_)
            | E::HydrateFailed { .. } => ApiError::Unavailable(e.to_string()),
            E::AgentUnreachable(_) => ApiError::BadGateway(e.to_string()),
            E::Agent(EnvdError::Api {
                status,
                code,
                message,
            }) => ApiError::Agent {
                status: StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
                code,
                message,
            },
            E::Agent(other) => ApiError::BadGateway(other.to_string()),
            E::QuotaExceeded(message) => ApiError::QuotaExceeded(message),
            E::CreateAborted | E::Runtime { .. } | E::Store(_) => ApiError::Internal(e.into()),
        }
    }
}

impl From<EnvdError> for ApiError {
    fn from(e: EnvdError) -> Self {
        OrchestratorError::from(e).into()
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

#[cfg(test)]
mod tests {
    use super::*;
    use sandbox_runtime::RuntimeError;
    use sandbox_store::StoreError;

    fn answer(error: impl Into<ApiError>) -> (StatusCode, String, String) {
        let error = error.into();
        let (status, code) = (error.status(), error.code().to_string());
        (status, code, error.to_string())
    }

    fn pool_timeout() -> StoreError {
        StoreError::Database(sqlx::Error::PoolTimedOut)
    }

    /// The whole orchestrator table: each variant to its status and code.
    #[test]
    fn orchestrator_errors_map_to_the_contract_status_by_variant() {
        use OrchestratorError as E;
        let runtime_fault = || RuntimeError::InvalidSpec("x".into());
        let cases: Vec<(OrchestratorError, u16, &str)> = vec![
            (E::SandboxNotFound("sbx-1".into()), 404, "not_found"),
            (E::TemplateNotFound("gpu".into()), 404, "not_found"),
            (E::SandboxKilled("sbx-1".into()), 410, "sandbox_killed"),
            (
                E::TemplateNotReady("python".into()),
                409,
                "template_not_ready",
            ),
            (E::InvalidRequest("bad".into()), 400, "bad_request"),
            (E::Forbidden("no".into()), 403, "forbidden"),
            (E::NoCapacity(runtime_fault()), 503, "unavailable"),
            (E::RuntimeUnavailable("no root".into()), 503, "unavailable"),
            (E::DatabaseUnavailable(pool_timeout()), 503, "unavailable"),
            (E::ShuttingDown, 503, "unavailable"),
            (
                E::HydrateFailed {
                    volume_id: "vol-1".into(),
                    mount_path: "/data".into(),
                    reason: "corrupt".into(),
                },
                503,
                "unavailable",
            ),
            (E::AgentUnreachable("reset".into()), 502, "envd_unreachable"),
            (
                E::Agent(EnvdError::Decode("junk".into())),
                502,
                "envd_unreachable",
            ),
            (
                E::Agent(EnvdError::TooLarge { limit: 1 }),
                502,
                "envd_unreachable",
            ),
            (
                E::QuotaExceeded("100 running".into()),
                429,
                "quota_exceeded",
            ),
            (E::CreateAborted, 500, "internal"),
            (
                E::Runtime {
                    step: "listing machines",
                    source: runtime_fault(),
                },
                500,
                "internal",
            ),
            (
                E::Store(StoreError::UnsupportedUrl("x".into())),
                500,
                "internal",
            ),
        ];
        for (error, status, code) in cases {
            let name = format!("{error:?}");
            let (got_status, got_code, _) = answer(error);
            assert_eq!(
                (got_status.as_u16(), got_code.as_str()),
                (status, code),
                "{name}"
            );
        }
    }

    #[test]
    fn agent_errors_pass_through_with_their_own_status_and_code() {
        let (status, code, message) = answer(OrchestratorError::Agent(EnvdError::Api {
            status: 404,
            code: "not_found".into(),
            message: "/nope does not exist".into(),
        }));
        assert_eq!((status.as_u16(), code.as_str()), (404, "not_found"));
        assert_eq!(message, "/nope does not exist");
        // A status no HTTP library accepts is the agent's fault: 502.
        let (status, ..) = answer(OrchestratorError::Agent(EnvdError::Api {
            status: 1000,
            code: "weird".into(),
            message: String::new(),
        }));
        assert_eq!(status, StatusCode::BAD_GATEWAY);
    }

    #[test]
    fn not_found_messages_name_the_thing() {
        let (_, _, message) = answer(OrchestratorError::SandboxNotFound("sbx-9".into()));
        assert_eq!(message, "sandbox sbx-9 not found");
        let (_, _, message) = answer(OrchestratorError::TemplateNotFound("gpu".into()));
        assert_eq!(message, "template \"gpu\" not found");
    }

    #[test]
    fn internal_errors_keep_their_cause_for_the_log() {
        let error: ApiError = OrchestratorError::Runtime {
            step: "cutting the network",
            source: RuntimeError::Io {
                context: "nft".into(),
                source: std::io::Error::other("exit 1"),
            },
        }
        .into();
        let ApiError::Internal(cause) = &error else {
            panic!("expected Internal, got {error:?}");
        };
        let chain = format!("{cause:#}");
        assert!(
            chain.contains("cutting the network") && chain.contains("exit 1"),
            "{chain}"
        );
    }

    #[test]
    fn store_and_blob_errors_map_by_kind() {
        assert_eq!(answer(pool_timeout()).0, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            answer(StoreError::UnsupportedUrl("x".into())).0,
            StatusCode::INTERNAL_SERVER_ERROR
        );
        let missing = sandbox_blobs::BlobError::NotFound("k".into());
        assert_eq!(answer(missing).0, StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn every_answer_is_a_json_message_and_code() {
        let response = ApiError::Conflict {
            code: "template_not_ready",
            message: "later".into(),
            retry_after: Some(3),
        }
        .into_response();
        assert_eq!(response.status(), StatusCode::CONFLICT);
        assert_eq!(response.headers()["retry-after"], "3");
        let body = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            body,
            json!({ "message": "later", "code": "template_not_ready" })
        );
    }
}
