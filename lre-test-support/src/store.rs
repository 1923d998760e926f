//! Store helpers: verified writes, whole reads, and a store that counts what is read out of
//! it (to show that something was, or was not, read).

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use async_trait::async_trait;
use bytes::Bytes;
use lre_store::store::{BlobReader, BlobStore, BlobWriter, CasUpload, Key, KeyKind};
use lre_store::Result;
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncRead, ReadBuf};

pub fn sha(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// Uploads `data` as a CAS blob through the verified path every server write takes.
pub async fn put(store: &dyn BlobStore, data: &[u8]) -> Key {
    let mut up = CasUpload::for_key(store, Key::Cas(sha(data)), Some(data.len() as u64))
        .await
        .expect("writer");
    for chunk in data.chunks(1 << 20) {
        up.write(chunk).await.expect("write");
    }
    let d = up.finish().await.expect("finish");
    Key::cas(&d)
}

pub async fn read_all(store: &dyn BlobStore, key: &Key, offset: u64) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let (_, mut r) = store.open(key, offset, None).await.expect("open")?;
    let mut v = Vec::new();
    r.read_to_end(&mut v).await.expect("read");
    Some(v)
}

/// A store that counts every byte read out of it (whole gets and streamed reads).
pub struct Counting<S> {
    pub inner: S,
    pub served: Arc<AtomicU64>,
}

impl<S> Counting<S> {
    pub fn new(inner: S) -> Counting<S> {
        Counting {
            inner,
            served: Arc::default(),
        }
    }

    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }
}

struct CountingReader {
    inner: BlobReader,
    served: Arc<AtomicU64>,
}

impl AsyncRead for CountingReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = self.inner.as_mut().poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        self.served.fetch_add(n, Ordering::Relaxed);
        r
    }
}

#[async_trait]
impl<S: BlobStore> BlobStore for Counting<S> {
    async fn lookup(&self, keys: &[Key]) -> Result<Vec<Option<u64>>> {
        self.inner.lookup(keys).await
    }
    async fn get(&self, key: &Key) -> Result<Option<Bytes>> {
        let r = self.inner.get(key).await?;
        if let Some(b) = &r {
            self.served.fetch_add(b.len() as u64, Ordering::Relaxed);
        }
        Ok(r)
    }
    async fn open(
        &self,
        key: &Key,
        offset: u64,
        limit: Option<u64>,
    ) -> Result<Option<(u64, BlobReader)>> {
        Ok(self
            .inner
            .open(key, offset, limit)
            .await?
            .map(|(size, inner)| {
                let served = self.served.clone();
                (
                    size,
                    Box::pin(CountingReader { inner, served }) as BlobReader,
                )
            }))
    }
    async fn writer(&self, size_hint: Option<u64>) -> Result<Box<dyn BlobWriter>> {
        self.inner.writer(size_hint).await
    }
    async fn remove(&self, key: &Key) -> Result<()> {
        self.inner.remove(key).await
    }
    async fn list(&self, kind: KeyKind) -> Result<Vec<Key>> {
        self.inner.list(kind).await
    }
    fn capacity(&self) -> u64 {
        self.inner.capacity()
    }
}
