//! The strict NAR parser (`lre_nix_formats::nar`), which the Nix binary cache runs over
//! every uploaded NAR and workers unpack through, and the narinfo parser. Input: one
//! byte choosing the chunk size, then a NAR; or `I` then a narinfo.
//! Invariants: no panic; chunking never changes the verdict or the summary; a NAR the
//! parser accepts is canonical, so re-writing the entries it reported gives back exactly
//! the input (hence nothing unreported, no second spelling of one tree); a narinfo that
//! parses renders to one that parses with the same fingerprint.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lre_nix_formats::nar::{self, write::strings, NarParser, NarSink};
use lre_nix_formats::NarInfo;

/// Re-writes the NAR from the parser's events.
struct Rewrite {
    out: Vec<u8>,
    /// Open directories, by depth (the root is depth 0).
    open: Vec<usize>,
    data: Vec<u8>,
}

impl Rewrite {
    /// Closes what is open deeper than `depth`, then opens the entry named last in `path`.
    fn enter(&mut self, path: &[String]) {
        while self.open.len() > path.len() {
            self.open.pop();
            strings(&mut self.out, &[b")", b")"]);
        }
        if let Some(name) = path.last() {
            strings(&mut self.out, &[b"entry", b"(", b"name", name.as_bytes(), b"node"]);
        }
    }
    fn finish(mut self) -> Vec<u8> {
        while self.open.pop().is_some() {
            strings(&mut self.out, &[b")"]);
            if !self.open.is_empty() {
                strings(&mut self.out, &[b")"]);
            }
        }
        self.out
    }
}

impl NarSink for Rewrite {
    fn directory(&mut self, path: &[String]) -> std::io::Result<()> {
        self.enter(path);
        strings(&mut self.out, &[b"(", b"type", b"directory"]);
        self.open.push(path.len());
        Ok(())
    }
    fn file(&mut self, path: &[String], executable: bool, _size: u64) -> std::io::Result<()> {
        self.enter(path);
        strings(&mut self.out, &[b"(", b"type", b"regular"]);
        if executable {
            strings(&mut self.out, &[b"executable", b""]);
        }
        self.data.clear();
        Ok(())
    }
    fn file_data(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.data.extend_from_slice(data);
        Ok(())
    }
    fn file_end(&mut self) -> std::io::Result<()> {
        let data = std::mem::take(&mut self.data);
        strings(&mut self.out, &[b"contents", &data, b")"]);
        if !self.open.is_empty() {
            strings(&mut self.out, &[b")"]);
        }
        Ok(())
    }
    fn symlink(&mut self, path: &[String], target: &[u8]) -> std::io::Result<()> {
        self.enter(path);
        strings(&mut self.out, &[b"(", b"type", b"symlink", b"target", target, b")"]);
        if !self.open.is_empty() {
            strings(&mut self.out, &[b")"]);
        }
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    if first == b'I' {
        if let Ok(text) = std::str::from_utf8(rest) {
            if let Ok(info) = NarInfo::parse(text) {
                let again = NarInfo::parse(&info.render_served()).expect("rendered narinfo parses");
                assert_eq!(again.fingerprint(), info.fingerprint());
            }
        }
        return;
    }
    let mut body = Vec::new();
    strings(&mut body, &[b"nix-archive-1"]);
    body.extend_from_slice(rest);

    let mut rewrite = Rewrite { out: Vec::new(), open: Vec::new(), data: Vec::new() };
    strings(&mut rewrite.out, &[b"nix-archive-1"]);
    let whole = nar::parse(&body, &mut rewrite);
    let chunk = (first as usize % 64) + 1;
    let mut p = NarParser::new(body.len() as u64);
    let chunked = body
        .chunks(chunk)
        .try_for_each(|c| p.feed(c, &mut nar::Validate))
        .map_err(|e| e.to_string())
        .and_then(|()| p.finish().map_err(|e| e.to_string()));
    match (&whole, &chunked) {
        (Ok(a), Ok(b)) => assert_eq!(a, b),
        (Err(_), Err(_)) => {}
        _ => panic!("chunks of {chunk} changed the verdict: {whole:?} vs {chunked:?}"),
    }
    if whole.is_ok() {
        assert_eq!(rewrite.finish(), body, "an accepted NAR is not canonical");
    }
});
