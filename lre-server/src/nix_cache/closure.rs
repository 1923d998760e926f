//! Closure manifests: a toolchain's store paths, registered under the `lre-closure:sha256:`
//! id that `lre generate` pins in the platform. The manifest is the sorted paths, each
//! followed by a newline, and the id is its SHA-256, so it verifies itself.
//!
//! A manifest is accepted only if it is that exact form, at most `MAX_PATHS` paths, every
//! path has a servable narinfo in the instance, and the set is closed under references
//! (a worker materializing it needs nothing else). It is served only while that still
//! holds: a path whose NAR was evicted makes the closure 404, never half a toolchain.

use bytes::Bytes;
use lre_nix_formats::StorePath;
use lre_store::store::{BlobStore, Key};
use sha2::{Digest as _, Sha256};

use crate::context::ServerContext;
use crate::error::{Error, Result};

/// Toolchain closures are hundreds of paths; checking one costs a read per path.
pub const MAX_PATHS: usize = 16_384;
/// A store path is at most 11 + 32 + 1 + 211 bytes and a newline.
pub const MAX_SIZE: usize = MAX_PATHS * 256;

/// The paths of a well-formed manifest whose SHA-256 is `id`.
pub fn parse(id: &str, body: &[u8]) -> Result<Vec<StorePath>> {
    let bad = |why: String| Error::InvalidArgument(format!("closure {id}: {why}"));
    let actual = hex::encode(Sha256::digest(body));
    if actual != id {
        return Err(bad(format!(
            "the manifest hashes to {actual}: it must be the closure's sorted store paths, \
             one per line, as `lre generate` hashes them"
        )));
    }
    let text = std::str::from_utf8(body).map_err(|_| bad("not UTF-8".into()))?;
    let Some(text) = text.strip_suffix('\n') else {
        return Err(bad("every path ends with a newline".into()));
    };
    let lines: Vec<&str> = text.split('\n').collect();
    if lines.len() > MAX_PATHS {
        return Err(bad(format!("more than {MAX_PATHS} paths")));
    }
    if lines.windows(2).any(|w| w[0] >= w[1]) {
        return Err(bad("paths must be sorted and unique".into()));
    }
    lines
        .iter()
        .map(|l| StorePath::parse(l).map_err(|e| bad(e.to_string())))
        .collect()
}

/// Checks that every path is servable and the set closed; `Err` names the first gap.
async fn check_complete(cache: &ServerContext, instance: &str, paths: &[StorePath]) -> Result<()> {
    let set: std::collections::HashSet<&StorePath> = paths.iter().collect();
    for p in paths {
        let info = super::narinfo::servable(cache, instance, &p.hash_part()).await?;
        // By its whole name: another path with the same hash part is not this one.
        let Some(info) = info.filter(|i| i.store_path == *p) else {
            return Err(Error::FailedPrecondition(format!(
                "{p} is not in this cache (or its NAR is gone): publish the toolchain again \
                 (`lre publish`)"
            )));
        };
        let outside = info.other_references().find(|r| !set.contains(r)).cloned();
        if let Some(r) = outside {
            return Err(Error::InvalidArgument(format!(
                "{p} refers to {r}, which the manifest leaves out: a closure lists every path \
                 its paths refer to"
            )));
        }
    }
    Ok(())
}

pub async fn put(cache: &ServerContext, instance: &str, id: &str, body: Bytes) -> Result<()> {
    let paths = parse(id, &body)?;
    check_complete(cache, instance, &paths).await?;
    let store: &dyn BlobStore = cache.action_results.as_ref();
    let mut w = store.writer(Some(body.len() as u64)).await?;
    w.write_bytes(body).await?;
    w.commit(Key::closure_manifest(instance, id)).await?;
    tracing::info!(
        instance,
        closure = id,
        paths = paths.len(),
        "closure registered"
    );
    Ok(())
}

/// The manifest, if registered and still complete.
pub async fn get(cache: &ServerContext, instance: &str, id: &str) -> Result<Option<Bytes>> {
    let Some(body) = cache
        .action_results
        .get(&Key::closure_manifest(instance, id))
        .await?
    else {
        return Ok(None);
    };
    let paths = match parse(id, &body) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(instance, closure = id, error = %e, "a stored closure manifest is malformed; treated as absent");
            return Ok(None);
        }
    };
    match check_complete(cache, instance, &paths).await {
        Ok(()) => Ok(Some(body)),
        Err(Error::FailedPrecondition(why)) | Err(Error::InvalidArgument(why)) => {
            tracing::info!(
                instance,
                closure = id,
                why,
                "closure withheld: no longer complete"
            );
            Ok(None)
        }
        Err(e) => Err(e),
    }
}
