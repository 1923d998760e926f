//! Runs a command in a Linux namespace sandbox built by bubblewrap.
//!
//! Why bubblewrap rather than calling unshare(2) ourselves: it is a small, audited setuid-
//! free tool that gets the fiddly parts right (mount ordering, /proc and /dev in a new PID
//! namespace, die-with-parent, no new privileges), and it is in Debian. Inside, only the
//! exec root (read-write) and the configured read-only paths exist; the network, IPC and
//! PID namespaces are private; the environment is exactly the action's.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use crate::error::{Result, WorkerError};

#[derive(Clone, Debug)]
pub struct SandboxConfig {
    pub bwrap: PathBuf,
    /// Host paths visible read-only at the same place inside (e.g. /nix/store).
    pub ro_paths: Vec<PathBuf>,
    pub network: bool,
    /// Bind the worker's own /proc instead of mounting a fresh one. A fresh procfs cannot be
    /// mounted where the container runtime covers parts of /proc (Docker, Kubernetes and
    /// bubblewrap all do), so a worker running in its image needs this; actions then see
    /// the container's processes, though they still run in their own PID namespace.
    pub host_proc: bool,
}

pub struct Outcome {
    pub exit_code: i32,
    pub timed_out: bool,
}

/// Finds what `argv0` names the way execvp would inside the sandbox, so that a missing
/// command is a clear error instead of bwrap's exit 1.
pub fn resolve_command(
    argv0: &str,
    exec_root: &Path,
    workdir: &Path,
    env: &[(String, String)],
    cfg: &SandboxConfig,
) -> Result<()> {
    let visible =
        |p: &Path| p.starts_with(exec_root) || cfg.ro_paths.iter().any(|r| p.starts_with(r));
    let found = if argv0.contains('/') {
        let p = if Path::new(argv0).is_absolute() {
            PathBuf::from(argv0)
        } else {
            workdir.join(argv0)
        };
        visible(&p) && p.exists()
    } else {
        let path = env
            .iter()
            .rev()
            .find(|(k, _)| k == "PATH")
            .map(|(_, v)| v.as_str())
            .unwrap_or("/usr/bin:/bin");
        path.split(':').filter(|d| !d.is_empty()).any(|d| {
            let dir = if Path::new(d).is_absolute() {
                PathBuf::from(d)
            } else {
                workdir.join(d)
            };
            let p = dir.join(argv0);
            visible(&p) && p.exists()
        })
    };
    if found {
        Ok(())
    } else {
        Err(WorkerError::CommandNotFound(format!(
            "{argv0:?} does not exist inside the sandbox"
        )))
    }
}

/// One command to run in the sandbox.
pub struct Spawn<'a> {
    pub exec_root: &'a Path,
    pub workdir: &'a Path,
    pub argv: &'a [String],
    pub env: &'a [(String, String)],
    pub stdout: &'a Path,
    pub stderr: &'a Path,
    pub timeout: Duration,
}

/// Runs the command, output to the given files. On timeout the whole sandbox is killed:
/// bwrap is PID 1's parent with --die-with-parent, and killing PID 1 of a PID namespace
/// takes every process in it along.
pub async fn run(cfg: &SandboxConfig, s: &Spawn<'_>) -> Result<Outcome> {
    let Spawn {
        exec_root,
        workdir,
        argv,
        env,
        stdout,
        stderr,
        timeout,
    } = *s;
    let mut cmd = tokio::process::Command::new(&cfg.bwrap);
    cmd.arg("--unshare-all");
    if cfg.network {
        cmd.arg("--share-net");
    }
    cmd.args([
        "--die-with-parent",
        "--new-session",
        "--dev",
        "/dev",
        "--tmpfs",
        "/tmp",
    ]);
    if cfg.host_proc {
        cmd.args(["--ro-bind", "/proc", "/proc"]);
    } else {
        cmd.args(["--proc", "/proc"]);
    }
    for p in &cfg.ro_paths {
        if p.exists() {
            cmd.arg("--ro-bind").arg(p).arg(p);
        }
    }
    cmd.arg("--bind")
        .arg(exec_root)
        .arg(exec_root)
        .arg("--chdir")
        .arg(workdir)
        .arg("--clearenv");
    for (k, v) in env {
        cmd.arg("--setenv").arg(k).arg(v);
    }
    cmd.arg("--").args(argv);
    cmd.env_clear()
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(stdout)?)
        .stderr(std::fs::File::create(stderr)?)
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .map_err(|e| WorkerError::Sandbox(format!("cannot start {}: {e}", cfg.bwrap.display())))?;
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(status) => {
            let status = status?;
            use std::os::unix::process::ExitStatusExt;
            // A signal death reports 128+N, as shells do.
            let code = status
                .code()
                .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
            Ok(Outcome {
                exit_code: code,
                timed_out: false,
            })
        }
        Err(_) => {
            let _ = child.kill().await;
            Ok(Outcome {
                exit_code: -1,
                timed_out: true,
            })
        }
    }
}
