/// Error of an [`super::EnvdClient`] call.
#[derive(Debug, thiserror::Error)]
pub enum EnvdError {
    /// envd answered with an error body; pass `status`/`code`/`message` through.
    #[error("envd error {status} {code}: {message}")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    /// Connecting, sending or receiving failed.
    #[error("envd transport error: {0}")]
    Transport(String),
    /// envd answered something this client cannot decode.
    #[error("invalid envd response: {0}")]
    Decode(String),
    /// A buffered response passed the client's limit: the agent (as hostile
    /// as the tenant) sent more than the caller will hold in memory.
    #[error("the sandbox agent's response exceeds {limit} bytes")]
    TooLarge { limit: usize },
    /// The agent speaks a protocol version this client does not support.
    #[error("envd speaks protocol version {agent}, this client supports up to {supported_max}")]
    Incompatible { agent: u32, supported_max: u32 },
}

impl EnvdError {
    /// HTTP status of an [`EnvdError::Api`] error.
    pub fn status(&self) -> Option<u16> {
        match self {
            EnvdError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Error code of an [`EnvdError::Api`] error (see [`crate::error_code`]).
    pub fn code(&self) -> Option<&str> {
        match self {
            EnvdError::Api { code, .. } => Some(code),
            _ => None,
        }
    }
}
