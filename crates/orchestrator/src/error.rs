use envd_protocol::client::EnvdError;

/// Everything a sandbox operation can fail with; the server maps each
/// variant to an HTTP status in one place.
#[derive(Debug, thiserror::Error)]
pub enum OrchestratorError {
    #[error("sandbox {0} not found")]
    SandboxNotFound(String),
    #[error("sandbox {0} has been killed")]
    SandboxKilled(String),
    #[error("template {0:?} not found")]
    TemplateNotFound(String),
    #[error("template {0:?} is still being built; try again shortly")]
    TemplateNotReady(String),
    #[error("{0}")]
    InvalidRequest(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("no sandbox capacity: {0}")]
    NoCapacity(String),
    #[error("sandbox runtime unavailable: {0}")]
    RuntimeUnavailable(String),
    #[error("sandbox agent unreachable: {0}")]
    AgentUnreachable(String),
    #[error(transparent)]
    Agent(EnvdError),
    #[error("{0}")]
    QuotaExceeded(String),
    #[error("volume hydration failed: {0}")]
    HydrateFailed(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<sandbox_store::StoreError> for OrchestratorError {
    fn from(e: sandbox_store::StoreError) -> Self {
        if e.is_unavailable() {
            OrchestratorError::RuntimeUnavailable(format!("database unavailable: {e}"))
        } else {
            OrchestratorError::Internal(e.to_string())
        }
    }
}

impl From<EnvdError> for OrchestratorError {
    fn from(e: EnvdError) -> Self {
        match e {
            EnvdError::Transport(message) => OrchestratorError::AgentUnreachable(message),
            other => OrchestratorError::Agent(other),
        }
    }
}
