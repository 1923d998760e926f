//! Blob storage. A store is a size-bounded LRU map from `Key` to bytes; it knows nothing of
//! REAPI. Content verification lives in `CasUpload`, one layer up, so every store gets it.

pub mod completeness;
pub mod fast_slow;
mod fs;
mod lru_index;
mod memory;
pub mod redis;
pub mod s3;
pub mod verify;

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncRead;

pub use completeness::CompletenessChecking;
pub use fast_slow::FastSlowStore;
pub use fs::{FsOptions, FsStore, Pinned};
pub use memory::MemStore;
pub use redis::{RedisConnection, RedisStore};
pub use s3::S3Store;
pub use verify::VerifyStore;

use crate::config::StoreConfig;
use crate::digest::{Digest, DigestFunction, Hasher};
use crate::error::{Result, StoreError as Error};
use crate::metrics::StoreMetrics;

/// A store key: CAS blobs by content hash, one kind per digest function (the namespaces
/// never mix); action-cache entries by a hash of (function, instance, action digest), so
/// instances never see each other's results.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Key {
    Cas([u8; 32]),
    /// The executable copy of a CAS blob, for a store that exec roots are hard-linked from
    /// (the worker's): links share one mode, so each mode needs a file of its own.
    CasExecutable([u8; 32]),
    Ac([u8; 32]),
    /// `Cas` under BLAKE3.
    Blake3Cas([u8; 32]),
    /// `CasExecutable` under BLAKE3.
    Blake3CasExecutable([u8; 32]),
    /// A Nix binary cache's metadata in one instance: a store path's narinfo
    /// (`Key::nar_info`) or a closure manifest (`Key::closure_manifest`). Write-once by
    /// policy (the server's), not by content: like `Ac`, not verified by the store.
    NarInfo([u8; 32]),
}

/// The kinds of key, for `BlobStore::list`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum KeyKind {
    Cas,
    CasExecutable,
    Ac,
    Blake3Cas,
    Blake3CasExecutable,
    NarInfo,
}

impl KeyKind {
    pub const ALL: [KeyKind; 6] = [
        KeyKind::Cas,
        KeyKind::CasExecutable,
        KeyKind::Ac,
        KeyKind::Blake3Cas,
        KeyKind::Blake3CasExecutable,
        KeyKind::NarInfo,
    ];

    /// The name a key of this kind is stored under, before its hex hash: "cas/<hex>".
    /// SHA-256's names are those from before BLAKE3, so existing stores read as they were.
    pub fn dir(self) -> &'static str {
        match self {
            KeyKind::Cas => "cas",
            KeyKind::CasExecutable => "cas-x",
            KeyKind::Ac => "ac",
            KeyKind::Blake3Cas => "cas-blake3",
            KeyKind::Blake3CasExecutable => "cas-blake3-x",
            KeyKind::NarInfo => "narinfo",
        }
    }
}

impl Key {
    pub fn key_kind(&self) -> KeyKind {
        match self {
            Key::Cas(_) => KeyKind::Cas,
            Key::CasExecutable(_) => KeyKind::CasExecutable,
            Key::Ac(_) => KeyKind::Ac,
            Key::Blake3Cas(_) => KeyKind::Blake3Cas,
            Key::Blake3CasExecutable(_) => KeyKind::Blake3CasExecutable,
            Key::NarInfo(_) => KeyKind::NarInfo,
        }
    }

    /// The key of `kind` named by `hash`.
    pub fn of_kind(kind: KeyKind, hash: [u8; 32]) -> Key {
        match kind {
            KeyKind::Cas => Key::Cas(hash),
            KeyKind::CasExecutable => Key::CasExecutable(hash),
            KeyKind::Ac => Key::Ac(hash),
            KeyKind::Blake3Cas => Key::Blake3Cas(hash),
            KeyKind::Blake3CasExecutable => Key::Blake3CasExecutable(hash),
            KeyKind::NarInfo => Key::NarInfo(hash),
        }
    }

    pub fn cas(d: &Digest) -> Key {
        Key::cas_by_hash(d.function, d.hash)
    }

    /// The CAS key of a blob known only by its hash (the HTTP protocol, an upload whose
    /// size is not declared).
    pub fn cas_by_hash(function: DigestFunction, hash: [u8; 32]) -> Key {
        match function {
            DigestFunction::Sha256 => Key::Cas(hash),
            DigestFunction::Blake3 => Key::Blake3Cas(hash),
        }
    }

    /// The action's size is implied by its hash, and the HTTP protocol names actions by hash
    /// alone, so the key leaves the size out: gRPC and HTTP clients then share entries. A
    /// BLAKE3 action's key is derived under another prefix (SHA-256's is the one from
    /// before BLAKE3, so existing entries still hit).
    pub fn ac(instance: &str, function: DigestFunction, action_hash: &[u8; 32]) -> Key {
        let mut h = Sha256::new();
        h.update(match function {
            DigestFunction::Sha256 => &b"lre-ac\0"[..],
            DigestFunction::Blake3 => &b"lre-ac-blake3\0"[..],
        });
        h.update(instance.as_bytes());
        h.update(b"\0");
        h.update(action_hash);
        Key::Ac(h.finalize().into())
    }

    /// The narinfo of the store path whose hash part (32 nixbase32 characters) is
    /// `hash_part`, in `instance`: each instance is its own binary cache.
    pub fn nar_info(instance: &str, hash_part: &str) -> Key {
        let mut h = Sha256::new();
        h.update(b"lre-narinfo\0");
        h.update(instance.as_bytes());
        h.update(b"\0");
        h.update(hash_part.as_bytes());
        Key::NarInfo(h.finalize().into())
    }

    /// A toolchain's closure manifest (`lre-closure:sha256:<id>`, `id` in hex) registered
    /// in `instance`: binary-cache metadata like a narinfo, so of the same kind.
    pub fn closure_manifest(instance: &str, id: &str) -> Key {
        let mut h = Sha256::new();
        h.update(b"lre-closure\0");
        h.update(instance.as_bytes());
        h.update(b"\0");
        h.update(id.as_bytes());
        Key::NarInfo(h.finalize().into())
    }

    pub fn cas_executable(d: &Digest) -> Key {
        match d.function {
            DigestFunction::Sha256 => Key::CasExecutable(d.hash),
            DigestFunction::Blake3 => Key::Blake3CasExecutable(d.hash),
        }
    }

    fn kind(&self) -> &'static str {
        self.key_kind().dir()
    }

    pub fn hash(&self) -> &[u8; 32] {
        match self {
            Key::Cas(h)
            | Key::CasExecutable(h)
            | Key::Ac(h)
            | Key::Blake3Cas(h)
            | Key::Blake3CasExecutable(h)
            | Key::NarInfo(h) => h,
        }
    }

    /// The function a content-addressed key's hash is of: what a layer verifying content
    /// hashes with. `None` for action-cache entries, which may be replaced.
    pub fn function(&self) -> Option<DigestFunction> {
        match self {
            Key::Cas(_) | Key::CasExecutable(_) => Some(DigestFunction::Sha256),
            Key::Blake3Cas(_) | Key::Blake3CasExecutable(_) => Some(DigestFunction::Blake3),
            Key::Ac(_) | Key::NarInfo(_) => None,
        }
    }

    /// Whether the file is executable (a worker's exec-root copy).
    pub fn is_executable(&self) -> bool {
        matches!(self, Key::CasExecutable(_) | Key::Blake3CasExecutable(_))
    }

    /// CAS entries are named by their content's hash (same key, same bytes); action-cache
    /// entries by a hash of the request, and may be replaced.
    pub fn is_content_addressed(&self) -> bool {
        self.function().is_some()
    }
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.kind(), hex::encode(self.hash()))
    }
}

/// Builds the store `config` describes, layers and all. `metrics` go to the first local
/// (filesystem or memory) store found, fast tier first: that is the one whose size and
/// evictions an operator watches.
pub async fn build(config: &StoreConfig, metrics: StoreMetrics) -> Result<Arc<dyn BlobStore>> {
    build_inner(config, &mut Some(metrics)).await
}

fn build_inner<'a>(
    config: &'a StoreConfig,
    metrics: &'a mut Option<StoreMetrics>,
) -> futures::future::BoxFuture<'a, Result<Arc<dyn BlobStore>>> {
    Box::pin(async move {
        Ok(match config {
            StoreConfig::Memory(c) => Arc::new(MemStore::new(
                c.max_size.0,
                metrics.take().unwrap_or_default(),
            )) as Arc<dyn BlobStore>,
            StoreConfig::Filesystem(c) => Arc::new(
                FsStore::open_with(
                    c.path
                        .clone()
                        .unwrap_or_else(crate::config::default_store_path),
                    c.max_size.0,
                    metrics.take().unwrap_or_default(),
                    FsOptions::from_config(c),
                )
                .await?,
            ),
            StoreConfig::S3(c) => Arc::new(S3Store::open(c).await?),
            StoreConfig::Redis(c) => Arc::new(RedisStore::open(c).await?),
            StoreConfig::Verify(c) => {
                Arc::new(VerifyStore::new(build_inner(&c.backend, metrics).await?))
            }
            StoreConfig::FastSlow(c) => {
                let fast = build_inner(&c.fast, metrics).await?;
                let slow = build_inner(&c.slow, metrics).await?;
                Arc::new(FastSlowStore::new(fast, slow))
            }
        })
    })
}

pub type BlobReader = Pin<Box<dyn AsyncRead + Send>>;

/// A reader over an entry held whole (memory, Redis, a checked action result), positioned at
/// `offset` (at most the end), with the entry's size.
pub(crate) fn reader_over(data: Bytes, offset: u64) -> (u64, BlobReader) {
    let size = data.len() as u64;
    let mut cursor = std::io::Cursor::new(data);
    cursor.set_position(offset.min(size));
    (size, Box::pin(cursor))
}

#[async_trait]
pub trait BlobStore: Send + Sync + 'static {
    /// The size of each key that is present. Present entries count as used (LRU refresh).
    async fn lookup(&self, keys: &[Key]) -> Result<Vec<Option<u64>>>;

    /// The whole entry, for small blobs (action results, trees, batch reads).
    async fn get(&self, key: &Key) -> Result<Option<Bytes>>;

    /// A reader positioned at `offset`, with the entry's total size. `limit` is how many
    /// bytes the consumer will read at most (`None`: to the end). A layer that verifies
    /// content must judge the whole blob before it hands out the last byte of that range,
    /// since a consumer that stops there never reads the end where a verdict would come;
    /// other stores may ignore it.
    async fn open(
        &self,
        key: &Key,
        offset: u64,
        limit: Option<u64>,
    ) -> Result<Option<(u64, BlobReader)>>;

    /// Starts a write. Nothing is visible until `commit`; dropping the writer discards it.
    async fn writer(&self, size_hint: Option<u64>) -> Result<Box<dyn BlobWriter>>;

    async fn remove(&self, key: &Key) -> Result<()>;

    /// Every key of `kind` the store holds, in no particular order: for operators' scans
    /// (who wrote which action results), never for serving requests. Layers list what is
    /// below them; a tiered store lists both tiers.
    async fn list(&self, kind: KeyKind) -> Result<Vec<Key>>;

    /// The size limit, in bytes.
    fn capacity(&self) -> u64;
}

/// A write in progress. Every byte written counts against the store's capacity until the
/// writer commits (the bytes become the entry) or is dropped (they are given back).
#[async_trait]
pub trait BlobWriter: Send {
    /// Fails with `UploadSpaceExhausted` before writing anything when unfinished writes
    /// already hold the whole store; the same call may then be retried.
    async fn write(&mut self, data: &[u8]) -> Result<()>;
    /// `write`, for data the caller owns: a store that keeps or queues the bytes takes
    /// them as they are instead of copying.
    async fn write_bytes(&mut self, data: Bytes) -> Result<()> {
        self.write(&data).await
    }
    /// Makes the data visible under `key`, atomically.
    async fn commit(self: Box<Self>, key: Key) -> Result<()>;
    /// The writer may stay idle for a long time (an interrupted, resumable upload): give
    /// back what it need not hold meanwhile (buffers, open files). Writing resumes it.
    async fn suspend(&mut self) -> Result<()> {
        Ok(())
    }
    /// Throws the data away now (dropping does too, but may finish later, off this task).
    async fn discard(self: Box<Self>) {}
}

/// Memory that unfinished uploads of a remote store hold in buffers, all together, bounded
/// by its `max_in_flight`. Taking more than is left fails at once (retryable), rather than
/// waiting: a client stuck behind others' uploads would only time out later.
pub(crate) struct Budget {
    used: AtomicU64,
    limit: u64,
}

impl Budget {
    pub(crate) fn new(limit: u64) -> Budget {
        Budget {
            used: AtomicU64::new(0),
            limit,
        }
    }

    pub(crate) fn take(&self, n: u64) -> Result<()> {
        let mut cur = self.used.load(Ordering::Relaxed);
        loop {
            if cur + n > self.limit {
                return Err(Error::UploadSpaceExhausted {
                    needed: n,
                    in_flight: cur,
                    capacity: self.limit,
                });
            }
            match self
                .used
                .compare_exchange_weak(cur, cur + n, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return Ok(()),
                Err(now) => cur = now,
            }
        }
    }

    pub(crate) fn give(&self, n: u64) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }
}

fn no_room(needed: u64, e: lru_index::NoRoom) -> Error {
    Error::UploadSpaceExhausted {
        needed,
        in_flight: e.in_flight,
        capacity: e.capacity,
    }
}

fn check_fits(size_hint: Option<u64>, capacity: u64) -> Result<()> {
    match size_hint {
        Some(n) if n > capacity => Err(Error::InvalidArgument(format!(
            "blob of {n} bytes is larger than the whole store ({capacity} bytes)"
        ))),
        _ => Ok(()),
    }
}

/// A CAS upload whose content is hashed as it streams in and committed only if it matches
/// the expected digest. Dropping it (a broken stream, an error) leaves nothing behind.
pub struct CasUpload {
    inner: Box<dyn BlobWriter>,
    /// Under the key's function.
    hasher: Hasher,
    /// What a verified upload is committed as: a CAS key, whose hash is the expected one.
    /// `None`: the content's own CAS key under `function`, whatever it hashes to.
    key: Option<Key>,
    function: DigestFunction,
    expected_size: Option<u64>,
    written: u64,
    /// Set while a write is in the store. Still set afterwards means the write was
    /// cancelled half way (its stream reset): the store may hold bytes the hash never saw,
    /// so this upload must never go on or commit. The client restarts at 0.
    in_write: bool,
}

impl CasUpload {
    /// An upload committed as `key` (a content-addressed key) if it hashes to key's hash.
    pub async fn for_key(
        store: &dyn BlobStore,
        key: Key,
        expected_size: Option<u64>,
    ) -> Result<CasUpload> {
        let Some(function) = key.function() else {
            return Err(Error::Internal(format!(
                "{key} is not content-addressed: nothing to verify it against"
            )));
        };
        Ok(CasUpload {
            inner: store.writer(expected_size).await?,
            hasher: function.hasher(),
            key: Some(key),
            function,
            expected_size,
            written: 0,
            in_write: false,
        })
    }

    pub fn written(&self) -> u64 {
        self.written
    }

    /// An upload of content not known beforehand (a decompressed NAR named by its
    /// compressed form's hash), committed under its own hash: what it hashes to is what it
    /// is, so there is nothing to verify.
    pub async fn of_content(
        store: &dyn BlobStore,
        function: DigestFunction,
        size_hint: Option<u64>,
    ) -> Result<CasUpload> {
        Ok(CasUpload {
            inner: store.writer(size_hint).await?,
            hasher: function.hasher(),
            key: None,
            function,
            expected_size: None,
            written: 0,
            in_write: false,
        })
    }

    /// A write was cancelled half way: what the store holds is unknown, start again.
    pub fn is_torn(&self) -> bool {
        self.in_write
    }

    fn torn() -> Error {
        Error::Internal(
            "an earlier write to this upload failed or was cancelled half way; start again at offset 0"
                .into(),
        )
    }

    pub async fn write(&mut self, data: &[u8]) -> Result<()> {
        self.write_bytes(Bytes::copy_from_slice(data)).await
    }

    /// Hands `data` to the store, then hashes it, while a store that writes in the
    /// background (the filesystem's) is already putting it on disk.
    pub async fn write_bytes(&mut self, data: Bytes) -> Result<()> {
        if self.in_write {
            return Err(Self::torn());
        }
        let after = self.written + data.len() as u64;
        if let Some(size) = self.expected_size {
            if after > size {
                return Err(Error::SizeMismatch(format!(
                    "received at least {after} bytes for a blob declared as {size} bytes"
                )));
            }
        }
        // Hashed only once the store took it, so a refused write can be retried as it was.
        self.in_write = true;
        match self.inner.write_bytes(data.clone()).await {
            Ok(()) => {}
            // Refused before anything was written: the same write may be retried.
            Err(e @ Error::UploadSpaceExhausted { .. }) => {
                self.in_write = false;
                return Err(e);
            }
            // Anything else may have left some of the bytes in the store: `in_write` stays
            // set, so this upload can neither go on nor commit.
            Err(e) => return Err(e),
        }
        self.in_write = false;
        self.hasher.update(&data);
        self.written = after;
        Ok(())
    }

    /// See `BlobWriter::suspend`.
    pub async fn suspend(&mut self) -> Result<()> {
        self.inner.suspend().await
    }

    /// Throws the data away, and waits until it is gone.
    pub async fn discard(self) {
        self.inner.discard().await
    }

    pub async fn finish(self) -> Result<Digest> {
        if self.in_write {
            self.inner.discard().await;
            return Err(Self::torn());
        }
        if let Some(size) = self.expected_size {
            if self.written != size {
                let e = Error::SizeMismatch(format!(
                    "upload ended after {} of {size} bytes",
                    self.written
                ));
                self.inner.discard().await;
                return Err(e);
            }
        }
        let function = self.function;
        let actual: [u8; 32] = self.hasher.finalize();
        let key = match self.key {
            Some(key) if *key.hash() != actual => {
                self.inner.discard().await;
                return Err(Error::DigestMismatch {
                    expected: hex::encode(key.hash()),
                    actual: hex::encode(actual),
                });
            }
            Some(key) => key,
            None => Key::cas_by_hash(function, actual),
        };
        let digest = Digest {
            function,
            hash: actual,
            size: self.written,
        };
        self.inner.commit(key).await?;
        Ok(digest)
    }
}

#[cfg(test)]
mod key_tests {
    use super::*;

    /// SHA-256's names and action-cache keys are those from before BLAKE3, so existing
    /// stores and entries still hit; BLAKE3's differ.
    #[test]
    fn sha256_keys_are_unchanged_and_blake3_keys_differ() {
        let action = [7u8; 32];
        let mut old = Sha256::new();
        old.update(b"lre-ac\0main\0");
        old.update(action);
        let old = Key::Ac(old.finalize().into());
        assert_eq!(Key::ac("main", DigestFunction::Sha256, &action), old);
        assert_ne!(Key::ac("main", DigestFunction::Blake3, &action), old);
        let d = Digest::of(b"x");
        assert_eq!(Key::cas(&d).to_string(), format!("cas/{}", d.hex()));
        assert_eq!(
            Key::cas_executable(&d).to_string(),
            format!("cas-x/{}", d.hex())
        );
        let b = d.with_function(DigestFunction::Blake3);
        assert_eq!(Key::cas(&b).to_string(), format!("cas-blake3/{}", d.hex()));
        assert_eq!(
            Key::cas_executable(&b).to_string(),
            format!("cas-blake3-x/{}", d.hex())
        );
        for kind in KeyKind::ALL {
            assert_eq!(Key::of_kind(kind, [1; 32]).key_kind(), kind);
        }
    }
}
