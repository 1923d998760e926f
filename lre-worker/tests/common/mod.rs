//! What the worker's integration tests share: a client that uploads an action and
//! executes it, and a bounded wait for workers to attach.
#![allow(dead_code)] // each test binary uses its own subset

pub mod proxy;
pub mod runner_env;

use std::time::Duration;

use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use bazel_remote_apis::google::longrunning::operation;
use lre_worker::cas::digest_of;
use prost::Message;
use re::content_addressable_storage_client::ContentAddressableStorageClient;
use re::execution_client::ExecutionClient;
use tonic::transport::Channel;

/// `msg` with `authorization: Bearer SECRET`, or anonymous for `None`.
pub fn authed<T>(msg: T, secret: Option<&str>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Some(s) = secret {
        r.metadata_mut()
            .insert("authorization", format!("Bearer {s}").parse().unwrap());
    }
    r
}

/// A server with execution on and one in-process worker (real bubblewrap) attached with a
/// worker token; stopped when dropped.
pub struct WithWorker {
    pub server: lre_server::RunningServer,
    pub channel: tonic::transport::Channel,
    pub work: tempfile::TempDir,
    stop: tokio::sync::watch::Sender<bool>,
    worker: Option<tokio::task::JoinHandle<Result<(), lre_worker::error::WorkerError>>>,
}

const ATTACHED_WORKER_SECRET: &str = "attached-worker-test-secret-000001";

/// Starts a server and a worker `id` with `capacity` slots, and waits until it attached.
pub async fn with_worker(id: &str, capacity: u32) -> WithWorker {
    let mut c = lre_server::Config::ephemeral();
    c.execution.enabled = true;
    c.auth
        .tokens
        .push(lre_server::auth::TokenConfig::for_secret(
            "workers",
            ATTACHED_WORKER_SECRET,
            lre_server::auth::Scope::Worker,
        ));
    let server = lre_server::start(c).await.expect("the server starts");
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", server.grpc_addr))
        .expect("an address")
        .connect()
        .await
        .expect("connecting");
    let work = tempfile::tempdir().expect("a work dir");
    let mut opts = lre_worker::WorkerOptions::local(
        format!("http://{}", server.grpc_addr),
        id.into(),
        work.path().to_path_buf(),
        vec![],
        lre_worker::default_ro_paths(),
    );
    opts.connection.capacity = capacity;
    opts.credential = lre_worker::Credential::bearer(ATTACHED_WORKER_SECRET).expect("a token");
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let worker = tokio::spawn(lre_worker::run(opts, shutdown));
    if !wait_workers(&server, 1).await {
        let ended = tokio::time::timeout(Duration::from_secs(1), worker).await;
        panic!("the worker did not attach: {ended:?}");
    }
    WithWorker {
        server,
        channel,
        work,
        stop,
        worker: Some(worker),
    }
}

impl WithWorker {
    /// Stops the worker (bounded) and then the server.
    pub async fn shut_down(mut self) {
        let _ = self.stop.send(true);
        if let Some(w) = self.worker.take() {
            let _ = tokio::time::timeout(Duration::from_secs(60), w).await;
        }
        self.server.shutdown().await;
    }
}

/// Polls (bounded) until the server's scheduler has `n` workers.
pub async fn wait_workers(s: &lre_server::RunningServer, n: usize) -> bool {
    let sched = s.scheduler.clone().unwrap();
    for _ in 0..300 {
        if sched.worker_count() == n {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// One action to run: `argv` with PATH=/usr/bin:/bin in an input root holding `in.txt`.
pub struct Exec<'a> {
    pub instance: &'a str,
    pub argv: &'a [&'a str],
    pub input: &'a [u8],
    pub secret: Option<&'a str>,
    /// Sent as RequestMetadata (tool invocation id, mnemonic), as Bazel does.
    pub invocation: Option<&'a str>,
}

/// `msg` with the credential and, if given, Bazel's RequestMetadata for `invocation`.
pub fn with_metadata<T>(
    msg: T,
    secret: Option<&str>,
    invocation: Option<&str>,
) -> tonic::Request<T> {
    let mut r = authed(msg, secret);
    if let Some(id) = invocation {
        let m = re::RequestMetadata {
            tool_invocation_id: id.into(),
            action_mnemonic: "Genrule".into(),
            target_id: "//test:action".into(),
            tool_details: Some(re::ToolDetails {
                tool_name: "test".into(),
                tool_version: "1".into(),
            }),
            ..Default::default()
        };
        r.metadata_mut().insert_bin(
            "build.bazel.remote.execution.v2.requestmetadata-bin",
            tonic::metadata::MetadataValue::from_bytes(&m.encode_to_vec()),
        );
    }
    r
}

/// Uploads `blobs` to the CAS of `instance` in one batch.
pub async fn upload(
    ch: &Channel,
    instance: &str,
    secret: Option<&str>,
    blobs: impl IntoIterator<Item = Vec<u8>>,
) -> Result<(), tonic::Status> {
    let requests = blobs
        .into_iter()
        .map(|b| re::batch_update_blobs_request::Request {
            digest: Some(digest_of(&b)),
            data: b,
            compressor: 0,
        })
        .collect();
    let answer = ContentAddressableStorageClient::new(ch.clone())
        .batch_update_blobs(authed(
            re::BatchUpdateBlobsRequest {
                instance_name: instance.into(),
                requests,
                ..Default::default()
            },
            secret,
        ))
        .await?
        .into_inner();
    // Each blob has its own status: the call can succeed while a blob was not stored.
    for r in answer.responses {
        if let Some(st) = r.status.filter(|st| st.code != 0) {
            return Err(tonic::Status::new(st.code.into(), st.message));
        }
    }
    Ok(())
}

/// Uploads the action and everything it needs; its digest.
pub async fn prepare(ch: &Channel, e: &Exec<'_>) -> Result<re::Digest, tonic::Status> {
    prepare_with(ch, e, false).await
}

/// `prepare`, for an action whose result the server caches (`cached`) or not.
pub async fn prepare_with(
    ch: &Channel,
    e: &Exec<'_>,
    cached: bool,
) -> Result<re::Digest, tonic::Status> {
    let cmd = re::Command {
        arguments: e.argv.iter().map(|a| a.to_string()).collect(),
        environment_variables: vec![re::command::EnvironmentVariable {
            name: "PATH".into(),
            value: "/usr/bin:/bin".into(),
        }],
        ..Default::default()
    }
    .encode_to_vec();
    let root = re::Directory {
        files: vec![re::FileNode {
            name: "in.txt".into(),
            digest: Some(digest_of(e.input)),
            ..Default::default()
        }],
        ..Default::default()
    }
    .encode_to_vec();
    let act = re::Action {
        command_digest: Some(digest_of(&cmd)),
        input_root_digest: Some(digest_of(&root)),
        do_not_cache: !cached,
        ..Default::default()
    }
    .encode_to_vec();
    upload(
        ch,
        e.instance,
        e.secret,
        [cmd, root, act.clone(), e.input.to_vec()],
    )
    .await?;
    Ok(digest_of(&act))
}

/// Uploads the action and executes it uncached; the final ExecuteResponse, or the status
/// the call or the operation ended with.
pub async fn execute(ch: &Channel, e: Exec<'_>) -> Result<re::ExecuteResponse, tonic::Status> {
    execute_with(ch, e, false).await.map(|(r, _)| r)
}

/// `execute`, for an action whose result the server caches (`cached`) or not; with the
/// action's digest.
pub async fn execute_with(
    ch: &Channel,
    e: Exec<'_>,
    cached: bool,
) -> Result<(re::ExecuteResponse, re::Digest), tonic::Status> {
    let action = prepare_with(ch, &e, cached).await?;
    let mut ops = ExecutionClient::new(ch.clone())
        .execute(with_metadata(
            re::ExecuteRequest {
                instance_name: e.instance.into(),
                action_digest: Some(action.clone()),
                skip_cache_lookup: true,
                ..Default::default()
            },
            e.secret,
            e.invocation,
        ))
        .await?
        .into_inner();
    let mut last = None;
    while let Some(op) = ops.message().await? {
        last = Some(op);
    }
    outcome(last).map(|r| (r, action))
}

/// The ExecuteResponse a finished operation holds, or the status it ended with.
pub fn outcome(
    last: Option<bazel_remote_apis::google::longrunning::Operation>,
) -> Result<re::ExecuteResponse, tonic::Status> {
    match last.and_then(|o| o.result) {
        Some(operation::Result::Response(a)) => re::ExecuteResponse::decode(&a.value[..])
            .map_err(|err| tonic::Status::internal(err.to_string())),
        Some(operation::Result::Error(s)) => Err(tonic::Status::new(s.code.into(), s.message)),
        None => Err(tonic::Status::internal(
            "the operation ended without a result",
        )),
    }
}

/// The action's stdout, after checking it exited 0.
pub async fn stdout_of(
    ch: &Channel,
    instance: &str,
    secret: Option<&str>,
    r: &re::ExecuteResponse,
) -> String {
    let res = r.result.as_ref().expect("a result");
    assert_eq!(res.exit_code, 0, "status {:?}, result {res:?}", r.status);
    if !res.stdout_raw.is_empty() {
        return String::from_utf8_lossy(&res.stdout_raw).into_owned();
    }
    let Some(d) = res.stdout_digest.clone() else {
        return String::new();
    };
    let got = ContentAddressableStorageClient::new(ch.clone())
        .batch_read_blobs(authed(
            re::BatchReadBlobsRequest {
                instance_name: instance.into(),
                digests: vec![d],
                ..Default::default()
            },
            secret,
        ))
        .await
        .unwrap()
        .into_inner();
    String::from_utf8_lossy(&got.responses[0].data).into_owned()
}
