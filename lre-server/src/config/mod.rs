//! The server's one typed configuration: a TOML file plus command-line overrides,
//! validated at start so that a bad key fails loudly before anything listens. Each table
//! has its file here and validates itself, returning a `ConfigError` that names the key;
//! the stores' tables are lre-store's (`StoreConfig`).

pub mod asset;
pub mod connections;
pub mod execution;
pub mod instance;
pub mod status;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::auth::{Scope, TokenConfig};
pub use asset::AssetConfig;
pub use connections::ConnectionsConfig;
pub use execution::ExecutionConfig;
pub use instance::{InstanceSettings, NixCacheSettings};
pub use lre_store::config::{default_store_path, ByteSize, InvalidKey, StoreConfig};
pub use status::StatusConfig;

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

pub(crate) fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

impl From<InvalidKey> for ConfigError {
    fn from(e: InvalidKey) -> ConfigError {
        ConfigError::Invalid {
            key: e.key,
            message: e.message,
        }
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
    pub instance_settings: std::collections::BTreeMap<String, InstanceSettings>,
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
    pub asset: AssetConfig,
    /// The status page's history bounds, and whether `/metrics` needs a token.
    #[serde(default)]
    pub status: StatusConfig,
    /// Per-port connection caps and timeouts against slow, idle and flooding clients.
    #[serde(default)]
    pub connections: ConnectionsConfig,
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
            asset: AssetConfig::default(),
            status: StatusConfig::default(),
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
        self.store.validate("store")?;
        if let Some(ac) = &self.action_cache_store {
            ac.validate("action_cache_store")?;
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
        self.execution.validate()?;
        self.status.validate()?;
        self.connections.validate()?;
        self.asset.validate(self.store.capacity())?;
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
            settings.nix.validate(&format!("{key}.nix"))?;
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
    fn nix_cache_keys_are_checked_by_key() {
        let c =
            Config::from_toml("[instance_settings.\"\".nix]\ntrusted_public_keys = [\"k:AAAA\"]\n")
                .unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("instance_settings.\"\".nix.trusted_public_keys[0]")
                && e.contains("32 bytes"),
            "{e}"
        );
        let good = "team-1:ZMgFPk3lPVzj+qoIrIS5OzcCDp9WLYhpa5O+a0R0wqM=";
        let c = Config::from_toml(&format!(
            "[instance_settings.main.nix]\ntrusted_public_keys = [\"{good}\"]\nmax_nar_size = \"1GiB\"\n"
        ))
        .unwrap();
        c.validate().unwrap();
        let n = &c.instance_settings["main"].nix;
        assert_eq!((n.keys().len(), n.max_nar_size.0), (1, 1 << 30));
        let c = Config::from_toml("[instance_settings.main.nix]\nmax_nar_size = \"0\"\n").unwrap();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("instance_settings.main.nix.max_nar_size"));
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
