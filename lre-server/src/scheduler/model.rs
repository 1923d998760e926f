//! The scheduler's words, shared by every part of it: an operation's action and stage, the
//! queues actions wait in, the lease that says which claim holds an executing operation,
//! and the capability record a worker offers (one record, whether the worker is connected
//! here or registered by another replica).

use std::sync::Arc;
use std::time::SystemTime;

use bazel_remote_apis::build::bazel::remote::execution::v2::ExecuteResponse;
use bazel_remote_apis::google::rpc;
use serde::{Deserialize, Serialize};

pub use super::job::ActionKey;
use super::job::Job;
use super::platform::{self, Properties};
use crate::digest::Digest;

pub type OperationId = String;
pub type WorkerId = String;

/// How an operation ended: the ExecuteResponse, or the status it failed with (what the
/// longrunning Operation carries as its error).
pub type Outcome = Result<ExecuteResponse, rpc::Status>;

/// A failed outcome: `code`, and a message for the client.
pub fn failed(code: tonic::Code, message: impl Into<String>) -> Outcome {
    Err(rpc::Status {
        code: code as i32,
        message: message.into(),
        details: vec![],
    })
}

// Not boxed: most operations a state remembers are Completed, so a box would save nothing
// and add an allocation to every answer.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum Stage {
    Queued,
    Executing { attempt: u32 },
    Completed(Outcome),
}

impl Stage {
    pub fn is_done(&self) -> bool {
        matches!(self, Stage::Completed(_))
    }
}

/// What one Execute submits.
pub struct NewOperation {
    pub id: OperationId,
    pub job: Arc<Job>,
    pub queue: Queue,
    pub priority: i32,
    pub queued_at: SystemTime,
}

/// Where an operation went: its own new operation, or an identical one in flight.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Submission {
    pub id: OperationId,
    pub joined: bool,
}

/// An operation as any replica reads it.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub key: ActionKey,
    pub stage: Stage,
    /// When it was submitted (REAPI's `queued_timestamp`).
    pub queued_at: SystemTime,
}

/// Actions wait in one queue per (instance, platform): a worker can run either all of a
/// queue or none of it, so a free slot needs one look per queue, not per action.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Queue {
    pub instance: String,
    pub platform: Properties,
}

impl Queue {
    pub fn new(instance: &str, platform: Properties) -> Queue {
        Queue {
            instance: instance.to_string(),
            platform: platform::normalize(platform),
        }
    }

    /// A short stable name, for keys and logs.
    pub fn id(&self) -> String {
        let text = serde_json::to_string(self).unwrap_or_default();
        Digest::of(text.as_bytes()).hex()[..32].to_string()
    }
}

/// A queue that holds actions, with its head's place.
#[derive(Clone, Debug)]
pub struct QueueHead {
    pub queue: Queue,
    pub queued: usize,
    /// (priority, arrival) of the action at its head: lower runs first.
    pub head: (i32, u64),
    /// When its head was submitted (the oldest, unless a more urgent one came later).
    pub oldest: Option<SystemTime>,
}

/// Which claim holds an executing operation: the holder (a replica, or this process) and
/// the attempt it started. Only that claim may end the attempt or give it back, so a late
/// report of an earlier attempt is never taken for the current one's.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Lease {
    pub holder: String,
    pub attempt: u32,
}

impl Lease {
    /// "HOLDER/ATTEMPT", as stored.
    pub fn name(&self) -> String {
        format!("{}/{}", self.holder, self.attempt)
    }

    pub fn parse(s: &str) -> Option<Lease> {
        let (holder, attempt) = s.rsplit_once('/')?;
        Some(Lease {
            holder: holder.to_string(),
            attempt: attempt.parse().ok()?,
        })
    }
}

/// An operation taken from its queue to run here.
#[derive(Clone)]
pub struct Claimed {
    pub id: OperationId,
    pub job: Arc<Job>,
    pub queue: Queue,
    pub lease: Lease,
    pub queued_at: SystemTime,
}

/// What one claim took from a queue, in queue order, and the queue's head after it.
pub struct Claims {
    pub claimed: Vec<Claimed>,
    /// The queue's new head, (priority, arrival), if it holds more: so that dispatch can
    /// go on without listing the queues again.
    pub next: Option<(i32, u64)>,
}

/// What a worker offers: its platform properties, its slots, and the instances whose
/// actions it may run (its credential's; `None` is all). The same record whether the
/// worker is connected here or registered by another replica.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerSpec {
    pub properties: Properties,
    pub capacity: usize,
    pub instances: Option<Vec<String>>,
}

impl WorkerSpec {
    /// The one answer to "can this worker run an action of `instance` that asks for
    /// `platform`": it may serve the instance and offers every property asked for.
    pub fn can_run(&self, instance: &str, platform: &Properties) -> bool {
        self.serves(instance) && platform::satisfies(&self.properties, platform)
    }

    pub fn serves(&self, instance: &str) -> bool {
        self.instances
            .as_ref()
            .is_none_or(|list| list.iter().any(|i| i == instance))
    }

    /// The same worker kind (properties and instances): what the grace remembers.
    pub fn kind(&self) -> (Properties, Option<Vec<String>>) {
        (self.properties.clone(), self.instances.clone())
    }
}

/// A worker as every replica sees it: registered by `replica`, running `running` actions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisteredWorker {
    pub replica: String,
    pub id: WorkerId,
    pub spec: WorkerSpec,
    pub running: usize,
}

/// What the scheduler sends a worker.
#[derive(Debug)]
pub enum WorkerCommand {
    Run {
        operation: OperationId,
        job: Arc<Job>,
        attempt: u32,
    },
    Cancel {
        operation: OperationId,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_round_trip_with_slashes_in_the_holder() {
        let l = Lease {
            holder: "host/1234/ab".into(),
            attempt: 3,
        };
        assert_eq!(Lease::parse(&l.name()), Some(l));
        assert_eq!(Lease::parse("no-attempt"), None);
        assert_eq!(Lease::parse("h/x"), None);
    }

    #[test]
    fn a_queue_is_named_by_its_instance_and_normalized_platform() {
        let p = |v: &[(&str, &str)]| -> Properties {
            v.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        };
        let a = Queue::new("main", p(&[("b", "2"), ("a", "1")]));
        let b = Queue::new("main", p(&[("a", "1"), ("b", "2"), ("a", "1")]));
        assert_eq!(a.id(), b.id());
        assert_ne!(
            a.id(),
            Queue::new("other", p(&[("a", "1"), ("b", "2")])).id()
        );
        assert_eq!(a.id().len(), 32);
    }

    #[test]
    fn one_predicate_for_instance_and_platform() {
        let w = WorkerSpec {
            properties: vec![("OSFamily".into(), "Linux".into())],
            capacity: 1,
            instances: Some(vec!["main".into()]),
        };
        let linux = vec![("OSFamily".to_string(), "Linux".to_string())];
        assert!(w.can_run("main", &linux));
        assert!(!w.can_run("other", &linux));
        assert!(!w.can_run("main", &vec![("pool".into(), "x".into())]));
        assert!(WorkerSpec::default().can_run("any", &vec![]));
    }
}
