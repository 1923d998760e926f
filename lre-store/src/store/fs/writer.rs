//! A write into the filesystem store: bytes go to a temp file in `tmp/`, and commit renames
//! it into place.
//!
//! The disk work runs on the blocking pool, one gathered batch at a time, while the caller
//! goes on (hashing what it just handed over, receiving the next message): `write_bytes`
//! waits only for the previous batch. Messages are gathered up to [`GATHER`] bytes first,
//! so small ones (Bazel sends 16 KiB) cost one hand-off per MiB, and the caller's buffers
//! are written as they are, never copied.
//!
//! Invariants: every byte accepted is reserved in the index first; a failed or cancelled
//! disk write leaves the temp file in an unknown state, so the writer is then broken and
//! can never commit; a commit is acknowledged only as the syncer's policy allows (see
//! `sync.rs`): a CAS file once renamed, an action-cache entry once it and the directory it
//! was renamed into are fsynced.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::task::JoinHandle;

use super::inner::{file_mode, io_context, join_error, sync_dir, Inner};
use crate::error::{Result, StoreError as Error};
use crate::store::{no_room, BlobWriter, Key};

/// Messages are gathered up to this many bytes before one blocking write takes them all.
const GATHER: usize = 1 << 20;

/// Deletes the temp file unless it was renamed into place.
pub(super) struct TmpFile(Option<PathBuf>);

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
pub(super) struct Reservation {
    pub(super) inner: Arc<Inner>,
    pub(super) bytes: AtomicU64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let n = *self.bytes.get_mut();
        if n > 0 {
            self.inner.index().release(n);
        }
    }
}

/// Opens the temp file for appending, creating it if no batch did yet. Blocking.
fn open_tmp(path: &Path) -> io::Result<File> {
    fs::OpenOptions::new().create(true).append(true).open(path)
}

pub(super) struct FsWriter {
    inner: Arc<Inner>,
    /// `None` once committed or discarded.
    tmp: Option<TmpFile>,
    /// The batch being written on the blocking pool; it hands the file back.
    in_flight: Option<JoinHandle<(File, io::Result<()>)>>,
    gathered: Vec<Bytes>,
    gathered_len: usize,
    /// Bytes accepted, gathered ones included.
    written: u64,
    /// Why the temp file's content is unknown (a disk write failed or was cancelled): the
    /// writer can never commit.
    broken: Option<String>,
    /// Set while a call waits on the file's batch: still set when a call begins means the
    /// last one was cancelled there, and the batch's outcome is lost.
    busy: bool,
    reservation: Arc<Reservation>,
}

impl FsWriter {
    /// The temp file is created by the first batch, or by the commit of a blob that never
    /// needed one: a small blob costs one hand-off to the blocking pool in all.
    pub(super) fn new(inner: Arc<Inner>) -> FsWriter {
        let path = inner.tmp.join(uuid::Uuid::new_v4().to_string());
        FsWriter {
            inner: inner.clone(),
            tmp: Some(TmpFile(Some(path))),
            in_flight: None,
            gathered: Vec::new(),
            gathered_len: 0,
            written: 0,
            broken: None,
            busy: false,
            reservation: Arc::new(Reservation {
                inner,
                bytes: AtomicU64::new(0),
            }),
        }
    }

    fn tmp_path(&self) -> PathBuf {
        self.tmp
            .as_ref()
            .map(|t| t.path().to_path_buf())
            .unwrap_or_default()
    }

    /// Fails when the writer cannot go on: committed, broken, or cancelled mid-call.
    fn check(&mut self) -> Result<()> {
        if self.tmp.is_none() {
            return Err(Error::Internal("write after commit".into()));
        }
        if self.busy {
            self.broken =
                Some("an earlier call was cancelled while its data was being written".into());
        }
        match &self.broken {
            Some(why) => Err(Error::Internal(format!(
                "upload temp file {} is in an unknown state ({why}); start again at offset 0",
                self.tmp_path().display()
            ))),
            None => Ok(()),
        }
    }

    /// Counts `n` more bytes against the store's capacity before they are accepted.
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

    /// The file, once the batch in flight (if any) is on it; otherwise opened (created by
    /// the first batch, reopened after a suspend or a commit-time drain).
    async fn settle(&mut self) -> Result<File> {
        self.busy = true;
        let file = if let Some(batch) = self.in_flight.take() {
            let written = match batch.await {
                Ok((file, r)) => r.map(|()| file).map_err(|e| {
                    io_context(e, format_args!("writing {}", self.tmp_path().display()))
                }),
                Err(e) => Err(join_error("write", e)),
            };
            match written {
                Ok(file) => file,
                Err(e) => {
                    self.broken = Some(e.to_string());
                    self.busy = false;
                    return Err(e);
                }
            }
        } else {
            let path = self.tmp_path();
            tokio::task::spawn_blocking(move || {
                open_tmp(&path)
                    .map_err(|e| io_context(e, format_args!("opening {}", path.display())))
            })
            .await
            .map_err(|e| join_error("open", e))??
        };
        self.busy = false;
        Ok(file)
    }

    /// Hands the gathered messages to the blocking pool, after the previous batch.
    async fn dispatch(&mut self) -> Result<()> {
        if self.gathered.is_empty() {
            return Ok(());
        }
        let mut file = self.settle().await?;
        let batch = std::mem::take(&mut self.gathered);
        self.gathered_len = 0;
        self.in_flight = Some(tokio::task::spawn_blocking(move || {
            let r = batch.iter().try_for_each(|b| file.write_all(b));
            (file, r)
        }));
        Ok(())
    }

    /// Everything accepted is on the file (in the page cache), which is handed back.
    async fn drain(&mut self) -> Result<File> {
        self.dispatch().await?;
        self.settle().await
    }
}

#[async_trait]
impl BlobWriter for FsWriter {
    async fn write(&mut self, data: &[u8]) -> Result<()> {
        self.write_bytes(Bytes::copy_from_slice(data)).await
    }

    async fn write_bytes(&mut self, data: Bytes) -> Result<()> {
        self.check()?;
        if self.written + data.len() as u64 > self.inner.capacity {
            return Err(Error::InvalidArgument(format!(
                "blob is larger than the whole store ({} bytes)",
                self.inner.capacity
            )));
        }
        self.reserve(data.len() as u64).await?;
        self.written += data.len() as u64;
        self.gathered_len += data.len();
        self.gathered.push(data);
        if self.gathered_len >= GATHER {
            self.dispatch().await?;
        }
        Ok(())
    }

    async fn suspend(&mut self) -> Result<()> {
        self.check()?;
        // Closed here: an idle upload holds no descriptor and no buffer.
        drop(self.drain().await?);
        Ok(())
    }

    async fn discard(mut self: Box<Self>) {
        self.gathered.clear();
        if let Some(batch) = self.in_flight.take() {
            let _ = batch.await;
        }
        if let Some(tmp) = self.tmp.take() {
            let _ = tokio::task::spawn_blocking(move || tmp.remove_now()).await;
        }
    }

    async fn commit(mut self: Box<Self>, key: Key) -> Result<()> {
        self.check()?;
        // The last gathered messages go with the commit's one blocking call, which also
        // creates the file if no batch did (a small blob).
        let file = match self.in_flight.is_some() {
            false => None,
            true => match self.settle().await {
                Ok(f) => Some(f),
                Err(e) => {
                    self.discard().await;
                    return Err(e);
                }
            },
        };
        let batch = std::mem::take(&mut self.gathered);
        let tmp = self
            .tmp
            .take()
            .ok_or_else(|| Error::Internal("double commit".into()))?;
        let reservation = self.reservation.clone();
        let size = self.written;
        tokio::task::spawn_blocking(move || {
            let inner = &reservation.inner;
            // An entry that cannot be checked by its name after a power cut must be on
            // disk before it becomes visible; a CAS file is checked instead (`sync.rs`).
            let check_later = key.is_content_addressed();
            let prepared = match file {
                Some(f) => Ok(f),
                None => open_tmp(tmp.path()),
            }
            .and_then(|mut file| {
                use std::os::unix::fs::PermissionsExt;
                batch.iter().try_for_each(|b| file.write_all(b))?;
                file.set_permissions(fs::Permissions::from_mode(file_mode(&key)))?;
                if check_later {
                    Ok(())
                } else {
                    file.sync_all()
                }
            });
            if let Err(e) = prepared {
                let err = io_context(e, format_args!("writing {}", tmp.path().display()));
                tmp.remove_now();
                return Err(err);
            }
            let dest = inner.path(&key);
            let mut index = inner.index();
            let reserved = reservation.bytes.swap(0, Ordering::Relaxed);
            if index.contains(&key) && check_later {
                // Same content already stored by a concurrent writer; ours is redundant.
                index.release(reserved);
                index.get(&key);
                drop(index);
                tmp.remove_now();
                // Acknowledged as a commit is: with no interval, after a round.
                return inner.syncer.committed(0);
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
            if check_later {
                inner.syncer.committed(size)
            } else {
                // Not a sync round: `syncfs` would wait for every other writer on the file
                // system too (a build's outputs), and an action result is on every action's
                // path. Its own file and directory are all it needs.
                sync_dir(dest.parent().unwrap_or(&inner.root))
            }
        })
        .await
        .map_err(|e| join_error("commit", e))?
    }
}
