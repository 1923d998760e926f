//! What the server has been doing, kept for people: the bounded history the status page
//! (`status/`: `/`, `/api/`) and `lre status` show:
//!
//! - per-minute counts over the last hour (hits, misses and executions per instance, and the
//!   store's size, traffic and evictions);
//! - the most recent actions (hit, miss, executed), with worker, exit code and stderr;
//! - per Bazel invocation (`RequestMetadata.tool_invocation_id`), the action keys it looked
//!   up, so that two invocations' misses can be explained from the CAS (`status::explain`).
//!
//! Everything a client sends here is clipped and counted against fixed bounds: the history
//! is memory the clients fill, so it must not grow with them.

mod timeline;

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

pub use crate::config::StatusConfig;
use crate::digest::Digest;
use crate::metrics::Metrics;
pub use timeline::{Counts, Minute};

pub use crate::request_meta::{clip, RequestMeta, REQUEST_METADATA_HEADER};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// The action cache answered.
    Hit,
    /// The action cache had no complete result.
    Miss,
    /// A worker ran it, with exit code 0.
    Executed,
    /// A worker ran it and it failed (non-zero exit, timeout, or an error).
    Failed,
}

/// One entry of the recent-actions list.
#[derive(Clone, Debug, Serialize)]
pub struct RecentAction {
    pub id: u64,
    pub at_ms: u64,
    pub instance: String,
    pub invocation: String,
    pub mnemonic: String,
    pub target: String,
    pub first_output: String,
    pub action: String,
    pub outcome: Outcome,
    pub duration_ms: Option<u64>,
    pub worker: Option<String>,
    pub exit_code: Option<i32>,
    pub message: String,
    /// Served at `/api/actions/{id}/stderr` to callers who may read the instance.
    #[serde(skip)]
    pub stderr: Option<Digest>,
    pub has_stderr: bool,
    /// For a hit: who wrote the entry that answered it, and when.
    pub written_by: Option<WrittenBy>,
}

/// Who wrote an action-cache entry, as the status page and `lre status` show it.
#[derive(Clone, Debug, Serialize)]
pub struct WrittenBy {
    /// "executed" or "uploaded".
    pub source: String,
    pub worker: String,
    pub token: String,
    pub written_at_ms: u64,
    /// One line: "worker W (token T)", "token T" or "an anonymous client".
    pub who: String,
}

impl WrittenBy {
    pub fn of(p: &lre_store::ac_entry::Provenance) -> WrittenBy {
        WrittenBy {
            source: clip(p.source.clone()),
            worker: clip(p.worker.clone()),
            token: clip(p.token.clone()),
            written_at_ms: p.written_at_ms,
            who: clip(p.who()),
        }
    }
}

/// What a worker reported for an executed action.
pub struct Execution {
    pub first_output: String,
    pub worker: String,
    pub exit_code: Option<i32>,
    pub duration: Option<Duration>,
    pub stderr: Option<Digest>,
    pub failed: bool,
    pub message: String,
}

/// An invocation as the page lists it.
#[derive(Clone, Debug, Serialize)]
pub struct InvocationSummary {
    pub instance: String,
    pub id: String,
    /// The token whose calls these are (empty: anonymous).
    pub caller: String,
    pub correlated: String,
    pub tool: String,
    pub first_seen_ms: u64,
    pub last_seen_ms: u64,
    /// Orders invocations by first appearance (milliseconds can tie).
    pub sequence: u64,
    pub hits: u64,
    pub misses: u64,
    pub executed: u64,
    pub failed: u64,
    /// Action keys looked up past the history's bound, not remembered.
    pub dropped: u64,
}

/// One action key an invocation looked up.
#[derive(Clone, Debug)]
pub struct ActionRecord {
    pub digest: Digest,
    pub mnemonic: String,
    pub target: String,
    /// The cache did not have it when first looked up.
    pub missed: bool,
}

struct Invocation {
    summary: InvocationSummary,
    actions: HashMap<Digest, ActionRecord>,
    /// For eviction: a counter, not a clock, so ties cannot happen.
    touched: u64,
}

/// One call being recorded.
#[derive(Clone, Copy)]
struct Call<'a> {
    instance: &'a str,
    meta: Option<&'a RequestMeta>,
    action: Digest,
    now: SystemTime,
}

/// An invocation's place in the history: (instance, caller, invocation id).
type InvocationKey = (String, String, String);

struct Inner {
    invocations: HashMap<InvocationKey, Invocation>,
    actions_total: usize,
    recent: VecDeque<RecentAction>,
    next_id: u64,
    clock: u64,
    timeline: timeline::Timeline,
}

pub struct Activity {
    limits: StatusConfig,
    inner: Mutex<Inner>,
    started: SystemTime,
}

/// A consistent copy of the history, filtered to what one caller may see.
#[derive(Clone, Debug, Serialize)]
pub struct ActivitySnapshot {
    pub minutes: Vec<Minute>,
    pub recent: Vec<RecentAction>,
    pub invocations: Vec<InvocationSummary>,
}

pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Activity {
    pub fn new(limits: StatusConfig) -> Activity {
        Activity {
            limits,
            inner: Mutex::new(Inner {
                invocations: HashMap::new(),
                actions_total: 0,
                recent: VecDeque::new(),
                next_id: 1,
                clock: 0,
                timeline: timeline::Timeline::default(),
            }),
            started: SystemTime::now(),
        }
    }

    pub fn protects_metrics(&self) -> bool {
        self.limits.protect_metrics
    }

    pub fn started(&self) -> SystemTime {
        self.started
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An action-cache lookup (GetActionResult, or Execute's cache check): `found` is
    /// `None` for a miss, and for a hit who wrote the entry, when that is known.
    pub fn lookup(
        &self,
        instance: &str,
        meta: Option<&RequestMeta>,
        action: Digest,
        found: Option<Option<&lre_store::ac_entry::Provenance>>,
    ) {
        let hit = found.is_some();
        let now = SystemTime::now();
        let mut st = self.inner();
        st.timeline.count(
            now,
            instance,
            |c| {
                if hit {
                    c.hits += 1
                } else {
                    c.misses += 1
                }
            },
        );
        let call = Call {
            instance,
            meta,
            action,
            now,
        };
        self.remember(&mut st, &call, !hit, |s| {
            if hit {
                s.hits += 1
            } else {
                s.misses += 1
            }
        });
        let outcome = if hit { Outcome::Hit } else { Outcome::Miss };
        self.push_recent(&mut st, &call, outcome, None);
        if let (Some(r), Some(Some(p))) = (st.recent.back_mut(), found) {
            r.written_by = Some(WrittenBy::of(p));
        }
    }

    /// A worker finished an action.
    pub fn executed(
        &self,
        instance: &str,
        meta: Option<&RequestMeta>,
        action: Digest,
        e: Execution,
    ) {
        let now = SystemTime::now();
        let mut st = self.inner();
        st.timeline.count(now, instance, |c| c.executed += 1);
        let call = Call {
            instance,
            meta,
            action,
            now,
        };
        // It ran, so the cache did not answer it.
        self.remember(&mut st, &call, true, |s| {
            if e.failed {
                s.failed += 1
            } else {
                s.executed += 1
            }
        });
        let outcome = if e.failed {
            Outcome::Failed
        } else {
            Outcome::Executed
        };
        self.push_recent(&mut st, &call, outcome, Some(e));
    }

    /// Adds `action` to the invocation's record, evicting the least recently active
    /// invocations to stay inside the bounds.
    fn remember(
        &self,
        st: &mut Inner,
        c: &Call<'_>,
        missed: bool,
        count: impl FnOnce(&mut InvocationSummary),
    ) {
        let Call {
            instance,
            meta,
            action,
            now,
        } = *c;
        let Some(m) = meta else {
            return;
        };
        let key = (instance.to_string(), m.caller.clone(), m.invocation.clone());
        st.clock += 1;
        let clock = st.clock;
        if !st.invocations.contains_key(&key) {
            while st.invocations.len() >= self.limits.max_invocations {
                if !evict_from_biggest(st, None, |_| 1) {
                    break;
                }
            }
            st.invocations.insert(
                key.clone(),
                Invocation {
                    summary: InvocationSummary {
                        instance: instance.to_string(),
                        id: m.invocation.clone(),
                        caller: m.caller.clone(),
                        correlated: m.correlated.clone(),
                        tool: m.tool.clone(),
                        first_seen_ms: unix_ms(now),
                        last_seen_ms: unix_ms(now),
                        sequence: clock,
                        hits: 0,
                        misses: 0,
                        executed: 0,
                        failed: 0,
                        dropped: 0,
                    },
                    actions: HashMap::new(),
                    touched: clock,
                },
            );
        }
        let known = st
            .invocations
            .get(&key)
            .is_some_and(|i| i.actions.contains_key(&action));
        if !known {
            while st.actions_total >= self.limits.max_actions {
                if !evict_from_biggest(st, Some(&key), |i| i.actions.len()) {
                    break;
                }
            }
        }
        let room = st.actions_total < self.limits.max_actions;
        let Some(inv) = st.invocations.get_mut(&key) else {
            return;
        };
        inv.touched = clock;
        inv.summary.last_seen_ms = unix_ms(now);
        count(&mut inv.summary);
        if known {
            if let Some(r) = inv.actions.get_mut(&action) {
                r.missed |= missed;
            }
            return;
        }
        if !room {
            inv.summary.dropped += 1;
            return;
        }
        inv.actions.insert(
            action,
            ActionRecord {
                digest: action,
                mnemonic: m.mnemonic.clone(),
                target: m.target.clone(),
                missed,
            },
        );
        st.actions_total += 1;
    }

    fn push_recent(&self, st: &mut Inner, c: &Call<'_>, outcome: Outcome, e: Option<Execution>) {
        let Call {
            instance,
            meta,
            action,
            now,
        } = *c;
        let id = st.next_id;
        st.next_id += 1;
        let m = meta.cloned().unwrap_or_default();
        let (first_output, worker, exit_code, duration_ms, stderr, message) = match e {
            Some(e) => (
                e.first_output,
                Some(e.worker),
                e.exit_code,
                e.duration.map(|d| d.as_millis() as u64),
                e.stderr,
                e.message,
            ),
            None => (String::new(), None, None, None, None, String::new()),
        };
        st.recent.push_back(RecentAction {
            id,
            at_ms: unix_ms(now),
            instance: instance.to_string(),
            invocation: m.invocation,
            mnemonic: m.mnemonic,
            target: m.target,
            first_output: clip(first_output),
            action: action.to_string(),
            outcome,
            duration_ms,
            worker,
            exit_code,
            message: clip(message),
            has_stderr: stderr.is_some(),
            stderr,
            written_by: None,
        });
        while st.recent.len() > self.limits.recent_actions {
            st.recent.pop_front();
        }
    }

    /// Samples the store's gauges and counters into the current minute (a ticker calls it).
    pub fn sample(&self, metrics: &Metrics) {
        let now = SystemTime::now();
        self.inner().timeline.sample(now, metrics);
    }

    pub fn snapshot(&self, visible: impl Fn(&str) -> bool) -> ActivitySnapshot {
        let now = SystemTime::now();
        let mut st = self.inner();
        let minutes = st.timeline.last_hour(now, &visible);
        let recent = st
            .recent
            .iter()
            .rev()
            .filter(|r| visible(&r.instance))
            .cloned()
            .collect();
        let mut invocations: Vec<InvocationSummary> = st
            .invocations
            .values()
            .filter(|i| visible(&i.summary.instance))
            .map(|i| i.summary.clone())
            .collect();
        // Newest first, by first appearance.
        invocations.sort_by_key(|i| std::cmp::Reverse(i.sequence));
        ActivitySnapshot {
            minutes,
            recent,
            invocations,
        }
    }

    pub fn recent_action(&self, id: u64) -> Option<RecentAction> {
        self.inner().recent.iter().find(|r| r.id == id).cloned()
    }

    /// The invocation's summary and the action keys it looked up. Ids are Bazel's random
    /// UUIDs, so another caller using the same id came later: the first caller's is it.
    pub fn invocation(
        &self,
        instance: &str,
        id: &str,
    ) -> Option<(InvocationSummary, Vec<ActionRecord>)> {
        let st = self.inner();
        let inv = st
            .invocations
            .iter()
            .filter(|((i, _, n), _)| i == instance && n == id)
            .map(|(_, inv)| inv)
            .min_by_key(|inv| inv.summary.sequence)?;
        Some((inv.summary.clone(), inv.actions.values().cloned().collect()))
    }

    /// How many action keys are remembered in all, for tests of the bound.
    pub fn remembered_actions(&self) -> usize {
        self.inner().actions_total
    }
}

/// Makes room: drops the least recently active invocation (other than `keep`) of the
/// caller that holds the most (`weight` of its invocations summed), so that one caller
/// filling the history pushes out its own invocations, never another's. False if none is
/// left to drop.
fn evict_from_biggest(
    st: &mut Inner,
    keep: Option<&InvocationKey>,
    weight: impl Fn(&Invocation) -> usize,
) -> bool {
    // Per caller, in one pass: how much it holds (`keep` counted too) and its least
    // recently active invocation other than `keep`.
    /// A caller's total weight, and its least recently active evictable invocation.
    type Held<'a> = (usize, Option<(u64, &'a InvocationKey)>);
    let mut held: HashMap<&str, Held<'_>> = HashMap::new();
    for (k, i) in &st.invocations {
        let e = held.entry(k.1.as_str()).or_insert((0, None));
        e.0 += weight(i).max(1);
        if Some(k) != keep && e.1.is_none_or(|(t, _)| i.touched < t) {
            e.1 = Some((i.touched, k));
        }
    }
    // The biggest holder gives up its oldest; ties go to the oldest. If the biggest holder
    // has nothing but `keep`, nothing is dropped (the caller's new entry is not kept).
    let victim = held
        .values()
        .max_by_key(|(n, oldest)| (*n, std::cmp::Reverse(oldest.map_or(0, |(t, _)| t))))
        .and_then(|(_, oldest)| oldest.map(|(_, k)| k.clone()));
    match victim {
        Some(k) => {
            if let Some(i) = st.invocations.remove(&k) {
                st.actions_total -= i.actions.len();
            }
            true
        }
        None => false,
    }
}

#[cfg(test)]
mod tests;
