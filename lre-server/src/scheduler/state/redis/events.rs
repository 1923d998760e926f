//! What replicas tell each other through the channel `P events`: "work" (something was
//! queued: claim) and "stage ID STAGE" (an operation changed: tell its watchers here, and
//! the scheduler, which stops running here what completed elsewhere). A queued or executing
//! stage travels in the message; a completed one's outcome is read, in batches, by one
//! reader task, so the listener never waits on Redis. A lost message costs only latency:
//! every watched operation is also re-read every `POLL`.

use std::collections::{HashMap, HashSet};
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
    /// Watched operations that completed: read by `read_completed`.
    to_read: Mutex<HashSet<OperationId>>,
    read_more: Notify,
    work: Arc<Notify>,
    ended: mpsc::UnboundedSender<OperationId>,
    ended_rx: Mutex<Option<mpsc::UnboundedReceiver<OperationId>>>,
}

impl Events {
    pub fn new() -> Events {
        let (ended, ended_rx) = mpsc::unbounded_channel();
        Events {
            watchers: Mutex::new(HashMap::new()),
            to_read: Mutex::new(HashSet::new()),
            read_more: Notify::new(),
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

    /// Has `read_completed` read a watched operation that completed (its outcome is not in
    /// the message); nobody here watching it, nothing to read.
    fn read_later(&self, id: &str) {
        if !self.watchers().contains_key(id) {
            return;
        }
        self.to_read
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_string());
        self.read_more.notify_one();
    }

    /// The completed operations gathered since the last call.
    fn take_to_read(&self) -> Vec<OperationId> {
        self.to_read
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .collect()
    }

    /// Forgets a watcher registered for an operation that was not queued after all.
    pub fn unwatch(&self, id: &str) {
        self.watchers().remove(id);
    }

    /// Tells an operation's watchers its stage, as read or as a message said.
    fn tell(&self, id: &str, new: Stage) {
        let done = new.is_done();
        let mut w = self.watchers();
        if let Some(tx) = w.get(id) {
            tx.send_if_modified(|stage| {
                // Never back from a later stage to an earlier one: a stale read raced with
                // a newer one. (A requeued action shows its next attempt when claimed.)
                let regress = match (&*stage, &new) {
                    (Stage::Completed(_), _) => true,
                    (Stage::Executing { .. }, Stage::Queued) => true,
                    (Stage::Executing { attempt: a }, Stage::Executing { attempt: b }) => b < a,
                    _ => false,
                };
                let changed = !regress && *stage != new;
                if changed {
                    *stage = new.clone();
                }
                changed
            });
        }
        if done {
            w.remove(id);
        }
    }

    /// Tells an operation's watchers what was just read of it.
    fn apply(&self, id: &str, read: Result<Option<Snapshot>, String>) {
        match read {
            Ok(Some(s)) => self.tell(id, s.stage),
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
    read_and_tell(s, &names).await
}

/// Reads `names`, REFRESH_BATCH to a round trip, and tells their watchers.
async fn read_and_tell(s: &RedisState, names: &[String]) {
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

/// Reads the outcomes of watched operations that completed, as the listener names them:
/// whatever gathered while the last batch was read goes in the next.
pub async fn read_completed(s: Arc<RedisState>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = s.events.read_more.notified() => {}
            _ = stopped(&mut stop) => return,
        }
        let names = s.events.take_to_read();
        read_and_tell(&s, &names).await;
    }
}

/// What a "stage" message says: the operation, and its stage unless it must be read.
fn parse_stage(msg: &[u8]) -> Option<(String, Option<Stage>)> {
    let text = std::str::from_utf8(msg.strip_prefix(b"stage ")?).ok()?;
    let mut words = text.split(' ');
    let id = words.next()?.to_string();
    let stage = match (words.next(), words.next()) {
        (Some("queued"), None) => Some(Stage::Queued),
        (Some("executing"), Some(n)) => n.parse().ok().map(|attempt| Stage::Executing { attempt }),
        // Completed (its outcome is read), or a form this version does not know.
        _ => None,
    };
    Some((id, stage))
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
            } else if let Some((id, stage)) = parse_stage(payload) {
                match stage {
                    Some(stage) => s.events.tell(&id, stage),
                    None => {
                        s.events.read_later(&id);
                        let _ = s.events.ended.send(id);
                    }
                }
            }
        }
    }
}

/// Resolves once `stop` turns true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|v| *v).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_messages_carry_what_needs_no_read() {
        let id = "0b7c4c1e-0000-4000-8000-000000000000";
        assert_eq!(
            parse_stage(format!("stage {id} queued").as_bytes()),
            Some((id.to_string(), Some(Stage::Queued)))
        );
        assert_eq!(
            parse_stage(format!("stage {id} executing 2").as_bytes()),
            Some((id.to_string(), Some(Stage::Executing { attempt: 2 })))
        );
        for unread in ["completed", "", "executing x", "something new"] {
            let msg = format!("stage {id} {unread}");
            assert_eq!(
                parse_stage(msg.trim_end().as_bytes()),
                Some((id.to_string(), None)),
                "{msg}"
            );
        }
        assert_eq!(parse_stage(b"work"), None);
    }
}
