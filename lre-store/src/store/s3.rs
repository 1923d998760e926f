//! An S3-compatible object store (AWS, Garage, MinIO, Ceph RGW) through the `object_store`
//! crate, which also speaks GCS and Azure should those be wanted.
//!
//! Objects are named `<prefix>cas/<hex>` and `<prefix>ac/<hex>`. S3 has no LRU: `lookup`
//! does not refresh anything, and expiry is the bucket's lifecycle policy.
//!
//! Nothing is visible before `commit`: a blob that fits in one part is one PUT under its
//! final name at commit; a larger one is a multipart upload to `<prefix>tmp/<uuid>`, which
//! `commit` completes and then copies to its name (S3 objects cannot be renamed, and the
//! name is not known when the upload starts). A dropped writer aborts its multipart
//! upload; a `tmp/` object left by a killed process is garbage for the lifecycle policy,
//! never a blob anyone reads.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path;
use object_store::{
    BackoffConfig, ClientOptions, GetOptions, GetRange, MultipartUpload, ObjectStore, PutPayload,
    RetryConfig,
};
use tokio_util::io::StreamReader;

use super::{check_fits, BlobReader, BlobStore, BlobWriter, Budget, Key, KeyKind};
use crate::config::S3Config;
use crate::error::{Result, StoreError as Error};

/// One upload part. S3 wants at least 5 MiB for all parts but the last.
pub const PART_SIZE: usize = 8 << 20;
/// HEAD requests in flight at once for one `lookup`.
const LOOKUP_CONCURRENCY: usize = 64;

pub struct S3Store {
    /// Requests with a bounded duration (HEAD, PUT, DELETE, parts): `request_timeout`.
    client: Arc<AmazonS3>,
    /// GETs and copies, whose time grows with the object: no total timeout; a GET body
    /// is bounded by `idle` between bytes instead.
    stream_client: Arc<AmazonS3>,
    idle: Duration,
    /// Said in every error, so an operator knows which backend failed.
    name: String,
    prefix: String,
    capacity: u64,
    budget: Arc<Budget>,
}

impl S3Store {
    /// Connects and checks that the bucket answers, so a wrong endpoint, bucket or key is
    /// an error at start that names it, not a failure on the first build.
    pub async fn open(config: &S3Config) -> Result<S3Store> {
        let endpoint = config.endpoint.as_deref().unwrap_or("AWS");
        let name = format!("s3 bucket {:?} at {endpoint}", config.bucket);
        let timeout = Duration::from_secs(config.request_timeout_seconds);
        let secret = match (&config.access_key_id, &config.secret_access_key_file) {
            (Some(id), Some(file)) => {
                let secret = tokio::fs::read_to_string(file).await.map_err(|e| {
                    Error::InvalidArgument(format!(
                        "{name}: reading secret_access_key_file {}: {e}",
                        file.display()
                    ))
                })?;
                Some((id.clone(), secret.trim().to_owned()))
            }
            _ => None,
        };
        let build = |total: Option<Duration>| {
            let mut options = ClientOptions::new()
                .with_allow_http(config.allow_http)
                .with_connect_timeout(Duration::from_secs(5));
            options = match total {
                Some(t) => options.with_timeout(t),
                None => options.with_timeout_disabled(),
            };
            let mut b = AmazonS3Builder::from_env()
                .with_bucket_name(&config.bucket)
                .with_region(&config.region)
                .with_allow_http(config.allow_http)
                .with_client_options(options)
                // A few quick retries, then UNAVAILABLE: Bazel retries too, and a request
                // must not hang for object_store's default of three minutes.
                .with_retry(RetryConfig {
                    backoff: BackoffConfig {
                        init_backoff: Duration::from_millis(100),
                        max_backoff: Duration::from_secs(2),
                        base: 2.,
                    },
                    max_retries: 3,
                    retry_timeout: timeout,
                });
            if let Some(e) = &config.endpoint {
                b = b.with_endpoint(e).with_virtual_hosted_style_request(false);
            }
            if let Some((id, secret)) = &secret {
                b = b.with_access_key_id(id).with_secret_access_key(secret);
            }
            b.build()
                .map(Arc::new)
                .map_err(|e| Error::InvalidArgument(format!("{name}: {e}")))
        };
        let client = build(Some(timeout))?;
        let stream_client = build(None)?;
        let store = S3Store {
            client,
            stream_client,
            idle: timeout,
            name,
            prefix: config.prefix.clone(),
            capacity: config.max_blob_size.0,
            budget: Arc::new(Budget::new(config.max_in_flight.0)),
        };
        // A HEAD of a name that never exists: NotFound proves endpoint, bucket and key.
        let probe = Path::from(format!("{}lre-probe", store.prefix));
        match store.client.head(&probe).await {
            Ok(_) | Err(object_store::Error::NotFound { .. }) => Ok(store),
            Err(e) => Err(store.unavailable("checking the bucket at start", e)),
        }
    }

    fn path(&self, key: &Key) -> Path {
        object_path(&self.prefix, key)
    }

    fn unavailable(&self, what: &str, e: object_store::Error) -> Error {
        unavailable(&self.name, what, e)
    }

    /// The object's size, or `None` when it is absent.
    async fn head(&self, key: &Key) -> Result<Option<u64>> {
        match self.client.head(&self.path(key)).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.unavailable("HEAD", e)),
        }
    }
}

#[async_trait]
impl BlobStore for S3Store {
    async fn lookup(&self, keys: &[Key]) -> Result<Vec<Option<u64>>> {
        // Owned keys: a stream of futures borrowing `keys` is not provably Send.
        futures::stream::iter(keys.to_vec())
            .map(|k| async move { self.head(&k).await })
            .buffered(LOOKUP_CONCURRENCY)
            .try_collect()
            .await
    }

    async fn get(&self, key: &Key) -> Result<Option<Bytes>> {
        let path = self.path(key);
        // Whole small entries: the total timeout bounds the body too.
        let result = match self.client.get(&path).await {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.unavailable("GET", e)),
        };
        let size = result.meta.size;
        if size > self.capacity {
            return Err(Error::Internal(format!(
                "{}: {path} is {size} bytes, over max_blob_size",
                self.name
            )));
        }
        let data = result
            .bytes()
            .await
            .map_err(|e| self.unavailable("reading a GET body", e))?;
        if data.len() as u64 != size {
            return Err(Error::Unavailable(format!(
                "{}: {path} ended after {} of {size} bytes",
                self.name,
                data.len()
            )));
        }
        Ok(Some(data))
    }

    async fn open(
        &self,
        key: &Key,
        offset: u64,
        // Nothing to verify here: the `verify` layer above does.
        _limit: Option<u64>,
    ) -> Result<Option<(u64, BlobReader)>> {
        let path = self.path(key);
        let mut opts = GetOptions::default();
        if offset > 0 {
            // S3 refuses a range that starts at the end, which is a valid (empty) read here.
            let Some(size) = self.head(key).await? else {
                return Ok(None);
            };
            if offset >= size {
                return Ok(Some((size, Box::pin(io::Cursor::new(Bytes::new())))));
            }
            opts.range = Some(GetRange::Offset(offset));
        }
        let result = match self.stream_client.get_opts(&path, opts).await {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.unavailable("GET", e)),
        };
        let size = result.meta.size;
        let expected = size.saturating_sub(offset);
        let name = self.name.clone();
        let stream = result.into_stream().map_err(move |e| {
            Error::Unavailable(format!("{name}: reading a GET body: {e}")).into_io()
        });
        // A body cut short by the backend is an error, never a short blob that reads OK.
        let reader = LengthChecked {
            inner: StreamReader::new(stream),
            remaining: expected,
            name: self.name.clone(),
            idle: self.idle,
            timer: Box::pin(tokio::time::sleep(self.idle)),
        };
        Ok(Some((size, Box::pin(reader))))
    }

    async fn writer(&self, size_hint: Option<u64>) -> Result<Box<dyn BlobWriter>> {
        check_fits(size_hint, self.capacity)?;
        Ok(Box::new(S3Writer {
            client: self.client.clone(),
            stream_client: self.stream_client.clone(),
            name: self.name.clone(),
            prefix: self.prefix.clone(),
            capacity: self.capacity,
            budget: self.budget.clone(),
            buf: Vec::new(),
            reserved: 0,
            written: 0,
            multipart: None,
            broken: false,
        }))
    }

    async fn remove(&self, key: &Key) -> Result<()> {
        match self.client.delete(&self.path(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.unavailable("DELETE", e)),
        }
    }

    async fn list(&self, kind: KeyKind) -> Result<Vec<Key>> {
        let dir = Path::from(format!("{}{}", self.prefix, kind.dir()));
        let mut found = Vec::new();
        let mut objects = self.stream_client.list(Some(&dir));
        while let Some(meta) = objects.next().await {
            let meta = meta.map_err(|e| self.unavailable("LIST", e))?;
            // Anything else under the prefix is not ours to name.
            if let Some(hash) = meta
                .location
                .filename()
                .and_then(|n| crate::digest::Digest::parse_hash(n).ok())
            {
                found.push(Key::of_kind(kind, hash));
            }
        }
        Ok(found)
    }

    fn capacity(&self) -> u64 {
        self.capacity
    }
}

/// `<prefix>cas/<hex>` or `<prefix>ac/<hex>` (`Key`'s display form).
fn object_path(prefix: &str, key: &Key) -> Path {
    Path::from(format!("{prefix}{key}"))
}

fn unavailable(store: &str, what: &str, e: object_store::Error) -> Error {
    Error::Unavailable(format!("{store}: {what}: {e}"))
}

/// A reader that fails unless exactly `remaining` bytes arrive, and when the backend sends
/// nothing for `idle`.
struct LengthChecked<R> {
    inner: R,
    remaining: u64,
    name: String,
    idle: Duration,
    timer: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl<R: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for LengthChecked<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        use std::future::Future;
        use std::task::Poll;
        let this = &mut *self;
        let room = buf.remaining() > 0;
        let before = buf.filled().len();
        match std::pin::Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Pending => {
                if this.timer.as_mut().poll(cx).is_ready() {
                    let e = Error::Unavailable(format!(
                        "{}: no bytes of a GET body for {:?}",
                        this.name, this.idle
                    ));
                    return Poll::Ready(Err(e.into_io()));
                }
                return Poll::Pending;
            }
            Poll::Ready(r) => r?,
        }
        let deadline = tokio::time::Instant::now() + this.idle;
        this.timer.as_mut().reset(deadline);
        let n = (buf.filled().len() - before) as u64;
        if n > this.remaining {
            let e = Error::Unavailable(format!(
                "{}: the object store sent more bytes than the object's size",
                this.name
            ));
            return Poll::Ready(Err(e.into_io()));
        }
        this.remaining -= n;
        if n == 0 && room && this.remaining > 0 {
            let e = Error::Unavailable(format!(
                "{}: the object store's body ended {} bytes early",
                this.name, this.remaining
            ));
            return Poll::Ready(Err(e.into_io()));
        }
        Poll::Ready(Ok(()))
    }
}

struct S3Writer {
    client: Arc<AmazonS3>,
    stream_client: Arc<AmazonS3>,
    name: String,
    prefix: String,
    capacity: u64,
    budget: Arc<Budget>,
    /// At most one part, not yet sent.
    buf: Vec<u8>,
    /// Budget held for `buf`.
    reserved: u64,
    written: u64,
    /// Once the blob outgrew one part: its temporary name and the upload.
    multipart: Option<(Path, Box<dyn MultipartUpload>)>,
    /// A part failed to upload: its bytes are lost, so this upload must never commit.
    broken: bool,
}

impl S3Writer {
    fn unavailable(&self, what: &str, e: object_store::Error) -> Error {
        unavailable(&self.name, what, e)
    }

    /// Sends the buffered part and waits for it, so a writer holds one part at most.
    async fn flush_part(&mut self) -> Result<()> {
        if self.multipart.is_none() {
            let tmp = Path::from(format!("{}tmp/{}", self.prefix, uuid::Uuid::new_v4()));
            let upload = self
                .client
                .put_multipart(&tmp)
                .await
                .map_err(|e| self.unavailable("starting a multipart upload", e))?;
            self.multipart = Some((tmp, upload));
        }
        let part = Bytes::from(std::mem::take(&mut self.buf));
        let n = part.len() as u64;
        let Some((_, upload)) = self.multipart.as_mut() else {
            return Err(Error::Internal("multipart upload vanished".into()));
        };
        let sent = upload.put_part(PutPayload::from(part)).await;
        self.budget.give(n);
        self.reserved -= n;
        sent.map_err(|e| self.unavailable("uploading a part", e))
    }
}

#[async_trait]
impl BlobWriter for S3Writer {
    async fn write(&mut self, mut data: &[u8]) -> Result<()> {
        if self.broken {
            return Err(Error::Internal(format!(
                "an earlier part of this upload to {} failed; it cannot go on",
                self.name
            )));
        }
        if self.written + data.len() as u64 > self.capacity {
            return Err(Error::InvalidArgument(format!(
                "blob is larger than {}'s max_blob_size ({} bytes)",
                self.name, self.capacity
            )));
        }
        // All of it or nothing: a refusal here leaves the writer as it was, so the same
        // call can be retried (`BlobWriter::write`).
        self.budget.take(data.len() as u64)?;
        self.reserved += data.len() as u64;
        while !data.is_empty() {
            let n = data.len().min(PART_SIZE - self.buf.len());
            self.buf.extend_from_slice(&data[..n]);
            self.written += n as u64;
            data = &data[n..];
            if self.buf.len() == PART_SIZE {
                if let Err(e) = self.flush_part().await {
                    // Bytes are gone with the failed part: a retry or a resumed upload
                    // would store other content than was hashed. Never commit this one.
                    self.broken = true;
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    async fn commit(mut self: Box<Self>, key: Key) -> Result<()> {
        if self.broken {
            return Err(Error::Internal(format!(
                "an upload to {} that lost a part cannot be committed",
                self.name
            )));
        }
        let path = object_path(&self.prefix, &key);
        if self.multipart.is_none() {
            let data = Bytes::from(std::mem::take(&mut self.buf));
            let put = self.client.put(&path, PutPayload::from(data)).await;
            self.budget.give(std::mem::take(&mut self.reserved));
            return put.map(|_| ()).map_err(|e| self.unavailable("PUT", e));
        }
        // The upload stays in `self` until it is complete, so a commit cancelled half way
        // still has it aborted by `Drop`.
        if !self.buf.is_empty() {
            if let Err(e) = self.flush_part().await {
                self.broken = true;
                return Err(e);
            }
        }
        let Some((tmp, upload)) = self.multipart.as_mut() else {
            return Err(Error::Internal("multipart upload vanished".into()));
        };
        let tmp = tmp.clone();
        if let Err(e) = upload.complete().await {
            self.broken = true;
            return Err(self.unavailable("completing a multipart upload", e));
        }
        self.multipart = None;
        let copied = self.stream_client.copy(&tmp, &path).await;
        if let Err(e) = self.client.delete(&tmp).await {
            tracing::warn!(store = %self.name, object = %tmp, error = %e, "could not delete a temporary object");
        }
        copied.map_err(|e| self.unavailable("copying a finished upload to its name", e))
    }

    async fn discard(mut self: Box<Self>) {
        if let Some((_, mut upload)) = self.multipart.take() {
            let _ = upload.abort().await;
        }
    }
}

impl Drop for S3Writer {
    fn drop(&mut self) {
        self.budget.give(std::mem::take(&mut self.reserved));
        // Aborting is a request: done off this task, if there is a runtime to do it on.
        if let Some((_, mut upload)) = self.multipart.take() {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    let _ = upload.abort().await;
                });
            }
        }
    }
}
