//! The ContentAddressableStorage gRPC service. Every request's digests are under the
//! request's `digest_function` (SHA-256 when unset, or BLAKE3).

use std::collections::{HashSet, VecDeque};
use std::pin::Pin;
use std::sync::Arc;

use bazel_remote_apis::build::bazel::remote::execution::v2::{
    batch_read_blobs_response, batch_update_blobs_response, compressor,
    content_addressable_storage_server::ContentAddressableStorage, BatchReadBlobsRequest,
    BatchReadBlobsResponse, BatchUpdateBlobsRequest, BatchUpdateBlobsResponse, Directory,
    FindMissingBlobsRequest, FindMissingBlobsResponse, GetChunkMappingRequest,
    GetChunkMappingResponse, GetTreeRequest, GetTreeResponse, RegisterChunkMappingRequest,
    RegisterChunkMappingResponse, SpliceBlobRequest, SpliceBlobResponse, SplitBlobRequest,
    SplitBlobResponse,
};
use futures::{Stream, StreamExt};
use prost::Message;
use tonic::{Request, Response, Status};

use crate::auth::Access;
use crate::context::ServerContext;
use crate::digest::{Digest, DigestFunction};
use crate::error::{ok_rpc_status, Error, Result};

/// Batch entries in flight at once, in BatchUpdateBlobs and BatchReadBlobs.
const BATCH_PARALLELISM: usize = 16;

const DEFAULT_TREE_PAGE: usize = 1000;
const MAX_TREE_PAGE: usize = 10_000;

pub struct CasService {
    cache: Arc<ServerContext>,
}

impl CasService {
    pub fn new(cache: Arc<ServerContext>) -> Self {
        CasService { cache }
    }

    fn check_batch_size(&self, total: u64) -> Result<()> {
        let max = self.cache.max_batch_total_size_bytes;
        if total > max {
            return Err(Error::InvalidArgument(format!(
                "batch of {total} bytes exceeds max_batch_total_size_bytes ({max}); use ByteStream for large blobs"
            )));
        }
        Ok(())
    }

    /// Every directory reachable from `root`, breadth first, each listed once. Directories
    /// missing from the CAS are left out, as the spec allows. Children are under the root's
    /// digest function.
    async fn collect_tree(&self, root: Digest) -> Result<Vec<Directory>> {
        let mut out = Vec::new();
        let mut seen = HashSet::from([root]);
        let mut queue = VecDeque::from([root]);
        while let Some(d) = queue.pop_front() {
            let Some(raw) = self.cache.read_blob(&d).await? else {
                continue;
            };
            let dir = Directory::decode(raw)
                .map_err(|e| Error::InvalidArgument(format!("blob {d} is not a Directory: {e}")))?;
            for child in &dir.directories {
                if let Some(cd) = Digest::from_opt_proto(root.function, &child.digest)? {
                    if seen.insert(cd) {
                        queue.push_back(cd);
                    }
                }
            }
            out.push(dir);
        }
        Ok(out)
    }
}

fn decompress(compressor_value: i32, data: Vec<u8>, size: u64) -> Result<Vec<u8>> {
    if compressor_value == compressor::Value::Identity as i32 {
        return Ok(data);
    }
    if compressor_value != compressor::Value::Zstd as i32 {
        return Err(Error::InvalidArgument(format!(
            "compressor {compressor_value} is not supported"
        )));
    }
    // `size` is bounded by the batch limit already, so this allocation is bounded too.
    zstd::bulk::decompress(&data, size as usize + 1)
        .map_err(|e| Error::InvalidArgument(format!("corrupt zstd data: {e}")))
}

type TreeStream = Pin<Box<dyn Stream<Item = Result<GetTreeResponse, Status>> + Send>>;
type ChunkStream = Pin<Box<dyn Stream<Item = Result<GetChunkMappingResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ContentAddressableStorage for CasService {
    async fn find_missing_blobs(
        &self,
        request: Request<FindMissingBlobsRequest>,
    ) -> Result<Response<FindMissingBlobsResponse>, Status> {
        let _t = self.cache.metrics.timer("FindMissingBlobs");
        let req = request.get_ref();
        self.cache
            .authorize_grpc(&request, &req.instance_name, Access::Read)?;
        let function = DigestFunction::from_request(req.digest_function)?;
        let digests = req
            .blob_digests
            .iter()
            .map(|d| Digest::from_proto(function, d))
            .collect::<lre_store::Result<Vec<_>>>()?;
        let missing = self.cache.find_missing(&digests).await?;
        Ok(Response::new(FindMissingBlobsResponse {
            missing_blob_digests: missing.iter().map(Digest::to_proto).collect(),
        }))
    }

    async fn batch_update_blobs(
        &self,
        request: Request<BatchUpdateBlobsRequest>,
    ) -> Result<Response<BatchUpdateBlobsResponse>, Status> {
        let _t = self.cache.metrics.timer("BatchUpdateBlobs");
        self.cache
            .authorize_grpc(&request, &request.get_ref().instance_name, Access::Upload)?;
        let req = request.into_inner();
        let function = DigestFunction::from_request(req.digest_function)?;
        // Validate the whole request before storing anything, so a bad batch stores nothing.
        let mut parsed = Vec::with_capacity(req.requests.len());
        let mut total = 0u64;
        for r in &req.requests {
            let d = Digest::from_opt_proto(function, &r.digest)?
                .ok_or_else(|| Error::InvalidArgument("a batch entry has no digest".into()))?;
            total = total.saturating_add(d.size);
            parsed.push(d);
        }
        self.check_batch_size(total)?;
        // Entries are stored BATCH_PARALLELISM at a time: each one waits on the disk
        // (create, write, rename) far longer than on the CPU. Answers keep the request's order.
        let responses = futures::stream::iter(req.requests.into_iter().zip(parsed))
            .map(|(r, d)| async move {
                let outcome = match decompress(r.compressor, r.data, d.size) {
                    Ok(data) => self.cache.put_blob(&d, data.into()).await,
                    Err(e) => Err(e),
                };
                batch_update_blobs_response::Response {
                    digest: Some(d.to_proto()),
                    status: Some(match outcome {
                        Ok(()) => ok_rpc_status(),
                        Err(e) => {
                            tracing::info!(digest = %d, error = %e, "batch upload entry rejected");
                            e.to_rpc_status()
                        }
                    }),
                }
            })
            .buffered(BATCH_PARALLELISM)
            .collect()
            .await;
        Ok(Response::new(BatchUpdateBlobsResponse { responses }))
    }

    async fn batch_read_blobs(
        &self,
        request: Request<BatchReadBlobsRequest>,
    ) -> Result<Response<BatchReadBlobsResponse>, Status> {
        let _t = self.cache.metrics.timer("BatchReadBlobs");
        let req = request.get_ref();
        self.cache
            .authorize_grpc(&request, &req.instance_name, Access::Read)?;
        let function = DigestFunction::from_request(req.digest_function)?;
        let digests = req
            .digests
            .iter()
            .map(|d| Digest::from_proto(function, d))
            .collect::<lre_store::Result<Vec<_>>>()?;
        self.check_batch_size(
            digests
                .iter()
                .map(|d| d.size)
                .fold(0u64, u64::saturating_add),
        )?;
        let zstd = compressor::Value::Zstd as i32;
        let compress = req.acceptable_compressors.contains(&zstd);
        let responses = futures::stream::iter(digests)
            .map(|d| async move {
                let (data, status, comp) = match self.cache.read_blob(&d).await {
                    Ok(Some(data)) if compress => match zstd::bulk::compress(&data, 1) {
                        Ok(c) => (c, ok_rpc_status(), zstd),
                        Err(e) => (
                            vec![],
                            Error::Internal(format!("zstd: {e}")).to_rpc_status(),
                            0,
                        ),
                    },
                    Ok(Some(data)) => (data.to_vec(), ok_rpc_status(), 0),
                    Ok(None) => (
                        vec![],
                        Error::NotFound(format!("blob {d}")).to_rpc_status(),
                        0,
                    ),
                    Err(e) => (vec![], e.to_rpc_status(), 0),
                };
                batch_read_blobs_response::Response {
                    digest: Some(d.to_proto()),
                    data,
                    compressor: comp,
                    status: Some(status),
                }
            })
            .buffered(BATCH_PARALLELISM)
            .collect()
            .await;
        Ok(Response::new(BatchReadBlobsResponse { responses }))
    }

    type GetTreeStream = TreeStream;

    async fn get_tree(
        &self,
        request: Request<GetTreeRequest>,
    ) -> Result<Response<TreeStream>, Status> {
        let _t = self.cache.metrics.timer("GetTree");
        let req = request.get_ref();
        self.cache
            .authorize_grpc(&request, &req.instance_name, Access::Read)?;
        let function = DigestFunction::from_request(req.digest_function)?;
        let root = Digest::from_opt_proto(function, &req.root_digest)?
            .ok_or_else(|| Error::InvalidArgument("root_digest is required".into()))?;
        if req.page_size < 0 {
            return Err(Error::InvalidArgument("page_size must not be negative".into()).into());
        }
        let page_size = match req.page_size as usize {
            0 => DEFAULT_TREE_PAGE,
            n => n.min(MAX_TREE_PAGE),
        };
        // The page token is the index of the next directory in breadth-first order. The
        // walk is deterministic, so a token stays valid across calls and server restarts.
        let start: usize = if req.page_token.is_empty() {
            0
        } else {
            req.page_token.parse().map_err(|_| {
                Error::InvalidArgument(format!("malformed page_token {:?}", req.page_token))
            })?
        };
        let dirs = self.collect_tree(root).await?;
        if start > dirs.len() {
            return Err(Error::InvalidArgument(format!(
                "page_token {start} is past the end of the tree"
            ))
            .into());
        }
        let mut pages = Vec::new();
        let mut i = start;
        loop {
            let end = (i + page_size).min(dirs.len());
            let next = if end < dirs.len() {
                end.to_string()
            } else {
                String::new()
            };
            pages.push(Ok(GetTreeResponse {
                directories: dirs[i..end].to_vec(),
                next_page_token: next,
            }));
            i = end;
            if i >= dirs.len() {
                break;
            }
        }
        Ok(Response::new(Box::pin(futures::stream::iter(pages))))
    }

    async fn split_blob(
        &self,
        _: Request<SplitBlobRequest>,
    ) -> Result<Response<SplitBlobResponse>, Status> {
        Err(Error::Unimplemented(
            "blob splitting is not supported (split_blob_support = false)".into(),
        )
        .into())
    }

    async fn splice_blob(
        &self,
        _: Request<SpliceBlobRequest>,
    ) -> Result<Response<SpliceBlobResponse>, Status> {
        Err(Error::Unimplemented("blob splicing is not supported".into()).into())
    }

    type GetChunkMappingStream = ChunkStream;

    async fn get_chunk_mapping(
        &self,
        _: Request<GetChunkMappingRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        Err(Error::Unimplemented("chunk mappings are not supported".into()).into())
    }

    async fn register_chunk_mapping(
        &self,
        _: Request<tonic::Streaming<RegisterChunkMappingRequest>>,
    ) -> Result<Response<RegisterChunkMappingResponse>, Status> {
        Err(Error::Unimplemented("chunk mappings are not supported".into()).into())
    }
}
