//! The `[execution]` table: the scheduler, its bounds, and the endpoint workers connect to.

use serde::Deserialize;

use super::{invalid, ConfigError};

/// Remote execution: the scheduler and the endpoint workers connect to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecutionConfig {
    /// Serve Execute/WaitExecution/Operations and the worker endpoint, and advertise
    /// `exec_enabled` in Capabilities.
    #[serde(default)]
    pub enabled: bool,
    /// Timeout for actions that set none.
    #[serde(default = "default_action_timeout")]
    pub default_timeout_seconds: u64,
    /// Actions asking for more are refused.
    #[serde(default = "default_max_action_timeout")]
    pub max_timeout_seconds: u64,
    /// Workers lost under one action before it fails.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Workers send keepalives this often; one silent for three intervals is dropped.
    #[serde(default = "default_keepalive")]
    pub keepalive_seconds: u64,
    /// Platforms of workers that may not be connected yet: matching actions wait for them
    /// instead of failing at once. Each entry maps property names to values.
    #[serde(default)]
    pub known_platforms: Vec<std::collections::BTreeMap<String, String>>,
    /// Actions waiting for a worker; Execute past it gets RESOURCE_EXHAUSTED.
    #[serde(default = "default_max_queued")]
    pub max_queued_actions: usize,
    /// Operations tracked at once (queued, running, and finished ones for WaitExecution).
    #[serde(default = "default_max_operations")]
    pub max_operations: usize,
    /// Share the queue, operations, in-flight deduplication and worker registrations
    /// with every replica that names the same Redis (keys under its `prefix` + "sched:").
    /// Absent: this process schedules alone, in memory.
    #[serde(default)]
    pub redis: Option<lre_store::config::RedisConfig>,
    /// With `redis`: how long a replica's hold on an executing action lasts without being
    /// renewed. A replica that dies loses its actions to the others after this long.
    #[serde(default = "default_lease")]
    pub lease_seconds: u64,
    /// How long an action waits for a worker that may be reconnecting instead of failing
    /// as one no worker can run: after start while no worker is connected, and after the
    /// last worker offering its platform left. 0 fails such actions at once.
    #[serde(default = "default_worker_grace")]
    pub worker_grace_seconds: u64,
}

fn default_worker_grace() -> u64 {
    30
}

fn default_lease() -> u64 {
    15
}

impl Default for ExecutionConfig {
    fn default() -> Self {
        ExecutionConfig {
            enabled: false,
            default_timeout_seconds: default_action_timeout(),
            max_timeout_seconds: default_max_action_timeout(),
            max_attempts: default_max_attempts(),
            keepalive_seconds: default_keepalive(),
            known_platforms: vec![],
            max_queued_actions: default_max_queued(),
            max_operations: default_max_operations(),
            redis: None,
            lease_seconds: default_lease(),
            worker_grace_seconds: default_worker_grace(),
        }
    }
}

fn default_max_queued() -> usize {
    100_000
}
fn default_max_operations() -> usize {
    200_000
}

fn default_action_timeout() -> u64 {
    900
}
fn default_max_action_timeout() -> u64 {
    3 * 3600
}
fn default_max_attempts() -> u32 {
    3
}
fn default_keepalive() -> u64 {
    10
}

impl ExecutionConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let e = self;
        if e.default_timeout_seconds == 0 || e.default_timeout_seconds > e.max_timeout_seconds {
            return Err(invalid(
                "execution.default_timeout_seconds",
                "must be between 1 and execution.max_timeout_seconds",
            ));
        }
        if e.max_attempts == 0 {
            return Err(invalid("execution.max_attempts", "must be at least 1"));
        }
        if e.keepalive_seconds == 0 {
            return Err(invalid("execution.keepalive_seconds", "must be at least 1"));
        }
        if e.max_queued_actions == 0 {
            return Err(invalid(
                "execution.max_queued_actions",
                "must be at least 1",
            ));
        }
        if e.worker_grace_seconds > 3600 {
            return Err(invalid(
                "execution.worker_grace_seconds",
                "must be at most 3600",
            ));
        }
        if e.max_operations < e.max_queued_actions {
            return Err(invalid(
                "execution.max_operations",
                "must be at least execution.max_queued_actions",
            ));
        }
        if let Some(r) = &e.redis {
            lre_store::config::StoreConfig::Redis(r.clone()).validate("execution.redis")?;
        }
        if !(3..=600).contains(&e.lease_seconds) {
            return Err(invalid(
                "execution.lease_seconds",
                "must be between 3 and 600 (leases are renewed every 2 seconds)",
            ));
        }
        Ok(())
    }
}
