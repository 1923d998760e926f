//! `lre image build`: a toolchain's `/nix/store` closure as a reproducible OCI image layout.
//!
//! The same closure gives the same manifest digest on any machine at any time: layers are
//! tars with sorted entries, owner 0:0, a fixed mtime and hard links written as files,
//! gzipped without name or time; every JSON document is written with sorted keys (oci-spec
//! keeps labels and annotations in `HashMap`s, whose order is random, so its types are
//! turned into `serde_json::Value`s first); nothing records when or where it was built.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use oci_spec::image::{
    Arch, ConfigBuilder, Descriptor, DescriptorBuilder, ImageConfigurationBuilder,
    ImageIndexBuilder, ImageManifestBuilder, MediaType, Os, RootFsBuilder,
};
use sha2::{Digest as _, Sha256};

use crate::error::{io, Error, Result};
use crate::nix::PathInfo;

/// Every tar entry's mtime: 1, as Nix itself uses in the store.
const MTIME: u64 = 1;
pub const DEFAULT_MAX_LAYERS: usize = 100;
pub const LABEL_TOOLCHAIN: &str = "dev.lre.toolchain";
pub const LABEL_CLOSURE: &str = "dev.lre.closure";

pub struct ImageSpec {
    pub closure: Vec<PathInfo>,
    /// The toolchain Env, the image config's `Env`.
    pub env: Vec<String>,
    /// The `lre-worker` executable, inside the closure.
    pub worker: String,
    /// The closure identity the platform pins (`lre-closure:sha256:…`).
    pub identity: String,
    pub max_layers: usize,
    /// The tag in index.json's `org.opencontainers.image.ref.name`.
    pub tag: String,
}

pub struct Built {
    pub manifest_digest: String,
    pub layers: Vec<(Vec<String>, Descriptor)>,
    pub total_bytes: u64,
}

/// Store paths grouped into at most `max_layers - 1` layers (one more holds the worker's
/// runtime files). The most popular paths (those the most others depend on) get layers of
/// their own; the rest share the last. A toolchain update then changes few layers, as
/// nixpkgs' `dockerTools.streamLayeredImage` does.
pub fn group_layers(closure: &[PathInfo], max_layers: usize) -> Vec<Vec<String>> {
    let refs: BTreeMap<&str, Vec<&str>> = closure
        .iter()
        .map(|p| {
            (
                p.path.as_str(),
                p.references
                    .iter()
                    .map(String::as_str)
                    .filter(|r| *r != p.path)
                    .collect(),
            )
        })
        .collect();
    // popularity(p) = how many closure paths have p in their own closure.
    let mut popularity: BTreeMap<&str, usize> = refs.keys().map(|p| (*p, 0)).collect();
    for root in refs.keys() {
        let mut seen = BTreeSet::new();
        let mut stack = vec![*root];
        while let Some(p) = stack.pop() {
            if seen.insert(p) {
                *popularity.entry(p).or_default() += 1;
                stack.extend(refs.get(p).into_iter().flatten().copied());
            }
        }
    }
    let mut order: Vec<&str> = popularity.keys().copied().collect();
    order.sort_by(|a, b| popularity[b].cmp(&popularity[a]).then(a.cmp(b)));
    let own = max_layers.saturating_sub(2).max(1);
    let mut groups: Vec<Vec<String>> = order
        .iter()
        .take(own)
        .map(|p| vec![(*p).to_owned()])
        .collect();
    let rest: Vec<String> = order.iter().skip(own).map(|p| (*p).to_owned()).collect();
    if !rest.is_empty() {
        groups.push(rest);
    }
    groups
}

/// A writer that hashes and counts what passes through it.
struct Hashing<W> {
    inner: W,
    hash: Sha256,
    len: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn hashing<W>(inner: W) -> Hashing<W> {
    Hashing {
        inner,
        hash: Sha256::new(),
        len: 0,
    }
}

/// One layer, streamed to `blobs` as tar → gzip: its descriptor and its diff_id.
fn write_layer(
    blobs: &Path,
    fill: impl FnOnce(&mut tar::Builder<&mut dyn Write>) -> Result<()>,
) -> Result<(Descriptor, String)> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = blobs.join(format!(".layer-{}-{n}.tmp", std::process::id()));
    let file = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    // The gzip stream owns the compressed-side hasher, and hands it back on finish.
    let gz = flate2::GzBuilder::new().mtime(0).write(
        hashing(std::io::BufWriter::new(file)),
        flate2::Compression::new(6),
    );
    let mut raw = hashing(gz);
    {
        let mut builder = tar::Builder::new(&mut raw as &mut dyn Write);
        builder.mode(tar::HeaderMode::Deterministic);
        builder.follow_symlinks(false);
        fill(&mut builder)?;
        builder.finish().map_err(io(&tmp))?;
    }
    let diff_id = format!("sha256:{}", hex::encode(raw.hash.finalize_reset()));
    let Hashing { inner: gz, .. } = raw;
    let mut compressed = gz.finish().map_err(io(&tmp))?;
    compressed.flush().map_err(io(&tmp))?;
    let hex = hex::encode(compressed.hash.finalize_reset());
    let size = compressed.len;
    let dest = blobs.join(&hex);
    std::fs::rename(&tmp, &dest).map_err(io(&dest))?;
    let desc = descriptor(MediaType::ImageLayerGzip, &hex, size)?;
    Ok((desc, diff_id))
}

fn descriptor(media_type: MediaType, hex: &str, size: u64) -> Result<Descriptor> {
    let digest: oci_spec::image::Digest = format!("sha256:{hex}").parse().map_err(oci)?;
    DescriptorBuilder::default()
        .media_type(media_type)
        .digest(digest)
        .size(size)
        .build()
        .map_err(oci)
}

fn oci(e: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("OCI: {e}"))
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(MTIME);
    h
}

fn add_dir(b: &mut tar::Builder<&mut dyn Write>, name: &str, mode: u32) -> Result<()> {
    let mut h = header(tar::EntryType::Directory, mode, 0);
    b.append_data(&mut h, name, std::io::empty())
        .map_err(io(name))
}

fn add_file(
    b: &mut tar::Builder<&mut dyn Write>,
    name: &str,
    mode: u32,
    data: &[u8],
) -> Result<()> {
    let mut h = header(tar::EntryType::Regular, mode, data.len() as u64);
    b.append_data(&mut h, name, data).map_err(io(name))
}

/// A store path and everything below it, sorted by name. Modes are the store's (0444/0555,
/// or 0555 directories); hard links, which `nix-store --optimise` makes, become plain files.
fn add_tree(b: &mut tar::Builder<&mut dyn Write>, path: &Path) -> Result<()> {
    let meta = std::fs::symlink_metadata(path).map_err(io(path))?;
    let name = path.strip_prefix("/").unwrap_or(path);
    let ft = meta.file_type();
    if ft.is_symlink() {
        let target = std::fs::read_link(path).map_err(io(path))?;
        let mut h = header(tar::EntryType::Symlink, 0o777, 0);
        b.append_link(&mut h, name, &target).map_err(io(path))?;
    } else if ft.is_dir() {
        let mut h = header(tar::EntryType::Directory, 0o555, 0);
        b.append_data(&mut h, name, std::io::empty())
            .map_err(io(path))?;
        let mut children: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(io(path))?
            .map(|e| e.map(|e| e.path()))
            .collect::<std::io::Result<_>>()
            .map_err(io(path))?;
        children.sort();
        for c in children {
            add_tree(b, &c)?;
        }
    } else if ft.is_file() {
        use std::os::unix::fs::PermissionsExt;
        let mode = if meta.permissions().mode() & 0o111 != 0 {
            0o555
        } else {
            0o444
        };
        let mut h = header(tar::EntryType::Regular, mode, meta.len());
        let f = std::fs::File::open(path).map_err(io(path))?;
        b.append_data(&mut h, name, f).map_err(io(path))?;
    } else {
        return Err(Error::Invalid(format!(
            "{}: not a file, directory or symlink",
            path.display()
        )));
    }
    Ok(())
}

/// The small layer of files a worker needs besides the store: /tmp, a user, /bin/lre-worker,
/// and /etc/lre/closure, which lre-worker --image checks before offering the image.
fn add_runtime(
    b: &mut tar::Builder<&mut dyn Write>,
    worker: &str,
    closure: &[PathInfo],
    identity: &str,
) -> Result<()> {
    add_dir(b, "bin", 0o755)?;
    let mut h = header(tar::EntryType::Symlink, 0o777, 0);
    b.append_link(&mut h, "bin/lre-worker", worker)
        .map_err(io("bin/lre-worker"))?;
    add_dir(b, "etc", 0o755)?;
    add_file(b, "etc/group", 0o444, b"root:x:0:\nnogroup:x:65534:\n")?;
    add_dir(b, "etc/lre", 0o755)?;
    let list: String = closure.iter().map(|p| format!("{}\n", p.path)).collect();
    add_file(b, "etc/lre/closure", 0o444, list.as_bytes())?;
    add_file(
        b,
        "etc/lre/toolchain",
        0o444,
        format!("{identity}\n").as_bytes(),
    )?;
    add_file(
        b,
        "etc/passwd",
        0o444,
        b"root:x:0:0:root:/tmp:/bin/false\nnobody:x:65534:65534:nobody:/tmp:/bin/false\n",
    )?;
    let mut h = header(tar::EntryType::Directory, 0o1777, 0);
    b.append_data(&mut h, "tmp", std::io::empty())
        .map_err(io("tmp"))
}

/// Refuses what would take host files into the image.
pub fn check(spec: &ImageSpec) -> Result<()> {
    let mut bad = Vec::new();
    let paths: BTreeSet<&str> = spec.closure.iter().map(|p| p.path.as_str()).collect();
    for p in &paths {
        if !crate::toolchain::in_store(p) {
            bad.push(format!("closure path {p}"));
        }
    }
    match crate::nix::store_path_of(&spec.worker) {
        Some(sp) if paths.contains(sp) => {}
        _ => bad.push(format!(
            "worker {} (not inside the closure; build lre-worker with Nix and add it)",
            spec.worker
        )),
    }
    if bad.is_empty() {
        Ok(())
    } else {
        Err(Error::HostPaths(bad))
    }
}

/// Writes the OCI image layout into `out` (created; blobs already there are kept).
pub fn build(spec: &ImageSpec, out: &Path, progress: &(dyn Fn(&str, u64) + Sync)) -> Result<Built> {
    check(spec)?;
    let blobs = out.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).map_err(io(&blobs))?;
    // Compression dominates, so layers are written on every core; the order of the result
    // (and so the digest) does not depend on which finishes first.
    let groups = group_layers(&spec.closure, spec.max_layers);
    let next = std::sync::atomic::AtomicUsize::new(0);
    // One slot per layer: its descriptor and diff id, once written.
    type Slots = Vec<Option<Result<(Descriptor, String)>>>;
    let results: std::sync::Mutex<Slots> =
        std::sync::Mutex::new((0..groups.len()).map(|_| None).collect());
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(groups.len().max(1));
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(group) = groups.get(i) else { break };
                let r = write_layer(&blobs, |b| {
                    add_dir(b, "nix", 0o555)?;
                    add_dir(b, "nix/store", 0o555)?;
                    for p in group {
                        add_tree(b, Path::new(p))?;
                    }
                    Ok(())
                });
                if let Ok((desc, _)) = &r {
                    progress(&group.join(" "), desc.size());
                }
                results.lock().unwrap_or_else(|p| p.into_inner())[i] = Some(r);
            });
        }
    });
    let mut layers = Vec::new();
    let mut diff_ids = Vec::new();
    let results = results.into_inner().unwrap_or_else(|p| p.into_inner());
    for (group, r) in groups.into_iter().zip(results) {
        let (desc, diff_id) =
            r.ok_or_else(|| Error::Invalid("a layer was not written".into()))??;
        diff_ids.push(diff_id);
        layers.push((group, desc));
    }
    let (desc, diff_id) = write_layer(&blobs, |b| {
        add_runtime(b, &spec.worker, &spec.closure, &spec.identity)
    })?;
    progress(
        "worker runtime (/bin/lre-worker, /etc/passwd, /tmp)",
        desc.size(),
    );
    diff_ids.push(diff_id);
    layers.push((vec!["(worker runtime)".to_owned()], desc));

    let labels = std::collections::HashMap::from([
        (LABEL_TOOLCHAIN.to_owned(), spec.identity.clone()),
        (
            LABEL_CLOSURE.to_owned(),
            spec.closure
                .iter()
                .map(|p| p.path.as_str())
                .collect::<Vec<_>>()
                .join(" "),
        ),
    ]);
    let config = ImageConfigurationBuilder::default()
        .architecture(Arch::Amd64)
        .os(Os::Linux)
        .config(
            ConfigBuilder::default()
                .env(spec.env.clone())
                .entrypoint(vec!["/bin/lre-worker".to_owned()])
                .labels(labels)
                .build()
                .map_err(oci)?,
        )
        .rootfs(
            RootFsBuilder::default()
                .typ("layers")
                .diff_ids(diff_ids)
                .build()
                .map_err(oci)?,
        )
        .build()
        .map_err(oci)?;
    let config_desc = write_json(&blobs, MediaType::ImageConfig, &config)?;
    let manifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(config_desc)
        .layers(layers.iter().map(|(_, d)| d.clone()).collect::<Vec<_>>())
        .build()
        .map_err(oci)?;
    let mut manifest_desc = write_json(&blobs, MediaType::ImageManifest, &manifest)?;
    let manifest_digest = manifest_desc.digest().to_string();
    manifest_desc.set_annotations(Some(std::collections::HashMap::from([(
        "org.opencontainers.image.ref.name".to_owned(),
        spec.tag.clone(),
    )])));
    let index = ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageIndex)
        .manifests(vec![manifest_desc])
        .build()
        .map_err(oci)?;
    write_file(&out.join("index.json"), &canonical_json(&index)?)?;
    write_file(
        &out.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    let total_bytes = layers.iter().map(|(_, d)| d.size()).sum();
    Ok(Built {
        manifest_digest,
        layers,
        total_bytes,
    })
}

/// JSON with sorted keys: the same value always gives the same bytes.
fn canonical_json(value: &impl serde::Serialize) -> Result<Vec<u8>> {
    let v = serde_json::to_value(value).map_err(oci)?;
    serde_json::to_vec(&v).map_err(oci)
}

fn write_json(
    blobs: &Path,
    media_type: MediaType,
    value: &impl serde::Serialize,
) -> Result<Descriptor> {
    let bytes = canonical_json(value)?;
    let hex = hex::encode(Sha256::digest(&bytes));
    write_file(&blobs.join(&hex), &bytes)?;
    descriptor(media_type, &hex, bytes.len() as u64)
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("lre-tmp");
    std::fs::write(&tmp, bytes).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(path: &str, refs: &[&str]) -> PathInfo {
        PathInfo {
            path: path.into(),
            nar_hash: None,
            nar_size: None,
            references: refs.iter().map(|r| (*r).to_owned()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn popular_paths_get_their_own_layers() {
        // glibc is needed by all three, zig by the wrapper only.
        let closure = vec![
            info("/nix/store/a-glibc", &["/nix/store/a-glibc"]),
            info("/nix/store/b-zig", &["/nix/store/a-glibc"]),
            info(
                "/nix/store/c-wrapper",
                &["/nix/store/b-zig", "/nix/store/a-glibc"],
            ),
            info("/nix/store/d-java", &["/nix/store/a-glibc"]),
        ];
        let g = group_layers(&closure, 100);
        assert_eq!(g[0], vec!["/nix/store/a-glibc"]);
        assert_eq!(g[1], vec!["/nix/store/b-zig"]);
        assert_eq!(g.len(), 4);
        let small = group_layers(&closure, 3);
        assert_eq!(
            small,
            vec![
                vec!["/nix/store/a-glibc".to_string()],
                vec![
                    "/nix/store/b-zig".into(),
                    "/nix/store/c-wrapper".into(),
                    "/nix/store/d-java".into()
                ]
            ]
        );
    }

    #[test]
    fn host_paths_and_a_worker_outside_the_closure_are_refused() {
        let spec = ImageSpec {
            closure: vec![info("/nix/store/a-cc", &[]), info("/usr/lib", &[])],
            env: vec![],
            worker: "/usr/local/bin/lre-worker".into(),
            identity: String::new(),
            max_layers: 10,
            tag: "t".into(),
        };
        let msg = check(&spec).unwrap_err().to_string();
        assert!(
            msg.contains("closure path /usr/lib")
                && msg.contains("worker /usr/local/bin/lre-worker"),
            "{msg}"
        );
    }

    #[test]
    fn a_layer_is_the_same_bytes_whatever_the_file_times_and_owners() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        std::fs::create_dir_all(tree.join("bin")).unwrap();
        std::fs::write(tree.join("bin/tool"), b"#!/bin/sh\n").unwrap();
        std::fs::write(tree.join("a.txt"), b"a").unwrap();
        std::os::unix::fs::symlink("bin/tool", tree.join("link")).unwrap();
        std::fs::hard_link(tree.join("a.txt"), tree.join("b.txt")).unwrap();
        let blobs = dir.path().join("blobs");
        std::fs::create_dir_all(&blobs).unwrap();
        let layer = |blobs: &Path| write_layer(blobs, |b| add_tree(b, &tree)).unwrap();
        let (d1, id1) = layer(&blobs);
        let f = std::fs::File::options()
            .write(true)
            .open(tree.join("a.txt"))
            .unwrap();
        f.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(3600))
            .unwrap();
        let (d2, id2) = layer(&blobs);
        assert_eq!((d1.digest(), &id1), (d2.digest(), &id2));
        // The hard link is a second regular file, so unpacking needs no link support.
        let bytes = std::fs::read(blobs.join(d1.digest().digest())).unwrap();
        let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(&bytes[..]));
        let kinds: Vec<(String, tar::EntryType, u64)> = ar
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let h = e.header();
                (
                    e.path()
                        .unwrap()
                        .file_name()
                        .unwrap()
                        .to_string_lossy()
                        .into_owned(),
                    h.entry_type(),
                    h.mtime().unwrap(),
                )
            })
            .collect();
        let names: Vec<&str> = kinds.iter().map(|k| k.0.as_str()).collect();
        assert_eq!(names, ["tree", "a.txt", "b.txt", "bin", "tool", "link"]);
        assert_eq!(kinds[2].1, tar::EntryType::Regular);
        assert_eq!(kinds[5].1, tar::EntryType::Symlink);
        assert!(kinds.iter().all(|k| k.2 == MTIME));
    }
}
