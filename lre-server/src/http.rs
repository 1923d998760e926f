//! The HTTP/1.1 cache protocol Bazel speaks with `--remote_cache=http://...`
//! (`GET`/`HEAD`/`PUT` on `{prefix}/ac/{sha256}` and `{prefix}/cas/{sha256}`), plus
//! `/metrics` and `/healthz`. The prefix is the instance name, so HTTP and gRPC clients
//! of the same instance share one action cache.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use bazel_remote_apis::build::bazel::remote::execution::v2::ActionResult;
use futures::StreamExt;
use prost::Message;
use tokio_util::io::ReaderStream;

use crate::auth::{parse_authorization, Access, Credential};
use crate::cache::Cache;
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::execution::ExecScheduler;
use lre_store::StoreError;

/// Action results are small; anything bigger is not one.
const MAX_AC_BODY: usize = 16 << 20;

pub fn router(cache: Arc<Cache>, scheduler: Option<Arc<ExecScheduler>>) -> Router {
    let status = crate::status::page::routes(crate::status::page::StatusState {
        cache: cache.clone(),
        scheduler,
        explain_slots: Arc::new(tokio::sync::Semaphore::new(
            crate::status::page::EXPLAIN_SLOTS,
        )),
    });
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .fallback(blob)
        .with_state(cache)
        .merge(status)
}

async fn metrics(State(cache): State<Arc<Cache>>, headers: HeaderMap) -> Response {
    if cache.activity.protects_metrics() {
        let allowed = credential(&headers)
            .and_then(|c| cache.auth.authenticate(c))
            .and_then(|p| cache.auth.authorize_status(&p));
        if let Err(e) = allowed {
            return error_response(e);
        }
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        cache.metrics.encode(),
    )
        .into_response()
}

/// The request's `Authorization` header (Basic or Bearer), if any.
pub(crate) fn credential(headers: &HeaderMap) -> Result<Option<Credential>> {
    headers
        .get(header::AUTHORIZATION)
        .map(|v| {
            parse_authorization(
                v.to_str().map_err(|_| {
                    Error::Unauthenticated("authorization header is not ASCII".into())
                })?,
            )
        })
        .transpose()
}

pub(crate) fn error_response(e: Error) -> Response {
    let status = e.http_status();
    let mut resp = (status, format!("{e}\n")).into_response();
    if status == StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"lre\""),
        );
    }
    resp
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Ac,
    Cas,
}

/// Splits `/{prefix...}/{ac|cas}/{hash}` into (instance, kind, hash).
pub fn parse_path(path: &str) -> Result<(String, Kind, [u8; 32])> {
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let n = segs.len();
    if n < 2 {
        return Err(Error::NotFound(format!(
            "{path}: expected /[prefix/]ac/<sha256> or /[prefix/]cas/<sha256>"
        )));
    }
    let kind = match segs[n - 2] {
        "ac" => Kind::Ac,
        "cas" => Kind::Cas,
        _ => {
            return Err(Error::NotFound(format!(
                "{path}: expected /[prefix/]ac/<sha256> or /[prefix/]cas/<sha256>"
            )))
        }
    };
    Ok((
        segs[..n - 2].join("/"),
        kind,
        Digest::parse_hash(segs[n - 1])?,
    ))
}

async fn blob(
    State(cache): State<Arc<Cache>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let _t = cache.metrics.timer(match method {
        Method::PUT => "http_put",
        Method::HEAD => "http_head",
        _ => "http_get",
    });
    match handle(&cache, &method, uri.path(), &headers, body).await {
        Ok(r) => r,
        Err(e) => {
            if matches!(
                e,
                Error::Store(
                    StoreError::DigestMismatch { .. }
                        | StoreError::SizeMismatch(_)
                        | StoreError::StorageFull(_)
                )
            ) {
                tracing::info!(path = uri.path(), error = %e, "http upload rejected");
            }
            error_response(e)
        }
    }
}

async fn handle(
    cache: &Cache,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response> {
    let write = match *method {
        Method::GET | Method::HEAD => false,
        Method::PUT => true,
        _ => return Ok(StatusCode::METHOD_NOT_ALLOWED.into_response()),
    };
    let (instance, kind, hash) = parse_path(path)?;
    let access = match (kind, write) {
        (_, false) => Access::Read,
        (Kind::Cas, true) => Access::Upload,
        (Kind::Ac, true) => Access::Write,
    };
    let cred = credential(headers)?;
    // Authorize before reading any of the body: a refused writer stores nothing.
    cache.authorize(cred, &instance, access)?;
    match (kind, access) {
        (Kind::Cas, Access::Read) => get_cas(cache, hash, *method == Method::HEAD).await,
        (Kind::Ac, Access::Read) => get_ac(cache, &instance, hash, *method == Method::HEAD).await,
        (Kind::Cas, _) => put_cas(cache, hash, headers, body).await,
        (Kind::Ac, _) => put_ac(cache, &instance, hash, body).await,
    }
}

fn with_length(status: StatusCode, len: u64, body: Body) -> Response {
    let mut r = (status, body).into_response();
    r.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    r
}

async fn get_cas(cache: &Cache, hash: [u8; 32], head: bool) -> Result<Response> {
    let Some((size, reader)) = cache.open_cas_by_hash(hash).await? else {
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

async fn get_ac(cache: &Cache, instance: &str, hash: [u8; 32], head: bool) -> Result<Response> {
    let Some(hit) = cache.get_action_result(instance, hash).await? else {
        return Err(Error::NotFound(format!(
            "no complete action result for {}",
            hex::encode(hash)
        )));
    };
    let len = hit.raw.len() as u64;
    if head {
        return Ok(with_length(StatusCode::OK, len, Body::empty()));
    }
    cache.metrics.bytes_sent.inc_by(len);
    Ok(with_length(StatusCode::OK, len, Body::from(hit.raw)))
}

async fn put_cas(
    cache: &Cache,
    hash: [u8; 32],
    headers: &HeaderMap,
    body: Body,
) -> Result<Response> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.parse::<u64>()
                .map_err(|_| Error::InvalidArgument(format!("bad Content-Length {v:?}")))
        })
        .transpose()?;
    let mut upload = cache.upload(hash, declared).await?;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk =
            chunk.map_err(|e| Error::InvalidArgument(format!("upload body broke off: {e}")))?;
        upload.write(&chunk).await?;
        cache.metrics.bytes_received.inc_by(chunk.len() as u64);
    }
    upload.finish().await?;
    Ok(StatusCode::OK.into_response())
}

async fn put_ac(cache: &Cache, instance: &str, hash: [u8; 32], body: Body) -> Result<Response> {
    let bytes = axum::body::to_bytes(body, MAX_AC_BODY)
        .await
        .map_err(|e| Error::InvalidArgument(format!("action result body: {e}")))?;
    let result = ActionResult::decode(bytes)?;
    cache.update_action_result(instance, hash, &result).await?;
    Ok(StatusCode::OK.into_response())
}
