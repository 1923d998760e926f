//! Shared test harness: real servers on 127.0.0.1 port 0, real tonic and HTTP clients.
#![allow(dead_code, unused_imports)]

use std::net::SocketAddr;
use std::path::Path;

use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use bazel_remote_apis::google::bytestream::{
    byte_stream_client::ByteStreamClient, ReadRequest, WriteRequest, WriteResponse,
};
use lre_server::auth::{Scope, TokenConfig};
use lre_server::config::{Config, StoreConfig};
use lre_server::RunningServer;
use sha2::{Digest as _, Sha256};
use tonic::transport::Channel;
use tonic::{Request, Status};

pub use re::action_cache_client::ActionCacheClient;
pub use re::capabilities_client::CapabilitiesClient;
pub use re::content_addressable_storage_client::ContentAddressableStorageClient as CasClient;

pub fn loopback0() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

pub fn memory_config() -> Config {
    let mut c = Config {
        grpc_listen: loopback0(),
        http_listen: Some(loopback0()),
        ..Config::default()
    };
    c.store = StoreConfig::memory(1 << 30);
    c
}

pub fn fs_config(dir: &Path, max: u64) -> Config {
    let mut c = memory_config();
    c.store = StoreConfig::filesystem(Some(dir.to_path_buf()), max);
    c
}

pub fn token(name: &str, secret: &str, scope: Scope, instances: Option<Vec<&str>>) -> TokenConfig {
    TokenConfig {
        instances: instances.map(|v| v.into_iter().map(String::from).collect()),
        ..TokenConfig::for_secret(name, secret, scope)
    }
}

pub async fn start(config: Config) -> RunningServer {
    lre_server::start(config).await.expect("server starts")
}

pub async fn channel(s: &RunningServer) -> Channel {
    Channel::from_shared(format!("http://{}", s.grpc_addr))
        .unwrap()
        .connect()
        .await
        .expect("connect")
}

pub fn http_url(s: &RunningServer) -> String {
    format!("http://{}", s.http_addr.expect("http port"))
}

pub fn digest(data: &[u8]) -> re::Digest {
    re::Digest {
        hash: hex::encode(Sha256::digest(data)),
        size_bytes: data.len() as i64,
    }
}

pub fn hash_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

use lre_test_support::noise;

/// Deterministic pseudo-random bytes (incompressible enough to exercise zstd honestly).
pub fn blob(len: usize, seed: u64) -> Vec<u8> {
    noise::noise(len, seed)
}

pub fn authed<T>(msg: T, bearer: Option<&str>) -> Request<T> {
    let mut r = Request::new(msg);
    if let Some(t) = bearer {
        r.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    r
}

pub fn upload_name(instance: &str, uuid: &str, data: &[u8]) -> String {
    let d = digest(data);
    let prefix = if instance.is_empty() {
        String::new()
    } else {
        format!("{instance}/")
    };
    format!("{prefix}uploads/{uuid}/blobs/{}/{}", d.hash, d.size_bytes)
}

pub fn read_name(instance: &str, data: &[u8]) -> String {
    let d = digest(data);
    let prefix = if instance.is_empty() {
        String::new()
    } else {
        format!("{instance}/")
    };
    format!("{prefix}blobs/{}/{}", d.hash, d.size_bytes)
}

/// Builds the write requests for `data` in `chunk`-sized messages starting at `offset`.
pub fn write_requests(
    name: &str,
    data: &[u8],
    chunk: usize,
    offset: usize,
    finish: bool,
) -> Vec<WriteRequest> {
    let mut out = Vec::new();
    let mut pos = offset;
    loop {
        let end = (pos + chunk).min(data.len());
        let last = end == data.len();
        out.push(WriteRequest {
            resource_name: if out.is_empty() {
                name.to_string()
            } else {
                String::new()
            },
            write_offset: pos as i64,
            finish_write: last && finish,
            data: data[pos..end].to_vec(),
        });
        pos = end;
        if last {
            return out;
        }
    }
}

pub async fn bs_write(
    ch: Channel,
    reqs: Vec<WriteRequest>,
    bearer: Option<&str>,
) -> Result<WriteResponse, Status> {
    let mut c = ByteStreamClient::new(ch).max_decoding_message_size(64 << 20);
    c.write(authed(tokio_stream::iter(reqs), bearer))
        .await
        .map(|r| r.into_inner())
}

pub async fn bs_read(
    ch: Channel,
    name: &str,
    offset: i64,
    limit: i64,
    bearer: Option<&str>,
) -> Result<Vec<u8>, Status> {
    let mut c = ByteStreamClient::new(ch).max_decoding_message_size(64 << 20);
    let mut s = c
        .read(authed(
            ReadRequest {
                resource_name: name.into(),
                read_offset: offset,
                read_limit: limit,
            },
            bearer,
        ))
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(m) = s.message().await? {
        out.extend_from_slice(&m.data);
    }
    Ok(out)
}

pub async fn find_missing(
    ch: Channel,
    instance: &str,
    digests: Vec<re::Digest>,
) -> Vec<re::Digest> {
    CasClient::new(ch)
        .find_missing_blobs(re::FindMissingBlobsRequest {
            instance_name: instance.into(),
            blob_digests: digests,
            digest_function: 0,
        })
        .await
        .expect("FindMissingBlobs")
        .into_inner()
        .missing_blob_digests
}

pub async fn batch_put(
    ch: Channel,
    instance: &str,
    blobs: &[&[u8]],
    bearer: Option<&str>,
) -> Result<Vec<i32>, Status> {
    let req = re::BatchUpdateBlobsRequest {
        instance_name: instance.into(),
        requests: blobs
            .iter()
            .map(|b| re::batch_update_blobs_request::Request {
                digest: Some(digest(b)),
                data: b.to_vec(),
                compressor: 0,
            })
            .collect(),
        digest_function: 0,
    };
    let resp = CasClient::new(ch)
        .batch_update_blobs(authed(req, bearer))
        .await?
        .into_inner();
    Ok(resp
        .responses
        .iter()
        .map(|r| r.status.as_ref().map(|s| s.code).unwrap_or(-1))
        .collect())
}

/// An ActionResult whose one output file and stdout are `out` and `stdout`.
pub fn action_result(out: &[u8], stdout: &[u8]) -> re::ActionResult {
    re::ActionResult {
        output_files: vec![re::OutputFile {
            path: "out/file".into(),
            digest: Some(digest(out)),
            is_executable: false,
            ..Default::default()
        }],
        stdout_digest: Some(digest(stdout)),
        exit_code: 0,
        ..Default::default()
    }
}

pub async fn update_ac(
    ch: Channel,
    instance: &str,
    action: &re::Digest,
    r: re::ActionResult,
    bearer: Option<&str>,
) -> Result<(), Status> {
    ActionCacheClient::new(ch)
        .update_action_result(authed(
            re::UpdateActionResultRequest {
                instance_name: instance.into(),
                action_digest: Some(action.clone()),
                action_result: Some(r),
                results_cache_policy: None,
                digest_function: 0,
            },
            bearer,
        ))
        .await
        .map(|_| ())
}

pub async fn get_ac(
    ch: Channel,
    instance: &str,
    action: &re::Digest,
    bearer: Option<&str>,
) -> Result<re::ActionResult, Status> {
    ActionCacheClient::new(ch)
        .get_action_result(authed(
            re::GetActionResultRequest {
                instance_name: instance.into(),
                action_digest: Some(action.clone()),
                inline_stdout: false,
                inline_stderr: false,
                inline_output_files: vec![],
                digest_function: 0,
            },
            bearer,
        ))
        .await
        .map(|r| r.into_inner())
}
