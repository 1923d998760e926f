//! The Remote Asset API (`build.bazel.remote.asset.v1`): Fetch and Push, what Bazel's
//! `--experimental_remote_downloader` talks to.
//!
//! - **Memory.** Every fetched or pushed URI (with its qualifiers, see qualifiers.rs) is
//!   remembered as a digest (memory.rs); a Fetch is answered from memory when the content is
//!   still in the CAS, matches the request's `checksum.sri`, and is no older than
//!   `oldest_content_accepted`. Otherwise the server downloads it.
//! - **Access.** An answer from memory needs read access; a download needs a read-write
//!   caller, since it spends the server's bandwidth and reaches hosts on its behalf; Push
//!   needs read-write, since what it stores is served to every reader.
//! - **Downloads** are limited by `[asset]` (fetch.rs, policy.rs): allowed hosts only, no
//!   private addresses, size and time limits, few at once. FetchDirectory unpacks tar,
//!   tar.gz and tar.zst archives (archive.rs).
//! - **Errors are RPC errors**, not the response's `status` field the spec suggests for
//!   failures outside the server's control: Bazel 4.2.3 ignores that field and would read
//!   the absent digest as an empty file. The codes are the spec's where they mean "do not
//!   retry" (NOT_FOUND, PERMISSION_DENIED, DEADLINE_EXCEEDED); a checksum mismatch is
//!   INVALID_ARGUMENT and a size over the limit FAILED_PRECONDITION rather than the spec's
//!   ABORTED and RESOURCE_EXHAUSTED, which Bazel retries, downloading the same bytes again.

mod archive;
mod fetch;
pub mod memory;
pub mod policy;
pub mod qualifiers;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bazel_remote_apis::build::bazel::remote::asset::v1::{
    fetch_server::Fetch, push_server::Push, FetchBlobRequest, FetchBlobResponse,
    FetchDirectoryRequest, FetchDirectoryResponse, PushBlobRequest, PushBlobResponse,
    PushDirectoryRequest, PushDirectoryResponse, Qualifier,
};
use bazel_remote_apis::build::bazel::remote::execution::v2::digest_function;
use tonic::{Request, Response, Status};

pub use crate::config::AssetConfig;

use crate::auth::{Access, Principal};
use crate::context::ServerContext;
use crate::digest::{require_sha256, Digest, DigestFunction};
use crate::error::{ok_rpc_status, Error, Result};
use archive::Limits;
use fetch::Downloader;
use memory::{Entry, Kind};
use qualifiers::{Algo, Hasher, Qualifiers, Sri, SriHash};

/// URIs one request may name: each may cost a download (in turn) and a remembered entry.
pub const MAX_URIS: usize = 100;
/// Longest URI accepted; URIs are echoed in errors and logs and kept in memory.
pub const MAX_URI_BYTES: usize = 8 << 10;
/// Longest status message sent. Clients refuse response headers beyond a limit (16 KiB in
/// hyper and so tonic, 8 KiB in grpc-java and so Bazel) and would then report a protocol
/// error instead of the reason; long messages are also no use to a reader.
const MAX_STATUS_MESSAGE: usize = 4 << 10;

/// `s`, cut to at most `max` bytes (on a character boundary) with a note of its length:
/// for echoing client or upstream input in messages.
pub(crate) fn clip(s: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if s.len() <= max {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    std::borrow::Cow::Owned(format!("{}… ({} bytes in all)", &s[..end], s.len()))
}

/// A status whose message fits `MAX_STATUS_MESSAGE`, with its code and details kept.
fn bounded(s: Status) -> Status {
    if s.message().len() <= MAX_STATUS_MESSAGE {
        return s;
    }
    Status::with_details(
        s.code(),
        clip(s.message(), MAX_STATUS_MESSAGE).into_owned(),
        s.details().to_vec().into(),
    )
}

pub struct AssetService {
    cache: Arc<ServerContext>,
    downloader: Downloader,
}

/// What every request carries, checked once.
struct Common<'a> {
    instance: &'a str,
    uris: &'a [String],
    quals: Qualifiers,
    caller: Principal,
}

impl AssetService {
    pub fn new(cache: Arc<ServerContext>, config: &AssetConfig) -> Result<AssetService> {
        Ok(AssetService {
            cache,
            downloader: Downloader::new(config)?,
        })
    }

    fn common<'a, T: AssetRequest>(
        &self,
        request: &'a Request<T>,
        access: Access,
    ) -> Result<Common<'a>, Status> {
        let req = request.get_ref();
        let (instance, uris) = (req.instance(), req.uris());
        let caller = self.cache.authorize_grpc(request, instance, Access::Read)?;
        if access == Access::Write && !caller.may(instance, Access::Write) {
            return Err(Error::PermissionDenied(format!(
                "{} may not push assets to instance {instance:?} (that needs a read-write token)",
                who(&caller)
            ))
            .into());
        }
        require_sha256(req.digest_function(), "Remote Asset")?;
        if uris.is_empty() {
            return Err(Error::InvalidArgument("at least one URI is required".into()).into());
        }
        if uris.len() > MAX_URIS {
            return Err(Error::InvalidArgument(format!(
                "{} URIs given; at most {MAX_URIS} are accepted",
                uris.len()
            ))
            .into());
        }
        if let Some((i, u)) = uris
            .iter()
            .enumerate()
            .find(|(_, u)| u.len() > MAX_URI_BYTES)
        {
            return Err(Error::InvalidArgument(format!(
                "URI number {i} ({:?}) is {} bytes long; at most {MAX_URI_BYTES} are accepted",
                clip(u, 80),
                u.len()
            ))
            .into());
        }
        tracing::debug!(
            method = T::METHOD,
            instance,
            ?uris,
            qualifiers = ?qualifiers::describe(req.qualifiers()),
            "remote asset request"
        );
        let quals = Qualifiers::parse(req.qualifiers(), uris.len())?;
        Ok(Common {
            instance,
            uris,
            quals,
            caller,
        })
    }

    /// The first URI whose remembered content may be served, with its digest.
    async fn remembered(
        &self,
        kind: Kind,
        c: &Common<'_>,
        oldest: Option<i64>,
    ) -> Result<Option<(usize, Digest)>> {
        let now = memory::unix_now();
        // One blob remembered under many URIs is hashed once per request, whatever the
        // number of URIs naming it (a read caller could otherwise make it hash the same
        // blob a hundred times for one request).
        let mut hashed: HashMap<Digest, Option<bool>> = HashMap::new();
        for (i, uri) in c.uris.iter().enumerate() {
            let key = memory::key(c.instance, kind, uri, &c.quals.key_parts(i));
            let Some((entry, digest)) = memory::load(&self.cache, &key).await? else {
                continue;
            };
            let skip = |why: &str| tracing::debug!(%uri, %digest, why, "remembered entry not used");
            if entry.expire_at != 0 && entry.expire_at <= now {
                skip("expired");
                continue;
            }
            if oldest.is_some_and(|o| entry.stored_at < o) {
                skip("older than oldest_content_accepted");
                continue;
            }
            if let Some(sri) = &c.quals.sri {
                if !self
                    .matches_sri(kind, &entry, digest, sri, &mut hashed)
                    .await?
                {
                    skip("does not match checksum.sri");
                    continue;
                }
            }
            let present = match kind {
                Kind::Blob => self.cache.find_missing(&[digest]).await?.is_empty(),
                Kind::Directory => memory::tree_missing(&self.cache, digest).await?.is_none(),
            };
            if !present {
                skip("no longer (wholly) in the CAS");
                continue;
            }
            tracing::debug!(%uri, %digest, pushed = entry.pushed, "answered from memory");
            return Ok(Some((i, digest)));
        }
        Ok(None)
    }

    /// Whether remembered content matches `sri`: a blob's SHA-256 is its digest, other
    /// hashes are remembered ones or computed from the CAS; a directory has only remembered
    /// hashes (of the archive it came from).
    async fn matches_sri(
        &self,
        kind: Kind,
        entry: &Entry,
        digest: Digest,
        sri: &Sri,
        hashed: &mut HashMap<Digest, Option<bool>>,
    ) -> Result<bool> {
        let is_blob_sha256 = |h: &SriHash| kind == Kind::Blob && h.algo == Algo::Sha256;
        let satisfied = |h: &SriHash| {
            entry.sri.contains(&h.token()) || (is_blob_sha256(h) && h.digest == digest.hash)
        };
        if sri.hashes.iter().all(satisfied) {
            return Ok(true);
        }
        // A wrong SHA-256 is final; other hashes may just not have been computed yet.
        if kind == Kind::Directory
            || sri
                .hashes
                .iter()
                .any(|h| is_blob_sha256(h) && h.digest != digest.hash)
        {
            return Ok(false);
        }
        let verdict = match hashed.get(&digest) {
            Some(v) => *v,
            None => {
                let v = self.hash_blob(digest, sri).await?;
                hashed.insert(digest, v);
                v
            }
        };
        Ok(verdict == Some(true))
    }

    /// Hashes a CAS blob as `sri` asks; `None` if the blob is gone.
    async fn hash_blob(&self, digest: Digest, sri: &Sri) -> Result<Option<bool>> {
        use tokio::io::AsyncReadExt;
        let Some(mut reader) = self.cache.open_blob(&digest, 0, None).await? else {
            return Ok(None);
        };
        let mut hasher = Hasher::new(Some(sri));
        let mut buf = vec![0u8; 256 << 10];
        loop {
            let n = reader.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        Ok(Some(sri.verify(&hasher.finish()).is_ok()))
    }

    /// A download needs more than the read access that got the caller this far.
    fn may_download(&self, c: &Common<'_>) -> Result<()> {
        if c.caller.may(c.instance, Access::Write) {
            return Ok(());
        }
        let who = who(&c.caller);
        Err(Error::PermissionDenied(format!(
            "{} is not in the cache, and {who} may not make the server download it (that needs a read-write token)",
            c.uris[0]
        )))
    }

    async fn remember(
        &self,
        kind: Kind,
        c: &Common<'_>,
        indexes: &[usize],
        entry: Entry,
    ) -> Result<()> {
        for &i in indexes {
            let key = memory::key(c.instance, kind, &c.uris[i], &c.quals.key_parts(i));
            memory::save(&self.cache, key, &entry).await?;
        }
        Ok(())
    }

    async fn fetch_directory_from(
        &self,
        c: &Common<'_>,
        i: usize,
        timeout: Option<Duration>,
    ) -> Result<(Digest, Vec<String>)> {
        let uri = &c.uris[i];
        // The slot is held until the tree is stored: the archive and the files unpacked
        // from it are in memory till then.
        let (data, hashes, _slot) = self
            .downloader
            .to_memory(uri, c.quals.headers_for(i), c.quals.sri.as_ref(), timeout)
            .await?;
        let limits = Limits {
            max_bytes: self.downloader.max_bytes,
            max_entries: archive::MAX_ENTRIES,
            max_depth: archive::MAX_DEPTH,
        };
        // Files travel to the CAS while the archive is still being read.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<(Digest, Vec<u8>)>(16);
        let owned_uri = uri.clone();
        let job = tokio::task::spawn_blocking(move || {
            archive::unpack(&owned_uri, &data, &limits, |d, bytes| {
                tx.blocking_send((d, bytes))
                    .map_err(|_| Error::Aborted("stopped unpacking: storing a file failed".into()))
            })
        });
        let mut stored: Result<()> = Ok(());
        while let Some((d, bytes)) = rx.recv().await {
            if let Err(e) = self.cache.put_blob(&d, bytes.into()).await {
                stored = Err(e);
                break;
            }
        }
        drop(rx);
        let unpacked = job
            .await
            .map_err(|e| Error::Internal(format!("unpacking task: {e}")))?;
        stored?;
        let unpacked = unpacked?;
        for (d, raw) in &unpacked.directories {
            self.cache.put_blob(d, raw.clone().into()).await?;
        }
        Ok((unpacked.root, hashes.tokens()))
    }
}

fn who(p: &Principal) -> String {
    p.name
        .as_deref()
        .map_or("the anonymous caller".to_string(), |n| {
            format!("token {n:?}")
        })
}

fn timeout_of(
    t: &Option<bazel_remote_apis::google::protobuf::Duration>,
) -> Result<Option<Duration>> {
    match t {
        None => Ok(None),
        Some(d) if d.seconds < 0 || d.nanos < 0 => Err(Error::InvalidArgument(
            "timeout must not be negative".into(),
        )),
        Some(d) if d.seconds == 0 && d.nanos == 0 => Ok(None),
        Some(d) => Ok(Some(Duration::new(d.seconds as u64, d.nanos as u32))),
    }
}

fn seconds_of(t: &Option<bazel_remote_apis::google::protobuf::Timestamp>) -> Option<i64> {
    t.as_ref()
        .map(|t| t.seconds.saturating_add(i64::from(t.nanos > 0)))
}

/// Many URIs failed: one error naming each, with the last one's code.
fn all_failed(errors: Vec<Error>) -> Status {
    let code = errors
        .last()
        .map_or(tonic::Code::Internal, Error::grpc_code);
    if errors.len() == 1 {
        return errors
            .into_iter()
            .next()
            .map_or_else(|| Status::new(code, ""), Status::from);
    }
    let joined: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
    Status::new(
        code,
        format!("all {} URIs failed: {}", errors.len(), joined.join("; ")),
    )
}

const SHA256: i32 = digest_function::Value::Sha256 as i32;

/// The fields every Fetch and Push request has.
trait AssetRequest {
    const METHOD: &'static str;
    fn instance(&self) -> &str;
    fn uris(&self) -> &[String];
    fn qualifiers(&self) -> &[Qualifier];
    fn digest_function(&self) -> i32;
}

macro_rules! asset_request {
    ($($t:ident => $method:literal),*) => {$(
        impl AssetRequest for $t {
            const METHOD: &'static str = $method;
            fn instance(&self) -> &str {
                &self.instance_name
            }
            fn uris(&self) -> &[String] {
                &self.uris
            }
            fn qualifiers(&self) -> &[Qualifier] {
                &self.qualifiers
            }
            fn digest_function(&self) -> i32 {
                self.digest_function
            }
        }
    )*};
}

asset_request!(
    FetchBlobRequest => "FetchBlob",
    FetchDirectoryRequest => "FetchDirectory",
    PushBlobRequest => "PushBlob",
    PushDirectoryRequest => "PushDirectory"
);

/// The RPCs, behind `bounded` (see the trait impls below).
impl AssetService {
    async fn do_fetch_blob(
        &self,
        request: Request<FetchBlobRequest>,
    ) -> Result<Response<FetchBlobResponse>, Status> {
        let _t = self.cache.metrics.timer("FetchBlob");
        let req = request.get_ref();
        let c = self.common(&request, Access::Read)?;
        let timeout = timeout_of(&req.timeout)?;
        let respond = |i: usize, d: Digest| {
            Response::new(FetchBlobResponse {
                status: Some(ok_rpc_status()),
                uri: c.uris[i].clone(),
                qualifiers: vec![Qualifier {
                    name: qualifiers::CHECKSUM_SRI.into(),
                    value: qualifiers::sha256_token(&d.hash),
                }],
                expires_at: None,
                blob_digest: Some(d.to_proto()),
                digest_function: SHA256,
            })
        };
        if let Some((i, d)) = self
            .remembered(Kind::Blob, &c, seconds_of(&req.oldest_content_accepted))
            .await?
        {
            return Ok(respond(i, d));
        }
        self.may_download(&c)?;
        let mut errors = Vec::new();
        for (i, uri) in c.uris.iter().enumerate() {
            let started = memory::unix_now();
            match self
                .downloader
                .blob_to_cas(
                    &self.cache,
                    uri,
                    c.quals.headers_for(i),
                    c.quals.sri.as_ref(),
                    timeout,
                )
                .await
            {
                Ok(f) => {
                    let entry = Entry {
                        digest: Some(f.digest.to_proto()),
                        stored_at: started,
                        expire_at: 0,
                        sri: f.hashes.tokens(),
                        pushed: false,
                    };
                    self.remember(Kind::Blob, &c, &[i], entry).await?;
                    return Ok(respond(i, f.digest));
                }
                Err(e) => {
                    tracing::info!(%uri, error = %e, "FetchBlob: download failed");
                    errors.push(e);
                }
            }
        }
        Err(all_failed(errors))
    }

    async fn do_fetch_directory(
        &self,
        request: Request<FetchDirectoryRequest>,
    ) -> Result<Response<FetchDirectoryResponse>, Status> {
        let _t = self.cache.metrics.timer("FetchDirectory");
        let req = request.get_ref();
        let c = self.common(&request, Access::Read)?;
        let timeout = timeout_of(&req.timeout)?;
        let respond = |i: usize, d: Digest| {
            Response::new(FetchDirectoryResponse {
                status: Some(ok_rpc_status()),
                uri: c.uris[i].clone(),
                qualifiers: vec![],
                expires_at: None,
                root_directory_digest: Some(d.to_proto()),
                digest_function: SHA256,
            })
        };
        if let Some((i, d)) = self
            .remembered(
                Kind::Directory,
                &c,
                seconds_of(&req.oldest_content_accepted),
            )
            .await?
        {
            return Ok(respond(i, d));
        }
        self.may_download(&c)?;
        let mut errors = Vec::new();
        for (i, uri) in c.uris.iter().enumerate() {
            let started = memory::unix_now();
            match self.fetch_directory_from(&c, i, timeout).await {
                Ok((root, sri)) => {
                    let entry = Entry {
                        digest: Some(root.to_proto()),
                        stored_at: started,
                        expire_at: 0,
                        sri,
                        pushed: false,
                    };
                    self.remember(Kind::Directory, &c, &[i], entry).await?;
                    return Ok(respond(i, root));
                }
                Err(e) => {
                    tracing::info!(%uri, error = %e, "FetchDirectory: download failed");
                    errors.push(e);
                }
            }
        }
        Err(all_failed(errors))
    }
}

impl AssetService {
    async fn do_push_blob(
        &self,
        request: Request<PushBlobRequest>,
    ) -> Result<Response<PushBlobResponse>, Status> {
        let _t = self.cache.metrics.timer("PushBlob");
        let req = request.get_ref();
        let c = self.common(&request, Access::Write)?;
        let digest = Digest::from_opt_proto(DigestFunction::Sha256, &req.blob_digest)?
            .ok_or_else(|| Error::InvalidArgument("blob_digest is required".into()))?;
        if !self.cache.find_missing(&[digest]).await?.is_empty() {
            return Err(Error::FailedPrecondition(format!(
                "blob {digest} is not in the CAS; upload it before PushBlob"
            ))
            .into());
        }
        // The pusher's checksum is checked, not trusted: it is cheap for a blob at hand.
        let mut sri = vec![qualifiers::sha256_token(&digest.hash)];
        if let Some(want) = &c.quals.sri {
            if !self
                .matches_sri(
                    Kind::Blob,
                    &Entry::default(),
                    digest,
                    want,
                    &mut HashMap::new(),
                )
                .await?
            {
                return Err(Error::InvalidArgument(format!(
                    "blob {digest} does not match checksum.sri {}",
                    want.tokens().join(" ")
                ))
                .into());
            }
            sri.extend(want.tokens());
        }
        let entry = Entry {
            digest: Some(digest.to_proto()),
            stored_at: memory::unix_now(),
            expire_at: seconds_of(&req.expire_at).unwrap_or(0),
            sri,
            pushed: true,
        };
        let all: Vec<usize> = (0..c.uris.len()).collect();
        self.remember(Kind::Blob, &c, &all, entry).await?;
        tracing::info!(uris = ?c.uris, %digest, "blob pushed");
        Ok(Response::new(PushBlobResponse {}))
    }

    async fn do_push_directory(
        &self,
        request: Request<PushDirectoryRequest>,
    ) -> Result<Response<PushDirectoryResponse>, Status> {
        let _t = self.cache.metrics.timer("PushDirectory");
        let req = request.get_ref();
        let c = self.common(&request, Access::Write)?;
        let root = Digest::from_opt_proto(DigestFunction::Sha256, &req.root_directory_digest)?
            .ok_or_else(|| Error::InvalidArgument("root_directory_digest is required".into()))?;
        if let Some(missing) = memory::tree_missing(&self.cache, root).await? {
            return Err(Error::FailedPrecondition(format!(
                "directory {root} is not wholly in the CAS ({missing} is missing or not a Directory); upload it before PushDirectory"
            ))
            .into());
        }
        // A directory's checksum describes the archive it came from: trusted, as the spec allows.
        let entry = Entry {
            digest: Some(root.to_proto()),
            stored_at: memory::unix_now(),
            expire_at: seconds_of(&req.expire_at).unwrap_or(0),
            sri: c.quals.sri.as_ref().map(Sri::tokens).unwrap_or_default(),
            pushed: true,
        };
        let all: Vec<usize> = (0..c.uris.len()).collect();
        self.remember(Kind::Directory, &c, &all, entry).await?;
        tracing::info!(uris = ?c.uris, %root, "directory pushed");
        Ok(Response::new(PushDirectoryResponse {}))
    }
}

#[tonic::async_trait]
impl Fetch for AssetService {
    async fn fetch_blob(
        &self,
        request: Request<FetchBlobRequest>,
    ) -> Result<Response<FetchBlobResponse>, Status> {
        self.do_fetch_blob(request).await.map_err(bounded)
    }

    async fn fetch_directory(
        &self,
        request: Request<FetchDirectoryRequest>,
    ) -> Result<Response<FetchDirectoryResponse>, Status> {
        self.do_fetch_directory(request).await.map_err(bounded)
    }
}

#[tonic::async_trait]
impl Push for AssetService {
    async fn push_blob(
        &self,
        request: Request<PushBlobRequest>,
    ) -> Result<Response<PushBlobResponse>, Status> {
        self.do_push_blob(request).await.map_err(bounded)
    }

    async fn push_directory(
        &self,
        request: Request<PushDirectoryRequest>,
    ) -> Result<Response<PushDirectoryResponse>, Status> {
        self.do_push_directory(request).await.map_err(bounded)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bazel_remote_apis::google::protobuf::{Duration as PbDuration, Timestamp};
    use tonic::Code;

    #[test]
    fn extreme_timestamps_and_timeouts_do_not_overflow() {
        let at = |seconds, nanos| seconds_of(&Some(Timestamp { seconds, nanos }));
        assert_eq!(at(i64::MAX, 1), Some(i64::MAX));
        assert_eq!(at(5, 1), Some(6));
        assert_eq!(at(5, 0), Some(5));
        assert_eq!(at(i64::MIN, 0), Some(i64::MIN));
        let t = timeout_of(&Some(PbDuration {
            seconds: i64::MAX,
            nanos: i32::MAX,
        }))
        .unwrap();
        assert!(t.unwrap() > Duration::from_secs(1 << 62));
    }

    #[test]
    fn clip_cuts_on_a_character_boundary_and_says_how_long() {
        assert_eq!(clip("short", 10), "short");
        let long = "é".repeat(100);
        let c = clip(&long, 11);
        assert!(
            c.starts_with("ééééé…") && c.ends_with("(200 bytes in all)"),
            "{c}"
        );
    }

    #[test]
    fn long_status_messages_are_cut_and_keep_code_and_details() {
        let s = Status::with_details(Code::Unavailable, "x".repeat(100_000), vec![1u8, 2].into());
        let b = bounded(s);
        assert_eq!(b.code(), Code::Unavailable);
        assert!(b.message().len() < MAX_STATUS_MESSAGE + 64);
        assert!(b.message().ends_with("(100000 bytes in all)"));
        assert_eq!(b.details(), &[1u8, 2][..]);
        let short = bounded(Status::not_found("gone"));
        assert_eq!((short.code(), short.message()), (Code::NotFound, "gone"));
    }
}
