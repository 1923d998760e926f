//! The ByteStream gRPC service: streaming reads and resumable, verified streaming writes.
//! Neither direction ever holds a whole blob in memory.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bazel_remote_apis::google::bytestream::{
    byte_stream_server::ByteStream, QueryWriteStatusRequest, QueryWriteStatusResponse, ReadRequest,
    ReadResponse, WriteRequest, WriteResponse,
};
use futures::Stream;
use tokio::io::AsyncReadExt;
use tokio::sync::Mutex as AsyncMutex;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};

use crate::auth::{grpc_credential, Access};
use crate::cache::Cache;
use crate::error::{Error, Result};
use crate::resource_name::{parse_read, parse_write, BlobResource, Compression};
use crate::store::CasUpload;

const READ_CHUNK: usize = 256 * 1024;

/// A partly received upload. Its bytes live in the store's temp space, not in memory.
struct Upload {
    cas: Option<CasUpload>,
    decoder: Option<Decoder<'static>>,
    /// Bytes accepted so far, in the units the client counts `write_offset` in.
    received: i64,
    last_active: Instant,
}

type Sessions = Mutex<HashMap<String, Arc<AsyncMutex<Upload>>>>;

pub struct ByteStreamService {
    cache: Arc<Cache>,
    sessions: Arc<Sessions>,
}

impl ByteStreamService {
    /// An interrupted upload stays resumable for `upload_ttl` after its last byte.
    pub fn new(cache: Arc<Cache>, upload_ttl: Duration) -> Self {
        let sessions: Arc<Sessions> = Arc::default();
        spawn_sweeper(Arc::downgrade(&sessions), upload_ttl);
        ByteStreamService { cache, sessions }
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<AsyncMutex<Upload>>>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn new_upload(&self, res: &BlobResource) -> Result<Upload> {
        let decoder = match res.compression {
            Compression::Zstd => {
                Some(Decoder::new().map_err(|e| Error::Internal(format!("zstd: {e}")))?)
            }
            Compression::Identity => None,
        };
        Ok(Upload {
            cas: Some(
                self.cache
                    .upload(res.digest.hash, Some(res.digest.size))
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
            Some(_) => self
                .sessions()
                .entry(name.clone())
                .or_insert_with(|| Arc::new(AsyncMutex::new(Upload::empty())))
                .clone(),
            None => Arc::new(AsyncMutex::new(Upload::empty())),
        };
        let mut up = session
            .try_lock_owned()
            .map_err(|_| Error::Aborted(format!("another stream is already writing {name}")))?;
        // Every way out below ends in the match, so a write that fails at its start (a bad
        // offset, a blob too big for the store) does not leave its session behind.
        let result = async {
            if first.write_offset == 0 || up.cas.is_none() {
                if first.write_offset != 0 {
                    return Err(Error::InvalidArgument(format!(
                        "write_offset {} for an upload this server has no record of; start at 0",
                        first.write_offset
                    )));
                }
                *up = self.new_upload(res).await?;
            }
            self.pump(&mut up, first, stream, &name).await
        }
        .await;
        match &result {
            // Interrupted: keep what arrived so the client can resume after QueryWriteStatus.
            Err(Error::Aborted(_)) if res.upload_id.is_some() => up.last_active = Instant::now(),
            _ => {
                self.sessions().remove(&name);
            }
        }
        result
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
            up.feed(&msg.data).await?;
            self.cache
                .metrics
                .bytes_received
                .inc_by(msg.data.len() as u64);
            if msg.finish_write {
                up.finish_decoder().await?;
                let cas = up
                    .cas
                    .take()
                    .ok_or_else(|| Error::Internal("upload already finished".into()))?;
                cas.finish().await?;
                return Ok(up.received);
            }
            msg = match stream.message().await {
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

    fn cas(&mut self) -> Result<&mut CasUpload> {
        self.cas
            .as_mut()
            .ok_or_else(|| Error::Internal("upload already finished".into()))
    }

    async fn feed(&mut self, data: &[u8]) -> Result<()> {
        if self.decoder.is_none() {
            self.cas()?.write(data).await?;
        } else {
            let mut out = vec![0u8; READ_CHUNK];
            let mut input = InBuffer::around(data);
            loop {
                let n = self.decode_step(&mut input, &mut out)?;
                self.cas()?.write(&out[..n]).await?;
                if input.pos() == data.len() && n < out.len() {
                    break;
                }
            }
        }
        self.received += data.len() as i64;
        self.last_active = Instant::now();
        Ok(())
    }

    fn decode_step(&mut self, input: &mut InBuffer<'_>, out: &mut [u8]) -> Result<usize> {
        let dec = self
            .decoder
            .as_mut()
            .ok_or_else(|| Error::Internal("no decoder".into()))?;
        let mut ob = OutBuffer::around(out);
        dec.run(input, &mut ob)
            .map_err(|e| Error::InvalidArgument(format!("corrupt zstd stream: {e}")))?;
        Ok(ob.pos())
    }

    /// Drains whatever the decoder still holds; the size and hash checks catch truncation.
    async fn finish_decoder(&mut self) -> Result<()> {
        if self.decoder.is_none() {
            return Ok(());
        }
        let mut out = vec![0u8; READ_CHUNK];
        loop {
            let mut input = InBuffer::around(&[]);
            let n = self.decode_step(&mut input, &mut out)?;
            if n == 0 {
                return Ok(());
            }
            self.cas()?.write(&out[..n]).await?;
        }
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
            let mut map = sessions.lock().unwrap_or_else(|p| p.into_inner());
            // Dropping an abandoned upload deletes its temp file.
            map.retain(|_, s| match s.try_lock() {
                Ok(up) => up.last_active.elapsed() < ttl,
                Err(_) => true,
            });
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
        let Some(reader) = self.cache.open_blob(&res.digest, offset).await? else {
            return Err(Error::NotFound(format!("blob {} is not in the CAS", res.digest)).into());
        };
        let mut remaining = match req.read_limit {
            0 => res.digest.size - offset,
            n => (n as u64).min(res.digest.size - offset),
        };
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let metrics = self.cache.metrics.clone();
        let compression = res.compression;
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
            let mut buf = vec![0u8; READ_CHUNK];
            loop {
                let n = match reader.read(&mut buf).await {
                    Ok(n) => n,
                    Err(e) => {
                        let _ = tx.send(Err(Error::from(e).into())).await;
                        return;
                    }
                };
                let last = n == 0 || remaining == n as u64;
                remaining -= n as u64;
                let data = match encoder.as_mut() {
                    None => buf[..n].to_vec(),
                    Some(enc) => {
                        use std::io::Write;
                        if let Err(e) = enc.write_all(&buf[..n]) {
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
                if (!data.is_empty() || last) && tx.send(Ok(ReadResponse { data })).await.is_err() {
                    return; // client went away
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
        let session = self.sessions().get(name).cloned();
        let committed_size = match session {
            Some(s) => match s.try_lock() {
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
