//! The store's configuration: one recursive, typed enum. A `[store]` table names its `kind`
//! and that kind's settings; layers (`fast-slow`) hold further store tables, so a deployment
//! composes its stores from config the way Buildbarn's `BlobAccess` configuration does:
//!
//! ```toml
//! [store]
//! kind = "fast-slow"
//! [store.fast]
//! kind = "filesystem"
//! max_size = "50GiB"
//! [store.slow]
//! kind = "s3"
//! endpoint = "https://s3.example.internal"
//! bucket = "lre-cas"
//! ```

use std::path::PathBuf;

use serde::de::Error as _;
use serde::Deserialize;

/// A byte count written either as an integer or as "512MiB", "10GiB", "1TB".
/// A configuration value that is not acceptable: the key it is under (`store.slow.bucket`)
/// and why. Every config error of lre's names its key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config key `{key}`: {message}")]
pub struct InvalidKey {
    pub key: String,
    pub message: String,
}

impl InvalidKey {
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> InvalidKey {
        InvalidKey {
            key: key.into(),
            message: message.into(),
        }
    }
}

impl From<(String, String)> for InvalidKey {
    fn from((key, message): (String, String)) -> InvalidKey {
        InvalidKey { key, message }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl std::str::FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("{s:?} is not a size such as 10GiB"))?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" | "K" => 1 << 10,
            "MiB" | "M" => 1 << 20,
            "GiB" | "G" => 1 << 30,
            "TiB" | "T" => 1 << 40,
            "KB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            "TB" => 1_000_000_000_000,
            u => {
                return Err(format!(
                    "unknown size unit {u:?} in {s:?}; use B, KiB, MiB, GiB, TiB"
                ))
            }
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("{s:?} is too large"))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(ByteSize(n)),
            Raw::S(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// One store, by kind. See the module documentation for the TOML form.
#[derive(Debug, Clone)]
pub enum StoreConfig {
    Filesystem(FilesystemConfig),
    Memory(MemoryConfig),
    S3(S3Config),
    Redis(RedisConfig),
    FastSlow(FastSlowConfig),
    Verify(VerifyConfig),
}

/// The local disk: an LRU-bounded directory of content-addressed files.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilesystemConfig {
    /// Directory of the store; defaults to the user's cache directory.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Size limit, enforced by LRU eviction. Unfinished uploads count against it too.
    #[serde(default = "default_max_size")]
    pub max_size: ByteSize,
    /// Hash each CAS blob read from disk; one that no longer matches its digest is deleted
    /// and reads as a miss, so clients upload it again.
    #[serde(default)]
    pub verify_on_read: bool,
    /// How long a committed blob may stay in the page cache only. A power cut may lose
    /// what was committed in this window; the next start finds and deletes it, and it
    /// reads as a miss. 0: every commit waits for the disk (shared with concurrent ones).
    #[serde(default = "default_sync_interval_ms")]
    pub sync_interval_ms: u64,
    /// Unsynced bytes that make the next commit wait for the disk: what a power cut can
    /// lose, and what the next start hashes after one, at most.
    #[serde(default = "default_max_unsynced")]
    pub max_unsynced: ByteSize,
}

fn default_sync_interval_ms() -> u64 {
    1000
}

fn default_max_unsynced() -> ByteSize {
    ByteSize(256 << 20)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryConfig {
    #[serde(default = "default_max_size")]
    pub max_size: ByteSize,
}

/// An S3-compatible object store (AWS, Garage, MinIO, Ceph RGW), through `object_store`.
/// It has no size limit of its own: expiry is the bucket's lifecycle policy.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    /// `https://host:port`; absent means AWS itself.
    #[serde(default)]
    pub endpoint: Option<String>,
    pub bucket: String,
    #[serde(default = "default_region")]
    pub region: String,
    /// Prepended to every object name, so one bucket can hold several caches.
    #[serde(default)]
    pub prefix: String,
    /// Credentials; when absent, `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` are used.
    #[serde(default)]
    pub access_key_id: Option<String>,
    /// A file holding the secret key, so it stays out of the config file.
    #[serde(default)]
    pub secret_access_key_file: Option<PathBuf>,
    /// Plain `http://` endpoints must be asked for: blobs and action results would cross
    /// the network unencrypted.
    #[serde(default)]
    pub allow_http: bool,
    /// The largest blob accepted (REAPI `max_cas_blob_size_bytes`). The default, 5 GiB, is
    /// what AWS copies in one request; other S3 servers may allow more.
    #[serde(default = "default_s3_max_blob")]
    pub max_blob_size: ByteSize,
    /// Memory that unfinished uploads may hold in part buffers, all together.
    #[serde(default = "default_s3_in_flight")]
    pub max_in_flight: ByteSize,
    /// A request without a body to stream gives up after this long, as UNAVAILABLE; a
    /// GET or copy after this long without a byte.
    #[serde(default = "default_s3_timeout")]
    pub request_timeout_seconds: u64,
}

/// A Redis (or Valkey) server holding whole entries as strings: for action results, which
/// are small, read on every build and must be seen by every replica at once. Eviction is
/// Redis's own (`maxmemory` with `maxmemory-policy allkeys-lru`), or `expire_seconds`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `rediss://host:port/db` (TLS) or `redis://host:port/db`. The password goes in
    /// `password_file`, not in the URL, so the URL can be logged and said in errors.
    pub url: String,
    /// The ACL user (Redis 6+); absent means the default user.
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// `rediss://`: the CA (PEM) that signed the server's certificate; absent means the
    /// system's roots.
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    /// `rediss://` with client certificates (Redis `tls-auth-clients yes`): both, PEM.
    #[serde(default)]
    pub tls_client_cert_file: Option<PathBuf>,
    #[serde(default)]
    pub tls_client_key_file: Option<PathBuf>,
    /// A plain `redis://` URL to another host must be asked for: results would cross the
    /// network unencrypted, open to a man in the middle. Use `rediss://` instead.
    #[serde(default)]
    pub allow_plaintext: bool,
    /// Prepended to every key, so one Redis can hold several caches.
    #[serde(default = "default_redis_prefix")]
    pub prefix: String,
    /// The largest entry accepted. Redis holds each in memory, whole.
    #[serde(default = "default_redis_max_blob")]
    pub max_blob_size: ByteSize,
    /// Memory that unfinished writes may hold, all together, before they are sent.
    #[serde(default = "default_redis_in_flight")]
    pub max_in_flight: ByteSize,
    /// A command not answered within this long fails as UNAVAILABLE.
    #[serde(default = "default_redis_timeout")]
    pub request_timeout_seconds: u64,
    /// When set, entries expire this long after they were last written or read.
    #[serde(default)]
    pub expire_seconds: Option<u64>,
}

/// A local tier in front of a shared one. Writes go to both and are acknowledged only once
/// the slow tier has them; reads try the fast tier, and a slow-tier hit is verified and
/// copied into the fast one.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FastSlowConfig {
    pub fast: Box<StoreConfig>,
    pub slow: Box<StoreConfig>,
}

/// Hashes every CAS blob read from `backend`; one that does not match its name is never
/// served whole (see `store::verify`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyConfig {
    pub backend: Box<StoreConfig>,
}

impl<'de> Deserialize<'de> for StoreConfig {
    /// By hand because `kind` may be left out (the filesystem store, as before layers
    /// existed), which serde's internally tagged enums do not allow.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut table = toml::Table::deserialize(d)?;
        let kind = match table.remove("kind") {
            None => "filesystem".to_owned(),
            Some(toml::Value::String(s)) => s,
            Some(other) => {
                return Err(D::Error::custom(format!(
                    "kind: expected a string, found {}",
                    other.type_str()
                )))
            }
        };
        // serde_path_to_error keeps the key that failed (`verify_on_read`, `slow.bucket`),
        // which a table re-deserialized by hand would otherwise lose.
        fn variant<'de, T: Deserialize<'de>, E: serde::de::Error>(
            kind: &str,
            table: toml::Table,
        ) -> Result<T, E> {
            serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
                let path = e.path().to_string();
                let at = if path == "." {
                    String::new()
                } else {
                    format!("{path}: ")
                };
                E::custom(format!("kind = {kind:?}: {at}{}", e.inner()))
            })
        }
        Ok(match kind.as_str() {
            "filesystem" => StoreConfig::Filesystem(variant(&kind, table)?),
            "memory" => StoreConfig::Memory(variant(&kind, table)?),
            "s3" => StoreConfig::S3(variant(&kind, table)?),
            "redis" => StoreConfig::Redis(variant(&kind, table)?),
            "fast-slow" | "fast_slow" => StoreConfig::FastSlow(variant(&kind, table)?),
            "verify" => StoreConfig::Verify(variant(&kind, table)?),
            other => {
                return Err(D::Error::custom(format!(
                    "unknown store kind {other:?}; expected \"filesystem\", \"memory\", \"s3\", \
                     \"redis\", \"fast-slow\" or \"verify\""
                )))
            }
        })
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig::Filesystem(FilesystemConfig::default())
    }
}

impl Default for FilesystemConfig {
    fn default() -> Self {
        FilesystemConfig {
            path: None,
            max_size: default_max_size(),
            verify_on_read: false,
            sync_interval_ms: default_sync_interval_ms(),
            max_unsynced: default_max_unsynced(),
        }
    }
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            max_size: default_max_size(),
        }
    }
}

impl S3Config {
    /// A config for `bucket` at `endpoint` with every other setting at its default.
    pub fn new(endpoint: Option<String>, bucket: impl Into<String>) -> S3Config {
        S3Config {
            endpoint,
            bucket: bucket.into(),
            region: default_region(),
            prefix: String::new(),
            access_key_id: None,
            secret_access_key_file: None,
            allow_http: false,
            max_blob_size: default_s3_max_blob(),
            max_in_flight: default_s3_in_flight(),
            request_timeout_seconds: default_s3_timeout(),
        }
    }
}

impl RedisConfig {
    /// A config for `url` with every other setting at its default.
    pub fn new(url: impl Into<String>) -> RedisConfig {
        RedisConfig {
            url: url.into(),
            username: None,
            password_file: None,
            tls_ca_file: None,
            tls_client_cert_file: None,
            tls_client_key_file: None,
            allow_plaintext: false,
            prefix: default_redis_prefix(),
            max_blob_size: default_redis_max_blob(),
            max_in_flight: default_redis_in_flight(),
            request_timeout_seconds: default_redis_timeout(),
            expire_seconds: None,
        }
    }

    /// Whether the URL asks for TLS (`rediss://`).
    pub fn tls(&self) -> bool {
        self.url.starts_with("rediss://")
    }

    /// The host the URL names, for the plaintext rule; `None` when it does not parse.
    fn host(&self) -> Option<String> {
        let rest = self
            .url
            .strip_prefix("redis://")
            .or_else(|| self.url.strip_prefix("rediss://"))?;
        let authority = rest.split('/').next()?;
        let host_port = authority.rsplit('@').next()?;
        let host = match host_port.strip_prefix('[') {
            Some(v6) => v6.split(']').next()?,
            None => host_port.split(':').next()?,
        };
        Some(host.to_owned())
    }
}

const TEN_YEARS: u64 = 10 * 365 * 24 * 3600;

fn default_redis_prefix() -> String {
    "lre:".to_owned()
}
fn default_redis_max_blob() -> ByteSize {
    // Action results are a few KiB; a result with thousands of outputs stays far below.
    ByteSize(16 << 20)
}
fn default_redis_in_flight() -> ByteSize {
    ByteSize(256 << 20)
}
fn default_redis_timeout() -> u64 {
    10
}

fn default_max_size() -> ByteSize {
    ByteSize(10 * 1024 * 1024 * 1024)
}
fn default_region() -> String {
    "us-east-1".to_owned()
}
fn default_s3_max_blob() -> ByteSize {
    // AWS copies at most 5 GiB in one CopyObject, which commit uses for multipart uploads.
    ByteSize(5 << 30)
}
fn default_s3_in_flight() -> ByteSize {
    ByteSize(256 << 20)
}
fn default_s3_timeout() -> u64 {
    60
}

/// Where the embedded default keeps its blobs: `$XDG_CACHE_HOME/lre/cas`.
pub fn default_store_path() -> PathBuf {
    dirs::cache_dir()
        .unwrap_or_else(std::env::temp_dir)
        .join("lre")
        .join("cas")
}

impl StoreConfig {
    /// A memory store of `max_size` bytes.
    pub fn memory(max_size: u64) -> StoreConfig {
        StoreConfig::Memory(MemoryConfig {
            max_size: ByteSize(max_size),
        })
    }

    /// A filesystem store at `path` (the default directory when `None`).
    pub fn filesystem(path: Option<PathBuf>, max_size: u64) -> StoreConfig {
        StoreConfig::Filesystem(FilesystemConfig {
            path,
            max_size: ByteSize(max_size),
            verify_on_read: false,
            sync_interval_ms: default_sync_interval_ms(),
            max_unsynced: default_max_unsynced(),
        })
    }

    /// The largest blob this store can take: a layer takes what all its tiers can.
    pub fn capacity(&self) -> u64 {
        match self {
            StoreConfig::Filesystem(c) => c.max_size.0,
            StoreConfig::Memory(c) => c.max_size.0,
            StoreConfig::S3(c) => c.max_blob_size.0,
            StoreConfig::Redis(c) => c.max_blob_size.0,
            StoreConfig::FastSlow(c) => c.fast.capacity().min(c.slow.capacity()),
            StoreConfig::Verify(c) => c.backend.capacity(),
        }
    }

    /// Checks what serde cannot. An error names the key (`store.slow.bucket`) under
    /// `prefix`, the key of this table.
    pub fn validate(&self, prefix: &str) -> Result<(), InvalidKey> {
        let key = |k: &str| format!("{prefix}.{k}");
        match self {
            StoreConfig::Filesystem(c) => {
                if c.max_size.0 == 0 {
                    return Err(InvalidKey::from((
                        key("max_size"),
                        "must be greater than zero".into(),
                    )));
                }
            }
            StoreConfig::Memory(c) => {
                if c.max_size.0 == 0 {
                    return Err(InvalidKey::from((
                        key("max_size"),
                        "must be greater than zero".into(),
                    )));
                }
            }
            StoreConfig::S3(c) => {
                if c.bucket.is_empty() {
                    return Err(InvalidKey::from((
                        key("bucket"),
                        "must not be empty".into(),
                    )));
                }
                if let Some(e) = &c.endpoint {
                    if e.starts_with("http://") {
                        if !c.allow_http {
                            return Err(InvalidKey::from((
                                key("endpoint"),
                                format!(
                                    "{e:?} is plain HTTP: blobs and results would cross the \
                                     network unencrypted; use https:// or set {} = true",
                                    key("allow_http")
                                ),
                            )));
                        }
                    } else if !e.starts_with("https://") {
                        return Err(InvalidKey::from((
                            key("endpoint"),
                            format!("{e:?} is not an http(s) URL"),
                        )));
                    }
                }
                if c.access_key_id.is_some() != c.secret_access_key_file.is_some() {
                    return Err(InvalidKey::from((
                        key("secret_access_key_file"),
                        "access_key_id and secret_access_key_file go together".into(),
                    )));
                }
                if c.max_blob_size.0 == 0 {
                    return Err(InvalidKey::from((
                        key("max_blob_size"),
                        "must be greater than zero".into(),
                    )));
                }
                if c.max_in_flight.0 < 16 << 20 {
                    return Err(InvalidKey::from((
                        key("max_in_flight"),
                        "must be at least 16MiB (two upload parts)".into(),
                    )));
                }
                if c.request_timeout_seconds == 0 {
                    return Err(InvalidKey::from((
                        key("request_timeout_seconds"),
                        "must be at least 1".into(),
                    )));
                }
            }
            StoreConfig::Redis(c) => {
                let Some(host) = c.host() else {
                    return Err(InvalidKey::from((
                        key("url"),
                        format!(
                            "{:?} is not a rediss://host:port/db (TLS) or redis://host:port/db URL",
                            c.url
                        ),
                    )));
                };
                if c.url.contains('@') {
                    return Err(InvalidKey::from((
                        key("url"),
                        format!(
                            "holds credentials; put the password in {} (and the user in {}) \
                             so the URL can be logged",
                            key("password_file"),
                            key("username")
                        ),
                    )));
                }
                let loopback = host == "localhost"
                    || host
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback());
                if !c.tls()
                    && (c.tls_ca_file.is_some()
                        || c.tls_client_cert_file.is_some()
                        || c.tls_client_key_file.is_some())
                {
                    return Err(InvalidKey::from((
                        key("url"),
                        "TLS files are set but the URL is not rediss://".into(),
                    )));
                }
                if c.tls_client_cert_file.is_some() != c.tls_client_key_file.is_some() {
                    return Err(InvalidKey::from((
                        key("tls_client_key_file"),
                        "tls_client_cert_file and tls_client_key_file go together".into(),
                    )));
                }
                if !c.tls() && !loopback && !c.allow_plaintext {
                    return Err(InvalidKey::from((
                        key("url"),
                        format!(
                            "{:?} is plain TCP to another host: action results would cross \
                             the network unencrypted; use rediss:// (TLS), or set {} = true \
                             on a network you trust",
                            c.url,
                            key("allow_plaintext")
                        ),
                    )));
                }
                if c.max_blob_size.0 == 0 || c.max_blob_size.0 > 512 << 20 {
                    return Err(InvalidKey::from((
                        key("max_blob_size"),
                        "must be between 1 byte and 512MiB (Redis's largest string)".into(),
                    )));
                }
                if c.max_in_flight.0 < c.max_blob_size.0 {
                    return Err(InvalidKey::from((
                        key("max_in_flight"),
                        "must be at least max_blob_size".into(),
                    )));
                }
                if c.request_timeout_seconds == 0 {
                    return Err(InvalidKey::from((
                        key("request_timeout_seconds"),
                        "must be at least 1".into(),
                    )));
                }
                if c.expire_seconds.is_some_and(|t| t == 0 || t > TEN_YEARS) {
                    return Err(InvalidKey::from((
                        key("expire_seconds"),
                        format!("must be between 1 and {TEN_YEARS} (ten years)"),
                    )));
                }
                if c.username.is_some() && c.password_file.is_none() {
                    return Err(InvalidKey::from((
                        key("password_file"),
                        format!(
                            "is needed with {}: Redis takes the user only with its password",
                            key("username")
                        ),
                    )));
                }
            }
            StoreConfig::Verify(c) => {
                if let StoreConfig::FastSlow(_) = &*c.backend {
                    // A bad local copy would make it delete the shared, good one: the
                    // fast-slow layer already hashes what it reads from the slow tier.
                    return Err(InvalidKey::from((
                        key("backend"),
                        "is a fast-slow store: put the verify layer on its slow tier instead \
                         (and verify_on_read on a filesystem fast tier)"
                            .into(),
                    )));
                }
                c.backend.validate(&key("backend"))?
            }
            StoreConfig::FastSlow(c) => {
                c.fast.validate(&key("fast"))?;
                c.slow.validate(&key("slow"))?;
                if let (StoreConfig::Filesystem(f), StoreConfig::Filesystem(s)) =
                    (&*c.fast, &*c.slow)
                {
                    let dir = |p: &Option<PathBuf>| p.clone().unwrap_or_else(default_store_path);
                    if dir(&f.path) == dir(&s.path) {
                        return Err(InvalidKey::from((
                            key("slow.path"),
                            "is the fast tier's directory too: two stores in one directory \
                             would evict each other's files"
                                .into(),
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    /// The keys of shared stores (S3, Redis) whose CAS blobs are served without their hash
    /// being checked: not under a `verify` layer, nor the slow tier of a fast-slow store
    /// (which checks what it reads). Whoever can write to the bucket or the Redis could
    /// then serve anything under any digest.
    pub fn shared_without_verify(&self, prefix: &str) -> Vec<String> {
        let key = |k: &str| format!("{prefix}.{k}");
        match self {
            StoreConfig::S3(_) | StoreConfig::Redis(_) => vec![prefix.to_string()],
            StoreConfig::Filesystem(_) | StoreConfig::Memory(_) | StoreConfig::Verify(_) => {
                Vec::new()
            }
            StoreConfig::FastSlow(c) => {
                let mut v = c.fast.shared_without_verify(&key("fast"));
                if !matches!(&*c.slow, StoreConfig::S3(_) | StoreConfig::Redis(_)) {
                    v.extend(c.slow.shared_without_verify(&key("slow")));
                }
                v
            }
        }
    }

    /// Every directory a filesystem store in this config uses (its default when unset).
    pub fn filesystem_dirs(&self) -> Vec<PathBuf> {
        match self {
            StoreConfig::Filesystem(c) => {
                vec![c.path.clone().unwrap_or_else(default_store_path)]
            }
            StoreConfig::Memory(_) | StoreConfig::S3(_) | StoreConfig::Redis(_) => Vec::new(),
            StoreConfig::Verify(c) => c.backend.filesystem_dirs(),
            StoreConfig::FastSlow(c) => {
                let mut v = c.fast.filesystem_dirs();
                v.extend(c.slow.filesystem_dirs());
                v
            }
        }
    }

    /// The size limit of the first local (filesystem or memory) store, fast tier first:
    /// what a command-line `--max-size` sets.
    pub fn local_max_size_mut(&mut self) -> Option<&mut ByteSize> {
        match self {
            StoreConfig::Filesystem(c) => Some(&mut c.max_size),
            StoreConfig::Memory(c) => Some(&mut c.max_size),
            StoreConfig::S3(_) | StoreConfig::Redis(_) => None,
            StoreConfig::Verify(c) => c.backend.local_max_size_mut(),
            StoreConfig::FastSlow(c) => match c.fast.local_max_size_mut() {
                Some(m) => Some(m),
                None => c.slow.local_max_size_mut(),
            },
        }
    }

    /// The local store's size limit, or the default when there is none.
    pub fn local_max_size(&self) -> ByteSize {
        self.clone()
            .local_max_size_mut()
            .copied()
            .unwrap_or_else(default_max_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Doc {
        store: StoreConfig,
    }

    fn parse(s: &str) -> Result<StoreConfig, String> {
        toml::from_str::<Doc>(s)
            .map(|d| d.store)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn sizes_parse() {
        assert_eq!("10GiB".parse::<ByteSize>().unwrap(), ByteSize(10 << 30));
        assert_eq!("512".parse::<ByteSize>().unwrap(), ByteSize(512));
        assert!("12XB".parse::<ByteSize>().is_err());
    }

    #[test]
    fn kind_defaults_to_filesystem() {
        let c = parse("[store]\nmax_size = \"1GiB\"\n").unwrap();
        assert!(matches!(c, StoreConfig::Filesystem(f) if f.max_size == ByteSize(1 << 30)));
    }

    #[test]
    fn layers_nest_and_errors_name_the_key() {
        let text = "[store]\nkind = \"fast-slow\"\n[store.fast]\nkind = \"memory\"\n\
                    [store.slow]\nkind = \"s3\"\nbucket = \"b\"\nendpoint = \"http://127.0.0.1:9\"\n";
        let c = parse(text).unwrap();
        let InvalidKey { key: k, message: m } = c.validate("store").unwrap_err();
        assert_eq!(k, "store.slow.endpoint", "{m}");
        assert!(m.contains("store.slow.allow_http"), "{m}");
        let ok = parse(&format!("{text}allow_http = true\n")).unwrap();
        ok.validate("store").unwrap();
        assert_eq!(
            ok.capacity(),
            5 << 30,
            "the smaller tier: S3's default max_blob_size"
        );
    }

    #[test]
    fn unknown_fields_and_kinds_are_refused() {
        let e = parse("[store]\nkind = \"s3\"\nbucket = \"b\"\nbukket = 1\n").unwrap_err();
        assert!(e.contains("bukket") && e.contains("s3"), "{e}");
        let e = parse("[store]\nkind = \"tape\"\n").unwrap_err();
        assert!(e.contains("tape"), "{e}");
        let e = parse("[store]\nkind = \"s3\"\n").unwrap_err();
        assert!(e.contains("bucket"), "{e}");
        let e = parse("[store]\nkind = \"memory\"\npath = \"/x\"\n").unwrap_err();
        assert!(e.contains("path"), "{e}");
    }

    #[test]
    fn redis_urls_are_checked() {
        let at = |url: &str, extra: &str| {
            parse(&format!(
                "[store]\nkind = \"redis\"\nurl = {url:?}\n{extra}"
            ))
            .unwrap()
            .validate("ac")
        };
        at("redis://127.0.0.1:6379/0", "").unwrap();
        at("redis://localhost", "").unwrap();
        at("redis://[::1]:6379", "").unwrap();
        let InvalidKey { key: k, message: m } = at("redis://redis.internal:6379", "").unwrap_err();
        assert_eq!(k, "ac.url");
        assert!(m.contains("ac.allow_plaintext"), "{m}");
        at("redis://redis.internal:6379", "allow_plaintext = true\n").unwrap();
        let InvalidKey { key: k, message: m } = at("redis://:hunter2@127.0.0.1", "").unwrap_err();
        assert!(k == "ac.url" && m.contains("ac.password_file"), "{m}");
        at("rediss://redis.internal:6380/0", "").unwrap();
        at("rediss://redis.internal", "tls_ca_file = \"/ca.pem\"\n").unwrap();
        let InvalidKey { key: k, message: m } =
            at("redis://127.0.0.1", "tls_ca_file = \"/ca.pem\"\n").unwrap_err();
        assert!(k == "ac.url" && m.contains("rediss://"), "{m}");
        let InvalidKey { key: k, .. } =
            at("rediss://r", "tls_client_cert_file = \"/c.pem\"\n").unwrap_err();
        assert_eq!(k, "ac.tls_client_key_file");
        let InvalidKey { message: m, .. } = at("valkey://127.0.0.1", "").unwrap_err();
        assert!(m.contains("rediss://"), "{m}");
        assert_eq!(
            at("redis://127.0.0.1", "max_blob_size = \"1GiB\"\n")
                .unwrap_err()
                .key,
            "ac.max_blob_size"
        );
        assert_eq!(
            at("redis://127.0.0.1", "username = \"lre\"\n")
                .unwrap_err()
                .key,
            "ac.password_file",
            "Redis drops a user sent without a password"
        );
        assert_eq!(
            at("redis://127.0.0.1", "expire_seconds = 999999999999\n").map_err(|e| e.key),
            Err("ac.expire_seconds".to_owned())
        );
    }

    #[test]
    fn a_verify_layer_wraps_any_store_and_errors_name_its_key() {
        let c =
            parse("[store]\nkind = \"verify\"\n[store.backend]\nkind = \"memory\"\nmax_size = 0\n")
                .unwrap();
        assert_eq!(
            c.validate("store").unwrap_err().key,
            "store.backend.max_size"
        );
        let e = parse("[store]\nkind = \"verify\"\n").unwrap_err();
        assert!(e.contains("backend"), "{e}");
        let over_tiers = parse(
            "[store]\nkind = \"verify\"\n[store.backend]\nkind = \"fast-slow\"\n\
             [store.backend.fast]\nkind = \"memory\"\n[store.backend.slow]\nkind = \"memory\"\n",
        )
        .unwrap();
        let InvalidKey { key: k, message: m } = over_tiers.validate("store").unwrap_err();
        assert!(k == "store.backend" && m.contains("slow tier"), "{k}: {m}");
    }

    #[test]
    fn one_directory_cannot_be_both_tiers() {
        let c = parse(
            "[store]\nkind = \"fast-slow\"\n[store.fast]\npath = \"/d\"\n[store.slow]\npath = \"/d\"\n",
        )
        .unwrap();
        assert_eq!(c.validate("store").unwrap_err().key, "store.slow.path");
    }
}
