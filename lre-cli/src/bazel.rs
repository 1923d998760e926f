//! Which Bazel the generated files serve, and what differs between versions.

use std::path::Path;
use std::process::Command;

use crate::command::run;
use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct BazelVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl std::fmt::Display for BazelVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

impl std::str::FromStr for BazelVersion {
    type Err = Error;
    /// `4.2.3`, `7.4`, `8.0.0rc1`, `bazel 7.4.1`, `4.2.3+ds-9`.
    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::BazelVersion(s.to_owned());
        let v = s.trim().trim_start_matches("bazel").trim();
        let mut nums = v.split('.').map(|part| {
            let digits: String = part.chars().take_while(char::is_ascii_digit).collect();
            digits.parse::<u32>().ok()
        });
        let major = nums.next().flatten().ok_or_else(bad)?;
        let minor = nums.next().flatten().ok_or_else(bad)?;
        let patch = nums.next().flatten().unwrap_or(0);
        if major < 4 || (major == 4 && minor < 2) {
            return Err(Error::Invalid(format!(
                "Bazel {major}.{minor} is too old: lre supports Bazel 4.2 and later"
            )));
        }
        Ok(BazelVersion {
            major,
            minor,
            patch,
        })
    }
}

/// `.bazelversion` (the bazelisk convention), else `bazel --version`.
pub fn detect(workspace: &Path) -> Result<BazelVersion> {
    if let Ok(text) = std::fs::read_to_string(workspace.join(".bazelversion")) {
        if let Some(line) = text.lines().map(str::trim).find(|l| !l.is_empty()) {
            return line.parse();
        }
    }
    let (out, _) = run(
        Command::new("bazel")
            .arg("--version")
            .current_dir(workspace),
        b"",
    )
    .map_err(|e| Error::NoBazelVersion(e.to_string()))?;
    out.trim()
        .parse()
        .map_err(|_| Error::NoBazelVersion(format!("`bazel --version` printed {:?}", out.trim())))
}

/// The version-dependent choices, named for what they change.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Form {
    /// Before 7, C++ rules ignore toolchain resolution unless asked.
    pub needs_cc_toolchain_resolution_flag: bool,
    /// 8 dropped `@bazel_tools//tools/cpp:unix_cc_toolchain_config.bzl`; rules_cc has it.
    pub cc_rules_from_rules_cc: bool,
    /// Before 5, the Java runtime is chosen with `--javabase`, later by toolchain resolution
    /// keyed on `--java_runtime_version`.
    pub java_runtime_by_version: bool,
    /// 7 and later read MODULE.bazel by default.
    pub bzlmod: bool,
}

impl BazelVersion {
    pub fn form(&self) -> Form {
        Form {
            needs_cc_toolchain_resolution_flag: self.major < 7,
            cc_rules_from_rules_cc: self.major >= 8,
            java_runtime_by_version: self.major >= 5,
            bzlmod: self.major >= 7,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_from_the_forms_bazel_prints() {
        let v = |s: &str| s.parse::<BazelVersion>().unwrap();
        assert_eq!(
            v("4.2.3"),
            BazelVersion {
                major: 4,
                minor: 2,
                patch: 3
            }
        );
        assert_eq!(
            v("bazel 7.4.1"),
            BazelVersion {
                major: 7,
                minor: 4,
                patch: 1
            }
        );
        assert_eq!(
            v("8.0.0rc1"),
            BazelVersion {
                major: 8,
                minor: 0,
                patch: 0
            }
        );
        assert_eq!(
            v("4.2.3+ds-9"),
            BazelVersion {
                major: 4,
                minor: 2,
                patch: 3
            }
        );
        assert_eq!(
            v("6.5"),
            BazelVersion {
                major: 6,
                minor: 5,
                patch: 0
            }
        );
        assert!("no_version".parse::<BazelVersion>().is_err());
        assert!("bazel no_version".parse::<BazelVersion>().is_err());
        assert!("3.7.2"
            .parse::<BazelVersion>()
            .unwrap_err()
            .to_string()
            .contains("too old"));
    }

    #[test]
    fn forms_follow_the_version() {
        let f = |s: &str| s.parse::<BazelVersion>().unwrap().form();
        assert!(
            f("4.2.3").needs_cc_toolchain_resolution_flag && !f("4.2.3").java_runtime_by_version
        );
        assert!(
            !f("7.4.1").needs_cc_toolchain_resolution_flag && !f("7.4.1").cc_rules_from_rules_cc
        );
        assert!(f("8.0.0").cc_rules_from_rules_cc && f("8.0.0").bzlmod);
    }
}
