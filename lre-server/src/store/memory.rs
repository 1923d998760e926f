//! The in-memory store: the same LRU semantics as the filesystem store, nothing durable.

use std::io::Cursor;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use bytes::Bytes;

use super::lru_index::LruIndex;
use super::{check_fits, BlobReader, BlobStore, BlobWriter, Key};
use crate::error::{Error, Result};
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
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }
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

    async fn open(&self, key: &Key, offset: u64) -> Result<Option<(u64, BlobReader)>> {
        let Some(data) = self.get(key).await? else {
            return Ok(None);
        };
        let size = data.len() as u64;
        let mut cursor = Cursor::new(data);
        cursor.set_position(offset.min(size));
        Ok(Some((size, Box::pin(cursor))))
    }

    async fn writer(&self, size_hint: Option<u64>) -> Result<Box<dyn BlobWriter>> {
        check_fits(size_hint, self.capacity)?;
        let cap = size_hint.unwrap_or(0).min(64 << 20) as usize;
        Ok(Box::new(MemWriter {
            index: self.index.clone(),
            buf: Vec::with_capacity(cap),
            capacity: self.capacity,
        }))
    }

    async fn remove(&self, key: &Key) -> Result<()> {
        self.index().remove(key);
        Ok(())
    }

    fn capacity(&self) -> u64 {
        self.capacity
    }
}

struct MemWriter {
    index: Arc<Mutex<LruIndex<Bytes>>>,
    buf: Vec<u8>,
    capacity: u64,
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
        self.buf.extend_from_slice(data);
        Ok(())
    }

    async fn commit(self: Box<Self>, key: Key) -> Result<()> {
        let size = self.buf.len() as u64;
        let mut index = self.index.lock().unwrap_or_else(|p| p.into_inner());
        index.insert(key, size, Bytes::from(self.buf));
        Ok(())
    }
}
