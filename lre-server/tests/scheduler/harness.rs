//! A scheduler on either backend with a manual clock, fake workers (the scheduler's own
//! command channels, answered by the test) and jobs named by a number.

use std::sync::Arc;
use std::time::Duration;

use bazel_remote_apis::build::bazel::remote::execution::v2::ExecuteResponse;
use bytes::Bytes;
use lre_server::digest::Digest;
use lre_server::scheduler::state::memory::MemoryState;
use lre_server::scheduler::state::redis::RedisState;
use lre_server::scheduler::{
    ActionKey, Bounds, Job, ManualClock, OperationState, Outcome, Properties, Scheduler,
    SchedulerConfig, Stage, WorkerCommand, WorkerSpec,
};
use lre_store::config::RedisConfig;
use lre_store::store::RedisConnection;
use lre_test_support::redis::Redis;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Memory,
    Redis,
}

/// Long enough for anything the scheduler does in a test; a bound, not a timing.
const PATIENCE: Duration = Duration::from_secs(20);

#[derive(Clone)]
pub struct Setup {
    pub config: SchedulerConfig,
    pub bounds: Bounds,
    /// How long a Redis lease lasts without renewal (Redis's clock, real time).
    pub lease: Duration,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            config: SchedulerConfig {
                max_attempts: 3,
                worker_grace: Duration::from_secs(30),
                deadline_grace: Duration::from_secs(60),
                known_platforms: vec![],
            },
            bounds: Bounds::default(),
            lease: Duration::from_secs(60),
        }
    }
}

pub struct Harness {
    pub backend: Backend,
    pub clock: Arc<ManualClock>,
    pub sched: Arc<Scheduler>,
    pub state: Arc<dyn OperationState>,
    redis: Option<Arc<Redis>>,
    setup: Setup,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Harness {
    pub async fn new(backend: Backend) -> Harness {
        Self::with(backend, Setup::default()).await
    }

    pub async fn with(backend: Backend, setup: Setup) -> Harness {
        let redis = match backend {
            Backend::Memory => None,
            Backend::Redis => Some(Arc::new(Redis::up(&[]))),
        };
        Self::build(backend, setup, redis, Arc::new(ManualClock::default())).await
    }

    /// Another replica on the same Redis (and the same clock).
    pub async fn replica(&self) -> Harness {
        assert_eq!(
            self.backend,
            Backend::Redis,
            "only a shared state has replicas"
        );
        Self::build(
            self.backend,
            self.setup.clone(),
            self.redis.clone(),
            self.clock.clone(),
        )
        .await
    }

    async fn build(
        backend: Backend,
        setup: Setup,
        redis: Option<Arc<Redis>>,
        clock: Arc<ManualClock>,
    ) -> Harness {
        let state: Arc<dyn OperationState> = match &redis {
            None => Arc::new(MemoryState::new(setup.bounds.clone(), clock.clone())),
            Some(r) => {
                let conn = RedisConnection::open(&RedisConfig::new(r.url.clone()))
                    .await
                    .expect("connecting to the test's redis-server");
                Arc::new(
                    RedisState::open(conn, "t:sched:".into(), setup.lease, setup.bounds.clone())
                        .await
                        .expect("opening the Redis state"),
                )
            }
        };
        let (stop, stop_rx) = watch::channel(false);
        // The state's own background work (Redis: the events that feed watchers); the
        // scheduler's dispatcher and timed rules are driven by the test.
        let tasks = state.clone().start(stop_rx);
        let sched = Arc::new(Scheduler::new(
            state.clone(),
            clock.clone(),
            setup.config.clone(),
        ));
        Harness {
            backend,
            clock,
            sched,
            state,
            redis,
            setup,
            stop,
            tasks,
        }
    }

    pub fn advance(&self, by: Duration) {
        self.clock.advance(by)
    }

    /// The scheduler's wall clock, in ms since the epoch (as Redis stores timestamps).
    pub fn clock_wall_ms(&self) -> u128 {
        use lre_server::scheduler::Clock;
        self.clock
            .wall()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_millis()
    }

    pub async fn dispatch(&self) {
        self.sched.dispatch().await.expect("dispatch")
    }

    pub async fn tick(&self) {
        self.sched.tick().await
    }

    /// Submits a job asking for `platform`; panics if refused.
    pub async fn submit(&self, job: Arc<Job>, platform: Properties, priority: i32) -> String {
        self.sched
            .submit(job, platform, priority)
            .await
            .expect("submit")
            .operation
    }

    pub fn worker(&self, id: &str, spec: WorkerSpec) -> FakeWorker {
        let (session, rx) = self
            .sched
            .connect_worker(id.to_string(), spec)
            .expect("connecting a worker");
        FakeWorker {
            id: id.to_string(),
            session,
            rx,
        }
    }

    pub async fn disconnect(&self, w: &FakeWorker) {
        self.sched.disconnect(&w.id, w.session).await
    }

    /// The worker reports on `op`: true if the scheduler took the report as the action's
    /// (it still held it and it was not cancelled).
    pub async fn report(&self, w: &FakeWorker, op: &str, outcome: Outcome) -> bool {
        match self.sched.take_report(&w.id, op) {
            Some(r) => {
                self.sched.complete(&r, outcome).await;
                true
            }
            None => false,
        }
    }

    pub async fn stage(&self, op: &str) -> Option<Stage> {
        self.sched
            .snapshot(op)
            .await
            .expect("snapshot")
            .map(|s| s.stage)
    }

    /// Waits (up to PATIENCE) for `op` to complete, as a watcher sees it.
    pub async fn outcome(&self, op: &str) -> Outcome {
        let mut rx = self
            .sched
            .watch(op)
            .await
            .expect("watch")
            .unwrap_or_else(|| panic!("operation {op} is unknown"));
        let stage = tokio::time::timeout(PATIENCE, rx.wait_for(|s| s.is_done()))
            .await
            .unwrap_or_else(|_| panic!("operation {op} did not complete"))
            .expect("watch channel")
            .clone();
        match stage {
            Stage::Completed(o) => o,
            other => unreachable!("{other:?}"),
        }
    }

    /// Lets completed operations outlive `keep_finished`: the manual clock for the memory
    /// state, real time for Redis (its keys expire by its own clock).
    pub async fn outlive_finished(&self) {
        let keep = self.setup.bounds.keep_finished;
        self.advance(keep + Duration::from_secs(1));
        if self.backend == Backend::Redis {
            tokio::time::sleep(keep + Duration::from_millis(1500)).await;
        }
    }
}

/// A worker as the scheduler sees it: the commands sent to it, answered by the test.
pub struct FakeWorker {
    pub id: String,
    pub session: u64,
    rx: mpsc::UnboundedReceiver<WorkerCommand>,
}

impl FakeWorker {
    /// The next command sent to it, if any was.
    pub fn next(&mut self) -> Option<WorkerCommand> {
        self.rx.try_recv().ok()
    }

    /// The action it was told to run: (operation, attempt). Panics on anything else.
    pub fn run(&mut self) -> (String, u32) {
        match self.next() {
            Some(WorkerCommand::Run {
                operation, attempt, ..
            }) => (operation, attempt),
            other => panic!("worker {} expected a Run, got {other:?}", self.id),
        }
    }

    /// Every action it was told to run since the last look.
    pub fn runs(&mut self) -> Vec<String> {
        let mut v = Vec::new();
        while let Some(c) = self.next() {
            match c {
                WorkerCommand::Run { operation, .. } => v.push(operation),
                other => panic!("worker {} expected only Runs, got {other:?}", self.id),
            }
        }
        v
    }

    pub fn idle(&mut self) -> bool {
        match self.next() {
            None => true,
            Some(c) => panic!("worker {} expected nothing, got {c:?}", self.id),
        }
    }

    /// Whether the scheduler ended this connection (its channel is closed).
    pub fn dropped(&mut self) -> bool {
        matches!(
            self.rx.try_recv(),
            Err(mpsc::error::TryRecvError::Disconnected)
        )
    }
}

pub fn props(p: &[(&str, &str)]) -> Properties {
    p.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub fn spec(p: &[(&str, &str)], capacity: usize) -> WorkerSpec {
    WorkerSpec {
        properties: props(p),
        capacity,
        instances: None,
    }
}

/// Job `n` of `instance` (its action's bytes name it), with a 60 s timeout.
pub fn job(instance: &str, n: u64) -> Arc<Job> {
    job_with_timeout(instance, n, Duration::from_secs(60))
}

pub fn job_with_timeout(instance: &str, n: u64, timeout: Duration) -> Arc<Job> {
    let action = Bytes::from(format!("action {n}"));
    Arc::new(Job {
        key: ActionKey {
            instance: instance.to_string(),
            action: Digest::of(&action),
        },
        action,
        command: Bytes::from_static(b"command"),
        timeout,
        do_not_cache: false,
        meta: None,
        first_output: format!("out/{n}"),
    })
}

/// A successful outcome that names who produced it.
pub fn ran_by(who: &str) -> Outcome {
    Ok(ExecuteResponse {
        message: format!("ran by {who}"),
        ..Default::default()
    })
}

/// The code of a failed outcome (panics on success).
pub fn code(o: &Outcome) -> tonic::Code {
    match o {
        Ok(r) => panic!("expected a failure, got {r:?}"),
        Err(s) => tonic::Code::from_i32(s.code),
    }
}

pub fn message(o: &Outcome) -> String {
    match o {
        Ok(r) => r.message.clone(),
        Err(s) => s.message.clone(),
    }
}

impl Harness {
    /// The worker's report of `op`, recorded by this replica whatever it believes about
    /// the lease (a replica back from a pause).
    pub async fn complete_anyway(&self, w: &FakeWorker, op: &str) {
        if let Some(r) = self.sched.running(&w.id, op) {
            self.sched.complete(&r, ran_by(&w.id)).await;
        }
    }
}
