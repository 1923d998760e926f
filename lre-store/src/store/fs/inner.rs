//! The filesystem store's shared state: where each key's file lives, the LRU index that
//! says which files exist, and the syncer that makes them durable. Readers, writers and
//! the store itself all hold it through one `Arc`.
//!
//! Invariant: index changes and the renames/unlinks they describe happen under the index
//! lock, so the index and the directory never disagree about which files exist.

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use crate::digest::DigestFunction;

use super::sync::Syncer;
use crate::error::{Result, StoreError as Error};
use crate::store::lru_index::LruIndex;
use crate::store::Key;

/// The mode a committed file gets: hard links share it, so it must already be what an
/// action may see.
pub(super) fn file_mode(key: &Key) -> u32 {
    if key.is_executable() {
        0o555
    } else {
        0o444
    }
}

pub(super) struct Inner {
    pub(super) root: PathBuf,
    pub(super) tmp: PathBuf,
    /// Value: when the file's mtime was last brought up to date.
    pub(super) index: Mutex<LruIndex<Instant>>,
    pub(super) capacity: u64,
    pub(super) verify_on_read: bool,
    /// Makes commits durable. Declared before `_lock` so that it drops first: its last
    /// round runs while no other process can have opened the directory.
    pub(super) syncer: Syncer,
    /// Held for the store's lifetime: two servers sharing a directory would corrupt the LRU.
    pub(super) _lock: File,
}

impl Inner {
    pub(super) fn path(&self, key: &Key) -> PathBuf {
        let h = key.hash();
        self.root
            .join(key.kind())
            .join(hex::encode(&h[..1]))
            .join(hex::encode(h))
    }

    pub(super) fn index(&self) -> MutexGuard<'_, LruIndex<Instant>> {
        // A panic while holding the lock leaves the index usable: every operation on it
        // completes its bookkeeping before anything that can panic.
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn unlink(&self, key: &Key) {
        let path = self.path(key);
        if let Err(e) = fs::remove_file(&path) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(path = %path.display(), error = %e, "could not delete evicted blob");
            }
        }
    }

    /// Reads `file` (positioned at its start) to the end and checks it hashes to `key`.
    /// Blocking. On a mismatch the entry is removed, index and file, and `false` returned.
    pub(super) fn verify(&self, key: &Key, file: &mut File) -> Result<bool> {
        let path = self.path(key);
        let function = key.function().unwrap_or_default();
        let (actual, size) = content_hash(function, file, &path)?;
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

/// The hash under `function` of `file` from where it is positioned to its end, and how many
/// bytes that was. Blocking.
pub(super) fn content_hash(
    function: DigestFunction,
    file: &mut File,
    path: &Path,
) -> Result<([u8; 32], u64)> {
    let mut hasher = function.hasher();
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
    Ok((hasher.finalize(), size))
}

/// Every directory `sync_dir` was called on, by every test in this binary.
#[cfg(test)]
pub(super) static SYNCED_DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Makes the directory's entries (a rename into it) durable. Blocking.
pub(super) fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(test)]
    SYNCED_DIRS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(dir.to_path_buf());
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_context(e, format_args!("syncing directory {}", dir.display())))
}

pub(super) fn inode(m: &fs::Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    (m.dev(), m.ino())
}

/// Keeps the error's kind (a full disk stays `StorageFull`) and says what was being done.
pub(super) fn io_context(e: io::Error, what: std::fmt::Arguments<'_>) -> Error {
    Error::from(io::Error::new(e.kind(), format!("{what}: {e}")))
}

pub(super) fn join_error(what: &str, e: tokio::task::JoinError) -> Error {
    Error::Internal(format!("{what} task: {e}"))
}
