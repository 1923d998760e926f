//! The scheduler's behaviour, one suite for both places operations can live: every
//! scenario runs on the in-memory state (one lre-server) and on the Redis state (any number
//! of replicas, a real `redis-server` per test), against the one `Scheduler` above them.
//! Workers are the scheduler's own command channels, driven by the test; time is a
//! `ManualClock`, so graces and deadlines pass without sleeping. What only a shared state
//! can do (a second replica, leases that run out) is in `replicas`.
//!
//! | module | what it holds |
//! |---|---|
//! | `harness` | a scheduler on either backend, fake workers, jobs |
//! | `dispatch` | who runs what, in which order, how many at once, deduplication |
//! | `losses` | lost workers, deadlines, attempts, late reports |
//! | `cancel` | CancelOperation, queued and running |
//! | `grace` | waiting for workers that may come, failing what nothing can run |
//! | `operations` | answered operations, bounds, forgetting, names |
//! | `replicas` | the Redis state shared by two replicas |
//! | `state` | the `OperationState` contract, method by method (the scripts' unit tests) |

/// Runs each named scenario (`async fn NAME(Backend)`) once per backend, as
/// `memory::NAME` and `redis::NAME`.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(crate::harness::Backend::Memory).await
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(crate::harness::Backend::Redis).await
                }
            )*
        }
    };
}

mod harness;

mod cancel;
mod dispatch;
mod grace;
mod losses;
mod operations;
mod replicas;
mod state;
