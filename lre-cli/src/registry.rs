//! `lre image push`: an OCI image layout to any OCI Distribution registry, with oci-client.
//!
//! Blobs go first and the manifest last, so an interrupted push leaves only unreferenced
//! blobs: harmless, and reused by the next attempt. Each blob is checked with `HEAD` first
//! and skipped when the registry has it; oci-client 0.15 has no blob-exists call (0.17 has,
//! but brings aws-lc-rs, which clashes with the ring provider the server's rustls uses), so
//! that one request is made here with reqwest, with the same credentials or token.

use std::path::Path;
use std::time::Duration;

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};
use oci_spec::image::{ImageIndex, ImageManifest};

use crate::error::{io, Error, Result};

pub struct PushOptions {
    /// `REGISTRY/NAME[:TAG]`.
    pub reference: String,
    pub auth: RegistryAuth,
    /// Speak plain HTTP (a registry on localhost, or one the user says is HTTP).
    pub plain_http: bool,
    pub attempts: u32,
}

#[derive(Debug, Default)]
pub struct PushReport {
    /// `REGISTRY/NAME@sha256:…`.
    pub pinned: String,
    pub uploaded: Vec<(String, u64)>,
    pub skipped: Vec<(String, u64)>,
}

impl PushReport {
    pub fn bytes_sent(&self) -> u64 {
        self.uploaded.iter().map(|(_, n)| n).sum()
    }
}

pub enum Event<'a> {
    Skipped(&'a str, u64),
    Uploading(&'a str, u64),
    Uploaded(&'a str, u64),
    Retrying(&'a str, u32, String),
}

fn registry_error(registry: &str, what: &str, e: OciDistributionError) -> Error {
    let hint = match &e {
        OciDistributionError::UnauthorizedError { .. } | OciDistributionError::AuthenticationFailure(_) => {
            " (the registry refused the credentials: pass --username/--password, set LRE_REGISTRY_USERNAME and LRE_REGISTRY_PASSWORD or LRE_REGISTRY_TOKEN, or `docker login`)"
        }
        OciDistributionError::RequestError(r) if r.is_connect() || r.is_timeout() => {
            " (the registry is unreachable: check the address, and --plain-http for a registry without TLS)"
        }
        _ => "",
    };
    Error::Invalid(format!("{what} on {registry}: {e}{hint}"))
}

/// Whether an error is worth another attempt: the network, or the registry's 5xx.
fn transient(e: &OciDistributionError) -> bool {
    match e {
        OciDistributionError::RequestError(r) => r.is_connect() || r.is_timeout() || r.is_request(),
        OciDistributionError::ServerError { code, .. } => *code >= 500,
        _ => false,
    }
}

/// Credentials: explicit ones, else LRE_REGISTRY_* in the environment, else
/// `~/.docker/config.json` (or `$DOCKER_CONFIG/config.json`), else anonymous.
pub fn credentials(
    registry: &str,
    username: Option<String>,
    password: Option<String>,
) -> Result<RegistryAuth> {
    if let (Some(u), Some(p)) = (username.clone(), password.clone()) {
        return Ok(RegistryAuth::Basic(u, p));
    }
    if username.is_some() || password.is_some() {
        return Err(Error::Invalid(
            "give both --username and --password, or neither".into(),
        ));
    }
    if let Ok(token) = std::env::var("LRE_REGISTRY_TOKEN") {
        return Ok(RegistryAuth::Bearer(token));
    }
    if let (Ok(u), Ok(p)) = (
        std::env::var("LRE_REGISTRY_USERNAME"),
        std::env::var("LRE_REGISTRY_PASSWORD"),
    ) {
        return Ok(RegistryAuth::Basic(u, p));
    }
    let dir = std::env::var_os("DOCKER_CONFIG")
        .map(std::path::PathBuf::from)
        .or_else(|| dirs::home_dir().map(|h| h.join(".docker")));
    if let Some(path) = dir.map(|d| d.join("config.json")).filter(|p| p.exists()) {
        let text = std::fs::read_to_string(&path).map_err(io(&path))?;
        return docker_config_auth(&text, registry)
            .map_err(|e| Error::Invalid(format!("{}: {e}", path.display())));
    }
    Ok(RegistryAuth::Anonymous)
}

/// The `auths` entry of a docker config for `registry`: `auth` is base64 of `user:password`.
pub fn docker_config_auth(text: &str, registry: &str) -> std::result::Result<RegistryAuth, String> {
    use base64::Engine as _;
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let auths = v.get("auths").and_then(|a| a.as_object());
    let entry = auths.and_then(|a| {
        a.iter()
            .find(|(k, _)| {
                let k = k
                    .trim_start_matches("https://")
                    .trim_start_matches("http://");
                k == registry || k.split('/').next() == Some(registry)
            })
            .map(|(_, e)| e)
    });
    let Some(auth) = entry.and_then(|e| e.get("auth")).and_then(|a| a.as_str()) else {
        return Ok(RegistryAuth::Anonymous);
    };
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(auth)
        .map_err(|e| format!("auths.{registry}.auth is not base64: {e}"))?;
    let decoded = String::from_utf8(decoded).map_err(|e| e.to_string())?;
    match decoded.split_once(':') {
        Some((u, p)) => Ok(RegistryAuth::Basic(u.to_owned(), p.to_owned())),
        None => Err(format!("auths.{registry}.auth is not user:password")),
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<(Vec<u8>, T)> {
    let bytes = std::fs::read(path).map_err(io(path))?;
    let v = serde_json::from_slice(&bytes)
        .map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
    Ok((bytes, v))
}

pub async fn push(
    layout: &Path,
    opts: &PushOptions,
    progress: &(dyn Fn(Event) + Sync),
) -> Result<PushReport> {
    let (_, index): (_, ImageIndex) = read_json(&layout.join("index.json"))?;
    let desc = index.manifests().first().ok_or_else(|| {
        Error::Invalid(format!(
            "{}: index.json lists no manifest",
            layout.display()
        ))
    })?;
    let blob = |digest: &str| {
        layout
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"))
    };
    let manifest_digest = desc.digest().to_string();
    let (manifest_bytes, manifest): (_, ImageManifest) = read_json(&blob(&manifest_digest))?;

    let reference: Reference = opts.reference.parse().map_err(|e| {
        Error::Invalid(format!(
            "{}: not an image reference REGISTRY/NAME[:TAG]: {e}",
            opts.reference
        ))
    })?;
    if reference.digest().is_some() {
        return Err(Error::Invalid(format!(
            "{}: push to a name or tag; the digest is the result",
            opts.reference
        )));
    }
    let registry = reference.resolve_registry().to_owned();
    let protocol = if opts.plain_http {
        ClientProtocol::Http
    } else {
        ClientProtocol::Https
    };
    let client = Client::new(ClientConfig {
        protocol,
        connect_timeout: Some(Duration::from_secs(10)),
        ..Default::default()
    });
    let token = client
        .auth(&reference, &opts.auth, RegistryOperation::Push)
        .await
        .map_err(|e| registry_error(&registry, "authenticating", e))?;
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| Error::Invalid(e.to_string()))?;
    let scheme = if opts.plain_http { "http" } else { "https" };

    let mut report = PushReport::default();
    let blobs = manifest
        .layers()
        .iter()
        .chain(std::iter::once(manifest.config()));
    for d in blobs {
        let digest = d.digest().to_string();
        let size = d.size();
        let url = format!(
            "{scheme}://{registry}/v2/{}/blobs/{digest}",
            reference.repository()
        );
        let mut head = http.head(&url);
        head = match (&token, &opts.auth) {
            (Some(t), _) => head.bearer_auth(t),
            (None, RegistryAuth::Basic(u, p)) => head.basic_auth(u, Some(p)),
            (None, RegistryAuth::Bearer(t)) => head.bearer_auth(t),
            (None, RegistryAuth::Anonymous) => head,
        };
        let exists = match head.send().await {
            Ok(r) if r.status().is_success() => true,
            Ok(r) if r.status() == reqwest::StatusCode::NOT_FOUND => false,
            Ok(r)
                if r.status() == reqwest::StatusCode::UNAUTHORIZED
                    || r.status() == reqwest::StatusCode::FORBIDDEN =>
            {
                return Err(registry_error(
                    &registry,
                    "checking a blob",
                    OciDistributionError::UnauthorizedError { url },
                ))
            }
            Ok(r) => return Err(Error::Invalid(format!("HEAD {url}: {}", r.status()))),
            Err(e) => {
                return Err(registry_error(
                    &registry,
                    "checking a blob",
                    OciDistributionError::RequestError(e),
                ))
            }
        };
        if exists {
            progress(Event::Skipped(&digest, size));
            report.skipped.push((digest, size));
            continue;
        }
        let data = std::fs::read(blob(&digest)).map_err(io(blob(&digest)))?;
        // A layout whose blob no longer matches its name is corrupt: refuse it here rather
        // than count on the registry to check.
        let actual = format!(
            "sha256:{}",
            hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&data))
        );
        if actual != digest || data.len() as u64 != size {
            return Err(Error::Invalid(format!(
                "{}: the layout is corrupt: blob {digest} ({size} bytes) holds {} bytes with digest {actual}; build the image again",
                layout.display(),
                data.len()
            )));
        }
        progress(Event::Uploading(&digest, size));
        let mut attempt = 1;
        loop {
            match client.push_blob(&reference, &data, &digest).await {
                Ok(_) => break,
                Err(e) if attempt < opts.attempts && transient(&e) => {
                    progress(Event::Retrying(&digest, attempt, e.to_string()));
                    tokio::time::sleep(Duration::from_millis(500 << attempt)).await;
                    attempt += 1;
                }
                Err(e) => return Err(registry_error(&registry, &format!("uploading {digest}"), e)),
            }
        }
        progress(Event::Uploaded(&digest, size));
        report.uploaded.push((digest, size));
    }
    let content_type =
        reqwest::header::HeaderValue::from_static("application/vnd.oci.image.manifest.v1+json");
    client
        .push_manifest_raw(&reference, manifest_bytes, content_type)
        .await
        .map_err(|e| registry_error(&registry, "the registry rejected the manifest", e))?;
    report.pinned = format!("{registry}/{}@{manifest_digest}", reference.repository());
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_config_credentials() {
        // base64("ci:s3cret")
        let cfg = r#"{"auths": {"https://registry.example.com": {"auth": "Y2k6czNjcmV0"}, "other.io": {}}}"#;
        match docker_config_auth(cfg, "registry.example.com").unwrap() {
            RegistryAuth::Basic(u, p) => assert_eq!((u.as_str(), p.as_str()), ("ci", "s3cret")),
            _ => panic!("expected basic auth"),
        }
        assert!(matches!(
            docker_config_auth(cfg, "other.io").unwrap(),
            RegistryAuth::Anonymous
        ));
        assert!(
            docker_config_auth(r#"{"auths": {"r": {"auth": "!!"}}}"#, "r")
                .unwrap_err()
                .contains("base64")
        );
    }
}
