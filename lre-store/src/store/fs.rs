//! The filesystem store: one file per entry at `{cas,cas-x,ac}/<first byte>/<hex hash>`.
//!
//! Committed files are read-only (0444; 0555 for `cas-x`, the executable copies), so the
//! worker can hard-link them into exec roots as they are: see [`FsStore::pin`].
//!
//! Crash safety comes from the write protocol, not from a journal: data goes to `tmp/`,
//! is fsynced, renamed into place, and the directory is fsynced before the write is
//! acknowledged. A rename is atomic, so after a crash or `kill -9` every visible file is
//! complete, and after a power loss every acknowledged one is there; startup deletes
//! whatever is left in `tmp/` and rebuilds the in-memory LRU from a directory scan ordered
//! by mtime.
//!
//! Index changes and the renames/unlinks they describe happen under one lock, so the index
//! and the directory never disagree about which files exist. Bytes in `tmp/` are reserved in
//! the index as they are written, so unfinished uploads count against the size limit too.
//!
//! With `verify_on_read`, a CAS file is hashed before it is served; one whose content no
//! longer matches its name (bit rot, a tampered disk) is deleted and reads as a miss, so
//! clients upload it again.

use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncSeekExt, AsyncWriteExt, BufWriter};

use super::lru_index::LruIndex;
use super::{check_fits, no_room, BlobReader, BlobStore, BlobWriter, Key, KeyKind};
use crate::error::{Result, StoreError as Error};
use crate::metrics::StoreMetrics;

type MakeKey = fn([u8; 32]) -> Key;

/// Every kind of key, with the directory its files live in.
const KINDS: [(&str, MakeKey); 3] = [
    ("cas", Key::Cas),
    ("cas-x", Key::CasExecutable),
    ("ac", Key::Ac),
];

/// The mode a committed file gets: hard links share it, so it must already be what an
/// action may see.
fn file_mode(key: &Key) -> u32 {
    match key {
        Key::CasExecutable(_) => 0o555,
        Key::Cas(_) | Key::Ac(_) => 0o444,
    }
}

/// How stale an entry's on-disk mtime may get before a hit rewrites it. The mtime only
/// orders the LRU after a restart, so it need not be exact, and rewriting it on every hit
/// would turn reads into metadata writes.
const MTIME_REFRESH: Duration = Duration::from_secs(60);

/// How the filesystem store behaves, beyond where it lives and how big it may get.
#[derive(Debug, Clone, Default)]
pub struct FsOptions {
    /// Hash every CAS blob read from disk, and never serve one that does not match.
    pub verify_on_read: bool,
}

impl FsOptions {
    /// The options the `[store]` table sets.
    pub fn from_config(store: &crate::config::FilesystemConfig) -> FsOptions {
        FsOptions {
            verify_on_read: store.verify_on_read,
        }
    }
}

pub struct FsStore {
    inner: Arc<Inner>,
}

struct Inner {
    root: PathBuf,
    tmp: PathBuf,
    /// Value: when the file's mtime was last brought up to date.
    index: Mutex<LruIndex<Instant>>,
    capacity: u64,
    verify_on_read: bool,
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

    /// Reads `file` (positioned at its start) to the end and checks it hashes to `key`.
    /// Blocking. On a mismatch the entry is removed, index and file, and `false` returned.
    fn verify(&self, key: &Key, file: &mut File) -> Result<bool> {
        let path = self.path(key);
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut size = 0u64;
        loop {
            let n = match file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_context(e, format_args!("reading {}", path.display()))),
            };
            hasher.update(&buf[..n]);
            size += n as u64;
        }
        let actual: [u8; 32] = hasher.finalize().into();
        if &actual == key.hash() {
            return Ok(true);
        }
        tracing::warn!(
            digest = %hex::encode(key.hash()),
            size_on_disk = size,
            actual = %hex::encode(actual),
            path = %path.display(),
            "stored blob does not match its digest: deleted, reads of it are misses until it is uploaded again"
        );
        // Only if the path still names the file that was read: a fresh, correct copy
        // committed meanwhile must not go with it.
        let ours = file.metadata().ok().map(|m| inode(&m));
        let mut index = self.index();
        let theirs = fs::metadata(&path).ok().map(|m| inode(&m));
        if ours.is_some() && ours == theirs && index.remove(key).is_some() {
            self.unlink(key);
        }
        Ok(false)
    }
}

fn inode(m: &fs::Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    (m.dev(), m.ino())
}

/// Keeps the error's kind (a full disk stays `StorageFull`) and says what was being done.
fn io_context(e: io::Error, what: std::fmt::Arguments<'_>) -> Error {
    Error::from(io::Error::new(e.kind(), format!("{what}: {e}")))
}

fn join_error(what: &str, e: tokio::task::JoinError) -> Error {
    Error::Internal(format!("{what} task: {e}"))
}

/// Makes the directory's entries (a rename into it, a new subdirectory) durable. Blocking.
fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(test)]
    tests::SYNCED_DIRS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(dir.to_path_buf());
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_context(e, format_args!("syncing directory {}", dir.display())))
}

impl FsStore {
    /// Opens (creating if needed) a store directory and rebuilds its index.
    pub async fn open(root: PathBuf, capacity: u64, metrics: StoreMetrics) -> Result<FsStore> {
        Self::open_with(root, capacity, metrics, FsOptions::default()).await
    }

    pub async fn open_with(
        root: PathBuf,
        capacity: u64,
        metrics: StoreMetrics,
        options: FsOptions,
    ) -> Result<FsStore> {
        tokio::task::spawn_blocking(move || Self::open_blocking(root, capacity, metrics, options))
            .await
            .map_err(|e| join_error("store open", e))?
    }

    fn open_blocking(
        root: PathBuf,
        capacity: u64,
        metrics: StoreMetrics,
        options: FsOptions,
    ) -> Result<FsStore> {
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
                "store directory {} is in use by another process (an lre-server or lre-worker)",
                root.display()
            ))
        })?;
        let tmp = root.join("tmp");
        // Leftovers of writes that never committed (crash, kill -9): never visible, so just drop them.
        if tmp.exists() {
            fs::remove_dir_all(&tmp)?;
        }
        fs::create_dir_all(&tmp)?;
        for (kind, _) in KINDS {
            for b in 0..=255u8 {
                fs::create_dir_all(root.join(kind).join(hex::encode([b])))?;
            }
            // The shard directories must survive a power loss as surely as the files
            // later renamed into them.
            sync_dir(&root.join(kind))?;
        }
        sync_dir(&root)?;

        let mut found = Vec::new();
        for (kind, make) in KINDS {
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
            verify_on_read: options.verify_on_read,
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

    /// Where `key`'s file lives. Only for hard-linking it while it is pinned: the file is
    /// read-only, and writing to it through a link would change the stored entry.
    pub fn file_path(&self, key: &Key) -> PathBuf {
        self.inner.path(key)
    }

    /// Removes `key` only while its file is still the inode `ino`: a caller that found that
    /// very file bad must not remove a fresh copy committed since. Returns whether it did.
    pub async fn remove_if_inode(&self, key: &Key, ino: u64) -> Result<bool> {
        use std::os::unix::fs::MetadataExt;
        let (inner, key) = (self.inner.clone(), *key);
        tokio::task::spawn_blocking(move || {
            let mut index = inner.index();
            let path = inner.path(&key);
            match fs::symlink_metadata(&path) {
                Ok(m) if m.ino() == ino => {
                    index.remove(&key);
                    inner.unlink(&key);
                    Ok(true)
                }
                Ok(_) => Ok(false),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    index.remove(&key);
                    Ok(false)
                }
                Err(e) => Err(io_context(e, format_args!("inspecting {}", path.display()))),
            }
        })
        .await
        .map_err(|e| join_error("remove", e))?
    }

    /// Keeps `keys` from eviction until the returned guard drops, whether they are present
    /// now or committed later: what a worker promised an action stays until it is linked.
    pub fn pin(&self, keys: Vec<Key>) -> Pinned {
        let mut index = self.inner.index();
        for k in &keys {
            index.pin(*k);
        }
        drop(index);
        Pinned {
            inner: self.inner.clone(),
            keys,
        }
    }
}

/// Keys kept from eviction, see [`FsStore::pin`].
pub struct Pinned {
    inner: Arc<Inner>,
    keys: Vec<Key>,
}

impl Drop for Pinned {
    fn drop(&mut self) {
        let mut index = self.inner.index();
        for k in &self.keys {
            index.unpin(k);
        }
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
                    // Read-only: the file's mode is 0444, and its owner may set its times.
                    if let Ok(f) = File::open(inner.path(&k)) {
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
        if self.verifies(key) {
            let Some((_, mut reader)) = self.open(key, 0, None).await? else {
                return Ok(None);
            };
            let mut data = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut reader, &mut data).await?;
            return Ok(Some(Bytes::from(data)));
        }
        match tokio::fs::read(self.inner.path(key)).await {
            Ok(data) => Ok(Some(Bytes::from(data))),
            // Evicted between the lookup and the read: a miss, never an error.
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn open(
        &self,
        key: &Key,
        offset: u64,
        // With `verify_on_read` the whole file is checked before a byte is served.
        _limit: Option<u64>,
    ) -> Result<Option<(u64, BlobReader)>> {
        if self.lookup(std::slice::from_ref(key)).await?[0].is_none() {
            return Ok(None);
        }
        if self.verifies(key) {
            // Hashed and served through one descriptor: what is served is what was checked.
            let (inner, key) = (self.inner.clone(), *key);
            let checked = tokio::task::spawn_blocking(move || -> Result<Option<(u64, File)>> {
                let path = inner.path(&key);
                let mut file = match File::open(&path) {
                    Ok(f) => f,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                    Err(e) => {
                        return Err(io_context(e, format_args!("opening {}", path.display())))
                    }
                };
                if !inner.verify(&key, &mut file)? {
                    return Ok(None);
                }
                let size = file
                    .seek(SeekFrom::End(0))
                    .and_then(|size| file.seek(SeekFrom::Start(offset.min(size))).map(|_| size))
                    .map_err(|e| io_context(e, format_args!("seeking in {}", path.display())))?;
                Ok(Some((size, file)))
            })
            .await
            .map_err(|e| join_error("verified read", e))??;
            return Ok(checked.map(|(size, file)| {
                (
                    size,
                    Box::pin(tokio::fs::File::from_std(file)) as BlobReader,
                )
            }));
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
        let file = tokio::fs::File::create(&path)
            .await
            .map_err(|e| io_context(e, format_args!("creating {}", path.display())))?;
        Ok(Box::new(FsWriter {
            inner: self.inner.clone(),
            tmp: Some(TmpFile(Some(path))),
            file: Some(BufWriter::with_capacity(1 << 20, file)),
            written: 0,
            reservation: Arc::new(Reservation {
                inner: self.inner.clone(),
                bytes: AtomicU64::new(0),
            }),
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
        .map_err(|e| join_error("remove", e))
    }

    async fn list(&self, kind: KeyKind) -> Result<Vec<Key>> {
        Ok(self
            .inner
            .index()
            .keys()
            .filter(|k| k.key_kind() == kind)
            .copied()
            .collect())
    }

    fn capacity(&self) -> u64 {
        self.inner.capacity
    }
}

impl FsStore {
    /// Action-cache entries are named by a hash of the request, not of their content.
    fn verifies(&self, key: &Key) -> bool {
        self.inner.verify_on_read && key.is_content_addressed()
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

    /// Deletes the file now. Blocking.
    fn remove_now(mut self) {
        if let Some(p) = self.0.take() {
            remove_tmp(&p);
        }
    }
}

fn remove_tmp(p: &Path) {
    if let Err(e) = fs::remove_file(p) {
        if e.kind() != io::ErrorKind::NotFound {
            tracing::warn!(path = %p.display(), error = %e, "could not delete an upload's temp file");
        }
    }
}

impl Drop for TmpFile {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            // Unlinking a large file can take a while: not on an async worker thread.
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => drop(rt.spawn_blocking(move || remove_tmp(&p))),
                Err(_) => remove_tmp(&p),
            }
        }
    }
}

/// The bytes one writer holds in `tmp/`, counted in the index; given back when it drops.
/// Shared with the blocking tasks that change it, so a write whose future is dropped
/// mid-reservation still gives its bytes back.
struct Reservation {
    inner: Arc<Inner>,
    bytes: AtomicU64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let n = *self.bytes.get_mut();
        if n > 0 {
            self.inner.index().release(n);
        }
    }
}

struct FsWriter {
    inner: Arc<Inner>,
    /// `None` once committed or discarded.
    tmp: Option<TmpFile>,
    /// `None` while suspended: the temp file is closed, and reopened by the next write.
    file: Option<BufWriter<tokio::fs::File>>,
    written: u64,
    reservation: Arc<Reservation>,
}

impl FsWriter {
    /// Counts `n` more bytes against the store's capacity before they are written.
    async fn reserve(&mut self, n: u64) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        {
            // The common case, when nothing has to be evicted, needs no I/O.
            let mut index = self.inner.index();
            if index.fits(n) && index.reserve(n).is_ok() {
                self.reservation.bytes.fetch_add(n, Ordering::Relaxed);
                return Ok(());
            }
        }
        let reservation = self.reservation.clone();
        tokio::task::spawn_blocking(move || {
            let inner = &reservation.inner;
            let mut index = inner.index();
            let reserved = index.reserve(n).map(|victims| {
                reservation.bytes.fetch_add(n, Ordering::Relaxed);
                for (victim, _) in victims {
                    inner.unlink(&victim);
                }
            });
            // Released before `reservation` can drop (if the writer went meanwhile): its
            // drop takes this lock.
            drop(index);
            reserved.map_err(|e| no_room(n, e))
        })
        .await
        .map_err(|e| join_error("reserve", e))?
    }
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
        let path = match &self.tmp {
            Some(t) => t.path().to_path_buf(),
            None => return Err(Error::Internal("write after commit".into())),
        };
        self.reserve(data.len() as u64).await?;
        if self.file.is_none() {
            let f = tokio::fs::OpenOptions::new()
                .append(true)
                .open(&path)
                .await
                .map_err(|e| io_context(e, format_args!("reopening {}", path.display())))?;
            self.file = Some(BufWriter::with_capacity(1 << 20, f));
        }
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| Error::Internal("temp file not open".into()))?;
        file.write_all(data)
            .await
            .map_err(|e| io_context(e, format_args!("writing {}", path.display())))?;
        self.written += data.len() as u64;
        Ok(())
    }

    async fn suspend(&mut self) -> Result<()> {
        if let Some(mut file) = self.file.take() {
            file.flush().await.map_err(|e| {
                io_context(e, format_args!("flushing {}", self.tmp_path().display()))
            })?;
        }
        Ok(())
    }

    async fn discard(mut self: Box<Self>) {
        self.file = None;
        if let Some(tmp) = self.tmp.take() {
            let _ = tokio::task::spawn_blocking(move || tmp.remove_now()).await;
        }
    }

    async fn commit(mut self: Box<Self>, key: Key) -> Result<()> {
        let tmp = self
            .tmp
            .take()
            .ok_or_else(|| Error::Internal("double commit".into()))?;
        let synced = async {
            let file = match self.file.take() {
                Some(mut f) => {
                    f.flush().await?;
                    f.into_inner()
                }
                // Suspended: the data was flushed to the file then, but not synced.
                None => {
                    tokio::fs::OpenOptions::new()
                        .write(true)
                        .open(tmp.path())
                        .await?
                }
            };
            use std::os::unix::fs::PermissionsExt;
            file.set_permissions(fs::Permissions::from_mode(file_mode(&key)))
                .await?;
            file.sync_all().await
        }
        .await;
        if let Err(e) = synced {
            let err = io_context(e, format_args!("writing {}", tmp.path().display()));
            let _ = tokio::task::spawn_blocking(move || tmp.remove_now()).await;
            return Err(err);
        }
        let reservation = self.reservation.clone();
        let size = self.written;
        tokio::task::spawn_blocking(move || {
            let inner = &reservation.inner;
            let dest = inner.path(&key);
            let mut index = inner.index();
            let reserved = reservation.bytes.swap(0, Ordering::Relaxed);
            if index.contains(&key) && key.is_content_addressed() {
                // Same content already stored by a concurrent writer; ours is redundant.
                index.release(reserved);
                index.get(&key);
                drop(index);
                tmp.remove_now();
                return Ok(());
            }
            if let Err(e) = fs::rename(tmp.path(), &dest) {
                index.release(reserved);
                drop(index);
                let err = io_context(
                    e,
                    format_args!("renaming {} to {}", tmp.path().display(), dest.display()),
                );
                tmp.remove_now();
                return Err(err);
            }
            tmp.disarm();
            for (victim, _) in index.commit(key, size, Instant::now(), reserved) {
                inner.unlink(&victim);
            }
            drop(index);
            // Not acknowledged before the new directory entry is on disk: a power loss
            // right after the reply must not lose the blob.
            sync_dir(dest.parent().unwrap_or(&inner.root))
        })
        .await
        .map_err(|e| join_error("commit", e))?
    }
}

impl FsWriter {
    fn tmp_path(&self) -> &Path {
        self.tmp.as_ref().map(|t| t.path()).unwrap_or(Path::new(""))
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::store::CasUpload;

    /// Every directory `sync_dir` was called on, by every test in this binary.
    pub static SYNCED_DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

    fn hash(data: &[u8]) -> [u8; 32] {
        Sha256::digest(data).into()
    }

    async fn put(store: &FsStore, data: &[u8]) -> Key {
        let mut up = CasUpload::new(store, hash(data), Some(data.len() as u64))
            .await
            .unwrap();
        up.write(data).await.unwrap();
        Key::cas(&up.finish().await.unwrap())
    }

    fn tmp_bytes(store: &FsStore) -> u64 {
        fs::read_dir(&store.inner.tmp)
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum()
    }

    /// A stream reset while the store is writing drops `CasUpload::write` half way: the
    /// file may hold bytes the hash never saw, so the upload must not go on or commit
    /// (a resumed client would otherwise store some bytes twice under a matching hash).
    #[tokio::test]
    async fn a_write_cancelled_half_way_tears_the_upload() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::open(dir.path().into(), 1 << 30, StoreMetrics::default())
            .await
            .unwrap();
        let data: Vec<u8> = (0..(64u32 << 20)).map(|i| (i % 251) as u8).collect();
        let mut up = CasUpload::new(&store, hash(&data), Some(data.len() as u64))
            .await
            .unwrap();
        let cut = tokio::time::timeout(Duration::ZERO, up.write(&data)).await;
        assert!(
            cut.is_err(),
            "the 64 MiB write finished within one poll: nothing was cancelled"
        );
        assert!(up.is_torn());
        let e = up.write(&data).await.unwrap_err();
        assert!(e.to_string().contains("start again at offset 0"), "{e}");
        assert!(up.finish().await.is_err());
        assert!(store.lookup(&[Key::Cas(hash(&data))]).await.unwrap()[0].is_none());
    }

    #[tokio::test]
    async fn a_commit_syncs_the_directory_it_renamed_into() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::open(dir.path().into(), 1 << 20, StoreMetrics::default())
            .await
            .unwrap();
        let key = put(&store, b"durable").await;
        let parent = store.inner.path(&key).parent().unwrap().to_path_buf();
        let synced = SYNCED_DIRS.lock().unwrap().clone();
        assert!(
            synced.contains(&parent),
            "{parent:?} never synced: {synced:?}"
        );
        assert!(synced.contains(&dir.path().join("cas")));
    }

    #[tokio::test]
    async fn a_corrupt_blob_is_deleted_instead_of_served_when_verifying() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = StoreMetrics::default();
        let options = FsOptions {
            verify_on_read: true,
        };
        let store = FsStore::open_with(dir.path().into(), 1 << 20, metrics.clone(), options)
            .await
            .unwrap();
        let good = put(&store, b"intact blob").await;
        let bad = put(&store, b"blob to rot").await;
        let path = store.inner.path(&bad);
        damage(&path, b"blob to ROT"); // same size, other content
        assert_eq!(
            &store.get(&good).await.unwrap().unwrap()[..],
            b"intact blob"
        );
        let (size, _) = store.open(&good, 3, None).await.unwrap().unwrap();
        assert_eq!(size, 11);
        assert!(store.open(&bad, 0, None).await.unwrap().is_none());
        assert!(!path.exists(), "the corrupt file was left in place");
        assert_eq!(store.lookup(&[bad]).await.unwrap(), vec![None]);
        assert_eq!(metrics.entries.get(), 1);
        // Uploaded again, it is served again.
        put(&store, b"blob to rot").await;
        assert_eq!(&store.get(&bad).await.unwrap().unwrap()[..], b"blob to rot");
        damage(&path, b"blob to rut");
        assert!(store.get(&bad).await.unwrap().is_none(), "get verifies too");

        // Without the option the same damage is served: the check is what stops it.
        drop(store);
        let store = FsStore::open(dir.path().into(), 1 << 20, StoreMetrics::default())
            .await
            .unwrap();
        put(&store, b"blob to rot").await;
        damage(&path, b"blob to ROT");
        assert_eq!(&store.get(&bad).await.unwrap().unwrap()[..], b"blob to ROT");
    }

    /// Rewrites a committed (read-only) file in place, as a disk fault or a stray process
    /// would, keeping its mode: a test run by a user other than root cannot write it as is.
    fn damage(path: &Path, data: &[u8]) {
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(path).unwrap().permissions();
        fs::set_permissions(path, fs::Permissions::from_mode(0o644)).unwrap();
        fs::write(path, data).unwrap();
        fs::set_permissions(path, mode).unwrap();
    }

    #[tokio::test]
    async fn unfinished_writes_count_against_the_capacity() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = StoreMetrics::default();
        let store = FsStore::open(dir.path().into(), 1000, metrics.clone())
            .await
            .unwrap();
        let old = put(&store, &[1u8; 600]).await;
        let mut w = store.writer(Some(700)).await.unwrap();
        w.write(&[0u8; 700]).await.unwrap();
        // The committed entry made room, on disk too, for the bytes in tmp/.
        assert_eq!(store.lookup(&[old]).await.unwrap(), vec![None]);
        assert!(!store.inner.path(&old).exists());
        assert_eq!(metrics.in_flight_bytes.get(), 700);
        let mut other = store.writer(Some(400)).await.unwrap();
        let err = other.write(&[0u8; 400]).await.unwrap_err();
        assert!(matches!(err, Error::UploadSpaceExhausted { .. }), "{err}");
        assert_eq!(err.grpc_code(), tonic::Code::ResourceExhausted);
        // Suspending gives back the buffer and the descriptor, not the reservation.
        w.suspend().await.unwrap();
        assert_eq!(tmp_bytes(&store), 700);
        assert_eq!(metrics.in_flight_bytes.get(), 700);
        w.discard().await;
        assert_eq!(metrics.in_flight_bytes.get(), 0);
        assert_eq!(tmp_bytes(&store), 0);
        other.write(&[0u8; 400]).await.unwrap();
        other.commit(Key::Ac([9; 32])).await.unwrap();
        assert_eq!(
            (metrics.in_flight_bytes.get(), metrics.size_bytes.get()),
            (0, 400)
        );
    }

    #[tokio::test]
    async fn a_suspended_write_resumes_where_it_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::open(dir.path().into(), 1 << 20, StoreMetrics::default())
            .await
            .unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let mut up = CasUpload::new(&store, hash(&data), Some(data.len() as u64))
            .await
            .unwrap();
        up.write(&data[..100_000]).await.unwrap();
        up.suspend().await.unwrap();
        up.write(&data[100_000..200_000]).await.unwrap();
        up.suspend().await.unwrap();
        up.suspend().await.unwrap();
        up.write(&data[200_000..]).await.unwrap();
        up.suspend().await.unwrap();
        let key = Key::cas(&up.finish().await.unwrap());
        assert_eq!(store.get(&key).await.unwrap().unwrap(), data);
        assert_eq!(tmp_bytes(&store), 0);
    }
}
