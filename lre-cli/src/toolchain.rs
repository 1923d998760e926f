//! The toolchain as `lre` sees it: the merged Env, the probed C/C++ compiler, the Java
//! runtime, and the closure of store paths they pin, checked for hermeticity.

use std::path::Path;

use sha2::{Digest, Sha256};

use crate::env::Env;
use crate::error::{io, Error, Result};
use crate::nix::{self, store_path_of, STORE_DIR};
use crate::probe::{self, CcInfo};

#[derive(Clone, Debug, serde::Serialize)]
pub struct JavaInfo {
    pub java_home: String,
    /// The feature version (`17`) from `$JAVA_HOME/release`, when it says.
    pub version: Option<u32>,
}

#[derive(Clone, Debug)]
pub struct Toolchain {
    pub env: Env,
    pub cc: Option<CcInfo>,
    pub java: Option<JavaInfo>,
    /// Every store path the toolchain needs, sorted.
    pub closure: Vec<String>,
    /// A shell on the toolchain's PATH, for Bazel's `--shell_executable`: genrules then run
    /// the pinned shell, not the host's /bin/bash, which a worker image does not have.
    pub shell: Option<String>,
}

/// What the user named on the command line or in the flake module.
#[derive(Clone, Debug, Default)]
pub struct Sources {
    pub env: Vec<String>,
    pub cc: Option<String>,
    pub java: Option<String>,
}

impl Toolchain {
    /// Realises the installables with Nix, merges their Env with the explicit one, probes
    /// the compiler and computes the closure.
    pub fn resolve(src: &Sources, allow_host_path: bool) -> Result<Toolchain> {
        let mut env = Env::from_entries(&src.env)?;
        let mut roots = Vec::new();
        for (installable, role) in [(&src.cc, "cc"), (&src.java, "java")] {
            if let Some(i) = installable {
                let r = nix::realise(i, role)?;
                env.merge(&r.env)?;
                roots.push(r.out.display().to_string());
            }
        }
        let cc = env.get("CC").map(|cc| probe::probe(cc, &env)).transpose()?;
        let java = env.get("JAVA_HOME").map(java_info).transpose()?;
        if cc.is_none() && java.is_none() {
            return Err(Error::NoToolchain);
        }
        let shell = ["bash", "sh"].iter().find_map(|name| {
            env.search_path()
                .into_iter()
                .map(|d| format!("{d}/{name}"))
                .find(|p| in_store(p) && Path::new(p).is_file())
        });
        let mut toolchain = Toolchain {
            env,
            cc,
            java,
            closure: Vec::new(),
            shell,
        };
        let host = toolchain.host_paths();
        if !host.is_empty() && !allow_host_path {
            return Err(Error::HostPaths(host));
        }
        roots.extend(
            toolchain
                .pinned_paths()
                .iter()
                .filter_map(|p| store_path_of(p))
                .map(str::to_owned),
        );
        roots.sort();
        roots.dedup();
        let roots: Vec<&str> = roots.iter().map(String::as_str).collect();
        toolchain.closure = if roots.is_empty() {
            Vec::new()
        } else {
            nix::closure(&roots)?.into_iter().map(|i| i.path).collect()
        };
        Ok(toolchain)
    }

    /// Every path the generated files pin: Env values, tools, include directories, java_home.
    pub fn pinned_paths(&self) -> Vec<String> {
        let mut paths: Vec<String> = self
            .env
            .mentioned_paths()
            .into_iter()
            .map(|(_, p)| p)
            .collect();
        if let Some(cc) = &self.cc {
            paths.extend(cc.tools.values().cloned());
            paths.extend(cc.include_dirs.iter().cloned());
        }
        if let Some(j) = &self.java {
            paths.push(j.java_home.clone());
        }
        paths.sort();
        paths.dedup();
        paths
    }

    /// Pinned paths outside /nix/store, also through symlinks (a store path that links to
    /// /usr/bin/gcc hides the host's compiler), each said with where it came from.
    pub fn host_paths(&self) -> Vec<String> {
        let mut bad = Vec::new();
        let mut note = |what: String, path: &str| {
            if !in_store(path) {
                bad.push(format!("{what}: {path}"));
            } else if let Ok(real) = std::fs::canonicalize(path) {
                let real = real.display().to_string();
                if !in_store(&real) {
                    bad.push(format!("{what}: {path} (a link to {real})"));
                }
            }
        };
        for (name, path) in self.env.mentioned_paths() {
            note(format!("Env {name}"), &path);
        }
        if let Some(cc) = &self.cc {
            for (tool, path) in &cc.tools {
                note(format!("tool {tool}"), path);
            }
            for dir in &cc.include_dirs {
                note("include directory".into(), dir);
            }
        }
        if let Some(j) = &self.java {
            note("java_home".into(), &j.java_home);
        }
        bad.sort();
        bad.dedup();
        bad
    }

    /// A stable name of the closure, the `container-image` a worker must offer until the
    /// toolchain has a real image. Store paths, not NAR hashes: Nix guarantees the same path
    /// means the same build inputs, while a non-reproducible build may differ in its bytes
    /// between machines, and the identity must agree wherever the toolchain is realised.
    pub fn closure_identity(closure: &[String]) -> String {
        let mut h = Sha256::new();
        for p in closure {
            h.update(p.as_bytes());
            h.update(b"\n");
        }
        format!("lre-closure:sha256:{}", hex::encode(h.finalize()))
    }
}

/// A path strictly inside /nix/store, with no `..` to climb out of it.
pub fn in_store(path: &str) -> bool {
    path.strip_prefix(STORE_DIR)
        .is_some_and(|rest| rest.starts_with('/') && rest.len() > 1)
        && !path.split('/').any(|c| c == "..")
}

fn java_info(java_home: &str) -> Result<JavaInfo> {
    let home = Path::new(java_home);
    let java = home.join("bin/java");
    if !java.exists() {
        return Err(Error::Invalid(format!(
            "JAVA_HOME={java_home} has no bin/java"
        )));
    }
    let release = home.join("release");
    let version = if release.exists() {
        let text = std::fs::read_to_string(&release).map_err(io(&release))?;
        parse_java_release(&text)
    } else {
        None
    };
    Ok(JavaInfo {
        java_home: java_home.to_owned(),
        version,
    })
}

/// `JAVA_VERSION="17.0.15"` → 17; `JAVA_VERSION="1.8.0_392"` → 8.
pub fn parse_java_release(text: &str) -> Option<u32> {
    let line = text.lines().find_map(|l| l.strip_prefix("JAVA_VERSION="))?;
    let v = line.trim().trim_matches('"');
    let mut parts = v.split(['.', '_']);
    let first: u32 = parts.next()?.parse().ok()?;
    if first == 1 {
        parts.next()?.parse().ok()
    } else {
        Some(first)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn cc(tool: &str, include: &str) -> CcInfo {
        CcInfo {
            cc: "/nix/store/a-cc/bin/cc".into(),
            kind: probe::CompilerKind::Clang,
            version: "19".into(),
            target: "x86_64-unknown-linux-musl".into(),
            include_dirs: vec![include.into()],
            tools: BTreeMap::from([("ar".into(), tool.into())]),
        }
    }

    #[test]
    fn every_host_path_is_listed_with_its_origin() {
        let t = Toolchain {
            env: Env::from_entries(&["PATH=/nix/store/a-cc/bin:/usr/bin", "CPP=/usr/bin/cpp"])
                .unwrap(),
            cc: Some(cc("/usr/bin/ar", "/usr/include")),
            java: Some(JavaInfo {
                java_home: "/nix/store/../usr/lib/jvm".into(),
                version: None,
            }),
            closure: vec![],
            shell: None,
        };
        let bad = t.host_paths();
        for want in [
            "Env PATH: /usr/bin",
            "Env CPP: /usr/bin/cpp",
            "tool ar: /usr/bin/ar",
            "include directory: /usr/include",
            "java_home: /nix/store/../usr/lib/jvm",
        ] {
            assert!(bad.iter().any(|b| b == want), "{want} missing from {bad:?}");
        }
        assert_eq!(bad.len(), 5, "{bad:?}");
        let msg = Error::HostPaths(bad).to_string();
        assert!(
            msg.contains("--allow-host-path") && msg.contains("  - tool ar: /usr/bin/ar"),
            "{msg}"
        );
    }

    #[test]
    fn a_store_toolchain_is_hermetic() {
        let t = Toolchain {
            env: Env::from_entries(&["PATH=/nix/store/a-cc/bin", "CC=/nix/store/a-cc/bin/cc"])
                .unwrap(),
            cc: Some(cc("/nix/store/a-cc/bin/ar", "/nix/store/b-libc/include")),
            java: None,
            closure: vec![],
            shell: None,
        };
        assert!(t.host_paths().is_empty());
    }

    #[test]
    fn closure_identity_depends_on_every_path() {
        let a = Toolchain::closure_identity(&["/nix/store/a".into(), "/nix/store/b".into()]);
        let b = Toolchain::closure_identity(&["/nix/store/a".into(), "/nix/store/c".into()]);
        assert!(a.starts_with("lre-closure:sha256:") && a.len() == 19 + 64);
        assert_ne!(a, b);
    }

    #[test]
    fn java_versions_from_release_files() {
        assert_eq!(
            parse_java_release("IMPLEMENTOR=\"x\"\nJAVA_VERSION=\"17.0.15\"\n"),
            Some(17)
        );
        assert_eq!(parse_java_release("JAVA_VERSION=\"1.8.0_392\""), Some(8));
        assert_eq!(parse_java_release("JAVA_VERSION=\"21\""), Some(21));
        assert_eq!(parse_java_release("nothing"), None);
    }
}
