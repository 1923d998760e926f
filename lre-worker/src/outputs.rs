//! Collects an action's outputs after it ran: files, directories (as Tree messages) and
//! symlinks, refusing anything that escapes the exec root.

use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use prost::Message;
use sha2::{Digest as _, Sha256};

use crate::cas::{digest_of, Upload};
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

/// A symlink's target, resolved lexically from the link's directory, must stay inside the
/// exec root: an output link to /etc/passwd or ../../.. would hand the reader host files.
fn check_link(exec_root: &Path, link: &Path, target: &Path) -> Result<()> {
    if target.is_absolute() {
        return Err(WorkerError::Output(format!(
            "symlink {} points outside the exec root, to {}",
            link.display(),
            target.display()
        )));
    }
    let mut resolved: Vec<Component> = link.parent().unwrap_or(exec_root).components().collect();
    for c in target.components() {
        match c {
            Component::ParentDir => {
                resolved.pop();
            }
            Component::CurDir => {}
            c => resolved.push(c),
        }
    }
    let resolved: PathBuf = resolved.iter().collect();
    if !resolved.starts_with(exec_root) {
        return Err(WorkerError::Output(format!(
            "symlink {} escapes the exec root via {}",
            link.display(),
            target.display()
        )));
    }
    Ok(())
}

fn file_digest(path: &Path) -> Result<re::Digest> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let n = std::io::copy(&mut f, &mut h)?;
    Ok(re::Digest {
        hash: hex::encode(h.finalize()),
        size_bytes: n as i64,
    })
}

fn is_executable(meta: &std::fs::Metadata) -> bool {
    meta.permissions().mode() & 0o111 != 0
}

/// Builds the Directory for `dir` (recursively), recording every file to upload and every
/// child Directory in `children`.
fn walk(
    exec_root: &Path,
    dir: &Path,
    children: &mut Vec<re::Directory>,
    uploads: &mut Vec<(re::Digest, Upload)>,
) -> Result<re::Directory> {
    let mut out = re::Directory::default();
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<std::io::Result<_>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name().to_string_lossy().into_owned();
        let path = e.path();
        let meta = std::fs::symlink_metadata(&path)?;
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&path)?;
            check_link(exec_root, &path, &target)?;
            out.symlinks.push(re::SymlinkNode {
                name,
                target: target.to_string_lossy().into_owned(),
                ..Default::default()
            });
        } else if meta.is_dir() {
            let sub = walk(exec_root, &path, children, uploads)?;
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
    for p in declared(cmd) {
        check_relative(&p)?;
        let path = workdir.join(&p);
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        }; // not produced
           // Its parent, with every symlink resolved, must still be inside the exec root.
        let parent = path.parent().unwrap_or(workdir).canonicalize()?;
        if !parent.starts_with(&root) {
            return Err(WorkerError::Output(format!(
                "{p:?} resolves outside the exec root"
            )));
        }
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
    fn link_checks() {
        let root = Path::new("/x/root");
        assert!(check_link(root, &root.join("a/l"), Path::new("../b")).is_ok());
        assert!(check_link(root, &root.join("a/l"), Path::new("../../etc")).is_err());
        assert!(check_link(root, &root.join("l"), Path::new("/etc/passwd")).is_err());
        assert!(check_relative("../x").is_err());
        assert!(check_relative("/x").is_err());
        assert!(check_relative("a/b").is_ok());
    }
}
