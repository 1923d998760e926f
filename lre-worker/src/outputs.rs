//! Collects an action's outputs after it ran: files, directories (as Tree messages) and
//! symlinks, refusing anything that escapes the exec root.

use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path};

use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use prost::Message;

use crate::cas::{digest_of, file_digest, Upload};
use crate::error::{Result, WorkerError};

#[derive(Default)]
pub struct Collected {
    pub files: Vec<re::OutputFile>,
    pub directories: Vec<re::OutputDirectory>,
    pub symlinks: Vec<re::OutputSymlink>,
    pub uploads: Vec<(re::Digest, Upload)>,
}

/// Output paths of a Command: REAPI 2.1's `output_paths`, or the older pair.
#[allow(deprecated)]
pub fn declared(cmd: &re::Command) -> Vec<String> {
    if !cmd.output_paths.is_empty() {
        return cmd.output_paths.clone();
    }
    cmd.output_files
        .iter()
        .chain(cmd.output_directories.iter())
        .cloned()
        .collect()
}

/// A declared output path must be relative and stay below the working directory's root.
fn check_relative(p: &str) -> Result<()> {
    let path = Path::new(p);
    if p.is_empty()
        || path.is_absolute()
        || path.components().any(|c| matches!(c, Component::ParentDir))
    {
        return Err(WorkerError::Output(format!(
            "path {p:?} is absolute or climbs out with '..'"
        )));
    }
    Ok(())
}

/// A symlink's target, followed by the kernel from the link's directory, must stay inside
/// the exec root: an output link to /etc/passwd, to ../../.., or through another link that
/// climbs out would hand the reader host files.
fn check_link(root: &Path, link: &Path, target: &Path) -> Result<()> {
    let rel = link.strip_prefix(root).map_err(|_| {
        WorkerError::Output(format!("{} is not inside the exec root", link.display()))
    })?;
    crate::confined::link_stays_inside(root, rel, target)
}

/// Output trees are bounded: an action must not make the worker hash, hold and upload an
/// unbounded tree (or recurse as deep as it likes).
const MAX_DEPTH: usize = 256;
const MAX_ENTRIES: usize = 1_000_000;

fn refuse_special(path: &Path, meta: &std::fs::Metadata) -> Result<()> {
    match crate::confined::special_kind(meta.file_type()) {
        Some(kind) => Err(WorkerError::Output(format!(
            "{} is {kind}; outputs must be files, directories or symlinks",
            path.display()
        ))),
        None => Ok(()),
    }
}

fn is_executable(meta: &std::fs::Metadata) -> bool {
    meta.permissions().mode() & 0o111 != 0
}

/// Builds the Directory for `dir` (recursively, at most MAX_DEPTH deep), recording every
/// file to upload and every child Directory in `children`.
fn walk(
    exec_root: &Path,
    dir: &Path,
    depth: usize,
    entries_left: &mut usize,
    children: &mut Vec<re::Directory>,
    uploads: &mut Vec<(re::Digest, Upload)>,
) -> Result<re::Directory> {
    if depth > MAX_DEPTH {
        return Err(WorkerError::Output(format!(
            "directory {} is more than {MAX_DEPTH} levels deep",
            dir.display()
        )));
    }
    let mut out = re::Directory::default();
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<std::io::Result<_>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        if *entries_left == 0 {
            return Err(WorkerError::Output(format!(
                "output directories hold more than {MAX_ENTRIES} entries"
            )));
        }
        *entries_left -= 1;
        let name = e.file_name().to_string_lossy().into_owned();
        let path = e.path();
        let meta = std::fs::symlink_metadata(&path)?;
        refuse_special(&path, &meta)?;
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&path)?;
            check_link(exec_root, &path, &target)?;
            out.symlinks.push(re::SymlinkNode {
                name,
                target: target.to_string_lossy().into_owned(),
                ..Default::default()
            });
        } else if meta.is_dir() {
            let sub = walk(exec_root, &path, depth + 1, entries_left, children, uploads)?;
            let raw = sub.encode_to_vec();
            out.directories.push(re::DirectoryNode {
                name,
                digest: Some(digest_of(&raw)),
            });
            children.push(sub);
        } else if meta.is_file() {
            let d = file_digest(&path)?;
            out.files.push(re::FileNode {
                name,
                digest: Some(d.clone()),
                is_executable: is_executable(&meta),
                ..Default::default()
            });
            uploads.push((d, Upload::File(path)));
        }
    }
    Ok(out)
}

/// Collects the outputs declared by `cmd` under `workdir`.
pub fn collect(exec_root: &Path, workdir: &Path, cmd: &re::Command) -> Result<Collected> {
    let root = exec_root.canonicalize()?;
    let mut c = Collected::default();
    let mut entries_left = MAX_ENTRIES;
    for p in declared(cmd) {
        check_relative(&p)?;
        let path = workdir.join(&p);
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        }; // not produced
        refuse_special(&path, &meta)?;
        // Its parent, with every symlink resolved, must still be inside the exec root.
        let parent = path.parent().unwrap_or(workdir).canonicalize()?;
        if !parent.starts_with(&root) {
            return Err(WorkerError::Output(format!(
                "{p:?} resolves outside the exec root"
            )));
        }
        // The output is that entry of `parent`, itself not followed: a declared `out/` or
        // `out/.` must not walk a symlink `out -> /etc` as if it were the directory.
        let path = parent.join(path.file_name().unwrap_or_default());
        let meta = std::fs::symlink_metadata(&path)?;
        refuse_special(&path, &meta)?;
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&path)?;
            check_link(
                &root,
                &parent.join(path.file_name().unwrap_or_default()),
                &target,
            )?;
            c.symlinks.push(re::OutputSymlink {
                path: p,
                target: target.to_string_lossy().into_owned(),
                ..Default::default()
            });
        } else if meta.is_dir() {
            let mut children = Vec::new();
            let tree_root = walk(
                &root,
                &parent.join(path.file_name().unwrap_or_default()),
                0,
                &mut entries_left,
                &mut children,
                &mut c.uploads,
            )?;
            let tree = re::Tree {
                root: Some(tree_root),
                children,
            };
            let raw = tree.encode_to_vec();
            let d = digest_of(&raw);
            c.uploads.push((d.clone(), Upload::Bytes(raw)));
            c.directories.push(re::OutputDirectory {
                path: p,
                tree_digest: Some(d),
                ..Default::default()
            });
        } else {
            let d = file_digest(&path)?;
            c.uploads.push((d.clone(), Upload::File(path)));
            c.files.push(re::OutputFile {
                path: p,
                digest: Some(d),
                is_executable: is_executable(&meta),
                ..Default::default()
            });
        }
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths() {
        assert!(check_relative("../x").is_err());
        assert!(check_relative("/x").is_err());
        assert!(check_relative("a/b").is_ok());
    }

    /// Found by fuzz/fuzz_targets/output_collection.rs: an output directory declared as `w/`
    /// (or `w/.`) made collect follow the symlink `w -> <outside the exec root>`, walk it as
    /// the directory and upload the host files there.
    #[test]
    fn a_trailing_slash_does_not_follow_an_output_symlink() {
        let tmp = tempfile::tempdir().unwrap();
        let (root, outside) = (tmp.path().join("root"), tmp.path().join("outside"));
        std::fs::create_dir_all(root.join("d")).unwrap();
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("secret"), "host data").unwrap();
        std::fs::write(root.join("d/f"), "ok").unwrap();
        std::os::unix::fs::symlink(&outside, root.join("w")).unwrap();
        std::os::unix::fs::symlink("../outside", root.join("r")).unwrap();
        std::os::unix::fs::symlink("d", root.join("in")).unwrap();
        #[allow(deprecated)]
        let dir = |p: &str| re::Command {
            output_directories: vec![p.into()],
            ..Default::default()
        };
        for p in ["w/", "w/.", "r/", "r/.", "w", "r"] {
            assert!(collect(&root, &root, &dir(p)).is_err(), "{p}");
        }
        // Inside the exec root, `in/` is the symlink `in`, as `in` is: not walked.
        for p in ["in/", "in/.", "in"] {
            let c = collect(&root, &root, &dir(p)).unwrap();
            assert_eq!(c.symlinks.len(), 1, "{p}");
            assert_eq!(c.symlinks[0].target, "d", "{p}");
            assert!(c.directories.is_empty() && c.uploads.is_empty(), "{p}");
        }
    }
}
