//! Builds an action's input root on disk: directories, hard links into the local CAS
//! cache (executable and plain copies kept apart), empty directories and symlinks.

use std::collections::{HashMap, VecDeque};
use std::path::Path;

use crate::client::ServerChannel;
use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use prost::Message;
use re::content_addressable_storage_client::ContentAddressableStorageClient;

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

/// Fetches every Directory of the tree under `root`, keyed by digest hash.
async fn fetch_tree(
    channel: &ServerChannel,
    instance: &str,
    root: &re::Digest,
) -> Result<HashMap<String, re::Directory>> {
    let mut dirs = HashMap::new();
    let mut level = vec![root.clone()];
    let mut cas =
        ContentAddressableStorageClient::new(channel.clone()).max_decoding_message_size(64 << 20);
    while !level.is_empty() {
        let resp = cas
            .batch_read_blobs(re::BatchReadBlobsRequest {
                instance_name: instance.into(),
                digests: level.clone(),
                ..Default::default()
            })
            .await?
            .into_inner();
        let mut next = Vec::new();
        for r in resp.responses {
            let d = r.digest.unwrap_or_default();
            if r.status.as_ref().is_some_and(|s| s.code != 0) || digest_of(&r.data) != d {
                return Err(WorkerError::MissingInput(format!(
                    "input directory {}/{}",
                    d.hash, d.size_bytes
                )));
            }
            let dir = re::Directory::decode(&r.data[..])?;
            for sub in &dir.directories {
                if let Some(sd) = &sub.digest {
                    if !dirs.contains_key(&sd.hash) && !next.contains(sd) {
                        next.push(sd.clone());
                    }
                }
            }
            dirs.insert(d.hash.clone(), dir);
        }
        level = next;
    }
    Ok(dirs)
}

/// A cache file linked into an exec root, with its fingerprint at link time.
pub type Linked = Vec<(std::path::PathBuf, Option<(i64, i64, u64)>)>;

/// Materializes the input root `root` into the (existing, empty) directory `dest`, and
/// returns the cache files it linked so the caller can check the action left them alone.
pub async fn materialize(
    cas: &LocalCas,
    channel: &ServerChannel,
    instance: &str,
    root: &re::Digest,
    dest: &Path,
) -> Result<Linked> {
    let mut linked = Linked::new();
    let dirs = fetch_tree(channel, instance, root).await?;
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
    cas.ensure(instance, &files).await?;

    let mut queue = VecDeque::from([(root.hash.clone(), dest.to_path_buf())]);
    while let Some((hash, path)) = queue.pop_front() {
        let dir = dirs
            .get(&hash)
            .ok_or_else(|| WorkerError::MissingInput(format!("input directory {hash}")))?;
        for f in &dir.files {
            check_name(&f.name)?;
            let digest = f.digest.clone().unwrap_or_default();
            let cached = cas.path(&digest, f.is_executable);
            std::fs::hard_link(&cached, path.join(&f.name))?;
            let print = LocalCas::fingerprint(&cached);
            linked.push((cached, print));
        }
        for s in &dir.symlinks {
            check_name(&s.name)?;
            std::os::unix::fs::symlink(&s.target, path.join(&s.name))?;
        }
        for sub in &dir.directories {
            check_name(&sub.name)?;
            let p = path.join(&sub.name);
            std::fs::create_dir(&p)?;
            queue.push_back((sub.digest.clone().unwrap_or_default().hash, p));
        }
    }
    Ok(linked)
}
