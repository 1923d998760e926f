//! What the server remembers: (instance, kind, URI, qualifiers) → a digest in the CAS, kept
//! in the store's action-cache key space, so it is durable, size-bounded and evicted like
//! everything else. One entry per URI, so a pushed or fetched URI is found again whatever
//! mirrors a later request lists beside it.

use std::collections::{HashSet, VecDeque};
use std::time::{SystemTime, UNIX_EPOCH};

use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use prost::Message;
use sha2::{Digest as _, Sha256};

use crate::context::ServerContext;
use crate::digest::{Digest, DigestFunction};
use crate::error::Result;
use crate::store::Key;

/// Directories visited when checking a remembered tree, at most.
const MAX_TREE_NODES: usize = 1_000_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Blob,
    Directory,
}

/// A remembered asset. Its tags start at 101, beyond every ActionResult field, so a
/// GetActionResult that happens to name this key decodes an empty result instead of failing
/// (which would make the cache drop the entry).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Entry {
    #[prost(message, optional, tag = "101")]
    pub digest: Option<re::Digest>,
    /// Unix seconds when the download started or the push happened.
    #[prost(int64, tag = "102")]
    pub stored_at: i64,
    /// Unix seconds after which the entry is not served; 0 for never (Push's `expire_at`).
    #[prost(int64, tag = "103")]
    pub expire_at: i64,
    /// SRI hashes ("sha384-…") known to match the content: verified on download, or given
    /// by the pusher. For a directory they describe the archive it was unpacked from.
    #[prost(string, repeated, tag = "104")]
    pub sri: Vec<String>,
    #[prost(bool, tag = "105")]
    pub pushed: bool,
}

pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Normalises a URI as the downloader would parse it, so spellings of one URL share entries.
fn canonical_uri(uri: &str) -> String {
    reqwest::Url::parse(uri).map_or_else(|_| uri.to_string(), |u| u.to_string())
}

/// The store key of one URI's entry: sha256("lre-asset-v1\0" + the length-prefixed kind,
/// URI and qualifier pairs), then the action-cache key of that hash in `instance`.
pub fn key(instance: &str, kind: Kind, uri: &str, parts: &[(String, String)]) -> Key {
    let mut h = Sha256::new();
    h.update(b"lre-asset-v1\0");
    let mut field = |s: &str| {
        h.update((s.len() as u64).to_le_bytes());
        h.update(s.as_bytes());
    };
    field(match kind {
        Kind::Blob => "blob",
        Kind::Directory => "directory",
    });
    field(&canonical_uri(uri));
    for (name, value) in parts {
        field(name);
        field(value);
    }
    Key::ac(instance, DigestFunction::Sha256, &h.finalize().into())
}

pub async fn load(cache: &ServerContext, key: &Key) -> Result<Option<(Entry, Digest)>> {
    let Some(raw) = cache.action_results.unchecked().get(key).await? else {
        return Ok(None);
    };
    let decoded = Entry::decode(raw).ok().and_then(|e| {
        Some((
            Digest::from_opt_proto(DigestFunction::Sha256, &e.digest).ok()??,
            e,
        ))
    });
    match decoded {
        Some((d, e)) => Ok(Some((e, d))),
        None => {
            // Not ours (an UpdateActionResult on the same hash): leave it alone.
            tracing::warn!(?key, "asset entry is unreadable; ignoring it");
            Ok(None)
        }
    }
}

pub async fn save(cache: &ServerContext, key: Key, entry: &Entry) -> Result<()> {
    let raw = entry.encode_to_vec();
    let mut w = cache
        .action_results
        .unchecked()
        .writer(Some(raw.len() as u64))
        .await?;
    w.write(&raw).await?;
    Ok(w.commit(key).await?)
}

/// The first blob or directory of the tree under `root` that the CAS lacks (or that is not a
/// Directory), so a remembered or pushed tree is only served whole. Refreshes what it finds.
pub async fn tree_missing(cache: &ServerContext, root: Digest) -> Result<Option<Digest>> {
    let mut seen = HashSet::from([root]);
    let mut queue = VecDeque::from([root]);
    let mut files = Vec::new();
    while let Some(d) = queue.pop_front() {
        if seen.len() > MAX_TREE_NODES {
            tracing::warn!(%root, "tree too large to check; treating it as incomplete");
            return Ok(Some(root));
        }
        let Some(raw) = cache.read_blob(&d).await? else {
            return Ok(Some(d));
        };
        let Ok(dir) = re::Directory::decode(raw) else {
            return Ok(Some(d));
        };
        for f in &dir.files {
            match Digest::from_opt_proto(DigestFunction::Sha256, &f.digest) {
                Ok(Some(fd)) => files.push(fd),
                _ => return Ok(Some(d)),
            }
        }
        for c in &dir.directories {
            match Digest::from_opt_proto(DigestFunction::Sha256, &c.digest) {
                Ok(Some(cd)) if seen.insert(cd) => queue.push_back(cd),
                Ok(Some(_)) => {}
                _ => return Ok(Some(d)),
            }
        }
    }
    let mut unique = HashSet::new();
    files.retain(|f| unique.insert(*f));
    Ok(cache.find_missing(&files).await?.first().copied())
}
