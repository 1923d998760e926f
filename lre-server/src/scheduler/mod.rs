//! The scheduler wing: everything about remote execution between Execute and the workers.
//!
//! | file | what it holds |
//! |---|---|
//! | `scheduler.rs` | `Scheduler`: every decision, written once (submit, dispatch, report, loss, cancel, stranded), for one replica or many |
//! | `state/` | where operations live: the `OperationState` trait; `memory` (this process) and `redis` (every replica: scripts, records, events) |
//! | `pool.rs` | the workers connected here: slots, what each runs, deadlines |
//! | `capability.rs` | the one answer to "can some worker run this", with the grace |
//! | `model.rs` | the shared words: stages, queues, leases, the worker capability record |
//! | `job.rs` | what a worker needs to run one action |
//! | `platform.rs` | matching platform properties |
//! | `clock.rs` | injected time |
//!
//! `build` makes the scheduler the `[execution]` table describes, beside `store::build`.

pub mod capability;
pub mod clock;
pub mod job;
pub mod model;
pub mod platform;
pub mod pool;
#[allow(clippy::module_inception)]
pub mod scheduler;
pub mod state;

use std::sync::Arc;
use std::time::Duration;

pub use clock::{Clock, ManualClock, SystemClock};
pub use job::Job;
pub use model::{
    failed, ActionKey, Lease, OperationId, Outcome, Queue, Snapshot, Stage, WorkerCommand,
    WorkerId, WorkerSpec,
};
pub use platform::Properties;
pub use pool::{Running, WorkerView, MAX_CAPACITY};
pub use scheduler::{Overview, Scheduler, SchedulerConfig, Submitted, MAX_CLAIM};
pub use state::{Bounds, OperationState};

use crate::config::ExecutionConfig;
use crate::error::Result;

/// The scheduler `[execution]` describes: its state in memory, or in `execution.redis`
/// (shared by every replica naming it), on the machine's clock.
pub async fn build(exec: &ExecutionConfig) -> Result<Arc<Scheduler>> {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let bounds = Bounds {
        max_queued: exec.max_queued_actions,
        max_operations: exec.max_operations,
        ..Bounds::default()
    };
    let state: Arc<dyn OperationState> = match &exec.redis {
        None => Arc::new(state::memory::MemoryState::new(bounds, clock.clone())),
        Some(r) => {
            let conn = lre_store::store::RedisConnection::open(r).await?;
            Arc::new(
                state::redis::RedisState::open(
                    conn,
                    format!("{}sched:", r.prefix),
                    Duration::from_secs(exec.lease_seconds),
                    bounds,
                )
                .await?,
            )
        }
    };
    Ok(Arc::new(Scheduler::new(state, clock, config_of(exec))))
}

/// The scheduler's rules from `[execution]`.
pub fn config_of(exec: &ExecutionConfig) -> SchedulerConfig {
    SchedulerConfig {
        max_attempts: exec.max_attempts,
        worker_grace: Duration::from_secs(exec.worker_grace_seconds),
        known_platforms: exec
            .known_platforms
            .iter()
            .map(|m| m.clone().into_iter().collect())
            .collect(),
        ..SchedulerConfig::default()
    }
}
