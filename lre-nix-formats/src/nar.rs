//! A strict, streaming NAR parser: bytes go in as they arrive (`NarParser::feed`), in
//! chunks of any size, and a `NarSink` hears each directory, file and symlink. The server
//! runs it over every NAR it will serve, the worker unpacks through it, and both refuse
//! the same things.
//!
//! Invariants, each refused with a reason:
//! - the grammar is exactly Nix's (`nix-archive-1`, `(`, `type`, …); padding is zeros;
//!   nothing follows the root node;
//! - entry names are 1 to 255 bytes, never `.` or `..`, and contain no `/` or NUL; a
//!   directory's entries are strictly sorted (so unique), as `nix-store --dump` writes
//!   them; names must be UTF-8 (Nix allows any bytes; toolchains do not use that);
//! - symlink targets are 1 to 4095 bytes without NUL (their meaning is the sink's
//!   business: an unpacker must never follow one);
//! - depth is at most `MAX_DEPTH`, and the whole NAR at most the caller's byte limit
//!   (checked as bytes arrive, so a decompression bomb stops at the limit);
//! - memory is bounded: a token is at most 4 KiB, and a frame per open directory.
//!
//! Hand-written: no permissively licensed crate parses NARs incrementally with these
//! refusals (see `lib.rs` for why not snix's).

use sha2::{Digest as _, Sha256};

use crate::error::FormatError;
use crate::hash::NixHash;

pub const MAX_DEPTH: usize = 256;
pub const MAX_NAME: usize = 255;
pub const MAX_TARGET: usize = 4095;
const MAGIC: &[u8] = b"nix-archive-1";

/// Where a parsed NAR's contents go. `path` is the entry's names from the root (`[]` is
/// the root itself). The defaults do nothing, for a parser that only validates.
pub trait NarSink {
    fn directory(&mut self, _path: &[String]) -> std::io::Result<()> {
        Ok(())
    }
    fn file(&mut self, _path: &[String], _executable: bool, _size: u64) -> std::io::Result<()> {
        Ok(())
    }
    fn file_data(&mut self, _data: &[u8]) -> std::io::Result<()> {
        Ok(())
    }
    fn file_end(&mut self) -> std::io::Result<()> {
        Ok(())
    }
    fn symlink(&mut self, _path: &[String], _target: &[u8]) -> std::io::Result<()> {
        Ok(())
    }
}

/// Validation only.
pub struct Validate;
impl NarSink for Validate {}

#[derive(Debug, thiserror::Error)]
pub enum NarError {
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error("writing the NAR's contents: {0}")]
    Sink(#[from] std::io::Error),
}

/// What the root of a NAR is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Root {
    /// A single file, with the SHA-256 of its contents (a flat content address's hash).
    Regular {
        executable: bool,
        contents: NixHash,
    },
    Symlink,
    Directory,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NarSummary {
    pub nar_hash: NixHash,
    pub nar_size: u64,
    pub root: Root,
    pub files: u64,
    pub directories: u64,
    pub symlinks: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    Magic,
    NodeOpen,
    Type,
    TypeName,
    RegularAttr,
    ExecutableEmpty,
    Contents,
    ContentsLen,
    NodeClose,
    TargetKw,
    Target,
    EntryOrClose,
    EntryOpen,
    NameKw,
    Name,
    NodeKw,
    EntryClose,
    Done,
}

#[derive(Debug)]
enum Lex {
    /// The 8-byte little-endian length of the next string.
    Len { buf: [u8; 8], have: usize },
    /// A token's bytes, `len` in all.
    Str { len: usize, buf: Vec<u8> },
    /// A file's contents, streamed to the sink.
    Data { remaining: u64 },
    /// Zero bytes up to the next multiple of 8; then the token (if any) is handled.
    Pad {
        remaining: usize,
        token: Option<Vec<u8>>,
    },
}

pub struct NarParser {
    expect: Expect,
    lex: Lex,
    /// Names from the root to the node being parsed.
    path: Vec<String>,
    /// The last entry name of each open directory (sorting is checked against it).
    last_names: Vec<Option<Vec<u8>>>,
    executable: bool,
    file_len: u64,
    hasher: Sha256,
    root_contents: Option<Sha256>,
    root: Option<Root>,
    size: u64,
    max_size: u64,
    /// Set by an error: the parser's state is then inconsistent, and it refuses more.
    failed: bool,
    files: u64,
    directories: u64,
    symlinks: u64,
}

fn bad(why: impl Into<String>) -> NarError {
    NarError::Format(FormatError::Nar(why.into()))
}

fn pad_of(len: u64) -> usize {
    ((8 - len % 8) % 8) as usize
}

impl NarParser {
    /// A parser that refuses a NAR longer than `max_size` bytes.
    pub fn new(max_size: u64) -> NarParser {
        NarParser {
            expect: Expect::Magic,
            lex: Lex::Len {
                buf: [0; 8],
                have: 0,
            },
            path: Vec::new(),
            last_names: Vec::new(),
            executable: false,
            file_len: 0,
            hasher: Sha256::new(),
            root_contents: None,
            root: None,
            size: 0,
            max_size,
            failed: false,
            files: 0,
            directories: 0,
            symlinks: 0,
        }
    }

    /// Bytes read so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Parses the next bytes of the NAR. After an error the parser is spent.
    pub fn feed(&mut self, data: &[u8], sink: &mut impl NarSink) -> Result<(), NarError> {
        if self.failed {
            return Err(bad("the parser already refused this NAR"));
        }
        let r = self.feed_inner(data, sink);
        self.failed = r.is_err();
        r
    }

    fn feed_inner(&mut self, data: &[u8], sink: &mut impl NarSink) -> Result<(), NarError> {
        if self.size + data.len() as u64 > self.max_size {
            return Err(bad(format!(
                "longer than the limit of {} bytes",
                self.max_size
            )));
        }
        self.size += data.len() as u64;
        self.hasher.update(data);
        let mut rest = data;
        while !rest.is_empty() {
            if self.expect == Expect::Done {
                return Err(bad("data after the end of the archive"));
            }
            match &mut self.lex {
                Lex::Len { buf, have } => {
                    let n = (8 - *have).min(rest.len());
                    buf[*have..*have + n].copy_from_slice(&rest[..n]);
                    *have += n;
                    rest = &rest[n..];
                    if *have == 8 {
                        let len = u64::from_le_bytes(*buf);
                        // Where the string starts in the NAR.
                        let at = self.size - rest.len() as u64;
                        self.start_string(len, at, sink)?;
                    }
                }
                Lex::Str { len, buf } => {
                    let n = (*len - buf.len()).min(rest.len());
                    buf.extend_from_slice(&rest[..n]);
                    rest = &rest[n..];
                    if buf.len() == *len {
                        let token = std::mem::take(buf);
                        let pad = pad_of(token.len() as u64);
                        self.lex = Lex::Pad {
                            remaining: pad,
                            token: Some(token),
                        };
                        if pad == 0 {
                            self.end_pad(sink)?;
                        }
                    }
                }
                Lex::Data { remaining } => {
                    let n = (*remaining).min(rest.len() as u64) as usize;
                    *remaining -= n as u64;
                    let chunk = &rest[..n];
                    rest = &rest[n..];
                    if let Some(h) = &mut self.root_contents {
                        h.update(chunk);
                    }
                    sink.file_data(chunk)?;
                    if *remaining == 0 {
                        let pad = pad_of(self.file_len);
                        self.lex = Lex::Pad {
                            remaining: pad,
                            token: None,
                        };
                        if pad == 0 {
                            self.end_pad(sink)?;
                        }
                    }
                }
                Lex::Pad { remaining, .. } => {
                    let n = (*remaining).min(rest.len());
                    if rest[..n].iter().any(|&b| b != 0) {
                        return Err(bad("non-zero padding"));
                    }
                    *remaining -= n;
                    rest = &rest[n..];
                    if *remaining == 0 {
                        self.end_pad(sink)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// The archive must be complete: anything else is a truncated NAR.
    pub fn finish(self) -> Result<NarSummary, NarError> {
        if self.failed {
            return Err(bad("the parser already refused this NAR"));
        }
        if self.expect != Expect::Done {
            return Err(bad(format!(
                "truncated after {} bytes (the archive is not complete)",
                self.size
            )));
        }
        Ok(NarSummary {
            nar_hash: NixHash(self.hasher.finalize().into()),
            nar_size: self.size,
            root: self.root.unwrap_or(Root::Directory),
            files: self.files,
            directories: self.directories,
            symlinks: self.symlinks,
        })
    }

    fn start_string(&mut self, len: u64, at: u64, sink: &mut impl NarSink) -> Result<(), NarError> {
        if self.expect == Expect::ContentsLen {
            // Refused before the sink hears of it: a file cannot be longer than what is
            // left of the NAR's limit.
            if len > self.max_size - at {
                return Err(bad(format!(
                    "a file of {len} bytes at {:?} does not fit in the limit of {} bytes",
                    self.path.join("/"),
                    self.max_size
                )));
            }
            self.file_len = len;
            self.files += 1;
            if self.path.is_empty() {
                self.root_contents = Some(Sha256::new());
            }
            sink.file(&self.path, self.executable, len)?;
            self.lex = Lex::Data { remaining: len };
            if len == 0 {
                self.lex = Lex::Pad {
                    remaining: 0,
                    token: None,
                };
                self.end_pad(sink)?;
            }
            return Ok(());
        }
        let limit = match self.expect {
            Expect::Name => MAX_NAME,
            Expect::Target => MAX_TARGET,
            _ => 16,
        };
        if len > limit as u64 {
            return Err(bad(format!(
                "a string of {len} bytes where at most {limit} may stand ({})",
                self.what()
            )));
        }
        self.lex = Lex::Str {
            len: len as usize,
            buf: Vec::with_capacity(len as usize),
        };
        if len == 0 {
            self.lex = Lex::Pad {
                remaining: 0,
                token: Some(Vec::new()),
            };
            self.end_pad(sink)?;
        }
        Ok(())
    }

    fn what(&self) -> String {
        let at = if self.path.is_empty() {
            "the root".to_string()
        } else {
            format!("{:?}", self.path.join("/"))
        };
        format!("expecting {:?} at {at}", self.expect)
    }

    /// A string and its padding are complete.
    fn end_pad(&mut self, sink: &mut impl NarSink) -> Result<(), NarError> {
        let token = match std::mem::replace(
            &mut self.lex,
            Lex::Len {
                buf: [0; 8],
                have: 0,
            },
        ) {
            Lex::Pad { token, .. } => token,
            _ => unreachable!("end_pad follows a Pad"),
        };
        match token {
            None => {
                // A file's contents ended.
                if let Some(h) = self.root_contents.take() {
                    self.root = Some(Root::Regular {
                        executable: self.executable,
                        contents: NixHash(h.finalize().into()),
                    });
                }
                sink.file_end()?;
                self.expect = Expect::NodeClose;
                Ok(())
            }
            Some(t) => self.token(t, sink),
        }
    }

    fn token(&mut self, t: Vec<u8>, sink: &mut impl NarSink) -> Result<(), NarError> {
        use Expect::*;
        let is = |s: &str| t == s.as_bytes();
        let unexpected = |p: &NarParser| {
            bad(format!(
                "unexpected {:?}, {}",
                String::from_utf8_lossy(&t[..t.len().min(32)]),
                p.what()
            ))
        };
        self.expect = match self.expect {
            Magic if t == MAGIC => NodeOpen,
            Magic => return Err(bad("not a NAR (no nix-archive-1 header)")),
            NodeOpen if is("(") => Type,
            Type if is("type") => TypeName,
            TypeName if is("regular") => {
                self.executable = false;
                RegularAttr
            }
            TypeName if is("symlink") => TargetKw,
            TypeName if is("directory") => {
                self.directories += 1;
                if self.path.is_empty() {
                    self.root = Some(Root::Directory);
                }
                sink.directory(&self.path)?;
                self.last_names.push(None);
                EntryOrClose
            }
            RegularAttr if is("executable") => ExecutableEmpty,
            RegularAttr if is("contents") => ContentsLen,
            ExecutableEmpty if t.is_empty() => {
                self.executable = true;
                Contents
            }
            Contents if is("contents") => ContentsLen,
            TargetKw if is("target") => Target,
            Target => {
                if t.is_empty() || t.contains(&0) {
                    return Err(bad(format!(
                        "symlink {:?} has an empty target or one containing NUL",
                        self.path.join("/")
                    )));
                }
                self.symlinks += 1;
                if self.path.is_empty() {
                    self.root = Some(Root::Symlink);
                }
                sink.symlink(&self.path, &t)?;
                NodeClose
            }
            NodeClose if is(")") => self.node_done(),
            EntryOrClose if is(")") => {
                self.last_names.pop();
                self.node_done()
            }
            EntryOrClose if is("entry") => EntryOpen,
            EntryOpen if is("(") => NameKw,
            NameKw if is("name") => Name,
            Name => {
                check_name(&t)?;
                let last = self.last_names.last_mut().expect("inside a directory");
                if let Some(prev) = last {
                    if t.as_slice() <= prev.as_slice() {
                        return Err(bad(format!(
                            "entry {:?} in {:?} is not after {:?}: entries must be sorted and unique",
                            String::from_utf8_lossy(&t),
                            self.path.join("/"),
                            String::from_utf8_lossy(prev)
                        )));
                    }
                }
                *last = Some(t.clone());
                if self.path.len() >= MAX_DEPTH {
                    return Err(bad(format!("deeper than {MAX_DEPTH} directories")));
                }
                // Nix allows any bytes; lre's sinks take names as text, so it refuses the rest.
                self.path.push(
                    String::from_utf8(t)
                        .map_err(|_| bad("an entry name that is not UTF-8 (lre refuses those)"))?,
                );
                NodeKw
            }
            NodeKw if is("node") => NodeOpen,
            EntryClose if is(")") => {
                self.path.pop();
                EntryOrClose
            }
            _ => return Err(unexpected(self)),
        };
        Ok(())
    }

    fn node_done(&mut self) -> Expect {
        if self.path.is_empty() {
            Expect::Done
        } else {
            Expect::EntryClose
        }
    }
}

fn check_name(name: &[u8]) -> Result<(), NarError> {
    let shown = String::from_utf8_lossy(name);
    if name.is_empty() || name == b"." || name == b".." {
        return Err(bad(format!("entry name {shown:?} is not allowed")));
    }
    if name.contains(&b'/') || name.contains(&0) {
        return Err(bad(format!(
            "entry name {shown:?} contains '/' or NUL (a path traversal?)"
        )));
    }
    Ok(())
}

/// Parses a whole NAR held in memory (tests, small NARs).
pub fn parse(nar: &[u8], sink: &mut impl NarSink) -> Result<NarSummary, NarError> {
    let mut p = NarParser::new(nar.len() as u64);
    p.feed(nar, sink)?;
    p.finish()
}

/// Writes NARs: tests and fuzzing build their inputs with it, and the worker's tests
/// compare against `nix-store --dump`.
pub mod write {
    pub fn string(out: &mut Vec<u8>, s: &[u8]) {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s);
        out.resize(out.len() + super::pad_of(s.len() as u64), 0);
    }

    pub fn strings(out: &mut Vec<u8>, ss: &[&[u8]]) {
        for s in ss {
            string(out, s);
        }
    }

    /// A directory node with these entries (name, node), in the order given: a test may
    /// give them unsorted or twice, to see them refused.
    pub fn directory(entries: &[(&str, Vec<u8>)]) -> Vec<u8> {
        let mut o = Vec::new();
        strings(&mut o, &[b"(", b"type", b"directory"]);
        for (name, node) in entries {
            strings(&mut o, &[b"entry", b"(", b"name", name.as_bytes(), b"node"]);
            o.extend_from_slice(node);
            strings(&mut o, &[b")"]);
        }
        strings(&mut o, &[b")"]);
        o
    }

    /// A regular file node.
    pub fn regular(contents: &[u8], executable: bool) -> Vec<u8> {
        let mut o = Vec::new();
        strings(&mut o, &[b"(", b"type", b"regular"]);
        if executable {
            strings(&mut o, &[b"executable", b""]);
        }
        strings(&mut o, &[b"contents", contents, b")"]);
        o
    }

    /// A symlink node.
    pub fn symlink(target: &str) -> Vec<u8> {
        let mut o = Vec::new();
        strings(
            &mut o,
            &[
                b"(",
                b"type",
                b"symlink",
                b"target",
                target.as_bytes(),
                b")",
            ],
        );
        o
    }

    /// A whole NAR: the header, then `root`.
    pub fn archive(root: Vec<u8>) -> Vec<u8> {
        let mut o = Vec::new();
        strings(&mut o, &[super::MAGIC]);
        o.extend_from_slice(&root);
        o
    }
}

#[cfg(test)]
mod tests {
    use super::write::{
        archive as nar, directory as dir, regular as file, strings, symlink as link,
    };
    use super::*;

    #[derive(Default)]
    struct Record(Vec<String>);
    impl NarSink for Record {
        fn directory(&mut self, p: &[String]) -> std::io::Result<()> {
            self.0.push(format!("d {}", p.join("/")));
            Ok(())
        }
        fn file(&mut self, p: &[String], x: bool, n: u64) -> std::io::Result<()> {
            self.0.push(format!("f {} {x} {n}", p.join("/")));
            Ok(())
        }
        fn file_data(&mut self, d: &[u8]) -> std::io::Result<()> {
            self.0.push(format!("+{}", String::from_utf8_lossy(d)));
            Ok(())
        }
        fn symlink(&mut self, p: &[String], t: &[u8]) -> std::io::Result<()> {
            self.0
                .push(format!("l {} {}", p.join("/"), String::from_utf8_lossy(t)));
            Ok(())
        }
    }

    #[test]
    fn parses_in_any_chunking_and_reports_each_entry() {
        let n = nar(dir(&[
            ("a", file(b"hello", false)),
            ("b", dir(&[("x", file(b"", true))])),
            ("c", link("../a")),
        ]));
        let whole = {
            let mut r = Record::default();
            let s = parse(&n, &mut r).unwrap();
            assert_eq!((s.files, s.directories, s.symlinks), (2, 2, 1));
            assert_eq!(s.nar_hash, NixHash::of(&n));
            assert_eq!(s.root, Root::Directory);
            r.0
        };
        assert_eq!(
            whole,
            [
                "d ",
                "f a false 5",
                "+hello",
                "d b",
                "f b/x true 0",
                "l c ../a"
            ]
        );
        for chunk in [1, 3, 7, 8, 13] {
            let mut p = NarParser::new(n.len() as u64);
            let mut r = Record::default();
            for c in n.chunks(chunk) {
                p.feed(c, &mut r).unwrap();
            }
            p.finish().unwrap();
            let joined: Vec<String> = r.0.into_iter().filter(|e| !e.starts_with('+')).collect();
            let expect: Vec<&String> = whole.iter().filter(|e| !e.starts_with('+')).collect();
            assert_eq!(joined.iter().collect::<Vec<_>>(), expect, "chunk {chunk}");
        }
    }

    #[test]
    fn a_single_file_root_reports_its_contents_hash() {
        let s = parse(&nar(file(b"hi there", true)), &mut Validate).unwrap();
        assert_eq!(
            s.root,
            Root::Regular {
                executable: true,
                contents: NixHash::of(b"hi there")
            }
        );
    }

    #[test]
    fn refuses_every_hostile_shape() {
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("traversal", nar(dir(&[("..", file(b"x", false))]))),
            ("dot", nar(dir(&[(".", file(b"x", false))]))),
            ("slash", nar(dir(&[("a/b", file(b"x", false))]))),
            ("nul", nar(dir(&[("a\0b", file(b"x", false))]))),
            (
                "duplicate",
                nar(dir(&[("a", file(b"x", false)), ("a", file(b"y", false))])),
            ),
            (
                "unsorted",
                nar(dir(&[("b", file(b"x", false)), ("a", file(b"y", false))])),
            ),
            ("empty target", nar(link(""))),
            ("no magic", file(b"x", false)),
            ("trailing", {
                let mut n = nar(file(b"x", false));
                n.extend_from_slice(&[0; 8]);
                n
            }),
            ("padding", {
                let mut n = nar(file(b"x", false));
                // The byte after "x" in the contents' padding.
                let at = n.len() - 16 - 7;
                n[at] = 1;
                n
            }),
            ("huge name", {
                let mut o = Vec::new();
                strings(
                    &mut o,
                    &[MAGIC, b"(", b"type", b"directory", b"entry", b"(", b"name"],
                );
                o.extend_from_slice(&u64::MAX.to_le_bytes());
                o
            }),
        ];
        for (what, n) in cases {
            let r = parse(&n, &mut Validate);
            assert!(r.is_err(), "{what} was accepted");
        }
        // Deep nesting stops at the bound.
        let mut deep = file(b"x", false);
        for _ in 0..=MAX_DEPTH {
            deep = dir(&[("d", deep)]);
        }
        let e = parse(&nar(deep), &mut Validate).unwrap_err().to_string();
        assert!(e.contains("deeper"), "{e}");
        // A file longer than what is left of the limit is refused before the sink hears of
        // it, whatever its length field says.
        let mut huge = Vec::new();
        strings(&mut huge, &[MAGIC, b"(", b"type", b"regular", b"contents"]);
        huge.extend_from_slice(&(u64::MAX - 3).to_le_bytes());
        let mut r = Record::default();
        let mut p = NarParser::new(1 << 30);
        let e = p.feed(&huge, &mut r).unwrap_err().to_string();
        assert!(e.contains("does not fit"), "{e}");
        assert!(r.0.is_empty(), "{:?}", r.0);
        // A refused parser stays refused.
        assert!(p.feed(b"more", &mut Validate).is_err());
        // A truncated NAR is not complete.
        let n = nar(file(b"hello", false));
        let mut p = NarParser::new(u64::MAX);
        p.feed(&n[..n.len() - 8], &mut Validate).unwrap();
        assert!(p.finish().unwrap_err().to_string().contains("truncated"));
        // The byte limit holds as bytes arrive, before the archive ends.
        let big = nar(file(&vec![7u8; 4096], false));
        let mut p = NarParser::new(1000);
        let e = big.chunks(512).try_for_each(|c| p.feed(c, &mut Validate));
        assert!(e.unwrap_err().to_string().contains("limit"));
    }
}
