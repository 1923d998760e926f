//! The worker's connection to the scheduler: register, keep alive, run what arrives, and
//! reconnect with backoff whenever the stream breaks (a server restart, a network blip).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::client::ServerChannel;
use lre_worker_protocol::v1::{
    server_message, worker_message, worker_service_client::WorkerServiceClient, Keepalive,
    Property, Register, WorkerMessage,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use crate::runner::Runner;

#[derive(Clone, Debug)]
pub struct ConnectionConfig {
    pub worker_id: String,
    pub capacity: u32,
    pub properties: Vec<(String, String)>,
}

const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Serves until `shutdown` turns true.
pub async fn serve(
    channel: ServerChannel,
    cfg: ConnectionConfig,
    runner: Arc<Runner>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(100);
    // A refused credential is said once, clearly, not at every retry.
    let mut refused_said = false;
    loop {
        let outcome = tokio::select! {
            r = session(channel.clone(), &cfg, runner.clone()) => r,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        match outcome {
            Ok(()) => {
                tracing::info!(worker = %cfg.worker_id, "scheduler closed the stream; reconnecting");
                backoff = Duration::from_millis(100);
                refused_said = false;
            }
            Err(e)
                if matches!(
                    e.code(),
                    tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
                ) =>
            {
                if !refused_said {
                    tracing::error!(worker = %cfg.worker_id, code = ?e.code(), "the server refused this worker's credential: {}; retrying with backoff (up to {MAX_BACKOFF:?})", e.message());
                    refused_said = true;
                }
            }
            Err(e) => {
                refused_said = false;
                tracing::warn!(worker = %cfg.worker_id, error = %e, retry_in = ?backoff, "scheduler connection failed")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

fn msg(m: worker_message::Message) -> WorkerMessage {
    WorkerMessage { message: Some(m) }
}

async fn session(
    channel: ServerChannel,
    cfg: &ConnectionConfig,
    runner: Arc<Runner>,
) -> Result<(), tonic::Status> {
    let (tx, rx) = mpsc::channel(64);
    let register = Register {
        worker_id: cfg.worker_id.clone(),
        properties: cfg
            .properties
            .iter()
            .map(|(n, v)| Property {
                name: n.clone(),
                value: v.clone(),
            })
            .collect(),
        capacity: cfg.capacity,
    };
    let _ = tx
        .send(msg(worker_message::Message::Register(register)))
        .await;
    let req = tonic::Request::new(ReceiverStream::new(rx));
    let mut inbound = WorkerServiceClient::new(channel)
        .attach(req)
        .await?
        .into_inner();
    let interval = match inbound.message().await?.and_then(|m| m.message) {
        Some(server_message::Message::Registered(r)) => {
            Duration::from_millis(r.keepalive_interval_ms.max(100) as u64)
        }
        _ => {
            return Err(tonic::Status::internal(
                "the scheduler did not acknowledge the registration",
            ))
        }
    };
    tracing::info!(worker = %cfg.worker_id, capacity = cfg.capacity, "registered with the scheduler");
    let ka = tx.clone();
    let _keepalive = AbortOnDrop(
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            loop {
                tick.tick().await;
                if ka
                    .send(msg(worker_message::Message::Keepalive(Keepalive {})))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        })
        .abort_handle(),
    );
    // Stopped when the session ends, and also when it is dropped half way (the worker
    // shutting down): the scheduler requeues what we were running, and a detached action
    // must neither run twice nor report from a worker that has stopped.
    let mut running = Running::default();
    let result = loop {
        let m = match inbound.message().await {
            Ok(Some(m)) => m,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        };
        running.actions.retain(|_, (_, h)| !h.is_finished());
        match m.message {
            Some(server_message::Message::Run(run)) => {
                tracing::debug!(operation = %run.operation, attempt = run.attempt, "running action");
                let (runner, tx, op) = (runner.clone(), tx.clone(), run.operation.clone());
                let (stop, cancel) = watch::channel(false);
                let ended = running.ended.clone();
                let task = tokio::spawn(async move {
                    let finished = runner.run(&run, cancel).await;
                    // Stopped because the session ended: the scheduler requeues it, and a
                    // CANCELLED report (the stream may still carry it) is not its result.
                    if ended.load(std::sync::atomic::Ordering::SeqCst) {
                        return;
                    }
                    let _ = tx
                        .send(msg(worker_message::Message::Finished(finished)))
                        .await;
                });
                running.actions.insert(op, (stop, task));
            }
            Some(server_message::Message::Cancel(c)) => {
                // Stopped, not aborted: its sandbox is killed through its PID 1 and its
                // exec root removed, and then its CANCELLED report tells the scheduler
                // that the slot is free.
                if let Some((stop, _)) = running.actions.get(&c.operation) {
                    let _ = stop.send(true);
                }
            }
            _ => {}
        }
    };
    result
}

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The actions a session runs, by operation: stopped when it drops (each kills its
/// sandbox and removes its exec root), and then not reported: `ended` is set first.
#[derive(Default)]
struct Running {
    actions: HashMap<String, (watch::Sender<bool>, tokio::task::JoinHandle<()>)>,
    ended: Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.ended.store(true, std::sync::atomic::Ordering::SeqCst);
        for (stop, _) in self.actions.values() {
            let _ = stop.send(true);
        }
    }
}
