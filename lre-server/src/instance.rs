//! Instance names: each one is its own action-cache namespace, with its own settings
//! (`[instance_settings."NAME"]`).

use std::collections::BTreeMap;

pub use crate::config::{InstanceSettings, NixCacheSettings};
use crate::error::{Error, Result};

// The naming rule lives with resource names, in lre-store.
pub use lre_store::instance_name::{validate_name, MAX_NAME};

/// Which instance names this server serves, and how.
#[derive(Debug, Clone, Default)]
pub struct Instances {
    allowed: Option<Vec<String>>,
    settings: BTreeMap<String, InstanceSettings>,
}

/// Why a client may not write results to an executed-only instance, naming the setting.
pub fn executed_only_refusal(instance: &str) -> String {
    format!(
        "instance {instance:?} is executed-only (instance_settings.{}.executed_only = true): its \
         action cache takes results only from actions this server's workers ran, so no client \
         may upload one; build with --remote_executor and --noremote_upload_local_results",
        toml_key(instance)
    )
}

/// `name` as a TOML key: bare when it can be, quoted otherwise.
pub fn toml_key(name: &str) -> String {
    if !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        name.to_string()
    } else {
        format!("{name:?}")
    }
}

impl Instances {
    pub fn new(allowed: Option<Vec<String>>) -> Self {
        Instances {
            allowed,
            settings: BTreeMap::new(),
        }
    }

    pub fn with_settings(mut self, settings: BTreeMap<String, InstanceSettings>) -> Self {
        self.settings = settings;
        self
    }

    /// The instance's Nix binary-cache settings (the defaults for an instance without a
    /// table).
    pub fn nix(&self, name: &str) -> NixCacheSettings {
        self.settings
            .get(name)
            .map(|s| s.nix.clone())
            .unwrap_or_default()
    }

    pub fn executed_only(&self, name: &str) -> bool {
        self.settings.get(name).is_some_and(|s| s.executed_only)
    }

    pub fn check(&self, name: &str) -> Result<()> {
        validate_name(name)?;
        match &self.allowed {
            Some(list) if !list.iter().any(|n| n == name) => {
                Err(Error::UnknownInstance(name.to_string()))
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_names_are_refused_whatever_the_allow_list() {
        let any = Instances::new(None);
        assert!(any.check(&"a".repeat(MAX_NAME)).is_ok());
        let e = any.check(&"a".repeat(17 << 20)).unwrap_err().to_string();
        assert!(e.contains("longer than 256") && e.len() < 200, "{e}");
    }

    #[test]
    fn executed_only_is_per_instance_and_named_in_the_refusal() {
        let mut settings = BTreeMap::new();
        settings.insert(
            "main".to_string(),
            InstanceSettings {
                executed_only: true,
                ..Default::default()
            },
        );
        settings.insert("".to_string(), InstanceSettings::default());
        let i = Instances::new(None).with_settings(settings);
        assert!(i.executed_only("main"));
        assert!(!i.executed_only(""));
        assert!(!i.executed_only("other"));
        assert!(executed_only_refusal("main").contains("instance_settings.main.executed_only"));
        assert!(executed_only_refusal("").contains("instance_settings.\"\".executed_only"));
        assert!(executed_only_refusal("a/b").contains("instance_settings.\"a/b\".executed_only"));
    }

    #[test]
    fn allow_list() {
        let i = Instances::new(Some(vec!["".into(), "main".into()]));
        assert!(i.check("").is_ok());
        assert!(i.check("main").is_ok());
        assert!(matches!(i.check("other"), Err(Error::UnknownInstance(_))));
        let any = Instances::new(None);
        assert!(any.check("x/y").is_ok());
        assert!(any.check("x/blobs").is_err());
        assert!(any.check("../x").is_err());
    }
}
