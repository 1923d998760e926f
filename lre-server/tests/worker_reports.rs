//! What the server makes of a worker's report, with a worker that speaks the protocol by
//! hand (as any worker, buggy or hostile, could). A report of UNAVAILABLE (the worker could
//! not fetch inputs or upload outputs: the storage did not answer) or of CANCELLED that the
//! server never asked for (the worker is shutting down) is not the action's result: the
//! action gets another attempt, and fails with a clear error only once its attempts are
//! used up. The kill-anything test found both: each failed a client's Execute after one
//! passing failure.

mod common;

use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use bazel_remote_apis::google::longrunning::{operation, Operation};
use common::*;
use lre_worker_protocol::v1::{
    server_message, worker_message, worker_service_client::WorkerServiceClient, ActionFinished,
    Register, RunAction, WorkerMessage,
};
use prost::Message;
use re::execution_client::ExecutionClient;
use tokio::sync::mpsc;
use tonic::Code;

const WORKER: &str = "worker-reports-test-secret-0000001";

/// Uploads an uncached action (its bytes named by `n`); its digest.
async fn action(ch: &tonic::transport::Channel, n: u32) -> re::Digest {
    let command = re::Command {
        arguments: vec!["/bin/true".into(), n.to_string()],
        ..Default::default()
    }
    .encode_to_vec();
    let root = re::Directory::default().encode_to_vec();
    let action = re::Action {
        command_digest: Some(digest(&command)),
        input_root_digest: Some(digest(&root)),
        do_not_cache: true,
        ..Default::default()
    }
    .encode_to_vec();
    batch_put(ch.clone(), "", &[&action, &command, &root], None)
        .await
        .unwrap();
    digest(&action)
}

/// Executes `action` to its end; the final operation.
async fn execute(ch: tonic::transport::Channel, action: re::Digest) -> Operation {
    let mut s = ExecutionClient::new(ch)
        .execute(re::ExecuteRequest {
            action_digest: Some(action),
            skip_cache_lookup: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut last = None;
    while let Some(op) = s.message().await.unwrap() {
        last = Some(op);
    }
    last.unwrap()
}

struct HandWorker {
    tx: mpsc::Sender<WorkerMessage>,
    inbound: tonic::Streaming<lre_worker_protocol::v1::ServerMessage>,
}

impl HandWorker {
    async fn attach(ch: &tonic::transport::Channel) -> HandWorker {
        let (tx, rx) = mpsc::channel(16);
        tx.send(WorkerMessage {
            message: Some(worker_message::Message::Register(Register {
                worker_id: "by-hand".into(),
                properties: vec![],
                capacity: 1,
            })),
        })
        .await
        .unwrap();
        let req = authed(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            Some(WORKER),
        );
        let mut inbound = WorkerServiceClient::new(ch.clone())
            .attach(req)
            .await
            .unwrap()
            .into_inner();
        let first = inbound.message().await.unwrap().unwrap();
        assert!(matches!(
            first.message,
            Some(server_message::Message::Registered(_))
        ));
        HandWorker { tx, inbound }
    }

    async fn next_run(&mut self) -> RunAction {
        loop {
            let m =
                tokio::time::timeout(std::time::Duration::from_secs(20), self.inbound.message())
                    .await
                    .expect("a RunAction in time")
                    .unwrap()
                    .unwrap();
            if let Some(server_message::Message::Run(r)) = m.message {
                return r;
            }
        }
    }

    async fn report(
        &self,
        run: &RunAction,
        code: Code,
        message: &str,
        result: Option<re::ActionResult>,
    ) {
        self.tx
            .send(WorkerMessage {
                message: Some(worker_message::Message::Finished(ActionFinished {
                    operation: run.operation.clone(),
                    status_code: code as i32,
                    status_message: message.into(),
                    result: result.map(|r| r.encode_to_vec()).unwrap_or_default(),
                    missing_blobs: vec![],
                })),
            })
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn a_passing_failure_of_a_worker_is_another_attempt_not_the_result() {
    let mut c = memory_config();
    c.execution.enabled = true;
    c.execution.max_attempts = 2;
    c.auth
        .tokens
        .push(token("w", WORKER, lre_server::auth::Scope::Worker, None));
    let s = start(c).await;
    let ch = channel(&s).await;
    let mut w = HandWorker::attach(&ch).await;

    // UNAVAILABLE, then a result: the client gets the result.
    let a = action(&ch, 1).await;
    let exec = tokio::spawn(execute(ch.clone(), a));
    let run = w.next_run().await;
    assert_eq!(run.attempt, 1);
    w.report(
        &run,
        Code::Unavailable,
        "fetching inputs: the storage did not answer",
        None,
    )
    .await;
    let run = w.next_run().await;
    assert_eq!(run.attempt, 2, "the action was not tried again");
    let ok = re::ActionResult {
        exit_code: 0,
        stdout_raw: b"second attempt".to_vec(),
        ..Default::default()
    };
    w.report(&run, Code::Ok, "", Some(ok.clone())).await;
    let op = exec.await.unwrap();
    match op.result {
        Some(operation::Result::Response(any)) => {
            let r = re::ExecuteResponse::decode(&any.value[..]).unwrap();
            assert_eq!(r.result.unwrap().stdout_raw, ok.stdout_raw);
        }
        other => panic!("expected the second attempt's result, got {other:?}"),
    }

    // CANCELLED unasked, then UNAVAILABLE: the attempts are used up, and the error says so.
    let b = action(&ch, 2).await;
    let exec = tokio::spawn(execute(ch.clone(), b));
    let run = w.next_run().await;
    w.report(
        &run,
        Code::Cancelled,
        "cancelled by the scheduler; its processes were killed",
        None,
    )
    .await;
    let run = w.next_run().await;
    assert_eq!(run.attempt, 2);
    w.report(&run, Code::Unavailable, "uploading outputs failed", None)
        .await;
    let op = exec.await.unwrap();
    match op.result {
        Some(operation::Result::Error(st)) => {
            assert_eq!(st.code, Code::Unavailable as i32);
            assert!(
                st.message.contains("giving up") && st.message.contains("uploading outputs failed"),
                "{}",
                st.message
            );
        }
        other => panic!("expected a failure after two attempts, got {other:?}"),
    }
    s.shutdown().await;
}
