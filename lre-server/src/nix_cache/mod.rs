//! The Nix binary cache each instance serves on the HTTP port, at `/{instance}/nix`
//! (the default instance: `/nix`): what `nix copy --to http://…` uploads to and
//! `substituters = http://…` reads from. NARs are CAS blobs (SHA-256 of the NAR, which
//! is Nix's NarHash); narinfos are per instance and accepted only under the instance's
//! trust policy (`narinfo`). Scopes are the HTTP cache's: `read` substitutes, uploading
//! takes `read-write` (or `worker`), both for the instance of the URL only.

pub mod closure;
pub mod nar_upload;
pub mod narinfo;
pub mod path;

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::auth::{http_credential as credential, Access};
use crate::context::ServerContext;
use crate::digest::DigestFunction;
use crate::error::{Error, Result};
use path::{Compression, NixPath, Target};

/// Nix asks for this first; a 404 would make it try to create the cache.
const CACHE_INFO: &str = "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 30\n";

pub async fn handle(
    cache: &ServerContext,
    method: &Method,
    req: NixPath,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response> {
    let head = *method == Method::HEAD;
    let access = match *method {
        Method::GET | Method::HEAD => Access::Read,
        Method::PUT => Access::Upload,
        _ => return Ok(StatusCode::METHOD_NOT_ALLOWED.into_response()),
    };
    // Authorize before reading any of the body: a refused writer stores nothing.
    cache.authorize(credential(headers)?, &req.instance, access)?;
    let instance = req.instance.as_str();
    match (req.target, access) {
        (Target::CacheInfo, Access::Read) => {
            Ok(text(CACHE_INFO.to_string(), "text/x-nix-cache-info", head))
        }
        // Nix writes this only after a GET found none; ours is fixed.
        (Target::CacheInfo, _) => Ok(StatusCode::OK.into_response()),
        (Target::NarInfo(hash_part), Access::Read) => {
            match narinfo::servable(cache, instance, &hash_part).await? {
                Some(info) => Ok(text(info.render_served(), "text/x-nix-narinfo", head)),
                None => Err(Error::NotFound(format!(
                    "no narinfo for {hash_part} in this cache"
                ))),
            }
        }
        (Target::NarInfo(hash_part), _) => {
            let bytes = axum::body::to_bytes(body, lre_nix_formats::narinfo::MAX_SIZE)
                .await
                .map_err(|e| Error::InvalidArgument(format!("{hash_part}.narinfo: {e}")))?;
            let text = std::str::from_utf8(&bytes)
                .map_err(|_| Error::InvalidArgument(format!("{hash_part}.narinfo is not UTF-8")))?;
            let settings = cache.instances.nix(instance);
            narinfo::put(cache, instance, &settings, &hash_part, text).await?;
            Ok(StatusCode::OK.into_response())
        }
        (Target::Closure(id), Access::Read) => match closure::get(cache, instance, &id).await? {
            Some(body) => {
                let body = String::from_utf8_lossy(&body).into_owned();
                Ok(text(body, "text/plain; charset=utf-8", head))
            }
            None => Err(Error::NotFound(format!(
                "closure lre-closure:sha256:{id} is not registered in this instance (or no \
                 longer complete): publish it with `lre publish`"
            ))),
        },
        (Target::Closure(id), _) => {
            let body = axum::body::to_bytes(body, closure::MAX_SIZE)
                .await
                .map_err(|e| Error::InvalidArgument(format!("closure {id}: {e}")))?;
            closure::put(cache, instance, &id, body).await?;
            Ok(StatusCode::OK.into_response())
        }
        (
            Target::Nar {
                file_hash,
                compression,
            },
            Access::Read,
        ) => {
            // lre keeps NARs uncompressed, named by NarHash: that is the only form it serves.
            if compression != Compression::None {
                return Err(Error::NotFound(format!(
                    "nar/{}{}: this cache keeps NARs uncompressed",
                    file_hash.base32(),
                    compression.extension()
                )));
            }
            crate::blob_response::get_cas(cache, DigestFunction::Sha256, file_hash.0, head).await
        }
        (
            Target::Nar {
                file_hash,
                compression,
            },
            _,
        ) => {
            let name = format!("{}{}", file_hash.base32(), compression.extension());
            let settings = cache.instances.nix(instance);
            let (nar_hash, size) = nar_upload::put(
                cache,
                &name,
                file_hash,
                compression,
                settings.max_nar_size.0,
                body,
            )
            .await?;
            tracing::info!(instance, file = %name, nar = %nar_hash, size, "NAR stored");
            Ok(StatusCode::OK.into_response())
        }
    }
}

fn text(body: String, content_type: &'static str, head: bool) -> Response {
    let len = body.len() as u64;
    let mut r = if head {
        StatusCode::OK.into_response()
    } else {
        (StatusCode::OK, body).into_response()
    };
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    r
}
