//! Where operations live: one trait (`OperationState`), two implementations. `memory`
//! keeps them in this process's maps, under one lock; `redis` keeps them where every
//! replica sees them, each change one Lua script. The state only carries out changes, each
//! atomic and guarded (a claim must still hold its lease, a queued operation must still be
//! queued); it decides nothing. What happens when (how many attempts, when a worker is
//! lost, what a grace allows) is decided once, above it, in `Scheduler`.
//!
//! Every method's guard is part of its contract, so both implementations are held to the
//! same behaviour by one test suite (`lre-server/tests/scheduler.rs`).

pub mod memory;
pub mod redis;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bazel_remote_apis::build::bazel::remote::execution::v2::ExecuteResponse;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use super::model::{
    ActionKey, Claims, Lease, NewOperation, OperationId, Outcome, Queue, QueueHead,
    RegisteredWorker, Snapshot, Stage, Submission,
};
use crate::error::Result;

/// Distinct (instance, platform) queues; past this, an Execute for a new one is refused,
/// so a client cannot grow the state without bound.
pub const MAX_QUEUES: usize = 1024;

/// The bounds every implementation keeps.
#[derive(Clone, Debug)]
pub struct Bounds {
    /// Operations waiting for a worker; past it, submit is RESOURCE_EXHAUSTED.
    pub max_queued: usize,
    /// Operations known at once (queued, running, finished and kept); finished ones are
    /// forgotten early to make room.
    pub max_operations: usize,
    /// How long a finished operation stays queryable.
    pub keep_finished: Duration,
}

impl Default for Bounds {
    fn default() -> Self {
        Bounds {
            max_queued: 100_000,
            max_operations: 200_000,
            keep_finished: Duration::from_secs(600),
        }
    }
}

#[async_trait]
pub trait OperationState: Send + Sync + 'static {
    /// Queues `op`, or joins the identical action (same instance and action) already
    /// queued or executing. RESOURCE_EXHAUSTED past the bounds or `MAX_QUEUES`.
    async fn submit(&self, op: NewOperation) -> Result<Submission>;

    /// Records an operation answered without running it (a cache hit, missing inputs):
    /// completed at once, and queryable like any other for `keep_finished`.
    async fn record_answered(
        &self,
        id: &OperationId,
        key: &ActionKey,
        response: ExecuteResponse,
    ) -> Result<()>;

    /// Takes up to `max` operations from the head of `queue`, in order, into executing,
    /// each under a new lease of `holder` for its next attempt: one change for a batch, so
    /// a replica with many free slots fills them in one round trip. Only operations ranked
    /// before `before` (another queue's head, which comes next) are taken, so batching keeps
    /// the order across queues.
    async fn claim(
        &self,
        queue: &Queue,
        holder: &str,
        max: usize,
        before: Option<(i32, u64)>,
    ) -> Result<Claims>;

    /// Completes an operation that is not completed yet, if `lease` still holds it (`None`:
    /// whoever holds it, as CancelOperation). True if this call completed it.
    async fn finish(
        &self,
        id: &OperationId,
        lease: Option<&Lease>,
        outcome: Outcome,
    ) -> Result<bool>;

    /// Puts an executing operation held by `lease` back in its queue, at its old place.
    /// `counted`: the attempt counts (its worker was lost); otherwise the claim never ran
    /// (no worker could take it after all). True if it was requeued.
    async fn requeue(&self, id: &OperationId, lease: &Lease, counted: bool) -> Result<bool>;

    /// Keeps the leases of executing operations alive; returns those no longer held by the
    /// given lease (completed meanwhile, cancelled, or given to another claim).
    async fn renew(&self, held: &[(OperationId, Lease)]) -> Result<Vec<OperationId>>;

    /// Executing operations whose lease ran out (their holder stopped renewing), at most
    /// `max`, with that lease: for the scheduler to requeue or fail.
    async fn expired(&self, max: usize) -> Result<Vec<(OperationId, Lease)>>;

    /// Completes up to `max` queued operations at the head of `queue` with `outcome` (no
    /// worker can run them). Returns how many.
    async fn fail_queued(&self, queue: &Queue, outcome: Outcome, max: usize) -> Result<usize>;

    async fn snapshot(&self, id: &OperationId) -> Result<Option<Snapshot>>;

    /// The operation's stage now and at each change; `None` if it is unknown.
    async fn watch(&self, id: &OperationId) -> Result<Option<watch::Receiver<Stage>>>;

    /// The queues that hold actions, with their heads.
    async fn queues(&self) -> Result<Vec<QueueHead>>;

    /// Operations executing, over every replica.
    async fn executing(&self) -> Result<usize>;

    /// Publishes this replica's workers and returns every replica's (this one's
    /// included). A state no other replica shares returns `workers` as they are.
    async fn publish_workers(
        &self,
        replica: &str,
        workers: Vec<RegisteredWorker>,
    ) -> Result<Vec<RegisteredWorker>>;

    /// Notified when something was queued or requeued (here or on another replica).
    fn work(&self) -> Arc<Notify>;

    /// Operations that completed elsewhere (another replica's CancelOperation), so that
    /// this replica stops running them; never fed by a state only this process uses.
    fn ended_elsewhere(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<OperationId>> {
        None
    }

    /// Whether other replicas share this state: leases then expire unless renewed, and
    /// worker registrations come from every replica.
    fn shared(&self) -> bool;

    /// Background work of its own (subscriptions, refreshing watchers), until `stop`.
    fn start(self: Arc<Self>, _stop: watch::Receiver<bool>) -> Vec<JoinHandle<()>> {
        Vec::new()
    }
}
