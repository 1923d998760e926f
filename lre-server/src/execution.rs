//! The Execution service (Execute, WaitExecution): cache check, input validation, then
//! the scheduler. Workers reach the scheduler through `worker_service`.

use std::collections::{HashSet, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bazel_remote_apis::build::bazel::remote::execution::v2::{
    execution_server::Execution, execution_stage, Action, Command, Directory,
    ExecuteOperationMetadata, ExecuteRequest, ExecuteResponse, WaitExecutionRequest,
};
use bazel_remote_apis::google::longrunning::{operation, Operation};
use bazel_remote_apis::google::protobuf::Any;
use bazel_remote_apis::google::rpc;
use bytes::Bytes;
use futures::Stream;
use prost::Message;
use tokio::sync::watch;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::auth::Access;
use crate::config::ExecutionConfig;
use crate::context::ServerContext;
use crate::digest::{check_digest_function, Digest};
use crate::error::{Error, Result};
use crate::scheduler::cluster::Cluster;
use crate::scheduler::{ActionKey, Failure, Properties, Scheduler, Stage, Submitted};
use crate::status::RequestMeta;

/// What a worker needs to run one action; shared by every waiter of a deduplicated action.
#[derive(Debug)]
pub struct Job {
    pub key: ActionKey,
    pub action: Bytes,
    pub command: Bytes,
    pub timeout: Duration,
    pub do_not_cache: bool,
    /// What the client said about the action, for the status page.
    pub meta: Option<RequestMeta>,
    pub first_output: String,
}

pub type ExecScheduler = Scheduler<Arc<Job>, ExecuteResponse>;

/// Where operations live: this process's scheduler alone, or the state every replica
/// shares in Redis (`execution.redis`), run on this process's scheduler when its workers
/// claim them.
#[derive(Clone)]
pub enum Scheduling {
    Local(Arc<ExecScheduler>),
    Cluster(Arc<Cluster>),
}

impl Scheduling {
    pub async fn submit(
        &self,
        job: Arc<Job>,
        platform: Properties,
        priority: i32,
    ) -> std::result::Result<Submitted<ExecuteResponse>, Failure> {
        match self {
            Scheduling::Local(s) => {
                let timeout = Some(job.timeout);
                s.submit_with_timeout(job.key.clone(), platform, priority, job, timeout)
            }
            Scheduling::Cluster(c) => c.submit(job, platform, priority).await,
        }
    }

    pub async fn snapshot(
        &self,
        name: &str,
    ) -> std::result::Result<Option<(ActionKey, Stage<ExecuteResponse>)>, Failure> {
        match self {
            Scheduling::Local(s) => Ok(s.snapshot(name)),
            Scheduling::Cluster(c) => c.snapshot(name).await,
        }
    }

    pub async fn watch(
        &self,
        name: &str,
    ) -> std::result::Result<Option<watch::Receiver<Stage<ExecuteResponse>>>, Failure> {
        match self {
            Scheduling::Local(s) => Ok(s.watch(name)),
            Scheduling::Cluster(c) => c.watch(name).await,
        }
    }

    pub async fn cancel(&self, name: &str) -> std::result::Result<bool, Failure> {
        match self {
            Scheduling::Local(s) => Ok(s.cancel(name)),
            Scheduling::Cluster(c) => c.cancel(name).await,
        }
    }
}

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

/// The longrunning form of a scheduler stage.
pub fn operation(name: &str, action: &Digest, stage: &Stage<ExecuteResponse>) -> Operation {
    use execution_stage::Value;
    let (value, result) = match stage {
        Stage::Queued => (Value::Queued, None),
        Stage::Executing { .. } => (Value::Executing, None),
        Stage::Completed(Ok(resp)) => (
            Value::Completed,
            Some(operation::Result::Response(any(EXECUTE_RESPONSE, resp))),
        ),
        Stage::Completed(Err(f)) => (
            Value::Completed,
            Some(operation::Result::Error(rpc::Status {
                code: f.code as i32,
                message: f.message.clone(),
                details: vec![],
            })),
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

fn done_operation(name: &str, action: &Digest, resp: ExecuteResponse) -> Operation {
    operation(name, action, &Stage::Completed(Ok(resp)))
}

type OpStream = Pin<Box<dyn Stream<Item = Result<Operation, Status>> + Send>>;

/// Streams every stage change of an operation until it completes.
pub fn operation_stream(
    name: String,
    action: Digest,
    mut rx: watch::Receiver<Stage<ExecuteResponse>>,
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
            let done = matches!(stage, Stage::Completed(_));
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

pub struct ExecutionService {
    cache: Arc<ServerContext>,
    scheduler: Scheduling,
    config: ExecutionConfig,
}

/// The REAPI answer for inputs the CAS lacks: FAILED_PRECONDITION with one MISSING
/// violation per blob, which is what makes Bazel upload them and retry.
/// The blobs a worker reports it could not fetch, as "HASH/SIZE". A worker is not trusted
/// to be well-formed: malformed entries are skipped, and at most 1000 are kept.
pub(crate) fn reported_missing(list: &[String]) -> Vec<Digest> {
    list.iter()
        .take(1000)
        .filter_map(|s| {
            let (hash, size) = s.split_once('/')?;
            Digest::parse(hash, size).ok()
        })
        .collect()
}

/// FAILED_PRECONDITION with a PreconditionFailure naming each missing blob (type
/// "MISSING"), which is what makes Bazel upload them again instead of failing the build.
pub(crate) fn missing_response(missing: &[Digest]) -> ExecuteResponse {
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
                missing[0]
            ),
            details: vec![any(PRECONDITION_FAILURE, &failure)],
        }),
        ..Default::default()
    }
}

fn properties(
    p: &Option<bazel_remote_apis::build::bazel::remote::execution::v2::Platform>,
) -> Properties {
    p.iter()
        .flat_map(|p| {
            p.properties
                .iter()
                .map(|x| (x.name.clone(), x.value.clone()))
        })
        .collect()
}

impl ExecutionService {
    pub fn new(cache: Arc<ServerContext>, scheduler: Scheduling, config: ExecutionConfig) -> Self {
        ExecutionService {
            cache,
            scheduler,
            config,
        }
    }

    async fn fetch(&self, d: &Digest, missing: &mut Vec<Digest>) -> Result<Option<Bytes>> {
        let b = self.cache.read_blob(d).await?;
        if b.is_none() {
            missing.push(*d);
        }
        Ok(b)
    }

    /// Every blob the action needs that the CAS lacks: the command, and every directory
    /// and file of the input root.
    async fn missing_inputs(&self, action: &Action, missing: &mut Vec<Digest>) -> Result<()> {
        let Some(root) = Digest::from_opt_proto(&action.input_root_digest)? else {
            return Err(Error::InvalidArgument(
                "action has no input_root_digest".into(),
            ));
        };
        let mut files = Vec::new();
        let mut seen = HashSet::from([root]);
        let mut queue = VecDeque::from([root]);
        while let Some(d) = queue.pop_front() {
            let Some(raw) = self.fetch(&d, missing).await? else {
                continue;
            };
            let dir = Directory::decode(raw)
                .map_err(|e| Error::InvalidArgument(format!("input directory {d}: {e}")))?;
            for f in &dir.files {
                files.extend(Digest::from_opt_proto(&f.digest)?);
            }
            for sub in &dir.directories {
                if let Some(sd) = Digest::from_opt_proto(&sub.digest)? {
                    if seen.insert(sd) {
                        queue.push_back(sd);
                    }
                }
            }
        }
        let mut uniq = HashSet::new();
        files.retain(|d| uniq.insert(*d));
        missing.extend(self.cache.find_missing(&files).await?);
        Ok(())
    }

    fn timeout(&self, action: &Action) -> Result<Duration> {
        let max = Duration::from_secs(self.config.max_timeout_seconds);
        match &action.timeout {
            Some(t) if t.seconds < 0 || t.nanos < 0 => {
                Err(Error::InvalidArgument("negative action timeout".into()))
            }
            Some(t) if t.seconds > 0 || t.nanos > 0 => {
                let d = Duration::new(t.seconds as u64, t.nanos as u32);
                if d > max {
                    return Err(Error::InvalidArgument(format!(
                        "action timeout {d:?} exceeds this server's maximum of {max:?}"
                    )));
                }
                Ok(d)
            }
            _ => Ok(Duration::from_secs(self.config.default_timeout_seconds)),
        }
    }

    async fn execute_inner(&self, request: Request<ExecuteRequest>) -> Result<OpStream> {
        let req = request.get_ref();
        let caller = self
            .cache
            .authorize_grpc(&request, &req.instance_name, Access::Execute)?;
        check_digest_function(req.digest_function)?;
        let action_digest = Digest::from_opt_proto(&req.action_digest)?
            .ok_or_else(|| Error::InvalidArgument("action_digest is required".into()))?;
        // Answers decided before scheduling (cache hit, missing inputs) get their own name.
        let name = uuid::Uuid::new_v4().to_string();
        let meta = ExecuteOperationMetadata {
            stage: execution_stage::Value::CacheCheck as i32,
            action_digest: Some(action_digest.to_proto()),
            ..Default::default()
        };
        let cache_check = Operation {
            name: name.clone(),
            metadata: Some(any(EXECUTE_METADATA, &meta)),
            done: false,
            result: None,
        };
        let done_now = |resp| {
            Ok(Box::pin(futures::stream::iter([
                Ok(cache_check.clone()),
                Ok(done_operation(&name, &action_digest, resp)),
            ])) as OpStream)
        };

        let meta = RequestMeta::of_caller(&request, &caller);
        if !req.skip_cache_lookup {
            if let Some(hit) = self
                .cache
                .get_action_result(&req.instance_name, action_digest.hash)
                .await?
            {
                // Only hits count here: Bazel looked the key up (and missed) just before.
                self.cache.activity.lookup(
                    &req.instance_name,
                    meta.as_ref(),
                    action_digest,
                    Some(hit.provenance.as_ref()),
                );
                return done_now(ExecuteResponse {
                    result: Some(hit.result),
                    cached_result: true,
                    ..Default::default()
                });
            }
        }
        let mut missing = Vec::new();
        let Some(action_raw) = self.fetch(&action_digest, &mut missing).await? else {
            return done_now(missing_response(&missing));
        };
        let action = Action::decode(action_raw.clone())
            .map_err(|e| Error::InvalidArgument(format!("action {action_digest}: {e}")))?;
        let command_digest = Digest::from_opt_proto(&action.command_digest)?
            .ok_or_else(|| Error::InvalidArgument("action has no command_digest".into()))?;
        let command_raw = self.fetch(&command_digest, &mut missing).await?;
        self.missing_inputs(&action, &mut missing).await?;
        let Some(command_raw) = command_raw.filter(|_| missing.is_empty()) else {
            return done_now(missing_response(&missing));
        };
        let command = Command::decode(command_raw.clone())
            .map_err(|e| Error::InvalidArgument(format!("command {command_digest}: {e}")))?;
        if command.arguments.is_empty() {
            return Err(Error::InvalidArgument("command has no arguments".into()));
        }
        // REAPI 2.2 moved the platform from the Command to the Action; Bazel 4 still sends
        // it in the Command, so accept either.
        #[allow(deprecated)]
        let platform = if action.platform.is_some() {
            properties(&action.platform)
        } else {
            properties(&command.platform)
        };
        let job = Arc::new(Job {
            key: ActionKey {
                instance: req.instance_name.clone(),
                action: action_digest,
            },
            action: action_raw,
            command: command_raw,
            timeout: self.timeout(&action)?,
            do_not_cache: action.do_not_cache,
            meta,
            first_output: first_output(&command),
        });
        let priority = req
            .execution_policy
            .as_ref()
            .map(|p| p.priority)
            .unwrap_or(0);
        let submitted = match self.scheduler.submit(job, platform, priority).await {
            Ok(s) => s,
            // No worker could ever run it (FAILED_PRECONDITION), the queue is full
            // (RESOURCE_EXHAUSTED), the cluster's Redis is away (UNAVAILABLE).
            Err(f) => return Err(f.into()),
        };
        if submitted.deduplicated {
            tracing::debug!(operation = %submitted.operation, %action_digest, "joined an identical action in flight");
        }
        Ok(operation_stream(
            submitted.operation,
            action_digest,
            submitted.stage,
            vec![cache_check],
        ))
    }
}

#[tonic::async_trait]
impl Execution for ExecutionService {
    type ExecuteStream = OpStream;
    type WaitExecutionStream = OpStream;

    async fn execute(
        &self,
        request: Request<ExecuteRequest>,
    ) -> Result<Response<OpStream>, Status> {
        let _t = self.cache.metrics.timer("Execute");
        Ok(Response::new(self.execute_inner(request).await?))
    }

    async fn wait_execution(
        &self,
        request: Request<WaitExecutionRequest>,
    ) -> Result<Response<OpStream>, Status> {
        let name = &request.get_ref().name;
        let (key, _) = self
            .scheduler
            .snapshot(name)
            .await
            .map_err(Error::from)?
            .ok_or_else(|| Error::NotFound(format!("no operation {name:?}")))?;
        self.cache
            .authorize_grpc(&request, &key.instance, Access::Read)?;
        let rx = self
            .scheduler
            .watch(name)
            .await
            .map_err(Error::from)?
            .ok_or_else(|| Error::NotFound(format!("no operation {name:?}")))?;
        Ok(Response::new(operation_stream(
            name.clone(),
            key.action,
            rx,
            vec![],
        )))
    }
}

/// The action's first declared output, which names it on the status page.
#[allow(deprecated)]
fn first_output(c: &Command) -> String {
    c.output_paths
        .first()
        .or(c.output_files.first())
        .or(c.output_directories.first())
        .cloned()
        .unwrap_or_default()
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
