//! The `[instance_settings."NAME"]` tables: how one instance behaves.

use serde::Deserialize;

/// One instance's settings: the `[instance_settings."NAME"]` table (the default instance
/// is `""`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceSettings {
    /// The action cache takes results only from lre's own scheduler, that is from actions
    /// its workers ran: UpdateActionResult, HTTP `PUT /ac/` and Bazel's upload of local
    /// results are refused for every token, and Capabilities says `update_enabled =
    /// false`. An entry for an action is then the result of running that action; poisoning
    /// the cache takes a worker, not a client token.
    #[serde(default)]
    pub executed_only: bool,
}
