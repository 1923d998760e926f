//! Unpacks a downloaded archive (tar, tar.gz, tar.zst) into REAPI Directory messages, for
//! FetchDirectory. Runs on a blocking thread over the buffered archive. Refuses what could
//! not be represented faithfully or safely: paths with "..", absolute paths, two entries of
//! one name, devices and FIFOs, and archives beyond the size, entry and depth limits.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;

use bazel_remote_apis::build::bazel::remote::execution::v2::{
    Directory, DirectoryNode, FileNode, SymlinkNode,
};
use prost::Message;
use tar::EntryType;

use crate::digest::Digest;
use crate::error::{Error, Result};

pub struct Limits {
    /// Bytes of the unpacked (decompressed) tar stream.
    pub max_bytes: u64,
    pub max_entries: usize,
    pub max_depth: usize,
}

pub const MAX_ENTRIES: usize = 100_000;
pub const MAX_DEPTH: usize = 64;

/// The unpacked tree: the root's digest and every Directory message, encoded.
pub struct Unpacked {
    pub root: Digest,
    pub directories: Vec<(Digest, Vec<u8>)>,
}

enum Node {
    File { digest: Digest, executable: bool },
    Symlink(String),
    Dir(BTreeMap<String, Node>),
}

/// Unpacks `archive`, handing each distinct file's content to `file` as it is read (so
/// contents need not all be held at once) and returning the directories.
pub fn unpack(
    uri: &str,
    archive: &[u8],
    limits: &Limits,
    mut file: impl FnMut(Digest, Vec<u8>) -> Result<()>,
) -> Result<Unpacked> {
    let refuse = |m: String| Error::FailedPrecondition(format!("{uri}: {m}"));
    let stream = Limited {
        inner: decompressor(archive).map_err(refuse)?,
        left: limits.max_bytes,
    };
    let mut ar = tar::Archive::new(stream);
    let mut root: BTreeMap<String, Node> = BTreeMap::new();
    let mut files: HashMap<Vec<String>, (Digest, bool)> = HashMap::new();
    let mut sent = std::collections::HashSet::new();
    let io = |e: std::io::Error| match e.get_ref().and_then(|i| i.downcast_ref::<TooLarge>()) {
        Some(_) => refuse(format!(
            "the unpacked archive is larger than asset.max_download_bytes ({} bytes)",
            limits.max_bytes
        )),
        None => refuse(format!("not a readable tar archive: {e}")),
    };
    for (i, entry) in ar.entries().map_err(io)?.enumerate() {
        if i >= limits.max_entries {
            return Err(refuse(format!("more than {} entries", limits.max_entries)));
        }
        let mut entry = entry.map_err(io)?;
        let kind = entry.header().entry_type();
        if matches!(
            kind,
            EntryType::XGlobalHeader
                | EntryType::XHeader
                | EntryType::GNULongName
                | EntryType::GNULongLink
        ) {
            continue; // pax/GNU metadata (`git archive` writes a global header)
        }
        let raw_path = String::from_utf8(entry.path_bytes().into_owned())
            .map_err(|_| refuse("an entry's path is not UTF-8".into()))?;
        // Upstream input, which may be long (pax paths): quoted cut short.
        let shown = format!("{:?}", super::clip(&raw_path, 256));
        let at = |m: &str| refuse(format!("entry {shown}: {m}"));
        let path = safe_path(&raw_path).map_err(|m| at(&m))?;
        if path.len() > limits.max_depth {
            return Err(refuse(format!(
                "entry {shown} is nested deeper than {} levels",
                limits.max_depth
            )));
        }
        if path.is_empty() {
            if kind == EntryType::Directory {
                continue; // "./" itself
            }
            return Err(at("has an empty path"));
        }
        let node = match kind {
            EntryType::Regular | EntryType::Continuous => {
                let size = entry.size();
                let mut data = Vec::with_capacity(size.min(1 << 20) as usize);
                entry.read_to_end(&mut data).map_err(io)?;
                let digest = Digest::of(&data);
                let executable = entry.header().mode().is_ok_and(|m| m & 0o111 != 0);
                if sent.insert(digest) {
                    file(digest, data)?;
                }
                files.insert(path.clone(), (digest, executable));
                Node::File { digest, executable }
            }
            EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .and_then(|b| String::from_utf8(b.into_owned()).ok())
                    .ok_or_else(|| at("hard link without a UTF-8 target"))?;
                let t = safe_path(&target).map_err(|m| at(&format!("hard link target: {m}")))?;
                let (digest, executable) = *files.get(&t).ok_or_else(|| {
                    at(&format!(
                        "hard link to {:?}, which is not an earlier regular file",
                        super::clip(&target, 256)
                    ))
                })?;
                files.insert(path.clone(), (digest, executable));
                Node::File { digest, executable }
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .and_then(|b| String::from_utf8(b.into_owned()).ok())
                    .filter(|t| !t.is_empty())
                    .ok_or_else(|| at("symlink without a UTF-8 target"))?;
                Node::Symlink(target)
            }
            EntryType::Directory => Node::Dir(BTreeMap::new()),
            other => {
                return Err(at(&format!(
                    "entry type {other:?} is not supported (only files, directories and links)"
                )))
            }
        };
        insert(&mut root, &path, node).map_err(|m| at(&m))?;
    }
    let mut directories = Vec::new();
    let root = encode(root, &mut directories);
    Ok(Unpacked { root, directories })
}

/// Picks the decompressor by the archive's magic bytes.
fn decompressor(archive: &[u8]) -> std::result::Result<Box<dyn Read + '_>, String> {
    let starts = |magic: &[u8]| archive.starts_with(magic);
    if starts(&[0x1f, 0x8b]) {
        return Ok(Box::new(flate2::read::MultiGzDecoder::new(archive)));
    }
    if starts(&[0x28, 0xb5, 0x2f, 0xfd]) {
        return zstd::stream::read::Decoder::new(archive)
            .map(|d| Box::new(d) as Box<dyn Read>)
            .map_err(|e| format!("zstd: {e}"));
    }
    for (magic, what) in [
        (&b"PK\x03\x04"[..], "zip"),
        (&[0xfd, b'7', b'z', b'X', b'Z', 0][..], "xz"),
        (&b"BZh"[..], "bzip2"),
        (&b"7z\xbc\xaf\x27\x1c"[..], "7z"),
    ] {
        if starts(magic) {
            return Err(format!(
                "{what} archives are not supported (tar, tar.gz and tar.zst are)"
            ));
        }
    }
    Ok(Box::new(archive))
}

/// An archive path as its components: "./" and empty components dropped; "..", absolute
/// paths and NUL refused, since they cannot be names in a Directory.
pub fn safe_path(p: &str) -> std::result::Result<Vec<String>, String> {
    if p.starts_with('/') {
        return Err("absolute paths are refused".into());
    }
    let mut out = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => return Err("paths with '..' are refused".into()),
            c if c.contains('\0') => return Err("NUL in a path".into()),
            c => out.push(c.to_string()),
        }
    }
    Ok(out)
}

fn insert(
    root: &mut BTreeMap<String, Node>,
    path: &[String],
    node: Node,
) -> std::result::Result<(), String> {
    let (name, parents) = path.split_last().ok_or("empty path")?;
    let mut dir = root;
    for p in parents {
        let child = dir
            .entry(p.clone())
            .or_insert_with(|| Node::Dir(BTreeMap::new()));
        dir = match child {
            Node::Dir(d) => d,
            _ => return Err(format!("{p:?} is not a directory")),
        };
    }
    if let Some(existing) = dir.get(name) {
        // A directory named again (before or after its contents) is the same directory.
        return match (existing, &node) {
            (Node::Dir(_), Node::Dir(_)) => Ok(()),
            _ => Err("a second entry of the same name".into()),
        };
    }
    dir.insert(name.clone(), node);
    Ok(())
}

/// Encodes a directory and (first) its subdirectories; names come sorted from the BTreeMap.
fn encode(entries: BTreeMap<String, Node>, out: &mut Vec<(Digest, Vec<u8>)>) -> Digest {
    let mut dir = Directory::default();
    for (name, node) in entries {
        match node {
            Node::File { digest, executable } => dir.files.push(FileNode {
                name,
                digest: Some(digest.to_proto()),
                is_executable: executable,
                node_properties: None,
            }),
            Node::Symlink(target) => dir.symlinks.push(SymlinkNode {
                name,
                target,
                node_properties: None,
            }),
            Node::Dir(children) => {
                let d = encode(children, out);
                dir.directories.push(DirectoryNode {
                    name,
                    digest: Some(d.to_proto()),
                });
            }
        }
    }
    let raw = dir.encode_to_vec();
    let digest = Digest::of(&raw);
    out.push((digest, raw));
    digest
}

#[derive(Debug, thiserror::Error)]
#[error("archive too large")]
struct TooLarge;

/// Fails (rather than ending early) once more than `left` bytes have been read, so a
/// decompression bomb stops at the limit with an error tar cannot mistake for the end.
struct Limited<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for Limited<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            let mut probe = [0u8; 1];
            return match self.inner.read(&mut probe)? {
                0 => Ok(0),
                _ => Err(std::io::Error::other(TooLarge)),
            };
        }
        let n = buf.len().min(self.left.min(usize::MAX as u64) as usize);
        let got = self.inner.read(&mut buf[..n])?;
        self.left -= got as u64;
        Ok(got)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_made_safe_or_refused() {
        assert_eq!(safe_path("./a//b/./c").unwrap(), vec!["a", "b", "c"]);
        assert!(safe_path("./").unwrap().is_empty());
        assert!(safe_path("../x").is_err());
        assert!(safe_path("a/../../x").is_err());
        assert!(safe_path("/etc/passwd").is_err());
        assert_eq!(safe_path("a..b/..c").unwrap(), vec!["a..b", "..c"]);
    }

    fn tar_of(entries: &[(&str, EntryType, &str, &str)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, kind, data, link) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            // Written raw: tar's own setters refuse the unsafe names under test.
            h.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
            if !link.is_empty() {
                h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
            }
            h.set_cksum();
            b.append(&h, data.as_bytes()).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn run(archive: &[u8], max_bytes: u64) -> Result<Unpacked> {
        let limits = Limits {
            max_bytes,
            max_entries: 10,
            max_depth: 4,
        };
        unpack("http://x/a.tar", archive, &limits, |_, _| Ok(()))
    }

    fn refused(archive: &[u8], want: &str) {
        match run(archive, 1 << 20) {
            Err(Error::FailedPrecondition(m)) => assert!(m.contains(want), "{m}"),
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("accepted, wanted {want}"),
        }
    }

    #[test]
    fn unsafe_or_unrepresentable_archives_are_refused() {
        let r = EntryType::Regular;
        refused(&tar_of(&[("../x", r, "x", "")]), "'..'");
        refused(&tar_of(&[("/etc/x", r, "x", "")]), "absolute");
        refused(
            &tar_of(&[("a", r, "1", ""), ("./a", r, "2", "")]),
            "same name",
        );
        refused(
            &tar_of(&[("a", r, "1", ""), ("a/b", r, "2", "")]),
            "not a directory",
        );
        refused(&tar_of(&[("p", EntryType::Fifo, "", "")]), "not supported");
        refused(
            &tar_of(&[("h", EntryType::Link, "", "nowhere")]),
            "not an earlier regular file",
        );
        refused(&tar_of(&[("a/b/c/d/e", r, "x", "")]), "deeper");
        refused(
            &tar_of(&[("a/b/c/d/e", r, "x", "")]),
            "entry \"a/b/c/d/e\" is nested deeper",
        );
        let names: Vec<String> = (0..11).map(|i| format!("f{i}")).collect();
        let many: Vec<(&str, EntryType, &str, &str)> =
            names.iter().map(|p| (p.as_str(), r, "", "")).collect();
        refused(&tar_of(&many), "more than 10 entries");
        refused(b"PK\x03\x04rest", "zip archives are not supported");
        refused(&[0u8; 10], "not a readable tar archive");
        let big = "7".repeat(5000);
        match run(&tar_of(&[("big", r, big.as_str(), "")]), 4096) {
            Err(Error::FailedPrecondition(m)) => {
                assert!(m.contains("asset.max_download_bytes"), "{m}")
            }
            other => panic!("{:?}", other.map(|u| u.root)),
        }
    }

    #[test]
    fn links_and_directories_become_nodes() {
        let archive = tar_of(&[
            ("d/", EntryType::Directory, "", ""),
            ("d/f", EntryType::Regular, "hello", ""),
            ("d/h", EntryType::Link, "", "d/f"),
            ("d/s", EntryType::Symlink, "", "f"),
            ("d/", EntryType::Directory, "", ""),
        ]);
        let u = run(&archive, 1 << 20).unwrap();
        assert_eq!(u.directories.len(), 2);
        let (_, raw) = &u.directories[0];
        let d = Directory::decode(raw.as_slice()).unwrap();
        let names: Vec<&str> = d.files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["f", "h"]);
        assert_eq!(d.files[0].digest, d.files[1].digest);
        assert_eq!(d.symlinks[0].target, "f");
        assert_eq!(u.directories[1].0, u.root);
    }

    #[test]
    fn long_entry_paths_are_not_echoed_whole() {
        // A 100 kB path (a GNU long name) nested too deep, and one with "..".
        let deep = vec!["d".repeat(20_000); 5].join("/");
        let up = format!("{}/../x", "u".repeat(100_000));
        for path in [deep, up] {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(EntryType::GNULongName);
            h.set_size(path.len() as u64 + 1);
            h.as_old_mut().name[..13].copy_from_slice(b"././@LongLink");
            h.set_cksum();
            let mut b = tar::Builder::new(Vec::new());
            b.append(&h, format!("{path}\0").as_bytes()).unwrap();
            let mut f = tar::Header::new_gnu();
            f.set_entry_type(EntryType::Regular);
            f.set_size(1);
            f.as_old_mut().name[..5].copy_from_slice(b"short");
            f.set_cksum();
            b.append(&f, &b"x"[..]).unwrap();
            match run(&b.into_inner().unwrap(), 1 << 20) {
                Err(Error::FailedPrecondition(m)) => {
                    assert!(m.len() < 1000 && m.contains("bytes in all"), "{m}")
                }
                Err(e) => panic!("{e}"),
                Ok(_) => panic!("accepted"),
            }
        }
    }
}
