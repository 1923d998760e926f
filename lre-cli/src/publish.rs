//! `lre publish`: a toolchain's closure travels to lre-server, which is also the team's
//! Nix binary cache. For each store path the server's instance does not have yet, the
//! NAR goes over ByteStream (streamed from `nix-store --dump`, never whole in memory,
//! resumed from where the server got to if the stream breaks), then its narinfo over
//! HTTP (dependencies first: the server takes a narinfo only once its references are
//! there), signed with the user's key or carrying the path's own signatures; last, the
//! closure manifest, whose SHA-256 is the `lre-closure:sha256:` id `lre generate` pins.
//!
//! Publishing changes nothing `lre generate` writes: action keys stay the same.

use std::collections::HashSet;
use std::path::PathBuf;

use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use bazel_remote_apis::google::bytestream::{
    byte_stream_client::ByteStreamClient, QueryWriteStatusRequest, WriteRequest,
};
use lre_nix_formats::{NarInfo, NixHash, SecretKey, Signature, StorePath};
use lre_worker::client::ServerChannel;
use re::content_addressable_storage_client::ContentAddressableStorageClient;
use tokio::io::AsyncReadExt;

use crate::nix::PathInfo;

/// NARs stream in messages of this size.
const CHUNK: usize = 1 << 20;
/// Tries per NAR; each after the first resumes where the server got to.
const ATTEMPTS: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("{path}: what `nix path-info` says about it does not parse: {why}")]
    PathInfo { path: String, why: String },
    #[error("reading the secret key {}: {why}", path.display())]
    Key { path: PathBuf, why: String },
    #[error("{what}: {status}")]
    Rpc { what: String, status: tonic::Status },
    #[error("{url}: cannot reach the server: {source}")]
    Http {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{url}: the server refused ({status}): {body}")]
    Refused {
        url: String,
        status: reqwest::StatusCode,
        body: String,
    },
    #[error("`nix-store --dump {path}`: {why}")]
    Dump { path: String, why: String },
    #[error("the closure cannot be ordered: {0} refer to paths outside it")]
    Unordered(String),
}

type Result<T> = std::result::Result<T, PublishError>;

/// The narinfo lre serves for one store path of the closure, from what `nix path-info
/// --json --sigs` says of it: the uncompressed NAR, the path's own signatures.
pub fn narinfo_of(i: &PathInfo) -> Result<NarInfo> {
    let bad = |why: String| PublishError::PathInfo {
        path: i.path.clone(),
        why,
    };
    let store_path = StorePath::parse(&i.path).map_err(|e| bad(e.to_string()))?;
    let nar_hash =
        NixHash::parse(i.nar_hash.as_deref().unwrap_or("")).map_err(|e| bad(e.to_string()))?;
    let nar_size = i.nar_size.ok_or_else(|| bad("no narSize".into()))?;
    let mut references = i
        .references
        .iter()
        .map(|r| StorePath::parse(r).map_err(|e| bad(e.to_string())))
        .collect::<Result<Vec<_>>>()?;
    references.sort_by_key(|r| r.base_name());
    references.dedup();
    let deriver = i
        .deriver
        .as_deref()
        .and_then(|d| StorePath::parse(d).ok())
        .map(|d| d.base_name());
    // A signature Nix holds but lre cannot read is left out, not fatal.
    let sigs = i
        .signatures
        .iter()
        .filter_map(|s| Signature::parse(s).ok())
        .collect();
    Ok(NarInfo {
        store_path,
        url: String::new(),
        compression: "none".into(),
        file_hash: Some(nar_hash),
        file_size: Some(nar_size),
        nar_hash,
        nar_size,
        references,
        deriver,
        sigs,
        ca: i.ca.clone(),
    })
}

/// `info` with `key`'s signature added (replacing an older one by the same key name).
fn signed(info: &NarInfo, key: Option<&SecretKey>) -> NarInfo {
    let mut info = info.clone();
    if let Some(k) = key {
        let sig = k.sign(&info.fingerprint());
        info.sigs.retain(|s| s.name != sig.name);
        info.sigs.push(sig);
    }
    info
}

pub fn read_secret_key(path: &std::path::Path) -> Result<SecretKey> {
    let bad = |why: String| PublishError::Key {
        path: path.to_path_buf(),
        why,
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    SecretKey::parse(text.trim()).map_err(|e| {
        bad(format!(
            "{e} (a file `nix-store --generate-binary-cache-key NAME SECRET PUBLIC` wrote)"
        ))
    })
}

/// Dependencies before what depends on them (self-references aside).
pub fn dependency_order(paths: &[NarInfo]) -> Result<Vec<&NarInfo>> {
    let mut done: HashSet<&StorePath> = HashSet::new();
    let mut order = Vec::with_capacity(paths.len());
    let mut left: Vec<&NarInfo> = paths.iter().collect();
    while !left.is_empty() {
        let (ready, rest): (Vec<&NarInfo>, Vec<&NarInfo>) = left.into_iter().partition(|m| {
            m.references
                .iter()
                .all(|r| *r == m.store_path || done.contains(r))
        });
        if ready.is_empty() {
            let names: Vec<String> = rest.iter().map(|m| m.store_path.to_string()).collect();
            return Err(PublishError::Unordered(names.join(", ")));
        }
        for m in &ready {
            done.insert(&m.store_path);
        }
        order.extend(ready);
        left = rest;
    }
    Ok(order)
}

/// Where the instance's binary cache is and how to reach it.
pub struct Server {
    pub http: reqwest::Client,
    /// `http://HOST:PORT[/instance]/nix`.
    pub cache_url: String,
    pub token: Option<String>,
    pub channel: ServerChannel,
    pub instance: String,
}

#[derive(Debug, Default)]
pub struct Report {
    pub paths: usize,
    pub already_there: usize,
    pub nars_uploaded: usize,
    pub bytes_uploaded: u64,
    pub narinfos_written: usize,
}

impl Server {
    fn authed(&self, r: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    async fn send(&self, r: reqwest::RequestBuilder, url: &str) -> Result<reqwest::Response> {
        self.authed(r)
            .send()
            .await
            .map_err(|source| PublishError::Http {
                url: url.to_string(),
                source,
            })
    }

    async fn has_narinfo(&self, p: &StorePath) -> Result<bool> {
        let url = format!("{}/{}.narinfo", self.cache_url, p.hash_part());
        let resp = self.send(self.http.head(&url), &url).await?;
        match resp.status() {
            s if s.is_success() => Ok(true),
            reqwest::StatusCode::NOT_FOUND => Ok(false),
            status => Err(refused(url, resp, status).await),
        }
    }

    async fn put(&self, url: String, body: Vec<u8>) -> Result<()> {
        let resp = self.send(self.http.put(&url).body(body), &url).await?;
        match resp.status() {
            s if s.is_success() => Ok(()),
            status => Err(refused(url, resp, status).await),
        }
    }

    fn digest(m: &NarInfo) -> re::Digest {
        re::Digest {
            hash: m.nar_hash.hex(),
            size_bytes: m.nar_size as i64,
        }
    }

    async fn missing_nars(&self, metas: &[&NarInfo]) -> Result<HashSet<String>> {
        let mut cas = ContentAddressableStorageClient::new(self.channel.clone());
        let mut missing = HashSet::new();
        // FindMissingBlobs requests stay small whatever the closure's size.
        for chunk in metas.chunks(1000) {
            let resp = cas
                .find_missing_blobs(re::FindMissingBlobsRequest {
                    instance_name: self.instance.clone(),
                    blob_digests: chunk.iter().map(|m| Self::digest(m)).collect(),
                    ..Default::default()
                })
                .await
                .map_err(|status| PublishError::Rpc {
                    what: "asking the server which NARs it lacks".into(),
                    status,
                })?;
            missing.extend(
                resp.into_inner()
                    .missing_blob_digests
                    .into_iter()
                    .map(|d| d.hash),
            );
        }
        Ok(missing)
    }

    /// Streams `m`'s NAR; after a broken stream, asks how much the server kept and sends
    /// the rest.
    async fn upload_nar(&self, m: &NarInfo) -> Result<()> {
        let name = format!(
            "{}{}uploads/{}/blobs/{}/{}",
            self.instance,
            if self.instance.is_empty() { "" } else { "/" },
            uuid::Uuid::new_v4(),
            m.nar_hash.hex(),
            m.nar_size
        );
        let mut offset = 0;
        let mut attempt = 1;
        loop {
            let e = match self.write_from(&name, m, offset).await {
                Ok(()) => return Ok(()),
                // Nix could not dump the path, or the server refused it: trying again
                // would fail again.
                Err(e @ PublishError::Dump { .. }) => return Err(e),
                Err(PublishError::Rpc { what, status })
                    if matches!(
                        status.code(),
                        tonic::Code::InvalidArgument
                            | tonic::Code::PermissionDenied
                            | tonic::Code::Unauthenticated
                    ) =>
                {
                    return Err(PublishError::Rpc { what, status })
                }
                Err(e) => e,
            };
            if attempt == ATTEMPTS {
                return Err(e);
            }
            // The server may not have seen the stream break yet (it then still holds the
            // upload): wait a little, and ask a few times before starting again at 0.
            let mut resumed = None;
            for wait_ms in [200u64, 500, 1000, 2000] {
                tokio::time::sleep(std::time::Duration::from_millis(wait_ms)).await;
                let mut bs = ByteStreamClient::new(self.channel.clone());
                let status = bs
                    .query_write_status(QueryWriteStatusRequest {
                        resource_name: name.clone(),
                    })
                    .await;
                match status {
                    Ok(s) if s.get_ref().complete => return Ok(()),
                    Ok(s) => {
                        resumed = Some(s.get_ref().committed_size.max(0) as u64);
                        break;
                    }
                    // Nothing kept under that name: start again.
                    Err(s) if s.code() == tonic::Code::NotFound => {
                        resumed = Some(0);
                        break;
                    }
                    Err(_) => continue,
                }
            }
            offset = resumed.unwrap_or(0);
            tracing::warn!(path = %m.store_path, error = %e, offset, attempt, "NAR upload broke off; resuming");
            attempt += 1;
        }
    }

    async fn write_from(&self, name: &str, m: &NarInfo, offset: u64) -> Result<()> {
        let path = m.store_path.to_string();
        let dump_err = |why: String| PublishError::Dump {
            path: path.clone(),
            why,
        };
        let mut child = tokio::process::Command::new("nix-store")
            .arg("--dump")
            .arg(&path)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| dump_err(e.to_string()))?;
        let mut out = child
            .stdout
            .take()
            .ok_or_else(|| dump_err("no stdout".into()))?;
        // Read as it comes (a full pipe would stall the dump), kept to its last 4 KiB.
        let mut err_pipe = child
            .stderr
            .take()
            .ok_or_else(|| dump_err("no stderr".into()))?;
        let stderr = tokio::spawn(async move {
            let mut kept = Vec::new();
            let mut buf = [0u8; 4096];
            while let Ok(n) = err_pipe.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                kept.extend_from_slice(&buf[..n]);
                let over = kept.len().saturating_sub(4096);
                kept.drain(..over);
            }
            String::from_utf8_lossy(&kept).trim().to_string()
        });
        let (tx, rx) = tokio::sync::mpsc::channel::<WriteRequest>(4);
        let size = m.nar_size;
        let name = name.to_string();
        // Reads the dump and feeds the stream; what it finds wrong is its return value.
        let producer = async move {
            let mut skip = offset;
            let mut sent = offset;
            let mut buf = vec![0u8; CHUNK];
            let mut first = true;
            loop {
                let n = out.read(&mut buf).await.map_err(|e| e.to_string())?;
                if n == 0 {
                    break;
                }
                let mut data = &buf[..n];
                if skip > 0 {
                    let s = skip.min(n as u64) as usize;
                    skip -= s as u64;
                    data = &data[s..];
                    if data.is_empty() {
                        continue;
                    }
                }
                if sent + data.len() as u64 > size {
                    return Err(format!(
                        "the NAR is longer than the {size} bytes Nix records"
                    ));
                }
                let req = WriteRequest {
                    resource_name: if first { name.clone() } else { String::new() },
                    write_offset: sent as i64,
                    finish_write: sent + data.len() as u64 == size,
                    data: data.to_vec(),
                };
                first = false;
                sent += data.len() as u64;
                if tx.send(req).await.is_err() {
                    // The RPC ended; its status says why.
                    return Ok(());
                }
            }
            if sent != size {
                return Err(format!("the NAR has {sent} bytes, Nix records {size}"));
            }
            Ok(())
        };
        let mut bs = ByteStreamClient::new(self.channel.clone());
        let rpc = bs.write(tokio_stream::wrappers::ReceiverStream::new(rx));
        let (produced, written) = tokio::join!(producer, rpc);
        // The server verified every byte against the NarHash, so an accepted write is the
        // NAR, even if the dump was cut short by the server answering early (it had the
        // blob already).
        let _ = child.kill().await;
        if let (Ok(()), Ok(_)) = (&produced, &written) {
            return Ok(());
        }
        let exit = child.wait().await.ok();
        let nix_said = stderr.await.unwrap_or_default();
        if let Err(why) = produced {
            let exit = exit
                .map(|e| format!(" (nix-store {e})"))
                .unwrap_or_default();
            return Err(dump_err(format!("{why}{exit}: {nix_said}")));
        }
        written.map_err(|status| PublishError::Rpc {
            what: format!("uploading the NAR of {path}"),
            status,
        })?;
        Ok(())
    }
}

async fn refused(
    url: String,
    resp: reqwest::Response,
    status: reqwest::StatusCode,
) -> PublishError {
    let body = resp.text().await.unwrap_or_default();
    PublishError::Refused {
        url,
        status,
        body: body.trim().to_string(),
    }
}

/// Publishes `closure` (every path of it, as `nix path-info --recursive` lists them) and
/// registers its manifest under `id` (`lre-closure:sha256:<hex>`).
pub async fn publish(
    server: &Server,
    closure: &[NarInfo],
    key: Option<&SecretKey>,
    id: &str,
) -> Result<Report> {
    let mut report = Report {
        paths: closure.len(),
        ..Report::default()
    };
    let order = dependency_order(closure)?;
    let mut wanted = Vec::new();
    for m in &order {
        if server.has_narinfo(&m.store_path).await? {
            report.already_there += 1;
        } else {
            wanted.push(*m);
        }
    }
    let missing = server.missing_nars(&wanted).await?;
    for m in &wanted {
        if missing.contains(&m.nar_hash.hex()) {
            server.upload_nar(m).await?;
            report.nars_uploaded += 1;
            report.bytes_uploaded += m.nar_size;
        }
        let info = signed(m, key);
        let url = format!("{}/{}.narinfo", server.cache_url, m.store_path.hash_part());
        server.put(url, info.render_served().into_bytes()).await?;
        report.narinfos_written += 1;
    }
    let mut paths: Vec<String> = closure.iter().map(|m| m.store_path.to_string()).collect();
    paths.sort();
    let manifest: String = paths.iter().map(|p| format!("{p}\n")).collect();
    let hex = id.strip_prefix("lre-closure:sha256:").unwrap_or(id);
    server
        .put(
            format!("{}/closure/{hex}", server.cache_url),
            manifest.into_bytes(),
        )
        .await?;
    Ok(report)
}
