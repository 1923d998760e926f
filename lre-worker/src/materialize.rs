//! Builds an action's input root on disk: directories, hard links into the local CAS
//! cache (executable and plain copies kept apart), empty directories and symlinks.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::Arc;

use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use prost::Message;

use crate::cas::{digest_of, LocalCas};
use crate::error::{Result, WorkerError};

/// A name from a Directory message must be one plain path component; anything else could
/// write outside the exec root.
pub fn check_name(name: &str) -> Result<()> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        return Err(WorkerError::InvalidInput(format!(
            "input name {name:?} is not a single path component"
        )));
    }
    Ok(())
}

/// A Directory message larger than this is refused (Bazel's are a few KiB; the largest
/// real ones, a directory of 100k files, are about 10 MiB).
pub const MAX_DIRECTORY_BYTES: i64 = 16 << 20;

/// One BatchReadBlobs call asks for at most this many bytes of Directory messages, well
/// under the 4 MiB a gRPC message may carry by default; bigger ones come over ByteStream.
const BATCH_BYTES: i64 = 3 << 20;

/// Fetches every Directory of the tree under `root`, keyed by digest hash, a level at a
/// time, each level in as many batches as its size needs.
async fn fetch_tree(
    cas: &LocalCas,
    instance: &str,
    root: &re::Digest,
) -> Result<HashMap<String, re::Directory>> {
    let mut dirs = HashMap::new();
    let mut level = vec![root.clone()];
    let mut depth = 0;
    while !level.is_empty() {
        depth += 1;
        if depth > MAX_INPUT_DEPTH {
            return Err(WorkerError::InvalidInput(format!(
                "the input tree is more than {MAX_INPUT_DEPTH} levels deep"
            )));
        }
        let mut fetched: Vec<(re::Digest, Vec<u8>)> = Vec::new();
        let mut batch: Vec<re::Digest> = Vec::new();
        let mut batch_bytes = 0;
        for d in &level {
            if !(0..=MAX_DIRECTORY_BYTES).contains(&d.size_bytes) {
                return Err(WorkerError::InvalidInput(format!(
                    "input directory {}/{} is larger than {MAX_DIRECTORY_BYTES} bytes",
                    d.hash, d.size_bytes
                )));
            }
            if d.size_bytes > BATCH_BYTES {
                fetched.push((d.clone(), cas.server().read_whole(instance, d).await?));
                continue;
            }
            if batch_bytes + d.size_bytes > BATCH_BYTES {
                let full = std::mem::take(&mut batch);
                fetched.extend(cas.server().batch_read(instance, full).await?);
                batch_bytes = 0;
            }
            batch_bytes += d.size_bytes;
            batch.push(d.clone());
        }
        if !batch.is_empty() {
            fetched.extend(cas.server().batch_read(instance, batch).await?);
        }
        let mut next = Vec::new();
        for (d, data) in fetched {
            if digest_of(&data) != d || !level.contains(&d) {
                return Err(WorkerError::Corrupt(format!(
                    "the CAS answered with content that is not input directory {}/{}",
                    d.hash, d.size_bytes
                )));
            }
            let dir = re::Directory::decode(&data[..])?;
            for sub in &dir.directories {
                if let Some(sd) = &sub.digest {
                    if !dirs.contains_key(&sd.hash) && !next.contains(sd) {
                        next.push(sd.clone());
                    }
                }
            }
            dirs.insert(d.hash.clone(), dir);
        }
        for d in &level {
            if !dirs.contains_key(&d.hash) {
                return Err(WorkerError::missing(d, " (an input directory)"));
            }
        }
        level = next;
    }
    Ok(dirs)
}

/// An input tree may list one Directory many times (a "directory bomb": 18 tiny blobs whose
/// levels each name the level below twice expand to 2^17 paths). Its expanded size is
/// computed from the Directory messages, before anything is written, and bounded.
pub const MAX_INPUT_ENTRIES: u64 = 500_000;
pub const MAX_INPUT_DEPTH: u64 = 256;

/// The expanded (entries, depth) of the tree under `root`, each saturating at the bound:
/// memoized over the distinct directories, so a bomb costs what its blobs cost.
pub fn expanded_size(dirs: &HashMap<String, re::Directory>, root: &str) -> Result<(u64, u64)> {
    let mut memo: HashMap<&str, (u64, u64)> = HashMap::new();
    // Iterative post-order: a directory is done once all of its children are.
    let mut stack: Vec<(&str, bool)> = vec![(root, false)];
    while let Some((hash, children_done)) = stack.pop() {
        if memo.contains_key(hash) {
            continue;
        }
        let dir = dirs.get(hash).ok_or_else(|| WorkerError::MissingInput {
            what: format!("input directory {hash}"),
            blob: None,
        })?;
        let subs = dir
            .directories
            .iter()
            .filter_map(|d| d.digest.as_ref().map(|d| d.hash.as_str()));
        if !children_done {
            stack.push((hash, true));
            stack.extend(subs.filter(|h| !memo.contains_key(h)).map(|h| (h, false)));
            continue;
        }
        let mut entries = (dir.files.len() + dir.symlinks.len() + dir.directories.len()) as u64;
        let mut depth = 0;
        for h in subs {
            // A cycle cannot be built from content hashes; a missing child is an error below.
            let (e, d) = memo.get(h).copied().unwrap_or((0, 0));
            entries = entries.saturating_add(e);
            depth = depth.max(d);
        }
        memo.insert(
            hash,
            (
                entries.min(MAX_INPUT_ENTRIES + 1),
                (depth + 1).min(MAX_INPUT_DEPTH + 1),
            ),
        );
    }
    Ok(memo.get(root).copied().unwrap_or((0, 0)))
}

/// A cache file linked into an exec root, with its fingerprint at link time.
pub struct LinkedInput {
    pub digest: re::Digest,
    pub executable: bool,
    pub path: std::path::PathBuf,
    pub print: Option<crate::cas::Fingerprint>,
}

/// The cache files an action got as hard links, and, for an action without a uid of its
/// own, its hold on them: no other running action shares them until it is dropped.
#[derive(Default)]
pub struct Linked {
    pub inputs: Vec<LinkedInput>,
    pub exclusive: Option<crate::cas::ExclusiveLinks>,
    /// Inputs given as private copies (another running action held the cached file).
    pub copied: usize,
}

/// Materializes the input root `root` into the (existing, empty) directory `dest`, and
/// returns the cache files it linked so the caller can check the action left them alone.
/// With `owner`, every directory made (and `dest`) belongs to that uid and gid, so an
/// action running as it can write outputs anywhere but cannot touch the linked files.
/// Without, the action could write to what it links: it links only files no other running
/// action holds, and gets copies of the rest (`Linked::exclusive`).
pub async fn materialize(
    cas: &Arc<LocalCas>,
    instance: &str,
    root: &re::Digest,
    dest: &Path,
    owner: Option<u32>,
) -> Result<Linked> {
    let dirs = fetch_tree(cas, instance, root).await?;
    let (entries, depth) = expanded_size(&dirs, &root.hash)?;
    if entries > MAX_INPUT_ENTRIES || depth > MAX_INPUT_DEPTH {
        let over = |n: u64, max: u64| match n > max {
            true => format!("more than {max}"),
            false => n.to_string(),
        };
        return Err(WorkerError::InvalidInput(format!(
            "the input tree expands to {} entries, {} levels deep; the limits are {MAX_INPUT_ENTRIES} entries and {MAX_INPUT_DEPTH} levels",
            over(entries, MAX_INPUT_ENTRIES),
            over(depth, MAX_INPUT_DEPTH),
        )));
    }
    // One pass to learn every file, so the cache fetches them in a few batches.
    let mut files = Vec::new();
    for d in dirs.values() {
        for f in &d.files {
            let digest = f.digest.clone().ok_or_else(|| {
                WorkerError::InvalidInput(format!("file {:?} has no digest", f.name))
            })?;
            files.push((digest, f.is_executable));
        }
    }
    // Pinned until linked: a concurrent action's fetch must not evict them in between.
    let pinned = cas.ensure(instance, &files).await?;
    let (cas2, root_hash, dest) = (cas.clone(), root.hash.clone(), dest.to_path_buf());
    let exclusive = owner.is_none().then(|| cas.exclusive_links());
    let linked = tokio::task::spawn_blocking(move || {
        write_tree(&cas2, &dirs, root_hash, &dest, owner, exclusive)
    })
    .await
    .map_err(|e| WorkerError::Sandbox(format!("materializing inputs: {e}")))??;
    drop(pinned);
    Ok(linked)
}

fn chown(path: &Path, owner: Option<u32>) -> Result<()> {
    if let Some(u) = owner {
        std::os::unix::fs::lchown(path, Some(u), Some(u))?;
    }
    Ok(())
}

/// The blocking half of [`materialize`]: directories, links and symlinks, breadth first
/// (no recursion the input could make deep), on a blocking thread.
fn write_tree(
    cas: &LocalCas,
    dirs: &HashMap<String, re::Directory>,
    root: String,
    dest: &Path,
    owner: Option<u32>,
    exclusive: Option<crate::cas::ExclusiveLinks>,
) -> Result<Linked> {
    let mut linked = Linked {
        exclusive,
        ..Default::default()
    };
    chown(dest, owner)?;
    let mut queue = VecDeque::from([(root, dest.to_path_buf())]);
    while let Some((hash, path)) = queue.pop_front() {
        let dir = dirs.get(&hash).ok_or_else(|| WorkerError::MissingInput {
            what: format!("input directory {hash}"),
            blob: None,
        })?;
        for f in &dir.files {
            check_name(&f.name)?;
            let digest = f.digest.clone().unwrap_or_default();
            let cached = cas.path(&digest, f.is_executable)?;
            let shared = match &mut linked.exclusive {
                Some(x) => !x.try_take(&digest, f.is_executable)?,
                None => false,
            };
            let placed = if shared {
                // Another running action holds the cached file: a copy of this action's
                // own (with the cached file's mode), which nothing else ever reads.
                std::fs::copy(&cached, path.join(&f.name)).map(drop)
            } else {
                std::fs::hard_link(&cached, path.join(&f.name))
            };
            match placed {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && !cached.exists() => {
                    return Err(crate::cas::gone_meanwhile(&digest));
                }
                r => r?,
            }
            if shared {
                linked.copied += 1;
                continue;
            }
            linked.inputs.push(LinkedInput {
                print: LocalCas::fingerprint(&cached),
                path: cached,
                digest,
                executable: f.is_executable,
            });
        }
        for s in &dir.symlinks {
            check_name(&s.name)?;
            std::os::unix::fs::symlink(&s.target, path.join(&s.name))?;
        }
        for sub in &dir.directories {
            check_name(&sub.name)?;
            let p = path.join(&sub.name);
            std::fs::create_dir(&p)?;
            chown(&p, owner)?;
            queue.push_back((sub.digest.clone().unwrap_or_default().hash, p));
        }
    }
    Ok(linked)
}
