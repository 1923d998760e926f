//! The `[instance_settings."NAME"]` tables: how one instance behaves.

use serde::Deserialize;

use crate::config::{invalid, ByteSize, ConfigError};
use lre_nix_formats::PublicKey;

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
    /// The instance's Nix binary cache (`http://HOST:PORT/<instance>/nix`).
    #[serde(default)]
    pub nix: NixCacheSettings,
}

/// `[instance_settings."NAME".nix]`: whom the instance's Nix binary cache trusts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NixCacheSettings {
    /// Public keys (`name:base64`, as in Nix's `trusted-public-keys`) whose signature
    /// makes a store path acceptable. Without one, only content-addressed paths (which
    /// the server verifies itself) are accepted.
    #[serde(default)]
    pub trusted_public_keys: Vec<String>,
    /// The largest NAR (uncompressed) an upload may be.
    #[serde(default = "default_max_nar_size")]
    pub max_nar_size: ByteSize,
}

fn default_max_nar_size() -> ByteSize {
    ByteSize(4 << 30)
}

impl Default for NixCacheSettings {
    fn default() -> Self {
        NixCacheSettings {
            trusted_public_keys: Vec::new(),
            max_nar_size: default_max_nar_size(),
        }
    }
}

impl NixCacheSettings {
    /// The trusted keys; `validate` made sure each parses.
    pub fn keys(&self) -> Vec<PublicKey> {
        self.trusted_public_keys
            .iter()
            .filter_map(|k| PublicKey::parse(k).ok())
            .collect()
    }

    /// `key` is the table's own key, for errors.
    pub fn validate(&self, key: &str) -> Result<(), ConfigError> {
        for (i, k) in self.trusted_public_keys.iter().enumerate() {
            PublicKey::parse(k).map_err(|e| {
                invalid(
                    format!("{key}.trusted_public_keys[{i}]"),
                    format!("{e} (the contents of the .pub file `nix-store --generate-binary-cache-key` wrote)"),
                )
            })?;
        }
        if self.max_nar_size.0 == 0 {
            return Err(invalid(
                format!("{key}.max_nar_size"),
                "must be at least 1 byte",
            ));
        }
        Ok(())
    }
}
