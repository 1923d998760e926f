//! Worker errors, each mapped to the status an action's operation reports.

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("invalid action: {0}")]
    InvalidInput(String),
    /// An input the CAS does not have (evicted since Execute checked, say); `blob` names
    /// it when its digest is known, for the client to upload it again.
    #[error("missing input: {what}")]
    MissingInput {
        what: String,
        blob: Option<bazel_remote_apis::build::bazel::remote::execution::v2::Digest>,
    },
    #[error("output {0}")]
    Output(String),
    #[error("command not found: {0}")]
    CommandNotFound(String),
    #[error("uploading outputs failed: {0}")]
    Upload(String),
    #[error("sandbox: {0}")]
    Sandbox(String),
    #[error("timed out: {0}")]
    Timeout(String),
    /// The scheduler cancelled the action; it was stopped and its exec root removed.
    #[error("cancelled: {0}")]
    Cancelled(String),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("server: {0}")]
    Rpc(#[from] tonic::Status),
    /// The local cache failed (a full disk): the store's error says where.
    #[error("local cache: {0}")]
    Cache(lre_store::StoreError),
    /// The server's CAS sent content that is not what its digest names.
    #[error("corrupt input: {0}")]
    Corrupt(String),
    /// A broken invariant of the worker's own.
    #[error("internal: {0}")]
    Internal(String),
}

pub type Result<T, E = WorkerError> = std::result::Result<T, E>;

impl WorkerError {
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            WorkerError::InvalidInput(_) | WorkerError::Output(_) => Code::InvalidArgument,
            WorkerError::MissingInput { .. } => Code::FailedPrecondition,
            WorkerError::CommandNotFound(_) => Code::InvalidArgument,
            WorkerError::Upload(_) | WorkerError::Rpc(_) => Code::Unavailable,
            WorkerError::Sandbox(_) | WorkerError::Io(_) => Code::Internal,
            WorkerError::Timeout(_) => Code::DeadlineExceeded,
            WorkerError::Cancelled(_) => Code::Cancelled,
            WorkerError::Cache(e) => e.grpc_code(),
            WorkerError::Corrupt(_) => Code::DataLoss,
            WorkerError::Internal(_) => Code::Internal,
        }
    }
}

impl WorkerError {
    /// A missing input blob.
    pub fn missing(
        d: &bazel_remote_apis::build::bazel::remote::execution::v2::Digest,
        detail: &str,
    ) -> Self {
        WorkerError::MissingInput {
            what: format!("input blob {}/{}{detail}", d.hash, d.size_bytes),
            blob: Some(d.clone()),
        }
    }
}

impl From<prost::DecodeError> for WorkerError {
    fn from(e: prost::DecodeError) -> Self {
        WorkerError::InvalidInput(format!("malformed protobuf: {e}"))
    }
}
