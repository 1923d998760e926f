//! What a client reads of an executed action besides its result: one operation name from
//! the first message of the Execute stream to the last, which GetOperation and
//! WaitExecution answer after it ends; and `ExecutedActionMetadata` with every timestamp
//! set, `queued_timestamp` included (it was never set: clients showed 1970), in order.

mod common;

use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use bazel_remote_apis::google::longrunning::{
    operations_client::OperationsClient, GetOperationRequest,
};
use common::{outcome, prepare, Exec};
use re::execution_client::ExecutionClient;

fn seconds(t: &Option<bazel_remote_apis::google::protobuf::Timestamp>, what: &str) -> f64 {
    let t = t.as_ref().unwrap_or_else(|| panic!("{what} is not set"));
    assert!(t.seconds > 1_600_000_000, "{what} is {t:?}");
    t.seconds as f64 + t.nanos as f64 / 1e9
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_executed_action_keeps_one_name_and_reports_when_it_was_queued() {
    let setup = common::with_worker("w", 1).await;
    let ch = setup.channel.clone();

    let argv = ["/bin/sh", "-c", "sleep 0.2; echo ran"];
    let exec = Exec {
        instance: "",
        argv: &argv,
        input: b"operations test",
        secret: None,
        invocation: None,
    };
    let action = prepare(&ch, &exec).await.unwrap();
    let mut stream = ExecutionClient::new(ch.clone())
        .execute(re::ExecuteRequest {
            action_digest: Some(action),
            skip_cache_lookup: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut ops = Vec::new();
    while let Some(op) = stream.message().await.unwrap() {
        ops.push(op);
    }
    assert!(ops.len() >= 2, "{ops:?}");
    let name = ops[0].name.clone();
    assert!(ops.iter().all(|o| o.name == name), "names changed: {ops:?}");
    let resp = outcome(ops.last().cloned()).unwrap();

    let m = resp
        .result
        .as_ref()
        .unwrap()
        .execution_metadata
        .clone()
        .unwrap();
    let order = [
        seconds(&m.queued_timestamp, "queued_timestamp"),
        seconds(&m.worker_start_timestamp, "worker_start_timestamp"),
        seconds(
            &m.input_fetch_start_timestamp,
            "input_fetch_start_timestamp",
        ),
        seconds(&m.execution_start_timestamp, "execution_start_timestamp"),
        seconds(
            &m.execution_completed_timestamp,
            "execution_completed_timestamp",
        ),
        seconds(&m.worker_completed_timestamp, "worker_completed_timestamp"),
    ];
    // One machine's clock: each step starts no sooner than the one before.
    assert!(order.windows(2).all(|w| w[0] <= w[1]), "{m:?}");
    assert_eq!(m.worker, "w");

    let got = OperationsClient::new(ch.clone())
        .get_operation(GetOperationRequest { name: name.clone() })
        .await
        .unwrap()
        .into_inner();
    assert!(got.done);
    assert_eq!(outcome(Some(got)).unwrap(), resp);
    let mut wait = ExecutionClient::new(ch.clone())
        .wait_execution(re::WaitExecutionRequest { name })
        .await
        .unwrap()
        .into_inner();
    let mut last = None;
    while let Some(op) = wait.message().await.unwrap() {
        last = Some(op);
    }
    assert_eq!(outcome(last).unwrap(), resp);

    setup.shut_down().await;
}
