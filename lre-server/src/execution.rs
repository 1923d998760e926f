//! The Execution service (Execute, WaitExecution): cache check, input validation, then
//! the scheduler. Workers reach the scheduler through `worker_service`.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bazel_remote_apis::build::bazel::remote::execution::v2::{
    execution_server::Execution, Action, Command, Directory, ExecuteRequest, ExecuteResponse,
    WaitExecutionRequest,
};
use bytes::Bytes;
use prost::Message;
use tonic::{Request, Response, Status};

use crate::auth::Access;
use crate::config::ExecutionConfig;
use crate::context::ServerContext;
use crate::digest::{require_sha256, Digest, DigestFunction};
use crate::error::{Error, Result};
use crate::longrunning::{cache_check, missing_response, operation, operation_stream, OpStream};
use crate::request_meta::RequestMeta;
use crate::scheduler::{job::first_output, ActionKey, Job, Properties, Scheduler, Stage};

/// Remote execution speaks SHA-256 only (Capabilities says so): its workers hash inputs
/// and outputs with it.
const SHA256: DigestFunction = DigestFunction::Sha256;

pub struct ExecutionService {
    cache: Arc<ServerContext>,
    scheduler: Arc<Scheduler>,
    config: ExecutionConfig,
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
    pub fn new(
        cache: Arc<ServerContext>,
        scheduler: Arc<Scheduler>,
        config: ExecutionConfig,
    ) -> Self {
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
        let Some(root) = Digest::from_opt_proto(SHA256, &action.input_root_digest)? else {
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
                files.extend(Digest::from_opt_proto(SHA256, &f.digest)?);
            }
            for sub in &dir.directories {
                if let Some(sd) = Digest::from_opt_proto(SHA256, &sub.digest)? {
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
        require_sha256(req.digest_function, "remote execution")?;
        let action_digest = Digest::from_opt_proto(SHA256, &req.action_digest)?
            .ok_or_else(|| Error::InvalidArgument("action_digest is required".into()))?;
        let key = ActionKey {
            instance: req.instance_name.clone(),
            action: action_digest,
        };
        let meta = RequestMeta::of_caller(&request, &caller);
        if !req.skip_cache_lookup {
            if let Some(hit) = self
                .cache
                .get_action_result(&req.instance_name, SHA256, action_digest.hash)
                .await?
            {
                // Only hits count here: Bazel looked the key up (and missed) just before.
                self.cache.activity.lookup(
                    &req.instance_name,
                    meta.as_ref(),
                    action_digest,
                    Some(hit.provenance.as_ref()),
                );
                return self
                    .answered(
                        &key,
                        ExecuteResponse {
                            result: Some(hit.result),
                            cached_result: true,
                            ..Default::default()
                        },
                    )
                    .await;
            }
        }
        let mut missing = Vec::new();
        let Some(action_raw) = self.fetch(&action_digest, &mut missing).await? else {
            return self.answered(&key, missing_response(&missing)).await;
        };
        let action = Action::decode(action_raw.clone())
            .map_err(|e| Error::InvalidArgument(format!("action {action_digest}: {e}")))?;
        let command_digest = Digest::from_opt_proto(SHA256, &action.command_digest)?
            .ok_or_else(|| Error::InvalidArgument("action has no command_digest".into()))?;
        let command_raw = self.fetch(&command_digest, &mut missing).await?;
        self.missing_inputs(&action, &mut missing).await?;
        let Some(command_raw) = command_raw.filter(|_| missing.is_empty()) else {
            return self.answered(&key, missing_response(&missing)).await;
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
            key,
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
        // No worker could ever run it (FAILED_PRECONDITION), the queue is full
        // (RESOURCE_EXHAUSTED), the cluster's Redis is away (UNAVAILABLE).
        let submitted = self.scheduler.submit(job, platform, priority).await?;
        if submitted.joined {
            tracing::debug!(operation = %submitted.operation, %action_digest, "joined an identical action in flight");
        }
        // One name for the whole stream, the cache check included: the one GetOperation
        // and WaitExecution answer to.
        let first = vec![cache_check(&submitted.operation, &action_digest)];
        Ok(operation_stream(
            submitted.operation,
            action_digest,
            submitted.stage,
            first,
        ))
    }

    /// An Execute answered without running: recorded, so its name answers GetOperation and
    /// WaitExecution like any other, and streamed as the cache check and the answer.
    async fn answered(&self, key: &ActionKey, resp: ExecuteResponse) -> Result<OpStream> {
        let name = self.scheduler.record_answered(key, resp.clone()).await?;
        Ok(Box::pin(futures::stream::iter([
            Ok(cache_check(&name, &key.action)),
            Ok(operation(&name, &key.action, &Stage::Completed(Ok(resp)))),
        ])))
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
        let snap = self
            .scheduler
            .snapshot(name)
            .await?
            .ok_or_else(|| Error::NotFound(format!("no operation {name:?}")))?;
        self.cache
            .authorize_grpc(&request, &snap.key.instance, Access::Read)?;
        let rx = self
            .scheduler
            .watch(name)
            .await?
            .ok_or_else(|| Error::NotFound(format!("no operation {name:?}")))?;
        Ok(Response::new(operation_stream(
            name.clone(),
            snap.key.action,
            rx,
            vec![],
        )))
    }
}
