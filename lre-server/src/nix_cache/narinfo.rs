//! Narinfos: which the cache accepts, how it keeps them, and when it serves one.
//!
//! A narinfo is accepted only if (cheapest check first):
//! 1. it names the path its URL names;
//! 2. its NAR is in the CAS with the declared size;
//! 3. every other path it references has a narinfo in this instance;
//! 4. it is signed by one of the instance's `trusted_public_keys`, or carries a content
//!    address the server re-computes from the NAR itself;
//! 5. the stored NAR parses strictly and hashes to the NarHash;
//! 6. no different narinfo for the path exists (write-once: a second, different NAR for a
//!    path is a conflict; the same one with new trusted signatures merges them), unless
//!    no current key vouches for the existing one any more.
//!
//! A `CA:` line is verified whenever present (the fingerprint does not cover it, so a
//! signature does not vouch for it), or dropped from a signed narinfo if lre cannot check
//! it. Serving re-checks trust against the instance's current keys.
//!
//! It is kept in the instance's action-result store (`Key::nar_info`), so every replica
//! reading that store serves it, in the canonical form lre serves (uncompressed NAR,
//! trusted signatures only). A narinfo is served only while its NAR is in the CAS with
//! its size: Nix treats a narinfo without its NAR as a hard failure.

use bytes::Bytes;
use lre_nix_formats::content_address::ContentAddress;
use lre_nix_formats::nar::{NarParser, Validate};
use lre_nix_formats::{NarInfo, PublicKey};
use lre_store::store::{BlobStore, Key};
use tokio::io::AsyncReadExt;

use crate::config::NixCacheSettings;
use crate::context::ServerContext;
use crate::error::{Error, Result};
use crate::instance::toml_key;

/// The narinfo stored for `hash_part` in `instance`, if any (whether or not its NAR is
/// still there).
pub async fn load(
    cache: &ServerContext,
    instance: &str,
    hash_part: &str,
) -> Result<Option<NarInfo>> {
    let Some(raw) = cache
        .action_results
        .get(&Key::nar_info(instance, hash_part))
        .await?
    else {
        return Ok(None);
    };
    match std::str::from_utf8(&raw)
        .map_err(|e| e.to_string())
        .and_then(|t| NarInfo::parse(t).map_err(|e| e.to_string()))
    {
        Ok(info) => Ok(Some(info)),
        Err(e) => {
            tracing::warn!(instance, hash_part, error = %e, "a stored narinfo does not parse; treated as absent");
            Ok(None)
        }
    }
}

/// Whether the NAR `info` names is in the CAS with its size.
pub async fn nar_present(cache: &ServerContext, info: &NarInfo) -> Result<bool> {
    let found = cache.store.lookup(&[Key::Cas(info.nar_hash.0)]).await?;
    Ok(found.first().copied().flatten() == Some(info.nar_size))
}

/// The narinfo to serve for `hash_part`: `None` if there is none or its NAR is gone.
pub async fn servable(
    cache: &ServerContext,
    instance: &str,
    hash_part: &str,
) -> Result<Option<NarInfo>> {
    let Some(mut info) = load(cache, instance, hash_part).await? else {
        return Ok(None);
    };
    // Only what the instance trusts now: a key removed from trusted_public_keys stops
    // vouching for what it signed.
    let trusted = cache.instances.nix(instance).keys();
    let fingerprint = info.fingerprint();
    info.sigs
        .retain(|s| trusted.iter().any(|k| k.verifies(&fingerprint, s)));
    if !still_trusted(&info, &trusted) {
        tracing::info!(instance, path = %info.store_path, "narinfo withheld: no trusted key signed it any more");
        return Ok(None);
    }
    if !nar_present(cache, &info).await? {
        tracing::info!(instance, path = %info.store_path, "narinfo withheld: its NAR is no longer in the CAS");
        return Ok(None);
    }
    Ok(Some(info))
}

fn sign_hint(instance: &str, keys: &[PublicKey]) -> String {
    let setting = format!(
        "instance_settings.{}.nix.trusted_public_keys",
        toml_key(instance)
    );
    let trusted = if keys.is_empty() {
        "it trusts no key yet".to_string()
    } else {
        let names: Vec<&str> = keys.iter().map(|k| k.name.as_str()).collect();
        format!("it trusts {}", names.join(", "))
    };
    format!(
        "instance {instance:?} accepts a store path only if one of its trusted keys signed it \
         or it is content-addressed ({trusted}). Sign while copying: `nix-store \
         --generate-binary-cache-key NAME key.sec key.pub` once, then `nix copy --to \
         'http://HOST/nix?secret-key=key.sec' PATH`, and add key.pub's contents to {setting}"
    )
}

/// Whether `info` is still acceptable under the instance's current keys: a signature by
/// one of them, or a content address (every stored one was verified on acceptance, and
/// keys do not change what content makes).
fn still_trusted(info: &NarInfo, trusted: &[PublicKey]) -> bool {
    let fingerprint = info.fingerprint();
    info.ca.is_some()
        || info
            .sigs
            .iter()
            .any(|s| trusted.iter().any(|k| k.verifies(&fingerprint, s)))
}

/// Reading a NAR back to check it costs a full read: a bound on how many run at once.
static NAR_CHECKS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

async fn store(cache: &ServerContext, instance: &str, info: &NarInfo) -> Result<()> {
    let rendered = info.render_served();
    let store: &dyn BlobStore = cache.action_results.as_ref();
    let mut w = store.writer(Some(rendered.len() as u64)).await?;
    w.write_bytes(Bytes::from(rendered)).await?;
    w.commit(Key::nar_info(instance, &info.store_path.hash_part()))
        .await?;
    Ok(())
}

/// Checks `text` against the instance's policy and stores it; see the module's list.
pub async fn put(
    cache: &ServerContext,
    instance: &str,
    settings: &NixCacheSettings,
    hash_part: &str,
    text: &str,
) -> Result<()> {
    let mut info = NarInfo::parse(text)
        .map_err(|e| Error::InvalidArgument(format!("{hash_part}.narinfo: {e}")))?;
    let path = info.store_path.to_string();
    if info.store_path.hash_part() != hash_part {
        return Err(Error::InvalidArgument(format!(
            "{hash_part}.narinfo describes {path}, another path"
        )));
    }
    if info.nar_size > settings.max_nar_size.0 {
        return Err(Error::InvalidArgument(format!(
            "{path}: its NAR of {} bytes is larger than this instance's max_nar_size ({} bytes)",
            info.nar_size, settings.max_nar_size.0
        )));
    }
    let trusted = settings.keys();
    let fingerprint = info.fingerprint();
    info.sigs
        .retain(|s| trusted.iter().any(|k| k.verifies(&fingerprint, s)));

    // A path already here: the same contents may add trusted signatures, nothing else
    // changes (answered before any costly check, so repeats are cheap). A narinfo no
    // current key vouches for any more (its key was removed) may be replaced.
    if let Some(mut old) = load(cache, instance, hash_part).await? {
        if still_trusted(&old, &trusted) {
            if old.fingerprint() != fingerprint {
                return Err(Error::AlreadyExists(format!(
                    "{path} is already in this cache with other contents (NAR {} of {} \
                     bytes, or other references): a store path's contents never change, so \
                     the upload is refused",
                    old.nar_hash, old.nar_size
                )));
            }
            let new: Vec<_> = info
                .sigs
                .into_iter()
                .filter(|s| !old.sigs.contains(s))
                .collect();
            if new.is_empty() {
                return Ok(());
            }
            old.sigs.extend(new);
            old.sigs.truncate(lre_nix_formats::narinfo::MAX_SIGNATURES);
            return store(cache, instance, &old).await;
        }
    }

    if !nar_present(cache, &info).await? {
        return Err(Error::FailedPrecondition(format!(
            "{path}: its NAR ({} of {} bytes) is not in the cache; upload nar/ first",
            info.nar_url(),
            info.nar_size
        )));
    }
    // Each reference by its whole name: a narinfo for another path with the same hash
    // part is not the reference.
    for r in info.other_references() {
        let present = load(cache, instance, &r.hash_part()).await?;
        if present.is_none_or(|p| p.store_path != *r) {
            return Err(Error::FailedPrecondition(format!(
                "{path} refers to {r}, which this cache does not have: upload the whole \
                 closure, dependencies first (nix copy does)"
            )));
        }
    }

    // A content address is checked whenever there is one, signed or not: it is not part of
    // the fingerprint, so a signature says nothing about it. One lre cannot check (another
    // algorithm, a recursive one with a self-reference) is dropped from a signed narinfo.
    let signed = !info.sigs.is_empty();
    let ca = match info.ca.as_deref().map(ContentAddress::parse) {
        None => None,
        Some(Ok(ContentAddress::Recursive(_))) if info.references.contains(&info.store_path) => {
            None
        }
        Some(Ok(ca)) => Some(ca),
        Some(Err(_)) if signed => None,
        Some(Err(e)) => {
            return Err(Error::PermissionDenied(format!(
                "{path}: {e}; {}",
                sign_hint(instance, &trusted)
            )))
        }
    };
    if ca.is_none() {
        if !signed {
            return Err(Error::PermissionDenied(format!(
                "{path} is not signed by a trusted key{}. {}",
                if info.ca.is_some() {
                    " and lre cannot check its content address"
                } else {
                    ""
                },
                sign_hint(instance, &trusted)
            )));
        }
        info.ca = None;
    }

    let summary = {
        let _slot = NAR_CHECKS
            .acquire()
            .await
            .map_err(|_| Error::Internal("NAR check slots closed".into()))?;
        parse_stored_nar(cache, &info).await?
    };
    if let Some(ca) = ca {
        ca.verify(
            &info.store_path,
            &info.references,
            &summary.nar_hash,
            &summary.root,
        )
        .map_err(|why| {
            Error::PermissionDenied(format!(
                "{path} claims content address {}, but {why}: refused",
                info.ca.as_deref().unwrap_or("")
            ))
        })?;
    }
    store(cache, instance, &info).await?;
    tracing::info!(instance, path = %info.store_path, nar = %info.nar_hash, "narinfo accepted");
    Ok(())
}

/// Reads the NAR back from the CAS through the strict parser: a NAR that reached the CAS
/// another way (ByteStream) is judged exactly as one uploaded here.
async fn parse_stored_nar(
    cache: &ServerContext,
    info: &NarInfo,
) -> Result<lre_nix_formats::NarSummary> {
    let path = &info.store_path;
    let gone = || {
        Error::FailedPrecondition(format!(
            "{path}: its NAR left the cache while being checked; upload it again"
        ))
    };
    let (_, mut reader) = cache
        .store
        .open(&Key::Cas(info.nar_hash.0), 0, None)
        .await?
        .ok_or_else(gone)?;
    let mut parser = NarParser::new(info.nar_size);
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        parser
            .feed(&buf[..n], &mut Validate)
            .map_err(|e| Error::InvalidArgument(format!("{path}: its NAR is refused: {e}")))?;
    }
    let summary = parser
        .finish()
        .map_err(|e| Error::InvalidArgument(format!("{path}: its NAR is refused: {e}")))?;
    if summary.nar_hash != info.nar_hash {
        return Err(Error::Internal(format!(
            "{path}: the CAS blob {} hashes to {}",
            info.nar_hash, summary.nar_hash
        )));
    }
    Ok(summary)
}
