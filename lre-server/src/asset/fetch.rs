//! The upstream downloader: one reqwest client whose resolver, redirect policy and limits
//! enforce `[asset]` (see policy.rs), with no proxy from the environment. Blobs stream
//! into the store while they are hashed and are committed only once every checksum matched,
//! so a failed or mismatching download leaves nothing behind.

use std::sync::Arc;
use std::time::Duration;

use reqwest::header::HeaderMap;
use reqwest::{StatusCode, Url};
use tokio::sync::{Semaphore, SemaphorePermit};

use super::policy::{GuardedResolver, Policy, Refused, MAX_REDIRECTS};
use super::qualifiers::{Hasher, Hashes, Sri};
use crate::config::AssetConfig;
use crate::context::ServerContext;
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::store::{BlobWriter, Key};

pub struct Downloader {
    client: reqwest::Client,
    policy: Arc<Policy>,
    slots: Semaphore,
    pub max_bytes: u64,
    timeout: Duration,
}

/// A finished download: what it hashed to (SHA-256 always, and what the SRI asked for).
pub struct Fetched {
    pub digest: Digest,
    pub hashes: Hashes,
}

/// Where a body goes: the store (FetchBlob) or memory (an archive to unpack).
enum Sink {
    Store(Box<dyn BlobWriter>),
    Memory(Vec<u8>),
}

impl Downloader {
    pub fn new(cfg: &AssetConfig) -> Result<Downloader> {
        let policy = Arc::new(Policy::new(cfg).map_err(Error::InvalidArgument)?);
        let client = reqwest::Client::builder()
            .no_proxy()
            .dns_resolver(Arc::new(GuardedResolver {
                policy: policy.clone(),
            }))
            // Redirects are followed by hand (`send`): the client's own headers must not
            // travel to another host, and reqwest keeps all but a few it knows.
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(cfg.connect_timeout_seconds))
            .user_agent(concat!("lre-server/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Error::Internal(format!("HTTP client: {e}")))?;
        Ok(Downloader {
            client,
            policy,
            slots: Semaphore::new(cfg.max_concurrent_downloads),
            max_bytes: cfg.max_download_bytes.0,
            timeout: Duration::from_secs(cfg.download_timeout_seconds),
        })
    }

    /// Refuses a URI the policy forbids before anything is sent.
    fn check(&self, uri: &str) -> Result<Url> {
        let url = Url::parse(uri)
            .map_err(|e| Error::InvalidArgument(format!("{uri}: not a URL: {e}")))?;
        self.policy
            .check_url(&url)
            .map_err(|e| Error::PermissionDenied(format!("{uri}: {e}")))?;
        Ok(url)
    }

    /// Downloads `uri` into the CAS. The blob is committed only if `sri` matches.
    pub async fn blob_to_cas(
        &self,
        cache: &ServerContext,
        uri: &str,
        headers: HeaderMap,
        sri: Option<&Sri>,
        timeout: Option<Duration>,
    ) -> Result<Fetched> {
        let writer = cache.store.writer(None).await?;
        let (hashes, size, sink, _slot) = self
            .download(uri, headers, sri, timeout, Sink::Store(writer))
            .await?;
        let digest = Digest {
            function: crate::digest::DigestFunction::Sha256,
            hash: hashes.sha256,
            size,
        };
        if let Sink::Store(w) = sink {
            // The empty blob always exists and is never stored.
            if !digest.is_empty_blob() {
                w.commit(Key::cas(&digest)).await?;
            }
        }
        Ok(Fetched { digest, hashes })
    }

    /// Downloads `uri` into memory (at most `max_bytes`), checked against `sri`. The
    /// download slot comes along: hold it while the data is in use (an archive unpacking),
    /// so that `max_concurrent_downloads` also bounds the memory downloads take.
    pub async fn to_memory(
        &self,
        uri: &str,
        headers: HeaderMap,
        sri: Option<&Sri>,
        timeout: Option<Duration>,
    ) -> Result<(Vec<u8>, Hashes, SemaphorePermit<'_>)> {
        let (hashes, _, sink, slot) = self
            .download(uri, headers, sri, timeout, Sink::Memory(Vec::new()))
            .await?;
        match sink {
            Sink::Memory(data) => Ok((data, hashes, slot)),
            Sink::Store(_) => Err(Error::Internal("download sink changed kind".into())),
        }
    }

    async fn download(
        &self,
        uri: &str,
        headers: HeaderMap,
        sri: Option<&Sri>,
        timeout: Option<Duration>,
        mut sink: Sink,
    ) -> Result<(Hashes, u64, Sink, SemaphorePermit<'_>)> {
        let url = self.check(uri)?;
        let limit = timeout.map_or(self.timeout, |t| t.min(self.timeout));
        let started = std::time::Instant::now();
        let run = async {
            let slot = self
                .slots
                .acquire()
                .await
                .map_err(|_| Error::Internal("download slots closed".into()))?;
            let mut resp = self.send(uri, url, headers).await?;
            check_status(uri, resp.status())?;
            if let Some(len) = resp.content_length() {
                if len > self.max_bytes {
                    return Err(self.too_large(uri, &format!("its Content-Length is {len}")));
                }
            }
            let mut hasher = Hasher::new(sri);
            let mut size = 0u64;
            while let Some(chunk) = resp.chunk().await.map_err(|e| transport_error(uri, e))? {
                size += chunk.len() as u64;
                if size > self.max_bytes {
                    return Err(self.too_large(uri, "it sent more"));
                }
                hasher.update(&chunk);
                match &mut sink {
                    Sink::Store(w) => w.write(&chunk).await?,
                    Sink::Memory(v) => v.extend_from_slice(&chunk),
                }
            }
            Ok((hasher.finish(), size, slot))
        };
        let (hashes, size, slot) = tokio::time::timeout(limit, run).await.map_err(|_| {
            Error::DeadlineExceeded(format!(
                "{uri}: the download did not finish within {} s",
                limit.as_secs_f64()
            ))
        })??;
        if let Some(sri) = sri {
            sri.verify(&hashes)
                .map_err(|m| Error::InvalidArgument(format!("{uri}: {m}; nothing was stored")))?;
        }
        tracing::info!(%uri, size, seconds = started.elapsed().as_secs_f64(), "downloaded");
        Ok((hashes, size, sink, slot))
    }

    /// GETs `url`, following at most `MAX_REDIRECTS` redirects, each to a URL the policy
    /// allows. The request's headers (the client's `http_header` qualifiers, which may be
    /// credentials of any name) go only to the host they were given for: a redirect to
    /// another host is followed without them.
    async fn send(&self, uri: &str, mut url: Url, headers: HeaderMap) -> Result<reqwest::Response> {
        let origin = (
            url.scheme().to_string(),
            url.host_str().map(str::to_string),
            url.port_or_known_default(),
        );
        for _ in 0..=MAX_REDIRECTS {
            let same_host = (
                url.scheme().to_string(),
                url.host_str().map(str::to_string),
                url.port_or_known_default(),
            ) == origin;
            let mut req = self.client.get(url.clone());
            if same_host {
                req = req.headers(headers.clone());
            }
            let resp = req.send().await.map_err(|e| transport_error(uri, e))?;
            if !resp.status().is_redirection() || resp.status() == StatusCode::NOT_MODIFIED {
                return Ok(resp);
            }
            let Some(next) = resp
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|l| l.to_str().ok())
                .and_then(|l| url.join(l).ok())
            else {
                return Err(Error::FailedPrecondition(format!(
                    "{uri}: the server answered HTTP {} without a usable Location",
                    resp.status()
                )));
            };
            self.policy.check_url(&next).map_err(|e| {
                Error::PermissionDenied(format!(
                    "{uri}: redirect to {} refused: {e}",
                    super::clip(next.as_str(), 512)
                ))
            })?;
            url = next;
        }
        Err(Error::PermissionDenied(format!(
            "{uri}: more than {MAX_REDIRECTS} redirects"
        )))
    }

    fn too_large(&self, uri: &str, why: &str) -> Error {
        Error::FailedPrecondition(format!(
            "{uri}: larger than asset.max_download_bytes ({} bytes): {why}; nothing was stored",
            self.max_bytes
        ))
    }
}

/// Only a plain, whole 2xx answer is the resource; the rest map to the spec's fetch codes.
fn check_status(uri: &str, status: StatusCode) -> Result<()> {
    if status.is_success() && status != StatusCode::PARTIAL_CONTENT {
        return Ok(());
    }
    let m = format!("{uri}: the server answered HTTP {status}");
    Err(match status.as_u16() {
        404 | 410 => Error::NotFound(m),
        401 | 403 | 407 => Error::PermissionDenied(m),
        408 | 429 | 500..=599 => Error::Unavailable(m),
        _ => Error::FailedPrecondition(m),
    })
}

/// A reqwest failure as our error: a policy refusal from the resolver or the redirect
/// policy is PERMISSION_DENIED, a timeout DEADLINE_EXCEEDED, the rest UNAVAILABLE.
fn transport_error(uri: &str, e: reqwest::Error) -> Error {
    let e = e.without_url();
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    let mut chain = Vec::new();
    while let Some(s) = source {
        // io::Error's source() skips its payload, so look inside it too.
        let payload = s
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|p| p.downcast_ref::<Refused>());
        if let Some(r) = s.downcast_ref::<Refused>().or(payload) {
            return Error::PermissionDenied(format!("{uri}: {r}"));
        }
        let text = s.to_string();
        if chain.last() != Some(&text) {
            chain.push(text);
        }
        source = s.source();
    }
    let m = format!("{uri}: {}", chain.join(": "));
    if e.is_timeout() {
        Error::DeadlineExceeded(m)
    } else {
        Error::Unavailable(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A loopback server answering every request with `body`.
    async fn serve(body: &'static [u8]) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut req = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => req.extend_from_slice(&buf[..n]),
                        }
                    }
                    let head = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = conn.write_all(head.as_bytes()).await;
                    let _ = conn.write_all(body).await;
                });
            }
        });
        format!("http://{addr}/a.tar")
    }

    #[tokio::test]
    async fn data_in_memory_keeps_its_download_slot_until_dropped() {
        let url = serve(b"archive").await;
        let d = Downloader::new(&AssetConfig {
            allowed_hosts: vec!["127.0.0.1".into()],
            allowed_private_ranges: vec!["127.0.0.1/32".parse().unwrap()],
            max_concurrent_downloads: 1,
            ..AssetConfig::default()
        })
        .unwrap();
        let get =
            |t: u64| d.to_memory(&url, HeaderMap::new(), None, Some(Duration::from_millis(t)));
        let (data, _, slot) = get(5000).await.unwrap();
        assert_eq!(data, b"archive");
        // While the first archive is held (being unpacked), no second download starts.
        match get(300).await {
            Err(Error::DeadlineExceeded(m)) => assert!(m.contains("did not finish"), "{m}"),
            other => panic!("{:?}", other.map(|(d, _, _)| d)),
        }
        drop(slot);
        assert_eq!(get(5000).await.unwrap().0, b"archive");
    }
}
