//! The `verify` layer (Buildbarn's read-time digest check): every CAS blob read through it
//! is hashed, and one whose bytes do not match its name is never served whole.
//!
//! - `get` hashes the blob before returning it: a mismatch reads as a miss (so the client
//!   uploads it again), and the bad copy is removed from the store below.
//! - `open` streams, hashing as it goes (from byte 0 even when the read starts later): a
//!   mismatch ends the read with an error in place of its EOF, never a clean end, and the
//!   copy is removed. Streaming is what lets it sit over S3 without reading blobs twice.
//!
//! Action-cache entries are named by the request, not their content, and pass unchecked.
//! (The filesystem store's own `verify_on_read` checks a whole file before serving it, on
//! the descriptor it then serves from; this layer is for stores with no such shortcut.)

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use async_trait::async_trait;
use bytes::Bytes;
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncRead, ReadBuf};

use super::{BlobReader, BlobStore, BlobWriter, Key};
use crate::error::{Result, StoreError as Error};

/// Bytes skipped before a read's offset are read into this much scratch at a time.
const SKIP_CHUNK: usize = 64 << 10;

pub struct VerifyStore {
    inner: Arc<dyn BlobStore>,
}

impl VerifyStore {
    pub fn new(inner: Arc<dyn BlobStore>) -> VerifyStore {
        VerifyStore { inner }
    }
}

fn corrupt(store: &Arc<dyn BlobStore>, key: Key, actual: &[u8; 32]) {
    tracing::error!(key = %key, actual = %hex::encode(actual), "a stored blob does not match its digest; removing it");
    let store = store.clone();
    // From a reader's poll or a sync context: the removal runs on its own task.
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        rt.spawn(async move {
            if let Err(e) = store.remove(&key).await {
                tracing::warn!(key = %key, error = %e, "could not remove a corrupt blob");
            }
        });
    }
}

/// `key` from `store`, a CAS blob hashed as it streams (its skipped prefix too). Shared by
/// this layer and the fast-slow layer's reads that bypass the fast tier.
pub(crate) async fn open_verified(
    store: &Arc<dyn BlobStore>,
    key: &Key,
    offset: u64,
) -> Result<Option<(u64, BlobReader)>> {
    let Key::Cas(hash) = key else {
        return store.open(key, offset).await;
    };
    let Some((size, inner)) = store.open(key, 0).await? else {
        return Ok(None);
    };
    let reader = Verifying {
        inner,
        hasher: Sha256::new(),
        expected: *hash,
        skip: offset.min(size),
        scratch: Vec::new(),
        store: store.clone(),
    };
    Ok(Some((size, Box::pin(reader))))
}

#[async_trait]
impl BlobStore for VerifyStore {
    async fn lookup(&self, keys: &[Key]) -> Result<Vec<Option<u64>>> {
        self.inner.lookup(keys).await
    }

    async fn get(&self, key: &Key) -> Result<Option<Bytes>> {
        let Some(data) = self.inner.get(key).await? else {
            return Ok(None);
        };
        if let Key::Cas(hash) = key {
            let actual: [u8; 32] = Sha256::digest(&data).into();
            if &actual != hash {
                corrupt(&self.inner, *key, &actual);
                return Ok(None);
            }
        }
        Ok(Some(data))
    }

    async fn open(&self, key: &Key, offset: u64) -> Result<Option<(u64, BlobReader)>> {
        open_verified(&self.inner, key, offset).await
    }

    async fn writer(&self, size_hint: Option<u64>) -> Result<Box<dyn BlobWriter>> {
        self.inner.writer(size_hint).await
    }

    async fn remove(&self, key: &Key) -> Result<()> {
        self.inner.remove(key).await
    }

    fn capacity(&self) -> u64 {
        self.inner.capacity()
    }
}

/// Hashes everything read, drops the first `skip` bytes, and fails at the end if the
/// content is not what its name says (removing the copy from `store`).
struct Verifying {
    inner: BlobReader,
    hasher: Sha256,
    expected: [u8; 32],
    skip: u64,
    scratch: Vec<u8>,
    store: Arc<dyn BlobStore>,
}

impl AsyncRead for Verifying {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        while this.skip > 0 {
            if this.scratch.is_empty() {
                this.scratch = vec![0u8; SKIP_CHUNK];
            }
            let want = this.scratch.len().min(this.skip as usize);
            let mut sb = ReadBuf::new(&mut this.scratch[..want]);
            std::task::ready!(this.inner.as_mut().poll_read(cx, &mut sb))?;
            if sb.filled().is_empty() {
                return Poll::Ready(Err(Error::Unavailable(format!(
                    "the stored copy of cas/{} ended before the read offset",
                    hex::encode(this.expected)
                ))
                .into_io()));
            }
            this.hasher.update(sb.filled());
            this.skip -= sb.filled().len() as u64;
            if this.skip == 0 {
                this.scratch = Vec::new();
            }
        }
        let room = buf.remaining() > 0;
        let before = buf.filled().len();
        std::task::ready!(this.inner.as_mut().poll_read(cx, buf))?;
        let new = &buf.filled()[before..];
        if new.is_empty() && room {
            let actual: [u8; 32] = std::mem::take(&mut this.hasher).finalize().into();
            if actual != this.expected {
                corrupt(&this.store, Key::Cas(this.expected), &actual);
                let e = Error::Internal(format!(
                    "the stored copy of cas/{} hashes to {}: not served",
                    hex::encode(this.expected),
                    hex::encode(actual)
                ));
                return Poll::Ready(Err(e.into_io()));
            }
        } else {
            this.hasher.update(new);
        }
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::StoreMetrics;
    use crate::store::MemStore;
    use tokio::io::AsyncReadExt;

    async fn raw_put(store: &dyn BlobStore, key: Key, data: &[u8]) {
        let mut w = store.writer(Some(data.len() as u64)).await.unwrap();
        w.write(data).await.unwrap();
        w.commit(key).await.unwrap();
    }

    async fn read(store: &dyn BlobStore, key: &Key, offset: u64) -> std::io::Result<Vec<u8>> {
        let (_, mut r) = store.open(key, offset).await.unwrap().expect("present");
        let mut v = Vec::new();
        r.read_to_end(&mut v).await.map(|_| v)
    }

    async fn gone(store: &dyn BlobStore, key: &Key) -> bool {
        for _ in 0..100 {
            if store.lookup(std::slice::from_ref(key)).await.unwrap()[0].is_none() {
                return true;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        false
    }

    #[tokio::test]
    async fn intact_blobs_are_served_and_corrupt_ones_never_whole() {
        let mem: Arc<dyn BlobStore> = Arc::new(MemStore::new(1 << 30, StoreMetrics::default()));
        let store = VerifyStore::new(mem.clone());
        let good_data = vec![7u8; 200_000];
        let good = Key::Cas(Sha256::digest(&good_data).into());
        raw_put(mem.as_ref(), good, &good_data).await;
        assert_eq!(read(&store, &good, 0).await.unwrap(), good_data);
        assert_eq!(
            read(&store, &good, 150_000).await.unwrap(),
            &good_data[150_000..],
            "a read from an offset hashes the skipped prefix and serves the rest"
        );
        assert_eq!(
            &store.get(&good).await.unwrap().unwrap()[..],
            &good_data[..]
        );

        // Bytes stored under another blob's name (a tampered bucket, bit rot).
        let claimed = Key::Cas(Sha256::digest(b"what the name says").into());
        raw_put(mem.as_ref(), claimed, b"something else entirely").await;
        let e = read(&store, &claimed, 0).await.unwrap_err();
        assert!(e.to_string().contains("not served"), "{e}");
        assert!(
            gone(mem.as_ref(), &claimed).await,
            "removed from the store below"
        );

        raw_put(mem.as_ref(), claimed, b"something else entirely").await;
        assert!(store.get(&claimed).await.unwrap().is_none(), "get: a miss");
        assert!(gone(mem.as_ref(), &claimed).await);

        // Truncated: fewer bytes than the name's content, also caught.
        raw_put(mem.as_ref(), claimed, b"what the name").await;
        assert!(read(&store, &claimed, 0).await.is_err());

        // Action results are not content-addressed: passed through as stored.
        let ac = Key::ac("", &[1; 32]);
        raw_put(mem.as_ref(), ac, b"any bytes").await;
        assert_eq!(read(&store, &ac, 4).await.unwrap(), b"bytes");
    }
}
