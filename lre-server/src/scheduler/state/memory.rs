//! Operations in this process's memory: one mutex, no await inside, so each method is one
//! atomic change. What a single lre-server (or `lre up`) uses. Leases never run out here:
//! nobody else could take an operation over, and the process's death loses them all.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime};

use async_trait::async_trait;
use bazel_remote_apis::build::bazel::remote::execution::v2::ExecuteResponse;
use tokio::sync::{watch, Notify};

use super::{Bounds, OperationState, MAX_QUEUES};
use crate::error::{Error, Result};
use crate::scheduler::clock::Clock;
use crate::scheduler::job::Job;
use crate::scheduler::model::{
    ActionKey, Claimed, Claims, Lease, NewOperation, OperationId, Outcome, Queue, QueueHead,
    RegisteredWorker, Snapshot, Stage, Submission,
};

struct Op {
    key: ActionKey,
    /// What its worker needs; dropped once it completes.
    job: Option<Arc<Job>>,
    /// `None` for an operation answered without running.
    queue: Option<Queue>,
    /// (priority, sequence): its place in its queue, kept across requeues.
    rank: (i32, u64),
    attempts: u32,
    lease: Option<Lease>,
    stage: watch::Sender<Stage>,
    queued_at: SystemTime,
    finished_at: Option<Instant>,
}

#[derive(Default)]
struct Inner {
    next_seq: u64,
    ops: HashMap<OperationId, Op>,
    in_flight: HashMap<ActionKey, OperationId>,
    /// Only queues that hold operations.
    queues: HashMap<Queue, BTreeMap<(i32, u64), OperationId>>,
    queued: usize,
    executing: usize,
    /// Completed operations, in the order they completed.
    finished: VecDeque<OperationId>,
}

pub struct MemoryState {
    inner: Mutex<Inner>,
    bounds: Bounds,
    clock: Arc<dyn Clock>,
    work: Arc<Notify>,
}

impl MemoryState {
    pub fn new(bounds: Bounds, clock: Arc<dyn Clock>) -> MemoryState {
        MemoryState {
            inner: Mutex::new(Inner::default()),
            bounds,
            clock,
            work: Arc::new(Notify::new()),
        }
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Forgets operations finished longer than `keep_finished` ago.
    fn forget_old(&self, st: &mut Inner) {
        let now = self.clock.now();
        while let Some(id) = st.finished.front() {
            let old = st.ops.get(id).and_then(|o| o.finished_at);
            match old {
                Some(t) if now.duration_since(t) < self.bounds.keep_finished => break,
                _ => {
                    if let Some(id) = st.finished.pop_front() {
                        if st.ops.get(&id).is_some_and(|o| o.finished_at.is_some()) {
                            st.ops.remove(&id);
                        }
                    }
                }
            }
        }
    }

    /// Room for one more operation: finished ones are forgotten early, oldest first.
    fn make_room(&self, st: &mut Inner) -> Result<()> {
        self.forget_old(st);
        while st.ops.len() >= self.bounds.max_operations {
            let Some(old) = st.finished.pop_front() else {
                return Err(Error::ResourceExhausted(format!(
                    "the scheduler tracks {} operations (execution.max_operations); retry later",
                    st.ops.len()
                )));
            };
            if st.ops.get(&old).is_some_and(|o| o.finished_at.is_some()) {
                st.ops.remove(&old);
            }
        }
        Ok(())
    }

    fn complete(&self, st: &mut Inner, id: &OperationId, outcome: Outcome) {
        let now = self.clock.now();
        let Some(op) = st.ops.get_mut(id) else { return };
        match *op.stage.borrow() {
            Stage::Queued => {
                if let Some(q) = &op.queue {
                    if let Some(list) = st.queues.get_mut(q) {
                        list.remove(&op.rank);
                        st.queued -= 1;
                        if list.is_empty() {
                            st.queues.remove(q);
                        }
                    }
                }
            }
            Stage::Executing { .. } => st.executing -= 1,
            Stage::Completed(_) => return,
        }
        op.lease = None;
        op.job = None;
        op.finished_at = Some(now);
        let _ = op.stage.send_replace(Stage::Completed(outcome));
        if st.in_flight.get(&op.key) == Some(id) {
            st.in_flight.remove(&op.key);
        }
        st.finished.push_back(id.clone());
    }
}

#[async_trait]
impl OperationState for MemoryState {
    async fn submit(&self, new: NewOperation) -> Result<Submission> {
        let mut st = self.inner();
        if let Some(id) = st.in_flight.get(&new.job.key) {
            return Ok(Submission {
                id: id.clone(),
                joined: true,
            });
        }
        if st.queued >= self.bounds.max_queued {
            return Err(Error::ResourceExhausted(format!(
                "the execution queue is full ({} actions waiting, execution.max_queued_actions); retry later",
                st.queued
            )));
        }
        if !st.queues.contains_key(&new.queue) && st.queues.len() >= MAX_QUEUES {
            return Err(Error::ResourceExhausted(format!(
                "{MAX_QUEUES} distinct (instance, platform) queues hold actions already; retry later"
            )));
        }
        self.make_room(&mut st)?;
        let rank = (new.priority, st.next_seq);
        st.next_seq += 1;
        let key = new.job.key.clone();
        st.ops.insert(
            new.id.clone(),
            Op {
                key: key.clone(),
                job: Some(new.job),
                queue: Some(new.queue.clone()),
                rank,
                attempts: 0,
                lease: None,
                stage: watch::channel(Stage::Queued).0,
                queued_at: new.queued_at,
                finished_at: None,
            },
        );
        st.in_flight.insert(key, new.id.clone());
        st.queues
            .entry(new.queue)
            .or_default()
            .insert(rank, new.id.clone());
        st.queued += 1;
        drop(st);
        self.work.notify_one();
        Ok(Submission {
            id: new.id,
            joined: false,
        })
    }

    async fn record_answered(
        &self,
        id: &OperationId,
        key: &ActionKey,
        response: ExecuteResponse,
    ) -> Result<()> {
        let mut st = self.inner();
        self.make_room(&mut st)?;
        let now = self.clock.now();
        st.ops.insert(
            id.clone(),
            Op {
                key: key.clone(),
                job: None,
                queue: None,
                rank: (0, 0),
                attempts: 0,
                lease: None,
                stage: watch::channel(Stage::Completed(Ok(response))).0,
                queued_at: self.clock.wall(),
                finished_at: Some(now),
            },
        );
        st.finished.push_back(id.clone());
        Ok(())
    }

    async fn claim(
        &self,
        queue: &Queue,
        holder: &str,
        max: usize,
        before: Option<(i32, u64)>,
    ) -> Result<Claims> {
        let mut st = self.inner();
        let st = &mut *st;
        let mut claimed = Vec::new();
        let Some(list) = st.queues.get_mut(queue) else {
            return Ok(Claims {
                claimed,
                next: None,
            });
        };
        while claimed.len() < max {
            let Some(entry) = list.first_entry() else {
                break;
            };
            if before.is_some_and(|b| *entry.key() >= b) {
                break;
            }
            let id = entry.remove();
            st.queued -= 1;
            st.executing += 1;
            let Some(op) = st.ops.get_mut(&id) else {
                return Err(Error::Internal(format!(
                    "queued operation {id} has no record"
                )));
            };
            op.attempts += 1;
            let lease = Lease {
                holder: holder.to_string(),
                attempt: op.attempts,
            };
            op.lease = Some(lease.clone());
            let _ = op.stage.send_replace(Stage::Executing {
                attempt: op.attempts,
            });
            let Some(job) = op.job.clone() else {
                return Err(Error::Internal(format!("queued operation {id} has no job")));
            };
            claimed.push(Claimed {
                id,
                job,
                queue: queue.clone(),
                lease,
                queued_at: op.queued_at,
            });
        }
        let next = list.first_key_value().map(|(rank, _)| *rank);
        if list.is_empty() {
            st.queues.remove(queue);
        }
        Ok(Claims { claimed, next })
    }

    async fn finish(
        &self,
        id: &OperationId,
        lease: Option<&Lease>,
        outcome: Outcome,
    ) -> Result<bool> {
        let mut st = self.inner();
        let held = match st.ops.get(id) {
            None => return Ok(false),
            Some(op) if op.finished_at.is_some() => return Ok(false),
            Some(op) => lease.is_none_or(|l| op.lease.as_ref() == Some(l)),
        };
        if !held {
            return Ok(false);
        }
        self.complete(&mut st, id, outcome);
        self.forget_old(&mut st);
        Ok(true)
    }

    async fn requeue(&self, id: &OperationId, lease: &Lease, counted: bool) -> Result<bool> {
        let mut st = self.inner();
        let Some(op) = st.ops.get_mut(id) else {
            return Ok(false);
        };
        if op.finished_at.is_some() || op.lease.as_ref() != Some(lease) {
            return Ok(false);
        }
        if !counted {
            op.attempts = op.attempts.saturating_sub(1);
        }
        op.lease = None;
        let _ = op.stage.send_replace(Stage::Queued);
        let (queue, rank) = (op.queue.clone(), op.rank);
        if let Some(q) = queue {
            st.queues.entry(q).or_default().insert(rank, id.clone());
        }
        st.executing -= 1;
        st.queued += 1;
        drop(st);
        self.work.notify_one();
        Ok(true)
    }

    async fn renew(&self, held: &[(OperationId, Lease)]) -> Result<Vec<OperationId>> {
        let st = self.inner();
        Ok(held
            .iter()
            .filter(|(id, lease)| {
                st.ops
                    .get(id)
                    .is_none_or(|op| op.finished_at.is_some() || op.lease.as_ref() != Some(lease))
            })
            .map(|(id, _)| id.clone())
            .collect())
    }

    async fn expired(&self, _max: usize) -> Result<Vec<(OperationId, Lease)>> {
        Ok(Vec::new())
    }

    async fn fail_queued(&self, queue: &Queue, outcome: Outcome, max: usize) -> Result<usize> {
        let mut st = self.inner();
        let ids: Vec<OperationId> = st
            .queues
            .get(queue)
            .map(|l| l.values().take(max).cloned().collect())
            .unwrap_or_default();
        for id in &ids {
            self.complete(&mut st, id, outcome.clone());
        }
        Ok(ids.len())
    }

    async fn snapshot(&self, id: &OperationId) -> Result<Option<Snapshot>> {
        // What outlived `keep_finished` is gone now, not at the next submit.
        let mut st = self.inner();
        self.forget_old(&mut st);
        Ok(st.ops.get(id).map(|op| Snapshot {
            key: op.key.clone(),
            stage: op.stage.borrow().clone(),
            queued_at: op.queued_at,
        }))
    }

    async fn watch(&self, id: &OperationId) -> Result<Option<watch::Receiver<Stage>>> {
        let mut st = self.inner();
        self.forget_old(&mut st);
        Ok(st.ops.get(id).map(|op| op.stage.subscribe()))
    }

    async fn queues(&self) -> Result<Vec<QueueHead>> {
        let st = self.inner();
        Ok(st
            .queues
            .iter()
            .filter_map(|(q, list)| {
                let (rank, id) = list.first_key_value()?;
                Some(QueueHead {
                    queue: q.clone(),
                    queued: list.len(),
                    head: *rank,
                    oldest: st.ops.get(id).map(|o| o.queued_at),
                })
            })
            .collect())
    }

    async fn executing(&self) -> Result<usize> {
        Ok(self.inner().executing)
    }

    async fn publish_workers(
        &self,
        _replica: &str,
        workers: Vec<RegisteredWorker>,
    ) -> Result<Vec<RegisteredWorker>> {
        Ok(workers)
    }

    fn work(&self) -> Arc<Notify> {
        self.work.clone()
    }

    fn shared(&self) -> bool {
        false
    }
}
