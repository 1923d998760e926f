//! Errors of the store crate. Each caller maps them to its own error type (the server to a
//! gRPC or HTTP status), so the variants say what kind of failure it is, not where it
//! happened; the message says where (which path, which key, which backend).

use std::io;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The caller named something malformed: a bad hash, size or resource name.
    #[error("{0}")]
    InvalidArgument(String),

    /// What the request needs is not there yet (an output Tree a result names): the caller
    /// can fix it by uploading first.
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),

    #[error("digest mismatch: the uploaded content hashes to {actual}, not {expected}")]
    DigestMismatch { expected: String, actual: String },

    #[error("size mismatch: {0}")]
    SizeMismatch(String),

    /// A full disk or quota: the caller should back off, it is not a server bug.
    #[error("storage full: {0}")]
    StorageFull(String),

    /// In-flight uploads already hold the whole store: nothing more can be reserved until
    /// some finish or are abandoned. Distinct from `StorageFull` (a disk error) because it is
    /// raised before a byte is written, so the write can be retried as it was.
    #[error(
        "no room for upload data: {needed} more bytes wanted, {in_flight} bytes are held by \
         unfinished uploads, the store holds {capacity} bytes in all"
    )]
    UploadSpaceExhausted {
        needed: u64,
        in_flight: u64,
        capacity: u64,
    },

    /// A shared backend (S3, Redis) could not be reached or refused to answer; worth
    /// retrying, and never a reason to serve what was half read.
    #[error("unavailable: {0}")]
    Unavailable(String),

    /// A stored blob's bytes do not match its name (bit rot, a tampered bucket): it is
    /// never served whole, and reads as a miss where a miss can still be said.
    #[error("corrupt: {0}")]
    Corrupt(String),

    #[error("I/O error: {0}")]
    Io(io::Error),

    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

impl StoreError {
    /// This error as an `io::Error` (for readers), recovered whole by `From<io::Error>`.
    pub fn into_io(self) -> io::Error {
        io::Error::other(self)
    }
}

impl From<io::Error> for StoreError {
    fn from(e: io::Error) -> Self {
        // A reader (an S3 body) that failed says why as a StoreError inside the io::Error:
        // keep it, so a backend that went away stays UNAVAILABLE rather than INTERNAL.
        if e.get_ref().is_some_and(|inner| inner.is::<StoreError>()) {
            return match e.into_inner().map(|b| b.downcast::<StoreError>()) {
                Some(Ok(inner)) => *inner,
                _ => StoreError::Internal("an I/O error lost its cause".into()),
            };
        }
        match e.kind() {
            io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => {
                StoreError::StorageFull(e.to_string())
            }
            _ => StoreError::Io(e),
        }
    }
}

impl StoreError {
    /// What a client is told: its own mistakes in full, the server's side only by kind.
    /// Backend failures name internal addresses and paths (a Redis URL, a bucket, a file),
    /// which stay in the server's log.
    pub fn public_message(&self) -> String {
        match self {
            StoreError::InvalidArgument(_)
            | StoreError::FailedPrecondition(_)
            | StoreError::DigestMismatch { .. }
            | StoreError::SizeMismatch(_)
            | StoreError::UploadSpaceExhausted { .. } => self.to_string(),
            StoreError::StorageFull(_) => {
                "storage full: the server's store has no room left; retry later".into()
            }
            StoreError::Unavailable(_) => {
                "unavailable: the server's storage backend did not answer; retry later".into()
            }
            StoreError::Corrupt(_) => {
                "data loss: a stored blob did not match its digest and was not served".into()
            }
            StoreError::Io(_) | StoreError::Internal(_) => {
                "internal error in the server's store; its log has the details".into()
            }
        }
    }

    /// Whether the full message is for the server's log only (see `public_message`).
    pub fn is_internal_detail(&self) -> bool {
        !matches!(
            self,
            StoreError::InvalidArgument(_)
                | StoreError::FailedPrecondition(_)
                | StoreError::DigestMismatch { .. }
                | StoreError::SizeMismatch(_)
                | StoreError::UploadSpaceExhausted { .. }
        )
    }

    pub fn grpc_code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            StoreError::InvalidArgument(_)
            | StoreError::DigestMismatch { .. }
            | StoreError::SizeMismatch(_) => Code::InvalidArgument,
            StoreError::FailedPrecondition(_) => Code::FailedPrecondition,
            StoreError::StorageFull(_) | StoreError::UploadSpaceExhausted { .. } => {
                Code::ResourceExhausted
            }
            StoreError::Unavailable(_) => Code::Unavailable,
            StoreError::Corrupt(_) => Code::DataLoss,
            StoreError::Io(_) | StoreError::Internal(_) => Code::Internal,
        }
    }
}

impl From<StoreError> for tonic::Status {
    fn from(e: StoreError) -> Self {
        if e.is_internal_detail() {
            tracing::warn!(error = %e, "store error (the client is told only its kind)");
        }
        tonic::Status::new(e.grpc_code(), e.public_message())
    }
}
