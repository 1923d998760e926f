//! The worker's output collection (`outputs::collect`) over a small tree of directories,
//! files, symlinks and FIFOs built from the input in a scratch directory (on /dev/shm when
//! there is one), with declared outputs from the input. Invariants:
//!
//! - no panic; a declared path that is empty, absolute or climbs with `..` is an error;
//! - nothing accepted lies outside the exec root: every file hashed for upload resolves
//!   inside it, every directory walked is inside it (not reached through a symlink to
//!   one elsewhere), and every symlink accepted, followed the way the kernel follows it,
//!   stays inside it (a dangling one does not climb with `..`);
//! - what is accepted is what is on disk: digests, executable bits, every entry;
//! - a tree of only files and directories, with sane declared paths, is collected.
#![no_main]

use std::collections::{HashMap, VecDeque};
use std::ffi::{CString, OsString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::OnceLock;

use arbitrary::Arbitrary;
use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use libfuzzer_sys::fuzz_target;
use lre_worker::cas::Upload;
use lre_worker::outputs::collect;
use prost::Message;
use sha2::{Digest as _, Sha256};

const NAMES: &[&str] = &["a", "b", "c", "w", "outside", "secret"];

#[derive(Arbitrary, Debug)]
struct Input {
    /// The working directory is `w` below the exec root rather than the root itself.
    in_subdir: bool,
    nodes: Vec<Node>,
    outputs: Vec<Declared>,
    /// REAPI 2.1's `output_paths`, or the older `output_files` + `output_directories`.
    output_paths: bool,
}

#[derive(Arbitrary, Debug)]
enum Node {
    Dir(Vec<u8>),
    File(Vec<u8>, u8, bool),
    Symlink(Vec<u8>, Target),
    Fifo(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
enum Comp {
    Name(u8),
    Dot,
    DotDot,
    Empty,
}

#[derive(Arbitrary, Debug)]
enum Target {
    Rel(Vec<Comp>),
    /// Absolute, into the exec root itself.
    AbsRoot(Vec<Comp>),
    /// Absolute, to the directory beside the exec root, or to the file in it.
    AbsOutside(bool),
}

#[derive(Arbitrary, Debug)]
enum Declared {
    Comps(Vec<Comp>, bool),
    Raw(String),
}

fn join(comps: &[Comp]) -> String {
    let parts: Vec<&str> = comps
        .iter()
        .take(6)
        .map(|c| match c {
            Comp::Name(i) => NAMES[*i as usize % NAMES.len()],
            Comp::Dot => ".",
            Comp::DotDot => "..",
            Comp::Empty => "",
        })
        .collect();
    parts.join("/")
}

fn scratch() -> &'static Path {
    // (the whole scratch directory, the padded one inside it)
    static DIR: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    extern "C" fn cleanup() {
        if let Some((d, _)) = DIR.get() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
    &DIR.get_or_init(|| {
        let base = std::env::var_os("LRE_FUZZ_SCRATCH")
            .map(PathBuf::from)
            .or_else(|| {
                let shm = Path::new("/dev/shm");
                shm.is_dir().then(|| shm.to_path_buf())
            })
            .unwrap_or_else(std::env::temp_dir);
        // A few levels of padding: links that climb out of the case stay in the scratch dir.
        let dir = base.join(format!("lre-fuzz-output.{}", std::process::id()));
        let padded = dir.join("p/p/p/p/p/p/p/p");
        std::fs::create_dir_all(&padded).unwrap();
        unsafe { libc::atexit(cleanup) };
        let padded = padded.canonicalize().unwrap();
        (dir, padded)
    })
    .1
}

/// Creates `node` at `rel` under `root` only if every ancestor is a real directory: nothing
/// the harness writes goes through a symlink.
fn create(root: &Path, rel: &[u8], node: &Node, case: &Path) -> bool {
    if rel.is_empty() {
        return false;
    }
    let names: Vec<&str> = rel
        .iter()
        .take(4)
        .map(|i| NAMES[*i as usize % NAMES.len()])
        .collect();
    let mut p = root.to_path_buf();
    for n in &names[..names.len() - 1] {
        p.push(n);
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_dir() => {}
            _ => return false,
        }
    }
    p.push(names[names.len() - 1]);
    if std::fs::symlink_metadata(&p).is_ok() {
        return false;
    }
    match node {
        Node::Dir(_) => std::fs::create_dir(&p).is_ok(),
        Node::File(_, content, exec) => {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(if *exec { 0o755 } else { 0o644 })
                .open(&p);
            match f {
                Ok(mut f) => {
                    use std::io::Write;
                    f.write_all(&vec![*content; *content as usize % 5]).unwrap();
                    true
                }
                Err(_) => false,
            }
        }
        Node::Symlink(_, t) => {
            let target = match t {
                Target::Rel(c) => PathBuf::from(join(c)),
                Target::AbsRoot(c) => root.join(join(c)),
                Target::AbsOutside(false) => case.join("outside"),
                Target::AbsOutside(true) => case.join("outside/secret"),
            };
            !target.as_os_str().is_empty() && std::os::unix::fs::symlink(&target, &p).is_ok()
        }
        Node::Fifo(_) => {
            let c = CString::new(p.as_os_str().as_bytes()).unwrap();
            unsafe { libc::mkfifo(c.as_ptr(), 0o644) == 0 }
        }
    }
}

enum Resolved {
    Inside,
    Escapes,
    /// Resolution stopped at a missing component or a non-directory.
    Dangling,
    Loop,
}

/// Follows `target` from the directory `dir` (relative to `root`, symlink-free) as the
/// kernel would, symlinks and all; `..` above `root` or an absolute path escapes.
fn resolve(root: &Path, dir: &Path, target: &Path) -> Resolved {
    let mut cur: Vec<OsString> = dir
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_owned()),
            _ => None,
        })
        .collect();
    let owned = |p: &Path| -> Vec<Option<OsString>> {
        // None: the root directory; Some(".."), Some(name); "." dropped.
        p.components()
            .filter_map(|c| match c {
                Component::RootDir | Component::Prefix(_) => Some(None),
                Component::CurDir => None,
                Component::ParentDir => Some(Some(OsString::from(".."))),
                Component::Normal(n) => Some(Some(n.to_owned())),
            })
            .collect()
    };
    let mut todo: VecDeque<Option<OsString>> = owned(target).into();
    let mut hops = 0;
    while let Some(c) = todo.pop_front() {
        let Some(name) = c else {
            return Resolved::Escapes;
        };
        if name == ".." {
            if cur.pop().is_none() {
                return Resolved::Escapes;
            }
            continue;
        }
        let mut p = root.to_path_buf();
        p.extend(&cur);
        p.push(&name);
        match std::fs::symlink_metadata(&p) {
            Err(_) => return Resolved::Dangling,
            Ok(m) if m.file_type().is_symlink() => {
                hops += 1;
                if hops > 40 {
                    return Resolved::Loop;
                }
                let t = std::fs::read_link(&p).unwrap();
                for c in owned(&t).into_iter().rev() {
                    todo.push_front(c);
                }
            }
            Ok(m) if m.is_dir() => cur.push(name),
            Ok(_) if todo.is_empty() => return Resolved::Inside,
            Ok(_) => return Resolved::Dangling,
        }
    }
    Resolved::Inside
}

fn check_symlink(root: &Path, location: &Path, target: &str) {
    let m = std::fs::symlink_metadata(location).expect("an accepted symlink is on disk");
    assert!(m.file_type().is_symlink(), "{location:?} is not a symlink");
    assert_eq!(
        std::fs::read_link(location).unwrap().as_os_str().as_bytes(),
        target.as_bytes(),
        "{location:?}"
    );
    let target = Path::new(target);
    let dir = location.parent().unwrap().canonicalize().unwrap();
    let dir = dir
        .strip_prefix(root)
        .unwrap_or_else(|_| panic!("symlink {location:?} is outside the exec root"));
    match resolve(root, dir, target) {
        Resolved::Escapes => panic!("symlink {location:?} -> {target:?} escapes the exec root"),
        Resolved::Dangling => assert!(
            !target.components().any(|c| c == Component::ParentDir),
            "dangling symlink {location:?} -> {target:?} climbs with '..'"
        ),
        Resolved::Inside | Resolved::Loop => {}
    }
}

fn sha256_hex(path: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(path).unwrap()))
}

fn check_file(path: &Path, digest: &Option<re::Digest>, executable: bool) {
    let m = std::fs::symlink_metadata(path).expect("an accepted file is on disk");
    assert!(m.file_type().is_file(), "{path:?} is not a regular file");
    let d = digest.as_ref().unwrap();
    assert_eq!(d.hash, sha256_hex(path), "{path:?}'s digest");
    assert_eq!(d.size_bytes as u64, m.len(), "{path:?}'s size");
    assert_eq!(
        executable,
        m.permissions().mode() & 0o111 != 0,
        "{path:?}'s mode"
    );
}

/// A Directory of an output Tree against the directory it was made from.
fn check_dir(
    root: &Path,
    dir: &re::Directory,
    path: &Path,
    children: &HashMap<String, &re::Directory>,
) {
    // A declared `d/` may reach its directory through a symlink inside the exec root.
    let m = std::fs::metadata(path).expect("an accepted directory is on disk");
    assert!(
        m.is_dir(),
        "{path:?} was walked as a directory but is not one"
    );
    let canonical = path.canonicalize().unwrap();
    assert!(
        canonical.starts_with(root),
        "walked {path:?}, which is {canonical:?}, outside the exec root"
    );
    let mut on_disk: Vec<OsString> = std::fs::read_dir(path)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    on_disk.sort();
    let mut listed: Vec<OsString> = dir
        .files
        .iter()
        .map(|f| &f.name)
        .chain(dir.directories.iter().map(|d| &d.name))
        .chain(dir.symlinks.iter().map(|s| &s.name))
        .map(OsString::from)
        .collect();
    listed.sort();
    assert_eq!(listed, on_disk, "{path:?}'s entries");
    for f in &dir.files {
        check_file(&path.join(&f.name), &f.digest, f.is_executable);
    }
    for s in &dir.symlinks {
        check_symlink(root, &path.join(&s.name), &s.target);
    }
    for d in &dir.directories {
        let child = children[&d.digest.as_ref().unwrap().hash];
        check_dir(root, child, &path.join(&d.name), children);
    }
}

fn digest_of(raw: &[u8]) -> String {
    hex::encode(Sha256::digest(raw))
}

fn run(input: &Input) {
    let case = scratch().join("case");
    let _ = std::fs::remove_dir_all(&case);
    let root = case.join("root");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::create_dir_all(case.join("outside")).unwrap();
    std::fs::write(case.join("outside/secret"), "host data").unwrap();
    let workdir = match input.in_subdir {
        true => root.join("w"),
        false => root.clone(),
    };
    std::fs::create_dir_all(&workdir).unwrap();

    let (mut links, mut specials) = (0, 0);
    for node in input.nodes.iter().take(16) {
        let rel = match node {
            Node::Dir(r) | Node::File(r, ..) | Node::Symlink(r, _) | Node::Fifo(r) => r,
        };
        if create(&root, rel, node, &case) {
            match node {
                Node::Symlink(..) => links += 1,
                Node::Fifo(_) => specials += 1,
                _ => {}
            }
        }
    }
    let declared: Vec<String> = input
        .outputs
        .iter()
        .take(6)
        .map(|d| match d {
            Declared::Comps(c, slash) => join(c) + if *slash { "/" } else { "" },
            Declared::Raw(s) => s.chars().take(64).collect(),
        })
        .collect();
    #[allow(deprecated)]
    let cmd = match input.output_paths {
        true => re::Command {
            output_paths: declared.clone(),
            ..Default::default()
        },
        false => {
            let (files, dirs) = declared.split_at(declared.len() / 2);
            re::Command {
                output_files: files.to_vec(),
                output_directories: dirs.to_vec(),
                ..Default::default()
            }
        }
    };

    let refused = |p: &String| {
        p.is_empty()
            || Path::new(p).is_absolute()
            || Path::new(p).components().any(|c| c == Component::ParentDir)
    };
    let result = collect(&root, &workdir, &cmd);
    let c = match result {
        Ok(c) => c,
        Err(e) => {
            // Only a tree of plain files and directories, declared sanely, must collect.
            // (The working directory itself, declared as `.`, is refused when it is the
            // exec root: its parent is outside.)
            let benign = links == 0
                && specials == 0
                && !declared.iter().any(refused)
                && (input.in_subdir
                    || !declared
                        .iter()
                        .any(|p| Path::new(p).components().all(|c| c == Component::CurDir)));
            assert!(!benign, "a plain tree was refused: {e}");
            let _ = std::fs::remove_dir_all(&case);
            return;
        }
    };
    assert!(
        !declared.iter().any(refused),
        "{declared:?} holds a path that is empty, absolute or climbs, yet it was accepted"
    );

    let location = |p: &str| -> PathBuf {
        let path = workdir.join(p);
        let parent = path
            .parent()
            .unwrap_or(workdir.as_path())
            .canonicalize()
            .unwrap();
        assert!(
            parent.starts_with(&root),
            "{p:?}'s parent is outside the exec root"
        );
        parent.join(path.file_name().unwrap_or_default())
    };
    for (d, up) in &c.uploads {
        if let Upload::File(p) = up {
            let canonical = p.canonicalize().unwrap();
            assert!(
                canonical.starts_with(&root),
                "uploading {p:?}, which is {canonical:?}, outside the exec root"
            );
            assert_eq!(d.hash, sha256_hex(p));
        }
    }
    for f in &c.files {
        assert!(declared.contains(&f.path));
        check_file(&location(&f.path), &f.digest, f.is_executable);
    }
    for s in &c.symlinks {
        assert!(declared.contains(&s.path));
        check_symlink(&root, &location(&s.path), &s.target);
    }
    for d in &c.directories {
        assert!(declared.contains(&d.path));
        let td = d.tree_digest.as_ref().unwrap();
        let raw = c
            .uploads
            .iter()
            .find_map(|(ud, up)| match up {
                Upload::Bytes(b) if ud == td => Some(b),
                _ => None,
            })
            .expect("the Tree is uploaded");
        assert_eq!(td.hash, digest_of(raw));
        let tree = re::Tree::decode(&raw[..]).unwrap();
        let children: HashMap<String, &re::Directory> = tree
            .children
            .iter()
            .map(|c| (digest_of(&c.encode_to_vec()), c))
            .collect();
        check_dir(
            &root,
            tree.root.as_ref().unwrap(),
            &location(&d.path),
            &children,
        );
    }
    let _ = std::fs::remove_dir_all(&case);
}

fuzz_target!(|input: Input| run(&input));
