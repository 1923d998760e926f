//! Worker errors, each mapped to the status an action's operation reports.

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("invalid action: {0}")]
    InvalidInput(String),
    #[error("missing input: {0}")]
    MissingInput(String),
    #[error("output {0}")]
    Output(String),
    #[error("command not found: {0}")]
    CommandNotFound(String),
    #[error("uploading outputs failed: {0}")]
    Upload(String),
    #[error("sandbox: {0}")]
    Sandbox(String),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("server: {0}")]
    Rpc(#[from] tonic::Status),
}

pub type Result<T, E = WorkerError> = std::result::Result<T, E>;

impl WorkerError {
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            WorkerError::InvalidInput(_) | WorkerError::Output(_) => Code::InvalidArgument,
            WorkerError::MissingInput(_) => Code::FailedPrecondition,
            WorkerError::CommandNotFound(_) => Code::InvalidArgument,
            WorkerError::Upload(_) | WorkerError::Rpc(_) => Code::Unavailable,
            WorkerError::Sandbox(_) | WorkerError::Io(_) => Code::Internal,
        }
    }
}

impl From<prost::DecodeError> for WorkerError {
    fn from(e: prost::DecodeError) -> Self {
        WorkerError::InvalidInput(format!("malformed protobuf: {e}"))
    }
}
