//! The ByteStream gRPC service: streaming reads and resumable, verified streaming writes.
//! Neither direction ever holds a whole blob in memory.
//!
//! What write sessions may hold is bounded: at most `StreamLimits::max_sessions` resumable
//! uploads, zstd frames with windows of at most 8 MiB, `StreamLimits::zstd_memory` of decoder
//! memory in all, and (in the store) unfinished uploads' bytes counted against `max_size`.
//! When a limit is reached the least recently active interrupted upload is dropped first
//! (its client restarts it from zero); only when none is left does a write get
//! RESOURCE_EXHAUSTED.

use bytes::Bytes;
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bazel_remote_apis::google::bytestream::{
    byte_stream_server::ByteStream, QueryWriteStatusRequest, QueryWriteStatusResponse, ReadRequest,
    ReadResponse, WriteRequest, WriteResponse,
};
use futures::Stream;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::AsyncReadExt;
use tokio::sync::Mutex as AsyncMutex;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use zstd::zstd_safe::{DCtx, DParameter, InBuffer, OutBuffer};

use crate::auth::{grpc_credential, Access};
use crate::context::ServerContext;
use crate::error::{Error, Result};
use crate::resource_name::{parse_read, parse_write, BlobResource, Compression};
use crate::store::CasUpload;

const READ_CHUNK: usize = 256 * 1024;
/// The most a Read response carries: 256 KiB, well under every client's 4 MiB message
/// limit (1 MiB measured slower: tonic clients grow their decode buffer by doubling).
const READ_MESSAGE: usize = 256 << 10;

/// The largest zstd window a compressed upload may use: 2^23 = 8 MiB, what `zstd -19` uses.
/// A frame asking for more is refused: its decoder would hold the whole window for as long
/// as the (resumable) upload lives.
pub const ZSTD_WINDOW_LOG_MAX: u32 = 23;

/// What the streams of one service may hold, and for how long.
#[derive(Debug, Clone)]
pub struct StreamLimits {
    /// Resumable uploads (`uploads/{uuid}/...`) kept at once, running or interrupted.
    pub max_sessions: usize,
    /// Memory all zstd decoders may hold together, in bytes. One decoder holds at most its
    /// window plus ~300 KiB, so 8.3 MiB with the largest window allowed.
    pub zstd_memory: u64,
    /// A read whose client takes nothing, or a write whose client sends nothing, for this
    /// long is ended with ABORTED. A stalled read would otherwise keep its file open, and
    /// with it the disk space of a blob evicted meanwhile, for as long as the client
    /// answers HTTP/2 pings.
    pub stall_timeout: Duration,
}

impl Default for StreamLimits {
    fn default() -> Self {
        StreamLimits {
            max_sessions: 1024,
            zstd_memory: 256 << 20,
            stall_timeout: Duration::from_secs(60),
        }
    }
}

/// A partly received upload. Its bytes live in the store's temp space, not in memory.
struct Upload {
    cas: Option<CasUpload>,
    decoder: Option<ZstdStream>,
    /// Bytes accepted so far, in the units the client counts `write_offset` in.
    received: i64,
    last_active: Instant,
}

type SessionMap = HashMap<String, Arc<AsyncMutex<Upload>>>;

/// Resumable uploads by resource name, and the gauge that publishes their number.
struct Sessions {
    map: Mutex<SessionMap>,
    gauge: Gauge,
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, SessionMap> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub struct ByteStreamService {
    cache: Arc<ServerContext>,
    sessions: Arc<Sessions>,
    limits: StreamLimits,
}

/// A zstd decoder whose window is limited and whose memory is counted in a shared gauge.
struct ZstdStream {
    dctx: DCtx<'static>,
    charged: i64,
    memory: Gauge,
}

impl ZstdStream {
    fn new(memory: Gauge) -> Result<ZstdStream> {
        let mut dctx = DCtx::try_create()
            .ok_or_else(|| Error::ResourceExhausted("cannot allocate a zstd decoder".into()))?;
        dctx.init()
            .and_then(|_| dctx.set_parameter(DParameter::WindowLogMax(ZSTD_WINDOW_LOG_MAX)))
            .map_err(|code| {
                Error::Internal(format!(
                    "zstd decoder setup: {}",
                    zstd::zstd_safe::get_error_name(code)
                ))
            })?;
        let mut z = ZstdStream {
            dctx,
            charged: 0,
            memory,
        };
        z.recharge();
        Ok(z)
    }

    /// Brings the shared gauge up to date with what this decoder holds now.
    fn recharge(&mut self) {
        let now = i64::try_from(self.dctx.sizeof()).unwrap_or(i64::MAX);
        if now != self.charged {
            self.memory.inc_by(now - self.charged);
            self.charged = now;
        }
    }

    fn step(&mut self, input: &mut InBuffer<'_>, out: &mut [u8]) -> Result<usize> {
        let mut ob = OutBuffer::around(out);
        let r = self.dctx.decompress_stream(&mut ob, input);
        // The window is allocated when the frame header is read: count it at once.
        self.recharge();
        r.map_err(zstd_error)?;
        Ok(ob.pos())
    }
}

impl Drop for ZstdStream {
    fn drop(&mut self) {
        self.memory.dec_by(self.charged);
    }
}

fn zstd_error(code: usize) -> Error {
    let name = zstd::zstd_safe::get_error_name(code);
    // ZSTD_error_frameParameter_windowTooLarge
    if name.contains("too much memory") {
        return Error::InvalidArgument(format!(
            "zstd frame needs a window larger than {} MiB (window log {ZSTD_WINDOW_LOG_MAX}), \
             the most this server decodes; compress with level 19 or lower and no --long above {ZSTD_WINDOW_LOG_MAX}",
            (1u64 << ZSTD_WINDOW_LOG_MAX) >> 20
        ));
    }
    Error::InvalidArgument(format!("corrupt zstd stream: {name}"))
}

impl ByteStreamService {
    /// An interrupted upload stays resumable for `upload_ttl` after its last byte.
    pub fn new(cache: Arc<ServerContext>, upload_ttl: Duration) -> Self {
        Self::with_limits(cache, upload_ttl, StreamLimits::default())
    }

    pub fn with_limits(
        cache: Arc<ServerContext>,
        upload_ttl: Duration,
        limits: StreamLimits,
    ) -> Self {
        let sessions = Arc::new(Sessions {
            map: Mutex::default(),
            gauge: cache.metrics.upload_sessions.clone(),
        });
        spawn_sweeper(Arc::downgrade(&sessions), upload_ttl);
        ByteStreamService {
            cache,
            sessions,
            limits,
        }
    }

    /// The resumable session named `name`, created if new. When `max_sessions` are held,
    /// the least recently active interrupted one makes room.
    async fn session(&self, name: &str) -> Result<Arc<AsyncMutex<Upload>>> {
        {
            let map = self.sessions.lock();
            if let Some(s) = map.get(name) {
                return Ok(s.clone());
            }
            if map.len() < self.limits.max_sessions {
                drop(map);
                return Ok(self.insert_session(name));
            }
        }
        if !self.evict_idle("too many upload sessions", |_| true).await {
            return Err(Error::ResourceExhausted(format!(
                "{} uploads are running; retry later",
                self.limits.max_sessions
            )));
        }
        Ok(self.insert_session(name))
    }

    fn insert_session(&self, name: &str) -> Arc<AsyncMutex<Upload>> {
        let mut map = self.sessions.lock();
        let s = map
            .entry(name.to_string())
            .or_insert_with(|| Arc::new(AsyncMutex::new(Upload::empty())))
            .clone();
        self.sessions.gauge.set(map.len() as i64);
        s
    }

    /// Forgets `session` if `name` still refers to it (not to a newer one).
    fn remove_session(&self, name: &str, session: &Arc<AsyncMutex<Upload>>) {
        let mut map = self.sessions.lock();
        if map.get(name).is_some_and(|s| Arc::ptr_eq(s, session)) {
            map.remove(name);
        }
        self.sessions.gauge.set(map.len() as i64);
    }

    /// Drops the least recently active interrupted upload that `pick` accepts, giving back
    /// its store space, temp file and decoder before returning. Returns whether there was one.
    async fn evict_idle(&self, why: &str, pick: impl Fn(&Upload) -> bool) -> bool {
        let (name, victim) = {
            let mut map = self.sessions.lock();
            let mut oldest: Option<(&String, Instant)> = None;
            for (name, s) in map.iter() {
                // Locked means a stream is writing it right now: never taken away.
                if let Ok(up) = s.try_lock() {
                    if pick(&up) && oldest.is_none_or(|(_, t)| up.last_active < t) {
                        oldest = Some((name, up.last_active));
                    }
                }
            }
            let Some(name) = oldest.map(|(n, _)| n.clone()) else {
                return false;
            };
            let Some(s) = map.remove(&name) else {
                return false;
            };
            self.sessions.gauge.set(map.len() as i64);
            let victim = s
                .try_lock()
                .map(|mut up| std::mem::replace(&mut *up, Upload::empty()));
            (name, victim)
        };
        tracing::info!(resource = %name, reason = why, "dropping an interrupted upload to make room");
        if let Ok(up) = victim {
            up.discard().await;
        }
        true
    }

    async fn new_upload(&self, res: &BlobResource) -> Result<Upload> {
        let decoder = match res.compression {
            Compression::Zstd => Some(ZstdStream::new(
                self.cache.metrics.zstd_decoder_bytes.clone(),
            )?),
            Compression::Identity => None,
        };
        Ok(Upload {
            cas: Some(
                self.cache
                    .upload(res.digest.function, res.digest.hash, Some(res.digest.size))
                    .await?,
            ),
            decoder,
            received: 0,
            last_active: Instant::now(),
        })
    }

    async fn already_stored(&self, res: &BlobResource) -> Result<bool> {
        Ok(self.cache.find_missing(&[res.digest]).await?.is_empty())
    }

    /// What `committed_size` reports for a blob that is already complete.
    fn complete_size(res: &BlobResource) -> i64 {
        match res.compression {
            Compression::Identity => res.digest.size as i64,
            Compression::Zstd => -1,
        }
    }

    async fn write_stream(
        &self,
        first: WriteRequest,
        stream: &mut Streaming<WriteRequest>,
        res: &BlobResource,
    ) -> Result<i64> {
        let name = first.resource_name.clone();
        let session = match &res.upload_id {
            Some(_) => self.session(&name).await?,
            None => Arc::new(AsyncMutex::new(Upload::empty())),
        };
        let mut up = session
            .clone()
            .try_lock_owned()
            .map_err(|_| Error::Aborted(format!("another stream is already writing {name}")))?;
        // Every way out below ends in the match, so a write that fails at its start (a bad
        // offset, a blob too big for the store) does not leave its session behind.
        let result = async {
            // A torn session (its last write was cancelled by a reset stream) holds bytes
            // nobody hashed: it starts over like an unknown one.
            if first.write_offset == 0 || up.cas.as_ref().is_none_or(|c| c.is_torn()) {
                if first.write_offset != 0 {
                    return Err(Error::InvalidArgument(format!(
                        "write_offset {} for an upload this server has no record of; start at 0",
                        first.write_offset
                    )));
                }
                // The old attempt's space and decoder go before the new one takes any.
                *up = Upload::empty();
                *up = self.new_upload(res).await?;
            }
            self.pump(&mut up, first, stream, &name).await
        }
        .await;
        let keep = matches!(result, Err(Error::Aborted(_))) && res.upload_id.is_some();
        if keep {
            // Interrupted: keep what arrived so the client can resume after QueryWriteStatus,
            // but not the buffers and descriptor an idle upload does not need.
            up.last_active = Instant::now();
            let suspended = match up.cas.as_mut() {
                Some(cas) => cas.suspend().await,
                None => Ok(()),
            };
            if let Err(e) = suspended {
                tracing::warn!(resource = %name, error = %e, "cannot keep an interrupted upload");
                self.discard(&name, &session, &mut up).await;
            }
        } else {
            self.discard(&name, &session, &mut up).await;
        }
        result
    }

    /// Ends a session for good, its data deleted before the client hears back.
    async fn discard(&self, name: &str, session: &Arc<AsyncMutex<Upload>>, up: &mut Upload) {
        self.remove_session(name, session);
        up.decoder = None;
        if let Some(cas) = up.cas.take() {
            cas.discard().await;
        }
    }

    async fn pump(
        &self,
        up: &mut Upload,
        first: WriteRequest,
        stream: &mut Streaming<WriteRequest>,
        name: &str,
    ) -> Result<i64> {
        let mut msg = first;
        loop {
            if !msg.resource_name.is_empty() && msg.resource_name != name {
                return Err(Error::InvalidArgument(
                    "resource_name changed within one write stream".into(),
                ));
            }
            if msg.write_offset != up.received {
                return Err(Error::InvalidArgument(format!(
                    "write_offset {} does not match the {} bytes committed so far",
                    msg.write_offset, up.received
                )));
            }
            let len = msg.data.len() as u64;
            self.feed(up, Bytes::from(std::mem::take(&mut msg.data)))
                .await?;
            self.cache.metrics.bytes_received.inc_by(len);
            if msg.finish_write {
                self.finish_decoder(up).await?;
                let cas = up
                    .cas
                    .take()
                    .ok_or_else(|| Error::Internal("upload already finished".into()))?;
                cas.finish().await?;
                return Ok(up.received);
            }
            let stall = self.limits.stall_timeout;
            let next = tokio::time::timeout(stall, stream.message()).await.map_err(|_| {
                self.cache.metrics.stalled_streams.inc();
                Error::Aborted(format!(
                    "the client sent nothing for {} s after {} bytes (connections.stream_stall_timeout_seconds); resume with QueryWriteStatus",
                    stall.as_secs(),
                    up.received
                ))
            })?;
            msg = match next {
                Ok(Some(m)) => m,
                Ok(None) => {
                    return Err(Error::Aborted(format!(
                        "write stream ended after {} bytes without finish_write; resume with QueryWriteStatus",
                        up.received
                    )))
                }
                Err(status) => {
                    return Err(Error::Aborted(format!("write stream broke after {} bytes: {}", up.received, status.message())))
                }
            };
        }
    }

    /// Takes the message's bytes as they are: the store queues them for the disk and the
    /// hash reads them, with no copy in between.
    async fn feed(&self, up: &mut Upload, data: Bytes) -> Result<()> {
        let len = data.len() as i64;
        if up.decoder.is_none() {
            self.store_write(up.cas()?, data).await?;
        } else {
            let mut out = vec![0u8; READ_CHUNK];
            let mut input = InBuffer::around(&data);
            loop {
                let n = up.decode_step(&mut input, &mut out)?;
                self.check_decoder_memory().await?;
                self.store_write(up.cas()?, Bytes::copy_from_slice(&out[..n]))
                    .await?;
                if input.pos() == data.len() && n < out.len() {
                    break;
                }
            }
        }
        up.received += len;
        up.last_active = Instant::now();
        Ok(())
    }

    /// Writes to the store; when unfinished uploads fill it, interrupted ones make room.
    async fn store_write(&self, cas: &mut CasUpload, data: Bytes) -> Result<()> {
        loop {
            match cas.write_bytes(data.clone()).await {
                Err(lre_store::StoreError::UploadSpaceExhausted { .. })
                    if self
                        .evict_idle("store full of unfinished uploads", |u| u.cas.is_some())
                        .await => {}
                r => return r.map_err(Error::from),
            }
        }
    }

    /// Over the decoder budget, interrupted zstd uploads go first; then this one fails.
    async fn check_decoder_memory(&self) -> Result<()> {
        let limit = i64::try_from(self.limits.zstd_memory).unwrap_or(i64::MAX);
        let gauge = &self.cache.metrics.zstd_decoder_bytes;
        while gauge.get() > limit {
            if !self
                .evict_idle("zstd decoder memory", |u| u.decoder.is_some())
                .await
            {
                return Err(Error::ResourceExhausted(format!(
                    "zstd decoders of running uploads hold {} bytes, over this server's limit of {limit}; retry later",
                    gauge.get()
                )));
            }
        }
        Ok(())
    }

    /// Drains whatever the decoder still holds; the size and hash checks catch truncation.
    async fn finish_decoder(&self, up: &mut Upload) -> Result<()> {
        if up.decoder.is_none() {
            return Ok(());
        }
        let mut out = vec![0u8; READ_CHUNK];
        loop {
            let mut input = InBuffer::around(&[]);
            let n = up.decode_step(&mut input, &mut out)?;
            if n == 0 {
                return Ok(());
            }
            self.store_write(up.cas()?, Bytes::copy_from_slice(&out[..n]))
                .await?;
        }
    }
}

impl Upload {
    fn empty() -> Upload {
        Upload {
            cas: None,
            decoder: None,
            received: 0,
            last_active: Instant::now(),
        }
    }

    /// Frees everything the upload holds, waiting until its data is deleted.
    async fn discard(mut self) {
        self.decoder = None;
        if let Some(cas) = self.cas.take() {
            cas.discard().await;
        }
    }

    fn cas(&mut self) -> Result<&mut CasUpload> {
        self.cas
            .as_mut()
            .ok_or_else(|| Error::Internal("upload already finished".into()))
    }

    fn decode_step(&mut self, input: &mut InBuffer<'_>, out: &mut [u8]) -> Result<usize> {
        self.decoder
            .as_mut()
            .ok_or_else(|| Error::Internal("no decoder".into()))?
            .step(input, out)
    }
}

fn spawn_sweeper(sessions: Weak<Sessions>, ttl: Duration) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(
            (ttl / 2).clamp(Duration::from_millis(100), Duration::from_secs(30)),
        );
        loop {
            tick.tick().await;
            let Some(sessions) = sessions.upgrade() else {
                return;
            };
            let mut expired = Vec::new();
            {
                let mut map = sessions.lock();
                map.retain(|_, s| match s.try_lock() {
                    Ok(mut up) if up.last_active.elapsed() >= ttl => {
                        expired.push(std::mem::replace(&mut *up, Upload::empty()));
                        false
                    }
                    _ => true,
                });
                sessions.gauge.set(map.len() as i64);
            }
            // Outside the lock: each gives back its store reservation and decoder memory,
            // and deletes its temp file.
            for up in expired {
                up.discard().await;
            }
        }
    });
}

type ReadStream = Pin<Box<dyn Stream<Item = Result<ReadResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ByteStream for ByteStreamService {
    type ReadStream = ReadStream;

    async fn read(&self, request: Request<ReadRequest>) -> Result<Response<ReadStream>, Status> {
        let _t = self.cache.metrics.timer("Read");
        let req = request.get_ref();
        let res = parse_read(&req.resource_name)?;
        self.cache
            .authorize_grpc(&request, &res.instance, Access::Read)?;
        let size = res.digest.size as i64;
        if req.read_offset < 0 || req.read_offset > size {
            return Err(Error::OutOfRange(format!(
                "read_offset {} is outside the blob's {size} bytes",
                req.read_offset
            ))
            .into());
        }
        if req.read_limit < 0 {
            return Err(
                Error::InvalidArgument(format!("negative read_limit {}", req.read_limit)).into(),
            );
        }
        if res.compression == Compression::Zstd && req.read_limit != 0 {
            return Err(Error::InvalidArgument(
                "read_limit must be 0 when reading compressed-blobs".into(),
            )
            .into());
        }
        let offset = req.read_offset as u64;
        let mut remaining = match req.read_limit {
            0 => res.digest.size - offset,
            n => (n as u64).min(res.digest.size - offset),
        };
        // The limit goes to the store: a verifying layer must judge the whole blob before
        // the end of a range that stops short of the blob's end.
        let Some(reader) = self
            .cache
            .open_blob(&res.digest, offset, Some(remaining))
            .await?
        else {
            return Err(Error::NotFound(format!("blob {} is not in the CAS", res.digest)).into());
        };
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let metrics = self.cache.metrics.clone();
        let compression = res.compression;
        let stall = self.limits.stall_timeout;
        let digest = res.digest;
        tokio::spawn(async move {
            let mut reader = reader.take(remaining);
            let mut encoder = match compression {
                Compression::Zstd => match zstd::stream::write::Encoder::new(Vec::new(), 1) {
                    Ok(e) => Some(e),
                    Err(e) => {
                        let _ = tx.send(Err(Status::internal(format!("zstd: {e}")))).await;
                        return;
                    }
                },
                Compression::Identity => None,
            };
            loop {
                // Read straight into the message's own buffer, uninitialised: no zeroing and
                // no copy of ours between the file's reader and the response.
                let mut buf = Vec::with_capacity(READ_MESSAGE.min(remaining as usize));
                let n = match (&mut reader)
                    .take(READ_MESSAGE as u64)
                    .read_to_end(&mut buf)
                    .await
                {
                    Ok(n) => n,
                    Err(e) => {
                        let _ = tx.send(Err(Error::from(e).into())).await;
                        return;
                    }
                };
                let last = n == 0 || remaining == n as u64;
                remaining -= n as u64;
                let data = match encoder.as_mut() {
                    None => buf,
                    Some(enc) => {
                        use std::io::Write;
                        if let Err(e) = enc.write_all(&buf) {
                            let _ = tx.send(Err(Status::internal(format!("zstd: {e}")))).await;
                            return;
                        }
                        if last {
                            match encoder.take().map(|e| e.finish()) {
                                Some(Ok(v)) => v,
                                _ => {
                                    let _ =
                                        tx.send(Err(Status::internal("zstd finish failed"))).await;
                                    return;
                                }
                            }
                        } else {
                            std::mem::take(enc.get_mut())
                        }
                    }
                };
                metrics.bytes_sent.inc_by(data.len() as u64);
                if !data.is_empty() || last {
                    match tokio::time::timeout(stall, tx.send(Ok(ReadResponse { data }))).await {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) => return, // client went away
                        Err(_) => {
                            // Close the file first: the client may never come back for the
                            // error, and an open file pins an evicted blob's disk space.
                            drop(reader);
                            metrics.stalled_streams.inc();
                            tracing::info!(%digest, "ending a read whose client stopped reading");
                            let status = Status::aborted(format!(
                                "the client took nothing for {} s (connections.stream_stall_timeout_seconds); read again",
                                stall.as_secs()
                            ));
                            let _ = tx.send(Err(status)).await;
                            return;
                        }
                    }
                }
                if last {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn write(
        &self,
        request: Request<Streaming<WriteRequest>>,
    ) -> Result<Response<WriteResponse>, Status> {
        let _t = self.cache.metrics.timer("Write");
        let cred = grpc_credential(&request)?;
        let mut stream = request.into_inner();
        let first = stream
            .message()
            .await?
            .ok_or_else(|| Error::InvalidArgument("empty write stream".into()))?;
        let res = parse_write(&first.resource_name)?;
        self.cache.authorize(cred, &res.instance, Access::Upload)?;
        if self.already_stored(&res).await? {
            // The spec lets us end early: the client need not send what we have.
            return Ok(Response::new(WriteResponse {
                committed_size: Self::complete_size(&res),
            }));
        }
        match self.write_stream(first, &mut stream, &res).await {
            Ok(committed_size) => Ok(Response::new(WriteResponse { committed_size })),
            Err(e) => {
                tracing::info!(resource = %res.digest, error = %e, "write rejected");
                Err(e.into())
            }
        }
    }

    async fn query_write_status(
        &self,
        request: Request<QueryWriteStatusRequest>,
    ) -> Result<Response<QueryWriteStatusResponse>, Status> {
        let _t = self.cache.metrics.timer("QueryWriteStatus");
        let name = &request.get_ref().resource_name;
        let res = parse_write(name)?;
        self.cache
            .authorize_grpc(&request, &res.instance, Access::Upload)?;
        if self.already_stored(&res).await? {
            return Ok(Response::new(QueryWriteStatusResponse {
                committed_size: Self::complete_size(&res),
                complete: true,
            }));
        }
        let session = self.sessions.lock().get(name).cloned();
        let committed_size = match session {
            Some(s) => match s.try_lock() {
                Ok(up) if up.cas.as_ref().is_some_and(|c| c.is_torn()) => 0,
                Ok(up) => up.received,
                Err(_) => {
                    return Err(Error::Aborted(format!("{name} is being written right now")).into())
                }
            },
            // Unknown uploads restart from zero, which is what clients do on NOT_FOUND anyway.
            None => 0,
        };
        Ok(Response::new(QueryWriteStatusResponse {
            committed_size,
            complete: false,
        }))
    }
}
