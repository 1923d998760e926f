//! Runs one action: materialize inputs, run the command in the sandbox, upload outputs,
//! and report an ActionResult. Every failure becomes a status, never a worker crash.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::client::ServerChannel;
use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use bazel_remote_apis::google::protobuf::Timestamp;
use lre_worker_protocol::v1::{ActionFinished, RunAction};
use prost::Message;

use crate::cas::{file_digest, LocalCas, Upload};
use crate::error::{Result, WorkerError};
use crate::materialize::materialize;
use crate::outputs;
use crate::sandbox::{self, SandboxConfig};

pub struct Runner {
    pub worker_id: String,
    pub cas: Arc<LocalCas>,
    pub channel: ServerChannel,
    pub work_dir: PathBuf,
    pub sandbox: SandboxConfig,
    /// The uids actions run as ([`sandbox::UidPool::resolve`] once at start).
    pub uids: sandbox::UidPool,
    /// How long after the action's process ends its outputs may still take to upload when
    /// its timeout is nearer than that ([`OUTPUT_GRACE`] outside tests).
    pub output_grace: Duration,
}

/// Outputs are collected and uploaded by the action's deadline, or within this long of the
/// process ending, whichever is later: a test killed at its timeout still gets its logs to
/// Bazel. Far inside the scheduler's own 60 s past the timeout, after which it drops the
/// worker, so a slow upload is reported as this action's DEADLINE_EXCEEDED instead.
pub const OUTPUT_GRACE: Duration = Duration::from_secs(10);

fn ts(t: SystemTime) -> Option<Timestamp> {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    Some(Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    })
}

/// Deletes an action directory, however deep and read-only the action left it, off the
/// async runtime (a big tree takes a while, and keepalives must not wait for it).
async fn remove_tree(dir: PathBuf) {
    let shown = dir.display().to_string();
    match tokio::task::spawn_blocking(move || crate::confined::remove_tree(&dir)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(dir = %shown, error = %e, "could not clean an action directory")
        }
        Err(e) => tracing::error!(dir = %shown, error = %e, "cleaning an action directory failed"),
    }
}

/// `fut`, unless the action is cancelled first (then `WorkerError::Cancelled`). For the
/// phases with no process of the action's running: dropping them leaves nothing behind.
async fn unless_cancelled<T>(
    cancel: &mut sandbox::Cancel,
    fut: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    tokio::select! {
        r = fut => r,
        _ = sandbox::cancelled(cancel) => Err(WorkerError::Cancelled("cancelled by the scheduler".into())),
    }
}

impl Runner {
    /// Runs one action, until it ends or `cancel` turns true. Either way its exec root is
    /// gone before this returns, and the report says how it ended (a cancelled action's
    /// CANCELLED report tells the scheduler its slot is free).
    pub async fn run(&self, run: &RunAction, cancel: sandbox::Cancel) -> ActionFinished {
        let dir = self
            .work_dir
            .join("actions")
            .join(uuid::Uuid::new_v4().to_string());
        let outcome = match self.uids.lease() {
            Ok(lease) => {
                let uid = lease.as_ref().map(|l| l.uid);
                let outcome = self.run_in(run, &dir, uid, cancel).await;
                // The uid goes back to the pool only once nothing of its action is left.
                remove_tree(dir).await;
                drop(lease);
                outcome
            }
            Err(e) => Err(e),
        };
        match outcome {
            Ok((result, status)) => {
                tracing::info!(operation = %run.operation, exit_code = result.exit_code, attempt = run.attempt, "action ran");
                ActionFinished {
                    operation: run.operation.clone(),
                    status_code: status.as_ref().map(|(c, _)| *c as i32).unwrap_or(0),
                    status_message: status.map(|(_, m)| m).unwrap_or_default(),
                    result: result.encode_to_vec(),
                    missing_blobs: vec![],
                }
            }
            Err(e) => {
                tracing::info!(operation = %run.operation, error = %e, "action failed before or after running");
                let missing_blobs = match &e {
                    WorkerError::MissingInput { blob: Some(d), .. } => {
                        vec![format!("{}/{}", d.hash, d.size_bytes)]
                    }
                    _ => vec![],
                };
                ActionFinished {
                    operation: run.operation.clone(),
                    status_code: e.code() as i32,
                    status_message: e.to_string(),
                    result: vec![],
                    missing_blobs,
                }
            }
        }
    }

    async fn run_in(
        &self,
        run: &RunAction,
        dir: &Path,
        uid: Option<u32>,
        mut cancel: sandbox::Cancel,
    ) -> Result<(re::ActionResult, Option<(tonic::Code, String)>)> {
        let worker_start = SystemTime::now();
        // One timeout for fetching, materializing, running and uploading (see OUTPUT_GRACE).
        let timeout = Duration::from_millis(run.timeout_ms.max(1));
        let deadline = tokio::time::Instant::now() + timeout;
        let action = re::Action::decode(&run.action[..])?;
        let command = re::Command::decode(&run.command[..])?;
        if command.arguments.is_empty() {
            return Err(WorkerError::InvalidInput("command has no arguments".into()));
        }
        let exec_root = dir.join("root");
        std::fs::create_dir_all(&exec_root)?;
        let root = action
            .input_root_digest
            .clone()
            .ok_or_else(|| WorkerError::InvalidInput("no input root".into()))?;
        let fetch_start = SystemTime::now();
        let linked = unless_cancelled(&mut cancel, async {
            tokio::time::timeout_at(
                deadline,
                materialize(&self.cas, &run.instance_name, &root, &exec_root, uid),
            )
            .await
            .map_err(|_| {
                WorkerError::Timeout(format!(
                    "fetching the inputs took longer than the action's timeout ({timeout:?})"
                ))
            })?
        })
        .await?;
        let fetch_done = SystemTime::now();

        let wd = &command.working_directory;
        if Path::new(wd).is_absolute() || wd.split('/').any(|c| c == "..") {
            return Err(WorkerError::InvalidInput(format!(
                "working_directory {wd:?} leaves the exec root"
            )));
        }
        let workdir = exec_root.join(wd);
        // REAPI: the worker creates the parent directories of declared outputs (and the
        // working directory), never through a symlink the inputs hold.
        crate::confined::create_dirs(&exec_root, Path::new(wd), uid)?;
        for p in outputs::declared(&command) {
            if Path::new(&p).is_absolute() || p.split('/').any(|c| c == "..") {
                return Err(WorkerError::Output(format!(
                    "path {p:?} is absolute or climbs out with '..'"
                )));
            }
            if let Some(parent) = Path::new(wd).join(&p).parent() {
                crate::confined::create_dirs(&exec_root, parent, uid)?;
            }
        }
        let env: Vec<(String, String)> = command
            .environment_variables
            .iter()
            .map(|e| (e.name.clone(), e.value.clone()))
            .collect();
        sandbox::resolve_command(
            &command.arguments[0],
            &exec_root,
            &workdir,
            &env,
            &self.sandbox,
        )?;
        let (stdout, stderr) = (dir.join("stdout"), dir.join("stderr"));
        let exec_start = SystemTime::now();
        let spawn = sandbox::Spawn {
            exec_root: &exec_root,
            workdir: &workdir,
            argv: &command.arguments,
            env: &env,
            stdout: &stdout,
            stderr: &stderr,
            timeout: deadline
                .saturating_duration_since(tokio::time::Instant::now())
                .max(Duration::from_millis(1)),
            uid,
        };
        let outcome = sandbox::run(&self.sandbox, &spawn, cancel.clone()).await?;
        if outcome.cancelled {
            return Err(WorkerError::Cancelled(
                "cancelled by the scheduler; its processes were killed".into(),
            ));
        }
        let exec_done = SystemTime::now();
        // Inputs are hard links into the local cache: an action that wrote to or chmodded
        // one changed the cached copy every later action would get. Drop those copies (they
        // are fetched again, verified) and fail this non-hermetic action. A moved fingerprint
        // alone may be a concurrent action's hard link, so the content and mode decide. With
        // an action uid of its own this cannot happen; the check stays as a second line.
        let cas = self.cas.clone();
        // Without a uid of its own the action held its linked files alone (`Linked`): it
        // lets go of them once they are checked.
        let crate::materialize::Linked {
            inputs, exclusive, ..
        } = linked;
        let tampered = tokio::task::spawn_blocking(move || {
            inputs
                .into_iter()
                .filter_map(|l| {
                    // Gone means evicted by another action's fetch (its pin ended at
                    // linking): the cache no longer holds that copy, nothing to check.
                    let now = LocalCas::fingerprint(&l.path)?;
                    (Some(now) != l.print && !cas.intact(&l.digest, l.executable))
                        .then_some((l, now))
                })
                .collect::<Vec<_>>()
        })
        .await
        .map_err(|e| WorkerError::Sandbox(format!("checking inputs: {e}")))?;
        drop(exclusive);
        if !tampered.is_empty() {
            let mut names = Vec::new();
            let mut done = std::collections::HashSet::new();
            for (l, found) in &tampered {
                // The file found bad, by its inode: not a fresh copy fetched since.
                if done.insert((l.digest.hash.clone(), l.executable)) {
                    self.cas.discard(&l.digest, l.executable, found).await?;
                }
                names.push(format!("{}/{}", l.digest.hash, l.digest.size_bytes));
            }
            names.sort();
            names.dedup();
            return Err(WorkerError::InvalidInput(format!(
                "the action modified its input file(s) {}; inputs are read-only, and the worker's cached copies were discarded",
                names.join(", ")
            )));
        }

        let upload_deadline = deadline.max(tokio::time::Instant::now() + self.output_grace);
        let collect_and_upload = async {
            let (mut collected, out_digest, err_digest) = {
                let (root, wd, cmd) = (exec_root.clone(), workdir.clone(), command.clone());
                let (out, err) = (stdout.clone(), stderr.clone());
                tokio::task::spawn_blocking(move || -> Result<_> {
                    Ok((
                        outputs::collect(&root, &wd, &cmd)?,
                        file_digest(&out)?,
                        file_digest(&err)?,
                    ))
                })
                .await
                .map_err(|e| WorkerError::Sandbox(format!("collecting outputs: {e}")))??
            };
            collected
                .uploads
                .push((out_digest.clone(), Upload::File(stdout)));
            collected
                .uploads
                .push((err_digest.clone(), Upload::File(stderr)));
            let upload_start = SystemTime::now();
            self.cas
                .server()
                .upload(&run.instance_name, std::mem::take(&mut collected.uploads))
                .await?;
            Ok::<_, WorkerError>((collected, out_digest, err_digest, upload_start))
        };
        let (collected, out_digest, err_digest, upload_start) =
            unless_cancelled(&mut cancel, async {
                tokio::time::timeout_at(upload_deadline, collect_and_upload)
                    .await
                    .map_err(|_| {
                        WorkerError::Timeout(format!(
                            "collecting and uploading the outputs went past the action's \
                             timeout ({timeout:?})"
                        ))
                    })?
            })
            .await?;
        let result = re::ActionResult {
            output_files: collected.files,
            output_directories: collected.directories,
            output_symlinks: collected.symlinks,
            exit_code: outcome.exit_code,
            stdout_digest: Some(out_digest),
            stderr_digest: Some(err_digest),
            execution_metadata: Some(re::ExecutedActionMetadata {
                worker: self.worker_id.clone(),
                worker_start_timestamp: ts(worker_start),
                input_fetch_start_timestamp: ts(fetch_start),
                input_fetch_completed_timestamp: ts(fetch_done),
                execution_start_timestamp: ts(exec_start),
                execution_completed_timestamp: ts(exec_done),
                output_upload_start_timestamp: ts(upload_start),
                output_upload_completed_timestamp: ts(SystemTime::now()),
                worker_completed_timestamp: ts(SystemTime::now()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let status = outcome.timed_out.then(|| {
            (
                tonic::Code::DeadlineExceeded,
                format!("action timed out after {timeout:?}; its process tree was killed"),
            )
        });
        Ok((result, status))
    }
}
