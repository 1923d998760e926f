//! The filesystem store: one file per entry at `{cas,ac}/<first byte>/<hex hash>`.
//!
//! Crash safety comes from the write protocol, not from a journal: data goes to `tmp/`,
//! is fsynced, and only then renamed into place. A rename is atomic, so after a crash or
//! `kill -9` every visible file is complete; startup deletes whatever is left in `tmp/`
//! and rebuilds the in-memory LRU from a directory scan ordered by mtime.
//!
//! Index changes and the renames/unlinks they describe happen under one lock, so the index
//! and the directory never disagree about which files exist.

use std::fs::{self, File};
use std::io::{self, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::io::{AsyncSeekExt, AsyncWriteExt, BufWriter};

use super::lru_index::LruIndex;
use super::{check_fits, BlobReader, BlobStore, BlobWriter, Key};
use crate::error::{Error, Result};
use crate::metrics::StoreMetrics;

/// How stale an entry's on-disk mtime may get before a hit rewrites it. The mtime only
/// orders the LRU after a restart, so it need not be exact, and rewriting it on every hit
/// would turn reads into metadata writes.
const MTIME_REFRESH: Duration = Duration::from_secs(60);

pub struct FsStore {
    inner: Arc<Inner>,
}

struct Inner {
    root: PathBuf,
    tmp: PathBuf,
    /// Value: when the file's mtime was last brought up to date.
    index: Mutex<LruIndex<Instant>>,
    capacity: u64,
    /// Held for the store's lifetime: two servers sharing a directory would corrupt the LRU.
    _lock: File,
}

impl Inner {
    fn path(&self, key: &Key) -> PathBuf {
        let h = key.hash();
        self.root
            .join(key.kind())
            .join(hex::encode(&h[..1]))
            .join(hex::encode(h))
    }

    fn index(&self) -> MutexGuard<'_, LruIndex<Instant>> {
        // A panic while holding the lock leaves the index usable: every operation on it
        // completes its bookkeeping before anything that can panic.
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn unlink(&self, key: &Key) {
        let path = self.path(key);
        if let Err(e) = fs::remove_file(&path) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(path = %path.display(), error = %e, "could not delete evicted blob");
            }
        }
    }
}

impl FsStore {
    /// Opens (creating if needed) a store directory and rebuilds its index.
    pub async fn open(root: PathBuf, capacity: u64, metrics: StoreMetrics) -> Result<FsStore> {
        tokio::task::spawn_blocking(move || Self::open_blocking(root, capacity, metrics))
            .await
            .map_err(|e| Error::Internal(format!("store open task: {e}")))?
    }

    fn open_blocking(root: PathBuf, capacity: u64, metrics: StoreMetrics) -> Result<FsStore> {
        let started = Instant::now();
        fs::create_dir_all(&root).map_err(|e| {
            Error::Internal(format!(
                "cannot create store directory {}: {e}",
                root.display()
            ))
        })?;
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(root.join("LOCK"))?;
        lock.try_lock().map_err(|_| {
            Error::Internal(format!(
                "store directory {} is in use by another lre-server",
                root.display()
            ))
        })?;
        let tmp = root.join("tmp");
        // Leftovers of writes that never committed (crash, kill -9): never visible, so just drop them.
        if tmp.exists() {
            fs::remove_dir_all(&tmp)?;
        }
        fs::create_dir_all(&tmp)?;
        for kind in ["cas", "ac"] {
            for b in 0..=255u8 {
                fs::create_dir_all(root.join(kind).join(hex::encode([b])))?;
            }
        }

        let mut found = Vec::new();
        for (kind, make) in [("cas", Key::Cas as fn([u8; 32]) -> Key), ("ac", Key::Ac)] {
            for b in 0..=255u8 {
                let dir = root.join(kind).join(hex::encode([b]));
                for entry in fs::read_dir(&dir)? {
                    let entry = entry?;
                    let name = entry.file_name();
                    let mut hash = [0u8; 32];
                    let parsed = name
                        .to_str()
                        .filter(|n| n.len() == 64 && n.starts_with(&hex::encode([b])))
                        .and_then(|n| hex::decode_to_slice(n, &mut hash).ok());
                    if parsed.is_none() {
                        tracing::warn!(path = %entry.path().display(), "ignoring unexpected file in store");
                        continue;
                    }
                    let meta = entry.metadata()?;
                    let mtime = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                    found.push((mtime, make(hash), meta.len()));
                }
            }
        }
        found.sort_by_key(|(mtime, _, _)| *mtime);
        let inner = Inner {
            root,
            tmp,
            index: Mutex::new(LruIndex::new(capacity, metrics)),
            capacity,
            _lock: lock,
        };
        {
            let mut index = inner.index();
            let now = Instant::now();
            for (_, key, size) in &found {
                for (victim, _) in index.insert(*key, *size, now) {
                    inner.unlink(&victim);
                }
            }
        }
        tracing::info!(
            root = %inner.root.display(),
            entries = found.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "filesystem store index rebuilt"
        );
        Ok(FsStore {
            inner: Arc::new(inner),
        })
    }

    pub fn root(&self) -> &Path {
        &self.inner.root
    }
}

#[async_trait]
impl BlobStore for FsStore {
    async fn lookup(&self, keys: &[Key]) -> Result<Vec<Option<u64>>> {
        let now = Instant::now();
        let mut stale = Vec::new();
        let sizes = {
            let mut index = self.inner.index();
            keys.iter()
                .map(|k| {
                    index.get(k).map(|e| {
                        if now.duration_since(e.value) > MTIME_REFRESH {
                            e.value = now;
                            stale.push(*k);
                        }
                        e.size
                    })
                })
                .collect()
        };
        if !stale.is_empty() {
            let inner = self.inner.clone();
            tokio::task::spawn_blocking(move || {
                for k in stale {
                    if let Ok(f) = File::options().write(true).open(inner.path(&k)) {
                        let _ = f.set_modified(SystemTime::now());
                    }
                }
            });
        }
        Ok(sizes)
    }

    async fn get(&self, key: &Key) -> Result<Option<Bytes>> {
        if self.lookup(std::slice::from_ref(key)).await?[0].is_none() {
            return Ok(None);
        }
        match tokio::fs::read(self.inner.path(key)).await {
            Ok(data) => Ok(Some(Bytes::from(data))),
            // Evicted between the lookup and the read: a miss, never an error.
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn open(&self, key: &Key, offset: u64) -> Result<Option<(u64, BlobReader)>> {
        if self.lookup(std::slice::from_ref(key)).await?[0].is_none() {
            return Ok(None);
        }
        let mut file = match tokio::fs::File::open(self.inner.path(key)).await {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        // The open descriptor keeps the content alive even if the entry is evicted now.
        let size = file.metadata().await?.len();
        if offset > 0 {
            file.seek(SeekFrom::Start(offset.min(size))).await?;
        }
        Ok(Some((size, Box::pin(file))))
    }

    async fn writer(&self, size_hint: Option<u64>) -> Result<Box<dyn BlobWriter>> {
        check_fits(size_hint, self.inner.capacity)?;
        let path = self.inner.tmp.join(uuid::Uuid::new_v4().to_string());
        let file = tokio::fs::File::create(&path).await?;
        Ok(Box::new(FsWriter {
            inner: self.inner.clone(),
            tmp: Some(TmpFile(Some(path))),
            file: Some(BufWriter::with_capacity(1 << 20, file)),
            written: 0,
        }))
    }

    async fn remove(&self, key: &Key) -> Result<()> {
        let inner = self.inner.clone();
        let key = *key;
        tokio::task::spawn_blocking(move || {
            let mut index = inner.index();
            if index.remove(&key).is_some() {
                inner.unlink(&key);
            }
        })
        .await
        .map_err(|e| Error::Internal(format!("remove task: {e}")))
    }

    fn capacity(&self) -> u64 {
        self.inner.capacity
    }
}

/// Deletes the temp file unless it was renamed into place.
struct TmpFile(Option<PathBuf>);

impl TmpFile {
    fn path(&self) -> &Path {
        self.0.as_deref().unwrap_or(Path::new(""))
    }

    /// The file now lives elsewhere under another name: nothing to clean up.
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for TmpFile {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = fs::remove_file(p);
        }
    }
}

struct FsWriter {
    inner: Arc<Inner>,
    tmp: Option<TmpFile>,
    file: Option<BufWriter<tokio::fs::File>>,
    written: u64,
}

#[async_trait]
impl BlobWriter for FsWriter {
    async fn write(&mut self, data: &[u8]) -> Result<()> {
        if self.written + data.len() as u64 > self.inner.capacity {
            return Err(Error::InvalidArgument(format!(
                "blob is larger than the whole store ({} bytes)",
                self.inner.capacity
            )));
        }
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| Error::Internal("write after commit".into()))?;
        file.write_all(data).await?;
        self.written += data.len() as u64;
        Ok(())
    }

    async fn commit(mut self: Box<Self>, key: Key) -> Result<()> {
        let mut file = self
            .file
            .take()
            .ok_or_else(|| Error::Internal("double commit".into()))?;
        file.flush().await?;
        let file = file.into_inner();
        file.sync_all().await?;
        drop(file);
        let tmp = self
            .tmp
            .take()
            .ok_or_else(|| Error::Internal("double commit".into()))?;
        let inner = self.inner.clone();
        let size = self.written;
        tokio::task::spawn_blocking(move || {
            let mut index = inner.index();
            if index.contains(&key) && key_is_content_addressed(&key) {
                // Same content already stored by a concurrent writer; ours is redundant.
                index.get(&key);
                return Ok(());
            }
            fs::rename(tmp.path(), inner.path(&key))?;
            tmp.disarm();
            for (victim, _) in index.insert(key, size, Instant::now()) {
                inner.unlink(&victim);
            }
            Ok(())
        })
        .await
        .map_err(|e| Error::Internal(format!("commit task: {e}")))?
    }
}

/// CAS entries are immutable (same key, same bytes); action-cache entries may be replaced.
fn key_is_content_addressed(key: &Key) -> bool {
    matches!(key, Key::Cas(_))
}
