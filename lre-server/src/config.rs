//! The server's one typed configuration: a TOML file plus command-line overrides,
//! validated at start so that a bad key fails loudly before anything listens.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::auth::{Scope, TokenConfig};
pub use lre_store::config::{default_store_path, ByteSize, StoreConfig};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config key `{key}`: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// REAPI gRPC endpoint.
    #[serde(default = "default_grpc_listen")]
    pub grpc_listen: SocketAddr,
    /// HTTP cache protocol, `/metrics` and `/healthz`. `None` disables the HTTP port.
    #[serde(default = "default_http_listen")]
    pub http_listen: Option<SocketAddr>,
    /// Host names the HTTP port answers to besides IP addresses and `localhost` (without
    /// TLS; under TLS every name is served). A request naming another host is refused, so
    /// a web page cannot reach the server under its own name (DNS rebinding).
    #[serde(default)]
    pub http_allowed_hosts: Vec<String>,
    /// Allowed instance names (also HTTP path prefixes). Absent means any name is accepted.
    #[serde(default)]
    pub instances: Option<Vec<String>>,
    /// Per-instance settings, by instance name (the default instance is `""`):
    /// `[instance_settings.main] executed_only = true`.
    #[serde(default)]
    pub instance_settings: std::collections::BTreeMap<String, crate::instance::InstanceSettings>,
    /// Limit on the summed size of blobs in one BatchUpdateBlobs/BatchReadBlobs call.
    #[serde(default = "default_max_batch")]
    pub max_batch_total_size_bytes: u64,
    #[serde(default)]
    pub store: StoreConfig,
    /// Where action results live, when not beside the CAS in `store`: typically Redis,
    /// which every replica reads and writes at once.
    #[serde(default)]
    pub action_cache_store: Option<StoreConfig>,
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    #[serde(default)]
    pub auth: AuthConfig,
    /// Seconds to let in-flight requests finish after SIGTERM.
    #[serde(default = "default_grace")]
    pub shutdown_grace_seconds: u64,
    /// How long an interrupted ByteStream upload stays resumable before its data is dropped.
    #[serde(default = "default_upload_ttl")]
    pub upload_ttl_seconds: u64,
    #[serde(default)]
    pub execution: ExecutionConfig,
    /// The Remote Asset API (Fetch/Push) and its downloader's limits.
    #[serde(default)]
    pub asset: crate::asset::AssetConfig,
    /// The status page's history bounds, and whether `/metrics` needs a token.
    #[serde(default)]
    pub status: crate::status::StatusConfig,
    /// Per-port connection caps and timeouts against slow, idle and flooding clients.
    #[serde(default)]
    pub connections: ConnectionsConfig,
}

/// The `[connections]` table. Each port (gRPC and HTTP) counts and limits its own
/// connections, so a flood on one leaves the other reachable.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectionsConfig {
    /// Connections one port holds at once; further ones are closed as soon as accepted.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Time from accepting a connection to a finished TLS handshake and, on the gRPC
    /// port, to the client's HTTP/2 connection preface.
    #[serde(default = "default_handshake_timeout")]
    pub handshake_timeout_seconds: u64,
    /// HTTP port: a request's headers must arrive within this long of the connection
    /// opening or the previous response ending (so it also ends idle keep-alive
    /// connections).
    #[serde(default = "default_header_read_timeout")]
    pub header_read_timeout_seconds: u64,
    /// HTTP port: a connection on which nothing is sent or received for this long is
    /// closed, also mid-request. gRPC port: a connection silent this long is sent an
    /// HTTP/2 PING.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout_seconds: u64,
    /// gRPC port: a PING not answered within this long closes the connection.
    #[serde(default = "default_keepalive_timeout")]
    pub keepalive_timeout_seconds: u64,
    /// gRPC port: calls running at once on one connection.
    #[serde(default = "default_max_concurrent_streams")]
    pub max_concurrent_streams: u32,
    /// gRPC port: a ByteStream read whose client takes nothing, or a write whose client
    /// sends nothing, for this long is ended with ABORTED, its file closed.
    #[serde(default = "default_stream_stall_timeout")]
    pub stream_stall_timeout_seconds: u64,
}

impl Default for ConnectionsConfig {
    fn default() -> Self {
        ConnectionsConfig {
            max_connections: default_max_connections(),
            handshake_timeout_seconds: default_handshake_timeout(),
            header_read_timeout_seconds: default_header_read_timeout(),
            idle_timeout_seconds: default_idle_timeout(),
            keepalive_timeout_seconds: default_keepalive_timeout(),
            max_concurrent_streams: default_max_concurrent_streams(),
            stream_stall_timeout_seconds: default_stream_stall_timeout(),
        }
    }
}

/// Two ports at this many each stay below the common 1024 open-file limit, with room for
/// the store.
fn default_max_connections() -> usize {
    400
}
fn default_handshake_timeout() -> u64 {
    10
}
fn default_header_read_timeout() -> u64 {
    30
}
fn default_idle_timeout() -> u64 {
    120
}
fn default_keepalive_timeout() -> u64 {
    20
}
fn default_max_concurrent_streams() -> u32 {
    1000
}

fn default_stream_stall_timeout() -> u64 {
    60
}

impl ConnectionsConfig {
    /// On failure returns the offending key and why.
    pub fn validate(&self) -> Result<(), (String, String)> {
        for (k, v) in [
            ("connections.max_connections", self.max_connections as u64),
            (
                "connections.handshake_timeout_seconds",
                self.handshake_timeout_seconds,
            ),
            (
                "connections.header_read_timeout_seconds",
                self.header_read_timeout_seconds,
            ),
            (
                "connections.idle_timeout_seconds",
                self.idle_timeout_seconds,
            ),
            (
                "connections.keepalive_timeout_seconds",
                self.keepalive_timeout_seconds,
            ),
            (
                "connections.max_concurrent_streams",
                u64::from(self.max_concurrent_streams),
            ),
            (
                "connections.stream_stall_timeout_seconds",
                self.stream_stall_timeout_seconds,
            ),
        ] {
            if v == 0 {
                return Err((k.to_string(), "must be at least 1".to_string()));
            }
        }
        // tokio's semaphore holds at most usize::MAX >> 3 permits.
        if self.max_connections > tokio::sync::Semaphore::MAX_PERMITS {
            return Err((
                "connections.max_connections".to_string(),
                format!("must be at most {}", tokio::sync::Semaphore::MAX_PERMITS),
            ));
        }
        Ok(())
    }
}

/// Remote execution: the scheduler and the endpoint workers connect to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecutionConfig {
    /// Serve Execute/WaitExecution/Operations and the worker endpoint, and advertise
    /// `exec_enabled` in Capabilities.
    #[serde(default)]
    pub enabled: bool,
    /// Timeout for actions that set none.
    #[serde(default = "default_action_timeout")]
    pub default_timeout_seconds: u64,
    /// Actions asking for more are refused.
    #[serde(default = "default_max_action_timeout")]
    pub max_timeout_seconds: u64,
    /// Workers lost under one action before it fails.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Workers send keepalives this often; one silent for three intervals is dropped.
    #[serde(default = "default_keepalive")]
    pub keepalive_seconds: u64,
    /// Platforms of workers that may not be connected yet: matching actions wait for them
    /// instead of failing at once. Each entry maps property names to values.
    #[serde(default)]
    pub known_platforms: Vec<std::collections::BTreeMap<String, String>>,
    /// Actions waiting for a worker; Execute past it gets RESOURCE_EXHAUSTED.
    #[serde(default = "default_max_queued")]
    pub max_queued_actions: usize,
    /// Operations tracked at once (queued, running, and finished ones for WaitExecution).
    #[serde(default = "default_max_operations")]
    pub max_operations: usize,
    /// Share the queue, operations, in-flight deduplication and worker registrations
    /// with every replica that names the same Redis (keys under its `prefix` + "sched:").
    /// Absent: this process schedules alone, in memory.
    #[serde(default)]
    pub redis: Option<lre_store::config::RedisConfig>,
    /// With `redis`: how long a replica's hold on an executing action lasts without being
    /// renewed. A replica that dies loses its actions to the others after this long.
    #[serde(default = "default_lease")]
    pub lease_seconds: u64,
    /// How long an action waits for a worker that may be reconnecting instead of failing
    /// as one no worker can run: after start while no worker is connected, and after the
    /// last worker offering its platform left. 0 fails such actions at once.
    #[serde(default = "default_worker_grace")]
    pub worker_grace_seconds: u64,
}

fn default_worker_grace() -> u64 {
    30
}

fn default_lease() -> u64 {
    15
}

impl Default for ExecutionConfig {
    fn default() -> Self {
        ExecutionConfig {
            enabled: false,
            default_timeout_seconds: default_action_timeout(),
            max_timeout_seconds: default_max_action_timeout(),
            max_attempts: default_max_attempts(),
            keepalive_seconds: default_keepalive(),
            known_platforms: vec![],
            max_queued_actions: default_max_queued(),
            max_operations: default_max_operations(),
            redis: None,
            lease_seconds: default_lease(),
            worker_grace_seconds: default_worker_grace(),
        }
    }
}

fn default_max_queued() -> usize {
    100_000
}
fn default_max_operations() -> usize {
    200_000
}

fn default_action_timeout() -> u64 {
    900
}
fn default_max_action_timeout() -> u64 {
    3 * 3600
}
fn default_max_attempts() -> u32 {
    3
}
fn default_keepalive() -> u64 {
    10
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// CA bundle that client certificates must chain to (mTLS).
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    #[serde(default)]
    pub require_client_cert: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// What callers without credentials may do.
    #[serde(default = "default_anonymous")]
    pub anonymous: Scope,
    #[serde(default)]
    pub tokens: Vec<TokenConfig>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            anonymous: default_anonymous(),
            tokens: vec![],
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            grpc_listen: default_grpc_listen(),
            http_listen: default_http_listen(),
            http_allowed_hosts: Vec::new(),
            instances: None,
            instance_settings: Default::default(),
            max_batch_total_size_bytes: default_max_batch(),
            store: StoreConfig::default(),
            action_cache_store: None,
            tls: None,
            auth: AuthConfig::default(),
            shutdown_grace_seconds: default_grace(),
            upload_ttl_seconds: default_upload_ttl(),
            execution: ExecutionConfig::default(),
            asset: crate::asset::AssetConfig::default(),
            status: crate::status::StatusConfig::default(),
            connections: ConnectionsConfig::default(),
        }
    }
}

fn default_grpc_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8980))
}
fn default_http_listen() -> Option<SocketAddr> {
    Some(SocketAddr::from(([127, 0, 0, 1], 8981)))
}
fn default_max_batch() -> u64 {
    4 * 1024 * 1024
}
fn default_anonymous() -> Scope {
    Scope::ReadWrite
}
fn default_grace() -> u64 {
    10
}
fn default_upload_ttl() -> u64 {
    600
}

impl Config {
    /// A throwaway server: memory store, gRPC on a free loopback port, no HTTP port. For
    /// tests, benchmarks and embedding.
    pub fn ephemeral() -> Config {
        let mut c = Config {
            grpc_listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            http_listen: None,
            ..Config::default()
        };
        c.store = StoreConfig::memory(c.store.local_max_size().0);
        c
    }

    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text).map_err(|message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        })
    }

    pub fn from_toml(text: &str) -> Result<Config, String> {
        // toml's messages name the offending key and line, which is what users need.
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// What is allowed but probably a mistake, for `check-config` and the log at start.
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        let mut stores = vec![("store", &self.store)];
        if let Some(ac) = &self.action_cache_store {
            stores.push(("action_cache_store", ac));
        }
        for (name, store) in stores {
            for key in store.shared_without_verify(name) {
                w.push(format!(
                    "`{key}` is a shared store (S3 or Redis) whose blobs are served without \
                     their hash being checked: anyone who can write to it can make this \
                     server serve anything under any digest. Put it under a verify layer \
                     (kind = \"verify\", backend = …) or make it the slow tier of a \
                     fast-slow store"
                ));
            }
        }
        w
    }

    /// Checks everything serde cannot: cross-field rules and files that must exist.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.store
            .validate("store")
            .map_err(|(k, m)| invalid(k, m))?;
        if let Some(ac) = &self.action_cache_store {
            ac.validate("action_cache_store")
                .map_err(|(k, m)| invalid(k, m))?;
            let cas_dirs = self.store.filesystem_dirs();
            if let Some(dir) = ac.filesystem_dirs().iter().find(|d| cas_dirs.contains(d)) {
                return Err(invalid(
                    "action_cache_store",
                    format!(
                        "uses {}, a directory of `store` too: two stores in one directory \
                         would evict each other's files; give it a path of its own",
                        dir.display()
                    ),
                ));
            }
        }
        let e = &self.execution;
        if e.default_timeout_seconds == 0 || e.default_timeout_seconds > e.max_timeout_seconds {
            return Err(invalid(
                "execution.default_timeout_seconds",
                "must be between 1 and execution.max_timeout_seconds",
            ));
        }
        if e.max_attempts == 0 {
            return Err(invalid("execution.max_attempts", "must be at least 1"));
        }
        if e.keepalive_seconds == 0 {
            return Err(invalid("execution.keepalive_seconds", "must be at least 1"));
        }
        if e.max_queued_actions == 0 {
            return Err(invalid(
                "execution.max_queued_actions",
                "must be at least 1",
            ));
        }
        if e.worker_grace_seconds > 3600 {
            return Err(invalid(
                "execution.worker_grace_seconds",
                "must be at most 3600",
            ));
        }
        if e.max_operations < e.max_queued_actions {
            return Err(invalid(
                "execution.max_operations",
                "must be at least execution.max_queued_actions",
            ));
        }
        if let Some(r) = &e.redis {
            lre_store::config::StoreConfig::Redis(r.clone())
                .validate("execution.redis")
                .map_err(|(k, m)| invalid(k, m))?;
        }
        if !(3..=600).contains(&e.lease_seconds) {
            return Err(invalid(
                "execution.lease_seconds",
                "must be between 3 and 600 (leases are renewed every 2 seconds)",
            ));
        }
        self.status.validate().map_err(|(k, m)| invalid(k, m))?;
        self.connections
            .validate()
            .map_err(|(k, m)| invalid(k, m))?;
        self.asset
            .validate(self.store.capacity())
            .map_err(|(k, m)| invalid(k, m))?;
        if self.upload_ttl_seconds == 0 {
            return Err(invalid("upload_ttl_seconds", "must be at least 1"));
        }
        if self.max_batch_total_size_bytes < 1024 {
            return Err(invalid(
                "max_batch_total_size_bytes",
                "must be at least 1024",
            ));
        }
        if self.http_listen == Some(self.grpc_listen) && self.grpc_listen.port() != 0 {
            return Err(invalid("http_listen", "must differ from grpc_listen"));
        }
        if let Some(names) = &self.instances {
            for name in names {
                crate::instance::validate_name(name)
                    .map_err(|e| invalid("instances", e.to_string()))?;
            }
        }
        for (name, settings) in &self.instance_settings {
            let key = format!("instance_settings.{}", crate::instance::toml_key(name));
            crate::instance::validate_name(name).map_err(|e| invalid(&key, e.to_string()))?;
            if let Some(allowed) = &self.instances {
                if !allowed.contains(name) {
                    return Err(invalid(
                        &key,
                        format!("{name:?} is not in the top-level `instances` list"),
                    ));
                }
            }
            if settings.executed_only && !self.execution.enabled {
                return Err(invalid(
                    format!("{key}.executed_only"),
                    "needs execution.enabled = true: results come only from executions, so \
                     without them nothing could ever be cached",
                ));
            }
        }
        if let Some(tls) = &self.tls {
            for (key, path) in [
                ("tls.cert", Some(&tls.cert)),
                ("tls.key", Some(&tls.key)),
                ("tls.client_ca", tls.client_ca.as_ref()),
            ] {
                if let Some(path) = path {
                    if !path.is_file() {
                        return Err(invalid(
                            key,
                            format!("{} is not a readable file", path.display()),
                        ));
                    }
                }
            }
            if tls.require_client_cert && tls.client_ca.is_none() {
                return Err(invalid(
                    "tls.require_client_cert",
                    "needs tls.client_ca to verify client certificates against",
                ));
            }
        }
        if self.auth.anonymous == Scope::Worker {
            return Err(invalid(
                "auth.anonymous",
                "cannot be \"worker\": workers authenticate with a token of scope \"worker\"",
            ));
        }
        if self.auth.anonymous == Scope::Admin {
            return Err(invalid(
                "auth.anonymous",
                "cannot be \"admin\": operators authenticate with a token of scope \"admin\"",
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, t) in self.auth.tokens.iter().enumerate() {
            let key = format!("auth.tokens[{i}]");
            t.validate()
                .map_err(|(field, message)| invalid(format!("{key}.{field}"), message))?;
            if let Some(list) = &t.instances {
                if list.is_empty() {
                    return Err(invalid(
                        format!("{key}.instances"),
                        "is empty, so the token could do nothing; omit it to allow every instance",
                    ));
                }
                if let Some(allowed) = &self.instances {
                    if let Some(bad) = list.iter().find(|i| !allowed.contains(i)) {
                        return Err(invalid(
                            format!("{key}.instances"),
                            format!("{bad:?} is not in the top-level `instances` list"),
                        ));
                    }
                }
            }
            if !seen.insert(t.name.clone()) {
                return Err(invalid(
                    format!("{key}.name"),
                    format!("duplicate token name {:?}", t.name),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_key_is_named() {
        let err = Config::from_toml("grpc_listen = \"127.0.0.1:1\"\nbogus = 1\n").unwrap_err();
        assert!(err.contains("bogus"), "{err}");
    }

    #[test]
    fn bad_scope_is_named() {
        let err = Config::from_toml(
            "[[auth.tokens]]\nname = \"ci\"\nsha256 = \"00\"\nscope = \"root\"\n",
        )
        .unwrap_err();
        assert!(err.contains("root"), "{err}");
    }

    #[test]
    fn instance_settings_are_checked_by_key() {
        let c = Config::from_toml("[instance_settings.main]\nexecuted_only = true\n").unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("instance_settings.main.executed_only") && e.contains("execution.enabled"),
            "{e}"
        );
        let c = Config::from_toml(
            "instances = [\"main\"]\n[execution]\nenabled = true\n\
             [instance_settings.other]\nexecuted_only = true\n",
        )
        .unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("instance_settings.other") && e.contains("instances"),
            "{e}"
        );
        let c = Config::from_toml(
            "[execution]\nenabled = true\n[instance_settings.\"\"]\nexecuted_only = true\n",
        )
        .unwrap();
        c.validate().unwrap();
        assert!(
            Config::from_toml("[instance_settings.main]\nexecuted = true\n")
                .unwrap_err()
                .contains("executed")
        );
        let e = Config::from_toml("[auth]\nanonymous = \"admin\"\n")
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("auth.anonymous"), "{e}");
    }

    #[test]
    fn a_shared_store_without_verify_is_warned_about_by_key() {
        let text = |store: &str| {
            Config::from_toml(&format!(
                "[store]\n{store}\n[store.slow]\nkind = \"s3\"\nbucket = \"b\"\n\
                 endpoint = \"http://127.0.0.1:1\"\nallow_http = true\n"
            ))
            .unwrap()
        };
        // The slow tier of a fast-slow store is checked by the fast-slow layer.
        let fs = text("kind = \"fast-slow\"\n[store.fast]\nkind = \"memory\"");
        assert!(fs.warnings().is_empty(), "{:?}", fs.warnings());
        let bare = Config::from_toml(
            "[store]\nkind = \"s3\"\nbucket = \"b\"\nendpoint = \"http://127.0.0.1:1\"\nallow_http = true\n",
        )
        .unwrap();
        let w = bare.warnings();
        assert!(
            w.len() == 1 && w[0].contains("`store`") && w[0].contains("verify"),
            "{w:?}"
        );
        let c = Config::from_toml(
            "[action_cache_store]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:1\"\n",
        )
        .unwrap();
        let w = c.warnings();
        assert!(
            w.len() == 1 && w[0].contains("`action_cache_store`"),
            "{w:?}"
        );
    }

    #[test]
    fn worker_scope_rules_name_the_key() {
        let sha = "0".repeat(64);
        let c = Config::from_toml("[auth]\nanonymous = \"worker\"\n").unwrap();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("auth.anonymous"));
        let c = Config::from_toml(&format!(
            "instances = [\"main\"]\n[[auth.tokens]]\nname = \"w\"\nsha256 = \"{sha}\"\nscope = \"worker\"\ninstances = [\"prod\"]\n"
        ))
        .unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("auth.tokens[0].instances") && e.contains("prod"),
            "{e}"
        );
        let c = Config::from_toml(&format!(
            "instances = [\"main\"]\n[[auth.tokens]]\nname = \"w\"\nsha256 = \"{sha}\"\nscope = \"worker\"\ninstances = [\"main\"]\nexpires = \"2030-01-01T00:00:00Z\"\n"
        ))
        .unwrap();
        c.validate().unwrap();
    }

    #[test]
    fn validate_names_the_key() {
        let mut c = Config::default();
        *c.store.local_max_size_mut().unwrap() = ByteSize(0);
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("store.max_size"), "{e}");

        let c = Config::from_toml(
            "[[auth.tokens]]\nname = \"ci\"\nsha256 = \"abc\"\nscope = \"read\"\n",
        )
        .unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("auth.tokens[0].sha256"), "{e}");
    }

    #[test]
    fn verify_on_read_defaults_off_and_needs_a_disk() {
        let on = |c: &Config| matches!(&c.store, StoreConfig::Filesystem(f) if f.verify_on_read);
        assert!(!on(&Config::default()));
        let c = Config::from_toml("[store]\nverify_on_read = true\n").unwrap();
        assert!(on(&c));
        c.validate().unwrap();
        let e =
            Config::from_toml("[store]\nkind = \"memory\"\nverify_on_read = true\n").unwrap_err();
        assert!(e.contains("verify_on_read"), "{e}");
        let e = Config::from_toml("[store]\nverify_on_read = \"yes\"\n").unwrap_err();
        assert!(e.contains("verify_on_read"), "{e}");
    }

    #[test]
    fn connection_limits_parse_and_name_the_key() {
        let c = Config::from_toml("[connections]\nmax_connections = 8\n").unwrap();
        assert_eq!(c.connections.max_connections, 8);
        assert_eq!(c.connections.handshake_timeout_seconds, 10);
        c.validate().unwrap();
        let c = Config::from_toml("[connections]\nheader_read_timeout_seconds = 0\n").unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("connections.header_read_timeout_seconds"), "{e}");
        let e = Config::from_toml("[connections]\nidle_timeout = 5\n").unwrap_err();
        assert!(e.contains("idle_timeout"), "{e}");
    }

    #[test]
    fn the_action_cache_store_cannot_share_the_cas_directory() {
        let text = "[store]\npath = \"/srv/lre\"\n[action_cache_store]\nkind = \"verify\"\n\
                    [action_cache_store.backend]\npath = \"/srv/lre\"\n";
        let e = Config::from_toml(text)
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("action_cache_store") && e.contains("/srv/lre"),
            "{e}"
        );
        let ok = text.replace(
            "backend]\npath = \"/srv/lre\"",
            "backend]\npath = \"/srv/lre-ac\"",
        );
        Config::from_toml(&ok).unwrap().validate().unwrap();
    }
}
