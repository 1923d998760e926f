//! The action cache's completeness rule as a layer (Buildbarn's `completenesschecking`): an
//! action result read through it is returned only if every blob it references is in the
//! CAS — output files, stdout and stderr, each output directory's Tree and every file in
//! it. A client that trusts a hit (Bazel's Build without the Bytes) then never meets an
//! evicted output. Looking the outputs up also refreshes them in the CAS's LRU.
//!
//! What a result references is decided once, when it is written (`entry_for`): the list is
//! stored with it (`ac_entry`), so a read looks the blobs up without decoding any Tree.
//! Entries of the earlier form, without the list, have small Trees read on each lookup.
//!
//! It wraps the store that holds action results and reads the CAS beside it; writes,
//! removals and lookups pass through. Every action-cache read goes through it: the server
//! builds it around `[action_cache_store]` (or `[store]`) itself, so no configuration can
//! leave it out.

use std::collections::HashSet;
use std::sync::Arc;

use async_trait::async_trait;
use bazel_remote_apis::build::bazel::remote::execution::v2::ActionResult;
use bytes::Bytes;
use prost::Message;

use super::{reader_over, BlobReader, BlobStore, BlobWriter, Key, KeyKind};
use crate::digest::{Digest, DigestFunction};
use crate::error::Result;

/// Why a stored action result was not served (for metrics and logs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Withheld {
    /// It references a blob the CAS lacks (or a Tree that is not one).
    Incomplete,
    /// It is not an ActionResult at all; it was removed.
    Undecodable,
}

pub type OnWithheld = Box<dyn Fn(Withheld) + Send + Sync>;

pub struct CompletenessChecking {
    results: Arc<dyn BlobStore>,
    cas: Arc<dyn BlobStore>,
    on_withheld: OnWithheld,
}

impl CompletenessChecking {
    pub fn new(
        results: Arc<dyn BlobStore>,
        cas: Arc<dyn BlobStore>,
        on_withheld: OnWithheld,
    ) -> CompletenessChecking {
        CompletenessChecking {
            results,
            cas,
            on_withheld,
        }
    }

    /// The store below, unchecked: for entries under action-cache keys that are not
    /// action results (the Remote Asset API's remembered fetches).
    pub fn unchecked(&self) -> &Arc<dyn BlobStore> {
        &self.results
    }

    /// A CAS blob whole, only if its stored size is the digest's (compared before a byte
    /// is read, so a digest understating a huge blob's size reads nothing) and at most
    /// `max` bytes. `Err` names why not.
    async fn read_cas(&self, d: &Digest, max: u64) -> Result<Result<Bytes, String>> {
        if d.is_empty_blob() {
            return Ok(Ok(Bytes::new()));
        }
        if d.size > max {
            return Ok(Err(format!("it is larger than {max} bytes")));
        }
        let key = Key::cas(d);
        let found = match self.cas.lookup(std::slice::from_ref(&key)).await?[0] {
            Some(size) if size == d.size => self.cas.get(&key).await?,
            _ => None,
        };
        Ok(found.ok_or_else(|| "it is not in the CAS".to_string()))
    }

    /// Every blob `result` references: its output files, stdout and stderr, each output
    /// directory's Tree and every file in it, with trees of at most `max_tree` bytes read
    /// (without building their nodes in memory). `Err(why)` when a Tree cannot be read.
    async fn references_of(
        &self,
        function: DigestFunction,
        result: &ActionResult,
        max_tree: u64,
    ) -> Result<Result<Vec<Digest>, String>> {
        let mut wanted: Vec<Digest> = Vec::new();
        for f in &result.output_files {
            wanted.extend(Digest::from_opt_proto(function, &f.digest)?);
        }
        wanted.extend(Digest::from_opt_proto(function, &result.stdout_digest)?);
        wanted.extend(Digest::from_opt_proto(function, &result.stderr_digest)?);
        for dir in &result.output_directories {
            let Some(tree_digest) = Digest::from_opt_proto(function, &dir.tree_digest)? else {
                continue;
            };
            let raw = match self.read_cas(&tree_digest, max_tree).await? {
                Ok(raw) => raw,
                Err(why) => {
                    return Ok(Err(format!(
                        "output directory {:?}: its Tree {tree_digest}: {why}",
                        dir.path
                    )))
                }
            };
            wanted.push(tree_digest);
            if let Err(e) = tree_files(function, &raw, &mut wanted) {
                return Ok(Err(format!(
                    "output directory {:?}: its Tree {tree_digest} is not a Tree message: {e}",
                    dir.path
                )));
            }
            if wanted.len() > 4 * crate::ac_entry::MAX_REFERENCES {
                // Repeats are counted too, so that a Tree naming one file a million times
                // cannot make the list grow: distinct ones are bounded when encoding.
                return Err(crate::ac_entry::too_many_references());
            }
        }
        Ok(Ok(wanted))
    }

    /// The first of `wanted` that the CAS lacks (or holds at another size).
    async fn first_missing(&self, wanted: &[Digest]) -> Result<Option<Digest>> {
        let mut seen = HashSet::new();
        let wanted: Vec<Digest> = wanted
            .iter()
            .filter(|d| !d.is_empty_blob() && seen.insert(**d))
            .copied()
            .collect();
        let keys: Vec<Key> = wanted.iter().map(Key::cas).collect();
        let sizes = self.cas.lookup(&keys).await?;
        Ok(wanted
            .into_iter()
            .zip(sizes)
            .find(|(d, size)| *size != Some(d.size))
            .map(|(d, _)| d))
    }

    /// The stored form of `result`, written by `provenance`: the blobs it references are
    /// found now, once, and kept with it, so no read decodes its Trees again. Refused
    /// (FAILED_PRECONDITION, naming the directory) when an output Tree is missing, too
    /// large or not a Tree; INVALID_ARGUMENT when the result references more than
    /// `MAX_REFERENCES` blobs.
    pub async fn entry_for(
        &self,
        function: DigestFunction,
        result: &ActionResult,
        provenance: crate::ac_entry::Provenance,
    ) -> Result<Bytes> {
        let references = match self.references_of(function, result, MAX_TREE_BYTES).await? {
            Ok(r) => r,
            Err(why) => {
                return Err(crate::StoreError::FailedPrecondition(format!(
                    "{why}; upload every output (Trees included) before the result"
                )))
            }
        };
        crate::ac_entry::AcEntry::encode(
            result.encode_to_vec().into(),
            provenance,
            function,
            &references,
        )
    }

    fn withheld(&self, key: &Key, why: Withheld, detail: &dyn std::fmt::Display) {
        match why {
            Withheld::Incomplete => {
                tracing::debug!(%key, %detail, "action result incomplete: treating as a miss")
            }
            Withheld::Undecodable => {
                tracing::warn!(%key, %detail, "dropping undecodable action cache entry")
            }
        }
        (self.on_withheld)(why);
    }
}

/// Output Trees larger than this are refused when a result is written. Reading one never
/// builds its nodes (`tree_files` walks the encoding), so the cost is this many bytes.
pub const MAX_TREE_BYTES: u64 = 64 << 20;
/// Entries of the earlier form (no reference list) have their Trees read on every lookup:
/// ones larger than this read as misses, and are replaced when the action runs again.
pub const MAX_LEGACY_TREE_BYTES: u64 = 1 << 20;

/// Appends the digest of every file in an encoded `Tree` (root and children) to `out`,
/// walking the protobuf encoding instead of decoding the Tree: a Tree of millions of empty
/// file nodes costs its bytes, not a node object each (about 1 GiB for 16 MiB, measured).
/// Hand-written because prost only decodes whole messages.
/// The digests are under `function`, the one the Tree's action was run under.
pub fn tree_files(
    function: DigestFunction,
    raw: &[u8],
    out: &mut Vec<Digest>,
) -> std::result::Result<(), String> {
    // Tree: root = 1, children = 2 (Directory). Directory: files = 1 (FileNode).
    // FileNode: digest = 2 (Digest).
    use crate::wire;
    for (field, dir) in wire::fields(raw) {
        let (field, dir) = (field?, dir);
        if field != 1 && field != 2 {
            continue;
        }
        let Some(dir) = dir else {
            return Err(format!("field {field} of a Tree is not a message"));
        };
        for (f, node) in wire::fields(dir) {
            if f? != 1 {
                continue;
            }
            let node = node.ok_or("a Directory's files field is not a message")?;
            for (g, digest) in wire::fields(node) {
                if g? != 2 {
                    continue;
                }
                let digest = digest.ok_or("a FileNode's digest is not a message")?;
                let d =
                    bazel_remote_apis::build::bazel::remote::execution::v2::Digest::decode(digest)
                        .map_err(|e| e.to_string())?;
                out.push(Digest::from_proto(function, &d).map_err(|e| e.to_string())?);
            }
        }
    }
    Ok(())
}

#[async_trait]
impl BlobStore for CompletenessChecking {
    async fn lookup(&self, keys: &[Key]) -> Result<Vec<Option<u64>>> {
        self.results.lookup(keys).await
    }

    /// The stored entry (see `ac_entry`), only if every blob its result references is in
    /// the CAS; an undecodable entry is removed.
    async fn get(&self, key: &Key) -> Result<Option<Bytes>> {
        let Some(raw) = self.results.get(key).await? else {
            return Ok(None);
        };
        let Key::Ac(_) = key else {
            return Ok(Some(raw));
        };
        let entry = match crate::ac_entry::AcEntry::decode(raw.clone()) {
            Ok(e) => e,
            Err(e) => {
                self.withheld(key, Withheld::Undecodable, &e);
                self.results.remove(key).await?;
                return Ok(None);
            }
        };
        let references = match entry.references {
            Some(r) => r,
            // The earlier form: found from the result itself, with small Trees only.
            None => {
                let result = match ActionResult::decode(entry.result) {
                    Ok(r) => r,
                    Err(e) => {
                        self.withheld(key, Withheld::Undecodable, &e);
                        self.results.remove(key).await?;
                        return Ok(None);
                    }
                };
                // That form predates BLAKE3: its digests are SHA-256.
                let sha256 = DigestFunction::Sha256;
                match self
                    .references_of(sha256, &result, MAX_LEGACY_TREE_BYTES)
                    .await
                {
                    Ok(Ok(r)) => r,
                    Ok(Err(why)) => {
                        self.withheld(key, Withheld::Incomplete, &why);
                        return Ok(None);
                    }
                    // A result naming a malformed digest can only have been stored by going
                    // around validation: incomplete, not the caller's error.
                    Err(crate::StoreError::InvalidArgument(m)) => {
                        self.withheld(key, Withheld::Incomplete, &m);
                        return Ok(None);
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        match self.first_missing(&references).await? {
            None => Ok(Some(raw)),
            Some(missing) => {
                self.withheld(key, Withheld::Incomplete, &format!("{missing} is missing"));
                Ok(None)
            }
        }
    }

    async fn open(
        &self,
        key: &Key,
        offset: u64,
        _limit: Option<u64>,
    ) -> Result<Option<(u64, BlobReader)>> {
        Ok(self.get(key).await?.map(|data| reader_over(data, offset)))
    }

    async fn writer(&self, size_hint: Option<u64>) -> Result<Box<dyn BlobWriter>> {
        self.results.writer(size_hint).await
    }

    async fn remove(&self, key: &Key) -> Result<()> {
        self.results.remove(key).await
    }

    async fn list(&self, kind: KeyKind) -> Result<Vec<Key>> {
        self.results.list(kind).await
    }

    fn capacity(&self) -> u64 {
        self.results.capacity()
    }
}
