//! Errors of the `lre` subcommands. Each variant says what went wrong and, where there is
//! one, the fix; `main` prints them as they are.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("could not run `{program}`: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}):\n{stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("could not understand the output of `{command}`: {reason}")]
    Output { command: String, reason: String },
    #[error("invalid Env entry {entry:?}: expected NAME=VALUE")]
    EnvEntry { entry: String },
    #[error("Env entry {name} is given twice with different values: {first:?} and {second:?}")]
    EnvConflict {
        name: String,
        first: String,
        second: String,
    },
    #[error("the toolchain is not hermetic; these paths are outside /nix/store:\n{}\n(pass --allow-host-path to accept them anyway)", .0.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    HostPaths(Vec<String>),
    #[error("the C/C++ toolchain has no {}: none on its PATH ({path})", .missing.join(", "))]
    MissingTools { missing: Vec<String>, path: String },
    #[error("cannot tell which compiler {cc} is: `{cc} --version` printed {first_line:?}")]
    UnknownCompiler { cc: String, first_line: String },
    #[error("invalid Bazel version {0:?}: expected MAJOR.MINOR[.PATCH]")]
    BazelVersion(String),
    #[error("cannot tell the Bazel version: {0}; pass --bazel-version or write .bazelversion")]
    NoBazelVersion(String),
    #[error("{path} was edited by hand (its content no longer matches the checksum lre wrote); move it away or pass --force to overwrite it")]
    HandEdited { path: PathBuf },
    #[error("nothing to generate: give a C/C++ toolchain (CC in --env, or --cc) and/or a Java runtime (JAVA_HOME in --env, or --java)")]
    NoToolchain,
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("template {name}: {message}")]
    Template { name: String, message: String },
    #[error("{path}: {reason}")]
    ExecLog { path: PathBuf, reason: String },
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, Error>;

pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { path, source }
}
