//! The Execution service's decisions made before any worker is involved: cache hits,
//! missing inputs, unmatchable platforms, timeout limits, and what Capabilities says.

mod common;

use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use bazel_remote_apis::google::longrunning::{operation, Operation};
use common::*;
use prost::Message;
use re::execution_client::ExecutionClient;
use tonic::Code;

fn exec_config() -> lre_server::Config {
    let mut c = memory_config();
    c.execution.enabled = true;
    c.execution.max_timeout_seconds = 600;
    c.execution.default_timeout_seconds = 60;
    c
}

struct Fixture {
    action: re::Digest,
    blobs: Vec<Vec<u8>>,
}

/// An action whose input root holds one file, plus every blob it needs.
fn fixture(platform: &[(&str, &str)], timeout_s: i64) -> Fixture {
    let input = b"input file".to_vec();
    let root = re::Directory {
        files: vec![re::FileNode {
            name: "in.txt".into(),
            digest: Some(digest(&input)),
            ..Default::default()
        }],
        ..Default::default()
    }
    .encode_to_vec();
    let command = re::Command {
        arguments: vec!["/bin/true".into()],
        ..Default::default()
    }
    .encode_to_vec();
    let action = re::Action {
        command_digest: Some(digest(&command)),
        input_root_digest: Some(digest(&root)),
        timeout: (timeout_s > 0).then_some(bazel_remote_apis::google::protobuf::Duration {
            seconds: timeout_s,
            nanos: 0,
        }),
        platform: Some(re::Platform {
            properties: platform
                .iter()
                .map(|(n, v)| re::platform::Property {
                    name: n.to_string(),
                    value: v.to_string(),
                })
                .collect(),
        }),
        ..Default::default()
    }
    .encode_to_vec();
    Fixture {
        action: digest(&action),
        blobs: vec![action, command, root, input],
    }
}

async fn execute(
    ch: tonic::transport::Channel,
    action: &re::Digest,
) -> Result<Vec<Operation>, tonic::Status> {
    let mut stream = ExecutionClient::new(ch)
        .execute(re::ExecuteRequest {
            action_digest: Some(action.clone()),
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut ops = Vec::new();
    while let Some(op) = stream.message().await? {
        ops.push(op);
    }
    Ok(ops)
}

/// Stores a result for the fixture's action (an output and stdout): (output, stdout).
async fn cache_a_result(ch: &tonic::transport::Channel, f: &Fixture) -> (Vec<u8>, Vec<u8>) {
    let (out, stdout) = (b"out".to_vec(), b"stdout".to_vec());
    batch_put(ch.clone(), "", &[&out, &stdout], None)
        .await
        .unwrap();
    update_ac(
        ch.clone(),
        "",
        &f.action,
        action_result(&out, &stdout),
        None,
    )
    .await
    .unwrap();
    (out, stdout)
}

fn response(op: &Operation) -> re::ExecuteResponse {
    match &op.result {
        Some(operation::Result::Response(any)) => {
            re::ExecuteResponse::decode(&any.value[..]).unwrap()
        }
        other => panic!("operation has no response: {other:?}"),
    }
}

fn stage(op: &Operation) -> i32 {
    re::ExecuteOperationMetadata::decode(&op.metadata.as_ref().unwrap().value[..])
        .unwrap()
        .stage
}

#[tokio::test]
async fn capabilities_advertise_execution_only_when_enabled() {
    let s = start(exec_config()).await;
    let caps = CapabilitiesClient::new(channel(&s).await)
        .get_capabilities(re::GetCapabilitiesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(caps.execution_capabilities.unwrap().exec_enabled);
    s.shutdown().await;
    // And without execution the service is not even there.
    let s = start(memory_config()).await;
    let err = execute(channel(&s).await, &digest(b"x")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);
    s.shutdown().await;
}

#[tokio::test]
async fn a_cached_result_is_returned_without_running_anything() {
    let s = start(exec_config()).await;
    let ch = channel(&s).await;
    let f = fixture(&[], 0);
    let (out, stdout) = cache_a_result(&ch, &f).await;
    // No worker is connected: only the cache can answer.
    let ops = execute(ch.clone(), &f.action).await.unwrap();
    assert_eq!(
        stage(&ops[0]),
        re::execution_stage::Value::CacheCheck as i32
    );
    let last = ops.last().unwrap();
    assert!(last.done);
    let resp = response(last);
    assert!(resp.cached_result);
    assert_eq!(resp.result.unwrap(), action_result(&out, &stdout));
    s.shutdown().await;
}

#[tokio::test]
async fn missing_inputs_are_named_in_a_precondition_failure() {
    let s = start(exec_config()).await;
    let ch = channel(&s).await;
    let f = fixture(&[], 0);
    // Upload everything but the input file.
    let refs: Vec<&[u8]> = f.blobs[..3].iter().map(|b| b.as_slice()).collect();
    batch_put(ch.clone(), "", &refs, None).await.unwrap();
    let ops = execute(ch.clone(), &f.action).await.unwrap();
    let status = response(ops.last().unwrap()).status.unwrap();
    assert_eq!(status.code, Code::FailedPrecondition as i32);
    let any = &status.details[0];
    assert_eq!(
        any.type_url,
        "type.googleapis.com/google.rpc.PreconditionFailure"
    );
    let failure = tonic_types::pb::PreconditionFailure::decode(&any.value[..]).unwrap();
    let input = digest(b"input file");
    assert_eq!(failure.violations.len(), 1);
    assert_eq!(failure.violations[0].r#type, "MISSING");
    assert_eq!(
        failure.violations[0].subject,
        format!("blobs/{}/{}", input.hash, input.size_bytes)
    );
    s.shutdown().await;
}

/// A server without workers, with `worker_grace_seconds = grace`, holding an action that
/// needs a container image: its Execute's operations (or refusal).
async fn execute_without_workers(grace: u64) -> Result<Vec<Operation>, tonic::Status> {
    let mut c = exec_config();
    c.execution.worker_grace_seconds = grace;
    let s = start(c).await;
    let ch = channel(&s).await;
    let f = fixture(
        &[("container-image", "docker://registry/lre@sha256:0123")],
        0,
    );
    let refs: Vec<&[u8]> = f.blobs.iter().map(|b| b.as_slice()).collect();
    batch_put(ch.clone(), "", &refs, None).await.unwrap();
    let r = execute(ch.clone(), &f.action).await;
    s.shutdown().await;
    r
}

#[tokio::test]
async fn an_action_no_worker_can_run_fails_at_once_naming_the_property() {
    let err = execute_without_workers(0).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message()
            .contains("container-image=docker://registry/lre@sha256:0123"),
        "{}",
        err.message()
    );
}

#[tokio::test]
async fn with_no_worker_yet_an_action_waits_out_the_grace_then_fails_naming_why() {
    // Just started, no worker connected: it may be reconnecting, so the action is queued,
    // and failed only when `worker_grace_seconds` has passed without one.
    let ops = execute_without_workers(5)
        .await
        .expect("queued, not refused");
    assert!(ops.len() >= 2, "a queued stage first: {ops:?}");
    let status = match &ops.last().unwrap().result {
        Some(operation::Result::Error(status)) => status.clone(),
        other => panic!("the operation did not fail: {other:?}"),
    };
    assert_eq!(status.code, Code::FailedPrecondition as i32);
    assert!(
        status
            .message
            .contains("no worker is connected or configured"),
        "{}",
        status.message
    );
}

#[tokio::test]
async fn timeouts_above_the_maximum_are_refused() {
    let s = start(exec_config()).await;
    let ch = channel(&s).await;
    let f = fixture(&[], 601);
    let refs: Vec<&[u8]> = f.blobs.iter().map(|b| b.as_slice()).collect();
    batch_put(ch.clone(), "", &refs, None).await.unwrap();
    let err = execute(ch.clone(), &f.action).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("exceeds this server's maximum"),
        "{}",
        err.message()
    );
    s.shutdown().await;
}

#[tokio::test]
async fn read_only_callers_cannot_execute() {
    let mut c = exec_config();
    c.auth.anonymous = lre_server::auth::Scope::Read;
    let s = start(c).await;
    let err = execute(channel(&s).await, &digest(b"x")).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    s.shutdown().await;
}

#[tokio::test]
async fn wait_get_and_cancel_a_queued_operation() {
    use bazel_remote_apis::google::longrunning::{
        operations_client::OperationsClient, CancelOperationRequest, GetOperationRequest,
    };
    let mut c = exec_config();
    // A platform no worker serves yet: the action waits in the queue instead of failing.
    c.execution.known_platforms = vec![[("pool".to_string(), "later".to_string())]
        .into_iter()
        .collect()];
    let s = start(c).await;
    let ch = channel(&s).await;
    let f = fixture(&[("pool", "later")], 0);
    let refs: Vec<&[u8]> = f.blobs.iter().map(|b| b.as_slice()).collect();
    batch_put(ch.clone(), "", &refs, None).await.unwrap();

    let mut exec = ExecutionClient::new(ch.clone())
        .execute(re::ExecuteRequest {
            action_digest: Some(f.action.clone()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        stage(&exec.message().await.unwrap().unwrap()),
        re::execution_stage::Value::CacheCheck as i32
    );
    let queued = exec.message().await.unwrap().unwrap();
    assert_eq!(stage(&queued), re::execution_stage::Value::Queued as i32);
    assert!(!queued.done);

    // WaitExecution and GetOperation find the same operation by name.
    let mut wait = ExecutionClient::new(ch.clone())
        .wait_execution(re::WaitExecutionRequest {
            name: queued.name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        stage(&wait.message().await.unwrap().unwrap()),
        re::execution_stage::Value::Queued as i32
    );
    let got = OperationsClient::new(ch.clone())
        .get_operation(GetOperationRequest {
            name: queued.name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((got.name.as_str(), got.done), (queued.name.as_str(), false));

    OperationsClient::new(ch.clone())
        .cancel_operation(CancelOperationRequest {
            name: queued.name.clone(),
        })
        .await
        .unwrap();
    for stream in [&mut exec, &mut wait] {
        let last = stream.message().await.unwrap().unwrap();
        assert!(last.done);
        match last.result {
            Some(operation::Result::Error(st)) => assert_eq!(st.code, Code::Cancelled as i32),
            other => panic!("expected a cancelled operation, got {other:?}"),
        }
    }
    let err = ExecutionClient::new(ch.clone())
        .wait_execution(re::WaitExecutionRequest {
            name: "no-such-operation".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    s.shutdown().await;
}

/// GetOperation, then WaitExecution to its end, for `name`: both final operations.
async fn look_up(ch: &tonic::transport::Channel, name: &str) -> (Operation, Operation) {
    use bazel_remote_apis::google::longrunning::{
        operations_client::OperationsClient, GetOperationRequest,
    };
    let got = OperationsClient::new(ch.clone())
        .get_operation(GetOperationRequest { name: name.into() })
        .await
        .unwrap_or_else(|e| panic!("GetOperation {name}: {e}"))
        .into_inner();
    let mut wait = ExecutionClient::new(ch.clone())
        .wait_execution(re::WaitExecutionRequest { name: name.into() })
        .await
        .unwrap_or_else(|e| panic!("WaitExecution {name}: {e}"))
        .into_inner();
    let mut last = None;
    while let Some(op) = wait.message().await.unwrap() {
        last = Some(op);
    }
    (got, last.expect("WaitExecution sent nothing"))
}

/// Defect 4: the CacheCheck message carried a name nothing else knew, and operations
/// answered from the cache (or refused for missing inputs) were NOT_FOUND afterwards, so a
/// client whose stream broke could not resume.
#[tokio::test]
async fn one_name_for_a_whole_execute_and_answered_operations_stay_queryable() {
    let mut c = exec_config();
    c.execution.known_platforms = vec![[("pool".to_string(), "later".to_string())]
        .into_iter()
        .collect()];
    let s = start(c).await;
    let ch = channel(&s).await;

    // Answered from the cache.
    let f = fixture(&[], 0);
    cache_a_result(&ch, &f).await;
    let ops = execute(ch.clone(), &f.action).await.unwrap();
    let name = ops[0].name.clone();
    assert!(!name.is_empty());
    assert!(ops.iter().all(|o| o.name == name), "names changed: {ops:?}");
    let (got, waited) = look_up(&ch, &name).await;
    for op in [&got, &waited] {
        assert!(op.done);
        assert_eq!(op.name, name);
        assert!(response(op).cached_result);
    }

    // Refused for a missing input: an answer too.
    let f = fixture(&[("pool", "later")], 7);
    let refs: Vec<&[u8]> = f.blobs[..3].iter().map(|b| b.as_slice()).collect();
    batch_put(ch.clone(), "", &refs, None).await.unwrap();
    let ops = execute(ch.clone(), &f.action).await.unwrap();
    let name = ops[0].name.clone();
    assert!(ops.iter().all(|o| o.name == name), "names changed: {ops:?}");
    let (got, _) = look_up(&ch, &name).await;
    assert_eq!(
        response(&got).status.unwrap().code,
        Code::FailedPrecondition as i32
    );

    // Queued: the CacheCheck message already names the operation that waits.
    batch_put(ch.clone(), "", &[&f.blobs[3]], None)
        .await
        .unwrap();
    let mut exec = ExecutionClient::new(ch.clone())
        .execute(re::ExecuteRequest {
            action_digest: Some(f.action.clone()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = exec.message().await.unwrap().unwrap();
    assert_eq!(stage(&first), re::execution_stage::Value::CacheCheck as i32);
    let queued = exec.message().await.unwrap().unwrap();
    assert_eq!(stage(&queued), re::execution_stage::Value::Queued as i32);
    assert_eq!(first.name, queued.name);
    use bazel_remote_apis::google::longrunning::{
        operations_client::OperationsClient, GetOperationRequest,
    };
    let got = OperationsClient::new(ch.clone())
        .get_operation(GetOperationRequest {
            name: first.name.clone(),
        })
        .await
        .expect("the first message's name is the operation's")
        .into_inner();
    assert!(!got.done);
    drop(exec);
    s.shutdown().await;
}
