//! A local tier in front of a shared one (NativeLink's `fast_slow`, Buildbarn's
//! read-caching): the fast tier is a cache of the slow one, which is the truth.
//!
//! - Writes go to both, and are acknowledged only once the slow tier committed, so what
//!   one replica accepted every other replica can read.
//! - Reads try the fast tier. A slow-tier CAS hit is hashed while it is copied into the
//!   fast tier, and a blob whose content does not match its name is never served: it reads
//!   as a miss (so the client uploads it again) and is deleted from the slow tier.
//! - `lookup` asks the slow tier only for what the fast one lacks, so an action result
//!   whose outputs were evicted locally is still complete if the shared tier has them.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::io::AsyncReadExt;

use super::{BlobReader, BlobStore, BlobWriter, Key, KeyKind};
use crate::error::{Result, StoreError as Error};

/// The copy buffer for filling the fast tier.
const CHUNK: usize = 256 << 10;

pub struct FastSlowStore {
    fast: Arc<dyn BlobStore>,
    slow: Arc<dyn BlobStore>,
}

impl FastSlowStore {
    pub fn new(fast: Arc<dyn BlobStore>, slow: Arc<dyn BlobStore>) -> FastSlowStore {
        FastSlowStore { fast, slow }
    }

    /// Copies `key` from the slow tier into the fast one, checking a CAS blob's hash on
    /// the way. Slow-tier failures are errors; a fast tier that cannot take the blob (full
    /// of unfinished uploads, or too small for it) is `Fill::Bypass`: serve from the slow
    /// tier instead.
    async fn fill(&self, key: &Key) -> Result<Fill> {
        let Some((size, mut reader)) = self.slow.open(key, 0, None).await? else {
            return Ok(Fill::Absent);
        };
        let mut writer = match self.fast.writer(Some(size)).await {
            Ok(w) => w,
            Err(e) => return Ok(Fill::bypass(key, e)),
        };
        // Content-addressed keys are checked; action-cache entries cannot be.
        let mut hasher = key.function().map(|f| f.hasher());
        let mut buf = vec![0u8; CHUNK];
        let mut total = 0u64;
        loop {
            let n = match reader.read(&mut buf).await {
                Ok(n) => n,
                Err(e) => {
                    writer.discard().await;
                    return Err(Error::from(e));
                }
            };
            if n == 0 {
                break;
            }
            total += n as u64;
            if total > size {
                writer.discard().await;
                return Err(Error::Unavailable(format!(
                    "the slow tier sent more than the {size} bytes of {key}"
                )));
            }
            if let Some(h) = hasher.as_mut() {
                h.update(&buf[..n]);
            }
            if let Err(e) = writer.write(&buf[..n]).await {
                writer.discard().await;
                return Ok(Fill::bypass(key, e));
            }
        }
        if total != size {
            writer.discard().await;
            return Err(Error::Unavailable(format!(
                "the slow tier's copy of {key} ended after {total} of {size} bytes"
            )));
        }
        if let Some(hasher) = hasher {
            let actual = hasher.finalize();
            if &actual != key.hash() {
                writer.discard().await;
                self.corrupt(key, &actual).await?;
                return Ok(Fill::Absent);
            }
        }
        match writer.commit(*key).await {
            Ok(()) => Ok(Fill::Filled),
            Err(e) => Ok(Fill::bypass(key, e)),
        }
    }

    async fn corrupt(&self, key: &Key, actual: &[u8; 32]) -> Result<()> {
        tracing::error!(key = %key, actual = %hex::encode(actual), "the slow tier holds a blob whose content does not match its digest; deleting it");
        self.slow.remove(key).await
    }

    /// `key` straight from the slow tier, not kept: a CAS blob is hashed as it streams
    /// (the skipped prefix too), and a mismatch is an error at its end, never a clean EOF.
    async fn open_slow(
        &self,
        key: &Key,
        offset: u64,
        limit: Option<u64>,
    ) -> Result<Option<(u64, BlobReader)>> {
        super::verify::open_verified(&self.slow, key, offset, limit).await
    }
}

enum Fill {
    Filled,
    Absent,
    Bypass,
}

impl Fill {
    fn bypass(key: &Key, e: Error) -> Fill {
        tracing::warn!(key = %key, error = %e, "the fast tier cannot take a blob; serving it from the slow tier");
        Fill::Bypass
    }
}

#[async_trait]
impl BlobStore for FastSlowStore {
    async fn lookup(&self, keys: &[Key]) -> Result<Vec<Option<u64>>> {
        let mut found = self.fast.lookup(keys).await?;
        let missing: Vec<usize> = (0..keys.len()).filter(|&i| found[i].is_none()).collect();
        if missing.is_empty() {
            return Ok(found);
        }
        let ask: Vec<Key> = missing.iter().map(|&i| keys[i]).collect();
        let slow = self.slow.lookup(&ask).await?;
        for (i, size) in missing.into_iter().zip(slow) {
            found[i] = size;
        }
        Ok(found)
    }

    async fn get(&self, key: &Key) -> Result<Option<Bytes>> {
        if let Some(b) = self.fast.get(key).await? {
            return Ok(Some(b));
        }
        match self.fill(key).await? {
            Fill::Absent => return Ok(None),
            Fill::Filled => {
                if let Some(b) = self.fast.get(key).await? {
                    return Ok(Some(b));
                }
            }
            Fill::Bypass => {}
        }
        // Not kept locally (or evicted again at once): read it whole, and check it.
        let Some(b) = self.slow.get(key).await? else {
            return Ok(None);
        };
        if let Some(function) = key.function() {
            let actual = function.hash(&b);
            if &actual != key.hash() {
                self.corrupt(key, &actual).await?;
                return Ok(None);
            }
        }
        Ok(Some(b))
    }

    async fn open(
        &self,
        key: &Key,
        offset: u64,
        limit: Option<u64>,
    ) -> Result<Option<(u64, BlobReader)>> {
        // The fast tier holds only blobs checked when they were filled (or written here).
        if let Some(r) = self.fast.open(key, offset, limit).await? {
            return Ok(Some(r));
        }
        match self.fill(key).await? {
            Fill::Absent => Ok(None),
            Fill::Filled => match self.fast.open(key, offset, limit).await? {
                Some(r) => Ok(Some(r)),
                None => self.open_slow(key, offset, limit).await,
            },
            Fill::Bypass => self.open_slow(key, offset, limit).await,
        }
    }

    async fn writer(&self, size_hint: Option<u64>) -> Result<Box<dyn BlobWriter>> {
        let fast = self.fast.writer(size_hint).await?;
        let slow = self.slow.writer(size_hint).await?;
        Ok(Box::new(FastSlowWriter {
            fast,
            slow,
            broken: false,
            slow_pending: None,
        }))
    }

    async fn remove(&self, key: &Key) -> Result<()> {
        self.fast.remove(key).await?;
        self.slow.remove(key).await
    }

    async fn list(&self, kind: KeyKind) -> Result<Vec<Key>> {
        let mut all = self.slow.list(kind).await?;
        all.extend(self.fast.list(kind).await?);
        all.sort_by_key(|k| *k.hash());
        all.dedup();
        Ok(all)
    }

    fn capacity(&self) -> u64 {
        self.fast.capacity().min(self.slow.capacity())
    }
}

struct FastSlowWriter {
    fast: Box<dyn BlobWriter>,
    slow: Box<dyn BlobWriter>,
    broken: bool,
    /// The slow tier refused this many bytes for lack of room; the fast one took them.
    slow_pending: Option<usize>,
}

#[async_trait]
impl BlobWriter for FastSlowWriter {
    async fn write(&mut self, data: &[u8]) -> Result<()> {
        self.write_bytes(Bytes::copy_from_slice(data)).await
    }

    async fn write_bytes(&mut self, data: Bytes) -> Result<()> {
        if self.broken {
            return Err(Error::Internal(
                "this upload failed half way in the fast/slow store and cannot go on".into(),
            ));
        }
        // A refusal for lack of room can be retried as it was (`BlobWriter::write`). The
        // fast tier goes first; if the slow one then refuses, the fast one already has the
        // data, and the retry (the same bytes) goes to the slow tier only.
        if let Some(n) = self.slow_pending {
            if n != data.len() {
                self.broken = true;
                return Err(Error::Internal(
                    "a refused write was retried with other data".into(),
                ));
            }
        } else {
            self.fast.write_bytes(data.clone()).await?;
        }
        let len = data.len();
        match self.slow.write_bytes(data).await {
            Ok(()) => {
                self.slow_pending = None;
                Ok(())
            }
            Err(e @ Error::UploadSpaceExhausted { .. }) => {
                self.slow_pending = Some(len);
                Err(e)
            }
            Err(e) => {
                self.broken = true;
                Err(e)
            }
        }
    }

    async fn commit(self: Box<Self>, key: Key) -> Result<()> {
        let FastSlowWriter {
            fast,
            slow,
            broken,
            slow_pending,
        } = *self;
        if broken || slow_pending.is_some() {
            fast.discard().await;
            slow.discard().await;
            return Err(Error::Internal(
                "a broken fast/slow upload cannot be committed".into(),
            ));
        }
        if let Err(e) = slow.commit(key).await {
            fast.discard().await;
            return Err(e);
        }
        // The shared tier has it, which is what counts; a local failure only costs a fill.
        if let Err(e) = fast.commit(key).await {
            tracing::warn!(key = %key, error = %e, "stored in the slow tier but not the fast one");
        }
        Ok(())
    }

    async fn suspend(&mut self) -> Result<()> {
        self.fast.suspend().await?;
        self.slow.suspend().await
    }

    async fn discard(self: Box<Self>) {
        let FastSlowWriter { fast, slow, .. } = *self;
        fast.discard().await;
        slow.discard().await;
    }
}
