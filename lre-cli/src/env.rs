//! The toolchain environment: `NAME=VALUE` entries, as the flake module passes them and as
//! derivations carry them in `passthru.Env` / `meta.Env`.

use std::collections::BTreeMap;

use crate::error::{Error, Result};

/// Variables whose values are `:`-separated search paths; merging two toolchains joins them.
const SEARCH_PATHS: &[&str] = &["PATH", "LD_LIBRARY_PATH", "CPATH", "LIBRARY_PATH"];

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Env {
    vars: BTreeMap<String, String>,
}

impl Env {
    pub fn parse_entry(entry: &str) -> Result<(String, String)> {
        match entry.split_once('=') {
            Some((name, value))
                if !name.is_empty()
                    && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') =>
            {
                Ok((name.to_owned(), value.to_owned()))
            }
            _ => Err(Error::EnvEntry {
                entry: entry.to_owned(),
            }),
        }
    }

    pub fn from_entries<S: AsRef<str>>(entries: &[S]) -> Result<Env> {
        let mut env = Env::default();
        for e in entries {
            let (name, value) = Env::parse_entry(e.as_ref())?;
            env.insert(name, value)?;
        }
        Ok(env)
    }

    /// Adds one variable. Search paths are joined (without repeating an element); any other
    /// variable set twice must agree, since silently picking one would hide a wrong toolchain.
    pub fn insert(&mut self, name: String, value: String) -> Result<()> {
        match self.vars.get_mut(&name) {
            None => {
                self.vars.insert(name, value);
            }
            Some(old) if *old == value => {}
            Some(old) if SEARCH_PATHS.contains(&name.as_str()) => {
                let mut parts: Vec<String> = old.split(':').map(str::to_owned).collect();
                for p in value.split(':') {
                    if !parts.iter().any(|q| q == p) {
                        parts.push(p.to_owned());
                    }
                }
                *old = parts.join(":");
            }
            Some(old) => {
                return Err(Error::EnvConflict {
                    name,
                    first: old.clone(),
                    second: value,
                });
            }
        }
        Ok(())
    }

    pub fn merge(&mut self, other: &Env) -> Result<()> {
        for (k, v) in &other.vars {
            self.insert(k.clone(), v.clone())?;
        }
        Ok(())
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.vars.get(name).map(String::as_str)
    }

    /// Entries sorted by name: the order every generated file uses.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &str)> {
        self.vars.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    pub fn search_path(&self) -> Vec<&str> {
        self.get("PATH")
            .map(|p| p.split(':').filter(|s| !s.is_empty()).collect())
            .unwrap_or_default()
    }

    /// Every absolute path mentioned in a value: whole values and search-path elements.
    pub fn mentioned_paths(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (name, value) in self.entries() {
            for part in value.split(':') {
                if part.starts_with('/') {
                    out.push((name.to_owned(), part.to_owned()));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn search_paths_join_and_other_variables_must_agree() {
        let mut a =
            Env::from_entries(&["PATH=/nix/store/a/bin", "CC=/nix/store/a/bin/cc"]).unwrap();
        let b = Env::from_entries(&[
            "PATH=/nix/store/b/bin:/nix/store/a/bin",
            "JAVA_HOME=/nix/store/j",
        ])
        .unwrap();
        a.merge(&b).unwrap();
        assert_eq!(a.get("PATH"), Some("/nix/store/a/bin:/nix/store/b/bin"));
        assert_eq!(a.get("JAVA_HOME"), Some("/nix/store/j"));
        let c = Env::from_entries(&["CC=/nix/store/other/bin/cc"]).unwrap();
        let err = a.merge(&c).unwrap_err().to_string();
        assert!(
            err.contains("CC") && err.contains("/nix/store/other/bin/cc"),
            "{err}"
        );
    }

    #[test]
    fn malformed_entries_are_refused() {
        for bad in ["PATH", "=x", "A B=c", ""] {
            assert!(Env::parse_entry(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(
            Env::parse_entry("A=b=c").unwrap(),
            ("A".into(), "b=c".into())
        );
    }
}
