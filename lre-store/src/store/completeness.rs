//! The action cache's completeness rule as a layer (Buildbarn's `completenesschecking`): an
//! action result read through it is returned only if every blob it references is in the
//! CAS — output files, stdout and stderr, each output directory's Tree and every file in
//! it. A client that trusts a hit (Bazel's Build without the Bytes) then never meets an
//! evicted output. Looking the outputs up also refreshes them in the CAS's LRU.
//!
//! It wraps the store that holds action results and reads the CAS beside it; writes,
//! removals and lookups pass through. Every action-cache read goes through it: the server
//! builds it around `[action_cache_store]` (or `[store]`) itself, so no configuration can
//! leave it out.

use std::collections::HashSet;
use std::sync::Arc;

use async_trait::async_trait;
use bazel_remote_apis::build::bazel::remote::execution::v2::{ActionResult, Tree};
use bytes::Bytes;
use prost::Message;

use super::{reader_over, BlobReader, BlobStore, BlobWriter, Key};
use crate::digest::Digest;
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
    /// is read, so a digest understating a huge blob's size reads nothing).
    async fn read_cas(&self, d: &Digest) -> Result<Option<Bytes>> {
        if d.is_empty_blob() {
            return Ok(Some(Bytes::new()));
        }
        let key = Key::cas(d);
        match self.cas.lookup(std::slice::from_ref(&key)).await?[0] {
            Some(size) if size == d.size => self.cas.get(&key).await,
            _ => Ok(None),
        }
    }

    /// The first blob `result` references that the CAS lacks.
    async fn first_missing(&self, result: &ActionResult) -> Result<Option<Digest>> {
        let mut wanted: Vec<Digest> = Vec::new();
        for f in &result.output_files {
            wanted.extend(Digest::from_opt_proto(&f.digest)?);
        }
        wanted.extend(Digest::from_opt_proto(&result.stdout_digest)?);
        wanted.extend(Digest::from_opt_proto(&result.stderr_digest)?);
        for dir in &result.output_directories {
            let Some(tree_digest) = Digest::from_opt_proto(&dir.tree_digest)? else {
                continue;
            };
            let Some(raw) = self.read_cas(&tree_digest).await? else {
                return Ok(Some(tree_digest));
            };
            let tree = match Tree::decode(raw) {
                Ok(t) => t,
                Err(e) => {
                    tracing::warn!(%tree_digest, error = %e, "output tree is not a Tree message");
                    return Ok(Some(tree_digest));
                }
            };
            for d in tree.root.iter().chain(tree.children.iter()) {
                for f in &d.files {
                    wanted.extend(Digest::from_opt_proto(&f.digest)?);
                }
            }
        }
        let mut seen = HashSet::new();
        wanted.retain(|d| !d.is_empty_blob() && seen.insert(*d));
        let keys: Vec<Key> = wanted.iter().map(Key::cas).collect();
        let sizes = self.cas.lookup(&keys).await?;
        Ok(wanted
            .into_iter()
            .zip(sizes)
            .find(|(d, size)| *size != Some(d.size))
            .map(|(d, _)| d))
    }
}

#[async_trait]
impl BlobStore for CompletenessChecking {
    async fn lookup(&self, keys: &[Key]) -> Result<Vec<Option<u64>>> {
        self.results.lookup(keys).await
    }

    async fn get(&self, key: &Key) -> Result<Option<Bytes>> {
        let Some(raw) = self.results.get(key).await? else {
            return Ok(None);
        };
        let Key::Ac(_) = key else {
            return Ok(Some(raw));
        };
        let result = match ActionResult::decode(raw.clone()) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(%key, error = %e, "dropping undecodable action cache entry");
                self.results.remove(key).await?;
                (self.on_withheld)(Withheld::Undecodable);
                return Ok(None);
            }
        };
        // A result naming a malformed digest can only have been stored by going around
        // validation: treat it as incomplete, not as the caller's error.
        match self.first_missing(&result).await {
            Ok(None) => Ok(Some(raw)),
            Ok(Some(missing)) => {
                tracing::debug!(%key, %missing, "action result incomplete: treating as a miss");
                (self.on_withheld)(Withheld::Incomplete);
                Ok(None)
            }
            Err(crate::StoreError::InvalidArgument(m)) => {
                tracing::warn!(%key, error = %m, "action result names a malformed digest");
                (self.on_withheld)(Withheld::Incomplete);
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    async fn open(&self, key: &Key, offset: u64) -> Result<Option<(u64, BlobReader)>> {
        Ok(self.get(key).await?.map(|data| reader_over(data, offset)))
    }

    async fn writer(&self, size_hint: Option<u64>) -> Result<Box<dyn BlobWriter>> {
        self.results.writer(size_hint).await
    }

    async fn remove(&self, key: &Key) -> Result<()> {
        self.results.remove(key).await
    }

    fn capacity(&self) -> u64 {
        self.results.capacity()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
    use sha2::{Digest as _, Sha256};

    use super::*;
    use crate::metrics::StoreMetrics;
    use crate::store::MemStore;

    async fn put(store: &dyn BlobStore, key: Key, data: &[u8]) {
        let mut w = store.writer(Some(data.len() as u64)).await.unwrap();
        w.write(data).await.unwrap();
        w.commit(key).await.unwrap();
    }

    async fn cas_put(store: &dyn BlobStore, data: &[u8]) -> re::Digest {
        let hash: [u8; 32] = Sha256::digest(data).into();
        put(store, Key::Cas(hash), data).await;
        re::Digest {
            hash: hex::encode(hash),
            size_bytes: data.len() as i64,
        }
    }

    #[tokio::test]
    async fn a_result_is_served_only_while_everything_it_references_is_in_the_cas() {
        let mem =
            || -> Arc<dyn BlobStore> { Arc::new(MemStore::new(1 << 20, StoreMetrics::default())) };
        let (results, cas) = (mem(), mem());
        let withheld = Arc::new(AtomicUsize::new(0));
        let w = withheld.clone();
        let layer = CompletenessChecking::new(
            results.clone(),
            cas.clone(),
            Box::new(move |_| {
                w.fetch_add(1, Ordering::SeqCst);
            }),
        );
        let out = cas_put(cas.as_ref(), b"an output").await;
        let inner_file = cas_put(cas.as_ref(), b"a file inside a tree").await;
        let tree = re::Tree {
            root: Some(re::Directory {
                files: vec![re::FileNode {
                    name: "f".into(),
                    digest: Some(inner_file.clone()),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            children: vec![],
        };
        let tree_digest = cas_put(cas.as_ref(), &tree.encode_to_vec()).await;
        let result = re::ActionResult {
            output_files: vec![re::OutputFile {
                path: "out".into(),
                digest: Some(out.clone()),
                ..Default::default()
            }],
            output_directories: vec![re::OutputDirectory {
                path: "dir".into(),
                tree_digest: Some(tree_digest),
                ..Default::default()
            }],
            ..Default::default()
        };
        let key = Key::ac("", &[1; 32]);
        put(results.as_ref(), key, &result.encode_to_vec()).await;
        assert!(layer.get(&key).await.unwrap().is_some());
        assert_eq!(withheld.load(Ordering::SeqCst), 0);

        // A file inside the output tree is evicted: withheld, and kept for when it returns.
        let inner_key = Key::Cas(hex::decode(&inner_file.hash).unwrap().try_into().unwrap());
        cas.remove(&inner_key).await.unwrap();
        assert!(layer.get(&key).await.unwrap().is_none());
        assert!(layer.open(&key, 0).await.unwrap().is_none());
        assert_eq!(withheld.load(Ordering::SeqCst), 2);
        assert!(results.get(&key).await.unwrap().is_some(), "not deleted");
        cas_put(cas.as_ref(), b"a file inside a tree").await;
        assert!(layer.get(&key).await.unwrap().is_some());

        // Not an ActionResult: withheld and removed.
        let junk = Key::ac("", &[2; 32]);
        put(results.as_ref(), junk, &[0xff, 0xff, 0xff]).await;
        assert!(layer.get(&junk).await.unwrap().is_none());
        assert!(results.get(&junk).await.unwrap().is_none());

        // The same bytes through `unchecked` (an asset record's path) are left alone.
        put(results.as_ref(), junk, &[0xff, 0xff, 0xff]).await;
        assert!(layer.unchecked().get(&junk).await.unwrap().is_some());
    }
}
