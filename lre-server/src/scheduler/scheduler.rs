//! The scheduler: every decision about an operation, written once, for one replica and for
//! many. The operation state (`state`, in memory or shared in Redis) carries out guarded
//! changes; the workers connected here are the pool (`pool`); who can run what, with the
//! grace, is `capability`. Here:
//!
//! - **submit**: an action no worker can ever run is refused at once; otherwise it is
//!   queued, or joins the identical action in flight (on any replica).
//! - **dispatch**: while a worker here has a free slot, the runnable queue whose head comes
//!   first (priority, then arrival) gives its head to the least busy worker that can run it.
//! - **report**: a worker's result completes the operation, if its claim still holds it.
//! - **loss**: an action whose worker was lost, whose worker held it past its deadline,
//!   whose holder stopped renewing its lease (another replica died), or whose worker could
//!   not run it for a passing reason (`retry`: the storage did not answer) goes back to its
//!   queue, or fails once it has used its attempts (`execution.max_attempts`).
//! - **cancel**: the operation completes CANCELLED at once; its worker is told to stop, and
//!   its slot stays busy until the worker says the action is gone.
//! - **stranded**: queued actions of a queue nothing can run for the worker grace fail
//!   with FAILED_PRECONDITION naming what is missing.
//!
//! Every timed rule reads the injected clock (`clock`), so tests move time instead of
//! sleeping. `tick` runs the timed rules once; `start` runs it every second, and the
//! dispatcher whenever something was queued or a slot came free.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bazel_remote_apis::build::bazel::remote::execution::v2::ExecuteResponse;
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;

use super::capability::{Capabilities, Verdict};
use super::clock::Clock;
use super::job::Job;
use super::model::{
    failed, ActionKey, Lease, NewOperation, OperationId, Outcome, Queue, RegisteredWorker,
    Snapshot, Stage, WorkerCommand, WorkerSpec,
};
use super::platform::Properties;
use super::pool::{Running, WorkerPool, WorkerView};
use super::state::OperationState;
use crate::error::{Error, Result};

/// Leases renewed and registrations rewritten this often (shared state).
pub const TICK: Duration = Duration::from_secs(2);
/// A queue no worker can serve fails after the grace, and never sooner than this with a
/// shared state: registrations are rewritten every TICK.
const STRANDED_AT_LEAST: Duration = Duration::from_secs(2 * TICK.as_secs());
/// Expired leases handled by one tick.
const REAP_BATCH: usize = 64;
/// Stranded operations failed per queue and tick.
const STRAND_BATCH: usize = 256;
/// Operations one claim takes at most, however many slots are free: one script holds
/// Redis for the whole batch, so a batch is bounded; dispatch claims again for the rest.
pub const MAX_CLAIM: usize = 64;

#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// How many workers may be lost under one action before it fails.
    pub max_attempts: u32,
    /// How long actions wait for a worker that may come back (see `capability`).
    pub worker_grace: Duration,
    /// Past an action's timeout, the time its worker has to answer before it is dropped;
    /// also the time a cancelled action has to be gone.
    pub deadline_grace: Duration,
    /// Platforms of workers that are expected but may not be connected right now.
    pub known_platforms: Vec<Properties>,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            max_attempts: 3,
            worker_grace: Duration::from_secs(30),
            deadline_grace: Duration::from_secs(60),
            known_platforms: vec![],
        }
    }
}

/// What `submit` hands back: the operation to watch, and whether it joined one in flight.
pub struct Submitted {
    pub operation: OperationId,
    pub stage: watch::Receiver<Stage>,
    pub joined: bool,
}

/// Why an executing action was lost.
#[derive(Clone, Debug)]
enum Loss {
    /// Its worker disconnected.
    Worker,
    /// Its worker held it past its timeout.
    Deadline,
    /// Its holder stopped renewing the lease (a replica died).
    Lease,
    /// Its worker could not run it for a passing reason (the CAS did not answer as it
    /// fetched inputs or uploaded outputs): what it said.
    Unavailable(String),
}

/// The scheduler at a glance, over every replica.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Overview {
    /// Workers connected to any replica, with the replica that holds each.
    pub workers: Vec<ClusterWorker>,
    pub queued: usize,
    pub executing: usize,
    pub oldest_queued_ms: Option<u64>,
    /// Queued actions that no connected worker can run (they wait for a known platform,
    /// or for a worker that may be reconnecting).
    pub unmatchable: usize,
    /// Replicas sharing this state (1 when alone).
    pub replicas: usize,
}

/// One worker as the status page shows it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ClusterWorker {
    pub id: String,
    pub replica: String,
    /// Whether it is connected to the replica answering.
    pub here: bool,
    pub properties: Vec<(String, String)>,
    pub capacity: usize,
    pub running: usize,
    pub instances: Option<Vec<String>>,
    /// Time since its last keepalive, for a worker connected here.
    pub since_heard_ms: Option<u64>,
}

pub struct Scheduler {
    state: Arc<dyn OperationState>,
    pool: WorkerPool,
    caps: Capabilities,
    clock: Arc<dyn Clock>,
    config: SchedulerConfig,
    /// This process, as leases and registrations name it.
    holder: String,
    /// A slot may have come free (a worker connected, an action ended).
    freed: Notify,
    /// Queues (by id) no worker could serve at the last looks, and since when.
    unservable: Mutex<HashMap<String, Instant>>,
    /// When registrations were last read whole (the stranded sweep trusts only fresh ones),
    /// and since when they have been stale.
    registered_at: Mutex<(Option<Instant>, Option<Instant>)>,
    /// Outcomes not yet recorded (the shared state was away): retried every tick, their
    /// leases renewed meanwhile, so no other replica reruns what finished here.
    pending: Mutex<HashMap<OperationId, (Lease, Outcome)>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Scheduler {
    pub fn new(
        state: Arc<dyn OperationState>,
        clock: Arc<dyn Clock>,
        config: SchedulerConfig,
    ) -> Scheduler {
        let holder = if state.shared() {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
            format!(
                "{}-{}-{}",
                host.trim(),
                std::process::id(),
                &uuid::Uuid::new_v4().simple().to_string()[..8]
            )
        } else {
            "local".to_string()
        };
        Scheduler {
            pool: WorkerPool::new(clock.clone(), config.deadline_grace),
            caps: Capabilities::new(
                config.known_platforms.clone(),
                config.worker_grace,
                clock.now(),
            ),
            state,
            clock,
            config,
            holder,
            freed: Notify::new(),
            unservable: Mutex::new(HashMap::new()),
            registered_at: Mutex::new((None, None)),
            pending: Mutex::new(HashMap::new()),
        }
    }

    /// This replica's name in leases and registrations.
    pub fn holder(&self) -> &str {
        &self.holder
    }

    fn local_specs(&self) -> Vec<WorkerSpec> {
        self.pool.specs().into_iter().map(|(_, s, _)| s).collect()
    }

    /// Queues an action for whichever worker can run it, or joins the identical one in
    /// flight. FAILED_PRECONDITION if no worker could ever run it (after the grace),
    /// RESOURCE_EXHAUSTED past the bounds, UNAVAILABLE while a shared state is away.
    pub async fn submit(
        &self,
        job: Arc<Job>,
        platform: Properties,
        priority: i32,
    ) -> Result<Submitted> {
        let queue = Queue::new(&job.key.instance, platform);
        if let Verdict::Never(why) =
            self.caps
                .verdict(&self.local_specs(), &queue, self.clock.now())
        {
            let why = match self.state.shared() {
                true => format!("no worker on any replica can run it: {why}"),
                false => why,
            };
            return Err(Error::FailedPrecondition(why));
        }
        let sub = self
            .state
            .submit(NewOperation {
                id: uuid::Uuid::new_v4().to_string(),
                job,
                queue,
                priority,
                queued_at: self.clock.wall(),
            })
            .await?;
        let stage = self.state.watch(&sub.id).await?.ok_or_else(|| {
            Error::Unavailable(format!("operation {} vanished as it was queued", sub.id))
        })?;
        if !sub.joined {
            self.dispatch_now().await;
        }
        Ok(Submitted {
            operation: sub.id,
            stage,
            joined: sub.joined,
        })
    }

    /// Records an Execute answered without running (a cache hit, missing inputs), so that
    /// its operation name answers GetOperation and WaitExecution like any other.
    pub async fn record_answered(
        &self,
        key: &ActionKey,
        response: ExecuteResponse,
    ) -> Result<OperationId> {
        let id = uuid::Uuid::new_v4().to_string();
        self.state.record_answered(&id, key, response).await?;
        Ok(id)
    }

    pub async fn snapshot(&self, id: &str) -> Result<Option<Snapshot>> {
        self.state.snapshot(&id.to_string()).await
    }

    pub async fn watch(&self, id: &str) -> Result<Option<watch::Receiver<Stage>>> {
        self.state.watch(&id.to_string()).await
    }

    /// Cancels a queued or executing operation (on any replica). False if it is unknown
    /// or done.
    pub async fn cancel(&self, id: &str) -> Result<bool> {
        let id = id.to_string();
        let outcome = failed(tonic::Code::Cancelled, "cancelled by CancelOperation");
        let done = self.state.finish(&id, None, outcome).await?;
        if done {
            // Running here: the worker is told now. Elsewhere: its replica learns when it
            // renews the lease, or from the cluster's message sooner.
            self.pool.cancel(&id);
        }
        Ok(done)
    }

    // ---------------------------------------------------------------- workers

    /// Adds a worker; commands for it arrive on the returned channel.
    pub fn connect_worker(
        &self,
        id: String,
        spec: WorkerSpec,
    ) -> Result<(u64, mpsc::UnboundedReceiver<WorkerCommand>)> {
        let r = self.pool.connect(id, spec.clone())?;
        self.caps.connected(&spec, self.clock.now());
        self.freed.notify_one();
        Ok(r)
    }

    /// A worker connection ended: the actions it ran are lost.
    pub async fn disconnect(&self, id: &str, session: u64) {
        for r in self.pool.disconnect(id, session) {
            tracing::warn!(operation = %r.id, worker = id, "worker lost");
            self.lose(r, Loss::Worker).await;
        }
        self.freed.notify_one();
    }

    pub fn heard_from(&self, id: &str, session: u64) {
        self.pool.heard_from(id, session);
    }

    /// What a worker runs under `id` (its job, its lease), while it runs it.
    pub fn running(&self, worker: &str, id: &str) -> Option<Running> {
        self.pool.running(worker, id)
    }

    /// A worker reported on an action: its slot is free. What to complete, or `None`: the
    /// worker no longer held it, or it was cancelled (the report says it is gone).
    pub fn take_report(&self, worker: &str, id: &str) -> Option<Running> {
        let r = self.pool.report(worker, id);
        self.freed.notify_one();
        r.filter(|r| !r.cancelling)
    }

    /// Completes an action a worker ran, if its claim still holds it, and gives its slot
    /// the next action.
    pub async fn complete(&self, r: &Running, outcome: Outcome) {
        match self
            .state
            .finish(&r.id, Some(&r.lease), outcome.clone())
            .await
        {
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(operation = %r.id, error = %e, "recording an outcome; retrying");
                lock(&self.pending).insert(r.id.clone(), (r.lease.clone(), outcome));
            }
        }
        self.dispatch_now().await;
    }

    /// Hands out free slots from a request's path (a submit, a report), rather than one
    /// task switch later, where that is safe: with the state in this process, `dispatch`
    /// never waits, so dropping the request's future cannot cut it between a claim and the
    /// hand-over. With a shared state it waits on Redis, so the dispatcher task does it.
    async fn dispatch_now(&self) {
        if self.state.shared() {
            self.freed.notify_one();
            return;
        }
        if let Err(e) = self.dispatch().await {
            tracing::debug!(error = %e, "dispatching; the dispatcher retries");
            self.freed.notify_one();
        }
    }

    /// A worker could not run an action for a passing reason (UNAVAILABLE: the storage did
    /// not answer): another attempt, as if its worker had been lost, or a failure naming
    /// `why` once the attempts are used up. Clients get one result per Execute, not a
    /// transient error of one try.
    pub async fn retry(&self, r: &Running, why: String) {
        tracing::warn!(operation = %r.id, attempt = r.lease.attempt, reason = %why, "an attempt failed for a passing reason");
        self.lose_lease(&r.id, &r.lease, Loss::Unavailable(why), r.job.timeout)
            .await
    }

    pub fn worker_count(&self) -> usize {
        self.pool.count()
    }

    /// The loss rule: back to its queue, or failed once its attempts are used up.
    async fn lose(&self, r: Running, why: Loss) {
        self.lose_lease(&r.id, &r.lease, why, r.job.timeout).await
    }

    async fn lose_lease(&self, id: &OperationId, lease: &Lease, why: Loss, timeout: Duration) {
        let last = lease.attempt >= self.config.max_attempts;
        let r = match (last, why.clone()) {
            (false, _) => self.state.requeue(id, lease, true).await,
            (true, Loss::Deadline) => {
                let msg = format!(
                    "a worker held the action past its timeout ({timeout:?}) on its last attempt ({} of {}); giving up",
                    lease.attempt, self.config.max_attempts
                );
                self.state
                    .finish(id, Some(lease), failed(tonic::Code::DeadlineExceeded, msg))
                    .await
            }
            (true, Loss::Unavailable(why)) => {
                let msg = format!(
                    "the action's worker could not run it on any of its {} attempts; giving up; the last: {why}",
                    lease.attempt
                );
                self.state
                    .finish(id, Some(lease), failed(tonic::Code::Unavailable, msg))
                    .await
            }
            (true, Loss::Worker | Loss::Lease) => {
                let msg = format!(
                    "the action's worker (or its replica) was lost {} times; giving up",
                    lease.attempt
                );
                self.state
                    .finish(id, Some(lease), failed(tonic::Code::Unavailable, msg))
                    .await
            }
        };
        match r {
            Ok(true) if !last => {
                tracing::warn!(operation = %id, attempt = lease.attempt, ?why, "requeued a lost action")
            }
            Ok(_) => {}
            // The lease runs out meanwhile; the next reap (here or elsewhere) retries.
            Err(e) => tracing::warn!(operation = %id, error = %e, "giving a lost action back"),
        }
    }

    // ---------------------------------------------------------------- dispatch

    /// While a worker here has a free slot, claims from the runnable queue whose head comes
    /// first, as many as the free slots that can run it (up to the next queue's head), and
    /// hands them to workers. The queues are listed once per pass: each claim says its
    /// queue's new head, so the pass goes on without listing them again.
    pub async fn dispatch(&self) -> Result<()> {
        loop {
            let mut idle = self.pool.idle();
            if idle.is_empty() {
                return Ok(());
            }
            let mut heads = self.state.queues().await?;
            let mut emptied = false;
            loop {
                // The queues an idle worker can run, the one whose head comes first, and
                // the free slots that can take from it.
                heads.retain(|h| {
                    idle.iter()
                        .any(|(s, _)| s.can_run(&h.queue.instance, &h.queue.platform))
                });
                let Some(best) = (0..heads.len()).min_by_key(|&i| heads[i].head) else {
                    break;
                };
                let queue = heads[best].queue.clone();
                let slots: usize = idle
                    .iter()
                    .filter(|(s, _)| s.can_run(&queue.instance, &queue.platform))
                    .map(|(_, free)| free)
                    .sum::<usize>()
                    .min(MAX_CLAIM);
                let runner_up = heads
                    .iter()
                    .enumerate()
                    .filter(|&(i, _)| i != best)
                    .map(|(_, h)| h.head)
                    .min();
                let claims = self
                    .state
                    .claim(&queue, &self.holder, slots, runner_up)
                    .await?;
                match claims.next {
                    Some(next) => heads[best].head = next,
                    None => {
                        heads.swap_remove(best);
                        emptied = true;
                    }
                }
                let mut claimed = claims.claimed.into_iter();
                for c in claimed.by_ref() {
                    // Requeued while it still ran here: taken back, not run twice.
                    let Err(c) = self.pool.adopt(c) else { continue };
                    if let Err(c) = self.pool.assign(c) {
                        // A worker went between looking and claiming: this and the rest go
                        // back to the queue, not counted as attempts (they never ran).
                        self.state.requeue(&c.id, &c.lease, false).await?;
                        for c in claimed {
                            self.state.requeue(&c.id, &c.lease, false).await?;
                        }
                        return Ok(());
                    }
                }
                idle = self.pool.idle();
                if idle.is_empty() {
                    return Ok(());
                }
            }
            // Slots are left: list again only if a queue ran dry (others may hold more
            // than was listed); otherwise nothing here can take what is queued.
            if !emptied {
                return Ok(());
            }
        }
    }

    // ---------------------------------------------------------------- timed rules

    /// The timed rules, once: actions held past their deadline, reports to retry, leases
    /// to renew (a shared state), leases that ran out, every replica's workers to read,
    /// and queues nothing can serve.
    pub async fn tick(&self) {
        for o in self.pool.take_overdue() {
            for r in o.late {
                self.lose(r, Loss::Deadline).await;
            }
            for r in o.lost {
                self.lose(r, Loss::Worker).await;
            }
            self.freed.notify_one();
        }
        self.retry_pending().await;
        if self.state.shared() {
            self.renew().await;
            self.reap().await;
        }
        self.register().await;
        self.fail_stranded().await;
    }

    async fn retry_pending(&self) {
        let list: Vec<(OperationId, (Lease, Outcome))> = lock(&self.pending)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (id, (lease, outcome)) in list {
            match self.state.finish(&id, Some(&lease), outcome).await {
                Ok(_) => {
                    lock(&self.pending).remove(&id);
                }
                Err(e) => tracing::debug!(operation = %id, error = %e, "recording an outcome"),
            }
        }
    }

    /// Keeps this replica's leases alive; an action whose lease went elsewhere (cancelled,
    /// or reaped while this replica could not reach the state) is stopped here.
    async fn renew(&self) {
        let mut held = self.pool.held();
        held.extend(
            lock(&self.pending)
                .iter()
                .map(|(id, (lease, _))| (id.clone(), lease.clone())),
        );
        match self.state.renew(&held).await {
            Ok(lost) => {
                for id in lost {
                    if lock(&self.pending).contains_key(&id) {
                        continue;
                    }
                    if self.pool.cancel(&id) {
                        tracing::warn!(operation = %id, "this replica no longer holds the action's lease; stopping it here");
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "renewing leases"),
        }
    }

    /// Actions whose holder stopped renewing their lease: the loss rule.
    async fn reap(&self) {
        match self.state.expired(REAP_BATCH).await {
            Ok(list) => {
                for (id, lease) in list {
                    tracing::warn!(operation = %id, holder = %lease.holder, "an action's lease ran out");
                    self.lose_lease(&id, &lease, Loss::Lease, Duration::ZERO)
                        .await;
                }
            }
            Err(e) => tracing::warn!(error = %e, "reading expired leases"),
        }
    }

    /// Reads every replica's workers (and publishes this one's) before serving.
    pub async fn prime(&self) {
        self.register().await
    }

    /// Publishes this replica's workers and reads every replica's.
    async fn register(&self) {
        let mine: Vec<RegisteredWorker> = self
            .pool
            .specs()
            .into_iter()
            .map(|(id, spec, running)| RegisteredWorker {
                replica: self.holder.clone(),
                id,
                spec,
                running,
            })
            .collect();
        let now = self.clock.now();
        match self.state.publish_workers(&self.holder, mine).await {
            Ok(all) => {
                self.caps.set_workers(all, now);
                let mut at = lock(&self.registered_at);
                // A gap without fresh registrations moves the stranded timers on by the
                // gap, rather than count it (or restart them: a state failing now and then
                // would then keep them from ever running out).
                if let Some(since) = at.1.take() {
                    let gap = now.saturating_duration_since(since);
                    for t in lock(&self.unservable).values_mut() {
                        *t = t.checked_add(gap).unwrap_or(*t);
                    }
                }
                at.0 = Some(now);
            }
            Err(e) => {
                lock(&self.registered_at).1.get_or_insert(now);
                tracing::warn!(error = %e, "registering workers");
            }
        }
    }

    fn stranded_after(&self) -> Duration {
        match self.state.shared() {
            true => self.config.worker_grace.max(STRANDED_AT_LEAST),
            false => self.config.worker_grace,
        }
    }

    /// Fails the queued actions of every queue that nothing (a worker on any replica, a
    /// configured platform) has been able to serve for the worker grace: they would wait
    /// forever, and a client is better told why. Judged only on fresh registrations.
    async fn fail_stranded(&self) {
        let now = self.clock.now();
        let fresh = lock(&self.registered_at)
            .0
            .is_some_and(|t| now.saturating_duration_since(t) <= 2 * TICK);
        if !fresh {
            return;
        }
        let heads = match self.state.queues().await {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(error = %e, "reading the queues");
                return;
            }
        };
        let local = self.local_specs();
        let mut due = Vec::new();
        {
            let mut since = lock(&self.unservable);
            let ids: Vec<String> = heads.iter().map(|h| h.queue.id()).collect();
            since.retain(|qid, _| ids.contains(qid));
            for (h, qid) in heads.iter().zip(ids) {
                if self.caps.runnable(&local, &h.queue) {
                    since.remove(&qid);
                    continue;
                }
                let first = *since.entry(qid).or_insert(now);
                if now.saturating_duration_since(first) >= self.stranded_after() {
                    due.push(h.queue.clone());
                }
            }
        }
        for q in due {
            let why = self.caps.explain(&local, &q);
            let why = match self.state.shared() {
                true => format!("no worker on any replica can run it any more: {why}"),
                false => why,
            };
            match self
                .state
                .fail_queued(
                    &q,
                    failed(tonic::Code::FailedPrecondition, why),
                    STRAND_BATCH,
                )
                .await
            {
                Ok(n) if n > 0 => tracing::warn!(
                    actions = n,
                    instance = %q.instance,
                    platform = ?q.platform,
                    "failed queued actions that no worker can run any more"
                ),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "failing actions no worker can run"),
            }
        }
    }

    // ---------------------------------------------------------------- running

    /// Runs the dispatcher, the timed rules every second, the stopping of actions that
    /// completed on another replica, and the state's own background work, until `stop`.
    pub fn start(self: &Arc<Self>, stop: watch::Receiver<bool>) -> Vec<JoinHandle<()>> {
        let mut tasks = self.state.clone().start(stop.clone());
        let s = self.clone();
        let mut st = stop.clone();
        tasks.push(tokio::spawn(async move {
            let work = s.state.work();
            loop {
                tokio::select! {
                    _ = work.notified() => {}
                    _ = s.freed.notified() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stopped(&mut st) => return,
                }
                if let Err(e) = s.dispatch().await {
                    tracing::warn!(error = %e, "dispatching queued actions");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }));
        let s = self.clone();
        let mut st = stop.clone();
        tasks.push(tokio::spawn(async move {
            // Every second; with a shared state, the leases and registrations every TICK.
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = tick.tick() => s.tick().await,
                    _ = stopped(&mut st) => return,
                }
            }
        }));
        if let Some(mut ended) = self.state.ended_elsewhere() {
            let s = self.clone();
            let mut st = stop;
            tasks.push(tokio::spawn(async move {
                loop {
                    let id = tokio::select! {
                        id = ended.recv() => match id { Some(id) => id, None => return },
                        _ = stopped(&mut st) => return,
                    };
                    if !s.pool.holds(&id) {
                        continue;
                    }
                    if let Ok(Some(snap)) = s.state.snapshot(&id).await {
                        if snap.stage.is_done() && s.pool.cancel(&id) {
                            tracing::info!(operation = %id, "the action ended elsewhere (cancelled); stopping it here");
                        }
                    }
                }
            }));
        }
        tasks
    }

    // ---------------------------------------------------------------- overview

    /// Workers (of every replica) and the queue (shared by them), for the status page.
    pub async fn overview(&self) -> Overview {
        let local = self.pool.views();
        let mut workers: Vec<ClusterWorker> = local
            .iter()
            .map(|w| ClusterWorker {
                id: w.id.clone(),
                replica: self.holder.clone(),
                here: true,
                properties: w.properties.clone(),
                capacity: w.capacity,
                running: w.running,
                instances: w.instances.clone(),
                since_heard_ms: Some(w.since_heard_ms),
            })
            .collect();
        let mut replicas = std::collections::BTreeSet::from([self.holder.clone()]);
        for w in self.caps.workers() {
            replicas.insert(w.replica.clone());
            if w.replica == self.holder {
                continue;
            }
            workers.push(ClusterWorker {
                id: w.id,
                replica: w.replica,
                here: false,
                properties: w.spec.properties,
                capacity: w.spec.capacity,
                running: w.running,
                instances: w.spec.instances,
                since_heard_ms: None,
            });
        }
        workers.sort_by(|a, b| (&a.replica, &a.id).cmp(&(&b.replica, &b.id)));
        let heads = self.state.queues().await.unwrap_or_default();
        let specs: Vec<WorkerSpec> = local
            .iter()
            .map(|w| WorkerSpec {
                properties: w.properties.clone(),
                capacity: w.capacity,
                instances: w.instances.clone(),
            })
            .collect();
        let now = self.clock.wall();
        Overview {
            queued: heads.iter().map(|h| h.queued).sum(),
            executing: self.state.executing().await.unwrap_or(0),
            oldest_queued_ms: heads
                .iter()
                .filter_map(|h| h.oldest)
                .min()
                .map(|t| now.duration_since(t).unwrap_or_default().as_millis() as u64),
            unmatchable: heads
                .iter()
                .filter(|h| !self.caps.runnable(&specs, &h.queue))
                .map(|h| h.queued)
                .sum(),
            workers,
            replicas: replicas.len(),
        }
    }

    /// Connected workers here, for tests and `lre up`.
    pub fn local_workers(&self) -> Vec<WorkerView> {
        self.pool.views()
    }
}

/// Resolves once `stop` turns true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|v| *v).await;
}
