//! Who can run what: the one answer to "can some worker run this action", over the workers
//! connected here, the workers every replica registered, the platforms configured as
//! expected (`known_platforms`), and the grace: for `worker_grace` after start, and after
//! a worker kind was last seen (connected here or registered anywhere), actions it could
//! run wait for it instead of failing (a restarted server or worker reconnects within its
//! backoff, and a build must not fail for that moment).

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::model::{Queue, RegisteredWorker, WorkerSpec};
use super::platform::{self, Properties};

/// Worker kinds remembered for the grace; past this the oldest are forgotten, so workers
/// with ever new properties cannot grow the memory without bound.
const MAX_SEEN: usize = 1024;

type Kind = (Properties, Option<Vec<String>>);

pub struct Capabilities {
    known: Vec<Properties>,
    grace: Duration,
    started: Instant,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Workers connected anywhere (this replica's and every other's), as last read.
    workers: Vec<RegisteredWorker>,
    /// Every worker kind seen, and when last.
    seen: HashMap<Kind, (WorkerSpec, Instant)>,
}

/// Whether an action may be queued.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// A worker (or a configured platform) can run it.
    Runnable,
    /// None can now, but one may be about to (the grace).
    Waits,
    /// None can; why, for the user.
    Never(String),
}

impl Capabilities {
    pub fn new(known: Vec<Properties>, grace: Duration, started: Instant) -> Capabilities {
        Capabilities {
            known: known.into_iter().map(platform::normalize).collect(),
            grace,
            started,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn grace(&self) -> Duration {
        self.grace
    }

    /// What is connected everywhere now (this replica's workers included), read at `now`.
    pub fn set_workers(&self, workers: Vec<RegisteredWorker>, now: Instant) {
        let mut st = self.inner();
        for w in &workers {
            Self::saw(&mut st, &w.spec, now);
        }
        st.workers = workers;
    }

    /// A worker connected here just now (before the next read of every replica's).
    pub fn connected(&self, spec: &WorkerSpec, now: Instant) {
        Self::saw(&mut self.inner(), spec, now);
    }

    fn saw(st: &mut Inner, spec: &WorkerSpec, now: Instant) {
        let kind = spec.kind();
        if st.seen.len() >= MAX_SEEN && !st.seen.contains_key(&kind) {
            if let Some(oldest) = st
                .seen
                .iter()
                .min_by_key(|(_, (_, at))| *at)
                .map(|(k, _)| k.clone())
            {
                st.seen.remove(&oldest);
            }
        }
        st.seen.insert(kind, (spec.clone(), now));
    }

    /// Every worker connected anywhere, as last read.
    pub fn workers(&self) -> Vec<RegisteredWorker> {
        self.inner().workers.clone()
    }

    /// Whether a connected worker (`local`, or registered by any replica) or a configured
    /// platform can run an action of this queue now.
    pub fn runnable(&self, local: &[WorkerSpec], q: &Queue) -> bool {
        let can = |s: &WorkerSpec| s.can_run(&q.instance, &q.platform);
        local.iter().any(can)
            || self.inner().workers.iter().any(|w| can(&w.spec))
            || self
                .known
                .iter()
                .any(|k| platform::satisfies(k, &q.platform))
    }

    /// Whether an action of this queue may be queued: runnable, or within the grace.
    pub fn verdict(&self, local: &[WorkerSpec], q: &Queue, now: Instant) -> Verdict {
        if self.runnable(local, q) {
            return Verdict::Runnable;
        }
        let within = |at: Instant| now.saturating_duration_since(at) < self.grace;
        let seen = self
            .inner()
            .seen
            .values()
            .any(|(s, at)| within(*at) && s.can_run(&q.instance, &q.platform));
        if within(self.started) || seen {
            return Verdict::Waits;
        }
        Verdict::Never(self.explain(local, q))
    }

    /// Why nothing can run an action of this queue, for the user.
    pub fn explain(&self, local: &[WorkerSpec], q: &Queue) -> String {
        let workers = self.inner().workers.clone();
        let all: Vec<&WorkerSpec> = local
            .iter()
            .chain(workers.iter().map(|w| &w.spec))
            .collect();
        if all
            .iter()
            .any(|s| platform::satisfies(&s.properties, &q.platform))
        {
            return format!(
                "no connected worker may run actions of instance {:?} (workers offering the platform are limited to other instances)",
                q.instance
            );
        }
        let candidates = all
            .iter()
            .filter(|s| s.serves(&q.instance))
            .map(|s| &s.properties)
            .chain(self.known.iter());
        platform::explain_unmatchable(candidates, &q.platform)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn linux() -> Properties {
        vec![("OSFamily".into(), "Linux".into())]
    }

    fn spec(props: Properties) -> WorkerSpec {
        WorkerSpec {
            properties: props,
            capacity: 1,
            instances: None,
        }
    }

    #[test]
    fn a_worker_seen_within_the_grace_keeps_its_actions_waiting() {
        let t0 = Instant::now();
        let grace = Duration::from_secs(30);
        let c = Capabilities::new(vec![], grace, t0);
        let q = Queue::new("", linux());
        assert_eq!(c.verdict(&[], &q, t0), Verdict::Waits, "the start's grace");
        let later = t0 + grace + Duration::from_secs(1);
        assert!(matches!(c.verdict(&[], &q, later), Verdict::Never(m) if m.contains("no worker")));
        c.connected(&spec(linux()), later);
        assert_eq!(c.verdict(&[spec(linux())], &q, later), Verdict::Runnable);
        // Gone: waits within the grace of when it was last seen, not after.
        assert_eq!(
            c.verdict(&[], &q, later + Duration::from_secs(29)),
            Verdict::Waits
        );
        assert!(matches!(
            c.verdict(&[], &q, later + grace),
            Verdict::Never(_)
        ));
        // Registered by another replica counts as connected.
        c.set_workers(
            vec![RegisteredWorker {
                replica: "r2".into(),
                id: "w".into(),
                spec: spec(linux()),
                running: 0,
            }],
            later + grace,
        );
        assert_eq!(c.verdict(&[], &q, later + grace), Verdict::Runnable);
    }

    #[test]
    fn known_platforms_and_instances_are_judged_and_explained() {
        let t0 = Instant::now();
        let c = Capabilities::new(
            vec![vec![("pool".into(), "big".into())]],
            Duration::ZERO,
            t0,
        );
        let big = Queue::new("", vec![("pool".into(), "big".into())]);
        assert_eq!(c.verdict(&[], &big, t0), Verdict::Runnable);
        let limited = WorkerSpec {
            instances: Some(vec!["other".into()]),
            ..spec(linux())
        };
        let q = Queue::new("main", linux());
        match c.verdict(&[limited], &q, t0) {
            Verdict::Never(m) => assert!(m.contains("limited to other instances"), "{m}"),
            v => panic!("{v:?}"),
        }
    }
}
