//! A Redis (or Valkey) store: each entry is one string key, written whole by one `SET`, so
//! a reader on any replica sees all of an entry or none of it. Meant for action results,
//! which are small, read on every build, and must be shared by every replica at once.
//!
//! Commands go through the `redis` crate's `ConnectionManager`, which reconnects on its own
//! when a connection breaks (Redis restarted). A connection that goes *silent* (a crashed
//! host, a partition, a NAT dropping it) breaks nothing, so the manager would keep it:
//! every command is bounded here by `request_timeout_seconds`, and a command that times out
//! replaces the manager, so the next one dials afresh. TCP keepalive and `TCP_USER_TIMEOUT`
//! close such a socket from the kernel's side too.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use std::sync::Mutex;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::io::tcp::TcpSettings;
use redis::IntoConnectionInfo;

use super::{check_fits, reader_over, BlobReader, BlobStore, BlobWriter, Budget, Key, KeyKind};
use crate::config::RedisConfig;
use crate::error::{Result, StoreError as Error};

/// Keys asked about in one pipeline; a FindMissingBlobs of 100k digests is sent in parts,
/// so neither side buffers one huge reply.
const LOOKUP_CHUNK: usize = 4096;

pub struct RedisStore {
    shared: Arc<Shared>,
}

struct Shared {
    redis: RedisConnection,
    prefix: String,
    capacity: u64,
    budget: Budget,
    expire_seconds: Option<u64>,
}

/// One Redis server as lre talks to it: every command bounded by the request timeout, a
/// silent connection replaced, failures classified. The store here and the scheduler's
/// shared state (lre-server) both go through it.
pub struct RedisConnection {
    /// Replaced after a command times out (see the module documentation).
    conn: Mutex<ConnectionManager>,
    client: redis::Client,
    manager: ConnectionManagerConfig,
    /// Said in every error, so an operator knows which backend failed. Holds no secret:
    /// config validation refuses credentials in the URL.
    name: String,
    timeout: Duration,
}

impl RedisStore {
    /// Connects and tries every command the store sends, so a wrong address, password or
    /// ACL is an error at start that names the server, not a failure on the first build.
    pub async fn open(config: &RedisConfig) -> Result<RedisStore> {
        let redis = RedisConnection::open(config).await?;
        let store = RedisStore {
            shared: Arc::new(Shared {
                redis,
                prefix: config.prefix.clone(),
                capacity: config.max_blob_size.0,
                budget: Budget::new(config.max_in_flight.0),
                expire_seconds: config.expire_seconds,
            }),
        };
        store.probe().await?;
        Ok(store)
    }
}

impl RedisConnection {
    /// Connects (the connection fields of `config` only), so a wrong address or password
    /// is an error at start that names the server.
    pub async fn open(config: &RedisConfig) -> Result<RedisConnection> {
        // Validation refuses credentials in the URL; say so here too, so a caller that did
        // not validate cannot put a password into every error message.
        if config.url.contains('@') {
            return Err(Error::InvalidArgument(
                "redis url: credentials go in password_file, not in the URL".into(),
            ));
        }
        let name = format!("redis at {}", config.url);
        let info = config
            .url
            .as_str()
            .into_connection_info()
            .map_err(|e| Error::InvalidArgument(format!("{name}: {e}")))?;
        let mut settings = info.redis_settings().clone();
        if let Some(user) = &config.username {
            settings = settings.set_username(user);
        }
        if let Some(file) = &config.password_file {
            let password = tokio::fs::read_to_string(file).await.map_err(|e| {
                Error::InvalidArgument(format!(
                    "{name}: reading password_file {}: {e}",
                    file.display()
                ))
            })?;
            settings = settings.set_password(password.trim_end_matches(['\r', '\n']));
        }
        let timeout = Duration::from_secs(config.request_timeout_seconds);
        let tcp = TcpSettings::default()
            .set_nodelay(true)
            .set_keepalive(
                socket2::TcpKeepalive::new()
                    .with_time(Duration::from_secs(30))
                    .with_interval(Duration::from_secs(5)),
            )
            .set_user_timeout(timeout * 2);
        let info = info.set_redis_settings(settings).set_tcp_settings(tcp);
        let client = if config.tls() {
            tls_client(config, &name, info).await?
        } else {
            redis::Client::open(info)
        }
        .map_err(|e| Error::InvalidArgument(format!("{name}: {e}")))?;
        // A few quick reconnects per failed command, then UNAVAILABLE: Bazel retries too.
        let manager = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout.min(Duration::from_secs(5))))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(2)
            .set_min_delay(Duration::from_millis(100))
            .set_max_delay(Duration::from_secs(1));
        let conn = match tokio::time::timeout(
            timeout,
            ConnectionManager::new_with_config(client.clone(), manager.clone()),
        )
        .await
        {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => return Err(classify(&name, "connecting at start", e)),
            Err(_) => {
                return Err(Error::Unavailable(format!(
                    "{name}: connecting at start: no answer within {}s",
                    timeout.as_secs()
                )))
            }
        };
        Ok(RedisConnection {
            conn: Mutex::new(conn),
            client,
            manager,
            name,
            timeout,
        })
    }
}

/// A client for `rediss://`: the server verified against `tls_ca_file` (or the system's
/// roots), with a client certificate when one is configured.
async fn tls_client(
    config: &RedisConfig,
    name: &str,
    info: redis::ConnectionInfo,
) -> Result<redis::RedisResult<redis::Client>> {
    // rustls needs a process-wide provider; ring is the one lre builds with (the server's
    // TLS uses it too). Already installed is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let read = |key: &'static str, path: &Option<std::path::PathBuf>| {
        let path = path.clone();
        let name = name.to_owned();
        async move {
            match path {
                None => Ok(None),
                Some(p) => tokio::fs::read(&p).await.map(Some).map_err(|e| {
                    Error::InvalidArgument(format!("{name}: reading {key} {}: {e}", p.display()))
                }),
            }
        }
    };
    let root_cert = read("tls_ca_file", &config.tls_ca_file).await?;
    let cert = read("tls_client_cert_file", &config.tls_client_cert_file).await?;
    let key = read("tls_client_key_file", &config.tls_client_key_file).await?;
    let client_tls = match (cert, key) {
        (Some(client_cert), Some(client_key)) => Some(redis::ClientTlsConfig {
            client_cert,
            client_key,
        }),
        _ => None,
    };
    Ok(redis::Client::build_with_tls(
        info,
        redis::TlsCertificates {
            client_tls,
            root_cert,
        },
    ))
}

impl RedisStore {
    /// Every command the store sends, once, on a key of its own: a user the ACL does not
    /// allow them, a read-only replica, a Redis without GETEX (before 6.2, with
    /// `expire_seconds`) or a Redis Cluster fail here, naming the server, not on each request.
    async fn probe(&self) -> Result<()> {
        let s = &self.shared;
        let what = "checking the server at start";
        let key = format!("{}lre-probe", s.prefix);
        let mut set = redis::cmd("SET");
        set.arg(&key).arg("probe").arg("EX").arg(60);
        let _: () = s.redis.run(what, &set).await?;
        let mut p = redis::pipe();
        p.atomic()
            .cmd("EXISTS")
            .arg(&key)
            .cmd("STRLEN")
            .arg(&key)
            .cmd("EXPIRE")
            .arg(&key)
            .arg(60)
            .ignore();
        let _: Vec<u64> = s.redis.run_pipe(what, &p).await?;
        let mut get = redis::cmd(if s.expire_seconds.is_some() {
            "GETEX"
        } else {
            "GET"
        });
        get.arg(&key);
        let got: Option<Vec<u8>> = s.redis.run(what, &get).await?;
        let mut del = redis::cmd("DEL");
        del.arg(&key);
        let _: u64 = s.redis.run(what, &del).await?;
        if got.as_deref() != Some(&b"probe"[..]) {
            return Err(Error::Internal(format!(
                "{}: {what}: a value written was read back as {got:?}",
                s.redis.name
            )));
        }
        Ok(())
    }
}

impl Shared {
    fn key(&self, key: &Key) -> String {
        format!("{}{key}", self.prefix)
    }
}

impl RedisConnection {
    /// The server as errors name it ("redis at URL").
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The client, for what a shared connection cannot do (a pub/sub subscription).
    pub fn client(&self) -> &redis::Client {
        &self.client
    }

    /// The request timeout every command is bounded by.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    fn conn(&self) -> ConnectionManager {
        self.conn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    pub async fn run<T: redis::FromRedisValue>(&self, what: &str, cmd: &redis::Cmd) -> Result<T> {
        let mut conn = self.conn();
        self.bounded(what, cmd.query_async(&mut conn)).await
    }

    /// Runs a Lua script (EVALSHA, loading it first if the server lacks it): one atomic
    /// step, however many keys it touches.
    pub async fn run_script<T: redis::FromRedisValue>(
        &self,
        what: &str,
        script: &redis::ScriptInvocation<'_>,
    ) -> Result<T> {
        let mut conn = self.conn();
        self.bounded(what, script.invoke_async(&mut conn)).await
    }

    pub async fn run_pipe<T: redis::FromRedisValue>(
        &self,
        what: &str,
        p: &redis::Pipeline,
    ) -> Result<T> {
        let mut conn = self.conn();
        self.bounded(what, p.query_async(&mut conn)).await
    }

    async fn bounded<T>(
        &self,
        what: &str,
        f: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T> {
        match tokio::time::timeout(self.timeout, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                if e.is_timeout() {
                    self.redial();
                }
                Err(classify(&self.name, what, e))
            }
            Err(_) => {
                self.redial();
                Err(Error::Unavailable(format!(
                    "{}: {what}: no answer within {}s",
                    self.name,
                    self.timeout.as_secs()
                )))
            }
        }
    }

    /// A silent connection is not a broken one, so the manager would keep using it:
    /// replace it with one that dials on its next command.
    fn redial(&self) {
        match ConnectionManager::new_lazy_with_config(self.client.clone(), self.manager.clone()) {
            Ok(fresh) => {
                tracing::warn!(server = %self.name, "redis did not answer in time; reconnecting");
                *self
                    .conn
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner()) = fresh;
            }
            Err(e) => tracing::warn!(server = %self.name, error = %e, "cannot reconnect to redis"),
        }
    }
}

/// What a Redis failure means for the caller. A connection that failed or timed out, or a
/// server that is loading, failing over or busy: UNAVAILABLE, worth retrying. A Redis at
/// its `maxmemory` refusing writes: a full store. Anything else (an ACL refusal, a read-only
/// replica, an unknown command, a key of another type) is a misconfiguration that retrying
/// will not fix: INTERNAL, so it is not mistaken for an outage.
fn classify(name: &str, what: &str, e: redis::RedisError) -> Error {
    let message = format!("{name}: {what}: {e}");
    match e.code() {
        Some("OOM") => Error::StorageFull(message),
        // NOAUTH / WRONGPASS too: also what a restarted Redis says before its password is
        // set, and a rotated password may come back.
        Some(
            "LOADING" | "MASTERDOWN" | "TRYAGAIN" | "BUSY" | "CLUSTERDOWN" | "NOAUTH" | "WRONGPASS",
        ) => Error::Unavailable(message),
        Some(_) => Error::Internal(message),
        None => Error::Unavailable(message),
    }
}

#[async_trait]
impl BlobStore for RedisStore {
    async fn lookup(&self, keys: &[Key]) -> Result<Vec<Option<u64>>> {
        let s = &self.shared;
        let mut out = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(LOOKUP_CHUNK) {
            // EXISTS as well as STRLEN: an empty action result is a present, empty string.
            // MULTI/EXEC, so no key is removed between its two answers.
            let mut p = redis::pipe();
            p.atomic();
            for key in chunk {
                let k = s.key(key);
                p.cmd("EXISTS").arg(&k).cmd("STRLEN").arg(&k);
                if let Some(ttl) = s.expire_seconds {
                    p.cmd("EXPIRE").arg(&k).arg(ttl).ignore();
                }
            }
            let replies: Vec<u64> = s.redis.run_pipe("looking up entries", &p).await?;
            if replies.len() != chunk.len() * 2 {
                return Err(Error::Unavailable(format!(
                    "{}: looking up {} entries: {} replies",
                    s.redis.name,
                    chunk.len(),
                    replies.len()
                )));
            }
            out.extend(replies.chunks(2).map(|r| (r[0] == 1).then_some(r[1])));
        }
        Ok(out)
    }

    async fn get(&self, key: &Key) -> Result<Option<Bytes>> {
        let s = &self.shared;
        let cmd = match s.expire_seconds {
            Some(ttl) => {
                let mut c = redis::cmd("GETEX");
                c.arg(s.key(key)).arg("EX").arg(ttl);
                c
            }
            None => {
                let mut c = redis::cmd("GET");
                c.arg(s.key(key));
                c
            }
        };
        let value: Option<Vec<u8>> = s.redis.run(&format!("reading {key}"), &cmd).await?;
        // Larger than this store writes: not ours (another writer under the prefix).
        if value.as_ref().is_some_and(|v| v.len() as u64 > s.capacity) {
            return Err(Error::Internal(format!(
                "{}: {key} holds more than max_blob_size ({} bytes)",
                s.redis.name, s.capacity
            )));
        }
        Ok(value.map(Bytes::from))
    }

    async fn open(
        &self,
        key: &Key,
        offset: u64,
        _limit: Option<u64>,
    ) -> Result<Option<(u64, BlobReader)>> {
        Ok(self.get(key).await?.map(|data| reader_over(data, offset)))
    }

    async fn writer(&self, size_hint: Option<u64>) -> Result<Box<dyn BlobWriter>> {
        check_fits(size_hint, self.shared.capacity)?;
        Ok(Box::new(RedisWriter {
            shared: self.shared.clone(),
            buf: Vec::new(),
        }))
    }

    async fn remove(&self, key: &Key) -> Result<()> {
        let s = &self.shared;
        let mut cmd = redis::cmd("DEL");
        cmd.arg(s.key(key));
        let _: u64 = s.redis.run(&format!("removing {key}"), &cmd).await?;
        Ok(())
    }

    async fn list(&self, kind: KeyKind) -> Result<Vec<Key>> {
        let s = &self.shared;
        let dir = format!("{}{}/", s.prefix, kind.dir());
        // SCAN's MATCH is a glob: the prefix's own glob characters are escaped.
        let mut pattern = String::new();
        for c in dir.chars() {
            if matches!(c, '*' | '?' | '[' | ']' | '\\') {
                pattern.push('\\');
            }
            pattern.push(c);
        }
        pattern.push('*');
        let mut found = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let mut cmd = redis::cmd("SCAN");
            cmd.arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000);
            let (next, keys): (u64, Vec<String>) = s.redis.run("listing entries", &cmd).await?;
            found.extend(keys.iter().filter_map(|k| {
                let hash = crate::digest::Digest::parse_hash(k.strip_prefix(&dir)?).ok()?;
                Some(Key::of_kind(kind, hash))
            }));
            if next == 0 {
                break;
            }
            cursor = next;
        }
        // SCAN may return a key more than once.
        found.sort_by_key(|k| *k.hash());
        found.dedup();
        Ok(found)
    }

    fn capacity(&self) -> u64 {
        self.shared.capacity
    }
}

/// An entry being written: held in memory (counted against `max_in_flight`) and sent with
/// one SET at commit, so Redis never holds half of it.
struct RedisWriter {
    shared: Arc<Shared>,
    buf: Vec<u8>,
}

#[async_trait]
impl BlobWriter for RedisWriter {
    async fn write(&mut self, data: &[u8]) -> Result<()> {
        let s = &self.shared;
        if self.buf.len() as u64 + data.len() as u64 > s.capacity {
            return Err(Error::InvalidArgument(format!(
                "{}: an entry of more than {} bytes (max_blob_size)",
                s.redis.name, s.capacity
            )));
        }
        s.budget.take(data.len() as u64)?;
        self.buf.extend_from_slice(data);
        Ok(())
    }

    async fn commit(self: Box<Self>, key: Key) -> Result<()> {
        let s = self.shared.clone();
        let mut cmd = redis::cmd("SET");
        cmd.arg(s.key(&key)).arg(&self.buf);
        if let Some(ttl) = s.expire_seconds {
            cmd.arg("EX").arg(ttl);
        }
        let _: () = s.redis.run(&format!("writing {key}"), &cmd).await?;
        Ok(())
    }
}

impl Drop for RedisWriter {
    fn drop(&mut self) {
        self.shared.budget.give(self.buf.len() as u64);
    }
}
