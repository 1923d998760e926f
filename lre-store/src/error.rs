//! Errors of the store crate. Each caller maps them to its own error type (the server to a
//! gRPC status), so the variants say what kind of failure it is, not where it happened.

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The caller named something malformed: a bad hash, size or resource name.
    #[error("{0}")]
    InvalidArgument(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

impl From<StoreError> for tonic::Status {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::InvalidArgument(m) => tonic::Status::invalid_argument(m),
        }
    }
}
