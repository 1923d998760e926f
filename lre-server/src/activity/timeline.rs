//! The last hour, minute by minute: action-cache hits, misses and executions per instance,
//! and the store's size, traffic and evictions.

use std::collections::{BTreeMap, VecDeque};
use std::time::SystemTime;

use serde::Serialize;

use crate::metrics::Metrics;

const MINUTES: u64 = 60;
/// Instances counted separately in one minute; the rest share one row, so a client that
/// invents instance names cannot grow the timeline.
const MAX_INSTANCES_PER_MINUTE: usize = 32;
pub const OTHER_INSTANCES: &str = "(other instances)";

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub hits: u64,
    pub misses: u64,
    pub executed: u64,
}

#[derive(Clone, Copy, Debug, Default)]
struct Totals {
    bytes_in: u64,
    bytes_out: u64,
    evictions: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Minute {
    /// Minutes since the Unix epoch.
    pub minute: u64,
    pub size_bytes: u64,
    pub entries: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub evictions: u64,
    /// Instance name ("" is the default instance) → its counts in this minute.
    pub instances: BTreeMap<String, Counts>,
    #[serde(skip)]
    base: Totals,
}

#[derive(Default)]
pub(super) struct Timeline {
    minutes: VecDeque<Minute>,
    last: Totals,
    size_bytes: u64,
    entries: u64,
}

fn minute_of(t: SystemTime) -> u64 {
    super::unix_ms(t) / 60_000
}

impl Timeline {
    fn current(&mut self, now: SystemTime) -> &mut Minute {
        let m = minute_of(now);
        if self.minutes.back().is_none_or(|b| b.minute < m) {
            self.minutes.push_back(Minute {
                minute: m,
                size_bytes: self.size_bytes,
                entries: self.entries,
                base: self.last,
                ..Minute::default()
            });
            while self
                .minutes
                .front()
                .is_some_and(|f| f.minute + MINUTES <= m)
            {
                self.minutes.pop_front();
            }
        }
        // A clock stepped back lands in the newest minute rather than reordering the ring.
        let last = self.minutes.len() - 1;
        &mut self.minutes[last]
    }

    pub(super) fn count(&mut self, now: SystemTime, instance: &str, f: impl FnOnce(&mut Counts)) {
        let m = self.current(now);
        let name =
            if m.instances.contains_key(instance) || m.instances.len() < MAX_INSTANCES_PER_MINUTE {
                instance
            } else {
                OTHER_INSTANCES
            };
        f(m.instances.entry(name.to_string()).or_default());
    }

    pub(super) fn sample(&mut self, now: SystemTime, metrics: &Metrics) {
        let totals = Totals {
            bytes_in: metrics.bytes_received.get(),
            bytes_out: metrics.bytes_sent.get(),
            evictions: metrics.store.evictions.get(),
        };
        self.size_bytes = metrics.store.size_bytes.get().max(0) as u64;
        self.entries = metrics.store.entries.get().max(0) as u64;
        let (size, entries) = (self.size_bytes, self.entries);
        let m = self.current(now);
        m.size_bytes = size;
        m.entries = entries;
        m.bytes_in = totals.bytes_in.saturating_sub(m.base.bytes_in);
        m.bytes_out = totals.bytes_out.saturating_sub(m.base.bytes_out);
        m.evictions = totals.evictions.saturating_sub(m.base.evictions);
        self.last = totals;
    }

    /// Sixty minutes ending now, oldest first; minutes without activity are zeros, and
    /// instances the caller may not see are left out.
    pub(super) fn last_hour(
        &mut self,
        now: SystemTime,
        visible: &impl Fn(&str) -> bool,
    ) -> Vec<Minute> {
        let end = minute_of(now);
        let mut size = (self.size_bytes, self.entries);
        let mut out = Vec::with_capacity(MINUTES as usize);
        let mut it = self.minutes.iter().peekable();
        let first = (end + 1).saturating_sub(MINUTES);
        // Size before the window: the last sample of any older minute is all there is.
        if let Some(f) = self.minutes.front() {
            if f.minute >= first {
                size = (f.size_bytes, f.entries);
            }
        }
        for minute in first..=end {
            while it.peek().is_some_and(|m| m.minute < minute) {
                it.next();
            }
            match it.peek() {
                Some(m) if m.minute == minute => {
                    let mut m = (*m).clone();
                    // The shared row is visible only to callers who may see every instance.
                    m.instances.retain(|name, _| visible(name));
                    size = (m.size_bytes, m.entries);
                    out.push(m);
                }
                _ => out.push(Minute {
                    minute,
                    size_bytes: size.0,
                    entries: size.1,
                    ..Minute::default()
                }),
            }
        }
        out
    }
}
