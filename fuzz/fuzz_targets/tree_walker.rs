//! The Directory/Tree walkers, over trees of Directory messages built from the input (plus
//! arbitrary bytes stored as blobs, which the walkers must decode):
//!
//! - the worker's `materialize::expanded_size` (the bounded expansion of an input root,
//!   directory bombs included) against a plain recursive count;
//! - the server's GetTree (`CasService::get_tree`: breadth-first, each directory once,
//!   missing ones left out, paged) against a model of the CAS;
//! - the server's action-cache completeness check (what a result references is found from
//!   its output Trees when it is written, and looked up on every read): a write refused
//!   when a Tree is missing or names a malformed digest, and a hit only when every
//!   referenced blob is present;
//! - the Remote Asset API's whole-tree check (`asset::memory::tree_missing`).
#![no_main]

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, OnceLock};

use arbitrary::Arbitrary;
use bazel_remote_apis::build::bazel::remote::execution::v2::{
    self as re, content_addressable_storage_server::ContentAddressableStorage, ActionResult,
    Directory, DirectoryNode, FileNode, GetTreeRequest, OutputDirectory, OutputFile, SymlinkNode,
    Tree,
};
use futures::StreamExt;
use libfuzzer_sys::fuzz_target;
use lre_server::auth::Authenticator;
use lre_server::cas::CasService;
use lre_server::context::ServerContext;
use lre_server::digest::{Digest, DigestFunction};
use lre_server::instance::Instances;
use lre_server::metrics::Metrics;
use lre_server::store::MemStore;
use lre_worker::materialize::{expanded_size, MAX_INPUT_DEPTH, MAX_INPUT_ENTRIES};
use prost::Message;
use sha2::{Digest as _, Sha256};

/// The tree walkers run under SHA-256 (the BLAKE3 paths share their code).
const SHA256: DigestFunction = DigestFunction::Sha256;

#[derive(Arbitrary, Debug)]
struct Input {
    /// Built in order; a directory names only earlier ones (content hashes admit no cycle).
    dirs: Vec<DirSpec>,
    /// Arbitrary bytes, stored (or not) as blobs.
    raw: Vec<(bool, Vec<u8>)>,
    /// Levels put on top of the root: (levels, how many times each names the one below).
    /// Deep chains and directory bombs.
    wraps: Vec<(u16, u8)>,
    root: Ref,
    page_size: i16,
    token: Token,
    outputs: Vec<Output>,
    action: [u8; 32],
    /// Which of the server's walkers this input checks.
    check: u8,
}

#[derive(Arbitrary, Debug)]
struct DirSpec {
    stored: bool,
    files: Vec<Ref>,
    symlinks: u8,
    children: Vec<Ref>,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Ref {
    Dir(u16),
    Prev,
    Raw(u8),
    WrongSize(u16),
    Empty,
    Absent(u8),
    Malformed(u8),
    NoDigest,
}

#[derive(Arbitrary, Debug)]
enum Token {
    None,
    Index(u16),
    Text(String),
}

#[derive(Arbitrary, Debug)]
enum Output {
    File(Ref),
    Stdout(Ref),
    Tree {
        root: Ref,
        children: Vec<Ref>,
        stored: bool,
    },
}

const MAX_DIRS: usize = 16;

/// Hex without `hex`'s iterator chain: every compare in the fuzz build is traced, and hex
/// encoding the digests of deep trees was most of their time.
fn hex_fast(h: &[u8; 32]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = Vec::with_capacity(64);
    for b in h {
        out.push(HEX[(b >> 4) as usize]);
        out.push(HEX[(b & 15) as usize]);
    }
    // SAFETY: ASCII hex digits.
    unsafe { String::from_utf8_unchecked(out) }
}

fn proto_of(data: &[u8]) -> re::Digest {
    re::Digest {
        hash: hex_fast(&Sha256::digest(data).into()),
        size_bytes: data.len() as i64,
    }
}
const MAX_WRAP_LEVELS: usize = 300;

struct World {
    /// The CAS: hash → content, as stored.
    cas: HashMap<[u8; 32], Vec<u8>>,
    dirs: Vec<(re::Digest, Directory)>,
    raw: Vec<(re::Digest, Vec<u8>)>,
    /// A chain deeper than the worker's bound was put on top.
    deep: bool,
}

impl World {
    fn resolve(&self, r: Ref, built: usize) -> Option<re::Digest> {
        let absent = || proto_of(b"absent");
        Some(match r {
            Ref::Dir(i) if built > 0 => self.dirs[i as usize % built].0.clone(),
            Ref::Prev if built > 0 => self.dirs[built - 1].0.clone(),
            Ref::WrongSize(i) if built > 0 => {
                let mut d = self.dirs[i as usize % built].0.clone();
                d.size_bytes += 1;
                d
            }
            Ref::Dir(_) | Ref::Prev | Ref::WrongSize(_) => absent(),
            Ref::Raw(i) if !self.raw.is_empty() => self.raw[i as usize % self.raw.len()].0.clone(),
            Ref::Raw(_) => absent(),
            Ref::Empty => Digest::EMPTY.to_proto(),
            Ref::Absent(b) => proto_of(&[b, 0xff]),
            Ref::Malformed(b) => {
                let good = proto_of(&[b]);
                match b % 4 {
                    0 => re::Digest {
                        hash: good.hash.to_uppercase(),
                        ..good
                    },
                    1 => re::Digest {
                        size_bytes: -1 - b as i64,
                        ..good
                    },
                    2 => re::Digest {
                        hash: good.hash[1..].to_string(),
                        ..good
                    },
                    _ => re::Digest {
                        hash: format!("{}/", &good.hash[1..]),
                        ..good
                    },
                }
            }
            Ref::NoDigest => return None,
        })
    }

    /// The Directory a ref names, for building Tree messages.
    fn message(&self, r: Ref) -> Directory {
        let n = self.dirs.len();
        match r {
            Ref::Dir(i) | Ref::WrongSize(i) if n > 0 => self.dirs[i as usize % n].1.clone(),
            Ref::Prev if n > 0 => self.dirs[n - 1].1.clone(),
            Ref::Raw(i) if !self.raw.is_empty() => {
                Directory::decode(&self.raw[i as usize % self.raw.len()].1[..]).unwrap_or_default()
            }
            _ => Directory::default(),
        }
    }

    fn store(&mut self, data: &[u8]) {
        if !data.is_empty() {
            self.cas.insert(Digest::of(data).hash, data.to_vec());
        }
    }

    /// What the CAS serves for `d`: the empty blob always, others only at their own size.
    fn present(&self, d: &Digest) -> Option<&[u8]> {
        if d.is_empty_blob() {
            return Some(&[][..]);
        }
        self.cas
            .get(&d.hash)
            .filter(|b| b.len() as u64 == d.size)
            .map(|b| &b[..])
    }

    fn present_proto(&self, d: &re::Digest) -> bool {
        Digest::from_proto(SHA256, d).is_ok_and(|d| self.present(&d).is_some())
    }
}

fn build(input: &Input) -> (World, Option<re::Digest>) {
    let mut w = World {
        cas: HashMap::new(),
        dirs: Vec::new(),
        raw: Vec::new(),
        deep: false,
    };
    for (stored, bytes) in input.raw.iter().take(3) {
        let bytes = &bytes[..bytes.len().min(128)];
        if *stored {
            w.store(bytes);
        }
        w.raw.push((proto_of(bytes), bytes.to_vec()));
    }
    for (i, spec) in input.dirs.iter().take(MAX_DIRS).enumerate() {
        let mut dir = Directory::default();
        for (k, f) in spec.files.iter().take(2).enumerate() {
            dir.files.push(FileNode {
                name: format!("f{k}"),
                digest: w.resolve(*f, i),
                ..Default::default()
            });
        }
        for k in 0..spec.symlinks % 4 {
            dir.symlinks.push(SymlinkNode {
                name: format!("s{k}"),
                target: "t".into(),
                ..Default::default()
            });
        }
        for (k, c) in spec.children.iter().take(3).enumerate() {
            dir.directories.push(DirectoryNode {
                name: format!("d{k}"),
                digest: w.resolve(*c, i),
            });
        }
        let raw = dir.encode_to_vec();
        if spec.stored {
            w.store(&raw);
        }
        w.dirs.push((proto_of(&raw), dir));
    }
    let mut root = w.resolve(input.root, w.dirs.len());
    let mut levels = 0;
    let mut deep = false;
    for &(count, fanout) in input.wraps.iter().take(3) {
        // Mostly a few levels (bombs of up to 3^33 paths); one time in 64 (once) a chain
        // about MAX_INPUT_DEPTH (256) long, just under or over the worker's bound.
        let (n, fanout) = match count % 64 {
            0 if !deep => {
                deep = true;
                (MAX_INPUT_DEPTH as u16 - 3 + (count >> 6) % 8, 1)
            }
            _ => (count % 12, fanout % 3 + 1),
        };
        for _ in 0..n {
            if levels == MAX_WRAP_LEVELS {
                break;
            }
            levels += 1;
            let dir = Directory {
                directories: (0..fanout)
                    .map(|k| DirectoryNode {
                        name: format!("w{k}"),
                        digest: root.clone(),
                    })
                    .collect(),
                ..Default::default()
            };
            let raw = dir.encode_to_vec();
            w.store(&raw);
            root = Some(proto_of(&raw));
            w.dirs.push((root.clone().unwrap(), dir));
        }
    }
    w.deep = levels > 64;
    (w, root)
}

// ---- the worker: expanded_size ----

/// Plain recursion over the DAG: exact counts (saturating), None if any directory is missing.
fn reference_size(
    dirs: &HashMap<String, Directory>,
    hash: &str,
    memo: &mut HashMap<String, Option<(u64, u64)>>,
) -> Option<(u64, u64)> {
    if let Some(v) = memo.get(hash) {
        return *v;
    }
    let v = (|| {
        let dir = dirs.get(hash)?;
        let mut entries = (dir.files.len() + dir.symlinks.len() + dir.directories.len()) as u64;
        let mut depth = 0;
        for sub in &dir.directories {
            if let Some(d) = &sub.digest {
                let (e, dd) = reference_size(dirs, &d.hash, memo)?;
                entries = entries.saturating_add(e);
                depth = depth.max(dd);
            }
        }
        Some((entries, depth + 1))
    })();
    memo.insert(hash.to_string(), v);
    v
}

fn check_worker(w: &World, root: &Option<re::Digest>) {
    // What the worker's fetch_tree hands over: every directory it could fetch, by hash.
    let mut dirs: HashMap<String, Directory> = HashMap::new();
    dirs.insert(Digest::EMPTY.hex(), Directory::default());
    for (h, data) in &w.cas {
        if let Ok(d) = Directory::decode(&data[..]) {
            dirs.insert(hex_fast(h), d);
        }
    }
    let root_hash = root.as_ref().map(|d| d.hash.clone()).unwrap_or_default();
    let got = expanded_size(&dirs, &root_hash);
    let want = reference_size(&dirs, &root_hash, &mut HashMap::new());
    match (got, want) {
        (Ok(got), Some((e, d))) => assert_eq!(
            got,
            (e.min(MAX_INPUT_ENTRIES + 1), d.min(MAX_INPUT_DEPTH + 1)),
            "expanded_size"
        ),
        (Err(_), None) => {}
        (got, want) => panic!("expanded_size gave {got:?}, the reference {want:?}"),
    }
}

// ---- the server: GetTree and the action cache's completeness check ----

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    })
}

fn new_cache() -> Arc<ServerContext> {
    static METRICS: OnceLock<Arc<Metrics>> = OnceLock::new();
    let metrics = METRICS.get_or_init(|| Arc::new(Metrics::new())).clone();
    let store: Arc<dyn lre_server::store::BlobStore> =
        Arc::new(MemStore::new(1 << 30, metrics.store.clone()));
    Arc::new(ServerContext {
        action_results: lre_server::context::checked_results(
            store.clone(),
            store.clone(),
            metrics.clone(),
        ),
        store,
        metrics,
        instances: Instances::new(None),
        auth: Authenticator::open(),
        max_batch_total_size_bytes: 4 << 20,
        activity: lre_server::activity::Activity::new(Default::default()),
    })
}

/// GetTree's contract: every directory reachable from the root, breadth first, each once;
/// missing ones are left out; a blob that is not a Directory, or a malformed child digest,
/// is an error.
fn model_tree(w: &World, root: Digest) -> Option<Vec<Directory>> {
    let mut out = Vec::new();
    let mut seen = HashSet::from([root]);
    let mut queue = VecDeque::from([root]);
    while let Some(d) = queue.pop_front() {
        let Some(raw) = w.present(&d) else { continue };
        let dir = Directory::decode(raw).ok()?;
        for c in &dir.directories {
            if let Some(cd) = Digest::from_opt_proto(SHA256, &c.digest).ok()? {
                if seen.insert(cd) {
                    queue.push_back(cd);
                }
            }
        }
        out.push(dir);
    }
    Some(out)
}

async fn get_tree(
    svc: &CasService,
    root: &Option<re::Digest>,
    page_size: i32,
    token: String,
) -> Option<Vec<re::GetTreeResponse>> {
    let req = GetTreeRequest {
        root_digest: root.clone(),
        page_size,
        page_token: token,
        ..Default::default()
    };
    let resp = svc.get_tree(tonic::Request::new(req)).await.ok()?;
    let pages: Vec<_> = resp.into_inner().collect().await;
    Some(
        pages
            .into_iter()
            .map(|p| p.expect("a page failed"))
            .collect(),
    )
}

fn check_pages(pages: &[re::GetTreeResponse], want: &[Directory], start: usize, size: usize) {
    assert!(!pages.is_empty(), "GetTree sent no page");
    let mut at = start;
    for (i, p) in pages.iter().enumerate() {
        assert!(
            p.directories.len() <= size,
            "a page of {} > {size}",
            p.directories.len()
        );
        assert!(
            !p.directories.is_empty() || pages.len() == 1,
            "an empty page among several"
        );
        assert_eq!(
            Some(&p.directories[..]),
            want.get(at..at + p.directories.len()),
            "page {i}"
        );
        at += p.directories.len();
        let last = i == pages.len() - 1;
        let next = if last { String::new() } else { at.to_string() };
        assert_eq!(p.next_page_token, next, "page {i}'s token");
    }
    assert_eq!(at, want.len(), "GetTree left directories out");
}

async fn check_get_tree(
    w: &World,
    cache: &Arc<ServerContext>,
    input: &Input,
    root: &Option<re::Digest>,
) {
    let svc = CasService::new(cache.clone());
    let token = match &input.token {
        Token::None => String::new(),
        Token::Index(i) => i.to_string(),
        Token::Text(t) => t.clone(),
    };
    let page_size = input.page_size as i32;
    let got = get_tree(&svc, root, page_size, token.clone()).await;

    let want = (|| {
        let root = Digest::from_opt_proto(SHA256, root).ok()??;
        if page_size < 0 {
            return None;
        }
        let start: usize = match token.as_str() {
            "" => 0,
            t => t.parse().ok()?,
        };
        let dirs = model_tree(w, root)?;
        (start <= dirs.len()).then_some((dirs, start))
    })();
    let size = match page_size {
        0 => 1000,
        n => (n as usize).min(10_000),
    };
    match (&got, &want) {
        (Some(pages), Some((dirs, start))) => {
            check_pages(pages, dirs, *start, size);
            // The first page's token resumes exactly where it stopped.
            let next = &pages[0].next_page_token;
            if !next.is_empty() {
                let rest = get_tree(&svc, root, page_size, next.clone()).await;
                let at: usize = next.parse().unwrap();
                check_pages(&rest.expect("resuming failed"), dirs, at, size);
            }
        }
        (None, None) => {}
        _ => panic!(
            "GetTree answered {:?}, the model {:?}",
            got.as_ref().map(|p| p.len()),
            want.as_ref().map(|(d, s)| (d.len(), s))
        ),
    }
}

enum Completeness {
    Complete,
    Incomplete,
}

async fn put_all(w: &World, cache: &ServerContext) {
    for (h, data) in &w.cas {
        let d = Digest {
            function: SHA256,
            hash: *h,
            size: data.len() as u64,
        };
        cache.put_blob(&d, data.clone().into()).await.unwrap();
    }
}

async fn check_action_cache(w: &mut World, cache: &Arc<ServerContext>, input: &Input) {
    let mut ar = ActionResult::default();
    let mut trees = Vec::new();
    for (k, o) in input.outputs.iter().take(3).enumerate() {
        match o {
            Output::File(r) => ar.output_files.push(OutputFile {
                path: format!("o{k}"),
                digest: w.resolve(*r, w.dirs.len()),
                ..Default::default()
            }),
            Output::Stdout(r) => ar.stdout_digest = w.resolve(*r, w.dirs.len()),
            Output::Tree {
                root,
                children,
                stored,
            } => {
                let tree = Tree {
                    root: Some(w.message(*root)),
                    children: children.iter().take(4).map(|c| w.message(*c)).collect(),
                };
                let raw = tree.encode_to_vec();
                if *stored {
                    w.store(&raw);
                }
                ar.output_directories.push(OutputDirectory {
                    path: format!("o{k}"),
                    tree_digest: Some(proto_of(&raw)),
                    ..Default::default()
                });
                trees.push(tree);
            }
        }
    }
    put_all(w, cache).await;
    let well_formed = |d: &Option<re::Digest>| {
        d.as_ref()
            .is_none_or(|d| Digest::from_proto(SHA256, d).is_ok())
    };
    // What a result references is decided when it is written: every output Tree must be in
    // the CAS then, with well-formed file digests, or the write is refused.
    let trees_ok = ar.output_directories.iter().zip(&trees).all(|(od, tree)| {
        w.present_proto(od.tree_digest.as_ref().unwrap())
            && tree
                .root
                .iter()
                .chain(&tree.children)
                .flat_map(|d| &d.files)
                .all(|f| well_formed(&f.digest))
    });
    let valid = ar
        .output_files
        .iter()
        .all(|f| f.digest.is_some() && well_formed(&f.digest))
        && well_formed(&ar.stdout_digest)
        && trees_ok;
    let anonymous = cache.auth.authenticate(None).unwrap();
    let stored = cache
        .update_action_result(
            "",
            SHA256,
            input.action,
            &ar,
            lre_server::context::ResultSource::Uploaded { caller: &anonymous },
        )
        .await;
    assert_eq!(stored.is_ok(), valid, "update_action_result: {stored:?}");
    if !valid {
        return;
    }

    // The contract: a hit only when every blob it references, down to each file of each
    // output tree, is in the CAS.
    let mut incomplete = ar
        .output_files
        .iter()
        .any(|f| !w.present_proto(f.digest.as_ref().unwrap()))
        || ar
            .stdout_digest
            .as_ref()
            .is_some_and(|d| !w.present_proto(d));
    let mut malformed = false;
    for (od, tree) in ar.output_directories.iter().zip(&trees) {
        if !w.present_proto(od.tree_digest.as_ref().unwrap()) {
            incomplete = true;
            continue;
        }
        for d in tree.root.iter().chain(&tree.children) {
            for f in &d.files {
                match &f.digest {
                    None => {}
                    Some(fd) if Digest::from_proto(SHA256, fd).is_err() => malformed = true,
                    Some(fd) => incomplete |= !w.present_proto(fd),
                }
            }
        }
    }
    let want = match incomplete {
        true => Completeness::Incomplete,
        false => Completeness::Complete,
    };
    match cache.get_action_result("", SHA256, input.action).await {
        Ok(Some(hit)) => {
            assert!(
                matches!(want, Completeness::Complete) && !malformed,
                "a hit for an incomplete result"
            );
            assert_eq!(hit.result, ar);
            assert_eq!(&hit.raw[..], &ar.encode_to_vec()[..]);
        }
        Ok(None) => assert!(
            matches!(want, Completeness::Incomplete) || malformed,
            "a complete result reported as a miss"
        ),
        Err(e) => assert!(malformed, "get_action_result failed: {e}"),
    }
}

/// The Remote Asset API's check that a remembered tree is whole (`asset::memory::tree_missing`):
/// nothing reported missing only when every directory and file under the root is present and
/// well-formed; otherwise what it names is itself missing or malformed.
async fn check_tree_missing(w: &World, cache: &Arc<ServerContext>, root: &Option<re::Digest>) {
    let Some(root) = root
        .as_ref()
        .and_then(|d| Digest::from_proto(SHA256, d).ok())
    else {
        return;
    };
    let got = lre_server::asset::memory::tree_missing(cache, root)
        .await
        .expect("tree_missing failed");
    // One pass (parsing digests is what costs): the bad directories reached, and the files.
    let mut bad = HashSet::new();
    let mut seen = HashSet::from([root]);
    let mut queue = VecDeque::from([root]);
    let mut files = HashSet::new();
    while let Some(d) = queue.pop_front() {
        let Some(Ok(dir)) = w.present(&d).map(Directory::decode) else {
            bad.insert(d);
            continue;
        };
        let parse = |e: &Option<re::Digest>| Digest::from_opt_proto(SHA256, e).ok().flatten();
        let fs: Option<Vec<Digest>> = dir.files.iter().map(|f| parse(&f.digest)).collect();
        let cs: Option<Vec<Digest>> = dir.directories.iter().map(|c| parse(&c.digest)).collect();
        let (Some(fs), Some(cs)) = (fs, cs) else {
            bad.insert(d);
            continue;
        };
        files.extend(fs);
        for cd in cs {
            if seen.insert(cd) {
                queue.push_back(cd);
            }
        }
    }
    let complete = bad.is_empty() && files.iter().all(|f| w.present(f).is_some());
    match got {
        None => assert!(complete, "tree_missing: an incomplete tree passed as whole"),
        Some(x) => {
            assert!(!complete, "tree_missing: a whole tree reported missing {x}");
            assert!(
                bad.contains(&x) || (files.contains(&x) && w.present(&x).is_none()),
                "tree_missing named {x}, which is neither missing nor malformed"
            );
        }
    }
}

fuzz_target!(|input: Input| {
    let (mut w, root) = build(&input);
    check_worker(&w, &root);
    if w.deep {
        // Deep chains are for the worker's depth bound; the server's walkers have none, and
        // hashing 300 levels through them made these inputs most of the run's time.
        return;
    }
    runtime().block_on(async {
        let cache = new_cache();
        // One server walker per input: each parses every digest it meets, which is what
        // costs (the parse's compares are traced), so three per input would be a third
        // the executions.
        match input.check % 3 {
            0 => check_action_cache(&mut w, &cache, &input).await,
            1 => {
                put_all(&w, &cache).await;
                check_get_tree(&w, &cache, &input, &root).await;
            }
            _ => {
                put_all(&w, &cache).await;
                check_tree_missing(&w, &cache, &root).await;
            }
        }
    });
});
