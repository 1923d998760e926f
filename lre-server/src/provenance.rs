//! Who wrote which action results, for operators: `GET /api/provenance` lists the entries
//! one token or one worker wrote, `POST /api/provenance/purge` removes them, and
//! `GET /api/provenance/action` says who wrote one entry (what `lre explain --server`
//! shows for a hit). A leaked token is then a recoverable event: purge what it wrote, and
//! everyone else's results stay.
//!
//! Listing and purging need an `admin` token and see only the instances it may read; one
//! entry's writer is shown to anyone who may read its instance (the status page shows it
//! for recent hits already). The scan reads every entry of the action-cache store (each
//! replica's fast tier too, with a fast-slow action cache), a few at a time.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::auth::http_credential as credential;
use crate::auth::{Access, Principal};
use crate::context::{Provenance, ServerContext};
use crate::digest::{Digest, DigestFunction};
use crate::error::error_response;
use crate::error::{Error, Result};
use crate::store::{Key, KeyKind};
use lre_store::ac_entry::{AcEntry, Writer};

/// Entries read at once during a scan.
const SCAN_CONCURRENCY: usize = 16;
/// Entries listed in one answer; the count covers them all.
pub const MAX_LISTED: usize = 10_000;

pub fn routes(cache: Arc<ServerContext>) -> Router {
    Router::new()
        .route("/api/provenance", get(list))
        .route("/api/provenance/purge", post(purge))
        .route("/api/provenance/action", get(one))
        .with_state(cache)
}

#[derive(Debug, Deserialize)]
pub struct WriterQuery {
    /// `token:NAME` or `worker:ID`.
    pub writer: String,
    /// Only this instance's entries.
    pub instance: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Listing {
    pub writer: String,
    /// Entries the writer wrote (all of them, also past `MAX_LISTED`).
    pub count: usize,
    /// Entries the scan read in all.
    pub scanned: usize,
    pub entries: Vec<Provenance>,
    /// With purge: how many were removed.
    pub purged: Option<usize>,
}

fn admin(cache: &ServerContext, headers: &HeaderMap) -> Result<Principal> {
    let p = cache.auth.authenticate(credential(headers)?)?;
    cache.auth.authorize_admin(&p)?;
    Ok(p)
}

/// Every entry `writer` wrote, of the instances `visible` allows; with `purge`, removed.
pub async fn scan(
    cache: &ServerContext,
    writer: &Writer,
    instance: Option<&str>,
    visible: impl Fn(&str) -> bool,
    purge: bool,
) -> Result<Listing> {
    let store = cache.action_results.unchecked().clone();
    let keys = store.list(KeyKind::Ac).await?;
    let scanned = keys.len();
    let mut found: Vec<(Key, Provenance)> = Vec::new();
    let mut reads = futures::stream::iter(keys)
        .map(|k| {
            let store = store.clone();
            async move { (k, store.get(&k).await) }
        })
        .buffer_unordered(SCAN_CONCURRENCY);
    while let Some((k, got)) = reads.next().await {
        // Gone meanwhile (evicted, replaced), or not an action result (a Remote Asset
        // record): not this writer's.
        let Ok(Some(raw)) = got else { continue };
        let Ok(AcEntry {
            provenance: Some(p),
            ..
        }) = AcEntry::decode(raw)
        else {
            continue;
        };
        if p.written_by(writer) && instance.is_none_or(|i| i == p.instance) && visible(&p.instance)
        {
            found.push((k, p));
        }
    }
    let count = found.len();
    let mut purged = None;
    if purge {
        let mut n = 0;
        for (k, p) in &found {
            store.remove(k).await?;
            tracing::warn!(instance = %p.instance, action = %p.action, writer = %p.who(), "purged an action result");
            n += 1;
        }
        purged = Some(n);
    }
    found.sort_by_key(|(_, p)| std::cmp::Reverse(p.written_at_ms));
    Ok(Listing {
        writer: match writer {
            Writer::Token(t) => format!("token:{t}"),
            Writer::Worker(w) => format!("worker:{w}"),
        },
        count,
        scanned,
        entries: found.into_iter().take(MAX_LISTED).map(|(_, p)| p).collect(),
        purged,
    })
}

async fn listing(
    cache: &ServerContext,
    headers: &HeaderMap,
    q: &WriterQuery,
    purge: bool,
) -> Result<Listing> {
    let p = admin(cache, headers)?;
    let writer: Writer = q.writer.parse().map_err(Error::InvalidArgument)?;
    let listing = scan(
        cache,
        &writer,
        q.instance.as_deref(),
        |i| p.may(i, Access::Read),
        purge,
    )
    .await?;
    if purge {
        tracing::warn!(
            admin = p.name.as_deref().unwrap_or(""),
            writer = %listing.writer,
            purged = listing.purged.unwrap_or(0),
            "purged every action result one writer wrote"
        );
    }
    Ok(listing)
}

async fn list(
    State(cache): State<Arc<ServerContext>>,
    headers: HeaderMap,
    Query(q): Query<WriterQuery>,
) -> Response {
    match listing(&cache, &headers, &q, false).await {
        Ok(l) => crate::status::page::json(&l),
        Err(e) => error_response(e),
    }
}

async fn purge(
    State(cache): State<Arc<ServerContext>>,
    headers: HeaderMap,
    Query(q): Query<WriterQuery>,
) -> Response {
    match listing(&cache, &headers, &q, true).await {
        Ok(l) => crate::status::page::json(&l),
        Err(e) => error_response(e),
    }
}

#[derive(Debug, Deserialize)]
pub struct ActionQuery {
    #[serde(default)]
    pub instance: String,
    /// The action's hash, lowercase hex.
    pub action: String,
    /// Its digest function, `sha256` or `blake3`; absent: whichever entry exists,
    /// SHA-256's first.
    #[serde(default)]
    pub function: Option<String>,
}

/// Who wrote the entry of one action; `null` when there is none or it predates provenance.
async fn one(
    State(cache): State<Arc<ServerContext>>,
    headers: HeaderMap,
    Query(q): Query<ActionQuery>,
) -> Response {
    let r = async {
        let cred = credential(&headers)?;
        cache.authorize(cred, &q.instance, Access::Read)?;
        let hash = Digest::parse_hash(&q.action)?;
        // The action's hash alone does not say its function: the query may, or else
        // either entry answers.
        let functions = match q.function.as_deref() {
            None => DigestFunction::ALL.to_vec(),
            Some(name) => vec![DigestFunction::parse_name(name)
                .map_err(|why| Error::InvalidArgument(format!("function: {why}")))?],
        };
        let mut raw = None;
        for function in functions {
            let key = Key::ac(&q.instance, function, &hash);
            raw = cache.action_results.unchecked().get(&key).await?;
            if raw.is_some() {
                break;
            }
        }
        Ok::<_, Error>(raw.and_then(|r| AcEntry::decode(r).ok()?.provenance))
    };
    match r.await {
        Ok(p) => crate::status::page::json(&p),
        Err(e) => error_response(e),
    }
}
