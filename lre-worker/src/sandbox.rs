//! Runs a command in a Linux namespace sandbox built by bubblewrap.
//!
//! Why bubblewrap rather than calling unshare(2) ourselves: it is a small, audited setuid-
//! free tool that gets the fiddly parts right (mount ordering, /proc and /dev in a new PID
//! namespace, die-with-parent, no new privileges), and it is in Debian. Inside, only the
//! exec root (read-write) and the configured read-only paths exist; the network, IPC and
//! PID namespaces are private; the environment is exactly the action's.
//!
//! ## Actions cannot change each other's inputs
//!
//! Inputs are hard links into the worker's cache: read-only files owned by the worker. An
//! action running as the worker's own uid owns those inodes, so a `chmod u+w` and a write
//! would change what every other action linking the same blob sees (at capacity > 1, while
//! both run). So when the worker can (root with CAP_SETUID/SETGID/CHOWN), each running
//! action gets a uid of its own from [`UidPool`], starting at [`DEFAULT_UID_BASE`]:
//! - bubblewrap is started as that uid and builds an unprivileged user namespace, in which
//!   the cache's owner is unmapped: the action cannot write, chmod or chown its inputs
//!   (capabilities in a user namespace never cover inodes whose owner it does not map);
//! - the exec root's directories are chowned to that uid, so outputs can be made anywhere
//!   in it; files stay the cache's;
//! - the exec root and every read-only path are bound from descriptors the worker opened
//!   (`--bind-fd`), so that uid needs no access to the worker's own directories;
//! - uids differ between concurrent actions, so not even a shared /proc (`--host-proc`)
//!   lets one action reach into another's processes.
//!
//! Running actions as one shared unprivileged uid, or copying inputs instead of linking
//! them, were the alternatives: the first leaves concurrent actions able to ptrace each
//! other under `--host-proc`, the second costs a copy of every input per action.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use command_fds::CommandFdExt;
use rustix::fs::{Mode, OFlags};

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
    /// Which uids actions run as (see the module docs).
    pub action_uids: ActionUids,
}

/// `--action-uids`: `auto` (own uids when the worker is root and the kernel allows it),
/// `off` (actions run as the worker's uid), or the first uid of the range to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActionUids {
    Auto,
    Off,
    From(u32),
}

/// The first action uid by default: above systemd's container range (524288–1879048191),
/// below the uids some tools misread as negative.
pub const DEFAULT_UID_BASE: u32 = 1_879_048_192;

impl std::str::FromStr for ActionUids {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(ActionUids::Auto),
            "off" => Ok(ActionUids::Off),
            n => match n.parse::<u32>() {
                Ok(b) if b > 0 && b < u32::MAX / 2 => Ok(ActionUids::From(b)),
                _ => Err(format!(
                    "{s:?}: want auto, off, or a first uid between 1 and {}",
                    u32::MAX / 2
                )),
            },
        }
    }
}

/// The uids free for actions; one is leased per running action.
#[derive(Clone, Debug, Default)]
pub struct UidPool {
    free: Option<Arc<Mutex<Vec<u32>>>>,
}

/// A uid an action runs as, back in the pool when dropped (after its tree is removed).
#[derive(Debug)]
pub struct UidLease {
    pub uid: u32,
    pool: Arc<Mutex<Vec<u32>>>,
}

impl Drop for UidLease {
    fn drop(&mut self) {
        self.pool
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(self.uid);
    }
}

fn can_switch_uid() -> bool {
    use rustix::thread::CapabilitySet as C;
    rustix::process::geteuid().is_root()
        && rustix::thread::capabilities(None)
            .is_ok_and(|c| c.effective.contains(C::SETUID | C::SETGID | C::CHOWN))
}

impl UidPool {
    /// Actions run as the worker's own uid.
    pub fn off() -> Self {
        UidPool { free: None }
    }

    /// Decides, once at start, which uids `capacity` concurrent actions run as. `auto` falls
    /// back to the worker's uid (with a warning) where it cannot switch; an explicit first
    /// uid that cannot be used is an error.
    /// `work_dir` is where exec roots live: bubblewrap (0.8) resolves even a bound
    /// descriptor by its path, so every directory above it must be searchable by others.
    pub async fn resolve(cfg: &SandboxConfig, capacity: u32, work_dir: &Path) -> Result<UidPool> {
        let explicit = match cfg.action_uids {
            ActionUids::Off => return Ok(UidPool::off()),
            ActionUids::Auto => None,
            ActionUids::From(b) => Some(b),
        };
        let fail = |why: String| match explicit {
            Some(b) => Err(WorkerError::Sandbox(format!("--action-uids {b}: {why}"))),
            None => {
                tracing::warn!("actions run as the worker's own uid, so a hostile action could change inputs that concurrent actions share: {why}");
                Ok(UidPool::off())
            }
        };
        if !can_switch_uid() {
            return fail("the worker is not root with CAP_SETUID, CAP_SETGID and CAP_CHOWN".into());
        }
        let base = explicit.unwrap_or(DEFAULT_UID_BASE);
        let Some(last) = base
            .checked_add(capacity.max(1) - 1)
            .filter(|l| *l < u32::MAX / 2)
        else {
            return fail(format!("{capacity} uids from {base} overflow"));
        };
        if let Err(e) = probe(cfg, base, work_dir).await {
            return fail(e);
        }
        tracing::info!(first = base, last, "actions run as uids of their own");
        Ok(UidPool {
            free: Some(Arc::new(Mutex::new((base..=last).rev().collect()))),
        })
    }

    /// A uid for one action, or None when actions run as the worker's uid.
    pub fn lease(&self) -> Result<Option<UidLease>> {
        let Some(pool) = &self.free else {
            return Ok(None);
        };
        let uid = pool
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop()
            .ok_or_else(|| {
                WorkerError::Sandbox("more actions than the worker's capacity are running".into())
            })?;
        Ok(Some(UidLease {
            uid,
            pool: pool.clone(),
        }))
    }
}

/// Starts bubblewrap as `uid`, binding `work_dir` the way exec roots are bound, far
/// enough to exec: if it gets that far, the user namespace, uid map and mounts all work.
/// The command does not exist, so nothing runs.
async fn probe(cfg: &SandboxConfig, uid: u32, work_dir: &Path) -> std::result::Result<(), String> {
    use std::os::fd::AsRawFd;
    const MISSING: &str = "/lre-worker-probe-does-not-exist";
    let fd = path_fd(work_dir).map_err(|e| e.to_string())?;
    let mut cmd = std::process::Command::new(&cfg.bwrap);
    cmd.args([
        "--unshare-all",
        "--die-with-parent",
        "--ro-bind",
        "/",
        "/",
        "--bind-fd",
    ])
    .arg(fd.as_raw_fd().to_string())
    .arg(work_dir)
    .args(["--", MISSING]);
    cmd.env_clear().stdin(Stdio::null()).stdout(Stdio::null());
    {
        use std::os::unix::process::CommandExt;
        cmd.uid(uid).gid(uid);
    }
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.preserved_fds(vec![fd]);
    let out = cmd
        .output()
        .await
        .map_err(|e| format!("cannot start {}: {e}", cfg.bwrap.display()))?;
    let err = String::from_utf8_lossy(&out.stderr);
    if err.contains("execvp") && err.contains(MISSING) {
        return Ok(());
    }
    let hint = if err.contains("Permission denied") {
        format!(
            "; every directory above the work dir {} must be searchable by other users (o+x), e.g. --work-dir /var/cache/lre/worker",
            work_dir.display()
        )
    } else {
        String::new()
    };
    Err(format!(
        "bubblewrap as uid {uid} cannot build a sandbox ({}): {}{hint}",
        out.status,
        err.trim()
    ))
}

/// A descriptor for `path` that bubblewrap binds from, whatever uid it runs as.
fn path_fd(path: &Path) -> Result<OwnedFd> {
    rustix::fs::open(path, OFlags::PATH | OFlags::CLOEXEC, Mode::empty()).map_err(|e| {
        WorkerError::Sandbox(format!(
            "cannot open {}: {}",
            path.display(),
            std::io::Error::from_raw_os_error(e.raw_os_error())
        ))
    })
}

pub struct Outcome {
    pub exit_code: i32,
    pub timed_out: bool,
    /// Stopped because the action was cancelled.
    pub cancelled: bool,
}

/// Whether an action is cancelled: `true` once the scheduler cancels it.
pub type Cancel = tokio::sync::watch::Receiver<bool>;

/// Resolves once `cancel` turns true; never when its sender is gone.
pub async fn cancelled(cancel: &mut Cancel) {
    if cancel.wait_for(|c| *c).await.is_err() {
        std::future::pending::<()>().await;
    }
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
    /// Run as this uid (and gid) rather than the worker's; see the module docs.
    pub uid: Option<u32>,
}

/// Runs the command, output to the given files. On timeout or cancellation the whole
/// sandbox is killed, and gone before this returns: bwrap reports its sandbox's PID 1
/// (`--info-fd`), that process is killed, and the kernel kills every other process of the
/// PID namespace before PID 1 is reaped; bwrap exits only then. bwrap itself is never
/// killed before its PID 1 is known: killed between starting PID 1 and arming
/// `--die-with-parent`, it would leave PID 1 running forever, outside any worker. (Killing
/// bwrap first would also leave PID 1 to die a moment later, with the action's processes
/// still writing into an exec root the worker is already collecting or removing.) The same
/// holds if this future is dropped (the worker stopping): see `Sandboxed`.
pub async fn run(cfg: &SandboxConfig, s: &Spawn<'_>, mut cancel: Cancel) -> Result<Outcome> {
    let Spawn {
        exec_root,
        workdir,
        argv,
        env,
        stdout,
        stderr,
        timeout,
        uid,
    } = *s;
    let mut cmd = std::process::Command::new(&cfg.bwrap);
    // Bind sources: paths for the worker's own uid, descriptors for an action uid (which
    // may not be able to reach them by name, under a worker directory in /root, say).
    let mut fds: Vec<OwnedFd> = Vec::new();
    let mut bind = |cmd: &mut std::process::Command, flag: &str, p: &Path| -> Result<()> {
        match uid {
            None => {
                cmd.arg(flag).arg(p).arg(p);
            }
            Some(_) => {
                let fd = path_fd(p)?;
                use std::os::fd::AsRawFd;
                cmd.arg(format!("{flag}-fd"))
                    .arg(fd.as_raw_fd().to_string())
                    .arg(p);
                fds.push(fd);
            }
        }
        Ok(())
    };
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
            bind(&mut cmd, "--ro-bind", p)?;
        }
    }
    bind(&mut cmd, "--bind", exec_root)?;
    let (info_read, info_write) = std::io::pipe()?;
    let info_write = OwnedFd::from(info_write);
    {
        use std::os::fd::AsRawFd;
        cmd.arg("--info-fd").arg(info_write.as_raw_fd().to_string());
    }
    fds.push(info_write);
    cmd.arg("--chdir").arg(workdir).arg("--clearenv");
    for (k, v) in env {
        cmd.arg("--setenv").arg(k).arg(v);
    }
    cmd.arg("--").args(argv);
    cmd.env_clear()
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(stdout)?)
        .stderr(std::fs::File::create(stderr)?);
    if let Some(u) = uid {
        use std::os::unix::process::CommandExt;
        // std also clears supplementary groups when root drops to a uid.
        cmd.uid(u).gid(u);
    }
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.kill_on_drop(true);
    // Only these descriptors survive exec (they are CLOEXEC everywhere else).
    cmd.preserved_fds(fds);
    let child = cmd
        .spawn()
        .map_err(|e| WorkerError::Sandbox(format!("cannot start {}: {e}", cfg.bwrap.display())))?;
    // Our copy of the info pipe's write end lives in `cmd`: closed now, so the reader sees
    // EOF once bwrap has closed its own.
    drop(cmd);
    let pid1 = PidCell::default();
    let cell = pid1.clone();
    tokio::task::spawn_blocking(move || cell.set(sandbox_pid(info_read)));
    let mut sandboxed = Sandboxed {
        child: Some(child),
        pid1,
    };
    let ended = {
        let Some(child) = sandboxed.child.as_mut() else {
            return Err(WorkerError::Internal(
                "the sandbox's process is gone".into(),
            ));
        };
        tokio::select! {
            status = child.wait() => Ok(status?),
            _ = tokio::time::sleep(timeout) => Err(false),
            _ = cancelled(&mut cancel) => Err(true),
        }
    };
    match ended {
        Ok(status) => {
            sandboxed.child = None;
            use std::os::unix::process::ExitStatusExt;
            // A signal death reports 128+N, as shells do.
            let code = status
                .code()
                .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
            Ok(Outcome {
                exit_code: code,
                timed_out: false,
                cancelled: false,
            })
        }
        Err(cancelled) => {
            sandboxed.stop().await;
            Ok(Outcome {
                exit_code: -1,
                timed_out: !cancelled,
                cancelled,
            })
        }
    }
}

/// The sandbox's PID 1, once bwrap has said it (`None` inside: it said nothing usable).
#[derive(Clone, Default)]
struct PidCell(
    std::sync::Arc<(
        std::sync::Mutex<Option<Option<rustix::process::Pid>>>,
        std::sync::Condvar,
    )>,
);

impl PidCell {
    fn set(&self, pid: Option<rustix::process::Pid>) {
        let (m, cv) = &*self.0;
        *m.lock().unwrap_or_else(|p| p.into_inner()) = Some(pid);
        cv.notify_all();
    }

    /// Waits (blocking, at most `limit`) for bwrap to say it.
    fn wait(&self, limit: Duration) -> Option<rustix::process::Pid> {
        let (m, cv) = &*self.0;
        let guard = m.lock().unwrap_or_else(|p| p.into_inner());
        let (guard, _) = cv
            .wait_timeout_while(guard, limit, |v| v.is_none())
            .unwrap_or_else(|p| p.into_inner());
        guard.flatten()
    }
}

/// How long bwrap may take to say its PID 1 (it does so at once; a bound, not a delay).
const PID1_WAIT: Duration = Duration::from_secs(5);

/// A running sandbox: bwrap, and its PID 1 once known. Stopping it kills PID 1 (so the
/// kernel empties the PID namespace) and waits for bwrap; bwrap is killed only if PID 1
/// never became known or the namespace did not empty. Dropped while running (the worker
/// stopping mid-action) it does the same, blocking for at most a few seconds.
struct Sandboxed {
    child: Option<tokio::process::Child>,
    pid1: PidCell,
}

impl Sandboxed {
    async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let cell = self.pid1.clone();
        let pid = tokio::task::spawn_blocking(move || cell.wait(PID1_WAIT))
            .await
            .ok()
            .flatten();
        if let Some(pid) = pid {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
        // bwrap exits once PID 1 has been reaped, that is once the namespace is empty.
        if pid.is_none()
            || tokio::time::timeout(Duration::from_secs(10), child.wait())
                .await
                .is_err()
        {
            tracing::warn!("sandbox did not end with its PID 1; killing bwrap");
            let _ = child.kill().await;
        }
    }
}

impl Drop for Sandboxed {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        if let Some(pid) = self.pid1.wait(PID1_WAIT) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            // The namespace empties, then bwrap exits on its own; give it a moment.
            for _ in 0..50 {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // kill_on_drop: bwrap goes with `child`.
    }
}

/// The host pid of the sandbox's PID 1, from bwrap's `--info-fd` JSON (`{"child-pid": N}`),
/// read until the object closes (not to EOF: the write end may stay open while the action
/// runs). Blocking.
fn sandbox_pid(mut pipe: std::io::PipeReader) -> Option<rustix::process::Pid> {
    use std::io::Read;
    let mut text = Vec::new();
    let mut buf = [0u8; 512];
    // bwrap writes a few dozen bytes; the bound keeps a confused bwrap from growing this.
    while !text.contains(&b'}') && text.len() < 64 << 10 {
        let n = pipe.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        text.extend_from_slice(&buf[..n]);
    }
    let end = text.iter().position(|&b| b == b'}')? + 1;
    let value: serde_json::Value = serde_json::from_slice(&text[..end]).ok()?;
    let pid = value.get("child-pid")?.as_i64()?;
    rustix::process::Pid::from_raw(i32::try_from(pid).ok()?)
}
