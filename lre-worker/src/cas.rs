//! The worker's side of the CAS: a local, size-bounded cache of blobs on disk that input
//! roots are hard-linked from, and uploads of outputs to the server.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use crate::client::ServerChannel;
use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use bazel_remote_apis::google::bytestream::{
    byte_stream_client::ByteStreamClient, ReadRequest, WriteRequest,
};
use re::content_addressable_storage_client::ContentAddressableStorageClient;
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncReadExt;

use crate::error::{Result, WorkerError};
use lre_store::Digest;

/// Blobs up to this size travel in batch calls; larger ones over ByteStream.
const BATCH_BLOB: i64 = 1 << 20;
const BATCH_TOTAL: i64 = 3 << 20;
const CHUNK: usize = 1 << 20;

pub fn digest_of(data: &[u8]) -> re::Digest {
    Digest::of(data).to_proto()
}

/// The server's rule (lre-store), so that a digest the server would refuse (uppercase hex,
/// a negative size) is refused here before it names a file in the cache.
pub fn valid(d: &re::Digest) -> Result<()> {
    Digest::from_proto(d).map(|_| ()).map_err(|e| {
        WorkerError::InvalidInput(format!("input digest {}/{}: {e}", d.hash, d.size_bytes))
    })
}

pub struct LocalCas {
    dir: PathBuf,
    channel: ServerChannel,
    max_bytes: u64,
    index: Arc<Mutex<CacheIndex>>,
}

/// The LRU bookkeeping. Evicting a file that an exec root still links is safe: the link
/// keeps the content.
#[derive(Default)]
struct CacheIndex {
    /// path → (size, last use)
    entries: HashMap<PathBuf, (u64, SystemTime)>,
    total: u64,
    /// Files an action is about to link, with how many actions want each: not evicted.
    pinned: HashMap<PathBuf, usize>,
}

/// Cache files one action needs, kept from eviction until it has linked them.
pub struct Pinned<'a> {
    cas: &'a LocalCas,
    paths: Vec<PathBuf>,
}

impl Drop for Pinned<'_> {
    fn drop(&mut self) {
        let mut idx = self.cas.index.lock().unwrap_or_else(|p| p.into_inner());
        for p in &self.paths {
            if let Some(n) = idx.pinned.get_mut(p) {
                *n -= 1;
                if *n == 0 {
                    idx.pinned.remove(p);
                }
            }
        }
    }
}

/// The SHA-256 digest of a file, read a buffer at a time (never whole into memory).
pub fn file_digest(path: &Path) -> Result<re::Digest> {
    Ok(Digest::of_reader(std::fs::File::open(path)?)?.to_proto())
}

impl LocalCas {
    pub fn open(dir: PathBuf, channel: ServerChannel, max_bytes: u64) -> Result<LocalCas> {
        std::fs::create_dir_all(dir.join("tmp"))?;
        let mut map = HashMap::new();
        let mut total = 0;
        for e in std::fs::read_dir(&dir)? {
            let e = e?;
            if e.file_name() == "tmp" {
                // Leftovers of fetches a previous run did not finish.
                let _ = std::fs::remove_dir_all(e.path());
                std::fs::create_dir_all(dir.join("tmp"))?;
                continue;
            }
            let m = e.metadata()?;
            if m.is_file() {
                total += m.len();
                map.insert(
                    e.path(),
                    (m.len(), m.modified().unwrap_or(SystemTime::UNIX_EPOCH)),
                );
            }
        }
        Ok(LocalCas {
            dir,
            channel,
            max_bytes,
            index: Arc::new(Mutex::new(CacheIndex {
                entries: map,
                total,
                pinned: HashMap::new(),
            })),
        })
    }

    /// Where a blob lives locally. Executable and plain copies are separate files, since
    /// hard links share their mode.
    pub fn path(&self, d: &re::Digest, executable: bool) -> PathBuf {
        self.dir.join(format!(
            "{}-{}{}",
            d.hash,
            d.size_bytes,
            if executable { "-x" } else { "" }
        ))
    }

    fn touch(&self, path: &Path, size: u64) {
        let mut idx = self.index.lock().unwrap_or_else(|p| p.into_inner());
        if idx
            .entries
            .insert(path.to_path_buf(), (size, SystemTime::now()))
            .is_none()
        {
            idx.total += size;
        }
    }

    /// Deletes least recently used, unpinned files until the cache fits. On a blocking
    /// thread, holding the index lock throughout: an `ensure` that finds a file must not
    /// see it deleted after the lock is let go.
    async fn evict(&self) {
        let index = self.index.clone();
        let max_bytes = self.max_bytes;
        if let Err(e) =
            tokio::task::spawn_blocking(move || Self::evict_blocking(&index, max_bytes)).await
        {
            tracing::warn!(error = %e, "cache eviction task failed");
        }
    }

    fn evict_blocking(index: &Mutex<CacheIndex>, max_bytes: u64) {
        let mut idx = index.lock().unwrap_or_else(|p| p.into_inner());
        if idx.total <= max_bytes {
            return;
        }
        let mut by_age: Vec<(SystemTime, PathBuf, u64)> = idx
            .entries
            .iter()
            .map(|(p, (s, t))| (*t, p.clone(), *s))
            .collect();
        by_age.sort();
        for (_, p, s) in by_age {
            if idx.total <= max_bytes {
                break;
            }
            if idx.pinned.contains_key(&p) {
                continue;
            }
            let _ = std::fs::remove_file(&p);
            idx.entries.remove(&p);
            idx.total -= s;
        }
    }

    /// A fingerprint of a cached file that no process can forge: any write or chmod through
    /// any of its hard links changes the inode's ctime.
    pub fn fingerprint(path: &Path) -> Option<(i64, i64, u64)> {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path)
            .ok()
            .map(|m| (m.ctime(), m.ctime_nsec(), m.len()))
    }

    /// Whether a cached file still holds exactly what its name says, with its read-only mode.
    /// Called when its fingerprint moved: another action hard-linking the same file (at
    /// capacity > 1) changes the ctime too, and that must not count as tampering.
    pub fn intact(path: &Path) -> bool {
        use std::os::unix::fs::PermissionsExt;
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            return false;
        };
        let (rest, executable) = match name.strip_suffix("-x") {
            Some(r) => (r, true),
            None => (name, false),
        };
        let Some((hash, size)) = rest.split_once('-') else {
            return false;
        };
        let want_mode = if executable { 0o555 } else { 0o444 };
        let Ok(meta) = std::fs::symlink_metadata(path) else {
            return false;
        };
        if !meta.is_file()
            || meta.permissions().mode() & 0o7777 != want_mode
            || size.parse() != Ok(meta.len())
        {
            return false;
        }
        // Streamed: a cached input may be many GiB.
        match std::fs::File::open(path).and_then(Digest::of_reader) {
            Ok(d) => d.hex() == hash,
            Err(_) => false,
        }
    }

    /// Drops a cached file whose content can no longer be trusted.
    pub fn discard(&self, path: &Path) {
        let _ = std::fs::remove_file(path);
        let mut idx = self.index.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((size, _)) = idx.entries.remove(path) {
            idx.total -= size;
        }
    }

    /// Makes every (digest, executable) present locally, fetching what is missing, and
    /// keeps them from eviction while the returned pin lives.
    pub async fn ensure(
        &self,
        instance: &str,
        wanted: &[(re::Digest, bool)],
    ) -> Result<Pinned<'_>> {
        let mut missing: Vec<re::Digest> = Vec::new();
        let mut pinned = Pinned {
            cas: self,
            paths: Vec::with_capacity(wanted.len()),
        };
        for (d, x) in wanted {
            valid(d)?;
            if d.size_bytes as u64 > self.max_bytes {
                return Err(WorkerError::InvalidInput(format!(
                    "input {}/{} is larger than this worker's whole cache ({} bytes)",
                    d.hash, d.size_bytes, self.max_bytes
                )));
            }
            let p = self.path(d, *x);
            // Pinned before it is looked at, so an eviction cannot come in between.
            {
                let mut idx = self.index.lock().unwrap_or_else(|p| p.into_inner());
                *idx.pinned.entry(p.clone()).or_default() += 1;
            }
            pinned.paths.push(p.clone());
            if p.exists() {
                self.touch(&p, d.size_bytes as u64);
            } else if !missing.contains(d) {
                missing.push(d.clone());
            }
        }
        let mut small: Vec<re::Digest> = Vec::new();
        let mut batch_size = 0;
        for d in &missing {
            if d.size_bytes > BATCH_BLOB {
                self.fetch_to_file(instance, d, wanted).await?;
                continue;
            }
            if batch_size + d.size_bytes > BATCH_TOTAL {
                self.fetch_batch(instance, std::mem::take(&mut small), wanted)
                    .await?;
                batch_size = 0;
            }
            batch_size += d.size_bytes;
            small.push(d.clone());
        }
        if !small.is_empty() {
            self.fetch_batch(instance, small, wanted).await?;
        }
        self.evict().await;
        Ok(pinned)
    }

    /// One BatchReadBlobs call; a blob the CAS does not have is a missing input.
    pub async fn batch_read(
        &self,
        instance: &str,
        digests: Vec<re::Digest>,
    ) -> Result<Vec<(re::Digest, Vec<u8>)>> {
        let resp = ContentAddressableStorageClient::new(self.channel.clone())
            .max_decoding_message_size(64 << 20)
            .batch_read_blobs(re::BatchReadBlobsRequest {
                instance_name: instance.into(),
                digests,
                ..Default::default()
            })
            .await?
            .into_inner();
        let mut out = Vec::with_capacity(resp.responses.len());
        for r in resp.responses {
            let d = r.digest.unwrap_or_default();
            if let Some(s) = r.status.filter(|s| s.code != 0) {
                return Err(WorkerError::missing(&d, &format!(": {}", s.message)));
            }
            out.push((d, r.data));
        }
        Ok(out)
    }

    async fn fetch_batch(
        &self,
        instance: &str,
        digests: Vec<re::Digest>,
        wanted: &[(re::Digest, bool)],
    ) -> Result<()> {
        for (d, data) in self.batch_read(instance, digests).await? {
            self.store(&d, &data, wanted).await?;
        }
        Ok(())
    }

    async fn open_read(
        &self,
        instance: &str,
        d: &re::Digest,
    ) -> Result<tonic::Streaming<bazel_remote_apis::google::bytestream::ReadResponse>> {
        let name = format!(
            "{}{}blobs/{}/{}",
            instance,
            if instance.is_empty() { "" } else { "/" },
            d.hash,
            d.size_bytes
        );
        Ok(ByteStreamClient::new(self.channel.clone())
            .read(ReadRequest {
                resource_name: name,
                read_offset: 0,
                read_limit: 0,
            })
            .await
            .map_err(|e| WorkerError::missing(d, &format!(": {}", e.message())))?
            .into_inner())
    }

    /// Reads a blob of bounded size (a Directory message) over ByteStream, into memory:
    /// what arrives past the digest's size is refused, not buffered.
    pub async fn read_whole(&self, instance: &str, d: &re::Digest) -> Result<Vec<u8>> {
        let mut s = self.open_read(instance, d).await?;
        let mut out = Vec::new();
        while let Some(m) = s
            .message()
            .await
            .map_err(|e| WorkerError::missing(d, &format!(": {}", e.message())))?
        {
            if out.len() + m.data.len() > d.size_bytes as usize {
                return Err(WorkerError::missing(d, ": the CAS sent more than its size"));
            }
            out.extend_from_slice(&m.data);
        }
        Ok(out)
    }

    /// Streams a large blob into a temporary file, hashing as it goes, so that an input of
    /// any size costs one chunk of memory; then installs it as [`Self::store_file`] does.
    async fn fetch_to_file(
        &self,
        instance: &str,
        d: &re::Digest,
        wanted: &[(re::Digest, bool)],
    ) -> Result<()> {
        use tokio::io::AsyncWriteExt;
        let tmp = self.dir.join("tmp").join(uuid::Uuid::new_v4().to_string());
        let result = async {
            let mut s = self.open_read(instance, d).await?;
            let mut f = tokio::fs::File::create(&tmp).await?;
            let (mut h, mut n) = (Sha256::new(), 0u64);
            while let Some(m) = s
                .message()
                .await
                .map_err(|e| WorkerError::missing(d, &format!(": {}", e.message())))?
            {
                n += m.data.len() as u64;
                if n > d.size_bytes as u64 {
                    return Err(WorkerError::missing(d, ": the CAS sent more than its size"));
                }
                h.update(&m.data);
                f.write_all(&m.data).await?;
            }
            f.sync_all().await?;
            if n != d.size_bytes as u64 || hex::encode(h.finalize()) != d.hash {
                return Err(WorkerError::InvalidInput(format!(
                    "the CAS returned wrong content for {}/{}",
                    d.hash, d.size_bytes
                )));
            }
            self.install(d, &tmp, wanted).await
        }
        .await;
        let _ = tokio::fs::remove_file(&tmp).await;
        result
    }

    /// Puts a verified temporary file in place under each mode `wanted` asks for (a copy
    /// for the second: hard links share their mode).
    async fn install(
        &self,
        d: &re::Digest,
        tmp: &Path,
        wanted: &[(re::Digest, bool)],
    ) -> Result<()> {
        let modes: Vec<bool> = [false, true]
            .into_iter()
            .filter(|x| wanted.iter().any(|(w, wx)| w == d && wx == x))
            .collect();
        for (i, x) in modes.iter().enumerate() {
            let src = if i + 1 == modes.len() {
                tmp.to_path_buf()
            } else {
                let copy = self.dir.join("tmp").join(uuid::Uuid::new_v4().to_string());
                tokio::fs::copy(tmp, &copy).await?;
                copy
            };
            tokio::fs::set_permissions(
                &src,
                std::fs::Permissions::from_mode(if *x { 0o555 } else { 0o444 }),
            )
            .await?;
            let dst = self.path(d, *x);
            tokio::fs::rename(&src, &dst).await?;
            self.touch(&dst, d.size_bytes as u64);
        }
        Ok(())
    }

    /// Verifies and writes a fetched blob: temp file, then rename, so a crash never leaves
    /// a wrong file under a digest's name.
    async fn store(
        &self,
        d: &re::Digest,
        data: &[u8],
        wanted: &[(re::Digest, bool)],
    ) -> Result<()> {
        if digest_of(data) != *d {
            return Err(WorkerError::InvalidInput(format!(
                "the CAS returned wrong content for {}/{}",
                d.hash, d.size_bytes
            )));
        }
        let tmp = self.dir.join("tmp").join(uuid::Uuid::new_v4().to_string());
        tokio::fs::write(&tmp, data).await?;
        let result = self.install(d, &tmp, wanted).await;
        let _ = tokio::fs::remove_file(&tmp).await;
        result
    }

    /// Uploads the given (digest, file) pairs the server lacks.
    pub async fn upload(&self, instance: &str, blobs: Vec<(re::Digest, Upload)>) -> Result<()> {
        if blobs.is_empty() {
            return Ok(());
        }
        let mut cas = ContentAddressableStorageClient::new(self.channel.clone());
        let missing = cas
            .find_missing_blobs(re::FindMissingBlobsRequest {
                instance_name: instance.into(),
                blob_digests: blobs.iter().map(|(d, _)| d.clone()).collect(),
                ..Default::default()
            })
            .await?
            .into_inner()
            .missing_blob_digests;
        let mut batch = Vec::new();
        let mut batch_size = 0;
        let mut sent = std::collections::HashSet::new();
        for (d, src) in blobs {
            if !missing.contains(&d) || !sent.insert(d.hash.clone()) {
                continue;
            }
            if d.size_bytes > BATCH_BLOB {
                self.write_stream(instance, &d, &src).await?;
                continue;
            }
            if batch_size + d.size_bytes > BATCH_TOTAL {
                self.put_batch(instance, &mut cas, std::mem::take(&mut batch))
                    .await?;
                batch_size = 0;
            }
            batch_size += d.size_bytes;
            batch.push(re::batch_update_blobs_request::Request {
                data: src.read().await?,
                digest: Some(d),
                compressor: 0,
            });
        }
        if !batch.is_empty() {
            self.put_batch(instance, &mut cas, batch).await?;
        }
        Ok(())
    }

    async fn put_batch(
        &self,
        instance: &str,
        cas: &mut ContentAddressableStorageClient<ServerChannel>,
        requests: Vec<re::batch_update_blobs_request::Request>,
    ) -> Result<()> {
        let resp = cas
            .batch_update_blobs(re::BatchUpdateBlobsRequest {
                instance_name: instance.into(),
                requests,
                digest_function: 0,
            })
            .await?
            .into_inner();
        for r in resp.responses {
            if let Some(s) = r.status.filter(|s| s.code != 0) {
                return Err(WorkerError::Upload(s.message));
            }
        }
        Ok(())
    }

    async fn write_stream(&self, instance: &str, d: &re::Digest, src: &Upload) -> Result<()> {
        let Upload::File(path) = src else {
            let data = src.read().await?;
            return self
                .write_chunks(instance, d, futures::stream::iter(vec![data]))
                .await;
        };
        // Read lazily, one chunk per message: a large output never sits in memory whole.
        // A read error ends the stream early; the server then refuses the short upload.
        let f = tokio::fs::File::open(path).await?;
        let chunks = futures::stream::unfold(f, |mut f| async move {
            let mut buf = vec![0u8; CHUNK];
            match f.read(&mut buf).await {
                Ok(0) | Err(_) => None,
                Ok(n) => {
                    buf.truncate(n);
                    Some((buf, f))
                }
            }
        });
        self.write_chunks(instance, d, chunks).await
    }

    async fn write_chunks(
        &self,
        instance: &str,
        d: &re::Digest,
        chunks: impl futures::Stream<Item = Vec<u8>> + Send + 'static,
    ) -> Result<()> {
        use futures::StreamExt;
        let name = format!(
            "{}{}uploads/{}/blobs/{}/{}",
            instance,
            if instance.is_empty() { "" } else { "/" },
            uuid::Uuid::new_v4(),
            d.hash,
            d.size_bytes
        );
        let total = d.size_bytes;
        let mut offset = 0i64;
        let reqs = chunks.map(move |data| {
            let req = WriteRequest {
                resource_name: if offset == 0 {
                    name.clone()
                } else {
                    String::new()
                },
                write_offset: offset,
                finish_write: offset + data.len() as i64 == total,
                data,
            };
            offset += req.data.len() as i64;
            req
        });
        ByteStreamClient::new(self.channel.clone())
            .write(reqs)
            .await?;
        Ok(())
    }
}

/// Where an output's bytes come from.
pub enum Upload {
    File(PathBuf),
    Bytes(Vec<u8>),
}

impl Upload {
    async fn read(&self) -> Result<Vec<u8>> {
        match self {
            Upload::File(p) => Ok(tokio::fs::read(p).await?),
            Upload::Bytes(b) => Ok(b.clone()),
        }
    }
}

#[cfg(test)]
mod intact_tests {
    use super::LocalCas;
    use sha2::Digest as _;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_new_hard_link_is_not_tampering_but_a_write_or_chmod_is() {
        let dir = tempfile::tempdir().unwrap();
        let data = b"int x;\n";
        let name = format!(
            "{}-{}-x",
            hex::encode(sha2::Sha256::digest(data)),
            data.len()
        );
        let path = dir.path().join(&name);
        std::fs::write(&path, data).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o555)).unwrap();
        let before = LocalCas::fingerprint(&path);
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::hard_link(&path, dir.path().join("another-action-input")).unwrap();
        assert_ne!(
            LocalCas::fingerprint(&path),
            before,
            "a new link moves the ctime"
        );
        assert!(
            LocalCas::intact(&path),
            "…but the content and mode are as cached"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(!LocalCas::intact(&path), "chmod is tampering");
        std::fs::write(&path, b"int y;\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o555)).unwrap();
        assert!(!LocalCas::intact(&path), "new content is tampering");
        assert!(!LocalCas::intact(&dir.path().join("not-a-cache-name")));
    }
}

#[cfg(test)]
mod digest_rule_tests {
    use super::{re, valid};

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
                lre_store::Digest::from_proto(&bad).is_err(),
                "the server's rule accepts {bad:?}"
            );
        }
    }
}
