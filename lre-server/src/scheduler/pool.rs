//! The workers connected to this process: their slots, what each runs (under which lease,
//! until when), and the commands sent to them. One mutex, no await inside. The same pool
//! serves one replica alone and one of many: it never decides an operation's fate, it
//! reports what it lost (a worker gone, a deadline passed) to the scheduler.
//!
//! A slot is busy from dispatch until the worker reports on the action, a cancelled one
//! included: the worker says when its sandbox is gone, and only then is the slot given to
//! another action (a worker asked to run more than its capacity refuses).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::mpsc;

use super::clock::Clock;
use super::job::Job;
use super::model::{Claimed, Lease, OperationId, WorkerCommand, WorkerId, WorkerSpec};
use crate::error::{Error, Result};

/// More slots than any machine has cores: a bound on what one worker can claim.
pub const MAX_CAPACITY: usize = 4096;

/// An action a worker runs (or is stopping).
#[derive(Clone, Debug)]
pub struct Running {
    pub id: OperationId,
    pub lease: Lease,
    pub job: Arc<Job>,
    pub queued_at: SystemTime,
    /// When the worker must have answered: the action's timeout plus the grace; for a
    /// cancelled action, the grace to stop it.
    pub deadline: Option<Instant>,
    /// Cancelled: the slot stays busy until the worker says the action is gone.
    pub cancelling: bool,
}

struct Worker {
    /// Distinguishes this connection from a later one under the same id.
    session: u64,
    spec: WorkerSpec,
    running: HashMap<OperationId, Running>,
    tx: mpsc::UnboundedSender<WorkerCommand>,
    last_heard: Instant,
}

impl Worker {
    fn free(&self) -> usize {
        self.spec.capacity.saturating_sub(self.running.len())
    }
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

#[derive(Default)]
struct PoolState {
    workers: HashMap<WorkerId, Worker>,
    next_session: u64,
}

/// What `take_overdue` found.
pub struct Overdue {
    pub worker: WorkerId,
    /// Actions it held past their deadline (with the deadline's own reason).
    pub late: Vec<Running>,
    /// Its other actions, lost with it.
    pub lost: Vec<Running>,
}

pub struct WorkerPool {
    state: Mutex<PoolState>,
    clock: Arc<dyn Clock>,
    /// Time past an action's timeout (to kill it and upload what it wrote) before the
    /// worker holding it is dropped; and the time a cancelled action has to be gone.
    deadline_grace: Duration,
}

impl WorkerPool {
    pub fn new(clock: Arc<dyn Clock>, deadline_grace: Duration) -> WorkerPool {
        WorkerPool {
            state: Mutex::new(PoolState::default()),
            clock,
            deadline_grace,
        }
    }

    fn state(&self) -> MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a worker; commands for it arrive on the returned channel, and the session is
    /// what to pass to `disconnect`. An id that is connected already is refused: a newcomer
    /// must not push a live worker off (its stream ends when it dies, and a silent one is
    /// dropped after three keepalive intervals, so a restart gets through).
    pub fn connect(
        &self,
        id: WorkerId,
        mut spec: WorkerSpec,
    ) -> Result<(u64, mpsc::UnboundedReceiver<WorkerCommand>)> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut st = self.state();
        if st.workers.contains_key(&id) {
            return Err(Error::AlreadyExists(format!(
                "worker id {id:?} is connected already; give each worker its own --id"
            )));
        }
        st.next_session += 1;
        let session = st.next_session;
        spec.properties = super::platform::normalize(spec.properties);
        spec.capacity = spec.capacity.clamp(1, MAX_CAPACITY);
        st.workers.insert(
            id,
            Worker {
                session,
                spec,
                running: HashMap::new(),
                tx,
                last_heard: self.clock.now(),
            },
        );
        Ok((session, rx))
    }

    /// A worker connection ended: the actions it ran, lost with it (its cancelled ones are
    /// simply gone). A stale session (the worker reconnected already) loses nothing.
    pub fn disconnect(&self, id: &str, session: u64) -> Vec<Running> {
        let mut st = self.state();
        if st.workers.get(id).map(|w| w.session) != Some(session) {
            return Vec::new();
        }
        Self::remove(&mut st, id)
    }

    fn remove(st: &mut PoolState, id: &str) -> Vec<Running> {
        let Some(w) = st.workers.remove(id) else {
            return Vec::new();
        };
        w.running.into_values().filter(|r| !r.cancelling).collect()
    }

    pub fn heard_from(&self, id: &str, session: u64) {
        let now = self.clock.now();
        if let Some(w) = self.state().workers.get_mut(id) {
            if w.session == session {
                w.last_heard = now;
            }
        }
    }

    /// The specs of connected workers with a free slot, with how many they have free.
    pub fn idle(&self) -> Vec<(WorkerSpec, usize)> {
        self.state()
            .workers
            .values()
            .filter(|w| w.free() > 0)
            .map(|w| (w.spec.clone(), w.free()))
            .collect()
    }

    /// Every connected worker's spec.
    pub fn specs(&self) -> Vec<(WorkerId, WorkerSpec, usize)> {
        self.state()
            .workers
            .iter()
            .map(|(id, w)| (id.clone(), w.spec.clone(), w.running.len()))
            .collect()
    }

    /// A claim of an operation a worker here runs already (requeued while this replica
    /// could not renew its lease, then claimed again here): it goes on under the new lease,
    /// taken back rather than run twice. The claim comes back when nobody here runs it, or
    /// its worker is stopping it (then it is dispatched once that is done).
    // The Err is the claim handed back to its caller, not an error to propagate.
    #[allow(clippy::result_large_err)]
    pub fn adopt(&self, c: Claimed) -> std::result::Result<(), Claimed> {
        let mut st = self.state();
        for w in st.workers.values_mut() {
            if let Some(r) = w.running.get_mut(&c.id) {
                if r.cancelling {
                    return Err(c);
                }
                tracing::info!(operation = %c.id, attempt = c.lease.attempt, "claimed an action that runs here already: it goes on under the new claim");
                r.lease = c.lease;
                return Ok(());
            }
        }
        Err(c)
    }

    /// Whether a worker here holds `id` in any state (running or stopping).
    fn has(&self, id: &str) -> bool {
        self.state()
            .workers
            .values()
            .any(|w| w.running.contains_key(id))
    }

    /// Hands a claimed operation to the worker that can run it with the most free slots
    /// (ties: the smallest id), so work spreads over the workers and a worker host lost
    /// takes fewer actions with it. The claim comes back when no worker can take it now.
    #[allow(clippy::result_large_err)] // as in adopt: the claim comes back
    pub fn assign(&self, c: Claimed) -> std::result::Result<WorkerId, Claimed> {
        if self.has(&c.id) {
            // Still being stopped by its worker (a cancel, a lost lease): later.
            return Err(c);
        }
        let now = self.clock.now();
        let mut st = self.state();
        let best = st
            .workers
            .iter()
            .filter(|(_, w)| w.free() > 0 && w.spec.can_run(&c.job.key.instance, &c.queue.platform))
            .max_by_key(|(id, w)| (w.free(), std::cmp::Reverse(*id)))
            .map(|(id, _)| id.clone());
        let Some(wid) = best else { return Err(c) };
        let Some(w) = st.workers.get_mut(&wid) else {
            return Err(c);
        };
        let cmd = WorkerCommand::Run {
            operation: c.id.clone(),
            job: c.job.clone(),
            attempt: c.lease.attempt,
        };
        if w.tx.send(cmd).is_err() {
            // The connection is gone and its end not yet reported: the claim goes back,
            // and the worker's own disconnect finds it holds nothing.
            return Err(c);
        }
        let deadline = now.checked_add(c.job.timeout.saturating_add(self.deadline_grace));
        w.running.insert(
            c.id.clone(),
            Running {
                id: c.id,
                lease: c.lease,
                job: c.job,
                queued_at: c.queued_at,
                deadline,
                cancelling: false,
            },
        );
        Ok(wid)
    }

    /// The worker reported on an action: its slot is free. `None` if it does not hold it
    /// (requeued, a stale report).
    pub fn report(&self, worker: &str, id: &str) -> Option<Running> {
        self.state()
            .workers
            .get_mut(worker)
            .and_then(|w| w.running.remove(id))
    }

    /// The job of an action a worker holds.
    pub fn running(&self, worker: &str, id: &str) -> Option<Running> {
        self.state()
            .workers
            .get(worker)
            .and_then(|w| w.running.get(id).cloned())
    }

    /// Whether any worker here holds the operation.
    pub fn holds(&self, id: &str) -> bool {
        self.state()
            .workers
            .values()
            .any(|w| w.running.get(id).is_some_and(|r| !r.cancelling))
    }

    /// Tells the worker running `id` to stop. Its slot stays busy until it reports; if it
    /// does not within the grace, `take_overdue` drops it. False if nobody here runs it.
    pub fn cancel(&self, id: &str) -> bool {
        let deadline = self.clock.now().checked_add(self.deadline_grace);
        let mut st = self.state();
        for w in st.workers.values_mut() {
            if let Some(r) = w.running.get_mut(id) {
                if !r.cancelling {
                    r.cancelling = true;
                    r.deadline = deadline;
                    let _ = w.tx.send(WorkerCommand::Cancel {
                        operation: id.to_string(),
                    });
                }
                return true;
            }
        }
        false
    }

    /// The leases this process holds (cancelled actions excluded: they are over).
    pub fn held(&self) -> Vec<(OperationId, Lease)> {
        self.state()
            .workers
            .values()
            .flat_map(|w| w.running.values())
            .filter(|r| !r.cancelling)
            .map(|r| (r.id.clone(), r.lease.clone()))
            .collect()
    }

    /// Drops every worker that holds an action past its deadline: it keeps sending
    /// keepalives, but it is not doing the work, and it must not hold the action forever.
    /// Its connection is ended (its command channel closes), so it reconnects.
    pub fn take_overdue(&self) -> Vec<Overdue> {
        let now = self.clock.now();
        let mut st = self.state();
        let late: Vec<WorkerId> = st
            .workers
            .iter()
            .filter(|(_, w)| {
                w.running
                    .values()
                    .any(|r| r.deadline.is_some_and(|d| d <= now))
            })
            .map(|(id, _)| id.clone())
            .collect();
        let mut out = Vec::new();
        for id in late {
            let overdue: Vec<OperationId> = st.workers[&id]
                .running
                .values()
                .filter(|r| !r.cancelling && r.deadline.is_some_and(|d| d <= now))
                .map(|r| r.id.clone())
                .collect();
            tracing::warn!(worker = %id, "worker held an action past its deadline; dropping it");
            let all = Self::remove(&mut st, &id);
            let (late, lost) = all.into_iter().partition(|r| overdue.contains(&r.id));
            out.push(Overdue {
                worker: id,
                late,
                lost,
            });
        }
        out
    }

    pub fn count(&self) -> usize {
        self.state().workers.len()
    }

    /// Connected workers, by id.
    pub fn views(&self) -> Vec<WorkerView> {
        let now = self.clock.now();
        let st = self.state();
        let mut v: Vec<WorkerView> = st
            .workers
            .iter()
            .map(|(id, w)| WorkerView {
                id: id.clone(),
                properties: w.spec.properties.clone(),
                capacity: w.spec.capacity,
                running: w.running.len(),
                instances: w.spec.instances.clone(),
                since_heard_ms: now.saturating_duration_since(w.last_heard).as_millis() as u64,
            })
            .collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }
}
