//! Running the external programs `lre` asks for facts: nix, the compiler, bazel.

use std::ffi::OsStr;
use std::io::Write;
use std::process::{Command, Stdio};

use crate::error::{Error, Result};

/// Runs `cmd` with `stdin` as its input; returns stdout and stderr, or a `Command` error
/// carrying stderr when it exits non-zero.
pub fn run(cmd: &mut Command, stdin: &[u8]) -> Result<(String, String)> {
    let display = display(cmd);
    let program = cmd.get_program().to_string_lossy().into_owned();
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| Error::Spawn { program, source })?;
    if let Some(mut input) = child.stdin.take() {
        // A program that exits without reading its input is not an error here.
        let _ = input.write_all(stdin);
    }
    let out = child.wait_with_output().map_err(|source| Error::Spawn {
        program: display.clone(),
        source,
    })?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        return Err(Error::Command {
            command: display,
            status: out.status.to_string(),
            stderr: tail(&stderr, 40),
        });
    }
    Ok((stdout, stderr))
}

pub fn display(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(quote)
        .collect::<Vec<_>>()
        .join(" ")
}

fn quote(arg: &OsStr) -> String {
    let s = arg.to_string_lossy();
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:@+,#".contains(c))
    {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
