//! Durability of the filesystem store without an fsync per blob.
//!
//! A committed CAS blob is acknowledged once it is renamed into place: its bytes are in the
//! page cache, so a `kill -9` cannot lose them. One background thread makes them durable in
//! rounds: a round notes the time `T`, calls `syncfs(2)` on the store's file system (every
//! writer's data and directory entries at once), and then records `T` in the `SYNCED`
//! checkpoint. Whatever was renamed before `T` is on disk; a file whose ctime is later may
//! not be, and that is what startup checks after any stop (see [`Checkpoint`]): a CAS file
//! is named by its hash, so a copy a power cut left torn or empty is found and deleted, and
//! reads as a miss. A round runs `interval` after the oldest unsynced commit, or at once
//! when the unsynced bytes pass `max_unsynced` (the writer that passed it waits for that
//! round), which bounds both what a power cut can lose and what startup has to hash.
//!
//! A writer that must wait (no interval, or past `max_unsynced`) waits for the next round
//! ([`Syncer::wait_round`]); concurrent waiters share it, a group commit. Entries that
//! cannot be checked by their name (action-cache entries) do not wait for rounds: each is
//! fsynced, renamed and its directory fsynced (`writer.rs`), because a round's `syncfs`
//! flushes the whole file system the store lives on, other programs' writes included (a
//! build's outputs), and one action result per action must not wait for all of that. A
//! store on a file system of its own syncs only its own data.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use crate::error::{Result, StoreError as Error};

/// The checkpoint file, in the store's root: the time the last completed round began.
const CHECKPOINT: &str = "SYNCED";

/// A file's ctime comes from the kernel's coarse clock, which may lag the clock that
/// stamped `T` by a tick: anything this close before `T` is checked too.
const CLOCK_SLACK: Duration = Duration::from_secs(1);

/// How the store makes commits durable (the `[store]` keys `sync_interval_ms` and
/// `max_unsynced`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncPolicy {
    /// How long a committed blob may stay only in the page cache. Zero: every commit
    /// waits for a round (shared with concurrent commits) before it is acknowledged.
    pub interval: Duration,
    /// Unsynced bytes that start a round at once, the committer waiting for it.
    pub max_unsynced: u64,
}

impl Default for SyncPolicy {
    fn default() -> Self {
        SyncPolicy {
            interval: Duration::from_secs(1),
            max_unsynced: 256 << 20,
        }
    }
}

/// What the last run left in `SYNCED`, read before this run writes its own.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Checkpoint {
    /// No checkpoint: a store from before rounds existed, when every commit was fsynced.
    None,
    /// Files whose ctime is before this were on disk when the round completed.
    At(SystemTime),
    /// Unreadable: nothing can be trusted without a check.
    Unreadable,
}

impl Checkpoint {
    pub(super) fn read(root: &Path) -> Checkpoint {
        let text = match fs::read_to_string(root.join(CHECKPOINT)) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Checkpoint::None,
            Err(_) => return Checkpoint::Unreadable,
        };
        let parsed = text.trim().split_once('.').and_then(|(s, n)| {
            Some(Duration::new(
                s.parse().ok()?,
                n.parse().ok().filter(|n| *n < 1_000_000_000)?,
            ))
        });
        match parsed {
            Some(d) => Checkpoint::At(SystemTime::UNIX_EPOCH + d),
            None => Checkpoint::Unreadable,
        }
    }

    /// Whether a file with this metadata may have been renamed after the checkpoint's
    /// round began, so that a power cut could have left it torn.
    pub(super) fn may_be_unsynced(&self, meta: &fs::Metadata) -> bool {
        let since = match self {
            Checkpoint::None => return false,
            Checkpoint::Unreadable => return true,
            Checkpoint::At(t) => t.checked_sub(CLOCK_SLACK).unwrap_or(SystemTime::UNIX_EPOCH),
        };
        let changed = SystemTime::UNIX_EPOCH
            + Duration::new(
                meta.ctime().max(0) as u64,
                meta.ctime_nsec().clamp(0, 999_999_999) as u32,
            );
        changed >= since
    }
}

/// Writes the checkpoint through a fsynced temp file and a rename, so that `SYNCED` is
/// always either the old checkpoint or the new one. The rename itself reaches the disk
/// with the next round; until then the older checkpoint stands, which only means more
/// checking.
fn write_checkpoint(root: &Path, at: SystemTime) -> io::Result<()> {
    let since = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let tmp = root.join("SYNCED.tmp");
    let mut f = File::create(&tmp)?;
    writeln!(f, "{}.{:09}", since.as_secs(), since.subsec_nanos())?;
    f.sync_all()?;
    fs::rename(&tmp, root.join(CHECKPOINT))
}

struct State {
    /// Bytes committed since the last round began.
    unsynced: u64,
    /// When the oldest of them was committed.
    oldest: Option<Instant>,
    /// The highest round a waiter needs.
    requested: u64,
    started: u64,
    finished: u64,
    /// The latest round that failed, and why. From then on rounds still sync but never
    /// move the checkpoint: `syncfs` reports a writeback error once, so a later round that
    /// succeeds says nothing about the pages that failed, and the next start must check
    /// everything since the last good round.
    failed: Option<(u64, String)>,
    stop: bool,
}

struct Shared {
    state: Mutex<State>,
    /// The thread waits on it for work; waiters on it for a finished round.
    changed: Condvar,
    root: PathBuf,
    dir: File,
    policy: SyncPolicy,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update of the state is a few assignments that cannot panic half way.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One round; the checkpoint moves only if `checkpoint`. Blocking.
    fn round(&self, checkpoint: bool) -> io::Result<()> {
        let at = SystemTime::now();
        rustix::fs::syncfs(&self.dir).map_err(io::Error::from)?;
        if checkpoint {
            write_checkpoint(&self.root, at)?;
        }
        Ok(())
    }
}

/// The background thread that runs rounds; stopping it (dropping) runs a last one, so a
/// clean stop leaves nothing for the next start to check.
pub(super) struct Syncer {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Syncer {
    /// Runs a first round (the store's directories, and whatever startup deleted, are then
    /// on disk, and the checkpoint is fresh) and starts the thread. Blocking.
    pub(super) fn start(root: &Path, policy: SyncPolicy) -> Result<Syncer> {
        let dir = File::open(root).map_err(|e| {
            Error::from(io::Error::new(
                e.kind(),
                format!("opening store directory {}: {e}", root.display()),
            ))
        })?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                unsynced: 0,
                oldest: None,
                requested: 0,
                started: 0,
                finished: 0,
                failed: None,
                stop: false,
            }),
            changed: Condvar::new(),
            root: root.to_path_buf(),
            dir,
            policy,
        });
        // The first checkpoint's rename is made durable here: without it, a store whose
        // `SYNCED` never reached the disk would look like one from before rounds, whose
        // files are all trusted.
        shared
            .round(true)
            .and_then(|()| shared.dir.sync_all())
            .map_err(|e| {
                Error::from(io::Error::new(
                    e.kind(),
                    format!("syncing store {}: {e}", root.display()),
                ))
            })?;
        let thread = std::thread::Builder::new()
            .name("lre-store-sync".into())
            .spawn({
                let shared = shared.clone();
                move || run(&shared)
            })?;
        Ok(Syncer {
            shared,
            thread: Some(thread),
        })
    }

    /// A CAS file of `bytes` was renamed into place. Returns at once unless the policy
    /// wants it durable now (no interval, or too much unsynced). Blocking.
    pub(super) fn committed(&self, bytes: u64) -> Result<()> {
        let p = self.shared.policy;
        let wait = {
            let mut s = self.shared.lock();
            s.unsynced += bytes;
            s.oldest.get_or_insert_with(Instant::now);
            p.interval.is_zero() || s.unsynced > p.max_unsynced
        };
        if wait {
            return self.wait_round();
        }
        self.shared.changed.notify_all();
        Ok(())
    }

    /// Something changed a file's ctime without a commit (an LRU refresh, a hard link):
    /// a round comes within `interval`, so the next start's check stays small.
    pub(super) fn touched(&self) {
        let mut s = self.shared.lock();
        if s.oldest.is_none() {
            s.oldest = Some(Instant::now());
            drop(s);
            self.shared.changed.notify_all();
        }
    }

    /// Waits for a round that began after this call: everything renamed before the call is
    /// then on disk. Concurrent callers share one round. Blocking.
    pub(super) fn wait_round(&self) -> Result<()> {
        let mut s = self.shared.lock();
        let need = s.started + 1;
        s.requested = s.requested.max(need);
        self.shared.changed.notify_all();
        while s.finished < need {
            s = self
                .shared
                .changed
                .wait(s)
                .unwrap_or_else(|p| p.into_inner());
        }
        match &s.failed {
            Some((round, why)) if *round >= need => Err(Error::from(io::Error::other(format!(
                "syncing store {} to disk: {why}",
                self.shared.root.display()
            )))),
            _ => Ok(()),
        }
    }
}

fn run(shared: &Shared) {
    loop {
        let mut s = shared.lock();
        loop {
            if s.stop || s.requested > s.finished {
                break;
            }
            match s.oldest {
                Some(oldest) => {
                    let due = oldest + shared.policy.interval;
                    let now = Instant::now();
                    if now >= due {
                        break;
                    }
                    s = shared
                        .changed
                        .wait_timeout(s, due - now)
                        .map(|(s, _)| s)
                        .unwrap_or_else(|p| p.into_inner().0);
                }
                None => {
                    s = shared.changed.wait(s).unwrap_or_else(|p| p.into_inner());
                }
            }
        }
        let stop = s.stop;
        s.started += 1;
        let round = s.started;
        let bytes = std::mem::take(&mut s.unsynced);
        let oldest = s.oldest.take();
        let checkpoint = s.failed.is_none();
        drop(s);
        let r = shared.round(checkpoint);
        let mut s = shared.lock();
        s.finished = round;
        if let Err(e) = r {
            tracing::error!(root = %shared.root.display(), error = %e, "could not sync the store to disk; the next start checks everything written since the last good round");
            s.failed = Some((round, e.to_string()));
            // Still at risk: the next round tries again, an interval from now (not at once,
            // in a loop), or sooner for a commit made meanwhile.
            s.unsynced += bytes;
            if oldest.is_some() || s.oldest.is_some() || bytes > 0 {
                let retry = Instant::now();
                s.oldest = Some(s.oldest.map_or(retry, |o| o.min(retry)));
            }
        }
        drop(s);
        shared.changed.notify_all();
        if stop {
            return;
        }
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.changed.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
