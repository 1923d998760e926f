//! File-system work inside an action's exec root that no symlink or depth the action left
//! can turn against the host: the worker runs these as root, outside the sandbox.
//!
//! Paths are resolved by the kernel from a directory descriptor (`openat` with
//! `O_NOFOLLOW`, `openat2` with `RESOLVE_BENEATH`), never as strings; cap-std would do the
//! same, but it has no "is this symlink's target inside the root" query, which is what
//! output collection needs, and rustix is already here.

use std::ffi::{CStr, CString};
use std::os::fd::OwnedFd;
use std::path::{Component, Path};

use rustix::fs::{
    chmodat, fchmod, mkdirat, openat, openat2, statat, unlinkat, AtFlags, Dir, FileType, Mode,
    OFlags, ResolveFlags,
};
use rustix::io::Errno;

use crate::error::{Result, WorkerError};

fn dir_flags() -> OFlags {
    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC
}

fn io(e: Errno) -> std::io::Error {
    std::io::Error::from_raw_os_error(e.raw_os_error())
}

fn open_root(root: &Path) -> Result<OwnedFd> {
    openat(rustix::fs::CWD, root, dir_flags(), Mode::empty()).map_err(|e| io(e).into())
}

/// Creates the directories `rel` names under `root`, like `create_dir_all`, but refuses to
/// pass through a symlink or a file: an input symlink `o -> /tmp/x` plus an output `o/a/b`
/// must not make the worker create `/tmp/x/a` on the host.
/// Directories it makes belong to `owner` (uid and gid) when given.
pub fn create_dirs(root: &Path, rel: &Path, owner: Option<u32>) -> Result<()> {
    let mut fd = open_root(root)?;
    for c in rel.components() {
        let name = match c {
            Component::Normal(n) => n,
            Component::CurDir => continue,
            _ => {
                return Err(WorkerError::Output(format!(
                    "path {} leaves the exec root",
                    rel.display()
                )))
            }
        };
        let next = match openat(&fd, name, dir_flags(), Mode::empty()) {
            Err(Errno::NOENT) => {
                mkdirat(&fd, name, Mode::from_raw_mode(0o755)).map_err(io)?;
                let made = openat(&fd, name, dir_flags(), Mode::empty());
                if let (Ok(d), Some(u)) = (&made, owner) {
                    let id = Some(rustix::process::Uid::from_raw(u));
                    let gid = Some(rustix::process::Gid::from_raw(u));
                    rustix::fs::fchown(d, id, gid).map_err(io)?;
                }
                made
            }
            r => r,
        };
        fd = match next {
            Ok(f) => f,
            Err(Errno::LOOP | Errno::NOTDIR) => {
                return Err(WorkerError::Output(format!(
                    "{}: {} is a symlink or a file, so the output's directory cannot be made there",
                    rel.display(),
                    name.to_string_lossy()
                )))
            }
            Err(e) => return Err(io(e).into()),
        };
    }
    Ok(())
}

/// Whether a symlink at `link` (relative to `root`) with `target` stays inside `root` when
/// the kernel follows it, through whatever other symlinks the tree holds. A target that
/// does not exist (a dangling link) must stay inside `root` on paper as well.
pub fn link_stays_inside(root: &Path, link: &Path, target: &Path) -> Result<()> {
    let escapes = || {
        WorkerError::Output(format!(
            "symlink {} escapes the exec root via {}",
            link.display(),
            target.display()
        ))
    };
    if target.is_absolute() {
        return Err(WorkerError::Output(format!(
            "symlink {} points outside the exec root, to {}",
            link.display(),
            target.display()
        )));
    }
    let joined = link.parent().unwrap_or(Path::new("")).join(target);
    if joined.as_os_str().is_empty() {
        return Ok(());
    }
    let fd = open_root(root)?;
    let how = OFlags::PATH | OFlags::CLOEXEC;
    match openat2(&fd, &joined, how, Mode::empty(), ResolveFlags::BENEATH) {
        Ok(_) => Ok(()),
        Err(Errno::XDEV) => Err(escapes()),
        // Resolution stopped at a missing component. Where the part before it led (through
        // other links) is unknown on paper, and the missing part could be created later
        // by whoever reads the tree: a dangling target may not climb at all.
        Err(Errno::NOENT | Errno::NOTDIR) => {
            if target.components().any(|c| c == Component::ParentDir) {
                return Err(WorkerError::Output(format!(
                    "dangling symlink {} climbs with '..' ({}); that cannot be checked",
                    link.display(),
                    target.display()
                )));
            }
            Ok(())
        }
        Err(Errno::LOOP) => Err(WorkerError::Output(format!(
            "symlink {} goes through too many symlinks",
            link.display()
        ))),
        Err(e) => Err(WorkerError::Output(format!(
            "symlink {} cannot be checked: {}",
            link.display(),
            io(e)
        ))),
    }
}

fn is_dir_entry(parent: &OwnedFd, name: &CStr, t: FileType) -> bool {
    match t {
        FileType::Directory => true,
        FileType::Unknown => statat(parent, name, AtFlags::SYMLINK_NOFOLLOW)
            .map(|s| FileType::from_raw_mode(s.st_mode) == FileType::Directory)
            .unwrap_or(false),
        _ => false,
    }
}

/// Deletes `dir` and everything below it, however deep and however the action left its
/// permissions. Iterative, holding two descriptors and the names on the way down, so a
/// chain of 100,000 directories costs neither stack nor file descriptors (and never a
/// path longer than PATH_MAX).
pub fn remove_tree(dir: &Path) -> std::io::Result<()> {
    let mut cur = match openat(rustix::fs::CWD, dir, dir_flags(), Mode::empty()) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(()),
        Err(e) => return Err(io(e)),
    };
    let mut names: Vec<CString> = Vec::new();
    loop {
        // A directory the action made read-only must become writable to empty it.
        let _ = fchmod(&cur, Mode::from_raw_mode(0o755));
        let mut descend = None;
        for entry in Dir::read_from(&cur).map_err(io)? {
            let entry = entry.map_err(io)?;
            let name = entry.file_name();
            if name == c"." || name == c".." {
                continue;
            }
            if is_dir_entry(&cur, name, entry.file_type()) {
                descend = Some(name.to_owned());
                break;
            }
            match unlinkat(&cur, name, AtFlags::empty()) {
                Ok(()) | Err(Errno::NOENT) => {}
                Err(e) => return Err(io(e)),
            }
        }
        match descend {
            Some(name) => {
                let _ = chmodat(&cur, &*name, Mode::from_raw_mode(0o755), AtFlags::empty());
                let next = openat(&cur, &*name, dir_flags(), Mode::empty()).map_err(io)?;
                names.push(name);
                cur = next;
            }
            None => {
                let Some(name) = names.pop() else { break };
                // Opened with O_NOFOLLOW all the way down, so ".." is the directory we came from.
                let parent = openat(&cur, c"..", dir_flags(), Mode::empty()).map_err(io)?;
                unlinkat(&parent, &*name, AtFlags::REMOVEDIR).map_err(io)?;
                cur = parent;
            }
        }
    }
    drop(cur);
    std::fs::remove_dir(dir)
}

/// The name of a special file's type, for refusing it as an output.
pub fn special_kind(t: std::fs::FileType) -> Option<&'static str> {
    use std::os::unix::fs::FileTypeExt;
    if t.is_fifo() {
        Some("a FIFO")
    } else if t.is_socket() {
        Some("a socket")
    } else if t.is_block_device() {
        Some("a block device")
    } else if t.is_char_device() {
        Some("a character device")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn create_dirs_refuses_to_follow_a_symlink_out() {
        let t = tempfile::tempdir().unwrap();
        let (root, outside) = (t.path().join("root"), t.path().join("outside"));
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        symlink(&outside, root.join("o")).unwrap();
        let e = create_dirs(&root, Path::new("o/x"), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("o is a symlink"), "{e}");
        assert!(
            !outside.join("x").exists(),
            "created a directory through the symlink"
        );
        create_dirs(&root, Path::new("a/b/c"), None).unwrap();
        assert!(root.join("a/b/c").is_dir());
        std::fs::write(root.join("f"), b"").unwrap();
        assert!(create_dirs(&root, Path::new("f/x"), None).is_err());
        assert!(create_dirs(&root, Path::new("../x"), None).is_err());
    }

    #[test]
    fn links_are_judged_by_where_the_kernel_takes_them() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        std::fs::create_dir_all(root.join("a/b/h")).unwrap();
        // On paper `esc` stays inside (a/b/h/up/../../../etc/passwd → etc/passwd), but `up`
        // is itself a link three levels up, out of the root.
        symlink("../../..", root.join("a/b/h/up")).unwrap();
        let esc = Path::new("a/b/h/up/../../../etc/passwd");
        assert!(link_stays_inside(&root, Path::new("esc"), esc).is_err());
        // `up` itself is the root (three levels up from a/b/h): fine; one more level is not.
        assert!(link_stays_inside(&root, Path::new("x"), Path::new("a/b/h/up")).is_ok());
        symlink("../../../..", root.join("a/b/h/up2")).unwrap();
        assert!(link_stays_inside(&root, Path::new("x"), Path::new("a/b/h/up2")).is_err());
        assert!(link_stays_inside(&root, Path::new("a/l"), Path::new("b/h")).is_ok());
        assert!(link_stays_inside(&root, Path::new("a/l"), Path::new("../a/b")).is_ok());
        assert!(link_stays_inside(&root, Path::new("l"), Path::new("/etc")).is_err());
        // Dangling: fine unless it climbs.
        assert!(link_stays_inside(&root, Path::new("a/l"), Path::new("missing/x")).is_ok());
        assert!(link_stays_inside(&root, Path::new("a/l"), Path::new("missing/../../..")).is_err());
        // a/b/s leads to the root; s/m/../../x reads as inside on paper but would climb out
        // once `m` exists.
        symlink("../..", root.join("a/b/s")).unwrap();
        assert!(link_stays_inside(&root, Path::new("a/b/l"), Path::new("s/m/../../x")).is_err());
        // A link to a link that leaves.
        symlink("/etc", root.join("abs")).unwrap();
        assert!(link_stays_inside(&root, Path::new("l"), Path::new("abs")).is_err());
    }

    #[test]
    fn remove_tree_takes_a_chain_deeper_than_any_stack_or_path_limit() {
        let t = tempfile::tempdir().unwrap();
        let top = t.path().join("deep");
        std::fs::create_dir(&top).unwrap();
        // Built by descriptor: the path of the bottom is far beyond PATH_MAX.
        let mut fd = open_root(&top).unwrap();
        for i in 0..20_000 {
            mkdirat(&fd, "d", Mode::from_raw_mode(0o755)).unwrap();
            if i % 1000 == 0 {
                let flags = OFlags::CREATE | OFlags::WRONLY | OFlags::CLOEXEC;
                drop(openat(&fd, "f", flags, Mode::from_raw_mode(0o444)).unwrap());
            }
            fd = openat(&fd, "d", dir_flags(), Mode::empty()).unwrap();
        }
        fchmod(&fd, Mode::from_raw_mode(0o555)).unwrap();
        drop(fd);
        remove_tree(&top).unwrap();
        assert!(!top.exists());
        remove_tree(&top).unwrap(); // gone already: fine
    }
}
