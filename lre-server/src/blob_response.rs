//! HTTP responses carrying a blob: a CAS blob streamed (or its size, for HEAD) with its
//! `Content-Length`, for the HTTP cache and the Nix binary cache alike.

use axum::body::Body;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use tokio_util::io::ReaderStream;

use crate::context::ServerContext;
use crate::digest::DigestFunction;
use crate::error::{Error, Result};

pub fn with_length(status: StatusCode, len: u64, body: Body) -> Response {
    let mut r = (status, body).into_response();
    r.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    r
}

pub async fn get_cas(
    cache: &ServerContext,
    function: DigestFunction,
    hash: [u8; 32],
    head: bool,
) -> Result<Response> {
    let Some((size, reader)) = cache.open_cas_by_hash(function, hash).await? else {
        return Err(Error::NotFound(format!(
            "blob {} is not in the CAS",
            hex::encode(hash)
        )));
    };
    if head {
        return Ok(with_length(StatusCode::OK, size, Body::empty()));
    }
    cache.metrics.bytes_sent.inc_by(size);
    Ok(with_length(
        StatusCode::OK,
        size,
        Body::from_stream(ReaderStream::with_capacity(reader, 256 * 1024)),
    ))
}
