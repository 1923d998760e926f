//! Differential tests: every format this crate reads or writes, checked against what the
//! real `nix` CLI (2.8, `nix-bin`) produces for the same input. They need Nix installed
//! and a writable `/nix/store` (they add a few small paths to it).

use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;
use std::process::Command;

use lre_nix_formats::content_address::ContentAddress;
use lre_nix_formats::nar::{self, NarSink, Root, Validate};
use lre_nix_formats::{nixbase32, NarInfo, NixHash, PublicKey, SecretKey, StorePath};

fn nix(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .env(
            "NIX_CONFIG",
            "experimental-features = nix-command\nsandbox = false\nflake-registry =\n",
        )
        .output()
        .unwrap_or_else(|e| panic!("running {program} (is nix-bin installed?): {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

fn dump(path: &Path) -> Vec<u8> {
    let out = Command::new("nix-store")
        .arg("--dump")
        .arg(path)
        .output()
        .expect("nix-store --dump");
    assert!(out.status.success());
    out.stdout
}

#[test]
fn nixbase32_matches_nix_hash() {
    let hashes: Vec<[u8; 32]> = (0u8..8)
        .map(|i| *NixHash::of(&[i; 3]).0.as_ref().first_chunk().unwrap())
        .collect();
    let mut args = vec!["--type", "sha256", "--to-base32"];
    let hexes: Vec<String> = hashes.iter().map(hex::encode).collect();
    args.extend(hexes.iter().map(String::as_str));
    let theirs = nix("nix-hash", &args);
    let ours: Vec<String> = hashes.iter().map(|h| nixbase32::encode(h)).collect();
    assert_eq!(theirs.lines().collect::<Vec<_>>(), ours);
    for (h, s) in hashes.iter().zip(&ours) {
        assert_eq!(nixbase32::decode(s, 32).unwrap(), h);
    }
}

/// Records each entry the parser reports, as `kind path [exec size | target]`.
#[derive(Default)]
struct Listing(Vec<String>);
impl NarSink for Listing {
    fn directory(&mut self, p: &[String]) -> std::io::Result<()> {
        self.0.push(format!("d /{}", p.join("/")));
        Ok(())
    }
    fn file(&mut self, p: &[String], x: bool, n: u64) -> std::io::Result<()> {
        self.0.push(format!("f /{} {x} {n}", p.join("/")));
        Ok(())
    }
    fn symlink(&mut self, p: &[String], t: &[u8]) -> std::io::Result<()> {
        self.0
            .push(format!("l /{} {}", p.join("/"), String::from_utf8_lossy(t)));
        Ok(())
    }
}

/// The same listing from the file system, in NAR order (names sorted bytewise).
fn walk(root: &Path, rel: &str, out: &mut Vec<String>) {
    let meta = std::fs::symlink_metadata(root).unwrap();
    if meta.file_type().is_symlink() {
        let t = std::fs::read_link(root).unwrap();
        out.push(format!("l {rel} {}", t.display()));
    } else if meta.is_dir() {
        out.push(format!("d {rel}"));
        let mut names: Vec<String> = std::fs::read_dir(root)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        for n in names {
            let child = if rel == "/" {
                format!("/{n}")
            } else {
                format!("{rel}/{n}")
            };
            walk(&root.join(&n), &child, out);
        }
    } else {
        let x = meta.permissions().mode() & 0o100 != 0;
        out.push(format!("f {rel} {x} {}", meta.len()));
    }
}

#[test]
fn nar_parser_reads_what_nix_store_dump_writes() {
    let d = tempfile::tempdir().unwrap();
    let t = d.path().join("tree");
    std::fs::create_dir_all(t.join("bin")).unwrap();
    std::fs::create_dir_all(t.join("share/empty")).unwrap();
    std::fs::create_dir_all(t.join("lib/deep/er")).unwrap();
    std::fs::write(t.join("bin/tool"), b"#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(t.join("bin/tool"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(t.join("lib/empty"), b"").unwrap();
    std::fs::write(t.join("lib/eight"), b"12345678").unwrap();
    std::fs::write(t.join("lib/nine"), b"123456789").unwrap();
    std::fs::write(t.join("lib/deep/er/big"), vec![0xa5u8; 100_003]).unwrap();
    std::fs::write(t.join("B-upper"), b"sorts before lower case").unwrap();
    symlink("../lib/nine", t.join("bin/link")).unwrap();
    symlink("/nonexistent/absolute", t.join("abs")).unwrap();

    let bytes = dump(&t);
    let mut listing = Listing::default();
    let summary = nar::parse(&bytes, &mut listing).unwrap();
    let mut expect = Vec::new();
    walk(&t, "/", &mut expect);
    assert_eq!(listing.0, expect);
    assert_eq!(summary.nar_size, bytes.len() as u64);
    let theirs = nix(
        "nix-hash",
        &["--type", "sha256", "--base32", t.to_str().unwrap()],
    );
    assert_eq!(summary.nar_hash.base32(), theirs.trim());
    // Chunked as a network delivers it.
    let mut p = nar::NarParser::new(u64::MAX);
    for c in bytes.chunks(4093) {
        p.feed(c, &mut Validate).unwrap();
    }
    assert_eq!(p.finish().unwrap(), summary);

    // A single file as the root.
    let file = d.path().join("single");
    std::fs::write(&file, b"just one file").unwrap();
    let s = nar::parse(&dump(&file), &mut Validate).unwrap();
    assert_eq!(
        s.root,
        Root::Regular {
            executable: false,
            contents: NixHash::of(b"just one file")
        }
    );
}

fn path_info(path: &str) -> serde_json_lite::Info {
    serde_json_lite::parse(&nix("nix", &["path-info", "--json", path]))
}

/// `nix path-info --json` read with string searches: the crate needs no JSON parser, and
/// these fields are flat strings.
mod serde_json_lite {
    pub struct Info {
        pub nar_hash: String,
        pub ca: Option<String>,
        pub references: Vec<String>,
    }

    fn field<'a>(json: &'a str, key: &str) -> Option<&'a str> {
        let at = json.find(&format!("\"{key}\":"))? + key.len() + 3;
        let rest = &json[at..];
        if let Some(s) = rest.strip_prefix('"') {
            return s.split('"').next();
        }
        rest.strip_prefix('[').and_then(|s| s.split(']').next())
    }

    pub fn parse(json: &str) -> Info {
        Info {
            nar_hash: field(json, "narHash").expect("narHash").to_string(),
            ca: field(json, "ca").map(str::to_string),
            references: field(json, "references")
                .unwrap_or("")
                .split(',')
                .map(|s| s.trim().trim_matches('"').to_string())
                .filter(|s| !s.is_empty())
                .collect(),
        }
    }
}

fn check_ca(path: &str) -> ContentAddress {
    let info = path_info(path);
    let ca = ContentAddress::parse(info.ca.as_deref().expect("a content-addressed path")).unwrap();
    let sp = StorePath::parse(path).unwrap();
    let refs: Vec<StorePath> = info
        .references
        .iter()
        .map(|r| StorePath::parse(r).unwrap())
        .collect();
    let summary = nar::parse(&dump(Path::new(path)), &mut Validate).unwrap();
    assert_eq!(summary.nar_hash, NixHash::parse(&info.nar_hash).unwrap());
    ca.verify(&sp, &refs, &summary.nar_hash, &summary.root)
        .unwrap_or_else(|e| panic!("{path}: {e}"));
    // The same content under another name is not this address.
    let renamed = StorePath::from_base_name(&format!("{}-renamed", sp.hash_part())).unwrap();
    assert!(ca
        .verify(&renamed, &refs, &summary.nar_hash, &summary.root)
        .is_err());
    ca
}

#[test]
fn content_addresses_are_computed_as_nix_computes_them() {
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("lre-ca-flat");
    std::fs::write(&f, b"flat content for lre's CA test\n").unwrap();
    let dir = d.path().join("lre-ca-dir");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("x"), b"x").unwrap();

    let source = nix("nix-store", &["--add", dir.to_str().unwrap()]);
    assert!(matches!(
        check_ca(source.trim()),
        ContentAddress::Recursive(_)
    ));
    let flat = nix("nix-store", &["--add-fixed", "sha256", f.to_str().unwrap()]);
    assert!(matches!(check_ca(flat.trim()), ContentAddress::Flat(_)));
    let rec = nix(
        "nix-store",
        &["--add-fixed", "--recursive", "sha256", f.to_str().unwrap()],
    );
    assert!(matches!(check_ca(rec.trim()), ContentAddress::Recursive(_)));
    // builtins.toFile makes text paths, here one that refers to another.
    let text = nix(
        "nix-instantiate",
        &[
            "--eval",
            "--read-write-mode",
            "-E",
            r#"builtins.toFile "lre-ca-text" "refers to ${builtins.toFile "lre-ca-inner" "inner"}""#,
        ],
    );
    let text = text.trim().trim_matches('"');
    assert_eq!(path_info(text).references.len(), 1);
    assert!(matches!(check_ca(text), ContentAddress::Text(_)));
}

#[test]
fn signatures_match_nix_copy_byte_for_byte() {
    let d = tempfile::tempdir().unwrap();
    let (sk, pk) = (d.path().join("sk"), d.path().join("pk"));
    nix(
        "nix-store",
        &[
            "--generate-binary-cache-key",
            "lre-test-1",
            sk.to_str().unwrap(),
            pk.to_str().unwrap(),
        ],
    );
    // A path with a reference, so the fingerprint's reference list is compared too.
    let path = nix(
        "nix-instantiate",
        &[
            "--eval",
            "--read-write-mode",
            "-E",
            r#"builtins.toFile "lre-sig-test" "signed, refers to ${builtins.toFile "lre-sig-dep" "dep"}""#,
        ],
    );
    let path = path.trim().trim_matches('"');
    let cache = d.path().join("cache");
    nix(
        "nix",
        &[
            "copy",
            "--to",
            &format!(
                "file://{}?compression=none&secret-key={}",
                cache.display(),
                sk.display()
            ),
            path,
        ],
    );
    let sp = StorePath::parse(path).unwrap();
    let text = std::fs::read_to_string(cache.join(format!("{}.narinfo", sp.hash_part()))).unwrap();
    let info = NarInfo::parse(&text).unwrap();
    assert_eq!(info.store_path, sp);
    assert_eq!(info.references.len(), 1, "{text}");
    let pk = PublicKey::parse(&std::fs::read_to_string(&pk).unwrap()).unwrap();
    let sig = info
        .sigs
        .iter()
        .find(|s| s.name == "lre-test-1")
        .expect("signed");
    assert!(pk.verifies(&info.fingerprint(), sig));
    let ours = SecretKey::parse(&std::fs::read_to_string(&sk).unwrap())
        .unwrap()
        .sign(&info.fingerprint());
    assert_eq!(&ours, sig);
    // The NAR nix wrote is the one the parser accepts, with the narinfo's hash.
    let nar = std::fs::read(cache.join(&info.url)).unwrap();
    let s = nar::parse(&nar, &mut Validate).unwrap();
    assert_eq!((s.nar_hash, s.nar_size), (info.nar_hash, info.nar_size));
}
