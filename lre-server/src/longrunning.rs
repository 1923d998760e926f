//! The REAPI shapes of an operation as clients see it (`google.longrunning.Operation` with
//! `ExecuteOperationMetadata` and `ExecuteResponse`), and of the answer that makes a client
//! upload missing inputs (a PreconditionFailure with MISSING violations). Shared by the
//! Execution, Operations and worker services.

use std::pin::Pin;

use bazel_remote_apis::build::bazel::remote::execution::v2::{
    execution_stage, ExecuteOperationMetadata, ExecuteResponse,
};
use bazel_remote_apis::google::longrunning::{operation, Operation};
use bazel_remote_apis::google::protobuf::Any;
use bazel_remote_apis::google::rpc;
use futures::Stream;
use prost::Message;
use tokio::sync::watch;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use crate::digest::Digest;
use crate::scheduler::Stage;

const EXECUTE_RESPONSE: &str =
    "type.googleapis.com/build.bazel.remote.execution.v2.ExecuteResponse";
const EXECUTE_METADATA: &str =
    "type.googleapis.com/build.bazel.remote.execution.v2.ExecuteOperationMetadata";
const PRECONDITION_FAILURE: &str = "type.googleapis.com/google.rpc.PreconditionFailure";

fn any(type_url: &str, m: &impl Message) -> Any {
    Any {
        type_url: type_url.into(),
        value: m.encode_to_vec(),
    }
}

/// The operation at the cache check, before it is queued or answered.
pub fn cache_check(name: &str, action: &Digest) -> Operation {
    let metadata = ExecuteOperationMetadata {
        stage: execution_stage::Value::CacheCheck as i32,
        action_digest: Some(action.to_proto()),
        ..Default::default()
    };
    Operation {
        name: name.into(),
        metadata: Some(any(EXECUTE_METADATA, &metadata)),
        done: false,
        result: None,
    }
}

/// The longrunning form of a scheduler stage.
pub fn operation(name: &str, action: &Digest, stage: &Stage) -> Operation {
    use execution_stage::Value;
    let (value, result) = match stage {
        Stage::Queued => (Value::Queued, None),
        Stage::Executing { .. } => (Value::Executing, None),
        Stage::Completed(Ok(resp)) => (
            Value::Completed,
            Some(operation::Result::Response(any(EXECUTE_RESPONSE, resp))),
        ),
        Stage::Completed(Err(status)) => (
            Value::Completed,
            Some(operation::Result::Error(status.clone())),
        ),
    };
    let metadata = ExecuteOperationMetadata {
        stage: value as i32,
        action_digest: Some(action.to_proto()),
        ..Default::default()
    };
    Operation {
        name: name.into(),
        metadata: Some(any(EXECUTE_METADATA, &metadata)),
        done: result.is_some(),
        result,
    }
}

pub type OpStream = Pin<Box<dyn Stream<Item = Result<Operation, Status>> + Send>>;

/// Streams every stage change of an operation until it completes, after `first`.
pub fn operation_stream(
    name: String,
    action: Digest,
    mut rx: watch::Receiver<Stage>,
    first: Vec<Operation>,
) -> OpStream {
    let (tx, out) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        for op in first {
            if tx.send(Ok(op)).await.is_err() {
                return;
            }
        }
        loop {
            let stage = rx.borrow_and_update().clone();
            let done = stage.is_done();
            if tx
                .send(Ok(operation(&name, &action, &stage)))
                .await
                .is_err()
                || done
            {
                return;
            }
            if rx.changed().await.is_err() {
                let _ = tx
                    .send(Err(Status::unavailable(
                        "the scheduler dropped the operation",
                    )))
                    .await;
                return;
            }
        }
    });
    Box::pin(ReceiverStream::new(out))
}

/// The blobs a worker reports it could not fetch, as "HASH/SIZE". A worker is not trusted
/// to be well-formed: malformed entries are skipped, and at most 1000 are kept.
pub fn reported_missing(list: &[String]) -> Vec<Digest> {
    list.iter()
        .take(1000)
        .filter_map(|s| {
            let (hash, size) = s.split_once('/')?;
            Digest::parse(crate::digest::DigestFunction::Sha256, hash, size).ok()
        })
        .collect()
}

/// FAILED_PRECONDITION with a PreconditionFailure naming each missing blob (type
/// "MISSING"), which is what makes Bazel upload them again instead of failing the build.
pub fn missing_response(missing: &[Digest]) -> ExecuteResponse {
    use tonic_types::pb::{precondition_failure::Violation, PreconditionFailure};
    let failure = PreconditionFailure {
        violations: missing
            .iter()
            .map(|d| Violation {
                r#type: "MISSING".into(),
                subject: format!("blobs/{}/{}", d.hex(), d.size),
                description: String::new(),
            })
            .collect(),
    };
    ExecuteResponse {
        status: Some(rpc::Status {
            code: tonic::Code::FailedPrecondition as i32,
            message: format!(
                "{} input blob(s) are missing from the CAS, e.g. {}",
                missing.len(),
                missing.first().map(|d| d.to_string()).unwrap_or_default()
            ),
            details: vec![any(PRECONDITION_FAILURE, &failure)],
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_types::pb::PreconditionFailure;

    #[test]
    fn a_workers_missing_blobs_become_a_precondition_failure_bazel_acts_on() {
        let d = Digest::of(b"gone");
        let list = vec![
            format!("{}/{}", d.hex(), d.size),
            "not a digest".into(),
            format!("{}/-1", d.hex()),
        ];
        let missing = reported_missing(&list);
        assert_eq!(missing, [d], "malformed entries are skipped");
        let r = missing_response(&missing);
        let status = r.status.unwrap();
        assert_eq!(status.code, tonic::Code::FailedPrecondition as i32);
        let failure = PreconditionFailure::decode(&status.details[0].value[..]).unwrap();
        assert_eq!(failure.violations[0].r#type, "MISSING");
        assert_eq!(
            failure.violations[0].subject,
            format!("blobs/{}/4", d.hex())
        );
        assert_eq!(reported_missing(&vec![list[0].clone(); 5000]).len(), 1000);
    }
}
