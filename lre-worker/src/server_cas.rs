//! The server's CAS, as the worker uses it: batch and streamed reads of inputs, and uploads
//! of outputs the server lacks. Every read is bounded by the digest it asked for.

use std::path::PathBuf;

use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use bazel_remote_apis::google::bytestream::{
    byte_stream_client::ByteStreamClient, ReadRequest, WriteRequest,
};
use re::content_addressable_storage_client::ContentAddressableStorageClient;
use tokio::io::AsyncReadExt;

use crate::client::ServerChannel;
use crate::error::{Result, WorkerError};

/// Blobs up to this size travel in batch calls; larger ones over ByteStream.
pub const BATCH_BLOB: i64 = 1 << 20;
pub const BATCH_TOTAL: i64 = 3 << 20;
const CHUNK: usize = 1 << 20;
/// A read that sends nothing for this long is given up: a stalled stream must not hold
/// the local cache's room, and the action, forever.
const STALL: std::time::Duration = std::time::Duration::from_secs(60);

type ReadStream = tonic::Streaming<bazel_remote_apis::google::bytestream::ReadResponse>;

/// A failed read of `d`: NOT_FOUND is a missing input (the client uploads it again), and
/// DATA_LOSS (a server verifying what it serves) corrupt content; anything else (the
/// server away, the worker's credential refused) is the server's trouble, not the
/// action's, and goes to the client as UNAVAILABLE (`WorkerError::code`), which it retries.
fn read_failed(d: &re::Digest, status: tonic::Status) -> WorkerError {
    match status.code() {
        tonic::Code::NotFound => WorkerError::missing(d, &format!(": {}", status.message())),
        tonic::Code::DataLoss => WorkerError::Corrupt(format!(
            "input blob {}/{}: {}",
            d.hash,
            d.size_bytes,
            status.message()
        )),
        _ => WorkerError::Rpc(status),
    }
}

/// `call`, given up after STALL: a server that accepts a read and never answers must not
/// hold the action forever.
async fn bounded<T>(
    what: &str,
    call: impl std::future::Future<Output = std::result::Result<T, tonic::Status>>,
) -> std::result::Result<T, tonic::Status> {
    match tokio::time::timeout(STALL, call).await {
        Ok(r) => r,
        Err(_) => Err(tonic::Status::unavailable(format!(
            "{what}: no answer for {} s",
            STALL.as_secs()
        ))),
    }
}

#[derive(Clone)]
pub struct ServerCas {
    channel: ServerChannel,
}

impl ServerCas {
    pub fn new(channel: ServerChannel) -> ServerCas {
        ServerCas { channel }
    }

    /// One BatchReadBlobs call; a blob the CAS does not have is a missing input.
    pub async fn batch_read(
        &self,
        instance: &str,
        digests: Vec<re::Digest>,
    ) -> Result<Vec<(re::Digest, Vec<u8>)>> {
        let mut client = ContentAddressableStorageClient::new(self.channel.clone())
            .max_decoding_message_size(64 << 20);
        let call = client.batch_read_blobs(re::BatchReadBlobsRequest {
            instance_name: instance.into(),
            digests,
            ..Default::default()
        });
        let resp = bounded("reading input blobs", call).await?.into_inner();
        let mut out = Vec::with_capacity(resp.responses.len());
        for r in resp.responses {
            let d = r.digest.unwrap_or_default();
            if let Some(s) = r.status.filter(|s| s.code != 0) {
                let status = tonic::Status::new(tonic::Code::from_i32(s.code), s.message);
                return Err(read_failed(&d, status));
            }
            out.push((d, r.data));
        }
        Ok(out)
    }

    pub async fn open_read(&self, instance: &str, d: &re::Digest) -> Result<ReadStream> {
        let name = format!(
            "{}{}blobs/{}/{}",
            instance,
            if instance.is_empty() { "" } else { "/" },
            d.hash,
            d.size_bytes
        );
        let mut client = ByteStreamClient::new(self.channel.clone());
        let call = client.read(ReadRequest {
            resource_name: name,
            read_offset: 0,
            read_limit: 0,
        });
        Ok(bounded("reading an input blob", call)
            .await
            .map_err(|e| read_failed(d, e))?
            .into_inner())
    }

    /// The next chunk of a read of `d`, or None at its end; a stall past STALL is an error.
    pub async fn next_chunk(
        s: &mut ReadStream,
        d: &re::Digest,
    ) -> Result<Option<bazel_remote_apis::google::bytestream::ReadResponse>> {
        let what = format!("reading input blob {}/{}", d.hash, d.size_bytes);
        bounded(&what, s.message())
            .await
            .map_err(|e| read_failed(d, e))
    }

    /// Reads a blob of bounded size (a Directory message) over ByteStream, into memory:
    /// what arrives past the digest's size is refused, not buffered.
    pub async fn read_whole(&self, instance: &str, d: &re::Digest) -> Result<Vec<u8>> {
        let mut s = self.open_read(instance, d).await?;
        let mut out = Vec::new();
        while let Some(m) = Self::next_chunk(&mut s, d).await? {
            if out.len() + m.data.len() > d.size_bytes as usize {
                return Err(WorkerError::Corrupt(format!(
                    "the CAS sent more than the {} bytes of {}",
                    d.size_bytes, d.hash
                )));
            }
            out.extend_from_slice(&m.data);
        }
        Ok(out)
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
