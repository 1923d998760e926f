//! The worker's local CAS: lre-store's filesystem store, size-bounded and LRU, that input
//! roots are hard-linked from, with a read-through layer over the server's CAS in front.
//! Every digest passes the server's rule (lre-store's `Digest`) before it names a file, and
//! every fetched blob is hashed as it is written (`CasUpload`), so nothing the server sends
//! wrong is ever linked into an action.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use lre_store::store::{BlobStore, CasUpload, FsStore, Key, Pinned};
use lre_store::{Digest, StoreError};
use tokio::io::AsyncReadExt;

use crate::error::{Result, WorkerError};
use crate::server_cas::{ServerCas, BATCH_BLOB, BATCH_TOTAL};

pub use crate::server_cas::Upload;

pub fn digest_of(data: &[u8]) -> re::Digest {
    Digest::of(data).to_proto()
}

/// The server's rule (lre-store), so that a digest the server would refuse (uppercase hex,
/// a negative size) is refused here before it names a file in the cache. Workers run
/// SHA-256 actions only (the server refuses to schedule others).
pub fn valid(d: &re::Digest) -> Result<Digest> {
    Digest::from_proto(lre_store::digest::DigestFunction::Sha256, d).map_err(|e| {
        WorkerError::InvalidInput(format!("input digest {}/{}: {e}", d.hash, d.size_bytes))
    })
}

/// The SHA-256 digest of a file, read a buffer at a time (never whole into memory).
pub fn file_digest(path: &Path) -> Result<re::Digest> {
    Ok(Digest::of_reader(std::fs::File::open(path)?)?.to_proto())
}

/// Executable and plain copies are separate entries: hard links share their mode.
fn key(d: &Digest, executable: bool) -> Key {
    match executable {
        true => Key::cas_executable(d),
        false => Key::cas(d),
    }
}

/// What `LocalCas::fingerprint` records of a cached file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fingerprint {
    pub ino: u64,
    pub ctime: (i64, i64),
    pub len: u64,
}

/// The cached files linked into running actions that have no uid of their own, and which
/// action holds each. Such an action runs as the owner of the cache's files, so it can
/// write to what it links; while it runs, no other action may share that file (another
/// could read its writes, then restored, and have a poisoned result cached). The others
/// get a copy. See `ExclusiveLinks`.
#[derive(Default)]
struct Leases {
    held: HashMap<Key, u64>,
    next: u64,
}

pub struct LocalCas {
    leases: std::sync::Mutex<Leases>,
    store: FsStore,
    server: ServerCas,
    max_bytes: u64,
    /// Room for blobs being written, in ROOM_UNITs: a fetch takes its whole size before its
    /// first byte, so concurrent fetches never hold more than the store (whose writes
    /// would then fail) and never wait on each other half way (no deadlock).
    room: tokio::sync::Semaphore,
    room_units: u32,
}

/// The unit of `room`: permits are u32, and a cache may hold more than 4 GiB.
const ROOM_UNIT: u64 = 1024;

impl LocalCas {
    pub async fn open(dir: PathBuf, server: ServerCas, max_bytes: u64) -> Result<LocalCas> {
        // The store's LOCK first: a second worker on this directory stops here, touching
        // nothing of the first's.
        let store = FsStore::open(dir.clone(), max_bytes, Default::default())
            .await
            .map_err(WorkerError::Cache)?;
        tokio::task::spawn_blocking(move || drop_old_layout(&dir))
            .await
            .map_err(|e| WorkerError::Internal(format!("opening the local cache: {e}")))??;
        // Rounded down, and each blob's size up: what is in flight never exceeds the store.
        let room_units = (max_bytes / ROOM_UNIT).clamp(1, u32::MAX as u64) as u32;
        Ok(LocalCas {
            leases: Default::default(),
            store,
            server,
            max_bytes,
            room: tokio::sync::Semaphore::new(room_units as usize),
            room_units,
        })
    }

    pub fn server(&self) -> &ServerCas {
        &self.server
    }

    fn leases(&self) -> std::sync::MutexGuard<'_, Leases> {
        self.leases.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A holder of cached files for one action without a uid of its own (see `Leases`).
    pub fn exclusive_links(self: &Arc<Self>) -> ExclusiveLinks {
        let id = {
            let mut l = self.leases();
            l.next += 1;
            l.next
        };
        ExclusiveLinks {
            cas: self.clone(),
            id,
            taken: Vec::new(),
        }
    }

    /// Where a blob lives locally (whether it is there or not).
    pub fn path(&self, d: &re::Digest, executable: bool) -> Result<PathBuf> {
        Ok(self.store.file_path(&key(&valid(d)?, executable)))
    }

    /// A fingerprint of a cached file that no process can forge: any write or chmod through
    /// any of its hard links changes the inode's ctime.
    pub fn fingerprint(path: &Path) -> Option<Fingerprint> {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).ok().map(|m| Fingerprint {
            ino: m.ino(),
            ctime: (m.ctime(), m.ctime_nsec()),
            len: m.len(),
        })
    }

    /// Whether a cached file still holds exactly its digest's content, with the mode the
    /// store gave it. Blocking. Called when its fingerprint moved: another action
    /// hard-linking the same file (at capacity > 1) changes the ctime too, and that must
    /// not count as tampering.
    pub fn intact(&self, d: &re::Digest, executable: bool) -> bool {
        use std::os::unix::fs::PermissionsExt;
        let Ok(digest) = valid(d) else { return false };
        let path = self.store.file_path(&key(&digest, executable));
        let want_mode = if executable { 0o555 } else { 0o444 };
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            return false;
        };
        if !meta.is_file()
            || meta.permissions().mode() & 0o7777 != want_mode
            || meta.len() != digest.size
        {
            return false;
        }
        // Streamed: a cached input may be many GiB.
        std::fs::File::open(&path)
            .and_then(Digest::of_reader)
            .is_ok_and(|found| found == digest)
    }

    /// Drops a cached copy whose content can no longer be trusted, if the cache still holds
    /// that very file (`seen`, not a fresh copy fetched since); the next action that needs
    /// it fetches it again.
    pub async fn discard(
        &self,
        d: &re::Digest,
        executable: bool,
        seen: &Fingerprint,
    ) -> Result<()> {
        let k = key(&valid(d)?, executable);
        self.store
            .remove_if_inode(&k, seen.ino)
            .await
            .map(drop)
            .map_err(WorkerError::Cache)
    }

    /// Makes every (digest, executable) present locally, fetching what is missing, and
    /// keeps them from eviction while the returned pin lives.
    pub async fn ensure(&self, instance: &str, wanted: &[(re::Digest, bool)]) -> Result<Pinned> {
        let mut keys = Vec::with_capacity(wanted.len());
        for (d, x) in wanted {
            let digest = valid(d)?;
            if digest.size > self.max_bytes {
                return Err(WorkerError::InvalidInput(format!(
                    "input {}/{} is larger than this worker's whole cache ({} bytes)",
                    d.hash, d.size_bytes, self.max_bytes
                )));
            }
            keys.push(key(&digest, *x));
        }
        // Pinned before it is looked at, so an eviction cannot come in between.
        let pinned = self.store.pin(keys.clone());
        let present = self.store.lookup(&keys).await.map_err(WorkerError::Cache)?;
        // Each missing digest once, with the modes it is wanted in.
        let mut missing: Vec<(&re::Digest, Vec<Key>)> = Vec::new();
        let mut at: HashMap<&str, usize> = HashMap::new();
        for (((d, _), k), have) in wanted.iter().zip(&keys).zip(present) {
            match have {
                // Keys name a hash alone, and a hash fixes the size: a digest whose size
                // disagrees with the content it names is the client's error.
                Some(size) if size != d.size_bytes as u64 => {
                    return Err(WorkerError::InvalidInput(format!(
                        "input digest {}/{}: that content is {size} bytes",
                        d.hash, d.size_bytes
                    )));
                }
                Some(_) => continue,
                None => {}
            }
            match at.get(d.hash.as_str()) {
                Some(&i) if missing[i].0.size_bytes != d.size_bytes => {
                    return Err(WorkerError::InvalidInput(format!(
                        "input {} is listed with sizes {} and {}",
                        d.hash, missing[i].0.size_bytes, d.size_bytes
                    )));
                }
                Some(&i) if missing[i].1.contains(k) => {}
                Some(&i) => missing[i].1.push(*k),
                None => {
                    at.insert(&d.hash, missing.len());
                    missing.push((d, vec![*k]));
                }
            }
        }
        let mut small: Vec<re::Digest> = Vec::new();
        let mut modes: HashMap<String, (re::Digest, Vec<Key>)> = HashMap::new();
        let mut batch_size = 0;
        for (d, ks) in missing {
            if d.size_bytes > BATCH_BLOB {
                self.fetch_streamed(instance, d, &ks).await?;
                continue;
            }
            if batch_size + d.size_bytes > BATCH_TOTAL {
                self.fetch_batch(instance, std::mem::take(&mut small), &mut modes)
                    .await?;
                batch_size = 0;
            }
            batch_size += d.size_bytes;
            small.push(d.clone());
            modes.insert(d.hash.clone(), (d.clone(), ks));
        }
        if !small.is_empty() {
            self.fetch_batch(instance, small, &mut modes).await?;
        }
        Ok(pinned)
    }

    async fn fetch_batch(
        &self,
        instance: &str,
        digests: Vec<re::Digest>,
        modes: &mut HashMap<String, (re::Digest, Vec<Key>)>,
    ) -> Result<()> {
        let asked = digests.clone();
        for (answered, data) in self.server.batch_read(instance, digests).await? {
            // Only what was asked for: a response naming another digest installs nothing,
            // and the size that counts is the one asked for, never the one answered.
            let Some((d, keys)) = modes.remove(&answered.hash) else {
                return Err(WorkerError::Corrupt(format!(
                    "the CAS answered for blob {}/{}, which was not asked for",
                    answered.hash, answered.size_bytes
                )));
            };
            if data.len() as u64 != d.size_bytes as u64 {
                return Err(WorkerError::Corrupt(format!(
                    "the CAS returned {} bytes for {}/{}",
                    data.len(),
                    d.hash,
                    d.size_bytes
                )));
            }
            for k in keys {
                let _room = self.room_for(&d).await?;
                let mut up = self.upload_for(k, &d).await?;
                up.write(&data).await.map_err(|e| wrong(&d, e))?;
                up.finish().await.map_err(|e| wrong(&d, e))?;
            }
        }
        match asked.iter().find(|d| modes.contains_key(&d.hash)) {
            Some(d) => Err(WorkerError::missing(d, ": not in the CAS's answer")),
            None => Ok(()),
        }
    }

    /// Streams a large blob into the store, hashed as it goes, so that an input of any size
    /// costs one chunk of memory. A second mode is copied from the first, locally.
    async fn fetch_streamed(&self, instance: &str, d: &re::Digest, keys: &[Key]) -> Result<()> {
        let Some((first, rest)) = keys.split_first() else {
            return Ok(());
        };
        let room = self.room_for(d).await?;
        let mut s = self.server.open_read(instance, d).await?;
        let mut up = self.upload_for(*first, d).await?;
        while let Some(m) = ServerCas::next_chunk(&mut s, d).await? {
            up.write_bytes(m.data.into())
                .await
                .map_err(|e| wrong(d, e))?;
        }
        up.finish().await.map_err(|e| wrong(d, e))?;
        drop(room);
        for k in rest {
            let _room = self.room_for(d).await?;
            self.copy(*first, *k, d).await?;
        }
        Ok(())
    }

    async fn copy(&self, from: Key, to: Key, d: &re::Digest) -> Result<()> {
        let Some((_, mut reader)) = self
            .store
            .open(&from, 0, None)
            .await
            .map_err(WorkerError::Cache)?
        else {
            // Pinned keys are never evicted, but another action may have found that copy
            // tampered with and discarded it: worth a retry, not the action's fault.
            return Err(gone_meanwhile(d));
        };
        let mut up = self.upload_for(to, d).await?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = reader.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            up.write(&buf[..n]).await.map_err(WorkerError::Cache)?;
        }
        up.finish().await.map_err(WorkerError::Cache)?;
        Ok(())
    }

    /// Waits until `d`'s size fits beside the other writes in flight (all of the room for
    /// a blob bigger than it: such a blob then writes alone).
    async fn room_for(&self, d: &re::Digest) -> Result<tokio::sync::SemaphorePermit<'_>> {
        let units = (d.size_bytes.max(0) as u64).div_ceil(ROOM_UNIT);
        self.room
            .acquire_many(units.clamp(1, self.room_units as u64) as u32)
            .await
            .map_err(|e| WorkerError::Internal(format!("local cache closed: {e}")))
    }

    async fn upload_for(&self, k: Key, d: &re::Digest) -> Result<CasUpload> {
        CasUpload::for_key(&self.store, k, Some(d.size_bytes as u64))
            .await
            .map_err(WorkerError::Cache)
    }
}

/// The cached files one action may link (no other running action shares them), given
/// back when dropped: once the action's sandbox is gone and its inputs were checked.
pub struct ExclusiveLinks {
    cas: Arc<LocalCas>,
    id: u64,
    taken: Vec<Key>,
}

impl ExclusiveLinks {
    /// Whether this action may hard-link the cached copy of `d` (nobody else holds it, or
    /// this action already does); false: it must get a copy of its own.
    pub fn try_take(&mut self, d: &re::Digest, executable: bool) -> Result<bool> {
        let k = key(&valid(d)?, executable);
        let mut l = self.cas.leases();
        match l.held.get(&k) {
            Some(holder) => Ok(*holder == self.id),
            None => {
                l.held.insert(k, self.id);
                self.taken.push(k);
                Ok(true)
            }
        }
    }
}

impl Drop for ExclusiveLinks {
    fn drop(&mut self) {
        let mut l = self.cas.leases();
        for k in &self.taken {
            if l.held.get(k) == Some(&self.id) {
                l.held.remove(k);
            }
        }
    }
}

/// A pinned input that left the cache all the same: discarded by another action's tamper
/// check. UNAVAILABLE, so the client retries (and the input is fetched again).
pub fn gone_meanwhile(d: &re::Digest) -> WorkerError {
    WorkerError::Rpc(tonic::Status::unavailable(format!(
        "input {}/{} was discarded from the worker's cache while this action needed it; retry",
        d.hash, d.size_bytes
    )))
}

/// What the server sent does not hash or measure up to its digest; any other store error
/// (a full disk) is the cache's.
fn wrong(d: &re::Digest, e: StoreError) -> WorkerError {
    match e {
        StoreError::DigestMismatch { .. } | StoreError::SizeMismatch(_) => {
            WorkerError::Corrupt(format!(
                "the CAS returned wrong content for {}/{}: {e}",
                d.hash, d.size_bytes
            ))
        }
        e => WorkerError::Cache(e),
    }
}

/// Before the worker used lre-store's layout its cache was flat: `<hash>-<size>[-x]` files
/// and a `tmp/` directory. They would sit outside the new index forever, so they go.
fn drop_old_layout(dir: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for e in entries {
        let e = e?;
        let name = e.file_name();
        let old = name.to_str().is_some_and(|n| {
            n.len() > 65
                && n.as_bytes()[64] == b'-'
                && n[..64].bytes().all(|b| b.is_ascii_hexdigit())
        });
        if old && e.file_type()?.is_file() {
            std::fs::remove_file(e.path())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{digest_of, re, valid, LocalCas, ServerCas};
    use std::os::unix::fs::PermissionsExt;

    #[tokio::test]
    async fn a_new_hard_link_is_not_tampering_but_a_write_or_chmod_is() {
        let dir = tempfile::tempdir().unwrap();
        // Never dialled: only the local store is used here.
        let channel = crate::client::connect(
            "http://127.0.0.1:9",
            crate::Credential::none(),
            &crate::ClientTls::default(),
        )
        .unwrap();
        let cas = LocalCas::open(dir.path().join("cas"), ServerCas::new(channel), 1 << 20)
            .await
            .unwrap();
        let data = b"int x;\n";
        let d = digest_of(data);
        let mut up = cas
            .upload_for(super::key(&valid(&d).unwrap(), true), &d)
            .await
            .unwrap();
        up.write(data).await.unwrap();
        up.finish().await.unwrap();
        let path = cas.path(&d, true).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777,
            0o555
        );
        assert!(cas.intact(&d, true));
        assert!(!cas.intact(&d, false), "the plain copy was never stored");
        let before = LocalCas::fingerprint(&path);
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::hard_link(&path, dir.path().join("another-action-input")).unwrap();
        assert_ne!(
            LocalCas::fingerprint(&path),
            before,
            "a new link moves the ctime"
        );
        assert!(
            cas.intact(&d, true),
            "…but the content and mode are as cached"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(!cas.intact(&d, true), "chmod is tampering");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o555)).unwrap();
        assert!(cas.intact(&d, true));
        // New content in the right mode (made writable to write it, as a non-root owner must).
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(&path, b"int y;\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o555)).unwrap();
        assert!(!cas.intact(&d, true), "new content is tampering");
        let seen = LocalCas::fingerprint(&path).unwrap();
        // A fresh copy committed since is not the file found bad: it stays.
        let stale = super::Fingerprint {
            ino: seen.ino + 1,
            ..seen
        };
        cas.discard(&d, true, &stale).await.unwrap();
        assert!(path.exists(), "discarding another inode removed this one");
        cas.discard(&d, true, &seen).await.unwrap();
        assert!(!path.exists(), "a discarded copy is gone");
    }

    /// The worker accepted uppercase hex the server refuses (issue 11): one rule now.
    #[test]
    fn the_worker_refuses_what_the_server_refuses() {
        let d = |hash: String, size_bytes| re::Digest { hash, size_bytes };
        assert!(valid(&d("ab".repeat(32), 3)).is_ok());
        for bad in [
            d("AB".repeat(32), 3),
            d("ab".repeat(31), 3),
            d("zz".repeat(32), 3),
            d("ab".repeat(32), -1),
            d(format!("{}/..", "ab".repeat(31)), 3),
        ] {
            let err = valid(&bad).unwrap_err().to_string();
            assert!(err.contains("input digest"), "{err}");
            assert!(
                lre_store::Digest::from_proto(lre_store::digest::DigestFunction::Sha256, &bad)
                    .is_err(),
                "the server's rule accepts {bad:?}"
            );
        }
    }
}
