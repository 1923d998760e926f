//! The filesystem store: one file per entry at `{cas,cas-x,ac}/<first byte>/<hex hash>`.
//!
//! Committed files are read-only (0444; 0555 for `cas-x`, the executable copies), so the
//! worker can hard-link them into exec roots as they are: see [`FsStore::pin`].
//!
//! Crash safety comes from the write protocol, not from a journal: data goes to `tmp/`
//! (`writer.rs`) and is renamed into place, so after a crash or `kill -9` every visible
//! file is complete. Durability against a power cut comes in rounds (`sync.rs`): after an
//! unclean stop, startup hashes every CAS file written since the last completed round and
//! deletes the ones a power cut tore, so they read as misses, never as corrupt data.
//! Startup also deletes whatever is left in `tmp/` and rebuilds the in-memory LRU from a
//! directory scan ordered by mtime.
//!
//! Bytes in `tmp/` are reserved in the index as they are written, so unfinished uploads
//! count against the size limit too.
//!
//! With `verify_on_read`, a CAS file is hashed before it is served; one whose content no
//! longer matches its name (bit rot, a tampered disk) is deleted and reads as a miss, so
//! clients upload it again.

mod inner;
mod sync;
mod writer;

use std::fs::{self, File};
use std::io::{self, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::io::AsyncSeekExt;

use super::lru_index::LruIndex;
use super::{check_fits, BlobReader, BlobStore, BlobWriter, Key, KeyKind};
use crate::error::{Result, StoreError as Error};
use crate::metrics::StoreMetrics;
use inner::{io_context, join_error, Inner};
pub use sync::SyncPolicy;
use sync::{Checkpoint, Syncer};
use writer::FsWriter;

/// How stale an entry's on-disk mtime may get before a hit rewrites it. The mtime only
/// orders the LRU after a restart, so it need not be exact, and rewriting it on every hit
/// would turn reads into metadata writes.
const MTIME_REFRESH: Duration = Duration::from_secs(60);

/// How the filesystem store behaves, beyond where it lives and how big it may get.
#[derive(Debug, Clone, Default)]
pub struct FsOptions {
    /// Hash every CAS blob read from disk, and never serve one that does not match.
    pub verify_on_read: bool,
    /// When commits reach the disk.
    pub sync: SyncPolicy,
}

impl FsOptions {
    /// The options the `[store]` table sets.
    pub fn from_config(store: &crate::config::FilesystemConfig) -> FsOptions {
        FsOptions {
            verify_on_read: store.verify_on_read,
            sync: SyncPolicy {
                interval: Duration::from_millis(store.sync_interval_ms),
                max_unsynced: store.max_unsynced.0,
            },
        }
    }
}

/// What startup hashed because a power cut might have torn it.
#[derive(Default)]
struct Checked {
    files: u64,
    bytes: u64,
    torn: u64,
}

/// Whether the CAS file at `path` holds what `key` names; a torn one is deleted. One that
/// cannot even be read (a sector the cut damaged) is left out and deleted if possible: the
/// store opens without it rather than not at all. Blocking.
fn intact(path: &Path, key: &Key, checked: &mut Checked) -> bool {
    let function = key.function().unwrap_or_default();
    let hashed = File::open(path).and_then(|mut file| {
        inner::content_hash(function, &mut file, path).map_err(|e| io::Error::other(e.to_string()))
    });
    checked.files += 1;
    let why = match hashed {
        Ok((actual, size)) => {
            checked.bytes += size;
            if &actual == key.hash() {
                return true;
            }
            format!("torn ({size} bytes on disk that do not match its name)")
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return false,
        Err(e) => format!("unreadable ({e})"),
    };
    checked.torn += 1;
    tracing::warn!(path = %path.display(), "blob left {why} by an unclean stop: deleted, it reads as a miss");
    if let Err(e) = fs::remove_file(path) {
        tracing::error!(path = %path.display(), error = %e, "could not delete a damaged blob; it stays out of the index");
    }
    false
}

pub struct FsStore {
    inner: Arc<Inner>,
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
        for kind in KeyKind::ALL {
            for b in 0..=255u8 {
                fs::create_dir_all(root.join(kind.dir()).join(hex::encode([b])))?;
            }
        }
        // Read before the syncer's first round replaces it.
        let checkpoint = Checkpoint::read(&root);

        let mut found = Vec::new();
        let mut checked = Checked::default();
        for kind in KeyKind::ALL {
            for b in 0..=255u8 {
                let dir = root.join(kind.dir()).join(hex::encode([b]));
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
                    let key = Key::of_kind(kind, hash);
                    if key.is_content_addressed()
                        && checkpoint.may_be_unsynced(&meta)
                        && !intact(&entry.path(), &key, &mut checked)
                    {
                        continue;
                    }
                    let mtime = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                    found.push((mtime, key, meta.len()));
                }
            }
        }
        if checked.files > 0 {
            tracing::warn!(
                root = %root.display(),
                checked = checked.files,
                checked_bytes = checked.bytes,
                torn = checked.torn,
                "checked the blobs written since the last sync round before an unclean stop; torn ones (a power cut before they reached the disk) are deleted and read as misses"
            );
        }
        found.sort_by_key(|(mtime, _, _)| *mtime);
        // Its first round makes the directories and the deletions above durable.
        let syncer = Syncer::start(&root, options.sync)?;
        let inner = Inner {
            root,
            tmp,
            index: Mutex::new(LruIndex::new(capacity, metrics)),
            capacity,
            verify_on_read: options.verify_on_read,
            syncer,
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
        // A pinned file is about to be hard-linked (and later unlinked), which changes its
        // ctime: a round soon keeps the next start's check small.
        self.inner.syncer.touched();
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
            // Under the index lock, as every unlink: a fresh copy committed meanwhile must
            // not be the file that goes. Only when pins held the store over its size, so
            // rarely, and a few small unlinks at most.
            for (victim, _) in index.unpin(k) {
                self.inner.unlink(&victim);
            }
        }
        drop(index);
        self.inner.syncer.touched();
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
            // New mtimes are new ctimes: a round soon keeps the next start's check small.
            self.inner.syncer.touched();
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
        Ok(Box::new(FsWriter::new(self.inner.clone())))
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

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::store::CasUpload;
    use sha2::{Digest as _, Sha256};

    fn hash(data: &[u8]) -> [u8; 32] {
        Sha256::digest(data).into()
    }

    async fn put(store: &FsStore, data: &[u8]) -> Key {
        put_as(store, Key::Cas(hash(data)), data).await
    }

    async fn put_as(store: &FsStore, key: Key, data: &[u8]) -> Key {
        let mut up = CasUpload::for_key(store, key, Some(data.len() as u64))
            .await
            .unwrap();
        up.write(data).await.unwrap();
        Key::cas(&up.finish().await.unwrap())
    }

    fn blake3_key(data: &[u8]) -> Key {
        Key::Blake3Cas(*blake3::hash(data).as_bytes())
    }

    fn tmp_bytes(store: &FsStore) -> u64 {
        fs::read_dir(&store.inner.tmp)
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum()
    }

    /// A stream reset while the store is writing drops the write half way: the file may
    /// hold bytes the hash never saw, so neither the writer nor its upload may go on or
    /// commit (a resumed client would otherwise store some bytes twice under a matching
    /// hash).
    #[tokio::test]
    async fn a_write_cancelled_half_way_breaks_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::open(dir.path().into(), 1 << 30, StoreMetrics::default())
            .await
            .unwrap();
        let data = Bytes::from(vec![7u8; 64 << 20]);
        let mut w = store.writer(None).await.unwrap();
        // The first batch goes to the disk in the background; the second waits for it, and
        // is cut there.
        w.write_bytes(data.clone()).await.unwrap();
        let cut = tokio::time::timeout(Duration::ZERO, w.write_bytes(data.clone())).await;
        assert!(
            cut.is_err(),
            "the second 64 MiB write finished within one poll: nothing was cancelled"
        );
        let e = w.write(b"more").await.unwrap_err();
        assert!(e.to_string().contains("start again at offset 0"), "{e}");
        let e = w.commit(Key::Cas([1; 32])).await.unwrap_err();
        assert!(e.to_string().contains("start again at offset 0"), "{e}");
        assert!(store.lookup(&[Key::Cas([1; 32])]).await.unwrap()[0].is_none());
    }

    async fn open_syncing(root: &Path, sync: SyncPolicy) -> FsStore {
        let options = FsOptions {
            verify_on_read: false,
            sync,
        };
        FsStore::open_with(root.into(), 1 << 20, StoreMetrics::default(), options)
            .await
            .unwrap()
    }

    fn checkpoint(root: &Path) -> SystemTime {
        match Checkpoint::read(root) {
            Checkpoint::At(t) => t,
            other => panic!("no checkpoint in {}: {other:?}", root.display()),
        }
    }

    const HOUR: Duration = Duration::from_secs(3600);

    /// Whether a round that began at or after `since` completes within 5 s.
    async fn round_since(root: &Path, since: SystemTime) -> bool {
        for _ in 0..200 {
            if checkpoint(root) >= since {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        false
    }

    /// A CAS commit does not wait for a round (a power cut is caught at the next start);
    /// an action-cache entry cannot be checked by its name, so it is fsynced with its
    /// directory before the commit returns, without a round either.
    #[tokio::test]
    async fn commits_do_not_wait_for_rounds_and_an_action_result_is_fsynced() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_syncing(
            dir.path(),
            SyncPolicy {
                interval: HOUR,
                max_unsynced: 1 << 20,
            },
        )
        .await;
        let opened = checkpoint(dir.path());
        put(&store, b"a blob").await;
        let mut w = store.writer(Some(6)).await.unwrap();
        w.write(b"result").await.unwrap();
        let ac = Key::Ac([7; 32]);
        w.commit(ac).await.unwrap();
        assert_eq!(
            checkpoint(dir.path()),
            opened,
            "a commit waited for a round"
        );
        let synced = inner::SYNCED_DIRS.lock().unwrap().clone();
        let parent = store.inner.path(&ac).parent().unwrap().to_path_buf();
        assert!(
            synced.contains(&parent),
            "{parent:?} never synced: {synced:?}"
        );
    }

    /// Past `max_unsynced`, the commit that crossed it waits for the disk.
    #[tokio::test]
    async fn too_many_unsynced_bytes_make_the_commit_wait() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_syncing(
            dir.path(),
            SyncPolicy {
                interval: HOUR,
                max_unsynced: 10,
            },
        )
        .await;
        put(&store, b"ten bytes!").await;
        let before = SystemTime::now();
        put(&store, b"one more").await;
        assert!(checkpoint(dir.path()) >= before);
    }

    /// Without waiters, a round comes `interval` after the first unsynced commit.
    #[tokio::test]
    async fn a_round_follows_the_interval() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_syncing(
            dir.path(),
            SyncPolicy {
                interval: Duration::from_millis(50),
                max_unsynced: 1 << 20,
            },
        )
        .await;
        let before = SystemTime::now();
        put(&store, b"soon on disk").await;
        assert!(
            round_since(dir.path(), before).await,
            "no round within 5 s of a 50 ms interval"
        );
    }

    /// What a power cut leaves of a blob renamed after the last round (an empty or short
    /// file under its name) is found and deleted at the next start; an intact one stays.
    #[tokio::test]
    async fn a_start_deletes_blobs_torn_since_the_last_round() {
        let dir = tempfile::tempdir().unwrap();
        let (kept, torn, empty, b3_kept, b3_torn) = {
            let store = open_syncing(dir.path(), SyncPolicy::default()).await;
            (
                put(&store, b"written and synced").await,
                put(&store, b"torn by the cut").await,
                put(&store, b"emptied by the cut").await,
                // BLAKE3 blobs are checked by BLAKE3.
                put_as(&store, blake3_key(b"blake3, synced"), b"blake3, synced").await,
                put_as(&store, blake3_key(b"blake3, torn"), b"blake3, torn").await,
            )
        };
        // The cut: the last rounds never happened for these two files.
        let path = |k: &Key| {
            dir.path()
                .join(k.kind())
                .join(hex::encode(&k.hash()[..1]))
                .join(hex::encode(k.hash()))
        };
        fs::write(dir.path().join("SYNCED"), "1.0\n").unwrap();
        damage(&path(&torn), b"torn by");
        damage(&path(&empty), b"");
        damage(&path(&b3_torn), b"blake3, ");
        let store = open_syncing(dir.path(), SyncPolicy::default()).await;
        assert_eq!(
            store
                .lookup(&[kept, torn, empty, b3_kept, b3_torn])
                .await
                .unwrap(),
            vec![Some(18), None, None, Some(14), None]
        );
        assert!(!path(&torn).exists() && !path(&empty).exists());
        assert_eq!(
            &store.get(&kept).await.unwrap().unwrap()[..],
            b"written and synced"
        );
    }

    /// After a failed round the checkpoint never moves again in this run: `syncfs` reports
    /// a writeback error once, so later rounds that succeed prove nothing about it. The
    /// waiter whose round failed hears of it.
    #[tokio::test]
    async fn a_failed_round_freezes_the_checkpoint_and_fails_its_waiter() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_syncing(
            dir.path(),
            SyncPolicy {
                interval: Duration::from_millis(20),
                max_unsynced: 4,
            },
        )
        .await;
        let opened = checkpoint(dir.path());
        // The checkpoint cannot be written while its temp name is a directory.
        fs::create_dir(dir.path().join("SYNCED.tmp")).unwrap();
        let mut up = CasUpload::for_key(&store, Key::Cas(hash(b"too big")), Some(7))
            .await
            .unwrap();
        up.write(b"too big").await.unwrap();
        let e = up.finish().await.unwrap_err();
        assert!(e.to_string().contains("syncing store"), "{e}");
        fs::remove_dir(dir.path().join("SYNCED.tmp")).unwrap();
        // Rounds go on (this commit waits for one, which succeeds), the checkpoint stays.
        put(&store, b"later").await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(checkpoint(dir.path()), opened);
    }

    /// A pin (a hard link to come, and its unlink) changes ctimes without a commit: a
    /// round follows, so the next start's check stays small.
    #[tokio::test]
    async fn a_pin_brings_a_round() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_syncing(
            dir.path(),
            SyncPolicy {
                interval: Duration::from_millis(50),
                max_unsynced: 1 << 20,
            },
        )
        .await;
        let key = put(&store, b"linked into actions").await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = checkpoint(dir.path()) + Duration::from_nanos(1);
        drop(store.pin(vec![key]));
        assert!(
            round_since(dir.path(), before).await,
            "no round within 5 s of a pin"
        );
    }

    /// A file the startup check cannot read (here a directory under a blob's name) is left
    /// out, and the store opens without it rather than not at all.
    #[tokio::test]
    async fn an_unreadable_blob_is_left_out_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let key = Key::Cas([0xab; 32]);
        drop(open_syncing(dir.path(), SyncPolicy::default()).await);
        fs::create_dir(
            dir.path()
                .join("cas")
                .join("ab")
                .join(hex::encode(key.hash())),
        )
        .unwrap();
        fs::write(dir.path().join("SYNCED"), "1.0\n").unwrap();
        let store = open_syncing(dir.path(), SyncPolicy::default()).await;
        assert_eq!(store.lookup(&[key]).await.unwrap(), vec![None]);
    }

    #[test]
    fn a_checkpoint_says_which_files_to_check() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        fs::write(&f, b"x").unwrap();
        let meta = fs::metadata(&f).unwrap();
        let now = SystemTime::now();
        assert!(!Checkpoint::None.may_be_unsynced(&meta));
        assert!(Checkpoint::Unreadable.may_be_unsynced(&meta));
        assert!(Checkpoint::At(now - HOUR).may_be_unsynced(&meta));
        // Within the clock slack of the checkpoint: checked too.
        assert!(Checkpoint::At(now + Duration::from_millis(500)).may_be_unsynced(&meta));
        assert!(!Checkpoint::At(now + HOUR).may_be_unsynced(&meta));
        fs::write(dir.path().join("SYNCED"), "not a time").unwrap();
        assert_eq!(Checkpoint::read(dir.path()), Checkpoint::Unreadable);
        fs::remove_file(dir.path().join("SYNCED")).unwrap();
        assert_eq!(Checkpoint::read(dir.path()), Checkpoint::None);
    }

    #[tokio::test]
    async fn a_corrupt_blob_is_deleted_instead_of_served_when_verifying() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = StoreMetrics::default();
        let options = FsOptions {
            verify_on_read: true,
            ..FsOptions::default()
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
        let mut up = CasUpload::for_key(&store, Key::Cas(hash(&data)), Some(data.len() as u64))
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
