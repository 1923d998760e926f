//! Time, as the scheduler reads it: injected, so that tests of graces, deadlines and
//! forgetting finished operations move a clock instead of sleeping. Leases in Redis are
//! timed by Redis's own clock (every replica agrees on it), not by this one.

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

pub trait Clock: Send + Sync + 'static {
    /// For intervals (graces, deadlines).
    fn now(&self) -> Instant;
    /// For timestamps clients see (`queued_timestamp`).
    fn wall(&self) -> SystemTime;
}

/// The machine's clocks.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
    fn wall(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that moves only when told to.
pub struct ManualClock {
    at: Mutex<(Instant, SystemTime)>,
}

impl Default for ManualClock {
    fn default() -> Self {
        ManualClock {
            at: Mutex::new((Instant::now(), SystemTime::now())),
        }
    }
}

impl ManualClock {
    pub fn advance(&self, by: Duration) {
        let mut at = self.at.lock().unwrap_or_else(|p| p.into_inner());
        at.0 += by;
        at.1 += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.at.lock().unwrap_or_else(|p| p.into_inner()).0
    }
    fn wall(&self) -> SystemTime {
        self.at.lock().unwrap_or_else(|p| p.into_inner()).1
    }
}
