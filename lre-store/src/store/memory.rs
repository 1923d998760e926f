//! The in-memory store: the same LRU semantics as the filesystem store, nothing durable.

use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use bytes::Bytes;

use super::lru_index::LruIndex;
use super::{check_fits, no_room, reader_over, BlobReader, BlobStore, BlobWriter, Key, KeyKind};
use crate::error::{Result, StoreError as Error};
use crate::metrics::StoreMetrics;

pub struct MemStore {
    index: Arc<Mutex<LruIndex<Bytes>>>,
    capacity: u64,
}

impl MemStore {
    pub fn new(capacity: u64, metrics: StoreMetrics) -> MemStore {
        MemStore {
            index: Arc::new(Mutex::new(LruIndex::new(capacity, metrics))),
            capacity,
        }
    }

    fn index(&self) -> MutexGuard<'_, LruIndex<Bytes>> {
        lock(&self.index)
    }

    fn mem_writer(&self, declared: Option<u64>) -> MemWriter {
        MemWriter {
            index: self.index.clone(),
            // Nothing is allocated before data arrives: a declared size costs nothing.
            buf: Vec::new(),
            declared,
            capacity: self.capacity,
            reserved: 0,
        }
    }
}

fn lock(index: &Mutex<LruIndex<Bytes>>) -> MutexGuard<'_, LruIndex<Bytes>> {
    index.lock().unwrap_or_else(|p| p.into_inner())
}

#[async_trait]
impl BlobStore for MemStore {
    async fn lookup(&self, keys: &[Key]) -> Result<Vec<Option<u64>>> {
        let mut index = self.index();
        Ok(keys.iter().map(|k| index.get(k).map(|e| e.size)).collect())
    }

    async fn get(&self, key: &Key) -> Result<Option<Bytes>> {
        Ok(self.index().get(key).map(|e| e.value.clone()))
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
        check_fits(size_hint, self.capacity)?;
        Ok(Box::new(self.mem_writer(size_hint)))
    }

    async fn remove(&self, key: &Key) -> Result<()> {
        self.index().remove(key);
        Ok(())
    }

    async fn list(&self, kind: KeyKind) -> Result<Vec<Key>> {
        Ok(self
            .index()
            .keys()
            .filter(|k| k.key_kind() == kind)
            .copied()
            .collect())
    }

    fn capacity(&self) -> u64 {
        self.capacity
    }
}

struct MemWriter {
    index: Arc<Mutex<LruIndex<Bytes>>>,
    buf: Vec<u8>,
    /// The size the client declared: the buffer never grows past it.
    declared: Option<u64>,
    capacity: u64,
    /// Bytes of `buf` counted against the store's capacity; given back on drop.
    reserved: u64,
}

impl MemWriter {
    /// Makes room for `extra` more bytes: doubling, as a `Vec` would, but never past the
    /// declared size, so a blob declared as 64 MiB costs 64 MiB only once 64 MiB arrived.
    fn grow(&mut self, extra: usize) {
        let need = self.buf.len().saturating_add(extra);
        if need <= self.buf.capacity() {
            return;
        }
        let mut target = self.buf.capacity().saturating_mul(2).max(need).max(4096);
        if let Some(declared) = self.declared.and_then(|d| usize::try_from(d).ok()) {
            if need <= declared {
                target = target.min(declared);
            }
        }
        self.buf.reserve_exact(target - self.buf.len());
    }
}

#[async_trait]
impl BlobWriter for MemWriter {
    async fn write(&mut self, data: &[u8]) -> Result<()> {
        if (self.buf.len() + data.len()) as u64 > self.capacity {
            return Err(Error::InvalidArgument(format!(
                "blob is larger than the whole store ({} bytes)",
                self.capacity
            )));
        }
        let n = data.len() as u64;
        // Evicting from memory is only bookkeeping: no I/O under the lock.
        lock(&self.index).reserve(n).map_err(|e| no_room(n, e))?;
        self.reserved += n;
        self.grow(data.len());
        self.buf.extend_from_slice(data);
        Ok(())
    }

    async fn commit(mut self: Box<Self>, key: Key) -> Result<()> {
        let buf = std::mem::take(&mut self.buf);
        let reserved = std::mem::take(&mut self.reserved);
        let size = buf.len() as u64;
        lock(&self.index).commit(key, size, Bytes::from(buf), reserved);
        Ok(())
    }
}

impl Drop for MemWriter {
    fn drop(&mut self) {
        if self.reserved > 0 {
            lock(&self.index).release(self.reserved);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::StoreMetrics;

    #[tokio::test]
    async fn buffers_grow_with_the_data_never_past_the_declared_size() {
        let store = MemStore::new(1 << 30, StoreMetrics::default());
        let mut w = store.mem_writer(Some(64 << 20));
        assert_eq!(w.buf.capacity(), 0, "a declared size allocates nothing");
        w.write(&[1u8; 1000]).await.unwrap();
        assert!(w.buf.capacity() < 64 << 10, "{}", w.buf.capacity());
        let declared = 3 << 20 | 5;
        let mut w = store.mem_writer(Some(declared));
        let chunk = vec![2u8; 64 << 10];
        let mut left = declared as usize;
        while left > 0 {
            let n = left.min(chunk.len());
            w.write(&chunk[..n]).await.unwrap();
            left -= n;
            assert!(w.buf.capacity() as u64 <= declared);
        }
        assert_eq!(
            w.buf.capacity() as u64,
            declared,
            "exactly the declared size"
        );
    }

    #[tokio::test]
    async fn unfinished_writes_count_against_the_capacity_until_dropped() {
        let metrics = StoreMetrics::default();
        let store = MemStore::new(1000, metrics.clone());
        let mut old = store.writer(Some(600)).await.unwrap();
        old.write(&[0u8; 600]).await.unwrap();
        old.commit(Key::Cas([1; 32])).await.unwrap();
        let mut w = store.writer(Some(700)).await.unwrap();
        w.write(&[0u8; 700]).await.unwrap();
        // The committed entry made room for the in-flight bytes.
        assert!(store.lookup(&[Key::Cas([1; 32])]).await.unwrap()[0].is_none());
        assert_eq!(metrics.in_flight_bytes.get(), 700);
        let mut other = store.writer(Some(400)).await.unwrap();
        let err = other.write(&[0u8; 400]).await.unwrap_err();
        assert!(matches!(err, Error::UploadSpaceExhausted { .. }), "{err}");
        drop(w);
        assert_eq!(metrics.in_flight_bytes.get(), 0);
        other.write(&[0u8; 400]).await.unwrap();
    }
}
