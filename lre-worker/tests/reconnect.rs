//! A worker outlives its scheduler: when the server restarts, the worker reconnects with
//! backoff, registers again, and runs the new server's actions.

use std::time::Duration;

use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use bazel_remote_apis::google::longrunning::operation;
use lre_worker::cas::digest_of;
use prost::Message;
use re::content_addressable_storage_client::ContentAddressableStorageClient;
use re::execution_client::ExecutionClient;
use tonic::transport::Channel;

const WORKER_SECRET: &str = "reconnect-test-worker-secret";

async fn server(addr: std::net::SocketAddr) -> lre_server::RunningServer {
    let mut c = lre_server::Config {
        grpc_listen: addr,
        ..lre_server::Config::ephemeral()
    };
    c.execution.enabled = true;
    c.auth
        .tokens
        .push(lre_server::auth::TokenConfig::for_secret(
            "w",
            WORKER_SECRET,
            lre_server::auth::Scope::Worker,
        ));
    c.execution.keepalive_seconds = 1;
    c.shutdown_grace_seconds = 1;
    lre_server::start(c).await.unwrap()
}

/// Polls (bounded) until the server's scheduler has `n` workers.
async fn wait_workers(s: &lre_server::RunningServer, n: usize) -> bool {
    let sched = s.scheduler.clone().unwrap();
    for _ in 0..300 {
        if sched.worker_count() == n {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

async fn run_true(s: &lre_server::RunningServer) -> i32 {
    let ch = Channel::from_shared(format!("http://{}", s.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let cmd = re::Command {
        arguments: vec!["/bin/true".into()],
        ..Default::default()
    }
    .encode_to_vec();
    let root = re::Directory::default().encode_to_vec();
    let act = re::Action {
        command_digest: Some(digest_of(&cmd)),
        input_root_digest: Some(digest_of(&root)),
        ..Default::default()
    }
    .encode_to_vec();
    let requests = [cmd, act.clone()]
        .into_iter()
        .map(|b| re::batch_update_blobs_request::Request {
            digest: Some(digest_of(&b)),
            data: b,
            compressor: 0,
        })
        .collect();
    ContentAddressableStorageClient::new(ch.clone())
        .batch_update_blobs(re::BatchUpdateBlobsRequest {
            requests,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut ops = ExecutionClient::new(ch)
        .execute(re::ExecuteRequest {
            action_digest: Some(digest_of(&act)),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut last = None;
    while let Some(op) = ops.message().await.unwrap() {
        last = Some(op);
    }
    match last.and_then(|o| o.result) {
        Some(operation::Result::Response(a)) => {
            re::ExecuteResponse::decode(&a.value[..])
                .unwrap()
                .result
                .unwrap()
                .exit_code
        }
        other => panic!("no result: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_reconnects_after_a_server_restart() {
    let first = server("127.0.0.1:0".parse().unwrap()).await;
    let addr = first.grpc_addr;
    let work = tempfile::tempdir().unwrap();
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let mut opts = lre_worker::WorkerOptions::local(
        format!("http://{addr}"),
        "w".into(),
        work.path().to_path_buf(),
        vec![],
    );
    opts.credential = lre_worker::Credential::bearer(WORKER_SECRET).unwrap();
    let worker = tokio::spawn(lre_worker::run(opts, shutdown));
    assert!(wait_workers(&first, 1).await, "worker never registered");
    assert_eq!(run_true(&first).await, 0);
    first.shutdown().await;

    // Same address, brand-new scheduler: nothing but the worker's own retries brings it back.
    let second = server(addr).await;
    assert!(
        wait_workers(&second, 1).await,
        "worker did not reconnect to the restarted server"
    );
    assert_eq!(run_true(&second).await, 0);
    let _ = stop.send(true);
    worker.await.unwrap().unwrap();
    second.shutdown().await;
}
