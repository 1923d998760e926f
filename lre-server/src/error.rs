//! One error type for the whole cache, mapped once to gRPC and HTTP status codes.

use std::io;

use axum::http::StatusCode;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    #[error("not found: {0}")]
    NotFound(String),

    /// An HTTP request for a host name this server does not serve (HTTP 421).
    #[error("misdirected request: {0}")]
    MisdirectedHost(String),

    #[error("unknown instance name {0:?}: not in this server's `instances` list")]
    UnknownInstance(String),

    #[error("unauthenticated: {0}")]
    Unauthenticated(String),

    #[error("permission denied: {0}")]
    PermissionDenied(String),

    /// A server-wide limit (concurrent upload sessions, decoder memory) is reached.
    #[error("resource exhausted: {0}")]
    ResourceExhausted(String),

    #[error("out of range: {0}")]
    OutOfRange(String),

    #[error("failed precondition: {0}")]
    FailedPrecondition(String),

    /// A name already taken (a worker id connected twice).
    #[error("already exists: {0}")]
    AlreadyExists(String),

    #[error("aborted: {0}")]
    Aborted(String),

    #[error("unimplemented: {0}")]
    Unimplemented(String),

    /// An upstream (Remote Asset downloads) could not be reached; worth retrying.
    #[error("unavailable: {0}")]
    Unavailable(String),

    #[error("deadline exceeded: {0}")]
    DeadlineExceeded(String),

    #[error("internal error: {0}")]
    Internal(String),

    /// A body in a form the server does not take (a NAR compression it cannot decode).
    /// HTTP 415, whose body Nix prints to its user.
    #[error("unsupported media type: {0}")]
    Unsupported(String),

    /// What the store said: a digest or size mismatch, a full disk, no room for uploads,
    /// an I/O error. One definition, in lre-store.
    #[error(transparent)]
    Store(lre_store::StoreError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        // A full disk or quota stays StorageFull: the caller's to back off from.
        Error::Store(lre_store::StoreError::from(e))
    }
}

impl From<lre_store::StoreError> for Error {
    fn from(e: lre_store::StoreError) -> Self {
        use lre_store::StoreError as S;
        match e {
            S::InvalidArgument(m) => Error::InvalidArgument(m),
            S::FailedPrecondition(m) => Error::FailedPrecondition(m),
            // Kept as the store's: its message names the backend, for the log only.
            other => Error::Store(other),
        }
    }
}

impl From<prost::DecodeError> for Error {
    fn from(e: prost::DecodeError) -> Self {
        Error::InvalidArgument(format!("malformed protobuf: {e}"))
    }
}

impl Error {
    pub fn grpc_code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            Error::InvalidArgument(_) | Error::UnknownInstance(_) => Code::InvalidArgument,
            Error::NotFound(_) => Code::NotFound,
            Error::MisdirectedHost(_) => Code::PermissionDenied,
            Error::Unauthenticated(_) => Code::Unauthenticated,
            Error::PermissionDenied(_) => Code::PermissionDenied,
            Error::ResourceExhausted(_) => Code::ResourceExhausted,
            Error::OutOfRange(_) => Code::OutOfRange,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::Aborted(_) => Code::Aborted,
            Error::Unimplemented(_) => Code::Unimplemented,
            Error::Unavailable(_) => Code::Unavailable,
            Error::DeadlineExceeded(_) => Code::DeadlineExceeded,
            Error::Internal(_) => Code::Internal,
            Error::Unsupported(_) => Code::InvalidArgument,
            Error::Store(e) => e.grpc_code(),
        }
    }

    pub fn http_status(&self) -> StatusCode {
        match self {
            Error::InvalidArgument(_) | Error::OutOfRange(_) => StatusCode::BAD_REQUEST,
            Error::UnknownInstance(_) | Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::MisdirectedHost(_) => StatusCode::MISDIRECTED_REQUEST,
            Error::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            Error::PermissionDenied(_) => StatusCode::FORBIDDEN,
            Error::ResourceExhausted(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::Aborted(_) | Error::FailedPrecondition(_) | Error::AlreadyExists(_) => {
                StatusCode::CONFLICT
            }
            Error::Unimplemented(_) => StatusCode::NOT_IMPLEMENTED,
            Error::Unavailable(_) => StatusCode::BAD_GATEWAY,
            Error::DeadlineExceeded(_) => StatusCode::GATEWAY_TIMEOUT,
            Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Error::Unsupported(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Error::Store(e) => match e.grpc_code() {
                tonic::Code::InvalidArgument => StatusCode::BAD_REQUEST,
                tonic::Code::ResourceExhausted => StatusCode::INSUFFICIENT_STORAGE,
                tonic::Code::Unavailable => StatusCode::BAD_GATEWAY,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            },
        }
    }

    /// What the client is told. The server's own failures (a backend that is away, an
    /// internal error) are told by kind only: their messages name internal addresses and
    /// paths, which go to the log (`log_detail`).
    pub fn public_message(&self) -> String {
        match self {
            Error::Store(e) => e.public_message(),
            Error::Internal(_) => "internal error; the server's log has the details".into(),
            other => other.to_string(),
        }
    }

    /// Logs the full message of an error whose client message leaves it out.
    pub fn log_detail(&self) {
        match self {
            Error::Internal(_) => tracing::error!(error = %self, "internal error"),
            Error::Store(e) if e.is_internal_detail() => {
                tracing::warn!(error = %self, "store error (the client is told only its kind)")
            }
            _ => {}
        }
    }

    /// The `google.rpc.Status` form used inside batch responses.
    pub fn to_rpc_status(&self) -> bazel_remote_apis::google::rpc::Status {
        self.log_detail();
        bazel_remote_apis::google::rpc::Status {
            code: self.grpc_code() as i32,
            message: self.public_message(),
            details: vec![],
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        e.log_detail();
        tonic::Status::new(e.grpc_code(), e.public_message())
    }
}

pub fn ok_rpc_status() -> bazel_remote_apis::google::rpc::Status {
    bazel_remote_apis::google::rpc::Status {
        code: 0,
        message: String::new(),
        details: vec![],
    }
}

/// The HTTP answer for an error: its status, its client message (see `public_message`),
/// and for 401 the Basic challenge a browser answers with a prompt.
pub fn error_response(e: Error) -> axum::response::Response {
    use axum::http::{header, HeaderValue};
    use axum::response::IntoResponse;
    let status = e.http_status();
    e.log_detail();
    let mut resp = (status, format!("{}\n", e.public_message())).into_response();
    if status == StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"lre\""),
        );
    }
    resp
}
