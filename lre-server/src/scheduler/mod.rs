//! The execution scheduler's core: a priority queue of operations, workers with
//! capacities and platform properties, in-flight deduplication, and requeueing when a
//! worker is lost. It is generic over the job (`J`) sent to workers and the result (`R`)
//! they return, so this logic is tested without gRPC; the Execution service and the worker
//! connection (the remote-execution issue) sit on top.
//!
//! Everything happens under one mutex with no awaits inside, so the state machine is easy
//! to reason about: each public method is one atomic transition.

pub mod cluster;
pub mod platform;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use crate::digest::Digest;
pub use platform::Properties;

pub type OperationId = String;
pub type WorkerId = String;

/// What makes two executions the same for deduplication.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct ActionKey {
    pub instance: String,
    pub action: Digest,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    pub code: tonic::Code,
    pub message: String,
}

impl Failure {
    fn new(code: tonic::Code, message: impl Into<String>) -> Failure {
        Failure {
            code,
            message: message.into(),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Stage<R> {
    Queued,
    Executing { worker: WorkerId, attempt: u32 },
    Completed(Result<R, Failure>),
}

#[derive(Debug)]
pub enum WorkerCommand<J> {
    Run {
        operation: OperationId,
        job: J,
        attempt: u32,
    },
    Cancel {
        operation: OperationId,
    },
}

#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// How many workers may be lost under one action before it fails.
    pub max_attempts: u32,
    /// Platforms of workers that are expected but may not be connected right now; an
    /// action matching one of them waits instead of failing.
    pub known_platforms: Vec<Properties>,
    /// How long a finished operation stays queryable (WaitExecution, GetOperation).
    pub keep_finished: Duration,
    /// A worker still holding an action this long after its timeout (time enough to kill
    /// it and upload what it wrote) is dropped: it keeps sending keepalives, but it is not
    /// doing the work, and it must not hold the action forever.
    pub deadline_grace: Duration,
    /// Actions waiting for a worker; past this, Execute gets RESOURCE_EXHAUSTED (Bazel
    /// retries it with backoff) instead of the server growing without bound.
    pub max_queued: usize,
    /// Operations known at once: queued, running and finished ones kept for
    /// `keep_finished`. Finished ones are forgotten early to make room.
    pub max_operations: usize,
    /// How long actions wait for a worker that may come back instead of failing as
    /// unrunnable: after start (workers reconnect one by one, each at its own point in its
    /// backoff), and after the last worker offering their platform left. A restarted server
    /// or worker reconnects within its backoff (10 s at most), and a build must not fail
    /// for that moment.
    pub worker_grace: Duration,
}

/// Departed workers remembered for `worker_grace`; past this the oldest are forgotten, so
/// workers connecting with ever new properties cannot grow the list without bound.
const MAX_DEPARTED: usize = 1024;

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            max_attempts: 3,
            known_platforms: vec![],
            keep_finished: Duration::from_secs(600),
            deadline_grace: Duration::from_secs(60),
            max_queued: 100_000,
            max_operations: 200_000,
            worker_grace: Duration::from_secs(30),
        }
    }
}

/// What the scheduler tells the cluster (`cluster::Cluster`) about an operation it runs on
/// a lease from the shared queue: it finished, or its worker was lost and it goes back.
/// Each names the attempt it is about, which is what the cluster's lease names too: a
/// report from an attempt the cluster has since given to another claim is dropped.
#[derive(Debug)]
pub enum LeaseEvent<R> {
    Finished(OperationId, u32, Result<R, Failure>),
    Released(OperationId, u32),
}

/// What became of an operation claimed from the cluster's queue.
#[derive(Debug, PartialEq, Eq)]
pub enum Claim {
    /// Dispatched to a local worker.
    Started,
    /// It runs here already (the cluster requeued it while this replica could not renew
    /// its lease): it goes on, under the new attempt.
    AlreadyHere,
    /// No local worker can take it now; give it back.
    NoWorker,
}

/// What `submit` hands back: the operation to watch, and whether it joined one in flight.
pub struct Submitted<R> {
    pub operation: OperationId,
    pub stage: watch::Receiver<Stage<R>>,
    pub deduplicated: bool,
}

struct Operation<J, R> {
    key: ActionKey,
    platform: Properties,
    job: J,
    /// (priority, sequence): the queue position, kept across requeues so a retried action
    /// does not lose its place.
    rank: (i32, u64),
    attempts: u32,
    worker: Option<WorkerId>,
    stage: watch::Sender<Stage<R>>,
    finished_at: Option<Instant>,
    /// When the action was first submitted, for the status page's "oldest waiting".
    submitted_at: Instant,
    /// The action's own timeout, and when the worker running it must have answered.
    timeout: Option<Duration>,
    deadline: Option<Instant>,
    /// Taken from the cluster's shared queue: its outcome, or its loss, goes back there
    /// (`LeaseEvent`) rather than to local waiters or the local queue.
    claimed: bool,
}

/// What a worker offers when it connects.
#[derive(Clone, Debug, Default)]
pub struct WorkerSpec {
    pub properties: Properties,
    pub capacity: usize,
    /// The instances whose actions this worker may run (its credential's); `None` is all.
    /// A worker trusted for one instance must never see, or write results for, another's.
    pub instances: Option<Vec<String>>,
}

impl WorkerSpec {
    fn serves(&self, instance: &str) -> bool {
        self.instances
            .as_ref()
            .is_none_or(|list| list.iter().any(|i| i == instance))
    }
}

struct Worker<J> {
    /// Distinguishes this connection from a later one under the same worker id.
    session: u64,
    spec: WorkerSpec,
    running: HashSet<OperationId>,
    tx: mpsc::UnboundedSender<WorkerCommand<J>>,
    last_heard: Instant,
}

/// One connected worker, as the status page shows it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct WorkerView {
    pub id: String,
    pub properties: Vec<(String, String)>,
    pub capacity: usize,
    pub running: usize,
    pub instances: Option<Vec<String>>,
    pub since_heard_ms: u64,
}

/// The scheduler at a glance: its workers and its queue.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Overview {
    pub workers: Vec<WorkerView>,
    pub queued: usize,
    pub executing: usize,
    pub oldest_queued_ms: Option<u64>,
    /// Queued actions that no connected worker can run (they wait for a known platform, or
    /// for a worker that may be reconnecting: `SchedulerConfig::worker_grace`).
    pub unmatchable: usize,
}

/// The queue scan behind `Overview::unmatchable` stops here, so a status request stays
/// cheap under a long queue.
const OVERVIEW_SCAN: usize = 10_000;

struct State<J, R> {
    next_seq: u64,
    operations: HashMap<OperationId, Operation<J, R>>,
    in_flight: HashMap<ActionKey, OperationId>,
    /// Lower priority values run first (REAPI), then first come, first served.
    queue: BTreeMap<(i32, u64), OperationId>,
    workers: HashMap<WorkerId, Worker<J>>,
    finished: VecDeque<OperationId>,
    /// Workers that left, and when: what they served stays runnable for `worker_grace`.
    departed: VecDeque<(WorkerSpec, Instant)>,
    /// When a grace (the start's, or a departed worker's) next runs out, so `expire_graces`
    /// fails the queued actions it covered then, and not on every tick.
    grace_ends: Option<Instant>,
}

pub struct Scheduler<J, R> {
    state: Mutex<State<J, R>>,
    config: SchedulerConfig,
    leases: Option<mpsc::UnboundedSender<LeaseEvent<R>>>,
    /// Woken when a slot may have come free (a worker connected, an action ended), so the
    /// cluster's puller claims more work.
    freed: tokio::sync::Notify,
    started: Instant,
}

impl<J: Clone, R: Clone> Scheduler<J, R> {
    /// A scheduler that also runs actions claimed from a cluster's shared queue: what
    /// becomes of each arrives on the receiver.
    pub fn with_leases(config: SchedulerConfig) -> (Self, mpsc::UnboundedReceiver<LeaseEvent<R>>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut s = Scheduler::new(config);
        s.leases = Some(tx);
        (s, rx)
    }

    pub fn new(mut config: SchedulerConfig) -> Self {
        config.known_platforms = config
            .known_platforms
            .into_iter()
            .map(platform::normalize)
            .collect();
        let started = Instant::now();
        Scheduler {
            state: Mutex::new(State {
                next_seq: 0,
                operations: HashMap::new(),
                in_flight: HashMap::new(),
                queue: BTreeMap::new(),
                workers: HashMap::new(),
                finished: VecDeque::new(),
                departed: VecDeque::new(),
                grace_ends: started.checked_add(config.worker_grace),
            }),
            config,
            leases: None,
            freed: tokio::sync::Notify::new(),
            started,
        }
    }

    /// Notified when a slot may have come free.
    pub fn freed(&self) -> &tokio::sync::Notify {
        &self.freed
    }

    /// Whether it may wait here for a worker: a connected worker or a configured platform
    /// can run it, or a worker that could is within its `worker_grace` to come back.
    pub fn could_run(&self, instance: &str, platform: &Properties) -> bool {
        let st = self.state();
        self.waitable(
            &st,
            instance,
            &platform::normalize(platform.clone()),
            Instant::now(),
        )
    }

    /// Whether a connected worker, or a configured platform, can run it now (no grace: the
    /// cluster keeps its own, over every replica's workers).
    pub fn can_run_now(&self, instance: &str, platform: &Properties) -> bool {
        let st = self.state();
        self.matchable(&st, instance, &platform::normalize(platform.clone()))
    }

    /// How long an action waits for a worker that may come back.
    pub fn worker_grace(&self) -> Duration {
        self.config.worker_grace
    }

    /// Why nothing here can run it, for the user.
    pub fn explain(&self, instance: &str, platform: &Properties) -> String {
        let st = self.state();
        self.explain_unmatchable(&st, instance, &platform::normalize(platform.clone()))
    }

    /// The operations claimed from the cluster that this scheduler holds.
    pub fn claimed_operations(&self) -> Vec<(OperationId, u32)> {
        let st = self.state();
        st.operations
            .iter()
            .filter(|(_, o)| o.claimed)
            .map(|(id, o)| (id.clone(), o.attempts))
            .collect()
    }

    /// Connected workers with free slots: their properties, instances and free slots.
    pub fn idle_workers(&self) -> Vec<(Properties, Option<Vec<String>>, usize)> {
        let st = self.state();
        st.workers
            .values()
            .filter(|w| w.running.len() < w.spec.capacity)
            .map(|w| {
                (
                    w.spec.properties.clone(),
                    w.spec.instances.clone(),
                    w.spec.capacity - w.running.len(),
                )
            })
            .collect()
    }

    /// Runs an operation claimed from the cluster's queue, on attempt `attempt`, on a local
    /// worker at once.
    #[allow(clippy::too_many_arguments)]
    pub fn run_claimed(
        &self,
        id: OperationId,
        key: ActionKey,
        platform: Properties,
        job: J,
        timeout: Option<Duration>,
        attempt: u32,
    ) -> Claim {
        let platform = platform::normalize(platform);
        let mut st = self.state();
        if let Some(op) = st.operations.get_mut(&id) {
            if !op.claimed {
                return Claim::NoWorker;
            }
            op.attempts = attempt;
            return Claim::AlreadyHere;
        }
        let runnable = st.workers.values().any(|w| {
            w.running.len() < w.spec.capacity
                && w.spec.serves(&key.instance)
                && platform::satisfies(&w.spec.properties, &platform)
        });
        if !runnable {
            return Claim::NoWorker;
        }
        // Ahead of everything queued locally: it waited in the shared queue already.
        let rank = (i32::MIN, st.next_seq);
        st.next_seq += 1;
        let (tx, _) = watch::channel(Stage::Queued);
        st.operations.insert(
            id.clone(),
            Operation {
                key,
                platform,
                job,
                rank,
                attempts: attempt.saturating_sub(1),
                worker: None,
                stage: tx,
                finished_at: None,
                submitted_at: Instant::now(),
                timeout,
                deadline: None,
                claimed: true,
            },
        );
        st.queue.insert(rank, id);
        self.dispatch(&mut st);
        Claim::Started
    }

    fn state(&self) -> MutexGuard<'_, State<J, R>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues an action, or joins the identical one already queued or executing.
    /// Fails at once with FAILED_PRECONDITION if no connected or configured worker could
    /// ever run it.
    pub fn submit(
        &self,
        key: ActionKey,
        platform: Properties,
        priority: i32,
        job: J,
    ) -> Result<Submitted<R>, Failure> {
        self.submit_with_timeout(key, platform, priority, job, None)
    }

    /// `submit`, for an action that must finish within `timeout` once a worker has it.
    pub fn submit_with_timeout(
        &self,
        key: ActionKey,
        platform: Properties,
        priority: i32,
        job: J,
        timeout: Option<Duration>,
    ) -> Result<Submitted<R>, Failure> {
        let platform = platform::normalize(platform);
        let mut st = self.state();
        if let Some(id) = st.in_flight.get(&key) {
            let op = &st.operations[id];
            return Ok(Submitted {
                operation: id.clone(),
                stage: op.stage.subscribe(),
                deduplicated: true,
            });
        }
        if !self.waitable(&st, &key.instance, &platform, Instant::now()) {
            return Err(Failure::new(
                tonic::Code::FailedPrecondition,
                self.explain_unmatchable(&st, &key.instance, &platform),
            ));
        }
        self.make_room(&mut st)?;
        let id = uuid::Uuid::new_v4().to_string();
        let rank = (priority, st.next_seq);
        st.next_seq += 1;
        let (tx, rx) = watch::channel(Stage::Queued);
        st.operations.insert(
            id.clone(),
            Operation {
                key: key.clone(),
                platform,
                job,
                rank,
                attempts: 0,
                worker: None,
                stage: tx,
                finished_at: None,
                submitted_at: Instant::now(),
                timeout,
                deadline: None,
                claimed: false,
            },
        );
        st.in_flight.insert(key, id.clone());
        st.queue.insert(rank, id.clone());
        self.dispatch(&mut st);
        Ok(Submitted {
            operation: id,
            stage: rx,
            deduplicated: false,
        })
    }

    /// Refuses a new operation past the bounds, after forgetting finished operations
    /// (oldest first) if that is what it takes to stay under `max_operations`.
    fn make_room(&self, st: &mut State<J, R>) -> Result<(), Failure> {
        if st.queue.len() >= self.config.max_queued {
            return Err(Failure::new(
                tonic::Code::ResourceExhausted,
                format!(
                    "the execution queue is full ({} actions waiting, execution.max_queued_actions); retry later",
                    st.queue.len()
                ),
            ));
        }
        while st.operations.len() >= self.config.max_operations {
            let Some(old) = st.finished.pop_front() else {
                return Err(Failure::new(
                    tonic::Code::ResourceExhausted,
                    format!(
                        "the scheduler tracks {} operations (execution.max_operations); retry later",
                        st.operations.len()
                    ),
                ));
            };
            st.operations.remove(&old);
        }
        Ok(())
    }

    /// Whether a connected worker, or a configured platform, can run it.
    fn matchable(&self, st: &State<J, R>, instance: &str, platform: &Properties) -> bool {
        st.workers
            .values()
            .any(|w| w.spec.serves(instance) && platform::satisfies(&w.spec.properties, platform))
            || self
                .config
                .known_platforms
                .iter()
                .any(|k| platform::satisfies(k, platform))
    }

    /// Whether an action may wait for a worker: one connected or configured can run it, or
    /// one may be about to (see `SchedulerConfig::worker_grace`).
    fn waitable(
        &self,
        st: &State<J, R>,
        instance: &str,
        platform: &Properties,
        now: Instant,
    ) -> bool {
        let within = |since: Instant| now.duration_since(since) < self.config.worker_grace;
        self.matchable(st, instance, platform)
            || within(self.started)
            || st.departed.iter().any(|(spec, left)| {
                within(*left)
                    && spec.serves(instance)
                    && platform::satisfies(&spec.properties, platform)
            })
    }

    /// Runs out the graces that have ended by `now`: queued actions they kept waiting, and
    /// that no worker can run, fail. Called every second, with `enforce_deadlines`.
    pub fn expire_graces(&self, now: Instant) {
        let mut st = self.state();
        if st.grace_ends.is_none_or(|t| t > now) {
            return;
        }
        let grace = self.config.worker_grace;
        st.departed
            .retain(|(_, left)| now.duration_since(*left) < grace);
        // The start's grace too, while it lasts (a clock read a moment late would end it).
        let start = self.started.checked_add(grace).filter(|t| *t > now);
        st.grace_ends = st
            .departed
            .iter()
            .filter_map(|(_, left)| left.checked_add(grace))
            .chain(start)
            .min();
        self.fail_stranded(&mut st, now);
    }

    /// Why no worker can run an action of `instance` on `platform`, for the user.
    fn explain_unmatchable(
        &self,
        st: &State<J, R>,
        instance: &str,
        platform: &Properties,
    ) -> String {
        let serving = st.workers.values().filter(|w| w.spec.serves(instance));
        let candidates = serving
            .map(|w| &w.spec.properties)
            .chain(self.config.known_platforms.iter());
        let elsewhere = st
            .workers
            .values()
            .any(|w| platform::satisfies(&w.spec.properties, platform));
        if elsewhere {
            return format!(
                "no connected worker may run actions of instance {instance:?} (workers offering the platform are limited to other instances)"
            );
        }
        platform::explain_unmatchable(candidates, platform)
    }

    /// A worker's connection delivered a message (a keepalive or a result).
    pub fn heard_from(&self, id: &str, session: u64) {
        if let Some(w) = self.state().workers.get_mut(id) {
            if w.session == session {
                w.last_heard = Instant::now();
            }
        }
    }

    /// Workers and queue, for the status page. Workers are listed by id.
    pub fn overview(&self) -> Overview {
        let st = self.state();
        let mut workers: Vec<WorkerView> = st
            .workers
            .iter()
            .map(|(id, w)| WorkerView {
                id: id.clone(),
                properties: w.spec.properties.clone(),
                capacity: w.spec.capacity,
                running: w.running.len(),
                instances: w.spec.instances.clone(),
                since_heard_ms: w.last_heard.elapsed().as_millis() as u64,
            })
            .collect();
        workers.sort_by(|a, b| a.id.cmp(&b.id));
        let mut oldest: Option<Duration> = None;
        let mut unmatchable = 0;
        for id in st.queue.values().take(OVERVIEW_SCAN) {
            let Some(op) = st.operations.get(id) else {
                continue;
            };
            let waited = op.submitted_at.elapsed();
            oldest = Some(oldest.map_or(waited, |o| o.max(waited)));
            let runnable = st.workers.values().any(|w| {
                w.spec.serves(&op.key.instance)
                    && platform::satisfies(&w.spec.properties, &op.platform)
            });
            unmatchable += usize::from(!runnable);
        }
        Overview {
            executing: st.workers.values().map(|w| w.running.len()).sum(),
            workers,
            queued: st.queue.len(),
            oldest_queued_ms: oldest.map(|d| d.as_millis() as u64),
            unmatchable,
        }
    }

    /// How many workers are connected.
    pub fn worker_count(&self) -> usize {
        self.state().workers.len()
    }

    /// The action an operation runs and its current stage.
    pub fn snapshot(&self, operation: &str) -> Option<(ActionKey, Stage<R>)> {
        let st = self.state();
        st.operations
            .get(operation)
            .map(|op| (op.key.clone(), op.stage.borrow().clone()))
    }

    /// The job of an operation a worker holds, for turning its report into a result.
    pub fn job_of(&self, worker: &str, operation: &str) -> Option<J> {
        let st = self.state();
        let held = st
            .workers
            .get(worker)
            .is_some_and(|w| w.running.contains(operation));
        held.then(|| st.operations.get(operation).map(|op| op.job.clone()))
            .flatten()
    }

    pub fn watch(&self, operation: &str) -> Option<watch::Receiver<Stage<R>>> {
        self.state()
            .operations
            .get(operation)
            .map(|op| op.stage.subscribe())
    }

    /// Adds a worker with one slot per `capacity`, serving every instance (for tests).
    #[cfg(test)]
    pub fn register_worker(
        &self,
        id: WorkerId,
        properties: Properties,
        capacity: usize,
    ) -> mpsc::UnboundedReceiver<WorkerCommand<J>> {
        let spec = WorkerSpec {
            properties,
            capacity,
            instances: None,
        };
        match self.connect_worker(id, spec) {
            Ok((_, rx)) => rx,
            Err(f) => panic!("{}", f.message),
        }
    }

    /// Adds a worker; commands for it arrive on the returned channel, and the session
    /// is what to pass to `disconnect`. An id that is connected already is refused: a
    /// newcomer must not push a live worker off (its stream ends when it dies, and a
    /// silent one is dropped after three keepalive intervals, so a restart gets through).
    pub fn connect_worker(
        &self,
        id: WorkerId,
        mut spec: WorkerSpec,
    ) -> Result<(u64, mpsc::UnboundedReceiver<WorkerCommand<J>>), Failure> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut st = self.state();
        if st.workers.contains_key(&id) {
            return Err(Failure::new(
                tonic::Code::AlreadyExists,
                format!("worker id {id:?} is connected already; give each worker its own --id"),
            ));
        }
        let session = st.next_seq;
        st.next_seq += 1;
        spec.properties = platform::normalize(spec.properties);
        spec.capacity = spec.capacity.max(1);
        st.workers.insert(
            id,
            Worker {
                session,
                spec,
                running: HashSet::new(),
                tx,
                last_heard: Instant::now(),
            },
        );
        self.dispatch(&mut st);
        self.freed.notify_one();
        Ok((session, rx))
    }

    /// A worker connection ended. A stale session (the worker already reconnected) is ignored.
    pub fn disconnect(&self, id: &str, session: u64) {
        let current = self.state().workers.get(id).map(|w| w.session);
        if current == Some(session) {
            self.worker_lost(id);
        }
    }

    /// The worker disconnected or died: its actions go back to the queue (or fail once they
    /// have used up their attempts), and queued actions nobody can run any more fail.
    pub fn worker_lost(&self, id: &str) {
        let mut st = self.state();
        self.remove_worker(&mut st, id);
        self.fail_stranded(&mut st, Instant::now());
        self.dispatch(&mut st);
    }

    /// Drops every worker that holds an action past its deadline (see
    /// `SchedulerConfig::deadline_grace`); its actions are requeued, or fail with
    /// DEADLINE_EXCEEDED once they have used their attempts. Returns the workers dropped.
    pub fn enforce_deadlines(&self, now: Instant) -> Vec<WorkerId> {
        let mut st = self.state();
        let mut late: Vec<WorkerId> = Vec::new();
        let mut overdue: Vec<OperationId> = Vec::new();
        for (id, w) in &st.workers {
            for op in &w.running {
                let due = st.operations.get(op).and_then(|o| o.deadline);
                if due.is_some_and(|d| d <= now) {
                    overdue.push(op.clone());
                    if !late.contains(id) {
                        late.push(id.clone());
                    }
                }
            }
        }
        if late.is_empty() {
            return late;
        }
        for op in &overdue {
            let Some(o) = st.operations.get(op) else {
                continue;
            };
            if o.attempts >= self.config.max_attempts {
                let msg = format!(
                    "a worker held the action past its timeout ({:?}) on its last attempt ({} of {}); giving up",
                    o.timeout.unwrap_or_default(),
                    o.attempts,
                    self.config.max_attempts
                );
                if let Some(w) = o.worker.clone() {
                    if let Some(worker) = st.workers.get_mut(&w) {
                        worker.running.remove(op);
                    }
                }
                self.finish(
                    &mut st,
                    op,
                    Err(Failure::new(tonic::Code::DeadlineExceeded, msg)),
                );
            }
        }
        for id in &late {
            tracing::warn!(worker = %id, "worker held an action past its timeout; dropping it and requeueing its actions");
            self.remove_worker(&mut st, id);
        }
        self.fail_stranded(&mut st, Instant::now());
        self.dispatch(&mut st);
        late
    }

    /// Fails the queued actions that no remaining worker (or configured platform) can run.
    /// Each (instance, platform) is judged once: a long queue of one platform costs one
    /// look through the workers, not one per action.
    fn fail_stranded(&self, st: &mut State<J, R>, now: Instant) {
        let mut judged: HashMap<(&str, &Properties), bool> = HashMap::new();
        let stranded: Vec<OperationId> = st
            .queue
            .values()
            .filter(|op| {
                let o = &st.operations[*op];
                !*judged
                    .entry((o.key.instance.as_str(), &o.platform))
                    .or_insert_with(|| self.waitable(st, &o.key.instance, &o.platform, now))
            })
            .cloned()
            .collect();
        for op in stranded {
            let o = &st.operations[&op];
            let why = self.explain_unmatchable(st, &o.key.instance, &o.platform);
            self.finish(
                st,
                &op,
                Err(Failure::new(tonic::Code::FailedPrecondition, why)),
            );
        }
    }

    fn remove_worker(&self, st: &mut State<J, R>, id: &str) {
        let Some(worker) = st.workers.remove(id) else {
            return;
        };
        let now = Instant::now();
        let spec = &worker.spec;
        st.departed
            .retain(|(d, _)| !(d.properties == spec.properties && d.instances == spec.instances));
        if st.departed.len() >= MAX_DEPARTED {
            st.departed.pop_front();
        }
        st.departed.push_back((worker.spec.clone(), now));
        if let Some(end) = now.checked_add(self.config.worker_grace) {
            st.grace_ends = Some(st.grace_ends.map_or(end, |t| t.min(end)));
        }
        for op in worker.running {
            let Some(o) = st.operations.get_mut(&op) else {
                continue;
            };
            o.worker = None;
            if o.claimed {
                // The cluster decides: back to the shared queue, or failed after its
                // attempts, for whichever replica's worker is free.
                tracing::warn!(operation = %op, worker = id, "worker lost; giving its action back to the cluster's queue");
                let attempt = o.attempts;
                st.operations.remove(&op);
                if let Some(tx) = &self.leases {
                    let _ = tx.send(LeaseEvent::Released(op, attempt));
                }
                continue;
            }
            if o.attempts >= self.config.max_attempts {
                let msg = format!(
                    "the action's worker was lost {} times; giving up",
                    o.attempts
                );
                self.finish(st, &op, Err(Failure::new(tonic::Code::Unavailable, msg)));
            } else {
                tracing::warn!(operation = %op, worker = id, "worker lost; requeueing its action");
                let rank = o.rank;
                let _ = o.stage.send(Stage::Queued);
                st.queue.insert(rank, op);
            }
        }
    }

    /// A worker reports an action's outcome. Reports for operations the worker no longer
    /// holds (requeued, cancelled) are ignored.
    pub fn complete(&self, worker: &str, operation: &str, result: Result<R, Failure>) {
        let mut st = self.state();
        let held = st
            .workers
            .get_mut(worker)
            .is_some_and(|w| w.running.remove(operation));
        if held {
            self.finish(&mut st, operation, result);
        }
        self.dispatch(&mut st);
    }

    /// Cancels a queued or executing operation. Returns false if it is unknown or done.
    pub fn cancel(&self, operation: &str) -> bool {
        let mut st = self.state();
        let Some(op) = st.operations.get(operation) else {
            return false;
        };
        if op.finished_at.is_some() {
            return false;
        }
        if let Some(w) = op.worker.clone() {
            if let Some(worker) = st.workers.get_mut(&w) {
                worker.running.remove(operation);
                let _ = worker.tx.send(WorkerCommand::Cancel {
                    operation: operation.to_string(),
                });
            }
        }
        self.finish(
            &mut st,
            operation,
            Err(Failure::new(
                tonic::Code::Cancelled,
                "cancelled by CancelOperation",
            )),
        );
        self.dispatch(&mut st);
        true
    }

    fn finish(&self, st: &mut State<J, R>, id: &str, result: Result<R, Failure>) {
        let Some(op) = st.operations.get_mut(id) else {
            return;
        };
        st.queue.remove(&op.rank);
        self.freed.notify_one();
        if op.claimed {
            // Its waiters watch the cluster's record of it, not this one.
            let attempt = op.attempts;
            st.operations.remove(id);
            if let Some(tx) = &self.leases {
                let _ = tx.send(LeaseEvent::Finished(id.to_string(), attempt, result));
            }
            return;
        }
        op.worker = None;
        op.finished_at = Some(Instant::now());
        let _ = op.stage.send(Stage::Completed(result));
        let key = op.key.clone();
        if st.in_flight.get(&key).is_some_and(|x| x == id) {
            st.in_flight.remove(&key);
        }
        st.finished.push_back(id.to_string());
        // Forget operations finished long ago; the list is in finishing order.
        while let Some(old) = st.finished.front() {
            match st.operations.get(old).and_then(|o| o.finished_at) {
                Some(t) if t.elapsed() < self.config.keep_finished => break,
                _ => {
                    let old = st.finished.pop_front().unwrap_or_default();
                    st.operations.remove(&old);
                }
            }
        }
    }

    /// Hands queued actions, most urgent first, each to the eligible worker with the most
    /// free slots (ties: the smallest id), so work spreads over the workers instead of
    /// filling whichever comes first, and a worker host lost takes fewer actions with it.
    fn dispatch(&self, st: &mut State<J, R>) {
        let free = |st: &State<J, R>| {
            st.workers
                .values()
                .any(|w| w.running.len() < w.spec.capacity)
        };
        if !free(st) {
            return;
        }
        let queued: Vec<((i32, u64), OperationId)> =
            st.queue.iter().map(|(r, o)| (*r, o.clone())).collect();
        let mut lost = false;
        for (rank, op_id) in queued {
            if !free(st) {
                break;
            }
            let Some(op) = st.operations.get(&op_id) else {
                continue;
            };
            let best = st
                .workers
                .iter()
                .filter(|(_, w)| {
                    w.running.len() < w.spec.capacity
                        && w.spec.serves(&op.key.instance)
                        && platform::satisfies(&w.spec.properties, &op.platform)
                })
                .max_by_key(|(id, w)| (w.spec.capacity - w.running.len(), std::cmp::Reverse(*id)))
                .map(|(id, _)| id.clone());
            let Some(wid) = best else { continue };
            st.queue.remove(&rank);
            let Some(op) = st.operations.get_mut(&op_id) else {
                continue;
            };
            op.attempts += 1;
            op.worker = Some(wid.clone());
            op.deadline = op.timeout.and_then(|t| {
                Instant::now().checked_add(t.checked_add(self.config.deadline_grace)?)
            });
            let cmd = WorkerCommand::Run {
                operation: op_id.clone(),
                job: op.job.clone(),
                attempt: op.attempts,
            };
            let _ = op.stage.send(Stage::Executing {
                worker: wid.clone(),
                attempt: op.attempts,
            });
            let Some(w) = st.workers.get_mut(&wid) else {
                continue;
            };
            w.running.insert(op_id.clone());
            if w.tx.send(cmd).is_err() {
                // The connection is gone but not yet reported: treat it as lost now (its
                // later disconnect finds nothing), requeueing this action.
                self.remove_worker(st, &wid);
                lost = true;
            }
        }
        if lost {
            self.fail_stranded(st, Instant::now());
        }
    }
}

#[cfg(test)]
mod tests;
