//! What replicas tell each other through the channel `P events`: "work" (something was
//! queued: claim) and "stage ID" (an operation changed: tell its watchers here, and the
//! scheduler, which stops running here what completed elsewhere). A lost message costs
//! only latency: every watched operation is also re-read every `POLL`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{mpsc, watch, Notify};

use super::records::{parse_snapshot, SNAPSHOT_FIELDS};
use super::RedisState;
use crate::scheduler::model::{OperationId, Snapshot, Stage};

/// Watched operations are re-read this often, in case a stage message was lost.
const POLL: Duration = Duration::from_secs(2);
/// Watched operations re-read per Redis round trip.
const REFRESH_BATCH: usize = 512;

pub struct Events {
    watchers: Mutex<HashMap<OperationId, watch::Sender<Stage>>>,
    work: Arc<Notify>,
    ended: mpsc::UnboundedSender<OperationId>,
    ended_rx: Mutex<Option<mpsc::UnboundedReceiver<OperationId>>>,
}

impl Events {
    pub fn new() -> Events {
        let (ended, ended_rx) = mpsc::unbounded_channel();
        Events {
            watchers: Mutex::new(HashMap::new()),
            work: Arc::new(Notify::new()),
            ended,
            ended_rx: Mutex::new(Some(ended_rx)),
        }
    }

    fn watchers(&self) -> MutexGuard<'_, HashMap<OperationId, watch::Sender<Stage>>> {
        self.watchers.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn work(&self) -> Arc<Notify> {
        self.work.clone()
    }

    pub fn take_ended(&self) -> Option<mpsc::UnboundedReceiver<OperationId>> {
        self.ended_rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// A receiver for an operation already watched here.
    pub fn subscribe(&self, id: &str) -> Option<watch::Receiver<Stage>> {
        self.watchers().get(id).map(|tx| tx.subscribe())
    }

    /// Starts watching an operation just read at `stage`.
    pub fn watch(&self, id: &str, stage: Stage) -> watch::Receiver<Stage> {
        let mut w = self.watchers();
        w.entry(id.to_string())
            .or_insert_with(|| watch::channel(stage).0)
            .subscribe()
    }

    /// Tells an operation's watchers what was just read of it.
    fn apply(&self, id: &str, read: Result<Option<Snapshot>, String>) {
        match read {
            Ok(Some(s)) => {
                let done = s.stage.is_done();
                let mut w = self.watchers();
                if let Some(tx) = w.get(id) {
                    tx.send_if_modified(|stage| {
                        // Never back from a later stage to an earlier one: a stale read
                        // raced with a newer one.
                        let regress = matches!(
                            (&*stage, &s.stage),
                            (Stage::Executing { .. }, Stage::Queued) | (Stage::Completed(_), _)
                        );
                        let changed = !regress && *stage != s.stage;
                        if changed {
                            *stage = s.stage.clone();
                        }
                        changed
                    });
                }
                if done {
                    w.remove(id);
                }
            }
            // Expired: its watchers see the channel close (UNAVAILABLE).
            Ok(None) => {
                self.watchers().remove(id);
            }
            Err(e) => tracing::debug!(operation = id, error = %e, "reading a watched operation"),
        }
    }
}

/// Re-reads every watched operation, REFRESH_BATCH to a round trip, and forgets the ones
/// nobody watches any more.
async fn refresh(s: &RedisState) {
    let names: Vec<String> = {
        let mut w = s.events.watchers();
        w.retain(|_, tx| tx.receiver_count() > 0);
        w.keys().cloned().collect()
    };
    for chunk in names.chunks(REFRESH_BATCH) {
        let mut p = redis::pipe();
        for name in chunk {
            let mut cmd = redis::cmd("HMGET");
            cmd.arg(s.key(&format!("op:{name}")))
                .arg(&SNAPSHOT_FIELDS[..]);
            p.add_command(cmd);
        }
        let each: Vec<Vec<Option<Vec<u8>>>> =
            match s.redis.run_pipe("reading watched operations", &p).await {
                Ok(each) => each,
                Err(e) => {
                    tracing::debug!(error = %e, "reading watched operations");
                    return;
                }
            };
        for (name, fields) in chunk.iter().zip(&each) {
            s.events.apply(name, parse_snapshot(name, fields));
        }
    }
}

/// Every POLL, re-reads the watched operations.
pub async fn poll(s: Arc<RedisState>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(POLL);
    loop {
        tokio::select! {
            _ = tick.tick() => refresh(&s).await,
            _ = stopped(&mut stop) => return,
        }
    }
}

/// The cluster's messages, until `stop`; resubscribes whenever the subscription ends.
pub async fn listen(s: Arc<RedisState>, mut stop: watch::Receiver<bool>) {
    use futures::StreamExt;
    let channel = s.key("events");
    loop {
        let connected = async {
            let mut pubsub = s.redis.client().get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        let pubsub = tokio::select! {
            r = tokio::time::timeout(s.redis.timeout(), connected) => r,
            _ = stopped(&mut stop) => return,
        };
        let mut stream = match pubsub {
            Ok(Ok(p)) => p.into_on_message(),
            Ok(Err(e)) => {
                tracing::warn!(server = s.redis.name(), error = %e, "subscribing to the cluster's events");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            Err(_) => {
                tracing::warn!(
                    server = s.redis.name(),
                    "subscribing to the cluster's events: no answer"
                );
                continue;
            }
        };
        // Whatever happened while unsubscribed.
        s.events.work.notify_one();
        refresh(&s).await;
        loop {
            let msg = tokio::select! {
                m = stream.next() => m,
                _ = stopped(&mut stop) => return,
            };
            let Some(msg) = msg else {
                tracing::warn!(
                    server = s.redis.name(),
                    "the cluster's event subscription ended; resubscribing"
                );
                break;
            };
            let payload = msg.get_payload_bytes();
            if payload == b"work" {
                s.events.work.notify_one();
            } else if let Some(id) = payload.strip_prefix(b"stage ") {
                let id = String::from_utf8_lossy(id).into_owned();
                if s.events.watchers().contains_key(&id) {
                    let read = s.read_snapshot(&id).await.map_err(|e| e.to_string());
                    s.events.apply(&id, read);
                }
                let _ = s.events.ended.send(id);
            }
        }
    }
}

/// Resolves once `stop` turns true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|v| *v).await;
}
