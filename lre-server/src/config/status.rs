//! The `[status]` table: the status page's history bounds, and whether `/metrics` needs a
//! token.

use serde::Deserialize;

use super::{invalid, ConfigError};

/// Bounds of the history; the `[status]` config table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusConfig {
    /// Invocations remembered for miss explanations; the least recently active go first.
    #[serde(default = "default_max_invocations")]
    pub max_invocations: usize,
    /// Action keys remembered over all invocations together.
    #[serde(default = "default_max_actions")]
    pub max_actions: usize,
    /// Length of the "recent actions" list.
    #[serde(default = "default_recent_actions")]
    pub recent_actions: usize,
    /// `/metrics` follows the page's rule (with `anonymous = "none"`, a token is needed).
    /// Off by default so that an existing Prometheus scrape keeps working.
    #[serde(default)]
    pub protect_metrics: bool,
}

impl Default for StatusConfig {
    fn default() -> Self {
        StatusConfig {
            max_invocations: default_max_invocations(),
            max_actions: default_max_actions(),
            recent_actions: default_recent_actions(),
            protect_metrics: false,
        }
    }
}

fn default_max_invocations() -> usize {
    64
}
fn default_max_actions() -> usize {
    100_000
}
fn default_recent_actions() -> usize {
    200
}

impl StatusConfig {
    /// Each bound must be positive and small enough that the history fits in memory.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (key, value, max) in [
            ("status.max_invocations", self.max_invocations, 10_000),
            ("status.max_actions", self.max_actions, 2_000_000),
            ("status.recent_actions", self.recent_actions, 10_000),
        ] {
            if value == 0 || value > max {
                return Err(invalid(
                    key,
                    format!("must be between 1 and {max}, not {value}"),
                ));
            }
        }
        Ok(())
    }
}
