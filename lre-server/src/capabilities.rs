//! The Capabilities gRPC service.

use std::sync::Arc;

use bazel_remote_apis::build::bazel::remote::execution::v2::{
    capabilities_server::Capabilities, compressor, digest_function, symlink_absolute_path_strategy,
    ActionCacheUpdateCapabilities, CacheCapabilities, ExecutionCapabilities,
    GetCapabilitiesRequest, ServerCapabilities,
};
use bazel_remote_apis::build::bazel::semver::SemVer;
use tonic::{Request, Response, Status};

use crate::auth::Access;
use crate::context::ServerContext;

pub struct CapabilitiesService {
    cache: Arc<ServerContext>,
    exec_enabled: bool,
}

impl CapabilitiesService {
    /// `exec_enabled` must be true only when an execution service is really being served.
    pub fn new(cache: Arc<ServerContext>, exec_enabled: bool) -> Self {
        CapabilitiesService {
            cache,
            exec_enabled,
        }
    }
}

fn semver(major: i32, minor: i32) -> Option<SemVer> {
    Some(SemVer {
        major,
        minor,
        patch: 0,
        prerelease: String::new(),
    })
}

#[tonic::async_trait]
impl Capabilities for CapabilitiesService {
    async fn get_capabilities(
        &self,
        request: Request<GetCapabilitiesRequest>,
    ) -> Result<Response<ServerCapabilities>, Status> {
        let _t = self.cache.metrics.timer("GetCapabilities");
        let instance = &request.get_ref().instance_name;
        let principal = self
            .cache
            .authorize_grpc(&request, instance, Access::Read)?;
        let sha256 = digest_function::Value::Sha256 as i32;
        // The cache speaks both; remote execution only SHA-256 (its workers hash with it).
        let cache_functions = crate::digest::DigestFunction::ALL.map(|f| f.to_proto());
        let zstd = compressor::Value::Zstd as i32;
        Ok(Response::new(ServerCapabilities {
            cache_capabilities: Some(CacheCapabilities {
                digest_functions: cache_functions.to_vec(),
                action_cache_update_capabilities: Some(ActionCacheUpdateCapabilities {
                    // False for a read token, and for every client of an
                    // executed-only instance: Bazel then refuses to start a build that
                    // would upload results, rather than fail uploading them.
                    update_enabled: self.cache.may_update_results(&principal, instance),
                }),
                cache_priority_capabilities: None,
                max_batch_total_size_bytes: self.cache.max_batch_total_size_bytes as i64,
                symlink_absolute_path_strategy: symlink_absolute_path_strategy::Value::Allowed
                    as i32,
                supported_compressors: vec![zstd],
                supported_batch_update_compressors: vec![zstd],
                max_cas_blob_size_bytes: self.cache.store.capacity() as i64,
                ..Default::default()
            }),
            execution_capabilities: Some(ExecutionCapabilities {
                digest_function: sha256,
                exec_enabled: self.exec_enabled,
                digest_functions: vec![sha256],
                ..Default::default()
            }),
            deprecated_api_version: None,
            // 2.0 is what Bazel 4 speaks; through 2.3 we honour compressed blobs,
            // batch compression and per-request digest_function fields.
            low_api_version: semver(2, 0),
            high_api_version: semver(2, 3),
        }))
    }
}
