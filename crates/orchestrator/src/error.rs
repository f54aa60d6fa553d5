use envd_protocol::client::EnvdError;
use sandbox_runtime::RuntimeError;
use sandbox_store::StoreError;

/// Everything a sandbox operation can fail with. The server maps each
/// variant (never its message) to an HTTP status in one place; variants
/// that wrap a lower layer's error keep it as their `source` for the logs.
#[derive(Debug, thiserror::Error)]
pub enum OrchestratorError {
    #[error("sandbox {0} not found")]
    SandboxNotFound(String),
    #[error("sandbox {0} has been killed")]
    SandboxKilled(String),
    #[error("sandbox {0} is paused; resume it first")]
    SandboxPaused(String),
    #[error("{0}")]
    NotPausable(String),
    #[error("snapshot {0} not found")]
    SnapshotNotFound(String),
    #[error("object storage unavailable: {0}")]
    StorageUnavailable(String),
    #[error("template {0:?} not found")]
    TemplateNotFound(String),
    #[error("template {0:?} is still being built; try again shortly")]
    TemplateNotReady(String),
    #[error("{0}")]
    InvalidRequest(String),
    #[error("{0}")]
    Forbidden(String),
    /// The driver could not start a machine for this create.
    #[error("no sandbox capacity: {0}")]
    NoCapacity(#[source] RuntimeError),
    /// No runtime on this host (the reason was found at start-up).
    #[error("sandbox runtime unavailable: {0}")]
    RuntimeUnavailable(String),
    #[error("database unavailable: {0}")]
    DatabaseUnavailable(#[source] StoreError),
    #[error("sandbox agent unreachable: {0}")]
    AgentUnreachable(String),
    #[error(transparent)]
    Agent(EnvdError),
    #[error("{0}")]
    QuotaExceeded(String),
    #[error("volume {volume_id} into {mount_path}: hydration failed: {reason}")]
    HydrateFailed {
        volume_id: String,
        mount_path: String,
        reason: String,
    },
    #[error("the server is shutting down")]
    ShuttingDown,
    /// A create's task panicked; its machine was released.
    #[error("the create failed unexpectedly; nothing was kept")]
    CreateAborted,
    /// A driver step failed on a machine this service owns.
    #[error("{step}: {source}")]
    Runtime {
        step: &'static str,
        #[source]
        source: RuntimeError,
    },
    #[error("database error: {0}")]
    Store(#[source] StoreError),
}

impl OrchestratorError {
    pub(crate) fn runtime(step: &'static str) -> impl FnOnce(RuntimeError) -> Self {
        move |source| OrchestratorError::Runtime { step, source }
    }
}

impl From<StoreError> for OrchestratorError {
    fn from(e: StoreError) -> Self {
        if e.is_unavailable() {
            OrchestratorError::DatabaseUnavailable(e)
        } else {
            OrchestratorError::Store(e)
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
