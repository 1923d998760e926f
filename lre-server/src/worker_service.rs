//! The endpoint lre-workers connect to (`lre.worker.v1.WorkerService/Attach`): it turns
//! one bidirectional stream per worker into scheduler registrations, dispatches and results.

use std::sync::Arc;
use std::time::Duration;

use bazel_remote_apis::build::bazel::remote::execution::v2::{ActionResult, ExecuteResponse};
use bazel_remote_apis::google::rpc;
use lre_worker_protocol::v1::{
    server_message, worker_message, worker_service_server::WorkerService, ActionFinished,
    CancelAction, Registered, RunAction, ServerMessage, WorkerMessage,
};
use prost::Message;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::context::{ResultSource, ServerContext};
use crate::digest::{Digest, DigestFunction};
use crate::error::Error;
use crate::scheduler::{Job, Scheduler, WorkerCommand, WorkerSpec, MAX_CAPACITY};

/// Worker ids appear in logs and operation metadata: short, printable, no separators that
/// could pass for another credential's namespace.
fn check_worker_id(id: &str) -> Result<(), Error> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(
            "Register.worker_id must be 1 to 128 characters of A-Z a-z 0-9 - _ . :".into(),
        ))
    }
}

pub struct WorkerEndpoint {
    cache: Arc<ServerContext>,
    scheduler: Arc<Scheduler>,
    keepalive: Duration,
    /// Turns true when the server stops: every worker stream is then ended, so workers go
    /// and reconnect (to the restarted server) instead of holding a dead session open.
    shutdown: tokio::sync::watch::Receiver<bool>,
}

impl WorkerEndpoint {
    pub fn new(
        cache: Arc<ServerContext>,
        scheduler: Arc<Scheduler>,
        keepalive: Duration,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        WorkerEndpoint {
            cache,
            scheduler,
            keepalive,
            shutdown,
        }
    }
}

fn command_message(cmd: WorkerCommand) -> ServerMessage {
    let message = match cmd {
        WorkerCommand::Run {
            operation,
            job,
            attempt,
        } => server_message::Message::Run(RunAction {
            operation,
            instance_name: job.key.instance.clone(),
            action_digest: job.key.action.to_proto().encode_to_vec(),
            action: job.action.to_vec(),
            command: job.command.to_vec(),
            timeout_ms: job.timeout.as_millis() as u64,
            attempt,
        }),
        WorkerCommand::Cancel { operation } => {
            server_message::Message::Cancel(CancelAction { operation })
        }
    };
    ServerMessage {
        message: Some(message),
    }
}

/// Turns a worker's report into the operation's ExecuteResponse, storing successful
/// results in the action cache first so a hit is possible the moment waiters see it. A
/// report on a cancelled action only says it is gone (its slot is free again).
async fn finish(
    cache: &ServerContext,
    scheduler: &Scheduler,
    worker: &str,
    token: &str,
    f: ActionFinished,
) {
    let Some(run) = scheduler.take_report(worker, &f.operation) else {
        tracing::debug!(worker, operation = %f.operation, "report on an action this worker no longer holds, or stopped");
        return;
    };
    let job = run.job.clone();
    let mut result = if f.result.is_empty() {
        None
    } else {
        match ActionResult::decode(&f.result[..]) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::error!(worker, operation = %f.operation, error = %e, "worker sent an undecodable ActionResult");
                let outcome = crate::scheduler::failed(
                    tonic::Code::Internal,
                    format!("worker {worker} sent an undecodable result: {e}"),
                );
                scheduler.complete(&run, outcome).await;
                return;
            }
        }
    };
    // When the action was submitted: the worker cannot know, clients show it.
    if let Some(m) = result.as_mut().and_then(|r| r.execution_metadata.as_mut()) {
        m.queued_timestamp = Some(timestamp(run.queued_at));
    }
    let ok = f.status_code == tonic::Code::Ok as i32;
    let missing = crate::longrunning::reported_missing(&f.missing_blobs);
    if f.status_code == tonic::Code::FailedPrecondition as i32 && !missing.is_empty() {
        tracing::info!(worker, operation = %f.operation, missing = missing.len(), "inputs went missing before the worker fetched them");
        record(cache, worker, &job, &f, None);
        scheduler
            .complete(&run, Ok(crate::longrunning::missing_response(&missing)))
            .await;
        return;
    }
    // Not the action's failure, so another attempt (up to execution.max_attempts): the
    // worker could not fetch or upload (the storage did not answer), or stopped the action
    // without being asked (it is shutting down; a cancel we asked for never gets here).
    let passing = match tonic::Code::from_i32(f.status_code) {
        tonic::Code::Unavailable => Some(f.status_message.clone()),
        tonic::Code::Cancelled => Some(format!(
            "it stopped the action unasked (shutting down?): {}",
            f.status_message
        )),
        _ => None,
    };
    if let Some(why) = passing {
        record(cache, worker, &job, &f, None);
        scheduler
            .retry(&run, format!("worker {worker}: {why}"))
            .await;
        return;
    }
    let mut status = rpc::Status {
        code: f.status_code,
        message: f.status_message.clone(),
        details: vec![],
    };
    if let Some(r) = &result {
        if ok && r.exit_code == 0 && !job.do_not_cache {
            if let Err(e) = cache
                .update_action_result(
                    &job.key.instance,
                    job.key.action.function,
                    job.key.action.hash,
                    r,
                    ResultSource::Executed {
                        worker,
                        token,
                        operation: &f.operation,
                    },
                )
                .await
            {
                tracing::warn!(operation = %f.operation, error = %e, "could not store the action result");
                status = rpc::Status {
                    code: tonic::Code::Ok as i32,
                    message: format!("result not cached: {}", e.public_message()),
                    details: vec![],
                };
            }
        }
    }
    record(cache, worker, &job, &f, result.as_ref());
    let response = ExecuteResponse {
        result,
        cached_result: false,
        status: Some(status),
        ..Default::default()
    };
    scheduler.complete(&run, Ok(response)).await;
}

fn timestamp(t: std::time::SystemTime) -> bazel_remote_apis::google::protobuf::Timestamp {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    bazel_remote_apis::google::protobuf::Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

/// Tells the status page what ran, where, and how it ended.
fn record(
    cache: &ServerContext,
    worker: &str,
    job: &Job,
    f: &ActionFinished,
    result: Option<&ActionResult>,
) {
    let ok = f.status_code == tonic::Code::Ok as i32;
    let exit_code = result.map(|r| r.exit_code);
    let duration = result
        .and_then(|r| r.execution_metadata.as_ref())
        .and_then(|m| {
            // A worker's timestamps are its word only: checked, never trusted to be sane.
            let (s, e) = (m.worker_start_timestamp?, m.worker_completed_timestamp?);
            let secs = e.seconds.checked_sub(s.seconds)?.checked_mul(1000)?;
            let ms = secs.checked_add(i64::from(e.nanos.checked_sub(s.nanos)?) / 1_000_000)?;
            u64::try_from(ms).ok().map(std::time::Duration::from_millis)
        });
    let stderr = result
        .and_then(|r| {
            Digest::from_opt_proto(DigestFunction::Sha256, &r.stderr_digest)
                .ok()
                .flatten()
        })
        .filter(|d| d.size > 0);
    cache.activity.executed(
        &job.key.instance,
        job.meta.as_ref(),
        job.key.action,
        crate::activity::Execution {
            first_output: job.first_output.clone(),
            worker: worker.to_string(),
            exit_code,
            duration,
            stderr,
            failed: !ok || exit_code != Some(0),
            message: f.status_message.clone(),
        },
    );
}

type ServerStream = ReceiverStream<Result<ServerMessage, Status>>;

#[tonic::async_trait]
impl WorkerService for WorkerEndpoint {
    type AttachStream = ServerStream;

    async fn attach(
        &self,
        request: Request<Streaming<WorkerMessage>>,
    ) -> Result<Response<ServerStream>, Status> {
        // A worker's reports become action results everyone trusts: it needs a credential
        // meant for workers (scope "worker"), and runs only its credential's instances.
        let principal = self.cache.authorize_worker(&request).inspect_err(|e| {
            // Said here too, so an operator sees why a worker never shows up.
            tracing::info!(error = %e, "refused a worker's Attach");
        })?;
        let mut inbound = request.into_inner();
        // A connection that never registers must not hold a task forever.
        let first = tokio::time::timeout(self.keepalive * 3, inbound.message())
            .await
            .map_err(|_| {
                Error::InvalidArgument(
                    "no Register message within three keepalive intervals".into(),
                )
            })?;
        let register = match first? {
            Some(WorkerMessage {
                message: Some(worker_message::Message::Register(r)),
            }) => r,
            _ => {
                return Err(Error::InvalidArgument(
                    "a worker's first message must be Register".into(),
                )
                .into())
            }
        };
        check_worker_id(&register.worker_id)?;
        // The id is bound to the credential: another token cannot take this worker's place.
        let id = match &principal.name {
            Some(name) => format!("{name}/{}", register.worker_id),
            None => register.worker_id.clone(),
        };
        let spec = WorkerSpec {
            properties: register
                .properties
                .iter()
                .map(|p| (p.name.clone(), p.value.clone()))
                .collect(),
            capacity: (register.capacity as usize).clamp(1, MAX_CAPACITY),
            instances: principal.instances().map(<[String]>::to_vec),
        };
        let (session, mut commands) = self.scheduler.connect_worker(id.clone(), spec)?;
        tracing::info!(worker = %id, capacity = register.capacity, properties = ?register.properties, instances = ?principal.instances(), "worker connected");

        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let registered = Registered {
            keepalive_interval_ms: self.keepalive.as_millis() as u32,
        };
        let _ = tx
            .send(Ok(ServerMessage {
                message: Some(server_message::Message::Registered(registered)),
            }))
            .await;
        let down = tx.clone();
        tokio::spawn(async move {
            while let Some(cmd) = commands.recv().await {
                if down.send(Ok(command_message(cmd))).await.is_err() {
                    return;
                }
            }
            // The scheduler let go of this worker (it held an action past its deadline, or
            // the connection is ending anyway): end the stream, so the worker reconnects
            // rather than wait for work that never comes.
            let _ = down
                .send(Err(Status::aborted(
                    "the scheduler dropped this worker (an action ran past its deadline); reconnect",
                )))
                .await;
        });
        let (cache, scheduler, silence) = (
            self.cache.clone(),
            self.scheduler.clone(),
            self.keepalive * 3,
        );
        // Results this worker runs are stored as written by it and by its token.
        let token = principal.name.clone().unwrap_or_default();
        let mut shutdown = self.shutdown.clone();
        // The session ends when its token expires: a worker is trusted only as long as
        // its credential is (it reconnects, and is refused, like any new caller).
        let expiry = principal.expires().map(|t| {
            let left = t
                .duration_since(std::time::SystemTime::now())
                .unwrap_or_default();
            tokio::time::Instant::now() + left
        });
        tokio::spawn(async move {
            let expired = async {
                match expiry {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::pin!(expired);
            loop {
                let next = tokio::select! {
                    m = tokio::time::timeout(silence, inbound.message()) => m,
                    _ = shutdown.wait_for(|s| *s) => {
                        tracing::info!(worker = %id, "server stopping; ending the worker's stream");
                        break;
                    }
                    _ = &mut expired => {
                        tracing::warn!(worker = %id, "the worker's token expired; ending its stream");
                        break;
                    }
                };
                if matches!(next, Ok(Ok(Some(_)))) {
                    scheduler.heard_from(&id, session);
                }
                match next {
                    Ok(Ok(Some(WorkerMessage {
                        message: Some(worker_message::Message::Finished(f)),
                    }))) => finish(&cache, &scheduler, &id, &token, f).await,
                    Ok(Ok(Some(_))) => {} // keepalive
                    Ok(Ok(None)) => break,
                    Ok(Err(e)) => {
                        tracing::warn!(worker = %id, error = %e, "worker stream broke");
                        break;
                    }
                    Err(_) => {
                        tracing::warn!(worker = %id, "worker silent for three keepalive intervals; dropping it");
                        break;
                    }
                }
            }
            tracing::info!(worker = %id, "worker disconnected");
            scheduler.disconnect(&id, session).await;
            drop(tx);
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
