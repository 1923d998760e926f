//! Instance names: each one is its own action-cache namespace.

use crate::error::{Error, Result};

// The naming rule lives with resource names, in lre-store.
pub use lre_store::instance_name::{validate_name, MAX_NAME};

/// Which instance names this server serves.
#[derive(Debug, Clone)]
pub struct Instances {
    allowed: Option<Vec<String>>,
}

impl Instances {
    pub fn new(allowed: Option<Vec<String>>) -> Self {
        Instances { allowed }
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
