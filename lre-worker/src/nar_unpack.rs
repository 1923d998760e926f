//! Unpacks a NAR into a directory as its bytes arrive, through the strict parser of
//! `lre-nix-formats` (the one the binary cache runs over every upload), so a worker
//! without Nix can hold a toolchain's store paths.
//!
//! Invariants:
//! - nothing lands at the destination unless the whole NAR parsed and hashed to the
//!   expected NarHash and size: it is unpacked into a sibling temporary directory and
//!   renamed into place only then; on any error the temporary tree is removed;
//! - nothing is written outside the temporary tree: the parser allows only single-component
//!   names (no `/`, `.`, `..`, NUL), unique within their directory, so each parent is a
//!   directory this unpack created, and every entry is created new (`O_EXCL`, which never
//!   follows a symlink) — a symlink is written as a link, never followed;
//! - modes are Nix's: files 0444 or 0555, directories 0555 (set once the tree is
//!   complete), so an action bound to the tree cannot change it.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use lre_nix_formats::nar::{NarError, NarParser, NarSink};
use lre_nix_formats::NixHash;

#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("NAR for {dest}: {source}")]
    Nar {
        dest: PathBuf,
        #[source]
        source: NarError,
    },
    #[error("NAR for {dest}: it hashes to {actual} ({size} bytes), the narinfo says {expected} ({expected_size} bytes)")]
    Mismatch {
        dest: PathBuf,
        actual: NixHash,
        size: u64,
        expected: NixHash,
        expected_size: u64,
    },
    #[error("{}: already there (another unpack of the same path finished first)", .0.display())]
    Exists(PathBuf),
    #[error("unpacking into {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

struct Sink {
    root: PathBuf,
    file: Option<(File, bool)>,
    /// Directories made, to be made read-only once complete (deepest last).
    dirs: Vec<PathBuf>,
}

impl Sink {
    fn at(&self, path: &[String]) -> PathBuf {
        let mut p = self.root.clone();
        p.extend(path);
        p
    }
}

impl NarSink for Sink {
    fn directory(&mut self, path: &[String]) -> std::io::Result<()> {
        let p = self.at(path);
        std::fs::create_dir(&p)?;
        self.dirs.push(p);
        Ok(())
    }
    fn file(&mut self, path: &[String], executable: bool, _size: u64) -> std::io::Result<()> {
        // create_new is O_CREAT|O_EXCL: it fails on any existing name, a symlink included,
        // and never follows one.
        let f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(self.at(path))?;
        self.file = Some((f, executable));
        Ok(())
    }
    fn file_data(&mut self, data: &[u8]) -> std::io::Result<()> {
        match &mut self.file {
            Some((f, _)) => f.write_all(data),
            None => Err(std::io::Error::other("file data outside a file")),
        }
    }
    fn file_end(&mut self) -> std::io::Result<()> {
        if let Some((f, executable)) = self.file.take() {
            let mode = if executable { 0o555 } else { 0o444 };
            f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        }
        Ok(())
    }
    fn symlink(&mut self, path: &[String], target: &[u8]) -> std::io::Result<()> {
        std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(target), self.at(path))
    }
}

/// A NAR being unpacked to `dest`. Feed it chunks in order, then `finish`, which never
/// replaces anything already at `dest` (`Exists`). Dropping it before `finish`, or a
/// failed `finish`, removes what it wrote.
pub struct Unpack {
    dest: PathBuf,
    tmp: PathBuf,
    parser: NarParser,
    sink: Sink,
    expected: (NixHash, u64),
    done: bool,
}

impl Unpack {
    pub fn new(dest: &Path, nar_hash: NixHash, nar_size: u64) -> Unpack {
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = dest.with_file_name(format!(".{name}.unpacking-{}", uuid::Uuid::new_v4()));
        Unpack {
            dest: dest.to_path_buf(),
            sink: Sink {
                root: tmp.clone(),
                file: None,
                dirs: Vec::new(),
            },
            tmp,
            parser: NarParser::new(nar_size),
            expected: (nar_hash, nar_size),
            done: false,
        }
    }

    pub fn feed(&mut self, data: &[u8]) -> Result<(), UnpackError> {
        let dest = self.dest.clone();
        self.parser
            .feed(data, &mut self.sink)
            .map_err(|source| UnpackError::Nar { dest, source })
    }

    /// Checks the NAR was complete and is the expected one, then moves it into place.
    pub fn finish(mut self) -> Result<(), UnpackError> {
        let dest = self.dest.clone();
        let parser = std::mem::replace(&mut self.parser, NarParser::new(0));
        let summary = parser.finish().map_err(|source| UnpackError::Nar {
            dest: dest.clone(),
            source,
        })?;
        let (expected, expected_size) = self.expected;
        if summary.nar_hash != expected || summary.nar_size != expected_size {
            return Err(UnpackError::Mismatch {
                dest,
                actual: summary.nar_hash,
                size: summary.nar_size,
                expected,
                expected_size,
            });
        }
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| UnpackError::Io { path, source }
        };
        for d in self.sink.dirs.iter().rev() {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o555)).map_err(io(d))?;
        }
        // On disk before it is in place: a tree at `dest` is a checked tree, after a crash
        // too. One syncfs for the whole tree rather than an fsync per file.
        let parent = self.dest.parent().unwrap_or(Path::new("."));
        let dir = File::open(parent).map_err(io(parent))?;
        rustix::fs::syncfs(&dir).map_err(|e| io(parent)(e.into()))?;
        // Never over something already there (another unpack of the same path won).
        rustix::fs::renameat_with(
            rustix::fs::CWD,
            &self.tmp,
            rustix::fs::CWD,
            &self.dest,
            rustix::fs::RenameFlags::NOREPLACE,
        )
        .map_err(|e| {
            if e == rustix::io::Errno::EXIST {
                UnpackError::Exists(self.dest.clone())
            } else {
                io(&self.dest)(e.into())
            }
        })?;
        self.done = true;
        Ok(())
    }
}

impl Drop for Unpack {
    fn drop(&mut self) {
        if !self.done {
            remove_tree(&self.tmp);
        }
    }
}

/// Removes a tree whose directories may be read-only (an unpacked store path).
pub fn remove_tree(path: &Path) {
    fn writable(p: &Path) {
        if let Ok(m) = std::fs::symlink_metadata(p) {
            if m.is_dir() {
                let _ = std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755));
                if let Ok(entries) = std::fs::read_dir(p) {
                    for e in entries.flatten() {
                        writable(&e.path());
                    }
                }
            }
        }
    }
    writable(path);
    let _ = match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(_) => Ok(()),
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use lre_nix_formats::nar::write;

    fn nar(names: &[&str]) -> Vec<u8> {
        let entries: Vec<(&str, Vec<u8>)> = names
            .iter()
            .map(|n| (*n, write::regular(b"x", false)))
            .collect();
        write::archive(write::directory(&entries))
    }

    #[test]
    fn a_refused_nar_leaves_nothing_anywhere() {
        let d = tempfile::tempdir().unwrap();
        let bad = nar(&["a", ".."]);
        let dest = d.path().join("store/p");
        std::fs::create_dir(d.path().join("store")).unwrap();
        let mut u = Unpack::new(&dest, NixHash::of(&bad), bad.len() as u64);
        let e = u.feed(&bad).unwrap_err().to_string();
        assert!(e.contains("not allowed"), "{e}");
        drop(u);
        assert_eq!(
            std::fs::read_dir(d.path().join("store")).unwrap().count(),
            0
        );
        // Something already at the destination is never replaced.
        let good = nar(&["a", "b"]);
        std::fs::write(&dest, b"already here").unwrap();
        let mut u = Unpack::new(&dest, NixHash::of(&good), good.len() as u64);
        u.feed(&good).unwrap();
        assert!(matches!(u.finish(), Err(UnpackError::Exists(_))));
        assert_eq!(std::fs::read(&dest).unwrap(), b"already here");
        std::fs::remove_file(&dest).unwrap();
        // A good NAR under the wrong hash: refused at the end, nothing in place.
        let good = nar(&["a", "b"]);
        let mut u = Unpack::new(&dest, NixHash::of(b"other"), good.len() as u64);
        u.feed(&good).unwrap();
        assert!(u.finish().unwrap_err().to_string().contains("hashes to"));
        assert_eq!(
            std::fs::read_dir(d.path().join("store")).unwrap().count(),
            0
        );
    }
}
