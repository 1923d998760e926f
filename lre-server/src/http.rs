//! The HTTP/1.1 cache protocol Bazel speaks with `--remote_cache=http://...`
//! (`GET`/`HEAD`/`PUT` on `{prefix}/ac/{sha256}` and `{prefix}/cas/{sha256}`), plus
//! `/metrics` and `/healthz`. The prefix is the instance name, so HTTP and gRPC clients
//! of the same instance share one action cache. Paths under `{prefix}/nix/` are the
//! instance's Nix binary cache (`nix_cache`).
//!
//! The protocol names no digest function. A BLAKE3 client names it in the path,
//! `{prefix}/cas/blake3/{hash}` (the layout bazel-remote's BLAKE3 proposal uses), or in an
//! `X-Digest-Function: blake3` header; both at once must agree. Without either a hash is
//! SHA-256's.

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

use crate::auth::{http_credential as credential, Access};
use crate::blob_response;
use crate::context::{ResultSource, ServerContext};
use crate::digest::{Digest, DigestFunction};
use crate::error::{error_response, Error, Result};
use crate::scheduler::Scheduler;
use lre_store::StoreError;

/// Action results are small; anything bigger is not one.
const MAX_AC_BODY: usize = 16 << 20;

pub fn router(
    cache: Arc<ServerContext>,
    scheduler: Option<Arc<Scheduler>>,
    hosts: HostPolicy,
) -> Router {
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
        .with_state(cache.clone())
        .merge(status)
        .merge(crate::provenance::routes(cache))
        .layer(axum::middleware::from_fn_with_state(Arc::new(hosts), guard))
}

/// Which `Host` names the HTTP port answers to. A web page a developer visits can reach
/// a loopback server under its own name once its DNS answers 127.0.0.1 (DNS rebinding),
/// and the browser then treats the server as that page's own origin: refusing names the
/// server does not serve closes that door. IP literals and `localhost` are always served
/// (a page cannot send them as its own host); other names only when configured
/// (`http_allowed_hosts`). Under TLS every name is served: a page on another name cannot
/// complete a handshake with this server's certificate.
#[derive(Clone, Debug, Default)]
pub struct HostPolicy {
    pub tls: bool,
    pub names: Vec<String>,
}

impl HostPolicy {
    /// Whether a request whose `Host` (or `Origin` host) is `host` is served. `host` may
    /// carry a port; names compare without case.
    pub fn serves(&self, host: &str) -> bool {
        if self.tls {
            return true;
        }
        let name = host_name(host);
        if name.parse::<std::net::IpAddr>().is_ok() {
            return true;
        }
        let name = name.to_ascii_lowercase();
        let name = name.trim_end_matches('.');
        name == "localhost"
            || name.ends_with(".localhost")
            || self
                .names
                .iter()
                .any(|n| n.trim_end_matches('.').eq_ignore_ascii_case(name))
    }
}

/// The name (or address) of a `host[:port]`, IPv6 brackets removed.
fn host_name(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

/// Refuses requests for a `Host` the server does not serve, and writes a browser sends on
/// behalf of another site; adds the headers every response carries.
async fn guard(
    State(hosts): State<Arc<HostPolicy>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let headers = request.headers();
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| request.uri().authority().map(|a| a.as_str()))
        .unwrap_or("");
    let refused = if !host.is_empty() && !hosts.serves(host) {
        Some(Error::MisdirectedHost(format!(
            "this server does not serve the host name {:?} (a web page rebinding its name to \
             this address?); if it is one of this server's names, add it to \
             http_allowed_hosts",
            crate::request_meta::clip(host_name(host).to_string())
        )))
    } else if !matches!(*request.method(), Method::GET | Method::HEAD) && cross_site(headers, host)
    {
        Some(Error::PermissionDenied(
            "a browser sent this write on behalf of another site (its Origin or Sec-Fetch-Site \
             says so); writes come from build tools, not web pages"
                .into(),
        ))
    } else {
        None
    };
    let mut resp = match refused {
        Some(e) => {
            tracing::info!(host, error = %e, "refused an HTTP request");
            error_response(e)
        }
        None => next.run(request).await,
    };
    let h = resp.headers_mut();
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    // The pages are rendered on the server and need no script; their styles are inline.
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; \
             form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    resp
}

/// Whether a browser says this request comes from another site than `host`.
fn cross_site(headers: &HeaderMap, host: &str) -> bool {
    let fetch_site = headers
        .get("sec-fetch-site")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if matches!(fetch_site, "cross-site" | "same-site") {
        return true;
    }
    match headers.get(header::ORIGIN).map(|v| v.to_str()) {
        None => false,
        // An opaque origin (a sandboxed frame, a file) or one that is not this host.
        Some(Ok(origin)) => {
            let authority = origin.split_once("://").map(|(_, a)| a).unwrap_or("");
            origin == "null" || !host_name(authority).eq_ignore_ascii_case(host_name(host))
        }
        Some(Err(_)) => true,
    }
}

async fn metrics(State(cache): State<Arc<ServerContext>>, headers: HeaderMap) -> Response {
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

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    Ac,
    Cas,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Ac => "ac",
            Kind::Cas => "cas",
        }
    }
}

/// What a cache URL names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobPath {
    pub instance: String,
    pub kind: Kind,
    /// `None` when the path names no function (the header, or SHA-256, decides).
    pub function: Option<DigestFunction>,
    pub hash: [u8; 32],
}

impl BlobPath {
    /// The path that names this, canonically spelled.
    pub fn canonical(&self) -> String {
        let mut p = String::new();
        if !self.instance.is_empty() {
            p = format!("/{}", self.instance);
        }
        p.push('/');
        p.push_str(self.kind.name());
        if let Some(f) = self.function {
            p.push('/');
            p.push_str(f.name());
        }
        p.push('/');
        p.push_str(&hex::encode(self.hash));
        p
    }
}

fn kind_of(seg: &str) -> Option<Kind> {
    match seg {
        "ac" => Some(Kind::Ac),
        "cas" => Some(Kind::Cas),
        _ => None,
    }
}

/// Splits `/{prefix...}/{ac|cas}[/{function}]/{hash}`. The segment before the hash is
/// the kind if it is `ac` or `cas`, otherwise a function's name with the kind before it.
pub fn parse_path(path: &str) -> Result<BlobPath> {
    let expected = || Error::NotFound(format!("{path}: expected /[prefix/]ac|cas/[blake3/]<hash>"));
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let n = segs.len();
    if n < 2 {
        return Err(expected());
    }
    let hash = segs[n - 1];
    let (kind, function, prefix_len) = match kind_of(segs[n - 2]) {
        Some(kind) => (kind, None, n - 2),
        None => {
            let kind = (n >= 3)
                .then(|| kind_of(segs[n - 3]))
                .flatten()
                .ok_or_else(expected)?;
            let function = DigestFunction::parse_name(segs[n - 2])
                .map_err(|why| Error::InvalidArgument(format!("{path}: {why}")))?;
            (kind, Some(function), n - 3)
        }
    };
    Ok(BlobPath {
        instance: segs[..prefix_len].join("/"),
        kind,
        function,
        hash: Digest::parse_hash(hash)?,
    })
}

/// The request's digest function: the path's, else the `X-Digest-Function` header's, else
/// SHA-256. A path and a header that disagree are refused.
fn function_of(path: &BlobPath, headers: &HeaderMap) -> Result<DigestFunction> {
    let header = match headers.get("x-digest-function") {
        None => None,
        Some(v) => {
            let name = v.to_str().unwrap_or("").to_ascii_lowercase();
            Some(
                DigestFunction::parse_name(&name)
                    .map_err(|why| Error::InvalidArgument(format!("X-Digest-Function: {why}")))?,
            )
        }
    };
    match (path.function, header) {
        (Some(p), Some(h)) if p != h => Err(Error::InvalidArgument(format!(
            "the path names digest function {p} and X-Digest-Function {h}"
        ))),
        (p, h) => Ok(p.or(h).unwrap_or_default()),
    }
}

async fn blob(
    State(cache): State<Arc<ServerContext>>,
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
    cache: &ServerContext,
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
    if let Some(nix) = crate::nix_cache::path::parse(path) {
        return crate::nix_cache::handle(cache, method, nix?, headers, body).await;
    }
    let parsed = parse_path(path)?;
    let function = function_of(&parsed, headers)?;
    let BlobPath {
        instance,
        kind,
        hash,
        ..
    } = parsed;
    let access = match (kind, write) {
        (_, false) => Access::Read,
        (Kind::Cas, true) => Access::Upload,
        (Kind::Ac, true) => Access::Write,
    };
    let cred = credential(headers)?;
    // Authorize before reading any of the body: a refused writer stores nothing.
    let caller = cache.authorize(cred, &instance, access)?;
    match (kind, access) {
        (Kind::Cas, Access::Read) => {
            blob_response::get_cas(cache, function, hash, *method == Method::HEAD).await
        }
        (Kind::Ac, Access::Read) => {
            get_ac(cache, &instance, function, hash, *method == Method::HEAD).await
        }
        (Kind::Cas, _) => put_cas(cache, function, hash, headers, body).await,
        (Kind::Ac, _) => put_ac(cache, &instance, function, hash, body, &caller).await,
    }
}

async fn get_ac(
    cache: &ServerContext,
    instance: &str,
    function: DigestFunction,
    hash: [u8; 32],
    head: bool,
) -> Result<Response> {
    let Some(hit) = cache.get_action_result(instance, function, hash).await? else {
        return Err(Error::NotFound(format!(
            "no complete action result for {}",
            hex::encode(hash)
        )));
    };
    let len = hit.raw.len() as u64;
    if head {
        return Ok(blob_response::with_length(
            StatusCode::OK,
            len,
            Body::empty(),
        ));
    }
    cache.metrics.bytes_sent.inc_by(len);
    Ok(blob_response::with_length(
        StatusCode::OK,
        len,
        Body::from(hit.raw),
    ))
}

async fn put_cas(
    cache: &ServerContext,
    function: DigestFunction,
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
    let mut upload = cache.upload(function, hash, declared).await?;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk =
            chunk.map_err(|e| Error::InvalidArgument(format!("upload body broke off: {e}")))?;
        let len = chunk.len() as u64;
        upload.write_bytes(chunk).await?;
        cache.metrics.bytes_received.inc_by(len);
    }
    upload.finish().await?;
    Ok(StatusCode::OK.into_response())
}

async fn put_ac(
    cache: &ServerContext,
    instance: &str,
    function: DigestFunction,
    hash: [u8; 32],
    body: Body,
    caller: &crate::auth::Principal,
) -> Result<Response> {
    let bytes = axum::body::to_bytes(body, MAX_AC_BODY)
        .await
        .map_err(|e| Error::InvalidArgument(format!("action result body: {e}")))?;
    let result = ActionResult::decode(bytes)?;
    cache
        .update_action_result(
            instance,
            function,
            hash,
            &result,
            ResultSource::Uploaded { caller },
        )
        .await?;
    Ok(StatusCode::OK.into_response())
}
