//! Learning a C/C++ toolchain by running it: kind and version, target, builtin include
//! directories, and its binutils from the toolchain's own PATH.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::command::run;
use crate::env::Env;
use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CompilerKind {
    Clang,
    Gcc,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct CcInfo {
    pub cc: String,
    pub kind: CompilerKind,
    pub version: String,
    /// `-dumpmachine`, e.g. `x86_64-unknown-linux-gnu`.
    pub target: String,
    pub include_dirs: Vec<String>,
    /// Bazel's tool names (`ar`, `ld`, …) to absolute paths.
    pub tools: BTreeMap<String, String>,
}

impl CcInfo {
    pub fn libc(&self) -> &'static str {
        if self.target.contains("musl") {
            "musl"
        } else {
            "glibc"
        }
    }

    /// musl toolchains link statically; a shared libc runtime would not load on the host.
    pub fn static_only(&self) -> bool {
        self.libc() == "musl"
    }

    pub fn cpu(&self) -> &'static str {
        match self.target.split('-').next() {
            Some("aarch64") | Some("arm64") => "aarch64",
            _ => "k8",
        }
    }
}

/// Tools Bazel's unix toolchain config needs, and those it only uses on request.
const REQUIRED_TOOLS: &[&str] = &["ar", "ld", "nm", "objcopy", "objdump", "strip"];
const OPTIONAL_TOOLS: &[&str] = &["gcov", "llvm-cov", "cpp", "dwp"];

fn compiler(cc: &str, env: &Env) -> Command {
    let mut cmd = Command::new(cc);
    // The probe sees what an action sees: the toolchain's Env, nothing of the user's shell.
    cmd.env_clear();
    for (k, v) in env.entries() {
        cmd.env(k, v);
    }
    if env.get("TMPDIR").is_none() {
        cmd.env("TMPDIR", std::env::temp_dir());
    }
    if let Some(home) = std::env::var_os("HOME") {
        cmd.env("HOME", home);
    }
    cmd
}

pub fn probe(cc: &str, env: &Env) -> Result<CcInfo> {
    let (version_out, _) = run(compiler(cc, env).arg("--version"), b"")?;
    let (kind, version) = parse_version(&version_out).ok_or_else(|| Error::UnknownCompiler {
        cc: cc.to_owned(),
        first_line: version_out.lines().next().unwrap_or("").to_owned(),
    })?;
    let (target, _) = run(compiler(cc, env).arg("-dumpmachine"), b"")?;
    let mut include_dirs = Vec::new();
    for lang in ["c", "c++"] {
        let (_, stderr) = run(
            compiler(cc, env).args(["-E", "-x", lang, "-", "-v", "-o", "/dev/null"]),
            b"",
        )?;
        for dir in parse_include_dirs(&stderr) {
            if !include_dirs.contains(&dir) {
                include_dirs.push(dir);
            }
        }
    }
    if include_dirs.is_empty() {
        return Err(Error::Output {
            command: format!("{cc} -E -x c++ - -v"),
            reason: "no builtin include directories in its search list".into(),
        });
    }
    let tools = find_tools(cc, env)?;
    Ok(CcInfo {
        cc: cc.to_owned(),
        kind,
        version,
        target: target.trim().to_owned(),
        include_dirs,
        tools,
    })
}

/// `clang version 19.1.7 (…)`, `gcc (GCC) 13.2.0`, `gcc (Debian 12.2.0-14) 12.2.0`.
pub fn parse_version(out: &str) -> Option<(CompilerKind, String)> {
    let first = out.lines().next()?;
    if let Some(i) = first.find("clang version ") {
        let v = first[i + "clang version ".len()..]
            .split_whitespace()
            .next()?;
        return Some((CompilerKind::Clang, v.to_owned()));
    }
    let is_gcc = first.starts_with("gcc")
        || first.starts_with("g++")
        || first.contains("-gcc")
        || first.contains("(GCC)");
    if is_gcc {
        let v = first.split_whitespace().last()?;
        if v.chars().next()?.is_ascii_digit() {
            return Some((CompilerKind::Gcc, v.to_owned()));
        }
    }
    None
}

/// The `#include <...>` search list of `cc -E -v`.
pub fn parse_include_dirs(stderr: &str) -> Vec<String> {
    stderr
        .lines()
        .skip_while(|l| !l.starts_with("#include <...> search starts here:"))
        .skip(1)
        .take_while(|l| !l.starts_with("End of search list."))
        .map(|l| {
            l.trim()
                .trim_end_matches(" (framework directory)")
                .to_owned()
        })
        .filter(|l| !l.is_empty())
        .map(|l| normalize(Path::new(&l)))
        .collect()
}

/// gcc prints `.../lib/gcc/x86_64-linux-gnu/12/../../../../include`; Bazel compares the
/// paths of headers against these literally, so `..` is resolved without following links
/// out of the store.
fn normalize(path: &Path) -> String {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            other => out.push(other.as_os_str()),
        }
    }
    out.display().to_string()
}

fn find_tools(cc: &str, env: &Env) -> Result<BTreeMap<String, String>> {
    // The compiler's own directory first: a wrapper's siblings are its binutils.
    let mut dirs: Vec<PathBuf> = Path::new(cc)
        .parent()
        .map(Path::to_path_buf)
        .into_iter()
        .collect();
    dirs.extend(env.search_path().into_iter().map(PathBuf::from));
    let find = |name: &str| {
        dirs.iter()
            .map(|d| d.join(name))
            .find(|p| is_executable(p))
            .map(|p| p.display().to_string())
    };
    let mut tools = BTreeMap::new();
    let mut missing = Vec::new();
    for name in REQUIRED_TOOLS {
        match find(name) {
            Some(p) => {
                tools.insert((*name).to_owned(), p);
            }
            None => missing.push((*name).to_owned()),
        }
    }
    if !missing.is_empty() {
        return Err(Error::MissingTools {
            missing,
            path: dirs
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(":"),
        });
    }
    for name in OPTIONAL_TOOLS {
        if let Some(p) = find(name) {
            tools.insert((*name).to_owned(), p);
        }
    }
    tools.insert("gcc".into(), cc.to_owned());
    Ok(tools)
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_of_clang_and_gcc() {
        assert_eq!(
            parse_version(
                "clang version 19.1.7 (https://github.com/ziglang/zig-bootstrap abc)\nTarget: x"
            ),
            Some((CompilerKind::Clang, "19.1.7".into()))
        );
        assert_eq!(
            parse_version("gcc (Debian 12.2.0-14+deb12u1) 12.2.0\nCopyright"),
            Some((CompilerKind::Gcc, "12.2.0".into()))
        );
        assert_eq!(
            parse_version("g++ (GCC) 13.2.0"),
            Some((CompilerKind::Gcc, "13.2.0".into()))
        );
        assert_eq!(parse_version("tcc version 0.9.27"), None);
    }

    #[test]
    fn include_dirs_come_from_the_search_list_only() {
        let stderr = "ignoring nonexistent directory \"/x\"\n#include \"...\" search starts here:\n\
            #include <...> search starts here:\n /nix/store/a-gcc/lib/gcc/x86_64/12/../../../../include\n \
            /nix/store/b-glibc/include\n /nix/store/c/Frameworks (framework directory)\nEnd of search list.\n \
            /not/this\n";
        assert_eq!(
            parse_include_dirs(stderr),
            vec![
                "/nix/store/a-gcc/include",
                "/nix/store/b-glibc/include",
                "/nix/store/c/Frameworks"
            ]
        );
    }
}
